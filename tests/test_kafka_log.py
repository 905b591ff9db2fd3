"""Logs written to Kafka topics (issue #20 part 3) and the watermark marks their readers follow:

* ``dataflow.serving.kafka_log.KafkaAvroLog`` (serving's feature log and the simulator's
  action log given ``kafka://``): every record once, keyed by request id, its message
  timestamp its event time, in order per partition; a watermark mark in every partition each
  ``mark_interval_s`` of event time and at ``close``; a record behind a mark counted late; the
  child-process writer (``ProcessAvroLog``) writes the same; a missing topic fails at once;
* ``transforms.kafka_source.ReadFromKafkaTopic`` moves a partition's watermark to a mark (a
  partition with no records does not hold the watermark back), ends a partition at an
  end-of-stream mark, and never passes marks on as records or dead letters;
* ``read_records`` reads a topic's records back without Beam.
"""
from __future__ import annotations

import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.utils.timestamp import Timestamp

from dataflow.options import pipeline_options
from dataflow.serving.feature_log import ProcessAvroLog, open_log
from dataflow.serving.kafka_log import KafkaAvroLog, end_topic
from transforms.kafka_records import END_OF_STREAM, mark_of
from transforms.kafka_source import (PartitionRange, ReadFromKafkaTopic, _FollowPartitionFn,
                                     read_records)
from transforms.tail import NO_END

from test_kafka import consume_all

pytestmark = pytest.mark.kafka

T0 = 1_704_067_200_000  # 2024-01-01


def _topic(broker, partitions: int) -> str:
    name = f"log-{uuid.uuid4().hex[:8]}"
    broker.create_topic(name, partitions=partitions)
    return name


def _actions(n: int, every_ms: int = 700) -> list:
    return [{"request_id": f"r{i}", "ts_ms": T0 + every_ms * i, "action": "click"}
            for i in range(n)]


def _by_partition(messages) -> dict:
    out: dict = {}
    for m in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        out.setdefault(m.partition(), []).append(m)
    return out


def test_records_are_keyed_stamped_and_every_partition_is_marked(kafka_broker):
    topic = _topic(kafka_broker, 3)
    url = f"kafka://{kafka_broker.bootstrap}/{topic}"
    log = open_log(url, "action_log", roll_s=60)
    assert isinstance(log, KafkaAvroLog)
    records = _actions(100)  # 70 s of event time
    for r in records:
        log.append([r], r["ts_ms"])
    log.advance(T0 + 75_000)
    log.append([{"request_id": "late", "ts_ms": T0 + 1, "action": "click"}], T0 + 1)
    log.stop()  # marks the end of the open period: T0 + 120 s
    stats = log.stats()
    assert stats["records"] == 101 and stats["late"] == 1 and stats["errors"] == 0

    messages = consume_all(kafka_broker.bootstrap, topic, 101 + 3 * stats["marks"])
    marks = [m for m in messages if mark_of(m) is not None]
    rows = [m for m in messages if mark_of(m) is None]
    assert len(marks) == 3 * stats["marks"] and stats["delivered"] == len(messages)
    assert sorted(m.key() for m in rows) == sorted(r["request_id"].encode() for r in records
                                                   + [{"request_id": "late"}])
    # a message's timestamp is its record's event time
    assert all(m.timestamp()[1] == int(r["ts_ms"]) for m, r in zip(
        sorted(rows, key=lambda m: m.key()),
        sorted(records + [{"ts_ms": T0 + 1, "request_id": "late"}],
               key=lambda r: r["request_id"].encode())))
    for partition, ms in _by_partition(messages).items():
        seen_marks = [mark_of(m) for m in ms if mark_of(m) is not None]
        # one mark each 5 s of event time at most, in order, the last at the period's end
        assert seen_marks == sorted(seen_marks) and seen_marks[-1] == T0 + 120_000, partition
        assert len(seen_marks) == stats["marks"]
        assert all(b - a >= 5000 for a, b in zip(seen_marks[:-2], seen_marks[1:-1]))
        # every record after a mark is at or after it, but the one appended late
        mark = None
        for m in ms:
            if mark_of(m) is not None:
                mark = mark_of(m)
            elif m.key() != b"late":
                assert mark is None or m.timestamp()[1] >= mark


def test_the_child_process_writer_writes_the_same_and_a_missing_topic_fails_at_once(
        kafka_broker):
    topic = _topic(kafka_broker, 2)
    url = f"kafka://{kafka_broker.bootstrap}/{topic}"
    log = ProcessAvroLog(url, "action_log", roll_s=60)
    records = _actions(50)
    for r in records:
        log.append([r], r["ts_ms"])
    log.stop()
    assert log.stats()["records"] == 50 and log.stats()["errors"] == 0
    got, dead = read_records(kafka_broker.bootstrap, topic, "action_log")
    assert dead == [] and sorted(r["request_id"] for r in got) == sorted(
        r["request_id"] for r in records)
    missing = f"kafka://{kafka_broker.bootstrap}/no-such-{uuid.uuid4().hex[:6]}"
    for make in (lambda: ProcessAvroLog(missing, "action_log", 60),
                 lambda: KafkaAvroLog(missing, "action_log", 60)):
        with pytest.raises(RuntimeError, match="does not exist.*topics create"):
            make()


