"""The online joiner: served feature records + user actions → labelled training examples.

Monolith joins the log of what serving scored (features) with the log of what users then
did (actions) in a stateful streaming job keyed by request id; this is that job as a Beam
``PTransform``::

    joined = (features, actions) | OnlineJoiner(join_window_s=900)
    joined.examples            # example dicts, schemas/example.avsc
    joined.unmatched_actions   # actions whose request never got a feature record
    joined.late_actions        # actions later than their request's join window
    joined.duplicate_actions   # the same action repeated on one request (counted once)
    joined.duplicate_features  # a second feature record for a request id
    joined.invalid             # records that fail validation, with the reason
    joined.closed              # ids of the requests whose example was decided

Input records carry event time in ``ts_ms`` (the joiner re-stamps elements from it):

* features: ``{request_id, ts_ms, user_id, item_id, fids, dense, served_score, true_ctr}``
  (what ``ExtractFeatures`` outputs; ``ts_ms`` is serving time);
* actions: ``{request_id, ts_ms, action}`` (schemas/action_log.avsc).

**The rules** (each is a docstring of its own below):

* *Join window.* A request's window is ``[.., features.ts_ms + join_window]`` in event time;
  an action joins when its ``ts_ms`` is at most the window end, whether it arrives before
  or after the features. An action that arrives first waits in state until the features
  arrive, or until the watermark passes ``action.ts_ms + join_window`` (then it is
  *unmatched*).
* *One example per request, emitted when the window closes* (the watermark passes the
  window end), as Monolith does. Emitting positives early would lower training delay but
  make ``actions`` depend on arrival order and need a second example or a retraction for
  later actions; not offered.
* *Label* (:func:`label_of`): 1 iff any joined action is in ``positive_actions`` (default
  click, like, share); others (dislike, skip, ...) are kept in ``actions`` but do not make
  a positive. ``actions`` lists distinct actions ordered by their first ``ts_ms`` (ties by
  name); repeats go to ``duplicate_actions`` and are not counted twice.
* *Duplicate feature records* of one request id: the earliest (then a stable order of their
  contents) is joined, the others go to ``duplicate_features``; so the choice does not
  depend on arrival order while the window is open.
* *Negative sampling* (:func:`keep_negative`): a negative is kept with probability ``r``
  decided by a hash of the request id (a retried bundle or a replay decides the same), and
  carries ``sample_rate=r``, ``sample_weight=1/r``; positives carry 1 and 1. See
  :func:`log_odds_correction` for serving a model trained on sampled data.
* *Late and unmatched actions* are counted and sent to side outputs, never dropped. After
  a window closes the request is remembered (a small tombstone) for ``late_horizon_s``
  more, so its late actions are told apart from unmatched ones; then its state is gone.
  Every key that holds state has a pending timer, so state never outlives
  ``window end + late_horizon`` (or ``action ts + join_window`` for unmatched actions);
  with an infinite horizon (``dataflow join --ordered_read``) the tombstone stays, without
  a timer, until the input ends.
* *Bad input never kills the job*: records that fail validation go to ``invalid`` with the
  reason (:func:`features_error`, :func:`action_error`): wrong types, empty or non-Unicode
  ids, NaN or infinite numbers, event times outside 1970-2106 (what the PS can hold).

Counters (namespace ``joiner``): features, actions, examples, positives, negatives,
negatives_sampled_out, unmatched_actions, late_actions, duplicate_actions,
duplicate_features, invalid_records, keys_opened, keys_closed (equal once every key's state
is cleared); distribution ``label_delay_ms`` (first positive action - serving time).

A runnable example (DirectRunner): :class:`OnlineJoiner`.
"""
from __future__ import annotations

import hashlib
import math
import numbers
from typing import Any, Iterable, NamedTuple, Tuple

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.coders import FastPrimitivesCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from schemas import strict_json
from transforms import state_cache

POSITIVE_ACTIONS = frozenset({"click", "like", "share"})
DEFAULT_JOIN_WINDOW_S = 900

# Output tags of the join (and attribute names of JoinResult).
EXAMPLES = "examples"
UNMATCHED_ACTIONS = "unmatched_actions"
LATE_ACTIONS = "late_actions"
DUPLICATE_ACTIONS = "duplicate_actions"
DUPLICATE_FEATURES = "duplicate_features"
INVALID = "invalid"
CLOSED = "closed"

