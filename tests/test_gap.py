"""benchmarks.gap: the true logit's terms and the term-share analysis."""
import doctest

import numpy as np

from benchmarks import gap
from benchmarks import train as train_benchmark


def test_doctests():
    assert doctest.testmod(gap).failed == 0
    assert doctest.testmod(train_benchmark).failed == 0


def test_a_fixed_world_keeps_its_ids_at_any_request_count():
    logs, world, *_ = gap.world_terms(3000, seed=1, users=40, items=60, days=0.5)
    assert logs.user.max() < 40 and logs.item.max() < 60
    assert len(world.age) == 40 and len(world.item_bias) == 60


def test_terms_add_up_to_the_true_logit():
    # The terms are the whole logit but for the global bias b0 (solved per stream), so the
    # split of the demographic taste into its category and item-own parts loses nothing.
    logs, world, terms, logit, ids, priors = gap.world_terms(3000, seed=1)
    b0 = logit - sum(terms.values())
    np.testing.assert_allclose(b0, b0[0], atol=1e-6)
    assert {"demographic_taste_x_category", "demographic_taste_x_item_own"} <= terms.keys()
    assert all(v.shape == logit.shape for v in terms.values())


def test_term_shares_recover_coefficients_under_noise():
    rng = np.random.default_rng(3)
    terms = {k: rng.normal(size=20_000) for k in "abc"}
    noise = rng.normal(scale=0.5, size=20_000)
    score = 2.0 + 0.3 * terms["a"] + 1.0 * terms["b"] + noise  # carries none of c
    mask = np.arange(20_000) >= 5_000
    shares = gap.term_shares(score, terms, mask)
    assert abs(shares["a"] - 0.3) < 0.02 and abs(shares["b"] - 1.0) < 0.02
    assert abs(shares["c"]) < 0.02
    expected_r2 = (0.09 + 1.0) / (0.09 + 1.0 + 0.25)
    assert abs(shares["r2"] - expected_r2) < 0.02
