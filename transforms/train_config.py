"""What :class:`transforms.train.TrainOnline` is configured with: small frozen dataclasses,
checked when they are made (a bad value raises ``ValueError`` naming the field).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from ps.embedding_table import SlotConfig

__all__ = ["SparseConfig", "DenseConfig", "MetricsConfig", "Snapshots", "ModelExport",
           "SlotConfig"]

SPARSE_OPTIMIZERS = ("sgd", "adagrad", "ftrl", "adam")
DENSE_OPTIMIZERS = ("sgd", "adagrad", "ftrl", "adam")


def _at_least(owner, field: str, value, low, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value < low:
        raise ValueError(f"{owner}.{field} must be >= {low}, got {value}")


def _one_of(owner, field: str, value, choices) -> None:
    if isinstance(value, str) and value not in choices:
        raise ValueError(f"{owner}.{field} must be one of {list(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """The sparse parameter servers: embedding rows in cuckoo tables, one per shard.

    Args:
        num_shards: PS shards; fids are routed by ``ps.sharding.shard_of``.
        optimizer: the rows' optimizer: ``sgd``, ``adagrad``, ``ftrl``, ``adam``, a config
            dict or a ``ps.optimizers.Optimizer``.
        learning_rate: overrides the optimizer's rate (None: its default).
        sync_interval_s: event-time seconds between publishes of the touched rows to the
            store serving reads (0: after every batch).
        slots: ``{slot: SlotConfig(threshold, expiry)}``: the occurrences an id needs before
            it gets a row, and the event-time seconds after which an unseen row is evicted.
        init_scale: new rows start uniform in ``[-init_scale, init_scale)`` (None: 0.01 for
            models with embeddings, whose second-order terms cannot start from zero; 0 else).
        evict_interval_s: event-time seconds between eviction passes.
        compact_every: Beam-state log entries before a compaction into a new base.
        filter_bytes: memory of each table's frequency filter.

    Raises:
        ValueError: a value out of range, naming the field.

    >>> SparseConfig(num_shards=4, optimizer="adagrad", learning_rate=0.05).num_shards
    4
    >>> SparseConfig(num_shards=0)
    Traceback (most recent call last):
    ...
    ValueError: SparseConfig.num_shards must be >= 1, got 0
    """

    num_shards: int = 2
    optimizer: object = "adagrad"
    learning_rate: Optional[float] = None
    sync_interval_s: float = 0.0
    slots: Mapping[int, SlotConfig] = dataclasses.field(default_factory=dict)
    init_scale: Optional[float] = None
    evict_interval_s: Optional[float] = 3600.0
    compact_every: int = 64
    filter_bytes: int = 1 << 20

    def __post_init__(self):
        _at_least("SparseConfig", "num_shards", self.num_shards, 1)
        _one_of("SparseConfig", "optimizer", self.optimizer, SPARSE_OPTIMIZERS)
        _at_least("SparseConfig", "learning_rate", self.learning_rate, 0.0, allow_none=True)
        _at_least("SparseConfig", "sync_interval_s", self.sync_interval_s, 0.0)
        _at_least("SparseConfig", "init_scale", self.init_scale, 0.0, allow_none=True)
        _at_least("SparseConfig", "evict_interval_s", self.evict_interval_s, 1.0,
                  allow_none=True)
        _at_least("SparseConfig", "compact_every", self.compact_every, 1)
        _at_least("SparseConfig", "filter_bytes", self.filter_bytes, 64)
        slots = {}
        for slot, policy in dict(self.slots).items():
            if not isinstance(policy, SlotConfig):
                raise ValueError(f"SparseConfig.slots[{slot}] must be a SlotConfig, got "
                                 f"{policy!r}")
            slots[int(slot)] = policy
        object.__setattr__(self, "slots", slots)

    @staticmethod
    def slots_of(feature_config) -> dict:
        """The slot policies of a feature config: its occurrence thresholds and expiries.

        Args:
            feature_config: a ``schemas.feature_config.FeatureConfig``.

        Returns:
            ``{slot: SlotConfig}``, for ``SparseConfig(slots=...)``.

        >>> from schemas.feature_config import FeatureConfig
        >>> SparseConfig.slots_of(FeatureConfig.from_dict({"slots": [
        ...     {"name": "user", "slot": 1, "source": "user_id", "occurrence_threshold": 2}]}))
        {1: SlotConfig(threshold=2, expiry=None)}
        """
        return {s.slot: SlotConfig(int(s.occurrence_threshold), s.expiry_seconds)
                for s in feature_config.slots}


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """The dense parameter server: the model's dense weights, one Beam key.

    Args:
        optimizer: ``sgd``, ``adagrad``, ``ftrl``, ``adam``, a config dict or a
            ``ps.optimizers.Optimizer`` (the row optimizers' dense form).
        learning_rate: overrides the optimizer's rate (None: its default).
        sync_interval_s: event-time seconds between publishes to the store serving reads.
        compact_every: Beam-state log entries before a compaction into a new base.

    Raises:
        ValueError: a value out of range, naming the field.

    >>> DenseConfig(optimizer="sgd", learning_rate=0.1).optimizer
    'sgd'
    >>> DenseConfig(optimizer="rmsprop")
    Traceback (most recent call last):
    ...
    ValueError: DenseConfig.optimizer must be one of ['sgd', 'adagrad', 'ftrl', 'adam'], got 'rmsprop'
    """

    optimizer: object = "adam"
    learning_rate: Optional[float] = None
    sync_interval_s: float = 0.0
    compact_every: int = 64

    def __post_init__(self):
        _one_of("DenseConfig", "optimizer", self.optimizer, DENSE_OPTIMIZERS)
        _at_least("DenseConfig", "learning_rate", self.learning_rate, 0.0, allow_none=True)
        _at_least("DenseConfig", "sync_interval_s", self.sync_interval_s, 0.0)
        _at_least("DenseConfig", "compact_every", self.compact_every, 1)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """Online metrics: every example is scored before it is learned (progressive validation).

    Args:
        window_s: event-time window of the AUC, log loss and calibration rows.
        out_prefix: write ``{out_prefix}.csv``, ``.png`` and ``-totals.json`` (None: Beam
            metrics only).
        title: the plot's title.
        scores_dir: also write every example's score, label, weight, event time and true
            CTR as ``.npz`` files here (``transforms.scores.read_scores``).

    Raises:
        ValueError: ``window_s`` is not > 0.

    >>> MetricsConfig(window_s=600, out_prefix="out/online").window_s
    600
    """

    window_s: float = 3600.0
    out_prefix: Optional[str] = None
    title: str = "Online metrics (progressive validation)"
    scores_dir: Optional[str] = None

    def __post_init__(self):
        if not self.window_s > 0:
            raise ValueError(f"MetricsConfig.window_s must be > 0, got {self.window_s}")


@dataclasses.dataclass(frozen=True)
class Snapshots:
    """PS snapshot files: batch, then online on any runner (DESIGN §4 path b).

    Args:
        export_dir: when a bounded input ends, every shard writes its whole state here.
        restore_dir: shards without state start from the snapshots here (checked when the
            pipeline is built: a damaged or missing snapshot refuses to start).

    >>> Snapshots(export_dir="out/snapshots")   # batch: write them when the input ends
    Snapshots(export_dir='out/snapshots', restore_dir=None)
    """

    export_dir: Optional[str] = None
    restore_dir: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class ModelExport:
    """The dense part as a TensorFlow SavedModel, for serving (``transforms.export``).

    Args:
        model_dir: where the models go (one folder per export; the newest ``keep`` stay).
        interval_s: event-time seconds between exports.
        keep: how many of the newest models to keep.

    Raises:
        ValueError: no ``model_dir``, a negative interval or ``keep`` < 1.

    >>> ModelExport("out/models", interval_s=300).keep
    3
    >>> ModelExport("")
    Traceback (most recent call last):
    ...
    ValueError: ModelExport.model_dir must be a folder, got ''
    """

    model_dir: str
    interval_s: float = 60.0
    keep: int = 3

    def __post_init__(self):
        if not self.model_dir:
            raise ValueError("ModelExport.model_dir must be a folder, got "
                             f"{self.model_dir!r}")
        _at_least("ModelExport", "interval_s", self.interval_s, 0.0)
        _at_least("ModelExport", "keep", self.keep, 1)
