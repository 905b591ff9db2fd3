"""Join pipeline: feature log + action log → the example log that training reads.

    python -m dataflow join --features 'features/*.avro' --actions 'actions/*.avro' --out DIR
    python -m dataflow join ... --runner=FlinkRunner --flink_master=[local] --streaming

(On Flink, ``--streaming`` runs this job ~4x faster than Flink's batch mode on bounded
input; see benchmarks/join.py.)

On the DirectRunner a bounded input is joined in event-time slices, one pipeline each: whole
hours (``--slice_s``) until a slice's feature logs hold 1 MiB (``--slice_min_bytes``;
``dataflow.join_slices``), because one pipeline would hold the whole input in memory: the
output is the same, memory follows a slice of logs plus the join window. With
``--streaming`` on Flink the log files are read instead one at a time in the order their
names' starts give, the watermark moving to the next file's start after each
(``--ordered_read``; ``dataflow.join_ordered``), so the joiner emits and forgets as the
files go by in one job.

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
period and shard (``transforms.event_time_files``).
:func:`transforms.example_log.read_examples_in_order` merges any set of example files into
one stream in event-time order.

Feature records: with ``--config``, ``--features`` are raw feature logs, extracted with
``ExtractFeatures``; without it, Avro files of already-extracted records
(:data:`dataflow.join_io.EXTRACTED_FEATURES_SCHEMA`). See
:func:`dataflow.join_io.read_features`. What cannot be read (a damaged
file, a record without a usable event time) or extracted goes to ``dead_letter/`` with its
reason, for feature and action logs alike: a bad file never fails the join.
"""
from __future__ import annotations

if __name__ == "__main__":  # output set up before Beam and TensorFlow load (dataflow.cli)
    from dataflow.pipelines import pipeline_main
    raise SystemExit(pipeline_main("join"))

import math
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

from dataflow.job import run_job
from dataflow.join_io import make_output_folders, read_actions, read_features
from dataflow.join_ordered import join_in_order
from dataflow.join_slices import (DEFAULT_SLICE_MIN_BYTES, DEFAULT_SLICE_S, Slice,
                                  hand_on, join_in_slices, route_slice)
from dataflow.options import MonolithOptions, parse_pipeline_args
from transforms.event_time_files import WriteEventTimeFiles
from transforms.example_log import WriteExampleLog, example_files
from transforms.joiner import DEFAULT_JOIN_WINDOW_S, POSITIVE_ACTIONS, OnlineJoiner


class JoinOptions(MonolithOptions):
    """The join's flags (``python -m dataflow join --help``); none is required here, as Beam
    parses every options class with every pipeline: :func:`main` checks them.

    >>> from dataflow.options import pipeline_options
    >>> opts = pipeline_options(["--features=f/*.avro", "--actions=a/*.avro", "--out=out/j",
    ...                          "--join_window_s=300"], JoinOptions).view_as(JoinOptions)
    >>> opts.join_window_s, opts.period_s, opts.ordered_read
    (300.0, 3600, 'auto')
    """

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




def build(pipeline: beam.Pipeline, opts: JoinOptions, part: Slice | None = None,
          ordered: bool = False) -> None:
    """The join pipeline: inputs → ``OnlineJoiner`` → the example log and side outputs.

    Args:
        pipeline: the pipeline to build in.
        opts: the join's options.
        part: one slice of the input to join (``dataflow.join_slices``), or None: all of it.
        ordered: read the logs a file at a time in event-time order
            (``dataflow.join_ordered``).
    """
    sliced = part is not None
    features, feature_dead = read_features(
        pipeline, part.feature_files if sliced else opts.features, opts.config, ordered)
    actions, action_dead = read_actions(pipeline, part.action_files if sliced else opts.actions,
                                        ordered)
    horizon = opts.late_horizon_s
    if ordered and horizon is None:
        horizon = math.inf  # what one read's join does, whose timers all fire at its end
    if sliced:
        features, actions, later = route_slice(pipeline, part, features, actions)
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
        hand_on(part, joined, later, period)
    joined.late_actions | "WriteLate" >> WriteEventTimeFiles(
        os.path.join(side, "late"), period, shards)
    ((joined.duplicate_actions, joined.duplicate_features) | "Duplicates" >> beam.Flatten()
     | "WriteDuplicates" >> WriteEventTimeFiles(os.path.join(side, "duplicates"), period, 1))
    joined.invalid | "WriteInvalid" >> WriteEventTimeFiles(
        os.path.join(side, "invalid"), period, 1)
    ((feature_dead, action_dead) | "DeadLetters" >> beam.Flatten()
     | "WriteDeadLetter" >> WriteEventTimeFiles(os.path.join(side, "dead_letter"), period, 1))


def main(argv: list[str] | None = None):
    """``python -m dataflow join``: joins the logs ``argv`` names (see the module docstring).

    Args:
        argv: the flags (None: ``sys.argv[1:]``).

    Returns:
        The (last) pipeline's result.
    """
    options, opts = parse_pipeline_args(argv, JoinOptions, ("features", "actions", "out"),
                                        "join")
    if not opts.append and example_files(os.path.join(opts.out, "examples", "*")):
        # Files are named by content: a run with other input or options would not replace
        # an earlier run's files but add to them.
        raise SystemExit(f"join: {opts.out}/examples already holds an example log; use a "
                         "new --out, or --append to add to it")
    make_output_folders(opts.out)
    standard = options.view_as(StandardOptions)
    direct = (standard.runner or "DirectRunner").rsplit(".", 1)[-1] == "DirectRunner"
    ordered = opts.ordered_read == "on" or (opts.ordered_read == "auto" and standard.streaming
                                            and not direct)
    slice_s = opts.slice_s
    if slice_s is None:
        slice_s = DEFAULT_SLICE_S if direct and not standard.streaming and not ordered else 0
    if slice_s > 0:
        result = join_in_slices(options, opts, slice_s, build)
        if result is not None:
            return result
    elif ordered:
        result = join_in_order(options, opts, build)
        if result is not None:
            return result
    return run_job(lambda p: build(p, opts), options, freeze_startup_heap=True)


OPTIONS = [JoinOptions]
USAGE = "--features FEATURES --actions ACTIONS --out OUT [options]"
