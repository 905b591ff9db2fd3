"""What training costs one Redis ParameterStore, and one instance's ceiling:
``python -m benchmarks.store --json``.

In one run, against a private redis-server (``dataflow.closed_loop.processes.start_redis``):

1. ``training``: ``python -m benchmarks.train`` (DirectRunner, deepfm) against the Redis store,
   once per mode: ``sync_every_batch`` (the default: the PS publishes after every input),
   ``sync_60s`` and ``sync_3600s`` (``--sync_interval_s=S --dense_sync_interval_s=S``: the PS
   publishes every input to the training view and every S s of event time to serving; the
   worker reads both; a batch of this stream spans ~20 min of event time, so at 60 s the
   serving view is published after every input as well). Redis's ``INFO commandstats`` /
   ``INFO stats`` and redis-server's CPU time are read before and after each run: commands
   by name, bytes in and out, and redis CPU microseconds (net of its idle timers' CPU), per
   example and per batch. CPU time is the sum of its threads' ``/proc/PID/task/*/schedstat``
   (nanoseconds); ``/proc/PID/stat``'s utime + stime (10 ms ticks) is reported beside it.
2. ``ceiling``: K = 1, 2, 4 client processes each replay the per-batch request mix of
   ``sync_every_batch`` with the real ``RedisStore`` methods (``read_dense``, ``read_rows`` of a
   batch's fids at the model's width, ``write_rows`` of its gradient rows per PS shard,
   ``write_dense`` of the real dense set, ``set_sync`` per publisher) as fast as they can:
   examples/s equivalent, commands/s, redis CPU % at each K. On a small machine the clients
   compete with redis-server for the cores, so the honest capacity of one instance is
   ``capacity``: 1 core / redis CPU seconds per example.

    python -m benchmarks.store --json                   # 30k requests, 4 s per K
    python -m benchmarks.store --json --quick           # a smoke run (small, 1 s per K)
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import json
import logging
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from dataflow import cli
from schemas import strict_json

_LOG = logging.getLogger(__name__)

#: the training modes measured: name → dataflow.train flags
#: (a batch of the synthetic stream spans ~20 min of event time: at 60 s the PS publishes the
#: serving view after every input too; at 3600 s every few batches)
MODES = {"sync_every_batch": [],
         "sync_60s": ["--sync_interval_s=60", "--dense_sync_interval_s=60"],
         "sync_3600s": ["--sync_interval_s=3600", "--dense_sync_interval_s=3600"]}
#: --quick's modes (3000 requests: a batch spans ~1 h of event time, sync_3600s ~ sync_60s)
QUICK_MODES = ("sync_every_batch", "sync_60s")
#: commands the benchmark itself sends between its snapshots (not training's)
OWN_COMMANDS = ("info",)
#: a Flink worker's rate on this project (docs/flink.md): what one instance is compared with
FLINK_WORKER_EXAMPLES_PER_S = (10_000, 20_000)


def redis_cpu_seconds(pid: int) -> float:
    """redis-server's CPU seconds (user + system, /proc/PID/stat fields 14 and 15: whole
    clock ticks, 10 ms here; see :func:`redis_run_seconds`)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def redis_run_seconds(pid: int) -> float:
    """redis-server's time on a CPU, to the nanosecond: the sum over its threads of
    /proc/PID/task/TID/schedstat's first field (the same time as utime + stime, without
    their 10 ms ticks, too coarse for a short run)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return total / 1e9


def snapshot(client, pid: int) -> dict:
    """Redis's counters now: commands by name (calls, usec), totals, bytes, CPU seconds."""
    stats = client.info("stats")
    commands = {name[len("cmdstat_"):]: {"calls": v["calls"], "usec": v["usec"]}
                for name, v in client.info("commandstats").items()}
    return {"commands": commands, "total_commands": stats["total_commands_processed"],
            "bytes_in": stats["total_net_input_bytes"],
            "bytes_out": stats["total_net_output_bytes"], "cpu_s": redis_run_seconds(pid),
            "cpu_ticks_s": redis_cpu_seconds(pid), "wall_s": time.monotonic()}


