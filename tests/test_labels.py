"""labels.py: a feature that carries a planted attribute is named by it, with its AUROC against a brute-force
count; the same run with its samples permuted falls to "unlabelled"."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import data
import labels
from synthetic import make_run

N, D = 400, 6


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Feature 0 reads direction 0, which is 1 + noise on stars and noise elsewhere; feature 1 the same for
    circles; the others read noise."""
    root = tmp_path_factory.mktemp("labels")
    ds = data.load_dataset("shapes", max_samples=N)
    names, attrs_NA = data.attribute_matrix(ds)
    star = attrs_NA[:, names.index("star")]
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(N, D)).astype(np.float32) * 0.3
    acts[:, 0] += star
    acts[:, 1] += attrs_NA[:, names.index("circle")]
    state = {"W_enc": torch.eye(D, 2 * D), "W_dec": torch.eye(2 * D, D), "b_dec": torch.zeros(D)}
    run = make_run(root, "p", {0: acts}, {0: state}, top_k=D, dataset=ds.describe())
    shuffled = make_run(root, "q", {0: acts[rng.permutation(N)]}, {0: state}, top_k=D, dataset=ds.describe())
    return run, shuffled, star, acts


def test_planted_attribute_is_the_label(planted, tmp_path, capsys):
    run, _, star, acts = planted
    out = tmp_path / "l.json"
    labels.main(["--root", str(run.path.parent), "--run", "p", "--json", str(out), "--device", "cpu"])
    feats = json.loads(out.read_text())["features"]
    lab = feats["0"]
    assert lab["label"] in ("label:star", "star")  # shapes' captions say exactly what is drawn
    expected = roc_auc_score(star, np.maximum(acts[:, 0], 0))
    assert lab["terms"]["label:star"] == pytest.approx(expected, abs=1e-9) and lab["score"] >= expected
    assert lab["score"] > 0.95 and lab["score"] > lab["floor"] + 0.2
    assert "p layer 0:" in capsys.readouterr().out


def test_permuted_run_is_unlabelled(planted):
    _, shuffled, _, _ = planted
    res = labels.labels(shuffled, labels.LabelsArgs(run="q", root=str(shuffled.path.parent), device="cpu"))
    named = [f for f, lab in res.features.items() if lab.label != labels.UNLABELLED]
    assert len(named) <= 0.2 * len(res.features), {f: res.features[f] for f in named}
    assert all(lab.score < 0.75 for lab in res.features.values())


def test_scores_equal_sklearn_per_term(planted):
    run, _, _, acts = planted
    ds = data.from_description(run.meta.dataset)
    terms, holds = labels.candidates(ds, 20, None)
    codes = np.maximum(acts @ np.eye(D, 2 * D), 0)
    got = labels.label_features(codes, terms, holds, top_terms=3)
    for f, lab in got.items():
        for term, score in lab.terms.items():
            assert score == pytest.approx(roc_auc_score(holds[:, terms.index(term)], codes[:, f]), abs=1e-9)


def test_matched_features_agree_above_shuffled_matches(planted, tmp_path, capsys):
    import wmppc

    run, _, _, acts = planted
    noisy = acts + np.random.default_rng(1).normal(size=acts.shape).astype(np.float32) * 0.05
    state = {"W_enc": torch.eye(D, 2 * D), "W_dec": torch.eye(2 * D, D), "b_dec": torch.zeros(D)}
    make_run(run.path.parent, "p2", {0: noisy}, {0: state}, top_k=D, dataset=run.meta.dataset)
    out = tmp_path / "w.json"
    capsys.readouterr()
    wmppc.main(["--root", str(run.path.parent), "--source", "p", "--target", "p2", "--labels", "--json", str(out),
                "--device", "cpu"])
    line = capsys.readouterr().out.splitlines()[1]
    agree = json.loads(out.read_text())["label_agreement"]
    assert line.startswith("labels (last layers): ")
    assert agree["n_pairs"] >= 2 and agree["share"] == 1.0 and agree["floor"] < 0.75  # each matches its own copy


def test_agreement_against_a_hand_count():
    lab = lambda name: labels.FeatureLabel(name, 0.9, 0.6, {name: 0.9})  # noqa: E731
    a = {0: lab("label:red"), 1: lab("blue"), 2: lab(labels.UNLABELLED), 3: lab("red")}
    b = {0: lab("red star"), 1: lab("red"), 2: lab("blue"), 5: lab(labels.UNLABELLED)}
    got = labels.agreement(a, b, np.array([0, 1, 0, 5]))  # pairs: red / red star, blue / red; 2, 3 left out
    assert got.n_pairs == 2 and got.share == 0.5
    assert got.floor == pytest.approx(0.5)  # either order of (red, blue) against (red star, red) agrees once


def test_gallery_cards_carry_the_labels(planted, tmp_path):
    import show

    run, _, _, _ = planted
    argv = ["--root", str(run.path.parent), "--run", "p", "--out", str(tmp_path / "g"), "--device", "cpu"]
    show.main([*argv, "--labels", "--features", "0", "1"])
    page = (tmp_path / "g" / "index.html").read_text()
    assert "<b>label</b> label:star (0.99" in page or "<b>label</b> star (0.99" in page



