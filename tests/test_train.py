"""train_image.py / train_text.py end to end: runs on disk (docs/design.md#runs-on-disk), one encoder pass, bad
input (#bad-input)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_image
import train_text
import wrappedmodels
from sae import TopKSAE
from saeshare.disk.runs import Run, RunMeta
from tiny_models import checkpoint_for

ROOT_DIR = Path(__file__).resolve().parents[1]
FAMILY_ARGS = {
    "ClipVision": "--clip_model_name", "SigLIP2Vision": "--siglip2_model_name", "ViT": "--vit_model_name",
    "DinoV2": "--dino_model_name", "EfficientNetLite": "--effnet_model_name",
    "ClipText": "--clip_model_name", "SiglipText": "--siglip2_model_name", "Bert": "--bert_model_name",
    "Deberta": "--deberta_model_name", "SDText": "--sd_model_name",
}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpts")


def run_cli(family, ckpt, root, runname, *extra, n=12):
    cls = wrappedmodels.ENCODERS[family]
    cli = train_image if cls.modality == "image" else train_text
    argv = ["--model", family, FAMILY_ARGS[family], ckpt, "--runname", runname, "--root", str(root),
            "--dataset", "shapes", "--max_samples", str(n), "--batch_size", "5", "--expansion_factor", "2",
            "--top_k", "4", *extra]
    if family == "EfficientNetLite":
        argv += ["--image_size", "64"]
    cli.main(argv)
    return Run.open(root, runname)


@pytest.mark.parametrize("family", sorted(FAMILY_ARGS))
def test_every_family_trains_and_records_a_run(family, ckpt_dir, tmp_path):
    run = run_cli(family, checkpoint_for(family, ckpt_dir), tmp_path, "r", "--layers", "0", "-1")
    meta = json.loads((run.path / "run.json").read_text())  # the file format of docs/design.md#runs-on-disk
    n_layers = meta["n_layers_model"]
    assert meta["complete"] is True and meta["schema"] == RunMeta.SCHEMA == 2
    assert meta["model"] == family and meta["layers"] == [0, n_layers - 1]
    assert meta["token"] == wrappedmodels.ENCODERS[family].default_token
    assert meta["dataset"]["name"] == "shapes" and meta["dataset"]["n_samples"] == 12
    assert {"top_k", "expansion_factor", "lr", "batch_size", "seed"} <= set(meta["sae"])
    assert sorted(os.listdir(run.path)) == sorted(
        ["run.json"] + [f"layer{layer:02d}.{s}" for layer in meta["layers"] for s in ("sae.safetensors", "acts.npy")])
    for layer in meta["layers"]:
        info = meta["layer_info"][str(layer)]
        acts = np.load(run.path / f"layer{layer:02d}.acts.npy")
        assert acts.shape == (12, info["d_model"]) and acts.dtype == np.float32 and np.isfinite(acts).all()
        state = load_file(str(run.path / f"layer{layer:02d}.sae.safetensors"))
        assert state["W_enc"].shape == (info["d_model"], info["n_features"]) == (info["d_model"], 2 * info["d_model"])
        assert state["W_dec"].shape == (info["n_features"], info["d_model"])
        assert info["tokens_seen"] >= 12 and 0 <= info["dead_fraction"] <= 1 and info["fvu"] > 0
        assert info["l0"] == pytest.approx(4, abs=1e-6) or info["l0"] <= 4
    # the last layer's SAE really encodes the stored activations
    codes = run.dense_codes(-1, "topk")
    assert ((codes > 0).sum(1) <= 4).all()


def test_recorded_token_equals_models_hidden_state(tmp_path, ckpt_dir):
    """The stored row n is the CLS token of sample n at that layer, from the model's own hidden states."""
    import data

    ckpt = checkpoint_for("ViT", ckpt_dir)
    run = run_cli("ViT", ckpt, tmp_path, "vit", "--layers", "1")
    enc = wrappedmodels.ENCODERS["ViT"](ckpt)
    ds = data.load_dataset("shapes", max_samples=12)
    inputs = enc.collate([enc.transform(ds.image(i)) for i in range(12)])
    hidden = enc.model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states[2]
    np.testing.assert_allclose(run.acts(1), hidden[:, 0].numpy(), rtol=1e-4, atol=1e-5)


