"""The one training/recording loop behind train_image.py and train_text.py (SPEC §3, §9).

One encoder pass per batch trains the SAE of every requested layer on all (non-padding) tokens and
stores the pooled token of every sample; features are computed from those after training, on demand.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import data
from saeshare.core import distributed
from errors import ArgumentParser, OptionError, UserError, check_choices, check_positive
from saeshare.core.distributed import resolve_device
from saeshare.core.options import add_options, options_from
from saeshare.disk.runs import DEFAULT_ROOT, FLOAT16_MAX, LayerInfo, Run, RunMeta, RunWriter, SaeSettings, SeedInfo
from sae import Fvu, SaeConfig, SaeTrainer, TopKSAE
from wrappedmodels import ENCODERS, TOKENS, Encoder, get_encoder_class, layer_ids

PROGRESS_EVERY = 20
"""Batches between two updates of the progress bar's FVU."""
DEFAULT_BATCH = {"image": 16, "text": 256}
"""Encoder batch of the paper's code: 16 images or 256 captions (one SAE step per batch)."""


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
    """Pooled token recorded per sample; default: the model's own (SPEC §4.2)."""
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
        check_positive("sae_epochs", self.sae_epochs)
        if self.sae_epochs > 1 and self.sae_tokens == "all":
            raise OptionError("sae_epochs", "{opt} goes with --sae_tokens pooled (all tokens are seen in one pass)")
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise OptionError("seeds", f"{{opt}} lists a seed twice: {' '.join(map(str, self.seeds))}")


class TrainResult(NamedTuple):
    run_dir: Path
    meta: RunMeta
    seconds: float


class _Samples(Dataset):
    """Feeds the modality's side of each paired sample through the encoder's per-sample transform."""

    def __init__(self, ds: data.PairedDataset, encoder: Encoder):
        self.ds, self.encoder = ds, encoder

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        sample = self.ds.image(i) if self.encoder.modality == "image" else self.ds.caption(i)
        return i, self.encoder.transform(sample)


