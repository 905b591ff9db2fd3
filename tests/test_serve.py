"""Serving: the dense model as a SavedModel (export), the HTTP API, hot reload, fallbacks.

Scores are checked against ``transforms.model.Model.predict`` on the same rows and dense
weights: serving must compute exactly what training's model computes.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest

from dataflow.serving.feature_log import open_feature_log
from dataflow.serving.http_server import Server
from dataflow.serving.request import BadRequest
from dataflow.serving.scorer import Scorer
from ps.store import open_store
from schemas import read_avro
from schemas.feature_config import load_feature_config
from ps.sharding import shard_of
from transforms.example_batch import ExampleBatch
from transforms.export import (DenseModule, latest_model, list_models, load_model,
                               write_model)
from transforms.features import extract
from transforms.models import DeepFM
from transforms.model import Model, ModelSpec

CONFIG = load_feature_config("synthetic")
T0 = 1_704_067_200_000

CONTEXT = {"gender": "f", "age": 31, "region": "r1", "device": "ios", "network": "wifi",
           "hour": 9}


def candidate(j: int, **extra) -> dict:
    return {"item_id": f"i{j}",
            "features": {"category": f"c{j % 5}", "creator": f"a{j % 3}",
                         "tags": [f"c{j % 5}.t1"], "duration_s": 10.0 + j,
                         "item_age_hours": 0.5 * j},
            **extra}


def request(n: int = 8, **extra) -> dict:
    return {"user_id": "u1", "ts_ms": T0, "context": dict(CONTEXT),
            "candidates": [candidate(j) for j in range(n)], **extra}


def expected_probs(spec, req: dict, store, dense_params) -> np.ndarray:
    """What training's Model predicts for the request's candidates with the store's rows."""
    model = Model(spec)
    examples = []
    for j, c in enumerate(req["candidates"]):
        record = {"request_id": f"r-{j}", "ts_ms": req.get("ts_ms", T0),
                  "user_id": req["user_id"], "item_id": c["item_id"],
                  "features": {**req["context"], **c.get("features", {})}}
        out = extract(record, CONFIG)
        examples.append({"fids": out["fids"], "dense": out["dense"], "label": 0,
                         "ts_ms": out["ts_ms"]})
    batch = ExampleBatch.from_examples(examples, spec.dense_dim)
    keys = model.lookup_keys(batch)[spec.table]
    rows, _ = store.read_rows(spec.table, keys, spec.width)
    return model.predict(batch, {spec.table: (keys, rows)}, dense_params)


