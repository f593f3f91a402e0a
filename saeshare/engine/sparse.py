"""The sparse path of the correlation engine (`topk` codes), as plain tensor functions: only the k
active codes of each sample enter the cross-products, at cost ~N k^2 per layer pair, in float64."""
from __future__ import annotations

import contextlib
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, NamedTuple

import torch

from sae import TopKSAE
from saeshare.engine.dense import Moments, make_moments

SCATTER_BLOCK = {"cpu": 1 << 16, "cuda": 1 << 22}
"""Products generated per scatter-add: on a CPU ~1.5 MiB of keys and values, which stay in cache; on a GPU
~100 MiB, so that a paper-scale matrix takes ~1e4 times fewer kernel launches (each costs ~10 us)."""


class TopkTable(NamedTuple):
    """A layer's top-k codes for all samples (N*k*12 bytes: small enough to keep)."""
    vals_NK: torch.Tensor
    """float32 activations."""
    idx_NK: torch.Tensor
    """int64 feature ids."""


class Entries(NamedTuple):
    """A's non-zero codes as (feature, sample, value), sorted by feature."""
    feat: torch.Tensor
    sample: torch.Tensor
    value: torch.Tensor
    """float64."""


def topk_table(chunks_nD: Iterable[torch.Tensor], sae: TopKSAE, n: int, scratch: torch.Tensor) -> TopkTable:
    """Top-k codes of all samples from chunks of activations; `scratch` holds one chunk's [rows, F] codes."""
    device = scratch.device
    vals = torch.empty(n, sae.top_k, device=device)
    idx = torch.empty(n, sae.top_k, dtype=torch.long, device=device)
    start = 0
    for x in chunks_nD:
        pre = sae.pre_acts(x, out=scratch[:x.shape[0] * sae.n_features].view(x.shape[0], -1))
        torch.topk(pre, sae.top_k, dim=-1, sorted=False, out=(vals[start:start + len(x)], idx[start:start + len(x)]))
        start += len(x)
    return TopkTable(vals, idx)


def moments(table: TopkTable, n_features: int) -> Moments:
    """Exact float64 moments: a feature left out of a sample's top-k is 0 there."""
    n = table.vals_NK.shape[0]
    flat_i, flat_v = table.idx_NK.reshape(-1), table.vals_NK.reshape(-1).double()
    zeros = torch.zeros(n_features, dtype=torch.float64, device=flat_v.device)
    sum_F = zeros.index_add(0, flat_i, flat_v)
    sq_F = zeros.index_add(0, flat_i, flat_v.square())
    nz = flat_v != 0
    count_F = torch.bincount(flat_i[nz], minlength=n_features)
    lo_F = (zeros + math.inf).scatter_reduce(0, flat_i[nz], flat_v[nz], "amin")
    hi_F = (zeros - math.inf).scatter_reduce(0, flat_i[nz], flat_v[nz], "amax")
    # constant iff never active, or active on every sample with one value
    constant = (count_F == 0) | ((count_F == n) & (lo_F == hi_F))
    mean_F = sum_F / n
    return make_moments(mean_F, n * (sq_F / n - mean_F.square()), sum_F, constant, n)


def entries(table: TopkTable) -> Entries:
    """Sorted by feature, so that consecutive products land in the same row of the accumulator."""
    n, k = table.idx_NK.shape
    flat_v = table.vals_NK.reshape(-1)
    keep = flat_v != 0
    feat, order = torch.sort(table.idx_NK.reshape(-1)[keep], stable=True)
    sample = (torch.arange(n * k, device=flat_v.device)[keep] // k)[order]
    return Entries(feat, sample, flat_v[keep][order].double())


def block_rows(n_a: int, n_b: int, mem_bytes: int) -> int:
    """Features of A per float64 accumulator block [rows, F_B] within the memory budget."""
    return max(1, min(n_a, mem_bytes // (8 * n_b)))


@contextlib.contextmanager
def _one_thread_per_op():
    """For loops of many small CPU ops: with several OpenMP threads every op ends at a barrier, which
    costs a whole scheduler time slice whenever another process holds a core (measured 10-30x slower
    on a shared 2-core machine). Single-threaded ops run by independent Python threads instead (torch
    releases the GIL) use every core and never wait for one another."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield n
    finally:
        torch.set_num_threads(n)


def pair(acc: torch.Tensor, ent: Entries, mom_a: Moments, table_b: TopkTable, mom_b: Moments,
         mem_bytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho [F_A], match [F_A]) of A against B: sum_n x_i y_j accumulated Gustavson-style in blocks of
    A's features, then corr_ij = (sum x_i y_j - N mean_i mean_j) * inv_i * inv_j."""
    n, device = table_b.idx_NK.shape[0], acc.device
    vals_b = table_b.vals_NK.double()
    n_a, n_b = len(mom_a.mean_F), len(mom_b.mean_F)
    rows = block_rows(n_a, n_b, mem_bytes)
    rho = torch.empty(n_a, dtype=torch.float64, device=device)
    match = torch.empty(n_a, dtype=torch.long, device=device)
    bounds = torch.searchsorted(ent.feat, torch.arange(0, n_a + rows, rows, device=device)).tolist()
    for blk, r0 in enumerate(range(0, n_a, rows)):
        r1 = min(n_a, r0 + rows)
        block = acc[:(r1 - r0) * n_b].zero_()
        lo, hi = bounds[blk], bounds[blk + 1]
        scatter = lambda e: _scatter(block, ent, vals_b, table_b.idx_NK, r0, n_b, *e)  # noqa: E731
        if device.type == "cpu":
            with _one_thread_per_op() as threads, ThreadPoolExecutor(threads) as pool:
                # threads take disjoint runs of features, hence disjoint rows of the block
                cuts = [lo, *(int(torch.searchsorted(ent.feat, ent.feat[lo + (hi - lo) * t // threads]))
                              for t in range(1, threads) if hi > lo), hi]
                list(pool.map(scatter, zip(cuts[:-1], cuts[1:])))
        else:
            scatter((lo, hi))
        corr = block.view(r1 - r0, n_b)
        corr.addr_(mom_a.mean_F[r0:r1], mom_b.mean_F, alpha=-n)
        corr.mul_(mom_a.inv_F[r0:r1, None]).mul_(mom_b.inv_F[None, :])
        rho[r0:r1], match[r0:r1] = corr.max(dim=1)
    return rho, match


def _scatter(block, ent: Entries, vals_b, idx_b, r0: int, n_b: int, lo: int, hi: int) -> None:
    """block[(i - r0) * F_B + j] += x_i(n) y_j(n) for the entries lo..hi of A (feature i, sample n)
    and the k active codes j of B on sample n."""
    step = max(1, SCATTER_BLOCK.get(block.device.type, SCATTER_BLOCK["cuda"]) // idx_b.shape[1])
    for e0 in range(lo, hi, step):
        e = slice(e0, min(e0 + step, hi))
        s = ent.sample[e]
        keys = ((ent.feat[e] - r0) * n_b)[:, None] + idx_b[s]
        block.index_add_(0, keys.reshape(-1), (ent.value[e, None] * vals_b[s]).reshape(-1))
