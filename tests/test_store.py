"""ParameterStore: one test suite, both backends (memory:// and a real redis-server).

The property test runs random write / delete / replace / read sequences against a plain dict
model ``{(table, fid): row}``; the other tests cover dense sets, sync records, pickling,
errors and concurrent readers of a memory store.
"""
from __future__ import annotations

import pickle
import threading
import uuid

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps.store import MemoryStore, RedisStore, open_store
from ps.sharding import shard_of

WIDTHS = {"a": 3, "b": 1}


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_store(request):
    """``make_store(num_shards)``: a fresh, empty store of the parametrised backend."""
    opened = []

    def make(num_shards=1):
        tag = uuid.uuid4().hex[:12]
        if request.param == "memory":
            url = f"memory://test-{tag}"
        else:
            url = f"{request.getfixturevalue('redis_server')}/1?prefix=t{tag}"
        store = open_store(url, num_shards)
        store.clear()
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.clear()
        store.close()


def _fids(values):
    return np.array(values, dtype=np.uint64)


fid_strategy = st.integers(0, 40) | st.integers(0, 2**64 - 2)
op_strategy = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(sorted(WIDTHS)), st.lists(fid_strategy, max_size=12),
              st.lists(fid_strategy, max_size=6), st.integers(0, 2**31)),
    st.tuples(st.just("replace"), st.sampled_from(sorted(WIDTHS)), st.lists(fid_strategy, max_size=12),
              st.integers(0, 7), st.integers(0, 2**31)),
    st.tuples(st.just("read"), st.sampled_from(sorted(WIDTHS)), st.lists(fid_strategy, max_size=16)),
)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_matches_dict_model(make_store, num_shards):
    store = make_store(num_shards)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ops=st.lists(op_strategy, max_size=12))
    def run(ops):
        store.clear()
        model = {}  # (table, fid) -> float32 row
        for op in ops:
            kind, table = op[0], op[1]
            width = WIDTHS[table]
            if kind == "write":
                fids, deleted, seed = _fids(op[2]), _fids(op[3]), op[4]
                rows = np.random.default_rng(seed).standard_normal((fids.size, width)).astype(np.float32)
                # one write per shard, as each PS shard publishes its own rows
                for shard in range(num_shards):
                    mine = shard_of(fids, num_shards) == shard
                    gone = deleted[shard_of(deleted, num_shards) == shard]
                    store.write_rows(table, shard, fids[mine], rows[mine], gone)
                    for f, r in zip(fids[mine].tolist(), rows[mine]):
                        model[(table, f)] = r
                    for f in gone.tolist():
                        model.pop((table, f), None)
            elif kind == "replace":
                shard = op[3] % num_shards
                fids = _fids(op[2])
                fids = np.unique(fids[shard_of(fids, num_shards) == shard])
                rows = np.random.default_rng(op[4]).standard_normal((fids.size, width)).astype(np.float32)
                store.replace_shard(table, shard, fids, rows)
                for key in [k for k in model if k[0] == table
                            and int(shard_of(_fids([k[1]]), num_shards)[0]) == shard]:
                    del model[key]
                model.update({(table, f): r for f, r in zip(fids.tolist(), rows)})
            # after every op: a read of the op's fids, duplicates and every known fid
            known = [f for (t, f) in model if t == table]
            query = _fids(list(op[2]) + known + known[:3])
            got, found = store.read_rows(table, query, width)
            want = np.array([model.get((table, f), np.zeros(width, np.float32)) for f in query.tolist()],
                            dtype=np.float32).reshape(-1, width)
            np.testing.assert_array_equal(got, want)
            assert found.tolist() == [(table, f) in model for f in query.tolist()]
        for table, width in WIDTHS.items():
            for shard in range(num_shards):
                fids, rows = store.shard_rows(table, shard)
                want = sorted(f for (t, f) in model if t == table
                              and int(shard_of(_fids([f]), num_shards)[0]) == shard)
                assert fids.tolist() == want
                for f, r in zip(fids.tolist(), rows):
                    np.testing.assert_array_equal(r, model[(table, f)])

    run()


def test_read_missing_and_empty(make_store):
    store = make_store(2)
    rows, found = store.read_rows("nothing", _fids([1, 2, 3]), 4)
    assert rows.shape == (3, 4) and not rows.any() and not found.any()
    rows, found = store.read_rows("nothing", _fids([]), 4)
    assert rows.shape == (0, 4) and found.shape == (0,)
    store.write_rows("t", 0, _fids([]), np.zeros((0, 4), np.float32), deleted=None)
    store.replace_shard("t", 1, _fids([]), np.zeros((0, 4), np.float32))


def test_errors(make_store):
    store = make_store(2)
    fid0 = _fids([f for f in range(20) if shard_of(_fids([f]), 2)[0] == 0][:2])
    store.write_rows("t", 0, fid0, np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="other shards"):
        store.write_rows("t", 1, fid0, np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="shard must be"):
        store.write_rows("t", 2, _fids([]), np.ones((0, 4), np.float32))
    with pytest.raises(ValueError, match="width"):
        store.write_rows("t", 0, fid0, np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="width"):
        store.read_rows("t", fid0, 3)
    with pytest.raises(ValueError, match="rows must be"):
        store.write_rows("t", 0, fid0, np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="num_shards"):
        open_store(store.url, num_shards=3).read_rows("t", fid0, 4)


def test_handle_without_shard_count_adopts_the_stores(make_store):
    store = make_store(3)
    fids = _fids([f for f in range(30) if shard_of(_fids([f]), 3)[0] == 2][:2])
    store.write_rows("t", 2, fids, np.ones((2, 2), np.float32))
    other = open_store(store.url, None)  # e.g. the dense PS: it does not route rows
    other.write_dense("d", {"w": np.ones(1, np.float32)}, 1)
    assert other.num_shards in (None, 3)
    assert other.read_rows("t", fids, 2)[1].all() and other.num_shards == 3
    assert store.read_dense("d")[1] == 1


