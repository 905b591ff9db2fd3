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
    """A transform output that does not fit the config (other analysers, or none at all).

    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "age", "slot": 3, "source": "age", "bucketize": {"quantiles": 4}}]})
    >>> fitted = FittedTransform({}, {}, {}, summary={})   # analysed for no analyser
    >>> fitted.check(config)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    transforms.fitted_transform.TransformMismatchError: transform: ... transform has none
    """


def default_epsilon(quantiles: int) -> float:
    """TFT's own default sketch error tolerance for ``tft.bucketize``.

    Args:
        quantiles: the number of buckets.

    Returns:
        ``min(1 / quantiles, 0.01)``.

    >>> default_epsilon(8), default_epsilon(1000)
    (0.01, 0.001)
    """
    return min(1.0 / quantiles, 0.01)


def slot_column(name: str) -> str:
    """The transform graph's column of the analysed slot ``name``."""
    return f"slot__{name}"


def dense_column(name: str) -> str:
    """The transform graph's column of the normalised dense input ``name``."""
    return f"dense__{name}"


def analysis_columns(config: FeatureConfig) -> list[str]:
    """The transform graph's inputs.

    Args:
        config: the :class:`FeatureConfig`.

    Returns:
        Column names: the analysed slots (config order), then the normalised dense inputs.
    """
    return ([slot_column(s.name) for s in config.slots if s.analysed]
            + [dense_column(d.name) for d in config.dense if d.analysed])


def analysed_spec(config: FeatureConfig) -> dict:
    """What the analysis computes for a config (what a transform must have been made for).

    Args:
        config: the :class:`FeatureConfig`.

    Returns:
        ``{"slots": {name: {"source", "quantiles", "epsilon"}}, "dense": {name: {"source",
        "transform", "normalize"}}}`` of its analysers.
    """
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

    :meth:`load` reads one from a transform output directory.

    Args:
        boundaries: slot name → ascending float32 bucket boundaries (``tft.quantiles``).
        mean: dense name → float32 mean.
        var: dense name → float32 (biased) variance.
        summary: what ``summary.json`` says (counts, minima, maxima ... and the analysed
            spec, which :meth:`check` compares with a config).

    >>> config = FeatureConfig.from_dict({
    ...     "slots": [{"name": "age", "slot": 3, "source": "age", "bucketize": {"quantiles": 4}}],
    ...     "dense": [{"name": "price", "source": "price", "normalize": "z_score"}]})
    >>> fitted = FittedTransform({"age": np.array([18, 30, 45], np.float32)},
    ...                          {"price": np.float32(10)}, {"price": np.float32(4)},
    ...                          summary=analysed_spec(config))
    >>> fitted.bucketize("age", np.array([17, 18, 50])).tolist()
    [0, 1, 3]
    >>> fitted.normalize("price", np.array([12.0])).tolist()
    [1.0]
    >>> fitted.check(config)   # it was analysed for this config: no error
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
        """Values → bucket indices, as ``tft.apply_buckets`` (a sorted search on the right
        side).

        Args:
            slot: an analysed slot's name.
            values: the values (compared as float32).

        Returns:
            int64 bucket indices: ``b[i-1] <= x < b[i]`` is ``i``.
        """
        return np.searchsorted(self.boundaries[slot], values.astype(np.float32, copy=False),
                               side="right")

    def normalize(self, name: str, values: np.ndarray) -> np.ndarray:
        """Values → z-scores.

        Args:
            name: a normalised dense input's name.
            values: the values (as float32).

        Returns:
            float32 ``(x - mean) / sqrt(var)`` (``x - mean`` if var is 0; inf where that
            overflows float32).
        """
        centred = values.astype(np.float32, copy=False) - self.mean[name]
        std = np.sqrt(self.var[name])
        if std == 0:
            return centred
        with np.errstate(over="ignore"):  # inf where float32 overflows: the caller rejects it
            return centred / std

    # ----------------------------------------------------------------- files

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FittedTransform":
        """Reads ``summary.json`` (no TensorFlow needed: workers and serving stay light).

        Args:
            directory: a transform output directory of ``python -m dataflow.analyze``.

        Returns:
            The :class:`FittedTransform`.

        Raises:
            FileNotFoundError: the directory has no ``summary.json``.
            ValueError: its format is unknown.
        """
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
        """Writes ``summary.json`` (atomically).

        Args:
            directory: the transform output directory.
            **extra: more top-level keys for the summary.

        Returns:
            The path written.
        """
        path = Path(directory) / SUMMARY_FILE
        summary = {**self.summary, **extra}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(strict_json.dumps(summary, indent=2, sort_keys=True) + "\n",
                       encoding="utf-8")
        tmp.replace(path)
        return path

    def check(self, config: FeatureConfig) -> None:
        """Checks that this transform was analysed for a config's analysers (same slot and
        dense names, sources, quantiles, epsilons, transforms).

        Args:
            config: the :class:`FeatureConfig`.

        Raises:
            TransformMismatchError: it was not.
        """
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
