"""The same example stream through our pipeline and its peers, side by side in one run.

* **ours**: ``dataflow.train backfill`` over the whole stream (DeepFM, collisionless PS,
  every batch scored before it is learned);
* **river** ``FMClassifier`` and ``LogisticRegression`` (per example, in ``.venv-peers``:
  ``benchmarks.train.river_peer``, the settings of DESIGN §7; ``make peers`` builds it);
* **keras-daily**: a plain Keras DeepFM over ``keras.layers.Hashing`` embeddings, retrained
  once per simulated day (``keras_peer``): the typical batch approach.

All read the same joined example log in the same event-time order and score each example
before learning from it, so their online AUCs compare directly. Throughput: examples per
second of wall time, start-up included for ours (a Beam pipeline), the learning loop only
for the peers; ours also after its first batch (the worker's steady rate).
"""
from __future__ import annotations

import os

from benchmarks.experiments import common


def run_dataset(name: str, args) -> dict:
    from benchmarks.experiments import keras_peer
    from benchmarks.train import PEERS_PYTHON, river_peer
    ds = common.dataset(name, args.workdir, args.quick)
    work = os.path.join(args.workdir, "peers", ds.name + ("-quick" if args.quick else ""))
    ours = common.train("backfill", ds, ds.pattern, os.path.join(work, "ours"))
    steady = ours.distributions.get("worker.examples_per_s_after_first_batch", {})
    peers = {"ours": {"online_auc": common.rounded(ours.auc()), "examples": ours.examples,
                      "examples_per_s": round(ours.examples / ours.seconds, 1),
                      "examples_per_s_after_first_batch": steady.get("max"),
                      "seconds": round(ours.seconds, 1),
                      "settings": f"DeepFM dim 8, batch {ds.spec.batch_size}, rows Adagrad "
                                  f"0.05, dense Adagrad {ds.spec.dense_lr}, collisionless"}}
    common.LOG.info("peers %s ours: AUC %.4f", name, ours.auc())
    for kind, settings in (("fm", "FMClassifier(n_factors=8, SGD(0.05))"),
                           ("lr", "LogisticRegression(SGD(0.1))")):
        key = f"river_{kind}"
        if args.no_river or not os.path.exists(PEERS_PYTHON):
            peers[key] = {"skipped": "--no_river" if args.no_river else
                          f"river is not installed ({PEERS_PYTHON}): run `make peers`"}
            continue
        r = river_peer(ds.pattern, kind)
        peers[key] = {"online_auc": common.rounded(r[f"river_{kind}_auc"]),
                      "examples_per_s": r[f"river_{kind}_examples_per_s"],
                      "settings": settings}
        common.LOG.info("peers %s %s: AUC %.4f", name, key, r[f"river_{kind}_auc"])
    k = keras_peer.run(ds.files, ds.spec.config)
    peers["keras_daily"] = {key: k[key] for key in (
        "online_auc", "examples", "examples_per_s", "days", "num_bins", "collision_rate",
        "seconds")}
    peers["keras_daily"]["settings"] = (f"Keras DeepFM, Hashing({k['num_bins']}) + "
                                        f"Embedding, Adam 1e-3, batch 256, 1 epoch per day, "
                                        f"warm start")
    common.LOG.info("peers %s keras daily: AUC %.4f", name, k["online_auc"])
    ran = {p: v["online_auc"] for p, v in peers.items() if "online_auc" in v}
    return {"examples": ours.examples, "bayes_auc": ds.summary.get("bayes_auc"),
            "peers": peers,
            "ours_at_least_every_peer": all(ran["ours"] >= v for v in ran.values())}


def plot(result: dict, path: str):
    """The experiment's PNG; returns the figure."""
    from matplotlib.figure import Figure

    from transforms.metrics_report import fixed_margins
    datasets = result["datasets"]
    fig = Figure(figsize=(6 * len(datasets), 8))
    axes = fig.subplots(2, len(datasets), squeeze=False)
    for col, (name, r) in enumerate(datasets.items()):
        ran = {p: v for p, v in r["peers"].items() if "online_auc" in v}
        names = list(ran)
        colors = [f"C{i}" for i in range(len(names))]
        ax = axes[0][col]
        aucs = [ran[p]["online_auc"] for p in names]
        ax.bar(range(len(names)), aucs, color=colors)
        for i, a in enumerate(aucs):
            ax.text(i, a + 0.003, f"{a:.4f}", ha="center", fontsize=8)
        if r.get("bayes_auc"):
            ax.axhline(r["bayes_auc"], color="grey", ls="--", lw=1,
                       label=f"Bayes-optimal AUC {r['bayes_auc']:.4f}")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_ylim(0.45, max(aucs + [r.get("bayes_auc") or 0]) + 0.04)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel("online AUC (progressive validation)")
        ax.set_title(f"{name}: {r['examples']:,} examples, same stream and order", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax = axes[1][col]
        rates = [ran[p]["examples_per_s"] for p in names]
        ax.bar(range(len(names)), rates, color=colors)
        for i, v in enumerate(rates):
            ax.text(i, v * 1.1, f"{v:,.0f}", ha="center", fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel("examples per second (log)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Our pipeline vs. river (per example) and a daily-retrained Keras model")
    fixed_margins(fig, left=0.8, right=0.2, top=0.75, bottom=0.45, hspace=0.5, wspace=0.9)
    fig.savefig(path, dpi=100)
    return fig


def add_arguments(parser) -> None:
    parser.add_argument("--no_river", action="store_true",
                        help="leave out the river peers (they need `make peers`)")


def run(args) -> dict:
    return {"datasets": {name: run_dataset(name, args) for name in args.datasets}}
