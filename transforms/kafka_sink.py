"""Writing records to a Kafka topic: :class:`WriteToKafkaTopic`.

Each record becomes one message (``transforms.kafka_records``: Avro binary, keyed by the
request id, the schema's fingerprint in a header), produced with ``confluent-kafka``
(librdkafka) by an idempotent producer (``acks=all``: a message is acknowledged once the
broker has it; librdkafka's own retries neither reorder nor duplicate it).

**At least once.** A bundle's messages are produced as its records come and flushed in
``finish_bundle``: the bundle ends, and Beam (Flink: the checkpoint) commits it, only after
the broker acknowledged every one of them. If one could not be delivered, the bundle fails
and Beam retries it, so a record may be written twice (its earlier delivered copies stay),
never lost. Readers that need exactly once deduplicate by key (the request id), as the
joiner does.

A record that does not fit the schema, and a message that no broker would take (too large,
refused as invalid) are dead letters (``.with_dead_letters()``), never a failed job. A topic
that does not exist fails the job at once, with what to run (auto-creation would hide a
misspelt name).
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import apache_beam as beam
from apache_beam.metrics import Metrics
from confluent_kafka import KafkaException, Producer
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.kafka_records import KafkaRecordCodec, kafka_dead_letter
from transforms.sources import DEAD_LETTER, BadRecord, WithDeadLetters

__all__ = ["WriteToKafkaTopic", "WriteToKafkaFn", "METRICS_NAMESPACE"]

_LOG = logging.getLogger(__name__)

METRICS_NAMESPACE = "kafka_sink"
# Broker answers that retrying the same message cannot change: the record is dead-lettered.
_PERMANENT_ERRORS = frozenset({10, 18, 87, 4})  # MSG_SIZE_TOO_LARGE, RECORD_LIST_TOO_LARGE,
#                                                 INVALID_RECORD, INVALID_MSG_SIZE
_MAX_REPR = 2000


def _unsent_dead_letter(record, topic: str, reason: str, detail: str) -> dict:
    """The dead letter of a record that was not written (the shape of
    ``kafka_dead_letter``, without a place in the topic)."""
    if not isinstance(record, dict):
        record = repr(record)[:_MAX_REPR]
    return {"reason": reason, "detail": detail, "topic": topic, "partition": None,
            "offset": None, "timestamp_ms": None, "key": None, "payload": None,
            "record": record, "records_lost": 0}


class WriteToKafkaFn(beam.DoFn):
    """Produces each record to a topic; flushes at the end of every bundle (module
    docstring). Its main output is empty; ``dead_letter`` gets what could not be written.

    Beam counters (namespace ``kafka_sink``): ``records_written`` and ``bytes_written``
    (keys and values of the messages the broker acknowledged), ``dead_letters``,
    ``bundles_failed`` (a delivery failed: the bundle is retried).

    Args: as :class:`WriteToKafkaTopic`'s.
    """

    def __init__(self, bootstrap: str, topic: str, schema, key_field: Optional[str],
                 producer_config: Optional[dict] = None, flush_timeout_s: float = 600.0):
        self.bootstrap, self.topic = bootstrap, topic
        self.schema, self.key_field = schema, key_field
        self.producer_config = dict(producer_config or {})
        self.flush_timeout_s = flush_timeout_s
        self.records_written = Metrics.counter(METRICS_NAMESPACE, "records_written")
        self.bytes_written = Metrics.counter(METRICS_NAMESPACE, "bytes_written")
        self.dead_letters = Metrics.counter(METRICS_NAMESPACE, "dead_letters")
        self.bundles_failed = Metrics.counter(METRICS_NAMESPACE, "bundles_failed")
        self._producer = None

    def config(self) -> dict:
        """The producer's configuration: ours, then ``producer_config`` over it."""
        return {"bootstrap.servers": self.bootstrap, "enable.idempotence": True,
                "acks": "all", "linger.ms": 5, "client.id": f"beam-monolith-{self.topic}",
                **self.producer_config}

    def setup(self):
        self._codec = KafkaRecordCodec(self.schema, self.key_field)
        self._headers = self._codec.headers
        self._new_producer()

    def _new_producer(self):
        self._producer = Producer(self.config())
        topic = self._producer.list_topics(self.topic, timeout=60).topics.get(self.topic)
        if topic is None or topic.error is not None:
            self._producer = None  # freed now: no client left polling the brokers
            raise RuntimeError(
                f"Kafka topic {self.topic!r} does not exist on {self.bootstrap} "
                f"({topic.error if topic is not None else 'no metadata'}): create it first "
                f"(python -m dataflow.kafka topics create {self.topic} --partitions N)")

    def start_bundle(self):
        if self._producer is None:  # the last one failed fatally
            self._new_producer()
        self._delivered = self._delivered_bytes = 0
        self._retryable: list = []  # (error) of messages to write again: fail the bundle
        self._refused: list = []  # (dead letter, timestamp, window) of refused messages

    def process(self, record, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        try:
            key, value = self._codec.encode(record)
        except BadRecord as e:
            self.dead_letters.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER, _unsent_dead_letter(record, self.topic, e.reason, e.detail))
            return
        on_delivery = functools.partial(self._on_delivery, timestamp, window)
        # The message's timestamp is the element's event time, so that a reader can find
        # where an event time starts (offsets_for_times); the broker's clock otherwise.
        ts_ms = int(timestamp.micros // 1000) if MIN_TIMESTAMP < timestamp < MAX_TIMESTAMP \
            and timestamp.micros >= 0 else 0
        while True:
            try:
                self._producer.produce(self.topic, value, key, headers=self._headers,
                                       on_delivery=on_delivery, timestamp=ts_ms)
                break
            except BufferError:  # librdkafka's queue is full: let it send, then again
                self._producer.poll(0.05)
            except KafkaException as e:  # refused before sending (larger than allowed, ...)
                error = e.args[0]
                if error.code() not in _PERMANENT_ERRORS:
                    raise
                self.dead_letters.inc()
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, _unsent_dead_letter(
                    record, self.topic, f"refused:{error.name()}", error.str()))
                return
        self._producer.poll(0)  # serve delivery reports of earlier messages

    def _on_delivery(self, timestamp, window, error, message):
        if error is None:
            self._delivered += 1
            self._delivered_bytes += len(message.value()) + len(message.key() or b"")
        elif error.code() in _PERMANENT_ERRORS and not error.fatal():
            self._refused.append((kafka_dead_letter(message, f"refused:{error.name()}",
                                                    error.str()), timestamp, window))
        else:
            self._retryable.append(error)

    def finish_bundle(self):
        remaining = self._producer.flush(self.flush_timeout_s)
        self.records_written.inc(self._delivered)
        self.bytes_written.inc(self._delivered_bytes)
        if remaining or self._retryable:
            self.bundles_failed.inc()
            errors = self._retryable
            if any(e.fatal() for e in errors):
                self._producer = None  # an idempotent producer's fatal error: a new one
            raise RuntimeError(
                f"{len(errors) + remaining} messages to Kafka topic {self.topic!r} were not "
                f"delivered ({remaining} still queued after {self.flush_timeout_s:.0f}s; "
                f"first error: {errors[0].str() if errors else 'none'}): Beam retries the "
                f"bundle ({self._delivered} of it were delivered and will be written again)")
        for dead, timestamp, window in self._refused:
            self.dead_letters.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, WindowedValue(dead, timestamp, [window]))

    def teardown(self):
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None