def test_token_first_reproduces_index_0_and_constant_token_is_refused(tmp_path, ckpt_dir, error_line):
    ckpt = checkpoint_for("ClipText", ckpt_dir)
    eot = run_cli("ClipText", ckpt, tmp_path, "eot", "--layers", "1")
    assert np.ptp(eot.acts(1), axis=0).max() > 1e-3  # differs across captions
    # open_clip's text tower is causal: position 0 (start-of-text) is the same for every caption
    assert "identical for every sample" in error_line(lambda _: run_cli("ClipText", ckpt, tmp_path, "first", "--layers",
                                                                        "1", "--token", "first"), None)
    assert not (tmp_path / "first").exists()
    vit = run_cli("ViT", checkpoint_for("ViT", ckpt_dir), tmp_path, "vfirst", "--layers", "1", "--token", "first")
    vcls = run_cli("ViT", checkpoint_for("ViT", ckpt_dir), tmp_path, "vcls", "--layers", "1")
    np.testing.assert_array_equal(vit.acts(1), vcls.acts(1))
    assert vit.meta.token == "first" and vcls.meta.token == "cls"


def test_padding_is_excluded_unless_asked(tmp_path, ckpt_dir):
    ckpt = checkpoint_for("Bert", ckpt_dir)
    a = run_cli("Bert", ckpt, tmp_path, "nopad", "--layers", "1")
    b = run_cli("Bert", ckpt, tmp_path, "pad", "--layers", "1", "--train_on_padding")
    import data

    tok = wrappedmodels.ENCODERS["Bert"](ckpt).tokenizer
    ds = data.load_dataset("shapes", max_samples=12)
    real = sum(len(tok(ds.caption(i))["input_ids"]) for i in range(12))
    assert a.meta.layer_info[1].tokens_seen == real
    assert b.meta.layer_info[1].tokens_seen > real


def test_one_encoder_pass_per_sample(tmp_path, monkeypatch):
    calls = []
    forward = wrappedmodels.EfficientNetLite.forward
    monkeypatch.setattr(wrappedmodels.EfficientNetLite, "forward",
                        lambda self, inputs: calls.append(len(inputs["x"])) or forward(self, inputs))
    run = run_cli("EfficientNetLite", "efficientnet-lite0", tmp_path, "eff", "--layers", "0", "5", "-1", n=23)
    assert sum(calls) == 23 and len(calls) == 5
    assert run.layers == [0, 5, 15]


def test_image_and_text_runs_share_a_fingerprint_other_datasets_do_not(tmp_path, ckpt_dir):
    img = run_cli("ViT", checkpoint_for("ViT", ckpt_dir), tmp_path, "img", "--layers", "1")
    txt = run_cli("Bert", checkpoint_for("Bert", ckpt_dir), tmp_path, "txt", "--layers", "1")
    other = run_cli("Bert", checkpoint_for("Bert", ckpt_dir), tmp_path, "txt2", "--layers", "1", n=11)
    assert img.fingerprint == txt.fingerprint
    assert other.fingerprint != txt.fingerprint


def test_float16_acts(tmp_path, ckpt_dir):
    a = run_cli("ViT", checkpoint_for("ViT", ckpt_dir), tmp_path, "h", "--layers", "1", "--acts_dtype", "float16")
    assert a.acts(1).dtype == np.float16


def test_bad_input_is_one_clear_line(tmp_path, ckpt_dir, error_line):
    base = ["--runname", "x", "--root", str(tmp_path), "--max_samples", "4"]
    assert "unknown --model 'Bart'" in error_line(train_text.main, ["--model", "Bart", *base])
    assert "choose from ClipText, Bert, Deberta, SiglipText" in error_line(train_text.main, ["--model", "ViT", *base])
    bert = ["--model", "Bert", "--bert_model_name", checkpoint_for("Bert", ckpt_dir)]
    assert "layer 7 out of range" in error_line(train_text.main, [*bert, *base, "--layers", "7"])
    msg = error_line(train_text.main, ["--model", "Bert", "--bert_model_name", "bert-base-uncased", *base])
    assert "bert-base-uncased" in msg and "offline" in msg
    msg = error_line(train_text.main, [*bert, *base, "--dataset", "coco"])
    assert "coco" in msg and "shapes" in msg
    assert "--max_samples must be positive" in error_line(train_text.main, [*bert, *base[:-1], "0"])
    assert "invalid int value: 'x'" in error_line(train_text.main, [*bert, *base, "--layers", "x"])  # argparse too
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


