"""A log written to a Kafka topic instead of a folder: :class:`KafkaAvroLog`, the interface of
``dataflow.serving.feature_log.RollingAvroLog`` (``append``, ``advance``, ``close``, ``flush``,
``stats``, ``stop``) over a ``confluent_kafka.Producer``.

Each record is one message (``transforms.kafka_records``: schemaless Avro, the request id as
key, the schema's fingerprint in a header) whose timestamp is the record's event time. The
producer is idempotent (``acks=all``): librdkafka's retries neither lose, reorder nor double
a message of a partition. Where ``RollingAvroLog`` keeps ``_watermark.json``, this writes
**watermark marks** into every partition (``transforms.kafka_records.watermark_mark``) each
``mark_interval_s`` of event time it reaches, and at ``close``: a partition that gets no
record for a while still tells its readers how far event time has gone, so it does not hold
the join's windows open. :func:`end_topic` ends a topic whose writers are done.

A record that does not fit the schema, and a message the broker refuses, are counted in
``errors`` (and logged): serving goes on, as with a file it cannot write.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Optional

from transforms.kafka_records import END_OF_STREAM, KafkaRecordCodec, watermark_mark
from transforms.kafka_source import parse_kafka_url
from transforms.sources import BadRecord

__all__ = ["KafkaAvroLog", "end_topic", "topic_partitions"]

_LOG = logging.getLogger(__name__)


def _producer(bootstrap: str, config: Optional[dict] = None):
    from confluent_kafka import Producer
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                     "linger.ms": 5, **(config or {})})


def topic_partitions(url: str, producer=None, timeout_s: float = 30.0) -> list:
    """The partitions of a topic, asked of the broker.

    Args:
        url: ``kafka://HOST:PORT[,...]/TOPIC``.
        producer: a producer of that broker to ask through (default: a new one).
        timeout_s: how long to wait for the broker.

    Returns:
        The partition numbers, sorted.

    Raises:
        RuntimeError: the topic does not exist (the message says how to create it).
    """
    bootstrap, topic = parse_kafka_url(url)
    producer = producer or _producer(bootstrap)
    meta = producer.list_topics(topic, timeout=timeout_s).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise RuntimeError(f"Kafka topic {topic!r} does not exist on {bootstrap} "
                           f"({meta.error if meta is not None else 'no metadata'}): create it "
                           f"first (python -m dataflow.kafka topics create {topic})")
    return sorted(meta.partitions)


class KafkaAvroLog:
    """Records → the messages of a topic, with watermark marks (module docstring).

    Args:
        url: ``kafka://HOST:PORT[,...]/TOPIC`` (the topic must exist).
        schema_name: the records' schema in ``schemas/`` (``feature_log``, ``action_log``).
        roll_s: event-time seconds of ``RollingAvroLog``'s files: ``close()`` without
            ``until_ms`` marks the end of the open period, as ``RollingAvroLog`` does.
        mark_interval_s: event-time seconds between watermark marks.
        producer_config: librdkafka settings over ours.
        flush_timeout_s: how long ``flush`` waits for the broker.

    Raises:
        ValueError: ``roll_s`` or ``mark_interval_s`` not > 0, or a malformed URL.
        RuntimeError: the topic does not exist.

    Records must come in event-time order per writer, as for ``RollingAvroLog``: one earlier
    than a mark already written is still written, and counted in ``late``. It needs a broker,
    so this example is shown, not run (tests/test_kafka_log.py runs it)::

        log = KafkaAvroLog("kafka://127.0.0.1:9092/actions", "action_log", roll_s=60)
        log.append([{"request_id": "r1", "ts_ms": 1704067200000, "action": "click"}],
                   1704067200000)
        log.close()       # flushed; every partition marked up to the end of the period
    """

    def __init__(self, url: str, schema_name: str, roll_s: float, mark_interval_s: float = 5.0,
                 producer_config: Optional[dict] = None, flush_timeout_s: float = 60.0):
        if roll_s <= 0 or mark_interval_s <= 0:
            raise ValueError(f"roll_s and mark_interval_s must be > 0, got {roll_s}, "
                             f"{mark_interval_s}")
        self.url = url
        self.bootstrap, self.topic = parse_kafka_url(url)
        self.codec = KafkaRecordCodec(schema_name)
        self.roll_ms = int(roll_s * 1000)
        self.mark_ms = int(mark_interval_s * 1000)
        self.flush_timeout_s = flush_timeout_s
        self._producer = _producer(self.bootstrap, producer_config)
        self.partitions = topic_partitions(url, self._producer)
        self._lock = threading.Lock()
        self._time_ms: Optional[int] = None  # the latest event time appended or advanced to
        self._marked_ms: Optional[int] = None  # the latest mark written
        self.records = 0
        self.late = 0
        self.errors = 0
        self.marks = 0
        self.delivered = 0

    def _on_delivery(self, error, message):
        if error is None:
            self.delivered += 1
        else:
            self.errors += 1
            if self.errors <= 5 or self.errors % 1000 == 0:
                _LOG.error("Kafka log %s: a message was not delivered: %s", self.url, error)

    def _produce(self, value, key, headers, timestamp_ms: int, partition=None) -> None:
        kw = {} if partition is None else {"partition": partition}
        while True:
            try:
                self._producer.produce(self.topic, value, key, headers=headers,
                                       timestamp=timestamp_ms, on_delivery=self._on_delivery,
                                       **kw)
                return
            except BufferError:  # librdkafka's queue is full: let it send
                self._producer.poll(0.05)

    def append(self, records: list, ts_ms: int) -> None:
        """Produces records of event time ``ts_ms`` (all of one request), keyed by request
        id, with message timestamp ``ts_ms``.

        Args:
            records: dicts of the log's schema.
            ts_ms: their event time (ms since the epoch).
        """
        try:
            pairs = self.codec.encode_records(records)
        except BadRecord as e:
            self.errors += len(records)
            _LOG.error("Kafka log %s: %d records not written: %s", self.url, len(records), e)
            return
        with self._lock:
            if self._marked_ms is not None and ts_ms < self._marked_ms:
                self.late += len(records)
            headers = self.codec.headers
            for key, value in pairs:
                self._produce(value, key, headers, ts_ms)
            self.records += len(records)
            self._advance(ts_ms)
        self._producer.poll(0)

    def advance(self, ts_ms: int) -> None:
        """Tells the log that event time has reached ``ts_ms``: every partition gets a mark
        if ``mark_interval_s`` passed since the last one.

        Args:
            ts_ms: the event time (ms since the epoch).
        """
        with self._lock:
            self._advance(ts_ms)
        self._producer.poll(0)

    def _advance(self, ts_ms: int) -> None:
        if self._time_ms is None or ts_ms > self._time_ms:
            self._time_ms = ts_ms
        if self._marked_ms is None or ts_ms >= self._marked_ms + self.mark_ms:
            self._mark(ts_ms)

    def _mark(self, ts_ms: int) -> None:
        """A mark in every partition, after every record produced before it."""
        headers = watermark_mark(ts_ms)
        stamp = self._time_ms if ts_ms == END_OF_STREAM else ts_ms
        for partition in self.partitions:
            self._produce(None, None, headers, max(0, stamp or 0), partition)
        self.marks += 1
        if ts_ms != END_OF_STREAM:
            self._marked_ms = ts_ms

    def close(self, until_ms: Optional[int] = None) -> None:
        """Marks every partition up to ``until_ms`` and waits until the broker has every
        message.

        Args:
            until_ms: the event time that nothing written later is before (default: the
                end of the open period of ``roll_s``, as ``RollingAvroLog`` closes a file);
                ``END_OF_STREAM`` ends the topic's partitions for their readers.
        """
        with self._lock:
            end = until_ms
            if end is None and self._time_ms is not None:
                end = self._time_ms - self._time_ms % self.roll_ms + self.roll_ms
            if end is not None and (self._marked_ms is None or end > self._marked_ms):
                self._mark(end)
        self.flush()

    def flush(self) -> None:
        """Waits until the broker acknowledged (or refused) every message produced so far."""
        left = self._producer.flush(self.flush_timeout_s)
        if left:
            self.errors += left
            _LOG.error("Kafka log %s: %d messages still queued after %.0f s", self.url, left,
                       self.flush_timeout_s)

    def stats(self) -> dict:
        """Returns: ``{"records", "files", "late", "errors", "marks", "delivered"}`` so far
        (``files`` is 0: the interface of ``RollingAvroLog``; ``delivered`` counts marks'
        messages too)."""
        return {"records": self.records, "files": 0, "late": self.late, "errors": self.errors,
                "marks": self.marks, "delivered": self.delivered}

    files = property(lambda self: 0)

    def stop(self) -> None:
        """:meth:`close`, then lets the producer go (its connections are closed): the
        writer is done."""
        self.close()
        self._producer = None


def end_topic(url: str, timeout_s: float = 60.0) -> None:
    """Ends every partition of a topic for its readers (an ``END_OF_STREAM`` mark), once its
    writers are done: a reader that follows it (``ReadFromKafkaTopic(stop=None)``) ends each
    partition there, and its watermark goes to the end of time.

    Args:
        url: ``kafka://HOST:PORT[,...]/TOPIC``.
        timeout_s: how long to wait for the broker.

    Raises:
        RuntimeError: the topic does not exist, or the broker did not take the marks.
    """
    bootstrap, topic = parse_kafka_url(url)
    producer = _producer(bootstrap)
    failed = []
    for partition in topic_partitions(url, producer, timeout_s):
        producer.produce(topic, None, None, headers=watermark_mark(END_OF_STREAM),
                         partition=partition, timestamp=int(time.time() * 1000),
                         on_delivery=lambda e, m: failed.append(e) if e else None)
    if producer.flush(timeout_s) or failed:
        raise RuntimeError(f"Kafka topic {topic!r}: the end marks were not delivered "
                           f"({failed[:1] or 'timed out'})")
