"""``make demo``: the main job on the embedded default (DirectRunner, in-process state).

Until the training pipeline lands, the main job is the smoke pipeline over a generated
event log: it writes ``out/demo/events/*.avro``, runs, and prints where the results are.
Beam's flags pass through, so ``python -m dataflow demo --runner=FlinkRunner
--flink_master=[local]`` runs the same job on Flink.
"""
from __future__ import annotations

import json
import os
import random
import sys

from dataflow import smoke
from schemas import write_avro


def write_demo_events(folder: str, users: int = 20, events: int = 5000, seed: int = 1) -> str:
    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    rows = [{"request_id": f"r{i}", "user": f"user{rng.randrange(users)}",
             "ts_ms": rng.randrange(0, 3_600_000), "value": round(rng.random(), 3)}
            for i in range(events)]
    for part in range(4):
        write_avro(os.path.join(folder, f"part-{part}.avro"), "smoke_event", rows[part::4])
    return os.path.join(folder, "*.avro")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = os.path.abspath(os.path.join("out", "demo"))
    pattern = write_demo_events(os.path.join(out, "events"))
    metrics_path = os.path.join(out, "metrics.json")
    smoke.main([f"--input={pattern}", f"--out={os.path.join(out, 'buckets')}",
                "--bucket_seconds=300", f"--metrics_out={metrics_path}"] + argv)
    with open(metrics_path, encoding="utf-8") as f:
        counters = json.load(f)["counters"]
    print(f"demo: {counters.get('smoke.events', 0)} events -> "
          f"{counters.get('smoke.buckets', 0)} (user, 5-minute bucket) summaries in "
          f"{out}/buckets-*.jsonl; metrics in {metrics_path}")


OPTIONS = [smoke.SmokeOptions]
