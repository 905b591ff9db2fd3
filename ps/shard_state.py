"""The state machinery of the parameter-server DoFns: base + log + version, exactly once through
Beam state. ``ps.sparse_shard.SparseShard`` (the embedding rows) and ``ps.dense_shard.DenseShard``
(the dense weights) are built on :class:`LoggedShard`.

Both apply gradient batches, keep their state in Beam state (so Flink checkpoints it), and
publish what changed to a ``ps.store.ParameterStore`` every sync interval (event time), where
workers read it.

    grads | beam.ParDo(SparseShard("memory://train", num_shards=4, tables={"dim8": 8}))
    dense | beam.ParDo(DenseShard("memory://train", name="dense", initial_params=params))

State layout (per key) and why
------------------------------
A Python ``ReadModifyWriteState`` on Flink is a bag whose whole value is re-sent at every
bundle commit (and the SDK state cache is off by default), so the table cannot live in one
value. Per key there are three cells:

* ``base``    (``ReadModifyWriteState[bytes]``): a snapshot of the whole key: an envelope
  (``ps.envelope``) of kind ``sparse-state`` (every table's ``EmbeddingTable.to_bytes()``: rows,
  optimizer slots, last-seen times, filter counters; plus ``{seq, ts_ms, last_evict_s}``) or
  ``dense-state`` (params + optimizer slots). Absent until the first compaction.
* ``log``     (``BagState[bytes]``): the entries applied since the base, each an envelope
  carrying its sequence number: a gradient batch as received (``sparse-grads``: table, fids,
  grads, ts_ms; ``dense-grads``: the gradient arrays) or an eviction (``evict``, with its event
  time ``now_s``).
* ``version`` (``ReadModifyWriteState[varint]``): a random 63-bit token, replaced at every
  state change (0 / absent: the key has no state).

A bundle writes only what changed: one bag append per entry and the 8-byte token; ``base`` is
written (and ``log`` cleared) once every ``compact_every`` entries. :data:`STATE_FORMAT` names
this layout (a savepoint's manifest records it: state of another format is refused).

**Why gradient batches in the log, not touched rows.** Replaying the inputs through the same
deterministic table (``EmbeddingTable`` I6: same seed, same calls, same result) reproduces
*everything* the shard state holds, including frequency-filter counts of ids that have no row
yet, which a log of touched rows would lose (a retried batch would then count sightings twice
or never). It is also smaller: a gradient row is ``8 + 4·dim`` bytes, a touched row with its
Adagrad/Adam slots and last-seen time ``12 + 8·dim`` to ``16 + 12·dim``; and it costs little
on the hot path (the log entry is the input's own bytes in an envelope). The price, replaying up
to ``compact_every`` batches through the optimizer, is paid only on a rebuild.

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
``export_dir/<kind>-<key>.snap`` (``ps.snapshot_files``). With ``restore_dir``, every snapshot
file of the shard's kind is read and checked when the DoFn is constructed
(``check_restore_dir``), so a job refuses to start on a damaged, foreign or missing snapshot;
then a key that has no state yet starts from its snapshot instead of empty, and the restored
state is written to Beam state at once (so a later failure rebuilds from it, not from
nothing). A different shard count re-shards the sparse rows with ``shard_of`` (filter counts
of row-less ids are then lost: they start counting again).

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

import os
import secrets
import time
from typing import Optional, Tuple

import apache_beam as beam
from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, ReadModifyWriteStateSpec, TimerSpec,
                                              on_timer)
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp

from ps.envelope import VERSION, Envelope, open_envelope
from ps.snapshot_files import SnapshotFileError, check_restore_dir, read_snapshot, write_snapshot
from ps.store import open_store

__all__ = ["LoggedShard", "LiveState", "shard_timers", "STATE_FORMAT"]

#: The layout of the PS's Beam state (cells above, ``ps.envelope`` entries): recorded in
#: savepoint manifests, so that a job refuses a savepoint whose PS state it cannot read.
STATE_FORMAT = f"base+log+version, ps.envelope v{VERSION}"


def _new_token() -> int:
    return secrets.randbits(63) or 1


class LiveState:
    """The in-memory state of one key (L2): what ``base`` + ``log`` describe, plus bookkeeping.
    Each shard class adds its own fields (``tables``; ``params``, ``slots``, ``steps``)."""

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
        self.export_armed = False  # the export timer was set (with export_dir)
        # What the key has applied since it began, checkpointed with it (so exactly once):
        # SparseShard {"gradient_rows": n}, DenseShard {"examples": n, "batches": n}.
        self.totals = {}


class LoggedShard(beam.DoFn):
    """The base + log + version machinery shared by ``SparseShard`` and ``DenseShard``.

    Subclasses name their ``KIND`` (snapshot file prefix and timer id prefix), the envelope
    kinds of their log entries (``LOG_KINDS``), get their timers from :func:`shard_timers`, and
    implement the hooks: ``_empty``, ``_encode_base``, ``_decode_base``, ``_replay``,
    ``_reconcile``, ``_publish``, ``_publish_train``.

    Args:
        store_url: the serving view's store (published every sync interval).
        num_shards: the sparse shard count (None for the dense set).
        sync_interval_s: event-time seconds between publishes (0: after every input).
        compact_every: log entries after which the log is compacted into a new base.
        export_dir: where to write each key's snapshot when a bounded input ends (None: none).
        restore_dir: snapshots to start keys without state from (None: start empty).
        train_store_url: the training view's store (published after every input), or None.
    """

    BASE = ReadModifyWriteStateSpec("base", BytesCoder())
    LOG = BagStateSpec("log", BytesCoder())
    VERSION = ReadModifyWriteStateSpec("version", VarIntCoder())
    KIND = "shard"  # snapshot file prefix; also the prefix of the timer ids
    LOG_KINDS: Tuple[str, ...] = ()  # the envelope kinds of the log entries

    def __init__(self, store_url: str, num_shards: Optional[int], sync_interval_s: float,
                 compact_every: int, export_dir: Optional[str] = None,
                 restore_dir: Optional[str] = None, train_store_url: Optional[str] = None):
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
    def _empty(self, key) -> LiveState:
        raise NotImplementedError

    def _decode_base(self, key, data: bytes) -> LiveState:
        raise NotImplementedError

    def _encode_base(self, live: LiveState) -> bytes:
        raise NotImplementedError

    def _replay(self, live: LiveState, entry: Envelope) -> None:
        raise NotImplementedError

    def _reconcile(self, key, live: LiveState) -> None:
        raise NotImplementedError

    def _publish(self, key, live: LiveState) -> None:
        raise NotImplementedError

    def _publish_train(self, key, live: LiveState) -> None:
        raise NotImplementedError

    def _snapshot_key(self, key) -> str:
        return str(key)

    def _restore(self, key) -> Optional[LiveState]:
        """The key's state from ``restore_dir`` (None: nothing to restore for it)."""
        path = os.path.join(self.restore_dir, f"{self.KIND}-{self._snapshot_key(key)}.snap")
        if not os.path.exists(path):
            return None
        meta, payload = read_snapshot(path)
        if meta.get("kind") != self.KIND:
            raise SnapshotFileError(f"{path} holds a {meta.get('kind')!r} snapshot, not {self.KIND!r}")
        return self._decode_base(key, payload)

    # --------------------------------------------------------- machinery
    def _live(self, key, base, log, version) -> LiveState:
        """The cached live state of ``key`` if it equals the committed state (L3), else a
        rebuild from ``base`` + ``log`` (L1) followed by a reconciliation of the store (L4)."""
        token = version.read() or 0
        live = self._cache.get(key)
        if live is not None and live.token == token:
            return live
        if token:
            data = base.read()
            live = self._decode_base(key, data) if data else self._empty(key)
            entries = sorted((open_envelope(raw, self.LOG_KINDS) for raw in log.read()),
                             key=lambda e: e.header["seq"])
            seqs = [e.header["seq"] for e in entries]
            if seqs != list(range(live.seq + 1, live.seq + 1 + len(entries))):
                raise RuntimeError(f"PS state of key {key!r} is inconsistent: base seq {live.seq}, "
                                   f"log seqs {seqs[:10]}...")
            for entry in entries:
                self._replay(live, entry)
                live.seq = entry.header["seq"]
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

    def _append(self, live: LiveState, entry: bytes, base, log, version) -> None:
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

    def _maybe_publish(self, key, live: LiveState, sync_timer) -> None:
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

    def _do_publish(self, key, live: LiveState) -> None:
        self._publish(key, live)
        live.dirty = False
        live.next_publish_s = live.ts_ms // 1000 + self.sync_interval_s
        self.publishes.inc()

    def _on_sync(self, key, base, log, version):
        live = self._live(key, base, log, version)
        live.sync_timer_at = None
        if live.dirty:
            self._do_publish(key, live)

    def _arm_export(self, live: LiveState, export_timer) -> None:
        if self.export_dir and not live.export_armed:
            export_timer.set(GlobalWindow().max_timestamp())
            live.export_armed = True

    def _on_export(self, key, base, log, version):
        """End of a bounded input: publish what is pending, then write the key's snapshot."""
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
    def _sync_record(live: LiveState) -> dict:
        """What a publish records in the store's sync info: the version (entries applied),
        event time, wall time and the key's totals."""
        return {"version": int(live.seq), "ts_ms": int(live.ts_ms), "wall_time": time.time(),
                **live.totals}

    @staticmethod
    def _check_window(window):
        """State is per key *and window*: a PS must see all its input in the global window."""
        if not isinstance(window, GlobalWindow):
            raise ValueError(f"PS shards need their input in the global window, got {window!r}: "
                             f"window the training section with beam.WindowInto(GlobalWindows())")


