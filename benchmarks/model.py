"""Milliseconds per ``Model.train_step`` (LR, FM, DeepFM) on one core.

    python -m benchmarks.model                    # 20 slots x dim 8, batches of 256 and 1024
    python -m benchmarks.model --json --batches 256 --kinds deepfm

Each example has one fid per slot (20 fids), drawn from a long-tailed id distribution, plus 4
dense values. ``step`` is the whole call (index the batch's fids, gather, TensorFlow forward +
backward, NumPy out); ``index`` is its NumPy bookkeeping alone. Times are medians of
``--repeat`` calls after warm-up (tracing), and the best one (the machine may be shared). The process and TensorFlow use one CPU.
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import os
import time

import numpy as np

from dataflow import cli
from schemas import strict_json


def _pin_to_one_core():
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


def synthetic_batch(n: int, slots: int, dense_dim: int, rng):
    """An ExampleBatch of ``n`` examples with one long-tailed id per slot."""
    from transforms.example_batch import ExampleBatch
    ids = rng.zipf(1.3, size=(n, slots)).astype(np.uint64) % np.uint64(1 << 40)
    fids = (np.arange(1, slots + 1, dtype=np.uint64)[None, :] << np.uint64(48)) | ids
    return ExampleBatch(
        fids=fids.reshape(-1), row_splits=np.arange(n + 1, dtype=np.int64) * slots,
        dense=rng.normal(size=(n, dense_dim)).astype(np.float32),
        label=(rng.random(n) < 0.3).astype(np.float32), weight=np.ones(n, np.float32),
        ts_ms=np.zeros(n, np.int64), true_ctr=np.full(n, np.nan, np.float32))


def measure(kind: str, batch_size: int, slots: int = 20, dim: int = 8, dense_dim: int = 4,
            repeat: int = 200) -> dict:
    from transforms.model import Model, ModelSpec
    rng = np.random.default_rng(0)
    model = Model(ModelSpec(kind, [(s, dim) for s in range(1, slots + 1)], dense_dim))
    params = model.initial_dense_params()
    batches = [synthetic_batch(batch_size, slots, dense_dim, rng) for _ in range(8)]
    inputs = []
    for batch in batches:
        keys = model.lookup_keys(batch)[model.spec.table]
        rows = rng.normal(scale=0.05, size=(len(keys), model.spec.width)).astype(np.float32)
        inputs.append((batch, {model.spec.table: (keys, rows)}))
    for batch, rows in inputs:  # warm-up: trace once
        model.train_step(batch, rows, params)
    step, index = [], []
    for i in range(repeat):
        batch, rows = inputs[i % len(inputs)]
        start = time.perf_counter()
        model.train_step(batch, rows, params)
        step.append(time.perf_counter() - start)
        start = time.perf_counter()
        model.index(batch)
        index.append(time.perf_counter() - start)
    return {"kind": kind, "batch": batch_size, "slots": slots, "dim": dim,
            "unique_fids": int(np.mean([len(r[model.spec.table][0]) for _, r in inputs])),
            "step_ms": round(1e3 * float(np.median(step)), 3),
            "best_step_ms": round(1e3 * float(np.min(step)), 3),
            "index_ms": round(1e3 * float(np.median(index)), 3),
            "examples_per_s": int(batch_size / np.median(step)),
            "tracings": model.tracing_count()}


def main(argv=None):
    parser = cli.argument_parser(prog="python -m benchmarks.model", description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="lr,fm,deepfm")
    parser.add_argument("--batches", default="256,1024")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    _pin_to_one_core()
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    results = [measure(kind, int(b), repeat=args.repeat)
               for kind in args.kinds.split(",") for b in args.batches.split(",")]
    for r in results:
        print(strict_json.dumps(r) if args.json else
              f"{r['kind']:7s} batch {r['batch']:5d}: {r['step_ms']:6.2f} ms/step "
              f"(best {r['best_step_ms']:.2f}) "
              f"(index {r['index_ms']:.2f} ms, {r['unique_fids']} unique fids), "
              f"{r['examples_per_s']:,} examples/s")
    return results


if __name__ == "__main__":
    main()
