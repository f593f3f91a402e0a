"""The one training/recording loop behind train_image.py and train_text.py (SPEC §3, §9).

One encoder pass per batch trains the SAE of every requested layer on all (non-padding) tokens and
stores the pooled token of every sample; features are computed from those after training, on demand.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import data
from errors import ArgumentParser, UserError, resolve_device
from runs import DEFAULT_ROOT, FLOAT16_MAX, RunWriter
from sae import SaeConfig, SaeTrainer
from wrappedmodels import ENCODERS, TOKENS, Encoder, get_encoder_class


DEFAULT_BATCH = {"image": 16, "text": 256}
"""Encoder batch of the paper's code: 16 images or 256 captions (one SAE step per batch)."""


@dataclass
class TrainConfig:
    runname: str
    model: str
    checkpoint: str | None = None
    """None = the family's default checkpoint."""
    layers: list[int] | None = None
    """Block ids (negative counts from the end); None = every block."""
    token: str | None = None
    """Pooled token recorded per sample; None = the family's own (SPEC §4.2)."""
    dataset: str = "shapes"
    split: str | None = None
    max_samples: int | None = None
    batch_size: int | None = None
    """Encoder batch; None = 16 images or 256 captions, as the paper."""
    root: str = DEFAULT_ROOT
    overwrite: bool = False
    device: str = "auto"
    seed: int = 0
    train_on_padding: bool = False
    """Also train on padding positions of captions (the paper's code does)."""
    acts_dtype: str = "float32"
    """dtype of the stored pooled activations: float32 or float16 (checked for overflow)."""
    num_workers: int | None = None
    """DataLoader workers for decoding/preprocessing; None = a few on GPU, 0 on CPU."""
    image_size: int | None = None
    """Input size for EfficientNetLite (others use their own processor)."""
    shuffle_captions: int | None = None
    """Permute captions across samples with this seed: a null run that shares nothing with the images."""


class TrainResult(NamedTuple):
    run_dir: Path
    meta: dict
    seconds: float


class _Samples(Dataset):
    """Feeds the modality's side of each paired sample through the encoder's per-sample transform."""

    def __init__(self, ds: data.PairedDataset, encoder: Encoder):
        self.ds, self.encoder = ds, encoder

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        sample = self.ds.image(i) if self.encoder.modality == "image" else self.ds.caption(i)
        return self.encoder.transform(sample)


def train(cfg: TrainConfig, sae_cfg: SaeConfig, modality: str) -> TrainResult:
    t0 = time.perf_counter()
    cls = get_encoder_class(cfg.model, modality)
    if cfg.acts_dtype not in ("float32", "float16"):
        raise UserError(f"--acts_dtype must be float32 or float16, got {cfg.acts_dtype!r}")
    writer = RunWriter(cfg.root, cfg.runname, cfg.overwrite)  # refuses an existing run before any work
    try:
        device = resolve_device(cfg.device)
        ds = data.load_dataset(cfg.dataset, split=cfg.split, max_samples=cfg.max_samples,
                               shuffle_captions=cfg.shuffle_captions)
        encoder = cls(cfg.checkpoint, device=device, token=cfg.token)
        if cfg.image_size is not None:
            if not hasattr(encoder, "image_size"):
                raise UserError(f"--image_size applies to EfficientNetLite; {cfg.model} uses its own processor")
            encoder.image_size = cfg.image_size
        layers = encoder.resolve_layers(cfg.layers)
        batch_size = cfg.batch_size or DEFAULT_BATCH[modality]
        meta = _record(cfg, sae_cfg, ds, encoder, layers, batch_size, writer, device)
        run_dir = writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
    return TrainResult(run_dir, meta, time.perf_counter() - t0)


