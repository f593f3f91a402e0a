"""Where in a sample a feature fires: the run's encoder re-run on the shown samples only, every token of
the layer through its SAE. On images, the feature's activation per position is laid on the image (CNN maps
and ViT patches alike: the tokens after the prefix, CLS and registers, form a square grid); on captions,
each word is shaded by its tokens' activation."""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image

import data
from errors import UserError
from saeshare.disk.runs import Run
from saeshare.training.steps import EncoderSpec, build_encoder

ALPHA = 0.55
"""Opacity of the heat at the feature's largest activation on a tile (0 where it does not fire)."""


class _SampleMaps:
    """The run's encoder, dataset and layer SAE, and each shown sample's codes, computed once (cached)."""

    def __init__(self, run: Run, layer: int, device: torch.device | str = "cpu"):
        self.run, self.layer, self.device = run, layer, device
        self.encoder = build_encoder(EncoderSpec.of_run(run.meta), device)
        self.ds = data.from_description(run.meta.dataset)
        self.sae = run.sae(layer, device)
        self.codes = functools.lru_cache(maxsize=128)(self._codes)

    def _codes(self, n: int) -> np.ndarray:
        raise NotImplementedError


class TokenMaps(_SampleMaps):
    """Per shown sample, the SAE codes of every spatial token of one layer: [g, g, F]."""

    def _codes(self, n: int) -> np.ndarray:
        inputs = self.encoder.collate([self.encoder.transform(self.ds.image(n))])
        tokens_TD = self.encoder.record(inputs, [self.layer])[self.layer][0].float()
        spatial = tokens_TD[self.encoder.n_prefix_tokens:]
        side = math.isqrt(len(spatial))
        if side * side != len(spatial):
            raise UserError(f"--heatmaps: layer {self.layer} of {self.run.meta.model} has {len(spatial)} positions, "
                            "not a square grid")
        with torch.no_grad():
            return self.sae.pre_acts(spatial.to(self.device)).cpu().numpy().reshape(side, side, -1)

    def heat(self, n: int, feature: int) -> np.ndarray:
        """[g, g]: the feature's ReLU code at each position of sample n."""
        return self.codes(n)[:, :, feature]


def word_positions(ids_T: list[int], words_ids: list[list[int]]) -> list[list[int]]:
    """Each word's positions in the tokenised caption: its ids alone, found in order from where the last word
    ended (special tokens are skipped over; a word cut off by truncation, or tokenised otherwise in context,
    gets none)."""
    out, at = [], 0
    for ids in words_ids:
        hit = next((p for p in range(at, len(ids_T) - len(ids) + 1) if ids and ids_T[p:p + len(ids)] == ids), None)
        out.append([] if hit is None else list(range(hit, hit + len(ids))))
        at = at if hit is None else hit + len(ids)
    return out


class CaptionMaps(_SampleMaps):
    """Per shown caption, every word's SAE codes: the largest over its tokens, [W, F]."""

    def _codes(self, n: int) -> np.ndarray:
        caption = self.ds.caption(n)
        inputs = self.encoder.collate([caption])
        keep_T = inputs["token_mask"][0].bool()
        ids_T = inputs[self.encoder.ids_key][0][keep_T].tolist()
        tokens_TD = self.encoder.record(inputs, [self.layer])[self.layer][0][keep_T.to(self.device)].float()
        with torch.no_grad():
            codes_TF = self.sae.pre_acts(tokens_TD.to(self.device)).cpu().numpy()
        where = word_positions(ids_T, [self.encoder.word_ids(w) for w in caption.split()])
        return np.stack([codes_TF[p].max(0) if p else np.zeros(codes_TF.shape[1], codes_TF.dtype) for p in where])

    def heat(self, n: int, feature: int) -> np.ndarray:
        """[W]: the feature's ReLU code on each word of sample n's caption (split at white space)."""
        return self.codes(n)[:, feature]


def sample_maps(run: Run, layer: int, device: torch.device | str = "cpu") -> TokenMaps | CaptionMaps:
    """Where a feature fires in each shown sample: on the image for an image run, on the words of the caption
    for a text run."""
    return (CaptionMaps if run.meta.modality == "text" else TokenMaps)(run, layer, device)


def overlay(tile: Image.Image, heat_gg: np.ndarray, image_size: tuple[int, int], scale: float) -> Image.Image:
    """The heat (upsampled, over the letterboxed image's own region of the tile) laid on the tile; `scale`:
    the activation shown fully opaque (the largest on the grid, so tiles of one feature compare)."""
    import matplotlib

    t = tile.size[0]
    w, h = image_size
    fw, fh = (t, round(t * h / w)) if w >= h else (round(t * w / h), t)
    x0, y0 = (t - fw) // 2, (t - fh) // 2
    level = np.clip(heat_gg / scale, 0, 1) if scale > 0 else np.zeros_like(heat_gg)
    big = np.asarray(Image.fromarray((level * 255).astype(np.uint8)).resize((fw, fh), Image.Resampling.BILINEAR)) / 255
    rgba = matplotlib.colormaps["inferno"](big)
    rgba[..., 3] = big * ALPHA
    layer = Image.new("RGBA", (t, t), (0, 0, 0, 0))
    layer.paste(Image.fromarray((rgba * 255).astype(np.uint8), "RGBA"), (x0, y0))
    return Image.alpha_composite(tile.convert("RGBA"), layer).convert("RGB")
