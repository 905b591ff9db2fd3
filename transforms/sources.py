"""Reading feature and action logs: bounded Avro files, or a folder watched for new files.

Every record comes out as a dict stamped with its **event time** (``ts_ms``), which the
joiner's event-time timers and the training order rely on::

    logs = p | ReadFeatureLogs("out/synth/feature_log/*.avro")      # bounded (batch/backfill)
    acts = p | ReadActionLogs("out/synth/action_log/*.avro")
    new = p | WatchAvroLogs("landing/any/*.avro", interval_seconds=10)  # unbounded, any names
                                                                       # (watermark = wall clock)

``python -m dataflow.data synth|movielens`` writes such files (see ``dataflow/data.py``);
``transforms.tail.TailAvroLogs`` tails a folder of time-ordered ones with an event-time
watermark.

Damaged files and bad records never stop a read
-----------------------------------------------
Every reader reads a file with ``transforms.avro_recovery.read_avro_file``: the records of
every intact block go through, a damaged stretch (a corrupt block, a truncated end) is
reported with how many records it took where that can be known, and a record that cannot be
decoded alone (invalid UTF-8 in a string) or has no usable event time is dead-lettered with
its reason. ``.with_dead_letters()`` returns the dead letters too::

    records, dead = p | ReadFeatureLogs("logs/*.avro").with_dead_letters()

Dead letters: ``{"reason", "detail", "file", "offset", "records_lost", "record"}``; reasons
``truncated``, ``corrupt_block``, ``unreadable_file`` (``records_lost`` = how many records
the damage took, None if unknown), ``invalid_utf8``, ``missing_field:ts_ms``,
``wrong_type:ts_ms``, ``out_of_range:ts_ms``, ``not_a_record`` (``records_lost`` = 0: the
record, decoded as far as possible, is in ``record``). Without ``.with_dead_letters()`` they
are still counted (namespace ``sources``: ``unreadable_files`` = damaged files,
``bad_records``, ``records_lost``) and logged.

Watching a folder, and what to know before relying on it
---------------------------------------------------------
:class:`WatchAvroLogs` takes files of any name in any order, at the price of a watermark that
follows the wall clock. It is Beam's ``MatchContinuously`` (a ``PeriodicImpulse`` that lists
the pattern every ``interval_seconds`` and forgets no file name it has seen) + ``ReadMatches``
+ :class:`ReadAvroFileFn`. Three properties follow:

* **Write files atomically.** A file is read once, when first matched: a writer must create
  it under a name the pattern does not match (``.part-x.avro.tmp``) and rename it when
  complete. What cannot be read of a file is dead-lettered, counted and logged (above); the
  stream goes on.
* **Its watermark is the poll time (wall clock), not the logs' event time.** Records older
  than the last poll are late for event-time logic downstream (windows, event-time timers):
  live logs land minutes behind real time, replayed logs years behind. Use
  ``transforms.tail.TailAvroLogs`` for event-time work, or give downstream steps an allowed
  lateness larger than the landing delay. Backfills read bounded with
  :class:`ReadFeatureLogs` / :class:`ReadActionLogs` (DESIGN §4, "batch, then online").
* **On Flink, Python SDF polling grows checkpoints without bound** (apache/beam#27648:
  the deferred residuals of a polling SDF, ``PeriodicImpulse`` here and
  ``transforms.tail.TailAvroFilesFn`` too, accumulate in Flink's checkpointed state), and the
  set of seen file names lives in state keyed by path. Fine for tests, demos and jobs of
  hours; a long-running production job should get new files from a message queue (Kafka or
  Pub/Sub notifications) instead. On the DirectRunner it is tested with files added while
  the pipeline runs, bounded by ``stop_timestamp``.
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Optional

import apache_beam as beam
from apache_beam.io.fileio import EmptyMatchTreatment, MatchContinuously, MatchFiles, ReadMatches
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Timestamp

from schemas import strict_json
from transforms.avro_recovery import file_dead_letter, read_avro_file

__all__ = ["ReadFeatureLogs", "ReadActionLogs", "ReadAvroLogs", "WatchAvroLogs",
           "ReadAvroFileFn", "LogFileReader", "WithDeadLetters", "with_event_time",
           "event_time", "BadRecord", "DEAD_LETTER"]

_LOG = logging.getLogger(__name__)

DEAD_LETTER = "dead_letter"  # the tag of the dead-letter output (as transforms.features)
_MIN_MS = MIN_TIMESTAMP.micros // 1000 + 1
_MAX_MS = GlobalWindow().max_timestamp().micros // 1000  # later cannot be an element's time
_MAX_REPR = 2000


class BadRecord(ValueError):
    """A record a reader cannot pass on.

    Args:
        reason: a short machine-readable code (a dead letter's ``reason``).
        detail: what is wrong, for a person.

    >>> try:
    ...     event_time({"request_id": "r1"})
    ... except BadRecord as e:
    ...     print(e.reason)
    missing_field:ts_ms
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def event_time(record, time_field: str = "ts_ms") -> Timestamp:
    """The event time of a record.

    Args:
        record: a dict.
        time_field: the field that holds the event time, integer ms since the epoch.

    Returns:
        ``record[time_field]`` as a Beam ``Timestamp``.

    Raises:
        BadRecord: the record has no event time that a Beam element can carry.

    >>> event_time({"ts_ms": 1500})
    Timestamp(1.500000)
    >>> event_time({"ts_ms": "noon"})
    Traceback (most recent call last):
    ...
    transforms.sources.BadRecord: wrong_type:ts_ms: expected integer ms since the epoch, got str 'noon'
    """
    if not isinstance(record, Mapping):
        raise BadRecord("not_a_record", f"expected a record (dict), got {type(record).__name__}")
    ts = record.get(time_field)
    if ts is None:
        raise BadRecord(f"missing_field:{time_field}", f"the record has no {time_field!r}")
    if not isinstance(ts, numbers.Integral) or isinstance(ts, bool):
        raise BadRecord(f"wrong_type:{time_field}", f"expected integer ms since the epoch, got "
                                                    f"{type(ts).__name__} {ts!r:.100}")
    if not _MIN_MS <= ts <= _MAX_MS:
        raise BadRecord(f"out_of_range:{time_field}",
                        f"{ts} is outside the event times Beam can carry [{_MIN_MS}, {_MAX_MS}]")
    return Timestamp(micros=int(ts) * 1000)


def with_event_time(record: dict, time_field: str = "ts_ms") -> TimestampedValue:
    """A record stamped with its event time.

    Args:
        record: a dict.
        time_field: the field that holds the event time, integer ms since the epoch.

    Returns:
        A ``TimestampedValue``.

    Raises:
        BadRecord: the record has none (see :func:`event_time`).

    >>> with_event_time({"ts_ms": 2_000}).timestamp
    Timestamp(2)
    """
    return TimestampedValue(record, event_time(record, time_field))


class LogFileReader:
    """What the log file readers do with a file: read it, stamp its records, count, log.

    Args:
        time_field: the records' event time field, integer ms since the epoch.

    Beam counters (namespace ``sources``): ``files_read``, ``records_read``,
    ``unreadable_files`` (damaged files), ``bad_records``, ``records_lost``.

    >>> import os, tempfile
    >>> from schemas import write_avro
    >>> folder = tempfile.TemporaryDirectory()
    >>> path = os.path.join(folder.name, "part-00.avro")
    >>> write_avro(path, "action_log", [{"request_id": "r1", "ts_ms": 1_000, "action": "click"},
    ...                                 {"request_id": "r2", "ts_ms": -2**62, "action": "click"}])
    2
    >>> records, dead = LogFileReader("ts_ms").read(path, lambda: open(path, "rb"))
    >>> [(r.value["request_id"], r.timestamp) for r in records], [d["reason"] for d in dead]
    ([('r1', Timestamp(1))], ['out_of_range:ts_ms'])
    >>> folder.cleanup()
    """

    def __init__(self, time_field: str):
        self.time_field = time_field
        self.files = Metrics.counter("sources", "files_read")
        self.records = Metrics.counter("sources", "records_read")
        self.unreadable = Metrics.counter("sources", "unreadable_files")
        self.bad_records = Metrics.counter("sources", "bad_records")
        self.records_lost = Metrics.counter("sources", "records_lost")

    def read(self, path, open_file) -> tuple:
        """Reads one file.

        Args:
            path: the file's path, for the dead letters and the log.
            open_file: a callable that opens the file for reading bytes.

        Returns:
            ``(timestamped records, dead letters)``.
        """
        try:
            with open_file() as f:
                data = f.read()
        except Exception as e:  # noqa: BLE001 - vanished, unreadable: report, go on
            records, dead = [], [file_dead_letter(path, "unreadable_file",
                                                  f"{type(e).__name__}: {e}", None, None)]
        else:
            records, dead = read_avro_file(data, path)
        damaged = any(d["records_lost"] != 0 for d in dead)  # not just bad records
        stamped = []
        for record in records:
            try:
                stamped.append(TimestampedValue(record, event_time(record, self.time_field)))
            except BadRecord as e:
                dead.append(file_dead_letter(path, e.reason, e.detail, None, 0, _safe(record)))
        if damaged:
            lost = [d["records_lost"] for d in dead if d["records_lost"]]
            self.unreadable.inc()
            self.records_lost.inc(sum(lost))
            _LOG.error("damaged Avro file %s: %d records read, %d records lost%s: %s", path,
                       len(stamped), sum(lost),
                       " (and an unknown number)" if any(d["records_lost"] is None
                                                         for d in dead) else "",
                       "; ".join(f"{d['reason']} at byte {d['offset']}: {d['detail']}"
                                 for d in dead if d["records_lost"] != 0)[:_MAX_REPR])
        else:
            self.files.inc()
        bad = sum(1 for d in dead if d["records_lost"] == 0)
        if bad:
            self.bad_records.inc(bad)
            _LOG.warning("Avro file %s: %d bad records dead-lettered (first: %s)", path, bad,
                         next(d["detail"] for d in dead if d["records_lost"] == 0))
        self.records.inc(len(stamped))
        return stamped, dead


def _safe(record):
    """The record if a Beam coder can carry it, else its (truncated) repr."""
    try:
        strict_json.dumps(record, default=repr).encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError):
        return repr(record)[:_MAX_REPR]
    return record


