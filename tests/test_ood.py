"""ood.py (docs/design.md#probes): the detection metrics on hand-worked cases, every score on a planted shift, and
the sets that must come from the same SAEs."""
from __future__ import annotations

import json

import numpy as np
import pytest

import data
import ood
from synthetic import make_run, random_sae_state

N, D = 300, 10


def test_metrics_on_hand_worked_cases():
    sep = ood.detection(np.array([0.0, 1, 2]), np.array([5.0, 6]))
    assert sep == (1.0, 0.0, 1.0, 1.0)
    same = ood.detection(np.arange(10.0), np.arange(10.0))
    assert same.auroc == 0.5
    # 95% of 20 in-distribution scores (0..19) are <= 18; one of the 4 OOD scores (10.5) is too
    assert ood.detection(np.arange(20.0), np.array([10.5, 30, 40, 50])).fpr95 == 0.25


@pytest.fixture
def runs(tmp_path):
    rng = np.random.default_rng(0)
    states = {0: random_sae_state(D, 4 * D, seed=1)}
    for name, offset, shift in (("R", 0, 0.0), ("T", N, 0.0), ("O", 2 * N, 4.0)):
        ds = data.load_dataset("shapes", max_samples=N, offset=offset or None)
        x = (rng.normal(size=(N, D)) + shift).astype(np.float32)
        make_run(tmp_path, name, {0: x}, states, dataset=ds.describe())
        if name != "R":
            path = tmp_path / name / "run.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "sae_from": "R"}))
    return tmp_path


def test_a_shifted_set_is_detected_and_a_same_one_is_not(runs, tmp_path, capsys):
    ood.main(["--root", str(runs), "--id", "T", "--ood", "O", "--json", str(tmp_path / "o.json"),
              "--plot", str(tmp_path / "o.png")])
    js = json.loads((tmp_path / "o.json").read_text())
    for score in ("mahalanobis", "recon_error"):
        assert js["metrics"][score]["auroc"][0] > 0.95, score
    assert js["metrics"]["knn_codes"]["auroc"][0] > 0.55 and js["metrics"]["knn_raw"]["auroc"][0] > 0.55
    # a mean shift raises every code: low energy / low max call the in-distribution set the outlier
    assert js["metrics"]["low_energy"]["auroc"][0] < 0.05 and js["metrics"]["low_max"]["auroc"][0] < 0.05
    assert "AUROC per layer" in capsys.readouterr().out and (tmp_path / "o.png").stat().st_size > 5000
    fit, t = ood.Run.open(runs, "R"), ood.Run.open(runs, "T")
    res, _ = ood.ood(fit, t, ood.Run.open(runs, "T"), 10, "cpu")
    assert abs(res.metrics["mahalanobis"]["auroc"][0] - 0.5) < 1e-9  # the same set against itself


def test_sets_from_other_saes_are_refused(runs, error_line):
    make_run(runs, "X", {0: np.zeros((N, D), np.float32) + np.arange(N)[:, None]},
             {0: random_sae_state(D, 4 * D, seed=9)})
    assert "must both be recorded (record.py) from the same run" in error_line(
        ood.main, ["--root", str(runs), "--id", "T", "--ood", "X"])


def test_chunked_sparse_scores_equal_dense_ones(runs):
    """Scores streamed in chunks with sparse top-k codes (memory N k) equal those of whole dense arrays."""
    import torch
    from sklearn.neighbors import NearestNeighbors

    run = ood.Run.open(runs, "O")
    sae = run.sae(0)
    got = ood.sae_scores(run, 0, sae, 64, "cpu")
    x = run.read_acts(0, slice(None))
    dense = run.dense_codes(0, "topk").numpy()
    np.testing.assert_array_equal(got.codes.toarray(), dense)
    with torch.no_grad():
        np.testing.assert_allclose(got.energy, sae.pre_acts(x).sum(1).numpy(), rtol=1e-5)
        np.testing.assert_allclose(got.recon_error, (x - sae(x).x_hat).square().sum(1).numpy(), rtol=1e-4)
    want = NearestNeighbors(n_neighbors=4, metric="cosine").fit(dense).kneighbors(dense)[0][:, -1]
    np.testing.assert_allclose(ood._knn_distance(got.codes, got.codes, 3, True), want, atol=1e-6)
