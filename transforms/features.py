"""Feature extraction: FeatureLog records → fids and dense values, bad records dead-lettered.

:func:`extract` is the plain function (serving calls it on the request it scores, so
training and serving make the same fids); :class:`ExtractFeatures` is the PTransform that
runs it on a PCollection and routes what it cannot parse to a ``dead_letter`` output.

A config with analysers (quantile buckets, z-scores: ``transforms/preprocess.py``) needs the
transform output that ``python -m dataflow.analyze`` wrote; :class:`Preprocessor` is then the
one entry point, for a batch of records, that the pipelines and serving share::

    pre = Preprocessor.load("out/transform")     # its config and transform
    results = pre(records)                       # per record: output dict or ExtractError
    features, dead = logs | ExtractFeatures("out/transform")   # the same, in Beam

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
import functools
import itertools
import math
import os
from typing import Any, Mapping

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from apache_beam.utils.windowed_value import WindowedValue

from schemas.feature_config import CONFIG_FILE, FeatureConfig, FeatureConfigError, SlotSpec
from schemas.fid import HASH_BITS, hash_text, hash48
from transforms.fitted_transform import FittedTransform

__all__ = ["extract", "ExtractError", "ExtractFeatures", "FeatureExtractor", "Preprocessor",
           "TransformRequiredError", "DEAD_LETTER", "OUTPUT_KEYS"]

DEAD_LETTER = "dead_letter"
OUTPUT_KEYS = ("request_id", "ts_ms", "user_id", "item_id", "fids", "dense", "served_score",
               "true_ctr")
CROSS_SEPARATOR = "\x1f"  # ASCII unit separator: no field value of ours contains it
_MAX_REPR = 2000
_FLOAT32_MAX = float(np.finfo(np.float32).max)
PLACEHOLDER_FID = -1  # where an analysed slot's fid goes until its bucket is known


class TransformRequiredError(FeatureConfigError):
    """A config with analysers used without the transform output they need.

    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "age", "slot": 3, "source": "age", "bucketize": {"quantiles": 4}}]})
    >>> Preprocessor(config)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    transforms.features.TransformRequiredError: the config analyses ['age'] (quantile buckets ...
    """


def _needs_transform(config: FeatureConfig) -> TransformRequiredError:
    names = [s.name for s in config.slots if s.analysed] + \
        [d.name for d in config.dense if d.analysed]
    return TransformRequiredError("", f"the config analyses {names} (quantile buckets or "
                                      "z-scores): give the transform output of python -m "
                                      "dataflow.analyze (Preprocessor.load(DIR), "
                                      "ExtractFeatures(DIR) or --config DIR)")


class ExtractError(ValueError):
    """A record :func:`extract` cannot use.

    Args:
        reason: a short machine-readable code (a dead letter's ``reason``, module docstring).
        detail: what is wrong, for a person.

    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "user", "slot": 1, "source": "user_id"}]})
    >>> try:
    ...     extract({"request_id": "r1", "ts_ms": "noon", "user_id": "u1"}, config)
    ... except ExtractError as e:
    ...     print(e.reason)
    wrong_type:ts_ms
    """

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


def _bucket_text(boundaries: list, field: str, value) -> str:
    """A bucketized value's text in a cross: its bucket's index."""
    return str(bisect.bisect_right(boundaries, _finite(field, value)))


class _Slot:
    """A slot compiled for the per-record loop."""
    __slots__ = ("name", "high", "fields", "field", "plain", "is_cross", "boundaries",
                 "bucket_fids", "optional", "analysed", "analysed_k", "cross_texts")

    def __init__(self, spec: SlotSpec):
        self.name = spec.name
        self.high = spec.slot << HASH_BITS
        self.fields = spec.fields
        self.field = spec.fields[0]
        self.is_cross = spec.is_cross
        self.analysed = spec.analysed  # bucketized by the transform's quantiles
        self.analysed_k = None         # its index among the analysed slots
        self.plain = not spec.is_cross and spec.boundaries is None and not spec.analysed
        self.optional = spec.optional
        self.boundaries = list(spec.boundaries) if spec.boundaries is not None else None
        # Bucket indices are few: their fids are computed once, not per record.
        self.bucket_fids = None if self.boundaries is None else [
            self.high | hash48(i) for i in range(len(self.boundaries) + 1)]
        # A cross's fields with the function giving each value's text (a bucket's index for
        # a bucketized field), chosen once here rather than per record.
        bucketized = dict(spec.cross_boundaries)
        self.cross_texts = [
            (f, functools.partial(_bucket_text, list(bucketized[f])) if f in bucketized
             else _text) for f in spec.fields]


class FeatureExtractor:
    """``extractor(record) -> dict`` for one config, compiled once (see :func:`extract`).

    A config with analysers cannot be extracted record by record without its transform
    (:class:`Preprocessor` applies it); :meth:`parse` gives what is known before it.

    Args:
        config: the :class:`FeatureConfig`.

    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "user", "slot": 1, "source": "user_id"},
    ...     {"name": "age", "slot": 3, "source": "age", "bucketize": {"quantiles": 4}}]})
    >>> out, pending = FeatureExtractor(config).parse({"request_id": "r1", "ts_ms": 5,
    ...     "user_id": "u1", "item_id": "i1", "features": {"age": 41}})
    >>> [fid >> 48 for fid in out["fids"]], pending   # age's bucket: not known yet
    ([1, -1], [(0, 1, 41.0)])
    """

    def __init__(self, config: FeatureConfig):
        self.config = config
        self.slots = [_Slot(s) for s in config.slots]
        self.dense = [(d.source, d.default, d.transform == "log1p") for d in config.dense]
        self.max_list = config.max_list_length
        self.analysed_slots = [s for s in self.slots if s.analysed]
        for k, slot in enumerate(self.analysed_slots):
            slot.analysed_k = k
        self.normalized = [j for j, d in enumerate(config.dense) if d.analysed]
        self.needs_transform = config.needs_analysis

    def __call__(self, record: Any) -> dict:
        if self.needs_transform:
            raise _needs_transform(self.config)
        return self._parse(record, None)

    def parse(self, record: Any) -> tuple[dict, list | None]:
        """One record's output before the transform.

        Args:
            record: a FeatureLog dict.

        Returns:
            ``(output, pending)``: the output dict of :func:`extract`, where an analysed
            slot's fid is ``PLACEHOLDER_FID`` and ``pending`` holds ``(k, position in fids,
            value)`` for it (``k``: its index among the analysed slots); normalised dense
            values are raw (after the config's ``transform``). ``pending`` is None for
            configs without analysers.

        Raises:
            ExtractError: the record cannot be used.
        """
        pending = [] if self.needs_transform else None
        out = self._parse(record, pending)
        if self.normalized:
            dense = out["dense"]
            for j in self.normalized:
                if abs(dense[j]) > _FLOAT32_MAX:
                    source = self.config.dense[j].source
                    raise ExtractError(f"not_finite:{source}", f"{dense[j]!r} overflows "
                                       "float32, the transform's input type")
        return out, pending

    def _parse(self, record: Any, pending: list | None) -> dict:
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
                    append(slot.high | hash_text(value))
                    continue
                self._single(slot, value, fids)
            elif slot.is_cross:
                self._cross(slot, fields, fids)
            elif slot.analysed:
                self._analysed(slot, fields.get(slot.field), fids, pending)
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

    @staticmethod
    def _present(slot: _Slot, value) -> bool:
        """False for a missing optional field; a missing required one is an ExtractError."""
        if value is not None:
            return True
        if slot.optional:
            return False
        raise ExtractError(f"missing_field:{slot.field}",
                           f"slot {slot.name!r} needs field {slot.field!r}")

    def _single(self, slot: _Slot, value, fids: list) -> None:
        field = slot.field
        if not self._present(slot, value):
            return
        if slot.boundaries is not None:
            fids.append(slot.bucket_fids[
                bisect.bisect_right(slot.boundaries, _finite(field, value))])
        elif type(value) is list:
            if len(value) > self.max_list:
                raise ExtractError(f"oversized_list:{field}",
                                   f"{len(value)} values > max_list_length {self.max_list}")
            high = slot.high
            fids.extend([high | hash_text(v if type(v) is str else _text(field, v))
                         for v in value])
        else:
            fids.append(slot.high | hash_text(_text(field, value)))

    def _analysed(self, slot: _Slot, value, fids: list, pending: list) -> None:
        field = slot.field
        if not self._present(slot, value):
            return
        value = _finite(field, value)
        if abs(value) > _FLOAT32_MAX:
            raise ExtractError(f"not_finite:{field}",
                               f"{value!r} overflows float32, the transform's input type")
        pending.append((slot.analysed_k, len(fids), value))
        fids.append(PLACEHOLDER_FID)

    def _cross(self, slot: _Slot, fields, fids: list) -> None:
        parts = []
        for field, text in slot.cross_texts:
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
                parts.append([text(field, v) for v in value])
            else:
                parts.append((text(field, value),))
        combinations = math.prod(len(p) for p in parts)
        if combinations > self.max_list:
            raise ExtractError(f"oversized_cross:{slot.name}", f"{combinations} combinations "
                               f"> max_list_length {self.max_list}")
        high = slot.high
        fids.extend([high | hash_text(CROSS_SEPARATOR.join(combo))
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
    """One FeatureLog record → its output dict (module docstring).

    The config is compiled on first use and the compiled form kept for the next calls.

    Args:
        record: a FeatureLog dict (``schemas/feature_log.avsc``).
        config: the :class:`FeatureConfig`.

    Returns:
        The output dict.

    Raises:
        ExtractError: the record cannot be used (its ``reason`` says why).
        TransformRequiredError: the config has analysers: use :class:`Preprocessor`.
    """
    cached = _EXTRACTORS.get(id(config))
    if cached is None or cached.config is not config:
        if len(_EXTRACTORS) > 64:
            _EXTRACTORS.clear()
        cached = _EXTRACTORS[id(config)] = FeatureExtractor(config)
    return cached(record)


class Preprocessor:
    """A batch of FeatureLog records → their outputs, with the saved transform applied.

    The one entry point that extraction in the pipelines (:class:`ExtractFeatures`) and
    serving share, so both make the same fids and dense values. Each result is the output
    dict of :func:`extract` or the :class:`ExtractError` that rejects the record. The
    transform (``transforms.fitted_transform.FittedTransform``) is applied with NumPy, once per
    batch: an analysed slot's bucket becomes its fid (``slot << 48 | hash48(bucket)``, as a
    fixed ``bucketize``), a normalised dense value its z-score (float32).

    :meth:`load` takes the config and transform from a transform output directory.

    Args:
        config: the :class:`FeatureConfig`.
        transform: its ``FittedTransform``; required when the config has analysers, and
            must have been analysed for it.

    Raises:
        TransformRequiredError: the config has analysers and no ``transform`` was given.
        transforms.fitted_transform.TransformMismatchError: ``transform`` was analysed for
            another config.

    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "user", "slot": 1, "source": "user_id"}]})
    >>> good = {"request_id": "r1", "ts_ms": 5, "user_id": "u1", "item_id": "i1"}
    >>> [type(r).__name__ for r in Preprocessor(config)([good, {"ts_ms": 5}])]
    ['dict', 'ExtractError']
    """

    def __init__(self, config: FeatureConfig, transform=None):
        self.config = config
        self.extractor = FeatureExtractor(config)
        if transform is None and config.needs_analysis:
            raise _needs_transform(config)
        if transform is not None:
            transform.check(config)
        self.transform = transform
        # (slot name, fid of every bucket index) per analysed slot: few, computed once.
        self.buckets = [] if transform is None else [
            (slot.name, np.array([slot.high | hash48(i) for i in
                                  range(len(transform.boundaries[slot.name]) + 1)], np.int64))
            for slot in self.extractor.analysed_slots]
        self.normalized = [(j, config.dense[j].name, config.dense[j].source)
                           for j in self.extractor.normalized]

    @classmethod
    def load(cls, config_or_dir) -> "Preprocessor":
        """A preprocessor of a config, as ``--config`` takes them.

        Args:
            config_or_dir: the output directory of ``python -m dataflow.analyze --out DIR``
                (its config and transform), or a config without analysers (a YAML path or
                a config name).

        Returns:
            The :class:`Preprocessor`.

        Raises:
            TransformRequiredError: a config with analysers, not in a transform output.
        """
        config = FeatureConfig.load(config_or_dir)
        if not config.needs_analysis:
            return cls(config)
        if not os.path.isdir(config_or_dir):
            raise _needs_transform(config)
        return cls(config, FittedTransform.load(config_or_dir))

    def __call__(self, records) -> list:
        """Per record of ``records``, in order: its output dict, or the ExtractError."""
        extractor = self.extractor
        results: list = []
        append = results.append
        if not extractor.needs_transform:
            for record in records:
                try:
                    append(extractor(record))
                except ExtractError as e:
                    append(e)
            return results
        parse = extractor.parse
        ok: list = []                                   # (index in results, output)
        fid_lists, positions, slot_ks, values = [], [], [], []
        for record in records:
            try:
                out, pending = parse(record)
            except ExtractError as e:
                append(e)
                continue
            ok.append((len(results), out))
            append(out)
            fids = out["fids"]
            for k, position, value in pending:
                fid_lists.append(fids)
                positions.append(position)
                slot_ks.append(k)
                values.append(value)
        if values:
            self._bucketize(fid_lists, positions, np.array(slot_ks),
                            np.array(values, np.float32))
        if self.normalized and ok:
            self._normalize(ok, results)
        return results

    def _bucketize(self, fid_lists, positions, slot_ks, values) -> None:
        if len(self.buckets) == 1:
            name, bucket_fids = self.buckets[0]
            fids = bucket_fids[self.transform.bucketize(name, values)]
        else:
            fids = np.empty(len(values), np.int64)
            for k, (name, bucket_fids) in enumerate(self.buckets):
                mine = slot_ks == k
                fids[mine] = bucket_fids[self.transform.bucketize(name, values[mine])]
        for fid_list, position, fid in zip(fid_lists, positions, fids.tolist()):
            fid_list[position] = fid

    def _normalize(self, ok, results) -> None:
        dense = np.array([out["dense"] for _, out in ok], np.float64)
        for j, name, source in self.normalized:
            z = self.transform.normalize(name, dense[:, j].astype(np.float32))
            finite = np.isfinite(z)
            for (_, out), value in zip(ok, z.tolist()):
                out["dense"][j] = value
            if not finite.all():  # only with a variance so small that z overflows float32
                for i in np.flatnonzero(~finite).tolist():
                    index = ok[i][0]
                    results[index] = ExtractError(
                        f"not_finite:{source}", f"the z-score of {dense[i, j]!r} by dense "
                        f"input {name!r}'s mean and variance overflows float32")


def dead_letter(record: Any, reason: str, detail: str) -> dict:
    if not isinstance(record, dict):
        record = repr(record)[:_MAX_REPR]
    return {"record": record, "reason": reason, "detail": detail}


class ExtractFeaturesFn(beam.DoFn):
    """Runs :class:`FeatureExtractor`; what it rejects goes to ``dead_letter`` with a counter
    (used by :class:`ExtractFeatures` for a config without analysers).

    Args:
        config: the :class:`FeatureConfig` (without analysers).

    >>> fn = ExtractFeaturesFn(FeatureConfig.from_dict({"slots": [
    ...     {"name": "user", "slot": 1, "source": "user_id"}]}))
    >>> fn.setup()
    >>> [out["user_id"] for out in fn.process(
    ...     {"request_id": "r1", "ts_ms": 5, "user_id": "u1", "item_id": "i1"})]
    ['u1']
    >>> [(out.tag, out.value["reason"]) for out in fn.process({"ts_ms": 5})]
    [('dead_letter', 'missing_field:request_id')]
    """

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


class ExtractBatchesFn(ExtractFeaturesFn):
    """Runs :class:`Preprocessor` on batches of ``batch_size`` records of a bundle (the rest
    at the bundle's end); each output keeps its record's timestamp and window (used by
    :class:`ExtractFeatures` for a config with analysers).

    Args:
        config: the :class:`FeatureConfig`.
        transform: its ``FittedTransform`` (None for a config without analysers).
        batch_size: records per :class:`Preprocessor` call.

    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> from transforms.fitted_transform import FittedTransform, analysed_spec
    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "age", "slot": 3, "source": "age", "bucketize": {"quantiles": 4}}]})
    >>> fitted = FittedTransform({"age": np.array([18, 30, 45], np.float32)}, {}, {},
    ...                          summary=analysed_spec(config))
    >>> with beam.Pipeline() as p:   # 41 is in bucket 2: [30, 45)
    ...     out = (p | beam.Create([{"request_id": "r1", "ts_ms": 5, "user_id": "u1",
    ...                              "item_id": "i1", "features": {"age": 41}}])
    ...            | beam.ParDo(ExtractBatchesFn(config, fitted, batch_size=256)))
    ...     _ = assert_that(out | beam.Map(lambda f: f["fids"] == [3 << 48 | hash48(2)]),
    ...                     equal_to([True]))
    """

    def __init__(self, config: FeatureConfig, transform, batch_size: int):
        super().__init__(config)
        self.transform = transform
        self.batch_size = batch_size
        self.buffer: list = []

    def setup(self):
        super().setup()
        self.preprocessor = Preprocessor(self.config, self.transform)

    def start_bundle(self):
        self.buffer = []

    def process(self, record, timestamp=beam.DoFn.TimestampParam,
                window=beam.DoFn.WindowParam):
        self.buffer.append((record, timestamp, window))
        if len(self.buffer) >= self.batch_size:
            yield from self._flush()

    def finish_bundle(self):
        yield from self._flush()

    def _flush(self):
        batch, self.buffer = self.buffer, []
        if not batch:
            return
        try:
            results = self.preprocessor([record for record, _, _ in batch])
        except Exception:  # noqa: BLE001 - find the record that broke it, keep the others
            results = [self._one(record) for record, _, _ in batch]
        for (record, timestamp, window), out in zip(batch, results):
            if isinstance(out, ExtractError):
                reason, detail = out.reason, out.detail
            elif isinstance(out, Exception):
                reason, detail = f"unexpected_error:{type(out).__name__}", str(out)
            else:
                self.extracted.inc()
                yield WindowedValue(out, timestamp, (window,))
                continue
            self._count(reason)
            yield beam.pvalue.TaggedOutput(DEAD_LETTER, WindowedValue(
                dead_letter(record, reason, detail), timestamp, (window,)))

    def _one(self, record):
        try:
            return self.preprocessor([record])[0]
        except Exception as e:  # noqa: BLE001
            return e


class ExtractFeatures(beam.PTransform):
    """FeatureLog dicts → feature dicts (main output ``features``) and ``dead_letter`` dicts.

    ``logs | ExtractFeatures("synthetic")`` for a config without analysers,
    ``logs | ExtractFeatures("out/transform")`` for one analysed by ``python -m
    dataflow.analyze``.

    Args:
        config: a :class:`FeatureConfig`, a YAML path, a config name (``"movielens"``), or
            a transform output directory of ``python -m dataflow.analyze`` (its config and
            transform).
        transform: for a config with analysers, a ``FittedTransform`` or the directory to
            load it from; :class:`Preprocessor` then applies it to ``batch_size`` records at
            a time.
        batch_size: records per :class:`Preprocessor` call (with a transform).

    Returns:
        (``expand``) a ``DoOutputsTuple``: ``features, dead = logs | ExtractFeatures(...)``,
        or ``out.features`` and ``out.dead_letter``.

    Raises:
        TransformRequiredError: the config has analysers and there is no transform.

    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "user", "slot": 1, "source": "user_id"}]})
    >>> with beam.Pipeline() as p:
    ...     features, dead = (p | beam.Create([{"request_id": "r1", "ts_ms": 5,
    ...                                         "user_id": "u1", "item_id": "i1"}, "oops"])
    ...                       | ExtractFeatures(config))
    ...     _ = assert_that(features | beam.Map(lambda f: f["request_id"]), equal_to(["r1"]),
    ...                     label="Features")
    ...     _ = assert_that(dead | beam.Map(lambda d: d["reason"]), equal_to(["not_a_record"]),
    ...                     label="DeadLetters")
    """

    def __init__(self, config: FeatureConfig | str, transform=None, batch_size: int = 256):
        super().__init__()
        directory = None
        if not isinstance(config, FeatureConfig):
            if os.path.isdir(config) and os.path.isfile(os.path.join(config, CONFIG_FILE)):
                directory = config
            config = FeatureConfig.load(config)
        if transform is None and directory is not None and config.needs_analysis:
            transform = directory
        if isinstance(transform, (str, os.PathLike)):
            transform = FittedTransform.load(transform)
        self.config = config
        self.transform = transform
        self.batch_size = batch_size
        Preprocessor(config, transform)  # refuse a missing or mismatched transform now

    def expand(self, records):
        if self.transform is None:
            fn = ExtractFeaturesFn(self.config)
        else:
            fn = ExtractBatchesFn(self.config, self.transform, self.batch_size)
        return records | "Extract" >> beam.ParDo(fn).with_outputs(DEAD_LETTER, main="features")
