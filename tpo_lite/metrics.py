"""Statistics of a run: per-stage stats (written into the DONE markers), per-iteration metrics and memory, the
before/after held-out comparison, and their plain-text tables."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .jsonl import read_json
from .rundir import IterationDir, RunDir
from .stats import mean

if TYPE_CHECKING:
    from .records import Judgement, Pair, PromptSamples


def sample_stats(records: list[PromptSamples]) -> dict:
    """Format stats of the sampled outputs: valid / forced rates, the invalid ones by reason (cut off by the
    token limit, no response marker, empty response), thought and response lengths."""
    ss = [s for r in records for s in r.samples]
    valid = [s for s in ss if s.valid]
    return {
        "n_prompts": len(records),
        "n_samples": len(ss),
        "valid_rate": len(valid) / len(ss) if ss else None,
        "forced_rate": mean(float(s.forced) for s in ss),
        "cut_off_rate": mean(float(s.finish_reason == "length") for s in ss),
        "no_response_marker_rate": mean(float(s.invalid_reason == "no_response_marker") for s in ss),
        "empty_response_rate": mean(float(s.invalid_reason == "empty_response") for s in ss),
        "thought_chars_mean": mean(len(s.thought or "") for s in valid),
        "response_chars_mean": mean(len(s.response or "") for s in valid),
        "output_tokens_mean": mean(len(s.token_ids) for s in ss),
    }


def score_stats(judgements: list[Judgement]) -> dict:
    scores = [x for j in judgements for x in j.scores if x is not None]
    return {"n_judged": len(judgements), "n_scored": len(scores), "mean_score": mean(scores),
            "best_score_mean": mean(max((x for x in j.scores if x is not None), default=None)
                                     for j in judgements)}


def pair_length_stats(pairs: list[Pair], samples: list[PromptSamples]) -> dict:
    """Response lengths (characters) of chosen and rejected -- over pairs whose rejected output is valid, the
    ones length control balances --, output lengths (tokens) of both, and the chosen thought length."""
    by_id = {r.prompt_id: r for r in samples}
    ch, rj, ct, rt, th = [], [], [], [], []
    for p in pairs:
        ss = by_id[p.prompt_id].samples
        c, r = ss[p.chosen_index], ss[p.rejected_index]
        if r.valid:
            ch.append(len(c.response or "")), rj.append(len(r.response or ""))
        ct.append(len(p.chosen_token_ids or c.token_ids))
        rt.append(len(p.rejected_token_ids or r.token_ids))
        th.append(len(c.thought or ""))
    return {"chosen_response_chars": mean(ch), "rejected_response_chars": mean(rj),
            "chosen_tokens": mean(ct), "rejected_tokens": mean(rt), "chosen_thought_chars": mean(th)}


def iteration_metrics(run_dir, t: int) -> dict:
    """Iteration ``t``'s stats: each finished stage's marker (without its bookkeeping) and the held-out and
    validation scores."""
    from .stages import STAGES

    d = RunDir(run_dir).iteration(t)
    m: dict[str, Any] = {"iteration": t}
    for stage in STAGES:
        if d.is_done(stage):
            info = d.read_marker(stage)
            info.pop("stage", None), info.pop("finished_at", None), info.pop("files", None)
            m[stage] = info
    for part, ed in (("heldout", d.heldout), ("validation", d.validation)):
        r = ed.read_result()
        if r is not None:
            m[part] = heldout_stats(r)
    return m


def heldout_stats(result: dict) -> dict:
    """What metrics.json keeps of a held-out or validation result (eval.json)."""
    return {k: result.get(k) for k in ("mean_score", "mean_score_ci", "valid_rate", "n")}


_TABLE_ROWS = [
    ("prompts", ("generate", "n_prompts"), "{:.0f}"),
    ("samples", ("generate", "n_samples"), "{:.0f}"),
    ("valid-format rate", ("generate", "valid_rate"), "{:.1%}"),
    ("forced rate", ("generate", "forced_rate"), "{:.1%}"),
    ("cut-off rate", ("generate", "cut_off_rate"), "{:.1%}"),
    ("no-marker rate", ("generate", "no_response_marker_rate"), "{:.1%}"),
    ("thought chars", ("generate", "thought_chars_mean"), "{:.0f}"),
    ("response chars", ("generate", "response_chars_mean"), "{:.0f}"),
    ("mean score", ("judge", "mean_score"), "{:.3f}"),
    ("pairs kept", ("pairs", "pairs_kept"), "{:.0f}"),
    ("rejected parse failure", ("pairs", "rejected_parse_failure"), "{:.0f}"),
    ("rejected cut off", ("pairs", "rejected_truncated"), "{:.0f}"),
    ("rejected cut to chosen", ("pairs", "rejected_cut_to_chosen"), "{:.0f}"),
    ("length rho", ("pairs", "rho"), "{:.2f}"),
    ("chosen resp chars*", ("pairs", "chosen_response_chars"), "{:.0f}"),
    ("rejected resp chars*", ("pairs", "rejected_response_chars"), "{:.0f}"),
    ("chosen tokens", ("pairs", "chosen_tokens"), "{:.0f}"),
    ("rejected tokens", ("pairs", "rejected_tokens"), "{:.0f}"),
    ("validation score", ("validation", "mean_score"), "{:.3f}"),
    ("held-out score", ("heldout", "mean_score"), "{:.3f}"),
    ("held-out valid rate", ("heldout", "valid_rate"), "{:.1%}"),
]


def _fmt(v, fmt="{:.4g}") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return fmt.format(v)


def format_table(metrics: list[dict]) -> str:
    """Metrics as rows, iterations as columns. Pair-drop reasons and DPO metrics are listed as reported."""
    rows = []
    for label, (sec, key), fmt in _TABLE_ROWS:
        rows.append((label, [_fmt((m.get(sec) or {}).get(key), fmt) for m in metrics]))
    extra_pairs = sorted({k for m in metrics for k, v in (m.get("pairs") or {}).items()
                          if k.startswith("dropped") and isinstance(v, (int, float))})
    for k in extra_pairs:
        rows.append((k.replace("_", " "), [_fmt((m.get("pairs") or {}).get(k), "{:.0f}") for m in metrics]))
    dpo_keys = sorted({k for m in metrics for k, v in ((m.get("train") or {}).get("metrics") or {}).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for k in dpo_keys:
        rows.append((f"dpo {k}", [_fmt(((m.get("train") or {}).get("metrics") or {}).get(k)) for m in metrics]))
    head = ["iteration"] + [str(m["iteration"]) for m in metrics]
    w0 = max(len(r[0]) for r in rows + [(head[0], [])])
    ws = [max([len(head[i + 1])] + [len(r[1][i]) for r in rows]) for i in range(len(metrics))]
    lines = [head[0].ljust(w0) + "  " + "  ".join(h.rjust(w) for h, w in zip(head[1:], ws))]
    lines.append("-" * len(lines[0]))
    for label, vals in rows:
        lines.append(label.ljust(w0) + "  " + "  ".join(v.rjust(w) for v, w in zip(vals, ws)))
    lines.append("* over pairs whose rejected output is valid")
    return "\n".join(lines)


def bootstrap_options(eval_config) -> dict:
    """The keyword arguments of :func:`compare_heldout` that an ``[eval]`` table sets (n_boot, alpha, seed)."""
    return {"n_boot": eval_config.n_boot, "alpha": eval_config.alpha, "seed": eval_config.seed}


def run_bootstrap_options(run_dir) -> dict:
    """:func:`bootstrap_options` of a run directory's resolved config.toml (the settings ``loop.run`` used for its
    held-out change), so a change re-computed later from the run's results is the same; the defaults where the
    directory has no config.toml."""
    from .config import load_config
    from .rundir import RunDir

    f = RunDir(run_dir).config
    return bootstrap_options(load_config(f if f.exists() else None).eval)


def compare_heldout(before: dict, after: dict, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Paired before/after difference of the per-instruction held-out scores, with a bootstrap CI, and where it
    comes from.

    ``format_change`` sums the change over the instructions whose output changed format validity (invalid -> valid
    gains that output's whole score, valid -> invalid loses it); ``both_valid_change`` over those valid before and
    after (better or worse answers in the same format). Both are divided by all ``n``, so they add up to
    ``score_diff``; each has its own paired-bootstrap CI (the same resampled instructions). A model can gain
    only by learning the format: this split says whether its answers improved too. No split when an item lacks
    ``valid`` (a result written before validity was recorded per item).
    """
    from .stats import bootstrap_ci

    a = {r["id"]: r for r in before["items"]}
    b = {r["id"]: r for r in after["items"]}
    ids = [i for i in a if i in b]
    diffs = [b[i]["score"] - a[i]["score"] for i in ids]
    out = {"n": len(ids), "score_diff": mean(diffs), "score_diff_ci": None,
           "valid_rate_before": before.get("valid_rate"), "valid_rate_after": after.get("valid_rate")}
    if not diffs:
        return out
    ci = lambda xs: list(bootstrap_ci(xs, n_boot=n_boot, alpha=alpha, seed=seed))  # noqa: E731
    out["score_diff_ci"] = ci(diffs)
    valid = [(a[i].get("valid"), b[i].get("valid")) for i in ids]
    if any(v is None for pair in valid for v in pair):
        return out
    fmt = [d if va != vb else 0.0 for d, (va, vb) in zip(diffs, valid)]
    both = [d if va and vb else 0.0 for d, (va, vb) in zip(diffs, valid)]
    out.update(format_change=mean(fmt), format_change_ci=ci(fmt),
               both_valid_change=mean(both), both_valid_change_ci=ci(both),
               n_became_valid=sum(not va and vb for va, vb in valid),
               n_became_invalid=sum(va and not vb for va, vb in valid),
               n_both_valid=sum(va and vb for va, vb in valid))
    return out