_FEATURES, _ACTION = "features", "action"
_NAMESPACE = "joiner"


# --------------------------------------------------------------------------- the rules

def label_of(actions: Iterable[str], positive_actions=POSITIVE_ACTIONS) -> int:
    """The label of a request: 1 if any action is positive, else 0 (a click followed by a
    dislike is a positive).

    Args:
        actions: the request's joined actions.
        positive_actions: the actions that make a positive.

    Returns:
        1 or 0.

    >>> label_of(["click", "dislike"]), label_of(["skip", "dislike"]), label_of([])
    (1, 0, 0)
    """
    return int(any(a in positive_actions for a in actions))


def sampling_hash(request_id: str, salt: str = "") -> float:
    """A uniform number in [0, 1) that depends only on (request_id, salt): stable across
    processes, machines and Python versions (unlike ``hash``), so replays decide the same.

    Args:
        request_id: the request id.
        salt: another salt draws other numbers.

    Returns:
        A float in [0, 1).

    >>> sampling_hash("r1") == sampling_hash("r1") != sampling_hash("r1", salt="exp2")
    True
    """
    key = salt.encode("utf-8")
    if len(key) > 64:  # blake2b's longest key
        key = hashlib.blake2b(key).digest()
    digest = hashlib.blake2b(request_id.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def keep_negative(request_id: str, rate: float, salt: str = "") -> bool:
    """Whether negative sampling keeps the negative example of a request.

    Args:
        request_id: the request id.
        rate: the probability of keeping a negative (>= 1: all are kept).
        salt: changes which negatives are kept, still deterministically.

    Returns:
        True to keep it (:func:`sampling_hash` < ``rate``).

    >>> kept = sum(keep_negative(f"r{i}", 0.25) for i in range(10_000))
    >>> 2300 < kept < 2700
    True
    """
    return rate >= 1.0 or sampling_hash(request_id, salt) < rate


def log_odds_correction(logit, rate: float):
    """The logit of a model trained on negatives kept at ``rate`` (unweighted), corrected
    to the logit of the unsampled data.

    Sampling negatives at rate r multiplies the odds the model sees by 1/r, so its logit
    is ``log(r)`` too high (the Monolith paper's online joiner, citing Wang, Zhang & Wang,
    NeurIPS 2021). Use
    either this at serving *or* ``sample_weight`` in the training loss, never both:
    a loss weighted by 1/r already learns the unsampled CTR.

    Args:
        logit: the model's logit (a float or a NumPy array).
        rate: the rate negatives were kept at in training, in (0, 1].

    Returns:
        ``logit + log(rate)``.

    >>> round(log_odds_correction(0.0, 0.5), 6)
    -0.693147
    """
    return logit + math.log(rate)


def corrected_ctr(p, rate: float):
    """:func:`log_odds_correction` in probability space.

    Args:
        p: the model's probability (a float or a NumPy array).
        rate: the rate negatives were kept at in training, in (0, 1].

    Returns:
        ``p*r / (p*r + 1 - p)``.

    >>> corrected_ctr(0.5, 0.25)   # odds 1 seen with negatives kept at 1/4 -> odds 1/4
    0.2
    """
    return p * rate / (p * rate + 1.0 - p)


# --------------------------------------------------------------------------- validation

# Event times the training side can hold: the PS keeps them as uint32 seconds (1970-2106).
MAX_TS_MS = (1 << 32) * 1000


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    """A number that is a finite float (an int too large for a float is not)."""
    try:
        return _is_number(x) and math.isfinite(float(x))
    except OverflowError:
        return False


def _is_text(x) -> bool:
    """A str that UTF-8 can encode (no lone surrogates): what keys, state and files hold."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ts_error(record) -> str | None:
    ts_ms = record.get("ts_ms")
    if not _is_int(ts_ms):
        return "ts_ms must be an integer"
    if not 0 <= ts_ms < MAX_TS_MS:
        return f"ts_ms must be in [0, {MAX_TS_MS}) (ms since the epoch, 1970-2106)"
    return None


def features_error(record) -> str | None:
    """Why a record is not a valid extracted feature record.

    Args:
        record: what ``ExtractFeatures`` outputs, or anything else.

    Returns:
        The reason, or None if it is valid.

    >>> features_error({"request_id": "r1", "user_id": "u", "item_id": "i", "ts_ms": -1})
    'ts_ms must be in [0, 4294967296000) (ms since the epoch, 1970-2106)'
    """
    if not isinstance(record, dict):
        return f"not a dict: {type(record).__name__}"
    for key in ("request_id", "user_id", "item_id"):
        if not isinstance(record.get(key), str):
            return f"{key} must be a string"
        if not _is_text(record[key]):
            return f"{key} is not valid Unicode text"
    if not record["request_id"]:
        return "request_id is empty"
    ts_error = _ts_error(record)
    if ts_error:
        return ts_error
    fids = record.get("fids")
    if not isinstance(fids, (list, tuple)) or not all(
            _is_int(f) and 0 <= f < 2 ** 63 for f in fids):
        return "fids must be a list of integers in [0, 2**63)"
    dense = record.get("dense", [])
    if not isinstance(dense, (list, tuple)) or not all(_is_number(d) for d in dense):
        return "dense must be a list of numbers"
    if not all(_is_finite(d) for d in dense):
        return "dense values must be finite (no NaN or infinity)"
    for key in ("served_score", "true_ctr"):
        if record.get(key) is not None and not _is_number(record[key]):
            return f"{key} must be a number or None"
        if record.get(key) is not None and not _is_finite(record[key]):
            return f"{key} must be finite"
    return None


def action_error(record) -> str | None:
    """Why a record is not a valid action record.

    Args:
        record: an ActionLog dict (``schemas/action_log.avsc``), or anything else.

    Returns:
        The reason, or None if it is valid.

    >>> action_error({"request_id": "r1", "ts_ms": 5, "action": None})
    'action must be a string'
    """
    if not isinstance(record, dict):
        return f"not a dict: {type(record).__name__}"
    if not isinstance(record.get("request_id"), str) or not record["request_id"]:
        return "request_id must be a non-empty string"
    if not _is_text(record["request_id"]):
        return "request_id is not valid Unicode text"
    ts_error = _ts_error(record)
    if ts_error:
        return ts_error
    if not isinstance(record.get("action"), str):
        return "action must be a string"
    if not _is_text(record["action"]):
        return "action is not valid Unicode text"
    return None


def _carriable(record):
    """The record if Beam's coders and the JSON dead-letter files can carry it, else its repr
    (a bad record must not fail the step that reports it)."""
    try:
        FastPrimitivesCoder().encode(record)
        strict_json.dumps(record, default=repr).encode("utf-8")
    except Exception:  # noqa: BLE001 - anything a coder or JSON refuses
        return repr(record)[:2000]
    return record


def _slim_features(r: dict) -> dict:
    """The fields an example needs, in plain Python types (what state and Avro hold)."""
    score, ctr = r.get("served_score"), r.get("true_ctr")
    return {"request_id": r["request_id"], "ts_ms": int(r["ts_ms"]),
            "user_id": r["user_id"], "item_id": r["item_id"],
            "fids": [int(f) for f in r["fids"]],
            "dense": [float(d) for d in r.get("dense", [])],
            "served_score": None if score is None else float(score),
            "true_ctr": None if ctr is None else float(ctr)}


def _action_record(request_id: str, ts_ms: int, action: str) -> dict:
    return {"request_id": request_id, "ts_ms": ts_ms, "action": action}


class KeyByRequest(beam.DoFn):
    """Valid records → ``(request_id, (kind, payload))`` stamped with ``ts_ms``;
    invalid ones → the ``invalid`` output as ``{kind, error, record}``.

    An action's payload is ``(ts_ms, action)``: that is all the join keeps of it.

    Args:
        kind: what the records are: ``"features"`` or ``"action"``.

    >>> fn = KeyByRequest("action")
    >>> [(out.value, out.timestamp) for out in fn.process(
    ...     {"request_id": "r1", "ts_ms": 2000, "action": "click"})]
    [(('r1', ('action', (2000, 'click'))), Timestamp(2))]
    >>> [(out.tag, out.value["error"]) for out in fn.process({"request_id": "r1"})]
    [('invalid', 'ts_ms must be an integer')]
    """

    def __init__(self, kind: str):
        assert kind in (_FEATURES, _ACTION)
        self.kind = kind
        self.invalid = Metrics.counter(_NAMESPACE, "invalid_records")

    def process(self, record):
        check = features_error if self.kind == _FEATURES else action_error
        error = check(record)
        if error is not None:
            self.invalid.inc()
            yield pvalue.TaggedOutput(INVALID, {"kind": self.kind, "error": error,
                                                "record": _carriable(record)})
            return
        ts_ms = int(record["ts_ms"])
        payload = (_slim_features(record) if self.kind == _FEATURES
                   else (ts_ms, record["action"]))
        yield TimestampedValue((record["request_id"], (self.kind, payload)),
                               Timestamp(micros=ts_ms * 1000))


def _ms(timestamp: Timestamp) -> int:
    return timestamp.micros // 1000


def _at(ms: int) -> Timestamp:
    return Timestamp(micros=ms * 1000)


def _features_order(f: dict):
    """Which of two feature records of one request wins: the earlier, then a stable order
    of their contents (so the choice never depends on arrival order)."""
    return (f["ts_ms"], f["user_id"], f["item_id"], f["fids"], f["dense"])


# --------------------------------------------------------------------------- closed requests

def closed_request_keys(request_ids) -> np.ndarray:
    """The keys of closed requests, in the form of ``JoinByRequestFn(closed_requests=...)``:
    16 bytes a request, whatever the id's length.

    Args:
        request_ids: request ids (str).

    Returns:
        Their sorted, distinct keys: an ``S16`` array (a 15-byte BLAKE2b digest of the UTF-8
        id and a non-zero byte, so that NumPy keeps every byte).

    >>> keys = closed_request_keys(["r2", "r1", "r2"])
    >>> keys.dtype, len(keys), is_closed(keys, "r1"), is_closed(keys, "r3")
    (dtype('S16'), 2, True, False)
    """
    return np.unique(np.array([_closed_key(r) for r in request_ids], dtype="S16"))


def _closed_key(request_id: str) -> bytes:
    return hashlib.blake2b(request_id.encode("utf-8"), digest_size=15).digest() + b"\x01"


def is_closed(keys: np.ndarray, request_id: str) -> bool:
    """Whether a request is among some closed requests.

    Args:
        keys: :func:`closed_request_keys` of the closed requests.
        request_id: the request id.

    Returns:
        True if it is one of them (example: :func:`closed_request_keys`).
    """
    key = _closed_key(request_id)
    i = int(np.searchsorted(keys, key))
    return i < len(keys) and keys[i] == key


# --------------------------------------------------------------------------- the join

class JoinByRequestFn(beam.DoFn):
    """Stateful join of one request's features and actions, keyed by request id.

    A key's whole state is one value, ``(features, actions, closed_at, deadline)``, read
    and written once per element or timer: every state write costs a runner round trip
    (and, in Beam 2.62's SDK state cache, a deep-size measurement), so one cell is several
    times faster than one per field. ``deadline`` mirrors the single event-time timer
    (Beam cannot read a timer back), whose firing means:

    * ``features`` held → the join window ends: emit the example, keep only ``closed_at``;
    * ``closed_at`` held → the late horizon ends: forget the request;
    * only ``actions`` held → nobody served them: send them to ``unmatched_actions``.

    Its input is :class:`KeyByRequest`'s; :class:`OnlineJoiner` is the whole join.

    Args:
        join_window_s, negative_sample_rate, positive_actions, late_horizon_s,
            sampling_salt: as :class:`OnlineJoiner`'s.
        closed_requests: the path of a ``.npy`` file of :func:`closed_request_keys`, requests
            whose example an earlier run over earlier event time emitted (``dataflow.join``
            joins a bounded input in event-time slices, one pipeline each). A request of
            that set holds no state here: its feature records are duplicates (the earlier
            one won), its actions late (their window closed). The key of every request
            whose features close here goes to the ``closed`` output, for the next run's set.

    Raises:
        ValueError: a negative window or horizon, or a sample rate outside (0, 1].

    >>> import tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> closed = f"{tempfile.mkdtemp()}/closed.npy"
    >>> np.save(closed, closed_request_keys(["r0"]))   # an earlier run closed r0
    >>> with beam.Pipeline() as p:
    ...     out = (p | beam.Create([{"request_id": r, "ts_ms": 1000, "action": "click"}
    ...                             for r in ("r0", "r1")])
    ...            | beam.ParDo(KeyByRequest("action")).with_output_types(Tuple[str, Any])
    ...            | beam.ParDo(JoinByRequestFn(join_window_s=60, closed_requests=closed))
    ...            .with_outputs(LATE_ACTIONS, UNMATCHED_ACTIONS, main=EXAMPLES))
    ...     _ = assert_that(out[LATE_ACTIONS] | beam.Map(lambda a: a["request_id"]),
    ...                     equal_to(["r0"]), label="Late")
    ...     _ = assert_that(out[UNMATCHED_ACTIONS] | beam.Map(lambda a: a["request_id"]),
    ...                     equal_to(["r1"]), label="Unmatched")
    """
    REQUEST = ReadModifyWriteStateSpec("request", FastPrimitivesCoder())
    CLOSE = TimerSpec("close", TimeDomain.WATERMARK)

    def __init__(self, join_window_s: float = DEFAULT_JOIN_WINDOW_S,
                 late_horizon_s: float | None = None, negative_sample_rate: float = 1.0,
                 positive_actions: Iterable[str] = POSITIVE_ACTIONS, sampling_salt: str = "",
                 closed_requests: str | None = None):
        if join_window_s < 0:
            raise ValueError(f"join_window_s must be >= 0, got {join_window_s}")
        if not 0.0 < negative_sample_rate <= 1.0:
            raise ValueError(f"negative_sample_rate must be in (0, 1], got "
                             f"{negative_sample_rate}")
        self.window_ms = int(round(join_window_s * 1000))
        late_horizon_s = join_window_s if late_horizon_s is None else late_horizon_s
        if not late_horizon_s >= 0:
            raise ValueError(f"late_horizon_s must be >= 0, got {late_horizon_s}")
        # inf (None here): remembered until the input ends
        self.late_horizon_ms = (None if math.isinf(late_horizon_s)
                                else int(round(late_horizon_s * 1000)))
        self.rate = float(negative_sample_rate)
        if isinstance(positive_actions, str):  # one action, not a set of characters
            positive_actions = [positive_actions]
        self.positive_actions = frozenset(positive_actions)
        self.salt = sampling_salt
        self.closed_requests = closed_requests
        self._closed = None
        counter = lambda name: Metrics.counter(_NAMESPACE, name)  # noqa: E731
        self.n_features, self.n_actions = counter("features"), counter("actions")
        self.n_examples, self.n_positives = counter("examples"), counter("positives")
        self.n_negatives = counter("negatives")
        self.n_sampled_out = counter("negatives_sampled_out")
        self.n_unmatched, self.n_late = counter("unmatched_actions"), counter("late_actions")
        self.n_dup_actions = counter("duplicate_actions")
        self.n_dup_features = counter("duplicate_features")
        self.n_opened, self.n_closed = counter("keys_opened"), counter("keys_closed")
        self.label_delay = Metrics.distribution(_NAMESPACE, "label_delay_ms")

    def setup(self):
        # One state write per record: Beam's weighing of each cached value was most of the
        # joiner's time (transforms.state_cache: 6.5-6.9 s against 52-62 s, benchmarks.join)
        state_cache.weigh_without_module_globals()
        if self.closed_requests is not None:  # mapped, not read: pages come as looked up
            self._closed = np.load(self.closed_requests, mmap_mode="r")

    def process(self, element, request=beam.DoFn.StateParam(REQUEST),
                close=beam.DoFn.TimerParam(CLOSE)):
        request_id, (kind, payload) = element
        held = request.read()
        if held is None and self._closed is not None and is_closed(self._closed, request_id):
            if kind == _FEATURES:
                self.n_features.inc()
                self.n_dup_features.inc()
                yield pvalue.TaggedOutput(DUPLICATE_FEATURES, payload)
            else:
                self.n_actions.inc()
                self.n_late.inc()
                yield pvalue.TaggedOutput(LATE_ACTIONS, _action_record(request_id, *payload))
            return
        if held is None:
            self.n_opened.inc()  # every branch below then writes state and sets the timer
            features, actions, closed_at, deadline = None, (), None, None
        else:
            features, actions, closed_at, deadline = held

        if kind == _FEATURES:
            self.n_features.inc()
            if closed_at is not None:  # its example is out already
                self.n_dup_features.inc()
                yield pvalue.TaggedOutput(DUPLICATE_FEATURES, payload)
                return
            if features is not None:
                winner, loser = sorted([features, payload], key=_features_order)
                self.n_dup_features.inc()
                yield pvalue.TaggedOutput(DUPLICATE_FEATURES, loser)
                if winner is features:
                    return
            deadline = payload["ts_ms"] + self.window_ms
            close.set(_at(deadline))
            request.write((payload, actions, None, deadline))
            return

        ts_ms, action = payload
        self.n_actions.inc()
        if closed_at is not None or (  # the window closed before this action came, or
                features is not None and ts_ms > features["ts_ms"] + self.window_ms):
            self.n_late.inc()            # it happened after the window
            yield pvalue.TaggedOutput(LATE_ACTIONS, _action_record(request_id, ts_ms, action))
            return
        actions = tuple(actions) + ((ts_ms, action),)
        if features is None:  # not (yet) served: wait until action.ts + join_window
            give_up = ts_ms + self.window_ms
            if deadline is None or give_up > deadline:
                deadline = give_up
                close.set(_at(deadline))
        request.write((features, actions, None, deadline))

    @on_timer(CLOSE)
    def on_close(self, key=beam.DoFn.KeyParam, fired=beam.DoFn.TimestampParam,
                 request=beam.DoFn.StateParam(REQUEST), close=beam.DoFn.TimerParam(CLOSE)):
        """The request's event-time timer: the class docstring says what a firing means."""
        # Runners may deliver a timer that was since reset or already fired (the
        # BundleBasedDirectRunner fires a timer set behind the watermark twice): only the
        # firing that matches the deadline counts.
        held = request.read()
        if held is None:
            return
        features, actions, closed_at, deadline = held
        if deadline is None:  # a tombstone kept until the input ends: no timer is its own
            return
        if _ms(fired) < deadline:
            close.set(_at(deadline))
            return
        if features is not None:
            yield from self._emit(key, features, actions)
            yield pvalue.TaggedOutput(CLOSED, key)
            window_end = features["ts_ms"] + self.window_ms
            if self.late_horizon_ms is None:
                # Kept until the input ends, with no timer (which would cost a call and a
                # state read a request at the end): the runner drops it with the key's state
                # when the global window ends. Counted closed now.
                request.write((None, (), window_end, None))
                self.n_closed.inc()
                return
            if self.late_horizon_ms > 0:
                deadline = window_end + self.late_horizon_ms
                close.set(_at(deadline))
                request.write((None, (), window_end, deadline))
                return
        elif closed_at is None:
            for ts_ms, action in sorted(actions):
                self.n_unmatched.inc()
                yield pvalue.TaggedOutput(UNMATCHED_ACTIONS, _action_record(key, ts_ms, action))
        request.clear()
        self.n_closed.inc()

    def _emit(self, request_id: str, features: dict, buffered):
        window_end = features["ts_ms"] + self.window_ms
        joined: list[str] = []
        first_positive_ms = None
        for ts_ms, action in sorted(buffered):
            if ts_ms > window_end:  # came before the features, happened after the window
                self.n_late.inc()
                yield pvalue.TaggedOutput(LATE_ACTIONS, _action_record(request_id, ts_ms, action))
            elif action in joined:
                self.n_dup_actions.inc()
                yield pvalue.TaggedOutput(DUPLICATE_ACTIONS,
                                          _action_record(request_id, ts_ms, action))
            else:
                joined.append(action)
                if first_positive_ms is None and action in self.positive_actions:
                    first_positive_ms = ts_ms
        label = 1 if first_positive_ms is not None else 0
        rate = 1.0
        if label:
            self.n_positives.inc()
            self.label_delay.update(first_positive_ms - features["ts_ms"])
        else:
            self.n_negatives.inc()
            if self.rate < 1.0:
                if not keep_negative(request_id, self.rate, self.salt):
                    self.n_sampled_out.inc()
                    return
                rate = self.rate
        self.n_examples.inc()
        yield {"request_id": request_id, "ts_ms": features["ts_ms"],
               "user_id": features["user_id"], "item_id": features["item_id"],
               "fids": features["fids"], "dense": features["dense"],
               "label": label, "actions": joined,
               "sample_rate": rate, "sample_weight": 1.0 / rate,
               "served_score": features["served_score"], "true_ctr": features["true_ctr"]}


class JoinResult(NamedTuple):
    """The outputs of :class:`OnlineJoiner`, one PCollection each (the module docstring says
    what each holds).

    >>> print(*JoinResult._fields)
    examples unmatched_actions late_actions duplicate_actions duplicate_features invalid closed
    """
    examples: Any
    unmatched_actions: Any
    late_actions: Any
    duplicate_actions: Any
    duplicate_features: Any
    invalid: Any
    closed: Any = None  # request ids whose example (or sampled-out negative) was decided


class OnlineJoiner(beam.PTransform):
    """``(features, actions) | OnlineJoiner(...)`` → :class:`JoinResult`.

    Also accepts ``{"features": ..., "actions": ...}``. Examples come out with the event
    timestamp of their window end (``ts_ms + join_window``), when they become final.

    Args:
      join_window_s: how long after serving (event time) an action still counts.
      negative_sample_rate: probability of keeping a negative (1 keeps all).
      positive_actions: actions that make a request a positive.
      late_horizon_s: how long after the window a request is remembered, so that its late
        actions are reported as late, not unmatched (default: ``join_window_s``; 0 frees
        all state at window end; ``math.inf``: until the input ends, as when every timer
        fires at the end of a bounded input; such a tombstone has no timer, it goes with
        the key's state at the end of the global window, and counts as closed when its
        window closes).
      sampling_salt: changes which negatives are kept, still deterministically.
      closed_requests: requests an earlier run closed (see :class:`JoinByRequestFn`).
      label: the transform's label.

    Returns:
      (``expand``) a :class:`JoinResult`.

    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> feature = {"request_id": "r1", "ts_ms": 1000, "user_id": "u", "item_id": "i",
    ...            "fids": [7], "dense": [0.5], "served_score": 0.1, "true_ctr": None}
    >>> with beam.Pipeline() as p:
    ...     features = p | "F" >> beam.Create([feature])
    ...     actions = p | "A" >> beam.Create([
    ...         {"request_id": "r1", "ts_ms": 3000, "action": "click"},
    ...         {"request_id": "r9", "ts_ms": 3000, "action": "like"}])
    ...     joined = (features, actions) | OnlineJoiner(join_window_s=60)
    ...     _ = assert_that(joined.examples | beam.Map(lambda e: (e["label"], e["actions"])),
    ...                     equal_to([(1, ["click"])]))
    ...     _ = assert_that(joined.unmatched_actions | beam.Map(lambda a: a["request_id"]),
    ...                     equal_to(["r9"]), label="Unmatched")
    """

    def __init__(self, join_window_s: float = DEFAULT_JOIN_WINDOW_S,
                 negative_sample_rate: float = 1.0,
                 positive_actions: Iterable[str] = POSITIVE_ACTIONS,
                 late_horizon_s: float | None = None, sampling_salt: str = "",
                 closed_requests: str | None = None, label: str | None = None):
        super().__init__(label)
        self.join_fn = JoinByRequestFn(join_window_s, late_horizon_s, negative_sample_rate,
                                       positive_actions, sampling_salt, closed_requests)

    def expand(self, inputs):
        if isinstance(inputs, dict):
            features, actions = inputs["features"], inputs["actions"]
        else:
            features, actions = inputs
        keyed_features = (features | "KeyFeatures" >> beam.ParDo(KeyByRequest(_FEATURES))
                          .with_output_types(Tuple[str, Tuple[str, Any]])
                          .with_outputs(INVALID, main="keyed"))
        keyed_actions = (actions | "KeyActions" >> beam.ParDo(KeyByRequest(_ACTION))
                         .with_output_types(Tuple[str, Tuple[str, Any]])
                         .with_outputs(INVALID, main="keyed"))
        joined = ((keyed_features.keyed, keyed_actions.keyed)
                  | "FeaturesAndActions" >> beam.Flatten()
                  | "JoinByRequest" >> beam.ParDo(self.join_fn).with_outputs(
                      UNMATCHED_ACTIONS, LATE_ACTIONS, DUPLICATE_ACTIONS, DUPLICATE_FEATURES,
                      CLOSED, main=EXAMPLES))
        invalid = ((keyed_features[INVALID], keyed_actions[INVALID])
                   | "Invalid" >> beam.Flatten())
        return JoinResult(examples=joined[EXAMPLES],
                          unmatched_actions=joined[UNMATCHED_ACTIONS],
                          late_actions=joined[LATE_ACTIONS],
                          duplicate_actions=joined[DUPLICATE_ACTIONS],
                          duplicate_features=joined[DUPLICATE_FEATURES],
                          invalid=invalid, closed=joined[CLOSED])


__all__ = ["OnlineJoiner", "JoinResult", "JoinByRequestFn", "KeyByRequest", "label_of",
           "keep_negative", "sampling_hash", "log_odds_correction", "corrected_ctr",
           "features_error", "action_error", "POSITIVE_ACTIONS", "DEFAULT_JOIN_WINDOW_S",
           "MAX_TS_MS", "closed_request_keys", "is_closed"]
