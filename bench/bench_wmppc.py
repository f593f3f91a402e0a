"""Benchmark of the correlation engine behind wmppc.py / comp_sharedness.py. Prints ratios (the
machine is shared and noisy: the torch.mm reference of (a) is timed between the engine's own products).

  (a) dense path throughput as a fraction of plain torch.mm on the same shapes (target >= 0.8)
  (b) sparse path speed-up over the dense path on top-k codes, same numbers (target >= 20x, equal to 1e-5),
      cold (the top-k codes computed) and warm (read from the cache, as by every later pair and process)
  (c) peak RSS of an all-layers wMPPC at N=50000, F=6144, 12 layers each (target <= 4 GiB)
  (d) --precision fp32 / tf32 / bf16 (dense path, relu codes): throughput as a fraction of torch.mm in the
      same precision, the share of time in the exact re-check, and rho / match against fp32 (to 1e-5)

    uv run bench/bench_wmppc.py            # full sizes: ~15 minutes on 2 cores
    uv run bench/bench_wmppc.py --quick    # small sizes, a minute
    uv run bench/bench_wmppc.py --device cuda --skip memory    # on a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saeshare.disk.runs import DEFAULT_CHUNK, Run  # noqa: E402
from saeshare.engine import dense as corr_dense  # noqa: E402
from saeshare.engine import sparse as corr_sparse  # noqa: E402
from saeshare.engine.options import DEFAULT_MEM_GB  # noqa: E402
from tests.synthetic import engine, make_run, random_sae_state  # noqa: E402
from wmppc import wmppc  # noqa: E402

K = 32
GIB = 2**30


def build_pair(root: Path, n: int, n_features: int, n_layers: int) -> tuple[Run, Run]:
    """Two runs over the same n samples, d = F/8, activations sharing random latent factors (so that
    correlations have structure), random SAE weights."""
    d = n_features // 8

    def layer_rows(seed: int):
        mix = np.random.default_rng(seed).normal(size=(16, d)).astype(np.float32)

        def rows(start: int, stop: int) -> np.ndarray:
            z = np.random.default_rng([0, start]).normal(size=(stop - start, 16)).astype(np.float32)
            noise = np.random.default_rng([seed, start]).normal(size=(stop - start, d)).astype(np.float32)
            return z @ mix + noise
        return rows

    runs = []
    for r, name in enumerate(("A", "B")):
        seeds = {layer: 1000 * (r + 1) + layer for layer in range(n_layers)}
        runs.append(make_run(root, name, {layer: layer_rows(s) for layer, s in seeds.items()},
                             {layer: random_sae_state(d, n_features, s, b_scale=0.0) for layer, s in seeds.items()},
                             K, n_samples=n))
    return runs[0], runs[1]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def timed_inside(fn, owner, name: str, after=None):
    """(fn(), wall seconds, seconds spent inside owner.name during fn); after() runs after each call."""
    orig, spent = getattr(owner, name), [0.0]

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = orig(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        if after is not None:
            after()
        return out
    setattr(owner, name, wrapper)
    try:
        out, seconds = timed(fn)
    finally:
        setattr(owner, name, orig)
    return out, seconds, spent[0]


def load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def bench_speed(root: Path, n: int, n_features: int, n_layers: int, device: str = "cpu") -> None:
    run_a, run_b = build_pair(root, n, n_features, n_layers)
    pairs = n_layers ** 2
    print(f"(a)/(b): two runs of {n_layers} layers, N={n}, F={n_features}, d={n_features // 8}, k={K}, "
          f"{torch.get_num_threads()} threads; {load()}")

    # torch.mm is timed on one chunk's product ([F, chunk] @ [chunk, F], the unit of a layer pair's
    # product) between the engine's own products, all through the run, so that a busy machine slows
    # both sides alike (this box is shared: timings taken before and after drift by up to 2x)
    chunk = DEFAULT_CHUNK
    x, y = torch.randn(chunk, n_features, device=device), torch.randn(chunk, n_features, device=device)
    out = torch.empty(n_features, n_features, device=device)
    ref: list[float] = []

    def reference():
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        t = time.perf_counter()
        torch.mm(x.T, y, out=out)
        sync()
        ref.append(time.perf_counter() - t)
    _, t_dense, t_products = timed_inside(
        lambda: engine("relu", no_cache=True, device=device).pair_stats(run_a, run_b),
        torch.Tensor, "addmm_", after=reference)
    t_dense -= sum(ref)
    t_ref = pairs * (n / chunk) * float(np.median(ref))
    print(f"(a) dense relu, {pairs} layer pairs: {t_dense:.1f} s; torch.mm on the same shapes: {t_ref:.1f} s "
          f"({len(ref)} timings of one chunk's product, {min(ref):.3f}-{max(ref):.3f} s); {load()}")
    print(f"(a) dense throughput / torch.mm throughput = {t_ref / t_dense:.2f}   (target >= 0.8)")
    print(f"(a) share of the dense path's time in its float32 products (addmm_) = {t_products / t_dense:.2f}")

    dense_engine = engine("topk", no_cache=True, method="dense", device=device)
    dense, t_dense_topk = timed(lambda: dense_engine.pair_stats(run_a, run_b))
    sparse, t_sparse, t_codes = timed_inside(
        lambda: engine("topk", no_cache=True, device=device).pair_stats(run_a, run_b), corr_sparse, "topk_table")
    diff = max(float(np.abs(dense[p].rho_F - sparse[p].rho_F).max()) for p in dense)
    same = np.mean([np.mean(dense[p].match_F == sparse[p].match_F) for p in dense])
    print(f"(b) top-k codes: dense path {t_dense_topk:.1f} s, sparse path {t_sparse:.1f} s "
          f"(of which {t_codes:.1f} s computing the top-k codes of {2 * n_layers} layers)")
    print(f"(b) sparse speed-up = {t_dense_topk / t_sparse:.1f}x end to end   (target >= 20x); "
          f"{t_dense_topk / (t_sparse - t_codes):.1f}x not counting the top-k codes")
    print(f"(b) max |rho dense - rho sparse| = {diff:.2e} (target <= 1e-5); same match for {100 * same:.2f}% "
          f"of features; {load()}")
    engine("topk", device=device).pair_stats(run_a, run_b)  # writes the layers' top-k codes to <root>/.cache
    for entry in (root / ".cache").glob("*-topk.npz"):  # and the pairs' results, which a warm run recomputes
        entry.unlink()
    _, t_warm = timed(lambda: engine("topk", device=device).pair_stats(run_a, run_b))
    print(f"(b) warm (the top-k codes read from the cache, every pair computed): {t_warm:.1f} s, "
          f"{t_dense_topk / t_warm:.1f}x over the dense path")


def mm_seconds(x: torch.Tensor, y: torch.Tensor, precision: str, repeat: int = 5) -> float:
    """Median time of one chunk's product x^T y in `precision` (the engine's unit of work)."""
    cuda = torch.backends.cuda.matmul
    cuda.allow_tf32 = precision == "tf32"
    a, b = (x.bfloat16(), y.bfloat16()) if precision == "bf16" else (x, y)
    times = []
    for _ in range(repeat + 1):
        if x.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a.T, b)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    cuda.allow_tf32 = False
    return float(np.median(times[1:]))


def bench_precision(root: Path, n: int, n_features: int, n_layers: int, device: str) -> None:
    run_a, run_b = build_pair(root, n, n_features, n_layers)
    pairs, chunk = n_layers ** 2, DEFAULT_CHUNK
    x, y = torch.randn(chunk, n_features, device=device), torch.randn(chunk, n_features, device=device)
    print(f"(d) two runs of {n_layers} layers, N={n}, F={n_features}, relu codes, on {device}; {load()}")
    ref = None
    for precision in ("fp32", "tf32", "bf16"):
        eng = engine("relu", no_cache=True, precision=precision, device=device)
        stats, seconds, recheck = timed_inside(lambda: eng.pair_stats(run_a, run_b), corr_dense.Recheck, "resolve")
        t_mm = pairs * (n / chunk) * mm_seconds(x, y, precision)
        line = (f"(d) {precision}: {seconds:.1f} s, throughput / torch.mm {precision} = {t_mm / seconds:.2f}, "
                f"re-check {recheck / seconds:.0%} of the time")
        if ref is None:
            ref = stats
        else:
            diff = max(float(np.abs(stats[p].rho_F - ref[p].rho_F).max()) for p in ref)
            same = np.mean([np.mean(stats[p].match_F == ref[p].match_F) for p in ref])
            line += f"; max |rho - rho fp32| = {diff:.1e} (target <= 1e-5), same match {100 * same:.2f}%"
        print(line)


def peak_rss_self() -> int:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    execve, so a child would report its parent's peak at fork time."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_child(root: str, codes: str, n_layers: int) -> None:
    """Runs in its own process so that ru_maxrss is this computation's peak alone."""
    run_a, run_b = Run.open(root, "A"), Run.open(root, "B")
    eng = engine(codes, no_cache=True)
    t = time.perf_counter()
    if n_layers == len(run_a.layers):
        value = wmppc(run_a, run_b, eng).all_layers
    else:  # a subset of the layer pairs; load every SAE as the full run would (Run keeps them)
        for run in (run_a, run_b):
            for layer in run.layers:
                run.sae(layer)
        stats = eng.pair_stats(run_a, run_b, [(a, b) for a in run_a.layers[:n_layers] for b in run_b.layers[:n_layers]])
        value = float(np.mean([s.rho_F.mean() for s in stats.values()]))
    print(json.dumps({"peak_rss_bytes": peak_rss_self(),
                      "seconds": time.perf_counter() - t, "value": value}))


