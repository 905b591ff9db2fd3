"""Your own table as logs: ``python -m dataflow.data table``.

A table (CSV or Parquet) with a label column becomes what the built-in generators write, so
the join and training run on it unchanged::

    python -m dataflow.data table --input clicks.csv --label clicked --out out/mine \\
        [--user user_id --item item_id --time ts --time_format s] [--positive VALUES]
        [--categorical COLS --numeric COLS --ignore COLS]

    OUT/feature_log/part-*.avro   FeatureLog (schemas/feature_log.avsc): every row is a served
                                  request; the feature columns fill its ``features`` map
    OUT/action_log/part-*.avro    ActionLog: a positive row's "click", 1 to 60 s after it
    OUT/feature_config.yaml       a slot per column (numbers: quantile buckets and a dense
                                  input), for you to edit (schemas/feature_config.py)
    OUT/dead_letter/rows.jsonl    rows whose label, time, id or number cannot be read, each
                                  with its row number, reason and values
    OUT/summary.json              counts (rows = requests + dead letters), columns, files

As ``movielens`` maps a rating to a served request and a click: a row is a request at its
time (``--time``; without it, row order, ``--row_interval_s`` apart from ``--start``), and
a positive label a click some seconds later. docs/your-data.md is the guide.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import difflib
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dataflow.log_files import write_actions, write_logs
from schemas import strict_json
from schemas.feature_config import FeatureConfig

__all__ = ["TableSpec", "TableError", "read_table", "convert_table", "write_table",
           "feature_config_yaml", "add_arguments", "run"]

TIME_UNITS = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
MAX_TS_MS = 253_402_300_800_000   # 10000-01-01: later is a wrong unit, not a date
USER_SLOT, ITEM_SLOT, FIRST_FEATURE_SLOT = 1, 2, 3
# transforms.joiner's (tests/test_your_data.py checks): importing it would load Beam
JOIN_WINDOW_S = 900
CONFIG_NAME = "feature_config.yaml"
DEAD_LETTER_FILE = os.path.join("dead_letter", "rows.jsonl")
TRUE_TEXTS, FALSE_TEXTS = {"1", "true"}, {"0", "false"}


class TableError(ValueError):
    """The table or the flags cannot be used as given (a missing column, a clash).

    >>> table = pd.DataFrame({"clicked": [1, 0], "user": ["u1", "u2"]})
    >>> convert_table(table, TableSpec(label="clickd"))
    Traceback (most recent call last):
    ...
    dataflow.table.TableError: --label clickd: the table has no column 'clickd' (did you ...
    """


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """What the columns mean and how rows become requests; the CLI's flags
    (``python -m dataflow.data table --help`` says more of each).

    Args:
        label: the label column.
        positive: label values that are positive (empty: 0/1, true/false).
        time: the time column (None: row order, ``row_interval_s`` apart from ``start``).
        time_format: ``auto``, ``s``, ``ms``, ``us``, ``ns``, ``iso`` or a strftime format.
        user, item: the id columns (None: none).
        categorical, numeric, ignore: columns of these kinds (others not named anywhere:
            by their values).
        row_interval_s: without ``time``: seconds between rows.
        start: without ``time``: the UTC day of the first row.
        max_click_delay_s: a click comes 1 .. this many seconds after its request.
        action: the positive rows' action.
        buckets: quantile buckets of a numeric column's slot.
        dim: the slots' embedding dim.
        file_hours: hours of event time per Avro file.
        seed: seeds the click delays.

    Raises:
        TableError: a value out of range, named by its flag.

    >>> table = pd.DataFrame({"clicked": [1, 0, "x"], "user": ["u1", "u2", "u3"],
    ...                       "price": [1.5, 2.0, 3.0]})
    >>> logs = convert_table(table, TableSpec(label="clicked", user="user"))
    >>> logs.label.tolist(), logs.user, logs.numeric, [d["reason"] for d in logs.dead]
    ([True, False], ['u1', 'u2'], ['price'], ['bad_label'])
    """
    label: str
    positive: tuple[str, ...] = ()     # label values that are positive (empty: 0/1, true/false)
    time: str | None = None            # None: row order
    time_format: str = "auto"          # auto, s, ms, us, ns, iso or a strftime format
    user: str | None = None
    item: str | None = None
    categorical: tuple[str, ...] = ()  # other columns not named anywhere: by dtype
    numeric: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    row_interval_s: float = 1.0        # without --time: seconds between rows
    start: str = "2024-01-01"          # without --time: UTC day of the first row
    max_click_delay_s: int = 60        # a click comes 1 .. this many seconds after its request
    action: str = "click"
    buckets: int = 8                   # quantile buckets of a numeric column's slot
    dim: int = 8
    file_hours: int = 24
    seed: int = 0

    def __post_init__(self):
        if self.row_interval_s <= 0:
            raise TableError(f"--row_interval_s must be positive, got {self.row_interval_s}")
        if self.max_click_delay_s < 1:
            raise TableError(f"--max_click_delay_s must be at least 1, got "
                             f"{self.max_click_delay_s}")
        for name in ("buckets", "dim", "file_hours"):
            if getattr(self, name) < 1:
                raise TableError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not self.action:
            raise TableError("--action must name an action, e.g. click")
        try:
            self.start_ms
        except ValueError:
            raise TableError(f"--start must be a day YYYY-MM-DD, got {self.start!r}") from None

    @property
    def start_ms(self) -> int:
        day = dt.datetime.strptime(self.start, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
        return int(day.timestamp()) * 1000


# --------------------------------------------------------------------------- reading

def read_table(path: str | os.PathLike, fmt: str = "auto", sep: str = ",",
               na_values: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV (also .csv.gz, .tsv) or Parquet file as a DataFrame.

    Args:
        path: the file.
        fmt: ``csv``, ``parquet`` or ``auto`` (by its suffix).
        sep: a CSV file's separator (a ``.tsv``'s: a tab).
        na_values: more CSV texts that mean an empty cell.

    Returns:
        The ``pandas.DataFrame``.

    Raises:
        TableError: no such file, or it cannot be read as ``fmt``.
    """
    path = Path(path)
    if not path.is_file():
        raise TableError(f"--input {path}: no such file")
    if fmt == "auto":
        fmt = "parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv"
        if path.suffix.lower() == ".tsv" and sep == ",":
            sep = "\t"
    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        # skipinitialspace: "a, b" files (UCI's) give "b", not " b"
        return pd.read_csv(path, sep=sep, na_values=list(na_values) or None,
                           skipinitialspace=True, low_memory=False)
    except (ValueError, OSError, pd.errors.ParserError) as e:
        raise TableError(f"--input {path}: cannot be read as {fmt}: {e}") from None


# --------------------------------------------------------------------------- values

def _is_missing(v) -> bool:
    return v is None or (not isinstance(v, (list, tuple, np.ndarray)) and bool(pd.isna(v)))


def _text(v) -> str | None:
    """A categorical value's text: integers without ".0", booleans as true/false."""
    if _is_missing(v):
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return str(v)


def _jsonable(v) -> Any:
    """A cell as strict JSON (NaN and NaT: null; numpy scalars: Python's)."""
    if _is_missing(v):
        return None
    if isinstance(v, (np.integer, np.bool_)):
        return v.item()
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, (str, int, bool)):
        return v
    if isinstance(v, (pd.Timestamp, dt.datetime, dt.date)):
        return v.isoformat()
    return str(v)


