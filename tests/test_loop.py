"""A short closed loop: serving, the simulator, per-period joins and online training as
separate processes around a private Redis, on the DirectRunner (and once with training and a
streaming join on Flink's MiniCluster, ``--join stream``). The loop must learn: the
serving AUC at the end beats the serving AUC at the start by a clear margin.

A small world (30 users, 40 items) so that half a minute of traffic (~6,000 served items)
is enough to learn from: measured with the loop's default model (FM) 0.515 in the first
quarter -> 0.777 (Bayes 0.813) in the last (LR before: 0.47 -> 0.72, Bayes 0.76).
Started warm (the world's history served, joined and trained on first), the first quarter
is served with learned parameters: measured 0.761 (Bayes 0.798).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from dataflow import loop
from dataflow.closed_loop import evaluation
from schemas import read_avro
from test_strict_json import strict_files


SMALL_LOOP = ["--duration_s=2400", "--speed=80", "--rps=20", "--candidates=20", "--top_k=10",
              "--users=30", "--items=40", "--categories=5", "--period_s=60",
              "--join_window_s=120", "--max_delay_s=240", "--model_export_interval_s=60",
              "--learning_rate=0.1", "--dense_learning_rate=0.02", "--report_buckets=8",
              "--drain_timeout_s=30"]


@pytest.mark.redis
@pytest.mark.slow
def test_closed_loop_learns(tmp_path):
    out = tmp_path / "loop"
    args = loop.parser().parse_args([f"--out={out}", *SMALL_LOOP, "--history_s=0"])
    result = loop.run(args)
    assert result["history"] is None

    auc = result["auc"]
    first, last = auc["first_quarter"], auc["last_quarter"]
    # before training has published anything every item scores the same: AUC 0.5
    assert first["serving_auc"] < 0.56, auc
    assert last["serving_auc"] > first["serving_auc"] + 0.1, auc  # the loop learns
    assert last["serving_auc"] < last["bayes_auc"], auc  # no model beats the truth
    assert last["served"] > 1000 and last["positives"] > 50, auc

    _assert_all_stopped(result, out)

    # every served item became exactly one example (nothing lost or doubled across periods)
    served = [r for p in sorted((out / "feature_log").glob("part-*.avro"))
              for r in read_avro(str(p))]
    examples = [r for p in sorted((out / "examples").glob("*.avro")) for r in read_avro(str(p))]
    assert len(served) == result["throughput"]["examples_joined"] == len(examples)
    assert sorted(r["request_id"] for r in served) == sorted(r["request_id"] for r in examples)
    assert all(0 < r["served_score"] < 1 and r["true_ctr"] is not None for r in served)
    # the logs are in event-time order across files (what a tailing reader needs)
    for folder in ("feature_log", "action_log"):
        ts = [r["ts_ms"] for p in sorted((out / folder).glob("part-*.avro"))
              for r in read_avro(str(p))]
        assert ts == sorted(ts), folder
    labels = {r["request_id"]: r["label"] for r in examples}
    assert 0 < np.mean(list(labels.values())) < 0.5

    # serving moved to exported models and reported how old its parameters were
    assert result["models_kept"] >= 1 and result["model_versions_served"] >= 3  # -1 and two
    assert result["simulator"]["errors"] == 0
    assert result["staleness"]["sparse_age_s_p50"] is not None
    assert result["staleness"]["dense_age_s_p50"] is not None
    assert (out / "loop.png").stat().st_size > 20_000
    assert (out / "auc_over_time.csv").exists()
    written = strict_files(out)  # the report, the simulator's summary, ...: no NaN
    assert str(out / "report.json") in written and str(out / "sim_summary.json") in written


@pytest.mark.redis
@pytest.mark.slow
def test_closed_loop_starts_warm_from_the_worlds_history(tmp_path):
    out = tmp_path / "loop"
    args = loop.parser().parse_args([f"--out={out}", *SMALL_LOOP, "--history_s=2400",
                                     "--history_speedup=4"])
    result = loop.run(args)

    history = result["history"]
    _assert_history_then_run_joined_once(out, history)

    # the run is served with learned parameters from its first quarter on (cold: ~0.5)
    first, last = result["auc"]["first_quarter"], result["auc"]["last_quarter"]
    assert first["serving_auc"] > 0.65, result["auc"]
    assert last["serving_auc"] > 0.65, result["auc"]
    assert first["serving_auc"] < first["bayes_auc"] + 0.02, result["auc"]
    _assert_all_stopped(result, out)


@pytest.mark.flink
@pytest.mark.redis
@pytest.mark.slow
def test_closed_loop_stream_join_on_flink_starts_warm(tmp_path, flink_job_server_jar):
    """``--join stream``: training and the run's join on Flink's MiniCluster, the join one
    streaming job over the run's tailed logs, after the history was joined by the per-period
    joiner into the folder training follows. The join's job is started before the history
    (the MiniCluster takes ~40 s to start) and the simulator only once it runs; its sources
    stop once the simulator's summary exists. Measured (1.7 min, quiet machine): first
    quarter 0.777 (Bayes 0.800). On two cores shared with training, serving and the
    simulator the join lags ~20 s behind the logs, most of this 30 s run's examples land
    after it: this checks the join's output and the warm start, not its freshness."""
    out = tmp_path / "loop"
    args = loop.parser().parse_args([
        f"--out={out}", *SMALL_LOOP, "--history_s=2400", "--history_speedup=4",
        "--runner=FlinkRunner", "--join=stream", "--drain_timeout_s=120"])
    result = loop.run(args)

    history = result["history"]
    # the history (per-period joiner), then the run (the streaming job)
    served, examples = _assert_history_then_run_joined_once(out, history)
    assert result["throughput"]["join_runs"] == 0  # the run was joined by the streaming job
    assert result["throughput"]["examples_joined"] == len(served) > 1000
    # training took in the run's examples too: its newest model is from the run's last minutes
    newest_model_ms = max(int(p.name.split("-v")[0]) for p in (out / "models").glob("*-v*"))
    assert newest_model_ms >= examples[-1]["ts_ms"] - 120_000, (newest_model_ms, examples[-1])
    # the join's job ran before the simulator's first request
    join_started = float((out / "join.started").read_text())
    sim_started = (out / "sim_summary.json").stat().st_mtime - result["simulator"]["wall_s"]
    assert join_started < sim_started, (join_started, sim_started)

    # the run is served with what training learned from the history (cold: ~0.5)
    first = result["auc"]["first_quarter"]
    assert 0.65 < first["serving_auc"] < first["bayes_auc"] + 0.02, result["auc"]
    _assert_all_stopped(result, out)  # the Flink job servers (Java) included


