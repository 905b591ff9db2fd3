"""EmbeddingTable: a collisionless embedding table for one parameter-server shard.

Every feature id (fid, uint64) gets its own float32 row; memory stays bounded by a frequency filter
(ids get a row only after ``threshold`` sightings) and by expiry (rows unseen for longer than their
slot's ``expiry``, in event time, are evicted). All operations take and return arrays.

>>> import numpy as np
>>> from ps import EmbeddingTable, SGD
>>> table = EmbeddingTable(dim=2, optimizer=SGD(lr=0.5))
>>> fids = np.array([10, 11, 10], dtype=np.uint64)
>>> table.insert(fids, now=100)                 # 2 new rows; the repeated fid is one row
2
>>> table.apply_gradients(fids, np.ones((3, 2), dtype=np.float32), now=101)   # fid 10: one step on 2 grads
2
>>> weights, found = table.lookup(np.array([10, 11, 12], dtype=np.uint64))
>>> weights.tolist(), found.tolist()
([[-1.0, -1.0], [-0.5, -0.5], [0.0, 0.0]], [True, True, False])
>>> delta = table.delta()                       # rows changed since the last delta()
>>> delta.fids.tolist(), delta.deleted.tolist()
([10, 11], [])
>>> len(table), table.evict(now=200)            # no slot has an expiry: nothing is evicted
(2, 0)

How it is stored (the invariants every method keeps)
----------------------------------------------------
Two structures, both in this file:

* the **arena**: entries stored densely, row ``r`` in ``[0, len)`` holding ``keys[r]`` (uint64),
  ``rows[r]`` (float32 ``[dim weights | optimizer slots]``), ``last_seen[r]`` (uint32 event
  time) and ``touched[r]`` (uint8, one bit per delta channel). It grows in place (``mremap``),
  so rows are never copied when the table grows and new rows are written sequentially;
* the **index**: a cuckoo hash table of 16-byte entries ``(key, row id)``, two hash functions,
  buckets of 4 entries (one 64-byte cache line). A lookup reads two lines and then its row.

I1  Arena rows ``[0, len)`` are exactly the table's entries; rows past ``len`` are garbage.
I2  For every arena row ``r`` there is exactly one index entry ``(keys[r], r)``, in bucket
    ``bucket(key, seed0)`` or ``bucket(key, seed1)``; other index entries have key
    ``EMPTY_FID`` (all ones, which is therefore rejected as a fid).
I3  Row ids change only when a row is removed (``delete``, ``evict``): the last row moves into
    the hole and its index entry is updated (swap-remove keeps the arena dense). Inserts and
    index growth never move rows, so row ids found before an insert stay valid after it.
I4  The index holds at most ``max_load * index capacity`` entries; an insert that would pass
    the bound, or whose cuckoo kicks fail, first rebuilds the index ``growth`` times bigger
    from the arena keys (rows do not move).
I5  Bit ``c`` of ``touched[r]`` is set iff row ``r`` was written since the last
    ``delta(channel=c)``; fids removed since then are kept in a per-channel log.
I6  Everything is deterministic given the seed and the calls: no wall clock, no global RNG
    (the kick random walk has its own xorshift state, expiry uses the event times it is given).

Semantics worth knowing
-----------------------
* ``lookup`` is read-only. A missing fid gets the *initial value*: the weights its row would be
  created with (zeros by default; ``init_scale > 0`` draws them deterministically from the fid).
* ``apply_gradients`` counts sightings of rowless fids in the frequency filter and creates rows
  for those that reach their slot's threshold. Gradients of occurrences that had no row are
  dropped and counted in ``stats.dropped_gradients``; the gradients of a fid repeated in a batch
  are summed (in batch order) before one optimizer step, as TensorFlow's sparse apply does.
* Filter counts survive eviction: an id that was admitted once is re-admitted at its next
  sighting (its counters are already at the threshold).
* ``delta()`` returns the rows written since the last call *and* the fids deleted or evicted
  since then (serving must drop those), so a replica applying every delta stays equal.
"""

import dataclasses
import math
import mmap
from typing import NamedTuple

import numpy as np

from ._jit import EMPTY_FID, mix64, njit, prefetch, prefetch_write, reduce_range
from .frequency_filter import FrequencyFilter, sketch_estimate, sketch_increment
from .envelope import SnapshotError, open_envelope, seal_arrays
from .optimizers import Adagrad, Optimizer, optimizer_from_config

__all__ = ["EmbeddingTable", "SlotConfig", "Delta", "TableStats", "slot_of", "EMPTY_FID", "BUCKET_SIZE"]

BUCKET_SIZE = 4  # 4 index entries of 16 bytes = one 64-byte cache line
NUM_SLOTS = 1 << 16  # slot = fid >> 48 (Monolith v2 uses 15 bits; bit 63 is tolerated)
NEVER = 0xFFFF_FFFF  # an expiry this large never fires: uint32 event-time differences are smaller
MAX_KICKS = 500  # length of the cuckoo random walk before giving up and growing
ARENA_GROWTH = 1.0625  # arena growth step: cheap (no copy), so small steps keep slack small
_HUGE_PAGE = 2 << 20
_PREFETCH = 8  # keys handled ahead of the current one (8 and 16 measured best here; 4 is too few)

# insert kernel outcomes
_DONE, _NEED_ARENA, _NEED_INDEX, _KICK_FAILED = 0, 1, 2, 3
# what the insert kernel writes into rows
_INIT_ROWS, _SET_WEIGHTS, _SET_ROWS = 0, 1, 2


def slot_of(fids):
    """Slot of each fid (Monolith v2 layout: the bits above the 48-bit hash)."""
    return np.asarray(fids, dtype=np.uint64) >> np.uint64(48)


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """Per-slot policy. ``threshold``: sightings before a fid gets a row (0 or 1: at once).
    ``expiry``: event-time units a row may stay unseen before ``evict`` removes it (None: never).

    The embedding dim is not per slot: one table has one row width, so a shard whose slots use
    several dims keeps one table per dim.

    >>> table = EmbeddingTable(dim=1, slots={2: SlotConfig(threshold=2, expiry=10)})
    >>> fid = np.array([(2 << 48) + 5], dtype=np.uint64)          # slot 2
    >>> [table.apply_gradients(fid, np.ones((1, 1), np.float32), now=t) for t in (0, 1)]
    [0, 1]
    >>> table.evict(now=5), table.evict(now=12)                    # unseen for 11 > 10
    (0, 1)
    """

    threshold: int = 0
    expiry: int | None = None

    def __post_init__(self):
        if not 0 <= int(self.threshold) <= 65535:
            raise ValueError(f"threshold must be in [0, 65535], got {self.threshold}")
        if self.expiry is not None and not 0 <= int(self.expiry) < NEVER:
            raise ValueError(f"expiry must be None or in [0, {NEVER}), got {self.expiry}")


