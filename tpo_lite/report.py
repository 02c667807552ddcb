"""`tpo-lite report`: PNG plots and a Markdown summary of one or more run directories.

What is read (all optional; a plot whose data is missing says so instead of failing):

* ``RUN/iter_XX/metrics.json`` (written by :mod:`tpo_lite.loop`): ``generate.valid_rate``, ``generate.forced_rate``,
  ``generate.thought_chars_mean``, ``generate.response_chars_mean``, ``judge.mean_score``,
  ``pairs.chosen_response_chars`` / ``pairs.rejected_response_chars``;
* ``RUN/iter_XX/pairs.jsonl`` (``chosen_score``, ``rejected_score``) for the chosen-vs-rejected score distributions;
  when an iteration has no pairs, the valid scores of ``judgements.jsonl`` are shown as "all samples";
* absolute held-out evals: ``RUN/eval_base/eval.json`` (iteration 0 = the seed model) and
  ``RUN/iter_XX/heldout/eval.json``;
* pairwise evals (from ``tpo-lite eval`` or the direct-response experiment): ``RUN/iter_XX/compare/<label>/eval.json``
  for the per-iteration win rate, and ``RUN/compare/<label>/eval.json`` / ``RUN/eval/<label>/eval.json`` (pairwise
  ones) as final comparisons.

An *experiment* directory (with ``experiment.json``, see :mod:`tpo_lite.experiment`) expands to its runs plus its
own ``compare/`` results; a *seeds* directory (with ``seeds.json``, see :mod:`tpo_lite.seeds`) to its ``seed_<S>/``
runs, so the plots show one line per seed.

Outputs in ``--out`` (default ``<first RUN>/report``): ``winrate.png``, ``lengths.png``, ``valid_rate.png``,
``scores.png``, ``categories.png`` and ``report.md`` which embeds them and lists the numbers behind them.
Lengths are in characters (as everywhere in evaluation).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .errors import TpoError
from .jsonl import read_json, read_records, write_text_atomic
from .metrics import check_rates, compare_heldout, run_bootstrap_options
from .records import Judgement, Pair
from .rundir import RECORD_KEYS, ExperimentDir, RunDir, SeedsDir

_PAIR_KEYS = tuple(f.name for f in dataclasses.fields(Pair))  # a Pair has no optional field


@dataclass
class RunData:
    """Everything the report uses from one run directory."""

    name: str
    path: str
    metrics: dict[int, dict] = field(default_factory=dict)  # iteration -> metrics.json
    heldout: dict[int, dict] = field(default_factory=dict)  # iteration (0 = seed) -> absolute eval.json
    pairwise: dict[str, dict[int, dict]] = field(default_factory=dict)  # label -> iteration -> eval.json
    pair_scores: dict[int, tuple[list[float], list[float]]] = field(default_factory=dict)  # chosen, rejected
    sample_scores: dict[int, list[float]] = field(default_factory=dict)  # all valid judged scores
    finals: dict[str, dict] = field(default_factory=dict)  # label -> pairwise RUN/{compare,eval}/<label>/eval.json
    bootstrap: dict = field(default_factory=dict)  # the run's compare_heldout settings (metrics.run_bootstrap_options)

    @property
    def iterations(self) -> list[int]:
        its = set(self.metrics) | {t for t in self.heldout if t > 0} | set(self.pair_scores)
        for per in self.pairwise.values():
            its |= set(per)
        return sorted(its)


def _read_json_checked(path) -> dict:
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise TpoError(f"expected a JSON object, got {type(obj).__name__}", path=str(path))
    return obj


def load_run(run_dir: str | os.PathLike, name: str | None = None) -> RunData:
    """Collect a run directory's metrics, evals and judge scores (see the module docstring for the files)."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise TpoError("not a directory (expected a run directory made by `tpo-lite run`)", path=run_dir)
    data = RunData(name=name or os.path.basename(os.path.normpath(run_dir)), path=run_dir)
    run = RunDir(run_dir)
    data.bootstrap = run_bootstrap_options(run_dir)
    if run.eval_base.result.exists():
        data.heldout[0] = _read_json_checked(run.eval_base.result)
    for d in run.iterations():
        t = d.t
        if d.metrics.exists():
            data.metrics[t] = _read_json_checked(d.metrics)
        if d.heldout.result.exists():
            data.heldout[t] = _read_json_checked(d.heldout.result)
        for label, ed in d.comparisons():
            data.pairwise.setdefault(label, {})[t] = _read_json_checked(ed.result)
        if d.pairs.exists():
            pairs = [Pair.from_record(r) for r in read_records(d.pairs, required=_PAIR_KEYS)]
            data.pair_scores[t] = ([float(p.chosen_score) for p in pairs],
                                   [float(p.rejected_score) for p in pairs if p.rejected_score is not None])
        if d.judgements.exists():
            recs = read_records(d.judgements, key="prompt_id", required=RECORD_KEYS[d.judgements.name]).values()
            data.sample_scores[t] = [float(s) for r in recs for s in Judgement.from_record(r).scores if s is not None]
    # final comparisons: the experiment's compare/ and `tpo-lite eval` results outside an iteration (eval/)
    for label, ed in run.final_comparisons():
        res = _read_json_checked(ed.result)
        if res.get("kind") == "pairwise":
            data.finals[label] = res
    return data


