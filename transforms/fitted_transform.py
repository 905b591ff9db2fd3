"""``FittedTransform``: the results of the tensorflow-transform analysis of a feature config
(quantile bucket boundaries, means and variances), read from its ``summary.json`` and applied
with NumPy exactly as TFT's transform graph applies them. No TensorFlow is needed here:
extraction and serving load it; ``transforms.preprocess`` makes it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from schemas import strict_json
from schemas.feature_config import FeatureConfig, FeatureConfigError

__all__ = ["FittedTransform", "TransformMismatchError", "SUMMARY_FILE", "default_epsilon",
           "analysis_columns", "analysed_spec", "slot_column", "dense_column"]

SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT = 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


class TransformMismatchError(FeatureConfigError):
    """A transform output that does not fit the config (other analysers, or none at all)."""


def default_epsilon(quantiles: int) -> float:
    """TFT's own default for ``tft.bucketize``: ``min(1 / num_buckets, 0.01)``."""
    return min(1.0 / quantiles, 0.01)


def slot_column(name: str) -> str:
    return f"slot__{name}"


def dense_column(name: str) -> str:
    return f"dense__{name}"


def analysis_columns(config: FeatureConfig) -> list[str]:
    """The transform graph's inputs: analysed slots (config order), then normalised dense."""
    return ([slot_column(s.name) for s in config.slots if s.analysed]
            + [dense_column(d.name) for d in config.dense if d.analysed])


def analysed_spec(config: FeatureConfig) -> dict:
    """What the analysis computes for this config (what a transform must have been made for)."""
    return {
        "slots": {s.name: {"source": s.fields[0], "quantiles": s.quantiles,
                           "epsilon": s.epsilon if s.epsilon is not None
                           else default_epsilon(s.quantiles)}
                  for s in config.slots if s.analysed},
        "dense": {d.name: {"source": d.source, "transform": d.transform,
                           "normalize": d.normalize}
                  for d in config.dense if d.analysed}}


# --------------------------------------------------------------------------- the numbers

@dataclasses.dataclass(frozen=True, eq=False)
class FittedTransform:
    """The analysers' results, applied with NumPy exactly as the transform graph applies them.

    ``boundaries``: slot name → ascending float32 bucket boundaries (``tft.quantiles``);
    ``mean`` / ``var``: dense name → float32 mean and (biased) variance. ``summary`` is what
    ``summary.json`` says (counts, minima, maxima ... and the analysed spec).
    """
    boundaries: Mapping[str, np.ndarray]
    mean: Mapping[str, np.float32]
    var: Mapping[str, np.float32]
    summary: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __eq__(self, other) -> bool:
        if not isinstance(other, FittedTransform):
            return NotImplemented
        return (self.mean == other.mean and self.var == other.var
                and self.boundaries.keys() == other.boundaries.keys()
                and all(np.array_equal(b, other.boundaries[k])
                        for k, b in self.boundaries.items()))

    def bucketize(self, slot: str, values: np.ndarray) -> np.ndarray:
        """float32 values → bucket indices (int64): ``b[i-1] <= x < b[i]`` is i, as
        ``tft.apply_buckets`` (a sorted search on the right side)."""
        return np.searchsorted(self.boundaries[slot], values.astype(np.float32, copy=False),
                               side="right")

    def normalize(self, name: str, values: np.ndarray) -> np.ndarray:
        """float32 values → ``(x - mean) / sqrt(var)`` in float32 (``x - mean`` if var is 0)."""
        centred = values.astype(np.float32, copy=False) - self.mean[name]
        std = np.sqrt(self.var[name])
        if std == 0:
            return centred
        with np.errstate(over="ignore"):  # inf where float32 overflows: the caller rejects it
            return centred / std

    # ----------------------------------------------------------------- files

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FittedTransform":
        """From ``DIR/summary.json`` (no TensorFlow needed: workers and serving stay light)."""
        path = Path(directory) / SUMMARY_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no {SUMMARY_FILE}; is {directory} a transform "
                                    "output of python -m dataflow.analyze?")
        summary = json.loads(path.read_text(encoding="utf-8"))
        if summary.get("format") != SUMMARY_FORMAT:
            raise ValueError(f"{path}: unknown summary format {summary.get('format')!r}")
        return cls(
            boundaries={name: np.array(s["boundaries"], np.float32)
                        for name, s in summary["slots"].items()},
            mean={name: np.float32(s["mean"]) for name, s in summary["dense"].items()},
            var={name: np.float32(s["var"]) for name, s in summary["dense"].items()},
            summary=summary)

    def save(self, directory: str | os.PathLike, **extra) -> Path:
        """Write ``summary.json`` (``extra`` keys added at the top level)."""
        path = Path(directory) / SUMMARY_FILE
        summary = {**self.summary, **extra}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(strict_json.dumps(summary, indent=2, sort_keys=True) + "\n",
                       encoding="utf-8")
        tmp.replace(path)
        return path

    def check(self, config: FeatureConfig) -> None:
        """Raise :class:`TransformMismatchError` unless this transform was analysed for
        ``config``'s analysers (same slot and dense names, sources, quantiles, epsilons)."""
        want = analysed_spec(config)
        have = {"slots": {n: {k: s.get(k) for k in ("source", "quantiles", "epsilon")}
                          for n, s in self.summary.get("slots", {}).items()},
                "dense": {n: {k: d.get(k) for k in ("source", "transform", "normalize")}
                          for n, d in self.summary.get("dense", {}).items()}}
        problems = []
        for kind in ("slots", "dense"):
            for name in sorted(set(want[kind]) | set(have[kind])):
                w, h = want[kind].get(name), have[kind].get(name)
                if w != h:
                    problems.append(f"{kind} {name!r}: config {w or 'has no analyser'}, "
                                    f"transform {h or 'has none'}")
        if problems:
            raise TransformMismatchError("transform", "the transform output was analysed for "
                                         "another config: " + "; ".join(problems))
