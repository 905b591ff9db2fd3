"""Writing records to a Kafka topic: :class:`WriteToKafkaTopic` (at least once) and
:class:`WriteToKafkaTopicInOrder` (each once, in order).

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

**Each once, in order** (:class:`WriteToKafkaTopicInOrder`, the join's examples): records
are put in ``(event time, key)`` order per partition once the watermark passes them, and
written by one writer per partition that first reads the partition's last record and skips
what is at or before it. A job restored from a checkpoint emits again what it had written
after it; none of it is written twice, with nothing but the order's last key in the
checkpoint. Why not Kafka transactions committed in a bundle finalizer: Beam 2.62's Flink
runner (``ExecutableStageDoFnOperator.notifyCheckpointComplete``) finalizes *every*
outstanding bundle when *any* checkpoint completes, those finished after its barrier too,
and keeps the list in memory only: a transaction would be committed before its checkpoint
(a restore writes it again) or, if the TaskManager dies between the checkpoint and the
notification, never (lost), and librdkafka cannot resume another producer's transaction.

A record that does not fit the schema, and a message that no broker would take (too large,
refused as invalid) are dead letters (``.with_dead_letters()``), never a failed job. A topic
that does not exist fails the job at once, with what to run (auto-creation would hide a
misspelt name).
"""
from __future__ import annotations

import functools
import logging
import zlib
from typing import Any, Optional, Tuple

import apache_beam as beam
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, ReadModifyWriteStateSpec, TimerSpec,
                                             on_timer)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp
from apache_beam.utils.windowed_value import WindowedValue
from confluent_kafka import KafkaException, Producer

from transforms.kafka_records import KafkaRecordCodec, kafka_dead_letter
from transforms.sources import DEAD_LETTER, BadRecord, WithDeadLetters

__all__ = ["WriteToKafkaTopic", "WriteToKafkaFn", "WriteToKafkaTopicInOrder", "WriteOnceInOrderFn",
           "OrderByEventTimeFn", "kafka_partition", "order_key", "METRICS_NAMESPACE"]

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
                 producer_config: Optional[dict] = None, flush_timeout_s: float = 600.0,
                 time_field: Optional[str] = None):
        self.bootstrap, self.topic = bootstrap, topic
        self.schema, self.key_field = schema, key_field
        self.time_field = time_field
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
        yield from self._produce(record, timestamp, window)

    def _produce(self, record, timestamp, window, partition: Optional[int] = None):
        """Produces one record (to ``partition``, else where the producer's partitioner puts
        its key); yields its dead letter if it cannot be written."""
        try:
            key, value = self._codec.encode(record)
        except BadRecord as e:
            self.dead_letters.inc()
            yield beam.pvalue.TaggedOutput(
                DEAD_LETTER, _unsent_dead_letter(record, self.topic, e.reason, e.detail))
            return
        on_delivery = functools.partial(self._on_delivery, timestamp, window)
        kw = {} if partition is None else {"partition": partition}
        # The message's timestamp is the event time (the record's time_field, else the
        # element's), so that a reader can find where an event time starts (offsets_for_times).
        if self.time_field is not None:
            kw["timestamp"] = int(record[self.time_field])
        elif MIN_TIMESTAMP < timestamp < MAX_TIMESTAMP and timestamp.micros >= 0:
            kw["timestamp"] = int(timestamp.micros // 1000)
        while True:
            try:
                self._producer.produce(self.topic, value, key, headers=self._headers,
                                       on_delivery=on_delivery, **kw)
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
        time_field: the field whose value (ms) is the message timestamp (None: the time of
            producing).

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
                 "request_id", producer_config: Optional[dict] = None,
                 time_field: Optional[str] = None):
        super().__init__()
        self.fn = WriteToKafkaFn(bootstrap, topic, schema, key_field, producer_config,
                                 time_field=time_field)
        KafkaRecordCodec(schema, key_field)  # a wrong schema fails here, not on a worker

    def expand(self, records):
        return self.split_dead_letters(
            records | "Produce" >> beam.ParDo(self.fn).with_outputs(DEAD_LETTER))


# ---------------------------------------------------------------------------------------------
# Each record once, in order: the join's examples


def kafka_partition(key: Optional[bytes], partitions: int) -> int:
    """The partition of a message key: CRC-32 of the key modulo the partitions, the choice of
    librdkafka's default partitioner for a keyed message (``consistent_random``), so records
    written either way land together.

    >>> kafka_partition(b"r1", 4), kafka_partition(b"r1", 4) == zlib.crc32(b"r1") % 4
    (1, True)
    """
    return zlib.crc32(key or b"") % partitions


def order_key(record: dict, time_field: str, key_field: str) -> tuple:
    """Where a record goes in its partition of an ordered topic: ``(event time, key)``."""
    return (int(record[time_field]), record[key_field])


