"""Export a run's SAEs for another library (SAELens, EleutherAI's sparsify, dictionary_learning, saev), with a
model card.

    uv run export.py --run clip --format saelens --out clip_saelens        # every layer, the run's first seed
    uv run export.py --run clip@1 --format sparsify --out clip_sparsify    # its seed 1

<out>/layer{LL}/ is one SAE in that library's layout, its metadata naming the model, hooked block, pooled
token, dataset fingerprint, FVU and fvu_pooled; <out>/README.md is a hub-ready model card. The folder is
built hidden and renamed into place; an existing one is replaced only with --overwrite.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from errors import UserError, cli
from saeshare.core.options import parse
from saeshare.disk.files import staged_dir, write_atomic
from saeshare.disk.runs import Run, RunsOptions
from saeshare.exchange.formats import FORMATS, Format
from wrappedmodels import ENCODERS

LOADERS = {
    "saelens": "from sae_lens import SAE\nsae = SAE.load_from_disk(\"layer{LL}\")",
    "sparsify": "from sparsify import SparseCoder\nsae = SparseCoder.load_from_disk(\"layer{LL}\")",
    "dictionary_learning": "from dictionary_learning.trainers.top_k import AutoEncoderTopK\n"
                           "sae = AutoEncoderTopK.from_pretrained(\"layer{LL}/ae.pt\")",
    "saev": "import saev.nn\n# a ReLU SAE in saev: its codes are this run's relu codes, every feature\n"
            "sae = saev.nn.load(\"layer{LL}/sae.pt\")",
}
"""How the card says to load one layer with the library itself."""


@dataclass(kw_only=True)
class ExportArgs(RunsOptions):
    run: str
    """The run (RUN@SEED for another SAE seed)."""
    format: str
    """saelens, sparsify, dictionary_learning or saev."""
    out: str
    """Folder to write (one subfolder per layer, and README.md)."""
    overwrite: bool = False
    """Replace an existing folder."""

    def __post_init__(self):
        super().__post_init__()
        if self.format not in FORMATS:
            raise UserError(f"unknown --format {self.format!r}; choose {', '.join(FORMATS)}")


def metadata(run: Run, layer: int) -> dict:
    """What a format's metadata says of one exported SAE."""
    m, info = run.meta, run.meta.layer_info[layer]
    fit = info.per_seed.get(run.seed, info)
    return {"saeshare_run": run.name, "model_name": m.checkpoint, "saeshare_family": m.model,
            "hook_name": f"blocks.{layer}", "layer": layer, "pooled_token": m.token, "modality": m.modality,
            "sae_seed": run.seed, "dataset": m.dataset.name, "dataset_fingerprint": m.dataset.fingerprint,
            "n_samples": m.dataset.n_samples, "fvu": fit.fvu, "fvu_pooled": fit.fvu_pooled, "steps": fit.steps}


def model_card(run: Run, fmt: type[Format]) -> str:
    m = run.meta
    per_layer = {layer: metadata(run, layer) for layer in run.layers}
    rows = "\n".join(f"| {layer} | {run.n_features(layer)} | {_num(x['fvu'])} | {_num(x['fvu_pooled'])} | "
                     f"{x['steps'] or '-'} |" for layer, x in per_layer.items())
    load = LOADERS[fmt.name].replace("{LL}", f"{run.layers[0]:02d}")
    return f"""---
tags: [sparse-autoencoder, saeshare, {fmt.name}]
---
# Top-k SAEs on {m.model} `{m.checkpoint}` ({m.modality})

One top-k sparse autoencoder per block output of `{m.checkpoint}` (top_k {m.sae.top_k}, expansion factor
{m.sae.expansion_factor}, lr {m.sae.lr:g}, SAE seed {run.seed}), trained with
saeshare on every token of {m.dataset.n_samples} samples of `{m.dataset.name}`
({m.dataset.split}; fingerprint `{m.dataset.fingerprint[:12]}`); the pooled token its analyses read is
`{m.token}`. Run `{run.name}`. Codes: TopK(ReLU((x - b_dec) W_enc + b_enc)), no encoder bias (zeros).

| layer | features | FVU (training tokens) | FVU (pooled tokens) | steps |
| --- | --- | --- | --- | --- |
{rows}

Load one layer with {fmt.name}:

```python
{load}
```

and with saeshare, over any samples (record.py applies the encoder and this SAE; the analyses then read it):

```bash
uv run record.py --model {m.model} {_flag(m.model)} {m.checkpoint} \\
    --sae_file layer{run.layers[-1]:02d} --sae_format {fmt.name} \\
    --layers {run.layers[-1]} --dataset DATASET --runname imported
```
"""


def _flag(model: str) -> str:
    """The family's checkpoint flag (a family this version does not know: a placeholder to fill in)."""
    return ENCODERS[model].checkpoint_flag if model in ENCODERS else "--CHECKPOINT_FLAG"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def export(args: ExportArgs) -> Path:
    run, fmt = Run.open(args.root, args.run), FORMATS[args.format]
    out = Path(args.out)

    def may_replace(final: Path) -> None:
        if final.exists() and not args.overwrite:
            raise UserError(f"{final} already exists; pass --overwrite to replace it")

    may_replace(out.resolve())
    with staged_dir(out, may_replace) as tmp:
        for layer in run.layers:
            sae = run.sae(layer)
            if sae.threshold is not None:  # imported from a JumpReLU SAE: no top-k format can say it
                raise UserError(f"run {run.name!r} layer {layer}: a JumpReLU SAE (imported) cannot be written as "
                                f"{fmt.name}'s top-k; export its original file instead")
            fmt.write(sae, tmp / f"layer{layer:02d}", metadata(run, layer))
        card = model_card(run, fmt)
        write_atomic(tmp / "README.md", lambda t: t.write_text(card))
    return out


@cli
def main(argv=None):
    args = parse(ExportArgs, argv, "Export a run's SAEs for SAELens, sparsify, dictionary_learning or saev")
    out = export(args)
    print(f"wrote {out} ({args.format}: {len(Run.open(args.root, args.run).layers)} layers and README.md)")


if __name__ == "__main__":
    main()