def shard_timers(kind: str):
    """The sync and export timers of a shard class, and their callbacks.

    Each class gets timer ids of its own (``<kind>_sync``, ``<kind>_export``): the FnApiRunner
    mixes up the timers of two stateful transforms fused into one stage when their timer ids
    are equal (a SparseShard's end-of-input timers fired a DenseShard's callback, and vice
    versa). In the class body: ``SYNC, EXPORT, on_sync, on_export = shard_timers(KIND)``.

    Args:
        kind: the class's ``KIND``.

    Returns:
        ``(sync spec, export spec, on_sync callback, on_export callback)``.
    """
    sync = TimerSpec(f"{kind}_sync", TimeDomain.WATERMARK)
    export = TimerSpec(f"{kind}_export", TimeDomain.WATERMARK)

    @on_timer(sync)
    def on_sync(self, key=beam.DoFn.KeyParam, base=beam.DoFn.StateParam(LoggedShard.BASE),
                log=beam.DoFn.StateParam(LoggedShard.LOG),
                version=beam.DoFn.StateParam(LoggedShard.VERSION)):
        self._on_sync(key, base, log, version)

    @on_timer(export)
    def on_export(self, key=beam.DoFn.KeyParam, base=beam.DoFn.StateParam(LoggedShard.BASE),
                  log=beam.DoFn.StateParam(LoggedShard.LOG),
                  version=beam.DoFn.StateParam(LoggedShard.VERSION)):
        self._on_export(key, base, log, version)

    return sync, export, on_sync, on_export