class Client:
    def __init__(self, url: str):
        host, port = url.split("//")[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def call(self, method: str, path: str, body=None, raw: bytes | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.conn.request(method, path, body=data,
                          headers={"Content-Type": "application/json"} if data else {})
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def score(self, body):
        return self.call("POST", "/score", body)


def make_server(tmp_path, store_url: str, kind: str = "deepfm", model_dir=None,
                log_in_process: bool = True, **scorer_kwargs):
    spec = ModelSpec.from_feature_config(CONFIG, kind)
    # the service's own log (a child process) where the log is checked; a thread elsewhere
    log = open_feature_log(str(tmp_path / "feature_log"), 60, log_in_process)
    scorer = Scorer(CONFIG, spec, store_url, num_shards=2, model_dir=model_dir,
                          feature_log=log, **scorer_kwargs)
    server = Server(scorer, port=0, poll_s=0.05).start()
    return spec, scorer, server


def write_rows(store, spec, fids, rng, scale=0.5):
    fids = np.unique(np.asarray(fids, np.uint64))
    rows = rng.normal(0, scale, (len(fids), spec.width)).astype(np.float32)
    shards = shard_of(fids, 2)
    for s in range(2):
        store.write_rows(spec.table, s, fids[shards == s], rows[shards == s])


def request_fids(req) -> list:
    return [f for j, c in enumerate(req["candidates"])
            for f in extract({"request_id": "x", "ts_ms": T0, "user_id": req["user_id"],
                              "item_id": c["item_id"],
                              "features": {**req["context"], **c["features"]}}, CONFIG)["fids"]]


# --------------------------------------------------------------------------- export


def test_saved_model_computes_what_model_predicts(tmp_path):
    spec = ModelSpec(DeepFM(hidden=(8, 4)), slots=[(1, 4), (2, 4), (3, 4)], dense_dim=2)
    rng = np.random.default_rng(0)
    params = {k: rng.normal(0, 0.3, v.shape).astype(np.float32)
              for k, v in Model(spec).initial_dense_params().items()}
    path = write_model(str(tmp_path), spec, params, version=3, ts_ms=T0)
    loaded = load_model(path)
    assert (loaded.version, loaded.ts_ms, loaded.spec) == (3, T0, spec)
    examples = [{"fids": [1 << 48 | int(rng.integers(20)), 2 << 48 | int(rng.integers(20)),
                          3 << 48 | int(rng.integers(5)), 9 << 48 | 1],  # slot 9: not in spec
                 "dense": rng.normal(size=2).tolist(), "label": 0, "ts_ms": 0}
                for _ in range(50)]
    batch = ExampleBatch.from_examples(examples)
    model = Model(spec)
    index = model.index(batch)
    rows = rng.normal(0, 0.5, (len(index.keys), spec.width)).astype(np.float32)
    gathered = model.gather(batch, {spec.table: (index.keys, rows)}, index)
    occurrences = np.stack([gathered.row_of_occurrence, gathered.segment])
    logits = loaded.logits(rows, occurrences, batch.dense)
    expected = model.predict(batch, {spec.table: (index.keys, rows)}, params, index)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), expected, rtol=1e-5, atol=1e-6)
    # the in-memory module (serving's before the first export) is the same graph
    np.testing.assert_allclose(DenseModule(spec, params).logits(rows, occurrences, batch.dense),
                               logits, rtol=1e-5, atol=1e-6)


def test_model_dir_is_written_atomically_and_keeps_the_newest(tmp_path):
    spec = ModelSpec("fm", slots=[(1, 4), (2, 4)], dense_dim=0)
    params = Model(spec).initial_dense_params()
    module = DenseModule(spec, params)
    # a half-written model (a writer that died) is never listed
    os.makedirs(tmp_path / ".tmp-deadbeef")
    (tmp_path / ".tmp-deadbeef" / "saved_model.pb").write_bytes(b"partial")
    paths = [write_model(str(tmp_path), spec, {"bias": np.array([v], np.float32)}, version=v,
                         ts_ms=T0 + 1000 * v, keep=2, module=module) for v in range(1, 5)]
    assert list_models(str(tmp_path)) == paths[-2:]
    assert latest_model(str(tmp_path)) == paths[-1]
    assert [load_model(p).version for p in paths[-2:]] == [3, 4]
    # FM without rows and dense inputs: the logit is the bias, here the version written
    no_rows = (np.zeros((1, spec.width), np.float32), np.zeros((2, 1), np.int32),
               np.zeros((1, 0), np.float32))
    assert [float(load_model(p).logits(*no_rows)[0]) for p in paths[-2:]] == [3.0, 4.0]
    # the same export again (a retried bundle) changes nothing
    assert write_model(str(tmp_path), spec, params, 4, T0 + 4000, keep=2) == paths[-1]
    with pytest.raises(ValueError, match="keep"):
        write_model(str(tmp_path), spec, params, 5, T0, keep=0)


