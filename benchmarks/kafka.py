"""Kafka as the log transport, measured side by side: ``python -m benchmarks.kafka --json``.

In one run and one process tree it starts its own Kafka broker (``dataflow.kafka``, KRaft,
one node) and a standalone Flink cluster (``dataflow.flink.FlinkCluster``: one TaskManager),
always stops both, and measures:

1. **produced** records/s: ``--records`` feature-log records of the synthetic stream
   (``dataflow.data.synth``) written to a topic of ``--partitions`` partitions, keyed by
   request id, by a plain ``confluent_kafka.Producer`` (idempotent, ``acks=all``,
   ``--linger_ms``, ``--batch_bytes``; the records encoded with ``KafkaRecordCodec`` first,
   timed apart) and by ``WriteToKafkaTopic`` on the DirectRunner (the same producer
   settings; its input read from the feature-log files);
2. **consumed** records/s: the producer's topic read back by a plain ``Consumer`` (raw
   messages, and decoded with the codec) and by ``ReadFromKafkaTopic`` (bounded to the end
   offsets) on the DirectRunner and on Flink;
3. **the join's examples/s, Kafka against files, on Flink**: a synthetic day
   (``--join_requests``) joined by the transforms of ``dataflow.join`` and
   ``dataflow/closed_loop/stream_join.py`` (``ExtractFeatures`` then ``OnlineJoiner``, the
   stream join's settings), with the feature and action logs read (a) from the Avro files
   as ``dataflow.join`` reads them on Flink (``join_io.read_features`` /
   ``read_actions``, ordered: ``TailAvroLogs``, the watermark following the files) and
   (b) from two topics holding the same records (``ReadFromKafkaTopic``, bounded; a
   reader call ends after ``--kafka_max_bundle_s`` at a chunk of ``--kafka_chunk``
   messages, so that the joiner's watermark follows the reading as it follows the files),
   and, on Flink, (c) the same with the source's defaults (a partition read to its end in
   one call: the watermark moves at the end only), the examples counted (not written);
   all must give the same number of examples.

Every figure has ``seconds`` (end to end: a client's creation, or a pipeline's construction
and run, to its end; a Flink job's includes the start of the Beam job server and of the
job: 10-40 s on a shared 2-core machine, ``startup_s``) and, where
the records are stamped as they pass (a Beam distribution of the wall clock at the first and
last element of every bundle), ``span_s`` from the first record processed to the last and
the rate over it. ``cores_busy`` is the machine's CPU (``benchmarks.train.machine_cpu_seconds``:
every process, the broker's and Flink's JVMs included, and other load on the machine) over
the figure's seconds. Flink runs LOOPBACK at ``--parallelism`` 1 (the Python in this
process), the same for the file and the Kafka join.

    python -m benchmarks.kafka --json
    python -m benchmarks.kafka --json --quick              # a smoke run: small, still on Flink
    python -m benchmarks.kafka --json --quick --no_flink   # DirectRunner only (the test)
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import glob
import logging
import os
import sys
import tempfile
import time
import uuid

import apache_beam as beam
from apache_beam.metrics import Metrics

from benchmarks.train import machine_cpu_seconds, world_size
from dataflow import cli
from schemas import read_avro, strict_json

_LOG = logging.getLogger(__name__)

METRICS_NAMESPACE = "benchmark"
JOIN_CONFIG = "synthetic"


class WallClockSpan(beam.DoFn):
    """Counts what passes and records when: the wall clock (ms) at the first and at the
    last element of each bundle go to the distribution ``benchmark.<name>_wall_ms``, so its
    min and max are the first and last element's processing over the whole job (two
    updates a bundle, not one an element). ``pass_on``: yield the elements on (else
    nothing: a counting end)."""

    def __init__(self, name: str, pass_on: bool = False):
        self.name, self.pass_on = name, pass_on
        self.count = Metrics.counter(METRICS_NAMESPACE, name)
        self.wall = Metrics.distribution(METRICS_NAMESPACE, f"{name}_wall_ms")

    def start_bundle(self):
        self._n, self._first, self._last = 0, None, None

    def process(self, element):
        self._last = time.time()
        if self._first is None:
            self._first = self._last
        self._n += 1
        if self.pass_on:
            yield element

    def finish_bundle(self):
        if self._n:
            self.count.inc(self._n)
            self.wall.update(int(self._first * 1000))
            self.wall.update(int(self._last * 1000))


def producer_config(bootstrap: str, linger_ms: float, batch_bytes: int,
                    compression: str) -> dict:
    """The librdkafka producer settings of both producers (plain and ``WriteToKafkaTopic``):
    idempotent (``acks=all``), batches up to ``batch_bytes`` or ``linger_ms``.

    >>> sorted(producer_config("h:1", 20, 1 << 20, "none").items())[:3]
    [('acks', 'all'), ('batch.num.messages', 100000), ('batch.size', 1048576)]
    """
    return {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
            "linger.ms": linger_ms, "batch.size": batch_bytes, "batch.num.messages": 100_000,
            "compression.type": compression, "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1 << 20}


def consumer_config(bootstrap: str) -> dict:
    """A plain consumer's settings, as ``ReadFromKafkaTopic``'s readers have them (assigned
    partitions, nothing committed)."""
    return {"bootstrap.servers": bootstrap, "group.id": f"benchmark-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest", "enable.partition.eof": False}


def log_records(folder: str) -> list[dict]:
    """Every record of a log folder's Avro files (``part-*.avro``), in event-time order."""
    records = [r for path in sorted(glob.glob(os.path.join(folder, "*.avro")))
               for r in read_avro(path)]
    records.sort(key=lambda r: r["ts_ms"])  # stable: a file's order among equal times
    return records