class Delta(NamedTuple):
    """What changed since the previous ``delta()`` of a channel."""

    fids: np.ndarray  #: uint64[n] fids whose rows were written
    weights: np.ndarray  #: float32[n, dim] their current weights ([n, width] with ``full=True``)
    last_seen: np.ndarray  #: uint32[n] their last-seen event times
    deleted: np.ndarray  #: uint64[m] fids deleted or evicted and not present any more


@dataclasses.dataclass
class TableStats:
    """Running counters (kept in snapshots)."""

    rows_created: int = 0
    rows_deleted: int = 0
    rows_evicted: int = 0
    dropped_gradients: int = 0
    rehashes: int = 0  #: index rebuilds (growth)
    kick_failures: int = 0  #: inserts whose cuckoo random walk failed (each forced a rebuild)


# --------------------------------------------------------------------------------------------
# Kernels: plain loops compiled by numba, each a step one can check against the invariants.
# ``index`` is uint64 [entries, 2] (key, row id); ``flat_index`` is the same memory as 1-D.
# --------------------------------------------------------------------------------------------


@njit(inline="always")
def _bucket(key, seed, num_buckets):
    return reduce_range(mix64(key, seed), num_buckets)


@njit(inline="always")
def _prefetch_buckets(flat_index, key, seeds, num_buckets):
    prefetch(flat_index, _bucket(key, seeds[0], num_buckets) * (2 * BUCKET_SIZE))
    prefetch(flat_index, _bucket(key, seeds[1], num_buckets) * (2 * BUCKET_SIZE))


@njit(inline="always")
def _find(index, key, seeds, num_buckets):
    """Index entry of ``key`` or -1 (I2: only its two buckets can hold it)."""
    base = _bucket(key, seeds[0], num_buckets) * BUCKET_SIZE
    for j in range(BUCKET_SIZE):
        if index[base + j, 0] == key:
            return base + j
    base = _bucket(key, seeds[1], num_buckets) * BUCKET_SIZE
    for j in range(BUCKET_SIZE):
        if index[base + j, 0] == key:
            return base + j
    return -1


@njit(inline="always")
def _find_or_free(index, key, seeds, num_buckets):
    """One pass over both buckets: ``(entry of key or -1, a free entry in the emptier bucket or -1)``."""
    base_a = _bucket(key, seeds[0], num_buckets) * BUCKET_SIZE
    base_b = _bucket(key, seeds[1], num_buckets) * BUCKET_SIZE
    found, free_a, first_a, free_b, first_b = -1, 0, -1, 0, -1
    for j in range(BUCKET_SIZE):
        k = index[base_a + j, 0]
        if k == key:
            found = base_a + j
        elif k == EMPTY_FID:
            free_a += 1
            first_a = base_a + j
        k = index[base_b + j, 0]
        if k == key:
            found = base_b + j
        elif k == EMPTY_FID:
            free_b += 1
            first_b = base_b + j
    return found, first_a if free_a >= free_b and free_a > 0 else first_b


@njit(inline="always")
def _xorshift(rng):
    x = rng[0]
    x ^= x << np.uint64(13)
    x ^= x >> np.uint64(7)
    x ^= x << np.uint64(17)
    rng[0] = x
    return x


@njit(inline="always")
def _place(index, num_buckets, seeds, rng, key, row_id):
    """Store the entry ``(key, row_id)`` (key not present), kicking others out if needed.

    Returns ``(placed, homeless_key, homeless_row_id)``: on failure an entry that was kicked
    out found no place, and the caller must grow the index (which rebuilds it from the arena).
    """
    bucket_a = _bucket(key, seeds[0], num_buckets)
    bucket_b = _bucket(key, seeds[1], num_buckets)
    free_a, first_a, free_b, first_b = 0, -1, 0, -1
    for j in range(BUCKET_SIZE):
        if index[bucket_a * BUCKET_SIZE + j, 0] == EMPTY_FID:
            free_a += 1
            first_a = bucket_a * BUCKET_SIZE + j
        if index[bucket_b * BUCKET_SIZE + j, 0] == EMPTY_FID:
            free_b += 1
            first_b = bucket_b * BUCKET_SIZE + j
    e = first_a if free_a >= free_b and free_a > 0 else first_b  # the emptier bucket
    if e >= 0:
        index[e, 0] = key
        index[e, 1] = row_id
        return True, EMPTY_FID, np.uint64(0)
    # Random-walk cuckoo: take the place of a random occupant, then move that occupant to its
    # other bucket, until some bucket on the way has a free entry.
    bucket = bucket_a if _xorshift(rng) & np.uint64(1) else bucket_b
    for _ in range(MAX_KICKS):
        victim = bucket * BUCKET_SIZE + np.intp(_xorshift(rng) % np.uint64(BUCKET_SIZE))
        key, index[victim, 0] = index[victim, 0], key
        row_id, index[victim, 1] = index[victim, 1], row_id
        first = _bucket(key, seeds[0], num_buckets)
        bucket = _bucket(key, seeds[1], num_buckets) if first == bucket else first
        for j in range(BUCKET_SIZE):
            e = bucket * BUCKET_SIZE + j
            if index[e, 0] == EMPTY_FID:
                index[e, 0] = key
                index[e, 1] = row_id
                return True, EMPTY_FID, np.uint64(0)
    return False, key, row_id


@njit(inline="always")
def _initial_weight(fid, j, scale, seed):
    """Weight ``j`` of a new row for ``fid``: 0, or uniform in [-scale, scale) drawn from the fid."""
    if scale == 0.0:
        return np.float32(0.0)
    u = np.float64(mix64(fid, seed + np.uint64(j) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)) * 2.0**-53
    return np.float32((2.0 * u - 1.0) * scale)


