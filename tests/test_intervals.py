"""The jackknife interval and bias correction on the simulation of bench/bench_intervals.py
(docs/design.md#calibration), small and seeded so that it cannot flake: the interval covers the population
value, the correction removes the small-sample bias, and the order rows are stored in does not matter."""
from __future__ import annotations

import numpy as np
import pytest

from bench.bench_intervals import make_world, one_dataset, population_value, summarise


@pytest.fixture(scope="module")
def world():
    return make_world(0)


def test_interval_covers_and_correction_removes_bias(world, tmp_path):
    """Top-k codes at N = 300, where a maximum over correlations is most biased upward."""
    truth = population_value(world, "topk", 400_000)
    rng = np.random.default_rng(3)
    s = summarise([one_dataset(world, "topk", 300, "random", rng, tmp_path) for _ in range(60)], truth)
    assert s["coverage"] >= 0.9, s
    assert s["bias_raw"] > 0.3 * s["spread"], s  # the bias is there to correct, and the correction removes most of it
    assert abs(s["bias_corrected"]) < 0.4 * abs(s["bias_raw"]), s
    assert 0.8 <= s["width"] <= 1.4, s


def test_class_sorted_rows_give_the_interval_of_shuffled_rows(world, tmp_path):
    """The same datasets stored in random and in class-sorted order: blocks of stored rows made the sorted
    intervals several times wider; blocks drawn by a seeded permutation give the same widths."""
    widths = {}
    for order in ("random", "sorted"):
        rng = np.random.default_rng(5)  # the same datasets in both orders
        widths[order] = np.mean([np.diff(one_dataset(world, "relu", 600, order, rng, tmp_path).ci.all_layers)[0]
                                 for _ in range(16)])
    assert 0.8 < widths["sorted"] / widths["random"] < 1.25, widths
