"""wMPPC and Comparative Sharedness against a brute-force float64 reference on synthetic runs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import comp_sharedness
import wmppc
from errors import UserError
from saeshare.engine.correlator import Correlator
from synthetic import engine, make_run, random_sae_state

N = 300
K = 4
# run A: layers 0, 2, 5; run B: layers 1, 3 (non-contiguous ids, different d and F per layer)
SHAPES_A = {0: (6, 24), 2: (8, 32), 5: (8, 40)}
SHAPES_B = {1: (8, 32), 3: (10, 40)}
DEAD, CONST, BIG = 0, 1, 2  # planted features of every layer: always 0, constant 0.7, constant 100
TOL = 1e-5


def _layer_data(rng, z, shapes):
    """Activations = a random mix of shared latents z + noise, with a last coordinate fixed at 1 so that
    features can be planted constant: W_enc column e_last * c with b_dec[last] = 0 gives the code c."""
    acts, states = {}, {}
    for i, (layer, (d, n_feat)) in enumerate(shapes.items()):
        x = z @ rng.normal(size=(z.shape[1], d)) + 0.5 * rng.normal(size=(len(z), d))
        x[:, -1] = 1.0
        state = random_sae_state(d, n_feat, seed=int(rng.integers(1 << 30)))
        state["b_dec"][-1] = 0.0
        state["W_enc"][:, DEAD] = 0.0
        state["W_enc"][:, CONST] = 0.0
        state["W_enc"][-1, CONST] = 0.7
        state["W_enc"][:, BIG] = 0.0
        state["W_enc"][-1, BIG] = 100.0
        acts[layer], states[layer] = x.astype(np.float32), state
    return acts, states


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N, 5))
    return _layer_data(rng, z, SHAPES_A), _layer_data(rng, z, SHAPES_B)


@pytest.fixture
def runs(tmp_path, data):
    (acts_a, st_a), (acts_b, st_b) = data
    return make_run(tmp_path, "A", acts_a, st_a, K), make_run(tmp_path, "B", acts_b, st_b, K)


# ---- brute-force float64 reference -----------------------------------------------------------------------
def ref_codes(run, layer, codes):
    x = np.asarray(run.acts(layer), dtype=np.float64)
    sae = run.sae(layer)
    pre = np.maximum((x - sae.b_dec.double().numpy()) @ sae.W_enc.double().numpy(), 0)
    if codes == "relu":
        return pre
    idx = sae.encode(torch.from_numpy(x.astype(np.float32))).top_indices.numpy()  # the SAE's own choice
    out = np.zeros_like(pre)
    np.put_along_axis(out, idx, np.take_along_axis(pre, idx, 1), 1)
    return out


def ref_corr(X, Y):
    """Pearson correlation matrix [F_A, F_B]; 0 for a constant feature."""
    xc, yc = X - X.mean(0), Y - Y.mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = (xc.T @ yc) / np.outer(np.sqrt((xc ** 2).sum(0)), np.sqrt((yc ** 2).sum(0)))
    c[X.max(0) == X.min(0), :] = 0
    c[:, Y.max(0) == Y.min(0)] = 0
    return c


def ref_pair(run_a, run_b, a, b, codes):
    X, Y = ref_codes(run_a, a, codes), ref_codes(run_b, b, codes)
    c = ref_corr(X, Y)
    return c, c.max(1), X.sum(0)


def ref_weighted(rho, mass):
    return (mass * rho).sum() / mass.sum()


def check_stats(stats, c, rho, mass):
    assert np.isfinite(stats.rho_F).all()
    np.testing.assert_allclose(stats.rho_F, rho, atol=TOL, rtol=0)
    np.testing.assert_allclose(stats.mass_F, mass, rtol=TOL, atol=TOL)
    # the match reaches the maximum; it is the reference's argmax wherever the maximum is clear
    np.testing.assert_allclose(c[np.arange(len(rho)), stats.match_F], rho, atol=TOL, rtol=0)
    top2 = np.sort(c, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert (stats.match_F[clear] == c.argmax(1)[clear]).all()


# ---- the engine ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codes,method,mem_bytes", [
    ("relu", "dense", 2**30), ("relu", "dense", 4 * 40 * 40),  # whole layers; layers cut across groups
    ("topk", "dense", 2**30), ("topk", "sparse", 2**30), ("topk", "sparse", 8 * 40 * 7),  # sparse row blocks
])
def test_pair_stats_match_reference(runs, codes, method, mem_bytes):
    run_a, run_b = runs
    eng = engine(codes, chunk_size=128, mem_gb=mem_bytes / 2**30, no_cache=True, method=method)
    stats = eng.pair_stats(run_a, run_b)
    assert list(stats) == [(a, b) for a in SHAPES_A for b in SHAPES_B]
    for (a, b), s in stats.items():
        check_stats(s, *ref_pair(run_a, run_b, a, b, codes))
        assert s.rho_F[DEAD] == 0 and s.rho_F[BIG] == 0  # constant features: 0, not NaN
        if codes == "relu":
            assert s.rho_F[CONST] == 0 and s.mass_F[CONST] == pytest.approx(0.7 * N, rel=1e-6)


def test_sparse_equals_dense_on_topk(runs):
    run_a, run_b = runs
    dense = engine("topk", chunk_size=100, no_cache=True, method="dense").pair_stats(run_a, run_b)
    sparse = engine("topk", chunk_size=64, no_cache=True).pair_stats(run_a, run_b)
    for p in dense:
        np.testing.assert_allclose(dense[p].rho_F, sparse[p].rho_F, atol=TOL, rtol=0)
        np.testing.assert_allclose(dense[p].mass_F, sparse[p].mass_F, rtol=1e-6)


@pytest.mark.parametrize("codes", ["relu", "topk"])
def test_planted_copies_have_rho_one(tmp_path, data, codes):
    """B's SAE holds copies of features of A (same activations, same encoder columns): some of them
    for relu codes; all of them, shuffled, for top-k codes (so that the same features win the top-k)."""
    (acts_a, st_a), _ = data
    a_layer, (d, n_feat) = 2, SHAPES_A[2]
    rng = np.random.default_rng(1)
    if codes == "relu":
        copied = np.array([5, 9, 17, 30])
        st_b = random_sae_state(d, 48, seed=7)
        slots = rng.permutation(48)[:len(copied)]
    else:
        copied = np.arange(n_feat)
        st_b = {k: v.clone() for k, v in st_a[a_layer].items()}
        slots = rng.permutation(n_feat)
    st_b["b_dec"] = st_a[a_layer]["b_dec"].clone()
    st_b["W_enc"][:, slots] = st_a[a_layer]["W_enc"][:, copied]
    st_b["W_dec"] = (st_b["W_enc"].T / st_b["W_enc"].T.norm(dim=1, keepdim=True).clamp_min(1e-12)).contiguous()
    run_a = make_run(tmp_path, "A", {a_layer: acts_a[a_layer]}, {a_layer: st_a[a_layer]}, K)
    run_b = make_run(tmp_path, "B", {7: acts_a[a_layer]}, {7: st_b}, K)
    eng = engine(codes, chunk_size=128, no_cache=True)
    s = eng.pair_stats(run_a, run_b)[a_layer, 7]
    codes_a = ref_codes(run_a, a_layer, codes)
    live = copied[codes_a[:, copied].max(0) > codes_a[:, copied].min(0)]  # constant features have rho 0
    assert len(live) >= 3
    np.testing.assert_allclose(s.rho_F[live], 1.0, atol=1e-6)
    assert (s.match_F[live] == slots[np.isin(copied, live)]).all()
    c, rho, mass = ref_pair(run_a, run_b, a_layer, 7, codes)
    check_stats(s, c, rho, mass)
    res = wmppc.wmppc(run_a, run_b, eng)
    assert res.last_layer == pytest.approx(ref_weighted(rho, mass), abs=TOL)
    assert res.all_layers == pytest.approx(ref_weighted(rho, mass), abs=TOL)


@pytest.mark.parametrize("codes", ["relu", "topk"])
def test_wmppc_matches_reference(runs, codes):
    run_a, run_b = runs
    res = wmppc.wmppc(run_a, run_b, engine(codes, chunk_size=97, no_cache=True))
    ref = {(a, b): ref_pair(run_a, run_b, a, b, codes) for a in SHAPES_A for b in SHAPES_B}
    matrix = [[ref_weighted(ref[a, b][1], ref[a, b][2]) for b in SHAPES_B] for a in SHAPES_A]
    np.testing.assert_allclose(res.layer_matrix, matrix, atol=TOL, rtol=0)
    per_layer = [ref_weighted(np.max([ref[a, b][1] for b in SHAPES_B], axis=0), ref[a, 1][2]) for a in SHAPES_A]
    weights = [f for _, f in SHAPES_A.values()]
    assert res.all_layers == pytest.approx(np.average(per_layer, weights=weights), abs=TOL)
    assert res.last_layer == pytest.approx(matrix[-1][-1], abs=TOL)
    assert (res.source_layers, res.target_layers) == (list(SHAPES_A), list(SHAPES_B))


def test_zero_mass_layer_is_an_error(tmp_path, data):
    (acts_a, st_a), (acts_b, st_b) = data
    dead = {k: torch.zeros_like(v) if k == "W_enc" else v for k, v in st_a[0].items()}
    run_a = make_run(tmp_path, "A", {0: acts_a[0]}, {0: dead}, K)
    run_b = make_run(tmp_path, "B", {1: acts_b[1]}, {1: st_b[1]}, K)
    with pytest.raises(UserError, match="activation mass 0"):
        wmppc.wmppc(run_a, run_b, engine("relu", no_cache=True))


# ---- the cache -------------------------------------------------------------------------------------------
def test_cache_hit_and_invalidation(tmp_path, runs, data, monkeypatch):
    run_a, run_b = runs
    calls = []
    compute = Correlator._compute
    monkeypatch.setattr(Correlator, "_compute", lambda self, *a: calls.append(a[2:]) or compute(self, *a))
    first = engine("relu").pair_stats(run_a, run_b)
    assert len(calls) == 1 and len(list((tmp_path / ".cache").glob("*.npz"))) == len(first)
    again = engine("relu").pair_stats(run_a, run_b)  # fresh engine: from disk
    assert len(calls) == 1
    for p in first:
        for x, y in zip(first[p], again[p]):
            np.testing.assert_array_equal(x, y)
    # comp_sharedness's last-layer pair is one of them: no recomputation either
    engine("relu").pair_stats(run_a, run_b, [(-1, -1)])
    assert len(calls) == 1
    # a damaged entry is recomputed
    victim = next((tmp_path / ".cache").glob("*.npz"))
    victim.write_bytes(b"garbage")
    engine("relu").pair_stats(run_a, run_b)
    assert len(calls) == 2
    # rewriting B (new run_id) invalidates: new numbers, computed again
    (_, _), (acts_b, st_b) = data
    run_b2 = make_run(tmp_path, "B", {b: acts_b[b][::-1].copy() for b in acts_b}, st_b, K, overwrite=True)
    fresh = engine("relu").pair_stats(run_a, run_b2)
    assert len(calls) == 3
    check_stats(fresh[5, 3], *ref_pair(run_a, run_b2, 5, 3, "relu"))
    assert not np.allclose(fresh[5, 3].rho_F, first[5, 3].rho_F)


def test_topk_codes_are_computed_once_and_read_back(tmp_path, runs, data, monkeypatch):
    """The sparse path keeps each layer's top-k codes on disk: another engine (another process) with the pair
    results gone reads them instead of encoding every sample again, to the same numbers; a rewritten run
    encodes again."""
    from saeshare.engine import sparse

    run_a, run_b = runs
    calls = []
    encode = sparse.topk_table
    monkeypatch.setattr(sparse, "topk_table", lambda *a: calls.append(1) or encode(*a))
    first = engine("topk").pair_stats(run_a, run_b)
    n_layers = len(run_a.layers) + len(run_b.layers)
    codes = sorted((tmp_path / ".cache").glob("*-topk-codes.npz"))
    assert len(calls) == len(codes) == n_layers
    with np.load(codes[0]) as z:
        assert z["idx_NK"].dtype == np.int32 and z["vals_NK"].shape == (N, K)
    for f in (tmp_path / ".cache").glob("*-topk.npz"):  # the pairs' results: gone
        f.unlink()
    again = engine("topk").pair_stats(run_a, run_b)
    assert len(calls) == n_layers  # no encoding
    for p in first:
        np.testing.assert_array_equal(first[p].rho_F, again[p].rho_F)
        np.testing.assert_array_equal(first[p].match_F, again[p].match_F)
    (_, _), (acts_b, st_b) = data
    run_b2 = make_run(tmp_path, "B", {b: acts_b[b][::-1].copy() for b in acts_b}, st_b, K, overwrite=True)
    check_stats(engine("topk").pair_stats(run_a, run_b2, [(5, 3)])[5, 3], *ref_pair(run_a, run_b2, 5, 3, "topk"))
    assert len(calls) == n_layers + 1  # B's layer 3 anew; A's from disk


def test_cache_separates_codes(runs):
    run_a, run_b = runs
    relu = engine("relu").pair_stats(run_a, run_b, [(5, 3)])[5, 3]
    topk = engine("topk").pair_stats(run_a, run_b, [(5, 3)])[5, 3]
    check_stats(topk, *ref_pair(run_a, run_b, 5, 3, "topk"))
    assert not np.allclose(relu.mass_F, topk.mass_F)


# ---- Comparative Sharedness ------------------------------------------------------------------------------
@pytest.fixture
def four_runs(tmp_path, data):
    """M and three more runs over the same samples."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(N, 5))
    out = {}
    for name in ("M", "G1", "G2", "H1"):
        acts, states = _layer_data(rng, z, {4: (8, 32), 9: (8, 48)})
        out[name] = make_run(tmp_path, name, acts, states, K)
    return out


