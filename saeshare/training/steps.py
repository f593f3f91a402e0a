"""The pieces every pass of an encoder over a dataset shares: one-process training, torchrun training
(`torchrun.py`) and record.py (a trained run applied to other samples). One encoder factory, one typed
plan of the pass, one per-batch step, one way to save a layer's SAEs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

import data
from errors import OptionError, UserError
from sae import Fvu, SaeMetrics, SaeTrainer, SeedStack, TopKSAE
from saeshare.core.progress import progress
from saeshare.disk.runs import FLOAT16_MAX, LayerInfo, RunMeta, RunWriter, SaeSettings, SeedInfo
from wrappedmodels import TOKENS, Encoder, get_encoder_class

PROGRESS_EVERY = 20
"""Batches between two updates of the progress bar's FVU."""


class EncoderSpec(NamedTuple):
    """Which encoder a run records, as training asks for it and as run.json keeps it."""
    model: str
    modality: str
    checkpoint: str | None
    """None: the family's default checkpoint."""
    token: str | None
    """None: the family's default pooled token."""
    image_size: int | None = None
    random_init: bool = False
    """Re-initialise the weights with `seed` (a floor)."""
    seed: int = 0
    dtype: str = "float32"
    """The weights' dtype."""

    @classmethod
    def of_run(cls, meta: RunMeta) -> EncoderSpec:
        if meta.modality_shares is not None:
            raise UserError(f"run {meta.runname!r} is one half of an MLLM pair (train_mllm.py): its model reads an "
                            "image and a caption together, so it cannot be run again on one side alone")
        return cls(meta.model, meta.modality, meta.checkpoint, meta.token, meta.image_size, meta.random_init,
                   meta.sae.seed, meta.encoder_dtype)


def build_encoder(spec: EncoderSpec, device: torch.device | str) -> Encoder:
    """The encoder of `spec`: its checkpoint, token, input size, and random weights for a floor."""
    encoder = get_encoder_class(spec.model, spec.modality)(spec.checkpoint, device=device, token=spec.token,
                                                           dtype=spec.dtype)
    if spec.random_init:
        encoder.reinitialise(spec.seed)
    if spec.image_size is not None:
        if not hasattr(encoder, "image_size"):
            raise UserError(f"--image_size applies to EfficientNetLite; {spec.model} uses its own processor")
        encoder.image_size = spec.image_size
    return encoder


@dataclass(frozen=True)
class EncoderPass:
    """One pass of an encoder over a dataset, as every kind of pass needs it: built once, read by every step."""
    ds: data.PairedDataset
    encoder: Encoder
    layers: list[int]
    settings: SaeSettings
    """Batch size, shuffle and seed (the order the SAEs see the samples in), padding."""
    acts_dtype: str
    """dtype of the stored pooled rows."""
    device: torch.device
    desc: str
    """The progress bar's label."""
    num_workers: int | None = None
    """DataLoader workers; None: a few on a GPU, none on a CPU."""

    def loader(self, **sampling) -> DataLoader:
        """Batches of (sample ids, encoder inputs); `sampling`: DataLoader's sampler or batch_sampler."""
        workers = (self.num_workers if self.num_workers is not None
                   # a GPU waits on decoding without workers; on a CPU they would compete with the model
                   else min(8, os.cpu_count() or 1) if self.device.type == "cuda" else 0)
        return DataLoader(Samples(self.ds, self.encoder), num_workers=workers, collate_fn=Collate(self.encoder),
                          **sampling)


class Samples(Dataset):
    """Feeds the modality's side of each paired sample through the encoder's per-sample transform."""

    def __init__(self, ds: data.PairedDataset, encoder: Encoder):
        self.ds, self.encoder = ds, encoder

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return i, self.encoder.transform(self.encoder.sample_of(self.ds, i))


