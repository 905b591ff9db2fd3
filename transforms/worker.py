"""The training worker: score a batch with the parameters serving holds, then compute gradients.

For each ``ExampleBatch``:

1. read the batch's embedding rows from the ParameterStore (what serving holds right now) and
   the dense weights (refreshed every ``dense_sync_interval_s`` of event time);
2. **score first**: the probabilities go out on the ``scores`` output before anything is
   learned from the batch (progressive validation: online AUC);
3. compute gradients in TensorFlow and emit sparse gradients keyed by PS shard (main output)
   and dense gradients keyed by the dense shard's key (``dense`` output).

The worker holds no parameters of its own: the PS DoFns own them (DESIGN §1).
"""
from __future__ import annotations

import logging
import sys
import time

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.batch import DenseGradients, ExampleBatch, SparseGradients, shard_of

_LOG = logging.getLogger(__name__)

DENSE_KEY = 0


class TrainWorker(beam.DoFn):
    """ExampleBatch → (shard, SparseGradients) + tagged ``scores`` and ``dense`` outputs.

    ``scores`` elements are ``(probs, labels, weights, ts_ms, true_ctr)`` float/int arrays.
    """

    SCORES = "scores"
    DENSE = "dense"

    def __init__(self, spec, store_url: str, num_shards: int, dense_name: str = "dense",
                 dense_sync_interval_s: float = 0.0, progress_every_s: float = 5.0):
        self.spec = spec
        self.store_url = store_url
        self.num_shards = int(num_shards)
        self.dense_name = dense_name
        self.dense_sync_interval_ms = int(dense_sync_interval_s * 1000)
        self.progress_every_s = progress_every_s
        self.examples = Metrics.counter("worker", "examples")
        self.batches = Metrics.counter("worker", "batches")
        self.rows_emitted = Metrics.counter("worker", "gradient_rows_emitted")
        self.unknown_slot_fids = Metrics.counter("worker", "fids_of_unknown_slots")
        # rows_found / rows_read: how much of what a batch needs serving already holds
        self.rows_read = Metrics.counter("worker", "rows_read")
        self.rows_found = Metrics.counter("worker", "rows_found")
        self.param_age = Metrics.distribution("worker", "dense_param_age_ms")
        self.steady_rate = Metrics.distribution("worker", "examples_per_s_after_first_batch")

    def setup(self):
        from ps.store import open_store
        from transforms.model import Model
        self.model = Model(self.spec)
        self.store = open_store(self.store_url, num_shards=self.num_shards)
        self._table = self.spec.table
        self._width = self.spec.width
        self._dense = None
        self._dense_ts = None
        self._progress = _Progress(self.progress_every_s)

    def _dense_params(self, now_ms: int) -> dict:
        if (self._dense is None or now_ms - self._dense_ts >= self.dense_sync_interval_ms):
            params, _version = self.store.read_dense(self.dense_name)
            self._dense = params if params is not None else self.model.initial_dense_params()
            self._dense_ts = now_ms
        self.param_age.update(int(now_ms - self._dense_ts))
        return self._dense

    def process(self, batch: ExampleBatch):
        if len(batch) == 0:
            return
        now_ms = int(batch.ts_ms.max())
        dense = self._dense_params(now_ms)
        index = self.model.index(batch)
        if index.ignored:
            self.unknown_slot_fids.inc(index.ignored)
        rows, found = self.store.read_rows(self._table, index.keys, self._width)
        self.rows_read.inc(len(found))
        self.rows_found.inc(int(found.sum()))
        probs, _loss, sparse_grads, dense_grads = self.model.train_step(
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
        if p.examples:
            self.steady_rate.update(int(p.steady_rate()))
            _LOG.info("worker: %d examples so far, online AUC %.4f, %.0f examples/s after the "
                      "first batch", p.examples, p.auc.result(), p.steady_rate())


class _Progress:
    """A log line every few seconds: examples, running online AUC, throughput."""

    def __init__(self, every_s: float):
        from transforms.metrics import BucketedAUC
        self.every_s = every_s
        self.auc = BucketedAUC()
        self.examples = 0
        self.start = self.last = time.monotonic()
        self.first = None
        self.first_examples = 0

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
            _LOG.info("progress: %d examples, online AUC %.4f, %.0f examples/s",
                      self.examples, self.auc.result(), rate)
            # stderr: a person watching sees it; stdout stays for a command's own output
            # (benchmarks print one JSON object there)
            print(f"progress: {self.examples:,} examples, online AUC {self.auc.result():.4f}, "
                  f"{rate:,.0f} examples/s", file=sys.stderr, flush=True)