@pytest.mark.parametrize("codes", ["relu", "topk"])
def test_comp_sharedness_matches_reference(four_runs, codes):
    r = four_runs
    res = comp_sharedness.comp_sharedness(r["M"], [r["G1"], r["G2"]], [r["H1"]],
                                          engine(codes, no_cache=True))
    rho = {n: ref_pair(r["M"], r[n], 9, 9, codes)[1] for n in ("G1", "G2", "H1")}
    mass = ref_codes(r["M"], 9, codes).sum(0)
    delta = mass * (np.minimum(rho["G1"], rho["G2"]) ** 2 - rho["H1"] ** 2)
    np.testing.assert_allclose(res.delta_F, delta, atol=TOL * mass.max(), rtol=TOL)
    feats = comp_sharedness.top_features(res).features
    assert len(feats) == 1  # 1% of 48 features, rounded up
    assert feats[0].feature == int(np.argmax(delta))
    assert res.layers == {"M": 9, "G1": 9, "G2": 9, "H1": 9}


def test_min_starts_at_infinity(four_runs):
    """With one run in G the G term is its rho squared (the paper's code, starting at 0, gives 0)."""
    r = four_runs
    res = comp_sharedness.comp_sharedness(r["M"], [r["G1"]], [r["H1"]],
                                          engine("relu", no_cache=True))
    np.testing.assert_allclose(res.delta_F, res.mass_F * (res.rho["G1"] ** 2 - res.rho["H1"] ** 2))
    assert res.delta_F.max() > 0


