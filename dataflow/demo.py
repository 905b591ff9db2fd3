"""``make demo``: the main job on the embedded default (DirectRunner, ``memory://`` store).

MovieLens-100K as a stream, the way the library is meant to be used:

1. ``dataflow.data movielens``: every rating becomes a served request (feature log) and a
   rating ≥ 4 a click (action log), in time order;
2. ``dataflow.join``: feature logs + actions → the example log (daily files);
3. ``dataflow.train backfill`` on the first 80% of the examples (in time), ending with PS
   snapshots;
4. ``dataflow.train online``: bootstraps the PS from those snapshots and trains on the rest
   as its files land in a watched folder (the demo drops them in one by one).

Each example is scored before it is learned (online AUC); progress lines come every few
seconds, and the metrics (CSV, PNG) are written under ``out/demo/``. Beam's flags pass
through: ``python -m dataflow demo --runner=FlinkRunner --flink_master=[local]``.
"""
from __future__ import annotations

if __name__ == "__main__":  # output set up before Beam and TensorFlow load (dataflow.cli)
    from dataflow.pipelines import pipeline_main
    raise SystemExit(pipeline_main("demo"))

import json
import math
import os
import shutil
import sys
import threading
import time

from dataflow import data, join, train
from transforms.example_log import example_files, read_examples_in_order

OUT = os.path.abspath(os.path.join("out", "demo"))
CONFIG = "movielens"
COMMON = [f"--config={CONFIG}", "--model=deepfm", "--learning_rate=0.05", "--batch_size=128",
          "--metrics_window_s=604800", "--store=memory://demo"]


def example_log(out: str = OUT) -> list[str]:
    """The joined MovieLens example log (made once, reused by later runs).

    Args:
        out: the demo's folder.

    Returns:
        The example files.
    """
    joined = os.path.join(out, "joined")
    files = example_files(os.path.join(joined, "examples", "*.avro")) \
        if os.path.isdir(os.path.join(joined, "examples")) else []
    if files:
        return files
    logs = os.path.join(out, "logs")
    print(f"demo: writing MovieLens-100K as feature and action logs in {logs}", flush=True)
    data.movielens(logs)
    shutil.rmtree(joined, ignore_errors=True)
    print("demo: joining them into an example log", flush=True)
    join.main([f"--features={logs}/feature_log/*.avro", f"--actions={logs}/action_log/*.avro",
               f"--out={joined}", f"--config={CONFIG}", "--period_s=86400",
               "--join_window_s=3600"])
    return example_files(os.path.join(joined, "examples", "*.avro"))


def split_by_time(files: list[str], fraction: float = 0.8) -> tuple[list[str], list[str]]:
    """Example files split in time.

    Args:
        files: example files, in time order.
        fraction: the share of the examples of the first part.

    Returns:
        ``(files of the first fraction of the examples in time, the files after them)``.
    """
    counts = [sum(1 for _ in read_examples_in_order([f])) for f in files]
    total, running = sum(counts), 0
    for i, n in enumerate(counts):
        running += n
        if running >= fraction * total:
            return files[:i + 1], files[i + 1:]
    return files, []


def land_files(files: list[str], folder: str, every_s: float,
               done: str | None = None) -> threading.Thread:
    """Lands files in a folder one by one (temporary name, then rename), as a stream would.

    Args:
        files: the files.
        folder: where they land.
        every_s: seconds between two.
        done: a file created after the last one: the stream is over (``train online
            --stop_when_exists``).

    Returns:
        The thread that copies them (started).
    """
    def run():
        for f in files:
            target = os.path.join(folder, os.path.basename(f))
            shutil.copy(f, target + ".part")
            os.replace(target + ".part", target)
            time.sleep(every_s)
        if done:
            with open(done, "w", encoding="utf-8"):
                pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def totals(path: str) -> dict:
    """The online metrics' totals.

    Args:
        path: a ``-totals.json`` file.

    Returns:
        Its values; a metric without a value (null: no AUC without clicks) as NaN, which
        prints.
    """
    with open(path, encoding="utf-8") as f:
        return {k: math.nan if v is None else v for k, v in json.load(f).items()}


def main(argv: list[str] | None = None) -> None:
    """``python -m dataflow demo``.

    Args:
        argv: more flags for both training jobs, Beam's or ``dataflow.train``'s (None:
            ``sys.argv[1:]``).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    files = example_log()
    backfill, online = split_by_time(files)
    metrics_dir = os.path.join(OUT, "metrics")
    snapshots = os.path.join(OUT, "snapshots")
    shutil.rmtree(snapshots, ignore_errors=True)
    backfill_dir = os.path.join(OUT, "backfill")
    shutil.rmtree(backfill_dir, ignore_errors=True)
    os.makedirs(backfill_dir)
    for f in backfill:
        os.symlink(f, os.path.join(backfill_dir, os.path.basename(f)))

    print(f"demo: backfill on {len(backfill)} daily files (80% of the examples)", flush=True)
    train.main(["backfill", f"--input={backfill_dir}/*.avro", f"--export_dir={snapshots}",
                f"--metrics_dir={metrics_dir}", *COMMON, *argv])

    landing = os.path.join(OUT, "landing")
    shutil.rmtree(landing, ignore_errors=True)
    os.makedirs(landing)
    every_s = 0.2
    print(f"demo: online training from the snapshots; {len(online)} daily files land in "
          f"{landing}, one every {every_s}s", flush=True)
    done = os.path.join(OUT, "landing.done")
    if os.path.exists(done):
        os.remove(done)
    lander = land_files(online, landing, every_s, done)
    # The job ends once it has read every file (the lander's marker); --run_for_s only
    # bounds it if the lander never finishes.
    train.main(["online", f"--input={landing}", f"--restore={snapshots}",
                f"--metrics_dir={metrics_dir}", "--poll_interval_s=1",
                f"--stop_when_exists={done}", f"--run_for_s={len(online) * every_s + 120:.0f}",
                "--streaming", *COMMON, *argv])
    lander.join()

    b = totals(os.path.join(metrics_dir, "online-backfill-totals.json"))
    o = totals(os.path.join(metrics_dir, "online-online-totals.json"))
    print(f"demo: online AUC {b['auc']:.4f} over the backfill ({b['examples']:,} examples), "
          f"{o['auc']:.4f} online ({o['examples']:,} examples, after the backfill's "
          f"snapshots)")
    print(f"demo: metrics in {metrics_dir}/online-{{backfill,online}}.csv and .png; "
          f"PS snapshots in {snapshots}")


OPTIONS = [train.TrainOptions]
USAGE = "[train options, e.g. --model lr] [Beam flags, e.g. --runner=FlinkRunner]"
