"""The analyses' on-disk cache: one file of arrays per (run A, run B, layer pair, what was computed)
under `<root>/.cache/`. Keys hold each run's key (its run_id, SAE seed, null), so a rewritten run's
stale entries are never read."""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

from errors import UserError
from saeshare.core import distributed
from saeshare.disk.files import write_atomic
from saeshare.disk.runs import Run

CACHE_VERSION = 2
"""Bump when the numbers the engine returns change meaning; old cache files are then ignored."""


class PairStats(NamedTuple):
    """What the engine knows of layer a of A against layer b of B."""
    rho_F: np.ndarray
    """[F_A] float64: max_j corr(f_i^A, f_j^B), in [-1, 1]; 0 for a constant feature."""
    match_F: np.ndarray
    """[F_A] int64: the feature j of B reaching the maximum."""
    mass_F: np.ndarray
    """[F_A] float64: S_i = sum_n f_i^A(n)."""
    rho_JF: np.ndarray | None = None
    """[J, F_A] float64: rho of each feature without the samples of jackknife block j (with --ci)."""
    mass_JF: np.ndarray | None = None
    """[J, F_A] float64: S_i without the samples of block j (with --ci)."""


class PairKey(NamedTuple):
    run_a: str
    """Run.key of A."""
    run_b: str
    layer_a: int
    layer_b: int
    what: str
    """What the entry holds: the engine's codes ("relu", "topk", with "+ci"), "similarity" ..."""


class PairCache:
    """Reads and writes entries (named float/int arrays); `folder=None` disables it. A damaged entry
    reads as missing (it is recomputed and replaced); a failed write is a warning, never an error."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def path(self, key: PairKey) -> Path:
        return self.folder / (f"corr-v{CACHE_VERSION}-{key.run_a}-{key.run_b}-{key.layer_a:02d}-{key.layer_b:02d}-"
                              f"{key.what}.npz")

    def load(self, key: PairKey, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """The entry's arrays, if it holds exactly `shapes` (name -> shape)."""
        if self.folder is None or not self.path(key).is_file():
            return None
        try:
            with np.load(self.path(key), allow_pickle=False) as z:
                arrays = {name: z[name] for name in shapes}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None
        return arrays if all(arrays[n].shape == s for n, s in shapes.items()) else None

    def save(self, key: PairKey, arrays: dict[str, np.ndarray]) -> None:
        if self.folder is None:
            return
        try:
            self.folder.mkdir(exist_ok=True)
            write_atomic(self.path(key), lambda tmp: _savez(tmp, arrays))
        except OSError as e:  # a full disk: the result is still computed and printed, only not kept
            why = f"could not write the cache {self.path(key)} ({e.strerror or e})"
            if distributed.world_size() > 1:  # the other ranks would wait for a pair that never comes
                raise UserError(f"{why}: under torchrun the ranks share their results through it") from None
            print(f"warning: {why}; the result is computed but not cached", file=sys.stderr)


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would add ".npz" to a path
        np.savez(f, **arrays)


def pair_cache(run_a: Run, run_b: Run, use: bool = True) -> PairCache:
    """The cache beside the runs; off for runs without a run_id (nothing would tell a rewrite apart)."""
    return PairCache(run_a.path.parent / ".cache" if use and run_a.meta.run_id and run_b.meta.run_id else None)
