"""joint.py: on runs with planted shared and private factors, both joint dictionaries find the planted shared
part and the floor finds none; Jaccard and cross R^2 equal a float64 recomputation from the trained weights;
the JSON, the plot and bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import joint
from saeshare.disk.runs import Run
from saeshare.joint.dictionary import JointConfig, JointSAE
from saeshare.joint.measures import measure
from synthetic import make_run, random_sae_state

N, SHARED, PRIVATE, D_A, D_B = 4000, 8, 4, 32, 24
PLANTED = 2 * SHARED / (2 * SHARED + 2 * PRIVATE)
"""The planted shared part of the weight: a shared factor is drawn in both runs, a private one in one."""
FAST = dict(expansion_factor=1, top_k=4, batch_size=128)


def planted_acts(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Factors firing with probability 0.15 (values 0.5-1.5): 8 drawn on unit directions in both runs, 4 in A
    only, 4 in B only; noise 0.05."""
    rng = np.random.default_rng(seed)
    z = (rng.random((N, SHARED + 2 * PRIVATE)) < 0.15) * rng.uniform(0.5, 1.5, (N, SHARED + 2 * PRIVATE))
    u = rng.normal(size=(SHARED + PRIVATE, D_A))
    v = rng.normal(size=(SHARED + PRIVATE, D_B))
    u, v = u / np.linalg.norm(u, axis=1, keepdims=True), v / np.linalg.norm(v, axis=1, keepdims=True)
    a = z[:, :SHARED + PRIVATE] @ u + 0.05 * rng.normal(size=(N, D_A))
    b = np.concatenate([z[:, :SHARED], z[:, SHARED + PRIVATE:]], 1) @ v + 0.05 * rng.normal(size=(N, D_B))
    return a.astype(np.float32), b.astype(np.float32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    a, b = planted_acts()
    make_run(root, "A", {0: a}, {0: random_sae_state(D_A, 2 * D_A)})
    make_run(root, "B", {0: b}, {0: random_sae_state(D_B, 2 * D_B, seed=1)})
    return root


@pytest.fixture(scope="module", params=["sparc", "crosscoder"])
def report(request, root):
    runs = [Run.open(root, "A"), Run.open(root, "B")]
    return joint.joint_report(runs, [0, 0], JointConfig(method=request.param, **FAST))


def test_planted_shared_part_is_found_and_the_floor_has_none(report):
    assert abs(report.shared_fraction - PLANTED) < 0.1, report.shared_fraction
    assert report.floor.shared_fraction < 0.1
    for s in range(2):  # a private factor is drawn in one run only
        assert abs(report.private_fraction[s] - PRIVATE / (2 * SHARED + 2 * PRIVATE)) < 0.1
    assert report.jaccard[0][1] > report.floor.jaccard[0][1] + 0.1
    assert min(report.cross_r2[0][1], report.cross_r2[1][0]) > 0.1 > max(report.floor.cross_r2[0][1],
                                                                         report.floor.cross_r2[1][0])
    assert report.n_measured == 800 and max(report.fvu) < 0.3
    assert len(report.loss) == report.epochs and report.loss[-1] < report.loss[0]


def _with_biases(model: JointSAE) -> JointSAE:
    """A fresh dictionary's biases are 0: random ones so that the tests see them (torch seeded here)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for b in (*model.b_enc, *model.b_dec):
            b.normal_(0, 0.1)
    return model


def _brute(model: JointSAE, xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Jaccard and cross R^2 in float64 from the weights: each stream's own top-k of the ReLU of its
    pre-activations, decoded densely into every stream."""
    w = {k: v.double().numpy() for k, v in model.state().items()}
    codes, sets = [], []
    for s, x in enumerate(xs):
        pre = np.maximum((x - w[f"stream{s}.b_dec"]) @ w[f"stream{s}.W_enc"].T + w[f"stream{s}.b_enc"], 0)
        keep = np.argsort(-pre, axis=1, kind="stable")[:, :model.top_k]
        code = np.zeros_like(pre)
        np.put_along_axis(code, keep, np.take_along_axis(pre, keep, 1), 1)
        codes.append(code)
        sets.append(code > 0)
    S = len(xs)
    jac, r2 = np.zeros((S, S)), np.zeros((S, S))
    for s in range(S):
        for t in range(S):
            union, inter = (sets[s] | sets[t]).sum(1), (sets[s] & sets[t]).sum(1)
            jac[s, t] = np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0))
            err = xs[t] - (codes[s] @ w[f"stream{t}.W_dec"] + w[f"stream{t}.b_dec"])
            r2[s, t] = 1 - (err ** 2).sum() / ((xs[t] - xs[t].mean(0)) ** 2).sum()
    return jac, r2


