"""The join pipeline end to end: Avro in, the example log out, on the DirectRunner (batch and
streaming) and Flink [local], checked exactly against the joiner's rules in plain Python."""
from __future__ import annotations

import glob
import json
import math
import os
import random
import re
import zlib

import apache_beam as beam
import fastavro
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from dataflow import join
from dataflow.join_io import EXTRACTED_FEATURES_SCHEMA
from transforms.example_log import WriteExampleLog, read_examples_in_order
from transforms.joiner import OnlineJoiner
from dataflow.options import pipeline_options
from schemas import read_avro, write_avro
from test_joiner import act, direct_runner_metrics, feat, reference_join  # noqa: F401
from test_strict_json import strict_files, strict_loads

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
FILE_NAME = re.compile(r"(?P<period>\d{8}T\d{6}Z)-(?P<shard>\d{5})-of-(?P<shards>\d{5})"
                       r"-[0-9a-f]{8}\.avro")
HOUR = 3_600_000
W_S = 600
W = W_S * 1000


def make_logs(n=400, seed=5):
    """Requests over three hours: clicks, likes, dislikes, repeats, late and orphan actions,
    duplicate feature records and three invalid ones."""
    rng = random.Random(seed)
    features, actions = [], []
    for i in range(n):
        rid, ts = f"req{i:04d}", T0 + rng.randrange(0, 3 * HOUR)
        if rng.random() < 0.93:
            features.append(feat(rid, ts, user=f"u{i % 13}", item=f"i{i % 29}",
                                 fids=[rng.randrange(2 ** 62) for _ in range(4)],
                                 dense=[rng.randrange(64) / 8.0],  # exact in Avro float
                                 served=rng.random(), ctr=rng.choice([None, 0.25])))
            if rng.random() < 0.03:
                features.append(feat(rid, ts + rng.randrange(1, 9000), item="again"))
        for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):
            actions.append(act(rid, ts + rng.randrange(-1000, W + 60_000),
                               rng.choice(["click", "click", "like", "share", "dislike"])))
    features.append(feat("", T0))                      # invalid: empty request id
    features.append(feat("neg-fid", T0, fids=[-1]))    # invalid: negative fid
    features.append(feat("nan", T0, served=math.nan))  # invalid: NaN score (null in invalid/)
    rng.shuffle(features)
    rng.shuffle(actions)
    return features, actions


def valid_features(features):
    """What the joiner accepts of :func:`make_logs`' feature records."""
    return [f for f in features if f["request_id"] and min(f["fids"]) >= 0
            and math.isfinite(f["served_score"])]


def write_inputs(tmp_path, features, actions, files=3):
    os.makedirs(tmp_path / "in", exist_ok=True)
    for i in range(files):
        with open(tmp_path / "in" / f"features-{i}.avro", "wb") as f:
            fastavro.writer(f, EXTRACTED_FEATURES_SCHEMA, features[i::files])
        write_avro(str(tmp_path / "in" / f"actions-{i}.avro"), "action_log", actions[i::files])
    return str(tmp_path / "in" / "features-*.avro"), str(tmp_path / "in" / "actions-*.avro")


def read_json_lines(folder):
    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f]
    return rows


def canonical(records):
    return sorted(json.dumps(r, sort_keys=True) for r in records)