class _Collate:
    """(sample ids [B], the encoder's batch): the ids say where each pooled row goes. A class, not a
    closure, so that DataLoader workers can pickle it."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, items: list) -> tuple[np.ndarray, dict]:
        return np.array([i for i, _ in items]), self.encoder.collate([x for _, x in items])


def _settings(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str) -> SaeSettings:
    return SaeSettings(**asdict(sae_cfg), batch_size=cfg.batch_size or DEFAULT_BATCH[modality], seed=cfg.seed,
                       seeds=cfg.seeds or [cfg.seed], train_on_padding=cfg.train_on_padding,
                       sae_tokens=cfg.sae_tokens, sae_epochs=cfg.sae_epochs, shuffle=cfg.shuffle)


def reusable(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str,
             dataset: Callable[[], data.DatasetInfo] | None = None) -> Run | None:
    """The complete run cfg.runname if training `cfg` again would make the same run (same encoder,
    layers, token, samples and SAE settings), else None. `dataset()` describes cfg's samples (default: load
    them), called only when the run exists: a study loads a hub dataset once for all its runs."""
    try:
        run = Run.open(cfg.root, cfg.runname)
    except UserError:
        return None
    meta, cls = run.meta, get_encoder_class(cfg.model, modality)
    same = (meta.model == cfg.model and meta.checkpoint == (cfg.checkpoint or cls.default_checkpoint)
            and meta.token == (cfg.token or cls.default_token) and meta.image_size == cfg.image_size
            and meta.acts_dtype == cfg.acts_dtype and meta.sae == _settings(cfg, sae_cfg, modality)
            and meta.random_init == cfg.random_init
            and meta.n_layers_model is not None
            and meta.layers == layer_ids(cfg.layers, meta.n_layers_model, f"run {run.name!r}"))
    describe = dataset or (lambda: cfg.load(cfg.shuffle_captions).describe())
    return run if same and meta.dataset == describe() else None


def build_encoder(cfg: TrainConfig, modality: str, device: torch.device) -> Encoder:
    """The encoder a run of `cfg` records: its checkpoint, token, input size, and random weights for a floor."""
    encoder = get_encoder_class(cfg.model, modality)(cfg.checkpoint, device=device, token=cfg.token)
    if cfg.random_init:
        encoder.reinitialise(cfg.seed)
    if cfg.image_size is not None:
        if not hasattr(encoder, "image_size"):
            raise UserError(f"--image_size applies to EfficientNetLite; {cfg.model} uses its own processor")
        encoder.image_size = cfg.image_size
    return encoder


def train(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str) -> TrainResult:
    t0 = time.perf_counter()
    main = distributed.rank() == 0  # under torchrun, rank 0 writes the run
    # refuses an existing run before any work
    with RunWriter(cfg.root, cfg.runname, cfg.overwrite) if main else contextlib.nullcontext() as writer:
        device = resolve_device(cfg.device)
        ds = cfg.load(cfg.shuffle_captions)
        encoder = build_encoder(cfg, modality, device)
        layers = encoder.resolve_layers(cfg.layers)
        settings = _settings(cfg, sae_cfg, modality)
        if distributed.world_size() > 1:
            import train_dist  # it builds on this module

            layer_info = train_dist.record_and_train(cfg, settings, ds, encoder, layers, writer, device)
        else:
            layer_info = _record(cfg, settings, ds, encoder, layers, writer, device)
        meta = None if not main else writer.finish(RunMeta(
            runname=cfg.runname, modality=encoder.modality, model=cfg.model, checkpoint=encoder.checkpoint,
            token=encoder.token, dataset=ds.describe(), sae=settings, layers=layers, layer_info=layer_info,
            n_layers_model=encoder.n_layers, acts_dtype=cfg.acts_dtype, image_size=getattr(encoder, "image_size", None),
            random_init=cfg.random_init,
            versions=_versions(), device=str(device)))
    final = writer.final if main else None
    if distributed.world_size() > 1:
        meta, final = distributed.from_rank0(meta, final)
    return TrainResult(final, meta, time.perf_counter() - t0)


def _init_seed(seed: int, layer: int) -> int:
    """Seed of one SAE's initialisation: distinct for every (SAE seed, layer)."""
    return seed * 1_000_003 + layer


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader workers: a few on a GPU (decoding would starve it), none on a CPU (they would compete
    with the model for the cores)."""
    return num_workers if num_workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)


def sample_order(settings: SaeSettings, n: int) -> np.ndarray:
    """The paper's shuffled loader: the SAEs see the samples in a seeded random order; the rows are written at
    each sample's own index, so the run stays in dataset order and paired with others."""
    return np.random.default_rng(settings.seed).permutation(n) if settings.shuffle else np.arange(n)


def layer_outputs(encoder: Encoder, inputs: dict, recorded_BTD: Tensor, layer: int, rows: np.ndarray,
                  ds: data.PairedDataset, settings: SaeSettings, acts_dtype: str) -> tuple[Tensor, np.ndarray]:
    """(training tokens [n, D] (padding excluded unless settings.train_on_padding), pooled rows [B, D]) of one
    layer's output for a batch, checked for NaN and for the float16 range."""
    acts_BTD = recorded_BTD.float()
    _check_finite(acts_BTD, layer, rows, ds)
    mask_BT = encoder.token_mask(inputs, acts_BTD)
    tokens_ND = acts_BTD.reshape(-1, acts_BTD.shape[-1]) if settings.train_on_padding else acts_BTD[mask_BT]
    pooled_BD = encoder.pool(acts_BTD, mask_BT).cpu().numpy()
    if acts_dtype == "float16" and np.abs(pooled_BD).max() > FLOAT16_MAX:
        raise UserError(f"layer {layer}: pooled activations exceed the float16 range; use --acts_dtype float32")
    return tokens_ND, pooled_BD


def new_trainers(d_model: int, layer: int, settings: SaeSettings, device: torch.device) -> list[SaeTrainer]:
    """One SAE trainer per seed of a layer."""
    return [SaeTrainer(d_model, settings, device=device, seed=_init_seed(s, layer)) for s in settings.seeds]


