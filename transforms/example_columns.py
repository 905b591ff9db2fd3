"""Example log files straight into columns: the training reader's decoder.

``fastavro`` turns every record into a dict (about 15 µs each), and the training reader then
takes the dicts apart again into NumPy arrays: half of a DirectRunner training run went there.
This module decodes the records of ``schemas/example.avsc`` in one numba pass over each
file's decompressed blocks, straight into the arrays of an ``ExampleBatch`` (fastavro still
reads the header and the blocks, so every codec it knows works). A file written with another
schema falls back to fastavro, as does a machine without numba.

>>> import tempfile
>>> from schemas import write_avro
>>> d = tempfile.mkdtemp()
>>> ex = lambda rid, ts, fids: {"request_id": rid, "ts_ms": ts, "user_id": "u", "item_id": "i",
...                            "fids": fids, "dense": [0.5], "label": ts % 2}
>>> _ = write_avro(f"{d}/a.avro", "example", [ex("a", 1, [7]), ex("c", 5, [8, 9])])
>>> _ = write_avro(f"{d}/b.avro", "example", [ex("b", 3, [])])
>>> batch = read_example_columns([f"{d}/a.avro", f"{d}/b.avro"], dense_dim=1)
>>> batch.ts_ms.tolist(), batch.row_splits.tolist(), batch.fids.tolist()
([1, 3, 5], [0, 1, 1, 3], [7, 8, 9])
"""
from __future__ import annotations

import functools

import numpy as np

from transforms.example_batch import ExampleBatch, concat_batches, take

try:
    from numba import njit
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the fallback honest
    njit = None


@functools.lru_cache(maxsize=1)
def _example_canonical_form() -> str:
    import fastavro

    from schemas import load_schema
    return fastavro.schema.to_parsing_canonical_form(
        fastavro.parse_schema(load_schema("example")))


def _same_schema(writer_schema: dict) -> bool:
    import fastavro
    try:
        return (fastavro.schema.to_parsing_canonical_form(writer_schema) ==
                _example_canonical_form())
    except Exception:  # noqa: BLE001 - an odd schema is simply not ours
        return False


if njit is not None:
    @njit(cache=True)
    def _long(buf, pos):
        """Avro long (zig-zag varint) at ``pos``: (value, next position)."""
        acc = np.uint64(0)
        shift = np.uint64(0)
        while True:
            b = buf[pos]
            pos += 1
            acc |= np.uint64(b & 0x7F) << shift
            if b < 0x80:
                break
            shift += np.uint64(7)
        return np.int64(acc >> np.uint64(1)) ^ -np.int64(acc & np.uint64(1)), pos

    @njit(cache=True)
    def _block_count(buf, pos):
        """Items in the next block of an Avro array (0: the array ended): (count, position)."""
        count, pos = _long(buf, pos)
        if count < 0:  # a negative count is followed by the block's size in bytes
            count = -count
            _, pos = _long(buf, pos)
        return count, pos

    @njit(cache=True)
    def _skip_string(buf, pos):
        n, pos = _long(buf, pos)
        return pos + n

    @njit(cache=True)
    def _decode(buf, n, dense_dim, rid_width):
        """Records of example.avsc in ``buf`` (decompressed blocks back to back) → columns.
        ``rid_width``: bytes of request_id kept for ordering (longer ids: see ``rid_len``)."""
        fids = np.empty(max(len(buf), 1), np.int64)  # a fid takes at least one byte
        row_splits = np.zeros(n + 1, np.int64)
        dense = np.zeros((n, dense_dim), np.float32)
        label = np.empty(n, np.float32)
        weight = np.empty(n, np.float32)
        ts = np.empty(n, np.int64)
        ctr = np.empty(n, np.float32)
        rid = np.zeros((n, rid_width), np.uint8)
        rid_len = np.empty(n, np.int64)
        scratch = np.empty(8, np.uint8)
        f32 = scratch[:4].view(np.float32)
        f64 = scratch.view(np.float64)
        nf = 0
        pos = 0
        nul = False  # a NUL in an id: NumPy's S dtype would drop it at the end, so fall back
        for i in range(n):
            k, pos = _long(buf, pos)                              # request_id
            rid_len[i] = k
            for j in range(min(k, rid_width)):
                rid[i, j] = buf[pos + j]
                nul |= buf[pos + j] == 0
            pos += k
            ts[i], pos = _long(buf, pos)                          # ts_ms
            pos = _skip_string(buf, pos)                          # user_id
            pos = _skip_string(buf, pos)                          # item_id
            while True:                                           # fids: array<long>
                count, pos = _block_count(buf, pos)
                if count == 0:
                    break
                for _j in range(count):
                    fids[nf], pos = _long(buf, pos)
                    nf += 1
            row_splits[i + 1] = nf
            d = 0
            while True:                                           # dense: array<float>
                count, pos = _block_count(buf, pos)
                if count == 0:
                    break
                for _j in range(count):
                    scratch[:4] = buf[pos:pos + 4]
                    if d < dense_dim:
                        dense[i, d] = f32[0]
                    d += 1
                    pos += 4
            v, pos = _long(buf, pos)                              # label
            label[i] = v
            while True:                                           # actions: array<string>
                count, pos = _block_count(buf, pos)
                if count == 0:
                    break
                for _j in range(count):
                    pos = _skip_string(buf, pos)
            pos += 8                                              # sample_rate
            scratch[:] = buf[pos:pos + 8]                         # sample_weight
            weight[i] = f64[0]
            pos += 8
            branch, pos = _long(buf, pos)                         # served_score
            if branch == 1:
                pos += 8
            branch, pos = _long(buf, pos)                         # true_ctr
            if branch == 1:
                scratch[:] = buf[pos:pos + 8]
                ctr[i] = f64[0]
                pos += 8
            else:
                ctr[i] = np.nan
        return (fids[:nf].copy(), row_splits, dense, label, weight, ts, ctr, rid, rid_len, nul,
                pos)


