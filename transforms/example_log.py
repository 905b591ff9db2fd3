"""The example log: event-time periods of Avro example files (``schemas/example.avsc``),
``PERIOD-SSSSS-of-NNNNN-DIGEST.avro``, as :class:`WriteExampleLog` writes them (in
``dataflow.join``), and how to list, count and read them in event-time order.
"""
from __future__ import annotations

import heapq
import os
import re
from contextlib import ExitStack
from typing import Iterator

import fastavro
from apache_beam.io.filesystems import FileSystems

from transforms.event_time_files import WriteEventTimeFiles, avro_encoder

__all__ = ["WriteExampleLog", "example_files", "read_examples_in_order", "example_order",
           "example_periods", "count_examples", "followed_pattern"]


def example_order(record: dict):
    """The example log's order: event time, then request id.

    Args:
        record: an example (``schemas/example.avsc``).

    Returns:
        ``(ts_ms, request_id)``.
    """
    return record["ts_ms"], record["request_id"]


class WriteExampleLog(WriteEventTimeFiles):
    """Examples (``schemas/example.avsc``) → the example log:
    ``directory/PERIOD-SSSSS-of-NNNNN-DIGEST.avro``, each file sorted by
    :func:`example_order`, a period's examples in the files of the period they were served in.

    Args:
        directory: the example log's folder.
        join_window_s: how long after its ``ts_ms`` an example's timestamp is (the joiner
            emits it when its join window closes).
        period_s: event-time seconds per period.
        shards: files per period (split by request id).

    In a pipeline, ``joined.examples | WriteExampleLog("out/examples", join_window_s=300)``
    after :class:`transforms.joiner.OnlineJoiner`:

    >>> import apache_beam as beam, tempfile
    >>> from apache_beam.transforms.window import TimestampedValue
    >>> folder = tempfile.TemporaryDirectory()
    >>> with beam.Pipeline() as p:   # stamped join_window_s after ts_ms, as the joiner does
    ...     _ = (p | beam.Create([{"request_id": "r1", "ts_ms": 1704114000000, "user_id": "u",
    ...                            "item_id": "i", "fids": [7], "label": 1}])
    ...          | beam.Map(lambda e: TimestampedValue(e, e["ts_ms"] / 1000 + 300))
    ...          | WriteExampleLog(folder.name, join_window_s=300))
    >>> [(os.path.basename(f)[:16], e["request_id"]) for f in example_files(folder.name)
    ...  for e in read_examples_in_order([f])]
    [('20240101T130000Z', 'r1')]
    >>> folder.cleanup()
    """

    def __init__(self, directory: str, join_window_s: float, period_s: int = 3600,
                 shards: int = 1):
        super().__init__(directory, period_s, shards, encode=avro_encoder("example"),
                         suffix=".avro", sort_key=example_order,
                         stamped_after_s=join_window_s)


def example_files(pattern: str) -> list[str]:
    """The example files of a glob or an example-log directory.

    Args:
        pattern: a glob, or a directory (its ``*.avro``); any Beam file system.

    Returns:
        The paths, sorted.
    """
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "*.avro")
    matches = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in matches)


def read_examples_in_order(pattern) -> Iterator[dict]:
    """Every example of some example files, in event-time order (:func:`example_order`),
    merging the files lazily: each file is sorted, so this holds one record per file in
    memory.

    Args:
        pattern: a glob, a directory (as :func:`example_files`) or a list of paths.

    Returns:
        An iterator of the examples (dicts).

    >>> import tempfile
    >>> from schemas import write_avro
    >>> d = tempfile.mkdtemp()
    >>> ex = lambda rid, ts: {"request_id": rid, "ts_ms": ts, "user_id": "u", "item_id": "i",
    ...                       "fids": [], "label": 0}
    >>> _ = write_avro(f"{d}/a.avro", "example", [ex("a", 1), ex("c", 5)])
    >>> _ = write_avro(f"{d}/b.avro", "example", [ex("b", 3)])
    >>> [e["request_id"] for e in read_examples_in_order(d)]
    ['a', 'b', 'c']
    """
    paths = example_files(pattern) if isinstance(pattern, str) else sorted(pattern)
    with ExitStack() as stack:
        readers = [fastavro.reader(stack.enter_context(FileSystems.open(p))) for p in paths]
        yield from heapq.merge(*readers, key=example_order)


