"""The correlation engine shared by wMPPC (SPEC §6) and Comparative Sharedness (§7): orchestration
and the in-memory memo. The numbers come from the kernels of `corr_dense` and `corr_sparse`, the disk
cache from `corr_cache`.

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
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal

import torch
from tqdm import tqdm

import corr_dense
import corr_sparse
from corr_cache import PairCache, PairKey, PairStats
from corr_dense import LayerSize, Moments, Unit
from errors import check_positive, resolve_device
from options import check_choices
from runs import DEFAULT_ROOT, Codes, Run, check_comparable

DEFAULT_CHUNK = 2048
DEFAULT_MEM_GB = 1.0

Progress = Callable[[int, int], None]
"""progress(more_total, done): `more_total` steps were added to the work, `done` were finished."""


@dataclass
class RunsOptions:
    """What every command that reads runs takes."""
    root: str = DEFAULT_ROOT
    """Folder holding the runs."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:N."""
    chunk_size: int = DEFAULT_CHUNK
    """Samples per chunk."""

    def __post_init__(self):
        check_choices(self)
        check_positive("chunk_size", self.chunk_size)
        self.torch_device = resolve_device(self.device)


@dataclass
class AnalysisOptions(RunsOptions):
    """What every analysis of SAE features (wmppc, comp_sharedness, show) takes."""
    codes: Codes | None = None
    """relu: dense ReLU pre-activations (the paper's code); topk: the SAE's top-k codes. Default relu
    (show.py --from_json: the JSON's codes)."""


@dataclass
class EngineOptions(AnalysisOptions):
    """The correlation engine's settings."""
    mem_gb: float = DEFAULT_MEM_GB
    """Memory for the correlation accumulators, GiB."""
    no_cache: bool = False
    """Neither read nor write <root>/.cache/."""

    def __post_init__(self):
        super().__post_init__()
        check_positive("mem_gb", self.mem_gb)


def pair_cache(run_a: Run, run_b: Run, use: bool = True) -> PairCache:
    """The cache beside the runs; off for runs without a run_id (nothing would tell a rewrite apart)."""
    return PairCache(run_a.path.parent / ".cache" if use and run_a.meta.run_id and run_b.meta.run_id else None)


def tqdm_progress(desc: str) -> Progress:
    """A progress callback drawing one tqdm bar (on a terminal; nothing in logs)."""
    bar = tqdm(desc=desc, unit="chunk", total=0, disable=None, leave=False)

    def progress(more_total: int, done: int) -> None:
        bar.total += more_total
        bar.update(done)

    return progress


def _no_progress(more_total: int, done: int) -> None:
    pass


