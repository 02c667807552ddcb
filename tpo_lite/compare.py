"""Judging a model's outputs: the evaluation judge (:func:`make_eval_judge`: ``[eval_judge]``, else ``[judge]``),
a comparison with a baseline (:func:`compare_outputs`), the absolute score (:func:`absolute_eval`, what
``tpo-lite run`` prints before vs after) and the result files (:func:`write_result`: ``eval.json``, ``eval.md``).

The judge sees the original instruction and the responses only, never a thought; an invalid output counts as a
loss (score 0 in an absolute evaluation). Lengths are in **characters** of the response (or thought), the unit
AlpacaEval uses, because the two sides of a comparison may come from models with different tokenizers.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np

from .errors import TpoError
from .evalsets import EvalItem
from .evaluate import EvalConfig, ModelOutput, align_outputs
from .jsonl import write_json_atomic, write_text_atomic
from .judges.base import Judge
from .stats import mean

_FLOAT_TIE = 1e-6  # relative score difference below which a 'score' comparison is a tie (float rounding)


def eval_judge_config(config):
    """The judge config of evaluations: the run's ``[eval_judge]`` table when it has one, else ``[judge]``."""
    return config.eval_judge if config.eval_judge is not None else config.judge


def _same_judge(a, b) -> bool:
    # The same learned proxy: same kind and the same weights (local model, or the same served model).
    key = lambda c: (c.kind, c.model, c.base_url, c.served_model, c.function)  # noqa: E731
    return key(a) == key(b)


def reward_hacking_warning(config) -> str | None:
    """One warning line when evaluations would be judged by the learned judge (reward model or pairwise LLM)
    the run optimised, else None. The programmatic judge checks the instruction's own verifiable constraints --
    the task's ground truth, not a learned proxy (``capabilities.learned`` is False) -- and never warns."""
    from .judges import judge_class

    cfg = eval_judge_config(config)
    if not judge_class(cfg).capabilities.learned or not _same_judge(cfg, config.judge):
        return None
    what = cfg.model or cfg.function or f"{cfg.served_model} at {cfg.base_url}"
    return (f"warning: evaluating with the {cfg.kind} judge the run optimised ({what}): this measures reward "
            "hacking, not quality; set [eval_judge]")


def _warn(echo: Callable[..., Any], line: str) -> None:
    """Write one warning line through ``echo`` on stderr (``print`` and ``click.echo`` are sent there; any other
    callable, e.g. a test's list.append, just receives the line)."""
    import sys

    if echo is print:
        print(line, file=sys.stderr)
    elif (getattr(echo, "__module__", None) or "").startswith("click"):
        echo(line, err=True)
    else:
        echo(line)


def make_eval_judge(config, cache_path: str | os.PathLike | None = None, echo: Callable[..., Any] | None = None):
    """The evaluation judge (:func:`eval_judge_config`), cached in ``cache_path`` unless its config names
    another cache; warns through ``echo`` when it is the learned judge the run optimised."""
    from .judges import make_judge

    line = reward_hacking_warning(config)
    if line and echo is not None:
        _warn(echo, line)
    return make_judge(eval_judge_config(config), cache_path=cache_path)


def _score(judge, item: EvalItem, responses: list[str]) -> list[float | None]:
    # An EvalItem carries .instruction and .checks like tpo_lite.instructions.Instruction, which is all a judge
    # reads (tpo_lite.judges.base.instruction_text / instruction_checks): the original instruction, never a prompt.
    res = judge.score(item, responses)
    scores = list(res.scores)
    if len(scores) != len(responses):
        raise TpoError(f"judge {judge.name} returned {len(scores)} scores for {len(responses)} responses")
    for s in scores:
        if s is not None and not math.isfinite(float(s)):
            raise TpoError(f"judge {judge.name} returned a non-finite score ({s}) for {item.id}")
    return [None if s is None else float(s) for s in scores]


