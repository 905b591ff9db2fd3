"""Online metrics: exact AUC, bucketed AUC, event-time windows, reports, the Beam transform."""
from __future__ import annotations

import math

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow.job import metrics_dict
from dataflow.options import pipeline_options
from transforms.metrics import OnlineMetrics
from transforms.metrics_math import BucketedAUC, OnlineMetricsAccumulator, auc
from transforms.metrics_report import plot_png, read_csv, write_csv
from transforms.scores import Scores


def brute_force_auc(scores, labels, weights):
    """Σ over (positive, negative) pairs of w·w' · [s > s'] + ½ [s = s'], over Σ w·w'."""
    won = total = 0.0
    for s, y, w in zip(scores, labels, weights):
        for s2, y2, w2 in zip(scores, labels, weights):
            pair = w * y * w2 * (1 - y2)
            total += pair
            won += pair * (1.0 if s > s2 else 0.5 if s == s2 else 0.0)
    return won / total if total > 0 else math.nan


examples = st.lists(st.tuples(st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 1.0]),  # ties
                              st.sampled_from([0.0, 1.0, 0.3]),  # soft labels too
                              st.floats(0.1, 5.0)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(examples)
def test_auc_equals_the_brute_force_pair_count(rows):
    scores, labels, weights = (np.array(c, dtype=np.float64).reshape(-1) for c in zip(*rows)) \
        if rows else (np.zeros(0),) * 3
    want = brute_force_auc(scores, labels, weights)
    got = auc(scores, labels, weights)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_auc_cases():
    assert auc([0.1, 0.2, 0.3], [0, 1, 1]) == 1.0
    assert auc([0.3, 0.2, 0.1], [0, 1, 1]) == 0.0
    assert auc([0.5] * 4, [0, 1, 0, 1]) == 0.5
    assert math.isnan(auc([0.5, 0.6], [0, 0]))
    assert math.isnan(auc([], []))
    assert math.isnan(auc([0.5, np.nan], [0, 1]))
    # Weights are pair multiplicities: weight 2 == the example twice.
    assert auc([0.2, 0.4, 0.3], [0, 1, 0], [1, 1, 2]) == auc([0.2, 0.4, 0.3, 0.3], [0, 1, 0, 0])
    with pytest.raises(ValueError, match="differ in length"):
        auc([0.1, 0.2], [0, 1, 1])