def _assert_history_then_run_joined_once(out, history) -> tuple:
    """The history was served, joined and taken in by training before the run; the example
    log holds the history, then the run: each served item exactly once, in event-time
    order. Returns (the run's served items, every example)."""
    assert history["caught_up"], history  # the run started after training took it all in
    # the history's requests, at the run's rate per simulated second, all served and joined
    assert 500 <= history["requests"] <= 620, history
    history_served = [r for p in sorted((out / "history" / "feature_log").glob("part-*.avro"))
                      for r in read_avro(str(p))]
    assert len(history_served) == history["served"] == history["examples"]
    assert all(r["ts_ms"] < _run_start_ms(out) for r in history_served)
    # untrained parameters score every item alike: the history's ranking is not learned
    assert history["serving_auc"] == 0.5, history
    served = [r for p in sorted((out / "feature_log").glob("part-*.avro"))
              for r in read_avro(str(p))]
    examples = [r for p in sorted((out / "examples").glob("*.avro")) for r in read_avro(str(p))]
    assert sorted(r["request_id"] for r in history_served + served) == \
        sorted(r["request_id"] for r in examples)
    assert [r["ts_ms"] for r in examples] == sorted(r["ts_ms"] for r in examples)
    return served, examples


def _assert_all_stopped(result, out) -> None:
    """Every process the loop started is gone, with everything they started (their process
    groups: a Flink job's Java job server) and serving's feature log processes."""
    for name, pid in result["pids"].items():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"{name} (pid {pid}) still runs")
    groups = set(result["pids"].values())  # each child leads a session of its own
    left = [pid for pid in os.listdir("/proc") if pid.isdigit() and _group(pid) in groups]
    assert not left, [_cmdline(pid)[:200] for pid in left]
    for log in (out / "feature_log", out / "history" / "feature_log"):
        assert not [pid for pid in os.listdir("/proc") if pid.isdigit()
                    and f"{log}".encode() in _cmdline(pid)], f"feature log process of {log}"


def test_click_noise_is_the_ratio_over_clicks_drawn_again():
    from dataflow.data import roc_auc
    rng = np.random.default_rng(3)
    ctr = rng.uniform(0.02, 0.4, 3000)
    score = np.round(ctr + rng.normal(0, 0.1, 3000), 2)  # ties too
    mean, sd = evaluation.click_noise(score, ctr, draws=50, seed=7)
    labels = np.random.default_rng(7).random((50, 3000)) < ctr  # the same draws, one by one
    ratios = [roc_auc(score, row) / roc_auc(ctr, row) for row in labels]
    assert np.isclose(mean, np.mean(ratios)) and np.isclose(sd, np.std(ratios))
    assert 0.8 < mean < 0.99 and 0 < sd < 0.05
    assert np.isnan(evaluation.click_noise(score, np.full(3000, np.nan))[0])


def _run_start_ms(out) -> int:
    """Event time of the run's first request."""
    first = sorted((out / "feature_log").glob("part-*.avro"))[0]
    return min(r["ts_ms"] for r in read_avro(str(first)))


def _group(pid: str):
    """The process group of a process (None if gone, or dead and not yet reaped: a zombie
    whose parent ended is reparented and reaped by init a moment later)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
        return None if state in ("Z", "X") else int(group)
    except (OSError, IndexError, ValueError):
        return None


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:  # gone meanwhile
        return b""
