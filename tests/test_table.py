"""EmbeddingTable: batch API, high load, growth, deltas, replicas, validation."""

import pickle

import numpy as np
import pytest

from ps import SGD, Adagrad, EmbeddingTable, SlotConfig, slot_of


def random_fids(n, seed=0):
    """n distinct random fids (never the reserved all-ones value)."""
    rng = np.random.default_rng(seed)
    fids = np.unique(rng.integers(0, 2**64 - 1, size=n + n // 10 + 16, dtype=np.uint64))
    rng.shuffle(fids)
    assert fids.size >= n
    return fids[:n]


def test_lookup_of_missing_fids_gives_initial_value_and_mask():
    table = EmbeddingTable(dim=4)
    values, found = table.lookup(np.array([1, 2, 3], np.uint64))
    assert values.shape == (3, 4) and values.dtype == np.float32
    assert not found.any()
    assert (values == 0).all()
    assert len(table) == 0  # lookups create nothing


def test_insert_then_lookup_returns_the_rows_and_optimizer_slots():
    table = EmbeddingTable(dim=2, optimizer=Adagrad(initial_accumulator=0.5))
    fids = np.array([5, 6], np.uint64)
    assert table.insert(fids, now=1, weights=np.array([[1, 2], [3, 4]], np.float32)) == 2
    values, found = table.lookup(np.array([6, 5, 7], np.uint64), full=True)
    assert found.tolist() == [True, True, False]
    assert values.tolist() == [[3, 4, 0.5, 0.5], [1, 2, 0.5, 0.5], [0, 0, 0.5, 0.5]]


def test_insert_of_existing_fids_keeps_rows_unless_weights_are_given():
    table = EmbeddingTable(dim=1, optimizer=SGD())
    fids = np.array([9], np.uint64)
    table.insert(fids, weights=np.array([[2.0]], np.float32))
    assert table.insert(fids) == 0
    assert table.lookup(fids)[0].tolist() == [[2.0]]
    # repeated fid with weights: the last occurrence wins, as with dict assignment
    table.insert(np.array([9, 9], np.uint64), weights=np.array([[3.0], [4.0]], np.float32))
    assert table.lookup(fids)[0].tolist() == [[4.0]]
    assert len(table) == 1


def test_duplicate_gradients_are_summed_before_one_step():
    # Adagrad is not linear in the gradient: one step on the sum differs from two steps.
    table = EmbeddingTable(dim=1, optimizer=Adagrad(lr=1.0, initial_accumulator=1.0))
    table.insert(np.array([1], np.uint64))
    grads = np.array([[1.0], [2.0]], np.float32)
    assert table.apply_gradients(np.array([1, 1], np.uint64), grads, now=0) == 1
    expected = 0.0 - 1.0 * 3.0 / np.sqrt(1.0 + 9.0)
    values, _ = table.lookup(np.array([1], np.uint64), full=True)
    np.testing.assert_allclose(values[0], [expected, 10.0], rtol=1e-6)


def test_delete_returns_number_present_and_keeps_other_rows_intact():
    fids = random_fids(5000, seed=1)
    weights = np.random.default_rng(1).standard_normal((5000, 3)).astype(np.float32)
    table = EmbeddingTable(dim=3, optimizer=SGD(), capacity=16)
    table.insert(fids, weights=weights)
    gone = fids[::3]
    assert table.delete(np.concatenate([gone, gone[:10]])) == gone.size  # repeats count once
    assert len(table) == 5000 - gone.size
    values, found = table.lookup(fids)
    keep = np.ones(5000, bool)
    keep[::3] = False
    assert (found == keep).all()
    np.testing.assert_array_equal(values[keep], weights[keep])


@pytest.mark.parametrize("max_load", [0.9, 0.95, 0.96])
def test_high_load_without_growth(max_load):
    n = 20_000
    table = EmbeddingTable(dim=2, optimizer=SGD(), capacity=n, max_load=max_load)
    fids = random_fids(n, seed=2)
    weights = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    for start in range(0, n, 4096):
        table.insert(fids[start : start + 4096], weights=weights[start : start + 4096])
    assert table.load_factor >= max_load - 0.01
    assert table.stats.rehashes == 0  # sized up front: the index reached its bound without growing
    values, found = table.lookup(fids)
    assert found.all()
    np.testing.assert_array_equal(values, weights)


def test_full_index_forces_kick_failures_and_growth_without_losing_rows():
    n = 3000
    table = EmbeddingTable(dim=2, optimizer=SGD(), capacity=64, max_load=1.0)
    fids = random_fids(n, seed=3)
    weights = np.random.default_rng(3).standard_normal((n, 2)).astype(np.float32)
    for start in range(0, n, 100):
        table.insert(fids[start : start + 100], weights=weights[start : start + 100])
    assert table.stats.kick_failures > 0  # at load 1.0 random walks must fail sometimes
    assert table.stats.rehashes > 0
    values, found = table.lookup(fids)
    assert found.all()
    np.testing.assert_array_equal(values, weights)


def test_growth_across_many_rehashes_keeps_every_row():
    table = EmbeddingTable(dim=4, optimizer=Adagrad(), capacity=1)
    fids = random_fids(50_000, seed=4)
    weights = np.random.default_rng(4).standard_normal((50_000, 4)).astype(np.float32)
    for start in range(0, 50_000, 7919):
        table.insert(fids[start : start + 7919], weights=weights[start : start + 7919])
    assert table.stats.rehashes >= 10
    assert 0.5 <= table.load_factor <= 0.9
    values, found = table.lookup(fids)
    assert found.all()
    np.testing.assert_array_equal(values, weights)


def test_row_ids_stay_valid_when_an_apply_batch_creates_rows():
    # A batch that both updates old rows and creates many new ones (growing the index mid-batch).
    table = EmbeddingTable(dim=1, optimizer=SGD(lr=1.0), capacity=4)
    old = np.arange(1, 5, dtype=np.uint64)
    table.insert(old, weights=np.ones((4, 1), np.float32))
    new = np.arange(100, 2100, dtype=np.uint64)
    fids = np.concatenate([old, new, old])
    table.apply_gradients(fids, np.ones((fids.size, 1), np.float32), now=1)
    assert table.lookup(old)[0].ravel().tolist() == [-1.0] * 4  # 1 - (1 + 1)
    assert (table.lookup(new)[0] == -1.0).all()


def test_init_scale_gives_deterministic_per_fid_initial_values():
    a = EmbeddingTable(dim=8, init_scale=0.1, seed=7)
    b = EmbeddingTable(dim=8, init_scale=0.1, seed=7)
    fids = random_fids(1000, seed=5)
    missing_values, _ = a.lookup(fids)
    assert np.abs(missing_values).max() <= 0.1 and missing_values.std() > 0.03
    a.insert(fids)
    b.insert(fids[::-1])  # creation order does not matter
    np.testing.assert_array_equal(a.lookup(fids)[0], missing_values)
    np.testing.assert_array_equal(b.lookup(fids)[0], missing_values)
    assert not np.array_equal(EmbeddingTable(dim=8, init_scale=0.1, seed=8).lookup(fids)[0], missing_values)


def test_delta_reports_written_rows_and_removals_once():
    table = EmbeddingTable(dim=2, optimizer=SGD(lr=1.0))
    table.insert(np.array([1, 2, 3], np.uint64), now=5)
    d = table.delta()
    assert sorted(d.fids.tolist()) == [1, 2, 3] and d.deleted.size == 0
    assert table.delta().fids.size == 0  # cleared

    table.apply_gradients(np.array([2], np.uint64), np.ones((1, 2), np.float32), now=6)
    table.delete(np.array([3], np.uint64))
    table.delete(np.array([1], np.uint64))
    table.insert(np.array([1], np.uint64), now=7)  # removed, then created again: a write
    d = table.delta()
    assert sorted(d.fids.tolist()) == [1, 2]
    assert d.deleted.tolist() == [3]
    by_fid = dict(zip(d.fids.tolist(), d.weights.tolist()))
    assert by_fid[2] == [-1.0, -1.0] and by_fid[1] == [0.0, 0.0]
    assert dict(zip(d.fids.tolist(), d.last_seen.tolist())) == {1: 7, 2: 6}


def test_delta_channels_are_independent():
    table = EmbeddingTable(dim=1, channels=2)
    table.insert(np.array([1], np.uint64))
    assert table.delta(channel=0).fids.tolist() == [1]
    table.insert(np.array([2], np.uint64))
    assert table.delta(channel=1).fids.tolist() == [1, 2]
    assert table.delta(channel=0).fids.tolist() == [2]
    with pytest.raises(ValueError):
        table.delta(channel=2)


def test_replica_following_deltas_stays_equal():
    rng = np.random.default_rng(6)
    training = EmbeddingTable(dim=4, optimizer=Adagrad(lr=0.1), slots={1: SlotConfig(expiry=5)}, capacity=8)
    serving = EmbeddingTable(dim=4, optimizer=SGD(), channels=0, capacity=8)  # weights only
    pool = np.concatenate(
        [np.arange(200, dtype=np.uint64), (np.uint64(1) << np.uint64(48)) + np.arange(200, dtype=np.uint64)]
    )
    for step in range(30):
        fids = rng.choice(pool, size=64)
        training.apply_gradients(fids, rng.standard_normal((64, 4)).astype(np.float32), now=step)
        if step % 4 == 0:
            training.evict(step)
            training.delete(rng.choice(pool, size=5))
        serving.apply_delta(training.delta())
        got = {f: (w.tolist(), t) for fs, ws, ts in serving.items() for f, w, t in zip(fs.tolist(), ws, ts.tolist())}
        want = {
            f: (w[:4].tolist(), t) for fs, ws, ts in training.items() for f, w, t in zip(fs.tolist(), ws, ts.tolist())
        }
        assert got == want


def test_pickle_round_trip():
    table = EmbeddingTable(dim=2)
    table.insert(np.array([1, 2], np.uint64), weights=np.ones((2, 2), np.float32))
    copy = pickle.loads(pickle.dumps(table))
    assert copy.to_bytes() == table.to_bytes()


def test_memory_is_accounted_and_close_to_payload_at_high_load():
    n = 100_000
    table = EmbeddingTable(dim=16, optimizer=Adagrad(), capacity=n, max_load=0.95)
    table.insert(random_fids(n, seed=8))
    assert table.payload_bytes_per_entry() == 8 + 4 * 32 + 4
    bytes_per_entry = table.memory_bytes() / len(table)
    assert table.load_factor >= 0.85
    assert table.payload_bytes_per_entry() < bytes_per_entry <= 1.3 * table.payload_bytes_per_entry()


def test_input_validation():
    table = EmbeddingTable(dim=2)
    with pytest.raises(ValueError, match="reserved"):
        table.insert(np.array([2**64 - 1], np.uint64))
    with pytest.raises(ValueError, match="1-D"):
        table.lookup(np.zeros((2, 2), np.uint64))
    with pytest.raises(ValueError, match="shape"):
        table.apply_gradients(np.array([1], np.uint64), np.zeros((1, 3), np.float32), now=0)
    with pytest.raises(ValueError, match="weights"):
        table.insert(np.array([1], np.uint64), weights=np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="event time"):
        table.insert(np.array([1], np.uint64), now=-1)
    with pytest.raises(ValueError):
        EmbeddingTable(dim=0)
    with pytest.raises(ValueError):
        SlotConfig(threshold=70000)
    with pytest.raises(TypeError):
        EmbeddingTable(dim=2, optimizer="adagrad")
    assert len(table) == 0


def test_empty_batches_are_fine():
    table = EmbeddingTable(dim=2)
    empty = np.array([], np.uint64)
    assert table.insert(empty) == 0
    assert table.apply_gradients(empty, np.zeros((0, 2), np.float32), now=0) == 0
    assert table.lookup(empty)[0].shape == (0, 2)
    assert table.delete(empty) == 0


def test_slot_of_uses_the_bits_above_48():
    assert slot_of(np.array([(7 << 48) | 123, 5], np.uint64)).tolist() == [7, 0]


def test_benchmark_runs_and_reports_the_required_keys(capsys):
    from benchmarks.table import main
    from test_strict_json import strict_loads

    main(["--keys=20000", "--batch=4096", "--repeat=1", "--json"])
    result = strict_loads(capsys.readouterr().out)
    for key in (
        "keys", "batch", "lookup_keys_per_s", "insert_keys_per_s", "apply_rows_per_s",
        "dict_lookup_keys_per_s", "dict_insert_keys_per_s", "load_factor", "bytes_per_entry",
        "payload_bytes_per_entry",
    ):  # fmt: skip
        assert result[key] > 0, key
    assert result["keys"] == 20_000 and result["payload_bytes_per_entry"] == 140


def test_deletion_log_stays_bounded_between_deltas_and_loses_nothing():
    table = EmbeddingTable(dim=1, optimizer=SGD())
    for round_ in range(40):  # the same 10,000 fids created and deleted again and again
        fids = np.arange(10_000, dtype=np.uint64)
        table.insert(fids)
        table.delete(fids)
    table.insert(np.arange(5000, dtype=np.uint64))  # half of them exist again
    assert table.memory_bytes() < EmbeddingTable(dim=1, optimizer=SGD()).memory_bytes() + 8 * (1 << 17) + 200_000
    d = table.delta()
    assert sorted(d.deleted.tolist()) == list(range(5000, 10_000))
    assert sorted(d.fids.tolist()) == list(range(5000))


def test_arena_growth_falls_back_to_copying_when_maps_cannot_be_resized(monkeypatch):
    import mmap as mmap_module

    class NoResize(mmap_module.mmap):
        def resize(self, size):
            raise SystemError("mremap unavailable")

    from ps import embedding_table

    monkeypatch.setattr(embedding_table.mmap, "mmap", NoResize)
    table = EmbeddingTable(dim=2, optimizer=SGD(), capacity=1)
    fids = random_fids(20_000, seed=9)
    weights = np.random.default_rng(9).standard_normal((20_000, 2)).astype(np.float32)
    table.insert(fids, weights=weights)
    np.testing.assert_array_equal(table.lookup(fids)[0], weights)


@pytest.mark.parametrize("module", ["embedding_table", "frequency_filter", "optimizers", "envelope",
                                    "snapshot_files", "store", "sharding"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"ps.{module}"), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