def test_a_mark_moves_an_idle_partitions_watermark(kafka_broker):
    """Partition 1 gets no record, only the writer's marks: its reader's watermark follows
    them (records move partition 0's), and no mark comes out as a record."""
    topic = _topic(kafka_broker, 2)
    log = KafkaAvroLog(f"kafka://{kafka_broker.bootstrap}/{topic}", "action_log", roll_s=60)
    records = [dict(r, request_id=f"p0-{i}") for i, r in enumerate(_actions(20))]
    from confluent_kafka import Producer
    from transforms.kafka_records import KafkaRecordCodec
    codec = KafkaRecordCodec("action_log")
    # the writer's records all to partition 0 (its partitioner would spread them)
    raw = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for r in records:
        raw.produce(topic, codec.encode(r)[1], r["request_id"], headers=codec.headers,
                    partition=0, timestamp=r["ts_ms"])
        raw.flush(10)
        log.advance(r["ts_ms"])
    log.stop()  # marks T0 + 60 s, the end of the open period

    fn = _FollowPartitionFn(kafka_broker.bootstrap, "action_log", "request_id", "ts_ms", 5.0,
                            0.1, 1000, None, poll_interval_s=0.1, stop_timestamp=None)
    fn.setup()
    try:
        for partition, want_records in ((0, len(records)), (1, 0)):
            tracker = RestrictionTrackerView(ThreadsafeRestrictionTracker(
                OffsetRestrictionTracker(OffsetRange(0, NO_END))))
            watermark = ManualWatermarkEstimator(None)
            out = list(fn.process(tuple(PartitionRange(topic, partition, 0, None)), tracker,
                                  watermark))
            assert len(out) == want_records, partition
            assert watermark.current_watermark() == Timestamp(micros=(T0 + 60_000) * 1000)
    finally:
        fn.teardown()


def test_end_marks_end_a_followed_read_and_what_comes_after_is_not_read(kafka_broker):
    topic = _topic(kafka_broker, 2)
    url = f"kafka://{kafka_broker.bootstrap}/{topic}"
    log = KafkaAvroLog(url, "action_log", roll_s=60)
    records = _actions(200)
    for r in records:
        log.append([r], r["ts_ms"])
    log.stop()
    end_topic(url)
    after = KafkaAvroLog(url, "action_log", roll_s=60)  # a writer after the end: not read
    after.append([{"request_id": "after-the-end", "ts_ms": T0 + 10**6, "action": "x"}],
                 T0 + 10**6)
    after.stop()

    started = time.monotonic()
    with beam.Pipeline(options=pipeline_options(["--runner=DirectRunner"])) as p:
        read, dead = p | ReadFromKafkaTopic(
            kafka_broker.bootstrap, topic, "action_log", stop=None,
            stop_timestamp=time.time() + 120, max_bundle_s=0.5).with_dead_letters()
        assert_that(read | beam.Map(lambda r: r["request_id"]),
                    equal_to([r["request_id"] for r in records]))
        assert_that(dead, equal_to([]), label="no dead letters")
    # it ended at the end marks, not at its stop time
    assert time.monotonic() - started < 60
    got, dead = read_records(kafka_broker.bootstrap, topic, "action_log")
    assert dead == [] and len(got) == 201 and END_OF_STREAM > 0


# ------------------------------------------------------------------ each once, in order


