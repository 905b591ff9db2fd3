"""What the experiments share: the data sets, one way to run our training pipeline, scores.

Every experiment trains with ``dataflow.train.build`` itself on the DirectRunner (the
pipeline of ``python -m dataflow.train``, with the ``memory://`` store), plus one extra sink
on the worker's ``scores`` output (:class:`CollectScores`) that keeps each scored batch so
an experiment can take the AUC of any slice of the stream (an epoch, a shard, a day) with
``transforms.metrics_math.auc``. Every score is the model's prediction *before* it learned from
that example (the worker scores first).

Data sets (made once per work dir, then reused; ``--quick`` makes small ones):

* ``synthetic``: ``dataflow.data synth`` — 100k requests over 7 days, 5k users, 5k items
  (items are born and fade all the time), joined into hourly example files;
* ``synthetic-churn``: the same world with user ID churn (``--user_life_days 1``, 20k users);
* ``movielens``: MovieLens-100K (``dataflow.data movielens``), daily example files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import platform
import re
import shutil
import sys
import time
import uuid
from pathlib import Path

import apache_beam as beam
import numpy as np

from schemas import strict_json

REPO = Path(__file__).resolve().parents[2]
DEFAULT_WORKDIR = REPO / "out" / "experiments"
DAY_MS = 86_400_000
HOUR_MS = 3_600_000

LOG = logging.getLogger("benchmarks.experiments")  # progress lines, on stderr


# --------------------------------------------------------------------------- data sets

@dataclasses.dataclass(frozen=True)
class DataSpec:
    """How a data set is made and trained on (the settings every experiment uses)."""

    name: str
    config: str  #: feature config name (schemas/configs)
    period_s: int  #: event-time period of one example file
    join_window_s: int
    batch_size: int  #: training batch of the online experiments
    dense_lr: float  #: dense Adagrad learning rate
    id_slots: tuple  #: ((slot name, slot id, paper's collision rate), ...)
    synth: dict | None = None  #: dataflow.data.synth parameters (None: MovieLens)
    synth_quick: dict | None = None
    quick_ratings: int = 6000  #: MovieLens --quick: the first ratings only


# The paper's Table 1 (MovieLens-25M, MD5 into a smaller space): users 7.73%, movies 2.86%.
SPECS = {
    "synthetic": DataSpec(
        "synthetic", "synthetic", 3600, 900, 256, 0.01,
        (("user", 1, 0.0773), ("item", 2, 0.0286)),
        synth=dict(requests=100_000, days=7.0, users=5_000, items=5_000, seed=0),
        synth_quick=dict(requests=6_000, days=7.0, users=600, items=600, seed=0)),
    "synthetic-churn": DataSpec(
        "synthetic-churn", "synthetic", 3600, 900, 256, 0.01,
        (("user", 1, 0.0773), ("item", 2, 0.0286)),
        synth=dict(requests=100_000, days=7.0, users=20_000, items=5_000, seed=0,
                   user_life_days=1.0),
        synth_quick=dict(requests=6_000, days=7.0, users=2_000, items=600, seed=0,
                         user_life_days=1.0)),
    # MovieLens users rate in sessions: a batch of 32 scores fewer ratings with a user row
    # older than the session than 256 does (progressive AUC 0.740 vs 0.718).
    "movielens": DataSpec(
        "movielens", "movielens", 86400, 3600, 32, 0.05,
        (("user", 1, 0.0773), ("movie", 2, 0.0286))),
}

#: The model and optimizers of every run (DeepFM as in the paper; Adagrad rows as Monolith).
#: Dense Adagrad rather than Adam: a zero gradient leaves Adagrad's weights unchanged, which
#: the collision experiment's weight-0 test days rely on (Adam's momentum would move them).
MODEL_FLAGS = ("--model=deepfm", "--optimizer=adagrad", "--learning_rate=0.05",
               "--dense_optimizer=adagrad", "--num_shards=2")


@dataclasses.dataclass
class DataSet:
    spec: DataSpec
    dir: str  #: the data set's folder (logs/, joined/)
    files: list  #: example files, in time order
    summary: dict  #: dataflow.data's summary.json

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pattern(self) -> str:
        return os.path.join(self.dir, "joined", "examples", "*.avro")


def dataset(name: str, workdir: str, quick: bool) -> DataSet:
    """The data set ``name``, generated and joined by our own pipelines on first use."""
    from dataflow import data, join
    spec = SPECS[name]
    folder = os.path.join(workdir, "data", name + ("-quick" if quick else ""))
    ready = os.path.join(folder, "ready.json")
    if not os.path.exists(ready):
        shutil.rmtree(folder, ignore_errors=True)
        logs = os.path.join(folder, "logs")
        LOG.info("making data set %s in %s", name, folder)
        if spec.synth is not None:
            summary = data.synth(logs, **(spec.synth_quick if quick else spec.synth))
        else:
            ml = data.load_movielens()
            if quick:
                n = spec.quick_ratings
                ml = data.MovieLensLogs(ts_ms=ml.ts_ms[:n], user=ml.user[:n],
                                        item=ml.item[:n], rating=ml.rating[:n],
                                        users=ml.users, items=ml.items)
            summary = data.write_movielens(ml, logs)
        with quiet_stdout():
            join.main([f"--features={logs}/feature_log/*.avro",
                       f"--actions={logs}/action_log/*.avro",
                       f"--out={folder}/joined", f"--config={spec.config}",
                       f"--period_s={spec.period_s}", f"--join_window_s={spec.join_window_s}"])
        with open(ready, "w", encoding="utf-8") as f:
            strict_json.dump(summary, f, indent=1)
    with open(ready, encoding="utf-8") as f:
        summary = json.load(f)
    files = sorted(glob.glob(os.path.join(folder, "joined", "examples", "*.avro")))
    if not files:
        raise RuntimeError(f"data set {name}: no example files in {folder}/joined/examples")
    return DataSet(spec, folder, files, summary)


def read_examples(files) -> list:
    """Every example of ``files`` in event-time order."""
    from transforms.example_log import read_examples_in_order
    return list(read_examples_in_order(list(files)))


def split_by_count(files: list, fraction: float) -> tuple:
    """(files holding the first ``fraction`` of the examples, the rest), at a file bound."""
    from dataflow.demo import split_by_time
    return split_by_time(files, fraction)


def split_at(files: list, at_ms: int) -> tuple:
    """(files of periods starting before ``at_ms``, the rest)."""
    before = [f for f in files if period_start_ms(f) < at_ms]
    return before, [f for f in files if period_start_ms(f) >= at_ms]


_PERIOD = re.compile(r"^(\d{8}T\d{6}Z)-(\d{5}-of-\d{5})-")


def period_start_ms(path: str) -> int:
    import datetime
    match = _PERIOD.match(os.path.basename(path))
    if not match:
        raise ValueError(f"{path} is not an example log file (PERIOD-SSSSS-of-NNNNN-...)")
    start = datetime.datetime.strptime(match.group(1), "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)
    return int(start.timestamp()) * 1000


def link_files(files: list, folder: str) -> str:
    """A fresh folder of symlinks to ``files``; returns its ``*.avro`` glob."""
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    for f in files:
        os.symlink(os.path.abspath(f), os.path.join(folder, os.path.basename(f)))
    return os.path.join(folder, "*.avro")


def rewrite_log(files: list, folder: str, shift_ms: int = 0, weight: float | None = None,
                fid_map=None, tag: str = "") -> list:
    """Copies of example files into ``folder``: event time moved by ``shift_ms`` (file names
    follow), ``sample_weight`` set to ``weight`` if given, fids mapped by ``fid_map`` (a
    function of a uint64 array, e.g. :func:`transforms.hashing.hash_fids`). Returns the
    paths written."""
    import fastavro

    from schemas import load_schema
    from transforms.event_time_files import period_name
    schema = load_schema("example")
    os.makedirs(folder, exist_ok=True)
    out = []
    for path in files:
        with open(path, "rb") as f:
            records = list(fastavro.reader(f))
        if fid_map is not None and records:
            lengths = np.array([len(r["fids"]) for r in records])
            fids = np.fromiter((x for r in records for x in r["fids"]), dtype=np.int64,
                               count=int(lengths.sum())).view(np.uint64)
            mapped = fid_map(fids).view(np.int64).tolist()
            bounds = np.r_[0, np.cumsum(lengths)].tolist()
            for r, lo, hi in zip(records, bounds[:-1], bounds[1:]):
                r["fids"] = mapped[lo:hi]
        for r in records:
            r["ts_ms"] += shift_ms
            if weight is not None:
                r["sample_weight"] = weight
        match = _PERIOD.match(os.path.basename(path))
        name = (f"{period_name((period_start_ms(path) + shift_ms) / 1000)}-{match.group(2)}-"
                f"{tag}{os.path.basename(path)[len(match.group(0)):]}")
        target = os.path.join(folder, name)
        with open(target, "wb") as f:
            fastavro.writer(f, schema, records, codec="deflate")
        out.append(target)
    return out


def write_config(base: str, folder: str, name: str, slot_overrides: dict) -> str:
    """A copy of feature config ``base`` with ``{slot name or "*": {key: value}}`` applied
    (``occurrence_threshold``, ``expiry_seconds``); returns its path."""
    import yaml

    from schemas.feature_config import FeatureConfig, load_feature_config
    raw = load_feature_config(base).to_dict()
    for slot in raw["slots"]:
        for key, value in {**slot_overrides.get("*", {}),
                           **slot_overrides.get(slot["name"], {})}.items():
            slot[key] = value
    FeatureConfig.from_dict(raw)  # validate before writing
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(raw, f, sort_keys=False)
    return path


# --------------------------------------------------------------------------- running

class CollectScores(beam.DoFn):
    """The worker's score batches → ``.npz`` files in ``folder`` (one per bundle).

    With ``store_url`` it also counts the rows the store holds (what serving holds: the PS
    publishes every change at sync interval 0) once per ``sample_ms`` of event time: the
    table size over event time, without touching the PS.
    """

    def __init__(self, folder: str, store_url: str | None = None, num_shards: int = 2,
                 tables: tuple = (), sample_ms: int = HOUR_MS):
        self.folder = folder
        self.store_url = store_url
        self.num_shards = num_shards
        self.tables = tuple(tables)
        self.sample_ms = sample_ms

    def setup(self):
        self._store = None
        if self.store_url:
            from ps.store import open_store
            self._store = open_store(self.store_url, self.num_shards)
        self._next_sample = None

    def start_bundle(self):
        self._parts = []
        self._samples = []

    def process(self, element):
        probs, labels, weights, ts_ms, true_ctr = element
        self._parts.append((np.asarray(probs, np.float64), np.asarray(labels, np.float32),
                            np.asarray(weights, np.float32), np.asarray(ts_ms, np.int64),
                            np.asarray(true_ctr, np.float32)))
        if self._store is not None and len(ts_ms):
            now = int(np.min(ts_ms))
            if self._next_sample is None or now >= self._next_sample:
                rows = sum(self._store.shard_rows(t, s)[0].size
                           for t in self.tables for s in range(self.num_shards))
                self._samples.append((now, rows))
                self._next_sample = (now // self.sample_ms + 1) * self.sample_ms
        return ()  # written in finish_bundle

    def finish_bundle(self):
        if not self._parts:
            return
        columns = [np.concatenate(c) for c in zip(*self._parts)]
        samples = np.array(self._samples, dtype=np.int64).reshape(-1, 2)
        np.savez(os.path.join(self.folder, f"scores-{uuid.uuid4().hex}.npz"),
                 scores=columns[0], labels=columns[1], weights=columns[2], ts_ms=columns[3],
                 true_ctr=columns[4], samples=samples)
        self._parts = []
        self._samples = []


@dataclasses.dataclass
class Run:
    """One training run: its scores in event-time order and what the pipeline reported."""

    scores: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    ts_ms: np.ndarray
    true_ctr: np.ndarray
    samples: np.ndarray  #: [k, 2] (event time ms, rows in the store), if sampled
    seconds: float
    counters: dict
    distributions: dict

    def auc(self, mask=None) -> float:
        from transforms.metrics_math import auc
        if mask is None:
            return auc(self.scores, self.labels)
        return auc(self.scores[mask], self.labels[mask])

    @property
    def examples(self) -> int:
        return int(self.scores.shape[0])


@contextlib.contextmanager
def quiet_stdout():
    """Pipelines print progress lines; keep stdout for the JSON result."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def train(mode: str, ds: DataSet, input_pattern: str, run_dir: str, *, seed: int = 0,
          config: str | None = None, batch_size: int | None = None, store: str | None = None,
          flags: tuple = (), sample_store: bool = False, metrics_window_s: int = 86400) -> Run:
    """One run of ``dataflow.train``'s pipeline (``ReadExampleBatches | TrainOnline``, from
    ``build(pipeline, opts, mode)``) on the DirectRunner."""
    from dataflow import train as train_pipeline
    from dataflow.job import run_job
    from dataflow.options import pipeline_options

    shutil.rmtree(run_dir, ignore_errors=True)
    scores_dir = os.path.join(run_dir, "scores")
    os.makedirs(scores_dir)
    store = store or f"memory://exp-{uuid.uuid4().hex[:12]}"
    metrics_out = os.path.join(run_dir, "metrics.json")
    argv = [f"--input={input_pattern}", f"--config={config or ds.spec.config}",
            f"--batch_size={batch_size or ds.spec.batch_size}", *MODEL_FLAGS,
            f"--dense_learning_rate={ds.spec.dense_lr}", f"--seed={seed}",
            f"--store={store}", f"--metrics_dir={run_dir}/metrics",
            f"--metrics_window_s={metrics_window_s}", f"--metrics_out={metrics_out}", *flags]
    options = pipeline_options(argv, train_pipeline.TrainOptions)
    opts = options.view_as(train_pipeline.TrainOptions)
    tables = ()
    if sample_store:
        from schemas.feature_config import load_feature_config
        from transforms.model import ModelSpec
        spec = ModelSpec.from_feature_config(load_feature_config(opts.config), opts.model)
        tables = tuple(spec.tables())

    def build(pipeline):
        out = train_pipeline.build(pipeline, opts, mode)
        out.scores | "CollectScores" >> beam.ParDo(CollectScores(
            scores_dir, store if sample_store else None, opts.num_shards, tables))
        return out

    start = time.monotonic()
    with quiet_stdout():
        run_job(build, options, freeze_startup_heap=True)
    seconds = time.monotonic() - start
    with open(metrics_out, encoding="utf-8") as f:
        metrics = json.load(f)
    return _load_run(scores_dir, seconds, metrics)