def difference(before: dict, after: dict, overhead: dict | None = None) -> dict:
    """``after - before``, without the benchmark's own commands (and, given ``overhead``, the
    difference of two back-to-back snapshots, without the bytes of its own INFO calls)."""
    commands = {}
    for name, v in after["commands"].items():
        calls = v["calls"] - before["commands"].get(name, {}).get("calls", 0)
        usec = v["usec"] - before["commands"].get(name, {}).get("usec", 0)
        if calls and name not in OWN_COMMANDS:
            commands[name] = {"calls": calls, "usec": usec}
    own = sum(after["commands"].get(n, {}).get("calls", 0)
              - before["commands"].get(n, {}).get("calls", 0) for n in OWN_COMMANDS)
    out = {"commands": commands, "total_commands": after["total_commands"]
           - before["total_commands"] - own}
    for key in ("bytes_in", "bytes_out", "cpu_s", "cpu_ticks_s", "wall_s"):
        out[key] = after[key] - before[key] - (overhead or {}).get(key, 0)
    return out


def idle_cpu_per_s(client, pid: int, seconds: float) -> float:
    """redis-server's CPU seconds per second with no client (its timers: ``hz``)."""
    before = snapshot(client, pid)
    time.sleep(seconds)
    return difference(before, snapshot(client, pid))["cpu_s"] / seconds


def per_unit(delta: dict, n: float, idle_per_s: float = 0.0) -> dict:
    """A snapshot difference per example (or per batch): ``n`` of them. ``redis_cpu_us``
    is net of ``idle_per_s`` over the difference's wall time (``redis_cpu_us_gross``
    with it; ``redis_cpu_us_ticks``: /proc/PID/stat's utime + stime, gross)."""
    return {"commands": {k: round(v["calls"] / n, 4) for k, v in sorted(delta["commands"].items())},
            "commands_total": round(delta["total_commands"] / n, 4),
            # EXEC's time includes the commands it ran, counted under their own names too
            "command_usec": round(sum(v["usec"] for k, v in delta["commands"].items()
                                      if k != "exec") / n, 3),
            "command_usec_by_name": {k: round(v["usec"] / n, 3)
                                     for k, v in sorted(delta["commands"].items())},
            "bytes_in": round(delta["bytes_in"] / n, 1),
            "bytes_out": round(delta["bytes_out"] / n, 1),
            "redis_cpu_us": round(1e6 * (delta["cpu_s"] - idle_per_s * delta["wall_s"]) / n, 3),
            "redis_cpu_us_gross": round(1e6 * delta["cpu_s"] / n, 3),
            "redis_cpu_us_ticks": round(1e6 * delta["cpu_ticks_s"] / n, 3)}


def training_cost(url: str, pid: int, work: str, requests: int, flags: list[str],
                  idle_per_s: float) -> dict:
    """One ``benchmarks.train`` run (a child process) against ``url``: redis's cost per
    example and per batch, and the run's own figures."""
    import redis
    client = redis.Redis.from_url(url)
    client.flushdb()
    overhead = difference(snapshot(client, pid), snapshot(client, pid))
    overhead = {k: overhead[k] for k in ("bytes_in", "bytes_out")}  # of its own INFOs
    cmd = [sys.executable, "-m", "benchmarks.train", "--json", f"--requests={requests}",
           f"--workdir={work}", f"--store={url}", "--", *flags]
    _LOG.info("store: %s", " ".join(cmd[2:]))
    before = snapshot(client, pid)
    done = subprocess.run(cmd, capture_output=True, text=True)
    after = snapshot(client, pid)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    with open(os.path.join(work, "metrics-DirectRunner.json"), encoding="utf-8") as f:
        counters = json.load(f)["counters"]
    delta = difference(before, after, overhead)
    examples, batches = counters["worker.examples"], counters["worker.batches"]
    from benchmarks.train import world_size
    event_s = world_size(requests)["days"] * 86400
    return {"command": " ".join(["python", "-m", "benchmarks.train", *cmd[3:]]),
            "examples": examples, "batches": batches,
            "examples_per_batch": round(examples / batches, 1),
            "event_seconds_per_batch": round(event_s / batches, 1),
            "rows_read_per_batch": round(counters["worker.rows_read"] / batches, 1),
            "gradient_rows_applied_per_batch":
                round(counters["ps.gradient_rows_applied"] / batches, 1),
            "ps_publishes": counters.get("ps.publishes"),
            "training_seconds": run["seconds"],
            "examples_per_s_after_first_batch": run["examples_per_s_after_first_batch"],
            "run_seconds": round(delta["wall_s"], 2),
            "redis_cpu_seconds": round(delta["cpu_s"], 4),
            "per_example": per_unit(delta, examples, idle_per_s),
            "per_batch": per_unit(delta, batches, idle_per_s)}


