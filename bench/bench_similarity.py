"""Benchmark of calibration (docs/design.md#calibration). Prints, from one run on this machine:

  (a) linear and debiased CKA, streamed, at N=200000, D=1024: time and peak RSS (target <= 2 GiB)
  (b) mutual kNN (k=10) at N=50000, D=384: time and peak RSS
  (c) training wall time with 2 and 3 SAE seeds as a ratio to one seed, EfficientNet-Lite0 on 2000
      shapes, every layer (target <= 1.3x per extra seed: the encoder pass is shared)

Each measurement runs in its own process, so that its peak RSS is its own.

    uv run bench/bench_similarity.py                 # full sizes: ~25 minutes on 2 cores
    uv run bench/bench_similarity.py --quick         # small sizes, a minute or two
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_wmppc import load, peak_rss_self  # noqa: E402

import similarity as sim  # noqa: E402
from saeshare.disk.runs import Run  # noqa: E402
from synthetic import make_run, random_sae_state  # noqa: E402

GIB = 2**30


def build(root: Path, n: int, d: int) -> None:
    """Two runs of one layer whose activations share a 16-dimensional latent, written in chunks."""
    mix = np.random.default_rng(0).normal(size=(2, 16, d)).astype(np.float32)

    def rows(side: int):
        def fn(start: int, stop: int) -> np.ndarray:
            z = np.random.default_rng(start).normal(size=(stop - start, 16)).astype(np.float32)  # shared
            noise = np.random.default_rng([start, side]).normal(size=(stop - start, d)).astype(np.float32)
            return z @ mix[side] + noise
        return fn

    for side, name in enumerate("AB"):
        make_run(root, name, {0: rows(side)}, {0: random_sae_state(d, 2 * d)}, n_samples=n)


def child_cka(root: str) -> dict:
    a, b = Run.open(root, "A"), Run.open(root, "B")
    eng = sim.SimilarityEngine(chunk_size=4096)
    t = time.perf_counter()
    sx, sy = eng._side(a, 0), eng._side(b, 0)
    xty = sim.cross_gram(eng._chunks(a, 0)(), eng._chunks(b, 0)(), sx, sy)
    out = {"cka": sim.cka(sx, sy, xty), "cka_debiased": sim.cka_debiased(sx, sy, xty)}
    return {**out, "seconds": time.perf_counter() - t, "peak_rss": peak_rss_self()}


def child_mknn(root: str) -> dict:
    a, b = Run.open(root, "A"), Run.open(root, "B")
    eng = sim.SimilarityEngine(chunk_size=4096)
    t = time.perf_counter()
    value = sim.mutual_knn(eng._knn_of(a, 0), eng._knn_of(b, 0))
    return {"mknn": value, "seconds": time.perf_counter() - t, "peak_rss": peak_rss_self()}


def child_train(root: str, n: str, *seeds: str) -> dict:
    import train_image

    t = time.perf_counter()
    train_image.main(["--model", "EfficientNetLite", "--runname", f"seeds{'-'.join(seeds)}", "--root", root,
                      "--max_samples", n, "--image_size", "128", "--seeds", *seeds])
    return {"seconds": time.perf_counter() - t}


def seed_difference(root: Path) -> float:
    from saeshare.disk.runs import Run

    three = Run.open(root, "seeds0-1-2")
    worst = 0.0
    for seed in (1, 2):
        alone = Run.open(root, f"seeds{seed}")
        for layer in three.layers:
            for name, w in alone.sae(layer).state().items():
                got = three.with_seed(seed).sae(layer).state()[name]
                worst = max(worst, float((got - w).abs().max() / w.abs().max().clamp_min(1e-12)))
    return worst


def in_child(kind: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{kind} child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--skip", nargs="*", default=[], choices=["cka", "mknn", "seeds"])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps({"cka": child_cka, "mknn": child_mknn, "train": child_train}[kind](*rest)))
        return
    sizes = ((20000, 256), (5000, 128), 200) if args.quick else ((200000, 1024), (50000, 384), 2000)
    cka_size, knn_size, train_n = sizes
    print(f"{torch.get_num_threads()} threads; {load()}")
    with tempfile.TemporaryDirectory(prefix="bench_similarity-") as work:
        if "cka" not in args.skip:
            build(Path(work) / "cka", *cka_size)
            r = in_child("cka", str(Path(work) / "cka"))
            print(f"(a) linear CKA {r['cka']:.4f}, debiased CKA {r['cka_debiased']:.4f} at N={cka_size[0]}, "
                  f"D={cka_size[1]}: {r['seconds']:.1f} s, peak RSS {r['peak_rss'] / GIB:.2f} GiB (target <= 2 GiB); "
                  f"{load()}")
        if "mknn" not in args.skip:
            build(Path(work) / "knn", *knn_size)
            r = in_child("mknn", str(Path(work) / "knn"))
            print(f"(b) mutual kNN (k=10) {r['mknn']:.4f} at N={knn_size[0]}, D={knn_size[1]}: {r['seconds']:.1f} s, "
                  f"peak RSS {r['peak_rss'] / GIB:.2f} GiB; {load()}")
        if "seeds" not in args.skip:
            times = {s: in_child("train", str(Path(work) / "train"), str(train_n), *map(str, range(s)))["seconds"]
                     for s in (1, 2, 3)}
            print(f"(c) EfficientNet-Lite0, {train_n} shapes, all layers: 1 seed {times[1]:.1f} s, "
                  f"2 seeds {times[2]:.1f} s, 3 seeds {times[3]:.1f} s; {load()}")
            print(f"(c) cost per extra seed: x{times[2] / times[1]:.2f} (2 seeds / 1), "
                  f"x{1 + (times[3] / times[1] - 1) / 2:.2f} per seed (3 seeds / 1)   (target <= 1.3x per extra seed)")
            for seed in (1, 2):  # a seed stepped with the others is the seed trained alone
                in_child("train", str(Path(work) / "train"), str(train_n), str(seed))
            print(f"(c) seeds 1 and 2 of the 3-seed run against each trained alone: largest relative weight "
                  f"difference {seed_difference(Path(work) / 'train'):.1e} (target <= 1e-5; 0 on a CPU)")


if __name__ == "__main__":
    main()
