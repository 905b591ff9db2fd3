"""What workers send the parameter servers: gradient batches for the sparse rows of one PS
shard, and for the dense weights. Plain NumPy records; Beam carries them between DoFns.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["SparseGradients", "DenseGradients"]


class SparseGradients(NamedTuple):
    """Gradients for the rows of one embedding table, bound for one PS shard.

    ``fids`` may repeat (one entry per occurrence); the shard sums them before one step.
    """

    table: str  #: embedding table name (one per embedding width, e.g. "dim8")
    fids: np.ndarray  #: uint64 [n]
    grads: np.ndarray  #: float32 [n, width]
    ts_ms: int  #: largest event time of the examples the gradients come from
    examples: int  #: how many examples produced them


class DenseGradients(NamedTuple):
    """Gradients of the dense (non-embedding) weights, by variable name."""

    grads: dict  #: {name: float32 array}
    ts_ms: int
    examples: int
