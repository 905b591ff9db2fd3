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
    """The parsed schema ``schemas/<name>.avsc`` (fastavro's parsed form, cached)."""
    path = SCHEMA_DIR / f"{name}.avsc"
    if not path.is_file():
        known = sorted(p.stem for p in SCHEMA_DIR.glob("*.avsc"))
        raise ValueError(f"unknown schema {name!r}; known: {known}")
    return fastavro.parse_schema(json.loads(path.read_text(encoding="utf-8")))


def write_avro(path: str, schema_name: str, records, codec: str = "deflate") -> int:
    """Write ``records`` (dicts) to one Avro file; returns how many were written."""
    records = list(records)
    with open(path, "wb") as f:
        fastavro.writer(f, load_schema(schema_name), records, codec=codec)
    return len(records)


def read_avro(path: str) -> list[dict]:
    """All records of one Avro file."""
    with open(path, "rb") as f:
        return list(fastavro.reader(f))
