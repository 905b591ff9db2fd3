"""Reading feature and action logs: bounded Avro files, or a folder watched for new files.

Every record comes out as a dict stamped with its **event time** (``ts_ms``), which the
joiner's event-time timers and the training order rely on::

    logs = p | ReadFeatureLogs("out/synth/feature_log/*.avro")      # bounded (batch/backfill)
    acts = p | ReadActionLogs("out/synth/action_log/*.avro")
    live = p | WatchAvroLogs("landing/feature_log/*.avro", interval_seconds=10)  # unbounded

``python -m dataflow.data synth|movielens`` writes such files (see ``dataflow/data.py``).

Watching a folder, and what to know before relying on it
---------------------------------------------------------
:class:`WatchAvroLogs` is Beam's ``MatchContinuously`` (a ``PeriodicImpulse`` that lists the
pattern every ``interval_seconds`` and forgets no file name it has seen) + ``ReadMatches`` +
:class:`ReadAvroFileFn`. Three properties follow:

* **Write files atomically.** A file is read once, when first matched: a writer must create
  it under a name the pattern does not match (``.part-x.avro.tmp``) and rename it when
  complete. A file that cannot be read is counted (``sources.unreadable_files``), logged
  and skipped; the stream goes on.
* **Its watermark is the poll time (wall clock), not the logs' event time.** Records older
  than the last poll are late for event-time logic downstream (windows, event-time timers).
  Live logs land minutes behind real time, so give downstream event-time steps an allowed
  lateness or a horizon larger than the landing delay. Replaying old logs through a watched
  folder is therefore not the way to backfill: read them bounded with
  :class:`ReadFeatureLogs` / :class:`ReadActionLogs` (DESIGN §4, "batch, then online").
* **On Flink, Python SDF polling grows checkpoints without bound** (apache/beam#27648:
  ``PeriodicImpulse``'s deferred residuals accumulate in Flink's checkpointed state), and the
  set of seen file names lives in state keyed by path. Fine for tests, demos and jobs of
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
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

__all__ = ["ReadFeatureLogs", "ReadActionLogs", "ReadAvroLogs", "WatchAvroLogs",
           "ReadAvroFileFn", "with_event_time"]

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
