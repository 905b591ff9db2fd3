"""Records → files, one set per event-time period: :class:`WriteEventTimeFiles`.

Each file holds one period's records of one shard, sorted, and is named by the period's UTC
start and a digest of its content: ``PERIOD-SSSSS-of-NNNNN-DIGEST.suffix``, e.g.
``20240101T130000Z-00000-of-00001-3f2a9c1e.jsonl``. The example log
(:class:`transforms.example_log.WriteExampleLog`) and the join's side outputs are written so;
JSON lines (:func:`write_json_lines`, read back by :func:`read_json_lines`) by default.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import uuid
import zlib
from typing import Any, Callable, Tuple

import apache_beam as beam
import fastavro
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from apache_beam.utils.timestamp import Duration

from schemas import load_schema, strict_json

__all__ = ["WriteEventTimeFiles", "write_sorted_file", "period_name", "record_order",
           "avro_encoder", "write_json_lines", "read_json_lines"]


def period_name(start_s: float) -> str:
    """The UTC start of an event-time period, sortable as text.

    Args:
        start_s: the period's start, seconds since the epoch.

    Returns:
        ``YYYYmmddTHHMMSSZ``.

    >>> period_name(1704114000)
    '20240101T130000Z'
    """
    return datetime.datetime.fromtimestamp(start_s, datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ")


def record_order(record) -> tuple:
    """Event-time order for records of any shape (invalid ones included).

    Args:
        record: a dict with an integer ``ts_ms``, or anything else (it sorts first).

    Returns:
        ``(ts_ms or -1, the record as canonical JSON)``: a total order.

    >>> sorted([{"ts_ms": 5, "a": 1}, "not a dict", {"ts_ms": 2}], key=record_order)
    ['not a dict', {'ts_ms': 2}, {'ts_ms': 5, 'a': 1}]
    """
    ts_ms = record.get("ts_ms") if isinstance(record, dict) else None
    ts_ms = ts_ms if isinstance(ts_ms, int) else -1
    return ts_ms, json.dumps(record, sort_keys=True, default=repr)


def _request_shard(record, shards: int) -> int:
    rid = record.get("request_id") if isinstance(record, dict) else None
    return zlib.crc32(rid.encode("utf-8")) % shards if isinstance(rid, str) else 0


def avro_encoder(schema_name: str) -> Callable:
    """An ``encode`` for :class:`WriteEventTimeFiles` that writes Avro (deflate).

    Args:
        schema_name: a schema of ``schemas/`` (e.g. ``"example"``).

    Returns:
        ``encode(file, records)``.

    >>> import io
    >>> f = io.BytesIO()
    >>> avro_encoder("action_log")(f, [{"request_id": "r1", "ts_ms": 5, "action": "click"}])
    >>> [r["action"] for r in fastavro.reader(io.BytesIO(f.getvalue()))]
    ['click']
    """
    schema = load_schema(schema_name)

    def write(f, records):
        fastavro.writer(f, schema, records, codec="deflate")
    return write


def write_json_lines(f, records) -> None:
    """Records as JSON lines (keys sorted; NaN and infinity as null, as ``strict_json``
    writes them), the default ``encode`` of :class:`WriteEventTimeFiles`.

    Args:
        f: a binary file open for writing.
        records: JSON-able values (others are written as their ``repr``).

    >>> import io
    >>> f = io.BytesIO()
    >>> write_json_lines(f, [{"b": float("nan"), "a": 1}])
    >>> print(f.getvalue().decode(), end="")
    {"a": 1, "b": null}
    """
    for r in records:
        f.write((strict_json.dumps(r, sort_keys=True, default=repr) + "\n").encode("utf-8"))


def read_json_lines(paths) -> list:
    """The records of JSON-lines files (what :func:`write_json_lines` writes).

    Args:
        paths: local paths, read in this order.

    Returns:
        Every record of the files, in order.
    """
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records += json.loads("[" + ",".join(f.read().splitlines()) + "]")
    return records


def write_sorted_file(directory: str, prefix: str, records, encode: Callable,
                      sort_key: Callable, suffix: str) -> str | None:
    """Records, sorted, into one file named by a digest of their sort keys, written under
    a temporary name and renamed (a reader never sees half a file).

    Args:
        directory: the folder (any Beam file system).
        prefix: the name's start, e.g. ``20240101T130000Z-00000-of-00001``.
        records: what to write.
        encode: ``encode(file, sorted records)``, e.g. :func:`write_json_lines`.
        sort_key: the records' order, e.g. :func:`record_order`.
        suffix: the name's end, e.g. ``.jsonl``.

    Returns:
        ``directory/PREFIX-DIGEST.suffix``, or None if there are no records (no file).
    """
    keyed = sorted(((sort_key(r), r) for r in records), key=lambda kr: kr[0])
    if not keyed:
        return None
    digest = hashlib.sha1(repr([k for k, _ in keyed]).encode("utf-8")).hexdigest()[:8]
    path = FileSystems.join(directory, f"{prefix}-{digest}{suffix}")
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp) as f:
        encode(f, [r for _, r in keyed])
    FileSystems.rename([tmp], [path])
    return path


class _ClampTimestamp(beam.DoFn):
    """Elements without a usable event time (before 1970, e.g. Beam's minimum timestamp on
    a record whose ts_ms was invalid) go to the first period instead of failing the write."""

    def process(self, record, timestamp=beam.DoFn.TimestampParam):
        yield record if timestamp.micros >= 0 else TimestampedValue(record, 0)


class _WriteSortedFile(beam.DoFn):
    """(shard, records) of one window pane → one file, sorted, named by the window's period
    and a digest of its content: ``PERIOD-SSSSS-of-NNNNN-DIGEST.suffix``.

    Why a digest and not the pane index: a streaming run fires a window more than once (late
    records come in later panes), and Flink's portable runner (Beam 2.62) reports every pane
    as the first, on-time one — and fires an extra *empty* pane at the window's garbage
    collection. Named by content, a retried write replaces its own file and never another
    pane's; empty panes write nothing.
    """

    def __init__(self, directory, suffix, encode, sort_key, shards, stamped_after_s):
        self.directory, self.suffix, self.encode = directory, suffix, encode
        self.sort_key, self.shards = sort_key, shards
        self.stamped_after_s = stamped_after_s

    def process(self, element, window=beam.DoFn.WindowParam):
        shard, records = element
        period = period_name(window.start.micros / 1e6 - self.stamped_after_s)
        path = write_sorted_file(self.directory, f"{period}-{shard:05d}-of-{self.shards:05d}",
                                 records, self.encode, self.sort_key, self.suffix)
        if path is not None:
            yield path


class WriteEventTimeFiles(beam.PTransform):
    """Records → files, one set per event-time period, each file sorted by ``sort_key``.

    Periods are fixed windows of the element timestamps; a record's shard is a hash of its
    ``request_id``. A window that fires again (late records) writes another file of its
    period: files are named by content, so none is ever overwritten by another.

    Args:
        directory: the output folder (any Beam file system).
        period_s: event-time seconds per period.
        shards: files per period.
        encode: ``encode(file, records)`` (default: :func:`write_json_lines`).
        suffix: the files' ending.
        sort_key: the order within a file (default: :func:`record_order`).
        stamped_after_s: how long after their own event time the records' timestamps are
            (the joiner stamps an example ``join_window`` after its ``ts_ms``), so that the
            periods and file names follow the records' own event time.
        allowed_lateness_s: how late (event time) a record may come and still be written.

    Returns:
        (``expand``) a PCollection of the written paths.

    >>> import os, tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> with beam.Pipeline() as p:
    ...     _ = (p | beam.Create([{"request_id": "r1", "ts_ms": 1704114000500},
    ...                           {"request_id": "r2", "ts_ms": 1704114000000}])
    ...          | beam.Map(lambda r: TimestampedValue(r, r["ts_ms"] / 1000))
    ...          | WriteEventTimeFiles(folder.name, period_s=3600))
    >>> [name] = os.listdir(folder.name)
    >>> name[:32], [r["request_id"] for r in read_json_lines([f"{folder.name}/{name}"])]
    ('20240101T130000Z-00000-of-00001-', ['r2', 'r1'])
    >>> folder.cleanup()
    """

    def __init__(self, directory: str, period_s: int = 3600, shards: int = 1,
                 encode: Callable = write_json_lines, suffix: str = ".jsonl",
                 sort_key: Callable = record_order, stamped_after_s: float = 0.0,
                 allowed_lateness_s: float = 7 * 24 * 3600):
        super().__init__()
        self.directory, self.period_s, self.shards = directory, period_s, shards
        self.encode, self.suffix, self.sort_key = encode, suffix, sort_key
        self.stamped_after_s = stamped_after_s
        self.allowed_lateness_s = allowed_lateness_s

    def expand(self, records):
        shards = self.shards
        return (records
                | "ClampTime" >> beam.ParDo(_ClampTimestamp())
                | "Periods" >> beam.WindowInto(
                    FixedWindows(self.period_s, self.stamped_after_s % self.period_s),
                    allowed_lateness=Duration(seconds=self.allowed_lateness_s))
                | "KeyByShard" >> beam.Map(lambda r: (_request_shard(r, shards), r))
                .with_output_types(Tuple[int, Any])
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteSorted" >> beam.ParDo(_WriteSortedFile(
                    self.directory, self.suffix, self.encode, self.sort_key, shards,
                    self.stamped_after_s)))
