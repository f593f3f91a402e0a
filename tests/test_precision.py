"""--precision (docs/design.md#scale): tensor-core products, then every feature's best match re-checked exactly,
give the
fp32 path's rho (to 1e-5) and match, also where the approximate products rank two near-tied features the
wrong way round."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import wmppc
from saeshare.engine import dense as corr_dense
from synthetic import engine, make_run, random_sae_state

N = 600


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N, 6)).astype(np.float32)
    acts = lambda d, s: (z @ np.random.default_rng(s).normal(size=(6, d)) + rng.normal(size=(N, d))).astype(np.float32)  # noqa: E731
    a = make_run(tmp_path, "A", {0: acts(10, 1), 1: acts(14, 2)},
                 {0: random_sae_state(10, 40, 1), 1: random_sae_state(14, 56, 2)})
    b = make_run(tmp_path, "B", {0: acts(12, 3), 1: acts(8, 4)},
                 {0: random_sae_state(12, 48, 3), 1: random_sae_state(8, 32, 4)})
    return a, b


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("mem_gb", [1.0, 2e-6])  # one group, or many groups of each layer
def test_same_rho_and_match_as_fp32(pair, precision, mem_gb):
    a, b = pair
    want = engine(no_cache=True, mem_gb=mem_gb).pair_stats(a, b)
    got = engine(no_cache=True, mem_gb=mem_gb, precision=precision).pair_stats(a, b)
    for p in want:
        np.testing.assert_allclose(got[p].rho_F, want[p].rho_F, atol=1e-5)
        np.testing.assert_array_equal(got[p].match_F, want[p].match_F)
        np.testing.assert_array_equal(got[p].mass_F, want[p].mass_F)


def _near_tie(seed: int):
    """A feature of A and two of B whose exact correlations with it differ by ~1e-4 (centred, float32)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=4000)
    b = x[:, None] + rng.normal(size=(4000, 2))
    b[:, 1] = b[:, 0] + 0.02 * rng.normal(size=4000)
    a_n1 = torch.tensor(x - x.mean(), dtype=torch.float32)[:, None]
    b_n2 = torch.tensor(b - b.mean(0), dtype=torch.float32)
    inv_a, inv_b = 1 / a_n1.double().norm(dim=0), 1 / b_n2.double().norm(dim=0)
    exact = (a_n1.double().T @ b_n2.double()) * inv_a[:, None] * inv_b[None, :]
    acc = torch.empty(1, 1, 2)
    corr_dense.cross(acc, [(0, a_n1, b_n2)], "bf16")
    return exact, corr_dense.correlations(acc[0], inv_a.float(), inv_b.float()), inv_a.float()


def test_recheck_fixes_a_near_tie_that_bf16_gets_wrong():
    """bf16 products rank two near-tied features of B the wrong way round; the re-check picks the right one
    and gives its exact value."""
    exact, approx, inv_a = next(t for t in map(_near_tie, range(200)) if t[0].argmax() != t[1].argmax())
    right = int(exact.argmax())
    assert (exact[0, 1] - exact[0, 0]).abs() < 2 * corr_dense.product_error("bf16")
    group_a, group_b = [corr_dense.Unit(0, 0, 1)], [corr_dense.Unit(0, 0, 2)]
    best = {(0, 0): (torch.full((1,), -np.inf), torch.zeros(1, dtype=torch.long))}
    corr_dense.update_best(best, approx, group_a, group_b)
    assert best[0, 0][1].item() != right
    check = corr_dense.Recheck("bf16")
    check.collect(best, approx, group_a, group_b, inv_a)
    check.resolve(best, lambda cands: {p: exact[ia, jb] for p, (ia, jb) in cands.items()})
    assert best[0, 0][1].item() == right and best[0, 0][0].item() == pytest.approx(exact[0, right].item(), abs=1e-7)


def test_precision_refuses_the_jackknife_and_the_sparse_path(pair, error_line):
    root = str(pair[0].path.parent)
    for extra in (["--ci"], ["--codes", "topk"]):
        line = error_line(wmppc.main, ["--root", root, "--source", "A", "--target", "B", "--precision", "bf16", *extra])
        assert "--precision bf16 is for the dense path" in line
