"""Beam 2.62's state cache weighs every value it caches by scanning the globals of every
loaded module: :func:`weigh_without_module_globals` turns that scan off, for the process it is
called in.

The SDK harness weighs each value it caches with ``objsize.get_deep_size``, whose default also
walks the globals of every loaded module: ~1.1 ms per user-state write, ~4.9 ms with
TensorFlow imported (0.016 ms without the scan). Measured: the DirectRunner joiner ran 7-8x
faster with the scan off. No supported option avoids it: the in-memory DirectRunner hard-codes
a 100 MB state cache (``--max_cache_memory_usage_mb`` sizes only a portable SDK worker's), and
a cache of size 0 would lose the cache, not the cost of weighing.

It changes a function of Beam's, so nothing calls it on import: the joiner's DoFn calls it in
its ``setup`` (in whatever process runs it: the submitting process under LOOPBACK, a worker
of an EXTERNAL or PROCESS environment), the one step whose speed it decides: one state write
per record. ``python -m benchmarks.join --json`` (20k requests): 52-62 s without it, 6.5-6.9 s
with it. Training is not affected (``benchmarks.train``, 100k: 24.2-25.6k examples/s without,
26.2-26.6k with, within this machine's noise). A stateful DoFn of your own that writes state
per element may call it too.
"""
from __future__ import annotations

import logging

_LOG = logging.getLogger(__name__)
_applied = False


def weigh_without_module_globals() -> None:
    """Make Beam's state cache weigh values without scanning every module's globals
    (idempotent; a no-op on a Beam without the state cache's sizing function)."""
    global _applied
    if _applied:
        return
    _applied = True
    try:
        import objsize
        from apache_beam.runners.worker import statecache
    except ImportError:  # pragma: no cover - Beam without the state cache module
        return
    if not hasattr(statecache, "get_deep_size") or not hasattr(statecache, "_size_func"):
        return

    def get_deep_size(*objs):
        return objsize.get_deep_size(
            *objs,
            get_size_func=statecache._size_func,
            get_referents_func=statecache._get_referents_func,
            filter_func=statecache._filter_func,
            exclude_modules_globals=False)

    statecache.get_deep_size = get_deep_size
