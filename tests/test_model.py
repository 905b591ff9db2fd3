"""The models compute what their formulas say, their gradients are right, and they learn."""
from __future__ import annotations

import numpy as np
import pytest

from transforms.example_batch import ExampleBatch
from transforms.metrics_math import auc
from transforms.model import Model, ModelSpec
from transforms.models import DeepFM, model_from_name

KINDS = ["lr", "fm", "deepfm"]


def make_spec(kind, slots, dense_dim, hidden, seed=0) -> ModelSpec:
    model = DeepFM(hidden=hidden) if kind == "deepfm" else model_from_name(kind)
    return ModelSpec(model, slots, dense_dim, seed=seed)


def fid(slot: int, value: int) -> int:
    return slot << 48 | value


def make_batch(fid_lists, dense, labels, weights) -> ExampleBatch:
    return ExampleBatch.from_examples(
        [{"fids": f, "dense": list(d), "label": y, "sample_weight": w, "ts_ms": i}
         for i, (f, d, y, w) in enumerate(zip(fid_lists, dense, labels, weights))],
        dense_dim=len(dense[0]))


def tiny_problem(kind, seed=0):
    """4 examples, 3 slots of dim 3 (+ an unknown slot 9), fids repeated within and across
    examples, an example without fids, non-unit weights."""
    spec = make_spec(kind, [(1, 3), (2, 3), (5, 3)], 2, hidden=(4, 3), seed=seed)
    fid_lists = [
        [fid(1, 10), fid(2, 20), fid(5, 50), fid(1, 11)],
        [fid(1, 10), fid(1, 10), fid(9, 90), fid(2, 21)],   # a repeat in one slot; unknown slot
        [],
        [fid(5, 50), fid(2, 20), fid(9, 91)],
    ]
    rng = np.random.default_rng(seed)
    batch = make_batch(fid_lists, rng.normal(size=(4, 2)), [1, 0, 1, 0], [1.0, 2.0, 0.5, 1.5])
    model = Model(spec)
    keys = model.lookup_keys(batch)[spec.table]
    rows = rng.normal(scale=0.3, size=(len(keys), spec.width))
    params = {name: rng.normal(scale=0.3, size=p.shape)
              for name, p in model.initial_dense_params().items()}
    return spec, model, batch, keys, rows, params


# -- a float64 NumPy reference of each forward pass, one example at a time --------------------

def reference_logits(spec, batch, keys, rows, params):
    row_of = {int(f): rows[i] for i, f in enumerate(keys)}
    position = {slot: p for p, (slot, _) in enumerate(spec.slots)}
    logits = []
    for i in range(len(batch)):
        pooled = np.zeros((spec.num_slots, spec.width))
        for f in batch.fids[batch.row_splits[i]:batch.row_splits[i + 1]].tolist():
            if f >> 48 in position:
                pooled[position[f >> 48]] += row_of[f]
        x = np.asarray(batch.dense[i], dtype=np.float64)
        logit = pooled[:, 0].sum() + params["bias"][0] + x @ params["dense_w"]
        if spec.kind in ("fm", "deepfm"):
            v = pooled[:, 1:]
            for a in range(spec.num_slots):         # Σ_{a<b} <v_a, v_b>: the FM definition
                for b in range(a + 1, spec.num_slots):
                    logit += v[a] @ v[b]
        if spec.kind == "deepfm":
            h = np.concatenate([pooled[:, 1:].reshape(-1), x])
            for layer in range(len(spec.model.hidden)):
                h = np.maximum(h @ params[f"mlp/w{layer}"] + params[f"mlp/b{layer}"], 0.0)
            logit += (h @ params["mlp/w_out"])[0] + params["mlp/b_out"][0]
        logits.append(logit)
    return np.array(logits)


def reference_loss(spec, batch, keys, rows, params):
    z = reference_logits(spec, batch, keys, rows, params)
    y, w = batch.label.astype(np.float64), batch.weight.astype(np.float64)
    return float(np.sum(w * (np.logaddexp(0.0, z) - y * z)))


