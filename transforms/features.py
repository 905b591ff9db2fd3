"""Feature extraction: FeatureLog records → fids and dense values, bad records dead-lettered.

:func:`extract` is the plain function (serving calls it on the request it scores, so
training and serving make the same fids); :class:`ExtractFeatures` is the PTransform that
runs it on a PCollection and routes what it cannot parse to a ``dead_letter`` output.

>>> from schemas.feature_config import FeatureConfig
>>> config = FeatureConfig.from_dict({"slots": [
...     {"name": "user", "slot": 1, "source": "user_id"},
...     {"name": "genres", "slot": 2, "source": "genres"}],
...     "dense": [{"name": "age", "source": "age", "default": 30}]})
>>> out = extract({"request_id": "r1", "ts_ms": 5, "user_id": "u1", "item_id": "i1",
...                "features": {"genres": ["Drama", "War"]}}, config)
>>> [fid >> 48 for fid in out["fids"]], out["dense"]
([1, 2, 2], [30.0])
>>> extract({"request_id": "r1", "ts_ms": 5, "user_id": "u1"}, config)
Traceback (most recent call last):
...
transforms.features.ExtractError: missing_field:item_id: the record has no 'item_id'

Output records (the Example schema's fields before joining)::

    {"request_id": str, "ts_ms": int, "user_id": str, "item_id": str,
     "fids": [int, ...],      # slot << 48 | hash48(value), in config order, list values in order
     "dense": [float, ...],   # in the config's dense order
     "served_score": float | None, "true_ctr": float | None}

Dead letters: ``{"record": the input (its repr if it is not a dict), "reason": code,
"detail": text}``. Reason codes, each also a Beam counter in namespace ``extract``:
``not_a_record``, ``missing_field:<field>``, ``wrong_type:<field>``,
``not_finite:<field>``, ``oversized_list:<field>``, ``oversized_cross:<slot name>`` and,
should extraction itself fail, ``unexpected_error:<exception type>``.
"""
from __future__ import annotations

import bisect
import itertools
import math
from typing import Any, Mapping

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from schemas.feature_config import FeatureConfig, SlotSpec
from schemas.fid import HASH_BITS, _hash_text, hash48

__all__ = ["extract", "ExtractError", "ExtractFeatures", "FeatureExtractor", "DEAD_LETTER",
           "OUTPUT_KEYS"]

DEAD_LETTER = "dead_letter"
OUTPUT_KEYS = ("request_id", "ts_ms", "user_id", "item_id", "fids", "dense", "served_score",
               "true_ctr")
CROSS_SEPARATOR = "\x1f"  # ASCII unit separator: no field value of ours contains it
_MAX_REPR = 2000


