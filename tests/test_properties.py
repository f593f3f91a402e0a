"""Property tests (hypothesis): the dense planner covers every feature exactly once within its memory
budget, and show.py's streaming top-9 equals a full sort, for any sizes, budgets, chunks and ties."""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from saeshare.core.streaming import merge_top
from saeshare.engine import dense as corr_dense
from saeshare.engine.dense import LayerSize

layer_sizes = st.lists(st.integers(1, 400), min_size=1, max_size=6).map(
    lambda ns: [LayerSize(layer, n) for layer, n in enumerate(ns)])


@settings(max_examples=200, deadline=None)
@given(sizes_a=layer_sizes, sizes_b=layer_sizes, cells=st.integers(1, 200_000))
def test_plan_covers_every_feature_once_within_budget(sizes_a, sizes_b, cells):
    cap_a, cap_b = corr_dense.plan(sizes_a, sizes_b, cells)
    assert 1 <= cap_a and 1 <= cap_b and cap_a * cap_b <= cells
    for sizes, cap in ((sizes_a, cap_a), (sizes_b, cap_b)):
        groups = corr_dense.pack(sizes, cap)
        assert all(sum(u.stop - u.start for u in g) <= cap for g in groups)
        covered = {s.layer: [] for s in sizes}
        for g in groups:
            for u in g:
                covered[u.layer] += range(u.start, u.stop)
        assert covered == {s.layer: list(range(s.n_features)) for s in sizes}  # each feature once, in order
        offsets = [off for g in groups for _, off in corr_dense.offsets(g)]
        assert all(off < cap for off in offsets)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 40), n_features=st.integers(1, 5), k=st.integers(1, 12))
def test_streaming_top_k_equals_full_sort(data, n, n_features, k):
    # small integer values: many ties, zeros included
    codes = np.array(data.draw(st.lists(st.integers(0, 3), min_size=n * n_features, max_size=n * n_features)),
                     dtype=np.float32).reshape(n, n_features)
    chunk = data.draw(st.integers(1, n))
    val = torch.full((k, n_features), -torch.inf)
    idx = torch.full((k, n_features), -1, dtype=torch.int64)
    for start in range(0, n, chunk):
        val, idx = merge_top(val, idx, torch.from_numpy(codes[start:start + chunk]), start)
    keep = min(k, n)
    val, idx = val[:keep].numpy(), idx[:keep].numpy()
    for f in range(n_features):
        np.testing.assert_array_equal(val[:, f], np.sort(codes[:, f])[::-1][:keep])  # the same values, best first
        assert len(set(idx[:, f])) == keep  # distinct samples ...
        np.testing.assert_array_equal(codes[idx[:, f], f], val[:, f])  # ... that have those values
