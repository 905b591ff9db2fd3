"""Serving: score candidate items with the parameters training publishes; log what was served.

    python -m dataflow.serve --store redis://127.0.0.1:6379/0 --model out/models \\
        --config synthetic --model_kind fm --feature_log out/loop/feature_log [--port 8500]

For each request (user, context, candidate items) the service

1. extracts each candidate's fids with the pipeline's own code
   (``transforms.features.extract``: training and serving make the same fids);
2. reads their embedding rows from the ParameterStore, the serving PS that the training
   job's PS shards publish to (a row the store does not hold reads as zeros: the initial
   value of a row the PS has not created);
3. runs the dense part of the model from the newest SavedModel in ``--model``
   (``transforms.export``: reloaded in the background when training publishes a newer
   one; until the first one, the model's initial dense weights, as the PS starts from);
4. adds the log-odds correction of negative sampling (``--score_correction_rate``) and
   returns the candidates ranked by score (the ``top_k`` first, if asked);
5. appends the served items to the **feature log** (``schemas/feature_log.avsc``, Avro, one
   file per ``--roll_s`` of event time, written atomically, ``_watermark.json`` saying up to
   when the folder is complete) with the scores it returned.

It keeps serving when the store is down (rows it read before, from a local copy; the rest
as zeros; the store is tried again every ``--store_retry_s``) and when a new model cannot
be loaded (the last good one), and says so in every answer (``params``).

The API (JSON over HTTP/1.1, keep-alive)::

    POST /score  {"user_id": "u1", "ts_ms": 1704067200000,          # ts_ms: optional
                  "request_id": "r1",                                 # optional
                  "context": {"gender": "f", "age": 31, "device": "ios", "hour": 9, ...},
                  "candidates": [{"item_id": "i7", "features": {"category": "c3", ...},
                                  "true_ctr": 0.03},                  # optional, logged only
                                 ...],
                  "top_k": 10}                                        # optional
      200 {"request_id": "r1", "ts_ms": ..., "items": [{"item_id", "request_id", "score"}, ...],
           "params": {"model_version", "model_ts_ms", "dense_age_ms", "sparse_age_ms",
                      "sparse_wall_age_s", "store": "ok" | "unavailable", "rows_found",
                      "rows_read"}}
      400 {"error": "<reason code>", "detail": "..."}       a request it cannot score
    GET  /healthz   model and store state          GET /stats   counters
    POST /flush     closes the feature log's open file (tests, end of a run)

A candidate's feature record is ``{"request_id": "<request_id>-<position>", "ts_ms",
"user_id", "item_id", "features": context + the candidate's features}``; ``ts_ms`` is the
request's (clamped so that the log's event time never goes back) or the wall clock.
``true_ctr`` is not used for scoring: a simulator passes it so that the log can tell the
Bayes-optimal AUC of what was served.
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import argparse
import collections
import gc
import json
import logging
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np

from dataflow import cli
from schemas import strict_json

try:  # Beam depends on orjson: 3-5x faster than json on a request of 100 candidates
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

_LOG = logging.getLogger(__name__)

MAX_BODY = 16 << 20


class BadRequest(ValueError):
    """A request serving cannot score: ``reason`` is a short code, ``detail`` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------- rolling log