def train_steps(trainers: list[SaeTrainer], x_ND: Tensor) -> None:
    """One step of each seed's SAE on the same tokens."""
    with torch.enable_grad():
        for trainer in trainers:
            trainer.train_step(x_ND)


def encoder_pass(ds: data.PairedDataset, encoder: Encoder, layers: list[int], writer: RunWriter, device: torch.device,
                 settings: SaeSettings, acts_dtype: str, num_workers: int | None, desc: str,
                 on_tokens: Callable[[int, Tensor], None] | None = None,
                 postfix: Callable[[], str] | None = None) -> dict[int, np.ndarray]:
    """One pass of the encoder over the samples, in the order training uses: every layer's pooled token
    written at its sample's row of the run's [N, d] arrays (returned); on_tokens(layer, tokens_ND) gets
    each batch's training tokens (padding excluded unless settings.train_on_padding)."""
    n = len(ds)
    loader = DataLoader(_Samples(ds, encoder), batch_size=settings.batch_size, sampler=sample_order(settings, n).tolist(),
                        num_workers=loader_workers(num_workers, device), collate_fn=_Collate(encoder))
    acts: dict[int, np.ndarray] = {}
    done = 0
    bar = tqdm(loader, desc=desc, unit="batch", disable=None)  # a bar on a terminal, none in logs
    for rows, inputs in bar:
        recorded = encoder.record(inputs, layers)
        for layer in layers:
            tokens_ND, pooled_BD = layer_outputs(encoder, inputs, recorded[layer], layer, rows, ds, settings, acts_dtype)
            if layer not in acts:
                acts[layer] = writer.acts(layer, n, pooled_BD.shape[-1], acts_dtype)
            if on_tokens is not None:
                on_tokens(layer, tokens_ND)
            acts[layer][rows] = pooled_BD
        done += len(rows)
        if postfix is not None and bar.n % PROGRESS_EVERY == 0:  # a metric read syncs the device
            bar.set_postfix_str(postfix())
    if done != n:
        raise RuntimeError(f"recorded {done} samples out of {n}")
    return acts


def _record(cfg: TrainConfig, settings: SaeSettings, ds: data.PairedDataset, encoder: Encoder, layers: list[int],
            writer: RunWriter, device: torch.device) -> dict[int, LayerInfo]:
    """The encoder pass that trains every layer's SAEs (one per seed, same batches) on its tokens."""
    if settings.sae_tokens == "pooled" and len(ds) < 2:
        raise UserError("--sae_tokens pooled needs at least 2 samples to train on")
    trainers: dict[int, list[SaeTrainer]] = {}

    def train_on(layer: int, tokens_ND: Tensor) -> None:
        if layer not in trainers:
            trainers[layer] = new_trainers(tokens_ND.shape[-1], layer, settings, device)
        if settings.sae_tokens == "all":
            train_steps(trainers[layer], tokens_ND)

    acts = encoder_pass(ds, encoder, layers, writer, device, settings, cfg.acts_dtype, cfg.num_workers,
                        f"{cfg.runname}: {len(layers)} layers", train_on,
                        lambda: f"fvu={trainers[layers[-1]][0].metrics().fvu:.3f}" if settings.sae_tokens == "all" else "")
    if settings.sae_tokens == "pooled":
        _train_on_pooled(trainers, acts, settings, device)
    return {layer: _finish_layer(layer, trainers[layer], settings.seeds, acts[layer], encoder, writer, device)
            for layer in layers}


def _check_finite(acts_BTD: Tensor, layer: int, rows: np.ndarray, ds: data.PairedDataset) -> None:
    """NaN or inf from the encoder is one clear line naming the layer and the sample, not a NaN SAE."""
    finite_B = torch.isfinite(acts_BTD).flatten(1).all(1).cpu().numpy()
    if not finite_B.all():
        n = int(rows[np.argmin(finite_B)])
        raise UserError(f"layer {layer}: NaN or inf in the encoder's activations of sample {n} "
                        f"(id {ds.sample_ids[n]!r}); check the model's dtype and inputs")


