"""Feature and action logs as Avro files, one per hour of event time (``part-YYYYmmdd-HH.avro``),
the way serving and the simulator write them: the writers the data generators and
``dataflow.table`` share.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import fastavro
import numpy as np

from schemas import load_schema

__all__ = ["write_logs", "write_actions"]

HOUR_MS = 3_600_000


def _file_key(ts_ms: np.ndarray, file_hours: int) -> np.ndarray:
    return ts_ms // (file_hours * HOUR_MS)


def _file_name(key: int, file_hours: int) -> str:
    start = dt.datetime.fromtimestamp(key * file_hours * 3600, tz=dt.timezone.utc)
    return f"part-{start:%Y%m%d-%H}.avro"


def write_logs(directory: str | os.PathLike, schema_name: str, ts_ms: np.ndarray,
               make_records, file_hours: int = 1, codec: str = "deflate") -> list[str]:
    """Write records, already sorted by ``ts_ms``, one Avro file per ``file_hours`` of time.

    ``make_records(lo, hi)`` returns the dicts of rows ``[lo, hi)``; it is called once per
    file, so only one file's records are ever in memory. Returns the paths written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    schema = load_schema(schema_name)
    keys = _file_key(np.asarray(ts_ms), file_hours)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else []
    bounds = list(starts) + [len(keys)]
    paths = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        path = directory / _file_name(int(keys[lo]), file_hours)
        with open(path, "wb") as f:
            # A sync marker from the file name, not a random one: same input, same bytes.
            fastavro.writer(f, schema, make_records(int(lo), int(hi)), codec=codec,
                            sync_marker=hashlib.md5(path.name.encode()).digest())
        paths.append(str(path))
    return paths


def write_actions(out_dir: Path, request_ids: list, ts_ms: np.ndarray,
                   actions: np.ndarray, rows: np.ndarray, file_hours: int) -> list[str]:
    """ActionLog files: ``rows[k]`` is the request of action k, ``actions[k]`` its name."""
    order = np.lexsort((rows, ts_ms))  # time order; ties in request order
    ts_ms, actions, rows = ts_ms[order], actions[order], rows[order]
    ts_list, action_list, row_list = ts_ms.tolist(), actions.tolist(), rows.tolist()

    def records(lo, hi):
        return [{"request_id": request_ids[r], "ts_ms": t, "action": a}
                for r, t, a in zip(row_list[lo:hi], ts_list[lo:hi], action_list[lo:hi])]

    return write_logs(out_dir / "action_log", "action_log", ts_ms, records, file_hours)
