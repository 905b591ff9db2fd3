"""Your own table → ``dataflow.data table`` → join → train backfill → online AUC.

End to end on the real table ``examples/adult.csv`` (UCI Adult, 2,500 rows) with two rows
spoilt, so that every row is accounted for (requests + dead letters = rows) through the
join into training; then the bad-input cases of the table CLI, unit by unit.
"""
from __future__ import annotations

import csv
import glob
import json
import re
from pathlib import Path

import fastavro
import pandas as pd
import pytest

from transforms.example_log import read_examples_in_order
from dataflow import data, join, table, train
from schemas.feature_config import FeatureConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "adult.csv"
ADULT_FLAGS = ["--label", "income", "--positive", ">50K", "--na_values", "?",
               "--ignore", "fnlwgt"]


def strict_loads(text: str):
    """json.loads that refuses NaN and Infinity (what the CLI promises never to print)."""
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def run_table(capsys, *argv):
    """``python -m dataflow.data table ...`` in process: (exit code, summary or None, stderr)."""
    code = data.main(["table", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, (strict_loads(out) if out.strip() else None), err


def read_avro_dir(pattern: str) -> list:
    records = []
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            records.extend(fastavro.reader(f))
    return records


def dead_letters(summary) -> list:
    with open(summary["dead_letter_file"], encoding="utf-8") as f:
        return [strict_loads(line) for line in f]


# --------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_adult_table_to_online_auc(tmp_path, capsys):
    # The real table with two rows spoilt: row 5 has no label, row 17 a word for an age.
    with open(EXAMPLE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows[5]["income"] = ""
    rows[17]["age"] = "forty"
    spoilt = tmp_path / "adult.csv"
    with open(spoilt, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    good = [r for k, r in enumerate(rows) if k not in (5, 17)]
    positives = sum(r["income"] == ">50K" for r in good)

    out = tmp_path / "adult"
    code, summary, err = run_table(capsys, "--input", spoilt, *ADULT_FLAGS, "--out", out)
    assert code == 0, err
    assert (summary["rows"], summary["requests"], summary["dead_letters"]) == (2500, 2498, 2)
    assert summary["dead_letter_reasons"] == {"missing_label": 1, "bad_number:age": 1}
    assert summary["positives"] == positives
    assert summary["columns"]["numeric"] == ["age", "education_num", "capital_gain",
                                             "capital_loss", "hours_per_week"]
    assert summary["columns"]["ignored"] == ["fnlwgt"]
    assert strict_loads((out / "summary.json").read_text()) == summary
    assert "2 of 2500 rows are dead letters" in err
    letters = dead_letters(summary)
    assert [(d["row"], d["reason"]) for d in letters] == [(5, "missing_label"),
                                                         (17, "bad_number:age")]
    assert letters[1]["record"]["age"] == "forty"  # the row as read, to fix and send again

    # The logs: one request per readable row in time order, a click after each positive.
    requests = read_avro_dir(summary["feature_log_glob"])
    actions = read_avro_dir(summary["action_log_glob"])
    assert len(requests) == 2498
    assert [r["ts_ms"] for r in requests] == sorted(r["ts_ms"] for r in requests)
    assert {a["action"] for a in actions} == {"click"} and len(actions) == positives
    served = {r["request_id"]: r["ts_ms"] for r in requests}
    assert all(1_000 <= a["ts_ms"] - served[a["request_id"]] <= 60_000 for a in actions)
    assert requests[0]["features"]["workclass"] == "State-gov"  # row 0, as in the file
    assert requests[0]["features"]["age"] == 39.0
    assert "fnlwgt" not in requests[0]["features"]
    by_id = {r["request_id"]: r for r in requests}
    assert by_id["row-0027"]["features"]["occupation"] is None  # "?" in row 27
    assert by_id["row-0027"]["features"]["race"] == "Asian-Pac-Islander"

    # The generated config loads and names every feature column; the join uses it.
    config = FeatureConfig.load(out / "feature_config.yaml")
    assert [s.name for s in config.slots] == [
        "workclass", "education", "marital_status", "occupation", "relationship", "race",
        "sex", "native_country", "age", "education_num", "capital_gain", "capital_loss",
        "hours_per_week"]
    assert config.slot_by_name["occupation"].optional  # it has empty cells
    assert not config.slot_by_name["education"].optional
    assert config.dense_names == summary["columns"]["numeric"]

    join_metrics = tmp_path / "join.json"
    join.main([f"--features={summary['feature_log_glob']}",
               f"--actions={summary['action_log_glob']}",
               f"--config={summary['config']}", f"--out={out / 'joined'}",
               f"--metrics_out={join_metrics}", "--runner=DirectRunner"])
    counters = json.loads(join_metrics.read_text())["counters"]
    assert counters["extract.extracted"] == 2498
    assert (counters["joiner.examples"], counters["joiner.positives"]) == (2498, positives)
    examples = list(read_examples_in_order(str(out / "joined" / "examples")))
    assert len(examples) + len(letters) == len(rows)  # every row accounted for
    assert sum(e["label"] for e in examples) == positives
    assert not glob.glob(str(out / "joined" / "dead_letter" / "*"))

    train_metrics, metrics_dir = tmp_path / "train.json", out / "train"
    train.main(["backfill", f"--input={out / 'joined' / 'examples' / '*.avro'}",
                f"--config={summary['config']}", f"--store=memory://adult-{tmp_path.name}",
                f"--metrics_dir={metrics_dir}", f"--metrics_out={train_metrics}",
                "--runner=DirectRunner"])
    counters = json.loads(train_metrics.read_text())["counters"]
    assert counters["worker.examples"] == counters["online.examples"] == 2498
    totals = json.loads((metrics_dir / "online-backfill-totals.json").read_text())
    assert totals["examples"] == 2498 and totals["positives"] == positives
    # Measured 0.796 on the clean table (deepfm, the defaults); a coin scores 0.5.
    assert totals["auc"] > 0.72, totals


# --------------------------------------------------------------------------- bad input

def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path


CLICKS = """
user,item,ts,clicked,city,price
u1,i1,2024-03-01T10:00:05,1,paris,3.5
u2,i2,2024-03-01T10:00:01,0,rome,2
u1,i3,2024-03-01T10:00:09,yes?,paris,4
u3,i1,,1,oslo,1
u2,i2,not a date,0,rome,2
u3,i4,2024-03-01 10:00:07+01:00,true,oslo,
,i1,2024-03-01T10:00:08,0,rome,1
"""


@pytest.mark.parametrize("flag, value", [
    ("--label", "clickd"), ("--time", "time"), ("--user", "uid"), ("--item", "item_id"),
    ("--categorical", "town"), ("--numeric", "prize"), ("--ignore", "nope")])
def test_a_missing_column_is_a_clear_error_naming_it(tmp_path, capsys, flag, value):
    path = write_csv(tmp_path / "clicks.csv", CLICKS)
    argv = ["--input", path, "--label", "clicked", "--out", tmp_path / "out"]
    if flag == "--label":
        argv[3] = value
    else:
        argv += [flag, value]
    code, summary, err = run_table(capsys, *argv)
    assert code == 2 and summary is None
    assert f"{flag} {value}: the table has no column {value!r}" in err
    assert "its columns: user, item, ts, clicked, city, price" in err
    if value == "clickd":
        assert "did you mean 'clicked'?" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_labels_and_times_are_dead_letters_counted_in_the_summary(tmp_path, capsys):
    path = write_csv(tmp_path / "clicks.csv", CLICKS)
    out = tmp_path / "out"
    code, summary, err = run_table(capsys, "--input", path, "--label", "clicked",
                                   "--time", "ts", "--user", "user", "--item", "item",
                                   "--out", out)
    assert code == 0, err
    assert (summary["rows"], summary["requests"], summary["dead_letters"]) == (7, 3, 4)
    assert summary["dead_letter_reasons"] == {"bad_label": 1, "missing_time": 1,
                                              "bad_time": 1, "missing_id:user": 1}
    letters = {d["row"]: d for d in dead_letters(summary)}
    assert {k: d["reason"] for k, d in letters.items()} == {
        2: "bad_label", 3: "missing_time", 4: "bad_time", 6: "missing_id:user"}
    assert "'yes?' is not 0/1 or true/false" in letters[2]["detail"]
    assert "'not a date' is not a date/time" in letters[4]["detail"]
    assert letters[3]["record"] == {"user": "u3", "item": "i1", "ts": None, "clicked": "1",
                                    "city": "oslo", "price": 1.0}
    assert summary["time"] == {"column": "ts", "format": "iso"}

    # The readable rows in time order; a zone is honoured, no zone is UTC.
    requests = read_avro_dir(summary["feature_log_glob"])
    assert [r["request_id"] for r in requests] == ["row-5", "row-1", "row-0"]
    assert [r["ts_ms"] for r in requests] == [
        int(pd.Timestamp(t).timestamp() * 1000) for t in
        ("2024-03-01T09:00:07Z", "2024-03-01T10:00:01Z", "2024-03-01T10:00:05Z")]
    assert [(r["user_id"], r["item_id"]) for r in requests] == [
        ("u3", "i4"), ("u2", "i2"), ("u1", "i1")]
    assert requests[0]["features"] == {"city": "oslo", "price": None}
    actions = read_avro_dir(summary["action_log_glob"])
    assert sorted(a["request_id"] for a in actions) == ["row-0", "row-5"]  # 1 and true

    config = FeatureConfig.load(summary["config"])
    assert [(s.name, s.fields) for s in config.slots][:3] == [
        ("user", ("user_id",)), ("item", ("item_id",)), ("city", ("city",))]
    assert config.dense_names == ["price"]


def test_time_formats(tmp_path, capsys):
    seconds = [1_700_000_000 + k for k in range(3)]
    ms = [s * 1000 for s in seconds]
    cases = [("auto", seconds), ("auto", ms), ("s", seconds), ("ms", ms),
             ("%d/%m/%Y %H:%M:%S", [pd.Timestamp(s, unit="s").strftime("%d/%m/%Y %H:%M:%S")
                                    for s in seconds])]
    for k, (fmt, times) in enumerate(cases):
        path = tmp_path / f"t{k}.csv"
        pd.DataFrame({"t": times[::-1], "y": [0, 1, 0], "c": ["a", "b", "c"]}).to_csv(
            path, index=False)
        code, summary, err = run_table(capsys, "--input", path, "--label", "y", "--time", "t",
                                       "--time_format", fmt, "--out", tmp_path / f"o{k}")
        assert code == 0, err
        assert summary["dead_letters"] == 0
        assert [r["ts_ms"] for r in read_avro_dir(summary["feature_log_glob"])] == ms, fmt
        assert [r["features"]["c"] for r in read_avro_dir(summary["feature_log_glob"])] == \
            ["c", "b", "a"]  # sorted by time, not file order
    assert summary["time"]["format"] == "%d/%m/%Y %H:%M:%S"
    # No column left to be a feature: a clear error.
    path = write_csv(tmp_path / "bare.csv", "t,y\n1700000000,1")
    code, summary, err = run_table(capsys, "--input", path, "--label", "y", "--time", "t",
                                   "--out", tmp_path / "bare")
    assert code == 2 and "no feature column is left" in err
    # A wrong unit makes every time a dead letter: exit 1, with the reason.
    path = write_csv(tmp_path / "unit.csv", "t,y,c\n1700000000000,1,a\n1700000001000,0,b")
    code, summary, err = run_table(capsys, "--input", path, "--label", "y", "--time", "t",
                                   "--time_format", "s", "--out", tmp_path / "ou")
    assert code == 1 and summary["requests"] == 0 and summary["dead_letters"] == 2
    assert "no row could be read" in err
    assert "another unit?" in dead_letters(summary)[0]["detail"]


def test_parquet_row_order_and_inferred_kinds(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    df = pd.DataFrame({"clicked": [True, False, True], "n": [3, 1, 2],
                       "flag": [True, False, True], "code": ["12", "7", "40"],
                       "ratio": [0.5, 1.5, None]})
    df.to_parquet(path)
    code, summary, err = run_table(capsys, "--input", path, "--label", "clicked",
                                   "--categorical", "n", "--row_interval_s", "30",
                                   "--start", "2024-02-01", "--out", tmp_path / "out")
    assert code == 0, err
    assert summary["columns"]["categorical"] == ["n", "flag"]
    assert summary["columns"]["numeric"] == ["code", "ratio"]  # text of numbers: numeric
    requests = read_avro_dir(summary["feature_log_glob"])
    start = int(pd.Timestamp("2024-02-01", tz="UTC").timestamp() * 1000)
    assert [r["ts_ms"] for r in requests] == [start, start + 30_000, start + 60_000]
    assert requests[0]["features"] == {"n": "3", "flag": "true", "code": 12.0, "ratio": 0.5}
    assert (summary["positives"], summary["users"]) == (2, None)
    config = FeatureConfig.load(summary["config"])
    assert config.slot_by_name["ratio"].optional and not config.slot_by_name["code"].optional

    # A Parquet timestamp column (no zone: UTC) as the time.
    df["when"] = pd.to_datetime(["2024-05-01 12:00:02", "2024-05-01 12:00:00", None])
    df.to_parquet(path)
    code, summary, err = run_table(capsys, "--input", path, "--label", "clicked",
                                   "--time", "when", "--out", tmp_path / "out2")
    assert code == 0, err
    assert (summary["requests"], summary["dead_letter_reasons"]) == (2, {"missing_time": 1})
    when = int(pd.Timestamp("2024-05-01 12:00:00", tz="UTC").timestamp() * 1000)
    assert [(r["request_id"], r["ts_ms"]) for r in read_avro_dir(summary["feature_log_glob"])] \
        == [("row-1", when), ("row-0", when + 2000)]


def test_label_forms_and_a_click_delay_past_the_join_window(tmp_path, capsys):
    path = write_csv(tmp_path / "t.csv", "y,c\n1.0,a\nTRUE,b\n0,c\nfalse,d\n2,e")
    code, summary, err = run_table(capsys, "--input", path, "--label", "y",
                                   "--max_click_delay_s", "1000", "--out", tmp_path / "out")
    assert code == 0, err
    assert (summary["positives"], summary["dead_letter_reasons"]) == (2, {"bad_label": 1})
    assert "warning: clicks up to 1000 s after their request" in err
    served = {r["request_id"]: r["ts_ms"] for r in read_avro_dir(summary["feature_log_glob"])}
    delays = [a["ts_ms"] - served[a["request_id"]]
              for a in read_avro_dir(summary["action_log_glob"])]
    assert len(delays) == 2 and all(1_000 <= d <= 1_000_000 for d in delays)


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    path = write_csv(tmp_path / "t.csv", "y,c\n1,a\n0,b")
    argv = ["--input", path, "--label", "y", "--out", tmp_path / "out"]
    assert run_table(capsys, *argv)[0] == 0
    config = tmp_path / "out" / "feature_config.yaml"
    config.write_text(config.read_text() + "# my edit\n")
    code, _, err = run_table(capsys, *argv)
    assert code == 2 and "already holds logs" in err
    assert config.read_text().endswith("# my edit\n")


def test_reserved_and_clashing_columns(tmp_path):
    df = pd.DataFrame({"user_id": ["a"], "y": [1], "c": ["x"]})
    with pytest.raises(table.TableError, match="give --user user_id"):
        table.convert_table(df, table.TableSpec(label="y"))
    with pytest.raises(table.TableError, match="both --label and --numeric"):
        table.convert_table(df, table.TableSpec(label="y", user="user_id", numeric=("y",)))
    with pytest.raises(table.TableError, match="both --time and --user"):
        table.convert_table(df, table.TableSpec(label="y", time="c", user="c"))
    with pytest.raises(table.TableError, match="no rows"):
        table.convert_table(df.iloc[:0], table.TableSpec(label="y"))


def test_quantile_boundaries():
    import numpy as np
    assert table._quantile_boundaries(np.arange(1, 101, dtype=float), 4) == [25.75, 50.5, 75.25]
    # mostly zeros: zero gets its own bucket and the rest are split
    amounts = np.r_[np.zeros(90), np.arange(1, 11, dtype=float)]
    bounds = table._quantile_boundaries(amounts, 4)
    assert bounds[0] == 1 and len(bounds) == 3
    assert table._quantile_boundaries(np.ones(5), 8) == []  # a constant: no slot


def test_the_join_window_in_the_help_is_the_joins():
    from transforms.joiner import DEFAULT_JOIN_WINDOW_S
    assert table.JOIN_WINDOW_S == DEFAULT_JOIN_WINDOW_S


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        data.main(["table", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = data._parser()
    sub = next(a for a in parser._actions if a.dest == "dataset").choices["table"]
    for action in sub._actions:
        if action.required or action.dest == "help":
            continue
        assert "default" in (action.help or ""), action.option_strings
    assert "(default: auto)" in text and "(default: 1.0)" in text


def test_docs_python_example_runs(tmp_path, monkeypatch):
    """The "from Python" example of docs/your-data.md runs as written."""
    doc = (ROOT / "docs" / "your-data.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert blocks, "docs/your-data.md has no python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/your-data.md", "exec"), {"__name__": "docs_example"})
    requests = read_avro_dir(str(tmp_path / "out/mine/feature_log/*.avro"))
    actions = read_avro_dir(str(tmp_path / "out/mine/action_log/*.avro"))
    assert len(requests) == 3 and len(actions) == 1