@pytest.mark.slow
def test_train_exports_the_published_dense_weights(tmp_path):
    """dataflow.train --model_dir: SavedModels appear every interval of event time, carry the
    store's version, and compute with the weights the store held at that version."""
    from dataflow import data, join, train
    data.synth(str(tmp_path / "logs"), requests=3000, users=50, items=60, days=0.25, seed=2)
    join.main([f"--features={tmp_path}/logs/feature_log/*.avro",
               f"--actions={tmp_path}/logs/action_log/*.avro", f"--out={tmp_path}/joined",
               "--config=synthetic", "--period_s=900"])
    store_url = f"memory://export-{tmp_path.name}"
    models = tmp_path / "models"
    train.main(["backfill", f"--input={tmp_path}/joined/examples/*.avro", "--config=synthetic",
                "--model=fm", f"--store={store_url}", "--batch_size=64",
                f"--model_dir={models}", "--model_export_interval_s=600", "--model_keep=4",
                f"--metrics_dir={tmp_path}/metrics"])
    paths = list_models(str(models))
    assert len(paths) == 4, paths  # 6 hours of event time, one export per 10 minutes, keep 4
    loaded = [load_model(p) for p in paths]
    assert [m.ts_ms for m in loaded] == sorted(m.ts_ms for m in loaded)
    assert all(b.ts_ms - a.ts_ms >= 600_000 for a, b in zip(loaded, loaded[1:]))
    assert [m.version for m in loaded] == sorted(set(m.version for m in loaded))
    store = open_store(store_url, num_shards=2)
    params, version = store.read_dense("dense")
    assert loaded[-1].version <= version
    assert all(m.meta["tick_ts_ms"] >= m.ts_ms for m in loaded)  # stamped with the PS's time
    spec = loaded[-1].spec
    assert spec == ModelSpec.from_feature_config(CONFIG, "fm")
    # the newest export equals a model written now from its version's weights: the store's
    # weights at the end are at least as new, and with an export at the last batch equal
    rows = np.zeros((1, spec.width), np.float32)
    occ = np.zeros((2, 1), np.int32)
    dense = np.ones((1, spec.dense_dim), np.float32)
    if loaded[-1].version == version:
        np.testing.assert_allclose(loaded[-1].logits(rows, occ, dense),
                                   DenseModule(spec, params).logits(rows, occ, dense),
                                   rtol=1e-6)
    assert loaded[0].logits(rows, occ, dense) != loaded[-1].logits(rows, occ, dense)


# --------------------------------------------------------------------------- the API


def test_scores_are_the_models_with_the_stores_rows_ranked_and_logged(tmp_path):
    store_url = f"memory://serve-{tmp_path.name}"
    spec, scorer, server = make_server(tmp_path, store_url, "deepfm", log_in_process=False)
    try:
        client = Client(server.url)
        store = open_store(store_url, num_shards=2)
        req = request(12, top_k=5, request_id="req-1")
        req["candidates"][3]["true_ctr"] = 0.25
        # no rows published yet: every row reads as its initial value (zeros)
        status, answer = client.score(req)
        assert status == 200, answer
        initial = expected_probs(spec, req, store, Model(spec).initial_dense_params())
        assert answer["params"]["rows_found"] == 0 and answer["params"]["model_version"] == -1
        by_item = {it["item_id"]: it["score"] for it in answer["items"]}
        for j, c in enumerate(req["candidates"]):
            if c["item_id"] in by_item:
                assert by_item[c["item_id"]] == pytest.approx(float(initial[j]), rel=1e-5)
        # rows published for half of the fids: those are read, the others stay initial
        rng = np.random.default_rng(1)
        fids = request_fids(req)
        write_rows(store, spec, fids[::2], rng)
        req["ts_ms"] = T0 + 1000
        status, answer = client.score(req)
        assert status == 200
        probs = expected_probs(spec, req, store, Model(spec).initial_dense_params())
        order = np.argsort(-probs, kind="stable")[:5]
        assert [it["item_id"] for it in answer["items"]] == \
            [req["candidates"][j]["item_id"] for j in order]
        np.testing.assert_allclose([it["score"] for it in answer["items"]], probs[order],
                                   rtol=1e-5)
        assert 0 < answer["params"]["rows_found"] < answer["params"]["rows_read"]
        assert [it["request_id"] for it in answer["items"]] == [f"req-1-{j}" for j in order]
        # the feature log holds the served items with the scores returned
        assert client.call("POST", "/flush", {})[0] == 200
        logged = [r for p in sorted((tmp_path / "feature_log").glob("part-*.avro"))
                  for r in read_avro(str(p))]
        assert len(logged) == 10
        last = {r["request_id"]: r for r in logged[5:]}
        for it in answer["items"]:
            r = last[it["request_id"]]
            assert r["served_score"] == it["score"] and r["ts_ms"] == T0 + 1000
            assert r["features"]["category"] and r["user_id"] == "u1"
        assert {r["true_ctr"] for r in logged} <= {None, 0.25}
        status, stats = client.call("GET", "/stats")
        assert stats["requests"] == 2 and stats["served"] == 10
    finally:
        server.stop()


