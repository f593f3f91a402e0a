"""One prepared GPU check: the device variants of the benches and the CUDA-marked tests, each figure on one
line beside the CPU path's and a tolerance, `ok` or `FAILED`. Run by bench/gpu_check.sh.

    bash bench/gpu_check.sh            # on a GPU machine (under 8 minutes); on a CPU-only one it skips, saying so
    uv run bench/gpu_check.py --device cpu --small    # the script checking itself on the CPU (its test)

Checks: the SAE step (fused fp32 and bf16 products against the CPU's fp32, and the paper's formulation's time
over the fused one), three seeds in one batched step (their weights against the CPU's one-by-one steps, and
the time of one by one over it), wMPPC (dense fp32 / tf32 / bf16 with the exact re-check, and the sparse
path, against the CPU's dense fp32), the classic measures (CKA, debiased CKA, SVCCA, mutual kNN), a tiny
model of every encoder family trained on the device (its recorded activations against the CPU's; an MLLM
also in bfloat16), a joint dictionary, then `pytest -m cuda`. Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from bench_sae import fused_loss, paper_loss  # noqa: E402
from bench_wmppc import build_pair  # noqa: E402

from sae import TopKSAE  # noqa: E402
from synthetic import engine  # noqa: E402

FAILED: list[str] = []


def report(name: str, diff: float, tol: float, extra: str = "") -> None:
    ok = diff <= tol
    if not ok:
        FAILED.append(name)
    print(f"{'ok    ' if ok else 'FAILED'} {name}: max difference from the CPU {diff:.1e} (tolerance {tol:.0e})"
          + (f"; {extra}" if extra else ""), flush=True)


def timed(fn, device: str):
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def sae_step(device: str, small: bool) -> None:
    d, f, k, t = (64, 512, 8, 256) if small else (768, 6144, 32, 4112)
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(0))

    def grads(fn, dev, dtype=None):
        sae = TopKSAE(d, f, k, generator=torch.Generator().manual_seed(0)).to(dev)
        sae.product_dtype = dtype

        def step():
            loss = fn(sae, x.to(dev))
            loss.backward()
            return float(loss.detach())
        loss, seconds = timed(step, dev)
        return {n: p.grad.cpu() for n, p in sae.named_parameters()}, seconds, loss

    def rel(a, b):
        return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in b)

    ref, _, ref_loss = grads(fused_loss, "cpu")
    grads(fused_loss, device)  # warm-up
    fp32, t_fused, _ = grads(fused_loss, device)
    _, t_paper, _ = grads(paper_loss, device)
    report(f"SAE step fp32 (D={d}, F={f}, T={t}), gradients", rel(fp32, ref), 1e-4,
           f"fused {1000 * t_fused:.1f} ms, paper's formulation x{t_paper / t_fused:.2f}")
    # bf16 products may keep other features near the k-th largest: the loss, not each gradient entry, agrees
    _, t_bf16, loss = grads(fused_loss, device, torch.bfloat16)
    report("SAE step bf16 products, loss (relative)", abs(loss - ref_loss) / ref_loss, 1e-2, f"{1000 * t_bf16:.1f} ms")


def seed_steps(device: str, small: bool) -> None:
    """Three seeds of a layer in one batched step (SeedStack) against the three stepped one by one: the time
    of 10 steps each way on the device, and the stacked weights against the CPU's one-by-one ones."""
    from sae import SaeConfig, SaeTrainer, SeedStack

    cfg = SaeConfig(lr=1e-3)
    for d, t in ((24, 2048), (64, 256)) if small else ((24, 65536), (768, 4112)):
        xs = [torch.randn(t, d, generator=torch.Generator().manual_seed(i)) for i in range(10)]

        def trained(dev, stacked):
            trainers = [SaeTrainer(d, cfg, device=dev, seed=s) for s in range(3)]
            stack = SeedStack(trainers) if stacked else None

            def steps():
                for x in xs:
                    x = x.to(dev)
                    if stack is not None:
                        stack.train_step(x)
                    else:
                        for tr in trainers:
                            tr.train_step(x)
            _, seconds = timed(steps, dev)
            return [tr.sae.state() for tr in trainers], seconds

        ref, _ = trained("cpu", False)
        trained(device, True)  # warm-up
        one_by_one, t_one = trained(device, False)
        stacked, t_stacked = trained(device, True)
        diff = max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for a, b in zip(stacked, ref) for n in b)
        report(f"3 SAE seeds in one batched step (D={d}, T={t}), weights after 10 steps", diff, 1e-4,
               f"{1000 * t_stacked / 10:.1f} ms a step for all three, one by one x{t_one / t_stacked:.2f}")


def wmppc_paths(device: str, root: Path, small: bool) -> None:
    n, f, layers = (1024, 256, 2) if small else (16384, 4096, 3)
    run_a, run_b = build_pair(root, n, f, layers)
    ref = engine("relu", no_cache=True).pair_stats(run_a, run_b)
    for precision in ("fp32", "tf32", "bf16"):
        got, seconds = timed(lambda: engine("relu", no_cache=True, precision=precision, device=device)
                             .pair_stats(run_a, run_b), device)
        diff = max(float(np.abs(got[p].rho_F - ref[p].rho_F).max()) for p in ref)
        same = np.mean([np.mean(got[p].match_F == ref[p].match_F) for p in ref])
        report(f"wMPPC dense {precision} (N={n}, F={f}, {layers}x{layers} layers)", diff, 1e-5,
               f"{seconds:.2f} s, same match {100 * same:.2f}%")
    ref_topk = engine("topk", no_cache=True, method="dense").pair_stats(run_a, run_b)
    got, seconds = timed(lambda: engine("topk", no_cache=True, device=device).pair_stats(run_a, run_b), device)
    report("wMPPC sparse path, top-k codes", max(float(np.abs(got[p].rho_F - ref_topk[p].rho_F).max())
                                                  for p in ref_topk), 1e-5, f"{seconds:.2f} s")