def expand_dirs(dirs: list[str]) -> tuple[list[RunData], dict[str, dict]]:
    """Run directories (experiment and seeds directories expand to their runs) and the experiment-level
    comparisons."""
    runs, comparisons = [], {}
    for d in dirs:
        exp, seeds = ExperimentDir(d), SeedsDir(d)
        if seeds.record.exists():
            for s in _read_json_checked(seeds.record).get("seeds", []):
                if seeds.run(s).path.is_dir():
                    runs.append(load_run(str(seeds.run(s).path)))
        elif exp.record.exists():
            info = _read_json_checked(exp.record)
            for label, sub in info.get("runs", {}).items():
                p = sub if os.path.isabs(sub) else os.path.join(d, sub)
                runs.append(load_run(p, name=label))
            for label, ed in exp.comparisons():
                comparisons[label] = _read_json_checked(ed.result)
        else:
            runs.append(load_run(d))
    names = [r.name for r in runs]
    for r in runs:  # two runs with the same folder name would be indistinguishable in legends
        if names.count(r.name) > 1:
            r.name = os.path.normpath(r.path)
    return runs, comparisons


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


# ------------------------------------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (the plots of report and seeds)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _empty(ax, msg: str):
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _axes(ax, xlabel: str, ylabel: str, its) -> None:
    """Label a per-iteration plot, with its legend and iteration ticks."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    _iter_axis(ax, its)


def save_figure(plt, fig, path: str) -> None:
    """Lay out, write (at one dpi for every plot) and close ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _iter_axis(ax, its) -> None:
    """Integer iteration ticks with half a step of room, also when there is a single iteration."""
    its = sorted(set(its))
    if its:
        ax.set_xticks(its)
        ax.set_xlim(its[0] - 0.5, its[-1] + 0.5)


def _errbar(ax, xs, ys, cis, label, offset=0.0, **kw):
    lo = [y - c[0] if c else 0.0 for y, c in zip(ys, cis)]
    hi = [c[1] - y if c else 0.0 for y, c in zip(ys, cis)]
    ax.errorbar([x + offset for x in xs], ys, yerr=[lo, hi], marker="o", capsize=4, label=label, **kw)


def plot_winrate(runs: list[RunData], path: str) -> None:
    """Win rate per iteration with CI bars (one line per run and comparison), and held-out score per iteration."""
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    n_lines = sum(len(r.pairwise) for r in runs)
    k = 0
    for r in runs:
        for label, per in sorted(r.pairwise.items()):
            its = sorted(per)
            off = (k - (n_lines - 1) / 2) * 0.06  # keep overlapping CI bars apart
            _errbar(a1, its, [per[t]["win_rate"] for t in its], [per[t].get("win_rate_ci") for t in its],
                    f"{r.name} {label.replace('_', ' ')}", off)
            k += 1
    if n_lines:
        a1.axhline(0.5, color="0.6", ls="--", lw=1)
        a1.set_ylim(-0.02, 1.02)
        a1.set_title("Win rate vs baseline (95% bootstrap CI)")
        _axes(a1, "iteration", "win rate (ties = 1/2)", [t for r in runs for per in r.pairwise.values() for t in per])
    else:
        _empty(a1, "no pairwise evals found\n(RUN/iter_XX/compare/<label>/eval.json)")
        a1.set_title("Win rate vs baseline")
    k, n_lines = 0, sum(1 for r in runs if r.heldout)
    for r in runs:
        if not r.heldout:
            continue
        its = sorted(r.heldout)
        off = (k - (n_lines - 1) / 2) * 0.06
        _errbar(a2, its, [r.heldout[t]["mean_score"] for t in its], [r.heldout[t].get("mean_score_ci") for t in its],
                r.name, off)
        k += 1
    if n_lines:
        a2.set_title("Held-out score (95% bootstrap CI)")
        _axes(a2, "iteration (0 = seed model)", "mean held-out judge score", [t for r in runs for t in r.heldout])
    else:
        _empty(a2, "no held-out evals found\n(RUN/eval_base, RUN/iter_XX/heldout)")
        a2.set_title("Held-out score")
    save_figure(plt, fig, path)