def _labels(col: pd.Series, positive: tuple[str, ...]):
    """``(label, reason, detail)`` arrays; reason is None where the label is readable."""
    n = len(col)
    label = np.zeros(n, dtype=bool)
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)
    wanted = {p.strip() for p in positive}
    for k, v in enumerate(col.tolist()):
        if _is_missing(v):
            reason[k], detail[k] = "missing_label", "the label is empty"
            continue
        text = _text(v).strip()
        if wanted:
            label[k] = text in wanted
            continue
        text = text.lower()
        if text not in TRUE_TEXTS | FALSE_TEXTS:
            text = _text(pd.to_numeric(text, errors="coerce"))  # "1.0" is 1
        if text in TRUE_TEXTS:
            label[k] = True
        elif text not in FALSE_TEXTS:
            reason[k] = "bad_label"
            detail[k] = (f"{v!r} is not 0/1 or true/false (give --positive VALUES for a "
                         "label column of other values)")
    return label, reason, detail


def _epoch_unit(values: np.ndarray) -> str:
    """The unit of epoch numbers from their size: 1.7e9 is seconds now, 1.7e12 ms, ..."""
    median = float(np.median(np.abs(values))) if len(values) else 0.0
    return "s" if median < 1e11 else "ms" if median < 1e14 else "us" if median < 1e17 else "ns"


