"""ParameterStore: the serving copy of the parameters, published by the PS DoFns.

The PS DoFns (``ps.shard``) own parameters and optimizer state in Beam state; every sync
interval they publish what changed here. Workers and serving read from here. The store closes
the worker → PS → worker loop that a Beam DAG cannot express (DESIGN §1).

    store = open_store("memory://train", num_shards=4)     # or "redis://127.0.0.1:6379/0"
    store.write_rows("dim8", shard=1, fids=f, rows=r, deleted=d)   # a PS shard publishes
    rows, found = store.read_rows("dim8", fids, width=8)           # a worker reads

Two backends behind one interface, chosen by URL, passing one test suite (tests/test_store.py):

* ``memory://name``: an in-process registry; the same name gives the same object in one
  process (DirectRunner, Flink ``--environment_type=LOOPBACK``). Pickling a memory store
  pickles its URL, so a DoFn unpickled in the same process finds the same object.
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
Dense parameter sets are one value each (``encode_arrays``: JSON header + raw bytes); sync
records are a hash of JSON values. ``{prefix}:num_shards`` records the shard count the store
was first opened with; a handle with another count is refused (its reads would look in the
wrong groups).

Views: ``view_url(url, "train")`` names a second store beside ``url`` (memory: ``name/train``;
redis: keys under ``{prefix}:view-train``, so a ``clear()`` of the store clears its views
too, on both backends). The PS publishes every input to its training view and every sync
interval to ``url``, the serving view: the worker trains on fresh parameters and scores with
what serving holds (``ps.shard``).
"""
from __future__ import annotations

import json
import os
import struct
import threading
import urllib.parse
from typing import Dict, Optional, Tuple

import numpy as np

from ps.sharding import shard_of

__all__ = ["ParameterStore", "MemoryStore", "RedisStore", "open_store", "view_url",
           "encode_arrays", "decode_arrays"]

# Fields per HSET/HMGET command: bounded requests, still few round trips (they are pipelined).
_CHUNK = 16384


# ------------------------------------------------------------------ array dict encoding

_ARRAYS_MAGIC = b"PSARRAY1"
_ARRAYS_PREAMBLE = struct.Struct("<8sI")


def encode_arrays(arrays: Dict[str, np.ndarray], meta: Optional[dict] = None) -> bytes:
    """``{name: array}`` (+ a JSON-able ``meta``) → bytes: magic, header length, JSON header
    (names, dtypes, shapes, meta), then the arrays' little-endian bytes back to back."""
    names = list(arrays)
    arrs = [np.ascontiguousarray(arrays[k]) for k in names]
    arrs = [a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a for a in arrs]
    header = json.dumps({"arrays": [[k, a.dtype.str, list(a.shape)] for k, a in zip(names, arrs)],
                         "meta": meta}).encode("utf-8")
    return b"".join([_ARRAYS_PREAMBLE.pack(_ARRAYS_MAGIC, len(header)), header,
                     *(a.tobytes() for a in arrs)])


def decode_arrays(data: bytes) -> Tuple[Dict[str, np.ndarray], Optional[dict]]:
    """Inverse of ``encode_arrays``: (``{name: writable array}``, meta)."""
    data = memoryview(data).cast("B")
    magic, header_len = _ARRAYS_PREAMBLE.unpack_from(data)
    if magic != _ARRAYS_MAGIC:
        raise ValueError(f"not an encoded array dict: magic {bytes(magic)!r}")
    offset = _ARRAYS_PREAMBLE.size
    header = json.loads(bytes(data[offset:offset + header_len]))
    offset += header_len
    out = {}
    for name, dtype, shape in header["arrays"]:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape).copy()
        offset += count * dtype.itemsize
    if offset != len(data):
        raise ValueError(f"encoded array dict has {len(data) - offset} unexpected trailing bytes")
    return out, header["meta"]


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


class MemoryStore(ParameterStore):
    """In-process store; ``open_store("memory://name")`` returns the same object per name."""

    _registry: Dict[str, "MemoryStore"] = {}
    _registry_lock = threading.Lock()

    @classmethod
    def _get(cls, url: str, num_shards: int) -> "MemoryStore":
        name = url.split("://", 1)[1] or "default"
        with cls._registry_lock:
            store = cls._registry.get(name)
            if store is None:
                store = cls._registry[name] = cls(f"memory://{name}", num_shards)
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

    def __reduce__(self):  # a pickled memory store is its URL: same process, same object
        return open_store, (self.url, self.num_shards)

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
        name = self.url.split("://", 1)[1]
        with self._registry_lock:
            views = [v for k, v in self._registry.items() if k.startswith(f"{name}/")]
        for view in views:  # a cleared store must not leave a stale training view behind
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
        blob = encode_arrays({str(k): np.asarray(v) for k, v in params.items()},
                             meta={"version": int(version)})
        self._redis.set(f"{self.prefix}:dense:{name}", blob)

    def read_dense(self, name):
        blob = self._redis.get(f"{self.prefix}:dense:{name}")
        if blob is None:
            return None, -1
        params, meta = decode_arrays(blob)
        return params, int(meta["version"])

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
