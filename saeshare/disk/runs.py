"""Runs on disk (docs/design.md#runs-on-disk): typed run metadata, an atomic writer, a validating reader
that computes features in chunks, and the options of every command that reads runs."""
from __future__ import annotations

import copy
import dataclasses
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import data
from data import DatasetInfo
from errors import OptionError, UserError, check_choices, check_positive
from sae import EncoderOutput, SaeConfig, TopKSAE
from saeshare.core.distributed import resolve_device
from saeshare.disk.files import Record, staged_dir, write_atomic

DEFAULT_ROOT = "sae_features"
DEFAULT_CHUNK = 2048
"""Samples per chunk of the commands that stream over a run."""
Codes = Literal["relu", "topk"]
CODES: tuple[str, ...] = Codes.__args__
"""What a feature's activation is: `relu`, the dense ReLU pre-activations (the paper's code), or
`topk`, the SAE's k kept codes."""
FLOAT16_MAX = float(np.finfo(np.float16).max)


def sae_file(layer: int, seed: int | None = None) -> str:
    """The SAE of a layer; seed None: the run's first SAE seed (the only one of a one-seed run)."""
    return f"layer{layer:02d}.sae.safetensors" if seed is None else f"layer{layer:02d}.seed{seed}.sae.safetensors"


def modality_file(layer: int) -> str:
    """[F] float32: per feature of an MLLM layer's SAE, the share of its activation mass on image tokens."""
    return f"layer{layer:02d}.modality.npy"


def acts_file(layer: int) -> str:
    return f"layer{layer:02d}.acts.npy"


def check_codes(codes: str) -> None:
    if codes not in CODES:
        raise OptionError("codes", f"unknown {{opt}} {codes!r}; choose from {', '.join(CODES)}")


@dataclass
class SaeSettings(SaeConfig):
    """How a run's SAEs were trained: the SAE's own settings and the loop's."""
    batch_size: int = 16
    """Encoder batch (one SAE step per batch)."""
    seed: int = 0
    seeds: list[int] | None = None
    """SAE seeds, one SAE each per layer, trained on the same batches; None (older runs): [seed]."""
    train_on_padding: bool = False
    sae_tokens: Literal["all", "pooled"] = "all"
    """Trained on every token (the paper), or on the recorded pooled tokens only."""
    sae_epochs: int = 1
    """Epochs over the training tokens."""
    shuffle: bool = False
    """The encoder pass (the SAEs' training order) ran over a seeded random order of the samples (runs
    made before this option: dataset order)."""

    def __post_init__(self):
        super().__post_init__()
        if self.seeds is None:
            self.seeds = [self.seed]


@dataclass
class LayerInfo:
    """Shapes and quality of one layer's SAE (the metrics are absent in runs made without training)."""
    d_model: int
    n_features: int
    fvu: float | None = None
    """FVU over all training tokens, while training."""
    l0: float | None = None
    dead_fraction: float | None = None
    tokens_seen: int | None = None
    fvu_pooled: float | None = None
    """FVU of the final SAE on the recorded pooled tokens (the vectors the analyses read)."""
    steps: int | None = None
    """Optimizer steps the SAE took."""
    fvu_fall: float | None = None
    """How much the batches' FVU still fell over the last fifth of the steps (sae.SaeMetrics.fvu_fall)."""
    per_seed: dict[int, "SeedInfo"] = field(default_factory=dict)
    """Every SAE seed's metrics (the fields above are the first seed's)."""


@dataclass
class SeedInfo:
    """One SAE seed's quality (a run made by record.py has no training metrics, only fvu_pooled)."""
    fvu_pooled: float
    fvu: float | None = None
    l0: float | None = None
    dead_fraction: float | None = None
    tokens_seen: int | None = None
    steps: int | None = None
    fvu_fall: float | None = None


@dataclass
class ModalityShares:
    """An MLLM layer's SAE features by the tokens they fire on (train_mllm.py), counted with the trained SAE
    (its first seed, top-k codes) over every image and caption token of the first `n_samples` samples."""
    image_only: float
    """Share of the features firing on at least `min_fires` tokens of one modality that do so on image
    tokens only."""
    text_only: float
    both: float
    n_features: int
    """Features firing at least `min_fires` times on one modality or the other (the shares' denominator)."""
    min_fires: int
    n_samples: int
    image_mass: float
    """Share of all activation mass on image tokens (the mean of the per-feature modality scores, weighted
    by mass); per feature in layerLL.modality.npy."""


