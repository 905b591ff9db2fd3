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
``kafka_source.records_behind_watermark``), or the latest watermark mark its writer put in it,
if later (``transforms.kafka_records``: a partition with no records for a while does not hold
the watermark back while its writer goes on); an end-of-stream mark ends the partition's read.
Training's example reader skips marks. A message that does not decode, has another
schema, or has no event time that Beam can carry is a dead letter with its reason, topic,
partition and offset (``transforms.kafka_records``); the read goes on.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Duration, Timestamp

from transforms.kafka_records import KafkaRecordCodec, kafka_dead_letter, mark_of, split_marks
from transforms.sources import DEAD_LETTER, BadRecord, WithDeadLetters, event_time
from transforms.tail import NO_END

__all__ = ["ReadFromKafkaTopic", "ReadExampleBatchesFromKafka", "PartitionRange", "parse_kafka_url",
           "partition_ranges", "read_records", "last_record", "reader_elements", "parse_reader_element", "METRICS_NAMESPACE"]

_LOG = logging.getLogger(__name__)

METRICS_NAMESPACE = "kafka_source"
# Beam's range of event times, in ms: a watermark mark beyond it is clamped to it.
_MIN_MS = MIN_TIMESTAMP.micros // 1000 + 1
_MAX_MS = MAX_TIMESTAMP.micros // 1000 - 1


def parse_kafka_url(url: str) -> tuple[str, str]:
    """``kafka://HOST:PORT[,HOST:PORT...]/TOPIC`` → ``(bootstrap, topic)``.

    >>> parse_kafka_url("kafka://127.0.0.1:9092/examples")
    ('127.0.0.1:9092', 'examples')
    >>> parse_kafka_url("kafka://a:1,b:2/")
    Traceback (most recent call last):
    ...
    ValueError: expected kafka://HOST:PORT[,HOST:PORT...]/TOPIC, got 'kafka://a:1,b:2/'
    """
    rest = url[len("kafka://"):] if url.startswith("kafka://") else ""
    bootstrap, _, topic = rest.partition("/")
    if not bootstrap or not topic or "/" in topic:
        raise ValueError(f"expected kafka://HOST:PORT[,HOST:PORT...]/TOPIC, got {url!r}")
    return bootstrap, topic


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
        start: ``"earliest"`` (the oldest message kept), ``{partition: offset}``, or an
            event time in ms (int): each partition from its first message with a later
            timestamp (``offsets_for_times``; our sinks stamp messages with event time).
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
        after = {}
        if isinstance(start, int) and not isinstance(start, bool):
            found = consumer.offsets_for_times(
                [TopicPartition(topic, p, start + 1) for p in sorted(meta.partitions)],
                timeout=timeout_s)
            after = {tp.partition: tp.offset for tp in found}
        for p in sorted(meta.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p),
                                                       timeout=timeout_s)
            if after:  # -1: no message that late yet, start at the end
                first = after[p] if after[p] >= 0 else high
            else:
                first = low if start == "earliest" else int(start.get(p, low))
            last = (high if stop == "end" else None if stop is None else int(stop.get(p, high)))
            ranges.append(PartitionRange(topic, p, first, last))
        return ranges
    finally:
        consumer.close()


