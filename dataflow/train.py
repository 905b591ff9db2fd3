"""Online training: worker → sharded parameter servers → ParameterStore → worker (DESIGN §1).

    python -m dataflow.train backfill --input 'examples/*.avro' --config CONFIG \\
        --export_dir snapshots/ [--model deepfm] [--store memory://train] [--runner ...]
    python -m dataflow.train online --input examples/ --restore snapshots/ --config CONFIG ...

    # on a Flink cluster, through a savepoint (docs/reliability.md):
    python -m dataflow.train backfill --input examples/ --savepoint_dir savepoints/ ... \\
        --runner=FlinkRunner --flink_master=HOST:PORT --streaming
    python -m dataflow.train online --input examples/ --savepoint_path savepoints/savepoint-… ...

The pipeline is ``ReadExampleBatches | TrainOnline`` (``transforms/train.py``: worker →
sharded PS → ParameterStore → worker, online metrics).
``backfill`` reads bounded example files and ends by exporting PS snapshots; ``online``
bootstraps empty shards from those snapshots and trains on files as they land in a folder.
"""
from __future__ import annotations

if __name__ == "__main__":  # output set up before Beam and TensorFlow load (dataflow.cli)
    from dataflow.pipelines import pipeline_main
    raise SystemExit(pipeline_main("train"))

import logging
import os
import sys
import time

import apache_beam as beam

from dataflow.job import run_job
from dataflow.options import (MonolithOptions, pipeline_options,
                              python_in_several_processes)
from transforms.scores import SCORE_COLUMNS

_LOG = logging.getLogger(__name__)

MODES = ("backfill", "online")
#: what ``python -m dataflow train`` takes, after the program's name
USAGE = f"{{{','.join(MODES)}}} --input INPUT --config CONFIG [options]"
#: where each run's metrics folder is made unless --metrics_dir names one
METRICS_ROOT = os.path.join("out", "train")


