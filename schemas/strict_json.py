"""Strict JSON for every file and answer the project writes (totals, reports, summaries,
manifests, metrics, benchmark output): JSON has no NaN or infinity, and Python's ``json``
writes them as ``NaN``/``Infinity``, which Node's and other strict parsers refuse. Here they
become ``null`` and NumPy scalars and arrays plain Python values; the text is written with
``allow_nan=False``, so a value that slips past :func:`plain` raises instead of writing bad
JSON.

Here in ``schemas``, the lowest package that writes JSON without Beam: importing
``transforms`` loads Beam, which the data generator, the simulator and the table benchmarks
do without. (``ps`` writes binary file headers that never hold NaN, with plain ``json``.)

>>> import numpy as np
>>> dumps({"auc": float("nan"), "n": np.int64(3), "x": np.array([1.5, np.inf])},
...       sort_keys=True)
'{"auc": null, "n": 3, "x": [1.5, null]}'
"""
from __future__ import annotations

import json
import math

import numpy as np


def plain(value):
    """A value as plain JSON-able Python.

    Args:
        value: anything.

    Returns:
        ``value`` with NaN and ±infinity as None and NumPy values as Python ones, through
        dicts, lists and tuples; anything else as it is (for ``json``'s ``default``).

    >>> plain({"x": [float("inf"), np.float32(0.5)]})
    {'x': [None, 0.5]}
    """
    if isinstance(value, float):  # np.float64 too
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {(k.item() if isinstance(k, np.generic) else k): plain(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return plain(value.tolist())
    return value


def dumps(value, **kwargs) -> str:
    """``json.dumps`` of :func:`plain` ``(value)``, refusing non-finite numbers
    (example: the module docstring).

    Args:
        value: what to write.
        **kwargs: ``json.dumps``'s arguments.

    Returns:
        The JSON text.

    Raises:
        ValueError: a non-finite number :func:`plain` did not reach (e.g. in a ``default``'s
            result).
    """
    return json.dumps(plain(value), allow_nan=False, **kwargs)


def dump(value, f, **kwargs) -> None:
    """``json.dump`` of :func:`plain` ``(value)``, refusing non-finite numbers.

    Args:
        value: what to write.
        f: a text file open for writing.
        **kwargs: ``json.dump``'s arguments.

    Raises:
        ValueError: as :func:`dumps`.
    """
    json.dump(plain(value), f, allow_nan=False, **kwargs)
