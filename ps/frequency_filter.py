"""Frequency filter: how many times has an id been seen, in bounded memory.

Monolith keeps 4-bit counters that saturate at 15. Here a **count-min sketch** of saturating
``uint8`` (thresholds up to 255) or ``uint16`` (up to 65535) counters does the job: ``depth`` rows
of ``width`` counters, one hash per row; an id's count is the minimum of its ``depth`` counters.

* Memory is fixed at construction (``memory_bytes``), whatever the number of ids.
* A count never underestimates; hash collisions can only overestimate, so an id may be admitted a
  little early, never late. **Conservative update** (increment only the counters equal to the
  current minimum) keeps the overestimate small.
* Counting is sequential within a batch (the n-th occurrence of an id in a batch sees the n-1
  before it), so the result does not depend on how a stream is cut into batches.

>>> import numpy as np
>>> f = FrequencyFilter(memory_bytes=4096)
>>> f.add(np.array([7, 7, 9, 7], dtype=np.uint64)).tolist()
[1, 2, 1, 3]
>>> f.count(np.array([7, 9, 11], dtype=np.uint64)).tolist()
[3, 1, 0]
"""

import numpy as np

from ._jit import mix64, njit, reduce_range

__all__ = ["FrequencyFilter"]

_COUNTER_DTYPES = {"uint8": np.uint8, "uint16": np.uint16}


@njit(inline="always")
def sketch_estimate(counts, seeds, fid):
    """Minimum over the sketch rows of ``fid``'s counters."""
    width = counts.shape[1]
    best = counts[0, reduce_range(mix64(fid, seeds[0]), width)]
    for d in range(1, counts.shape[0]):
        c = counts[d, reduce_range(mix64(fid, seeds[d]), width)]
        if c < best:
            best = c
    return best


@njit(inline="always")
def sketch_increment(counts, seeds, fid, maximum):
    """Conservative, saturating increment of ``fid``; returns its new estimate."""
    width = counts.shape[1]
    current = sketch_estimate(counts, seeds, fid)
    if current >= maximum:
        return np.int64(current)
    for d in range(counts.shape[0]):
        i = reduce_range(mix64(fid, seeds[d]), width)
        if counts[d, i] == current:
            counts[d, i] = current + 1
    return np.int64(current) + 1


@njit
def _add_kernel(counts, seeds, fids, maximum, out):
    for i in range(fids.shape[0]):
        out[i] = sketch_increment(counts, seeds, fids[i], maximum)


@njit
def _count_kernel(counts, seeds, fids, out):
    for i in range(fids.shape[0]):
        out[i] = sketch_estimate(counts, seeds, fids[i])


class FrequencyFilter:
    """Count-min sketch of saturating counters, sized by memory.

    Args:
        memory_bytes: total size of the counters; the sketch width is derived from it.
        depth: number of hash rows (more rows: fewer overestimates, more work per id).
        counter: ``"uint8"`` (counts saturate at 255) or ``"uint16"`` (saturate at 65535).
        seed: hash seed; two filters with the same seed and size count identically.

    >>> f = FrequencyFilter(memory_bytes=1024, depth=2, counter="uint16")
    >>> f.width, f.max_count
    (256, 65535)
    >>> f.add(np.array([5, 5, 5], dtype=np.uint64)).tolist(), f.count(np.array([5], dtype=np.uint64)).tolist()
    ([1, 2, 3], [3])
    """

    def __init__(self, memory_bytes=1 << 20, depth=4, counter="uint8", seed=0x5EED):
        if counter not in _COUNTER_DTYPES:
            raise ValueError(f"counter must be one of {sorted(_COUNTER_DTYPES)}, got {counter!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        dtype = np.dtype(_COUNTER_DTYPES[counter])
        width = int(memory_bytes) // (depth * dtype.itemsize)
        if width < 1:
            raise ValueError(f"memory_bytes={memory_bytes} is too small for depth {depth}")
        self.counter = counter
        self.seed = int(seed)
        self.counts = np.zeros((depth, width), dtype=dtype)
        # One seed per row, derived from the filter seed so that a config fully determines them.
        self.row_seeds = np.array(
            [(self.seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019 * (d + 1)) % 2**64 for d in range(depth)],
            dtype=np.uint64,
        )

    @property
    def depth(self):
        return self.counts.shape[0]

    @property
    def width(self):
        return self.counts.shape[1]

    @property
    def max_count(self):
        """The value at which counters saturate; thresholds above it could never be reached."""
        return int(np.iinfo(self.counts.dtype).max)

    @property
    def memory_bytes(self):
        return self.counts.nbytes

    def add(self, fids):
        """Count one sighting per element of ``fids``, in order; returns the counts after each."""
        fids = np.ascontiguousarray(fids, dtype=np.uint64)
        out = np.empty(fids.shape[0], dtype=np.int64)
        _add_kernel(self.counts, self.row_seeds, fids, self.max_count, out)
        return out

    def count(self, fids):
        """Estimated number of sightings of each fid (never below the true count)."""
        fids = np.ascontiguousarray(fids, dtype=np.uint64)
        out = np.empty(fids.shape[0], dtype=np.int64)
        _count_kernel(self.counts, self.row_seeds, fids, out)
        return out

    def config(self):
        """JSON-able constructor arguments."""
        return {"memory_bytes": self.counts.nbytes, "depth": self.depth, "counter": self.counter, "seed": self.seed}

    def __repr__(self):
        return f"FrequencyFilter(memory_bytes={self.memory_bytes}, depth={self.depth}, counter={self.counter!r})"