class TrainOptions(MonolithOptions):
    """The training pipeline's flags (``python -m dataflow train --help``).

    >>> opts = pipeline_options(["--input=out/join/examples/*.avro", "--config=synthetic",
    ...                          "--model=fm", "--metrics_dir=out/train/doc"],
    ...                         TrainOptions).view_as(TrainOptions)
    >>> opts.num_shards, opts.batch_size
    (2, 256)
    >>> training(opts, "backfill").spec.kind    # the TrainOnline they describe
    'fm'
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", help="required: the example log, a glob of Avro files "
                                            "(backfill) or a folder watched for new files "
                                            "(online), or a Kafka topic "
                                            "kafka://HOST:PORT/TOPIC (read to its end offsets "
                                            "in a backfill, followed online)")
        parser.add_argument("--config", help="required: feature config (YAML path or a name in "
                                             "schemas/configs): slots, dims, thresholds, expiry")
        parser.add_argument("--model", default="deepfm",
                            help="lr (logistic regression), fm (factorization machine), deepfm, "
                                 "or package.module:Class, a transforms.models.RankingModel "
                                 "of your own")
        parser.add_argument("--store", default="memory://train",
                            help="ParameterStore URL: memory://NAME or redis://HOST:PORT/DB")
        parser.add_argument("--num_shards", type=int, default=2, help="sparse PS shards")
        parser.add_argument("--num_workers", type=int, default=1,
                            help="data-parallel readers and workers, reader k reading shard "
                                 "files k, k+W, ... of every period (make the join's "
                                 "--shards_per_period a multiple of W); on Flink, one per "
                                 "subtask (--parallelism defaults to W) and a redis:// store")
        parser.add_argument("--batch_size", type=int, default=256,
                            help="the largest training batch: a batch never spans two periods of the "
                                 "example log (the join's --period_s), so on a sparse stream "
                                 "most are shorter; smaller batches learn more often "
                                 "(docs/pipelines.md, 'Batches end at period boundaries')")
        parser.add_argument("--optimizer", default="adagrad",
                            choices=["sgd", "adagrad", "ftrl", "adam"],
                            help="optimizer of the sparse rows (embeddings)")
        parser.add_argument("--learning_rate", type=float, default=0.05,
                            help="learning rate of the sparse rows")
        parser.add_argument("--dense_optimizer", default="adam",
                            choices=["sgd", "adagrad", "ftrl", "adam"],
                            help="optimizer of the dense weights")
        parser.add_argument("--dense_learning_rate", type=float, default=0.001,
                            help="learning rate of the dense weights")
        parser.add_argument("--sync_interval_s", type=float, default=0.0,
                            help="event-time seconds between sparse syncs to the store (0: every batch)")
        parser.add_argument("--dense_sync_interval_s", type=float, default=0.0,
                            help="event-time seconds between dense syncs / worker refreshes")
        parser.add_argument("--max_staleness_s", type=float, default=0.0,
                            help="Flink: after each reader checkpoint, wait until the PS has "
                                 "published the gradients of batches older than this (event-time "
                                 "seconds) before reading on; negative: never wait")
        parser.add_argument("--reader_checkpoint_s", type=float, default=0.05,
                            help="Flink: the reader ends its bundle at least this "
                                 "often (wall seconds), and as soon as its batches span more "
                                 "than --max_staleness_s of event time, so gradients flow to "
                                 "the PS as it reads")
        parser.add_argument("--staleness_timeout_s", type=float, default=30.0,
                            help="longest the reader waits for the PS before reading on")
        parser.add_argument("--metrics_window_s", type=int, default=3600,
                            help="event-time window of the online metrics")
        parser.add_argument("--metrics_dir", default=None,
                            help="where the online metrics go: online-MODE.csv, .png and "
                                 "-totals.json (default: a new folder per run, "
                                 f"{METRICS_ROOT}/MODE-YYYYmmdd-HHMMSS)")
        parser.add_argument("--scores_out", default=None,
                            help="also write every example's online score, label, weight, "
                                 "event time and true CTR into this folder: .npz files with "
                                 f"the arrays {', '.join(SCORE_COLUMNS)} "
                                 "(transforms.scores.read_scores reads them back)")
        parser.add_argument("--export_dir", default=None,
                            help="write PS snapshots here when the input ends (backfill; "
                                 "online: when --run_for_s is over)")
        parser.add_argument("--start_after_ms", type=int, default=None,
                            help="a Kafka input: read only examples later than this event "
                                 "time (ms); default online with --restore: where the "
                                 "restored PS ended")
        parser.add_argument("--restore", default=None,
                            help="online: bootstrap empty PS shards from these snapshots")
        parser.add_argument("--savepoint_dir", default=None,
                            help="backfill on a Flink cluster (batch, then online via a "
                                 "savepoint): read the --input folder with the online job's "
                                 "reader and, once every example there is trained on, stop "
                                 "the job with a savepoint in this folder; the online job "
                                 "resumes from it with --savepoint_path and reads on in the "
                                 "same folder")
        parser.add_argument("--poll_interval_s", type=float, default=5.0,
                            help="online: how often the input folder is listed for new files")
        parser.add_argument("--run_for_s", type=float, default=0.0,
                            help="online: stop watching the folder after this many seconds of "
                                 "wall time (0: run until cancelled)")
        parser.add_argument("--max_batch_wait_s", type=float, default=None,
                            help="online, Kafka input: a short batch is trained once its "
                                 "first example waited this many wall seconds at the end of "
                                 "the topic (default: never; batches then end at --batch_size "
                                 "or an hour's edge only, whenever examples come)")
        parser.add_argument("--stop_when_exists", default=None,
                            help="online: stop watching the folder once this file exists (its "
                                 "writer creates it after the last example file landed; "
                                 "every file that landed before it is trained on)")
        parser.add_argument("--seed", type=int, default=0,
                            help="seed of the initial weights")
        parser.add_argument("--model_dir", default=None,
                            help="export the dense model as a TensorFlow SavedModel into this "
                                 "folder every --model_export_interval_s of event time, for "
                                 "serving (python -m dataflow.serve)")
        parser.add_argument("--model_export_interval_s", type=float, default=60.0,
                            help="event-time seconds between SavedModel exports")
        parser.add_argument("--model_keep", type=int, default=3,
                            help="how many of the newest exported models to keep")


def training(opts: TrainOptions, mode: str):
    """The :class:`transforms.train.TrainOnline` that options describe (example:
    :class:`TrainOptions`).

    Args:
        opts: the :class:`TrainOptions`.
        mode: ``backfill`` or ``online``.

    Returns:
        The ``TrainOnline``.

    Raises:
        SystemExit: a value the training refuses.
    """
    from schemas.feature_config import load_feature_config
    from transforms.model import ModelSpec
    from transforms.train import (DenseConfig, MetricsConfig, ModelExport, Snapshots,
                                  SparseConfig, TrainOnline)

    config = load_feature_config(opts.config)
    try:
        spec = ModelSpec.from_feature_config(config, opts.model, opts.seed)
        return TrainOnline(
            spec, opts.store,
            sparse=SparseConfig(num_shards=opts.num_shards, optimizer=opts.optimizer,
                                learning_rate=opts.learning_rate,
                                sync_interval_s=opts.sync_interval_s,
                                slots=SparseConfig.slots_of(config)),
            dense=DenseConfig(optimizer=opts.dense_optimizer,
                              learning_rate=opts.dense_learning_rate,
                              sync_interval_s=opts.dense_sync_interval_s),
            metrics=MetricsConfig(window_s=opts.metrics_window_s,
                                  out_prefix=os.path.join(metrics_dir(opts, mode),
                                                          f"online-{mode}"),
                                  title=f"Online metrics, {mode} ({spec.kind})",
                                  scores_dir=opts.scores_out),
            snapshots=Snapshots(export_dir=opts.export_dir,
                                restore_dir=opts.restore if mode == "online" else None),
            export=(ModelExport(opts.model_dir, opts.model_export_interval_s, opts.model_keep)
                    if opts.model_dir else None),
            seed=opts.seed)
    except ValueError as e:
        raise SystemExit(f"train: {e}") from e


def stages_fused(options) -> bool:
    """Whether the runner fuses the reader, worker and PS into one stage (the DirectRunner:
    the reader needs no :class:`transforms.example_reader.Pacing`) or runs them
    concurrently (Flink, and any portable runner: it does).

    Args:
        options: the ``PipelineOptions``.

    Returns:
        True on the DirectRunner.

    >>> stages_fused(pipeline_options([])), stages_fused(pipeline_options(
    ...     ["--runner=PortableRunner", "--job_endpoint=localhost:8099"]))
    (True, False)
    """
    from apache_beam.options.pipeline_options import StandardOptions
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    name = runner if isinstance(runner, str) else type(runner).__name__
    return name.rsplit(".", 1)[-1] in ("DirectRunner", "BundleBasedDirectRunner")


def build(pipeline: beam.Pipeline, opts: TrainOptions, mode: str):
    """Adds the reader and :class:`transforms.train.TrainOnline` to a pipeline.

    Args:
        pipeline: the pipeline.
        opts: the :class:`TrainOptions`.
        mode: ``backfill`` or ``online``.

    Returns:
        The ``TrainResult``.
    """
    from transforms.example_reader import ReadExampleBatches

    train = training(opts, mode)
    os.makedirs(opts.metrics_dir, exist_ok=True)
    fused = stages_fused(pipeline.options)
    if fused and opts.num_workers > 1:
        raise SystemExit("train: --num_workers above 1 needs a runner that runs the readers "
                         "side by side (Flink); the DirectRunner would read one after the other")
    pacing = None if fused else train.pacing(
        opts.max_staleness_s, opts.reader_checkpoint_s, opts.staleness_timeout_s)
    parallelism = pipeline.options.get_all_options(retain_unknown_options=True).get(
        "parallelism")
    subtasks = parallelism if not fused and (parallelism or 0) > 0 else None
    follow = mode == "online" or bool(opts.savepoint_dir)
    stop_timestamp = (time.time() + opts.run_for_s) if opts.run_for_s else None
    if opts.input.startswith("kafka://"):
        from transforms.event_time_files import WriteEventTimeFiles
        from transforms.kafka_source import ReadExampleBatchesFromKafka, parse_kafka_url
        bootstrap, topic = parse_kafka_url(opts.input)
        batches, dead = pipeline | "ReadExamples" >> ReadExampleBatchesFromKafka(
            bootstrap, topic, opts.batch_size, train.spec.dense_dim, pacing=pacing,
            follow=follow, poll_interval_s=opts.poll_interval_s, stop_timestamp=stop_timestamp,
            subtasks=subtasks, start_after_ms=_start_after_ms(opts, mode),
            max_batch_wait_s=opts.max_batch_wait_s).with_dead_letters()
        _ = dead | "WriteDeadLetters" >> WriteEventTimeFiles(
            os.path.join(opts.metrics_dir, "dead_letter"))
        return batches | "Train" >> train
    return (pipeline
            | "ReadExamples" >> ReadExampleBatches(
                opts.input, opts.batch_size, train.spec.dense_dim, pacing=pacing,
                follow=follow, poll_interval_s=opts.poll_interval_s,
                stop_timestamp=stop_timestamp, stop_when_exists=opts.stop_when_exists,
                num_workers=opts.num_workers, subtasks=subtasks)
            | "Train" >> train)


def _start_after_ms(opts, mode: str):
    """Where a job on a Kafka topic starts: ``--start_after_ms``, or online with ``--restore``
    the event time the restored PS had trained up to (batch, then online: nothing trained
    twice, nothing skipped), else the topic's oldest example (None)."""
    if opts.start_after_ms is not None:
        return int(opts.start_after_ms)
    if mode != "online" or not opts.restore:
        return None
    import glob
    from ps.snapshot_files import read_snapshot
    dense = sorted(glob.glob(os.path.join(opts.restore, "dense-*.snap")))
    if not dense:
        raise SystemExit(f"train: --restore {opts.restore} has no dense snapshot (dense-*.snap) "
                         "to tell where the backfill ended; give --start_after_ms")
    after = max(int(read_snapshot(path)[0]["ts_ms"]) for path in dense)
    _LOG.info("train online: reading %s after event time %d ms (where the restored PS ended)",
              opts.input, after)
    return after


