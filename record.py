"""Apply a trained run's encoder and SAEs to other samples, without training (docs/design.md#probes): held-out
in-distribution data and out-of-distribution data for probes and OOD detection, which the SAEs never
saw in training.

    uv run record.py --run effnet --dataset shapes --offset 2000 --max_samples 500 --runname effnet_test
    uv run record.py --run effnet --where shape=star --runname effnet_stars     # a shapes subset

The new run has its own dataset (and fingerprint), the source run's SAEs (every seed, copied), its
pooled token, layers and settings, `"sae_from": "<run>"`, and each SAE's FVU on the new samples.
Recording a run's own samples reproduces its stored activations exactly (same order, same batches).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import data
from errors import ArgumentParser, UserError, cli
from saeshare.core.options import add_options, options_from
from saeshare.disk.runs import Run, RunMeta, RunsOptions, RunWriter, SaeSettings
from saeshare.exchange import formats
from saeshare.training.steps import EncoderPass, EncoderSpec, build_encoder, encoder_pass, layer_width, save_layer
from saeshare.training.train import DEFAULT_BATCH
from wrappedmodels import ENCODERS, add_checkpoint_flags, get_encoder_class


@dataclass(kw_only=True)
class RecordArgs(data.DataOptions, RunsOptions):
    runname: str
    """Name of the new run."""
    run: str | None = None
    """The run whose encoder, pooled token and SAEs are applied (RUN@SEED not needed: every seed is copied)."""
    sae_file: str | None = None
    """Instead of --run: an SAE saved by another library (a folder), applied to the encoder --model at the one
    layer of --layers."""
    sae_format: str = "auto"
    """The format of --sae_file: auto (from its files), saelens, sparsify, dictionary_learning or saev."""
    sae_input_mean: str | None = None
    """With --sae_file: a .npy vector [d] its library subtracted from the activations before the SAE (saev's
    mean, say); folded into the SAE exactly."""
    sae_input_scale: float | None = None
    """With --sae_file: the factor its library multiplied the (centred) activations by; folded in exactly."""
    model: str | None = None
    """With --sae_file: the encoder family (checkpoint by the family's own flag)."""
    checkpoint: str | None = None
    """Set on the command line by the family's own flag (--clip_model_name, ...)."""
    layers: list[int] | None = None
    """With --sae_file: the block whose output the SAE reads (one; -1 = last)."""
    token: str | None = None
    """With --sae_file: the pooled token recorded per sample (default: the family's own)."""
    image_size: int | None = None
    """With --sae_file and EfficientNetLite: the input size."""
    overwrite: bool = False
    """Replace an existing run of this name."""
    num_workers: int | None = None
    """DataLoader workers; default: a few on GPU, 0 on CPU."""

    def __post_init__(self):
        data.DataOptions.__post_init__(self)
        RunsOptions.__post_init__(self)
        if (self.run is None) == (self.sae_file is None):
            raise UserError("give one of --run RUN (a run's own SAEs) or --sae_file PATH (another library's SAE)")
        given = [f"--{f}" for f in ("model", "layers", "token", "image_size") if getattr(self, f) is not None]
        if self.run is not None and given:
            raise UserError(f"{', '.join(given)} go with --sae_file; --run applies the run's own encoder and layers")
        if self.run is not None and "@" in self.run:
            raise UserError(f"--run {self.run}: give the run itself; every SAE seed of it is copied")
        if self.sae_file is not None and (self.model is None or self.layers is None or len(self.layers) != 1):
            raise UserError("--sae_file needs --model FAMILY (and its checkpoint flag) and one --layers L: the "
                            "encoder and block whose output the SAE reads")


def recorded_run(args: RecordArgs) -> Run | None:
    """The run `args` would write, when it already exists: recorded from the same write of the source run
    over the same samples."""
    try:
        old, source = Run.open(args.root, args.runname), Run.open(args.root, args.run)
    except UserError:
        return None
    same = old.meta.sae_from == source.name and old.meta.sae_from_id == source.meta.run_id
    return old if same and old.fingerprint == args.load().fingerprint else None


def record(args: RecordArgs) -> Run:
    t0 = time.perf_counter()
    source = Run.open(args.root, args.run)
    meta = source.meta
    encoder = build_encoder(EncoderSpec.of_run(meta), args.torch_device)
    ds = args.load()
    with RunWriter(args.root, args.runname, args.overwrite) as writer:
        plan = EncoderPass(ds, encoder, meta.layers, meta.sae, meta.acts_dtype, args.torch_device,
                           f"{args.runname}: {len(meta.layers)} layers (from {source.name})", args.num_workers)
        acts = encoder_pass(plan, {encoder.modality: writer})[encoder.modality]
        layer_info = {layer: save_layer(layer, [(source.with_seed(seed).sae(layer), None) for seed in meta.sae.seeds],
                                        meta.sae.seeds, acts[layer], writer, args.torch_device)
                      for layer in meta.layers}
        new = writer.finish(dataclasses.replace(meta, runname=args.runname, dataset=ds.describe(),
                                                layer_info=layer_info, sae_from=source.name,
                                                sae_from_id=source.meta.run_id))
    print(f"wrote {writer.final} ({len(new.layers)} layers of {source.name!r} over {len(ds)} samples, "
          f"{time.perf_counter() - t0:.1f} s); last layer FVU on them {layer_info[meta.layers[-1]].fvu_pooled:.3f}")
    return Run.open(args.root, args.runname)


def _vector(path: str | None):
    if path is None:
        return None
    try:
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32)).reshape(-1)
    except (OSError, ValueError) as e:
        raise UserError(f"--sae_input_mean {path}: not a .npy vector ({e})") from None