def _times(col: pd.Series, fmt: str):
    """``(ts_ms int64, reason, detail, used format)``; reason is None where readable."""
    n = len(col)
    missing = col.isna().to_numpy()
    ts = np.zeros(n, dtype=np.int64)
    ok = ~missing
    used = fmt
    if fmt in TIME_UNITS or (fmt == "auto" and _mostly_numbers(col)):
        values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        ok &= np.isfinite(values)
        if fmt == "auto":
            used = _epoch_unit(values[ok])
        with np.errstate(invalid="ignore", over="ignore"):
            ms = np.floor(values * TIME_UNITS[used])
        ok &= (ms >= 0) & (ms < MAX_TS_MS)
        ts[ok] = ms[ok].astype(np.int64)
    else:
        try:
            if fmt in ("auto", "iso"):
                parsed = pd.to_datetime(col, utc=True, errors="coerce")
            else:
                parsed = pd.to_datetime(col, utc=True, errors="coerce", format=fmt)
        except (ValueError, TypeError) as e:  # e.g. a format pandas cannot use at all
            raise TableError(f"--time_format {fmt!r}: {e}") from None
        if fmt == "auto":
            used = "iso"
        ns = parsed.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        ok &= ~parsed.isna().to_numpy()
        ok &= ns >= 0
        ts[ok] = ns[ok] // 1_000_000
    reason = np.where(missing, "missing_time", np.where(ok, None, "bad_time")).astype(object)
    detail = np.full(n, None, dtype=object)
    hint = ("an epoch number in " + used + " between 1970 and 9999 (another unit? "
            "--time_format s|ms|us|ns)") if used in TIME_UNITS else \
        (f"a date/time as --time_format {used!r} reads it, from 1970 on")
    for k in np.flatnonzero(~ok & ~missing):
        detail[k] = f"{col.iloc[k]!r} is not {hint}"
    detail[missing] = "the time is empty"
    return ts, reason, detail, used


# --------------------------------------------------------------------------- converting

@dataclasses.dataclass
class TableLogs:
    """The table's readable rows as requests in time order, and what could not be read
    (what :func:`convert_table` makes).

    >>> table = pd.DataFrame({"clicked": [0, 1], "ts": [1_704_067_260, 1_704_067_200]})
    >>> logs = convert_table(table, TableSpec(label="clicked", time="ts"))
    >>> logs.row.tolist(), logs.ts_ms.tolist(), logs.time_format   # in time order
    ([1, 0], [1704067200000, 1704067260000], 's')
    """
    spec: TableSpec
    rows: int                      # rows of the table
    row: np.ndarray                # per request: its row in the table (0-based)
    ts_ms: np.ndarray              # per request, sorted
    label: np.ndarray              # per request: bool
    user: list                     # per request: the user id ("" without --user)
    item: list
    features: dict                 # column -> per-request values (str, float or None)
    categorical: list              # feature columns by kind, in table order
    numeric: list
    ignored: list
    dead: list                     # dead letters: {"row", "reason", "detail", "record"}
    time_format: str | None        # what --time_format auto resolved to


def _split(values) -> tuple[str, ...]:
    """"a,b, c" → ("a", "b", "c"); a list of such strings → all of them."""
    if values is None:
        return ()
    if isinstance(values, str):
        values = [values]
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


