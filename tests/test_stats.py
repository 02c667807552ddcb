"""Statistics on constructed data with known answers."""
import itertools

import numpy as np
import pytest

from tpo_lite.stats import (
    bootstrap_ci,
    bradley_terry,
    length_controlled_win_rate,
    length_controlled_win_rate_ci,
    summarize_outcomes,
    win_rate,
)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_win_rate_counts_ties_as_half():
    assert win_rate([1, 1, 0, 0.5]) == pytest.approx(2.5 / 4)
    assert win_rate([0.5] * 7) == 0.5
    assert win_rate([1]) == 1.0


@pytest.mark.parametrize("bad", [[], [1.2], [-0.1], [float("nan")]])
def test_win_rate_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        win_rate(bad)


def test_bootstrap_ci_matches_hand_computed_percentiles():
    values = np.array([0.0, 1.0, 1.0, 0.5, 0.0])
    lo, hi = bootstrap_ci(values, n_boot=500, alpha=0.1, seed=3)
    # Recompute the same replicates independently.
    rng = np.random.default_rng(3)
    reps = [values[rng.integers(0, 5, size=5)].mean() for _ in range(500)]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])))
    # Deterministic given the seed.
    assert bootstrap_ci(values, n_boot=500, alpha=0.1, seed=3) == (lo, hi)


def test_bootstrap_ci_covers_truth_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    p = 0.7
    covered = 0
    trials = 60
    for t in range(trials):
        x = (rng.random(200) < p).astype(float)
        lo, hi = bootstrap_ci(x, n_boot=400, seed=t)
        covered += lo <= p <= hi
    # Nominal 95%; with 60 trials anything >= 50 is consistent and a broken CI would fail badly.
    assert covered >= 50
    widths = []
    for n in (50, 400, 3200):
        x = (rng.random(n) < p).astype(float)
        lo, hi = bootstrap_ci(x, n_boot=400, seed=1)
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # Width ~ 2*1.96*sqrt(p(1-p)/n).
    assert widths[2] == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 3200), rel=0.25)


def test_bootstrap_ci_resamples_rows_of_2d_values():
    table = np.column_stack([np.arange(10.0), np.arange(10.0) * 2])
    lo, hi = bootstrap_ci(table, statistic=lambda t: float(np.mean(t[:, 1] - 2 * t[:, 0])), n_boot=50)
    assert lo == hi == 0.0  # rows stay aligned


def test_bradley_terry_recovers_known_strengths():
    rng = np.random.default_rng(1)
    true = np.array([-1.5, -0.5, 0.0, 0.7, 1.3])
    comps = []
    for i, j in itertools.combinations(range(5), 2):
        wins = rng.binomial(400, _sig(true[i] - true[j]))
        comps.append((i, j, wins / 400, 400.0))
    theta = bradley_terry(5, comps, l2=1e-6)
    assert theta.sum() == pytest.approx(0.0, abs=1e-8)
    np.testing.assert_allclose(theta, true - true.mean(), atol=0.15)


def test_bradley_terry_exact_two_item_solution_and_orders_average():
    # Two items, p = 0.8 with no ridge: theta_0 - theta_1 = logit(0.8), centred.
    d = np.log(0.8 / 0.2)
    theta = bradley_terry(2, [(0, 1, 0.8)], l2=0.0)
    np.testing.assert_allclose(theta, [d / 2, -d / 2], atol=1e-9)
    # The same information given as both presentation orders.
    theta2 = bradley_terry(2, [(0, 1, 0.9), (1, 0, 0.3)], l2=0.0)
    np.testing.assert_allclose(theta2, theta, atol=1e-9)


def test_bradley_terry_ridge_matches_float64_optimum():
    # Ridge case: check the stationarity condition of the penalised likelihood directly.
    comps = [(0, 1, 1.0), (1, 2, 1.0), (0, 2, 0.5), (2, 3, 0.25)]
    l2 = 0.1
    theta = bradley_terry(4, comps, l2=l2)
    grad = -l2 * theta
    for i, j, p in comps:
        r = p - _sig(theta[i] - theta[j])
        grad[i] += r
        grad[j] -= r
    np.testing.assert_allclose(grad, 0.0, atol=1e-9)


