"""Bad input never kills a job and is never lost (issue #7, part 3).

Random and malformed records (wrong types, missing fields, NaN and infinite numbers, huge
lists, unknown fields, invalid UTF-8, event times no runner or PS can hold, a foreign writer
schema) and truncated Avro files go through the real transforms on the DirectRunner:
``ReadFeatureLogs`` / ``ReadActionLogs`` → ``ExtractFeatures`` → ``OnlineJoiner``. Every
record written is accounted for exactly once: an example (good records), a dead letter with
its reason (bad records: reader, extractor or joiner), or a reader damage report that says how
many records a truncated block took (``records_lost``). ``good + bad + lost == tried``.

The per-record functions (``read_avro_file``, ``event_time``, the joiner's validation) are
fuzzed with many examples; the pipeline with a few large mixed batches, one run each.
``TOTALS`` adds up what was tried; the last test prints it (docs/reliability.md quotes it).
"""
from __future__ import annotations

import io
import json
import math
import os
import time

import apache_beam as beam
import apache_beam.testing.util
import fastavro
from apache_beam.coders import FastPrimitivesCoder
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dataflow.job import metrics_dict
from dataflow.options import pipeline_options
from schemas import load_schema, strict_json
from transforms.features import ExtractFeatures
from transforms.joiner import (MAX_TS_MS, KeyByRequest, OnlineJoiner, action_error,
                               features_error)
from transforms.avro_recovery import RECORD_COUNT_KEY, read_avro_file
from transforms.sources import BadRecord, ReadActionLogs, ReadFeatureLogs, event_time
from transforms.tail import TailAvroLogs

T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
JOIN_WINDOW_S = 60
TOTALS = {"pipeline_runs": 0, "features_tried": 0, "actions_tried": 0, "good_out": 0,
          "bad_dead_lettered": 0, "lost_counted": 0, "lost_uncounted": 0,
          "truncated_files": 0, "record_fuzz_examples": 0, "stream_tried": 0,
          "stream_good": 0, "stream_dead_lettered": 0, "stream_lost_counted": 0}


# ------------------------------------------------------------------ the per-record functions

SIMPLE = fastavro.parse_schema({"type": "record", "name": "Simple", "fields": [
    {"name": "ts_ms", "type": "long"}, {"name": "name", "type": "string"},
    {"name": "tags", "type": {"type": "array", "items": "string"}}]})


def avro_bytes(records, schema=SIMPLE, codec="deflate", sync_interval=300,
               declare=False) -> bytes:
    buf = io.BytesIO()
    fastavro.writer(buf, schema, records, codec=codec, sync_interval=sync_interval,
                    metadata={RECORD_COUNT_KEY: str(len(records))} if declare else None)
    return buf.getvalue()


simple_records = st.lists(st.builds(
    lambda i, name, tags: {"ts_ms": i, "name": name, "tags": tags},
    st.integers(-2 ** 62, 2 ** 62), st.text(max_size=12),
    st.lists(st.text(max_size=4), max_size=5)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None)
@given(records=simple_records, cut=st.floats(0, 1, exclude_max=True),
       codec=st.sampled_from(["null", "deflate"]), sync_interval=st.sampled_from([50, 300, 4000]),
       declare=st.booleans())
def test_a_truncated_file_gives_its_readable_prefix_and_counts_the_rest(records, cut, codec,
                                                                       sync_interval, declare):
    data = avro_bytes(records, codec=codec, sync_interval=sync_interval, declare=declare)
    cut_data = data[:int(cut * len(data))]
    got, dead = read_avro_file(cut_data, "cut.avro")
    TOTALS["record_fuzz_examples"] += 1
    assert got == records[:len(got)]  # exactly the records before the damage, in order
    assert all(d["file"] == "cut.avro" for d in dead)
    assert {d["reason"] for d in dead} <= {"truncated", "unreadable_file"}
    if len(got) == len(records):  # cut inside the last sync marker: damage, nothing lost
        assert all(d["records_lost"] == 0 if declare else d["records_lost"] in (0, None)
                   for d in dead)
    elif declare:  # the header's record count: the damage is always seen and counted,
        assert dead  # unless the header itself is cut
        if [d["reason"] for d in dead] != ["unreadable_file"]:
            assert len(got) + sum(d["records_lost"] for d in dead) == len(records)
    elif dead:
        lost = [d["records_lost"] for d in dead]
        if None not in lost:  # the block header was readable: it says how many were lost
            assert len(got) + sum(lost) == len(records)
    else:  # undeclared and unnoticed: only a cut exactly after a block (a valid Avro file)
        assert list(fastavro.reader(io.BytesIO(cut_data))) == got


@settings(max_examples=150, deadline=None)
@given(records=simple_records, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                        st.integers(0, 7)), min_size=1,
                                              max_size=4),
       codec=st.sampled_from(["null", "deflate"]))