class WithDeadLetters:
    """A read transform's ``.with_dead_letters()``: then it returns ``(records, dead
    letters)``, else only the records.

    Its ``expand`` returns :meth:`split_dead_letters` of outputs ``with_outputs(DEAD_LETTER)``.

    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> class Evens(WithDeadLetters, beam.PTransform):
    ...     def expand(self, numbers):
    ...         return self.split_dead_letters(numbers | beam.FlatMap(
    ...             lambda n: [n] if n % 2 == 0 else [beam.pvalue.TaggedOutput(DEAD_LETTER, n)]
    ...         ).with_outputs(DEAD_LETTER))
    >>> with beam.Pipeline() as p:
    ...     evens, odd = p | beam.Create([1, 2, 3, 4]) | Evens().with_dead_letters()
    ...     _ = assert_that(evens, equal_to([2, 4]), label="Evens")
    ...     _ = assert_that(odd, equal_to([1, 3]), label="DeadLetters")
    """
    _dead_letters = False

    def with_dead_letters(self):
        """Returns this transform, which will return ``(records, dead letters)``."""
        self._dead_letters = True
        return self

    def split_dead_letters(self, result):
        """What ``expand`` returns.

        Args:
            result: a ``DoOutputsTuple`` with a ``DEAD_LETTER`` output.

        Returns:
            Its main output, or ``(main output, dead letters)`` if :meth:`with_dead_letters`
            asked for them.
        """
        records, dead = result[None], result[DEAD_LETTER]
        return (records, dead) if self._dead_letters else records


