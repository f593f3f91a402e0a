"""Train top-k SAEs on the language layers of a multimodal LLM over (image, caption) prompts, and record each
sample's image-token row and caption-token row as two paired runs, `<runname>_image` and `<runname>_text`.

    uv run train_mllm.py --model Llava --llava_model_name llava-hf/llava-1.5-7b-hf --dataset coco --runname llava
    uv run wmppc.py --source llava_image --target llava_text
"""
from __future__ import annotations

import torch

from errors import UserError, cli
from sae import SaeConfig
from saeshare.core import distributed
from saeshare.core.distributed import resolve_device
from saeshare.core.options import check_output, options_from
from saeshare.disk.runs import ModalityShares
from saeshare.training.mllm import check_pools, train_mllm
from saeshare.training.train import TrainConfig, build_parser
from wrappedmodels import get_encoder_class


def format_shares(shares: dict[int, ModalityShares]) -> str:
    lines = [f"{'layer':>5} {'image only':>10} {'text only':>10} {'both':>7} {'features':>9} {'image mass':>10}"]
    for layer, s in shares.items():
        lines.append(f"{layer:>5} {s.image_only:>10.3f} {s.text_only:>10.3f} {s.both:>7.3f} {s.n_features:>9} "
                     f"{s.image_mass:>10.3f}")
    return "\n".join(lines)


def plot_shares(shares: dict[int, ModalityShares], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(shares)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for key, label in (("image_only", "image tokens only"), ("text_only", "caption tokens only"), ("both", "both")):
        ax.plot(layers, [getattr(shares[la], key) for la in layers], marker="o", label=label)
    ax.set(xlabel="layer", ylabel="share of firing features", ylim=(0, 1), title=title, xticks=layers)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@cli
def main(argv=None):
    p = build_parser("mllm")
    p.description = ("Train a top-k SAE on every requested language layer of a multimodal LLM over (image, caption) "
                     "prompts; write <runname>_image and <runname>_text")
    p.add_argument("--image_token", default="mean", help="row per sample from its image tokens: mean or last")
    p.add_argument("--text_token", default="mean", help="row per sample from its caption tokens: mean or last")
    p.add_argument("--min_fires", type=int, default=5, help="tokens a feature must fire on to count for a modality")
    p.add_argument("--plot", default=None, help="PNG of the modality shares against layer")
    args = p.parse_args(argv)
    cls = get_encoder_class(args.model, "mllm")
    if args.token is not None:
        raise UserError("train_mllm.py: --image_token and --text_token choose the rows (--token is for one-row runs)")
    if args.min_fires < 1:
        raise UserError("--min_fires must be at least 1")
    check_output(args.plot, "--plot")
    cfg = options_from(TrainConfig, args, checkpoint=cls.checkpoint_from(args))
    pools = check_pools({"image": args.image_token, "text": args.text_token})
    distributed.init(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    result = train_mllm(cfg, options_from(SaeConfig, args), pools, args.min_fires)
    for m, meta in result.metas.items():
        last = meta.layer_info[meta.layers[-1]]
        print(f"wrote {cfg.root}/{meta.runname} ({m} rows; {len(meta.layers)} layers, {meta.dataset.n_samples} "
              f"samples); last layer FVU {last.fvu:.3f}")
    print(f"SAE features by the tokens they fire on (at least {args.min_fires} times; "
          f"first {next(iter(result.shares.values())).n_samples} samples):")
    print(format_shares(result.shares))
    if args.plot and distributed.rank() == 0:
        plot_shares(result.shares, args.plot, f"{cfg.runname}: where its SAE features fire")
    print(f"{result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
