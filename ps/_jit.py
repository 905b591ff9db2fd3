"""Numba helpers shared by the table, the frequency filter and the optimizers.

Everything here is tiny and inlined into the kernels that use it:

* ``mix64``: the splitmix64 / murmur3 finaliser, a fast bijective 64-bit mixer. Hashing
  ``fid ^ seed`` with two different seeds gives the cuckoo table its two hash functions.
* ``reduce_range``: maps a 64-bit hash onto ``[0, n)`` without a division (Lemire's
  multiply-shift), so bucket counts need not be powers of two and tables can grow by any factor.
* ``prefetch``: asks the CPU to start loading a cache line. A batch lookup is bound by memory
  latency (two random buckets and one random row per key); prefetching a few keys ahead keeps
  several loads in flight and measured about 2x faster than a plain loop.

``njit`` is numba's, with ``cache=True`` so that compiled kernels are reused across processes.
"""

import numpy as np
from llvmlite import ir
from numba import njit as _numba_njit
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["njit", "mix64", "reduce_range", "prefetch", "prefetch_write", "EMPTY_FID"]

#: Key value that marks an empty table slot. Monolith v2 fids keep bit 63 clear, so a real fid is
#: never all ones; the table rejects it as input.
EMPTY_FID = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def njit(*args, **kwargs):
    """``numba.njit`` with on-disk caching and no GIL (a DoFn may run other threads)."""
    kwargs.setdefault("cache", True)
    kwargs.setdefault("nogil", True)
    return _numba_njit(*args, **kwargs)


@njit(inline="always")
def mix64(x, seed):
    """Splitmix64 finaliser of ``x ^ seed``: every input bit affects every output bit."""
    z = np.uint64(x) ^ np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def reduce_range(h, n):
    """Map hash ``h`` to ``[0, n)`` for ``n < 2**32`` using its top 32 bits (multiply-shift)."""
    return np.intp(((np.uint64(h) >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


def _make_prefetch(write):
    @intrinsic
    def _prefetch(typingctx, array, index):
        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
            i32 = ir.IntType(32)
            fn_type = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
            fn = cgutils.get_or_insert_function(builder.module, fn_type, "llvm.prefetch.p0")
            # (address, read=0/write=1, locality 3 = keep in all cache levels, data cache)
            args = [address, ir.Constant(i32, int(write)), ir.Constant(i32, 3), ir.Constant(i32, 1)]
            builder.call(fn, args)
            return context.get_dummy_value()

        return types.void(array, index), codegen

    return _prefetch


_prefetch_read = _make_prefetch(write=False)
_prefetch_write = _make_prefetch(write=True)


@njit(inline="always")
def prefetch(flat_array, index):
    """Hint the CPU to load ``flat_array[index]`` (a 1-D array) into cache. Never faults."""
    _prefetch_read(flat_array, np.intp(index))


@njit(inline="always")
def prefetch_write(flat_array, index):
    """Like ``prefetch``, announcing a write (the line is fetched for ownership)."""
    _prefetch_write(flat_array, np.intp(index))