def test_comp_sharedness_labels_of_the_top_features(planted, tmp_path, capsys):
    import comp_sharedness

    run, _, _, acts = planted
    root = str(run.path.parent)
    if not (run.path.parent / "p2").exists():
        state = {"W_enc": torch.eye(D, 2 * D), "W_dec": torch.eye(2 * D, D), "b_dec": torch.zeros(D)}
        make_run(run.path.parent, "p2", {0: acts + 0.05 * np.random.default_rng(1).normal(size=acts.shape)
                                         .astype(np.float32)}, {0: state}, top_k=D, dataset=run.meta.dataset)
    out = tmp_path / "c.json"
    capsys.readouterr()
    comp_sharedness.main(["--root", root, "--source", "p", "--min_group", "p2", "--max_group", "q", "--top", "4",
                          "--labels", "--json", str(out), "--device", "cpu"])
    text = capsys.readouterr().out
    assert "labels of the top 4 features, p2: 1.000 of" in text and "labels of the top 4 features, q:" in text
    agree = json.loads(out.read_text())["label_agreement"]
    assert agree["p2"]["share"] == 1.0 and agree["p2"]["n_pairs"] >= 2


def _minilm_mean_pooled(texts: list[str]) -> np.ndarray:
    """The sentence-transformers recipe, written out: the mean of the last layer over the attention mask."""
    from transformers import AutoModel, AutoTokenizer

    from wrappedmodels import minilm_path

    tok, model = AutoTokenizer.from_pretrained(minilm_path()), AutoModel.from_pretrained(minilm_path())
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.double()
    m = enc["attention_mask"][..., None].double()
    emb = ((hidden * m).sum(1) / m.sum(1)).numpy()
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_minilm_scorer_names_the_planted_feature(planted):
    run, _, _, acts = planted
    res = labels.labels(run, labels.LabelsArgs(run="p", root=str(run.path.parent), device="cpu", top_terms=3))
    assert "star" in next(iter(res.features[0].embedding)) and "circle" in next(iter(res.features[1].embedding))
    # brute force for feature 0: its 9 top captions' mean against all captions' (400 < the 2048 baseline cap)
    ds = data.from_description(run.meta.dataset)
    codes = np.maximum(acts[:, 0], 0)
    top = np.argsort(-codes, kind="stable")[:9]
    terms = list(res.features[0].embedding)
    emb = _minilm_mean_pooled([ds.caption(n) for n in range(N)] + [labels.term_text(t) for t in terms])
    lift = emb[N:] @ (emb[top].mean(0) - emb[:N].mean(0))
    np.testing.assert_allclose(list(res.features[0].embedding.values()), lift, atol=1e-5)


def test_zero_shot_correlation_names_a_planted_similarity():
    rng = np.random.default_rng(3)
    star = rng.random(300) < 0.3
    codes = np.maximum(np.stack([star + 0.3 * rng.normal(size=300), rng.normal(size=300)], 1), 0)
    sims = rng.normal(size=(300, 3)) * 0.1
    sims[:, 1] += star
    got = labels.named_by(labels.column_correlation, codes, ["red", "star", "blue"], sims, top_terms=3)
    assert got[0].label == "star" and got[0].score > 0.8 and got[0].floor < 0.3
    assert got[1].label == labels.UNLABELLED or got[1].score < 0.3
    r = np.corrcoef(codes[:, 0], sims[:, 1])[0, 1]
    assert got[0].terms["star"] == pytest.approx(r, abs=1e-12)


def test_zero_shot_names_with_a_tiny_open_clip(planted, tmp_path):
    """The whole path, against open_clip called directly: image embeddings of the run's samples, text embeddings
    of the terms, their cosine correlated with the feature over samples."""
    import open_clip

    from tiny_models import open_clip_dir

    run, _, _, acts = planted
    ckpt = open_clip_dir(tmp_path / "oc")
    res = labels.labels(run, labels.LabelsArgs(run="p", root=str(run.path.parent), device="cpu", embed_top=0,
                                               clip_model_name=str(ckpt)))
    zs = res.features[0].zero_shot
    assert zs is not None and len(zs.terms) == 5 and zs.floor > 0
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{ckpt}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{ckpt}")
    ds = data.from_description(run.meta.dataset)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(ds.image(n)) for n in range(N)])).double()
        txt = model.encode_text(tokenizer([labels.term_text(t) for t in zs.terms])).double()
    sims = ((img / img.norm(dim=1, keepdim=True)) @ (txt / txt.norm(dim=1, keepdim=True)).T).numpy()
    codes = np.maximum(acts[:, 0], 0)
    expected = [np.corrcoef(codes, sims[:, t])[0, 1] for t in range(len(zs.terms))]
    np.testing.assert_allclose(list(zs.terms.values()), expected, atol=1e-4)
