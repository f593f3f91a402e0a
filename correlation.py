"""The correlation engine shared by wMPPC (SPEC §6) and Comparative Sharedness (§7).

For runs A and B over the same samples and a layer pair (a, b), every feature i of layer a of A gets
`rho_i = max_j corr(f_i^A, f_j^B)` (signed maximum of the Pearson correlation over the samples; a
feature that is constant over the samples has correlation 0 with everything), the argmax j and its
activation mass `S_i = sum_n f_i^A(n)`. Features are computed on the fly from the stored activations
and SAE weights, a chunk of samples at a time, so memory is bounded whatever N and F. Results are
cached per (run_id A, run_id B, a, b, codes) under `<root>/.cache/`; a rewritten run gets a new
run_id, so its stale entries are simply never read again.

Two paths give the same numbers (to ~1e-6):
- dense (`relu` codes; also accepts `topk`): blocked float32 matrix products of centred codes;
- sparse (`topk` codes): only the k active codes of each sample, cost ~N*k*k per layer pair.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from errors import UserError, resolve_device
from runs import CODES, DEFAULT_ROOT, Run, check_comparable
from sae import TopKSAE

CACHE_VERSION = 1
"""Bump when the numbers the engine returns change meaning; old cache files are then ignored."""
DEFAULT_CHUNK = 2048
DEFAULT_MEM_GB = 1.0
_SPARSE_BLOCK = 1 << 16
"""Products generated per scatter-add in the sparse path (~1.5 MiB of keys and values: stays in cache)."""


class PairStats(NamedTuple):
    rho_F: np.ndarray
    """[F_A] float64: max_j corr(f_i^A, f_j^B), in [-1, 1]; 0 for a constant feature."""
    match_F: np.ndarray
    """[F_A] int64: the feature j of B reaching the maximum."""
    mass_F: np.ndarray
    """[F_A] float64: S_i = sum_n f_i^A(n)."""


class Moments(NamedTuple):
    """What the correlation needs of one layer's features, from one pass over the samples."""
    mean_F: torch.Tensor
    """[F] float64."""
    inv_F: torch.Tensor
    """[F] float64: 1 / (sqrt(N) * std), 0 for a constant feature, so that corr = centred X^T Y * inv * inv."""
    mass_F: torch.Tensor
    """[F] float64: sum over samples."""


class Unit(NamedTuple):
    """Features start..stop of one layer: the dense path splits layers to fit its memory budget."""
    layer: int
    start: int
    stop: int


def open_runs(root: str | Path, names: Iterable[str]) -> list[Run]:
    """Open complete runs over the same samples (one clear UserError otherwise)."""
    runs = [Run.open(root, name) for name in names]
    check_comparable(runs)
    return runs


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The flags every analysis command shares."""
    p.add_argument("--root", default=DEFAULT_ROOT, help="folder holding the runs (default: %(default)s)")
    p.add_argument("--codes", default="relu", help="relu: dense ReLU pre-activations (paper's code); topk: the SAE's top-k codes")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK, help="samples per chunk (default: %(default)s)")
    p.add_argument("--mem_gb", type=float, default=DEFAULT_MEM_GB,
                   help="memory for correlation accumulators, GiB (default: %(default)s)")
    p.add_argument("--no_cache", action="store_true", help="neither read nor write <root>/.cache/")


def check_output(path: str | None, flag: str) -> None:
    """Fail before the computation, not after it, when an output file cannot be written."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise UserError(f"{flag} {path}: folder {str(Path(path).resolve().parent)!r} does not exist")


def engine_from_args(args: argparse.Namespace) -> "Correlator":
    return Correlator(codes=args.codes, device=args.device, chunk_size=args.chunk_size,
                      mem_bytes=int(args.mem_gb * 2**30), cache=not args.no_cache)


def _codes_into(out_Nf: torch.Tensor, sae: TopKSAE, x_ND: torch.Tensor, codes: str, cols: slice) -> torch.Tensor:
    """Write the dense codes of features `cols` into out [n, f] (a reused buffer: fresh large
    allocations cost page faults every chunk)."""
    if codes == "relu":
        return torch.mm(x_ND - sae.b_dec, sae.W_enc[:, cols], out=out_Nf).relu_()
    top = sae.encode(x_ND)
    dense = torch.zeros(x_ND.shape[0], sae.n_features, device=x_ND.device)
    return out_Nf.copy_(dense.scatter_(1, top.top_indices, top.top_acts)[:, cols])


