"""The join read in event-time order (``dataflow join --ordered_read``, on by default for
``--streaming`` on Flink): the reader takes one log file a call and leaves the watermark at
the next file's start, so the joiner emits as the files go by; the output is the DirectRunner's
one read's, and inputs it cannot read so fall back to one read."""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import time

import fastavro
import pytest
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.pvalue import TaggedOutput
from apache_beam.runners.sdf_utils import RestrictionTrackerView, ThreadsafeRestrictionTracker
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp

from transforms.example_log import read_examples_in_order
from dataflow import join
from dataflow.join_io import EXTRACTED_FEATURES_SCHEMA
from schemas import write_avro
from test_joiner import act, feat
from transforms import sources, tail

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
HOUR = 3_600_000
W_S = 600
W = W_S * 1000
HOURS = 5


def hour_file(folder, hour: int) -> str:
    return os.path.join(folder, f"part-20240101-{hour:02d}.avro")


def make_hourly_logs(folder, n=300, seed=11):
    """Extracted feature records and actions over HOURS hours, one file an hour named by its
    start: clicks, repeats, actions before their features, late ones (some later than the
    window plus the default late horizon), orphans, repeated feature records, an invalid
    record and a damaged action file (dead letters)."""
    rng = random.Random(seed)
    features, actions = [], []
    for i in range(n):
        rid, ts = f"r{i:04d}", T0 + rng.randrange(0, HOURS * HOUR - 3 * W)
        if rng.random() < 0.95:
            features.append(feat(rid, ts, user=f"u{i % 7}", item=f"i{i % 11}",
                                 fids=[rng.randrange(2 ** 62) for _ in range(3)]))
            if rng.random() < 0.05:
                features.append(feat(rid, ts + rng.randrange(1, 5000), item="again"))
        for _ in range(rng.choice([0, 1, 1, 2])):
            actions.append(act(rid, ts + rng.randrange(-2000, 3 * W),
                               rng.choice(["click", "like", "dislike"])))
    features.append(feat("", T0 + 5))  # invalid: empty request id
    os.makedirs(os.path.join(folder, "features"))
    os.makedirs(os.path.join(folder, "actions"))
    for hour in range(HOURS):
        lo, hi = T0 + hour * HOUR, T0 + (hour + 1) * HOUR
        with open(hour_file(os.path.join(folder, "features"), hour), "wb") as f:
            fastavro.writer(f, EXTRACTED_FEATURES_SCHEMA,
                            sorted((r for r in features if lo <= r["ts_ms"] < hi),
                                   key=lambda r: r["ts_ms"]))
        write_avro(hour_file(os.path.join(folder, "actions"), hour), "action_log",
                   [a for a in actions if lo <= a["ts_ms"] < hi])
    with open(hour_file(os.path.join(folder, "actions"), HOURS), "wb") as f:
        f.write(b"Obj\x01 not an Avro file")  # an unreadable file: a dead letter
    return (os.path.join(folder, "features", "*.avro"),
            os.path.join(folder, "actions", "*.avro"))


def output_records(out) -> dict:
    """Every output folder's records, sorted (file names aside)."""
    records = {"examples": sorted(json.dumps(e, sort_keys=True)
                                  for e in read_examples_in_order(str(out / "examples")))}
    for kind in ("unmatched", "late", "duplicates", "invalid", "dead_letter"):
        rows = []
        for path in glob.glob(str(out / kind / "*.jsonl")):
            with open(path, encoding="utf-8") as f:
                rows += [json.dumps(json.loads(line), sort_keys=True) for line in f]
        records[kind] = sorted(rows)
    return records


def run_join(features, actions, out, *flags):
    join.main([f"--features={features}", f"--actions={actions}", f"--out={out}",
               f"--join_window_s={W_S}", "--negative_sample_rate=0.5", "--shards_per_period=2",
               f"--metrics_out={out}.metrics.json", *flags])
    return json.loads(open(f"{out}.metrics.json").read())["counters"]