class Collate:
    """(sample ids [B], the encoder's batch): the ids say where each pooled row goes. A class, not a
    closure, so that DataLoader workers can pickle it."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, items: list) -> tuple[np.ndarray, dict]:
        return np.array([i for i, _ in items]), self.encoder.collate([x for _, x in items])


def sample_order(settings: SaeSettings, n: int) -> np.ndarray:
    """The paper's shuffled loader: the SAEs see the samples in a seeded random order; the rows are written at
    each sample's own index, so the run stays in dataset order and paired with others."""
    return np.random.default_rng(settings.seed).permutation(n) if settings.shuffle else np.arange(n)


class LayerBatch(NamedTuple):
    tokens_ND: Tensor
    """Training tokens of the batch (padding excluded unless settings.train_on_padding)."""
    pooled: dict[str, np.ndarray]
    """Per row set (Encoder.row_sets), the [B, D] row of every sample of the batch."""


def layer_outputs(plan: EncoderPass, inputs: dict, recorded_BTD: Tensor, layer: int, rows: np.ndarray) -> LayerBatch:
    """One layer's output for a batch, checked for NaN and for the float16 range."""
    acts_BTD = recorded_BTD.float()
    _check_finite(acts_BTD, layer, rows, plan.ds)
    mask_BT = plan.encoder.token_mask(inputs, acts_BTD)
    tokens_ND = acts_BTD.reshape(-1, acts_BTD.shape[-1]) if plan.settings.train_on_padding else acts_BTD[mask_BT]
    pooled = {m: rows_BD.cpu().numpy() for m, rows_BD in plan.encoder.pooled_rows(acts_BTD, inputs, mask_BT).items()}
    if plan.acts_dtype == "float16" and max(np.abs(p).max() for p in pooled.values()) > FLOAT16_MAX:
        raise UserError(f"layer {layer}: pooled activations exceed the float16 range; use --acts_dtype float32")
    return LayerBatch(tokens_ND, pooled)


class TrainedLayers(NamedTuple):
    """What a training pass leaves for the runs to be written from."""
    acts: dict[str, dict[int, np.ndarray]]
    """Per row set and layer, the pooled rows [N, d] already in that run's writer."""
    saes: dict[int, list[tuple[TopKSAE, SaeMetrics]]]
    """Per layer, each seed's trained SAE with its training metrics."""


def _check_finite(acts_BTD: Tensor, layer: int, rows: np.ndarray, ds: data.PairedDataset) -> None:
    """NaN or inf from the encoder is one clear line naming the layer and the sample, not a NaN SAE."""
    finite_B = torch.isfinite(acts_BTD).flatten(1).all(1).cpu().numpy()
    if not finite_B.all():
        n = int(rows[np.argmin(finite_B)])
        raise UserError(f"layer {layer}: NaN or inf in the encoder's activations of sample {n} "
                        f"(id {ds.sample_ids[n]!r}); check the model's dtype and inputs")


def layer_width(plan: EncoderPass, layer: int) -> int:
    """The width of a layer's output, from one sample (before a whole pass)."""
    rows, inputs = next(iter(plan.loader(batch_size=1, sampler=[0])))
    return int(plan.encoder.record(inputs, [layer])[layer].shape[-1])


def encoder_pass(plan: EncoderPass, writers: dict[str, RunWriter],
                 on_tokens: Callable[[int, Tensor], None] | None = None,
                 postfix: Callable[[], str] | None = None) -> dict[str, dict[int, np.ndarray]]:
    """The pass on one process, in the order training uses: every layer's pooled rows written at their
    sample's row of each row set's run (its [N, d] arrays, returned by row set and layer);
    on_tokens(layer, tokens_ND) gets each batch's training tokens."""
    n = len(plan.ds)
    loader = plan.loader(batch_size=plan.settings.batch_size, sampler=sample_order(plan.settings, n).tolist())
    acts: dict[str, dict[int, np.ndarray]] = {m: {} for m in writers}
    done = 0
    bar = progress(loader, desc=plan.desc, unit="batch")
    for rows, inputs in bar:
        recorded = plan.encoder.record(inputs, plan.layers)
        for layer in plan.layers:
            out = layer_outputs(plan, inputs, recorded[layer], layer, rows)
            if on_tokens is not None:
                on_tokens(layer, out.tokens_ND)
            for m, rows_BD in out.pooled.items():
                if layer not in acts[m]:
                    acts[m][layer] = writers[m].acts(layer, n, rows_BD.shape[-1], plan.acts_dtype)
                acts[m][layer][rows] = rows_BD
        done += len(rows)
        if postfix is not None and bar.n % PROGRESS_EVERY == 0:  # a metric read syncs the device
            bar.set_postfix_str(postfix())
    if done != n:
        raise RuntimeError(f"recorded {done} samples out of {n}")
    return acts