def _comparison_mode(judge: Judge, requested: str) -> str:
    caps = judge.capabilities
    if requested == "pairwise" and not caps.compares_pairs:
        raise TpoError(f"judge {judge.name} cannot compare two responses; use comparison = 'score'",
                       field="comparison")
    if requested != "auto":
        return requested
    # A reward model can also compare (sigmoid of the score difference), but its native output is a score; a
    # judge whose scores are relative within one call (Bradley-Terry) is asked to compare.
    return "score" if caps.scores_absolute else "pairwise"


def _length_stats(outputs: Sequence[ModelOutput]) -> dict:
    from .judges.checks import count_words

    valid = [o for o in outputs if o.valid]
    return {
        "response_chars_mean": mean(len(o.response) for o in valid),
        "response_words_mean": mean(count_words(o.response) for o in valid),
        "thought_chars_mean": mean(len(o.thought) for o in valid),
        "n_valid": len(valid),
        "invalid_rate": 1.0 - len(valid) / len(outputs) if outputs else None,
        "forced_rate": mean(float(o.forced) for o in outputs),
        "n_retried": sum(1 for o in outputs if o.tries > 1),  # had a format error and were re-sampled
        "n_invalid": len(outputs) - len(valid),  # still invalid after every try
    }


def check_pass_rates(items: Sequence[EvalItem], outputs: Sequence[ModelOutput]) -> list[dict]:
    """Per check type, how many of the instructions' verifiable checks the responses pass (an invalid output
    passes none): ``[{"type", "n", "passed", "pass_rate"}]``, most frequent type first; ``[]`` when no item has
    checks. Computed from the checks themselves, whatever the judge, so it shows *which* constraints a model
    learned to meet (or stopped meeting) behind a mean score: e.g. a model that learns to be short gains on
    ``max_words`` and loses on ``min_words``."""
    from .judges.checks import run_check

    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for it, o in zip(items, outputs):
        for c in it.checks or ():
            t = by_type[c["type"]]
            t[0] += 1
            t[1] += int(o.valid and run_check(c, o.response)["passed"])
    return [{"type": k, "n": n, "passed": p, "pass_rate": p / n}
            for k, (n, p) in sorted(by_type.items(), key=lambda kv: (-kv[1][0], kv[0]))]


def _by_category(rows: list[dict]) -> list[tuple[str, list[int]]]:
    """(category, the indices of its rows), by category."""
    by_cat: dict[str, list[int]] = defaultdict(list)
    for k, r in enumerate(rows):
        by_cat[r["category"]].append(k)
    return sorted(by_cat.items())


