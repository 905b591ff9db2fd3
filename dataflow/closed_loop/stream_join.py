"""The loop's join as one streaming job over the tailed log folders (``--join stream``, Flink
only; ``python -m dataflow.loop stream-join``): :func:`build_stream_join`.
"""
from __future__ import annotations

import os
import time

import apache_beam as beam

from dataflow.job import run_job
from dataflow.options import MonolithOptions, parse_pipeline_args
from transforms.event_time_files import WriteEventTimeFiles
from transforms.example_log import WriteExampleLog
from transforms.features import ExtractFeatures
from transforms.joiner import OnlineJoiner
from transforms.tail import TailAvroLogs

__all__ = ["build_stream_join", "main"]


# no annotations: Beam reads a callable's (strings here) and logs that it uses Any
def _write_started(path):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{time.time():.3f}\n")
    os.replace(tmp, path)


def build_stream_join(pipeline, opts) -> None:
    """The join as one streaming pipeline over the tailed log folders (for Flink): the same
    transforms as ``dataflow.join``, with ``TailAvroLogs`` (event-time watermarks).

    Args:
        pipeline: the pipeline to build in.
        opts: the ``stream-join`` options (:func:`main`).
    """
    stop = time.time() + opts.stop_after_s
    extracted = (pipeline
                 | "TailFeatureLog" >> TailAvroLogs(f"{opts.features}/part-*.avro",
                                                    opts.poll_s, stop_timestamp=stop,
                                                    stop_when_exists=opts.stop_when_exists)
                 | "ExtractFeatures" >> ExtractFeatures(opts.config))
    actions = pipeline | "TailActionLog" >> TailAvroLogs(f"{opts.actions}/part-*.avro",
                                                         opts.poll_s, stop_timestamp=stop,
                                                         stop_when_exists=opts.stop_when_exists)
    if opts.started_file:  # runs once the runner executes the job, not when it accepts it
        _ = (pipeline | "Started" >> beam.Create([opts.started_file])
             | "WriteStarted" >> beam.Map(_write_started))
    joined = (extracted.features, actions) | "Join" >> OnlineJoiner(
        join_window_s=opts.join_window_s, negative_sample_rate=opts.negative_sample_rate)
    joined.examples | "WriteExamples" >> WriteExampleLog(opts.examples, opts.join_window_s,
                                                         opts.period_s)
    extracted.dead_letter | "WriteDeadLetter" >> WriteEventTimeFiles(
        os.path.join(opts.dead_letter, "dead_letter"), opts.period_s)


def main(argv: list) -> int:
    """``python -m dataflow.loop stream-join``: runs :func:`build_stream_join` until its
    sources stop.

    Args:
        argv: the flags (after ``stream-join``).

    Returns:
        0.
    """
    # Beam parses every options class with every pipeline: no required=True here.
    class StreamJoinOptions(MonolithOptions):
        @classmethod
        def _add_argparse_args(cls, parser):
            parser.add_argument("--features", help="feature log folder")
            parser.add_argument("--actions", help="action log folder")
            parser.add_argument("--examples", help="example log folder (training follows it)")
            parser.add_argument("--dead_letter", help="folder for dead_letter/")
            parser.add_argument("--config", default="synthetic")
            parser.add_argument("--join_window_s", type=float, default=300.0)
            parser.add_argument("--period_s", type=int, default=120)
            parser.add_argument("--negative_sample_rate", type=float, default=1.0)
            parser.add_argument("--stop_after_s", type=float, default=600.0,
                                help="stop listing the folders after this many wall seconds")
            parser.add_argument("--stop_when_exists", default=None,
                                help="stop listing the folders once this file exists (the "
                                     "writer creates it after its last log file landed)")
            parser.add_argument("--started_file", default=None,
                                help="write this file once the job runs")
            parser.add_argument("--poll_s", type=float, default=0.5)

    options, opts = parse_pipeline_args(
        argv, StreamJoinOptions, ("features", "actions", "examples", "dead_letter"),
        "stream-join")
    run_job(lambda p: build_stream_join(p, opts), options)
    return 0
