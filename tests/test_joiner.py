"""OnlineJoiner: exact outputs on the DirectRunner (batch and TestStream), the rules on their
own, and the state machine driven by hand (no state left behind, nothing lost)."""
from __future__ import annotations

import json
import math
import random

import apache_beam as beam
import pytest
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import MAX_TIMESTAMP, Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataflow.job import metrics_dict
from dataflow.options import pipeline_options
from transforms import joiner
from transforms.joiner import (JoinByRequestFn, OnlineJoiner, corrected_ctr, keep_negative,
                               label_of, log_odds_correction)

W_S = 60
W = W_S * 1000
OUTPUTS = ("examples", "unmatched_actions", "late_actions", "duplicate_actions",
           "duplicate_features", "invalid")


def feat(rid, ts, user="u1", item="i1", fids=(1, 2), dense=(0.5,), served=0.25, ctr=None):
    return {"request_id": rid, "ts_ms": ts, "user_id": user, "item_id": item,
            "fids": list(fids), "dense": list(dense), "served_score": served, "true_ctr": ctr}


def act(rid, ts, action="click"):
    return {"request_id": rid, "ts_ms": ts, "action": action}


def example(f, label, actions, rate=1.0):
    return {**f, "label": label, "actions": list(actions), "sample_rate": rate,
            "sample_weight": 1.0 / rate}


def as_json(records):
    return sorted(json.dumps(r, sort_keys=True) for r in records)


def reference_join(features, actions, window_ms=W, rate=1.0,
                   positive=joiner.POSITIVE_ACTIONS, salt=""):
    """The rules in plain Python, for input that is all present before any window closes
    (batch): every output of OnlineJoiner, by name."""
    out = {name: [] for name in OUTPUTS}
    winners = {}
    for f in sorted(features, key=joiner._features_order):
        if f["request_id"] in winners:
            out["duplicate_features"].append(f)
        else:
            winners[f["request_id"]] = f
    by_request = {}
    for a in actions:
        by_request.setdefault(a["request_id"], []).append(a)
    for rid, acts in by_request.items():
        if rid not in winners:
            out["unmatched_actions"] += acts
    for rid, f in winners.items():
        joined = []
        for a in sorted(by_request.get(rid, []), key=lambda a: (a["ts_ms"], a["action"])):
            if a["ts_ms"] > f["ts_ms"] + window_ms:
                out["late_actions"].append(a)
            elif a["action"] in joined:
                out["duplicate_actions"].append(a)
            else:
                joined.append(a["action"])
        label = label_of(joined, positive)
        if label:
            out["examples"].append(example(f, 1, joined))
        elif keep_negative(rid, rate, salt):
            out["examples"].append(example(f, 0, joined, rate))
    return out


def join_pipeline(p, features, actions, **joiner_args):
    """The joiner on Create inputs stamped with ts_ms, each output as sorted JSON strings."""
    stamp = lambda r: TimestampedValue(r, r["ts_ms"] / 1000.0 if isinstance(r, dict)  # noqa
                                       and isinstance(r.get("ts_ms"), int) else 0)
    f = p | "Features" >> beam.Create(features) | "StampF" >> beam.Map(stamp)
    a = p | "Actions" >> beam.Create(actions) | "StampA" >> beam.Map(stamp)
    return (f, a) | OnlineJoiner(join_window_s=W_S, **joiner_args)


def assert_outputs(joined, want):
    for name in OUTPUTS:
        got = getattr(joined, name) | f"Json{name}" >> beam.Map(json.dumps, sort_keys=True,
                                                               default=repr)
        assert_that(got, equal_to(as_json(want[name]) if name != "invalid" else want[name]),
                    label=f"Check{name}")


@pytest.fixture
def direct_runner_metrics(monkeypatch):
    """Makes the BundleBasedDirectRunner (TestStream) report every bundle's user metrics.

    Beam 2.62 bug: its worker thread's StateSampler caches one ScopedState per step, holding
    the MetricsContainer of the step's *first* bundle, so counters incremented in later
    bundles (e.g. in every timer callback) are never committed. A fresh cache per bundle
    gives each bundle its own container again.
    """
    from apache_beam.runners.direct import executor
    call = executor.TransformExecutor.call

    def call_with_fresh_states(self, state_sampler):
        state_sampler._states_by_name.clear()
        return call(self, state_sampler)
    monkeypatch.setattr(executor.TransformExecutor, "call", call_with_fresh_states)


