"""Probe of Beam's cross-language ``ReadFromKafka`` (Java KafkaIO) for issue #20.

A time-boxed measurement, not a library module: it starts a :class:`dataflow.kafka.KafkaBroker`,
produces ``--records`` records of ``--size`` bytes to a topic of ``--partitions`` partitions
with confluent-kafka, starts Beam's Java expansion service from the jar that
``flink/kafka-jobserver/pom.xml`` builds (the Flink job server with KafkaIO and kafka-clients
shaded in) with ``--defaultEnvironmentType=EMBEDDED``, and runs::

    ReadFromKafka(..., max_num_records=N) | ParDo(count in Python)

on the runner the flags name. It prints one JSON object: records produced/s, the read's
records/s from the first to the last record counted in Python (Beam distribution of the
processing times, so job startup is left out), the job's wall time, and the peak RSS of the
Java processes (broker left out).

    python -m benchmarks.kafka_xlang_probe --runner=FlinkRunner --flink_master=[local]
    python -m benchmarks.kafka_xlang_probe --runner=DirectRunner
    python -m benchmarks.kafka_xlang_probe --runner=FlinkRunner --flink_master=[local] \\
        --unbounded_s 60 --checkpointing_interval=5000 --streaming

Checkpoints on Java 17 need ``JDK_JAVA_OPTIONS="--add-opens=java.base/java.util=ALL-UNNAMED
--add-opens=java.base/java.lang=ALL-UNNAMED"`` (else the snapshot of KafkaCommitOffset's
state fails: InaccessibleObjectException on java.util.Arrays$ArrayList). On the DirectRunner
add ``--expansion_flag=--alsoStartLoopbackWorker``: Python's FnApiRunner cannot run an
EMBEDDED Java environment (KeyError: 'EMBEDDED'), but it picks the EXTERNAL Java worker
that flag adds to the environment.

``--unbounded_s S`` reads without ``max_num_records`` and with
``commit_offset_in_finalize=True`` for S seconds, then cancels the job and reports the
consumer group's committed offsets against the end offsets.
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam loads: it logs as it is imported
    from dataflow.cli import setup
    setup()

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka
from apache_beam.metrics.metric import MetricsFilter

from dataflow.flink import REPO_ROOT, free_port
from dataflow.kafka import KafkaBroker
from dataflow.options import pipeline_options

KAFKA_JOB_SERVER_JAR = (REPO_ROOT / ".cache" / "flink-kafka"
                        / "beam-runners-flink-1.19-kafka-job-server-2.62.0.jar")
EXPANSION_MAIN = "org.apache.beam.sdk.expansion.service.ExpansionService"


class CountRecords(beam.DoFn):
    """Counts records and their value bytes per bundle; a distribution of the bundles' first
    and last processing times (ms) gives the read's span without the job's startup."""

    def start_bundle(self):
        self.records = 0
        self.value_bytes = 0
        self.first_ms = None

    def process(self, kv):
        if self.first_ms is None:
            self.first_ms = int(time.time() * 1000)
        self.records += 1
        self.value_bytes += len(kv[1])

    def finish_bundle(self):
        if not self.records:
            return
        beam.metrics.Metrics.counter("probe", "records_counted").inc(self.records)
        beam.metrics.Metrics.counter("probe", "value_bytes").inc(self.value_bytes)
        times = beam.metrics.Metrics.distribution("probe", "processed_at_ms")
        times.update(self.first_ms)
        times.update(int(time.time() * 1000))


def produce(bootstrap: str, topic: str, records: int, size: int, partitions: int) -> float:
    """Produces ``records`` values of ``size`` bytes (keys ``k<i>``) round robin over the
    partitions; returns records/s.

    Round robin, not by key: KafkaIO's bounded read (``max_num_records``) splits the count
    evenly over the partitions' readers, and a reader whose partition holds fewer records
    than its share waits forever (Python's ReadFromKafka has no ``max_read_time``)."""
    import confluent_kafka
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                                         "batch.size": 1 << 20, "enable.idempotence": True})
    payload = os.urandom(size)
    start = time.perf_counter()
    for i in range(records):
        while True:
            try:
                producer.produce(topic, value=payload, key=b"k%d" % i,
                                 partition=i % partitions)
                break
            except BufferError:
                producer.poll(0.05)
        if i % 10000 == 0:
            producer.poll(0)
    left = producer.flush(60)
    if left:
        raise RuntimeError(f"{left} records not delivered")
    return records / (time.perf_counter() - start)