@pytest.mark.parametrize("body, status, reason", [
    (b"{not json", 400, "bad_json"),
    ([1, 2], 400, "not_an_object"),
    ({"context": CONTEXT, "candidates": [candidate(0)]}, 400, "missing_field:user_id"),
    ({"user_id": "u1", "context": CONTEXT}, 400, "missing_field:candidates"),
    ({"user_id": "u1", "context": CONTEXT, "candidates": []}, 400, "no_candidates"),
    ({"user_id": "u1", "context": CONTEXT, "candidates": [candidate(0)] * 30}, 400,
     "too_many_candidates"),
    ({"user_id": "u1", "context": CONTEXT, "candidates": [{"item_id": "i1"}]}, 400,
     "missing_field:category"),
    ({"user_id": "u1", "context": {**CONTEXT, "age": [1, 2]}, "candidates": [candidate(0)]},
     400, "wrong_type:context.age"),
    ({"user_id": "u1", "context": {**CONTEXT, "age": "old"}, "candidates": [candidate(0)]},
     400, "wrong_type:age"),
    ({"user_id": "u1", "context": CONTEXT, "candidates": [candidate(0)], "top_k": 0}, 400,
     "wrong_type:top_k"),
    ({"user_id": "u1", "ts_ms": -5, "context": CONTEXT, "candidates": [candidate(0)]}, 400,
     "wrong_type:ts_ms"),
    ({"user_id": "u1", "context": CONTEXT, "candidates": [candidate(0, true_ctr=2.0)]}, 400,
     "wrong_type:candidates[0].true_ctr"),
])
def test_bad_requests_get_4xx_with_a_reason(tmp_path, body, status, reason):
    spec, scorer, server = make_server(tmp_path, f"memory://bad-{tmp_path.name}", "fm",
                                       max_candidates=20)
    try:
        client = Client(server.url)
        raw = body if isinstance(body, bytes) else None
        got, answer = client.call("POST", "/score", None if raw else body, raw=raw)
        assert got == status, answer
        assert answer["error"] == reason, answer
        assert answer["detail"]
        # a bad request moves nothing: the next good one is served and logged as usual
        got, ok = client.score(request(3))
        assert got == 200 and ok["ts_ms"] == T0
    finally:
        server.stop()


def test_unknown_paths_and_methods(tmp_path):
    spec, scorer, server = make_server(tmp_path, f"memory://paths-{tmp_path.name}", "fm")
    try:
        client = Client(server.url)
        assert client.call("GET", "/nope")[0] == 404
        assert client.call("POST", "/nope", {})[0] == 404
        status, health = client.call("GET", "/healthz")
        assert status == 200 and health["model_version"] == -1 and health["store"] == "ok"
    finally:
        server.stop()


# --------------------------------------------------------------------------- hot reload


