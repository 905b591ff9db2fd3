"""The envelope: one binary layout for every blob the parameter server writes.

Embedding table snapshots, a PS shard's state and the entries of its log (in Beam state, so in
Flink checkpoints and savepoints), PS snapshot files, and dense parameter sets in a store all
travel in the same envelope, checked by the same reader.

Layout (little-endian)::

    offset  size  field
         0     4  magic b"PSEV"
         4     1  format version (1)
         5     1  kind: what the payload is (``KINDS``)
         6     2  reserved (0)
         8     4  header length H
        12     8  payload length P
        20     4  CRC-32 of bytes 0..19, the header and the payload
        24     H  header: a UTF-8 JSON object (what the kind needs to read its payload)
      24+H     P  payload

The checksum covers the fixed head too, so a flipped bit anywhere (kind, lengths, the header's
shard count or event time, a weight) is caught. :func:`open_envelope` checks, in order: the
magic, the format version, the lengths (truncated or padded), the checksum, the kind (it names
the kind it expected and the one it got), the JSON header; a failure raises
:class:`SnapshotError` saying which.

Array payloads (:func:`seal_arrays`, :meth:`Envelope.arrays`): the header's ``"arrays"`` lists
``[name, dtype, shape]`` and the payload is the arrays' little-endian bytes back to back in
that order; the header's other fields are the kind's own (a table's config, a log entry's
sequence number, ...). The reader checks that the sections fill the payload exactly.

Earlier formats are refused by name, not read: a blob that starts with one of the magics the
PS used before (``PSLE`` log entries, ``PSSHARD1`` shard states, ``PSSNAP01``/``PSSNAP02``
snapshot files, ``PSARRAY1`` array sets, ``PSEMBTBL`` table snapshots) raises a
:class:`SnapshotError` naming that format and what to do: use it with the version that wrote
it, or write it again with this one (for PS snapshots: run the backfill again with
``--export_dir``). One reader and one writer is all the code there is.

>>> data = seal_arrays("dense-params", {"w": np.arange(3, dtype=np.float32)}, version=7)
>>> envelope = open_envelope(data, "dense-params")
>>> envelope.header["version"], envelope.arrays()["w"].tolist()
(7, [0.0, 1.0, 2.0])
>>> try:
...     open_envelope(data, "table")
... except SnapshotError as e:
...     print(e)
data is not an embedding table snapshot: it holds a dense parameter set
>>> try:
...     open_envelope(data[:-1], "dense-params")
... except SnapshotError as e:
...     print(e)
dense parameter set is truncated: expected 76 bytes, got 75
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np

__all__ = ["SnapshotError", "Envelope", "seal", "seal_arrays", "open_envelope", "KINDS",
           "MAGIC", "VERSION", "HEAD"]

MAGIC = b"PSEV"
VERSION = 1
#: The fixed head: magic, version, kind, reserved, header length, payload length, CRC-32.
HEAD = struct.Struct("<4sBBHIQI")
_CHECKED = HEAD.size - 4  # the head's bytes the checksum covers (all but the checksum)

#: What an envelope can hold: ``{kind: (code, what it is, in words)}``. Codes are never reused.
KINDS: Dict[str, Tuple[int, str]] = {
    "table": (1, "embedding table snapshot"),
    "sparse-state": (2, "sparse PS shard state"),
    "dense-state": (3, "dense PS state"),
    "sparse-grads": (4, "sparse gradient log entry"),
    "evict": (5, "eviction log entry"),
    "dense-grads": (6, "dense gradient log entry"),
    "snapshot": (7, "PS snapshot"),
    "dense-params": (8, "dense parameter set"),
}
_BY_CODE = {code: kind for kind, (code, _) in KINDS.items()}

# The PS's formats before the envelope, by their magic: refused with their name.
_EARLIER = {b"PSLE": "PS log entry", b"PSSHARD1": "PS shard state",
            b"PSSNAP01": "PS snapshot", b"PSSNAP02": "PS snapshot",
            b"PSARRAY1": "array set", b"PSEMBTBL": "embedding table snapshot"}


class SnapshotError(ValueError):
    """Bytes the PS wrote cannot be read: truncated, corrupted, of another kind than expected,
    or of an earlier format."""


def _words(kind: str) -> str:
    what = KINDS[kind][1]
    return f"{'an' if what[0] in 'aeiou' else 'a'} {what}"


def _header_bytes(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def seal(kind: str, header: dict, *payload) -> bytes:
    """An envelope of ``kind`` around ``header`` and the payload's parts.

    Args:
        kind: a key of :data:`KINDS`.
        header: a JSON-able dict.
        *payload: bytes-like parts, concatenated (they are checksummed one after the other,
            so the payload is copied once, into the result).

    Returns:
        The envelope's bytes.
    """
    code = KINDS[kind][0]
    header = _header_bytes(header)
    parts = [memoryview(p).cast("B") for p in payload]
    head = HEAD.pack(MAGIC, VERSION, code, 0, len(header), sum(p.nbytes for p in parts), 0)
    crc = zlib.crc32(header, zlib.crc32(head[:_CHECKED]))
    for p in parts:
        crc = zlib.crc32(p, crc)
    return b"".join([head[:_CHECKED], crc.to_bytes(4, "little"), header, *parts])


def seal_arrays(kind: str, arrays: Dict[str, np.ndarray], **header) -> bytes:
    """An envelope of ``kind`` holding ``arrays`` (stored little-endian) and ``header``.

    Args:
        kind: a key of :data:`KINDS`.
        arrays: ``{name: array}``, in the order they are stored.
        **header: the kind's own JSON-able fields (``"arrays"`` is the envelope's).

    Returns:
        The envelope's bytes; :meth:`Envelope.arrays` reads the arrays back.
    """
    names = list(arrays)
    values = [np.asarray(arrays[k], order="C") for k in names]  # (ascontiguousarray makes 0-d 1-d)
    values = [a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
              for a in values]
    listing = [[k, a.dtype.str, list(a.shape)] for k, a in zip(names, values)]
    return seal(kind, {**header, "arrays": listing}, *(a.reshape(-1).view(np.uint8) for a in values))


class Envelope(NamedTuple):
    """A checked envelope: its kind, JSON header and payload (a view into the bytes read).

    >>> envelope = open_envelope(seal("evict", {"seq": 4, "now_s": 100}), ("sparse-grads", "evict"))
    >>> envelope.kind, envelope.header, bytes(envelope.payload)
    ('evict', {'seq': 4, 'now_s': 100}, b'')
    """

    kind: str
    header: dict
    payload: memoryview

    def arrays(self) -> Dict[str, np.ndarray]:
        """The arrays of an envelope written by :func:`seal_arrays`.

        Returns:
            ``{name: array}`` in the order they were stored: writable copies, in native byte
            order where the machine is little-endian.
        """
        out, offset, payload = {}, 0, self.payload
        what = KINDS[self.kind][1]
        try:
            for name, dtype, shape in self.header["arrays"]:
                dtype, shape = np.dtype(dtype), tuple(int(x) for x in shape)
                count = math.prod(shape)
                if offset + count * dtype.itemsize > len(payload):
                    raise SnapshotError(f"{what}: section {name!r} runs past the end of the payload")
                out[name] = np.frombuffer(payload, dtype=dtype, count=count,
                                          offset=offset).reshape(shape).copy()
                offset += count * dtype.itemsize
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SnapshotError):
                raise
            raise SnapshotError(f"{what} header is malformed: {e!r}") from None
        if offset != len(payload):
            raise SnapshotError(f"{what} payload has {len(payload) - offset} bytes not described "
                                f"by its header")
        return out


def open_envelope(data, expect: Union[str, Tuple[str, ...]], source: Optional[str] = None) -> Envelope:
    """Check ``data`` and return its kind, header and payload.

    Args:
        data: bytes-like.
        expect: the kind, or a tuple of the kinds, the caller can read.
        source: where the bytes come from (a file name), for the error messages.

    Returns:
        The :class:`Envelope`; its payload is a view into ``data``.

    Raises:
        SnapshotError: ``data`` is of an earlier format, truncated, padded, corrupted, of
            another kind or has a malformed header; the message says which.
    """
    kinds = (expect,) if isinstance(expect, str) else tuple(expect)
    subject = f"{KINDS[kinds[0]][1]} {source}" if source else KINDS[kinds[0]][1]
    data = memoryview(data).cast("B")
    for magic, what in _EARLIER.items():
        if bytes(data[:len(magic)]) == magic:
            raise SnapshotError(
                f"{subject} is a {magic.decode()} {what} of an earlier version of beam-monolith, "
                f"which this version does not read: use it with the version that wrote it, or "
                f"write it again with this one (PS snapshots: run the backfill again with "
                f"--export_dir)")
    if len(data) >= len(MAGIC) and bytes(data[:len(MAGIC)]) != MAGIC:
        raise SnapshotError(f"{source or 'data'} is not {_words(kinds[0])} "
                            f"(magic {bytes(data[:8])!r})")
    if len(data) < HEAD.size:
        raise SnapshotError(f"{subject} is truncated: {len(data)} bytes, the envelope's head "
                            f"alone is {HEAD.size}")
    _, version, code, reserved, header_len, payload_len, crc = HEAD.unpack_from(data)
    if version != VERSION:
        raise SnapshotError(f"{subject} has envelope format version {version}; this version of "
                            f"beam-monolith reads version {VERSION}")
    expected = HEAD.size + header_len + payload_len
    if len(data) < expected:
        raise SnapshotError(f"{subject} is truncated: expected {expected} bytes, got {len(data)}")
    if len(data) > expected:
        raise SnapshotError(f"{subject} is padded: {len(data) - expected} unexpected trailing "
                            f"bytes after the {expected} of the envelope")
    header = data[HEAD.size:HEAD.size + header_len]
    payload = data[HEAD.size + header_len:]
    if zlib.crc32(payload, zlib.crc32(header, zlib.crc32(data[:_CHECKED]))) != crc or reserved:
        raise SnapshotError(f"{subject} is corrupted (checksum mismatch)")
    kind = _BY_CODE.get(code)
    if kind not in kinds:
        got = f"it holds {_words(kind)}" if kind else f"unknown kind {code}"
        raise SnapshotError(f"{source or 'data'} is not {_words(kinds[0])}: {got}")
    try:
        parsed = json.loads(bytes(header).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SnapshotError(f"{subject} header is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise SnapshotError(f"{subject} header is not a JSON object: {parsed!r}")
    return Envelope(kind, parsed, payload)
