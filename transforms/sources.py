"""Reading feature and action logs: bounded Avro files, or a folder watched for new files.

Every record comes out as a dict stamped with its **event time** (``ts_ms``), which the
joiner's event-time timers and the training order rely on::

    logs = p | ReadFeatureLogs("out/synth/feature_log/*.avro")      # bounded (batch/backfill)
    acts = p | ReadActionLogs("out/synth/action_log/*.avro")
    live = p | TailAvroLogs("landing/feature_log/part-*.avro")       # unbounded, event-time
    new = p | WatchAvroLogs("landing/any/*.avro", interval_seconds=10)  # unbounded, any names
                                                                       # (watermark = wall clock)

``python -m dataflow.data synth|movielens`` writes such files (see ``dataflow/data.py``).

Watching a folder, and what to know before relying on it
---------------------------------------------------------
Two unbounded reads. :class:`TailAvroLogs` reads a folder of *time-ordered* files (names
that sort in time order, as ``dataflow.data`` writes them) in name order and moves the
watermark to the latest event time read: use it for the joiner and training. Its state is
one file index. :class:`WatchAvroLogs` takes files of any name in any order, at the price of
a watermark that follows the wall clock:

:class:`WatchAvroLogs` is Beam's ``MatchContinuously`` (a ``PeriodicImpulse`` that lists the
pattern every ``interval_seconds`` and forgets no file name it has seen) + ``ReadMatches`` +
:class:`ReadAvroFileFn`. Three properties follow:

* **Write files atomically.** A file is read once, when first matched: a writer must create
  it under a name the pattern does not match (``.part-x.avro.tmp``) and rename it when
  complete. A file that cannot be read is counted (``sources.unreadable_files``), logged
  and skipped; the stream goes on.
* **Its watermark is the poll time (wall clock), not the logs' event time.** Records older
  than the last poll are late for event-time logic downstream (windows, event-time timers):
  live logs land minutes behind real time, replayed logs years behind. Use
  :class:`TailAvroLogs` for event-time work, or give downstream steps an allowed lateness
  larger than the landing delay. Backfills read bounded with :class:`ReadFeatureLogs` /
  :class:`ReadActionLogs` (DESIGN §4, "batch, then online").
* **On Flink, Python SDF polling grows checkpoints without bound** (apache/beam#27648:
  the deferred residuals of a polling SDF, ``PeriodicImpulse`` here and
  :class:`TailAvroFilesFn` too, accumulate in Flink's checkpointed state), and the set of
  seen file names lives in state keyed by path. Fine for tests, demos and jobs of
  hours; a long-running production job should get new files from a message queue (Kafka or
  Pub/Sub notifications) instead. On the DirectRunner it is tested with files added while
  the pipeline runs, bounded by ``stop_timestamp``.
"""
from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam
import fastavro
from apache_beam.io.avroio import ReadFromAvro
from apache_beam.io.fileio import MatchContinuously, ReadMatches
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Duration, Timestamp

__all__ = ["ReadFeatureLogs", "ReadActionLogs", "ReadAvroLogs", "WatchAvroLogs",
           "TailAvroLogs", "ReadAvroFileFn", "TailAvroFilesFn", "with_event_time"]

_LOG = logging.getLogger(__name__)


def with_event_time(record: dict, time_field: str = "ts_ms") -> TimestampedValue:
    """``record`` stamped with its event time (``record[time_field]`` in ms since the epoch)."""
    return TimestampedValue(record, record[time_field] / 1000.0)


class ReadAvroLogs(beam.PTransform):
    """Avro files matching ``file_pattern`` → their records (dicts), stamped with event time.

    Bounded: for batch runs and backfills. fastavro-based (``ReadFromAvro``); files are split
    and read in parallel, so records come out in no particular order: use their timestamps.
    """

    def __init__(self, file_pattern: str, time_field: str = "ts_ms"):
        super().__init__()
        self.file_pattern = file_pattern
        self.time_field = time_field

    def expand(self, pbegin):
        return (pbegin
                | "ReadAvro" >> ReadFromAvro(self.file_pattern)
                | "EventTime" >> beam.Map(with_event_time, self.time_field))


class ReadFeatureLogs(ReadAvroLogs):
    """FeatureLog files (``schemas/feature_log.avsc``) → FeatureLog dicts at their ``ts_ms``."""


class ReadActionLogs(ReadAvroLogs):
    """ActionLog files (``schemas/action_log.avsc``) → ActionLog dicts at their ``ts_ms``."""


class ReadAvroFileFn(beam.DoFn):
    """A ``ReadableFile`` → its Avro records, each stamped with its event time.

    A file that fails to decode is counted, logged and skipped (records before the damage
    have been emitted): one bad file must not stop a stream.
    """

    def __init__(self, time_field: str = "ts_ms"):
        self.time_field = time_field
        self.files = Metrics.counter("sources", "files_read")
        self.records = Metrics.counter("sources", "records_read")
        self.unreadable = Metrics.counter("sources", "unreadable_files")

    def process(self, readable_file):
        path = readable_file.metadata.path
        count = 0
        try:
            with readable_file.open() as f:
                for record in fastavro.reader(f):
                    yield TimestampedValue(record, record[self.time_field] / 1000.0)
                    count += 1
        except Exception as e:  # noqa: BLE001 - truncated/corrupt file, wrong schema
            self.unreadable.inc()
            _LOG.error("skipping the rest of unreadable Avro file %s after %d records: %s",
                       path, count, e)
        else:
            self.files.inc()
        self.records.inc(count)