def _next_ms(micros: int) -> int:
    """The first millisecond after ``micros`` (timers have millisecond precision)."""
    return (micros // 1000 + 1) * 1000


class OrderByEventTimeFn(beam.DoFn):
    """``(partition, record)`` → the same, each partition's in ``(event time, key)`` order.

    Records wait in state until the watermark passes them. An event-time timer, set after
    the first record that finds none pending and never moved, emits those the watermark
    has passed, sorted by :func:`order_key`, and is set again after the latest of the rest
    (a timer that new records pushed later would never fire while they keep coming); at the
    end of the input an end-of-window timer emits whatever waits, so the last records are
    out before the watermark moves on. Records' element timestamps must order them as their
    event times do (the joiner stamps an example ``join window`` after its ``ts_ms``). One
    that comes out at or before the last one emitted (it came behind the watermark: its
    input was out of order) is a dead letter, ``out_of_order``: writing it would break the
    order that :class:`WriteOnceInOrderFn` resumes by. The last key emitted is in state, so
    a restored job goes on from the checkpoint's.

    Beam counter (namespace ``kafka_sink``): ``out_of_order``.
    """
    BUFFER = BagStateSpec("kafka_order_buffer", FastPrimitivesCoder())
    LAST = ReadModifyWriteStateSpec("kafka_order_last", FastPrimitivesCoder())
    PENDING = ReadModifyWriteStateSpec("kafka_order_timer", FastPrimitivesCoder())
    FLUSH = TimerSpec("kafka_order_flush", TimeDomain.WATERMARK)
    END = TimerSpec("kafka_order_end", TimeDomain.WATERMARK)

    def __init__(self, topic: str, time_field: str, key_field: str):
        self.topic, self.time_field, self.key_field = topic, time_field, key_field
        self.out_of_order = Metrics.counter(METRICS_NAMESPACE, "out_of_order")

    def setup(self):
        from transforms import state_cache
        state_cache.weigh_without_module_globals()  # state written per record: see joiner

    def start_bundle(self):
        # Keys whose timer is known to be pending in this bundle: a record appends to the
        # bag and reads nothing (on Flink every state read is a request to the runner).
        self._armed = set()

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                buffer=beam.DoFn.StateParam(BUFFER), pending=beam.DoFn.StateParam(PENDING),
                flush=beam.DoFn.TimerParam(FLUSH), end=beam.DoFn.TimerParam(END)):
        key, record = element
        buffer.add((timestamp.micros, record))
        if key not in self._armed:
            self._armed.add(key)
            if pending.read() is None:
                after = _next_ms(timestamp.micros)
                flush.set(Timestamp(micros=after))
                pending.write(after)
                end.set(GlobalWindow().max_timestamp())
        yield from ()  # output comes from the timers

    @on_timer(FLUSH)
    def on_flush(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                 buffer=beam.DoFn.StateParam(BUFFER), last=beam.DoFn.StateParam(LAST),
                 pending=beam.DoFn.StateParam(PENDING), flush=beam.DoFn.TimerParam(FLUSH)):
        waiting = list(buffer.read())
        due = [r for t, r in waiting if t < fired.micros]
        rest = [(t, r) for t, r in waiting if t >= fired.micros]
        buffer.clear()
        if rest:
            at = _next_ms(max(t for t, _ in rest))
            flush.set(Timestamp(micros=at))
            pending.write(at)
            for waiting_record in rest:
                buffer.add(waiting_record)
        else:
            pending.clear()
            self._armed.discard(key)
        yield from self._emit(key, due, last)

    @on_timer(END)
    def on_end(self, key=beam.DoFn.KeyParam, buffer=beam.DoFn.StateParam(BUFFER),
               last=beam.DoFn.StateParam(LAST), pending=beam.DoFn.StateParam(PENDING)):
        waiting = list(buffer.read())
        buffer.clear()
        pending.clear()
        self._armed.discard(key)
        yield from self._emit(key, [r for _, r in waiting], last)

    def _emit(self, key, due: list, last):
        if not due:
            return
        done = last.read()
        for record in sorted(due, key=lambda r: order_key(r, self.time_field, self.key_field)):
            where = order_key(record, self.time_field, self.key_field)
            if done is not None and where <= tuple(done):
                self.out_of_order.inc()
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, _unsent_dead_letter(
                    record, self.topic, "out_of_order",
                    f"(event time, key) {where} is not after the last one written to partition "
                    f"{key}, {tuple(done)}: its input came behind the watermark"))
                continue
            done = where
            yield key, record
        last.write(done)


