"""How close to the Bayes-optimal AUC can any learner get on the benchmark's synthetic stream?

    python -m benchmarks.gap --json                   # the world of benchmarks.train (100k)
    python -m benchmarks.gap --json --workdir W       # + the model's scores of a kept
                                                      #   `benchmarks.train --workdir W` run
    python -m benchmarks.gap --json --requests 400000 --users 2000 --items 2500 --days 1
                                                      # a fixed world, more requests per id

The Bayes AUC scores each request with its true click logit, which holds per-id terms (user,
item and creator biases, each user's drifting taste) that a learner can only estimate from
the few clicks the stream shows of that id. Regenerating the world of ``benchmarks.train``
(same parameters and seed), this reports:

* ``bayes_without``: the AUC of the true logit without each of its terms (what each term is
  worth);
* ``ideal_learners``: idealised online learners that know every term of the true logit except
  some per-id ones, and learn those online with exact-prior Bayesian updates (assumed-density
  filtering of a logistic model: score first, then learn, as the pipeline does). A real model
  must learn *every* term from the clicks, so each of these bounds it from above;
  ``population_terms_only_known`` is the least idealised: it is given no item's own vector
  (it learns each user's taste against the item's category vector);
* with ``--workdir``: the model's online AUC against the Bayes AUC per how often the user and
  the item had been seen before (from the run's ``--scores_out`` files), last quarter; and
  ``term_shares_last_quarter``: how much of each term the model's score carries (least
  squares of its logit on the terms), next to the same for the ideal learner that learns the
  per-id biases and personal taste, so the model's gap to that learner shows up term by term.

The per-example updates are sequential by nature (each score uses all earlier examples), so
they run in a Python loop: this is an analysis, not a hot path (~1 minute).
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import glob
import os
import sys

import numpy as np

from dataflow import cli
from schemas import strict_json


def world_terms(requests: int, seed: int, users: int | None = None, items: int | None = None,
                days: float | None = None):
    """The true logit's terms per request of ``benchmarks.train``'s synthetic stream (its
    world scaled with ``requests``, unless ``users``/``items``/``days`` fix it)."""
    from benchmarks.train import world_size
    from dataflow.data import (DAY_MS, HOUR_MS, SynthParams, draw_world,
                               generate_synthetic)
    p = SynthParams(requests=requests, seed=seed, **world_size(requests, users, items, days))
    logs = generate_synthetic(p)
    world = draw_world(p, np.random.default_rng(p.seed))  # generate_synthetic's first draws
    ts_rel = logs.ts_ms - p.start_ms
    user, item = logs.user, logs.item
    hour = (ts_rel // HOUR_MS + p.start_ms // HOUR_MS) % 24
    turn = p.drift * ts_rel / DAY_MS
    demo = world.age_vec[world.age_group[user]] + world.gender_vec[world.gender[user]]
    personal = (np.cos(turn)[:, None] * world.taste_from[user]
                + np.sin(turn)[:, None] * world.taste_to[user])
    age_h = (ts_rel - world.birth_ms[item]) / HOUR_MS
    terms = {
        "user_bias": world.user_bias[user],
        "item_bias": world.item_bias[item],
        "creator_bias": world.creator_bias[world.creator_of[item]],
        "context": (world.hour_effect[hour] + world.device_effect[logs.device]
                    + world.network_effect[logs.network]),
        "gender_x_category": world.gender_category[world.gender[user], world.category[item]],
        "freshness_and_duration": (-0.3 * np.log1p(age_h / 24)
                                   - 0.15 * np.log(world.duration_s[item] / 30.0)),
        # item_vec = its category's vector + the item's own part (dataflow.data.draw_world):
        # the first is a population effect (age group and gender x category), the second
        # must be learned per item
        "demographic_taste_x_category": np.einsum(
            "ij,ij->i", demo, world.category_vec[world.category[item]]),
        "demographic_taste_x_item_own": np.einsum(
            "ij,ij->i", demo, world.item_vec[item] - world.category_vec[world.category[item]]),
        "personal_taste_x_item": np.einsum("ij,ij->i", personal, world.item_vec[item]),
    }
    logit = np.log(logs.true_ctr / (1 - logs.true_ctr))
    ids = {"user_bias": user, "item_bias": item, "creator_bias": world.creator_of[item]}
    priors = {"user_bias": 0.3, "item_bias": 0.3, "creator_bias": 0.4, "personal_taste": 0.25}
    return logs, world, terms, logit, ids, priors


def ideal_learner(y, logit, terms, ids, priors, unknown, taste=None):
    """Scores of a learner that knows ``logit`` except the ``unknown`` bias terms (and, with
    ``taste = (user, item vectors)``, the personal taste term), learned online by ADF."""
    offset = logit - sum(terms[k] for k in unknown)
    mean = {k: np.zeros(ids[k].max() + 1) for k in unknown}
    var = {k: np.full(ids[k].max() + 1, priors[k] ** 2) for k in unknown}
    if taste is not None:
        offset = offset - terms["personal_taste_x_item"]
        users, vectors = taste
        dim = vectors.shape[1]
        w = np.zeros((users.max() + 1, dim))
        cov = np.tile(np.eye(dim) * priors["personal_taste"] ** 2, (users.max() + 1, 1, 1))
    scores = np.empty(len(y))
    for t in range(len(y)):
        z = offset[t] + sum(mean[k][ids[k][t]] for k in unknown)
        v = sum(var[k][ids[k][t]] for k in unknown)
        if taste is not None:
            u, x = users[t], vectors[t]
            cx = cov[u] @ x
            z += w[u] @ x
            v += x @ cx
        scores[t] = z / np.sqrt(1 + np.pi * v / 8)  # the predictive mean's logit (probit approx.)
        p = 1 / (1 + np.exp(-z))
        g, h = y[t] - p, p * (1 - p)
        for k in unknown:
            j = ids[k][t]
            var[k][j] = 1 / (1 / var[k][j] + h)
            mean[k][j] += var[k][j] * g
        if taste is not None:
            cov[u] -= np.outer(cx, cx) * (h / (1 + h * (x @ cx)))
            w[u] += cov[u] @ x * g
    return scores


def seen_before(ids: np.ndarray) -> np.ndarray:
    """For each position, how many earlier positions hold the same id (vectorised)."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.r_[0, np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1]
    run_start = np.repeat(starts, np.diff(np.r_[starts, len(ids)]))
    out = np.empty(len(ids), np.int64)
    out[order] = np.arange(len(ids)) - run_start
    return out


