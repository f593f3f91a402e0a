"""The one training/recording loop behind train_image.py and train_text.py (docs/design.md#the-sae, #runs-on-disk).

One encoder pass per batch trains the SAE of every requested layer on all (non-padding) tokens and
stores the pooled token of every sample; features are computed from those after training, on demand.
"""
from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

import data
from errors import ArgumentParser, OptionError, UserError, check_choices, check_positive
from sae import SaeConfig, SeedStack, TopKSAE
from saeshare.core import distributed
from saeshare.core.distributed import resolve_device
from saeshare.core.options import add_options, options_from
from saeshare.core.progress import progress
from saeshare.disk.runs import DEFAULT_ROOT, LayerInfo, Run, RunMeta, RunWriter, SaeSettings
from saeshare.training import torchrun
from saeshare.training.steps import (
    EncoderPass,
    EncoderSpec,
    TrainedLayers,
    build_encoder,
    check_informative,
    encoder_pass,
    new_trainers,
    save_layer,
    train_steps,
)
from wrappedmodels import ENCODERS, TOKENS, Encoder, add_checkpoint_flags, get_encoder_class, layer_ids

DEFAULT_BATCH = {"image": 16, "text": 256, "mllm": 8}
"""Encoder batch of the paper's code: 16 images or 256 captions (one SAE step per batch); 8 prompts of an MLLM."""


