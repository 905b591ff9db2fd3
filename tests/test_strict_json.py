"""Strict JSON (``schemas.strict_json``): what the demo and the benchmarks write parses with a
parser that refuses NaN and infinity, as Node's and other strict parsers do."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from schemas import read_avro, strict_json, write_avro

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict_loads(text):
    """``json.loads`` refusing ``NaN``, ``Infinity`` and ``-Infinity``."""
    return json.loads(text, parse_constant=_refuse)


def strict_files(*folders) -> dict:
    """{path: parsed} of every ``*.json`` (one value) and ``*.jsonl`` (one a line) file under
    ``folders``, parsed strictly."""
    parsed = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if name.endswith(".json"):
                    with open(path, encoding="utf-8") as f:
                        parsed[path] = strict_loads(f.read())
                elif name.endswith(".jsonl"):
                    with open(path, encoding="utf-8") as f:
                        parsed[path] = [strict_loads(line) for line in f]
    return parsed


def test_non_finite_numbers_become_null_and_numpy_values_python_ones():
    value = {"nan": math.nan, "inf": math.inf, "-inf": -np.inf, "f32": np.float32(0.5),
             "i64": np.int64(7), "bool": np.bool_(True), "nested": ({"a": [np.nan, 1.0]},),
             "array": np.array([[1.0, np.nan]]), np.int64(3): "numpy key", "text": "NaN"}
    text = strict_json.dumps(value)
    assert strict_loads(text) == {"nan": None, "inf": None, "-inf": None, "f32": 0.5, "i64": 7,
                                  "bool": True, "nested": [{"a": [None, 1.0]}],
                                  "array": [[1.0, None]], "3": "numpy key", "text": "NaN"}
    assert strict_json.plain(np.float64(0.25)) == 0.25 and type(
        strict_json.plain(np.float64(0.25))) is float
    with pytest.raises(ValueError, match="not JSON compliant"):  # a case plain() leaves
        strict_json.dumps({math.nan: 1})


def test_the_demo_writes_strict_json(tmp_path, example_log, monkeypatch, capsys):
    """The demo's steps (``dataflow.demo.main``: backfill with PS snapshots, then online from
    them as the files land, with the demo's flags) on the session's example log, without its
    true CTR as MovieLens has none: the Bayes AUC has no value, null in the totals."""
    from dataflow import demo
    examples = tmp_path / "examples"
    examples.mkdir()
    for path in example_log["files"]:
        write_avro(str(examples / os.path.basename(path)), "example",
                   [{**r, "true_ctr": None} for r in read_avro(path)])
    out = tmp_path / "demo"
    monkeypatch.setattr(demo, "OUT", str(out))
    monkeypatch.setattr(demo, "example_log",
                        lambda: sorted(str(p) for p in examples.glob("*.avro")))
    demo.main(["--config=synthetic", f"--store=memory://demo-{tmp_path.name}"])
    assert "demo: online AUC" in capsys.readouterr().out

    parsed = strict_files(out, os.path.join(example_log["dir"], "joined"))
    totals = {mode: parsed[str(out / "metrics" / f"online-{mode}-totals.json")]
              for mode in ("backfill", "online")}
    for t in totals.values():
        assert t["bayes_auc"] is None and 0.5 < t["auc"] < 1 and t["end_of_input"], t
    assert sum(t["examples"] for t in totals.values()) == example_log["examples"]


def run_printed(capsys, main, *argv):
    """A benchmark's ``main(argv)`` in this process; its printed JSON, parsed strictly."""
    main(list(argv))
    return strict_loads(capsys.readouterr().out)


def run_module(*argv):
    """``python -m argv...`` (benchmarks that pin their process to a core); its printed
    JSON, parsed strictly."""
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [strict_loads(line) for line in proc.stdout.splitlines() if line.strip()]


def test_benchmark_join_prints_strict_json(capsys):
    from benchmarks import join
    r = run_printed(capsys, join.main, "--requests=2000", "--json")
    assert r["examples"] > 0 and r["examples_per_s"] > 0


def test_benchmark_gap_prints_strict_json(capsys):
    from benchmarks import gap
    r = run_printed(capsys, gap.main, "--requests=3000", "--json")
    assert 0.5 < r["bayes_auc"] < 1


@pytest.mark.slow
def test_benchmark_preprocess_prints_strict_json(tmp_path, capsys):
    from benchmarks import preprocess
    r = run_printed(capsys, preprocess.main, "--requests=2000", "--repeat=1",
                    f"--workdir={tmp_path}", "--json")
    assert r["records"] == 2000 and r["slowdown"] > 0
    strict_files(tmp_path / "transform")  # TFT's summary.json


def test_benchmark_train_prints_strict_json(tmp_path, capsys):
    from benchmarks import train
    r = run_printed(capsys, train.main, "--requests=2000", "--model=lr",
                    f"--workdir={tmp_path}", "--json")
    assert r["examples"] > 0 and 0 < r["online_auc"] < 1
    strict_files(tmp_path)  # the --metrics_out and totals it read


def test_benchmark_model_prints_strict_json():
    rows = run_module("benchmarks.model", "--kinds=lr", "--batches=64", "--repeat=3", "--json")
    assert [r["kind"] for r in rows] == ["lr"] and rows[0]["step_ms"] > 0


@pytest.mark.slow
def test_benchmark_serve_prints_strict_json():
    [r] = run_module("benchmarks.serve", "--stores=memory", "--model=lr", "--requests=20",
                     "--seconds=1", "--candidates=10", "--distinct_requests=5", "--json")
    assert r["memory"]["requests_per_s"] > 0
