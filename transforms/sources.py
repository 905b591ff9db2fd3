"""Reading feature and action logs: bounded Avro files, or a folder watched for new files.

Every record comes out as a dict stamped with its **event time** (``ts_ms``), which the
joiner's event-time timers and the training order rely on::

    logs = p | ReadFeatureLogs("out/synth/feature_log/*.avro")      # bounded (batch/backfill)
    acts = p | ReadActionLogs("out/synth/action_log/*.avro")
    live = p | TailAvroLogs("landing/feature_log/part-*.avro")       # unbounded, event-time
    once = p | TailAvroLogs("logs/part-*.avro", read_once=True)      # bounded, file by file
    new = p | WatchAvroLogs("landing/any/*.avro", interval_seconds=10)  # unbounded, any names
                                                                       # (watermark = wall clock)

``python -m dataflow.data synth|movielens`` writes such files (see ``dataflow/data.py``).

Damaged files and bad records never stop a read
-----------------------------------------------
Every reader decodes a file with fastavro and, if that fails, again block by block
(:func:`read_avro_file`): the records of every intact block go through, a record that cannot
be decoded alone (invalid UTF-8 in a string) or has no usable event time is dead-lettered with
its reason, and a damaged stretch (a block that fails to decode or lacks its sync marker, a
truncated end) is reported; the read goes on after the next sync marker. How many records a
damaged block took is what its header says; how many a cut took (the rest of the block *and*
the blocks after it) is known only if the writer declared the file's record count in the
header (:data:`RECORD_COUNT_KEY`), and so is a cut exactly at a block boundary, which leaves a
valid, shorter Avro file. ``.with_dead_letters()`` returns the dead letters too::

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
Two unbounded reads. :class:`TailAvroLogs` reads a folder of *time-ordered* files (names
that give their records' start, as ``dataflow.data`` writes them) in that order, a file at a
time, and moves the watermark with them: use it for the joiner and training. Its state is
one file index. :class:`WatchAvroLogs` takes files of any name in any order, at the price of
a watermark that follows the wall clock:

:class:`WatchAvroLogs` is Beam's ``MatchContinuously`` (a ``PeriodicImpulse`` that lists the
pattern every ``interval_seconds`` and forgets no file name it has seen) + ``ReadMatches`` +
:class:`ReadAvroFileFn`. Three properties follow:

* **Write files atomically.** A file is read once, when first matched: a writer must create
  it under a name the pattern does not match (``.part-x.avro.tmp``) and rename it when
  complete. What cannot be read of a file is dead-lettered, counted and logged (above); the
  stream goes on.
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

import bz2
import datetime
import io
import json
import logging
import lzma
import numbers
import os
import re
import zlib
from collections.abc import Mapping
from typing import Optional

import apache_beam as beam
import fastavro
from apache_beam.io.fileio import EmptyMatchTreatment, MatchContinuously, MatchFiles, ReadMatches
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.transforms.window import GlobalWindow, TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, MIN_TIMESTAMP, Duration, Timestamp
from fastavro.read import HEADER_SCHEMA

from schemas import strict_json

__all__ = ["ReadFeatureLogs", "ReadActionLogs", "ReadAvroLogs", "WatchAvroLogs",
           "TailAvroLogs", "ReadAvroFileFn", "TailAvroFilesFn", "with_event_time",
           "event_time", "read_avro_file", "BadRecord", "DEAD_LETTER", "RECORD_COUNT_KEY",
           "log_file_start_ms", "ordered_log_files"]

_LOG = logging.getLogger(__name__)

DEAD_LETTER = "dead_letter"  # the tag of the dead-letter output (as transforms.features)
_MIN_MS = MIN_TIMESTAMP.micros // 1000 + 1
_MAX_MS = GlobalWindow().max_timestamp().micros // 1000  # later cannot be an element's time
_MAX_REPR = 2000


class BadRecord(ValueError):
    """A record a reader cannot pass on; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def event_time(record, time_field: str = "ts_ms") -> Timestamp:
    """The event time of ``record`` (``record[time_field]``, integer ms since the epoch), or
    :class:`BadRecord` if it has none that a Beam element can carry.

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
    """``record`` stamped with its event time (``record[time_field]`` in ms since the epoch);
    :class:`BadRecord` if it has none (see :func:`event_time`)."""
    return TimestampedValue(record, event_time(record, time_field))


# ---------------------------------------------------------------------------------------
# Reading one Avro file, damaged or not.

_SYNC_SIZE = 16
# Header metadata a writer may add (``metadata={RECORD_COUNT_KEY: str(n)}`` in fastavro):
# the number of records in the file, so that a file cut at a block boundary is noticed.
RECORD_COUNT_KEY = "beam_monolith.record_count"


def _damage(path, reason, detail, offset, records_lost, record=None) -> dict:
    return {"reason": reason, "detail": detail, "file": str(path), "offset": offset,
            "records_lost": records_lost, "record": record}


def _read_long(data: bytes, pos: int):
    """An Avro long (zig-zag varint) at ``pos`` → (value, next pos); IndexError at the end."""
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


def _strings_as_bytes(schema):
    """The schema with every ``string`` read as ``bytes`` (the same encoding), so that a
    record with invalid UTF-8 still decodes and the records after it can be found."""
    if schema == "string":
        return "bytes"
    if isinstance(schema, list):
        return [_strings_as_bytes(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    kind = schema.get("type")
    if kind == "string":
        return "bytes"
    out = dict(schema)
    if kind in ("record", "error"):
        out["fields"] = [dict(f, type=_strings_as_bytes(f["type"])) for f in schema["fields"]]
    elif kind == "array":
        out["items"] = _strings_as_bytes(schema["items"])
    elif kind == "map":
        out["values"] = _strings_as_bytes(schema["values"])
    elif isinstance(kind, (dict, list)):
        out["type"] = _strings_as_bytes(kind)
    return out


def _decompress(codec: str, raw: bytes, partial: bool = False) -> bytes:
    """A block's data; with ``partial``, as much of a cut block as can be decompressed."""
    if codec == "null":
        return raw
    if codec == "deflate":
        return zlib.decompressobj(-15).decompress(raw) if partial else zlib.decompress(raw, -15)
    if codec == "bzip2":
        return bz2.BZ2Decompressor().decompress(raw) if partial else bz2.decompress(raw)
    if codec == "xz":
        return lzma.LZMADecompressor().decompress(raw) if partial else lzma.decompress(raw)
    raise ValueError(f"codec {codec!r} is not supported when recovering a damaged file")


