"""train_mllm.py on a tiny random LLaVA: image and caption positions split exactly, hooks on the language layers,
two paired runs that every analysis reads, the modality shares against a brute-force count, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data
import train_mllm
import wmppc
from saeshare.disk.runs import Run, modality_file
from tiny_models import checkpoint_for, hf_dir
from wrappedmodels import Llava

ARGS = ["--dataset", "shapes", "--max_samples", "24", "--batch_size", "8", "--expansion_factor", "4", "--top_k", "4",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return checkpoint_for("Llava", tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def runs(llava, tmp_path_factory):
    root = tmp_path_factory.mktemp("mllm_runs")
    train_mllm.main(["--model", "Llava", "--llava_model_name", llava, "--runname", "ll", "--root", str(root),
                     "--min_fires", "2", *ARGS])
    return root, Run.open(root, "ll_image"), Run.open(root, "ll_text")


def batch(enc, n=4):
    ds = data.load_dataset("shapes", max_samples=n)
    return ds, enc.collate([enc.transform((ds.image(i), ds.caption(i))) for i in range(n)])


def test_image_and_caption_positions_split_exactly(llava):
    enc = Llava(llava)
    ds, inputs = batch(enc)
    ids_BT = inputs["input_ids"]
    assert torch.equal(inputs["image_mask"], ids_BT == enc.model.config.image_token_index)
    assert (inputs["image_mask"].sum(1) == 16).all()  # 4x4 patches, CLS dropped
    tok = enc.processor.tokenizer
    for b in range(len(ids_BT)):
        words = tok.convert_ids_to_tokens(ids_BT[b][inputs["caption_mask"][b]].tolist())
        assert words == ds.caption(b).split()
        rest = tok.convert_ids_to_tokens(ids_BT[b][~inputs["token_mask"][b]].tolist())
        assert set(rest) <= {"USER:", "ASSISTANT:", "<pad>"} and "USER:" in rest  # template and padding only
    assert not (inputs["token_mask"] & ~inputs["attention_mask"].bool()).any()
    assert (inputs["attention_mask"] == 0).any()  # captions differ in length: there is padding to exclude


def test_hooks_record_the_language_layers(llava):
    enc = Llava(llava)
    _, inputs = batch(enc)
    rec = enc.record(inputs, [0, 1, 2])
    x = {k: v for k, v in inputs.items() if k not in ("image_mask", "caption_mask", "token_mask")}
    hidden = enc.model(**x, output_hidden_states=True).hidden_states
    assert enc.n_layers == 3 and len(hidden) == 4
    for layer in range(2):
        torch.testing.assert_close(rec[layer], hidden[layer + 1], rtol=1e-5, atol=1e-5)
    # the last hidden state is given after the final norm; the block's own output is before it
    final_norm = enc.model.model.language_model.norm
    torch.testing.assert_close(final_norm(rec[2]), hidden[3], rtol=1e-5, atol=1e-5)


def test_two_paired_runs_that_wmppc_reads(runs, llava, capsys):
    root, img, txt = runs
    assert (img.meta.modality, txt.meta.modality) == ("image", "text") and img.fingerprint == txt.fingerprint
    for layer in img.layers:
        a, b = (load_file(str(r.sae_path(layer))) for r in (img, txt))
        assert all(torch.equal(a[k], b[k]) for k in a)  # the same SAEs
    enc = Llava(llava)
    _, inputs = batch(enc)
    acts = enc.record(inputs, [1])[1]
    for run, key in ((img, "image_mask"), (txt, "caption_mask")):
        m = inputs[key][..., None].float()
        want = ((acts * m).sum(1) / m.sum(1)).numpy()
        np.testing.assert_allclose(run.acts(1)[:4], want, rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    wmppc.main(["--source", "ll_image", "--target", "ll_text", "--root", str(root), "--device", "cpu", "--json",
                str(root / "w.json")])
    res = json.loads((root / "w.json").read_text())
    assert np.asarray(res["layer_matrix"]).shape == (3, 3) and 0 < res["last_layer"] <= 1
    assert "All Layers" in capsys.readouterr().out


def test_modality_shares_against_a_brute_force_count(runs, llava):
    root, img, _ = runs
    enc = Llava(llava)
    ds = data.load_dataset("shapes", max_samples=24)
    inputs = enc.collate([enc.transform((ds.image(i), ds.caption(i))) for i in range(24)])
    rec = enc.record(inputs, img.layers)
    for layer in img.layers:
        sae = img.sae(layer)
        counts = np.zeros((2, sae.n_features))
        mass = np.zeros((2, sae.n_features))
        for i, key in enumerate(("image_mask", "caption_mask")):
            codes_NF = sae.encode(rec[layer][inputs[key]]).dense(sae.n_features).double().numpy()
            counts[i], mass[i] = (codes_NF > 0).sum(0), codes_NF.sum(0)
        on_image, on_text = counts[0] >= 2, counts[1] >= 2
        alive = on_image | on_text
        got = img.meta.modality_shares[layer]
        assert got.n_features == alive.sum() and got.n_samples == 24
        assert got.image_only == pytest.approx((on_image & ~on_text).sum() / alive.sum())
        assert got.both == pytest.approx((on_image & on_text).sum() / alive.sum())
        assert got.image_only + got.text_only + got.both == pytest.approx(1)
        score = np.load(img.path / modality_file(layer))
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(score, mass[0] / mass.sum(0), rtol=1e-4)
    meta = json.loads((img.path / "run.json").read_text())
    assert set(meta["modality_shares"]) == {"0", "1", "2"}


def test_plot_and_bad_input(llava, tmp_path, error_line, capsys):
    base = ["--model", "Llava", "--llava_model_name", llava, "--root", str(tmp_path), *ARGS]
    train_mllm.main([*base, "--runname", "p", "--layers", "-1", "--plot", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").stat().st_size > 0 and "image only" in capsys.readouterr().out
    assert "layer 3 out of range" in error_line(train_mllm.main, [*base, "--runname", "q", "--layers", "3"])
    assert "already exists" in error_line(train_mllm.main, [*base, "--runname", "p"])
    bert = hf_dir("Bert", tmp_path / "bert")
    msg = error_line(train_mllm.main, [*base, "--runname", "r", "--llava_model_name", str(bert)])
    assert "is not an image-text model" in msg
    assert "choose mean or last" in error_line(train_mllm.main, [*base, "--runname", "r", "--image_token", "cls"])
    assert not list(tmp_path.glob("r_*")) and not list(tmp_path.glob(".r_*"))
