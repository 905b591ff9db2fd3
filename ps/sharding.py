"""Which PS shard owns a fid: one function, used by workers, shards, stores and serving alike."""
from __future__ import annotations

import numpy as np

__all__ = ["shard_of"]

_SHARD_MIX = np.uint64(0x9E3779B97F4A7C15)


def shard_of(fids: np.ndarray, num_shards: int) -> np.ndarray:
    """int64 [n]: the PS shard owning each fid (a multiplicative hash, stable everywhere).

    >>> shard_of(np.array([1, 2, 3], dtype=np.uint64), 4).tolist()
    [1, 2, 0]
    """
    fids = np.asarray(fids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = fids * _SHARD_MIX
    return ((mixed >> np.uint64(32)) % np.uint64(num_shards)).astype(np.int64)
