"""Online metrics in a pipeline: each example is scored before it is trained on (progressive
validation).

The worker scores a batch with the parameters serving holds, emits the scores, and only then
learns from the batch; the AUC of those scores over event time is the number that matters.
:class:`OnlineMetrics` turns the worker's score batches into a row per event-time window
(``transforms.metrics_math``), Beam metrics, and a CSV/PNG/JSON report
(``transforms.metrics_report``).
"""
from __future__ import annotations

import math
import time
from typing import Any, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import window as beam_window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (ReadModifyWriteStateSpec, BagStateSpec, TimerSpec,
                                              on_timer)
from apache_beam.utils.timestamp import Timestamp

from transforms.metrics_math import OnlineMetricsAccumulator
from transforms.metrics_report import write_report
from transforms.scores import as_scores


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

    Elements: :class:`transforms.scores.Scores`, a tuple of 4 or 5 arrays ``(scores, labels,
    weights, ts_ms [, true_ctr])`` (the worker's ``scores`` output) or dict records
    (:func:`as_scores`).
    Windows follow the examples' own ``ts_ms``, not the elements' Beam timestamps, so a batch
    spanning two windows is split exactly; a window is emitted once the watermark passes its
    end. Everything goes through one key: the metrics are a few arrays per training batch.

    Beam metrics (namespace ``online``): counters ``examples``, ``positives``, ``windows``,
    ``late_examples``; distributions ``auc_x1e6``, ``logloss_x1e6``, ``calibration_x1e6`` over
    windows; gauge ``cumulative_auc_x1e6``. With ``out_prefix``, ``{out_prefix}.csv``,
    ``.png`` and ``-totals.json`` are rewritten at most every ``write_every_s`` seconds of
    wall time while windows close, and once more when a bounded input ends.

    Args:
        window_s: the windows' length, event-time seconds.
        out_prefix: where to write the report (``transforms.metrics_report.write_report``);
            None: no report.
        sliding_s: a window starts every ``sliding_s`` (default: ``window_s``, fixed
            windows); ``window_s`` must be a multiple of it.
        buckets: score buckets of the cumulative AUC (``transforms.metrics_math.BucketedAUC``).
        title: the plot's title.
        write_every_s: wall-clock seconds between reports while windows close.

    Returns:
        (``expand``) a PCollection of window rows (dicts with
        ``transforms.metrics_math.COLUMNS``), each at the end of its window.

    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> with beam.Pipeline() as p:
    ...     rows = (p | beam.Create([([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], [1, 1, 1, 1],
    ...                               [1_000, 2_000, 61_000, 62_000])])
    ...             | OnlineMetrics(window_s=60))
    ...     _ = assert_that(rows | beam.Map(lambda r: (r["window_start_ms"], r["examples"],
    ...                                                r["positives"])),
    ...                     equal_to([(0, 2, 0), (60_000, 2, 2)]))
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
