"""Exactly-once PS state on a standalone Flink cluster: a TaskManager killed mid-stream (the
examples in files; with Kafka, see ``test_kafka_join_recovery``), a job stopped with a savepoint and resumed from it,
and batch-then-online through a savepoint (issue #7, parts 1, 2 and 5).

Each run is the online training job (``python -m dataflow.train online``) in a subprocess,
on a cluster from ``.venv-flink`` with checkpointing and the RocksDB state backend, with the
Redis store (the resumed job is another process). What "nothing lost, nothing twice" means
here is read from state Flink checkpointed, not from Beam's metrics (a restarted job's
metrics start again): the dense PS's count of examples it applied, the sparse shards'
count of gradient rows, and the online metrics' count of scored examples, all compared
with a clean run of the same job on the DirectRunner (the same gated reader makes the two
runners train identically, see ``test_train.test_backfill_on_flink``).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import standalone_cluster
from dataflow import train
from ps.snapshot_files import read_snapshot
from ps.store import open_store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--config=synthetic", "--model=fm", "--learning_rate=0.05", "--batch_size=256",
          "--num_shards=2"]
pytestmark = [pytest.mark.flink, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def recovery_cluster(tmp_path_factory, flink_job_server_jar):
    """A cluster that notices a dead TaskManager in seconds and restarts jobs from their
    last checkpoint (fixed delay), one slot per TaskManager."""
    yield from standalone_cluster(
        tmp_path_factory.mktemp("flink-recovery"), task_slots=1,
        extra_conf={"heartbeat.interval": 1000, "heartbeat.timeout": 5000,
                    "restart-strategy.type": "fixed-delay",
                    "restart-strategy.fixed-delay.attempts": 30,
                    "restart-strategy.fixed-delay.delay": "1 s"})


@pytest.fixture(scope="module")
def stream(example_log, tmp_path_factory):
    """The online part of the example log (its last 60%) and a clean DirectRunner run of it."""
    files = example_log["files"][int(len(example_log["files"]) * 0.4):]
    folder = tmp_path_factory.mktemp("online-examples")
    for f in files:
        shutil.copy(f, folder)
    out = tmp_path_factory.mktemp("clean")
    train.main(["online", f"--input={folder}", *COMMON, f"--store=memory://clean-{out.name}",
                f"--metrics_dir={out}", f"--export_dir={out}/snapshots", "--streaming",
                "--poll_interval_s=0.5", "--run_for_s=3"])
    return {"files": files, "clean": outcome(out)}


class Landing(threading.Thread):
    """Lands the stream's files in a folder one by one (atomically: copy, then rename), as
    the joiner would, so that the job is mid-stream for a while."""

    def __init__(self, files, folder, every_s=1.0):
        super().__init__(daemon=True)
        self.files, self.folder, self.every_s = files, str(folder), every_s
        os.makedirs(self.folder, exist_ok=True)
        self.stopped = threading.Event()

    def run(self):
        for f in self.files:
            if self.stopped.wait(self.every_s):
                return
            tmp = os.path.join(self.folder, "." + os.path.basename(f) + ".tmp")
            shutil.copy(f, tmp)
            os.rename(tmp, os.path.join(self.folder, os.path.basename(f)))


def outcome(out) -> dict:
    """What a finished job left: the online metrics' totals and the PS snapshots' totals."""
    totals = json.loads((out / "online-online-totals.json").read_text())
    snaps = {}
    for path in sorted(glob.glob(f"{out}/snapshots/*.snap")):
        meta, _ = read_snapshot(path)
        snaps[os.path.basename(path)] = meta
    assert sorted(snaps) == ["dense-dense.snap", "sparse-0.snap", "sparse-1.snap"], snaps
    return {"auc": totals["auc"], "scored": totals["examples"],
            "trained": snaps["dense-dense.snap"]["totals"]["examples"],
            "batches": snaps["dense-dense.snap"]["totals"]["batches"],
            "gradient_rows": sum(m["totals"]["gradient_rows"] for k, m in snaps.items()
                                 if k.startswith("sparse")),
            "snapshots": snaps}


def start_job(cluster, out, store_url, folder, run_for_s, extra=(), mode="online"):
    """The training job on the cluster, in a subprocess (its LOOPBACK Python workers with
    it). ``run_for_s=None``: neither --run_for_s nor --export_dir (a backfill that ends in a
    savepoint)."""
    out.mkdir(exist_ok=True)
    ends = [f"--export_dir={out}/snapshots", f"--run_for_s={run_for_s}"] \
        if run_for_s is not None else []
    argv = [sys.executable, "-m", "dataflow.train", mode, f"--input={folder}", *COMMON,
            f"--store={store_url}", f"--metrics_dir={out}", *ends,
            f"--metrics_out={out}/metrics.json", "--poll_interval_s=0.5", "--runner=FlinkRunner",
            f"--flink_master={cluster.master}", "--streaming", "--parallelism=1",
            "--checkpointing_interval=1000", "--state_backend=rocksdb",
            f"--state_backend_storage_path=file://{out}/checkpoints", *extra]
    log = open(out / "job.log", "wb")
    # a session of its own: kill_job ends the Beam job server JVM it starts along with it
    return subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_job(job) -> None:
    """SIGKILL a job started by :func:`start_job` and every process of its session."""
    try:
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    job.wait()


def wait_until(predicate, timeout_s, what, job=None, out=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if job is not None and job.poll() is not None:
            break
        time.sleep(0.1)
    log = (out / "job.log").read_text(errors="replace")[-4000:] if out else ""
    raise AssertionError(f"timed out waiting for {what}\n{log}")


def fresh_store(redis_url, db):
    """An emptied Redis database of the test's own: (url, store)."""
    url = f"{redis_url}/{db}"
    store = open_store(url, num_shards=None)
    store.clear()
    return url, store


