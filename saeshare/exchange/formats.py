"""SAE files of other libraries, read and written (SAELens, EleutherAI's sparsify). One class per format in
a registry: a new library is one class. Every format here holds a top-k SAE whose codes are
TopK(ReLU((x - b_dec) W_enc + b_enc)), as this project's TopKSAE computes them; what a format cannot say
(an activation it does not share) is refused with one line, never guessed."""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from errors import UserError
from sae import TopKSAE
from saeshare.disk.files import write_atomic

FORMATS: dict[str, type["Format"]] = {}


def register(cls: type["Format"]) -> type["Format"]:
    FORMATS[cls.name] = cls
    return cls


class Imported(NamedTuple):
    sae: TopKSAE
    metadata: dict
    """What the file says of where the SAE comes from (model, hook, ...), as it says it."""


class Format(ABC):
    name: ClassVar[str]
    files: ClassVar[tuple[str, ...]]
    """The files of one SAE's folder: a folder holding them all is this format."""

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_dir() and all((path / f).is_file() for f in cls.files)

    @classmethod
    @abstractmethod
    def write(cls, sae: TopKSAE, folder: Path, metadata: dict) -> None:
        """One SAE as the library's folder layout (files written atomically)."""

    @classmethod
    @abstractmethod
    def read(cls, folder: Path) -> Imported:
        """One SAE from the library's folder layout."""


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _need(obj: dict, keys: tuple[str, ...], where: Path) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}")


def _sae(state: dict[str, torch.Tensor], top_k: int, where: Path) -> TopKSAE:
    try:
        return TopKSAE.from_state(state, int(top_k)).eval().requires_grad_(False)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"{where}: {str(e).splitlines()[0]}") from None


def _save_json(path: Path, obj: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    write_atomic(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


def _b_enc(sae: TopKSAE) -> torch.Tensor:
    return sae.b_enc.detach().cpu() if sae.b_enc is not None else torch.zeros(sae.n_features)


@register
class SaeLens(Format):
    """SAELens v6: `cfg.json` (architecture "topk", k, d_in, d_sae, metadata) and `sae_weights.safetensors`
    (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec)."""
    name = "saelens"
    files = ("cfg.json", "sae_weights.safetensors")

    @classmethod
    def write(cls, sae, folder, metadata):
        folder.mkdir(parents=True, exist_ok=True)
        state = sae.state()
        _save_tensors(folder / "sae_weights.safetensors", {"W_enc": state["W_enc"], "b_enc": _b_enc(sae),
                                                           "W_dec": state["W_dec"], "b_dec": state["b_dec"]})
        _save_json(folder / "cfg.json", {
            "architecture": "topk", "d_in": sae.d_model, "d_sae": sae.n_features, "k": sae.top_k,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "rescale_acts_by_decoder_norm": False, "metadata": metadata})

    @classmethod
    def read(cls, folder):
        cfg = _json(folder / "cfg.json")
        _need(cfg, ("architecture", "d_in", "d_sae"), folder / "cfg.json")
        if cfg["architecture"] != "topk":
            raise UserError(f"{folder}: a SAELens {cfg['architecture']!r} SAE; only top-k SAEs are read")
        if cfg.get("normalize_activations", "none") not in ("none", None):
            raise UserError(f"{folder}: normalize_activations {cfg['normalize_activations']!r} is not supported")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise UserError(f"{folder}: rescale_acts_by_decoder_norm is not supported (fold the decoder norm "
                            "into the encoder first: SAELens' fold_W_dec_norm)")
        _need(cfg, ("k",), folder / "cfg.json")
        t = _tensors(folder / "sae_weights.safetensors")
        _need(t, ("W_enc", "b_enc", "W_dec", "b_dec"), folder / "sae_weights.safetensors")
        b_enc = t["b_enc"]
        if not cfg.get("apply_b_dec_to_input", True):
            # SAELens then encodes x, not x - b_dec (and still adds b_dec when decoding): the same codes as
            # (x - b_dec) W_enc + (b_enc + b_dec W_enc)
            b_enc = b_enc + t["b_dec"] @ t["W_enc"]
        sae = _sae({"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"], "b_enc": b_enc}, cfg["k"], folder)
        return Imported(sae, dict(cfg.get("metadata") or {}))


@register
class Sparsify(Format):
    """EleutherAI's sparsify (PyPI eai-sparsify): `cfg.json` (k, num_latents, expansion_factor, d_in, ...)
    and `sae.safetensors` (encoder.weight [F, d_in], encoder.bias [F], W_dec [F, d_in], b_dec). Its codes are
    TopK(ReLU((x - b_dec) encoder.weight^T + encoder.bias)), the same as TopKSAE's."""
    name = "sparsify"
    files = ("cfg.json", "sae.safetensors")

    @classmethod
    def write(cls, sae, folder, metadata):
        folder.mkdir(parents=True, exist_ok=True)
        state = sae.state()
        _save_tensors(folder / "sae.safetensors", {"encoder.weight": state["W_enc"].T, "encoder.bias": _b_enc(sae),
                                                   "W_dec": state["W_dec"], "b_dec": state["b_dec"]})
        expansion = sae.n_features // sae.d_model
        _save_json(folder / "cfg.json", {
            "activation": "topk", "expansion_factor": expansion, "normalize_decoder": False,
            "num_latents": sae.n_features, "k": sae.top_k, "multi_topk": False, "skip_connection": False,
            "transcode": False, "d_in": sae.d_model, "saeshare": metadata})

    @classmethod
    def read(cls, folder):
        cfg = _json(folder / "cfg.json")
        _need(cfg, ("d_in", "k"), folder / "cfg.json")
        if cfg.get("activation", "topk") != "topk":
            raise UserError(f"{folder}: a sparsify {cfg['activation']!r} coder; only top-k SAEs are read")
        if cfg.get("transcode") or cfg.get("skip_connection"):
            raise UserError(f"{folder}: a transcoder or a skip connection is not an SAE of its own input")
        t = _tensors(folder / "sae.safetensors")
        _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), folder / "sae.safetensors")
        sae = _sae({"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["W_dec"],
                    "b_dec": t["b_dec"]}, cfg["k"], folder)
        return Imported(sae, dict(cfg.get("saeshare") or {}))


def detect(path: Path) -> type[Format]:
    """The format of an SAE folder, from the files it holds."""
    found = [f for f in FORMATS.values() if f.detect(path)]
    if not path.exists():
        raise UserError(f"no SAE at {str(path)!r}")
    if len(found) != 1:
        what = "no format" if not found else "several formats (" + ", ".join(f.name for f in found) + ")"
        known = "; ".join(f"{f.name}: {' + '.join(f.files)}" for f in FORMATS.values())
        raise UserError(f"{str(path)!r} matches {what}: give --sae_format ({known})")
    return found[0]


def read(path: str | Path, fmt: str = "auto") -> Imported:
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown --sae_format {fmt!r}; choose auto, {', '.join(FORMATS)}")
    cls = detect(path) if fmt == "auto" else FORMATS[fmt]
    if not cls.detect(path):
        raise UserError(f"{str(path)!r} is not a {cls.name} SAE folder (it needs {' and '.join(cls.files)})")
    return cls.read(path)
