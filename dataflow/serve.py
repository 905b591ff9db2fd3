"""Serving: score candidate items with the parameters training publishes; log what was served.

    python -m dataflow.serve --store redis://127.0.0.1:6379/0 --model out/models \\
        --config synthetic --model_kind fm --feature_log out/loop/feature_log [--port 8500]

For each request (user, context, candidate items) the service

1. extracts each candidate's fids with the pipeline's own code
   (``transforms.features.extract``: training and serving make the same fids);
2. reads their embedding rows from the ParameterStore, the serving PS that the training
   job's PS shards publish to (a row the store does not hold reads as zeros: the initial
   value of a row the PS has not created);
3. runs the dense part of the model from the newest SavedModel in ``--model``
   (``transforms.export``: reloaded in the background when training publishes a newer
   one; until the first one, the model's initial dense weights, as the PS starts from);
4. adds the log-odds correction of negative sampling (``--score_correction_rate``) and
   returns the candidates ranked by score (the ``top_k`` first, if asked);
5. appends the served items to the **feature log** (``schemas/feature_log.avsc``, Avro, one
   file per ``--roll_s`` of event time, written atomically, ``_watermark.json`` saying up to
   when the folder is complete) with the scores it returned.

It keeps serving when the store is down (rows it read before, from a local copy; the rest
as zeros; the store is tried again every ``--store_retry_s``) and when a new model cannot
be loaded (the last good one), and says so in every answer (``params``).

The API (JSON over HTTP/1.1, keep-alive)::

    POST /score  {"user_id": "u1", "ts_ms": 1704067200000,          # ts_ms: optional
                  "request_id": "r1",                                 # optional
                  "context": {"gender": "f", "age": 31, "device": "ios", "hour": 9, ...},
                  "candidates": [{"item_id": "i7", "features": {"category": "c3", ...},
                                  "true_ctr": 0.03},                  # optional, logged only
                                 ...],
                  "top_k": 10}                                        # optional
      200 {"request_id": "r1", "ts_ms": ..., "items": [{"item_id", "request_id", "score"}, ...],
           "params": {"model_version", "model_ts_ms", "dense_age_ms", "sparse_age_ms",
                      "sparse_wall_age_s", "store": "ok" | "unavailable", "rows_found",
                      "rows_read"}}
      400 {"error": "<reason code>", "detail": "..."}       a request it cannot score
    GET  /healthz   model and store state          GET /stats   counters
    POST /flush     closes the feature log's open file (tests, end of a run)

A candidate's feature record is ``{"request_id": "<request_id>-<position>", "ts_ms",
"user_id", "item_id", "features": context + the candidate's features}``; ``ts_ms`` is the
request's (clamped so that the log's event time never goes back) or the wall clock.
``true_ctr`` is not used for scoring: a simulator passes it so that the log can tell the
Bayes-optimal AUC of what was served.

The parts are in ``dataflow.serving``: ``feature_log`` (the log's writers), ``request``
(parsing and extraction), ``scorer`` (the model and the store) and ``http_server``.
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import argparse
import os
import signal
import sys
import threading

from dataflow import cli
from dataflow.serving.feature_log import open_feature_log
from dataflow.serving.http_server import Server
from dataflow.serving.scorer import Scorer


def parser() -> argparse.ArgumentParser:
    p = cli.argument_parser(prog="python -m dataflow.serve", description=__doc__)
    p.add_argument("--store", required=True,
                   help="ParameterStore URL (redis://HOST:PORT/DB; memory://NAME only in-process)")
    p.add_argument("--model", dest="model_dir", default=None,
                   help="model directory that training exports SavedModels into "
                        "(dataflow.train --model_dir); the newest is loaded")
    p.add_argument("--config", required=True, help="feature config (YAML path or name)")
    p.add_argument("--model_kind", default="deepfm", choices=["lr", "fm", "deepfm"],
                   help="the model training trains (dataflow.train --model)")
    p.add_argument("--seed", type=int, default=0, help="dataflow.train --seed (initial weights)")
    p.add_argument("--num_shards", type=int, default=2, help="dataflow.train --num_shards")
    p.add_argument("--feature_log", default=None,
                   help="folder of the feature log, or a Kafka topic kafka://HOST:PORT/TOPIC "
                        "(its messages keyed by request id, with watermark marks)")
    p.add_argument("--roll_s", type=float, default=60.0,
                   help="event-time seconds per feature log file")
    p.add_argument("--feature_log_in_process", action="store_true",
                   help="write the feature log with a thread of the service, not a child "
                        "process (its Avro encoding then holds the GIL against requests)")
    p.add_argument("--score_correction_rate", type=float, default=1.0,
                   help="add log(rate) to every logit: the joiner's --negative_sample_rate "
                        "for a model trained on sampled negatives without their sample "
                        "weights (dataflow.train weighs its loss by them: leave it 1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8500, help="0: any free port")
    p.add_argument("--port_file", default=None,
                   help="write the URL served here (useful with --port 0)")
    p.add_argument("--poll_s", type=float, default=1.0,
                   help="how often to look for a newer model and the store's sync records")
    p.add_argument("--store_retry_s", type=float, default=1.0,
                   help="after a store error, serve from the local copy this long")
    p.add_argument("--max_candidates", type=int, default=2000)
    return p


def build_scorer(args) -> Scorer:
    """The scorer (and its feature log) that :func:`parser`'s ``args`` describe.

    Args:
        args: the parsed command line.

    Returns:
        A :class:`dataflow.serving.scorer.Scorer`.
    """
    from transforms.model import ModelSpec
    from schemas.feature_config import load_feature_config
    config = load_feature_config(args.config)
    spec = ModelSpec.from_feature_config(config, args.model_kind, args.seed)
    log = open_feature_log(args.feature_log, args.roll_s, args.feature_log_in_process) \
        if args.feature_log else None
    return Scorer(config, spec, args.store, args.num_shards, args.model_dir,
                  args.score_correction_rate, log, args.store_retry_s, args.max_candidates)


def main(argv=None) -> int:
    """``python -m dataflow.serve``: serves until SIGTERM or Ctrl-C.

    Args:
        argv: the flags (None: ``sys.argv[1:]``).

    Returns:
        The exit status (2: it could not start).
    """
    args = parser().parse_args(argv)
    try:
        scorer = build_scorer(args)
        server = Server(scorer, args.host, args.port, args.poll_s).start(freeze_heap=True)
    except (ValueError, OSError) as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    if args.port_file:
        tmp = f"{args.port_file}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(server.url)
        os.replace(tmp, args.port_file)
    print(f"serving on {server.url} (store {args.store}, models {args.model_dir})", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    log = scorer.feature_log
    where = ""
    if log is not None:
        stats = log.stats()
        where = (f", {stats['records']} records to {args.feature_log}" if stats["files"] == 0
                 else f", {stats['records']} records in {stats['files']} feature log files")
    print(f"serve: stopped; {scorer.counters['requests']} requests{where}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