def _load_run(scores_dir: str, seconds: float, metrics: dict) -> Run:
    parts = [np.load(p) for p in sorted(glob.glob(os.path.join(scores_dir, "*.npz")))]
    if not parts:
        raise RuntimeError(f"the pipeline scored nothing (no score files in {scores_dir})")
    cols = {k: np.concatenate([p[k] for p in parts])
            for k in ("scores", "labels", "weights", "ts_ms", "true_ctr")}
    order = np.argsort(cols["ts_ms"], kind="stable")
    samples = np.concatenate([p["samples"] for p in parts]).reshape(-1, 2)
    samples = samples[np.argsort(samples[:, 0], kind="stable")]
    return Run(**{k: v[order] for k, v in cols.items()}, samples=samples, seconds=seconds,
               counters=metrics.get("counters", {}),
               distributions=metrics.get("distributions", {}))


def clone_store(src: str, dst: str, tables, num_shards: int) -> None:
    """Copy what serving holds (rows, dense weights, sync records) from store ``src`` to
    ``dst``: the online runs of one backfill each start from the backfill's serving state."""
    from ps.store import open_store
    a, b = open_store(src, num_shards), open_store(dst, num_shards)
    for table in tables:
        for shard in range(num_shards):
            fids, rows = a.shard_rows(table, shard)
            if fids.size:
                b.replace_shard(table, shard, fids, rows)
    params, version = a.read_dense("dense")
    if params is not None:
        b.write_dense("dense", params, version)
    for key, info in a.sync_info().items():
        b.set_sync(key, info)


def drop_store(url: str) -> None:
    from ps.store import open_store
    open_store(url, None).clear()


# --------------------------------------------------------------------------- reporting

def mean_std(values) -> dict:
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if values.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": round(float(values.mean()), 5),
            "std": round(float(values.std(ddof=1)) if values.size > 1 else 0.0, 5),
            "n": int(values.size)}


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    memory_gb = None
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import apache_beam
    import tensorflow as tf
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gb": memory_gb,
            "python": platform.python_version(), "platform": platform.platform(),
            "beam": apache_beam.__version__, "tensorflow": tf.__version__,
            "runner": "DirectRunner (FnApiRunner, in-process memory:// store)"}


def rounded(x, digits: int = 5):
    if x is None:
        return None
    x = float(x)
    return round(x, digits) if np.isfinite(x) else None