def run(build, flags=()):
    p = beam.Pipeline(options=pipeline_options(["--runner=DirectRunner", *flags]))
    build(p)
    result = p.run()
    result.wait_until_finish()
    return metrics_dict(result)["counters"]


# --------------------------------------------------------------------------- scenarios

F = {rid: feat(rid, ts, item=f"item-{rid}") for rid, ts in
     [("r1", 0), ("r2", 1000), ("r3", 0), ("r4", 0), ("r5", 0), ("r6", 0), ("r9", 0)]}
F_DUP_LATER = feat("r8", 100, item="second")
F_DUP_EARLIER = feat("r8", 0, item="first")
SCENARIO_FEATURES = list(F.values()) + [F_DUP_LATER, F_DUP_EARLIER,
                                        {"request_id": "bad", "ts_ms": 0}]
SCENARIO_ACTIONS = [
    act("r1", 5000),                                         # after the features
    act("r2", 500),                                          # before the features were served
    act("r4", 10_000), act("r4", 20_000, "like"), act("r4", 30_000),  # click twice
    act("r5", 5000, "dislike"), act("r5", 6000, "skip"),     # not positive
    act("r6", W + 1),                                        # 1 ms after the window
    act("r9", W),                                            # exactly at the window end
    act("r7", 3000),                                         # never served
    act("r8", 50, "share"),
    {"request_id": "r1", "ts_ms": "soon", "action": "click"},  # invalid
]
SCENARIO_WANT = {
    "examples": [example(F["r1"], 1, ["click"]), example(F["r2"], 1, ["click"]),
                 example(F["r3"], 0, []), example(F["r4"], 1, ["click", "like"]),
                 example(F["r5"], 0, ["dislike", "skip"]), example(F["r6"], 0, []),
                 example(F["r9"], 1, ["click"]), example(F_DUP_EARLIER, 1, ["share"])],
    "unmatched_actions": [act("r7", 3000)],
    "late_actions": [act("r6", W + 1)],
    "duplicate_actions": [act("r4", 30_000)],
    "duplicate_features": [F_DUP_LATER],
    "invalid": [json.dumps({"error": "user_id must be a string",
                            "kind": "features", "record": {"request_id": "bad", "ts_ms": 0}},
                           sort_keys=True),
                json.dumps({"error": "ts_ms must be an integer", "kind": "action",
                            "record": SCENARIO_ACTIONS[-1]}, sort_keys=True)],
}


def test_reference_model_agrees_with_the_scenario():
    want = reference_join(SCENARIO_FEATURES[:-1], SCENARIO_ACTIONS[:-1])
    for name in OUTPUTS[:-1]:
        assert as_json(want[name]) == as_json(SCENARIO_WANT[name]), name


def test_batch_scenario_exact_outputs_and_counters():
    counters = run(lambda p: assert_outputs(
        join_pipeline(p, SCENARIO_FEATURES, SCENARIO_ACTIONS), SCENARIO_WANT))
    c = {k.split(".", 1)[1]: v for k, v in counters.items() if k.startswith("joiner.")}
    assert c == {"features": 9, "actions": 11, "examples": 8, "positives": 5,
                 "negatives": 3, "unmatched_actions": 1, "late_actions": 1,
                 "duplicate_actions": 1, "duplicate_features": 1, "invalid_records": 2,
                 "keys_opened": 9, "keys_closed": 9}


def random_stream(seed, n=150):
    rng = random.Random(seed)
    features, actions = [], []
    for i in range(n):
        rid, ts = f"q{i}", rng.randrange(0, 600_000)
        if rng.random() < 0.9:
            features.append(feat(rid, ts, user=f"u{i % 7}", item=f"i{i % 11}",
                                 fids=[rng.randrange(2 ** 62) for _ in range(3)]))
            if rng.random() < 0.05:
                features.append(feat(rid, ts + rng.randrange(-5000, 5000), item="dup"))
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            actions.append(act(rid, ts + rng.randrange(-2000, W + 20_000),
                               rng.choice(["click", "like", "share", "dislike", "skip"])))
    rng.shuffle(features)
    rng.shuffle(actions)
    return features, actions


