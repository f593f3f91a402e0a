"""Runs on disk (SPEC §9): an atomic writer and a validating reader that computes features in chunks."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import UserError
from sae import TopKSAE

SCHEMA = 1
DEFAULT_ROOT = "sae_features"
CODES = ("relu", "topk")
FLOAT16_MAX = float(np.finfo(np.float16).max)


def sae_file(layer: int) -> str:
    return f"layer{layer:02d}.sae.safetensors"


def acts_file(layer: int) -> str:
    return f"layer{layer:02d}.acts.npy"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class RunWriter:
    """Builds a run in a hidden temporary folder and renames it into place once every file is written,
    so an interrupted command never leaves `<root>/<runname>` half-written."""

    def __init__(self, root: str | Path, runname: str, overwrite: bool = False):
        if not runname or "/" in runname or runname.startswith("."):
            raise UserError(f"invalid --runname {runname!r}: use a plain folder name")
        self.root = Path(root)
        self.final = self.root / runname
        self.overwrite = overwrite
        self._check_free()
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{runname}.tmp-*"):  # left by an interrupted command
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp = self.root / f".{runname}.tmp-{os.getpid()}"
        self.tmp.mkdir()
        self._memmaps: dict[int, np.memmap] = {}

    def _check_free(self) -> None:
        if self.final.exists() and not self.overwrite:
            raise UserError(f"run {str(self.final)!r} already exists; pass --overwrite to replace it")

    def acts(self, layer: int, n_samples: int, d_model: int, dtype: str = "float32") -> np.memmap:
        """A writable [N, d] array backed by the run's `layer{LL}.acts.npy`."""
        mm = np.lib.format.open_memmap(self.tmp / acts_file(layer), mode="w+", dtype=dtype,
                                       shape=(n_samples, d_model))
        self._memmaps[layer] = mm
        return mm

    def save_sae(self, layer: int, state: dict[str, torch.Tensor]) -> None:
        tmp = self.tmp / f".{sae_file(layer)}.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, self.tmp / sae_file(layer))

    def finish(self, meta: dict) -> Path:
        for mm in self._memmaps.values():
            mm.flush()
        self._memmaps.clear()
        meta = {"schema": SCHEMA, **meta, "run_id": uuid.uuid4().hex, "complete": True}
        _write_json_atomic(self.tmp / "run.json", meta)
        self._check_free()
        old = None
        if self.final.exists():
            old = self.root / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        self._memmaps.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)


class TopkCodes(NamedTuple):
    top_acts: torch.Tensor
    """[n, k] activations (zeros where ReLU cut a kept feature)."""
    top_indices: torch.Tensor
    """[n, k] feature ids."""


