"""The paper's whole study in one command (docs/design.md#scale): encoders, dataset, SAE settings and analyses in a
TOML file.

    uv run study.py studies/demo.toml              # train what is missing, analyse, write the report
    uv run study.py studies/paper_coco.toml --dry_run
    uv run study.py studies/paper_coco.toml --train_index 3     # one encoder (a Slurm array task)
    torchrun --nproc_per_node 8 study.py studies/paper_coco.toml

It trains every encoder whose run is missing (a complete run with the same settings is reused; one with
other settings is refused without --overwrite), then computes the wMPPC of every ordered pair (with
floors, ceilings and intervals as asked), the classic measures, each Comparative Sharedness group with
previews, and writes <out>/report.md and <out>/report.html. Runs are renamed into place only when complete
and every correlation is cached, so the same command, interrupted anywhere, resumes where it stopped.
Under torchrun the ranks share each training (saeshare/training/torchrun.py) and the layer pairs of the analyses.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from comp_sharedness import check_groups, comp_sharedness, top_features
from data import DataOptions
from errors import ArgumentParser, UserError, cli
from joint import headline_joints
from sae import SaeConfig
from saeshare.core import distributed
from saeshare.core.distributed import resolve_device
from saeshare.core.options import add_options, options_from
from saeshare.disk.files import from_jsonable, to_jsonable
from saeshare.disk.results import StudyResults
from saeshare.disk.runs import Codes, Run, open_runs
from saeshare.engine import costs
from saeshare.engine.correlator import Correlator, tqdm_progress
from saeshare.engine.options import DEFAULT_MEM_GB, EngineOptions, Precision
from saeshare.joint.dictionary import JointConfig
from saeshare.render import study_report
from saeshare.training.mllm import MllmOptions, ModalityCount, train_mllm
from saeshare.training.steps import build_encoder
from saeshare.training.train import TrainConfig, run_names, train, trained_runs
from show import GalleryOptions, sharedness_gallery
from similarity import SimilarityEngine
from wmppc import pair_scores, table_of
from wrappedmodels import get_encoder_class

STUDY_OWNED = ("root", "overwrite", "device", "seeds", *(f.name for f in dataclasses.fields(DataOptions)))
"""TrainConfig fields set by the study as a whole, not per encoder."""


@dataclass(kw_only=True)
class Group:
    """A Comparative Sharedness group (docs/design.md#comparative-sharedness)."""
    source: str
    shared: list[str]
    """The runs the features must be shared with (the paper's G)."""
    not_shared: list[str]
    """The runs they must not be shared with (H)."""
    top: int = 8
    """Features kept and previewed."""


@dataclass(kw_only=True)
class Analyses:
    codes: Codes = "relu"
    """relu: dense ReLU pre-activations (the paper's code); topk: the SAE's top-k codes."""
    calibrate: bool = True
    """Floors (permutation) and ceilings (SAE seeds) of every wMPPC."""
    ci: bool = False
    """95% jackknife intervals of every wMPPC (dense path)."""
    similarity: bool = True
    """CKA, debiased CKA, SVCCA and mutual kNN of every ordered pair (last layers)."""
    mem_gb: float = DEFAULT_MEM_GB
    """Memory for the correlation accumulators, GiB."""
    precision: Precision = "fp32"
    """fp32, tf32 or bf16: the dense path's products (re-checked exactly; intervals stay fp32)."""
    groups: list[Group] = field(default_factory=list)
    joint: list[JointConfig] = field(default_factory=list)
    """Joint dictionaries (joint.py), one per table: each group's source with its first shared and its first
    not-shared run."""


@dataclass(kw_only=True)
class Study:
    out: str
    """Folder of the study: runs in <out>/sae_features, report and results in <out>."""
    data: DataOptions = field(default_factory=DataOptions)
    sae: SaeConfig = field(default_factory=SaeConfig)
    seeds: list[int] = field(default_factory=lambda: [0])
    """SAE seeds of every run (two or more give each run its ceiling)."""
    device: str = "auto"
    encoders: list[dict[str, typing.Any]]
    """One table per encoder: `modality` (image, text or mllm) and TrainConfig fields (runname, model,
    checkpoint, layers, token, batch_size, image_size, random_init, shuffle_captions, ...); an mllm also takes
    image_token, text_token and min_fires, and makes two runs, <runname>_image and <runname>_text."""
    analyses: Analyses = field(default_factory=Analyses)

    @property
    def root(self) -> Path:
        return Path(self.out) / "sae_features"


def _known_keys(table: dict, tp: type, where: str) -> None:
    names = {f.name for f in dataclasses.fields(tp)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(names))})")