@pytest.mark.parametrize("method", ["sparc", "crosscoder"])
def test_jaccard_and_cross_r2_against_float64(method):
    model = _with_biases(JointSAE([D_A, D_B], 20, 3, method, seed=3))
    xs = [torch.randn(300, D_A), torch.randn(300, D_B) + 0.3]
    got = measure(model, xs)
    jac, r2 = _brute(model, [x.double().numpy() for x in xs])
    np.testing.assert_allclose(got.jaccard_SS, jac, atol=1e-6)
    np.testing.assert_allclose(got.cross_r2_SS, r2, atol=1e-4)


def test_cli_writes_json_and_plot(root, tmp_path, capsys):
    out, png = tmp_path / "j.json", tmp_path / "j.png"
    joint.main(["--runs", "A", "B", "--root", str(root), "--device", "cpu", "--expansion_factor", "1", "--top_k", "4",
                "--max_epochs", "3", "--json", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert text.startswith("sparc over A (layer 0), B (layer 0): 32 latents, top-4") and "Jaccard A-B" in text
    got = json.loads(out.read_text())
    assert got["kind"] == "joint" and got["schema"] == 1
    for key in ("shared_fraction", "jaccard", "cross_r2"):
        assert key in got and key in got["floor"]
    assert np.shape(got["cross_r2"]) == (2, 2) and len(got["match"]["rho"]) == 2 * D_A
    assert png.stat().st_size > 10_000


def test_bad_input_is_one_line(root, error_line):
    base = ["--root", str(root), "--device", "cpu"]
    assert "two or more distinct runs" in error_line(joint.main, ["--runs", "A", "A", *base])
    assert "one layer per run" in error_line(joint.main, ["--runs", "A", "B", "--layers", "0", *base])
    assert "--holdout must be in [0, 1)" in error_line(joint.main, ["--runs", "A", "B", "--holdout", "1", *base])
    assert "--top_k must be in [1, 32]" in error_line(joint.main, ["--runs", "A", "B", "--expansion_factor", "1",
                                                                  "--top_k", "40", *base])
    make_run(root, "other", {0: np.zeros((10, 4), np.float32)}, {0: random_sae_state(4, 8)}, fingerprint="other")
    assert "cover different datasets" in error_line(joint.main, ["--runs", "A", "other", *base])


# ---- wmppc.py --geometry (Lan et al.) ---------------------------------------------------------------------
def test_svcca_and_rsa_against_float64_formulas():
    from saeshare.joint.geometry import _cosines, _pearson, _svcca, _whitened

    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 6))
    x = z @ rng.normal(size=(6, 10)) + 0.5 * rng.normal(size=(500, 10))
    y = z[:, :4] @ rng.normal(size=(4, 7)) + 0.5 * rng.normal(size=(500, 7))

    def reduced(m):  # principal components explaining 99% of the variance, as an orthonormal basis
        u, s, _ = np.linalg.svd(m - m.mean(0), full_matrices=False)
        keep = np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.99) + 1
        return u[:, :keep]

    cca = np.linalg.svd(reduced(x).T @ reduced(y), compute_uv=False)
    assert _svcca(_whitened(x), _whitened(y)) == pytest.approx(np.clip(cca, 0, 1).mean(), abs=1e-9)
    cx, cy = (m / np.linalg.norm(m, axis=1, keepdims=True) for m in (x, y))
    iu = np.triu_indices(500, 1)
    expected = np.corrcoef((cx @ cx.T)[iu], (cy @ cy.T)[iu])[0, 1]
    assert _pearson(_cosines(x)[iu], _cosines(y)[iu]) == pytest.approx(expected, abs=1e-12)


def test_aligned_rows_beat_every_shuffle_and_one_to_one_keeps_the_best():
    from saeshare.disk.cache import PairStats
    from saeshare.joint.geometry import Paired, geometry, paired

    rng = np.random.default_rng(1)
    w_a = rng.normal(size=(60, 8))
    rotation = np.linalg.qr(rng.normal(size=(8, 8)))[0]
    got = geometry(w_a, w_a @ rotation, Paired(np.arange(60), np.arange(60)), shuffles=50)
    assert got.rsa == pytest.approx(1.0) and got.svcca == pytest.approx(1.0)
    assert got.rsa_p == got.svcca_p == pytest.approx(1 / 51) and abs(got.rsa_null) < 0.2
    stats = PairStats(rho_F=np.array([0.9, 0.5, 0.7, 0.2]), match_F=np.array([3, 3, 1, 3]),
                      mass_F=np.array([1.0, 1.0, 1.0, 0.0]))
    assert paired(stats).a.tolist() == [0, 1, 2]  # feature 3 never fires
    one = paired(stats, one_to_one=True)
    assert one.a.tolist() == [0, 2] and one.b.tolist() == [3, 1]
    assert paired(stats, min_rho=0.6).a.tolist() == [0, 2]


