"""Every image of a steer: the unsteered pipeline once per (prompt, seed) (alpha 0 of every feature), each
feature at each other alpha, and random directions of each feature's norm (the floor); each image is written
as it is made, and scored while it is in memory."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from saeshare.core.progress import progress
from saeshare.disk.results import SteeredImage
from saeshare.steer.pipeline import Generation, Tower, conditioning, encode, generate, steering
from saeshare.steer.scores import Scorer, random_directions, rise


class Plan(NamedTuple):
    prompts: list[str]
    seeds: list[int]
    alphas: list[float]
    """0 among them: the unsteered images every feature is compared with."""
    positions: str
    both_branches: bool
    how: Generation
    n_random: int
    """Random directions per feature, of its norm at the measured alpha (0 without scorers)."""
    measured_alpha: float


class Direction(NamedTuple):
    feature: int
    unit_D: torch.Tensor
    """W_dec[f] x the feature's typical activation: the vector added at alpha 1."""


class FeatureScores(NamedTuple):
    rise_C: np.ndarray
    random_RC: np.ndarray
    """[n_random, C]: each random direction's rise."""


def n_images(plan: Plan, n_features: int) -> int:
    per = len(plan.prompts) * len(plan.seeds)
    return per * (1 + n_features * (sum(a != 0 for a in plan.alphas) + plan.n_random))


def alpha_name(alpha: float) -> str:
    return format(alpha, "g")


class Steerer:
    def __init__(self, pipe, tower: Tower, layer: int, device: torch.device, plan: Plan, out: Path):
        self.pipe, self.tower, self.layer, self.device, self.plan, self.out = pipe, tower, layer, device, plan, out
        self.images: list[SteeredImage] = []
        self.bar = None

    def batch(self, vector_D: torch.Tensor | None, stem: str, feature: int | None, alpha: float,
              direction: str = "feature") -> list[Image.Image]:
        """The images of one vector (None: the unsteered pipeline) for every (prompt, seed), in that order."""
        made = []
        for p, prompt in enumerate(self.plan.prompts):
            if vector_D is None:
                embeds, change = encode(self.pipe, prompt, self.device), 0.0
            else:
                embeds, change = conditioning(self.pipe, prompt, self.device,
                                              lambda: steering(self.tower, self.layer, vector_D, self.plan.positions),
                                              self.plan.both_branches)
            for seed in self.plan.seeds:
                image = generate(self.pipe, embeds, seed, self.plan.how)
                file = f"{stem}_p{p}_s{seed}.png"
                (self.out / file).parent.mkdir(parents=True, exist_ok=True)
                image.save(self.out / file)
                self.images.append(SteeredImage(feature, alpha, prompt, seed, file, change, direction))
                made.append(image)
                self.bar.update()
        return made

    def run(self, directions: list[Direction], scorers: list[Scorer], seed: int = 0) -> dict[int, list[FeatureScores]]:
        """Every image of the plan; per feature, per scorer, the rises of its measured alpha and of its random
        directions."""
        plan, out = self.plan, {}
        with progress(total=n_images(plan, len(directions)), desc="steer", unit="image") as self.bar:
            plain = self.batch(None, "plain/plain", None, 0.0)
            plain_RC = [s(plain) for s in scorers]
            for d in directions:
                for alpha in plan.alphas:
                    if alpha == 0:
                        continue
                    made = self.batch(alpha * d.unit_D, f"f{d.feature}/a{alpha_name(alpha)}", d.feature, alpha)
                    if alpha == plan.measured_alpha and scorers:
                        steered = [s(made) for s in scorers]
                randoms = [[] for _ in scorers]
                norm = float(d.unit_D.norm()) * abs(plan.measured_alpha)
                for r, v_D in enumerate(random_directions(plan.n_random, len(d.unit_D), norm, seed + d.feature)):
                    made = self.batch(v_D, f"f{d.feature}/random{r}", d.feature, plan.measured_alpha, f"random {r}")
                    for i, s in enumerate(scorers):
                        randoms[i].append(rise(s(made), plain_RC[i]))
                if scorers:
                    out[d.feature] = [FeatureScores(rise(steered[i], plain_RC[i]),
                                                    np.array(randoms[i]).reshape(plan.n_random, -1))
                                      for i in range(len(scorers))]
        return out
