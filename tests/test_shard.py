"""SparseShard / DenseShard: exactly-once under retries and restores, and on real runners.

The unit tests drive the DoFns' ``process`` and timer callbacks directly with fake state
cells that have bundle semantics: a bundle works on a copy of the committed state of its keys
and commits it at the end; a failing bundle's writes are discarded (the store, being outside
Beam, keeps whatever the DoFn published). A *retry* runs the failed bundle again, on the same
DoFn instance or a new one; a *restore* rolls the committed state (timers included) back to a
checkpoint and replays the input from there, like Flink does. The final tables and the store
must equal those of a run without failures, and a plain reference: an ``EmbeddingTable``
given the same gradients (and evictions) directly.
"""
from __future__ import annotations

import copy
import json
import pickle
import random
import uuid

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.coders import BytesCoder, VarIntCoder
from apache_beam.transforms.window import GlobalWindow, IntervalWindow
from apache_beam.utils.timestamp import Timestamp

from dataflow.job import metrics_dict
from dataflow.options import pipeline_options
from ps.dense_shard import DenseShard
from ps.optimizers import as_optimizer
from ps.sparse_shard import SparseShard
from ps.store import open_store, view_url
from ps.gradients import DenseGradients, SparseGradients
from ps.sharding import shard_of

T0_MS = 1_700_000_000_000
TABLES = {"t4": 4, "t2": 2}
SLOTS = {1: {"threshold": 2, "expiry_s": 120}, 2: {"threshold": 3}, 3: {"expiry_s": 40}}


# ---------------------------------------------------------------------------- fake state


class _Value:
    def __init__(self, cell, name, coder):
        self.cell, self.name, self.coder = cell, name, coder

    def read(self):
        return self.cell[self.name]

    def write(self, value):
        self.coder.encode(value)  # what the runner would do: wrong types fail here
        self.cell[self.name] = value
        self.cell["writes"][self.name] = self.cell["writes"].get(self.name, 0) + 1

    def clear(self):
        self.cell[self.name] = None


class _Bag(_Value):
    def read(self):
        return list(self.cell[self.name])

    def add(self, value):
        BytesCoder().encode(value)
        self.cell[self.name] = self.cell[self.name] + [value]
        self.cell["writes"]["log"] = self.cell["writes"].get("log", 0) + 1

    def clear(self):
        self.cell[self.name] = []


class _Timer:
    def __init__(self, cell, name):
        self.cell, self.name = cell, name

    def set(self, ts):
        self.cell["timers"][self.name] = Timestamp.of(ts)

    def clear(self):
        self.cell["timers"].pop(self.name, None)


def _empty_cell():
    return {"base": None, "log": [], "version": None, "timers": {}, "writes": {}}


class BundleFailed(Exception):
    pass


class _Counter:
    """Stands in for a Beam counter: counts into the running bundle, kept only if it commits."""

    def __init__(self, harness, name):
        self.harness, self.name = harness, name

    def inc(self, n=1):
        pending = self.harness.pending_metrics
        pending[self.name] = pending.get(self.name, 0) + n

    def update(self, value):
        pass


