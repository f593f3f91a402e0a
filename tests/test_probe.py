"""probe.py (docs/design.md#probes): a planted attribute is found, an absent one is not; the test run must come from
the same SAEs; bad input is one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

import data
import probe
from synthetic import labelled_folder, make_run, random_sae_state

N, D = 400, 12


@pytest.fixture
def runs(tmp_path):
    """A run over real shapes samples whose activations carry "red" on one direction, plus noise; and a
    held-out run of the same SAEs over later samples."""
    out = {}
    for name, offset in (("R", 0), ("T", N)):
        ds = data.load_dataset("shapes", max_samples=N, offset=offset or None)
        names, attrs = data.attribute_matrix(ds)
        rng = np.random.default_rng(offset)
        x = rng.normal(size=(N, D)).astype(np.float32)
        x[:, 0] += 4.0 * attrs[:, names.index("red")]
        out[name] = make_run(tmp_path, name, {0: x, 1: rng.normal(size=(N, D)).astype(np.float32)},
                             {0: random_sae_state(D, 4 * D, seed=1), 1: random_sae_state(D, 4 * D, seed=2)},
                             dataset=ds.describe())
    meta_path = tmp_path / "T" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "sae_from": "R"}))
    return tmp_path


def test_planted_label_is_found_and_absent_one_is_not(runs, tmp_path, capsys):
    out = tmp_path / "p.json"
    probe.main(["--root", str(runs), "--run", "R", "--test_run", "T", "--labels", "red", "circle", "--json", str(out),
                "--plot", str(tmp_path / "p.png"), "--top_n", "4"])
    js = json.loads(out.read_text())
    acc = {k: np.array(v, dtype=float) for k, v in js["balanced_accuracy"].items()}
    assert acc["raw"][0, 0] > 0.9 and acc["sae"][0, 0] > 0.85 and acc["raw_top"][0, 0] > 0.9  # layer 0 carries red
    assert abs(acc["raw"][1, 0] - 0.5) < 0.12 and abs(acc["raw"][0, 1] - 0.5) < 0.12  # layer 1 / circle: chance
    assert js["test"] == "T" and (tmp_path / "p.png").stat().st_size > 5000
    assert "balanced accuracy" in capsys.readouterr().out


def test_held_out_split_and_shift(runs, tmp_path):
    r = probe.Run.open(runs, "R")
    args = probe.ProbeArgs(root=str(runs), run="R", device="cpu", train_where=["shape=circle"],
                           test_where=["shape=square"])
    res = probe.probe(r, None, ["red"], args)
    assert res.test == "R (held out)" and res.balanced_accuracy["raw"][0, 0] > 0.85  # red transfers across shapes


@pytest.mark.parametrize("argv,needle", [
    (["--labels", "magenta"], "unknown label 'magenta'"),
    (["--train_where", "shape=star", "--test_where", "shape=hexagon"], "unknown shapes attribute"),
    (["--test_run", "R"], None),
])
def test_bad_input(runs, error_line, argv, needle):
    if needle is None:  # a test run recorded from other SAEs
        make_run(runs, "X", {0: np.zeros((N, D), np.float32) + np.arange(N)[:, None], 1: np.ones((N, D), np.float32)},
                 {0: random_sae_state(D, 4 * D, seed=5), 1: random_sae_state(D, 4 * D, seed=6)},
                 dataset=data.load_dataset("shapes", max_samples=N).describe())
        argv, needle = ["--test_run", "X"], "was not recorded from 'R'"
    assert needle in error_line(probe.main, ["--root", str(runs), "--run", "R", *argv])


def test_label_column_of_a_local_dataset(tmp_path, error_line):
    ds = labelled_folder(tmp_path / "imgs")
    names, labels = data.label_matrix(ds, "label")
    assert names == ["car", "cat", "dog"] and labels[:3].tolist() == [[0, 1, 0], [0, 0, 1], [1, 0, 0]]
    n = len(ds)
    x = np.random.default_rng(0).normal(size=(n, D)).astype(np.float32)
    x[:, 0] += 4.0 * labels[:, 1]  # cat
    make_run(tmp_path, "F", {0: x}, {0: random_sae_state(D, 4 * D, seed=1)}, dataset=ds.describe())
    args = probe.ProbeArgs(root=str(tmp_path), run="F", device="cpu", label_column="label", test_fraction=0.5)
    res = probe.probe(probe.Run.open(tmp_path, "F"), None, None, args)
    assert res.labels == ["car", "cat", "dog"] and res.label_column == "label"
    assert res.auroc["raw"][0, 1] > 0.9 and res.auroc["raw"][0, 0] < 0.8
    base = ["--root", str(tmp_path), "--run", "F"]
    assert "unknown label column 'kind'" in error_line(probe.main, [*base, "--label_column", "kind"])
    assert "--label_column" in error_line(probe.main, base)  # no built-in labels outside shapes
    assert "unknown label 'bird'" in error_line(probe.main, [*base, "--label_column", "label", "--labels", "bird"])