def start_expansion_service(jar: Path, log: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    """Beam's Java expansion service on a free port, Java transforms in EMBEDDED (and what
    ``flags`` add, e.g. ``--alsoStartLoopbackWorker``)."""
    port = free_port()
    proc = subprocess.Popen(
        ["java", "-cp", str(jar), EXPANSION_MAIN, str(port), "--defaultEnvironmentType=EMBEDDED",
         *flags],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"expansion service exited:\n{log.read_text()[-3000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"localhost:{port}"
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("expansion service did not answer in 60 s")


class JavaRssSampler(threading.Thread):
    """Peak RSS (VmHWM, MiB) of Java processes whose command line names ``needle``."""

    def __init__(self, needle: str):
        super().__init__(daemon=True)
        self.needle = needle
        self.peak_mib: dict[int, float] = {}
        self.halt = threading.Event()

    def run(self):
        while not self.halt.wait(1.0):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    if b"java" not in cmd or self.needle.encode() not in cmd:
                        continue
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_mib[int(pid)] = int(line.split()[1]) / 1024
                except OSError:
                    pass


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict:
    import confluent_kafka
    consumer = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                                         "enable.auto.commit": False})
    try:
        tps = [confluent_kafka.TopicPartition(topic, p) for p in range(partitions)]
        committed = consumer.committed(tps, timeout=10)
        ends = [consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps]
        return {str(tp.partition): {"committed": tp.offset, "end": end}
                for tp, end in zip(committed, ends)}
    finally:
        consumer.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kafka_xlang_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=150)
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--jar", default=str(KAFKA_JOB_SERVER_JAR))
    parser.add_argument("--unbounded_s", type=float, default=0.0,
                        help="read unbounded with commit_offset_in_finalize for this long")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--expansion_flag", action="append", default=[],
                        help="a flag for the Java expansion service (repeatable), e.g. "
                             "--expansion_flag=--alsoStartLoopbackWorker")
    args, beam_argv = parser.parse_known_args(argv)
    jar = Path(args.jar)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kafka-xlang-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runner = next((a.split("=", 1)[1] for a in beam_argv if a.startswith("--runner=")),
                  "DirectRunner")
    if "FlinkRunner" in runner and not any(a.startswith("--flink_job_server_jar")
                                           for a in beam_argv):
        beam_argv.append(f"--flink_job_server_jar={jar}")
    result: dict = {"runner": runner, "expansion_flags": args.expansion_flag, "records": args.records, "size": args.size,
                    "partitions": args.partitions, "argv": beam_argv}
    sampler = JavaRssSampler(jar.name)
    sampler.start()
    with KafkaBroker(workdir=str(workdir / "broker"), heap_mb=1024) as broker:
        topic = "probe"
        broker.create_topic(topic, partitions=args.partitions)
        result["produced_per_s"] = round(produce(broker.bootstrap, topic, args.records,
                                                 args.size, args.partitions))
        t = time.monotonic()
        expansion, address = start_expansion_service(jar, workdir / "expansion.log",
                                                     args.expansion_flag)
        result["expansion_service_start_s"] = round(time.monotonic() - t, 2)
        group = f"probe-{int(time.time())}"
        consumer_config = {"bootstrap.servers": broker.bootstrap,
                           "auto.offset.reset": "earliest", "group.id": group}
        bounded = args.unbounded_s <= 0
        try:
            options = pipeline_options(beam_argv)
            t_build = time.monotonic()
            pipeline = beam.Pipeline(options=options)
            (pipeline
             | "Read" >> ReadFromKafka(
                 consumer_config=consumer_config, topics=[topic],
                 max_num_records=args.records if bounded else None,
                 commit_offset_in_finalize=not bounded, expansion_service=address)
             | "Count" >> beam.ParDo(CountRecords()))
            result["expansion_s"] = round(time.monotonic() - t_build, 2)
            t_run = time.monotonic()
            run = pipeline.run()
            if bounded:
                run.wait_until_finish()
            else:
                run.wait_until_finish(duration=int(args.unbounded_s * 1000))
                result["state_before_cancel"] = str(run.state)
                result["committed"] = committed_offsets(broker.bootstrap, group, topic,
                                                        args.partitions)
                try:
                    run.cancel()
                except Exception as exc:  # the probe reports, it does not stop here
                    result["cancel_error"] = repr(exc)[:300]
            result["job_wall_s"] = round(time.monotonic() - t_run, 2)
            result["state"] = str(run.state)
            metrics = run.metrics().query(MetricsFilter().with_namespace("probe"))
            for c in metrics["counters"]:
                result[c.key.metric.name] = c.committed if c.committed is not None \
                    else c.attempted
            for d in metrics["distributions"]:
                value = d.committed or d.attempted
                span_s = (value.max - value.min) / 1000
                result["read_span_s"] = round(span_s, 3)
                result["read_per_s"] = round(result.get("records_counted", 0) / span_s) \
                    if span_s > 0 else None
        except Exception as exc:
            logging.getLogger(__name__).exception("the probe's pipeline failed")
            result["error"] = f"{type(exc).__name__}: {str(exc)[:3000]}"
        finally:
            expansion.terminate()
            try:
                expansion.wait(10)
            except subprocess.TimeoutExpired:
                expansion.kill()
            sampler.halt.set()
            sampler.join()
    result["java_peak_rss_mib"] = {str(pid): round(mib) for pid, mib in
                                   sampler.peak_mib.items()}
    print(json.dumps(result, indent=1, default=str))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
