"""Length control (paper Sec. 2.3): per instruction, over its VALID outputs,

    score' = z(score) - rho * z(length),     z(x) = (x - mean) / std   (population std; z = 0 if std = 0)

so that among equally good responses the shorter one wins, which stops DPO from teaching "longer is better"
(LLM judges and reward models prefer length). ``rho`` is a number or ``"auto"``: the smallest ``rho`` on a
grid over [0, 0.5] that makes the chosen responses *on average no longer* than the rejected ones over the
whole iteration (:func:`auto_rho`).

Length unit: the response (never the thought) measured in **words** (``len(response.split())``) by default;
``"chars"`` counts characters and ``"tokens"`` counts tokens of a given tokenizer (without special tokens).
Only the response is length-controlled because only the response is judged.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["LENGTH_UNITS", "response_length", "zscores", "adjusted_scores", "best_and_worst", "auto_rho",
           "rho_grid"]

LENGTH_UNITS = ("words", "chars", "tokens")


def response_length(response: str | None, unit: str = "words", tokenizer: Any = None) -> int:
    """Length of one response in ``unit`` (``None`` -- an invalid sample -- has length 0)."""
    if response is None:
        return 0
    if unit == "words":
        return len(response.split())
    if unit == "chars":
        return len(response)
    if unit == "tokens":
        if tokenizer is None:
            raise ValueError("length unit 'tokens' needs a tokenizer")
        return len(tokenizer.encode(response, add_special_tokens=False))
    raise ValueError(f"unknown length unit {unit!r}; use one of {', '.join(LENGTH_UNITS)}")


def zscores(values: Sequence[float]) -> np.ndarray:
    """Standard scores with the population std; all zeros when the values have no spread."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x
    sd = float(x.std())
    # A spread at rounding level is no spread: z would only amplify noise.
    if sd <= 1e-12 * max(1.0, float(np.abs(x).max())):
        return np.zeros_like(x)
    return (x - x.mean()) / sd


def adjusted_scores(scores: Sequence[float | None], lengths: Sequence[float], rho: float) -> list[float | None]:
    """``z(score) - rho * z(length)`` over the valid entries (score not ``None``); ``None`` stays ``None``."""
    if len(scores) != len(lengths):
        raise ValueError(f"{len(scores)} scores but {len(lengths)} lengths")
    valid = [i for i, s in enumerate(scores) if s is not None]
    out: list[float | None] = [None] * len(scores)
    if not valid:
        return out
    zs = zscores([scores[i] for i in valid])
    zl = zscores([lengths[i] for i in valid])
    for k, i in enumerate(valid):
        out[i] = float(zs[k] - rho * zl[k])
    return out


def best_and_worst(adjusted: Sequence[float | None]) -> tuple[int, int] | None:
    """Indices of the highest and the lowest adjusted *valid* sample (``None`` entries are skipped).

    Whether an invalid output becomes the rejected one instead is decided by :func:`tpo_lite.pairs.select_pairs`
    over the whole iteration. Ties are broken by the lower index; with a single valid sample both indices are
    the same. ``None`` when nothing is valid.
    """
    valid = [i for i, a in enumerate(adjusted) if a is not None]
    if not valid:
        return None
    best = max(valid, key=lambda i: (adjusted[i], -i))
    worst = min(valid, key=lambda i: (adjusted[i], i))
    return best, worst


def rho_grid(step: float = 0.01, hi: float = 0.5) -> np.ndarray:
    """The ``rho = auto`` search grid: 0, step, 2*step, ..., hi."""
    n = int(round(hi / step))
    return np.round(np.linspace(0.0, hi, n + 1), 10)


def auto_rho(groups: Sequence[tuple[Sequence[float | None], Sequence[float]]],
             keep: Callable[[Sequence[float | None], int, int], bool] | None = None,
             grid: Sequence[float] | None = None) -> tuple[float, bool]:
    """Smallest ``rho`` on ``grid`` whose pairs have mean chosen length <= mean rejected length.

    ``groups`` holds ``(scores, lengths)`` per instruction (``None`` score = invalid). The length comparison
    is over the valid-vs-valid pairs (an invalid output has no response length).
    ``keep(scores, chosen, rejected)`` applies the same drop rules as pair selection. Returns
    ``(rho, satisfied)``; when no grid value satisfies the condition the largest is returned with
    ``satisfied = False``; when no pair has two valid samples the condition holds trivially at 0.
    """
    grid = rho_grid() if grid is None else np.asarray(grid, dtype=np.float64)
    for rho in grid:
        chosen_len, rejected_len = [], []
        for scores, lengths in groups:
            bw = best_and_worst(adjusted_scores(scores, lengths, float(rho)))
            if bw is None:
                continue
            c, r = bw
            if scores[r] is None or c == r:
                continue
            if keep is not None and not keep(scores, c, r):
                continue
            chosen_len.append(lengths[c])
            rejected_len.append(lengths[r])
        if not chosen_len or np.mean(chosen_len) <= np.mean(rejected_len):
            return float(rho), True
    return float(grid[-1]), False