def test_bradley_terry_finite_under_perfect_separation_and_ties():
    theta = bradley_terry(3, [(0, 1, 1.0), (1, 2, 1.0), (0, 2, 1.0)])
    assert np.all(np.isfinite(theta))
    assert theta[0] > theta[1] > theta[2]
    ties = bradley_terry(3, [(0, 1, 0.5), (1, 2, 0.5), (0, 2, 0.5)])
    np.testing.assert_allclose(ties, 0.0, atol=1e-12)
    # An item never compared stays at 0.
    assert bradley_terry(3, [(0, 1, 1.0)])[2] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [[(0, 0, 0.5)], [(0, 5, 0.5)], [(0, 1, 1.5)], [(0, 1)]])
def test_bradley_terry_rejects_bad_comparisons(bad):
    with pytest.raises(ValueError):
        bradley_terry(3, bad)


def test_lc_equals_plain_win_rate_when_lengths_equal():
    out = [1, 0, 0.5, 1, 1, 0]
    assert length_controlled_win_rate(out, [10] * 6, [10] * 6) == pytest.approx(win_rate(out))
    # Constant difference: the length effect is not identifiable, plain win rate.
    assert length_controlled_win_rate(out, [15] * 6, [10] * 6) == pytest.approx(win_rate(out))


def test_lc_equals_win_rate_when_length_is_uninformative_and_symmetric():
    # Length differences symmetric around zero and outcomes independent of them: the slope is 0 and
    # sigmoid(a) is the mean (Firth's penalty shrinks it toward 0.5 by O(1/n): 0.600 vs 0.625 at n = 8).
    out = np.tile([1, 0, 1, 0, 1, 1, 0.5, 0.5], 50)
    d = np.tile([3, 3, -3, -3, 5, -5, 1, -1], 50) * 1.0
    # Outcomes paired so that sum((y - mean) * z) == 0: the slope's score equation holds at b = 0.
    lc = length_controlled_win_rate(out, 100 + d, np.full(out.size, 100.0))
    assert lc == pytest.approx(win_rate(out), abs=2e-3)
    assert lc <= win_rate(out)


def test_lc_removes_pure_length_bias():
    rng = np.random.default_rng(0)
    n = 4000
    d = rng.normal(loc=40.0, scale=30.0, size=n)  # the model is usually longer
    z = d / d.std()
    p = _sig(0.0 + 1.5 * z)  # the judge only likes length: no quality difference
    out = (rng.random(n) < p).astype(float)
    raw = win_rate(out)
    lc = length_controlled_win_rate(out, 200 + d, np.full(n, 200.0))
    assert raw > 0.75
    assert lc == pytest.approx(0.5, abs=0.04)


def test_lc_recovers_known_intercept():
    rng = np.random.default_rng(2)
    n = 4000
    d = rng.normal(loc=-20.0, scale=20.0, size=n)  # the model is usually shorter
    z = d / d.std()
    p = _sig(1.0 + 0.8 * z)
    out = (rng.random(n) < p).astype(float)
    lc = length_controlled_win_rate(out, 100 + d, np.full(n, 100.0))
    assert lc == pytest.approx(_sig(1.0), abs=0.03)
    assert win_rate(out) < lc  # shorter answers hide quality from a length-loving judge


def test_lc_finite_under_separation_and_ci():
    out = [1, 1, 1, 0, 0, 0]
    lm = [30, 31, 32, 10, 11, 12]
    lb = [20] * 6
    lc = length_controlled_win_rate(out, lm, lb)
    assert 0.0 < lc < 1.0
    lo, hi = length_controlled_win_rate_ci(out, lm, lb, n_boot=200)
    assert 0.0 <= lo <= hi <= 1.0


def test_lc_mismatched_lengths_refused():
    with pytest.raises(ValueError, match="3 outcomes but 2 model lengths"):
        length_controlled_win_rate([1, 0, 1], [1, 2], [1, 2, 3])


