"""Traffic simulator: synthetic users ask serving for a ranking and act on what it serves.

    python -m dataflow.simulate --serve http://127.0.0.1:8500 --actions out/loop/action_log \\
        --duration_s 7200 --speed 60 --rps 20 [--users 300 --items 400 --seed 0 ...]

The users and items are ``dataflow.data``'s synthetic world
(:class:`~dataflow.data.SyntheticWorld`: the same latent vectors, biases, life curves and true
click logit as ``python -m dataflow.data synth``). A simulated clock runs ``--speed`` times
faster than the wall clock from ``--start`` for ``--duration_s`` simulated seconds. About
``--rps`` times per wall second a user (drawn by activity) on some device and network gets
``--candidates`` items (drawn by popularity times life curve at that moment) and asks serving
to rank them (``POST /score``, with the request's event time, the user's and items' raw fields
and, for the logs only, each item's true CTR). The user sees the ``--top_k`` items served and
clicks each with its **true** probability (computed here from the world, not from what serving
says), some seconds to minutes later (log-normal delays as in ``dataflow.data``), and likes
some clicked items later still. Actions are written to ``--actions`` as the action log
(``schemas/action_log.avsc``), one Avro file per ``--roll_s`` of event time, in event-time
order, with a ``_watermark.json`` that says up to when the folder is complete; or, given
``kafka://HOST:PORT/TOPIC``, as the messages of that topic, in event-time order, with
watermark marks (``dataflow.serving.kafka_log``).

When the simulated time is up it writes the actions still pending (the last clicks
come after the last request), asks serving to close its feature log (``POST /flush``), and
prints a summary; ``--stats`` gets one CSV line per request (wall time, event time,
latency, parameter ages and model version that serving reported, clicks).
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import argparse
import csv
import heapq
import http.client
import json
import logging
import sys
import threading
import time
import urllib.parse
from typing import Optional

import numpy as np

from dataflow import cli
from dataflow.data import (DEVICES, GENDERS, HOUR_MS, NETWORKS, SynthParams, solve_bias,
                           draw_tags, draw_world, roc_auc)
from schemas import strict_json

_LOG = logging.getLogger(__name__)

MIN_DELAY_MS = 1_000  # the shortest delay of an action after serving (as in dataflow.data)
STATS_FIELDS = ["wall_s", "ts_ms", "latency_ms", "served", "clicks", "model_version",
                "dense_age_ms", "sparse_age_ms", "sparse_wall_age_s", "store", "status"]


class World:
    """The synthetic world (``dataflow.data``'s :class:`~dataflow.data.SyntheticWorld`) with
    its global bias solved for ``ctr`` over the run.

    Args:
        users, items, categories, creators: how many.
        duration_s: the run's simulated seconds.
        seed: the random seed.
        ctr: the target mean click probability.
        start: the UTC day the run starts, ``YYYY-MM-DD``.
        drift: radians per day each user's taste turns.

    >>> world = World(users=50, items=50, duration_s=600, seed=0, ctr=0.1,
    ...               start="2024-01-01", creators=10)
    >>> body, items, ctr, logit = world.request(np.random.default_rng(0), t_rel_ms=0,
    ...                                         candidates=5)
    >>> sorted(body), len(body["candidates"]), bool(((0 < ctr) & (ctr < 1)).all())
    (['candidates', 'context', 'user_id'], 5, True)
    """

    def __init__(self, users: int, items: int, duration_s: float, seed: int, ctr: float,
                 start: str, drift: float = 0.6, categories: int = 30, creators: int = 2000):
        # Items are born over a day at least (a quarter before the start), as in
        # ``dataflow.data``: a short run sees the catalogue change at the world's pace.
        self.params = SynthParams(users=users, items=items, requests=1,
                                  days=max(duration_s, 86400.0) / 86400, seed=seed, ctr=ctr,
                                  start=start, drift=drift, categories=categories,
                                  creators=creators)
        rng = np.random.default_rng(seed)
        self.world = draw_world(self.params, rng)
        draw_tags(self.world, rng)
        self.start_ms = self.params.start_ms
        self.duration_ms = int(duration_s * 1000)
        # b0 for the target mean CTR over requests spread over the run
        sample = 20_000
        t = np.sort(rng.uniform(0, self.duration_ms, sample)).astype(np.int64)
        user = rng.choice(users, size=sample, p=self.world.activity)
        item = np.concatenate([rng.choice(items, size=200, p=self._normalised(tt))
                               for tt in t[::200]])[:sample]
        device = self.world.main_device[user]
        network = rng.choice(3, size=sample, p=[0.6, 0.3, 0.1])
        self.b0 = solve_bias(self.world.logit(t, user, item, device, network), ctr)
        w = self.world
        self.gender_name = GENDERS[w.gender].tolist()
        self.region_name = [f"r{r}" for r in w.region.tolist()]
        self.category_name = [f"c{c}" for c in w.category.tolist()]
        self.creator_name = [f"a{c}" for c in w.creator_of.tolist()]
        self._weights_at = None
        self._weights = None

    def _normalised(self, t_rel_ms: int) -> np.ndarray:
        weight = self.world.item_weights(t_rel_ms)
        return weight / weight.sum()

    def candidates(self, rng, t_rel_ms: int, count: int) -> np.ndarray:
        """Items drawn by popularity x life (the weights are recomputed once per simulated
        minute).

        Args:
            rng: a NumPy ``Generator``.
            t_rel_ms: ms after the start.
            count: how many (at most as many as can be served then).

        Returns:
            Distinct item indices.
        """
        minute = t_rel_ms // 60_000
        if self._weights_at != minute:
            self._weights = self._normalised(minute * 60_000)
            self._weights_at = minute
        p = self._weights
        count = min(count, int(np.count_nonzero(p)))
        return rng.choice(len(p), size=count, replace=False, p=p)

    def true_ctr(self, t_rel_ms: int, user: int, items: np.ndarray, device: int,
                 network: int) -> np.ndarray:
        """The true click probability of each of ``items`` for one user's request at
        ``t_rel_ms`` (ms after the start) on ``device`` and ``network`` (indices)."""
        n = len(items)
        logit = self.b0 + self.world.logit(np.full(n, t_rel_ms, np.int64), np.full(n, user),
                                           items, np.full(n, device), np.full(n, network))
        return 1.0 / (1.0 + np.exp(-logit))

    def request(self, rng, t_rel_ms: int, candidates: int) -> tuple:
        """One user's visit.

        Args:
            rng: a NumPy ``Generator``.
            t_rel_ms: ms after the start.
            candidates: how many items to ask serving to rank.

        Returns:
            ``(request body without ts_ms and top_k, items, true CTRs, logits)``.
        """
        w = self.world
        user = int(rng.choice(len(w.activity), p=w.activity))
        device = int(w.main_device[user] if rng.random() < 0.85 else rng.integers(0, 3))
        network = int(rng.choice(3, p=[0.6, 0.3, 0.1]))
        items = self.candidates(rng, t_rel_ms, candidates)
        ctr = self.true_ctr(t_rel_ms, user, items, device, network)
        ts_ms = self.start_ms + t_rel_ms
        item_age_h = np.round((t_rel_ms - w.birth_ms[items]) / HOUR_MS, 3).tolist()
        body = {
            "user_id": f"u{user}",
            "context": {"gender": self.gender_name[user], "age": int(w.age[user]),
                        "region": self.region_name[user], "device": str(DEVICES[device]),
                        "network": str(NETWORKS[network]),
                        "hour": int((ts_ms // HOUR_MS) % 24)},
            "candidates": [{"item_id": f"i{i}",
                            "features": {"category": self.category_name[i],
                                         "creator": self.creator_name[i], "tags": w.tags[i],
                                         "duration_s": float(w.duration_s[i]),
                                         "item_age_hours": age},
                            "true_ctr": round(float(c), 6)}
                           for i, age, c in zip(items.tolist(), item_age_h, ctr.tolist())],
        }
        logit = np.log(ctr) - np.log1p(-ctr)
        return body, items, ctr, logit


class Simulator:
    """Runs the simulated users against a serving URL (see the module docstring).

    Args:
        serve_url: serving's URL.
        actions_dir: the action log's folder, or ``kafka://HOST:PORT/TOPIC``.
        world: the :class:`World`.
        speed: simulated seconds per wall second.
        rps: requests per wall second.
        candidates: items per request.
        top_k: items served (seen) per request (None: all).
        roll_s: event-time seconds per action log file.
        concurrency: users asking at once.
        seed: the random seed of the users' choices.
        max_delay_s: the longest delay of an action after serving.
        stats_path: a CSV file with one line per request, or None.
        wait_for_serve_s: how long to wait for serving to answer.
        clock_from_s, clock_to_s: the simulated clock's span, seconds after ``start``
            (default: the whole run).

    Raises:
        ValueError: ``speed`` or ``rps`` not positive, or a clock running backwards.

    A minute of simulated users against a real (in-process) service:

    >>> import tempfile
    >>> from dataflow.serving.http_server import Server
    >>> from dataflow.serving.scorer import Scorer
    >>> from schemas.feature_config import FeatureConfig
    >>> from transforms.model import ModelSpec
    >>> config = FeatureConfig.load("synthetic")
    >>> server = Server(Scorer(config, ModelSpec.from_feature_config(config, "lr"),
    ...                        "memory://simulate-doc", num_shards=1)).start()
    >>> world = World(users=50, items=50, duration_s=60, seed=0, ctr=0.1, start="2024-01-01",
    ...               creators=10)
    >>> summary = Simulator(server.url, tempfile.mkdtemp(), world, speed=600, rps=100,
    ...                     candidates=5, top_k=2, roll_s=60).run()
    >>> summary["errors"], summary["requests"] > 0, summary["served"] == 2 * summary["requests"]
    (0, True, True)
    >>> server.stop()
    """

    def __init__(self, serve_url: str, actions_dir: str, world: World, speed: float,
                 rps: float, candidates: int, top_k: Optional[int], roll_s: float,
                 concurrency: int = 2, seed: int = 0, max_delay_s: float = 1800.0,
                 stats_path: Optional[str] = None, wait_for_serve_s: float = 60.0,
                 clock_from_s: float = 0.0, clock_to_s: Optional[float] = None):
        from dataflow.serving.feature_log import open_log
        if speed <= 0 or rps <= 0:
            raise ValueError("--speed and --rps must be positive")
        self.url = urllib.parse.urlsplit(serve_url)
        self.world = world
        self.speed = speed
        self.rps = rps
        self.n_candidates = candidates
        self.top_k = top_k
        self.concurrency = max(1, concurrency)
        self.max_delay_ms = int(max_delay_s * 1000)
        self.wait_for_serve_s = wait_for_serve_s
        # The clock runs over [from, to) of the world's time: the run itself by default, or
        # its history (a negative from, to 0) when the loop warms the model up first.
        self.from_rel_ms = int(clock_from_s * 1000)
        self.to_rel_ms = (world.duration_ms if clock_to_s is None
                          else int(clock_to_s * 1000))
        if self.to_rel_ms <= self.from_rel_ms:
            raise ValueError("the simulated clock must run forwards: --clock_to_s after "
                             "--clock_from_s")
        self.log = open_log(actions_dir, "action_log", roll_s)
        self.rng = np.random.default_rng(seed + 1_000_003)
        self.lock = threading.Lock()
        self.pending: list = []  # heap of (ts_ms, seq, request_id, action)
        self.inflight: dict = {}  # worker -> event time of its request awaiting an answer
        self.seq = 0
        self.stats_file = open(stats_path, "w", newline="", encoding="utf-8") \
            if stats_path else None
        self.stats = csv.writer(self.stats_file) if self.stats_file else None
        if self.stats:
            self.stats.writerow(STATS_FIELDS)
        self.requests = self.errors = self.served = self.clicks = self.likes = 0
        self.latencies: list = []
        self.scores: list = []
        self.true_ctrs: list = []
        self.labels: list = []
        self.wall0 = None

    # -- the clock --------------------------------------------------------------------------

    def sim_rel_ms(self) -> int:
        """The simulated clock: ms after the world's start."""
        return self.from_rel_ms + int((time.monotonic() - self.wall0) * self.speed * 1000)

    # -- actions ----------------------------------------------------------------------------

    def _act(self, ts_ms: int, served: list, ctr_of: dict, logit_of: dict) -> int:
        """Draw the user's actions on the served items; returns the clicks."""
        clicks = 0
        with self.lock:
            rng = self.rng
            for item in served:
                ctr = ctr_of[item["item_id"]]
                clicked = rng.random() < ctr
                self.scores.append(item["score"])
                self.true_ctrs.append(ctr)
                self.labels.append(clicked)
                if not clicked:
                    continue
                clicks += 1
                delay = int(min(max(np.exp(rng.normal(np.log(20_000), 1.2)), MIN_DELAY_MS),
                                self.max_delay_ms))
                click_ts = ts_ms + delay
                self._push(click_ts, item["request_id"], "click")
                if rng.random() < 1 / (1 + np.exp(-(logit_of[item["item_id"]] + 1.5))):
                    like_delay = int(min(max(np.exp(rng.normal(np.log(60_000), 1.0)),
                                             MIN_DELAY_MS), self.max_delay_ms))
                    self._push(click_ts + like_delay, item["request_id"], "like")
                    self.likes += 1
        return clicks

    def _push(self, ts_ms, request_id, action):
        self.seq += 1
        heapq.heappush(self.pending, (ts_ms, self.seq, request_id, action))

    def _write_due(self, now_ms: int) -> None:
        """Actions whose time has come go to the action log, in event-time order: up to
        ``now_ms``, and not past the earliest action a request still waiting for its answer
        could bring (its event time plus the shortest delay)."""
        with self.lock:
            if self.inflight:
                now_ms = min(now_ms, min(self.inflight.values()) + MIN_DELAY_MS - 1)
            due = []
            while self.pending and self.pending[0][0] <= now_ms:
                ts, _, rid, action = heapq.heappop(self.pending)
                due.append({"request_id": rid, "ts_ms": ts, "action": action})
            for record in due:
                self.log.append([record], record["ts_ms"])
            self.log.advance(now_ms)

    # -- serving ----------------------------------------------------------------------------

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.url.hostname, self.url.port or 80, timeout=10)

    def _post(self, conn, path: str, body: dict):
        data = strict_json.dumps(body, separators=(",", ":")).encode("utf-8")
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")

    def wait_for_serve(self) -> None:
        """Waits until serving answers ``GET /healthz`` (RuntimeError after
        ``wait_for_serve_s``)."""
        deadline = time.monotonic() + self.wait_for_serve_s
        while True:
            try:
                conn = self._connect()
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serving at {self.url.geturl()} did not answer within "
                                   f"{self.wait_for_serve_s:.0f} s")
            time.sleep(0.2)

    # -- the users ----------------------------------------------------------------------------

    def _user_loop(self, worker: int, stop_rel_ms: int) -> None:
        conn = self._connect()
        rng = np.random.default_rng([worker, int(self.rng.integers(1 << 31))])
        interval = self.concurrency / self.rps
        next_at = time.monotonic() + worker * interval / self.concurrency
        while True:
            now = time.monotonic()
            if now < next_at:
                time.sleep(next_at - now)
            next_at = max(next_at + interval, time.monotonic() - interval)
            t_rel = self.sim_rel_ms()
            if t_rel >= stop_rel_ms:
                break
            ts_ms = self.world.start_ms + t_rel
            with self.lock:
                body, items, ctr, logit = self.world.request(rng, t_rel, self.n_candidates)
                self.inflight[worker] = ts_ms
            body["ts_ms"] = ts_ms
            if self.top_k:
                body["top_k"] = self.top_k
            started = time.perf_counter()
            try:
                status, answer = self._post(conn, "/score", body)
            except (OSError, http.client.HTTPException, ValueError) as e:
                conn.close()
                conn = self._connect()
                status, answer = 0, {"error": str(e)}
            latency_ms = 1000 * (time.perf_counter() - started)
            if status != 200:
                with self.lock:
                    self.inflight.pop(worker, None)
                    self.errors += 1
                    if self.errors <= 5 or self.errors % 100 == 0:
                        _LOG.warning("simulate: serving answered %s: %s", status,
                                     str(answer)[:200])
                if self.stats:
                    self._stat(ts_ms, latency_ms, 0, 0, {}, status)
                time.sleep(0.1)
                continue
            ids = [f"i{i}" for i in items.tolist()]
            ctr_of = dict(zip(ids, ctr.tolist()))
            logit_of = dict(zip(ids, logit.tolist()))
            served = answer["items"]
            clicks = self._act(answer["ts_ms"], served, ctr_of, logit_of)
            with self.lock:
                self.inflight.pop(worker, None)
                self.requests += 1
                self.served += len(served)
                self.clicks += clicks
                self.latencies.append(latency_ms)
            self._stat(answer["ts_ms"], latency_ms, len(served), clicks, answer["params"], 200)
        conn.close()

    def _stat(self, ts_ms, latency_ms, served, clicks, params, status):
        if not self.stats:
            return
        with self.lock:
            self.stats.writerow([round(time.monotonic() - self.wall0, 3), ts_ms,
                                 round(latency_ms, 3), served, clicks,
                                 params.get("model_version"), params.get("dense_age_ms"),
                                 params.get("sparse_age_ms"), params.get("sparse_wall_age_s"),
                                 params.get("store"), status])

    def run(self) -> dict:
        """Runs the users until the simulated clock is up, writes every action and closes
        the action log, asks serving to close its feature log.

        Returns:
            The summary: requests, errors, served, clicks, likes, CTR, wall seconds,
            latencies, serving's and the Bayes AUC of what was served.
        """
        self.wait_for_serve()
        self.wall0 = time.monotonic()
        stop_rel_ms = self.to_rel_ms
        threads = [threading.Thread(target=self._user_loop, args=(w, stop_rel_ms),
                                    name=f"user-{w}", daemon=True)
                   for w in range(self.concurrency)]
        for t in threads:
            t.start()
        last_report = time.monotonic()
        while any(t.is_alive() for t in threads):
            time.sleep(0.05)
            self._write_due(self.world.start_ms + min(self.sim_rel_ms(), stop_rel_ms))
            if time.monotonic() - last_report >= 10:
                last_report = time.monotonic()
                print(f"simulate: event time {self.sim_rel_ms() / 1000:+,.0f} s, "
                      f"{self.requests:,} requests, {self.served:,} served, "
                      f"{self.clicks:,} clicks, {self.errors} errors", flush=True)
        for t in threads:
            t.join()
        wall = time.monotonic() - self.wall0
        # The last actions come after the last request: write them all, then close the log.
        end_ms = self.world.start_ms + stop_rel_ms
        last = max([p[0] for p in self.pending], default=end_ms)
        self._write_due(max(last, end_ms))
        self.log.close(until_ms=max(last, end_ms) + 1)
        try:
            conn = self._connect()
            self._post(conn, "/flush", {})
            conn.close()
        except (OSError, http.client.HTTPException, ValueError) as e:
            _LOG.warning("simulate: could not flush serving's feature log: %s", e)
        if self.stats_file:
            self.stats_file.close()
        labels = np.array(self.labels, bool)
        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {"requests": self.requests, "errors": self.errors, "served": self.served,
                "clicks": self.clicks, "likes": self.likes,
                "ctr": round(self.clicks / max(self.served, 1), 5),
                "wall_s": round(wall, 2), "requests_per_s": round(self.requests / wall, 2),
                "latency_ms_p50": round(float(np.percentile(lat, 50)), 3),
                "latency_ms_p99": round(float(np.percentile(lat, 99)), 3),
                "serving_auc": _auc(self.scores, labels),
                "bayes_auc": _auc(self.true_ctrs, labels)}


