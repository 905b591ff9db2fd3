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
Cuckoo hashing with two hash functions and buckets of ``BUCKET_SIZE`` (8) slots: a fid lives in
one of the 16 slots of its two buckets, so a lookup reads two 64-byte cache lines of keys and one
row. Loads above 0.95 are reachable; growth happens at ``max_load``.

I1  Storage is four parallel arrays indexed by *position* ``p`` in ``[0, capacity)``:
    ``keys[p]`` (uint64), ``rows[p]`` (float32 ``[dim weights | optimizer slots]``),
    ``last_seen[p]`` (uint32 event time), ``touched[p]`` (uint8, one bit per delta channel).
    ``capacity = num_buckets * BUCKET_SIZE``; bucket ``b`` owns positions ``[b*8, b*8 + 8)``.
    There is no separate index: the row of a key is at the key's position, so the only
    per-entry overhead beyond the payload is the 1-byte ``touched`` and the empty slots.
I2  ``keys[p] == EMPTY_FID`` (all ones) iff position ``p`` is free. A free position's row and
    ``last_seen`` are garbage and its ``touched`` is 0. ``EMPTY_FID`` is rejected as a fid.
I3  A key is stored at most once, in ``bucket(key, seed0)`` or ``bucket(key, seed1)``.
I4  ``len(table)`` counts the non-free positions and never exceeds ``max_load * capacity``:
    an insert that would pass the bound, or whose cuckoo kicks fail, first grows the table by
    ``growth`` (a full rehash into new arrays, rows, times and touched bits moving with keys).
I5  Kicks and growth move rows. So a position is valid only until the next insert or growth:
    every method finds positions again after inserting, never across a mutation.
I6  Bit ``c`` of ``touched[p]`` is set iff the row at ``p`` was written since the last
    ``delta(channel=c)``; fids removed since then (delete/evict) are kept in a per-channel log.
I7  Everything is deterministic given the seed and the calls (no wall clock, no global RNG):
    the kick random walk has its own xorshift state, expiry uses the event times it is given.

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
from typing import NamedTuple

import numpy as np

from ._jit import EMPTY_FID, mix64, njit, prefetch, reduce_range
from .frequency_filter import FrequencyFilter, sketch_estimate, sketch_increment
from .optimizers import Adagrad, Optimizer, optimizer_from_config

__all__ = ["EmbeddingTable", "SlotConfig", "Delta", "TableStats", "slot_of", "EMPTY_FID", "BUCKET_SIZE"]

BUCKET_SIZE = 8  # 8 uint64 keys = one 64-byte cache line
NUM_SLOTS = 1 << 16  # slot = fid >> 48 (Monolith v2 uses 15 bits; bit 63 is tolerated)
NEVER = 0xFFFF_FFFF  # an expiry this large never fires: uint32 event-time differences are smaller
MAX_KICKS = 500  # length of the cuckoo random walk before giving up and growing
_PREFETCH = 8  # keys looked up ahead of the current one (measured: 8 beats 16, 32, 64 here)
_ALIGN = 64

# insert kernel outcomes
_DONE, _NEED_ROOM, _KICK_FAILED = 0, 1, 2
# what the insert kernel writes into rows
_INIT_ROWS, _SET_WEIGHTS, _SET_ROWS = 0, 1, 2


def slot_of(fids):
    """Slot of each fid (Monolith v2 layout: the bits above the 48-bit hash)."""
    return np.asarray(fids, dtype=np.uint64) >> np.uint64(48)


