"""``Model``: runs a ranking model on a batch, its embedding rows and dense weights.

The worker owns no variables: it reads rows from the ParameterStore, calls
:meth:`Model.train_step` and ships the gradients to the parameter-server DoFns (DESIGN §1).
So a model here is a :class:`ModelSpec` (which :class:`transforms.models.RankingModel`, which
slots with which embedding dims, how many dense inputs), the TensorFlow graph of its forward
pass, and the bookkeeping that maps a CSR batch of fids to rows (an example:
:class:`Model`).

Rows and tables
---------------
Every fid has one row ``[w | v]``: ``w`` its first-order weight, ``v`` its ``dim``-wide
embedding. Rows live in one table per row width, named ``f"w{width}"``: a model without
embeddings (LR) uses only ``w`` (``"w1"``), the others ``"w{1 + dim}"``. Those models combine
the slots' embeddings, so they require one ``dim`` for every slot and raise ``ValueError``
otherwise (a per-slot projection would add dense weights whose only job is to hide a feature
config mistake). The slot of a fid is its top bits (``fid >> 48``, Monolith v2 layout); fids
of slots the spec does not list are ignored and counted in :attr:`Model.ignored_fids`. The
forward pass sums each example's rows per slot (sum pooling) and hands ``w [n, S]``,
``v [n, S, dim]`` and the dense inputs to the model's :meth:`RankingModel.logits`.

Loss and its reduction
----------------------
``loss = Σ_i weight_i · BCE(label_i, σ(logit_i))``: a **sum** over the batch, not a mean.
Each row's gradient is then the sum of the gradients of the examples it occurs in, exactly
what per-example online SGD would apply, independent of the batch size: a fid seen once in a
batch of 1024 is not learned 1024 times slower than in a batch of 1, and a per-row optimizer's
learning rate and Adagrad's initial accumulator keep their meaning across batch sizes. The dense
gradients are sums too; a dense optimizer that prefers a mean divides by
``DenseGradients.examples``. The mean log loss of a batch is ``loss / weight.sum()``.

Speed
-----
A worker indexes the batch once and reads exactly its keys, so nothing is matched twice::

    index = model.index(batch)                       # unique fids, occurrence -> row, segment
    rows = {model.spec.table: (index.keys, store_rows_for(index.keys))}
    probs, loss, sparse, dense = model.train_step(batch, rows, dense_params, index=index)

Rows passed in another order (or with extra fids) work too, at the cost of a sort. On one core,
20 slots x dim 8, a DeepFM ``train_step`` takes ~1.2 ms at batch 256 and ~3.4 ms at 1024
(``python -m benchmarks.model``). What made it so: ``tf.sparse.segment_sum`` (gather and
pooling in one op with a dense gradient), ``tf.split`` instead of slicing, four packed graph
arguments called through concrete functions, and a hash-based ``pd.factorize``.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import pandas as pd
import tensorflow as tf

from transforms.example_batch import ExampleBatch
from transforms.models import RankingModel, model_from_json, model_from_name, model_to_json

__all__ = ["ModelSpec", "Model", "BatchIndex", "Gathered"]

SLOT_SHIFT = np.uint64(48)
MAX_SLOT = (1 << 15) - 1


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the model is: its :class:`RankingModel`, the slots it reads with their embedding
    dims, its dense inputs.

    Args:
        model: a :class:`transforms.models.RankingModel`, or a name for
            :func:`transforms.models.model_from_name` (``"lr"``, ``"fm"``, ``"deepfm"``,
            ``"package.module:Class"``).
        slots: ``[(slot id, embedding dim), ...]`` in the order the model pools them.
        dense_dim: dense inputs per example.
        seed: seeds the initial dense weights.

    >>> ModelSpec("deepfm", slots=[(1, 8), (2, 8)], dense_dim=3).tables()
    {'w9': 9}
    >>> ModelSpec("lr", slots=[(1, 8), (2, 16)], dense_dim=0).table_of_slot(2)
    'w1'
    >>> ModelSpec("fm", slots=[(1, 8), (2, 16)], dense_dim=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fm needs one embedding dim for every slot ..., got dims {8: [1], 16: [2]}; ...
    """

    model: RankingModel
    slots: tuple  #: ((slot_id, dim), ...) in the order the model pools them
    dense_dim: int = 0
    seed: int = 0

    def __post_init__(self):
        # Normalise: the spec is hashable, picklable and compares by value.
        object.__setattr__(self, "model", model_from_name(self.model))
        object.__setattr__(self, "slots", tuple((int(s), int(d)) for s, d in self.slots))
        object.__setattr__(self, "dense_dim", int(self.dense_dim))
        if not self.slots:
            raise ValueError("ModelSpec.slots: a model needs at least one slot")
        ids = [s for s, _ in self.slots]
        if len(set(ids)) != len(ids):
            raise ValueError(f"ModelSpec.slots: slot ids repeat: {sorted(ids)}")
        for slot, dim in self.slots:
            if not 0 <= slot <= MAX_SLOT:
                raise ValueError(f"ModelSpec.slots: slot {slot} is outside [0, {MAX_SLOT}] "
                                 f"(15 bits)")
            if dim < 1:
                raise ValueError(f"ModelSpec.slots: slot {slot}: embedding dim must be >= 1, "
                                 f"got {dim}")
        if self.dense_dim < 0:
            raise ValueError(f"ModelSpec.dense_dim must be >= 0, got {self.dense_dim}")
        if self.model.uses_embeddings:
            by_dim: dict = {}
            for slot, dim in self.slots:
                by_dim.setdefault(dim, []).append(slot)
            if len(by_dim) > 1:
                raise ValueError(
                    f"{self.kind} needs one embedding dim for every slot (it combines the "
                    f"slots' embeddings), got dims {by_dim}; set one dim in the feature config "
                    f"or use a model without embeddings ('lr')")

    @classmethod
    def from_feature_config(cls, config, model, seed: int = 0) -> "ModelSpec":
        """The spec of a model over a feature config's slots and dense inputs.

        Args:
            config: a ``schemas.feature_config.FeatureConfig``.
            model: a :class:`transforms.models.RankingModel` or a model name.
            seed: seeds the initial dense weights.

        Returns:
            The :class:`ModelSpec`.
        """
        return cls(model, slots=[(s.slot, s.dim) for s in config.slots],
                   dense_dim=len(config.dense), seed=seed)

    @property
    def kind(self) -> str:
        """The model's name (``lr``, ``fm``, ``deepfm``, or a model of your own's)."""
        return self.model.name

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def dim(self) -> int:
        """Embedding width ``v`` of every slot (0 for a model without embeddings)."""
        return self.slots[0][1] if self.model.uses_embeddings else 0

    @property
    def width(self) -> int:
        """Row width: ``1 + dim``."""
        return 1 + self.dim

    @property
    def table(self) -> str:
        """The one table this model reads (every slot has the same row width)."""
        return f"w{self.width}"

    def tables(self) -> dict:
        """``{table name: row width}`` of the tables the PS must hold for this model."""
        return {self.table: self.width}

    def table_of_slot(self, slot: int) -> str:
        """The table of a slot's rows (every slot's is :attr:`table`).

        Args:
            slot: a slot id of the spec.

        Returns:
            The table name.

        Raises:
            KeyError: the slot is not in the spec.
        """
        if int(slot) not in {s for s, _ in self.slots}:
            raise KeyError(f"slot {slot} is not in the model spec")
        return self.table

    def dense_param_shapes(self) -> dict:
        """``{name: shape}`` of the dense weights, in a stable order."""
        return {name: tuple(int(d) for d in shape) for name, shape in
                self.model.dense_param_shapes(self.num_slots, self.dim, self.dense_dim).items()}

    def to_json(self) -> dict:
        """JSON-able values (exported models carry them); :meth:`from_json` inverts it."""
        return {"model": model_to_json(self.model), "slots": [list(s) for s in self.slots],
                "dense_dim": self.dense_dim, "seed": self.seed}

    @classmethod
    def from_json(cls, values: dict) -> "ModelSpec":
        """The spec of :meth:`to_json`'s values.

        Args:
            values: what :meth:`to_json` returned.

        Returns:
            The :class:`ModelSpec`.

        Raises:
            ValueError: values of a spec written before models were pluggable.
        """
        if "model" not in values:
            raise ValueError("a model spec written before models were pluggable (it has "
                             f"{sorted(values)}): export the model again with this version")
        return cls(model_from_json(values["model"]), slots=values["slots"],
                   dense_dim=values["dense_dim"], seed=values["seed"])