@dataclass
class RunMeta(Record):
    """run.json. Schema 2 adds "kind" and writes every field; schema-1 files (which may lack the
    optional fields) are read with their defaults."""
    KIND = "run"
    SCHEMA = 2

    runname: str
    modality: Literal["image", "text"]
    model: str
    """Encoder family (--model)."""
    checkpoint: str
    token: str
    """The pooled token recorded per sample (docs/design.md#pooled-token)."""
    dataset: DatasetInfo
    sae: SaeSettings
    layers: list[int]
    """Recorded blocks, increasing."""
    layer_info: dict[int, LayerInfo]
    n_layers_model: int | None = None
    """Blocks of the encoder (the recorded ones may be fewer)."""
    acts_dtype: Literal["float32", "float16"] = "float32"
    image_size: int | None = None
    random_init: bool = False
    """The encoder's weights were re-initialised (a floor), not the checkpoint's."""
    encoder_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """dtype of the encoder's weights during the pass (--encoder_dtype)."""
    sae_from: str | None = None
    """Made by record.py: the run whose encoder and SAEs (copied here) were applied to these samples."""
    sae_from_id: str | None = None
    """The run_id of that run when recorded: once it is trained again, this recording is stale."""
    sae_file: str | None = None
    """Made by record.py --sae_file: "<format>:<path>" of the SAE imported from another library."""
    modality_shares: dict[int, ModalityShares] | None = None
    """Made by train_mllm.py: per layer, which modality's tokens its SAE features fire on (both runs of the
    pair carry the same)."""
    versions: dict[str, str] = field(default_factory=dict)
    device: str | None = None
    run_id: str = ""
    """New for every write of the run: cached results of an older run with the same name are never read."""
    complete: bool = False
    """True only once every file of the run is written."""

    @classmethod
    def migrate(cls, obj: dict, schema: int) -> dict:
        if schema == 1:
            return obj
        return super().migrate(obj, schema)


class RunWriter:
    """Builds a run in a hidden temporary folder and renames it into place once every file is written,
    so an interrupted command never leaves `<root>/<runname>` half-written. A context manager:

        with RunWriter(root, name) as w: ...; w.finish(meta)
    """

    def __init__(self, root: str | Path, runname: str, overwrite: bool = False):
        if not runname or "/" in runname or runname.startswith("."):
            raise OptionError("runname", f"invalid {{opt}} {runname!r}: use a plain folder name")
        if "@" in runname:  # a run named v@1 could never be read: RUN@SEED addresses seed 1 of run v
            raise OptionError("runname", f"invalid {{opt}} {runname!r}: '@' addresses an SAE seed (RUN@SEED); "
                                         "use a name without it")
        self.final = Path(root) / runname
        self.overwrite = overwrite
        self._check_free(self.final)  # before any work
        self._memmaps: dict[int, np.memmap] = {}
        self._finished = False

    def _check_free(self, final: Path) -> None:
        if final.exists() and not self.overwrite:
            raise UserError(f"run {str(self.final)!r} already exists; pass --overwrite to replace it")

    def __enter__(self) -> "RunWriter":
        self._stage = staged_dir(self.final, self._check_free)
        self.tmp = self._stage.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        self._memmaps.clear()
        if exc[0] is None and not self._finished:  # never move a run without run.json into place
            err = RuntimeError("RunWriter closed without finish()")
            self._stage.__exit__(RuntimeError, err, None)
            raise err
        return self._stage.__exit__(*exc)

    def acts(self, layer: int, n_samples: int, d_model: int, dtype: str = "float32") -> np.memmap:
        """A writable [N, d] array backed by the run's `layer{LL}.acts.npy`."""
        mm = np.lib.format.open_memmap(self.tmp / acts_file(layer), mode="w+", dtype=dtype,
                                       shape=(n_samples, d_model))
        self._memmaps[layer] = mm
        return mm

    def save_sae(self, layer: int, state: dict[str, torch.Tensor], seed: int | None = None) -> None:
        """seed None: the run's first SAE seed."""
        write_atomic(self.tmp / sae_file(layer, seed), lambda tmp: save_file(state, str(tmp)))

    def finish(self, meta: RunMeta) -> RunMeta:
        """Write run.json last, with a new run_id and complete = true; the folder moves into place on exit."""
        for mm in self._memmaps.values():
            mm.flush()
        meta = dataclasses.replace(meta, run_id=uuid.uuid4().hex, complete=True)
        meta.save(self.tmp / "run.json")
        self._finished = True
        return meta


