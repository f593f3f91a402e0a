"""ontology.py (docs/design.md#probes): hierarchy parsing, LCA depth on a hand-worked case, a planted node found by the
SAE and not by the null, bad hierarchies refused in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import data
import ontology
from synthetic import labelled_folder, make_run, random_sae_state

N, D = 600, 12


def test_hierarchy_flattens_and_checks_labels():
    tree = ontology.hierarchy({"a": {"b": ["x", "y"], "c": ["z"]}, "d": ["w"]}, ["w", "x", "y", "z"])
    assert tree.nodes == ["a", "b", "x", "y", "c", "z", "d", "w"]
    assert tree.depth.tolist() == [1, 2, 3, 3, 2, 3, 1, 2]
    assert tree.leaves[0] == ["x", "y", "z"] and tree.leaves[4] == ["z"] and tree.leaves[7] == ["w"]
    with pytest.raises(ontology.UserError, match="does not have: 'v'"):
        ontology.hierarchy({"a": ["x", "v"]}, ["x"])
    with pytest.raises(ontology.UserError, match="'x' appears twice"):
        ontology.hierarchy({"a": ["x"], "b": ["x"]}, ["x"])
    with pytest.raises(ontology.UserError, match="must hold an object or a list"):
        ontology.hierarchy({"a": 3}, ["x"])


def test_lca_depth_hand_worked():
    # nodes: a (depth 1) > x, y (depth 2); samples 0-1 hold x, 2-3 hold y
    holds = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 1], [1, 0, 1]], dtype=bool)
    depth = np.array([1, 2, 2])
    x = np.array([[5, 1, 0, 9], [4, 2, 0, 9], [0, 3, 0, 0], [0, 4, 1, 0]], dtype=float)
    # feature 0: top 2 = samples 0,1 (both x) -> 2; feature 1: top 2 = samples 2,3 (both y) -> 2;
    # feature 2: fires on one sample only -> -1; feature 3: top 2 = samples 0,1 -> 2 (ties broken either way
    # among the zeros never reach the top)
    assert ontology.lca_depth(x, holds, depth, 2, codes=True).tolist() == [2, 2, -1, 2]
    x[1, 0], x[2, 0] = 0, 3  # feature 0's top samples now hold x and y: only "a" is common
    assert ontology.lca_depth(x, holds, depth, 2, codes=True)[0] == 1
    assert ontology.lca_depth(x, holds, depth, 2, codes=False)[2] >= 1  # raw neurons are never skipped


@pytest.fixture
def root(tmp_path):
    """A shapes run whose layer 0 carries "red" on direction 0 and "warm" on direction 1, read by SAE
    features 0 and 1; layer 1 is noise."""
    ds = data.load_dataset("shapes", max_samples=N)
    names, attrs = data.attribute_matrix(ds)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype(np.float32)
    warm = attrs[:, [names.index(c) for c in ("red", "orange", "yellow")]].any(1)
    x[:, 0] += 4.0 * attrs[:, names.index("red")]
    x[:, 1] += 4.0 * warm
    planted = random_sae_state(D, 4 * D, seed=1)
    planted["W_enc"][:, :2] = torch.eye(D)[:, :2]
    planted["b_dec"].zero_()
    make_run(tmp_path, "R", {0: x, 1: rng.normal(size=(N, D)).astype(np.float32)},
             {0: planted, 1: random_sae_state(D, 4 * D, seed=2)}, dataset=ds.describe())
    return tmp_path


def test_planted_nodes_are_detected_by_the_sae_and_not_by_the_null(root, tmp_path, capsys):
    out = tmp_path / "o.json"
    ontology.main(["--root", str(root), "--run", "R", "--json", str(out), "--plot", str(tmp_path / "o.png")])
    res = ontology.OntologyResults.load(out)
    red, warm, circle = (res.nodes.index(n) for n in ("red", "warm", "circle"))
    assert res.best_auroc["sae"][0, red] > 0.95 and res.best_auroc["sae"][0, warm] > 0.95
    assert res.best_auroc["raw"][0, red] > 0.95 and res.best_auroc["sae"][0, circle] < 0.75
    assert np.nanmax(res.best_auroc["null"]) < 0.75 and res.coverage["null"].max() == 0
    assert np.isnan(res.best_auroc["sae"][0, res.nodes.index("colour")])  # every sample has a colour
    n_scorable = (~np.isnan(res.best_auroc["sae"][0])).sum()
    assert n_scorable == 22 and res.coverage["sae"][0] == pytest.approx(2 / 22)
    assert res.coverage["sae"][1] == 0
    assert res.lca_depth["sae"][0, 3] > 0  # feature 0's top samples are all red: depth 3 (colour > warm > red)
    assert res.mean_lca_depth["sae"][0] > res.mean_lca_depth["null"][0]
    text = capsys.readouterr().out
    assert "share of the" in text and "LCA" in text and (tmp_path / "o.png").stat().st_size > 5000


def test_more_top_samples_than_samples(root, error_line):
    assert "has 600 samples" in error_line(ontology.main, ["--root", str(root), "--run", "R", "--top_samples", "601"])


@pytest.mark.parametrize("tree,needle", [
    ({"warm": ["red", "magenta"]}, "does not have: 'magenta'"),
    ([1, 2], "expected a JSON object"),
    (None, "cannot read the hierarchy"),
])
def test_bad_hierarchy(root, tmp_path, error_line, tree, needle):
    path = tmp_path / "h.json"
    path.write_text("{not json" if tree is None else json.dumps(tree))
    assert needle in error_line(ontology.main, ["--root", str(root), "--run", "R", "--hierarchy", str(path)])


def test_null_run_must_cover_the_same_samples(root, error_line):
    make_run(root, "other", {0: np.zeros((N, D), np.float32), 1: np.zeros((N, D), np.float32)},
             {0: random_sae_state(D, 4 * D), 1: random_sae_state(D, 4 * D)})
    line = error_line(ontology.main, ["--root", str(root), "--run", "R", "--null", "other"])
    assert "cover different datasets" in line


def test_hierarchy_over_a_label_column(tmp_path):
    ds = labelled_folder(tmp_path / "imgs")
    names, labels = data.label_matrix(ds, "label")
    x = np.random.default_rng(0).normal(size=(len(ds), D)).astype(np.float32)
    x[:, 0] += 4.0 * (labels[:, names.index("cat")] | labels[:, names.index("dog")])
    make_run(tmp_path, "F", {0: x}, {0: random_sae_state(D, 4 * D, seed=1)}, dataset=ds.describe())
    (tmp_path / "h.json").write_text(json.dumps({"animal": ["cat", "dog"], "vehicle": ["car"]}))
    run = ontology.Run.open(tmp_path, "F")
    tree, holds = ontology.load_hierarchy(str(tmp_path / "h.json"), run, "label")
    assert tree.nodes == ["animal", "cat", "dog", "vehicle", "car"]
    assert (holds[:, 0] == (labels[:, 1] | labels[:, 2])).all() and (holds[:, 3] == labels[:, 0]).all()
    res = ontology.ontology(run, run.permuted(), tree, holds,
                            ontology.OntologyArgs(root=str(tmp_path), run="F", device="cpu", label_column="label"))
    assert res.best_auroc["raw"][0, 0] > 0.95 and res.best_auroc["raw"][0, 3] > 0.95  # -x_0 detects "vehicle"
    with pytest.raises(ontology.UserError, match="--hierarchy FILE.json is needed"):
        ontology.load_hierarchy(None, run, "label")
