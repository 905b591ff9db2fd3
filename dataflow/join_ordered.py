"""The join of a bounded input in one streaming pipeline that reads the log files one at a
time in event-time order (``dataflow.join --ordered_read``, on by default with
``--streaming`` on Flink): :func:`join_in_order`.
"""
from __future__ import annotations

import logging
from typing import Callable

from apache_beam.io.filesystems import FileSystems

from dataflow.job import metrics_dict, run_job
from dataflow.join_io import output_files
from transforms.tail import log_file_start_ms

__all__ = ["join_in_order"]

_LOG = logging.getLogger(__name__)


def join_in_order(options, opts, build: Callable):
    """Joins a bounded input in one streaming pipeline that reads the log files one at a time
    in event-time order.

    Why: a bounded read (``ReadAvroLogs``) holds the watermark until every file is read, so
    on a streaming runner the joiner's timers fire only at the end and the job holds the
    whole input (Flink ``--streaming``: 1.7 GiB at 100k requests, 4.8 GiB at 400k). Here each
    log is read by ``TailAvroLogs(read_once=True)``: a file a call, after which the watermark
    moves to the next file's name-given start and the runner takes it; so windows close,
    examples are written and the joiner's state is freed as the files go by, and the job
    ends after the last file. The joiner remembers a closed request (a small tombstone) until
    the input ends unless ``--late_horizon_s`` is given, so late actions and repeated feature
    records mean what they do in one read, whose timers all fire at its end.

    It needs log files named by the start of their records (``part-YYYYmmdd-HH[MMSS].avro``,
    :func:`transforms.tail.log_file_start_ms`); other names: None (with a warning). A
    record earlier than the watermark when it is read (earlier than its file's name says)
    would be late for the joiner and change the output: the reader counts it
    (``sources.records_behind_watermark``), and the run is undone (the files it added to
    ``--out`` are removed) and None returned.

    Args:
        options: the join's ``PipelineOptions``.
        opts: their ``dataflow.join.JoinOptions`` view.
        build: ``build(pipeline, opts, ordered=True)`` builds the join reading so
            (``dataflow.join.build``).

    Returns:
        The pipeline's result, or None if the input cannot be read so (then one read joins
        it: the caller's fallback).
    """
    inputs = {kind: [m.path for m in FileSystems.match([pattern])[0].metadata_list]
              for kind, pattern in (("features", opts.features), ("actions", opts.actions))}
    unnamed = [p for paths in inputs.values() for p in paths if log_file_start_ms(p) is None]
    if not all(inputs.values()) or unnamed:
        _LOG.warning("join: not read in event-time order (%s): one read joins the input, and "
                     "on a streaming runner it holds all of it in memory; name log files by "
                     "the start of their records (part-YYYYmmdd-HH[MMSS].avro)",
                     f"{len(unnamed)} log files, e.g. {unnamed[0]}, have names that give no "
                     "start" if unnamed else "a glob matches no file")
        return None
    before = output_files(opts.out)
    result = run_job(lambda p: build(p, opts, ordered=True), options,
                     freeze_startup_heap=True)
    behind = metrics_dict(result)["counters"].get("sources.records_behind_watermark", 0)
    if behind:
        _LOG.warning("join: %d log records are earlier than their file names say (late for the "
                     "joiner, the output would change); joining again in one read (on a "
                     "streaming runner it holds the whole input in memory)", behind)
        added = sorted(output_files(opts.out) - before)
        if added:
            FileSystems.delete(added)
        return None
    return result