def trained(store) -> int:
    return store.sync_info().get("dense", {}).get("examples", 0)


def finish(job, out, timeout_s=240):
    try:
        rc = job.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_job(job)
        raise
    assert rc == 0, (out / "job.log").read_text(errors="replace")[-4000:]


def run_to_end(job, out, timeout_s=240):
    """:func:`finish`, and the job killed (with its job server) if it did not end."""
    try:
        finish(job, out, timeout_s)
    finally:
        if job.poll() is None:
            kill_job(job)


def same_as_clean(result: dict, clean: dict, report: dict) -> None:
    """Every example scored and trained on once, every gradient row applied once, as in the
    clean run; AUC within noise of it."""
    for key in ("scored", "trained", "batches", "gradient_rows"):
        assert result[key] == clean[key], (key, report)
    assert abs(result["auc"] - clean["auc"]) < 0.02, report


def check_store_matches_snapshots(store_url, snapshots: dict, snap_dir):
    """The store ends equal to the PS state (reconciled after the restore): every row of every
    sparse shard's snapshot, and nothing else, is in the store with the same values."""
    from ps.sparse_shard import SparseShard
    from schemas.feature_config import load_feature_config
    from transforms.model import ModelSpec
    store = open_store(store_url, num_shards=2)
    spec = ModelSpec.from_feature_config(load_feature_config("synthetic"), "fm")
    shard_dofn = SparseShard("memory://unused", 2, spec.tables())
    for name, meta in snapshots.items():
        if not name.startswith("sparse"):
            continue
        _, payload = read_snapshot(os.path.join(snap_dir, name))
        live = shard_dofn._decode_base(meta["key"], payload)
        for table_name, table in live.tables.items():
            fids = np.concatenate([f for f, _, _ in table.items()] or [np.empty(0, np.uint64)])
            rows = np.concatenate([r[:, :table.dim] for _, r, _ in table.items()] or
                                  [np.empty((0, table.dim), np.float32)])
            stored_fids, stored_rows = store.shard_rows(table_name, int(meta["key"]))
            order, stored_order = np.argsort(fids), np.argsort(stored_fids)
            np.testing.assert_array_equal(fids[order], stored_fids[stored_order])
            np.testing.assert_array_equal(rows[order], stored_rows[stored_order])


def kill_mid_stream(cluster, job, out, store, landing, clean):
    """Once the job has a completed checkpoint, starts landing the stream; after 30% of the
    clean run's examples are trained on, SIGKILLs a TaskManager and starts a new one.
    Returns (job id, examples trained before the kill, the killed pid)."""
    job_id = cluster.running_job()
    wait_until(lambda: cluster.checkpoints(job_id).get("completed", 0) >= 1,
               120, "a completed checkpoint", job, out)
    landing.start()
    wait_until(lambda: trained(store) > clean["trained"] * 0.3, 120,
               "30% of the stream trained", job, out)
    before_kill = trained(store)
    killed = cluster.kill_taskmanager()
    cluster.start_taskmanager()
    return job_id, before_kill, killed


