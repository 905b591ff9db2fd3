"""Reading our Avro records from a Kafka topic: :class:`ReadFromKafkaTopic`.

A splittable DoFn over (topic, partition) elements whose restriction is the range of offsets
still to read, with ``confluent-kafka`` (librdkafka) as the client. The position of every
partition is the restriction, so it is in Beam's state: on Flink it is in the checkpoint and
a job restored from one reads on from there, each message once (no consumer group offsets
take part; none are committed). Bounded (the DirectRunner, backfills): up to the end offsets
the topic had when the pipeline was built, or given ones. Unbounded (``stop=None``): the
reader follows the partition, ending each call after ``max_bundle_s`` or when the partition
is drained, and resumes after ``poll_interval_s``.

Each partition's records keep their order; the output watermark of a partition is the latest
event time read from it (a record earlier than that is passed on and counted as
``kafka_source.records_behind_watermark``). A message that does not decode, has another
schema, or has no event time that Beam can carry is a dead letter with its reason, topic,
partition and offset (``transforms.kafka_records``); the read goes on.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from transforms.kafka_records import KafkaRecordCodec, kafka_dead_letter
from transforms.sources import DEAD_LETTER, BadRecord, WithDeadLetters, event_time
from transforms.tail import NO_END

__all__ = ["ReadFromKafkaTopic", "PartitionRange", "partition_ranges", "METRICS_NAMESPACE"]

_LOG = logging.getLogger(__name__)

METRICS_NAMESPACE = "kafka_source"


class PartitionRange(NamedTuple):
    """One partition of a topic and the offsets to read: ``[start, stop)``, ``stop`` None to
    follow it."""
    topic: str
    partition: int
    start: int
    stop: Optional[int]


def _consumer(bootstrap: str, config: Optional[dict] = None):
    from confluent_kafka import Consumer
    return Consumer({"bootstrap.servers": bootstrap, "group.id": "beam-monolith-reader",
                     "enable.auto.commit": False, "enable.auto.offset.store": False,
                     "auto.offset.reset": "earliest", "enable.partition.eof": False,
                     **(config or {})})


def partition_ranges(bootstrap: str, topic: str, start="earliest", stop="end",
                     timeout_s: float = 30.0, consumer_config: Optional[dict] = None) -> list:
    """The partitions of ``topic`` and the offsets to read of each, asked of the broker.

    Args:
        bootstrap: the brokers (``host:port,...``).
        topic: the topic (it must exist).
        start: ``"earliest"`` (the oldest message kept), or ``{partition: offset}``.
        stop: ``"end"`` (the offsets after the last messages now), None (follow), or
            ``{partition: offset}`` (exclusive).
        timeout_s: how long to wait for the broker.

    Returns:
        A :class:`PartitionRange` per partition, in partition order.

    Raises:
        ValueError: the topic does not exist.
    """
    from confluent_kafka import TopicPartition
    consumer = _consumer(bootstrap, consumer_config)
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ValueError(f"Kafka topic {topic!r} does not exist on {bootstrap} "
                             f"({meta.error if meta is not None else 'no metadata'}); create it: "
                             f"python -m dataflow.kafka topics create {topic} --partitions N")
        ranges = []
        for p in sorted(meta.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                       timeout=timeout_s)
            first = low if start == "earliest" else int(start.get(p, low))
            last = (high if stop == "end" else None if stop is None else int(stop.get(p, high)))
            ranges.append(PartitionRange(topic, p, first, last))
        return ranges
    finally:
        consumer.close()


class _OffsetRanges(RestrictionProvider):
    """Restriction: the offsets of the partition still to read. Never split: order matters
    within a partition (the partitions are the parallelism)."""

    def initial_restriction(self, element):
        part = PartitionRange(*element)
        return OffsetRange(part.start, NO_END if part.stop is None else max(part.start, part.stop))

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, element, restriction):
        return 1 if restriction.stop == NO_END else max(1, restriction.size())

    def split(self, element, restriction):
        yield restriction

    def truncate(self, element, restriction):
        return None if restriction.stop == NO_END else restriction  # on drain, stop following


class _ReadPartitionFn(beam.DoFn):
    """PartitionRange → its records, timestamped by event time (bounded ranges)."""

    def __init__(self, bootstrap: str, schema, key_field, time_field: str,
                 max_bundle_s: Optional[float], poll_timeout_s: float, chunk: int,
                 consumer_config: Optional[dict], stall_timeout_s: float = 60.0):
        self.bootstrap, self.schema, self.key_field = bootstrap, schema, key_field
        self.time_field = time_field
        self.max_bundle_s = max_bundle_s
        self.poll_timeout_s = poll_timeout_s
        self.chunk = chunk
        self.consumer_config = consumer_config
        self.stall_timeout_s = stall_timeout_s
        self.records_read = Metrics.counter(METRICS_NAMESPACE, "records_read")
        self.bytes_read = Metrics.counter(METRICS_NAMESPACE, "bytes_read")
        self.dead_letters = Metrics.counter(METRICS_NAMESPACE, "dead_letters")
        self.behind = Metrics.counter(METRICS_NAMESPACE, "records_behind_watermark")
        self.lag = Metrics.distribution(METRICS_NAMESPACE, "records_per_call")

    def setup(self):
        self._codec = KafkaRecordCodec(self.schema, self.key_field)
        self._client = None

    def teardown(self):
        if getattr(self, "_client", None) is not None:
            self._client.close()
            self._client = None

    def _consumer_at(self, part: PartitionRange, offset: int):
        from confluent_kafka import TopicPartition
        if self._client is None:
            self._client = _consumer(self.bootstrap, self.consumer_config)
        self._client.assign([TopicPartition(part.topic, part.partition, offset)])
        return self._client

    def process(self, element, tracker=beam.DoFn.RestrictionParam(_OffsetRanges()),
                watermark=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        yield from self._read(PartitionRange(*element), tracker, watermark)

    def _read(self, part: PartitionRange, tracker, watermark):
        """Claims and emits messages from the restriction's start, to its end, or until
        ``max_bundle_s`` (then the rest is deferred)."""
        restriction = tracker.current_restriction()
        stop = restriction.stop
        position = restriction.start
        if position >= stop:
            tracker.try_claim(stop)
            return
        consumer = self._consumer_at(part, position)
        started = idle_since = time.monotonic()
        emitted = 0
        while True:
            messages = [m for m in consumer.consume(self.chunk, self.poll_timeout_s)
                        if not self._event(m)]
            if messages:
                idle_since = time.monotonic()
                # The last message below the restriction's end claims every one before it.
                within = [m for m in messages if m.offset() < stop]
                if within and not tracker.try_claim(within[-1].offset()):
                    return
                yield from self._emit(within, watermark)
                emitted += len(within)
                position = (within[-1].offset() + 1) if within else stop
            else:
                # Offsets may have gaps (transaction markers, compaction): the consumer's
                # position tells whether the range is read.
                position = max(position, self._position(consumer, part))
            if position >= stop:
                tracker.try_claim(stop)  # past the range: done
                self.lag.update(emitted)
                return
            now = time.monotonic()
            if not messages and self._drained(consumer, part, position, now - idle_since):
                self.lag.update(emitted)
                tracker.defer_remainder(Duration.of(self.poll_interval_s))
                return
            if self.max_bundle_s is not None and now - started > self.max_bundle_s:
                self.lag.update(emitted)
                tracker.defer_remainder()
                return

    @staticmethod
    def _event(message) -> bool:
        """A consumer event, not a message; an error other than the end of a partition
        is raised (the bundle is retried from the last checkpoint)."""
        error = message.error()
        if error is None:
            return False
        from confluent_kafka import KafkaError, KafkaException
        if error.code() == KafkaError._PARTITION_EOF:
            return True
        if error.retriable():
            _LOG.warning("Kafka %s[%s]: %s; retrying", message.topic(), message.partition(), error)
            return True
        raise KafkaException(error)

    @staticmethod
    def _position(consumer, part: PartitionRange) -> int:
        from confluent_kafka import TopicPartition
        (tp,) = consumer.position([TopicPartition(part.topic, part.partition)])
        return tp.offset if tp.offset >= 0 else -1

    def _drained(self, consumer, part, position, idle_s) -> bool:
        """Bounded: nothing to wait for but the rest of the range (a broker that stops
        answering for ``stall_timeout_s`` fails the bundle, to be retried)."""
        if idle_s > self.stall_timeout_s:
            raise TimeoutError(f"Kafka {part.topic}[{part.partition}]: nothing read for "
                               f"{idle_s:.0f} s at offset {position}, before the end of the "
                               f"range ({part.stop})")
        return False

    def _emit(self, messages, watermark):
        good, dead = self._codec.decode_messages(messages)
        told = watermark.current_watermark()
        latest = None
        size = read = 0
        for message, record in good:
            size += len(message.value())
            try:
                ts = event_time(record, self.time_field)
            except BadRecord as e:
                dead.append(kafka_dead_letter(message, e.reason, e.detail))
                continue
            if told is not None and ts < told:
                self.behind.inc()
            latest = ts if latest is None or ts > latest else latest
            read += 1
            yield TimestampedValue(record, ts)
        self.records_read.inc(read)
        self.bytes_read.inc(size)
        at = told if told is not None else latest
        for d in dead:
            self.dead_letters.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER,
                                           d if at is None else TimestampedValue(d, at))
        if latest is not None and (told is None or latest > told):
            watermark.set_watermark(latest)

    poll_interval_s = 0.0  # bounded: never deferred for lack of messages


class _FollowPartitionFn(_ReadPartitionFn):
    """PartitionRange with no stop → its records as they come (unbounded)."""

    def __init__(self, *args, poll_interval_s: float, stop_timestamp: Optional[float], **kw):
        super().__init__(*args, **kw)
        self.poll_interval_s = poll_interval_s
        self.stop_timestamp = stop_timestamp

    @beam.DoFn.unbounded_per_element()
    def process(self, element, tracker=beam.DoFn.RestrictionParam(_OffsetRanges()),
                watermark=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        if self.stop_timestamp is not None and time.time() >= self.stop_timestamp:
            tracker.try_claim(NO_END)  # past the range: done
            return
        yield from self._read(PartitionRange(*element), tracker, watermark)

    def _drained(self, consumer, part, position, idle_s) -> bool:
        """Following: drained once a poll found nothing (wait ``poll_interval_s``)."""
        return True


class ReadFromKafkaTopic(WithDeadLetters, beam.PTransform):
    """A topic of one of our Avro schemas → its records (dicts), stamped with event time.

    One reader per partition, each in offset order (the partitions are the read's
    parallelism); the offsets read are the reader's restriction, so a Flink checkpoint holds
    them and a restored job reads each message once. Bounded by default: from the oldest
    message kept to the end offsets the topic has when the pipeline is built (or the given
    ``start`` / ``stop`` offsets); ``stop=None`` follows the topic (unbounded) until
    ``stop_timestamp`` (wall clock, seconds) if one is given.

    ``.with_dead_letters()`` returns ``(records, dead letters)``: a message that does not
    decode, was written with another schema, or whose record has no usable event time, with
    its reason, topic, partition and offset (``transforms.kafka_records.kafka_dead_letter``).

    Beam counters (namespace ``kafka_source``): ``records_read``, ``bytes_read``,
    ``dead_letters``, ``records_behind_watermark``; distribution ``records_per_call``.

    Args:
        bootstrap: the brokers (``host:port,...``).
        topic: the topic.
        schema: the records' schema: a name of ``schemas/`` or a dict.
        key_field: the records' key field (the request id).
        start, stop: offsets to read (:func:`partition_ranges`); or ``ranges``, a list of
            :class:`PartitionRange`, instead of asking the broker.
        time_field: the records' event time, integer ms since the epoch.
        max_bundle_s: the longest a reader call lasts (None: bounded reads run to the end
            in one call; following reads default to 1 s).
        poll_interval_s: following: the wait after a poll found nothing.
        stop_timestamp: following: stop at this wall-clock time (seconds since the epoch).
        consumer_config: more librdkafka settings.

    >>> from dataflow.kafka import KafkaBroker  # doctest: +SKIP
    >>> with KafkaBroker() as broker, beam.Pipeline() as p:  # doctest: +SKIP
    ...     actions = p | ReadFromKafkaTopic(broker.bootstrap, "actions", "action_log")
    """

    def __init__(self, bootstrap: str, topic: str, schema, key_field: Optional[str] = "request_id",
                 start="earliest", stop="end", ranges: Optional[list] = None,
                 time_field: str = "ts_ms", max_bundle_s: Optional[float] = None,
                 poll_interval_s: float = 0.2, stop_timestamp: Optional[float] = None,
                 poll_timeout_s: float = 0.1, chunk: int = 10_000,
                 consumer_config: Optional[dict] = None):
        super().__init__()
        self.bootstrap, self.topic, self.schema, self.key_field = bootstrap, topic, schema, key_field
        self.start, self.stop, self.ranges = start, stop, ranges
        self.time_field = time_field
        self.max_bundle_s = max_bundle_s
        self.poll_interval_s = poll_interval_s
        self.stop_timestamp = stop_timestamp
        self.poll_timeout_s = poll_timeout_s
        self.chunk = int(chunk)
        self.consumer_config = consumer_config
        KafkaRecordCodec(schema, key_field)  # an unknown schema fails here, not on a worker

    def expand(self, pbegin):
        ranges = self.ranges if self.ranges is not None else partition_ranges(
            self.bootstrap, self.topic, self.start, self.stop,
            consumer_config=self.consumer_config)
        following = any(r.stop is None for r in ranges)
        args = (self.bootstrap, self.schema, self.key_field, self.time_field)
        if following:
            read = _FollowPartitionFn(*args, self.max_bundle_s or 1.0, self.poll_timeout_s,
                                      self.chunk, self.consumer_config,
                                      poll_interval_s=self.poll_interval_s,
                                      stop_timestamp=self.stop_timestamp)
        else:
            read = _ReadPartitionFn(*args, self.max_bundle_s, self.poll_timeout_s, self.chunk,
                                    self.consumer_config)
        return self.split_dead_letters(
            pbegin
            | "Partitions" >> beam.Create([tuple(r) for r in ranges], reshuffle=False)
            | "Read" >> beam.ParDo(read).with_outputs(DEAD_LETTER))
