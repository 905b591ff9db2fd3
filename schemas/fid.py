"""Feature ids (fids) in Monolith's v2 layout: 15 bits of slot, 48 bits of value hash.

``fid = slot << 48 | hash48(value)``. Bit 63 stays clear, so a fid fits a signed int64
(Avro ``long``, ``np.int64``) and an unsigned uint64 (the PS tables) with the same value.

>>> make_fid(3, "user_42") >> 48
3
>>> make_fid(3, "user_42") == make_fids(3, ["user_42"])[0]
True
>>> make_fid(7, 42) == make_fid(7, "42")        # ints hash as their decimal text
True
>>> slots, hashes = split_fid(make_fids(5, ["a", "b"]))
>>> slots.tolist()
[5, 5]

The hash is our own, so a fid is the same in every process, on every machine and in every
release (Python's ``hash`` is salted per process; ``tests/test_fid.py`` pins golden values).
A value is first made into bytes, its *canonical form*:

* ``str``: its UTF-8 bytes; ``bytes``: as they are;
* ``int`` (and NumPy integers): its decimal text, so ``42`` and ``"42"`` give one fid (a
  producer may log a field as Avro ``long`` today and ``string`` tomorrow);
* ``float``: an integral one as the int (``3.0`` is ``3``), any other its ``repr``;
  NaN and infinities are rejected. ``bool`` is rejected (``True`` is ``1`` *and* ``"True"``).

The bytes are read as little-endian 64-bit words, zero-padded, and chained through the
splitmix64 finaliser, seeded with the length: ``h = mix(h ^ word)`` per word, then a final
``mix``; the top 48 bits are the hash. :func:`make_fids` runs the same chain on a whole array
at once (one NumPy pass per 8 bytes of the longest value), so an array of a million ids is
hashed without a Python loop over its elements; the scalar path is cached for hot values.
"""
from __future__ import annotations

import functools
import math
import struct
from typing import Iterable

import numpy as np

__all__ = ["SLOT_BITS", "HASH_BITS", "MAX_SLOT", "HASH_MASK", "hash48", "make_fid",
           "make_fids", "split_fid"]

SLOT_BITS = 15
HASH_BITS = 48
MAX_SLOT = (1 << SLOT_BITS) - 1          # 32767
HASH_MASK = (1 << HASH_BITS) - 1

_MASK64 = (1 << 64) - 1
_SEED = 0x6D6F6E6F6C697468               # b"monolith": changing it changes every fid
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_SHIFT = 64 - HASH_BITS
# Values longer than this are hashed one by one: a byte matrix as wide as one huge value
# times a million rows would not fit in memory.
_MATRIX_MAX_BYTES = 256
_iter_words = struct.Struct("<Q").iter_unpack


