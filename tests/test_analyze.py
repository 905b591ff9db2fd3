"""The TFT analysis pipeline (python -m dataflow.analyze): exact quantile boundaries, means and
variances on small data, dead letters, refusals, on the DirectRunner and on Flink [local]."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import yaml

from dataflow import analyze
from schemas import write_avro
from schemas.feature_config import FeatureConfig
from schemas.fid import make_fid
from transforms.features import Preprocessor
from transforms.fitted_transform import FittedTransform, default_epsilon
from transforms.preprocess import apply_transform_graph, read_transform_graph

CONFIG = {
    "slots": [
        {"name": "user", "slot": 1, "source": "user_id"},
        {"name": "a_q", "slot": 2, "source": "a", "bucketize": {"quantiles": 4}},
        {"name": "b_q", "slot": 3, "source": "b", "optional": True,
         "bucketize": {"quantiles": 3}},
        {"name": "a_fixed", "slot": 4, "source": "a", "bucketize": {"boundaries": [50]}},
    ],
    "dense": [
        {"name": "x", "source": "x", "normalize": "z_score"},
        {"name": "x_raw", "source": "x"},
    ],
}
N = 96
X_CYCLE = [2, 4, 4, 4, 5, 5, 7, 9]  # mean 5, variance 4 (biased), standard deviation 2


def feature_log(i: int, **features) -> dict:
    return {"request_id": f"r{i}", "ts_ms": 1_704_067_200_000 + 1000 * i, "user_id": f"u{i}",
            "item_id": "i1", "features": features, "served_score": None, "true_ctr": None}


def good_records() -> list[dict]:
    """a: a permutation of 1..96 (ints and doubles); b: 1..10 on every tenth record only;
    x: X_CYCLE twelve times."""
    records = []
    for i in range(N):
        a = (i * 37) % N + 1
        features = {"a": a if i % 2 else float(a), "x": X_CYCLE[i % 8]}
        if i % 10 == 0:
            features["b"] = i // 10 + 1
        records.append(feature_log(i, **features))
    return records


BAD = [feature_log(900, a="text", x=1), feature_log(901, x=1),
       feature_log(902, a=3, b=["1"], x=1)]
BAD_REASONS = {"wrong_type:a": 1, "missing_field:a": 1, "wrong_type:b": 1}


def quantile_boundaries(values, buckets):
    """TFT's boundaries on data its sketch holds exactly (n small against 1/epsilon): the
    i-th boundary is the value with floor(i * n / buckets) values below it."""
    ordered = sorted(values)
    return [float(ordered[(i * len(ordered)) // buckets]) for i in range(1, buckets)]


def write_inputs(directory) -> str:
    os.makedirs(directory, exist_ok=True)
    records = good_records() + BAD
    for part in range(3):  # several files: the analysis combines partial results
        write_avro(os.path.join(directory, f"part-{part}.avro"), "feature_log", records[part::3])
    with open(os.path.join(directory, "part-9.avro"), "wb") as f:  # not Avro: dead-lettered
        f.write(b"this is not an Avro file")
    return os.path.join(directory, "*.avro")


def write_config(path, raw=CONFIG) -> str:
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def run_analysis(tmp_path, flags=()):
    pattern = write_inputs(tmp_path / "logs")
    out = tmp_path / "transform"
    fitted = analyze.main([f"--input={pattern}", f"--config={write_config(tmp_path / 'c.yaml')}",
                           f"--out={out}", *flags])
    return out, fitted


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    return run_analysis(tmp_path_factory.mktemp("direct"), ["--runner=DirectRunner"])


def check_summary(summary):
    a = [(i * 37) % N + 1 for i in range(N)]
    assert quantile_boundaries(a, 4) == [25.0, 49.0, 73.0]
    assert quantile_boundaries(range(1, 11), 3) == [4.0, 7.0]
    assert summary["records"] == N
    assert summary["slots"] == {
        "a_q": {"source": "a", "quantiles": 4, "epsilon": default_epsilon(4), "count": N,
                "min": 1.0, "max": 96.0, "boundaries": [25.0, 49.0, 73.0]},
        "b_q": {"source": "b", "quantiles": 3, "epsilon": default_epsilon(3), "count": 10,
                "min": 1.0, "max": 10.0, "boundaries": [4.0, 7.0]},
    }
    x = summary["dense"]["x"]
    assert set(summary["dense"]) == {"x"}  # x_raw is not normalised: not analysed
    assert (x["count"], x["min"], x["max"]) == (N, 2.0, 9.0)
    assert (x["source"], x["transform"], x["normalize"]) == ("x", "identity", "z_score")
    # The combiner merges per-batch float32 means and variances: exact up to rounding.
    assert x["mean"] == pytest.approx(5.0, rel=1e-6)
    assert x["var"] == pytest.approx(4.0, rel=1e-6)
    assert x["std"] == pytest.approx(2.0, rel=1e-6)
    assert summary["dead_letters"] == BAD_REASONS


def test_exact_boundaries_and_statistics_direct_runner(analysed):
    out, fitted = analysed
    summary = json.loads((out / "summary.json").read_text())
    check_summary(summary)
    assert summary["input"].endswith("*.avro")
    assert sorted(os.listdir(out)) == ["dead_letter", "feature_config.yaml", "summary.json",
                                       "transform_fn", "transformed_metadata"]
    assert FeatureConfig.load(out) == FeatureConfig.from_dict(CONFIG)
    dead = []
    for path in glob.glob(str(out / "dead_letter" / "*.jsonl")):
        with open(path) as f:
            dead += [json.loads(line) for line in f]
    unreadable = [d for d in dead if "part-9.avro" in json.dumps(d)]
    assert len(unreadable) == 1, dead
    assert sorted((d["record"]["request_id"], d["reason"]) for d in dead
                  if d not in unreadable) == [
        ("r900", "wrong_type:a"), ("r901", "missing_field:a"), ("r902", "wrong_type:b")]


def test_summary_is_what_the_graph_holds(analysed):
    out, fitted = analysed
    loaded = FittedTransform.load(out)
    from_graph = read_transform_graph(out, FeatureConfig.from_dict(CONFIG))
    for t in (loaded, from_graph):
        assert {k: v.tolist() for k, v in t.boundaries.items()} == {
            "a_q": [25.0, 49.0, 73.0], "b_q": [4.0, 7.0]}
        assert t.mean == fitted.mean and t.var == fitted.var
        assert all(type(v) is np.float32 for v in (*t.mean.values(), *t.var.values()))


@pytest.mark.parametrize("a,bucket", [(1, 0), (24, 0), (24.999, 0), (25, 1), (48, 1),
                                      (49, 2), (72.5, 2), (73, 3), (96, 3), (1e6, 3),
                                      (-3, 0)])
def test_applied_buckets_follow_the_boundaries(analysed, a, bucket):
    out, _ = analysed
    pre = Preprocessor.load(out)
    [result] = pre([feature_log(1, a=a, b=7, x=9)])
    assert result["fids"] == [make_fid(1, "u1"), make_fid(2, bucket), make_fid(3, 2),
                              make_fid(4, int(a >= 50))]
    assert result["dense"][0] == pytest.approx((9 - 5) / 2, rel=1e-6)
    assert result["dense"][1] == 9.0
    # ... and TF's own application of the graph agrees.
    graph = apply_transform_graph(out, [{"slot__a_q": [a], "slot__b_q": [7], "dense__x": [9]}])
    assert graph["slot__a_q__bucket"] == [bucket]
    assert graph["dense__x__z"] == [np.float32(result["dense"][0])]


@pytest.mark.flink
def test_analysis_runs_on_flink(tmp_path, flink_job_server_jar, analysed):
    out, fitted = run_analysis(tmp_path, ["--runner=FlinkRunner", "--flink_master=[local]",
                                          "--parallelism=1"])
    check_summary(json.loads((out / "summary.json").read_text()))
    direct = FittedTransform.load(analysed[0])
    assert {k: v.tolist() for k, v in fitted.boundaries.items()} == \
        {k: v.tolist() for k, v in direct.boundaries.items()}


def test_a_field_without_values_is_an_error(tmp_path):
    raw = {"slots": [{"name": "a_q", "slot": 2, "source": "a", "bucketize": {"quantiles": 4}},
                     {"name": "never", "slot": 5, "source": "never", "optional": True,
                      "bucketize": {"quantiles": 4}}]}
    pattern = write_inputs(tmp_path / "logs")
    out = tmp_path / "transform"
    with pytest.raises(analyze.AnalysisError, match=r"no values to analyse for slot 'never'"):
        analyze.main([f"--input={pattern}", f"--config={write_config(tmp_path / 'c.yaml', raw)}",
                      f"--out={out}"])
    assert not (out / "summary.json").exists() and not (out / "feature_config.yaml").exists()


def test_refusals(tmp_path):
    pattern = write_inputs(tmp_path / "logs")
    with pytest.raises(SystemExit, match="asks for no analysers"):
        analyze.main([f"--input={pattern}", "--config=synthetic", f"--out={tmp_path / 'o'}"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").touch()
    with pytest.raises(SystemExit, match="not empty"):
        analyze.main([f"--input={pattern}", "--config=synthetic_tft",
                      f"--out={tmp_path / 'busy'}"])
    with pytest.raises(SystemExit, match="required"):
        analyze.main(["--config=synthetic_tft"])


def test_cli_lists_the_analysis_pipeline(capsys):
    from dataflow.__main__ import main
    assert main(["--help"]) == 0
    assert "analyze" in capsys.readouterr().out
    assert main(["analyze", "--help"]) == 0
    assert "--analysis_batch_size" in capsys.readouterr().out
