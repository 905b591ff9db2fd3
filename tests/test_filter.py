"""Frequency filter: the count-min sketch alone, and its use by the table."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps import SGD, EmbeddingTable, FrequencyFilter, SlotConfig


def test_counts_are_exact_without_collisions_and_sequential_within_a_batch():
    f = FrequencyFilter(memory_bytes=1 << 16)
    assert f.add(np.array([3, 3, 4, 3], np.uint64)).tolist() == [1, 2, 1, 3]
    assert f.count(np.array([3, 4, 5], np.uint64)).tolist() == [3, 1, 0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 60), max_size=400), st.sampled_from([16, 64, 256]))
def test_never_underestimates_even_when_tiny(ids, memory_bytes):
    # A tiny sketch collides a lot: estimates may be high, never low.
    f = FrequencyFilter(memory_bytes=memory_bytes, depth=2)
    ids = np.array(ids, np.uint64)
    f.add(ids)
    truth = Counter(ids.tolist())
    keys = np.array(sorted(truth), np.uint64)
    estimates = f.count(keys)
    assert all(e >= truth[k] for k, e in zip(keys.tolist(), estimates.tolist()))


def test_memory_is_fixed_by_configuration():
    f = FrequencyFilter(memory_bytes=4096, depth=4)
    f.add(np.arange(100_000, dtype=np.uint64))  # far more ids than counters
    assert f.memory_bytes == f.counts.nbytes <= 4096
    assert FrequencyFilter(memory_bytes=4096, counter="uint16").counts.size == 2048


@pytest.mark.parametrize("counter,maximum", [("uint8", 255), ("uint16", 65535)])
def test_counters_saturate(counter, maximum):
    f = FrequencyFilter(memory_bytes=1 << 12, counter=counter)
    assert f.max_count == maximum
    one = np.full(maximum + 50, 42, np.uint64)
    counts = f.add(one)
    assert counts[maximum - 1] == maximum and counts[-1] == maximum
    assert f.count(np.array([42], np.uint64)).tolist() == [maximum]


def test_conservative_update_keeps_overestimates_small():
    # Many ids in a small sketch: the average overestimate stays well under the true counts.
    rng = np.random.default_rng(0)
    ids = rng.zipf(1.3, size=50_000).astype(np.uint64)
    f = FrequencyFilter(memory_bytes=1 << 14, depth=4, counter="uint16")
    f.add(ids)
    truth = Counter(ids.tolist())
    keys = np.array(list(truth), np.uint64)
    error = f.count(keys) - np.array([truth[k] for k in keys.tolist()])
    assert error.min() >= 0
    assert error.mean() < 2.0


def test_config_round_trip_counts_identically():
    f = FrequencyFilter(memory_bytes=1000, depth=3, counter="uint16", seed=9)
    g = FrequencyFilter(**f.config())
    ids = np.arange(500, dtype=np.uint64)
    assert f.add(ids).tolist() == g.add(ids).tolist()
    assert np.array_equal(f.counts, g.counts)


def test_invalid_configuration():
    with pytest.raises(ValueError):
        FrequencyFilter(counter="uint4")
    with pytest.raises(ValueError):
        FrequencyFilter(memory_bytes=2, depth=4)


# ----------------------------------------------------------------------------- in the table


def slot_fid(slot, value):
    return np.uint64((slot << 48) | value)


@pytest.mark.parametrize("threshold", [2, 15, 16, 255])
def test_a_fid_gets_a_row_at_its_threshold_th_sighting(threshold):
    table = EmbeddingTable(dim=2, optimizer=SGD(lr=1.0), slots={1: SlotConfig(threshold=threshold)})
    fid = np.array([slot_fid(1, 7)])
    grads = np.ones((1, 2), np.float32)
    for sighting in range(1, threshold):
        table.apply_gradients(fid, grads, now=sighting)
        values, found = table.lookup(fid)
        assert not found[0] and (values == 0).all(), sighting
    assert table.stats.dropped_gradients == threshold - 1
    table.apply_gradients(fid, grads, now=threshold)  # the threshold-th sighting: row and step
    values, found = table.lookup(fid)
    assert found[0] and values.tolist() == [[-1.0, -1.0]]
    assert table.stats.dropped_gradients == threshold - 1


def test_thresholds_above_255_use_wider_counters():
    table = EmbeddingTable(dim=1, slots={2: SlotConfig(threshold=300)})
    assert table.filter.counter == "uint16"
    fid = slot_fid(2, 1)
    table.admit(np.full(299, fid), now=0)
    assert len(table) == 0
    table.admit(np.array([fid]), now=0)
    assert len(table) == 1


def test_threshold_beyond_the_counter_range_is_rejected():
    with pytest.raises(ValueError, match="exceeds"):
        EmbeddingTable(dim=1, slots={1: SlotConfig(threshold=300)}, filter=FrequencyFilter(counter="uint8"))


def test_repeats_within_one_batch_count_and_only_later_occurrences_have_a_row():
    table = EmbeddingTable(dim=1, optimizer=SGD(lr=1.0), slots={1: SlotConfig(threshold=3)})
    fid = slot_fid(1, 5)
    grads = np.array([[1.0], [2.0], [4.0], [8.0]], np.float32)
    # occurrences 1 and 2 are counted and dropped, 3 creates the row, 3 and 4 are summed
    assert table.apply_gradients(np.full(4, fid), grads, now=0) == 1
    assert table.lookup(np.array([fid]))[0].tolist() == [[-12.0]]
    assert table.stats.dropped_gradients == 2


def test_slots_without_threshold_skip_the_filter():
    table = EmbeddingTable(dim=1, slots={1: SlotConfig(threshold=5)})
    table.admit(np.array([slot_fid(0, 1), slot_fid(3, 1)]), now=0)
    assert len(table) == 2
    assert table.filter.count(np.array([slot_fid(0, 1)])).tolist() == [0]  # never counted


def test_no_filter_memory_when_no_slot_needs_one():
    assert EmbeddingTable(dim=1).filter is None


def test_evicted_id_is_readmitted_at_its_next_sighting():
    # Its counters already reached the threshold: the filter does not make it start over.
    table = EmbeddingTable(dim=1, slots={1: SlotConfig(threshold=3, expiry=10)})
    fid = np.array([slot_fid(1, 9)])
    table.admit(np.repeat(fid, 3), now=0)
    assert len(table) == 1
    assert table.evict(now=100) == 1
    table.admit(fid, now=101)
    assert len(table) == 1