NULL_SEED = 0
"""Seed of the permutation null (the same permutation for every command, so nulls are comparable)."""


NULL_SALT = 0x6E756C6C
"""Mixed into the seed: the permutation must differ from every other seeded permutation of the samples,
above all --shuffle_captions SEED's (a null run permuted back into its pairs would score as the model
itself: seen on the demo before this salt, floor 0.957 for null -> minilm)."""


PERMUTED = " (permuted)"
"""How a permutation null's name ends."""


def null_permutation(n: int, seed: int = NULL_SEED) -> np.ndarray:
    """[N] int64: the sample order of a permutation null."""
    return np.random.default_rng([NULL_SALT, seed]).permutation(n)


class Run:
    """A complete run read from disk. Features are never materialised for all samples at once."""

    def __init__(self, path: Path, meta: RunMeta):
        self.path, self.meta = path, meta
        self._sae_cache: dict[int, TopKSAE] = {}
        self.seed = meta.sae.seeds[0]
        """The SAE seed this object reads (RUN@SEED; the first by default)."""
        self.null_seed: int | None = None
        self.perm_N: np.ndarray | None = None
        """Set on a permutation null: sample n reads the stored row perm_N[n]."""

    def with_seed(self, seed: int) -> "Run":
        """The same run read through the SAEs of another of its seeds."""
        if seed not in self.meta.sae.seeds:
            raise UserError(f"run {self.path.name!r} has SAE seeds {', '.join(map(str, self.meta.sae.seeds))}; "
                            f"no seed {seed}")
        other = copy.copy(self)
        other.seed, other._sae_cache = seed, {}
        return other

    def with_layers(self, layers: list[int]) -> "Run":
        """The same run with only some of its layers (cached layer pairs stay valid: they are keyed by layer)."""
        other = copy.copy(self)
        other.meta = dataclasses.replace(self.meta, layers=[self.resolve_layer(layer) for layer in layers])
        return other

    def permuted(self, seed: int = NULL_SEED) -> "Run":
        """The same run with its samples permuted (no retraining): whatever it shares with another run
        over the same samples is chance, which makes it a floor."""
        null = copy.copy(self)
        null.null_seed, null.perm_N = seed, null_permutation(self.n_samples, seed)
        return null

    @classmethod
    def open(cls, root: str | Path, spec: str) -> "Run":
        """`spec` is a run name, or RUN@SEED for one of its SAE seeds."""
        name, _, seed = spec.partition("@")
        if seed and not seed.isdigit():
            raise UserError(f"{spec!r}: RUN@SEED takes a whole number as seed")
        path = Path(root) / name
        meta_path = path / "run.json"
        if not meta_path.is_file():
            folders = Path(root).iterdir() if Path(root).is_dir() else []
            known = sorted(p.name for p in folders if (p / "run.json").is_file())
            hint = f"; runs in {root}: {', '.join(known)}" if known else f"; no runs in {root!s}"
            raise UserError(f"no run {name!r} in {str(root)!r}{hint}")
        meta = RunMeta.load(meta_path, f"corrupt {meta_path}")
        if not meta.complete:
            raise UserError(f"run {name!r} is incomplete (interrupted?); train it again with --overwrite")
        run = cls(path, meta)
        for layer in run.layers:
            for f in (acts_file(layer), *(run.sae_path(layer, s).name for s in meta.sae.seeds)):
                if not (path / f).is_file():
                    raise UserError(f"run {name!r} is missing {f}")
        return run.with_seed(int(seed)) if seed else run

    def sae_path(self, layer: int, seed: int | None = None) -> Path:
        seed = self.seed if seed is None else seed
        return self.path / sae_file(layer, None if seed == self.meta.sae.seeds[0] else seed)

    @property
    def name(self) -> str:
        """As the user addresses it: RUN, RUN@SEED for a seed other than the first, " (permuted)" for a null."""
        name = self.path.name if self.seed == self.meta.sae.seeds[0] else f"{self.path.name}@{self.seed}"
        return name if self.perm_N is None else f"{name}{PERMUTED}"

    @property
    def layers(self) -> list[int]:
        return list(self.meta.layers)

    @property
    def n_samples(self) -> int:
        return self.meta.dataset.n_samples

    @property
    def fingerprint(self) -> str:
        return self.meta.dataset.fingerprint

    @property
    def top_k(self) -> int:
        return self.meta.sae.top_k

    @property
    def key(self) -> str:
        """Identifies this write of the run, and a null of it (memo and cache keys)."""
        base = self.meta.run_id or str(self.path)
        if self.seed != self.meta.sae.seeds[0]:
            base += f"@{self.seed}"
        return base if self.perm_N is None else f"{base}~perm{self.null_seed}"

    def resolve_layer(self, layer: int) -> int:
        """-1 (or any negative index) counts from the last recorded layer."""
        layers = self.layers
        if layer < 0:
            if -layer > len(layers):
                raise UserError(f"run {self.name!r} records {len(layers)} layers; {layer} is out of range")
            return layers[layer]
        if layer not in layers:
            raise UserError(f"layer {layer} is not recorded in run {self.name!r} (layers: {layers})")
        return layer

    def acts(self, layer: int) -> np.ndarray:
        """Pooled activations [N, d] (memory-mapped; float32 or float16)."""
        layer = self.resolve_layer(layer)
        try:
            arr = np.load(self.path / acts_file(layer), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"corrupt {self.path / acts_file(layer)}: {e}") from None
        if arr.ndim != 2 or arr.shape[0] != self.n_samples or arr.dtype not in (np.float32, np.float16):
            raise UserError(f"corrupt {self.path / acts_file(layer)}: shape {arr.shape} dtype {arr.dtype}, "
                            f"expected [{self.n_samples}, d] float32/float16")
        return arr

    def read_acts(self, layer: int, rows: slice | np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        """Selected rows of a layer's pooled activations as float32 [n, d]. The file is mapped only for
        this read, so resident memory does not grow with N."""
        if self.perm_N is not None:
            rows = self.perm_N[rows]
        x = np.array(self.acts(layer)[rows], dtype=np.float32)
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(1))[0]
            n = int((np.arange(self.n_samples)[rows] if self.perm_N is None else rows)[bad])
            raise UserError(f"run {self.name!r} layer {layer}: NaN or inf in the stored activations of sample {n} "
                            f"({self.path / acts_file(layer)})")
        return torch.from_numpy(x).to(device)

    def sae(self, layer: int, device: str | torch.device = "cpu") -> TopKSAE:
        layer = self.resolve_layer(layer)
        if layer not in self._sae_cache:
            path = self.sae_path(layer)
            try:
                sae = TopKSAE.from_state(load_file(str(path)), self.top_k)
            except (SafetensorError, ValueError, KeyError, OSError) as e:
                raise UserError(f"corrupt {path}: {e}") from None
            width = self.acts(layer).shape[1]
            if sae.d_model != width:
                raise UserError(f"run {self.name!r} layer {layer}: its SAE ({path.name}) reads width {sae.d_model}, "
                                f"its stored activations have width {width}: the files come from different runs")
            self._sae_cache[layer] = sae.eval().requires_grad_(False)
        return self._sae_cache[layer].to(device)

    def n_features(self, layer: int) -> int:
        """F of a layer's SAE, as run.json records it (no SAE file read)."""
        return self.meta.layer_info[self.resolve_layer(layer)].n_features

    def iter_codes(self, layer: int, codes: str = "relu", chunk_size: int = 4096,
                   device: str | torch.device = "cpu") -> Iterator[tuple[int, torch.Tensor | EncoderOutput]]:
        """Yield (start, codes of samples start..start+n) per chunk: a dense [n, F] float32 tensor for
        `relu`, the SAE's EncoderOutput for `topk`."""
        check_codes(codes)
        sae = self.sae(layer, device)
        for start in range(0, self.n_samples, chunk_size):
            x = self.read_acts(layer, slice(start, start + chunk_size), device)
            yield start, (sae.pre_acts(x) if codes == "relu" else sae.encode(x))

    def dense_codes(self, layer: int, codes: str = "relu", rows: np.ndarray | slice | None = None,
                    device: str | torch.device = "cpu") -> torch.Tensor:
        """Dense [n, F] codes of selected samples (for small selections and tests)."""
        check_codes(codes)
        x = self.read_acts(layer, rows if rows is not None else slice(None), device)
        sae = self.sae(layer, device)
        return sae.pre_acts(x) if codes == "relu" else sae.encode(x).dense(sae.n_features)


