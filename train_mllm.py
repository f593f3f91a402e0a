"""Train top-k SAEs on the language layers of a multimodal LLM over (image, caption) prompts, and record each
sample's image-token row and caption-token row as two paired runs, `<runname>_image` and `<runname>_text`.

    uv run train_mllm.py --model Llava --llava_model_name llava-hf/llava-1.5-7b-hf --dataset coco --runname llava
    uv run wmppc.py --source llava_image --target llava_text
"""
from __future__ import annotations

import torch

from errors import cli
from sae import SaeConfig
from saeshare.core import distributed
from saeshare.core.distributed import resolve_device
from saeshare.core.options import add_options, check_output, options_from
from saeshare.render.modality import format_shares, plot_shares
from saeshare.training.mllm import MllmOptions, train_mllm
from saeshare.training.train import TrainConfig, build_parser
from wrappedmodels import get_encoder_class


@cli
def main(argv=None):
    p = build_parser("mllm")
    p.description = ("Train a top-k SAE on every requested language layer of a multimodal LLM over (image, caption) "
                     "prompts; write <runname>_image and <runname>_text")
    add_options(p, MllmOptions)
    p.add_argument("--plot", default=None, help="PNG of the modality shares against layer")
    args = p.parse_args(argv)
    cls = get_encoder_class(args.model, "mllm")
    check_output(args.plot, "--plot")
    cfg = options_from(TrainConfig, args, checkpoint=cls.checkpoint_from(args))
    opts = options_from(MllmOptions, args)
    distributed.init(resolve_device(cfg.device))
    torch.manual_seed(cfg.seed)
    result = train_mllm(cfg, options_from(SaeConfig, args), opts)
    for m, meta in result.metas.items():
        last = meta.layer_info[meta.layers[-1]]
        print(f"wrote {cfg.root}/{meta.runname} ({m} rows; {len(meta.layers)} layers, {meta.dataset.n_samples} "
              f"samples); last layer FVU {last.fvu:.3f}")
    print(f"SAE features by the tokens they fire on (at least {opts.min_fires} times; "
          f"first {next(iter(result.shares.values())).n_samples} samples):")
    print(format_shares(result.shares))
    if args.plot and distributed.rank() == 0:
        plot_shares(result.shares, args.plot, f"{cfg.runname}: where its SAE features fire")
    print(f"{result.seconds:.1f} s")
    return result


if __name__ == "__main__":
    main()
