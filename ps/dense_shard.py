"""DenseShard: the parameter-server DoFn that owns the dense (non-embedding) weights.

Keyed by a constant: it applies the dense gradient batches with an optimizer of
``ps.optimizers`` (``apply_dense``), keeps the weights and optimizer slots in Beam state and
publishes them to a ``ps.store.ParameterStore``; the state, exactly-once and publishing
machinery (and its invariants L1-L5) is ``ps.shard_state``'s.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from ps.envelope import open_envelope, seal_arrays
from ps.optimizers import as_optimizer
from ps.shard_state import LiveState, LoggedShard, shard_timers

__all__ = ["DenseShard"]


class DenseShard(LoggedShard):
    """Keyed by a constant; input ``(key, ps.gradients.DenseGradients)``.

    Args:
        store_url: the ``ParameterStore`` to publish to.
        name: the dense parameter set's name in the store (``write_dense(name, …)``).
        initial_params: ``{variable name: array}``, the model's initial dense weights.
        optimizer: ``"adam" | "adagrad" | "sgd" | "ftrl"``, a config dict or a
            ``ps.optimizers.Optimizer`` (default Adam, lr 0.001); ``lr`` overrides its rate.
        sync_interval_s: event-time seconds between publishes (0: after every input).
        train_store_url: a training view (``ps.store.view_url(store_url, "train")``) to
            publish to after every input, so that training reads fresh parameters while
            ``store_url`` (serving) lags by the sync interval; None: no such view.
        compact_every: log entries after which the log is compacted into a new base.
        export_dir: where each key writes its snapshot file when a bounded input ends
            (None: no export; ``ps.shard_state``).
        restore_dir: the snapshot files keys without state start from, each checked when the
            DoFn is constructed (None: start empty).

    The published version is the number of gradient batches applied (``seq``).

    >>> import apache_beam as beam
    >>> from ps.gradients import DenseGradients
    >>> from ps.store import open_store
    >>> grads = [(0, DenseGradients({"w": np.ones(2, np.float32)}, 1_700_000_000_000 + i, 8))
    ...          for i in range(3)]
    >>> with beam.Pipeline() as p:
    ...     _ = p | beam.Create(grads) | beam.ParDo(DenseShard(
    ...         "memory://dense-example", "dense", {"w": np.zeros(2, np.float32)},
    ...         optimizer="sgd", lr=0.5, sync_interval_s=0))
    >>> params, version = open_store("memory://dense-example", None).read_dense("dense")
    >>> params["w"].tolist(), version
    ([-1.5, -1.5], 3)
    """

    KIND = "dense"
    LOG_KINDS = ("dense-grads",)
    SYNC, EXPORT, on_sync, on_export = shard_timers(KIND)

    def __init__(self, store_url: str, name: str, initial_params: Dict[str, np.ndarray], *,
                 optimizer="adam", lr: Optional[float] = None, sync_interval_s: float = 10,
                 compact_every: int = 64, export_dir: Optional[str] = None,
                 restore_dir: Optional[str] = None, train_store_url: Optional[str] = None):
        super().__init__(store_url, None, sync_interval_s, compact_every, export_dir,
                         restore_dir, train_store_url)
        self.name = str(name)
        self.initial_params = {str(k): np.array(v, dtype=np.float32) for k, v in initial_params.items()}
        self.optimizer = as_optimizer(optimizer, lr)
        self.gradient_batches = Metrics.counter("ps", "dense_gradient_batches")
        # wall time of one gradient record, state and publishing included (docs/scaling.md)
        self.apply_us = Metrics.distribution("ps", "dense_apply_us")

    def _snapshot_key(self, key) -> str:
        return self.name

    def _empty(self, key):
        live = LiveState()
        live.params = {k: v.copy() for k, v in self.initial_params.items()}
        live.slots = {k: self.optimizer.dense_slots(v) for k, v in live.params.items()}
        live.steps = {k: 0 for k in live.params}
        return live

    def _encode_base(self, live):
        arrays = {f"p/{k}": v for k, v in live.params.items()}
        for k, slots in live.slots.items():
            arrays.update({f"s/{s}/{k}": v for s, v in slots.items()})
        return seal_arrays("dense-state", arrays, seq=live.seq, ts_ms=live.ts_ms, steps=live.steps,
                           totals=live.totals, optimizer=self.optimizer.config())

    def _decode_base(self, key, data):
        envelope = open_envelope(data, "dense-state")
        arrays = envelope.arrays()
        meta = envelope.header
        live = LiveState()
        live.seq, live.ts_ms, live.steps = meta["seq"], meta["ts_ms"], dict(meta["steps"])
        live.totals = dict(meta.get("totals", {}))
        live.params = {k[2:]: v for k, v in arrays.items() if k.startswith("p/")}
        live.slots = {k: {} for k in live.params}
        for k, v in arrays.items():
            if k.startswith("s/"):
                _, slot, param = k.split("/", 2)
                live.slots[param][slot] = v
        missing = set(self.initial_params) - set(live.params)
        if missing:
            raise ValueError(f"DenseShard {self.name}: restored state lacks parameters {sorted(missing)}")
        return live

    def _apply_grads(self, live, grads, ts_ms, examples):
        for k, g in grads.items():
            live.steps[k] += 1
            self.optimizer.apply_dense(live.params[k], live.slots[k], g, live.steps[k])
        live.totals["examples"] = live.totals.get("examples", 0) + int(examples)
        live.totals["batches"] = live.totals.get("batches", 0) + 1
        live.ts_ms = max(live.ts_ms, ts_ms)
        live.dirty = True

    def _replay(self, live, entry):
        self._apply_grads(live, entry.arrays(), entry.header["ts_ms"], entry.header["examples"])

    def _reconcile(self, key, live):
        self._publish(key, live)
        if self.train_store_url:
            self._publish_train(key, live)

    def _publish(self, key, live):
        self._publish_to(self.store, live)

    def _publish_train(self, key, live):
        self._publish_to(self.train_store, live)

    def _publish_to(self, store, live):
        store.write_dense(self.name, live.params, int(live.seq))
        store.set_sync("dense", self._sync_record(live))

    def process(self, element, base=beam.DoFn.StateParam(LoggedShard.BASE),
                log=beam.DoFn.StateParam(LoggedShard.LOG),
                version=beam.DoFn.StateParam(LoggedShard.VERSION),
                sync_timer=beam.DoFn.TimerParam(SYNC),
                export_timer=beam.DoFn.TimerParam(EXPORT),
                window=beam.DoFn.WindowParam):
        started = time.perf_counter()
        self._check_window(window)
        key, g = element
        grads = {}
        for k, v in g.grads.items():
            if k not in self.initial_params:
                raise ValueError(f"DenseShard {self.name}: gradient for unknown parameter {k!r}")
            v = np.ascontiguousarray(v, dtype=np.float32)
            if v.shape != self.initial_params[k].shape:
                raise ValueError(f"DenseShard {self.name}: gradient of {k!r} has shape {v.shape}, "
                                 f"the parameter {self.initial_params[k].shape}")
            grads[k] = v
        ts_ms = int(g.ts_ms)
        live = self._live(key, base, log, version)
        self._arm_export(live, export_timer)
        examples = int(g.examples)
        if not 0 <= examples < 2**32:
            raise ValueError(f"DenseShard {self.name}: examples {examples} is out of range")
        entry = seal_arrays("dense-grads", grads, seq=live.seq + 1, ts_ms=ts_ms, examples=examples)
        self._apply_grads(live, grads, ts_ms, examples)
        live.seq += 1
        self._append(live, entry, base, log, version)
        self.gradient_batches.inc()
        self._maybe_publish(key, live, sync_timer)
        self.log_entries_dist.update(live.log_entries)
        self.apply_us.update(int(1e6 * (time.perf_counter() - started)))
        return ()  # no output: the PS publishes to the store