def store_shape(url: str) -> dict:
    """What training left in the store: the table, its width and shard count, the real fids
    and the dense set (what the replay reads and writes)."""
    import redis

    from ps.store import open_store
    client = redis.Redis.from_url(url)
    keys = sorted(k.decode() for k in client.scan_iter(match="ps:rows:*", count=1000))
    tables = sorted({k.split(":")[2] for k in keys})
    if len(tables) != 1:
        raise RuntimeError(f"expected one embedding table in the store, found {tables}")
    store = open_store(url, num_shards=int(client.get("ps:num_shards")))
    fids = [store.shard_rows(tables[0], s)[0] for s in range(store.num_shards)]
    _, rows = store.shard_rows(tables[0], 0)
    dense, _ = store.read_dense("dense")
    return {"table": tables[0], "width": int(rows.shape[1]), "num_shards": store.num_shards,
            "fids": np.concatenate(fids), "dense": dense,
            "dense_bytes": int(client.strlen("ps:dense:dense"))}


def _client(url: str, shape: dict, fids_per_batch: int, ready, go, until, out,
            seed: int, rows: bool = True) -> None:
    """A replay client: the per-batch mix of ``sync_every_batch`` until ``until.value``
    (``rows=False``: its dense set and sync record only, what stays on one key however the
    rows were spread over instances)."""
    from ps.sharding import shard_of
    from ps.store import open_store
    store = open_store(url, num_shards=shape["num_shards"])
    table, width, shards = shape["table"], shape["width"], shape["num_shards"]
    rng = np.random.default_rng(seed)
    batches = []  # pre-drawn: no sampling in the loop
    for _ in range(32):
        fids = rng.choice(shape["fids"], size=min(fids_per_batch, shape["fids"].size),
                          replace=False)
        of = shard_of(fids, shards)
        batches.append((fids, [(s, fids[of == s]) for s in range(shards)]))
    grads = rng.normal(0, 0.01, (fids_per_batch, width)).astype(np.float32)
    dense = shape["dense"]
    store.read_dense("dense")  # connect before the clock starts
    ready.put(seed)
    go.wait()
    n, deadline = 0, until.value
    while time.monotonic() < deadline:
        fids, per_shard = batches[n % len(batches)]
        store.read_dense("dense")                            # worker
        if rows:
            store.read_rows(table, fids, width)
            for s, f in per_shard:                           # sparse PS shards publish
                store.write_rows(table, s, f, grads[:f.size])
                store.set_sync(f"sparse/{s}", {"version": n, "ts_ms": n})
        store.write_dense("dense", dense, n)                 # the dense PS publishes
        store.set_sync("dense", {"version": n, "ts_ms": n})
        n += 1
    out.put(n)


