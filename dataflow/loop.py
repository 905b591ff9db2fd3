"""The closed loop on one machine: serving → user actions → joining → online training →
parameter sync → serving, and its metric, **online serving AUC**.

    python -m dataflow.loop --out out/loop --duration_s 7200 --speed 60      # or: make loop

What it starts, and stops again at the end (or on an error, or Ctrl-C)::

    redis-server ─────────────── the ParameterStore (unless --store is given)
    python -m dataflow.serve ─── scores with rows from the store and the newest SavedModel,
        ▲        │                writes the feature log (served scores)
        │        ▼
    python -m dataflow.simulate  synthetic users: ask, see the top items, click with the
        │                        true probability, later; writes the action log
        ▼
    join (dataflow.join) ─────── feature log + action log → example log, per closed period
        ▼
    python -m dataflow.train online --model_dir ──► store (rows, dense) + SavedModels
                                                                        └──► serving

Why Redis: serving, the simulator and training are separate processes (as in production),
and ``memory://`` is one process's memory; ``redis://`` is the store they share.

Why the join runs per period on the DirectRunner: the DirectRunner (FnApiRunner) fires
event-time timers and hands GroupByKey output downstream only at the end of its input, so a
streaming join over tailed folders emits nothing until it is stopped (measured). So, as
soon as the feature log and the action log are complete up to the end of a period plus the
join window (their writers keep ``_watermark.json``), the loop runs the join pipeline,
bounded, on that period's feature log and the action log files up to its end plus the join
window, and lands the examples (one file per period, event-time order) in the folder that
online training follows. ``--runner FlinkRunner`` runs online training on Flink's
MiniCluster (measured: it keeps up, and the loop learns as on the DirectRunner).
``--join stream`` (Flink only) runs the join as one
streaming job over the tailed folders (``transforms.sources.TailAvroLogs``) instead. It is
started before the history, so that Flink's start-up is over when the run begins, and its
sources stop once the simulator's summary file exists (written after the last log file
landed). Measured on this 2-core machine it falls behind: it joins most periods only when
its sources stop at the end of the run.

Warm start (``--history_s``, default 4 simulated hours; 0 starts cold): a production loop
never starts from an untrained model, so first the same world's last hours before the run
are simulated (``--history_speedup`` times faster, at the same requests per simulated second)
against a serving process whose parameters are still the initial ones: every item scores
alike, so the history's ranking is the candidates' popularity order, not a learned one. Its
logs are joined in one go into the example folder that the online training job follows; the
job trains on the history first (batch, then online, in one job: DESIGN §4's reader over the
history) and the run starts once it has applied all of it, with serving on the parameters
and the SavedModel it published. The report covers the run only; ``history`` in it says
what the warm-up was.

Time: the simulated clock (event time) runs ``--speed`` times faster than the wall clock.
Everything event-time (the log periods ``--period_s``, the join window, model exports, the
report) is in simulated seconds.

At the end it prints and plots (``OUT/loop.png``, ``OUT/report.json``,
``OUT/auc_over_time.csv``): online serving AUC over time (the served scores against the
actions that followed) next to the Bayes-optimal AUC of the same served items (their true
click probabilities), the age of the parameters serving used (sparse rows and dense model,
in event time), and throughput (requests, served items, trained examples per second).
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import argparse
import csv
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import numpy as np

from dataflow import cli
from schemas import strict_json

_LOG = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------- processes


class Processes:
    """Child processes started by the loop; ``stop_all`` ends each of them (its whole
    process group), newest first."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.children: list = []  # (name, Popen, log file)
        self.pids: dict = {}  # name -> pid of everything ever started

    def start(self, name: str, argv: list, env: Optional[dict] = None) -> subprocess.Popen:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.children.append((name, proc, log))
        self.pids[name] = proc.pid
        _LOG.info("loop: started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def check(self, *names) -> None:
        """Raise if a child of these names has exited with an error."""
        for name, proc, _ in self.children:
            if name in names and proc.poll() not in (None, 0):
                raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                   f"{self.log_dir}/{name}.log")

    def stop(self, name: str, timeout_s: float = 15.0) -> None:
        for child_name, proc, log in list(self.children):
            if child_name != name:
                continue
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            log.close()
            self.children.remove((child_name, proc, log))

    def stop_all(self) -> None:
        for name, _, _ in reversed(list(self.children)):
            self.stop(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(procs: Processes, workdir: str) -> str:
    """A private redis-server (no persistence) on a free port; returns its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise RuntimeError("redis-server is missing: apt-get install redis-server "
                           "(or pass --store redis://HOST:PORT/DB)")
    port = _free_port()
    proc = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", workdir, "--save", "", "--appendonly", "no"])
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer on port {port}")
        time.sleep(0.05)


def _wait_for_file(path: str, procs: Processes, name: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        procs.check(name)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start within {timeout_s:.0f} s; see "
                               f"{procs.log_dir}/{name}.log")
        time.sleep(0.1)
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


# --------------------------------------------------------------------------- the join


def _log_files(folder: str) -> list:
    """(period start ms, path) of a log folder's complete files, in time order."""
    from transforms.tail import log_file_start_ms
    starts = ((log_file_start_ms(p), p) for p in glob.glob(os.path.join(folder, "part-*.avro")))
    return sorted((start, p) for start, p in starts if start is not None)


class PeriodJoin:
    """Runs the join pipeline (``dataflow.join``), bounded, on each closed period of the
    logs and lands its example files in ``examples_dir`` (see the module docstring).

    A period ``[t0, t1)`` is closed when the feature log is complete up to ``t1`` and the
    action log up to ``t1 + join window`` (their ``_watermark.json``); several closed
    periods are joined in one run. The runs' side outputs (unmatched, late, ...) stay in
    ``work_dir/run-NNNNN/out``; a run's unmatched actions include the clicks of requests of
    earlier periods, which the run before it joined.
    """

    def __init__(self, features_dir: str, actions_dir: str, examples_dir: str,
                 work_dir: str, config: str, period_s: float, join_window_s: float,
                 negative_sample_rate: float = 1.0, beam_args: tuple = ()):
        self.features_dir, self.actions_dir = features_dir, actions_dir
        self.examples_dir, self.work_dir = examples_dir, work_dir
        self.config = config
        self.period_ms = int(period_s * 1000)
        self.window_ms = int(join_window_s * 1000)
        self.negative_sample_rate = negative_sample_rate
        self.beam_args = list(beam_args)
        self.cursor: Optional[int] = None  # start of the next period to join
        self.runs: list = []  # per run: wall start/seconds, periods, examples
        os.makedirs(examples_dir, exist_ok=True)
        os.makedirs(work_dir, exist_ok=True)

    def ready_until(self, final: bool = False) -> Optional[int]:
        """End (ms) of the closed periods not joined yet, or None."""
        from dataflow.serve import read_watermark
        features = _log_files(self.features_dir)
        if self.cursor is None:
            if not features:
                return None
            self.cursor = features[0][0]
        if final:
            ends = [p + self.period_ms for p, _ in features]
            end = max(ends, default=self.cursor)
        else:
            fw, aw = read_watermark(self.features_dir), read_watermark(self.actions_dir)
            if fw is None or aw is None:
                return None
            end = min(fw, aw - self.window_ms)
            end -= end % self.period_ms
        return end if end > self.cursor else None

    def run_once(self, final: bool = False) -> int:
        """Join what is closed (``final``: everything left); returns examples landed."""
        end = self.ready_until(final)
        if end is None:
            return 0
        from dataflow.join import main as join_main
        start = self.cursor
        features = [p for t, p in _log_files(self.features_dir) if start <= t < end]
        actions = [p for t, p in _log_files(self.actions_dir)
                   if start <= t < end + self.window_ms]
        run = os.path.join(self.work_dir, f"run-{len(self.runs):05d}")
        wall = time.time()
        examples = 0
        if features:
            for kind, paths in (("features", features), ("actions", actions)):
                os.makedirs(os.path.join(run, "in", kind))
                for path in paths:
                    os.link(path, os.path.join(run, "in", kind, os.path.basename(path)))
            if not actions:  # the join reads a glob: it needs one file, even empty
                from schemas import write_avro
                write_avro(os.path.join(run, "in", "actions", "none.avro"), "action_log", [])
            join_main([f"--features={run}/in/features/*.avro",
                       f"--actions={run}/in/actions/*.avro", f"--config={self.config}",
                       f"--out={run}/out", f"--join_window_s={self.window_ms / 1000}",
                       f"--period_s={self.period_ms // 1000}",
                       f"--negative_sample_rate={self.negative_sample_rate}",
                       *self.beam_args])
            examples = self._land(os.path.join(run, "out", "examples"))
        self.cursor = end
        self.runs.append({"wall_time": wall, "seconds": round(time.time() - wall, 3),
                          "from_ms": start, "to_ms": end, "feature_files": len(features),
                          "action_files": len(actions), "examples": examples})
        _LOG.info("loop: joined %d periods in %.1f s: %d examples", (end - start)
                  // self.period_ms, time.time() - wall, examples)
        return examples

    def _land(self, folder: str) -> int:
        """Move the run's example files into the folder training follows, in name (event
        time) order, each by an atomic rename."""
        from transforms.example_log import count_examples
        paths = sorted(glob.glob(os.path.join(folder, "*.avro")))
        count = count_examples(paths)
        for path in paths:
            os.rename(path, os.path.join(self.examples_dir, os.path.basename(path)))
        return count


# --------------------------------------------------------------------------- the report


def read_log(folder: str) -> list:
    import fastavro
    records = []
    for _, path in _log_files(folder):
        with open(path, "rb") as f:
            records.extend(fastavro.reader(f))
    return records


def serving_auc_over_time(features_dir: str, actions_dir: str, join_window_s: float,
                          buckets: int = 12, positive_actions=("click", "like", "share")):
    """Online serving AUC per bucket of event time: the scores serving returned against the
    actions that followed within the join window, and the Bayes-optimal AUC (true CTRs) of
    the same served items. Returns (rows, totals)."""
    from dataflow.data import roc_auc
    served = read_log(features_dir)
    actions = read_log(actions_dir)
    if not served:
        return [], {}
    served_at = {r["request_id"]: r["ts_ms"] for r in served}
    window = int(join_window_s * 1000)
    clicked = {a["request_id"] for a in actions if a["action"] in positive_actions
               and a["request_id"] in served_at
               and a["ts_ms"] <= served_at[a["request_id"]] + window}
    ts = np.array([r["ts_ms"] for r in served], np.int64)
    score = np.array([r["served_score"] for r in served], np.float64)
    ctr = np.array([np.nan if r.get("true_ctr") is None else r["true_ctr"] for r in served])
    label = np.array([r["request_id"] in clicked for r in served], bool)
    t0, t1 = int(ts.min()), int(ts.max()) + 1
    edges = np.linspace(t0, t1, buckets + 1).astype(np.int64)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (ts >= lo) & (ts < hi)
        rows.append({"from_s": round((lo - t0) / 1000, 1), "to_s": round((hi - t0) / 1000, 1),
                     "served": int(sel.sum()), "positives": int(label[sel].sum()),
                     "serving_auc": _round(roc_auc(score[sel], label[sel])),
                     "bayes_auc": _round(roc_auc(ctr[sel], label[sel]))})

    def span(sel):
        auc, bayes = roc_auc(score[sel], label[sel]), roc_auc(ctr[sel], label[sel])
        expected, noise = click_noise(score[sel], ctr[sel])
        return {"served": int(sel.sum()), "positives": int(label[sel].sum()),
                "serving_auc": _round(auc), "bayes_auc": _round(bayes),
                "ratio": _round(auc / bayes), "ratio_expected": _round(expected),
                "ratio_click_noise_sd": _round(noise)}

    quarter = t0 + (t1 - t0) * 3 // 4
    first = t0 + (t1 - t0) // 4
    totals = {"all": span(ts >= t0), "first_quarter": span(ts < first),
              "last_quarter": span(ts >= quarter)}
    return rows, totals


def click_noise(score: np.ndarray, ctr: np.ndarray, draws: int = 200,
                seed: int = 0) -> tuple:
    """The ratio serving AUC / Bayes AUC of these served items, over clicks drawn again
    from their true CTRs: (mean, standard deviation). The clicks that did follow are one
    such draw, so a run's ratio is this mean give or take this much click noise, with the
    served items and scores as they were.

    >>> ctr = np.linspace(0.05, 0.5, 2000)
    >>> mean, sd = click_noise(ctr, ctr)          # scores that rank as the truth does
    >>> round(mean, 6), round(sd, 6)
    (1.0, 0.0)
    """
    from dataflow.data import average_ranks
    if len(ctr) == 0 or not np.isfinite(ctr).all():
        return float("nan"), float("nan")
    ranks = np.stack([average_ranks(score), average_ranks(ctr)], axis=1)
    rng = np.random.default_rng(seed)
    ratios = []
    for chunk in range(0, draws, 16):  # 16 draws at a time: bounded memory on long runs
        labels = rng.random((min(16, draws - chunk), len(ctr))) < ctr
        pos = labels.sum(axis=1).astype(np.float64)
        keep = (pos > 0) & (pos < len(ctr))
        pos = pos[keep]
        rank_sums = labels[keep].astype(np.float64) @ ranks  # (draws, served | bayes)
        auc = (rank_sums - (pos * (pos + 1) / 2.0)[:, None]) / (pos * (len(ctr) - pos))[:, None]
        ratios.append(auc[:, 0] / auc[:, 1])
    ratios = np.concatenate(ratios)
    if not len(ratios):
        return float("nan"), float("nan")
    return float(ratios.mean()), float(ratios.std())


def _round(x, digits: int = 4):
    return None if x is None or not np.isfinite(x) else round(float(x), digits)


def read_sim_stats(path: str) -> dict:
    cols: dict = {}
    if not os.path.exists(path):
        return cols
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                cols.setdefault(k, []).append(v)

    def num(name):
        return np.array([float(v) if v not in ("", "None") else np.nan
                         for v in cols.get(name, [])])
    return {k: num(k) for k in ("wall_s", "ts_ms", "latency_ms", "served", "model_version",
                                "dense_age_ms", "sparse_age_ms", "sparse_wall_age_s",
                                "status")}


def plot(path: str, rows: list, stats: dict, trained: list, title: str):
    """The loop's PNG (serving AUC, parameter age, throughput); returns the figure."""
    from matplotlib.figure import Figure

    from transforms.metrics_report import fixed_margins
    fig = Figure(figsize=(9, 10))
    axes = fig.subplots(3, 1)
    ax = axes[0]
    mid = [(r["from_s"] + r["to_s"]) / 2 / 60 for r in rows]
    ax.plot(mid, [r["serving_auc"] for r in rows], "o-", label="online serving AUC")
    ax.plot(mid, [r["bayes_auc"] for r in rows], "s--", label="Bayes-optimal AUC (true CTR)")
    ax.set_xlabel("event time (simulated minutes)")
    ax.set_ylabel("AUC")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    if stats.get("ts_ms") is not None and len(stats["ts_ms"]):
        t = (stats["ts_ms"] - np.nanmin(stats["ts_ms"])) / 60_000
        ax.plot(t, stats["sparse_age_ms"] / 60_000, ".", ms=2, label="sparse rows")
        ax.plot(t, stats["dense_age_ms"] / 60_000, ".", ms=2, label="dense model")
    ax.set_xlabel("event time (simulated minutes)")
    ax.set_ylabel("parameter age at serving\n(simulated minutes)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[2]
    if stats.get("wall_s") is not None and len(stats["wall_s"]):
        wall = stats["wall_s"]
        bins = np.arange(0, np.nanmax(wall) + 2, 2.0)
        counts, _ = np.histogram(wall, bins)
        items, _ = np.histogram(wall, bins, weights=np.nan_to_num(stats["served"]))
        ax.plot(bins[:-1], counts / 2.0, label="requests/s")
        ax.plot(bins[:-1], items / 2.0, label="served items/s")
    if len(trained) > 1:
        tw = np.array([w for w, _ in trained])
        te = np.array([e for _, e in trained], np.float64)
        # training applies the example log in bursts (a period at a time): 5 s averages
        grid = np.arange(tw[0], tw[-1] + 5.0, 5.0)
        ax.plot(grid[1:], np.diff(np.interp(grid, tw, te)) / 5.0,
                label="trained examples/s (5 s means)")
    ax.set_xlabel("wall seconds since the simulator started")
    ax.set_ylabel("per wall second")
    ax.legend()
    ax.grid(alpha=0.3)
    fixed_margins(fig, left=1.0, right=0.2, top=0.4, bottom=0.55, hspace=0.65)
    fig.savefig(path, dpi=100)
    return fig


# --------------------------------------------------------------------------- the loop


def parser() -> argparse.ArgumentParser:
    p = cli.argument_parser(prog="python -m dataflow.loop", description=__doc__)
    p.add_argument("--out", default="out/loop", help="working folder (emptied first)")
    p.add_argument("--duration_s", type=float, default=14400.0, help="simulated seconds")
    p.add_argument("--speed", type=float, default=60.0, help="simulated seconds per wall second")
    p.add_argument("--rps", type=float, default=30.0,
                   help="requests per wall second (30 at 60x: 1,800 requests per simulated "
                        "hour, 18 per user)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--candidates", type=int, default=30)
    p.add_argument("--top_k", type=int, default=10)
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--items", type=int, default=300,
                   help="items born over a day (a quarter before the start)")
    p.add_argument("--categories", type=int, default=10)
    p.add_argument("--drift", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default="synthetic")
    p.add_argument("--model", default="fm", choices=["lr", "fm", "deepfm"],
                   help="fm, rows 0.03, dense 0.005: the best mean over 3 seeds in replays "
                        "and loop runs (docs/experiments.md §6); LR or DeepFM are within "
                        "0.006 of it")
    p.add_argument("--learning_rate", type=float, default=0.03, help="sparse rows (Adagrad)")
    p.add_argument("--dense_learning_rate", type=float, default=0.005,
                   help="dense weights (Adam)")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--num_shards", type=int, default=2)
    p.add_argument("--period_s", type=float, default=120.0,
                   help="event-time seconds per log file and per example period")
    p.add_argument("--join_window_s", type=float, default=300.0)
    p.add_argument("--max_delay_s", type=float, default=600.0,
                   help="longest delay of a user action (later than the join window: late)")
    p.add_argument("--negative_sample_rate", type=float, default=1.0)
    p.add_argument("--model_export_interval_s", type=float, default=120.0,
                   help="event-time seconds between SavedModel exports")
    p.add_argument("--store", default=None,
                   help="redis://HOST:PORT/DB, emptied first (default: a private redis-server)")
    p.add_argument("--runner", default="DirectRunner", choices=["DirectRunner", "FlinkRunner"],
                   help="runner of online training (and of a streaming join)")
    p.add_argument("--join", default="periods", choices=["periods", "stream"],
                   help="periods: the join pipeline, bounded, per closed period of the logs "
                        "(DirectRunner); stream: one streaming join job on the runner over "
                        "the tailed logs (Flink only)")
    p.add_argument("--history_s", type=float, default=14400.0,
                   help="simulated seconds of the world's history before the run (0: start "
                        "cold): served by the initial parameters, joined, and trained on by "
                        "the online job before the run starts, as a production loop never "
                        "starts from an untrained model")
    p.add_argument("--history_speedup", type=float, default=5.0,
                   help="the history runs this many times faster (--speed and --rps both: "
                        "the same requests per simulated second as the run)")
    p.add_argument("--report_buckets", type=int, default=12)
    p.add_argument("--serve_start_timeout_s", type=float, default=180.0)
    p.add_argument("--drain_timeout_s", type=float, default=120.0,
                   help="after the simulation: how long to wait for training to catch up")
    return p


def run(args) -> dict:
    stream = args.join == "stream"
    if stream and args.runner != "FlinkRunner":
        raise ValueError("--join stream needs --runner FlinkRunner: the DirectRunner fires "
                         "event-time timers only at the end of its input")
    out = os.path.abspath(args.out)
    for sub in ("feature_log", "action_log", "examples", "models", "join", "train", "logs",
                "history"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        os.makedirs(os.path.join(out, sub))
    for name in ("serve.url", "sim_stats.csv", "sim_summary.json", "report.json",
                 "loop.png", "auc_over_time.csv", "serve-history.url", "join.started"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    procs = Processes(os.path.join(out, "logs"))
    py = sys.executable
    flink = args.runner == "FlinkRunner"
    beam_args = (["--runner=FlinkRunner", "--flink_master=[local]", "--parallelism=1",
                  "--streaming"] if flink else ["--runner=DirectRunner"])
    beam_args += _verbose(args)
    started = time.monotonic()
    trained: list = []
    history = None
    try:
        store = args.store or start_redis(procs, os.path.join(out, "logs"))
        _clear_store(store, args.num_shards)
        expected_wall = args.duration_s / args.speed
        history_wall = args.history_s / (args.speed * args.history_speedup)
        procs.start("train", [
            py, "-m", "dataflow.train", "online", f"--input={out}/examples",
            f"--config={args.config}", f"--model={args.model}", f"--store={store}",
            f"--num_shards={args.num_shards}", f"--batch_size={args.batch_size}",
            f"--learning_rate={args.learning_rate}",
            f"--dense_learning_rate={args.dense_learning_rate}", f"--model_dir={out}/models",
            f"--model_export_interval_s={args.model_export_interval_s}", "--poll_interval_s=0.5",
            f"--run_for_s={(expected_wall + history_wall) * 3 + 600:.0f}",
            f"--metrics_dir={out}/train",
            f"--metrics_window_s={int(max(args.period_s, args.duration_s / 12))}",
            f"--seed={args.seed}", "--streaming", *beam_args])
        if stream:
            # One streaming job over the run's tailed logs, started first: Flink's start-up
            # (~40 s for a MiniCluster) then overlaps the history instead of the run. Its
            # sources stop once the simulator's summary exists, which it writes after its
            # last actions and serving's last feature log file have landed.
            procs.start("join", [
                py, "-m", "dataflow.loop", "stream-join", f"--features={out}/feature_log",
                f"--actions={out}/action_log", f"--examples={out}/examples",
                f"--config={args.config}", f"--join_window_s={args.join_window_s}",
                f"--period_s={int(args.period_s)}",
                f"--negative_sample_rate={args.negative_sample_rate}",
                f"--stop_when_exists={out}/sim_summary.json",
                f"--stop_after_s={(expected_wall + history_wall) * 3 + 900:.0f}",
                f"--started_file={out}/join.started", f"--dead_letter={out}/join",
                *beam_args])
        if args.history_s > 0:
            history, history_joiner = run_history(procs, args, out, store)
        url = start_serving(procs, args, out, store, "serve", f"{out}/feature_log")
        if history is not None:
            # the run starts once training has applied the whole history
            history.update(wait_for_training(procs, store, args, history_joiner,
                                             args.drain_timeout_s))
        if stream:  # the run's first requests are joined as they land
            _wait_for_file(f"{out}/join.started", procs, "join", args.serve_start_timeout_s)
        # The simulator starts its clock once serving answers.
        procs.start("simulate", simulate_argv(
            args, url, f"{out}/action_log", args.speed, args.rps, clock_from_s=0.0,
            clock_to_s=args.duration_s, stats=f"{out}/sim_stats.csv",
            summary=f"{out}/sim_summary.json"))
        _wait_for_file(f"{out}/serve.url", procs, "serve", args.serve_start_timeout_s)
        sim_started = time.monotonic()
        joiner = PeriodJoin(f"{out}/feature_log", f"{out}/action_log", f"{out}/examples",
                            f"{out}/join", args.config, args.period_s, args.join_window_s,
                            args.negative_sample_rate)
        from ps.store import open_store
        store_handle = open_store(store, num_shards=args.num_shards)
        sim = next(p for n, p, _ in procs.children if n == "simulate")
        last_print = 0.0
        while sim.poll() is None:
            procs.check("serve", "train", "redis", "join")
            if not stream:
                joiner.run_once()
            trained.append((time.monotonic() - sim_started,
                            _trained_examples(store_handle, args.batch_size)))
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"loop: {time.monotonic() - started:.0f} s, "
                      f"{_count_examples(joiner.examples_dir):,} examples joined, "
                      f"~{trained[-1][1]:,} trained", flush=True)
            time.sleep(0.25)
        if sim.returncode != 0:
            raise RuntimeError(f"simulate exited with {sim.returncode}; see "
                               f"{out}/logs/simulate.log")
        if stream:  # its sources stop now that the summary exists; then every window closes
            join_proc = next(p for n, p, _ in procs.children if n == "join")
            try:
                join_proc.wait(timeout=expected_wall + 300)
            except subprocess.TimeoutExpired:
                raise RuntimeError("the streaming join did not finish") from None
            procs.check("join")
        else:  # the simulator wrote every action and closed the feature log: join the rest
            joiner.run_once(final=True)
        wait_for_training(procs, store, args, joiner, args.drain_timeout_s,
                          progress=lambda: trained.append((
                              time.monotonic() - sim_started,
                              _trained_examples(store_handle, args.batch_size))))
        store_handle.close()
    finally:
        procs.stop_all()
    wall = time.monotonic() - started
    result = report(out, args, joiner, trained, wall, history)
    result["pids"] = procs.pids
    return result


def start_serving(procs: Processes, args, out: str, store: str, name: str,
                  feature_log: str) -> str:
    """Starts ``dataflow.serve`` as ``name`` on a free port (its port file is
    ``OUT/NAME.url``); returns its URL."""
    port = _free_port()
    procs.start(name, [
        sys.executable, "-m", "dataflow.serve", "--store", store, "--model", f"{out}/models",
        "--config", args.config, "--model_kind", args.model, "--seed", str(args.seed),
        "--num_shards", str(args.num_shards), "--feature_log", feature_log,
        "--roll_s", str(args.period_s), "--port", str(port),
        "--port_file", f"{out}/{name}.url", "--poll_s", "0.5", *_verbose(args)])
    return f"http://127.0.0.1:{port}"


def simulate_argv(args, url: str, actions: str, speed: float, rps: float,
                  clock_from_s: float, clock_to_s: float, stats: Optional[str],
                  summary: str) -> list:
    """``dataflow.simulate`` over [clock_from_s, clock_to_s) of the loop's world."""
    return [sys.executable, "-m", "dataflow.simulate", "--serve", url, "--actions", actions,
            "--duration_s", str(args.duration_s), "--clock_from_s", str(clock_from_s),
            "--clock_to_s", str(clock_to_s), "--speed", str(speed), "--rps", str(rps),
            "--concurrency", str(args.concurrency), "--candidates", str(args.candidates),
            "--top_k", str(args.top_k), "--roll_s", str(args.period_s),
            "--max_delay_s", str(args.max_delay_s), "--users", str(args.users),
            "--items", str(args.items), "--categories", str(args.categories),
            "--drift", str(args.drift), "--seed", str(args.seed),
            *(["--stats", stats] if stats else []), "--summary", summary,
            "--wait_for_serve_s", str(args.serve_start_timeout_s), *_verbose(args)]


def _verbose(args) -> list:
    """The children (their logs in OUT/logs/) are as verbose as the loop."""
    return [cli.VERBOSE_FLAG] if getattr(args, "verbose", False) else []


def run_history(procs: Processes, args, out: str, store: str) -> dict:
    """The world's last ``--history_s`` before the run, ``--history_speedup`` times faster:
    served by the initial parameters (every item scores alike: the history's ranking is the
    candidates' popularity order), joined in one go into the folder online training follows.
    Returns the history's summary and its joiner (for :func:`wait_for_training`)."""
    folder = f"{out}/history"
    wall = time.monotonic()
    url = start_serving(procs, args, out, store, "serve-history", f"{folder}/feature_log")
    sim = procs.start("simulate-history", simulate_argv(
        args, url, f"{folder}/action_log", args.speed * args.history_speedup,
        args.rps * args.history_speedup, clock_from_s=-args.history_s, clock_to_s=0.0,
        stats=None, summary=f"{folder}/sim_summary.json"))
    _wait_for_file(f"{out}/serve-history.url", procs, "serve-history",
                   args.serve_start_timeout_s)
    while sim.poll() is None:
        procs.check("serve-history", "train", "redis")
        time.sleep(0.25)
    if sim.returncode != 0:
        raise RuntimeError(f"simulate-history exited with {sim.returncode}; see "
                           f"{procs.log_dir}/simulate-history.log")
    procs.stop("serve-history")
    joiner = PeriodJoin(f"{folder}/feature_log", f"{folder}/action_log", f"{out}/examples",
                        f"{out}/join/history", args.config, args.period_s,
                        args.join_window_s, args.negative_sample_rate)
    joiner.run_once(final=True)
    with open(f"{folder}/sim_summary.json", encoding="utf-8") as f:
        sim_summary = json.load(f)
    history = {"simulated_s": args.history_s,
               **{k: sim_summary.get(k) for k in ("requests", "served", "clicks",
                                                  "serving_auc", "bayes_auc")},
               "examples": sum(r["examples"] for r in joiner.runs),
               "wall_s": round(time.monotonic() - wall, 1)}
    _LOG.info("loop: history of %.0f simulated s: %s requests, %d examples in %.0f s",
              args.history_s, history["requests"], history["examples"], history["wall_s"])
    return history, joiner


def wait_for_training(procs: Processes, store: str, args, joiner: "PeriodJoin",
                      timeout_s: float, progress=None) -> dict:
    """Waits until training has applied gradients up to the last example ``joiner``
    landed (or ``timeout_s``), calling ``progress()`` at each look."""
    from ps.store import open_store
    handle = open_store(store, num_shards=args.num_shards)
    started = time.monotonic()
    try:
        while True:
            procs.check("train")
            if progress:
                progress()
            if _caught_up(joiner, handle.sync_info().get("dense", {})):
                return {"caught_up": True, "wait_s": round(time.monotonic() - started, 1)}
            if time.monotonic() - started > timeout_s:
                _LOG.warning("loop: training did not catch up within %.0f s", timeout_s)
                return {"caught_up": False, "wait_s": round(time.monotonic() - started, 1)}
            time.sleep(0.5)
    finally:
        handle.close()


def _clear_store(url: str, num_shards: int) -> None:
    from ps.store import open_store
    store = open_store(url, num_shards=num_shards)
    store.clear()
    store.close()


def _trained_examples(store, batch_size: int) -> int:
    """About the examples the dense PS applied so far: its version counts gradient batches
    (a batch is short when a period ends, so this overestimates a little)."""
    try:
        return int(store.sync_info().get("dense", {}).get("version", 0)) * batch_size
    except Exception:  # noqa: BLE001 - a progress figure only
        return 0


def _count_examples(folder: str) -> int:
    """Examples in a folder's Avro files, from their block headers."""
    from transforms.example_log import count_examples
    return count_examples(glob.glob(os.path.join(folder, "*.avro")))


def _caught_up(joiner: PeriodJoin, dense_sync: dict) -> bool:
    """Training has applied gradients up to the last example landed."""
    import fastavro
    files = sorted(glob.glob(os.path.join(joiner.examples_dir, "*.avro")))
    if not files:
        return True
    with open(files[-1], "rb") as f:
        last = max((r["ts_ms"] for r in fastavro.reader(f)), default=0)
    return dense_sync.get("ts_ms", -1) >= last


def report(out: str, args, joiner: PeriodJoin, trained: list, wall: float,
           history: Optional[dict] = None) -> dict:
    rows, totals = serving_auc_over_time(f"{out}/feature_log", f"{out}/action_log",
                                         args.join_window_s, args.report_buckets)
    stats = read_sim_stats(f"{out}/sim_stats.csv")
    sim_summary = {}
    if os.path.exists(f"{out}/sim_summary.json"):
        with open(f"{out}/sim_summary.json", encoding="utf-8") as f:
            sim_summary = json.load(f)
    with open(f"{out}/auc_over_time.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["from_s", "to_s", "served", "positives", "serving_auc",
                                    "bayes_auc"])
        writer.writeheader()
        writer.writerows(rows)

    def pct(values, q):
        values = values[np.isfinite(values)] if values is not None and len(values) else []
        return None if not len(values) else round(float(np.percentile(values, q)), 1)

    ok = stats.get("status", np.zeros(0)) == 200
    staleness = {
        "sparse_age_s_p50": _div(pct(stats.get("sparse_age_ms")[ok], 50), 1000)
        if ok.any() else None,
        "sparse_age_s_p99": _div(pct(stats.get("sparse_age_ms")[ok], 99), 1000)
        if ok.any() else None,
        "dense_age_s_p50": _div(pct(stats.get("dense_age_ms")[ok], 50), 1000)
        if ok.any() else None,
        "sparse_sync_wall_age_s_p50": pct(stats.get("sparse_wall_age_s")[ok], 50)
        if ok.any() else None,
    }
    # the run's examples: the folder holds the history's before them
    examples = _count_examples(joiner.examples_dir) - (history or {}).get("examples", 0)
    result = {
        "auc": totals, "auc_over_time": rows, "staleness": staleness,
        "throughput": {
            "wall_s": round(wall, 1),
            "requests_per_s": sim_summary.get("requests_per_s"),
            "served_items_per_s": round(sim_summary.get("served", 0)
                                        / max(sim_summary.get("wall_s", 1), 1e-9), 1),
            "serving_latency_ms_p50": sim_summary.get("latency_ms_p50"),
            "serving_latency_ms_p99": sim_summary.get("latency_ms_p99"),
            "examples_joined": examples, "join_runs": len(joiner.runs),
            "join_seconds": round(sum(r["seconds"] for r in joiner.runs), 1),
            "examples_trained_about": trained[-1][1] if trained else 0,
        },
        "simulator": sim_summary,
        "history": history,
        "models_kept": len(glob.glob(f"{out}/models/*-v*")),
        "model_versions_served": int(len(np.unique(
            stats["model_version"][np.isfinite(stats["model_version"])])))
        if stats.get("model_version") is not None else 0,
        "settings": {k: v for k, v in vars(args).items()},
    }
    with open(f"{out}/report.json", "w", encoding="utf-8") as f:
        strict_json.dump(result, f, indent=2)
    last = totals.get("last_quarter", {})
    title = (f"closed loop ({args.model}, {args.runner}): last quarter serving AUC "
             f"{last.get('serving_auc')} vs Bayes {last.get('bayes_auc')}")
    plot(f"{out}/loop.png", rows, stats, trained, title)
    return result


def _div(x, d):
    return None if x is None else round(x / d, 1)


# --------------------------------------------------------------------------- Flink join


# no annotations: Beam reads a callable's (strings here) and logs that it uses Any
def _write_started(path):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{time.time():.3f}\n")
    os.replace(tmp, path)


def build_stream_join(pipeline, opts) -> None:
    """The join as one streaming pipeline over the tailed log folders (for Flink): the same
    transforms as ``dataflow.join``, with ``TailAvroLogs`` (event-time watermarks)."""
    import apache_beam as beam

    from dataflow.join import WriteEventTimeFiles, WriteExampleLog
    from transforms.features import ExtractFeatures
    from transforms.joiner import OnlineJoiner
    from transforms.tail import TailAvroLogs
    stop = time.time() + opts.stop_after_s
    extracted = (pipeline
                 | "TailFeatureLog" >> TailAvroLogs(f"{opts.features}/part-*.avro",
                                                    opts.poll_s, stop_timestamp=stop,
                                                    stop_when_exists=opts.stop_when_exists)
                 | "ExtractFeatures" >> ExtractFeatures(opts.config))
    actions = pipeline | "TailActionLog" >> TailAvroLogs(f"{opts.actions}/part-*.avro",
                                                         opts.poll_s, stop_timestamp=stop,
                                                         stop_when_exists=opts.stop_when_exists)
    if opts.started_file:  # runs once the runner executes the job, not when it accepts it
        _ = (pipeline | "Started" >> beam.Create([opts.started_file])
             | "WriteStarted" >> beam.Map(_write_started))
    joined = (extracted.features, actions) | "Join" >> OnlineJoiner(
        join_window_s=opts.join_window_s, negative_sample_rate=opts.negative_sample_rate)
    joined.examples | "WriteExamples" >> WriteExampleLog(opts.examples, opts.join_window_s,
                                                         opts.period_s)
    extracted.dead_letter | "WriteDeadLetter" >> WriteEventTimeFiles(
        os.path.join(opts.dead_letter, "dead_letter"), opts.period_s)


def stream_join_main(argv) -> int:
    from dataflow.job import run_job
    from dataflow.options import MonolithOptions, pipeline_options

    # Beam parses every options class with every pipeline: no required=True here.
    class StreamJoinOptions(MonolithOptions):
        @classmethod
        def _add_argparse_args(cls, parser):
            parser.add_argument("--features", help="feature log folder")
            parser.add_argument("--actions", help="action log folder")
            parser.add_argument("--examples", help="example log folder (training follows it)")
            parser.add_argument("--dead_letter", help="folder for dead_letter/")
            parser.add_argument("--config", default="synthetic")
            parser.add_argument("--join_window_s", type=float, default=300.0)
            parser.add_argument("--period_s", type=int, default=120)
            parser.add_argument("--negative_sample_rate", type=float, default=1.0)
            parser.add_argument("--stop_after_s", type=float, default=600.0,
                                help="stop listing the folders after this many wall seconds")
            parser.add_argument("--stop_when_exists", default=None,
                                help="stop listing the folders once this file exists (the "
                                     "writer creates it after its last log file landed)")
            parser.add_argument("--started_file", default=None,
                                help="write this file once the job runs")
            parser.add_argument("--poll_s", type=float, default=0.5)

    options = pipeline_options(argv, StreamJoinOptions)
    opts = options.view_as(StreamJoinOptions)
    missing = [f"--{n}" for n in ("features", "actions", "examples", "dead_letter")
               if not getattr(opts, n)]
    if missing:
        raise SystemExit(f"stream-join: {', '.join(missing)} required")
    run_job(lambda p: build_stream_join(p, opts), options)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "stream-join":
        return stream_join_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        result = run(args)
    except (RuntimeError, ValueError, OSError) as e:
        print(f"loop: {e}", file=sys.stderr)
        return 2
    print("\nonline serving AUC over time (event time since the start):")
    print(f"  {'from':>8} {'to':>8} {'served':>7} {'clicks':>6} {'serving':>8} {'bayes':>7}")
    for r in result["auc_over_time"]:
        print(f"  {r['from_s']:>8.0f} {r['to_s']:>8.0f} {r['served']:>7} "
              f"{r['positives']:>6} {r['serving_auc'] or float('nan'):>8.4f} "
              f"{r['bayes_auc'] or float('nan'):>7.4f}")
    print(strict_json.dumps({k: result[k] for k in ("auc", "staleness", "throughput", "history",
                                             "models_kept",
                                             "model_versions_served")}, indent=2))
    print(f"wrote {args.out}/report.json, {args.out}/loop.png, {args.out}/auc_over_time.csv")
    return 0


if __name__ == "__main__":
    if not cli.verbose_requested():  # a join's counters every period: "loop: joined" says it
        logging.getLogger("dataflow.job").setLevel(logging.WARNING)
    from dataflow import loop as _loop  # the importable module (Beam pickles its DoFns)
    sys.exit(_loop.main())
