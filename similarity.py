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
from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from errors import UserError, check_positive, cli
from saeshare.core import distributed
from saeshare.core.options import OutputOptions, parse
from saeshare.core.streaming import merge_top
from saeshare.disk.cache import PairKey, pair_cache
from saeshare.disk.results import MEASURES, MeasureValues, Similarity, SimilarityTable
from saeshare.disk.runs import PairOptions, Run, StreamOptions, open_runs
from saeshare.render.figures import format_table, pyplot, save


# ---- the measures, from streamed statistics ----------------------------------------------------------
class SideStats(NamedTuple):
    """One layer's centred statistics, from two passes over its samples (float64)."""
    mean_D: torch.Tensor
    gram_DD: torch.Tensor
    """Xc^T Xc."""
    sqnorm_N: torch.Tensor
    """|xc_n|^2 per sample (the debiased HSIC needs them paired with the other side's)."""


def side_stats(chunks: Callable[[], Iterator[torch.Tensor]], n: int) -> SideStats:
    """`chunks()` yields the layer's rows in order, [rows, D] float64; it is called twice."""
    mean = sum(x.sum(0) for x in chunks()) / n
    gram, sq = 0, []
    for x in chunks():
        xc = x - mean
        gram = gram + xc.T @ xc
        sq.append(xc.square().sum(1))
    return SideStats(mean, gram, torch.cat(sq))


def cross_gram(chunks_x: Iterator[torch.Tensor], chunks_y: Iterator[torch.Tensor], sx: SideStats,
               sy: SideStats) -> torch.Tensor:
    """Xc^T Yc [D_x, D_y] from paired chunks."""
    return sum((x - sx.mean_D).T @ (y - sy.mean_D) for x, y in zip(chunks_x, chunks_y))


def _debiased(xty_sq: float, sq_x: torch.Tensor, sq_y: torch.Tensor, n: int) -> float:
    """The unbiased HSIC estimator (Song et al. 2012) times n(n-3), in feature space (Kornblith et al.)."""
    return float(xty_sq - n / (n - 2) * (sq_x @ sq_y) + sq_x.sum() * sq_y.sum() / ((n - 1) * (n - 2)))


def cka(sx: SideStats, sy: SideStats, xty: torch.Tensor) -> float:
    """Linear CKA, ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    return float(xty.square().sum() / (sx.gram_DD.norm() * sy.gram_DD.norm()))


def cka_debiased(sx: SideStats, sy: SideStats, xty: torch.Tensor) -> float:
    n = len(sx.sqnorm_N)
    hsic = _debiased(float(xty.square().sum()), sx.sqnorm_N, sy.sqnorm_N, n)
    norm_x = _debiased(float(sx.gram_DD.square().sum()), sx.sqnorm_N, sx.sqnorm_N, n)
    norm_y = _debiased(float(sy.gram_DD.square().sum()), sy.sqnorm_N, sy.sqnorm_N, n)
    return hsic / np.sqrt(norm_x * norm_y)


ZERO_VARIANCE = 1e-10
"""A principal component with less than this share of the largest one's variance is numerically zero: it
carries no direction to correlate (dividing by its sqrt would give NaN), so SVCCA drops it."""


def principal_components(gram: torch.Tensor, variance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors) of the fewest principal components explaining `variance`, among those
    of non-zero variance (`variance` 1 keeps them all). Activations that do not vary at all are refused
    before (SimilarityEngine._side)."""
    val, vec = torch.linalg.eigh(gram)
    val, vec = val.flip(0).clamp_min(0), vec.flip(1)
    positive = int((val > val[0] * ZERO_VARIANCE).sum())
    val, vec = val[:positive], vec[:, :positive]
    share = torch.tensor(variance, dtype=val.dtype, device=val.device)
    keep = min(int(torch.searchsorted(val.cumsum(0) / val.sum(), share)) + 1, positive)
    return val[:keep], vec[:, :keep]


def svcca(sx: SideStats, sy: SideStats, xty: torch.Tensor, variance: float = 0.99) -> float:
    """Mean canonical correlation between the principal subspaces (`variance` explained) of each side."""
    lx, ux = principal_components(sx.gram_DD, variance)
    ly, uy = principal_components(sy.gram_DD, variance)
    m = (ux.T @ xty @ uy) / lx.sqrt()[:, None] / ly.sqrt()[None, :]
    return float(torch.linalg.svdvals(m).clamp(max=1).mean())


def knn(chunks: Callable[[], Iterator[torch.Tensor]], n: int, k: int) -> torch.Tensor:
    """[N, k] the k nearest other samples of each sample by inner product of L2-normalised rows,
    from [chunk, chunk] similarity blocks (memory independent of N beyond the [N, k] result)."""
    out = []
    start_q = 0
    for q in chunks():  # float32 products: neighbours, not sums, so no cancellation to fear
        q = torch.nn.functional.normalize(q.float(), dim=1)
        val = torch.full((k, len(q)), -torch.inf, dtype=q.dtype, device=q.device)
        idx = torch.full((k, len(q)), -1, dtype=torch.int64, device=q.device)
        start_k = 0
        for keys in chunks():
            sims = torch.nn.functional.normalize(keys.float(), dim=1) @ q.T  # [keys, queries]
            query = torch.arange(len(q), device=q.device)
            self_pos = query + start_q - start_k  # a sample is not its own neighbour
            inside = (self_pos >= 0) & (self_pos < len(keys))
            sims[self_pos[inside], query[inside]] = -torch.inf
            val, idx = merge_top(val, idx, sims, start_k)
            start_k += len(keys)
        out.append(idx.T)
        start_q += len(q)
    return torch.cat(out)


def mutual_knn(knn_a: torch.Tensor, knn_b: torch.Tensor, chunk: int = 8192) -> float:
    """Mean over samples of |kNN_A(n) ∩ kNN_B(n)| / k."""
    k, hits = knn_a.shape[1], 0
    for s in range(0, len(knn_a), chunk):
        a, b = knn_a[s:s + chunk], knn_b[s:s + chunk]
        hits += int((a[:, :, None] == b[:, None, :]).any(-1).sum())
    return hits / (len(knn_a) * k)


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
