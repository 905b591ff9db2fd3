"""``transforms.kafka_source.ReadFromKafkaTopic`` on the DirectRunner, against a real broker:

* a bounded read gives every record of every partition once, each partition in offset
  order, stamped with its event time; given start/stop offsets read exactly that slice;
* fuzzed payloads (random bytes, other schemas, cut, no header, bad event time) among good
  records: every good record comes out once, every bad message is a dead letter with its
  reason, topic, partition and offset, and none is lost or counted twice;
* following a topic (unbounded) reads what is produced while it runs, until its stop time.
"""
from __future__ import annotations

import random
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from confluent_kafka import Producer

from dataflow.options import pipeline_options
from transforms.kafka_records import FINGERPRINT_HEADER, KafkaRecordCodec
from transforms.kafka_source import PartitionRange, ReadFromKafkaTopic, partition_ranges

pytestmark = pytest.mark.kafka


def _topic(broker, partitions: int) -> str:
    name = f"src-{uuid.uuid4().hex[:8]}"
    broker.create_topic(name, partitions=partitions)
    return name


def _actions(n: int, start_ms: int = 1_700_000_000_000) -> list:
    return [{"request_id": f"r{i}", "ts_ms": start_ms + 1000 * i,
             "action": ("click", "like", "share")[i % 3]} for i in range(n)]


def _produce(broker, topic: str, messages) -> None:
    """messages: (key, value, headers, partition or None), in order."""
    producer = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    for key, value, headers, partition in messages:
        kw = {} if partition is None else {"partition": partition}
        producer.produce(topic, value=value, key=key, headers=headers, **kw)
    assert producer.flush(30) == 0


def _good(codec, records, partitions: int):
    return [(*codec.encode(r), codec.headers, i % partitions) for i, r in enumerate(records)]


def _run(transform_fn):
    with beam.Pipeline(options=pipeline_options(["--runner=DirectRunner"])) as p:
        transform_fn(p)


