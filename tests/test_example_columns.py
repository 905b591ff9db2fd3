"""The numba example-log decoder equals fastavro + ``ExampleBatch.from_examples`` exactly,
in the order of ``read_examples_in_order``, on random examples (hypothesis)."""
from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from transforms.example_log import read_examples_in_order
from schemas import write_avro
from transforms.example_batch import ExampleBatch
from transforms.example_columns import read_example_columns
from transforms.example_batch import slice_batch, take

_example = st.fixed_dictionaries({
    "request_id": st.text(min_size=0, max_size=80) | st.sampled_from(["a", "a\x00", "\x00"]),
    "ts_ms": st.integers(0, 40),  # few values: event times tie within and across files
    "user_id": st.text(max_size=5), "item_id": st.text(max_size=5),
    "fids": st.lists(st.integers(0, 2 ** 63 - 1), max_size=6),
    "dense": st.lists(st.floats(-1e6, 1e6, width=32), min_size=0, max_size=3),
    "label": st.integers(0, 1),
    "actions": st.lists(st.sampled_from(["click", "like", "ü"]), max_size=2),
    "sample_rate": st.floats(0.01, 1.0), "sample_weight": st.floats(1.0, 100.0),
    "served_score": st.none() | st.floats(0, 1),
    "true_ctr": st.none() | st.floats(0, 1),
})


def _sorted_unique(examples):
    seen, out = set(), []
    for e in examples:
        if e["request_id"] not in seen:
            seen.add(e["request_id"])
            out.append(e)
    return sorted(out, key=lambda e: (e["ts_ms"], e["request_id"]))


@settings(max_examples=60, deadline=None)
@given(files=st.lists(st.lists(_example, max_size=40), min_size=1, max_size=3),
       codec=st.sampled_from(["null", "deflate"]), dense_dim=st.integers(0, 3))
def test_columns_equal_fastavro_in_merge_order(tmp_path_factory, files, codec, dense_dim):
    folder = tmp_path_factory.mktemp("ex")
    paths = []
    ids = set()
    for i, examples in enumerate(files):
        # request ids are unique across an example log (the joiner's key)
        examples = [{**e, "dense": (e["dense"] + [0.25] * 3)[:dense_dim]}  # config's width
                    for e in _sorted_unique(examples) if e["request_id"] not in ids]
        ids |= {e["request_id"] for e in examples}
        paths.append(os.path.join(folder, f"part-{i}.avro"))
        write_avro(paths[-1], "example", examples, codec=codec)
    got = read_example_columns(paths, dense_dim)
    want = ExampleBatch.from_examples(list(read_examples_in_order(paths)), dense_dim)
    for name, x, y in zip(got._fields, got, want):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_slice_and_take_keep_rows_whole():
    b = ExampleBatch.from_examples([
        {"fids": [1, 2], "dense": [0.5], "label": 1, "ts_ms": 1},
        {"fids": [], "dense": [0.0], "label": 0, "ts_ms": 2},
        {"fids": [3], "dense": [1.0], "label": 1, "ts_ms": 3}], 1)
    s = slice_batch(b, 1, 3)
    assert s.row_splits.tolist() == [0, 0, 1] and s.fids.tolist() == [3]
    t = take(b, np.array([2, 0]))
    assert t.row_splits.tolist() == [0, 1, 3] and t.fids.tolist() == [3, 1, 2]
    assert t.ts_ms.tolist() == [3, 1]
