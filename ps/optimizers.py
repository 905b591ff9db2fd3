"""Optimizers: SGD, Adagrad, FTRL-Proximal and Adam, for embedding rows and dense weights.

One class per update rule, whose fields are its hyper-parameters, with two ways to apply it:
to the touched rows of an embedding table (``apply``: numba kernels, the state in the row) and
to a dense parameter array (``apply_dense``: NumPy, the state in arrays beside it). The PS
shards build theirs with :func:`as_optimizer` from a name, a config dict or an instance.

An optimizer's state lives in the same float32 row as the embedding it trains::

    row = [ w_0 .. w_{dim-1} | optimizer slots ]

so one random access reads and writes everything a step needs, and snapshots, deltas and growth
move state with the weights for free. ``num_slots(dim)`` says how wide the state is and
``initial_slots(dim)`` what a new row starts with.

``apply(rows, positions, grads, dim)`` updates ``rows[positions]`` in place; ``positions`` must be
unique (the table sums the gradients of repeated fids first, as TensorFlow's sparse apply does).
Arithmetic is done in float64 and stored as float32.

**Adam keeps a per-row step count** (the last slot) rather than global beta powers: a row created
late in training gets the same bias correction as a new row should, and rows updated rarely are not
corrected as if they had been updated at every global step. The count is a float32, exact up to
2**24 updates of that row, after which it stops growing (bias correction is 1 to float32 precision
long before that).

>>> import numpy as np
>>> rows = np.zeros((3, 2 + 2), dtype=np.float32)    # dim 2, Adagrad keeps one slot per weight
>>> opt = Adagrad(lr=0.1, initial_accumulator=0.1)
>>> rows[:, 2:] = opt.initial_slots(2)
>>> opt.apply(rows, np.array([1]), np.array([[1.0, -2.0]], dtype=np.float32), dim=2)
>>> rows[1].astype(float).round(4).tolist()
[-0.0953, 0.0988, 1.1, 4.1]

**Dense weights** (the ``DenseShard``): ``dense_slots(param)`` names the state arrays of a
parameter and ``apply_dense(param, slots, grad, step)`` takes one step in place; Adam's step
count is the caller's (one per parameter). Float64 arithmetic, float32 storage, the same rules:

>>> w = np.zeros(2, dtype=np.float32)
>>> slots = opt.dense_slots(w)
>>> opt.apply_dense(w, slots, np.array([1.0, -2.0], dtype=np.float32), step=1)
>>> w.astype(float).round(4).tolist(), slots["acc"].astype(float).round(4).tolist()
([-0.0953, 0.0988], [1.1, 4.1])
"""

import dataclasses
import math

import numpy as np

from ._jit import njit, prefetch

__all__ = ["Optimizer", "SGD", "Adagrad", "FTRL", "Adam", "optimizer_from_config", "as_optimizer"]

# How many rows ahead the kernels prefetch; small distances measured best here.
_PREFETCH = 8


@njit(inline="always")
def _prefetch_row(flat_rows, positions, i, width):
    if i < positions.shape[0]:
        start = positions[i] * width
        prefetch(flat_rows, start)
        prefetch(flat_rows, start + width - 1)


@njit(inline="always")
def _sgd_row(rows, p, grads, i, dim, h):
    lr = h[0]
    for j in range(dim):
        rows[p, j] = rows[p, j] - lr * grads[i, j]


@njit(inline="always")
def _adagrad_row(rows, p, grads, i, dim, h):
    lr, epsilon = h[0], h[1]
    for j in range(dim):
        g = np.float64(grads[i, j])
        accumulator = rows[p, dim + j] + g * g
        rows[p, dim + j] = accumulator
        rows[p, j] = rows[p, j] - lr * g / (math.sqrt(accumulator) + epsilon)


