"""ParameterStore: the serving copy of the parameters, published by the PS DoFns.

The PS DoFns (``ps.sparse_shard``, ``ps.dense_shard``) own parameters and optimizer state in Beam state; every sync
interval they publish what changed here. Workers and serving read from here. The store closes
the worker → PS → worker loop that a Beam DAG cannot express (DESIGN §1).

    store = open_store("memory://train", num_shards=4)     # or "redis://127.0.0.1:6379/0"
    store.write_rows("dim8", shard=1, fids=f, rows=r, deleted=d)   # a PS shard publishes
    rows, found = store.read_rows("dim8", fids, width=8)           # a worker reads

Two backends behind one interface, chosen by URL, passing one test suite (tests/test_store.py):

* ``memory://name``: a store in this process's memory, shared by name (below). It works
  only where every DoFn runs in one process: the DirectRunner, and Flink with
  ``--environment_type=LOOPBACK``. On every other runner or environment use ``redis://``.
* ``redis://host:port/db[?prefix=ps]``: redis-py, one client per process, created at first use
  and never pickled (a pickled store carries its URL only; a forked child makes its own client).

Layout and its invariants
-------------------------
Rows are grouped by ``(table, shard)``: the shard that published them, i.e.
``ps.sharding.shard_of(fid, num_shards)``. ``replace_shard`` then swaps one group.

S1  A fid's row lives only in the group of its own shard; ``write_rows``/``replace_shard`` of a
    shard reject fids of other shards, so ``read_rows`` looks in one group per fid.
S2  A group holds rows of one width; reading it with another width is an error.
S3  Every write is atomic for readers: a reader sees a group before or after a
    ``write_rows``/``replace_shard``, never half of it (memory: a readers-writer lock; redis:
    MULTI/EXEC). Reads of several shards are not one snapshot (each shard's PS publishes at
    its own pace anyway).
S4  A missing fid reads as zeros with ``found = False``: the initial value of a row the PS has
    not created (or not yet published).

memory backend: one ``EmbeddingTable(width, SGD, channels=0)`` per group, used purely as a
vectorised fid → row map (numba kernels, no per-key Python loop, lookups release the GIL).
redis backend: one hash per group, ``{prefix}:rows:{table}:{shard}``, fields = fid as 8 bytes
little-endian, values = the row as float32 little-endian bytes; reads are pipelined HMGETs
parsed with one ``np.frombuffer`` over the joined values, writes HSET/HDEL in MULTI/EXEC.
Dense parameter sets are one value each (a ``ps.envelope`` of kind ``dense-params``); sync
records are a hash of JSON values. ``{prefix}:num_shards`` records the shard count the store
was first opened with; a handle with another count is refused (its reads would look in the
wrong groups).

Views: ``view_url(url, "train")`` names a second store beside ``url`` (memory: ``name/train``;
redis: keys under ``{prefix}:view-train``, so a ``clear()`` of the store clears its views
too, on both backends). The PS publishes every input to its training view and every sync
interval to ``url``, the serving view: the worker trains on fresh parameters and scores with
what serving holds (``ps.shard_state``).

Process-shared memory stores
----------------------------
``open_store("memory://name")`` returns the one ``MemoryStore`` of that name in this process:
the DoFns that publish, the workers and the reader that read, and the test or CLI that reads
the result after the run all meet in it. The process's registry holds every memory store
from its first ``open_store`` until :meth:`MemoryStore.drop` (or the process's exit): a store
is the data, like a Redis server's, not a cache, so nothing frees it behind its users' backs.
``drop()`` forgets it (and its views): the next ``open_store`` of the name starts empty, and
handles still held keep the old object alive until they go. A pickled memory store is its URL
and the process it lives in: unpickled in the same process it is the same object, and in
another process (a runner's worker process, a fork) unpickling raises, where a new, empty
store would silently lose everything written to it.

Why not Beam's ``apache_beam.utils.shared.Shared``: it keeps only a weak reference to the
object (plus a keep-alive for the last one acquired in the process), so a store between two
uses, e.g. after the pipeline has finished and before the test reads it, would be garbage
collected with its data; and its handles are keyed by a random id made at construction, where
separately built DoFns and readers must find the store by name. ``ps`` is Beam-free (the store
serves the ``serve`` CLI without Beam), so the registry is this module's own; like ``Shared``
it is per process, which is why ``memory://`` is for one-process runners only.

>>> store = open_store("memory://doctest", num_shards=1)
>>> store.write_rows("dim2", shard=0, fids=[7], rows=[[0.5, -0.5]])
>>> rows, found = open_store("memory://doctest").read_rows("dim2", [7, 8], width=2)
>>> rows.tolist(), found.tolist()
([[0.5, -0.5], [0.0, 0.0]], [True, False])
>>> import pickle
>>> pickle.loads(pickle.dumps(store)) is store
True
>>> store.drop()
>>> open_store("memory://doctest").read_rows("dim2", [7], width=2)[1].tolist()
[False]
"""
from __future__ import annotations

