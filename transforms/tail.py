"""Tailing a folder of time-ordered log files: the watermark follows the logs' event time.

::

    live = p | TailAvroLogs("landing/feature_log/part-*.avro")       # unbounded, event-time
    once = p | TailAvroLogs("logs/part-*.avro", read_once=True)      # bounded, file by file

:class:`TailAvroLogs` reads a folder of *time-ordered* files (names that give their records'
start, as ``dataflow.data`` writes them: :func:`log_file_start_ms`) in that order, a file at a
time, and moves the watermark with them: use it for the joiner and training. Its state is one
file index. Files are read as ``transforms.sources`` reads them (damaged files and bad records
are dead-lettered, counted and logged; the stream goes on). For files of any name in any
order, ``transforms.sources.WatchAvroLogs`` (whose watermark follows the wall clock).

**On Flink, Python SDF polling grows checkpoints** (apache/beam#27648: the deferred residuals
of a polling SDF, :class:`TailAvroFilesFn` here, accumulate in Flink's checkpointed state).
Fine for tests, demos and jobs of hours; a long-running production job should get new files
from a message queue (Kafka or Pub/Sub notifications) instead.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Duration, Timestamp

from transforms.sources import DEAD_LETTER, LogFileReader, WithDeadLetters

__all__ = ["TailAvroLogs", "TailAvroFilesFn", "log_file_start_ms", "ordered_log_files",
           "NO_END"]

_LOG = logging.getLogger(__name__)

# The end of the offset range of a followed folder that never ends by itself: file indices
# of a tail here, (period, batch) positions of the example reader (transforms.example_reader); a
# reader that stops claims it, which completes the range.
NO_END = 1 << 62


_LOG_FILE_NAME = re.compile(r"part-(\d{8})-(\d{2})(\d{4})?\.avro")


def log_file_start_ms(path: str) -> Optional[int]:
    """The event time a log file's name says its records start at.

    Args:
        path: ``…/part-YYYYmmdd-HH.avro`` (``dataflow.data``) or
            ``…/part-YYYYmmdd-HHMMSS.avro`` (serving's feature log, the simulator's action
            log), in UTC.

    Returns:
        ms since the epoch, or None for another name.

    >>> log_file_start_ms("logs/part-20240101-01.avro")
    1704070800000
    >>> log_file_start_ms("x/part-20240101-013000.avro")
    1704072600000
    >>> log_file_start_ms("features-0.avro") is None
    True
    """
    m = _LOG_FILE_NAME.fullmatch(os.path.basename(path))
    if m is None:
        return None
    stamp = datetime.datetime.strptime(m[1] + m[2] + (m[3] or "0000"), "%Y%m%d%H%M%S")
    return int(stamp.replace(tzinfo=datetime.timezone.utc).timestamp()) * 1000


def ordered_log_files(file_pattern: str) -> list:
    """The files a pattern matches, in the order of their records.

    Args:
        file_pattern: a glob (any Beam file system).

    Returns:
        their paths in the order of the start their names give (:func:`log_file_start_ms`;
        then by path), or by path if a name gives none.

    >>> import os, tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> for name in ("part-20240101-013000.avro", "part-20240101-01.avro"):
    ...     open(os.path.join(folder.name, name), "wb").close()
    >>> [os.path.basename(p) for p in ordered_log_files(f"{folder.name}/part-*.avro")]
    ['part-20240101-01.avro', 'part-20240101-013000.avro']
    >>> folder.cleanup()
    """
    paths = [m.path for m in FileSystems.match([file_pattern])[0].metadata_list]
    starts = {p: log_file_start_ms(p) for p in paths}
    if any(t is None for t in starts.values()):
        return sorted(paths)
    return sorted(paths, key=lambda p: (starts[p], p))


class _TailRestrictions(RestrictionProvider):
    """Restriction = the range of file indices (in name order) still to read."""

    def initial_restriction(self, file_pattern):
        return OffsetRange(0, NO_END)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, file_pattern, restriction):
        return 1  # the backlog is unknown until the folder is listed

    def truncate(self, file_pattern, restriction):
        return None  # on drain, stop reading


class TailAvroFilesFn(beam.DoFn):
    """file pattern → records of its files in event-time order, each file once, waiting for
    more (``read_once``: stopping after the files listed).

    Files are taken in the order of the start their names give (:func:`ordered_log_files`;
    name order where a name gives none), **one a call**. The position in the restriction is
    the index of the next file in that order, so a checkpoint holds one integer (no set of
    seen names). After a file the output watermark moves to the next file's name-given start,
    or, if there is none yet, to the latest event time read: every later file must hold only
    later records (files named by their start, as ``dataflow.data`` writes them). The call
    then returns with the rest deferred: at once if another file is listed, after
    ``interval_seconds`` if not. A runner takes the watermark a call leaves only when the call
    returns (Beam 2.62's Flink runner holds the reader's output watermark at its deferred
    residual's, ``StateAndTimerBundleCheckpointHandler``), so windows and timers downstream
    fire file by file, also through a backlog. A record earlier than the watermark already
    given is late downstream: it is still passed on, and counted
    (``sources.records_behind_watermark``, with a warning) so that the caller can tell.
    What cannot be read goes to the ``DEAD_LETTER`` output (``transforms.sources``).

    Args:
        interval_seconds: how long to wait before listing the folder again when every file
            listed has been read.
        stop_timestamp: stop waiting for files at this wall-clock time.
        time_field: the records' event time field, integer ms since the epoch.
        stop_when_exists: stop once this path exists (after reading every file listed).
        read_once: stop after reading the files listed.

    >>> import tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from apache_beam.utils.timestamp import MAX_TIMESTAMP
    >>> from schemas import write_avro
    >>> folder = tempfile.TemporaryDirectory()
    >>> write_avro(f"{folder.name}/part-20240101-01.avro", "action_log", [
    ...     {"request_id": "r1", "ts_ms": 1_704_070_800_000, "action": "click"}])
    1
    >>> with beam.Pipeline() as p:
    ...     read = (p | beam.Create([f"{folder.name}/part-*.avro"])
    ...             | beam.ParDo(TailAvroFilesFn(1.0, MAX_TIMESTAMP, read_once=True))
    ...             .with_outputs(DEAD_LETTER, main="records"))
    ...     _ = assert_that(read.records | beam.Map(lambda a: a["request_id"]),
    ...                     equal_to(["r1"]))
    >>> folder.cleanup()
    """

    def __init__(self, interval_seconds: float, stop_timestamp: Timestamp,
                 time_field: str = "ts_ms", stop_when_exists: Optional[str] = None,
                 read_once: bool = False):
        self.interval = Duration.of(interval_seconds)
        self.stop_timestamp = stop_timestamp
        self.time_field = time_field
        self.stop_when_exists = stop_when_exists
        self.read_once = read_once
        self.reading = LogFileReader(time_field)
        self.behind = Metrics.counter("sources", "records_behind_watermark")
        self.listed: dict = {}  # file pattern -> its ordered files when last listed

    @beam.DoFn.unbounded_per_element()
    def process(self, file_pattern,
                tracker=beam.DoFn.RestrictionParam(_TailRestrictions()),
                watermark=beam.DoFn.WatermarkEstimatorParam(
                    ManualWatermarkEstimator.default_provider())):
        # (a method of its own: Beam 2.62 warns about a process method with yield and return)
        yield from self._tail(file_pattern, tracker, watermark)

    def _tail(self, file_pattern, tracker, watermark):
        index = tracker.current_restriction().start
        # Looked for before the listing: whatever landed before the marker is then listed.
        marked = bool(self.stop_when_exists) and FileSystems.exists(self.stop_when_exists)
        paths = self._listing(file_pattern, index)
        if index < len(paths):
            if not tracker.try_claim(index):
                return  # the runner split the rest off
            yield from self._read_one(paths, index, watermark)
            if index + 1 < len(paths):
                tracker.defer_remainder(Duration(0))  # the next file at once, in a new call
                return
            index += 1
        if self.read_once or marked or Timestamp.now() >= self.stop_timestamp:
            tracker.try_claim(NO_END)  # past the range: the restriction is done
        else:
            tracker.defer_remainder(self.interval)  # wait for more files

    def _listing(self, file_pattern, index: int) -> list:
        """The ordered files, listed again only once ``index`` reaches the last one known:
        whether another follows is then asked of the folder. A backlog of n files costs about
        one listing, not n (later files only ever come after the known ones)."""
        known = self.listed.get(file_pattern)
        if known is None or index + 1 >= len(known):
            known = self.listed[file_pattern] = ordered_log_files(file_pattern)
        return known

    def _read_one(self, paths: list, index: int, watermark):
        """The records and dead letters of ``paths[index]``; then the watermark moves to the
        next file's name-given start, or to the latest event time read."""
        path = paths[index]
        records, dead = self._read(path)
        told = watermark.current_watermark()  # what the runner was told: nothing earlier
        if told is not None:                  # may come (it would be late downstream)
            behind = sum(1 for r in records if r.timestamp < told)
            if behind:
                self.behind.inc(behind)
                _LOG.warning("%s: %d records are earlier than the watermark %s (its file name "
                             "or an earlier file's records): late for event-time steps",
                             path, behind, told)
        yield from records
        start = log_file_start_ms(path)
        at = Timestamp(micros=start * 1000) if start is not None else told
        if at is not None and told is not None and told > at:
            at = told
        for d in dead:  # at the file's own time, or the stream's (never behind the watermark)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER,
                                           d if at is None else TimestampedValue(d, at))
        following = log_file_start_ms(paths[index + 1]) if index + 1 < len(paths) else None
        if following is not None:  # the next file holds nothing earlier than its name says
            self._advance(watermark, Timestamp(micros=following * 1000))
        elif records:
            self._advance(watermark, max(r.timestamp for r in records))

    @staticmethod
    def _advance(watermark, event_time: Timestamp) -> None:
        current = watermark.current_watermark()
        if current is None or event_time > current:
            watermark.set_watermark(event_time)

    def _read(self, path) -> tuple:
        """``(timestamped records, dead letters)`` of one file (an hour of logs: it fits in
        memory)."""
        return self.reading.read(path, lambda: FileSystems.open(path))


