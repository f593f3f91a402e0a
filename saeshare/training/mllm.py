"""train_mllm.py's pass: one forward per batch of (image, caption) prompts through a multimodal LLM; each layer's
SAEs train on its image and caption tokens together; each sample stores an image row and a caption row, written
as two complete runs (`<runname>_image`, `<runname>_text`) over the same samples and the same SAEs."""
from __future__ import annotations

import contextlib
import time
from typing import NamedTuple

import numpy as np
import torch

from errors import UserError
from sae import SaeConfig, SaeTrainer
from saeshare.core.distributed import resolve_device
from saeshare.core.progress import progress
from saeshare.disk.runs import ModalityShares, RunMeta, RunWriter, modality_file
from saeshare.training.steps import (
    EncoderPass,
    _check_finite,
    build_encoder,
    check_informative,
    new_trainers,
    sample_order,
    save_layer,
    train_steps,
)
from saeshare.training.train import TrainConfig, _settings, _versions

MODALITIES = ("image", "text")
COUNT_SAMPLES = 256
"""Samples whose tokens the modality shares are counted on, after training."""


class MllmResult(NamedTuple):
    metas: dict[str, RunMeta]
    """"image" / "text" -> the run written."""
    shares: dict[int, ModalityShares]
    seconds: float


def run_names(runname: str) -> dict[str, str]:
    return {m: f"{runname}_{m}" for m in MODALITIES}


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


def _pass(plan: EncoderPass, writers: dict[str, RunWriter]) -> tuple[dict, dict[int, list[SaeTrainer]]]:
    n = len(plan.ds)
    loader = plan.loader(batch_size=plan.settings.batch_size, sampler=sample_order(plan.settings, n).tolist())
    acts: dict[str, dict[int, np.ndarray]] = {m: {} for m in MODALITIES}
    trainers: dict[int, list[SaeTrainer]] = {}
    for rows, inputs in progress(loader, desc=plan.desc, unit="batch"):
        recorded = plan.encoder.record(inputs, plan.layers)
        for layer in plan.layers:
            acts_BTD = recorded[layer].float()
            _check_finite(acts_BTD, layer, rows, plan.ds)
            tokens_ND = acts_BTD[inputs["token_mask"].to(acts_BTD.device)]
            if layer not in trainers:
                trainers[layer] = new_trainers(tokens_ND.shape[-1], layer, plan.settings, plan.device)
            train_steps(trainers[layer], tokens_ND)
            for m, rows_BD in plan.encoder.pool_modalities(acts_BTD, inputs).items():
                if layer not in acts[m]:
                    acts[m][layer] = writers[m].acts(layer, n, rows_BD.shape[-1], plan.acts_dtype)
                acts[m][layer][rows] = rows_BD.cpu().numpy()
    return acts, trainers


def train_mllm(cfg: TrainConfig, sae_cfg: SaeConfig, pools: dict[str, str], min_fires: int = 5) -> MllmResult:
    t0 = time.perf_counter()
    names = run_names(cfg.runname)
    with contextlib.ExitStack() as stack:
        writers = {m: stack.enter_context(RunWriter(cfg.root, names[m], cfg.overwrite)) for m in MODALITIES}
        device = resolve_device(cfg.device)
        ds = cfg.load(cfg.shuffle_captions)
        encoder = build_encoder(cfg.encoder_spec("mllm"), device)
        encoder.pools = pools
        layers = encoder.resolve_layers(cfg.layers)
        settings = _settings(cfg, sae_cfg, "mllm")
        plan = EncoderPass(ds, encoder, layers, settings, cfg.acts_dtype, device,
                           f"{cfg.runname}: {len(layers)} layers", cfg.num_workers)
        acts, trainers = _pass(plan, writers)
        counts = modality_counts(plan, {layer: t[0].sae for layer, t in trainers.items()}, COUNT_SAMPLES)
        scored = {layer: shares_of(counts[layer], min_fires, min(COUNT_SAMPLES, len(ds))) for layer in layers}
        shares = {layer: s for layer, (s, _) in scored.items()}
        metas = {}
        for m, writer in writers.items():
            for layer in layers:
                check_informative(layer, acts[m][layer], f"{pools[m]} of the {m} tokens")
                np.save(writer.tmp / modality_file(layer), scored[layer][1])
            info = {layer: save_layer(layer, [(t.sae, t.metrics()) for t in trainers[layer]], settings.seeds,
                                      acts[m][layer], writer, device) for layer in layers}
            metas[m] = writer.finish(RunMeta(
                runname=names[m], modality=m, model=cfg.model, checkpoint=encoder.checkpoint,
                token=pools[m], dataset=ds.describe(), sae=settings, layers=layers, layer_info=info,
                n_layers_model=encoder.n_layers, acts_dtype=cfg.acts_dtype, random_init=cfg.random_init,
                versions=_versions(), device=str(device), modality_shares=shares))
    return MllmResult(metas, shares, time.perf_counter() - t0)


def check_pools(pools: dict[str, str]) -> dict[str, str]:
    bad = {m: p for m, p in pools.items() if p not in ("mean", "last")}
    if bad:
        m, p = next(iter(bad.items()))
        raise UserError(f"--{m}_token {p!r}: choose mean or last")
    return dict(pools)