@dataclass(kw_only=True)
class TrainConfig(data.DataOptions):
    runname: str
    """Name of the run: its folder under --root."""
    model: str
    """Encoder family (--model)."""
    checkpoint: str | None = None
    """None = the family's default checkpoint (set on the command line by the family's own flag)."""
    layers: list[int] | None = None
    """Block ids (-1 = last); default: every block."""
    token: str | None = None
    """Pooled token recorded per sample; default: the model's own (docs/design.md#pooled-token)."""
    batch_size: int | None = None
    """Encoder batch; default: 16 images or 256 captions, as the paper."""
    root: str = DEFAULT_ROOT
    """Folder of the runs."""
    overwrite: bool = False
    """Replace an existing run of this name."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    seed: int = 0
    """Seed of torch, of --random_init and of the SAE's initialisation (unless --seeds)."""
    seeds: list[int] | None = None
    """SAE seeds: one SAE per seed on every layer, all trained in the same encoder pass on the same batches
    (wMPPC between two seeds of a run is its ceiling; address one as RUN@SEED). Default: --seed."""
    random_init: bool = False
    """Re-initialise the encoder's weights with --seed (same architecture and preprocessing): a floor."""
    sae_tokens: Literal["all", "pooled"] = "all"
    """Train the SAE on every token of the layer (the paper), or only on the recorded pooled tokens."""
    sae_epochs: int = 1
    """With --sae_tokens pooled: epochs over the stored pooled tokens."""
    shuffle: bool = True
    """Train the SAEs on the samples in a random order drawn from --seed (the paper's shuffled loader);
    the recorded rows stay in dataset order. --no_shuffle: dataset order."""
    train_on_padding: bool = False
    """Also train on padding positions of captions (the paper's code does)."""
    acts_dtype: Literal["float32", "float16"] = "float32"
    """dtype of the stored pooled activations (float16 is checked for overflow)."""
    encoder_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the encoder's weights: bfloat16 halves a large model's memory (the SAEs train in float32 on
    its outputs)."""
    num_workers: int | None = None
    """DataLoader workers for decoding/preprocessing; default: a few on GPU, 0 on CPU."""
    image_size: int | None = None
    """Input size for EfficientNetLite (default 224; the others use their own processor)."""
    shuffle_captions: int | None = None
    """Null baseline: permute captions across samples with this seed (same fingerprint)."""

    def __post_init__(self):
        super().__post_init__()
        check_choices(self)
        check_positive("batch_size", self.batch_size)
        check_positive("image_size", self.image_size)
        check_positive("sae_epochs", self.sae_epochs)
        if self.sae_epochs > 1 and self.sae_tokens == "all":
            raise OptionError("sae_epochs", "{opt} goes with --sae_tokens pooled (all tokens are seen in one pass)")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise OptionError("seeds", f"{{opt}} lists a seed twice: {' '.join(map(str, self.seeds))}")


    def encoder_spec(self, modality: str) -> EncoderSpec:
        return EncoderSpec(self.model, modality, self.checkpoint, self.token, self.image_size, self.random_init,
                           self.seed, self.encoder_dtype)


class TrainResult(NamedTuple):
    run_dir: Path
    meta: RunMeta
    seconds: float


class PassExtension(Protocol):
    """What a command adds to the training pass (train_mllm.py's modality counts)."""

    def prepare(self, encoder: Encoder) -> None:
        """Set up the encoder once it is built, before the pass."""

    def finish(self, plan: EncoderPass, saes: dict[int, TopKSAE], writers: dict[str, RunWriter]) -> dict:
        """After training, with each layer's first-seed SAE: files for the runs' folders, and the fields it
        returns for every run's meta."""

    def matches(self, meta: RunMeta) -> bool:
        """An existing run was made with these settings (its token among them): training would remake it."""


def run_names(runname: str, row_sets: tuple[str, ...]) -> dict[str, str]:
    """The runs of a pass by row set: the name itself, or `<runname>_<modality>` where a pass writes several."""
    return {m: runname if len(row_sets) == 1 else f"{runname}_{m}" for m in row_sets}


def _settings(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str) -> SaeSettings:
    return SaeSettings(**asdict(sae_cfg), batch_size=cfg.batch_size or DEFAULT_BATCH[modality], seed=cfg.seed,
                       seeds=cfg.seeds or [cfg.seed], train_on_padding=cfg.train_on_padding,
                       sae_tokens=cfg.sae_tokens, sae_epochs=cfg.sae_epochs, shuffle=cfg.shuffle)


def trained_run(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str,
                dataset: Callable[[], data.DatasetInfo] | None = None) -> Run | None:
    """The one run of a one-row family's training, as trained_runs finds it."""
    runs = trained_runs(cfg, sae_cfg, modality, dataset)
    return None if runs is None else next(iter(runs.values()))


def trained_runs(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str,
                 dataset: Callable[[], data.DatasetInfo] | None = None,
                 extension: PassExtension | None = None) -> dict[str, Run] | None:
    """The complete runs of `cfg`, by row set, if training it again would make the same runs (same encoder,
    layers, tokens, samples and SAE settings), else None. `dataset()` describes cfg's samples (default: load
    them), called only when the runs exist: a study loads a hub dataset once for all its runs."""
    cls = get_encoder_class(cfg.model, modality)
    runs = {}
    for m, name in run_names(cfg.runname, cls.row_sets()).items():
        try:
            run = Run.open(cfg.root, name)
        except UserError:
            return None
        meta = run.meta
        same = (meta.model == cfg.model and meta.checkpoint == (cfg.checkpoint or cls.default_checkpoint)
                and (extension.matches(meta) if extension is not None
                     else meta.token == (cfg.token or cls.token_for(cfg.checkpoint)))
                and meta.image_size == cfg.image_size
                and meta.acts_dtype == cfg.acts_dtype and meta.sae == _settings(cfg, sae_cfg, modality)
                and meta.random_init == cfg.random_init and meta.encoder_dtype == cfg.encoder_dtype
                and meta.n_layers_model is not None
                and meta.layers == layer_ids(cfg.layers, meta.n_layers_model, f"run {run.name!r}"))
        if not same:
            return None
        runs[m] = run
    describe = dataset or (lambda: cfg.load(cfg.shuffle_captions).describe())
    found = describe()
    return runs if all(r.meta.dataset == found for r in runs.values()) else None


def train(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str) -> TrainResult:
    (result,) = train_runs(cfg, sae_cfg, modality).values()
    return result


def train_runs(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str,
               extension: PassExtension | None = None) -> dict[str, TrainResult]:
    """One encoder pass that trains every layer's SAEs and writes one run per row set of the encoder
    (Encoder.row_sets), all with the same SAEs."""
    t0 = time.perf_counter()
    main = distributed.rank() == 0  # under torchrun, rank 0 writes the runs
    names = run_names(cfg.runname, get_encoder_class(cfg.model, modality).row_sets())
    with contextlib.ExitStack() as stack:
        # refuses an existing run before any work
        writers = ({m: stack.enter_context(RunWriter(cfg.root, name, cfg.overwrite)) for m, name in names.items()}
                   if main else {})
        device = resolve_device(cfg.device)
        ds = cfg.load(cfg.shuffle_captions)
        encoder = build_encoder(cfg.encoder_spec(modality), device)
        if extension is not None:
            extension.prepare(encoder)
        layers = encoder.resolve_layers(cfg.layers)
        settings = _settings(cfg, sae_cfg, modality)
        plan = EncoderPass(ds, encoder, layers, settings, cfg.acts_dtype, device,
                           f"{cfg.runname}: {len(layers)} layers", cfg.num_workers)
        trained = torchrun.train_pass(plan, writers) if distributed.world_size() > 1 else _train_pass(plan, writers)
        metas = None
        if main:
            extra = ({} if extension is None else
                     extension.finish(plan, {layer: saes[0][0] for layer, saes in trained.saes.items()}, writers))
            infos = {m: _layer_infos(plan, trained, m, writer) for m, writer in writers.items()}
            shared = dict(model=cfg.model, checkpoint=encoder.checkpoint, dataset=ds.describe(), sae=settings,
                          layers=layers, n_layers_model=encoder.n_layers, acts_dtype=cfg.acts_dtype,
                          image_size=getattr(encoder, "image_size", None), random_init=cfg.random_init,
                          encoder_dtype=cfg.encoder_dtype, versions=_versions(), device=str(device), **extra)
            metas = {m: writer.finish(RunMeta(runname=names[m], modality=m, token=encoder.token_of(m),
                                              layer_info=infos[m], **shared)) for m, writer in writers.items()}
    finals = {m: w.final for m, w in writers.items()}
    if distributed.world_size() > 1:
        metas, finals = distributed.from_rank0(metas, finals)
    seconds = time.perf_counter() - t0
    return {m: TrainResult(finals[m], metas[m], seconds) for m in names}


def _layer_infos(plan: EncoderPass, trained: TrainedLayers, row_set: str, writer: RunWriter) -> dict[int, LayerInfo]:
    acts = trained.acts[row_set]
    for layer in plan.layers:
        check_informative(layer, acts[layer], plan.encoder.token_of(row_set))
    return {layer: save_layer(layer, trained.saes[layer], plan.settings.seeds, acts[layer], writer, plan.device)
            for layer in plan.layers}


def _train_pass(plan: EncoderPass, writers: dict[str, RunWriter]) -> TrainedLayers:
    """The encoder pass that trains every layer's SAEs (one per seed, same batches) on its tokens."""
    settings, layers = plan.settings, plan.layers
    if settings.sae_tokens == "pooled" and len(plan.ds) < 2:
        raise UserError("--sae_tokens pooled needs at least 2 samples to train on")
    trainers: dict[int, SeedStack] = {}

    def train_on(layer: int, tokens_ND: Tensor) -> None:
        if layer not in trainers:
            trainers[layer] = new_trainers(tokens_ND.shape[-1], layer, settings, plan.device)
        if settings.sae_tokens == "all":
            train_steps(trainers[layer], tokens_ND)

    def postfix() -> str:
        return f"fvu={trainers[layers[-1]].trainers[0].fvu.value():.3f}" if settings.sae_tokens == "all" else ""

    acts = encoder_pass(plan, writers, train_on, postfix)
    if settings.sae_tokens == "pooled":
        (pooled,) = acts.values()  # one row set: train_mllm.py refuses --sae_tokens pooled
        _train_on_pooled(trainers, pooled, settings, plan.device)
    return TrainedLayers(acts, {layer: [(t.sae, t.metrics()) for t in ts.trainers] for layer, ts in trainers.items()})


def _train_on_pooled(trainers: dict[int, SeedStack], acts: dict[int, np.ndarray], settings: SaeSettings,
                     device: torch.device) -> None:
    """--sae_tokens pooled: epochs over the stored pooled tokens, in a seeded random order."""
    n = len(next(iter(acts.values())))
    rng = np.random.default_rng(settings.seed)
    for _ in progress(range(settings.sae_epochs), desc="SAEs on pooled tokens", unit="epoch"):
        order = rng.permutation(n)
        for s in range(0, n, settings.batch_size):
            rows = np.sort(order[s:s + settings.batch_size])
            for layer, layer_trainers in trainers.items():
                x_ND = torch.from_numpy(np.asarray(acts[layer][rows], dtype=np.float32)).to(device)
                train_steps(layer_trainers, x_ND)


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


# --- command line ---------------------------------------------------------------------------------------
def build_parser(modality: str) -> ArgumentParser:
    families = [n for n, c in ENCODERS.items() if c.modality == modality]
    p = ArgumentParser(
        description=f"Train a top-k SAE on every requested layer of a {modality} encoder and record the pooled "
                    f"activations of every sample into sae_features/<runname>/.")
    skip = ("checkpoint", *(("image_size",) if modality != "image" else ()),
            *(("shuffle_captions",) if modality == "image" else ()),
            # an MLLM's rows are chosen per modality, and its SAEs train on the tokens of both
            *(("token", "sae_tokens", "sae_epochs") if modality == "mllm" else ()))
    add_options(p, TrainConfig, skip=skip, model=f"({', '.join(families)})", token=f"({', '.join(TOKENS)})")
    add_checkpoint_flags(p, families)
    add_options(p, SaeConfig)
    return p


def main_for(modality: str, argv=None) -> TrainResult:
    args = build_parser(modality).parse_args(argv)
    cls = get_encoder_class(args.model, modality)
    cfg = options_from(TrainConfig, args, checkpoint=cls.checkpoint_from(args))
    sae_cfg = options_from(SaeConfig, args)
    distributed.init(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    result = train(cfg, sae_cfg, modality)
    last = result.meta.layer_info[result.meta.layers[-1]]
    print(f"wrote {result.run_dir} ({len(result.meta.layers)} layers, {result.meta.dataset.n_samples} samples, "
          f"{result.seconds:.1f} s); last layer FVU {last.fvu:.3f}")
    return result

