"""Join pipeline: feature log + action log → the example log that training reads.

    python -m dataflow join --features 'features/*.avro' --actions 'actions/*.avro' --out DIR
    python -m dataflow join ... --runner=FlinkRunner --flink_master=[local] --streaming

(On Flink, ``--streaming`` runs this job ~4x faster than Flink's batch mode on bounded
input; see benchmarks/join.py.)

On the DirectRunner a bounded input is joined in event-time slices, one pipeline each: whole
hours (``--slice_s``) until a slice's feature logs hold 1 MiB (``--slice_min_bytes``;
:func:`join_in_slices`), because one pipeline would hold the whole input in memory: the output
is the same, memory follows a slice of logs plus the join window. With ``--streaming`` on
Flink the log files are read instead one at a time in the order their names' starts give, the
watermark moving to the next file's start after each (:func:`join_in_order`,
``--ordered_read``), so the joiner emits and forgets as the files go by in one job.

    feature records ──► OnlineJoiner ◄── action log (schemas/action_log.avsc)
                            │ examples, unmatched, late, duplicates, invalid
                            ▼
                 one file set per event-time period, each file sorted by ts_ms

``DIR`` afterwards (``PERIOD`` is the UTC start of an event-time period, e.g.
``20240101T130000Z`` with the default ``--period_s=3600``)::

    examples/PERIOD-SSSSS-of-NNNNN-DIGEST.avro
                                          training examples (schemas/example.avsc) of the
                                          requests *served* in PERIOD, sorted by (ts_ms,
                                          request_id); shards split a period by request id
    unmatched/PERIOD-...jsonl             actions whose request was never served
    late/PERIOD-...jsonl                  actions later than their join window
    duplicates/PERIOD-...jsonl            repeated actions and feature records
    invalid/PERIOD-...jsonl               records that failed validation, with the reason
    dead_letter/PERIOD-...jsonl           what could not be read or extracted (below)

Every folder is created, empty or not.

``DIGEST`` is a digest of the file's content. Side-output files are named by the period in
which the joiner classified their records. A batch run writes one file per period and
shard. A streaming run writes a period's files when the watermark passes its end (plus the
join window for examples); records that come later still go to extra files of the same
period and shard. :func:`read_examples_in_order` merges any set of example files into one
stream in event-time order.

Feature records: with ``--config``, ``--features`` are raw feature logs, extracted with
``ExtractFeatures``; without it, Avro files of already-extracted records
(:data:`EXTRACTED_FEATURES_SCHEMA`). See :func:`read_features`. What cannot be read (a damaged
file, a record without a usable event time) or extracted goes to ``dead_letter/`` with its
reason, for feature and action logs alike: a bad file never fails the join.
"""
from __future__ import annotations

if __name__ == "__main__":  # output set up before Beam and TensorFlow load (dataflow.cli)
    from dataflow.pipelines import pipeline_main
    raise SystemExit(pipeline_main("join"))

import datetime
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
import zlib
from typing import Any, Callable, NamedTuple, Tuple

import apache_beam as beam
import fastavro
import numpy as np
from apache_beam import pvalue
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from apache_beam.utils.timestamp import Duration, Timestamp

from dataflow.job import metrics_dict, run_job
from dataflow.options import MonolithOptions, pipeline_options
from schemas import load_schema, strict_json
from transforms.example_log import example_files, example_order
from transforms.joiner import (DEFAULT_JOIN_WINDOW_S, POSITIVE_ACTIONS, OnlineJoiner,
                               closed_request_keys)
from transforms.tail import log_file_start_ms

DEFAULT_SLICE_S = 3600
# ~100 MiB of the join's memory a MiB of (compressed) feature log, measured: one pipeline
# over the 100k stream's 5.8 MiB took ~570 MiB above the process's ~210 MiB at rest; an hour
# of the 400k stream's busiest (~1.9 MiB) 150-190 MiB (docs/experiments.md §5)
DEFAULT_SLICE_MIN_BYTES = 1 << 20

# What ExtractFeatures outputs, as an Avro record (the input format of --features for now).
EXTRACTED_FEATURES_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "ExtractedFeatures", "namespace": "beam_monolith",
    "doc": "A served request after feature extraction: the joiner's feature input.",
    "fields": [
        {"name": "request_id", "type": "string"},
        {"name": "ts_ms", "type": "long"},
        {"name": "user_id", "type": "string"},
        {"name": "item_id", "type": "string"},
        {"name": "fids", "type": {"type": "array", "items": "long"}},
        {"name": "dense", "type": {"type": "array", "items": "float"}, "default": []},
        {"name": "served_score", "type": ["null", "double"], "default": None},
        {"name": "true_ctr", "type": ["null", "double"], "default": None},
    ]})


