"""Bounded memory under id churn (issue #7, part 4).

A long synthetic stream whose ids never stop arriving (``dataflow.data`` with
``user_life_days``: users join all the time and leave after a day; items are born all the
time and fade) drives the real ``SparseShard`` DoFn, state and store included, twice, each
in a fresh process:

* ``bounded``: the frequency filter (a user-x-category pair gets a row once seen twice) and
  expiry (a row unseen for a day of event time is evicted), as ``schemas/configs`` sets them;
* ``unbounded``: no threshold, no expiry.

Every few batches the child records the PS table size (rows of both shards) and its own RSS.
The bounded run levels off (asserted upper bounds), the unbounded one keeps growing.

    .venv/bin/python tests/test_bounded_memory.py --plot docs/img/memory_churn.png

runs both, prints the figures as JSON and writes the plot docs/reliability.md shows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# A 20-day stream: 600,000 requests from 150,000 users who each stay a day, over 150,000
# items born along the way; four fids per request (user, item, creator, user x category).
STREAM = dict(users=150_000, items=150_000, requests=600_000, days=20.0, user_life_days=1.0,
              creators=2_000, seed=7)
BATCH = 1024          # requests per gradient batch
DIM, TABLE = 32, "dim32"  # embedding width (Adagrad keeps as many accumulators)
SAMPLE_EVERY = 16     # batches between measurements
DAY_S = 86_400
POLICIES = {
    # user, item, creator: evicted after a day unseen; user x category: a row once seen twice
    "bounded": {"slots": {1: {"expiry_s": DAY_S}, 2: {"expiry_s": DAY_S},
                          10: {"expiry_s": DAY_S}, 21: {"threshold": 2, "expiry_s": DAY_S}},
                "evict_interval_s": 3_600},
    "unbounded": {"slots": {}, "evict_interval_s": 3_600},
}


# ------------------------------------------------------------------ the child process

class _Cell:
    """One state cell of one key, committed at once (a runner with one element a bundle)."""

    def __init__(self, empty=None):
        self.value = empty

    def read(self):
        return list(self.value) if isinstance(self.value, list) else self.value

    def write(self, value):
        self.value = value

    def add(self, value):
        self.value.append(value)

    def clear(self):
        self.value = [] if isinstance(self.value, list) else None


class _Timer:
    def set(self, timestamp):  # evictions and publishes also happen inline, on event time
        pass


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def churn_fids(stream: dict):
    """``(ts_ms, fids [n, 4])`` of the churning stream, one row per request, in time order."""
    from dataflow.data import SynthParams, generate_synthetic
    logs = generate_synthetic(SynthParams(**stream))
    p = logs.params
    category = logs.items["category"][logs.item].astype(np.uint64)
    user, item = logs.user.astype(np.uint64), logs.item.astype(np.uint64)
    creator = logs.items["creator"][logs.item].astype(np.uint64)
    slot = lambda s: np.uint64(s << 48)  # noqa: E731 - the fid's slot bits
    fids = np.stack([slot(1) | user, slot(2) | item, slot(10) | creator,
                     slot(21) | (user * np.uint64(p.categories) + category)], axis=1)
    return logs.ts_ms, fids


def run_child(policy: str, stream: dict = STREAM) -> dict:
    """Feed the stream to a SparseShard with ``policy``; the table size and RSS over time."""
    from apache_beam.transforms.window import GlobalWindow

    from ps.sparse_shard import SparseShard
    from ps.gradients import SparseGradients
    from ps.sharding import shard_of

    ts_ms, fids = churn_fids(stream)
    num_shards, dim = 2, DIM
    conf = POLICIES[policy]
    shard = SparseShard(f"memory://churn-{policy}", num_shards, {TABLE: dim},
                        slots=conf["slots"], evict_interval_s=conf["evict_interval_s"],
                        sync_interval_s=300, compact_every=64, init_scale=0.01,
                        filter_bytes=1 << 20)
    shard.setup()
    state = {s: dict(base=_Cell(), log=_Cell([]), version=_Cell()) for s in range(num_shards)}
    timers = dict(sync_timer=_Timer(), evict_timer=_Timer(), export_timer=_Timer())
    rng = np.random.default_rng(0)
    start_ms = int(ts_ms[0])
    series, started = [], time.perf_counter()
    rss_start = rss_mb()
    batches = (len(ts_ms) + BATCH - 1) // BATCH
    for b in range(batches):
        lo, hi = b * BATCH, min((b + 1) * BATCH, len(ts_ms))
        batch = fids[lo:hi].reshape(-1)
        grads = (0.01 * rng.standard_normal((batch.size, dim))).astype(np.float32)
        owner = shard_of(batch, num_shards)
        for s in range(num_shards):
            mine = owner == s
            shard.process((s, SparseGradients(TABLE, batch[mine], grads[mine],
                                              int(ts_ms[hi - 1]), hi - lo)),
                          **state[s], **timers, window=GlobalWindow())
        if b % SAMPLE_EVERY == SAMPLE_EVERY - 1 or b == batches - 1:
            rows = sum(len(t) for s in range(num_shards)
                       for t in shard._cache[s].tables.values())
            series.append({"requests": hi, "day": (int(ts_ms[hi - 1]) - start_ms) / 86_400_000,
                           "rows": rows, "rss_mb": round(rss_mb(), 1)})
    return {"policy": policy, "series": series, "rss_start_mb": round(rss_start, 1),
            "seconds": round(time.perf_counter() - started, 1),
            "distinct_fids": int(np.unique(fids).size), "requests": int(len(ts_ms))}


# ------------------------------------------------------------------ measuring both

def measure(stream: dict = STREAM) -> dict:
    """Both policies, each in a fresh process (RSS is per process), run side by side."""
    procs = {policy: subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", policy,
         "--stream", json.dumps(stream)], stdout=subprocess.PIPE, text=True)
        for policy in POLICIES}
    out = {}
    for policy, proc in procs.items():
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{policy} child failed"
        out[policy] = json.loads(stdout.strip().splitlines()[-1])
    return out


def summary(runs: dict) -> dict:
    """The figures the doc quotes: table size and RSS at the middle and at the end."""
    out = {}
    for policy, run in runs.items():
        s = run["series"]
        mid, end = s[len(s) // 2], s[-1]
        first_half, second_half = s[:len(s) // 2], s[len(s) // 2:]
        out[policy] = {"rows_mid": mid["rows"], "rows_end": end["rows"],
                       "rows_max_first_half": max(p["rows"] for p in first_half),
                       "rows_max_second_half": max(p["rows"] for p in second_half),
                       "rss_mb_start": run["rss_start_mb"], "rss_mb_mid": mid["rss_mb"],
                       "rss_mb_end": end["rss_mb"],
                       "rss_mb_max_second_half": max(p["rss_mb"] for p in second_half),
                       "seconds": run["seconds"]}
    out["stream"] = {"requests": runs["bounded"]["requests"],
                     "distinct_fids": runs["bounded"]["distinct_fids"],
                     "days": STREAM["days"], "user_life_days": STREAM["user_life_days"]}
    return out


def plot(runs: dict, path: str):
    from matplotlib.figure import Figure

    from transforms.metrics_report import fixed_margins
    fig = Figure(figsize=(11, 4.2))
    rows_ax, rss_ax = fig.subplots(1, 2)
    for policy, color in (("unbounded", "tab:red"), ("bounded", "tab:blue")):
        s = runs[policy]["series"]
        day = [p["day"] for p in s]
        label = ("no filter, no expiry" if policy == "unbounded"
                 else "filter (pairs seen twice) + expiry (1 day)")
        rows_ax.plot(day, [p["rows"] / 1e3 for p in s], color=color, label=label)
        rss_ax.plot(day, [p["rss_mb"] for p in s], color=color, label=label)
    rows_ax.set(xlabel="event time (days)", ylabel="PS rows, both shards (thousands)",
                title="PS table size under id churn")
    rss_ax.set(xlabel="event time (days)", ylabel="process RSS (MiB)",
               title="Process memory (table, Beam state, store)")
    for ax in (rows_ax, rss_ax):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    rows_ax.legend(loc="upper left", fontsize=8)
    fixed_margins(fig, left=0.7, right=0.2, top=0.4, bottom=0.6, wspace=0.9)
    fig.savefig(path, dpi=110)
    return fig


# ------------------------------------------------------------------ the test

@pytest.mark.slow
def test_filter_and_expiry_bound_table_and_memory_and_without_them_both_grow(tmp_path):
    runs = measure()
    figures = summary(runs)
    print("\nbounded memory:", json.dumps(figures, sort_keys=True))
    plot(runs, str(tmp_path / "memory_churn.png"))
    assert (tmp_path / "memory_churn.png").stat().st_size > 20_000
    bounded, unbounded = figures["bounded"], figures["unbounded"]

    # Without filter and expiry every id ever seen keeps its row: the table holds all the
    # distinct fids of the stream, and grows as fast in the second half as in the first.
    assert unbounded["rows_end"] == figures["stream"]["distinct_fids"]
    assert unbounded["rows_end"] > 1.7 * unbounded["rows_mid"]
    assert unbounded["rss_mb_end"] - unbounded["rss_mb_mid"] > 50

    # With them the table levels off (the second half never holds 15% more rows than the
    # first half did at its peak; the size follows the daily traffic), a small share of the
    # ids seen, and RSS stops growing.
    assert bounded["rows_max_second_half"] < 1.15 * bounded["rows_max_first_half"]
    assert bounded["rows_end"] < 0.15 * unbounded["rows_end"]
    assert bounded["rss_mb_max_second_half"] - bounded["rss_mb_mid"] < 25
    assert bounded["rss_mb_end"] < unbounded["rss_mb_end"] - 150


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(POLICIES))
    parser.add_argument("--stream", default=json.dumps(STREAM))
    parser.add_argument("--plot", help="write the PNG here")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, json.loads(args.stream))))
    else:
        measured = measure(json.loads(args.stream))
        if args.plot:
            plot(measured, args.plot)
        print(json.dumps(summary(measured), indent=2, sort_keys=True))