class _Block:
    """Decodes the records of one block (or of the readable start of a cut block)."""

    def __init__(self, schema, bytes_schema):
        self.schema, self.bytes_schema = schema, bytes_schema

    def decode(self, data: bytes, count: int, cut: bool):
        """``(records, bad, complete)``: the decoded records, ``(offset, reason, detail,
        record)`` of those that do not decode alone, and whether all ``count`` decoded and
        exactly filled ``data``. Of a ``cut`` block only records followed by more bytes are
        taken (the last one may have been cut short)."""
        fo = io.BytesIO(data)
        spans = []
        for _ in range(count):
            start = fo.tell()
            try:
                loose = fastavro.schemaless_reader(fo, self.bytes_schema, None)
            except Exception:  # noqa: BLE001 - the rest of the block cannot be found
                break
            end = fo.tell()
            if end > len(data) or (cut and end >= len(data)):
                break
            spans.append((start, end, loose))
        complete = len(spans) == count and fo.tell() == len(data) and not cut
        records, bad = [], []
        for start, end, loose in spans:
            try:
                records.append(fastavro.schemaless_reader(io.BytesIO(data[start:end]),
                                                          self.schema, None))
            except UnicodeDecodeError as e:
                bad.append((start, "invalid_utf8", str(e), loose))
            except Exception as e:  # noqa: BLE001
                bad.append((start, "corrupt_record", f"{type(e).__name__}: {e}", loose))
        return records, bad, complete