class Correlator:
    """Computes PairStats for layer pairs of two runs, caching them on disk and keeping per-layer
    moments (and, for the sparse path, the top-k codes of the two runs in use) in memory."""

    def __init__(self, opts: EngineOptions | None = None, method: Literal["dense", "sparse"] | None = None,
                 progress: Progress | None = None):
        opts = opts or EngineOptions()
        self.codes: str = opts.codes or "relu"
        self.method = method or ("sparse" if self.codes == "topk" else "dense")
        if self.method not in ("dense", "sparse") or (self.method == "sparse" and self.codes != "topk"):
            raise ValueError(f"method {self.method!r} cannot compute {self.codes!r} codes")
        self.device, self.chunk_size = opts.torch_device, opts.chunk_size
        self.mem_bytes = max(1, int(opts.mem_gb * 2**30))
        self.use_cache, self.progress = not opts.no_cache, progress or _no_progress
        self._moments: dict[tuple[str, int], Moments] = {}
        self._topk: dict[tuple[str, int], corr_sparse.TopkTable] = {}
        self._pairs, self._layer_moments_fn = ((self._dense, self._dense_moments) if self.method == "dense"
                                               else (self._sparse, self._sparse_moments))

    def pair_stats(self, run_a: Run, run_b: Run,
                   pairs: Iterable[tuple[int, int]] | None = None) -> dict[tuple[int, int], PairStats]:
        """PairStats of A against B for each (layer a, layer b) in `pairs` (default: every pair)."""
        check_comparable([run_a, run_b])
        if pairs is None:
            pairs = [(a, b) for a in run_a.layers for b in run_b.layers]
        pairs = [(run_a.resolve_layer(a), run_b.resolve_layer(b)) for a, b in pairs]
        cache = pair_cache(run_a, run_b, self.use_cache)
        key = lambda a, b: PairKey(run_a.key, run_b.key, a, b, self.codes)  # noqa: E731
        found = {p: self._load(cache, key(*p), run_a.n_features(p[0])) for p in pairs}
        missing = [p for p, s in found.items() if s is None]
        if missing:
            self._topk = {k: v for k, v in self._topk.items() if k[0] in (run_a.key, run_b.key)}
            la = [a for a in run_a.layers if any(p[0] == a for p in missing)]
            lb = [b for b in run_b.layers if any(p[1] == b for p in missing)]
            for p, stats in self._compute(run_a, run_b, la, lb).items():
                cache.save(key(*p), stats._asdict())
                found[p] = stats
        return {p: found[p] for p in pairs}

    @staticmethod
    def _load(cache: PairCache, key: PairKey, n_features: int) -> PairStats | None:
        arrays = cache.load(key, {name: (n_features,) for name in PairStats._fields})
        return None if arrays is None else PairStats(**arrays)

    @torch.no_grad()
    def _compute(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]) -> dict[tuple[int, int], PairStats]:
        """PairStats for every pair of la x lb (nothing cached)."""
        for run, layers in ((run_a, la), (run_b, lb)):
            for layer in layers:  # a corrupt file fails now, not an hour into the computation
                run.acts(layer), run.sae(layer)
        out = self._pairs(run_a, run_b, la, lb)
        return {p: PairStats(rho.clamp(-1, 1).double().cpu().numpy(), match.cpu().numpy(),
                             self._layer_moments(run_a, p[0]).mass_F.cpu().numpy())
                for p, (rho, match) in out.items()}

    def _acts_chunks(self, run: Run, layer: int) -> Iterator[torch.Tensor]:
        """The layer's activations, chunk by chunk, each chunk counted as one step of progress."""
        starts = range(0, run.n_samples, self.chunk_size)
        self.progress(len(starts), 0)
        for start in starts:
            yield run.read_acts(layer, slice(start, start + self.chunk_size), self.device)
            self.progress(0, 1)

    def _scratch(self, run: Run, n_features: int) -> torch.Tensor:
        return torch.empty(min(run.n_samples, self.chunk_size) * n_features, device=self.device)

    def _layer_moments(self, run: Run, layer: int) -> Moments:
        if (run.key, layer) not in self._moments:
            self._moments[run.key, layer] = self._layer_moments_fn(run, layer)
        return self._moments[run.key, layer]

    # dense path -----------------------------------------------------------------------------------------
    def _dense_moments(self, run: Run, layer: int) -> Moments:
        sae = run.sae(layer, self.device)
        buf = self._scratch(run, sae.n_features)
        chunks = (corr_dense.codes_into(buf[:len(x) * sae.n_features].view(len(x), -1), sae, x, self.codes, slice(None))
                  for x in self._acts_chunks(run, layer))
        return corr_dense.moments(chunks, sae.n_features, run.n_samples, self._scratch(run, sae.n_features))

    def _dense(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]):
        """Blocked products of centred codes. Memory: one float32 accumulator of at most mem_bytes,
        [features of an A group, features of a B group], plus one chunk of codes per group."""
        mom_a = {a: self._layer_moments(run_a, a) for a in la}
        mom_b = {b: self._layer_moments(run_b, b) for b in lb}
        sizes_a = [LayerSize(a, len(mom_a[a].mean_F)) for a in la]
        sizes_b = [LayerSize(b, len(mom_b[b].mean_F)) for b in lb]
        cap_a, cap_b = corr_dense.plan(sizes_a, sizes_b, max(1, self.mem_bytes // 4))
        groups_a, groups_b = corr_dense.pack(sizes_a, cap_a), corr_dense.pack(sizes_b, cap_b)
        acc = torch.empty(cap_a * cap_b, device=self.device)
        buf_a, buf_b = self._scratch(run_a, cap_a), self._scratch(run_b, cap_b)
        best = {(a, b): (torch.full((na,), -math.inf, device=self.device),
                         torch.zeros(na, dtype=torch.long, device=self.device))
                for a, na in sizes_a for b, _ in sizes_b}
        for ga in groups_a:
            for gb in groups_b:
                mean_a, mean_b = _group_vec(ga, mom_a, "mean_F"), _group_vec(gb, mom_b, "mean_F")
                chunks = zip(self._centred_codes(buf_a, run_a, ga, mean_a), self._centred_codes(buf_b, run_b, gb, mean_b))
                corr = corr_dense.cross(acc[:len(mean_a) * len(mean_b)].view(len(mean_a), len(mean_b)), chunks)
                corr.mul_(_group_vec(ga, mom_a, "inv_F")[:, None]).mul_(_group_vec(gb, mom_b, "inv_F")[None, :])
                corr_dense.update_best(best, corr, ga, gb)
        return best

    def _centred_codes(self, buf: torch.Tensor, run: Run, group: list[Unit], mean_f: torch.Tensor) -> Iterator[torch.Tensor]:
        """[n, features of the group] codes of each chunk of samples, centred, written into buf."""
        layers = list(dict.fromkeys(u.layer for u in group))
        for xs in zip(*(self._acts_chunks(run, layer) for layer in layers)):
            x_of = dict(zip(layers, xs))
            n = xs[0].shape[0]
            out = buf[:n * len(mean_f)].view(n, len(mean_f))
            for u, off in corr_dense.offsets(group):
                corr_dense.codes_into(out[:, off:off + u.stop - u.start], run.sae(u.layer, self.device), x_of[u.layer],
                                      self.codes, slice(u.start, u.stop))
            yield out.sub_(mean_f)

    # sparse path ----------------------------------------------------------------------------------------
    def _topk_table(self, run: Run, layer: int) -> corr_sparse.TopkTable:
        if (run.key, layer) not in self._topk:
            sae = run.sae(layer, self.device)
            self._topk[run.key, layer] = corr_sparse.topk_table(self._acts_chunks(run, layer), sae, run.n_samples,
                                                                self._scratch(run, sae.n_features))
        return self._topk[run.key, layer]

    def _sparse_moments(self, run: Run, layer: int) -> Moments:
        return corr_sparse.moments(self._topk_table(run, layer), run.n_features(layer))

    def _sparse(self, run_a: Run, run_b: Run, la: list[int], lb: list[int]):
        sizes = [(run_a.n_features(a), run_b.n_features(b)) for a in la for b in lb]
        acc = torch.empty(max(corr_sparse.block_rows(na, nb, self.mem_bytes) * nb for na, nb in sizes),
                          dtype=torch.float64, device=self.device)
        out = {}
        for a in la:
            mom_a = self._layer_moments(run_a, a)
            ent = corr_sparse.entries(self._topk_table(run_a, a))
            if run_a.key != run_b.key:  # A's layers are needed once each
                self._topk.pop((run_a.key, a))
            for b in lb:
                mom_b, table_b = self._layer_moments(run_b, b), self._topk_table(run_b, b)
                self.progress(1, 0)
                out[a, b] = corr_sparse.pair(acc, ent, mom_a, table_b, mom_b, self.mem_bytes)
                self.progress(0, 1)
        return out


def _group_vec(group: list[Unit], moments: dict[int, Moments], field: str) -> torch.Tensor:
    return torch.cat([getattr(moments[u.layer], field)[u.start:u.stop] for u in group]).float()
