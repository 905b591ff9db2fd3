"""Online vs. batch training at several sync intervals (the paper's Table 2, Algorithm 1).

Per data set and seed:

1. ``dataflow.train backfill`` trains on the first part of the stream (synthetic: the first
   5 of 7 days, as the paper's 5 days of batch training; MovieLens: the first 80 %) and
   exports PS snapshots; its serving store then holds the trained model.
2. For each sync interval T, ``dataflow.train online`` restores those snapshots, starts
   from a copy of that serving store, and reads the rest of the stream:
   ``--sync_interval_s=T --dense_sync_interval_s=T``. The worker scores every batch with
   what serving holds (sparse rows published every T of event time, dense weights
   refreshed every T) before the PS learns from it: Algorithm 1 with shards of length T
   (sync, evaluate on the shard, train on it).
3. The batch baseline is the same online run with a sync interval longer than the stream:
   serving keeps the backfill's model for the whole evaluation (the PS trains, nothing is
   ever published), i.e. every shard is evaluated without training on the ones before.

Reported: AUC over the evaluated part, mean ± std over seeds, per setting.
"""
from __future__ import annotations

import os
import shutil

import numpy as np

from benchmarks.experiments import common

NEVER_S = 10 ** 9  # a sync interval longer than any stream here: serving is never updated
INTERVALS = {"synthetic": (5 * 3600, 3600, 1800),          # the paper's 5 h, 1 h, 30 min
             "synthetic-churn": (5 * 3600, 3600, 1800),
             "movielens": (7 * 86400, 86400, 3600)}       # its stream is 7 months long
WINDOW_H = {"synthetic": 6, "synthetic-churn": 6, "movielens": 24 * 7}
BATCH_DAYS = 5  # synthetic: batch training on the first 5 days (the paper: 5 of 7)


def label(interval_s) -> str:
    if interval_s is None:
        return "batch"
    for unit, s in (("d", 86400), ("h", 3600), ("min", 60)):
        if interval_s % s == 0:
            return f"{interval_s // s}{unit}"
    return f"{interval_s}s"


def window_aucs(run, window_ms: int) -> list:
    """``[(window start ms, AUC, examples)]`` over event-time windows."""
    from transforms.metrics_math import auc
    windows = run.ts_ms // window_ms
    out = []
    for w in np.unique(windows):
        mask = windows == w
        out.append((int(w * window_ms), common.rounded(auc(run.scores[mask], run.labels[mask])),
                    int(mask.sum())))
    return out


def run_dataset(name: str, args) -> dict:
    from schemas.feature_config import load_feature_config
    from transforms.model import ModelSpec
    ds = common.dataset(name, args.workdir, args.quick)
    work = os.path.join(args.workdir, "sync", ds.name + ("-quick" if args.quick else ""))
    if ds.spec.synth is not None:
        at = common.period_start_ms(ds.files[0]) + BATCH_DAYS * common.DAY_MS
        batch_files, online_files = common.split_at(ds.files, at)
    else:
        batch_files, online_files = common.split_by_count(ds.files, 0.8)
    intervals = INTERVALS[name] if not args.quick else INTERVALS[name][::2]
    settings = [None, *intervals]
    batch_glob = common.link_files(batch_files, os.path.join(work, "batch-log"))
    online_dir = os.path.dirname(common.link_files(online_files, os.path.join(work, "online-log")))
    tables = tuple(ModelSpec.from_feature_config(load_feature_config(ds.spec.config),
                                                 "deepfm").tables())
    aucs = {label(s): [] for s in settings}
    curves, backfill_aucs, seconds = {}, [], {label(s): [] for s in settings}
    examples = None
    for seed in range(args.seeds):
        base = f"memory://exp-sync-{name}-{seed}-{os.getpid()}"
        snapshots = os.path.join(work, f"seed{seed}", "snapshots")
        shutil.rmtree(snapshots, ignore_errors=True)
        backfill = common.train("backfill", ds, batch_glob, os.path.join(work, f"seed{seed}",
                                                                        "backfill"),
                                seed=seed, store=base, flags=(f"--export_dir={snapshots}",))
        backfill_aucs.append(backfill.auc())
        for setting in settings:
            store = f"{base}-{label(setting)}"
            common.clone_store(base, store, tables, 2)
            interval = NEVER_S if setting is None else setting
            dense = interval if setting is None or args.dense_sync_s is None \
                else args.dense_sync_s
            run = common.train(
                "online", ds, online_dir, os.path.join(work, f"seed{seed}", label(setting)),
                seed=seed, store=store,
                flags=(f"--restore={snapshots}", "--run_for_s=0.001",
                       f"--sync_interval_s={interval}",
                       f"--dense_sync_interval_s={dense}"),
                metrics_window_s=WINDOW_H[name] * 3600)
            common.drop_store(store)
            examples = run.examples
            aucs[label(setting)].append(run.auc())
            seconds[label(setting)].append(run.seconds)
            if seed == 0:
                curves[label(setting)] = window_aucs(run, WINDOW_H[name] * common.HOUR_MS)
            common.LOG.info("sync %s seed %d %s: AUC %.4f (%d examples, %.0fs)", name, seed,
                             label(setting), aucs[label(setting)][-1], run.examples,
                             run.seconds)
        common.drop_store(base)
    summary = {k: common.mean_std(v) for k, v in aucs.items()}
    batch = summary["batch"]["mean"]
    return {
        "dense_sync_s": args.dense_sync_s,
        "batch_examples": int(sum(len(common.read_examples([f])) for f in batch_files)),
        "online_examples": examples, "seeds": list(range(args.seeds)),
        "sync_intervals_s": list(intervals), "window_hours": WINDOW_H[name],
        "backfill_online_auc": common.mean_std(backfill_aucs),
        "auc": summary,
        "online_minus_batch": {k: common.rounded(v["mean"] - batch)
                               for k, v in summary.items() if k != "batch"},
        "auc_per_seed": {k: [common.rounded(a) for a in v] for k, v in aucs.items()},
        "seconds_per_run": {k: round(float(np.mean(v)), 1) for k, v in seconds.items()},
        "window_auc_seed0": curves,
    }