class Figure:
    """One measurement: its wall seconds and the machine's CPU seconds over them
    (:func:`benchmarks.train.machine_cpu_seconds`)."""

    def __enter__(self):
        self.start_ms = time.time() * 1000
        self.cpu_start = machine_cpu_seconds()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = machine_cpu_seconds() - self.cpu_start
        self.end_ms = time.time() * 1000

    def result(self, records: int, span_ms: tuple | None = None, unit: str = "records",
               job_started_ms: float | None = None, **more) -> dict:
        """``{unit, seconds, <unit>_per_s, span_s, <unit>_per_s_span, cores_busy, ...}``;
        ``span_ms``: (first, last) record's wall-clock ms; ``job_started_ms``: when a job
        began to run (then ``startup_s`` before it and ``tail_s`` after the last record)."""
        out = {unit: records, "seconds": round(self.seconds, 3),
               f"{unit}_per_s": round(records / self.seconds, 1) if self.seconds > 0 else None}
        if span_ms is not None:
            span = (span_ms[1] - span_ms[0]) / 1000
            out["span_s"] = round(span, 3)
            out[f"{unit}_per_s_span"] = round(records / span, 1) if span > 0 else None
        if job_started_ms is not None:
            out["startup_s"] = round((job_started_ms - self.start_ms) / 1000, 3)
            if span_ms is not None:
                out["tail_s"] = round((self.end_ms - span_ms[1]) / 1000, 3)
        out["machine_cpu_seconds"] = round(self.cpu_seconds, 2)
        out["cores_busy"] = round(self.cpu_seconds / self.seconds, 2) if self.seconds > 0 else None
        out.update(more)
        return out


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def wall_span(metrics: dict, *names: str) -> tuple | None:
    """(first, last) wall-clock ms over the :class:`WallClockSpan` distributions ``names``."""
    dists = [metrics["distributions"].get(f"{METRICS_NAMESPACE}.{n}_wall_ms") for n in names]
    dists = [d for d in dists if d and d["count"]]
    if not dists:
        return None
    return min(d["min"] for d in dists), max(d["max"] for d in dists)


