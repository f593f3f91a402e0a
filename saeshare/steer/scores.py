"""What a steer changed in the generated images, read by a scorer (one column per thing it can see), and how
much more than random directions of the same norm change it."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np
import torch
from PIL import Image

from errors import UserError
from saeshare.core.clip import ClipEmbedder
from saeshare.disk.runs import Run
from saeshare.training.steps import EncoderSpec, build_encoder


class Scorer(Protocol):
    name: str
    columns: list[str]

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """[n, C] float64: each image's score in each column."""


class VisionFeatures:
    """The SAE features of a vision run at one layer: each image through the run's encoder, its pooled token
    through the layer's SAE (ReLU codes), each feature in units of its standard deviation over the run's
    samples, so that rises compare between features."""

    def __init__(self, run: Run, layer: int | None, device):
        if run.meta.modality != "image":
            raise UserError(f"run {run.name!r} is a {run.meta.modality} run: a scorer of images must be a vision run")
        self.run, self.layer = run, run.resolve_layer(-1 if layer is None else layer)
        self.encoder = build_encoder(EncoderSpec.of_run(run.meta), device)
        self.sae = run.sae(self.layer, device)
        self.name = f"{run.name} layer {self.layer}"
        self.columns = [f"{run.name} #{f}" for f in range(self.sae.n_features)]
        self.scale_F = self._spread(device)

    def _spread(self, device) -> torch.Tensor:
        n, s1, s2 = 0, 0.0, 0.0
        for _, codes_nF in self.run.iter_codes(self.layer, "relu", device=device):
            c = codes_nF.double()
            n, s1, s2 = n + len(c), s1 + c.sum(0), s2 + (c * c).sum(0)
        std_F = (s2 / n - (s1 / n) ** 2).clamp_min(0).sqrt()
        return torch.where(std_F > 0, std_F, torch.inf)  # a feature that never varies cannot rise

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        inputs = self.encoder.collate([self.encoder.transform(im) for im in images])
        acts_BTD = self.encoder.record(inputs, [self.layer])[self.layer]
        pooled_BD = self.encoder.pool(acts_BTD, self.encoder.token_mask(inputs, acts_BTD)).float()
        return (self.sae.pre_acts(pooled_BD).double() / self.scale_F).cpu().numpy()


class ZeroShotLabels:
    """Each image's CLIP cosine with each label (the label as it is, no prompt template)."""

    def __init__(self, labels: list[str], clip_model_name: str, device):
        self.clip = ClipEmbedder(clip_model_name, device)
        self.labels_LE = self.clip.texts(labels)
        self.name = f"labels ({Path(clip_model_name).name or clip_model_name})"
        self.columns = list(labels)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        return (self.clip.images(images) @ self.labels_LE.T).double().cpu().numpy()


def rise(steered_RC: np.ndarray, plain_RC: np.ndarray) -> np.ndarray:
    """[C]: the mean change of each column from each unsteered image to its steered twin (same prompt and seed,
    rows paired)."""
    return (steered_RC - plain_RC).mean(0)


class Named(NamedTuple):
    """A steered feature named by the column of a scorer that rises most."""
    name: str
    column: int
    rise: float
    floor: float
    """The largest rise of any column under any of the random directions: the best that chance names."""


def best_column(rise_C: np.ndarray, random_rises_RC: np.ndarray, columns: list[str]) -> Named:
    c = int(np.argmax(rise_C))
    floor = float(random_rises_RC.max()) if random_rises_RC.size else float("nan")
    return Named(columns[c], c, float(rise_C[c]), floor)


def random_directions(n: int, d: int, norm: float, seed: int) -> torch.Tensor:
    """[n, d] Gaussian directions scaled to `norm`, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (v / v.norm(dim=1, keepdim=True) * norm).float()
