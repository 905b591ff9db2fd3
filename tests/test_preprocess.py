"""Applying the TFT transform: NumPy in extraction equals TF's own application of the graph,
the Beam pipelines (batch, TestStream, Flink [local], the join CLI) equal the serving entry
point (``Preprocessor``) record for record, and configs without analysers are unchanged."""
from __future__ import annotations

import copy
import glob
import math

import apache_beam as beam
import fastavro
import numpy as np
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import FixedWindows, TimestampedValue

from transforms.example_log import read_examples_in_order
from dataflow import analyze, join
from dataflow.options import pipeline_options
from schemas.feature_config import FeatureConfig, FeatureConfigError
from schemas.fid import make_fid
from transforms.features import (DEAD_LETTER, ExtractError, ExtractFeatures, FeatureExtractor,
                                 Preprocessor, TransformRequiredError, extract)
from transforms.fitted_transform import FittedTransform, TransformMismatchError
from transforms.preprocess import analysis_row, apply_transform_graph

CONFIG = FeatureConfig.load("synthetic_tft")
ANALYSED = {s.name: s for s in CONFIG.slots if s.analysed}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """1,500 synthetic requests (feature and action logs) and their analysed transform."""
    from dataflow.data import synth
    root = tmp_path_factory.mktemp("preprocess")
    synth(root / "synth", requests=1500, users=300, items=400)
    pattern = str(root / "synth" / "feature_log" / "*.avro")
    analyze.main([f"--input={pattern}", "--config=synthetic_tft", f"--out={root / 'transform'}",
                  "--runner=DirectRunner"])
    records = []
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            records += list(fastavro.reader(f))
    return root, str(root / "transform"), records


def with_features(record, i, **features):
    out = copy.deepcopy(record)
    out["request_id"] = f"edge-{i}"
    out["features"].update(features)
    return out


def edge_records(record, transform: FittedTransform) -> list[dict]:
    """Values on, just below and just above every boundary (in float32 and in float64),
    signed zeros, negatives, huge ones, integers: where two implementations would differ."""
    out, i = [], 0
    for name, slot in ANALYSED.items():
        field = slot.fields[0]
        for b in transform.boundaries[name].tolist():
            b32 = np.float32(b)
            for v in (b, float(np.nextafter(b32, np.float32(-np.inf))),
                      float(np.nextafter(b32, np.float32(np.inf))), b * (1 + 1e-12),
                      b * (1 - 1e-12), int(b) if b.is_integer() else b):
                out.append(with_features(record, i, **{field: v}))
                i += 1
        for v in (0, 0.0, -0.0, -1.5, 1e30, -1e30, 3.4e38):
            out.append(with_features(record, i, **{field: v}))
            i += 1
    for v in (0.0, -0.0, 1e-300, 2.5, -7.0, 1e30, 3e38):
        out.append(with_features(record, i, item_age_hours=v, duration_s=v))
        i += 1
    return out


def test_numpy_application_equals_tf_graph(data):
    """Every analysed fid and normalised value that Preprocessor makes (NumPy) is what
    TFTransformOutput.transform_raw_features computes from the saved graph."""
    _, transform_dir, records = data
    pre = Preprocessor.load(transform_dir)
    records = records + edge_records(records[0], pre.transform)
    results = pre(records)
    assert not [r for r in results if isinstance(r, ExtractError)]
    extractor = FeatureExtractor(CONFIG)
    parsed = [extractor.parse(r) for r in records]
    graph = apply_transform_graph(transform_dir, [analysis_row(CONFIG, *p) for p in parsed])
    buckets_seen = {name: set() for name in ANALYSED}
    for i, (out, (raw, pending)) in enumerate(zip(results, parsed)):
        assert [f for f in raw["fids"] if f != -1] == [f for f, r in zip(out["fids"], raw["fids"])
                                                       if r != -1]
        for k, position, _ in pending:
            name = list(ANALYSED)[k]
            bucket = graph[f"slot__{name}__bucket"][i]
            buckets_seen[name].add(int(bucket))
            assert out["fids"][position] == make_fid(ANALYSED[name].slot, int(bucket)), (i, name)
        for j, d in enumerate(CONFIG.dense):
            assert np.float32(out["dense"][j]) == graph[f"dense__{d.name}__z"][i], (i, d.name)
            assert type(out["dense"][j]) is float
    # The data reach every bucket of every slot (the comparison is not vacuous).
    for name, seen in buckets_seen.items():
        assert seen == set(range(len(pre.transform.boundaries[name]) + 1)), name


