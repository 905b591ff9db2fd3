"""SparseShard: the parameter-server DoFn that owns the embedding rows.

Keyed by shard id: it owns the rows of the fids ``ps.sharding.shard_of`` gives it, one
``EmbeddingTable`` per table name, applies their gradient batches, keeps them in Beam state and
publishes them to a ``ps.store.ParameterStore``; the state, exactly-once and publishing
machinery (and its invariants L1-L5) is ``ps.shard_state``'s.
"""
from __future__ import annotations

import glob
import logging
import os
import time
from typing import Dict, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from ps.embedding_table import EmbeddingTable, SlotConfig
from ps.envelope import open_envelope, seal, seal_arrays
from ps.optimizers import as_optimizer
from ps.sharding import shard_of
from ps.shard_state import LiveState, LoggedShard, shard_timers
from ps.snapshot_files import read_snapshot

__all__ = ["SparseShard"]

_LOG = logging.getLogger(__name__)


def _as_slot_config(config) -> SlotConfig:
    if isinstance(config, SlotConfig):
        return config
    if isinstance(config, dict):
        expiry = config.get("expiry_s", config.get("expiry"))
        return SlotConfig(threshold=int(config.get("threshold", 0)),
                          expiry=None if expiry is None else int(expiry))
    threshold, expiry = config
    return SlotConfig(int(threshold), None if expiry is None else int(expiry))


class SparseShard(LoggedShard):
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
        export_dir: where each key writes its snapshot file when a bounded input ends
            (None: no export; ``ps.shard_state``).
        restore_dir: the snapshot files keys without state start from, each checked when the
            DoFn is constructed (None: start empty).

    >>> import apache_beam as beam
    >>> from ps.gradients import SparseGradients
    >>> from ps.store import open_store
    >>> fids = np.array([1, 2, 3, 4], np.uint64)
    >>> owners = shard_of(fids, 2)
    >>> grads = [(s, SparseGradients("dim2", fids[owners == s], np.ones(((owners == s).sum(), 2),
    ...                                                                 np.float32), 1_700_000_000_000, 1))
    ...          for s in range(2)]
    >>> with beam.Pipeline() as p:
    ...     _ = p | beam.Create(grads) | beam.ParDo(SparseShard(
    ...         "memory://sparse-example", 2, {"dim2": 2}, optimizer="sgd", lr=0.5, sync_interval_s=0))
    >>> rows, found = open_store("memory://sparse-example", 2).read_rows("dim2", fids, width=2)
    >>> rows.tolist(), found.all()
    ([[-0.5, -0.5], [-0.5, -0.5], [-0.5, -0.5], [-0.5, -0.5]], True)
    """

    KIND = "sparse"
    LOG_KINDS = ("sparse-grads", "evict")
    SYNC, EXPORT, on_sync, on_export = shard_timers(KIND)
    EVICT = TimerSpec("sparse_evict", TimeDomain.WATERMARK)

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
        self.optimizer = as_optimizer(optimizer, lr)
        self.init_scale = float(init_scale)
        self.filter_bytes = int(filter_bytes)
        self.seed = int(seed)
        expiries = [c.expiry for c in [self.default_slot, *self.slots.values()] if c.expiry is not None]
        self.evict_interval_s = None if evict_interval_s is None or not expiries else int(evict_interval_s)
        self.gradient_rows_applied = Metrics.counter("ps", "gradient_rows_applied")
        # wall time of one gradient record, state and publishing included (docs/scaling.md)
        self.apply_us = Metrics.distribution("ps", "sparse_apply_us")
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
        live = LiveState()
        live.tables = {name: self.new_table(dim) for name, dim in self.tables.items()}
        return live

    def _encode_base(self, live):
        blobs = [(name, t.to_bytes()) for name, t in live.tables.items()]
        return seal("sparse-state", {"seq": live.seq, "ts_ms": live.ts_ms,
                                     "last_evict_s": live.last_evict_s, "totals": live.totals,
                                     "tables": [[name, len(b)] for name, b in blobs]},
                    *(b for _, b in blobs))

    def _decode_base(self, key, data):
        envelope = open_envelope(data, "sparse-state")
        header, data, offset = envelope.header, envelope.payload, 0
        live = LiveState()
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
        paths = sorted(glob.glob(os.path.join(glob.escape(self.restore_dir), f"{self.KIND}-*.snap")))
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

    def _replay(self, live, entry):
        if entry.kind == "evict":
            self._evict(live, entry.header["now_s"])
            return
        arrays = entry.arrays()
        self._apply_grads(live, entry.header["table"], arrays["fids"], arrays["grads"],
                          entry.header["ts_ms"])

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

    def _set_sync(self, store, shard, live):
        store.set_sync(f"sparse/{shard}", self._sync_record(live))

    # --------------------------------------------------------- DoFn methods
    def process(self, element, base=beam.DoFn.StateParam(LoggedShard.BASE),
                log=beam.DoFn.StateParam(LoggedShard.LOG),
                version=beam.DoFn.StateParam(LoggedShard.VERSION),
                sync_timer=beam.DoFn.TimerParam(SYNC),
                evict_timer=beam.DoFn.TimerParam(EVICT),
                export_timer=beam.DoFn.TimerParam(EXPORT),
                window=beam.DoFn.WindowParam):
        started = time.perf_counter()
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
        entry = seal_arrays("sparse-grads", {"fids": fids, "grads": grads}, seq=live.seq + 1,
                            ts_ms=ts_ms, table=g.table)
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
        self.apply_us.update(int(1e6 * (time.perf_counter() - started)))
        return ()  # no output: the PS publishes to the store

    def _evict_logged(self, live, now_s, base, log, version):
        removed = self._evict(live, now_s)
        live.seq += 1
        self._append(live, seal("evict", {"seq": live.seq, "now_s": int(now_s)}), base, log, version)
        self.rows_evicted.inc(int(removed))

    @on_timer(EVICT)
    def on_evict(self, key=beam.DoFn.KeyParam, timestamp=beam.DoFn.TimestampParam,
                 base=beam.DoFn.StateParam(LoggedShard.BASE),
                 log=beam.DoFn.StateParam(LoggedShard.LOG),
                 version=beam.DoFn.StateParam(LoggedShard.VERSION),
                 sync_timer=beam.DoFn.TimerParam(SYNC)):
        live = self._live(key, base, log, version)
        live.evict_timer_at = None
        now_s = int(timestamp.micros // 1_000_000)
        if self.evict_interval_s is None or live.last_evict_s is None \
                or now_s < live.last_evict_s + self.evict_interval_s:
            return  # an eviction happened inline since the timer was set
        self._evict_logged(live, now_s, base, log, version)
        self._maybe_publish(key, live, sync_timer)
