"""``python -m benchmarks.kafka --json --quick --no_flink`` runs end to end against its own
Kafka broker (DirectRunner only: a Flink run takes minutes) and reports every figure with
counts that agree: each producer wrote every record, each reader read every one, the join
gave the same examples from the files as from the topics, no dead letters, rates positive."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_benchmark_quick_counts_agree_and_rates_are_positive(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.kafka", "--json", "--quick",
                           "--no_flink", f"--workdir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # one strict-JSON object, nothing else on stdout
    assert {"setup", "produce", "consume", "join", "ratios"} <= set(result)
    n = result["setup"]["records"]
    assert n == 5_000 and result["setup"]["flink"] is None
    assert set(result["produce"]) == {"producer", "write_to_kafka_topic_direct"}
    assert set(result["consume"]) == {"consumer_raw", "consumer_decoded",
                                      "consumer_decoded_not_strict",
                                      "read_from_kafka_topic_direct"}
    for part in ("produce", "consume"):
        for name, figure in result[part].items():
            assert figure["records"] == n, (name, figure)
            assert _positive(figure["records_per_s"]), (name, figure)
            assert _positive(figure["seconds"]), (name, figure)
            assert figure.get("dead_letters") in (0, None), (name, figure)
            assert 0 <= figure["cores_busy"] <= result["setup"]["cores"] + 0.5, (name, figure)
    assert _positive(result["produce"]["producer"]["records_per_s_with_encoding"])
    for name in ("write_to_kafka_topic_direct", "read_from_kafka_topic_direct"):
        figure = {**result["produce"], **result["consume"]}[name]
        assert 0 < figure["span_s"] <= figure["seconds"], (name, figure)
        assert 0 <= figure["startup_s"] < figure["seconds"], (name, figure)

    join = result["join"]
    assert join["runner"] == "DirectRunner" and join["same_examples"] is True
    files, kafka = join["files"], join["kafka"]
    # every request served is an example (negative_sample_rate 1), labelled alike both ways
    assert files["examples"] == kafka["examples"] == result["setup"]["join_requests"]
    for key in ("positives", "features", "actions", "late_actions", "unmatched_actions"):
        assert files[key] == kafka[key], key
    assert files["positives"] > 0 and files["actions"] > 0
    assert files["dead_letters"] == kafka["dead_letters"] == 0
    for figure in (files, kafka):
        assert _positive(figure["examples_per_s"]) and _positive(figure["examples_per_s_span"])
        assert 0 < figure["span_s"] < figure["seconds"]
    assert _positive(join["kafka_vs_files"])
    assert join["kafka_vs_files"] == pytest.approx(
        kafka["examples_per_s"] / files["examples_per_s"], rel=0.01)
    for name in ("producer_with_encoding_vs_without", "sink_direct_vs_producer_with_encoding",
                 "consumer_decoded_vs_raw", "consumer_decoded_strict_vs_not",
                 "join_kafka_vs_files", "join_kafka_vs_files_span"):
        assert _positive(result["ratios"][name]), name
    assert result["ratios"]["read_flink_vs_direct_span"] is None  # no Flink in this run
