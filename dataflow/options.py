"""Pipeline options: ours as ``PipelineOptions`` subclasses, plus runner defaults.

Every pipeline takes Beam's own flags (``--runner``, ``--flink_master``, ``--streaming`` ...)
unchanged. :func:`pipeline_options` adds what a user should not have to type on this setup:

* FlinkRunner: ``--flink_job_server_jar`` (the jar ``make`` built; Maven Central does not
  serve Beam's prebuilt one here), ``--flink_version`` matching it, and where the Python
  runs (no Docker either way): at ``--parallelism`` 1 (or none) ``--environment_type=LOOPBACK``,
  in the submitting process; above 1 ``--environment_type=EXTERNAL`` with the address of a
  worker pool started once per process (``dataflow.flink.shared_worker_pool``), one process
  per SDK worker, and on the embedded MiniCluster ``--sdk_worker_parallelism`` = the
  parallelism (it otherwise starts one SDK process whatever the parallelism). A LOOPBACK job
  runs all its Python under one GIL. :func:`python_in_several_processes` tells which.
* DirectRunner: ``--direct_running_mode=in_memory`` and one worker, so the local runner
  never tries to download a Prism binary and ``memory://`` objects are shared in-process.

An explicit flag always wins over a default.

Our own flags are parsed here, once, and handed to Beam as option values, not as flags:
Beam 2.62 parses flags once per options view with argparse's prefix matching on, so a flag
of ours such as ``--out`` would otherwise also be read as Beam's ``--output_executable_path``
by ``view_as(PortableOptions)`` (and the Flink job server would then try to write a jar).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys

from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,
                                                  PortableOptions, StandardOptions)

from dataflow.cli import VERBOSE_FLAG, VERBOSE_HELP


class MonolithOptions(PipelineOptions):
    """Options every beam-monolith pipeline shares.

    A pipeline's own options subclass this class (not ``PipelineOptions`` directly): Beam
    parses every direct subclass together, and two pipelines may both define ``--input``.

    >>> opts = pipeline_options(["--metrics_out=out/metrics.json"]).view_as(MonolithOptions)
    >>> opts.metrics_out
    'out/metrics.json'
    """

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--metrics_out", default=None,
            help="Write the job's Beam metrics (counters, distributions) as JSON to this file "
                 "when the pipeline finishes.")
        # read by dataflow.cli.setup before anything is imported; here so that it is
        # documented and not handed to Beam as a flag of its own
        parser.add_argument(VERBOSE_FLAG, action="store_true", help=VERBOSE_HELP)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def split_flags(argv: list[str], option_classes=()) -> tuple[dict, list[str]]:
    """Our flags apart from Beam's.

    Args:
        argv: the command-line flags.
        option_classes: the MonolithOptions subclasses of the pipeline (default: all).

    Returns:
        ``(values of our flags in argv, the remaining flags for Beam)``.

    >>> ours, beams = split_flags(["--metrics_out=m.json", "--runner=DirectRunner"])
    >>> ours["metrics_out"], beams
    ('m.json', ['--runner=DirectRunner'])
    """
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False,
                                     conflict_handler="resolve")
    classes = [MonolithOptions, *(option_classes or _subclasses(MonolithOptions))]
    for cls in dict.fromkeys(classes):
        if "_add_argparse_args" in cls.__dict__:
            cls._add_argparse_args(parser)
    ours, rest = parser.parse_known_args(argv)
    return vars(ours), rest


class _OurOverridesAreValid(logging.Filter):
    """Beam's ``get_all_options`` knows only direct ``PipelineOptions`` subclasses, so the
    DirectRunner warns "Discarding invalid overrides" about every flag of ours when a job
    starts (only the options handed to its workers lose them; our DoFns get their values
    from their constructors). Drop that warning when it names only our flags."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Discarding invalid overrides") or not record.args:
            return True
        overrides = record.args[0] if isinstance(record.args, tuple) else record.args
        ours = set(split_flags([])[0])
        return not (isinstance(overrides, dict) and set(overrides) <= ours)


@contextlib.contextmanager
def our_overrides_accepted():
    """A context in which Beam does not warn that our flags are "invalid overrides"
    (:class:`_OurOverridesAreValid`): the job's start."""
    logger = logging.getLogger("apache_beam.options.pipeline_options")
    accepted = _OurOverridesAreValid()
    logger.addFilter(accepted)
    try:
        yield
    finally:
        logger.removeFilter(accepted)


