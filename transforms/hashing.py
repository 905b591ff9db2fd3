"""Hashed ids, the baseline the collisionless table is measured against (Monolith paper §4.1).

A hashed embedding maps each id of a slot into one of ``M`` buckets: ``bucket = MD5(id) mod
M`` (MD5, as the paper did) and the fid becomes ``slot << 48 | bucket``. The collisionless
PS table then holds at most ``M`` rows for that slot, exactly what a hashed table of ``M``
rows holds, and two ids that land in one bucket share their row. Applied to the example
stream before training (``benchmarks.experiments collision``), the same pipeline and the
same model train on collided ids.

The id that is hashed is the fid itself (its 8 little-endian bytes): a fid names its value
one to one within a slot (48 bits of hash; the experiments check that the number of
distinct user and item fids equals the number of distinct user and item ids), so MD5 of
the fid spreads ids over buckets exactly as MD5 of the value would.

>>> import numpy as np
>>> from schemas.fid import make_fids
>>> users = make_fids(1, [f"u{i}" for i in range(1000)])
>>> hashed = hash_fids(users, {1: 16})
>>> sorted(set((hashed >> 48).tolist())), len(np.unique(hashed)) <= 16
([1], True)
>>> collision_rate(users, 16)            # 1000 ids in 16 buckets: every one collides
1.0
>>> m = buckets_for_collision_rate(1000, 0.0773)
>>> m, round(expected_collision_rate(1000, m), 4)
(12418, 0.0773)
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

__all__ = ["md5_buckets", "hash_fids", "collision_rate", "expected_collision_rate",
           "buckets_for_collision_rate"]

SLOT_SHIFT = np.uint64(48)


def md5_buckets(fids, buckets: int) -> np.ndarray:
    """The MD5 bucket of each fid. MD5 runs once per distinct fid.

    Args:
        fids: the fids (uint64 array-like).
        buckets: the number of buckets ``M`` (>= 1).

    Returns:
        uint64 [n]: ``MD5(fid as 8 little-endian bytes)`` (first 8 digest bytes) mod ``M``.

    Raises:
        ValueError: ``buckets`` < 1.
    """
    if int(buckets) < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    fids = np.ascontiguousarray(fids, dtype=np.uint64)
    unique, inverse = np.unique(fids, return_inverse=True)
    raw = unique.astype("<u8").tobytes()
    # hashlib has no batch API: one call per distinct id, offline (not a training hot path).
    digests = b"".join(hashlib.md5(raw[i:i + 8]).digest()[:8] for i in range(0, len(raw), 8))
    values = np.frombuffer(digests, dtype="<u8").astype(np.uint64)
    return (values % np.uint64(buckets))[inverse.reshape(-1)]


def hash_fids(fids, buckets_by_slot: dict) -> np.ndarray:
    """Hashed fids of some slots.

    Args:
        fids: the fids (uint64 array-like).
        buckets_by_slot: ``{slot: M}``: the slots to hash and their bucket counts.

    Returns:
        uint64 [n]: the fids, those of each slot of ``buckets_by_slot`` replaced by
        ``slot << 48 | md5_buckets(fid, M)``; fids of other slots unchanged.
    """
    fids = np.array(fids, dtype=np.uint64, copy=True).reshape(-1)
    slots = fids >> SLOT_SHIFT
    for slot, buckets in buckets_by_slot.items():
        mine = slots == np.uint64(slot)
        if mine.any():
            fids[mine] = (np.uint64(slot) << SLOT_SHIFT) | md5_buckets(fids[mine], buckets)
    return fids


def collision_rate(fids, buckets: int) -> float:
    """How many ids would share their row with another id if hashed.

    Args:
        fids: the ids (uint64 array-like).
        buckets: the number of buckets ``M``.

    Returns:
        The share of the distinct ``fids`` whose bucket holds at least one other of them.
    """
    unique = np.unique(np.asarray(fids, dtype=np.uint64))
    if unique.size == 0:
        return 0.0
    _, counts = np.unique(md5_buckets(unique, buckets), return_counts=True)
    return float(counts[counts > 1].sum() / unique.size)


def expected_collision_rate(ids: int, buckets: int) -> float:
    """The expected collision rate of ids hashed uniformly into buckets.

    Args:
        ids: the number of distinct ids ``n``.
        buckets: the number of buckets ``M``.

    Returns:
        ``1 - (1 - 1/M)^(n-1)``.
    """
    if ids <= 1:
        return 0.0
    return 1.0 - math.exp((ids - 1) * math.log1p(-1.0 / buckets)) if buckets > 1 else 1.0


def buckets_for_collision_rate(ids: int, rate: float) -> int:
    """The bucket count at which uniformly hashed ids collide at a given rate.

    Args:
        ids: the number of distinct ids.
        rate: the collision rate, in (0, 1).

    Returns:
        The bucket count ``M`` (inverts :func:`expected_collision_rate`).

    Raises:
        ValueError: ``rate`` outside (0, 1).
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    if ids <= 1:
        return 1
    # (1 - 1/M)^(n-1) = 1 - rate  ⇔  M = 1 / (1 - (1 - rate)^(1/(n-1)))
    return max(1, round(1.0 / -math.expm1(math.log1p(-rate) / (ids - 1))))
