"""How honest are wMPPC's interval and bias correction? A simulation with a known answer.

Two synthetic models see 10 of 12 sparse concepts each (8 shared) through random linear maps plus
noise; each has a fixed SAE whose first features read its concepts. The population wMPPC is computed in
float64 from --population samples; then, for relu and top-k codes, N = 300, 1000, 3000, and samples
stored in random or class-sorted order, --reps independent datasets go through the real engine
(`wmppc.wmppc` with the jackknife) and the bench prints:

- coverage of the population value by the reported 95% interval (corrected score ± t_9 times the
  se and the correction in quadrature), and by the earlier one (raw score ± 1.96 se, for comparison);
- width: the interval's mean standard error against the true spread of the corrected score over datasets;
- bias of the paper's raw score and of the jackknife-corrected one, also in units of that sd.

    uv run bench/bench_intervals.py              # the README's table (a few minutes on 2 cores)
    uv run bench/bench_intervals.py --reps 60 --sizes 300   # quicker
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import wmppc  # noqa: E402
from saeshare.engine.correlator import JACKKNIFE_BLOCKS, Correlator  # noqa: E402
from saeshare.engine.options import EngineOptions  # noqa: E402
from tests.synthetic import make_run  # noqa: E402

CONCEPTS, D, F, TOP_K = 12, 16, 32, 4
SEEN = {"A": np.arange(0, 10), "B": np.arange(2, 12)}
"""The concepts each model sees: 8 shared."""


class World(NamedTuple):
    """The generative model: concept maps and a fixed SAE per model."""
    maps: dict[str, np.ndarray]
    """[concepts seen, D]."""
    saes: dict[str, dict[str, torch.Tensor]]


def make_world(seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    maps, saes = {}, {}
    for name, seen in SEEN.items():
        m = rng.normal(size=(len(seen), D))
        w_enc = np.concatenate([np.linalg.pinv(m), rng.normal(size=(D, F - len(seen))) / np.sqrt(D)], axis=1)
        w_dec = w_enc.T / np.linalg.norm(w_enc.T, axis=1, keepdims=True)
        maps[name] = m
        saes[name] = {"W_enc": torch.tensor(w_enc, dtype=torch.float32),
                      "W_dec": torch.tensor(w_dec, dtype=torch.float32), "b_dec": torch.zeros(D)}
    return World(maps, saes)


def sample(world: World, n: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({model: activations [n, D]}, class of each sample: its strongest concept, or CONCEPTS for none)."""
    active = rng.random((n, CONCEPTS)) < 0.2
    amp_NC = active * rng.exponential(1.0, (n, CONCEPTS))
    label_N = np.where(active.any(1), amp_NC.argmax(1), CONCEPTS)
    acts = {name: amp_NC[:, seen] @ world.maps[name] + 0.5 * rng.normal(size=(n, D))
            for name, seen in SEEN.items()}
    return acts, label_N


def codes64(world: World, name: str, acts_ND: np.ndarray, codes: str) -> np.ndarray:
    """The SAE's codes in float64, as the engine defines them."""
    w = world.saes[name]["W_enc"].double().numpy()
    pre = np.maximum(acts_ND @ w, 0)
    if codes == "relu":
        return pre
    keep = np.argsort(-pre, axis=1)[:, :TOP_K]
    out = np.zeros_like(pre)
    np.put_along_axis(out, keep, np.take_along_axis(pre, keep, 1), 1)
    return out


