"""Avro schemas (``*.avsc`` beside this file), read with fastavro.

>>> schema = load_schema("smoke_event")
>>> schema["name"]
'beam_monolith.smoke.SmokeEvent'
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import fastavro

SCHEMA_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def load_schema(name: str) -> dict:
    """An Avro schema of this package.

    Args:
        name: the schema's file name without ``.avsc`` (``"feature_log"``, ...).

    Returns:
        ``schemas/<name>.avsc`` in fastavro's parsed form (cached).

    Raises:
        ValueError: there is no such schema; the message lists the known ones.
    """
    path = SCHEMA_DIR / f"{name}.avsc"
    if not path.is_file():
        known = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))
        raise ValueError(f"unknown schema {name!r}; known: {known}")
    return fastavro.parse_schema(json.loads(path.read_text(encoding="utf-8")))


def write_avro(path: str, schema_name: str, records, codec: str = "deflate") -> int:
    """Writes records to one Avro file.

    Args:
        path: the file (local).
        schema_name: their schema (:func:`load_schema`).
        records: dicts.
        codec: the Avro codec.

    Returns:
        How many records were written.

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "actions.avro")
    >>> write_avro(path, "action_log", [{"request_id": "r1", "ts_ms": 5, "action": "click"}])
    1
    >>> read_avro(path)
    [{'request_id': 'r1', 'ts_ms': 5, 'action': 'click'}]
    """
    records = list(records)
    with open(path, "wb") as f:
        fastavro.writer(f, load_schema(schema_name), records, codec=codec)
    return len(records)


def read_avro(path: str) -> list[dict]:
    """Reads one Avro file (example: :func:`write_avro`).

    Args:
        path: the file (local).

    Returns:
        All its records.
    """
    with open(path, "rb") as f:
        return list(fastavro.reader(f))