def peak_rss(root: Path, codes: str, n_layers: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--mem_child", str(root), "--codes", codes,
                          "--mem_child_layers", str(n_layers)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"memory child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_plan(n_features: int, n_layers: int) -> corr_dense.Plan:
    sizes = [corr_dense.LayerSize(layer, n_features) for layer in range(n_layers)]
    return corr_dense.plan(sizes, sizes, int(DEFAULT_MEM_GB * GIB) // 4)


def bench_memory(root: Path, n: int, n_features: int, n_layers: int, dense_n: int, dense_layers: int) -> None:
    print(f"(c) two runs of {n_layers} layers, N={n}, F={n_features}, d={n_features // 8}; {load()}")
    build_pair(root / "full", n, n_features, n_layers)
    res = peak_rss(root / "full", "topk", n_layers)
    print(f"(c) topk codes (sparse path), all-layers wMPPC: peak RSS {res['peak_rss_bytes'] / GIB:.2f} GiB "
          f"in {res['seconds']:.0f} s   (target <= 4 GiB)")
    # The dense path needs 144 pairs * 2 * F^2 = 11 GFLOP per sample, hours at N=50000 on 2 cores. Its memory does not
    # depend on N (activations are read chunk by chunk) and its accumulator plan depends only on the
    # feature counts, so a subset of layers with the same plan, at small N, shows the same peak.
    plan_full, plan_sub = dense_plan(n_features, n_layers), dense_plan(n_features, dense_layers)
    if plan_sub != plan_full:
        print(f"(c) warning: {dense_layers} layers do not reproduce the accumulator plan of {n_layers}")
    build_pair(root / "dense", dense_n, n_features, n_layers)
    res = peak_rss(root / "dense", "relu", dense_layers)
    print(f"(c) relu codes (dense path), {dense_layers}x{dense_layers} layer pairs at N={dense_n} "
          f"(accumulator plan {plan_sub}, the same as 12x12: {plan_full}): peak RSS "
          f"{res['peak_rss_bytes'] / GIB:.2f} GiB in {res['seconds']:.0f} s   (target <= 4 GiB); {load()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--workdir", help="where to write the synthetic runs (default: a temporary folder)")
    p.add_argument("--skip", nargs="*", default=[], choices=["speed", "memory", "precision"])
    p.add_argument("--device", default="cpu", help="where (a), (b) and (d) run: cpu or cuda")
    p.add_argument("--dense_mem_layers", type=int, default=4,
                   help="(c) dense relu: measure the first LxL layer pairs (12x12 takes hours on 2 cores)")
    p.add_argument("--dense_mem_n", type=int, default=4096, help="(c) dense relu: samples")
    p.add_argument("--mem_child", help=argparse.SUPPRESS)
    p.add_argument("--codes", help=argparse.SUPPRESS)
    p.add_argument("--mem_child_layers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mem_child:
        return mem_child(args.mem_child, args.codes, args.mem_child_layers)
    speed = (4000, 1024, 3) if args.quick else (20000, 3072, 6)
    memory = (8000, 2048, 4) if args.quick else (50000, 6144, 12)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_wmppc-"))
    try:
        if "speed" not in args.skip:
            bench_speed(work / "speed", *speed, args.device)
        if "precision" not in args.skip:
            bench_precision(work / "precision", *speed, args.device)
        if "memory" not in args.skip:
            bench_memory(work / "memory", *memory, min(args.dense_mem_n, memory[0]),
                         min(args.dense_mem_layers, memory[2]))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