class Harness:
    """Runs a DoFn over an event list with bundles, failures, retries and restores."""

    def __init__(self, make_dofn, seed=0, fail_rate=0.0, restore_rate=0.0, checkpoint_rate=0.3):
        self.make_dofn = make_dofn
        self.rng = random.Random(seed)
        self.fail_rate, self.restore_rate, self.checkpoint_rate = fail_rate, restore_rate, checkpoint_rate
        self.committed = {}
        self.metrics, self.pending_metrics = {}, {}
        self.dofn = self.new_dofn()
        self.failures = self.restores = 0

    def new_dofn(self):
        dofn = pickle.loads(pickle.dumps(self.make_dofn()))  # as a runner ships it
        dofn.setup()
        for attr, value in list(vars(dofn).items()):
            if hasattr(value, "metric_name"):
                setattr(dofn, attr, _Counter(self, value.metric_name.name))
        return dofn

    def _cells(self, working, key):
        if key not in working:
            working[key] = copy.deepcopy(self.committed.get(key, _empty_cell()))
            working[key]["writes"] = {}
        c = working[key]
        return dict(base=_Value(c, "base", BytesCoder()), log=_Bag(c, "log", BytesCoder()),
                    version=_Value(c, "version", VarIntCoder()))

    def _run_bundle(self, actions, may_fail=True):
        """Each action is (key, fn(cells)). All or nothing, like a bundle."""
        working = {}
        self.pending_metrics = {}
        fail_at = -1
        if may_fail and self.rng.random() < self.fail_rate:
            fail_at = self.rng.randrange(len(actions) + 1)
        for i, (key, fn) in enumerate(actions):
            if i == fail_at:
                raise BundleFailed()
            fn(self._cells(working, key), working[key])
        if fail_at == len(actions):
            raise BundleFailed()
        self.committed.update(working)
        for name, n in self.pending_metrics.items():
            self.metrics[name] = self.metrics.get(name, 0) + n
        return working

    def bundle(self, actions):
        for _ in range(50):
            try:
                return self._run_bundle(actions)
            except BundleFailed:
                self.failures += 1
                if self.rng.random() < 0.5:
                    self.dofn = self.new_dofn()
        return self._run_bundle(actions, may_fail=False)

    def _element_action(self, key, value):
        def act(cells, cell):
            timers = dict(sync_timer=_Timer(cell, "sync"))
            if isinstance(self.dofn, SparseShard):
                timers["evict_timer"] = _Timer(cell, "evict")
            self.dofn.process((key, value), **cells, **timers, window=GlobalWindow())
        return key, act

    def _timer_action(self, key, name, ts):
        def act(cells, cell):
            cell["timers"].pop(name, None)  # delivered (set again if the callback sets it)
            if name == "sync":
                self.dofn.on_sync(key=key, **cells)
            else:
                self.dofn.on_evict(key=key, timestamp=ts, sync_timer=_Timer(cell, "sync"), **cells)
        return key, act

    def fire_timers(self, watermark):
        for _ in range(10_000):
            due = sorted((ts, key, name) for key, c in self.committed.items()
                         for name, ts in c["timers"].items() if ts <= watermark)
            if not due:
                return
            ts, key, name = due[0]
            self.bundle([self._timer_action(key, name, ts)])
        raise AssertionError("timers keep firing")

    def run(self, events):
        """events: ("element", key, value) or ("watermark", Timestamp)."""
        position, checkpoint = 0, (0, {})
        while position < len(events):
            if self.rng.random() < self.checkpoint_rate:
                checkpoint = (position, copy.deepcopy(self.committed))
            if self.restore_rate and self.rng.random() < self.restore_rate and self.restores < 5:
                self.restores += 1
                position, state = checkpoint
                self.committed = copy.deepcopy(state)
                if self.rng.random() < 0.7:
                    self.dofn = self.new_dofn()
                continue
            kind = events[position][0]
            if kind == "watermark":
                self.fire_timers(events[position][1])
                position += 1
                continue
            size = 1
            while size < 4 and position + size < len(events) and events[position + size][0] == "element" \
                    and self.rng.random() < 0.6:
                size += 1
            self.bundle([self._element_action(e[1], e[2]) for e in events[position:position + size]])
            position += size
        self.fire_timers(Timestamp.of(2**40))


# ---------------------------------------------------------------------------- data


def fid(slot, value):
    return (slot << 48) | value


def make_batches(num_shards=2, batches=40, seed=1, rows=60, step_s=7):
    """Gradient batches per shard, in event-time order (a little jitter), Zipf-ish ids."""
    rng = np.random.default_rng(seed)
    out = []
    for b in range(batches):
        table = "t4" if b % 3 else "t2"
        slots = rng.integers(0, 4, rows)
        values = np.minimum(rng.zipf(1.3, rows), 300)
        fids = ((slots.astype(np.uint64) << np.uint64(48)) | values.astype(np.uint64))
        grads = rng.standard_normal((rows, TABLES[table])).astype(np.float32)
        ts_ms = T0_MS + b * step_s * 1000 + int(rng.integers(-3000, 3000))
        shards = shard_of(fids, num_shards)
        for s in range(num_shards):
            mine = shards == s
            if mine.any():
                out.append((s, SparseGradients(table, fids[mine], grads[mine], ts_ms, 5)))
    return out