def run_timed_job(build, flags: list) -> tuple:
    """Builds and runs a pipeline on the runner of ``flags`` (``dataflow.job.run_job``),
    timed, with a branch that stamps when the job began to run (``job_started``).

    Returns:
        ``(Figure, metrics, job started wall-clock ms or None)``.
    """
    from dataflow.job import metrics_dict, run_job
    from dataflow.options import pipeline_options

    def with_start(p):
        _ = (p | "JobStarted" >> beam.Create([None])
             | "StampJobStart" >> beam.ParDo(WallClockSpan("job_started")))
        build(p)

    with Figure() as run:
        metrics = metrics_dict(run_job(with_start, pipeline_options(flags)))
    started = wall_span(metrics, "job_started")
    return run, metrics, started[0] if started else None


# --------------------------------------------------------------------------- 1. producing

def produce_plain(topic: str, records: list, codec, config: dict, warm_up_topic: str) -> dict:
    """The plain producer: the records encoded (timed apart), then produced keyed by request
    id with their event time as the message time, and flushed. The producer is warmed up
    first (a message to ``warm_up_topic``, flushed): a long-lived producer, as serving's, has
    its connection and its idempotent producer id already (a new broker's first one waits
    for its coordinator)."""
    from confluent_kafka import Producer
    with Figure() as encoding:
        pairs = codec.encode_records(records)
    times = [r["ts_ms"] for r in records]
    producer = Producer(config)
    producer.produce(warm_up_topic, pairs[0][1], pairs[0][0], headers=codec.headers)
    if producer.flush(60):
        raise RuntimeError(f"the warm-up message to {warm_up_topic} was not delivered")
    headers = codec.headers
    delivered = {"ok": 0, "failed": 0}

    def on_delivery(error, message):
        delivered["failed" if error is not None else "ok"] += 1

    with Figure() as producing:
        for (key, value), ts in zip(pairs, times):
            while True:
                try:
                    producer.produce(topic, value, key, headers=headers, timestamp=ts,
                                     on_delivery=on_delivery)
                    break
                except BufferError:  # the local queue is full: let librdkafka send
                    producer.poll(0.05)
            producer.poll(0)
        left = producer.flush(120)
    if left or delivered["failed"] or delivered["ok"] != len(records):
        raise RuntimeError(f"producing to {topic}: {left} left in the queue, "
                           f"{delivered['failed']} failed, {delivered['ok']} delivered of "
                           f"{len(records)}")
    payload = sum(len(v) for _, v in pairs)
    out = producing.result(len(records), mb_per_s=round(payload / producing.seconds / 1e6, 2),
                           encode_seconds=round(encoding.seconds, 3))
    out["records_per_s_with_encoding"] = round(
        len(records) / (producing.seconds + encoding.seconds), 1)
    return out


def produce_with_beam(bootstrap: str, topic: str, feature_glob: str, expected: int,
                      config: dict) -> dict:
    """``ReadFeatureLogs(files) | WriteToKafkaTopic`` on the DirectRunner; the span is from
    the first record read to the job's end (the sink's last flush is in it)."""
    from transforms.kafka_sink import WriteToKafkaTopic
    from transforms.sources import ReadFeatureLogs
    producer_settings = {k: v for k, v in config.items() if k != "bootstrap.servers"}

    def build(p):
        _ = (p | "ReadFeatureLogs" >> ReadFeatureLogs(feature_glob)
             | "Stamp" >> beam.ParDo(WallClockSpan("sink_input", pass_on=True))
             | "Write" >> WriteToKafkaTopic(bootstrap, topic, "feature_log",
                                            producer_config=producer_settings))

    run, metrics, started = run_timed_job(build, ["--runner=DirectRunner"])
    first_last = wall_span(metrics, "sink_input")
    written = metrics["counters"].get("kafka_sink.records_written", 0)
    if written != expected:
        raise RuntimeError(f"WriteToKafkaTopic wrote {written} records, expected {expected}")
    out = run.result(written, span_ms=(first_last[0], run.end_ms), job_started_ms=started,
                     dead_letters=metrics["counters"].get("kafka_sink.dead_letters", 0),
                     runner="DirectRunner")
    del out["tail_s"]  # the span ends with the job: its last flush is in the job
    return out