def _recover(data: bytes, path: str):
    """``(records, dead letters)`` of a file that fastavro could not read in one go."""
    fo = io.BytesIO(data)
    try:
        header = fastavro.schemaless_reader(fo, HEADER_SCHEMA, None)
        if header["magic"] != b"Obj\x01":
            raise ValueError(f"not an Avro object container file (magic {header['magic']!r})")
        meta = header["meta"]
        schema = json.loads(meta["avro.schema"].decode("utf-8"))
        codec = meta.get("avro.codec", b"null").decode("utf-8")
        sync = header["sync"]
        block = _Block(fastavro.parse_schema(schema), fastavro.parse_schema(
            _strings_as_bytes(schema)))
    except Exception as e:  # noqa: BLE001
        return [], [_damage(path, "unreadable_file", f"{type(e).__name__}: {e}", 0, None)], None
    records, dead = [], []
    pos, size = fo.tell(), len(data)
    while pos < size:
        start = pos
        try:
            count, pos = _read_long(data, pos)
            length, pos = _read_long(data, pos)
        except IndexError:
            dead.append(_damage(path, "truncated", f"the file ends inside the block header at "
                                f"byte {start}: the records after it are missing",
                                start, None))
            break
        except ValueError as e:
            count, length = -1, -1
            detail = str(e)
        else:
            detail = f"block header claims {count} records in {length} bytes"
        end = pos + length
        plausible = 0 <= count and 0 <= length and count <= max(length, 1) * 8
        if plausible and end + _SYNC_SIZE > size:  # the file was cut inside this block
            try:
                got, bad, _ = block.decode(_decompress(codec, data[pos:size], partial=True),
                                           count, cut=True)
            except Exception:  # noqa: BLE001
                got, bad = [], []
            records.extend(got)
            dead.extend(_damage(path, reason, d, start, 0, r) for _, reason, d, r in bad)
            # Lost: the rest of this block and every block after it (unknown).
            dead.append(_damage(path, "truncated", f"the file ends inside the block at byte "
                                f"{start} ({count} records, {len(got) + len(bad)} readable): "
                                f"at least {count - len(got) - len(bad)} records are missing",
                                start, None))
            break
        if plausible and data[end:end + _SYNC_SIZE] == sync:
            try:
                got, bad, complete = block.decode(_decompress(codec, data[pos:end]), count,
                                                  cut=False)
            except Exception as e:  # noqa: BLE001
                got, bad, complete = [], [], False
                detail = f"{detail}; {type(e).__name__}: {e}"
            if complete:
                records.extend(got)
                dead.extend(_damage(path, reason, d, start, 0, r) for _, reason, d, r in bad)
                pos = end + _SYNC_SIZE
                continue
            detail = f"{detail} that do not decode"
        # A damaged block: report it and go on after the next sync marker.
        following = data.find(sync, start + 1)
        lost = count if plausible else None
        if following < 0:
            dead.append(_damage(path, "corrupt_block", f"{detail}; no sync marker follows: "
                                "the rest of the file is unreadable", start, lost))
            break
        dead.append(_damage(path, "corrupt_block", detail, start, lost))
        pos = following + _SYNC_SIZE
    declared = meta.get(RECORD_COUNT_KEY)
    return records, dead, None if declared is None else declared.decode("utf-8", "replace")


def read_avro_file(data: bytes, path: str = "<bytes>") -> tuple:
    """``(records, dead letters)`` of the Avro file ``data``: every record of an intact file;
    of a damaged one, every record that can still be read (module docstring).

    >>> import io, fastavro
    >>> schema = {"type": "record", "name": "R", "fields": [{"name": "ts_ms", "type": "long"}]}
    >>> buf = io.BytesIO()
    >>> fastavro.writer(buf, schema, [{"ts_ms": i} for i in range(100)], sync_interval=200,
    ...                 metadata={RECORD_COUNT_KEY: "100"})   # lets a reader count a loss
    >>> records, dead = read_avro_file(buf.getvalue()[:-40], "cut.avro")
    >>> len(records), dead[0]["reason"], dead[0]["records_lost"]
    (87, 'truncated', 13)
    """
    try:
        reader = fastavro.reader(io.BytesIO(data))
        records, dead = list(reader), []
        declared = reader.metadata.get(RECORD_COUNT_KEY)
    except Exception:  # noqa: BLE001 - damaged: read it block by block
        records, dead, declared = _recover(data, path)
    try:
        declared = None if declared is None else int(declared)
    except ValueError:
        declared = None
    if declared is not None:
        # A file cut exactly after a block is a valid, shorter Avro file: only a count
        # written in its header tells. It also says how much a damaged stretch took.
        accounted = len(records) + sum(1 if d["records_lost"] == 0 else d["records_lost"] or 0
                                       for d in dead)
        unknown = [d for d in dead if d["records_lost"] is None]
        if len(unknown) == 1 and declared >= accounted:
            unknown[0]["records_lost"] = declared - accounted
        elif not dead and declared > len(records):
            dead.append(_damage(path, "truncated", f"the file holds {len(records)} of the "
                                f"{declared} records its header declares", len(data),
                                declared - len(records)))
    return records, dead