class WatchAvroLogs(beam.PTransform):
    """New Avro files landing in a folder → their records, stamped with event time.

    Unbounded. Checks ``file_pattern`` every ``interval_seconds`` from ``start_timestamp``
    (default: when the pipeline is built) until ``stop_timestamp`` (wall-clock; default
    never), reading each new file once. Read the module docstring first: files must land
    atomically, the watermark is the poll time, and on Flink the polling state grows.
    """

    def __init__(self, file_pattern: str, interval_seconds: float = 10.0,
                 start_timestamp: Optional[Timestamp | float] = None,
                 stop_timestamp: Timestamp | float = MAX_TIMESTAMP,
                 time_field: str = "ts_ms"):
        super().__init__()
        self.file_pattern = file_pattern
        self.interval_seconds = interval_seconds
        # Beam's own default (Timestamp.now() in the signature) is the time of *import*.
        self.start_timestamp = Timestamp.of(start_timestamp if start_timestamp is not None
                                            else Timestamp.now())
        self.stop_timestamp = Timestamp.of(stop_timestamp)
        self.time_field = time_field

    def expand(self, pbegin):
        return (pbegin
                | "MatchNewFiles" >> MatchContinuously(
                    self.file_pattern, interval=self.interval_seconds,
                    has_deduplication=True, start_timestamp=self.start_timestamp,
                    stop_timestamp=self.stop_timestamp)
                | "Open" >> ReadMatches()
                | "ReadRecords" >> beam.ParDo(ReadAvroFileFn(self.time_field)))


# ---------------------------------------------------------------------------------------
# Tailing time-ordered files: the watermark follows the logs' event time.

_NO_END = 1 << 62  # the file index range of a tail that never ends by itself


class _TailRestrictions(RestrictionProvider):
    """Restriction = the range of file indices (in name order) still to read."""

    def initial_restriction(self, file_pattern):
        return OffsetRange(0, _NO_END)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, file_pattern, restriction):
        return 1  # the backlog is unknown until the folder is listed

    def truncate(self, file_pattern, restriction):
        return None  # on drain, stop reading


class TailAvroFilesFn(beam.DoFn):
    """file pattern → records of its files in **name order**, each file once, waiting for more.

    The position in the restriction is the index of the next file in sorted name order, so a
    checkpoint holds one integer (no set of seen names), and after each file the output
    watermark moves to the latest event time in it: every later file must hold only later
    records (files named by their hour, as ``dataflow.data`` writes them).
    """

    def __init__(self, interval_seconds: float, stop_timestamp: Timestamp,
                 time_field: str = "ts_ms"):
        self.interval = Duration.of(interval_seconds)
        self.stop_timestamp = stop_timestamp
        self.time_field = time_field
        self.files = Metrics.counter("sources", "files_read")
        self.records = Metrics.counter("sources", "records_read")
        self.unreadable = Metrics.counter("sources", "unreadable_files")

    @beam.DoFn.unbounded_per_element()
    def process(self, file_pattern,
                tracker=beam.DoFn.RestrictionParam(_TailRestrictions()),
                watermark=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        index = tracker.current_restriction().start
        paths = sorted(m.path for m in FileSystems.match([file_pattern])[0].metadata_list)
        claimed = True
        while claimed and index < len(paths):
            claimed = tracker.try_claim(index)  # False: the runner split the rest off
            if claimed:
                records = self._read(paths[index])
                for record in records:
                    yield TimestampedValue(record, record[self.time_field] / 1000.0)
                if records:
                    latest = max(r[self.time_field] for r in records)
                    self._advance(watermark, Timestamp(micros=latest * 1000))
                index += 1
        if not claimed:
            pass
        elif Timestamp.now() >= self.stop_timestamp:
            tracker.try_claim(_NO_END)  # past the range: the restriction is done
        else:
            tracker.defer_remainder(self.interval)

    @staticmethod
    def _advance(watermark, event_time: Timestamp) -> None:
        current = watermark.current_watermark()
        if current is None or event_time > current:
            watermark.set_watermark(event_time)

    def _read(self, path) -> list:
        """The file's records (one file is an hour of logs: it fits in memory)."""
        records: list = []
        try:
            with FileSystems.open(path) as f:
                records.extend(fastavro.reader(f))
        except Exception as e:  # noqa: BLE001 - a damaged file must not stop the stream
            self.unreadable.inc()
            _LOG.error("skipping the rest of unreadable Avro file %s after %d records: %s",
                       path, len(records), e)
        else:
            self.files.inc()
        self.records.inc(len(records))
        return records


class TailAvroLogs(beam.PTransform):
    """New files of a time-ordered log folder → their records, with an event-time watermark.

    Unlike :class:`WatchAvroLogs` (whose watermark is the poll time), the watermark here is
    the latest event time read, so the joiner's event-time timers and windows see the logs'
    own clock, live or replayed. It needs what ``python -m dataflow.data`` writes: names that
    sort in time order (``part-YYYYmmdd-HH.avro``), each file holding only records later than
    those of the files before it, written atomically (temporary name, then rename), never
    a file sorting before one already read. Polls every ``interval_seconds`` until
    ``stop_timestamp`` (wall clock; default never). The SDF polling caveat on Flink
    (apache/beam#27648, module docstring) applies here too, but its state is one offset.
    """

    def __init__(self, file_pattern: str, interval_seconds: float = 10.0,
                 stop_timestamp: Timestamp | float = MAX_TIMESTAMP,
                 time_field: str = "ts_ms"):
        super().__init__()
        self.file_pattern = file_pattern
        self.interval_seconds = interval_seconds
        self.stop_timestamp = Timestamp.of(stop_timestamp)
        self.time_field = time_field

    def expand(self, pbegin):
        return (pbegin
                | "Pattern" >> beam.Create([self.file_pattern])
                | "TailFiles" >> beam.ParDo(TailAvroFilesFn(
                    self.interval_seconds, self.stop_timestamp, self.time_field)))
