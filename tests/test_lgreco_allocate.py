"""The L-GreCo allocator against brute force, and its input checks.

Tolerance (see allocate.py): errors are rounded up to bins of width
budget / num_bins, so the DP's size is sandwiched between the brute-force
optimum at the budget and at budget * (1 - layers / num_bins). We check the
sandwich on every instance and exact equality on nearly all of them.
"""

import itertools

import numpy as np
import pytest

from fedlowrank.compression import feedback_errors, lgreco_allocate, lgreco_budget


def _brute_force(errors, sizes, budget):
    """Smallest total size over all choices with total error <= budget (inf if none)."""
    combos = np.array(list(itertools.product(range(errors.shape[1]), repeat=errors.shape[0])))
    rows = np.arange(errors.shape[0])
    total_err = errors[rows, combos].sum(axis=1)
    total_size = sizes[rows, combos].sum(axis=1)
    fits = total_err <= budget
    return total_size[fits].min() if fits.any() else np.inf


def _instance(rng, layers=4, cands=5):
    # Bigger size <-> smaller error, as for real codecs, plus noise so ties are rare.
    sizes = np.sort(rng.integers(10, 2000, size=(layers, cands)), axis=1).astype(float)
    errors = np.sort(rng.exponential(1.0, size=(layers, cands)), axis=1)[:, ::-1] * rng.uniform(0.1, 10, (layers, 1))
    return errors, sizes


@pytest.mark.parametrize("num_bins", [100, 2000])
def test_matches_brute_force_on_random_instances(num_bins):
    rng = np.random.default_rng(0)
    exact = feasible = 0
    for _ in range(300):
        errors, sizes = _instance(rng)
        default = int(rng.integers(0, 5))
        budget = lgreco_budget(errors, default, alpha=float(rng.uniform(0.5, 1.5)))
        if _brute_force(errors, sizes, budget) == np.inf:
            with pytest.raises(ValueError, match="No allocation fits"):
                lgreco_allocate(errors, sizes, budget, num_bins=num_bins)
            continue
        feasible += 1
        choice = lgreco_allocate(errors, sizes, budget, num_bins=num_bins)
        rows = np.arange(4)
        assert choice.dtype == np.int64 and choice.shape == (4,)
        assert errors[rows, choice].sum() <= budget  # never over budget, always
        size = sizes[rows, choice].sum()
        lower = _brute_force(errors, sizes, budget)
        upper = _brute_force(errors, sizes, budget * (1 - 4 / num_bins))
        assert lower <= size <= upper
        exact += size == lower
    # Measured (seed 0): 259 feasible; exact 259/259 at 2000 bins, 256/259 at 100.
    assert feasible > 200
    assert exact == feasible if num_bins >= 2000 else exact >= 0.95 * feasible


def test_uniform_default_is_always_feasible_at_alpha_one():
    rng = np.random.default_rng(1)
    for _ in range(50):
        errors, sizes = _instance(rng, layers=6, cands=4)
        for default in range(4):
            budget = lgreco_budget(errors, default, alpha=1.0)
            choice = lgreco_allocate(errors, sizes, budget, num_bins=500)
            rows = np.arange(6)
            assert errors[rows, choice].sum() <= budget
            # The default itself is admissible, so the allocation is never larger.
            assert sizes[rows, choice].sum() <= sizes[:, default].sum()


def test_prefers_cheap_layers_when_error_is_spent_wisely():
    # Layer 0 compresses for free, layer 1 does not: the budget goes to layer 1.
    errors = np.array([[0.0, 0.0], [5.0, 0.0]])
    sizes = np.array([[10.0, 100.0], [10.0, 100.0]])
    assert lgreco_allocate(errors, sizes, budget=1.0).tolist() == [0, 1]
    assert lgreco_allocate(errors, sizes, budget=5.0).tolist() == [0, 0]


def test_zero_budget_uses_zero_error_candidates():
    errors = np.array([[0.0, 1.0], [2.0, 0.0]])
    sizes = np.array([[50.0, 1.0], [1.0, 50.0]])
    assert lgreco_allocate(errors, sizes, 0.0).tolist() == [0, 1]


@pytest.mark.parametrize(
    "errors, sizes, budget, match",
    [
        (np.ones((2, 3)), np.ones((2, 2)), 1.0, "same shape"),
        (np.array([[np.nan, 1.0]]), np.ones((1, 2)), 1.0, "NaN"),
        (np.array([[-1.0, 1.0]]), np.ones((1, 2)), 1.0, "negative"),
        (np.ones((1, 2)), np.array([[1.0, -2.0]]), 1.0, "negative"),
        (np.ones((1, 2)), np.ones((1, 2)), -1.0, "budget"),
        (np.ones((1, 2)), np.ones((1, 2)), np.nan, "budget"),
        (np.ones(3), np.ones(3), 1.0, "table"),
        (np.ones((2, 2)), np.ones((2, 2)), 1.0, "No allocation fits"),
    ],
)
def test_bad_inputs_raise_clear_errors(errors, sizes, budget, match):
    with pytest.raises(ValueError, match=match):
        lgreco_allocate(errors, sizes, budget)


def test_budget_helper():
    errors = np.array([[1.0, 2.0], [3.0, 4.0]])
    assert lgreco_budget(errors, 1, alpha=0.5) == 3.0
    with pytest.raises(ValueError, match="default_index"):
        lgreco_budget(errors, 2)
    with pytest.raises(ValueError, match="num_bins"):
        lgreco_allocate(errors, errors, 10.0, num_bins=0)


def test_feedback_errors_formula_cap_and_checks():
    errors = np.array([[0.0, 0.5, 0.9, 2.0], [0.0, 0.0, 0.0, 0.0]])
    energy = np.array([[2.0, 1.0], [3.0, 0.0]])  # second tensor: nothing to send
    got = feedback_errors(errors, energy)
    # rho = err / ||x||^2, settled error rho / (1 - rho) * ||u||^2, rho capped at 0.99.
    np.testing.assert_allclose(got[0], [0.0, 2.0, 18.0, 2 * 99.0])
    assert np.all(got[1] == 0)
    with pytest.raises(ValueError, match="energy"):
        feedback_errors(errors, energy[:1])
    with pytest.raises(ValueError, match="energy"):
        feedback_errors(errors, -energy)


def test_feedback_errors_predict_the_settled_residual():
    """A codec keeping (1 - a) of x, independent updates: the residual settles where predicted."""
    rng = np.random.default_rng(0)
    a, residual, settled = 0.8, np.zeros(200), []
    for step in range(3000):
        update = rng.standard_normal(200)
        x = update + residual
        residual = a * x  # what the codec lost: rho = a^2 of ||x||^2
        if step > 100:
            settled.append(np.sum(residual**2))
    predicted = feedback_errors(np.array([[a * a * 200.0]]), np.array([[200.0, 200.0]]))[0, 0]
    assert np.mean(settled) == pytest.approx(predicted, rel=0.1)


@pytest.mark.parametrize("lie", [0.0, 1e30, -1.0])
def test_one_table_of_three_moves_no_pooled_cell_outside_the_two_honest_ones(lie):
    """The bound L-GreCo's allocation rests on: pooled by the median, each cell of one client of
    three lies between the honest clients' values whatever it claims (not at the liar's)."""
    from fedlowrank.compression.controller import pooled

    rng = np.random.default_rng(3)
    honest = [rng.random((6, 12)), rng.random((6, 12))]
    out = pooled([*honest, np.full((6, 12), lie)])
    low, high = np.minimum(*honest), np.maximum(*honest)
    assert np.all((out >= low) & (out <= high))
    assert not np.allclose(out, lie)