def _check_columns(df: pd.DataFrame, spec: TableSpec) -> None:
    """Every column a flag names exists, and no column has two roles."""
    columns = [str(c) for c in df.columns]
    named = [("--label", spec.label), ("--time", spec.time), ("--user", spec.user),
             ("--item", spec.item)]
    named += [(flag, c) for flag, cols in (("--categorical", spec.categorical),
                                           ("--numeric", spec.numeric),
                                           ("--ignore", spec.ignore)) for c in cols]
    seen: dict = {}
    for flag, column in named:
        if column is None:
            continue
        if column not in columns:
            close = difflib.get_close_matches(column, columns, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TableError(f"{flag} {column}: the table has no column {column!r}{hint}; "
                             f"its columns: {', '.join(columns)}")
        if column in seen and seen[column] != flag:
            raise TableError(f"column {column!r} is given to both {seen[column]} and {flag}")
        seen[column] = flag
    for reserved, flag in (("user_id", "--user"), ("item_id", "--item")):
        role = seen.get(reserved)
        if reserved in columns and role not in (flag, "--ignore"):
            raise TableError(f"column {reserved!r}: the feature config reads {reserved} as "
                             f"the request's {flag} id; give {flag} {reserved} (or "
                             f"--ignore {reserved})")


def _feature_kinds(df: pd.DataFrame, spec: TableSpec) -> tuple[list, list, list]:
    """(categorical, numeric, ignored) feature columns in table order; unnamed ones by
    their values: numbers are numeric, anything else (text, booleans, dates) categorical."""
    roles = {spec.label, spec.time, spec.user, spec.item} - {None}
    categorical, numeric, ignored = [], [], []
    for column in (str(c) for c in df.columns):
        if column in roles:
            continue
        if column in spec.ignore:
            ignored.append(column)
        elif column in spec.categorical:
            categorical.append(column)
        elif column in spec.numeric:
            numeric.append(column)
        elif _mostly_numbers(df[column]):
            numeric.append(column)
        else:
            categorical.append(column)
    return categorical, numeric, ignored


def _mostly_numbers(col: pd.Series) -> bool:
    """A number column, or text of which at least 99% of the non-empty cells are numbers
    (the others then are dead letters that say so, not a column silently categorical)."""
    if pd.api.types.is_bool_dtype(col):
        return False
    if pd.api.types.is_numeric_dtype(col):
        return True
    if not pd.api.types.is_object_dtype(col):
        return False  # dates, categories
    present = col.dropna()
    if len(present) == 0 or not all(isinstance(v, str) for v in present.head(1000)):
        return False
    parsed = pd.to_numeric(present, errors="coerce")
    return bool(np.isfinite(parsed.to_numpy(dtype=np.float64)).mean() >= 0.99)


def convert_table(df: pd.DataFrame, spec: TableSpec) -> TableLogs:
    """Parses labels, times, ids and features; rows that cannot be read become dead letters
    (the first problem of a row is its reason). Example: :class:`TableSpec`.

    Args:
        df: the table.
        spec: the :class:`TableSpec`.

    Returns:
        The :class:`TableLogs`.

    Raises:
        TableError: the table has no rows, or flags that do not fit it.
    """
    df = df.rename(columns=str).reset_index(drop=True)
    if len(df) == 0:
        raise TableError("the table has no rows")
    _check_columns(df, spec)
    categorical, numeric, ignored = _feature_kinds(df, spec)
    n = len(df)
    checks = []   # (reason, detail) arrays, in the order a row's first problem is reported
    label, reason, detail = _labels(df[spec.label], spec.positive)
    checks.append((reason, detail))
    time_format = None
    if spec.time is not None:
        ts, reason, detail, time_format = _times(df[spec.time], spec.time_format)
        checks.append((reason, detail))
    else:
        ts = spec.start_ms + np.round(np.arange(n) * spec.row_interval_s * 1000).astype(np.int64)
    ids = {}
    for flag, column in (("user", spec.user), ("item", spec.item)):
        if column is None:
            ids[flag] = [""] * n
            continue
        texts = [_text(v) for v in df[column].tolist()]
        missing = np.array([t is None for t in texts])
        checks.append((np.where(missing, f"missing_id:{column}", None).astype(object),
                       np.where(missing, f"--{flag} column {column!r} is empty", None)))
        ids[flag] = texts
    features = {c: [_text(v) for v in df[c].tolist()] for c in categorical}
    for column in numeric:
        raw = df[column]
        with np.errstate(invalid="ignore"):
            values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~raw.isna().to_numpy() & ~np.isfinite(values)
        checks.append((np.where(bad, f"bad_number:{column}", None).astype(object),
                       np.array([f"{v!r} is not a finite number (or make {column!r} "
                                 "--categorical)" if b else None
                                 for v, b in zip(raw.tolist(), bad)], dtype=object)))
        features[column] = [None if math.isnan(v) else v for v in values.tolist()]

    first_reason = np.full(n, None, dtype=object)
    first_detail = np.full(n, None, dtype=object)
    for reason, detail in checks:
        take = (first_reason == None) & (reason != None)  # noqa: E711 (object arrays)
        first_reason[take], first_detail[take] = reason[take], detail[take]
    good = np.flatnonzero(first_reason == None)  # noqa: E711
    dead_rows = np.flatnonzero(first_reason != None)  # noqa: E711
    dead = [{"row": int(k), "reason": first_reason[k], "detail": first_detail[k],
             "record": {c: _jsonable(v) for c, v in df.iloc[k].items()}} for k in dead_rows]

    order = good[np.argsort(ts[good], kind="stable")]  # time order; ties in table order
    return TableLogs(
        spec=spec, rows=n, row=order, ts_ms=ts[order], label=label[order],
        user=[ids["user"][k] for k in order], item=[ids["item"][k] for k in order],
        features={c: [v[k] for k in order] for c, v in features.items()},
        categorical=categorical, numeric=numeric, ignored=ignored, dead=dead,
        time_format=time_format)


# --------------------------------------------------------------------------- feature config

def _quantile_boundaries(values: np.ndarray, buckets: int) -> list:
    """About ``buckets - 1`` strictly increasing boundaries at the values' quantiles."""
    if len(values) == 0 or buckets < 2:
        return []
    lo = values.min()
    bounds = set(np.quantile(values, np.linspace(0, 1, buckets + 1)[1:-1]).tolist())
    above = values[values > lo]
    if len(bounds - {lo}) < buckets - 1 and len(above) and (values == lo).mean() > 1 / buckets:
        # A value as common as a bucket (the zeros of an amount, say) gets a bucket of its
        # own, and the rest are split at their own quantiles.
        bounds |= {float(above.min())}
        bounds |= set(np.quantile(above, np.linspace(0, 1, buckets)[1:-1]).tolist())
    # x < b[0] is bucket 0: a boundary at the minimum would leave that bucket empty
    rounded = {float(f"{b:.6g}") for b in bounds if b > lo}
    return sorted(int(b) if b.is_integer() else b for b in rounded if b > lo)


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def _yaml(value) -> str:
    """A YAML flow scalar: a plain name as it is, anything else as JSON text (valid YAML)."""
    if isinstance(value, str) and _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value, allow_nan=False)