def test_existing_run_is_not_overwritten_without_flag(tmp_path, ckpt_dir, error_line):
    ckpt = checkpoint_for("Bert", ckpt_dir)
    run = run_cli("Bert", ckpt, tmp_path, "keep", "--layers", "1")
    before = {p.name: p.read_bytes() for p in run.path.iterdir()}
    argv = ["--model", "Bert", "--bert_model_name", ckpt, "--runname", "keep", "--root", str(tmp_path),
            "--max_samples", "5", "--layers", "0"]
    assert "already exists" in error_line(train_text.main, argv) and "--overwrite" in error_line(train_text.main, argv)
    assert {p.name: p.read_bytes() for p in run.path.iterdir()} == before
    train_text.main(argv + ["--overwrite"])
    again = Run.open(tmp_path, "keep")
    assert again.layers == [0] and again.n_samples == 5 and again.meta.run_id != run.meta.run_id


def test_interrupted_run_leaves_nothing_that_claims_complete(tmp_path, ckpt_dir, monkeypatch):
    ckpt = checkpoint_for("Bert", ckpt_dir)
    calls = []
    record = wrappedmodels.Encoder.record

    def flaky(self, inputs, layers):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return record(self, inputs, layers)

    monkeypatch.setattr(wrappedmodels.Encoder, "record", flaky)
    with pytest.raises(SystemExit) as e:
        run_cli("Bert", ckpt, tmp_path, "cut", "--layers", "1")
    assert e.value.code == 130
    assert os.listdir(tmp_path) == []


def test_killed_process_leaves_no_complete_run(tmp_path):
    """SIGKILL mid-training: only a hidden temporary folder remains, and the next run cleans it up."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, str(ROOT_DIR / "train_image.py"), "--model", "EfficientNetLite", "--runname", "k",
            "--root", str(tmp_path), "--max_samples", "400", "--batch_size", "4", "--image_size", "64"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT_DIR)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".k.tmp-*/layer00.acts.npy")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k").exists()
    assert not any(json.loads(p.read_text()).get("complete") for p in tmp_path.rglob("run.json"))
    train_image.main(["--model", "EfficientNetLite", "--runname", "k", "--root", str(tmp_path), "--max_samples", "4",
                      "--image_size", "64", "--layers", "0"])
    assert os.listdir(tmp_path) == ["k"] and Run.open(tmp_path, "k").meta.complete is True


def test_sae_file_loads_back_into_the_same_model(tmp_path, ckpt_dir):
    run = run_cli("Deberta", checkpoint_for("Deberta", ckpt_dir), tmp_path, "d", "--layers", "0")
    sae = TopKSAE.from_state(load_file(str(run.path / "layer00.sae.safetensors")), 4)
    x = torch.from_numpy(np.array(run.acts(0)))
    torch.testing.assert_close(sae.pre_acts(x), run.dense_codes(0, "relu"))


def test_real_offline_models_on_shapes(tmp_path):
    """The two real pretrained models that ship in PyPI packages, all layers, on shapes."""
    train_text.main(["--model", "Bert", "--bert_model_name", wrappedmodels.minilm_path(), "--runname", "minilm",
                           "--root", str(tmp_path), "--max_samples", "64"])
    train_image.main(["--model", "EfficientNetLite", "--runname", "eff", "--root", str(tmp_path),
                            "--max_samples", "64", "--image_size", "128"])
    t, i = Run.open(tmp_path, "minilm"), Run.open(tmp_path, "eff")
    assert t.layers == list(range(6)) and i.layers == list(range(16))
    assert t.meta.layer_info[5].d_model == 384 and i.meta.layer_info[15].d_model == 320
    assert t.fingerprint == i.fingerprint
