"""The maths of online metrics: exact and bucketed AUC, and per event-time window rows.

Each example is scored before it is trained on (progressive validation); these functions turn
the scores into numbers. ``transforms.metrics.OnlineMetrics`` runs them in a pipeline.

>>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
0.75
>>> acc = OnlineMetricsAccumulator(window_s=60)
>>> acc.add(scores=[0.1, 0.4, 0.35, 0.8], labels=[0, 0, 1, 1], weights=None,
...         ts_ms=[1_000, 2_000, 61_000, 62_000])
>>> [(r["window_start_ms"], r["examples"], r["positives"]) for r in acc.flush()]
[(0, 2, 0), (60000, 2, 2)]
>>> acc.totals()["auc"]
0.75

* :func:`auc`: exact, weighted, ties counted half.
* :class:`BucketedAUC`: a streaming AUC in constant memory (a score histogram per class).
* :class:`OnlineMetricsAccumulator`: per event-time window rows (AUC, log loss, calibration,
  cumulative AUC) from score arrays (``transforms.metrics_report`` writes and plots them).

Labels may be soft: an example of label ``y`` and weight ``w`` counts ``w·y`` as a positive and
``w·(1 − y)`` as a negative. ``positives`` counts examples with ``label > 0.5``.
"""
from __future__ import annotations

import math

import numpy as np

#: Scores are clipped to [EPS, 1 - EPS] for the log loss (a score of exactly 0 or 1 that is
#: wrong would make it infinite).
EPS = 1e-7

COLUMNS = ("window_start_ms", "window_end_ms", "examples", "positives", "auc", "logloss",
           "calibration", "cumulative_auc", "bayes_auc")


def _class_weights(labels, weights, n):
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if labels.shape[0] != n or weights.shape[0] != n:
        raise ValueError(f"scores, labels and weights differ in length: {n}, "
                         f"{labels.shape[0]}, {weights.shape[0]}")
    return weights * labels, weights * (1.0 - labels)


def _auc_from_groups(positive, negative) -> float:
    """AUC from per-score-group class weights, groups in increasing score order."""
    total_positive, total_negative = positive.sum(), negative.sum()
    if not (total_positive > 0 and total_negative > 0):
        return math.nan
    negatives_below = np.cumsum(negative) - negative
    # A positive beats every negative scored lower, and half of those scored the same.
    wins = np.dot(positive, negatives_below + 0.5 * negative)
    return float(wins / (total_positive * total_negative))