class Entry(typing.NamedTuple):
    """One encoder of a study, checked."""
    modality: str
    cfg: TrainConfig
    mllm: MllmOptions | None = None
    """An MLLM's options (modality "mllm")."""

    @property
    def runs(self) -> list[str]:
        """The runs its training writes."""
        return list(run_names(self.cfg.runname, get_encoder_class(self.cfg.model, self.modality).row_sets()).values())


def load_study(path: str) -> tuple[Study, list[Entry]]:
    """The study and every encoder's entry, all checked before any work."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read the study {path!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not TOML ({e})") from None
    for key, tp in (("", Study), ("data", DataOptions), ("sae", SaeConfig), ("analyses", Analyses)):
        _known_keys(raw.get(key, {}) if key else raw, tp, f"{path}: {key or 'top level'}")
    for i, g in enumerate(raw.get("analyses", {}).get("groups", [])):
        _known_keys(g, Group, f"{path}: analyses.groups[{i}]")
    for i, j in enumerate(raw.get("analyses", {}).get("joint", [])):
        _known_keys(j, JointConfig, f"{path}: analyses.joint[{i}]")
    try:
        study = from_jsonable(Study, raw, "")
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}: {e}") from None
    encoders = [_encoder(study, table, f"{path}: encoders[{i}]") for i, table in enumerate(study.encoders)]
    names = [name for entry in encoders for name in entry.runs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{path}: two runs are named {twice[0]!r}")
    for i, g in enumerate(study.analyses.groups):
        unknown = [n for n in (g.source, *g.shared, *g.not_shared) if n not in names]
        if unknown:
            raise UserError(f"{path}: analyses.groups[{i}] names {unknown[0]!r}, not a run of the study "
                            f"({', '.join(names)})")
        if not g.shared or not g.not_shared:
            raise UserError(f"{path}: analyses.groups[{i}]: `shared` and `not_shared` each need a run")
        check_groups(g.source, g.shared, g.not_shared)
    return study, encoders


def _encoder(study: Study, table: dict, where: str) -> Entry:
    table = dict(table)
    modality = table.pop("modality", None)
    if modality not in ("image", "text", "mllm"):
        raise UserError(f"{where}: `modality` must be \"image\", \"text\" or \"mllm\", got {modality!r}")
    mllm_fields = {f.name for f in dataclasses.fields(MllmOptions)} if modality == "mllm" else set()
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - set(STUDY_OWNED) | mllm_fields
    unknown = sorted(set(table) - fields)
    if unknown:
        raise UserError(f"{where}: unknown field {unknown[0]!r} (fields: modality, {', '.join(sorted(fields))})")
    mllm_table = {k: table.pop(k) for k in mllm_fields & set(table)}
    if mllm_fields and "token" in table:
        raise UserError(f"{where}: an mllm's rows are chosen by image_token and text_token, not token")
    for required in ("runname", "model"):
        if required not in table:
            raise UserError(f"{where}: missing field {required!r}")
    get_encoder_class(table["model"], modality)
    try:  # typed as run.json is: a wrong type names its field
        cfg = from_jsonable(TrainConfig, {**table, **dataclasses.asdict(study.data), "root": str(study.root),
                                          "device": study.device, "seeds": study.seeds}, "")
        return Entry(modality, cfg, from_jsonable(MllmOptions, mllm_table, "") if modality == "mllm" else None)
    except (ValueError, TypeError) as e:
        raise UserError(f"{where}: {e}") from None


class Step(typing.NamedTuple):
    entry: Entry
    reuse: bool

    @property
    def cfg(self) -> TrainConfig:
        return self.entry.cfg

    @property
    def modality(self) -> str:
        return self.entry.modality


def plan(study: Study, encoders: list[Entry], overwrite: bool) -> list[Step]:
    """Reuse or train, per encoder; a run with other settings is refused unless `overwrite`."""
    steps, described = [], {}

    def dataset(cfg: TrainConfig):  # the study's samples, loaded once (a hub dataset takes a while)
        if cfg.shuffle_captions not in described:
            described[cfg.shuffle_captions] = cfg.load(cfg.shuffle_captions).describe()
        return described[cfg.shuffle_captions]

    for entry in encoders:
        cfg = entry.cfg
        count = ModalityCount(entry.mllm) if entry.mllm is not None else None
        reuse = trained_runs(cfg, study.sae, entry.modality, lambda cfg=cfg: dataset(cfg), count) is not None
        exists = [name for name in entry.runs if (study.root / name).exists()]
        if exists and not reuse and not overwrite:
            raise UserError(f"run {exists[0]!r} exists in {study.root} with other settings (or incomplete "
                            "settings of an earlier version): pass --overwrite to train it again")
        steps.append(Step(entry._replace(cfg=dataclasses.replace(cfg, overwrite=bool(exists) and not reuse)), reuse))
    return steps


class Size(typing.NamedTuple):
    size: costs.EncoderSize | None
    how: str
    """Where the size comes from, or why it is unknown."""


def _size(study: Study, step: Step) -> Size:
    """A run's size: from the run when it exists, else from one forward pass of its encoder over a few
    samples, else (a model that cannot be loaded here) from its published size when costs.py has it."""
    cfg = step.cfg
    if step.reuse:
        meta = Run.open(study.root, step.entry.runs[0]).meta
        info = [meta.layer_info[layer] for layer in meta.layers]
        return Size(costs.EncoderSize([i.d_model for i in info], [i.tokens_seen / meta.dataset.n_samples for i in info],
                                      0.0), "from the run")
    try:
        encoder = build_encoder(cfg.encoder_spec(step.modality), resolve_device(study.device))
        return Size(costs.measure(encoder, cfg.load(cfg.shuffle_captions), encoder.resolve_layers(cfg.layers)),
                    "measured")
    except UserError as e:
        why = "cannot be loaded here" + (" (offline)" if "offline" in str(e) else "")
        checkpoint = cfg.checkpoint or get_encoder_class(cfg.model, step.modality).default_checkpoint
        published = costs.published(cfg.model, checkpoint, cfg.layers)
        return Size(published, f"published size: {why}" if published else f"size unknown: {why}")


def _n_samples(study: Study) -> int:
    """The study's sample count: the dataset's, or offline for a hub dataset, --max_samples or its known size."""
    try:
        return len(study.data.load())
    except UserError:
        known = costs.DATASET_SIZES.get(study.data.dataset)
        if study.data.max_samples is None and known is None:
            raise
        return min(x for x in (study.data.max_samples, known) if x is not None)


def dry_run(study: Study, steps: list[Step]) -> str:
    """The plan, and what it costs on one H100 (costs.py), from each run's size."""
    lines = [f"study in {study.out}: {len(steps)} runs, dataset {study.data.dataset}, seeds {study.seeds}"]
    sizes = {}
    for step in steps:
        cfg = step.cfg
        size, how = sizes[cfg.runname] = _size(study, step)
        what = f"{len(size.widths)} layers of d {max(size.widths)} ({how})" if size else how
        lines.append(f"  {'reuse' if step.reuse else 'train'} {' and '.join(step.entry.runs)}: {step.modality} "
                     f"{cfg.model} {cfg.checkpoint or get_encoder_class(cfg.model, step.modality).default_checkpoint}"
                     f"{'' if cfg.encoder_dtype == 'float32' else ' in ' + cfg.encoder_dtype}; {what}")
    a = study.analyses
    n_runs = sum(len(st.entry.runs) for st in steps)
    lines.append(f"  analyses: wMPPC of {n_runs * (n_runs - 1)} ordered pairs ({a.codes} codes"
                 + (", floors and ceilings" if a.calibrate else "") + (", intervals" if a.ci else "") + ")"
                 + (", classic measures" if a.similarity else "") + f", {len(a.groups)} sharedness groups")
    if any(s.size is None for s in sizes.values()):
        return "\n".join([*lines, "  cost: unknown until every run's size is (see above)"])
    known = [sizes[st.cfg.runname].size for st in steps for _ in st.entry.runs]  # an MLLM's two runs, one size
    n, e = _n_samples(study), study.sae.expansion_factor
    todo = [(st.cfg.encoder_dtype, *costs.training_flops(sizes[st.cfg.runname].size, n, e, len(study.seeds)))
            for st in steps if not st.reuse]
    enc = {half: sum(t[1] for t in todo if (t[0] != "float32") == half) for half in (False, True)}
    sae = sum(t[2] for t in todo)
    enc_hours = costs.hours(enc[False], "fp32") + costs.hours(enc[True], "bf16")
    matrix = costs.matrix_flops(known, n, e, a.mem_gb, a.calibrate, len(study.seeds))
    training = {"fp32": enc_hours + costs.hours(sae, "fp32"), "tf32": None,
                "bf16": enc_hours + costs.hours(sae, "bf16")}
    table = costs.table([
        ("training what is missing (encoders in their --encoder_dtype; SAE steps fp32 or --sae_dtype bfloat16)",
         enc[False] + enc[True] + sae, training),
        (f"all-layers wMPPC matrix, {a.codes} codes", matrix, {k: costs.hours(matrix, k) for k in costs.PEAK_TFLOPS})])
    lines.append(f"  estimated cost on one H100 at {costs.EFFICIENCY:.0%} of peak (divide by the GPUs):\n{table}")
    return "\n".join(lines)