class BatchIndex(NamedTuple):
    """Where each kept fid occurrence of a batch goes (kept: its slot is in the spec).

    Occurrences are sorted by segment, as ``tf.sparse.segment_sum`` wants them. Made by
    :meth:`Model.index`.

    >>> from transforms.example_batch import ExampleBatch
    >>> model = Model(ModelSpec("lr", slots=[(1, 4), (2, 4)]))
    >>> batch = ExampleBatch.from_examples([
    ...     {"fids": [2 << 48 | 9, 1 << 48 | 7], "label": 1, "ts_ms": 0},
    ...     {"fids": [1 << 48 | 7, 3 << 48 | 1], "label": 0, "ts_ms": 0}])
    >>> index = model.index(batch)                  # slot 3 is not in the spec: ignored
    >>> [hex(k) for k in index.keys], index.unique_of_occurrence.tolist()
    (['0x1000000000007', '0x2000000000009'], [0, 1, 0])
    >>> index.segment.tolist(), index.ignored       # example * 2 slots + slot position
    ([0, 1, 2], 1)
    """

    keys: np.ndarray  #: uint64 [u] unique fids in order of first occurrence: the rows to read
    unique_of_occurrence: np.ndarray  #: int32 [m] position of each occurrence's fid in ``keys``
    segment: np.ndarray  #: int32 [m] ``example * num_slots + slot position``, nondecreasing
    ignored: int  #: fid occurrences of slots outside the spec