class ReadAvroLogs(WithDeadLetters, beam.PTransform):
    """Avro files matching ``file_pattern`` → their records (dicts), stamped with event time.

    Bounded: for batch runs and backfills. Files are read in parallel, each whole (an hour of
    logs), records in file order. Damaged files and bad records do not fail the run: see the
    module docstring and :meth:`with_dead_letters`.

    Args:
        file_pattern: the files to read; matching none is an error.
        time_field: the records' event time field, integer ms since the epoch.

    Returns:
        (``expand``) the records, or ``(records, dead letters)`` after
        :meth:`with_dead_letters`.

    :class:`ReadFeatureLogs` and :class:`ReadActionLogs` name what they read; this reads
    any Avro records with an event time:

    >>> import tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from schemas import write_avro
    >>> folder = tempfile.TemporaryDirectory()
    >>> write_avro(f"{folder.name}/events.avro", "smoke_event", [
    ...     {"request_id": "r1", "user": "u1", "ts_ms": 1_000, "value": 0.5},
    ...     {"request_id": "r2", "user": "u1", "ts_ms": -2**62, "value": 1.0}])
    2
    >>> with beam.Pipeline() as p:
    ...     events, dead = (p | ReadAvroLogs(f"{folder.name}/*.avro").with_dead_letters())
    ...     _ = assert_that(events | beam.Map(lambda e, t=beam.DoFn.TimestampParam:
    ...                                       (e["request_id"], t.micros // 1000)),
    ...                     equal_to([("r1", 1_000)]), label="Events")
    ...     _ = assert_that(dead | beam.Map(lambda d: d["reason"]),
    ...                     equal_to(["out_of_range:ts_ms"]), label="DeadLetters")
    >>> folder.cleanup()
    """

    def __init__(self, file_pattern: str, time_field: str = "ts_ms"):
        super().__init__()
        self.file_pattern = file_pattern
        self.time_field = time_field

    def expand(self, pbegin):
        return self.split_dead_letters(
            pbegin
            | "Match" >> MatchFiles(self.file_pattern,  # no file at all: a wrong pattern
                                    empty_match_treatment=EmptyMatchTreatment.DISALLOW)
            | "SpreadFiles" >> beam.Reshuffle()
            | "Open" >> ReadMatches()
            | "ReadRecords" >> beam.ParDo(ReadAvroFileFn(self.time_field)).with_outputs(
                DEAD_LETTER))


