"""The direct-response experiment: TPO vs the same training without thoughts (the paper's Table 1, your setting).

One run config drives two runs of :func:`tpo_lite.loop.run` with the same seed model, training instructions,
judge, sampling budget (K, temperature, token limit), pairs and training settings and number of iterations:

* ``tpo``    -- the config's thought template (``prompts.template``; ``generic`` by default);
* ``direct`` -- the ``direct`` template: no thoughts, the whole output is the response (the paper's
  "direct response baseline"). Options that only make sense with a thought are turned off for it
  (``prompts.prefill_thought_header``, ``sampling.thought_budget`` / ``thought_stop``); everything else is equal.

Both runs score the held-out eval set (the ``[eval]`` table, judged as ``loop.heldout_judge`` says) before training
and after every iteration (``loop.eval_before`` and ``loop.eval_every_iteration`` are forced on), with the eval's
decoding settings (greedy by default, format errors re-sampled; one ``[eval]`` table, so TPO and direct outputs
get the same response budget). Those held-out outputs are then compared -- responses only, thoughts stripped, by
the evaluation judge (``[eval_judge]``, else ``[judge]``) --

* each iteration of each run against the **seed model answering directly** (the ``direct`` run's iteration-0
  outputs): ``<run>/iter_XX/compare/vs_seed/eval.json``;
* the final TPO model against the final direct model: ``compare/tpo_vs_direct/eval.json``.

Directory (``<loop.runs_root>/<loop.name>/``)::

    experiment.json          the two run directories and the Table-1 numbers (what `tpo-lite report` reads)
    table1.md                the comparison table
    tpo/  direct/            ordinary run directories (resumable like any run)
    compare/tpo_vs_direct/   eval.json, eval.md

Everything is resumable: finished runs resume as no-ops and finished comparisons are reused.
"""
from __future__ import annotations

import os
from typing import Callable

from .errors import TpoError
from .jsonl import read_json, write_json_atomic, write_text_atomic
from .rundir import EvalDir, ExperimentDir, resolve_run_dir

RUN_LABELS = ("tpo", "direct")


def experiment_configs(config) -> dict:
    """The two run configs (``{"tpo": RunConfig, "direct": RunConfig}``) derived from one run config."""
    template = config.prompts.template
    if template == "direct":
        raise TpoError("the experiment compares a thought template with 'direct'; set prompts.template to "
                       "'generic', 'specific', 'specific_tags', 'think' or a template file", field="prompts.template")
    base = config.replace("loop", eval_before=True, eval_every_iteration=True)
    tpo = base.replace("loop", name="tpo")
    direct = (base.replace("loop", name="direct").replace("prompts", template="direct", prefill_thought_header=False)
              .replace("sampling", thought_budget=None, thought_stop=[]))
    return {"tpo": tpo, "direct": direct}


def _compare(items, model, baseline, judge, ecfg, out: EvalDir, echo, sampling_cfg=None) -> dict:
    from .compare import compare_outputs, decoding_record, write_result
    from .evaluate import write_model_outputs

    if out.result.exists():
        return read_json(out.result)
    result = compare_outputs(items, model, baseline, judge, ecfg)
    write_model_outputs(out, model)
    write_result(out, result, decoding_record(ecfg, sampling_cfg))
    echo(f"{result['model']} vs {result['baseline']}: win rate {100 * result['win_rate']:.1f}% "
         f"[{100 * result['win_rate_ci'][0]:.1f}, {100 * result['win_rate_ci'][1]:.1f}]")
    return result


def _row(label: str, res: dict) -> dict:
    keep = ("model", "baseline", "n", "win_rate", "win_rate_ci", "lc_win_rate", "lc_win_rate_ci", "wins", "ties",
            "losses", "invalid_rate")
    return {"comparison": label, **{k: res.get(k) for k in keep},
            "response_chars_mean": res.get("model_lengths", {}).get("response_chars_mean"),
            "thought_chars_mean": res.get("model_lengths", {}).get("thought_chars_mean")}