def _series(r: RunData, *keys):
    its = [t for t in sorted(r.metrics) if _get(r.metrics[t], *keys) is not None]
    return its, [float(_get(r.metrics[t], *keys)) for t in its]


def plot_lengths(runs: list[RunData], path: str) -> None:
    """Thought and response length (characters, valid samples) per iteration; chosen vs rejected responses."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [(axes[0], "Thought length of samples", [(("generate", "thought_chars_mean"), "")]),
              (axes[1], "Response length of samples", [(("generate", "response_chars_mean"), "")]),
              (axes[2], "Response length: chosen vs rejected", [(("pairs", "chosen_response_chars"), " chosen"),
                                                                (("pairs", "rejected_response_chars"), " rejected")])]
    for ax, title, keysets in panels:
        drawn, xs = False, []
        for i, r in enumerate(runs):
            for keys, suffix in keysets:
                its, ys = _series(r, *keys)
                if its:  # one colour per run in every panel; rejected dashed
                    ax.plot(its, ys, marker="o", ls="-" if "rejected" not in suffix else "--", color=f"C{i % 10}",
                            label=r.name + suffix)
                    drawn = True
                    xs += its
        if drawn:
            _axes(ax, "iteration", "characters (mean)", xs)
            ax.set_ylim(bottom=0)
        else:
            _empty(ax, "no metrics.json with these fields")
        ax.set_title(title)
    save_figure(plt, fig, path)


def plot_valid_rate(runs: list[RunData], path: str) -> None:
    """Valid-format rate of the training samples per iteration (solid), held-out outputs (dotted), forced (dashed)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for r in runs:
        its, ys = _series(r, "generate", "valid_rate")
        if its:
            (line,) = ax.plot(its, ys, marker="o", label=f"{r.name} samples")
            drawn = True
            color = line.get_color()
        else:
            color = None
        its, ys = _series(r, "generate", "forced_rate")
        if its and any(ys):
            ax.plot(its, ys, marker="x", ls="--", color=color, label=f"{r.name} forced rate")
        hits = sorted(t for t in r.heldout if r.heldout[t].get("valid_rate") is not None)
        if hits:
            ax.plot(hits, [r.heldout[t]["valid_rate"] for t in hits], marker="s", ls=":", color=color,
                    label=f"{r.name} held-out")
            drawn = True
    if drawn:
        ax.set_ylim(-0.02, 1.02)
        _axes(ax, "iteration (0 = seed model, held-out only)", "fraction of outputs",
              [t for r in runs for t in list(r.metrics) + list(r.heldout)])
    else:
        _empty(ax, "no valid-rate data found")
    ax.set_title("Valid-format rate per iteration")
    save_figure(plt, fig, path)