class RollingAvroLog:
    """Records → ``folder/part-YYYYmmdd-HHMMSS.avro``, one file per ``roll_s`` of event time.

    ``append`` buffers records of the open period; a record of a later period closes it: its
    file is written by a background thread under a temporary name and renamed (a reader of
    the folder never sees half a file; ``transforms.sources.TailAvroLogs`` can tail it).
    ``_watermark.json`` (``{"ts_ms": T}``) then says that every record before ``T`` is in a
    file. Records must come in event-time order (a late one goes into the open file, and is
    counted in ``late``).
    """

    WATERMARK = "_watermark.json"

    def __init__(self, folder: str, schema_name: str, roll_s: float, codec: str = "deflate"):
        from schemas import load_schema
        if roll_s <= 0:
            raise ValueError(f"roll_s must be > 0, got {roll_s}")
        self.folder = folder
        self.schema = load_schema(schema_name)
        self.roll_ms = int(roll_s * 1000)
        self.codec = codec
        os.makedirs(folder, exist_ok=True)
        self._lock = threading.Lock()
        self._period = None  # start (ms) of the open period
        self._buffer: list = []
        self.records = 0
        self.files = 0
        self.late = 0
        self.errors = 0
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="avro-log-writer",
                                        daemon=True)
        self._writer.start()

    def append(self, records: list, ts_ms: int) -> None:
        """Append records of event time ``ts_ms`` (all of one request)."""
        period = ts_ms - ts_ms % self.roll_ms
        with self._lock:
            if self._period is None:
                self._period = period
            elif period > self._period:
                self._roll(period)
            elif period < self._period:
                self.late += len(records)
            self._buffer.extend(records)
            self.records += len(records)

    def advance(self, ts_ms: int) -> None:
        """Event time has reached ``ts_ms``: close the open period if it ended before it."""
        period = ts_ms - ts_ms % self.roll_ms
        with self._lock:
            if self._period is None or period > self._period:
                self._roll(period)

    def _roll(self, new_period: int) -> None:
        if self._period is not None and self._buffer:
            self._queue.put(("file", self._period, self._buffer))
        self._buffer = []
        self._period = new_period
        self._queue.put(("watermark", new_period, None))

    def close(self, until_ms: Optional[int] = None) -> None:
        """Write the open file; the watermark moves to ``until_ms`` (default: the end of the
        open period). Waits until everything is on disk."""
        with self._lock:
            end = until_ms
            if end is None:
                end = (self._period + self.roll_ms) if self._period is not None else None
            if end is not None:
                self._roll(max(end, self._period or end))
        self.flush()

    def flush(self) -> None:
        """Wait until the files of every closed period are written."""
        done = threading.Event()
        self._queue.put(("sync", 0, done))
        done.wait()

    def stats(self) -> dict:
        return {"records": self.records, "files": self.files, "late": self.late,
                "errors": self.errors}

    def stop(self) -> None:
        self.close()

    def _write_loop(self):
        import fastavro
        while True:
            kind, period, payload = self._queue.get()
            try:
                if kind == "sync":
                    payload.set()
                elif kind == "file":
                    name = time.strftime("part-%Y%m%d-%H%M%S", time.gmtime(period / 1000))
                    path = os.path.join(self.folder, f"{name}.avro")
                    tmp = os.path.join(self.folder, f".{name}.avro.tmp")
                    with open(tmp, "wb") as f:
                        fastavro.writer(f, self.schema, payload, codec=self.codec)
                    os.replace(tmp, path)
                    self.files += 1
                else:
                    tmp = os.path.join(self.folder, f".{self.WATERMARK}.tmp")
                    with open(tmp, "w", encoding="utf-8") as f:
                        strict_json.dump({"ts_ms": int(period)}, f)
                    os.replace(tmp, os.path.join(self.folder, self.WATERMARK))
            except Exception:  # noqa: BLE001 - the service goes on; the error is counted
                self.errors += 1
                _LOG.exception("feature log: writing %s of period %s failed", kind, period)


class ProcessAvroLog:
    """A :class:`RollingAvroLog` run by a child process (same files, same interface).

    Encoding a feature log record with fastavro takes 30-40 us of C code that holds the GIL
    (its map of union-typed values); a file of a few thousand records, encoded by a thread of
    the service, stalled every request for tens to hundreds of milliseconds. Here the
    service only pickles each request's records into a pipe; the child (niced, so that a
    request wins a shared core) encodes and writes them. ``records`` is counted here;
    ``files``, ``late`` and ``errors`` are asked of the child.
    """

    def __init__(self, folder: str, schema_name: str, roll_s: float, codec: str = "deflate",
                 nice: int = 5):
        if roll_s <= 0:
            raise ValueError(f"roll_s must be > 0, got {roll_s}")
        from multiprocessing.connection import Connection
        self.folder = folder
        # A new interpreter, not a fork of one running TensorFlow's threads, nor
        # multiprocessing's spawn (it would import the caller's __main__ again).
        mine, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from dataflow.serve import _log_main; _log_main()",
             str(theirs.fileno()), folder, schema_name, repr(float(roll_s)), codec, str(nice)],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(mine.detach())
        self._lock = threading.Lock()
        self.records = 0
        self.lost = 0
        self._final: Optional[dict] = None
        self._ask("stats")  # the child is up and its folder exists

    def append(self, records: list, ts_ms: int) -> None:
        self._send(("append", records, ts_ms), len(records))

    def advance(self, ts_ms: int) -> None:
        self._send(("advance", ts_ms), 0)

    def _send(self, message, records: int) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except OSError as e:  # the child is gone: serving goes on, the loss is counted
                if not self.lost:
                    _LOG.error("feature log: its process is gone (%s); records are lost", e)
                self.lost += records
            else:
                self.records += records

    def close(self, until_ms: Optional[int] = None) -> None:
        self._ask("close", until_ms)

    def flush(self) -> None:
        self._ask("flush")

    def stats(self) -> dict:
        if self._final is not None:  # stopped
            return self._final
        return self._ask("stats")

    files = property(lambda self: self.stats()["files"])
    late = property(lambda self: self.stats()["late"])
    errors = property(lambda self: self.stats()["errors"])

    def _ask(self, what: str, arg=None) -> dict:
        with self._lock:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the feature log process ended ({self._proc.returncode})")
            try:
                self._conn.send((what, arg))
                return self._conn.recv()
            except (OSError, EOFError) as e:
                raise RuntimeError(f"the feature log process is gone: {e}") from None

    def stop(self) -> None:
        """Write the open file and end the child."""
        if self._final is not None:
            return
        self._final = {"records": self.records, "files": None, "late": None, "errors": None}
        try:
            self._final = self._ask("stop")
        except RuntimeError:
            pass
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()


