"""Kafka (issue #20): a real broker started by us, our records as messages, and the sink.

* the broker (``dataflow.kafka``): produce and consume through it with plain confluent-kafka;
  its command line starts, lists, creates and stops, and a broker started again on its folder
  has its topics; every JVM it started is gone afterwards;
* the codec (``transforms.kafka_records``): generated records of each schema round-trip
  exactly; arbitrary, truncated, bit-flipped and extended payloads and wrong headers never
  raise, and a payload decodes to a record exactly when that record encodes back to it;
* the sink (``transforms.kafka_sink.WriteToKafkaTopic``) on the DirectRunner: what it writes
  is read back the same; records that do not fit and messages the broker refuses are dead
  letters; a missing topic fails at once.
"""
from __future__ import annotations

import base64
import io
import os
import re
import subprocess
import sys
import time
import uuid

import apache_beam as beam
import fastavro
import pytest
from apache_beam.testing.util import assert_that, equal_to
from confluent_kafka import Consumer, Producer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataflow import kafka
from dataflow.flink import process_cmdline, process_group
from dataflow.options import pipeline_options
from schemas import load_schema
from transforms.kafka_records import (FINGERPRINT_HEADER, KafkaRecordCodec, schema_fingerprint)
from transforms.kafka_sink import METRICS_NAMESPACE, WriteToKafkaTopic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REASONS = {"no_payload", "no_fingerprint", "wrong_fingerprint", "invalid_utf8",
           "corrupt_record", "trailing_bytes", "non_canonical"}