def feature_config_yaml(logs: TableLogs, source: str = "the table") -> str:
    """The feature config of the table's columns, as YAML text with comments to edit by:
    user and item slots (with --user, --item), a slot per categorical column, and per
    numeric column a slot of its quantile buckets plus a dense input (log1p of the value,
    the median when missing). A column with empty cells is ``optional``.

    Args:
        logs: the :class:`TableLogs`.
        source: the table, as the config's comments name it.

    Returns:
        The YAML text (``schemas/feature_config.py`` reads it).
    """
    spec, n = logs.spec, len(logs.ts_ms)
    lines = [
        f"# Feature config for {source}, written by python -m dataflow.data table.",
        "# Edit it: dims, occurrence thresholds, expiry, crosses (docs/your-data.md); the",
        "# format and its checks: schemas/feature_config.py. A slot id is the fid's top 15",
        "# bits: once a model has trained, never reuse one for another meaning.",
        "version: 1",
        f"description: {_yaml(f'{source}: {n} requests, label {spec.label}')}",
        "max_list_length: 16",
        "",
        "defaults:",
        f"  dim: {spec.dim:<24}# embedding width of a slot",
        "  occurrence_threshold: 0      # sightings before an id gets a row (0: at once)",
        "  expiry_seconds: null         # event-time seconds a row may stay unseen (null: never)",
        "  optional: false              # true: a missing value gives no fid, not a dead letter",
        "",
        "slots:",
    ]
    if spec.user is not None:
        lines.append(f"  - {{name: user, slot: {USER_SLOT}, source: user_id}}"
                     f"   # column {_yaml(spec.user)}")
    if spec.item is not None:
        lines.append(f"  - {{name: item, slot: {ITEM_SLOT}, source: item_id}}"
                     f"   # column {_yaml(spec.item)}")
    slot = FIRST_FEATURE_SLOT
    dense = []
    for column in [c for c in logs.features if c in logs.categorical or c in logs.numeric]:
        values = logs.features[column]
        empty = sum(v is None for v in values)
        optional = ", optional: true" if empty else ""
        note = f"; {empty} of {n} empty" if empty else ""
        if column in logs.categorical:
            distinct = len({v for v in values if v is not None})
            lines.append(f"  - {{name: {_yaml(column)}, slot: {slot}, source: {_yaml(column)}"
                         f"{optional}}}   # {distinct} values{note}")
            slot += 1
            continue
        present = np.array([v for v in values if v is not None], dtype=np.float64)
        bounds = _quantile_boundaries(present, spec.buckets)
        if bounds:
            lines.append(f"  - {{name: {_yaml(column)}, slot: {slot}, source: {_yaml(column)}"
                         f", bucketize: {{boundaries: {_yaml(bounds)}}}{optional}}}"
                         f"   # {len(bounds) + 1} buckets at the table's quantiles{note}")
            slot += 1
        median = float(f"{np.median(present):.6g}") if len(present) else 0.0
        dense.append(f"  - {{name: {_yaml(column)}, source: {_yaml(column)}, "
                     f"default: {_yaml(median)}, transform: log1p}}"
                     f"   # missing: the median{note}")
    if slot == FIRST_FEATURE_SLOT and spec.user is None and spec.item is None:
        raise TableError("no feature column is left: name some with --categorical or "
                         "--numeric, or give --user/--item")
    if dense:
        lines += ["", "# numbers for the model's dense input: sign(x) log(1 + |x|)", "dense:"]
        lines += dense
    text = "\n".join(lines) + "\n"
    FeatureConfig.from_yaml(text)  # what we write must load (FeatureConfigError otherwise)
    return text