def test_fids_are_the_configs_order_with_the_bucket_hashed(data):
    _, transform_dir, records = data
    pre = Preprocessor.load(transform_dir)
    record = records[7]
    [out] = pre([record])
    f = record["features"]
    t = pre.transform

    def bucket(name, value):
        return int(np.searchsorted(t.boundaries[name], np.float32(value), side="right"))

    def z(name, value):
        x = np.float32(math.log1p(value))
        return float((x - t.mean[name]) / np.sqrt(t.var[name]))

    assert out["fids"][:3] == [make_fid(1, record["user_id"]), make_fid(2, record["item_id"]),
                               make_fid(3, f["gender"])]
    assert out["fids"][3] == make_fid(14, bucket("age_q", f["age"]))
    duration = [fid for fid in out["fids"] if fid >> 48 == 15]
    item_age = [fid for fid in out["fids"] if fid >> 48 == 16]
    assert duration == [make_fid(15, bucket("duration_q", f["duration_s"]))]
    assert item_age == [make_fid(16, bucket("item_age_q", f["item_age_hours"]))]
    assert out["dense"] == [z("item_age_hours", f["item_age_hours"]),
                            z("duration_s", f["duration_s"])]
    assert len(out["fids"]) == len(extract(record, FeatureConfig.load("synthetic"))["fids"])


def bad_records(record):
    """Records that extraction rejects, and why (from a good one)."""
    huge = with_features(record, 0, duration_s=1e39)
    huge["request_id"] = "huge"
    missing = copy.deepcopy(record)
    missing["request_id"] = "missing"
    del missing["features"]["item_age_hours"]  # a default: the record is fine
    del missing["features"]["age"]             # required: dead letter
    old = with_features(record, 1, age="old")
    old["request_id"] = "old"
    return [(huge, "not_finite:duration_s"), (missing, "missing_field:age"),
            (old, "wrong_type:age"), ("not a record", "not_a_record")]


def expected_outputs(pre, records):
    results = pre(records)
    good = [r for r in results if not isinstance(r, ExtractError)]
    dead = [(r.reason, rec["request_id"] if isinstance(rec, dict) else rec)
            for rec, r in zip(records, results) if isinstance(r, ExtractError)]
    return good, dead


def dead_summary(d):
    return d["reason"], d["record"]["request_id"] if isinstance(d["record"], dict) \
        else d["record"].strip("'")


def test_pipeline_and_serving_give_identical_outputs_direct_runner(data):
    _, transform_dir, records = data
    inputs = records[:700] + [r for r, _ in bad_records(records[0])] + records[700:]
    good, dead = expected_outputs(Preprocessor.load(transform_dir), copy.deepcopy(inputs))
    assert sorted(reason for reason, _ in dead) == sorted(r for _, r in bad_records(records[0]))
    with beam.Pipeline(options=pipeline_options(["--runner=DirectRunner"])) as p:
        features, dead_letters = (p | beam.Create(copy.deepcopy(inputs), reshuffle=False)
                                  | ExtractFeatures(transform_dir, batch_size=100))
        assert_that(features, equal_to(good), label="SameFeatures")
        assert_that(dead_letters | beam.Map(dead_summary), equal_to(dead), label="SameDead")


class _Stamp(beam.DoFn):
    def process(self, out, timestamp=beam.DoFn.TimestampParam, window=beam.DoFn.WindowParam):
        yield out["request_id"], out["ts_ms"], timestamp.micros // 1000, window.start.micros


