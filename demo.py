"""The whole method end to end, offline, on two real pretrained models that ship in PyPI packages.

    uv run demo.py                      # shapes x 2000, EfficientNet-Lite0 vs all-MiniLM-L6-v2 vs a null run

1. SAEs on every layer of EfficientNet-Lite0 (images) and all-MiniLM-L6-v2 (the captions of the same
   samples), plus a null run: the same text model over captions shuffled across samples.
2. wMPPC for every ordered pair; Comparative Sharedness of the image model, shared with the text model
   and not with the null run; previews of the top features; their best ground-truth attribute.
3. demo_out/report.html and report.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import data
import report
import show
from report import IMAGE, NULL, TEXT
from comp_sharedness import comp_sharedness, top_features
from correlation import Correlator
from errors import ArgumentParser, UserError, cli
from runs import Run
from sae import SaeConfig
from train import DEFAULT_BATCH, TrainConfig, train
from wmppc import plot_heatmap, wmppc


@dataclass
class DemoConfig:
    out: str = "demo_out"
    """Folder of the report, the runs (out/sae_features) and the previews (out/imgs)."""
    max_samples: int = 2000
    """Samples of `shapes`."""
    image_size: int = 128
    """Side of the shapes images fed to EfficientNet-Lite0."""
    layers: list[int] | None = None
    """Layers of both models (None = all)."""
    top: int = 8
    """Top shared features shown in the report."""
    lr: float = 1e-3
    """SAE learning rate. The paper's 5e-5 is tuned for COCO (7,400 steps of 16 images); 2,000 samples give
    125 steps of 16 images, or 8 steps of 256 captions, too few for it to move the SAE from its init."""
    batch_size: int | None = 16
    """Encoder batch for both models (None: 16 images, 256 captions, as the paper) (the SAE takes one step per batch)."""
    overwrite: bool = False
    """Replace runs of earlier demos made with other settings."""
    device: str = "auto"


RUNS = {  # name -> (modality, model, checkpoint, extra TrainConfig fields)
    IMAGE: ("image", "EfficientNetLite", "efficientnet-lite0", {}),
    TEXT: ("text", "Bert", "all-MiniLM-L6-v2", {}),
    NULL: ("text", "Bert", "all-MiniLM-L6-v2", {"shuffle_captions": 0}),
}


def _train_or_reuse(cfg: DemoConfig, name: str, root: Path) -> tuple[Run, float]:
    """A run of an earlier demo with the same settings is reused; other settings need --overwrite."""
    modality, model, checkpoint, extra = RUNS[name]
    tcfg = TrainConfig(runname=name, model=model, checkpoint=checkpoint, layers=cfg.layers, dataset="shapes",
                       max_samples=cfg.max_samples, batch_size=cfg.batch_size, root=str(root),
                       overwrite=cfg.overwrite, device=cfg.device,
                       image_size=cfg.image_size if modality == "image" else None, **extra)
    if (root / name / "run.json").is_file():
        try:
            run = Run.open(root, name)
            want = data.load_dataset("shapes", max_samples=cfg.max_samples,
                                     shuffle_captions=extra.get("shuffle_captions")).describe()
            n_layers = run.meta["n_layers_model"]
            layers = range(n_layers) if cfg.layers is None else {layer % n_layers for layer in cfg.layers}
            same = (run.meta["dataset"] == want and run.meta.get("image_size") == tcfg.image_size
                    and run.layers == sorted(layers) and run.meta["sae"]["lr"] == cfg.lr
                    and run.meta["sae"]["batch_size"] == (cfg.batch_size or DEFAULT_BATCH[modality]))
            if same:
                print(f"reusing {run.path} (same settings)")
                return run, 0.0
        except UserError:
            pass
        tcfg.overwrite = True if cfg.overwrite else tcfg.overwrite
    res = train(tcfg, SaeConfig(lr=cfg.lr), modality)
    return Run.open(root, name), res.seconds


def feature_attributes(run: Run, features: list[int], names: list[str], attrs_NA: np.ndarray) -> list[tuple[str, float]]:
    """Best-correlated ground-truth attribute (name, Pearson r) of each given feature of the run's last layer."""
    f_NK = np.concatenate([codes[:, features].double().numpy() for _, codes in run.iter_codes(-1, "relu")])
    a_NA = attrs_NA.astype(np.float64)
    fc, ac = f_NK - f_NK.mean(0), a_NA - a_NA.mean(0)
    denom = np.sqrt((fc ** 2).sum(0))[:, None] * np.sqrt((ac ** 2).sum(0))[None, :]
    r_KA = np.divide(fc.T @ ac, denom, out=np.zeros((len(features), a_NA.shape[1])), where=denom > 0)
    return [(names[a], float(r_KA[k, a])) for k, a in enumerate(r_KA.argmax(1))]