class TailAvroLogs(WithDeadLetters, beam.PTransform):
    """New files of a time-ordered log folder → their records, with an event-time watermark.

    Unlike :class:`transforms.sources.WatchAvroLogs` (whose watermark is the poll time), the
    watermark here follows the files' event time, file by file (:class:`TailAvroFilesFn`), so
    the joiner's event-time timers and windows see the logs' own clock, live or replayed. It
    needs what ``python -m dataflow.data`` writes: names that give the start of their records
    (``part-YYYYmmdd-HH[MMSS].avro``), each file holding only records later than those of the
    files before it, written atomically (temporary name, then rename), never a file sorting
    before one already read. Polls every ``interval_seconds`` until ``stop_timestamp`` (wall
    clock; default never) or, with ``stop_when_exists``, until that path exists: the writer
    creates it after its last file has landed, and every file that landed before it is read
    first. The SDF polling caveat on Flink (apache/beam#27648, module docstring) applies here
    too, but its state is one offset. Dead letters as ``transforms.sources.ReadAvroLogs``:
    :meth:`with_dead_letters`.

    Args:
        file_pattern: the folder's files, e.g. ``landing/feature_log/part-*.avro``.
        interval_seconds: how often to list the folder while waiting for files.
        stop_timestamp: when to stop waiting (wall clock; default: never).
        time_field: the records' event time field, integer ms since the epoch.
        stop_when_exists: stop once this path exists, after reading every file listed.
        read_once: read the files there are and stop (a bounded read whose watermark
            follows the files, ``dataflow join --ordered_read``).

    >>> import tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from schemas import write_avro
    >>> folder = tempfile.TemporaryDirectory()
    >>> for hour in (1, 2):
    ...     _ = write_avro(f"{folder.name}/part-20240101-0{hour}.avro", "action_log", [
    ...         {"request_id": f"r{hour}", "ts_ms": 1_704_067_200_000 + hour * 3_600_000,
    ...          "action": "click"}])
    >>> with beam.Pipeline() as p:
    ...     actions = p | TailAvroLogs(f"{folder.name}/part-*.avro", read_once=True)
    ...     _ = assert_that(actions | beam.Map(lambda a: a["request_id"]),
    ...                     equal_to(["r1", "r2"]))
    >>> folder.cleanup()
    """

    def __init__(self, file_pattern: str, interval_seconds: float = 10.0,
                 stop_timestamp: Timestamp | float = MAX_TIMESTAMP,
                 time_field: str = "ts_ms", stop_when_exists: Optional[str] = None,
                 read_once: bool = False):
        super().__init__()
        self.file_pattern = file_pattern
        self.interval_seconds = interval_seconds
        self.stop_timestamp = Timestamp.of(stop_timestamp)
        self.time_field = time_field
        self.stop_when_exists = stop_when_exists
        self.read_once = read_once

    def expand(self, pbegin):
        return self.split_dead_letters(
            pbegin
            | "Pattern" >> beam.Create([self.file_pattern])
            | "TailFiles" >> beam.ParDo(TailAvroFilesFn(
                self.interval_seconds, self.stop_timestamp, self.time_field,
                self.stop_when_exists, self.read_once)).with_outputs(
                    DEAD_LETTER))
