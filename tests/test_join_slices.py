"""The join in event-time slices (``dataflow.join_slices.join_in_slices``, the DirectRunner's default
on bounded input) against the join in one pipeline: the same example files (names and
records) and the same side outputs, on logs whose requests, actions and duplicates cross the slices'
boundaries."""
from __future__ import annotations

import glob
import json
import math
import os
import random

import fastavro
import pytest

from transforms.example_log import read_examples_in_order
from dataflow import join, join_slices
from dataflow.join_io import EXTRACTED_FEATURES_SCHEMA
from schemas import read_avro, write_avro
from test_join_pipeline import read_json_lines
from test_joiner import act, feat, reference_join
from test_strict_json import strict_files, strict_loads

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
HOUR = 3_600_000
W_S = 600
W = W_S * 1000
SIDE = ("unmatched", "late", "duplicates", "invalid", "dead_letter")


def crossing_logs(n=600, seed=3):
    """Four hours of requests, and at each hour boundary the cases a slice must hand on:
    clicks after the boundary on requests before it, an action a minute before its request
    (in the slice before), duplicate actions and feature records on both sides, actions
    hours late, actions of requests never served."""
    rng = random.Random(seed)
    features, actions = [], []
    for i in range(n):
        rid, ts = f"r{i:04d}", T0 + rng.randrange(0, 4 * HOUR)
        features.append(feat(rid, ts, user=f"u{i % 7}", item=f"i{i % 11}",
                             fids=[rng.randrange(2 ** 62) for _ in range(3)],
                             dense=[rng.randrange(64) / 8.0], served=rng.random()))
        for _ in range(rng.choice([0, 0, 1, 1, 2])):
            actions.append(act(rid, ts + rng.randrange(-30_000, W + 120_000),
                               rng.choice(["click", "click", "like", "dislike"])))
    for h in (1, 2, 3):
        edge = T0 + h * HOUR
        features += [feat(f"b{h}a", edge - 60_000), feat(f"b{h}b", edge - 1),
                     feat(f"b{h}c", edge + 30_000), feat(f"b{h}d", edge - 5_000)]
        actions += [act(f"b{h}a", edge + 120_000),                 # joins, in the next slice
                    act(f"b{h}a", edge + W - 60_001, "like"),     # its last joining moment
                    act(f"b{h}a", edge + W - 60_000 + 1, "share"),  # 1 ms late
                    act(f"b{h}b", edge + 1), act(f"b{h}b", edge + 2),  # a duplicate action
                    act(f"b{h}c", edge - 60_000),                 # before it was served
                    act(f"b{h}d", edge + 3 * HOUR // 2),          # hours late: a later slice
                    act(f"never{h}", edge + 10), act(f"never{h}", edge - 10, "like")]
        features += [feat(f"b{h}b", edge + HOUR // 2, item="again"),  # a duplicate, later slice
                     feat(f"b{h}c", edge - 1000, item="earlier")]     # wins over b{h}c
    features += [feat("", T0 + 5), feat("neg-fid", T0 + HOUR + 5, fids=[-1])]  # invalid
    return features, actions


def write_hourly(folder, features, actions):
    """Hourly ``part-YYYYmmdd-HH.avro`` files, as ``dataflow.data`` names them (records in
    any order within a file), but hour 1's files also hold every 50th record of hours 3 and
    later (a slice hands them on); plus one damaged action file."""
    for kind, records in (("features", features), ("actions", actions)):
        os.makedirs(folder / kind)
        by_hour: dict = {}
        for i, r in enumerate(records):
            hour = (r["ts_ms"] - T0) // HOUR
            by_hour.setdefault(1 if hour >= 3 and i % 50 == 0 else hour, []).append(r)
        for hour, rs in by_hour.items():
            path = str(folder / kind / f"part-20240101-{hour:02d}.avro")
            if kind == "features":
                with open(path, "wb") as f:
                    fastavro.writer(f, EXTRACTED_FEATURES_SCHEMA, rs)
            else:
                write_avro(path, "action_log", rs)
    (folder / "actions" / "part-20240101-09.avro").write_bytes(b"Obj\x01 not quite Avro")
    return str(folder / "features" / "*.avro"), str(folder / "actions" / "*.avro")


def run(out, features_glob, actions_glob, slice_s, *flags):
    metrics = f"{out}.metrics.json"
    join.main([f"--features={features_glob}", f"--actions={actions_glob}", f"--out={out}",
               f"--join_window_s={W_S}", f"--slice_s={slice_s}", "--slice_min_bytes=0",
               f"--metrics_out={metrics}",
               "--runner=DirectRunner", *flags])
    strict_files(out)  # raises on NaN or infinity
    with open(metrics, encoding="utf-8") as f:
        return strict_loads(f.read())["counters"]


def example_files(out):
    """{file name: its records} of an example log (the bytes differ by Avro's random sync
    marker only)."""
    paths = sorted(glob.glob(os.path.join(out, "examples", "*.avro")))
    return {os.path.basename(p): read_avro(p) for p in paths}


def side_files(out, kind):
    return sorted(os.listdir(os.path.join(out, kind))) if os.path.isdir(
        os.path.join(out, kind)) else []


def canonical(records):
    return sorted(json.dumps(r, sort_keys=True) for r in records)


def assert_same_output(one, sliced):
    assert example_files(sliced) == example_files(one)
    for kind in SIDE:
        assert canonical(read_json_lines(os.path.join(sliced, kind))) == canonical(
            read_json_lines(os.path.join(one, kind))), kind
        # The same files too, but for late and duplicate records: the joiner files those by
        # the event time at which it classified them, which depends on arrival order (a late
        # action that comes after its features is filed at its own time, one that comes
        # before at its window's end).
        if kind not in ("late", "duplicates"):
            assert side_files(sliced, kind) == side_files(one, kind), kind
    assert not os.path.exists(os.path.join(sliced, ".slices"))


@pytest.mark.slow
def test_slices_equal_one_pipeline_across_boundaries(tmp_path):
    features, actions = crossing_logs()
    features_glob, actions_glob = write_hourly(tmp_path / "in", features, actions)
    flags = ("--negative_sample_rate=0.5", "--shards_per_period=2")
    one = run(tmp_path / "one", features_glob, actions_glob, 0, *flags)
    sliced = run(tmp_path / "sliced", features_glob, actions_glob, 3600, *flags)
    assert_same_output(str(tmp_path / "one"), str(tmp_path / "sliced"))

    # ... and both are the joiner's rules.
    valid = [f for f in features if f["request_id"] and min(f["fids"]) >= 0]
    want = reference_join(valid, actions, window_ms=W, rate=0.5)
    got = list(read_examples_in_order(str(tmp_path / "sliced" / "examples")))
    assert got == sorted(want["examples"], key=lambda e: (e["ts_ms"], e["request_id"]))
    for kind, names in (("unmatched", ["unmatched_actions"]), ("late", ["late_actions"]),
                        ("duplicates", ["duplicate_actions", "duplicate_features"])):
        assert canonical(read_json_lines(tmp_path / "sliced" / kind)) == canonical(
            sum((want[n] for n in names), [])), kind
    late = {a["request_id"] for a in want["late_actions"]}
    assert {"b1a", "b2d", "b3d"} <= late          # 1 ms late; hours late, in a later slice
    assert {"never1", "never3"} <= {a["request_id"] for a in want["unmatched_actions"]}
    assert {"b1b", "b2b"} <= {f["request_id"] for f in want["duplicate_features"]}
    dead = read_json_lines(tmp_path / "sliced" / "dead_letter")
    assert [d["reason"] for d in dead] == ["unreadable_file"]

    # The counters of the slices add up to one pipeline's.
    for name in ("joiner.features", "joiner.actions", "joiner.examples", "joiner.positives",
                 "joiner.negatives", "joiner.negatives_sampled_out", "joiner.late_actions",
                 "joiner.unmatched_actions", "joiner.duplicate_actions",
                 "joiner.duplicate_features", "joiner.invalid_records", "sources.files_read",
                 "sources.records_read"):
        assert sliced.get(name) == one.get(name), name
    assert sliced["joiner.keys_opened"] == sliced["joiner.keys_closed"]
    assert sliced["join.features_handed_on"] >= 3  # hour 1's file: records of hours 3, 4
    assert sliced["join.actions_handed_on"] > 0


@pytest.mark.slow
def test_slices_of_a_synthetic_stream_with_feature_extraction(tmp_path):
    """``dataflow.data synth`` logs (hourly files), raw feature logs extracted with a config."""
    from dataflow import data
    data.synth(tmp_path / "logs", requests=3000, users=200, items=300, days=0.25, seed=1)
    logs = tmp_path / "logs"
    globs = (str(logs / "feature_log" / "*.avro"), str(logs / "action_log" / "*.avro"))
    # a short window: clicks later than it come late, in this slice or the next
    run(tmp_path / "one", *globs, 0, "--config=synthetic", "--join_window_s=60")
    run(tmp_path / "sliced", *globs, 3600, "--config=synthetic", "--join_window_s=60")
    assert_same_output(str(tmp_path / "one"), str(tmp_path / "sliced"))
    assert len(example_files(tmp_path / "sliced")) == 6
    assert read_json_lines(tmp_path / "sliced" / "late"), "the stream should have late clicks"


@pytest.mark.slow
def test_a_record_earlier_than_its_file_name_undoes_the_slices(tmp_path, caplog):
    """Hour 1's file holds a request of hour 0 (a writer that files late records in its
    open period): hour 0 is joined already, so the join runs again in one pipeline."""
    os.makedirs(tmp_path / "in")
    files = {0: [feat("a", T0 + 10)], 1: [feat("b", T0 + HOUR + 10), feat("c", T0 + HOUR - 20)],
             2: [feat("d", T0 + 2 * HOUR + 10)]}
    for hour, records in files.items():
        with open(tmp_path / "in" / f"part-20240101-{hour:02d}.avro", "wb") as f:
            fastavro.writer(f, EXTRACTED_FEATURES_SCHEMA, records)
    write_avro(str(tmp_path / "part-20240101-00.avro"), "action_log",
               [act("a", T0 + 50), act("c", T0 + HOUR + 50)])
    globs = str(tmp_path / "in" / "*.avro"), str(tmp_path / "part-*.avro")
    run(tmp_path / "one", *globs, 0)
    with caplog.at_level("WARNING", logger="dataflow.join_slices"):
        run(tmp_path / "sliced", *globs, 3600)
    assert "joining again in one pipeline" in caplog.text
    assert_same_output(str(tmp_path / "one"), str(tmp_path / "sliced"))
    assert [e["label"] for e in read_examples_in_order(str(tmp_path / "sliced"
                                                                / "examples"))] == [1, 1, 0, 0]


def test_files_named_otherwise_join_in_one_pipeline(tmp_path):
    assert join_slices.plan_slices(["features-0.avro"], ["part-20240101-00.avro"], HOUR, W) is None


def test_a_slice_that_hands_nothing_on(tmp_path):
    os.makedirs(tmp_path / "in")
    for hour in range(3):
        with open(tmp_path / "in" / f"part-20240101-{hour:02d}.avro", "wb") as f:
            fastavro.writer(f, EXTRACTED_FEATURES_SCHEMA, [feat(f"r{hour}", T0 + hour * HOUR)])
    write_avro(str(tmp_path / "part-20240101-00.avro"), "action_log", [act("r0", T0 + 50)])
    globs = str(tmp_path / "in" / "*.avro"), str(tmp_path / "part-*.avro")
    c = run(tmp_path / "sliced", *globs, 3600)
    assert c.get("join.actions_handed_on", 0) == c.get("join.features_handed_on", 0) == 0
    # Every output folder, those with nothing in them too.
    assert sorted(os.listdir(tmp_path / "sliced")) == sorted(("examples",) + SIDE)
    assert all(side_files(tmp_path / "sliced", kind) == [] for kind in SIDE)
    assert [e["label"] for e in read_examples_in_order(
        str(tmp_path / "sliced" / "examples"))] == [1, 0, 0]


def test_a_record_handed_on_keeps_its_nan(tmp_path):
    """Hour 0's file holds a feature record of hour 2 with a NaN score: handed on twice, it
    is still invalid when its slice joins it (the output shows the NaN as null)."""
    os.makedirs(tmp_path / "in")
    files = {0: [feat("r0", T0 + 10), feat("nan", T0 + 2 * HOUR + 10, served=math.nan)],
             1: [feat("r1", T0 + HOUR + 10)], 2: [feat("r2", T0 + 2 * HOUR + 20)]}
    for hour, records in files.items():
        with open(tmp_path / "in" / f"part-20240101-{hour:02d}.avro", "wb") as f:
            fastavro.writer(f, EXTRACTED_FEATURES_SCHEMA, records)
    write_avro(str(tmp_path / "part-20240101-02.avro"), "action_log",
               [act("nan", T0 + 2 * HOUR + 50)])
    globs = str(tmp_path / "in" / "*.avro"), str(tmp_path / "part-*.avro")
    run(tmp_path / "one", *globs, 0)
    c = run(tmp_path / "sliced", *globs, 3600)
    assert c["join.features_handed_on"] == 2
    assert_same_output(str(tmp_path / "one"), str(tmp_path / "sliced"))
    [invalid] = read_json_lines(tmp_path / "sliced" / "invalid")
    assert invalid["error"] == "served_score must be finite"
    assert invalid["record"]["served_score"] is None
