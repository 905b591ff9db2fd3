"""End-to-end training throughput and online AUC: ``python -m benchmarks.train --json``.

Generates the synthetic stream (``dataflow.data``), joins it into an example log
(``dataflow.join``, DirectRunner), then times ``dataflow.train backfill`` on the runner asked
for: reading the example log through to applied PS updates. Prints one JSON object:

    runner, model, examples, batch_size, seconds, examples_per_s (whole training pipeline,
    start-up included), cpu_seconds and examples_per_cpu_s (the same on this process's CPU
    time), examples_per_s_after_first_batch (the worker's steady rate),
    online_auc, bayes_auc (the whole run), online_auc_last_quarter, bayes_auc_last_quarter
    (the last quarter of the examples in event-time order: the steady state, after the
    cold start of the per-user and per-item rows), peak_rss_mb (this process + children:
    the Flink job server)

    python -m benchmarks.train --json --requests 200000
    python -m benchmarks.train --json --requests 1600000 --users 2000 --items 2500 --days 1
                                         # the 100k world with 16x the impressions per id
    python -m benchmarks.train --json --runner FlinkRunner
    python -m benchmarks.train --json --dataset movielens --peers   # + river, same stream
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import json
import os
import resource
import sys
import tempfile
import time

from dataflow import cli
from schemas import strict_json


def world_size(requests: int, users: int | None = None, items: int | None = None,
                days: float | None = None) -> dict:
    """The synthetic world of ``requests``: scaled with it (so impressions per id stay the
    same at any size: a median of ~18 per item) unless ``users``/``items``/``days`` fix it.

    >>> world_size(100_000)
    {'users': 2000, 'items': 2500, 'days': 1.0}
    """
    return {"users": users or max(1000, requests // 50),
            "items": items or max(1000, requests // 40),
            "days": days or max(1.0, requests / 100_000)}


def example_log(work: str, dataset: str, requests: int, seed: int, shards: int = 1,
                **world) -> str:
    """Synthetic or MovieLens logs → joined example log in ``work`` (``shards`` files a
    period); returns its glob. ``world``: :func:`world_size`'s overrides. Logs and an example
    log already in ``work`` (a kept ``--workdir``) are reused."""
    import glob
    from dataflow import data, join
    out = os.path.join(work, "joined" if shards == 1 else f"joined-{shards}-shards")
    if glob.glob(os.path.join(out, "examples", "*.avro")):
        return os.path.join(out, "examples", "*.avro")
    logs = os.path.join(work, "logs")
    if not glob.glob(os.path.join(logs, "action_log", "*.avro")):
        if dataset == "movielens":
            data.movielens(logs)
        else:
            data.synth(logs, requests=requests, seed=seed, **world_size(requests, **world))
    join.main([f"--features={logs}/feature_log/*.avro", f"--actions={logs}/action_log/*.avro",
               f"--out={out}", f"--config={dataset}", f"--shards_per_period={shards}"])
    return os.path.join(out, "examples", "*.avro")


PEERS_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            ".venv-peers", "bin", "python")


def river_peer(examples: str, kind: str) -> dict:
    """river's online AUC and speed on the same example stream (in ``.venv-peers``)."""
    import subprocess

    import numpy as np

    from transforms.metrics_math import auc
    if not os.path.exists(PEERS_PYTHON):
        raise SystemExit("--peers needs river in .venv-peers: run `make peers`")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "river_peer.py")
    out = subprocess.run([PEERS_PYTHON, script, examples, kind], check=True,
                         capture_output=True, text=True).stdout
    r = json.loads(out)
    return {f"river_{kind}_auc": auc(np.asarray(r["scores"]), np.asarray(r["labels"])),
            f"river_{kind}_examples_per_s": round(r["examples"] / r["seconds"], 1)}