# --------------------------------------------------------------------------- writing

def write_table(logs: TableLogs, out_dir: str | os.PathLike, source: str = "") -> dict:
    """Writes the feature log, action log, feature config, dead letters and
    ``summary.json`` (the module docstring).

    Args:
        logs: the :class:`TableLogs`.
        out_dir: the output directory; it must hold no logs yet.
        source: the table, as the config's comments name it.

    Returns:
        The summary (``requests + dead_letters == rows``).
    """
    spec, out_dir = logs.spec, Path(out_dir)
    for kind in ("feature_log", "action_log"):
        if any((out_dir / kind).glob("*.avro")):
            raise TableError(f"{out_dir}/{kind} already holds logs (and perhaps your edited "
                             f"{CONFIG_NAME}): give a new --out")
    config_text = feature_config_yaml(logs, source or "the table")
    n = len(logs.ts_ms)
    width = len(str(max(logs.rows - 1, 1)))
    request_ids = [f"row-{k:0{width}d}" for k in logs.row.tolist()]
    ts_list = logs.ts_ms.tolist()
    columns = list(logs.features)

    def feature_logs(lo, hi):
        return [{"request_id": request_ids[k], "ts_ms": ts_list[k], "user_id": logs.user[k],
                 "item_id": logs.item[k],
                 "features": {c: logs.features[c][k] for c in columns},
                 "served_score": None, "true_ctr": None} for k in range(lo, hi)]

    out_dir.mkdir(parents=True, exist_ok=True)
    feature_files = write_logs(out_dir / "feature_log", "feature_log", logs.ts_ms,
                               feature_logs, spec.file_hours)
    clicked = np.flatnonzero(logs.label)
    delay_ms = np.random.default_rng(spec.seed).integers(
        1_000, spec.max_click_delay_s * 1000 + 1, size=len(clicked))
    action_files = write_actions(out_dir, request_ids, logs.ts_ms[clicked] + delay_ms,
                                  np.array([spec.action] * len(clicked)), clicked,
                                  spec.file_hours) if len(clicked) else []
    (out_dir / CONFIG_NAME).write_text(config_text, encoding="utf-8")
    dead_path = out_dir / DEAD_LETTER_FILE
    dead_path.parent.mkdir(parents=True, exist_ok=True)
    with open(dead_path, "w", encoding="utf-8") as f:
        for letter in logs.dead:
            f.write(strict_json.dumps(letter, sort_keys=True) + "\n")
    reasons: dict = {}
    for letter in logs.dead:
        reasons[letter["reason"]] = reasons.get(letter["reason"], 0) + 1
    summary = {
        "dataset": "table", "input": source, "rows": logs.rows, "requests": n,
        "dead_letters": len(logs.dead), "dead_letter_reasons": reasons,
        "positive_action": spec.action, "positives": int(len(clicked)),
        "positive_rate": round(len(clicked) / n, 6) if n else None,
        "users": len(set(logs.user)) if spec.user else None,
        "items": len(set(logs.item)) if spec.item else None,
        "time": ({"column": spec.time, "format": logs.time_format} if spec.time
                 else {"column": None, "row_interval_s": spec.row_interval_s,
                       "start": spec.start}),
        "start_ms": int(logs.ts_ms[0]) if n else None,
        "end_ms": int(logs.ts_ms[-1]) if n else None,
        "columns": {"label": spec.label, "user": spec.user, "item": spec.item,
                    "categorical": logs.categorical, "numeric": logs.numeric,
                    "ignored": logs.ignored},
        "feature_log_files": len(feature_files), "action_log_files": len(action_files),
        "feature_log_glob": str(out_dir / "feature_log" / "*.avro"),
        "action_log_glob": str(out_dir / "action_log" / "*.avro"),
        "config": str(out_dir / CONFIG_NAME), "dead_letter_file": str(dead_path),
        "params": dataclasses.asdict(spec),
    }
    (out_dir / "summary.json").write_text(strict_json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")
    return summary


# --------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the ``table`` subcommand's flags (every default in its help).

    Args:
        p: the subcommand's parser.
    """
    d = TableSpec(label="")
    p.add_argument("--input", required=True, metavar="FILE",
                   help="the table: a CSV file (also .csv.gz, .tsv) or a Parquet file "
                        "(.parquet, .pq)")
    p.add_argument("--out", "--out_dir", dest="out_dir", required=True, metavar="DIR",
                   help="a new directory for feature_log/, action_log/, feature_config.yaml, "
                        "dead_letter/rows.jsonl and summary.json")
    p.add_argument("--label", required=True, metavar="COL",
                   help="the label column: 0/1 or true/false, or any values with --positive")
    p.add_argument("--positive", default=None, metavar="VALUES",
                   help="comma-separated label values that are positive (e.g. click,like or "
                        "'>50K'); every other value is negative (default: none, the label "
                        "must be 0/1 or true/false)")
    p.add_argument("--time", default=None, metavar="COL",
                   help="the column of each row's event time (default: none, the rows in "
                        "file order, --row_interval_s apart)")
    p.add_argument("--time_format", default=d.time_format, metavar="FORMAT",
                   help="s, ms, us or ns (epoch numbers), iso (date/time text; no zone: UTC), "
                        "or a strftime format such as '%%Y-%%m-%%d %%H:%%M'; auto: numbers "
                        "are epoch numbers in the unit their size says, text is read as iso "
                        f"(default: {d.time_format})")
    p.add_argument("--user", default=None, metavar="COL",
                   help="the user id column (default: none, user_id is empty)")
    p.add_argument("--item", default=None, metavar="COL",
                   help="the item id column (default: none, item_id is empty)")
    p.add_argument("--categorical", action="append", default=None, metavar="COLS",
                   help="comma-separated categorical columns: a slot of their values "
                        "(default: the columns not named elsewhere whose values are not "
                        "numbers)")
    p.add_argument("--numeric", action="append", default=None, metavar="COLS",
                   help="comma-separated numeric columns: a slot of quantile buckets and a "
                        "dense input (default: the columns not named elsewhere whose values "
                        "are numbers, in 99%% of their non-empty cells at least)")
    p.add_argument("--ignore", action="append", default=None, metavar="COLS",
                   help="comma-separated columns to leave out (default: none)")
    p.add_argument("--na_values", default=None, metavar="VALUES",
                   help="comma-separated extra CSV cell values that mean empty, e.g. '?' "
                        "(default: none beyond pandas' own: '', NA, NaN, null, ...)")
    p.add_argument("--format", default="auto", choices=("auto", "csv", "parquet"),
                   help="the input's format (default: auto, by the file's suffix)")
    p.add_argument("--sep", default=",", help="CSV field separator (default: ',', a "
                                              ".tsv file: tab)")
    p.add_argument("--row_interval_s", type=float, default=d.row_interval_s, metavar="S",
                   help="without --time: event-time seconds between consecutive rows "
                        f"(default: {d.row_interval_s})")
    p.add_argument("--start", default=d.start, metavar="DAY",
                   help=f"without --time: UTC day YYYY-MM-DD of the first row "
                        f"(default: {d.start})")
    p.add_argument("--max_click_delay_s", type=int, default=d.max_click_delay_s, metavar="S",
                   help="a positive row's action comes 1 to this many seconds after its "
                        f"request; keep it below the join's --join_window_s "
                        f"({JOIN_WINDOW_S:g}) (default: {d.max_click_delay_s})")
    p.add_argument("--action", default=d.action, metavar="NAME",
                   help="the action a positive row logs; the join counts click, like and "
                        f"share as positive (default: {d.action})")
    p.add_argument("--buckets", type=int, default=d.buckets, metavar="N",
                   help="quantile buckets of a numeric column's slot in the generated config "
                        f"(default: {d.buckets})")
    p.add_argument("--dim", type=int, default=d.dim, metavar="N",
                   help=f"embedding width of every slot in the generated config "
                        f"(default: {d.dim})")
    p.add_argument("--file_hours", type=int, default=d.file_hours, metavar="H",
                   help=f"hours of event time per Avro file (default: {d.file_hours})")
    p.add_argument("--seed", type=int, default=d.seed, metavar="N",
                   help=f"seed of the click delays (default: {d.seed})")


def run(args: dict) -> int:
    """The ``table`` subcommand: prints the summary as one line of strict JSON.

    Args:
        args: the parsed flags (``vars(parser.parse_args())``).

    Returns:
        The exit status.
    """
    try:
        spec = TableSpec(
            label=args["label"], positive=_split(args["positive"]), time=args["time"],
            time_format=args["time_format"], user=args["user"], item=args["item"],
            categorical=_split(args["categorical"]), numeric=_split(args["numeric"]),
            ignore=_split(args["ignore"]), row_interval_s=args["row_interval_s"],
            start=args["start"], max_click_delay_s=args["max_click_delay_s"],
            action=args["action"], buckets=args["buckets"], dim=args["dim"],
            file_hours=args["file_hours"], seed=args["seed"])
        df = read_table(args["input"], args["format"], args["sep"], _split(args["na_values"]))
        summary = write_table(convert_table(df, spec), args["out_dir"], str(args["input"]))
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(strict_json.dumps(summary, sort_keys=True))
    out = args["out_dir"]
    if spec.max_click_delay_s >= JOIN_WINDOW_S:
        print(f"warning: clicks up to {spec.max_click_delay_s} s after their request: give "
              f"the join a --join_window_s above that (default {JOIN_WINDOW_S:g}), "
              "or they are late", file=sys.stderr)
    if summary["requests"] == 0:
        print(f"error: no row could be read (reasons: {summary['dead_letter_reasons']}); "
              f"see {summary['dead_letter_file']}", file=sys.stderr)
        return 1
    if summary["dead_letters"]:
        print(f"{summary['dead_letters']} of {summary['rows']} rows are dead letters "
              f"({summary['dead_letter_reasons']}): {summary['dead_letter_file']}",
              file=sys.stderr)
    print(f"wrote {out}/feature_log, {out}/action_log, {out}/{CONFIG_NAME}; next:\n"
          f"  python -m dataflow join --features '{out}/feature_log/*.avro' --actions "
          f"'{out}/action_log/*.avro' --config {out}/{CONFIG_NAME} --out {out}/joined\n"
          f"  python -m dataflow.train backfill --input '{out}/joined/examples/*.avro' "
          f"--config {out}/{CONFIG_NAME} --metrics_dir {out}/train", file=sys.stderr)
    return 0
