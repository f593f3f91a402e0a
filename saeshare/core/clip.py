"""Unit CLIP embeddings of images and texts (an open_clip model: name, hf-hub: name or local folder), for the
zero-shot scorers of labels.py and steer.py."""
from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor


class ClipEmbedder:
    def __init__(self, clip_model_name: str, device):
        from wrappedmodels import ClipText

        self.clip = ClipText(clip_model_name, device=device)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> Tensor:
        """[n, E] unit rows, float32."""
        return _unit(self.clip.model.encode_text(self.clip.tokenizer(texts).to(self.clip.device)))

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> Tensor:
        """[n, E] unit rows, float32."""
        x = torch.stack([self.clip.preprocess(im) for im in images]).to(self.clip.device)
        return _unit(self.clip.model.encode_image(x))


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)