def _moments(mean_F: torch.Tensor, var_F: torch.Tensor, mass_F: torch.Tensor, constant_F: torch.Tensor,
             n: int) -> Moments:
    # a std below 1e-6 |mean| is below the precision of float32 codes (a d-term float32 dot product):
    # such a feature is constant for our purpose, which also keeps 1/std finite
    constant = constant_F | (var_F <= 1e-12 * mean_F.square())
    inv = torch.where(constant, torch.zeros_like(var_F), 1 / (n * var_F.clamp_min(1e-300)).sqrt())
    return Moments(mean_F, inv, mass_F)


def _align(n: int, up: bool = False) -> int:
    """n rounded to a multiple of 64 (when n > 64): BLAS runs at full speed on rows of a multiple of
    64 floats (measured 172 vs 105 GFLOPS for 14592 vs 14563 columns)."""
    if n <= 64:
        return n
    return -(-n // 64) * 64 if up else n // 64 * 64


def _plan(sizes_a: list[tuple[int, int]], sizes_b: list[tuple[int, int]], cells: int) -> tuple[int, int]:
    """Group capacities (features) for A and B such that a [cap_a, cap_b] accumulator holds at most
    `cells` values, choosing the split that recomputes the fewest codes: every (A group, B group) pass
    computes the codes of both groups again."""
    tot_a, tot_b = sum(n for _, n in sizes_a), sum(n for _, n in sizes_b)
    best = None
    for n_ga in range(1, tot_a + 1):
        cap_a = min(tot_a, _align(-(-tot_a // n_ga), up=True))
        cap_b = min(tot_b, _align(cells // cap_a))
        if cap_b == 0:
            continue
        n_gb = -(-tot_b // cap_b)
        cost = n_gb * tot_a + n_ga * tot_b
        if best is None or cost < best[0]:
            best = (cost, cap_a, cap_b)
        if n_gb == 1:  # more A groups would only cost more
            break
    return best[1], best[2]


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


def _pack(sizes: list[tuple[int, int]], cap: int) -> list[list[Unit]]:
    """Split layers (layer, n_features) into groups of at most `cap` features, cutting layers where needed."""
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


def _offsets(group: list[Unit]) -> list[tuple[Unit, int]]:
    out, off = [], 0
    for u in group:
        out.append((u, off))
        off += u.stop - u.start
    return out


class Correlator:
    """Computes PairStats for layer pairs of two runs, caching them on disk and keeping per-layer
    moments (and, for the sparse path, the top-k codes of the two runs in use) in memory."""

    def __init__(self, codes: str = "relu", device: str = "auto", chunk_size: int = DEFAULT_CHUNK,
                 mem_bytes: int = int(DEFAULT_MEM_GB * 2**30), cache: bool = True, method: str | None = None,
                 progress: bool = True):
        if codes not in CODES:
            raise UserError(f"unknown --codes {codes!r}; choose from {', '.join(CODES)}")
        if chunk_size < 1:
            raise UserError(f"--chunk_size must be positive, got {chunk_size}")
        if mem_bytes < 1:
            raise UserError("--mem_gb must be positive")
        self.method = method or ("sparse" if codes == "topk" else "dense")
        if self.method not in ("dense", "sparse") or (self.method == "sparse" and codes != "topk"):
            raise ValueError(f"method {self.method!r} cannot compute {codes!r} codes")
        self.codes, self.device, self.chunk_size = codes, resolve_device(device), chunk_size
        self.mem_bytes, self.cache, self.progress = mem_bytes, cache, progress
        self._moments: dict[tuple[str, int], Moments] = {}
        self._topk: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._bar: tqdm | None = None

    # ---- public -------------------------------------------------------------------------------------
    def pair_stats(self, run_a: Run, run_b: Run,
                   pairs: Iterable[tuple[int, int]] | None = None) -> dict[tuple[int, int], PairStats]:
        """PairStats of A against B for each (layer a, layer b) in `pairs` (default: every pair)."""
        check_comparable([run_a, run_b])
        if pairs is None:
            pairs = [(a, b) for a in run_a.layers for b in run_b.layers]
        pairs = [(run_a.resolve_layer(a), run_b.resolve_layer(b)) for a, b in pairs]
        found = {p: self._load(run_a, run_b, *p) for p in pairs}
        missing = [p for p, s in found.items() if s is None]
        if missing:
            keep = {run_a.meta.get("run_id"), run_b.meta.get("run_id")}
            self._topk = {k: v for k, v in self._topk.items() if k[0] in keep}
            la = [a for a in run_a.layers if any(p[0] == a for p in missing)]
            lb = [b for b in run_b.layers if any(p[1] == b for p in missing)]
            for p, stats in self._compute(run_a, run_b, la, lb).items():
                self._save(run_a, run_b, *p, stats)
                found[p] = stats
        return {p: found[p] for p in pairs}

    # ---- cache ----------------------------------------------------------------------------------------
    def _cache_path(self, run_a: Run, run_b: Run, a: int, b: int) -> Path | None:
        ida, idb = run_a.meta.get("run_id"), run_b.meta.get("run_id")
        if not (self.cache and ida and idb):
            return None
        return run_a.path.parent / ".cache" / f"corr-v{CACHE_VERSION}-{ida}-{idb}-{a:02d}-{b:02d}-{self.codes}.npz"

    def _load(self, run_a: Run, run_b: Run, a: int, b: int) -> PairStats | None:
        path = self._cache_path(run_a, run_b, a, b)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                stats = PairStats(z["rho_F"], z["match_F"], z["mass_F"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # a damaged cache entry is recomputed and replaced
        n = run_a.n_features(a)
        return stats if all(x.shape == (n,) for x in stats) else None

    def _save(self, run_a: Run, run_b: Run, a: int, b: int, stats: PairStats) -> None:
        path = self._cache_path(run_a, run_b, a, b)
        if path is None:
            return
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(f, **stats._asdict())
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"could not write the correlation cache {path}: {e}")
            tmp.unlink(missing_ok=True)

    # ---- computation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _compute(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]) -> dict[tuple[int, int], PairStats]:
        """PairStats for every pair of la x lb (nothing cached)."""
        for run, layers in ((run_a, la), (run_b, lb)):
            for layer in layers:  # a corrupt file fails now, not an hour into the computation
                run.acts(layer), run.sae(layer)
        # disable=None: a bar on a terminal, nothing in logs
        with tqdm(desc=f"corr {run_a.name}->{run_b.name} ({self.codes})", unit="chunk", total=0,
                  disable=None if self.progress else True, leave=False) as self._bar:
            out = (self._dense if self.method == "dense" else self._sparse)(run_a, run_b, la, lb)
        self._bar = None
        return {p: PairStats(rho.clamp(-1, 1).double().cpu().numpy(), match.cpu().numpy(),
                             self._layer_moments(run_a, p[0]).mass_F.cpu().numpy())
                for p, (rho, match) in out.items()}

    def _chunks(self, n: int) -> range:
        return range(0, n, self.chunk_size)

    def _tick(self, total: int = 0, done: int = 0) -> None:
        if self._bar is not None:
            self._bar.total += total
            self._bar.update(done)

    def _read(self, run: Run, layer: int, start: int) -> torch.Tensor:
        """Rows start..start+chunk of a layer's activations, float32. The file is mapped only for this
        read, so resident memory does not grow with N."""
        rows = np.array(run.acts(layer)[start:start + self.chunk_size], dtype=np.float32)
        return torch.from_numpy(rows).to(self.device)

    def _layer_moments(self, run: Run, layer: int) -> Moments:
        key = (run.meta.get("run_id") or str(run.path), layer)
        if key not in self._moments:
            self._moments[key] = self._sparse_moments(run, layer) if self.method == "sparse" else self._dense_moments(run, layer)
        return self._moments[key]

    # dense path -----------------------------------------------------------------------------------------
    def _dense_moments(self, run: Run, layer: int) -> Moments:
        sae, n = run.sae(layer, self.device), run.n_samples
        chunks = self._chunks(n)
        self._tick(total=len(chunks))
        sum_F, mean_F, m2_F = (torch.zeros(sae.n_features, dtype=torch.float64, device=self.device) for _ in range(3))
        lo_F = torch.full((sae.n_features,), math.inf, device=self.device)
        hi_F = -lo_F
        buf, dev = (torch.empty(min(n, self.chunk_size) * sae.n_features, device=self.device) for _ in range(2))
        seen = 0
        for start in chunks:
            x = self._read(run, layer, start)
            c = _codes_into(buf[:x.shape[0] * sae.n_features].view(x.shape[0], -1), sae, x, self.codes, slice(None))
            # per chunk: float32 sums (torch reduces by cascade, ~1e-7 relative) and the squared deviations
            # from the chunk's own mean, then Chan et al.'s float64 merge: no cancellation, whatever mean/std
            r, s_c = c.shape[0], c.sum(0)
            d = torch.sub(c, s_c / r, out=dev[:c.numel()].view_as(c))
            delta = s_c.double() / r - mean_F
            mean_F += delta * (r / (seen + r))
            m2_F += d.mul_(d).sum(0).double() + delta.square() * (seen * r / (seen + r))
            sum_F += s_c.double()
            seen += r
            lo_F = torch.minimum(lo_F, c.amin(0))
            hi_F = torch.maximum(hi_F, c.amax(0))
            self._tick(done=1)
        return _moments(mean_F, m2_F / n, sum_F, lo_F == hi_F, n)

    def _dense(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]):
        """Blocked products of centred codes. Choice of precision: the means come from a first pass in
        float64, so the chunks are centred before the product and float32 accumulation (BLAS speed,
        half the memory) loses no digits to cancellation; tests check it against float64 to 1e-5.
        Memory: one float32 accumulator of at most mem_bytes, [features of an A group, features of a
        B group], plus one chunk of codes per group; see _plan for the choice of groups."""
        mom_a = {a: self._layer_moments(run_a, a) for a in la}
        mom_b = {b: self._layer_moments(run_b, b) for b in lb}
        sizes_a = [(a, len(mom_a[a].mean_F)) for a in la]
        sizes_b = [(b, len(mom_b[b].mean_F)) for b in lb]
        cap_a, cap_b = _plan(sizes_a, sizes_b, max(1, self.mem_bytes // 4))
        groups_a, groups_b = _pack(sizes_a, cap_a), _pack(sizes_b, cap_b)
        rows = min(run_a.n_samples, self.chunk_size)
        acc, buf_a, buf_b = (torch.empty(size, device=self.device)
                             for size in (cap_a * cap_b, rows * cap_a, rows * cap_b))
        self._tick(total=len(groups_a) * len(groups_b) * len(self._chunks(run_a.n_samples)))
        best = {(a, b): (torch.full((na,), -math.inf, device=self.device),
                         torch.zeros(na, dtype=torch.long, device=self.device))
                for a, na in sizes_a for b, _ in sizes_b}
        for ga in groups_a:
            for gb in groups_b:
                corr = self._centred_cross(acc, run_a, ga, mom_a, buf_a, run_b, gb, mom_b, buf_b)
                corr.mul_(self._group_vec(ga, mom_a, "inv_F")[:, None]).mul_(self._group_vec(gb, mom_b, "inv_F")[None, :])
                for ua, oa in _offsets(ga):
                    for ub, ob in _offsets(gb):
                        val, idx = corr[oa:oa + ua.stop - ua.start, ob:ob + ub.stop - ub.start].max(dim=1)
                        rho, match = best[ua.layer, ub.layer]
                        better = val > rho[ua.start:ua.stop]
                        rho[ua.start:ua.stop] = torch.where(better, val, rho[ua.start:ua.stop])
                        match[ua.start:ua.stop] = torch.where(better, idx + ub.start, match[ua.start:ua.stop])
        return best

    def _group_vec(self, group: list[Unit], moments: dict[int, Moments], field: str) -> torch.Tensor:
        return torch.cat([getattr(moments[u.layer], field)[u.start:u.stop] for u in group]).float()

    def _centred_group_codes(self, buf: torch.Tensor, run: Run, group: list[Unit], start: int,
                             mean_f: torch.Tensor) -> torch.Tensor:
        """[n, features of the group] codes of samples start.., centred, written into buf."""
        xs = {layer: self._read(run, layer, start) for layer in dict.fromkeys(u.layer for u in group)}
        n = next(iter(xs.values())).shape[0]
        out = buf[:n * len(mean_f)].view(n, len(mean_f))
        for u, off in _offsets(group):
            _codes_into(out[:, off:off + u.stop - u.start], run.sae(u.layer, self.device), xs[u.layer], self.codes,
                        slice(u.start, u.stop))
        return out.sub_(mean_f)

    def _centred_cross(self, acc: torch.Tensor, run_a: Run, ga: list[Unit], mom_a: dict[int, Moments],
                       buf_a: torch.Tensor, run_b: Run, gb: list[Unit], mom_b: dict[int, Moments],
                       buf_b: torch.Tensor) -> torch.Tensor:
        """sum_n (x_n - mean_x)^T (y_n - mean_y) over all samples: [features of ga, features of gb]."""
        mean_a, mean_b = self._group_vec(ga, mom_a, "mean_F"), self._group_vec(gb, mom_b, "mean_F")
        acc = acc[:len(mean_a) * len(mean_b)].view(len(mean_a), len(mean_b)).zero_()
        for start in self._chunks(run_a.n_samples):
            acc.addmm_(self._centred_group_codes(buf_a, run_a, ga, start, mean_a).T,
                       self._centred_group_codes(buf_b, run_b, gb, start, mean_b))
            self._tick(done=1)
        return acc

    # sparse path ----------------------------------------------------------------------------------------
    def _topk_codes(self, run: Run, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's top-k codes for all samples: values [N, k] float32, feature ids [N, k] int64
        (N*k*12 bytes: small enough to keep while the other run's layers go by)."""
        key = (run.meta.get("run_id") or str(run.path), layer)
        if key not in self._topk:
            sae, n = run.sae(layer, self.device), run.n_samples
            chunks = self._chunks(n)
            self._tick(total=len(chunks))
            vals = torch.empty(n, sae.top_k, device=self.device)
            idx = torch.empty(n, sae.top_k, dtype=torch.long, device=self.device)
            buf = torch.empty(min(n, self.chunk_size) * sae.n_features, device=self.device)
            for start in chunks:
                x = self._read(run, layer, start)
                pre = _codes_into(buf[:x.shape[0] * sae.n_features].view(x.shape[0], -1), sae, x, "relu", slice(None))
                torch.topk(pre, sae.top_k, dim=-1, sorted=False, out=(vals[start:start + len(x)], idx[start:start + len(x)]))
                self._tick(done=1)
            self._topk[key] = vals, idx
        return self._topk[key]

    def _sparse_moments(self, run: Run, layer: int) -> Moments:
        vals, idx = self._topk_codes(run, layer)
        n_features, n = run.n_features(layer), run.n_samples
        flat_i, flat_v = idx.reshape(-1), vals.reshape(-1).double()
        zeros = torch.zeros(n_features, dtype=torch.float64, device=self.device)
        sum_F = zeros.index_add(0, flat_i, flat_v)
        sq_F = zeros.index_add(0, flat_i, flat_v.square())
        nz = flat_v != 0
        count_F = torch.bincount(flat_i[nz], minlength=n_features)
        lo_F = (zeros + math.inf).scatter_reduce(0, flat_i[nz], flat_v[nz], "amin")
        hi_F = (zeros - math.inf).scatter_reduce(0, flat_i[nz], flat_v[nz], "amax")
        # a feature left out of a sample's top-k is 0 there: constant iff never active, or active
        # on every sample with one value
        constant = (count_F == 0) | ((count_F == n) & (lo_F == hi_F))
        mean_F = sum_F / n
        return _moments(mean_F, sq_F / n - mean_F.square(), sum_F, constant, n)  # float64 sums

    def _sparse(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]):
        """Cross-products from the active codes only (zeros contribute nothing), float64:
        sum_n x_i y_j accumulated Gustavson-style, the entries of A sorted by feature so that the
        scatter-adds of consecutive products land in the same row of the accumulator (cache-friendly);
        then corr_ij = (sum x_i y_j - N mean_i mean_j) * inv_i * inv_j."""
        n = run_a.n_samples
        sizes = [(run_a.n_features(a), run_b.n_features(b)) for a in la for b in lb]
        acc = torch.empty(max(self._sparse_rows(na, nb) * nb for na, nb in sizes), dtype=torch.float64,
                          device=self.device)
        out = {}
        for a in la:
            mom_a = self._layer_moments(run_a, a)
            vals, idx = self._topk_codes(run_a, a)
            if run_a.meta.get("run_id") != run_b.meta.get("run_id"):  # A's layers are needed once each
                self._topk.pop((run_a.meta.get("run_id") or str(run_a.path), a))
            k = idx.shape[1]
            flat_v = vals.reshape(-1)
            keep = flat_v != 0
            feat, order = torch.sort(idx.reshape(-1)[keep], stable=True)
            sample = (torch.arange(n * k, device=self.device)[keep] // k)[order]
            value = flat_v[keep][order].double()
            for b in lb:
                mom_b = self._layer_moments(run_b, b)
                vals_b, idx_b = self._topk_codes(run_b, b)
                self._tick(total=1)
                out[a, b] = self._sparse_pair(acc, feat, sample, value, mom_a, vals_b.double(), idx_b, mom_b, n)
                self._tick(done=1)
        return out

    def _sparse_rows(self, n_a: int, n_b: int) -> int:
        """Features of A per float64 accumulator block [rows, F_B] within the memory budget."""
        return max(1, min(n_a, self.mem_bytes // (8 * n_b)))

    def _sparse_pair(self, acc, feat, sample, value, mom_a: Moments, vals_b, idx_b, mom_b: Moments, n: int):
        n_a, n_b = len(mom_a.mean_F), len(mom_b.mean_F)
        rows = self._sparse_rows(n_a, n_b)
        rho = torch.empty(n_a, dtype=torch.float64, device=self.device)
        match = torch.empty(n_a, dtype=torch.long, device=self.device)
        bounds = torch.searchsorted(feat, torch.arange(0, n_a + rows, rows, device=self.device)).tolist()
        for blk, r0 in enumerate(range(0, n_a, rows)):
            r1 = min(n_a, r0 + rows)
            block = acc[:(r1 - r0) * n_b].zero_()
            lo, hi = bounds[blk], bounds[blk + 1]
            if self.device.type == "cpu":
                with _one_thread_per_op() as threads, ThreadPoolExecutor(threads) as pool:
                    # threads take disjoint runs of features, hence disjoint rows of the block
                    cuts = [lo, *(int(torch.searchsorted(feat, feat[lo + (hi - lo) * t // threads]))
                                  for t in range(1, threads) if hi > lo), hi]
                    list(pool.map(lambda e: self._scatter(block, feat, sample, value, vals_b, idx_b, r0, n_b, *e),
                                  zip(cuts[:-1], cuts[1:])))
            else:
                self._scatter(block, feat, sample, value, vals_b, idx_b, r0, n_b, lo, hi)
            corr = block.view(r1 - r0, n_b)
            corr.addr_(mom_a.mean_F[r0:r1], mom_b.mean_F, alpha=-n)
            corr.mul_(mom_a.inv_F[r0:r1, None]).mul_(mom_b.inv_F[None, :])
            rho[r0:r1], match[r0:r1] = corr.max(dim=1)
        return rho, match

    @staticmethod
    def _scatter(block, feat, sample, value, vals_b, idx_b, r0: int, n_b: int, lo: int, hi: int) -> None:
        """block[(i - r0) * F_B + j] += x_i(n) y_j(n) for the entries lo..hi of A (feature i, sample n)
        and the k active codes j of B on sample n."""
        step = max(1, _SPARSE_BLOCK // idx_b.shape[1])
        for e0 in range(lo, hi, step):
            e = slice(e0, min(e0 + step, hi))
            s = sample[e]
            keys = ((feat[e] - r0) * n_b)[:, None] + idx_b[s]
            block.index_add_(0, keys.reshape(-1), (value[e, None] * vals_b[s]).reshape(-1))
