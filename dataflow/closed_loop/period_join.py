"""The join of the loop's logs, a closed period at a time: :class:`PeriodJoin`.

Why per period: the DirectRunner fires event-time timers and hands GroupByKey output
downstream only at the end of its input, so a streaming join over the tailed folders would
emit nothing until stopped; the join pipeline (``dataflow.join``) runs instead, bounded, on
each period as soon as the logs are complete up to its end plus the join window.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

from dataflow.serving.feature_log import log_files, read_watermark

__all__ = ["PeriodJoin"]

_LOG = logging.getLogger(__name__)


class PeriodJoin:
    """Runs the join pipeline (``dataflow.join``), bounded, on each closed period of the
    logs and lands its example files in ``examples_dir``, where online training follows them.

    A period ``[t0, t1)`` is closed when the feature log is complete up to ``t1`` and the
    action log up to ``t1 + join window`` (their ``_watermark.json``); several closed
    periods are joined in one run. The runs' side outputs (unmatched, late, ...) stay in
    ``work_dir/run-NNNNN/out``; a run's unmatched actions include the clicks of requests of
    earlier periods, which the run before it joined.

    Args:
        features_dir: serving's feature log folder.
        actions_dir: the action log folder.
        examples_dir: the folder the example files land in.
        work_dir: the runs' folders.
        config: the feature config (``dataflow.join --config``).
        period_s: event-time seconds per period (of the logs' files and the examples').
        join_window_s: the join window.
        negative_sample_rate: ``dataflow.join --negative_sample_rate``.
        beam_args: Beam flags of the join pipelines.

    While the loop serves, it calls :meth:`run_once` (which joins the periods closed since
    the last call), then ``run_once(final=True)`` once the logs are complete:

    >>> import tempfile
    >>> from dataflow.serving.feature_log import RollingAvroLog
    >>> d = tempfile.mkdtemp()
    >>> joiner = PeriodJoin(f"{d}/features", f"{d}/actions", f"{d}/examples", f"{d}/join",
    ...                     "synthetic", period_s=60, join_window_s=60)
    >>> joiner.run_once()                   # no logs yet: nothing to join
    0
    >>> features = RollingAvroLog(f"{d}/features", "feature_log", roll_s=60)
    >>> features.append([{"request_id": "r1", "ts_ms": 0, "user_id": "u", "item_id": "i"}], 0)
    >>> features.close(until_ms=120_000)
    >>> RollingAvroLog(f"{d}/actions", "action_log", roll_s=60).close(until_ms=120_000)
    >>> joiner.ready_until()                # [0, 60 s) is closed: actions are in to 60 s + 60 s
    60000
    """

    def __init__(self, features_dir: str, actions_dir: str, examples_dir: str,
                 work_dir: str, config: str, period_s: float, join_window_s: float,
                 negative_sample_rate: float = 1.0, beam_args: tuple = ()):
        self.features_dir, self.actions_dir = features_dir, actions_dir
        self.examples_dir, self.work_dir = examples_dir, work_dir
        self.config = config
        self.period_ms = int(period_s * 1000)
        self.window_ms = int(join_window_s * 1000)
        self.negative_sample_rate = negative_sample_rate
        self.beam_args = list(beam_args)
        self.cursor: Optional[int] = None  # start of the next period to join
        self.runs: list = []  # per run: wall start/seconds, periods, examples
        os.makedirs(examples_dir, exist_ok=True)
        os.makedirs(work_dir, exist_ok=True)

    def ready_until(self, final: bool = False) -> Optional[int]:
        """Where the closed periods not joined yet end.

        Args:
            final: the logs are complete: every period is closed.

        Returns:
            Their end (ms), or None if there are none.
        """
        features = log_files(self.features_dir)
        if self.cursor is None:
            if not features:
                return None
            self.cursor = features[0][0]
        if final:
            ends = [p + self.period_ms for p, _ in features]
            end = max(ends, default=self.cursor)
        else:
            fw, aw = read_watermark(self.features_dir), read_watermark(self.actions_dir)
            if fw is None or aw is None:
                return None
            end = min(fw, aw - self.window_ms)
            end -= end % self.period_ms
        return end if end > self.cursor else None

    def run_once(self, final: bool = False) -> int:
        """Joins the periods closed and not joined yet.

        Args:
            final: the logs are complete: join everything left.

        Returns:
            How many examples landed.
        """
        end = self.ready_until(final)
        if end is None:
            return 0
        from dataflow.join import main as join_main
        start = self.cursor
        features = [p for t, p in log_files(self.features_dir) if start <= t < end]
        actions = [p for t, p in log_files(self.actions_dir)
                   if start <= t < end + self.window_ms]
        run = os.path.join(self.work_dir, f"run-{len(self.runs):05d}")
        wall = time.time()
        examples = 0
        if features:
            for kind, paths in (("features", features), ("actions", actions)):
                os.makedirs(os.path.join(run, "in", kind))
                for path in paths:
                    os.link(path, os.path.join(run, "in", kind, os.path.basename(path)))
            if not actions:  # the join reads a glob: it needs one file, even empty
                from schemas import write_avro
                write_avro(os.path.join(run, "in", "actions", "none.avro"), "action_log", [])
            join_main([f"--features={run}/in/features/*.avro",
                       f"--actions={run}/in/actions/*.avro", f"--config={self.config}",
                       f"--out={run}/out", f"--join_window_s={self.window_ms / 1000}",
                       f"--period_s={self.period_ms // 1000}",
                       f"--negative_sample_rate={self.negative_sample_rate}",
                       *self.beam_args])
            examples = self._land(os.path.join(run, "out", "examples"))
        self.cursor = end
        self.runs.append({"wall_time": wall, "seconds": round(time.time() - wall, 3),
                          "from_ms": start, "to_ms": end, "feature_files": len(features),
                          "action_files": len(actions), "examples": examples})
        _LOG.info("loop: joined %d periods in %.1f s: %d examples", (end - start)
                  // self.period_ms, time.time() - wall, examples)
        return examples

    def _land(self, folder: str) -> int:
        """Move the run's example files into the folder training follows, in name (event
        time) order, each by an atomic rename."""
        from transforms.example_log import count_examples, example_files
        paths = example_files(folder)
        count = count_examples(paths)
        for path in paths:
            os.rename(path, os.path.join(self.examples_dir, os.path.basename(path)))
        return count