def _examples(n: int) -> list:
    """Examples of n requests (two candidates each, the same event time), shuffled."""
    import random
    out = [{"request_id": f"q{i // 2}-{i % 2}", "ts_ms": T0 + 1000 * (i // 2), "user_id": "u",
            "item_id": f"i{i % 7}", "fids": [i], "label": i % 3 == 0} for i in range(n)]
    random.Random(5).shuffle(out)
    return out


def _write_in_order(broker, topic, records, window_ms=300_000):
    """The join's writer over records stamped as the joiner stamps examples."""
    from apache_beam.transforms.window import TimestampedValue
    from transforms.kafka_sink import WriteToKafkaTopicInOrder
    p = beam.Pipeline(options=pipeline_options(["--runner=DirectRunner"]))
    _, dead = (p | beam.Create(records, reshuffle=False)
               | beam.Map(lambda r: TimestampedValue(r, (r["ts_ms"] + window_ms) / 1000))
               | WriteToKafkaTopicInOrder(broker.bootstrap, topic, "example")
               .with_dead_letters())
    assert_that(dead, equal_to([]))
    result = p.run()
    result.wait_until_finish()
    from apache_beam.metrics.metric import MetricsFilter
    return {c.key.metric.name: c.committed
            for c in result.metrics().query(MetricsFilter())["counters"]}


def _partitions_in_order(broker, topic) -> dict:
    messages = consume_all(broker.bootstrap, topic, 1)
    from transforms.kafka_records import KafkaRecordCodec
    codec = KafkaRecordCodec("example")
    out: dict = {}
    for partition, ms in _by_partition(messages).items():
        good, dead = codec.decode_messages(ms)
        assert dead == []
        out[partition] = [(r["ts_ms"], r["request_id"]) for _, r in good]
        # the message timestamp is the example's event time
        assert [m.timestamp()[1] for m, _ in good] == [ts for ts, _ in out[partition]]
    return out


def test_the_ordered_writer_writes_each_record_once_in_order_where_librdkafka_would(
        kafka_broker):
    from transforms.kafka_sink import kafka_partition
    topic = _topic(kafka_broker, 3)
    records = _examples(600)
    _write_in_order(kafka_broker, topic, records)
    got = _partitions_in_order(kafka_broker, topic)
    assert sorted(x for xs in got.values() for x in xs) == sorted(
        (r["ts_ms"], r["request_id"]) for r in records)
    for partition, keys in got.items():
        assert keys == sorted(keys), partition  # (event time, request id) order
        assert {kafka_partition(k.encode(), 3) for _, k in keys} == {partition}
    # librdkafka's default partitioner puts a key where kafka_partition says
    other = _topic(kafka_broker, 3)
    log = KafkaAvroLog(f"kafka://{kafka_broker.bootstrap}/{other}", "action_log", roll_s=60)
    for i in range(60):
        log.append([{"request_id": f"k{i}", "ts_ms": T0 + i, "action": "x"}], T0 + i)
    log.stop()
    placed = {m.key(): m.partition() for m in consume_all(kafka_broker.bootstrap, other, 60)
              if m.key() is not None}
    assert len(placed) == 60 and all(p == kafka_partition(k, 3) for k, p in placed.items())


def test_a_writer_started_again_skips_what_its_partition_already_holds(kafka_broker):
    """What a job wrote before it failed is in the topic; the job started again (from a
    checkpoint, or from the start) emits it again: none of it is written twice, the rest
    once, in order."""
    topic = _topic(kafka_broker, 2)
    records = _examples(400)
    ordered = sorted(records, key=lambda r: (r["ts_ms"], r["request_id"]))
    before = ordered[:150]  # what the failed job had written (all partitions' first ones)
    _write_in_order(kafka_broker, topic, before)
    counters = _write_in_order(kafka_broker, topic, records)
    assert counters["records_already_written"] == 150
    assert counters["records_written"] == 250
    got = _partitions_in_order(kafka_broker, topic)
    assert sorted(x for xs in got.values() for x in xs) == [
        (r["ts_ms"], r["request_id"]) for r in ordered]
    assert all(keys == sorted(keys) for keys in got.values())


def test_a_record_behind_the_watermark_is_an_out_of_order_dead_letter(kafka_broker):
    """The order is checked, not assumed: a record that comes after the watermark passed
    it (its input was out of order) is not written behind later ones but dead-lettered."""
    from apache_beam.testing.test_stream import TestStream
    from apache_beam.transforms.window import TimestampedValue
    from transforms.kafka_sink import WriteToKafkaTopicInOrder
    topic = _topic(kafka_broker, 1)
    ex = lambda rid, ts: {"request_id": rid, "ts_ms": ts, "user_id": "u", "item_id": "i",
                          "fids": [1], "label": 0}
    stream = (TestStream()
              .add_elements([TimestampedValue(ex("a", T0), T0 / 1000),
                             TimestampedValue(ex("b", T0 + 5000), (T0 + 5000) / 1000)])
              .advance_watermark_to((T0 + 10_000) / 1000)
              .add_elements([TimestampedValue(ex("late", T0 + 1000), (T0 + 1000) / 1000),
                             TimestampedValue(ex("c", T0 + 20_000), (T0 + 20_000) / 1000)])
              # (what timers emit at the final watermark does not reach a GroupByKey on
              # this runner: docs/pitfalls.md)
              .advance_watermark_to((T0 + 30_000) / 1000)
              .advance_watermark_to_infinity())
    with beam.Pipeline(options=pipeline_options(["--runner=DirectRunner", "--streaming"])) as p:
        _, dead = (p | stream | WriteToKafkaTopicInOrder(kafka_broker.bootstrap, topic,
                                                          "example").with_dead_letters())
        assert_that(dead | beam.Map(lambda d: (d["reason"], d["record"]["request_id"])),
                    equal_to([("out_of_order", "late")]))
    assert _partitions_in_order(kafka_broker, topic) == {
        0: [(T0, "a"), (T0 + 5000, "b"), (T0 + 20_000, "c")]}