def test_streaming_keeps_each_records_timestamp_and_window(data):
    """TestStream: batches are flushed at the end of every bundle, and every output keeps
    its own record's event time and window."""
    _, transform_dir, records = data
    inputs = sorted(records[:60] + [bad_records(records[0])[0][0]], key=lambda r: r["ts_ms"])
    pre = Preprocessor.load(transform_dir)
    good, dead = expected_outputs(pre, copy.deepcopy(inputs))
    stream = TestStream()
    for start in range(0, len(inputs), 25):
        chunk = inputs[start:start + 25]
        stream = stream.add_elements([TimestampedValue(copy.deepcopy(r), r["ts_ms"] / 1000)
                                      for r in chunk])
        stream = stream.advance_watermark_to(chunk[-1]["ts_ms"] / 1000)
    stream = stream.advance_watermark_to_infinity()
    window_of = lambda ts_ms: (ts_ms // 600_000) * 600_000_000  # noqa: E731 - micros
    with beam.Pipeline(options=pipeline_options(["--runner=DirectRunner", "--streaming"])) as p:
        features, dead_letters = (p | stream | beam.WindowInto(FixedWindows(600))
                                  | ExtractFeatures(transform_dir, batch_size=7))
        assert_that(features | "Id" >> beam.Map(lambda o: o), equal_to(good), label="Same")
        assert_that(features | "Stamp" >> beam.ParDo(_Stamp()), equal_to(
            [(o["request_id"], o["ts_ms"], o["ts_ms"], window_of(o["ts_ms"])) for o in good]),
            label="Stamped")
        assert_that(dead_letters | beam.Map(dead_summary), equal_to(dead), label="Dead")


@pytest.mark.flink
def test_pipeline_on_flink_equals_serving(data, flink_job_server_jar):
    _, transform_dir, records = data
    inputs = records[:200] + [r for r, _ in bad_records(records[0])]
    good, dead = expected_outputs(Preprocessor.load(transform_dir), copy.deepcopy(inputs))
    p = beam.Pipeline(options=pipeline_options([
        "--runner=FlinkRunner", "--flink_master=[local]", "--parallelism=1"]))
    features, dead_letters = (p | beam.Create(copy.deepcopy(inputs))
                              | ExtractFeatures(transform_dir, batch_size=64))
    assert_that(features, equal_to(good), label="SameFeatures")
    assert_that(dead_letters | beam.Map(dead_summary), equal_to(dead), label="SameDead")
    p.run().wait_until_finish()


def test_join_cli_with_the_transform_dir(data, tmp_path):
    """``python -m dataflow join --config DIR``: the example log carries the transformed
    fids and dense values (float32 in Avro) of exactly the records serving would make."""
    root, transform_dir, records = data
    join.main([f"--features={root / 'synth' / 'feature_log' / '*.avro'}",
               f"--actions={root / 'synth' / 'action_log' / '*.avro'}",
               f"--config={transform_dir}", f"--out={tmp_path / 'joined'}"])
    examples = list(read_examples_in_order(str(tmp_path / "joined" / "examples")))
    want = {o["request_id"]: o for o in Preprocessor.load(transform_dir)(records)}
    assert len(examples) == len(records) == len(want)
    for e in examples:
        assert e["fids"] == want[e["request_id"]]["fids"]
        assert e["dense"] == [float(np.float32(v)) for v in want[e["request_id"]]["dense"]]
    assert {e["label"] for e in examples} == {0, 1}


def test_configs_without_analysers_work_unchanged(data):
    _, _, records = data
    config = FeatureConfig.load("synthetic")
    assert not config.needs_analysis
    inputs = records[:300] + [r for r, _ in bad_records(records[0])]
    results = Preprocessor(config)(inputs)
    for record, result in zip(inputs, results):
        try:
            want = extract(record, config)
        except ExtractError as e:
            assert isinstance(result, ExtractError) and result.reason == e.reason
        else:
            assert result == want
    transform = ExtractFeatures("synthetic")
    assert transform.transform is None and transform.config == config
    assert Preprocessor.load("synthetic").transform is None
    assert [r if isinstance(r, dict) else r.reason for r in
            Preprocessor.load("synthetic")(inputs)] == \
        [r if isinstance(r, dict) else r.reason for r in results]


def test_a_config_with_analysers_needs_its_transform(data):
    _, transform_dir, records = data
    with pytest.raises(TransformRequiredError, match=r"'age_q'.*python -m dataflow.analyze"):
        extract(records[0], CONFIG)
    with pytest.raises(TransformRequiredError):
        Preprocessor(CONFIG)
    with pytest.raises(TransformRequiredError):
        Preprocessor.load("synthetic_tft")
    with pytest.raises(TransformRequiredError):
        ExtractFeatures("synthetic_tft")
    # The config from elsewhere and the transform dir given apart: the same result.
    assert Preprocessor(CONFIG, FittedTransform.load(transform_dir))(records[:5]) == \
        Preprocessor.load(transform_dir)(records[:5])
    assert ExtractFeatures(CONFIG, transform=transform_dir).transform == \
        FittedTransform.load(transform_dir)


def test_a_transform_of_another_config_is_refused(data):
    _, transform_dir, _ = data
    transform = FittedTransform.load(transform_dir)
    other = CONFIG.to_dict()
    other["slots"][3]["bucketize"] = {"quantiles": 9}
    with pytest.raises(TransformMismatchError, match=r"slots 'age_q'.*'quantiles': 9.*"
                                                     r"'quantiles': 8"):
        Preprocessor(FeatureConfig.from_dict(other), transform)
    del other["slots"][3]
    with pytest.raises(TransformMismatchError, match="slots 'age_q': config has no analyser"):
        Preprocessor(FeatureConfig.from_dict(other), transform)
    with pytest.raises(TransformMismatchError):
        ExtractFeatures("synthetic", transform=transform_dir)


def test_a_z_score_that_overflows_float32_is_a_dead_letter():
    config = FeatureConfig.from_dict({"slots": [{"name": "u", "slot": 1, "source": "user_id"}],
                                      "dense": [{"name": "x", "source": "x",
                                                 "normalize": "z_score"}]})
    tiny = FittedTransform(boundaries={}, mean={"x": np.float32(0)},
                           var={"x": np.float32(1e-45)}, summary={
                               "slots": {}, "dense": {"x": {"source": "x",
                                                            "transform": "identity",
                                                            "normalize": "z_score"}}})
    record = {"request_id": "r", "ts_ms": 0, "user_id": "u", "item_id": "i",
              "features": {"x": 1e20}}
    ok = dict(record, features={"x": 0.0})
    results = Preprocessor(config, tiny)([record, ok])
    assert isinstance(results[0], ExtractError) and results[0].reason == "not_finite:x"
    assert results[1]["dense"] == [0.0]


@pytest.mark.parametrize("change,where,problem", [
    ({"bucketize": {"quantiles": 1}}, "bucketize.quantiles", "1 is out of range 2..10000"),
    ({"bucketize": {"quantiles": 4, "boundaries": [1]}}, "bucketize", "either 'boundaries'"),
    ({"bucketize": {"boundaries": [1], "epsilon": 0.1}}, "bucketize.epsilon",
     "only applies to 'quantiles'"),
    ({"bucketize": {"quantiles": 4, "epsilon": 0}}, "bucketize.epsilon", "must be in (0, 1)"),
    ({"bucketize": {"quantiles": 4}, "name": "age q"}, "name", "letters, digits and '_'"),
    ({"bucketize": {"quantiles": 4}, "source": ["a", "b"]}, "bucketize",
     "in a cross, map a field of its source"),
])
def test_invalid_analyser_configs(change, where, problem):
    slot = {"name": "age", "slot": 3, "source": "age", **change}
    with pytest.raises(FeatureConfigError) as info:
        FeatureConfig.from_dict({"slots": [slot]})
    assert info.value.where.endswith(where) and problem in info.value.problem


def test_analyser_configs_round_trip():
    assert FeatureConfig.from_dict(CONFIG.to_dict()) == CONFIG
    config = FeatureConfig.from_dict({"slots": [
        {"name": "a", "slot": 1, "source": "a", "bucketize": {"quantiles": 5, "epsilon": 0.001}}],
        "dense": [{"name": "d", "source": "d", "normalize": "z_score"}]})
    assert config.slots[0].quantiles == 5 and config.slots[0].epsilon == 0.001
    assert FeatureConfig.from_dict(config.to_dict()) == config
    with pytest.raises(FeatureConfigError, match="'minmax' is not one of"):
        FeatureConfig.from_dict({"slots": [{"name": "a", "slot": 1, "source": "a"}],
                                 "dense": [{"name": "d", "source": "d", "normalize": "minmax"}]})

