"""Classic measures of representational similarity between the pooled activations of two runs
(docs/design.md#calibration), beside wMPPC: linear CKA, debiased CKA, SVCCA and mutual k-nearest neighbours.

    uv run similarity.py --source effnet --target minilm          # last layer pair, with its floor
    uv run similarity.py --runs effnet minilm null --json sim.json --plot sim.png

Everything streams over samples: CKA and SVCCA from D x D cross-products in float64 (never N x N),
mutual kNN from [chunk, chunk] similarity blocks merged into a running top-k. The floor of every
measure is the same measure against B's samples permuted (no retraining); the ceiling is 1
(identical representations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from errors import UserError, check_positive, cli
from saeshare.core import distributed
from saeshare.core.options import OutputOptions, parse
from saeshare.disk.cache import PairKey, pair_cache
from saeshare.disk.results import MEASURES, MeasureValues, Similarity, SimilarityTable
from saeshare.disk.runs import PairOptions, Run, StreamOptions, open_runs
from saeshare.engine.measures import SideStats, cka, cka_debiased, cross_gram, knn, mutual_knn, side_stats, svcca
from saeshare.render.figures import format_table, pyplot, save


# ---- over runs ---------------------------------------------------------------------------------------
class SimilarityEngine:
    """Computes the measures per layer pair, keeping each layer's statistics in memory for the pairs
    that use it, and caching each pair's values under <root>/.cache/."""

    def __init__(self, chunk_size: int = 4096, k: int = 10, variance: float = 0.99, use_cache: bool = True,
                 device: torch.device | str = "cpu"):
        self.chunk_size, self.k, self.variance, self.use_cache = chunk_size, k, variance, use_cache
        self.device = torch.device(device)
        self._sides: dict[tuple[str, int], SideStats] = {}
        self._knn: dict[tuple[str, int], torch.Tensor] = {}

    def _chunks(self, run: Run, layer: int) -> Callable[[], Iterator[torch.Tensor]]:
        return lambda: (run.read_acts(layer, slice(s, s + self.chunk_size), self.device).double()
                        for s in range(0, run.n_samples, self.chunk_size))

    def _side(self, run: Run, layer: int) -> SideStats:
        if (run.key, layer) not in self._sides:
            side = side_stats(self._chunks(run, layer), run.n_samples)
            if not float(side.gram_DD.abs().max()) > 0:  # every measure would divide by 0
                raise UserError(f"run {run.name!r} layer {layer}: the activations do not vary over the samples; "
                                "no similarity measure is defined")
            self._sides[run.key, layer] = side
        return self._sides[run.key, layer]

    def _knn_of(self, run: Run, layer: int) -> torch.Tensor:
        if (run.key, layer) not in self._knn:
            self._knn[run.key, layer] = knn(self._chunks(run, layer), run.n_samples, self.k)
        return self._knn[run.key, layer]

    def pair(self, run_a: Run, run_b: Run, a: int, b: int) -> dict[str, float]:
        """The four measures of layer a of A against layer b of B."""
        cache = pair_cache(run_a, run_b, self.use_cache)
        key = PairKey(run_a.key, run_b.key, a, b, f"similarity-k{self.k}-v{self.variance:g}")
        hit = cache.load(key, {m: () for m in MEASURES})
        if hit is not None:
            return {m: float(v) for m, v in hit.items()}
        sx, sy = self._side(run_a, a), self._side(run_b, b)
        xty = cross_gram(self._chunks(run_a, a)(), self._chunks(run_b, b)(), sx, sy)
        out = {"cka": cka(sx, sy, xty), "cka_debiased": cka_debiased(sx, sy, xty),
               "svcca": svcca(sx, sy, xty, self.variance),
               "mknn": mutual_knn(self._knn_of(run_a, a), self._knn_of(run_b, b))}
        cache.save(key, {m: np.array(v) for m, v in out.items()})
        return out

    def prefill(self, jobs: list[tuple[Run, Run, int, int]]) -> None:
        """Under torchrun: each rank computes and caches its share of the (A, B, a, b) pairs, and waits for the
        others, so that every rank then reads them all from the cache."""
        if distributed.world_size() == 1:
            return
        if not self.use_cache:
            raise UserError("several processes (torchrun) share their results through the cache: drop --no_cache")
        cost = [ra.n_samples * (ra.acts(a).shape[1] * rb.acts(b).shape[1] + ra.n_samples) for ra, rb, a, b in jobs]
        for i in distributed.share(cost):
            self.pair(*jobs[i])
        distributed.barrier()

    def compare(self, run_a: Run, run_b: Run) -> Similarity:
        la, lb = run_a.layers, run_b.layers
        self.prefill([(run_a, run_b, a, b) for a in la for b in lb] + [(run_a, run_b.permuted(), la[-1], lb[-1])])
        values = {(a, b): self.pair(run_a, run_b, a, b) for a in la for b in lb}
        floor = self.pair(run_a, run_b.permuted(), la[-1], lb[-1])
        measures = {m: MeasureValues(values[la[-1], lb[-1]][m], np.array([[values[a, b][m] for b in lb] for a in la]))
                    for m in MEASURES}
        return Similarity(run_a.name, run_b.name, la, lb, measures, floor)


