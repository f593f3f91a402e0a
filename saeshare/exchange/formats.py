"""SAE files of other libraries, read and written (SAELens, EleutherAI's sparsify, dictionary_learning, saev).
One class per format in a registry: a new library is one class. Each format's codes are
TopK(ReLU((x - b_dec) W_enc + b_enc)) as this project's TopKSAE computes them (saev's ReLU SAE: every
feature, top_k = F); what a format cannot say (an activation it does not share) is refused with one line,
never guessed. Pickled files are read with torch.load(weights_only=True): tensors only, nothing executed."""
from __future__ import annotations

import io
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
    def read(cls, folder: Path, normalised: bool = False) -> Imported:
        """One SAE from the library's folder layout; `normalised`: the user gives the input normalisation."""


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
    """SAELens v6: `cfg.json` (architecture "topk", "standard" or "jumprelu", k, d_in, d_sae, metadata) and
    `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec; jumprelu: threshold).
    Written as "topk"."""
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
    def read(cls, folder, normalised=False):
        cfg = _json(folder / "cfg.json")
        _need(cfg, ("architecture", "d_in", "d_sae"), folder / "cfg.json")
        if cfg["architecture"] not in ("topk", "standard", "jumprelu"):
            raise UserError(f"{folder}: a SAELens {cfg['architecture']!r} SAE; topk, standard (ReLU) and jumprelu "
                            "SAEs are read")
        how = cfg.get("normalize_activations") or "none"
        if how not in ("none", "expected_average_only_in"):  # per-input rescaling: no fixed map to fold
            raise UserError(f"{folder}: normalize_activations {how!r} rescales every input by its own norm, which "
                            "this project's SAEs cannot do; only none and expected_average_only_in are read")
        if how == "expected_average_only_in" and not normalised:
            raise UserError(f"{folder}: its inputs were scaled (expected_average_only_in) by a factor the file "
                            "does not hold: give it with --sae_input_scale")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise UserError(f"{folder}: rescale_acts_by_decoder_norm is not supported (fold the decoder norm "
                            "into the encoder first: SAELens' fold_W_dec_norm)")
        topk = cfg["architecture"] == "topk"
        if topk:
            _need(cfg, ("k",), folder / "cfg.json")
        t = _tensors(folder / "sae_weights.safetensors")
        _need(t, ("W_enc", "b_enc", "W_dec", "b_dec") + (("threshold",) if cfg["architecture"] == "jumprelu" else ()),
              folder / "sae_weights.safetensors")
        b_enc = t["b_enc"]
        if not cfg.get("apply_b_dec_to_input", True):
            # SAELens then encodes x, not x - b_dec (and still adds b_dec when decoding): the same codes as
            # (x - b_dec) W_enc + (b_enc + b_dec W_enc)
            b_enc = b_enc + t["b_dec"] @ t["W_enc"]
        state = {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"], "b_enc": b_enc}
        if "threshold" in t and cfg["architecture"] == "jumprelu":
            state["threshold"] = t["threshold"]
        # a ReLU or JumpReLU SAE keeps every feature it fires: top_k = F
        sae = _sae(state, cfg["k"] if topk else t["W_enc"].shape[1], folder)
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
    def read(cls, folder, normalised=False):
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


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict saved with torch.save, read without unpickling anything but tensors (weights_only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe pickle or a corrupt file: refused, never executed
        raise UserError(f"cannot read {path} as a state dict of tensors: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a state dict")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


@register
class DictionaryLearning(Format):
    """dictionary_learning's AutoEncoderTopK: `ae.pt` (a state dict: encoder.weight [F, d], encoder.bias,
    decoder.weight [d, F], b_dec, k, threshold) and `config.json` ({"trainer": {...}}). Its codes are
    TopK(ReLU(encoder(x - b_dec))) (its optional `threshold` inference is not applied)."""
    name = "dictionary_learning"
    files = ("ae.pt", "config.json")

    @classmethod
    def write(cls, sae, folder, metadata):
        folder.mkdir(parents=True, exist_ok=True)
        st = sae.state()
        state = {"encoder.weight": st["W_enc"].T.contiguous(), "encoder.bias": _b_enc(sae),
                 "decoder.weight": st["W_dec"].T.contiguous(), "b_dec": st["b_dec"],
                 "k": torch.tensor(sae.top_k, dtype=torch.int), "threshold": torch.tensor(-1.0)}
        write_atomic(folder / "ae.pt", lambda tmp: torch.save(state, tmp))
        _save_json(folder / "config.json", {"trainer": {
            "dict_class": "AutoEncoderTopK", "trainer_class": "TopKTrainer", "activation_dim": sae.d_model,
            "dict_size": sae.n_features, "k": sae.top_k, "layer": metadata.get("layer"),
            "lm_name": metadata.get("model_name"), "submodule_name": metadata.get("hook_name")},
            "saeshare": metadata})

    @classmethod
    def read(cls, folder, normalised=False):
        cfg = _json(folder / "config.json")
        trainer = cfg.get("trainer", {})
        if trainer.get("dict_class", "AutoEncoderTopK") != "AutoEncoderTopK":
            raise UserError(f"{folder}: a dictionary_learning {trainer['dict_class']}; only AutoEncoderTopK is read")
        t = _torch_state(folder / "ae.pt")
        _need(t, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"), folder / "ae.pt")
        sae = _sae({"W_enc": t["encoder.weight"].T, "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T,
                    "b_dec": t["b_dec"]}, int(t["k"]), folder)
        return Imported(sae, dict(cfg.get("saeshare") or trainer))


@register
class Saev(Format):
    """saev (OSU-NLP-Group, PyPI 0.1.0): one `sae.pt`, a JSON line of its config (d_vit, exp_factor, ...) then a
    torch.save state dict (W_enc [d, F], b_enc, W_dec [F, d], b_dec). Its SAE is ReLU, not top-k: codes are
    ReLU((x - b_dec) W_enc + b_enc), all F of them, so an imported one keeps every feature (top_k = F), and
    an exported one reads as this project's `relu` codes."""
    name = "saev"
    files = ("sae.pt",)

    @classmethod
    def write(cls, sae, folder, metadata):
        if sae.n_features % sae.d_model:
            raise UserError(f"saev needs a whole expansion factor: {sae.n_features} features over width {sae.d_model}")
        folder.mkdir(parents=True, exist_ok=True)
        st = sae.state()
        header = {"d_vit": sae.d_model, "exp_factor": sae.n_features // sae.d_model, "sparsity_coeff": 0.0,
                  "normalize_w_dec": False, "seed": int(metadata.get("sae_seed") or 0)}
        state = {"W_enc": st["W_enc"], "b_enc": _b_enc(sae), "W_dec": st["W_dec"], "b_dec": st["b_dec"]}

        def dump(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write((json.dumps(header) + "\n").encode())
                torch.save(state, f)

        write_atomic(folder / "sae.pt", dump)
        _save_json(folder / "saeshare.json", metadata)

    @classmethod
    def read(cls, folder, normalised=False):
        path = folder / "sae.pt"
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline().decode())
                rest = io.BytesIO(f.read())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not a saev checkpoint (a JSON line, then the weights): {e}") from None
        if not isinstance(header, dict):
            raise UserError(f"{path}: not a saev checkpoint (its first line is not a JSON object)")
        try:
            t = torch.load(rest, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"cannot read the weights of {path}: {str(e).splitlines()[0]}") from None
        _need(t, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
        t = {k: v.float() for k, v in t.items()}
        sae = _sae(t, t["W_enc"].shape[1], folder)
        meta = _json(folder / "saeshare.json") if (folder / "saeshare.json").is_file() else header
        return Imported(sae, meta)


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


class InputNorm(NamedTuple):
    """An SAE trained on (x - mean) * scale rather than on x (its library normalised the activations)."""
    mean_D: torch.Tensor | None = None
    scale: float = 1.0


def fold(sae: TopKSAE, norm: InputNorm) -> TopKSAE:
    """The same SAE applied to raw x: ((x - m) s - b) W + c = (x - (m + b / s)) (s W) + c, and decoding back,
    (z V + b) / s + m = z (V / s) + (m + b / s). Exact: an affine map of the input folds into the weights."""
    if norm.scale <= 0:
        raise UserError(f"--sae_input_scale must be positive, got {norm.scale}")
    mean = torch.zeros(sae.d_model) if norm.mean_D is None else norm.mean_D.float()
    if mean.shape != (sae.d_model,):
        raise UserError(f"--sae_input_mean has shape {tuple(mean.shape)}; the SAE reads width {sae.d_model}")
    with torch.no_grad():
        sae.W_enc.mul_(norm.scale)
        sae.W_dec.div_(norm.scale)
        sae.b_dec.copy_(mean + sae.b_dec / norm.scale)
    return sae


def read(path: str | Path, fmt: str = "auto", norm: InputNorm | None = None) -> Imported:
    """The SAE at `path`, applied to raw activations (`norm`: how its library normalised them first)."""
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"unknown --sae_format {fmt!r}; choose auto, {', '.join(FORMATS)}")
    cls = detect(path) if fmt == "auto" else FORMATS[fmt]
    if not cls.detect(path):
        raise UserError(f"{str(path)!r} is not a {cls.name} SAE folder (it needs {' and '.join(cls.files)})")
    got = cls.read(path, norm is not None)
    return got if norm is None else Imported(fold(got.sae, norm), got.metadata)
