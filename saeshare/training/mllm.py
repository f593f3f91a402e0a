"""train_mllm.py's pass: one forward per batch of (image, caption) prompts through a multimodal LLM; each layer's
SAEs train on its image and caption tokens together; each sample stores an image row and a caption row, written
as two complete runs (`<runname>_image`, `<runname>_text`) over the same samples and the same SAEs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from errors import UserError, check_choices, check_positive
from sae import SaeConfig, TopKSAE
from saeshare.disk.runs import ModalityShares, RunMeta, RunWriter, modality_file
from saeshare.training.steps import EncoderPass
from saeshare.training.train import TrainConfig, train_runs
from wrappedmodels import Encoder

COUNT_SAMPLES = 256
"""Samples whose tokens the modality shares are counted on, after training."""


@dataclass(kw_only=True)
class MllmOptions:
    """What train_mllm.py adds to a training (and a study's `modality = "mllm"` entry)."""
    image_token: Literal["mean", "last"] = "mean"
    """Each sample's row of the image run: the mean over its image tokens, or the last of them."""
    text_token: Literal["mean", "last"] = "mean"
    """Each sample's row of the text run: the mean over its caption tokens, or the last of them."""
    min_fires: int = 5
    """Tokens of one modality a feature must fire on to count for it in the modality shares."""

    def __post_init__(self):
        check_choices(self)
        check_positive("min_fires", self.min_fires)

    @property
    def pools(self) -> dict[str, str]:
        return {"image": self.image_token, "text": self.text_token}


class MllmResult(NamedTuple):
    metas: dict[str, RunMeta]
    """"image" / "text" -> the run written; both carry the modality shares."""
    seconds: float

    @property
    def shares(self) -> dict[int, ModalityShares]:
        return self.metas["image"].modality_shares


@torch.no_grad()
def modality_counts(plan: EncoderPass, saes: dict, n_samples: int) -> dict[int, np.ndarray]:
    """Per layer [4, F] float64: firing counts on image tokens, on caption tokens, activation mass on each, of
    each layer's SAE top-k codes over every token of the first `n_samples` samples."""
    out = {layer: np.zeros((4, saes[layer].n_features)) for layer in plan.layers}
    loader = plan.loader(batch_size=plan.settings.batch_size, sampler=list(range(min(n_samples, len(plan.ds)))))
    for _, inputs in loader:
        recorded = plan.encoder.record(inputs, plan.layers)
        for layer in plan.layers:
            acts_BTD = recorded[layer].float()
            for i, key in enumerate(("image_mask", "caption_mask")):
                codes = saes[layer].encode(acts_BTD[inputs[key].to(acts_BTD.device)])
                idx, val = codes.top_indices.flatten().cpu(), codes.top_acts.flatten().double().cpu()
                fired = val > 0
                out[layer][i] += np.bincount(idx[fired].numpy(), minlength=out[layer].shape[1])
                out[layer][2 + i] += np.bincount(idx.numpy(), weights=val.clamp_min(0).numpy(),
                                                 minlength=out[layer].shape[1])
    return out


def shares_of(counts_4F: np.ndarray, min_fires: int, n_samples: int) -> tuple[ModalityShares, np.ndarray]:
    """The layer's shares, and each feature's modality score (mass on image tokens / all its mass; NaN if none)."""
    on_image, on_text = counts_4F[0] >= min_fires, counts_4F[1] >= min_fires
    alive = on_image | on_text
    n = int(alive.sum())
    mass = counts_4F[2] + counts_4F[3]
    with np.errstate(invalid="ignore", divide="ignore"):
        score_F = np.where(mass > 0, counts_4F[2] / mass, np.nan).astype(np.float32)

    def share(x: np.ndarray) -> float:
        return float(x.sum() / n) if n else float("nan")

    return ModalityShares(share(on_image & ~on_text), share(on_text & ~on_image), share(on_image & on_text), n,
                          min_fires, n_samples, float(counts_4F[2].sum() / max(mass.sum(), 1e-300))), score_F


class ModalityCount:
    """train_mllm.py's part of the training pass: each sample's row per modality as asked (mean or last), then
    the layers' modality shares, counted with the trained SAEs, for both runs' metadata."""

    def __init__(self, opts: MllmOptions):
        self.pools, self.min_fires = opts.pools, opts.min_fires

    def matches(self, meta: RunMeta) -> bool:
        shares = meta.modality_shares
        return (shares is not None and meta.token == self.pools[meta.modality]
                and all(s.min_fires == self.min_fires for s in shares.values()))

    def prepare(self, encoder: Encoder) -> None:
        if not hasattr(encoder, "pools"):
            raise UserError(f"train_mllm.py: --model {type(encoder).__name__} is not a multimodal LLM")
        encoder.pools = self.pools

    def finish(self, plan: EncoderPass, saes: dict[int, TopKSAE], writers: dict[str, RunWriter]) -> dict:
        counts = modality_counts(plan, saes, COUNT_SAMPLES)
        n = min(COUNT_SAMPLES, len(plan.ds))
        shares = {}
        for layer in plan.layers:
            shares[layer], score_F = shares_of(counts[layer], self.min_fires, n)
            for writer in writers.values():
                np.save(writer.tmp / modality_file(layer), score_F)
        return {"modality_shares": shares}


def train_mllm(cfg: TrainConfig, sae_cfg: SaeConfig, opts: MllmOptions) -> MllmResult:
    if cfg.sae_tokens != "all":
        raise UserError("train_mllm.py trains each SAE on the image and caption tokens (--sae_tokens all)")
    results = train_runs(cfg, sae_cfg, "mllm", ModalityCount(opts))
    return MllmResult({m: r.meta for m, r in results.items()}, results["image"].seconds)