def test_corrupt_bytes_never_raise(records, flips, codec):
    """Flipped bits anywhere (Avro has no checksums: what still decodes is passed on, the
    rest is reported as corrupt or truncated), and the read never raises."""
    data = bytearray(avro_bytes(records, codec=codec))
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    got, dead = read_avro_file(bytes(data), "flipped.avro")
    TOTALS["record_fuzz_examples"] += 1
    assert {d["reason"] for d in dead} <= {"truncated", "corrupt_block", "unreadable_file",
                                           "invalid_utf8", "corrupt_record"}
    assert all(isinstance(r, dict) for r in got)


@settings(max_examples=60, deadline=None)
@given(records=simple_records, data=st.data())
def test_invalid_utf8_dead_letters_that_record_only(records, data):
    bad = sorted(data.draw(st.sets(st.integers(0, len(records) - 1), min_size=1)))
    for k in bad:
        records[k]["name"] = f"~~BAD{k:05d}"
    raw = avro_bytes(records, codec="null")
    for k in bad:  # the same length: five bytes that are no UTF-8
        raw = raw.replace(f"~~BAD{k:05d}".encode(), b"\xff\xfe\xfd\xc3\x28" + f"{k:05d}".encode())
    got, dead = read_avro_file(raw, "utf8.avro")
    TOTALS["record_fuzz_examples"] += 1
    assert got == [r for k, r in enumerate(records) if k not in bad]
    assert [(d["reason"], d["records_lost"], d["record"]["name"]) for d in dead] == [
        ("invalid_utf8", 0, b"\xff\xfe\xfd\xc3\x28" + f"{k:05d}".encode()) for k in bad]


anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=6),
              st.sampled_from(["\udcff", "ok\ud800", 2 ** 64, -(2 ** 70), 10 ** 400]),
              st.binary(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=8)


def record_like(keys):
    """Dicts with the given keys, each present or not, holding anything."""
    return st.fixed_dictionaries({}, optional={k: anything for k in keys})


@settings(max_examples=400, deadline=None)
@given(record=st.one_of(anything, record_like(["ts_ms", "request_id", "x"])))
def test_event_time_of_anything(record):
    """A Beam timestamp or a BadRecord with a reason, never another exception."""
    TOTALS["record_fuzz_examples"] += 1
    try:
        ts = event_time(record)
    except BadRecord as e:
        assert e.reason.split(":")[0] in {"not_a_record", "missing_field", "wrong_type",
                                          "out_of_range"}
        return
    assert ts.micros == record["ts_ms"] * 1000


def keyed(kind, record):
    fn = KeyByRequest(kind)
    return list(fn.process(record))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    anything,
    st.fixed_dictionaries({"request_id": st.one_of(st.text(max_size=4), anything),
                           "ts_ms": st.one_of(st.integers(-5, 2 ** 64), anything),
                           "user_id": st.one_of(st.text(max_size=4), anything),
                           "item_id": st.one_of(st.text(max_size=4), anything),
                           "fids": st.one_of(st.lists(st.integers(-1, 2 ** 64), max_size=4),
                                             anything),
                           "dense": st.one_of(st.lists(st.floats(), max_size=3), anything),
                           "served_score": st.one_of(st.none(), st.floats(), anything)})))
def test_joiner_validation_of_anything(record):
    """Any record: valid ones key into the join (and Beam can encode them), invalid ones go
    to ``invalid`` with a reason and a payload Beam can encode. Nothing raises."""
    TOTALS["record_fuzz_examples"] += 1
    coder = FastPrimitivesCoder()
    for kind, check in (("features", features_error), ("action", action_error)):
        out = keyed(kind, record)
        assert len(out) == 1
        if check(record) is None:
            key, (tag, payload) = out[0].value
            coder.encode((key, payload))
            assert 0 <= record["ts_ms"] < MAX_TS_MS
            if kind == "features":
                assert all(math.isfinite(d) for d in payload["dense"])
        else:
            invalid = out[0].value
            assert invalid["error"] == check(record)
            coder.encode(invalid)
            strict_json.dumps(invalid, default=repr).encode("utf-8")


