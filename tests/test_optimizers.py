"""Optimizers, on embedding rows and on dense weights, against straightforward reference
implementations of their formulas."""

import numpy as np
import pytest

from ps import FTRL, SGD, Adagrad, Adam, EmbeddingTable, optimizer_from_config
from ps.optimizers import as_optimizer

DIM = 5


# ----------------------------------------------------------------------------- references
# One row at a time, float64, written from the papers' formulas. ``row`` = [w | slots].


def sgd_reference(row, g, opt):
    w = row[:DIM] - opt.lr * g
    return np.concatenate([w])


def adagrad_reference(row, g, opt):
    w, a = row[:DIM], row[DIM:]
    a = a + g * g
    w = w - opt.lr * g / (np.sqrt(a) + opt.epsilon)
    return np.concatenate([w, a])


def ftrl_reference(row, g, opt):
    w, z, n = row[:DIM], row[DIM : 2 * DIM], row[2 * DIM :]
    n_new = n + g * g
    sigma = (np.sqrt(n_new) - np.sqrt(n)) / opt.lr
    z = z + g - sigma * w
    w = np.where(np.abs(z) <= opt.l1, 0.0, -(z - np.sign(z) * opt.l1) / ((opt.beta + np.sqrt(n_new)) / opt.lr + opt.l2))
    return np.concatenate([w, z, n_new])


def adam_reference(row, g, opt):
    w, m, v, t = row[:DIM], row[DIM : 2 * DIM], row[2 * DIM : 3 * DIM], row[3 * DIM]
    t = t + 1
    m = opt.beta1 * m + (1 - opt.beta1) * g
    v = opt.beta2 * v + (1 - opt.beta2) * g * g
    m_hat = m / (1 - opt.beta1**t)
    v_hat = v / (1 - opt.beta2**t)
    w = w - opt.lr * m_hat / (np.sqrt(v_hat) + opt.epsilon)
    return np.concatenate([w, m, v, [t]])


CASES = [
    (SGD(lr=0.1), sgd_reference),
    (Adagrad(lr=0.05, initial_accumulator=0.1), adagrad_reference),
    (Adagrad(lr=0.05, initial_accumulator=0.0, epsilon=1e-3), adagrad_reference),
    (FTRL(lr=0.1, beta=1.0, l1=0.0, l2=0.0), ftrl_reference),
    (FTRL(lr=0.5, beta=0.5, l1=0.3, l2=0.2, initial_accumulator=0.2), ftrl_reference),
    (Adam(lr=0.01), adam_reference),
    (Adam(lr=0.1, beta1=0.5, beta2=0.9, epsilon=1e-6), adam_reference),
]