def read_records(bootstrap: str, topic: str, schema, key_field: Optional[str] = "request_id",
                 timeout_s: float = 60.0, consumer_config: Optional[dict] = None) -> tuple:
    """Every record of a topic up to its end offsets now, without Beam (reports, tests).

    Args:
        bootstrap: the brokers.
        topic: the topic (it must exist).
        schema: the records' schema (a name of ``schemas/`` or a dict).
        key_field: the records' key field.
        timeout_s: the longest wait for the broker with nothing read.
        consumer_config: more librdkafka settings.

    Returns:
        ``(records, dead letters)``: the records partition after partition, each in offset
        order (watermark marks left out), and the messages that do not decode
        (``kafka_dead_letter``).

    Raises:
        ValueError: the topic does not exist.
        TimeoutError: the broker gave nothing for ``timeout_s`` before the end offsets.
    """
    from confluent_kafka import TopicPartition
    codec = KafkaRecordCodec(schema, key_field)
    records, dead = [], []
    consumer = _consumer(bootstrap, consumer_config)
    try:
        for part in partition_ranges(bootstrap, topic, consumer_config=consumer_config):
            if part.start >= part.stop:
                continue
            consumer.assign([TopicPartition(topic, part.partition, part.start)])
            position, idle_since = part.start, time.monotonic()
            while position < part.stop:
                messages = [m for m in consumer.consume(10_000, 0.2)
                            if m.error() is None and m.offset() < part.stop]
                if not messages:
                    position = max(position, _ReadPartitionFn._position(consumer, part))
                    if time.monotonic() - idle_since > timeout_s:
                        raise TimeoutError(f"Kafka {topic}[{part.partition}]: nothing read "
                                           f"for {timeout_s:.0f} s at offset {position}")
                    continue
                idle_since = time.monotonic()
                position = messages[-1].offset() + 1
                good, bad = codec.decode_messages([m for m in messages if mark_of(m) is None])
                records += [r for _, r in good]
                dead += bad
        return records, dead
    finally:
        consumer.close()


def last_record(bootstrap: str, topic: str, partition: int, schema,
                key_field: Optional[str] = "request_id", lookback: int = 64,
                timeout_s: float = 30.0, consumer_config: Optional[dict] = None):
    """The last record of a partition (watermark marks and messages that do not decode left
    out), looking back at most ``lookback`` messages from its end.

    Returns:
        The record (a dict), or None if the partition has none there.
    """
    from confluent_kafka import TopicPartition
    codec = KafkaRecordCodec(schema, key_field)
    consumer = _consumer(bootstrap, consumer_config)
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition),
                                                   timeout=timeout_s)
        if high <= low:
            return None
        start = max(low, high - lookback)
        consumer.assign([TopicPartition(topic, partition, start)])
        position, last, deadline = start, None, time.monotonic() + timeout_s
        while position < high:
            messages = [m for m in consumer.consume(1000, 0.2)
                        if m.error() is None and m.offset() < high]
            if messages:
                position = messages[-1].offset() + 1
                good, _ = codec.decode_messages([m for m in messages if mark_of(m) is None])
                last = good[-1][1] if good else last
            else:
                position = max(position, _ReadPartitionFn._position(consumer, part=PartitionRange(
                    topic, partition, start, high)))
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Kafka {topic}[{partition}]: its last {high - start} "
                                       f"messages were not read within {timeout_s:.0f} s")
        return last
    finally:
        consumer.close()