def wait_for(predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_model_hot_reload_keeps_the_last_good_model(tmp_path):
    models = tmp_path / "models"
    store_url = f"memory://reload-{tmp_path.name}"
    spec, scorer, server = make_server(tmp_path, store_url, "deepfm", model_dir=str(models))
    try:
        client = Client(server.url)
        store = open_store(store_url, num_shards=2)
        write_rows(store, spec, request_fids(request()), np.random.default_rng(2))
        initial = Model(spec).initial_dense_params()
        status, before = client.score(request())
        assert status == 200 and before["params"]["model_version"] == -1
        # training publishes a model: serving switches to it without a restart
        rng = np.random.default_rng(3)
        trained = {k: (v + rng.normal(0, 0.2, v.shape)).astype(np.float32)
                   for k, v in initial.items()}
        write_model(str(models), spec, trained, version=10, ts_ms=T0 - 60_000)
        wait_for(lambda: client.call("GET", "/healthz")[1]["model_version"] == 10)
        status, after = client.score(request())
        assert after["params"]["model_version"] == 10
        assert after["params"]["dense_age_ms"] == 60_000
        expected = expected_probs(spec, request(), store, trained)
        scores = {it["item_id"]: it["score"] for it in after["items"]}
        for j, c in enumerate(request()["candidates"]):
            assert scores[c["item_id"]] == pytest.approx(float(expected[j]), rel=1e-5)
        assert scores != {it["item_id"]: it["score"] for it in before["items"]}
        # a newer model that cannot be loaded: serving keeps version 10
        # (built aside and renamed into place, as write_model does: serving polls meanwhile)
        staging = tmp_path / "broken-model"
        shutil.copytree(latest_model(str(models)), staging)
        (staging / "saved_model.pb").write_bytes(b"garbage")
        staging.rename(models / f"{T0:015d}-v{11:010d}")
        wait_for(lambda: scorer.counters["model_load_errors"] == 1)
        status, kept = client.score(request())
        assert status == 200 and kept["params"]["model_version"] == 10
        assert [it["score"] for it in kept["items"]] == [it["score"] for it in after["items"]]
        # a model of another spec (another model kind) is refused too
        other = ModelSpec.from_feature_config(CONFIG, "fm")
        write_model(str(models), other, Model(other).initial_dense_params(), 12, T0)
        wait_for(lambda: scorer.counters["model_load_errors"] == 2)
        assert client.call("GET", "/healthz")[1]["model_version"] == 10
        # and the next good one is loaded
        write_model(str(models), spec, initial, version=13, ts_ms=T0 + 1)
        wait_for(lambda: client.call("GET", "/healthz")[1]["model_version"] == 13)
    finally:
        server.stop()


# --------------------------------------------------------------------------- store down


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server this test may kill (the session's shared one must stay up)."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "redis did not start"
            time.sleep(0.05)
    yield proc, f"redis://127.0.0.1:{port}/0"
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.redis
def test_serving_goes_on_with_the_last_good_rows_while_the_store_is_down(tmp_path, own_redis):
    proc, url = own_redis
    spec, scorer, server = make_server(tmp_path, url, "fm", store_retry_s=0.2)
    try:
        client = Client(server.url)
        store = open_store(url, num_shards=2)
        write_rows(store, spec, request_fids(request()), np.random.default_rng(4))
        expected = expected_probs(spec, request(), store, Model(spec).initial_dense_params())
        status, up = client.score(request())
        assert status == 200 and up["params"]["store"] == "ok"
        assert up["params"]["rows_found"] == up["params"]["rows_read"] > 0
        proc.kill()
        proc.wait()
        started = time.monotonic()
        status, down = client.score(request())
        assert status == 200, down
        assert time.monotonic() - started < 5  # short socket timeouts, no hang
        assert down["params"]["store"] == "unavailable"
        assert [it["score"] for it in down["items"]] == [it["score"] for it in up["items"]]
        scores = {it["item_id"]: it["score"] for it in down["items"]}
        for j, c in enumerate(request()["candidates"]):
            assert scores[c["item_id"]] == pytest.approx(float(expected[j]), rel=1e-5)
        # a user never seen before: their rows are not in the local copy either -> initial
        other = request()
        other["user_id"] = "u-new"
        status, answer = client.score(other)
        assert status == 200 and answer["params"]["rows_found"] < down["params"]["rows_found"]
        assert scorer.counters["store_errors"] >= 1
    finally:
        server.stop()


# --------------------------------------------------------------------------- extraction


def test_request_extractor_makes_the_pipelines_fids(tmp_path):
    """Context slots once per request, the rest per candidate: every candidate's fids and
    dense inputs are extract()'s on its merged record (in the same slot order once
    Model.index has ordered them), also when candidates override context fields or have
    different fields."""
    spec = ModelSpec.from_feature_config(CONFIG, "fm")
    scorer = Scorer(CONFIG, spec, f"memory://extract-{tmp_path.name}", num_shards=2)
    model = Model(spec)
    rng = np.random.default_rng(3)
    for trial in range(20):
        req = request(int(rng.integers(1, 12)), request_id=f"q{trial}")
        for c in req["candidates"]:
            if rng.random() < 0.3:
                c["features"]["device"] = "android"      # overrides the context's
            if rng.random() < 0.3:
                c["features"]["hour"] = 23               # another context override
            if rng.random() < 0.2:
                c["features"]["tags"] = [f"t{k}" for k in range(int(rng.integers(0, 4)))]
        if trial % 2:
            req["context"]["category"] = "c9"            # a candidate field in the context
            del req["candidates"][0]["features"]["category"]
        records, _, _, _, _, context, fields = scorer.parser.parse(req)
        fids, splits, dense = scorer.extractor(records, context, fields)
        pipeline = [extract(r, CONFIG) for r in records]
        assert splits[-1] == len(fids)
        for j, want in enumerate(pipeline):
            assert sorted(fids[splits[j]:splits[j + 1]].tolist()) == sorted(want["fids"])
            np.testing.assert_allclose(dense[j], want["dense"], rtol=1e-6)
        n = len(records)
        ours = model.index(ExampleBatch(
            fids=fids, row_splits=splits, dense=dense, label=np.zeros(n, np.float32),
            weight=np.ones(n, np.float32), ts_ms=np.zeros(n, np.int64),
            true_ctr=np.zeros(n, np.float32)))
        theirs = model.index(ExampleBatch.from_examples(
            [{**out, "label": 0} for out in pipeline], spec.dense_dim))
        np.testing.assert_array_equal(ours.keys[ours.unique_of_occurrence],
                                      theirs.keys[theirs.unique_of_occurrence])
        np.testing.assert_array_equal(ours.segment, theirs.segment)
    # a required context field missing: the pipeline's reason
    req = request(3)
    del req["context"]["gender"]
    records, _, _, _, _, context, fields = scorer.parser.parse(req)
    with pytest.raises(BadRequest, match="missing_field:gender"):
        scorer.extractor(records, context, fields)


def test_log_odds_correction_of_negative_sampling(tmp_path):
    """A model trained on negatives kept at rate r without their weights scores odds 1/r too
    high: serving adds log(r) to the logit (transforms.joiner.log_odds_correction)."""
    from transforms.joiner import corrected_ctr
    store_url = f"memory://correction-{tmp_path.name}"
    store = open_store(store_url, num_shards=2)
    spec = ModelSpec.from_feature_config(CONFIG, "fm")
    write_rows(store, spec, request_fids(request()), np.random.default_rng(5))
    answers = {}
    for rate in (1.0, 0.25):
        (tmp_path / str(rate)).mkdir()
        _, _, server = make_server(tmp_path / str(rate), store_url, "fm",
                                   score_correction_rate=rate)
        try:
            status, answer = Client(server.url).score(request())
            assert status == 200
            answers[rate] = {it["item_id"]: it["score"] for it in answer["items"]}
        finally:
            server.stop()
    for item, p in answers[1.0].items():
        assert answers[0.25][item] == pytest.approx(corrected_ctr(p, 0.25), rel=1e-5)
    with pytest.raises(ValueError, match="score_correction_rate"):
        Scorer(CONFIG, spec, store_url, num_shards=2, score_correction_rate=0.0)