def plot_scores(runs: list[RunData], path: str) -> None:
    """Judge score distributions of chosen vs rejected samples, per iteration (box plots, one panel per run)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(5.5 * max(1, len(runs)), 4.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        its = sorted(set(r.pair_scores) | set(r.sample_scores))
        if not its:
            _empty(ax, "no pairs.jsonl / judgements.jsonl")
            ax.set_title(r.name)
            continue
        pos, data, colors, ticks = [], [], [], []
        for j, t in enumerate(its):
            ch, rj = r.pair_scores.get(t, ([], []))
            x = 3 * j
            if ch or rj:
                for dx, vals, c in ((-0.45, ch, "tab:green"), (0.45, rj, "tab:red")):
                    if vals:
                        pos.append(x + dx), data.append(vals), colors.append(c)
            elif r.sample_scores.get(t):
                pos.append(x), data.append(r.sample_scores[t]), colors.append("tab:gray")
            ticks.append(x)
        if not data:
            _empty(ax, "no scored pairs or valid samples\n(every sample invalid?)")
            ax.set_title(f"{r.name}: judge scores of chosen vs rejected")
            continue
        bp = ax.boxplot(data, positions=pos, widths=0.8, patch_artist=True, showmeans=True)
        for patch, c in zip(bp["boxes"], colors):
            patch.set_facecolor(c)
            patch.set_alpha(0.5)
        ax.set_xticks(ticks, [str(t) for t in its])
        ax.set_xlim(min(ticks) - 1.5, max(ticks) + 1.5)
        ax.set_xlabel("iteration")
        ax.set_ylabel("judge score")
        from matplotlib.patches import Patch

        labels = {"tab:green": "chosen", "tab:red": "rejected", "tab:gray": "all valid samples (no pairs)"}
        ax.legend(handles=[Patch(color=c, alpha=0.5, label=lbl) for c, lbl in labels.items() if c in colors],
                  fontsize=8)
        ax.set_title(f"{r.name}: judge scores of chosen vs rejected")
    save_figure(plt, fig, path)


def _latest_pairwise(r: RunData) -> tuple[str, dict] | None:
    best = None
    for label, per in sorted(r.pairwise.items()):
        t = max(per)
        if best is None or t > best[0]:
            best = (t, f"{r.name} {label.replace('_', ' ')} (iter {t})", per[t])
    for label, res in sorted(r.finals.items()):  # pairwise only (load_run)
        best = (10 ** 9, f"{r.name} {label.replace('_', ' ')}", res)
    return None if best is None else (best[1], best[2])


def category_series(runs: list[RunData], comparisons: dict[str, dict]) -> tuple[str, list[tuple[str, dict]]]:
    """The per-category results the category plot shows: the latest pairwise eval of each run plus the
    experiment comparisons (win rates), or when there are none, the latest held-out evals (mean scores)."""
    series = [x for x in (_latest_pairwise(r) for r in runs) if x]
    series += [(label.replace("_", " "), res) for label, res in sorted(comparisons.items())
               if res.get("kind") == "pairwise"]
    if series:
        return "win_rate", series
    series = []
    for r in runs:
        if r.heldout:
            t = max(r.heldout)
            if 0 in r.heldout and t != 0:
                series.append((f"{r.name} seed", r.heldout[0]))
            series.append((f"{r.name} iter {t}" if t else f"{r.name} seed", r.heldout[t]))
    return "mean_score", series


def plot_categories(runs: list[RunData], comparisons: dict[str, dict], path: str) -> None:
    """Per-category bars with CI: win rate of pairwise evals, else mean held-out score."""
    import numpy as np

    plt = pyplot()
    metric, series = category_series(runs, comparisons)
    cats = sorted({c["category"] for _, res in series for c in res.get("per_category", [])})
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(cats) * max(1, len(series)) ** 0.5 + 3), 4.6))
    if not cats:
        _empty(ax, "no per-category results found")
        ax.set_title("Per category")
    else:
        width = 0.8 / len(series)
        x = np.arange(len(cats))
        for j, (label, res) in enumerate(series):
            by = {c["category"]: c for c in res.get("per_category", [])}
            ys, lo, hi = [], [], []
            for cat in cats:
                c = by.get(cat)
                y = c[metric] if c else np.nan
                ci = c.get(metric + "_ci") if c else None
                ys.append(y)
                lo.append(y - ci[0] if ci else 0.0)
                hi.append(ci[1] - y if ci else 0.0)
            ax.bar(x + (j - (len(series) - 1) / 2) * width, ys, width, yerr=[lo, hi], capsize=3, label=label,
                   alpha=0.85)
        ax.set_xticks(x, cats, rotation=30, ha="right")
        if metric == "win_rate":
            ax.axhline(0.5, color="0.5", ls="--", lw=1)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("win rate (95% CI)")
            ax.set_title("Win rate per category")
        else:
            ax.set_ylabel("mean held-out score (95% CI)")
            ax.set_title("Held-out score per category")
        ax.legend(fontsize=8)
    save_figure(plt, fig, path)


# ----------------------------------------------------------------------------------------------------- markdown


def _f(v, fmt):
    if v is None:
        return "–"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def _pct_ci(res: dict, key: str) -> str:
    v, ci = res.get(key), res.get(key + "_ci")
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _score_ci(res: dict) -> str:
    v, ci = res.get("mean_score"), res.get("mean_score_ci")
    if v is None:
        return "–"
    return f"{v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _check_table(heldout: dict[int, dict]) -> list[str]:
    """Held-out checks passed per check type, one column per eval (seed model, iterations), with the mean
    response length in words: what moved behind the mean score. Empty when no eval has per-check rates."""
    cols = [(t, *check_rates(heldout[t])) for t in sorted(heldout)]
    cols = [(t, c, w) for t, c, w in cols if c]
    if not cols:
        return []
    types = list(dict.fromkeys(k for _, c, _ in cols for k in c))  # most frequent first, as recorded
    L = ["| checks passed | n | " + " | ".join("seed model" if t == 0 else f"iteration {t}" for t, _, _ in cols)
         + " |", "|---|---:|" + "---:|" * len(cols)]
    for k in types:
        n = next(c[k]["n"] for _, c, _ in cols if k in c)
        L.append(f"| {k} | {n} | " + " | ".join(_f(c[k]["pass_rate"], ".0%") if k in c else "–"
                                                for _, c, _ in cols) + " |")
    L.append("| *response words (valid outputs)* | | " + " | ".join(_f(w, ".1f") for _, _, w in cols) + " |")
    return L + [""]


def _change_table(heldout: dict[int, dict], bootstrap: dict) -> list[str]:
    """Each iteration's held-out change over the seed model, paired by instruction, with its split into the part
    from outputs that changed format validity and the part from outputs valid before and after
    (:func:`tpo_lite.metrics.compare_heldout` with the run's ``bootstrap`` settings, so the last iteration's row is
    the change the run printed). Empty without the seed model's per-instruction results."""
    base = heldout.get(0)
    its = [t for t in sorted(heldout) if t > 0 and base and "items" in base and "items" in heldout[t]]
    if not its:
        return []
    ci = lambda v, c: "–" if v is None or c is None else f"{v:+.3f} [{c[0]:+.3f}, {c[1]:+.3f}]"  # noqa: E731
    L = ["| change vs seed model | n | change [CI] | from format [CI] | from answers [CI] | became valid / invalid |",
         "|---|---:|---|---|---|---|"]
    for t in its:
        d = compare_heldout(base, heldout[t], **bootstrap)
        moved = (f"{d['n_became_valid']} / {d['n_became_invalid']}" if "n_became_valid" in d else "–")
        L.append(f"| iteration {t} | {d['n']} | {ci(d['score_diff'], d['score_diff_ci'])} | "
                 f"{ci(d.get('format_change'), d.get('format_change_ci'))} | "
                 f"{ci(d.get('both_valid_change'), d.get('both_valid_change_ci'))} | {moved} |")
    return L + ["", "*from format*: outputs whose format validity changed (invalid → valid gains the whole score); "
                "*from answers*: outputs valid before and after. The two add up to the change.", ""]


