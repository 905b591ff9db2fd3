"""``python -m benchmarks.store --json --quick`` runs end to end against a private Redis and
reports redis's cost per example of real training, positive and finite, for both sync modes,
and the replay ceiling at each K."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.redis
@pytest.mark.slow
def test_store_benchmark_quick_reports_positive_finite_costs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.store", "--json", "--quick",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one strict-JSON object, nothing else on stdout
    assert {"store", "training", "ceiling", "capacity_examples_per_s", "projection",
            "redis_idle_cpu_percent"} <= set(result)
    assert result["store"]["width"] > 0 and result["store"]["dense_bytes"] > 0

    def positive(x):
        return isinstance(x, (int, float)) and math.isfinite(x) and x > 0

    assert set(result["training"]) == {"sync_every_batch", "sync_60s"}
    for mode, run in result["training"].items():
        assert run["examples"] > 0 and run["batches"] > 0, mode
        for unit in ("per_example", "per_batch"):
            cost = run[unit]
            for key in ("commands_total", "bytes_in", "bytes_out", "redis_cpu_us_gross",
                        "command_usec"):
                assert positive(cost[key]), (mode, unit, key, cost[key])
            assert positive(cost["commands"]["hmget"]) and positive(cost["commands"]["hset"])
            assert math.isfinite(cost["redis_cpu_us"])
    # the training view doubles the worker's reads
    assert (result["training"]["sync_60s"]["per_batch"]["commands"]["hmget"]
            > result["training"]["sync_every_batch"]["per_batch"]["commands"]["hmget"])
    assert [c["clients"] for c in result["ceiling"]] == [1, 2]
    for c in result["ceiling"]:
        for key in ("examples_per_s", "commands_per_s", "redis_cpu_percent",
                    "redis_cpu_us_per_example"):
            assert positive(c[key]), (c["clients"], key, c[key])
    for mode, capacity in result["capacity_examples_per_s"].items():
        assert positive(capacity), mode
    needed = result["projection"]["instances_needed"]["sync_every_batch"]
    assert needed["256"] >= needed["8"] >= 1
