"""Occurrence threshold and expiry vs. table size, memory and online AUC (paper §3.2.2).

The synthetic stream with ID churn (``synthetic-churn``: users stay one day, items are born
and fade all the time) goes once through ``dataflow.train backfill`` per setting: an
occurrence threshold (an id gets a row once seen that many times; the frequency filter
counts it until then) and an expiry (a row unseen for that long in event time is evicted;
eviction runs every event-time hour), both applied to the id slots (those
``synthetic.yaml`` lets expire: user, item, creator, tags, user x category; context slots
such as hour keep theirs).

Reported per setting: rows in the table over event time (counted in the serving store,
which the PS updates after every batch here), the peak, its memory (rows x bytes per PS row
with its Adagrad slots and last-seen time, plus the frequency filters), rows created and
evicted, gradients the filter dropped, and the online (progressive validation) AUC.
"""
from __future__ import annotations

import os

import numpy as np

from benchmarks.experiments import common

ID_SLOTS = ("user", "item", "creator", "tags", "user_x_category")
THRESHOLDS = (0, 2, 5)
EXPIRIES = (None, 86400, 6 * 3600)


def expiry_label(expiry_s) -> str:
    return "never" if expiry_s is None else (
        f"{expiry_s // 86400}d" if expiry_s % 86400 == 0 else f"{expiry_s // 3600}h")


def table_bytes(config_path: str, num_shards: int = 2) -> tuple:
    """(bytes per PS row, bytes of the frequency filters) of the training pipeline's tables."""
    from ps.sparse_shard import SparseShard
    from schemas.feature_config import load_feature_config
    from transforms.model import ModelSpec
    from transforms.train_config import SparseConfig
    config = load_feature_config(config_path)
    spec = ModelSpec.from_feature_config(config, "deepfm")
    shard = SparseShard("memory://unused", num_shards, spec.tables(),
                        slots=SparseConfig.slots_of(config), optimizer="adagrad")
    table = shard.new_table(spec.width)
    filters = table.filter.memory_bytes if table.filter is not None else 0
    return table.payload_bytes_per_entry(), filters * num_shards * len(spec.tables())


def run_dataset(name: str, args) -> dict:
    ds = common.dataset(name, args.workdir, args.quick)
    work = os.path.join(args.workdir, "filter", ds.name + ("-quick" if args.quick else ""))
    t0 = common.period_start_ms(ds.files[0])
    settings = []
    for threshold in args.thresholds:
        for expiry in args.expiries:
            overrides = {s: {"occurrence_threshold": threshold, "expiry_seconds": expiry}
                         for s in ID_SLOTS}
            key = f"threshold{threshold}-expiry{expiry_label(expiry)}"
            config = common.write_config(ds.spec.config, work, key, overrides)
            row_bytes, filter_bytes = table_bytes(config)
            run = common.train("backfill", ds, ds.pattern, os.path.join(work, key),
                               config=config, sample_store=True)
            samples = run.samples
            peak = int(samples[:, 1].max()) if samples.size else 0
            c = run.counters
            settings.append({
                "threshold": threshold, "expiry_s": expiry, "label": key,
                "online_auc": common.rounded(run.auc()),
                "examples": run.examples,
                "rows_final": int(samples[-1, 1]) if samples.size else 0,
                "rows_peak": peak,
                "bytes_per_row": row_bytes, "filter_bytes": filter_bytes,
                "peak_mb": round((peak * row_bytes + filter_bytes) / 2**20, 2),
                "rows_created": int(c.get("ps.rows_created", 0)),
                "rows_evicted": int(c.get("ps.rows_evicted", 0)),
                "gradients_dropped_by_filter": int(c.get("ps.gradients_dropped_by_filter", 0)),
                "seconds": round(run.seconds, 1),
                "rows_over_time": [[round((t - t0) / common.HOUR_MS, 2), int(r)]
                                   for t, r in samples.tolist()],
            })
            common.LOG.info("filter %s %s: AUC %.4f, peak rows %d, final %d (%.0fs)", name,
                             key, run.auc(), peak, settings[-1]["rows_final"], run.seconds)
    return {"examples": settings[0]["examples"] if settings else 0,
            "id_slots": list(ID_SLOTS), "summary": {k: ds.summary.get(k) for k in (
                "records", "positive_rate", "bayes_auc")},
            "params": ds.summary.get("params"), "settings": settings}


def plot(result: dict, path: str):
    """The experiment's PNG; returns the figure."""
    from matplotlib.figure import Figure

    from transforms.metrics_report import fixed_margins
    datasets = result["datasets"]
    fig = Figure(figsize=(13, 4.8 * len(datasets)))
    axes = fig.subplots(len(datasets), 2, squeeze=False)
    styles = ["-", "--", ":", "-."]
    for row, (name, r) in enumerate(datasets.items()):
        ax, scatter = axes[row]
        thresholds = sorted({s["threshold"] for s in r["settings"]})
        expiries = list(dict.fromkeys(s["expiry_s"] for s in r["settings"]))
        for s in r["settings"]:
            series = np.array(s["rows_over_time"], dtype=np.float64).reshape(-1, 2)
            color = f"C{expiries.index(s['expiry_s'])}"
            style = styles[thresholds.index(s["threshold"]) % len(styles)]
            ax.plot(series[:, 0] / 24, series[:, 1], style, color=color,
                    label=f"threshold {s['threshold']}, expiry {expiry_label(s['expiry_s'])}")
            scatter.scatter(s["peak_mb"], s["online_auc"], color=color,
                            marker="osD^"[thresholds.index(s["threshold"]) % 4])
            scatter.annotate(f"t{s['threshold']}/{expiry_label(s['expiry_s'])}",
                             (s["peak_mb"], s["online_auc"]), fontsize=7,
                             xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("event time (days)")
        ax.set_ylabel("rows in the embedding table")
        ax.set_title(f"{name}: table size over time", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        scatter.set_xlabel("peak table memory (MiB: rows x bytes/row + filters)")
        scatter.set_ylabel("online AUC (progressive validation)")
        scatter.set_title(f"{name}: online AUC vs. peak memory "
                          f"(colour: expiry, marker: threshold)", fontsize=10)
        scatter.grid(True, alpha=0.3)
    fig.suptitle("Frequency filter and expiry on a stream with ID churn")
    fixed_margins(fig, left=0.9, right=0.6, top=0.75, bottom=0.55, hspace=0.9, wspace=1.0)
    fig.savefig(path, dpi=100)
    return fig


def _expiry(text: str):
    return None if text.strip().lower() in ("none", "never", "0") else int(text)


def add_arguments(parser) -> None:
    parser.add_argument("--thresholds", default=None,
                        help=f"comma-separated (default {','.join(map(str, THRESHOLDS))}; "
                             "quick: 0,5)")
    parser.add_argument("--expiries", default=None,
                        help="comma-separated seconds or 'never' (default never,86400,21600; "
                             "quick: never,21600)")


def run(args) -> dict:
    args.thresholds = ([int(t) for t in args.thresholds.split(",")] if args.thresholds
                       else ([0, 5] if args.quick else list(THRESHOLDS)))
    args.expiries = ([_expiry(e) for e in args.expiries.split(",")] if args.expiries
                     else ([None, 6 * 3600] if args.quick else list(EXPIRIES)))
    return {"datasets": {name: run_dataset(name, args) for name in args.datasets}}