class JoinOptions(MonolithOptions):
    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--features", help="glob of feature log Avro files "
                                               "(schemas/feature_log.avsc; with --config) or of "
                                               "already-extracted records (without it)")
        parser.add_argument("--config", default=None,
                            help="feature config (YAML path or a name in schemas/configs): "
                                 "extract fids from raw feature logs; records that cannot be "
                                 "extracted go to dead_letter/ with the reason")
        parser.add_argument("--actions", help="glob of action log Avro files "
                                              "(schemas/action_log.avsc)")
        parser.add_argument("--out", help="output directory: examples/, unmatched/, late/, "
                                          "duplicates/, invalid/, dead_letter/ (each created, "
                                          "empty or not)")
        parser.add_argument("--join_window_s", type=float, default=DEFAULT_JOIN_WINDOW_S,
                            help="how long after serving (event time) an action still joins")
        parser.add_argument("--late_horizon_s", type=float, default=None,
                            help="how long after its window a request is remembered so that "
                                 "its late actions are told apart from unmatched ones "
                                 "(default: the join window; with --ordered_read, until the "
                                 "input ends, as a one-read join whose timers fire at its "
                                 "end: a small tombstone a request)")
        parser.add_argument("--negative_sample_rate", type=float, default=1.0,
                            help="probability of keeping a negative example (by request id "
                                 "hash); kept ones carry sample_weight = 1/rate")
        parser.add_argument("--sampling_salt", default="",
                            help="changes which negatives are kept, still deterministically")
        parser.add_argument("--positive_actions", default=",".join(sorted(POSITIVE_ACTIONS)),
                            help="comma-separated actions that make an example positive")
        parser.add_argument("--period_s", type=int, default=3600,
                            help="event-time period of one set of output files")
        parser.add_argument("--shards_per_period", type=int, default=1,
                            help="files per period (split by request id)")
        parser.add_argument("--slice_s", type=float, default=None,
                            help="join a bounded input as a sequence of pipelines, one per "
                                 "slice of this much event time (rounded up to whole "
                                 "--period_s), handing on what a slice leaves open, so that "
                                 "memory follows a slice, not the input; the output is the "
                                 "same as one pipeline's. Needs log files named by the start "
                                 "of their records (part-YYYYmmdd-HH[MMSS].avro, as "
                                 "dataflow.data, serve and simulate write them). Default: "
                                 f"{DEFAULT_SLICE_S} on the DirectRunner, 0 (one pipeline) on "
                                 "other runners or with --streaming")
        parser.add_argument("--slice_min_bytes", type=int, default=DEFAULT_SLICE_MIN_BYTES,
                            help="a slice takes in whole --slice_s steps until its feature "
                                 "log files hold at least this many bytes, so small inputs "
                                 "stay one pipeline (each costs ~1 s of Beam's fixed cost); "
                                 "0: every --slice_s is a slice")
        parser.add_argument("--ordered_read", choices=("auto", "on", "off"), default="auto",
                            help="read the log files one at a time in the order of the start "
                                 "their names give (part-YYYYmmdd-HH[MMSS].avro), the "
                                 "watermark moving to the next file's start after each, so "
                                 "that a streaming runner's joiner emits and forgets as it "
                                 "goes and memory follows the join window, not the input "
                                 "(join_in_order). auto: on with --streaming on runners other "
                                 "than the DirectRunner (whose bounded run fires timers only "
                                 "at its end anyway). Names without a start, or records "
                                 "earlier than their file's name says, join in one read "
                                 "instead, with a warning")
        parser.add_argument("--append", action="store_true",
                            help="allow an --out that already holds an example log (e.g. "
                                 "resuming a stream); otherwise it must be new or empty")


# --------------------------------------------------------------------------- inputs

def _read_logs(pipeline: beam.Pipeline, label: str, patterns, reader, ordered=False):
    """``(records, dead letters)`` of one glob or of a list of them (each read apart);
    ``ordered``: a glob read a file at a time in event-time order (:func:`join_in_order`)."""
    if ordered:
        from transforms.tail import TailAvroLogs
        return pipeline | label >> TailAvroLogs(patterns, read_once=True).with_dead_letters()
    if isinstance(patterns, str):
        return pipeline | label >> reader(patterns).with_dead_letters()
    if not patterns:
        return tuple(pipeline | f"{label}{name}" >> beam.Create([])
                     for name in ("Records", "DeadLetters"))
    reads = [pipeline | f"{label}{i}" >> reader(p).with_dead_letters()
             for i, p in enumerate(patterns)]
    return tuple([r[k] for r in reads] | f"{label}{name}" >> beam.Flatten()
                 for k, name in ((0, "Records"), (1, "DeadLetters")))