# --------------------------------------------------------------------------- 2. consuming

def consume_plain(bootstrap: str, topic: str, partitions: int, expected: int, codec,
                  timeout_s: float = 120.0) -> dict:
    """A plain consumer assigned every partition from the start, to ``expected`` messages;
    ``codec``: decode them (``KafkaRecordCodec.decode_messages``), else count them raw.
    Messages come in batches of up to 10,000 (``ReadFromKafkaTopic``'s chunk): the span is
    from the first batch handled to the last, its rate that of the records after the first
    batch."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    n = dead = size = first_batch = 0
    first_ms = last_ms = None
    with Figure() as run:
        consumer = Consumer(consumer_config(bootstrap))
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
        deadline = time.monotonic() + timeout_s
        while n < expected:
            # never more than are left: consume() waits its timeout for a batch it cannot fill
            messages = [m for m in consumer.consume(min(10_000, expected - n), 0.5)
                        if m.error() is None]
            if not messages:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"consumed {n} of {expected} messages of {topic}")
                continue
            if codec is not None:
                good, bad = codec.decode_messages(messages)
                dead += len(bad)
            n += len(messages)
            size += sum(len(m.value()) for m in messages)
            last_ms = time.time() * 1000
            if first_ms is None:
                first_ms, first_batch = last_ms, len(messages)
        consumer.close()
    out = run.result(n, span_ms=(first_ms, last_ms),
                     mb_per_s=round(size / run.seconds / 1e6, 2),
                     dead_letters=dead if codec is not None else None,
                     decoded=codec is not None)
    span = out["span_s"]
    out["records_per_s_span"] = round((n - first_batch) / span, 1) if span > 0 else None
    return out


def read_with_beam(bootstrap: str, topic: str, expected: int, flags: list,
                   max_bundle_s: float | None = None) -> dict:
    """``ReadFromKafkaTopic`` (bounded) to a counting end on the runner of ``flags``."""
    from transforms.kafka_source import ReadFromKafkaTopic

    def build(p):
        records, dead = (p | "Read" >> ReadFromKafkaTopic(bootstrap, topic, "feature_log",
                                                          max_bundle_s=max_bundle_s)
                         .with_dead_letters())
        _ = records | "Count" >> beam.ParDo(WallClockSpan("read"))
        _ = dead | "CountDead" >> beam.ParDo(WallClockSpan("read_dead"))

    run, metrics, started = run_timed_job(build, flags)
    counters = metrics["counters"]
    n = counters.get(f"{METRICS_NAMESPACE}.read", 0)
    if n != expected:
        raise RuntimeError(f"ReadFromKafkaTopic read {n} records of {topic}, expected {expected}")
    return run.result(n, span_ms=wall_span(metrics, "read"), job_started_ms=started,
                      dead_letters=counters.get(f"{METRICS_NAMESPACE}.read_dead", 0),
                      max_bundle_s=max_bundle_s)


# --------------------------------------------------------------------------- 3. the join

def join_with(read, flags: list) -> dict:
    """``read(pipeline)`` → (feature logs extracted, actions, dead letters) → ``OnlineJoiner``
    (the stream join's settings) → examples counted; run on the runner of ``flags``."""
    from transforms.joiner import OnlineJoiner

    def build(p):
        features, actions, dead = read(p)
        features = features | "StampFeatures" >> beam.ParDo(
            WallClockSpan("join_features", pass_on=True))
        actions = actions | "StampActions" >> beam.ParDo(
            WallClockSpan("join_actions", pass_on=True))
        joined = (features, actions) | "Join" >> OnlineJoiner()
        _ = joined.examples | "CountExamples" >> beam.ParDo(WallClockSpan("join_examples"))
        _ = dead | "CountDead" >> beam.ParDo(WallClockSpan("join_dead"))

    run, metrics, started = run_timed_job(build, flags)
    c = metrics["counters"]
    examples = c.get(f"{METRICS_NAMESPACE}.join_examples", 0)
    inputs = wall_span(metrics, "join_features", "join_actions")
    emitted = wall_span(metrics, "join_examples")
    out = run.result(examples, span_ms=(inputs[0], run.end_ms), unit="examples",
                     job_started_ms=started)
    del out["tail_s"]
    out.update(
        # when, after the first record, the last record was read and the first and last
        # examples came out: a joiner whose input watermark follows the reading emits as
        # it goes; one whose watermark jumps at the end holds every request till then
        inputs_read_s=round((inputs[1] - inputs[0]) / 1000, 3),
        first_example_s=round((emitted[0] - inputs[0]) / 1000, 3),
        last_example_s=round((emitted[1] - inputs[0]) / 1000, 3),
        positives=c.get("joiner.positives", 0),
        features=c.get(f"{METRICS_NAMESPACE}.join_features", 0),
        actions=c.get(f"{METRICS_NAMESPACE}.join_actions", 0),
        late_actions=c.get("joiner.late_actions", 0),
        unmatched_actions=c.get("joiner.unmatched_actions", 0),
        dead_letters=c.get(f"{METRICS_NAMESPACE}.join_dead", 0))
    return out


def files_reader(logs: str):
    """The join's inputs from the log files, read as ``dataflow.join`` reads them on a
    streaming runner (``join_io``, ordered: a file at a time, the watermark following)."""
    def read(p):
        from dataflow.join_io import read_actions, read_features
        features, feature_dead = read_features(p, f"{logs}/feature_log/part-*.avro",
                                               JOIN_CONFIG, ordered=True)
        actions, action_dead = read_actions(p, f"{logs}/action_log/part-*.avro", ordered=True)
        return features, actions, (feature_dead, action_dead) | "Dead" >> beam.Flatten()
    return read


def kafka_reader(bootstrap: str, feature_topic: str, action_topic: str,
                 max_bundle_s: float | None, chunk: int):
    """The join's inputs from two topics (bounded to their end offsets), the feature logs
    extracted as ``dataflow.join`` extracts them; ``max_bundle_s`` and ``chunk``:
    ``ReadFromKafkaTopic``'s (a reader call ends after the chunk that passes
    ``max_bundle_s``, and a call's end is where the runner takes its watermark)."""
    def read(p):
        from transforms.features import ExtractFeatures
        from transforms.kafka_source import ReadFromKafkaTopic
        logs, log_dead = (p | "ReadFeatureTopic" >> ReadFromKafkaTopic(
            bootstrap, feature_topic, "feature_log", max_bundle_s=max_bundle_s, chunk=chunk)
            .with_dead_letters())
        extracted = logs | "ExtractFeatures" >> ExtractFeatures(JOIN_CONFIG)
        actions, action_dead = (p | "ReadActionTopic" >> ReadFromKafkaTopic(
            bootstrap, action_topic, "action_log", max_bundle_s=max_bundle_s, chunk=chunk)
            .with_dead_letters())
        dead = (log_dead, extracted.dead_letter, action_dead) | "Dead" >> beam.Flatten()
        return extracted.features, actions, dead
    return read


# --------------------------------------------------------------------------- the run

def main(argv=None) -> dict:
    parser = cli.argument_parser(prog="python -m benchmarks.kafka", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--records", type=int, default=200_000,
                        help="feature-log records produced and consumed (parts 1 and 2)")
    parser.add_argument("--join_requests", type=int, default=20_000,
                        help="requests of the synthetic day the join reads (part 3)")
    parser.add_argument("--partitions", type=int, default=2, help="partitions of each topic")
    parser.add_argument("--parallelism", type=int, default=1,
                        help="the Flink jobs' parallelism (1: LOOPBACK, the Python in this "
                             "process; above: a worker pool, a process per SDK worker)")
    parser.add_argument("--linger_ms", type=float, default=20.0, help="producers' linger.ms")
    parser.add_argument("--batch_bytes", type=int, default=1 << 20,
                        help="producers' batch.size")
    parser.add_argument("--compression", default="none",
                        choices=["none", "lz4", "snappy", "zstd", "gzip"],
                        help="producers' compression.type")
    parser.add_argument("--kafka_max_bundle_s", type=float, default=0.1,
                        help="ReadFromKafkaTopic's max_bundle_s in the join (a reader call "
                             "ends after it, so the watermark moves; 0: none, a partition "
                             "read to its end in one call)")
    parser.add_argument("--kafka_chunk", type=int, default=500,
                        help="ReadFromKafkaTopic's chunk in the join: the most messages a "
                             "reader takes from the consumer at once (a call ends only "
                             "between chunks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", default="produce,consume,join",
                        help="what to measure: comma-separated produce, consume, join")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 5,000 records, a 1,000-request join")
    parser.add_argument("--no_flink", action="store_true",
                        help="no Flink cluster: the Flink read is left out and the join runs "
                             "on the DirectRunner (the quick test)")
    parser.add_argument("--workdir", default=None, help="keep the files here")
    parser.add_argument("--flink_flag", action="append", default=[],
                        help="a pipeline flag every Flink job gets (repeatable)")
    args = parser.parse_args(argv)
    args.parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = set(args.parts) - {"produce", "consume", "join"}
    if unknown or not args.parts:
        parser.error(f"--parts: produce, consume and/or join, not {args.parts}")
    if args.quick:
        args.records, args.join_requests = 5_000, 1_000

    from dataflow.kafka import KAFKA_VERSION, KafkaBroker
    work = args.workdir or tempfile.mkdtemp(prefix="bench-kafka-")
    os.makedirs(work, exist_ok=True)
    load = os.getloadavg()
    # Messages carry their event time (2024 for the synthetic stream): with the default
    # retention (7 days, by message time) the broker's first retention check (5 minutes
    # after its start) would delete them mid-run.
    with KafkaBroker(workdir=os.path.join(work, "kafka-broker"), partitions=args.partitions,
                     extra_conf={"log.retention.ms": -1}) as broker:
        if args.no_flink:
            result = _runs(args, work, broker, None)
        else:
            from dataflow.flink import FlinkCluster
            with FlinkCluster(task_slots=max(1, args.parallelism),
                              workdir=os.path.join(work, "flink")) as cluster:
                result = _runs(args, work, broker, cluster)
    result["setup"].update(kafka_version=KAFKA_VERSION, cores=os.cpu_count(),
                           load_average_at_start=[round(x, 2) for x in load],
                           load_average_at_end=[round(x, 2) for x in os.getloadavg()],
                           quick=args.quick, workdir=work)
    result = strict_json.plain(result)
    if args.json:
        print(strict_json.dumps(result))
    else:
        print(strict_json.dumps(result, indent=2))
    return result


def _runs(args, work: str, broker, cluster) -> dict:
    """The measurements of :func:`main`, in order, on ``broker`` and ``cluster``."""
    flink_flags = [] if cluster is None else [
        "--runner=FlinkRunner", f"--flink_master={cluster.master}", "--streaming",
        f"--parallelism={args.parallelism}", *args.flink_flag]
    result: dict = {"setup": {
        "records": args.records, "join_requests": args.join_requests,
        "partitions": args.partitions, "parts": args.parts,
        "flink": None if cluster is None else {
            "cluster": "standalone (dataflow.flink.FlinkCluster), 1 TaskManager",
            "parallelism": args.parallelism, "streaming": True,
            "environment": "LOOPBACK" if args.parallelism <= 1 else "EXTERNAL"},
        "producer": {k: v for k, v in producer_config("", args.linger_ms, args.batch_bytes,
                                                      args.compression).items()
                     if k != "bootstrap.servers"},
        "join_kafka_max_bundle_s": args.kafka_max_bundle_s or None,
        "join_kafka_chunk": args.kafka_chunk}}
    config = producer_config(broker.bootstrap, args.linger_ms, args.batch_bytes,
                             args.compression)
    if "produce" in args.parts or "consume" in args.parts:
        _produce_and_consume(args, work, broker, config, flink_flags, result)
    if "join" in args.parts:
        _join(args, work, broker, config, flink_flags, result)

    p, c, j = result.get("produce", {}), result.get("consume", {}), result.get("join", {})

    def rate(figures, name, key):
        return figures.get(name, {}).get(key)
    result["ratios"] = {
        "producer_with_encoding_vs_without": _ratio(
            rate(p, "producer", "records_per_s_with_encoding"),
            rate(p, "producer", "records_per_s")),
        "sink_direct_vs_producer_with_encoding": _ratio(
            rate(p, "write_to_kafka_topic_direct", "records_per_s"),
            rate(p, "producer", "records_per_s_with_encoding")),
        "consumer_decoded_vs_raw": _ratio(rate(c, "consumer_decoded", "records_per_s"),
                                          rate(c, "consumer_raw", "records_per_s")),
        "consumer_decoded_strict_vs_not": _ratio(
            rate(c, "consumer_decoded", "records_per_s"),
            rate(c, "consumer_decoded_not_strict", "records_per_s")),
        "read_direct_vs_consumer_decoded_span": _ratio(
            rate(c, "read_from_kafka_topic_direct", "records_per_s_span"),
            rate(c, "consumer_decoded", "records_per_s_span")),
        "read_flink_vs_consumer_decoded_span": _ratio(
            rate(c, "read_from_kafka_topic_flink", "records_per_s_span"),
            rate(c, "consumer_decoded", "records_per_s_span")),
        "read_flink_vs_direct_span": _ratio(
            rate(c, "read_from_kafka_topic_flink", "records_per_s_span"),
            rate(c, "read_from_kafka_topic_direct", "records_per_s_span")),
        "join_kafka_vs_files": j.get("kafka_vs_files"),
        "join_kafka_vs_files_span": j.get("kafka_vs_files_span")}
    return result


def _produce_and_consume(args, work: str, broker, config: dict, flink_flags: list,
                         result: dict) -> None:
    """Parts 1 and 2 into ``result["produce"]`` and ``result["consume"]``."""
    from dataflow import data
    from transforms.kafka_records import KafkaRecordCodec
    codec = KafkaRecordCodec("feature_log")
    # the records: the synthetic stream, its world scaled as benchmarks.train scales it
    logs = os.path.join(work, "logs")
    if not glob.glob(os.path.join(logs, "feature_log", "*.avro")):
        data.synth(logs, requests=args.records, seed=args.seed, **world_size(args.records))
    records = log_records(os.path.join(logs, "feature_log"))
    n = len(records)
    result["setup"]["record_bytes_mean"] = round(
        sum(len(v) for _, v in codec.encode_records(records[:10_000])) / min(n, 10_000), 1)

    def topic(name):
        broker.create_topic(name, partitions=args.partitions)
        return name

    _LOG.info("kafka benchmark: producing %d records", n)
    produced = topic("feature_log")
    produce = {"producer": produce_plain(produced, records, codec, config, topic("warm_up"))}
    del records
    if "produce" in args.parts:
        produce["write_to_kafka_topic_direct"] = produce_with_beam(
            broker.bootstrap, topic("feature_log_beam"), f"{logs}/feature_log/*.avro", n,
            config)
        result["produce"] = produce
    if "consume" not in args.parts:
        return
    _LOG.info("kafka benchmark: consuming %d records", n)
    consume = {
        "consumer_raw": consume_plain(broker.bootstrap, produced, args.partitions, n, None),
        "consumer_decoded": consume_plain(broker.bootstrap, produced, args.partitions, n,
                                          codec),
        # without the codec's check that a record encodes back to its payload
        "consumer_decoded_not_strict": consume_plain(
            broker.bootstrap, produced, args.partitions, n,
            KafkaRecordCodec("feature_log", strict=False)),
        "read_from_kafka_topic_direct": read_with_beam(
            broker.bootstrap, produced, n, ["--runner=DirectRunner"])}
    if flink_flags:
        consume["read_from_kafka_topic_flink"] = read_with_beam(
            broker.bootstrap, produced, n, flink_flags)
    result["consume"] = consume


def produce_log_folder(bootstrap: str, topic: str, folder: str, schema: str,
                       config: dict) -> int:
    """A log folder's records, in event-time order, to ``topic`` (keyed, with the codec's
    header); returns how many."""
    from confluent_kafka import Producer

    from transforms.kafka_records import KafkaRecordCodec
    codec = KafkaRecordCodec(schema)
    records = log_records(folder)
    producer = Producer({**config, "bootstrap.servers": bootstrap})
    for record, (key, value) in zip(records, codec.encode_records(records)):
        while True:
            try:
                producer.produce(topic, value, key, headers=codec.headers,
                                 timestamp=record["ts_ms"])
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError(f"the records of {folder} were not all delivered to {topic}")
    return len(records)


def _join(args, work: str, broker, config: dict, flink_flags: list, result: dict) -> None:
    """Part 3 into ``result["join"]``."""
    from dataflow import data
    _LOG.info("kafka benchmark: the join of %d requests, files against Kafka",
              args.join_requests)
    day = os.path.join(work, "day")
    if not glob.glob(os.path.join(day, "feature_log", "*.avro")):
        data.synth(day, requests=args.join_requests, seed=args.seed + 1,
                   **world_size(args.join_requests))
    topics = {}
    for kind in ("feature_log", "action_log"):
        topics[kind] = f"day_{kind}"
        broker.create_topic(topics[kind], partitions=args.partitions)
        produce_log_folder(broker.bootstrap, topics[kind], os.path.join(day, kind), kind,
                           config)
    flags = flink_flags or ["--runner=DirectRunner"]
    files = join_with(files_reader(day), flags)
    kafka = join_with(kafka_reader(broker.bootstrap, topics["feature_log"],
                                   topics["action_log"], args.kafka_max_bundle_s or None,
                                   args.kafka_chunk), flags)
    result["join"] = {
        "runner": "FlinkRunner" if flink_flags else "DirectRunner",
        "files": files, "kafka": kafka}
    if flink_flags:
        # ReadFromKafkaTopic's own defaults (a partition to its end in one call): on Flink
        # the joiner's watermark then moves only once everything is read
        result["join"]["kafka_source_defaults"] = join_with(kafka_reader(
            broker.bootstrap, topics["feature_log"], topics["action_log"], None, 10_000), flags)
    examples = {name: result["join"][name]["examples"]
                for name in ("files", "kafka", "kafka_source_defaults") if name in result["join"]}
    result["join"].update({
        "same_examples": len(set(examples.values())) == 1,
        "kafka_vs_files": _ratio(kafka["examples_per_s"], files["examples_per_s"]),
        "kafka_vs_files_span": _ratio(kafka.get("examples_per_s_span"),
                                      files.get("examples_per_s_span"))})
    if not result["join"]["same_examples"]:
        raise RuntimeError(f"the join's examples differ by input {examples}: "
                           f"{strict_json.dumps(result)}")


if __name__ == "__main__":
    from benchmarks import kafka  # DoFns pickled by reference, not as __main__'s copies
    sys.exit(0 if kafka.main() else 1)
