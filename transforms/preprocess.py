"""tensorflow-transform preprocessing: analyse the backfill once, apply the same numbers
everywhere (streaming extraction, serving), so that training and serving never skew.

A feature config may ask for *analysers* (``schemas/feature_config.py``): quantile buckets
for a numeric slot (``bucketize: {quantiles: 8}``) and z-score normalisation for a dense
input (``normalize: z_score``). ``python -m dataflow.analyze`` runs :class:`AnalyzeFeatureLogs`
over the backfill's feature logs and writes a *transform output directory*::

    DIR/transform_fn/  DIR/transformed_metadata/   TFT's transform graph (WriteTransformFn)
    DIR/summary.json                               boundaries and statistics, readable, exact
    DIR/feature_config.yaml                        the config it was analysed with
    DIR/dead_letter/                               records the analysis could not use

The graph (:func:`preprocessing_fn`) has one float32 input per analysed entry, the value
extraction gives it (after the config's ``transform``; a sparse row: empty when an optional
field is missing): ``slot__<name>`` and ``dense__<name>``. Its outputs are
``slot__<name>__bucket`` (``tft.apply_buckets`` on ``tft.quantiles``) and
``dense__<name>__z`` (``(x - mean) / sqrt(var)``, ``x - mean`` when the variance is 0, as
``tft.scale_to_z_score``), plus the analysers' results repeated per row (the idiom of TFT's
``get_num_buckets_for_transformed_feature`` example), from which :class:`FittedTransform`
reads the boundaries, means and variances once, after the analysis.

Extraction applies a :class:`FittedTransform` with NumPy, a batch at a time
(``transforms.features.Preprocessor``): ``np.searchsorted(boundaries, float32(x), "right")``
and the z-score in float32 are exactly what the graph computes (``tests/test_preprocess.py``
compares them with ``TFTransformOutput.transform_raw_features`` on the same records), without
importing TensorFlow in the workers or calling it per record.

>>> import numpy as np
>>> t = FittedTransform(boundaries={"age": np.array([25, 40], np.float32)},
...                     mean={"x": np.float32(2)}, var={"x": np.float32(4)})
>>> t.bucketize("age", np.array([18, 25, 60], np.float32)).tolist()
[0, 1, 2]
>>> t.normalize("x", np.array([0, 2, 6], np.float32)).tolist()
[-1.0, 0.0, 2.0]
"""
from __future__ import annotations

import os
from pathlib import Path

import apache_beam as beam
import numpy as np
import yaml
from apache_beam.metrics import Metrics

from schemas.feature_config import CONFIG_FILE, FeatureConfig, FeatureConfigError
from transforms.features import DEAD_LETTER, ExtractError, FeatureExtractor, dead_letter
from transforms.fitted_transform import (SUMMARY_FORMAT, FittedTransform, analysed_spec,
                                        analysis_columns, default_epsilon, dense_column,
                                        slot_column)

__all__ = ["AnalyzeFeatureLogs", "preprocessing_fn", "analysis_row", "apply_transform_graph",
           "read_transform_graph", "write_analysed_config"]

# --------------------------------------------------------------------------- the graph

def analysis_row(config: FeatureConfig, out: dict, pending: list) -> dict:
    """One record's graph inputs.

    Args:
        config: the :class:`FeatureConfig`.
        out, pending: what ``FeatureExtractor(config).parse(record)`` returned.

    Returns:
        ``{column: [value]}``, ``[]`` for an optional slot whose field was missing.

    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "age", "slot": 3, "source": "age", "bucketize": {"quantiles": 4}}]})
    >>> out, pending = FeatureExtractor(config).parse({"request_id": "r1", "ts_ms": 5,
    ...     "user_id": "u1", "item_id": "i1", "features": {"age": 41}})
    >>> analysis_row(config, out, pending)
    {'slot__age': [41.0]}
    """
    slots = [s for s in config.slots if s.analysed]
    row = {slot_column(s.name): [] for s in slots}
    for k, _, value in pending:
        row[slot_column(slots[k].name)] = [value]
    for j, d in enumerate(config.dense):
        if d.analysed:
            row[dense_column(d.name)] = [out["dense"][j]]
    return row