def open_runs(root: str | Path, names: list[str], features: bool = True, verbose: bool = False) -> list[Run]:
    """Open complete runs over the same samples (one clear UserError otherwise); `features`: their SAE
    features will be analysed (warn where the SAEs are under-trained or do not fit the recorded tokens)."""
    runs = [Run.open(root, name) for name in names]
    check_comparable(runs)
    if features:
        for run in runs:
            warn_run(run, verbose)
    return runs


MIN_SAE_STEPS = 100
"""Fewer optimizer steps than this and an SAE has barely moved from its initialisation (a 40-image folder at
the paper's batch of 16 gives 3): its features, and any score built on them, mean little."""
STILL_FALLING = 0.1
"""An SAE whose batch FVU still fell by more than this fraction over its last fifth of steps had not
converged."""


def _fit(run: Run, layer: int) -> LayerInfo | SeedInfo | None:
    """The metrics of the run's own seed at a layer."""
    info = run.meta.layer_info.get(layer)
    return info.per_seed[run.seed] if info is not None and run.seed in info.per_seed else info


def poor_fits(run: Run) -> list[tuple[int, float]]:
    """(layer, fvu_pooled) of the layers whose SAE (the run's seed) reconstructs the recorded pooled token
    worse than that token's mean (fvu_pooled > 1): their features mean little on the analysed samples."""
    fits = [(layer, _fit(run, layer)) for layer in run.layers]
    return [(layer, f.fvu_pooled) for layer, f in fits
            if f is not None and f.fvu_pooled is not None and f.fvu_pooled > 1]