FLINK_BUNDLE_MS = 20


def main(argv: list[str] | None = None):
    """``python -m dataflow train``.

    Args:
        argv: the mode and flags (None: ``sys.argv[1:]``).

    Returns:
        The pipeline's result.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in MODES:
        raise SystemExit(f"usage: python -m dataflow train {USAGE} (see --help)")
    mode, argv = argv[0], argv[1:]
    # Flink's portable runner ends a bundle of a downstream stage after 1 s by default: that
    # is the round trip reader → worker → PS → store the reader waits for (bounded staleness).
    # Bundles finish before a checkpoint: otherwise Beam stores a bundle's pending outputs in
    # the checkpoint, and a job resumed from a savepoint re-emitted them on the wrong output
    # (sparse gradients reached the DenseShard).
    flink_defaults = {"max_bundle_time_mills": FLINK_BUNDLE_MS,
                      "finish_bundle_before_checkpointing": True}
    checkpointed = any(a.startswith("--checkpointing_interval") for a in argv)
    to_savepoint = mode == "backfill" and any(a.startswith("--savepoint_dir") for a in argv)
    if any(a.startswith("--runner=FlinkRunner") or a == "FlinkRunner" for a in argv):
        from dataflow.flink import local_rest_conf_dir, low_latency_conf_dir
        # no 100 ms buffering; a checkpointed job on the embedded MiniCluster also gets a
        # known REST port, through which dataflow.job stops it when its input is done (a
        # cancelled job loses its metrics)
        flink_defaults["flink_conf_dir"] = (
            local_rest_conf_dir() if checkpointed and _embedded_flink(argv)
            else low_latency_conf_dir())
    if not (checkpointed or to_savepoint):
        # Without checkpoints a finished source may shut down, and the job ends with its input.
        # With them it must stay (Flink 1.19 on Beam 2.62 fails every checkpoint once the
        # Impulse source has finished), so the job ends when its end-of-input work is done.
        flink_defaults["shutdown_sources_after_idle_ms"] = 0
    workers = _num_workers(argv)
    if workers > 1:
        flink_defaults["parallelism"] = workers  # a subtask per reader and worker
    if not any(a.startswith("--job_name") for a in argv):
        # a name the cluster's REST API can find the job by (dataflow.job cancels it there)
        flink_defaults["job_name"] = f"beam-monolith-train-{mode}-{os.getpid()}-{int(time.time())}"
    options = pipeline_options(argv, TrainOptions, flink_defaults=flink_defaults)
    opts = options.view_as(TrainOptions)
    if opts.store.startswith("memory://") and python_in_several_processes(options):
        raise SystemExit(f"train: {opts.store} lives in one process and this job's Python runs in "
                         "several (Flink at --parallelism > 1, or not LOOPBACK): use redis://")
    if not opts.input or not opts.config:
        raise SystemExit("train: --input and --config are required (see --help)")
    if opts.input.startswith("kafka://") and (opts.savepoint_dir or opts.stop_when_exists):
        raise SystemExit("train: --savepoint_dir and --stop_when_exists watch example files; "
                         f"with a Kafka input ({opts.input}) end an online job with "
                         "--run_for_s, and a backfill reads to the topic's end offsets")
    if not opts.metrics_dir:
        _LOG.info("train %s: metrics in %s", mode, metrics_dir(opts, mode))
    all_options = options.get_all_options(retain_unknown_options=True)
    savepoint = all_options.get("savepoint_path")
    if savepoint:  # refuse a damaged or foreign savepoint before anything is submitted
        _check_savepoint(savepoint, opts, mode)
    if opts.savepoint_dir:
        if mode != "backfill":
            raise SystemExit("train: --savepoint_dir ends a backfill; the online job resumes "
                             "from the savepoint with --savepoint_path")
        finished, stop = _backfill_to_savepoint(opts, all_options)
        return run_job(lambda p: build(p, opts, mode), options, finished=finished, stop=stop,
                       freeze_startup_heap=True)
    finished = None
    if checkpointed and (mode == "backfill" or opts.run_for_s or opts.stop_when_exists):
        finished = _end_of_input_done(opts, mode, time.time())
    result = run_job(lambda p: build(p, opts, mode), options, finished=finished,
                     freeze_startup_heap=True)
    _report(opts, mode)
    return result


def _num_workers(argv: list[str]) -> int:
    """``--num_workers`` as given (before the options are parsed: it sets Flink defaults)."""
    import argparse
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--num_workers", type=int, default=1)
    return parser.parse_known_args(argv)[0].num_workers


def metrics_dir(opts, mode: str) -> str:
    """Where a run's metrics go.

    Args:
        opts: the :class:`TrainOptions`; a folder made up here is set in them.
        mode: ``backfill`` or ``online``.

    Returns:
        ``opts.metrics_dir``; if not given, a new folder for this run, so that runs do not
        overwrite each other's metrics.
    """
    if not opts.metrics_dir:
        path = os.path.join(METRICS_ROOT, f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}")
        opts.metrics_dir = path if not os.path.exists(path) else f"{path}-{os.getpid()}"
    return opts.metrics_dir


def _report(opts, mode: str) -> None:
    """The run's result line: its online AUC, and where its metrics are."""
    import json
    totals = os.path.join(opts.metrics_dir, f"online-{mode}-totals.json")
    if not os.path.exists(totals):
        return
    with open(totals, encoding="utf-8") as f:
        t = json.load(f)
    auc = t.get("auc")
    _LOG.info("train %s: online AUC %s over %s examples; metrics in %s", mode,
              "-" if auc is None or auc != auc else f"{auc:.4f}",
              f"{t.get('examples', 0):,}", opts.metrics_dir)


