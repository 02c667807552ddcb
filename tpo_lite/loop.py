"""The TPO iteration loop: for t = 1..loop.iterations run the stages (generate -> judge -> pairs -> train,
:data:`tpo_lite.stages.STAGES`), score the validation split and the held-out set when asked, and print the
iteration's metrics; then score the final model and write summary.json.

Who owns what: :mod:`tpo_lite.rundir` the run directory's layout, markers and lock; :mod:`tpo_lite.guard` the
checks a start or resume must pass; :mod:`tpo_lite.plan` which instructions each iteration takes;
:mod:`tpo_lite.stages` the four stages (resume, integrity) and the adapter each iteration starts from;
:mod:`tpo_lite.heldout` the held-out / validation score; :mod:`tpo_lite.metrics` the statistics and tables;
:mod:`tpo_lite.tracking` what goes to the trackers of ``loop.report_to``.
Every stage reads back what is already on disk first, so the same call resumes a killed run exactly.

With ``loop.stage_processes`` (the default) the start's checks and every unfinished stage and score run in a
fresh process each (:mod:`tpo_lite.stage_process`): this process only sequences them and never holds a model, so
the run's memory peak is its largest stage's (plus this process) instead of growing stage by stage.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .config import RunConfig, to_toml
from .guard import check_inputs, check_run_dir, prepare_run_dir
from .heldout import existing_heldout, heldout_producer, heldout_stage, validation_stage
from .jsonl import read_records, write_json_atomic
from .metrics import bootstrap_options, compare_heldout, format_before_after, format_table, iteration_memory, \
    iteration_metrics, run_memory
from .rundir import RunDir, resolve_run_dir
from .stage_process import call_in_fresh_process
from .stages import STAGES, adapter_for, final_adapter
from .tracking import RunTracking, describe as describe_tracking

# ----------------------------------------------------------------------------------------------- models

def run_sampler(config: RunConfig, model, tokenizer, template, adapter: str | None = None,
                progress: bool = True):
    """The sampler of ``config.sampling`` (local transformers, or an OpenAI-compatible server or an in-process
    vLLM engine that must serve ``adapter``; :func:`tpo_lite.sampling.make_sampler` refuses loudly if it
    cannot)."""
    from . import sampling

    return sampling.make_sampler(config.sampling, tokenizer, template, model=model,
                                 adapter=adapter if config.sampling.backend != "local" else None, progress=progress)


# The mmap threshold of a stage process that decodes with the local backend (stage_process.set_mmap_threshold
# says why): the generate stages and every held-out / validation score.
SAMPLING_MMAP_THRESHOLD = 4 << 20


def sampling_mmap_threshold(config: RunConfig) -> int | None:
    """The glibc mmap threshold of this run's sampling processes: None when another engine decodes (a server, vLLM)."""
    return SAMPLING_MMAP_THRESHOLD if config.sampling.backend == "local" else None


def _measured_call(store: dict, key: str, done: Path, fn, *args, fresh_process: bool = False,
                   mmap_threshold: int | None = None, **kwargs):
    """``fn(*args, **kwargs)`` under StageMemory (freeing what it loaded afterwards), in a fresh process with
    ``fresh_process`` (given ``mmap_threshold``); its record goes to ``store[key]`` unless ``done`` existed before
    (then the result was only read back)."""
    from .memory import StageMemory

    fresh = not Path(done).exists()
    if fresh_process:
        out, rec = call_in_fresh_process(fn, *args, what=key, forward={"echo": kwargs.pop("echo", None)},
                                         measure=True, mmap_threshold=mmap_threshold, **kwargs)
    else:
        with StageMemory() as mem:
            out = fn(*args, **kwargs)
        rec = mem.record()
    if fresh:
        store[key] = rec
    return out


def _run_stage(stage, config: RunConfig, rd: Path, t: int, fresh_process: bool, progress: bool, echo,
               mmap_threshold: int | None = None, **kwargs):
    """One of the four stages of iteration ``t``; in a fresh process when asked and it has not finished (a
    finished stage is only read back)."""
    if fresh_process and not RunDir(rd).iteration(t).is_done(stage.name):
        forward = {"echo": echo, "on_step": kwargs.pop("on_step", None)}
        return call_in_fresh_process(stage.run, config, rd, t, what=f"iteration {t} {stage.name}", forward=forward,
                                     mmap_threshold=mmap_threshold if stage.decodes else None, progress=progress,
                                     **kwargs)
    return stage.run(config, rd, t, progress=progress, echo=echo, **kwargs)


# ------------------------------------------------------------------------------------------------- run

def describe_plan(config: RunConfig, run_dir: Path | None = None, allow_config_change: bool = False) -> str:
    """The resolved plan (for ``--dry-run``): what will run and what is already done. Runs the checks of a real
    start (:func:`check_run_dir`, :func:`check_inputs`; tokenizer and model config only, no weights), so it
    refuses where the run would, with the same error."""
    run = RunDir(resolve_run_dir(config, run_dir))
    L = config.loop
    warnings: list[str] = []
    instructions = check_run_dir(config, run.path, allow_config_change, warnings.append)
    check_inputs(config, instructions)
    lines = [f"run directory: {run.path}{' (exists: will resume)' if run.config.exists() else ''}",
             *warnings,
             f"model: {config.model.path}",
             f"template: {config.prompts.template} (prefill_thought_header={config.prompts.prefill_thought_header})",
             f"sampling: backend={config.sampling.backend} K={config.sampling.k}",
             f"judge: {config.judge.kind}",
             f"iterations: {L.iterations} x {L.prompts_per_iteration} instructions "
             f"({'fresh each iteration' if L.fresh_instructions else 'the same each iteration'}), "
             f"training set: {L.train_instructions or 'embedded'}",
             f"held-out eval: before={L.eval_before} after={L.eval_after} every={L.eval_every_iteration} "
             f"on {config.eval.eval_set} (max {config.eval.max_instructions or 'all'} instructions), "
             f"keep_best={L.keep_best}",
             describe_tracking(config, run.path)]
    for t in range(1, L.iterations + 1):
        d = run.iteration(t)
        state = [s for s in STAGES if d.is_done(s)]
        n = len(read_records(d.samples, key="prompt_id")) if d.samples.exists() else 0
        lines.append(f"  iter {t}: " + (f"done: {', '.join(state)}" if state else "not started")
                     + (f"; {n} instructions sampled" if n and "generate" not in state else ""))
    lines += ["", "resolved config:", to_toml(config)]
    return "\n".join(lines)


