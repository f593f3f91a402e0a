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