def _embedded_flink(argv: list[str]) -> bool:
    """Whether the job runs on the job server's embedded MiniCluster (``--flink_master``
    ``[local]``, ``[auto]`` or not given)."""
    masters = [a.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
               for i, a in enumerate(argv) if a.partition("=")[0] == "--flink_master"]
    return not masters or masters[-1].strip().startswith("[")


# What must be equal between the job that wrote a savepoint and the job resuming from it:
# the reader's element and cursor (input, batch size), the PS keying (shards) and the shapes
# of the parameters (config, model).
_RESUME_KEYS = ("input", "config", "model", "num_shards", "batch_size", "num_workers")
_RESUME_DEFAULTS = {"num_workers": 1}  # in savepoints older than the key


def _manifest(opts) -> dict:
    from ps.shard_state import STATE_FORMAT
    from transforms.example_reader import FOLLOW_POSITIONS
    from transforms.example_log import followed_pattern
    from transforms.train import PS_KEYS
    return {"input": followed_pattern(opts.input), "config": opts.config, "model": opts.model,
            "num_shards": opts.num_shards, "batch_size": opts.batch_size,
            "num_workers": opts.num_workers,
            "reader_positions": FOLLOW_POSITIONS, "ps_keys": PS_KEYS,
            "ps_state": STATE_FORMAT}


