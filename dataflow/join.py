"""Join pipeline: feature log + action log → the example log that training reads.

    python -m dataflow join --features 'features/*.avro' --actions 'actions/*.avro' --out DIR
    python -m dataflow join ... --runner=FlinkRunner --flink_master=[local] --streaming

(On Flink, ``--streaming`` runs this job ~4x faster than Flink's batch mode on bounded
input; see benchmarks/join.py.)

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

import datetime
import hashlib
import heapq
import json
import logging
import os
import sys
import uuid
import zlib
from contextlib import ExitStack
from typing import Any, Callable, Iterator, Tuple

import apache_beam as beam
import fastavro
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import FixedWindows, TimestampedValue
from apache_beam.utils.timestamp import Duration

from dataflow.job import run_job
from dataflow.options import MonolithOptions, pipeline_options
from schemas import load_schema
from transforms.joiner import DEFAULT_JOIN_WINDOW_S, POSITIVE_ACTIONS, OnlineJoiner

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
                                          "duplicates/, invalid/")
        parser.add_argument("--join_window_s", type=float, default=DEFAULT_JOIN_WINDOW_S,
                            help="how long after serving (event time) an action still joins")
        parser.add_argument("--late_horizon_s", type=float, default=None,
                            help="how long after its window a request is remembered so that "
                                 "its late actions are told apart from unmatched ones "
                                 "(default: the join window)")
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
        parser.add_argument("--append", action="store_true",
                            help="allow an --out that already holds an example log (e.g. "
                                 "resuming a stream); otherwise it must be new or empty")


# --------------------------------------------------------------------------- inputs

def read_features(pipeline: beam.Pipeline, pattern: str, config=None):
    """``(feature records for the joiner, dead letters)``, stamped with serving time.

    With a feature ``config``, ``pattern`` names raw feature logs, read and extracted:
    ``ReadFeatureLogs(pattern) | ExtractFeatures(config)``. Without one it names Avro files
    of already-extracted records (:data:`EXTRACTED_FEATURES_SCHEMA`). The dead letters are
    both the reader's (damaged files, records without a usable event time) and the
    extractor's, each with its reason.
    """
    from transforms.sources import ReadAvroLogs, ReadFeatureLogs
    if config is None:
        return pipeline | "ReadFeatureRecords" >> ReadAvroLogs(pattern).with_dead_letters()
    from transforms.features import ExtractFeatures
    records, unreadable = pipeline | "ReadFeatureLogs" >> ReadFeatureLogs(
        pattern).with_dead_letters()
    extracted = records | "ExtractFeatures" >> ExtractFeatures(config)
    dead = (unreadable, extracted.dead_letter) | "FeatureDeadLetters" >> beam.Flatten()
    return extracted.features, dead


def read_actions(pipeline: beam.Pipeline, pattern: str):
    """``(action log records, dead letters)`` (schemas/action_log.avsc), stamped with their
    event time; a damaged file or record is dead-lettered, never fails the join."""
    from transforms.sources import ReadActionLogs
    return pipeline | "ReadActionLogs" >> ReadActionLogs(pattern).with_dead_letters()


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


def _example_order(record: dict):
    return record["ts_ms"], record["request_id"]


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
        f.write((json.dumps(r, sort_keys=True, default=repr) + "\n").encode("utf-8"))


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
        keyed = sorted(((self.sort_key(r), r) for r in records), key=lambda kr: kr[0])
        if not keyed:
            return
        digest = hashlib.sha1(repr([k for k, _ in keyed]).encode("utf-8")).hexdigest()[:8]
        period = period_name(window.start.micros / 1e6 - self.stamped_after_s)
        name = f"{period}-{shard:05d}-of-{self.shards:05d}-{digest}{self.suffix}"
        path = FileSystems.join(self.directory, name)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with FileSystems.create(tmp) as f:
            self.encode(f, [r for _, r in keyed])
        FileSystems.rename([tmp], [path])
        yield path


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
                         suffix=".avro", sort_key=_example_order,
                         stamped_after_s=join_window_s)


def example_files(pattern: str) -> list[str]:
    """The example files that ``pattern`` (a glob, or an example-log directory) names."""
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "*.avro")
    matches = FileSystems.match([pattern])[0].metadata_list
    return sorted(m.path for m in matches)


def read_examples_in_order(pattern) -> Iterator[dict]:
    """Every example in the files ``pattern`` names (a glob, a directory or a list of paths), in
    event-time order (ts_ms, then
    request_id), merging the files lazily: each file is sorted, so this holds one record
    per file in memory.

    >>> import tempfile
    >>> from schemas import write_avro
    >>> d = tempfile.mkdtemp()
    >>> ex = lambda rid, ts: {"request_id": rid, "ts_ms": ts, "user_id": "u", "item_id": "i",
    ...                       "fids": [], "label": 0}
    >>> _ = write_avro(f"{d}/a.avro", "example", [ex("a", 1), ex("c", 5)])
    >>> _ = write_avro(f"{d}/b.avro", "example", [ex("b", 3)])
    >>> [e["request_id"] for e in read_examples_in_order(d)]
    ['a', 'b', 'c']
    """
    paths = example_files(pattern) if isinstance(pattern, str) else sorted(pattern)
    with ExitStack() as stack:
        readers = [fastavro.reader(stack.enter_context(FileSystems.open(p))) for p in paths]
        yield from heapq.merge(*readers, key=_example_order)


# --------------------------------------------------------------------------- pipeline

def build(pipeline: beam.Pipeline, opts: JoinOptions) -> None:
    features, feature_dead = read_features(pipeline, opts.features, opts.config)
    actions, action_dead = read_actions(pipeline, opts.actions)
    joined = (features, actions) | "Join" >> OnlineJoiner(
        join_window_s=opts.join_window_s, negative_sample_rate=opts.negative_sample_rate,
        positive_actions=[a.strip() for a in opts.positive_actions.split(",") if a.strip()],
        late_horizon_s=opts.late_horizon_s, sampling_salt=opts.sampling_salt)
    out, period, shards = opts.out, opts.period_s, opts.shards_per_period
    joined.examples | "WriteExamples" >> WriteExampleLog(
        os.path.join(out, "examples"), opts.join_window_s, period, shards)
    joined.unmatched_actions | "WriteUnmatched" >> WriteEventTimeFiles(
        os.path.join(out, "unmatched"), period, shards)
    joined.late_actions | "WriteLate" >> WriteEventTimeFiles(
        os.path.join(out, "late"), period, shards)
    ((joined.duplicate_actions, joined.duplicate_features) | "Duplicates" >> beam.Flatten()
     | "WriteDuplicates" >> WriteEventTimeFiles(os.path.join(out, "duplicates"), period, 1))
    joined.invalid | "WriteInvalid" >> WriteEventTimeFiles(
        os.path.join(out, "invalid"), period, 1)
    ((feature_dead, action_dead) | "DeadLetters" >> beam.Flatten()
     | "WriteDeadLetter" >> WriteEventTimeFiles(os.path.join(out, "dead_letter"), period, 1))


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
    return run_job(lambda p: build(p, opts), options)


OPTIONS = [JoinOptions]

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