@pytest.mark.parametrize("distribution", ["uniform", "small_ctr", "separable"])
def test_bucketed_auc_is_within_1e3_of_exact(distribution):
    rng = np.random.default_rng(7)
    n = 200_000
    if distribution == "uniform":
        scores = rng.random(n)
        labels = (rng.random(n) < scores).astype(float)
    elif distribution == "small_ctr":   # scores crowd below 0.05, as click-through rates do
        scores = rng.beta(1.0, 60.0, size=n)
        labels = (rng.random(n) < scores).astype(float)
    else:
        labels = (rng.random(n) < 0.3).astype(float)
        scores = 1 / (1 + np.exp(-(rng.normal(size=n) + 2.5 * labels)))
    weights = rng.uniform(0.5, 2.0, size=n)
    halves = BucketedAUC(), BucketedAUC()
    halves[0].add(scores[: n // 2], labels[: n // 2], weights[: n // 2])
    halves[1].add(scores[n // 2:], labels[n // 2:], weights[n // 2:])
    merged = halves[0].merge(halves[1]).result()
    whole = BucketedAUC()
    whole.add(scores, labels, weights)
    assert merged == pytest.approx(whole.result(), abs=1e-12)
    assert abs(merged - auc(scores, labels, weights)) < 1e-3


def test_bucketed_auc_skips_non_finite_and_refuses_other_bucket_counts():
    b = BucketedAUC(100)
    b.add([0.2, np.nan, 0.8, np.inf], [0, 1, 1, 0])
    assert b.result() == 1.0
    assert math.isnan(BucketedAUC().result())
    with pytest.raises(ValueError, match="cannot merge"):
        b.merge(BucketedAUC(10))


# -- windows ------------------------------------------------------------------------------

def random_stream(rng, n=3000, span_ms=600_000):
    ts = np.sort(rng.integers(0, span_ms, size=n))
    scores = rng.random(n)
    labels = (rng.random(n) < scores).astype(float)
    weights = rng.uniform(0.5, 2.0, size=n)
    return scores, labels, weights, ts


def expected_rows(scores, labels, weights, ts, window_ms, step_ms):
    """The simple model: every window that holds examples, computed from scratch."""
    rows = []
    first_end = (ts.min() // step_ms + 1) * step_ms
    for end in range(int(first_end), int(ts.max()) + window_ms + 1, step_ms):
        inside = (ts >= end - window_ms) & (ts < end)
        if not inside.any():
            continue
        s, y, w = scores[inside], labels[inside], weights[inside]
        p = np.clip(s, 1e-7, 1 - 1e-7)
        before = ts < end
        rows.append({
            "window_start_ms": end - window_ms, "window_end_ms": end,
            "examples": int(inside.sum()), "positives": int((y > 0.5).sum()),
            "auc": brute_force_auc(s, y, w) if len(s) < 300 else auc(s, y, w),
            "logloss": float(-np.sum(w * (y * np.log(p) + (1 - y) * np.log(1 - p))) / w.sum()),
            "calibration": float(np.sum(w * s) / np.sum(w * y)) if np.sum(w * y) > 0 else math.nan,
            "cumulative_auc": auc(scores[before], labels[before], weights[before])})
    return rows


def assert_rows_close(got, want, cumulative_tol=1e-3):
    assert [(r["window_start_ms"], r["window_end_ms"], r["examples"], r["positives"])
            for r in got] == [(r["window_start_ms"], r["window_end_ms"], r["examples"],
                               r["positives"]) for r in want]
    for g, w in zip(got, want):
        for key in ("auc", "logloss", "calibration"):
            assert g[key] == pytest.approx(w[key], rel=1e-9, nan_ok=True), (key, g, w)
        assert g["cumulative_auc"] == pytest.approx(w["cumulative_auc"], abs=cumulative_tol,
                                                    nan_ok=True)


@pytest.mark.parametrize("window_s, sliding_s", [(60, None), (120, 30)])
def test_accumulator_windows_match_the_simple_model(window_s, sliding_s):
    rng = np.random.default_rng(1)
    scores, labels, weights, ts = random_stream(rng)
    acc = OnlineMetricsAccumulator(window_s, sliding_s)
    rows = []
    # Batches of uneven sizes that straddle window ends, with watermarks between them.
    bounds = np.r_[0, np.sort(rng.choice(len(ts), size=40, replace=False)), len(ts)]
    for start, stop in zip(bounds, bounds[1:]):
        acc.add(scores[start:stop], labels[start:stop], weights[start:stop], ts[start:stop])
        if stop < len(ts):
            rows += acc.flush(watermark_ms=int(ts[stop]))  # nothing later is earlier
    rows += acc.flush()
    want = expected_rows(scores, labels, weights, ts, window_s * 1000,
                         (sliding_s or window_s) * 1000)
    assert_rows_close(rows, want)
    assert acc.rows == rows
    totals = acc.totals()
    assert totals["examples"] == len(ts) and totals["late_examples"] == 0
    assert totals["windows"] == len(want)
    assert totals["auc"] == pytest.approx(auc(scores, labels, weights), abs=1e-3)


def test_accumulator_out_of_order_within_the_watermark_and_late_examples():
    acc = OnlineMetricsAccumulator(window_s=10)
    acc.add([0.9, 0.1], [1, 0], None, [15_000, 3_000])       # two windows in one batch
    acc.add([0.2], [1], None, [1_000])                        # earlier, still on time
    assert acc.flush(watermark_ms=9_999) == []                # [0, 10 s) has not ended
    assert acc.pending_window_end() == 10_000
    (first,) = acc.flush(watermark_ms=10_000)
    assert (first["window_start_ms"], first["examples"], first["auc"]) == (0, 2, 1.0)
    acc.add([0.3], [0], None, [2_000])                        # its window is out: late
    (second,) = acc.flush()
    assert (second["window_start_ms"], second["examples"]) == (10_000, 1)
    assert math.isnan(second["auc"])                          # one class only
    totals = acc.totals()
    assert (totals["examples"], totals["late_examples"], totals["windows"]) == (4, 1, 2)
    assert totals["auc"] == auc([0.9, 0.1, 0.2, 0.3], [1, 0, 1, 0])


def test_accumulator_bayes_auc_from_true_ctr():
    acc = OnlineMetricsAccumulator(window_s=10)
    acc.add([0.5, 0.5, 0.5], [1, 0, 0], None, [1, 2, 3], true_ctr=[0.8, 0.1, 0.3])
    acc.add([0.5], [1], None, [10_001], true_ctr=[np.nan])
    first, second = acc.flush()
    assert first["bayes_auc"] == 1.0 and first["auc"] == 0.5
    assert math.isnan(second["bayes_auc"])
    with pytest.raises(ValueError, match="multiple"):
        OnlineMetricsAccumulator(window_s=60, sliding_s=25)


def test_csv_round_trip_and_png(tmp_path):
    rng = np.random.default_rng(3)
    acc = OnlineMetricsAccumulator(window_s=3600)
    scores, labels, weights, ts = random_stream(rng, n=5000, span_ms=24 * 3_600_000)
    acc.add(scores, labels, weights, ts + 472_222 * 3_600_000, true_ctr=scores)  # hour-aligned
    rows = acc.flush()
    write_csv(rows, str(tmp_path / "m.csv"))
    back = read_csv(str(tmp_path / "m.csv"))
    assert len(back) == len(rows) == 24
    for b, r in zip(back, rows):
        assert b == pytest.approx(r, nan_ok=True)
    plot_png(rows, str(tmp_path / "m.png"), "test run")
    data = (tmp_path / "m.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    # fixed margins: nothing (tick labels, axis labels, the title) runs off the image
    from PIL import Image
    for top in (9, 999_999):  # the narrowest and widest tick labels of the examples axis
        wide = [{**r, "examples": top * (i + 1) // len(rows)} for i, r in enumerate(rows)]
        plot_png(wide, str(tmp_path / "m.png"), "test run")
        with Image.open(tmp_path / "m.png") as image:
            pixels = np.asarray(image.convert("L"))
        assert pixels.shape == (900, 1000)
        assert (pixels[:, :3] == 255).all() and (pixels[:, -3:] == 255).all()
        assert (pixels[:3] == 255).all() and (pixels[-3:] == 255).all()
        assert (pixels[:, :40] < 128).any()  # the y labels do come near the left edge



# Every plot of the project, drawn from tiny data of the real shape: (figure, PNG path).

def _plot_metrics(tmp_path, top=999_999):
    rng = np.random.default_rng(3)
    acc = OnlineMetricsAccumulator(window_s=3600)
    scores, labels, weights, ts = random_stream(rng, n=2000, span_ms=24 * 3_600_000)
    acc.add(scores, labels, weights, ts + 472_222 * 3_600_000, true_ctr=scores)
    rows = acc.flush()
    rows = [{**r, "examples": top * (i + 1) // len(rows)} for i, r in enumerate(rows)]
    return plot_png(rows, str(tmp_path / "m.png"), "online-online metrics")


def _plot_loop(tmp_path):
    from dataflow.closed_loop.report import plot
    rows = [{"from_s": 300 * i, "to_s": 300 * (i + 1), "serving_auc": 0.5 + 0.03 * i,
             "bayes_auc": 0.81} for i in range(8)]
    n = 600
    stats = {"ts_ms": np.linspace(0, 2_400_000, n), "wall_s": np.linspace(0, 30, n),
             "sparse_age_ms": np.full(n, 250_000.0), "dense_age_ms": np.full(n, 1_000_000.0),
             "served": np.full(n, 10.0)}
    trained = [(float(w), 200 * w) for w in range(31)]
    return plot(str(tmp_path / "loop.png"), rows, stats, trained,
                "closed loop (deepfm, FlinkRunner): last quarter serving AUC 0.7768 vs "
                "Bayes 0.8132")


def _plot_memory(tmp_path):
    import test_bounded_memory
    runs = {policy: {"series": [{"day": d, "rows": grow * d * 30_000 + 1_000,
                                 "rss_mb": 900 + grow * d * 40} for d in range(21)]}
            for policy, grow in (("unbounded", 1), ("bounded", 0))}
    return test_bounded_memory.plot(runs, str(tmp_path / "memory.png"))


def _experiment(name, datasets):
    from importlib import import_module
    module = import_module(f"benchmarks.experiments.{name}")
    return lambda tmp_path: module.plot({"datasets": datasets}, str(tmp_path / f"{name}.png"))


def _sync(ds):
    names = ["batch", "5h", "1h", "30min"]
    return {"batch_examples": 160_000, "online_examples": 40_000, "seeds": [0, 1, 2],
            "window_hours": 6, "auc": {k: {"mean": 0.75 + 0.001 * i, "std": 0.0004}
                                       for i, k in enumerate(names)},
            "window_auc_seed0": {k: [[1_704_499_200_000 + 21_600_000 * w, 0.75, 1600]
                                     for w in range(8)] for k in names}}


def _peers(ds):
    return {"examples": 100_000, "bayes_auc": 0.79 if ds == "synthetic" else None,
            "peers": {p: {"online_auc": 0.74, "examples_per_s": rate} for p, rate in
                      (("ours", 21_000.0), ("river_fm", 4_400.0), ("river_lr", 120_000.0),
                       ("keras_daily", 35_000.0))}}


def _collision(ds):
    variants = ("collisionless", "hashed", "hashed_quarter")
    return {"test_examples": 20_000, "seeds": [0, 1], "epochs": 3,
            "slots": {s: {"paper_rate": rate, "buckets": {"hashed": 61_566,
                                                          "hashed_quarter": 15_392},
                          "collision_rate": {v: 0.07 for v in variants}}
                      for s, rate in (("user", 0.0773), ("item", 0.0286))},
            "variants": {v: {"online_auc": {"mean": 0.755},
                             "test_auc_per_epoch": [{"mean": 0.74 - 0.004 * e, "std": 0.001}
                                                    for e in range(3)]}
                         for v in variants}}


def _filter(ds):
    settings = [{"threshold": t, "expiry_s": e, "peak_mb": 5.5 - t - (e or 0) / 1e6,
                 "online_auc": 0.683 - 0.002 * t,
                 "rows_over_time": [[h, 69_400 * h // 480] for h in range(0, 481, 24)]}
                for t in (0, 1, 3) for e in (None, 86_400, 259_200)]
    return {"settings": settings}


_PLOTS = {
    "metrics-narrow": lambda tmp_path: _plot_metrics(tmp_path, top=9),
    "metrics-wide": _plot_metrics,
    "loop": _plot_loop,
    "bounded_memory": _plot_memory,
    **{f"{name}-{len(sets)}": _experiment(name, {ds: make(ds) for ds in sets})
       for name, make in (("sync", _sync), ("peers", _peers), ("collision", _collision),
                          ("filter", _filter))
       for sets in (("synthetic",), ("synthetic", "movielens"))},
}


@pytest.mark.parametrize("name", list(_PLOTS))
def test_plots_have_room_for_every_label(tmp_path, name):
    """Fixed margins (``transforms.metrics_report.fixed_margins``) measure nothing: each plot's
    margins must hold its labels. Nothing runs off the image (the PNG's edges are blank) and
    no panel's texts (tick labels, axis labels, title, legend) run into another panel or into
    the figure's title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    fig = _PLOTS[name](tmp_path)
    png = next(tmp_path.glob("*.png"))
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("L"))
    for edge in (pixels[:, :3], pixels[:, -3:], pixels[:3], pixels[-3:]):
        assert (edge == 255).all(), f"{name}: something runs off the image"
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [(f"axes {i} ({ax.get_title()[:30] or ax.get_ylabel()[:30]})",
              ax.get_tightbbox(renderer)) for i, ax in enumerate(fig.axes)]
    if fig._suptitle is not None:
        boxes.append(("suptitle", fig._suptitle.get_window_extent(renderer)))
    for label, box in boxes:
        assert (box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1
                and box.y1 <= fig.bbox.y1), f"{name}: {label} is clipped: {box}"
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1:]:
            overlap = box_a.intersection(box_a, box_b)
            assert overlap is None or min(overlap.width, overlap.height) < 1, \
                f"{name}: {a} runs into {b}"


# -- Beam ---------------------------------------------------------------------------------

# Three batches straddling the window end at 60 s, then one example after an empty window.
BATCHES = [
    Scores(np.array([0.9, 0.2, 0.6], np.float32), np.array([1, 0, 0], np.float32),
           np.ones(3, np.float32), np.array([1_000, 20_000, 30_000])),
    Scores(np.array([0.4, 0.7, 0.3], np.float32), np.array([1, 1, 0], np.float32),
           np.array([1, 1, 2], np.float32), np.array([59_999, 60_000, 70_000])),
    (np.array([0.8], np.float32), np.array([0], np.float32), np.ones(1, np.float32),
     np.array([119_999]), np.array([np.nan], np.float32)),            # a plain 5-tuple
    {"score": 0.5, "label": 1, "ts_ms": 200_000},                     # a dict record
]


def _f32(*values):
    return [float(np.float32(v)) for v in values]


def _logloss(p, y, w):
    p, y, w = np.array(p, np.float64), np.array(y, np.float64), np.array(w, np.float64)
    return float(-np.sum(w * (y * np.log(p) + (1 - y) * np.log(1 - p))) / w.sum())


# Worked by hand. [0, 60 s): positives 0.9, 0.4; negatives 0.2, 0.6 → 3 of 4 pairs.
# [60, 120 s): positive 0.7; negatives 0.3 (weight 2), 0.8 → 2 of 3. Cumulative after it:
# positives 0.9, 0.4, 0.7 vs negatives 0.2, 0.6, 0.3 (×2), 0.8 → (5 + 3 + 4) / 15.
# [180, 240 s): one positive (0.5, above 0.2 and 0.3 ×2): AUC NaN, cumulative 15 / 20.
EXPECTED = [
    (0, 60_000, 4, 2, 0.75, _logloss(_f32(0.9, 0.2, 0.6, 0.4), [1, 0, 0, 1], [1] * 4),
     sum(_f32(0.9, 0.2, 0.6, 0.4)) / 2, 0.75),
    (60_000, 120_000, 3, 1, 2 / 3, _logloss(_f32(0.7, 0.3, 0.8), [1, 0, 0], [1, 2, 1]),
     sum(_f32(0.7, 0.3, 0.3, 0.8)) / 1, 12 / 15),
    (180_000, 240_000, 1, 1, None, _logloss([0.5], [1], [1]), 0.5, 15 / 20),
]


def row_tuple(row):
    """Comparable: NaN as None, floats rounded (float32 scores)."""
    return tuple(None if isinstance(v, float) and math.isnan(v) else
                 round(v, 6) if isinstance(v, float) else v
                 for v in (row["window_start_ms"], row["window_end_ms"], row["examples"],
                           row["positives"], row["auc"], row["logloss"], row["calibration"],
                           row["cumulative_auc"]))


def expected_tuples():
    return [tuple(None if v is None else round(v, 6) if isinstance(v, float) else v for v in r)
            for r in EXPECTED]


def test_online_metrics_direct_runner_batch(tmp_path):
    prefix = str(tmp_path / "report" / "online")
    pipeline = beam.Pipeline(options=pipeline_options(["--runner=DirectRunner"]))
    rows = (pipeline | beam.Create(BATCHES) | OnlineMetrics(window_s=60, out_prefix=prefix))
    assert_that(rows | beam.Map(row_tuple), equal_to(expected_tuples()))
    result = pipeline.run()
    result.wait_until_finish()
    metrics = metrics_dict(result)
    assert metrics["counters"]["online.examples"] == 8
    assert metrics["counters"]["online.positives"] == 4
    assert metrics["counters"]["online.windows"] == 3
    auc_dist = metrics["distributions"]["online.auc_x1e6"]
    assert (auc_dist["count"], auc_dist["min"], auc_dist["max"]) == (2, 666667, 750000)
    assert [row_tuple(r) for r in read_csv(prefix + ".csv")] == expected_tuples()
    assert (tmp_path / "report" / "online.png").stat().st_size > 10_000
    assert '"examples": 8' in (tmp_path / "report" / "online-totals.json").read_text()


def test_online_metrics_direct_runner_streaming():
    """Batches arrive in event-time order with watermarks between them; each window's row
    comes out once the watermark passes its end."""
    stream = TestStream()
    for batch in BATCHES:
        ts = np.atleast_1d(batch["ts_ms"] if isinstance(batch, dict) else batch[3])
        stream = stream.add_elements([TimestampedValue(batch, int(ts.max()) / 1000.0)])
        stream = stream.advance_watermark_to(int(ts.max()) / 1000.0)
    # Past the last window's end before the end of the stream: see test_smoke.py for why.
    stream = stream.advance_watermark_to(241.0).advance_watermark_to_infinity()
    options = pipeline_options(["--runner=DirectRunner", "--streaming"])
    with TestPipeline(options=options) as p:
        rows = p | stream | OnlineMetrics(window_s=60)
        assert_that(rows | beam.Map(row_tuple), equal_to(expected_tuples()))


@pytest.mark.flink
def test_online_metrics_flink_local_streaming(tmp_path, flink_job_server_jar):
    """Flink runs the transform's state and event-time timers in streaming mode (the mode of
    an online job) and gives the rows of the DirectRunner."""
    prefix = str(tmp_path / "online")
    options = pipeline_options(["--runner=FlinkRunner", "--flink_master=[local]",
                                "--environment_type=LOOPBACK", "--parallelism=2",
                                "--streaming"])
    pipeline = beam.Pipeline(options=options)
    _ = pipeline | beam.Create(BATCHES) | OnlineMetrics(window_s=60, out_prefix=prefix)
    result = pipeline.run()
    result.wait_until_finish()
    assert [row_tuple(r) for r in read_csv(prefix + ".csv")] == expected_tuples()
    counters = metrics_dict(result)["counters"]
    assert (counters["online.examples"], counters["online.windows"]) == (8, 3)


def ms(value) -> Timestamp:
    return Timestamp(micros=int(value) * 1000)


def test_online_metrics_streaming_sliding_windows_match_the_simple_model():
    """Sliding windows through the timers: panes stay buffered for the windows still to come,
    and every row equals the from-scratch computation."""
    rng = np.random.default_rng(5)
    scores, labels, weights, ts = random_stream(rng, n=1500, span_ms=300_000)
    bounds = np.r_[0, np.sort(rng.choice(len(ts), size=25, replace=False)), len(ts)]
    stream = TestStream()
    for start, stop in zip(bounds, bounds[1:]):
        batch = Scores(scores[start:stop], labels[start:stop], weights[start:stop],
                       ts[start:stop])
        stream = stream.add_elements([TimestampedValue(batch, ms(ts[stop - 1]))])
        if stop < len(ts):
            stream = stream.advance_watermark_to(ms(ts[stop]))
    stream = stream.advance_watermark_to(ms(1_000_000)).advance_watermark_to_infinity()
    want = expected_rows(scores, labels, weights, ts, 120_000, 30_000)

    def check(rows):
        assert_rows_close(sorted(rows, key=lambda r: r["window_end_ms"]), want)

    options = pipeline_options(["--runner=DirectRunner", "--streaming"])
    with TestPipeline(options=options) as p:
        assert_that(p | stream | OnlineMetrics(window_s=120, sliding_s=30), check)
