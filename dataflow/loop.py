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
streaming job over the tailed folders (``transforms.tail.TailAvroLogs``) instead. It is
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
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

from dataflow import cli
from dataflow.closed_loop.period_join import PeriodJoin
from dataflow.closed_loop.processes import Processes, free_port, start_redis, wait_for_file
from dataflow.closed_loop.report import report
from schemas import read_avro, strict_json
from transforms.example_log import count_examples, example_files

_LOG = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    """Returns: the loop's command-line parser."""
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
    p.add_argument("--transport", default="files", choices=["files", "kafka"],
                   help="files: the logs are folders of Avro files (--join says how they are "
                        "joined); kafka: topics of a broker the loop starts in OUT/kafka "
                        "(make kafka-dist), joined by one streaming Flink job ([local]) "
                        "that writes the examples topic training follows")
    p.add_argument("--kafka_partitions", type=int, default=1,
                   help="--transport kafka: partitions of each topic")
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
    """Runs the loop: starts its processes, warms up (``--history_s``), runs the simulation
    while joining (each closed period, or one streaming job), waits for training to catch
    up, stops everything and writes the report.

    Args:
        args: :func:`parser`'s parsed command line.

    Returns:
        The report (``dataflow.closed_loop.report.report``) and the children's ``pids``.
    """
    kafka = args.transport == "kafka"
    stream = args.join == "stream" or kafka
    if args.join == "stream" and args.runner != "FlinkRunner" and not kafka:
        raise ValueError("--join stream needs --runner FlinkRunner: the DirectRunner fires "
                         "event-time timers only at the end of its input")
    out = os.path.abspath(args.out)
    for sub in ("feature_log", "action_log", "examples", "models", "join", "train", "logs",
                "history"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
        os.makedirs(os.path.join(out, sub))
    for name in ("serve.url", "sim_stats.csv", "sim_summary.json", "report.json",
                 "loop.png", "auc_over_time.csv", "serve-history.url", "join.started",
                 "join.done"):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    procs = Processes(os.path.join(out, "logs"))
    py = sys.executable
    flink = args.runner == "FlinkRunner"
    flink_args = ["--runner=FlinkRunner", "--flink_master=[local]", "--parallelism=1",
                  "--streaming", *_verbose(args)]
    beam_args = flink_args if flink else ["--runner=DirectRunner", *_verbose(args)]
    started = time.monotonic()
    trained: list = []
    history = None
    transport = None
    join_runs: list = []
    try:
        if kafka:
            from dataflow.closed_loop.kafka_transport import KafkaTransport
            transport = KafkaTransport(os.path.join(out, "kafka"),
                                       args.kafka_partitions).start()
            procs.pids["kafka"] = transport.pid
            features, actions, examples = (transport.url(t) for t in
                                           ("features", "actions", "examples"))
            examples_count, last_example_ts = transport.examples, transport.last_example_ts
        else:
            features, actions, examples = (f"{out}/{d}" for d in
                                           ("feature_log", "action_log", "examples"))
            examples_count = lambda: count_examples(example_files(examples))  # noqa: E731
            last_example_ts = lambda: _last_example_ts(examples)  # noqa: E731
        store = args.store or start_redis(procs, os.path.join(out, "logs"))
        _clear_store(store, args.num_shards)
        expected_wall = args.duration_s / args.speed
        history_wall = args.history_s / (args.speed * args.history_speedup)
        procs.start("train", [
            py, "-m", "dataflow.train", "online", f"--input={examples}",
            f"--config={args.config}", f"--model={args.model}", f"--store={store}",
            f"--num_shards={args.num_shards}", f"--batch_size={args.batch_size}",
            f"--learning_rate={args.learning_rate}",
            f"--dense_learning_rate={args.dense_learning_rate}", f"--model_dir={out}/models",
            f"--model_export_interval_s={args.model_export_interval_s}", "--poll_interval_s=0.5",
            f"--run_for_s={(expected_wall + history_wall) * 3 + 600:.0f}",
            f"--metrics_dir={out}/train",
            f"--metrics_window_s={int(max(args.period_s, args.duration_s / 12))}",
            *(["--max_batch_wait_s=1"] if kafka else []),
            f"--seed={args.seed}", "--streaming", *beam_args])
        if stream:
            # One streaming job over the run's logs, started first: Flink's start-up (~40 s
            # for a MiniCluster) then overlaps the history instead of the run. Tailed
            # folders stop once the simulator's summary exists, which it writes after its
            # last actions and serving's last feature log file have landed; topics end with
            # the end marks the loop writes then.
            ends = ([f"--done_file={out}/join.done"] if kafka else
                    [f"--stop_when_exists={out}/sim_summary.json"])
            procs.start("join", [
                py, "-m", "dataflow.loop", "stream-join", f"--features={features}",
                f"--actions={actions}", f"--examples={examples}",
                f"--config={args.config}", f"--join_window_s={args.join_window_s}",
                f"--period_s={int(args.period_s)}",
                f"--negative_sample_rate={args.negative_sample_rate}", *ends,
                f"--stop_after_s={(expected_wall + history_wall) * 3 + 900:.0f}",
                f"--started_file={out}/join.started", f"--dead_letter={out}/join",
                f"--metrics_out={out}/join/metrics.json", *flink_args])
        if args.history_s > 0:
            history, _ = run_history(procs, args, out, store, transport)
        url = start_serving(procs, args, out, store, "serve", features)
        if history is not None:
            # the run starts once training has applied the whole history
            history.update(wait_for_training(procs, store, args, last_example_ts,
                                             args.drain_timeout_s))
        if stream:  # the run's first requests are joined as they land
            wait_for_file(f"{out}/join.started", procs, "join", args.serve_start_timeout_s)
        # The simulator starts its clock once serving answers.
        procs.start("simulate", simulate_argv(
            args, url, actions, args.speed, args.rps, clock_from_s=0.0,
            clock_to_s=args.duration_s, stats=f"{out}/sim_stats.csv",
            summary=f"{out}/sim_summary.json"))
        wait_for_file(f"{out}/serve.url", procs, "serve", args.serve_start_timeout_s)
        sim_started = time.monotonic()
        joiner = None if stream else PeriodJoin(
            features, actions, examples, f"{out}/join", args.config, args.period_s,
            args.join_window_s, args.negative_sample_rate)
        from ps.store import open_store
        store_handle = open_store(store, num_shards=args.num_shards)
        sim = next(p for n, p, _ in procs.children if n == "simulate")
        last_print = 0.0
        while sim.poll() is None:
            procs.check("serve", "train", "redis", "join")
            if joiner is not None:
                joiner.run_once()
            trained.append((time.monotonic() - sim_started,
                            _trained_examples(store_handle, args.batch_size)))
            if time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                print(f"loop: {time.monotonic() - started:.0f} s, "
                      f"{examples_count():,} examples joined, "
                      f"~{trained[-1][1]:,} trained", flush=True)
            time.sleep(0.25)
        if sim.returncode != 0:
            raise RuntimeError(f"simulate exited with {sim.returncode}; see "
                               f"{out}/logs/simulate.log")
        if stream:
            if kafka:  # serving and the simulator are done (flushed): the join's input ends
                transport.end_logs()
            # every window closes once its sources are done
            join_proc = next(p for n, p, _ in procs.children if n == "join")
            try:
                join_proc.wait(timeout=expected_wall + 300)
            except subprocess.TimeoutExpired:
                raise RuntimeError("the streaming join did not finish") from None
            procs.check("join")
        else:  # the simulator wrote every action and closed the feature log: join the rest
            joiner.run_once(final=True)
            join_runs += joiner.runs
        wait_for_training(procs, store, args, last_example_ts, args.drain_timeout_s,
                          progress=lambda: trained.append((
                              time.monotonic() - sim_started,
                              _trained_examples(store_handle, args.batch_size))))
        store_handle.close()
        joined = examples_count() - (history or {}).get("examples", 0)
        wall = time.monotonic() - started
        result = report(out, args, features, actions, joined, join_runs, trained, wall,
                        history)
    finally:
        procs.stop_all()
        if transport is not None:
            transport.stop()
    result["pids"] = procs.pids
    return result


def start_serving(procs: Processes, args, out: str, store: str, name: str,
                  feature_log: str) -> str:
    """Starts ``dataflow.serve`` as child ``name`` on a free port.

    Args:
        procs: the loop's children.
        args: the loop's command line.
        out: the loop's folder (``OUT/models`` is served; the port file is ``OUT/NAME.url``).
        store: the store's URL.
        name: the child's name.
        feature_log: serving's feature log folder.

    Returns:
        Its URL.
    """
    port = free_port()
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
    """The command line of ``dataflow.simulate`` over ``[clock_from_s, clock_to_s)`` of the
    loop's world.

    Args:
        args: the loop's command line (the world, the candidates, the seed).
        url: serving's URL.
        actions: the action log folder.
        speed: simulated seconds per wall second.
        rps: requests per wall second.
        clock_from_s: the simulated clock's start (negative: history before the run).
        clock_to_s: its end.
        stats: the per-request statistics' CSV file, or None.
        summary: the summary's JSON file.

    Returns:
        The argv.
    """
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


def run_history(procs: Processes, args, out: str, store: str, transport=None) -> tuple:
    """The world's last ``--history_s`` before the run, ``--history_speedup`` times faster:
    served by the initial parameters (every item scores alike: the history's ranking is the
    candidates' popularity order), joined in one go into the folder online training follows
    (or, a backfill of the examples topic, into ``OUT/history/examples`` and from there
    into the topic).

    Args:
        procs: the loop's children (training and the store running).
        args: the loop's command line.
        out: the loop's folder (the history's in ``OUT/history``).
        store: the store's URL.
        transport: the ``KafkaTransport`` of ``--transport kafka``, or None.

    Returns:
        ``(the history's summary, its PeriodJoin)`` (for :func:`wait_for_training`).
    """
    folder = f"{out}/history"
    wall = time.monotonic()
    url = start_serving(procs, args, out, store, "serve-history", f"{folder}/feature_log")
    sim = procs.start("simulate-history", simulate_argv(
        args, url, f"{folder}/action_log", args.speed * args.history_speedup,
        args.rps * args.history_speedup, clock_from_s=-args.history_s, clock_to_s=0.0,
        stats=None, summary=f"{folder}/sim_summary.json"))
    wait_for_file(f"{out}/serve-history.url", procs, "serve-history",
                  args.serve_start_timeout_s)
    while sim.poll() is None:
        procs.check("serve-history", "train", "redis")
        time.sleep(0.25)
    if sim.returncode != 0:
        raise RuntimeError(f"simulate-history exited with {sim.returncode}; see "
                           f"{procs.log_dir}/simulate-history.log")
    procs.stop("serve-history")
    joiner = PeriodJoin(f"{folder}/feature_log", f"{folder}/action_log",
                        f"{folder}/examples" if transport else f"{out}/examples",
                        f"{out}/join/history", args.config, args.period_s,
                        args.join_window_s, args.negative_sample_rate)
    joiner.run_once(final=True)
    if transport is not None:
        transport.produce_examples(example_files(joiner.examples_dir))
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


def wait_for_training(procs: Processes, store: str, args, last_example_ts,
                      timeout_s: float, progress=None) -> dict:
    """Waits until training has applied gradients up to the last example landed (its dense
    PS's event time in the store's sync records).

    Args:
        procs: the loop's children (an error if training exits).
        store: the store's URL.
        args: the loop's command line.
        last_example_ts: returns the event time of the last example landed (None: none).
        timeout_s: how long to wait at most.
        progress: called at each look, or None.

    Returns:
        ``{"caught_up": bool, "wait_s"}``.
    """
    from ps.store import open_store
    handle = open_store(store, num_shards=args.num_shards)
    started = time.monotonic()
    last = last_example_ts()
    try:
        while True:
            procs.check("train")
            if progress:
                progress()
            if last is None or handle.sync_info().get("dense", {}).get("ts_ms", -1) >= last:
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


def _last_example_ts(folder: str):
    """The event time of the last example in an example-log folder (None: no file yet)."""
    files = example_files(folder)
    if not files:
        return None
    return max((r["ts_ms"] for r in read_avro(files[-1])), default=None)


def main(argv=None) -> int:
    """``python -m dataflow.loop``: runs the loop and prints its report (see the module
    docstring); ``python -m dataflow.loop stream-join ...``: the streaming join job
    (``dataflow.closed_loop.stream_join``) that ``--join stream`` starts.

    Args:
        argv: the flags (None: ``sys.argv[1:]``).

    Returns:
        The exit status (2: the loop failed; it says why).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "stream-join":
        from dataflow.closed_loop import stream_join  # Beam: only the subcommand needs it
        return stream_join.main(argv[1:])
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
    sys.exit(main())
