"""Benchmark: feature extraction with the tensorflow-transform output applied, against
extraction without it, side by side on the same feature logs.

    python -m benchmarks.preprocess --json                   # 50,000 synthetic requests
    python -m benchmarks.preprocess --requests 20000 --batch_size 64 --json

The records are the synthetic stream's feature logs (``dataflow.data``, read back from
Avro, so they have the types serving and the pipelines see). *Without*: ``synthetic.yaml``,
extracted record by record as ``ExtractFeatures`` does for a config without analysers
(fixed bucket boundaries for age, duration and item age; log1p dense inputs). *With*:
``synthetic_tft.yaml`` (the same slots, but those three bucketized by the backfill's
quantiles and both dense inputs z-scored), analysed first on the same logs by the TFT
pipeline on the DirectRunner (not timed), then applied by ``transforms.features.Preprocessor``
on batches of ``--batch_size`` records (NumPy, one searchsorted per analysed slot and batch;
no TensorFlow call). Also measured: ``Preprocessor`` without a transform (the batch API on
``synthetic.yaml``). The three are timed in turn, ``--repeat`` times, with the CPU time of
this thread (``--clock cpu``; other processes on a shared machine do not count), and the
best pass of each is reported. ``slowdown`` = records/s without ÷ records/s with; the
target is ≤ 2.
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import glob
import os
import platform
import tempfile
import time

import fastavro

from dataflow import cli
from schemas import strict_json
from schemas.feature_config import FeatureConfig
from transforms.features import FeatureExtractor, Preprocessor

_CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}


def read_records(pattern: str) -> list[dict]:
    records = []
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            records.extend(fastavro.reader(f))
    return records


def _per_record(extractor, records):
    for record in records:
        extractor(record)


def _batched(preprocessor, records, batch_size):
    for i in range(0, len(records), batch_size):
        preprocessor(records[i:i + batch_size])


def run(requests=50_000, batch_size=256, repeat=5, clock="cpu", workdir=None):
    from dataflow import analyze
    from dataflow.data import synth

    workdir = workdir or tempfile.mkdtemp(prefix="bench-preprocess-")
    logs = os.path.join(workdir, "synth")
    if not glob.glob(os.path.join(logs, "feature_log", "*.avro")):
        synth(logs, requests=requests)
    pattern = os.path.join(logs, "feature_log", "*.avro")
    transform_dir = os.path.join(workdir, "transform")
    start = time.perf_counter()
    if not os.path.isfile(os.path.join(transform_dir, "summary.json")):
        analyze.main([f"--input={pattern}", "--config=synthetic_tft", f"--out={transform_dir}"])
    analysis_s = time.perf_counter() - start
    records = read_records(pattern)

    without = FeatureExtractor(FeatureConfig.load("synthetic"))
    batch_without = Preprocessor(FeatureConfig.load("synthetic"))
    with_transform = Preprocessor.load(transform_dir)
    runs = {
        "without_transform": lambda: _per_record(without, records),
        "without_transform_batched": lambda: _batched(batch_without, records, batch_size),
        "with_transform": lambda: _batched(with_transform, records, batch_size),
    }
    # Every output must be a record, not a dead letter: otherwise a fast path is measured.
    for name, pre in (("without_transform_batched", batch_without),
                      ("with_transform", with_transform)):
        bad = [r for r in pre(records) if isinstance(r, Exception)]
        if bad:
            raise RuntimeError(f"{name}: {len(bad)} records rejected, e.g. {bad[0]}")
    timer = _CLOCKS[clock]
    best = {name: float("inf") for name in runs}
    for _ in range(repeat):
        for name, fn in runs.items():  # interleaved: drifts in machine load hit all three
            t = timer()
            fn()
            best[name] = min(best[name], timer() - t)
    rate = {name: len(records) / seconds for name, seconds in best.items()}
    return {
        "records": len(records), "batch_size": batch_size, "repeat": repeat, "clock": clock,
        "records_per_s": {name: round(r, 1) for name, r in rate.items()},
        "slowdown": round(rate["without_transform"] / rate["with_transform"], 3),
        "slowdown_vs_batched": round(rate["without_transform_batched"]
                                     / rate["with_transform"], 3),
        "analysed_slots": sum(s.analysed for s in with_transform.config.slots),
        "normalized_dense": sum(d.analysed for d in with_transform.config.dense),
        "analysis_s": round(analysis_s, 1), "transform_dir": transform_dir,
        "python": platform.python_version(),
    }


def main(argv=None):
    parser = cli.argument_parser(prog="python -m benchmarks.preprocess", description=__doc__)
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--clock", default="cpu", choices=sorted(_CLOCKS))
    parser.add_argument("--workdir", default=None,
                        help="keep the logs and the transform here (reused when present)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(args.requests, args.batch_size, args.repeat, args.clock, args.workdir)
    if args.json:
        print(strict_json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>26}: {value}")


if __name__ == "__main__":
    main()
