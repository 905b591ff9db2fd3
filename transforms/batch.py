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

import apache_beam as beam
import numpy as np
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

    One reader merges every file by ``ts_ms`` (each file of the example log is sorted), so
    training sees the stream in the order it happened: a batch is scored with what the PS
    learned from every earlier batch (DESIGN §4b: no GroupByKey between reader and PS).
    """

    def __init__(self, pattern: str, batch_size: int, dense_dim: int):
        super().__init__()
        self.pattern = pattern
        self.batch_size = int(batch_size)
        self.dense_dim = int(dense_dim)

    def expand(self, pbegin):
        return (pbegin
                | "Start" >> beam.Create([self.pattern])
                | "ReadInOrder" >> beam.ParDo(_ReadBatchesFn(self.batch_size, self.dense_dim)))


class _ReadBatchesFn(beam.DoFn):
    def __init__(self, batch_size: int, dense_dim: int):
        self.batch_size = batch_size
        self.dense_dim = dense_dim

    def process(self, pattern):
        from dataflow.join import read_examples_in_order
        chunk = []
        for example in read_examples_in_order(pattern):
            chunk.append(example)
            if len(chunk) == self.batch_size:
                yield _timestamped(ExampleBatch.from_examples(chunk, self.dense_dim))
                chunk = []
        if chunk:
            yield _timestamped(ExampleBatch.from_examples(chunk, self.dense_dim))


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
