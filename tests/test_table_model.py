"""Property-based test: random sequences of table operations against a plain ``dict`` model.

The model is the specification written the slow, obvious way: a dict from fid to row, a dict of
filter counts, sets of touched and deleted fids per delta channel. Every operation's result and,
after every step, the table's whole content are compared with it. A tiny initial capacity makes
the index and the arena grow many times during a run.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ps import SGD, EmbeddingTable, FrequencyFilter, SlotConfig

DIM = 3
LR = 0.25
SLOTS = {
    0: SlotConfig(),  # admitted at once, never expires
    1: SlotConfig(threshold=3, expiry=10),
    2: SlotConfig(threshold=2, expiry=0),  # gone at the first evict after it was last seen
    3: SlotConfig(threshold=1, expiry=40),
}
CHANNELS = 2


def make_fid(slot, value):
    return (slot << 48) | value


# A small pool so that ids repeat within and across batches; slot 5 uses the default config.
fid_strategy = st.builds(make_fid, st.sampled_from([0, 1, 2, 3, 5]), st.integers(0, 12)) | st.integers(0, 2**64 - 2)
batch_strategy = st.lists(fid_strategy, min_size=0, max_size=24)
time_strategy = st.integers(0, 120)


def threshold_of(fid):
    return SLOTS.get(fid >> 48, SlotConfig()).threshold


def expiry_of(fid):
    return SLOTS.get(fid >> 48, SlotConfig()).expiry


class TableModel(RuleBasedStateMachine):
    @initialize(capacity=st.integers(1, 8), max_load=st.sampled_from([0.5, 0.9, 1.0]))
    def setup(self, capacity, max_load):
        self.table = EmbeddingTable(
            DIM,
            SGD(lr=LR),
            capacity=capacity,
            max_load=max_load,
            slots=SLOTS,
            channels=CHANNELS,
            # big enough that 4 rows never all collide for the few hundred ids a run uses
            filter=FrequencyFilter(memory_bytes=1 << 18),
        )
        self.rows = {}  # fid -> float32[DIM] (SGD keeps no optimizer state)
        self.last_seen = {}
        self.counts = {}  # frequency-filter counts of ids sighted without a row
        self.touched = [set() for _ in range(CHANNELS)]
        self.deleted = [set() for _ in range(CHANNELS)]
        self.dropped = 0

    # ------------------------------------------------------------------ model helpers

    def _write(self, fid, now):
        if fid not in self.rows:
            self.rows[fid] = np.zeros(DIM, np.float32)
            self.last_seen[fid] = now
        self.last_seen[fid] = max(self.last_seen[fid], now)
        for c in range(CHANNELS):
            self.touched[c].add(fid)

    def _remove(self, fid):
        del self.rows[fid], self.last_seen[fid]
        for c in range(CHANNELS):
            self.touched[c].discard(fid)
            self.deleted[c].add(fid)

    # ------------------------------------------------------------------ rules

    @rule(fids=batch_strategy, now=time_strategy, with_weights=st.booleans(), data=st.data())
    def insert(self, fids, now, with_weights, data):
        weights = None
        if with_weights:
            weights = np.array(
                data.draw(st.lists(st.floats(-4, 4, width=32), min_size=len(fids) * DIM, max_size=len(fids) * DIM)),
                dtype=np.float32,
            ).reshape(len(fids), DIM)
        new = len({f for f in fids if f not in self.rows})
        for i, fid in enumerate(fids):
            self._write(fid, now)
            if weights is not None:
                self.rows[fid] = weights[i].copy()
        assert self.table.insert(np.array(fids, np.uint64), now=now, weights=weights) == new

    @rule(fids=batch_strategy)
    def delete(self, fids):
        present = {f for f in fids if f in self.rows}
        for fid in present:
            self._remove(fid)
        assert self.table.delete(np.array(fids, np.uint64)) == len(present)

    @rule(fids=batch_strategy)
    def lookup(self, fids):
        values, found = self.table.lookup(np.array(fids, np.uint64))
        assert values.shape == (len(fids), DIM) and values.dtype == np.float32
        for i, fid in enumerate(fids):
            assert found[i] == (fid in self.rows)
            expected = self.rows.get(fid, np.zeros(DIM, np.float32))
            np.testing.assert_array_equal(values[i], expected)

    @rule(fids=batch_strategy, now=time_strategy, data=st.data())
    def apply_gradients(self, fids, now, data):
        grads = np.array(
            data.draw(st.lists(st.floats(-8, 8, width=32), min_size=len(fids) * DIM, max_size=len(fids) * DIM)),
            dtype=np.float32,
        ).reshape(len(fids), DIM)
        sums = {}  # fid -> float32 sum of the gradients that had a row, in batch order
        for i, fid in enumerate(fids):
            if fid not in self.rows:
                threshold = threshold_of(fid)
                count = self.counts.get(fid, 0)
                if threshold > 1 and count < threshold:
                    count = self.counts[fid] = min(count + 1, 255)
                if threshold <= 1 or count >= threshold:
                    self.rows[fid] = np.zeros(DIM, np.float32)
                    self.last_seen[fid] = now
                else:
                    self.dropped += 1
                    continue
            sums[fid] = grads[i].copy() if fid not in sums else (sums[fid] + grads[i]).astype(np.float32)
        for fid, g in sums.items():
            self._write(fid, now)
            self.rows[fid] = (self.rows[fid].astype(np.float64) - LR * g.astype(np.float64)).astype(np.float32)
        assert self.table.apply_gradients(np.array(fids, np.uint64), grads, now=now) == len(sums)
        assert self.table.stats.dropped_gradients == self.dropped

    @rule(now=time_strategy)
    def evict(self, now):
        expired = [f for f in self.rows if expiry_of(f) is not None and now - self.last_seen[f] > expiry_of(f)]
        for fid in expired:
            self._remove(fid)
        assert self.table.evict(now) == len(expired)

    @rule(channel=st.integers(0, CHANNELS - 1), full=st.booleans())
    def delta(self, channel, full):
        d = self.table.delta(channel=channel, full=full)
        assert sorted(d.fids.tolist()) == sorted(self.touched[channel])
        assert len(set(d.fids.tolist())) == len(d.fids)
        assert d.weights.shape == (len(d.fids), self.table.width if full else DIM)
        for fid, w, t in zip(d.fids.tolist(), d.weights, d.last_seen.tolist()):
            np.testing.assert_array_equal(w[:DIM], self.rows[fid])
            assert t == self.last_seen[fid]
        assert sorted(d.deleted.tolist()) == sorted(self.deleted[channel] - set(self.rows))
        self.touched[channel].clear()
        self.deleted[channel].clear()

    @rule(capacity=st.sampled_from([None, 1, 1000]))
    def snapshot_round_trip(self, capacity):
        data = self.table.to_bytes()
        self.table = EmbeddingTable.from_bytes(data, capacity=capacity)
        assert self.table.to_bytes() == data  # exact: entries, filter, config, stats
        for c in range(CHANNELS):  # pending deltas are not part of a snapshot
            self.touched[c].clear()
            self.deleted[c].clear()

    @precondition(lambda self: len(self.rows) > 0)
    @rule(data=st.data(), now=time_strategy)
    def reinsert_deleted(self, data, now):
        fid = data.draw(st.sampled_from(sorted(self.rows)))
        self._remove(fid)
        self.table.delete(np.array([fid], np.uint64))
        self._write(fid, now)
        self.table.insert(np.array([fid], np.uint64), now=now)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def same_content(self):
        table = self.table
        assert len(table) == len(self.rows)
        assert len(table) <= table.max_load * table.capacity
        seen = {}
        for fids, rows, last_seen in table.items(batch_size=7):
            for fid, row, t in zip(fids.tolist(), rows, last_seen.tolist()):
                assert fid not in seen
                seen[fid] = (row, t)
        assert seen.keys() == self.rows.keys()
        for fid, (row, t) in seen.items():
            np.testing.assert_array_equal(row, self.rows[fid])
            assert t == self.last_seen[fid]
        estimates = table.filter.count(np.array(sorted(self.counts), np.uint64))
        assert estimates.tolist() == [self.counts[f] for f in sorted(self.counts)]


TestTableModel = pytest.mark.slow(TableModel.TestCase)
TestTableModel.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
