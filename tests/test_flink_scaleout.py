"""Training scaled out on a real two-TaskManager cluster (issue #19): two data-parallel
workers (``--num_workers 2``), each reader on its own subtask and TaskManager, Python in a
worker pool (EXTERNAL: one process per TaskManager), the PS shards spread by key; one
TaskManager killed mid-stream, and the exactly-once totals equal a clean run's.

The clean run is the same job on the same cluster without the kill (two workers batch their
own halves of the stream, so the DirectRunner's single worker is not the reference here).
"""
from __future__ import annotations

import os

import fastavro
import pytest

from conftest import standalone_cluster
from dataflow.flink import WorkerPool
from schemas import write_avro
from test_flink_recovery import (Landing, fresh_store, killed_run, outcome, run_to_end,
                                 start_job)

pytestmark = [pytest.mark.flink, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def scaleout_cluster(tmp_path_factory, flink_job_server_jar):
    """Two TaskManagers of one slot each that notice a dead one in seconds and restart jobs
    from their last checkpoint, and a worker pool."""
    workdir = tmp_path_factory.mktemp("flink-scaleout")
    with WorkerPool(log_path=str(workdir / "worker-pool.log")) as pool:
        for cluster in standalone_cluster(
                workdir / "cluster", task_slots=1, taskmanagers=2,
                extra_conf={"heartbeat.interval": 1000, "heartbeat.timeout": 5000,
                            "restart-strategy.type": "fixed-delay",
                            "restart-strategy.fixed-delay.attempts": 30,
                            "restart-strategy.fixed-delay.delay": "1 s"}):
            cluster.pool = pool
            yield cluster


@pytest.fixture(scope="module")
def two_shard_stream(example_log, tmp_path_factory):
    """The online part of the session's example log (its last 60%), each period split into two
    shard files by request id, as ``dataflow.join --shards_per_period 2`` writes them."""
    import zlib
    folder = tmp_path_factory.mktemp("two-shard-examples")
    files = []
    for path in example_log["files"][int(len(example_log["files"]) * 0.4):]:
        period = os.path.basename(path)[:16]
        with open(path, "rb") as f:
            records = list(fastavro.reader(f))
        for shard in range(2):
            name = folder / f"{period}-{shard:05d}-of-00002-split.avro"
            write_avro(str(name), "example",
                       [r for r in records if zlib.crc32(r["request_id"].encode()) % 2 == shard])
            files.append(str(name))
    return files


def scaleout_flags(cluster) -> list[str]:
    return ["--num_workers=2", "--parallelism=2", "--environment_type=EXTERNAL",
            f"--environment_config={cluster.pool.environment_config}"]


def readers_per_subtask(cluster, job_id: str) -> list[int]:
    """How many reader elements each subtask of the reading stage took (Flink's REST API)."""
    vertices = cluster.rest(f"/jobs/{job_id}")["vertices"]
    reading = [v for v in vertices if v["name"].startswith("[") and "ReadExamples, Train" in
               v["name"]]
    assert len(reading) == 1, [v["name"] for v in vertices]
    subtasks = cluster.rest(f"/jobs/{job_id}/vertices/{reading[0]['id']}")["subtasks"]
    return [s["metrics"]["read-records"] for s in sorted(subtasks, key=lambda s: s["subtask"])]


def test_two_workers_survive_a_taskmanager_kill(scaleout_cluster, two_shard_stream, tmp_path,
                                                redis_server):
    """A clean W=2 run, then the same job with a TaskManager killed after a checkpoint,
    mid-stream: every example scored and trained on once, every batch and gradient row
    applied once, as in the clean run; each reader ran on a subtask of its own."""
    cluster = scaleout_cluster
    marker = tmp_path / "all-landed"
    clean_in = tmp_path / "clean-examples"
    clean_in.mkdir()
    for f in two_shard_stream:
        os.link(f, clean_in / os.path.basename(f))
    clean_marker = tmp_path / "clean-landed"
    clean_marker.touch()
    clean_url, _ = fresh_store(redis_server, 10)
    clean_out = tmp_path / "clean"
    job = start_job(cluster, clean_out, clean_url, clean_in, run_for_s=600,
                    extra=[*scaleout_flags(cluster), f"--stop_when_exists={clean_marker}"])
    clean_id = cluster.running_job()
    run_to_end(job, clean_out)
    assert readers_per_subtask(cluster, clean_id) == [1, 1]
    clean = outcome(clean_out)

    store_url, store = fresh_store(redis_server, 11)
    landing = Landing(two_shard_stream, tmp_path / "landing", every_s=0.5)
    killed_run(cluster, tmp_path / "killed", store_url, store, landing.folder, landing, clean,
               run_for_s=600, extra=[*scaleout_flags(cluster), f"--stop_when_exists={marker}"],
               landed=marker.touch, label="SCALEOUT_RECOVERY")
