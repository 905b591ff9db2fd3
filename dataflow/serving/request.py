"""A scoring request (``POST /score``, see ``dataflow.serve``): validated and parsed into the
feature log's records (:class:`RequestParser`), and its candidates' fids and dense inputs
extracted with the pipeline's own code (:class:`RequestExtractor`). What cannot be scored
raises :class:`BadRequest` with a reason code.
"""
from __future__ import annotations

import math
import threading
import time
import uuid
from typing import NamedTuple, Optional

import numpy as np

__all__ = ["BadRequest", "ParsedRequest", "RequestParser", "RequestExtractor"]


class BadRequest(ValueError):
    """A request serving cannot score (``dataflow.serve`` answers 400 with both).

    Args:
        reason: a short machine-readable code.
        detail: what is wrong, for a person.

    >>> try:
    ...     RequestParser().parse({"user_id": "u1", "candidates": []})
    ... except BadRequest as e:
    ...     print(e.reason, "/", e.detail)
    no_candidates / candidates is empty
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _check_feature_values(where: str, features) -> dict:
    """Feature maps must hold what the feature log's Avro map holds: null, string, long,
    double or a list of strings (anything else could not be logged)."""
    if features is None:
        return {}
    if not isinstance(features, dict):
        raise BadRequest(f"wrong_type:{where}", f"expected an object, got "
                                                f"{type(features).__name__}")
    for name, value in features.items():
        if value is None or type(value) in (str, int, float):
            if type(value) is float and not math.isfinite(value):
                raise BadRequest(f"not_finite:{where}.{name}", f"{value!r}")
            continue
        if type(value) is list and all(type(v) is str for v in value):
            continue
        raise BadRequest(f"wrong_type:{where}.{name}",
                         f"a feature is a string, a number, null or a list of strings, got "
                         f"{type(value).__name__} {value!r}"[:300])
    return features


class ParsedRequest(NamedTuple):
    """A request, parsed (:meth:`RequestParser.parse`).

    >>> parsed = RequestParser().parse({"user_id": "u1", "ts_ms": 5, "request_id": "r",
    ...                                 "top_k": 1, "candidates": [{"item_id": "i7"}]})
    >>> parsed.request_id, parsed.ts_ms, parsed.top_k, parsed.true_ctr
    ('r', 5, 1, [None])
    """
    records: list               # per candidate: its feature log record (context + features)
    true_ctr: list              # per candidate: its true CTR (a simulator's), or None
    top_k: Optional[int]        # how many to answer (None: all)
    request_id: str             # the request's, or one made up
    ts_ms: int                  # its event time (the wall clock if it gave none)
    context: dict               # the context's features
    item_fields: frozenset      # the feature names any candidate has


class RequestParser:
    """Validates requests and parses them into feature log records.

    A candidate's record is ``{"request_id": "<request_id>-<position>", "ts_ms", "user_id",
    "item_id", "features": context + the candidate's features}``. A request without a
    ``request_id`` gets one unique to this parser; without a ``ts_ms``, the wall clock.

    Args:
        max_candidates: the most candidates a request may have.

    >>> parser = RequestParser()
    >>> parsed = parser.parse({"user_id": "u1", "ts_ms": 5, "request_id": "r",
    ...                        "context": {"device": "ios"},
    ...                        "candidates": [{"item_id": "i7", "features": {"tags": ["a"]}}]})
    >>> parsed.records[0]["request_id"], parsed.records[0]["features"], parsed.item_fields
    ('r-0', {'device': 'ios', 'tags': ['a']}, frozenset({'tags'}))
    >>> try:
    ...     parser.parse({"user_id": "u1", "candidates": [{"item_id": "i7", "true_ctr": 2}]})
    ... except BadRequest as e:
    ...     print(e.reason)
    wrong_type:candidates[0].true_ctr
    """

    def __init__(self, max_candidates: int = 2000):
        self.max_candidates = max_candidates
        self._lock = threading.Lock()
        self._request_seq = 0
        self._prefix = uuid.uuid4().hex[:8]

    def parse(self, request) -> ParsedRequest:
        """A request (decoded JSON), parsed.

        Args:
            request: the request's JSON value.

        Returns:
            Its :class:`ParsedRequest`.

        Raises:
            BadRequest: a request that cannot be scored, with its reason.
        """
        if not isinstance(request, dict):
            raise BadRequest("not_an_object", f"the request must be a JSON object, got "
                                              f"{type(request).__name__}")
        user_id = request.get("user_id")
        if type(user_id) is int:
            user_id = str(user_id)
        if type(user_id) is not str or not user_id:
            raise BadRequest("missing_field:user_id" if user_id is None
                             else "wrong_type:user_id", "user_id must be a non-empty string")
        ts_ms = request.get("ts_ms")
        if ts_ms is not None and (type(ts_ms) is not int or ts_ms < 0):
            raise BadRequest("wrong_type:ts_ms", "ts_ms must be a non-negative integer (ms "
                                                 "since the epoch)")
        context = _check_feature_values("context", request.get("context"))
        candidates = request.get("candidates")
        if not isinstance(candidates, list):
            raise BadRequest("missing_field:candidates" if candidates is None
                             else "wrong_type:candidates", "candidates must be a list")
        if not candidates:
            raise BadRequest("no_candidates", "candidates is empty")
        if len(candidates) > self.max_candidates:
            raise BadRequest("too_many_candidates", f"{len(candidates)} > "
                                                    f"{self.max_candidates}")
        top_k = request.get("top_k")
        if top_k is not None and (type(top_k) is not int or top_k < 1):
            raise BadRequest("wrong_type:top_k", "top_k must be a positive integer")
        request_id = request.get("request_id")
        if request_id is not None and (type(request_id) is not str or not request_id):
            raise BadRequest("wrong_type:request_id", "request_id must be a non-empty string")
        if ts_ms is None:
            ts_ms = int(time.time() * 1000)
        if request_id is None:
            with self._lock:
                self._request_seq += 1
                request_id = f"{self._prefix}-{self._request_seq}"
        records, true_ctr, item_fields = [], [], set()
        for j, candidate in enumerate(candidates):
            if not isinstance(candidate, dict):
                raise BadRequest(f"wrong_type:candidates[{j}]", "a candidate is an object")
            item_id = candidate.get("item_id")
            if type(item_id) is int:
                item_id = str(item_id)
            if type(item_id) is not str or not item_id:
                raise BadRequest(f"missing_field:candidates[{j}].item_id",
                                 "every candidate needs an item_id string")
            features = _check_feature_values(f"candidates[{j}].features",
                                             candidate.get("features"))
            ctr = candidate.get("true_ctr")
            if ctr is not None and (type(ctr) not in (int, float) or not 0 <= ctr <= 1):
                raise BadRequest(f"wrong_type:candidates[{j}].true_ctr",
                                 "true_ctr must be a probability")
            merged = dict(context)
            if features:
                merged.update(features)
                item_fields.update(features)
            records.append({"request_id": f"{request_id}-{j}", "ts_ms": ts_ms,
                            "user_id": user_id, "item_id": item_id, "features": merged})
            true_ctr.append(None if ctr is None else float(ctr))
        return ParsedRequest(records, true_ctr, top_k, request_id, ts_ms, context,
                             frozenset(item_fields))


class RequestExtractor:
    """A request's fids and dense inputs, with the pipeline's own extraction
    (``transforms.features.extract``), the context's part once per request.

    The pipeline extracts each served item's record (context + item fields) on its own.
    The slots and dense inputs that read no field any candidate has (nor ``item_id``) come
    out the same for every candidate: here they are extracted once from the context, the
    others per candidate from the merged record, each with a sub-config of the feature
    config (cached per set of candidate field names). The fids of a candidate are the same
    as the pipeline's, context slots first (``Model.index`` orders them by slot).

    Args:
        config: the feature config (``schemas.feature_config.FeatureConfig``).

    >>> from schemas.feature_config import FeatureConfig
    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "user", "slot": 1, "source": "user_id"},
    ...     {"name": "item", "slot": 2, "source": "item_id"}],
    ...     "dense": [{"name": "age", "source": "age", "default": 0}]})
    >>> parsed = RequestParser().parse({"user_id": "u1", "ts_ms": 5, "context": {"age": 31},
    ...                                 "candidates": [{"item_id": "i7"}, {"item_id": "i8"}]})
    >>> fids, row_splits, dense = RequestExtractor(config)(
    ...     parsed.records, parsed.context, parsed.item_fields)
    >>> (fids >> 48).tolist(), row_splits.tolist(), dense.tolist()   # the user's slot once
    ([1, 2, 1, 2], [0, 2, 4], [[31.0], [31.0]])
    """

    def __init__(self, config):
        self.config = config
        self._splits: dict = {}

    def _split(self, item_fields: frozenset):
        split = self._splits.get(item_fields)
        if split is None:
            from schemas.feature_config import FeatureConfig
            config = self.config
            per_item = item_fields | {"item_id"}
            item_slot = [bool(per_item.intersection(s.fields)) for s in config.slots]
            item_dense = [d.source in per_item for d in config.dense]

            def sub(keep_slot, keep_dense):
                return FeatureConfig(
                    slots=tuple(s for s, k in zip(config.slots, item_slot) if k == keep_slot),
                    dense=tuple(d for d, k in zip(config.dense, item_dense) if k == keep_dense),
                    max_list_length=config.max_list_length)
            split = (sub(False, False), sub(True, True),
                     np.flatnonzero(~np.array(item_dense, bool)),
                     np.flatnonzero(np.array(item_dense, bool)))
            if len(self._splits) > 256:
                self._splits.clear()
            self._splits[item_fields] = split
        return split

    def __call__(self, records: list, context: dict, item_fields: frozenset):
        """The fids and dense inputs of one request's records.

        Args:
            records: its records (:attr:`ParsedRequest.records`: the same user_id, ts_ms
                and context).
            context: its context's features.
            item_fields: the feature names any candidate has.

        Returns:
            ``(uint64 fids, int64 row_splits [n+1], float32 dense [n, d])``.

        Raises:
            BadRequest: a record extraction rejects, with the pipeline's reason.
        """
        from transforms.features import ExtractError, extract
        n = len(records)
        dense = np.empty((n, len(self.config.dense)), np.float32)
        if self.config.needs_analysis:  # extract raises the pipeline's error for it
            context_config, item_config = None, self.config
            context_dense, item_dense = np.empty(0, np.int64), np.arange(dense.shape[1])
        else:
            context_config, item_config, context_dense, item_dense = \
                self._split(item_fields)
        context_fids: list = []
        if context_config is not None and (context_config.slots or context_config.dense):
            first = records[0]
            try:
                out = extract({"request_id": first["request_id"], "ts_ms": first["ts_ms"],
                               "user_id": first["user_id"], "item_id": first["item_id"],
                               "features": context}, context_config)
            except ExtractError as e:
                raise BadRequest(e.reason, f"context: {e.detail}") from None
            context_fids = out["fids"]
            dense[:, context_dense] = out["dense"]
        fids: list = []
        lengths = np.empty(n, np.int64)
        item_dense_values = np.empty((n, len(item_dense)), np.float32)
        for j, record in enumerate(records):
            try:
                out = extract(record, item_config)
            except ExtractError as e:
                raise BadRequest(e.reason, f"candidate {j}: {e.detail}") from None
            fids.extend(context_fids)
            fids.extend(out["fids"])
            lengths[j] = len(context_fids) + len(out["fids"])
            item_dense_values[j] = out["dense"]
        dense[:, item_dense] = item_dense_values
        row_splits = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=row_splits[1:])
        return np.array(fids, dtype=np.uint64), row_splits, dense