def fitting_layers(run: Run) -> list[int]:
    """The layers whose SAE fits the recorded pooled token (fvu_pooled <= 1)."""
    poor = {layer for layer, _ in poor_fits(run)}
    return [layer for layer in run.layers if layer not in poor]


class Problems(NamedTuple):
    """What is wrong with a run's SAEs, layer by layer: (layer, the figure that says so)."""
    few_steps: list[tuple[int, float]]
    still_falling: list[tuple[int, float]]
    poor_fit: list[tuple[int, float]]


def problems(run: Run) -> Problems:
    fits = [(layer, _fit(run, layer)) for layer in run.layers]
    few = [(layer, f.steps) for layer, f in fits if f is not None and f.steps is not None and f.steps < MIN_SAE_STEPS]
    falling = [(layer, f.fvu_fall) for layer, f in fits
               if f is not None and f.fvu_fall is not None and f.fvu_fall > STILL_FALLING]
    return Problems(few, falling, poor_fits(run))


def run_warnings(run: Run) -> list[str]:
    """One line per layer and problem (what --verbose prints and the JSON keeps)."""
    p = problems(run)
    return ([f"run {run.name!r} layer {layer}: the SAE took {steps:.0f} step{'s' * (steps != 1)} (fewer than "
             f"{MIN_SAE_STEPS})"
             for layer, steps in p.few_steps]
            + [f"run {run.name!r} layer {layer}: the SAE's FVU still fell by {fall:.0%} over its last fifth of steps"
               for layer, fall in p.still_falling]
            + [f"run {run.name!r} layer {layer}: the SAE reconstructs the recorded pooled token worse than its mean "
               f"(fvu_pooled {fvu:.2f} > 1)" for layer, fvu in p.poor_fit])


def _where(found: list[tuple[int, float]], run: Run) -> str:
    layers = [layer for layer, _ in found]
    if layers == run.layers:
        return "at every layer"
    return f"at layer{'s' * (len(layers) > 1)} " + ", ".join(map(str, layers))


def _span(found: list[tuple[int, float]], fmt: str) -> str:
    lo, hi = min(v for _, v in found), max(v for _, v in found)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{lo:{fmt}}-{hi:{fmt}}"


def summary_warning(run: Run) -> str | None:
    """All of a run's SAE problems in one line, with the flags that fix them; None when there are none."""
    p = problems(run)
    parts = []
    if p.few_steps:
        steps = _span(p.few_steps, ".0f")
        parts.append(f"took {steps} step{'s' * (steps != '1')} (fewer than {MIN_SAE_STEPS}) {_where(p.few_steps, run)}")
    if p.still_falling:
        parts.append(f"were still improving when training ended (FVU down {_span(p.still_falling, '.0%')} over "
                     f"the last fifth) {_where(p.still_falling, run)}")
    if p.poor_fit:
        parts.append(f"reconstruct the recorded pooled token worse than its mean (fvu_pooled "
                     f"{_span(p.poor_fit, '.2f')}) {_where(p.poor_fit, run)}")
    if not parts:
        return None
    fixes = []
    if p.few_steps or p.still_falling:
        fixes.append("more samples, a smaller --batch_size or a larger --lr train them further")
    if p.poor_fit or p.few_steps:
        fixes.append("--sae_tokens pooled --sae_epochs N fits them to the recorded tokens")
    effect = "mean little there" if p.few_steps or p.poor_fit else "may still change with more training"
    return (f"warning: run {run.name!r}: its SAEs " + "; ".join(parts) + f", so its scores {effect} ("
            + "; ".join(fixes) + ")")


