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

import data
from errors import UserError, cli
from saeshare.core.options import parse
from saeshare.disk.runs import Run, RunsOptions, RunWriter
from saeshare.training.steps import EncoderPass, EncoderSpec, build_encoder, encoder_pass, save_layer


@dataclass(kw_only=True)
class RecordArgs(data.DataOptions, RunsOptions):
    run: str
    """The run whose encoder, pooled token and SAEs are applied (RUN@SEED not needed: every seed is copied)."""
    runname: str
    """Name of the new run."""
    overwrite: bool = False
    """Replace an existing run of this name."""
    num_workers: int | None = None
    """DataLoader workers; default: a few on GPU, 0 on CPU."""

    def __post_init__(self):
        data.DataOptions.__post_init__(self)
        RunsOptions.__post_init__(self)
        if "@" in self.run:
            raise UserError(f"--run {self.run}: give the run itself; every SAE seed of it is copied")


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
        acts = encoder_pass(plan, writer)
        layer_info = {layer: save_layer(layer, [(source.with_seed(seed).sae(layer), None) for seed in meta.sae.seeds],
                                        meta.sae.seeds, acts[layer], writer, args.torch_device)
                      for layer in meta.layers}
        new = writer.finish(dataclasses.replace(meta, runname=args.runname, dataset=ds.describe(),
                                                layer_info=layer_info, sae_from=source.name,
                                                sae_from_id=source.meta.run_id))
    print(f"wrote {writer.final} ({len(new.layers)} layers of {source.name!r} over {len(ds)} samples, "
          f"{time.perf_counter() - t0:.1f} s); last layer FVU on them {layer_info[meta.layers[-1]].fvu_pooled:.3f}")
    return Run.open(args.root, args.runname)


@cli
def main(argv=None):
    record(parse(RecordArgs, argv, "Apply a run's encoder and SAEs to other samples, without training"))


if __name__ == "__main__":
    main()
