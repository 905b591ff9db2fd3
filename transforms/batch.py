"""The columnar records of the training section: example batches and gradients.

Elements in the training section are batches (NumPy arrays), never single examples: Beam's
per-element overhead is tens of microseconds per transform, a TensorFlow step on 256 examples
about a millisecond.

>>> batch = ExampleBatch.from_examples([
...     {"fids": [1, 2], "dense": [0.5], "label": 1, "sample_weight": 1.0, "ts_ms": 10},
...     {"fids": [3], "dense": [0.0], "label": 0, "sample_weight": 2.0, "ts_ms": 12}])
>>> len(batch), batch.row_splits.tolist(), batch.fids.tolist()
(2, [0, 2, 3], [1, 2, 3])
>>> batch.example_index().tolist()
[0, 0, 1]
>>> len(batch._replace(weight=batch.weight * 2))
2
"""
from __future__ import annotations

from typing import NamedTuple

import itertools
import logging
import os
import re
import time

import apache_beam as beam
import numpy as np
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue


class ExampleBatch(NamedTuple):
    """Examples in CSR form: example ``i`` has ``fids[row_splits[i]:row_splits[i + 1]]``."""

    fids: np.ndarray  #: uint64 [nnz]
    row_splits: np.ndarray  #: int64 [n + 1]
    dense: np.ndarray  #: float32 [n, d]
    label: np.ndarray  #: float32 [n], 0 or 1
    weight: np.ndarray  #: float32 [n], the sample weight (1 / negative-sampling rate)
    ts_ms: np.ndarray  #: int64 [n], event time
    true_ctr: np.ndarray  #: float32 [n], NaN where unknown

    def __len__(self) -> int:
        """Number of examples (not of fields: ``_make`` below knows)."""
        return int(self.label.shape[0])

    def example_index(self) -> np.ndarray:
        """int64 [nnz]: the example each fid belongs to."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.row_splits))

    @classmethod
    def from_examples(cls, examples, dense_dim: int | None = None) -> "ExampleBatch":
        """From example dicts (schemas/example.avsc fields)."""
        examples = list(examples)
        n = len(examples)
        lengths = np.fromiter((len(e["fids"]) for e in examples), dtype=np.int64, count=n)
        row_splits = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=row_splits[1:])
        fids = np.fromiter((f for e in examples for f in e["fids"]), dtype=np.int64,
                           count=int(row_splits[-1])).view(np.uint64)
        if dense_dim is None:
            dense_dim = len(examples[0].get("dense") or ()) if n else 0
        dense = np.zeros((n, dense_dim), dtype=np.float32)
        if dense_dim:
            dense[:] = [e.get("dense") or [0.0] * dense_dim for e in examples]
        return cls(
            fids=fids,
            row_splits=row_splits,
            dense=dense,
            label=np.fromiter((e["label"] for e in examples), dtype=np.float32, count=n),
            weight=np.fromiter((e.get("sample_weight", 1.0) for e in examples), dtype=np.float32,
                               count=n),
            ts_ms=np.fromiter((e["ts_ms"] for e in examples), dtype=np.int64, count=n),
            true_ctr=np.fromiter((np.nan if e.get("true_ctr") is None else e["true_ctr"]
                                  for e in examples), dtype=np.float32, count=n),
        )


# NamedTuple._make (used by _replace) checks len(result) == number of fields, which __len__
# redefines as the number of examples; NamedTuple forbids overriding _make in the class body.
ExampleBatch._make = classmethod(lambda cls, iterable: tuple.__new__(cls, iterable))


class SparseGradients(NamedTuple):
    """Gradients for the rows of one embedding table, bound for one PS shard.

    ``fids`` may repeat (one entry per occurrence); the shard sums them before one step.
    """

    table: str  #: embedding table name (one per embedding width, e.g. "dim8")
    fids: np.ndarray  #: uint64 [n]
    grads: np.ndarray  #: float32 [n, width]
    ts_ms: int  #: largest event time of the examples the gradients come from
    examples: int  #: how many examples produced them


class DenseGradients(NamedTuple):
    """Gradients of the dense (non-embedding) weights, by variable name."""

    grads: dict  #: {name: float32 array}
    ts_ms: int
    examples: int


_SHARD_MIX = np.uint64(0x9E3779B97F4A7C15)


def shard_of(fids: np.ndarray, num_shards: int) -> np.ndarray:
    """int64 [n]: the PS shard owning each fid (a multiplicative hash, stable everywhere).

    >>> shard_of(np.array([1, 2, 3], dtype=np.uint64), 4).tolist()
    [1, 2, 0]
    """
    fids = np.asarray(fids, dtype=np.uint64)
    with np.errstate(over="ignore"):
        mixed = fids * _SHARD_MIX
    return ((mixed >> np.uint64(32)) % np.uint64(num_shards)).astype(np.int64)


class ReadExampleBatches(beam.PTransform):
    """Example log files → ``ExampleBatch`` es of ``batch_size``, in event-time order.

    The files are grouped by event-time period (the example log's ``PERIOD-…`` names; any
    other name is a period of its own, in name order); each period's files are merged by
    ``ts_ms``, so training sees the stream in the order it happened and a batch is scored
    with what the PS learned from every earlier batch (DESIGN §4b: no GroupByKey between
    reader and PS). A period's last batch may be short.

    The reader is a splittable DoFn over (period, batch) positions. With ``checkpoint_s`` it
    checkpoints itself (ends its bundle): a runner that hands a stage's output downstream
    only when its bundle ends (Flink's portable runner does) then sees bundles end as the
    log is read, so gradients reach the PS while the worker is still reading. With a
    ``store_url`` it waits at each resumption for the PS to catch up (:class:`PSCatchUp`)
    and ends a bundle as soon as its batches span more than ``max_staleness_s`` of event
    time (so ``0``: one batch per bundle, and every batch is scored with the parameters
    learned from all earlier ones, as on the fused DirectRunner); ``checkpoint_s`` bounds
    a bundle's wall time either way. Leave it None on the DirectRunner: there the stages
    are fused (nothing to wait for), and the FnApiRunner treats each resumption as a new
    run of the stage, firing end-of-input timers (PS snapshots, metrics) every time.
    """

    def __init__(self, pattern: str, batch_size: int, dense_dim: int,
                 checkpoint_s: float | None = None, store_url: str | None = None,
                 max_staleness_s: float = 0.0, staleness_timeout_s: float = 30.0,
                 publishers: tuple = ()):
        super().__init__()
        self.pattern = pattern
        self.batch_size = int(batch_size)
        self.dense_dim = int(dense_dim)
        self.gate = None if store_url is None else PSCatchUp(
            store_url, max_staleness_s, staleness_timeout_s, publishers)
        self.checkpoint_s = checkpoint_s

    def expand(self, pbegin):
        return (pbegin
                | "Start" >> beam.Create([self.pattern])
                | "Periods" >> beam.Map(example_periods)
                | "ReadInOrder" >> beam.ParDo(_ReadBatchesFn(self.batch_size, self.dense_dim,
                                                             self.checkpoint_s, self.gate)))


_PERIOD_NAME = re.compile(r"^(\d{8}T\d{6}Z)-\d{5}-of-\d{5}-")


def example_periods(pattern: str) -> list:
    """The files ``pattern`` names, as lists of one event-time period each, in time order."""
    from dataflow.join import example_files
    groups: dict = {}
    for path in example_files(pattern):
        match = _PERIOD_NAME.match(os.path.basename(path))
        groups.setdefault(match.group(1) if match else os.path.basename(path), []).append(path)
    return [groups[k] for k in sorted(groups)]


_BATCHES_PER_PERIOD = 1 << 32  # restriction offset = period * this + batch within the period


class _PeriodRange(RestrictionProvider):
    """Restriction: the (period, batch) positions still to read. Never split: order matters."""

    def initial_restriction(self, periods):
        return OffsetRange(0, len(periods) * _BATCHES_PER_PERIOD)

    def create_tracker(self, restriction):
        return OffsetRestrictionTracker(restriction)

    def restriction_size(self, periods, restriction):
        return max(1, restriction.size() // _BATCHES_PER_PERIOD)

    def split(self, periods, restriction):
        yield restriction


class PSCatchUp:
    """Bounded staleness between the reader and the PS (stale-synchronous training).

    Before the reader resumes after a checkpoint, it waits until every PS publisher in the
    store has applied gradients up to ``max_staleness_s`` (event time) before the last batch
    it emitted. On the DirectRunner the worker and PS are fused, so this passes at once; on
    Flink the stages run concurrently and a stage's output moves on only when its bundle
    ends, so without it the reader runs ahead and the worker scores with ever older
    parameters. Waits at most ``timeout_s``, then goes on (counted).
    """

    def __init__(self, store_url: str, max_staleness_s: float, timeout_s: float,
                 publishers: tuple = ()):
        self.store_url = store_url
        self.publishers = tuple(publishers)  # those that must exist (a PS not yet up is behind)
        self.max_staleness_ms = int(max_staleness_s * 1000)
        self.timeout_s = timeout_s
        self.waits = Metrics.distribution("reader", "ps_catch_up_wait_ms")
        self.timeouts = Metrics.counter("reader", "ps_catch_up_timeouts")
        self._store = None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    def wait(self, emitted_ts_ms: int) -> None:
        if self._store is None:
            from ps.store import open_store
            self._store = open_store(self.store_url, num_shards=None)
        due = emitted_ts_ms - self.max_staleness_ms
        start = time.monotonic()
        delay = 0.001
        while True:
            info = self._store.sync_info()
            keys = set(self.publishers) | {k for k in info
                                           if k == "dense" or k.startswith("sparse/")}
            behind = sorted(k for k in keys if info.get(k, {}).get("ts_ms", -1) < due)
            if not behind:
                break
            if time.monotonic() - start > self.timeout_s:
                self.timeouts.inc()
                _LOG.warning("PS publishers %s still behind %d after %.0fs; reading on",
                             behind, due, self.timeout_s)
                break
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        self.waits.update(int(1000 * (time.monotonic() - start)))


class _ReadBatchesFn(beam.DoFn):
    def __init__(self, batch_size: int, dense_dim: int, checkpoint_s: float, gate=None):
        self.batch_size = batch_size
        self.dense_dim = dense_dim
        self.checkpoint_s = checkpoint_s
        self.gate = gate
        self._emitted_ts = None

    def process(self, periods, tracker=beam.DoFn.RestrictionParam(_PeriodRange())):
        from dataflow.join import read_examples_in_order
        if self.gate is not None and self._emitted_ts is not None:
            self.gate.wait(self._emitted_ts)
        started = time.monotonic()
        first_ts = None
        position = tracker.current_restriction().start
        while True:
            period, done = divmod(position, _BATCHES_PER_PERIOD)
            if period >= len(periods):
                tracker.try_claim(tracker.current_restriction().stop)  # finishes the range
                return
            examples = itertools.islice(read_examples_in_order(periods[period]),
                                        done * self.batch_size, None)
            while True:
                chunk = list(itertools.islice(examples, self.batch_size))
                if not chunk:
                    break
                if not tracker.try_claim(period * _BATCHES_PER_PERIOD + done):
                    return
                yield self._batch(chunk)
                done += 1
                first_ts = self._emitted_ts if first_ts is None else first_ts
                if self.checkpoint_s is not None and (
                        time.monotonic() - started > self.checkpoint_s or
                        (self.gate is not None and
                         self._emitted_ts - first_ts >= self.gate.max_staleness_ms)):
                    # Resumes at the next batch (the rest of the period is read again from
                    # its start and skipped up to there): bundles end as the log is read.
                    tracker.defer_remainder()
                    return
            position = (period + 1) * _BATCHES_PER_PERIOD

    def _batch(self, chunk):
        batch = ExampleBatch.from_examples(chunk, self.dense_dim)
        self._emitted_ts = int(batch.ts_ms.max())
        return _timestamped(batch)


def _timestamped(batch):
    return TimestampedValue(batch, int(batch.ts_ms.max()) / 1000.0)


class TailExampleBatches(beam.PTransform):
    """A folder of example log files, watched for new ones → ``ExampleBatch`` es.

    Files are read in name order (the example log names them by event-time period) with
    ``transforms.sources.TailAvroLogs``, whose watermark follows the examples' event time;
    records are batched within a bundle (``BatchElements``, fusable) and made columnar.
    """

    def __init__(self, folder: str, batch_size: int, dense_dim: int,
                 poll_interval_s: float = 5.0, stop_timestamp: float | None = None):
        super().__init__()
        self.pattern = folder if any(c in folder for c in "*?[") else \
            folder.rstrip("/") + "/*.avro"
        self.batch_size = int(batch_size)
        self.dense_dim = int(dense_dim)
        self.poll_interval_s = poll_interval_s
        self.stop_timestamp = stop_timestamp

    def expand(self, pbegin):
        from apache_beam.utils.timestamp import MAX_TIMESTAMP

        from transforms.sources import TailAvroLogs
        dense_dim = self.dense_dim
        stop = MAX_TIMESTAMP if self.stop_timestamp is None else self.stop_timestamp
        return (pbegin
                | "Tail" >> TailAvroLogs(self.pattern, self.poll_interval_s, stop_timestamp=stop)
                | "Batch" >> beam.BatchElements(min_batch_size=1,
                                                max_batch_size=self.batch_size)
                | "Columnar" >> beam.Map(lambda rows: ExampleBatch.from_examples(rows, dense_dim)))
