"""wMPPC between runs (SPEC §6): how much of A's activation mass is carried by features that B also has.

    uv run wmppc.py --source clip --target dino            # All Layers : X | Last layer : Y
    uv run wmppc.py --source clip --target dino --json out.json --plot out.png
    uv run wmppc.py --runs clip dino bert --json all.json  # every ordered pair
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from corr_cache import PairStats
from correlation import Correlator, EngineOptions, tqdm_progress
from errors import UserError, cli
from figures import format_table, plot_heatmap
from options import check_output, parse
from results import Wmppc, WmppcTable
from runs import Run, open_runs


def weighted_mppc(rho_F: np.ndarray, mass_F: np.ndarray, what: str) -> float:
    """sum_i S_i rho_i / sum_i S_i. A layer whose features are all 0 on every sample has no mass to
    weigh with: that is an error (a dead SAE), not a number."""
    total = float(mass_F.sum())
    if not total > 0:
        raise UserError(f"{what}: every feature is 0 on every sample (activation mass 0), wMPPC is undefined; "
                        "is this layer's SAE dead?")
    return float((mass_F * rho_F).sum() / total)


def wmppc(run_a: Run, run_b: Run, engine: Correlator) -> Wmppc:
    """Layer-pair matrix, all-layers and last-layer wMPPC of A -> B, from one set of correlations."""
    stats: dict[tuple[int, int], PairStats] = engine.pair_stats(run_a, run_b)
    la, lb = run_a.layers, run_b.layers
    matrix = np.array([[weighted_mppc(stats[a, b].rho_F, stats[a, b].mass_F,
                                      f"layer {a} of {run_a.name!r}") for b in lb] for a in la])
    per_layer, n_features = [], []
    for a in la:
        rho_all_F = np.max([stats[a, b].rho_F for b in lb], axis=0)  # each feature's best layer of B
        per_layer.append(weighted_mppc(rho_all_F, stats[a, lb[0]].mass_F, f"layer {a} of {run_a.name!r}"))
        n_features.append(len(rho_all_F))
    return Wmppc(run_a.name, run_b.name, engine.codes, float(np.average(per_layer, weights=n_features)),
                 float(matrix[-1, -1]), matrix, la, lb)


def wmppc_table(runs: list[Run], engine: Correlator) -> WmppcTable:
    """All-layers and last-layer wMPPC of every ordered pair, row -> column; NaN on the diagonal (not computed)."""
    all_rr = np.full((len(runs), len(runs)), np.nan)
    last_rr = all_rr.copy()
    for i, a in enumerate(runs):
        for j, b in enumerate(runs):
            if i != j:
                res = wmppc(a, b, engine)
                all_rr[i, j], last_rr[i, j] = res.all_layers, res.last_layer
    return WmppcTable([r.name for r in runs], engine.codes, all_rr, last_rr)


@dataclass
class WmppcArgs(EngineOptions):
    source: str | None = None
    """Run A."""
    target: str | None = None
    """Run B."""
    runs: list[str] | None = None
    """Several runs: every ordered pair (instead of --source/--target)."""
    json: str | None = None
    """Write the results to this JSON file."""
    plot: str | None = None
    """Write a heatmap PNG: the layer-pair matrix, or with --runs the all-layers matrix."""

    def __post_init__(self):
        super().__post_init__()
        if self.runs is not None:
            if self.source or self.target:
                raise UserError("give either --source and --target, or --runs, not both")
            if len(self.runs) < 2:
                raise UserError("--runs needs at least two runs")
            if len(set(self.runs)) != len(self.runs):
                raise UserError(f"--runs lists a run twice: {' '.join(self.runs)}")
        elif not (self.source and self.target):
            raise UserError("give --source A --target B, or --runs A B ...")
        check_output(self.json, "--json")
        check_output(self.plot, "--plot")


@cli
def main(argv=None):
    args = parse(WmppcArgs, argv, "wMPPC between SAE runs (SPEC §6)")
    engine = Correlator(args, progress=tqdm_progress("correlations"))
    if args.runs is None:
        res = wmppc(*open_runs(args.root, [args.source, args.target]), engine)
        print(f"All Layers : {res.all_layers:.4f} | Last layer : {res.last_layer:.4f}")
        if args.plot:
            plot_heatmap(res.layer_matrix, [str(a) for a in res.source_layers], [str(b) for b in res.target_layers],
                         f"{res.source} layer", f"{res.target} layer",
                         f"wMPPC {res.source} -> {res.target} ({res.codes} codes)", args.plot)
    else:
        res = wmppc_table(open_runs(args.root, args.runs), engine)
        print(format_table("All layers (row -> column)", args.runs, res.all_layers))
        print(format_table("\nLast layer (row -> column)", args.runs, res.last_layer))
        if args.plot:
            plot_heatmap(res.all_layers, args.runs, args.runs, "source", "target",
                         f"wMPPC, all layers ({res.codes} codes)", args.plot)
    if args.json:
        res.save(args.json)


if __name__ == "__main__":
    main()