def measures(device: str, root: Path) -> None:
    from saeshare.disk.runs import Run
    from similarity import SimilarityEngine

    run_a, run_b = Run.open(root, "A"), Run.open(root, "B")
    ref = SimilarityEngine(use_cache=False).compare(run_a, run_b)
    got, seconds = timed(lambda: SimilarityEngine(use_cache=False, device=device).compare(run_a, run_b), device)
    for m, values in ref.measures.items():
        report(f"{m} (every layer pair)", float(np.abs(got.measures[m].layer_matrix - values.layer_matrix).max()),
               1e-6, f"{seconds:.2f} s for all four")


def families(device: str, root: Path, only: list[str] | None) -> None:
    """A tiny model of every family, trained on the device and on the CPU: the recorded pooled tokens agree
    (the encoders are the same; the SAEs train alike up to float rounding)."""
    import train_image
    import train_mllm
    import train_text
    from saeshare.disk.runs import Run
    from tiny_models import checkpoint_for
    from wrappedmodels import ENCODERS

    for family, cls in ENCODERS.items():
        if only and family not in only:
            continue
        ckpt = checkpoint_for(family, root / "ckpt")
        main = {"image": train_image.main, "text": train_text.main, "mllm": train_mllm.main}[cls.modality]
        sets = ("image", "text") if cls.modality == "mllm" else (None,)

        def trained(dev: str, dtype: str, name: str, family=family, ckpt=ckpt, main=main, sets=sets) -> list[Run]:
            main(["--model", family, cls.checkpoint_flag, ckpt, "--runname", name, "--root", str(root / "fam"),
                  "--max_samples", "24", "--batch_size", "8", "--layers", "0", "--device", dev, "--encoder_dtype",
                  dtype, *(["--image_size", "32"] if family == "EfficientNetLite" else []), "--overwrite"])
            return [Run.open(root / "fam", f"{name}_{m}" if m else name) for m in sets]

        ref = trained("cpu", "float32", f"{family}-ref")
        # an MLLM also runs in bfloat16, as its README commands do
        for dtype in ("float32", "bfloat16") if cls.modality == "mllm" else ("float32",):
            for a_run, b_run in zip(ref, trained(device, dtype, f"{family}-{dtype}")):
                a, b = (np.asarray(r.acts(0), dtype=np.float64) for r in (a_run, b_run))
                rows = f" {a_run.meta.modality} rows" if cls.modality == "mllm" else ""
                report(f"{family}{rows}: recorded activations, {dtype} on {device}",
                       float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)), 1e-3 if dtype == "float32" else 1e-2)


def joint_dictionary(device: str, root: Path) -> None:
    import joint
    from saeshare.disk.runs import Run
    from saeshare.joint.dictionary import JointConfig

    runs = [Run.open(root, "A"), Run.open(root, "B")]
    cfg = JointConfig(expansion_factor=1, top_k=8, max_epochs=3)
    ref = joint.joint_report(runs, [0, 0], cfg, "cpu", with_match=False)
    got, seconds = timed(lambda: joint.joint_report(runs, [0, 0], cfg, device, with_match=False), device)
    report("joint.py SPARC: cross R2", float(np.abs(np.asarray(got.cross_r2) - np.asarray(ref.cross_r2)).max()),
           5e-2, f"{seconds:.1f} s (training differs by float rounding, so the tolerance is loose)")


def cuda_tests() -> None:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(ROOT / "tests")],
                         capture_output=True, text=True, cwd=ROOT)
    summary = (out.stdout.strip().splitlines() or ["no output"])[-1]
    if out.returncode not in (0, 5):
        FAILED.append("pytest -m cuda")
    print(f"{'ok    ' if out.returncode in (0, 5) else 'FAILED'} pytest -m cuda: {summary}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="the device checked against the CPU")
    p.add_argument("--small", action="store_true", help="small sizes (the script's own test)")
    p.add_argument("--families", nargs="*", help="only these encoder families (default: all)")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        for what in ("SAE step", "SAE seeds stacked", "wMPPC dense and sparse", "classic measures",
                     "tiny model per family", "joint dictionary", "pytest -m cuda"):
            print(f"skip   {what}: no CUDA device on this machine", flush=True)
        print("gpu_check: nothing checked here; run it on a GPU machine (--device cpu checks the script itself)")
        return
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "the CPU itself"
    print(f"gpu_check on {args.device} ({name}), torch {torch.__version__}", flush=True)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sae_step(args.device, args.small)
        seed_steps(args.device, args.small)
        wmppc_paths(args.device, root, args.small)
        measures(args.device, root)
        families(args.device, root, args.families)
        joint_dictionary(args.device, root)
    if args.device.startswith("cuda"):
        cuda_tests()
    print(f"gpu_check: {len(FAILED)} failed ({', '.join(FAILED) or 'none'}) in {time.perf_counter() - t:.0f} s")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