def analyse(study: Study, runs: list[Run]) -> StudyResults:
    a = study.analyses
    opts = EngineOptions(root=str(study.root), codes=a.codes, device=study.device, mem_gb=a.mem_gb,
                         precision=a.precision)
    ref = Correlator(opts, progress=tqdm_progress("correlations"))
    engine = Correlator(dataclasses.replace(opts, precision="fp32"), progress=tqdm_progress("correlations (jackknife)"),
                        jackknife=True) if a.ci else ref
    by_pair = pair_scores(runs, engine, a.calibrate)
    names = [r.name for r in runs]
    pairs, table = {f"{x}->{y}": w for (x, y), w in by_pair.items()}, table_of(names, by_pair, engine.codes)
    sims = SimilarityEngine(device=opts.torch_device)
    similarity = ({f"{x.name}->{y.name}": sims.compare(x, y) for x in runs for y in runs if x is not y}
                  if a.similarity else {})
    by_name = dict(zip(names, runs))
    reports = [top_features(comp_sharedness(by_name[g.source], [by_name[n] for n in g.shared],
                                            [by_name[n] for n in g.not_shared], ref), g.top) for g in a.groups]
    joints = {key: rep for g in a.groups for key, rep in headline_joints(
        by_name[g.source], [by_name[g.shared[0]], by_name[g.not_shared[0]]], a.joint, opts.torch_device).items()}
    return StudyResults(config={}, runs={r.name: r.meta for r in runs}, wmppc=pairs, similarity=similarity,
                        table=table, sharedness=reports, joint=joints)