def _check_savepoint(path: str, opts, mode: str) -> None:
    """Refuse a damaged savepoint, or one of a job this one cannot carry on."""
    from dataflow.flink import savepoint_manifest, verify_savepoint
    if not verify_savepoint(path):
        _LOG.warning("savepoint %s has no checksums (taken outside dataflow.flink): only "
                     "Flink's own checks apply", path)
    if mode == "online" and opts.restore:
        raise SystemExit("train: give either --savepoint_path (Flink state) or --restore (PS "
                         "snapshot files) to start from, not both")
    manifest = savepoint_manifest(path)
    if manifest is None:
        return
    ours = _manifest(opts)
    for key, what in (("reader_positions", "reader positions"), ("ps_keys", "PS state keys"),
                      ("ps_state", "PS state format")):
        if manifest.get(key) != ours[key]:
            raise SystemExit(f"train: savepoint {path} holds {what} of another version "
                             f"({manifest.get(key)}; this one has {ours[key]}): resume it "
                             "with the version that wrote it")
    wrong = [f"--{k}={ours[k]} (the savepoint's job: {manifest.get(k)})"
             for k in _RESUME_KEYS
             if str(manifest.get(k, _RESUME_DEFAULTS.get(k))) != str(ours[k])]
    if wrong:
        raise SystemExit(f"train: savepoint {path} cannot be resumed with " + "; ".join(wrong)
                         + ". Its reader resumes in the folder it read, at its position in "
                         "batches, and its PS state has that model's shapes and sharding.")


