"""End-to-end online training: synthetic logs → join → example log → train, on each runner.

Every run asserts what a user relies on: online AUC (each example scored before it is
learned) beats 0.5 by a clear margin, and the PS applied exactly as many gradient rows as
the workers emitted (nothing lost, nothing applied twice).
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

from dataflow import train
from transforms.example_log import read_examples_in_order

CONFIG = "synthetic"  # the example_log fixture (conftest.py) is joined with it


def run_train(tmp_path, mode, input_, extra=()):
    metrics_out = tmp_path / f"metrics-{mode}.json"
    metrics_dir = tmp_path / f"online-{mode}"
    train.main([mode, f"--input={input_}", f"--config={CONFIG}", "--model=fm",
                "--learning_rate=0.05", "--batch_size=256", f"--metrics_dir={metrics_dir}",
                f"--metrics_out={metrics_out}", *extra])
    counters = json.loads(metrics_out.read_text())["counters"]
    totals = json.loads((metrics_dir / f"online-{mode}-totals.json").read_text())
    return counters, totals, metrics_dir


def check_exactly_once(counters, examples):
    assert counters["worker.examples"] == examples
    assert counters["online.examples"] == examples
    assert counters["worker.gradient_rows_emitted"] > 0
    assert counters["ps.gradient_rows_applied"] == counters["worker.gradient_rows_emitted"]


@pytest.mark.parametrize("store", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_backfill_on_direct_runner(tmp_path, example_log, store, request):
    store_url = (f"memory://train-{tmp_path.name}" if store == "memory"
                 else request.getfixturevalue("redis_server") + "/3")
    snapshots = tmp_path / "snapshots"
    counters, totals, metrics_dir = run_train(
        tmp_path, "backfill", f"{example_log['dir']}/joined/examples/*.avro",
        [f"--store={store_url}", f"--export_dir={snapshots}", "--runner=DirectRunner"])
    check_exactly_once(counters, example_log["examples"])
    assert totals["auc"] > 0.62, totals  # 0.5 is a coin; the Bayes AUC of this stream ~0.78
    assert totals["bayes_auc"] > totals["auc"]
    assert totals["end_of_input"] is True  # the report written when the input ended
    assert (metrics_dir / "online-backfill.csv").exists()
    assert (metrics_dir / "online-backfill.png").stat().st_size > 10_000
    assert sorted(os.listdir(snapshots)) == ["dense-dense.snap", "sparse-0.snap", "sparse-1.snap"]
    assert counters["ps.snapshots_exported"] == 3


def test_sync_interval_scores_with_serving_trains_on_fresh(tmp_path, example_log):
    """With a sync interval the worker scores with the serving copy (published every 30
    event-time minutes) and trains on the training view (published every batch): only the
    first batch, before any PS has published, trains on the serving copy."""
    store_url = f"memory://sync-{tmp_path.name}"
    counters, totals, _ = run_train(
        tmp_path, "backfill", f"{example_log['dir']}/joined/examples/*.avro",
        [f"--store={store_url}", "--sync_interval_s=1800", "--dense_sync_interval_s=1800"])
    check_exactly_once(counters, example_log["examples"])
    assert counters["worker.batches_trained_on_serving_copy"] == 1
    assert totals["auc"] > 0.62, totals
    from ps.store import open_store, view_url
    serving, fresh = open_store(store_url, 2), open_store(view_url(store_url, "train"), 2)
    for key, info in fresh.sync_info().items():  # the end of input published everything
        assert serving.sync_info()[key]["version"] == info["version"]


def test_online_continues_from_the_backfill_snapshots(tmp_path, example_log):
    """Batch, then online (DESIGN §4 path b): the online job bootstraps its PS from the
    backfill's snapshots and so scores the new examples better than a cold start does."""
    files = example_log["files"]
    split = int(len(files) * 0.75)
    backfill, online = tmp_path / "backfill", tmp_path / "online"
    backfill.mkdir()
    online.mkdir()
    for f in files[:split]:
        shutil.copy(f, backfill)
    for f in files[split:]:
        shutil.copy(f, online)
    online_examples = sum(1 for _ in read_examples_in_order(str(online)))
    snapshots = tmp_path / "snapshots"
    (tmp_path / "b").mkdir()
    run_train(tmp_path / "b", "backfill", f"{backfill}/*.avro",
              [f"--store=memory://bf-{tmp_path.name}", f"--export_dir={snapshots}"])

    # Every file is there before the jobs start: the marker ends each once it read them
    # (--run_for_s only bounds a job that would not stop).
    done = tmp_path / "online.done"
    done.write_text("")
    online_flags = ["--poll_interval_s=1", f"--stop_when_exists={done}", "--run_for_s=300",
                    "--streaming"]
    (tmp_path / "warm").mkdir()
    warm, warm_totals, _ = run_train(tmp_path / "warm", "online", str(online),
                                     [f"--store=memory://warm-{tmp_path.name}",
                                      f"--restore={snapshots}", *online_flags])
    (tmp_path / "cold").mkdir()
    cold, cold_totals, _ = run_train(tmp_path / "cold", "online", str(online),
                                     [f"--store=memory://cold-{tmp_path.name}", *online_flags])
    assert warm["ps.snapshots_restored"] == 3
    assert "ps.snapshots_restored" not in cold or cold["ps.snapshots_restored"] == 0
    check_exactly_once(warm, online_examples)
    check_exactly_once(cold, online_examples)
    assert warm_totals["auc"] > cold_totals["auc"] + 0.02, (warm_totals, cold_totals)


