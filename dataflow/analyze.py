"""Analysis pipeline: feature logs of a backfill → the tensorflow-transform output that
extraction (streaming pipelines) and serving apply, so that they never skew.

    python -m dataflow.analyze --input 'out/synth/feature_log/*.avro' \\
        --config synthetic_tft --out out/transform [--runner=FlinkRunner --flink_master=[local]]
    python -m dataflow join --config out/transform ...      # extraction with the transform

The config's analysers (``bucketize: {quantiles: N}``, ``normalize: z_score``; see
``schemas/feature_config.py``) run as TFT analysers over every record that extraction accepts
(``transforms/preprocess.py``)::

    feature logs ─► ReadFeatureLogs ─► AnalyzeFeatureLogs ──► DIR/transform_fn/, transformed_metadata/
                        │ unreadable      │ (TFT AnalyzeDataset)
                        │                 └─ rejected ─┬─► DIR/dead_letter/
                        └──────────────────────────────┘

then the driver reads the results out of the graph and writes ``DIR/summary.json`` (bucket
boundaries, means, variances, counts, minima and maxima; what extraction applies) and
``DIR/feature_config.yaml`` (the config analysed). ``DIR`` must be new or empty: a transform
is never mixed with another run's files.
"""
from __future__ import annotations

if __name__ == "__main__":  # output set up before Beam and TensorFlow load (dataflow.cli)
    from dataflow.pipelines import pipeline_main
    raise SystemExit(pipeline_main("analyze"))

import logging
import os
import shutil

import apache_beam as beam

from dataflow.job import metrics_dict, run_job
from dataflow.options import MonolithOptions, parse_pipeline_args
from schemas.feature_config import FeatureConfig

_LOG = logging.getLogger(__name__)


