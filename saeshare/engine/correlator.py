"""The correlation engine shared by wMPPC (docs/design.md#wmppc) and Comparative Sharedness
(#comparative-sharedness): two paths, the disk cache's hand-off and torchrun's shares. The numbers come
from the kernels of `dense` and `sparse`, the disk cache from `saeshare.disk.cache`.

For runs A and B over the same samples and a layer pair (a, b), every feature i of layer a of A gets
`rho_i = max_j corr(f_i^A, f_j^B)` (signed maximum of the Pearson correlation over the samples; a
feature that is constant over the samples has correlation 0 with everything), the argmax j and its
activation mass `S_i = sum_n f_i^A(n)`. Features are computed on the fly from the stored activations
and SAE weights, a chunk of samples at a time, so memory is bounded whatever N and F.

Two paths give the same numbers (to ~1e-6):
- dense (`relu` codes; also accepts `topk`): blocked float32 matrix products of centred codes;
- sparse (`topk` codes): only the k active codes of each sample, cost ~N*k*k per layer pair.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Iterator, Literal, NamedTuple

import numpy as np
import torch

from errors import OptionError, UserError
from saeshare.core import distributed
from saeshare.core.progress import progress
from saeshare.disk.cache import PairCache, PairKey, PairStats, pair_cache
from saeshare.disk.runs import Run, check_comparable
from saeshare.engine import dense, sparse
from saeshare.engine.dense import LayerSize, Moments, Unit
from saeshare.engine.options import EngineOptions

JACKKNIFE_BLOCKS = 10
"""Blocks of samples of the delete-one-block jackknife (docs/design.md#calibration)."""
BLOCK_SEED = 0
"""Seed of the permutation that assigns samples to jackknife blocks."""
RECHECK_BATCH = 8192
"""Candidate pairs whose exact products are summed at once (memory: a chunk of samples times this)."""

Progress = Callable[[int, int], None]
"""progress(more_total, done): `more_total` steps were added to the work, `done` were finished."""
Pair = tuple[int, int]
"""(layer of A, layer of B)."""


class LayerMoments(NamedTuple):
    full: Moments
    """[F] over all samples."""
    loo: Moments | None
    """[J, F] without each jackknife block (with --ci)."""
    count_J: torch.Tensor | None
    """[J] samples outside each block."""


def tqdm_progress(desc: str) -> Progress:
    """A progress callback drawing one bar (on a terminal; plain lines in logs)."""
    bar = progress(desc=desc, unit="chunk", total=0, leave=False)

    def step(more_total: int, done: int) -> None:
        bar.total += more_total
        bar.update(done)

    return step


def _no_progress(more_total: int, done: int) -> None:
    pass


def jackknife_blocks(n: int, n_blocks: int = JACKKNIFE_BLOCKS, seed: int = BLOCK_SEED) -> list[np.ndarray]:
    """The samples of each jackknife block, sorted: a seeded permutation of the samples cut in near-equal
    parts. Blocks of stored rows would follow the storage order (a dataset sorted by class makes each
    block one class, and the interval several times too wide); random blocks do not depend on it."""
    perm = np.random.default_rng(seed).permutation(n)
    bounds = [round(j * n / n_blocks) for j in range(n_blocks + 1)]
    return [np.sort(perm[bounds[j]:bounds[j + 1]]) for j in range(n_blocks)]


Rows = slice | np.ndarray


class _Path(ABC):
    """What both paths share: the samples' chunks (cut at jackknife blocks) and a memo of each layer's
    moments. A path computes (rho, match, rho_J) of every feature for every pair of A's and B's layers."""

    def __init__(self, codes: str, n_blocks: int, device: torch.device, chunk_size: int, mem_bytes: int,
                 progress: Progress):
        self.codes, self.n_blocks, self.device, self.chunk_size = codes, n_blocks, device, chunk_size
        self.mem_bytes, self.progress = mem_bytes, progress
        self._moments: dict[tuple[str, int], LayerMoments] = {}
        self._segments_of: dict[int, list[tuple[int, Rows]]] = {}

    def moments(self, run: Run, layer: int) -> LayerMoments:
        if (run.key, layer) not in self._moments:
            self._moments[run.key, layer] = self._compute_moments(run, layer)
        return self._moments[run.key, layer]

    def keep_only(self, keys: tuple[str, ...]) -> None:
        """Free what the path holds of runs other than `keys` (moments are small and stay)."""

    @abstractmethod
    def pairs(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]) -> dict[tuple[int, int], tuple]:
        """{(a, b): (rho [F_a], match [F_a], rho_J [J, F_a] or None)} for every pair of la x lb."""

    @abstractmethod
    def _compute_moments(self, run: Run, layer: int) -> LayerMoments:
        """A layer's moments over the samples (and without each jackknife block)."""

    def _segments(self, n: int) -> list[tuple[int, Rows]]:
        """(block, rows) of every chunk: stored order without the jackknife, else each block's rows in turn
        (a chunk never straddles two blocks). Every pass over a layer reads them: drawn once per N."""
        if n not in self._segments_of:
            self._segments_of[n] = (
                [(0, slice(s, min(s + self.chunk_size, n))) for s in range(0, n, self.chunk_size)]
                if self.n_blocks == 1 else
                [(j, rows[s:s + self.chunk_size]) for j, rows in enumerate(jackknife_blocks(n, self.n_blocks))
                 for s in range(0, len(rows), self.chunk_size)])
        return self._segments_of[n]

    def _acts_chunks(self, run: Run, layer: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(block, activations) chunk by chunk, each chunk counted as one step of progress."""
        segments = self._segments(run.n_samples)
        self.progress(len(segments), 0)
        for j, rows in segments:
            yield j, run.read_acts(layer, rows, self.device)
            self.progress(0, 1)

    def _scratch(self, run: Run, n_features: int) -> torch.Tensor:
        return torch.empty(min(run.n_samples, self.chunk_size) * n_features, device=self.device)


class DensePath(_Path):
    """Blocked float32 products of centred codes, any codes; the jackknife; lower precisions re-checked."""

    def __init__(self, *args, precision: str = "fp32"):
        super().__init__(*args)
        self.precision = precision

    def _compute_moments(self, run: Run, layer: int) -> LayerMoments:
        sae = run.sae(layer, self.device)
        buf = self._scratch(run, sae.n_features)
        chunks = ((j, dense.codes_into(buf[:len(x) * sae.n_features].view(len(x), -1), sae, x, self.codes,
                                            slice(None))) for j, x in self._acts_chunks(run, layer))
        full, blocks = dense.moments(chunks, sae.n_features, self.n_blocks, self._scratch(run, sae.n_features))
        if self.n_blocks == 1:
            return LayerMoments(full, None, None)
        loo = dense.leave_one_out(blocks, full.inv_F == 0)
        return LayerMoments(full, loo, blocks.count_J.sum() - blocks.count_J)

    def pairs(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]):
        """Blocked products of centred codes. Memory: float32 accumulators [features of an A group,
        features of a B group] within mem_bytes (one, or with --ci one per jackknife block plus the
        total and a scratch), plus one chunk of codes per group."""
        mom_a = {a: self.moments(run_a, a) for a in la}
        mom_b = {b: self.moments(run_b, b) for b in lb}
        sizes_a = [LayerSize(a, len(mom_a[a].full.mean_F)) for a in la]
        sizes_b = [LayerSize(b, len(mom_b[b].full.mean_F)) for b in lb]
        n_blocks = self.n_blocks
        slots = 1 if n_blocks == 1 else n_blocks + 2
        cap_a, cap_b = dense.plan(sizes_a, sizes_b, max(1, self.mem_bytes // 4 // slots))
        acc = torch.empty(slots * cap_a * cap_b, device=self.device)
        buf_a, buf_b = self._scratch(run_a, cap_a), self._scratch(run_b, cap_b)
        best = {(a, b): _running_best((na,), self.device) for a, na in sizes_a for b, _ in sizes_b}
        recheck = dense.Recheck(self.precision) if self.precision != "fp32" else None
        best_J = ({p: _running_best((n_blocks, len(v[0])), self.device) for p, v in best.items()}
                  if n_blocks > 1 else None)
        for ga in dense.pack(sizes_a, cap_a):
            for gb in dense.pack(sizes_b, cap_b):
                mean_a, mean_b = _group_vec(ga, mom_a, "mean_F"), _group_vec(gb, mom_b, "mean_F")
                cells = len(mean_a) * len(mean_b)
                blocks = acc[:n_blocks * cells].view(n_blocks, len(mean_a), len(mean_b))
                chunks = ((j, xa, xb) for (j, xa), (_, xb) in zip(self._centred_codes(buf_a, run_a, ga, mean_a),
                                                                  self._centred_codes(buf_b, run_b, gb, mean_b)))
                dense.cross(blocks, chunks, self.precision)
                total = blocks[0] if n_blocks == 1 else _sum_blocks(blocks, acc[n_blocks * cells:(n_blocks + 1) * cells]
                                                                   .view(len(mean_a), len(mean_b)))
                if best_J is not None:
                    self._jackknife(best_J, blocks, total, acc[-cells:].view_as(total), ga, gb, mom_a, mom_b)
                inv_a = _group_vec(ga, mom_a, "inv_F")
                corr = dense.correlations(total, inv_a, _group_vec(gb, mom_b, "inv_F"))
                dense.update_best(best, corr, ga, gb)
                if recheck is not None:
                    recheck.collect(best, corr, ga, gb, inv_a)
            if recheck is not None:
                recheck.resolve(best, self._exact_products(run_a, run_b, mom_a, mom_b))
        return {p: (*best[p], None if best_J is None else best_J[p][0]) for p in best}

    def _exact_products(self, run_a: Run, run_b: Run, mom_a, mom_b):
        """{(layer a, layer b): (features of A, features of B)} -> their Pearson correlations, from fp32 codes
        and float64 sums, in one pass over the samples for every pair (the re-check of a lower precision)."""
        def exact(cands: dict[Pair, tuple[torch.Tensor, torch.Tensor]]) -> dict[Pair, torch.Tensor]:
            la, lb = sorted({a for a, _ in cands}), sorted({b for _, b in cands})
            used_a = {a: torch.unique(torch.cat([ia for (x, _), (ia, _) in cands.items() if x == a])) for a in la}
            used_b = {b: torch.unique(torch.cat([jb for (_, y), (_, jb) in cands.items() if y == b])) for b in lb}
            pos = {p: (torch.searchsorted(used_a[p[0]], ia), torch.searchsorted(used_b[p[1]], jb))
                   for p, (ia, jb) in cands.items()}
            dots = {p: torch.zeros(len(ia), dtype=torch.float64, device=self.device) for p, (ia, _) in cands.items()}
            chunks = [self._acts_chunks(run_a, a) for a in la] + [self._acts_chunks(run_b, b) for b in lb]
            for xs in zip(*chunks):
                code_a = {a: self._centred(run_a, a, x, used_a[a], mom_a) for a, (_, x) in zip(la, xs)}
                code_b = {b: self._centred(run_b, b, x, used_b[b], mom_b) for b, (_, x) in zip(lb, xs[len(la):])}
                for p, (pa, pb) in pos.items():
                    ca, cb = code_a[p[0]], code_b[p[1]]
                    for s in range(0, len(pa), RECHECK_BATCH):
                        sl = slice(s, s + RECHECK_BATCH)
                        dots[p][sl] += (ca[:, pa[sl]] * cb[:, pb[sl]]).sum(0, dtype=torch.float64)
            return {p: dots[p] * mom_a[p[0]].full.inv_F[ia] * mom_b[p[1]].full.inv_F[jb]
                    for p, (ia, jb) in cands.items()}
        return exact

    def _centred(self, run: Run, layer: int, x: torch.Tensor, features: torch.Tensor, moments) -> torch.Tensor:
        """fp32 codes of some features of a layer, centred as the dense path centres them."""
        codes = dense.codes_into(None, run.sae(layer, self.device), x, self.codes, features)
        return codes.sub_(moments[layer].full.mean_F[features].float())

    @staticmethod
    def _jackknife(best_J, blocks, total, scratch, ga: list[Unit], gb: list[Unit], mom_a, mom_b) -> None:
        """Fold each leave-one-block-out correlation block into the running maxima of block j."""
        # the shift of each mean is a small difference of two close numbers: taken in float64
        shift_a = _group_vec(ga, mom_a, "mean_F", "loo", None) - _group_vec(ga, mom_a, "mean_F", "full", None)
        shift_b = _group_vec(gb, mom_b, "mean_F", "loo", None) - _group_vec(gb, mom_b, "mean_F", "full", None)
        inv_a, inv_b = _group_vec(ga, mom_a, "inv_F", "loo"), _group_vec(gb, mom_b, "inv_F", "loo")
        count_J = mom_a[ga[0].layer].count_J
        for j in range(len(blocks)):
            cov = dense.without_block(scratch, total, blocks[j], shift_a[j], shift_b[j], float(count_J[j]))
            view = {p: (rho[j], match[j]) for p, (rho, match) in best_J.items()}
            dense.update_best(view, dense.correlations(cov, inv_a[j], inv_b[j]), ga, gb)

    def _centred_codes(self, buf: torch.Tensor, run: Run, group: list[Unit],
                       mean_f: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(block, [n, features of the group] codes) of each chunk of samples, centred, written into buf."""
        layers = list(dict.fromkeys(u.layer for u in group))
        for chunks in zip(*(self._acts_chunks(run, layer) for layer in layers)):
            x_of = {layer: x for layer, (_, x) in zip(layers, chunks)}
            n = chunks[0][1].shape[0]
            out = buf[:n * len(mean_f)].view(n, len(mean_f))
            for u, off in dense.offsets(group):
                dense.codes_into(out[:, off:off + u.stop - u.start], run.sae(u.layer, self.device), x_of[u.layer],
                                      self.codes, slice(u.start, u.stop))
            yield chunks[0][0], out.sub_(mean_f)


TOPK_CODES = "topk-codes"
"""The cache entry of a layer's top-k codes (int32 feature ids, float32 values: N*k*8 bytes)."""


class SparsePath(_Path):
    """Top-k codes only: products of the k active codes of each sample, cost ~N*k*k per layer pair."""

    def __init__(self, *args, use_cache: bool = True):
        super().__init__(*args)
        self._topk: dict[tuple[str, int], sparse.TopkTable] = {}
        self.use_cache = use_cache
        """Keep each layer's top-k codes on disk too (<root>/.cache, keyed by the run's key), so that a later
        process or another pair reads them instead of the encoder product over every sample."""

    def keep_only(self, keys: tuple[str, ...]) -> None:
        self._topk = {k: v for k, v in self._topk.items() if k[0] in keys}

    def _topk_table(self, run: Run, layer: int) -> sparse.TopkTable:
        if (run.key, layer) not in self._topk:
            cache, key = pair_cache(run, run, self.use_cache), PairKey(run.key, run.key, layer, layer, TOPK_CODES)
            shape = (run.n_samples, run.top_k)
            found = cache.load(key, {"vals_NK": shape, "idx_NK": shape})
            if found is not None:
                table = sparse.TopkTable(torch.from_numpy(found["vals_NK"]).to(self.device),
                                         torch.from_numpy(found["idx_NK"]).long().to(self.device))
            else:
                sae = run.sae(layer, self.device)
                chunks = (x for _, x in self._acts_chunks(run, layer))
                table = sparse.topk_table(chunks, sae, run.n_samples, self._scratch(run, sae.n_features))
                cache.save(key, {"vals_NK": table.vals_NK.cpu().numpy(),
                                 "idx_NK": table.idx_NK.to(torch.int32).cpu().numpy()})
            self._topk[run.key, layer] = table
        return self._topk[run.key, layer]

    def _compute_moments(self, run: Run, layer: int) -> LayerMoments:
        return LayerMoments(sparse.moments(self._topk_table(run, layer), run.n_features(layer)), None, None)

    def pairs(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]):
        sizes = [(run_a.n_features(a), run_b.n_features(b)) for a in la for b in lb]
        acc = torch.empty(max(sparse.block_rows(na, nb, self.mem_bytes) * nb for na, nb in sizes),
                          dtype=torch.float64, device=self.device)
        out = {}
        for a in la:
            mom_a = self.moments(run_a, a).full
            ent = sparse.entries(self._topk_table(run_a, a))
            if run_a.key != run_b.key:  # A's layers are needed once each
                self._topk.pop((run_a.key, a))
            for b in lb:
                mom_b, table_b = self.moments(run_b, b).full, self._topk_table(run_b, b)
                self.progress(1, 0)
                out[a, b] = (*sparse.pair(acc, ent, mom_a, table_b, mom_b, self.mem_bytes), None)
                self.progress(0, 1)
        return out


