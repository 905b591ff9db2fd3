"""Benchmark of serving: requests/s and p50/p99 latency for requests of 100 candidates.

    python -m benchmarks.serve --json                        # memory and redis stores
    python -m benchmarks.serve --json --stores redis --model deepfm --candidates 100

The service (``dataflow.serving``'s Scorer and HTTP server, DeepFM by default, its feature log
in a child process as ``python -m dataflow.serve`` runs it) runs in this process, pinned to
one core with its log process; its store holds a row for every fid the requests use. A load
generator in a child process, pinned to the other core, sends pre-built requests of the
synthetic world (``dataflow.simulate``) over loopback with keep-alive: first one at a time
(latency: p50, p99, max), then ``--concurrency`` at once (throughput). Each phase is bounded
by ``--requests`` and ``--seconds``. Latency is the client's: from sending the request to
having read the whole answer. Requests carry no event time, so serving stamps the wall
clock and its feature log writes a file every ``--roll_s`` during the measurement.
``--nice -10`` runs the service and the load generator at a higher priority: on a machine
shared with other jobs, a stand-in for a core of their own (the JSON says the niceness and
the load average at the start).

Measured on the shared 2-core machine (Beam 2.62 / TF 2.16, DeepFM over the 15 slots of
``schemas/configs/synthetic.yaml``, 100 candidates, top 10 served): see docs/loop.md (Serving).
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from dataflow import cli
from schemas import strict_json


def _load(url: str, bodies_path: str, requests: int, seconds: float, concurrency: int) -> dict:
    """The load generator (child process): ``concurrency`` keep-alive clients."""
    import threading
    with open(bodies_path, "rb") as f:
        bodies = [line.rstrip(b"\n") for line in f]
    host, port = url.split("//")[1].split(":")
    latencies: list = []
    errors = [0]
    lock = threading.Lock()
    counter = [0]
    deadline = time.monotonic() + seconds

    def client(worker):
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        while time.monotonic() < deadline:
            with lock:
                if counter[0] >= requests:
                    break
                k = counter[0]
                counter[0] += 1
            body = bodies[k % len(bodies)]
            started = time.perf_counter()
            conn.request("POST", "/score", body=body,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            elapsed = time.perf_counter() - started
            with lock:
                if response.status == 200:
                    latencies.append(elapsed)
                else:
                    errors[0] += 1
        conn.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {"requests": len(latencies), "errors": errors[0], "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(np.max(ms)), 2)}


def _cpu_s(pid) -> float:
    """User + system CPU seconds of process ``pid`` (0 for None)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pin(core: int) -> None:
    try:
        os.sched_setaffinity(0, {core % os.cpu_count()})
    except (AttributeError, OSError):
        pass


def _run_load(url, bodies_path, requests, seconds, concurrency) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve", "--load", url, "--bodies", bodies_path,
         "--requests", str(requests), "--seconds", str(seconds),
         "--concurrency", str(concurrency)],
        capture_output=True, text=True, timeout=seconds + 120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def request_bodies(config, users: int, items: int, distinct: int, candidates: int,
                   top_k: int, rng) -> tuple:
    """(JSON request bodies of the synthetic world, the fids they need)."""
    from dataflow.simulate import World
    from transforms.features import extract
    world = World(users, items, 3600, seed=0, ctr=0.08, start="2024-01-01")
    bodies, fids = [], set()
    for _ in range(distinct):
        t_rel = int(rng.integers(0, 3600_000))
        body, _, _, _ = world.request(rng, t_rel, candidates)
        # no ts_ms: serving stamps the wall clock, so its feature log rolls a file every
        # --roll_s as the run goes (as in production), and those writes are measured too
        body["top_k"] = top_k
        bodies.append(strict_json.dumps(body, separators=(",", ":")))
        for c in body["candidates"]:
            record = {"request_id": "b", "ts_ms": world.start_ms + t_rel,
                      "user_id": body["user_id"],
                      "item_id": c["item_id"], "features": {**body["context"], **c["features"]}}
            fids.update(extract(record, config)["fids"])
    return bodies, np.array(sorted(fids), np.uint64)


def seed_store(store_url: str, spec, fids: np.ndarray, rng) -> None:
    """An emptied store at ``store_url`` (2 shards) holding a random row for every fid."""
    from ps.store import open_store
    from ps.sharding import shard_of
    store = open_store(store_url, num_shards=2)
    store.clear()
    rows = rng.normal(0, 0.05, (len(fids), spec.width)).astype(np.float32)
    shards = shard_of(fids, 2)
    for s in range(2):
        store.write_rows(spec.table, s, fids[shards == s], rows[shards == s])


