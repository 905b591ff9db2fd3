"""Reading one Avro object container file, damaged or not.

:func:`read_avro_file` decodes a file with fastavro and, if that fails, again block by block:
the records of every intact block go through, a record that cannot be decoded alone (invalid
UTF-8 in a string) is reported with its reason, and a damaged stretch (a block that fails to
decode or lacks its sync marker, a truncated end) is reported; the read goes on after the next
sync marker. How many records a damaged block took is what its header says; how many a cut
took (the rest of the block *and* the blocks after it) is known only if the writer declared
the file's record count in the header (:data:`RECORD_COUNT_KEY`), and so is a cut exactly at a
block boundary, which leaves a valid, shorter Avro file.

What cannot be read comes out as dead letters (:func:`file_dead_letter`): ``{"reason",
"detail", "file", "offset", "records_lost", "record"}``; reasons ``truncated``,
``corrupt_block``, ``unreadable_file`` (``records_lost`` = how many records the damage took,
None if unknown), ``invalid_utf8``, ``corrupt_record`` (``records_lost`` = 0: the record,
decoded as far as possible, is in ``record``). The log readers (``transforms.sources``,
``transforms.tail``) pass them on.
"""
from __future__ import annotations

import bz2
import io
import json
import lzma
import zlib

import fastavro
from fastavro.read import HEADER_SCHEMA

__all__ = ["read_avro_file", "file_dead_letter", "RECORD_COUNT_KEY"]

_SYNC_SIZE = 16
# Header metadata a writer may add (``metadata={RECORD_COUNT_KEY: str(n)}`` in fastavro):
# the number of records in the file, so that a file cut at a block boundary is noticed.
RECORD_COUNT_KEY = "beam_monolith.record_count"


def file_dead_letter(path, reason: str, detail: str, offset, records_lost,
                     record=None) -> dict:
    """A dead letter of a log file reader.

    Args:
        path: the file.
        reason: a short machine-readable code (``truncated``, ``invalid_utf8``, ...).
        detail: what happened, for a person.
        offset: the byte offset in the file where it happened, or None.
        records_lost: how many records it took (0: a bad record, passed on in ``record``;
            None: unknown).
        record: the bad record, decoded as far as possible.

    Returns:
        ``{"reason", "detail", "file", "offset", "records_lost", "record"}``.

    >>> file_dead_letter("a.avro", "truncated", "cut", 120, None)["file"]
    'a.avro'
    """
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
        """The records of one block.

        Args:
            data: the block's data, decompressed.
            count: how many records the block's header says it holds.
            cut: the file ends inside this block: only records followed by more bytes are
                taken (the last one may have been cut short).

        Returns:
            ``(records, bad, complete)``: the decoded records, ``(offset, reason, detail,
            record)`` of those that do not decode alone, and whether all ``count`` decoded
            and exactly filled ``data``.
        """
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
    """Reads, block by block, a file that fastavro could not read in one go.

    Returns:
        ``(records, dead letters, the record count its header declares or None)``.
    """
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
        return [], [file_dead_letter(path, "unreadable_file", f"{type(e).__name__}: {e}", 0,
                                     None)], None
    records, dead = [], []
    pos, size = fo.tell(), len(data)
    while pos < size:
        start = pos
        try:
            count, pos = _read_long(data, pos)
            length, pos = _read_long(data, pos)
        except IndexError:
            dead.append(file_dead_letter(
                path, "truncated", f"the file ends inside the block header at byte {start}: "
                "the records after it are missing", start, None))
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
            dead.extend(file_dead_letter(path, reason, d, start, 0, r)
                        for _, reason, d, r in bad)
            # Lost: the rest of this block and every block after it (unknown).
            dead.append(file_dead_letter(
                path, "truncated", f"the file ends inside the block at byte {start} ({count} "
                f"records, {len(got) + len(bad)} readable): at least "
                f"{count - len(got) - len(bad)} records are missing", start, None))
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
                dead.extend(file_dead_letter(path, reason, d, start, 0, r)
                            for _, reason, d, r in bad)
                pos = end + _SYNC_SIZE
                continue
            detail = f"{detail} that do not decode"
        # A damaged block: report it and go on after the next sync marker.
        following = data.find(sync, start + 1)
        lost = count if plausible else None
        if following < 0:
            dead.append(file_dead_letter(path, "corrupt_block", f"{detail}; no sync marker "
                                         "follows: the rest of the file is unreadable", start,
                                         lost))
            break
        dead.append(file_dead_letter(path, "corrupt_block", detail, start, lost))
        pos = following + _SYNC_SIZE
    declared = meta.get(RECORD_COUNT_KEY)
    return records, dead, None if declared is None else declared.decode("utf-8", "replace")


def read_avro_file(data: bytes, path: str = "<bytes>") -> tuple:
    """Every record that can be read of the Avro file ``data``, and what cannot.

    Args:
        data: the file's bytes.
        path: the file's name, for the dead letters.

    Returns:
        ``(records, dead letters)``: every record of an intact file; of a damaged one, every
        record that can still be read, and a dead letter (:func:`file_dead_letter`) for each
        damaged stretch and bad record (module docstring).

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
            dead.append(file_dead_letter(path, "truncated", f"the file holds {len(records)} of "
                                         f"the {declared} records its header declares",
                                         len(data), declared - len(records)))
    return records, dead
