"""Benchmark of one SAE training step (docs/design.md#the-sae), both with Adam, at D=768, F=6144, K=32:

  the paper's formulation: dense pre-activations, top-k scattered into a dense [T, F] code, dense decoder
  product, autograd through everything;
  the fused step (sae.TopKSAE.forward): the same forward, a backward through the k kept codes only.

Prints the two step times, their ratio (targets: >= 2x at T=800, a CLIP B/32 batch of 16 images; >= 3x
at T=4112, a ViT-L/14 batch) and the largest relative difference of their gradients. The two are timed
alternately, so that a busy machine slows both alike.

    uv run bench/bench_sae.py            # ~1 minute on 2 cores
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sae import TopKSAE  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def paper_loss(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    pre = F.relu((x - sae.b_dec) @ sae.W_enc)
    vals, idx = pre.topk(sae.top_k, dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter_(1, idx, vals)
    return (z @ sae.W_dec + sae.b_dec - x).pow(2).mean()


def fused_loss(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    return sae(x).mse


def step(sae: TopKSAE, opt: torch.optim.Optimizer, loss_fn, x: torch.Tensor) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss_fn(sae, x).backward()
    opt.step()
    return time.perf_counter() - t


def grads(loss_fn, x: torch.Tensor, d: int, n_features: int, k: int) -> dict[str, torch.Tensor]:
    sae = TopKSAE(d, n_features, k, generator=torch.Generator().manual_seed(0))
    loss_fn(sae, x).backward()
    return {n: p.grad for n, p in sae.named_parameters()}


def main(d: int = 768, n_features: int = 6144, k: int = 32, repeats: int = 5) -> None:
    print(f"D={d}, F={n_features}, K={k}, {torch.get_num_threads()} threads, Adam, median of {repeats} steps each")
    for t_tokens in (800, 4112):
        x = torch.randn(t_tokens, d)
        ref, new = grads(paper_loss, x, d, n_features, k), grads(fused_loss, x, d, n_features, k)
        diff = max(float((ref[n] - new[n]).abs().max() / ref[n].abs().max()) for n in ref)
        saes = {name: TopKSAE(d, n_features, k, generator=torch.Generator().manual_seed(0))
                for name in ("paper", "fused")}
        opts = {name: torch.optim.Adam(s.parameters(), lr=5e-5) for name, s in saes.items()}
        times: dict[str, list[float]] = {"paper": [], "fused": []}
        for i in range(repeats + 1):  # the first round warms up
            for name, fn in (("paper", paper_loss), ("fused", fused_loss)):
                dt = step(saes[name], opts[name], fn, x)
                if i:
                    times[name].append(dt)
        med = {name: sorted(v)[len(v) // 2] for name, v in times.items()}
        target = 2 if t_tokens == 800 else 3
        print(f"T={t_tokens}: paper step {1000 * med['paper']:.0f} ms, fused step {1000 * med['fused']:.0f} ms: "
              f"x{med['paper'] / med['fused']:.2f} (target >= {target}x); max relative gradient difference {diff:.1e}")


if __name__ == "__main__":
    main()
