"""Serving latency of two versions of ``dataflow/serve.py`` side by side, in one run.

    python -m benchmarks.serve_ab --rev b4f3092~1 --rounds 2 --json

The file at git revision ``--rev`` ("old") and the working tree's ("new") serve the same
requests (``benchmarks.serve``'s: DeepFM, 100 candidates, top 10 logged, no event time so
the feature log rolls a file every ``--roll_s``), alternately ``--rounds`` times, each
pinned to one core with the load generator on the other: on a machine shared with other
jobs only a comparison made this way means something. "old" writes its log as it did
(``RollingAvroLog`` in the service); "new" as ``python -m dataflow.serve`` does. The old
file must be one that still held the service (before ``dataflow.serving``: a revision
before the split of ``dataflow/serve.py``, #18).
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

from benchmarks import serve as bench
from dataflow import cli
from schemas import strict_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_at(rev: str, workdir: str):
    source = subprocess.run(["git", "show", f"{rev}:dataflow/serve.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(workdir, "serve_old.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("serve_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> int:
    p = cli.argument_parser(prog="python -m benchmarks.serve_ab", description=__doc__)
    p.add_argument("--rev", required=True, help="git revision of the old dataflow/serve.py")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=1500, help="per phase")
    p.add_argument("--store", default="memory", choices=["memory", "redis"])
    p.add_argument("--roll_s", type=float, default=1.0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    bench._pin(0)
    from dataflow.closed_loop.processes import Processes, start_redis
    from dataflow.serving.feature_log import open_feature_log
    from dataflow.serving.http_server import Server
    from dataflow.serving.scorer import Scorer
    new = types.SimpleNamespace(Scorer=Scorer, Server=Server)
    from transforms.model import ModelSpec
    from schemas.feature_config import load_feature_config

    config = load_feature_config("synthetic")
    spec = ModelSpec.from_feature_config(config, "deepfm")
    rng = np.random.default_rng(0)
    bodies, fids = bench.request_bodies(config, 1000, 2000, 200, 100, 10, rng)
    rows_out = []
    with tempfile.TemporaryDirectory() as workdir:
        old = _module_at(args.rev, workdir)
        procs = Processes(workdir)
        try:
            if args.store == "memory":
                url = "memory://serve-ab"
            else:
                url = start_redis(procs, workdir)
                os.sched_setaffinity(procs.pids["redis"], {1 % os.cpu_count()})
            bench.seed_store(url, spec, fids, rng)
            path = os.path.join(workdir, "bodies.jsonl")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(bodies) + "\n")
            for r in range(args.rounds):
                for name, module in (("old", old), ("new", new)):
                    folder = os.path.join(workdir, f"log-{name}-{r}")
                    log = (old.RollingAvroLog(folder, "feature_log", args.roll_s)
                           if name == "old" else open_feature_log(folder, args.roll_s))
                    scorer = module.Scorer(config, spec, url, num_shards=2, feature_log=log)
                    server = module.Server(scorer, port=0).start()
                    try:
                        bench._run_load(server.url, path, 50, 30, 1)  # warm-up
                        load = os.getloadavg()[0]
                        cpu = time.process_time()
                        seq = bench._run_load(server.url, path, args.requests, 30, 1)
                        cpu = 1000 * (time.process_time() - cpu) / max(seq["requests"], 1)
                        conc = bench._run_load(server.url, path, args.requests, 30, 4)
                    finally:
                        server.stop()
                    row = {"version": name, "round": r, "load_average_1m": round(load, 2),
                           "p50_ms": seq["p50_ms"], "p99_ms": seq["p99_ms"],
                           "max_ms": seq["max_ms"],
                           "service_process_cpu_ms_per_request": round(cpu, 2),
                           "requests_per_s_4_clients": conc["requests_per_s"]}
                    rows_out.append(row)
                    if not args.json:
                        print(strict_json.dumps(row), flush=True)
        finally:
            procs.stop_all()
    if args.json:
        print(strict_json.dumps({"rev": args.rev, "store": args.store, "runs": rows_out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