def _at_high_watermark(consumer, part: PartitionRange, position: int,
                       timeout_s: float = 10.0) -> bool:
    """Whether ``position`` is at the end of the partition (its high watermark) now."""
    from confluent_kafka import TopicPartition
    _, high = consumer.get_watermark_offsets(TopicPartition(part.topic, part.partition),
                                             timeout=timeout_s)
    return position >= high


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
        self.marks = Metrics.counter(METRICS_NAMESPACE, "watermark_marks")
        self.ended = Metrics.counter(METRICS_NAMESPACE, "partitions_ended")
        self.skipped = Metrics.counter(METRICS_NAMESPACE, "offsets_skipped")

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

    def _open(self, part: PartitionRange, tracker):
        """(consumer at the restriction's start, start, stop), or None when the restriction
        is empty (then it is finished)."""
        restriction = tracker.current_restriction()
        if restriction.start >= restriction.stop:
            tracker.try_claim(restriction.stop)
            return None
        return (self._consumer_at(part, restriction.start), restriction.start,
                restriction.stop)

    def _read(self, part: PartitionRange, tracker, watermark):
        """Claims and emits messages from the restriction's start, to its end, or until
        ``max_bundle_s`` (then the rest is deferred)."""
        opened = self._open(part, tracker)
        if opened is None:
            return
        consumer, position, stop = opened
        started = idle_since = time.monotonic()
        emitted = 0
        while True:
            messages = [m for m in consumer.consume(self.chunk, self.poll_timeout_s)
                        if not self._event(m)]
            if messages:
                idle_since = time.monotonic()
                within = [m for m in messages if m.offset() < stop]
                self._count_gaps(part, position, within)
                records, mark, end = split_marks(within)
                # The last message below the restriction's end (or the end mark) claims
                # every one before it.
                last = end if end is not None else within[-1].offset() if within else None
                if last is not None and not tracker.try_claim(last):
                    return
                yield from self._emit(records, watermark, mark)
                emitted += len(records)
                if end is not None:  # its writer ended the partition: done
                    self.ended.inc()
                    tracker.try_claim(stop)
                    self.lag.update(emitted)
                    return
                position = last + 1 if last is not None else stop
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

    def _count_gaps(self, part: PartitionRange, position: int, messages) -> None:
        """Counts offsets that come with no message. A transaction's commit marker takes one;
        more mean messages that are gone (retention or compaction deleted them before they
        were read): counted in ``offsets_skipped`` and logged, never silently passed over."""
        offsets = np.fromiter((m.offset() for m in messages), np.int64, len(messages))
        if not len(offsets):
            return
        gaps = np.diff(offsets, prepend=position - 1) - 1  # offsets with no message
        if gaps.max() > 0:
            self.skipped.inc(int(gaps.sum()))
            if gaps.max() > 1:
                logging.warning("%s[%d]: %d offsets before %d hold no message (deleted by "
                                "retention or compaction?)", part.topic, part.partition,
                                int(gaps.sum()), int(offsets[-1]))

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

    def _emit(self, messages, watermark, mark: Optional[int] = None):
        """Yields the records (and dead letters) of ``messages``; moves the watermark to the
        latest event time read, or to ``mark`` (ms, a writer's watermark mark) if later."""
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
        if mark is not None:
            self.marks.inc()
            at_mark = Timestamp(micros=min(max(mark, _MIN_MS), _MAX_MS) * 1000)
            latest = at_mark if latest is None or at_mark > latest else latest
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
        """Following: drained once the position reached the partition's end offset, as the
        broker gives it now (an empty poll alone proves nothing: a fresh consumer's first
        fetch may take longer than a poll)."""
        return _at_high_watermark(consumer, part, position)


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
    ``dead_letters``, ``records_behind_watermark``, ``watermark_marks`` (reads that moved a
    partition's watermark to a writer's mark), ``partitions_ended`` (by an end-of-stream
    mark); distribution ``records_per_call``.

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


# ---------------------------------------------------------------------------------------------
# Training's reader: the examples topic -> ExampleBatch es


def reader_elements(ranges: list, subtasks: Optional[int] = None) -> list:
    """One element per partition range, named so that partition p's reader runs on subtask
    ``p % subtasks`` of a keyed runner (Flink; :mod:`transforms.flink_placement`).

    >>> reader_elements([PartitionRange("ex", 0, 0, 10), PartitionRange("ex", 1, 5, None)])
    ['ex\\x1f0\\x1f0\\x1f10#0', 'ex\\x1f1\\x1f5\\x1f#0']
    >>> parse_reader_element(reader_elements([PartitionRange("ex", 1, 5, None)], 2)[0])
    PartitionRange(topic='ex', partition=1, start=5, stop=None)
    """
    from transforms.flink_placement import subtask_of_str
    names = []
    for r in ranges:
        base = _SEP.join([r.topic, str(r.partition), str(r.start),
                          "" if r.stop is None else str(r.stop)])
        salt = 0
        while subtasks and subtask_of_str(f"{base}#{salt}", subtasks) != r.partition % subtasks:
            salt += 1
        names.append(f"{base}#{salt}")
    return names


_SEP = "\x1f"


def parse_reader_element(element: str) -> PartitionRange:
    """A :func:`reader_elements` name → its :class:`PartitionRange`."""
    topic, partition, start, stop = element.rpartition("#")[0].split(_SEP)
    return PartitionRange(topic, int(partition), int(start), int(stop) if stop else None)


class _ExampleOffsets(_OffsetRanges):
    def initial_restriction(self, element):
        return super().initial_restriction(parse_reader_element(element))