def test_dense_round_trip(make_store):
    store = make_store()
    assert store.read_dense("model") == (None, -1)
    params = {"dense/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
              "bias": np.array([0.5, -1.5], dtype=np.float32),
              "step": np.array(7, dtype=np.int64)}
    store.write_dense("model", params, version=3)
    got, version = store.read_dense("model")
    assert version == 3 and sorted(got) == sorted(params)
    for k, v in params.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
    params["bias"][0] = 99.0  # the store kept its own copy
    assert store.read_dense("model")[0]["bias"][0] == 0.5
    store.write_dense("model", {"bias": np.zeros(2, np.float32)}, version=4)
    got, version = store.read_dense("model")
    assert version == 4 and list(got) == ["bias"]
    assert store.read_dense("other") == (None, -1)


def test_sync_info(make_store):
    store = make_store()
    assert store.sync_info() == {}
    store.set_sync("sparse/0", {"version": 5, "ts_ms": 1_700_000_000_123, "wall_time": 1.5})
    store.set_sync("dense", {"version": 2, "ts_ms": 10, "wall_time": 2.0})
    store.set_sync("sparse/0", {"version": 6, "ts_ms": 1_700_000_001_000, "wall_time": 3.0})
    assert store.sync_info() == {
        "sparse/0": {"version": 6, "ts_ms": 1_700_000_001_000, "wall_time": 3.0},
        "dense": {"version": 2, "ts_ms": 10, "wall_time": 2.0}}
    store.clear()
    assert store.sync_info() == {} and store.read_dense("x") == (None, -1)


def test_pickle_keeps_the_url_not_the_client(make_store):
    store = make_store(2)
    fids = _fids(range(10))
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    for shard in range(2):
        mine = shard_of(fids, 2) == shard
        store.write_rows("t", shard, fids[mine], rows[mine])
    copy = pickle.loads(pickle.dumps(store))
    if isinstance(store, MemoryStore):
        assert copy is store
    else:
        assert isinstance(copy, RedisStore) and copy._client is None
    np.testing.assert_array_equal(copy.read_rows("t", fids, 3)[0], rows)


def test_memory_concurrent_readers_see_whole_writes():
    """Readers in threads while a writer rewrites a shard: every read sees one write whole
    (all rows of a shard carry the same version), and versions never go back."""
    store = open_store(f"memory://concurrent-{uuid.uuid4().hex}", num_shards=2)
    fids = _fids(range(1, 2001))
    shards = shard_of(fids, 2)
    width = 4

    def write(version):
        for shard in range(2):
            mine = fids[shards == shard]
            rows = np.full((mine.size, width), version, np.float32)
            if version % 3 == 0:
                store.replace_shard("t", shard, mine, rows)
            else:
                store.write_rows("t", shard, mine, rows)

    write(1)
    stop = threading.Event()
    errors = []

    def reader():
        last = np.zeros(2)
        try:
            while not stop.is_set():
                got, found = store.read_rows("t", fids, width)
                assert found.all()
                for shard in range(2):
                    values = np.unique(got[shards == shard])
                    assert values.size == 1, values  # one write, whole
                    assert values[0] >= last[shard]  # never older than a previous read
                    last[shard] = values[0]
        except AssertionError as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for version in range(2, 200):
        write(version)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert np.all(store.read_rows("t", fids, width)[0] == 199)


def test_memory_store_lives_until_dropped():
    """The process's registry holds a memory store (the data) until ``drop()``: a handle
    held keeps the old object, the next ``open_store`` of the name starts empty, and the
    store's views go with it."""
    url = f"memory://drop-{uuid.uuid4().hex[:8]}"
    store = open_store(url, 1)
    view = open_store(f"{url}/train", 1)
    store.set_sync("dense", {"version": 1})
    view.set_sync("dense", {"version": 2})
    assert open_store(url) is store
    store.drop()
    assert store.sync_info() == {"dense": {"version": 1}}  # the handle still holds it
    fresh = open_store(url, 1)
    assert fresh is not store and fresh.sync_info() == {}
    assert open_store(f"{url}/train").sync_info() == {}
    fresh.drop()


def test_memory_store_unpickled_in_another_process_is_refused(tmp_path):
    """A memory store is shared inside one process only: unpickled elsewhere (a runner's
    worker process), it raises instead of handing out a new, empty store."""
    import os
    import subprocess
    import sys
    store = open_store(f"memory://pickled-{uuid.uuid4().hex[:8]}", 1)
    proc = subprocess.run([sys.executable, "-c", "import pickle, sys; "
                           "pickle.loads(sys.stdin.buffer.read())"],
                          input=pickle.dumps(store), capture_output=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode != 0
    assert b"is shared only inside one process" in proc.stderr and b"redis://" in proc.stderr
    store.drop()


@pytest.mark.redis
def test_dense_set_of_an_earlier_format_is_refused_by_name(redis_server):
    """A redis store written by a version before the envelope (``PSARRAY1`` dense sets)."""
    from ps.envelope import SnapshotError
    store = open_store(f"{redis_server}/1?prefix=old{uuid.uuid4().hex[:8]}", 1)
    store._redis.set(f"{store.prefix}:dense:model", b"PSARRAY1" + bytes(40))
    with pytest.raises(SnapshotError, match=f"dense parameter set {store.prefix}:dense:model "
                                            "is a PSARRAY1 array set of an earlier version"):
        store.read_dense("model")
    store.clear()