SCHEMAS = ("feature_log", "action_log", "example")


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def consume_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    """Every message of a topic, read from the start of each partition (assigned: no group
    to join) until ``expected`` have come and no more come for 0.3 s (or ``timeout_s``)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("test"),
                         "enable.auto.commit": False})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    got, deadline = [], time.monotonic() + timeout_s
    try:
        while len(got) < expected and time.monotonic() < deadline:
            got += [m for m in consumer.consume(10_000, timeout=0.5) if m.error() is None]
        got += [m for m in consumer.consume(10_000, timeout=0.3) if m.error() is None]
    finally:
        consumer.close()
    return got


# ------------------------------------------------------------------ versions and setup

def test_the_kafka_version_is_the_same_in_the_makefile_the_pom_and_dataflow_kafka():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    pom = open(os.path.join(ROOT, "kafka", "pom.xml")).read()
    assert re.search(r"^KAFKA_VERSION\s*:=\s*(\S+)", makefile, re.M)[1] == kafka.KAFKA_VERSION
    assert re.search(r"<kafka.version>(.*)</kafka.version>", pom)[1] == kafka.KAFKA_VERSION


def test_missing_jars_fail_with_what_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("BEAM_MONOLITH_KAFKA_LIBS", str(tmp_path))
    with pytest.raises(kafka.KafkaSetupError, match="make kafka-dist"):
        kafka.KafkaBroker()


# ------------------------------------------------------------------ the broker

@pytest.mark.kafka
def test_the_broker_takes_and_gives_back_messages_of_every_partition(kafka_broker):
    topic = unique("plain")
    kafka_broker.create_topic(topic, partitions=3)
    assert kafka_broker.topics()[topic] == 3
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    sent = {(f"k{i}".encode(), f"v{i}".encode()) for i in range(3000)}
    for key, value in sent:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0
    got = consume_all(kafka_broker.bootstrap, topic, len(sent))
    assert {(m.key(), m.value()) for m in got} == sent and len(got) == len(sent)
    assert {m.partition() for m in got} == {0, 1, 2}
    # the same key always lands in the same partition
    assert len({(m.key(), m.partition()) for m in got}) == len(sent)


@pytest.mark.kafka
def test_creating_a_topic_twice_is_an_error_unless_exist_ok(kafka_broker):
    from confluent_kafka import KafkaException
    topic = unique("twice")
    kafka_broker.create_topic(topic, partitions=2)
    with pytest.raises(KafkaException, match="already exists"):
        kafka_broker.create_topic(topic, partitions=2)
    kafka_broker.create_topic(topic, partitions=2, exist_ok=True)


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dataflow.kafka", *args], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.kafka
@pytest.mark.slow  # two broker start-ups: 8-12 s
def test_cli_starts_creates_lists_stops_and_a_restart_keeps_the_topics(tmp_path):
    workdir = str(tmp_path / "broker")
    try:
        started = cli("start", "--workdir", workdir, "--partitions", "2")
        assert started.returncode == 0, started.stderr
        bootstrap = started.stdout.strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", bootstrap), started.stdout
        state = kafka.broker_state(workdir)
        assert state["bootstrap"] == bootstrap and "kafka.Kafka" in process_cmdline(state["pid"])
        again = cli("start", "--workdir", workdir)
        assert again.returncode == 2 and "still runs" in again.stderr
        assert cli("address", "--workdir", workdir).stdout.strip() == bootstrap
        made = cli("topics", "create", "events", "--workdir", workdir)
        assert made.returncode == 0, made.stderr
        assert cli("topics", "create", "wide", "--partitions", "5", "--workdir",
                   workdir).returncode == 0
        twice = cli("topics", "create", "wide", "--workdir", workdir)
        assert twice.returncode == 1 and "already exists" in twice.stderr
        assert cli("topics", "list", "--workdir", workdir).stdout == "events\t2\nwide\t5\n"
        stopped = cli("stop", "--workdir", workdir)
        assert stopped.stdout.strip() == "Kafka broker stopped"
        assert process_group(state["pid"]) == [] and kafka.broker_state(workdir) is None
        assert cli("stop", "--workdir", workdir).stdout.startswith("no Kafka broker")
        # started again on its folder: the same storage, its topics are there
        restarted = cli("start", "--workdir", workdir)
        assert restarted.returncode == 0, restarted.stderr
        assert cli("topics", "list", "--workdir", workdir).stdout == "events\t2\nwide\t5\n"
    finally:
        cli("stop", "--workdir", workdir)
    assert kafka.broker_state(workdir) is None
    assert not [pid for pid in _java_pids() if workdir in process_cmdline(pid)]


def _java_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()
            and "kafka.Kafka" in process_cmdline(int(p))]


# ------------------------------------------------------------------ the codec

def _text(max_size=12):
    return st.text(max_size=max_size)


_longs = st.integers(-2 ** 63, 2 ** 63 - 1)
_doubles = st.floats(allow_nan=False)
_optional_double = st.none() | _doubles
RECORDS = {
    "feature_log": st.fixed_dictionaries({
        "request_id": _text(), "ts_ms": _longs, "user_id": _text(), "item_id": _text(),
        "features": st.dictionaries(_text(8), st.none() | _text() | _longs | _doubles
                                    | st.lists(_text(6), max_size=4), max_size=6),
        "served_score": _optional_double, "true_ctr": _optional_double}),
    "action_log": st.fixed_dictionaries({
        "request_id": _text(), "ts_ms": _longs, "action": _text()}),
    "example": st.fixed_dictionaries({
        "request_id": _text(), "ts_ms": _longs, "user_id": _text(), "item_id": _text(),
        "fids": st.lists(_longs, max_size=20),
        "dense": st.lists(st.floats(allow_nan=False, width=32), max_size=8),
        "label": st.integers(-2 ** 31, 2 ** 31 - 1), "actions": st.lists(_text(6), max_size=4),
        "sample_rate": _doubles, "sample_weight": _doubles,
        "served_score": _optional_double, "true_ctr": _optional_double}),
}
CODECS = {name: KafkaRecordCodec(name) for name in SCHEMAS}
records_of_any_schema = st.sampled_from(SCHEMAS).flatmap(
    lambda name: st.tuples(st.just(name), RECORDS[name]))


def check_never_raises(codec: KafkaRecordCodec, payload: bytes):
    """Decoding gives a reason, or a record that encodes back to exactly the payload."""
    decoded = codec.decode(payload, codec.headers)
    if decoded.reason is None:
        assert codec.encode(decoded.record)[1] == payload
    else:
        assert decoded.record is None and decoded.reason in REASONS and decoded.detail
    return decoded


@settings(max_examples=300, deadline=None)
@given(named=records_of_any_schema)
def test_a_record_round_trips_exactly(named):
    name, record = named
    codec = CODECS[name]
    key, value = codec.encode(record)
    assert key == record["request_id"].encode("utf-8")
    assert codec.decode(value, codec.headers) == (record, None, "")
    assert fastavro.schemaless_reader(io.BytesIO(value), load_schema(name), None) == record
    assert codec.encode_records([record, record]) == [(key, value)] * 2


@settings(max_examples=600, deadline=None)
@given(name=st.sampled_from(SCHEMAS), payload=st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(name, payload):
    check_never_raises(CODECS[name], payload)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(named=records_of_any_schema, data=st.data())
def test_truncated_payloads_are_dead_letters(named, data):
    name, record = named
    value = CODECS[name].encode(record)[1]
    cut = data.draw(st.integers(0, len(value) - 1))
    decoded = check_never_raises(CODECS[name], value[:cut])
    assert decoded.reason in ("corrupt_record", "invalid_utf8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(named=records_of_any_schema, data=st.data())
def test_bit_flips_give_a_reason_or_a_record_that_encodes_to_them(named, data):
    name, record = named
    value = bytearray(CODECS[name].encode(record)[1])
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(value) - 1))
        value[bit // 8] ^= 1 << (bit % 8)
    check_never_raises(CODECS[name], bytes(value))


@settings(max_examples=200, deadline=None)
@given(named=records_of_any_schema, extra=st.binary(min_size=1, max_size=20))
def test_trailing_bytes_are_dead_letters(named, extra):
    name, record = named
    value = CODECS[name].encode(record)[1]
    assert check_never_raises(CODECS[name], value + extra).reason == "trailing_bytes"


@settings(max_examples=200, deadline=None)
@given(named=records_of_any_schema, header=st.none() | st.binary(max_size=12))
def test_a_missing_or_foreign_fingerprint_is_a_dead_letter(named, header):
    name, record = named
    codec = CODECS[name]
    value = codec.encode(record)[1]
    headers = [] if header is None else [(FINGERPRINT_HEADER, header)]
    decoded = codec.decode(value, headers)
    if header == codec.fingerprint:
        assert decoded.record == record
    elif header is None or len(header) != 8:
        assert decoded.reason == "no_fingerprint"
    else:
        assert decoded.reason == "wrong_fingerprint" and header.hex() in decoded.detail
    # the last fingerprint header counts; a record of another of our schemas is named
    assert codec.decode(value, headers + codec.headers).record == record
    other = next(CODECS[n] for n in SCHEMAS if n != name)
    assert other.decode(value, codec.headers) == (
        None, "wrong_fingerprint", f"the payload was written with schema {name} "
        f"({codec.fingerprint.hex()}), not {other.name} ({other.fingerprint.hex()})")


def test_fingerprints_follow_the_avro_specification():
    # CRC-64-AVRO of the parsing canonical form; the spec's vector for "null"
    assert int.from_bytes(schema_fingerprint("null"), "little", signed=True) == \
        7195948357588979594
    codec = KafkaRecordCodec("example")
    assert codec.headers == [("avro.schema.fingerprint", schema_fingerprint(
        load_schema("example")))]
    assert len({c.fingerprint for c in CODECS.values()}) == 3


def test_fastavros_lenient_union_index_is_caught():
    """fastavro reads a negative union index as Python indexing (-1: the last branch);
    the encoding is invalid, so the record is a dead letter, not a different record."""
    codec = KafkaRecordCodec({"type": "record", "name": "U", "fields": [
        {"name": "u", "type": ["null", "long", "string"]}]}, key_field=None)
    assert fastavro.schemaless_reader(io.BytesIO(b"\x03\x02"), codec.schema, None) == {"u": 1}
    assert codec.decode(b"\x03\x02", codec.headers).reason == "non_canonical"
    assert codec.decode(b"\x02\x02", codec.headers).record == {"u": 1}
    lenient = KafkaRecordCodec(codec.schema, key_field=None, strict=False)
    assert lenient.decode(b"\x03\x02", lenient.headers).record == {"u": 1}


def test_records_that_do_not_fit_or_have_no_string_key_raise_bad_record():
    from transforms.sources import BadRecord
    codec = CODECS["action_log"]
    with pytest.raises(BadRecord) as e:
        codec.encode({"request_id": "r1", "ts_ms": "noon", "action": "click"})
    assert e.value.reason == "not_encodable"
    with pytest.raises(BadRecord) as e:
        KafkaRecordCodec("action_log", key_field="ts_ms").encode(
            {"request_id": "r1", "ts_ms": 5, "action": "click"})
    assert e.value.reason == "wrong_type:ts_ms"
    assert KafkaRecordCodec("action_log", key_field=None).encode(
        {"request_id": "r1", "ts_ms": 5, "action": "click"})[0] is None


@pytest.mark.kafka
def test_consumed_messages_decode_or_become_dead_letters_with_their_place(kafka_broker):
    topic = unique("mixed")
    kafka_broker.create_topic(topic, partitions=2)
    codec, other = CODECS["action_log"], CODECS["example"]
    good = [{"request_id": f"r{i}", "ts_ms": 1_700_000_000_000 + i, "action": "click"}
            for i in range(200)]
    bad = [  # (value, headers, reason)
        (codec.encode(good[0])[1], None, "no_fingerprint"),
        (codec.encode(good[0])[1], other.headers, "wrong_fingerprint"),
        (codec.encode(good[0])[1][:-2], codec.headers, "corrupt_record"),
        (codec.encode(good[0])[1] + b"\x00", codec.headers, "trailing_bytes"),
        (b"\x04\xff\xfe\x02\x04ab", codec.headers, "invalid_utf8"),
        (None, codec.headers, "no_payload"),
        (b"\x00\x00\x00\x00\x07" + codec.encode(good[0])[1], None, "no_fingerprint"),
    ]
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for key, value in codec.encode_records(good):
        producer.produce(topic, value, key, headers=codec.headers)
    for value, headers, _ in bad:
        producer.produce(topic, value, b"bad", headers=headers)
    assert producer.flush(30) == 0
    messages = consume_all(kafka_broker.bootstrap, topic, len(good) + len(bad))
    decoded, dead = codec.decode_messages(messages)
    assert sorted((r for _, r in decoded), key=lambda r: r["request_id"]) == sorted(
        good, key=lambda r: r["request_id"])
    assert all(m.key() == r["request_id"].encode() for m, r in decoded)
    assert sorted(d["reason"] for d in dead) == sorted(reason for _, _, reason in bad)
    places = {(m.partition(), m.offset()) for m in messages}
    for d in dead:
        assert d["topic"] == topic and (d["partition"], d["offset"]) in places
        assert d["key"] == base64.b64encode(b"bad").decode() and d["records_lost"] == 0
        assert d["timestamp_ms"] > 0
    replay = {d["reason"]: d["payload"] and base64.b64decode(d["payload"]) for d in dead}
    assert replay["trailing_bytes"] == codec.encode(good[0])[1] + b"\x00"


# ------------------------------------------------------------------ the sink

def feature_records(n: int, start: int = 0) -> list[dict]:
    return [{"request_id": f"req-{i}", "ts_ms": 1_700_000_000_000 + i, "user_id": f"u{i % 7}",
             "item_id": f"i{i % 11}", "features": {"age": i % 90, "city": "x",
                                                   "tags": ["a", str(i)], "z": 0.5},
             "served_score": i / n, "true_ctr": None} for i in range(start, start + n)]


def run_pipeline(build) -> dict:
    """Runs a pipeline on the DirectRunner; returns its counters ``{name: value}``."""
    p = beam.Pipeline(options=pipeline_options([]))
    build(p)
    result = p.run()
    result.wait_until_finish()
    return {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
            if c.key.metric.namespace == METRICS_NAMESPACE}


@pytest.mark.kafka
def test_the_sink_writes_every_record_once_keyed_and_fingerprinted(kafka_broker):
    topic = unique("features")
    kafka_broker.create_topic(topic, partitions=4)
    records = feature_records(3000)
    unfit = [{"request_id": "no-time", "user_id": "u", "item_id": "i"},
             {"request_id": "bad-score", "ts_ms": 5, "user_id": "u", "item_id": "i",
              "served_score": "high"}]

    def build(p):
        _, dead = (p | beam.Create(records + unfit, reshuffle=False)
                   | WriteToKafkaTopic(kafka_broker.bootstrap, topic, "feature_log")
                   .with_dead_letters())
        assert_that(dead | beam.Map(lambda d: (d["record"]["request_id"], d["reason"],
                                               d["topic"])),
                    equal_to([("no-time", "not_encodable", topic),
                              ("bad-score", "not_encodable", topic)]))

    counters = run_pipeline(build)
    messages = consume_all(kafka_broker.bootstrap, topic, len(records))
    codec = CODECS["feature_log"]
    decoded, dead = codec.decode_messages(messages)
    assert dead == [] and len(decoded) == len(records)
    key = lambda r: r["request_id"]
    assert sorted((r for _, r in decoded), key=key) == sorted(records, key=key)
    assert all(m.key() == r["request_id"].encode() and m.headers() == codec.headers
               for m, r in decoded)
    assert counters["records_written"] == len(records) and counters["dead_letters"] == 2
    assert counters["bytes_written"] == sum(len(m.value()) + len(m.key()) for m in messages)


@pytest.mark.kafka
def test_messages_kafka_refuses_are_dead_letters_and_the_rest_is_written(kafka_broker):
    topic = unique("small")
    kafka_broker.create_topic(topic, partitions=1, config={"max.message.bytes": "4000"})
    records = feature_records(50)
    big = dict(records[0], request_id="big", features={"blob": "x" * 5000})  # the broker's no
    huge = dict(records[0], request_id="huge", features={"blob": "x" * 1_100_000})  # client's

    def build(p):
        _, dead = (p | beam.Create(records + [big, huge], reshuffle=False)
                   | WriteToKafkaTopic(kafka_broker.bootstrap, topic, "feature_log",
                                       # one message a batch: the broker refuses only `big`
                                       producer_config={"batch.num.messages": 1})
                   .with_dead_letters())
        assert_that(dead | beam.Map(lambda d: (d["reason"], d["topic"], d["key"] and
                                               base64.b64decode(d["key"]),
                                               d["record"] and d["record"]["request_id"])),
                    equal_to([("refused:MSG_SIZE_TOO_LARGE", topic, b"big", None),
                              ("refused:MSG_SIZE_TOO_LARGE", topic, None, "huge")]))

    counters = run_pipeline(build)
    assert counters["records_written"] == 50 and counters["dead_letters"] == 2
    got = consume_all(kafka_broker.bootstrap, topic, 50)
    assert sorted(m.key() for m in got) == sorted(r["request_id"].encode() for r in records)


@pytest.mark.kafka
def test_the_sink_fails_at_once_on_a_missing_topic(kafka_broker):
    with pytest.raises(Exception, match="does not exist.*topics create"):
        run_pipeline(lambda p: p | beam.Create(feature_records(1)) | WriteToKafkaTopic(
            kafka_broker.bootstrap, unique("missing"), "feature_log"))