def population_value(world: World, codes: str, n: int, seed: int = 12345, chunk: int = 200_000) -> float:
    """wMPPC A -> B over `n` fresh samples, in float64 moments accumulated chunk by chunk (the target every
    interval should cover; the amplitudes are heavy-tailed, so it takes a million samples or more)."""
    rng = np.random.default_rng(seed)
    count, sum_a, sum_b, sq_a, sq_b, cross = 0, 0.0, 0.0, 0.0, 0.0, 0.0
    for start in range(0, n, chunk):
        acts, _ = sample(world, min(chunk, n - start), rng)
        a, b = codes64(world, "A", acts["A"], codes), codes64(world, "B", acts["B"], codes)
        count += len(a)
        sum_a, sum_b = sum_a + a.sum(0), sum_b + b.sum(0)
        sq_a, sq_b, cross = sq_a + (a * a).sum(0), sq_b + (b * b).sum(0), cross + a.T @ b
    mean_a, mean_b = sum_a / count, sum_b / count
    cov = cross / count - np.outer(mean_a, mean_b)
    sd_a, sd_b = np.sqrt(sq_a / count - mean_a ** 2), np.sqrt(sq_b / count - mean_b ** 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.nan_to_num(cov / np.outer(sd_a, sd_b))
    return float((sum_a * corr.max(1)).sum() / sum_a.sum())


def one_dataset(world: World, codes: str, n: int, order: str, rng: np.random.Generator, root: Path) -> wmppc.Wmppc:
    acts, label_N = sample(world, n, rng)
    if order == "sorted":
        rows = np.argsort(label_N, kind="stable")
        acts = {k: v[rows] for k, v in acts.items()}
    runs = [make_run(root, name, {0: acts[name].astype(np.float32)}, {0: world.saes[name]}, TOP_K, overwrite=True)
            for name in ("A", "B")]
    engine = Correlator(EngineOptions(codes=codes, device="cpu", no_cache=True), jackknife=True)
    return wmppc.wmppc(*runs, engine)


def summarise(results: list[wmppc.Wmppc], truth: float) -> dict[str, float]:
    raw = np.array([r.all_layers for r in results])
    corrected = np.array([r.corrected.all_layers for r in results])
    se = np.array([r.se.all_layers for r in results])
    lo, hi = np.array([r.ci.all_layers for r in results]).T
    spread = raw.std(ddof=1)
    half = (hi - lo) / 2 / stats.t.ppf(0.975, JACKKNIFE_BLOCKS - 1)  # the interval's standard error
    return {"coverage": float(np.mean((lo <= truth) & (truth <= hi))),
            "coverage_old": float(np.mean(np.abs(raw - truth) <= 1.96 * se)),
            "width": float(half.mean() / corrected.std(ddof=1)), "bias_raw": float(raw.mean() - truth),
            "bias_corrected": float(corrected.mean() - truth), "spread": float(spread)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=300, help="datasets per setting")
    p.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000])
    p.add_argument("--population", type=int, default=3_200_000, help="samples of the population value")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    world = make_world(args.seed)
    print(f"{args.reps} datasets per row; interval: corrected ± t_{JACKKNIFE_BLOCKS - 1} sqrt(se^2 + correction^2) "
          f"(t = {stats.t.ppf(0.975, JACKKNIFE_BLOCKS - 1):.3f}); earlier: raw ± 1.96 se; "
          "width: interval se / sd of corrected")
    print("| codes | N | order | population | coverage | coverage (earlier) | width | bias raw | bias corrected |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for codes in ("relu", "topk"):
            truth = population_value(world, codes, args.population)
            for n in args.sizes:
                for order in ("random", "sorted"):
                    rng = np.random.default_rng([args.seed, n, order == "sorted"])
                    results = [one_dataset(world, codes, n, order, rng, Path(tmp))
                               for _ in tqdm(range(args.reps), desc=f"{codes} N={n} {order}", leave=False,
                                             disable=None)]
                    s = summarise(results, truth)
                    print(f"| {codes} | {n} | {order} | {truth:.4f} | {s['coverage']:.3f} | {s['coverage_old']:.3f} | "
                          f"{s['width']:.2f} | {s['bias_raw']:+.4f} ({s['bias_raw'] / s['spread']:+.2f} sd) | "
                          f"{s['bias_corrected']:+.4f} ({s['bias_corrected'] / s['spread']:+.2f} sd) |", flush=True)
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
