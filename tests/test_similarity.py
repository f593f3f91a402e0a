"""similarity.py (docs/design.md#calibration): every classic measure against a float64 brute force (N x N Grams where
that is the definition), published invariances, the streaming paths, the CLI and its bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import similarity as sim
from saeshare.disk.runs import null_permutation
from synthetic import make_run, random_sae_state

N = 120


# ---- float64 references --------------------------------------------------------------------------------
def gram_center(g, unbiased):
    """Kornblith et al.'s center_gram."""
    g = g.copy()
    n = len(g)
    if unbiased:
        np.fill_diagonal(g, 0)
        means = g.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        g -= means[:, None] + means[None, :]
        np.fill_diagonal(g, 0)
    else:
        means = g.mean(0)
        means -= means.mean() / 2
        g -= means[:, None] + means[None, :]
    return g


def ref_cka(x, y, debiased=False):
    """cka(gram_linear(X), gram_linear(Y), debiased): N x N Grams."""
    gx, gy = gram_center(x @ x.T, debiased), gram_center(y @ y.T, debiased)
    return (gx.ravel() @ gy.ravel()) / (np.linalg.norm(gx) * np.linalg.norm(gy))


def ref_svcca(x, y, variance=0.99):
    def reduce(z):
        zc = z - z.mean(0)
        _, s, vt = np.linalg.svd(zc, full_matrices=False)
        frac = np.cumsum(s ** 2) / np.sum(s ** 2)
        keep = int(np.argmax(frac >= variance)) + 1
        return zc @ vt[:keep].T
    qx, _ = np.linalg.qr(reduce(x))
    qy, _ = np.linalg.qr(reduce(y))
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0, 1).mean()


def ref_mknn(x, y, k=10):
    def nn(z):
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        s = z @ z.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1, kind="stable")[:, :k]
    a, b = nn(x), nn(y)
    return np.mean([len(set(a[i]) & set(b[i])) / k for i in range(len(x))])


def measures(x, y, chunk=17, k=10):
    """The module's streaming computation on in-memory arrays, in chunks of `chunk` rows."""
    cx = lambda: (torch.from_numpy(x[s:s + chunk]) for s in range(0, len(x), chunk))  # noqa: E731
    cy = lambda: (torch.from_numpy(y[s:s + chunk]) for s in range(0, len(y), chunk))  # noqa: E731
    sx, sy = sim.side_stats(cx, len(x)), sim.side_stats(cy, len(y))
    xty = sim.cross_gram(cx(), cy(), sx, sy)
    return {"cka": sim.cka(sx, sy, xty), "cka_debiased": sim.cka_debiased(sx, sy, xty), "svcca": sim.svcca(sx, sy, xty),
            "mknn": sim.mutual_knn(sim.knn(cx, len(x), k), sim.knn(cy, len(y), k))}


@pytest.fixture
def xy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N, 4))
    x = np.concatenate([z, rng.normal(size=(N, 8))], 1) @ rng.normal(size=(12, 12)) + 3.0
    y = np.concatenate([z ** 2, rng.normal(size=(N, 5))], 1) @ rng.normal(size=(9, 7)) - 1.0
    return x, y


def test_measures_equal_float64_brute_force(xy):
    x, y = xy
    got = measures(x, y)
    assert got["cka"] == pytest.approx(ref_cka(x, y), abs=1e-6)
    assert got["cka_debiased"] == pytest.approx(ref_cka(x, y, debiased=True), abs=1e-6)
    assert got["svcca"] == pytest.approx(ref_svcca(x, y), abs=1e-6)
    assert got["mknn"] == pytest.approx(ref_mknn(x, y), abs=1e-6)
    assert 0 < got["mknn"] < 1 and 0 < got["cka"] < 1  # a non-trivial case


def test_svcca_on_rank_deficient_activations_is_a_number(tmp_path, capsys, error_line):
    """--variance 1 on activations of rank 3 in 8 dimensions: the zero-variance components are dropped, and
    the value equals SVCCA on the rank-3 subspaces; constant activations are one clear line."""
    rng = np.random.default_rng(1)
    z = rng.normal(size=(N, 3))
    x = z @ rng.normal(size=(3, 8)) + 2.0
    y = np.concatenate([z[:, :2], rng.normal(size=(N, 2))], 1) @ rng.normal(size=(4, 6))
    got = measures(x, y)["svcca"]
    assert np.isfinite(got) and got == pytest.approx(ref_svcca(z, y, variance=1.0 - 1e-12), abs=1e-6)
    for name, acts in (("A", x), ("B", y)):
        make_run(tmp_path, name, {0: acts.astype(np.float32)}, {0: random_sae_state(acts.shape[1], 16)})
    sim.main(["--root", str(tmp_path), "--source", "A", "--target", "B", "--variance", "1", "--device", "cpu"])
    assert "nan" not in capsys.readouterr().out
    make_run(tmp_path, "C", {0: np.ones((N, 8), np.float32)}, {0: random_sae_state(8, 16)})
    line = error_line(sim.main, ["--root", str(tmp_path), "--source", "A", "--target", "C", "--device", "cpu"])
    assert "do not vary over the samples" in line