def read_features(pipeline: beam.Pipeline, pattern, config=None, ordered: bool = False):
    """``(feature records for the joiner, dead letters)``, stamped with serving time.

    With a feature ``config``, ``pattern`` (a glob or a list of them) names raw feature logs,
    read and extracted: ``ReadFeatureLogs(pattern) | ExtractFeatures(config)``. Without one
    it names Avro files of already-extracted records (:data:`EXTRACTED_FEATURES_SCHEMA`). The
    dead letters are both the reader's (damaged files, records without a usable event time)
    and the extractor's, each with its reason. ``ordered``: see :func:`join_in_order`.
    """
    from transforms.sources import ReadAvroLogs, ReadFeatureLogs
    if config is None:
        return _read_logs(pipeline, "ReadFeatureRecords", pattern, ReadAvroLogs, ordered)
    from transforms.features import ExtractFeatures
    records, unreadable = _read_logs(pipeline, "ReadFeatureLogs", pattern, ReadFeatureLogs,
                                     ordered)
    extracted = records | "ExtractFeatures" >> ExtractFeatures(config)
    dead = (unreadable, extracted.dead_letter) | "FeatureDeadLetters" >> beam.Flatten()
    return extracted.features, dead


def read_actions(pipeline: beam.Pipeline, pattern, ordered: bool = False):
    """``(action log records, dead letters)`` (schemas/action_log.avsc) of a glob or a list
    of them, stamped with their event time; a damaged file or record is dead-lettered,
    never fails the join."""
    from transforms.sources import ReadActionLogs
    return _read_logs(pipeline, "ReadActionLogs", pattern, ReadActionLogs, ordered)


# --------------------------------------------------------------------------- outputs

