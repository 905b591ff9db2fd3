"""``TrainOnline``: example batches → a model trained online by sharded parameter servers.

Monolith's training loop as one PTransform (DESIGN §1)::

    batches ─► worker ─┬─ scores ─────────► OnlineMetrics (windows, CSV, PNG, Beam metrics)
     ▲       score first├─ sparse grads ───► SparseShard (keyed by PS shard, Beam state)
     │       then grads └─ dense grads ────► DenseShard  (one key, Beam state)
     │                                              │ every sync interval (event time)
     └──────────────── ParameterStore ◄─────────────┘  memory:// (one process) or redis://

Every example is scored with the parameters serving holds before it is learned (online
AUC). The PS DoFns own the parameters and their optimizer state in Beam state, so Flink
checkpoints and savepoints are their snapshots; they publish what changed to the
``ParameterStore``, where the worker (and serving) read. Only fusable steps sit between the
reader and the PS (no GroupByKey), so on the DirectRunner the PS applies a batch's gradients
before the worker scores the next (DESIGN §4b).

What differs by runner is one explicit parameter, the reader's ``pacing``
(:meth:`TrainOnline.pacing`): None where the runner fuses the reader, worker and PS into one
stage (the DirectRunner); on Flink, where they run concurrently, a
:class:`transforms.example_reader.Pacing` that makes the reader wait for the PS. An
example: :class:`TrainOnline`.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from ps.gradients import DenseGradients, SparseGradients
from ps.sharding import shard_of
from transforms.example_reader import Pacing
from transforms.model import ModelSpec
from transforms.train_config import DenseConfig, MetricsConfig, ModelExport, Snapshots, SparseConfig

__all__ = ["TrainOnline", "TrainResult", "SparseConfig", "DenseConfig", "MetricsConfig",
           "Snapshots", "ModelExport", "Pacing"]

_LOG = logging.getLogger(__name__)

DENSE_KEY = 0  # the DenseShard's one key
DENSE_NAME = "dense"  # the dense parameter set's name in the store
# The PS DoFns are stateful, keyed by an int: typed so, their keys get a deterministic coder
# (and Flink finds their state in a savepoint by the encoded key).
PS_KEYS = "int shard, VarIntCoder"
_KEYED = beam.typehints.Tuple[int, beam.typehints.Any]


class TrainResult(NamedTuple):
    """The PCollections of :class:`TrainOnline`.

    Attributes:
        scores: the worker's score batches, ``(probs, labels, weights, ts_ms, true_ctr)``.
        metrics: one row dict per closed event-time window (``transforms.metrics``).
        sparse: what the sparse shards applied (nothing is emitted today; a handle to wait on).
        dense: what the dense shard applied (likewise).

    >>> TrainResult._fields
    ('scores', 'metrics', 'sparse', 'dense')
    """

    scores: beam.PCollection
    metrics: beam.PCollection
    sparse: beam.PCollection
    dense: beam.PCollection


class TrainOnline(beam.PTransform):
    """``ExampleBatch`` es → a model trained online; returns a :class:`TrainResult`.

    Args:
        spec: the model (``transforms.model.ModelSpec``: its ``RankingModel``, slots, dense
            inputs); ``ModelSpec.from_feature_config`` makes one from a feature config.
        store: the ``ParameterStore`` URL the PS publishes to and the worker and serving read:
            ``memory://NAME`` where every DoFn runs in one process (the DirectRunner, Flink
            with ``--environment_type=LOOPBACK``), else ``redis://HOST:PORT/DB``.
        sparse: :class:`SparseConfig` (shards, row optimizer, sync interval, slot policies).
        dense: :class:`DenseConfig` (dense optimizer, sync interval).
        metrics: :class:`MetricsConfig` (window, report files, scores files).
        snapshots: :class:`Snapshots` (export when a bounded input ends; restore from).
        export: :class:`ModelExport` (SavedModels for serving), or None.
        seed: seeds the PS tables (hashes, initial rows).

    With a sync interval above 0 the PS also publishes every gradient batch to a training
    view of the store (``ps.store.view_url(store, "train")``): the worker scores with the
    serving copy and trains on fresh parameters, so only the reader's pacing bounds how
    stale training is.

    Returns:
        (``expand``) a :class:`TrainResult`.

    Raises:
        ValueError: an argument of the wrong type.

    >>> import json, tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from transforms.example_batch import ExampleBatch
    >>> out = tempfile.mkdtemp()
    >>> batches = [ExampleBatch.from_examples(
    ...     [{"fids": [1 << 48 | (i % 7), 2 << 48 | (i % 3)], "dense": [], "label": i % 2,
    ...       "ts_ms": 1_700_000_000_000 + 1000 * i} for i in range(k, k + 8)]) for k in (0, 8)]
    >>> with beam.Pipeline() as p:
    ...     trained = (p | beam.Create(batches)
    ...                  | TrainOnline(ModelSpec("fm", slots=[(1, 4), (2, 4)]),
    ...                                store="memory://doc-train",
    ...                                sparse=SparseConfig(num_shards=2, learning_rate=0.05),
    ...                                metrics=MetricsConfig(out_prefix=f"{out}/online")))
    ...     _ = assert_that(trained.scores | beam.Map(lambda s: len(s[0])), equal_to([8, 8]))
    >>> json.load(open(f"{out}/online-totals.json"))["examples"]
    16
    """

    def __init__(self, spec: ModelSpec, store: str, sparse: SparseConfig = SparseConfig(),
                 dense: DenseConfig = DenseConfig(), metrics: MetricsConfig = MetricsConfig(),
                 snapshots: Snapshots = Snapshots(), export: ModelExport | None = None,
                 seed: int = 0):
        super().__init__()
        from ps.store import view_url
        if not isinstance(spec, ModelSpec):
            raise ValueError(f"TrainOnline.spec must be a ModelSpec, got {spec!r}")
        if not isinstance(store, str) or "://" not in store:
            raise ValueError(f"TrainOnline.store must be a store URL (memory://NAME or "
                             f"redis://HOST:PORT/DB), got {store!r}")
        for name, value, cls in (("sparse", sparse, SparseConfig), ("dense", dense, DenseConfig),
                                 ("metrics", metrics, MetricsConfig),
                                 ("snapshots", snapshots, Snapshots)):
            if not isinstance(value, cls):
                raise ValueError(f"TrainOnline.{name} must be a {cls.__name__}, got {value!r}")
        if export is not None and not isinstance(export, ModelExport):
            raise ValueError(f"TrainOnline.export must be a ModelExport or None, got {export!r}")
        self.spec, self.store = spec, store
        self.sparse, self.dense, self.metrics = sparse, dense, metrics
        self.snapshots, self.export, self.seed = snapshots, export, int(seed)
        self.train_store = (view_url(store, "train")
                            if max(sparse.sync_interval_s, dense.sync_interval_s) > 0 else None)

    @property
    def publishers(self) -> tuple:
        """The PS publishers' names in the store's sync records."""
        return (DENSE_NAME, *(f"sparse/{i}" for i in range(self.sparse.num_shards)))

    def pacing(self, max_staleness_s: float = 0.0, checkpoint_s: float = 0.05,
               timeout_s: float = 30.0) -> Pacing:
        """The reader's :class:`Pacing` for this training on a runner whose stages run
        concurrently (Flink): it waits on the view the worker trains on.

        Args:
            max_staleness_s, checkpoint_s, timeout_s: as :class:`Pacing`'s.

        Returns:
            The :class:`Pacing`, with this training's store and publishers.
        """
        return Pacing(checkpoint_s=checkpoint_s, max_staleness_s=max_staleness_s,
                      timeout_s=timeout_s, store_url=self.train_store or self.store,
                      publishers=self.publishers)

    def expand(self, batches):
        from ps.dense_shard import DenseShard
        from ps.sparse_shard import SparseShard
        from transforms.metrics import OnlineMetrics
        from transforms.scores import WriteScores
        from transforms.model import Model

        spec, sparse, dense = self.spec, self.sparse, self.dense
        worker = (batches
                  | "Worker" >> beam.ParDo(_TrainWorkerFn(
                      spec, self.store, sparse.num_shards,
                      train_store_url=self.train_store)).with_output_types(_KEYED).with_outputs(
                          _TrainWorkerFn.SCORES, _TrainWorkerFn.DENSE, main="sparse"))
        # Beam 2.62 takes no type hints for tagged outputs (apache/beam#18957): the dense
        # gradients' type is set on their PCollection.
        worker[_TrainWorkerFn.DENSE].element_type = _KEYED
        init_scale = sparse.init_scale if sparse.init_scale is not None else (
            0.01 if spec.model.uses_embeddings else 0.0)
        applied_sparse = worker.sparse | "SparseShard" >> beam.ParDo(SparseShard(
            self.store, sparse.num_shards, spec.tables(), slots=sparse.slots,
            optimizer=sparse.optimizer, lr=sparse.learning_rate,
            sync_interval_s=sparse.sync_interval_s, evict_interval_s=sparse.evict_interval_s,
            compact_every=sparse.compact_every, init_scale=init_scale,
            filter_bytes=sparse.filter_bytes, seed=self.seed,
            export_dir=self.snapshots.export_dir, restore_dir=self.snapshots.restore_dir,
            train_store_url=self.train_store))
        applied_dense = worker[_TrainWorkerFn.DENSE] | "DenseShard" >> beam.ParDo(DenseShard(
            self.store, DENSE_NAME, Model(spec).initial_dense_params(),
            optimizer=dense.optimizer, lr=dense.learning_rate,
            sync_interval_s=dense.sync_interval_s, compact_every=dense.compact_every,
            export_dir=self.snapshots.export_dir, restore_dir=self.snapshots.restore_dir,
            train_store_url=self.train_store))
        if self.export is not None:
            from transforms.export import ExportDenseModel
            worker[_TrainWorkerFn.DENSE] | "ExportModel" >> beam.ParDo(ExportDenseModel(
                self.store, DENSE_NAME, spec, self.export.model_dir, self.export.interval_s,
                self.export.keep))
        scores = worker[_TrainWorkerFn.SCORES]
        metrics = scores | "OnlineMetrics" >> OnlineMetrics(
            self.metrics.window_s, out_prefix=self.metrics.out_prefix, title=self.metrics.title)
        if self.metrics.scores_dir:
            scores | "WriteScores" >> beam.ParDo(WriteScores(self.metrics.scores_dir))
        return TrainResult(scores, metrics, applied_sparse, applied_dense)


class _TrainWorkerFn(beam.DoFn):
    """The worker: ExampleBatch → (shard, SparseGradients) + tagged ``scores`` and ``dense``.

    For each batch: read its embedding rows and the dense weights from the store's serving
    view (what serving holds right now); **score first** (``scores``: ``(probs, labels,
    weights, ts_ms, true_ctr)`` arrays, before anything is learned from the batch); then
    compute gradients in TensorFlow on the *fresh* parameters of the store's training view
    (published by the PS after every gradient batch, as Monolith trains against its training
    PS while serving lags by the sync interval), and emit sparse gradients keyed by PS shard
    (main output) and dense gradients keyed by the dense shard's key (``dense``). Without a
    training view (both sync intervals 0) serving holds the fresh parameters already: one
    read and one TensorFlow call give scores and gradients. It holds no parameters of its
    own: the PS DoFns own them (DESIGN §1).
    """

    SCORES = "scores"
    DENSE = "dense"

    def __init__(self, spec, store_url: str, num_shards: int, dense_name: str = DENSE_NAME,
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
        # wall clock (ms) at the end of each batch: min..max spans the workers' steady state
        # together (a rate per worker would not add up across data-parallel workers)
        self.batch_end = Metrics.distribution("worker", "batch_end_wall_ms")
        self.step_ms = Metrics.distribution("worker", "batch_ms")  # read, score, train, emit

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
        started = time.monotonic()
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
        yield pvalue.TaggedOutput(self.SCORES, (np.asarray(probs, np.float32), batch.label,
                                                batch.weight, batch.ts_ms, batch.true_ctr))
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
        yield pvalue.TaggedOutput(self.DENSE, (DENSE_KEY, DenseGradients(dense_grads, now_ms, n)))
        self.examples.inc(n)
        self.batches.inc()
        self.batch_end.update(int(time.time() * 1000))
        self.step_ms.update(int(1000 * (time.monotonic() - started)))
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
