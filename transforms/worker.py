"""The training worker: score a batch with the parameters serving holds, train on fresh ones.

For each ``ExampleBatch``:

1. read the batch's embedding rows and the dense weights from the ParameterStore's serving
   view (what serving holds right now: the PS publishes there every sync interval);
2. **score first**: the probabilities go out on the ``scores`` output before anything is
   learned from the batch (progressive validation: online AUC);
3. compute gradients in TensorFlow on the *fresh* parameters: the store's training view
   (``train_store_url``, published by the PS after every gradient batch), as Monolith trains
   against its training PS while serving lags by the sync interval; emit sparse gradients
   keyed by PS shard (main output) and dense gradients keyed by the dense shard's key
   (``dense`` output). Without a training view (both sync intervals 0) serving holds the
   fresh parameters already: one read and one TensorFlow call give scores and gradients.

The worker holds no parameters of its own: the PS DoFns own them (DESIGN §1).
"""
from __future__ import annotations

import logging
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from ps.gradients import DenseGradients, SparseGradients
from ps.sharding import shard_of

_LOG = logging.getLogger(__name__)

DENSE_KEY = 0


class TrainWorker(beam.DoFn):
    """ExampleBatch → (shard, SparseGradients) + tagged ``scores`` and ``dense`` outputs.

    ``scores`` elements are ``(probs, labels, weights, ts_ms, true_ctr)`` float/int arrays.
    """

    SCORES = "scores"
    DENSE = "dense"

    def __init__(self, spec, store_url: str, num_shards: int, dense_name: str = "dense",
                 train_store_url: str | None = None, progress_every_s: float = 5.0):
        self.spec = spec
        self.store_url = store_url
        self.train_store_url = train_store_url
        self.num_shards = int(num_shards)
        self.dense_name = dense_name
        self.progress_every_s = progress_every_s
        self.examples = Metrics.counter("worker", "examples")
        self.batches = Metrics.counter("worker", "batches")
        self.rows_emitted = Metrics.counter("worker", "gradient_rows_emitted")
        self.unknown_slot_fids = Metrics.counter("worker", "fids_of_unknown_slots")
        # rows_found / rows_read: how much of what a batch needs serving already holds
        self.rows_read = Metrics.counter("worker", "rows_read")
        self.rows_found = Metrics.counter("worker", "rows_found")
        # event time since the serving dense weights the batch was scored with changed
        self.param_age = Metrics.distribution("worker", "dense_param_age_ms")
        # batches trained on the serving copy because the training view was not up yet
        self.trained_on_serving = Metrics.counter("worker", "batches_trained_on_serving_copy")
        self.steady_rate = Metrics.distribution("worker", "examples_per_s_after_first_batch")

    def setup(self):
        from ps.store import open_store
        from transforms.model import Model
        self.model = Model(self.spec)
        self.store = open_store(self.store_url, num_shards=self.num_shards)
        self.train_store = (open_store(self.train_store_url, num_shards=self.num_shards)
                            if self.train_store_url else None)
        self._train_ready = False
        self._publishers = {"dense", *(f"sparse/{i}" for i in range(self.num_shards))}
        self._table = self.spec.table
        self._width = self.spec.width
        self._initial_dense = self.model.initial_dense_params()
        self._dense_version = None
        self._dense_since = None
        self._progress = _Progress(self.progress_every_s)

    def _dense_params(self, store, now_ms: int | None = None) -> dict:
        params, version = store.read_dense(self.dense_name)
        if now_ms is not None:  # the serving copy: how long it has been what it is
            if version != self._dense_version:
                self._dense_version, self._dense_since = version, now_ms
            self.param_age.update(int(now_ms - self._dense_since))
        return params if params is not None else self._initial_dense

    def _training_view_ready(self) -> bool:
        """Whether every PS publisher has reached the training view (until then, e.g. while
        restored shards have not seen their first input, train on the serving copy)."""
        if not self._train_ready:
            self._train_ready = self._publishers <= set(self.train_store.sync_info())
        return self._train_ready

    def process(self, batch):  # an ExampleBatch (Beam would read a string annotation as Any)
        if len(batch) == 0:
            return
        now_ms = int(batch.ts_ms.max())
        dense = self._dense_params(self.store, now_ms)
        index = self.model.index(batch)
        if index.ignored:
            self.unknown_slot_fids.inc(index.ignored)
        rows, found = self.store.read_rows(self._table, index.keys, self._width)
        self.rows_read.inc(len(found))
        self.rows_found.inc(int(found.sum()))
        if self.train_store is None:
            probs, _loss, sparse_grads, dense_grads = self.model.train_step(
                batch, {self._table: (index.keys, rows)}, dense, index=index)
        else:
            probs = self.model.predict(batch, {self._table: (index.keys, rows)}, dense,
                                       index=index)
            if self._training_view_ready():
                dense = self._dense_params(self.train_store)
                rows, _ = self.train_store.read_rows(self._table, index.keys, self._width)
            else:
                self.trained_on_serving.inc()
            _probs, _loss, sparse_grads, dense_grads = self.model.train_step(
                batch, {self._table: (index.keys, rows)}, dense, index=index)
        yield beam.pvalue.TaggedOutput(
            self.SCORES, (np.asarray(probs, np.float32), batch.label, batch.weight, batch.ts_ms,
                          batch.true_ctr))
        n = len(batch)
        for table, (fids, grads) in sparse_grads.items():
            if len(fids) == 0:
                continue
            shards = shard_of(fids, self.num_shards)
            order = np.argsort(shards, kind="stable")
            bounds = np.searchsorted(shards[order], np.arange(self.num_shards + 1))
            for shard in range(self.num_shards):
                sel = order[bounds[shard]:bounds[shard + 1]]
                if len(sel):
                    yield shard, SparseGradients(table, fids[sel], grads[sel], now_ms, n)
            self.rows_emitted.inc(len(fids))
        yield beam.pvalue.TaggedOutput(self.DENSE, (DENSE_KEY, DenseGradients(dense_grads,
                                                                              now_ms, n)))
        self.examples.inc(n)
        self.batches.inc()
        self._progress.update(probs, batch.label, batch.weight)

    def finish_bundle(self):
        p = self._progress
        # A streaming job finishes a bundle at every poll of its reader, also when no batch
        # came (measured: ~120 a second in the demo's online phase): say something only
        # when there is something new, and at most every progress_every_s.
        if p.examples == p.bundle_examples:
            return
        p.bundle_examples = p.examples
        self.steady_rate.update(int(p.steady_rate()))
        now = time.monotonic()
        if now - p.bundle_logged >= self.progress_every_s:
            p.bundle_logged = now
            _LOG.info("worker: %s examples so far, online AUC %.4f, %s examples/s after the "
                      "first batch", f"{p.examples:,}", p.auc.result(), f"{p.steady_rate():,.0f}")