def _log_main() -> None:
    """The child of :class:`ProcessAvroLog` (argv: socket fd, folder, schema, roll_s, codec,
    nice): runs a RollingAvroLog until told to stop or until its parent is gone (end of the
    socket: the open period is not written, as when a service with an in-process log
    dies)."""
    from multiprocessing.connection import Connection
    fd, folder, schema_name, roll_s, codec, nice = sys.argv[1:7]
    # Ctrl-C and a SIGTERM to the service's process group reach this process too: the
    # service, stopping on them, still has the open period to write through it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.nice(int(nice))
    except OSError:
        pass
    conn = Connection(int(fd))
    log = RollingAvroLog(folder, schema_name, float(roll_s), codec)

    def stats():
        return {"records": log.records, "files": log.files, "late": log.late,
                "errors": log.errors}

    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "append":
            log.append(message[1], message[2])
        elif kind == "advance":
            log.advance(message[1])
        elif kind == "close":
            log.close(message[1])
            conn.send(stats())
        elif kind == "flush":
            log.flush()
            conn.send(stats())
        elif kind == "stats":
            conn.send(stats())
        elif kind == "stop":
            log.close()
            conn.send(stats())
            return


def open_feature_log(folder: str, roll_s: float, in_process: bool = False):
    """Serving's feature log: in a child process (default), or in this one."""
    cls = RollingAvroLog if in_process else ProcessAvroLog
    return cls(folder, "feature_log", roll_s)