@njit
def _find_kernel(fids, index, seeds, num_buckets, row_ids):
    """``row_ids[i]`` = arena row of ``fids[i]``, or -1."""
    flat_index = index.reshape(-1)
    n = fids.shape[0]
    for i in range(min(_PREFETCH, n)):
        _prefetch_buckets(flat_index, fids[i], seeds, num_buckets)
    for i in range(n):
        if i + _PREFETCH < n:
            _prefetch_buckets(flat_index, fids[i + _PREFETCH], seeds, num_buckets)
        e = _find(index, fids[i], seeds, num_buckets)
        row_ids[i] = np.intp(index[e, 1]) if e >= 0 else -1


_LOOKUP, _TOUCH = 0, 1  # what the pipelined find does with each key's row


@njit(inline="always")
def _pipelined_find(mode, fids, index, seeds, num_buckets, rows, last_seen, touched, row_ids,
                    dim, init_slots, init_scale, init_seed, out, time, bits):
    """Find the row of every key (to ``row_ids``, -1 if none), then, by ``mode``:

    * _LOOKUP: ``out[i] = rows[row of fids[i], :ncols]``, or the initial value;
    * _TOUCH: mark the rows found as seen at ``time`` and touched with ``bits`` (I5).

    A three-stage software pipeline: prefetch the buckets of key ``i + 2P``, find key ``i + P``
    (its buckets have arrived) and prefetch what the mode reads of its row, handle key ``i``.
    Inlined into one kernel per mode, where the mode is a constant: each gets only its code.
    """
    flat_index = index.reshape(-1)
    flat_rows = rows.reshape(-1)
    width, ncols, n = rows.shape[1], out.shape[1], fids.shape[0]
    for i in range(min(2 * _PREFETCH, n)):
        _prefetch_buckets(flat_index, fids[i], seeds, num_buckets)
    for i in range(min(_PREFETCH, n)):
        e = _find(index, fids[i], seeds, num_buckets)
        row_ids[i] = np.intp(index[e, 1]) if e >= 0 else -1
    for i in range(n):
        ahead = i + 2 * _PREFETCH
        if ahead < n:
            _prefetch_buckets(flat_index, fids[ahead], seeds, num_buckets)
        ahead = i + _PREFETCH
        if ahead < n:
            e = _find(index, fids[ahead], seeds, num_buckets)
            r = np.intp(index[e, 1]) if e >= 0 else -1
            row_ids[ahead] = r
            if r >= 0:
                if mode == _LOOKUP:
                    prefetch(flat_rows, r * width)
                    prefetch(flat_rows, r * width + ncols - 1)
                else:
                    prefetch_write(last_seen, r)
                    prefetch_write(touched, r)
        r = row_ids[i]
        if mode == _TOUCH:
            if r >= 0:
                if last_seen[r] < time:
                    last_seen[r] = time
                touched[r] |= bits
        elif r >= 0:
            for j in range(ncols):
                out[i, j] = rows[r, j]
        else:
            for j in range(dim):
                out[i, j] = _initial_weight(fids[i], j, init_scale, init_seed)
            for j in range(dim, ncols):
                out[i, j] = init_slots[j - dim]


@njit
def _lookup_kernel(fids, index, seeds, num_buckets, rows, dim, init_slots, init_scale, init_seed, out, row_ids):
    """``out[i] = rows[row of fids[i], :ncols]``, or the initial value; row ids to ``row_ids``.
    (The touch's arguments are unused here: any array stands in.)"""
    _pipelined_find(_LOOKUP, fids, index, seeds, num_buckets, rows, row_ids, row_ids, row_ids,
                    dim, init_slots, init_scale, init_seed, out, 0, 0)


@njit
def _find_and_touch_kernel(fids, index, seeds, num_buckets, last_seen, touched, time, bits, row_ids):
    """Row ids of ``fids`` (-1: none); the rows found are marked seen at ``time`` and touched (I5).
    (The lookup's arguments are unused here: any array of the right rank stands in.)"""
    _pipelined_find(_TOUCH, fids, index, seeds, num_buckets, last_seen.reshape(-1, 1), last_seen, touched, row_ids,
                    0, last_seen, 0.0, 0, last_seen.reshape(-1, 1), time, bits)


@njit
def _insert_kernel(
    fids, times, values, mode, touch_bits, dim, init_slots, init_scale, init_seed,
    index, num_buckets, seeds, rng, max_entries, keys, rows, last_seen, touched, start, count, row_ids,
):  # fmt: skip
    """Upsert ``fids[start:]``, writing each one's arena row to ``row_ids``.

    ``mode``: _INIT_ROWS (new rows get initial values, existing rows keep theirs), _SET_WEIGHTS
    (``values`` are weights) or _SET_ROWS (``values`` are full rows). Returns ``(outcome,
    next_index, count, created)``: on _NEED_ARENA / _NEED_INDEX / _KICK_FAILED the caller grows
    and calls again from ``next_index`` (after a failed kick the arena already holds the row).
    """
    flat_index = index.reshape(-1)
    width = rows.shape[1]
    n = fids.shape[0]
    created = 0
    for i in range(start, min(start + _PREFETCH, n)):
        _prefetch_buckets(flat_index, fids[i], seeds, num_buckets)
    for i in range(start, n):
        ahead = i + _PREFETCH
        if ahead < n:
            _prefetch_buckets(flat_index, fids[ahead], seeds, num_buckets)
        key = fids[i]
        e, free = _find_or_free(index, key, seeds, num_buckets)
        if e >= 0:  # existing row: update in place
            r = np.intp(index[e, 1])
            if mode == _SET_WEIGHTS:
                for j in range(dim):
                    rows[r, j] = values[i, j]
            elif mode == _SET_ROWS:
                for j in range(width):
                    rows[r, j] = values[i, j]
            if times[i] > last_seen[r]:
                last_seen[r] = times[i]
            touched[r] |= touch_bits
            row_ids[i] = r
            continue
        if count >= keys.shape[0]:
            return _NEED_ARENA, i, count, created
        if count >= max_entries:
            return _NEED_INDEX, i, count, created
        r = count  # new row: append to the arena
        keys[r] = key
        if mode == _SET_ROWS:
            for j in range(width):
                rows[r, j] = values[i, j]
        else:
            if mode == _SET_WEIGHTS:
                for j in range(dim):
                    rows[r, j] = values[i, j]
            elif init_scale == 0.0:
                for j in range(dim):
                    rows[r, j] = 0.0
            else:
                for j in range(dim):
                    rows[r, j] = _initial_weight(key, j, init_scale, init_seed)
            for j in range(dim, width):
                rows[r, j] = init_slots[j - dim]
        last_seen[r] = times[i]
        touched[r] = touch_bits
        row_ids[i] = r
        count += 1
        created += 1
        if free >= 0:  # the common case: a free entry in one of its buckets
            index[free, 0] = key
            index[free, 1] = r
            continue
        placed, _, _ = _place(index, num_buckets, seeds, rng, key, np.uint64(r))
        if not placed:
            return _KICK_FAILED, i + 1, count, created
    return _DONE, n, count, created