import json
import os
import threading
import urllib.parse
from typing import Dict, Optional, Tuple

import numpy as np

from ps.envelope import open_envelope, seal_arrays
from ps.sharding import shard_of

__all__ = ["ParameterStore", "MemoryStore", "RedisStore", "open_store", "view_url", "row_map"]

# Fields per HSET/HMGET command: bounded requests, still few round trips (they are pipelined).
_CHUNK = 16384


# ------------------------------------------------------------------ interface


def _as_fids(fids) -> np.ndarray:
    fids = np.ascontiguousarray(fids, dtype=np.uint64)
    if fids.ndim != 1:
        raise ValueError(f"fids must be 1-D, got shape {fids.shape}")
    return fids


def _as_rows(rows, n: int) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2 or rows.shape[0] != n or rows.shape[1] < 1:
        raise ValueError(f"rows must be float32 [{n}, width >= 1], got shape {rows.shape}")
    return rows


class ParameterStore:
    """The interface both backends implement (see the module docstring for the semantics)."""

    url: str
    num_shards: Optional[int]

    def _shards(self) -> int:
        """The shard count rows are routed with (a handle opened with ``num_shards=None``
        adopts the store's; it has none before a handle with a count opened it)."""
        if self.num_shards is None:
            raise ValueError(f"{self.url} has no shard count yet: open it with num_shards to "
                             f"read or write rows")
        return self.num_shards

    def _check_shard(self, shard: int, fids: np.ndarray) -> int:
        shard, num_shards = int(shard), self._shards()
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
        if fids.size and (shard_of(fids, num_shards) != shard).any():
            raise ValueError(f"fids of other shards written to shard {shard} (num_shards="
                             f"{num_shards}): route them with ps.sharding.shard_of")
        return shard

    def _groups(self, fids: np.ndarray):
        """Positions of ``fids`` grouped by shard: yields (shard, int64 positions)."""
        num_shards = self._shards()
        if num_shards == 1:
            yield 0, np.arange(fids.size)
            return
        shards = shard_of(fids, num_shards)
        order = np.argsort(shards, kind="stable")
        bounds = np.searchsorted(shards[order], np.arange(num_shards + 1))
        for s in range(num_shards):
            if bounds[s + 1] > bounds[s]:
                yield s, order[bounds[s]:bounds[s + 1]]

    def write_rows(self, table: str, shard: int, fids, rows, deleted=None) -> None:
        """Upsert ``rows[i]`` for ``fids[i]`` (the last occurrence wins), then drop ``deleted``."""
        raise NotImplementedError

    def read_rows(self, table: str, fids, width: int) -> Tuple[np.ndarray, np.ndarray]:
        """(float32 [n, width] rows, bool [n] found); missing fids read as zeros."""
        raise NotImplementedError

    def replace_shard(self, table: str, shard: int, fids, rows) -> None:
        """The rows of ``(table, shard)`` become exactly these."""
        raise NotImplementedError

    def shard_rows(self, table: str, shard: int) -> Tuple[np.ndarray, np.ndarray]:
        """Everything stored for ``(table, shard)``: (uint64 fids sorted, float32 rows)."""
        raise NotImplementedError

    def write_dense(self, name: str, params: Dict[str, np.ndarray], version: int) -> None:
        """Replace the dense parameter set ``name`` (all arrays at once) with its version."""
        raise NotImplementedError

    def read_dense(self, name: str) -> Tuple[Optional[Dict[str, np.ndarray]], int]:
        """(params or None, version; -1 if never written)."""
        raise NotImplementedError

    def set_sync(self, key: str, info: dict) -> None:
        """Record a publisher's progress, e.g. ``{"version", "ts_ms", "wall_time"}``."""
        raise NotImplementedError

    def sync_info(self) -> Dict[str, dict]:
        """``{publisher key: info}`` of every publisher."""
        raise NotImplementedError

    def clear(self) -> None:
        """Remove everything."""
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (the data stays)."""

    def __repr__(self):
        return f"{type(self).__name__}({self.url!r}, num_shards={self.num_shards})"


def view_url(url: str, view: str) -> str:
    """The URL of the store ``view`` kept beside the store at ``url`` (see the module docstring).

    >>> view_url("memory://train", "train")
    'memory://train/train'
    >>> view_url("redis://localhost:6379/0?prefix=p", "train")
    'redis://localhost:6379/0?prefix=p%3Aview-train'
    """
    if not view or not all(c.isalnum() or c in "-_" for c in view):
        raise ValueError(f"a view name is letters, digits, '-' or '_', got {view!r}")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "memory":
        return f"{url.rstrip('/')}/{view}"
    if scheme in ("redis", "rediss", "unix"):
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        query["prefix"] = [f"{query.get('prefix', ['ps'])[0]}:view-{view}"]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query, doseq=True)))
    raise ValueError(f"unknown store URL {url!r}: use memory://name or redis://host:port/db")


def open_store(url: str, num_shards: Optional[int] = 1) -> ParameterStore:
    """The store at ``url``: ``memory://name`` or ``redis://host:port/db[?prefix=p]``.

    ``num_shards``: how many PS shards publish rows (reads route fids with ``shard_of``). A
    store keeps the count it was first opened with and refuses handles with another one;
    ``None`` adopts the store's count (for handles that use dense sets and sync records only).
    """
    if num_shards is not None:
        num_shards = int(num_shards)
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "memory":
        return MemoryStore._get(url, num_shards)
    if scheme in ("redis", "rediss", "unix"):
        return RedisStore(url, num_shards)
    raise ValueError(f"unknown store URL {url!r}: use memory://name or redis://host:port/db")


# ------------------------------------------------------------------ memory backend


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self):
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self):
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Read:
    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        self.lock.acquire_read()

    def __exit__(self, *exc):
        self.lock.release_read()


class _Write(_Read):
    def __enter__(self):
        self.lock.acquire_write()

    def __exit__(self, *exc):
        self.lock.release_write()


def row_map(width: int, capacity: int = 1024):
    """A fid → float32[width] map: an EmbeddingTable without optimizer state or deltas."""
    from ps.embedding_table import EmbeddingTable
    from ps.optimizers import SGD
    return EmbeddingTable(width, SGD(), capacity=max(1, capacity), channels=0)


_memory_stores: Dict[str, "MemoryStore"] = {}  # the process's memory stores by name (above)
_memory_stores_lock = threading.Lock()


def _memory_store_in_process(url: str, num_shards: Optional[int], pid: int) -> "MemoryStore":
    """Unpickle a memory store: the same object, in the process it lives in only."""
    if pid != os.getpid():
        raise RuntimeError(
            f"{url} was pickled in process {pid} and unpickled in process {os.getpid()}: a "
            f"memory:// store is shared only inside one process (DirectRunner, Flink with "
            f"--environment_type=LOOPBACK); use a redis:// store where DoFns run in other "
            f"processes")
    return open_store(url, num_shards)


class MemoryStore(ParameterStore):
    """A store in this process's memory; ``open_store("memory://name")`` returns the same
    object per name, until :meth:`drop` (see the module docstring for its lifetime).

    >>> store = open_store("memory://doctest-dense", num_shards=None)
    >>> store.write_dense("dense", {"w": np.ones(2, np.float32)}, version=3)
    >>> params, version = open_store("memory://doctest-dense", None).read_dense("dense")
    >>> params["w"].tolist(), version
    ([1.0, 1.0], 3)
    >>> store.drop()
    """

    @classmethod
    def _get(cls, url: str, num_shards: int) -> "MemoryStore":
        name = url.split("://", 1)[1] or "default"
        with _memory_stores_lock:
            store = _memory_stores.get(name)
            if store is None:
                store = _memory_stores[name] = cls(f"memory://{name}", num_shards)
            if num_shards is not None:
                if store.num_shards is None:
                    store.num_shards = num_shards
                elif store.num_shards != num_shards:
                    raise ValueError(f"{store.url} has num_shards={store.num_shards}, "
                                     f"opened with {num_shards}")
        return store

    def __init__(self, url: str, num_shards: Optional[int]):
        self.url = url
        self.num_shards = num_shards
        self._lock = _RWLock()
        self._groups_by_key: Dict[Tuple[str, int], object] = {}  # (table, shard) -> row map
        self._dense: Dict[str, Tuple[Dict[str, np.ndarray], int]] = {}
        self._sync: Dict[str, dict] = {}

    def __reduce__(self):  # its URL and its process: the same object, in this process only
        return _memory_store_in_process, (self.url, self.num_shards, os.getpid())

    def _views(self):
        name = self.url.split("://", 1)[1]
        with _memory_stores_lock:
            return [(k, v) for k, v in _memory_stores.items() if k.startswith(f"{name}/")]

    def drop(self) -> None:
        """Forget this store and its views: the next ``open_store`` of its URL starts empty.
        Handles still held keep this object (and its data) alive until they go."""
        name = self.url.split("://", 1)[1]
        views = self._views()
        with _memory_stores_lock:
            if _memory_stores.get(name) is self:
                del _memory_stores[name]
            for key, view in views:
                if _memory_stores.get(key) is view:
                    del _memory_stores[key]

    def _writable_group(self, table, shard, width):
        group = self._groups_by_key.get((table, shard))
        if group is None:
            group = self._groups_by_key[(table, shard)] = row_map(width)
        elif group.dim != width:
            raise ValueError(f"table {table!r} shard {shard} holds rows of width {group.dim}, "
                             f"written with width {width}")
        return group

    def write_rows(self, table, shard, fids, rows, deleted=None):
        fids = _as_fids(fids)
        rows = _as_rows(rows, fids.size)
        shard = self._check_shard(shard, fids)
        deleted = None if deleted is None else _as_fids(deleted)
        with _Write(self._lock):
            group = self._groups_by_key.get((table, shard))
            if fids.size:
                group = self._writable_group(table, shard, rows.shape[1])
                group.insert(fids, weights=rows)
            if deleted is not None and deleted.size and group is not None:
                group.delete(deleted)

    def read_rows(self, table, fids, width):
        fids = _as_fids(fids)
        width = int(width)
        out = np.zeros((fids.size, width), dtype=np.float32)
        found = np.zeros(fids.size, dtype=bool)
        with _Read(self._lock):
            for shard, positions in self._groups(fids):
                group = self._groups_by_key.get((table, shard))
                if group is None:
                    continue
                if group.dim != width:
                    raise ValueError(f"table {table!r} shard {shard} holds rows of width "
                                     f"{group.dim}, read with width {width}")
                if positions.size == fids.size:  # one shard: no gather/scatter
                    out[:], found[:] = group.lookup(fids)
                else:
                    out[positions], found[positions] = group.lookup(fids[positions])
        return out, found

    def replace_shard(self, table, shard, fids, rows):
        fids = _as_fids(fids)
        rows = _as_rows(rows, fids.size)
        shard = self._check_shard(shard, fids)
        group = None
        if fids.size:  # built outside the lock: readers keep reading the old group meanwhile
            group = row_map(rows.shape[1], capacity=fids.size)
            group.insert(fids, weights=rows)
        with _Write(self._lock):
            if group is None:
                self._groups_by_key.pop((table, shard), None)
            else:
                self._groups_by_key[(table, shard)] = group

    def shard_rows(self, table, shard):
        with _Read(self._lock):
            group = self._groups_by_key.get((table, int(shard)))
            if group is None:
                return np.empty(0, np.uint64), np.empty((0, 0), np.float32)
            parts = list(group.items())
        if not parts:
            return np.empty(0, np.uint64), np.empty((0, group.dim), np.float32)
        fids = np.concatenate([p[0] for p in parts])
        rows = np.concatenate([p[1] for p in parts])
        order = np.argsort(fids)
        return fids[order], rows[order]

    def write_dense(self, name, params, version):
        frozen = {}
        for k, v in params.items():
            a = np.array(v, copy=True)
            a.setflags(write=False)  # readers share these arrays: nobody may change them
            frozen[str(k)] = a
        with _Write(self._lock):
            self._dense[name] = (frozen, int(version))

    def read_dense(self, name):
        with _Read(self._lock):
            entry = self._dense.get(name)
        if entry is None:
            return None, -1
        return dict(entry[0]), entry[1]

    def set_sync(self, key, info):
        info = json.loads(json.dumps(info))  # the same JSON-able values redis would keep
        with _Write(self._lock):
            self._sync[key] = info

    def sync_info(self):
        with _Read(self._lock):
            return {k: dict(v) for k, v in self._sync.items()}

    def clear(self):
        with _Write(self._lock):
            self._groups_by_key.clear()
            self._dense.clear()
            self._sync.clear()
        for _, view in self._views():  # a cleared store must not leave a stale training view behind
            view.clear()


# ------------------------------------------------------------------ redis backend


class RedisStore(ParameterStore):
    """Store in redis (see the module docstring for the key layout)."""

    def __init__(self, url: str, num_shards: Optional[int]):
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        self.prefix = query.pop("prefix", ["ps"])[0]
        self._client_url = urllib.parse.urlunsplit(
            parts._replace(query=urllib.parse.urlencode(query, doseq=True)))
        self.url = url
        self.num_shards = num_shards
        self._client = None
        self._pid = None
        self._client_lock = threading.Lock()
        self._widths = {}  # (table, shard) -> width this handle checked or wrote

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = state["_pid"] = state["_client_lock"] = None
        state["_widths"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._client_lock = threading.Lock()

    @property
    def _redis(self):
        """This process's client, created at first use (and again after a fork)."""
        client = self._client
        if client is not None and self._pid == os.getpid():
            return client
        import redis
        with self._client_lock:
            if self._client is None or self._pid != os.getpid():
                client = redis.Redis.from_url(self._client_url)
                key = f"{self.prefix}:num_shards"
                if self.num_shards is not None:
                    client.set(key, self.num_shards, nx=True)
                recorded = client.get(key)
                recorded = None if recorded is None else int(recorded)
                if self.num_shards is None:
                    self.num_shards = recorded
                elif recorded != self.num_shards:
                    raise ValueError(f"{self.url} was opened with num_shards={recorded}, "
                                     f"this handle has {self.num_shards}")
                self._client, self._pid = client, os.getpid()
            return self._client

    def _shards(self):
        if self.num_shards is None:  # adopt the count a handle with one recorded meanwhile
            recorded = self._redis.get(f"{self.prefix}:num_shards")
            self.num_shards = None if recorded is None else int(recorded)
        return super()._shards()

    def _rows_key(self, table, shard):
        return f"{self.prefix}:rows:{table}:{shard}"

    @staticmethod
    def _fields(fids: np.ndarray):
        b = fids.astype("<u8").tobytes()
        return [b[i:i + 8] for i in range(0, len(b), 8)]

    def _queue_hset(self, pipe, key, fids, rows):
        fields = self._fields(fids)
        b = rows.astype("<f4").tobytes()
        step = 4 * rows.shape[1]
        pieces = [None] * (2 * len(fields))
        pieces[0::2] = fields
        pieces[1::2] = [b[i:i + step] for i in range(0, len(b), step)]
        for start in range(0, len(pieces), 2 * _CHUNK):
            pipe.execute_command("HSET", key, *pieces[start:start + 2 * _CHUNK])

    def _queue_hdel(self, pipe, key, fids):
        fields = self._fields(fids)
        for start in range(0, len(fields), _CHUNK):
            pipe.execute_command("HDEL", key, *fields[start:start + _CHUNK])

    def _check_width(self, table, shard, width):
        """S2 on writes: compare with one stored value of the group (once per handle)."""
        if self._widths.get((table, shard)) == width:
            return
        sample = self._redis.hrandfield(self._rows_key(table, shard), 1, withvalues=True)
        if sample and len(sample[1]) != 4 * width:
            raise ValueError(f"table {table!r} shard {shard} holds rows of width "
                             f"{len(sample[1]) // 4}, written with width {width}")
        self._widths[(table, shard)] = width

    def write_rows(self, table, shard, fids, rows, deleted=None):
        fids = _as_fids(fids)
        rows = _as_rows(rows, fids.size)
        shard = self._check_shard(shard, fids)
        deleted = None if deleted is None else _as_fids(deleted)
        key = self._rows_key(table, shard)
        if fids.size:
            self._check_width(table, shard, rows.shape[1])
        pipe = self._redis.pipeline(transaction=True)
        if fids.size:
            self._queue_hset(pipe, key, fids, rows)
        if deleted is not None and deleted.size:
            self._queue_hdel(pipe, key, deleted)
        if pipe.command_stack:
            pipe.execute()

    def read_rows(self, table, fids, width):
        fids = _as_fids(fids)
        width = int(width)
        n = fids.size
        out = np.zeros((n, width), dtype=np.float32)
        found = np.zeros(n, dtype=bool)
        if not n:
            return out, found
        pipe = self._redis.pipeline(transaction=False)
        order = []
        for shard, positions in self._groups(fids):
            fields = self._fields(fids[positions])
            key = self._rows_key(table, shard)
            for start in range(0, len(fields), _CHUNK):
                pipe.execute_command("HMGET", key, *fields[start:start + _CHUNK])
            order.append(positions)
        values = [v for reply in pipe.execute() for v in reply]
        positions = order[0] if len(order) == 1 else np.concatenate(order)
        hit = np.fromiter((v is not None for v in values), dtype=bool, count=n)
        data = np.frombuffer(b"".join([v for v in values if v is not None]), dtype="<f4")
        if data.size != int(hit.sum()) * width:
            raise ValueError(f"table {table!r} holds rows of another width than {width}")
        out[positions[hit]] = data.reshape(-1, width)
        found[positions] = hit
        return out, found

    def replace_shard(self, table, shard, fids, rows):
        fids = _as_fids(fids)
        rows = _as_rows(rows, fids.size)
        shard = self._check_shard(shard, fids)
        key = self._rows_key(table, shard)
        self._widths[(table, shard)] = rows.shape[1]
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        if fids.size:
            self._queue_hset(pipe, key, fids, rows)
        pipe.execute()

    def shard_rows(self, table, shard):
        items = self._redis.hgetall(self._rows_key(table, int(shard)))
        if not items:
            return np.empty(0, np.uint64), np.empty((0, 0), np.float32)
        fids = np.frombuffer(b"".join(items.keys()), dtype="<u8").astype(np.uint64)
        rows = np.frombuffer(b"".join(items.values()), dtype="<f4").reshape(len(items), -1)
        order = np.argsort(fids)
        return fids[order], rows[order].astype(np.float32)

    def write_dense(self, name, params, version):
        blob = seal_arrays("dense-params", {str(k): np.asarray(v) for k, v in params.items()},
                           version=int(version))
        self._redis.set(f"{self.prefix}:dense:{name}", blob)

    def read_dense(self, name):
        blob = self._redis.get(f"{self.prefix}:dense:{name}")
        if blob is None:
            return None, -1
        envelope = open_envelope(blob, "dense-params", source=f"{self.prefix}:dense:{name}")
        return envelope.arrays(), int(envelope.header["version"])

    def set_sync(self, key, info):
        self._redis.hset(f"{self.prefix}:sync", key, json.dumps(info))

    def sync_info(self):
        raw = self._redis.hgetall(f"{self.prefix}:sync")
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def clear(self):
        client = self._redis
        self._widths.clear()
        keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])
        if self.num_shards is not None:
            client.set(f"{self.prefix}:num_shards", self.num_shards)

    def close(self):
        with self._client_lock:
            if self._client is not None:
                self._client.close()
            self._client = self._pid = None