def similarity_table(runs: list[Run], engine: SimilarityEngine) -> SimilarityTable:
    r = len(runs)
    engine.prefill([(a, c, a.layers[-1], c.layers[-1]) for a in runs for b in runs if a is not b
                    for c in (b, b.permuted())])
    values = {m: np.full((r, r), np.nan) for m in MEASURES}
    floor = {m: np.full((r, r), np.nan) for m in MEASURES}
    for i, a in enumerate(runs):
        for j, b in enumerate(runs):
            if i != j:
                got = engine.pair(a, b, a.layers[-1], b.layers[-1])
                null = engine.pair(a, b.permuted(), a.layers[-1], b.layers[-1])
                for m in MEASURES:
                    values[m][i, j], floor[m][i, j] = got[m], null[m]
    return SimilarityTable([x.name for x in runs], values, floor)


# ---- command line ------------------------------------------------------------------------------------
@dataclass
class SimilarityArgs(PairOptions, OutputOptions, StreamOptions):
    k: int = 10
    """Neighbours of mutual kNN."""
    variance: float = 0.99
    """Share of the variance the principal components of SVCCA keep."""
    no_cache: bool = False
    """Neither read nor write <root>/.cache/."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("k", self.k)
        if not 0 < self.variance <= 1:
            raise UserError(f"--variance must be in (0, 1], got {self.variance}")


@cli
def main(argv=None):
    args = parse(SimilarityArgs, argv, "Classic similarity measures between runs: CKA, debiased CKA, SVCCA, "
                                       "mutual kNN")
    distributed.init(args.torch_device)
    engine = SimilarityEngine(args.chunk_size, args.k, args.variance, not args.no_cache, args.torch_device)
    names = args.names
    runs = open_runs(args.root, names, features=False)
    if runs[0].n_samples <= max(args.k, 3):
        raise UserError(f"{runs[0].n_samples} samples: the measures need more than max(--k, 3) = {max(args.k, 3)}")
    if args.runs is None:
        res = engine.compare(*runs)
        print(" | ".join(f"{m} {res.measures[m].last_layer:.4f} (floor {res.floor[m]:.4f})" for m in MEASURES))
        if args.plot:
            _plot_grid([(m, res.measures[m].layer_matrix, [str(a) for a in res.source_layers],
                         [str(b) for b in res.target_layers]) for m in MEASURES],
                       f"{res.source} -> {res.target}", args.plot)
    else:
        res = similarity_table(runs, engine)
        for m in MEASURES:
            print(format_table(f"{m}, last layers (row -> column)", names, res.measures[m]))
        if args.plot:
            _plot_grid([(m, res.measures[m], names, names) for m in MEASURES], "last layers", args.plot)
    args.write(res)


def _plot_grid(panels: list[tuple[str, np.ndarray, list[str], list[str]]], title: str, path: str) -> None:
    """One heatmap per measure, side by side in one PNG."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False, layout="constrained")
    for ax, (name, values, rows, cols) in zip(axes[0], panels):
        im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_title(name)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title)
    save(fig, path, 120)


if __name__ == "__main__":
    main()