# ---- CLIs --------------------------------------------------------------------------------------------------
def test_wmppc_cli_pair(runs, tmp_path, capsys):
    root = str(tmp_path)
    out_json, out_png = tmp_path / "w.json", tmp_path / "w.png"
    wmppc.main(["--root", root, "--source", "A", "--target", "B", "--json", str(out_json), "--plot", str(out_png),
                "--device", "cpu"])
    line = capsys.readouterr().out.strip()
    res = wmppc.wmppc(*runs, engine("relu"))
    assert line == f"All Layers : {res.all_layers:.4f} | Last layer : {res.last_layer:.4f}"
    js = json.loads(out_json.read_text())
    assert set(js) == {"schema", "kind", "source", "target", "codes", "all_layers", "last_layer", "layer_matrix",
                       "source_layers", "target_layers", "warnings"}
    assert (js["source"], js["target"], js["codes"]) == ("A", "B", "relu")
    assert js["source_layers"] == [0, 2, 5] and js["target_layers"] == [1, 3]
    np.testing.assert_allclose(js["layer_matrix"], res.layer_matrix)
    assert js["all_layers"] == pytest.approx(res.all_layers) and js["last_layer"] == pytest.approx(res.last_layer)
    assert out_png.read_bytes()[:4] == b"\x89PNG"


