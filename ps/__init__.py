"""Parameter-server shard building blocks, independent of Beam.

* ``EmbeddingTable``: collisionless cuckoo table from uint64 fids to float32 rows, with a
  frequency filter, per-slot expiry in event time, row optimizers, deltas and snapshots.
* ``FrequencyFilter``: bounded-memory count-min sketch deciding when an id deserves a row.
* ``SGD``, ``Adagrad``, ``FTRL``, ``Adam``: optimizers whose state lives in the row.
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
