"""Data sets and sources: the synthetic stream (deterministic, its Bayes AUC right), MovieLens
(100,000 requests, 55.4% positives), bounded Avro reads and a watched folder."""
from __future__ import annotations

import filecmp
import glob
import json
import os
import threading
import time

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from dataflow import data
from dataflow.job import metrics_dict
from dataflow.options import pipeline_options
from schemas import read_avro, write_avro
from schemas.feature_config import FeatureConfig
from transforms.features import ExtractError, extract
from transforms.sources import ReadActionLogs, ReadFeatureLogs, WatchAvroLogs
from transforms.tail import TailAvroLogs

SMALL = dict(users=300, items=400, requests=3000, days=0.25, seed=11, creators=50)


def read_all(pattern):
    return [r for path in sorted(glob.glob(pattern)) for r in read_avro(path)]


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = data.synth(out, **SMALL)
    return out, summary


# --- metric ---------------------------------------------------------------------------------

def brute_force_auc(scores, labels):
    """P(score of a positive > score of a negative), ties one half: all pairs compared."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return (greater + 0.5 * ties) / (len(pos) * len(neg))


def test_roc_auc_equals_brute_force_with_ties():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, size=500) / 20.0  # many ties
    labels = (rng.random(500) < 0.3).astype(int)
    assert data.roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert np.isnan(data.roc_auc([0.1, 0.2], [1, 1]))


def test_bayes_auc_equals_brute_force_on_a_sample():
    logs = data.generate_synthetic(data.SynthParams(**SMALL))
    sample = np.random.default_rng(0).choice(len(logs.true_ctr), size=2000, replace=False)
    scores, labels = logs.true_ctr[sample], logs.click[sample].astype(int)
    assert data.roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)
    assert logs.bayes_auc == pytest.approx(
        brute_force_auc(logs.true_ctr, logs.click.astype(int)), abs=1e-12)


# --- synthetic stream --------------------------------------------------------------------------

def test_synthetic_is_deterministic_by_seed(tmp_path):
    a = data.generate_synthetic(data.SynthParams(**SMALL))
    b = data.generate_synthetic(data.SynthParams(**SMALL))
    c = data.generate_synthetic(data.SynthParams(**{**SMALL, "seed": 12}))
    for name in ("ts_ms", "user", "item", "true_ctr", "click", "click_ts_ms", "like"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.true_ctr, c.true_ctr)
    # The files too, byte for byte (the Avro sync markers are not random).
    data.write_synthetic(a, tmp_path / "a")
    data.write_synthetic(b, tmp_path / "b")
    for sub in ("feature_log", "action_log"):
        names = sorted(os.listdir(tmp_path / "a" / sub))
        assert names == sorted(os.listdir(tmp_path / "b" / sub))
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / "a" / sub, tmp_path / "b" / sub,
                                                   names, shallow=False)
        assert mismatch == [] and errors == []


def test_synthetic_stream_properties():
    logs = data.generate_synthetic(data.SynthParams(requests=100_000, seed=1))
    assert 0.05 <= logs.true_ctr.mean() <= 0.15
    assert abs(logs.click.mean() - logs.true_ctr.mean()) < 0.01
    assert 0.65 < logs.bayes_auc < 0.95
    assert data.roc_auc(logs.served_score, logs.click) < logs.bayes_auc
    assert np.all(np.diff(logs.ts_ms) >= 0)                       # served in time order
    assert np.all(logs.ts_ms >= logs.items["birth_ms"][logs.item])  # never before birth
    delay = (logs.click_ts_ms - logs.ts_ms)[logs.click]
    assert delay.min() >= 1_000 and np.median(delay) < 60_000 < delay.max()  # s to min
    assert not (logs.like & ~logs.click).any()                    # a like follows a click
    assert np.all(logs.like_ts_ms[logs.like] > logs.click_ts_ms[logs.like])
    # Long tails: the busiest 1% of users and items take a large share of the requests.
    for ids in (logs.user, logs.item):
        counts = np.sort(np.bincount(ids))[::-1]
        assert counts[: max(1, len(counts) // 100)].sum() > 0.1 * len(ids)
    # New items keep being born and served.
    born_late = logs.items["birth_ms"][logs.item] > logs.ts_ms[0] + 12 * 3_600_000
    assert born_late.mean() > 0.1


def test_synthetic_files(small_synth):
    out, summary = small_synth
    features = read_all(str(out / "feature_log" / "*.avro"))
    actions = read_all(str(out / "action_log" / "*.avro"))
    assert summary["records"] == len(features) == SMALL["requests"]
    assert json.loads((out / "summary.json").read_text()) == summary
    clicks = {a["request_id"]: a["ts_ms"] for a in actions if a["action"] == "click"}
    assert summary["positives"] == len(clicks)
    assert summary["positive_rate"] == pytest.approx(len(clicks) / len(features), abs=1e-6)
    by_id = {f["request_id"]: f for f in features}
    assert len(by_id) == len(features)
    assert all(t > by_id[r]["ts_ms"] for r, t in clicks.items())
    labels = np.array([f["request_id"] in clicks for f in features])
    assert summary["bayes_auc"] == pytest.approx(
        data.roc_auc([f["true_ctr"] for f in features], labels), abs=1e-4)
    # Each file holds one hour, in time order, and is named after it.
    for path in sorted(glob.glob(str(out / "feature_log" / "*.avro"))):
        ts = [r["ts_ms"] for r in read_avro(path)]
        assert ts == sorted(ts) and len({t // 3_600_000 for t in ts}) == 1
    # Every record extracts with the shipped config: no dead letters.
    config = FeatureConfig.load("synthetic")
    outs = [extract(f, config) for f in features]
    assert all(len(o["fids"]) >= len(config.slots) for o in outs)


def test_generate_100k_requests_in_seconds():
    started = time.perf_counter()
    logs = data.generate_synthetic(data.SynthParams(requests=100_000))
    assert len(logs.ts_ms) == 100_000
    assert time.perf_counter() - started < 5


def test_bad_parameters_are_clear():
    with pytest.raises(ValueError, match="--ctr must be in"):
        data.SynthParams(ctr=1.5)
    with pytest.raises(ValueError, match="--users must be at least 1"):
        data.SynthParams(users=0)


# --- MovieLens -------------------------------------------------------------------------------

def test_movielens(tmp_path):
    summary = data.movielens(tmp_path, file_hours=24 * 28)
    assert summary["records"] == 100_000
    assert summary["positives"] == 55_375 and summary["positive_rate"] == 0.55375
    assert (summary["users"], summary["items"]) == (943, 1682)
    features = read_all(str(tmp_path / "feature_log" / "*.avro"))
    actions = read_all(str(tmp_path / "action_log" / "*.avro"))
    assert len(features) == 100_000 and len(actions) == 55_375
    assert [f["ts_ms"] for f in features] == sorted(f["ts_ms"] for f in features)
    served = {f["request_id"]: f["ts_ms"] for f in features}
    assert all(1_000 <= a["ts_ms"] - served[a["request_id"]] <= 60_000 for a in actions)
    first = features[0]
    assert set(first["features"]) == {"age", "gender", "occupation", "zip_prefix",
                                      "release_year", "genres", "hour", "weekday",
                                      "movie_age_years"}
    assert isinstance(first["features"]["genres"], list)
    config = FeatureConfig.load("movielens")
    dead = 0
    for f in features[::50]:
        try:
            extract(f, config)
        except ExtractError:
            dead += 1
    assert dead == 0


def test_movielens_wheel_is_cached():
    wheel = data.movielens_wheel()
    assert wheel.is_file() and wheel.stat().st_size > 1_000_000
    assert data.movielens_wheel() == wheel


# --- CLI -------------------------------------------------------------------------------------

def test_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        data.main(["--help"])
    assert info.value.code == 0
    assert "synth" in capsys.readouterr().out
    assert data.main(["synth", "--out", str(tmp_path), "--requests", "500", "--users", "50",
                      "--items", "80", "--days", "0.1", "--seed", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["records"] == 500 and 0.5 < printed["bayes_auc"] < 1
    assert data.main(["synth", "--out_dir", str(tmp_path), "--ctr", "2"]) == 2
    assert "--ctr must be in" in capsys.readouterr().err


# --- Beam sources ------------------------------------------------------------------------------

def event_times(pcoll, label):
    return pcoll | label >> beam.Map(
        lambda r, ts=beam.DoFn.TimestampParam: (r["request_id"], r.get("action"),
                                                ts.micros // 1000))


def test_read_feature_and_action_logs(small_synth):
    out, _ = small_synth
    features = read_all(str(out / "feature_log" / "*.avro"))
    actions = read_all(str(out / "action_log" / "*.avro"))
    with TestPipeline(options=pipeline_options(["--runner=DirectRunner"])) as p:
        f = p | "Features" >> ReadFeatureLogs(str(out / "feature_log" / "*.avro"))
        a = p | "Actions" >> ReadActionLogs(str(out / "action_log" / "*.avro"))
        assert_that(event_times(f, "FT"), equal_to(
            [(r["request_id"], None, r["ts_ms"]) for r in features]), label="CheckFeatures")
        assert_that(event_times(a, "AT"), equal_to(
            [(r["request_id"], r["action"], r["ts_ms"]) for r in actions]), label="CheckActions")
        assert_that(f | beam.Map(lambda r: r["features"]["category"]).with_output_types(str)
                    | beam.combiners.Count.Globally(), equal_to([len(features)]),
                    label="CheckDicts")


def land(folder, name, records):
    """Write a file the way a logger should: under a temporary name, then rename."""
    tmp = os.path.join(folder, f".{name}.tmp")
    write_avro(tmp, "action_log", records)
    os.rename(tmp, os.path.join(folder, name))


def run_while_landing(pipeline, folder, files, after=None):
    """Runs ``pipeline`` to its end while ``files`` (``[(name, records)]``) land in ``folder``
    0.8 s apart, then ``after()``; returns the result and the times the files landed."""
    landed = []

    def logger():
        for name, records in files:
            time.sleep(0.8)
            land(folder, name, records)
            landed.append(time.time())
        if after:
            after()

    thread = threading.Thread(target=logger, daemon=True)
    thread.start()
    result = pipeline.run()
    result.wait_until_finish()
    thread.join()
    return result, landed


def test_watch_folder_streaming(tmp_path):
    """Files landing while the pipeline runs are read once each, at their event times."""
    def batch(k):
        return [{"request_id": f"r{k}-{j}", "ts_ms": 1_700_000_000_000 + 1_000 * k + j,
                 "action": "click"} for j in range(3)]

    land(tmp_path, "part-0.avro", batch(0))  # there before the pipeline starts
    (tmp_path / "not-avro.txt").write_text("ignored: the pattern does not match it")

    def land_broken():
        write_avro(str(tmp_path / ".broken.tmp"), "action_log", batch(9))
        with open(tmp_path / ".broken.tmp", "r+b") as f:
            f.truncate(300)  # a damaged file: skipped and counted, the stream goes on
        os.rename(tmp_path / ".broken.tmp", tmp_path / "part-broken.avro")

    started = time.time()
    p = TestPipeline(options=pipeline_options(["--runner=DirectRunner", "--streaming"]))
    records = p | WatchAvroLogs(str(tmp_path / "part-*.avro"), interval_seconds=0.25,
                                stop_timestamp=started + 5)
    assert_that(event_times(records, "Times"), equal_to(
        [(r["request_id"], "click", r["ts_ms"]) for k in range(4) for r in batch(k)]))
    result, landed = run_while_landing(
        p, tmp_path, [(f"part-{k}.avro", batch(k)) for k in range(1, 4)], after=land_broken)
    assert len(landed) == 3 and landed[-1] < started + 5  # landed while it was running
    counters = metrics_dict(result)["counters"]
    assert counters["sources.records_read"] == 12
    assert counters["sources.files_read"] == 4
    assert counters["sources.unreadable_files"] == 1


def test_tail_folder_streaming(tmp_path):
    """A time-ordered log folder tailed while files land: every record once, at its time."""
    def batch(hour):
        return [{"request_id": f"r{hour}-{j}", "ts_ms": (hour * 3600 + j) * 1000,
                 "action": "click"} for j in range(3)]

    land(tmp_path, "part-00.avro", batch(0))
    started = time.time()
    p = TestPipeline(options=pipeline_options(["--runner=DirectRunner", "--streaming"]))
    records = p | TailAvroLogs(str(tmp_path / "part-*.avro"), interval_seconds=0.25,
                               stop_timestamp=started + 4.5)
    assert_that(event_times(records, "Times"), equal_to(
        [(r["request_id"], "click", r["ts_ms"]) for h in range(4) for r in batch(h)]))
    result, landed = run_while_landing(
        p, tmp_path, [(f"part-{h:02d}.avro", batch(h)) for h in range(1, 4)])
    assert len(landed) == 3 and landed[-1] < started + 4.5
    assert metrics_dict(result)["counters"]["sources.files_read"] == 4


def test_tail_watermark_follows_event_time(tmp_path):
    """After each file the watermark is its latest event time; a damaged file is skipped."""
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from apache_beam.runners.sdf_utils import (RestrictionTrackerView,
                                               ThreadsafeRestrictionTracker)
    from apache_beam.utils.timestamp import Timestamp

    from transforms.tail import NO_END, TailAvroFilesFn

    def run(start_index):
        tracker = ThreadsafeRestrictionTracker(
            OffsetRestrictionTracker(OffsetRange(start_index, NO_END)))
        estimator = ManualWatermarkEstimator(None)
        out = list(fn.process(str(tmp_path / "part-*.avro"),
                              tracker=RestrictionTrackerView(tracker), watermark=estimator))
        residual, _ = tracker.deferred_status()
        return out, estimator.current_watermark(), residual

    fn = TailAvroFilesFn(interval_seconds=1.0, stop_timestamp=Timestamp.of(2 ** 40))
    land(tmp_path, "part-00.avro", [{"request_id": "a", "ts_ms": 5_000, "action": "click"},
                                    {"request_id": "b", "ts_ms": 9_000, "action": "like"}])
    out, watermark, residual = run(0)
    assert [(o.value["request_id"], o.timestamp) for o in out] == [
        ("a", Timestamp(5)), ("b", Timestamp(9))]
    assert watermark == Timestamp(9)
    assert residual.start == 1  # waits for the next file

    (tmp_path / "part-01.avro").write_bytes(b"Obj\x01garbage")
    land(tmp_path, "part-02.avro", [{"request_id": "c", "ts_ms": 20_000, "action": "click"}])
    # One file a call: the damaged one, then (another file is listed) the rest at once.
    out, watermark, residual = run(1)
    # The damaged file is dead-lettered (at the watermark, none yet in this fresh estimator).
    assert [(o.value["file"], o.value["reason"], o.value["records_lost"]) for o in out] == [
        (str(tmp_path / "part-01.avro"), "unreadable_file", None)]
    assert all(isinstance(o, beam.pvalue.TaggedOutput) for o in out)
    assert residual.start == 2
    out, watermark, residual = run(2)
    assert [o.value["request_id"] for o in out] == ["c"]
    assert watermark == Timestamp(20)
    assert residual.start == 3  # waits for the next file


def test_tail_lists_a_backlog_once_not_once_a_file(tmp_path, monkeypatch):
    """Through a backlog the folder is listed again only at the last known file (to ask
    whether another follows), and a file that lands meanwhile is still read in turn."""
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from apache_beam.runners.sdf_utils import (RestrictionTrackerView,
                                               ThreadsafeRestrictionTracker)
    from apache_beam.utils.timestamp import Timestamp

    import transforms.tail as tail

    listings = []
    real = tail.ordered_log_files
    monkeypatch.setattr(tail, "ordered_log_files",
                        lambda pattern: listings.append(pattern) or real(pattern))
    for i in range(6):
        land(tmp_path, f"part-0{i}.avro", [{"request_id": f"r{i}", "ts_ms": 1_000 * i,
                                            "action": "click"}])
    fn = tail.TailAvroFilesFn(interval_seconds=1.0, stop_timestamp=Timestamp.of(2 ** 40))
    read, index = [], 0
    while True:
        tracker = ThreadsafeRestrictionTracker(
            OffsetRestrictionTracker(OffsetRange(index, tail.NO_END)))
        read += [o.value["request_id"] for o in fn.process(
            str(tmp_path / "part-*.avro"), tracker=RestrictionTrackerView(tracker),
            watermark=ManualWatermarkEstimator(None))]
        residual, delay = tracker.deferred_status()
        if index == 2:  # lands while the backlog is read
            land(tmp_path, "part-06.avro", [{"request_id": "r6", "ts_ms": 6_000,
                                             "action": "click"}])
        if residual.start == index + 1 and delay.micros > 0:
            break  # waits for more files
        index = residual.start
    assert read == [f"r{i}" for i in range(7)]
    # the first call, at the last known file (part-05: is part-06 there?), at part-06
    assert len(listings) == 3


def test_tail_stops_once_the_marker_exists(tmp_path):
    """With ``stop_when_exists`` the tail waits for files until the marker appears, then reads
    every file that landed before it and ends its restriction."""
    from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
    from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
    from apache_beam.runners.sdf_utils import (RestrictionTrackerView,
                                               ThreadsafeRestrictionTracker)
    from apache_beam.utils.timestamp import Timestamp

    from transforms.tail import NO_END, TailAvroFilesFn

    logs, marker = tmp_path / "logs", tmp_path / "done.json"
    logs.mkdir()
    fn = TailAvroFilesFn(interval_seconds=1.0, stop_timestamp=Timestamp.of(2 ** 40),
                         stop_when_exists=str(marker))

    def run(start_index):
        tracker = ThreadsafeRestrictionTracker(
            OffsetRestrictionTracker(OffsetRange(start_index, NO_END)))
        out = list(fn.process(str(logs / "part-*.avro"), tracker=RestrictionTrackerView(tracker),
                              watermark=ManualWatermarkEstimator(None)))
        residual, _ = tracker.deferred_status() or (None, None)
        return [o.value["request_id"] for o in out], residual, tracker

    land(logs, "part-00.avro", [{"request_id": "a", "ts_ms": 1_000, "action": "click"}])
    ids, residual, _ = run(0)
    assert ids == ["a"] and residual.start == 1  # no marker: waits for more

    # The last file lands, then the marker: the next poll reads that file and ends.
    land(logs, "part-01.avro", [{"request_id": "b", "ts_ms": 2_000, "action": "click"}])
    marker.write_text("{}")
    ids, residual, tracker = run(1)
    assert ids == ["b"] and residual is None
    tracker.check_done()  # the whole range is claimed: the restriction is done
