"""What training and the all-layers wMPPC matrix cost, counted from this code's own work (docs/design.md#scale): the
study's `--dry_run` and bench/cost.py.

- training: the encoder's forward pass (2 FLOPs per parameter and token) and, per layer, seed and token,
  the SAE step's dense encoder product (2 d F forward, 2 d F for its gradient: the decoder and top-k parts
  are sparse, k/F of that);
- the matrix with `relu` codes: for every ordered pair, the dense path's plan (dense.plan within the
  accumulator memory) gives the groups; each (A group, B group) pass computes both groups' codes (2 N d f)
  and their product (2 N f_a f_b); again for each floor, and each run's ceiling (its seed 0 against each
  other seed, one per column).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from saeshare.engine import dense

PEAK_TFLOPS = {"fp32": 67, "tf32": 495, "bf16": 990}
"""H100 SXM dense peaks."""
EFFICIENCY = 0.8
"""Share of the peak the products reach (bench/bench_wmppc.py (a) measures it against torch.mm)."""


class EncoderSize(NamedTuple):
    widths: list[int]
    """d of each recorded layer."""
    tokens: list[float]
    """Tokens per sample the SAEs of each layer train on (a CNN's blocks have fewer positions as they go)."""
    params: float
    """Encoder parameters (0: unknown, the forward pass is not counted)."""


CAPTION_TOKENS = 14
"""Mean tokens of a COCO caption with its special tokens, padding excluded (the SAEs skip padding)."""
PAPER = {  # (family, checkpoint): (d, layers, tokens per sample, parameters), from the model cards
    ("ClipVision", "ViT-B/16-quickgelu"): (768, 12, 197, 86e6),
    ("ClipVision", "ViT-L/14-quickgelu"): (1024, 24, 257, 304e6),
    ("ClipText", "ViT-B/16-quickgelu"): (512, 12, CAPTION_TOKENS, 63e6),
    ("ClipText", "ViT-L/14-quickgelu"): (768, 12, CAPTION_TOKENS, 123e6),
    ("ClipVision", "hf-hub:apple/DFN2B-CLIP-ViT-B-16"): (768, 12, 197, 86e6),
    ("ClipVision", "hf-hub:apple/DFN2B-CLIP-ViT-L-14"): (1024, 24, 257, 304e6),
    ("ClipText", "hf-hub:apple/DFN2B-CLIP-ViT-B-16"): (512, 12, CAPTION_TOKENS, 63e6),
    ("ClipText", "hf-hub:apple/DFN2B-CLIP-ViT-L-14"): (768, 12, CAPTION_TOKENS, 123e6),
    ("SigLIP2Vision", "google/siglip2-base-patch16-384"): (768, 12, 576, 93e6),
    ("SigLIP2Vision", "google/siglip2-large-patch16-384"): (1024, 24, 576, 316e6),
    ("SiglipText", "google/siglip2-base-patch16-384"): (768, 12, CAPTION_TOKENS, 110e6),
    ("SiglipText", "google/siglip2-large-patch16-384"): (1024, 24, CAPTION_TOKENS, 300e6),
    ("ViT", "google/vit-base-patch16-384"): (768, 12, 577, 86e6),
    ("ViT", "google/vit-large-patch16-384"): (1024, 24, 577, 304e6),
    ("DinoV2", "dinov2_vitb14"): (768, 12, 257, 86e6),
    ("DinoV2", "dinov2_vitl14"): (1024, 24, 257, 304e6),
    ("Bert", "bert-base-uncased"): (768, 12, CAPTION_TOKENS, 110e6),
    ("Bert", "bert-large-uncased"): (1024, 24, CAPTION_TOKENS, 335e6),
    ("Deberta", "microsoft/deberta-base"): (768, 12, CAPTION_TOKENS, 140e6),
    ("Deberta", "microsoft/deberta-large"): (1024, 24, CAPTION_TOKENS, 400e6),
}
"""The paper's 20 encoders (studies/paper_coco.toml)."""
MLLMS = {  # the language model's layers; tokens: 576 image patches and the caption; parameters with the vision tower
    ("Llava", "llava-hf/llava-1.5-7b-hf"): (4096, 32, 576 + CAPTION_TOKENS, 7.06e9),
    ("Llava", "llava-hf/llava-1.5-13b-hf"): (5120, 40, 576 + CAPTION_TOKENS, 13.35e9),
}
PUBLISHED = {**PAPER, **MLLMS}
"""Sizes for costs without loading the models (offline dry runs, bench/cost.py)."""


DATASET_SIZES = {"coco": 118_287}
"""Samples of a hub dataset's train split (wangherr/coco2017_train_image_caption), for offline dry runs."""


def published(model: str, checkpoint: str, layers: list[int] | None) -> EncoderSize | None:
    """A PUBLISHED encoder's size over `layers` (None: all), or None for an encoder not in the table."""
    if (model, checkpoint) not in PUBLISHED:
        return None
    d, n_layers, tokens, params = PUBLISHED[model, checkpoint]
    n = n_layers if layers is None else len(layers)
    return EncoderSize([d] * n, [float(tokens)] * n, params)


def training_flops(size: EncoderSize, n: int, expansion: int, seeds: int) -> tuple[float, float]:
    """(the encoder's forward passes, the SAE steps) over n samples."""
    sae = sum(n * t * seeds * 4 * d * expansion * d for d, t in zip(size.widths, size.tokens))
    return n * max(size.tokens) * 2 * size.params, sae


def pair_flops(a: EncoderSize, b: EncoderSize, n: int, expansion: int, mem_gb: float) -> float:
    """One ordered pair, all layers, relu codes, as the dense path plans it."""
    sizes_a = [dense.LayerSize(i, expansion * d) for i, d in enumerate(a.widths)]
    sizes_b = [dense.LayerSize(i, expansion * d) for i, d in enumerate(b.widths)]
    plan = dense.plan(sizes_a, sizes_b, int(mem_gb * 2**30) // 4)
    n_ga, n_gb = len(dense.pack(sizes_a, plan.cap_a)), len(dense.pack(sizes_b, plan.cap_b))
    codes = 2 * n * expansion * (sum(d * d for d in a.widths) * n_gb + sum(d * d for d in b.widths) * n_ga)
    return 2 * n * sum(s.n_features for s in sizes_a) * sum(s.n_features for s in sizes_b) + codes


def matrix_flops(sizes: list[EncoderSize], n: int, expansion: int, mem_gb: float, calibrate: bool,
                 seeds: int) -> float:
    scores = sum(pair_flops(a, b, n, expansion, mem_gb) for i, a in enumerate(sizes) for j, b in enumerate(sizes)
                 if i != j)
    if not calibrate:
        return scores
    ceilings = sum(pair_flops(a, a, n, expansion, mem_gb) for a in sizes) * (seeds - 1) * (len(sizes) - 1)
    return 2 * scores + ceilings


def hours(flops: float, precision: str, efficiency: float = EFFICIENCY) -> float:
    return flops / (PEAK_TFLOPS[precision] * 1e12 * efficiency) / 3600


@torch.no_grad()
def measure(encoder, ds, layers: list[int], samples: int = 8) -> EncoderSize:
    """An encoder's size from one forward pass over a few samples: what it records, not a table."""
    items = [encoder.transform(encoder.sample_of(ds, i)) for i in range(min(samples, len(ds)))]
    inputs = encoder.collate(items)
    recorded = encoder.record(inputs, layers)
    tokens = [float(encoder.token_mask(inputs, recorded[layer]).sum()) / len(items) for layer in layers]
    params = float(sum(p.numel() for p in encoder.model.parameters()))
    return EncoderSize([int(recorded[layer].shape[-1]) for layer in layers], tokens, params)


def table(rows: list[tuple[str, float, dict[str, float | None]]]) -> str:
    """A Markdown table of (work, FLOPs, precision -> hours or None when not offered)."""
    head = "| work | PFLOP | " + " | ".join(PEAK_TFLOPS) + " |\n|---|---|" + "---|" * len(PEAK_TFLOPS)
    lines = [f"| {name} | {f'{flops / 1e15:,.0f}' if flops >= 1e16 else f'{flops / 1e15:.3g}'} | "
             + " | ".join("–" if h is None else _duration(h) for h in by.values()) + " |" for name, flops, by in rows]
    return "\n".join([head, *lines])


def _duration(hours_: float) -> str:
    if hours_ >= 1:
        return f"{hours_:.1f} h"
    return f"{hours_ * 60:.0f} min" if hours_ * 60 >= 1 else f"{hours_ * 3600:.1f} s"
