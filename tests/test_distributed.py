"""torchrun (docs/design.md#scale): two gloo processes on the CPU give what one process gives, bitwise; a rerun computes
only what is missing from the cache; a failing rank ends every rank with one error line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from saeshare.core import distributed
from saeshare.disk.runs import Run
from synthetic import make_run, random_sae_state
from tiny_models import checkpoint_for

REPO = Path(__file__).resolve().parents[1]
N = 300
WIDTHS = {"A": (8, 12, 6), "B": (10, 5), "C": (7, 9, 4)}
"""d of each layer of each run: uneven costs, so that the two ranks get different shares."""


def _runs(root: Path) -> None:
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(N, 4))
    for name, widths in WIDTHS.items():
        acts = {layer: np.concatenate([shared, rng.normal(size=(N, d - 4 if d > 4 else 0))], 1)[:, :d]
                .astype(np.float32) + 0.3 * rng.normal(size=(N, d)).astype(np.float32)
                for layer, d in enumerate(widths)}
        make_run(root, name, acts, {layer: random_sae_state(d, 4 * d, seed=10 * len(name) + layer)
                                    for layer, d in enumerate(widths)}, fingerprint="dist")


def _launch(script: str, args: list[str], procs: int, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    head = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
            if procs > 1 else [sys.executable])
    return subprocess.run([*head, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_close(got, want, path: str = "") -> None:
    """Two parsed JSON files equal, their numbers to 1e-9."""
    if isinstance(want, dict):
        assert set(got) == set(want), path
        for k in want:
            _assert_close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-9), path
    else:
        assert got == want, path


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    _runs(one)
    for run in WIDTHS:
        shutil.copytree(one / run, two / run)  # the same runs (same run_id), caches apart
    return one, two


def test_share_is_balanced_longest_first(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    costs = [5, 1, 4, 3, 3]
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.share(costs))
    assert shares == [[0, 4], [1, 2, 3]]  # 5 -> r0, 4 -> r1, 3 -> r1 (4 < 5), 3 -> r0 (5 < 7), 1 -> r1: 8, 8
    assert sorted(shares[0] + shares[1]) == list(range(len(costs)))


@pytest.mark.slow
def test_two_ranks_equal_one_process_and_resume(roots, tmp_path):
    one, two = roots
    args = ["--runs", *WIDTHS, "--ci", "--calibrate", "--device", "cpu"]
    single = _launch("wmppc.py", ["--root", str(one), *args, "--json", str(tmp_path / "one.json")], 1)
    assert single.returncode == 0, single.stderr
    double = _launch("wmppc.py", ["--root", str(two), *args, "--json", str(tmp_path / "two.json")], 2)
    assert double.returncode == 0, double.stderr
    assert (tmp_path / "one.json").read_text() == (tmp_path / "two.json").read_text()  # bitwise
    assert double.stdout.count("All layers (row -> column)") == 1  # rank 0 alone prints

    entries = sorted((two / ".cache").glob("corr-*.npz"))
    dropped, kept = entries[::3], entries[1::3]
    stamp = {p: p.stat().st_mtime_ns for p in kept}
    for p in dropped:
        p.unlink()
    again = _launch("wmppc.py", ["--root", str(two), *args, "--json", str(tmp_path / "again.json")], 2)
    assert again.returncode == 0, again.stderr
    assert all(p.is_file() for p in dropped) and all(p.stat().st_mtime_ns == stamp[p] for p in kept)
    # recomputing a part of the matrix packs its layers into other groups: a few products round differently
    # (the corrected floors read every block's maxima), so equal to 1e-9, not bitwise
    _assert_close(json.loads((tmp_path / "again.json").read_text()), json.loads((tmp_path / "one.json").read_text()))

    sim_args = ["--runs", *WIDTHS, "--device", "cpu", "--k", "5"]
    s1 = _launch("similarity.py", ["--root", str(one), *sim_args, "--json", str(tmp_path / "s1.json")], 1)
    s2 = _launch("similarity.py", ["--root", str(two), *sim_args, "--json", str(tmp_path / "s2.json")], 2)
    assert s1.returncode == 0 and s2.returncode == 0, s1.stderr + s2.stderr
    assert json.loads((tmp_path / "s1.json").read_text()) == json.loads((tmp_path / "s2.json").read_text())


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank_with_one_error_line(roots, tmp_path):
    _, two = roots
    bad = tmp_path / "bad"
    for run in WIDTHS:
        shutil.copytree(two / run, bad / run)
    # A's layers cost 8, 12, 6 (x the same B): rank 0 takes layer 1, rank 1 layers 0 and 2
    (bad / "A" / "layer02.acts.npy").write_bytes(b"not an array")
    t0 = time.perf_counter()
    res = _launch("wmppc.py", ["--root", str(bad), "--source", "A", "--target", "B", "--device", "cpu"], 2, timeout=120)
    assert time.perf_counter() - t0 < 60 and res.returncode != 0
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "corrupt" in errors[0] and "layer02.acts.npy" in errors[0]
    same = _launch("wmppc.py", ["--root", str(bad), "--source", "A", "--target", "nope", "--device", "cpu"], 2,
                   timeout=120)
    errors = [line for line in (same.stdout + same.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no run 'nope'" in errors[0]  # every rank meets it: printed once


@pytest.mark.slow
def test_training_on_two_ranks_is_one_process_training(tmp_path):
    """Each batch split across the ranks for the encoder, each layer's SAEs (two seeds) on one rank: the
    same run as one process, up to the encoder's float rounding on smaller batches."""
    ckpt = checkpoint_for("Bert", tmp_path / "ckpt")
    args = ["--model", "Bert", "--bert_model_name", ckpt, "--root", str(tmp_path), "--max_samples", "37",
            "--batch_size", "8", "--expansion_factor", "2", "--top_k", "4", "--layers", "0", "1", "--seeds", "0", "1",
            "--lr", "1e-3", "--device", "cpu"]
    one = _launch("train_text.py", [*args, "--runname", "one"], 1)
    two = _launch("train_text.py", [*args, "--runname", "two"], 2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert two.stdout.count("wrote") == 1  # rank 0 alone reports
    a, b = Run.open(tmp_path, "one"), Run.open(tmp_path, "two")
    assert a.meta.dataset == b.meta.dataset and a.meta.sae == b.meta.sae and a.layers == b.layers == [0, 1]
    for layer in a.layers:
        np.testing.assert_allclose(b.acts(layer), a.acts(layer), rtol=1e-5, atol=1e-5)
        for seed in (0, 1):
            for name, w in a.with_seed(seed).sae(layer).state().items():
                np.testing.assert_allclose(b.with_seed(seed).sae(layer).state()[name], w, rtol=1e-4, atol=1e-5)
        assert a.meta.layer_info[layer].tokens_seen == b.meta.layer_info[layer].tokens_seen
        assert a.meta.layer_info[layer].fvu == pytest.approx(b.meta.layer_info[layer].fvu, rel=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