class _Progress:
    """A log line every few seconds: examples, running online AUC, throughput."""

    def __init__(self, every_s: float):
        from transforms.metrics_math import BucketedAUC
        self.every_s = every_s
        self.auc = BucketedAUC()
        self.examples = 0
        self.start = self.last = time.monotonic()
        self.first = None
        self.first_examples = 0
        self.bundle_examples = 0  # examples at the last finish_bundle that had new ones
        self.bundle_logged = float("-inf")  # when finish_bundle last logged

    def steady_rate(self) -> float:
        """Examples/s since the first batch (start-up excluded)."""
        elapsed = time.monotonic() - self.first if self.first is not None else 0.0
        return (self.examples - self.first_examples) / elapsed if elapsed > 0 else 0.0

    def update(self, probs, labels, weights):
        self.auc.add(np.asarray(probs), np.asarray(labels), np.asarray(weights))
        self.examples += len(labels)
        now = time.monotonic()
        if self.first is None:
            self.first = now  # after the first batch: graph tracing and JIT are behind us
            self.first_examples = self.examples
        if self.every_s and now - self.last >= self.every_s:
            self.last = now
            rate = self.examples / max(now - self.start, 1e-9)
            _LOG.info("progress: %s examples, online AUC %.4f, %s examples/s",
                      f"{self.examples:,}", self.auc.result(), f"{rate:,.0f}")
