"""Benchmark of ``ps.EmbeddingTable`` against the naive baseline, on one core.

    python -m benchmarks.table --json              # 1,000,000 keys, batches of 65,536
    python -m benchmarks.table --keys 200000 --batch 4096

The baseline is what one would write without a table: a Python ``dict`` from fid to row index
plus a NumPy row matrix grown by doubling, used batch-wise (``tolist`` + ``dict`` + one fancy
index), measured on the same keys. The process is pinned to one CPU and JIT compilation is done
before timing. Throughputs are the best of ``--repeat`` passes, timed by default with the CPU
time of the benchmarking thread (``--clock cpu``: user + system, page faults included), so that
other processes sharing the machine do not decide the result; on an idle machine it equals the
wall-clock time (``--clock wall``).
"""

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import os
import platform
import time

import numpy as np

from dataflow import cli
from ps import Adagrad, EmbeddingTable
from schemas import strict_json

_CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def _best_time(run, repeat, clock):
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        run()
        best = min(best, clock() - start)
    return best


def _batches(array, batch):
    return [array[i : i + batch] for i in range(0, len(array), batch)]


def _pin_to_one_core():
    try:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


def _warm_up(dim):
    table = EmbeddingTable(dim, Adagrad(), capacity=8)
    fids = np.arange(1000, dtype=np.uint64)
    table.insert(fids, now=1)
    table.lookup(fids)
    table.apply_gradients(fids, np.ones((1000, dim), np.float32), now=2)


def run(num_keys=1_000_000, batch=65_536, dim=16, repeat=3, seed=0, clock="cpu"):
    _pin_to_one_core()
    timer = _CLOCKS[clock]
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, 2**64 - 1, size=num_keys, dtype=np.uint64))  # all ones is reserved
    rng.shuffle(keys)
    num_keys = keys.size
    queries = keys[rng.integers(0, num_keys, size=num_keys)]  # present keys, random order
    grads = rng.standard_normal((batch, dim), dtype=np.float32)
    key_batches, query_batches = _batches(keys, batch), _batches(queries, batch)
    optimizer = Adagrad()
    _warm_up(dim)

    # --- EmbeddingTable: insert new keys into a table that starts small and grows
    tables = []

    def insert_all():
        tables.clear()  # free the previous pass's table first, as the baseline does
        table = EmbeddingTable(dim, optimizer)
        for t, b in enumerate(key_batches):
            table.insert(b, now=t)
        tables.append(table)

    def insert_presized():
        tables.clear()
        table = EmbeddingTable(dim, optimizer, capacity=num_keys)
        for t, b in enumerate(key_batches):
            table.insert(b, now=t)

    presized_time = _best_time(insert_presized, repeat, timer)
    insert_time = _best_time(insert_all, repeat, timer)
    table = tables[-1]
    lookup_time = _best_time(lambda: [table.lookup(b) for b in query_batches], repeat, timer)
    apply_time = _best_time(
        lambda: [table.apply_gradients(b, grads[: len(b)], now=1000) for b in query_batches], repeat, timer
    )
    assert len(table) == num_keys and table.lookup(keys[:1000])[1].all()

    # --- baseline: dict fid -> row index, plus a NumPy row matrix
    width = table.width
    initial_row = np.concatenate([np.zeros(dim, np.float32), optimizer.initial_slots(dim)])
    state = {}

    def dict_insert_all():
        state.clear()
        index, matrix = {}, np.empty((1024, width), np.float32)
        for b in key_batches:
            start = len(index)
            index.update(zip(b.tolist(), range(start, start + len(b))))
            if len(index) > len(matrix):
                grown = np.empty((max(len(index), 2 * len(matrix)), width), np.float32)
                grown[:start] = matrix[:start]
                matrix = grown
            matrix[start : len(index)] = initial_row
        state["index"], state["matrix"] = index, matrix

    dict_insert_time = _best_time(dict_insert_all, repeat, timer)
    index, matrix = state["index"], state["matrix"]

    def dict_lookup_all():
        for b in query_batches:
            rows = np.fromiter(map(index.__getitem__, b.tolist()), dtype=np.intp, count=len(b))
            matrix[rows, :dim]

    dict_lookup_time = _best_time(dict_lookup_all, repeat, timer)

    result = {
        "keys": int(num_keys),
        "batch": int(batch),
        "dim": dim,
        "optimizer": "adagrad",
        "lookup_keys_per_s": num_keys / lookup_time,
        "insert_keys_per_s": num_keys / insert_time,
        "insert_presized_keys_per_s": num_keys / presized_time,  # capacity given up front: no growth
        "apply_rows_per_s": num_keys / apply_time,
        "dict_lookup_keys_per_s": num_keys / dict_lookup_time,
        "dict_insert_keys_per_s": num_keys / dict_insert_time,
        "lookup_vs_dict": dict_lookup_time / lookup_time,
        "insert_vs_dict": dict_insert_time / insert_time,
        "load_factor": table.load_factor,
        "capacity": table.capacity,
        "rehashes": table.stats.rehashes,
        "bytes_per_entry": table.memory_bytes() / len(table),
        "payload_bytes_per_entry": table.payload_bytes_per_entry(),
        "repeat": repeat,
        "clock": clock,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    result["bytes_vs_payload"] = result["bytes_per_entry"] / result["payload_bytes_per_entry"]
    try:
        import numba

        result["numba"] = numba.__version__
    except ImportError:  # pragma: no cover
        pass
    return result


def main(argv=None):
    parser = cli.argument_parser(prog="python -m benchmarks.table", description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000, help="number of distinct random uint64 keys")
    parser.add_argument("--batch", type=int, default=65_536, help="keys per call")
    parser.add_argument("--dim", type=int, default=16, help="embedding dimension")
    parser.add_argument("--repeat", type=int, default=3, help="timed passes per measurement (best is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=sorted(_CLOCKS), default="cpu", help="cpu: thread CPU time; wall")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(args.keys, args.batch, args.dim, args.repeat, args.seed, args.clock)
    if args.json:
        print(strict_json.dumps(result))
    else:
        width = max(map(len, result))
        for k, v in result.items():
            print(f"{k:<{width}}  {v:,.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
