"""The measures of a loop run: online serving AUC over event time next to the Bayes-optimal
AUC of the same served items (:func:`serving_auc_over_time`), how much of their ratio is
click noise (:func:`click_noise`), and the simulator's per-request statistics
(:func:`read_sim_stats`).
"""
from __future__ import annotations

import csv
import os

import numpy as np

from dataflow.serving.feature_log import log_files
from schemas import read_avro

__all__ = ["read_log", "serving_auc_over_time", "click_noise", "read_sim_stats"]


def read_log(folder: str, schema: str = "feature_log") -> list:
    """Every record of a log folder's complete files, in file (event-time) order; or of a
    Kafka topic (``kafka://HOST:PORT/TOPIC``), up to its end offsets now.

    Args:
        folder: a feature or action log folder (``dataflow.serving.feature_log``), or topic.
        schema: the topic's records' schema (``feature_log``, ``action_log``).

    Returns:
        The records.
    """
    if folder.startswith("kafka://"):
        from transforms.kafka_source import parse_kafka_url, read_records
        records, _ = read_records(*parse_kafka_url(folder), schema)
        return sorted(records, key=lambda r: r["ts_ms"])
    return [r for _, path in log_files(folder) for r in read_avro(path)]


def serving_auc_over_time(features_dir: str, actions_dir: str, join_window_s: float,
                          buckets: int = 12, positive_actions=("click", "like", "share")):
    """Online serving AUC per bucket of event time: the scores serving returned against the
    actions that followed within the join window, and the Bayes-optimal AUC (true CTRs) of
    the same served items.

    Args:
        features_dir: serving's feature log folder (or topic, ``kafka://``).
        actions_dir: the action log folder (or topic).
        join_window_s: how long after serving an action counts.
        buckets: how many equal spans of event time.
        positive_actions: the actions that make a served item positive.

    Returns:
        ``(rows, totals)``: per bucket ``{"from_s", "to_s", "served", "positives",
        "serving_auc", "bayes_auc"}``; ``totals`` of ``all``, ``first_quarter`` and
        ``last_quarter``, with their ratio and its click noise (:func:`click_noise`).
        ``([], {})`` if nothing was served.
    """
    from dataflow.data import roc_auc
    served = read_log(features_dir, "feature_log")
    actions = read_log(actions_dir, "action_log")
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

    Args:
        score: the served items' scores.
        ctr: their true click probabilities.
        draws: how many draws of clicks.
        seed: the draws' seed.

    Returns:
        ``(mean, standard deviation)`` of the ratio (NaNs if a CTR is unknown).

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
    """The simulator's per-request statistics (``dataflow.simulate --stats``).

    Args:
        path: its CSV file.

    Returns:
        ``{column: float array}`` (NaN where empty) of the columns the report uses; {} if
        there is no file.
    """
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
