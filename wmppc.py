"""wMPPC between runs (SPEC §6): how much of A's activation mass is carried by features that B also has.

    uv run wmppc.py --source clip --target dino            # All Layers : X | Last layer : Y
    uv run wmppc.py --source clip --target dino --json out.json --plot out.png
    uv run wmppc.py --runs clip dino bert --json all.json  # every ordered pair
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from correlation import Correlator, PairStats, add_engine_args, check_output, engine_from_args, open_runs
from errors import ArgumentParser, UserError, cli
from runs import Run


class Wmppc(NamedTuple):
    source: str
    target: str
    codes: str
    source_layers: list[int]
    target_layers: list[int]
    layer_matrix: np.ndarray
    """[L_A, L_B]: wMPPC of layer a of A against layer b of B (indexed by position in the layer lists)."""
    all_layers: float
    last_layer: float


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
    return Wmppc(run_a.name, run_b.name, engine.codes, la, lb, matrix,
                 float(np.average(per_layer, weights=n_features)), float(matrix[-1, -1]))


def wmppc_table(runs: list[Run], engine: Correlator) -> tuple[np.ndarray, np.ndarray]:
    """[R, R] all-layers and last-layer wMPPC, row -> column; NaN on the diagonal (not computed)."""
    all_rr = np.full((len(runs), len(runs)), np.nan)
    last_rr = all_rr.copy()
    for i, a in enumerate(runs):
        for j, b in enumerate(runs):
            if i != j:
                res = wmppc(a, b, engine)
                all_rr[i, j], last_rr[i, j] = res.all_layers, res.last_layer
    return all_rr, last_rr


def _fmt_table(title: str, names: list[str], values: np.ndarray) -> str:
    width = max(8, *(len(n) for n in names))
    lines = [title, " " * width + "".join(f" {n:>{width}}" for n in names)]
    for name, row in zip(names, values):
        lines.append(f"{name:>{width}}" + "".join(f" {'-' if np.isnan(v) else f'{v:.4f}':>{width}}" for v in row))
    return "\n".join(lines)


def _nan_to_none(values: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in values]


def plot_heatmap(values: np.ndarray, rows: list[str], cols: list[str], ylabel: str, xlabel: str,
                 title: str, path: str | Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * w + 2), max(3.0, 0.45 * h + 1.5)))
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=min(0.0, float(np.nanmin(values))),
                   vmax=1.0, aspect="auto")
    fig.colorbar(im, ax=ax, label="wMPPC")
    ax.set_xticks(range(w), cols, rotation=45 if w > 8 else 0, ha="right" if w > 8 else "center")
    ax.set_yticks(range(h), rows)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if h * w <= 400:
        for (i, j), v in np.ndenumerate(values):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7 if h * w > 100 else 9,
                        color="black" if v > 0.6 else "white")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


@cli
def main(argv=None):
    p = ArgumentParser(description="wMPPC between SAE runs (SPEC §6)")
    p.add_argument("--source", help="run A")
    p.add_argument("--target", help="run B")
    p.add_argument("--runs", nargs="*", help="several runs: every ordered pair (instead of --source/--target)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--plot", help="write a heatmap PNG: the layer-pair matrix, or with --runs the all-layers matrix")
    add_engine_args(p)
    args = p.parse_args(argv)
    if args.runs is not None:
        if args.source or args.target:
            raise UserError("give either --source and --target, or --runs, not both")
        if len(args.runs) < 2:
            raise UserError("--runs needs at least two runs")
        if len(set(args.runs)) != len(args.runs):
            raise UserError(f"--runs lists a run twice: {' '.join(args.runs)}")
    elif not (args.source and args.target):
        raise UserError("give --source A --target B, or --runs A B ...")
    check_output(args.json, "--json")
    check_output(args.plot, "--plot")
    engine = engine_from_args(args)

    if args.runs is None:
        res = wmppc(*open_runs(args.root, [args.source, args.target]), engine)
        print(f"All Layers : {res.all_layers:.4f} | Last layer : {res.last_layer:.4f}")
        out = {"source": res.source, "target": res.target, "codes": res.codes, "all_layers": res.all_layers,
               "last_layer": res.last_layer, "layer_matrix": res.layer_matrix.tolist(),
               "source_layers": res.source_layers, "target_layers": res.target_layers}
        if args.plot:
            plot_heatmap(res.layer_matrix, [str(a) for a in res.source_layers], [str(b) for b in res.target_layers],
                         f"{res.source} layer", f"{res.target} layer",
                         f"wMPPC {res.source} -> {res.target} ({res.codes} codes)", args.plot)
    else:
        runs = open_runs(args.root, args.runs)
        all_rr, last_rr = wmppc_table(runs, engine)
        print(_fmt_table("All layers (row -> column)", args.runs, all_rr))
        print(_fmt_table("\nLast layer (row -> column)", args.runs, last_rr))
        out = {"runs": args.runs, "codes": engine.codes, "all_layers": _nan_to_none(all_rr),
               "last_layer": _nan_to_none(last_rr)}
        if args.plot:
            plot_heatmap(all_rr, args.runs, args.runs, "source", "target",
                         f"wMPPC, all layers ({engine.codes} codes)", args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
