"""Training scaled out on Flink, side by side: ``python -m benchmarks.scaling --json``.

In one run and one process tree, on the same example log (the 100k synthetic stream joined
into two shard files a period) and the same model, it trains with ``benchmarks.train``:

* ``direct``: the DirectRunner, one worker (``memory://`` store);
* ``flink_w1`` and ``flink_w2``: Flink, one and two data-parallel workers, on one standalone
  cluster of two TaskManagers of one slot each, Python in a worker pool (EXTERNAL: a process
  per TaskManager), the store in a private Redis;

and prints each run's figures and the ratios ``flink_vs_direct_per_core`` (steady examples/s
per busy core of the machine, Flink W=1 over the DirectRunner), ``flink_w2_vs_w1`` (steady
examples/s) and each run's online AUC. ``projection`` is :func:`project` of the Flink W = 1
run's measured costs: examples/s at 8, 64 and 256 workers, the PS shards and store instances
they need and the first bottleneck, checked against the W = 2 run (docs/scaling.md). ``--curve 0,900,...`` instead runs Flink at W = 1 and 2
for each staleness bound (``--max_staleness_s``) and plots online AUC and examples/s against
it (``--plot``, a PNG).

    python -m benchmarks.scaling --json
    python -m benchmarks.scaling --json --curve 0,450,900,1800 --plot docs/img/scaling-staleness.png
    python -m benchmarks.scaling --json --quick          # 10k examples: a smoke run
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import json
import logging
import math
import os
import subprocess
import sys
import tempfile

from dataflow import cli
from schemas import strict_json

_LOG = logging.getLogger(__name__)

#: what each run reports, copied from benchmarks.train's JSON
FIGURES = ("examples", "seconds", "examples_per_s", "examples_per_s_after_first_batch",
           "cores_busy", "cores_busy_steady", "machine_cpu_seconds", "online_auc", "online_auc_last_quarter", "bayes_auc",
           "gradient_rows_emitted", "gradient_rows_applied", "num_workers", "batch_size")


def train_run(work: str, runner: str, num_workers: int, batch_size: int, requests: int,
              flags: list[str], bench_flags: list[str] = ()) -> dict:
    """One ``python -m benchmarks.train --json`` in a child process: its JSON, plus the
    per-bundle breakdown from its metrics (reader resume gap, PS wait, worker batch time)."""
    cmd = [sys.executable, "-m", "benchmarks.train", "--json", f"--workdir={work}",
           f"--runner={runner}", f"--num_workers={num_workers}", "--shards_per_period=2",
           f"--batch_size={batch_size}", f"--requests={requests}", *bench_flags, "--", *flags]
    _LOG.info("scaling: %s", " ".join(cmd[2:]))
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"benchmarks.train failed ({out.returncode}): {' '.join(cmd[2:])}\n"
                           + out.stderr[-3000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    with open(os.path.join(work, f"metrics-{runner}.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    dist = metrics["distributions"]

    def mean(name):
        d = dist.get(name)
        return round(d["sum"] / d["count"], 2) if d and d["count"] else None
    return {**{k: result.get(k) for k in FIGURES},
            "reader_resume_gap_ms": mean("reader.resume_gap_ms"),
            "reader_ps_wait_ms": mean("reader.ps_catch_up_wait_ms"),
            "reader_batches_per_bundle": mean("reader.batches_per_bundle"),
            "worker_batch_ms": mean("worker.batch_ms"),
            "ps_sparse_apply_us": mean("ps.sparse_apply_us"),
            "ps_sparse_records": (dist.get("ps.sparse_apply_us") or {}).get("count"),
            "ps_dense_apply_us": mean("ps.dense_apply_us"),
            "ps_dense_records": (dist.get("ps.dense_apply_us") or {}).get("count")}


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def main(argv=None) -> dict:
    parser = cli.argument_parser(prog="python -m benchmarks.scaling", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--batch_size", type=int, default=512,
                        help="the global batch: W workers take batch_size / W each, so that a "
                             "step spans the same event time at every W")
    parser.add_argument("--max_staleness_s", type=float, default=0.0,
                        help="the Flink runs' staleness bound (event-time seconds)")
    parser.add_argument("--reader_checkpoint_s", type=float, default=1.0,
                        help="the Flink runs' longest reader bundle (wall seconds)")
    parser.add_argument("--curve", default=None,
                        help="comma-separated staleness bounds: run Flink at W=1 and 2 for each")
    parser.add_argument("--plot", default=None, help="--curve: write the curve here (PNG)")
    parser.add_argument("--quick", action="store_true", help="10k examples: a smoke run")
    parser.add_argument("--world", default=None,
                        help="benchmarks.train's --users,--items,--days, e.g. 2000,2500,1 with "
                             "--requests 1600000: the 16x-data world")
    parser.add_argument("--store_examples_per_s", type=float, default=230_000,
                        help="one Redis instance's capacity (benchmarks.store, worst run)")
    parser.add_argument("--taskmanager_memory", default=None,
                        help="each TaskManager's taskmanager.memory.process.size (e.g. 3g for "
                             "the 16x-data world, whose heap state outgrows the default)")
    parser.add_argument("--workdir", default=None,
                        help="keep the generated files here (an example log there is reused)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 10_000

    from dataflow.closed_loop.processes import Processes, start_redis
    from dataflow.flink import FlinkCluster, WorkerPool
    work = args.workdir or tempfile.mkdtemp(prefix="bench-scaling-")
    if args.world:
        users, items, days = args.world.split(",")
        args.world_flags = [f"--users={users}", f"--items={items}", f"--days={days}"]
    else:
        args.world_flags = []
    result: dict = {"requests": args.requests, "batch_size": args.batch_size, "world": args.world,
                    "reader_checkpoint_s": args.reader_checkpoint_s}
    procs = Processes(work)
    redis_dir = os.path.join(work, "redis")
    os.makedirs(redis_dir, exist_ok=True)
    memory = ({"taskmanager.memory.process.size": args.taskmanager_memory}
              if args.taskmanager_memory else None)
    with FlinkCluster(task_slots=1, taskmanagers=2, workdir=os.path.join(work, "flink"),
                      extra_conf=memory) as cluster, \
            WorkerPool(log_path=os.path.join(work, "worker-pool.log")) as pool:
        try:
            redis = start_redis(procs, redis_dir).rsplit("/", 1)[0]
            _runs(args, work, cluster, pool, redis, result)
        finally:
            procs.stop_all()
    result = strict_json.plain(result)
    print(strict_json.dumps(result))
    return result


def _runs(args, work: str, cluster, pool, redis: str, result: dict) -> None:
    """The runs of :func:`main`, their figures and ratios into ``result``."""
    db = iter(range(1, 16))

    def flink(workers: int, staleness: float) -> dict:
        flags = [f"--flink_master={cluster.master}", f"--parallelism={workers}",
                 "--environment_type=EXTERNAL",
                 f"--environment_config={pool.environment_config}",
                 f"--store={redis}/{next(db)}", f"--max_staleness_s={staleness}",
                 f"--reader_checkpoint_s={args.reader_checkpoint_s}"]
        return train_run(work, "FlinkRunner", workers, args.batch_size // workers,
                         args.requests, flags,
                         ["--flink_master", cluster.master, *args.world_flags])

    if args.curve:
        curve = []
        for staleness in [float(s) for s in args.curve.split(",")]:
            for workers in (1, 2):
                curve.append({"max_staleness_s": staleness, **flink(workers, staleness)})
        result["curve"] = curve
        if args.plot:
            plot_curve(curve, args.plot)
            result["plot"] = args.plot
    else:
        result["direct"] = train_run(work, "DirectRunner", 1, args.batch_size,
                                     args.requests, [], args.world_flags)
        result["flink_w1"] = flink(1, args.max_staleness_s)
        result["flink_w2"] = flink(2, args.max_staleness_s)
        d, f1, f2 = result["direct"], result["flink_w1"], result["flink_w2"]
        steady = "examples_per_s_after_first_batch"
        result["flink_vs_direct"] = _ratio(f1[steady], d[steady])
        # per busy core of the machine in each run's steady window
        result["flink_vs_direct_per_core"] = _ratio(
            _ratio(f1[steady], f1["cores_busy_steady"]), _ratio(d[steady], d["cores_busy_steady"]))
        result["flink_w2_vs_w1"] = _ratio(f2[steady], f1[steady])
        result["auc_w2_minus_w1"] = (round(f2["online_auc"] - f1["online_auc"], 4)
                                     if f1["online_auc"] and f2["online_auc"] else None)
        result["projection"] = project(f1, store_examples_per_s=args.store_examples_per_s,
                                       check=f2, machine_cores=os.cpu_count() or 1)


#: the share of a shared component's capacity that a projection plans to use
HEADROOM = 0.7
#: the dense parameter set in the store is one key: its cost alone (benchmarks.store)
STORE_DENSE_KEY_US_PER_EXAMPLE = 0.34


def project(w1: dict, workers=(1, 2, 8, 64, 256), store_examples_per_s: float = 230_000,
            check: dict | None = None, machine_cores: int = 2) -> dict:
    """Examples/s of W synchronous workers, from one measured Flink W = 1 run.

    Each worker is bound by its own loop: per batch, Flink's resume and the wait for the PS
    (fixed) and its step (in proportion to the batch). Its CPU, every process of the job
    together (JVMs, Python, the PS, Redis), is a cost per *batch*: measured, it hardly moves
    with the batch's size (docs/scaling.md). Shared parts bind all workers together: a sparse
    PS shard applies a bounded number of gradient rows/s (provision shards for it), the dense
    PS is one key that applies one dense gradient per worker batch (it cannot be
    provisioned), a Redis instance serves a bounded number of examples/s (provision
    instances) and the store's dense key is one key too. Shared parts are planned at
    :data:`HEADROOM` of their capacity; each worker is given the cores its loop uses.

    Args:
        w1: a :func:`train_run` figure dict of Flink at W = 1.
        workers: the sizes to project (each worker with W = 1's batch).
        store_examples_per_s: one Redis instance's capacity.
        check: another measured run on this machine (W = 2): its projection, bound also by
            the machine's ``machine_cores``, next to its measured examples/s.

    Returns:
        ``{"inputs": ..., "sizes": [{"workers", "examples_per_s", "bottleneck", "cores",
        "sparse_ps_shards", "store_instances"}, ...], "check": {...}}``.

    >>> run = {"batch_size": 500, "reader_resume_gap_ms": 20, "reader_ps_wait_ms": 30,
    ...        "worker_batch_ms": 50, "examples": 1000, "gradient_rows_applied": 3000,
    ...        "ps_sparse_records": 10, "ps_sparse_apply_us": 1000, "ps_dense_records": 2,
    ...        "ps_dense_apply_us": 1000, "examples_per_s_after_first_batch": 5000,
    ...        "cores_busy_steady": 1.5}
    >>> p = project(run, workers=(1, 100))
    >>> [(s["workers"], s["examples_per_s"], s["bottleneck"]) for s in p["sizes"]]
    [(1, 5000.0, 'worker loop'), (100, 350000.0, 'dense PS key')]
    >>> c = project(run, check={**run, "num_workers": 2, "batch_size": 250})["check"]
    >>> c["latency_bound"], c["cpu_bound"], c["bottleneck"]
    (6667.0, 3333.0, 'machine CPU')
    """
    batch = w1["batch_size"]
    fixed_ms = w1["reader_resume_gap_ms"] + w1["reader_ps_wait_ms"]

    def loop_ms(b):  # one worker's wall time per batch of b
        return fixed_ms + w1["worker_batch_ms"] * b / batch

    per_worker = batch / (loop_ms(batch) / 1000)
    cores_per_worker = w1.get("cores_busy_steady") or w1["machine_cpu_seconds"] / w1["seconds"]
    steady = w1.get("examples_per_s_after_first_batch") or w1["examples"] / w1["seconds"]
    cpu_s_per_batch = cores_per_worker * batch / steady
    rows_per_example = w1["gradient_rows_applied"] / w1["examples"]
    rows_per_apply = w1["gradient_rows_applied"] / w1["ps_sparse_records"]
    shard_rows_per_s = rows_per_apply / (w1["ps_sparse_apply_us"] * 1e-6)
    dense_examples_per_s = batch / (w1["ps_dense_apply_us"] * 1e-6)
    store_dense_examples_per_s = 1e6 / STORE_DENSE_KEY_US_PER_EXAMPLE
    caps = {"dense PS key": HEADROOM * dense_examples_per_s,
            "store dense key": HEADROOM * store_dense_examples_per_s}
    sizes = []
    for w in workers:
        demand = w * per_worker
        name, cap = min(caps.items(), key=lambda kv: kv[1])
        rate, bottleneck = (demand, "worker loop") if demand <= cap else (cap, name)
        rate = round(rate, 0)
        sizes.append({
            "workers": w, "examples_per_s": rate, "bottleneck": bottleneck,
            "cores": round(rate / batch * cpu_s_per_batch, 1),
            "sparse_ps_shards": math.ceil(rate * rows_per_example / (HEADROOM * shard_rows_per_s)),
            "store_instances": math.ceil(rate / (HEADROOM * store_examples_per_s))})
    result = {
        "inputs": {"batch_size": batch, "worker_loop_ms": round(loop_ms(batch), 1),
                   "worker_fixed_ms_per_batch": round(fixed_ms, 1),
                   "per_worker_examples_per_s": round(per_worker, 0),
                   "cpu_ms_per_batch": round(1000 * cpu_s_per_batch, 1),
                   "gradient_rows_per_example": round(rows_per_example, 2),
                   "sparse_shard_rows_per_s": round(shard_rows_per_s, 0),
                   "dense_ps_examples_per_s": round(dense_examples_per_s, 0),
                   "store_examples_per_s": store_examples_per_s,
                   "store_dense_key_examples_per_s": round(store_dense_examples_per_s, 0),
                   "headroom": HEADROOM},
        "sizes": sizes}
    if check is not None:
        w, b = check["num_workers"], check["batch_size"]
        latency = w * b / (loop_ms(b) / 1000)
        cpu = machine_cores * b / cpu_s_per_batch
        result["check"] = {
            "workers": w, "batch_size": b, "machine_cores": machine_cores,
            "latency_bound": round(latency, 0), "cpu_bound": round(cpu, 0),
            "projected_examples_per_s": round(min(latency, cpu), 0),
            "bottleneck": "worker loop" if latency <= cpu else "machine CPU",
            "measured_examples_per_s": check.get("examples_per_s_after_first_batch")}
    return result


def plot_curve(curve: list[dict], path: str) -> None:
    """Online AUC and steady examples/s against the staleness bound, a line per W."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (auc_ax, rate_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for workers in sorted({c["num_workers"] for c in curve}):
        rows = [c for c in curve if c["num_workers"] == workers]
        xs = [c["max_staleness_s"] for c in rows]
        auc_ax.plot(xs, [c["online_auc"] for c in rows], "o-", label=f"W = {workers}")
        rate_ax.plot(xs, [c["examples_per_s_after_first_batch"] for c in rows], "o-",
                     label=f"W = {workers}")
    auc_ax.set(xlabel="--max_staleness_s (event-time s)", ylabel="online AUC",
               title="Online AUC against the staleness bound")
    rate_ax.set(xlabel="--max_staleness_s (event-time s)", ylabel="examples/s after the first batch",
                title="Throughput against the staleness bound")
    for ax in (auc_ax, rate_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