def term_shares(score_logit: np.ndarray, terms: dict, mask: np.ndarray) -> dict:
    """How much of each true-logit term a score carries: the least-squares coefficients of
    ``score_logit`` on the terms (plus an intercept) over ``mask``, and the share of the
    score's variance they explain (``r2``). 1 is the term in full; a learner's per-id
    estimates are shrunk, so even an ideal one stays below 1 for per-id terms.

    >>> rng = np.random.default_rng(0)
    >>> terms = {"a": rng.normal(size=1000), "b": rng.normal(size=1000)}
    >>> shares = term_shares(0.5 * terms["a"] + terms["b"], terms, np.ones(1000, bool))
    >>> {k: round(v, 2) for k, v in shares.items()}
    {'a': 0.5, 'b': 1.0, 'r2': 1.0}
    """
    x = np.column_stack([terms[k][mask] for k in terms] + [np.ones(int(mask.sum()))])
    z = score_logit[mask]
    beta, *_ = np.linalg.lstsq(x, z, rcond=None)
    residual = z - x @ beta
    out = {k: float(b) for k, b in zip(terms, beta)}
    out["r2"] = float(1 - residual.var() / z.var())
    return out


def model_scores(workdir: str):
    """The kept run's scores (``read_scores``), in the example log's order, and each
    example's position in the generated stream (from its request id ``s<seed>-<k>``)."""
    from transforms.example_log import read_examples_in_order
    from transforms.scores import read_scores
    runs = sorted(glob.glob(os.path.join(workdir, "scores-*")), key=os.path.getmtime)
    if not runs:
        raise SystemExit(f"no scores-* folder in {workdir}: run benchmarks.train --workdir first")
    s = read_scores(runs[-1])
    examples = list(read_examples_in_order(os.path.join(workdir, "joined", "examples")))
    labels = np.array([e["label"] for e in examples], np.float32)
    if len(labels) != len(s["labels"]) or not (labels == s["labels"]).all():
        raise SystemExit("the scores are not in the example log's order")
    s["run"] = runs[-1]
    s["position"] = np.array([int(e["request_id"].rsplit("-", 1)[1]) for e in examples])
    return s