def ceiling(url: str, pid: int, shape: dict, cost: dict, clients: int, seconds: float,
            rows: bool = True) -> dict:
    """``clients`` processes replaying the mix for ``seconds``: rate, commands/s, redis CPU
    (``rows=False``: the dense part of the mix only)."""
    import redis
    client = redis.Redis.from_url(url)
    # spawn: this process has run Beam (the example log), whose threads a fork would copy
    ctx = multiprocessing.get_context("spawn")
    ready, go, until, out = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
    fids_per_batch = int(round(cost["rows_read_per_batch"]))
    procs = [ctx.Process(target=_client, args=(url, shape, fids_per_batch, ready, go, until,
                                               out, i, rows)) for i in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:  # each has connected and drawn its batches
        ready.get(timeout=120)
    before, machine = snapshot(client, pid), _machine_busy_s()
    start = time.monotonic()
    until.value = start + seconds
    go.set()
    batches = sum(out.get(timeout=seconds + 60) for _ in procs)
    wall = time.monotonic() - start
    after, machine = snapshot(client, pid), _machine_busy_s() - machine
    for p in procs:
        p.join()
    delta = difference(before, after)
    examples = batches * cost["examples_per_batch"]
    return {"clients": clients, "seconds": round(wall, 2), "batches": batches,
            "examples_per_s": round(examples / wall, 1),
            "batches_per_s": round(batches / wall, 1),
            "commands_per_s": round(delta["total_commands"] / wall, 1),
            "redis_cpu_percent": round(100 * delta["cpu_s"] / wall, 1),
            "machine_cores_busy": round(machine / wall, 2),
            "redis_cpu_us_per_example": round(1e6 * delta["cpu_s"] / examples, 3)
            if examples else None,
            "per_batch": per_unit(delta, batches) if batches else None}  # gross: at load


def _machine_busy_s() -> float:
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def instances_needed(workers: int, rate: float, capacity: float) -> int:
    """Redis instances ``workers`` workers at ``rate`` examples/s each keep busy, at
    ``capacity`` examples/s per instance (one core each).

    >>> instances_needed(64, 20_000, 16_000)
    80
    """
    return math.ceil(workers * rate / capacity)


def main(argv=None) -> dict:
    parser = cli.argument_parser(prog="python -m benchmarks.store", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 3000 requests, modes sync_every_batch and sync_60s, "
                             "K = 1 and 2, 1 s each")
    parser.add_argument("--requests", type=int, default=30_000,
                        help="synthetic requests trained on per mode")
    parser.add_argument("--seconds", type=float, default=4.0, help="replay seconds per K")
    parser.add_argument("--clients", default="1,2,4", help="K replay client processes")
    parser.add_argument("--workdir", default=None,
                        help="keep the example log and redis's log here (reused)")
    parser.add_argument("--worker_rate", type=float, default=20_000,
                        help="examples/s per worker for the projection")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.seconds, args.clients = 3000, 1.0, "1,2"
    import redis

    from benchmarks.train import example_log
    from dataflow.closed_loop.processes import Processes, start_redis

    work = args.workdir or tempfile.mkdtemp(prefix="bench-store-")
    os.makedirs(work, exist_ok=True)
    example_log(work, "synthetic", args.requests, 0)  # before redis: its CPU is training's only
    procs = Processes(work)
    try:
        base = start_redis(procs, work)
        pid = procs.pids["redis"]
        url = base.rsplit("/", 1)[0] + "/1"
        idle = idle_cpu_per_s(redis.Redis.from_url(url), pid, 2.0)
        modes = QUICK_MODES if args.quick else tuple(MODES)
        training = {mode: training_cost(url, pid, work, args.requests, MODES[mode], idle)
                    for mode in modes}
        shape = store_shape(url)   # what the last mode left (the serving view's rows)
        ceilings = [ceiling(url, pid, shape, training["sync_every_batch"], int(k),
                            args.seconds) for k in args.clients.split(",")]
        dense_only = ceiling(url, pid, shape, training["sync_every_batch"], 1, args.seconds,
                             rows=False)
    finally:
        procs.stop_all()
    capacity = {mode: round(1e6 / t["per_example"]["redis_cpu_us"], 1)
                for mode, t in training.items()}
    loaded = max(ceilings, key=lambda c: c["redis_cpu_percent"])
    capacity["replay_at_max_load"] = round(1e6 / loaded["redis_cpu_us_per_example"], 1)
    # the one instance holding the dense set (rows spread over others): its own ceiling
    capacity["dense_key_only"] = round(1e6 / dense_only["redis_cpu_us_per_example"], 1)
    result = {
        "requests": args.requests, "cores": os.cpu_count(),
        "redis_idle_cpu_percent": round(100 * idle, 3),
        "store": {"table": shape["table"], "width": shape["width"],
                  "num_shards": shape["num_shards"], "rows": int(shape["fids"].size),
                  "dense_bytes": shape["dense_bytes"]},
        "training": training,
        "ceiling": ceilings,
        # the dense set's GET + SET and the dense sync record per batch, alone (K = 1)
        "ceiling_dense_only": dense_only,
        # examples/s one instance serves at one core fully busy, from redis's CPU per example
        "capacity_examples_per_s": capacity,
        "projection": {
            "worker_examples_per_s": args.worker_rate,
            "instances_needed": {mode: {str(w): instances_needed(w, args.worker_rate, cap)
                                        for w in (1, 2, 8, 64, 256)}
                                 for mode, cap in capacity.items()}},
    }
    result = strict_json.plain(result)
    print(strict_json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