# --------------------------------------------------------------------------- pipeline


def followed_pattern(pattern: str) -> str:
    """The glob a following reader lists: a folder becomes ``FOLDER/*.avro``; a local path is
    made absolute (the pattern is the reader's element, kept in checkpoints and savepoints,
    so a job resumed from another working directory reads the same files).

    Args:
        pattern: a glob, or a folder of example files.

    Returns:
        The glob.

    >>> followed_pattern("/logs/examples/")
    '/logs/examples/*.avro'
    """
    if not any(c in pattern for c in "*?["):
        pattern = pattern.rstrip("/") + "/*.avro"
    return pattern if "://" in pattern else os.path.abspath(pattern)


def count_examples(paths) -> int:
    """How many records some Avro files hold, from their block headers (nothing is decoded).

    Args:
        paths: the files (any Beam file system).

    Returns:
        The number of records in all of them.
    """
    total = 0
    for path in paths:
        with FileSystems.open(path) as f:
            total += sum(block.num_records for block in fastavro.block_reader(f))
    return total


_PERIOD_NAME = re.compile(r"^(\d{8}T\d{6}Z)-(\d{5})-of-(\d{5})-")


def example_periods(pattern: str, complete_only: bool = False, keyed: bool = False,
                    from_key: str = "", part: tuple | None = None) -> list:
    """The files of an example log, grouped by event-time period, in time order.

    A file not named ``PERIOD-SSSSS-of-NNNNN-...`` is a period of its own, keyed by its name.

    Args:
        pattern: a glob or a directory (as :func:`example_files`).
        complete_only: leave out the periods that do not have all their shards yet
            (``-00003-of-00004-`` names), and every period after the first such one that is
            not before ``from_key``.
        keyed: return ``(period key, files)`` pairs.
        from_key: with ``complete_only``: incomplete periods before this key are skipped
            instead of ending the list.
        part: ``(k, n)``: only the files of data-parallel reader ``k`` of ``n``: shard ``s``
            of a period goes to reader ``s % n`` (the join splits a period's shards by
            request id), a file of another name to ``crc32(name) % n``; a period of none of
            its files is an empty list. Completeness is judged on all the files.

    Returns:
        A list of lists of paths (``keyed``: of ``(period key, paths)``), one per period.

    >>> import tempfile
    >>> from schemas import write_avro
    >>> d = tempfile.mkdtemp()
    >>> for name in ["20240101T000000Z-00000-of-00001-a", "20240101T010000Z-00000-of-00002-b"]:
    ...     _ = write_avro(f"{d}/{name}.avro", "example", [])
    >>> [len(files) for files in example_periods(d)], len(example_periods(d, complete_only=True))
    ([1, 1], 1)
    >>> [len(files) for files in example_periods(d, part=(1, 2))]
    [0, 0]
    """
    groups: dict = {}
    shards: dict = {}
    for path in example_files(pattern):
        match = _PERIOD_NAME.match(os.path.basename(path))
        key = match.group(1) if match else os.path.basename(path)
        groups.setdefault(key, []).append(path)
        if match:
            shards.setdefault(key, (set(), int(match.group(3))))[0].add(int(match.group(2)))
    periods = []
    for key in sorted(groups):
        if complete_only and key in shards and len(shards[key][0]) < shards[key][1]:
            if key < from_key:
                continue
            break
        files = groups[key] if part is None else [p for p in groups[key]
                                                  if _reader_of(p, part[1]) == part[0]]
        periods.append((key, files) if keyed else files)
    return periods


def _reader_of(path: str, readers: int) -> int:
    """Which of ``readers`` data-parallel readers reads ``path`` (:func:`example_periods`)."""
    import zlib
    name = os.path.basename(path)
    match = _PERIOD_NAME.match(name)
    shard = int(match.group(2)) if match else zlib.crc32(name.encode())
    return shard % readers