def _init_seed(seed: int, layer: int) -> int:
    """Seed of one SAE's initialisation: distinct for every (SAE seed, layer)."""
    return seed * 1_000_003 + layer


def new_trainers(d_model: int, layer: int, settings: SaeSettings, device: torch.device) -> SeedStack:
    """One SAE trainer per seed of a layer, stepped together."""
    if settings.top_k > settings.expansion_factor * d_model:
        raise OptionError("top_k", f"{{opt}} {settings.top_k} is more than the {settings.expansion_factor * d_model} "
                                   f"features of layer {layer}'s SAE (--expansion_factor {settings.expansion_factor} "
                                   f"x width {d_model})")
    return SeedStack([SaeTrainer(d_model, settings, device=device, seed=_init_seed(s, layer)) for s in settings.seeds])


def train_steps(trainers: SeedStack, x_ND: Tensor) -> None:
    """One step of each seed's SAE on the same tokens."""
    with torch.enable_grad():
        trainers.train_step(x_ND)


def check_informative(layer: int, pooled_ND: np.ndarray, token: str) -> None:
    """A pooled token identical for every sample carries nothing to train on or compare."""
    n = pooled_ND.shape[0]
    sample_ND = np.asarray(pooled_ND[: min(n, 4096)], dtype=np.float32)
    # batch sizes change float rounding, so "identical" is up to a relative 1e-5
    if n > 1 and np.ptp(sample_ND, axis=0).max() <= 1e-5 * max(float(np.abs(sample_ND).max()), 1e-30):
        raise UserError(f"layer {layer}: the pooled token ({token}) is identical for every sample, "
                        f"so it carries no information; choose another --token ({', '.join(TOKENS)})")


def save_layer(layer: int, saes: list[tuple[TopKSAE, SaeMetrics | None]], seeds: list[int], pooled_ND: np.ndarray,
               writer: RunWriter, device: torch.device) -> LayerInfo:
    """Write each seed's SAE of a layer (with its training metrics, None for an SAE applied, not trained)
    and its FVU on the layer's pooled rows."""
    per_seed = {}
    for i, (seed, (sae, metrics)) in enumerate(zip(seeds, saes)):
        writer.save_sae(layer, sae.state(), None if i == 0 else seed)
        per_seed[seed] = SeedInfo(fvu_pooled(sae.to(device), pooled_ND, device),
                                  **(metrics._asdict() if metrics is not None else {}))
    first, sae = per_seed[seeds[0]], saes[0][0]
    return LayerInfo(sae.d_model, sae.n_features, first.fvu, first.l0, first.dead_fraction, first.tokens_seen,
                     first.fvu_pooled, first.steps, first.fvu_fall, per_seed)


@torch.no_grad()
def fvu_pooled(sae: TopKSAE, pooled_ND: np.ndarray, device, chunk: int = 8192) -> float:
    """FVU of an SAE on recorded pooled tokens (the vectors the analyses read)."""
    fvu = Fvu()
    for s in range(0, pooled_ND.shape[0], chunk):
        x = torch.from_numpy(np.asarray(pooled_ND[s:s + chunk], dtype=np.float32)).to(device)
        fvu.update(x, sae(x).x_hat)
    return fvu.value()