def compare_outputs(items: Sequence[EvalItem], model: Sequence[ModelOutput], baseline: Sequence[ModelOutput], judge,
                    ecfg: EvalConfig | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Judge ``model`` against ``baseline`` on ``items`` (all three aligned by :func:`align_outputs`).

    Per instruction the outcome is 1 (model wins), 0.5 (tie) or 0 (loss), by ``ecfg.comparison``: ``score`` --
    the score difference of the two responses (a tie within ``tie_margin``); ``pairwise`` -- a judge whose
    ``capabilities.compares_pairs``, asked in both orders: the mean of ``p(model wins)``, with the position bias
    (how often the *first* response is preferred; 0.5 = none) and the order-consistency rate. An invalid model
    output loses without being judged; an invalid baseline output loses likewise; both invalid is a tie. Only
    valid-vs-valid instructions (items' ``length_fit``) inform the length-controlled win rate
    (:func:`tpo_lite.stats.length_controlled_win_rate`). Returns the JSON-ready summary: win rate (ties as
    half), LC win rate, bootstrap CIs resampling instructions, per category, lengths, invalid rate, format-retry
    counts, and a per-item list under ``"items"``.
    """
    from .stats import summarize_outcomes

    ecfg = ecfg or EvalConfig()
    model = align_outputs(items, model, what=f"outputs of {model[0].generator if model else 'the model'}")
    baseline = align_outputs(items, baseline, what=f"outputs of {baseline[0].generator if baseline else 'the baseline'}")
    mode = _comparison_mode(judge, ecfg.comparison)
    rows, first_pos, consistent = [], [], []
    for k, (it, m, b) in enumerate(zip(items, model, baseline)):
        row = {"id": it.id, "category": it.category, "model_valid": m.valid, "baseline_valid": b.valid,
               "model_chars": len(m.response), "baseline_chars": len(b.response),
               "model_thought_chars": len(m.thought)}
        row["length_fit"] = m.valid and b.valid
        if not m.valid or not b.valid:
            outcome = 0.5 if (not m.valid and not b.valid) else (0.0 if not m.valid else 1.0)
            row["judged"] = False
        elif m.response == b.response:  # the same answer is a tie by definition; no judge noise can break it
            outcome = 0.5
            row.update(judged=False, identical=True)
        elif mode == "score":
            sm, sb = _score(judge, it, [m.response, b.response])
            row.update(model_score=sm, baseline_score=sb, judged=True)
            if sm is None or sb is None:  # the judge itself rejected a response: treat like an invalid output
                outcome = 0.5 if sm is None and sb is None else (0.0 if sm is None else 1.0)
                row["length_fit"] = False
            else:
                # Float noise (batched reward-model forwards differ in the last bits) must not decide a winner:
                # differences within 1e-6 relative to the scores count as equal.
                d = sm - sb
                margin = ecfg.tie_margin + _FLOAT_TIE * max(1.0, abs(sm), abs(sb))
                outcome = 1.0 if d > margin else (0.0 if d < -margin else 0.5)
        else:
            p_ab = float(judge.compare(it, m.response, b.response))
            p_ba = float(judge.compare(it, b.response, m.response))
            for p in (p_ab, p_ba):
                if not (0.0 <= p <= 1.0):
                    raise TpoError(f"judge {judge.name} returned p={p} outside [0, 1] for {it.id}")
            outcome = (p_ab + (1.0 - p_ba)) / 2.0
            first_pos.append((p_ab + p_ba) / 2.0)
            # Same winner from the model's side in both orders (a tie in both counts as consistent).
            consistent.append(float(np.sign(p_ab - 0.5) == np.sign(0.5 - p_ba)))
            row.update(p_model_first=p_ab, p_baseline_first=p_ba, judged=True)
        row["outcome"] = outcome
        rows.append(row)
        if progress:
            progress(k + 1, len(items))
    outcomes = [r["outcome"] for r in rows]
    summary = summarize_outcomes(outcomes, [r["model_chars"] for r in rows], [r["baseline_chars"] for r in rows],
                                 n_boot=ecfg.n_boot, alpha=ecfg.alpha, seed=ecfg.seed,
                                 valid=[r["length_fit"] for r in rows])
    per_cat = []
    for cat, idx in _by_category(rows):
        s = summarize_outcomes([outcomes[k] for k in idx], n_boot=ecfg.n_boot, alpha=ecfg.alpha, seed=ecfg.seed)
        per_cat.append({"category": cat, "n": s["n"], "win_rate": s["win_rate"], "win_rate_ci": s["win_rate_ci"],
                        "wins": s["wins"], "ties": s["ties"], "losses": s["losses"]})
    result = {
        "kind": "pairwise",
        "model": model[0].generator,
        "baseline": baseline[0].generator,
        "judge": judge.name,
        "comparison": mode,
        "confidence": 1.0 - ecfg.alpha,
        **summary,
        "per_category": per_cat,
        "model_lengths": _length_stats(model),
        "baseline_lengths": _length_stats(baseline),
        "invalid_rate": _length_stats(model)["invalid_rate"],
        "position_bias": None,
        "items": rows,
    }
    if mode == "pairwise":
        result["position_bias"] = {
            "first_position_preferred": mean(first_pos),  # 0.5 = no bias
            "order_consistency": mean(consistent),
            "n_judged": len(first_pos),
        }
    return result


def absolute_eval(items: Sequence[EvalItem], outputs: Sequence[ModelOutput], judge,
                  ecfg: EvalConfig | None = None, invalid_score: float = 0.0) -> dict:
    """Mean judge score of ``outputs`` on ``items`` with a bootstrap CI (resampling instructions).

    Meant for the programmatic judge, whose score is the fraction of an instruction's checks passed (0..1): an
    invalid output scores ``invalid_score`` (0 = the worst possible), so a model cannot gain by failing the
    format. Returns ``{"kind": "absolute", "mean_score", "mean_score_ci", "valid_rate", "per_category", ...}``.
    """
    from .stats import bootstrap_ci

    ecfg = ecfg or EvalConfig()
    outputs = align_outputs(items, outputs, what=f"outputs of {outputs[0].generator if outputs else 'the model'}")
    rows = []
    for it, o in zip(items, outputs):
        s = _score(judge, it, [o.response])[0] if o.valid else None
        rows.append({"id": it.id, "category": it.category, "valid": o.valid,
                     "score": invalid_score if s is None else s, "judge_score": s,
                     "response_chars": len(o.response), "thought_chars": len(o.thought)})
    scores = np.array([r["score"] for r in rows], dtype=np.float64)
    per_cat = []
    for cat, idx in _by_category(rows):
        v = scores[idx]
        per_cat.append({"category": cat, "n": int(v.size), "mean_score": float(v.mean()),
                        "mean_score_ci": list(bootstrap_ci(v, n_boot=ecfg.n_boot, alpha=ecfg.alpha, seed=ecfg.seed))})
    lengths = _length_stats(outputs)
    return {
        "kind": "absolute",
        "model": outputs[0].generator,
        "judge": judge.name,
        "confidence": 1.0 - ecfg.alpha,
        "n": len(rows),
        "mean_score": float(scores.mean()),
        "mean_score_ci": list(bootstrap_ci(scores, n_boot=ecfg.n_boot, alpha=ecfg.alpha, seed=ecfg.seed)),
        "valid_rate": 1.0 - lengths["invalid_rate"],
        "invalid_rate": lengths["invalid_rate"],
        "model_lengths": lengths,
        "per_category": per_cat,
        "per_check": check_pass_rates(items, outputs),
        "items": rows,
    }


# ----------------------------------------------------------------------------------------------------------------
# Writing results
# ----------------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "n/a" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _retry_line(lengths: dict, n: int) -> str:
    return (f"- Format retries: {lengths.get('n_retried', 0)} of {n} outputs had a format error and were re-sampled; "
            f"{lengths.get('n_invalid', 0)} stayed invalid")


def render_markdown(result: dict, decoding: dict | None = None) -> str:
    """A human-readable Markdown version of a :func:`compare_outputs` / :func:`absolute_eval` result."""
    conf = int(round(100 * result.get("confidence", 0.95)))
    lines = []
    if result["kind"] == "absolute":
        lines += [f"# Absolute evaluation: {result['model']}", "",
                  f"Judge: `{result['judge']}`, {result['n']} instructions.", "",
                  f"- Mean score: **{result['mean_score']:.3f}** ({conf}% CI [{result['mean_score_ci'][0]:.3f}, "
                  f"{result['mean_score_ci'][1]:.3f}]); invalid outputs score 0",
                  f"- Valid-format rate: {_pct(result['valid_rate'])}"]
        ml = result["model_lengths"]
        lines.append(_retry_line(ml, result["n"]))
        lines += [f"- Mean response length: {_num(ml['response_chars_mean'])} chars; mean thought length: "
                  f"{_num(ml['thought_chars_mean'])} chars (valid outputs)", "",
                  "| category | n | mean score | CI |", "|---|---:|---:|---|"]
        for c in result["per_category"]:
            lines.append(f"| {c['category']} | {c['n']} | {c['mean_score']:.3f} | "
                         f"[{c['mean_score_ci'][0]:.3f}, {c['mean_score_ci'][1]:.3f}] |")
        if result.get("per_check"):
            lines += ["", "| check | n | passed |", "|---|---:|---:|"]
            lines += [f"| {c['type']} | {c['n']} | {_pct(c['pass_rate'])} |" for c in result["per_check"]]
    else:
        lines += [f"# {result['model']} vs {result['baseline']}", "",
                  f"Judge: `{result['judge']}` ({result['comparison']} comparison), {result['n']} instructions.", "",
                  f"- Win rate (ties count half): **{_pct(result['win_rate'])}** ({conf}% CI "
                  f"{_ci(result['win_rate_ci'])}); {result['wins']} wins, {result['ties']} ties, "
                  f"{result['losses']} losses",
                  f"- Length-controlled win rate: {_pct(result.get('lc_win_rate'))} ({conf}% CI "
                  f"{_ci(result.get('lc_win_rate_ci'))})",
                  f"- Invalid-format rate of {result['model']}: {_pct(result['invalid_rate'])} (each counts as a loss)",
                  _retry_line(result["model_lengths"], result["n"])]
        pb = result.get("position_bias")
        if pb:
            lines.append(f"- Position bias: the first-shown response is preferred "
                         f"{_pct(pb['first_position_preferred'])} of the time (50% = unbiased); the two orders agree "
                         f"on {_pct(pb['order_consistency'])} of instructions")
        lines += ["", "| | mean response chars | mean thought chars | invalid rate |", "|---|---:|---:|---:|"]
        for who, key in ((result["model"], "model_lengths"), (result["baseline"], "baseline_lengths")):
            ml = result[key]
            lines.append(f"| {who} | {_num(ml['response_chars_mean'])} | {_num(ml['thought_chars_mean'])} | "
                         f"{_pct(ml['invalid_rate'])} |")
        lines += ["", "| category | n | win rate | CI | W / T / L |", "|---|---:|---:|---|---|"]
        for c in result["per_category"]:
            lines.append(f"| {c['category']} | {c['n']} | {_pct(c['win_rate'])} | {_ci(c['win_rate_ci'])} | "
                         f"{c['wins']} / {c['ties']} / {c['losses']} |")
    if decoding:
        lines += ["", "Decoding: " + ", ".join(f"{k}={v}" for k, v in decoding.items())]
    return "\n".join(lines) + "\n"


def write_result(out_dir, result: dict, decoding: dict | None = None) -> tuple[str, str]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir`` (an :class:`~tpo_lite.rundir.EvalDir` or its path);
    returns both paths."""
    from .rundir import EvalDir

    out = out_dir if isinstance(out_dir, EvalDir) else EvalDir(out_dir)
    out.path.mkdir(parents=True, exist_ok=True)
    if decoding:
        result = {**result, "decoding": decoding}
    write_json_atomic(out.result, result)
    write_text_atomic(out.markdown, render_markdown(result, decoding))
    return str(out.result), str(out.markdown)


def decoding_record(ecfg: EvalConfig, sampling_cfg=None) -> dict:
    """The decoding settings as written into eval.json, so a result says how its outputs were produced.

    ``sampling_cfg`` (the run's SamplingConfig) supplies the token limit when ``ecfg.max_new_tokens`` is 0.
    """
    limit = ecfg.max_new_tokens or (sampling_cfg.max_new_tokens if sampling_cfg is not None else None)
    budget = ecfg.response_budget or (sampling_cfg.response_budget if sampling_cfg is not None else None)
    return {"temperature": ecfg.temperature, "greedy": ecfg.temperature == 0,
            "top_p": ecfg.top_p if ecfg.temperature > 0 else 1.0, "max_new_tokens": limit,
            "response_budget": budget, "seed": ecfg.seed, "format_retries": ecfg.format_retries,
            "retry_temperature": ecfg.retry_temperature, "retry_top_p": ecfg.retry_top_p}