# ------------------------------------------------------------------ the pipeline

def good_features(k: int) -> dict:
    """A FeatureLog record the synthetic config extracts (every slot and dense input)."""
    return {"request_id": f"r{k:05d}", "ts_ms": T0 + 1_000 * k, "user_id": f"u{k % 7}",
            "item_id": f"p{k:05d}",  # the probe: every record is found by its item id
            "features": {"gender": "f", "age": 20 + k % 40, "region": "r1", "device": "ios",
                         "network": "wifi", "hour": k % 24, "category": f"c{k % 5}",
                         "creator": "a1", "tags": ["t1", "t2"], "duration_s": 30.5,
                         "item_age_hours": 1.5},
            "served_score": 0.25, "true_ctr": None}


REQUIRED = ["gender", "age", "region", "device", "network", "hour", "category", "creator",
            "tags", "duration_s"]


def _drop(r, draw):
    del r["features"][draw(st.sampled_from(REQUIRED))]


def _null(r, draw):
    r["features"][draw(st.sampled_from(REQUIRED))] = None


def _wrong_type(r, draw):
    field = draw(st.sampled_from(["age", "duration_s", "item_age_hours"]))
    r["features"][field] = draw(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=2),
                                                                         max_size=3)))


def _not_finite(r, draw):
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if draw(st.booleans()):
        r["features"]["duration_s"] = value
        return "not_finite:duration_s"
    r["served_score"] = value
    return "not_finite:served_score"


def _huge_list(r, draw):
    r["features"]["tags"] = ["t"] * draw(st.integers(17, 5_000))


def _unknown_fields(r, draw):
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=8).map(lambda s: "zz_" + s),
                                 st.one_of(st.none(), st.text(max_size=5), st.integers(),
                                           st.floats(), st.lists(st.text(max_size=3))),
                                 min_size=1, max_size=5))
    r["features"].update(extra)


def _set(field, value):
    def mutate(r, draw):
        r[field] = value
    return mutate


# kind: (mutation, expected outcome: "example" or (stage, reason prefix))
KINDS = {
    "good": (None, "example"),
    "unknown_fields": (_unknown_fields, "example"),
    "missing_field": (_drop, ("extract", "missing_field:")),
    "null_field": (_null, ("extract", "missing_field:")),
    "wrong_type": (_wrong_type, ("extract", "wrong_type:")),
    "not_finite": (_not_finite, ("extract", "not_finite:")),
    "huge_list": (_huge_list, ("extract", "oversized_list:tags")),
    "empty_request_id": (_set("request_id", ""), ("joiner", "request_id is empty")),
    "after_2106": (_set("ts_ms", 5_000_000_000_000), ("joiner", "ts_ms must be in")),
    "before_1970": (_set("ts_ms", -5), ("joiner", "ts_ms must be in")),
    "beyond_beam": (_set("ts_ms", 2 ** 62), ("reader", "out_of_range:ts_ms")),
    "invalid_utf8": (None, ("reader", "invalid_utf8")),
    "no_request_id": (None, ("extract", "missing_field:request_id")),  # foreign schema
    "string_ts": (None, ("reader", "wrong_type:ts_ms")),               # foreign schema
}
FOREIGN = {"no_request_id": fastavro.parse_schema({
    "type": "record", "name": "OldFeatureLog", "fields": [
        {"name": "ts_ms", "type": "long"}, {"name": "user_id", "type": "long"},
        {"name": "item_id", "type": "string"},
        {"name": "features", "type": {"type": "map", "values": [
            "null", "string", "long", "double", {"type": "array", "items": "string"}]}}]}),
    "string_ts": fastavro.parse_schema({
        "type": "record", "name": "TextTimeLog", "fields": [
            {"name": "request_id", "type": "string"}, {"name": "ts_ms", "type": "string"},
            {"name": "user_id", "type": "string"}, {"name": "item_id", "type": "string"}]})}


