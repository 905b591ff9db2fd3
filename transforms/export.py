"""The dense part of the model as a TensorFlow SavedModel, for serving.

Serving reads embedding rows from the ParameterStore and runs the dense part (pooling, FM
term, MLP, biases: everything after the row lookup) from a SavedModel that training exports
into a model directory every ``interval_s`` of event time::

    dense_gradients | ExportDenseModel("redis://...", "dense", spec, "models/")   # TrainOnline(export=...)

The graph is :class:`transforms.model.Model`'s own forward pass (one model, not a second
one), traced with the dense weights as a variable, so the SavedModel needs no Python code
of this project to run. Its one signature::

    logits(rows float32[u, width], occurrences int32[2, m], dense float32[n, dense_dim])
        -> float32[n]

``rows``, ``occurrences`` are what ``Model.index`` / ``Model.gather`` make of a batch:
row of each fid occurrence and its segment ``example * num_slots + slot position``.
It returns logits, not probabilities, so that serving can apply the log-odds correction of
negative sampling (``transforms.joiner.log_odds_correction``) before the sigmoid.

The model directory
-------------------
::

    models/000001704067500000-v000000042/   a SavedModel (saved_model.pb, variables/)
                                            + monolith_meta.json: version, ts_ms, spec, ...
    models/000001704067800000-v000000051/   newer: names sort in export order

A model is written under ``models/.tmp-<uuid>`` and renamed when complete (a reader never
sees half a model); the ``keep`` newest are kept. :func:`latest_model` names the newest,
:func:`load_model` loads one (example: :class:`LoadedModel`).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from schemas import strict_json

__all__ = ["DenseModule", "write_model", "latest_model", "list_models", "load_model",
           "LoadedModel", "ExportDenseModel", "META_FILE"]

_LOG = logging.getLogger(__name__)

META_FILE = "monolith_meta.json"
FORMAT = 2  # 2: the spec names its model class (transforms.models.model_to_json)
_MODEL_NAME = re.compile(r"^(\d{15})-v(\d{10})$")


def _dense_module(spec, flat_params: np.ndarray, version: int, ts_ms: int):
    import tensorflow as tf

    from transforms.model import Model

    model = Model(spec)

    class _Module(tf.Module):
        def __init__(self):
            super().__init__(name="monolith_dense")
            self.params = tf.Variable(flat_params, trainable=False, name="dense_params")
            self.version = tf.Variable(int(version), dtype=tf.int64, trainable=False,
                                       name="version")
            self.ts_ms = tf.Variable(int(ts_ms), dtype=tf.int64, trainable=False, name="ts_ms")

        @tf.function(input_signature=(
            tf.TensorSpec([None, spec.width], tf.float32, name="rows"),
            tf.TensorSpec([2, None], tf.int32, name="occurrences"),
            tf.TensorSpec([None, spec.dense_dim], tf.float32, name="dense")))
        def logits(self, rows, occurrences, dense):
            n = tf.shape(dense)[0]
            # Model's graph takes [label, weight, dense...] per example; serving has no label.
            examples = tf.concat([tf.zeros([n, 2], tf.float32), dense], axis=1)
            return model.logits_graph(rows, occurrences, examples, self.params)

    return _Module(), model


class DenseModule:
    """The dense part of ``spec`` with the given weights, in memory: what a SavedModel holds.

    ``logits(rows, occurrences, dense)`` runs the same graph as a loaded SavedModel; serving
    uses one built from ``Model.initial_dense_params()`` until training publishes a model.
    ``assign`` replaces the weights without tracing again.

    Args:
        spec: the :class:`transforms.model.ModelSpec`.
        params: the dense weights, ``{name: array}`` (``Model.initial_dense_params()``).
        version: the weights' version in the store (-1: none).
        ts_ms: the event time they were published at.

    >>> from transforms.model import ModelSpec, Model
    >>> spec = ModelSpec("lr", slots=[(1, 4)], dense_dim=1)
    >>> module = DenseModule(spec, Model(spec).initial_dense_params())
    >>> rows = np.array([[0.5]], np.float32)           # one fid's row [w]
    >>> occurrences = np.array([[0], [0]], np.int32)    # its row, its segment (example 0)
    >>> module.logits(rows, occurrences, dense=np.zeros((1, 1), np.float32))
    array([0.5], dtype=float32)
    """

    def __init__(self, spec, params: dict, version: int = -1, ts_ms: int = 0):
        from transforms.model import Model
        self.spec = spec
        flat = Model(spec).flatten_params(params)
        self.module, self.model = _dense_module(spec, flat, version, ts_ms)
        self._fn = self.module.logits.get_concrete_function()

    def assign(self, params: dict, version: int, ts_ms: int) -> None:
        """Replaces the weights, their version and event time (no new trace)."""
        self.module.params.assign(self.model.flatten_params(params))
        self.module.version.assign(int(version))
        self.module.ts_ms.assign(int(ts_ms))

    def logits(self, rows, occurrences, dense) -> np.ndarray:
        """float32 [n]: the logits of a batch (the module docstring's signature)."""
        return self._fn(rows, occurrences, dense).numpy()

    def save(self, path: str) -> None:
        """Writes the SavedModel to the directory ``path`` (see :func:`write_model`)."""
        import tensorflow as tf
        tf.saved_model.save(self.module, path, signatures={
            "serving_default": self.module.logits.get_concrete_function()})


def list_models(model_dir: str) -> list[str]:
    """The complete models of a model directory, oldest first (names sort in export order).

    Args:
        model_dir: the model directory (local).

    Returns:
        Their paths; ``[]`` if there is no such directory.
    """
    try:
        names = os.listdir(model_dir)
    except FileNotFoundError:
        return []
    return [os.path.join(model_dir, n) for n in sorted(names) if _MODEL_NAME.match(n)]


def latest_model(model_dir: str) -> Optional[str]:
    """The newest complete model of a model directory.

    Args:
        model_dir: the model directory (local).

    Returns:
        Its path, or None if there is none.
    """
    models = list_models(model_dir)
    return models[-1] if models else None


def write_model(model_dir: str, spec, params: dict, version: int, ts_ms: int, keep: int = 3,
                meta: Optional[dict] = None, module: Optional[DenseModule] = None) -> str:
    """Writes a SavedModel of the dense part into the model directory atomically (a
    temporary directory, then a rename) and keeps the ``keep`` newest models.

    Args:
        model_dir: the model directory (local; made if missing).
        spec: the :class:`transforms.model.ModelSpec`.
        params: the dense weights, ``{name: array}``.
        version: their version in the store.
        ts_ms: the event time they were published at.
        keep: how many models to keep (>= 1).
        meta: more values for the model's ``monolith_meta.json``.
        module: a :class:`DenseModule` of ``spec`` to reuse (its weights are replaced), so
            that repeated exports do not trace the graph again.

    Returns:
        The model's path, ``model_dir/TS_MS-vVERSION`` (an existing one is not written
        again).

    Raises:
        ValueError: ``keep`` < 1.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    os.makedirs(model_dir, exist_ok=True)
    name = f"{int(ts_ms):015d}-v{int(version):010d}"
    final = os.path.join(model_dir, name)
    if os.path.exists(final):
        return final  # the same export again (a retried bundle): it is already there
    if module is None:
        module = DenseModule(spec, params, version, ts_ms)
    else:
        module.assign(params, version, ts_ms)
    tmp = os.path.join(model_dir, f".tmp-{uuid.uuid4().hex}")
    try:
        module.save(tmp)
        info = {"format": FORMAT, "version": int(version), "ts_ms": int(ts_ms),
                "wall_time": time.time(), "spec": spec.to_json(), **(meta or {})}
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
            strict_json.dump(info, f, indent=2, sort_keys=True)
        os.rename(tmp, final)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_models(model_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class LoadedModel(NamedTuple):
    """A model of the model directory, loaded (:func:`load_model`):
    ``logits(rows, occurrences, dense)``.

    >>> import tempfile
    >>> from transforms.model import ModelSpec, Model
    >>> spec = ModelSpec("fm", slots=[(1, 4), (2, 4)], dense_dim=1)
    >>> d = tempfile.mkdtemp()
    >>> path = write_model(d, spec, Model(spec).initial_dense_params(), version=7, ts_ms=1000)
    >>> os.path.basename(path), os.path.basename(latest_model(d))
    ('000000000001000-v0000000007', '000000000001000-v0000000007')
    >>> loaded = load_model(path)
    >>> loaded.version, loaded.ts_ms, loaded.spec == spec
    (7, 1000, True)
    >>> loaded.logits(np.zeros((1, 5), np.float32), np.array([[0], [0]], np.int32),
    ...               np.zeros((1, 1), np.float32))
    array([0.], dtype=float32)
    """

    path: str
    spec: object
    version: int
    ts_ms: int
    meta: dict
    fn: object  #: the SavedModel's concrete ``logits`` function

    def logits(self, rows, occurrences, dense) -> np.ndarray:
        """float32 [n]: the logits of a batch (the module docstring's signature)."""
        return self.fn(rows, occurrences, dense).numpy()


def load_model(path: str) -> LoadedModel:
    """Loads a model written by :func:`write_model` (example: :class:`LoadedModel`).

    Args:
        path: the model's directory.

    Returns:
        A :class:`LoadedModel`.

    Raises:
        ValueError: the model is damaged, or of another format version.
    """
    import tensorflow as tf
    with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: model format {meta.get('format')!r}, expected {FORMAT} "
                         f"(a model exported by another version: export it again)")
    loaded = tf.saved_model.load(path)
    from transforms.model import ModelSpec
    spec = ModelSpec.from_json(meta["spec"])
    version, ts_ms = int(loaded.version.numpy()), int(loaded.ts_ms.numpy())
    if (version, ts_ms) != (meta["version"], meta["ts_ms"]):
        raise ValueError(f"{path}: variables say version {version} ts {ts_ms}, "
                         f"{META_FILE} says {meta['version']} {meta['ts_ms']}")
    fn = loaded.logits.get_concrete_function()
    # Keep the loaded object alive with its function (the function refers to its variables).
    fn._monolith_owner = loaded
    return LoadedModel(path, spec, version, ts_ms, meta, fn)


class ExportDenseModel(beam.DoFn):
    """Writes the dense weights that the ParameterStore holds as a SavedModel every
    ``interval_s`` of their event time (input: the worker's ``dense`` output,
    ``(key, DenseGradients)``, used as a tick).

    It exports what serving would read (the store's copy, published by ``DenseShard``) with
    the store's version, stamped with the event time of its last publish (the store's sync
    record), and skips a tick when the version has not changed. The clock is the store's,
    not the tick's: on Flink the worker's output reaches this DoFn before the PS stage has
    applied it, so the export trails the PS by a bundle and a bounded input's last
    ``interval_s`` may go unexported. Exports are idempotent by name (event time +
    version), so a retried bundle rewrites nothing.

    Args:
        store_url: the ParameterStore that ``DenseShard`` publishes to.
        dense_name: the dense parameter set's name in the store.
        spec: the :class:`transforms.model.ModelSpec`.
        model_dir: the model directory (local).
        interval_s: event-time seconds between exports (>= 0).
        keep: how many models to keep.

    >>> import tempfile
    >>> from ps.gradients import DenseGradients
    >>> from ps.store import open_store
    >>> from transforms.model import ModelSpec, Model
    >>> spec = ModelSpec("lr", slots=[(1, 4)], dense_dim=1)
    >>> store = open_store("memory://export-doc")   # as DenseShard publishes:
    >>> store.write_dense("dense", Model(spec).initial_dense_params(), version=3)
    >>> store.set_sync("dense", {"version": 3, "ts_ms": 60_000})
    >>> d = tempfile.mkdtemp()
    >>> with beam.Pipeline() as p:
    ...     _ = (p | beam.Create([(0, DenseGradients({}, ts_ms=60_000, examples=8))])
    ...          | beam.ParDo(ExportDenseModel("memory://export-doc", "dense", spec, d)))
    >>> [os.path.basename(m) for m in list_models(d)]
    ['000000000060000-v0000000003']
    """

    # Keyed state (the input is keyed by the worker's dense key): the export runs in the
    # stage of the PS it follows (on Flink a stateless DoFn here is chained to the reader's
    # stage and got its input only when the input ended), and the last version exported
    # survives a restart.
    LAST_VERSION = ReadModifyWriteStateSpec("export_last_version", VarIntCoder())

    def __init__(self, store_url: str, dense_name: str, spec, model_dir: str,
                 interval_s: float = 60.0, keep: int = 3):
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.store_url = store_url
        self.dense_name = dense_name
        self.spec = spec
        self.model_dir = model_dir
        self.interval_ms = int(interval_s * 1000)
        self.keep = int(keep)
        self.written = Metrics.counter("export", "models_written")
        self.write_ms = Metrics.distribution("export", "write_ms")

    def setup(self):
        from ps.store import open_store
        self.store = open_store(self.store_url, num_shards=None)
        self.module = None
        self.next_ms = None

    def process(self, element, last=beam.DoFn.StateParam(LAST_VERSION)):
        sync = self.store.sync_info().get("dense")  # DenseShard's sync record
        # no output: models go to model_dir (an iterable returned, as Beam expects)
        if not sync or (self.next_ms is not None and sync["ts_ms"] < self.next_ms):
            return ()
        params, version = self.store.read_dense(self.dense_name)
        if params is None or version + 1 == (last.read() or 0):
            return ()
        ts_ms = int(sync["ts_ms"])
        start = time.monotonic()
        if self.module is None:
            self.module = DenseModule(self.spec, params, version, ts_ms)
        path = write_model(self.model_dir, self.spec, params, version, ts_ms, self.keep,
                           meta={"dense_name": self.dense_name, "store": self.store_url,
                                 "tick_ts_ms": int(element[1].ts_ms)}, module=self.module)
        last.write(version + 1)  # 0: nothing exported yet
        self.next_ms = ts_ms + self.interval_ms
        self.written.inc()
        elapsed = int(1000 * (time.monotonic() - start))
        self.write_ms.update(elapsed)
        _LOG.info("export: model version %d (event time %d) -> %s in %d ms", version, ts_ms,
                  path, elapsed)
        return ()
