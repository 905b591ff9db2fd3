"""Training whose example log is a Kafka topic (issue #20): ``dataflow.train --input
kafka://HOST:PORT/TOPIC``.

* DirectRunner: a backfill over a one-partition topic that holds the session's example log
  (with bad messages among the examples) trains exactly as the backfill over its files does:
  the same examples, batches, gradient rows and online AUC; every bad message is a dead letter
  in the metrics folder with its topic, partition, offset and reason;
* batch, then online across transports: a backfill over the first files exports PS
  snapshots; the online job restores them and follows the topic that holds the *whole*
  stream, from the first example after the backfill's last event time: it trains on exactly
  the examples of the other files, none twice, none skipped.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import uuid

import pytest
from confluent_kafka import Producer

from test_train import check_exactly_once, run_train
from transforms.example_log import read_examples_in_order
from transforms.kafka_records import KafkaRecordCodec

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def produce_examples(broker, examples, partitions: int = 1, bad_every: int = 0) -> tuple:
    """A new topic holding ``examples`` in order (example i in partition i % partitions), a
    bad message after every ``bad_every``-th; returns (topic, bad messages' (partition,
    offset))."""
    topic = f"examples-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic, partitions=partitions)
    codec = KafkaRecordCodec("example")
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                         "linger.ms": 20})
    offsets = [0] * partitions
    bad = []
    for i, record in enumerate(examples):
        part = i % partitions
        key, value = codec.encode(record)
        producer.produce(topic, value=value, key=key, headers=codec.headers, partition=part,
                         timestamp=record["ts_ms"])
        offsets[part] += 1
        if bad_every and i % bad_every == bad_every - 1:
            producer.produce(topic, value=value[: len(value) // 2], key=key,
                             headers=codec.headers, partition=part)
            bad.append((part, offsets[part]))
            offsets[part] += 1
        if i % 10_000 == 0:
            producer.poll(0)
    assert producer.flush(60) == 0
    return topic, bad


def test_backfill_from_a_topic_equals_the_backfill_from_files(tmp_path, example_log,
                                                              kafka_broker):
    examples = list(read_examples_in_order(f"{example_log['dir']}/joined/examples"))
    topic, bad = produce_examples(kafka_broker, examples, bad_every=997)
    flags = ["--runner=DirectRunner", "--model=fm"]
    files = run_train(tmp_path / "files", "backfill",
                      f"{example_log['dir']}/joined/examples/*.avro",
                      [*flags, f"--store=memory://files-{tmp_path.name}"])
    kafka = run_train(tmp_path / "kafka", "backfill",
                      f"kafka://{kafka_broker.bootstrap}/{topic}",
                      [*flags, f"--store=memory://kafka-{tmp_path.name}"])
    check_exactly_once(kafka[0], example_log["examples"])
    for name in ("worker.examples", "worker.batches", "worker.gradient_rows_emitted",
                 "ps.gradient_rows_applied"):
        assert kafka[0].get(name) == files[0].get(name), name
    assert kafka[1]["auc"] == pytest.approx(files[1]["auc"], abs=1e-9)
    assert kafka[0]["kafka_source.dead_letters"] == len(bad) > 0
    letters = [json.loads(line) for path in glob.glob(str(kafka[2] / "dead_letter" / "*"))
               for line in open(path, encoding="utf-8")]
    assert sorted((d["partition"], d["offset"]) for d in letters) == sorted(bad)
    assert {d["topic"] for d in letters} == {topic}
    assert {d["reason"] for d in letters} <= {"corrupt_record", "trailing_bytes",
                                              "non_canonical", "invalid_utf8"}


def test_backfill_on_files_then_online_on_the_topic(tmp_path, example_log, kafka_broker):
    files = example_log["files"]
    split = int(len(files) * 0.75)
    backfill = tmp_path / "backfill-files"
    backfill.mkdir()
    for f in files[:split]:
        shutil.copy(f, backfill)
    before = list(read_examples_in_order(str(backfill)))
    everything = list(read_examples_in_order(f"{example_log['dir']}/joined/examples"))
    after = everything[len(before):]
    last_backfill_ts = max(e["ts_ms"] for e in before)
    assert min(e["ts_ms"] for e in after) > last_backfill_ts  # the files split by event time
    topic, _ = produce_examples(kafka_broker, everything)
    snapshots = tmp_path / "snapshots"
    run_train(tmp_path / "b", "backfill", f"{backfill}/*.avro",
              [f"--store=memory://bf-{tmp_path.name}", f"--export_dir={snapshots}"])
    counters, totals, _ = run_train(
        tmp_path / "online", "online", f"kafka://{kafka_broker.bootstrap}/{topic}",
        [f"--store=memory://online-{tmp_path.name}", f"--restore={snapshots}",
         "--poll_interval_s=0.2", "--run_for_s=4", "--streaming"])
    assert counters["ps.snapshots_restored"] == 3
    check_exactly_once(counters, len(after))  # each later example once, nothing earlier
    assert counters.get("kafka_source.examples_before_start", 0) == 0  # ordered: none met
    assert totals["examples"] == len(after)