def test_batch_random_stream_matches_reference_with_sampling():
    features, actions = random_stream(seed=3)
    want = reference_join(features, actions, rate=0.4, salt="s")
    assert want["late_actions"] and want["unmatched_actions"] and want["duplicate_actions"]
    counters = run(lambda p: assert_outputs(
        join_pipeline(p, features, actions, negative_sample_rate=0.4, sampling_salt="s"),
        want))
    requests = {r["request_id"] for r in features + actions}
    assert counters["joiner.keys_opened"] == counters["joiner.keys_closed"] == len(requests)
    assert counters["joiner.examples"] == len(want["examples"])
    negatives = counters["joiner.negatives"]
    assert counters["joiner.negatives_sampled_out"] == negatives - sum(
        1 for e in want["examples"] if e["label"] == 0)
    kept = [e for e in want["examples"] if e["label"] == 0]
    assert kept and all(e["sample_rate"] == 0.4 and e["sample_weight"] == 2.5 for e in kept)


def test_streaming_test_stream_with_watermarks_and_late_data(direct_runner_metrics):
    """Windows close as the watermark passes them; actions after the close are late while
    the request is remembered (late_horizon) and unmatched after; late features still
    produce their example; no state is left at the end."""
    def chunk(stream, records):
        return stream.add_elements([TimestampedValue(r, r["ts_ms"] / 1000.0) for r in records])

    # One TestStream feeds both inputs (records are told apart by their fields).
    stream = TestStream()
    stream = chunk(stream, [feat("r1", 0), act("r2", 2000), feat("r3", 1000), act("r1", 5000)])
    stream = stream.advance_watermark_to(1.0)
    stream = chunk(stream, [feat("r2", 1500), act("r4", 4000), act("r1", 30_000, "like")])
    stream = stream.advance_watermark_to(62.0)       # r1, r2, r3 windows close
    stream = chunk(stream, [act("r1", 40_000, "share"),   # in r1's window, arrives after close
                            act("r3", 65_000)])           # after r3's window
    stream = stream.advance_watermark_to(200.0)      # r1-r3 forgotten; r4 gives up
    stream = chunk(stream, [act("r1", 50_000),           # r1 forgotten: unmatched now
                            feat("r5", 100_000)])         # features later than their window
    stream = stream.advance_watermark_to(400.0)      # see conftest note: past every timer
    stream = stream.advance_watermark_to_infinity()

    want = {
        "examples": [example(feat("r1", 0), 1, ["click", "like"]),
                     example(feat("r2", 1500), 1, ["click"]), example(feat("r3", 1000), 0, []),
                     example(feat("r5", 100_000), 0, [])],
        "unmatched_actions": [act("r4", 4000), act("r1", 50_000)],
        "late_actions": [act("r1", 40_000, "share"), act("r3", 65_000)],
        "duplicate_actions": [], "duplicate_features": [], "invalid": [],
    }

    def build(p):
        records = p | stream
        features = records | "OnlyF" >> beam.Filter(lambda r: "fids" in r)
        actions = records | "OnlyA" >> beam.Filter(lambda r: "action" in r)
        joined = (features, actions) | OnlineJoiner(join_window_s=W_S)
        assert_outputs(joined, want)
        # Examples carry the event time of their window end.
        assert_that(joined.examples | beam.Map(
            lambda e, t=beam.DoFn.TimestampParam: (e["request_id"], t.micros // 1000)),
            equal_to([("r1", W), ("r2", 1500 + W), ("r3", 1000 + W), ("r5", 100_000 + W)]),
            label="ExampleTimestamps")

    counters = run(build, ["--streaming"])
    assert counters["joiner.keys_opened"] == counters["joiner.keys_closed"] == 6
    assert counters["joiner.late_actions"] == 2 and counters["joiner.unmatched_actions"] == 2


def test_streaming_without_late_horizon_state_ends_at_window_end(direct_runner_metrics):
    """late_horizon_s=0: nothing is remembered after the window, so an action arriving
    after the close is unmatched rather than late."""
    stream = (TestStream()
              .add_elements([TimestampedValue(feat("r1", 0), 0)])
              .advance_watermark_to(61.0)
              .add_elements([TimestampedValue(act("r1", 10_000), 10.0)])
              .advance_watermark_to(200.0)
              .advance_watermark_to_infinity())
    want = {name: [] for name in OUTPUTS}
    want["examples"] = [example(feat("r1", 0), 0, [])]
    want["unmatched_actions"] = [act("r1", 10_000)]

    def build(p):
        records = p | stream
        joined = ((records | "F" >> beam.Filter(lambda r: "fids" in r),
                   records | "A" >> beam.Filter(lambda r: "action" in r))
                  | OnlineJoiner(join_window_s=W_S, late_horizon_s=0))
        assert_outputs(joined, want)

    counters = run(build, ["--streaming"])
    assert counters["joiner.keys_opened"] == counters["joiner.keys_closed"] == 2


def test_dict_input_and_custom_positive_actions():
    want = {name: [] for name in OUTPUTS}
    want["examples"] = [example(feat("r1", 0), 0, ["click"]), example(feat("r2", 0), 1,
                                                                     ["purchase"])]

    def build(p):
        f = p | "F" >> beam.Create([feat("r1", 0), feat("r2", 0)])
        a = p | "A" >> beam.Create([act("r1", 10, "click"), act("r2", 10, "purchase")])
        assert_outputs({"features": f, "actions": a} | OnlineJoiner(
            join_window_s=W_S, positive_actions={"purchase"}), want)
    run(build)


# --------------------------------------------------------------------------- the rules

def test_label_rule():
    assert label_of(["click"]) == label_of(["dislike", "like"]) == label_of(["share"]) == 1
    assert label_of(["dislike"]) == label_of(["skip", "dislike"]) == label_of([]) == 0
    assert label_of(["buy"], positive_actions={"buy"}) == 1


def test_sampling_is_deterministic_and_at_the_rate():
    ids = [f"req-{i}" for i in range(20_000)]
    first = [keep_negative(r, 0.1) for r in ids]
    assert first == [keep_negative(r, 0.1) for r in ids]
    assert abs(sum(first) / len(ids) - 0.1) < 0.01
    assert all(keep_negative(r, 1.0) for r in ids[:100])
    # Nested: a request kept at rate 0.1 is also kept at 0.3 (same hash, higher bar).
    assert all(keep_negative(r, 0.3) for r, k in zip(ids, first) if k)
    # A different salt picks a different, equally sized subset.
    other = [keep_negative(r, 0.1, salt="b") for r in ids]
    assert other != first and abs(sum(other) / len(ids) - 0.1) < 0.01
    # A known value guards against an accidental change of the hash (replays must agree).
    assert joiner.sampling_hash("request-42") == pytest.approx(0.13264213086678178, abs=1e-15)


def test_log_odds_correction_recovers_the_click_rate():
    """Synthetic requests in two groups with CTR 3% and 12%; negatives sampled at 10% with
    the joiner's rule. Unweighted, the sampled CTR is far too high; corrected by log(r) at
    serving — or weighted by sample_weight in training — it matches the original rate."""
    rng = random.Random(11)
    rate = 0.1
    for group, ctr in (("a", 0.03), ("b", 0.12)):
        n = 100_000
        labels = [(f"{group}{i}", rng.random() < ctr) for i in range(n)]
        true_rate = sum(y for _, y in labels) / n
        kept = [(rid, y) for rid, y in labels if y or keep_negative(rid, rate)]
        sampled_rate = sum(y for _, y in kept) / len(kept)
        assert sampled_rate > 2 * true_rate
        assert corrected_ctr(sampled_rate, rate) == pytest.approx(true_rate, rel=0.05)
        logit = math.log(sampled_rate / (1 - sampled_rate))
        p = 1 / (1 + math.exp(-log_odds_correction(logit, rate)))
        assert p == pytest.approx(corrected_ctr(sampled_rate, rate), rel=1e-9)
        weights = [1.0 if y else 1.0 / rate for _, y in kept]
        weighted = sum(w for (_, y), w in zip(kept, weights) if y) / sum(weights)
        assert weighted == pytest.approx(true_rate, rel=0.05)


def test_bad_arguments_fail_fast():
    with pytest.raises(ValueError):
        OnlineJoiner(negative_sample_rate=0)
    with pytest.raises(ValueError):
        OnlineJoiner(join_window_s=-1)



# --------------------------------------------------------------------------- state machine

class _Value:
    def __init__(self):
        self.value = None

    def read(self):
        return self.value

    def write(self, v):
        self.value = v

    def clear(self):
        self.value = None


class _Timer:
    def __init__(self):
        self.at = None

    def set(self, ts):
        self.at = ts

    def clear(self):
        self.at = None


class HandRunner:
    """Drives JoinByRequestFn like a runner: per-key state, one timer per key that fires
    when the watermark passes it. Lets a test look at every key's state directly."""

    def __init__(self, fn, duplicate_firings=False):
        self.fn, self.keys, self.out = fn, {}, []
        self.duplicate_firings = duplicate_firings  # deliver every firing twice

    def _key(self, key):
        if key not in self.keys:
            self.keys[key] = dict(request=_Value(), close=_Timer())
        return self.keys[key]

    def _collect(self, outputs):
        for o in outputs:
            self.out.append((o.tag, o.value) if hasattr(o, "tag") else ("examples", o))

    def element(self, record):
        kind = "features" if "fids" in record else "action"
        payload = (joiner._slim_features(record) if kind == "features"
                   else (record["ts_ms"], record["action"]))
        self._collect(self.fn.process((record["request_id"], (kind, payload)),
                                      **self._key(record["request_id"])))

    def watermark(self, ms):
        while True:
            due = sorted((s["close"].at, k) for k, s in self.keys.items()
                         if s["close"].at is not None and s["close"].at < Timestamp(
                             micros=ms * 1000))
            if not due:
                return
            fired, key = due[0]
            state = self.keys[key]
            state["close"].at = None
            self._collect(self.fn.on_close(key=key, fired=fired, **state))
            if self.duplicate_firings:
                self._collect(self.fn.on_close(key=key, fired=fired, **state))

    def held(self):
        """Keys that still hold state or a timer."""
        return [k for k, s in self.keys.items()
                if s["request"].value is not None or s["close"].at is not None]


events = st.lists(st.one_of(
    st.tuples(st.just("f"), st.sampled_from("abcd"), st.integers(0, 300)),
    st.tuples(st.just("a"), st.sampled_from("abcde"), st.integers(0, 400),
              st.sampled_from(["click", "like", "dislike"])),
    st.tuples(st.just("w"), st.integers(0, 500))), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=events, horizon=st.sampled_from([0, 30]), rate=st.sampled_from([1.0, 0.5]),
       duplicate_firings=st.booleans())
def test_any_interleaving_loses_nothing_and_leaves_no_state(events, horizon, rate,
                                                            duplicate_firings):
    """Random interleavings of features, actions and watermark steps: at the end no key
    holds state or a timer, and (without sampling) every record is accounted for exactly
    once: each action joined into one example or late, unmatched or duplicate; each
    feature record in one example or a duplicate. Timers delivered twice change nothing."""
    fn = JoinByRequestFn(join_window_s=0.05, late_horizon_s=horizon / 1000,
                         negative_sample_rate=rate)
    runner = HandRunner(fn, duplicate_firings)
    n_features = n_actions = 0
    for e in events:
        if e[0] == "f":
            runner.element(feat(e[1], e[2]))
            n_features += 1
        elif e[0] == "a":
            runner.element(act(e[1], e[2], e[3]))
            n_actions += 1
        else:
            runner.watermark(e[1])
    runner.watermark(MAX_TIMESTAMP.micros // 1000)
    assert runner.held() == []
    by_tag = {}
    for tag, value in runner.out:
        by_tag.setdefault(tag, []).append(value)
    examples = by_tag.get("examples", [])
    actions_out = (sum(len(x["actions"]) for x in examples)
                   + sum(len(by_tag.get(t, [])) for t in
                         ("late_actions", "unmatched_actions", "duplicate_actions")))
    features_out = len(examples) + len(by_tag.get("duplicate_features", []))
    if rate == 1.0:
        assert (actions_out, features_out) == (n_actions, n_features)
    else:  # sampled-out negatives take their feature record and actions with them
        assert actions_out <= n_actions and features_out <= n_features
    assert {x["request_id"] for x in examples} <= {e[1] for e in events if e[0] == "f"}
    for x in examples:
        assert x["label"] == label_of(x["actions"])
        assert len(set(x["actions"])) == len(x["actions"])
        assert (x["sample_rate"], x["sample_weight"]) == ((1.0, 1.0) if x["label"]
                                                          else (rate, 1 / rate))
