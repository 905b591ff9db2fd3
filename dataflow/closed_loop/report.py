"""The report of a loop run: ``OUT/report.json``, ``OUT/auc_over_time.csv`` and the plot
``OUT/loop.png`` (serving AUC, parameter age, throughput).
"""
from __future__ import annotations

import csv
import glob
import json
import os
from typing import Optional

import numpy as np

from dataflow.closed_loop.evaluation import read_sim_stats, serving_auc_over_time
from schemas import strict_json

__all__ = ["report", "plot"]


def report(out: str, args, features: str, actions: str, examples_joined: int,
           join_runs: list, trained: list, wall: float, history: Optional[dict] = None) -> dict:
    """Writes a run's report, its AUC table and its plot into ``out``.

    Args:
        out: the loop's folder (its logs, the simulator's statistics and summary).
        args: the loop's command line.
        features: the run's feature log (a folder, or ``kafka://`` topic).
        actions: the run's action log (a folder, or topic).
        examples_joined: how many examples the run's join gave.
        join_runs: the run's join pipelines (``PeriodJoin.runs``; none for a streaming join).
        trained: ``[(wall seconds since the simulator started, examples trained)]``.
        wall: the run's wall seconds.
        history: the warm-up's summary, or None (cold start).

    Returns:
        The report (``OUT/report.json``): ``auc``, ``auc_over_time``, ``staleness``,
        ``throughput``, ``simulator``, ``history``, ``models_kept``,
        ``model_versions_served``, ``settings``.
    """
    rows, totals = serving_auc_over_time(features, actions, args.join_window_s,
                                         args.report_buckets)
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
    result = {
        "auc": totals, "auc_over_time": rows, "staleness": staleness,
        "throughput": {
            "wall_s": round(wall, 1),
            "requests_per_s": sim_summary.get("requests_per_s"),
            "served_items_per_s": round(sim_summary.get("served", 0)
                                        / max(sim_summary.get("wall_s", 1), 1e-9), 1),
            "serving_latency_ms_p50": sim_summary.get("latency_ms_p50"),
            "serving_latency_ms_p99": sim_summary.get("latency_ms_p99"),
            "examples_joined": examples_joined, "join_runs": len(join_runs),
            "join_seconds": round(sum(r["seconds"] for r in join_runs), 1),
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
    title = (f"closed loop ({args.model}, {args.runner}, {args.transport}): last quarter "
             f"serving AUC "
             f"{last.get('serving_auc')} vs Bayes {last.get('bayes_auc')}")
    plot(f"{out}/loop.png", rows, stats, trained, title)
    return result


def _div(x, d):
    return None if x is None else round(x / d, 1)


def plot(path: str, rows: list, stats: dict, trained: list, title: str):
    """The loop's plot: serving AUC, parameter age, throughput.

    Args:
        path: the PNG to write.
        rows: :func:`serving_auc_over_time`'s rows.
        stats: :func:`read_sim_stats`' columns.
        trained: ``[(wall seconds since the simulator started, examples trained)]``.
        title: the first panel's title.

    Returns:
        The matplotlib ``Figure``.
    """
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