def run(config: RunConfig, run_dir: str | os.PathLike | None = None, progress: bool = True,
        echo: Callable[[str], None] = print, allow_config_change: bool = False, sampler_factory=None,
        judge=None) -> dict:
    """Run (or resume) all iterations; returns the summary also written to ``summary.json``.

    ``sampler_factory(config, model, tokenizer, template, adapter=, progress=)`` and ``judge`` replace the
    configured sampler / judge (tests use scripted ones); they live in this process, so with either every stage
    runs here, whatever ``loop.stage_processes`` says.
    """
    rd = resolve_run_dir(config, run_dir)
    run = RunDir(rd)
    L = config.loop
    from .memory import StageMemory

    tracking = RunTracking(config, rd, echo)  # refuses a tracker whose package is missing, before any work
    isolate = L.stage_processes and sampler_factory is None and judge is None
    heap = sampling_mmap_threshold(config)  # of the processes that decode
    stage_kw = {"generate": {"sampler_factory": sampler_factory}, "judge": {"judge": judge}}
    with run.lock(), StageMemory(release_after=False) as run_tracker, tracking:
        if isolate:  # its checks load the tokenizer (transformers, torch): not in the process that outlives them
            call_in_fresh_process(prepare_run_dir, config, rd, allow_config_change, what="start check",
                                  forward={"echo": echo})
        else:
            prepare_run_dir(config, rd, allow_config_change, echo)
        echo(f"run directory: {rd}")
        before = None
        run_mem: dict = {}  # peak memory of the run-level evaluations measured by this process
        if L.eval_before:
            before = _measured_call(run_mem, "eval_base", run.eval_base.result, heldout_stage, config, rd,
                                    run.eval_base, None, "seed", progress=progress, echo=echo, judge=judge,
                                    fresh_process=isolate, mmap_threshold=heap)
            tracking.log_heldout_before(before)
        all_metrics = []
        for t in range(1, L.iterations + 1):
            d = run.iteration(t)
            it_mem: dict = {}
            stage_kw["train"] = {"on_step": tracking.dpo_step_logger(t)}
            for stage in STAGES.values():
                _run_stage(stage, config, rd, t, isolate, progress, echo, heap, **stage_kw.get(stage.name, {}))
            if L.validation_instructions:
                _measured_call(it_mem, "validation", d.validation.result, validation_stage, config, rd, t,
                               progress=progress, echo=echo, judge=judge, fresh_process=isolate, mmap_threshold=heap)
            if L.eval_every_iteration or (t == L.iterations and L.eval_after):
                trained = adapter_for(rd, t + 1, config.replace("loop", keep_best=False))
                _measured_call(it_mem, "heldout", d.heldout.result, heldout_stage, config, rd, d.heldout, trained,
                               f"iter{t:02d}", progress=progress, echo=echo, judge=judge, fresh_process=isolate,
                               mmap_threshold=heap)
            m = iteration_metrics(rd, t)
            m["memory"] = iteration_memory(d, m, it_mem)
            write_json_atomic(d.metrics, m)
            tracking.log_iteration(t, m)
            all_metrics.append(m)
            echo("")
            echo(format_table(all_metrics))
        final = final_adapter(rd, config)
        after = None
        if L.eval_after:
            # An iteration's held-out result counts only if it scored exactly this model with these settings.
            from .evaluate import load_configured_eval_set

            producer = heldout_producer(config, final, load_configured_eval_set(config.eval))
            t_final = run.iteration_of(final)
            found = existing_heldout(rd, producer, [run.iteration(L.iterations).heldout]
                                     + ([run.iteration(t_final).heldout] if t_final else []))
            if found is not None:
                after = found.read_result()
            else:
                after = _measured_call(run_mem, "eval_final", run.eval_final.result, heldout_stage, config, rd,
                                       run.eval_final, final, "final", progress=progress, echo=echo, judge=judge,
                                       fresh_process=isolate, mmap_threshold=heap)
        diff = None
        if before and after:
            diff = compare_heldout(before, after, **bootstrap_options(config.eval))
        slim = lambda r: None if r is None else {k: v for k, v in r.items() if k != "items"}  # noqa: E731
        summary = {"run_dir": str(rd), "iterations": all_metrics, "final_adapter": final,
                   "heldout_before": slim(before), "heldout_after": slim(after), "heldout_change": diff,
                   "memory": run_memory(run, all_metrics, run_mem, run_tracker, isolate, heap)}
        write_json_atomic(run.summary, summary)
        tracking.log_summary(summary, L.iterations)
        if before or after:
            echo("")
            echo(format_before_after(before, after, diff))
        echo(f"\nfinal adapter: {final}")
        return summary
