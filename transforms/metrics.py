"""Online metrics: each example is scored before it is trained on (progressive validation).

The worker scores a batch with the parameters serving holds, emits the scores, and only then
learns from the batch; the AUC of those scores over event time is the number that matters.

>>> import numpy as np
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
  cumulative AUC) from score arrays; :func:`write_csv` and :func:`plot_png` report them.
* :class:`OnlineMetrics`: the Beam transform over the worker's score batches, on any runner.

Labels may be soft: an example of label ``y`` and weight ``w`` counts ``w·y`` as a positive and
``w·(1 − y)`` as a negative. ``positives`` counts examples with ``label > 0.5``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Any, NamedTuple, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import window as beam_window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (ReadModifyWriteStateSpec, BagStateSpec, TimerSpec,
                                              on_timer)
from apache_beam.utils.timestamp import Timestamp

from schemas import strict_json

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
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        positive, negative = _class_weights(labels, weights, scores.shape[0])
        finite = np.isfinite(scores)
        if not finite.all():
            scores, positive, negative = scores[finite], positive[finite], negative[finite]
        bucket = np.clip((scores * self.buckets).astype(np.int64), 0, self.buckets - 1)
        self.positive += np.bincount(bucket, weights=positive, minlength=self.buckets)
        self.negative += np.bincount(bucket, weights=negative, minlength=self.buckets)

    def merge(self, other: "BucketedAUC") -> "BucketedAUC":
        """Add ``other``'s counts into this one; returns self."""
        if other.buckets != self.buckets:
            raise ValueError(f"cannot merge {other.buckets} buckets into {self.buckets}")
        self.positive += other.positive
        self.negative += other.negative
        return self

    def result(self) -> float:
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
        """Buffer a batch: arrays of equal length; ``weights``/``true_ctr`` may be None."""
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
        """Rows of the windows ending at or before ``watermark_ms`` (None: all), in order."""
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


# -- reports ------------------------------------------------------------------------------

def write_csv(rows, path: str) -> None:
    """Rows (dicts with :data:`COLUMNS`) to a CSV file, one line per window."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: str) -> list:
    """Rows back from :func:`write_csv` (numbers as int/float)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (int(v) if k in ("window_start_ms", "window_end_ms", "examples",
                                     "positives") else float(v)) for k, v in row.items()}
                for row in csv.DictReader(f)]


def fixed_margins(fig, left: float, right: float, top: float, bottom: float,
                  hspace: float = 0.0, wspace: float = 0.0) -> None:
    """Lays out ``fig``'s grid of subplots with fixed margins and gaps, in inches.

    The project's plots use this instead of ``tight_layout``, which measured every text
    first and made ``savefig`` draw the figure twice (0.15 s of the 0.65 s CPU a job's first
    plot took, matplotlib's import included). Inches, not fractions of the figure: a figure
    that grows with its panels (a column per data set) keeps the same room for the same
    labels. ``hspace``/``wspace`` are the gaps between rows/columns. Nothing is measured, so
    each plot's margins are sized for its labels, and ``tests/test_metrics.py`` checks every
    plot for a label clipped at the edge or running into another panel.

    >>> from matplotlib.figure import Figure
    >>> fig = Figure(figsize=(10, 5))
    >>> axes = fig.subplots(2, 2)
    >>> fixed_margins(fig, left=1, right=0.5, top=0.5, bottom=1, hspace=0.5, wspace=1)
    >>> [round(v, 3) for v in axes[1][0].get_position().bounds]    # x, y, width, height
    [0.1, 0.2, 0.375, 0.3]
    """
    width, height = fig.get_size_inches()
    rows, cols = fig.axes[0].get_subplotspec().get_gridspec().get_geometry()
    # matplotlib's gaps are fractions of the mean subplot's width/height
    cell_w = (width - left - right - (cols - 1) * wspace) / cols
    cell_h = (height - top - bottom - (rows - 1) * hspace) / rows
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wspace / cell_w, hspace=hspace / cell_h)