class ExtractError(ValueError):
    """A record :func:`extract` cannot use; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# Avro decoding gives Python types; serving code may hand over NumPy scalars too.
_INTS = (int, np.integer)
_NUMBERS = (int, float, np.integer, np.floating)


def _is_number(v) -> bool:
    return type(v) is float or type(v) is int or \
        (isinstance(v, _NUMBERS) and not isinstance(v, (bool, np.bool_)))


def _finite(field: str, v) -> float:
    if not _is_number(v):
        raise ExtractError(f"wrong_type:{field}", f"expected a number, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ExtractError(f"not_finite:{field}", f"{v!r} is not a finite number")
    return v


def _text(field: str, v) -> str:
    """The canonical text of one categorical value (what schemas.fid would hash)."""
    if type(v) is str:
        return v
    if not _is_number(v):
        raise ExtractError(f"wrong_type:{field}",
                           f"expected a string or number, got {type(v).__name__} {v!r}")
    if isinstance(v, _INTS):
        return str(int(v))
    v = _finite(field, v)
    return str(int(v)) if v.is_integer() else repr(v)


class _Slot:
    """A slot compiled for the per-record loop."""
    __slots__ = ("name", "high", "fields", "field", "plain", "is_cross", "boundaries",
                 "bucket_fids", "optional")

    def __init__(self, spec: SlotSpec):
        self.name = spec.name
        self.high = spec.slot << HASH_BITS
        self.fields = spec.fields
        self.field = spec.fields[0]
        self.is_cross = spec.is_cross
        self.plain = not spec.is_cross and spec.boundaries is None
        self.optional = spec.optional
        self.boundaries = list(spec.boundaries) if spec.boundaries is not None else None
        # Bucket indices are few: their fids are computed once, not per record.
        self.bucket_fids = None if self.boundaries is None else [
            self.high | hash48(i) for i in range(len(self.boundaries) + 1)]


class FeatureExtractor:
    """``extractor(record) -> dict`` for one config, compiled once (see :func:`extract`)."""

    def __init__(self, config: FeatureConfig):
        self.config = config
        self.slots = [_Slot(s) for s in config.slots]
        self.dense = [(d.source, d.default, d.transform == "log1p") for d in config.dense]
        self.max_list = config.max_list_length

    def __call__(self, record: Any) -> dict:
        if type(record) is not dict and not isinstance(record, Mapping):
            raise ExtractError("not_a_record",
                               f"expected a FeatureLog dict, got {type(record).__name__}")
        request_id = record.get("request_id")
        if type(request_id) is not str:
            raise self._bad_top("request_id", request_id, "a string")
        ts_ms = record.get("ts_ms")
        if type(ts_ms) is not int:
            if not isinstance(ts_ms, _INTS) or isinstance(ts_ms, bool):
                raise self._bad_top("ts_ms", ts_ms, "an integer (ms since the epoch)")
            ts_ms = int(ts_ms)
        user_id = self._id(record, "user_id")
        item_id = self._id(record, "item_id")
        features = record.get("features")
        if features is None:
            features = {}
        elif type(features) is not dict and not isinstance(features, Mapping):
            raise ExtractError("wrong_type:features",
                               f"expected a map, got {type(features).__name__}")
        # One lookup table for every field: the features, then user_id / item_id over them.
        fields = dict(features)
        fields["user_id"] = user_id
        fields["item_id"] = item_id
        fids: list = []
        append = fids.append
        for slot in self.slots:
            if slot.plain:  # the common case inline: one field holding a string
                value = fields.get(slot.field)
                if type(value) is str:
                    append(slot.high | _hash_text(value))
                    continue
                self._single(slot, value, fids)
            elif slot.is_cross:
                self._cross(slot, fields, fids)
            else:
                self._single(slot, fields.get(slot.field), fids)
        dense = [self._dense(source, default, log1p, fields)
                 for source, default, log1p in self.dense]
        served_score = record.get("served_score")
        true_ctr = record.get("true_ctr")
        return {"request_id": request_id, "ts_ms": ts_ms, "user_id": user_id,
                "item_id": item_id, "fids": fids, "dense": dense,
                "served_score": None if served_score is None
                else _finite("served_score", served_score),
                "true_ctr": None if true_ctr is None else _finite("true_ctr", true_ctr)}

    @staticmethod
    def _bad_top(field, value, expected):
        if value is None:
            return ExtractError(f"missing_field:{field}", f"the record has no {field!r}")
        return ExtractError(f"wrong_type:{field}",
                            f"expected {expected}, got {type(value).__name__} {value!r}")

    def _id(self, record, field) -> str:
        value = record.get(field)
        if type(value) is str:
            return value
        if isinstance(value, _INTS) and not isinstance(value, bool):
            return str(int(value))  # serving may hand over numeric ids
        raise self._bad_top(field, value, "a string id")

    def _single(self, slot: _Slot, value, fids: list) -> None:
        field = slot.field
        if value is None:
            if slot.optional:
                return
            raise ExtractError(f"missing_field:{field}",
                               f"slot {slot.name!r} needs field {field!r}")
        if slot.boundaries is not None:
            fids.append(slot.bucket_fids[
                bisect.bisect_right(slot.boundaries, _finite(field, value))])
        elif type(value) is list:
            if len(value) > self.max_list:
                raise ExtractError(f"oversized_list:{field}",
                                   f"{len(value)} values > max_list_length {self.max_list}")
            high = slot.high
            fids.extend([high | _hash_text(v if type(v) is str else _text(field, v))
                         for v in value])
        else:
            fids.append(slot.high | _hash_text(_text(field, value)))

    def _cross(self, slot: _Slot, fields, fids: list) -> None:
        parts = []
        for field in slot.fields:
            value = fields.get(field)
            if value is None:
                if slot.optional:
                    return
                raise ExtractError(f"missing_field:{field}",
                                   f"cross slot {slot.name!r} needs field {field!r}")
            if type(value) is list:
                if len(value) > self.max_list:
                    raise ExtractError(f"oversized_list:{field}", f"{len(value)} values > "
                                       f"max_list_length {self.max_list}")
                parts.append([_text(field, v) for v in value])
            else:
                parts.append((_text(field, value),))
        combinations = math.prod(len(p) for p in parts)
        if combinations > self.max_list:
            raise ExtractError(f"oversized_cross:{slot.name}", f"{combinations} combinations "
                               f"> max_list_length {self.max_list}")
        high = slot.high
        fids.extend([high | _hash_text(CROSS_SEPARATOR.join(combo))
                     for combo in itertools.product(*parts)])

    @staticmethod
    def _dense(source, default, log1p, fields) -> float:
        value = fields.get(source)
        if value is None:
            if default is None:
                raise ExtractError(f"missing_field:{source}",
                                   f"dense input needs field {source!r} (it has no default)")
            value = default
        value = _finite(source, value)
        return math.copysign(math.log1p(abs(value)), value) if log1p else value


_EXTRACTORS: dict = {}


def extract(record: Any, config: FeatureConfig) -> dict:
    """One FeatureLog record → its output dict (module docstring); raises :class:`ExtractError`.

    The config is compiled on first use and the compiled form kept for the next calls.
    """
    cached = _EXTRACTORS.get(id(config))
    if cached is None or cached.config is not config:
        if len(_EXTRACTORS) > 64:
            _EXTRACTORS.clear()
        cached = _EXTRACTORS[id(config)] = FeatureExtractor(config)
    return cached(record)


def dead_letter(record: Any, reason: str, detail: str) -> dict:
    if not isinstance(record, dict):
        record = repr(record)[:_MAX_REPR]
    return {"record": record, "reason": reason, "detail": detail}


class ExtractFeaturesFn(beam.DoFn):
    """Runs :class:`FeatureExtractor`; what it rejects goes to ``dead_letter`` with a counter."""

    def __init__(self, config: FeatureConfig):
        self.config = config
        self.extractor = None
        self.counters: dict = {}

    def setup(self):
        self.extractor = FeatureExtractor(self.config)
        self.extracted = Metrics.counter("extract", "extracted")

    def _count(self, reason: str) -> None:
        counter = self.counters.get(reason)
        if counter is None:
            counter = self.counters[reason] = Metrics.counter("extract", reason)
        counter.inc()

    def process(self, record):
        try:
            out = self.extractor(record)
        except ExtractError as e:
            reason, detail = e.reason, e.detail
        except Exception as e:  # noqa: BLE001 - a bad record must never kill a stream
            reason, detail = f"unexpected_error:{type(e).__name__}", str(e)
        else:
            self.extracted.inc()
            yield out
            reason = None
        if reason is not None:
            self._count(reason)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(record, reason, detail))


class ExtractFeatures(beam.PTransform):
    """FeatureLog dicts → feature dicts (main output) and ``dead_letter`` dicts.

    ``config``: a :class:`FeatureConfig`, a YAML path or a config name ("movielens").

        features, dead = logs | ExtractFeatures("synthetic")
        # or: out = logs | ExtractFeatures(config); out.features, out.dead_letter
    """

    def __init__(self, config: FeatureConfig | str):
        super().__init__()
        self.config = config if isinstance(config, FeatureConfig) else FeatureConfig.load(config)

    def expand(self, records):
        return records | "Extract" >> beam.ParDo(ExtractFeaturesFn(self.config)).with_outputs(
            DEAD_LETTER, main="features")
