"""Calibration (docs/design.md#calibration): the jackknife against a brute-force recomputation without each block, the
permutation floor, SAE seeds and ceilings, random re-initialisation, SAEs trained on the pooled tokens,
the pooled-fit warning and the bad input of all of these."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import train_text
import wmppc
import wrappedmodels
from saeshare.core.options import parse
from saeshare.disk import runs as runs_mod
from saeshare.disk.runs import Run, null_permutation
from saeshare.engine import dense as corr_dense
from saeshare.engine.correlator import JACKKNIFE_BLOCKS, Correlator, jackknife_blocks
from saeshare.engine.options import EngineOptions
from synthetic import engine, make_run
from test_wmppc import K, N, data, ref_codes, ref_corr, ref_weighted, runs  # noqa: F401 (fixtures)
from tiny_models import checkpoint_for

J = JACKKNIFE_BLOCKS


def blocks_of(n):
    """Contiguous blocks: the kernels take any partition of the samples."""
    bounds = [round(j * n / J) for j in range(J + 1)]
    return [np.arange(bounds[j], bounds[j + 1]) for j in range(J)]


def test_jackknife_kernels_equal_brute_force_without_each_block():
    """float64 through the dense kernels: the leave-one-block-out correlations, maxima and masses
    equal a recomputation on the samples outside each block to 1e-9."""
    rng = np.random.default_rng(0)
    n, fa, fb = 230, 9, 7
    z = rng.normal(size=(n, 3))
    x = np.maximum(z @ rng.normal(size=(3, fa)) + rng.normal(size=(n, fa)) - 0.5, 0)
    y = np.maximum(z @ rng.normal(size=(3, fb)) + rng.normal(size=(n, fb)) - 0.5, 0)
    x[:, 0] = 0.0  # dead
    x[:23, 1] = 0.0  # active only outside block 0
    y[:, 2] = 1.5  # constant
    segs = [(j, s, min(s + 6, b[-1] + 1)) for j, b in enumerate(blocks_of(n)) for s in range(b[0], b[-1] + 1, 6)]
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    scratch = torch.empty(6 * max(fa, fb), dtype=torch.float64)
    full_x, bx = corr_dense.moments(((j, X[s:e]) for j, s, e in segs), fa, J, scratch)
    full_y, by = corr_dense.moments(((j, Y[s:e]) for j, s, e in segs), fb, J, scratch)
    loo_x, loo_y = corr_dense.leave_one_out(bx, full_x.inv_F == 0), corr_dense.leave_one_out(by, full_y.inv_F == 0)
    acc = corr_dense.cross(torch.empty(J, fa, fb, dtype=torch.float64),
                           ((j, X[s:e] - full_x.mean_F, Y[s:e] - full_y.mean_F) for j, s, e in segs))
    total = acc.sum(0)
    count_J = bx.count_J.sum() - bx.count_J
    for j, block in enumerate(blocks_of(n)):
        keep = np.setdiff1d(np.arange(n), block)
        cov = corr_dense.without_block(torch.empty(fa, fb, dtype=torch.float64), total, acc[j],
                                       loo_x.mean_F[j] - full_x.mean_F, loo_y.mean_F[j] - full_y.mean_F,
                                       float(count_J[j]))
        corr = corr_dense.correlations(cov, loo_x.inv_F[j], loo_y.inv_F[j]).numpy()
        ref = ref_corr(x[keep], y[keep])
        np.testing.assert_allclose(corr, ref, atol=1e-9, rtol=0)
        np.testing.assert_allclose(corr.max(1), ref.max(1), atol=1e-9, rtol=0)
        np.testing.assert_allclose(loo_x.mass_F[j].numpy(), x[keep].sum(0), atol=1e-9, rtol=1e-12)
    np.testing.assert_allclose(corr_dense.correlations(total.clone(), full_x.inv_F, full_y.inv_F).numpy(),
                               ref_corr(x, y), atol=1e-9, rtol=0)


def test_engine_jackknife_and_interval(runs, tmp_path):
    run_a, run_b = runs
    eng = Correlator(EngineOptions(codes="relu", device="cpu", chunk_size=64, no_cache=True), jackknife=True)
    stats = eng.pair_stats(run_a, run_b)
    a, b = run_a.layers[-1], run_b.layers[-1]
    X, Y = ref_codes(run_a, a, "relu"), ref_codes(run_b, b, "relu")
    w_J = []
    blocks = jackknife_blocks(N)
    assert sorted(np.concatenate(blocks).tolist()) == list(range(N))  # a partition of the samples,
    assert not np.array_equal(blocks[0], np.arange(len(blocks[0])))  # not of stored rows in order
    for j, block in enumerate(blocks):
        keep = np.setdiff1d(np.arange(N), block)
        rho = ref_corr(X[keep], Y[keep]).max(1)
        np.testing.assert_allclose(stats[a, b].rho_JF[j], rho, atol=1e-5, rtol=0)
        np.testing.assert_allclose(stats[a, b].mass_JF[j], X[keep].sum(0), rtol=1e-5)
        w_J.append(ref_weighted(rho, X[keep].sum(0)))
    res = wmppc.wmppc(run_a, run_b, eng)
    se = np.sqrt((J - 1) / J * np.sum((np.array(w_J) - np.mean(w_J)) ** 2))
    corrected = J * ref_weighted(ref_corr(X, Y).max(1), X.sum(0)) - (J - 1) * np.mean(w_J)
    t9 = 2.2621571628  # the 0.975 quantile of Student's t with 9 degrees of freedom
    assert res.se.last_layer == pytest.approx(se, abs=1e-6)
    assert res.corrected.last_layer == pytest.approx(corrected, abs=1e-5)
    half = t9 * np.hypot(se, corrected - res.last_layer)
    np.testing.assert_allclose(res.ci.last_layer, [corrected - half, corrected + half], atol=1e-5)
    assert res.ci.layer_matrix.shape == (3, 2, 2)
    assert res.ci.all_layers[0] < res.corrected.all_layers < res.ci.all_layers[1]
    plain = wmppc.wmppc(run_a, run_b, engine("relu", no_cache=True))
    assert res.all_layers == pytest.approx(plain.all_layers, abs=1e-6)  # the blocks do not change the score


def test_floor_equals_a_run_with_permuted_samples(runs, data, tmp_path):
    run_a, run_b = runs
    (_, _), (acts_b, st_b) = data
    perm = null_permutation(N)
    shuffled = make_run(tmp_path / "other", "B", {k: v[perm] for k, v in acts_b.items()}, st_b, K)
    make_run(tmp_path / "other", "A", {k: np.asarray(run_a.acts(k)) for k in run_a.layers},
             {k: {n: t for n, t in run_a.sae(k).state().items()} for k in run_a.layers}, K)
    null = wmppc.wmppc(run_a, run_b.permuted(), engine("relu"))
    ref = wmppc.wmppc(Run.open(tmp_path / "other", "A"), shuffled, engine("relu"))
    assert null.all_layers == pytest.approx(ref.all_layers, abs=1e-6)
    assert null.target == "B (permuted)" and null.all_layers < wmppc.wmppc(run_a, run_b, engine("relu")).all_layers
    assert len(list((tmp_path / ".cache").glob("*~perm0*"))) == 6  # the null is cached apart


def test_wmppc_cli_ci_and_calibrate(runs, tmp_path, capsys):
    out = tmp_path / "w.json"
    wmppc.main(["--root", str(tmp_path), "--source", "A", "--target", "B", "--ci", "--calibrate", "--json", str(out)])
    line = capsys.readouterr().out
    js = json.loads(out.read_text())
    assert set(js["ci"]) == {"all_layers", "last_layer", "layer_matrix"} and "ceiling" not in js  # one seed
    assert set(js["floor"]) == {"all_layers", "last_layer", "corrected"}
    assert js["floor"]["all_layers"] < js["all_layers"]
    assert (f"All Layers : {js['all_layers']:.4f}, corrected {js['corrected']['all_layers']:.4f} "
            f"[{js['ci']['all_layers'][0]:.4f}" in line and "floor" in line)
    assert js["floor"]["corrected"]["all_layers"] < js["corrected"]["all_layers"]  # the floor corrected too
    wmppc.main(["--root", str(tmp_path), "--source", "A", "--target", "B", "--null", "permute", "--json", str(out)])
    assert json.loads(out.read_text())["all_layers"] == pytest.approx(js["floor"]["all_layers"], abs=1e-6)


def test_too_few_samples_per_block(tmp_path, error_line):
    rng = np.random.default_rng(0)
    from synthetic import random_sae_state
    for name in ("A", "B"):
        make_run(tmp_path, name, {0: rng.normal(size=(99, 4)).astype(np.float32)}, {0: random_sae_state(4, 8)})
    assert "at least 10 samples per block" in error_line(
        wmppc.main, ["--root", str(tmp_path), "--source", "A", "--target", "B", "--ci"])


def test_sae_warnings_one_line_per_run(runs, tmp_path, capsys):
    path = tmp_path / "A" / "run.json"
    meta = json.loads(path.read_text())
    for layer, info in meta["layer_info"].items():
        info["fvu_pooled"] = 3.5 if layer == "2" else 0.2
    path.write_text(json.dumps(meta))
    runs_mod._warned.clear()
    for _ in range(2):
        wmppc.main(["--root", str(tmp_path), "--source", "A", "--target", "B"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: run 'A'")]
    assert len(lines) == 1 and "(fvu_pooled 3.50) at layer 2," in lines[0]
    argv = ["--root", str(tmp_path), "--source", "A", "--target", "B", "--verbose"]
    wmppc.main([*argv, "--json", str(tmp_path / "w.json")])
    assert [line for line in capsys.readouterr().err.splitlines() if "worse than its mean" in line] == []  # once
    runs_mod._warned.clear()
    wmppc.main(argv)
    per_layer = [line for line in capsys.readouterr().err.splitlines() if "worse than its mean" in line]
    assert per_layer == ["warning: run 'A' layer 2: the SAE reconstructs the recorded pooled token worse than its mean "
                         "(fvu_pooled 3.50 > 1)"]
    assert per_layer[0].removeprefix("warning: ") in json.loads((tmp_path / "w.json").read_text())["warnings"]


# ---- training: seeds, random init, pooled tokens -------------------------------------------------------
def train(root, ckpt, name, *extra):
    train_text.main(["--model", "Bert", "--bert_model_name", ckpt, "--runname", name, "--root", str(root),
                     "--max_samples", "40", "--batch_size", "8", "--expansion_factor", "2", "--top_k", "4",
                     "--layers", "1", *extra])
    return Run.open(root, name)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return checkpoint_for("Bert", tmp_path_factory.mktemp("ckpt"))


def test_seeds_share_the_pass_and_give_a_ceiling(tmp_path, bert, capsys, error_line):
    run = train(tmp_path, bert, "s", "--seeds", "0", "1", "--lr", "1e-3")
    one = train(tmp_path, bert, "one", "--lr", "1e-3")
    assert (run.path / "layer01.sae.safetensors").is_file() and (run.path / "layer01.seed1.sae.safetensors").is_file()
    meta = json.loads((run.path / "run.json").read_text())
    assert meta["sae"]["seeds"] == [0, 1] and set(meta["layer_info"]["1"]["per_seed"]) == {"0", "1"}
    # the first seed is the one-seed run: same batches, same initialisation (stepped with the other seed in one
    # batched step, which on the CPU is its own step bit for bit)
    assert all(torch.equal(run.sae(1).state()[name], w) for name, w in one.sae(1).state().items())
    other = Run.open(tmp_path, "s@1")
    assert other.name == "s@1" and not torch.equal(other.sae(1).W_enc, run.sae(1).W_enc)
    np.testing.assert_array_equal(other.acts(1), run.acts(1))  # one encoder pass
    capsys.readouterr()
    wmppc.main(["--root", str(tmp_path), "--source", "s", "--target", "one", "--calibrate"])
    assert "ceiling" in capsys.readouterr().out
    res = wmppc.calibrated(run, one, engine("relu"))
    assert res.ceiling.all_layers == pytest.approx(wmppc.wmppc(run, other, engine("relu")).all_layers)
    assert "no seed 5" in error_line(wmppc.main, ["--root", str(tmp_path), "--source", "s@5", "--target", "one"])
    assert "whole number" in error_line(wmppc.main, ["--root", str(tmp_path), "--source", "s@x", "--target", "one"])


def test_sae_tokens_pooled(tmp_path, bert, error_line):
    run = train(tmp_path, bert, "p", "--sae_tokens", "pooled", "--sae_epochs", "3", "--lr", "1e-3")
    everything = train(tmp_path, bert, "a", "--lr", "1e-3")
    info = run.meta.layer_info[1]
    assert info.tokens_seen == 3 * 40 and run.meta.sae.sae_tokens == "pooled"
    assert info.fvu_pooled < everything.meta.layer_info[1].fvu_pooled  # fitted to the tokens analysed
    base = ["--model", "Bert", "--bert_model_name", bert, "--runname", "z", "--root", str(tmp_path)]
    assert "at least 2 samples" in error_line(train_text.main, [*base, "--max_samples", "1", "--sae_tokens", "pooled"])
    assert "--sae_epochs goes with --sae_tokens pooled" in error_line(train_text.main, [*base, "--sae_epochs", "2"])


@pytest.mark.parametrize("family", sorted(wrappedmodels.ENCODERS))
def test_random_init_every_family(family, tmp_path):
    ckpt = checkpoint_for(family, tmp_path)
    trained = wrappedmodels.ENCODERS[family](ckpt)
    a, b = wrappedmodels.ENCODERS[family](ckpt), wrappedmodels.ENCODERS[family](ckpt)
    a.reinitialise(3)
    b.reinitialise(3)
    pa, pb, pt = (dict(e.model.named_parameters()) for e in (a, b, trained))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)  # deterministic in the seed
    same = [k for k in pa if torch.equal(pa[k], pt[k])]
    # only what a reset leaves as it was in the (random) checkpoint: constant norm weights and biases
    assert all(pt[k].unique().numel() == 1 for k in same), same
    assert len(same) <= len(pa) / 2
    assert [p.shape for p in pa.values()] == [p.shape for p in pt.values()]


def test_permutation_null_is_not_the_shuffled_captions_permutation():
    import data

    for seed in range(3):
        shuffled = data.load_dataset("shapes", max_samples=500, shuffle_captions=seed).perm_N
        assert (null_permutation(500) != shuffled).mean() > 0.9


def test_shuffled_pass_keeps_rows_paired_and_trains_in_a_seeded_order(tmp_path, bert, monkeypatch):
    from saeshare.training import steps as train_module
    seen = []
    getitem = train_module.Samples.__getitem__
    monkeypatch.setattr(train_module.Samples, "__getitem__", lambda self, i: seen.append(i) or getitem(self, i))
    ordered = train(tmp_path, bert, "ordered", "--no_shuffle", "--batch_size", "1")
    assert seen == list(range(40))
    seen.clear()
    shuffled = train(tmp_path, bert, "shuffled", "--batch_size", "1", "--seed", "3")
    assert seen == np.random.default_rng(3).permutation(40).tolist()  # the SAE's order: seeded
    np.testing.assert_array_equal(shuffled.acts(1), ordered.acts(1))  # row n is still sample n
    assert shuffled.meta.sae.shuffle and not ordered.meta.sae.shuffle
    batched = train(tmp_path, bert, "batched", "--batch_size", "8")
    np.testing.assert_allclose(batched.acts(1), ordered.acts(1), rtol=1e-5, atol=1e-5)


# ---- record.py: a run's encoder and SAEs on other samples ----------------------------------------------
def test_record_reproduces_the_runs_own_samples_and_records_held_out_ones(tmp_path, bert, error_line):
    import record

    run = train(tmp_path, bert, "src", "--seeds", "0", "1")
    base = ["--root", str(tmp_path), "--run", "src"]
    again = record.record(parse(record.RecordArgs, [*base, "--runname", "same", "--max_samples", "40"], ""))
    np.testing.assert_array_equal(again.acts(1), run.acts(1))  # exactly: same order, same batches
    assert again.meta.sae_from == "src" and again.fingerprint == run.fingerprint
    assert torch.equal(again.with_seed(1).sae(1).W_enc, run.with_seed(1).sae(1).W_enc)
    assert again.meta.layer_info[1].fvu_pooled == pytest.approx(run.meta.layer_info[1].fvu_pooled, rel=1e-6)
    held = record.record(parse(record.RecordArgs, [*base, "--runname", "held", "--offset", "40",
                                                          "--max_samples", "12", "--exclude", "shape=star"], ""))
    ids = held.meta.dataset
    assert held.n_samples == 12 and ids.offset == 40 and ids.exclude == ["shape=star"]
    import data

    ds = data.from_description(ids)
    assert all(int(i.split("/")[1]) >= 40 for i in ds.sample_ids)
    assert not any(s["shape"] == "star" for n in range(12) for s in ds.attributes(n)["shapes"])
    assert "empty set" in error_line(record.main, [*base, "--runname", "x", "--where", "shape=star",
                                                   "--exclude", "shape=star", "--max_samples", "5"])
    assert "unknown shapes attribute 'shape=hexagon'" in error_line(record.main, [*base, "--runname", "x", "--where",
                                                                                  "shape=hexagon"])
    held_args = parse(record.RecordArgs, [*base, "--runname", "held", "--offset", "40", "--max_samples", "12",
                                                 "--exclude", "shape=star"], "")
    assert record.recorded_run(held_args).meta.run_id == held.meta.run_id
    assert record.recorded_run(dataclasses.replace(held_args, offset=41)) is None  # other samples
    import probe

    train(tmp_path, bert, "src", "--seeds", "0", "1", "--overwrite")  # the source trained again: "held" is stale
    assert record.recorded_run(held_args) is None
    assert "trained again since" in error_line(probe.main, [*base, "--test_run", "held", "--labels", "red"])


def test_training_on_a_filtered_set(tmp_path, bert):
    import data

    run = train(tmp_path, bert, "circles", "--where", "shape=circle", "--offset", "100")
    ds = data.from_description(run.meta.dataset)
    assert run.meta.dataset.where == ["shape=circle"] and run.meta.dataset.offset == 100 and len(ds) == 40
    assert all(any(s["shape"] == "circle" for s in ds.attributes(n)["shapes"]) for n in range(40))
    assert all("circle" in ds.caption(n) for n in range(40))
