"""What the paper's study costs on one H100, counted from this code's own work (SPEC §12).

    uv run bench/cost.py                    # the table of the README
    uv run bench/cost.py --efficiency 0.6 --mem_gb 16

Counts, for the 20 encoders of studies/paper_coco.toml on COCO (N = 118,287 samples, F = 8d, 2 SAE seeds):
- training: the encoder's forward pass (2 FLOPs per parameter and token) and, per layer, seed and token, the
  SAE step's dense encoder product (2 d F forward, 2 d F for the gradient of the input's product: the decoder
  and the top-k gradients are sparse, k/F of that);
- the all-layers wMPPC matrix with `relu` codes: for every ordered pair of runs, the dense path's plan
  (corr_dense.plan within --mem_gb) gives the groups; each (A group, B group) pass computes both groups'
  codes (2 N d f) and their product (2 N f_a f_b); once for the score, once for its floor, and the ceiling
  (seed 0 against seed 1 of each run);
- `topk` codes on the sparse path: N k^2 products per layer pair (a scatter-add, memory-bound: counted at
  --scatter_gbs of 16-byte updates), in blocks of corr_sparse.SCATTER_BLOCK products, each a few kernel
  launches (--launch_us).
Hours are FLOPs / (peak x --efficiency); these are estimates from the code's counts, not GPU timings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import corr_dense  # noqa: E402
import corr_sparse  # noqa: E402

N = 118_287
EXPANSION, TOP_K, SEEDS = 8, 32, 2
PEAK_TFLOPS = {"fp32": 67, "tf32": 495, "bf16": 990}
"""H100 SXM dense peaks."""
CAPTION_TOKENS = 14
"""Mean tokens of a COCO caption with its special tokens, padding excluded (the SAEs skip padding)."""
ENCODERS = {  # name: (d, layers, tokens per sample, parameters)
    "clip_vision_B": (768, 12, 197, 86e6), "clip_vision_L": (1024, 24, 257, 304e6),
    "clip_text_B": (512, 12, CAPTION_TOKENS, 63e6), "clip_text_L": (768, 12, CAPTION_TOKENS, 123e6),
    "dfn_vision_B": (768, 12, 197, 86e6), "dfn_vision_L": (1024, 24, 257, 304e6),
    "dfn_text_B": (512, 12, CAPTION_TOKENS, 63e6), "dfn_text_L": (768, 12, CAPTION_TOKENS, 123e6),
    "siglip2_vision_B": (768, 12, 576, 93e6), "siglip2_vision_L": (1024, 24, 576, 316e6),
    "siglip2_text_B": (768, 12, CAPTION_TOKENS, 110e6), "siglip2_text_L": (1024, 24, CAPTION_TOKENS, 300e6),
    "vit_B": (768, 12, 577, 86e6), "vit_L": (1024, 24, 577, 304e6),
    "dinov2_B": (768, 12, 257, 86e6), "dinov2_L": (1024, 24, 257, 304e6),
    "bert_B": (768, 12, CAPTION_TOKENS, 110e6), "bert_L": (1024, 24, CAPTION_TOKENS, 335e6),
    "deberta_B": (768, 12, CAPTION_TOKENS, 140e6), "deberta_L": (1024, 24, CAPTION_TOKENS, 400e6),
}


def training_flops() -> tuple[float, float]:
    """(encoder forward passes, SAE steps)."""
    encoders = sum(N * tokens * 2 * params for _, _, tokens, params in ENCODERS.values())
    saes = sum(N * tokens * layers * SEEDS * 4 * d * EXPANSION * d for d, layers, tokens, _ in ENCODERS.values())
    return encoders, saes


def pair_flops(a: tuple, b: tuple, mem_gb: float) -> float:
    """One ordered pair, all layers, relu codes: the dense path's plan, codes recomputed per pass."""
    (da, la, *_), (db, lb, *_) = a, b
    sizes_a = [corr_dense.LayerSize(i, EXPANSION * da) for i in range(la)]
    sizes_b = [corr_dense.LayerSize(i, EXPANSION * db) for i in range(lb)]
    plan = corr_dense.plan(sizes_a, sizes_b, int(mem_gb * 2**30) // 4)
    groups_a, groups_b = corr_dense.pack(sizes_a, plan.cap_a), corr_dense.pack(sizes_b, plan.cap_b)
    fa, fb = sum(s.n_features for s in sizes_a), sum(s.n_features for s in sizes_b)
    codes = 2 * N * (da * fa * len(groups_b) + db * fb * len(groups_a))
    return 2 * N * fa * fb + codes


def matrix_flops(mem_gb: float) -> float:
    runs = list(ENCODERS.values())
    scores = sum(pair_flops(a, b, mem_gb) for a in runs for b in runs if a is not b)
    ceilings = sum(pair_flops(a, a, mem_gb) for a in runs) * (len(runs) - 1)  # A@0 vs A@1, one per column
    return 2 * scores + ceilings


def topk_cost(scatter_gbs: float, launch_us: float) -> tuple[float, float]:
    """(hours of scatter traffic, hours of kernel launches) of the all-layers matrix with topk codes, with
    floors and ceilings."""
    layer_pairs = sum(a[1] * b[1] for a in ENCODERS.values() for b in ENCODERS.values() if a is not b)
    layer_pairs = 2 * layer_pairs + sum(a[1] ** 2 for a in ENCODERS.values()) * (len(ENCODERS) - 1)
    products = layer_pairs * N * TOP_K ** 2
    traffic_h = products * 16 / (scatter_gbs * 1e9) / 3600
    launches_h = products / corr_sparse.SCATTER_BLOCK["cuda"] * 3 * launch_us * 1e-6 / 3600
    return traffic_h, launches_h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--efficiency", type=float, default=0.8, help="share of peak the products reach")
    p.add_argument("--mem_gb", type=float, default=16.0, help="the engine's accumulator memory")
    p.add_argument("--scatter_gbs", type=float, default=1500.0, help="scatter-add bandwidth, GB/s")
    p.add_argument("--launch_us", type=float, default=10.0, help="one kernel launch, microseconds")
    args = p.parse_args()
    (enc, sae), matrix = training_flops(), matrix_flops(args.mem_gb)
    hours = lambda flops, k: flops / (PEAK_TFLOPS[k] * 1e12 * args.efficiency) / 3600  # noqa: E731
    print(f"COCO, N = {N:,}, {len(ENCODERS)} encoders, F = {EXPANSION}d, {SEEDS} seeds; H100 at "
          f"{args.efficiency:.0%} of peak\n")
    print("| work | PFLOP | fp32 | tf32 | bf16 |\n|---|---|---|---|---|")
    print(f"| training every encoder: encoders in fp32 ({enc / 1e15:,.0f} PFLOP), SAE steps ({sae / 1e15:,.0f} PFLOP) "
          f"in fp32 or bf16 (`--sae_dtype bfloat16`) | {(enc + sae) / 1e15:,.0f} | {hours(enc + sae, 'fp32'):.1f} h | – | "
          f"{hours(enc, 'fp32') + hours(sae, 'bf16'):.1f} h |")
    print(f"| all-layers wMPPC matrix, relu, floors and ceilings (`--precision`) | {matrix / 1e15:,.0f} | "
          + " | ".join(f"{hours(matrix, k):.1f} h" for k in PEAK_TFLOPS) + " |")
    traffic, launches = topk_cost(args.scatter_gbs, args.launch_us)
    print(f"\ntopk codes, sparse path: {traffic:.1f} h of scatter traffic at {args.scatter_gbs:g} GB/s, "
          f"{launches:.2f} h of kernel launches with {corr_sparse.SCATTER_BLOCK['cuda']:,} products per block "
          f"({launches * corr_sparse.SCATTER_BLOCK['cuda'] / corr_sparse.SCATTER_BLOCK['cpu']:.0f} h with the CPU's "
          f"{corr_sparse.SCATTER_BLOCK['cpu']:,})")


if __name__ == "__main__":
    main()
