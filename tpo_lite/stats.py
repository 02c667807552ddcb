"""Statistics for judging and evaluation: win rate, bootstrap CI, Bradley-Terry, length-controlled win rate.

Plain numpy, no scipy. Everything here works on *per-instruction* values: one outcome per instruction
(1 = the model wins, 0.5 = tie, 0 = loss; a probability in [0, 1] is also accepted, e.g. the average of
a pairwise judge's two orders), and bootstrap resampling is over instructions.

Length-controlled win rate (``length_controlled_win_rate``)
-----------------------------------------------------------
We fit a logistic regression of the judge's preference on the standardised length difference,

    P(model preferred | d) = sigmoid(a + b * z),   z = d / sd(d),   d = len_model - len_baseline,

by Firth-penalised maximum likelihood with fractional outcomes (a tie counts as half a win). ``z`` is scaled
but *not* centred, so ``z = 0`` still means "equal length"; ``sigmoid(a)`` is the predicted win rate of a
model whose responses are exactly as long as the baseline's. Firth's penalty keeps the fit finite, and the
intercept sensible, when wins and losses are perfectly separated by length.

Only *valid-vs-valid* comparisons (both responses valid, the outcome a judgement) inform the fit. An outcome
fixed by a format failure (an invalid model output loses, an invalid baseline output wins, both invalid tie)
says nothing about length -- an empty or cut-off response is short *because* it failed -- and keeps its value.
With ``V`` the valid-vs-valid instructions, ``F`` the others and ``n = |V| + |F|``:

    LC = ( sum_{k in F} y_k  +  |V| * sigmoid(a_V) ) / n,

where ``a_V`` is the intercept fitted on ``V`` alone (``z`` standardised by the sd of ``d`` over ``V``): each
valid-vs-valid instruction contributes its predicted outcome at equal length, which with a single length
covariate is ``sigmoid(a_V)`` for all of them. When the fit is not identifiable (``V`` empty, ``d`` constant
over ``V``, or every outcome in ``V`` 0 or every one 1) ``sigmoid(a_V)`` is replaced by the mean outcome over
``V``, so LC is then the plain win rate. The bootstrap CI resamples instructions (with their validity) and
applies the same estimator to each replicate.

How this differs from AlpacaEval 2.0's length-controlled win rate: AlpacaEval fits a GLM per model with
three terms -- the model-vs-baseline identity, ``tanh`` of the standardised length difference and an
instruction-difficulty term whose coefficients are estimated jointly over *many* leaderboard models -- and
reads the prediction with the length term set to zero. Ours has a single covariate (the linear,
standardised length difference), no instruction-difficulty or model terms and is fitted on the one
comparison at hand, so it is a simpler first-order length adjustment; the numbers are not comparable with
AlpacaEval's leaderboard LC values.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = [
    "mean",
    "win_rate",
    "bootstrap_ci",
    "bradley_terry",
    "length_controlled_win_rate",
    "length_controlled_win_rate_ci",
    "summarize_outcomes",
    "student_t_quantile",
    "t_interval",
]


def mean(xs: Iterable[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none (the one mean of run statistics)."""
    kept = [x for x in xs if x is not None]
    return float(np.mean(kept)) if kept else None


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Numerically stable for large |x| (exp never overflows).
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _outcomes_array(outcomes: Sequence[float], name: str = "outcomes") -> np.ndarray:
    arr = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name}: empty; need at least one per-instruction outcome")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"{name}[{bad}]: not a finite number ({arr[bad]!r})")
    if np.any((arr < 0) | (arr > 1)):
        bad = int(np.flatnonzero((arr < 0) | (arr > 1))[0])
        raise ValueError(f"{name}[{bad}]: {arr[bad]!r} is outside [0, 1] (1 = win, 0.5 = tie, 0 = loss)")
    return arr


def win_rate(outcomes: Sequence[float]) -> float:
    """Mean outcome: 1 = win, 0.5 = tie (counts as half a win), 0 = loss; probabilities in [0, 1] allowed."""
    return float(np.mean(_outcomes_array(outcomes)))


