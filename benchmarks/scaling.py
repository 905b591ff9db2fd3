"""Training scaled out on Flink, side by side: ``python -m benchmarks.scaling --json``.

In one run and one process tree, on the same example log (the 100k synthetic stream joined
into two shard files a period) and the same model, it trains with ``benchmarks.train``:

* ``direct``: the DirectRunner, one worker (``memory://`` store);
* ``flink_w1`` and ``flink_w2``: Flink, one and two data-parallel workers, on one standalone
  cluster of two TaskManagers of one slot each, Python in a worker pool (EXTERNAL: a process
  per TaskManager), the store in a private Redis;

and prints each run's figures and the ratios ``flink_vs_direct_per_core`` (steady examples/s
per busy core of the machine, Flink W=1 over the DirectRunner), ``flink_w2_vs_w1`` (steady
examples/s) and each run's online AUC. ``--curve 0,900,...`` instead runs Flink at W = 1 and 2
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
import os
import subprocess
import sys
import tempfile

from dataflow import cli
from schemas import strict_json

_LOG = logging.getLogger(__name__)

#: what each run reports, copied from benchmarks.train's JSON
FIGURES = ("examples", "seconds", "examples_per_s", "examples_per_s_after_first_batch",
           "cores_busy", "online_auc", "online_auc_last_quarter", "bayes_auc",
           "gradient_rows_emitted", "gradient_rows_applied", "num_workers", "batch_size")


def train_run(work: str, runner: str, num_workers: int, batch_size: int, requests: int,
              flags: list[str], bench_flags: list[str] = ()) -> dict:
    """One ``python -m benchmarks.train --json`` in a child process: its JSON, plus the
    per-bundle breakdown from its metrics (reader resume gap, PS wait, worker batch time)."""
    cmd = [sys.executable, "-m", "benchmarks.train", "--json", f"--workdir={work}",
           f"--runner={runner}", f"--num_workers={num_workers}", "--shards_per_period=2",
           f"--batch_size={batch_size}", f"--requests={requests}", *bench_flags, "--", *flags]
    _LOG.info("scaling: %s", " ".join(cmd[2:]))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
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
    parser.add_argument("--workdir", default=None,
                        help="keep the generated files here (an example log there is reused)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 10_000

    from dataflow.closed_loop.processes import Processes, start_redis
    from dataflow.flink import FlinkCluster, WorkerPool
    work = args.workdir or tempfile.mkdtemp(prefix="bench-scaling-")
    result: dict = {"requests": args.requests, "batch_size": args.batch_size,
                    "reader_checkpoint_s": args.reader_checkpoint_s}
    procs = Processes(work)
    redis_dir = os.path.join(work, "redis")
    os.makedirs(redis_dir, exist_ok=True)
    with FlinkCluster(task_slots=1, taskmanagers=2,
                      workdir=os.path.join(work, "flink")) as cluster, \
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
                         args.requests, flags, ["--flink_master", cluster.master])

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
                                     args.requests, [])
        result["flink_w1"] = flink(1, args.max_staleness_s)
        result["flink_w2"] = flink(2, args.max_staleness_s)
        d, f1, f2 = result["direct"], result["flink_w1"], result["flink_w2"]
        steady = "examples_per_s_after_first_batch"
        result["flink_vs_direct"] = _ratio(f1[steady], d[steady])
        result["flink_vs_direct_per_core"] = _ratio(
            _ratio(f1[steady], f1["cores_busy"]), _ratio(d[steady], d["cores_busy"]))
        result["flink_w2_vs_w1"] = _ratio(f2[steady], f1[steady])
        result["auc_w2_minus_w1"] = (round(f2["online_auc"] - f1["online_auc"], 4)
                                     if f1["online_auc"] and f2["online_auc"] else None)


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