def _record(cfg, sae_cfg, ds, encoder, layers, batch_size, writer, device) -> dict:
    n = len(ds)
    workers = cfg.num_workers if cfg.num_workers is not None else (min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    loader = DataLoader(_Samples(ds, encoder), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=encoder.collate)
    trainers: dict[int, SaeTrainer] = {}
    acts: dict[int, np.ndarray] = {}
    start = 0
    bar = tqdm(loader, desc=f"{cfg.runname}: {len(layers)} layers", unit="batch")
    for inputs in bar:
        recorded = encoder.record(inputs, layers)
        for layer in layers:
            acts_BTD = recorded[layer].float()
            if layer not in trainers:
                d = acts_BTD.shape[-1]
                trainers[layer] = SaeTrainer(d, sae_cfg, device=device, seed=cfg.seed + layer)
                acts[layer] = writer.acts(layer, n, d, cfg.acts_dtype)
            mask_BT = encoder.token_mask(inputs, acts_BTD)
            tokens_ND = acts_BTD.reshape(-1, acts_BTD.shape[-1]) if cfg.train_on_padding else acts_BTD[mask_BT]
            with torch.enable_grad():
                trainers[layer].train_step(tokens_ND)
            pooled_BD = encoder.pool(acts_BTD, mask_BT).cpu().numpy()
            if cfg.acts_dtype == "float16" and np.abs(pooled_BD).max() > FLOAT16_MAX:
                raise UserError(f"layer {layer}: pooled activations exceed the float16 range; use --acts_dtype float32")
            acts[layer][start:start + len(pooled_BD)] = pooled_BD
        start += len(next(iter(recorded.values())))
        bar.set_postfix(fvu=f"{trainers[layers[-1]].metrics().fvu:.3f}")
    if start != n:
        raise RuntimeError(f"recorded {start} samples out of {n}")

    layer_info = {}
    for layer in layers:
        pooled_ND = acts[layer]
        sample_ND = np.asarray(pooled_ND[: min(n, 4096)], dtype=np.float32)
        # batch sizes change float rounding, so "identical" is up to a relative 1e-5
        if n > 1 and np.ptp(sample_ND, axis=0).max() <= 1e-5 * max(float(np.abs(sample_ND).max()), 1e-30):
            raise UserError(f"layer {layer}: the pooled token ({encoder.token}) is identical for every sample, "
                            f"so it carries no information; choose another --token ({', '.join(TOKENS)})")
        trainer = trainers[layer]
        writer.save_sae(layer, trainer.sae.state())
        layer_info[str(layer)] = {"d_model": trainer.sae.d_model, "n_features": trainer.sae.n_features,
                                  **trainer.metrics()._asdict(),
                                  "fvu_pooled": _fvu(trainer, pooled_ND, device)}
    return {
        "runname": cfg.runname, "modality": encoder.modality, "model": cfg.model,
        "checkpoint": encoder.checkpoint, "token": encoder.token,
        "dataset": ds.describe(),
        "sae": {**asdict(sae_cfg), "batch_size": batch_size, "seed": cfg.seed,
                "train_on_padding": cfg.train_on_padding},
        "layers": layers, "n_layers_model": encoder.n_layers, "layer_info": layer_info,
        "acts_dtype": cfg.acts_dtype, "image_size": getattr(encoder, "image_size", None),
        "versions": _versions(), "device": str(device),
    }


@torch.no_grad()
def _fvu(trainer: SaeTrainer, pooled_ND: np.ndarray, device, chunk: int = 8192) -> float:
    """FVU of the trained SAE on the recorded pooled tokens (the vectors the analyses read)."""
    sq_err, sum_x, sum_sq, n = 0.0, 0.0, 0.0, pooled_ND.shape[0]
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.asarray(pooled_ND[s:s + chunk], dtype=np.float32)).to(device)
        x_hat = trainer.sae(x).x_hat
        sq_err += float((x - x_hat).double().pow(2).sum())
        sum_x = sum_x + x.double().sum(0)
        sum_sq += float(x.double().pow(2).sum())
    total = sum_sq - float((sum_x ** 2).sum()) / n
    return sq_err / total if total > 0 else float("nan")


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


