"""Expiry by event time, per slot."""

import time

import numpy as np

from ps import EmbeddingTable, SlotConfig


def fid(slot, value):
    return (slot << 48) | value


def fids(*values):
    return np.array(values, np.uint64)


def test_evict_removes_rows_unseen_for_longer_than_their_slot_expiry():
    table = EmbeddingTable(dim=2, slots={1: SlotConfig(expiry=10), 2: SlotConfig(expiry=100)})
    table.insert(fids(fid(0, 1), fid(1, 1), fid(2, 1)), now=1000)
    table.insert(fids(fid(1, 2)), now=1005)
    assert table.evict(now=1010) == 0  # 10 units unseen is not *longer* than 10
    assert table.evict(now=1011) == 1  # fid(1, 1) only
    assert table.lookup(fids(fid(0, 1), fid(1, 1), fid(1, 2), fid(2, 1)))[1].tolist() == [True, False, True, True]
    assert table.evict(now=1_000_000) == 2  # slot 0 has no expiry
    assert len(table) == 1
    assert table.stats.rows_evicted == 3


def test_default_slot_config_applies_to_unlisted_slots():
    table = EmbeddingTable(dim=1, default_slot=SlotConfig(expiry=5), slots={3: SlotConfig()})
    table.insert(fids(fid(0, 1), fid(7, 1), fid(3, 1)), now=0)
    assert table.evict(now=6) == 2
    assert table.lookup(fids(fid(3, 1)))[1].all()


def test_updates_refresh_last_seen_but_lookups_do_not():
    table = EmbeddingTable(dim=1, slots={1: SlotConfig(expiry=10)})
    a, b, c = fid(1, 1), fid(1, 2), fid(1, 3)
    table.insert(fids(a, b, c), now=0)
    table.apply_gradients(fids(a), np.ones((1, 1), np.float32), now=8)
    table.insert(fids(b), now=9)
    table.lookup(fids(c))
    assert table.evict(now=15) == 1
    assert table.lookup(fids(a, b, c))[1].tolist() == [True, True, False]


def test_last_seen_never_goes_back_in_time():
    table = EmbeddingTable(dim=1, slots={1: SlotConfig(expiry=10)})
    table.insert(fids(fid(1, 1)), now=100)
    table.insert(fids(fid(1, 1)), now=50)  # a late, out-of-order batch
    assert table.evict(now=105) == 0


def test_evict_defaults_to_the_largest_event_time_seen_and_never_reads_the_clock(monkeypatch):
    def no_clock(*args):
        raise AssertionError("the wall clock was read")

    monkeypatch.setattr(time, "time", no_clock)
    monkeypatch.setattr(time, "monotonic", no_clock)
    table = EmbeddingTable(dim=1, slots={1: SlotConfig(expiry=10)})
    table.insert(fids(fid(1, 1)), now=0)
    table.insert(fids(fid(0, 1)), now=20)
    assert table.event_time == 20
    assert table.evict() == 1


def test_evicted_fids_are_reported_as_deletions_in_the_delta():
    table = EmbeddingTable(dim=1, slots={1: SlotConfig(expiry=1)})
    table.insert(fids(fid(1, 1), fid(1, 2)), now=0)
    table.delta()
    table.insert(fids(fid(1, 2)), now=5)
    assert table.evict(now=5) == 1
    d = table.delta()
    assert d.fids.tolist() == [fid(1, 2)] and d.deleted.tolist() == [fid(1, 1)]


def test_mass_eviction_keeps_the_survivors_rows_exact():
    rng = np.random.default_rng(0)
    n = 20_000
    keys = (np.uint64(1) << np.uint64(48)) + np.arange(n, dtype=np.uint64)
    times = rng.integers(0, 100, size=n)
    weights = rng.standard_normal((n, 4)).astype(np.float32)
    table = EmbeddingTable(dim=4, slots={1: SlotConfig(expiry=50)}, capacity=16)
    table.insert(keys, now=times, weights=weights)
    removed = table.evict(now=100)
    survive = 100 - times <= 50
    assert removed == (~survive).sum() and len(table) == survive.sum()
    values, found = table.lookup(keys)
    assert (found == survive).all()
    np.testing.assert_array_equal(values[survive], weights[survive])