def period_name(start_s: float) -> str:
    """``20240101T130000Z``: the UTC start of an event-time period, sortable as text."""
    return datetime.datetime.fromtimestamp(start_s, datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ")


class _ClampTimestamp(beam.DoFn):
    """Elements without a usable event time (before 1970, e.g. Beam's minimum timestamp on
    a record whose ts_ms was invalid) go to the first period instead of failing the write."""

    def process(self, record, timestamp=beam.DoFn.TimestampParam):
        yield record if timestamp.micros >= 0 else TimestampedValue(record, 0)


def _record_order(record: dict):
    """Event-time order for side-output records of any shape (invalid ones included)."""
    ts_ms = record.get("ts_ms") if isinstance(record, dict) else None
    ts_ms = ts_ms if isinstance(ts_ms, int) else -1
    return ts_ms, json.dumps(record, sort_keys=True, default=repr)


def _request_shard(record, shards: int) -> int:
    rid = record.get("request_id") if isinstance(record, dict) else None
    return zlib.crc32(rid.encode("utf-8")) % shards if isinstance(rid, str) else 0


def avro_encoder(schema_name: str) -> Callable:
    schema = load_schema(schema_name)

    def write(f, records):
        fastavro.writer(f, schema, records, codec="deflate")
    return write


def write_json_lines(f, records) -> None:
    for r in records:
        f.write((strict_json.dumps(r, sort_keys=True, default=repr) + "\n").encode("utf-8"))


def _write_carried_lines(f, records) -> None:
    """JSON lines that keep NaN and infinity (Python's ``json`` reads them back): what a
    slice hands on to the next must stay as it was, e.g. a record invalid for its NaN score
    must not come back valid with a null one. Work files only, never output."""
    for r in records:
        f.write((json.dumps(r, sort_keys=True, default=repr) + "\n").encode("utf-8"))


def read_json_lines(paths) -> list:
    """The records of JSON-lines files (what :func:`write_json_lines` wrote), in order."""
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            records += json.loads("[" + ",".join(f.read().splitlines()) + "]")
    return records


class _WriteSortedFile(beam.DoFn):
    """(shard, records) of one window pane → one file, sorted, named by the window's period
    and a digest of its content: ``PERIOD-SSSSS-of-NNNNN-DIGEST.suffix``.

    Why a digest and not the pane index: a streaming run fires a window more than once (late
    records come in later panes), and Flink's portable runner (Beam 2.62) reports every pane
    as the first, on-time one — and fires an extra *empty* pane at the window's garbage
    collection. Named by content, a retried write replaces its own file and never another
    pane's; empty panes write nothing. Files are written under a temporary name and renamed,
    so a reader never sees half a file.
    """

    def __init__(self, directory, suffix, encode, sort_key, shards, stamped_after_s):
        self.directory, self.suffix, self.encode = directory, suffix, encode
        self.sort_key, self.shards = sort_key, shards
        self.stamped_after_s = stamped_after_s

    def process(self, element, window=beam.DoFn.WindowParam):
        shard, records = element
        period = period_name(window.start.micros / 1e6 - self.stamped_after_s)
        path = write_sorted_file(self.directory, f"{period}-{shard:05d}-of-{self.shards:05d}",
                                 records, self.encode, self.sort_key, self.suffix)
        if path is not None:
            yield path


def write_sorted_file(directory: str, prefix: str, records, encode: Callable,
                      sort_key: Callable, suffix: str) -> str | None:
    """``records`` sorted by ``sort_key`` → ``directory/PREFIX-DIGEST.suffix`` (DIGEST: of
    the sort keys), written under a temporary name and renamed; None if there are none."""
    keyed = sorted(((sort_key(r), r) for r in records), key=lambda kr: kr[0])
    if not keyed:
        return None
    digest = hashlib.sha1(repr([k for k, _ in keyed]).encode("utf-8")).hexdigest()[:8]
    path = FileSystems.join(directory, f"{prefix}-{digest}{suffix}")
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with FileSystems.create(tmp) as f:
        encode(f, [r for _, r in keyed])
    FileSystems.rename([tmp], [path])
    return path


class WriteEventTimeFiles(beam.PTransform):
    """Records → files, one set per event-time period, each file sorted by ``sort_key``.

    Periods are windows of the element timestamps. ``stamped_after_s`` says how long after
    the period their timestamps are (the joiner stamps an example ``join_window`` after its
    ``ts_ms``), so that the windows and the file names follow the records' own event time.
    Returns the written paths.
    """

    def __init__(self, directory: str, period_s: int = 3600, shards: int = 1,
                 encode: Callable = write_json_lines, suffix: str = ".jsonl",
                 sort_key: Callable = _record_order, stamped_after_s: float = 0.0,
                 allowed_lateness_s: float = 7 * 24 * 3600):
        super().__init__()
        self.directory, self.period_s, self.shards = directory, period_s, shards
        self.encode, self.suffix, self.sort_key = encode, suffix, sort_key
        self.stamped_after_s = stamped_after_s
        self.allowed_lateness_s = allowed_lateness_s

    def expand(self, records):
        shards = self.shards
        return (records
                | "ClampTime" >> beam.ParDo(_ClampTimestamp())
                | "Periods" >> beam.WindowInto(
                    FixedWindows(self.period_s, self.stamped_after_s % self.period_s),
                    allowed_lateness=Duration(seconds=self.allowed_lateness_s))
                | "KeyByShard" >> beam.Map(lambda r: (_request_shard(r, shards), r))
                .with_output_types(Tuple[int, Any])
                | "GroupByShard" >> beam.GroupByKey()
                | "WriteSorted" >> beam.ParDo(_WriteSortedFile(
                    self.directory, self.suffix, self.encode, self.sort_key, shards,
                    self.stamped_after_s)))


class WriteExampleLog(WriteEventTimeFiles):
    """Examples from :class:`OnlineJoiner` → ``directory/PERIOD-SSSSS-of-NNNNN-DIGEST.avro``."""

    def __init__(self, directory: str, join_window_s: float, period_s: int = 3600,
                 shards: int = 1):
        super().__init__(directory, period_s, shards, encode=avro_encoder("example"),
                         suffix=".avro", sort_key=example_order,
                         stamped_after_s=join_window_s)


def build(pipeline: beam.Pipeline, opts: JoinOptions, part: "_Slice | None" = None,
          ordered: bool = False) -> None:
    """The join pipeline over ``opts``' inputs, or over one slice of them (``part``, see
    :func:`join_in_slices`); ``ordered``: read a file at a time in event-time order (see
    :func:`join_in_order`)."""
    sliced = part is not None
    features, feature_dead = read_features(
        pipeline, part.feature_files if sliced else opts.features, opts.config, ordered)
    actions, action_dead = read_actions(pipeline, part.action_files if sliced else opts.actions,
                                        ordered)
    horizon = opts.late_horizon_s
    if ordered and horizon is None:
        horizon = math.inf  # what one read's join does, whose timers all fire at its end
    if sliced:
        features, actions, later = _route_slice(pipeline, part, features, actions)
    joined = (features, actions) | "Join" >> OnlineJoiner(
        join_window_s=opts.join_window_s, negative_sample_rate=opts.negative_sample_rate,
        positive_actions=[a.strip() for a in opts.positive_actions.split(",") if a.strip()],
        late_horizon_s=horizon, sampling_salt=opts.sampling_salt,
        closed_requests=part.closed if sliced else None)
    out, period, shards = opts.out, opts.period_s, opts.shards_per_period
    side = part.side if sliced else out  # a slice's side outputs are merged at the end
    joined.examples | "WriteExamples" >> WriteExampleLog(
        os.path.join(out, "examples"), opts.join_window_s, period, shards)
    if not sliced or part.final:
        joined.unmatched_actions | "WriteUnmatched" >> WriteEventTimeFiles(
            os.path.join(side, "unmatched"), period, shards)
    else:  # not served yet: perhaps later, so the next slice joins them again
        ((joined.unmatched_actions, later["actions"]) | "Unserved" >> beam.Flatten()
         | "CarryActions" >> WriteEventTimeFiles(os.path.join(part.carry_out, "actions"),
                                                 period, encode=_write_carried_lines))
        later["features"] | "CarryFeatures" >> WriteEventTimeFiles(
            os.path.join(part.carry_out, "features"), period, encode=_write_carried_lines)
        joined.closed | "WriteClosed" >> WriteEventTimeFiles(part.closed_out, period)
    joined.late_actions | "WriteLate" >> WriteEventTimeFiles(
        os.path.join(side, "late"), period, shards)
    ((joined.duplicate_actions, joined.duplicate_features) | "Duplicates" >> beam.Flatten()
     | "WriteDuplicates" >> WriteEventTimeFiles(os.path.join(side, "duplicates"), period, 1))
    joined.invalid | "WriteInvalid" >> WriteEventTimeFiles(
        os.path.join(side, "invalid"), period, 1)
    ((feature_dead, action_dead) | "DeadLetters" >> beam.Flatten()
     | "WriteDeadLetter" >> WriteEventTimeFiles(os.path.join(side, "dead_letter"), period, 1))


# --------------------------------------------------------------------------- slices

_SIDE_OUTPUTS = ("unmatched", "late", "duplicates", "invalid", "dead_letter")
_LOG = logging.getLogger(__name__)


class _Slice(NamedTuple):
    """One pipeline of a sliced join: the requests served in ``[lo_ms, hi_ms)`` and the
    actions of ``[lo_ms + window, hi_ms + window)``, read from the files first needed here
    and from what the slice before handed on (``carry_in``)."""
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


def _route_slice(pipeline, part: _Slice, features, actions):
    """``(features here, actions here, {"features": later, "actions": later})``: a slice's
    records from its files and from the slice before, routed by event time."""
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


def plan_slices(feature_files, action_files, slice_ms: int, window_ms: int) -> list | None:
    """``[(lo_ms, hi_ms, feature files, action files)]``: the slices of a sliced join, each
    reading the files whose name-given start falls in its range (features ``[lo, hi)``,
    actions ``[lo + window, hi + window)``); the first starts at -inf, the last ends at
    +inf; a stretch without feature files joins the slice after it. None if a file's name
    gives no start (then the join runs as one pipeline).

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
    """Adjacent slices of ``plan`` (:func:`plan_slices`) joined into one until its feature
    files hold ``min_bytes`` (``sizes``: bytes of each file); valid because a slice's
    feature and action ranges continue the one before's.

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


def join_in_slices(options, opts: JoinOptions, slice_s: float):
    """Joins a bounded input as a sequence of pipelines over event-time slices; returns the
    last one's result, or None if the input does not slice (one slice, or files whose names
    give no start: :func:`plan_slices`).

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
            part = _Slice(index, lo, hi, window_ms, feature_files, action_files, work,
                          carry_in, closed_path)
            wall = time.time()
            result = run_job(lambda p: build(p, opts, part), options)
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
        for kind in _SIDE_OUTPUTS:
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
                          _record_order, ".jsonl")


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


# --------------------------------------------------------------------------- in order

def join_in_order(options, opts: JoinOptions):
    """Joins a bounded input in one streaming pipeline that reads the log files one at a time
    in event-time order; returns its result, or None if the input cannot be read so (then
    one read joins it: the caller's fallback).

    Why: a bounded read (``ReadAvroLogs``) holds the watermark until every file is read, so
    on a streaming runner the joiner's timers fire only at the end and the job holds the
    whole input (Flink ``--streaming``: 1.7 GiB at 100k requests, 4.8 GiB at 400k). Here each
    log is read by ``TailAvroLogs(read_once=True)``: a file a call, after which the watermark
    moves to the next file's name-given start and the runner takes it; so windows close,
    examples are written and the joiner's state is freed as the files go by, and the job
    ends after the last file. The joiner remembers a closed request (a small tombstone) until
    the input ends unless ``--late_horizon_s`` is given, so late actions and repeated feature
    records mean what they do in one read, whose timers all fire at its end.

    It needs log files named by the start of their records (``part-YYYYmmdd-HH[MMSS].avro``,
    :func:`transforms.sources.log_file_start_ms`); other names: None (with a warning). A
    record earlier than the watermark when it is read (earlier than its file's name says)
    would be late for the joiner and change the output: the reader counts it
    (``sources.records_behind_watermark``), and the run is undone (the files it added to
    ``--out`` are removed) and None returned.
    """
    inputs = {kind: [m.path for m in FileSystems.match([pattern])[0].metadata_list]
              for kind, pattern in (("features", opts.features), ("actions", opts.actions))}
    unnamed = [p for paths in inputs.values() for p in paths if log_file_start_ms(p) is None]
    if not all(inputs.values()) or unnamed:
        _LOG.warning("join: not read in event-time order (%s): one read joins the input, and "
                     "on a streaming runner it holds all of it in memory; name log files by "
                     "the start of their records (part-YYYYmmdd-HH[MMSS].avro)",
                     f"{len(unnamed)} log files, e.g. {unnamed[0]}, have names that give no "
                     "start" if unnamed else "a glob matches no file")
        return None
    before = _output_files(opts.out)
    result = run_job(lambda p: build(p, opts, ordered=True), options)
    behind = metrics_dict(result)["counters"].get("sources.records_behind_watermark", 0)
    if behind:
        _LOG.warning("join: %d log records are earlier than their file names say (late for the "
                     "joiner, the output would change); joining again in one read (on a "
                     "streaming runner it holds the whole input in memory)", behind)
        added = sorted(_output_files(opts.out) - before)
        if added:
            FileSystems.delete(added)
        return None
    return result


def _output_files(out: str) -> set:
    """The files of a join's output folders (local or not)."""
    return {m.path for kind in ("examples",) + _SIDE_OUTPUTS
            for m in FileSystems.match([FileSystems.join(out, kind, "*")])[0].metadata_list}


def _make_output_folders(out: str) -> None:
    """Every output folder, also those that stay empty (a script may list them); before the
    run, so that each way of joining has them."""
    for kind in ("examples",) + _SIDE_OUTPUTS:
        path = FileSystems.join(out, kind)
        if not FileSystems.exists(path):
            FileSystems.mkdirs(path)


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    options = pipeline_options(argv, JoinOptions)
    opts = options.view_as(JoinOptions)
    if not opts.features or not opts.actions or not opts.out:
        raise SystemExit("join: --features, --actions and --out are required (see --help)")
    if not opts.append and example_files(os.path.join(opts.out, "examples", "*")):
        # Files are named by content: a run with other input or options would not replace
        # an earlier run's files but add to them.
        raise SystemExit(f"join: {opts.out}/examples already holds an example log; use a "
                         "new --out, or --append to add to it")
    _make_output_folders(opts.out)
    standard = options.view_as(StandardOptions)
    direct = (standard.runner or "DirectRunner").rsplit(".", 1)[-1] == "DirectRunner"
    ordered = opts.ordered_read == "on" or (opts.ordered_read == "auto" and standard.streaming
                                            and not direct)
    slice_s = opts.slice_s
    if slice_s is None:
        slice_s = DEFAULT_SLICE_S if direct and not standard.streaming and not ordered else 0
    if slice_s > 0:
        result = join_in_slices(options, opts, slice_s)
        if result is not None:
            return result
    elif ordered:
        result = join_in_order(options, opts)
        if result is not None:
            return result
    return run_job(lambda p: build(p, opts), options)


OPTIONS = [JoinOptions]
USAGE = "--features FEATURES --actions ACTIONS --out OUT [options]"