def read_transform_graph(directory: str | os.PathLike, config: FeatureConfig) -> FittedTransform:
    """Reads the analysers' results out of TFT's transform graph.

    Runs the graph once on a one-row batch (its per-row analyser outputs do not depend on
    the input). Imports TensorFlow. Example: :class:`AnalyzeFeatureLogs`.

    Args:
        directory: where :class:`AnalyzeFeatureLogs` wrote the graph.
        config: the :class:`FeatureConfig` it was analysed for.

    Returns:
        The :class:`FittedTransform`, its ``summary`` that of ``summary.json``.
    """
    columns = analysis_columns(config)
    graph = apply_transform_graph(directory, [{c: [] for c in columns}])
    first = {k: np.asarray(v)[0] for k, v in graph.items() if not k.endswith(("__bucket",
                                                                              "__z"))}
    f32 = lambda v: float(np.float32(v))  # noqa: E731 - exact in JSON, float32 again on load
    spec = analysed_spec(config)
    slots, dense = {}, {}
    for name, s in spec["slots"].items():
        col, count = slot_column(name), int(first[f"{slot_column(name)}__count"])
        slots[name] = {**s, "count": count,
                       "min": f32(first[f"{col}__min"]) if count else None,
                       "max": f32(first[f"{col}__max"]) if count else None,
                       "boundaries": [f32(b) for b in first[f"{col}__boundaries"]]}
    for name, d in spec["dense"].items():
        col, count = dense_column(name), int(first[f"{dense_column(name)}__count"])
        var = np.float32(first[f"{col}__var"])
        dense[name] = {**d, "count": count,
                       "mean": f32(first[f"{col}__mean"]), "var": f32(var),
                       "std": f32(np.sqrt(var)),
                       "min": f32(first[f"{col}__min"]) if count else None,
                       "max": f32(first[f"{col}__max"]) if count else None}
    summary = {"format": SUMMARY_FORMAT, "records": int(first["records"]),
               "slots": slots, "dense": dense}
    return FittedTransform(boundaries={n: np.array(s["boundaries"], np.float32)
                                       for n, s in slots.items()},
                           mean={n: np.float32(d["mean"]) for n, d in dense.items()},
                           var={n: np.float32(d["var"]) for n, d in dense.items()},
                           summary=summary)


def preprocessing_fn(config: FeatureConfig):
    """The TFT ``preprocessing_fn`` of a config's analysers (see the module docstring).

    Args:
        config: the :class:`FeatureConfig`.

    Returns:
        ``fn(inputs) -> outputs``, for ``tft_beam.AnalyzeDataset``.

    Raises:
        FeatureConfigError: the config has no analysers.
    """
    slots = [s for s in config.slots if s.analysed]
    dense = [d for d in config.dense if d.analysed]
    if not slots and not dense:
        raise FeatureConfigError("", "the config asks for no analysers (bucketize: "
                                     "{quantiles: N} or normalize: z_score): nothing to analyse")

    def fn(inputs):
        import tensorflow as tf
        import tensorflow_transform as tft

        rows = next(iter(inputs.values())).dense_shape[0]

        def per_row(value):  # an analyser's result, repeated on every row
            value = tf.convert_to_tensor(value)
            if value.shape.rank == 0:
                return tf.fill([rows], value)
            return tf.zeros([rows, 1], value.dtype) + tf.reshape(value, [1, -1])

        outputs = {"records": per_row(tft.size(tf.zeros([rows])))}
        for s in slots:
            col = slot_column(s.name)
            x = inputs[col]
            epsilon = s.epsilon if s.epsilon is not None else default_epsilon(s.quantiles)
            boundaries = tft.quantiles(x.values, s.quantiles, epsilon, name=f"{col}_quantiles")
            outputs[f"{col}__bucket"] = tft.apply_buckets(x, boundaries)
            outputs[f"{col}__boundaries"] = per_row(boundaries[0])
            outputs[f"{col}__count"] = per_row(tft.size(x.values))
            outputs[f"{col}__min"] = per_row(tft.min(x.values))
            outputs[f"{col}__max"] = per_row(tft.max(x.values))
        for d in dense:
            col = dense_column(d.name)
            x = inputs[col]
            mean, var = tft.mean(x.values), tft.var(x.values)
            std = tf.sqrt(var)
            centred = x.values - mean
            z = tf.where(tf.not_equal(std, 0), centred / std, centred)
            outputs[f"{col}__z"] = tf.SparseTensor(x.indices, z, x.dense_shape)
            outputs[f"{col}__mean"] = per_row(mean)
            outputs[f"{col}__var"] = per_row(var)
            outputs[f"{col}__count"] = per_row(tft.size(x.values))
            outputs[f"{col}__min"] = per_row(tft.min(x.values))
            outputs[f"{col}__max"] = per_row(tft.max(x.values))
        return outputs

    return fn


