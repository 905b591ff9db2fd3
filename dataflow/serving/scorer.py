"""The scorer: a request's candidates scored with the parameters training publishes (the
store's embedding rows, the newest SavedModel's dense part), ranked, and logged to the
feature log (see ``dataflow.serve``). Thread-safe; :class:`dataflow.serving.http_server.Server`
serves it over HTTP.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Optional

import numpy as np

from dataflow.serving.request import RequestExtractor, RequestParser

__all__ = ["Scorer"]

_LOG = logging.getLogger(__name__)


class Scorer:
    """Scores requests; holds the model, the store handle and the last good parameters.

    ``refresh()`` (called by a background thread every ``poll_s``) loads a newer model and
    the store's sync records; ``score(request)`` is thread-safe. It keeps scoring when the
    store is down (rows it read before, from a local copy; the rest as zeros; the store is
    tried again every ``store_retry_s``) and when a new model cannot be loaded (the last
    good one), and says so in every answer (``params``).

    Args:
        config: the feature config (``schemas.feature_config.FeatureConfig``).
        spec: the model's ``transforms.model.ModelSpec`` (as training's).
        store_url: the ParameterStore's URL (``redis://``, ``memory://``).
        num_shards: training's PS shards.
        model_dir: the folder training exports SavedModels into (None: the initial dense
            weights only).
        score_correction_rate: ``log(rate)`` is added to every logit (negative sampling
            at this rate without sample weights).
        feature_log: where served items are logged (``dataflow.serving.feature_log``), or
            None.
        store_retry_s: after a store error, serve from the local copy this long.
        max_candidates: the most candidates a request may have.
        max_cached_rows: the local copy's size at which it is emptied.

    Raises:
        ValueError: ``score_correction_rate`` outside (0, 1].

    Before training publishes anything it scores with the initial weights:

    >>> from schemas.feature_config import FeatureConfig
    >>> from transforms.model import ModelSpec
    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "user", "slot": 1, "source": "user_id"},
    ...     {"name": "item", "slot": 2, "source": "item_id"}]})
    >>> scorer = Scorer(config, ModelSpec("lr", slots=[(1, 4), (2, 4)]), "memory://scorer-doc",
    ...                 num_shards=1)
    >>> scorer.refresh()
    >>> answer = scorer.score({"user_id": "u1", "ts_ms": 5, "request_id": "r", "top_k": 1,
    ...                        "candidates": [{"item_id": "i7"}, {"item_id": "i8"}]})
    >>> answer["items"], answer["params"]["model_version"]
    ([{'item_id': 'i7', 'request_id': 'r-0', 'score': 0.5}], -1)
    """

    def __init__(self, config, spec, store_url: str, num_shards: int,
                 model_dir: Optional[str] = None, score_correction_rate: float = 1.0,
                 feature_log=None, store_retry_s: float = 1.0,
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
        self.parser = RequestParser(max_candidates)
        self.extractor = RequestExtractor(config)
        self.store_url = _with_timeouts(store_url)
        self.store = open_store(self.store_url, num_shards=num_shards)
        self.model_dir = model_dir
        self.correction_rate = float(score_correction_rate)
        self.feature_log = feature_log
        self.store_retry_s = store_retry_s
        self.max_cached_rows = max_cached_rows
        self._row_map = row_map
        self._cache = row_map(spec.width)
        self._cache_lock = threading.Lock()
        self._store_down_until = 0.0
        self._store_ok = True
        self._sync: dict = {}
        self._clock_lock = threading.Lock()
        self._last_ts = 0
        # Until training publishes a model: the initial weights, as DenseShard starts from.
        self.dense = _warmed_up(DenseModule(spec, self.model.initial_dense_params(),
                                            version=-1, ts_ms=0), spec)
        self.model_version, self.model_ts_ms, self.model_path = -1, None, None
        self.counters = collections.Counter()
        self._counter_lock = threading.Lock()

    # -- background refresh -------------------------------------------------------------

    def refresh(self) -> None:
        """Loads a newer model if one was published; reads the store's sync records."""
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
                    self.count("model_load_errors")
                    _LOG.error("serve: cannot load model %s (%s); serving version %d still",
                               path, e, self.model_version)
                    self.model_path = path  # do not retry this one; a newer one will come
                else:
                    self.dense = loaded
                    self.model_version, self.model_ts_ms = loaded.version, loaded.ts_ms
                    self.model_path = path
                    self.count("model_loads")
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
        self.count("store_errors")

    def count(self, name: str, n: int = 1) -> None:
        """Counts something (in :meth:`stats`).

        Args:
            name: the counter.
            n: how much to add.
        """
        with self._counter_lock:
            self.counters[name] += n

    def stats(self) -> dict:
        """Returns: the counters (requests, candidates, served, errors by kind, ...) and the
        feature log's, as ``feature_log_NAME``."""
        with self._counter_lock:
            counters = dict(self.counters)
        if self.feature_log is not None:
            counters.update({f"feature_log_{k}": v
                             for k, v in self.feature_log.stats().items()})
        return counters

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

    def score(self, request) -> dict:
        """Scores one request and logs what it served.

        Args:
            request: the request's JSON value (see ``dataflow.serve``).

        Returns:
            The answer: ``{"request_id", "ts_ms", "items": [{"item_id", "request_id",
            "score"}, ...] (best first, ``top_k`` of them if asked), "params"}``
            (:meth:`params_info`).

        Raises:
            dataflow.serving.request.BadRequest: a request it cannot score.
        """
        from transforms.example_batch import ExampleBatch
        records, true_ctr, top_k, request_id, ts_ms, context, item_fields = \
            self.parser.parse(request)
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
        self.count("requests")
        self.count("candidates", n)
        self.count("served", len(served))
        return {"request_id": request_id, "ts_ms": ts_ms,
                "items": [{"item_id": records[j]["item_id"],
                           "request_id": records[j]["request_id"],
                           "score": score_list[j]} for j in served],
                "params": self.params_info(ts_ms, fresh, int(found.sum()), len(found))}

    def params_info(self, ts_ms: int, fresh: bool = True, rows_found: int = 0,
                    rows_read: int = 0) -> dict:
        """How old the parameters are: event time of the model and of the sparse rows
        (the oldest shard's last publish) before ``ts_ms``, and wall seconds since then.

        Args:
            ts_ms: the request's event time.
            fresh: whether the rows came from the store (not the local copy).
            rows_found: rows the store (or the copy) held.
            rows_read: rows asked for.

        Returns:
            ``{"model_version", "model_ts_ms", "dense_age_ms", "sparse_ts_ms",
            "sparse_age_ms", "sparse_wall_age_s", "store", "rows_found", "rows_read"}``.
        """
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
        """Returns: the model's and the store's state (``GET /healthz``)."""
        return {"status": "ok", "model_version": self.model_version,
                "model_ts_ms": self.model_ts_ms, "model_path": self.model_path,
                "store": "ok" if self._store_ok else "unavailable",
                "sync": self._sync, "event_time_ms": self._last_ts}


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