def format_before_after(before: dict | None, after: dict | None, diff: dict | None) -> str:
    def ci(r):
        lo, hi = r["mean_score_ci"]
        return f"{r['mean_score']:.3f} [{lo:.3f}, {hi:.3f}]"

    judge = (before or after or {}).get("judge", "?")
    what = "mean fraction of checks passed" if judge == "programmatic" else "mean judge score"
    lines = [f"held-out ({judge} judge: {what}; an invalid output scores 0)"]
    conf = (before or after or {}).get("confidence", 0.95)
    lines.append(f"{'':8}{'score (' + format(conf, '.0%') + ' CI)':>26}  {'valid-format':>12}  {'n':>4}")
    for name, r in (("before", before), ("after", after)):
        if r:
            lines.append(f"{name:8}{ci(r):>26}  {r['valid_rate']:>12.1%}  {r['n']:>4}")
    if diff and diff.get("score_diff_ci"):
        lo, hi = diff["score_diff_ci"]
        lines.append(f"{'change':8}{diff['score_diff']:>+12.3f} [{lo:+.3f}, {hi:+.3f}] (paired bootstrap)")
        lines += format_change_split(diff)
    if before and after:
        lines += format_check_shift(before, after)
    return "\n".join(lines)


def format_change_split(diff: dict) -> list[str]:
    """The lines of :func:`compare_heldout`'s split of the change (none for a result without it)."""
    if diff.get("format_change_ci") is None:
        return []
    (flo, fhi), (vlo, vhi) = diff["format_change_ci"], diff["both_valid_change_ci"]
    return [f"{'  format':12}{diff['format_change']:>+8.3f} [{flo:+.3f}, {fhi:+.3f}]  {diff['n_became_valid']} "
            f"output(s) became valid, {diff['n_became_invalid']} invalid",
            f"{'  answers':12}{diff['both_valid_change']:>+8.3f} [{vlo:+.3f}, {vhi:+.3f}]  over the "
            f"{diff['n_both_valid']} valid before and after"]