@dataclasses.dataclass(frozen=True)
class SlotConfig:
    """Per-slot policy. ``threshold``: sightings before a fid gets a row (0 or 1: at once).
    ``expiry``: event-time units a row may stay unseen before ``evict`` removes it (None: never).
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
    rehashes: int = 0


# --------------------------------------------------------------------------------------------
# Kernels. Plain loops compiled by numba; each is a step a newcomer can check against the
# invariants above. Arrays come in, scalars and arrays go out; no Python objects inside.
# --------------------------------------------------------------------------------------------


@njit(inline="always")
def _bucket(key, seed, num_buckets):
    return reduce_range(mix64(key, seed), num_buckets)


@njit(inline="always")
def _prefetch_buckets(keys, key, seeds, num_buckets):
    prefetch(keys, _bucket(key, seeds[0], num_buckets) * BUCKET_SIZE)
    prefetch(keys, _bucket(key, seeds[1], num_buckets) * BUCKET_SIZE)


@njit(inline="always")
def _find(keys, key, seeds, num_buckets):
    """Position of ``key`` or -1 (I3: only its two buckets can hold it)."""
    base = _bucket(key, seeds[0], num_buckets) * BUCKET_SIZE
    for j in range(BUCKET_SIZE):
        if keys[base + j] == key:
            return base + j
    base = _bucket(key, seeds[1], num_buckets) * BUCKET_SIZE
    for j in range(BUCKET_SIZE):
        if keys[base + j] == key:
            return base + j
    return -1


@njit(inline="always")
def _free_position(keys, bucket_a, bucket_b):
    """A free position in the emptier of the two buckets, or -1 if both are full."""
    free_a, first_a, free_b, first_b = 0, -1, 0, -1
    for j in range(BUCKET_SIZE):
        if keys[bucket_a * BUCKET_SIZE + j] == EMPTY_FID:
            free_a += 1
            if first_a < 0:
                first_a = bucket_a * BUCKET_SIZE + j
        if keys[bucket_b * BUCKET_SIZE + j] == EMPTY_FID:
            free_b += 1
            if first_b < 0:
                first_b = bucket_b * BUCKET_SIZE + j
    if free_a >= free_b and free_a > 0:
        return first_a
    return first_b


@njit(inline="always")
def _xorshift(rng):
    x = rng[0]
    x ^= x << np.uint64(13)
    x ^= x >> np.uint64(7)
    x ^= x << np.uint64(17)
    rng[0] = x
    return x


@njit(inline="always")
def _write(keys, rows, last_seen, touched, p, key, row, time, bits):
    keys[p] = key
    rows[p, :] = row
    last_seen[p] = time
    touched[p] = bits


@njit
def _place(keys, rows, last_seen, touched, num_buckets, seeds, rng, key, row, time, bits):
    """Store a new entry (``key`` not present) in one of its buckets, kicking others if needed.

    Returns ``(placed, key, time, bits)``. On failure the returned entry, whose row is left in
    ``row``, is one that was kicked out and found no place: the caller must grow and re-insert it.
    """
    bucket_a = _bucket(key, seeds[0], num_buckets)
    bucket_b = _bucket(key, seeds[1], num_buckets)
    p = _free_position(keys, bucket_a, bucket_b)
    if p >= 0:
        _write(keys, rows, last_seen, touched, p, key, row, time, bits)
        return True, key, time, bits
    # Random-walk cuckoo: swap the entry with a random occupant, then move that occupant to
    # its other bucket, until some bucket on the way has a free slot.
    bucket = bucket_a if _xorshift(rng) & np.uint64(1) else bucket_b
    width = rows.shape[1]
    for _ in range(MAX_KICKS):
        victim = bucket * BUCKET_SIZE + np.intp(_xorshift(rng) % np.uint64(BUCKET_SIZE))
        victim_key, victim_time, victim_bits = keys[victim], last_seen[victim], touched[victim]
        for j in range(width):
            value = rows[victim, j]
            rows[victim, j] = row[j]
            row[j] = value
        keys[victim], last_seen[victim], touched[victim] = key, time, bits
        key, time, bits = victim_key, victim_time, victim_bits
        first = _bucket(key, seeds[0], num_buckets)
        bucket = _bucket(key, seeds[1], num_buckets) if first == bucket else first
        for j in range(BUCKET_SIZE):
            if keys[bucket * BUCKET_SIZE + j] == EMPTY_FID:
                _write(keys, rows, last_seen, touched, bucket * BUCKET_SIZE + j, key, row, time, bits)
                return True, key, time, bits
    return False, key, time, bits


@njit(inline="always")
def _initial_weight(fid, j, scale, seed):
    """Weight ``j`` of a new row for ``fid``: 0, or uniform in [-scale, scale) drawn from the fid."""
    if scale == 0.0:
        return np.float32(0.0)
    u = np.float64(mix64(fid, seed + np.uint64(j) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(11)) * 2.0**-53
    return np.float32((2.0 * u - 1.0) * scale)


@njit
def _find_kernel(fids, keys, seeds, num_buckets, positions):
    n = fids.shape[0]
    for i in range(min(_PREFETCH, n)):
        _prefetch_buckets(keys, fids[i], seeds, num_buckets)
    for i in range(n):
        if i + _PREFETCH < n:
            _prefetch_buckets(keys, fids[i + _PREFETCH], seeds, num_buckets)
        positions[i] = _find(keys, fids[i], seeds, num_buckets)


@njit
def _gather_kernel(fids, positions, rows, dim, init_slots, init_scale, init_seed, out):
    """``out[i] = rows[positions[i], :ncols]``, or the initial value where the position is -1."""
    ncols = out.shape[1]
    width = rows.shape[1]
    flat = rows.reshape(-1)
    n = fids.shape[0]
    for i in range(n):
        ahead = i + _PREFETCH
        if ahead < n and positions[ahead] >= 0:
            prefetch(flat, positions[ahead] * width)
            prefetch(flat, positions[ahead] * width + ncols - 1)
        p = positions[i]
        if p >= 0:
            for j in range(ncols):
                out[i, j] = rows[p, j]
        else:
            for j in range(dim):
                out[i, j] = _initial_weight(fids[i], j, init_scale, init_seed)
            for j in range(dim, ncols):
                out[i, j] = init_slots[j - dim]


@njit
def _insert_kernel(
    fids, times, values, mode, touch_bits, dim, init_slots, init_scale, init_seed,
    keys, rows, last_seen, touched, num_buckets, seeds, rng, start, count, max_count, carry_row,
):  # fmt: skip
    """Upsert ``fids[start:]``. ``mode``: _INIT_ROWS (new rows get initial values, existing rows
    keep theirs), _SET_WEIGHTS (``values`` are weights) or _SET_ROWS (``values`` are full rows).

    Returns ``(outcome, next_index, count, created, carry_key, carry_time, carry_bits)``; the
    caller grows on _NEED_ROOM / _KICK_FAILED (the homeless entry's row is in ``carry_row``) and
    calls again from ``next_index``.
    """
    n = fids.shape[0]
    width = rows.shape[1]
    row = np.empty(width, dtype=np.float32)
    created = 0
    for i in range(start, min(start + _PREFETCH, n)):
        _prefetch_buckets(keys, fids[i], seeds, num_buckets)
    for i in range(start, n):
        if i + _PREFETCH < n:
            _prefetch_buckets(keys, fids[i + _PREFETCH], seeds, num_buckets)
        key = fids[i]
        p = _find(keys, key, seeds, num_buckets)
        if p >= 0:
            if mode == _SET_WEIGHTS:
                rows[p, :dim] = values[i, :]
            elif mode == _SET_ROWS:
                rows[p, :] = values[i, :]
            if times[i] > last_seen[p]:
                last_seen[p] = times[i]
            touched[p] |= touch_bits
            continue
        if count >= max_count:
            return _NEED_ROOM, i, count, created, key, np.uint32(0), np.uint8(0)
        if mode == _SET_ROWS:
            row[:] = values[i, :]
        else:
            if mode == _SET_WEIGHTS:
                row[:dim] = values[i, :]
            else:
                for j in range(dim):
                    row[j] = _initial_weight(key, j, init_scale, init_seed)
            row[dim:] = init_slots
        placed, carry_key, carry_time, carry_bits = _place(
            keys, rows, last_seen, touched, num_buckets, seeds, rng, key, row, times[i], touch_bits
        )
        count += 1
        created += 1
        if not placed:
            carry_row[:] = row
            return _KICK_FAILED, i + 1, count, created, carry_key, carry_time, carry_bits
    return _DONE, n, count, created, EMPTY_FID, np.uint32(0), np.uint8(0)


@njit
def _rehash_kernel(src_keys, src_rows, src_last_seen, src_touched, keys, rows, last_seen, touched, num_buckets, seeds, rng):
    """Move every entry of the source arrays into the (empty) destination; False if one failed."""
    row = np.empty(rows.shape[1], dtype=np.float32)
    for p in range(src_keys.shape[0]):
        if src_keys[p] == EMPTY_FID:
            continue
        row[:] = src_rows[p, :]
        placed, _, _, _ = _place(
            keys, rows, last_seen, touched, num_buckets, seeds, rng, src_keys[p], row, src_last_seen[p], src_touched[p]
        )
        if not placed:
            return False
    return True


@njit
def _admission_kernel(fids, thresholds, counts, seeds, maximum, admitted):
    """For rowless fids, in batch order: does this occurrence reach its slot's threshold?

    A fid whose count already reached the threshold (admitted before, then evicted) is admitted
    without counting; otherwise the sighting is counted first.
    """
    for i in range(fids.shape[0]):
        fid = fids[i]
        threshold = thresholds[np.intp(fid >> np.uint64(48))]
        if threshold <= 1:
            admitted[i] = True
        elif sketch_estimate(counts, seeds, fid) >= threshold:
            admitted[i] = True
        else:
            admitted[i] = sketch_increment(counts, seeds, fid, maximum) >= threshold


@njit
def _touch_kernel(positions, last_seen, touched, time, bits):
    for i in range(positions.shape[0]):
        p = positions[i]
        if p >= 0:
            if last_seen[p] < time:
                last_seen[p] = time
            touched[p] |= bits


@njit
def _sum_by_position_kernel(positions, grads, unique_positions, sums):
    """Sum the gradient rows that share a position (skipping -1); returns the number of unique
    positions, written in first-occurrence order. Uses a small open-addressing map sized 2n."""
    n = positions.shape[0]
    size = 1
    while size < 2 * n:
        size *= 2
    map_positions = np.full(size, -1, dtype=np.intp)
    map_index = np.empty(size, dtype=np.intp)
    mask = np.uint64(size - 1)
    unique = 0
    for i in range(n):
        p = positions[i]
        if p < 0:
            continue
        h = np.intp((np.uint64(p) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)) & np.intp(mask)
        while map_positions[h] >= 0 and map_positions[h] != p:
            h = (h + 1) & np.intp(mask)
        if map_positions[h] < 0:
            map_positions[h] = p
            map_index[h] = unique
            unique_positions[unique] = p
            sums[unique, :] = grads[i, :]
            unique += 1
        else:
            k = map_index[h]
            for j in range(grads.shape[1]):
                sums[k, j] += grads[i, j]
    return unique


@njit
def _delete_kernel(fids, keys, touched, seeds, num_buckets, removed):
    """Free the positions of ``fids``; returns how many were present (written to ``removed``)."""
    count = 0
    for i in range(fids.shape[0]):
        p = _find(keys, fids[i], seeds, num_buckets)
        if p >= 0:
            removed[count] = keys[p]
            keys[p] = EMPTY_FID
            touched[p] = 0
            count += 1
    return count


@njit
def _expired_kernel(keys, last_seen, expiry_by_slot, now, out):
    """Positions whose row is unseen for longer than its slot's expiry; returns their number."""
    count = 0
    for p in range(keys.shape[0]):
        key = keys[p]
        if key == EMPTY_FID:
            continue
        expiry = expiry_by_slot[np.intp(key >> np.uint64(48))]
        if expiry != NEVER and now - np.int64(last_seen[p]) > expiry:
            out[count] = p
            count += 1
    return count


# --------------------------------------------------------------------------------------------


def _aligned_empty(shape, dtype):
    """``np.empty`` whose data starts on a 64-byte boundary (a bucket is then one cache line)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buffer = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    offset = (-buffer.ctypes.data) % _ALIGN
    return buffer[offset : offset + nbytes].view(dtype).reshape(shape)


def _as_fids(fids):
    fids = np.ascontiguousarray(fids, dtype=np.uint64)
    if fids.ndim != 1:
        raise ValueError(f"fids must be a 1-D array, got shape {fids.shape}")
    if fids.size and (fids == EMPTY_FID).any():
        raise ValueError("fid 0xFFFFFFFFFFFFFFFF is reserved (it marks empty slots)")
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
        capacity: initial number of slots (rounded up to whole buckets of 8).
        slots: ``{slot: SlotConfig}`` overriding ``default_slot`` for those slots.
        default_slot: policy of every other slot (default: no threshold, never expires).
        filter: the ``FrequencyFilter`` to count sightings with; one of ``filter_bytes`` is made
            when some threshold is above 1 and none is given.
        init_scale: new weights are uniform in [-init_scale, init_scale), drawn from the fid and
            ``seed`` (so a replay creates the same values); 0 gives zeros.
        max_load: grow before the load passes this (cuckoo with 8-slot buckets holds > 0.97).
        growth: capacity factor of one growth step.
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
        max_load=0.95,
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
        self._thresholds = np.full(NUM_SLOTS, default_slot.threshold, dtype=np.uint16)
        self._expiry = np.full(NUM_SLOTS, NEVER if default_slot.expiry is None else default_slot.expiry, np.uint32)
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
        self._allocate(max(1, math.ceil(int(capacity) / BUCKET_SIZE)))

    # ---------------------------------------------------------------- storage

    def _allocate(self, num_buckets):
        capacity = num_buckets * BUCKET_SIZE
        self._num_buckets = num_buckets
        self._keys = _aligned_empty(capacity, np.uint64)
        self._keys.fill(EMPTY_FID)
        self._rows = _aligned_empty((capacity, self.width), np.float32)
        self._last_seen = np.zeros(capacity, dtype=np.uint32)
        self._touched = np.zeros(capacity, dtype=np.uint8)
        self._count = 0
        self._max_count = min(capacity, int(self.max_load * capacity))

    def _grow(self, carry=None, minimum_buckets=0):
        """Rehash everything (and the homeless ``carry`` entry, if any) into bigger arrays (I4)."""
        old = self._keys, self._rows, self._last_seen, self._touched
        count = self._count
        num_buckets = max(minimum_buckets, math.ceil(self._num_buckets * self.growth), self._num_buckets + 1)
        while True:
            self._allocate(num_buckets)
            placed = _rehash_kernel(*old, self._keys, self._rows, self._last_seen, self._touched,
                                    self._num_buckets, self._hash_seeds, self._rng)  # fmt: skip
            if placed and carry is not None:
                key, row, time, bits = carry
                placed = _place(self._keys, self._rows, self._last_seen, self._touched, self._num_buckets,
                                self._hash_seeds, self._rng, np.uint64(key), row.copy(), np.uint32(time),
                                np.uint8(bits))[0]  # fmt: skip
            if placed:
                break
            # Practically unreachable (needs > 16 keys sharing both buckets): new hashes, more room.
            self._hash_seeds = np.array([_derive_seed(s, 5) for s in self._hash_seeds.tolist()], dtype=np.uint64)
            num_buckets = math.ceil(num_buckets * self.growth)
        self._count = count
        self.stats.rehashes += 1

    def _find_positions(self, fids):
        positions = np.empty(fids.shape[0], dtype=np.intp)
        _find_kernel(fids, self._keys, self._hash_seeds, self._num_buckets, positions)
        return positions

    def _upsert(self, fids, times, values, mode, touch_bits):
        """Insert-or-update through the kernel, growing whenever it asks; returns rows created."""
        carry_row = np.empty(self.width, dtype=np.float32)
        start, created = 0, 0
        while True:
            outcome, start, self._count, made, carry_key, carry_time, carry_bits = _insert_kernel(
                fids, times, values, mode, np.uint8(touch_bits), self.dim, self._init_slots, self.init_scale,
                self._init_seed, self._keys, self._rows, self._last_seen, self._touched, self._num_buckets,
                self._hash_seeds, self._rng, start, self._count, self._max_count, carry_row,
            )  # fmt: skip
            created += made
            if outcome == _DONE:
                break
            if outcome == _NEED_ROOM:
                self._grow()
            else:
                self._grow(carry=(carry_key, carry_row, carry_time, carry_bits))
        self.stats.rows_created += created
        return created

    def _log_deleted(self, fids):
        if self.channels and fids.size:
            for log in self._deleted:
                log.append(fids)
            self._deleted_count += fids.size

    # ---------------------------------------------------------------- public API

    def __len__(self):
        return self._count

    @property
    def capacity(self):
        """Number of slots (rows) currently allocated."""
        return self._keys.shape[0]

    @property
    def load_factor(self):
        return self._count / self.capacity

    def memory_bytes(self):
        """Bytes held by this table: entry arrays, per-slot policy, filter and deletion logs."""
        total = self._keys.nbytes + self._rows.nbytes + self._last_seen.nbytes + self._touched.nbytes
        total += self._thresholds.nbytes + self._expiry.nbytes
        total += self.filter.memory_bytes if self.filter is not None else 0
        return total + 8 * self._deleted_count

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
        positions = self._find_positions(fids)
        out = np.empty((fids.shape[0], self.width if full else self.dim), dtype=np.float32)
        _gather_kernel(fids, positions, self._rows, self.dim, self._init_slots, self.init_scale, self._init_seed, out)
        return out, positions >= 0

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
                raise ValueError(f"weights must have shape ({n}, {self.dim}) or ({n}, {self.width}), got {values.shape}")
        if n:
            self.event_time = max(self.event_time, int(times.max()))
        return self._upsert(fids, times, values, mode, self._touch_all)

    def delete(self, fids):
        """Remove the rows of ``fids``; returns how many existed."""
        fids = _as_fids(fids)
        removed = np.empty(fids.shape[0], dtype=np.uint64)
        count = _delete_kernel(fids, self._keys, self._touched, self._hash_seeds, self._num_buckets, removed)
        self._count -= count
        self.stats.rows_deleted += count
        self._log_deleted(removed[:count])
        return count

    def admit(self, fids, now):
        """Count a sighting of each rowless fid; create rows for those reaching their threshold.

        Returns the positions of each occurrence's row (-1 where it had none *at that
        occurrence*), valid until the next mutation (I5). Rows seen get last-seen ``now``.
        """
        fids = _as_fids(fids)
        now = _as_time(now)
        self.event_time = max(self.event_time, now)
        positions = self._find_positions(fids)
        missing = np.flatnonzero(positions < 0)
        if missing.size:
            rowless = fids[missing]
            admitted = np.empty(missing.size, dtype=np.bool_)
            if self.filter is None:
                admitted.fill(True)
            else:
                f = self.filter
                _admission_kernel(rowless, self._thresholds, f.counts, f.row_seeds, f.max_count, admitted)
            if admitted.any():
                times = np.full(missing.size, now, dtype=np.uint32)
                self._upsert(rowless[admitted], times[admitted], np.empty((0, self.width), np.float32),
                             _INIT_ROWS, self._touch_all)  # fmt: skip
                positions = self._find_positions(fids)  # I5: inserting may have moved rows
                positions[missing[~admitted]] = -1  # sightings before the threshold had no row
        _touch_kernel(positions, self._last_seen, self._touched, np.uint32(now), self._touch_all)
        return positions

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
        positions = self.admit(fids, now)
        unique_positions = np.empty(fids.shape[0], dtype=np.intp)
        sums = np.empty_like(grads)
        unique = _sum_by_position_kernel(positions, grads, unique_positions, sums)
        self.stats.dropped_gradients += int((positions < 0).sum())
        self.optimizer.apply(self._rows, unique_positions[:unique], sums[:unique], self.dim)
        return unique

    def evict(self, now=None):
        """Remove rows unseen for longer than their slot's expiry at event time ``now``
        (default: the largest event time seen); returns how many were removed."""
        now = self.event_time if now is None else _as_time(now)
        if not self._any_expiry or self._count == 0:
            return 0
        positions = np.empty(self._count, dtype=np.intp)
        count = _expired_kernel(self._keys, self._last_seen, self._expiry, np.int64(now), positions)
        positions = positions[:count]
        self._log_deleted(self._keys[positions])
        self._keys[positions] = EMPTY_FID
        self._touched[positions] = 0
        self._count -= count
        self.stats.rows_evicted += count
        return count

    def delta(self, channel=0, full=False):
        """Rows written and fids removed since the previous ``delta(channel)``; clears them.

        A fid removed and then re-created is reported as written, not deleted. With ``full``
        the rows include the optimizer slots (enough to rebuild a training table).
        """
        if not 0 <= channel < self.channels:
            raise ValueError(f"channel must be in [0, {self.channels}), got {channel}")
        bit = np.uint8(1 << channel)
        positions = np.flatnonzero(self._touched & bit)
        self._touched[positions] &= ~bit
        fids = self._keys[positions]
        rows = self._rows[positions] if full else self._rows[positions, : self.dim]
        log = self._deleted[channel]
        self._deleted[channel] = []
        self._deleted_count -= sum(a.size for a in log)
        deleted = np.unique(np.concatenate(log)) if log else np.empty(0, dtype=np.uint64)
        if deleted.size:
            deleted = deleted[self._find_positions(deleted) < 0]
        return Delta(fids, np.ascontiguousarray(rows), self._last_seen[positions], deleted)

    def apply_delta(self, delta):
        """Make this table follow another's ``delta()``: upsert its rows, delete its deletions."""
        if delta.fids.size:
            self.insert(delta.fids, now=delta.last_seen, weights=delta.weights)
        return self.delete(delta.deleted)

    def items(self, batch_size=65536):
        """Iterate over all entries in batches of ``(fids, rows [k, width], last_seen)``."""
        positions = np.flatnonzero(self._keys != EMPTY_FID)
        for start in range(0, positions.size, batch_size):
            chunk = positions[start : start + batch_size]
            yield self._keys[chunk], self._rows[chunk], self._last_seen[chunk]

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
        """Versioned, checksummed snapshot (see ``ps.snapshot``)."""
        from .snapshot import table_to_bytes

        return table_to_bytes(self)

    @classmethod
    def from_bytes(cls, data, capacity=None):
        """Restore a snapshot into a table of ``capacity`` slots (grown if too small)."""
        from .snapshot import table_from_bytes

        return table_from_bytes(data, capacity=capacity)

    def __repr__(self):
        return (
            f"EmbeddingTable(dim={self.dim}, optimizer={self.optimizer!r}, len={len(self)}, "
            f"capacity={self.capacity}, load={self.load_factor:.3f})"
        )
