"""A model of your own: a factorization machine plus a DCN-style cross layer.

Train it with ``python -m dataflow.train backfill --model examples.cross_network:CrossNetwork
...`` (from the repository's root, so that ``examples`` is importable), or in Python with
``TrainOnline(ModelSpec.from_feature_config(config, CrossNetwork()), ...)``; serve it with
``python -m dataflow.serve --model_kind examples.cross_network:CrossNetwork --model DIR ...``.
Serving runs the SavedModel that training exports: the graph below, no code of ours.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from transforms.models import FactorizationMachine


@dataclasses.dataclass(frozen=True)
class CrossNetwork(FactorizationMachine):
    """FM + ``layers`` cross layers over the slots' embeddings (Wang et al. 2017, DCN):
    ``x_{l+1} = x_0 * (x_l · w_l) + b_l + x_l``, then a linear output."""

    name: ClassVar[str] = "cross_network"
    layers: int = 2

    def dense_param_shapes(self, num_slots, dim, dense_dim):
        width = num_slots * dim
        shapes = super().dense_param_shapes(num_slots, dim, dense_dim)
        for layer in range(self.layers):
            shapes[f"cross/w{layer}"] = (width, 1)
            shapes[f"cross/b{layer}"] = (width,)
        shapes["cross/out"] = (width, 1)
        return shapes

    def logits(self, w, v, dense, params):
        import tensorflow as tf
        x0 = tf.reshape(v, [tf.shape(v)[0], v.shape[1] * v.shape[2]])
        x = x0
        for layer in range(self.layers):
            x = x0 * tf.matmul(x, params[f"cross/w{layer}"]) + params[f"cross/b{layer}"] + x
        return (super().logits(w, v, dense, params)
                + tf.reshape(tf.matmul(x, params["cross/out"]), [-1]))