def run_and_check(tmp_path, flags, n=400, shards=2, rate=0.5):
    features, actions = make_logs(n)
    features_glob, actions_glob = write_inputs(tmp_path, features, actions)
    out, metrics = tmp_path / "out", tmp_path / "metrics.json"
    join.main([f"--features={features_glob}", f"--actions={actions_glob}", f"--out={out}",
               f"--join_window_s={W_S}", f"--negative_sample_rate={rate}",
               f"--shards_per_period={shards}", f"--metrics_out={metrics}", *flags])
    want = reference_join(valid_features(features), actions, window_ms=W, rate=rate)

    # The example log: read back in event-time order, exactly the rules' examples.
    examples = list(read_examples_in_order(str(out / "examples")))
    assert examples == sorted(want["examples"], key=lambda e: (e["ts_ms"], e["request_id"]))
    assert {e["label"] for e in examples} == {0, 1}

    # Layout: one file per (served hour, shard); each sorted, holding only its hour/shard.
    files = sorted(os.listdir(out / "examples"))
    names = [FILE_NAME.fullmatch(name) for name in files]
    assert all(names), files
    assert [(m["period"], int(m["shard"]), int(m["shards"])) for m in names] == [
        (f"20240101T{h:02d}0000Z", s, shards) for h in range(3) for s in range(shards)]
    for name, m in zip(files, names):
        hour, shard = int(m["period"][9:11]), int(m["shard"])
        records = read_avro(str(out / "examples" / name))
        assert records == sorted(records, key=lambda e: (e["ts_ms"], e["request_id"]))
        assert all(T0 + hour * HOUR <= e["ts_ms"] < T0 + (hour + 1) * HOUR for e in records)
        assert all(zlib.crc32(e["request_id"].encode()) % shards == shard for e in records)

    # Side outputs.
    assert canonical(read_json_lines(out / "unmatched")) == canonical(want["unmatched_actions"])
    assert canonical(read_json_lines(out / "late")) == canonical(want["late_actions"])
    assert canonical(read_json_lines(out / "duplicates")) == canonical(
        want["duplicate_actions"] + want["duplicate_features"])
    invalid = read_json_lines(out / "invalid")
    assert sorted((r["kind"], r["error"]) for r in invalid) == [
        ("features", "fids must be a list of integers in [0, 2**63)"),
        ("features", "request_id is empty"), ("features", "served_score must be finite")]
    assert [r["record"]["served_score"] for r in invalid if r["record"]["request_id"] == "nan"
            ] == [None]
    for side in ("unmatched_actions", "late_actions", "duplicate_actions",
                 "duplicate_features"):
        assert want[side], f"the data should exercise {side}"

    # Every output folder, the empty dead_letter/ too; strict JSON (no NaN) everywhere.
    assert sorted(os.listdir(out)) == sorted(
        ["examples", "unmatched", "late", "duplicates", "invalid", "dead_letter"])
    assert os.listdir(out / "dead_letter") == []
    assert strict_files(out)

    c = strict_loads(metrics.read_text())["counters"]
    assert c["joiner.examples"] == len(want["examples"])
    assert c["joiner.late_actions"] == len(want["late_actions"])
    assert c["joiner.unmatched_actions"] == len(want["unmatched_actions"])
    assert c["joiner.invalid_records"] == 3
    assert c["joiner.keys_opened"] == c["joiner.keys_closed"]
    assert c["joiner.negatives"] - c["joiner.negatives_sampled_out"] == sum(
        1 for e in want["examples"] if e["label"] == 0)


def test_direct_runner_batch(tmp_path):
    run_and_check(tmp_path, ["--runner=DirectRunner"])


@pytest.mark.flink
@pytest.mark.parametrize("mode", ["batch", "streaming"])
def test_flink_local(tmp_path, flink_job_server_jar, mode):
    """Batch: Flink's DataSet translation. Streaming (bounded input, --streaming): windows
    fire as the watermark passes them, and Flink fires an extra empty pane per window at
    garbage collection, reported as on-time (see transforms.event_time_files._WriteSortedFile)."""
    run_and_check(tmp_path, ["--runner=FlinkRunner", "--flink_master=[local]",
                             "--environment_type=LOOPBACK", "--parallelism=2",
                             *(["--streaming"] if mode == "streaming" else [])], n=200)


def test_streaming_example_log_writes_each_period_once_and_late_records_apart(
        tmp_path, direct_runner_metrics):
    """On a stream, an hour's examples are written once the watermark passes the hour plus
    the join window; an example that becomes final later (its features came late) goes to
    an extra file of its hour, and the merged read is still in order."""
    def stamped(records):
        return [TimestampedValue(r, r["ts_ms"] / 1000.0) for r in records]

    early = [feat("a", T0 + 1000), feat("b", T0 + 2000), feat("c", T0 + HOUR + 5)]
    clicks = [act("a", T0 + 5000), act("c", T0 + HOUR + 60_000)]
    stream = (TestStream()
              .add_elements(stamped(early + clicks))
              .advance_watermark_to((T0 + HOUR + W + 1) / 1000.0)    # hour 0 is final
              .add_elements(stamped([feat("z", T0 + 3000)]))          # hour 0, but late
              .advance_watermark_to((T0 + 3 * HOUR + W) / 1000.0)
              .advance_watermark_to_infinity())
    out = str(tmp_path / "examples")
    options = pipeline_options(["--runner=DirectRunner", "--streaming"])
    with beam.Pipeline(options=options) as p:
        records = p | stream
        joined = ((records | "F" >> beam.Filter(lambda r: "fids" in r),
                   records | "A" >> beam.Filter(lambda r: "action" in r))
                  | OnlineJoiner(join_window_s=W_S))
        joined.examples | WriteExampleLog(out, join_window_s=W_S)

    files = sorted((FILE_NAME.fullmatch(name)["period"],
                    [e["request_id"] for e in read_avro(os.path.join(out, name))])
                   for name in os.listdir(out))
    assert files == [("20240101T000000Z", ["a", "b"]), ("20240101T000000Z", ["z"]),
                     ("20240101T010000Z", ["c"])]
    assert [e["request_id"] for e in read_examples_in_order(out + "/*.avro")] == \
        ["a", "b", "z", "c"]


