"""The smoke pipeline gives the exact same output on every runner we support."""
from __future__ import annotations

import glob
import json
import random

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from dataflow import smoke
from dataflow.options import pipeline_options
from schemas import write_avro

BUCKET_S = 60


def make_events(n_users=5, per_user=40, seed=7):
    rng = random.Random(seed)
    events = []
    for u in range(n_users):
        for i in range(per_user):
            events.append({"request_id": f"r{u}-{i}", "user": f"user{u}",
                           "ts_ms": rng.randrange(0, 10 * BUCKET_S * 1000),
                           "value": round(rng.uniform(-5, 5), 3)})
    rng.shuffle(events)
    return events


def expected_summaries(events, bucket_s=BUCKET_S):
    """The simple model: group by (user, bucket) in plain Python."""
    groups: dict = {}
    for e in events:
        groups.setdefault((e["user"], e["ts_ms"] // (bucket_s * 1000)), []).append(e["value"])
    return [{"user": u, "bucket_start_ms": b * bucket_s * 1000, "count": len(v),
             "total": round(sum(sorted(v)), 6)} for (u, b), v in groups.items()]


def write_input(tmp_path, events, files=3):
    for i in range(files):
        write_avro(str(tmp_path / f"events-{i}.avro"), "smoke_event", events[i::files])
    return str(tmp_path / "events-*.avro")


def read_output(prefix):
    lines = []
    for path in glob.glob(prefix + "*"):
        with open(path, encoding="utf-8") as f:
            lines += [json.loads(line) for line in f if line.strip()]
    return lines


def sort_key(s):
    return (s["user"], s["bucket_start_ms"])


def run_and_check(tmp_path, extra_flags):
    events = make_events()
    pattern = write_input(tmp_path, events)
    out = str(tmp_path / "out" / "buckets")
    metrics = tmp_path / "metrics.json"
    smoke.main([f"--input={pattern}", f"--out={out}", f"--bucket_seconds={BUCKET_S}",
                f"--metrics_out={metrics}"] + extra_flags)
    got = sorted(read_output(out), key=sort_key)
    want = sorted(expected_summaries(events), key=sort_key)
    assert got == want
    counters = json.loads(metrics.read_text())["counters"]
    assert counters["smoke.events"] == len(events)
    assert counters["smoke.buckets"] == len(want)


def test_direct_runner_batch(tmp_path):
    run_and_check(tmp_path, ["--runner=DirectRunner"])


def test_direct_runner_streaming_test_stream():
    """Events arrive in three chunks with watermarks between them; a bucket whose end the
    watermark passed is emitted then, and later events of other buckets still arrive."""
    events = sorted(make_events(n_users=3, per_user=30), key=lambda e: e["ts_ms"])
    third = len(events) // 3
    chunks = [events[:third], events[third:2 * third], events[2 * third:]]
    stream = TestStream()
    for chunk in chunks:
        stream = stream.add_elements(
            [TimestampedValue(e, e["ts_ms"] / 1000.0) for e in chunk])
        # Watermark: the start of the bucket of the chunk's last event (nothing later is late).
        last_bucket_start = chunk[-1]["ts_ms"] // (BUCKET_S * 1000) * BUCKET_S
        stream = stream.advance_watermark_to(last_bucket_start)
    # Past the end of the last bucket before the end of the stream: the BundleBasedDirectRunner
    # does not deliver output of timers that fire only at the final +inf watermark to a
    # downstream GroupByKey (assert_that), and a real stream never ends anyway.
    stream = stream.advance_watermark_to(10 * BUCKET_S + 1)
    stream = stream.advance_watermark_to_infinity()

    options = pipeline_options(["--runner=DirectRunner", "--streaming"])
    with TestPipeline(options=options) as p:
        out = p | stream | smoke.SummariseBuckets(BUCKET_S)
        assert_that(out, equal_to(expected_summaries(events)))


@pytest.mark.flink
def test_flink_local(tmp_path, flink_job_server_jar):
    run_and_check(tmp_path, ["--runner=FlinkRunner", "--flink_master=[local]",
                             "--environment_type=LOOPBACK", "--parallelism=2"])


@pytest.mark.flink
@pytest.mark.slow
def test_flink_standalone_cluster(tmp_path, flink_cluster):
    run_and_check(tmp_path, ["--runner=FlinkRunner", f"--flink_master={flink_cluster.master}",
                             "--environment_type=LOOPBACK", "--parallelism=2"])
    assert any(j["status"] == "FINISHED" for j in flink_cluster.jobs())


def test_cli_help_lists_pipelines(capsys):
    from dataflow.__main__ import main
    assert main(["--help"]) == 0
    assert "smoke" in capsys.readouterr().out
    assert main(["smoke", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--bucket_seconds" in text and "--flink_master" in text and "--runner" in text


def test_our_flags_never_reach_beams_prefix_matching():
    """Beam parses flags with argparse prefix matching: `--out` would also set Beam's
    --output_executable_path (and make the Flink job server write a jar there)."""
    from apache_beam.options.pipeline_options import PortableOptions
    opts = pipeline_options(["--out=/tmp/x", "--input=a", "--runner=FlinkRunner",
                             "--flink_job_server_jar=/nonexistent.jar"], smoke.SmokeOptions)
    assert opts.view_as(PortableOptions).output_executable_path is None
    assert opts.view_as(smoke.SmokeOptions).out == "/tmp/x"
    assert opts.view_as(smoke.SmokeOptions).bucket_seconds == 60