@njit
def _build_index_kernel(keys, count, index, num_buckets, seeds, rng):
    """Fill the empty ``index`` with ``(keys[r], r)`` for every arena row; False if one failed."""
    flat_index = index.reshape(-1)
    for r in range(count):
        if r + _PREFETCH < count:
            _prefetch_buckets(flat_index, keys[r + _PREFETCH], seeds, num_buckets)
        placed, _, _ = _place(index, num_buckets, seeds, rng, keys[r], np.uint64(r))
        if not placed:
            return False
    return True


@njit(inline="always")
def _remove_row(index, entry, seeds, num_buckets, keys, rows, last_seen, touched, count):
    """Free index ``entry`` and its arena row; the last row moves into the hole (I3).
    Returns the new count."""
    r = np.intp(index[entry, 1])
    index[entry, 0] = EMPTY_FID
    last = count - 1
    if r != last:
        moved = keys[last]
        keys[r] = moved
        for j in range(rows.shape[1]):
            rows[r, j] = rows[last, j]
        last_seen[r] = last_seen[last]
        touched[r] = touched[last]
        index[_find(index, moved, seeds, num_buckets), 1] = r
    return count - 1


@njit
def _delete_kernel(fids, index, seeds, num_buckets, keys, rows, last_seen, touched, count, removed):
    """Remove the rows of ``fids``; returns ``(count, number removed)``, removed fids in ``removed``."""
    n_removed = 0
    for i in range(fids.shape[0]):
        e = _find(index, fids[i], seeds, num_buckets)
        if e >= 0:
            removed[n_removed] = fids[i]
            n_removed += 1
            count = _remove_row(index, e, seeds, num_buckets, keys, rows, last_seen, touched, count)
    return count, n_removed


@njit
def _evict_kernel(now, expiry_by_slot, index, seeds, num_buckets, keys, rows, last_seen, touched, count, removed):
    """Remove rows unseen for longer than their slot's expiry. Scans the arena backwards so that
    the row swapped into a hole has already been checked. Returns ``(count, number removed)``."""
    n_removed = 0
    for r in range(count - 1, -1, -1):
        key = keys[r]
        expiry = expiry_by_slot[min(np.intp(key >> np.uint64(48)), expiry_by_slot.shape[0] - 1)]
        if expiry != NEVER and now - np.int64(last_seen[r]) > expiry:
            removed[n_removed] = key
            n_removed += 1
            count = _remove_row(index, _find(index, key, seeds, num_buckets), seeds, num_buckets,
                                keys, rows, last_seen, touched, count)  # fmt: skip
    return count, n_removed


@njit
def _admission_kernel(fids, thresholds, counts, seeds, maximum, admitted):
    """For rowless fids, in batch order: does this occurrence reach its slot's threshold?

    A fid whose count already reached the threshold (admitted before, then evicted) is admitted
    without counting; otherwise the sighting is counted first.
    """
    for i in range(fids.shape[0]):
        fid = fids[i]
        threshold = thresholds[min(np.intp(fid >> np.uint64(48)), thresholds.shape[0] - 1)]
        if threshold <= 1:
            admitted[i] = True
        elif sketch_estimate(counts, seeds, fid) >= threshold:
            admitted[i] = True
        else:
            admitted[i] = sketch_increment(counts, seeds, fid, maximum) >= threshold


@njit
def _sum_by_row_kernel(row_ids, grads, unique_rows, sums):
    """Sum the gradient rows that share a row id (skipping -1), in batch order; returns the
    number of distinct rows, written in first-occurrence order. Uses a small open-addressing
    map of 2n entries (fits in cache, unlike a sort of the whole batch)."""
    n = row_ids.shape[0]
    size = 1
    while size < 2 * n:
        size *= 2
    map_rows = np.full(size, -1, dtype=np.intp)
    map_index = np.empty(size, dtype=np.intp)
    mask = size - 1
    unique = 0
    for i in range(n):
        r = row_ids[i]
        if r < 0:
            continue
        h = np.intp((np.uint64(r) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)) & mask
        while map_rows[h] >= 0 and map_rows[h] != r:
            h = (h + 1) & mask
        if map_rows[h] < 0:
            map_rows[h] = r
            map_index[h] = unique
            unique_rows[unique] = r
            for j in range(grads.shape[1]):
                sums[unique, j] = grads[i, j]
            unique += 1
        else:
            k = map_index[h]
            for j in range(grads.shape[1]):
                sums[k, j] += grads[i, j]
    return unique


# --------------------------------------------------------------------------------------------


