"""The loop's join as one streaming job (Flink; ``python -m dataflow.loop stream-join``):
:func:`build_stream_join`.

Its logs are tailed folders (``--join stream``) or Kafka topics (``--transport kafka``: each
of ``--features``, ``--actions``, ``--examples`` a folder or ``kafka://HOST:PORT/TOPIC``).

Over topics, each partition is read from its offsets in Flink's checkpoint
(``transforms.kafka_source.ReadFromKafkaTopic``, following), its watermark the latest event
time read or its writer's latest watermark mark; an end-of-stream mark in every partition of
both topics (``dataflow.serving.kafka_log.end_topic``) ends the input, and every window
closes. Examples go to the examples topic each once, in (event time, request id) order per
partition (``transforms.kafka_sink.WriteToKafkaTopicInOrder``): a job restored from a
checkpoint does not write twice what it wrote after it. ``--done_file`` is written once the
input has ended and every example is written: a checkpointed job keeps its sources up after
their input ends (Flink 1.19 with Beam 2.62 fails every checkpoint once a source has
finished), so it is stopped through Flink's REST API then.
"""
from __future__ import annotations

import json
import os
import time

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.transforms import window as beam_window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer

from dataflow.job import run_job
from dataflow.options import MonolithOptions, parse_pipeline_args
from transforms.event_time_files import WriteEventTimeFiles
from transforms.example_log import WriteExampleLog
from transforms.features import ExtractFeatures
from transforms.joiner import OnlineJoiner
from transforms.tail import TailAvroLogs

__all__ = ["build_stream_join", "main", "WriteWhenInputEnds"]


# no annotations: Beam reads a callable's (strings here) and logs that it uses Any
def _write_started(path):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{time.time():.3f}\n")
    os.replace(tmp, path)


def _is_kafka(place: str) -> bool:
    return place.startswith("kafka://")


class _WriteWhenInputEndsFn(beam.DoFn):
    """Sums its input; when the watermark reaches the end of time, writes the file."""
    TOTAL = ReadModifyWriteStateSpec("input_end_total", VarIntCoder())
    END = TimerSpec("input_end", TimeDomain.WATERMARK)

    def __init__(self, path: str):
        self.path = path

    def process(self, element, total=beam.DoFn.StateParam(TOTAL),
                end=beam.DoFn.TimerParam(END)):
        total.write((total.read() or 0) + element[1])
        end.set(beam_window.GlobalWindow().max_timestamp())
        yield from ()  # nothing out: the file is the output

    @on_timer(END)
    def on_end(self, total=beam.DoFn.StateParam(TOTAL)):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"examples_written": total.read() or 0, "wall_time": time.time()}, f)
        os.replace(tmp, self.path)