def test_wmppc_cli_runs(four_runs, tmp_path, capsys):
    out_json = tmp_path / "all.json"
    names = ["M", "G1", "H1"]
    wmppc.main(["--root", str(tmp_path), "--runs", *names, "--json", str(out_json), "--codes", "topk",
                "--plot", str(tmp_path / "all.png")])
    text = capsys.readouterr().out
    assert "All layers" in text and "Last layer" in text
    js = json.loads(out_json.read_text())
    assert set(js) == {"schema", "kind", "runs", "codes", "all_layers", "last_layer", "warnings"}
    assert js["runs"] == names
    eng = engine("topk")
    for i, a in enumerate(names):
        assert js["all_layers"][i][i] is None and js["last_layer"][i][i] is None
        for j, b in enumerate(names):
            if i != j:
                res = wmppc.wmppc(four_runs[a], four_runs[b], eng)
                assert js["all_layers"][i][j] == pytest.approx(res.all_layers)
                assert js["last_layer"][i][j] == pytest.approx(res.last_layer)
    assert (tmp_path / "all.png").is_file()


def test_comp_sharedness_cli(four_runs, tmp_path, capsys):
    out_json = tmp_path / "cs.json"
    comp_sharedness.main(["--root", str(tmp_path), "--source", "M", "--min_group", "G1", "G2",
                          "--max_group", "H1", "--top", "5", "--json", str(out_json)])
    text = capsys.readouterr().out
    js = json.loads(out_json.read_text())
    assert {"schema", "source", "min_group", "max_group", "features"} <= set(js)
    assert (js["source"], js["min_group"], js["max_group"]) == ("M", ["G1", "G2"], ["H1"])
    assert js["layers"] == {"M": 9, "G1": 9, "G2": 9, "H1": 9}
    feats = js["features"]
    assert len(feats) == 5 and [f["delta"] for f in feats] == sorted((f["delta"] for f in feats), reverse=True)
    for f in feats:
        assert set(f) == {"feature", "delta", "mass", "rho", "match"}
        assert set(f["rho"]) == set(f["match"]) == {"G1", "G2", "H1"}
        g = min(f["rho"]["G1"], f["rho"]["G2"])
        assert f["delta"] == pytest.approx(f["mass"] * (g ** 2 - f["rho"]["H1"] ** 2), rel=1e-9, abs=1e-9)
        assert str(f["feature"]) in text