def _arrow_schema(columns: list[str]):
    import pyarrow as pa
    return pa.schema([(c, pa.list_(pa.float32())) for c in columns])


# no annotations: Beam reads a callable's (strings here) and logs that it uses Any
def to_record_batch(rows, columns):
    """Graph input rows → one Arrow RecordBatch.

    Args:
        rows: :func:`analysis_row` dicts.
        columns: the columns (:func:`transforms.fitted_transform.analysis_columns`).

    Returns:
        A ``pyarrow.RecordBatch`` with a ``list<float32>`` column each.
    """
    import pyarrow as pa
    return pa.RecordBatch.from_arrays(
        [pa.array([r[c] for r in rows], type=pa.list_(pa.float32())) for c in columns],
        schema=_arrow_schema(columns))


def tensor_adapter_config(columns: list[str]):
    """TFXIO's description of :func:`to_record_batch`'s batches: a sparse tensor a column.

    Args:
        columns: the batches' columns.

    Returns:
        A ``tfx_bsl`` ``TensorAdapterConfig``.
    """
    from tensorflow_metadata.proto.v0 import schema_pb2
    from tfx_bsl.tfxio.tensor_adapter import TensorAdapterConfig
    sparse = schema_pb2.TensorRepresentation.VarLenSparseTensor
    return TensorAdapterConfig(_arrow_schema(columns), {
        c: schema_pb2.TensorRepresentation(varlen_sparse_tensor=sparse(column_name=c))
        for c in columns})


def apply_transform_graph(directory: str | os.PathLike, rows: list[dict]) -> dict:
    """TF's own application of a transform graph to graph input rows, via
    ``TFTransformOutput.transform_raw_features``. For tests and for reading the analysers'
    results; extraction uses :class:`FittedTransform`.

    Args:
        directory: where :class:`AnalyzeFeatureLogs` wrote the graph.
        rows: :func:`analysis_row` dicts.

    Returns:
        ``{output: values}``: sparse outputs as ``[value or None per row]`` lists, the
        per-row analyser outputs as NumPy arrays.
    """
    import tensorflow as tf
    import tensorflow_transform as tft

    columns = list(rows[0]) if rows else []
    inputs = {}
    for c in columns:
        indices = [[i, 0] for i, r in enumerate(rows) if r[c]]
        values = [r[c][0] for r in rows if r[c]]
        inputs[c] = tf.SparseTensor(
            indices=tf.constant(indices, tf.int64, shape=[len(indices), 2]),
            values=tf.constant(values, tf.float32, shape=[len(values)]),
            dense_shape=tf.constant([len(rows), 1], tf.int64))
    outputs = tft.TFTransformOutput(str(directory)).transform_raw_features(inputs)
    result = {}
    for key, value in outputs.items():
        if isinstance(value, tf.SparseTensor):
            column = [None] * len(rows)
            for (i, _), v in zip(value.indices.numpy(), value.values.numpy()):
                column[i] = v
            result[key] = column
        else:
            result[key] = value.numpy()
    return result


# --------------------------------------------------------------------------- the analysis

