"""`tpo-lite eval`, `tpo-lite report`, `tpo-lite experiment` (the direct-response experiment) and `tpo-lite seeds`
(one config run with several seeds).

Bad input raises :class:`tpo_lite.errors.TpoError`, printed as one line (``error: path:line: field: message``)
with exit status 2.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import click

from ..seeds import DEFAULT_SEED_OPTIONS
from .run_cmds import _SET_HELP, _fail_cleanly, _open


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _resolve_model(config, run_dir: Path, iteration: str, adapter: str | None) -> tuple[str | None, str, int | None]:
    """(adapter path or None, generator label, iteration number or None) for --iteration / --adapter."""
    from ..errors import TpoError
    from ..rundir import RunDir
    from ..stages import final_adapter

    run, name = RunDir(run_dir), run_dir.name
    if adapter:
        if not os.path.isdir(adapter):
            raise TpoError("adapter directory not found", path=adapter, field="--adapter")
        return adapter, f"{name}-{_slug(Path(adapter).parent.name or 'adapter')}", None
    if iteration == "seed":
        return None, "seed", None
    if iteration == "final":
        ad = final_adapter(run_dir, config)
        if ad is None:
            raise TpoError("the run has no trained adapter yet; use --iteration seed to evaluate the seed model",
                           path=str(run_dir), field="--iteration")
        t = run.iteration_of(ad)
        return ad, f"{name}-iter{t:02d}" if t else f"{name}-final", t
    try:
        t = int(iteration)
    except ValueError:
        raise TpoError(f"expected a number, 'seed' or 'final', got {iteration!r}", field="--iteration") from None
    ad = run.iteration(t).adapter
    if not ad.is_dir():
        raise TpoError(f"iteration {t} has no adapter", path=str(ad), field="--iteration")
    return str(ad), f"{name}-iter{t:02d}", t


@click.command("eval", context_settings={"max_content_width": 100})
@click.argument("target", metavar="CONFIG.toml|RUN_DIR")
@click.option("--iteration", "-i", default="final", show_default=True,
              help="Model to evaluate: 'seed' (no adapter), an iteration number, or 'final' (the adapter the run "
                   "ended with).")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="Evaluate this LoRA adapter directory instead (overrides --iteration).")
@click.option("--eval-set", default=None,
              help="Eval set (overrides eval.eval_set): 'heldout', an AlpacaEval / Arena-Hard / instruction file, "
                   "or (with `datasets`) a data file, save_to_disk directory or Hub id.")
@click.option("--baseline", default=None,
              help="Baseline answers (overrides eval.baseline_outputs): AlpacaEval-style outputs or an Arena-Hard "
                   "answer JSONL.")
@click.option("--against", type=click.Path(exists=True), default=None,
              help="Compare with another eval's outputs: the folder of an earlier `tpo-lite eval` (or a held-out "
                   "folder of a run), or an AlpacaEval-style outputs file.")
@click.option("--outputs", "outputs_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Judge these AlpacaEval-style outputs instead of generating (e.g. to re-judge).")
@click.option("--absolute", is_flag=True,
              help="Report the mean score with its CI (no baseline), judged as the run's held-out score "
                   "(loop.heldout_judge); the default when the eval set has no baseline answers and no --against "
                   "is given.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder; default RUN_DIR/iter_XX/compare/vs_<baseline> for an iteration's pairwise "
                   "eval (so `tpo-lite report` plots it), else RUN_DIR/eval/<model>_<what>.")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=_SET_HELP)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@_fail_cleanly
def eval_command(target, iteration, adapter, eval_set, baseline, against, outputs_path, absolute, out_dir,
                 overrides, no_progress):
    """Evaluate a model's responses (thoughts stripped) like the paper: win rate against a baseline with 95%
    bootstrap CIs, length-controlled win rate, per-category table, lengths and invalid-format rate.

    TARGET is a run directory (its config.toml gives the model, template, sampling backend, judge and [eval]
    settings) or a run config. Outputs are generated with the run's thought template and the eval decoding
    settings (greedy by default; see `eval.*` in `tpo-lite run --list-options`); an output with a format error
    is re-sampled up to eval.format_retries times, and one still without a parseable response counts as a loss
    (score 0 in --absolute). Outputs are appended to OUT/outputs.jsonl as they finish, so the same command
    resumes a killed eval; they are also exported as AlpacaEval-style model_outputs.json.
    The judge ([eval_judge], else [judge]) sees the original instruction and the responses only; --absolute
    scores with the judge of the run's held-out score (loop.heldout_judge: the bare fraction of checks passed
    when every instruction has checks), so it reproduces what `tpo-lite run` prints. Results: eval.json and
    eval.md.
    """
    from .. import evaluate as ev
    from ..compare import absolute_eval, compare_outputs, decoding_record, make_eval_judge, write_result
    from ..heldout import make_heldout_judge
    from ..rundir import EvalDir, RunDir

    overrides = list(overrides)
    if eval_set:
        overrides.append(f"eval.eval_set={json.dumps(eval_set)}")  # a JSON string is a valid TOML string
    if baseline:
        overrides.append(f"eval.baseline_outputs={json.dumps(baseline)}")
    config, run_dir = _open(target, overrides, None, None)
    ecfg = config.eval
    items = ev.load_configured_eval_set(ecfg, baseline=ecfg.baseline_outputs or None,
                                        echo=lambda line: click.echo(line, err=True))
    has_baseline = all(it.baseline is not None for it in items)
    mode = "absolute" if absolute or (not against and not has_baseline) else "pairwise"
    other = ev.read_outputs(against) if against else (ev.baseline_outputs(items) if mode == "pairwise" else None)

    if outputs_path:
        outputs = ev.read_outputs(outputs_path)
        gen, t = outputs[0].generator if outputs else "model", None
    else:
        ad, gen, t = _resolve_model(config, Path(run_dir), str(iteration), adapter)
    run = RunDir(run_dir)
    if out_dir is not None:
        out = EvalDir(out_dir)
    elif mode == "pairwise" and t is not None:
        out = run.iteration(t).compare(f"vs_{_slug(other[0].generator)}")
    elif mode == "pairwise":
        out = run.eval(f"{_slug(gen)}_vs_{_slug(other[0].generator)}")
    else:
        out = run.eval(f"{_slug(gen)}_{_slug(Path(ecfg.eval_set).stem)}_absolute")
    if not outputs_path:
        # The one generation path (also the loop's held-out score): the run's sampling backend, format retries,
        # outputs.jsonl appended as it goes so a killed eval resumes.
        outputs = ev.model_outputs(config, items, out.outputs, adapter=ad, generator=gen,
                                   progress=not no_progress, echo=lambda s: click.echo(s, err=True), desc="eval")
    export = ev.write_model_outputs(out, outputs)

    # Cache beside the outputs: a re-run (or an interrupted one) never asks the judge twice. An absolute score is
    # the held-out score of `tpo-lite run` (loop.heldout_judge: the bare fraction of checks passed when every
    # instruction has checks), so the two commands give one number for one model.
    if mode == "absolute":
        judge = make_heldout_judge(config, run_dir, items, click.echo, cache_path=out.judge_cache)
        result = absolute_eval(items, outputs, judge, ecfg)
    else:
        judge = make_eval_judge(config, cache_path=out.judge_cache, echo=click.echo)
        result = compare_outputs(items, outputs, other, judge, ecfg)
    result["eval_set"] = ecfg.eval_set
    result["adapter"] = None if outputs_path else ad
    if not outputs_path:  # generated here: greedy tokens depend on the machine (tpo_lite.fingerprint)
        from ..fingerprint import model_environment

        result["environment"] = model_environment(config.model)
    jp, mp = write_result(out, result, decoding_record(ecfg, config.sampling))
    click.echo(open(mp, encoding="utf-8").read())
    click.echo(f"written: {jp}, {mp}, {export}", err=True)


@click.command("report", context_settings={"max_content_width": 100})
@click.argument("run_dirs", nargs=-1, required=True, metavar="RUN_DIR [RUN_DIR...]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder (default: FIRST_RUN_DIR/report).")
@_fail_cleanly
def report_command(run_dirs, out_dir):
    """PNG plots and a Markdown summary of one or more runs (or an experiment or seeds directory: its runs).

    Plots: win rate per iteration with CI bars (TPO vs direct) and held-out score, thought and response length
    per iteration, valid-format rate per iteration, judge scores of chosen vs rejected, per-category bars.
    """
    from ..report import make_report

    paths = make_report(list(run_dirs), out_dir)
    for p in paths.values():
        click.echo(p)


def _runs_options(name_help: str, run_dir_help: str):
    """The options of a command that runs the loop several times from one config (experiment, seeds)."""
    options = [click.option("--name", default=None, help=name_help),
               click.option("--run-dir", type=click.Path(file_okay=False), default=None, help=run_dir_help),
               click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=_SET_HELP),
               click.option("--allow-config-change", is_flag=True,
                            help="Resume although the saved configs differ (see `tpo-lite run --help`)."),
               click.option("--no-progress", is_flag=True, help="Hide the progress bars.")]

    def apply(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@click.command("experiment", context_settings={"max_content_width": 100})
@click.argument("config", metavar="CONFIG.toml")
@_runs_options("Experiment name (overrides loop.name): runs/<name>/{tpo,direct}.",
               "Experiment directory to use instead of <loop.runs_root>/<loop.name>.")
@click.option("--no-report", is_flag=True, help="Do not write the report (plots + Markdown) at the end.")
@_fail_cleanly
def experiment_command(config, name, run_dir, overrides, allow_config_change, no_progress, no_report):
    """The direct-response experiment: run TPO and the same training with the 'direct' template (no thoughts)
    from one config, then compare both with the seed model and with each other (the paper's Table 1).

    Resumable like `tpo-lite run`. Writes experiment.json, table1.md and (unless --no-report) report/.
    """
    from ..config import load_config
    from ..experiment import run_experiment
    from ..rundir import resolve_run_dir

    cfg = load_config(config, list(overrides), name=name)
    exp = resolve_run_dir(cfg, run_dir)
    run_experiment(cfg, exp, progress=not no_progress, echo=click.echo, allow_config_change=allow_config_change)
    if not no_report:
        from ..report import make_report

        paths = make_report([str(exp)])
        click.echo(f"report: {paths['report.md']}")


def _seed_list(ctx, param, value):
    """'0,1,2' or '0-4' (or a mix: '0-2,7') -> [0, 1, 2]."""
    seeds = []
    for part in (value or "").split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(part)]
        except ValueError:
            raise click.BadParameter(f"{part!r} is not a seed or a range like 0-4") from None
    if not seeds:
        raise click.BadParameter("give at least one seed, e.g. --seeds 0,1,2 or --seeds 0-4")
    return seeds


@click.command("seeds", context_settings={"max_content_width": 100})
@click.argument("config", metavar="CONFIG.toml")
@click.option("--seeds", "seeds", default="0,1,2", show_default=True, callback=_seed_list,
              help="The seeds: a list and/or ranges, e.g. 0,1,2 or 0-5.")
@click.option("--seed-options", default=",".join(DEFAULT_SEED_OPTIONS), show_default=True,
              help="The config options set to each run's seed (comma-separated TABLE.KEY); add loop.seed to "
                   "draw other training instructions per run as well.")
@click.option("--parallel", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs at a time. 1 = one after the other in this process (progress bars); more = child "
                   "processes with their output in <dir>/seed_<S>.log (a GPU that a small model leaves idle "
                   "takes several; on a CPU each gets cpu_count/parallel threads).")
@_runs_options("Name (overrides loop.name): the runs go to <runs_root>/<name>_seeds/.",
               "Seeds directory to use instead of <loop.runs_root>/<loop.name>_seeds.")
@_fail_cleanly
def seeds_command(config, seeds, seed_options, parallel, name, run_dir, overrides, allow_config_change,
                  no_progress):
    """Run one config with several seeds and summarise the held-out change over the runs.

    One run's CI resamples instructions only; the spread between runs of the whole loop (which samples were
    drawn, which pairs formed, the DPO batch order) can be as large as the gain. Each run here is the config
    with the --seed-options set to its seed, in <runs_root>/<loop.name>_seeds/seed_<S>/ (an ordinary run
    directory). At the end: seeds.md / seeds.json (each run's before, after and change with its CI; the mean
    change over runs with a Student-t interval, the sd between runs, how many runs improved) and seeds.png.
    Resumable like `tpo-lite run`: finished runs are not recomputed.
    """
    from ..config import load_config
    from ..seeds import run_seeds, seeds_dir

    cfg = load_config(config, list(overrides), name=name)
    options = [o.strip() for o in seed_options.split(",") if o.strip()]
    sd = seeds_dir(cfg, run_dir)
    run_seeds(cfg, seeds, sd, parallel=parallel, seed_options=options, progress=not no_progress, echo=click.echo,
              allow_config_change=allow_config_change)
    click.echo(f"summary: {sd / 'seeds.md'}")