def bench_store(store_url: str, args, workdir: str) -> dict:
    from dataflow.serving.feature_log import open_feature_log
    from dataflow.serving.http_server import Server
    from dataflow.serving.scorer import Scorer
    from transforms.model import ModelSpec
    from schemas.feature_config import load_feature_config

    config = load_feature_config("synthetic")
    spec = ModelSpec.from_feature_config(config, args.model)
    rng = np.random.default_rng(0)
    bodies, fids = request_bodies(config, args.users, args.items, args.distinct_requests,
                                  args.candidates, args.top_k, rng)
    seed_store(store_url, spec, fids, rng)
    bodies_path = os.path.join(workdir, f"bodies-{store_url.split(':')[0]}.jsonl")
    with open(bodies_path, "w", encoding="utf-8") as f:
        f.write("\n".join(bodies) + "\n")
    log = open_feature_log(os.path.join(workdir, f"log-{store_url.split(':')[0]}"),
                           args.roll_s, args.log_in_process)
    scorer = Scorer(config, spec, store_url, num_shards=2, feature_log=log)
    server = Server(scorer, port=0).start(freeze_heap=True)  # as the serving command line
    try:
        _run_load(server.url, bodies_path, 50, 30, 1)  # warm-up
        log_pid = getattr(getattr(log, "_proc", None), "pid", None)
        cpu, log_cpu = time.process_time(), _cpu_s(log_pid)
        latency = _run_load(server.url, bodies_path, args.requests, args.seconds, 1)
        # CPU seconds of this process (the service's threads) and of its feature log's
        # process per request: what a request costs on a core of its own, whatever else
        # the machine runs meanwhile
        per_request = 1000 / max(latency["requests"], 1)
        latency["service_cpu_ms_per_request"] = round(
            per_request * (time.process_time() - cpu + _cpu_s(log_pid) - log_cpu), 2)
        latency["feature_log_cpu_ms_per_request"] = round(
            per_request * (_cpu_s(log_pid) - log_cpu), 2)
        throughput = _run_load(server.url, bodies_path, args.requests, args.seconds,
                               args.concurrency)
    finally:
        server.stop()
    return {"store": store_url.split(":")[0], "rows_in_store": int(len(fids)),
            "feature_log": log.stats(),
            "sequential": latency, f"concurrency_{args.concurrency}": throughput,
            "p50_ms": latency["p50_ms"], "p99_ms": latency["p99_ms"],
            "service_cpu_ms_per_request": latency["service_cpu_ms_per_request"],
            "requests_per_s": throughput["requests_per_s"],
            "candidates_per_s": round(throughput["requests_per_s"] * args.candidates)}


def main(argv=None) -> int:
    p = cli.argument_parser(prog="python -m benchmarks.serve", description=__doc__)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--stores", default="memory,redis")
    p.add_argument("--model", default="deepfm", choices=["lr", "fm", "deepfm"])
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--requests", type=int, default=2000, help="per phase, at most")
    p.add_argument("--seconds", type=float, default=20.0, help="per phase, at most")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--distinct_requests", type=int, default=200)
    p.add_argument("--roll_s", type=float, default=1.0,
                   help="seconds per feature log file (the loop's serving: 2 wall seconds)")
    p.add_argument("--nice", type=int, default=0,
                   help="niceness of the service and the load generator (e.g. -10 on a "
                        "machine shared with other jobs: a stand-in for a core of its own; "
                        "negative values need root)")
    p.add_argument("--log_in_process", action="store_true",
                   help="feature log written by a thread of the service (the old way), "
                        "not by its child process")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--items", type=int, default=2000)
    # the load generator (child process)
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--bodies", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.nice:
        os.nice(args.nice)  # the load generator inherits it
    if args.load:
        _pin(1)
        print(strict_json.dumps(_load(args.load, args.bodies, args.requests, args.seconds,
                               args.concurrency)))
        return 0
    _pin(0)  # the service on one core
    from dataflow.closed_loop.processes import Processes, start_redis
    results = {"model": args.model, "candidates": args.candidates, "top_k": args.top_k,
               "nice": args.nice, "load_average": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as workdir:
        procs = Processes(workdir)
        try:
            for store in args.stores.split(","):
                if store == "memory":
                    url = "memory://bench-serve"
                else:
                    url = start_redis(procs, workdir)
                    try:  # redis stands for another machine: off the service's core
                        os.sched_setaffinity(procs.pids["redis"], {1 % os.cpu_count()})
                    except (AttributeError, OSError):
                        pass
                results[store] = bench_store(url, args, workdir)
        finally:
            procs.stop_all()
    if args.json:
        print(strict_json.dumps(results))
    else:
        print(strict_json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