def run_demo(cfg: DemoConfig) -> dict:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    root = out / "sae_features"
    out.mkdir(parents=True, exist_ok=True)
    runs, seconds = {}, {}
    for name in RUNS:
        runs[name], seconds[name] = _train_or_reuse(cfg, name, root)

    engine = Correlator(codes="relu", device=cfg.device)
    pairs = {}
    for a in runs:
        for b in runs:
            if a != b:
                pairs[a, b] = wmppc(runs[a], runs[b], engine)
    for b in (TEXT, NULL):
        res = pairs[IMAGE, b]
        plot_heatmap(res.layer_matrix, [str(x) for x in res.source_layers], [str(x) for x in res.target_layers],
                     f"{IMAGE} layer", f"{b} layer", f"wMPPC {IMAGE} -> {b}", out / f"wmppc_{IMAGE}_{b}.png")
    names = list(runs)
    table = np.array([[pairs[a, b].all_layers if a != b else np.nan for b in names] for a in names])
    plot_heatmap(table, names, names, "source", "target", "wMPPC, all layers", out / "wmppc_runs.png")

    shared = comp_sharedness(runs[IMAGE], [runs[TEXT]], [runs[NULL]], engine)
    feats = top_features(shared, cfg.top)
    ds = data.from_description(runs[IMAGE].meta["dataset"])
    attr_names, attrs_NA = data.attribute_matrix(ds)
    for f, (attr, r) in zip(feats, feature_attributes(runs[IMAGE], [f["feature"] for f in feats], attr_names, attrs_NA)):
        f["attribute"], f["attribute_r"] = attr, r
    matched = feature_attributes(runs[TEXT], [f["match"][TEXT] for f in feats], attr_names, attrs_NA)
    for f, (attr, r) in zip(feats, matched):
        f["match_attribute"], f["match_attribute_r"] = attr, r
    sharedness_json = out / "comp_sharedness.json"
    sharedness_json.write_text(json.dumps({"source": IMAGE, "min_group": [TEXT], "max_group": [NULL],
                                           "codes": shared.codes, "layers": shared.layers, "features": feats}, indent=1))
    gallery_dir = out / "imgs" / "shared"
    show.main(["--from_json", str(sharedness_json), "--root", str(root), "--out", str(gallery_dir), "--overwrite",
               "--device", cfg.device])
    grids = [str(next((gallery_dir / IMAGE).glob(f"feat{f['feature']}_*.jpg")).relative_to(out)) for f in feats]

    results = {
        "config": cfg.__dict__, "runs": {n: r.meta for n, r in runs.items()}, "train_seconds": seconds,
        "wmppc": {f"{a}->{b}": {"all_layers": p.all_layers, "last_layer": p.last_layer,
                                "layer_matrix": p.layer_matrix.tolist(), "source_layers": p.source_layers,
                                "target_layers": p.target_layers} for (a, b), p in pairs.items()},
        "sharedness": {"source": IMAGE, "min_group": [TEXT], "max_group": [NULL], "features": feats},
        "gallery": str((gallery_dir / "index.html").relative_to(out)), "grids": grids, "seconds": time.perf_counter() - t0,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report.write(results, out)
    return results


@cli
def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DemoConfig.out)
    p.add_argument("--max_samples", type=int, default=DemoConfig.max_samples)
    p.add_argument("--image_size", type=int, default=DemoConfig.image_size)
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers of both models (default: all)")
    p.add_argument("--top", type=int, default=DemoConfig.top)
    p.add_argument("--lr", type=float, default=DemoConfig.lr, help="SAE learning rate (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=DemoConfig.batch_size,
                   help="encoder batch of both models (default: %(default)s)")
    p.add_argument("--paper_defaults", action="store_true",
                   help="the paper's SAE settings: lr 5e-5, batch 16 images and 256 captions")
    p.add_argument("--device", default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace runs of an earlier demo with other settings")
    args = p.parse_args(argv)
    if args.max_samples < 20:
        raise UserError(f"--max_samples must be at least 20, got {args.max_samples}")
    res = run_demo(DemoConfig(out=args.out, max_samples=args.max_samples, image_size=args.image_size,
                              layers=args.layers, top=args.top, overwrite=args.overwrite, device=args.device,
                              lr=SaeConfig.lr if args.paper_defaults else args.lr,
                              batch_size=None if args.paper_defaults else args.batch_size))
    print(report.summary(res, Path(args.out)))


if __name__ == "__main__":
    main()
