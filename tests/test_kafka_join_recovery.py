"""Exactly once through Kafka on a standalone Flink cluster (issue #20 part 4, the join's half):
the streaming join (``dataflow.loop stream-join``) reads the feature and action topics and
writes the examples topic, while online training (``dataflow.train online``) follows the
examples topic; one TaskManager, running both jobs, is SIGKILLed mid-stream.

Both jobs restart from their last checkpoints: the readers from the offsets in them, the join
from its state, and the join's writer (``WriteToKafkaTopicInOrder``) skips what it had written
after its checkpoint and emits again. What must hold: the examples topic equals the batch
join's example log (``dataflow.join`` over the same logs as files): every request joined
exactly once, in order; and training's totals (examples scored and trained, batches,
gradient rows) equal a clean DirectRunner run over those files.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from confluent_kafka import TopicPartition

from conftest import standalone_cluster
from dataflow import data, flink, join, train
from dataflow.serving.kafka_log import KafkaAvroLog, end_topic
from schemas import read_avro
from test_flink_recovery import (COMMON, fresh_store, kill_job, outcome, same_as_clean,
                                 start_job, trained, wait_until)
from transforms.example_log import read_examples_in_order
from transforms.kafka_source import read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW_S = 300
pytestmark = [pytest.mark.flink, pytest.mark.redis, pytest.mark.kafka, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_job_cluster(tmp_path_factory, flink_job_server_jar):
    """One TaskManager of two slots (the join and training), that notices a dead
    TaskManager in seconds and restarts jobs from their last checkpoint."""
    yield from standalone_cluster(
        tmp_path_factory.mktemp("flink-two-jobs"), task_slots=2,
        extra_conf={"heartbeat.interval": 1000, "heartbeat.timeout": 5000,
                    "restart-strategy.type": "fixed-delay",
                    "restart-strategy.fixed-delay.attempts": 30,
                    "restart-strategy.fixed-delay.delay": "1 s"})


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Synthetic feature and action logs (6 event-time hours), their batch join (hourly
    example files) and a clean DirectRunner training run over those files."""
    work = tmp_path_factory.mktemp("kafka-join")
    data.synth(str(work / "logs"), requests=8000, users=200, items=300, days=0.25, seed=11)
    join.main([f"--features={work}/logs/feature_log/*.avro",
               f"--actions={work}/logs/action_log/*.avro", f"--out={work}/joined",
               "--config=synthetic", f"--join_window_s={WINDOW_S}"])
    examples = [(e["ts_ms"], e["request_id"], e["label"])
                for e in read_examples_in_order(f"{work}/joined/examples")]
    clean = work / "clean"
    train.main(["online", f"--input={work}/joined/examples", *COMMON,
                f"--store=memory://clean-{work.name}", f"--metrics_dir={clean}",
                f"--export_dir={clean}/snapshots", "--streaming", "--poll_interval_s=0.5",
                "--run_for_s=3"])

    def records(schema):
        return sorted((r for f in sorted(glob.glob(f"{work}/logs/{schema}/*.avro"))
                       for r in read_avro(f)), key=lambda r: r["ts_ms"])
    return {"features": records("feature_log"), "actions": records("action_log"),
            "examples": examples, "clean": outcome(clean)}


class Serving(threading.Thread):
    """Writes the logs to their topics in event-time order, as serving and the simulator
    would (``KafkaAvroLog``: keyed, with watermark marks), over ``wall_s``; then ends both
    topics."""

    def __init__(self, logs, features_url, actions_url, wall_s):
        super().__init__(daemon=True)
        self.logs, self.urls, self.wall_s = logs, (features_url, actions_url), wall_s
        self.error = None

    def run(self):
        try:
            features = KafkaAvroLog(self.urls[0], "feature_log", roll_s=3600)
            actions = KafkaAvroLog(self.urls[1], "action_log", roll_s=3600)
            merged = sorted([(r["ts_ms"], 0, r) for r in self.logs["features"]] +
                            [(r["ts_ms"], 1, r) for r in self.logs["actions"]],
                            key=lambda x: (x[0], x[1]))
            step = max(1, len(merged) // 100)
            for i in range(0, len(merged), step):
                for ts, kind, r in merged[i:i + step]:
                    (features, actions)[kind].append([r], ts)
                features.flush()
                actions.flush()
                time.sleep(self.wall_s / 100)
            for log, url in zip((features, actions), self.urls):
                log.stop()
                end_topic(url)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e


def start_join(cluster, out, bootstrap, name):
    out.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "dataflow.loop", "stream-join",
            f"--features=kafka://{bootstrap}/features", f"--actions=kafka://{bootstrap}/actions",
            f"--examples=kafka://{bootstrap}/examples", "--config=synthetic",
            f"--join_window_s={WINDOW_S}", f"--dead_letter={out}/dead",
            f"--done_file={out}/done.json", "--stop_after_s=600", f"--job_name={name}",
            f"--metrics_out={out}/metrics.json", "--runner=FlinkRunner",
            f"--flink_master={cluster.master}", "--streaming", "--parallelism=1",
            "--checkpointing_interval=1000", "--state_backend=rocksdb",
            f"--state_backend_storage_path=file://{out}/checkpoints"]
    log = open(out / "job.log", "wb")
    return subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def examples_in_topic(broker) -> int:
    from confluent_kafka import Consumer
    consumer = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "count"})
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition("examples", 0), timeout=10)
        return high - low
    finally:
        consumer.close()


