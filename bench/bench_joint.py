"""Benchmark of joint.py: wall time and peak memory of the whole command (training on the runs and on their
floor, the measures on the held-out samples, the first run's SAE features matched to the latents) on two
runs of N pooled rows of width d that share half of their latent factors.

    uv run bench/bench_joint.py            # N=100,000, d=1024: the target is under 10 minutes and 4 GiB here
    uv run bench/bench_joint.py --quick    # N=10,000, d=256
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_wmppc import peak_rss_self  # noqa: E402

from tests.synthetic import make_run, random_sae_state  # noqa: E402

FACTORS = 64
GIB = 2**30


def build(root: Path, n: int, d: int) -> None:
    """Runs A and B: 64 sparse factors each (the first 32 shared, on each run's own random directions), noise."""
    def rows_of(seed: int, first: int):
        mix = np.random.default_rng(seed).normal(size=(FACTORS, d)).astype(np.float32) / np.sqrt(d)

        def rows(start: int, stop: int) -> np.ndarray:
            z = np.random.default_rng([0, start]).random((stop - start, 2 * FACTORS - FACTORS // 2))
            z = (z < 0.05) * z * 20
            mine = np.concatenate([z[:, :FACTORS // 2], z[:, first:first + FACTORS // 2]], 1).astype(np.float32)
            noise = np.random.default_rng([seed, start]).normal(size=(stop - start, d)).astype(np.float32)
            return mine @ mix + 0.01 * noise
        return rows

    for name, seed, first in (("A", 1, FACTORS // 2), ("B", 2, FACTORS)):
        make_run(root, name, {0: rows_of(seed, first)}, {0: random_sae_state(d, 8 * d, seed, b_scale=0.0)}, 32,
                 n_samples=n)


def child(argv: list[str]) -> None:
    import joint

    t = time.perf_counter()
    rep = joint.main(argv)
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_bytes": peak_rss_self(),
                      "epochs": [rep.epochs, rep.floor.epochs], "shared": rep.shared_fraction,
                      "jaccard": rep.jaccard[0][1], "floor_jaccard": rep.floor.jaccard[0][1]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=argparse.REMAINDER)
    p.add_argument("--flags", default="--batch_size 1024 --max_epochs 4",
                   help="joint.py settings besides the defaults (default: %(default)s)")
    args = p.parse_args()
    if args.child is not None:
        return child(args.child)
    n, d = (10_000, 256) if args.quick else (100_000, 1024)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        build(Path(tmp), n, d)
        print(f"built two runs of {n:,} rows x {d} in {time.perf_counter() - t:.0f} s")
        argv = ["--runs", "A", "B", "--root", tmp, "--device", "cpu", *args.flags.split()]
        out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"joint.py failed:\n{out.stderr[-3000:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
    print("\n".join(line for line in out.stdout.splitlines()[:-1]))
    print(f"joint.py {args.flags} at N={n:,}, d={d} per run: {got['seconds']:.0f} s "
          f"(target < 600), peak memory {got['peak_rss_bytes'] / GIB:.2f} GiB (target < 4); epochs "
          f"{got['epochs'][0]} + {got['epochs'][1]} (floor); Jaccard {got['jaccard']:.3f} against its floor "
          f"{got['floor_jaccard']:.3f}")


if __name__ == "__main__":
    main()