@njit(inline="always")
def _ftrl_row(rows, p, grads, i, dim, h):
    lr, beta, l1, l2 = h[0], h[1], h[2], h[3]
    for j in range(dim):
        g = np.float64(grads[i, j])
        w = np.float64(rows[p, j])
        z = np.float64(rows[p, dim + j])
        n = np.float64(rows[p, 2 * dim + j])
        n_new = n + g * g
        sigma = (math.sqrt(n_new) - math.sqrt(n)) / lr
        z = z + g - sigma * w
        if abs(z) <= l1:
            w = 0.0
        else:
            w = -(z - math.copysign(l1, z)) / ((beta + math.sqrt(n_new)) / lr + l2)
        rows[p, j] = w
        rows[p, dim + j] = z
        rows[p, 2 * dim + j] = n_new


@njit(inline="always")
def _adam_row(rows, p, grads, i, dim, h):
    lr, beta1, beta2, epsilon = h[0], h[1], h[2], h[3]
    step_slot = 3 * dim
    t = np.float64(rows[p, step_slot]) + 1.0
    rows[p, step_slot] = t
    t = np.float64(rows[p, step_slot])  # what float32 kept (saturates at 2**24)
    correction1 = 1.0 - beta1**t
    correction2 = 1.0 - beta2**t
    for j in range(dim):
        g = np.float64(grads[i, j])
        m = beta1 * rows[p, dim + j] + (1.0 - beta1) * g
        v = beta2 * rows[p, 2 * dim + j] + (1.0 - beta2) * g * g
        rows[p, dim + j] = m
        rows[p, 2 * dim + j] = v
        rows[p, j] = rows[p, j] - lr * (m / correction1) / (math.sqrt(v / correction2) + epsilon)


_SGD, _ADAGRAD, _FTRL, _ADAM = 0, 1, 2, 3


@njit(inline="always")
def _apply_rows(rule, rows, positions, grads, dim, h):
    """One step of update ``rule`` on ``rows[positions[i]]`` with ``grads[i]``, prefetching
    the rows ahead; ``h`` holds the rule's hyper-parameters. Inlined into one kernel per rule,
    where the rule is a constant: each kernel holds only its own update."""
    width = rows.shape[1]
    flat = rows.reshape(-1)
    for i in range(positions.shape[0]):
        _prefetch_row(flat, positions, i + _PREFETCH, width)
        p = positions[i]
        if rule == _SGD:
            _sgd_row(rows, p, grads, i, dim, h)
        elif rule == _ADAGRAD:
            _adagrad_row(rows, p, grads, i, dim, h)
        elif rule == _FTRL:
            _ftrl_row(rows, p, grads, i, dim, h)
        else:
            _adam_row(rows, p, grads, i, dim, h)


@njit
def _sgd_kernel(rows, positions, grads, dim, h):
    _apply_rows(_SGD, rows, positions, grads, dim, h)


@njit
def _adagrad_kernel(rows, positions, grads, dim, h):
    _apply_rows(_ADAGRAD, rows, positions, grads, dim, h)


@njit
def _ftrl_kernel(rows, positions, grads, dim, h):
    _apply_rows(_FTRL, rows, positions, grads, dim, h)


@njit
def _adam_kernel(rows, positions, grads, dim, h):
    _apply_rows(_ADAM, rows, positions, grads, dim, h)


def _hyper(*values):
    """The kernels' hyper-parameter tuple: four float64s (one signature for every rule)."""
    return tuple(float(x) for x in values) + (0.0,) * (4 - len(values))


