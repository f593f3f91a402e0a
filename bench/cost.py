"""What the paper's study costs on one H100, counted from this code's own work (docs/design.md#scale).

    uv run bench/cost.py                    # the table of the README
    uv run bench/cost.py --efficiency 0.6 --mem_gb 16

Counts (costs.py, the same counts as `study.py --dry_run`), for the 20 encoders of studies/paper_coco.toml on
COCO (N = 118,287 samples, F = 8d, 2 SAE seeds), training and the all-layers matrix with `relu` codes, and
for `topk` codes on the sparse path: N k^2 products per layer pair (a scatter-add, memory-bound: counted at
--scatter_gbs of 16-byte updates), in blocks of corr_sparse.SCATTER_BLOCK products, each a few kernel
launches (--launch_us).
Then each LLaVA-1.5 of train_mllm.py: its training on COCO, and the wMPPC of its image rows to its caption rows.
Hours are FLOPs / (peak x --efficiency); these are estimates from the code's counts, not GPU timings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from saeshare.engine import costs  # noqa: E402
from saeshare.engine import sparse as corr_sparse  # noqa: E402

N = 118_287
EXPANSION, TOP_K, SEEDS = 8, 32, 2
ENCODERS = costs.PAPER


def topk_cost(scatter_gbs: float, launch_us: float) -> tuple[float, float]:
    """(hours of scatter traffic, hours of kernel launches) of the all-layers matrix with topk codes, with
    floors and ceilings."""
    # by key: equal size tuples may be one object (CPython merges equal constants), so `a is not b` would skip pairs
    layer_pairs = sum(ENCODERS[a][1] * ENCODERS[b][1] for a in ENCODERS for b in ENCODERS if a != b)
    layer_pairs = 2 * layer_pairs + sum(a[1] ** 2 for a in ENCODERS.values()) * (len(ENCODERS) - 1)
    products = layer_pairs * N * TOP_K ** 2
    traffic_h = products * 16 / (scatter_gbs * 1e9) / 3600
    launches_h = products / corr_sparse.SCATTER_BLOCK["cuda"] * 3 * launch_us * 1e-6 / 3600
    return traffic_h, launches_h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--efficiency", type=float, default=costs.EFFICIENCY, help="share of peak the products reach")
    p.add_argument("--mem_gb", type=float, default=16.0, help="the engine's accumulator memory")
    p.add_argument("--scatter_gbs", type=float, default=1500.0, help="scatter-add bandwidth, GB/s")
    p.add_argument("--launch_us", type=float, default=10.0, help="one kernel launch, microseconds")
    args = p.parse_args()
    sizes = [costs.EncoderSize([d] * layers, [tokens] * layers, params)
             for d, layers, tokens, params in ENCODERS.values()]
    enc, sae = (sum(x) for x in zip(*(costs.training_flops(size, N, EXPANSION, SEEDS) for size in sizes)))
    matrix = costs.matrix_flops(sizes, N, EXPANSION, args.mem_gb, True, SEEDS)
    hours = lambda flops, k: costs.hours(flops, k, args.efficiency)  # noqa: E731
    print(f"COCO, N = {N:,}, {len(ENCODERS)} encoders, F = {EXPANSION}d, {SEEDS} seeds; H100 at "
          f"{args.efficiency:.0%} of peak\n")
    print(costs.table([
        (f"training every encoder: encoders in fp32 ({enc / 1e15:,.0f} PFLOP), SAE steps ({sae / 1e15:,.0f} PFLOP) in "
         "fp32 or bf16 (`--sae_dtype bfloat16`)", enc + sae,
         {"fp32": hours(enc + sae, "fp32"), "tf32": None, "bf16": hours(enc, "fp32") + hours(sae, "bf16")}),
        ("all-layers wMPPC matrix, relu, floors and ceilings (`--precision`)", matrix,
         {k: hours(matrix, k) for k in costs.PEAK_TFLOPS})]))
    traffic, launches = topk_cost(args.scatter_gbs, args.launch_us)
    print(f"\ntopk codes, sparse path: {traffic:.1f} h of scatter traffic at {args.scatter_gbs:g} GB/s, "
          f"{launches:.2f} h of kernel launches with {corr_sparse.SCATTER_BLOCK['cuda']:,} products per block "
          f"({launches * corr_sparse.SCATTER_BLOCK['cuda'] / corr_sparse.SCATTER_BLOCK['cpu']:.0f} h with the CPU's "
          f"{corr_sparse.SCATTER_BLOCK['cpu']:,})")
    for (model, checkpoint), (d, layers, tokens, params) in costs.MLLMS.items():
        size = costs.EncoderSize([d] * layers, [tokens] * layers, params)
        enc, sae = costs.training_flops(size, N, EXPANSION, 1)
        pair = costs.pair_flops(size, size, N, EXPANSION, args.mem_gb)
        print(f"\n{model} {checkpoint} (train_mllm.py, {layers} layers of d {d}, {tokens} tokens a sample, one seed):")
        print(costs.table([
            ("training: the model in bf16 (`--encoder_dtype bfloat16`), SAE steps fp32 or bf16", enc + sae,
             {"fp32": hours(enc, "bf16") + hours(sae, "fp32"), "tf32": None,
              "bf16": hours(enc, "bf16") + hours(sae, "bf16")}),
            ("wMPPC image rows -> caption rows, all layer pairs, relu, no floor", pair,
             {k: hours(pair, k) for k in costs.PEAK_TFLOPS})]))


if __name__ == "__main__":
    main()