@st.composite
def batches(draw):
    """A mixed batch of feature records with their expected outcomes, actions, and which
    file to truncate where (every batch has a truncated file)."""
    n = draw(st.integers(60, 160))
    # About a third good, the rest every kind of bad.
    kinds = draw(st.lists(st.sampled_from(sorted(KINDS) + ["good"] * 6), min_size=n,
                          max_size=n))
    features, expected = [], {}
    for k, kind in enumerate(kinds):
        r = good_features(k)
        mutate, outcome = KINDS[kind]
        if mutate is not None:
            reason = mutate(r, draw)
            if reason:
                outcome = (outcome[0], reason)
        if kind == "no_request_id":
            r = {"ts_ms": r["ts_ms"], "user_id": k, "item_id": r["item_id"],
                 "features": r["features"]}
        elif kind == "string_ts":
            r = {"request_id": r["request_id"], "ts_ms": "yesterday", "user_id": "u",
                 "item_id": r["item_id"]}
        elif kind == "invalid_utf8":
            r["user_id"] = f"~~BAD{k:05d}"
        features.append((kind, r))
        expected[r["item_id"]] = outcome
    # A click 5 s after serving for some requests, some actions nobody served.
    clicked = draw(st.sets(st.integers(0, n - 1), max_size=n // 2))
    actions = [{"request_id": f"r{k:05d}", "ts_ms": T0 + 1_000 * k + 5_000, "action": "click"}
               for k in sorted(clicked)]
    actions += [{"request_id": f"orphan{j}", "ts_ms": T0 + 7_000 * j, "action": "like"}
                for j in range(draw(st.integers(0, 5)))]
    truncate = draw(st.tuples(st.integers(0, 2), st.floats(0.02, 0.98)))
    return features, expected, actions, truncate


def write_batch(folder, features, actions, truncate):
    """Feature records in three files of the real schema (the first uncompressed, with the
    invalid UTF-8 patched in), one per foreign schema, and one action file. Returns
    ``{path: [item ids in file order]}`` of the feature files."""
    os.makedirs(folder / "features")
    os.makedirs(folder / "actions")
    plain = [r for kind, r in features if kind not in FOREIGN]
    files = {}
    for i in range(3):
        path = folder / "features" / f"part-{i}.avro"
        part = plain[i::3]
        kept = [r for r in part if "BAD" not in r["user_id"]] if i else part
        with open(path, "wb") as f:  # as a careful logger writes: the count in the header
            fastavro.writer(f, load_schema("feature_log"), kept,
                            codec="null" if i == 0 else "deflate", sync_interval=2_000,
                            metadata={RECORD_COUNT_KEY: str(len(kept))})
        files[str(path)] = [r["item_id"] for r in part if i == 0 or "BAD" not in r["user_id"]]
    # invalid UTF-8 records only in the uncompressed file, where the bytes can be patched
    stray = [r for r in plain[1::3] + plain[2::3] if "BAD" in r["user_id"]]
    if stray:
        path = folder / "features" / "part-utf8.avro"
        with open(path, "wb") as f:
            fastavro.writer(f, load_schema("feature_log"), stray, codec="null")
        files[str(path)] = [r["item_id"] for r in stray]
    for path in files:
        raw = open(path, "rb").read()
        raw = raw.replace(b"~~BAD", b"\xff\xfe\xfd\xfc\xfb")
        open(path, "wb").write(raw)
    for kind, schema in FOREIGN.items():
        records = [r for k, r in features if k == kind]
        path = folder / "features" / f"foreign-{kind}.avro"
        with open(path, "wb") as f:
            fastavro.writer(f, schema, records)
        files[str(path)] = [r["item_id"] for r in records]
    with open(folder / "actions" / "part-0.avro", "wb") as f:
        fastavro.writer(f, load_schema("action_log"), actions)
    truncated = None
    if truncate is not None:
        index, where = truncate
        truncated = str(folder / "features" / f"part-{index}.avro")
        raw = open(truncated, "rb").read()
        open(truncated, "wb").write(raw[:int(where * len(raw))])
    return files, truncated


def probe_of(record):
    item = record.get("item_id") if isinstance(record, dict) else None
    return item.decode() if isinstance(item, bytes) else item


def outcomes(features, actions):
    """Every output of the chain as one PCollection of JSON lines."""
    def tag(name, fn):
        return beam.Map(lambda x, name=name: json.dumps([name, fn(x)], default=repr))

    records, read_dead = features
    extracted, extract_dead = records | "Extract" >> ExtractFeatures("synthetic")
    action_records, action_dead = actions
    joined = (extracted, action_records) | "Join" >> OnlineJoiner(join_window_s=JOIN_WINDOW_S)
    return [
        joined.examples | "E" >> tag("example", lambda e: [e["item_id"], e["actions"]]),
        read_dead | "RD" >> tag("reader", lambda d: [probe_of(d["record"]), d["reason"],
                                                     d["records_lost"], d["file"]]),
        extract_dead | "XD" >> tag("extract", lambda d: [probe_of(d["record"]), d["reason"]]),
        joined.invalid | "JI" >> tag("joiner", lambda d: [
            probe_of(d["record"]) if d["kind"] == "features" else d["record"]["request_id"],
            d["error"], d["kind"]]),
        joined.unmatched_actions | "UA" >> tag("unmatched", lambda a: a["request_id"]),
        joined.late_actions | "LA" >> tag("late", lambda a: a["request_id"]),
        joined.duplicate_actions | "DA" >> tag("duplicate", lambda a: a["request_id"]),
        action_dead | "AD" >> tag("action_reader", lambda d: [d["reason"], d["records_lost"]]),
    ]


def run_chain(folder):
    out = folder / "out"
    p = beam.Pipeline(options=pipeline_options(["--runner=DirectRunner"]))
    features = p | "ReadFeatures" >> ReadFeatureLogs(
        str(folder / "features" / "*.avro")).with_dead_letters()
    actions = p | "ReadActions" >> ReadActionLogs(
        str(folder / "actions" / "*.avro")).with_dead_letters()
    (outcomes(features, actions) | beam.Flatten()
     | beam.io.WriteToText(str(out), shard_name_template=""))
    result = p.run()
    result.wait_until_finish()
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    return rows, metrics_dict(result)["counters"]


# No shrinking: each example is a pipeline run; the failing batch is printed as drawn.
@settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batch=batches())
def test_the_whole_chain_loses_nothing(tmp_path_factory, batch):
    features, expected, actions, truncate = batch
    folder = tmp_path_factory.mktemp("chain")
    files, truncated = write_batch(folder, features, actions, truncate)
    rows, counters = run_chain(folder)

    seen = {}  # probe -> its outcome
    damage = []
    for name, value in rows:
        if name == "example":
            probe, outcome = value[0], "example"
        elif name in ("reader", "extract", "joiner") and (name != "joiner" or
                                                          value[2] == "features"):
            probe, outcome = value[0], (name, value[1])
            if name == "reader" and value[2] != 0:  # a damaged stretch, not a record
                damage.append(value)
                continue
        else:
            continue
        assert probe not in seen, f"{probe} came out twice: {seen[probe]}, {outcome}"
        seen[probe] = outcome

    # Every record read came out once, where its kind says.
    for probe, outcome in seen.items():
        want = expected[probe]
        if want == "example":
            assert outcome == "example", (probe, outcome)
        else:
            assert outcome[0] == want[0] and outcome[1].startswith(want[1]), (probe, outcome,
                                                                              want)
    # What did not come out is the unreadable end of the truncated file, and is reported.
    missing = set(expected) - set(seen)
    if truncated is None:
        assert not missing and not damage
    else:
        tail = files[truncated][len(files[truncated]) - len(missing):]
        assert missing == set(tail), "records lost outside the truncated file"
        assert damage and all(d[1] in ("truncated", "unreadable_file") and d[3] == truncated
                              for d in damage)  # unreadable: the cut is in the header
        counted = [d[2] for d in damage]
        if None not in counted:
            assert sum(counted) == len(missing)
        TOTALS["truncated_files"] += 1
        TOTALS["lost_counted"] += len(missing) if None not in counted else 0
        TOTALS["lost_uncounted"] += len(missing) if None in counted else 0
    good = sum(1 for o in seen.values() if o == "example")
    assert good + (len(seen) - good) + len(missing) == len(expected)  # nothing lost

    # Actions: each joined, unmatched (its request was dead-lettered or never served), or
    # late; none dead-lettered here (the action file is intact).
    joined = {f"r{v[0][1:]}": v[1] for n, v in rows if n == "example" and v[1]}
    unmatched = [v for n, v in rows if n == "unmatched"]
    assert len(joined) + len(unmatched) == len(actions)
    for a in actions:
        rid = a["request_id"]
        probe = f"p{rid[1:]}" if rid.startswith("r") else None
        if probe is not None and seen.get(probe) == "example":
            assert joined[rid] == ["click"]
        else:
            assert rid in unmatched
    read_bad = sum(1 for o in seen.values() if o != "example" and o[0] == "reader")
    assert counters["sources.records_read"] == len(seen) - read_bad + len(actions)
    assert counters.get("sources.bad_records", 0) == read_bad
    TOTALS["pipeline_runs"] += 1
    TOTALS["features_tried"] += len(expected)
    TOTALS["actions_tried"] += len(actions)
    TOTALS["good_out"] += good
    TOTALS["bad_dead_lettered"] += len(seen) - good


def test_a_streaming_tail_survives_damaged_files(tmp_path):
    """TailAvroLogs on the DirectRunner in streaming mode, over a folder holding a truncated
    file, a file of garbage and a file with invalid UTF-8 between good ones: the stream goes
    on, the readable records go through, the damage and the bad record are dead-lettered."""
    schema = load_schema("feature_log")
    hours = [[good_features(100 * h + j) for j in range(40)] for h in range(4)]
    for h, records in enumerate(hours):
        for j, r in enumerate(records):
            r["ts_ms"] = T0 + h * 3_600_000 + j * 1_000
    hours[2][7]["user_id"] = "~~BAD"
    paths = [tmp_path / f"part-{h:02d}.avro" for h in range(5)]
    for h, records in enumerate(hours):
        with open(paths[h], "wb") as f:
            fastavro.writer(f, schema, records, codec="null", sync_interval=1_000,
                            metadata={RECORD_COUNT_KEY: "40"})
    paths[2].write_bytes(paths[2].read_bytes().replace(b"~~BAD", b"\xc3\x28\xa0\xa1\xff"))
    paths[1].write_bytes(paths[1].read_bytes()[:-700])       # cut inside its last block
    paths[4].write_bytes(b"Obj\x01" + b"\x00" * 40)           # garbage
    hour1 = [r["request_id"] for r in hours[1]]
    always = ({r["request_id"] for h in (0, 3) for r in hours[h]}
              | {r["request_id"] for r in hours[2]} - {hours[2][7]["request_id"]})

    def check(rows):
        ok = {r[1] for r in rows if r[0] == "ok"}
        dead = sorted(tuple(r[1:]) for r in rows if r[0] == "dead")
        assert not [r for r in rows if r[0] == "x"], rows  # nothing bad got past the reader
        cut = [d for d in dead if d[2] == "part-01.avro"]
        assert [d[0] for d in cut] == ["truncated"], dead
        from_cut = [rid for rid in hour1 if rid in ok]
        assert from_cut == hour1[:len(from_cut)]             # the readable start of the file
        assert len(from_cut) + cut[0][1] == 40 and 0 < cut[0][1] < 40  # the rest: counted
        assert ("invalid_utf8", 0, "part-02.avro") in dead
        assert ("unreadable_file", None, "part-04.avro") in dead
        assert len(dead) == 3
        assert ok == always | set(from_cut)

    started = time.time()
    p = beam.Pipeline(options=pipeline_options(["--runner=DirectRunner", "--streaming"]))
    records, dead = p | TailAvroLogs(str(tmp_path / "part-*.avro"), interval_seconds=0.2,
                                     stop_timestamp=started + 3).with_dead_letters()
    extracted, extract_dead = records | ExtractFeatures("synthetic")
    rows = ((extracted | "E" >> beam.Map(lambda e: ("ok", e["request_id"])),
             dead | "D" >> beam.Map(lambda d: ("dead", d["reason"], d["records_lost"],
                                               os.path.basename(d["file"]))),
             extract_dead | "X" >> beam.Map(lambda d: ("x", d["reason"])))
            | beam.Flatten())
    beam.testing.util.assert_that(rows, check)
    result = p.run()
    result.wait_until_finish()
    counters = metrics_dict(result)["counters"]
    assert counters["sources.unreadable_files"] >= 1  # (first bundle only on this runner)
    # For the totals (the matcher's own figures stay in its pickled copy): the same file
    # read outside the pipeline.
    readable, damage = read_avro_file(paths[1].read_bytes(), "part-01.avro")
    TOTALS["truncated_files"] += 1
    TOTALS["stream_tried"] += 160
    TOTALS["stream_good"] += len(always) + len(readable)
    TOTALS["stream_dead_lettered"] += 1
    TOTALS["stream_lost_counted"] += damage[0]["records_lost"]


def test_fuzz_totals():
    """What the tests above tried, added up (run with -s to see it): every feature record
    written came out as an example or a dead letter, or is counted in a damage report."""
    print("\nbad input fuzz:", json.dumps(TOTALS, sort_keys=True))
    assert TOTALS["features_tried"] == (TOTALS["good_out"] + TOTALS["bad_dead_lettered"]
                                        + TOTALS["lost_counted"] + TOTALS["lost_uncounted"])
    assert TOTALS["stream_tried"] == (TOTALS["stream_good"] + TOTALS["stream_dead_lettered"]
                                      + TOTALS["stream_lost_counted"])