class ReadFeatureLogs(ReadAvroLogs):
    """FeatureLog files (``schemas/feature_log.avsc``) → FeatureLog dicts at their ``ts_ms``
    (arguments: :class:`ReadAvroLogs`).

    >>> import tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from schemas import write_avro
    >>> folder = tempfile.TemporaryDirectory()
    >>> write_avro(f"{folder.name}/features.avro", "feature_log", [
    ...     {"request_id": "r1", "ts_ms": 1_000, "user_id": "u1", "item_id": "i9"}])
    1
    >>> with beam.Pipeline() as p:
    ...     served = p | ReadFeatureLogs(f"{folder.name}/*.avro")
    ...     _ = assert_that(served | beam.Map(lambda f: (f["user_id"], f["item_id"])),
    ...                     equal_to([("u1", "i9")]))
    >>> folder.cleanup()
    """


class ReadActionLogs(ReadAvroLogs):
    """ActionLog files (``schemas/action_log.avsc``) → ActionLog dicts at their ``ts_ms``
    (arguments: :class:`ReadAvroLogs`).

    >>> import tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from schemas import write_avro
    >>> folder = tempfile.TemporaryDirectory()
    >>> write_avro(f"{folder.name}/actions.avro", "action_log", [
    ...     {"request_id": "r1", "ts_ms": 2_000, "action": "click"}])
    1
    >>> with beam.Pipeline() as p:
    ...     actions = p | ReadActionLogs(f"{folder.name}/*.avro")
    ...     _ = assert_that(actions | beam.Map(lambda a: (a["request_id"], a["action"])),
    ...                     equal_to([("r1", "click")]))
    >>> folder.cleanup()
    """