class _Arena:
    """Dense entry storage; each array lives in its own anonymous memory map so that growing is
    an in-place ``mremap``: no copy, and pages beyond the used rows cost nothing until written.

    Only this object may hold the arrays across a ``resize`` (a live view would block it), so
    everything handed out of the table is a copy.
    """

    def __init__(self, width, capacity):
        self.width = width
        self._maps = {}
        self.resize(max(1, capacity))

    _DTYPES = {"keys": np.uint64, "rows": np.float32, "last_seen": np.uint32, "touched": np.uint8}

    @staticmethod
    def _map_size(nbytes):
        # Whole 2 MiB huge pages once big: mremap then keeps the map huge-page aligned, and huge
        # pages make the random row accesses far cheaper (fewer TLB misses).
        unit = _HUGE_PAGE if nbytes >= _HUGE_PAGE else mmap.PAGESIZE
        return max(unit, -(-nbytes // unit) * unit)

    def resize(self, capacity):
        # Use all the rows the (rounded-up) rows map holds: fewer, bigger growth steps.
        capacity = self._map_size(capacity * self.width * 4) // (self.width * 4)
        for name, dtype in self._DTYPES.items():
            shape = (capacity, self.width) if name == "rows" else (capacity,)
            nbytes = self._map_size(math.prod(shape) * np.dtype(dtype).itemsize)
            old_view = self.__dict__.pop(name, None)  # our view must go for the map to move
            old_map = self._maps.get(name)
            if old_map is not None:
                del old_view
                try:
                    old_map.resize(nbytes)
                    new_map = old_map
                except (OSError, SystemError, ValueError, TypeError):  # no mremap (not Linux)
                    new_map = None
            if old_map is None or new_map is None:
                new_map = _anonymous_map(nbytes)
                if old_map is not None:
                    kept = min(len(old_map), nbytes)
                    new_map[:kept] = old_map[:kept]
                    old_map.close()
            self._maps[name] = new_map
            setattr(self, name, np.frombuffer(new_map, dtype=dtype, count=math.prod(shape)).reshape(shape))
        self.capacity = capacity

    @property
    def nbytes(self):
        return sum(len(m) for m in self._maps.values())


def _anonymous_map(nbytes):
    # Private: a shared anonymous map would not grow its backing object on resize (SIGBUS).
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", getattr(mmap, "MAP_ANON", 0))
    memory = mmap.mmap(-1, nbytes, flags=flags) if flags else mmap.mmap(-1, nbytes)
    if hasattr(memory, "madvise") and hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)  # fewer page faults and TLB misses for big arenas
    return memory


def _aligned_empty(shape, dtype):
    """``np.empty`` whose data starts on a 64-byte boundary (a bucket is then one cache line)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + 64, dtype=np.uint8)
    offset = (-buffer.ctypes.data) % 64
    return buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def _as_fids(fids):
    fids = np.ascontiguousarray(fids, dtype=np.uint64)
    if fids.ndim != 1:
        raise ValueError(f"fids must be a 1-D array, got shape {fids.shape}")
    if fids.size and (fids == EMPTY_FID).any():
        raise ValueError("fid 0xFFFFFFFFFFFFFFFF is reserved (it marks empty index entries)")
    return fids


def _as_time(now):
    now = int(now)
    if not 0 <= now <= NEVER:
        raise ValueError(f"event time must be in [0, 2**32), got {now}")
    return now


def _derive_seed(seed, salt):
    return (int(seed) * 0x9E3779B97F4A7C15 + salt * 0xD1B54A32D192ED03 + 1) % 2**64 or 1


class EmbeddingTable:
    """Cuckoo hash table from uint64 fids to float32 rows ``[dim weights | optimizer slots]``.

    Args:
        dim: embedding dimension.
        optimizer: a ``ps.optimizers`` optimizer (default Adagrad with Monolith's defaults).
        capacity: number of entries to make room for up front (both grow on demand).
        slots: ``{slot: SlotConfig}`` overriding ``default_slot`` for those slots.
        default_slot: policy of every other slot (default: no threshold, never expires).
        filter: the ``FrequencyFilter`` to count sightings with; one of ``filter_bytes`` is made
            when some threshold is above 1 and none is given.
        init_scale: new weights are uniform in [-init_scale, init_scale), drawn from the fid and
            ``seed`` (so a replay creates the same values); 0 gives zeros.
        max_load: index load that triggers growth (4-entry buckets fill to ~0.96 before kicks fail).
        growth: index capacity factor of one growth step.
        channels: number of independent delta consumers (0 disables delta tracking).
        seed: seeds the hashes, the initial weights and the kick random walk.
    """

    def __init__(
        self,
        dim,
        optimizer=None,
        *,
        capacity=1024,
        slots=None,
        default_slot=SlotConfig(),
        filter=None,
        filter_bytes=1 << 20,
        init_scale=0.0,
        max_load=0.9,
        growth=1.5,
        channels=1,
        seed=0,
    ):
        if int(dim) < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if not 0.0 < max_load <= 1.0:
            raise ValueError(f"max_load must be in (0, 1], got {max_load}")
        if not growth > 1.0:
            raise ValueError(f"growth must be > 1, got {growth}")
        if not 0 <= int(channels) <= 8:
            raise ValueError(f"channels must be in [0, 8], got {channels}")
        self.dim = int(dim)
        self.optimizer = Adagrad() if optimizer is None else optimizer
        if not isinstance(self.optimizer, Optimizer):
            raise TypeError(f"optimizer must be a ps.optimizers.Optimizer, got {self.optimizer!r}")
        self.width = self.dim + self.optimizer.num_slots(self.dim)
        self.init_scale = float(init_scale)
        self.max_load = float(max_load)
        self.growth = float(growth)
        self.channels = int(channels)
        self.seed = int(seed)
        self.stats = TableStats()
        #: Largest event time given to any call: the default ``now`` of ``evict``.
        self.event_time = 0

        self.default_slot = default_slot
        self.slots = {int(s): c for s, c in (slots or {}).items()}
        for s in self.slots:
            if not 0 <= s < NUM_SLOTS:
                raise ValueError(f"slot must be in [0, {NUM_SLOTS}), got {s}")
        # Policy by slot id, for the kernels: entries up to the largest configured slot, then one
        # for the default, which every larger slot id is clamped to.
        size = max(self.slots, default=-1) + 2
        self._thresholds = np.full(size, default_slot.threshold, dtype=np.uint16)
        self._expiry = np.full(size, NEVER if default_slot.expiry is None else default_slot.expiry, np.uint32)
        for s, c in self.slots.items():
            self._thresholds[s] = c.threshold
            self._expiry[s] = NEVER if c.expiry is None else c.expiry
        self._any_expiry = bool((self._expiry != NEVER).any())

        max_threshold = int(self._thresholds.max())
        if filter is None and max_threshold > 1:
            filter = FrequencyFilter(memory_bytes=filter_bytes, counter="uint8" if max_threshold <= 255 else "uint16")
        if filter is not None and max_threshold > filter.max_count:
            raise ValueError(f"threshold {max_threshold} exceeds the filter's counter maximum {filter.max_count}")
        self.filter = filter

        self._hash_seeds = np.array([_derive_seed(seed, 1), _derive_seed(seed, 2)], dtype=np.uint64)
        self._init_seed = np.uint64(_derive_seed(seed, 3))
        self._rng = np.array([_derive_seed(seed, 4)], dtype=np.uint64)
        self._init_slots = self.optimizer.initial_slots(self.dim).astype(np.float32)
        self._touch_all = np.uint8((1 << self.channels) - 1)
        self._deleted = [[] for _ in range(self.channels)]  # per channel: arrays of removed fids
        self._deleted_count = 0
        self._count = 0
        capacity = max(1, int(capacity))
        self._arena = _Arena(self.width, capacity)
        self._allocate_index(math.ceil(capacity / self.max_load / BUCKET_SIZE))

    # ---------------------------------------------------------------- storage

    def _allocate_index(self, num_buckets):
        self._num_buckets = max(1, num_buckets)
        self._index = _aligned_empty((self._num_buckets * BUCKET_SIZE, 2), np.uint64)
        self._index[:, 0] = EMPTY_FID
        self._max_entries = int(self.max_load * self._index.shape[0])

    def _grow_index(self):
        """Rebuild the index ``growth`` times bigger from the arena keys (I4); rows stay put."""
        num_buckets = max(math.ceil(self._num_buckets * self.growth), self._num_buckets + 1)
        while True:
            self._allocate_index(num_buckets)
            if _build_index_kernel(self._arena.keys, self._count, self._index, self._num_buckets,
                                   self._hash_seeds, self._rng):  # fmt: skip
                break
            # Practically unreachable (> 8 keys sharing both buckets): new hashes, more room.
            self._hash_seeds = np.array([_derive_seed(s, 5) for s in self._hash_seeds.tolist()], dtype=np.uint64)
            num_buckets = math.ceil(num_buckets * self.growth)
        self.stats.rehashes += 1

    def _grow_arena(self, minimum):
        # Double while small, then steps of one huge page of rows, then ARENA_GROWTH: few resize
        # calls for small tables, little slack for big ones.
        capacity = self._arena.capacity
        step = max(capacity * (ARENA_GROWTH - 1), min(capacity, _HUGE_PAGE // (4 * self.width)))
        self._arena.resize(max(minimum, capacity + math.ceil(step)))

    def _find_rows(self, fids):
        row_ids = np.empty(fids.shape[0], dtype=np.intp)
        _find_kernel(fids, self._index, self._hash_seeds, self._num_buckets, row_ids)
        return row_ids

    def _upsert(self, fids, times, values, mode, touch_bits):
        """Insert-or-update through the kernel, growing whenever it asks; returns the row ids."""
        row_ids = np.empty(fids.shape[0], dtype=np.intp)
        start, created = 0, 0
        while True:
            a = self._arena
            outcome, start, self._count, made = _insert_kernel(
                fids, times, values, mode, np.uint8(touch_bits), self.dim, self._init_slots, self.init_scale,
                self._init_seed, self._index, self._num_buckets, self._hash_seeds, self._rng, self._max_entries,
                a.keys, a.rows, a.last_seen, a.touched, start, self._count, row_ids,
            )  # fmt: skip
            del a
            created += made
            if outcome == _DONE:
                break
            if outcome == _NEED_ARENA:
                self._grow_arena(self._count + 1)
            else:  # _NEED_INDEX, or _KICK_FAILED (the homeless entry's row is in the arena)
                self.stats.kick_failures += outcome == _KICK_FAILED
                self._grow_index()
        self.stats.rows_created += created
        return row_ids

    def _load(self, keys, rows, last_seen):
        """Fill an empty table with entries (unique keys) without touching them: snapshot restore."""
        n = keys.shape[0]
        if n > self._arena.capacity:
            self._arena.resize(n)
        a = self._arena
        a.keys[:n], a.rows[:n], a.last_seen[:n], a.touched[:n] = keys, rows, last_seen, 0
        del a
        self._count = n
        if n > self._max_entries:
            self._allocate_index(math.ceil(n / self.max_load / BUCKET_SIZE))
        if not _build_index_kernel(self._arena.keys, n, self._index, self._num_buckets, self._hash_seeds, self._rng):
            self._grow_index()

    def _log_deleted(self, fids):
        if self.channels and fids.size:
            for log in self._deleted:
                log.append(fids)
            self._deleted_count += fids.size * self.channels
            if self._deleted_count > max(1 << 16, 2 * self._count):
                # Bounded between delta() calls: keep each removed fid once, forget re-created ones.
                self._deleted_count = 0
                for c, log in enumerate(self._deleted):
                    pending = np.unique(np.concatenate(log))
                    self._deleted[c] = [pending[self._find_rows(pending) < 0]]
                    self._deleted_count += self._deleted[c][0].size

    # ---------------------------------------------------------------- public API

    def __len__(self):
        return self._count

    @property
    def capacity(self):
        """Number of entries the index holds (its load is ``len / capacity``)."""
        return self._index.shape[0]

    @property
    def load_factor(self):
        """Index load: ``len(table) / capacity``."""
        return self._count / self.capacity

    def memory_bytes(self):
        """Bytes held by this table: index, arena (as mapped), per-slot policy, filter, logs."""
        total = self._index.nbytes + self._arena.nbytes + self._thresholds.nbytes + self._expiry.nbytes
        total += self.filter.memory_bytes if self.filter is not None else 0
        return total + 8 * self._deleted_count  # removed fids waiting for delta()

    def payload_bytes_per_entry(self):
        """What an entry must store: key, row (weights and optimizer slots), last-seen time."""
        return 8 + 4 * self.width + 4

    def lookup(self, fids, full=False):
        """Rows of ``fids``: ``(values, found)``.

        ``values`` is float32 ``[n, dim]`` (``[n, width]`` with ``full=True``, optimizer slots
        included); a missing fid gets the initial value. ``found`` says which fids have a row.
        Read-only: it neither counts sightings nor updates last-seen times.
        """
        fids = _as_fids(fids)
        row_ids = np.empty(fids.shape[0], dtype=np.intp)
        out = np.empty((fids.shape[0], self.width if full else self.dim), dtype=np.float32)
        _lookup_kernel(fids, self._index, self._hash_seeds, self._num_buckets, self._arena.rows, self.dim,
                       self._init_slots, self.init_scale, self._init_seed, out, row_ids)  # fmt: skip
        return out, row_ids >= 0

    def insert(self, fids, now=0, weights=None):
        """Give each fid a row, bypassing the frequency filter; returns how many rows were new.

        ``weights`` (``[n, dim]`` weights, or ``[n, width]`` full rows) overwrite the rows of
        the fids (the last occurrence wins); without it existing rows are kept and new rows get
        the initial value. ``now`` (scalar or per fid) raises each row's last-seen time.
        """
        fids = _as_fids(fids)
        n = fids.shape[0]
        times = np.asarray(now)
        if times.ndim == 0:
            times = np.full(n, _as_time(now), dtype=np.uint32)
        else:
            if times.shape != (n,):
                raise ValueError(f"now must be a scalar or have shape ({n},), got {times.shape}")
            if times.size and (times.min() < 0 or times.max() > NEVER):
                raise ValueError("event times must be in [0, 2**32)")
            times = np.ascontiguousarray(times, dtype=np.uint32)
        if weights is None:
            mode, values = _INIT_ROWS, np.empty((0, self.width), dtype=np.float32)
        else:
            values = np.ascontiguousarray(weights, dtype=np.float32)
            if values.shape == (n, self.dim):
                mode = _SET_WEIGHTS
            elif values.shape == (n, self.width):
                mode = _SET_ROWS
            else:
                raise ValueError(
                    f"weights must have shape ({n}, {self.dim}) or ({n}, {self.width}), got {values.shape}"
                )
        if n:
            self.event_time = max(self.event_time, int(times.max()))
        before = self.stats.rows_created
        self._upsert(fids, times, values, mode, self._touch_all)
        return self.stats.rows_created - before

    def delete(self, fids):
        """Remove the rows of ``fids``; returns how many existed."""
        fids = _as_fids(fids)
        removed = np.empty(fids.shape[0], dtype=np.uint64)
        a = self._arena
        self._count, count = _delete_kernel(fids, self._index, self._hash_seeds, self._num_buckets, a.keys, a.rows,
                                            a.last_seen, a.touched, self._count, removed)  # fmt: skip
        self.stats.rows_deleted += count
        self._log_deleted(removed[:count])
        return count

    def admit(self, fids, now):
        """Count a sighting of each rowless fid; create rows for those reaching their threshold.

        Returns each occurrence's arena row id (-1 where it had no row *at that occurrence*),
        valid until the next delete or evict (I3). Rows seen get last-seen time ``now``.
        """
        fids = _as_fids(fids)
        now = _as_time(now)
        self.event_time = max(self.event_time, now)
        row_ids = np.empty(fids.shape[0], dtype=np.intp)
        a = self._arena
        _find_and_touch_kernel(fids, self._index, self._hash_seeds, self._num_buckets, a.last_seen, a.touched,
                               np.uint32(now), self._touch_all, row_ids)  # fmt: skip
        del a
        missing = np.flatnonzero(row_ids < 0)
        if missing.size:
            rowless = fids[missing]
            admitted = np.empty(missing.size, dtype=np.bool_)
            if self.filter is None:
                admitted.fill(True)
            else:
                f = self.filter
                _admission_kernel(rowless, self._thresholds, f.counts, f.row_seeds, f.max_count, admitted)
            if admitted.any():
                new = rowless[admitted]
                times = np.full(new.size, now, dtype=np.uint32)
                # New rows start seen at ``now`` and touched. Sightings before the threshold keep
                # -1: they had no row. Ids found above stay valid (I3: inserts move no row).
                row_ids[missing[admitted]] = self._upsert(new, times, np.empty((0, self.width), np.float32),
                                                          _INIT_ROWS, self._touch_all)  # fmt: skip
        return row_ids

    def apply_gradients(self, fids, grads, now):
        """One optimizer step per distinct fid that has (or, by the filter, gets) a row.

        ``grads`` is ``[n, dim]``; rows of repeated fids are summed first. Gradients of
        occurrences without a row are dropped and counted in ``stats.dropped_gradients``.
        Returns the number of rows updated.
        """
        fids = _as_fids(fids)
        grads = np.ascontiguousarray(grads, dtype=np.float32)
        if grads.shape != (fids.shape[0], self.dim):
            raise ValueError(f"grads must have shape ({fids.shape[0]}, {self.dim}), got {grads.shape}")
        row_ids = self.admit(fids, now)
        unique_rows = np.empty(fids.shape[0], dtype=np.intp)
        sums = np.empty_like(grads)
        unique = _sum_by_row_kernel(row_ids, grads, unique_rows, sums)
        self.stats.dropped_gradients += int((row_ids < 0).sum())
        self.optimizer.apply(self._arena.rows, unique_rows[:unique], sums[:unique], self.dim)
        return unique

    def evict(self, now=None):
        """Remove rows unseen for longer than their slot's expiry at event time ``now``
        (default: the largest event time seen); returns how many were removed."""
        now = self.event_time if now is None else _as_time(now)
        if not self._any_expiry or self._count == 0:
            return 0
        removed = np.empty(self._count, dtype=np.uint64)
        a = self._arena
        self._count, count = _evict_kernel(np.int64(now), self._expiry, self._index, self._hash_seeds,
                                           self._num_buckets, a.keys, a.rows, a.last_seen, a.touched,
                                           self._count, removed)  # fmt: skip
        self._log_deleted(removed[:count].copy())
        self.stats.rows_evicted += count
        return count

    def delta(self, channel=0, full=False):
        """Rows written and fids removed since the previous ``delta(channel)``; clears them.

        A fid removed and then re-created is reported as written, not deleted. With ``full``
        the rows include the optimizer slots (enough to rebuild a training table).
        """
        if not 0 <= channel < self.channels:
            raise ValueError(f"channel must be in [0, {self.channels}), got {channel}")
        a, bit = self._arena, np.uint8(1 << channel)
        row_ids = np.flatnonzero(a.touched[: self._count] & bit)
        a.touched[row_ids] &= ~bit
        rows = a.rows[row_ids] if full else a.rows[row_ids, : self.dim]
        log = self._deleted[channel]
        self._deleted[channel] = []
        self._deleted_count -= sum(x.size for x in log)  # per-channel sizes add up to the total
        deleted = np.unique(np.concatenate(log)) if log else np.empty(0, dtype=np.uint64)
        if deleted.size:
            deleted = deleted[self._find_rows(deleted) < 0]
        return Delta(a.keys[row_ids], np.ascontiguousarray(rows), a.last_seen[row_ids], deleted)

    def set_channels(self, channels):
        """Change the number of delta channels. Channels kept keep what they have pending;
        a new channel starts with nothing pending (its consumer must start from the whole
        table, e.g. the PS reconciling a store view after a restore)."""
        channels = int(channels)
        if not 0 <= channels <= 8:
            raise ValueError(f"channels must be in [0, 8], got {channels}")
        keep = np.uint8((1 << min(channels, self.channels)) - 1)
        self._arena.touched[: self._count] &= keep
        self._deleted = (self._deleted + [[] for _ in range(channels)])[:channels]
        self._deleted_count = sum(x.size for log in self._deleted for x in log)
        self.channels = channels
        self._touch_all = np.uint8((1 << channels) - 1)

    def apply_delta(self, delta):
        """Make this table follow another's ``delta()``: upsert its rows, delete its deletions."""
        if delta.fids.size:
            self.insert(delta.fids, now=delta.last_seen, weights=delta.weights)
        return self.delete(delta.deleted)

    def items(self, batch_size=65536):
        """Iterate over all entries in batches of copies ``(fids, rows [k, width], last_seen)``.
        The table must not be changed while iterating."""
        a = self._arena
        for start in range(0, self._count, batch_size):
            stop = min(start + batch_size, self._count)
            yield a.keys[start:stop].copy(), a.rows[start:stop].copy(), a.last_seen[start:stop].copy()

    def config(self):
        """JSON-able constructor arguments (capacity excluded)."""
        return {
            "dim": self.dim,
            "optimizer": self.optimizer.config(),
            "slots": {str(s): dataclasses.asdict(c) for s, c in sorted(self.slots.items())},
            "default_slot": dataclasses.asdict(self.default_slot),
            "filter": None if self.filter is None else self.filter.config(),
            "init_scale": self.init_scale,
            "max_load": self.max_load,
            "growth": self.growth,
            "channels": self.channels,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, capacity=1024):
        """A new, empty table built from ``config()``."""
        config = dict(config)
        config["optimizer"] = optimizer_from_config(config["optimizer"])
        config["slots"] = {int(s): SlotConfig(**c) for s, c in config["slots"].items()}
        config["default_slot"] = SlotConfig(**config["default_slot"])
        if config["filter"] is not None:
            config["filter"] = FrequencyFilter(**config["filter"])
        return cls(capacity=capacity, **config)

    def to_bytes(self):
        """The table as bytes: a ``ps.envelope`` of kind ``"table"``.

        Its header holds the config, entry count, row width, event time and stats; its arrays
        are the entries only (``keys`` uint64[n], ``rows`` float32[n, width], ``last_seen``
        uint32[n]) and the filter counters, not the hash index, so the bytes restore into a
        table of any capacity. Everything that defines the table's behaviour round-trips
        exactly; pending deltas do not (a restored table starts with nothing touched).

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
        embedding table snapshot is truncated: expected ... bytes, got ...

        Returns:
            The bytes, read back by :meth:`from_bytes`.
        """
        n, arena = len(self), self._arena
        arrays = {"keys": arena.keys[:n], "rows": arena.rows[:n], "last_seen": arena.last_seen[:n]}
        if self.filter is not None:
            arrays["filter"] = self.filter.counts
        return seal_arrays("table", arrays, config=self.config(), count=n, width=self.width,
                           event_time=self.event_time, stats=vars(self.stats))

    @classmethod
    def from_bytes(cls, data, capacity=None):
        """Restore :meth:`to_bytes` output.

        Args:
            data: the bytes.
            capacity: entries to make room for (default: the snapshot's size).

        Returns:
            The table.

        Raises:
            SnapshotError: the bytes are damaged, of another kind, or inconsistent.
        """
        envelope = open_envelope(data, "table")
        arrays, header = envelope.arrays(), envelope.header
        try:
            count, width, config = int(header["count"]), int(header["width"]), header["config"]
            keys, rows, last_seen = arrays["keys"], arrays["rows"], arrays["last_seen"]
            event_time, stats = int(header["event_time"]), TableStats(**header["stats"])
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotError(f"embedding table snapshot header is malformed: {e!r}") from None
        if keys.shape != (count,) or rows.shape != (count, width) or last_seen.shape != (count,):
            raise SnapshotError("embedding table snapshot sections do not match its entry count "
                                "and row width")
        if count and (keys == EMPTY_FID).any():
            raise SnapshotError("embedding table snapshot holds the reserved fid 0xFFFFFFFFFFFFFFFF")
        table = cls.from_config(config, capacity=max(count, int(capacity or 0)))
        if table.width != width:
            raise SnapshotError(f"embedding table snapshot row width {width} does not match its "
                                f"config (width {table.width})")
        if count and np.unique(keys).size != count:
            raise SnapshotError("embedding table snapshot holds duplicate keys")
        table._load(keys.astype(np.uint64, copy=False), rows.astype(np.float32, copy=False),
                    last_seen.astype(np.uint32, copy=False))
        if table.filter is not None:
            counts = arrays.get("filter")
            if counts is None or counts.shape != table.filter.counts.shape:
                raise SnapshotError("embedding table snapshot filter counters are missing or do "
                                    "not match the filter config")
            table.filter.counts[...] = counts
        table.event_time, table.stats = event_time, stats
        return table

    def __reduce__(self):  # pickling goes through the snapshot format
        return (EmbeddingTable.from_bytes, (self.to_bytes(),))

    def __repr__(self):
        return (
            f"EmbeddingTable(dim={self.dim}, optimizer={self.optimizer!r}, len={len(self)}, "
            f"capacity={self.capacity}, load={self.load_factor:.3f})"
        )