def auc(scores, labels, weights=None) -> float:
    """Exact weighted ROC AUC; ties count half; NaN without both classes (or with NaN scores).

    It is the probability that a random positive scores above a random negative, pairs
    weighted by the product of their weights.

    Args:
        scores: the examples' scores.
        labels: their labels in [0, 1] (soft labels count in both classes).
        weights: their weights (default 1).

    Returns:
        the AUC, or NaN.

    >>> auc([0.2, 0.2, 0.9], [0, 1, 1])                  # (0.5 + 1) / 2
    0.75
    >>> auc([0.2, 0.2, 0.9], [0, 1, 1], weights=[1, 1, 2])   # (0.5·1 + 1·2) / 3
    0.8333333333333334
    >>> auc([0.3, 0.4], [1, 1])
    nan
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    positive, negative = _class_weights(labels, weights, scores.shape[0])
    if scores.shape[0] == 0 or np.isnan(scores).any():
        return math.nan
    order = np.argsort(scores, kind="stable")
    scores, positive, negative = scores[order], positive[order], negative[order]
    group_starts = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])
    return _auc_from_groups(np.add.reduceat(positive, group_starts),
                            np.add.reduceat(negative, group_starts))


class BucketedAUC:
    """AUC of a stream in constant memory: class weights per score bucket of ``[0, 1]``.

    Scores in one bucket count as tied, so the error is at most half the weight of the
    positive-negative pairs that share a bucket (below 1e-3 for 10,000 buckets unless the
    scores crowd into a few of them). Non-finite scores are skipped; out-of-range ones clipped.

    Args:
        buckets: how many equal buckets ``[0, 1]`` is cut into.

    >>> total = BucketedAUC()
    >>> total.add([0.1, 0.4], [0, 0])
    >>> later = BucketedAUC()
    >>> later.add([0.35, 0.8], [1, 1])
    >>> total.merge(later).result()
    0.75
    """

    def __init__(self, buckets: int = 10_000):
        self.buckets = int(buckets)
        self.positive = np.zeros(self.buckets)
        self.negative = np.zeros(self.buckets)

    def add(self, scores, labels, weights=None) -> None:
        """Counts examples in.

        Args:
            scores, labels: arrays of equal length (non-finite scores are left out).
            weights: their sample weights (None: 1).
        """
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        positive, negative = _class_weights(labels, weights, scores.shape[0])
        finite = np.isfinite(scores)
        if not finite.all():
            scores, positive, negative = scores[finite], positive[finite], negative[finite]
        bucket = np.clip((scores * self.buckets).astype(np.int64), 0, self.buckets - 1)
        self.positive += np.bincount(bucket, weights=positive, minlength=self.buckets)
        self.negative += np.bincount(bucket, weights=negative, minlength=self.buckets)

    def merge(self, other: "BucketedAUC") -> "BucketedAUC":
        """Adds another's counts into this one.

        Args:
            other: a :class:`BucketedAUC` of as many buckets.

        Returns:
            self.

        Raises:
            ValueError: ``other`` has another number of buckets.
        """
        if other.buckets != self.buckets:
            raise ValueError(f"cannot merge {other.buckets} buckets into {self.buckets}")
        self.positive += other.positive
        self.negative += other.negative
        return self

    def result(self) -> float:
        """The AUC of every example added, or NaN without both classes."""
        return _auc_from_groups(self.positive, self.negative)


def _logloss_sum(scores, labels, weights) -> float:
    p = np.clip(scores, EPS, 1.0 - EPS)
    return float(-np.dot(weights, labels * np.log(p) + (1.0 - labels) * np.log1p(-p)))


def _ratio(numerator, denominator) -> float:
    return float(numerator / denominator) if denominator > 0 else math.nan


class _Sums:
    """Additive per-example sums behind log loss and calibration."""

    __slots__ = ("examples", "positives", "weight", "logloss", "weighted_score", "weighted_label")

    def __init__(self):
        self.examples = self.positives = 0
        self.weight = self.logloss = self.weighted_score = self.weighted_label = 0.0

    def add(self, scores, labels, weights):
        self.examples += int(scores.shape[0])
        self.positives += int(np.count_nonzero(labels > 0.5))
        self.weight += float(weights.sum())
        self.logloss += _logloss_sum(scores, labels, weights)
        self.weighted_score += float(np.dot(weights, scores))
        self.weighted_label += float(np.dot(weights, labels))

    def row(self) -> dict:
        return {"examples": self.examples, "positives": self.positives,
                "logloss": _ratio(self.logloss, self.weight),
                "calibration": _ratio(self.weighted_score, self.weighted_label)}


def _as_float_arrays(scores, labels, weights, ts_ms, true_ctr):
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = scores.shape[0]
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    weights = np.ones(n) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    ts_ms = np.asarray(ts_ms, dtype=np.int64).reshape(-1)
    true_ctr = (np.full(n, np.nan) if true_ctr is None
                else np.asarray(true_ctr, dtype=np.float64).reshape(-1))
    if not labels.shape[0] == weights.shape[0] == ts_ms.shape[0] == true_ctr.shape[0] == n:
        raise ValueError("scores, labels, weights, ts_ms and true_ctr differ in length")
    return scores, labels, weights, ts_ms, true_ctr


class OnlineMetricsAccumulator:
    """Per event-time window metrics of a stream of scored examples.

    Windows are ``window_s`` long and start every ``sliding_s`` (default: ``window_s``,
    fixed windows), aligned to the epoch like Beam's. :meth:`add` buffers examples;
    :meth:`flush` returns the rows of the windows that ended at or before a watermark, in
    event-time order, one per window with examples:

    ``window_start_ms, window_end_ms, examples, positives`` (examples with label > 0.5),
    ``auc`` (exact, within the window), ``logloss`` (weighted mean), ``calibration``
    (Σ w·score / Σ w·label), ``cumulative_auc`` (bucketed, every example up to the window's
    end) and ``bayes_auc`` (the AUC of the true CTRs where every one is known: the ceiling).

    Examples of a window already flushed are *late*: they count in the totals and the
    cumulative AUC, not in any window row. A window's examples are buffered until it ends.

    Args:
        window_s: the windows' length, event-time seconds.
        sliding_s: a window starts every ``sliding_s`` (default: ``window_s``); ``window_s``
            must be a multiple of it.
        buckets: score buckets of the cumulative AUCs (:class:`BucketedAUC`).

    >>> acc = OnlineMetricsAccumulator(window_s=120, sliding_s=60)
    >>> acc.add(scores=[0.1, 0.8], labels=[0, 1], weights=None, ts_ms=[1_000, 61_000])
    >>> [(r["window_start_ms"], r["examples"], r["auc"]) for r in acc.flush(120_000)]
    [(-60000, 1, nan), (0, 2, 1.0)]
    """

    def __init__(self, window_s: float, sliding_s: float | None = None, buckets: int = 10_000):
        self.window_ms = int(round(window_s * 1000))
        self.step_ms = int(round((sliding_s or window_s) * 1000))
        if self.step_ms <= 0 or self.window_ms % self.step_ms:
            raise ValueError(f"window_s ({window_s}) must be a positive multiple of sliding_s "
                             f"({sliding_s})")
        self.buckets = buckets
        self._panes: dict = {}  # pane index -> [arrays...]: examples of [i·step, (i+1)·step)
        self._flushed_until: int | None = None  # windows ending at or before it are out
        self.cumulative = BucketedAUC(buckets)
        self.cumulative_bayes = BucketedAUC(buckets)
        self._sums = _Sums()
        self.late_examples = 0
        self.windows = 0  #: rows flushed so far
        self.rows: list = []  #: every row flushed so far, in order (a caller may clear it)

    def add(self, scores, labels, weights, ts_ms, true_ctr=None) -> None:
        """Buffers a batch.

        Args:
            scores, labels, ts_ms: arrays of equal length.
            weights: sample weights (None: 1).
            true_ctr: the true CTRs where known (None: unknown).
        """
        arrays = _as_float_arrays(scores, labels, weights, ts_ms, true_ctr)
        pane = arrays[3] // self.step_ms
        if self._flushed_until is not None:
            late = (pane + 1) * self.step_ms <= self._flushed_until
            if late.any():
                self._seal(tuple(a[late] for a in arrays))
                self.late_examples += int(late.sum())
                arrays, pane = tuple(a[~late] for a in arrays), pane[~late]
        if pane.shape[0] == 0:
            return
        if pane[0] == pane[-1] and (pane == pane[0]).all():  # the usual case: one pane
            self._panes.setdefault(int(pane[0]), []).append(arrays)
            return
        order = np.argsort(pane, kind="stable")
        pane = pane[order]
        starts = np.flatnonzero(np.r_[True, pane[1:] != pane[:-1]])
        for start, stop in zip(starts, np.r_[starts[1:], pane.shape[0]]):
            part = order[start:stop]
            self._panes.setdefault(int(pane[start]), []).append(tuple(a[part] for a in arrays))

    def _seal(self, arrays) -> None:
        """Count examples whose windows are final into the run's totals."""
        scores, labels, weights, _, true_ctr = arrays
        self.cumulative.add(scores, labels, weights)
        self._sums.add(scores, labels, weights)
        if not np.isnan(true_ctr).any():
            self.cumulative_bayes.add(true_ctr, labels, weights)

    def _pane_arrays(self, pane: int):
        chunks = self._panes[pane]
        if len(chunks) > 1:
            chunks[:] = [tuple(np.concatenate(column) for column in zip(*chunks))]
        return chunks[0]

    def pending_window_end(self) -> int | None:
        """The end (ms) of the earliest window with buffered examples, or None."""
        if not self._panes:
            return None
        end = (min(self._panes) + 1) * self.step_ms
        if self._flushed_until is not None:
            # A pane kept for later sliding windows: its next window ends after the flush.
            end = max(end, self._flushed_until + self.step_ms)
        return end

    def flush(self, watermark_ms: int | None = None) -> list:
        """The rows of the windows that are complete.

        Args:
            watermark_ms: the event time up to which examples are in (None: every window).

        Returns:
            The rows of the windows ending at or before ``watermark_ms``, in order.
        """
        if not self._panes:
            if watermark_ms is not None:
                self._advance(watermark_ms // self.step_ms * self.step_ms)
            return []
        panes_per_window = self.window_ms // self.step_ms
        if watermark_ms is None:
            until = (max(self._panes) + panes_per_window) * self.step_ms
        else:
            until = watermark_ms // self.step_ms * self.step_ms
        pane_ids = np.fromiter(self._panes, dtype=np.int64)
        ends = np.unique(pane_ids[:, None] + np.arange(1, panes_per_window + 1)) * self.step_ms
        ends = ends[ends <= until]
        if self._flushed_until is not None:
            ends = ends[ends > self._flushed_until]
        rows = []
        for end in ends.tolist():
            first, last = (end - self.window_ms) // self.step_ms, end // self.step_ms - 1
            # Panes that end here are final: into the cumulative AUC before the row reads it.
            if last in self._panes:
                self._seal(self._pane_arrays(last))
            members = [self._pane_arrays(p) for p in range(first, last + 1) if p in self._panes]
            rows.append(self._row(end, [np.concatenate(c) for c in zip(*members)]))
        self._advance(until)
        self.rows += rows
        self.windows += len(rows)
        return rows

    def _advance(self, until: int) -> None:
        if self._flushed_until is None or until > self._flushed_until:
            self._flushed_until = until
        # Keep only panes a window ending after the flush can still contain.
        for pane in [p for p in self._panes
                     if p * self.step_ms + self.window_ms <= self._flushed_until]:
            del self._panes[pane]

    def _row(self, end: int, arrays) -> dict:
        scores, labels, weights, _, true_ctr = arrays
        sums = _Sums()
        sums.add(scores, labels, weights)
        bayes = math.nan if np.isnan(true_ctr).any() else auc(true_ctr, labels, weights)
        return {"window_start_ms": end - self.window_ms, "window_end_ms": end,
                **sums.row(), "auc": auc(scores, labels, weights),
                "cumulative_auc": self.cumulative.result(), "bayes_auc": bayes}

    def totals(self) -> dict:
        """The run so far (examples of flushed windows and late ones)."""
        return {**self._sums.row(), "auc": self.cumulative.result(),
                "bayes_auc": self.cumulative_bayes.result(), "windows": self.windows,
                "late_examples": self.late_examples}
