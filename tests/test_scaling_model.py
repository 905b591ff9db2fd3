"""The capacity model of ``benchmarks.scaling`` (docs/scaling.md): what it projects follows
from the measured costs it is given."""
from __future__ import annotations

import doctest

from hypothesis import given, settings, strategies as st

from benchmarks import scaling


def test_docstring_example_runs():
    assert doctest.testmod(scaling).failed == 0


costs = st.fixed_dictionaries({
    "batch_size": st.integers(16, 4096),
    "reader_resume_gap_ms": st.floats(0, 100), "reader_ps_wait_ms": st.floats(0, 100),
    "worker_batch_ms": st.floats(1, 100), "examples": st.integers(1_000, 10**6),
    "gradient_rows_applied": st.integers(1_000, 10**7), "ps_sparse_records": st.integers(1, 10**4),
    "ps_sparse_apply_us": st.floats(10, 10**5), "ps_dense_records": st.integers(1, 10**4),
    "ps_dense_apply_us": st.floats(10, 10**5), "cores_busy_steady": st.floats(0.1, 8),
    "examples_per_s_after_first_batch": st.floats(100, 10**6)})


@settings(max_examples=200, deadline=None)
@given(costs)
def test_projection_is_bounded_and_provisioned(run):
    sizes = scaling.project(run, workers=(1, 2, 8, 64, 256))["sizes"]
    rates = [s["examples_per_s"] for s in sizes]
    per_worker = rates[0] if sizes[0]["bottleneck"] == "worker loop" else None
    assert rates == sorted(rates), "more workers never project fewer examples/s"
    dense_cap = scaling.HEADROOM * run["batch_size"] / (run["ps_dense_apply_us"] * 1e-6)
    store_cap = scaling.HEADROOM * 1e6 / scaling.STORE_DENSE_KEY_US_PER_EXAMPLE
    for s in sizes:
        assert s["examples_per_s"] <= round(min(dense_cap, store_cap), 0) + 1 or \
            s["bottleneck"] == "worker loop"
        if s["bottleneck"] == "worker loop" and per_worker:
            assert abs(s["examples_per_s"] - s["workers"] * per_worker) <= s["workers"]
        # provisioned shared parts stay within their planned headroom
        rows = s["examples_per_s"] * run["gradient_rows_applied"] / run["examples"]
        shard_rows = (run["gradient_rows_applied"] / run["ps_sparse_records"]
                      / (run["ps_sparse_apply_us"] * 1e-6))
        assert rows <= s["sparse_ps_shards"] * scaling.HEADROOM * shard_rows * (1 + 1e-9)
        assert s["examples_per_s"] <= s["store_instances"] * scaling.HEADROOM * 230_000 * (1 + 1e-9)
