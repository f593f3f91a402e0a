"""Synthetic runs on disk, for tests and benchmarks: known activations and SAE weights, no model."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from data import DatasetInfo, PairedDataset, load_dataset
from saeshare.disk.runs import LayerInfo, Run, RunMeta, RunWriter, SaeSettings
from saeshare.engine.correlator import Correlator
from saeshare.engine.options import EngineOptions

Rows = Callable[[int, int], np.ndarray]
"""(start, stop) -> rows start..stop of a layer's activations, for data too big to hold at once."""


def random_sae_state(d: int, n_features: int, seed: int = 0, b_scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d, n_features, generator=g) / math.sqrt(d)
    return {"W_enc": W_enc, "W_dec": (W_enc.T / W_enc.T.norm(dim=1, keepdim=True).clamp_min(1e-12)).contiguous(),
            "b_dec": torch.randn(d, generator=g) * b_scale}


def make_run(root: str | Path, name: str, acts_by_layer: dict[int, np.ndarray | Rows],
             sae_states: dict[int, dict[str, torch.Tensor]], top_k: int = 4, fingerprint: str = "synthetic-0",
             n_samples: int | None = None, overwrite: bool = False, chunk: int = 8192, modality: str = "image",
             dataset: DatasetInfo | None = None) -> Run:
    """Write a complete run whose layer l has activations acts_by_layer[l] ([N, d] array or Rows, then
    give n_samples) and SAE sae_states[l], over `dataset` (default: a "synthetic" one of that fingerprint)."""
    layers = sorted(acts_by_layer)
    if n_samples is None:
        n_samples = len(next(iter(acts_by_layer.values())))
    info = {}
    with RunWriter(root, name, overwrite=overwrite) as writer:
        for layer in layers:
            state = sae_states[layer]
            d, n_features = state["W_enc"].shape
            mm = writer.acts(layer, n_samples, d)
            src = acts_by_layer[layer]
            for start in range(0, n_samples, chunk):
                stop = min(n_samples, start + chunk)
                mm[start:stop] = src[start:stop] if isinstance(src, np.ndarray) else src(start, stop)
            writer.save_sae(layer, {k: v.contiguous() for k, v in state.items()})
            info[layer] = LayerInfo(d, n_features)
        writer.finish(RunMeta(
            runname=name, modality=modality, model="Synthetic", checkpoint="none", token="cls",
            dataset=dataset or DatasetInfo("synthetic", "train", n_samples, fingerprint),
            sae=SaeSettings(top_k=top_k, expansion_factor=4), layers=layers, layer_info=info))
    return Run.open(root, name)


def engine(codes: str = "relu", method: str | None = None, **opts) -> Correlator:
    """An engine without a progress bar (on the CPU unless `device` is given); `opts` are EngineOptions fields."""
    return Correlator(EngineOptions(codes=codes, **{"device": "cpu", **opts}), method=method)


def labelled_folder(root: Path, n: int = 80) -> PairedDataset:
    """A local imagefolder whose metadata.jsonl has a `label` column (cat / dog / car, in turn)."""
    root.mkdir()
    rows = []
    for k in range(n):
        Image.new("RGB", (8, 8), (k, 0, 0)).save(root / f"img{k}.png")
        rows.append({"file_name": f"img{k}.png", "text": f"picture {k}", "label": ("cat", "dog", "car")[k % 3]})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_dataset(str(root))
