"""A diffusers text-to-image pipeline steered through its text encoder: a vector added to one block's output
while the prompt is encoded, on the conditional branch only unless asked, then the pipeline as it is."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from PIL import Image
from torch import Tensor, nn

from errors import UserError
from wrappedmodels import SD_TOWERS, _first_attr, _load_error, is_network_error, pool_tokens

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMBEDS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
"""What `encode_prompt` returns, in order (SD 1.x/2.x the first two, SDXL all four), as the pipeline's call
takes them back."""
POSITIONS = ("all", "eot")


class Tower(NamedTuple):
    """One text encoder of a pipeline, as the steering hooks need it."""
    text_encoder: nn.Module
    tokenizer: object
    blocks: nn.ModuleList
    which: int
    """1, or 2 for SDXL's text_encoder_2."""


class Generation(NamedTuple):
    """How each image is made (the pipeline's own arguments)."""
    steps: int
    guidance: float
    height: int | None
    width: int | None


def load_pipeline(name: str, device: torch.device, dtype: torch.dtype):
    """The pipeline of a hub id or a local folder (its model_index.json says which class)."""
    from diffusers import DiffusionPipeline

    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise UserError(f"--pipeline {name}: no such pipeline folder")
    path = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    logging.disable(logging.WARNING)  # diffusers warns about every optional component it does not find
    bars = [diffusers_logging, transformers_logging]  # a bar per component and per weight file: ours is the one
    for lib in bars:
        lib.disable_progress_bar()
    try:
        pipe = DiffusionPipeline.from_pretrained(path, dtype=dtype)
    except Exception as e:
        if not is_network_error(e):
            raise
        raise _load_error("pipeline", "--pipeline", name, e) from None
    finally:
        logging.disable(logging.NOTSET)
        for lib in bars:
            lib.enable_progress_bar()
    if not hasattr(pipe, "encode_prompt") or getattr(pipe, "text_encoder", None) is None:
        raise UserError(f"--pipeline {name}: a {type(pipe).__name__} has no CLIP text encoder to steer")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def tower_of(pipe, which: int) -> Tower:
    model_attr, tokenizer_attr = SD_TOWERS[which]
    text_encoder, tokenizer = getattr(pipe, model_attr, None), getattr(pipe, tokenizer_attr, None)
    if text_encoder is None or tokenizer is None:
        raise UserError(f"the pipeline has no {model_attr}: the run was made on text encoder #{which}")
    return Tower(text_encoder, tokenizer, _first_attr(text_encoder, ("text_model.encoder.layers", "encoder.layers")),
                 which)


@torch.no_grad()
def layer_rows(tower: Tower, layer: int, captions: list[str], token: str) -> Tensor:
    """[B, D] float32: the pooled token of `layer` on `captions`, as a run of the SDText family records it."""
    enc = tower.tokenizer(captions, padding=True, truncation=True, max_length=tower.tokenizer.model_max_length,
                          return_tensors="pt")
    device = next(tower.text_encoder.parameters()).device
    out = tower.text_encoder(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                             output_hidden_states=True)
    mask_BT = enc["attention_mask"].bool().to(device)
    return pool_tokens(out.hidden_states[layer + 1].float(), mask_BT, token)


@contextlib.contextmanager
def steering(tower: Tower, layer: int, vector_D: Tensor, positions: str = "all") -> Iterator[None]:
    """While open, block `layer` of the tower outputs its value plus `vector_D`, at every position or only at
    each prompt's end-of-text token (the first EOS id: SD 1.x pads with EOS)."""
    seen: dict[str, Tensor] = {}

    def capture(_module, args, kwargs):
        seen["ids_BT"] = kwargs.get("input_ids", args[0] if args else None)

    def add(_module, _args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        v_D = vector_D.to(hidden.device, hidden.dtype)
        if positions == "eot":
            eot_B = (seen["ids_BT"] == tower.tokenizer.eos_token_id).int().argmax(1).to(hidden.device)
            at_BT1 = (torch.arange(hidden.shape[1], device=hidden.device)[None] == eot_B[:, None])[..., None]
            hidden = hidden + at_BT1.to(hidden.dtype) * v_D
        else:
            hidden = hidden + v_D
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handles = [tower.text_encoder.register_forward_pre_hook(capture, with_kwargs=True),
               tower.blocks[layer].register_forward_hook(add)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def encode(pipe, prompt: str, device: torch.device) -> dict[str, Tensor]:
    """The pipeline's own prompt encoding, with the negative branch it uses when given no negative prompt."""
    out = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    return {k: v for k, v in zip(EMBEDS, out) if v is not None}


class Conditioning(NamedTuple):
    embeds: dict[str, Tensor]
    """The pipeline call's prompt_embeds, negative_prompt_embeds (and SDXL's pooled ones)."""
    change: float
    """||steered - plain|| / ||plain|| of the conditional prompt_embeds (the text encoder's output)."""


def conditioning(pipe, prompt: str, device: torch.device, steer: Callable[[], contextlib.AbstractContextManager],
                 both_branches: bool = False) -> Conditioning:
    """The prompt encoded with the steering hook (conditional branch) and without (unconditional branch,
    unless `both_branches`)."""
    plain = encode(pipe, prompt, device)
    with steer():
        steered = encode(pipe, prompt, device)
    embeds = {k: steered[k] if both_branches or not k.startswith("negative_") else plain[k] for k in plain}
    a, b = steered["prompt_embeds"].double(), plain["prompt_embeds"].double()
    return Conditioning(embeds, float((a - b).norm() / b.norm().clamp_min(1e-12)))


@torch.no_grad()
def generate(pipe, embeds: dict[str, Tensor], seed: int, how: Generation) -> Image.Image:
    """One image; the noise comes from a CPU generator seeded with `seed`, the same on every device."""
    return pipe(**embeds, num_inference_steps=how.steps, guidance_scale=how.guidance, height=how.height,
                width=how.width, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