class _FileReading:
    """What both file readers do with a file: read it, stamp its records, count, log."""

    def __init__(self, time_field: str):
        self.time_field = time_field
        self.files = Metrics.counter("sources", "files_read")
        self.records = Metrics.counter("sources", "records_read")
        self.unreadable = Metrics.counter("sources", "unreadable_files")
        self.bad_records = Metrics.counter("sources", "bad_records")
        self.records_lost = Metrics.counter("sources", "records_lost")

    def read(self, path, open_file) -> tuple:
        """``(timestamped records, dead letters)`` of the file at ``path``."""
        try:
            with open_file() as f:
                data = f.read()
        except Exception as e:  # noqa: BLE001 - vanished, unreadable: report, go on
            records, dead = [], [_damage(path, "unreadable_file",
                                         f"{type(e).__name__}: {e}", None, None)]
        else:
            records, dead = read_avro_file(data, path)
        damaged = any(d["records_lost"] != 0 for d in dead)  # not just bad records
        stamped = []
        for record in records:
            try:
                stamped.append(TimestampedValue(record, event_time(record, self.time_field)))
            except BadRecord as e:
                dead.append(_damage(path, e.reason, e.detail, None, 0, _safe(record)))
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


class _WithDeadLetters:
    """``.with_dead_letters()``: the transform returns ``(records, dead letters)``."""
    _dead_letters = False

    def with_dead_letters(self):
        self._dead_letters = True
        return self

    def _outputs(self, result):
        records, dead = result[None], result[DEAD_LETTER]
        return (records, dead) if self._dead_letters else records


class ReadAvroLogs(_WithDeadLetters, beam.PTransform):
    """Avro files matching ``file_pattern`` → their records (dicts), stamped with event time.

    Bounded: for batch runs and backfills. Files are read in parallel, each whole (an hour of
    logs), records in file order. Damaged files and bad records do not fail the run: see the
    module docstring and :meth:`with_dead_letters`.
    """

    def __init__(self, file_pattern: str, time_field: str = "ts_ms"):
        super().__init__()
        self.file_pattern = file_pattern
        self.time_field = time_field

    def expand(self, pbegin):
        return self._outputs(
            pbegin
            | "Match" >> MatchFiles(self.file_pattern,  # no file at all: a wrong pattern
                                    empty_match_treatment=EmptyMatchTreatment.DISALLOW)
            | "SpreadFiles" >> beam.Reshuffle()
            | "Open" >> ReadMatches()
            | "ReadRecords" >> beam.ParDo(ReadAvroFileFn(self.time_field)).with_outputs(
                DEAD_LETTER))


class ReadFeatureLogs(ReadAvroLogs):
    """FeatureLog files (``schemas/feature_log.avsc``) → FeatureLog dicts at their ``ts_ms``."""


class ReadActionLogs(ReadAvroLogs):
    """ActionLog files (``schemas/action_log.avsc``) → ActionLog dicts at their ``ts_ms``."""


class ReadAvroFileFn(beam.DoFn):
    """A ``ReadableFile`` → its Avro records, each stamped with its event time, and to
    ``dead_letter`` what cannot be read of it (module docstring): one bad file or record
    must not stop a stream."""

    def __init__(self, time_field: str = "ts_ms"):
        self.reading = _FileReading(time_field)

    def process(self, readable_file):
        path = readable_file.metadata.path
        records, dead = self.reading.read(path, readable_file.open)
        yield from records
        for d in dead:
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, d)