class Run:
    """A complete run read from disk. Features are never materialised for all samples at once."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = path, meta
        self._sae_cache: dict[int, TopKSAE] = {}

    @classmethod
    def open(cls, root: str | Path, name: str) -> "Run":
        path = Path(root) / name
        meta_path = path / "run.json"
        if not meta_path.is_file():
            known = sorted(p.name for p in Path(root).iterdir() if (p / "run.json").is_file()) if Path(root).is_dir() else []
            hint = f"; runs in {root}: {', '.join(known)}" if known else f"; no runs in {root!s}"
            raise UserError(f"no run {name!r} in {str(root)!r}{hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"corrupt {meta_path}: {e}") from None
        if meta.get("schema") != SCHEMA:
            raise UserError(f"{meta_path}: schema {meta.get('schema')!r}, this version reads schema {SCHEMA}")
        if meta.get("complete") is not True:
            raise UserError(f"run {name!r} is incomplete (interrupted?); train it again with --overwrite")
        for key in ("layers", "dataset", "sae"):
            if key not in meta:
                raise UserError(f"corrupt {meta_path}: missing key {key!r}")
        run = cls(path, meta)
        for layer in run.layers:
            for f in (sae_file(layer), acts_file(layer)):
                if not (path / f).is_file():
                    raise UserError(f"run {name!r} is missing {f}")
        return run

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def layers(self) -> list[int]:
        return list(self.meta["layers"])

    @property
    def n_samples(self) -> int:
        return int(self.meta["dataset"]["n_samples"])

    @property
    def fingerprint(self) -> str:
        return self.meta["dataset"]["fingerprint"]

    @property
    def top_k(self) -> int:
        return int(self.meta["sae"]["top_k"])

    def resolve_layer(self, layer: int) -> int:
        """-1 (or any negative index) counts from the last recorded layer."""
        layers = self.layers
        if layer < 0:
            if -layer > len(layers):
                raise UserError(f"run {self.name!r} records {len(layers)} layers; {layer} is out of range")
            return layers[layer]
        if layer not in layers:
            raise UserError(f"layer {layer} is not recorded in run {self.name!r} (layers: {layers})")
        return layer

    def acts(self, layer: int) -> np.ndarray:
        """Pooled activations [N, d] (memory-mapped; float32 or float16)."""
        layer = self.resolve_layer(layer)
        try:
            arr = np.load(self.path / acts_file(layer), mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise UserError(f"corrupt {self.path / acts_file(layer)}: {e}") from None
        if arr.ndim != 2 or arr.shape[0] != self.n_samples or arr.dtype not in (np.float32, np.float16):
            raise UserError(f"corrupt {self.path / acts_file(layer)}: shape {arr.shape} dtype {arr.dtype}, "
                            f"expected [{self.n_samples}, d] float32/float16")
        return arr

    def sae(self, layer: int, device: str | torch.device = "cpu") -> TopKSAE:
        layer = self.resolve_layer(layer)
        if layer not in self._sae_cache:
            try:
                sae = TopKSAE.from_state(load_file(str(self.path / sae_file(layer))), self.top_k)
            except (SafetensorError, ValueError, KeyError, OSError) as e:
                raise UserError(f"corrupt {self.path / sae_file(layer)}: {e}") from None
            self._sae_cache[layer] = sae.eval().requires_grad_(False)
        return self._sae_cache[layer].to(device)

    def n_features(self, layer: int) -> int:
        return self.sae(layer).n_features

    def iter_codes(self, layer: int, codes: str = "relu", chunk_size: int = 4096,
                   device: str | torch.device = "cpu") -> Iterator[tuple[int, torch.Tensor | TopkCodes]]:
        """Yield (start, codes of samples start..start+n) per chunk: a dense [n, F] float32 tensor for
        `relu`, TopkCodes for `topk`."""
        if codes not in CODES:
            raise UserError(f"unknown --codes {codes!r}; choose from {', '.join(CODES)}")
        acts = self.acts(layer)
        sae = self.sae(layer, device)
        for start in range(0, acts.shape[0], chunk_size):
            x = torch.from_numpy(np.array(acts[start:start + chunk_size], dtype=np.float32)).to(device)
            yield start, (sae.pre_acts(x) if codes == "relu" else TopkCodes(*sae.encode(x)))

    def dense_codes(self, layer: int, codes: str = "relu", rows: np.ndarray | slice | None = None,
                    device: str | torch.device = "cpu") -> torch.Tensor:
        """Dense [n, F] codes of selected samples (for small selections and tests)."""
        acts = self.acts(layer)
        x = torch.from_numpy(np.array(acts[rows if rows is not None else slice(None)], dtype=np.float32)).to(device)
        sae = self.sae(layer, device)
        if codes == "relu":
            return sae.pre_acts(x)
        top = sae.encode(x)
        return torch.zeros(x.shape[0], sae.n_features, device=device).scatter_(1, top.top_indices, top.top_acts)


def check_comparable(runs: list[Run]) -> None:
    """Runs are compared sample by sample: they must cover the same samples in the same order."""
    first = runs[0]
    for r in runs[1:]:
        if r.fingerprint != first.fingerprint:
            raise UserError(
                f"runs {first.name!r} and {r.name!r} cover different datasets "
                f"({first.meta['dataset'].get('name')}, {first.n_samples} samples, fingerprint {first.fingerprint[:12]} vs "
                f"{r.meta['dataset'].get('name')}, {r.n_samples} samples, fingerprint {r.fingerprint[:12]})")