class AnalyzeOptions(MonolithOptions):
    """The flags of ``python -m dataflow.analyze`` (``--help`` lists them).

    >>> from dataflow.options import pipeline_options
    >>> opts = pipeline_options(["--input=logs/*.avro", "--config=synthetic_tft",
    ...                          "--out=out/transform"], AnalyzeOptions).view_as(AnalyzeOptions)
    >>> opts.out, opts.analysis_batch_size
    ('out/transform', 1000)
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--input", help="glob of feature log Avro files of the backfill "
                                            "(schemas/feature_log.avsc)")
        parser.add_argument("--config", help="feature config with analysers (YAML path or a "
                                             "name in schemas/configs)")
        parser.add_argument("--out", help="transform output directory (new or empty)")
        parser.add_argument("--temp_dir", default=None,
                            help="TFT's scratch directory, reachable by the workers "
                                 "(default: OUT/tmp, removed afterwards)")
        parser.add_argument("--analysis_batch_size", type=int, default=1000,
                            help="records per Arrow batch fed to TFT's analysers")


class AnalysisError(RuntimeError):
    """The analysis ran but its result cannot be used (e.g. a field had no values).

    >>> import tempfile
    >>> from dataflow.options import pipeline_options
    >>> from schemas import write_avro
    >>> d = tempfile.mkdtemp()
    >>> _ = write_avro(f"{d}/logs.avro", "feature_log", [   # no record has an age
    ...     {"request_id": "r1", "ts_ms": 1, "user_id": "u", "item_id": "i"}])
    >>> config = FeatureConfig.from_dict({"slots": [{"name": "age", "slot": 3, "source": "age",
    ...     "optional": True, "bucketize": {"quantiles": 2}}]})
    >>> opts = pipeline_options([f"--input={d}/logs.avro", f"--out={d}/transform"],
    ...                         AnalyzeOptions).view_as(AnalyzeOptions)
    >>> with beam.Pipeline() as p:
    ...     build(p, opts, config, f"{d}/tmp")
    >>> finish(opts.out, config, opts.input, {"counters": {}})
    Traceback (most recent call last):
    ...
    dataflow.analyze.AnalysisError: no values to analyse for slot 'age' (field 'age') in 1 ...
    """


def build(pipeline, opts, config: FeatureConfig, temp_dir: str) -> None:
    """The analysis pipeline (the module docstring's picture); example: :class:`AnalysisError`.

    Args:
        pipeline: the ``beam.Pipeline`` to add it to.
        opts: the :class:`AnalyzeOptions`.
        config: the feature config, with analysers.
        temp_dir: TFT's scratch directory.
    """
    from transforms.event_time_files import WriteEventTimeFiles
    from transforms.preprocess import AnalyzeFeatureLogs
    from transforms.sources import ReadFeatureLogs

    records, unreadable = pipeline | "ReadFeatureLogs" >> ReadFeatureLogs(
        opts.input).with_dead_letters()
    rejected = records | "Analyze" >> AnalyzeFeatureLogs(config, opts.out, temp_dir,
                                                         opts.analysis_batch_size)
    ((unreadable, rejected) | "DeadLetters" >> beam.Flatten()
     | "WriteDeadLetter" >> WriteEventTimeFiles(os.path.join(opts.out, "dead_letter")))


def finish(out: str, config: FeatureConfig, input_glob: str, metrics: dict):
    """Reads the results out of the written graph; writes ``summary.json`` and the config.

    Args:
        out: the transform output directory the pipeline wrote.
        config: the feature config analysed.
        input_glob: the input, for the summary.
        metrics: the job's :func:`dataflow.job.metrics_dict` (the dead letters' counts).

    Returns:
        The ``FittedTransform``.

    Raises:
        AnalysisError: an analysed field had no values.
    """
    from transforms.preprocess import read_transform_graph, write_analysed_config

    fitted = read_transform_graph(out, config)
    summary = fitted.summary
    empty = [f"slot {n!r} (field {s['source']!r})" for n, s in summary["slots"].items()
             if not s["count"]]
    empty += [f"dense {n!r} (field {d['source']!r})" for n, d in summary["dense"].items()
              if not d["count"]]
    if empty:
        raise AnalysisError(f"no values to analyse for {', '.join(empty)} in "
                            f"{summary['records']} records of {input_glob}; {out} is not "
                            "usable (no summary.json)")
    dead = {k.split(".", 1)[1]: v for k, v in metrics["counters"].items()
            if k.startswith("analyze.") and k != "analyze.records" and v}
    fitted.save(out, input=input_glob, dead_letters=dead)
    write_analysed_config(config, out)
    return fitted


def main(argv: list[str] | None = None):
    """``python -m dataflow.analyze``.

    Args:
        argv: the flags (None: ``sys.argv[1:]``).

    Returns:
        The ``FittedTransform`` written.
    """
    options, opts = parse_pipeline_args(argv, AnalyzeOptions, ("input", "config", "out"),
                                        "analyze")
    config = FeatureConfig.load(opts.config)
    if not config.needs_analysis:
        raise SystemExit(f"analyze: config {opts.config!r} asks for no analysers "
                         "(bucketize: {quantiles: N} or normalize: z_score)")
    if os.path.isdir(opts.out) and os.listdir(opts.out):
        raise SystemExit(f"analyze: {opts.out} is not empty; give a new --out")
    os.makedirs(opts.out, exist_ok=True)
    temp_dir = opts.temp_dir or os.path.join(opts.out, "tmp")
    result = run_job(lambda p: build(p, opts, config, temp_dir), options,
                     freeze_startup_heap=True)
    if not opts.temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)
    fitted = finish(opts.out, config, opts.input, metrics_dict(result))
    _LOG.info("transform written to %s:\n%s", opts.out, describe(fitted.summary))
    return fitted


def describe(summary: dict) -> str:
    """A transform's summary, readable.

    Args:
        summary: a ``FittedTransform.summary`` (``summary.json``).

    Returns:
        A few lines: boundaries per slot, mean ± std per dense input.
    """
    lines = [f"{summary['records']} records analysed"]
    for name, s in summary["slots"].items():
        bounds = ", ".join(f"{b:.7g}" for b in s["boundaries"])  # float32: 7 digits
        lines.append(f"  slot {name} ({s['source']}): {len(s['boundaries']) + 1} buckets, "
                     f"boundaries [{bounds}] over {s['count']} values "
                     f"in [{s['min']:.7g}, {s['max']:.7g}]")
    for name, d in summary["dense"].items():
        lines.append(f"  dense {name} ({d['source']}, {d['transform']}): mean {d['mean']:.6g}"
                     f", std {d['std']:.6g} over {d['count']} values")
    return "\n".join(lines)


OPTIONS = [AnalyzeOptions]
USAGE = "--input INPUT --config CONFIG --out OUT [options]"
