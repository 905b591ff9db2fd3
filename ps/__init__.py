"""The parameter server: its data structures (Beam-free) and its Beam DoFns.

* ``EmbeddingTable``: collisionless cuckoo table from uint64 fids to float32 rows, with a
  frequency filter, per-slot expiry in event time, row optimizers, deltas and snapshots.
* ``FrequencyFilter``: bounded-memory count-min sketch deciding when an id deserves a row.
* ``SGD``, ``Adagrad``, ``FTRL``, ``Adam``: optimizers whose state lives in the row (and, for
  dense weights, in arrays beside them).
* ``ps.envelope``: the one binary layout of everything the PS writes (``SnapshotError`` when it
  cannot be read); ``ps.snapshot_files``: PS snapshot files; ``ps.store``: the
  ``ParameterStore`` (memory or redis); ``ps.sharding``, ``ps.gradients``.
* The DoFns, the only modules that import Beam: ``ps.sparse_shard.SparseShard``,
  ``ps.dense_shard.DenseShard`` and their state machinery ``ps.shard_state``. This package's
  ``__init__`` does not import them.
"""

from ._jit import EMPTY_FID
from .embedding_table import BUCKET_SIZE, Delta, EmbeddingTable, SlotConfig, TableStats, slot_of
from .frequency_filter import FrequencyFilter
from .optimizers import FTRL, SGD, Adagrad, Adam, Optimizer, optimizer_from_config
from .envelope import SnapshotError

__all__ = [
    "EmbeddingTable",
    "SlotConfig",
    "Delta",
    "TableStats",
    "slot_of",
    "EMPTY_FID",
    "BUCKET_SIZE",
    "FrequencyFilter",
    "Optimizer",
    "SGD",
    "Adagrad",
    "FTRL",
    "Adam",
    "optimizer_from_config",
    "SnapshotError",
]
