"""The join of a bounded input in event-time slices, one pipeline each (the DirectRunner's
default; ``dataflow.join --slice_s``): the planner (:func:`plan_slices`,
:func:`merge_small_slices`), what a slice routes and hands on to the next
(:func:`route_slice`, :func:`hand_on`), and the driver (:func:`join_in_slices`).

Why: the DirectRunner runs a bounded pipeline stage after stage and fires event-time timers
only at its end, so one pipeline holds every request in the joiner's state and every record
between stages: memory grows with the input. A slice's memory follows its logs plus the join
window, and the output is the same as one pipeline's (docs/pipelines.md).
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import time
from typing import Callable, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from dataflow.job import metrics_dict, run_job
from dataflow.join_io import SIDE_OUTPUTS
from schemas import strict_json
from transforms.event_time_files import (WriteEventTimeFiles, period_name, read_json_lines,
                                         record_order, write_json_lines, write_sorted_file)
from transforms.example_log import example_files
from transforms.joiner import closed_request_keys
from transforms.tail import log_file_start_ms

__all__ = ["DEFAULT_SLICE_S", "DEFAULT_SLICE_MIN_BYTES", "Slice", "plan_slices",
           "merge_small_slices", "route_slice", "hand_on", "join_in_slices"]

_LOG = logging.getLogger(__name__)

DEFAULT_SLICE_S = 3600
# ~100 MiB of the join's memory a MiB of (compressed) feature log, measured: one pipeline
# over the 100k stream's 5.8 MiB took ~570 MiB above the process's ~210 MiB at rest; an hour
# of the 400k stream's busiest (~1.9 MiB) 150-190 MiB (docs/experiments.md §5)
DEFAULT_SLICE_MIN_BYTES = 1 << 20


def _write_carried_lines(f, records) -> None:
    """JSON lines that keep NaN and infinity (Python's ``json`` reads them back): what a
    slice hands on to the next must stay as it was, e.g. a record invalid for its NaN score
    must not come back valid with a null one. Work files only, never output."""
    for r in records:
        f.write((json.dumps(r, sort_keys=True, default=repr) + "\n").encode("utf-8"))


class Slice(NamedTuple):
    """One pipeline of a sliced join: the requests served in ``[lo_ms, hi_ms)`` and the
    actions of ``[lo_ms + window, hi_ms + window)``, read from the files first needed here
    and from what the slice before handed on (``carry_in``).

    Its side outputs go to ``side`` (merged at the end), what it hands on to ``carry_out``,
    the keys of the requests it closed to ``closed_out``. :func:`join_in_slices` makes them
    of :func:`plan_slices`' ranges.

    >>> part = Slice(index=0, lo_ms=-math.inf, hi_ms=3_600_000, window_ms=600_000,
    ...              feature_files=["f-00.avro"], action_files=["a-00.avro"],
    ...              work="out/.slices", carry_in=None, closed=None)
    >>> part.final, part.carry_out, part.closed_out
    (False, 'out/.slices/carry-00000', 'out/.slices/closed-00000')
    """
    index: int
    lo_ms: float                # -inf for the first slice
    hi_ms: float                # inf for the last
    window_ms: int
    feature_files: list
    action_files: list
    work: str                   # the sliced run's work folder (out/.slices)
    carry_in: str | None        # folder of the slice before's carry_out
    closed: str | None          # .npy of the requests earlier slices closed

    @property
    def final(self) -> bool:
        """The last slice: what it leaves unmatched is unmatched for good."""
        return self.hi_ms == math.inf

    @property
    def side(self) -> str:
        return os.path.join(self.work, "side")

    @property
    def carry_out(self) -> str:
        return os.path.join(self.work, f"carry-{self.index:05d}")

    @property
    def closed_out(self) -> str:
        return os.path.join(self.work, f"closed-{self.index:05d}")


class _RouteByTime(beam.DoFn):
    """Records of a slice's inputs → this slice (main), ``later`` (``ts_ms >= hi``: handed on
    to the next slice; counter ``join.KIND_handed_on``), counting those before ``lo`` that
    came from this slice's files (``check_early``): their file's name promised later records,
    and the slice before is joined already."""

    def __init__(self, kind: str, lo_ms: float, hi_ms: float, check_early: bool):
        self.lo_ms, self.hi_ms, self.check_early = lo_ms, hi_ms, check_early
        self.early = Metrics.counter("join", "records_before_their_slice")
        self.later = Metrics.counter("join", f"{kind}_handed_on")

    def process(self, record):
        ts_ms = record.get("ts_ms") if isinstance(record, dict) else None
        if isinstance(ts_ms, int):  # else invalid: the joiner reports it, here
            if ts_ms >= self.hi_ms:
                self.later.inc()
                yield pvalue.TaggedOutput("later", record)
                return
            if self.check_early and ts_ms < self.lo_ms:
                self.early.inc()
        yield record


def route_slice(pipeline, part: Slice, features, actions):
    """A slice's records, from its files and from what the slice before handed on, routed
    by event time.

    Args:
        pipeline: the slice's pipeline.
        part: the slice.
        features: the feature records read from its files.
        actions: the action records read from its files.

    Returns:
        ``(features here, actions here, {"features": later, "actions": later})``: ``later``
        are those at or after the slice's end (of its action range for actions), which
        :func:`hand_on` hands on to the next slice.
    """
    window = part.window_ms
    ranges = {"features": (part.lo_ms, part.hi_ms), "actions": (part.lo_ms + window,
                                                                 part.hi_ms + window)}
    here, later = {}, {}
    for kind, new in (("features", features), ("actions", actions)):
        lo, hi = ranges[kind]
        streams = [new | f"Route{kind}" >> beam.ParDo(_RouteByTime(kind, lo, hi, True))
                   .with_outputs("later", main="here")]
        if part.carry_in and FileSystems.match(
                [os.path.join(part.carry_in, kind, "*")])[0].metadata_list:
            carried = (pipeline
                       | f"ReadCarried{kind}" >> beam.io.ReadFromText(
                           os.path.join(part.carry_in, kind, "*"))
                       | f"ParseCarried{kind}" >> beam.Map(
                           lambda line: _stamped(json.loads(line))))
            streams.append(carried | f"RouteCarried{kind}" >> beam.ParDo(
                _RouteByTime(kind, lo, hi, False)).with_outputs("later", main="here"))
        here[kind] = [r.here for r in streams] | f"Here{kind}" >> beam.Flatten()
        later[kind] = [r.later for r in streams] | f"Later{kind}" >> beam.Flatten()
    return here["features"], here["actions"], later


def _stamped(record: dict) -> TimestampedValue:
    return TimestampedValue(record, Timestamp(micros=record["ts_ms"] * 1000))


def hand_on(part: Slice, joined, later: dict, period_s: int) -> None:
    """Writes what a slice (not the last) hands on to the next: the actions of requests not
    served yet (the next slice may serve them) and the records later than the slice, as
    JSON lines that keep their values exactly; and the keys of the requests it closed.

    Args:
        part: the slice.
        joined: the slice's ``OnlineJoiner`` outputs.
        later: :func:`route_slice`'s records later than the slice.
        period_s: event-time seconds per file.
    """
    ((joined.unmatched_actions, later["actions"]) | "Unserved" >> beam.Flatten()
     | "CarryActions" >> WriteEventTimeFiles(os.path.join(part.carry_out, "actions"),
                                             period_s, encode=_write_carried_lines))
    later["features"] | "CarryFeatures" >> WriteEventTimeFiles(
        os.path.join(part.carry_out, "features"), period_s, encode=_write_carried_lines)
    joined.closed | "WriteClosed" >> WriteEventTimeFiles(part.closed_out, period_s)



def plan_slices(feature_files, action_files, slice_ms: int, window_ms: int) -> list | None:
    """The slices of a sliced join, each reading the files whose name-given start falls in
    its range (features ``[lo, hi)``, actions ``[lo + window, hi + window)``); the first
    starts at -inf, the last ends at +inf; a stretch without feature files joins the slice
    after it.

    Args:
        feature_files: feature log paths, named by their records' start
            (:func:`transforms.tail.log_file_start_ms`).
        action_files: action log paths, named so too.
        slice_ms: event time per slice.
        window_ms: the join window.

    Returns:
        ``[(lo_ms, hi_ms, feature files, action files)]``, or None if a file's name gives
        no start or a list is empty (then the join runs as one pipeline).

    >>> h = lambda hour: f"part-20240101-{hour:02d}.avro"
    >>> [(lo, hi, [f[-7:-5] for f in fs], [a[-7:-5] for a in acts]) for lo, hi, fs, acts in
    ...  plan_slices([h(0), h(1), h(4)], [h(0), h(1), h(2), h(4), h(5)], 3_600_000, 600_000)]
    ... # doctest: +NORMALIZE_WHITESPACE
    [(-inf, 1704070800000, ['00'], ['00', '01']), (1704070800000, 1704074400000, ['01'], ['02']),
     (1704074400000, inf, ['04'], ['04', '05'])]
    """
    starts = {p: log_file_start_ms(p) for p in list(feature_files) + list(action_files)}
    if not feature_files or not action_files or any(t is None for t in starts.values()):
        return None  # one pipeline (which also says what an empty glob matched)
    fs = sorted((starts[p], p) for p in feature_files)
    acts = sorted((starts[p], p) for p in action_files)
    lo, hi = -math.inf, (fs[0][0] // slice_ms + 1) * slice_ms
    i = j = 0
    slices = []
    while True:
        ni = i
        while ni < len(fs) and fs[ni][0] < hi:
            ni += 1
        if ni == len(fs):
            slices.append((lo, math.inf, [p for _, p in fs[i:]], [p for _, p in acts[j:]]))
            return slices
        if ni == i:  # no feature file starts here: the slice of the next one begins here
            hi = (fs[i][0] // slice_ms + 1) * slice_ms
            continue
        nj = j
        while nj < len(acts) and acts[nj][0] < hi + window_ms:
            nj += 1
        slices.append((lo, hi, [p for _, p in fs[i:ni]], [p for _, p in acts[j:nj]]))
        i, j, lo, hi = ni, nj, hi, hi + slice_ms


def merge_small_slices(plan: list, sizes: dict, min_bytes: int) -> list:
    """Adjacent slices joined into one until its feature files hold ``min_bytes`` (valid
    because a slice's feature and action ranges continue the one before's); a small last
    slice joins the one before it.

    Args:
        plan: :func:`plan_slices`' slices.
        sizes: bytes of each feature file.
        min_bytes: the least feature log bytes of a slice.

    Returns:
        The merged plan.

    >>> plan = [(-1, 1, ["f0"], ["a0"]), (1, 2, ["f1"], ["a1"]), (2, 3, ["f2"], []),
    ...         (3, 9, ["f3"], ["a3"])]
    >>> merge_small_slices(plan, {"f0": 5, "f1": 5, "f2": 30, "f3": 1}, 10)
    [(-1, 2, ['f0', 'f1'], ['a0', 'a1']), (2, 9, ['f2', 'f3'], ['a3'])]
    """
    merged = []
    for lo, hi, fs, acts in plan:
        if merged and sum(sizes[f] for f in merged[-1][2]) < min_bytes:
            m_lo, _, m_fs, m_acts = merged[-1]
            merged[-1] = (m_lo, hi, m_fs + fs, m_acts + acts)
        else:
            merged.append((lo, hi, list(fs), list(acts)))
    # a small last slice joins the one before it
    if len(merged) > 1 and sum(sizes[f] for f in merged[-1][2]) < min_bytes:
        lo, hi, fs, acts = merged.pop()
        m_lo, _, m_fs, m_acts = merged[-1]
        merged[-1] = (m_lo, hi, m_fs + fs, m_acts + acts)
    return merged


def join_in_slices(options, opts, slice_s: float, build: Callable):
    """Joins a bounded input as a sequence of pipelines over event-time slices.

    Why: the DirectRunner runs a bounded pipeline stage after stage and fires event-time
    timers only at its end, so one pipeline holds every request in the joiner's state and
    every record between stages: memory grows with the input. A slice holds the requests
    served in its event time and the actions up to its end plus the join window: every
    request it serves closes in it, so each period's examples come from one slice, the same
    files as one pipeline's. It hands on to the next slice the actions of requests not served
    yet (the next slice may serve them; the last reports them unmatched) and any records of
    its files later than its end; and the keys of the requests it closed (16 bytes a
    request, :func:`transforms.joiner.closed_request_keys`), with which later slices tell
    their late actions and duplicate feature records from new ones. Side outputs are merged
    into one file per period and shard at the end, as one pipeline writes them. A file with
    records earlier than its name says, before its slice (they belong to a slice joined
    already), undoes the run: it returns None, for one pipeline to join the input.

    Args:
        options: the join's ``PipelineOptions``.
        opts: their ``dataflow.join.JoinOptions`` view.
        slice_s: event-time seconds per slice (rounded up to whole ``--period_s``).
        build: ``build(pipeline, opts, part)`` builds the join of slice ``part``
            (``dataflow.join.build``).

    Returns:
        The last pipeline's result, or None if the input does not slice (one slice, files
        whose names give no start: :func:`plan_slices`, or a non-local ``--out``) or the
        run was undone.
    """
    matched = FileSystems.match([opts.features])[0].metadata_list
    features = sorted(m.path for m in matched)
    actions = sorted(m.path for m in FileSystems.match([opts.actions])[0].metadata_list)
    period_ms = opts.period_s * 1000
    slice_ms = max(1, math.ceil(slice_s * 1000 / period_ms)) * period_ms
    window_ms = int(round(opts.join_window_s * 1000))
    plan = plan_slices(features, actions, slice_ms, window_ms)
    if plan is not None and opts.slice_min_bytes > 0:
        plan = merge_small_slices(plan, {m.path: m.size_in_bytes for m in matched},
                                  opts.slice_min_bytes)
    if plan is None or len(plan) == 1 or "://" in opts.out:
        if plan is None:
            _LOG.info("join: not sliced (a log file's name gives no start time)")
        return None  # (the slices' work folder is local)
    work = os.path.join(opts.out, ".slices")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    metrics_out, opts.metrics_out = opts.metrics_out, None
    closed = np.empty(0, dtype="S16")
    carry_in = closed_path = None
    metrics, result = [], None
    examples_before = set(example_files(os.path.join(opts.out, "examples")))
    try:
        for index, (lo, hi, feature_files, action_files) in enumerate(plan):
            part = Slice(index, lo, hi, window_ms, feature_files, action_files, work,
                         carry_in, closed_path)
            wall = time.time()
            result = run_job(lambda p: build(p, opts, part), options,
                             freeze_startup_heap=True)
            metrics.append(metrics_dict(result))
            early = metrics[-1]["counters"].get("join.records_before_their_slice", 0)
            if early:  # they belong to a slice joined already: undo, join in one pipeline
                _LOG.warning(
                    "join: %d records in %s are earlier than their file names say, in event "
                    "time joined already; joining again in one pipeline (memory grows with "
                    "the input; name log files by the start of their records)", early,
                    feature_files + action_files)
                for path in set(example_files(os.path.join(opts.out, "examples"))) - \
                        examples_before:
                    os.remove(path)
                shutil.rmtree(work)
                return None
            if carry_in:  # (a slice that hands nothing on writes no folder)
                shutil.rmtree(carry_in, ignore_errors=True)
            if not part.final:
                closed = _add_closed(closed, part.closed_out)
                closed_path = os.path.join(work, f"closed-{index:05d}.npy")
                np.save(closed_path, closed)
                if part.closed:
                    os.remove(part.closed)
                carry_in = part.carry_out
            _LOG.info("join: slice %d/%d (%s to %s) in %.1f s", index + 1, len(plan),
                      *(period_name(t / 1000) if math.isfinite(t) else str(t) for t in (lo, hi)),
                      time.time() - wall)
        for kind in SIDE_OUTPUTS:
            _merge_side_output(os.path.join(part.side, kind), os.path.join(opts.out, kind))
        shutil.rmtree(work)
    finally:
        opts.metrics_out = metrics_out
    summed = _sum_metrics(metrics)
    if metrics_out:
        with open(metrics_out, "w", encoding="utf-8") as f:
            strict_json.dump(summed, f, indent=2, sort_keys=True)
    return result


def _add_closed(closed: np.ndarray, folder: str) -> np.ndarray:
    """``closed`` (sorted keys) with the request ids of the JSON-lines files in ``folder``."""
    files = sorted(glob.glob(os.path.join(folder, "*.jsonl")))
    new = closed_request_keys(read_json_lines(files))
    return np.insert(closed, np.searchsorted(closed, new), new)


def _merge_side_output(src: str, dst: str) -> None:
    """The slices' files of one side output → ``dst``, one file per period and shard as one
    pipeline writes them (named by content: :func:`write_sorted_file`)."""
    groups: dict = {}
    for path in sorted(glob.glob(os.path.join(src, "*.jsonl"))):
        groups.setdefault(os.path.basename(path).rsplit("-", 1)[0], []).append(path)
    if groups:
        os.makedirs(dst, exist_ok=True)
    for prefix, paths in groups.items():
        if len(paths) == 1:
            os.replace(paths[0], os.path.join(dst, os.path.basename(paths[0])))
            continue
        write_sorted_file(dst, prefix, read_json_lines(paths), write_json_lines,
                          record_order, ".jsonl")


def _sum_metrics(runs: list) -> dict:
    """The metrics of a sliced join's pipelines as one pipeline's: counters summed, except
    that an action handed on to the next slice is counted once (``joiner.actions``) and
    unmatched only by the last slice; distributions combined."""
    out: dict = {"counters": {}, "distributions": {}}
    for m in runs:
        for name, value in m["counters"].items():
            out["counters"][name] = out["counters"].get(name, 0) + value
        for name, d in m["distributions"].items():
            have = out["distributions"].get(name)
            out["distributions"][name] = dict(d) if have is None else {
                "count": have["count"] + d["count"], "sum": have["sum"] + d["sum"],
                "min": min(have["min"], d["min"]), "max": max(have["max"], d["max"])}
    handed_on = sum(m["counters"].get("joiner.unmatched_actions", 0) for m in runs[:-1])
    c = out["counters"]
    for name in ("joiner.actions", "joiner.unmatched_actions"):
        if name in c:
            c[name] -= handed_on
    c.pop("join.records_before_their_slice", None)
    return out

