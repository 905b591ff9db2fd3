"""SparseShard and DenseShard: the parameter-server DoFns, exactly-once through Beam state.

``SparseShard`` is keyed by shard id and owns the embedding rows of the fids
``ps.sharding.shard_of`` gives it, one ``EmbeddingTable`` per table name; ``DenseShard``
is keyed by a constant and owns the dense weights. Both apply gradient batches, keep their
state in Beam state (so Flink checkpoints it), and publish what changed to a
``ps.store.ParameterStore`` every sync interval (event time), where workers read it.

    grads | beam.ParDo(SparseShard("memory://train", num_shards=4, tables={"dim8": 8}))
    dense | beam.ParDo(DenseShard("memory://train", name="dense", initial_params=params))

State layout (per key) and why
------------------------------
A Python ``ReadModifyWriteState`` on Flink is a bag whose whole value is re-sent at every
bundle commit (and the SDK state cache is off by default), so the table cannot live in one
value. Per key there are three cells:

* ``base``    (``ReadModifyWriteState[bytes]``): a snapshot of the whole shard: every table's
  ``EmbeddingTable.to_bytes()`` (rows, optimizer slots, last-seen times, filter counters)
  plus ``{seq, ts_ms, last_evict_s}`` (``DenseShard``: params + optimizer slots). Absent
  until the first compaction.
* ``log``     (``BagState[bytes]``): the entries applied since the base, each with its sequence
  number: a gradient batch as received (``SparseShard``: table, fids, grads, ts_ms;
  ``DenseShard``: the gradient arrays) or an eviction marker with its event time ``now``.
* ``version`` (``ReadModifyWriteState[varint]``): a random 63-bit token, replaced at every
  state change (0 / absent: the key has no state).

A bundle writes only what changed: one bag append per entry and the 8-byte token; ``base`` is
written (and ``log`` cleared) once every ``compact_every`` entries.

**Why gradient batches in the log, not touched rows.** Replaying the inputs through the same
deterministic table (``EmbeddingTable`` I6: same seed, same calls, same result) reproduces
*everything* the shard state holds, including frequency-filter counts of ids that have no row
yet, which a log of touched rows would lose (a retried batch would then count sightings twice
or never). It is also smaller: a gradient row is ``8 + 4·dim`` bytes, a touched row with its
Adagrad/Adam slots and last-seen time ``12 + 8·dim`` to ``16 + 12·dim``; and it costs nothing
on the hot path (the log entry is the input's own bytes). The price, replaying up to
``compact_every`` batches through the optimizer, is paid only on a rebuild.

Invariants
----------
L1  The live state of a key equals ``base`` (or empty) followed by the ``log`` entries in
    sequence order; the entries' sequence numbers are exactly ``base.seq + 1 .. seq``.
L2  The live object cached in the DoFn (per key) carries the ``version`` token of the state it
    equals. Every change appends its log entry *and* writes a fresh token in the same bundle,
    then updates the cache: committed state and cache move together, or the bundle fails and
    its writes are discarded.
L3  So at the start of every ``process``/timer call: token in state == token of the cached
    object ⇔ the cache equals the committed state. Otherwise (a retried bundle, a restore, a
    new DoFn instance, or another instance having advanced the key) the cache is rebuilt by
    L1. Tokens are random, not counters: two histories that diverged after a failure reach the
    same *count* but not the same token (2**-63).
L4  After every (re)build the store is reconciled: ``replace_shard`` with the rebuilt tables'
    full contents (``write_dense`` for the dense set) and the pending delta cleared. Rows a
    failed bundle published are thereby withdrawn; afterwards the store holds the committed
    state plus the deltas of later calls, and equals the tables after every publish.
L5  Replays do not touch metrics: counters count each input once, in the bundle that applied
    it (runners discard the metrics of failed bundles).

Input must be in the global window (state is per key and window; anything else is refused).

Snapshots: batch, then online (DESIGN §4, path b)
-------------------------------------------------
With ``export_dir``, each key arms an event-time timer at the end of the global window; it
fires when a bounded input ends (backfill) and writes the key's whole state (the ``base``
encoding, so optimizer slots, last-seen times and filter counts included) to
``export_dir/<kind>-<key>.snap`` in an envelope checksummed over header and payload
(:func:`write_snapshot`). With ``restore_dir``, every snapshot file of the shard's kind is
read and checked when the DoFn is constructed (:func:`check_restore_dir`), so a job refuses to
start on a damaged, foreign or missing snapshot; then a key that has no state yet starts from
its snapshot instead of empty, and the restored state is written to Beam state at once (so a later failure
rebuilds from it, not from nothing). A different shard count re-shards the sparse rows with
``shard_of`` (filter counts of row-less ids are then lost: they start counting again).

Two views: with ``train_store_url`` the shard publishes after *every* input to that store
(the training view, delta channel 1 of its tables) and every sync interval to ``store_url``
(the serving view, channel 0), as Monolith's training PS is always fresh and only serving
syncs periodically. Workers compute gradients on the training view and score with the
serving view. A rebuild reconciles both views (L4). Sync records go to both.

Event time: ``ts_ms`` of the gradient records, ``now = ts_ms // 1000`` for the tables (seconds
since the epoch; slot expiry is in seconds). Publishing happens inline when event time has
advanced ``sync_interval_s`` since the last publish (``0``: after every input), and on an
event-time timer at that moment, so the last changes are published once the watermark passes
(at the latest when a bounded input ends). Eviction happens inline when event time passes
``last_evict_s + evict_interval_s`` and on a one-shot event-time timer at that moment (it is
re-armed by the next input, so a bounded input ends after at most one timer eviction).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import struct
import time
from typing import Dict, Optional

import apache_beam as beam
import numpy as np
from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, ReadModifyWriteStateSpec, TimerSpec,
                                              on_timer)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from ps.embedding_table import EmbeddingTable, SlotConfig
from ps.optimizers import Adagrad, Optimizer, optimizer_from_config
from ps.snapshot import SnapshotError
from ps.store import decode_arrays, encode_arrays, open_store
from ps.sharding import shard_of

__all__ = ["SparseShard", "DenseShard", "DenseOptimizer", "dense_optimizer", "sparse_optimizer",
           "write_snapshot", "read_snapshot", "check_restore_dir", "SnapshotFileError"]

_LOG = logging.getLogger(__name__)

# Log entry: magic, kind, seq, ts_ms, aux (rows n, or eviction time), dim, table-name length.
_ENTRY = struct.Struct("<4sBQqIHH")
_ENTRY_MAGIC = b"PSLE"
_GRADS, _EVICT, _DENSE = 1, 2, 3
_BASE_MAGIC = b"PSSHARD1"
_BASE_HEAD = struct.Struct("<8sI")


def _new_token() -> int:
    return secrets.randbits(63) or 1


_SNAP_MAGIC = b"PSSNAP02"  # the checksum covers the header and the payload
_SNAP_MAGIC_V1 = b"PSSNAP01"  # older files: the checksum covers the payload only
_SNAP_HEAD = struct.Struct("<8sIIQ")  # magic, header length, crc32, payload length


class SnapshotFileError(SnapshotError):
    """A PS snapshot file is missing, truncated, corrupted or of another kind (a
    ``ps.SnapshotError``, like a damaged table snapshot inside it)."""


def write_snapshot(path: str, payload: bytes, meta: dict) -> None:
    """Write ``payload`` (a shard's base encoding) with ``meta`` atomically and checksummed."""
    import os
    import zlib
    header = json.dumps(meta, sort_keys=True).encode()
    crc = zlib.crc32(payload, zlib.crc32(header))
    head = _SNAP_HEAD.pack(_SNAP_MAGIC, len(header), crc, len(payload))
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(head + header + payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_snapshot(path: str) -> tuple:
    """``(meta, payload)`` of a snapshot file, or :class:`SnapshotFileError` saying what is wrong."""
    import zlib
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SnapshotFileError(f"cannot read PS snapshot {path}: {e}") from e
    if len(data) < _SNAP_HEAD.size:
        raise SnapshotFileError(f"PS snapshot {path} is truncated ({len(data)} bytes)")
    magic, header_len, crc, length = _SNAP_HEAD.unpack_from(data)
    if magic not in (_SNAP_MAGIC, _SNAP_MAGIC_V1):
        raise SnapshotFileError(f"{path} is not a PS snapshot (magic {magic!r})")
    start = _SNAP_HEAD.size + header_len
    if len(data) != start + length:
        raise SnapshotFileError(f"PS snapshot {path} is truncated or padded: "
                                f"{len(data)} bytes, expected {start + length}")
    header, payload = data[_SNAP_HEAD.size:start], data[start:]
    # A flipped bit in the header (kind, key, shard count, event time) must be caught too.
    covered = zlib.crc32(payload, zlib.crc32(header)) if magic == _SNAP_MAGIC else zlib.crc32(payload)
    if covered != crc:
        raise SnapshotFileError(f"PS snapshot {path} is corrupted (checksum mismatch)")
    try:
        meta = json.loads(header)
    except ValueError as e:
        raise SnapshotFileError(f"PS snapshot {path} has a corrupted header: {e}") from e
    if not isinstance(meta, dict):
        raise SnapshotFileError(f"PS snapshot {path} has a corrupted header: {meta!r}")
    return meta, payload


def check_restore_dir(restore_dir: str, kind: str) -> list:
    """The ``kind-*.snap`` files of ``restore_dir``, each read whole and checked (checksum,
    kind); :class:`SnapshotFileError` naming the file if one is damaged, and if there is none
    (a mistyped ``--restore`` must not start a job cold)."""
    import glob
    import os
    paths = sorted(glob.glob(os.path.join(glob.escape(restore_dir), f"{kind}-*.snap")))
    if not paths:
        raise SnapshotFileError(f"restore directory {restore_dir} holds no {kind}-*.snap PS "
                                f"snapshot (it must be the --export_dir of a finished backfill)")
    for path in paths:
        meta, _ = read_snapshot(path)
        if meta.get("kind") != kind:
            raise SnapshotFileError(f"{path} holds a {meta.get('kind')!r} snapshot, not {kind!r}")
    return paths


def _as_slot_config(config) -> SlotConfig:
    if isinstance(config, SlotConfig):
        return config
    if isinstance(config, dict):
        expiry = config.get("expiry_s", config.get("expiry"))
        return SlotConfig(threshold=int(config.get("threshold", 0)),
                          expiry=None if expiry is None else int(expiry))
    threshold, expiry = config
    return SlotConfig(int(threshold), None if expiry is None else int(expiry))


def sparse_optimizer(optimizer="adagrad", lr: Optional[float] = None) -> Optimizer:
    """A row optimizer from a name (sgd|adagrad|ftrl|adam), a config dict or an instance;
    ``lr`` overrides its learning rate. Default: Adagrad, Monolith's lr 0.001 and initial
    accumulator 0.1."""
    if isinstance(optimizer, Optimizer):
        opt = optimizer
    elif isinstance(optimizer, str):
        opt = optimizer_from_config({"name": optimizer.lower()})
    else:
        opt = optimizer_from_config(dict(optimizer))
    if lr is not None:
        opt = dataclasses.replace(opt, lr=float(lr))
    return opt


class _Live:
    """The in-memory state of one key (L2): what ``base`` + ``log`` describe, plus bookkeeping."""

    def __init__(self):
        self.token = 0  # the version token of the committed state this object equals
        self.seq = 0  # sequence number of the last entry applied
        self.log_entries = 0  # entries in the log (since the base)
        self.ts_ms = 0  # largest event time of the gradients applied
        self.last_evict_s = None  # event time of the last eviction (None: not yet)
        self.dirty = False  # changes not yet published
        self.next_publish_s = 0  # event time at which to publish next
        self.sync_timer_at = None  # what the timers were last set to in a committed bundle
        self.evict_timer_at = None
        # What the key has applied since it began, checkpointed with it (so exactly once):
        # SparseShard {"gradient_rows": n}, DenseShard {"examples": n, "batches": n}.
        self.totals = {}


class _LoggedShard(beam.DoFn):
    """The base + log + version machinery shared by ``SparseShard`` and ``DenseShard``."""

    BASE = ReadModifyWriteStateSpec("base", BytesCoder())
    LOG = BagStateSpec("log", BytesCoder())
    VERSION = ReadModifyWriteStateSpec("version", VarIntCoder())
    # Timers are declared by each subclass under its own names: the FnApiRunner mixes up the
    # timers of two stateful transforms fused into one stage when their timer ids are equal
    # (a SparseShard's end-of-input timers fired a DenseShard's callback, and vice versa).
    KIND = "shard"  # snapshot file prefix; also the prefix of the timer ids

    def __init__(self, store_url: str, num_shards: int, sync_interval_s: float, compact_every: int,
                 export_dir: Optional[str] = None, restore_dir: Optional[str] = None,
                 train_store_url: Optional[str] = None):
        if compact_every < 1:
            raise ValueError(f"compact_every must be >= 1, got {compact_every}")
        if sync_interval_s < 0:
            raise ValueError(f"sync_interval_s must be >= 0, got {sync_interval_s}")
        self.store_url = store_url
        self.train_store_url = train_store_url
        self.num_shards = None if num_shards is None else int(num_shards)
        self.sync_interval_s = int(sync_interval_s)
        self.compact_every = int(compact_every)
        self.export_dir = export_dir
        self.restore_dir = restore_dir
        if restore_dir:  # at construction: a job must not start on damaged snapshots
            check_restore_dir(restore_dir, self.KIND)
        self.exports = Metrics.counter("ps", "snapshots_exported")
        self.restores = Metrics.counter("ps", "snapshots_restored")
        self.publishes = Metrics.counter("ps", "publishes")
        self.rebuilds = Metrics.counter("ps", "rebuilds")
        self.compactions = Metrics.counter("ps", "compactions")
        self.log_entries_dist = Metrics.distribution("ps", "log_entries")
        self._store = None
        self._train_store = None
        self._cache = {}

    def setup(self):
        self._store = open_store(self.store_url, self.num_shards)
        self._train_store = (open_store(self.train_store_url, self.num_shards)
                             if self.train_store_url else None)
        self._cache = {}

    def __getstate__(self):  # the live objects and the store client stay in their process
        state = dict(self.__dict__)
        state["_store"], state["_train_store"], state["_cache"] = None, None, {}
        return state

    @property
    def store(self):
        """The serving view: published every sync interval."""
        if self._store is None:
            self.setup()
        return self._store

    @property
    def train_store(self):
        """The training view (None: the serving view is the training view): published after
        every input, so the worker computes gradients on fresh parameters."""
        if self._store is None:
            self.setup()
        return self._train_store

    # --------------------------------------------------------- subclass hooks
    def _empty(self, key) -> _Live:
        raise NotImplementedError

    def _decode_base(self, key, data: bytes) -> _Live:
        raise NotImplementedError

    def _encode_base(self, live: _Live) -> bytes:
        raise NotImplementedError

    def _replay(self, live: _Live, kind: int, head: tuple, payload: memoryview) -> None:
        raise NotImplementedError

    def _reconcile(self, key, live: _Live) -> None:
        raise NotImplementedError

    def _publish(self, key, live: _Live) -> None:
        raise NotImplementedError

    def _publish_train(self, key, live: _Live) -> None:
        raise NotImplementedError

    def _snapshot_key(self, key) -> str:
        return str(key)

    def _restore(self, key) -> Optional[_Live]:
        """The key's state from ``restore_dir`` (None: nothing to restore for it)."""
        import os
        path = os.path.join(self.restore_dir, f"{self.KIND}-{self._snapshot_key(key)}.snap")
        if not os.path.exists(path):
            return None
        meta, payload = read_snapshot(path)
        if meta.get("kind") != self.KIND:
            raise SnapshotFileError(f"{path} holds a {meta.get('kind')!r} snapshot, not {self.KIND!r}")
        return self._decode_base(key, payload)

    # --------------------------------------------------------- machinery
    def _live(self, key, base, log, version) -> _Live:
        """The cached live state of ``key`` if it equals the committed state (L3), else a
        rebuild from ``base`` + ``log`` (L1) followed by a reconciliation of the store (L4)."""
        token = version.read() or 0
        live = self._cache.get(key)
        if live is not None and live.token == token:
            return live
        if token:
            data = base.read()
            live = self._decode_base(key, data) if data else self._empty(key)
            entries = []
            for raw in log.read():
                raw = memoryview(raw).cast("B")
                head = _ENTRY.unpack_from(raw)
                if head[0] != _ENTRY_MAGIC:
                    raise RuntimeError(f"PS state of key {key!r}: log entry with magic {head[0]!r}")
                entries.append((head[2], head, raw[_ENTRY.size:]))
            entries.sort(key=lambda e: e[0])
            expected = list(range(live.seq + 1, live.seq + 1 + len(entries)))
            if [e[0] for e in entries] != expected:
                raise RuntimeError(f"PS state of key {key!r} is inconsistent: base seq {live.seq}, "
                                   f"log seqs {[e[0] for e in entries][:10]}...")
            for seq, head, payload in entries:
                self._replay(live, head[1], head, payload)
                live.seq = seq
            live.log_entries = len(entries)
            self.rebuilds.inc()
        else:
            if live is not None:  # state rolled back to nothing: a failed first bundle
                self.rebuilds.inc()
            restored = self._restore(key) if self.restore_dir else None
            if restored is not None:
                # Persist at once: a failure after this must rebuild from the snapshot.
                base.write(self._encode_base(restored))
                log.clear()
                token = _new_token()
                version.write(token)
                restored.log_entries = 0
                self.restores.inc()
                live = restored
            else:
                live = self._empty(key)
        live.token = token
        self._reconcile(key, live)
        live.dirty = False
        live.next_publish_s = live.ts_ms // 1000 + self.sync_interval_s
        self._cache[key] = live
        return live

    def _append(self, live: _Live, entry: bytes, base, log, version) -> None:
        """Record an applied entry (its seq is ``live.seq``): log append, compaction, new token."""
        log.add(entry)
        live.log_entries += 1
        if live.log_entries >= self.compact_every:
            base.write(self._encode_base(live))
            log.clear()
            live.log_entries = 0
            self.compactions.inc()
        live.token = _new_token()
        version.write(live.token)

    def _maybe_publish(self, key, live: _Live, sync_timer) -> None:
        """Publish to the training view (if any) at once; to the serving view if the sync
        interval has passed in event time, else arm the sync timer."""
        if not live.dirty:
            return
        if self.train_store_url:
            self._publish_train(key, live)
        now_s = live.ts_ms // 1000
        if self.sync_interval_s == 0 or now_s >= live.next_publish_s:
            self._do_publish(key, live)
        elif live.sync_timer_at != live.next_publish_s:
            sync_timer.set(Timestamp(seconds=live.next_publish_s))
            live.sync_timer_at = live.next_publish_s

    def _do_publish(self, key, live: _Live) -> None:
        self._publish(key, live)
        live.dirty = False
        live.next_publish_s = live.ts_ms // 1000 + self.sync_interval_s
        self.publishes.inc()

    def _on_sync(self, key, base, log, version):
        live = self._live(key, base, log, version)
        live.sync_timer_at = None
        if live.dirty:
            self._do_publish(key, live)

    def _arm_export(self, live: _Live, export_timer) -> None:
        if self.export_dir and not getattr(live, "export_armed", False):
            export_timer.set(GlobalWindow().max_timestamp())
            live.export_armed = True

    def _on_export(self, key, base, log, version):
        """End of a bounded input: publish what is pending, then write the key's snapshot."""
        import os
        live = self._live(key, base, log, version)
        if live.dirty:
            self._do_publish(key, live)
        os.makedirs(self.export_dir, exist_ok=True)
        name = self._snapshot_key(key)
        write_snapshot(os.path.join(self.export_dir, f"{self.KIND}-{name}.snap"),
                       self._encode_base(live),
                       {"kind": self.KIND, "key": name, "seq": int(live.seq),
                        "ts_ms": int(live.ts_ms), "num_shards": self.num_shards,
                        "totals": dict(live.totals)})
        self.exports.inc()

    @staticmethod
    def _check_window(window):
        """State is per key *and window*: a PS must see all its input in the global window."""
        if not isinstance(window, GlobalWindow):
            raise ValueError(f"PS shards need their input in the global window, got {window!r}: "
                             f"window the training section with beam.WindowInto(GlobalWindows())")

    @staticmethod
    def _entry(kind, seq, ts_ms, aux=0, dim=0, name=b"") -> bytes:
        return _ENTRY.pack(_ENTRY_MAGIC, kind, seq, ts_ms, aux, dim, len(name)) + name


# ============================================================================ sparse


class SparseShard(_LoggedShard):
    """Keyed by shard id; input ``(shard, ps.gradients.SparseGradients)``.

    Args:
        store_url: the ``ParameterStore`` to publish to (``memory://…`` or ``redis://…``).
        num_shards: number of PS shards (fids are routed with ``shard_of(fids, num_shards)``).
        tables: ``{table name: dim}``; the published rows are ``dim`` wide (the PS rows add
            the optimizer's slots).
        slots: ``{slot: SlotConfig | {"threshold", "expiry_s"} | (threshold, expiry_s)}``;
            ``default_slot`` for every other slot (default: no threshold, never expires).
            Expiry is in event-time seconds.
        optimizer: ``"sgd" | "adagrad" | "ftrl" | "adam"``, a config dict or an Optimizer
            (default Adagrad, lr 0.001, initial accumulator 0.1); ``lr`` overrides its rate.
        sync_interval_s: event-time seconds between publishes (0: after every input).
        train_store_url: a training view (``ps.store.view_url(store_url, "train")``) to
            publish to after every input, so that training reads fresh parameters while
            ``store_url`` (serving) lags by the sync interval; None: no such view.
        evict_interval_s: event-time seconds between evictions (None: never evict).
        compact_every: log entries after which the log is compacted into a new base.
        init_scale: new rows' weights are uniform in [-init_scale, init_scale), drawn from the
            fid and ``seed`` (deterministic: a replay creates the same values).
        filter_bytes: memory of each table's frequency filter (when a threshold is > 1).
        seed: seeds the tables (hashes, initial weights).
    """

    EVICT = TimerSpec("sparse_evict", TimeDomain.WATERMARK)
    KIND = "sparse"

    SYNC = TimerSpec("sparse_sync", TimeDomain.WATERMARK)
    EXPORT = TimerSpec("sparse_export", TimeDomain.WATERMARK)

    @on_timer(SYNC)
    def on_sync(self, key=beam.DoFn.KeyParam, base=beam.DoFn.StateParam(_LoggedShard.BASE),
                log=beam.DoFn.StateParam(_LoggedShard.LOG),
                version=beam.DoFn.StateParam(_LoggedShard.VERSION)):
        self._on_sync(key, base, log, version)

    @on_timer(EXPORT)
    def on_export(self, key=beam.DoFn.KeyParam, base=beam.DoFn.StateParam(_LoggedShard.BASE),
                  log=beam.DoFn.StateParam(_LoggedShard.LOG),
                  version=beam.DoFn.StateParam(_LoggedShard.VERSION)):
        self._on_export(key, base, log, version)

    def __init__(self, store_url: str, num_shards: int, tables: Dict[str, int], *,
                 slots: Optional[dict] = None, default_slot=None, optimizer="adagrad",
                 lr: Optional[float] = None, sync_interval_s: float = 10,
                 evict_interval_s: Optional[float] = 3600, compact_every: int = 64,
                 init_scale: float = 0.0, filter_bytes: int = 1 << 20, seed: int = 0,
                 export_dir: Optional[str] = None, restore_dir: Optional[str] = None,
                 train_store_url: Optional[str] = None):
        super().__init__(store_url, num_shards, sync_interval_s, compact_every, export_dir,
                         restore_dir, train_store_url)
        if not tables:
            raise ValueError("tables must name at least one table: {name: dim}")
        self.tables = {str(k): int(v) for k, v in tables.items()}
        self.slots = {int(s): _as_slot_config(c) for s, c in (slots or {}).items()}
        self.default_slot = _as_slot_config(default_slot) if default_slot is not None else SlotConfig()
        self.optimizer = sparse_optimizer(optimizer, lr)
        self.init_scale = float(init_scale)
        self.filter_bytes = int(filter_bytes)
        self.seed = int(seed)
        expiries = [c.expiry for c in [self.default_slot, *self.slots.values()] if c.expiry is not None]
        self.evict_interval_s = None if evict_interval_s is None or not expiries else int(evict_interval_s)
        self.gradient_rows_applied = Metrics.counter("ps", "gradient_rows_applied")
        self.gradients_dropped = Metrics.counter("ps", "gradients_dropped_by_filter")
        self.rows_created = Metrics.counter("ps", "rows_created")
        self.rows_evicted = Metrics.counter("ps", "rows_evicted")
        self.table_size = Metrics.distribution("ps", "table_size")

    def new_table(self, dim: int) -> EmbeddingTable:
        """An empty table configured as this shard's tables are (also the tests' reference)."""
        return EmbeddingTable(dim, self.optimizer, slots=self.slots, default_slot=self.default_slot,
                              filter_bytes=self.filter_bytes, init_scale=self.init_scale,
                              channels=self._channels, seed=self.seed)

    @property
    def _channels(self) -> int:
        """Delta channels: 0 the serving view, 1 the training view (when there is one)."""
        return 2 if self.train_store_url else 1

    # --------------------------------------------------------- state encoding
    def _empty(self, key):
        live = _Live()
        live.tables = {name: self.new_table(dim) for name, dim in self.tables.items()}
        return live

    def _encode_base(self, live):
        blobs = [(name, t.to_bytes()) for name, t in live.tables.items()]
        header = json.dumps({"seq": live.seq, "ts_ms": live.ts_ms, "last_evict_s": live.last_evict_s,
                             "totals": live.totals,
                             "tables": [[name, len(b)] for name, b in blobs]}).encode()
        return b"".join([_BASE_HEAD.pack(_BASE_MAGIC, len(header)), header, *(b for _, b in blobs)])

    def _decode_base(self, key, data):
        data = memoryview(data).cast("B")
        magic, header_len = _BASE_HEAD.unpack_from(data)
        if magic != _BASE_MAGIC:
            raise RuntimeError(f"PS state of shard {key!r}: base with magic {bytes(magic)!r}")
        offset = _BASE_HEAD.size
        header = json.loads(bytes(data[offset:offset + header_len]))
        offset += header_len
        live = _Live()
        live.seq, live.ts_ms, live.last_evict_s = header["seq"], header["ts_ms"], header["last_evict_s"]
        live.totals = dict(header.get("totals", {}))
        live.tables = {}
        for name, size in header["tables"]:
            table = EmbeddingTable.from_bytes(data[offset:offset + size])
            offset += size
            if name not in self.tables:
                _LOG.warning("shard %s: dropping table %r of the restored state (not configured)", key, name)
                continue
            if table.dim != self.tables[name]:
                raise ValueError(f"shard {key}: restored table {name!r} has dim {table.dim}, "
                                 f"configured {self.tables[name]}")
            if table.channels != self._channels:  # a snapshot of a job with(out) a training view
                table.set_channels(self._channels)
            live.tables[name] = table
        for name, dim in self.tables.items():
            live.tables.setdefault(name, self.new_table(dim))
        return live

    def _restore(self, shard):
        """This shard's snapshot; from snapshots of another shard count, its share of their rows."""
        import glob
        import os
        paths = sorted(glob.glob(os.path.join(self.restore_dir, f"{self.KIND}-*.snap")))
        if not paths:
            return None
        metas = [read_snapshot(p) for p in paths]
        if all(meta.get("num_shards") == self.num_shards for meta, _ in metas):
            return super()._restore(shard)
        live = self._empty(shard)
        for meta, payload in metas:  # re-shard: take the rows this shard owns now
            old = self._decode_base(meta.get("key"), payload)
            live.seq = max(live.seq, old.seq)
            live.ts_ms = max(live.ts_ms, old.ts_ms)
            live.last_evict_s = old.last_evict_s
            for k, v in old.totals.items():
                live.totals[k] = live.totals.get(k, 0) + v
            for name, table in old.tables.items():
                for fids, rows, last_seen in table.items():
                    mine = shard_of(fids, self.num_shards) == shard
                    live.tables[name].insert(fids[mine], now=last_seen[mine], weights=rows[mine])
        return live

    # --------------------------------------------------------- the two operations
    def _apply_grads(self, live, table, fids, grads, ts_ms):
        """Apply one gradient batch; returns (rows created, gradients dropped by the filter)."""
        t = live.tables[table]
        created, dropped = t.stats.rows_created, t.stats.dropped_gradients
        now_s = ts_ms // 1000
        t.apply_gradients(fids, grads, now=now_s)
        live.totals["gradient_rows"] = live.totals.get("gradient_rows", 0) + int(fids.size)
        live.ts_ms = max(live.ts_ms, ts_ms)
        if live.last_evict_s is None:
            live.last_evict_s = now_s
        live.dirty = True
        return t.stats.rows_created - created, t.stats.dropped_gradients - dropped

    def _evict(self, live, now_s):
        removed = sum(t.evict(now=now_s) for t in live.tables.values())
        live.last_evict_s = now_s
        live.dirty = live.dirty or removed > 0
        return removed

    def _replay(self, live, kind, head, payload):
        _, _, seq, ts_ms, aux, dim, name_len = head
        if kind == _GRADS:
            table = bytes(payload[:name_len]).decode()
            n = aux
            offset = name_len
            fids = np.frombuffer(payload, dtype="<u8", count=n, offset=offset).astype(np.uint64)
            offset += 8 * n
            grads = np.frombuffer(payload, dtype="<f4", count=n * dim, offset=offset).reshape(n, dim).copy()
            self._apply_grads(live, table, fids, grads, ts_ms)
        elif kind == _EVICT:
            self._evict(live, aux)
        else:
            raise RuntimeError(f"SparseShard: unknown log entry kind {kind}")

    # --------------------------------------------------------- the store
    def _reconcile(self, shard, live):
        views = [(self.store, 0)] + ([(self.train_store, 1)] if self.train_store_url else [])
        for name, t in live.tables.items():
            parts = list(t.items())
            fids = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.uint64)
            rows = (np.concatenate([p[1][:, :t.dim] for p in parts]) if parts
                    else np.empty((0, t.dim), np.float32))
            for store, channel in views:
                store.replace_shard(name, shard, fids, rows)
                t.delta(channel)  # the view now has everything: nothing is pending
        for store, _ in views:
            self._set_sync(store, shard, live)

    def _publish(self, shard, live):
        self._publish_to(self.store, 0, shard, live)
        self.table_size.update(sum(len(t) for t in live.tables.values()))

    def _publish_train(self, shard, live):
        self._publish_to(self.train_store, 1, shard, live)

    def _publish_to(self, store, channel, shard, live):
        for name, t in live.tables.items():
            d = t.delta(channel)
            if d.fids.size or d.deleted.size:
                store.write_rows(name, shard, d.fids, d.weights, d.deleted)
        self._set_sync(store, shard, live)

    @staticmethod
    def _set_sync(store, shard, live):
        store.set_sync(f"sparse/{shard}", {"version": int(live.seq), "ts_ms": int(live.ts_ms),
                                           "wall_time": time.time(), **live.totals})

    # --------------------------------------------------------- DoFn methods
    def process(self, element, base=beam.DoFn.StateParam(_LoggedShard.BASE),
                log=beam.DoFn.StateParam(_LoggedShard.LOG),
                version=beam.DoFn.StateParam(_LoggedShard.VERSION),
                sync_timer=beam.DoFn.TimerParam(SYNC),
                evict_timer=beam.DoFn.TimerParam(EVICT),
                export_timer=beam.DoFn.TimerParam(EXPORT),
                window=beam.DoFn.WindowParam):
        self._check_window(window)
        shard, g = element
        dim = self.tables.get(g.table)
        if dim is None:
            raise ValueError(f"SparseShard: gradients for unknown table {g.table!r}; "
                             f"configured: {sorted(self.tables)}")
        fids = np.ascontiguousarray(g.fids, dtype=np.uint64)
        grads = np.ascontiguousarray(g.grads, dtype=np.float32)
        if grads.shape != (fids.size, dim):
            raise ValueError(f"SparseShard: table {g.table!r} takes grads [{fids.size}, {dim}], "
                             f"got {grads.shape}")
        if fids.size and (shard_of(fids, self.num_shards) != shard).any():
            raise ValueError(f"SparseShard {shard}: gradients of fids owned by other shards")
        ts_ms = int(g.ts_ms)
        if not 0 <= ts_ms // 1000 < 2**32:
            raise ValueError(f"SparseShard: ts_ms {ts_ms} is out of range")
        live = self._live(shard, base, log, version)
        self._arm_export(live, export_timer)
        name = g.table.encode()
        entry = b"".join([self._entry(_GRADS, live.seq + 1, ts_ms, fids.size, dim, name),
                          fids.astype("<u8", copy=False).tobytes(),
                          grads.astype("<f4", copy=False).tobytes()])
        created, dropped = self._apply_grads(live, g.table, fids, grads, ts_ms)
        live.seq += 1
        self._append(live, entry, base, log, version)
        self.gradient_rows_applied.inc(int(fids.size))
        self.gradients_dropped.inc(int(dropped))
        self.rows_created.inc(int(created))
        if self.evict_interval_s is not None:
            now_s = live.ts_ms // 1000
            if now_s >= live.last_evict_s + self.evict_interval_s:
                self._evict_logged(live, now_s, base, log, version)
            next_evict = live.last_evict_s + self.evict_interval_s
            if live.evict_timer_at != next_evict:
                evict_timer.set(Timestamp(seconds=next_evict))
                live.evict_timer_at = next_evict
        self._maybe_publish(shard, live, sync_timer)
        self.log_entries_dist.update(live.log_entries)
        self.table_size.update(sum(len(t) for t in live.tables.values()))
        return ()  # no output: the PS publishes to the store

    def _evict_logged(self, live, now_s, base, log, version):
        removed = self._evict(live, now_s)
        live.seq += 1
        self._append(live, self._entry(_EVICT, live.seq, 0, now_s), base, log, version)
        self.rows_evicted.inc(int(removed))

    @on_timer(EVICT)
    def on_evict(self, key=beam.DoFn.KeyParam, timestamp=beam.DoFn.TimestampParam,
                 base=beam.DoFn.StateParam(_LoggedShard.BASE),
                 log=beam.DoFn.StateParam(_LoggedShard.LOG),
                 version=beam.DoFn.StateParam(_LoggedShard.VERSION),
                 sync_timer=beam.DoFn.TimerParam(SYNC)):
        live = self._live(key, base, log, version)
        live.evict_timer_at = None
        now_s = int(timestamp.micros // 1_000_000)
        if self.evict_interval_s is None or live.last_evict_s is None \
                or now_s < live.last_evict_s + self.evict_interval_s:
            return  # an eviction happened inline since the timer was set
        self._evict_logged(live, now_s, base, log, version)
        self._maybe_publish(key, live, sync_timer)


# ============================================================================ dense


class DenseOptimizer:
    """Vectorised NumPy optimizer for dense weights: sgd, adagrad or adam.

    Float64 arithmetic, float32 storage (as the row optimizers). Slots per parameter:
    adagrad ``acc`` (starts at ``initial_accumulator``), adam ``m``, ``v`` and a per-parameter
    step count (kept by the caller).

    * sgd:     ``w -= lr·g``
    * adagrad: ``acc += g²;  w -= lr·g / (sqrt(acc) + eps)``
    * adam:    ``m = b1·m + (1-b1)·g;  v = b2·v + (1-b2)·g²;
                 w -= lr·(m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)``
    """

    SLOTS = {"sgd": (), "adagrad": ("acc",), "adam": ("m", "v")}

    def __init__(self, name="adam", lr=None, beta1=0.9, beta2=0.999, epsilon=None,
                 initial_accumulator=0.1):
        name = name.lower()
        if name not in self.SLOTS:
            raise ValueError(f"dense optimizer must be one of {sorted(self.SLOTS)}, got {name!r}")
        self.name = name
        self.lr = float(lr if lr is not None else {"sgd": 0.01, "adagrad": 0.001, "adam": 0.001}[name])
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.epsilon = float(epsilon if epsilon is not None else (1e-8 if name == "adam" else 0.0))
        self.initial_accumulator = float(initial_accumulator)

    def config(self):
        return {"name": self.name, "lr": self.lr, "beta1": self.beta1, "beta2": self.beta2,
                "epsilon": self.epsilon, "initial_accumulator": self.initial_accumulator}

    def initial_slots(self, param: np.ndarray) -> Dict[str, np.ndarray]:
        init = {"acc": self.initial_accumulator, "m": 0.0, "v": 0.0}
        return {s: np.full(param.shape, init[s], dtype=np.float32) for s in self.SLOTS[self.name]}

    def apply(self, param: np.ndarray, slots: Dict[str, np.ndarray], grad: np.ndarray, step: int):
        """One step in place; ``step`` is this parameter's step number (1 for the first)."""
        g = grad.astype(np.float64)
        if self.name == "sgd":
            param[...] = param - self.lr * g
        elif self.name == "adagrad":
            acc = slots["acc"] + g * g
            slots["acc"][...] = acc
            param[...] = param - self.lr * g / (np.sqrt(acc) + self.epsilon)
        else:
            m = self.beta1 * slots["m"] + (1.0 - self.beta1) * g
            v = self.beta2 * slots["v"] + (1.0 - self.beta2) * g * g
            slots["m"][...], slots["v"][...] = m, v
            m_hat = m / (1.0 - self.beta1 ** step)
            v_hat = v / (1.0 - self.beta2 ** step)
            param[...] = param - self.lr * m_hat / (np.sqrt(v_hat) + self.epsilon)


def dense_optimizer(optimizer="adam", lr=None) -> DenseOptimizer:
    """A DenseOptimizer from a name, a config dict or an instance; ``lr`` overrides its rate."""
    if isinstance(optimizer, DenseOptimizer):
        config = optimizer.config()
    elif isinstance(optimizer, str):
        config = {"name": optimizer}
    else:
        config = dict(optimizer)
    if lr is not None:
        config["lr"] = lr
    return DenseOptimizer(**config)


class DenseShard(_LoggedShard):
    """Keyed by a constant; input ``(key, ps.gradients.DenseGradients)``.

    Args:
        store_url: the ``ParameterStore`` to publish to.
        name: the dense parameter set's name in the store (``write_dense(name, …)``).
        initial_params: ``{variable name: array}``, the model's initial dense weights.
        optimizer: ``"adam" | "adagrad" | "sgd"``, a config dict or a DenseOptimizer
            (default Adam, lr 0.001); ``lr`` overrides its rate.
        sync_interval_s: event-time seconds between publishes (0: after every input).
        train_store_url: a training view (``ps.store.view_url(store_url, "train")``) to
            publish to after every input, so that training reads fresh parameters while
            ``store_url`` (serving) lags by the sync interval; None: no such view.
        compact_every: log entries after which the log is compacted into a new base.

    The published version is the number of gradient batches applied (``seq``).
    """

    KIND = "dense"

    SYNC = TimerSpec("dense_sync", TimeDomain.WATERMARK)
    EXPORT = TimerSpec("dense_export", TimeDomain.WATERMARK)

    @on_timer(SYNC)
    def on_sync(self, key=beam.DoFn.KeyParam, base=beam.DoFn.StateParam(_LoggedShard.BASE),
                log=beam.DoFn.StateParam(_LoggedShard.LOG),
                version=beam.DoFn.StateParam(_LoggedShard.VERSION)):
        self._on_sync(key, base, log, version)

    @on_timer(EXPORT)
    def on_export(self, key=beam.DoFn.KeyParam, base=beam.DoFn.StateParam(_LoggedShard.BASE),
                  log=beam.DoFn.StateParam(_LoggedShard.LOG),
                  version=beam.DoFn.StateParam(_LoggedShard.VERSION)):
        self._on_export(key, base, log, version)

    def __init__(self, store_url: str, name: str, initial_params: Dict[str, np.ndarray], *,
                 optimizer="adam", lr: Optional[float] = None, sync_interval_s: float = 10,
                 compact_every: int = 64, export_dir: Optional[str] = None,
                 restore_dir: Optional[str] = None, train_store_url: Optional[str] = None):
        super().__init__(store_url, None, sync_interval_s, compact_every, export_dir,
                         restore_dir, train_store_url)
        self.name = str(name)
        self.initial_params = {str(k): np.array(v, dtype=np.float32) for k, v in initial_params.items()}
        self.optimizer = dense_optimizer(optimizer, lr)
        self.gradient_batches = Metrics.counter("ps", "dense_gradient_batches")

    def _snapshot_key(self, key) -> str:
        return self.name

    def _empty(self, key):
        live = _Live()
        live.params = {k: v.copy() for k, v in self.initial_params.items()}
        live.slots = {k: self.optimizer.initial_slots(v) for k, v in live.params.items()}
        live.steps = {k: 0 for k in live.params}
        return live

    def _encode_base(self, live):
        arrays = {f"p/{k}": v for k, v in live.params.items()}
        for k, slots in live.slots.items():
            arrays.update({f"s/{s}/{k}": v for s, v in slots.items()})
        return encode_arrays(arrays, meta={"seq": live.seq, "ts_ms": live.ts_ms, "steps": live.steps,
                                           "totals": live.totals,
                                           "optimizer": self.optimizer.config()})

    def _decode_base(self, key, data):
        arrays, meta = decode_arrays(data)
        live = _Live()
        live.seq, live.ts_ms, live.steps = meta["seq"], meta["ts_ms"], dict(meta["steps"])
        live.totals = dict(meta.get("totals", {}))
        live.params = {k[2:]: v for k, v in arrays.items() if k.startswith("p/")}
        live.slots = {k: {} for k in live.params}
        for k, v in arrays.items():
            if k.startswith("s/"):
                _, slot, param = k.split("/", 2)
                live.slots[param][slot] = v
        missing = set(self.initial_params) - set(live.params)
        if missing:
            raise ValueError(f"DenseShard {self.name}: restored state lacks parameters {sorted(missing)}")
        return live

    def _apply_grads(self, live, grads, ts_ms, examples):
        for k, g in grads.items():
            live.steps[k] += 1
            self.optimizer.apply(live.params[k], live.slots[k], g, live.steps[k])
        live.totals["examples"] = live.totals.get("examples", 0) + int(examples)
        live.totals["batches"] = live.totals.get("batches", 0) + 1
        live.ts_ms = max(live.ts_ms, ts_ms)
        live.dirty = True

    def _replay(self, live, kind, head, payload):
        if kind != _DENSE:
            raise RuntimeError(f"DenseShard: unknown log entry kind {kind}")
        grads, _ = decode_arrays(payload[head[6]:])
        self._apply_grads(live, grads, head[3], head[4])

    def _reconcile(self, key, live):
        self._publish(key, live)
        if self.train_store_url:
            self._publish_train(key, live)

    def _publish(self, key, live):
        self._publish_to(self.store, live)

    def _publish_train(self, key, live):
        self._publish_to(self.train_store, live)

    def _publish_to(self, store, live):
        store.write_dense(self.name, live.params, int(live.seq))
        store.set_sync("dense", {"version": int(live.seq), "ts_ms": int(live.ts_ms),
                                 "wall_time": time.time(), **live.totals})

    def process(self, element, base=beam.DoFn.StateParam(_LoggedShard.BASE),
                log=beam.DoFn.StateParam(_LoggedShard.LOG),
                version=beam.DoFn.StateParam(_LoggedShard.VERSION),
                sync_timer=beam.DoFn.TimerParam(SYNC),
                export_timer=beam.DoFn.TimerParam(EXPORT),
                window=beam.DoFn.WindowParam):
        self._check_window(window)
        key, g = element
        grads = {}
        for k, v in g.grads.items():
            if k not in self.initial_params:
                raise ValueError(f"DenseShard {self.name}: gradient for unknown parameter {k!r}")
            v = np.ascontiguousarray(v, dtype=np.float32)
            if v.shape != self.initial_params[k].shape:
                raise ValueError(f"DenseShard {self.name}: gradient of {k!r} has shape {v.shape}, "
                                 f"the parameter {self.initial_params[k].shape}")
            grads[k] = v
        ts_ms = int(g.ts_ms)
        live = self._live(key, base, log, version)
        self._arm_export(live, export_timer)
        examples = int(g.examples)
        if not 0 <= examples < 2**32:
            raise ValueError(f"DenseShard {self.name}: examples {examples} is out of range")
        entry = self._entry(_DENSE, live.seq + 1, ts_ms, examples) + encode_arrays(grads)
        self._apply_grads(live, grads, ts_ms, examples)
        live.seq += 1
        self._append(live, entry, base, log, version)
        self.gradient_batches.inc()
        self._maybe_publish(key, live, sync_timer)
        self.log_entries_dist.update(live.log_entries)
        return ()  # no output: the PS publishes to the store