def model_by_exposure(s: dict, users: np.ndarray, items: np.ndarray) -> dict:
    """The kept run's online vs Bayes AUC, last quarter, by earlier sightings of user/item."""
    from transforms.metrics_math import auc
    labels = s["labels"]
    n = len(labels)
    last = np.arange(n) >= 3 * n // 4
    out = {"scores": s["run"]}
    for name, ids in (("user", users), ("item", items)):
        before = seen_before(ids)
        rows = []
        for lo, hi in ((0, 5), (5, 20), (20, 50), (50, 200), (200, None)):
            m = last & (before >= lo) & ((before < hi) if hi else True)
            if m.sum() >= 200:
                rows.append({"seen_before": f"[{lo}, {hi or 'inf'})", "examples": int(m.sum()),
                             "online_auc": auc(s["scores"][m], labels[m], s["weights"][m]),
                             "bayes_auc": auc(s["true_ctr"][m], labels[m], s["weights"][m])})
        out[f"last_quarter_by_{name}_exposure"] = rows
    return out


def main(argv=None) -> dict:
    parser = cli.argument_parser(prog="python -m benchmarks.gap", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--users", type=int, default=None,
                        help="fix the world instead of scaling it with --requests as "
                             "benchmarks.train does (default: max(1000, requests / 50))")
    parser.add_argument("--items", type=int, default=None,
                        help="default: max(1000, requests / 40)")
    parser.add_argument("--days", type=float, default=None,
                        help="default: max(1, requests / 100000)")
    parser.add_argument("--workdir", default=None,
                        help="a kept benchmarks.train --workdir of the same --requests/--seed")
    args = parser.parse_args(argv)
    from transforms.metrics_math import auc
    logs, world, terms, logit, ids, priors = world_terms(args.requests, args.seed, args.users,
                                                       args.items, args.days)
    y = logs.click.astype(np.float64)
    last = slice(3 * len(y) // 4, None)
    result = {"requests": args.requests, "seed": args.seed, "clicks": int(y.sum()),
              "bayes_auc": auc(logit, y), "bayes_auc_last_quarter": auc(logit[last], y[last]),
              "bayes_without": {k: auc(logit - v, y) for k, v in terms.items()},
              "term_sd": {k: round(float(v.std()), 3) for k, v in terms.items()}}
    impressions = np.bincount(logs.item)
    result["item_impressions_median"] = float(np.median(impressions[impressions > 0]))
    result["item_clicks_mean"] = float(np.bincount(logs.item, weights=y).sum()
                                       / (impressions > 0).sum())
    result["user_impressions_median"] = float(np.median(np.bincount(logs.user)[
        np.bincount(logs.user) > 0]))
    learners = {}
    for unknown in (["item_bias"], ["item_bias", "creator_bias"],
                    ["user_bias", "item_bias", "creator_bias"]):
        scores = ideal_learner(y, logit, terms, ids, priors, unknown)
        learners["+".join(unknown)] = {"auc": auc(scores, y),
                                       "auc_last_quarter": auc(scores[last], y[last])}
    scores = ideal_learner(y, logit, terms, ids, priors,
                           ["user_bias", "item_bias", "creator_bias"],
                           taste=(logs.user, world.item_vec[logs.item]))
    learners["user_bias+item_bias+creator_bias+personal_taste"] = {
        "auc": auc(scores, y), "auc_last_quarter": auc(scores[last], y[last])}
    # A fairer bound: it knows the population-level terms (the category vectors included)
    # but no item's own vector, so it learns each user's taste against the item's category
    # vector, and the item's own part is left to what its bias can absorb.
    category_vectors = world.category_vec[world.category[logs.item]]
    population_only = ideal_learner(y, logit - terms["demographic_taste_x_item_own"], terms,
                                    ids, priors, ["user_bias", "item_bias", "creator_bias"],
                                    taste=(logs.user, category_vectors))
    learners["population_terms_only_known"] = {
        "auc": auc(population_only, y), "auc_last_quarter": auc(population_only[last], y[last])}
    result["ideal_learners"] = learners
    if args.workdir:
        s = model_scores(args.workdir)
        at = s["position"]
        result["model"] = model_by_exposure(s, logs.user[at], logs.item[at])
        # What share of each term the model's score carries over the last quarter, next to
        # the ideal learner that learns the per-id biases and personal taste (and is given
        # the rest): where the model's gap to it is.
        p = np.clip(s["scores"].astype(np.float64), 1e-7, 1 - 1e-7)
        n = len(at)
        tail = np.arange(n) >= 3 * n // 4
        result["term_shares_last_quarter"] = {
            "model": term_shares(np.log(p / (1 - p)), {k: v[at] for k, v in terms.items()},
                                 tail),
            "ideal_learner_taste_unknown": term_shares(
                scores[at], {k: v[at] for k, v in terms.items()}, tail)}
    print(strict_json.dumps(result) if args.json else strict_json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