_warned: set[str] = set()


def warn_run(run: Run, verbose: bool = False) -> None:
    """A run's SAE problems, once per process: one summary line, or (verbose) a line per layer."""
    key = str(run.path.resolve())  # seeds share their samples and steps: one line for all
    if key in _warned:
        return
    _warned.add(key)
    lines = [f"warning: {line}" for line in run_warnings(run)] if verbose else [summary_warning(run)]
    for line in filter(None, lines):
        print(line, file=sys.stderr)


def check_recorded_from(recorded: Run, source: Run, what: str) -> None:
    """`recorded` (named by option `what`) must hold `source`'s features over other samples (record.py), or
    be `source` itself."""
    if recorded.meta.run_id == source.meta.run_id:
        return
    if recorded.meta.sae_from != source.path.name or recorded.layers != source.layers:
        raise UserError(f"{what} {recorded.name!r} was not recorded from {source.name!r} (record.py --run "
                        f"{source.name}): its features are another encoder's or SAE's")
    if recorded.meta.sae_from_id not in (None, source.meta.run_id):
        raise UserError(f"{what} {recorded.name!r} was recorded from an earlier write of {source.name!r}, which was "
                        f"trained again since: record it again (record.py --run {source.name} --overwrite)")


def check_comparable(runs: list[Run]) -> None:
    """Runs are compared sample by sample: they must cover the same samples in the same order."""
    first = runs[0]
    for r in runs[1:]:
        if r.fingerprint != first.fingerprint:
            raise UserError(
                f"runs {first.name!r} and {r.name!r} cover different datasets "
                f"({first.meta.dataset.name}, {first.n_samples} samples, fingerprint {first.fingerprint[:12]} vs "
                f"{r.meta.dataset.name}, {r.n_samples} samples, fingerprint {r.fingerprint[:12]})")


@dataclass
class RunsOptions:
    """What every command that reads runs takes."""
    root: str = DEFAULT_ROOT
    """Folder holding the runs."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    verbose: bool = False
    """Warn of each layer's SAE problems (too few steps, not converged, poor fit) on a line of its own, not
    in one line per run."""
    data_root: str | None = None
    """Where the runs' local folder dataset is now, if it moved or was copied since they were made (found by
    its content, not its path)."""

    def __post_init__(self):
        check_choices(self)
        self.torch_device = resolve_device(self.device)
        if Path(self.root).exists() and not Path(self.root).is_dir():
            raise UserError(f"--root {self.root!r} is a file, not a folder of runs")
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise UserError(f"--data_root {self.data_root!r} is not a folder")
        data.relocate(self.data_root)


@dataclass
class StreamOptions(RunsOptions):
    """What every command that streams over a run's samples takes."""
    chunk_size: int = DEFAULT_CHUNK
    """Samples per chunk."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("chunk_size", self.chunk_size)


@dataclass
class PairOptions:
    """Which runs a pair command compares: one ordered pair, or every ordered pair of several runs."""
    source: str | None = None
    """Run A."""
    target: str | None = None
    """Run B."""
    runs: list[str] | None = None
    """Several runs: every ordered pair (instead of --source/--target)."""

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        if self.runs is not None:
            if self.source or self.target:
                raise UserError("give either --source and --target, or --runs, not both")
            if len(self.runs) < 2:
                raise UserError(f"--runs takes two or more distinct runs: at least two are needed, "
                                f"got {len(self.runs)}")
            twice = sorted({r for r in self.runs if self.runs.count(r) > 1})
            if twice:
                raise UserError(f"--runs takes two or more distinct runs; it lists {twice[0]!r} twice")
        elif not (self.source and self.target):
            raise UserError("give --source A --target B, or --runs A B ...")

    @property
    def names(self) -> list[str]:
        """The runs named, in order."""
        return self.runs or [self.source, self.target]