class Correlator:
    """Computes PairStats for layer pairs of two runs with a dense or a sparse path, caching them on disk;
    under torchrun each rank computes its share of A's layers and all read the others' from the cache."""

    def __init__(self, opts: EngineOptions | None = None, method: Literal["dense", "sparse"] | None = None,
                 progress: Progress | None = None, jackknife: bool = False):
        """jackknife: also each feature's rho and mass without each of JACKKNIFE_BLOCKS random blocks of
        samples, from per-block cross-products (the dense path computes them, whatever the codes)."""
        opts = opts or EngineOptions()
        self.codes: str = opts.codes or "relu"
        self.n_blocks = JACKKNIFE_BLOCKS if jackknife else 1
        self.method = method or ("sparse" if self.codes == "topk" and not jackknife else "dense")
        if jackknife and self.method != "dense":
            raise ValueError("the jackknife is computed by the dense path")
        if self.method not in ("dense", "sparse") or (self.method == "sparse" and self.codes != "topk"):
            raise ValueError(f"method {self.method!r} cannot compute {self.codes!r} codes")
        if opts.precision != "fp32" and (jackknife or self.method != "dense"):
            raise OptionError("precision", f"{{opt}} {opts.precision} is for the dense path's scores (relu codes, "
                                           "without --ci): the jackknife and the sparse path compute in fp32")
        self.use_cache = not opts.no_cache
        common = (self.codes, self.n_blocks, opts.torch_device, opts.chunk_size, max(1, int(opts.mem_gb * 2**30)),
                  progress or _no_progress)
        self.path: _Path = (DensePath(*common, precision=opts.precision) if self.method == "dense"
                            else SparsePath(*common, use_cache=self.use_cache))

    def pair_stats(self, run_a: Run, run_b: Run,
                   pairs: Iterable[tuple[int, int]] | None = None) -> dict[tuple[int, int], PairStats]:
        """PairStats of A against B for each (layer a, layer b) in `pairs` (default: every pair)."""
        check_comparable([run_a, run_b])
        if pairs is None:
            pairs = [(a, b) for a in run_a.layers for b in run_b.layers]
        pairs = [(run_a.resolve_layer(a), run_b.resolve_layer(b)) for a, b in pairs]
        if self.n_blocks > 1 and run_a.n_samples < 10 * self.n_blocks:
            raise UserError(f"the jackknife interval needs at least 10 samples per block of {self.n_blocks}; "
                            f"the runs have {run_a.n_samples} samples")
        cache = pair_cache(run_a, run_b, self.use_cache)
        found = {p: self._load(cache, self._key(run_a, run_b, p), run_a.n_features(p[0])) for p in pairs}
        missing = [p for p, s in found.items() if s is None]
        if missing:
            self.path.keep_only((run_a.key, run_b.key))
            la = [a for a in run_a.layers if any(p[0] == a for p in missing)]
            lb = [b for b in run_b.layers if any(p[1] == b for p in missing)]
            la = self._my_share(run_a, run_b, la, lb, cache)
            for p, stats in (self._compute(run_a, run_b, la, lb) if la else {}).items():
                if found.get(p) is None:  # a pair read from the cache stays as it is
                    cache.save(self._key(run_a, run_b, p), {k: v for k, v in stats._asdict().items() if v is not None})
                    found[p] = stats
            if distributed.world_size() > 1:
                self._read_other_ranks(run_a, run_b, missing, found, cache)
        return {p: found[p] for p in pairs}

    def _key(self, run_a: Run, run_b: Run, pair: tuple[int, int]) -> PairKey:
        # "+cis": blocks by seeded permutation (entries of the older contiguous blocks, "+ci", are not read)
        return PairKey(run_a.key, run_b.key, *pair, self.codes + ("+cis" if self.n_blocks > 1 else ""))

    def _load(self, cache: PairCache, key: PairKey, n_features: int) -> PairStats | None:
        shapes = {"rho_F": (n_features,), "match_F": (n_features,), "mass_F": (n_features,)}
        if self.n_blocks > 1:
            shapes.update(rho_JF=(self.n_blocks, n_features), mass_JF=(self.n_blocks, n_features))
        arrays = cache.load(key, shapes)
        return None if arrays is None else PairStats(**arrays)

    def _my_share(self, run_a: Run, run_b: Run, la: list[int], lb: list[int], cache: PairCache) -> list[int]:
        """The layers of A this rank computes: all of them on one process, a share balanced by cost under torchrun."""
        if distributed.world_size() == 1:
            return la
        if cache.folder is None and not self.use_cache:
            raise UserError("several processes (torchrun) share their results through the pair cache: drop --no_cache")
        if cache.folder is None:
            old = ", ".join(dict.fromkeys(r.name for r in (run_a, run_b) if not r.meta.run_id))
            raise UserError(f"run {old} has no run_id (written by an older version), and under torchrun the processes "
                            "share their results through the pair cache, which tells runs apart by it: train or "
                            "record it again, or run this analysis without torchrun")
        cost = [run_a.n_samples * run_a.n_features(a) * sum(map(run_b.n_features, lb)) for a in la]
        return [la[i] for i in distributed.share(cost)]

    def _read_other_ranks(self, run_a: Run, run_b: Run, missing: list[tuple[int, int]],
                          found: dict[tuple[int, int], PairStats | None], cache: PairCache) -> None:
        """After every rank has written its share, the other ranks' pairs from the cache."""
        distributed.barrier()
        for p in missing:
            if found[p] is None:
                found[p] = self._load(cache, self._key(run_a, run_b, p), run_a.n_features(p[0]))
        lost = [p for p in missing if found[p] is None]
        if lost:
            raise UserError(f"layer pair {lost[0]} of {run_a.name} -> {run_b.name} is missing from the cache "
                            f"{cache.folder} after every rank finished (a failed write: see the warnings)")

    @torch.no_grad()
    def _compute(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]) -> dict[tuple[int, int], PairStats]:
        """PairStats for every pair of la x lb (nothing cached)."""
        for run, layers in ((run_a, la), (run_b, lb)):
            for layer in layers:  # a corrupt file fails now, not an hour into the computation
                run.acts(layer), run.sae(layer)
        out = self.path.pairs(run_a, run_b, la, lb)
        stats = {}
        for p, (rho, match, rho_J) in out.items():
            mom = self.path.moments(run_a, p[0])
            stats[p] = PairStats(_numpy(rho.clamp(-1, 1)), match.cpu().numpy(), _numpy(mom.full.mass_F),
                                 *((_numpy(rho_J.clamp(-1, 1)), _numpy(mom.loo.mass_F)) if rho_J is not None else ()))
        return stats


def _group_vec(group: list[Unit], moments: dict[int, LayerMoments], field: str, which: str = "full",
               dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """A moment's values for the features of a group ([..., group features]); `which`: full or loo;
    dtype None keeps float64."""
    vec = torch.cat([getattr(getattr(moments[u.layer], which), field)[..., u.start:u.stop] for u in group], dim=-1)
    return vec if dtype is None else vec.to(dtype)


def _sum_blocks(blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The sum over the first dimension, block after block: each element's rounding does not depend on the
    group's shape (torch.sum's reduction order does), so that any split of the layers across ranks gives the
    same bits."""
    out.copy_(blocks[0])
    for block in blocks[1:]:
        out.add_(block)
    return out


def _running_best(shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho, match) to fold maxima into: -inf and 0."""
    return torch.full(shape, -math.inf, device=device), torch.zeros(shape, dtype=torch.long, device=device)


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.double().cpu().numpy()