def run_study(study: Study, encoders: list[Entry], overwrite: bool, dry: bool,
              train_index: int | None = None) -> StudyResults | None:
    if train_index is not None:
        if not 0 <= train_index < len(encoders):
            raise UserError(f"--train_index {train_index}: the study has encoders 0..{len(encoders) - 1}")
        encoders = encoders[train_index:train_index + 1]
    steps = plan(study, encoders, overwrite)
    if dry:
        print(dry_run(study, steps))
        return None
    study.root.mkdir(parents=True, exist_ok=True)
    for step in steps:  # under torchrun every rank takes part in the training (training.torchrun)
        if step.reuse:
            print(f"reusing {' and '.join(str(study.root / name) for name in step.entry.runs)} (same settings)")
        elif step.entry.mllm is not None:
            train_mllm(step.cfg, study.sae, step.entry.mllm)
        else:
            train(step.cfg, study.sae, step.modality)
    distributed.barrier()
    if train_index is not None:
        return None
    runs = open_runs(study.root, [name for entry in encoders for name in entry.runs])
    res = analyse(study, runs)
    res.config = to_jsonable(study)
    if distributed.rank() == 0:
        out = Path(study.out)
        for g, rep in zip(study.analyses.groups, res.sharedness):
            gallery = sharedness_gallery(rep, GalleryOptions(root=str(study.root), out=str(out / "imgs" / g.source),
                                                             overwrite=True, device=study.device))
            res.galleries.append(str(gallery.index.relative_to(out.resolve())))
            res.grids.append([str(gallery.grids[rep.source, f.feature].relative_to(out.resolve()))
                              for f in rep.features])
        res.save(out / "results.json")
        study_report.write(res, out)
    return res