# --- command line ---------------------------------------------------------------------------------------
def build_parser(modality: str) -> ArgumentParser:
    families = [n for n, c in ENCODERS.items() if c.modality == modality]
    p = ArgumentParser(
        description=f"Train a top-k SAE on every requested layer of a {modality} encoder and record the pooled "
                    f"activations of every sample into sae_features/<runname>/.")
    p.add_argument("--model", required=True, help=f"encoder family: {', '.join(families)}")
    flags = sorted({ENCODERS[f].checkpoint_flag for f in families})
    for flag in flags:
        owners = [f for f in families if ENCODERS[f].checkpoint_flag == flag]
        p.add_argument(flag, default=None, help=f"checkpoint (hub id or local folder) for {', '.join(owners)}")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="block ids (-1 = last); default: all")
    p.add_argument("--runname", required=True)
    p.add_argument("--token", choices=TOKENS, default=None, help="pooled token; default: the model's own")
    p.add_argument("--dataset", default="shapes", help=f"{', '.join(data.DATASETS)}, or a local folder")
    p.add_argument("--split", default=None)
    p.add_argument("--max_samples", type=int, default=None)
    p.add_argument("--top_k", type=int, default=SaeConfig.top_k)
    p.add_argument("--expansion_factor", type=int, default=SaeConfig.expansion_factor)
    p.add_argument("--lr", type=float, default=SaeConfig.lr)
    p.add_argument("--batch_size", type=int, default=None, help="default: 16 images or 256 captions")
    p.add_argument("--lr_warmup_steps", type=int, default=0, help="(improvement, off by default)")
    p.add_argument("--normalize_decoder", action="store_true", help="(improvement, off by default)")
    p.add_argument("--auxk_alpha", type=float, default=0.0, help="AuxK loss weight, e.g. 1/32 (off by default)")
    p.add_argument("--train_on_padding", action="store_true", help="train on padding positions too (paper's code)")
    p.add_argument("--acts_dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--root", default=DEFAULT_ROOT)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=None)
    if modality == "text":
        p.add_argument("--shuffle_captions", type=int, default=None, metavar="SEED",
                       help="null baseline: permute captions across samples (same fingerprint)")
    if modality == "image":
        p.add_argument("--image_size", type=int, default=None, help="input size for EfficientNetLite (default 224)")
    return p


def main_for(modality: str, argv=None) -> TrainResult:
    args = build_parser(modality).parse_args(argv)
    cls = get_encoder_class(args.model, modality)
    checkpoint = getattr(args, cls.checkpoint_flag.lstrip("-"))
    if args.max_samples is not None and args.max_samples <= 0:
        raise UserError(f"--max_samples must be positive, got {args.max_samples}")
    if args.top_k <= 0 or args.expansion_factor <= 0 or args.lr <= 0:
        raise UserError("--top_k, --expansion_factor and --lr must be positive")
    cfg = TrainConfig(
        runname=args.runname, model=args.model, checkpoint=checkpoint, layers=args.layers, token=args.token,
        dataset=args.dataset, split=args.split, max_samples=args.max_samples, batch_size=args.batch_size,
        root=args.root, overwrite=args.overwrite, device=args.device, seed=args.seed,
        train_on_padding=args.train_on_padding, acts_dtype=args.acts_dtype, num_workers=args.num_workers,
        image_size=getattr(args, "image_size", None), shuffle_captions=getattr(args, "shuffle_captions", None))
    sae_cfg = SaeConfig(top_k=args.top_k, expansion_factor=args.expansion_factor, lr=args.lr,
                        lr_warmup_steps=args.lr_warmup_steps, normalize_decoder=args.normalize_decoder,
                        auxk_alpha=args.auxk_alpha)
    torch.manual_seed(args.seed)
    result = train(cfg, sae_cfg, modality)
    info = result.meta["layer_info"]
    print(f"wrote {result.run_dir} ({len(info)} layers, {result.meta['dataset']['n_samples']} samples, "
          f"{result.seconds:.1f} s); last layer FVU {info[str(result.meta['layers'][-1])]['fvu']:.3f}")
    return result