def killed_run(cluster, out, store_url, store, input_, landing, clean, run_for_s,
               extra=(), landed=None, label="RECOVERY"):
    """The training job on ``input_`` while ``landing`` brings the stream in, one TaskManager
    killed mid-stream (:func:`kill_mid_stream`), run to its end (``landed``: called once the
    landing is done, e.g. to write the end marker). Asserts that the job really failed and
    restarted mid-stream and that its totals equal ``clean``'s; returns (outcome, report)."""
    job = start_job(cluster, out, store_url, input_, run_for_s=run_for_s, extra=extra)
    try:
        job_id, before_kill, killed = kill_mid_stream(cluster, job, out, store, landing, clean)
        if landed is not None:
            landing.join()
            landed()
        finish(job, out)
    finally:
        landing.stopped.set()
        if job.poll() is None:
            kill_job(job)
    failures = cluster.rest(f"/jobs/{job_id}/exceptions").get("exceptionHistory", {})
    result = outcome(out)
    report = {"killed_pid": killed, "trained_before_kill": before_kill,
              "checkpoints": cluster.checkpoints(job_id),
              "job_failures": len(failures.get("entries", [])),
              "clean": {k: v for k, v in clean.items() if k != "snapshots"},
              "recovered": {k: v for k, v in result.items() if k != "snapshots"}}
    print(label, json.dumps(report))
    assert report["job_failures"] >= 1, report  # the job really failed and restarted
    assert before_kill < clean["trained"], report  # the kill came mid-stream
    same_as_clean(result, clean, report)
    return result, report


def test_taskmanager_killed_mid_stream(recovery_cluster, stream, tmp_path, redis_server):
    """Kill -9 the TaskManager after a checkpoint, mid-stream; a new one takes over, the job
    restarts from the checkpoint, and the result equals the clean run's: every example
    scored and trained on once, every gradient row applied once."""
    store_url, store = fresh_store(redis_server, 13)
    out = tmp_path / "killed"
    landing = Landing(stream["files"], tmp_path / "landing")
    result, _ = killed_run(recovery_cluster, out, store_url, store, landing.folder, landing,
                           stream["clean"], run_for_s=60)
    check_store_matches_snapshots(store_url, result["snapshots"], out / "snapshots")