def render_table(rows: list[dict], heldout: dict, judge: str, confidence: float) -> str:
    """Table 1 as Markdown."""
    conf = int(round(100 * confidence))

    def pct(v, ci):
        return "–" if v is None else f"{100 * v:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    L = ["# Direct-response experiment (Table 1, your setting)", "",
         f"Judge: `{judge}`; win rates count ties as half; {conf}% bootstrap CIs resampling instructions. Invalid "
         "outputs (no parseable response or cut off) count as losses. Lengths in characters.", "",
         "| comparison | n | win rate [CI] | LC win rate [CI] | W / T / L | invalid | response chars | thought chars |",
         "|---|---:|---|---|---|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['comparison']} | {r['n']} | {pct(r['win_rate'], r['win_rate_ci'])} | "
                 f"{pct(r['lc_win_rate'], r['lc_win_rate_ci'])} | {r['wins']} / {r['ties']} / {r['losses']} | "
                 f"{100 * r['invalid_rate']:.1f}% | "
                 + " | ".join("–" if r[k] is None else f"{r[k]:.0f}" for k in ("response_chars_mean",
                                                                             "thought_chars_mean")) + " |")
    if heldout:
        L += ["", "Held-out score (absolute, mean judge score [CI]):", "",
              "| run | seed model | final model |", "|---|---|---|"]
        for label, (before, after) in heldout.items():
            def s(r):
                return "–" if not r else f"{r['mean_score']:.3f} [{r['mean_score_ci'][0]:.3f}, {r['mean_score_ci'][1]:.3f}]"
            L.append(f"| {label} | {s(before)} | {s(after)} |")
    return "\n".join(L) + "\n"


def run_experiment(config, exp_dir: str | os.PathLike | None = None, progress: bool = True,
                   echo: Callable[[str], None] = print, allow_config_change: bool = False, sampler_factory=None,
                   judge=None) -> dict:
    """Run (or resume) both runs, compare them, write ``experiment.json`` and ``table1.md``; returns the record.

    ``sampler_factory`` and ``judge`` are passed to :func:`tpo_lite.loop.run` (tests use scripted ones).
    """
    from . import loop
    from .compare import decoding_record, make_eval_judge
    from .evaluate import load_configured_eval_set

    exp = ExperimentDir(resolve_run_dir(config, exp_dir))
    exp.path.mkdir(parents=True, exist_ok=True)
    cfgs = experiment_configs(config)
    summaries = {}
    for label in RUN_LABELS:
        echo(f"== experiment {exp.path.name}: run '{label}' (template {cfgs[label].prompts.template}) ==")
        summaries[label] = loop.run(cfgs[label], exp.run(label).path, progress=progress, echo=echo,
                                    allow_config_change=allow_config_change, sampler_factory=sampler_factory,
                                    judge=judge)
    ecfg = config.eval
    items = load_configured_eval_set(ecfg, echo=echo)
    if judge is None:  # [eval_judge] when set: the training judge's win rates measure reward hacking
        judge = make_eval_judge(config, cache_path=exp.judge_cache, echo=echo)
    base = exp.run("direct").eval_base
    seed = base.read_outputs("seed")
    if seed is None:
        raise TpoError("the direct run has no held-out outputs of the seed model", path=str(base.outputs))
    iterations = config.loop.iterations
    finals, per_iter = {}, {}
    for label in RUN_LABELS:
        rd = exp.run(label)
        # the iteration whose adapter the run ended with (keep_best may pick an earlier one)
        finals[label] = rd.iteration_of(summaries[label].get("final_adapter")) or iterations
        for t in range(1, iterations + 1):
            d = rd.iteration(t)
            outs = d.heldout.read_outputs(f"{label}-iter{t:02d}")
            if outs is None:
                raise TpoError(f"no held-out outputs for iteration {t}", path=str(d.heldout.path))
            per_iter[(label, t)] = (outs, _compare(items, outs, seed, judge, ecfg, d.compare("vs_seed"), echo,
                                                   config.sampling))
    tvd = _compare(items, per_iter[("tpo", finals["tpo"])][0], per_iter[("direct", finals["direct"])][0], judge,
                   ecfg, exp.compare("tpo_vs_direct"), echo, config.sampling)
    rows = [_row(f"TPO (iter {finals['tpo']}) vs seed", per_iter[("tpo", finals["tpo"])][1]),
            _row(f"direct (iter {finals['direct']}) vs seed", per_iter[("direct", finals["direct"])][1]),
            _row("TPO vs direct", tvd)]
    heldout = {label: (summaries[label].get("heldout_before"), summaries[label].get("heldout_after"))
               for label in RUN_LABELS}
    record = {"runs": {label: label for label in RUN_LABELS}, "judge": tvd["judge"], "table": rows,
              "per_iteration": {f"{label}/{exp.run(label).iteration(t).name}": _row(f"{label} iter {t} vs seed", r)
                                for (label, t), (_, r) in sorted(per_iter.items())},
              "heldout": {k: {"before": v[0] and v[0].get("mean_score"), "after": v[1] and v[1].get("mean_score")}
                          for k, v in heldout.items()},
              "decoding": decoding_record(ecfg, config.sampling)}
    write_json_atomic(exp.record, record)
    table = render_table(rows, heldout, tvd["judge"], 1.0 - ecfg.alpha)
    write_text_atomic(exp.table, table)
    echo("")
    echo(table)
    return record