class Optimizer:
    """Base class: subclasses are frozen dataclasses whose fields are their hyper-parameters.

    >>> opt = as_optimizer("ftrl", lr=0.05)
    >>> opt.num_slots(4), sorted(opt.dense_slots(np.zeros(3, np.float32)))
    (8, ['n', 'z'])
    >>> optimizer_from_config(opt.config()) == opt
    True
    """

    name = "optimizer"

    def num_slots(self, dim):
        """Number of float32 state values stored after the ``dim`` weights of a row."""
        raise NotImplementedError

    def initial_slots(self, dim):
        """State of a new row, float32 array of ``num_slots(dim)``."""
        return np.zeros(self.num_slots(dim), dtype=np.float32)

    def apply(self, rows, positions, grads, dim):
        """One step on ``rows[positions]`` (unique positions) with ``grads`` of shape [n, dim]."""
        raise NotImplementedError

    def dense_slots(self, param):
        """The state of a dense parameter: ``{slot name: float32 array of param's shape}``."""
        return {}

    def apply_dense(self, param, slots, grad, step):
        """One step on the float32 array ``param`` in place.

        Args:
            param: the parameter (float32).
            slots: its state, from :meth:`dense_slots` (updated in place).
            grad: its gradient, of param's shape.
            step: this parameter's step number (1 for the first).
        """
        raise NotImplementedError

    def config(self):
        """JSON-able description; ``optimizer_from_config(opt.config()) == opt``."""
        return {"name": self.name, **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True)
class SGD(Optimizer):
    """Plain gradient descent: ``w -= lr * g``. No state.

    >>> w = np.ones(2, np.float32)
    >>> SGD(lr=0.5).apply_dense(w, {}, np.array([1.0, -1.0], np.float32), step=1)
    >>> w.tolist()
    [0.5, 1.5]
    """

    lr: float = 0.01
    name = "sgd"

    def num_slots(self, dim):
        return 0

    def apply(self, rows, positions, grads, dim):
        _sgd_kernel(rows, positions, grads, dim, _hyper(self.lr))

    def apply_dense(self, param, slots, grad, step):
        param[...] = param - self.lr * grad.astype(np.float64)


@dataclasses.dataclass(frozen=True)
class Adagrad(Optimizer):
    """``a += g*g; w -= lr * g / (sqrt(a) + epsilon)``, one accumulator per weight.

    Defaults are Monolith's: learning rate 0.001, initial accumulator 0.1.

    >>> Adagrad().initial_slots(3).astype(float).round(4).tolist()     # a new row's accumulators
    [0.1, 0.1, 0.1]
    """

    lr: float = 0.001
    initial_accumulator: float = 0.1
    epsilon: float = 0.0
    name = "adagrad"

    def num_slots(self, dim):
        return dim

    def initial_slots(self, dim):
        return np.full(dim, self.initial_accumulator, dtype=np.float32)

    def apply(self, rows, positions, grads, dim):
        _adagrad_kernel(rows, positions, grads, dim, _hyper(self.lr, self.epsilon))

    def dense_slots(self, param):
        return {"acc": np.full(param.shape, self.initial_accumulator, dtype=np.float32)}

    def apply_dense(self, param, slots, grad, step):
        g = grad.astype(np.float64)
        acc = slots["acc"] + g * g
        slots["acc"][...] = acc
        param[...] = param - self.lr * g / (np.sqrt(acc) + self.epsilon)


