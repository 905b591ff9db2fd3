"""Collisionless vs. hashed embeddings (the paper's Table 1 and Fig. 7).

The same DeepFM, the same pipeline (``dataflow.train`` backfill), the same example log, once
as it is (collisionless: every id has its own row) and once with the id slots hashed by MD5
into a smaller space (``transforms.hashing.hash_fids``: ``slot << 48 | MD5(fid) mod M``,
applied to the example log before training), ``M`` sized per slot so that the collision
rates are the paper's (users 7.73 %, items 2.86 %); a third variant with a quarter of those
buckets shows the trend. The measured rate of each slot is reported.

Protocol, per data set: the first 80 % of the examples (in time) train, the last 20 % test.
One backfill run reads ``epochs`` copies of [train, test] in a row (each copy moved later
in event time by the stream's span), the test copies with ``sample_weight = 0``: they are
scored with the model as it is after that epoch and learned with a zero gradient, which
changes no weight (Adagrad, rows and dense). So one run yields the test AUC after every
epoch, and its first pass over the training part, scored before learning, is the online
(progressive validation) AUC. Row expiry is switched off (the copies are days apart).
"""
from __future__ import annotations

import math
import shutil
import os

import numpy as np

from benchmarks.experiments import common

#: (name, bucket scale, hash every slot): "hashed" is the paper's Table 1 setup (user and
#: item ids at its rates); the "_all" variants hash every slot, as a hashed-embedding system
#: does (the synthetic config's user x category cross would otherwise carry each user's
#: identity without collisions), each other slot sized for the paper's user rate.
VARIANTS = (("collisionless", None, False), ("hashed", 1.0, False),
            ("hashed_quarter", 0.25, False), ("hashed_all", 1.0, True),
            ("hashed_all_quarter", 0.25, True))
DEFAULT_VARIANTS = ("collisionless", "hashed", "hashed_quarter")
OTHER_SLOT_RATE = 0.0773
BATCH_SIZE = 256  # batch training over epochs: the batch size of the paper's kind of run


def slot_vocabularies(examples: list) -> dict:
    """``{slot id: distinct fids (uint64 array)}`` over the examples."""
    fids = np.fromiter((f for e in examples for f in e["fids"]), dtype=np.int64).view(np.uint64)
    unique = np.unique(fids)
    slots = unique >> np.uint64(48)
    return {int(s): unique[slots == s] for s in np.unique(slots)}


def run_dataset(name: str, args) -> dict:
    from schemas.feature_config import load_feature_config
    from transforms.hashing import (buckets_for_collision_rate, collision_rate,
                                    expected_collision_rate, hash_fids)
    ds = common.dataset(name, args.workdir, args.quick)
    work = os.path.join(args.workdir, "collision", ds.name + ("-quick" if args.quick else ""))
    train_files, test_files = common.split_by_count(ds.files, 0.8)
    examples = common.read_examples(ds.files)
    vocab = slot_vocabularies(examples)
    config = load_feature_config(ds.spec.config)

    # fids name their values one to one: as many distinct user (item) fids as user (item) ids
    raw_ids = {"user_id": len({e["user_id"] for e in examples}),
               "item_id": len({e["item_id"] for e in examples})}
    slots = {}
    for slot_name, slot_id, paper_rate in ds.spec.id_slots:
        source = config.slot_by_id[slot_id].fields
        ids = int(vocab.get(slot_id, np.empty(0)).size)
        if len(source) == 1 and source[0] in raw_ids and raw_ids[source[0]] != ids:
            raise RuntimeError(f"{name}: slot {slot_name} has {ids} distinct fids for "
                               f"{raw_ids[source[0]]} distinct {source[0]}s")
        slots[slot_name] = {"slot": slot_id, "ids": ids, "paper_rate": paper_rate,
                            "buckets": {}, "collision_rate": {}, "expected_rate": {}}
    for s in config.slots:
        if s.name not in slots:
            slots[s.name] = {"slot": s.slot, "ids": int(vocab.get(s.slot, np.empty(0)).size),
                             "buckets": {}, "collision_rate": {}, "expected_rate": {}}

    span_ms = common.period_start_ms(ds.files[-1]) + ds.spec.period_s * 1000 \
        - common.period_start_ms(ds.files[0])
    shift_ms = (math.ceil(span_ms / common.DAY_MS) + 1) * common.DAY_MS
    t0 = common.period_start_ms(ds.files[0])
    test_from = common.period_start_ms(test_files[0]) - t0
    config_path = common.write_config(ds.spec.config, work, "no-expiry",
                                      {"*": {"expiry_seconds": None}})
    out = {"examples": len(examples),
           "train_examples": len(common.read_examples(train_files)),
           "test_examples": len(common.read_examples(test_files)),
           "epochs": args.epochs, "seeds": list(range(args.seeds)), "batch_size": BATCH_SIZE,
           "slots": slots, "variants": {}}
    paper = {slot_id: rate for _, slot_id, rate in ds.spec.id_slots}
    for variant, scale, every_slot in VARIANTS:
        if variant not in args.variants:
            continue
        buckets = {}
        for slot_name, info in slots.items():
            slot_id, ids = info["slot"], info["ids"]
            if scale is None or not ids or (slot_id not in paper and not every_slot):
                continue
            rate = paper.get(slot_id, OTHER_SLOT_RATE)
            m = max(1, round(buckets_for_collision_rate(ids, rate) * scale))
            buckets[slot_id] = m
            info["buckets"][variant] = m
            info["collision_rate"][variant] = round(collision_rate(vocab[slot_id], m), 5)
            info["expected_rate"][variant] = round(expected_collision_rate(ids, m), 5)
        for info in slots.values():
            info["collision_rate"].setdefault(variant, 0.0)
        fid_map = (lambda f, b=buckets: hash_fids(f, b)) if buckets else None
        log_dir = os.path.join(work, variant, "log")
        shutil.rmtree(log_dir, ignore_errors=True)
        for k in range(args.epochs):
            common.rewrite_log(train_files, log_dir, k * shift_ms, fid_map=fid_map,
                               tag=f"e{k}train-")
            common.rewrite_log(test_files, log_dir, k * shift_ms, weight=0.0, fid_map=fid_map,
                               tag=f"e{k}test-")
        per_epoch, online, seconds = [[] for _ in range(args.epochs)], [], []
        for seed in range(args.seeds):
            run = common.train("backfill", ds, os.path.join(log_dir, "*.avro"),
                               os.path.join(work, variant, f"seed{seed}"), seed=seed,
                               config=config_path, batch_size=BATCH_SIZE)
            rel = run.ts_ms - t0
            epoch = rel // shift_ms
            is_test = rel - epoch * shift_ms >= test_from
            for k in range(args.epochs):
                per_epoch[k].append(run.auc((epoch == k) & is_test))
            online.append(run.auc((epoch == 0) & ~is_test))
            seconds.append(run.seconds)
            common.LOG.info("collision %s %s seed %d: test AUC per epoch %s, online %.4f",
                             name, variant, seed, [round(a[-1], 4) for a in per_epoch],
                             online[-1])
        out["variants"][variant] = {
            "test_auc_per_epoch": [common.mean_std(a) for a in per_epoch],
            "online_auc": common.mean_std(online),
            "runs": [{"seed": s, "test_auc_per_epoch": [common.rounded(a[s]) for a in per_epoch],
                      "online_auc": common.rounded(online[s]),
                      "seconds": round(seconds[s], 1)} for s in range(args.seeds)]}
    return out