def check_rates(ev: dict) -> tuple[dict[str, dict], float | None]:
    """An absolute eval's per-check rates by check type (most frequent first, as recorded; empty when it has
    none) and its mean response length in words over valid outputs (None when not recorded)."""
    return ({c["type"]: c for c in ev.get("per_check") or ()},
            (ev.get("model_lengths") or {}).get("response_words_mean"))


def format_check_shift(before: dict, after: dict) -> list[str]:
    """Lines of a before/after table of the verifiable checks passed, per check type (``per_check`` of two
    absolute evals), and the mean response length in words: what moved behind the mean score. Empty when
    either eval has no per-check rates (another eval set, or a result from before they were recorded)."""
    (a, wa), (b, wb) = check_rates(before), check_rates(after)
    if not a or not b:
        return []
    lines = ["", "checks passed, per type (an invalid output passes none)",
             f"{'check':20}{'n':>4}{'before':>9}{'after':>9}{'change':>9}"]
    for t, c in a.items():  # most frequent first, as recorded
        if t in b:
            pa, pb = c["pass_rate"], b[t]["pass_rate"]
            lines.append(f"{t:20}{c['n']:>4}{pa:>9.0%}{pb:>9.0%}{100 * (pb - pa):>+8.0f}%")
    if wa is not None and wb is not None:
        lines.append(f"{'response words':20}{'':>4}{wa:>9.1f}{wb:>9.1f}{wb - wa:>+9.1f}   (mean over valid outputs)")
    return lines