def f32(params):
    return {k: np.asarray(v, np.float32) for k, v in params.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_reference(kind):
    spec, model, batch, keys, rows, params = tiny_problem(kind)
    want = 1 / (1 + np.exp(-reference_logits(spec, batch, keys, rows, params)))
    got = model.predict(batch, {spec.table: (keys, rows.astype(np.float32))}, f32(params))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert model.ignored_fids == 2  # the two fids of slot 9


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_match_finite_differences(kind):
    spec, model, batch, keys, rows, params = tiny_problem(kind)
    probs, loss, sparse, dense = model.train_step(
        batch, {spec.table: (keys, rows.astype(np.float32))}, f32(params))
    assert loss == pytest.approx(reference_loss(spec, batch, keys, rows, params), rel=1e-5)

    def numeric(array, loss_of):
        grad = np.zeros_like(array)
        for i in np.ndindex(array.shape):
            saved = array[i]
            array[i] = saved + 1e-6
            up = loss_of()
            array[i] = saved - 1e-6
            down = loss_of()
            array[i] = saved
            grad[i] = (up - down) / 2e-6
        return grad

    loss_of = lambda: reference_loss(spec, batch, keys, rows, params)  # noqa: E731
    got_fids, got_rows = sparse[spec.table]
    assert got_fids.tolist() == keys.tolist()
    np.testing.assert_allclose(got_rows, numeric(rows, loss_of), rtol=1e-3, atol=2e-5)
    assert sorted(dense) == sorted(params)
    for name in params:
        assert dense[name].shape == params[name].shape
        np.testing.assert_allclose(dense[name], numeric(params[name], loss_of),
                                   rtol=1e-3, atol=2e-5, err_msg=name)


def test_repeated_fids_get_the_sum_of_their_occurrences():
    """LR: d loss / d w_f = Σ over the occurrences of f of weight · (p − y)."""
    spec = ModelSpec("lr", slots=[(1, 8), (2, 8)], dense_dim=1)
    a, b = fid(1, 1), fid(2, 2)
    batch = make_batch([[a, a, b], [a], [b, b]], [[0.0], [1.0], [2.0]], [1, 0, 1], [1, 2, 3])
    model = Model(spec)
    rows = {"w1": (np.array([b, a], dtype=np.uint64), np.array([[0.2], [-0.1]], np.float32))}
    probs, _, sparse, _ = model.train_step(batch, rows, model.initial_dense_params())
    residual = batch.weight * (probs - batch.label)
    fids, grads = sparse["w1"]
    assert fids.tolist() == [b, a]  # aligned with the rows passed, not re-sorted
    np.testing.assert_allclose(grads[:, 0], [residual[0] + 2 * residual[2],
                                             2 * residual[0] + residual[1]], rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_rows_in_any_order_with_extra_fids(kind):
    spec, model, batch, keys, rows, params = tiny_problem(kind)
    rows = rows.astype(np.float32)
    _, loss, sparse, _ = model.train_step(batch, {spec.table: (keys, rows)}, f32(params))
    extra = np.array([fid(1, 999), fid(7, 1)], dtype=np.uint64)
    shuffled = np.random.default_rng(1).permutation(len(keys) + 2)
    fids2 = np.concatenate([keys, extra])[shuffled]
    rows2 = np.concatenate([rows, np.ones((2, spec.width), np.float32)])[shuffled]
    _, loss2, sparse2, _ = model.train_step(batch, {spec.table: (fids2, rows2)}, f32(params))
    assert loss2 == pytest.approx(loss, rel=1e-6)
    got_fids, got = sparse2[spec.table]
    assert got_fids.tolist() == fids2.tolist()
    by_fid = dict(zip(got_fids.tolist(), got))
    np.testing.assert_allclose([by_fid[f] for f in keys.tolist()], sparse[spec.table][1],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(by_fid[int(extra[0])], 0.0)  # rows no occurrence uses


def test_a_missing_row_is_an_error():
    spec, model, batch, keys, rows, params = tiny_problem("fm")
    with pytest.raises(ValueError, match="fids of the batch have no row"):
        model.predict(batch, {spec.table: (keys[1:], rows[1:])}, f32(params))
    with pytest.raises(ValueError, match="no table 'w4'"):
        model.predict(batch, {"w9": (keys, rows)}, f32(params))
    with pytest.raises(ValueError, match="lacks"):
        model.predict(batch, {spec.table: (keys, rows)}, {"bias": np.zeros(1)})


@pytest.mark.parametrize("kind", KINDS)
def test_predict_equals_the_probs_of_train_step(kind):
    spec, model, batch, keys, rows, params = tiny_problem(kind, seed=3)
    rows_by_table = {spec.table: (keys, rows.astype(np.float32))}
    probs, _, _, _ = model.train_step(batch, rows_by_table, f32(params))
    np.testing.assert_array_equal(probs, model.predict(batch, rows_by_table, f32(params)))


@pytest.mark.parametrize("kind", KINDS)
def test_graphs_traced_without_autograph_equal_autograph_ones(kind):
    """The graph functions are traced with ``autograph=False`` (their control flow is over
    the spec, not tensors): AutoGraph's conversion of the same functions gives the same
    graph and bit-identical outputs."""
    import tensorflow as tf

    spec, model, batch, keys, rows, params = tiny_problem(kind, seed=4)
    inputs = model._inputs(batch, {spec.table: (keys, rows.astype(np.float32))}, f32(params),
                           None)
    signature = model._train_fn.input_signature
    for fn, ours in ((model._loss_and_grads, model._train_graph),
                     (model._probs, model._predict_graph)):
        converted = tf.function(fn, input_signature=signature, autograph=True)
        converted = converted.get_concrete_function()
        ops = lambda graph: sorted((n.name, n.op, tuple(n.input))  # noqa: E731
                                   for n in graph.as_graph_def().node)
        assert ops(ours.graph) == ops(converted.graph)
        for a, b in zip(tf.nest.flatten(ours(*inputs)), tf.nest.flatten(converted(*inputs))):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_spec_validation_and_tables():
    assert ModelSpec("deepfm", [(1, 8), (2, 8)], 3).tables() == {"w9": 9}
    assert ModelSpec("lr", [(1, 8), (2, 16)], 0).tables() == {"w1": 1}
    with pytest.raises(ValueError, match="one embedding dim for every slot"):
        ModelSpec("deepfm", [(1, 8), (2, 16)], 0)
    with pytest.raises(ValueError, match="unknown model .dnn.: use one of"):
        ModelSpec("dnn", [(1, 8)], 0)
    with pytest.raises(ValueError, match="repeat"):
        ModelSpec("lr", [(1, 8), (1, 8)], 0)
    with pytest.raises(KeyError):
        ModelSpec("lr", [(1, 8)], 0).table_of_slot(2)
    a, b = Model(ModelSpec("deepfm", [(1, 4)], 2, seed=5)), Model(ModelSpec("deepfm", [(1, 4)], 2,
                                                                            seed=5))
    for name, value in a.initial_dense_params().items():
        np.testing.assert_array_equal(value, b.initial_dense_params()[name])
        assert value.dtype == np.float32
        if name.startswith("mlp/b") or name in ("bias", "dense_w"):
            assert not value.any()


def synthetic_batch(rng, n, slots, ids_per_slot, dense_dim):
    ids = rng.integers(0, ids_per_slot, size=(n, slots)).astype(np.uint64)
    fids = (np.arange(1, slots + 1, dtype=np.uint64) << np.uint64(48)) | ids
    return ExampleBatch(fids=fids.reshape(-1),
                        row_splits=np.arange(n + 1, dtype=np.int64) * slots,
                        dense=rng.normal(size=(n, dense_dim)).astype(np.float32),
                        label=np.zeros(n, np.float32), weight=np.ones(n, np.float32),
                        ts_ms=np.zeros(n, np.int64), true_ctr=np.full(n, np.nan, np.float32))


def test_no_retracing_across_batch_sizes():
    model = Model(ModelSpec("deepfm", [(s, 4) for s in range(1, 6)], dense_dim=3))
    params = model.initial_dense_params()
    assert model.tracing_count() == 0  # traced at first use, not when made
    rng = np.random.default_rng(0)
    for n in (1, 7, 64, 300, 33):
        batch = synthetic_batch(rng, n, 5, 50, 3)
        keys = model.lookup_keys(batch)[model.spec.table]
        rows = {model.spec.table: (keys, np.zeros((len(keys), 5), np.float32))}
        probs, _, sparse, _ = model.train_step(batch, rows, params)
        assert probs.shape == (n,) and sparse[model.spec.table][1].shape == (len(keys), 5)
        assert model.predict(batch, rows, params).shape == (n,)
    assert model._train_fn.experimental_get_tracing_count() == 1
    assert model._predict_fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("kind", KINDS)
def test_sgd_with_the_gradients_learns_a_logistic_ground_truth(kind):
    """Labels from a known logistic model of ids and dense values; plain SGD on the returned
    gradients, scoring each batch before learning from it (as the worker does). The online
    AUC of the last batches must approach the AUC of the true probabilities."""
    slots, ids_per_slot, dense_dim, n_batches, batch_size = 4, 100, 2, 300, 64
    rng = np.random.default_rng(42)
    true_w = rng.normal(scale=1.0, size=(slots, ids_per_slot))
    true_beta = np.array([0.8, -0.5])
    spec = make_spec(kind, [(s, 4) for s in range(1, slots + 1)], dense_dim, hidden=(16, 8))
    model = Model(spec)
    params = model.initial_dense_params()
    # The store: every possible fid's row (FM needs embeddings that are not all zero).
    universe = np.sort(((np.arange(1, slots + 1, dtype=np.uint64)[:, None] << np.uint64(48))
                        | np.arange(ids_per_slot, dtype=np.uint64)[None, :]).reshape(-1))
    table = rng.uniform(-0.05, 0.05, size=(len(universe), spec.width)).astype(np.float32)
    lr = 0.05
    scored, labels, true_p = [], [], []
    for _ in range(n_batches):
        batch = synthetic_batch(rng, batch_size, slots, ids_per_slot, dense_dim)
        ids = (batch.fids & np.uint64((1 << 48) - 1)).astype(np.int64).reshape(batch_size, slots)
        p = 1 / (1 + np.exp(-(true_w[np.arange(slots), ids].sum(1) + batch.dense @ true_beta)))
        # (not batch._replace: NamedTuple._replace calls len(), which ExampleBatch redefines)
        batch = ExampleBatch(**{**batch._asdict(),
                                "label": (rng.random(batch_size) < p).astype(np.float32)})
        keys = model.lookup_keys(batch)[spec.table]
        at = np.searchsorted(universe, keys)
        probs, _, sparse, dense = model.train_step(batch, {spec.table: (keys, table[at])}, params)
        table[at] -= lr * sparse[spec.table][1]
        params = {k: v - lr / batch_size * dense[k] for k, v in params.items()}
        scored.append(probs), labels.append(batch.label), true_p.append(p)
    last = slice(-100, None)
    online_auc = auc(np.concatenate(scored[last]), np.concatenate(labels[last]))
    ceiling = auc(np.concatenate(true_p[last]), np.concatenate(labels[last]))
    first_auc = auc(np.concatenate(scored[:10]), np.concatenate(labels[:10]))
    assert ceiling > 0.8
    assert online_auc > 0.75 and online_auc > ceiling - 0.06, (first_auc, online_auc, ceiling)
    assert online_auc > first_auc + 0.1