class WatchAvroLogs(_WithDeadLetters, beam.PTransform):
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
        return self._outputs(
                pbegin
                | "MatchNewFiles" >> MatchContinuously(
                    self.file_pattern, interval=self.interval_seconds,
                    has_deduplication=True, start_timestamp=self.start_timestamp,
                    stop_timestamp=self.stop_timestamp)
                | "Open" >> ReadMatches()
                | "ReadRecords" >> beam.ParDo(ReadAvroFileFn(self.time_field)).with_outputs(
                    DEAD_LETTER))


# ---------------------------------------------------------------------------------------
# Tailing time-ordered files: the watermark follows the logs' event time.

# The end of the offset range of a followed folder that never ends by itself: file indices
# of a tail here, (period, batch) positions of the example reader (transforms.example_reader); a
# reader that stops claims it, which completes the range.
NO_END = 1 << 62


_LOG_FILE_NAME = re.compile(r"part-(\d{8})-(\d{2})(\d{4})?\.avro")


def log_file_start_ms(path: str) -> Optional[int]:
    """The event time (ms) a log file's name says its records start at, or None:
    ``part-YYYYmmdd-HH.avro`` (``dataflow.data``) or ``part-YYYYmmdd-HHMMSS.avro`` (serving's
    feature log, the simulator's action log).

    >>> log_file_start_ms("logs/part-20240101-01.avro"), log_file_start_ms("x/part-20240101-013000.avro")
    (1704070800000, 1704072600000)
    >>> log_file_start_ms("features-0.avro") is None
    True
    """
    m = _LOG_FILE_NAME.fullmatch(os.path.basename(path))
    if m is None:
        return None
    stamp = datetime.datetime.strptime(m[1] + m[2] + (m[3] or "0000"), "%Y%m%d%H%M%S")
    return int(stamp.replace(tzinfo=datetime.timezone.utc).timestamp()) * 1000


def ordered_log_files(file_pattern: str) -> list:
    """The files ``file_pattern`` matches in the order of the start their names give
    (:func:`log_file_start_ms`; then by path), or by path if a name gives none."""
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
    """

    def __init__(self, interval_seconds: float, stop_timestamp: Timestamp,
                 time_field: str = "ts_ms", stop_when_exists: Optional[str] = None,
                 read_once: bool = False):
        self.interval = Duration.of(interval_seconds)
        self.stop_timestamp = stop_timestamp
        self.time_field = time_field
        self.stop_when_exists = stop_when_exists
        self.read_once = read_once
        self.reading = _FileReading(time_field)
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
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, d if at is None else TimestampedValue(d, at))
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


class TailAvroLogs(_WithDeadLetters, beam.PTransform):
    """New files of a time-ordered log folder → their records, with an event-time watermark.

    Unlike :class:`WatchAvroLogs` (whose watermark is the poll time), the watermark here
    follows the files' event time, file by file (:class:`TailAvroFilesFn`), so the joiner's
    event-time timers and windows see the logs' own clock, live or replayed. It needs what
    ``python -m dataflow.data`` writes: names that give the start of their records
    (``part-YYYYmmdd-HH[MMSS].avro``), each file holding only records later than those of the
    files before it, written atomically (temporary name, then rename), never a file sorting
    before one already read. Polls every ``interval_seconds`` until
    ``stop_timestamp`` (wall clock; default never) or, with ``stop_when_exists``, until that
    path exists: the writer creates it after its last file has landed, and every file that
    landed before it is read first. The SDF polling caveat on Flink
    (apache/beam#27648, module docstring) applies here too, but its state is one offset.
    ``read_once=True``: read the files there are and stop (a bounded read whose watermark
    follows the files, ``dataflow join --ordered_read``).
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
        return self._outputs(
            pbegin
            | "Pattern" >> beam.Create([self.file_pattern])
            | "TailFiles" >> beam.ParDo(TailAvroFilesFn(
                self.interval_seconds, self.stop_timestamp, self.time_field,
                self.stop_when_exists, self.read_once)).with_outputs(
                    DEAD_LETTER))