@dataclasses.dataclass(frozen=True)
class FTRL(Optimizer):
    """FTRL-Proximal (McMahan et al. 2013), per coordinate; slots ``z`` then ``n``.

    ``n' = n + g²;  z += g - (sqrt(n') - sqrt(n)) / lr * w;
    w = 0 if |z| <= l1 else -(z - sign(z) l1) / ((beta + sqrt(n')) / lr + l2)``

    >>> w = np.zeros(2, np.float32)
    >>> opt = FTRL(lr=0.1, l1=1.0)
    >>> opt.apply_dense(w, opt.dense_slots(w), np.array([0.5, 5.0], np.float32), step=1)
    >>> w.tolist()[0], w.tolist()[1] < 0        # L1: a small gradient leaves an exact zero
    (0.0, True)
    """

    lr: float = 0.01
    beta: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    initial_accumulator: float = 0.1
    name = "ftrl"

    def num_slots(self, dim):
        return 2 * dim

    def initial_slots(self, dim):
        slots = np.zeros(2 * dim, dtype=np.float32)
        slots[dim:] = self.initial_accumulator
        return slots

    def apply(self, rows, positions, grads, dim):
        _ftrl_kernel(rows, positions, grads, dim, _hyper(self.lr, self.beta, self.l1, self.l2))

    def dense_slots(self, param):
        return {"z": np.zeros(param.shape, dtype=np.float32),
                "n": np.full(param.shape, self.initial_accumulator, dtype=np.float32)}

    def apply_dense(self, param, slots, grad, step):
        g = grad.astype(np.float64)
        w, z, n = (a.astype(np.float64) for a in (param, slots["z"], slots["n"]))
        n_new = n + g * g
        z = z + g - (np.sqrt(n_new) - np.sqrt(n)) / self.lr * w
        shrunk = -(z - np.copysign(self.l1, z)) / ((self.beta + np.sqrt(n_new)) / self.lr + self.l2)
        param[...] = np.where(np.abs(z) <= self.l1, 0.0, shrunk)
        slots["z"][...], slots["n"][...] = z, n_new


@dataclasses.dataclass(frozen=True)
class Adam(Optimizer):
    """Adam with bias correction from a per-row step count; slots ``m``, ``v``, then ``t``.

    >>> rows = np.zeros((1, 2 + Adam().num_slots(2)), np.float32)
    >>> Adam(lr=0.01).apply(rows, np.array([0]), np.ones((1, 2), np.float32), dim=2)
    >>> rows[0, :2].astype(float).round(4).tolist(), float(rows[0, -1])  # about lr at first; one step
    ([-0.01, -0.01], 1.0)
    """

    lr: float = 0.001
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8
    name = "adam"

    def num_slots(self, dim):
        return 2 * dim + 1

    def apply(self, rows, positions, grads, dim):
        _adam_kernel(rows, positions, grads, dim, _hyper(self.lr, self.beta1, self.beta2, self.epsilon))

    def dense_slots(self, param):
        return {"m": np.zeros(param.shape, dtype=np.float32), "v": np.zeros(param.shape, dtype=np.float32)}

    def apply_dense(self, param, slots, grad, step):
        g = grad.astype(np.float64)
        m = self.beta1 * slots["m"] + (1.0 - self.beta1) * g
        v = self.beta2 * slots["v"] + (1.0 - self.beta2) * g * g
        slots["m"][...], slots["v"][...] = m, v
        m_hat = m / (1.0 - self.beta1**step)
        v_hat = v / (1.0 - self.beta2**step)
        param[...] = param - self.lr * m_hat / (np.sqrt(v_hat) + self.epsilon)


_OPTIMIZERS = {cls.name: cls for cls in (SGD, Adagrad, FTRL, Adam)}


def optimizer_from_config(config):
    """Rebuild an optimizer from ``Optimizer.config()``."""
    config = dict(config)
    name = config.pop("name", None)
    if name not in _OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(_OPTIMIZERS)}")
    return _OPTIMIZERS[name](**config)


def as_optimizer(optimizer, lr=None):
    """An optimizer from a name, a config dict or an instance.

    Args:
        optimizer: ``"sgd" | "adagrad" | "ftrl" | "adam"`` (its defaults), a config dict
            (``Optimizer.config()``) or an :class:`Optimizer`.
        lr: overrides the learning rate (None: keep it).

    Returns:
        The optimizer.

    >>> as_optimizer("adam", lr=0.01)
    Adam(lr=0.01, beta1=0.9, beta2=0.999, epsilon=1e-08)
    """
    if isinstance(optimizer, Optimizer):
        opt = optimizer
    elif isinstance(optimizer, str):
        opt = optimizer_from_config({"name": optimizer.lower()})
    else:
        opt = optimizer_from_config(dict(optimizer))
    if lr is not None:
        opt = dataclasses.replace(opt, lr=float(lr))
    return opt