class _ReadExampleBatchesFn(_ReadPartitionFn):
    """A partition of the examples topic → ``ExampleBatch`` es in offset order (bounded: to
    the range's end).

    A batch ends at ``batch_size`` records or before the first record of the next event-time
    period (``period_s``, as the example log's hourly files end the file reader's batches),
    so batches are a function of the records alone: a restored reader, a backlog and a live
    stream make the same ones. A batch is claimed by the offset of its last record, so a
    checkpoint falls between batches. As the file reader does (``transforms.example_reader``),
    on Flink it ends its call after ``checkpoint_s`` or once its batches span
    ``max_staleness_s``, and waits for the PS before it reads on (``gate``)."""

    def __init__(self, bootstrap, batch_size: int, dense_dim: int, checkpoint_s, gate,
                 poll_timeout_s: float, consumer_config, period_s: int = 3600,
                 after_ms: Optional[int] = None, stall_timeout_s: float = 60.0):
        super().__init__(bootstrap, "example", "request_id", "ts_ms", checkpoint_s,
                         poll_timeout_s, max(4 * batch_size, 1000), consumer_config,
                         stall_timeout_s)
        self.batch_size = batch_size
        self.dense_dim = dense_dim
        self.gate = gate
        self.period_ms = int(period_s * 1000)
        self.after_ms = after_ms
        self.batches = Metrics.counter(METRICS_NAMESPACE, "example_batches")
        self.before_start = Metrics.counter(METRICS_NAMESPACE, "examples_before_start")

    def setup(self):
        super().setup()
        self._emitted_ts = None
        self._waiting = {}  # partition -> (offset of its first unclaimed record, since)

    def process(self, element, tracker=beam.DoFn.RestrictionParam(_ExampleOffsets()),
                watermark=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        yield from self._read(parse_reader_element(element), tracker, watermark)

    def _read(self, part: PartitionRange, tracker, watermark, final: bool = False):
        """Claims and emits whole batches from the restriction's start; a short one only at
        the range's end, or when drained and ``final`` (the last call of a followed
        partition) or waited for long enough (:meth:`_waited`)."""
        if self.gate is not None and self._emitted_ts is not None:
            self.gate.wait(self._emitted_ts)
        opened = self._open(part, tracker)
        if opened is None:
            return
        consumer, position, stop = opened
        started = idle_since = time.monotonic()
        pending: list = []  # (offset, record or None, dead letter or None), unclaimed, in order
        first_ts = None
        while True:
            messages = [m for m in consumer.consume(self.chunk, self.poll_timeout_s)
                        if not self._event(m) and m.offset() < stop]
            if messages:
                idle_since = time.monotonic()
                self._count_gaps(part, position, messages)
                pending += self._decode(messages)
                position = messages[-1].offset() + 1
            else:
                position = max(position, self._position(consumer, part))
            at_end = position >= stop
            drained = not messages and self._drained(consumer, part, position,
                                                     time.monotonic() - idle_since)
            flush = at_end or (drained and (final or self._waited(part, pending)))
            while pending:
                taken, rest, complete = self._take(pending)
                if not complete and not flush:
                    break
                pending = rest
                if not tracker.try_claim(taken[-1][0]):
                    return
                emitted = yield from self._emit_batch(taken, watermark)
                first_ts = self._emitted_ts if first_ts is None else first_ts
                if emitted and self.max_bundle_s is not None and (
                        time.monotonic() - started > self.max_bundle_s or
                        (self.gate is not None and
                         self._emitted_ts - first_ts >= self.gate.max_staleness_ms)):
                    tracker.defer_remainder()  # what was read past it is read again
                    return
            if at_end or (drained and final):
                tracker.try_claim(stop)  # past the range: done
                return
            if drained:
                if pending:  # a short batch waits: remember since when
                    self._waiting.setdefault(part.partition, (pending[0][0], time.monotonic()))
                tracker.defer_remainder(Duration.of(self.poll_interval_s))
                return

    max_batch_wait_s = None  # bounded: a short batch only at the range's end

    def _waited(self, part: PartitionRange, pending: list) -> bool:
        """A short batch of a drained partition is emitted once its first record has waited
        ``max_batch_wait_s`` (wall clock, across calls); never if that is None."""
        if self.max_batch_wait_s is None or not pending:
            return False
        offset, since = self._waiting.get(part.partition, (None, None))
        if offset != pending[0][0]:
            self._waiting[part.partition] = (pending[0][0], time.monotonic())
            return self.max_batch_wait_s <= 0
        return time.monotonic() - since >= self.max_batch_wait_s

    def _decode(self, messages) -> list:
        """Messages → ``(offset, record, None)`` or ``(offset, None, dead letter)``."""
        good, dead = self._codec.decode_messages([m for m in messages if mark_of(m) is None])
        out = []
        for message, record in good:
            try:
                event_time(record, self.time_field)
                if self.after_ms is not None and record["ts_ms"] <= self.after_ms:
                    self.before_start.inc()  # trained on before (start_after_ms)
                    continue
                out.append((message.offset(), record, None))
            except BadRecord as e:
                out.append((message.offset(), None, kafka_dead_letter(message, e.reason,
                                                                      e.detail)))
        out += [(d["offset"], None, d) for d in dead]
        out.sort(key=lambda p: p[0])
        return out

    def _take(self, pending: list) -> tuple:
        """(the next batch with the dead letters among it, the rest, whether it is whole:
        ``batch_size`` records, or followed by a record of a later period)."""
        n, period = 0, None
        for i, (_, record, _) in enumerate(pending):
            if record is None:
                continue
            p = record["ts_ms"] // self.period_ms
            if period is None:
                period = p
            elif p != period:
                return pending[:i], pending[i:], True
            n += 1
            if n == self.batch_size:
                return pending[:i + 1], pending[i + 1:], True
        return pending, [], False

    def _emit_batch(self, taken: list, watermark):
        """Yields the batch and its dead letters; returns whether there was a batch."""
        from transforms.example_batch import ExampleBatch
        records = [r for _, r, _ in taken if r is not None]
        dead = [d for _, _, d in taken if d is not None]
        if records:
            batch = ExampleBatch.from_examples(records, self.dense_dim)
            self._emitted_ts = int(batch.ts_ms.max())
            self.records_read.inc(len(records))
            self.batches.inc()
            yield TimestampedValue(batch, self._emitted_ts / 1000.0)
            at = Timestamp(micros=self._emitted_ts * 1000)
            told = watermark.current_watermark()
            if told is None or at > told:
                watermark.set_watermark(at)
        told = watermark.current_watermark()
        for d in dead:
            self.dead_letters.inc()
            yield beam.pvalue.TaggedOutput(DEAD_LETTER,
                                           d if told is None else TimestampedValue(d, told))
        return bool(records)


class _FollowExampleBatchesFn(_ReadExampleBatchesFn):
    """A partition of the examples topic, followed (unbounded), until ``stop_timestamp``:
    the call after it reads what is there, short batch included, and ends."""

    def __init__(self, *args, poll_interval_s: float, stop_timestamp: Optional[float],
                 max_batch_wait_s: Optional[float] = None, **kw):
        super().__init__(*args, **kw)
        self.poll_interval_s = poll_interval_s
        self.stop_timestamp = stop_timestamp
        self.max_batch_wait_s = max_batch_wait_s

    @beam.DoFn.unbounded_per_element()
    def process(self, element, tracker=beam.DoFn.RestrictionParam(_ExampleOffsets()),
                watermark=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        final = self.stop_timestamp is not None and time.time() >= self.stop_timestamp
        yield from self._read(parse_reader_element(element), tracker, watermark, final)

    def _drained(self, consumer, part, position, idle_s) -> bool:
        return _at_high_watermark(consumer, part, position)


class ReadExampleBatchesFromKafka(WithDeadLetters, beam.PTransform):
    """The examples topic → ``ExampleBatch`` es of ``batch_size``: training's reader when
    the example log is a Kafka topic (``transforms.example_reader.ReadExampleBatches`` reads
    it from files).

    One reader per partition, in offset order (the join writes each partition in the order
    it joins). A batch ends at ``batch_size`` examples or at the edge of an event-time period
    of ``period_s`` (the example log's files: a topic and a log of the same examples give the
    same batches), never spans two partitions, and is short only at the end of what is read
    or, following, once its first example waited ``max_batch_wait_s`` (wall clock; None: never,
    so batches do not depend on when examples arrive). On a keyed runner of ``subtasks`` parallel
    subtasks (Flink), partition p's reader runs on subtask ``p % subtasks``, with a worker
    after it: give the topic a multiple of ``--num_workers`` partitions. The offsets read are
    the readers' restrictions, in Flink's checkpoints. ``follow=False`` reads to the end
    offsets the topic has when the pipeline is built (a backfill); ``follow=True`` goes on
    as examples come, until ``stop_timestamp``.

    ``.with_dead_letters()`` returns ``(batches, dead letters)`` (``ReadFromKafkaTopic``'s).

    Args:
        bootstrap, topic: where the examples are.
        batch_size: the largest batch.
        dense_dim: dense inputs per example.
        pacing: ``transforms.example_reader.Pacing`` on Flink (None on the DirectRunner).
        follow, poll_interval_s, stop_timestamp: following (above).
        period_s, max_batch_wait_s: where batches end (above).
        start_after_ms: read only examples later than this event time (ms): each partition
            from its first message stamped later (batch, then online: the backfill's last
            event time), skipping any earlier example met after it
            (``kafka_source.examples_before_start``).
        subtasks: the runner's keyed parallelism (Flink's ``--parallelism``), or None.
        start, stop, ranges: offsets to read (:func:`partition_ranges`).
    """

    def __init__(self, bootstrap: str, topic: str, batch_size: int, dense_dim: int,
                 pacing=None, follow: bool = False, poll_interval_s: float = 0.2,
                 stop_timestamp: Optional[float] = None, subtasks: Optional[int] = None,
                 start="earliest", stop="end", ranges: Optional[list] = None,
                 period_s: int = 3600, max_batch_wait_s: Optional[float] = None,
                 start_after_ms: Optional[int] = None, poll_timeout_s: float = 0.1,
                 consumer_config: Optional[dict] = None):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"ReadExampleBatchesFromKafka.batch_size must be >= 1, "
                             f"got {batch_size}")
        self.bootstrap, self.topic = bootstrap, topic
        self.batch_size, self.dense_dim = int(batch_size), int(dense_dim)
        self.gate = pacing.gate() if pacing is not None else None
        self.checkpoint_s = pacing.checkpoint_s if pacing is not None else None
        self.follow = follow
        self.poll_interval_s = poll_interval_s
        self.stop_timestamp = stop_timestamp
        self.subtasks = subtasks
        self.start, self.stop, self.ranges = start, (None if follow else stop), ranges
        self.poll_timeout_s = poll_timeout_s
        self.consumer_config = consumer_config
        self.period_s = period_s
        self.max_batch_wait_s = max_batch_wait_s
        self.start_after_ms = start_after_ms
        if start_after_ms is not None:
            self.start = int(start_after_ms)

    def expand(self, pbegin):
        ranges = self.ranges if self.ranges is not None else partition_ranges(
            self.bootstrap, self.topic, self.start, self.stop,
            consumer_config=self.consumer_config)
        args = (self.bootstrap, self.batch_size, self.dense_dim, self.checkpoint_s, self.gate,
                self.poll_timeout_s, self.consumer_config, self.period_s, self.start_after_ms)
        read = (_FollowExampleBatchesFn(*args, poll_interval_s=self.poll_interval_s,
                                        stop_timestamp=self.stop_timestamp,
                                        max_batch_wait_s=self.max_batch_wait_s)
                if self.follow else _ReadExampleBatchesFn(*args))
        return self.split_dead_letters(
            pbegin
            | "Partitions" >> beam.Create(reader_elements(ranges, self.subtasks),
                                          reshuffle=False)
            | "ReadInOrder" >> beam.ParDo(read).with_outputs(DEAD_LETTER))