def events_with_watermarks(batches, every=5, lag_s=30):
    events = []
    for i, (key, g) in enumerate(batches):
        events.append(("element", key, g))
        if i % every == every - 1:
            events.append(("watermark", Timestamp(seconds=g.ts_ms // 1000 - lag_s)))
    return events


def sparse_factory(url, num_shards=2, **kw):
    kw.setdefault("sync_interval_s", 20)
    kw.setdefault("evict_interval_s", 60)
    kw.setdefault("compact_every", 5)
    kw.setdefault("slots", SLOTS)
    kw.setdefault("filter_bytes", 1 << 14)
    kw.setdefault("init_scale", 0.01)
    return lambda: SparseShard(url, num_shards, TABLES, **kw)


def table_content(table):
    parts = list(table.items())
    keys = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.uint64)
    rows = np.concatenate([p[1] for p in parts]) if parts else np.empty((0, table.width), np.float32)
    seen = np.concatenate([p[2] for p in parts]) if parts else np.empty(0, np.uint32)
    order = np.argsort(keys)
    stats = {k: v for k, v in vars(table.stats).items() if k not in ("rehashes", "kick_failures")}
    counts = None if table.filter is None else table.filter.counts.tobytes()
    return keys[order].tolist(), rows[order].tobytes(), seen[order].tolist(), counts, table.event_time, stats


def committed_tables(harness, make_dofn, key):
    """Rebuild a key's tables from the committed state with a DoFn on a scratch store."""
    dofn = make_dofn()
    dofn.store_url = f"memory://scratch-{uuid.uuid4().hex}"
    dofn.setup()
    cell = harness.committed[key]
    state = dict(base=_Value(cell, "base", BytesCoder()), log=_Bag(cell, "log", BytesCoder()),
                 version=_Value(cell, "version", VarIntCoder()))
    return dofn._live(key, **state)


def store_content(store, num_shards=2):
    out = {}
    for name in TABLES:
        for s in range(num_shards):
            fids, rows = store.shard_rows(name, s)
            out[(name, s)] = (fids.tolist(), rows.tobytes())
    return out


def reference_tables(batches, factory, num_shards=2, evict_interval_s=60):
    """Plain reference: the gradients applied to EmbeddingTables directly, with the shard's
    eviction rule when timers fire only at the end (bounded input): inline when event time
    passes last + interval, then once at last + interval."""
    proto = factory()
    tables, last, ts = {}, {}, {}
    for s, g in batches:
        shard = tables.setdefault(s, {n: proto.new_table(d) for n, d in TABLES.items()})
        now = g.ts_ms // 1000
        shard[g.table].apply_gradients(g.fids, g.grads, now=now)
        ts[s] = max(ts.get(s, 0), g.ts_ms)
        last.setdefault(s, now)
        if ts[s] // 1000 >= last[s] + evict_interval_s:
            last[s] = ts[s] // 1000
            for t in shard.values():
                t.evict(now=last[s])
    for s, shard in tables.items():
        for t in shard.values():
            t.evict(now=last[s] + evict_interval_s)
    return tables


def assert_store_equals_tables(store, tables_by_shard):
    for s, tables in tables_by_shard.items():
        for name, t in tables.items():
            fids, rows = store.shard_rows(name, s)
            keys, full, *_ = table_content(t)
            assert fids.tolist() == keys, (name, s)
            want = np.frombuffer(full, np.float32).reshape(-1, t.width)[:, :t.dim]
            np.testing.assert_array_equal(rows.reshape(-1, t.dim) if rows.size else want[:0], want)


# ---------------------------------------------------------------------------- sparse


def test_clean_run_equals_plain_reference():
    url = f"memory://clean-{uuid.uuid4().hex}"
    factory = sparse_factory(url)
    batches = make_batches()
    harness = Harness(factory, seed=0)
    harness.run([("element", k, g) for k, g in batches])  # timers fire only at the end
    reference = reference_tables(batches, factory)
    store = open_store(url, 2)
    assert_store_equals_tables(store, reference)  # before any rebuild could reconcile it
    for s in reference:
        live = committed_tables(harness, factory, s)
        for name in TABLES:
            assert table_content(live.tables[name]) == table_content(reference[s][name])
            assert len(reference[s][name]) > 0
    # evictions and filter drops did happen
    stats = [t.stats for shard in reference.values() for t in shard.values()]
    assert sum(x.rows_evicted for x in stats) > 0 and sum(x.dropped_gradients for x in stats) > 0
    info = store.sync_info()
    assert set(info) == {"sparse/0", "sparse/1"}
    for s in (0, 1):
        assert info[f"sparse/{s}"]["ts_ms"] == max(g.ts_ms for k, g in batches if k == s)


@pytest.mark.parametrize("seed,fail_rate,restore_rate,backend", [
    (1, 0.3, 0.0, "memory"), (2, 0.5, 0.0, "memory"), (3, 0.0, 0.15, "memory"),
    (4, 0.3, 0.1, "memory"), (5, 0.4, 0.2, "memory"), (6, 0.2, 0.1, "memory"),
    pytest.param(7, 0.3, 0.15, "redis", marks=pytest.mark.redis)])
def test_exactly_once_under_retries_and_restores(seed, fail_rate, restore_rate, backend, request):
    batches = make_batches(seed=seed)
    events = events_with_watermarks(batches)

    def run(fail, restore):
        url = f"memory://eo-{uuid.uuid4().hex}"
        if backend == "redis":
            url = f"{request.getfixturevalue('redis_server')}/2?prefix=eo{uuid.uuid4().hex}"
        factory = sparse_factory(url)
        harness = Harness(factory, seed=seed, fail_rate=fail, restore_rate=restore)
        harness.run(events)
        return harness, factory, open_store(url, 2)

    clean, factory, clean_store = run(0.0, 0.0)
    faulty, _, faulty_store = run(fail_rate, restore_rate)
    assert faulty.failures + faulty.restores > 0
    assert store_content(faulty_store) == store_content(clean_store)
    tables = {}
    for s in (0, 1):
        want = committed_tables(clean, factory, s)
        got = committed_tables(faulty, factory, s)
        tables[s] = got.tables
        assert got.seq == want.seq
        for name in TABLES:
            assert table_content(got.tables[name]) == table_content(want.tables[name])
        assert faulty_store.sync_info()[f"sparse/{s}"]["version"] == want.seq
    assert_store_equals_tables(faulty_store, tables)


class _CheckingHarness(Harness):
    """A Harness that calls ``check()`` after every committed bundle."""

    def __init__(self, *args, check, **kw):
        super().__init__(*args, **kw)
        self.check = check

    def _run_bundle(self, actions, may_fail=True):
        working = super()._run_bundle(actions, may_fail)
        self.check(self, working)
        return working


@pytest.mark.parametrize("seed,fail_rate,restore_rate,backend", [
    (1, 0.0, 0.0, "memory"), (4, 0.3, 0.1, "memory"),
    pytest.param(7, 0.3, 0.15, "redis", marks=pytest.mark.redis)])
def test_training_view_is_fresh_serving_view_lags(seed, fail_rate, restore_rate, backend,
                                                  request):
    """With a training view the PS publishes every input there (the worker trains on fresh
    rows) and every sync interval to serving; retries and restores keep both exact."""
    url = f"memory://views-{uuid.uuid4().hex}"
    if backend == "redis":
        url = f"{request.getfixturevalue('redis_server')}/2?prefix=vw{uuid.uuid4().hex}"
    train_url = view_url(url, "train")
    factory = sparse_factory(url, train_store_url=train_url)
    serving, train = open_store(url, 2), open_store(train_url, 2)
    lagged = []

    def check(harness, working):
        for key in working:
            live = harness.dofn._cache[key]  # equals the committed state after a bundle (L2)
            assert train.sync_info()[f"sparse/{key}"]["version"] == live.seq
            assert serving.sync_info()[f"sparse/{key}"]["version"] <= live.seq
            lagged.append(serving.sync_info()[f"sparse/{key}"]["version"] < live.seq)
            for name, t in live.tables.items():
                fids, rows = train.shard_rows(name, key)
                keys, full, *_ = table_content(t)
                assert fids.tolist() == keys
                want = np.frombuffer(full, np.float32).reshape(-1, t.width)[:, :t.dim]
                np.testing.assert_array_equal(rows.reshape(-1, t.dim) if rows.size else want[:0],
                                              want)

    batches = make_batches(seed=seed)
    harness = _CheckingHarness(factory, seed=seed, fail_rate=fail_rate,
                               restore_rate=restore_rate, check=check)
    harness.run(events_with_watermarks(batches))
    assert any(lagged) and not all(lagged)  # serving did lag, and did catch up
    if fail_rate or restore_rate:
        assert harness.failures + harness.restores > 0
    reference = reference_tables(batches, factory)
    assert_store_equals_tables(serving, reference)  # the end: the last sync published all
    assert_store_equals_tables(train, reference)
    for s in (0, 1):
        rows = sum(g.fids.size for k, g in batches if k == s)
        assert serving.sync_info()[f"sparse/{s}"]["gradient_rows"] == rows
        assert train.sync_info()[f"sparse/{s}"]["gradient_rows"] == rows


def test_training_view_from_a_state_without_one():
    """A base written by a shard without a training view (one delta channel) rebuilds into a
    shard with one: both views get the whole table, then deltas flow to both."""
    url = f"memory://noview-{uuid.uuid4().hex}"
    batches = make_batches(seed=9)
    harness = Harness(sparse_factory(url), seed=9)
    harness.run([("element", k, g) for k, g in batches])
    assert harness.committed[0]["base"]  # compacted: the rebuild decodes a base
    train_url = view_url(url, "train")
    with_view = sparse_factory(url, train_store_url=train_url)
    live = committed_tables(harness, with_view, 0)
    assert all(t.channels == 2 for t in live.tables.values())
    assert_store_equals_tables(open_store(train_url, 2), {0: live.tables})
    open_store(url, 2).clear()  # clears its views too
    assert open_store(train_url, 2).shard_rows("t4", 0)[0].size == 0


def test_dense_training_view_is_fresh():
    url = f"memory://dense-views-{uuid.uuid4().hex}"
    train_url = view_url(url, "train")
    factory = lambda: DenseShard(url, "dense", dense_params(), optimizer="adam", lr=0.01,  # noqa: E731
                                 sync_interval_s=12, compact_every=4, train_store_url=train_url)
    serving, train = open_store(url, None), open_store(train_url, None)

    def check(harness, working):
        live = harness.dofn._cache["dense"]
        got, version = train.read_dense("dense")
        assert version == live.seq
        for k, v in live.params.items():
            np.testing.assert_array_equal(got[k], v)
        assert serving.read_dense("dense")[1] <= live.seq

    batches = dense_batches(seed=5)
    harness = _CheckingHarness(factory, seed=5, fail_rate=0.3, check=check)
    harness.run(events_with_watermarks(batches, every=4, lag_s=10))
    assert serving.read_dense("dense")[1] == train.read_dense("dense")[1] == len(batches)


def test_metrics_count_each_input_once_despite_retries():
    """Replays during rebuilds do not count: committed counters equal a clean run's."""
    url = f"memory://metrics-{uuid.uuid4().hex}"
    factory = sparse_factory(url)
    batches = make_batches(seed=8)
    harness = Harness(factory, seed=8, fail_rate=0.5)
    harness.run([("element", k, g) for k, g in batches])
    assert harness.failures > 0 and harness.metrics["rebuilds"] > 0
    reference = reference_tables(batches, factory)
    stats = [t.stats for shard in reference.values() for t in shard.values()]
    assert harness.metrics["gradient_rows_applied"] == sum(g.fids.size for _, g in batches)
    assert harness.metrics["gradients_dropped_by_filter"] == sum(x.dropped_gradients for x in stats)
    assert harness.metrics["rows_created"] == sum(x.rows_created for x in stats)
    assert harness.metrics["rows_evicted"] == sum(x.rows_evicted for x in stats)


def test_divergent_history_is_detected():
    """A DoFn instance that applied a batch which a restore then undid must not trust its
    cache when the state reaches the same number of entries through other input (why the
    version is a random token, not a counter)."""
    url = f"memory://diverge-{uuid.uuid4().hex}"
    factory = sparse_factory(url, num_shards=1, evict_interval_s=None, slots={})
    e1, e2, e3 = [g for _, g in make_batches(num_shards=1, batches=3, seed=9)]
    harness = Harness(factory)
    instance_a = harness.dofn
    harness.bundle([harness._element_action(0, e1)])
    checkpoint = copy.deepcopy(harness.committed)
    harness.bundle([harness._element_action(0, e2)])  # A: base + e1 + e2
    harness.committed = checkpoint  # restore; the replayed input differs (e3, not e2) ...
    harness.dofn = harness.new_dofn()  # ... and reaches another instance B
    harness.bundle([harness._element_action(0, e3)])  # state: e1 + e3, as many entries as A's
    harness.dofn = instance_a  # A gets the key back
    harness.bundle([harness._element_action(0, e2)])  # state must be e1 + e3 + e2
    harness.fire_timers(Timestamp.of(2**40))
    reference = {name: factory().new_table(d) for name, d in TABLES.items()}
    for g in (e1, e3, e2):
        reference[g.table].apply_gradients(g.fids, g.grads, now=g.ts_ms // 1000)
    live = committed_tables(harness, factory, 0)
    for name in TABLES:
        assert table_content(live.tables[name]) == table_content(reference[name])
    assert_store_equals_tables(open_store(url, 1), {0: reference})


def test_state_writes_are_small_and_compaction_bounds_the_log():
    """A bundle appends one log entry and a token; the base is written every compact_every."""
    url = f"memory://writes-{uuid.uuid4().hex}"
    factory = sparse_factory(url, num_shards=1, compact_every=4, evict_interval_s=None)
    harness = Harness(factory)
    batches = make_batches(num_shards=1, batches=10)
    for i, (k, g) in enumerate(batches):
        working = harness.bundle([harness._element_action(k, g)])
        writes = working[0]["writes"]
        assert writes["log"] == 1 and writes["version"] == 1
        assert writes.get("base", 0) == (1 if (i + 1) % 4 == 0 else 0)
        assert len(harness.committed[0]["log"]) == (i + 1) % 4
        entry = harness.committed[0]["log"][-1] if harness.committed[0]["log"] else b""
        # the input's bytes in a ps.envelope: its 24-byte head and a JSON header (seq, event
        # time, table, the two arrays' shapes)
        assert len(entry) < 160 + g.fids.size * (8 + 4 * TABLES[g.table]) + 1


def test_sync_interval_bounds_staleness():
    """Nothing is published until event time passes the interval; then the store has it."""
    url = f"memory://sync-{uuid.uuid4().hex}"
    factory = sparse_factory(url, num_shards=1, sync_interval_s=100, evict_interval_s=None, slots={})
    harness = Harness(factory)
    store = open_store(url, 1)
    f = np.array([fid(0, 1), fid(0, 2)], np.uint64)
    g = lambda ts_s: SparseGradients("t2", f, np.ones((2, 2), np.float32), T0_MS + ts_s * 1000, 1)  # noqa: E731
    harness.bundle([harness._element_action(0, g(0))])  # first build: the store is reconciled
    version0 = store.sync_info()["sparse/0"]["version"]
    harness.bundle([harness._element_action(0, g(50))])
    assert store.sync_info()["sparse/0"]["version"] == version0  # within the interval
    assert harness.committed[0]["timers"]["sync"] == Timestamp(seconds=T0_MS // 1000 + 100)
    harness.bundle([harness._element_action(0, g(120))])  # past the interval: inline publish
    assert store.sync_info()["sparse/0"]["version"] == 3
    rows, found = store.read_rows("t2", f, 2)
    assert found.all() and rows[0, 0] < 0
    harness.bundle([harness._element_action(0, g(130))])
    harness.fire_timers(Timestamp(seconds=T0_MS // 1000 + 10_000))  # the watermark passes
    info = store.sync_info()["sparse/0"]
    assert info["version"] == 4 and info["ts_ms"] == T0_MS + 130_000


def test_bad_input_fails_loudly():
    url = f"memory://bad-{uuid.uuid4().hex}"
    harness = Harness(sparse_factory(url))
    f0 = np.array([x for x in range(50) if shard_of(np.array([x], np.uint64), 2)[0] == 0][:3], np.uint64)
    with pytest.raises(ValueError, match="unknown table"):
        harness._run_bundle([harness._element_action(0, SparseGradients("t9", f0, np.zeros((3, 4)), T0_MS, 1))])
    with pytest.raises(ValueError, match="other shards"):
        harness._run_bundle([harness._element_action(1, SparseGradients("t4", f0, np.zeros((3, 4)), T0_MS, 1))])
    with pytest.raises(ValueError, match="grads"):
        harness._run_bundle([harness._element_action(0, SparseGradients("t4", f0, np.zeros((3, 2)), T0_MS, 1))])
    with pytest.raises(ValueError, match="global window"):
        harness.dofn.process((0, SparseGradients("t4", f0, np.zeros((3, 4)), T0_MS, 1)),
                             window=IntervalWindow(0, 60))


# ---------------------------------------------------------------------------- dense


def dense_params():
    return {"hidden/kernel": np.full((4, 3), 0.1, np.float32), "hidden/bias": np.zeros(3, np.float32),
            "out": np.ones(3, np.float32)}


def dense_batches(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return [("dense", DenseGradients({k: rng.standard_normal(v.shape).astype(np.float32)
                                      for k, v in dense_params().items() if k != "out" or i % 2},
                                     T0_MS + i * 5000, 8)) for i in range(n)]


@pytest.mark.parametrize("seed,fail_rate,restore_rate", [(1, 0.0, 0.0), (2, 0.4, 0.0), (3, 0.3, 0.15)])
def test_dense_exactly_once(seed, fail_rate, restore_rate):
    url = f"memory://dense-{uuid.uuid4().hex}"
    factory = lambda: DenseShard(url, "dense", dense_params(), optimizer="adam", lr=0.01,  # noqa: E731
                                 sync_interval_s=12, compact_every=4)
    batches = dense_batches(seed=seed)
    harness = Harness(factory, seed=seed, fail_rate=fail_rate, restore_rate=restore_rate)
    harness.run(events_with_watermarks(batches, every=4, lag_s=10))
    # reference: the optimizer applied in order, per-parameter step counts
    opt = as_optimizer("adam", lr=0.01)
    params = dense_params()
    slots = {k: opt.dense_slots(v) for k, v in params.items()}
    steps = dict.fromkeys(params, 0)
    for _, g in batches:
        for k, grad in g.grads.items():
            steps[k] += 1
            opt.apply_dense(params[k], slots[k], grad, steps[k])
    got, version = open_store(url, None).read_dense("dense")
    assert version == len(batches)
    assert sorted(got) == sorted(params)
    for k in params:
        np.testing.assert_array_equal(got[k], params[k])
    info = open_store(url, None).sync_info()["dense"]
    assert info["version"] == len(batches) and info["ts_ms"] == batches[-1][1].ts_ms


# ---------------------------------------------------------------------------- runners


def _pipeline_batches():
    return make_batches(num_shards=2, batches=24, seed=11, rows=200)


def _build(pipeline, url, batches, dense):
    (pipeline
     | "Sparse" >> beam.Create(batches, reshuffle=False)
     | "SparseShard" >> beam.ParDo(sparse_factory(url, sync_interval_s=30)()))
    (pipeline
     | "Dense" >> beam.Create(dense, reshuffle=False)
     | "DenseShard" >> beam.ParDo(DenseShard(url, "dense", dense_params(), optimizer="sgd", lr=0.5,
                                             sync_interval_s=0)))


def _check_pipeline_result(url, batches, dense, metrics):
    store = open_store(url, 2)
    reference = reference_tables(batches, sparse_factory(url))
    assert_store_equals_tables(store, reference)
    counters = metrics["counters"]
    assert counters["ps.gradient_rows_applied"] == sum(g.fids.size for _, g in batches)
    stats = [t.stats for shard in reference.values() for t in shard.values()]
    assert counters["ps.gradients_dropped_by_filter"] == sum(x.dropped_gradients for x in stats)
    assert counters["ps.rows_created"] == sum(x.rows_created for x in stats)
    assert counters["ps.rows_evicted"] == sum(x.rows_evicted for x in stats) > 0
    assert counters.get("ps.rebuilds", 0) == 0 and counters["ps.compactions"] > 0
    assert counters["ps.publishes"] > 0
    assert metrics["distributions"]["ps.table_size"]["max"] > 0
    params = dense_params()
    for _, g in dense:
        for k, grad in g.grads.items():
            params[k] = (params[k].astype(np.float64) - 0.5 * grad.astype(np.float64)).astype(np.float32)
    got, version = store.read_dense("dense")
    assert version == len(dense)
    for k in params:
        np.testing.assert_array_equal(got[k], params[k])


def test_direct_runner_pipeline(tmp_path):
    url = f"memory://direct-{uuid.uuid4().hex}"
    batches, dense = _pipeline_batches(), dense_batches(n=10)
    options = pipeline_options(["--runner=DirectRunner"])
    pipeline = beam.Pipeline(options=options)
    _build(pipeline, url, batches, dense)
    result = pipeline.run()
    result.wait_until_finish()
    _check_pipeline_result(url, batches, dense, metrics_dict(result))


@pytest.mark.flink
def test_flink_local_pipeline(tmp_path, flink_job_server_jar):
    url = f"memory://flink-{uuid.uuid4().hex}"
    batches, dense = _pipeline_batches(), dense_batches(n=10)
    metrics_out = tmp_path / "metrics.json"
    # --streaming: a keyed stream delivers each key's batches in order (Flink's batch mode
    # groups stateful input with a sort, which need not keep it, and Adagrad is order-sensitive).
    options = pipeline_options(["--runner=FlinkRunner", "--flink_master=[local]",
                                "--environment_type=LOOPBACK", "--parallelism=2", "--streaming",
                                f"--metrics_out={metrics_out}"])
    from dataflow.job import run_job
    run_job(lambda p: _build(p, url, batches, dense), options)
    _check_pipeline_result(url, batches, dense, json.loads(metrics_out.read_text()))


def test_set_channels_keeps_pending_deltas_of_kept_channels():
    from ps.embedding_table import EmbeddingTable
    t = EmbeddingTable(2, channels=1)
    t.insert(np.array([fid(0, 1), fid(0, 2)], np.uint64))
    t.set_channels(2)  # channel 0 keeps its pending rows; the new channel 1 starts empty
    assert sorted(t.delta(1).fids.tolist()) == []
    t.insert(np.array([fid(0, 3)], np.uint64))
    t.delete(np.array([fid(0, 1)], np.uint64))
    d1 = t.delta(1)
    assert d1.fids.tolist() == [fid(0, 3)] and d1.deleted.tolist() == [fid(0, 1)]
    d0 = t.delta(0)
    assert sorted(d0.fids.tolist()) == [fid(0, 2), fid(0, 3)] and d0.deleted.tolist() == [fid(0, 1)]
    t.insert(np.array([fid(0, 4)], np.uint64))
    t.set_channels(1)  # channel 1 and its pending changes go
    with pytest.raises(ValueError):
        t.delta(1)
    assert t.delta(0).fids.tolist() == [fid(0, 4)]


@pytest.mark.parametrize("module", ["sparse_shard", "dense_shard"])
def test_docstring_examples_run(module):
    """The shards' examples: a DirectRunner pipeline each, read back from the store."""
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"ps.{module}"))
    assert result.attempted > 0 and result.failed == 0
