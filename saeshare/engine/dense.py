"""The dense path of the correlation engine, as plain tensor functions: feature moments from chunks
of codes, the planner that splits layers into groups within a memory budget, the blocked products of
centred codes, and the running per-feature maximum."""
from __future__ import annotations

import math
from typing import Iterable, NamedTuple

import numpy as np
import torch

from sae import TopKSAE


class Moments(NamedTuple):
    """What the correlation needs of one layer's features, from one pass over the samples."""
    mean_F: torch.Tensor
    """[F] float64."""
    inv_F: torch.Tensor
    """[F] float64: 1 / (sqrt(N) * std), 0 for a constant feature, so that corr = centred X^T Y * inv * inv."""
    mass_F: torch.Tensor
    """[F] float64: sum over samples."""


class LayerSize(NamedTuple):
    layer: int
    n_features: int


class Plan(NamedTuple):
    """Group capacities, in features: the accumulator is [cap_a, cap_b]."""
    cap_a: int
    cap_b: int


class Unit(NamedTuple):
    """Features start..stop of one layer: the dense path splits layers to fit its memory budget."""
    layer: int
    start: int
    stop: int


def make_moments(mean_F: torch.Tensor, m2_F: torch.Tensor, mass_F: torch.Tensor, constant_F: torch.Tensor,
                 n: int | torch.Tensor) -> Moments:
    """From the sum of squared deviations m2 = n * variance (tensors of any shape, n broadcast)."""
    # a std below 1e-6 |mean| is below the precision of float32 codes (a d-term float32 dot product):
    # such a feature is constant for our purpose, which also keeps 1/std finite
    constant = constant_F | (m2_F <= 1e-12 * n * mean_F.square())
    inv = torch.where(constant, torch.zeros_like(m2_F), 1 / m2_F.clamp_min(1e-300).sqrt())
    return Moments(mean_F, inv, mass_F)


def codes_into(out_nf: torch.Tensor | None, sae: TopKSAE, x_nD: torch.Tensor, codes: str,
               cols: slice | torch.Tensor) -> torch.Tensor:
    """Write the dense codes of features `cols` (a slice or an index tensor) into out [n, f] (a reused buffer:
    fresh large allocations cost page faults every chunk), or into a new tensor when out is None."""
    if codes == "relu":
        return sae.pre_acts(x_nD, cols, out_nf)
    dense = sae.encode(x_nD).dense(sae.n_features)[:, cols]
    return dense if out_nf is None else out_nf.copy_(dense)


class BlockSums(NamedTuple):
    """Per jackknife block j (contiguous samples): what leave-one-block-out moments are made of."""
    count_J: torch.Tensor
    """[J] float64."""
    mean_JF: torch.Tensor
    """[J, F] float64: the block's mean."""
    m2_JF: torch.Tensor
    """[J, F] float64: squared deviations from the block's mean."""
    sum_JF: torch.Tensor
    """[J, F] float64."""


def moments(chunks: Iterable[tuple[int, torch.Tensor]], n_features: int, n_blocks: int,
            scratch: torch.Tensor) -> tuple[Moments, BlockSums]:
    """Moments of a layer's features from (block, codes [rows, F] float32 or float64) chunks, in one pass;
    `scratch` holds at least one chunk (reused: no fresh allocation per chunk)."""
    device = scratch.device
    count_J = torch.zeros(n_blocks, dtype=torch.float64, device=device)
    sum_JF, mean_JF, m2_JF = (torch.zeros(n_blocks, n_features, dtype=torch.float64, device=device) for _ in range(3))
    lo_F = torch.full((n_features,), math.inf, dtype=scratch.dtype, device=device)
    hi_F = -lo_F
    for j, c in chunks:
        # per chunk: sums (torch reduces by cascade, ~1e-7 relative in float32) and the squared deviations
        # from the chunk's own mean, then Chan et al.'s float64 merge: no cancellation, whatever mean/std
        r, s_c, seen = c.shape[0], c.sum(0), float(count_J[j])
        delta = s_c.double() / r - mean_JF[j]
        mean_JF[j] += delta * (r / (seen + r))
        d = torch.sub(c, s_c / r, out=scratch[:c.numel()].view_as(c))
        m2_JF[j] += d.mul_(d).sum(0).double() + delta.square() * (seen * r / (seen + r))
        sum_JF[j] += s_c.double()
        count_J[j] += r
        lo_F = torch.minimum(lo_F, c.amin(0))
        hi_F = torch.maximum(hi_F, c.amax(0))
    blocks = BlockSums(count_J, mean_JF, m2_JF, sum_JF)
    n = count_J.sum()
    mean_F = sum_JF.sum(0) / n
    m2_F = (m2_JF + count_J[:, None] * (mean_JF - mean_F).square()).sum(0)
    return make_moments(mean_F, m2_F, sum_JF.sum(0), lo_F == hi_F, n), blocks


