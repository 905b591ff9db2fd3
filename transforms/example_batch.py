"""``ExampleBatch``: examples in columns, the element of the training section.

Elements in the training section are batches (NumPy arrays), never single examples: Beam's
per-element overhead is tens of microseconds per transform, a TensorFlow step on 256 examples
about a millisecond. :func:`concat_batches`, :func:`take` and :func:`slice_batch` make new
batches of old ones.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["ExampleBatch", "concat_batches", "take", "slice_batch"]


class ExampleBatch(NamedTuple):
    """Examples in CSR form: example ``i`` has ``fids[row_splits[i]:row_splits[i + 1]]``.

    Make one with :meth:`from_examples`; ``len(batch)`` is the number of examples.

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
        """A batch of example dicts.

        Args:
            examples: dicts with the fields of ``schemas/example.avsc`` (``fids``, ``label``,
                ``ts_ms``; ``dense``, ``sample_weight`` and ``true_ctr`` if known).
            dense_dim: dense inputs per example (default: the first example's).

        Returns:
            The examples as one :class:`ExampleBatch`, in order.
        """
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
        if dense_dim and n:
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


def concat_batches(parts) -> ExampleBatch:
    """Batches one after the other.

    Args:
        parts: a non-empty sequence of :class:`ExampleBatch`.

    Returns:
        One :class:`ExampleBatch` of the examples of ``parts``, in order.

    >>> a = ExampleBatch.from_examples([{"fids": [1, 2], "label": 1, "ts_ms": 10}])
    >>> b = ExampleBatch.from_examples([{"fids": [3], "label": 0, "ts_ms": 12}])
    >>> concat_batches([a, b]).row_splits.tolist()
    [0, 2, 3]
    """
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [p.row_splits[-1] for p in parts[:-1]])
    splits = np.concatenate([parts[0].row_splits[:1]] +
                            [p.row_splits[1:] + o for p, o in zip(parts, offsets)])
    return ExampleBatch(np.concatenate([p.fids for p in parts]), splits,
                        np.concatenate([p.dense for p in parts]),
                        np.concatenate([p.label for p in parts]),
                        np.concatenate([p.weight for p in parts]),
                        np.concatenate([p.ts_ms for p in parts]),
                        np.concatenate([p.true_ctr for p in parts]))


def take(batch: ExampleBatch, rows: np.ndarray) -> ExampleBatch:
    """Some examples of a batch, as a new batch.

    Args:
        batch: an :class:`ExampleBatch`.
        rows: int array: the examples to take, in any order.

    Returns:
        An :class:`ExampleBatch` of ``batch``'s examples ``rows``, in that order.

    >>> batch = ExampleBatch.from_examples([{"fids": [1, 2], "label": 1, "ts_ms": 10},
    ...                                     {"fids": [3], "label": 0, "ts_ms": 12}])
    >>> take(batch, np.array([1, 0])).ts_ms.tolist()
    [12, 10]
    """
    lengths = np.diff(batch.row_splits)[rows]
    splits = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=splits[1:])
    starts = batch.row_splits[rows]
    fid_index = np.repeat(starts - splits[:-1], lengths) + np.arange(splits[-1])
    return ExampleBatch(batch.fids[fid_index], splits, batch.dense[rows], batch.label[rows],
                        batch.weight[rows], batch.ts_ms[rows], batch.true_ctr[rows])


def slice_batch(batch: ExampleBatch, start: int, stop: int) -> ExampleBatch:
    """Examples ``start:stop`` of a batch, as arrays of their own (a batch goes out to other
    steps; it must not pin, or share, the whole period's arrays).

    Args:
        batch: an :class:`ExampleBatch`.
        start, stop: the examples to keep, as in ``range(start, stop)``.

    Returns:
        A new :class:`ExampleBatch`.

    >>> batch = ExampleBatch.from_examples([{"fids": [1, 2], "label": 1, "ts_ms": 10},
    ...                                     {"fids": [3], "label": 0, "ts_ms": 12}])
    >>> slice_batch(batch, 1, 2).fids.tolist()
    [3]
    """
    lo, hi = batch.row_splits[start], batch.row_splits[stop]
    return ExampleBatch(batch.fids[lo:hi].copy(), batch.row_splits[start:stop + 1] - lo,
                        batch.dense[start:stop].copy(), batch.label[start:stop].copy(),
                        batch.weight[start:stop].copy(), batch.ts_ms[start:stop].copy(),
                        batch.true_ctr[start:stop].copy())