_RID_WIDTH = 64  # bytes of request_id kept for ordering; a file with longer ids falls back


def _file_columns(path: str, dense_dim: int):
    """(``ExampleBatch``, request ids as ``S`` bytes) of one file, in file order."""
    import fastavro
    from apache_beam.io.filesystems import FileSystems
    if njit is not None:
        with FileSystems.open(path) as fo:
            blocks = fastavro.block_reader(fo)
            ours = _same_schema(blocks.writer_schema)
            chunks, n = [], 0
            for block in (blocks if ours else ()):
                chunks.append(block.bytes_.getvalue())
                n += block.num_records
        if ours:
            buf = np.frombuffer(b"".join(chunks), dtype=np.uint8)
            fids, splits, dense, label, weight, ts, ctr, rid, rid_len, nul, end = _decode(
                buf, n, dense_dim, _RID_WIDTH)
            if end != len(buf):
                raise ValueError(f"{path}: {len(buf) - end} bytes left after {n} examples")
            if not nul and (not rid_len.size or rid_len.max() <= _RID_WIDTH):
                return (ExampleBatch(fids.view(np.uint64), splits, dense, label, weight, ts,
                                     ctr), rid.view(f"S{_RID_WIDTH}").ravel())
    from transforms.example_log import read_examples_in_order
    records = list(read_examples_in_order([path]))
    return (ExampleBatch.from_examples(records, dense_dim),
            np.array([r["request_id"].encode() for r in records], dtype=object))


def read_example_columns(paths, dense_dim: int) -> ExampleBatch:
    """Every example of some example files as one ``ExampleBatch``, in event-time order
    (``ts_ms``, then ``request_id``: the order of
    ``transforms.example_log.read_examples_in_order``; each file is in that order already,
    as the joiner writes it).

    Args:
        paths: the example files (``schemas/example.avsc``).
        dense_dim: dense inputs per example.

    Returns:
        The :class:`ExampleBatch`.
    """
    parts = [_file_columns(path, dense_dim) for path in sorted(paths)]
    if not parts:
        return ExampleBatch.from_examples([], dense_dim)
    if len(parts) == 1:
        return parts[0][0]
    batch = concat_batches([b for b, _ in parts])
    rids = np.concatenate([r.astype(object) for _, r in parts])
    return take(batch, np.lexsort((rids, batch.ts_ms)))
