"""The classic similarity measures (linear CKA, debiased CKA, SVCCA, mutual kNN) from statistics streamed over
samples: D x D float64 cross-products, never N x N (similarity.py runs them over runs; wmppc.py --geometry
reuses SVCCA's principal components)."""
from __future__ import annotations

from typing import Callable, Iterator, NamedTuple

import numpy as np
import torch

from saeshare.core.streaming import merge_top


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