def _hash_bytes(data: bytes) -> int:
    # The splitmix64 finaliser written out inline: this is the per-record hot path.
    n = len(data)
    h = _SEED ^ ((n * _GOLDEN) & _MASK64)
    if n % 8:
        data += b"\0" * (8 - n % 8)
    for (word,) in _iter_words(data):
        z = h ^ word
        z = ((z ^ (z >> 30)) * _M1) & _MASK64
        z = ((z ^ (z >> 27)) * _M2) & _MASK64
        h = z ^ (z >> 31)
    z = ((h ^ (h >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return (z ^ (z >> 31)) >> _SHIFT


@functools.lru_cache(maxsize=1 << 16)
def hash_text(text: str) -> int:
    """:func:`hash48` of a text value, for the per-record hot path.

    Args:
        text: the value.

    Returns:
        Its 48-bit hash.
    """
    return _hash_bytes(text.encode("utf-8"))


def _canonical_text(value) -> str | bytes:
    """The canonical form of a non-str value (str is its own canonical form)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"cannot hash a bool ({value!r}): pass int(value) or str(value)")
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"cannot hash a non-finite number ({value!r})")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value)
    raise TypeError(f"cannot hash a {type(value).__name__} ({value!r}): "
                    "a value is a str, bytes, int or float")


def hash48(value) -> int:
    """The 48-bit hash of one value's canonical form (see the module docstring).

    Args:
        value: a str, bytes, int or finite float.

    Returns:
        An int in ``[0, 2**48)``.

    Raises:
        TypeError: a bool, or a value of another type.
        ValueError: a non-finite number.

    >>> hash48("a") == hash48(b"a")
    True
    >>> 0 <= hash48(12345) < 2 ** 48
    True
    """
    if type(value) is str:  # the hot path: one cached dict lookup
        return hash_text(value)
    text = _canonical_text(value)
    return hash_text(text) if isinstance(text, str) else _hash_bytes(text)


def _check_slot(slot) -> int:
    if isinstance(slot, (bool, np.bool_)) or not isinstance(slot, (int, np.integer)):
        raise TypeError(f"slot must be an int in 0..{MAX_SLOT}, got {slot!r}")
    if not 0 <= slot <= MAX_SLOT:
        raise ValueError(f"slot {slot} out of range 0..{MAX_SLOT} ({SLOT_BITS} bits)")
    return int(slot)


def make_fid(slot: int, value) -> int:
    """The fid of a value in a slot.

    Args:
        slot: the slot, ``0..MAX_SLOT``.
        value: the value (as :func:`hash48` takes it).

    Returns:
        ``slot << 48 | hash48(value)``, a Python int in ``[0, 2**63)``.

    Raises:
        TypeError, ValueError: a slot that is not an int in range, or a value
            :func:`hash48` refuses.

    >>> make_fid(1, "x") >> 48, make_fid(1, "x") & (2 ** 48 - 1) == hash48("x")
    (1, True)
    """
    return (_check_slot(slot) << HASH_BITS) | hash48(value)


# ---------------------------------------------------------------------------------------
# The vectorised path: the same chain, one NumPy operation per 8-byte word over all values.

def _mix_array(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_M1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_M2)
    return z ^ (z >> np.uint64(31))


def _hash_byte_strings(data: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """uint64 hashes of a fixed-width bytes array (``S`` dtype) with each value's true length.

    The length is passed separately because NumPy drops trailing NUL bytes of ``S`` values.
    """
    n = len(data)
    lengths = lengths.astype(np.uint64)
    width = max(data.dtype.itemsize, 1)
    words = -(-width // 8)
    matrix = np.zeros((n, words * 8), dtype=np.uint8)
    matrix[:, :data.dtype.itemsize] = data.view(np.uint8).reshape(n, data.dtype.itemsize)
    matrix = matrix.view("<u8")
    with np.errstate(over="ignore"):
        h = np.uint64(_SEED) ^ (lengths * np.uint64(_GOLDEN))
        for j in range(words):
            # Words past a value's length are not chained: the scalar path never sees them.
            mixed = _mix_array(h ^ matrix[:, j])
            h = np.where(lengths > np.uint64(8 * j), mixed, h)
        return _mix_array(h) >> np.uint64(_SHIFT)


def _hash_bytes_list(encoded: list) -> np.ndarray:
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    out = np.empty(len(encoded), dtype=np.uint64)
    long = lengths > _MATRIX_MAX_BYTES
    if long.any():
        for i in np.flatnonzero(long):
            out[i] = _hash_bytes(encoded[i])
        short = np.flatnonzero(~long)
        encoded = [encoded[i] for i in short]
        out[short] = _hash_bytes_list(encoded) if encoded else out[short]
        return out
    return _hash_byte_strings(np.array(encoded, dtype=bytes), lengths) if encoded else out


def _hash_int_array(values: np.ndarray) -> np.ndarray:
    text = values.astype("S21")  # decimal text in C: the canonical form of an int
    return _hash_byte_strings(text, np.char.str_len(text))


def _hash_str_list(values) -> np.ndarray:
    try:
        data = np.asarray(values, dtype=str).astype(bytes)  # ASCII only, in C
    except UnicodeEncodeError:
        return _hash_bytes_list([v.encode("utf-8") for v in values])
    # Lengths of the Python strings: NumPy's `U` and `S` values lose trailing NULs.
    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    if (lengths > _MATRIX_MAX_BYTES).any():
        return _hash_bytes_list([v.encode("utf-8") for v in values])
    return _hash_byte_strings(data, lengths)


def _hash_values(values) -> np.ndarray:
    """uint64 array of ``hash48`` of every value, vectorised where the dtype allows."""
    if isinstance(values, np.ndarray):
        kind = values.dtype.kind
        flat = values.ravel()
        if kind in "iu":
            return _hash_int_array(flat)
        if kind == "f" and np.isfinite(flat).all() and (flat == np.round(flat)).all() \
                and (np.abs(flat) < 2.0 ** 62).all():
            return _hash_int_array(flat.astype(np.int64))
        if kind == "U":
            return _hash_str_list(flat.tolist())
        if kind == "S":
            return _hash_byte_strings(flat, np.char.str_len(flat))
        if kind == "b":
            raise TypeError("cannot hash bools: pass values.astype(int) or str values")
        values = flat.tolist()
    values = list(values)
    if not values:
        return np.empty(0, dtype=np.uint64)
    if all(type(v) is str for v in values):
        return _hash_str_list(values)
    if all(type(v) is int for v in values) and -(2 ** 63) <= min(values) \
            and max(values) < 2 ** 63:
        return _hash_int_array(np.array(values, dtype=np.int64))
    # Mixed or unusual types: canonical bytes one by one, then hashed together.
    encoded = []
    for v in values:
        text = v if type(v) is str else _canonical_text(v)
        encoded.append(text.encode("utf-8") if isinstance(text, str) else text)
    return _hash_bytes_list(encoded)


def make_fids(slot, values: Iterable) -> np.ndarray:
    """:func:`make_fid` of many values, vectorised.

    Args:
        slot: one slot for all values, or an int array broadcast against them.
        values: the values (a list or a NumPy array).

    Returns:
        int64 array of ``make_fid(slot, v)`` for every ``v`` in ``values``.

    >>> make_fids(2, [1, 2, 3]).dtype
    dtype('int64')
    >>> (make_fids(2, np.arange(3)) == make_fids(2, ["0", "1", "2"])).all()
    True
    """
    hashes = _hash_values(values).astype(np.int64)
    if isinstance(slot, (int, np.integer)) and not isinstance(slot, (bool, np.bool_)):
        return (np.int64(_check_slot(slot)) << np.int64(HASH_BITS)) | hashes
    slots = np.asarray(slot)
    if slots.dtype.kind not in "iu":
        raise TypeError(f"slots must be ints in 0..{MAX_SLOT}, got dtype {slots.dtype}")
    if slots.size and (slots.min() < 0 or slots.max() > MAX_SLOT):
        bad = slots[(slots < 0) | (slots > MAX_SLOT)].ravel()[0]
        raise ValueError(f"slot {bad} out of range 0..{MAX_SLOT} ({SLOT_BITS} bits)")
    return (slots.astype(np.int64) << np.int64(HASH_BITS)) | hashes


def split_fid(fids):
    """The slots and hashes of fids.

    Args:
        fids: one fid (an int) or an array of them.

    Returns:
        ``(slots, hashes)``: ints for an int, int64 arrays for an array.

    Raises:
        ValueError: a value that is not a v2 fid (outside ``[0, 2**63)``).

    >>> split_fid(make_fid(9, "x"))[0]
    9
    """
    if isinstance(fids, (int, np.integer)) and not isinstance(fids, (bool, np.bool_)):
        fid = int(fids)
        if not 0 <= fid < 1 << 63:
            raise ValueError(f"fid {fid} is not in [0, 2**63): not a v2 fid")
        return fid >> HASH_BITS, fid & HASH_MASK
    arr = np.asarray(fids)
    if arr.dtype.kind == "u":
        if arr.size and (arr >> np.uint64(63)).any():
            raise ValueError("a fid has bit 63 set: not a v2 fid")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind != "i":
        raise TypeError(f"fids must be ints, got dtype {arr.dtype}")
    else:
        arr = arr.astype(np.int64, copy=False)
        if arr.size and arr.min() < 0:
            raise ValueError("a fid is negative: not a v2 fid")
    return arr >> HASH_BITS, arr & HASH_MASK