def iteration_memory(d: IterationDir, m: dict, measured: dict) -> dict:
    """Memory records of iteration folder ``d`` by stage: the four stages' from their DONE markers (moved out of
    ``m``), validation / held-out from ``measured`` or, when they were reused, from the previous metrics.json."""
    from .stages import STAGES

    old = (read_json(d.metrics).get("memory") or {}) if d.metrics.exists() else {}
    out = {}
    for stage in STAGES:
        rec = (m.get(stage) or {}).pop("memory", None)
        if rec:
            out[stage] = rec
    for part in ("validation", "heldout"):
        rec = measured.get(part) or old.get(part)
        if rec:
            out[part] = rec
    return out


def run_memory(run: RunDir, all_metrics: list[dict], measured: dict, tracker, stage_processes: bool = False,
               sampling_mmap_threshold: int | None = None) -> dict:
    """summary.json's memory: ``stage_peak_rss_mb``, the largest peak of each stage over the iterations, the
    records of the run-level evaluations (``eval_base``, ``eval_final``) and the run's peak (a resume measures
    only what it ran):

    - in one process: ``run_peak_rss_mb``, the peak RSS of this call of :func:`tpo_lite.loop.run`;
    - with ``loop.stage_processes``: ``driver_peak_rss_mb`` (this process), ``run_peak_rss_mb`` (the largest
      process: what ``/usr/bin/time`` reports) and ``run_peak_total_mb`` = the largest stage peak + the driver's
      private memory at the end (``driver_private_mb``): the most the run held at once, as the driver and one
      stage process are alive together and share the pages of their libraries; ``sampling_mmap_threshold_mb``,
      the glibc mmap threshold of the processes that decoded (None: glibc's own, dynamic).
    """
    from .memory import private_rss_bytes

    old = (run.read_summary() or {}).get("memory") or {}
    this = tracker.record()  # this process
    out: dict[str, Any] = {"method": this["method"]}
    if "peak_cuda_allocated_mb" in this:
        out["run_peak_cuda_allocated_mb"] = this["peak_cuda_allocated_mb"]
    peaks: dict[str, float] = {}
    for m in all_metrics:
        for stage, rec in (m.get("memory") or {}).items():
            if rec.get("peak_rss_mb") is not None:
                peaks[stage] = max(peaks.get(stage, 0.0), rec["peak_rss_mb"])
    for key in ("eval_base", "eval_final"):
        rec = measured.get(key) or old.get(key)
        if rec:
            out[key] = rec
            peaks[key] = rec.get("peak_rss_mb") or 0.0
    out["stage_peak_rss_mb"] = peaks
    out["stage_processes"] = stage_processes
    if not stage_processes:
        out["run_peak_rss_mb"] = this["peak_rss_mb"]
        return out
    private = private_rss_bytes()
    largest = max(peaks.values(), default=0.0)
    out["driver_peak_rss_mb"] = this["peak_rss_mb"]
    out["driver_private_mb"] = None if private is None else round(private / 2**20, 1)
    out["run_peak_rss_mb"] = max(this["peak_rss_mb"], largest)
    out["run_peak_total_mb"] = round(largest + (private or 0) / 2**20, 1)
    out["sampling_mmap_threshold_mb"] = sampling_mmap_threshold / 2**20 if sampling_mmap_threshold else None
    return out