def bootstrap_ci(
    values,
    statistic: Callable[[np.ndarray], float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` over instructions.

    ``values`` holds one entry per instruction: a 1-D array, or a 2-D array whose *rows* are instructions
    (so a statistic of several aligned columns, e.g. outcome and two lengths, resamples them together).
    Each of ``n_boot`` replicates draws ``n`` rows with replacement (``numpy.random.default_rng(seed)``, so
    the result is reproducible) and evaluates ``statistic`` on them; the interval is the ``alpha/2`` and
    ``1 - alpha/2`` percentiles of the replicates. Returns ``(lo, hi)``.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError("bootstrap_ci: values is empty; need at least one per-instruction value")
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"bootstrap_ci: alpha must be in (0, 1), got {alpha!r}")
    if int(n_boot) < 1:
        raise ValueError(f"bootstrap_ci: n_boot must be >= 1, got {n_boot!r}")
    n = arr.shape[0]
    rng = np.random.default_rng(seed)
    reps = np.empty(int(n_boot), dtype=np.float64)
    for b in range(int(n_boot)):
        idx = rng.integers(0, n, size=n)
        reps[b] = float(statistic(arr[idx]))
    if not np.all(np.isfinite(reps)):
        raise ValueError("bootstrap_ci: the statistic returned a non-finite value on a resample")
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bradley_terry(
    n_items: int,
    comparisons: Sequence[tuple],
    l2: float = 0.01,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray:
    """Fit Bradley-Terry log-strengths ``theta`` (``P(i beats j) = sigmoid(theta_i - theta_j)``).

    ``comparisons`` is a list of ``(i, j, p)`` or ``(i, j, p, weight)``: ``p`` in [0, 1] is the fraction
    (or probability) of times ``i`` beat ``j`` -- a tie is 0.5, and the two presentation orders of a pair
    can be given as two entries or averaged into one. The fit maximises

        sum_c w_c [p_c log sigmoid(theta_i - theta_j) + (1 - p_c) log sigmoid(theta_j - theta_i)]
        - l2/2 * ||theta||^2

    with Newton's method (the objective is strictly concave for ``l2 > 0``). The ridge is a Gaussian prior
    of variance ``1/l2`` on each log-strength: it keeps the estimate finite under perfect separation
    (an item that won every comparison) and gives items with no comparisons ``theta = 0``. Because every
    comparison's gradient sums to zero over its two items, the optimum satisfies ``sum(theta) = 0``: the
    result is centred at 0. With ``l2 = 0`` the pseudo-inverse is used and the result re-centred each step;
    under perfect separation it then grows until ``max_iter``.
    """
    n = int(n_items)
    if n < 1:
        raise ValueError(f"bradley_terry: n_items must be >= 1, got {n_items!r}")
    if l2 < 0:
        raise ValueError(f"bradley_terry: l2 must be >= 0, got {l2!r}")
    ii, jj, pp, ww = [], [], [], []
    for k, c in enumerate(comparisons):
        if len(c) not in (3, 4):
            raise ValueError(f"bradley_terry: comparisons[{k}] must be (i, j, p) or (i, j, p, weight), got {c!r}")
        i, j, p = int(c[0]), int(c[1]), float(c[2])
        w = float(c[3]) if len(c) == 4 else 1.0
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"bradley_terry: comparisons[{k}]: item index out of range [0, {n}): {c!r}")
        if i == j:
            raise ValueError(f"bradley_terry: comparisons[{k}]: an item cannot be compared with itself: {c!r}")
        if not (0.0 <= p <= 1.0) or not np.isfinite(p):
            raise ValueError(f"bradley_terry: comparisons[{k}]: p={p!r} is outside [0, 1]")
        if not (w >= 0.0) or not np.isfinite(w):
            raise ValueError(f"bradley_terry: comparisons[{k}]: weight={w!r} must be finite and >= 0")
        ii.append(i)
        jj.append(j)
        pp.append(p)
        ww.append(w)
    theta = np.zeros(n, dtype=np.float64)
    if not ii:
        return theta
    ii_a, jj_a = np.asarray(ii), np.asarray(jj)
    p_a, w_a = np.asarray(pp), np.asarray(ww)
    for _ in range(int(max_iter)):
        s = _sigmoid(theta[ii_a] - theta[jj_a])
        r = w_a * (p_a - s)  # d loglik / d(theta_i - theta_j)
        grad = np.zeros(n)
        np.add.at(grad, ii_a, r)
        np.add.at(grad, jj_a, -r)
        grad -= l2 * theta
        h = w_a * s * (1.0 - s)  # information of each comparison
        info = np.zeros((n, n))
        np.add.at(info, (ii_a, ii_a), h)
        np.add.at(info, (jj_a, jj_a), h)
        np.add.at(info, (ii_a, jj_a), -h)
        np.add.at(info, (jj_a, ii_a), -h)
        info[np.diag_indices(n)] += l2
        if l2 > 0:
            step = np.linalg.solve(info, grad)
        else:
            step = np.linalg.pinv(info) @ grad
        theta = theta + step
        if l2 == 0:
            theta -= theta.mean()
        if np.max(np.abs(step)) < tol:
            break
    return theta


def _logistic_fit(y: np.ndarray, z: np.ndarray, max_iter: int = 200) -> tuple[float, float]:
    """Firth-penalised Newton fit of ``y ~ sigmoid(a + b z)`` with fractional ``y``.

    Firth's penalty (a Jeffreys prior, ``+ 1/2 log det I``) keeps both coefficients finite under perfect
    separation (e.g. the judge prefers exactly the longer response). A ridge on the slope alone does not:
    the intercept then absorbs the class imbalance and the "length-controlled" rate overshoots the raw one.
    The modified score is ``X^T (y - p + h (1/2 - p))`` with ``h`` the hat-matrix diagonal.
    """
    x = np.column_stack([np.ones_like(z), z])
    theta = np.zeros(2)
    for _ in range(max_iter):
        p = _sigmoid(x @ theta)
        w = p * (1.0 - p)
        info_inv = np.linalg.inv(x.T @ (x * w[:, None]) + 1e-12 * np.eye(2))
        h = w * np.einsum("ij,jk,ik->i", x, info_inv, x)
        step = info_inv @ (x.T @ (y - p + h * (0.5 - p)))
        biggest = float(np.max(np.abs(step)))
        if biggest > 5.0:  # damp early steps: the penalised likelihood is far from quadratic there
            step *= 5.0 / biggest
        theta += step
        if biggest < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def _lengths(len_model, len_baseline, valid, n: int, who: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lm = np.asarray(len_model, dtype=np.float64).reshape(-1)
    lb = np.asarray(len_baseline, dtype=np.float64).reshape(-1)
    if lm.size != n or lb.size != n:
        raise ValueError(
            f"{who}: {n} outcomes but {lm.size} model lengths and "
            f"{lb.size} baseline lengths; need one of each per instruction"
        )
    if not (np.all(np.isfinite(lm)) and np.all(np.isfinite(lb))):
        raise ValueError(f"{who}: lengths must be finite numbers")
    v = np.ones(n, dtype=bool) if valid is None else np.asarray(valid).reshape(-1).astype(bool)
    if v.size != n:
        raise ValueError(f"{who}: {n} outcomes but {v.size} validity flags; need one per instruction")
    return lm, lb, v


def length_controlled_win_rate(
    outcomes: Sequence[float],
    len_model: Sequence[float],
    len_baseline: Sequence[float],
    valid: Sequence[bool] | None = None,
) -> float:
    """Win rate at zero length difference from a one-covariate logistic fit (see the module docstring).

    ``outcomes[k]`` is the judge's preference for the model on instruction ``k`` (1 win, 0.5 tie, 0 loss
    or a probability), ``len_model[k]`` / ``len_baseline[k]`` the two responses' lengths (any unit, the
    difference is standardised). ``valid[k]`` is True when both responses were valid and the outcome is a
    judgement, False when a format failure fixed it (default: all True). Returns
    ``(sum of the fixed outcomes + n_valid * sigmoid(a_valid)) / n``, ``a_valid`` the intercept fitted on the
    valid-vs-valid instructions only; when that fit is not identifiable (no valid instruction, constant length
    difference, all their outcomes 0 or all 1) their mean outcome stands in for ``sigmoid(a_valid)``.
    """
    y = _outcomes_array(outcomes)
    lm, lb, v = _lengths(len_model, len_baseline, valid, y.size, "length_controlled_win_rate")
    yv = y[v]
    if yv.size == 0:
        return float(np.mean(y))
    mean_v = float(np.mean(yv))
    d = lm[v] - lb[v]
    sd = float(np.std(d))
    if mean_v <= 0.0 or mean_v >= 1.0 or sd == 0.0:
        lc_v = mean_v
    else:
        a, _ = _logistic_fit(yv, d / sd)
        lc_v = float(_sigmoid(np.array([a]))[0])
    return float((np.sum(y[~v]) + yv.size * lc_v) / y.size)


def length_controlled_win_rate_ci(
    outcomes: Sequence[float],
    len_model: Sequence[float],
    len_baseline: Sequence[float],
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    valid: Sequence[bool] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``length_controlled_win_rate``, resampling instructions with their validity
    flags (the same estimator, refitted on each replicate)."""
    y = _outcomes_array(outcomes)
    lm, lb, v = _lengths(len_model, len_baseline, valid, y.size, "length_controlled_win_rate_ci")
    table = np.column_stack([y, lm, lb, v.astype(np.float64)])
    return bootstrap_ci(
        table,
        statistic=lambda t: length_controlled_win_rate(t[:, 0], t[:, 1], t[:, 2], t[:, 3] > 0.5),
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
    )


def summarize_outcomes(
    outcomes: Sequence[float],
    len_model: Sequence[float] | None = None,
    len_baseline: Sequence[float] | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    valid: Sequence[bool] | None = None,
) -> dict:
    """Everything a report needs about one comparison, as a JSON-ready dict.

    Keys: ``n``, ``wins``, ``ties``, ``losses`` (outcome > 0.5, == 0.5, < 0.5), ``win_rate``,
    ``win_rate_ci`` ([lo, hi]); with lengths also ``lc_win_rate``, ``lc_win_rate_ci`` and ``lc_fit_n`` (the
    valid-vs-valid instructions the length fit used; ``valid`` as in :func:`length_controlled_win_rate`).
    """
    y = _outcomes_array(outcomes)
    out = {
        "n": int(y.size),
        "wins": int(np.sum(y > 0.5)),
        "ties": int(np.sum(y == 0.5)),
        "losses": int(np.sum(y < 0.5)),
        "win_rate": float(np.mean(y)),
        "win_rate_ci": list(bootstrap_ci(y, n_boot=n_boot, alpha=alpha, seed=seed)),
    }
    if len_model is not None and len_baseline is not None:
        out["lc_win_rate"] = length_controlled_win_rate(y, len_model, len_baseline, valid=valid)
        out["lc_win_rate_ci"] = list(
            length_controlled_win_rate_ci(y, len_model, len_baseline, n_boot=n_boot, alpha=alpha, seed=seed,
                                          valid=valid)
        )
        out["lc_fit_n"] = int(y.size if valid is None else np.sum(np.asarray(valid, dtype=bool)))
    return out


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) (a continued fraction, modified Lentz; |error| < 1e-13)."""
    import math

    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mode: use the symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def student_t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t distribution with ``df`` degrees of freedom (bisection on its CDF,
    which is an incomplete beta function; no scipy)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"student_t_quantile: p must be in (0, 1), got {p!r}")
    if not df > 0:
        raise ValueError(f"student_t_quantile: df must be > 0, got {df!r}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    upper = lambda t: 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))  # noqa: E731  P(T > t), t >= 0
    lo, hi = 0.0, 1.0
    while upper(hi) > 1.0 - p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if upper(mid) > 1.0 - p else (lo, mid)
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(values: Sequence[float], alpha: float = 0.05) -> dict:
    """Mean, sample standard deviation and the Student-t ``1 - alpha`` interval of the mean of ``values``
    (independent draws, e.g. one number per run of a seeded experiment). With one value the sd and the
    interval are None."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("t_interval: need a non-empty 1-D sequence of values")
    if not np.all(np.isfinite(x)):
        raise ValueError("t_interval: the values must be finite")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"t_interval: alpha must be in (0, 1), got {alpha!r}")
    m = float(np.mean(x))
    if x.size < 2:
        return {"n": 1, "mean": m, "sd": None, "ci": None}
    sd = float(np.std(x, ddof=1))
    half = student_t_quantile(1.0 - alpha / 2.0, x.size - 1) * sd / float(np.sqrt(x.size))
    return {"n": int(x.size), "mean": m, "sd": sd, "ci": [m - half, m + half]}
