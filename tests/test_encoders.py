"""Encoder registry: every family loads from a local checkpoint, hooks record faithfully, tokens pool right."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from errors import UserError
from tiny_models import checkpoint_for, hf_dir
from wrappedmodels import ENCODERS, get_encoder_class

IMAGES = [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "green")]
CAPTIONS = ["a red circle", "a large blue square at the top left on a white background", "green"]
FAMILIES = sorted(ENCODERS)


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


def build(family, ckpt_dir, **kw):
    enc = ENCODERS[family](checkpoint_for(family, ckpt_dir), **kw)
    if family == "EfficientNetLite":
        enc.image_size = 64
    samples = {"image": IMAGES, "text": CAPTIONS, "mllm": list(zip(IMAGES, CAPTIONS))}[enc.modality]
    return enc, enc.collate([enc.transform(s) for s in samples])


def test_registry_has_the_eleven_families():
    assert set(ENCODERS) == {"ClipVision", "SigLIP2Vision", "ViT", "DinoV2", "ClipText", "SiglipText", "Bert",
                             "Deberta", "EfficientNetLite", "SDText", "Llava"}
    assert {c.checkpoint_flag for c in ENCODERS.values()} == {
        "--clip_model_name", "--siglip2_model_name", "--vit_model_name", "--dino_model_name", "--bert_model_name",
        "--deberta_model_name", "--effnet_model_name", "--sd_model_name", "--llava_model_name"}


def test_unknown_family_and_wrong_modality():
    with pytest.raises(UserError, match="unknown --model 'Clip'"):
        get_encoder_class("Clip")
    with pytest.raises(UserError, match="choose from"):
        get_encoder_class("Bert", "image")


def _reference_block_outputs(enc, x):
    outs = []
    handles = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in enc.blocks]
    enc.forward(x)
    for h in handles:
        h.remove()
    return [enc.as_tokens(o).clone() for o in outs]


def _reference_hidden(enc, inputs):
    """Every block's output from the model's own API, without our hooks: [layer] -> [B, T, D]."""
    x = {k: v for k, v in inputs.items() if k != "token_mask"}
    if type(enc).__name__ in ("ClipVision", "ClipText", "EfficientNetLite"):
        return _reference_block_outputs(enc, x)
    if type(enc).__name__ == "Llava":
        x = {k: v for k, v in x.items() if k not in ("image_mask", "caption_mask")}
    out = enc.model(**x, output_hidden_states=True)
    hidden = list(out.hidden_states[1:])
    if type(enc).__name__ == "Llava":  # Llama gives its last hidden state after the final norm
        hidden[-1] = _reference_block_outputs(enc, x)[-1]
    return hidden


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_record_block_outputs_and_leave_model_unchanged(family, ckpt_dir):
    enc, inputs = build(family, ckpt_dir)
    x = {k: v for k, v in inputs.items() if k != "token_mask"}
    ref = _reference_hidden(enc, inputs)
    before = enc.forward(x)
    hooks_before = [dict(blk._forward_hooks) for blk in enc.blocks]  # transformers 5 installs hooks of its own
    layers = list(range(enc.n_layers))
    rec = enc.record(inputs, layers)
    after = enc.forward(x)
    assert len(ref) == enc.n_layers
    for layer in layers:
        torch.testing.assert_close(rec[layer], ref[layer], rtol=1e-5, atol=1e-5)
    b = before if isinstance(before, torch.Tensor) else before[0]
    a = after if isinstance(after, torch.Tensor) else after[0]
    torch.testing.assert_close(a, b)
    assert [dict(blk._forward_hooks) for blk in enc.blocks] == hooks_before, "our hooks must be removed"


def test_record_stops_after_deepest_requested_block(ckpt_dir):
    enc, inputs = build("EfficientNetLite", ckpt_dir)
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: seen.append(i)) for i, b in enumerate(enc.blocks)]
    enc.record(inputs, [2, 5])
    for h in handles:
        h.remove()
    assert seen == list(range(6))


def test_clip_text_pools_end_of_text_like_clip(ckpt_dir):
    import open_clip

    enc, inputs = build("ClipText", ckpt_dir)
    assert enc.token == "eot"
    last = enc.n_layers - 1
    acts = enc.record(inputs, [last])[last]
    mask = enc.token_mask(inputs, acts)
    pooled = enc.pool(acts, mask)
    eot = inputs["text"].argmax(-1)
    assert eot.tolist() == [int(m.sum()) - 1 for m in mask]
    # CLIP's own text embedding = ln_final(block output at EOT) @ text_projection
    m = enc.model
    ours = m.ln_final(pooled) @ m.text_projection
    torch.testing.assert_close(ours, m.encode_text(inputs["text"]), rtol=1e-4, atol=1e-5)
    assert pooled.std(0).max() > 1e-3, "EOT vectors differ across captions"
    # the tokens the encoder fed are open_clip's own (its BPE vocabulary ships in the package: offline)
    assert torch.equal(inputs["text"], open_clip.get_tokenizer("ViT-B-32")(CAPTIONS)[:, :inputs["text"].shape[1]])


def test_clip_vision_pools_cls_like_clip(ckpt_dir):
    enc, inputs = build("ClipVision", ckpt_dir)
    last = enc.n_layers - 1
    acts = enc.record(inputs, [last])[last]
    pooled = enc.pool(acts, enc.token_mask(inputs, acts))
    v = enc.model
    torch.testing.assert_close(v.ln_post(pooled) @ v.proj, v(inputs["x"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,token,index", [
    ("ViT", "cls", 0), ("DinoV2", "cls", 0), ("Bert", "cls", 0), ("Deberta", "cls", 0), ("SiglipText", "last", -1),
    ("ClipText", "first", 0), ("ViT", "first", 0), ("SiglipText", "first", 0)])
def test_index_tokens(family, token, index, ckpt_dir):
    enc, inputs = build(family, ckpt_dir, token=token)
    if token != "first":
        assert enc.default_token == token
    acts = enc.record(inputs, [1])[1]
    torch.testing.assert_close(enc.pool(acts, enc.token_mask(inputs, acts)), acts[:, index])


@pytest.mark.parametrize("family", ["SigLIP2Vision", "EfficientNetLite"])
def test_mean_token_averages_all_positions(family, ckpt_dir):
    enc, inputs = build(family, ckpt_dir)
    assert enc.token == "mean"
    acts = enc.record(inputs, [1])[1]
    torch.testing.assert_close(enc.pool(acts, enc.token_mask(inputs, acts)), acts.mean(1))


def test_eot_and_mean_skip_padding_for_bert(ckpt_dir):
    enc, inputs = build("Bert", ckpt_dir, token="eot")
    acts = enc.record(inputs, [1])[1]
    mask = enc.token_mask(inputs, acts)
    lengths = inputs["attention_mask"].sum(1)
    assert mask.sum(1).tolist() == lengths.tolist() and len(set(lengths.tolist())) > 1
    pooled = enc.pool(acts, mask)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(pooled[b], acts[b, n - 1])  # the [SEP] of each caption
    enc.token = "mean"
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(enc.pool(acts, mask)[b], acts[b, :n].mean(0))


def test_siglip2_naflex_masks_padded_patches(tmp_path):
    enc = ENCODERS["SigLIP2Vision"](str(hf_dir("SigLIP2NaFlex", tmp_path / "nf")))
    imgs = [Image.new("RGB", (64, 16), "red"), Image.new("RGB", (32, 32), "blue")]
    inputs = enc.collate([enc.transform(s) for s in imgs])
    acts = enc.record(inputs, [1])[1]
    mask = enc.token_mask(inputs, acts)
    assert mask.shape == acts.shape[:2]
    for b in range(2):
        torch.testing.assert_close(enc.pool(acts, mask)[b], acts[b, mask[b]].mean(0))


def test_dinov2_hub_names_map_to_hf_ids():
    from wrappedmodels import DINO_HUB_TO_HF

    assert DINO_HUB_TO_HF["dinov2_vitb14"] == "facebook/dinov2-base"
    assert DINO_HUB_TO_HF["dinov2_vitl14_reg"] == "facebook/dinov2-with-registers-large"


@pytest.mark.parametrize("family,checkpoint", [("Bert", "bert-base-uncased"),
                                               ("ClipVision", "hf-hub:apple/DFN2B-CLIP-ViT-B-16"),
                                               ("DinoV2", "dinov2_vitb14")])
def test_unreachable_hub_model_is_one_clear_error(family, checkpoint):
    with pytest.raises(UserError) as e:
        ENCODERS[family](checkpoint)
    msg = str(e.value)
    assert checkpoint in msg and "offline" in msg and "\n" not in msg


@pytest.mark.parametrize("pool_type", ["last", "eos"])
def test_clip_text_pools_where_the_model_does(ckpt_dir, pool_type):
    enc = ENCODERS["ClipText"](checkpoint_for("ClipText", ckpt_dir))
    enc.model.text_pool_type = pool_type
    enc.model.text_eos_id = int(enc.tokenizer(["x"]).max())  # open_clip's end-of-text id
    inputs = enc.collate([enc.transform(s) for s in CAPTIONS])
    last = enc.n_layers - 1
    acts = enc.record(inputs, [last])[last]
    mask = enc.token_mask(inputs, acts)
    pooled = enc.pool(acts, mask)
    m = enc.model
    torch.testing.assert_close(m.ln_final(pooled) @ m.text_projection, m.encode_text(inputs["text"]),
                               rtol=1e-4, atol=1e-5)
    if pool_type == "last":
        assert mask.all()  # the last position is pooled, so it is a training token


def test_siglip_text_with_a_tokenizer_like_the_real_one(tmp_path):
    """SigLIP's tokenizer returns input_ids only and pads to 64; the recorded last position is padding
    for short captions, and must be among the SAE's training tokens."""
    import json
    from pathlib import Path

    ckpt = checkpoint_for("SiglipText", tmp_path)
    config = Path(ckpt) / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_input_names": ["input_ids"]}))
    enc = ENCODERS["SiglipText"](ckpt)
    inputs = enc.collate(CAPTIONS)
    assert "attention_mask" not in enc.tokenizer(CAPTIONS)
    acts = enc.record(inputs, [1])[1]
    mask = enc.token_mask(inputs, acts)
    assert mask.shape == (3, 64) and mask[:, -1].all() and not mask[2, 10:-1].any()  # "green": a few real tokens
    torch.testing.assert_close(enc.pool(acts, mask), acts[:, -1])


def test_readme_clip_names_are_openai_checkpoints_with_their_activation():
    """Every CLIP name the README suggests exists with `openai` weights in open_clip, in its QuickGELU
    variant (a GELU model carrying QuickGELU-trained weights only warns, and computes something else)."""
    import re
    from pathlib import Path

    import open_clip

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    names = set(re.findall(r"(?:`|--clip_model_name )(ViT-[BLH]/\d+[\w-]*)", readme))
    openai = {name for name, tag in open_clip.list_pretrained() if tag == "openai"}
    assert {"ViT-B/16-quickgelu", "ViT-L/14-quickgelu"} <= names
    for name in names:
        assert name.replace("/", "-") in openai and name.endswith("-quickgelu"), name