def plot_png(rows, path: str, title: str = "Online metrics"):
    """AUC, log loss, calibration and examples per window over event time, as a PNG;
    returns the figure.

    Drawn once, on a figure of its own (no pyplot state, so any thread may call this), with
    fixed margins (:func:`fixed_margins`).
    """
    import datetime

    from matplotlib.figure import Figure

    rows = sorted(rows, key=lambda r: r["window_end_ms"])
    column = {k: np.array([r[k] for r in rows], dtype=np.float64) for k in COLUMNS}
    ends = [datetime.datetime.fromtimestamp(r["window_end_ms"] / 1000, datetime.timezone.utc)
            for r in rows]
    fig = Figure(figsize=(10, 9))
    axes = fig.subplots(4, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 2, 1]})
    auc_ax, loss_ax, calibration_ax, count_ax = axes
    auc_ax.plot(ends, column["auc"], ".-", lw=1, label="window AUC")
    auc_ax.plot(ends, column["cumulative_auc"], "-", lw=2, label="cumulative AUC")
    if np.isfinite(column["bayes_auc"]).any():
        auc_ax.plot(ends, column["bayes_auc"], "--", lw=1, color="grey",
                    label="true-CTR AUC (ceiling)")
    auc_ax.set_ylabel("AUC")
    auc_ax.axhline(0.5, color="black", lw=0.5)
    auc_ax.legend(loc="lower right")
    loss_ax.plot(ends, column["logloss"], ".-", lw=1, color="tab:red")
    loss_ax.set_ylabel("log loss")
    calibration_ax.plot(ends, column["calibration"], ".-", lw=1, color="tab:green")
    calibration_ax.axhline(1.0, color="black", lw=0.5)
    calibration_ax.set_ylabel("Σ score / Σ label")
    # Steps, not bars: thousands of bar patches take matplotlib tens of seconds.
    count_ax.fill_between(ends, column["examples"], step="pre", color="lightgrey",
                          label="examples")
    count_ax.fill_between(ends, column["positives"], step="pre", color="tab:blue",
                          label="positives")
    count_ax.set_ylabel("per window")
    count_ax.set_xlabel("event time (window end, UTC)")
    count_ax.legend(loc="upper left", fontsize="small")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    if rows:
        last = rows[-1]
        title += (f"\n{int(column['examples'].sum()):,} examples in {len(rows)} windows · "
                  f"cumulative AUC {last['cumulative_auc']:.4f} · last window AUC "
                  f"{last['auc']:.4f}")
    fig.suptitle(title)
    fig.autofmt_xdate()
    fixed_margins(fig, left=0.8, right=0.2, top=0.72, bottom=0.9, hspace=0.26)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return fig


def write_report(rows, totals: dict, out_prefix: str, title: str = "Online metrics") -> None:
    """``{out_prefix}.csv``, ``.png`` and ``-totals.json`` (the JSON replaced atomically: a
    job's driver polls it, :func:`input_ended`)."""
    write_csv(rows, out_prefix + ".csv")
    if rows:
        plot_png(rows, out_prefix + ".png", title)
    tmp = out_prefix + "-totals.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        strict_json.dump(totals, f, indent=2, sort_keys=True)
    os.replace(tmp, out_prefix + "-totals.json")


def input_ended(totals_path: str) -> bool:
    """Whether the report at ``totals_path`` was written when the job's input ended (its
    ``end_of_input``), not while windows closed before that."""
    try:
        with open(totals_path, encoding="utf-8") as f:
            return bool(json.load(f).get("end_of_input"))
    except (OSError, ValueError):
        return False


# -- Beam ---------------------------------------------------------------------------------

class Scores(NamedTuple):
    """The worker's score record of a batch: arrays of equal length."""

    scores: np.ndarray  #: float32 [n], scored before the batch was trained on
    labels: np.ndarray  #: float32 [n]
    weights: np.ndarray  #: float32 [n]
    ts_ms: np.ndarray  #: int64 [n], event time
    true_ctr: np.ndarray | None = None  #: float32 [n], NaN where unknown