def _auc(scores, labels) -> Optional[float]:
    auc = roc_auc(np.asarray(scores, np.float64), labels) if len(labels) else float("nan")
    return None if np.isnan(auc) else round(auc, 5)


def parser() -> argparse.ArgumentParser:
    """The command line's parser."""
    p = cli.argument_parser(prog="python -m dataflow.simulate", description=__doc__)
    p.add_argument("--serve", required=True, help="serving URL, e.g. http://127.0.0.1:8500")
    p.add_argument("--actions", required=True,
                   help="folder of the action log, or a Kafka topic kafka://HOST:PORT/TOPIC "
                        "(its messages keyed by request id, with watermark marks)")
    p.add_argument("--duration_s", type=float, default=3600.0,
                   help="simulated seconds to run for")
    p.add_argument("--speed", type=float, default=60.0,
                   help="simulated seconds per wall second")
    p.add_argument("--rps", type=float, default=20.0, help="requests per wall second")
    p.add_argument("--concurrency", type=int, default=2, help="users asking at once")
    p.add_argument("--candidates", type=int, default=30, help="items per request")
    p.add_argument("--top_k", type=int, default=10, help="items served (seen) per request")
    p.add_argument("--roll_s", type=float, default=300.0,
                   help="event-time seconds per action log file")
    p.add_argument("--max_delay_s", type=float, default=1800.0,
                   help="longest delay of an action after serving")
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--categories", type=int, default=30)
    p.add_argument("--creators", type=int, default=2000)
    p.add_argument("--ctr", type=float, default=0.08, help="mean true CTR of the world")
    p.add_argument("--drift", type=float, default=0.6, help="taste drift, radians per day")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", default="2024-01-01", help="UTC day the simulated run starts")
    p.add_argument("--clock_from_s", type=float, default=0.0,
                   help="simulated seconds after --start at which the clock starts; negative: "
                        "the world's history before the run (the world is the same: drawn "
                        "for --duration_s)")
    p.add_argument("--clock_to_s", type=float, default=None,
                   help="where the clock stops (default: --duration_s)")
    p.add_argument("--stats", default=None, help="CSV with one line per request")
    p.add_argument("--summary", default=None, help="write the summary JSON here too")
    p.add_argument("--wait_for_serve_s", type=float, default=120.0)
    return p


def main(argv=None) -> int:
    """``python -m dataflow.simulate``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    args = parser().parse_args(argv)
    try:
        world = World(args.users, args.items, args.duration_s, args.seed, args.ctr,
                      args.start, args.drift, args.categories, args.creators)
        sim = Simulator(args.serve, args.actions, world, args.speed, args.rps,
                        args.candidates, args.top_k, args.roll_s, args.concurrency,
                        args.seed, args.max_delay_s, args.stats, args.wait_for_serve_s,
                        args.clock_from_s, args.clock_to_s)
        summary = sim.run()
    except (ValueError, RuntimeError) as e:
        print(f"simulate: {e}", file=sys.stderr)
        return 2
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            strict_json.dump(summary, f, indent=2, sort_keys=True)
    print(strict_json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