def damaged_savepoints_are_refused(cluster, savepoint, tmp_path, store_url, folder, at_stop):
    """A truncated and a bit-flipped copy of the savepoint: the job fails to start, with an
    error naming the damaged file, and trains nothing (issue #7 part 5, the Flink half).
    Flink itself checks no checksum (a flipped bit can pass it); the seal that
    ``FlinkCluster.stop_with_savepoint`` writes does, and ``dataflow.train`` verifies it."""
    source = savepoint.removeprefix("file:")
    refused = []
    for damage in ("truncated", "bit-flipped"):
        bad = tmp_path / f"savepoint-{damage}"
        shutil.copytree(source, bad)
        meta = (bad / "_metadata").read_bytes()
        if damage == "truncated":
            meta = meta[:len(meta) // 2]
        else:
            meta = bytearray(meta)
            meta[len(meta) // 3] ^= 0x10
            meta = bytes(meta)
        (bad / "_metadata").write_bytes(meta)
        out = tmp_path / f"restore-{damage}"
        job = start_job(cluster, out, store_url, folder, run_for_s=600,
                        extra=[f"--savepoint_path=file://{bad}"])
        try:
            rc = job.wait(timeout=240)
        except subprocess.TimeoutExpired:
            kill_job(job)
            raise AssertionError(f"the job started from a {damage} savepoint and kept running")
        log = (out / "job.log").read_text(errors="replace")
        assert rc != 0, log[-3000:]
        assert "SavepointError" in log and "_metadata is damaged" in log, log[-3000:]
        refused.append(damage)
    open_store(store_url, num_shards=None)
    assert trained(open_store(store_url, num_shards=None)) == at_stop  # nothing was trained
    return refused


def test_stop_with_savepoint_and_resume(recovery_cluster, stream, tmp_path, redis_server):
    """``flink stop --savepointPath`` mid-stream, then the same job from the savepoint in a
    new process: together they score and train on every example exactly once."""
    clean = stream["clean"]
    store_url, store = fresh_store(redis_server, 14)
    first = tmp_path / "first"
    landing = Landing(stream["files"], tmp_path / "landing")
    job = start_job(recovery_cluster, first, store_url, landing.folder, run_for_s=600)
    try:
        job_id = recovery_cluster.running_job()
        landing.start()
        wait_until(lambda: trained(store) > clean["trained"] * 0.3, 120,
                   "30% of the stream trained", job, first)
        savepoint = recovery_cluster.stop_with_savepoint(job_id, f"file://{tmp_path}/savepoints")
        finish(job, first, timeout_s=120)
    finally:
        if job.poll() is None:
            kill_job(job)
    landing.join()  # the rest of the stream lands while no job runs
    at_stop = trained(store)
    assert 0 < at_stop < clean["trained"]
    refused = damaged_savepoints_are_refused(recovery_cluster, savepoint, tmp_path, store_url,
                                             landing.folder, at_stop)
    second = tmp_path / "second"
    job = start_job(recovery_cluster, second, store_url, landing.folder, run_for_s=20,
                    extra=[f"--savepoint_path={savepoint}"])
    run_to_end(job, second)
    result = outcome(second)
    report = {"savepoint": savepoint, "trained_at_stop": at_stop, "damaged_refused": refused,
              "clean": {k: v for k, v in clean.items() if k != "snapshots"},
              "resumed": {k: v for k, v in result.items() if k != "snapshots"}}
    print("SAVEPOINT", json.dumps(report))
    same_as_clean(result, clean, report)
    check_store_matches_snapshots(store_url, result["snapshots"], second / "snapshots")


def test_backfill_then_online_via_savepoint(recovery_cluster, stream, tmp_path, redis_server):
    """Batch, then online, the Flink way (DESIGN §4 path a): ``train backfill
    --savepoint_dir`` trains on the history in the example-log folder with the online job's
    own pipeline and stops itself with a savepoint once every example there is trained on;
    new files land; ``train online --savepoint_path`` resumes the reader where the backfill
    stopped. Together they equal one clean run over everything: nothing read twice, nothing
    skipped at the switch. A savepoint resumed on another folder is refused."""
    from transforms.example_log import count_examples
    clean = stream["clean"]
    store_url, store = fresh_store(redis_server, 12)
    files = stream["files"]
    history, live = files[:len(files) // 2], files[len(files) // 2:]
    folder = tmp_path / "examples"
    folder.mkdir()
    for f in history:
        shutil.copy(f, folder)
    backfill = tmp_path / "backfill"
    started = time.monotonic()
    job = start_job(recovery_cluster, backfill, store_url, folder, run_for_s=None,
                    mode="backfill", extra=[f"--savepoint_dir={tmp_path}/savepoints"])
    run_to_end(job, backfill)
    backfill_s = time.monotonic() - started
    savepoints = glob.glob(f"{tmp_path}/savepoints/savepoint-*")
    assert len(savepoints) == 1, savepoints
    savepoint = savepoints[0]
    log = (backfill / "job.log").read_text(errors="replace")
    assert f"savepoint: file:{savepoint}" in log, log[-3000:]
    at_stop = trained(store)
    assert at_stop == count_examples(history), (at_stop, count_examples(history))
    manifest = json.loads(open(os.path.join(savepoint, "beam-monolith.json")).read())
    assert manifest["input"] == f"{folder}/*.avro" and manifest["examples"] == at_stop

    elsewhere = tmp_path / "elsewhere"
    refused = start_job(recovery_cluster, tmp_path / "refused", store_url, elsewhere, 5,
                        extra=[f"--savepoint_path=file://{savepoint}"])
    assert refused.wait(timeout=120) != 0
    refusal = (tmp_path / "refused" / "job.log").read_text(errors="replace")
    assert "cannot be resumed with --input" in refusal, refusal[-3000:]

    for f in live:  # the stream goes on while no job runs
        shutil.copy(f, folder)
    online = tmp_path / "online"
    job = start_job(recovery_cluster, online, store_url, folder, run_for_s=20,
                    extra=[f"--savepoint_path=file://{savepoint}"])
    run_to_end(job, online)
    result = outcome(online)
    report = {"savepoint": savepoint, "history_examples": at_stop,
              "backfill_wall_s": round(backfill_s, 1),
              "clean": {k: v for k, v in clean.items() if k != "snapshots"},
              "backfill_then_online": {k: v for k, v in result.items() if k != "snapshots"}}
    print("BATCH_THEN_ONLINE", json.dumps(report))
    same_as_clean(result, clean, report)
    check_store_matches_snapshots(store_url, result["snapshots"], online / "snapshots")