def _train_on_pooled(trainers: dict[int, list[SaeTrainer]], acts: dict[int, np.ndarray], settings: SaeSettings,
                     device: torch.device) -> None:
    """--sae_tokens pooled: epochs over the stored pooled tokens, in a seeded random order."""
    n = len(next(iter(acts.values())))
    rng = np.random.default_rng(settings.seed)
    for _ in tqdm(range(settings.sae_epochs), desc="SAEs on pooled tokens", unit="epoch", disable=None):
        order = rng.permutation(n)
        for s in range(0, n, settings.batch_size):
            rows = np.sort(order[s:s + settings.batch_size])
            for layer, layer_trainers in trainers.items():
                train_steps(layer_trainers, torch.from_numpy(np.asarray(acts[layer][rows], dtype=np.float32)).to(device))


def _finish_layer(layer: int, trainers: list[SaeTrainer], seeds: list[int], pooled_ND: np.ndarray, encoder: Encoder,
                  writer: RunWriter, device: torch.device) -> LayerInfo:
    n = pooled_ND.shape[0]
    sample_ND = np.asarray(pooled_ND[: min(n, 4096)], dtype=np.float32)
    # batch sizes change float rounding, so "identical" is up to a relative 1e-5
    if n > 1 and np.ptp(sample_ND, axis=0).max() <= 1e-5 * max(float(np.abs(sample_ND).max()), 1e-30):
        raise UserError(f"layer {layer}: the pooled token ({encoder.token}) is identical for every sample, "
                        f"so it carries no information; choose another --token ({', '.join(TOKENS)})")
    per_seed = {}
    for i, (seed, trainer) in enumerate(zip(seeds, trainers)):
        writer.save_sae(layer, trainer.sae.state(), None if i == 0 else seed)
        per_seed[seed] = SeedInfo(fvu_pooled(trainer.sae, pooled_ND, device), **trainer.metrics()._asdict())
    first = per_seed[seeds[0]]
    return LayerInfo(trainers[0].sae.d_model, trainers[0].sae.n_features, first.fvu, first.l0, first.dead_fraction,
                     first.tokens_seen, first.fvu_pooled, per_seed)


@torch.no_grad()
def fvu_pooled(sae: TopKSAE, pooled_ND: np.ndarray, device, chunk: int = 8192) -> float:
    """FVU of an SAE on recorded pooled tokens (the vectors the analyses read)."""
    fvu = Fvu()
    for s in range(0, pooled_ND.shape[0], chunk):
        x = torch.from_numpy(np.asarray(pooled_ND[s:s + chunk], dtype=np.float32)).to(device)
        fvu.update(x, sae(x).x_hat)
    return fvu.value()


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


# --- command line ---------------------------------------------------------------------------------------
def build_parser(modality: str) -> ArgumentParser:
    families = [n for n, c in ENCODERS.items() if c.modality == modality]
    p = ArgumentParser(
        description=f"Train a top-k SAE on every requested layer of a {modality} encoder and record the pooled "
                    f"activations of every sample into sae_features/<runname>/.")
    skip = ("checkpoint", "image_size" if modality == "text" else "shuffle_captions")
    add_options(p, TrainConfig, skip=skip, model=f"({', '.join(families)})", token=f"({', '.join(TOKENS)})")
    for flag in sorted({ENCODERS[f].checkpoint_flag for f in families}):
        owners = [f for f in families if ENCODERS[f].checkpoint_flag == flag]
        p.add_argument(flag, default=None, help=f"checkpoint (hub id or local folder) for {', '.join(owners)}")
    add_options(p, SaeConfig)
    return p


def main_for(modality: str, argv=None) -> TrainResult:
    args = build_parser(modality).parse_args(argv)
    cls = get_encoder_class(args.model, modality)
    cfg = options_from(TrainConfig, args, checkpoint=getattr(args, cls.checkpoint_flag.lstrip("-")))
    sae_cfg = options_from(SaeConfig, args)
    distributed.init(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    result = train(cfg, sae_cfg, modality)
    last = result.meta.layer_info[result.meta.layers[-1]]
    print(f"wrote {result.run_dir} ({len(result.meta.layers)} layers, {result.meta.dataset.n_samples} samples, "
          f"{result.seconds:.1f} s); last layer FVU {last.fvu:.3f}")
    return result