class ReadAvroFileFn(beam.DoFn):
    """A ``ReadableFile`` → its Avro records, each stamped with its event time, and to
    ``dead_letter`` what cannot be read of it (module docstring): one bad file or record
    must not stop a stream.

    Args:
        time_field: the records' event time field, integer ms since the epoch.

    >>> import tempfile
    >>> from apache_beam.io.fileio import MatchFiles, ReadMatches
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> folder = tempfile.TemporaryDirectory()
    >>> with open(f"{folder.name}/part-00.avro", "wb") as f:
    ...     _ = f.write(b"Obj\x01 not Avro")
    >>> with beam.Pipeline() as p:
    ...     read = (p | MatchFiles(f"{folder.name}/*.avro") | ReadMatches()
    ...             | beam.ParDo(ReadAvroFileFn()).with_outputs(DEAD_LETTER, main="records"))
    ...     _ = assert_that(read.records, equal_to([]), label="Records")
    ...     _ = assert_that(read[DEAD_LETTER] | beam.Map(lambda d: d["reason"]),
    ...                     equal_to(["unreadable_file"]), label="DeadLetters")
    >>> folder.cleanup()
    """

    def __init__(self, time_field: str = "ts_ms"):
        self.reading = LogFileReader(time_field)

    def process(self, readable_file):
        path = readable_file.metadata.path
        records, dead = self.reading.read(path, readable_file.open)
        yield from records
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, d)


class WatchAvroLogs(WithDeadLetters, beam.PTransform):
    """New Avro files landing in a folder → their records, stamped with event time.

    Unbounded. Checks ``file_pattern`` every ``interval_seconds`` from ``start_timestamp``
    (default: when the pipeline is built) until ``stop_timestamp`` (wall-clock; default
    never), reading each new file once. Read the module docstring first: files must land
    atomically, the watermark is the poll time, and on Flink the polling state grows.

    Args:
        file_pattern: the files to read as they land.
        interval_seconds: how often to list ``file_pattern``.
        start_timestamp: when to start listing (wall clock; default: when the transform is
            made).
        stop_timestamp: when to stop listing (wall clock; default: never).
        time_field: the records' event time field, integer ms since the epoch.

    >>> import tempfile, time
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from schemas import write_avro
    >>> folder = tempfile.TemporaryDirectory()
    >>> write_avro(f"{folder.name}/a.avro", "action_log", [
    ...     {"request_id": "r1", "ts_ms": 1_000, "action": "click"}])
    1
    >>> with beam.Pipeline() as p:   # polls for 2 seconds (a live job: never stops)
    ...     actions = p | WatchAvroLogs(f"{folder.name}/*.avro", interval_seconds=0.5,
    ...                                 stop_timestamp=time.time() + 2)
    ...     _ = assert_that(actions | beam.Map(lambda a: a["request_id"]), equal_to(["r1"]))
    >>> folder.cleanup()
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
        return self.split_dead_letters(
                pbegin
                | "MatchNewFiles" >> MatchContinuously(
                    self.file_pattern, interval=self.interval_seconds,
                    has_deduplication=True, start_timestamp=self.start_timestamp,
                    stop_timestamp=self.stop_timestamp)
                | "Open" >> ReadMatches()
                | "ReadRecords" >> beam.ParDo(ReadAvroFileFn(self.time_field)).with_outputs(
                    DEAD_LETTER))
