"""The pipelines of ``python -m dataflow <pipeline>``: their names, help and runner.

Every pipeline module (``dataflow.train``, ``dataflow.join``, ...) runs through
:func:`run_pipeline`, whether as ``python -m dataflow <name>`` or ``python -m dataflow.<name>``
(:func:`pipeline_main`), so its DoFns pickle by reference, never as ``__main__``'s.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from dataflow import cli

# name -> (module, one-line description). The module has main(argv), OPTIONS (its
# MonolithOptions subclasses) and USAGE (its arguments after the program name).
PIPELINES = {
    "demo": ("dataflow.demo", "the main job on the embedded default (make demo)"),
    "smoke": ("dataflow.smoke", "Avro events -> keyed state + event-time timers -> JSON lines"),
    "train": ("dataflow.train", "train {backfill,online}: worker -> sharded PS -> store, online AUC"),
    "join": ("dataflow.join", "feature records + actions -> example log (Avro, event-time order)"),
    "analyze": ("dataflow.analyze", "feature logs -> TFT transform (quantile buckets, z-scores)"),
}


def usage() -> str:
    """The text of ``python -m dataflow --help``: the pipelines and what they do."""
    lines = ["usage: python -m dataflow <pipeline> [--help] [flags]", "", "pipelines:"]
    width = max(len(n) for n in PIPELINES)
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in PIPELINES.items()]
    lines += ["", "Beam's flags work unchanged, e.g. --runner=FlinkRunner --flink_master=[local].",
              "Without --runner the pipeline runs on the DirectRunner.",
              f"{cli.VERBOSE_FLAG}: {cli.VERBOSE_HELP}."]
    return "\n".join(lines)


def pipeline_help(name: str, module, prog: str | None = None) -> str:
    """A pipeline's ``--help``: its own flags and the Beam flags that matter here.

    Args:
        name: the pipeline's name in :data:`PIPELINES`.
        module: its module.
        prog: the program's name (default: ``python -m dataflow NAME``).

    Returns:
        The help text.
    """
    from apache_beam.options.pipeline_options import (DirectOptions, FlinkRunnerOptions,
                                                      PortableOptions, StandardOptions)

    from dataflow.options import MonolithOptions
    prog = prog or f"python -m dataflow {name}"
    parser = argparse.ArgumentParser(prog=prog, usage=f"{prog} {module.USAGE}",
                                     description=(module.__doc__ or "").strip(),
                                     formatter_class=cli.HelpFormatter, add_help=False)
    for cls in [*getattr(module, "OPTIONS", []), MonolithOptions]:
        cls._add_argparse_args(parser.add_argument_group(f"{cls.__name__}"))
    for cls in [StandardOptions, DirectOptions, PortableOptions, FlinkRunnerOptions]:
        cls._add_argparse_args(parser.add_argument_group(f"Beam {cls.__name__}"))
    return parser.format_help()


def run_pipeline(name: str, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs a pipeline (its importable module, whose DoFns pickle by reference, not
    ``__main__``), or prints its help.

    Args:
        name: the pipeline's name in :data:`PIPELINES`.
        argv: its flags (None: ``sys.argv[1:]``).
        prog: the program's name in its help.

    Returns:
        The exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    module = importlib.import_module(PIPELINES[name][0])
    if "-h" in argv or "--help" in argv:
        print(pipeline_help(name, module, prog))
        return 0
    module.main(argv)
    return 0


def pipeline_main(name: str) -> int:
    """``python -m dataflow.<name>`` of a pipeline module: :func:`cli.setup`, then the
    pipeline's help or its run, as ``python -m dataflow <name>``, on the importable module
    (its DoFns pickle by reference, not by value as ``__main__``'s would).

    Args:
        name: the pipeline's name in :data:`PIPELINES`.

    Returns:
        The exit status.
    """
    cli.setup()
    return run_pipeline(name, sys.argv[1:], prog=f"python -m dataflow.{name}")