@pytest.mark.flink
@pytest.mark.slow
def test_backfill_on_flink(tmp_path, example_log, flink_job_server_jar):
    """With the default bounded staleness of 0 the reader ends its bundle after every batch
    and waits for the PS to publish it, so Flink, which runs the stages concurrently, scores
    every batch with the same parameters as the fused DirectRunner: the same online AUC."""
    counters, totals, _ = run_train(
        tmp_path, "backfill", f"{example_log['dir']}/joined/examples/*.avro",
        [f"--store=memory://flink-{tmp_path.name}", "--runner=FlinkRunner",
         "--flink_master=[local]", "--streaming", "--parallelism=1"])
    check_exactly_once(counters, example_log["examples"])
    (tmp_path / "direct").mkdir()
    _, direct, _ = run_train(tmp_path / "direct", "backfill",
                             f"{example_log['dir']}/joined/examples/*.avro",
                             [f"--store=memory://flink-direct-{tmp_path.name}"])
    assert totals["auc"] > 0.62, totals
    assert abs(totals["auc"] - direct["auc"]) < 0.005, (totals, direct)


@pytest.mark.flink
@pytest.mark.slow
def test_checkpointed_flink_job_ended_by_the_driver_keeps_its_metrics(tmp_path, example_log,
                                                                      flink_job_server_jar):
    """With checkpointing a Flink job keeps its sources up, so the driver ends it once its
    end-of-input work is done. Cancelled, it reported no metrics at all (Beam's job server
    has none of a running or cancelled job); stopped with a savepoint through the embedded
    MiniCluster's REST API (dataflow.job), it ends FINISHED with every counter and
    distribution of the run."""
    folder = tmp_path / "examples"
    folder.mkdir()
    for f in example_log["files"][:4]:  # ~4k examples: a small, quick job
        shutil.copy(f, folder)
    examples = sum(1 for _ in read_examples_in_order(str(folder)))
    counters, totals, _ = run_train(
        tmp_path, "backfill", f"{folder}/*.avro",
        [f"--store=memory://flink-ckpt-{tmp_path.name}", f"--export_dir={tmp_path}/snapshots",
         "--runner=FlinkRunner", "--flink_master=[local]", "--streaming", "--parallelism=1",
         "--checkpointing_interval=1000"])
    assert totals["examples"] == examples
    check_exactly_once(counters, examples)
    assert counters["ps.snapshots_exported"] == 3  # the end-of-input work, before the stop
    metrics = json.loads((tmp_path / "metrics-backfill.json").read_text())
    waits = metrics["distributions"]["reader.ps_catch_up_wait_ms"]
    assert waits["count"] == counters["worker.batches"] > 0  # one per batch read


def test_train_cli_help():
    from dataflow.__main__ import main
    assert main(["train", "--help"]) == 0


def test_worker_logs_a_bundle_only_when_it_brought_examples(caplog, monkeypatch):
    """A streaming job finishes a bundle at every poll of its reader, batches or not: the
    worker says nothing for a bundle without new examples, and logs at most every
    progress_every_s (the demo's online phase logged ~120 identical lines a second)."""
    import logging

    import numpy as np

    from transforms import train as worker_module
    from transforms.train import _Progress, _TrainWorkerFn

    clock = [100.0]
    monkeypatch.setattr(worker_module.time, "monotonic", lambda: clock[0])
    worker = _TrainWorkerFn(spec=None, store_url="memory://unused", num_shards=1,
                         progress_every_s=5.0)
    worker._progress = _Progress(every_s=0)  # no per-batch progress lines in this test
    updates = []
    monkeypatch.setattr(worker.steady_rate, "update", updates.append)

    def batch(n):
        worker._progress.update(np.full(n, 0.5), np.arange(n) % 2, np.ones(n))

    with caplog.at_level(logging.INFO, logger=worker_module._LOG.name):
        worker.finish_bundle()                  # nothing yet
        batch(10)
        worker.finish_bundle()                  # new examples: a line
        for _ in range(50):
            clock[0] += 1.0
            worker.finish_bundle()              # polls without batches: silent
        batch(10)
        clock[0] += 1.0
        worker.finish_bundle()                  # new, and 5 s since the last line: a line
        batch(10)
        clock[0] += 1.0
        worker.finish_bundle()                  # new, 1 s since: only the metric
    lines = [r.getMessage() for r in caplog.records if "examples so far" in r.getMessage()]
    assert [line.split(" examples")[0] for line in lines] == ["worker: 10", "worker: 20"]
    assert len(updates) == 3


def test_end_of_input_check_waits_for_the_final_report(tmp_path):
    """A checkpointed Flink job keeps its sources up, so the driver cancels it once its
    end-of-input work is written. The metrics report is also rewritten as windows close:
    only the one written at the end of the input counts (an online job on Flink was
    cancelled after its first window, 992 of 19,747 examples trained)."""
    import time
    from types import SimpleNamespace

    from transforms.metrics_report import write_report
    opts = SimpleNamespace(metrics_dir=str(tmp_path), export_dir=None, num_shards=2)
    done = train._end_of_input_done(opts, "online", time.time() - 1)
    prefix = str(tmp_path / "online-online")
    assert not done()  # nothing written yet
    write_report([], {"examples": 992, "end_of_input": False}, prefix)
    assert not done()  # a window closed
    write_report([], {"examples": 19747, "end_of_input": True}, prefix)
    assert done()
    opts.export_dir = str(tmp_path / "snapshots")  # and, with snapshots, those too
    assert not train._end_of_input_done(opts, "online", time.time() - 1)()