@pytest.mark.parametrize("opt,reference", CASES, ids=lambda x: repr(x) if not callable(x) else "")
def test_table_steps_match_the_reference_with_repeated_fids(opt, reference):
    rng = np.random.default_rng(0)
    table = EmbeddingTable(DIM, opt, capacity=4)
    model = {}  # fid -> float64 row
    pool = np.arange(1, 40, dtype=np.uint64)
    for step in range(25):
        fids = rng.choice(pool, size=30)  # many repeats within a batch
        grads = rng.standard_normal((30, DIM)).astype(np.float32)
        table.apply_gradients(fids, grads, now=step)
        sums = {}
        for fid, g in zip(fids.tolist(), grads):
            sums[fid] = g.copy() if fid not in sums else (sums[fid] + g).astype(np.float32)
        for fid, g in sums.items():
            initial = np.concatenate([np.zeros(DIM), opt.initial_slots(DIM)])
            model[fid] = reference(model.get(fid, initial), g.astype(np.float64), opt).astype(np.float32)
    keys = np.array(sorted(model), np.uint64)
    rows, found = table.lookup(keys, full=True)
    assert found.all()
    np.testing.assert_allclose(rows, np.array([model[k] for k in keys.tolist()]), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("opt,reference", CASES[:1] + CASES[1:2] + CASES[3:4] + CASES[5:6])
def test_apply_on_a_matrix_touches_only_the_given_rows(opt, reference):
    rng = np.random.default_rng(1)
    width = DIM + opt.num_slots(DIM)
    rows = np.tile(np.concatenate([rng.standard_normal(DIM), opt.initial_slots(DIM)]), (6, 1)).astype(np.float32)
    before = rows.copy()
    positions = np.array([4, 1], np.intp)
    grads = rng.standard_normal((2, DIM)).astype(np.float32)
    opt.apply(rows, positions, grads, DIM)
    assert rows.shape == (6, width)
    for p, g in zip(positions, grads):
        np.testing.assert_allclose(
            rows[p], reference(before[p].astype(np.float64), g.astype(np.float64), opt), rtol=2e-5
        )
    untouched = [0, 2, 3, 5]
    np.testing.assert_array_equal(rows[untouched], before[untouched])


def test_monolith_adagrad_defaults():
    opt = Adagrad()
    assert (opt.lr, opt.initial_accumulator) == (0.001, 0.1)
    table = EmbeddingTable(dim=3)  # the table's default optimizer
    assert table.optimizer == opt
    table.insert(np.array([1], np.uint64))
    assert table.lookup(np.array([1], np.uint64), full=True)[0].tolist() == [[0, 0, 0, *[np.float32(0.1)] * 3]]


def test_adam_counts_steps_per_row():
    table = EmbeddingTable(dim=2, optimizer=Adam(lr=0.01))
    fids = np.array([1, 1, 2], np.uint64)
    for step in range(3):
        table.apply_gradients(fids[: 2 if step else 3], np.ones((2 if step else 3, 2), np.float32), now=step)
    rows, _ = table.lookup(np.array([1, 2], np.uint64), full=True)
    assert rows[:, -1].tolist() == [3.0, 1.0]  # fid 2 was updated once, fid 1 three times
    # bias correction makes a fresh row's first Adam step move each weight by about lr
    np.testing.assert_allclose(rows[1, :2], [-0.01, -0.01], rtol=1e-4)


def test_ftrl_l1_gives_exact_zeros_for_small_gradients():
    table = EmbeddingTable(dim=3, optimizer=FTRL(lr=0.1, l1=1.0))
    table.apply_gradients(np.array([1], np.uint64), np.array([[0.5, -0.5, 5.0]], np.float32), now=0)
    w = table.lookup(np.array([1], np.uint64))[0][0]
    assert w[0] == 0.0 and w[1] == 0.0 and w[2] < 0.0


def test_config_round_trip_and_unknown_name():
    for opt, _ in CASES:
        assert optimizer_from_config(opt.config()) == opt
    with pytest.raises(ValueError, match="unknown optimizer"):
        optimizer_from_config({"name": "lamb"})


def test_slot_counts():
    assert [o.num_slots(8) for o in (SGD(), Adagrad(), FTRL(), Adam())] == [0, 8, 16, 17]


# ----------------------------------------------------------------------------- dense weights


def _reference_step(name, w, g, state, t, lr):
    """Scalar loops, written from the textbook formulas."""
    w, out = w.ravel().astype(np.float64), []
    g = g.ravel().astype(np.float64)
    for i in range(w.size):
        if name == "sgd":
            out.append(w[i] - lr * g[i])
        elif name == "adagrad":
            state["acc"][i] += g[i] ** 2
            out.append(w[i] - lr * g[i] / np.sqrt(state["acc"][i]))
        else:
            state["m"][i] = 0.9 * state["m"][i] + 0.1 * g[i]
            state["v"][i] = 0.999 * state["v"][i] + 0.001 * g[i] ** 2
            m_hat, v_hat = state["m"][i] / (1 - 0.9 ** t), state["v"][i] / (1 - 0.999 ** t)
            out.append(w[i] - lr * m_hat / (np.sqrt(v_hat) + 1e-8))
    return np.array(out)


@pytest.mark.parametrize("name", ["sgd", "adagrad", "adam"])
def test_dense_optimizer_matches_reference_formula(name):
    rng = np.random.default_rng(3)
    opt = as_optimizer(name, lr=0.05)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    slots = opt.dense_slots(w)
    state = {"acc": np.full(12, 0.1), "m": np.zeros(12), "v": np.zeros(12)}
    ref = w.astype(np.float64).ravel()
    for t in range(1, 6):
        g = rng.standard_normal((3, 4)).astype(np.float32)
        opt.apply_dense(w, slots, g, t)
        ref = _reference_step(name, ref, g, state, t, 0.05)
        np.testing.assert_allclose(w.ravel(), ref, rtol=1e-5, atol=1e-6)
    assert w.dtype == np.float32 and all(s.dtype == np.float32 for s in slots.values())


@pytest.mark.parametrize("opt,reference", CASES, ids=lambda x: repr(x) if not callable(x) else "")
def test_dense_steps_match_the_reference(opt, reference):
    """``apply_dense`` on a parameter array follows the same formulas as the rows (Adam's
    step count is the caller's), for every rule and its hyper-parameters."""
    rng = np.random.default_rng(2)
    param = rng.standard_normal((DIM,)).astype(np.float32)
    slots = opt.dense_slots(param)
    assert all(s.shape == param.shape and s.dtype == np.float32 for s in slots.values())
    row = np.concatenate([param, opt.initial_slots(DIM)]).astype(np.float64)
    for step in range(1, 8):
        g = rng.standard_normal(DIM).astype(np.float32)
        opt.apply_dense(param, slots, g, step)
        row = reference(row, g.astype(np.float64), opt).astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(param, row[:DIM], rtol=2e-5, atol=1e-6)
    assert param.dtype == np.float32


def test_as_optimizer_takes_a_name_a_config_or_an_instance():
    assert as_optimizer("Adam") == Adam()
    assert as_optimizer("sgd", lr=0.5) == SGD(lr=0.5)
    assert as_optimizer({"name": "ftrl", "l1": 0.3}) == FTRL(l1=0.3)
    opt = Adagrad(lr=0.2, epsilon=1e-3)
    assert as_optimizer(opt) is opt
    assert as_optimizer(opt, lr=0.1) == Adagrad(lr=0.1, epsilon=1e-3)
    with pytest.raises(ValueError, match="unknown optimizer"):
        as_optimizer("lamb")
