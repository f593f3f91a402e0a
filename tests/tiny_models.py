"""Tiny random checkpoints of every encoder family, saved to disk so that tests exercise the real loaders."""
from __future__ import annotations

import json
from pathlib import Path

import torch

HIDDEN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
BERT_VOCAB = 30522  # the MiniLM package's real BERT vocabulary


def _bert_tokenizer(out: Path) -> None:
    from transformers import BertTokenizer

    from wrappedmodels import minilm_path

    BertTokenizer(vocab_file=str(Path(minilm_path()) / "vocab.txt")).save_pretrained(out)


def open_clip_dir(out: Path) -> Path:
    """open_clip layout: open_clip_config.json (model_cfg + preprocess_cfg) and open_clip_model.safetensors."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = dict(embed_dim=32, quick_gelu=True,
                     vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, **{k: v for k, v in model_cfg.items()
                                                                              if k != "quick_gelu"})
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    return out


def hf_dir(family: str, out: Path) -> Path:
    """A save_pretrained folder (model + processor/tokenizer) for a transformers-backed family."""
    import transformers as tf

    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    if family == "ViT":
        tf.ViTModel(tf.ViTConfig(**HIDDEN, image_size=32, patch_size=8)).save_pretrained(out)
        tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    elif family == "DinoV2":
        tf.Dinov2Model(tf.Dinov2Config(**HIDDEN, image_size=32, patch_size=8)).save_pretrained(out)
        tf.BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    elif family in ("SigLIP2Vision", "SiglipText"):
        cfg = tf.SiglipConfig(vision_config=dict(**HIDDEN, image_size=32, patch_size=8),
                              text_config=dict(**HIDDEN, vocab_size=BERT_VOCAB, max_position_embeddings=64))
        tf.SiglipModel(cfg).save_pretrained(out)
        tf.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
        _bert_tokenizer(out)  # SigLIP's own tokenizer needs a sentencepiece model file
    elif family == "SigLIP2NaFlex":
        cfg = tf.Siglip2Config(vision_config=dict(**HIDDEN, patch_size=8, num_patches=16),
                               text_config=dict(**HIDDEN, vocab_size=BERT_VOCAB))
        tf.Siglip2Model(cfg).save_pretrained(out)
        tf.Siglip2ImageProcessor(patch_size=8, max_num_patches=16).save_pretrained(out)
    elif family == "Bert":
        tf.BertModel(tf.BertConfig(**HIDDEN, vocab_size=BERT_VOCAB)).save_pretrained(out)
        _bert_tokenizer(out)
    elif family == "Deberta":
        tf.DebertaModel(tf.DebertaConfig(**HIDDEN, vocab_size=BERT_VOCAB)).save_pretrained(out)
        _bert_tokenizer(out)
    else:
        raise ValueError(family)
    return out


def clip_tokenizer(out: Path):
    """A CLIPTokenizer over open_clip's real BPE vocabulary (the same one SD's tokenizers carry), built offline;
    open_clip spells the special tokens <start_of_text> / <end_of_text>, which keeps their ids 49406 / 49407."""
    import open_clip
    from transformers import CLIPTokenizer

    bpe = open_clip.tokenizer.SimpleTokenizer()
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(bpe.encoder))
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), bos_token="<start_of_text>",
                         eos_token="<end_of_text>", pad_token="<end_of_text>", unk_token="<end_of_text>",
                         model_max_length=77)


def sd_pipeline_dir(out: Path, n_layers: int = 4) -> Path:
    """A tiny random Stable Diffusion pipeline folder (64x64 images in 2 steps in well under a second)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = clip_tokenizer(out / "bpe")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=2, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out / "pipeline")
    return out / "pipeline"


LLAVA_WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:", *(
    "a an the picture photo of with and on at in to background large small middle center top bottom left right "
    "corner circle square triangle star cross diamond red blue green yellow orange purple white black gray "
    "pink brown cyan").split()]


def _llava_tokenizer():
    """A word-level tokenizer over the shapes captions' words, with an <image> token."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(LLAVA_WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>",
                                      bos_token="<s>", eos_token="</s>",
                                      extra_special_tokens={"image_token": "<image>"})


def _llava_configs() -> dict:
    import transformers as tf

    return dict(text_config=tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, num_key_value_heads=2, vocab_size=len(LLAVA_WORDS),
                                           max_position_embeddings=128),
                vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=16, patch_size=4),
                image_token_index=LLAVA_WORDS.index("<image>"), vision_feature_select_strategy="default",
                vision_feature_layer=-1)


def llava_dir(out: Path) -> Path:
    """A tiny random LLaVA (Llama 3 layers of 32, CLIP vision 16 px in 4-px patches: 16 image tokens) with a
    word-level tokenizer over the shapes captions' words and an <image> token."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(**_llava_configs()))
    images = tf.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    # the CLS is dropped ("default"), and the processor must count it among the tokens it removes
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=_llava_tokenizer(), patch_size=4,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def llava_next_dir(out: Path) -> Path:
    """The same tiny model as a LLaVA-NeXT (any-resolution tiles: a base view and tiles of 16 px, each 16
    image tokens, and a row-end token per row of patches)."""
    import transformers as tf

    torch.manual_seed(0)
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    model = tf.LlavaNextForConditionalGeneration(tf.LlavaNextConfig(**_llava_configs(), image_grid_pinpoints=pinpoints))
    images = tf.LlavaNextImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                        image_grid_pinpoints=pinpoints)
    processor = tf.LlavaNextProcessor(image_processor=images, tokenizer=_llava_tokenizer(), patch_size=4,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def checkpoint_for(family: str, tmp: Path) -> str:
    """A local checkpoint for `family` (EfficientNetLite: its packaged real weights)."""
    if family == "Llava":
        return str(llava_dir(tmp / "llava"))
    if family == "SDText":
        return str(sd_pipeline_dir(tmp / "sd"))
    if family in ("ClipVision", "ClipText"):
        return str(open_clip_dir(tmp / "open_clip"))
    if family == "EfficientNetLite":
        return "efficientnet-lite0"
    return str(hf_dir(family, tmp / family))


if __name__ == "__main__":  # uv run python tests/tiny_models.py FAMILY OUT: a tiny random checkpoint to try commands on
    import sys

    print(checkpoint_for(sys.argv[1], Path(sys.argv[2])))