class Gathered(NamedTuple):
    """The TensorFlow inputs of one batch: rows plus, per occurrence, its row and segment.
    Made by :meth:`Model.gather`.

    >>> from transforms.example_batch import ExampleBatch
    >>> model = Model(ModelSpec("lr", slots=[(1, 4), (2, 4)]))
    >>> batch = ExampleBatch.from_examples([
    ...     {"fids": [2 << 48 | 9, 1 << 48 | 7], "label": 1, "ts_ms": 0},
    ...     {"fids": [1 << 48 | 7], "label": 0, "ts_ms": 0}])
    >>> fids = np.array([2 << 48 | 9, 5, 1 << 48 | 7], np.uint64)   # any order, extra fids
    >>> gathered = model.gather(batch, {"w1": (fids, np.zeros((3, 1), np.float32))})
    >>> gathered.row_of_occurrence.tolist(), gathered.segment.tolist()
    ([2, 0, 2], [0, 1, 2])
    """

    rows: np.ndarray  #: float32 [u', width], as the caller passed them
    row_of_occurrence: np.ndarray  #: int32 [m]
    segment: np.ndarray  #: int32 [m], nondecreasing


class Model:
    """A model's forward pass and gradients as TensorFlow graphs of (rows, batch, dense weights).

    Traced once per ``Model``: every batch dimension is ``None`` in the input signatures, so
    batches of any size and any number of unique fids reuse one graph. The graphs take four
    packed arguments (rows, occurrences, example floats, flat dense weights) because each
    argument of a ``tf.function`` call costs tens of microseconds of Python.

    Args:
        spec: the :class:`ModelSpec`.

    >>> from transforms.example_batch import ExampleBatch
    >>> spec = ModelSpec("fm", slots=[(1, 4), (2, 4)], dense_dim=1)
    >>> spec.tables()                                  # one row per fid: [w | v_0..v_3]
    {'w5': 5}
    >>> model = Model(spec)
    >>> batch = ExampleBatch.from_examples([
    ...     {"fids": [1 << 48 | 7, 2 << 48 | 9], "dense": [0.5], "label": 1, "ts_ms": 0},
    ...     {"fids": [1 << 48 | 7, 3 << 48 | 1], "dense": [0.0], "label": 0, "ts_ms": 0}])
    >>> keys = model.lookup_keys(batch)                # what to read from the store
    >>> [hex(f) for f in keys["w5"]]                    # slot 3 is not in the spec: ignored
    ['0x1000000000007', '0x2000000000009']
    >>> rows = {"w5": (keys["w5"], np.full((2, 5), 0.1, np.float32))}
    >>> probs, loss, sparse, dense = model.train_step(batch, rows, model.initial_dense_params())
    >>> print(probs.round(4))                          # scored before anything is learned
    [0.5597 0.525 ]
    >>> sparse["w5"][1].shape, sorted(dense)
    ((2, 5), ['bias', 'dense_w'])
    """

    def __init__(self, spec: ModelSpec):
        self.spec = spec
        self.ignored_fids = 0  #: running count of fid occurrences of slots outside the spec
        self._dense_shapes = spec.dense_param_shapes()
        self._dense_sizes = [int(np.prod(shape)) for shape in self._dense_shapes.values()]
        self._dense_offsets = np.cumsum([0] + self._dense_sizes)
        self._slot_position = np.full(1 << 16, -1, dtype=np.int64)
        for position, (slot, _) in enumerate(spec.slots):
            self._slot_position[slot] = position
        signature = (
            tf.TensorSpec([None, spec.width], tf.float32, name="rows"),
            tf.TensorSpec([2, None], tf.int32, name="occurrences"),  # row, segment
            tf.TensorSpec([None, 2 + spec.dense_dim], tf.float32, name="examples"),  # y, w, x
            tf.TensorSpec([int(self._dense_offsets[-1])], tf.float32, name="dense_params"),
        )
        # No AutoGraph: the graph functions have no control flow on tensors (their ifs and
        # loops are over the spec), and converting their source took 0.3 s of the trace.
        self._predict_fn = tf.function(self._probs, input_signature=signature, autograph=False)
        self._train_fn = tf.function(self._loss_and_grads, input_signature=signature,
                                     autograph=False)
        self._concrete = {}

    # Calling the concrete functions skips the signature matching of tf.function calls. They
    # are traced at first use (~0.1 s each): a Model made for its dense weights' shapes and
    # initial values (the pipeline's construction, exports), or a worker that never calls
    # predict, traces nothing it does not run.
    @property
    def _predict_graph(self):
        if "predict" not in self._concrete:
            self._concrete["predict"] = self._predict_fn.get_concrete_function()
        return self._concrete["predict"]

    @property
    def _train_graph(self):
        if "train" not in self._concrete:
            self._concrete["train"] = self._train_fn.get_concrete_function()
        return self._concrete["train"]

    # -- parameters -------------------------------------------------------------------------

    def initial_dense_params(self) -> dict:
        """``{name: float32 array}``: Glorot-uniform 2-D weights, zeros elsewhere; from the seed.

        >>> from transforms.models import DeepFM
        >>> model = Model(ModelSpec(DeepFM(hidden=(3,)), [(1, 4), (2, 4)], dense_dim=2))
        >>> for name, value in model.initial_dense_params().items():
        ...     print(name, value.shape)
        bias (1,)
        dense_w (2,)
        mlp/w0 (10, 3)
        mlp/b0 (3,)
        mlp/w_out (3, 1)
        mlp/b_out (1,)
        """
        rng = np.random.default_rng(self.spec.seed)
        params = {}
        for name, shape in self._dense_shapes.items():
            if len(shape) == 2:
                limit = np.sqrt(6.0 / (shape[0] + shape[1]))
                params[name] = rng.uniform(-limit, limit, size=shape).astype(np.float32)
            else:
                params[name] = np.zeros(shape, dtype=np.float32)
        return params

    def flatten_params(self, dense_params: dict) -> np.ndarray:
        """The dense weights as one array, in :meth:`ModelSpec.dense_param_shapes` order.

        Args:
            dense_params: ``{name: array}`` of every dense weight of the spec.

        Returns:
            float32 [total size].

        Raises:
            ValueError: a weight is missing or of the wrong shape.
        """
        missing = self._dense_shapes.keys() - dense_params.keys()
        if missing:
            raise ValueError(f"dense_params lacks {sorted(missing)}")
        flat = np.empty(self._dense_offsets[-1], dtype=np.float32)
        for (name, shape), start, stop in zip(self._dense_shapes.items(), self._dense_offsets,
                                              self._dense_offsets[1:]):
            value = np.asarray(dense_params[name])
            if value.shape != shape:
                raise ValueError(f"dense param {name!r} has shape {value.shape}, expected {shape}")
            flat[start:stop] = value.reshape(-1)
        return flat

    def _unflatten(self, flat: np.ndarray) -> dict:
        return {name: flat[start:stop].reshape(shape)
                for (name, shape), start, stop in zip(self._dense_shapes.items(),
                                                      self._dense_offsets, self._dense_offsets[1:])}

    # -- batch bookkeeping (NumPy, vectorised) ------------------------------------------------

    def index(self, batch: ExampleBatch) -> BatchIndex:
        """Maps each fid occurrence of a batch to its unique fid, slot position and example.

        Args:
            batch: an :class:`ExampleBatch`.

        Returns:
            Its :class:`BatchIndex`.
        """
        fids = np.asarray(batch.fids, dtype=np.uint64)
        position = self._slot_position[(fids >> SLOT_SHIFT).astype(np.int64)]
        kept = position >= 0
        ignored = int(fids.shape[0] - np.count_nonzero(kept))
        example = batch.example_index()
        if ignored:
            fids, position, example = fids[kept], position[kept], example[kept]
        segment = example * self.spec.num_slots + position
        # CSR order is by example already; the stable sort only orders slots within examples.
        order = np.argsort(segment, kind="stable")
        fids, segment = fids[order], segment[order]
        # A hash table (pandas) is ~8x faster than np.unique's sort on 20k fids.
        unique_of_occurrence, keys = pd.factorize(fids, sort=False)
        return BatchIndex(keys.astype(np.uint64, copy=False),
                          unique_of_occurrence.astype(np.int32), segment.astype(np.int32), ignored)

    def lookup_keys(self, batch: ExampleBatch) -> dict:
        """The rows a step on a batch reads.

        Args:
            batch: an :class:`ExampleBatch`.

        Returns:
            ``{table: unique fids}``.
        """
        return {self.spec.table: self.index(batch).keys}

    def gather(self, batch: ExampleBatch, rows_by_table: dict,
               index: BatchIndex | None = None) -> Gathered:
        """Attaches rows to a batch's fid occurrences.

        Args:
            batch: an :class:`ExampleBatch`.
            rows_by_table: ``{table: (fids uint64[u], rows float32[u, width])}``; ``fids`` may
                be in any order and hold extra fids.
            index: the batch's :meth:`index`, if the caller computed it already.

        Returns:
            The :class:`Gathered` inputs of the graph.

        Raises:
            ValueError: a fid of a kept occurrence has no row, or the rows have the wrong
                shape.
        """
        index = self.index(batch) if index is None else index
        self.ignored_fids += index.ignored
        table, width = self.spec.table, self.spec.width
        if table not in rows_by_table:
            raise ValueError(f"rows_by_table has no table {table!r} (has {sorted(rows_by_table)})")
        fids, rows = rows_by_table[table]
        fids = np.asarray(fids, dtype=np.uint64)
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape != (fids.shape[0], width):
            raise ValueError(f"table {table!r}: rows have shape {rows.shape}, expected "
                             f"({fids.shape[0]}, {width})")
        if fids.shape == index.keys.shape and np.array_equal(fids, index.keys):
            row_of_occurrence = index.unique_of_occurrence  # the caller read lookup_keys()
        else:
            row_of_occurrence = self._positions(table, fids, index.keys)[index.unique_of_occurrence]
        return Gathered(rows, row_of_occurrence, index.segment)

    @staticmethod
    def _positions(table, fids, keys):
        """int32 [len(keys)]: where each key is in ``fids`` (any order, maybe extra fids)."""
        if len(keys) == 0:
            return np.zeros(0, dtype=np.int32)
        absent = keys
        if len(fids):
            order = np.argsort(fids, kind="stable")
            at = order[np.minimum(np.searchsorted(fids, keys, sorter=order), len(fids) - 1)]
            absent = keys[fids[at] != keys]
        if len(absent):
            raise ValueError(f"table {table!r}: {len(absent)} fids of the batch have no row, "
                             f"e.g. {[hex(int(f)) for f in absent[:3]]}")
        return at.astype(np.int32)

    def _inputs(self, batch, rows_by_table, dense_params, index):
        gathered = self.gather(batch, rows_by_table, index)
        n = len(batch)
        examples = np.empty((n, 2 + self.spec.dense_dim), dtype=np.float32)
        examples[:, 0] = batch.label
        examples[:, 1] = batch.weight
        examples[:, 2:] = np.asarray(batch.dense).reshape(n, self.spec.dense_dim)
        occurrences = np.stack([gathered.row_of_occurrence, gathered.segment])
        return gathered.rows, occurrences, examples, self.flatten_params(dense_params)

    # -- public steps -------------------------------------------------------------------------

    def predict(self, batch: ExampleBatch, rows_by_table: dict, dense_params: dict,
                index: BatchIndex | None = None) -> np.ndarray:
        """The click probability of each example of a batch.

        Args:
            batch, rows_by_table, index: as :meth:`gather`'s.
            dense_params: the dense weights, ``{name: array}``.

        Returns:
            float32 [n].
        """
        return self._predict_graph(*self._inputs(batch, rows_by_table, dense_params,
                                                 index)).numpy()

    def train_step(self, batch: ExampleBatch, rows_by_table: dict, dense_params: dict,
                   index: BatchIndex | None = None):
        """One step of the weighted log loss (a sum, see the module docstring).

        Args:
            batch, rows_by_table: as :meth:`gather`'s.
            dense_params: the dense weights, ``{name: array}``.
            index: the batch's :meth:`index`, if the caller computed it already (to read
                the rows).

        Returns:
            ``(probs, loss, sparse_grads, dense_grads)``: ``probs`` [n] are the predictions
            of the parameters given, before any update; ``sparse_grads = {table: (fids,
            grads float32[u, width])}``, aligned with the fids passed in ``rows_by_table``
            (a fid repeated in the batch gets the sum of its occurrences' gradients);
            ``dense_grads = {name: float32 array}``.
        """
        probs, loss, row_grads, param_grads = self._train_graph(
            *self._inputs(batch, rows_by_table, dense_params, index))
        fids = np.asarray(rows_by_table[self.spec.table][0], dtype=np.uint64)
        sparse = {self.spec.table: (fids, row_grads.numpy())}
        return probs.numpy(), float(loss), sparse, self._unflatten(param_grads.numpy())

    def tracing_count(self) -> int:
        """Graphs traced so far by predict and train_step: 2, whatever the batches."""
        return (self._predict_fn.experimental_get_tracing_count()
                + self._train_fn.experimental_get_tracing_count())

    # -- the graph ----------------------------------------------------------------------------

    def logits_graph(self, rows, occurrences, examples, flat_params):
        """The logits as TensorFlow ops (what the exported SavedModel runs): pooling, then
        :meth:`RankingModel.logits`.

        Args:
            rows: float32 [u, width] tensor.
            occurrences: int32 [2, m] tensor: each occurrence's row and segment.
            examples: float32 [n, 2 + dense_dim] tensor: label, weight, dense inputs.
            flat_params: float32 tensor of :meth:`flatten_params`.

        Returns:
            float32 [n] tensor.
        """
        spec = self.spec
        params = {name: tf.reshape(p, shape) for (name, shape), p in zip(
            self._dense_shapes.items(), tf.split(flat_params, self._dense_sizes))}
        n = tf.shape(examples)[0]
        dense = examples[:, 2:]
        # Gather and sum pooling in one op; its gradient is dense [u, width] (rows summed).
        pooled = tf.sparse.segment_sum(rows, occurrences[0], occurrences[1],
                                       num_segments=n * spec.num_slots)
        pooled = tf.reshape(pooled, [n, spec.num_slots, spec.width])
        # tf.split, not slicing: the gradient of a strided slice (StridedSliceGrad) cost more
        # than the rest of the DeepFM step together.
        if spec.dim:
            w, v = tf.split(pooled, [1, spec.dim], axis=2)
        else:
            w, v = pooled, None
        return spec.model.logits(tf.reshape(w, [n, spec.num_slots]), v, dense, params)

    def _probs(self, rows, occurrences, examples, flat_params):
        return tf.sigmoid(self.logits_graph(rows, occurrences, examples, flat_params))

    def _loss_and_grads(self, rows, occurrences, examples, flat_params):
        with tf.GradientTape() as tape:
            tape.watch(rows)
            tape.watch(flat_params)
            logits = self.logits_graph(rows, occurrences, examples, flat_params)
            loss = tf.reduce_sum(examples[:, 1] * tf.nn.sigmoid_cross_entropy_with_logits(
                labels=examples[:, 0], logits=logits))
        row_grads, param_grads = tape.gradient(loss, (rows, flat_params))
        return tf.sigmoid(logits), loss, tf.convert_to_tensor(row_grads), param_grads