def test_wmppc_geometry_in_the_json(root, tmp_path, capsys, error_line):
    import wmppc

    out = tmp_path / "w.json"
    wmppc.main(["--source", "A", "--target", "B", "--root", str(root), "--device", "cpu", "--geometry",
                "--one_to_one", "--json", str(out)])
    assert "geometry (layer 0 -> 0, " in capsys.readouterr().out
    (g,) = json.loads(out.read_text())["geometry"]
    assert g["layer_a"] == 0 and 0 < g["n_pairs"] <= 2 * D_B and 0 < g["svcca_p"] <= 1
    assert "--geometry goes with --source and --target" in error_line(
        wmppc.main, ["--runs", "A", "B", "--root", str(root), "--geometry"])


def _dense_loss(model: JointSAE, xs: list[torch.Tensor], cross_weight: float) -> torch.Tensor:
    """The same loss by autograd through dense products: dense pre-activations, dense codes, dense decoders."""
    pre = [(x - model.b_dec[s]) @ model.W_enc[s].T + model.b_enc[s] for s, x in enumerate(xs)]
    idx = sum(p.detach() for p in pre).topk(model.top_k, dim=1).indices
    kept = [p.gather(1, idx) for p in pre]
    vals = [sum(kept).relu()] * len(xs) if model.method == "crosscoder" else [k.relu() for k in kept]

    def decode(t, v):
        dense = torch.zeros(len(idx), model.n_latents).scatter(1, idx, v)
        return dense @ model.W_dec[t] + model.b_dec[t]

    own = sum((xs[t] - decode(t, vals[t])).pow(2).sum(1).mean() for t in range(len(xs)))
    if model.method != "sparc":
        return own
    cross = [(xs[t] - decode(t, vals[s])).pow(2).sum(1).mean() for s in range(len(xs)) for t in range(len(xs))
             if s != t]
    return own + cross_weight * torch.stack(cross).mean()


@pytest.mark.parametrize("method", ["sparc", "crosscoder"])
def test_sparse_training_step_equals_dense_autograd(method):
    model = _with_biases(JointSAE([D_A, D_B], 40, 5, method, seed=2))
    xs = [torch.randn(64, D_A), torch.randn(64, D_B)]
    loss = model.loss(xs, 0.5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref = _dense_loss(model, xs, 0.5)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_match_is_the_best_pearson_correlation_in_float64():
    from saeshare.joint.measures import match

    rng = np.random.default_rng(4)
    a = np.maximum(rng.normal(size=(500, 7)), 0)
    b = np.maximum(a @ rng.normal(size=(7, 9)) + rng.normal(size=(500, 9)), 0)
    a[:, 3] = 0  # a constant feature matches with 0
    chunks = lambda m: (torch.as_tensor(m[i:i + 128], dtype=torch.float32) for i in range(0, 500, 128))  # noqa: E731
    got = match(chunks(a), chunks(b), 500)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(a.astype(np.float32).T, b.astype(np.float32).T)[:7, 7:])
    np.testing.assert_allclose(got.rho_F, corr.max(1), atol=1e-6)
    live = [f for f in range(7) if f != 3]
    np.testing.assert_array_equal(got.latent_F[live], corr.argmax(1)[live])
    assert got.rho_F[3] == 0


def test_three_runs_of_three_widths(root, tmp_path, capsys):
    _, b = planted_acts()
    make_run(root, "C", {0: b[:, :16] + 0.01}, {0: random_sae_state(16, 32, seed=2)})
    out = tmp_path / "three.json"
    joint.main(["--runs", "A", "B", "C", "--root", str(root), "--device", "cpu", "--method", "crosscoder",
                "--expansion_factor", "1", "--top_k", "4", "--max_epochs", "2", "--no_match", "--json", str(out)])
    got = json.loads(out.read_text())
    assert np.shape(got["jaccard"]) == np.shape(got["floor"]["cross_r2"]) == (3, 3) and len(got["fvu"]) == 3
    assert np.shape(got["share"]) == (3, 32) and "match" not in got
    assert "cross R2 C->A" in capsys.readouterr().out
