"""Smoke pipeline: the plumbing of the real system on a toy job.

Avro events in → event-time timestamps → keyed by (user, time bucket) → a stateful DoFn
with a bag state and an event-time timer → one JSON line per (user, bucket) out.

It uses what the training system needs (fastavro-backed Avro reads, keyed state, event-time
timers that fire once the watermark passes, state cleared when its window ends) and its
output does not depend on bundling or arrival order, so tests assert it exactly on the
DirectRunner (batch and ``TestStream``), Flink ``[local]`` and a standalone Flink cluster.

    python -m dataflow smoke --input 'events/*.avro' --out out/buckets
    python -m dataflow smoke --input ... --out ... --runner=FlinkRunner --flink_master=[local]
"""
from __future__ import annotations

if __name__ == "__main__":  # output set up before Beam and TensorFlow load (dataflow.cli)
    from dataflow.pipelines import pipeline_main
    raise SystemExit(pipeline_main("smoke"))

import logging
import sys
from typing import Any, Dict, Tuple

import apache_beam as beam
from apache_beam.coders import FloatCoder
from apache_beam.io.avroio import ReadFromAvro
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from dataflow.job import run_job
from dataflow.options import MonolithOptions, pipeline_options
from schemas import strict_json

_LOG = logging.getLogger(__name__)


class SmokeOptions(MonolithOptions):
    """The smoke pipeline's flags (``python -m dataflow smoke --help``).

    >>> opts = pipeline_options(["--input=events/*.avro", "--out=out/buckets"],
    ...                         SmokeOptions).view_as(SmokeOptions)
    >>> opts.input, opts.bucket_seconds
    ('events/*.avro', 60)
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", help="glob of Avro files (schemas/smoke_event.avsc)")
        parser.add_argument("--out", help="output path prefix for JSON-lines shards")
        parser.add_argument("--bucket_seconds", type=int, default=60,
                            help="event-time bucket width")


class BucketSummaryFn(beam.DoFn):
    """Buffers values per (user, bucket) key; emits their count and sum when the bucket ends.

    The timer is set to the bucket's end in event time, so it fires once the watermark has
    passed every event of the bucket; the state is then cleared, so state per key never
    outlives its bucket.

    Args:
        bucket_ms: the buckets' width, event-time ms.

    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> with beam.Pipeline() as p:
    ...     summaries = (p | beam.Create([(("u1", 0), {"value": 1.5}), (("u1", 0), {"value": 2.0})])
    ...                  .with_output_types(Tuple[Tuple[str, int], Dict[str, Any]])
    ...                  | beam.ParDo(BucketSummaryFn(bucket_ms=60_000)))
    ...     _ = assert_that(summaries, equal_to(
    ...         [{"user": "u1", "bucket_start_ms": 0, "count": 2, "total": 3.5}]))
    """
    VALUES = BagStateSpec("values", FloatCoder())
    FLUSH = TimerSpec("flush", TimeDomain.WATERMARK)

    def __init__(self, bucket_ms: int):
        self.bucket_ms = bucket_ms
        self.events = Metrics.counter("smoke", "events")
        self.buckets = Metrics.counter("smoke", "buckets")
        self.bucket_size = Metrics.distribution("smoke", "bucket_size")

    def process(self, element, values=beam.DoFn.StateParam(VALUES),
                flush=beam.DoFn.TimerParam(FLUSH)):
        (_, bucket), event = element
        values.add(float(event["value"]))
        flush.set(Timestamp(micros=(bucket + 1) * self.bucket_ms * 1000))
        self.events.inc()
        return ()  # the timer emits the bucket

    @on_timer(FLUSH)
    def on_flush(self, key=beam.DoFn.KeyParam, values=beam.DoFn.StateParam(VALUES)):
        """The bucket ended: its summary, and its state cleared."""
        user, bucket = key
        buffered = list(values.read())
        values.clear()
        if not buffered:
            return
        self.buckets.inc()
        self.bucket_size.update(len(buffered))
        yield {"user": user, "bucket_start_ms": bucket * self.bucket_ms,
               "count": len(buffered), "total": round(sum(sorted(buffered)), 6)}


class SummariseBuckets(beam.PTransform):
    """Event dicts (user, ts_ms, value) → one summary dict per (user, event-time bucket).

    Args:
        bucket_seconds: the buckets' width, event-time seconds.

    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> events = [{"user": "u1", "ts_ms": ts, "value": 1.0} for ts in (5_000, 59_000, 61_000)]
    >>> with beam.Pipeline() as p:
    ...     summaries = (p | beam.Create(events)
    ...                  | beam.Map(lambda e: TimestampedValue(e, e["ts_ms"] / 1000))
    ...                  | SummariseBuckets(bucket_seconds=60))
    ...     _ = assert_that(summaries | beam.Map(lambda s: (s["bucket_start_ms"], s["count"])),
    ...                     equal_to([(0, 2), (60_000, 1)]))
    """

    def __init__(self, bucket_seconds: int = 60):
        super().__init__()
        self.bucket_ms = bucket_seconds * 1000

    def expand(self, events):
        bucket_ms = self.bucket_ms
        return (events
                | "KeyByUserBucket" >> beam.Map(
                    lambda e: ((e["user"], e["ts_ms"] // bucket_ms), e)
                ).with_output_types(Tuple[Tuple[str, int], Dict[str, Any]])
                | "Summarise" >> beam.ParDo(BucketSummaryFn(bucket_ms)))


# no annotations: Beam reads a callable's (strings here) and logs that it uses Any
def to_json_line(summary):
    """A summary as one line of strict JSON, keys sorted."""
    return strict_json.dumps(summary, sort_keys=True)


def build(pipeline: beam.Pipeline, opts: SmokeOptions) -> None:
    """The smoke pipeline (the module docstring).

    Args:
        pipeline: the pipeline to build in.
        opts: its :class:`SmokeOptions`.
    """
    (pipeline
     | "ReadEvents" >> ReadFromAvro(opts.input)
     | "EventTime" >> beam.Map(lambda e: TimestampedValue(e, e["ts_ms"] / 1000.0))
     | "Buckets" >> SummariseBuckets(opts.bucket_seconds)
     | "ToJson" >> beam.Map(to_json_line)
     | "Write" >> beam.io.WriteToText(opts.out, file_name_suffix=".jsonl"))


def main(argv: list[str] | None = None):
    """``python -m dataflow smoke``.

    Args:
        argv: the flags (None: ``sys.argv[1:]``).

    Returns:
        The pipeline's result.
    """
    argv = sys.argv[1:] if argv is None else argv
    options = pipeline_options(argv, SmokeOptions)
    opts = options.view_as(SmokeOptions)
    if not opts.input or not opts.out:
        raise SystemExit("smoke: --input and --out are required (see --help)")
    result = run_job(lambda p: build(p, opts), options, freeze_startup_heap=True)
    _LOG.info("smoke: bucket summaries in %s*.jsonl", opts.out)
    return result


OPTIONS = [SmokeOptions]
USAGE = "--input INPUT --out OUT [options]"
