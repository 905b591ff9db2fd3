"""``python -m dataflow <pipeline> [flags]``: one entry point for every pipeline.

Each pipeline takes Beam's own flags (``--runner``, ``--flink_master``, ``--streaming``, ...)
and its own, declared as a ``PipelineOptions`` subclass in its module.
"""
from __future__ import annotations

import sys

from dataflow import cli

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    cli.setup()

from dataflow.pipelines import PIPELINES, run_pipeline, usage  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """``python -m dataflow``.

    Args:
        argv: the pipeline's name and its flags (None: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in PIPELINES:
        print(f"unknown pipeline {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_pipeline(name, rest)


if __name__ == "__main__":
    sys.exit(main())
