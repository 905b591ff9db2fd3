"""``python -m benchmarks.experiments {collision,sync,filter,peers} [--json] [--quick] ...``"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import argparse
import importlib
import logging
import os
import sys
import time

from dataflow import cli
from schemas import strict_json

EXPERIMENTS = {
    "collision": "collisionless vs. MD5-hashed embeddings: collision rate per slot, test AUC "
                 "per epoch, online AUC",
    "sync": "online vs. batch training at several sync intervals (the paper's Algorithm 1)",
    "filter": "occurrence threshold and expiry vs. table size, memory and online AUC",
    "peers": "our pipeline vs. river and a daily-retrained Keras model with hashed embeddings",
}
DEFAULT_DATASETS = {"collision": "synthetic,movielens", "sync": "synthetic,movielens",
                    "filter": "synthetic-churn", "peers": "synthetic,movielens"}


def parser() -> argparse.ArgumentParser:
    p = cli.argument_parser(prog="python -m benchmarks.experiments",
                                description=__doc__ + "\n\n" + "\n".join(
                                    f"  {k:10s} {v}" for k, v in EXPERIMENTS.items()))
    sub = p.add_subparsers(dest="experiment", required=True)
    for name, text in EXPERIMENTS.items():
        s = sub.add_parser(name, help=text, description=text, formatter_class=cli.HelpFormatter)
        cli.add_verbose(s, subcommand=True)
        s.add_argument("--json", action="store_true",
                       help="print only the JSON result on stdout (logs go to stderr)")
        s.add_argument("--quick", action="store_true",
                       help="small data, fewer seeds and epochs: a smoke run (CI)")
        s.add_argument("--workdir", default=None,
                       help="data sets and runs (default out/experiments); data sets are "
                            "made once and reused")
        s.add_argument("--datasets", default=None,
                       help=f"comma-separated (default {DEFAULT_DATASETS[name]}; "
                            f"quick: the first)")
        s.add_argument("--plot", default=None,
                       help=f"PNG to write (default WORKDIR/exp_{name}[-quick].png)")
        importlib.import_module(f"benchmarks.experiments.{name}").add_arguments(s)
    return p


def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    args.datasets_given = args.datasets is not None
    from benchmarks.experiments import common
    args.workdir = os.path.abspath(args.workdir or common.DEFAULT_WORKDIR)
    datasets = args.datasets or DEFAULT_DATASETS[args.experiment]
    args.datasets = [d.strip() for d in datasets.split(",") if d.strip()]
    if args.quick and not args.datasets_given:
        args.datasets = args.datasets[:1]
    for d in args.datasets:
        if d not in common.SPECS:
            raise SystemExit(f"unknown data set {d!r}; known: {sorted(common.SPECS)}")
    os.makedirs(args.workdir, exist_ok=True)
    module = importlib.import_module(f"benchmarks.experiments.{args.experiment}")
    start = time.monotonic()
    result = {"experiment": args.experiment, "quick": args.quick,
              "command": "python -m benchmarks.experiments " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              **module.run(args)}
    result["seconds"] = round(time.monotonic() - start, 1)
    result["machine"] = common.machine()
    plot_path = args.plot or os.path.join(
        args.workdir, f"exp_{args.experiment}{'-quick' if args.quick else ''}.png")
    os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
    module.plot(result, plot_path)
    result["plot"] = plot_path
    with open(os.path.join(args.workdir, f"exp_{args.experiment}"
                           f"{'-quick' if args.quick else ''}.json"), "w") as f:
        strict_json.dump(result, f, indent=1)
    print(strict_json.dumps(result) if args.json else strict_json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    if not cli.verbose_requested():  # its own lines, not those of its many training runs
        for name in ("dataflow", "transforms", "ps"):
            logging.getLogger(name).setLevel(logging.WARNING)
    main()