def test_reader_takes_a_file_a_call_and_leaves_the_watermark_at_the_next_files_start(tmp_path):
    """What a runner sees of ``TailAvroFilesFn(read_once=True)``: each ``process`` call
    reads one file, in name order, and returns with the rest deferred (no delay) and the
    watermark at the next file's start; the call after the last file completes the
    restriction. A damaged file's dead letters come at its start, on time."""
    folder = tmp_path / "logs"
    folder.mkdir()
    for hour in (0, 1, 3):  # (no file for hour 2)
        write_avro(hour_file(str(folder), hour), "action_log",
                   [act(f"h{hour}-{i}", T0 + hour * HOUR + i * 1000, "click") for i in range(3)])
    with open(hour_file(str(folder), 4), "wb") as f:
        f.write(b"damaged")
    fn = tail.TailAvroFilesFn(0, MAX_TIMESTAMP, read_once=True)
    estimator = ManualWatermarkEstimator(None)
    restriction = OffsetRange(0, tail.NO_END)
    calls = []
    for _ in range(10):
        tracker = ThreadsafeRestrictionTracker(OffsetRestrictionTracker(restriction))
        out = list(fn.process(str(folder / "*.avro"), tracker=RestrictionTrackerView(tracker),
                              watermark=estimator))
        tracker.check_done()
        records = [r.value["request_id"] for r in out if not isinstance(r, TaggedOutput)]
        dead = [(d.value.value["reason"], d.value.timestamp) for d in out
                if isinstance(d, TaggedOutput)]
        deferred = tracker.deferred_status()
        # deferred: resume at once (a delay of at most 0 from now)
        calls.append((records, dead, estimator.current_watermark(),
                      None if deferred is None else deferred[1] <= 0))
        if deferred is None:
            break
        restriction = deferred[0]
        estimator = ManualWatermarkEstimator(estimator.get_estimator_state())

    def at(hour):
        return Timestamp(micros=(T0 + hour * HOUR) * 1000)
    assert calls == [
        (["h0-0", "h0-1", "h0-2"], [], at(1), True),
        (["h1-0", "h1-1", "h1-2"], [], at(3), True),
        (["h3-0", "h3-1", "h3-2"], [], at(4), True),
        ([], [("unreadable_file", at(4))], at(4), None)]


def test_records_earlier_than_their_file_name_are_counted_and_the_join_reads_once(
        tmp_path, caplog):
    """A file holding a record earlier than its name says (so, behind the watermark the file
    before left): the ordered join is undone and one read joins the input, with a warning;
    the output is the one read's. Names without a start: one read, with a warning."""
    features, actions = make_hourly_logs(str(tmp_path / "in"))
    # hour 3's action file gets a record of hour 1
    path = hour_file(str(tmp_path / "in" / "actions"), 3)
    with open(path, "rb") as f:
        records = list(fastavro.reader(f))
    records.append(act("r-early", T0 + HOUR + 5, "click"))
    write_avro(path, "action_log", records)
    want = output_records_of(run_join, features, actions, tmp_path / "want2", "--slice_s=0",
                             "--ordered_read=off")
    with caplog.at_level(logging.WARNING):
        counters = run_join(features, actions, tmp_path / "got", "--ordered_read=on")
    assert "earlier than their file names say" in caplog.text
    assert output_records(tmp_path / "got") == want
    assert "sources.records_behind_watermark" not in counters  # the one read's metrics

    os.rename(path, str(tmp_path / "in" / "actions" / "late-ones.avro"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_join(features, actions, tmp_path / "got2", "--ordered_read=on")
    assert "not read in event-time order" in caplog.text
    assert output_records(tmp_path / "got2") == want  # (the same records, renamed)


def output_records_of(run, features, actions, out, *flags):
    run(features, actions, out, *flags)
    return output_records(out)


@pytest.mark.flink
def test_flink_ordered_join_equals_the_direct_runner_and_emits_before_the_last_file(
        tmp_path, flink_job_server_jar, monkeypatch):
    """Flink [local] --streaming over hourly files: the first hour's example file is written
    while the last feature file has not been read yet (the reader waits for it there, up to
    30 s; a read that holds the watermark to the end never writes it first), and the output
    records equal the DirectRunner's one read, dead letters, late actions (some later than
    the window plus its default horizon) and repeated feature records included."""
    features, actions = make_hourly_logs(str(tmp_path / "in"))
    want_counters = run_join(features, actions, tmp_path / "want", "--slice_s=0",
                             "--ordered_read=off")
    want = output_records(tmp_path / "want")
    assert want["late"] and want["duplicates"] and want["dead_letter"] and want["unmatched"]

    out = tmp_path / "got"
    first_hour = str(out / "examples" / "20240101T000000Z-*.avro")
    last = hour_file(str(tmp_path / "in" / "features"), HOURS - 1)
    seen = {}
    read = sources.LogFileReader.read

    def read_waiting(self, path, open_file):  # runs in this process (LOOPBACK)
        if path == last:
            deadline = time.time() + 30
            while not glob.glob(first_hour) and time.time() < deadline:
                time.sleep(0.1)
            seen["first hour written before the last file"] = bool(glob.glob(first_hour))
        return read(self, path, open_file)
    monkeypatch.setattr(sources.LogFileReader, "read", read_waiting)
    counters = run_join(features, actions, out, "--runner=FlinkRunner",
                        "--flink_master=[local]", "--environment_type=LOOPBACK",
                        "--parallelism=2", "--streaming")
    assert seen == {"first hour written before the last file": True}
    assert output_records(out) == want
    for name in ("joiner.examples", "joiner.late_actions", "joiner.unmatched_actions",
                 "joiner.duplicate_features"):
        assert counters[name] == want_counters[name], name
    assert counters["joiner.keys_opened"] == counters["joiner.keys_closed"]
    assert "sources.records_behind_watermark" not in counters