def last_quarter_aucs(scores_dir: str) -> dict:
    """Online and Bayes AUC over the last quarter of the examples (event-time order)."""
    import numpy as np

    from transforms.metrics_math import auc
    from transforms.scores import read_scores
    s = read_scores(scores_dir)
    tail = slice(3 * len(s["scores"]) // 4, None)
    labels, weights = s["labels"][tail], s["weights"][tail]
    ctr = s["true_ctr"][tail]
    return {"online_auc_last_quarter": auc(s["scores"][tail], labels, weights),
            "bayes_auc_last_quarter": (float("nan") if np.isnan(ctr).any()
                                       else auc(ctr, labels, weights)),
            "examples_last_quarter": int(labels.size)}


def steady_rate(metrics: dict, workers: int, batch_size: int) -> float | None:
    """Examples/s of all workers together from the end of the first batch anywhere to the
    end of the last: the examples after each worker's first batch over that wall time
    (the metrics' ``worker.batch_end_wall_ms`` distribution)."""
    ends = metrics["distributions"].get("worker.batch_end_wall_ms")
    examples = metrics["counters"].get("worker.examples", 0)
    if not ends or ends["max"] <= ends["min"]:
        return None
    return round((examples - workers * batch_size) / ((ends["max"] - ends["min"]) / 1000), 1)


def machine_cpu_seconds() -> float:
    """CPU seconds every process of the machine has used (/proc/stat): a job's JVMs and
    worker processes are not this process's children. Other load on the machine counts too."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


class MachineCpuSampler:
    """Samples :func:`machine_cpu_seconds` every ``every_s`` in a thread, so that the CPU of a
    window known only afterwards (the steady state between two wall-clock instants) can be
    read off: ``with MachineCpuSampler() as cpu: ...; cpu.between(t0_ms, t1_ms)``."""

    def __init__(self, every_s: float = 0.1):
        import threading
        self.every_s = every_s
        self.samples: list = []  # (wall ms, machine CPU seconds)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    def _run(self):
        while True:
            self.samples.append((time.time() * 1000, machine_cpu_seconds()))
            if self._stop.wait(self.every_s):
                self.samples.append((time.time() * 1000, machine_cpu_seconds()))
                return

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def between(self, start_ms: float, end_ms: float) -> float | None:
        """Machine CPU seconds from ``start_ms`` to ``end_ms`` (wall clock, interpolated
        between samples); None outside the sampled span."""
        import numpy as np
        t, c = (np.array(x, dtype=float) for x in zip(*self.samples)) if self.samples else ([], [])
        if len(t) < 2 or start_ms < t[0] or end_ms > t[-1] or end_ms <= start_ms:
            return None
        return float(np.interp(end_ms, t, c) - np.interp(start_ms, t, c))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + children) / 1024.0, 1)


def main(argv=None) -> dict:
    parser = cli.argument_parser(prog="python -m benchmarks.train", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--runner", default="DirectRunner", choices=["DirectRunner", "FlinkRunner"])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=None,
                        help="fix the synthetic world instead of scaling it with --requests "
                             "(default: max(1000, requests / 50)); e.g. --requests 1600000 "
                             "--users 2000 --items 2500 --days 1 has 16x the data per id")
    parser.add_argument("--items", type=int, default=None,
                        help="default: max(1000, requests / 40)")
    parser.add_argument("--days", type=float, default=None,
                        help="default: max(1, requests / 100000)")
    parser.add_argument("--model", default="deepfm", choices=["lr", "fm", "deepfm"])
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--num_workers", type=int, default=1,
                        help="data-parallel readers and workers (Flink; dataflow.train's flag)")
    parser.add_argument("--shards_per_period", type=int, default=None,
                        help="example files per period (default: --num_workers)")
    parser.add_argument("--flink_master", default="[local]",
                        help="FlinkRunner: the cluster (HOST:PORT) or [local], the job "
                             "server's embedded MiniCluster")
    parser.add_argument("--store", default=None,
                        help="ParameterStore URL (default: memory://, one process)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", default="synthetic", choices=["synthetic", "movielens"])
    parser.add_argument("--peers", action="store_true",
                        help="also run river's FMClassifier and LogisticRegression on the same "
                             "example stream (needs `make peers`)")
    parser.add_argument("--workdir", default=None,
                        help="keep the generated files here (an example log there is reused)")
    parser.add_argument("train_flags", nargs="*",
                        help="more dataflow.train flags after --, e.g. -- --learning_rate=0.05")
    args = parser.parse_args(argv)

    from dataflow import train
    work = args.workdir or tempfile.mkdtemp(prefix="bench-train-")
    examples = example_log(work, args.dataset, args.requests, args.seed,
                           shards=args.shards_per_period or args.num_workers, users=args.users,
                           items=args.items, days=args.days)
    metrics_dir = os.path.join(work, "metrics")
    metrics_out = os.path.join(work, f"metrics-{args.runner}.json")
    scores_dir = os.path.join(work, f"scores-{args.runner}-{os.getpid()}")
    flags = [f"--input={examples}", f"--config={args.dataset}", f"--model={args.model}",
             f"--batch_size={args.batch_size}", f"--metrics_dir={metrics_dir}",
             f"--metrics_out={metrics_out}", f"--runner={args.runner}",
             f"--store={args.store or f'memory://bench-{os.getpid()}'}",
             f"--scores_out={scores_dir}", f"--num_workers={args.num_workers}",
             *args.train_flags]
    if args.runner == "FlinkRunner":
        flags += [f"--flink_master={args.flink_master}", "--streaming"]
    start, cpu, machine = time.monotonic(), _cpu_seconds(), machine_cpu_seconds()
    with MachineCpuSampler() as sampler:
        train.main(["backfill"] + flags)
    seconds = time.monotonic() - start
    cpu = _cpu_seconds() - cpu
    machine = machine_cpu_seconds() - machine
    with open(metrics_out, encoding="utf-8") as f:
        metrics = json.load(f)
    with open(os.path.join(metrics_dir, "online-backfill-totals.json"), encoding="utf-8") as f:
        totals = json.load(f)
    examples_n = int(metrics["counters"].get("worker.examples", totals.get("examples", 0)))
    ends = metrics["distributions"].get("worker.batch_end_wall_ms") or {}
    steady_cpu = sampler.between(ends["min"], ends["max"]) if ends else None
    steady_s = (ends["max"] - ends["min"]) / 1000 if ends else 0
    result = {
        "runner": args.runner,
        "model": args.model,
        "examples": examples_n,
        "batch_size": args.batch_size,
        "seconds": round(seconds, 2),
        "examples_per_s": round(examples_n / seconds, 1),
        # CPU time of this process (all its threads; DirectRunner: the whole pipeline), so
        # that other jobs on a shared machine do not decide the figure
        "cpu_seconds": round(cpu, 2),
        "examples_per_cpu_s": round(examples_n / cpu, 1),
        # every process on the machine: the Flink JVMs and Python workers included
        "machine_cpu_seconds": round(machine, 2),
        "cores_busy": round(machine / seconds, 2),
        "examples_per_s_after_first_batch": steady_rate(metrics, args.num_workers,
                                                        args.batch_size),
        # the machine's busy cores over that steady window (every process, as above)
        "cores_busy_steady": round(steady_cpu / steady_s, 2) if steady_cpu and steady_s else None,
        "num_workers": args.num_workers,
        "online_auc": totals.get("auc"),
        "bayes_auc": totals.get("bayes_auc"),
        **last_quarter_aucs(scores_dir),
        "peak_rss_mb": peak_rss_mb(),
        "gradient_rows_emitted": metrics["counters"].get("worker.gradient_rows_emitted"),
        "gradient_rows_applied": metrics["counters"].get("ps.gradient_rows_applied"),
        "dataset": args.dataset,
    }
    if args.peers:
        for kind in ("fm", "lr"):
            result.update(river_peer(examples, kind))
    result = strict_json.plain(result)  # NaN (no Bayes AUC for real data) as None
    print(strict_json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
