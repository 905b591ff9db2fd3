"""Ranking models: the dense part of a model, as one small interface and its implementations.

The worker owns no variables: embedding rows come from the parameter store, and a model only
says what its dense weights are and how the logits follow from the pooled embeddings and the
dense inputs (:class:`RankingModel`). :class:`transforms.model.Model` runs any of them: it
pools the rows of a batch, calls :meth:`RankingModel.logits` inside its TensorFlow graph and
returns scores and gradients. Serving runs the same graph from the SavedModel training
exports (``transforms.export``), so a model of your own serves without code of ours.

Every fid has one row ``[w | v]``: ``w`` its first-order weight, ``v`` its ``dim``-wide
embedding. Per example and slot, rows are summed (sum pooling), so a model sees
``w [n, S]`` and ``v [n, S, dim]`` for ``S`` slots, and the dense inputs ``dense [n, d]``::

    LogisticRegression   logit = Σ_s w_s + dense · dense_w + bias
    FactorizationMachine LR + ½ Σ_k [(Σ_s v_sk)² − Σ_s v_sk²]
    DeepFM               FM + MLP([v_1, ..., v_S, dense])      (ReLU hidden layers)

A model of your own subclasses one of them (or :class:`RankingModel`, whose docstring
shows one), as a frozen dataclass so that it is hashable and compares by value.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import ClassVar

__all__ = ["RankingModel", "LogisticRegression", "FactorizationMachine", "DeepFM",
           "model_from_name", "model_to_json", "model_from_json", "MODELS"]


class RankingModel:
    """The dense part of a model: what its weights are, and the logits of a batch.

    Subclass it as a frozen dataclass (its fields are the model's hyper-parameters) and
    define :meth:`dense_param_shapes` and :meth:`logits`.

    Attributes:
        name: names the model in logs and in exported models.
        uses_embeddings: whether rows carry an embedding ``v`` (False: rows are ``[w]`` only,
            one weight per fid, and ``v`` is None). Models that use embeddings need one
            embedding dim for every slot (they combine slots' embeddings).

    A model of your own:

    >>> import dataclasses
    >>> import tensorflow as tf
    >>> @dataclasses.dataclass(frozen=True)
    ... class CrossNet(LogisticRegression):          # LR + a DCN-style cross layer on v
    ...     name = "cross"
    ...     uses_embeddings = True
    ...     def dense_param_shapes(self, num_slots, dim, dense_dim):
    ...         width = num_slots * dim
    ...         return {**super().dense_param_shapes(num_slots, dim, dense_dim),
    ...                 "cross/w": (width, 1), "cross/b": (width,), "cross/out": (width, 1)}
    ...     def logits(self, w, v, dense, params):
    ...         x0 = tf.reshape(v, [tf.shape(v)[0], -1])
    ...         x1 = x0 * tf.matmul(x0, params["cross/w"]) + params["cross/b"] + x0
    ...         return (super().logits(w, v, dense, params)
    ...                 + tf.reshape(tf.matmul(x1, params["cross/out"]), [-1]))
    >>> sorted(CrossNet().dense_param_shapes(num_slots=2, dim=4, dense_dim=1))
    ['bias', 'cross/b', 'cross/out', 'cross/w', 'dense_w']
    """

    name: ClassVar[str] = "ranking_model"
    uses_embeddings: ClassVar[bool] = True

    def dense_param_shapes(self, num_slots: int, dim: int, dense_dim: int) -> dict:
        """The dense weights.

        Args:
            num_slots: slots the model pools (``S``).
            dim: embedding width of every slot (0 without embeddings).
            dense_dim: dense inputs per example.

        Returns:
            ``{name: shape}`` in a stable order. 2-D weights start Glorot-uniform, the others
            at zero (:meth:`transforms.model.Model.initial_dense_params`).
        """
        raise NotImplementedError

    def logits(self, w, v, dense, params):
        """The logit of each example, as TensorFlow ops (traced once, no Python per batch).

        Args:
            w: float32 ``[n, S]``, the pooled first-order weights.
            v: float32 ``[n, S, dim]``, the pooled embeddings (None without embeddings).
            dense: float32 ``[n, dense_dim]``.
            params: ``{name: tensor}`` of :meth:`dense_param_shapes`.

        Returns:
            float32 ``[n]``.
        """
        raise NotImplementedError

    def config(self) -> dict:
        """The model's hyper-parameters (its dataclass fields) as JSON-able values."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


@dataclasses.dataclass(frozen=True)
class LogisticRegression(RankingModel):
    """``logit = Σ_s w_s + dense · dense_w + bias``: first-order weights only.

    >>> import tensorflow as tf
    >>> lr = LogisticRegression()
    >>> lr.dense_param_shapes(num_slots=2, dim=0, dense_dim=1)
    {'bias': (1,), 'dense_w': (1,)}
    >>> lr.logits(w=tf.constant([[0.5, 0.25]]), v=None, dense=tf.constant([[2.0]]),
    ...           params={"bias": tf.constant([0.125]), "dense_w": tf.constant([1.0])}).numpy()
    array([2.875], dtype=float32)
    """

    name: ClassVar[str] = "lr"
    uses_embeddings: ClassVar[bool] = False

    def dense_param_shapes(self, num_slots, dim, dense_dim):
        return {"bias": (1,), **({"dense_w": (dense_dim,)} if dense_dim else {})}

    def logits(self, w, v, dense, params):
        import tensorflow as tf
        logits = tf.reduce_sum(w, axis=1) + params["bias"]
        if "dense_w" in params:
            logits += tf.linalg.matvec(dense, params["dense_w"])
        return logits


@dataclasses.dataclass(frozen=True)
class FactorizationMachine(LogisticRegression):
    """LR plus the second-order term ``Σ_{a<b} <v_a, v_b>`` between slots.

    Its gradient with respect to ``v`` is zero while every ``v`` is zero: give the PS tables a
    small initial scale (the training default) so that it can start.

    >>> import tensorflow as tf
    >>> v = tf.constant([[[1.0, 0.0], [1.0, 1.0]]])    # one example, 2 slots, dim 2
    >>> FactorizationMachine().logits(tf.zeros([1, 2]), v, tf.zeros([1, 0]),
    ...                               {"bias": tf.zeros([1])}).numpy()   # <v_1, v_2> = 1
    array([1.], dtype=float32)
    """

    name: ClassVar[str] = "fm"
    uses_embeddings: ClassVar[bool] = True

    def logits(self, w, v, dense, params):
        import tensorflow as tf
        summed = tf.reduce_sum(v, axis=1)  # [n, dim]
        return super().logits(w, v, dense, params) + 0.5 * (
            tf.reduce_sum(tf.square(summed), axis=1) - tf.reduce_sum(tf.square(v), axis=[1, 2]))


@dataclasses.dataclass(frozen=True)
class DeepFM(FactorizationMachine):
    """FM plus an MLP over the slots' embeddings and the dense inputs (the Monolith paper's
    model): ReLU ``hidden`` layers, a linear output.

    Args:
        hidden: the sizes of the hidden layers (one or more, each >= 1).

    >>> shapes = DeepFM(hidden=(8,)).dense_param_shapes(num_slots=2, dim=4, dense_dim=1)
    >>> shapes["mlp/w0"], shapes["mlp/w_out"]          # [v_1, v_2, dense] -> 8 -> 1
    ((9, 8), (8, 1))
    """

    name: ClassVar[str] = "deepfm"
    hidden: tuple = (64, 32)

    def __post_init__(self):
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"DeepFM.hidden must be one or more sizes >= 1, got {self.hidden}")

    def dense_param_shapes(self, num_slots, dim, dense_dim):
        shapes = super().dense_param_shapes(num_slots, dim, dense_dim)
        fan_in = num_slots * dim + dense_dim
        for i, size in enumerate(self.hidden):
            shapes[f"mlp/w{i}"] = (fan_in, size)
            shapes[f"mlp/b{i}"] = (size,)
            fan_in = size
        shapes["mlp/w_out"] = (fan_in, 1)
        shapes["mlp/b_out"] = (1,)
        return shapes

    def logits(self, w, v, dense, params):
        import tensorflow as tf
        n, slots, dim = tf.shape(v)[0], v.shape[1], v.shape[2]
        hidden = tf.concat([tf.reshape(v, [n, slots * dim]), dense], axis=1)
        for i in range(len(self.hidden)):
            hidden = tf.nn.relu(tf.matmul(hidden, params[f"mlp/w{i}"]) + params[f"mlp/b{i}"])
        return super().logits(w, v, dense, params) + (
            tf.reshape(tf.matmul(hidden, params["mlp/w_out"]), [n]) + params["mlp/b_out"])


MODELS = {m.name: m for m in (LogisticRegression, FactorizationMachine, DeepFM)}


def model_from_name(name: str, **config) -> RankingModel:
    """A model from its name.

    Args:
        name: ``lr``, ``fm``, ``deepfm``, or ``package.module:Class`` (a model of your own,
            importable where the pipeline runs); a :class:`RankingModel` is returned as it is.
        **config: the model's fields.

    Returns:
        The :class:`RankingModel`.

    Raises:
        ValueError: an unknown name, or a class that cannot be imported or is not a
            :class:`RankingModel`.

    >>> model_from_name("fm")
    FactorizationMachine()
    >>> model_from_name("transforms.models:DeepFM", hidden=[8])
    DeepFM(hidden=(8,))
    """
    if isinstance(name, RankingModel):
        return name
    if name in MODELS:
        return MODELS[name](**config)
    module, sep, attr = str(name).partition(":")
    if not sep or not attr:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(MODELS)} or "
                         f"'package.module:Class' for a model of your own")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {name!r} cannot be imported: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, RankingModel)):
        raise ValueError(f"model {name!r} is not a RankingModel subclass")
    return cls(**config)


def model_to_json(model: RankingModel) -> dict:
    """A model as JSON-able values, what :func:`model_from_json` reads.

    Args:
        model: a :class:`RankingModel`.

    Returns:
        ``{"class": "module:Class", "config": {...}}``.

    >>> model_to_json(DeepFM(hidden=(8,)))
    {'class': 'transforms.models:DeepFM', 'config': {'hidden': [8]}}
    """
    cls = type(model)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "config": model.config()}


def model_from_json(values: dict) -> RankingModel:
    """The model :func:`model_to_json` described.

    Args:
        values: what :func:`model_to_json` returned.

    Returns:
        The :class:`RankingModel`.
    """
    return model_from_name(values["class"], **values.get("config", {}))