class WriteWhenInputEnds(beam.PTransform):
    """Counts (ints, e.g. what each bundle of a sink wrote) → a JSON file
    ``{"examples_written": sum, "wall_time"}`` written when the watermark of the counts
    reaches the end of time: every stage before them has finished its input (on Flink; the
    DirectRunner fires such timers at the end of every self-checkpointing source's call).

    Args:
        path: the file (written atomically).
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def expand(self, counts):
        seed = counts.pipeline | "Seed" >> beam.Create([0])  # a key for the timer, always
        return ((counts, seed) | "All" >> beam.Flatten()
                | "OneKey" >> beam.Map(lambda n: (0, n))
                | "WriteAtEnd" >> beam.ParDo(_WriteWhenInputEndsFn(self.path)))


def build_stream_join(pipeline, opts) -> None:
    """The join as one streaming pipeline (for Flink): the transforms of ``dataflow.join``
    over tailed folders (``TailAvroLogs``) or followed topics (``ReadFromKafkaTopic``), the
    examples to a folder (``WriteExampleLog``) or a topic (``WriteToKafkaTopicInOrder``).

    Args:
        pipeline: the pipeline to build in.
        opts: the ``stream-join`` options (:func:`main`).
    """
    stop = time.time() + opts.stop_after_s
    dead_letters = []
    features = _read(pipeline, "FeatureLog", opts.features, "feature_log", stop, opts,
                     dead_letters)
    extracted = features | "ExtractFeatures" >> ExtractFeatures(opts.config)
    dead_letters.append(extracted.dead_letter)
    actions = _read(pipeline, "ActionLog", opts.actions, "action_log", stop, opts,
                    dead_letters)
    if opts.started_file:  # runs once the runner executes the job, not when it accepts it
        _ = (pipeline | "Started" >> beam.Create([opts.started_file])
             | "WriteStarted" >> beam.Map(_write_started))
    joined = (extracted.features, actions) | "Join" >> OnlineJoiner(
        join_window_s=opts.join_window_s, negative_sample_rate=opts.negative_sample_rate)
    if _is_kafka(opts.examples):
        from transforms.kafka_sink import WriteToKafkaTopicInOrder
        from transforms.kafka_source import parse_kafka_url
        bootstrap, topic = parse_kafka_url(opts.examples)
        written, dead = joined.examples | "WriteExamples" >> WriteToKafkaTopicInOrder(
            bootstrap, topic, "example").with_dead_letters()
        dead_letters.append(dead)
        if opts.done_file:
            _ = written | "Done" >> WriteWhenInputEnds(opts.done_file)
    else:
        joined.examples | "WriteExamples" >> WriteExampleLog(opts.examples, opts.join_window_s,
                                                             opts.period_s)
    _ = (tuple(dead_letters) | "DeadLetters" >> beam.Flatten()
         | "WriteDeadLetter" >> WriteEventTimeFiles(
             os.path.join(opts.dead_letter, "dead_letter"), opts.period_s))


def _read(pipeline, name: str, place: str, schema: str, stop: float, opts, dead_letters):
    """A log's records, from a tailed folder or a followed topic (its dead letters are
    appended to ``dead_letters``)."""
    if _is_kafka(place):
        from transforms.kafka_source import ReadFromKafkaTopic, parse_kafka_url
        bootstrap, topic = parse_kafka_url(place)
        records, dead = pipeline | f"Read{name}" >> ReadFromKafkaTopic(
            bootstrap, topic, schema, stop=None, stop_timestamp=stop,
            poll_interval_s=opts.poll_s, max_bundle_s=opts.max_bundle_s).with_dead_letters()
        dead_letters.append(dead)
        return records
    return pipeline | f"Tail{name}" >> TailAvroLogs(
        f"{place}/part-*.avro", opts.poll_s, stop_timestamp=stop,
        stop_when_exists=opts.stop_when_exists)


def main(argv: list) -> int:
    """``python -m dataflow.loop stream-join``: runs :func:`build_stream_join` until its
    input ends (its sources stop; with checkpointing: ``--done_file`` is written).

    Args:
        argv: the flags (after ``stream-join``).

    Returns:
        0.
    """
    # Beam parses every options class with every pipeline: no required=True here.
    class StreamJoinOptions(MonolithOptions):
        @classmethod
        def _add_argparse_args(cls, parser):
            parser.add_argument("--features", help="feature log folder, or kafka://HOST:PORT/TOPIC")
            parser.add_argument("--actions", help="action log folder, or kafka://HOST:PORT/TOPIC")
            parser.add_argument("--examples", help="example log folder (training follows it), "
                                                   "or kafka://HOST:PORT/TOPIC")
            parser.add_argument("--dead_letter", help="folder for dead_letter/")
            parser.add_argument("--config", default="synthetic")
            parser.add_argument("--join_window_s", type=float, default=300.0)
            parser.add_argument("--period_s", type=int, default=120)
            parser.add_argument("--negative_sample_rate", type=float, default=1.0)
            parser.add_argument("--stop_after_s", type=float, default=600.0,
                                help="stop reading the logs after this many wall seconds")
            parser.add_argument("--stop_when_exists", default=None,
                                help="folders: stop listing them once this file exists (the "
                                     "writer creates it after its last log file landed); "
                                     "topics end with their end-of-stream marks")
            parser.add_argument("--started_file", default=None,
                                help="write this file once the job runs")
            parser.add_argument("--done_file", default=None,
                                help="examples to a topic: write this file (JSON, the "
                                     "examples written) once the input ended and every "
                                     "example is written; with --checkpointing_interval the "
                                     "job is stopped then")
            parser.add_argument("--poll_s", type=float, default=0.5,
                                help="the wait after a poll of a folder or a partition found "
                                     "nothing")
            parser.add_argument("--max_bundle_s", type=float, default=1.0,
                                help="topics: the longest a partition's read call lasts")

    argv = list(argv)
    checkpointed = any(a.startswith("--checkpointing_interval") for a in argv)
    # A stage hands its output and its watermark on when its bundle ends. Measured on Beam
    # 2.62's Flink runner: the followed topics' stage ended its bundles only at a checkpoint
    # or after --max_bundle_size elements, never after --max_bundle_time_mills (with neither,
    # no example came out before the input ended; with 1 s checkpoints, in bursts).
    # The SDK worker's state cache is off unless sized (Beam 2.62's default is 0 MB): every
    # read of a request's state is then a round trip to the JVM (docs/kafka.md, "The loop on
    # Kafka").
    flink_defaults: dict = {"max_bundle_time_mills": 200, "max_bundle_size": 100,
                            "max_cache_memory_usage_mb": 100}
    if not any(a.startswith("--job_name") for a in argv):
        # a name the cluster's REST API finds the job by (run_job stops it there)
        flink_defaults["job_name"] = f"beam-monolith-stream-join-{os.getpid()}-{int(time.time())}"
    if checkpointed and any(a.startswith("--runner=FlinkRunner") for a in argv):
        from dataflow.flink import local_rest_conf_dir
        # bundles end before a checkpoint (pitfalls.md); a known REST port on the embedded
        # MiniCluster, through which run_job stops the job once it is done
        flink_defaults["finish_bundle_before_checkpointing"] = True
        if any(a == "--flink_master=[local]" for a in argv):
            flink_defaults["flink_conf_dir"] = local_rest_conf_dir()
    options, opts = parse_pipeline_args(
        argv, StreamJoinOptions, ("features", "actions", "examples", "dead_letter"),
        "stream-join", flink_defaults=flink_defaults)
    finished = None
    if checkpointed and opts.done_file:
        if os.path.exists(opts.done_file):
            os.remove(opts.done_file)
        finished = lambda: os.path.exists(opts.done_file)  # noqa: E731
    run_job(lambda p: build_stream_join(p, opts), options, finished=finished)
    return 0
