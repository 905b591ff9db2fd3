"""The examples in the docstrings run: every module of ``schemas``, ``ps``, ``transforms`` and
``dataflow`` is imported and its doctests run (``doctest``, with ``ELLIPSIS``), one test a
module. An example marked ``# doctest: +SKIP`` (one that needs Flink, say) is shown, not run.
"""
from __future__ import annotations

import doctest
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "ps", "transforms", "dataflow")


def _modules() -> list:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            names.append(".".join(parts))
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    failures = []
    for test in doctest.DocTestFinder().find(module, name):
        report = []
        result = runner.run(test, out=report.append)
        if result.failed:
            failures.append("".join(report))
    assert not failures, "\n".join(failures)