def test_invariances(xy):
    x, y = xy
    base = measures(x, y)
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(12, 12)))
    turned = measures(x @ q * 7.5, y)  # orthogonal map and isotropic scaling
    assert turned["cka"] == pytest.approx(base["cka"], abs=1e-9)
    assert turned["cka_debiased"] == pytest.approx(base["cka_debiased"], abs=1e-9)
    scale = np.random.default_rng(2).uniform(0.1, 10, size=(N, 1))
    assert measures(x * scale, y)["mknn"] == base["mknn"]  # per-row rescaling
    same = measures(x, x.copy())
    for m in sim.MEASURES:
        assert same[m] == pytest.approx(1.0, abs=1e-9), m


def test_chunking_does_not_change_the_numbers(xy):
    x, y = xy
    a, b = measures(x, y, chunk=N), measures(x, y, chunk=7)
    for m in sim.MEASURES:
        assert a[m] == pytest.approx(b[m], abs=1e-10)


@pytest.fixture
def runs(tmp_path, xy):
    x, y = (v.astype(np.float32) for v in xy)
    make_run(tmp_path, "A", {0: x[:, :6], 2: x}, {0: random_sae_state(6, 12), 2: random_sae_state(12, 24)})
    make_run(tmp_path, "B", {1: y}, {1: random_sae_state(7, 14)})
    make_run(tmp_path, "C", {1: y}, {1: random_sae_state(7, 14)}, fingerprint="other samples")
    return tmp_path


def test_cli_pair_json_floor_and_cache(runs, capsys):
    out = runs / "s.json"
    sim.main(["--root", str(runs), "--source", "A", "--target", "B", "--json", str(out), "--chunk_size", "50"])
    line = capsys.readouterr().out
    js = json.loads(out.read_text())
    assert js["schema"] == 1 and js["kind"] == "similarity" and set(js["measures"]) == set(sim.MEASURES)
    x, y = (np.asarray(v, dtype=np.float64) for v in (np.load(runs / "A" / "layer02.acts.npy"),
                                                      np.load(runs / "B" / "layer01.acts.npy")))
    assert js["measures"]["cka"]["last_layer"] == pytest.approx(ref_cka(x, y), abs=1e-6)
    assert np.array(js["measures"]["mknn"]["layer_matrix"]).shape == (2, 1)
    perm = null_permutation(N)
    assert js["floor"]["cka_debiased"] == pytest.approx(ref_cka(x, y[perm], debiased=True), abs=1e-6)
    assert js["floor"]["mknn"] < js["measures"]["mknn"]["last_layer"]
    assert f"cka {js['measures']['cka']['last_layer']:.4f}" in line
    assert len(list((runs / ".cache").glob("*similarity*"))) == 3  # two layer pairs and the floor
    again = sim.Similarity.load(out)
    assert again.measures["svcca"].last_layer == js["measures"]["svcca"]["last_layer"]


def test_cli_runs_table(runs, capsys, tmp_path):
    sim.main(["--root", str(runs), "--runs", "A", "B", "--json", str(tmp_path / "t.json"),
              "--plot", str(tmp_path / "t.png")])
    js = json.loads((tmp_path / "t.json").read_text())
    assert js["runs"] == ["A", "B"] and js["measures"]["cka"][0][0] is None and js["measures"]["cka"][0][1] > 0
    assert (tmp_path / "t.png").stat().st_size > 1000


@pytest.mark.parametrize("argv,needle", [
    (["--source", "A"], "--source A --target B"),
    (["--runs", "A"], "two or more distinct runs"),
    (["--source", "A", "--target", "B", "--k", "0"], "--k must be positive"),
    (["--source", "A", "--target", "B", "--k", "500"], "the measures need more than"),
    (["--source", "A", "--target", "nope"], "no run 'nope'"),
    (["--source", "A", "--target", "C"], "cover different datasets"),
])
def test_bad_input(runs, error_line, argv, needle):
    assert needle in error_line(sim.main, ["--root", str(runs), *argv])
