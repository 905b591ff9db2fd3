"""Running a pipeline the same way from every CLI: build, run, wait, report metrics."""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import sys
import threading
from typing import Callable

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from dataflow.options import MonolithOptions

_LOG = logging.getLogger(__name__)


def metrics_dict(result) -> dict:
    """Committed counters and distributions of a finished pipeline, by metric name."""
    out: dict = {"counters": {}, "distributions": {}}
    try:
        queried = _query_metrics(result)
    except (NotImplementedError, AttributeError):  # runners without metrics
        return out
    for c in queried.get("counters", []):
        name = f"{c.key.metric.namespace}.{c.key.metric.name}"
        out["counters"][name] = out["counters"].get(name, 0) + (c.committed or 0)
    for d in queried.get("distributions", []):
        name = f"{d.key.metric.namespace}.{d.key.metric.name}"
        r = d.committed
        if r is None:
            continue
        out["distributions"][name] = {"count": r.count, "sum": r.sum, "min": r.min,
                                      "max": r.max}
    return out


def _query_metrics(result):
    try:
        return result.metrics().query(MetricsFilter())
    except RecursionError:
        # Beam 2.62's monitoring_infos.consolidate recurses once per monitoring info: a long
        # streaming run on the FnApiRunner (many SDF bundles) passes the default limit.
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(max(limit, 1_000_000))
        threading.stack_size(512 * 1024 * 1024)
        try:
            box: dict = {}
            worker = threading.Thread(
                target=lambda: box.update(r=result.metrics().query(MetricsFilter())))
            worker.start()
            worker.join()
            return box["r"]
        finally:
            sys.setrecursionlimit(limit)
            threading.stack_size(0)


def _cancel_on_remote_flink(options: PipelineOptions) -> None:
    """Cancelling through Beam leaves a job on a remote Flink cluster running: cancel it there."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    master = options.get_all_options().get("flink_master") or ""
    name = options.view_as(GoogleCloudOptions).job_name
    if master and not master.startswith("[") and name:
        from dataflow.flink import cancel_jobs_named
        _LOG.info("cancelled Flink jobs %s", cancel_jobs_named(master, name))


def run_job(build: Callable[[beam.Pipeline], None], options: PipelineOptions,
            finished: Callable[[], bool] | None = None, poll_s: float = 1.0,
            stop: Callable[[], None] | None = None):
    """Build with ``build(pipeline)``, run to completion, write metrics if asked; -> result.

    ``finished``: for a job that stays up after its input ended (a checkpointed Flink job
    keeps its sources alive), a check that its work is done; the job is then cancelled, or
    ended by ``stop()`` if given (e.g. with a savepoint).
    """
    with _startup_heap_frozen() as built:
        pipeline = beam.Pipeline(options=options)
        build(pipeline)
        built()
        return _run(pipeline, options, finished, poll_s, stop)


@contextlib.contextmanager
def _startup_heap_frozen():
    """Collect no garbage while the job starts, then exempt what it made from collection.

    A job's start (TensorFlow's import in the pipeline's construction: about half a million
    long-lived objects) set off five full garbage collections in a DirectRunner backfill of
    100k examples, each rescanning every object alive (0.15-0.35 s each, 1.0-1.25 s of a
    5-8 s job), and later ones rescan the same modules again. So: one collection of what is
    garbage before the job (about 0.1 s before TensorFlow is loaded; a previous job's garbage
    is not kept for this one's life), none while building, then ``built()`` freezes
    everything alive (:func:`gc.freeze`: collections skip it) until the job ends. Does
    nothing if the caller pauses or freezes the collector itself.
    """
    if not gc.isenabled() or gc.get_freeze_count():
        yield lambda: None
        return
    gc.collect()
    gc.disable()

    def built():
        if not gc.isenabled():
            gc.freeze()
            gc.enable()
    try:
        yield built
    finally:
        gc.enable()
        gc.unfreeze()


def _run(pipeline: beam.Pipeline, options: PipelineOptions, finished, poll_s, stop):
    result = pipeline.run()
    if finished is None:
        result.wait_until_finish()
    else:
        import time

        from apache_beam.runners.runner import PipelineState
        # Poll the state (wait_until_finish with a duration, called again and again, breaks
        # the portable runner's message stream).
        cancelled = False
        while not PipelineState.is_terminal(result.state):
            if finished():
                if stop is not None:
                    stop()
                    break
                _LOG.info("the job's end-of-input work is done: cancelling it")
                result.cancel()
                _cancel_on_remote_flink(options)
                cancelled = True
                break
            time.sleep(poll_s)
        try:
            result.wait_until_finish()
        except RuntimeError:
            if not (cancelled and result.state == PipelineState.CANCELLED):
                raise
    metrics = metrics_dict(result)
    out = options.view_as(MonolithOptions).metrics_out
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
    _LOG.info("pipeline finished: %s", json.dumps(metrics["counters"], sort_keys=True))
    return result
