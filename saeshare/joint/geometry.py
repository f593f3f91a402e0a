"""Do matched features sit alike in their two spaces? (Lan et al. 2024): features paired by activation
correlation (wMPPC's best matches), then SVCCA and RSA between the paired decoder rows, against the same
with the pairing shuffled."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from saeshare.disk.cache import PairStats
from saeshare.disk.results import GeometryScores
from saeshare.engine.measures import principal_components, side_stats

SHUFFLES = 100
"""Shuffled pairings behind each null and p-value."""
RSA_MAX = 1024
"""RSA compares P x P similarity matrices: above this many pairs, a fixed random subset of them."""


class Paired(NamedTuple):
    a: np.ndarray
    """[P] features of A."""
    b: np.ndarray
    """[P] their matches in B."""


def paired(stats: PairStats, min_rho: float = 0.0, one_to_one: bool = False) -> Paired:
    """A's firing features with their best match in B, kept where rho >= min_rho; `one_to_one`: a feature of B
    matched by several of A keeps only its best-correlated one."""
    a = np.flatnonzero((stats.mass_F > 0) & (stats.rho_F >= min_rho))
    if one_to_one:
        a = a[np.argsort(-stats.rho_F[a], kind="stable")]
        _, first = np.unique(stats.match_F[a], return_index=True)
        a = np.sort(a[first])
    return Paired(a, stats.match_F[a])


def _whitened(rows_PD: np.ndarray, variance: float = 0.99) -> torch.Tensor:
    """The centred rows in the whitened basis of their principal components explaining `variance` (as the
    project's SVCCA keeps them): SVCCA is then the mean singular value of x_w^T y_w, and shuffling the rows of
    one side changes only that product."""
    x = torch.as_tensor(rows_PD, dtype=torch.float64)
    stats = side_stats(lambda: iter([x]), len(x))
    val, vec = principal_components(stats.gram_DD, variance)
    return (x - stats.mean_D) @ vec / val.sqrt()


def _svcca(xw: torch.Tensor, yw: torch.Tensor) -> float:
    return float(torch.linalg.svdvals(xw.T @ yw).clamp(max=1).mean())


def _cosines(rows_PD: np.ndarray) -> np.ndarray:
    unit = rows_PD / np.maximum(np.linalg.norm(rows_PD, axis=1, keepdims=True), 1e-300)
    return unit @ unit.T


def _pearson(u: np.ndarray, v: np.ndarray) -> float:
    u, v = u - u.mean(), v - v.mean()
    denom = np.sqrt((u @ u) * (v @ v))
    return float(u @ v / denom) if denom > 0 else 0.0


def geometry(W_dec_a: np.ndarray, W_dec_b: np.ndarray, pairs: Paired, layers: tuple[int, int] = (0, 0),
             shuffles: int = SHUFFLES, seed: int = 0) -> GeometryScores:
    """SVCCA and RSA of the paired decoder rows (of `layers`), each with its shuffled-pairing null."""
    x, y = np.asarray(W_dec_a, np.float64)[pairs.a], np.asarray(W_dec_b, np.float64)[pairs.b]
    p = len(x)
    if p < 3:
        return GeometryScores(*layers, p, *(float("nan"),) * 6)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(p) for _ in range(shuffles)]
    sub = np.sort(rng.choice(p, RSA_MAX, replace=False)) if p > RSA_MAX else np.arange(p)
    cx, cy = _cosines(x[sub]), _cosines(y[sub])
    upper = np.triu_indices(len(sub), 1)
    cx_u = cx[upper]

    def rsa_of(order: np.ndarray) -> float:
        return _pearson(cx_u, cy[np.ix_(order, order)][upper])

    xw, yw = _whitened(x), _whitened(y)
    svcca, rsa = _svcca(xw, yw), rsa_of(np.arange(len(sub)))
    null_svcca = np.array([_svcca(xw, yw[torch.as_tensor(perm)]) for perm in perms])
    null_rsa = np.array([rsa_of(rng.permutation(len(sub))) for _ in perms])

    def p_value(null: np.ndarray, value: float) -> float:
        return float((1 + (null >= value).sum()) / (1 + len(null)))

    return GeometryScores(*layers, p, svcca, float(null_svcca.mean()), p_value(null_svcca, svcca), rsa,
                          float(null_rsa.mean()), p_value(null_rsa, rsa))
