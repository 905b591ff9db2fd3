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
    """Writes records, already sorted by event time, one Avro file per ``file_hours``.

    Args:
        directory: the folder (made if missing).
        schema_name: the records' schema in ``schemas/``.
        ts_ms: int64 [n]: each row's event time, sorted.
        make_records: ``make_records(lo, hi)`` returns the dicts of rows ``[lo, hi)``; it is
            called once per file, so only one file's records are ever in memory.
        file_hours: hours of event time per file.
        codec: the Avro codec.

    Returns:
        The paths written (``part-YYYYmmdd-HH.avro``).

    >>> import tempfile
    >>> ts = np.array([0, 1_000, 3_600_000])
    >>> paths = write_logs(tempfile.mkdtemp(), "action_log", ts, lambda lo, hi: [
    ...     {"request_id": f"r{k}", "ts_ms": int(ts[k]), "action": "click"}
    ...     for k in range(lo, hi)])
    >>> [os.path.basename(p) for p in paths]
    ['part-19700101-00.avro', 'part-19700101-01.avro']
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
    """Writes actions as ActionLog files in ``out_dir/action_log``, in time order.

    Args:
        out_dir: the data set's folder.
        request_ids: the requests' ids, by row.
        ts_ms: int64 [k]: each action's event time.
        actions: each action's name.
        rows: each action's request (its row in ``request_ids``).
        file_hours: hours of event time per file.

    Returns:
        The paths written (:func:`write_logs`).
    """
    order = np.lexsort((rows, ts_ms))  # time order; ties in request order
    ts_ms, actions, rows = ts_ms[order], actions[order], rows[order]
    ts_list, action_list, row_list = ts_ms.tolist(), actions.tolist(), rows.tolist()

    def records(lo, hi):
        return [{"request_id": request_ids[r], "ts_ms": t, "action": a}
                for r, t, a in zip(row_list[lo:hi], ts_list[lo:hi], action_list[lo:hi])]

    return write_logs(out_dir / "action_log", "action_log", ts_ms, records, file_hours)