def _incomplete(root):
    meta = json.loads((root / "B" / "run.json").read_text())
    (root / "B" / "run.json").write_text(json.dumps({**meta, "complete": False}))


def _other_dataset(root, data):
    (_, _), (acts_b, st_b) = data
    make_run(root, "B", acts_b, st_b, K, fingerprint="another", overwrite=True)


def _corrupt_acts(root):
    (root / "B" / "layer03.acts.npy").write_bytes(b"not numpy")


def _corrupt_sae(root):
    (root / "B" / "layer03.sae.safetensors").write_bytes(b"\x00" * 40)


WMPPC_BAD = [
    (["--source", "A", "--target", "nope"], None, "no run 'nope'"),
    (["--source", "A", "--target", "B"], _incomplete, "incomplete"),
    (["--source", "A", "--target", "B"], "other", "different datasets"),
    (["--source", "A", "--target", "B", "--codes", "dense"], None, "unknown --codes"),
    (["--source", "A", "--target", "B", "--no_cache"], _corrupt_acts, "corrupt"),
    (["--source", "A", "--target", "B", "--no_cache"], _corrupt_sae, "corrupt"),
    (["--source", "A"], None, "--source A --target B"),
    (["--runs", "A"], None, "at least two"),
    (["--runs", "A", "B", "A"], None, "twice"),
    (["--source", "A", "--target", "B", "--json", "/nonexistent/dir/x.json"], None, "does not exist"),
    (["--source", "A", "--target", "B", "--device", "gpu0"], None, "unknown --device"),
    (["--source", "A", "--target", "B", "--chunk_size", "many"], None, "invalid int value: 'many'"),
]


