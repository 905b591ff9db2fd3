"""River on our example log, for side-by-side online AUC (run by ``benchmarks.train --peers``).

river needs numpy 2 and the library pins numpy 1.26 (TensorFlow 2.16), so this runs in its
own venv (``make peers`` → ``.venv-peers``) and imports nothing of the library: it reads the
example log with fastavro, in event-time order, and scores every example before learning
it (progressive validation), exactly as the training pipeline does.

    .venv-peers/bin/python benchmarks/river_peer.py 'out/joined/examples/*.avro' fm
"""
import glob
import heapq
import json
import sys
import time

import fastavro
from river import linear_model, optim
from river import facto


def examples_in_order(pattern):
    files = [open(p, "rb") for p in sorted(glob.glob(pattern))]
    try:
        yield from heapq.merge(*(fastavro.reader(f) for f in files),
                               key=lambda e: (e["ts_ms"], e["request_id"]))
    finally:
        for f in files:
            f.close()


def model(kind):
    if kind == "fm":  # DESIGN §7: FMClassifier(n_factors=8, SGD(0.05))
        return facto.FMClassifier(n_factors=8, weight_optimizer=optim.SGD(0.05),
                                  latent_optimizer=optim.SGD(0.05), seed=0)
    return linear_model.LogisticRegression(optimizer=optim.SGD(0.1))


def main(pattern, kind):
    learner = model(kind)
    scores, labels = [], []
    start = time.monotonic()
    for e in examples_in_order(pattern):
        x = {f"f{fid}": 1.0 for fid in e["fids"]}
        x.update({f"d{i}": v for i, v in enumerate(e.get("dense") or [])})
        scores.append(learner.predict_proba_one(x).get(True, 0.0))
        labels.append(int(e["label"]))
        learner.learn_one(x, bool(e["label"]))
    seconds = time.monotonic() - start
    json.dump({"kind": kind, "examples": len(labels), "seconds": seconds,
               "scores": scores, "labels": labels}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
