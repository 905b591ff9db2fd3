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

from dataflow.options import MonolithOptions, our_overrides_accepted
from schemas import strict_json

_LOG = logging.getLogger(__name__)


def metrics_dict(result) -> dict:
    """The metrics of a finished pipeline.

    Args:
        result: its ``PipelineResult``.

    Returns:
        ``{"counters": {"namespace.name": value}, "distributions": {"namespace.name":
        {"count", "sum", "min", "max"}}}`` of the committed values (empty on a runner
        without metrics).
    """
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
        # The same name from several steps (or subtasks) is one distribution: merged.
        seen = out["distributions"].get(name)
        if seen is None or not seen["count"]:
            out["distributions"][name] = {"count": r.count, "sum": r.sum, "min": r.min,
                                          "max": r.max}
        elif r.count:
            out["distributions"][name] = {
                "count": seen["count"] + r.count, "sum": seen["sum"] + r.sum,
                "min": min(seen["min"], r.min), "max": max(seen["max"], r.max)}
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


def _stop_on_flink(result, options: PipelineOptions, runner) -> bool:
    """End a Flink job that stays up after its input (checkpointing keeps its sources alive)
    so that it keeps its metrics: stopped with a throwaway savepoint through Flink's REST API,
    it ends FINISHED and Beam's job server reads its metrics as for a job that ended by
    itself; cancelled, it reports none (the job server has no metrics of a running or
    cancelled job). False where that is not possible (not Flink, REST API unknown, the stop
    failed): then cancel."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    from apache_beam.runners.runner import PipelineState
    # the runner, not --runner: Beam's portable runner clears that option when it runs a job
    if not any(c.__name__ == "FlinkRunner" for c in type(runner).__mro__):
        return False
    from dataflow import flink
    all_options = options.get_all_options(retain_unknown_options=True)
    master = flink.rest_address(all_options)
    if master is None:
        _LOG.warning("no REST address for the Flink job (--flink_master=%s without a "
                     "rest.bind-port in --flink_conf_dir): it is cancelled and its metrics "
                     "are lost", all_options.get("flink_master"))
        return False
    name = options.view_as(GoogleCloudOptions).job_name
    try:
        running = flink.jobs_named(master, name)
        if len(running) != 1:
            _LOG.warning("expected one job named %s on %s, found %s: cancelling it",
                         name, master, running)
            return False
        _LOG.info("the job's end-of-input work is done: stopping it with a savepoint")
        return flink.stop_job(master, running[0],
                              lambda: PipelineState.is_terminal(result.state))
    except OSError as e:  # REST API unreachable
        _LOG.warning("could not stop the Flink job through %s (%s): cancelling", master, e)
        return False


def _cancel_on_remote_flink(options: PipelineOptions) -> None:
    """Cancelling through Beam leaves a job on a remote Flink cluster running: cancel it there."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    master = options.get_all_options(retain_unknown_options=True).get("flink_master") or ""
    name = options.view_as(GoogleCloudOptions).job_name
    if master and not master.startswith("[") and name:
        from dataflow.flink import cancel_jobs_named
        _LOG.info("cancelled Flink jobs %s", cancel_jobs_named(master, name))


def run_job(build: Callable[[beam.Pipeline], None], options: PipelineOptions,
            finished: Callable[[], bool] | None = None, poll_s: float = 1.0,
            stop: Callable[[], None] | None = None, freeze_startup_heap: bool = False):
    """Builds a pipeline, runs it to completion and writes its metrics if asked
    (``--metrics_out``).

    Args:
        build: ``build(pipeline)`` adds the job's transforms.
        options: the ``PipelineOptions``.
        finished: for a job that stays up after its input ended (a checkpointed Flink job
            keeps its sources alive), a check that its work is done; the job is then ended
            by ``stop()`` if given (e.g. with a savepoint), else on Flink stopped with a
            throwaway savepoint so that it keeps its metrics (:func:`_stop_on_flink`), else
            cancelled.
        poll_s: how often ``finished`` is asked.
        stop: ends the job once ``finished``.
        freeze_startup_heap: the command lines' choice (it changes the garbage collector
            for the job's life; see :func:`_startup_heap_frozen`: 1.0-1.25 s of a 5-8 s
            backfill).

    Returns:
        The ``PipelineResult``.

    >>> from apache_beam.metrics import Metrics
    >>> from dataflow.options import pipeline_options
    >>> def build(pipeline):
    ...     seen = Metrics.counter("doc", "seen")
    ...     _ = pipeline | beam.Create([1, 2, 3]) | beam.Map(lambda x: seen.inc())
    >>> metrics_dict(run_job(build, pipeline_options([])))["counters"]
    {'doc.seen': 3}
    """
    frozen = _startup_heap_frozen() if freeze_startup_heap else contextlib.nullcontext(
        lambda: None)
    with frozen as built:
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
    with our_overrides_accepted():
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
                if _stop_on_flink(result, options, pipeline.runner):
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
            strict_json.dump(metrics, f, indent=2, sort_keys=True)
    # every counter: a long line, for --verbose (and --metrics_out writes them all)
    _LOG.debug("pipeline finished: %s", json.dumps(metrics["counters"], sort_keys=True))
    return result
