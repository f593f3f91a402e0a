"""Steer a text-to-image diffusion pipeline through the SAE features of its text encoder (a run of the SDText
family), name what each feature does in the images, and test wMPPC matches causally.

    uv run steer.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --run sd --layer 9 \\
        --features 12 40 --alphas -8 0 8 --prompts "a photo of a dog" "a street" --seeds 0 1 --out steer_out
    uv run steer.py ... --discover --top 32 --score_run clip --labels red dog night
    uv run steer.py ... --match sd_clip.json
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import data
from errors import UserError, check_choices, check_positive, cli
from saeshare.core.options import parse
from saeshare.disk.files import staged_dir
from saeshare.disk.results import (
    CausalMatch,
    DiscoverReport,
    SharednessReport,
    SteeredFeature,
    SteerName,
    SteerReport,
    Wmppc,
)
from saeshare.disk.runs import Run, RunsOptions, warn_run
from saeshare.engine.correlator import Correlator
from saeshare.render.steer_page import write_page
from saeshare.steer.pipeline import DTYPES, Generation, layer_rows, load_pipeline, tower_of
from saeshare.steer.scores import VisionFeatures, ZeroShotLabels, best_column
from saeshare.steer.session import Direction, FeatureScores, Plan, Steerer
from show import check_out, feature_stats, select_features
from wrappedmodels import split_sd_checkpoint

DISCOVER_PROMPTS = ["a photo", "a picture of something", "an image", "a scene"]
"""Neutral prompts for --discover (without --prompts): little for a feature to be drowned by."""
SAME_ENCODER_COS = 0.99
"""The run's stored rows and the pipeline's text encoder must agree at least this well (cosine per sample)."""
TOP_CAPTIONS = 5


@dataclass
class SteerArgs(RunsOptions):
    pipeline: str = ""
    """The diffusers pipeline (hub id or local folder) whose text encoder the run was made on."""
    run: str = ""
    """An SDText run (train_text.py --model SDText --sd_model_name PIPELINE)."""
    layer: int = -1
    """The recorded layer whose SAE features are steered (its block's output is changed)."""
    features: list[int] | None = None
    """Features to steer; default with --discover the --top most active, with --match the --top best matched."""
    alphas: list[float] = field(default_factory=lambda: [-8.0, 0.0, 8.0])
    """Steering strengths in units of each feature's typical activation; 0 (the unsteered pipeline) is always
    made; the scorers compare the largest with 0."""
    prompts: list[str] | None = None
    """Prompts (default with --discover: a few neutral ones)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Noise seeds: one image per (prompt, seed, alpha)."""
    out: str = "steer_out"
    """Output folder: images, steer.json, index.html (and discover.json)."""
    overwrite: bool = False
    """Replace an existing output folder."""
    positions: Literal["all", "eot"] = "all"
    """Add the vector at every token position, or at each prompt's end-of-text token only."""
    both_branches: bool = False
    """Also steer the unconditional (negative-prompt) branch of classifier-free guidance."""
    steps: int = 30
    """Denoising steps."""
    guidance: float = 7.5
    """Classifier-free guidance scale."""
    height: int | None = None
    """Image height (default: the pipeline's)."""
    width: int | None = None
    """Image width (default: the pipeline's)."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """The pipeline's dtype; auto: float16 on CUDA, float32 on the CPU."""
    discover: bool = False
    """Name each steered feature by what rises most in its images (needs --score_run and/or --labels)."""
    top: int = 32
    """Features chosen by --discover or --match when --features is not given."""
    score_run: str | None = None
    """A vision run whose SAE features score the images."""
    score_layer: int | None = None
    """Its layer (default: its last recorded one)."""
    labels: list[str] | None = None
    """Zero-shot labels that score the images (with --clip_model_name)."""
    clip_model_name: str | None = None
    """The CLIP model (open_clip name, hf-hub: name or local folder) for --labels."""
    n_random: int = 4
    """Random directions of each feature's norm whose rises make the floor."""
    match: str | None = None
    """A wmppc.py --json or comp_sharedness.py --json from this run to a vision run: the rise of each steered
    feature's match in that run's features."""

    def __post_init__(self):
        super().__post_init__()
        check_choices(self)
        for name in ("steps", "top", "height", "width"):
            check_positive(name, getattr(self, name))
        if not self.pipeline or not self.run:
            raise UserError("give --pipeline PIPELINE and --run RUN")
        if self.n_random < 0:
            raise UserError("--n_random must be 0 or more")
        if bool(self.labels) != bool(self.clip_model_name):
            raise UserError("--labels and --clip_model_name go together (the labels are scored with that CLIP model)")
        if self.discover and not (self.score_run or self.labels):
            raise UserError("--discover needs a scorer: --score_run VISION_RUN and/or --labels ... --clip_model_name")
        if not (self.features or self.discover or self.match):
            raise UserError("give --features, or let --discover or --match choose them")
        if self.prompts is None and not self.discover:
            raise UserError("give --prompts (only --discover has neutral ones of its own)")
        if self.scored and max(self.alphas) <= 0:
            raise UserError("the scorers compare the largest alpha with 0: give a positive one in --alphas")
        self.alphas = sorted(set(self.alphas) | {0.0})

    @property
    def scored(self) -> bool:
        return bool(self.score_run or self.labels or self.match)


def check_run(run: Run, pipeline: str) -> None:
    if run.meta.model != "SDText":
        raise UserError(f"run {run.name!r} was made on {run.meta.model}, not on a diffusion pipeline's text encoder: "
                        f"train one with train_text.py --model SDText --sd_model_name {pipeline}")


def check_same_encoder(run: Run, layer: int, tower, ds: data.PairedDataset) -> None:
    """The pipeline's text encoder must give the run's stored rows: a run made on another text encoder (another
    checkpoint, another tower, random weights) is refused, whatever the names say."""
    rows = np.arange(min(8, run.n_samples))
    mine = layer_rows(tower, layer, [ds.caption(int(n)) for n in rows], run.meta.token).cpu().double()
    stored = run.read_acts(layer, rows).double()
    cos = torch.nn.functional.cosine_similarity(mine, stored, dim=1).min().item()
    if not cos >= SAME_ENCODER_COS:
        raise UserError(f"run {run.name!r} was made on another text encoder than the pipeline's: its layer {layer} "
                        f"rows agree with the pipeline's text encoder #{tower.which} to cosine {cos:.3f} only")


class Matches:
    """The vision run and layer of a --match file, and this run's features' matches there."""

    def __init__(self, path: str, run: Run, layer: int, args: SteerArgs):
        what = f"--match {path}"
        try:
            report = SharednessReport.load(path, what)
        except UserError:
            report = Wmppc.load(path, f"{what} (neither a comp_sharedness.py nor a wmppc.py --json)")
        if report.source != run.name:
            raise UserError(f"{what} is about run {report.source!r}, not the steered run {run.name!r} (the text run "
                            "must be its source)")
        if isinstance(report, Wmppc):
            self.target = Run.open(args.root, report.target)
            self.layer = report.target_layers[-1]
            stats = Correlator().pair_stats(run, self.target, [(layer, self.layer)])[layer, self.layer]
            self.rho_F, self.match_F = stats.rho_F, stats.match_F
        else:
            self.target, self.layer, self.rho_F, self.match_F = self._from_sharedness(report, run, layer, args)
        if self.target.meta.modality != "image":
            raise UserError(f"{what}: its target {self.target.name!r} is a {self.target.meta.modality} run, "
                            "not a vision run")

    @staticmethod
    def _from_sharedness(report: SharednessReport, run: Run, layer: int, args: SteerArgs):
        runs = [Run.open(args.root, n) for n in [*report.min_group, *report.max_group]]
        target = next((r for r in runs if r.meta.modality == "image"), None)
        if target is None:
            raise UserError(f"--match {args.match}: none of its runs is a vision run")
        layers = report.layers or {}
        if layers.get(run.name, run.layers[-1]) != layer:
            raise UserError(f"--match {args.match} compares layer {layers.get(run.name, run.layers[-1])} of "
                            f"{run.name!r}; steer that layer (--layer)")
        rho_F, match_F = np.full(run.n_features(layer), np.nan), np.full(run.n_features(layer), -1)
        for f in report.features:
            rho_F[f.feature], match_F[f.feature] = f.rho[target.name], f.match[target.name]
        return target, layers.get(target.name, target.layers[-1]), rho_F, match_F

    def best(self, n: int, fires_F: np.ndarray) -> list[int]:
        """The n features with the highest rho among those that fire (top-k) on the run's samples."""
        rho_F = np.where(fires_F & np.isfinite(self.rho_F), self.rho_F, -np.inf)
        order = np.argsort(-rho_F, kind="stable")
        return [int(f) for f in order[:n] if np.isfinite(rho_F[f])]


def choose_features(args: SteerArgs, stats, matches: Matches | None, n_features: int) -> list[int]:
    if args.features:
        bad = [f for f in args.features if not 0 <= f < n_features]
        if bad:
            raise UserError(f"--features {bad[0]}: the layer's SAE has {n_features} features (0..{n_features - 1})")
        chosen = list(dict.fromkeys(args.features))
    elif matches is not None:
        chosen = matches.best(args.top, stats.n_active_F > 0)
    else:
        chosen = select_features(stats, min_active=1, max_features=args.top)
    silent = [f for f in chosen if stats.n_active_F[f] == 0]
    if silent:
        raise UserError(f"feature {silent[0]} never fires on the run's samples: its typical activation (alpha's "
                        "unit) is undefined; choose features that fire")
    return chosen


def scorers_of(args: SteerArgs, matches: Matches | None, device: torch.device) -> list:
    out = []
    if matches is not None:
        out.append(VisionFeatures(matches.target, matches.layer, device))
    if args.score_run and (matches is None or args.score_run != matches.target.name
                           or (args.score_layer is not None and args.score_layer != matches.layer)):
        out.append(VisionFeatures(Run.open(args.root, args.score_run), args.score_layer, device))
    if args.labels:
        out.append(ZeroShotLabels(args.labels, args.clip_model_name, device))
    return out


def causal_matches(chosen: list[int], scores: dict[int, list[FeatureScores]], matches: Matches) -> list[CausalMatch]:
    out = []
    for f in chosen:
        v = int(matches.match_F[f])
        s = scores[f][0]  # the match's scorer comes first
        floor = float(s.random_RC[:, v].max()) if s.random_RC.size else float("nan")
        out.append(CausalMatch(f, float(matches.rho_F[f]), v, float(s.rise_C[v]), floor,
                               float(s.rise_C[v] / floor) if floor > 0 else float("nan")))
    return out


def open_run(args: SteerArgs) -> tuple[Run, int, data.PairedDataset]:
    run = Run.open(args.root, args.run)
    check_run(run, args.pipeline)
    warn_run(run, args.verbose)
    layer = run.resolve_layer(args.layer)
    try:
        ds = data.from_description(run.meta.dataset)
    except UserError as e:
        raise UserError(f"run {run.name!r}: cannot re-create its dataset (its captions are checked against the "
                        f"pipeline and shown): {e}") from None
    return run, layer, ds


def open_pipeline(args: SteerArgs, run: Run, layer: int, ds: data.PairedDataset):
    """The pipeline, and its text encoder the run was made on (checked by numbers, not names)."""
    device = args.torch_device
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    pipe = load_pipeline(args.pipeline, device, dtype)
    tower = tower_of(pipe, split_sd_checkpoint(run.meta.checkpoint)[1])
    check_same_encoder(run, layer, tower, ds)
    return pipe, tower, str(dtype).removeprefix("torch.")


def feature_records(chosen: list[int], directions: list[Direction], stats, ds: data.PairedDataset, scorers: list,
                    scores: dict[int, list[FeatureScores]]) -> list[SteeredFeature]:
    out = []
    for f, d in zip(chosen, directions):
        caps = [ds.caption(int(n)) for v, n in zip(stats.top_val_KF[:, f], stats.top_idx_KF[:, f]) if v > 0]
        best = [best_column(fs.rise_C, fs.random_RC, s.columns) for s, fs in zip(scorers, scores.get(f, []))]
        names = [SteerName(s.name, b.name, b.rise, b.floor) for s, b in zip(scorers, best)]
        out.append(SteeredFeature(f, float(stats.mass_F[f] / stats.n_active_F[f]), float(d.unit_D.norm()), caps, names))
    return out


def print_report(report: SteerReport, out: Path) -> None:
    n_feat = sum(im.feature is not None and im.direction == "feature" for im in report.images)
    print(f"wrote {out}: {len(report.images)} images ({n_feat} steered, {report.n_random} random directions per "
          f"feature), steer.json, index.html")
    named = [(f, n) for f in report.features for n in f.names]
    if named:
        print(f"{'feature':>8}  {'scorer':<28} {'raises most':<28} {'rise':>8} {'floor':>8}")
        for f, n in named:
            print(f"{f.feature:>8}  {n.scorer[:28]:<28} {n.name[:28]:<28} {n.rise:>8.4f} {n.floor:>8.4f}")
    if report.matches:
        print(f"matched features in {report.match_target}, at alpha {report.measured_alpha:g}:")
        print(f"{'feature':>8} {'rho':>7} {'vision':>7} {'rise':>8} {'floor':>8} {'ratio':>7}")
        for m in report.matches:
            print(f"{m.feature:>8} {m.rho:>+7.3f} {m.vision_feature:>7} {m.rise:>8.4f} {m.floor:>8.4f} {m.ratio:>7.2f}")


@cli
def main(argv=None) -> SteerReport:
    args = parse(SteerArgs, argv, "Steer a diffusion pipeline through the SAE features of its text encoder")
    out = Path(args.out)
    check_out(out, args.overwrite)
    run, layer, ds = open_run(args)
    device = args.torch_device
    stats = feature_stats(run, layer, "topk", k=TOP_CAPTIONS, device=device, show_progress=False)
    matches = Matches(args.match, run, layer, args) if args.match else None
    chosen = choose_features(args, stats, matches, run.n_features(layer))
    scorers = scorers_of(args, matches, device)
    pipe, tower, dtype = open_pipeline(args, run, layer, ds)
    W_dec_FD = run.sae(layer).W_dec.detach()
    directions = [Direction(f, float(stats.mass_F[f] / stats.n_active_F[f]) * W_dec_FD[f]) for f in chosen]
    plan = Plan(args.prompts or DISCOVER_PROMPTS, args.seeds, args.alphas, args.positions, args.both_branches,
                Generation(args.steps, args.guidance, args.height, args.width), args.n_random if scorers else 0,
                max(args.alphas))
    with staged_dir(out, lambda final: check_out(final, args.overwrite)) as tmp:
        steerer = Steerer(pipe, tower, layer, device, plan, tmp)
        scores = steerer.run(directions, scorers)
        report = SteerReport(
            args.pipeline, run.name, layer, args.positions, args.both_branches, args.alphas, plan.prompts, args.seeds,
            args.steps, args.guidance, args.height, args.width, dtype,
            feature_records(chosen, directions, stats, ds, scorers, scores), steerer.images,
            plan.measured_alpha if scorers else None, plan.n_random)
        if matches is not None:
            report.matches = causal_matches(chosen, scores, matches)
            report.match_target = f"{matches.target.name} layer {matches.layer}"
        report.save(tmp / "steer.json")
        if args.discover:
            DiscoverReport(run.name, layer, plan.measured_alpha, plan.n_random, plan.prompts,
                           report.features).save(tmp / "discover.json")
        write_page(tmp / "index.html", report)
    print_report(report, out)
    return report


if __name__ == "__main__":
    main()