def _flag_given(argv: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def _embedded_master(master: str | None) -> bool:
    return (master or "[auto]").strip() in ("[local]", "[auto]")


def _python_environment(argv: list[str]) -> list[str]:
    """The FlinkRunner's environment flags when none is given (the module docstring)."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    from dataflow import flink
    flink_opts = PipelineOptions(argv).view_as(FlinkRunnerOptions)
    parallelism = flink_opts.parallelism or -1
    if parallelism <= 1:
        return ["--environment_type=LOOPBACK"]
    pool = flink.shared_worker_pool()
    flags = ["--environment_type=EXTERNAL", f"--environment_config={pool.environment_config}"]
    if _embedded_master(flink_opts.flink_master) and not _flag_given(argv,
                                                                     "sdk_worker_parallelism"):
        flags.append(f"--sdk_worker_parallelism={parallelism}")
    logging.getLogger(__name__).info(
        "Flink at parallelism %d: Python in worker processes of the pool at %s (%s)",
        parallelism, pool.environment_config, " ".join(flags))
    return flags


def python_in_several_processes(options: PipelineOptions) -> bool:
    """Whether a job's Python may run in more than one process, or in another one than the
    submitting process: then an in-process object such as a ``memory://`` store is not
    shared between its DoFns (nor with the driver), and a job needs ``redis://``.

    Args:
        options: the job's options (:func:`pipeline_options`' defaults filled in).

    Returns:
        False for the in-memory or multi-threaded DirectRunner and for a portable runner's
        LOOPBACK environment (without the ``use_loopback_process_worker`` experiment); True
        otherwise (EXTERNAL, PROCESS, DOCKER, the multi-processing DirectRunner, other
        runners).

    >>> python_in_several_processes(pipeline_options([]))
    False
    >>> jar = ["--flink_job_server_jar=job-server.jar"]
    >>> python_in_several_processes(pipeline_options(["--runner=FlinkRunner", *jar]))
    False
    >>> python_in_several_processes(pipeline_options(
    ...     ["--runner=FlinkRunner", "--environment_type=EXTERNAL",
    ...      "--environment_config=localhost:50000", *jar]))
    True
    """
    from apache_beam.options.pipeline_options import DebugOptions
    runner = (options.view_as(StandardOptions).runner or "DirectRunner").rsplit(".", 1)[-1]
    if runner in ("DirectRunner", "BundleBasedDirectRunner"):
        return options.view_as(DirectOptions).direct_running_mode == "multi_processing"
    if runner in ("FlinkRunner", "PortableRunner"):
        environment = (options.view_as(PortableOptions).environment_type or "").upper()
        return environment != "LOOPBACK" or bool(
            options.view_as(DebugOptions).lookup_experiment("use_loopback_process_worker"))
    return True


def pipeline_options(argv: list[str], *option_classes, flink_defaults: dict | None = None,
                     **overrides) -> PipelineOptions:
    """``PipelineOptions`` from command-line flags with this project's runner defaults (the
    module docstring).

    Args:
        argv: the command-line flags.
        *option_classes: the pipeline's ``MonolithOptions`` subclasses (default: all).
        flink_defaults: ``{flag name: value}`` a pipeline wants on Flink unless given (e.g.
            the job server's ``max_bundle_time_mills``); ``True`` is a bare boolean flag.
        **overrides: option values that win over the flags.

    Returns:
        The ``PipelineOptions``.

    Raises:
        dataflow.flink.FlinkSetupError: ``--runner=FlinkRunner`` without the job server jar.

    >>> pipeline_options([]).view_as(DirectOptions).direct_running_mode
    'in_memory'
    >>> opts = pipeline_options(["--runner=PortableRunner", "--job_endpoint=localhost:8099"])
    >>> opts.view_as(PortableOptions).environment_type
    'LOOPBACK'
    """
    ours, argv = split_flags(list(argv), option_classes)
    ours.update(overrides)
    runner = PipelineOptions(argv).view_as(StandardOptions).runner or "DirectRunner"
    runner = runner.rsplit(".", 1)[-1]
    extra: list[str] = []
    if runner in ("FlinkRunner", "PortableRunner"):
        from dataflow import flink  # local import: only Flink runs need the jar
        if runner == "FlinkRunner" and not _flag_given(argv, "flink_job_server_jar") \
                and not _flag_given(argv, "job_endpoint"):
            extra.append(f"--flink_job_server_jar={flink.job_server_jar()}")
        if runner == "FlinkRunner" and not _flag_given(argv, "flink_version"):
            extra.append(f"--flink_version={flink.FLINK_VERSION}")
        extra += [f"--{name}" if value is True else f"--{name}={value}"
                  for name, value in (flink_defaults or {}).items()
                  if not _flag_given(argv, name)]
        if not _flag_given(argv + extra, "environment_type"):
            extra += (_python_environment(argv + extra) if runner == "FlinkRunner"
                      else ["--environment_type=LOOPBACK"])
    elif runner in ("DirectRunner", "BundleBasedDirectRunner"):
        if not _flag_given(argv, "direct_running_mode"):
            extra.append("--direct_running_mode=in_memory")
        if not _flag_given(argv, "direct_num_workers"):
            extra.append("--direct_num_workers=1")
    return PipelineOptions(argv + extra, **ours)


def parse_pipeline_args(argv: list[str] | None, options_class, required=(), prog: str = "",
                        flink_defaults: dict | None = None):
    """A pipeline CLI's options: :func:`pipeline_options` of ``argv`` and their view.

    Args:
        argv: the flags (None: ``sys.argv[1:]``).
        options_class: the pipeline's ``MonolithOptions`` subclass.
        required: names of its flags that must be given (they have no default: Beam parses
            every options class with every pipeline).
        prog: the program's name in the error.
        flink_defaults: as :func:`pipeline_options`'.

    Returns:
        ``(PipelineOptions, their options_class view)``.

    Raises:
        SystemExit: a required flag is missing; the message names them all.
    """
    options = pipeline_options(sys.argv[1:] if argv is None else argv, options_class,
                               flink_defaults=flink_defaults)
    opts = options.view_as(options_class)
    if any(not getattr(opts, name) for name in required):
        flags = [f"--{name}" for name in required]
        listed = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
        raise SystemExit(f"{prog}: {listed} {'is' if len(flags) == 1 else 'are'} required "
                         "(see --help)")
    return options, opts


__all__ = ["MonolithOptions", "pipeline_options", "parse_pipeline_args",
           "python_in_several_processes", "DirectOptions", "PortableOptions"]
