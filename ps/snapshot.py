"""Snapshots of an ``EmbeddingTable``: versioned, checksummed bytes.

Layout (little-endian)::

    offset  size  field
         0     8  magic  b"PSEMBTBL"
         8     2  format version (1)
        10     2  reserved (0)
        12     4  header length H
        16     8  payload length P
        24     4  CRC-32 of the header
        28     4  CRC-32 of the payload
        32     H  header: UTF-8 JSON (table config, entry count, event time, stats, sections)
      32+H     P  payload: the sections named in the header, back to back:
                  keys uint64[n] | rows float32[n, width] | last_seen uint32[n] | filter counters

Only the entries are stored (not the hash index), so a snapshot restores into a table of any
capacity: restore copies the rows and rebuilds the index. Everything that defines the table's behaviour round-trips exactly: keys, rows
with their optimizer slots, last-seen times, frequency-filter counters, config, stats and event
time. Pending deltas do not: a restored table starts with nothing touched.

>>> import numpy as np
>>> from ps import EmbeddingTable, SnapshotError
>>> table = EmbeddingTable(dim=4)
>>> _ = table.insert(np.arange(100, dtype=np.uint64), now=7)
>>> data = table.to_bytes()
>>> copy = EmbeddingTable.from_bytes(data, capacity=4096)   # room for 4096 entries
>>> len(copy), bool(copy.lookup(np.arange(100, dtype=np.uint64))[1].all())
(100, True)
>>> try:
...     EmbeddingTable.from_bytes(data[:-1])
... except SnapshotError as e:
...     print(e)  # doctest: +ELLIPSIS
snapshot truncated: expected ... bytes, got ...
"""

import json
import math
import struct
import zlib

import numpy as np

__all__ = ["SnapshotError", "table_to_bytes", "table_from_bytes", "MAGIC", "VERSION"]

MAGIC = b"PSEMBTBL"
VERSION = 1
_PREAMBLE = struct.Struct("<8sHHIQII")  # magic, version, reserved, H, P, header crc, payload crc


class SnapshotError(ValueError):
    """A snapshot cannot be read: truncated, corrupted, or not a snapshot of this format."""


def table_to_bytes(table):
    """Serialise ``table`` (see the module docstring for the layout)."""
    n, arena = len(table), table._arena
    arrays = {
        "keys": arena.keys[:n].astype("<u8"),
        "rows": arena.rows[:n].astype("<f4"),
        "last_seen": arena.last_seen[:n].astype("<u4"),
    }
    if table.filter is not None:
        arrays["filter"] = table.filter.counts.astype(table.filter.counts.dtype.newbyteorder("<"))
    header = {
        "config": table.config(),
        "count": n,
        "width": table.width,
        "event_time": table.event_time,
        "stats": vars(table.stats),
        "sections": [{"name": k, "dtype": a.dtype.str, "shape": list(a.shape)} for k, a in arrays.items()],
    }
    header_bytes = json.dumps(header, sort_keys=True).encode("utf-8")
    payload = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values())
    preamble = _PREAMBLE.pack(
        MAGIC, VERSION, 0, len(header_bytes), len(payload), zlib.crc32(header_bytes), zlib.crc32(payload)
    )
    return preamble + header_bytes + payload


def _read_header(data):
    """Check the preamble, sizes and checksums; returns (header dict, payload memoryview)."""
    if len(data) < _PREAMBLE.size:
        raise SnapshotError(f"snapshot truncated: {len(data)} bytes, the fixed preamble alone is {_PREAMBLE.size}")
    magic, version, reserved, header_len, payload_len, header_crc, payload_crc = _PREAMBLE.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"not an embedding table snapshot: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise SnapshotError(f"unsupported snapshot format version {version} (this code reads {VERSION})")
    if reserved != 0:
        raise SnapshotError(f"snapshot preamble is corrupted: reserved field is {reserved}, expected 0")
    expected = _PREAMBLE.size + header_len + payload_len
    if len(data) < expected:
        raise SnapshotError(f"snapshot truncated: expected {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise SnapshotError(f"snapshot has {len(data) - expected} unexpected trailing bytes")
    header_bytes = data[_PREAMBLE.size : _PREAMBLE.size + header_len]
    payload = data[_PREAMBLE.size + header_len :]
    if zlib.crc32(header_bytes) != header_crc:
        raise SnapshotError("snapshot header is corrupted (CRC-32 mismatch)")
    if zlib.crc32(payload) != payload_crc:
        raise SnapshotError("snapshot payload is corrupted (CRC-32 mismatch)")
    try:
        header = json.loads(bytes(header_bytes).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"snapshot header is not valid JSON: {e}") from None
    return header, payload


def _read_sections(header, payload):
    arrays, offset = {}, 0
    try:
        for section in header["sections"]:
            dtype = np.dtype(section["dtype"])
            shape = tuple(int(x) for x in section["shape"])
            size = math.prod(shape) * dtype.itemsize
            if offset + size > len(payload):
                raise SnapshotError(f"snapshot section {section['name']!r} runs past the end of the payload")
            arrays[section["name"]] = np.frombuffer(
                payload, dtype=dtype, count=math.prod(shape), offset=offset
            ).reshape(shape)
            offset += size
    except (KeyError, TypeError) as e:
        raise SnapshotError(f"snapshot header is malformed: {e!r}") from None
    if offset != len(payload):
        raise SnapshotError(f"snapshot payload has {len(payload) - offset} bytes not described by its header")
    return arrays


def table_from_bytes(data, capacity=None):
    """Rebuild a table from ``table_to_bytes`` output; raises ``SnapshotError`` if it is damaged."""
    from .embedding_table import EMPTY_FID, EmbeddingTable, TableStats

    data = memoryview(data).cast("B")
    header, payload = _read_header(data)
    arrays = _read_sections(header, payload)
    try:
        count, width = int(header["count"]), int(header["width"])
        config = header["config"]
        keys, rows, last_seen = arrays["keys"], arrays["rows"], arrays["last_seen"]
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"snapshot header is malformed: {e!r}") from None
    if keys.shape != (count,) or rows.shape != (count, width) or last_seen.shape != (count,):
        raise SnapshotError("snapshot sections do not match its entry count and row width")
    if count and (keys == EMPTY_FID).any():
        raise SnapshotError("snapshot holds the reserved fid 0xFFFFFFFFFFFFFFFF")
    table = EmbeddingTable.from_config(config, capacity=max(count, int(capacity or 0)))
    if table.width != width:
        raise SnapshotError(f"snapshot row width {width} does not match its config (width {table.width})")
    if count and np.unique(keys).size != count:
        raise SnapshotError("snapshot holds duplicate keys")
    table._load(keys.astype(np.uint64), rows.astype(np.float32), last_seen.astype(np.uint32))
    if table.filter is not None:
        counts = arrays.get("filter")
        if counts is None or counts.shape != table.filter.counts.shape:
            raise SnapshotError("snapshot filter counters are missing or do not match the filter config")
        table.filter.counts[...] = counts
    try:
        table.event_time = int(header["event_time"])
        table.stats = TableStats(**header["stats"])
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"snapshot header is malformed: {e!r}") from None
    return table