def test_taskmanager_killed_while_the_join_and_training_read_kafka(
        two_job_cluster, logs, tmp_path, redis_server, kafka_broker):
    cluster = two_job_cluster
    for topic, partitions in (("features", 2), ("actions", 2), ("examples", 1)):
        kafka_broker.create_topic(topic, partitions=partitions)
    bootstrap = kafka_broker.bootstrap
    store_url, store = fresh_store(redis_server, 11)
    join_out, train_out = tmp_path / "join", tmp_path / "train"
    join_name = f"kafka-join-{os.getpid()}"
    serving = Serving(logs, f"kafka://{bootstrap}/features", f"kafka://{bootstrap}/actions",
                      wall_s=25)
    joiner = start_join(cluster, join_out, bootstrap, join_name)
    trainer = start_job(cluster, train_out, store_url, f"kafka://{bootstrap}/examples",
                        run_for_s=110)
    expected = len(logs["examples"])
    try:
        def both_checkpointed():
            ids = [j["id"] for j in cluster.jobs() if j["status"] == "RUNNING"]
            return len(ids) == 2 and all(cluster.checkpoints(i).get("completed", 0) >= 1
                                         for i in ids)
        wait_until(both_checkpointed, 150, "both jobs running and checkpointed", joiner,
                   join_out)
        job_ids = [j["id"] for j in cluster.jobs() if j["status"] == "RUNNING"]
        serving.start()
        wait_until(lambda: examples_in_topic(kafka_broker) > expected * 0.3, 120,
                   "30% of the examples joined", joiner, join_out)
        joined_before_kill, trained_before_kill = examples_in_topic(kafka_broker), trained(store)
        killed = cluster.kill_taskmanager()
        cluster.start_taskmanager()
        assert joiner.wait(timeout=240) == 0, (join_out / "job.log").read_text()[-4000:]
        assert trainer.wait(timeout=240) == 0, (train_out / "job.log").read_text()[-4000:]
    finally:
        for job in (joiner, trainer):
            if job.poll() is None:
                kill_job(job)
    assert serving.error is None, serving.error
    failures = {i: len(cluster.rest(f"/jobs/{i}/exceptions").get("exceptionHistory", {})
                       .get("entries", [])) for i in job_ids}
    metrics = json.loads((join_out / "metrics.json").read_text())["counters"]
    got, dead = read_records(bootstrap, "examples", "example")
    result = outcome(train_out)
    report = {"killed_pid": killed, "examples": expected,
              "joined_before_kill": joined_before_kill,
              "trained_before_kill": trained_before_kill, "job_failures": failures,
              "join_checkpoints": {i: cluster.checkpoints(i) for i in job_ids},
              "skipped_as_already_written_after_the_restore":
                  metrics.get("kafka_sink.records_already_written", 0),
              "written_after_the_restore": metrics.get("kafka_sink.records_written", 0),
              "clean": {k: v for k, v in logs["clean"].items() if k != "snapshots"},
              "recovered": {k: v for k, v in result.items() if k != "snapshots"}}
    print("KAFKA_JOIN_RECOVERY", json.dumps(report))
    assert all(n >= 1 for n in failures.values()), report  # both really failed and restarted
    assert joined_before_kill < expected, report  # the kill came mid-stream
    # every request joined exactly once, as the batch join joins it, in the same order
    assert dead == []
    assert [(e["ts_ms"], e["request_id"], e["label"]) for e in got] == logs["examples"], report
    same_as_clean(result, logs["clean"], report)
    assert flink.jobs_named(cluster.master, join_name) == []