# no "-> Scores": Beam reads a callable's annotations (strings here) and logs that it uses Any
def as_scores(element):
    """A ``Scores`` from a tuple of 4 or 5 arrays (or scalars), or a dict record with keys
    ``score``/``scores``, ``label``/``labels``, ``weight``/``weights``, ``ts_ms``, ``true_ctr``.

    >>> as_scores({"score": 0.3, "label": 1, "ts_ms": 5}).ts_ms
    array([5])
    """
    if isinstance(element, dict):
        get = lambda *keys, default=None: next(  # noqa: E731
            (element[k] for k in keys if k in element), default)
        n = np.size(get("score", "scores"))
        element = (get("score", "scores"), get("label", "labels"),
                   get("weight", "weights", "sample_weight", default=np.ones(n)),
                   get("ts_ms"), get("true_ctr"))
    if len(element) not in (4, 5):
        raise ValueError(f"a score element has 4 or 5 arrays, got {len(element)}")
    arrays = [None if a is None else np.atleast_1d(np.asarray(a)) for a in element]
    return Scores(*arrays)


class _OnlineMetricsFn(beam.DoFn):
    """One key: buffers score arrays, emits a row per event-time window once it ends.

    The accumulator (buffered panes, cumulative histograms, totals) is one pickled state
    value, written only when a timer fires (once per window step); arriving batches and the
    rows emitted go to bags, cheap to append to on every runner (the rows are read back only
    to write the report). The ``window`` timer fires at the end of the
    earliest window with examples; the ``end`` timer fires when the input ends (bounded runs)
    and flushes the rest in one go instead of one timer round per window.
    """

    ACCUMULATOR = ReadModifyWriteStateSpec("accumulator", PickleCoder())
    ARRIVED = BagStateSpec("arrived", PickleCoder())
    ROWS = BagStateSpec("rows", PickleCoder())
    WINDOW_TIMER_AT = ReadModifyWriteStateSpec("window_timer_at", PickleCoder())
    WINDOW = TimerSpec("window", TimeDomain.WATERMARK)
    END = TimerSpec("end", TimeDomain.WATERMARK)

    def __init__(self, window_s, sliding_s, buckets, out_prefix, title, write_every_s):
        self.window_s, self.sliding_s, self.buckets = window_s, sliding_s, buckets
        self.out_prefix, self.title, self.write_every_s = out_prefix, title, write_every_s
        self.examples = Metrics.counter("online", "examples")
        self.positives = Metrics.counter("online", "positives")
        self.windows = Metrics.counter("online", "windows")
        self.late = Metrics.counter("online", "late_examples")
        self.auc_x1e6 = Metrics.distribution("online", "auc_x1e6")
        self.logloss_x1e6 = Metrics.distribution("online", "logloss_x1e6")
        self.calibration_x1e6 = Metrics.distribution("online", "calibration_x1e6")
        self.cumulative_auc_x1e6 = Metrics.gauge("online", "cumulative_auc_x1e6")
        self._last_write = 0.0

    def _new_accumulator(self):
        return OnlineMetricsAccumulator(self.window_s, self.sliding_s, self.buckets)

    def process(self, element, arrived=beam.DoFn.StateParam(ARRIVED),
                timer_at=beam.DoFn.StateParam(WINDOW_TIMER_AT),
                window_timer=beam.DoFn.TimerParam(WINDOW), end_timer=beam.DoFn.TimerParam(END)):
        _, scores = element
        if scores.scores.shape[0] == 0:
            return ()
        arrived.add(scores)
        self.examples.inc(int(scores.scores.shape[0]))
        self.positives.inc(int(np.count_nonzero(np.asarray(scores.labels) > 0.5)))
        step_ms = int(round((self.sliding_s or self.window_s) * 1000))
        first_end = (int(np.min(scores.ts_ms)) // step_ms + 1) * step_ms
        pending = timer_at.read()
        if pending is None or first_end < pending:
            window_timer.set(Timestamp(micros=first_end * 1000))
            timer_at.write(first_end)
        if pending is None:
            # (Re-)armed whenever no window timer is pending: the FnApiRunner fires
            # end-of-input timers after every resumption of a self-checkpointing source
            # (polling a folder), so "the end" may come more than once.
            end_timer.set(beam_window.GlobalWindow().max_timestamp())
        return ()  # rows come from the timers

    def _update(self, accumulator_state, arrived, watermark_ms):
        accumulator = accumulator_state.read() or self._new_accumulator()
        for scores in arrived.read():
            accumulator.add(*scores)
        arrived.clear()
        late_before = accumulator.late_examples
        rows = accumulator.flush(watermark_ms)
        self.late.inc(accumulator.late_examples - late_before)
        for row in rows:
            self.windows.inc()
            for value, metric in ((row["auc"], self.auc_x1e6),
                                  (row["logloss"], self.logloss_x1e6),
                                  (row["calibration"], self.calibration_x1e6)):
                if math.isfinite(value):
                    metric.update(int(round(value * 1e6)))
        if rows and math.isfinite(rows[-1]["cumulative_auc"]):
            self.cumulative_auc_x1e6.set(int(round(rows[-1]["cumulative_auc"] * 1e6)))
        return accumulator, rows

    def _keep_and_write(self, accumulator, rows, rows_state, end_of_input):
        for row in rows:
            rows_state.add(row)
        accumulator.rows.clear()  # they live in the bag: the accumulator state stays small
        if not self.out_prefix:
            return
        now = time.monotonic()
        if end_of_input or (rows and now - self._last_write >= self.write_every_s):
            self._last_write = now
            # end_of_input: what a driver waits for before it cancels a job whose sources
            # stay up (dataflow.train); the reports written as windows close are not it
            write_report(list(rows_state.read()),
                         {**accumulator.totals(), "end_of_input": end_of_input},
                         self.out_prefix, self.title)

    @on_timer(WINDOW)
    def on_window(self, fired_at=beam.DoFn.TimestampParam,
                  accumulator_state=beam.DoFn.StateParam(ACCUMULATOR),
                  arrived=beam.DoFn.StateParam(ARRIVED),
                  rows_state=beam.DoFn.StateParam(ROWS),
                  timer_at=beam.DoFn.StateParam(WINDOW_TIMER_AT),
                  window_timer=beam.DoFn.TimerParam(WINDOW)):
        accumulator, rows = self._update(accumulator_state, arrived, fired_at.micros // 1000)
        self._keep_and_write(accumulator, rows, rows_state, end_of_input=False)
        next_end = accumulator.pending_window_end()
        if next_end is None:
            timer_at.clear()
        else:
            window_timer.set(Timestamp(micros=next_end * 1000))
            timer_at.write(next_end)
        accumulator_state.write(accumulator)
        yield from rows

    @on_timer(END)
    def on_end(self, accumulator_state=beam.DoFn.StateParam(ACCUMULATOR),
               arrived=beam.DoFn.StateParam(ARRIVED),
               rows_state=beam.DoFn.StateParam(ROWS),
               timer_at=beam.DoFn.StateParam(WINDOW_TIMER_AT)):
        accumulator, rows = self._update(accumulator_state, arrived, None)
        self._keep_and_write(accumulator, rows, rows_state, end_of_input=True)
        # Keep the accumulator and the rows: on the FnApiRunner this fires again after each
        # resumption of a polling source, and later examples must add to the same totals.
        accumulator_state.write(accumulator)
        timer_at.clear()
        yield from rows


class OnlineMetrics(beam.PTransform):
    """Score batches → one row dict per event-time window (see
    :class:`OnlineMetricsAccumulator`), plus Beam metrics and a CSV/PNG/JSON report.

    Elements: :class:`Scores`, a tuple of 4 or 5 arrays ``(scores, labels, weights, ts_ms
    [, true_ctr])`` (the worker's ``scores`` output) or dict records (:func:`as_scores`).
    Windows follow the examples' own ``ts_ms``, not the elements' Beam timestamps, so a batch
    spanning two windows is split exactly; a window is emitted once the watermark passes its
    end. Everything goes through one key: the metrics are a few arrays per training batch.

    Beam metrics (namespace ``online``): counters ``examples``, ``positives``, ``windows``,
    ``late_examples``; distributions ``auc_x1e6``, ``logloss_x1e6``, ``calibration_x1e6`` over
    windows; gauge ``cumulative_auc_x1e6``. With ``out_prefix``, ``{out_prefix}.csv``,
    ``.png`` and ``-totals.json`` are rewritten at most every ``write_every_s`` seconds of
    wall time while windows close, and once more when a bounded input ends.
    """

    def __init__(self, window_s: float, out_prefix: str | None = None,
                 sliding_s: float | None = None, buckets: int = 10_000,
                 title: str = "Online metrics (progressive validation)",
                 write_every_s: float = 30.0):
        super().__init__()
        OnlineMetricsAccumulator(window_s, sliding_s)  # validate now, not on a worker
        self._fn = _OnlineMetricsFn(window_s, sliding_s, buckets, out_prefix, title,
                                    write_every_s)

    def expand(self, scores):
        return (scores
                | "AsScores" >> beam.Map(as_scores)
                | "GlobalWindow" >> beam.WindowInto(beam_window.GlobalWindows())
                | "OneKey" >> beam.Map(lambda s: (0, s)).with_output_types(Tuple[int, Any])
                | "PerWindow" >> beam.ParDo(self._fn))


class WriteScores(beam.DoFn):
    """The worker's score batches → ``.npz`` files in ``folder``, one per bundle: every
    example's score, label, weight, event time and true CTR, for what the windowed metrics
    do not answer (e.g. the AUC of the stream's last quarter). Read them with
    :func:`read_scores`."""

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self):
        os.makedirs(self.folder, exist_ok=True)

    def start_bundle(self):
        self._parts = []

    def process(self, element):
        s = as_scores(element)
        n = s.scores.shape[0]
        true_ctr = s.true_ctr if s.true_ctr is not None else np.full(n, np.nan)
        self._parts.append((s.scores.astype(np.float32), s.labels.astype(np.float32),
                            s.weights.astype(np.float32), s.ts_ms.astype(np.int64),
                            np.asarray(true_ctr, np.float32)))
        return ()  # written in finish_bundle

    def finish_bundle(self):
        if not self._parts:
            return
        import uuid
        columns = [np.concatenate(c) for c in zip(*self._parts)]
        path = os.path.join(self.folder, f"scores-{uuid.uuid4().hex}.npz")
        np.savez(path + ".tmp.npz", **dict(zip(SCORE_COLUMNS, columns)))
        os.replace(path + ".tmp.npz", path)  # readers never see half a file
        self._parts = []


SCORE_COLUMNS = ("scores", "labels", "weights", "ts_ms", "true_ctr")


def read_scores(folder: str) -> dict:
    """``{column: array}`` of every file :class:`WriteScores` wrote in ``folder``, in
    event-time order (stable: a batch's examples keep their order)."""
    import glob
    parts = [np.load(p) for p in sorted(glob.glob(os.path.join(folder, "scores-*.npz")))
             if not p.endswith(".tmp.npz")]
    if not parts:
        return {k: np.empty(0) for k in SCORE_COLUMNS}
    cols = {k: np.concatenate([p[k] for p in parts]) for k in SCORE_COLUMNS}
    order = np.argsort(cols["ts_ms"], kind="stable")
    return {k: v[order] for k, v in cols.items()}