def render_markdown(runs: list[RunData], comparisons: dict[str, dict], images: dict[str, str]) -> str:
    """The Markdown summary: per-iteration tables, eval results and the embedded plots."""
    L = ["# TPO report", ""]
    L.append("Runs: " + ", ".join(f"`{r.name}` ({r.path})" for r in runs) + ". Lengths are characters; CIs are "
             "95% bootstrap intervals resampling instructions.")
    if comparisons:
        L += ["", "## Comparisons", "", "| comparison | judge | n | win rate [CI] | LC win rate [CI] | W / T / L |"
              " invalid (model) |", "|---|---|---:|---|---|---|---:|"]
        for label, res in sorted(comparisons.items()):
            L.append(f"| {res.get('model')} vs {res.get('baseline')} | {res.get('judge')} | {res.get('n')} | "
                     f"{_pct_ci(res, 'win_rate')} | {_pct_ci(res, 'lc_win_rate')} | {res.get('wins')} / "
                     f"{res.get('ties')} / {res.get('losses')} | {_f(res.get('invalid_rate'), '.1%')} |")
    for r in runs:
        L += ["", f"## {r.name}", ""]
        if r.heldout:
            L += ["| held-out eval | n | mean score [CI] | valid rate | response chars | thought chars |",
                  "|---|---:|---|---:|---:|---:|"]
            for t in sorted(r.heldout):
                res = r.heldout[t]
                ml = res.get("model_lengths", {})
                L.append(f"| {'seed model' if t == 0 else f'iteration {t}'} | {res.get('n')} | {_score_ci(res)} | "
                         f"{_f(res.get('valid_rate'), '.1%')} | {_f(ml.get('response_chars_mean'), '.0f')} | "
                         f"{_f(ml.get('thought_chars_mean'), '.0f')} |")
            L.append("")
            L += _change_table(r.heldout, r.bootstrap)
            L += _check_table(r.heldout)
        if r.metrics:
            L += ["| iteration | valid rate | forced rate | thought chars | response chars | mean score | pairs | "
                  "chosen / rejected resp chars |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
            for t in sorted(r.metrics):
                m = r.metrics[t]
                L.append(f"| {t} | {_f(_get(m, 'generate', 'valid_rate'), '.1%')} | "
                         f"{_f(_get(m, 'generate', 'forced_rate'), '.1%')} | "
                         f"{_f(_get(m, 'generate', 'thought_chars_mean'), '.0f')} | "
                         f"{_f(_get(m, 'generate', 'response_chars_mean'), '.0f')} | "
                         f"{_f(_get(m, 'judge', 'mean_score'), '.3f')} | {_f(_get(m, 'pairs', 'pairs_kept'), 'd')} | "
                         f"{_f(_get(m, 'pairs', 'chosen_response_chars'), '.0f')} / "
                         f"{_f(_get(m, 'pairs', 'rejected_response_chars'), '.0f')} |")
            L.append("")
        pw = [(label, t, per[t]) for label, per in sorted(r.pairwise.items()) for t in sorted(per)]
        pw += [(label, None, res) for label, res in sorted(r.finals.items())]
        if pw:
            L += ["| comparison | iteration | n | win rate [CI] | LC win rate [CI] | W / T / L | invalid |",
                  "|---|---:|---:|---|---|---|---:|"]
            for label, t, res in pw:
                L.append(f"| {label.replace('_', ' ')} | {'final' if t is None else t} | {res.get('n')} | "
                         f"{_pct_ci(res, 'win_rate')} | {_pct_ci(res, 'lc_win_rate')} | {res.get('wins')} / "
                         f"{res.get('ties')} / {res.get('losses')} | {_f(res.get('invalid_rate'), '.1%')} |")
            L.append("")
        if not (r.heldout or r.metrics or pw):
            L.append("No metrics or evals found in this directory.")
    metric, series = category_series(runs, comparisons)
    if series:
        what = "win rate [CI]" if metric == "win_rate" else "mean score [CI]"
        L += ["", f"## Per category ({what})", "", "| category | " + " | ".join(lbl for lbl, _ in series) + " |",
              "|---|" + "---|" * len(series)]
        cats = sorted({c["category"] for _, res in series for c in res.get("per_category", [])})
        for cat in cats:
            cells = []
            for _, res in series:
                c = next((c for c in res.get("per_category", []) if c["category"] == cat), None)
                if c is None:
                    cells.append("–")
                elif metric == "win_rate":
                    cells.append(f"{_pct_ci(c, 'win_rate')} (n={c['n']})")
                else:
                    cells.append(f"{_score_ci(c)} (n={c['n']})")
            L.append(f"| {cat} | " + " | ".join(cells) + " |")
    L += ["", "## Plots", ""]
    for title, rel in images.items():
        L += [f"### {title}", "", f"![{title}]({rel})", ""]
    return "\n".join(L).rstrip() + "\n"


def make_report(run_dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> dict:
    """Write the five PNGs and ``report.md`` for ``run_dirs`` into ``out_dir``; returns their paths."""
    if not run_dirs:
        raise TpoError("give at least one run directory")
    dirs = [os.fspath(d) for d in run_dirs]
    runs, comparisons = expand_dirs(dirs)
    out_dir = os.fspath(out_dir) if out_dir is not None else os.path.join(dirs[0], "report")
    os.makedirs(out_dir, exist_ok=True)
    plots = {
        "Win rate and held-out score per iteration": ("winrate.png", lambda p: plot_winrate(runs, p)),
        "Thought and response length per iteration": ("lengths.png", lambda p: plot_lengths(runs, p)),
        "Valid-format rate per iteration": ("valid_rate.png", lambda p: plot_valid_rate(runs, p)),
        "Judge scores of chosen vs rejected": ("scores.png", lambda p: plot_scores(runs, p)),
        "Per category": ("categories.png", lambda p: plot_categories(runs, comparisons, p)),
    }
    paths, images = {}, {}
    for title, (fname, fn) in plots.items():
        p = os.path.join(out_dir, fname)
        fn(p)
        paths[fname] = p
        images[title] = fname
    md = os.path.join(out_dir, "report.md")
    write_text_atomic(md, render_markdown(runs, comparisons, images))
    paths["report.md"] = md
    json_path = os.path.join(out_dir, "report.json")
    write_text_atomic(json_path, json.dumps({"runs": [r.path for r in runs], "files": paths}, indent=2) + "\n")
    return paths