@pytest.mark.parametrize("argv,setup,needle", WMPPC_BAD)
def test_wmppc_bad_input(runs, tmp_path, data, error_line, argv, setup, needle):
    if setup == "other":
        _other_dataset(tmp_path, data)
    elif setup:
        setup(tmp_path)
    assert needle in error_line(wmppc.main, ["--root", str(tmp_path), *argv])


CS_BAD = [
    (["--min_group", "G1", "--max_group", "H1"], "--source is required"),
    (["--source", "M", "--min_group", "--max_group", "H1"], "--min_group is empty"),
    (["--source", "M", "--min_group", "G1"], "--max_group is empty"),
    (["--source", "M", "--min_group", "G1", "M", "--max_group", "H1"], "its own --min_group"),
    (["--source", "M", "--min_group", "G1", "--max_group", "M"], "its own --max_group"),
    (["--source", "M", "--min_group", "G1", "--max_group", "G1"], "in both"),
    (["--source", "M", "--min_group", "G1", "--max_group", "nope"], "no run 'nope'"),
    (["--source", "M", "--min_group", "G1", "--max_group", "H1", "--codes", "x"], "unknown --codes"),
    (["--source", "M", "--min_group", "G1", "--max_group", "H1", "--top", "0"], "--top"),
    (["--source", "M", "--min_group", "G1", "--max_group", "H1", "--topp", "3"], "unrecognized arguments: --topp"),
]


@pytest.mark.parametrize("argv,needle", CS_BAD)
def test_comp_sharedness_bad_input(four_runs, tmp_path, error_line, argv, needle):
    assert needle in error_line(comp_sharedness.main, ["--root", str(tmp_path), *argv])


def test_comp_sharedness_incomplete_and_other_dataset(four_runs, tmp_path, error_line):
    meta_path = tmp_path / "H1" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "complete": False}))
    argv = ["--root", str(tmp_path), "--source", "M", "--min_group", "G1", "--max_group", "H1"]
    assert "incomplete" in error_line(comp_sharedness.main, argv)
    meta_path.write_text(json.dumps({**meta, "dataset": {**meta["dataset"], "fingerprint": "x"}}))
    assert "different datasets" in error_line(comp_sharedness.main, argv)


def test_top_default_is_one_percent(four_runs):
    r = four_runs
    res = comp_sharedness.comp_sharedness(r["M"], [r["G1"]], [r["H1"]], engine("relu"))
    assert len(comp_sharedness.top_features(res).features) == math.ceil(48 / 100)
    assert len(comp_sharedness.top_features(res, 1000).features) == 48