def leave_one_out(blocks: BlockSums, constant_F: torch.Tensor) -> Moments:
    """[J, F] moments of the samples outside each block j (mass included): Chan's merge of the others."""
    count_J = blocks.count_J.sum() - blocks.count_J
    mass_JF = blocks.sum_JF.sum(0) - blocks.sum_JF
    mean_JF = mass_JF / count_J[:, None]
    m2_JF = torch.stack([sum(blocks.m2_JF[b] + blocks.count_J[b] * (blocks.mean_JF[b] - mean_JF[j]).square()
                             for b in range(len(count_J)) if b != j) for j in range(len(count_J))])
    return make_moments(mean_JF, m2_JF, mass_JF, constant_F, count_J[:, None])


def _align(n: int, up: bool = False) -> int:
    """n rounded to a multiple of 64 (when n > 64): BLAS runs at full speed on rows of a multiple of
    64 floats (measured 172 vs 105 GFLOPS for 14592 vs 14563 columns)."""
    if n <= 64:
        return n
    return -(-n // 64) * 64 if up else n // 64 * 64


def plan(sizes_a: list[LayerSize], sizes_b: list[LayerSize], cells: int) -> Plan:
    """Group capacities for A and B such that a [cap_a, cap_b] accumulator holds at most `cells`
    values, choosing the split that recomputes the fewest codes: every (A group, B group) pass
    computes the codes of both groups again."""
    tot_a, tot_b = sum(s.n_features for s in sizes_a), sum(s.n_features for s in sizes_b)
    best = None
    for n_ga in range(1, tot_a + 1):
        cap_a = min(tot_a, _align(-(-tot_a // n_ga), up=True))
        cap_b = min(tot_b, _align(cells // cap_a))
        if cap_b == 0:
            continue
        n_gb = -(-tot_b // cap_b)
        cost = n_gb * tot_a + n_ga * tot_b
        if best is None or cost < best[0]:
            best = (cost, Plan(cap_a, cap_b))
        if n_gb == 1:  # more A groups would only cost more
            break
    return best[1]


def pack(sizes: list[LayerSize], cap: int) -> list[list[Unit]]:
    """Split layers into groups of at most `cap` features, cutting layers where needed."""
    groups: list[list[Unit]] = [[]]
    room = cap
    for layer, n in sizes:
        start = 0
        while start < n:
            if room == 0:
                groups.append([])
                room = cap
            stop = min(n, start + room)
            groups[-1].append(Unit(layer, start, stop))
            room -= stop - start
            start = stop
    return groups


def offsets(group: list[Unit]) -> list[tuple[Unit, int]]:
    """Each unit of a group with its first column in the group's codes."""
    out, off = [], 0
    for u in group:
        out.append((u, off))
        off += u.stop - u.start
    return out


UNIT_ROUNDOFF = {"fp32": 0.0, "tf32": 2.0**-11, "bf16": 2.0**-8}
"""Relative rounding of a code to each precision's inputs (fp32 is the reference itself)."""


def product_error(precision: str) -> float:
    """A bound on |approximate - fp32| of a correlation whose products take inputs rounded to `precision`,
    accumulated in float32: each input carries a relative error u, so a product 2u + u^2, and (bf16) the
    chunk product is rounded to bf16 again (u); summed over samples this is at most that factor times
    sum |a||b| <= ||a|| ||b|| (Cauchy-Schwarz), i.e. that factor once normalised. The float32 accumulation both
    paths share is left out (the fp32 path has it too)."""
    u = UNIT_ROUNDOFF[precision]
    return 2 * u + u * u + (u if precision == "bf16" else 0.0)


def cross(acc_Jab: torch.Tensor, centred_chunks: Iterable[tuple[int, torch.Tensor, torch.Tensor]],
          precision: str = "fp32") -> torch.Tensor:
    """acc[j] = sum over the chunks of block j of A_n^T B_n for centred codes A_n [n, a], B_n [n, b].
    Choice of precision: the means come from a first pass in float64, so the chunks are centred
    before the product and float32 accumulation (BLAS speed, half the memory) loses no digits to
    cancellation. Each block's products are accumulated once, into its own block. tf32 / bf16: the products
    on tensor cores (float32 accumulation inside each product), to be re-checked (Recheck)."""
    acc_Jab.zero_()
    cuda = torch.backends.cuda.matmul
    saved = cuda.allow_tf32, cuda.allow_bf16_reduced_precision_reduction
    cuda.allow_tf32, cuda.allow_bf16_reduced_precision_reduction = precision == "tf32", False
    try:
        for j, a_na, b_nb in centred_chunks:
            if precision == "bf16":
                acc_Jab[j].add_(torch.mm(a_na.T.bfloat16(), b_nb.bfloat16()))
            else:
                acc_Jab[j].addmm_(a_na.T, b_nb)
    finally:
        cuda.allow_tf32, cuda.allow_bf16_reduced_precision_reduction = saved
    return acc_Jab


class Recheck:
    """The exact re-check of a lower precision: while the groups of B stream by, every (feature of A, feature
    of B) whose approximate correlation is within twice the error bound of the feature's running best is a
    candidate (a pair outside cannot be the true best); once all of B is seen, candidates are pruned with the
    final best and recomputed exactly, and the best of each feature is the exact best of its candidates (ties:
    the lowest feature of B, as the fp32 path)."""

    def __init__(self, precision: str):
        self.window = 2 * product_error(precision)
        self.cands: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    def collect(self, best, corr: torch.Tensor, group_a: list[Unit], group_b: list[Unit], inv_a: torch.Tensor) -> None:
        """`inv_a` [group a features]: 0 for a constant feature, whose correlations are exactly 0 either way."""
        for ua, oa in offsets(group_a):
            live = inv_a[oa:oa + ua.stop - ua.start] > 0
            for ub, ob in offsets(group_b):
                block = corr[oa:oa + ua.stop - ua.start, ob:ob + ub.stop - ub.start]
                rho = best[ua.layer, ub.layer][0][ua.start:ua.stop]
                i, j = torch.nonzero((block >= (rho - self.window)[:, None]) & live[:, None], as_tuple=True)
                self.cands.setdefault((ua.layer, ub.layer), []).append((i + ua.start, j + ub.start, block[i, j]))

    def resolve(self, best, exact) -> None:
        """Replace the approximate best of the collected features of A by the exact one; `exact({pair: (ia,
        jb)})` gives the correlations of those feature pairs, every pair in one pass over the samples."""
        pruned = {}
        for pair, parts in self.cands.items():
            ia, jb, approx = (torch.cat(x) for x in zip(*parts))
            keep = approx >= best[pair][0][ia] - self.window
            pruned[pair] = ia[keep], jb[keep]
        for pair, corr in exact(pruned).items():
            rho, match = best[pair]
            ia, jb = pruned[pair]
            corr = corr.to(rho.dtype)
            # best per A feature: sort by (feature, -corr, feature of B), keep each feature's first
            order = torch.from_numpy(np.lexsort((jb.cpu().numpy(), -corr.double().cpu().numpy(), ia.cpu().numpy())))
            ia, jb, corr = ia[order], jb[order], corr[order]
            first = torch.ones_like(ia, dtype=torch.bool)
            first[1:] = ia[1:] != ia[:-1]
            rho[ia[first]], match[ia[first]] = corr[first], jb[first]
        self.cands.clear()


def correlations(cov_ab: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor) -> torch.Tensor:
    """In place: centred cross-products -> Pearson correlations."""
    return cov_ab.mul_(inv_a[:, None]).mul_(inv_b[None, :])


def without_block(out_ab: torch.Tensor, total_ab: torch.Tensor, block_ab: torch.Tensor, shift_a: torch.Tensor,
                  shift_b: torch.Tensor, count: float) -> torch.Tensor:
    """Cross-products about their own means of the samples outside a block, from products about the
    global means: (total - block) - count * shift_a shift_b^T, with shift = (that mean - global mean)."""
    torch.sub(total_ab, block_ab, out=out_ab)
    return out_ab.addr_(shift_a.to(out_ab.dtype), shift_b.to(out_ab.dtype), alpha=-count)


def update_best(best: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]], corr: torch.Tensor,
                group_a: list[Unit], group_b: list[Unit]) -> None:
    """Fold a block of correlations [group a features, group b features] into each (layer a, layer b)
    pair's running (rho, match) of A's features."""
    for ua, oa in offsets(group_a):
        for ub, ob in offsets(group_b):
            val, idx = corr[oa:oa + ua.stop - ua.start, ob:ob + ub.stop - ub.start].max(dim=1)
            rho, match = best[ua.layer, ub.layer]
            better = val > rho[ua.start:ua.stop]
            rho[ua.start:ua.stop] = torch.where(better, val, rho[ua.start:ua.stop])
            match[ua.start:ua.stop] = torch.where(better, idx + ub.start, match[ua.start:ua.stop])
