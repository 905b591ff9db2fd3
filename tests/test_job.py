"""dataflow.job: ``run_job`` and the garbage collector while a job starts and runs, and after;
``metrics_dict``."""
from __future__ import annotations

import gc
import json

import apache_beam as beam
import pytest

from dataflow.job import metrics_dict, run_job
from dataflow.options import pipeline_options


class _Cycle:
    def __init__(self):
        self.me = self


def _job(seen: dict, path):
    """A build that records the collector's state while building, and in a running DoFn (in
    ``path``: the runner runs a copy of the DoFn)."""
    def record(x):
        with open(path, "w", encoding="utf-8") as f:
            json.dump([gc.isenabled(), gc.get_freeze_count()], f)
        return x

    def build(pipeline):
        seen["building"] = (gc.isenabled(), gc.get_freeze_count())
        pipeline | beam.Create([1, 2, 3]) | beam.Map(record)
    return build


def _running(path) -> tuple:
    with open(path, encoding="utf-8") as f:
        return tuple(json.load(f))


@pytest.fixture
def collector():
    """Restores the collector's state whatever a test does to it."""
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_no_collection_while_building_then_startup_frozen_then_restored(tmp_path, collector):
    gc.enable()
    gc.unfreeze()
    metrics_out = tmp_path / "metrics.json"
    seen: dict = {}
    run_job(_job(seen, tmp_path / "running.json"),
            pipeline_options(["--runner=DirectRunner", f"--metrics_out={metrics_out}"]),
            freeze_startup_heap=True)
    assert seen["building"] == (False, 0)      # paused while the job starts
    enabled, frozen = _running(tmp_path / "running.json")
    assert enabled and frozen > 10_000         # running: collecting, start-up objects frozen
    assert gc.isenabled() and gc.get_freeze_count() == 0  # as before the job
    assert "counters" in json.loads(metrics_out.read_text())  # the job's end still ran


def test_garbage_from_before_the_job_is_collected_not_frozen(collector):
    gc.enable()
    gc.unfreeze()
    gc.collect()
    garbage = _Cycle()
    garbage_id = id(garbage)
    del garbage  # a reference cycle: only the collector frees it
    seen: dict = {}

    def build(pipeline):
        seen["alive"] = any(id(o) == garbage_id for o in gc.get_objects()
                            if isinstance(o, _Cycle))
        pipeline | beam.Create([1])
    run_job(build, pipeline_options(["--runner=DirectRunner"]), freeze_startup_heap=True)
    assert seen["alive"] is False


def test_a_caller_managing_the_collector_is_left_alone(tmp_path, collector):
    running = tmp_path / "running.json"
    gc.enable()
    gc.freeze()
    frozen = gc.get_freeze_count()
    seen: dict = {}
    run_job(_job(seen, running), pipeline_options(["--runner=DirectRunner"]),
            freeze_startup_heap=True)
    # collecting all along, and only the caller's objects frozen (some of them freed since)
    for enabled, count in (seen["building"], _running(running),
                           (gc.isenabled(), gc.get_freeze_count())):
        assert enabled and frozen * 0.9 < count <= frozen

    gc.unfreeze()
    gc.disable()
    seen = {}
    run_job(_job(seen, running), pipeline_options(["--runner=DirectRunner"]),
            freeze_startup_heap=True)
    assert seen["building"] == (False, 0) and _running(running) == (False, 0)
    assert not gc.isenabled()


def test_a_failed_build_restores_the_collector(collector):
    gc.enable()
    gc.unfreeze()

    def build(pipeline):
        raise ValueError("bad flags")
    with pytest.raises(ValueError, match="bad flags"):
        run_job(build, pipeline_options(["--runner=DirectRunner"]), freeze_startup_heap=True)
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_by_default_the_collector_is_left_alone(tmp_path, collector):
    """Freezing is the command lines' explicit choice, not a library default."""
    gc.enable()
    gc.unfreeze()
    seen: dict = {}
    run_job(_job(seen, tmp_path / "running.json"), pipeline_options(["--runner=DirectRunner"]))
    assert seen["building"] == (True, 0) and _running(tmp_path / "running.json") == (True, 0)


def test_where_the_driver_reaches_a_flink_job_to_stop_it(tmp_path):
    """A checkpointed Flink job that the driver ends is stopped through Flink's REST API
    (cancelled, it loses its metrics): a cluster's is its --flink_master; the embedded
    MiniCluster's is the rest.bind-port that dataflow.train puts in its --flink_conf_dir."""
    from dataflow import flink, train
    assert flink.rest_address({"flink_master": "http://host:8081/"}) == "host:8081"
    assert flink.rest_address({"flink_master": "localhost:8082"}) == "localhost:8082"
    conf = flink.local_rest_conf_dir(port=12345)
    assert flink.rest_address({"flink_master": "[local]", "flink_conf_dir": conf}) \
        == "localhost:12345"
    assert flink.LOW_LATENCY_CONF in open(f"{conf}/config.yaml", encoding="utf-8").read()
    # no port known: the driver cancels (with a warning)
    assert flink.rest_address({"flink_master": "[local]",
                               "flink_conf_dir": flink.low_latency_conf_dir()}) is None
    assert flink.rest_address({"flink_master": "[auto]"}) is None
    assert train._embedded_flink(["--runner=FlinkRunner"])
    assert train._embedded_flink(["--flink_master=[local]"])
    assert not train._embedded_flink(["--flink_master", "localhost:8081"])


def test_metrics_dict_merges_a_distribution_that_several_steps_update():
    from apache_beam.metrics import Metrics

    def observe(x):
        Metrics.distribution("test", "size").update(x)
        Metrics.counter("test", "seen").inc()
        return x
    p = beam.Pipeline(options=pipeline_options(["--runner=DirectRunner"]))
    _ = p | "A" >> beam.Create([1, 2, 3]) | "ObserveA" >> beam.Map(observe)
    _ = p | "B" >> beam.Create([10, 20]) | "ObserveB" >> beam.Map(observe)
    result = p.run()
    result.wait_until_finish()
    got = metrics_dict(result)
    assert got["counters"]["test.seen"] == 5
    assert got["distributions"]["test.size"] == {"count": 5, "sum": 36, "min": 1, "max": 20}
