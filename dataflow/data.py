"""Data sets as Avro logs: a synthetic short-video stream and MovieLens-100K.

Both write what a serving system logs, in event-time order, one file per stretch of time::

    OUT/feature_log/part-20240101-00.avro   FeatureLog (schemas/feature_log.avsc), one per
    OUT/feature_log/part-20240101-01.avro   served (request, item); file = serving hour
    OUT/action_log/part-20240101-00.avro    ActionLog (schemas/action_log.avsc); file = hour
    ...                                     of the action, so late clicks land in later files
    OUT/summary.json                        records, positive rate, Bayes AUC, parameters

Command line (a plain CLI that writes files, not a Beam pipeline)::

    python -m dataflow.data synth --out_dir out/synth [--requests 200000 --seed 0 ...]
    python -m dataflow.data movielens --out_dir out/ml100k
    python -m dataflow.data table --input FILE --label COL --out_dir out/mine  # your own

**synth**: users and items with latent vectors; items are born all the time and their
popularity rises and fades; user activity, item popularity and creators are Zipf-tailed;
each user's interests drift; clicks arrive seconds to minutes after serving, likes after
clicks. The true click probability is logged with every request (``true_ctr``), so the
Bayes-optimal AUC, the ceiling of any model, is known and printed. The click logit is::

    b0 + user_bias + item_bias + creator_bias + hour + device + network
       + gender x category + freshness(item age) + duration
       + <age_vec + gender_vec + drifting personal taste, category_vec + item_vec>

Every term is a function of fields the FeatureLog carries (``schemas/configs/synthetic.yaml``
maps them to slots), so a factorisation model over those slots can approach the Bayes AUC;
the drift makes a model that stops learning fall behind. Everything is drawn with NumPy in
bulk from one seed: the same flags give the same files.

**movielens**: MovieLens-100K from the ``recbole==1.2.1`` wheel (downloaded once with
``pip download --no-deps`` into ``.cache/data/``; recbole is never installed). Every rating
is a served request in time order; a rating >= 4 is a "click" 1 to 60 seconds later
(55.375% of the 100,000 ratings).
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import argparse
import dataclasses
import datetime as dt
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from dataflow import cli
from dataflow.log_files import HOUR_MS, write_actions, write_logs
from schemas import strict_json

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_CACHE = REPO_ROOT / ".cache" / "data"
RECBOLE = "recbole==1.2.1"
RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
ML100K = "recbole/dataset_example/ml-100k/ml-100k"
DAY_MS = 24 * HOUR_MS

__all__ = ["SynthParams", "SyntheticLogs", "SyntheticWorld", "draw_world", "draw_tags",
           "generate_synthetic", "write_synthetic", "synth",
           "MovieLensLogs", "load_movielens", "write_movielens", "movielens",
           "movielens_wheel", "roc_auc", "main"]


# --------------------------------------------------------------------------- metrics

def roc_auc(scores, labels) -> float:
    """Area under the ROC curve; tied scores count one half (the Mann-Whitney statistic).

    Args:
        scores: the scores.
        labels: the labels (truthy: positive).

    Returns:
        The AUC; NaN without both classes.

    >>> roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> roc_auc([0.5, 0.5], [0, 1])
    0.5
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    # the rank-sum form of Mann-Whitney U
    rank_sum = average_ranks(scores)[labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def average_ranks(values) -> np.ndarray:
    """1-based ranks of ``values``; tied values share their mean rank.

    >>> average_ranks([0.3, 0.1, 0.3, 0.2]).tolist()
    [3.5, 1.0, 3.5, 2.0]
    """
    _, inverse, counts = np.unique(np.asarray(values, np.float64), return_inverse=True,
                                   return_counts=True)
    return (np.cumsum(counts) - counts + 1 + (counts - 1) / 2.0)[inverse]


# --------------------------------------------------------------------------- writing

def _write_summary(out_dir: Path, summary: dict) -> None:
    with open(out_dir / "summary.json", "w", encoding="utf-8") as f:
        strict_json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- synthetic

@dataclasses.dataclass(frozen=True)
class SynthParams:
    """The synthetic stream's parameters (``python -m dataflow.data synth`` flags).

    Args:
        users, items: how many (items over the whole run, the initial catalogue included).
        requests: served requests.
        days: the stream's length.
        seed: the random seed: same parameters, same files.
        dim: latent dimension of tastes and items.
        ctr: target mean click probability.
        drift: radians per day each user's taste turns (0: stationary).
        categories, creators: how many.
        start: the UTC day the stream starts, ``YYYY-MM-DD``.
        file_hours: hours of event time per Avro file.
        user_life_days: ID churn: days each user is active (0: for ever).

    Raises:
        ValueError: a value out of range, named by its flag.

    >>> SynthParams(requests=1000, start="2024-01-02").start_ms
    1704153600000
    >>> SynthParams(ctr=1.5)
    Traceback (most recent call last):
    ...
    ValueError: --ctr must be in (0, 1), got 1.5
    """

    users: int = 10_000
    items: int = 10_000           # every item of the run, the initial catalogue included
    requests: int = 200_000
    days: float = 2.0
    seed: int = 0
    dim: int = 8                  # latent dimension of tastes and items
    ctr: float = 0.08             # target mean click probability (b0 is solved for it)
    drift: float = 0.6            # radians per day that each user's personal taste turns
    categories: int = 30
    creators: int = 2_000
    start: str = "2024-01-01"     # UTC day the stream starts
    file_hours: int = 1
    user_life_days: float = 0.0   # ID churn: each user is active this long (0: for ever)

    def __post_init__(self):
        for name in ("users", "items", "requests", "dim", "categories", "creators",
                     "file_hours"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.days <= 0:
            raise ValueError(f"--days must be positive, got {self.days}")
        if self.user_life_days < 0:
            raise ValueError(f"--user_life_days must be >= 0, got {self.user_life_days}")
        if not 0 < self.ctr < 1:
            raise ValueError(f"--ctr must be in (0, 1), got {self.ctr}")
        try:
            self.start_ms
        except ValueError:
            raise ValueError(f"--start must be a day YYYY-MM-DD, got {self.start!r}") from None

    @property
    def start_ms(self) -> int:
        day = dt.datetime.strptime(self.start, "%Y-%m-%d").replace(tzinfo=dt.timezone.utc)
        return int(day.timestamp()) * 1000


GENDERS = np.array(["f", "m", "u"])
DEVICES = np.array(["android", "ios", "web"])
NETWORKS = np.array(["wifi", "4g", "5g"])
AGE_BOUNDS = np.array([18, 25, 35, 45, 55])      # the age buckets of synthetic.yaml
TAGS_PER_CATEGORY = 6
TRENDING_TAGS = 20


@dataclasses.dataclass
class SyntheticLogs:
    """The generated stream, column by column (row = one served request, in time order), as
    :func:`generate_synthetic` draws it.

    >>> logs = generate_synthetic(SynthParams(users=100, items=100, requests=2000, days=0.5,
    ...                                       creators=10, ctr=0.2))
    >>> len(logs.ts_ms), bool(np.all(np.diff(logs.ts_ms) >= 0))
    (2000, True)
    >>> 0.15 < logs.click.mean() < 0.25, 0.6 < logs.bayes_auc < 1.0
    (True, True)
    """
    params: SynthParams
    ts_ms: np.ndarray             # int64
    user: np.ndarray              # user index
    item: np.ndarray              # item index
    device: np.ndarray            # index into DEVICES
    network: np.ndarray           # index into NETWORKS
    true_ctr: np.ndarray
    served_score: np.ndarray
    click: np.ndarray             # bool
    click_ts_ms: np.ndarray       # valid where click
    like: np.ndarray              # bool (only after a click)
    like_ts_ms: np.ndarray
    users: dict                   # per-user columns: gender, age, region
    items: dict                   # per-item columns: birth_ms, category, creator, tags, duration

    @property
    def bayes_auc(self) -> float:
        """AUC of the true click probability on the drawn clicks: no model can beat it."""
        return roc_auc(self.true_ctr, self.click)


def _zipf_weights(n: int, exponent: float, rng) -> np.ndarray:
    """Zipf weights over n ids in a random order (so id 0 is not always the head)."""
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return rng.permutation(w / w.sum())


def solve_bias(logits: np.ndarray, target: float) -> float:
    """b0 with mean(sigmoid(b0 + logits)) == target (bisection; the mean is monotone in b0)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if (1.0 / (1.0 + np.exp(-(mid + logits)))).mean() < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclasses.dataclass
class SyntheticWorld:
    """The synthetic platform without its requests: users, creators, items and the effects
    that make the true click logit. :func:`generate_synthetic` draws a stream from it in bulk;
    ``dataflow.simulate`` serves it live. Times are ms relative to ``params.start_ms``.

    >>> params = SynthParams(users=100, items=100, creators=10)
    >>> world = draw_world(params, np.random.default_rng(0))
    >>> born = world.item_weights(t_rel_ms=0) > 0      # items that can be served at the start
    >>> 0 < born.sum() <= 100
    True
    >>> one = np.array([0])
    >>> world.logit(ts_rel=one, user=one, item=np.flatnonzero(born)[:1], device=one,
    ...             network=one).shape
    (1,)
    """
    params: SynthParams
    gender: np.ndarray            # per user: index into GENDERS
    age: np.ndarray
    age_group: np.ndarray         # bucket of AGE_BOUNDS
    region: np.ndarray
    main_device: np.ndarray
    activity: np.ndarray          # probability that a request is this user's
    user_bias: np.ndarray
    age_vec: np.ndarray
    gender_vec: np.ndarray
    taste_from: np.ndarray        # personal taste turns from taste_from towards taste_to
    taste_to: np.ndarray
    creator_bias: np.ndarray
    creator_home: np.ndarray
    creator_of: np.ndarray        # per item
    category: np.ndarray
    birth_ms: np.ndarray          # relative to the start (a quarter are born before it)
    peak_h: np.ndarray            # hours after birth at which popularity peaks
    popularity: np.ndarray
    duration_s: np.ndarray
    item_bias: np.ndarray
    category_vec: np.ndarray
    item_vec: np.ndarray
    hour_effect: np.ndarray
    device_effect: np.ndarray
    network_effect: np.ndarray
    gender_category: np.ndarray
    tags: list | None = None      # per item: tag names (:func:`draw_tags`)

    def item_weights(self, t_rel_ms: float) -> np.ndarray:
        """The unnormalised probability of serving each item at a time.

        Args:
            t_rel_ms: ms after ``params.start_ms``.

        Returns:
            Per item: its popularity times its life curve (age/peak * e^(1 - age/peak));
            items not yet born weigh 0.
        """
        age_h = (t_rel_ms - self.birth_ms) / HOUR_MS
        life = np.where(age_h > 0, age_h / self.peak_h * np.exp(1 - age_h / self.peak_h), 0.0)
        weight = self.popularity * life
        if weight.sum() <= 0:  # nothing born yet: the initial catalogue at its first hour
            weight = self.popularity * (self.birth_ms <= t_rel_ms)
        return weight

    def logit(self, ts_rel: np.ndarray, user: np.ndarray, item: np.ndarray,
              device: np.ndarray, network: np.ndarray) -> np.ndarray:
        """The true click logit of requests.

        Args:
            ts_rel: ms after ``params.start_ms``, per request.
            user, item: user and item indices, per request.
            device, network: indices into ``DEVICES`` and ``NETWORKS``, per request.

        Returns:
            The logit of each request, without the global bias ``b0`` (solved per stream
            for the target CTR; see ``solve_bias``).
        """
        p = self.params
        hour = (ts_rel // HOUR_MS + p.start_ms // HOUR_MS) % 24
        turn = p.drift * ts_rel / DAY_MS
        taste = (self.age_vec[self.age_group[user]] + self.gender_vec[self.gender[user]]
                 + np.cos(turn)[:, None] * self.taste_from[user]
                 + np.sin(turn)[:, None] * self.taste_to[user])
        item_age_h = (ts_rel - self.birth_ms[item]) / HOUR_MS
        return (self.user_bias[user] + self.item_bias[item]
                + self.creator_bias[self.creator_of[item]]
                + self.hour_effect[hour] + self.device_effect[device]
                + self.network_effect[network]
                + self.gender_category[self.gender[user], self.category[item]]
                - 0.3 * np.log1p(item_age_h / 24) - 0.15 * np.log(self.duration_s[item] / 30.0)
                + np.einsum("ij,ij->i", taste, self.item_vec[item]))


def draw_world(params: SynthParams, rng: np.random.Generator) -> SyntheticWorld:
    """Users, creators, items and effects, drawn in bulk (tags not included).

    Args:
        params: the :class:`SynthParams`.
        rng: a NumPy ``Generator``.

    Returns:
        The :class:`SyntheticWorld`.
    """
    p = params
    span_ms = int(p.days * DAY_MS)
    sd = lambda s, *shape: rng.normal(0.0, s, size=shape)  # noqa: E731

    # Users: demographics, activity (Zipf), a bias and a taste that turns with time.
    gender = rng.choice(3, size=p.users, p=[0.48, 0.48, 0.04])
    age = np.clip(13 + rng.gamma(2.5, 8.0, size=p.users), 13, 80).astype(np.int64)
    age_group = np.searchsorted(AGE_BOUNDS, age, side="right")
    region = rng.choice(30, size=p.users, p=_zipf_weights(30, 1.0, rng))
    main_device = rng.choice(3, size=p.users, p=[0.55, 0.35, 0.10])
    activity = _zipf_weights(p.users, 0.9, rng)
    user_bias = sd(0.3, p.users)
    age_vec, gender_vec = sd(0.35, len(AGE_BOUNDS) + 1, p.dim), sd(0.35, 3, p.dim)
    taste_from, taste_to = sd(0.25, p.users, p.dim), sd(0.25, p.users, p.dim)

    # Creators have a bias and a home category; items mostly follow their creator's.
    creator_bias = sd(0.4, p.creators)
    creator_home = rng.choice(p.categories, size=p.creators,
                              p=_zipf_weights(p.categories, 0.8, rng))
    creator_of = rng.choice(p.creators, size=p.items, p=_zipf_weights(p.creators, 1.0, rng))
    category = np.where(rng.random(p.items) < 0.8, creator_home[creator_of],
                        rng.integers(0, p.categories, size=p.items))
    # A quarter of the catalogue exists at the start; the rest is born during the run.
    n_initial = max(1, p.items // 4)
    birth_ms = np.concatenate([rng.uniform(-3 * DAY_MS, 0, n_initial),
                               rng.uniform(0, span_ms, p.items - n_initial)]).astype(np.int64)
    peak_h = np.exp(rng.normal(np.log(12.0), 0.7, size=p.items))   # popularity peaks, fades
    popularity = _zipf_weights(p.items, 0.9, rng)
    duration_s = np.round(np.clip(np.exp(rng.normal(np.log(30.0), 0.8, p.items)), 3, 600), 1)
    item_bias = sd(0.3, p.items)
    category_vec = sd(0.4, p.categories, p.dim)
    item_vec = category_vec[category] + sd(0.15, p.items, p.dim)
    hour_effect = 0.25 * np.sin(2 * np.pi * (np.arange(24) - 15) / 24) + sd(0.05, 24)
    device_effect, network_effect = sd(0.2, 3), np.array([0.1, -0.05, 0.0])
    gender_category = sd(0.4, 3, p.categories)
    return SyntheticWorld(
        params=p, gender=gender, age=age, age_group=age_group, region=region,
        main_device=main_device, activity=activity, user_bias=user_bias, age_vec=age_vec,
        gender_vec=gender_vec, taste_from=taste_from, taste_to=taste_to,
        creator_bias=creator_bias, creator_home=creator_home, creator_of=creator_of,
        category=category, birth_ms=birth_ms, peak_h=peak_h, popularity=popularity,
        duration_s=duration_s, item_bias=item_bias, category_vec=category_vec,
        item_vec=item_vec, hour_effect=hour_effect, device_effect=device_effect,
        network_effect=network_effect, gender_category=gender_category)


def draw_tags(world: SyntheticWorld, rng: np.random.Generator) -> list:
    """Draws each item's tags: 1-3 of its category's, maybe a trending one.

    Args:
        world: the :class:`SyntheticWorld`; its ``tags`` are set.
        rng: a NumPy ``Generator``.

    Returns:
        Per item: its tag names.
    """
    p = world.params
    tags = [None] * p.items
    n_tags = rng.integers(1, 4, size=p.items)
    tag_pick = rng.integers(0, TAGS_PER_CATEGORY, size=(p.items, 3))
    trending = rng.random(p.items) < 0.3
    trending_tag = rng.integers(0, TRENDING_TAGS, size=p.items)
    category = world.category
    for i in range(p.items):  # per item, not per request: small
        names = [f"c{category[i]}.t{t}" for t in sorted(set(tag_pick[i, :n_tags[i]]))]
        tags[i] = names + ([f"trend{trending_tag[i]}"] if trending[i] else [])
    world.tags = tags
    return tags


def generate_synthetic(params: SynthParams = SynthParams()) -> SyntheticLogs:
    """Draws the whole stream in bulk (see the module docstring); deterministic in the seed.

    Args:
        params: the :class:`SynthParams`.

    Returns:
        The :class:`SyntheticLogs` (example there).
    """
    p = params
    rng = np.random.default_rng(p.seed)
    n_hours = int(np.ceil(p.days * 24))
    world = draw_world(p, rng)

    # Requests: a diurnal number per hour; in each hour items are drawn by popularity times
    # their life curve at the hour's start, so no item is served before it is born, and
    # users by activity.
    hour_of_day = (np.arange(n_hours) + p.start_ms // HOUR_MS) % 24
    diurnal = 1 + 0.6 * np.sin(2 * np.pi * (hour_of_day - 9) / 24)   # busiest at 15:00
    per_hour = rng.multinomial(p.requests, diurnal / diurnal.sum())
    life_ms = int(p.user_life_days * DAY_MS)
    if life_ms:  # ID churn: users join at uniform times and leave life_ms later
        user_birth = rng.uniform(-life_ms, p.days * DAY_MS, p.users)
    ts_parts, item_parts, user_parts = [], [], []
    for h, count in enumerate(per_hour):
        if not count:
            continue
        weight = world.item_weights(h * HOUR_MS)
        item_parts.append(rng.choice(p.items, size=count, p=weight / weight.sum()))
        ts_parts.append(np.sort(rng.integers(h * HOUR_MS, (h + 1) * HOUR_MS, size=count)))
        if life_ms:  # only the users active at the hour's start
            alive = world.activity * ((user_birth <= h * HOUR_MS)
                                      & (h * HOUR_MS < user_birth + life_ms))
            alive = alive if alive.sum() > 0 else world.activity
            user_parts.append(rng.choice(p.users, size=count, p=alive / alive.sum()))
    ts_rel = np.concatenate(ts_parts)
    item = np.concatenate(item_parts)
    user = (np.concatenate(user_parts) if life_ms
            else rng.choice(p.users, size=p.requests, p=world.activity))
    device = np.where(rng.random(p.requests) < 0.85, world.main_device[user],
                      rng.integers(0, 3, size=p.requests))
    network = rng.choice(3, size=p.requests, p=[0.6, 0.3, 0.1])

    # The true click probability.
    logit = world.logit(ts_rel, user, item, device, network)
    logit += solve_bias(logit, p.ctr)
    true_ctr = 1.0 / (1.0 + np.exp(-logit))
    # What a production model scored: the truth seen through noise (serving AUC < Bayes AUC).
    served_score = 1.0 / (1.0 + np.exp(-(logit + rng.normal(0.0, 0.8, p.requests))))

    # Actions: clicks seconds to minutes after serving; a like after some clicks.
    click = rng.random(p.requests) < true_ctr
    click_delay = np.clip(np.exp(rng.normal(np.log(20_000), 1.2, p.requests)), 1_000, 1_800_000)
    like = click & (rng.random(p.requests) < 1 / (1 + np.exp(-(logit + 1.5))))
    like_delay = np.clip(np.exp(rng.normal(np.log(60_000), 1.0, p.requests)), 1_000, 3_600_000)
    ts_ms = p.start_ms + ts_rel
    click_ts = ts_ms + click_delay.astype(np.int64)
    tags = draw_tags(world, rng)

    return SyntheticLogs(
        params=p, ts_ms=ts_ms, user=user, item=item, device=device, network=network,
        true_ctr=true_ctr, served_score=served_score, click=click, click_ts_ms=click_ts,
        like=like, like_ts_ms=click_ts + like_delay.astype(np.int64),
        users={"gender": world.gender, "age": world.age, "region": world.region},
        items={"birth_ms": world.birth_ms + p.start_ms, "category": world.category,
               "creator": world.creator_of, "tags": tags, "duration_s": world.duration_s})


def write_synthetic(logs: SyntheticLogs, out_dir: str | os.PathLike) -> dict:
    """Writes the FeatureLog and ActionLog files and ``summary.json``.

    Args:
        logs: the :class:`SyntheticLogs`.
        out_dir: the output directory.

    Returns:
        The summary.
    """
    p, out_dir = logs.params, Path(out_dir)
    n = len(logs.ts_ms)
    request_ids = [f"s{p.seed}-{k:09d}" for k in range(n)]
    user_ids = [f"u{u}" for u in range(p.users)]
    item_ids = [f"i{i}" for i in range(p.items)]
    genders = GENDERS[logs.users["gender"]].tolist()
    ages = logs.users["age"].tolist()
    regions = [f"r{r}" for r in logs.users["region"].tolist()]
    categories = [f"c{c}" for c in logs.items["category"].tolist()]
    creators = [f"a{c}" for c in logs.items["creator"].tolist()]
    tags, durations = logs.items["tags"], logs.items["duration_s"].tolist()
    columns = {
        "ts": logs.ts_ms.tolist(), "user": logs.user.tolist(), "item": logs.item.tolist(),
        "device": DEVICES[logs.device].tolist(), "network": NETWORKS[logs.network].tolist(),
        "hour": ((logs.ts_ms // HOUR_MS) % 24).tolist(),
        "item_age": np.round((logs.ts_ms - logs.items["birth_ms"][logs.item]) / HOUR_MS,
                             3).tolist(),
        "served": np.round(logs.served_score, 6).tolist(),
        "ctr": np.round(logs.true_ctr, 6).tolist(),
    }

    def feature_logs(lo, hi):
        c = {k: v[lo:hi] for k, v in columns.items()}
        return [{"request_id": request_ids[k], "ts_ms": ts, "user_id": user_ids[u],
                 "item_id": item_ids[i],
                 "features": {"gender": genders[u], "age": ages[u], "region": regions[u],
                              "device": d, "network": net, "hour": hr,
                              "category": categories[i], "creator": creators[i],
                              "tags": tags[i], "duration_s": durations[i],
                              "item_age_hours": ia},
                 "served_score": s, "true_ctr": ctr}
                for k, ts, u, i, d, net, hr, ia, s, ctr in zip(
                    range(lo, hi), c["ts"], c["user"], c["item"], c["device"], c["network"],
                    c["hour"], c["item_age"], c["served"], c["ctr"])]

    feature_files = write_logs(out_dir / "feature_log", "feature_log", logs.ts_ms,
                               feature_logs, p.file_hours)
    clicked, liked = np.flatnonzero(logs.click), np.flatnonzero(logs.like)
    action_files = write_actions(
        out_dir, request_ids,
        np.concatenate([logs.click_ts_ms[clicked], logs.like_ts_ms[liked]]),
        np.array(["click"] * len(clicked) + ["like"] * len(liked)),
        np.concatenate([clicked, liked]), p.file_hours)
    summary = {
        "dataset": "synthetic", "records": n, "positive_action": "click",
        "positives": int(logs.click.sum()), "positive_rate": round(float(logs.click.mean()), 6),
        "likes": int(logs.like.sum()), "mean_true_ctr": round(float(logs.true_ctr.mean()), 6),
        "bayes_auc": round(logs.bayes_auc, 6),
        "served_score_auc": round(roc_auc(logs.served_score, logs.click), 6),
        "start_ms": int(logs.ts_ms[0]), "end_ms": int(logs.ts_ms[-1]),
        "feature_log_files": len(feature_files), "action_log_files": len(action_files),
        "feature_log_glob": str(out_dir / "feature_log" / "*.avro"),
        "action_log_glob": str(out_dir / "action_log" / "*.avro"),
        "config": "synthetic", "params": dataclasses.asdict(p),
    }
    _write_summary(out_dir, summary)
    return summary


def synth(out_dir: str | os.PathLike, **params) -> dict:
    """Generates and writes a synthetic stream (``python -m dataflow.data synth``).

    Args:
        out_dir: the output directory.
        **params: :class:`SynthParams` fields.

    Returns:
        Its summary (``summary.json``).
    """
    return write_synthetic(generate_synthetic(SynthParams(**params)), out_dir)


# --------------------------------------------------------------------------- MovieLens

def movielens_wheel(cache_dir: str | os.PathLike = DATA_CACHE) -> Path:
    """The recbole wheel that carries MovieLens-100K, downloaded once.

    Args:
        cache_dir: where it is kept.

    Returns:
        Its path.

    Raises:
        RuntimeError: it is not there and cannot be downloaded.
    """
    cache_dir = Path(cache_dir)
    wheel = cache_dir / RECBOLE_WHEEL
    if wheel.is_file():
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Only the wheel file is fetched (--no-deps); recbole is never installed.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--disable-pip-version-check", RECBOLE, "-d", str(cache_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wheel.is_file():
        raise RuntimeError(
            f"could not fetch MovieLens-100K: `{' '.join(cmd)}` failed "
            f"({proc.stderr.strip()[-500:] or 'no output'}). It needs network access to PyPI "
            f"and pip in this interpreter; or put {RECBOLE_WHEEL} (from "
            f"https://pypi.org/project/recbole/1.2.1/#files) into {cache_dir}.")
    return wheel


@dataclasses.dataclass
class MovieLensLogs:
    """MovieLens-100K ratings in time order, column by column (:func:`load_movielens`).

    >>> import tempfile
    >>> logs = MovieLensLogs(ts_ms=np.array([0, 60_000]), user=np.array([1, 2]),
    ...                      item=np.array([7, 7]), rating=np.array([5.0, 2.0]),
    ...                      users={1: (24, "M", "technician", "85711"),
    ...                             2: (53, "F", "other", "94043")},
    ...                      items={7: (1995, ["Drama"])})
    >>> logs.positive.tolist()                 # a rating >= 4 is a click
    [True, False]
    >>> summary = write_movielens(logs, tempfile.mkdtemp())
    >>> summary["records"], summary["positives"]
    (2, 1)
    """
    ts_ms: np.ndarray
    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    users: dict                   # user id -> (age, gender, occupation, zip)
    items: dict                   # item id -> (release year or None, [genres])

    @property
    def positive(self) -> np.ndarray:
        return self.rating >= 4


def _tsv(zf: zipfile.ZipFile, suffix: str) -> list[list[str]]:
    lines = zf.read(f"{ML100K}.{suffix}").decode("utf-8").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def load_movielens(cache_dir: str | os.PathLike = DATA_CACHE) -> MovieLensLogs:
    """Reads ``ml-100k.inter``, ``.user`` and ``.item`` out of the recbole wheel.

    Args:
        cache_dir: where the wheel is kept (:func:`movielens_wheel`).

    Returns:
        The :class:`MovieLensLogs`.
    """
    with zipfile.ZipFile(movielens_wheel(cache_dir)) as zf:
        inter = np.array(_tsv(zf, "inter"), dtype=np.float64)   # user, item, rating, ts
        users = {int(u): (int(age), gender, occupation, zip_code)
                 for u, age, gender, occupation, zip_code in _tsv(zf, "user")}
        items = {}
        for item_id, _title, year, genres in _tsv(zf, "item"):
            items[int(item_id)] = (int(year) if year.isdigit() else None, genres.split())
    order = np.argsort(inter[:, 3], kind="stable")  # time order; ties keep the file's order
    inter = inter[order]
    return MovieLensLogs(ts_ms=inter[:, 3].astype(np.int64) * 1000,
                         user=inter[:, 0].astype(np.int64), item=inter[:, 1].astype(np.int64),
                         rating=inter[:, 2], users=users, items=items)


def write_movielens(logs: MovieLensLogs, out_dir: str | os.PathLike, file_hours: int = 168,
                    seed: int = 0) -> dict:
    """Writes a FeatureLog per rating and a "click" 1-60 s after each rating >= 4.

    Args:
        logs: the :class:`MovieLensLogs` (example there).
        out_dir: the output directory.
        file_hours: hours of event time per Avro file.
        seed: seeds the click delays.

    Returns:
        The summary (``summary.json``).
    """
    out_dir = Path(out_dir)
    n = len(logs.ts_ms)
    request_ids = [f"ml-{k:06d}" for k in range(n)]
    seconds = logs.ts_ms // 1000
    rating_year = seconds.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
    columns = {"ts": logs.ts_ms.tolist(), "user": logs.user.tolist(),
               "item": logs.item.tolist(), "hour": ((seconds // 3600) % 24).tolist(),
               "weekday": ((seconds // 86400 + 3) % 7).tolist(),   # 1970-01-01 was a Thursday
               "year": rating_year.tolist()}
    user_features = {u: {"age": age, "gender": gender, "occupation": occupation,
                         "zip_prefix": zip_code[:3]}
                     for u, (age, gender, occupation, zip_code) in logs.users.items()}

    def feature_logs(lo, hi):
        c = {k: v[lo:hi] for k, v in columns.items()}
        out = []
        for k, ts, u, i, hr, wd, year in zip(range(lo, hi), c["ts"], c["user"], c["item"],
                                             c["hour"], c["weekday"], c["year"]):
            release, genres = logs.items[i]
            features = dict(user_features[u])
            features.update(release_year=release, genres=genres, hour=hr, weekday=wd,
                            movie_age_years=None if release is None
                            else float(max(0, year - release)))
            out.append({"request_id": request_ids[k], "ts_ms": ts, "user_id": str(u),
                        "item_id": str(i), "features": features, "served_score": None,
                        "true_ctr": None})
        return out

    feature_files = write_logs(out_dir / "feature_log", "feature_log", logs.ts_ms,
                               feature_logs, file_hours)
    clicked = np.flatnonzero(logs.positive)
    delay_ms = np.random.default_rng(seed).integers(1_000, 60_001, size=len(clicked))
    action_files = write_actions(out_dir, request_ids, logs.ts_ms[clicked] + delay_ms,
                                  np.array(["click"] * len(clicked)), clicked, file_hours)
    summary = {
        "dataset": "movielens-100k", "records": n, "positive_action": "click",
        "positives": int(len(clicked)), "positive_rate": round(len(clicked) / n, 6),
        "bayes_auc": None, "users": len(np.unique(logs.user)),
        "items": len(np.unique(logs.item)),
        "start_ms": int(logs.ts_ms[0]), "end_ms": int(logs.ts_ms[-1]),
        "feature_log_files": len(feature_files), "action_log_files": len(action_files),
        "feature_log_glob": str(out_dir / "feature_log" / "*.avro"),
        "action_log_glob": str(out_dir / "action_log" / "*.avro"),
        "config": "movielens", "params": {"file_hours": file_hours, "seed": seed},
    }
    _write_summary(out_dir, summary)
    return summary


def movielens(out_dir: str | os.PathLike, cache_dir: str | os.PathLike = DATA_CACHE,
              file_hours: int = 168, seed: int = 0) -> dict:
    """Fetches (once), converts and writes MovieLens-100K
    (``python -m dataflow.data movielens``).

    Args:
        out_dir: the output directory.
        cache_dir, file_hours, seed: as :func:`load_movielens` and :func:`write_movielens`.

    Returns:
        The summary.
    """
    return write_movielens(load_movielens(cache_dir), out_dir, file_hours, seed)


# --------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    parser = cli.argument_parser(
        prog="python -m dataflow.data", description=__doc__)
    sub = parser.add_subparsers(dest="dataset", required=True)
    d = SynthParams()
    s = sub.add_parser("synth", help="synthetic short-video stream with a known Bayes AUC",
                       formatter_class=cli.HelpFormatter)
    cli.add_verbose(s, subcommand=True)
    s.add_argument("--out_dir", "--out", dest="out_dir", required=True,
                   help="directory for feature_log/, action_log/ and summary.json")
    for name, kind, text in [
            ("users", int, "users"), ("items", int, "items over the run (a quarter at start)"),
            ("requests", int, "served requests"), ("days", float, "length of the stream"),
            ("seed", int, "random seed: same seed, same files"),
            ("dim", int, "latent dimension"), ("ctr", float, "target mean true CTR"),
            ("drift", float, "radians per day each user's taste turns (0: stationary)"),
            ("categories", int, "item categories"), ("creators", int, "item creators"),
            ("start", str, "UTC start day YYYY-MM-DD"),
            ("file_hours", int, "hours of event time per Avro file"),
            ("user_life_days", float, "ID churn: days each user stays active, joining at a "
                                      "uniform time (0: users never leave)")]:
        s.add_argument(f"--{name}", type=kind, default=getattr(d, name),
                       help=f"{text} (default {getattr(d, name)})")
    m = sub.add_parser("movielens", help="MovieLens-100K as a time-ordered stream",
                       formatter_class=cli.HelpFormatter)
    cli.add_verbose(m, subcommand=True)
    m.add_argument("--out_dir", "--out", dest="out_dir", required=True,
                   help="directory for feature_log/, action_log/ and summary.json")
    m.add_argument("--cache_dir", default=str(DATA_CACHE),
                   help="where the recbole wheel is kept (default .cache/data)")
    m.add_argument("--file_hours", type=int, default=168,
                   help="hours of event time per Avro file (default a week)")
    m.add_argument("--seed", type=int, default=0, help="seed of the click delays")
    from dataflow import table  # here: only its subcommand needs it (pandas)
    t = sub.add_parser("table", help="your own table (CSV or Parquet) with a label column",
                       description=table.__doc__, formatter_class=cli.HelpFormatter)
    table.add_arguments(t)
    cli.add_verbose(t, subcommand=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dataflow.data``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = vars(_parser().parse_args(argv))
    if args["dataset"] == "table":
        from dataflow import table
        return table.run(args)
    dataset, out_dir = args.pop("dataset"), args.pop("out_dir")
    args.pop("verbose")  # dataflow.cli.setup's
    try:
        summary = synth(out_dir, **args) if dataset == "synth" else movielens(out_dir, **args)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    brief = {k: summary[k] for k in ("dataset", "records", "positive_rate", "bayes_auc",
                                     "feature_log_files", "action_log_files")}
    print(strict_json.dumps(brief))
    print(f"wrote {out_dir}/feature_log, {out_dir}/action_log, {out_dir}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
