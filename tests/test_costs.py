"""costs.py (docs/design.md#scale): the counts behind `study.py --dry_run` and bench/cost.py, against hand-worked
cases."""
from __future__ import annotations

import pytest

import data
from saeshare.engine import costs
from saeshare.training.steps import build_encoder
from saeshare.training.train import TrainConfig


def test_counts_by_hand():
    a, b = costs.EncoderSize([4], [10.0], 100.0), costs.EncoderSize([2, 6], [5.0, 5.0], 50.0)
    n, e = 1000, 8
    # one group each (ample memory): products 2 N F_a F_b, codes of each side once per pass of the other
    assert costs.pair_flops(a, b, n, e, 1.0) == 2 * n * 32 * 64 + 2 * n * e * (16 * 1 + (4 + 36) * 1)
    enc, sae = costs.training_flops(b, n, e, 2)
    assert enc == n * 5 * 2 * 50 and sae == n * 5 * 2 * 4 * e * (4 + 36)
    scores = costs.pair_flops(a, b, n, e, 1.0) + costs.pair_flops(b, a, n, e, 1.0)
    assert costs.matrix_flops([a, b], n, e, 1.0, False, 2) == scores
    ceilings = costs.pair_flops(a, a, n, e, 1.0) + costs.pair_flops(b, b, n, e, 1.0)
    assert costs.matrix_flops([a, b], n, e, 1.0, True, 3) == 2 * scores + ceilings * 2 * 1
    assert costs.hours(costs.PEAK_TFLOPS["bf16"] * 1e12 * 3600, "bf16", 1.0) == pytest.approx(1.0)


def test_measure_reads_the_encoder():
    cfg = TrainConfig(runname="x", model="Bert", checkpoint="all-MiniLM-L6-v2", max_samples=8)
    encoder = build_encoder(cfg.encoder_spec("text"), "cpu")
    size = costs.measure(encoder, data.load_dataset("shapes", max_samples=8), [0, 5])
    assert size.widths == [384, 384] and 5 < size.tokens[0] == size.tokens[1] < 40
    assert size.params == pytest.approx(22.7e6, rel=0.05)
