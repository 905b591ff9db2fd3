"""Which parallel subtask of a keyed Flink operator a Beam key lands on.

Beam's Flink runner (2.62) keys a stateful DoFn, and the stage of a splittable DoFn, by the
key's (the SDF's element's) nested encoding wrapped in a ``java.nio.ByteBuffer``; Flink hashes
that object into one of ``max_parallelism`` key groups and gives each subtask a contiguous range
of them (``KeyGroupRangeAssignment``). So where a key runs is a function of its encoded bytes
and the operator's parallelism, which this module computes in Python: the data-parallel readers
pick element names that land on distinct subtasks (two readers on one subtask would share its
Python process and take turns), and operators can report where the PS shards run.

``tests/test_flink_placement.py`` checks every function here against Flink's own classes in
the job server jar.
"""
from __future__ import annotations

__all__ = ["default_max_parallelism", "subtask_of_key", "subtask_of_str", "subtask_of_int",
           "placed_names"]

_MASK = 0xFFFFFFFF


def _int32(x: int) -> int:
    x &= _MASK
    return x - (1 << 32) if x & 0x80000000 else x


def _rotl(x: int, r: int) -> int:
    x &= _MASK
    return ((x << r) | (x >> (32 - r))) & _MASK


def _murmur(code: int) -> int:
    """Flink's ``MathUtils.murmurHash(int)``: non-negative."""
    code = (code * 0xCC9E2D51) & _MASK
    code = _rotl(code, 15)
    code = (code * 0x1B873593) & _MASK
    code = _rotl(code, 13)
    code = (code * 5 + 0xE6546B64) & _MASK
    code ^= 4
    code ^= code >> 16  # bitMix
    code = (code * 0x85EBCA6B) & _MASK
    code ^= code >> 13
    code = (code * 0xC2B2AE35) & _MASK
    code ^= code >> 16
    signed = _int32(code)
    if signed >= 0:
        return signed
    return -signed if signed != -(1 << 31) else 0


def _bytebuffer_hash(data: bytes) -> int:
    """``java.nio.ByteBuffer.hashCode()`` of a buffer wrapping ``data``."""
    h = 1
    for b in reversed(data):
        h = (31 * h + (b - 256 if b > 127 else b)) & _MASK
    return _int32(h)


def default_max_parallelism(parallelism: int) -> int:
    """Flink's default number of key groups for an operator of ``parallelism``.

    >>> default_max_parallelism(2), default_max_parallelism(200)
    (128, 512)
    """
    p = int(parallelism)
    target = p + p // 2
    power = 1
    while power < target:
        power <<= 1
    return min(max(power, 128), 32768)


def subtask_of_key(encoded: bytes, parallelism: int, max_parallelism: int | None = None) -> int:
    """The subtask (0-based) a key whose nested encoding is ``encoded`` runs on.

    Args:
        encoded: the key's bytes as Beam's Flink runner encodes it (nested context).
        parallelism: the operator's parallelism.
        max_parallelism: its key groups (None: Flink's default for ``parallelism``).

    >>> subtask_of_key(bytes([0]), 2), subtask_of_key(bytes([1]), 2)
    (1, 0)
    """
    groups = max_parallelism or default_max_parallelism(parallelism)
    group = _murmur(_bytebuffer_hash(encoded)) % groups
    return group * int(parallelism) // groups


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        bits = n & 0x7F
        n >>= 7
        if n:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def subtask_of_str(key: str, parallelism: int, max_parallelism: int | None = None) -> int:
    """:func:`subtask_of_key` of a ``str`` key (or SDF element): length-prefixed UTF-8.

    >>> subtask_of_str("hello", 2)
    0
    """
    data = key.encode("utf-8")
    return subtask_of_key(_varint(len(data)) + data, parallelism, max_parallelism)


def subtask_of_int(key: int, parallelism: int, max_parallelism: int | None = None) -> int:
    """:func:`subtask_of_key` of an ``int`` key with Beam's VarIntCoder (the PS shards').

    >>> [subtask_of_int(shard, 2) for shard in range(4)]
    [1, 0, 0, 1]
    """
    return subtask_of_key(_varint(int(key)), parallelism, max_parallelism)


def placed_names(base: str, count: int, parallelism: int | None,
                 max_parallelism: int | None = None) -> list[str]:
    """``count`` names ``base#i.s`` whose i-th runs on subtask ``i % parallelism``.

    ``s`` is the smallest salt that lands name i there, so the names are a function of the
    arguments only (a job resumed from a savepoint makes the same ones). Without a
    parallelism (a runner that does not key by these hashes): salt 0.

    Args:
        base: what the names start with.
        count: how many.
        parallelism: the keyed operator's parallelism, or None.
        max_parallelism: its key groups (None: Flink's default).

    >>> placed_names("r", 2, 2)
    ['r#0.0', 'r#1.5']
    >>> [subtask_of_str(n, 2) for n in placed_names("r", 2, 2)]
    [0, 1]
    """
    names = []
    for i in range(int(count)):
        salt = 0
        while parallelism and subtask_of_str(f"{base}#{i}.{salt}", parallelism,
                                             max_parallelism) != i % parallelism:
            salt += 1
        names.append(f"{base}#{i}.{salt}")
    return names