def _flags(obj, skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that give a dataclass's non-default fields."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else object())
        if f.name in skip or value == default or value is None:
            continue
        if isinstance(value, bool):
            out.append(f"--{f.name}" if value else f"--no_{f.name}")
        else:
            out += [f"--{f.name}", *map(str, value if isinstance(value, list) else [value])]
    return out


def commands(study: Study, encoders: list[Entry]) -> list[str]:
    """The study as the command lines that run it step by step: a training per encoder, then its
    Comparative Sharedness groups (what a cluster script or a reader of the paper wants)."""
    root = ["--root", str(study.root)]
    lines = []
    for modality, cfg, mllm in encoders:
        flag = get_encoder_class(cfg.model, modality).checkpoint_flag
        train = ["--model", cfg.model, *([flag, cfg.checkpoint] if cfg.checkpoint else []), "--runname", cfg.runname,
                 *_flags(study.data), *_flags(cfg, ("model", "checkpoint", "runname", *STUDY_OWNED)),
                 *(_flags(mllm) if mllm is not None else []),
                 *(["--seeds", *map(str, study.seeds)] if study.seeds != [0] else []), *_flags(study.sae), *root]
        lines.append(shlex.join(["uv", "run", f"train_{modality}.py", *train]))
    for g in study.analyses.groups:
        lines.append(shlex.join(["uv", "run", "comp_sharedness.py", "--source", g.source, "--min_group", *g.shared,
                                 "--max_group", *g.not_shared, "--top", str(g.top), *root]))
    return lines


@dataclass
class StudyArgs:
    config: str
    """The study's TOML file."""
    overwrite: bool = False
    """Train again the runs that exist with other settings."""
    dry_run: bool = False
    """Print the plan and its estimated cost; train and compute nothing."""
    train_index: int | None = None
    """Train only the study's encoder number i (0-based: a Slurm array task's id), then stop."""
    commands: bool = False
    """Print the study as the command lines that run it step by step (a training per encoder, then its
    sharedness groups), and stop."""


@cli
def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the study's TOML file (see studies/)")
    add_options(p, StudyArgs, skip=("config",))
    args = options_from(StudyArgs, p.parse_args(argv))
    study, encoders = load_study(args.config)
    if args.commands:
        print("\n".join(commands(study, encoders)))
        return
    distributed.init(resolve_device(study.device))
    res = run_study(study, encoders, args.overwrite, args.dry_run, args.train_index)
    if res is not None:
        print(study_report.summary(res, Path(study.out)))


if __name__ == "__main__":
    main()