def test_bounded_read_gives_every_record_once_in_partition_order(kafka_broker):
    topic = _topic(kafka_broker, 3)
    codec = KafkaRecordCodec("action_log")
    records = _actions(600)
    _produce(kafka_broker, topic, _good(codec, records, 3))

    def check(p):
        read = p | ReadFromKafkaTopic(kafka_broker.bootstrap, topic, "action_log")
        stamped = read | beam.Map(lambda r, t=beam.DoFn.TimestampParam: (
            r["request_id"], r["ts_ms"], int(t.micros // 1000)))
        assert_that(stamped, equal_to([(r["request_id"], r["ts_ms"], r["ts_ms"])
                                       for r in records]))
    _run(check)
    ranges = partition_ranges(kafka_broker.bootstrap, topic)
    assert [(r.partition, r.start, r.stop) for r in ranges] == [(0, 0, 200), (1, 0, 200),
                                                                (2, 0, 200)]


def test_given_offsets_read_exactly_that_slice(kafka_broker):
    topic = _topic(kafka_broker, 2)
    codec = KafkaRecordCodec("action_log")
    records = _actions(100)
    _produce(kafka_broker, topic, _good(codec, records, 2))
    # partition 0 holds records 0, 2, 4, ... at offsets 0, 1, 2, ...
    ranges = [PartitionRange(topic, 0, 10, 20), PartitionRange(topic, 1, 45, 50)]
    expected = [f"r{2 * o}" for o in range(10, 20)] + [f"r{2 * o + 1}" for o in range(45, 50)]

    def check(p):
        read = p | ReadFromKafkaTopic(kafka_broker.bootstrap, topic, "action_log", ranges=ranges)
        assert_that(read | beam.Map(lambda r: r["request_id"]), equal_to(expected))
    _run(check)



def test_messages_deleted_before_they_were_read_are_counted_not_passed_over(kafka_broker):
    """A restriction whose first offsets retention deleted (here: delete_records) reads what
    is left, and counts the offsets that held no message in ``offsets_skipped``."""
    from apache_beam.metrics.metric import MetricsFilter
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient
    topic = _topic(kafka_broker, 1)
    codec = KafkaRecordCodec("action_log")
    _produce(kafka_broker, topic, _good(codec, _actions(10), 1))
    admin = AdminClient({"bootstrap.servers": kafka_broker.bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 4)]).values():
        future.result(timeout=30)

    p = beam.Pipeline(options=pipeline_options(["--runner=DirectRunner"]))
    read = p | ReadFromKafkaTopic(kafka_broker.bootstrap, topic, "action_log",
                                  ranges=[PartitionRange(topic, 0, 0, 10)])
    assert_that(read | beam.Map(lambda r: r["request_id"]),
                equal_to([f"r{i}" for i in range(4, 10)]))
    result = p.run()
    result.wait_until_finish()
    skipped = result.metrics().query(MetricsFilter().with_name("offsets_skipped"))["counters"]
    assert sum(c.committed for c in skipped) == 4

def test_bad_messages_are_dead_letters_and_nothing_is_lost(kafka_broker):
    topic = _topic(kafka_broker, 2)
    codec = KafkaRecordCodec("action_log")
    other = KafkaRecordCodec("feature_log")
    rng = random.Random(7)
    records = _actions(300)
    messages, bad = [], {}
    for i, r in enumerate(records):
        part = i % 2
        messages.append((*codec.encode(r), codec.headers, part))
        if i % 7 == 3:  # a bad message after this good one
            key, value = codec.encode(r)
            kind = ("random", "cut", "no_header", "other_schema", "bad_time")[len(bad) % 5]
            if kind == "random":
                payload, headers = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))), \
                    codec.headers
            elif kind == "cut":
                payload, headers = value[:-2], codec.headers
            elif kind == "no_header":
                payload, headers = value, []
            elif kind == "other_schema":
                payload, headers = value, other.headers
            else:  # decodes, but its event time is out of Beam's range
                _, payload = codec.encode({**r, "ts_ms": -2**62})
                headers = codec.headers
            messages.append((key, payload, headers, part))
            bad[(part, sum(1 for m in messages if m[3] == part) - 1)] = kind
    _produce(kafka_broker, topic, messages)

    def check(p):
        good, dead = p | ReadFromKafkaTopic(kafka_broker.bootstrap, topic,
                                            "action_log").with_dead_letters()
        assert_that(good | beam.Map(lambda r: r["request_id"]),
                    equal_to([r["request_id"] for r in records]), label="good")
        assert_that(dead | beam.Map(lambda d: (d["topic"], d["partition"], d["offset"],
                                               bool(d["reason"]), d["payload"] is not None)),
                    equal_to([(topic, part, off, True, True) for part, off in bad]),
                    label="dead")
        reasons = dead | beam.Map(lambda d: d["reason"].split(":")[0])
        assert_that(reasons | beam.combiners.Count.PerElement() | beam.Keys(),
                    lambda got: _reasons_cover(got), label="reasons")
    _run(check)


def _reasons_cover(got) -> None:
    need = {"wrong_fingerprint", "no_fingerprint", "out_of_range"}
    assert need <= set(got), f"dead-letter reasons {sorted(got)} lack {sorted(need - set(got))}"
    assert set(got) <= need | {"corrupt_record", "trailing_bytes", "non_canonical",
                               "invalid_utf8"}, sorted(got)


def test_following_reads_what_comes_while_it_runs(kafka_broker):
    import threading
    topic = _topic(kafka_broker, 2)
    codec = KafkaRecordCodec("action_log")
    records = _actions(200)
    _produce(kafka_broker, topic, _good(codec, records[:100], 2))

    def later():  # the rest lands while the pipeline follows the topic
        time.sleep(2.0)
        _produce(kafka_broker, topic, _good(codec, records[100:], 2))
    producer = threading.Thread(target=later)
    producer.start()

    def check(p):
        read = p | ReadFromKafkaTopic(kafka_broker.bootstrap, topic, "action_log", stop=None,
                                      stop_timestamp=time.time() + 8, max_bundle_s=0.5)
        assert_that(read | beam.Map(lambda r: r["request_id"]),
                    equal_to([r["request_id"] for r in records]))
    try:
        _run(check)
    finally:
        producer.join()