def record_imported(args: RecordArgs) -> Run:
    """A run whose SAE at one layer is another library's (record.py --sae_file), over args' samples."""
    t0 = time.perf_counter()
    norm = None
    if args.sae_input_mean is not None or args.sae_input_scale is not None:
        scale = 1.0 if args.sae_input_scale is None else args.sae_input_scale
        norm = formats.InputNorm(_vector(args.sae_input_mean), scale)
    imported = formats.read(args.sae_file, args.sae_format, norm)
    sae, modality = imported.sae, get_encoder_class(args.model).modality
    encoder = build_encoder(EncoderSpec(args.model, modality, args.checkpoint, args.token, args.image_size),
                            args.torch_device)
    layer = encoder.resolve_layers(args.layers)[0]
    ds = args.load()
    settings = SaeSettings(top_k=sae.top_k, expansion_factor=max(1, sae.n_features // sae.d_model),
                           batch_size=DEFAULT_BATCH[modality])
    with RunWriter(args.root, args.runname, args.overwrite) as writer:
        plan = EncoderPass(ds, encoder, [layer], settings, "float32", args.torch_device,
                           f"{args.runname}: layer {layer} ({args.sae_file})", args.num_workers)
        width = layer_width(plan, layer)
        if width != sae.d_model:
            raise UserError(f"--sae_file {args.sae_file}: the SAE reads width {sae.d_model}, layer {layer} of "
                            f"{args.model} {encoder.checkpoint} outputs width {width}")
        acts = encoder_pass(plan, {modality: writer})[modality]
        info = {layer: save_layer(layer, [(sae, None)], settings.seeds, acts[layer], writer, args.torch_device)}
        fmt = args.sae_format if args.sae_format != "auto" else formats.detect(Path(args.sae_file)).name
        writer.finish(RunMeta(
            runname=args.runname, modality=modality, model=args.model, checkpoint=encoder.checkpoint,
            token=encoder.token, dataset=ds.describe(), sae=settings, layers=[layer], layer_info=info,
            n_layers_model=encoder.n_layers, image_size=getattr(encoder, "image_size", None),
            sae_file=f"{fmt}:{Path(args.sae_file).resolve()}", device=str(args.torch_device)))
    print(f"wrote {writer.final} (layer {layer} of {args.model} through the {fmt} SAE {args.sae_file}, "
          f"{len(ds)} samples, {time.perf_counter() - t0:.1f} s); FVU on them {info[layer].fvu_pooled:.3f}")
    return Run.open(args.root, args.runname)


@cli
def main(argv=None):
    p = ArgumentParser(description="Apply a run's encoder and SAEs (or another library's SAE) to other samples, "
                                   "without training")
    add_options(p, RecordArgs, skip=("checkpoint",))
    add_checkpoint_flags(p, list(ENCODERS), "with --sae_file: the checkpoint (hub id or local folder)")
    ns = p.parse_args(argv)
    family = ENCODERS.get(ns.model) if ns.model else None
    args = options_from(RecordArgs, ns, checkpoint=family.checkpoint_from(ns) if family else None)
    if args.sae_file is not None:
        if family is None:
            raise UserError(f"unknown --model {args.model!r}; choose from {', '.join(ENCODERS)}")
        return record_imported(args)
    return record(args)


if __name__ == "__main__":
    main()