def plot(result: dict, path: str):
    """The experiment's PNG; returns the figure."""
    from matplotlib.figure import Figure

    from transforms.metrics_report import fixed_margins
    datasets = result["datasets"]
    fig = Figure(figsize=(max(8.0, 6.0 * len(datasets)), 4.8))
    axes = fig.subplots(1, len(datasets), squeeze=False)
    for ax, (name, r) in zip(axes[0], datasets.items()):
        for variant, v in r["variants"].items():
            rates = ", ".join(f"{s} {100 * info['collision_rate'][variant]:.2f}%"
                              for s, info in r["slots"].items()
                              if info.get("paper_rate") is not None)
            if sum(variant in info["buckets"] for info in r["slots"].values()) > 2:
                rates += " (every slot hashed)"
            means = [e["mean"] for e in v["test_auc_per_epoch"]]
            stds = [e["std"] for e in v["test_auc_per_epoch"]]
            label = (f"{variant} (online AUC {v['online_auc']['mean']:.4f})" +
                     (f"\ncollisions: {rates}" if variant != "collisionless" else ""))
            ax.errorbar(range(1, len(means) + 1), means, yerr=stds, marker="o", capsize=3,
                        label=label)
        ax.set_title(f"{name}: test AUC after each epoch\n(last 20% of the stream, "
                     f"{r['test_examples']:,} examples; mean ± std of {len(r['seeds'])} seeds)",
                     fontsize=10)
        ax.set_xlabel("epochs over the first 80%")
        ax.set_ylabel("test AUC")
        ax.set_xticks(range(1, r["epochs"] + 1))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Collisionless vs. MD5-hashed embeddings (same DeepFM, same pipeline)")
    fixed_margins(fig, left=0.95, right=0.2, top=0.95, bottom=0.55, wspace=1.05)
    fig.savefig(path, dpi=100)
    return fig


def add_arguments(parser) -> None:
    parser.add_argument("--epochs", type=int, default=None, help="default 3 (quick: 2)")
    parser.add_argument("--seeds", type=int, default=None, help="default 2 (quick: 1)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of " + ",".join(v[0] for v in VARIANTS) +
                             f" (default {','.join(DEFAULT_VARIANTS)}; quick: the first two)")


def run(args) -> dict:
    args.epochs = args.epochs or (2 if args.quick else 3)
    args.seeds = args.seeds or (1 if args.quick else 2)
    variants = args.variants or ",".join(DEFAULT_VARIANTS[:2 if args.quick else None])
    args.variants = [v.strip() for v in variants.split(",") if v.strip()]
    return {"datasets": {name: run_dataset(name, args) for name in args.datasets}}