def plot(result: dict, path: str):
    """The experiment's PNG; returns the figure."""
    import datetime

    from matplotlib.figure import Figure

    from transforms.metrics_report import fixed_margins
    datasets = result["datasets"]
    fig = Figure(figsize=(max(8.5, 6.5 * len(datasets)), 8))  # room for the title
    axes = fig.subplots(2, len(datasets), squeeze=False)
    for col, (name, r) in enumerate(datasets.items()):
        ax = axes[0][col]
        names = list(r["auc"])
        means = [r["auc"][k]["mean"] for k in names]
        stds = [r["auc"][k]["std"] for k in names]
        colors = ["grey"] + [f"C{i}" for i in range(len(names) - 1)]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
        for i, (m, s) in enumerate(zip(means, stds)):
            ax.text(i + 0.1, m + s + 0.0005, f"{m:.4f}", ha="left", fontsize=8)
        lo = min(means) - 3 * max(max(stds), 0.002)
        ax.set_ylim(lo, max(means) + 3 * max(max(stds), 0.002))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(["batch\n(never synced)"] + [f"online\nsync {n}" for n in names[1:]])
        ax.set_ylabel("AUC on the evaluated part")
        ax.set_title(f"{name}: {r['batch_examples']:,} examples batch-trained, "
                     f"{r['online_examples']:,} evaluated\nmean ± std over "
                     f"{len(r['seeds'])} seeds", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax = axes[1][col]
        for i, (k, rows) in enumerate(r["window_auc_seed0"].items()):
            t = [datetime.datetime.fromtimestamp(w / 1000, datetime.timezone.utc)
                 for w, _, _ in rows]
            ax.plot(t, [a for _, a, _ in rows], ".-", color=colors[i],
                    label="batch" if k == "batch" else f"sync {k}")
        ax.set_ylabel(f"AUC per {r['window_hours']} h window (seed 0)")
        ax.set_xlabel("event time (UTC)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        for tick in ax.get_xticklabels():
            tick.set_rotation(25)
            tick.set_horizontalalignment("right")
    fig.suptitle("Online vs. batch training (Algorithm 1: sync, evaluate on the shard, "
                 "train on it)")
    fixed_margins(fig, left=0.8, right=0.2, top=1.0, bottom=0.95, hspace=0.75, wspace=0.9)
    fig.savefig(path, dpi=100)
    return fig


def add_arguments(parser) -> None:
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--dense_sync_s", type=float, default=None,
                        help="online runs: sync the dense weights at this interval instead "
                             "of the sparse one (0: every batch); a diagnostic")


def run(args) -> dict:
    args.seeds = args.seeds or (1 if args.quick else 3)
    return {"datasets": {name: run_dataset(name, args) for name in args.datasets}}