class WriteOnceInOrderFn(WriteToKafkaFn):
    """``(partition, record)`` in :func:`order_key` order per partition → messages of that
    partition, skipping a record that is already there.

    A partition is written only by the instance that holds its key, always in order, so the
    last record of a partition tells how far it is written: before an instance first writes
    a partition (a new job, a job restored from a checkpoint, after a failed bundle) it reads
    that partition's last record, and skips every record at or before it. A restored job
    that emits again what it had written after its checkpoint writes none of it twice. The
    producer is idempotent (:class:`WriteToKafkaFn`); records are flushed at the end of every
    bundle, before the checkpoint.

    Beam counters (namespace ``kafka_sink``): those of :class:`WriteToKafkaFn`, and
    ``records_already_written`` (skipped).
    """

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.already_written = Metrics.counter(METRICS_NAMESPACE, "records_already_written")

    def setup(self):
        super().setup()
        self._last: dict = {}  # partition -> the order key of its last record

    def _last_written(self, partition: int):
        if partition not in self._last:
            from transforms.kafka_source import last_record
            record = last_record(self.bootstrap, self.topic, partition, self.schema,
                                 self.key_field)
            self._last[partition] = None if record is None else order_key(
                record, self.time_field, self.key_field)
            if record is not None:
                _LOG.info("Kafka %s[%d] ends at %s: records up to it are skipped", self.topic,
                          partition, self._last[partition])
        return self._last[partition]

    def process(self, element, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        partition, record = element
        try:
            where = order_key(record, self.time_field, self.key_field)
        except (KeyError, TypeError, ValueError) as e:
            self.dead_letters.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, _unsent_dead_letter(
                record, self.topic, "not_encodable", f"no order key: {type(e).__name__}: {e}"))
            return
        last = self._last_written(partition)
        if last is not None and where <= last:
            self.already_written.inc()
            return
        self._last[partition] = where
        self._produced += 1
        if self._latest is None or timestamp > self._latest:
            self._latest = timestamp
        yield from self._produce(record, timestamp, window, partition)

    def start_bundle(self):
        super().start_bundle()
        self._produced, self._latest = 0, None

    def finish_bundle(self):
        """Flushes (:class:`WriteToKafkaFn`); outputs how many records the bundle wrote."""
        try:
            yield from super().finish_bundle()
        except Exception:
            self._last = {}  # what reached the broker is read again before the retry
            raise
        if self._produced:
            yield WindowedValue(self._produced, self._latest, [GlobalWindow()])


class WriteToKafkaTopicInOrder(WithDeadLetters, beam.PTransform):
    """Records → a Kafka topic, **each once**, each partition in ``(event time, key)`` order:
    the join's examples (``dataflow.loop stream-join``).

    ``WriteToKafkaTopic`` is at least once: a job restored from a checkpoint emits again what
    it emitted after it, and the topic gets it twice. Here records are put in order per
    partition (:class:`OrderByEventTimeFn`: they wait until the watermark passes them, which
    costs no delay beyond the watermark's own), so each partition's last message says how
    far it is written, and the writer (:class:`WriteOnceInOrderFn`) skips what is there.
    That needs nothing in the checkpoint but the order's last key, and works without
    checkpoints too (a job started again from the topics' start writes nothing twice).
    What it cannot do: fence a writer that is still alive after its job was restarted
    elsewhere (a zombie; Kafka transactions would, at a transaction per bundle), and write a
    record that comes behind one already written (``out_of_order`` dead letter).

    The partition of a record is librdkafka's for its key (:func:`kafka_partition`); the
    message timestamp is its event time.

    Args:
        bootstrap: the brokers.
        topic: the topic (it must exist; its partitions are asked when the pipeline is built).
        schema: the records' schema (a name of ``schemas/`` or a dict).
        key_field: the records' key (the request id): message key, and second in the order.
        time_field: their event time (ms): message timestamp, and first in the order.
        producer_config: librdkafka settings over ours.

    Returns:
        (``expand``) how many records each bundle wrote (ints), or ``(them, dead letters)``
        after ``.with_dead_letters()``.
    """

    def __init__(self, bootstrap: str, topic: str, schema, key_field: str = "request_id",
                 time_field: str = "ts_ms", producer_config: Optional[dict] = None,
                 partitions: Optional[int] = None):
        super().__init__()
        self.bootstrap, self.topic, self.schema = bootstrap, topic, schema
        self.key_field, self.time_field = key_field, time_field
        self.producer_config = producer_config
        self.partitions = partitions
        KafkaRecordCodec(schema, key_field)

    def expand(self, records):
        partitions = self.partitions
        if partitions is None:
            from transforms.kafka_source import partition_ranges
            partitions = len(partition_ranges(self.bootstrap, self.topic))
        key_field = self.key_field

        def keyed(record):
            key = record.get(key_field) if isinstance(record, dict) else None
            return kafka_partition(key.encode("utf-8") if isinstance(key, str) else None,
                                   partitions), record

        ordered = (records
                   | "ByPartition" >> beam.Map(keyed).with_output_types(Tuple[int, Any])
                   | "InOrder" >> beam.ParDo(OrderByEventTimeFn(
                       self.topic, self.time_field, self.key_field)).with_outputs(
                           DEAD_LETTER, main="ordered"))
        written = ordered.ordered | "ProduceOnce" >> beam.ParDo(WriteOnceInOrderFn(
            self.bootstrap, self.topic, self.schema, self.key_field, self.producer_config,
            time_field=self.time_field)).with_outputs(DEAD_LETTER, main="written")
        dead = ((ordered[DEAD_LETTER], written[DEAD_LETTER])
                | "DeadLetters" >> beam.Flatten())
        return (written.written, dead) if self._dead_letters else written.written
