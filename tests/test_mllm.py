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
    assert "choose from mean, last" in error_line(train_mllm.main, [*base, "--runname", "r", "--image_token", "cls"])
    msg = error_line(train_mllm.main, [*base, "--runname", "r", "--token", "mean"])
    assert "unrecognized arguments: --token" in msg
    assert not list(tmp_path.glob("r_*")) and not list(tmp_path.glob(".r_*"))


def test_seeds_random_init_and_bfloat16(llava, runs, tmp_path):
    """--seeds: one SAE per seed, the same in both runs; --random_init: a floor of the same shape;
    --encoder_dtype bfloat16: the rows of the float32 pass within 1e-2 of their scale."""
    root, img, _ = runs
    base = ["--model", "Llava", "--llava_model_name", llava, "--root", str(tmp_path), "--min_fires", "2", *ARGS]
    train_mllm.main([*base, "--runname", "s", "--seeds", "0", "3", "--random_init"])
    a, b = Run.open(tmp_path, "s_image"), Run.open(tmp_path, "s_text")
    assert a.meta.random_init and a.meta.sae.seeds == [0, 3] and set(a.meta.layer_info[0].per_seed) == {0, 3}
    for layer in a.layers:
        w0, w3 = (a.with_seed(s).sae(layer).state()["W_dec"] for s in (0, 3))
        assert not torch.equal(torch.as_tensor(w0), torch.as_tensor(w3))
        for s in (0, 3):
            assert all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in
                       zip(a.with_seed(s).sae(layer).state().values(), b.with_seed(s).sae(layer).state().values()))
    assert np.abs(np.asarray(a.acts(1)) - np.asarray(img.acts(1))).max() > 0.1  # random weights, other rows
    train_mllm.main([*base, "--runname", "h", "--encoder_dtype", "bfloat16"])
    for m in ("image", "text"):
        half, full = np.asarray(Run.open(tmp_path, f"h_{m}").acts(2)), np.asarray(Run.open(root, f"ll_{m}").acts(2))
        assert Run.open(tmp_path, f"h_{m}").meta.encoder_dtype == "bfloat16"
        assert 0 < np.abs(half - full).max() <= 1e-2 * np.abs(full).max()


def test_two_ranks_write_the_pair_one_process_writes(llava, runs, tmp_path):
    """torchrun: each batch's prompts split across two ranks, each layer's SAE on one: the same two runs."""
    from test_distributed import _launch

    root, img, txt = runs
    two = _launch("train_mllm.py", ["--model", "Llava", "--llava_model_name", llava, "--runname", "ll",
                                    "--root", str(tmp_path), "--min_fires", "2", *ARGS], 2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote") == 2 and "image only" in two.stdout  # rank 0 alone reports
    for one in (img, txt):
        got = Run.open(tmp_path, one.name)
        assert got.fingerprint == one.fingerprint and got.meta.modality_shares.keys() == one.meta.modality_shares.keys()
        for layer in one.layers:
            np.testing.assert_allclose(got.acts(layer), one.acts(layer), rtol=1e-4, atol=1e-5)
            for k, w in one.sae(layer).state().items():
                np.testing.assert_allclose(got.sae(layer).state()[k], w, rtol=1e-3, atol=1e-4)
            assert got.meta.layer_info[layer].tokens_seen == one.meta.layer_info[layer].tokens_seen
            assert got.meta.modality_shares[layer].n_features == pytest.approx(
                one.meta.modality_shares[layer].n_features, rel=0.05)


def test_other_commands_on_the_pair(runs, error_line, tmp_path):
    """show.py's gallery reads the pair as any run; what would run the model on one side alone says why not."""
    import record
    import show

    root, img, _ = runs
    msg = error_line(record.main, ["--run", "ll_image", "--runname", "x", "--root", str(root), "--dataset", "shapes",
                                   "--max_samples", "8"])
    assert "one half of an MLLM pair" in msg and not (root / "x").exists()
    for run in ("ll_image", "ll_text"):
        show.main(["--run", run, "--root", str(root), "--out", str(tmp_path / run), "--device", "cpu",
                   "--min_active", "1"])
        assert (tmp_path / run / "index.html").exists() and list((tmp_path / run).glob("feat*.jpg"))
        msg = error_line(show.main, ["--run", run, "--root", str(root), "--out", str(tmp_path / "h"), "--heatmaps",
                                     "--device", "cpu"])
        assert "one half of an MLLM pair" in msg and not (tmp_path / "h").exists()


def test_llava_next_reads_the_same_way(tmp_path):
    """A LLaVA-NeXT checkpoint (any-resolution tiles: 5 views of 16 tokens and row-end tokens, 88 image positions
    here) goes through the same family: positions split exactly, and train_mllm.py writes its pair."""
    from tiny_models import llava_next_dir

    ckpt = str(llava_next_dir(tmp_path / "next"))
    enc = Llava(ckpt)
    assert type(enc.model).__name__ == "LlavaNextForConditionalGeneration"
    ds, inputs = batch(enc)
    assert torch.equal(inputs["image_mask"], inputs["input_ids"] == enc.model.config.image_token_index)
    assert (inputs["image_mask"].sum(1) == 88).all()
    tok = enc.processor.tokenizer
    for b in range(len(inputs["input_ids"])):
        words = tok.convert_ids_to_tokens(inputs["input_ids"][b][inputs["caption_mask"][b]].tolist())
        assert words == ds.caption(b).split()
    train_mllm.main(["--model", "Llava", "--llava_model_name", ckpt, "--runname", "nx", "--root", str(tmp_path),
                     "--min_fires", "2", *ARGS])
    img = Run.open(tmp_path, "nx_image")
    acts = enc.record(inputs, [1])[1]
    m = inputs["image_mask"][..., None].float()
    np.testing.assert_allclose(img.acts(1)[:4], ((acts * m).sum(1) / m.sum(1)).numpy(), rtol=1e-4, atol=1e-5)
