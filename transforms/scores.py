"""The worker's score records: :class:`Scores`, and ``.npz`` files of them.

The training worker scores each batch before it learns from it and emits the scores (the
``scores`` of ``transforms.train.TrainOnline``'s :class:`~transforms.train.TrainResult`);
``transforms.metrics.OnlineMetrics`` turns them into windowed metrics, :class:`WriteScores`
keeps every one for later questions.
"""
from __future__ import annotations

import glob
import os
import uuid
from typing import NamedTuple

import apache_beam as beam
import numpy as np

SCORE_COLUMNS = ("scores", "labels", "weights", "ts_ms", "true_ctr")


class Scores(NamedTuple):
    """The worker's score record of a batch: arrays of equal length.

    >>> s = Scores(scores=np.array([0.2, 0.9]), labels=np.array([0.0, 1.0]),
    ...            weights=np.ones(2), ts_ms=np.array([1_000, 1_500]))
    >>> s.scores.shape, s.true_ctr is None
    ((2,), True)
    """

    scores: np.ndarray  #: float32 [n], scored before the batch was trained on
    labels: np.ndarray  #: float32 [n]
    weights: np.ndarray  #: float32 [n]
    ts_ms: np.ndarray  #: int64 [n], event time
    true_ctr: np.ndarray | None = None  #: float32 [n], NaN where unknown


# no "-> Scores": Beam reads a callable's annotations (strings here) and logs that it uses Any
def as_scores(element):
    """The :class:`Scores` of a score element.

    Args:
        element: a tuple of 4 or 5 arrays (or scalars) in the order of :class:`Scores`, or
            a dict record with keys ``score``/``scores``, ``label``/``labels``,
            ``weight``/``weights``/``sample_weight`` (default 1), ``ts_ms``, ``true_ctr``.

    Returns:
        a :class:`Scores` of 1-d arrays.

    >>> as_scores({"score": 0.3, "label": 1, "ts_ms": 5}).ts_ms
    array([5])
    """
    if isinstance(element, dict):
        get = lambda *keys, default=None: next(  # noqa: E731
            (element[k] for k in keys if k in element), default)
        n = np.size(get("score", "scores"))
        element = (get("score", "scores"), get("label", "labels"),
                   get("weight", "weights", "sample_weight", default=np.ones(n)),
                   get("ts_ms"), get("true_ctr"))
    if len(element) not in (4, 5):
        raise ValueError(f"a score element has 4 or 5 arrays, got {len(element)}")
    arrays = [None if a is None else np.atleast_1d(np.asarray(a)) for a in element]
    return Scores(*arrays)


class WriteScores(beam.DoFn):
    """The worker's score batches → ``.npz`` files in ``folder``, one per bundle: every
    example's score, label, weight, event time and true CTR, for what the windowed metrics
    do not answer (e.g. the AUC of the stream's last quarter). Read them with
    :func:`read_scores`.

    Args:
        folder: where to write (made if missing).

    >>> import tempfile
    >>> folder = tempfile.TemporaryDirectory()
    >>> with beam.Pipeline() as p:
    ...     _ = (p | beam.Create([([0.2, 0.9], [0, 1], [1, 1], [2_000, 1_000])])
    ...          | beam.ParDo(WriteScores(folder.name)))
    >>> read_scores(folder.name)["ts_ms"]
    array([1000, 2000])
    >>> folder.cleanup()
    """

    def __init__(self, folder: str):
        self.folder = folder

    def setup(self):
        os.makedirs(self.folder, exist_ok=True)

    def start_bundle(self):
        self._parts = []

    def process(self, element):
        s = as_scores(element)
        n = s.scores.shape[0]
        true_ctr = s.true_ctr if s.true_ctr is not None else np.full(n, np.nan)
        self._parts.append((s.scores.astype(np.float32), s.labels.astype(np.float32),
                            s.weights.astype(np.float32), s.ts_ms.astype(np.int64),
                            np.asarray(true_ctr, np.float32)))
        return ()  # written in finish_bundle

    def finish_bundle(self):
        if not self._parts:
            return
        columns = [np.concatenate(c) for c in zip(*self._parts)]
        path = os.path.join(self.folder, f"scores-{uuid.uuid4().hex}.npz")
        np.savez(path + ".tmp.npz", **dict(zip(SCORE_COLUMNS, columns)))
        os.replace(path + ".tmp.npz", path)  # readers never see half a file
        self._parts = []


def read_scores(folder: str) -> dict:
    """Every example :class:`WriteScores` wrote in a folder.

    Args:
        folder: the folder (local).

    Returns:
        ``{column: array}`` for :data:`SCORE_COLUMNS`, in event-time order (stable: a
        batch's examples keep their order); empty arrays if there is no file.
    """
    parts = [np.load(p) for p in sorted(glob.glob(os.path.join(folder, "scores-*.npz")))
             if not p.endswith(".tmp.npz")]
    if not parts:
        return {k: np.empty(0) for k in SCORE_COLUMNS}
    cols = {k: np.concatenate([p[k] for p in parts]) for k in SCORE_COLUMNS}
    order = np.argsort(cols["ts_ms"], kind="stable")
    return {k: v[order] for k, v in cols.items()}