class WriteToKafkaTopic(WithDeadLetters, beam.PTransform):
    """Records → messages of a Kafka topic, at least once (module docstring).

    Args:
        bootstrap: the brokers, ``HOST:PORT[,HOST:PORT...]``.
        topic: the topic; it must exist.
        schema: the records' schema: a name of ``schemas/`` (``"feature_log"``,
            ``"action_log"``, ``"example"``) or a schema (dict).
        key_field: the field that is the message key (None: no key).
        producer_config: librdkafka settings over ours (``{"compression.type": "lz4"}``).

    Returns:
        (``expand``) an empty PCollection, or ``(it, dead letters)`` after
        ``.with_dead_letters()``: records that do not fit the schema and messages the
        broker refused, each with its reason (``transforms.kafka_records``).

    It needs a broker, so this example is shown, not run (tests/test_kafka.py runs it):

    >>> with beam.Pipeline() as p:                                    # doctest: +SKIP
    ...     _, dead = (p | beam.Create(actions)
    ...                  | WriteToKafkaTopic("127.0.0.1:9092", "actions", "action_log")
    ...                  .with_dead_letters())
    """

    def __init__(self, bootstrap: str, topic: str, schema, key_field: Optional[str] =
                 "request_id", producer_config: Optional[dict] = None):
        super().__init__()
        self.fn = WriteToKafkaFn(bootstrap, topic, schema, key_field, producer_config)
        KafkaRecordCodec(schema, key_field)  # a wrong schema fails here, not on a worker

    def expand(self, records):
        return self.split_dead_letters(
            records | "Produce" >> beam.ParDo(self.fn).with_outputs(DEAD_LETTER))