def test_read_examples_in_order_merges_files(tmp_path):
    def ex(rid, ts):
        return {"request_id": rid, "ts_ms": ts, "user_id": "u", "item_id": "i", "fids": [1],
                "label": 0}
    write_avro(str(tmp_path / "x.avro"), "example", [ex("b", 1), ex("d", 4), ex("e", 4)])
    write_avro(str(tmp_path / "y.avro"), "example", [ex("a", 1), ex("c", 2), ex("f", 9)])
    write_avro(str(tmp_path / "z.avro"), "example", [])
    (tmp_path / "x.avro.tmp-123").write_bytes(b"half a file")  # a write in progress
    order = [e["request_id"] for e in read_examples_in_order(str(tmp_path))]
    assert order == ["a", "b", "c", "d", "e", "f"]
    assert [e["request_id"] for e in read_examples_in_order(str(tmp_path / "y*"))] == \
        ["a", "c", "f"]
    assert list(read_examples_in_order(str(tmp_path / "nothing-*.avro"))) == []


def test_cli_lists_the_join_pipeline(capsys):
    from dataflow.__main__ import main
    assert main(["--help"]) == 0
    assert "join" in capsys.readouterr().out
    assert main(["join", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--join_window_s" in text and "--negative_sample_rate" in text


def test_refuses_to_mix_into_an_existing_example_log(tmp_path):
    (tmp_path / "out" / "examples").mkdir(parents=True)
    (tmp_path / "out" / "examples" / "20240101T000000Z-00000-of-00001-0123abcd.avro").touch()
    with pytest.raises(SystemExit, match="--append"):
        join.main(["--features=x", "--actions=y", f"--out={tmp_path / 'out'}"])


def test_damaged_log_files_are_dead_lettered_and_the_join_goes_on(tmp_path):
    """A feature log and an action log cut short (a crashed writer): the join finishes, what
    can still be read of them is joined exactly as the rules say, and the damage is in
    ``dead_letter/`` with its reason and file, for actions as for features."""
    from transforms.avro_recovery import read_avro_file
    features, actions = make_logs(300, seed=11)
    features_glob, actions_glob = write_inputs(tmp_path, features, actions)
    readable = {}
    for name in ("features-1.avro", "actions-2.avro"):
        path = tmp_path / "in" / name
        data = path.read_bytes()
        path.write_bytes(data[:len(data) * 2 // 3])
        readable[name], _ = read_avro_file(path.read_bytes(), str(path))
    kept_features = [f for i in range(3) for f in (
        readable["features-1.avro"] if i == 1 else features[i::3])]
    kept_actions = [a for i in range(3) for a in (
        readable["actions-2.avro"] if i == 2 else actions[i::3])]
    assert len(kept_features) < len(features) and len(kept_actions) < len(actions)
    out = tmp_path / "out"
    join.main([f"--features={features_glob}", f"--actions={actions_glob}", f"--out={out}",
               f"--join_window_s={W_S}", "--negative_sample_rate=1.0"])
    want = reference_join(valid_features(kept_features), kept_actions, window_ms=W, rate=1.0)
    examples = list(read_examples_in_order(str(out / "examples")))
    assert examples == sorted(want["examples"], key=lambda e: (e["ts_ms"], e["request_id"]))
    dead = read_json_lines(out / "dead_letter")
    assert sorted((os.path.basename(d["file"]), d["reason"]) for d in dead) == [
        ("actions-2.avro", "truncated"), ("features-1.avro", "truncated")], dead
