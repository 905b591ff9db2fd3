"""A model of your own, plugged in without editing the library: a DCN-style cross network
(``examples/cross_network.py``) trained through ``TrainOnline`` on the DirectRunner, exported,
and served by ``dataflow.serve`` from its SavedModel."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dataflow import data, join
from dataflow.serving.http_server import Server
from dataflow.serving.scorer import Scorer
from dataflow.job import run_job
from dataflow.options import pipeline_options
from examples.cross_network import CrossNetwork
from ps.store import open_store
from schemas.feature_config import FeatureConfig
from transforms.example_batch import ExampleBatch
from transforms.example_reader import ReadExampleBatches
from transforms.export import list_models, load_model
from transforms.features import extract
from transforms.model import Model, ModelSpec
from transforms.train import (MetricsConfig, ModelExport, SparseConfig, TrainOnline,
                              TrainResult)

CONFIG = FeatureConfig.load("synthetic")


@pytest.mark.slow
def test_a_cross_network_trains_through_train_online_and_serves(tmp_path):
    data.synth(str(tmp_path / "logs"), requests=6000, users=60, items=80, days=0.5, seed=4)
    join.main([f"--features={tmp_path}/logs/feature_log/*.avro",
               f"--actions={tmp_path}/logs/action_log/*.avro", f"--out={tmp_path}/joined",
               "--config=synthetic", "--period_s=1800"])
    spec = ModelSpec.from_feature_config(CONFIG, CrossNetwork(layers=2))
    assert {"cross/w0", "cross/b1", "cross/out"} <= set(spec.dense_param_shapes())
    store = f"memory://custom-{tmp_path.name}"
    models = tmp_path / "models"
    result = {}

    def build(p):
        train = TrainOnline(spec, store,
                            sparse=SparseConfig(num_shards=2, learning_rate=0.05,
                                                slots=SparseConfig.slots_of(CONFIG)),
                            metrics=MetricsConfig(window_s=3600,
                                                  out_prefix=f"{tmp_path}/online"),
                            export=ModelExport(str(models), interval_s=1800, keep=2))
        result["out"] = (p | ReadExampleBatches(f"{tmp_path}/joined/examples/*.avro", 64,
                                                spec.dense_dim)
                         | train)

    run_job(build, pipeline_options([]))
    assert isinstance(result["out"], TrainResult)
    totals = json.loads((tmp_path / "online-totals.json").read_text())
    assert totals["examples"] > 5000
    assert totals["auc"] > 0.6, totals  # it learns (the stream's Bayes AUC is ~0.75)

    paths = list_models(str(models))
    assert len(paths) == 2
    loaded = load_model(paths[-1])
    assert loaded.spec == spec and loaded.spec.model == CrossNetwork(layers=2)

    # dataflow.serve scores with the exported graph and the store's rows
    scorer = Scorer(CONFIG, spec, store, num_shards=2, model_dir=str(models))
    server = Server(scorer, port=0, poll_s=0.05).start()
    try:
        import http.client
        host, port = server.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        ts_ms = loaded.ts_ms + 1000
        context = {"gender": "f", "age": 31, "region": "r1", "device": "ios",
                   "network": "wifi", "hour": 9}
        candidates = [{"item_id": f"i{j}",
                       "features": {"category": f"c{j % 5}", "creator": f"a{j % 3}",
                                    "tags": [f"c{j % 5}.t1"], "duration_s": 10.0 + j,
                                    "item_age_hours": 0.5 * j}} for j in range(8)]
        body = {"user_id": "u3", "ts_ms": ts_ms, "context": context,
                "candidates": candidates, "top_k": 8}
        conn.request("POST", "/score", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        assert answer["params"]["model_version"] == loaded.version
        # the served scores are the exported model's on the store's rows
        examples = []
        for c in candidates:
            out = extract({"request_id": "x", "ts_ms": ts_ms, "user_id": "u3",
                           "item_id": c["item_id"], "features": {**context, **c["features"]}},
                          CONFIG)
            examples.append({"fids": out["fids"], "dense": out["dense"], "label": 0,
                             "ts_ms": ts_ms})
        batch = ExampleBatch.from_examples(examples, spec.dense_dim)
        model = Model(spec)
        index = model.index(batch)
        rows, found = open_store(store, num_shards=2).read_rows(spec.table, index.keys,
                                                                spec.width)
        assert found.any()
        gathered = model.gather(batch, {spec.table: (index.keys, rows)}, index)
        occurrences = np.stack([gathered.row_of_occurrence, gathered.segment])
        want = 1 / (1 + np.exp(-loaded.logits(rows, occurrences, batch.dense)))
        by_item = {it["item_id"]: it["score"] for it in answer["items"]}
        np.testing.assert_allclose([by_item[c["item_id"]] for c in candidates], want,
                                   rtol=1e-4)
    finally:
        server.stop()


def test_the_cli_takes_a_model_of_your_own(tmp_path):
    """``--model package.module:Class`` plugs the same model into ``dataflow.train``."""
    from dataflow import train
    data.synth(str(tmp_path / "logs"), requests=1500, users=30, items=40, days=0.25, seed=1)
    join.main([f"--features={tmp_path}/logs/feature_log/*.avro",
               f"--actions={tmp_path}/logs/action_log/*.avro", f"--out={tmp_path}/joined",
               "--config=synthetic"])
    train.main(["backfill", f"--input={tmp_path}/joined/examples/*.avro", "--config=synthetic",
                "--model=examples.cross_network:CrossNetwork", "--batch_size=64",
                f"--store=memory://cli-custom-{tmp_path.name}",
                f"--metrics_dir={tmp_path}/metrics", f"--model_dir={tmp_path}/models",
                "--model_export_interval_s=3600"])
    totals = json.loads((tmp_path / "metrics" / "online-backfill-totals.json").read_text())
    assert totals["examples"] > 1000
    assert load_model(list_models(str(tmp_path / "models"))[-1]).spec.model == CrossNetwork()
    with pytest.raises(SystemExit, match="no_such_module"):
        train.main(["backfill", f"--input={tmp_path}/joined/examples/*.avro",
                    "--config=synthetic", "--model=no_such_module:Model",
                    f"--metrics_dir={tmp_path}/m2"])
