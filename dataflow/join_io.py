"""What the join (``dataflow.join``) reads and where it writes: its feature and action log
inputs, read with dead letters, and its output folders.

The readers are the join's own composition of ``transforms.sources``' readers: a glob, a
list of globs (a slice's files, ``dataflow.join_slices``) or a glob read a file at a time
in event-time order (``dataflow.join_ordered``), feature logs extracted with a config or
already-extracted records.
"""
from __future__ import annotations

import apache_beam as beam
import fastavro
from apache_beam.io.filesystems import FileSystems

__all__ = ["EXTRACTED_FEATURES_SCHEMA", "SIDE_OUTPUTS", "read_features", "read_actions",
           "output_files", "make_output_folders"]

# What ExtractFeatures outputs, as an Avro record (the input format of --features for now).
EXTRACTED_FEATURES_SCHEMA = fastavro.parse_schema({
    "type": "record", "name": "ExtractedFeatures", "namespace": "beam_monolith",
    "doc": "A served request after feature extraction: the joiner's feature input.",
    "fields": [
        {"name": "request_id", "type": "string"},
        {"name": "ts_ms", "type": "long"},
        {"name": "user_id", "type": "string"},
        {"name": "item_id", "type": "string"},
        {"name": "fids", "type": {"type": "array", "items": "long"}},
        {"name": "dense", "type": {"type": "array", "items": "float"}, "default": []},
        {"name": "served_score", "type": ["null", "double"], "default": None},
        {"name": "true_ctr", "type": ["null", "double"], "default": None},
    ]})

# The join's output folders besides examples/ (JSON lines, one file set per period).
SIDE_OUTPUTS = ("unmatched", "late", "duplicates", "invalid", "dead_letter")


def _read_logs(pipeline: beam.Pipeline, label: str, patterns, reader, ordered=False):
    """``(records, dead letters)`` of one glob or of a list of them (each read apart);
    ``ordered``: a glob read a file at a time in event-time order."""
    if ordered:
        from transforms.tail import TailAvroLogs
        return pipeline | label >> TailAvroLogs(patterns, read_once=True).with_dead_letters()
    if isinstance(patterns, str):
        return pipeline | label >> reader(patterns).with_dead_letters()
    if not patterns:
        return tuple(pipeline | f"{label}{name}" >> beam.Create([])
                     for name in ("Records", "DeadLetters"))
    reads = [pipeline | f"{label}{i}" >> reader(p).with_dead_letters()
             for i, p in enumerate(patterns)]
    return tuple([r[k] for r in reads] | f"{label}{name}" >> beam.Flatten()
                 for k, name in ((0, "Records"), (1, "DeadLetters")))


def read_features(pipeline: beam.Pipeline, pattern, config=None, ordered: bool = False):
    """The joiner's feature input, stamped with serving time.

    With a feature ``config``, ``pattern`` names raw feature logs, read and extracted:
    ``ReadFeatureLogs(pattern) | ExtractFeatures(config)``. Without one it names Avro files
    of already-extracted records (:data:`EXTRACTED_FEATURES_SCHEMA`).

    Args:
        pipeline: the pipeline to read in.
        pattern: a glob, or a list of globs (each read apart; empty: nothing).
        config: a feature config (name, path or ``FeatureConfig``), or None.
        ordered: read the glob a file at a time in the order of the starts its files'
            names give, the watermark following (``dataflow.join_ordered``).

    Returns:
        ``(feature records, dead letters)``: the dead letters are the reader's (damaged
        files, records without a usable event time) and the extractor's, with reasons.
    """
    from transforms.sources import ReadAvroLogs, ReadFeatureLogs
    if config is None:
        return _read_logs(pipeline, "ReadFeatureRecords", pattern, ReadAvroLogs, ordered)
    from transforms.features import ExtractFeatures
    records, unreadable = _read_logs(pipeline, "ReadFeatureLogs", pattern, ReadFeatureLogs,
                                     ordered)
    extracted = records | "ExtractFeatures" >> ExtractFeatures(config)
    dead = (unreadable, extracted.dead_letter) | "FeatureDeadLetters" >> beam.Flatten()
    return extracted.features, dead


def read_actions(pipeline: beam.Pipeline, pattern, ordered: bool = False):
    """The joiner's action input (``schemas/action_log.avsc``), stamped with event time;
    a damaged file or record is dead-lettered, never fails the join.

    Args:
        pipeline: the pipeline to read in.
        pattern: a glob, or a list of globs (each read apart; empty: nothing).
        ordered: as :func:`read_features`'.

    Returns:
        ``(action records, dead letters)``.
    """
    from transforms.sources import ReadActionLogs
    return _read_logs(pipeline, "ReadActionLogs", pattern, ReadActionLogs, ordered)


def output_files(out: str) -> set:
    """The files in a join's output folders.

    Args:
        out: the join's ``--out`` (any Beam file system).

    Returns:
        Their paths.
    """
    return {m.path for kind in ("examples",) + SIDE_OUTPUTS
            for m in FileSystems.match([FileSystems.join(out, kind, "*")])[0].metadata_list}


def make_output_folders(out: str) -> None:
    """Creates every output folder of a join, also those that will stay empty (a script
    may list them); before the run, so that each way of joining has them.

    Args:
        out: the join's ``--out`` (any Beam file system).
    """
    for kind in ("examples",) + SIDE_OUTPUTS:
        path = FileSystems.join(out, kind)
        if not FileSystems.exists(path):
            FileSystems.mkdirs(path)
