"""wMPPC between runs (docs/design.md#wmppc): how much of A's activation mass is carried by features that B also has.

    uv run wmppc.py --source clip --target dino            # All Layers : X | Last layer : Y
    uv run wmppc.py --source clip --target dino --json out.json --plot out.png
    uv run wmppc.py --runs clip dino bert --json all.json  # every ordered pair
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from scipy import stats

import labels
from errors import UserError, cli
from saeshare.core import distributed
from saeshare.core.options import OutputOptions, parse
from saeshare.core.progress import progress
from saeshare.disk.cache import PairStats
from saeshare.disk.results import GeometryScores, Intervals, LabelAgreement, Scores, Wmppc, WmppcTable
from saeshare.disk.runs import PairOptions, Run, open_runs, run_warnings
from saeshare.engine.correlator import Correlator, tqdm_progress
from saeshare.engine.options import EngineOptions
from saeshare.joint.geometry import geometry, paired
from saeshare.render.figures import format_table, plot_heatmap


def weighted_mppc(rho_F: np.ndarray, mass_F: np.ndarray, what: str) -> float:
    """sum_i S_i rho_i / sum_i S_i. A layer whose features are all 0 on every sample has no mass to
    weigh with: that is an error (a dead SAE), not a number."""
    total = float(mass_F.sum())
    if not total > 0:
        raise UserError(f"{what}: every feature is 0 on every sample (activation mass 0), wMPPC is undefined; "
                        "is this layer's SAE dead?")
    return float((mass_F * rho_F).sum() / total)


def _scores(rho_of: Callable[[int, int], np.ndarray], mass_of: Callable[[int], np.ndarray], la: list[int],
            lb: list[int], what: str) -> tuple[np.ndarray, float]:
    """(layer-pair matrix [L_A, L_B], all-layers wMPPC) from each pair's rho and each layer's mass."""
    matrix = np.array([[weighted_mppc(rho_of(a, b), mass_of(a), f"layer {a} of {what}") for b in lb] for a in la])
    per_layer, n_features = [], []
    for a in la:
        rho_all_F = np.max([rho_of(a, b) for b in lb], axis=0)  # each feature's best layer of B
        per_layer.append(weighted_mppc(rho_all_F, mass_of(a), f"layer {a} of {what}"))
        n_features.append(len(rho_all_F))
    return matrix, float(np.average(per_layer, weights=n_features))


class Jackknife(NamedTuple):
    """What the J leave-one-block-out values of a score say about it."""
    se: np.ndarray | float
    """sqrt((J-1)/J * sum_j (w_j - mean w)^2)."""
    corrected: np.ndarray | float
    """J w - (J-1) mean w_j: the score with its small-sample bias (of order 1/N) removed."""
    interval: np.ndarray
    """[..., 2] 95%: the corrected score ± t_{J-1} sqrt(se^2 + (corrected - score)^2). J blocks give J-1
    degrees of freedom; the correction's own uncertainty is of the size of the correction (a maximum over
    correlations is not a smooth statistic), so it widens the interval, by nothing where it is negligible
    (bench/bench_intervals.py: this covers, se alone does not at small N)."""


def jackknife(full: np.ndarray | float, loo_J: np.ndarray) -> Jackknife:
    """From a score and its leave-one-block-out values (first axis of loo_J)."""
    n_blocks = len(loo_J)
    mean = loo_J.mean(0)
    se = np.sqrt((n_blocks - 1) / n_blocks * np.square(loo_J - mean).sum(0))
    corrected = n_blocks * np.asarray(full) - (n_blocks - 1) * mean
    half = stats.t.ppf(0.975, n_blocks - 1) * np.sqrt(se ** 2 + (corrected - full) ** 2)
    return Jackknife(se, corrected, np.stack([corrected - half, corrected + half], axis=-1))


def wmppc(run_a: Run, run_b: Run, engine: Correlator) -> Wmppc:
    """Layer-pair matrix, all-layers and last-layer wMPPC of A -> B, from one set of correlations; with
    an engine made with `ci`, their jackknife intervals too."""
    stats: dict[tuple[int, int], PairStats] = engine.pair_stats(run_a, run_b)
    la, lb = run_a.layers, run_b.layers
    matrix, all_layers = _scores(lambda a, b: stats[a, b].rho_F, lambda a: stats[a, lb[0]].mass_F, la, lb,
                                 repr(run_a.name))
    res = Wmppc(run_a.name, run_b.name, engine.codes, all_layers, float(matrix[-1, -1]), matrix, la, lb)
    if stats[la[0], lb[0]].rho_JF is not None:
        loo = [_scores(lambda a, b: stats[a, b].rho_JF[j], lambda a: stats[a, lb[0]].mass_JF[j], la, lb,
                       repr(run_a.name)) for j in range(engine.n_blocks)]
        matrix_J, all_J = np.array([m for m, _ in loo]), np.array([x for _, x in loo])
        every, last, per_pair = (jackknife(all_layers, all_J), jackknife(res.last_layer, matrix_J[:, -1, -1]),
                                 jackknife(matrix, matrix_J))
        res.ci = Intervals(every.interval.tolist(), last.interval.tolist(), per_pair.interval)
        res.corrected = Scores(float(every.corrected), float(last.corrected))
        res.se = Scores(float(every.se), float(last.se))
    return res


def _mean_scores(scores: list[Wmppc]) -> Scores:
    """Raw and (with the jackknife) bias-corrected values, averaged."""
    res = Scores(float(np.mean([x.all_layers for x in scores])), float(np.mean([x.last_layer for x in scores])))
    if all(x.corrected is not None for x in scores):
        res.corrected = _mean_scores([x.corrected for x in scores])
    return res


def calibrated(run_a: Run, run_b: Run, engine: Correlator) -> Wmppc:
    """wMPPC of A -> B with its floor (B's samples permuted) and, when A has several SAE seeds, its
    ceiling (A's first seed against each other seed of A, averaged), all three from the same engine: with
    the jackknife, each has its bias-corrected value, so that they stay comparable."""
    res = wmppc(run_a, run_b, engine)
    res.floor = _mean_scores([wmppc(run_a, run_b.permuted(), engine)])
    others = [run_a.with_seed(s) for s in run_a.meta.sae.seeds if s != run_a.seed]
    if others:
        res.ceiling = _mean_scores([wmppc(run_a, other, engine) for other in others])
    return res


def pair_scores(runs: list[Run], engine: Correlator, calibrate: bool = False,
                null: bool = False) -> dict[tuple[str, str], Wmppc]:
    """wMPPC of every ordered pair (names of A, B), with floor and ceiling when `calibrate`; `null`: every
    target run's samples permuted."""
    return {(a.name, b.name): calibrated(a, b.permuted() if null else b, engine) if calibrate
            else wmppc(a, b.permuted() if null else b, engine) for a in runs for b in runs if a is not b}


def wmppc_table(runs: list[Run], engine: Correlator, calibrate: bool = False, null: bool = False) -> WmppcTable:
    """wMPPC of every ordered pair, row -> column; NaN on the diagonal (not computed); with their
    floors, ceilings and intervals when asked for; `null`: every column run's samples permuted."""
    return table_of([r.name for r in runs], pair_scores(runs, engine, calibrate, null), engine.codes)


def table_of(names: list[str], pairs: dict[tuple[str, str], Wmppc], codes: str) -> WmppcTable:
    """The pairs' scores as [runs, runs] tables."""
    first = next(iter(pairs.values()))

    def table(get: Callable[[Wmppc], float | list[float]]) -> np.ndarray:
        shape = np.shape(get(first))
        out = np.full((len(names), len(names), *shape), np.nan)
        for (a, b), res in pairs.items():
            out[names.index(a), names.index(b)] = get(res)
        return out

    res = WmppcTable(names, codes, table(lambda r: r.all_layers), table(lambda r: r.last_layer))
    keys = ("all_layers", "last_layer")
    if first.ci is not None:
        res.ci = {k: table(lambda r: getattr(r.ci, k)) for k in keys}
        res.corrected = {k: table(lambda r: getattr(r.corrected, k)) for k in keys}
    if first.floor is not None:
        res.floor = {k: table(lambda r: getattr(r.floor.corrected or r.floor, k)) for k in keys}
        if all(r.ceiling is not None for r in pairs.values()):
            res.ceiling = {k: table(lambda r: getattr(r.ceiling.corrected or r.ceiling, k)) for k in keys}
    return res


@dataclass
class WmppcArgs(PairOptions, OutputOptions, EngineOptions):
    ci: bool = False
    """Add to every wMPPC its bias-corrected value and a 95% interval: delete-one-block jackknife over 10
    random blocks of samples (computed by the dense path, whatever the codes)."""
    calibrate: bool = False
    """Beside each score, its floor (B's samples permuted) and ceiling (A's own SAE seeds, when it has several)."""
    labels: bool = False
    """Also say how often matched features (last layer against last layer) carry the same label (labels.py),
    against the same share with the matches shuffled (one pair only)."""
    geometry: bool = False
    """Also compare where matched features point (Lan et al.): SVCCA and RSA of the paired decoder rows of the
    last layers, against shuffled pairings (one pair only)."""
    geometry_all: bool = False
    """--geometry for every layer pair, not only the last layers (a few seconds a pair)."""
    one_to_one: bool = False
    """--geometry: a feature of B matched by several of A keeps only its best-correlated one."""
    geometry_min_rho: float = 0.0
    """--geometry: pairs whose correlation is below this are left out."""

    def __post_init__(self):
        super().__post_init__()
        for flag in ("labels", "geometry"):
            if getattr(self, flag) and self.runs is not None:
                raise UserError(f"--{flag} goes with --source and --target (one pair)")
        if not -1 <= self.geometry_min_rho <= 1:
            raise UserError(f"--geometry_min_rho must be in [-1, 1], got {self.geometry_min_rho}")


def label_agreement(run_a: Run, run_b: Run, engine: Correlator, args: WmppcArgs) -> LabelAgreement:
    """labels.py on both runs' last layers, and how often A's features and their best matches in B agree."""
    la, lb = run_a.layers[-1], run_b.layers[-1]
    feats = [labels.named(r, layer, engine.codes, args.torch_device).features
             for r, layer in ((run_a, la), (run_b, lb))]
    return labels.agreement(*feats, engine.pair_stats(run_a, run_b, [(la, lb)])[la, lb].match_F)


def decoder_geometry(run_a: Run, run_b: Run, engine: Correlator, args: WmppcArgs) -> list[GeometryScores]:
    """Lan et al.'s SVCCA and RSA of the last layers (every layer pair with --geometry_all), from the pairs'
    best matches (cached by wMPPC)."""
    cells = ([(a, b) for a in run_a.layers for b in run_b.layers] if args.geometry_all
             else [(run_a.layers[-1], run_b.layers[-1])])
    stats = engine.pair_stats(run_a, run_b, cells)
    out = []
    for a, b in progress(cells, desc="geometry", unit="layer pair", leave=False):
        pairs = paired(stats[a, b], args.geometry_min_rho, args.one_to_one)
        out.append(geometry(run_a.sae(a).W_dec.detach().numpy(), run_b.sae(b).W_dec.detach().numpy(), pairs,
                            (a, b)))
    return out


def _geometry_line(g: GeometryScores) -> str:
    return (f"geometry (layer {g.layer_a} -> {g.layer_b}, {g.n_pairs} matched pairs): SVCCA {g.svcca:.3f} (shuffled "
            f"{g.svcca_null:.3f}, p {g.svcca_p:.3f}); RSA {g.rsa:.3f} (shuffled {g.rsa_null:.3f}, p {g.rsa_p:.3f})")


def _line(res: Wmppc) -> str:
    """All Layers : X | Last layer : Y; with --ci each score's bias-corrected value and its interval, with
    --calibrate its floor and ceiling (bias-corrected too, with --ci)."""
    def score(key: str) -> str:
        corrected = (f", corrected {getattr(res.corrected, key):.4f} [{getattr(res.ci, key)[0]:.4f}, "
                     f"{getattr(res.ci, key)[1]:.4f}]" if res.ci else "")
        refs = (("floor", res.floor), ("ceiling", res.ceiling))
        marks = [f"{name} {getattr(ref.corrected or ref, key):.4f}" for name, ref in refs if ref]
        return f"{getattr(res, key):.4f}{corrected}" + (f" ({', '.join(marks)})" if marks else "")
    return f"All Layers : {score('all_layers')} | Last layer : {score('last_layer')}"


@cli
def main(argv=None):
    args = parse(WmppcArgs, argv, "wMPPC between SAE runs")
    distributed.init(args.torch_device)
    engine = Correlator(args, progress=tqdm_progress("correlations"), jackknife=args.ci)
    if args.runs is None:
        runs = run_a, run_b = open_runs(args.root, [args.source, args.target], verbose=args.verbose)
        target = run_b.permuted() if args.null == "permute" else run_b
        res = (calibrated if args.calibrate else wmppc)(run_a, target, engine)
        print(_line(res))
        if args.labels:
            res.label_agreement = agree = label_agreement(run_a, target, engine, args)
            print(f"labels (last layers): {agree.share:.3f} of {agree.n_pairs} labelled matched pairs agree; "
                  f"with the matches shuffled {agree.floor:.3f}")
        if args.geometry:
            res.geometry = decoder_geometry(run_a, target, engine, args)
            print(_geometry_line(res.geometry[-1]) + (f" (all {len(res.geometry)} layer pairs in --json)"
                                                      if len(res.geometry) > 1 else ""))
            if not args.one_to_one:
                print("note: matches are many-to-one: A's features matched to one B feature share its decoder row, "
                      "which lifts RSA above its shuffled null even between unrelated models (--one_to_one avoids it)")
        for note in (res.near_floor(), _same_run(run_a, run_b),
                     args.calibrate and res.ceiling is None and _no_ceiling([run_a])):
            if note:
                print(note)
        if args.plot:
            plot_heatmap(res.layer_matrix, [str(a) for a in res.source_layers], [str(b) for b in res.target_layers],
                         f"{res.source} layer", f"{res.target} layer",
                         f"wMPPC {res.source} -> {res.target} ({res.codes} codes)", args.plot)
    else:
        runs = open_runs(args.root, args.runs, verbose=args.verbose)
        res = wmppc_table(runs, engine, args.calibrate, args.null == "permute")
        print(format_table("All layers (row -> column)", args.runs, res.all_layers))
        print(format_table("\nLast layer (row -> column)", args.runs, res.last_layer))
        for name, ref in (("floor", res.floor), ("ceiling", res.ceiling)):
            if ref is not None:
                print(format_table(f"\nAll layers, {name} (row -> column)", args.runs, ref["all_layers"]))
        if args.calibrate and _no_ceiling(runs):
            print(_no_ceiling(runs))
        if args.plot:
            plot_heatmap(res.all_layers, args.runs, args.runs, "source", "target",
                         f"wMPPC, all layers ({res.codes} codes)", args.plot)
    args.write(dataclasses.replace(res, warnings=[w for r in runs for w in run_warnings(r)]))


def _same_run(a: Run, b: Run) -> str | None:
    if a.path.resolve() != b.path.resolve() or a.seed != b.seed:
        return None
    return (f"note: source and target are the same SAE ({a.name}): every feature matches itself, so wMPPC is 1 by "
            f"construction; two seeds of one run (--target {a.path.name}@SEED) give its ceiling")


def _no_ceiling(runs: list[Run]) -> str | None:
    """Which runs get no ceiling, and why, instead of a table that silently lacks them."""
    single = [r.name for r in runs if len(r.meta.sae.seeds) < 2]
    if not single:
        return None
    return (f"note: no ceiling for {', '.join(single)}: a ceiling compares two SAE seeds of one run, and "
            f"{'these have' if len(single) > 1 else 'it has'} one (train with --seeds 0 1)")


if __name__ == "__main__":
    main()