def test_summarize_outcomes():
    s = summarize_outcomes([1, 0.5, 0, 1], [10, 20, 30, 40], [10, 10, 10, 10], n_boot=100)
    assert (s["n"], s["wins"], s["ties"], s["losses"]) == (4, 2, 1, 1)
    assert s["win_rate"] == pytest.approx(0.625)
    assert s["win_rate_ci"][0] <= 0.625 <= s["win_rate_ci"][1]
    assert "lc_win_rate" in s and len(s["lc_win_rate_ci"]) == 2


def test_lc_win_rate_under_perfect_separation_stays_below_raw():
    # The judge prefers exactly the longer response and the model is longer 3 times in 4: the raw win rate
    # (0.75) is all length. The controlled rate must move toward 0.5, not overshoot the raw rate.
    d = np.concatenate([np.arange(1, 21)[np.arange(90) % 20], -np.arange(1, 21)[np.arange(30) % 20]]).astype(float)
    out = (d > 0).astype(float)
    lc = length_controlled_win_rate(out, 100 + d, np.full(d.size, 100.0))
    assert win_rate(out) == pytest.approx(0.75)
    assert 0.5 <= lc < 0.65


# The constructed case of the issue: 6 valid-vs-valid comparisons where length says nothing (wins and losses at
# +-30 chars, ties at +-10: win rate 0.5, LC 0.5) and 2 invalid model outputs (empty response: 0 chars vs 100),
# which lose by rule. Raw win rate 0.375; fitting the length model on all 8 blamed the two format failures on
# shortness and reported LC 0.474.
_Y = [1, 1, 0, 0, 0.5, 0.5, 0, 0]
_LM = [130, 70, 130, 70, 110, 90, 0, 0]
_LB = [100] * 8
_VALID = [True] * 6 + [False] * 2


def test_lc_keeps_invalid_losses_and_fits_length_on_valid_pairs_only():
    assert win_rate(_Y) == pytest.approx(0.375)
    assert length_controlled_win_rate(_Y[:6], _LM[:6], _LB[:6]) == pytest.approx(0.5)
    # LC = (sum of the fixed outcomes + n_valid * LC of the valid-vs-valid fit) / n = (0 + 0 + 6 * 0.5) / 8
    assert length_controlled_win_rate(_Y, _LM, _LB, valid=_VALID) == pytest.approx(0.375)
    # An invalid *baseline* output is a win by rule and stays one; both invalid is a tie.
    y = _Y + [1, 0.5]
    lm, lb = _LM + [40, 0], _LB + [0, 0]
    assert length_controlled_win_rate(y, lm, lb, valid=_VALID + [False, False]) == pytest.approx((3 + 1 + 0.5) / 10)
    # No valid-vs-valid comparison: nothing to adjust, the plain win rate.
    assert length_controlled_win_rate([0, 1, 0.5], [0, 5, 0], [5, 0, 0], valid=[False] * 3) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="3 outcomes but 2 validity flags"):
        length_controlled_win_rate([1, 0, 1], [1, 2, 3], [1, 2, 3], valid=[True, False])


def test_lc_ci_resamples_the_same_estimator():
    y, lm, lb, valid = (np.array(a, dtype=float) for a in (_Y, _LM, _LB, _VALID))
    lo, hi = length_controlled_win_rate_ci(y, lm, lb, valid=valid, n_boot=300, alpha=0.1, seed=4)
    rng = np.random.default_rng(4)
    reps = []
    for _ in range(300):
        idx = rng.integers(0, 8, size=8)
        reps.append(length_controlled_win_rate(y[idx], lm[idx], lb[idx], valid=valid[idx].astype(bool)))
    assert (lo, hi) == pytest.approx(tuple(np.quantile(reps, [0.05, 0.95])))
    s = summarize_outcomes(_Y, _LM, _LB, valid=_VALID, n_boot=300, alpha=0.1, seed=4)
    assert s["lc_win_rate"] == pytest.approx(0.375) and s["lc_win_rate_ci"] == pytest.approx([lo, hi])
    assert s["lc_fit_n"] == 6
