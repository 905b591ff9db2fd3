"""``python -m dataflow <pipeline> [flags]``: one entry point for every pipeline.

Each pipeline takes Beam's own flags (``--runner``, ``--flink_master``, ``--streaming``, ...)
and its own, declared as a ``PipelineOptions`` subclass in its module.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from apache_beam.options.pipeline_options import (DirectOptions, FlinkRunnerOptions,
                                                  PortableOptions, StandardOptions)

# name -> (module, one-line description). The module has main(argv) and OPTIONS.
PIPELINES = {
    "demo": ("dataflow.demo", "the main job on the embedded default (make demo)"),
    "smoke": ("dataflow.smoke", "Avro events -> keyed state + event-time timers -> JSON lines"),
    "train": ("dataflow.train", "train {backfill,online}: worker -> sharded PS -> store, online AUC"),
    "join": ("dataflow.join", "feature records + actions -> example log (Avro, event-time order)"),
    "analyze": ("dataflow.analyze", "feature logs -> TFT transform (quantile buckets, z-scores)"),
}

BEAM_OPTION_GROUPS = [StandardOptions, DirectOptions, PortableOptions, FlinkRunnerOptions]


def usage() -> str:
    lines = ["usage: python -m dataflow <pipeline> [--help] [flags]", "", "pipelines:"]
    width = max(len(n) for n in PIPELINES)
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in PIPELINES.items()]
    lines += ["", "Beam's flags work unchanged, e.g. --runner=FlinkRunner --flink_master=[local].",
              "Without --runner the pipeline runs on the DirectRunner."]
    return "\n".join(lines)


def pipeline_help(name: str, module) -> str:
    parser = argparse.ArgumentParser(prog=f"python -m dataflow {name}",
                                     description=(module.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    for cls in getattr(module, "OPTIONS", []):
        cls._add_argparse_args(parser.add_argument_group(f"{cls.__name__}"))
    for cls in BEAM_OPTION_GROUPS:
        cls._add_argparse_args(parser.add_argument_group(f"Beam {cls.__name__}"))
    return parser.format_help()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in PIPELINES:
        print(f"unknown pipeline {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(PIPELINES[name][0])
    if "-h" in rest or "--help" in rest:
        print(pipeline_help(name, module))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    module.main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