def _backfill_to_savepoint(opts, all_options: dict):
    """Batch, then online on Flink (DESIGN §4 path a): (finished, stop) for ``run_job``.

    The backfill runs the online job's pipeline (same reader, same labels) over the folder;
    ``finished`` holds once the dense PS has trained on every example of the complete
    periods there at the start, and ``stop`` then stops the job with a savepoint whose
    manifest names what must match on resume (:func:`_check_savepoint`).
    """
    from dataflow.flink import jobs_named, stop_with_savepoint
    from ps.store import open_store
    from transforms.example_log import count_examples, example_periods, followed_pattern
    from transforms.example_columns import read_example_columns

    master = all_options.get("flink_master") or ""
    if all_options.get("runner") != "FlinkRunner" or not master or master.startswith("["):
        raise SystemExit("train: --savepoint_dir needs a Flink cluster, --runner=FlinkRunner "
                         f"--flink_master=HOST:PORT (got {all_options.get('runner')}, "
                         f"{master or 'no master'}): Flink restores savepoints only there")
    if opts.export_dir:
        raise SystemExit("train: --savepoint_dir and --export_dir are two ways to end a "
                         "backfill; give one")
    periods = example_periods(followed_pattern(opts.input), complete_only=True)
    if not periods:
        raise SystemExit(f"train: nothing to backfill: no complete period in {opts.input}")
    examples = count_examples(p for period in periods for p in period)
    last_ts = int(read_example_columns(periods[-1], 0).ts_ms.max())
    store = open_store(opts.store, num_shards=None)
    before = store.sync_info().get("dense")
    lag_ms = int(opts.dense_sync_interval_s * 1000)
    _LOG.info("backfill to a savepoint: %d examples up to %d ms in %d periods", examples,
              last_ts, len(periods))

    def finished() -> bool:
        info = store.sync_info().get("dense")
        if not info or info == before:  # nothing published by this job yet
            return False
        # the dense PS publishes every dense sync interval of event time, at the latest
        return info.get("examples", 0) >= examples or info.get("ts_ms", -1) >= last_ts - lag_ms

    def stop() -> None:
        name = all_options.get("job_name")
        ids = jobs_named(master, name)
        if len(ids) != 1:
            raise RuntimeError(f"expected one running job named {name} on {master}: {ids}")
        target = opts.savepoint_dir if "://" in opts.savepoint_dir else \
            "file://" + os.path.abspath(opts.savepoint_dir)
        manifest = {**_manifest(opts), "examples": examples, "last_ts_ms": last_ts,
                    "trained_at_stop": store.sync_info().get("dense", {}).get("examples")}
        location = stop_with_savepoint(master, ids[0], target, manifest=manifest)
        _LOG.info("backfill done: savepoint %s", location)
        print(f"savepoint: {location}", flush=True)
    return finished, stop


def _end_of_input_done(opts, mode: str, since: float):
    """A check that the job's end-of-input work is done: the online metrics' totals written
    at the end of the input (not the ones rewritten as windows close, which once cancelled
    an online job on Flink after its first window) and, with --export_dir, every PS
    snapshot, written after ``since``."""
    from transforms.metrics_report import input_ended
    totals = os.path.join(opts.metrics_dir, f"online-{mode}-totals.json")
    wanted = [totals]
    if opts.export_dir:
        wanted += [os.path.join(opts.export_dir, f"sparse-{i}.snap")
                   for i in range(opts.num_shards)]
        wanted.append(os.path.join(opts.export_dir, "dense-dense.snap"))

    def done() -> bool:
        return all(os.path.exists(w) and os.path.getmtime(w) >= since for w in wanted) \
            and input_ended(totals)
    return done

OPTIONS = [TrainOptions]