class _AnalysisInputsFn(beam.DoFn):
    """FeatureLog → its graph input row, by the extractor itself (so the analysis sees the
    values that extraction will transform); what extraction rejects is dead-lettered."""

    def __init__(self, config: FeatureConfig):
        self.config = config

    def setup(self):
        self.extractor = FeatureExtractor(self.config)
        self.rows = Metrics.counter("analyze", "records")
        self.counters: dict = {}

    def process(self, record):
        try:
            out, pending = self.extractor.parse(record)
            if pending is None:
                raise AssertionError("parse() of an analysed config returned no values")
        except ExtractError as e:
            reason, detail = e.reason, e.detail
        except Exception as e:  # noqa: BLE001 - a bad record must not stop the analysis
            reason, detail = f"unexpected_error:{type(e).__name__}", str(e)
        else:
            self.rows.inc()
            yield analysis_row(self.config, out, pending)
            return
        counter = self.counters.get(reason)
        if counter is None:
            counter = self.counters[reason] = Metrics.counter("analyze", reason)
        counter.inc()
        yield beam.pvalue.TaggedOutput(DEAD_LETTER, dead_letter(record, reason, detail))


class AnalyzeFeatureLogs(beam.PTransform):
    """FeatureLog dicts → TFT's transform graph for a config's analysers, written to
    ``out_dir`` (``tft_beam.WriteTransformFn``). After the pipeline has run,
    :func:`read_transform_graph` reads the results (``python -m dataflow.analyze`` does it
    and writes ``summary.json``).

    Args:
        config: the :class:`FeatureConfig`; it must have analysers.
        out_dir: where to write the graph.
        temp_dir: TFT's scratch space (default ``out_dir/tmp``); it must be reachable by
            the workers, as ``out_dir``.
        batch_size: the largest batch of rows the analysis takes at once.

    Returns:
        (``expand``) the dead letters: records extraction rejects.

    Raises:
        FeatureConfigError: the config has no analysers.

    >>> import tempfile
    >>> from apache_beam.testing.util import assert_that, equal_to
    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "age", "slot": 3, "source": "age", "bucketize": {"quantiles": 2}}]})
    >>> out = tempfile.mkdtemp()
    >>> with beam.Pipeline() as p:
    ...     dead = (p | beam.Create([{"request_id": f"r{age}", "ts_ms": 0, "user_id": "u",
    ...                               "item_id": "i", "features": {"age": age}}
    ...                              for age in (18, 25, 40, 61)] + [{"ts_ms": 0}])
    ...             | AnalyzeFeatureLogs(config, out))
    ...     _ = assert_that(dead | beam.Map(lambda d: d["reason"]),
    ...                     equal_to(["missing_field:request_id"]))
    >>> read_transform_graph(out, config).boundaries      # the median: 2 buckets
    {'age': array([40.], dtype=float32)}
    """

    def __init__(self, config: FeatureConfig, out_dir: str, temp_dir: str | None = None,
                 batch_size: int = 1000):
        super().__init__()
        self.config = config
        self.out_dir = str(out_dir)
        self.temp_dir = temp_dir or os.path.join(self.out_dir, "tmp")
        self.batch_size = batch_size
        self.fn = preprocessing_fn(config)  # fails now if the config has no analysers

    def expand(self, records):
        import tensorflow_transform.beam as tft_beam

        columns = analysis_columns(self.config)
        rows = records | "GraphInputs" >> beam.ParDo(
            _AnalysisInputsFn(self.config)).with_outputs(DEAD_LETTER, main="rows")
        batches = (rows.rows
                   | "Batch" >> beam.BatchElements(min_batch_size=min(100, self.batch_size),
                                                   max_batch_size=self.batch_size)
                   | "ToRecordBatch" >> beam.Map(to_record_batch, columns))
        with tft_beam.Context(temp_dir=self.temp_dir):
            transform_fn = ((batches, tensor_adapter_config(columns))
                            | "Analyze" >> tft_beam.AnalyzeDataset(self.fn))
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(self.out_dir)
        return rows[DEAD_LETTER]


def write_analysed_config(config: FeatureConfig, directory: str | os.PathLike) -> Path:
    """Writes ``DIR/feature_config.yaml``: the config as analysed, so that the transform
    output directory alone is enough.

    Args:
        config: the :class:`FeatureConfig`.
        directory: the transform output directory.

    Returns:
        The path written.
    """
    path = Path(directory) / CONFIG_FILE
    path.write_text("# Written by python -m dataflow.analyze: the config this transform was "
                    "analysed with.\n" + yaml.safe_dump(config.to_dict(), sort_keys=False),
                    encoding="utf-8")
    return path