def read_watermark(folder: str) -> Optional[int]:
    """The ``_watermark.json`` of a folder a :class:`RollingAvroLog` writes (None: none yet)."""
    try:
        with open(os.path.join(folder, RollingAvroLog.WATERMARK), encoding="utf-8") as f:
            return int(json.load(f)["ts_ms"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- the scorer


class RequestExtractor:
    """A request's fids and dense inputs, with the pipeline's own extraction
    (``transforms.features.extract``), the context's part once per request.

    The pipeline extracts each served item's record (context + item fields) on its own.
    The slots and dense inputs that read no field any candidate has (nor ``item_id``) come
    out the same for every candidate: here they are extracted once from the context, the
    others per candidate from the merged record, each with a sub-config of the feature
    config (cached per set of candidate field names). The fids of a candidate are the same
    as the pipeline's, context slots first (``Model.index`` orders them by slot).
    """

    def __init__(self, config):
        self.config = config
        self._splits: dict = {}

    def _split(self, item_fields: frozenset):
        split = self._splits.get(item_fields)
        if split is None:
            from schemas.feature_config import FeatureConfig
            config = self.config
            per_item = item_fields | {"item_id"}
            item_slot = [bool(per_item.intersection(s.fields)) for s in config.slots]
            item_dense = [d.source in per_item for d in config.dense]

            def sub(keep_slot, keep_dense):
                return FeatureConfig(
                    slots=tuple(s for s, k in zip(config.slots, item_slot) if k == keep_slot),
                    dense=tuple(d for d, k in zip(config.dense, item_dense) if k == keep_dense),
                    max_list_length=config.max_list_length)
            split = (sub(False, False), sub(True, True),
                     np.flatnonzero(~np.array(item_dense, bool)),
                     np.flatnonzero(np.array(item_dense, bool)))
            if len(self._splits) > 256:
                self._splits.clear()
            self._splits[item_fields] = split
        return split

    def __call__(self, records: list, context: dict, item_fields: frozenset):
        """(uint64 fids, int64 row_splits [n+1], float32 dense [n, d]) of the records (one
        request's: the same user_id, ts_ms and context); raises BadRequest."""
        from transforms.features import ExtractError, extract
        n = len(records)
        dense = np.empty((n, len(self.config.dense)), np.float32)
        if self.config.needs_analysis:  # extract raises the pipeline's error for it
            context_config, item_config = None, self.config
            context_dense, item_dense = np.empty(0, np.int64), np.arange(dense.shape[1])
        else:
            context_config, item_config, context_dense, item_dense = \
                self._split(item_fields)
        context_fids: list = []
        if context_config is not None and (context_config.slots or context_config.dense):
            first = records[0]
            try:
                out = extract({"request_id": first["request_id"], "ts_ms": first["ts_ms"],
                               "user_id": first["user_id"], "item_id": first["item_id"],
                               "features": context}, context_config)
            except ExtractError as e:
                raise BadRequest(e.reason, f"context: {e.detail}") from None
            context_fids = out["fids"]
            dense[:, context_dense] = out["dense"]
        fids: list = []
        lengths = np.empty(n, np.int64)
        item_dense_values = np.empty((n, len(item_dense)), np.float32)
        for j, record in enumerate(records):
            try:
                out = extract(record, item_config)
            except ExtractError as e:
                raise BadRequest(e.reason, f"candidate {j}: {e.detail}") from None
            fids.extend(context_fids)
            fids.extend(out["fids"])
            lengths[j] = len(context_fids) + len(out["fids"])
            item_dense_values[j] = out["dense"]
        dense[:, item_dense] = item_dense_values
        row_splits = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=row_splits[1:])
        return np.array(fids, dtype=np.uint64), row_splits, dense



def _check_feature_values(where: str, features) -> dict:
    """Feature maps must hold what the feature log's Avro map holds: null, string, long,
    double or a list of strings (anything else could not be logged)."""
    if features is None:
        return {}
    if not isinstance(features, dict):
        raise BadRequest(f"wrong_type:{where}", f"expected an object, got "
                                                f"{type(features).__name__}")
    for name, value in features.items():
        if value is None or type(value) in (str, int, float):
            if type(value) is float and not math.isfinite(value):
                raise BadRequest(f"not_finite:{where}.{name}", f"{value!r}")
            continue
        if type(value) is list and all(type(v) is str for v in value):
            continue
        raise BadRequest(f"wrong_type:{where}.{name}",
                         f"a feature is a string, a number, null or a list of strings, got "
                         f"{type(value).__name__} {value!r}"[:300])
    return features


class Scorer:
    """Scores requests; holds the model, the store handle and the last good parameters.

    ``refresh()`` (called by a background thread every ``poll_s``) loads a newer model and
    the store's sync records; ``score(request)`` is thread-safe.
    """

    def __init__(self, config, spec, store_url: str, num_shards: int,
                 model_dir: Optional[str] = None, score_correction_rate: float = 1.0,
                 feature_log: Optional[RollingAvroLog] = None, store_retry_s: float = 1.0,
                 max_candidates: int = 2000, max_cached_rows: int = 2_000_000):
        from ps.store import row_map, open_store
        from transforms.export import DenseModule
        from transforms.model import Model
        if not 0 < score_correction_rate <= 1:
            raise ValueError(f"score_correction_rate must be in (0, 1], got "
                             f"{score_correction_rate}")
        self.config = config
        self.spec = spec
        self.model = Model(spec)
        self.extractor = RequestExtractor(config)
        self.store_url = _with_timeouts(store_url)
        self.store = open_store(self.store_url, num_shards=num_shards)
        self.model_dir = model_dir
        self.correction_rate = float(score_correction_rate)
        self.feature_log = feature_log
        self.store_retry_s = store_retry_s
        self.max_candidates = max_candidates
        self.max_cached_rows = max_cached_rows
        self._row_map = row_map
        self._cache = row_map(spec.width)
        self._cache_lock = threading.Lock()
        self._store_down_until = 0.0
        self._store_ok = True
        self._sync: dict = {}
        self._clock_lock = threading.Lock()
        self._last_ts = 0
        self._request_seq = 0
        self._prefix = uuid.uuid4().hex[:8]
        # Until training publishes a model: the initial weights, as DenseShard starts from.
        self.dense = _warmed_up(DenseModule(spec, self.model.initial_dense_params(),
                                            version=-1, ts_ms=0), spec)
        self.model_version, self.model_ts_ms, self.model_path = -1, None, None
        self.counters = collections.Counter()
        self._counter_lock = threading.Lock()

    # -- background refresh -------------------------------------------------------------

    def refresh(self) -> None:
        """Load a newer model if one was published; read the store's sync records."""
        from transforms.export import latest_model, load_model
        if self.model_dir:
            path = latest_model(self.model_dir)
            if path is not None and path != self.model_path:
                try:
                    loaded = load_model(path)
                    if loaded.spec != self.spec:
                        raise ValueError(f"its spec {loaded.spec} is not serving's {self.spec}")
                    _warmed_up(loaded, self.spec)  # before it takes requests: no slow first call
                except Exception as e:  # noqa: BLE001 - keep serving the last good model
                    self._count("model_load_errors")
                    _LOG.error("serve: cannot load model %s (%s); serving version %d still",
                               path, e, self.model_version)
                    self.model_path = path  # do not retry this one; a newer one will come
                else:
                    self.dense = loaded
                    self.model_version, self.model_ts_ms = loaded.version, loaded.ts_ms
                    self.model_path = path
                    self._count("model_loads")
                    _LOG.info("serve: model version %d (event time %d) from %s",
                              loaded.version, loaded.ts_ms, path)
        if time.monotonic() >= self._store_down_until:
            try:
                self._sync = self.store.sync_info()
            except Exception as e:  # noqa: BLE001
                self._store_failed(e)

    def _store_failed(self, error) -> None:
        if self._store_ok:
            _LOG.warning("serve: the store %s is unavailable (%s); serving the rows read "
                         "before", self.store_url, error)
        self._store_ok = False
        self._store_down_until = time.monotonic() + self.store_retry_s
        self._count("store_errors")

    def _count(self, name: str, n: int = 1) -> None:
        with self._counter_lock:
            self.counters[name] += n

    # -- scoring --------------------------------------------------------------------------

    def _read_rows(self, keys: np.ndarray):
        table, width = self.spec.table, self.spec.width
        if time.monotonic() >= self._store_down_until:
            try:
                rows, found = self.store.read_rows(table, keys, width)
            except Exception as e:  # noqa: BLE001 - redis down, timeouts, ...
                self._store_failed(e)
            else:
                if not self._store_ok:
                    _LOG.info("serve: the store is back")
                self._store_ok = True
                with self._cache_lock:
                    if len(self._cache) > self.max_cached_rows:
                        self._cache = self._row_map(width)
                    if found.any():
                        self._cache.insert(keys[found], weights=rows[found])
                return rows, found, True
        with self._cache_lock:
            rows, found = self._cache.lookup(keys)
        return np.asarray(rows, np.float32), np.asarray(found, bool), False

    def parse(self, request) -> tuple:
        """(records to extract, their true CTRs, top_k, request id, event time)."""
        if not isinstance(request, dict):
            raise BadRequest("not_an_object", f"the request must be a JSON object, got "
                                              f"{type(request).__name__}")
        user_id = request.get("user_id")
        if type(user_id) is int:
            user_id = str(user_id)
        if type(user_id) is not str or not user_id:
            raise BadRequest("missing_field:user_id" if user_id is None
                             else "wrong_type:user_id", "user_id must be a non-empty string")
        ts_ms = request.get("ts_ms")
        if ts_ms is not None and (type(ts_ms) is not int or ts_ms < 0):
            raise BadRequest("wrong_type:ts_ms", "ts_ms must be a non-negative integer (ms "
                                                 "since the epoch)")
        context = _check_feature_values("context", request.get("context"))
        candidates = request.get("candidates")
        if not isinstance(candidates, list):
            raise BadRequest("missing_field:candidates" if candidates is None
                             else "wrong_type:candidates", "candidates must be a list")
        if not candidates:
            raise BadRequest("no_candidates", "candidates is empty")
        if len(candidates) > self.max_candidates:
            raise BadRequest("too_many_candidates", f"{len(candidates)} > "
                                                    f"{self.max_candidates}")
        top_k = request.get("top_k")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            raise BadRequest("wrong_type:top_k", "top_k must be a positive integer")
        request_id = request.get("request_id")
        if request_id is not None and (type(request_id) is not str or not request_id):
            raise BadRequest("wrong_type:request_id", "request_id must be a non-empty string")
        if ts_ms is None:
            ts_ms = int(time.time() * 1000)
        if request_id is None:
            with self._clock_lock:
                self._request_seq += 1
                request_id = f"{self._prefix}-{self._request_seq}"
        records, true_ctr, item_fields = [], [], set()
        for j, candidate in enumerate(candidates):
            if not isinstance(candidate, dict):
                raise BadRequest(f"wrong_type:candidates[{j}]", "a candidate is an object")
            item_id = candidate.get("item_id")
            if type(item_id) is int:
                item_id = str(item_id)
            if type(item_id) is not str or not item_id:
                raise BadRequest(f"missing_field:candidates[{j}].item_id",
                                 "every candidate needs an item_id string")
            features = _check_feature_values(f"candidates[{j}].features",
                                             candidate.get("features"))
            ctr = candidate.get("true_ctr")
            if ctr is not None and (type(ctr) not in (int, float) or not 0 <= ctr <= 1):
                raise BadRequest(f"wrong_type:candidates[{j}].true_ctr",
                                 "true_ctr must be a probability")
            merged = dict(context)
            if features:
                merged.update(features)
                item_fields.update(features)
            records.append({"request_id": f"{request_id}-{j}", "ts_ms": ts_ms,
                            "user_id": user_id, "item_id": item_id, "features": merged})
            true_ctr.append(None if ctr is None else float(ctr))
        return records, true_ctr, top_k, request_id, ts_ms, context, frozenset(item_fields)

    def score(self, request) -> dict:
        """The answer to one request (raises :class:`BadRequest`)."""
        from transforms.example_batch import ExampleBatch
        records, true_ctr, top_k, request_id, ts_ms, context, item_fields = \
            self.parse(request)
        n = len(records)
        fids, row_splits, dense = self.extractor(records, context, item_fields)
        batch = ExampleBatch(
            fids=fids, row_splits=row_splits, dense=dense,
            label=np.zeros(n, np.float32), weight=np.ones(n, np.float32),
            ts_ms=np.full(n, ts_ms, np.int64), true_ctr=np.full(n, np.nan, np.float32))
        index = self.model.index(batch)
        rows, found, fresh = self._read_rows(index.keys)
        gathered = self.model.gather(batch, {self.spec.table: (index.keys, rows)}, index)
        occurrences = np.stack([gathered.row_of_occurrence, gathered.segment])
        dense_model = self.dense  # one model for the whole request, even if one is loading
        logits = np.asarray(dense_model.logits(rows, occurrences, dense), np.float64)
        if self.correction_rate != 1.0:
            from transforms.joiner import log_odds_correction
            logits = log_odds_correction(logits, self.correction_rate)
        scores = 1.0 / (1.0 + np.exp(-logits))
        order = np.argsort(-scores, kind="stable")
        if top_k is not None:
            order = order[:top_k]
        served = order.tolist()
        score_list = scores.tolist()
        log = [{**records[j], "served_score": score_list[j], "true_ctr": true_ctr[j]}
               for j in served] if self.feature_log is not None else None
        # Only a request that was scored moves the service's event time, and it is logged
        # in the same step: the feature log's event time never goes back.
        with self._clock_lock:
            ts_ms = max(int(ts_ms), self._last_ts)
            self._last_ts = ts_ms
            if log is not None:
                for record in log:
                    record["ts_ms"] = ts_ms
                self.feature_log.append(log, ts_ms)
        self._count("requests")
        self._count("candidates", n)
        self._count("served", len(served))
        return {"request_id": request_id, "ts_ms": ts_ms,
                "items": [{"item_id": records[j]["item_id"],
                           "request_id": records[j]["request_id"],
                           "score": score_list[j]} for j in served],
                "params": self.params_info(ts_ms, fresh, int(found.sum()), len(found))}

    def params_info(self, ts_ms: int, fresh: bool = True, rows_found: int = 0,
                    rows_read: int = 0) -> dict:
        """How old the parameters are: event time of the model and of the sparse rows
        (the oldest shard's last publish) before ``ts_ms``, and wall seconds since then."""
        sync = self._sync
        # shards that have applied nothing yet (event time 0) say nothing about age
        sparse = [v for k, v in sync.items()
                  if k.startswith("sparse/") and v.get("ts_ms", 0) > 0]
        sparse_ts = min((v.get("ts_ms", 0) for v in sparse), default=None)
        sparse_wall = min((v.get("wall_time", 0) for v in sparse), default=None)
        return {"model_version": self.model_version, "model_ts_ms": self.model_ts_ms,
                "dense_age_ms": None if self.model_ts_ms is None else ts_ms - self.model_ts_ms,
                "sparse_ts_ms": sparse_ts,
                "sparse_age_ms": None if sparse_ts is None else ts_ms - sparse_ts,
                "sparse_wall_age_s": None if sparse_wall is None
                else round(time.time() - sparse_wall, 3),
                "store": "ok" if fresh else "unavailable",
                "rows_found": rows_found, "rows_read": rows_read}

    def health(self) -> dict:
        return {"status": "ok", "model_version": self.model_version,
                "model_ts_ms": self.model_ts_ms, "model_path": self.model_path,
                "store": "ok" if self._store_ok else "unavailable",
                "sync": self._sync, "event_time_ms": self._last_ts}


def _freeze_heap() -> None:
    """Move every object alive at the start (TensorFlow's and the first model's: ~400k) out
    of the garbage collector's generations: a full collection over them took 0.1-0.4 s, a
    request's worst latency. Models loaded later are not frozen (a replaced one must be
    freed): ~1,800 objects each, a full collection then takes a few ms."""
    gc.collect()
    gc.freeze()


def _warmed_up(dense_model, spec):
    """Run a model once on one example (TensorFlow optimises a graph at its first call)."""
    rows = np.zeros((1, spec.width), np.float32)
    occurrences = np.zeros((2, 1), np.int32)
    dense_model.logits(rows, occurrences, np.zeros((1, spec.dense_dim), np.float32))
    return dense_model


def _with_timeouts(url: str) -> str:
    """A redis URL with short socket timeouts (unless given): a hung store must not hang
    requests; serving falls back to the rows it read before."""
    if not url.startswith(("redis://", "rediss://")):
        return url
    for name, value in (("socket_timeout", "0.5"), ("socket_connect_timeout", "0.5")):
        if f"{name}=" not in url:
            url += ("&" if "?" in url else "?") + f"{name}={value}"
    return url


# --------------------------------------------------------------------------- HTTP


def _loads(body: bytes):
    return _orjson.loads(body) if _orjson is not None else json.loads(body)


def _dumps(body) -> bytes:
    if _orjson is not None:
        try:
            return _orjson.dumps(body)  # (NaN and infinity as null, as strict_json does)
        except TypeError:  # e.g. a non-str key in the store's sync records
            pass
    return strict_json.dumps(body, separators=(",", ":"), default=str).encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: no TCP handshake per request
    server_version = "beam-monolith-serve/1"

    def setup(self):
        super().setup()
        # Small answers on a keep-alive connection: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # one line per request would be the bottleneck
        pass

    def _send(self, status: int, body: dict) -> None:
        data = _dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # headers and body in one write (one TCP segment for a small answer)
        self._headers_buffer.append(b"\r\n" + data)
        self.flush_headers()

    def _error(self, status: int, reason: str, detail: str) -> None:
        self.server.scorer._count(f"http_{status}")
        self._send(status, {"error": reason, "detail": detail})

    def do_GET(self):
        scorer = self.server.scorer
        if self.path == "/healthz":
            self._send(200, scorer.health())
        elif self.path == "/stats":
            with scorer._counter_lock:
                counters = dict(scorer.counters)
            log = scorer.feature_log
            if log is not None:
                counters.update({f"feature_log_{k}": v for k, v in log.stats().items()})
            self._send(200, counters)
        else:
            self._error(404, "not_found", f"no such path {self.path!r}: POST /score, "
                                          f"GET /healthz, GET /stats, POST /flush")

    def do_POST(self):
        scorer = self.server.scorer
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(411, "length_required", "send a Content-Length")
        length = int(length)
        if length > MAX_BODY:
            self.close_connection = True
            return self._error(413, "too_large", f"body of {length} bytes > {MAX_BODY}")
        body = self.rfile.read(length)
        if self.path == "/flush":
            if scorer.feature_log is not None:
                scorer.feature_log.close()
            return self._send(200, {"flushed": scorer.feature_log is not None})
        if self.path != "/score":
            return self._error(404, "not_found", f"no such path {self.path!r}")
        try:
            request = _loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return self._error(400, "bad_json", str(e)[:300])
        try:
            answer = scorer.score(request)
        except BadRequest as e:
            return self._error(400, e.reason, e.detail)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the service
            _LOG.exception("serve: scoring failed")
            return self._error(500, "internal_error", f"{type(e).__name__}: {e}"[:300])
        self._send(200, answer)


class Server:
    """The HTTP service around a :class:`Scorer`; ``start()`` serves in background threads.

        server = Server(scorer, port=0).start()   # port 0: any free port
        server.url                                # http://127.0.0.1:PORT
        server.stop()
    """

    def __init__(self, scorer: Scorer, host: str = "127.0.0.1", port: int = 0,
                 poll_s: float = 1.0):
        self.scorer = scorer
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.scorer = scorer
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._threads: list = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _refresh_loop(self):
        while not self._stop.is_set():
            try:
                self.scorer.refresh()
            except Exception:  # noqa: BLE001
                _LOG.exception("serve: refresh failed")
            self._stop.wait(self.poll_s)

    def start(self) -> "Server":
        self.scorer.refresh()
        _freeze_heap()
        for target, name in ((self.httpd.serve_forever, "http"),
                             (self._refresh_loop, "refresh")):
            t = threading.Thread(target=target, name=f"serve-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.scorer.feature_log is not None:
            self.scorer.feature_log.stop()  # writes the open file


# --------------------------------------------------------------------------- CLI


def parser() -> argparse.ArgumentParser:
    p = cli.argument_parser(prog="python -m dataflow.serve", description=__doc__)
    p.add_argument("--store", required=True,
                   help="ParameterStore URL (redis://HOST:PORT/DB; memory://NAME only in-process)")
    p.add_argument("--model", dest="model_dir", default=None,
                   help="model directory that training exports SavedModels into "
                        "(dataflow.train --model_dir); the newest is loaded")
    p.add_argument("--config", required=True, help="feature config (YAML path or name)")
    p.add_argument("--model_kind", default="deepfm", choices=["lr", "fm", "deepfm"],
                   help="the model training trains (dataflow.train --model)")
    p.add_argument("--seed", type=int, default=0, help="dataflow.train --seed (initial weights)")
    p.add_argument("--num_shards", type=int, default=2, help="dataflow.train --num_shards")
    p.add_argument("--feature_log", default=None, help="folder of the feature log")
    p.add_argument("--roll_s", type=float, default=60.0,
                   help="event-time seconds per feature log file")
    p.add_argument("--feature_log_in_process", action="store_true",
                   help="write the feature log with a thread of the service, not a child "
                        "process (its Avro encoding then holds the GIL against requests)")
    p.add_argument("--score_correction_rate", type=float, default=1.0,
                   help="add log(rate) to every logit: the joiner's --negative_sample_rate "
                        "for a model trained on sampled negatives without their sample "
                        "weights (dataflow.train weighs its loss by them: leave it 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8500, help="0: any free port")
    p.add_argument("--port_file", default=None,
                   help="write the URL served here (useful with --port 0)")
    p.add_argument("--poll_s", type=float, default=1.0,
                   help="how often to look for a newer model and the store's sync records")
    p.add_argument("--store_retry_s", type=float, default=1.0,
                   help="after a store error, serve from the local copy this long")
    p.add_argument("--max_candidates", type=int, default=2000)
    return p


def build_scorer(args) -> Scorer:
    from transforms.model import ModelSpec
    from schemas.feature_config import load_feature_config
    config = load_feature_config(args.config)
    spec = ModelSpec.from_feature_config(config, args.model_kind, args.seed)
    log = open_feature_log(args.feature_log, args.roll_s, args.feature_log_in_process) \
        if args.feature_log else None
    return Scorer(config, spec, args.store, args.num_shards, args.model_dir,
                  args.score_correction_rate, log, args.store_retry_s, args.max_candidates)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        scorer = build_scorer(args)
        server = Server(scorer, args.host, args.port, args.poll_s).start()
    except (ValueError, OSError) as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(server.url)
        os.replace(tmp, args.port_file)
    print(f"serving on {server.url} (store {args.store}, models {args.model_dir})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    log = scorer.feature_log
    print(f"serve: stopped; {scorer.counters['requests']} requests"
          + (f", {log.records} records in {log.files} feature log files" if log else ""),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
