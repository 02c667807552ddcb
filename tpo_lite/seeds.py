"""The same run with several seeds: is the held-out gain larger than the spread between runs?

One run's held-out change comes with a paired-bootstrap CI that resamples *instructions*: it says how sure we are
that this trained model beats the seed model on this eval set. It does not cover the variation of the whole loop
(which samples were drawn, which pairs formed, the order of the DPO batches): two runs of one recipe that differ
only in their seeds can end far apart. :func:`run_seeds` runs the config once per seed -- the options named in
``seed_options`` (default ``sampling.seed`` and ``train.seed``) set to that seed, everything else equal -- and
summarises the held-out change over the runs, treating each run as one draw:

* per seed: score before / after and the change with its paired-bootstrap CI (as `tpo-lite run` prints it);
* over seeds: the mean change with a Student-t interval over runs (mean +- t_{n-1} * sd / sqrt(n)), the sd between
  runs, and how many runs improved / improved significantly / got significantly worse.

Directory (``<loop.runs_root>/<loop.name>_seeds/``, :class:`tpo_lite.rundir.SeedsDir`)::

    seed_0/  seed_1/ ...      ordinary run directories (resumable like any run)
    seed_<S>.log              the output of a run started in a child process (``parallel`` > 1)
    seeds.json  seeds.md      the summary (per seed and over seeds)
    seeds.png                 each run's change with its CI and the mean over runs with its interval, and the
                              same for the change's format and answers parts

With ``parallel`` > 1 the runs go to child processes (``python -m tpo_lite run seed_<S>/``), that many at a
time: on a GPU that small models leave mostly idle, runs share it well; on a CPU each child gets
``cpu_count / parallel`` threads (unless OMP_NUM_THREADS is set). Finished runs resume as no-ops, so calling
again summarises without recomputing. The seed model's held-out eval does not depend on the seeds: one run's is
copied into the others (:func:`share_seed_model_eval`) before they start -- in sequence, every run after the first
skips it; in parallel, only runs started after one has finished it do.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

from .errors import TpoError
from .jsonl import write_json_atomic, write_text_atomic
from .rundir import SeedsDir

DEFAULT_SEED_OPTIONS = ("sampling.seed", "train.seed")


def seeds_dir(config, path: str | os.PathLike | None = None) -> Path:
    """``path`` if given, else ``<loop.runs_root>/<loop.name>_seeds``."""
    return Path(path) if path is not None else Path(config.loop.runs_root) / f"{config.loop.name}_seeds"


def seed_configs(config, seeds: Sequence[int], seed_options: Sequence[str] = DEFAULT_SEED_OPTIONS) -> dict:
    """``{seed: RunConfig}``: ``config`` with every option of ``seed_options`` ("table.key") set to the seed and
    the held-out score before training switched on (the change needs it)."""
    from .config import SECTIONS

    if not seeds:
        raise TpoError("give at least one seed", field="--seeds")
    if len(set(seeds)) != len(seeds):
        raise TpoError(f"a seed is listed twice: {list(seeds)}", field="--seeds")
    if not seed_options:
        raise TpoError("name at least one option to set to the seed", field="--seed-options")
    for opt in seed_options:
        table, _, key = opt.partition(".")
        if table not in SECTIONS or key not in {f.name for f in dataclasses.fields(SECTIONS[table])}:
            raise TpoError(f"no such config option {opt!r} (see `tpo-lite run --list-options`)",
                           field="--seed-options")
    base = config.replace("loop", eval_before=True, eval_after=True)
    out = {}
    for s in seeds:
        cfg = base
        for opt in seed_options:
            table, _, key = opt.partition(".")
            cfg = cfg.replace(table, **{key: s})  # the option's own check refuses a seed out of its range
        out[s] = cfg
    return out


def _child_env(parallel: int) -> dict:
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _run_children(seeds: list[int], sd: SeedsDir, parallel: int, allow_config_change: bool,
                  echo: Callable[[str], None]) -> dict[int, int]:
    """Run ``python -m tpo_lite run seed_<S>/`` for each seed, ``parallel`` at a time; {seed: exit status}."""
    cmd = [sys.executable, "-m", "tpo_lite", "run", "--no-progress"]
    if allow_config_change:
        cmd.append("--allow-config-change")
    env = _child_env(parallel)
    waiting, running, status = list(seeds), {}, {}
    t0 = time.time()
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                s = waiting.pop(0)
                log = open(sd.log(s), "ab")
                proc = subprocess.Popen(cmd + [str(sd.run(s).path)], stdout=log, stderr=subprocess.STDOUT, env=env)
                running[s] = (proc, log)
                echo(f"seed {s}: started (pid {proc.pid}), log {sd.log(s)}")
            time.sleep(0.2)
            for s, (proc, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                del running[s]
                status[s] = rc
                tail = "" if rc == 0 else f": {_last_line(sd.log(s))}"
                echo(f"seed {s}: {'finished' if rc == 0 else f'failed (exit {rc})'} after "
                     f"{time.time() - t0:.0f} s{tail}")
    finally:  # Ctrl-C or an error here: stop the children (each run resumes where it stopped)
        for proc, log in running.values():
            proc.terminate()
        for proc, log in running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    return status


def share_seed_model_eval(sd: SeedsDir, cfgs: dict, allow_config_change: bool = False,
                          echo: Callable[[str], None] = print, targets: Sequence[int] | None = None) -> list[int]:
    """Copy a finished held-out eval of the seed model (``eval_base/``) from one seed's run into the runs of the
    other seeds (``targets``, default all of ``cfgs``) that have none yet, where it has the same producer (the
    default seed options do not reach the eval: greedy decoding, retries seeded by ``eval.seed``), so the seed
    model is scored once, not once per seed. Each target gets its config.toml first
    (:func:`tpo_lite.guard.prepare_run_dir`), so the copy is the work of a run with a saved config. Returns the
    seeds that received it."""
    import shutil

    from .evaluate import load_configured_eval_set
    from .guard import prepare_run_dir
    from .heldout import heldout_producer, same_producer

    src = next((sd.run(s).eval_base for s in cfgs if sd.run(s).eval_base.result.exists()), None)
    if src is None:
        return []
    todo = [s for s in (cfgs if targets is None else targets) if not sd.run(s).eval_base.has_work()]
    if not todo:
        return []
    items, made = load_configured_eval_set(cfgs[todo[0]].eval), src.read_producer()
    done = []
    for s in todo:
        if not same_producer(made, heldout_producer(cfgs[s], None, items)):
            continue  # the seed options reach the eval: this seed scores its own
        prepare_run_dir(cfgs[s], sd.run(s).path, allow_config_change, echo)
        dst = sd.run(s).eval_base.path
        tmp = dst.with_name(dst.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src.path, tmp)
        os.replace(tmp, dst)  # whole or not at all
        done.append(s)
    if done:
        echo(f"seed model's held-out eval: copied from {src.path} to the runs of seed{'s' * (len(done) > 1)} "
             f"{', '.join(map(str, done))} (same model, settings and items)")
    return done


# the parts of the held-out change (tpo_lite.metrics.compare_heldout): from outputs that changed format validity,
# and from outputs valid before and after
SPLIT = ("format_change", "both_valid_change")


def summarize_seeds(summaries: dict[int, dict], confidence: float = 0.95) -> dict:
    """The record of ``seeds.json`` from ``{seed: run summary}`` (each with ``heldout_before`` / ``heldout_after``
    / ``heldout_change`` as :func:`tpo_lite.loop.run` writes them)."""
    from .stats import t_interval

    rows = []
    for s in sorted(summaries):
        before, after, change = (summaries[s].get(k) for k in ("heldout_before", "heldout_after", "heldout_change"))
        if not (before and after and change and change.get("score_diff_ci")):
            raise TpoError(f"the run of seed {s} has no held-out score before and after training",
                           path=summaries[s].get("run_dir"))
        lo, hi = change["score_diff_ci"]
        rows.append({"seed": s, "run_dir": f"seed_{s}", "n": change["n"], "judge": after.get("judge"),
                     "before": before["mean_score"], "after": after["mean_score"],
                     "after_model": after.get("model"), "change": change["score_diff"], "change_ci": [lo, hi],
                     "significant": "up" if lo > 0 else "down" if hi < 0 else None,
                     "valid_before": before.get("valid_rate"), "valid_after": after.get("valid_rate"),
                     **{k: change.get(k) for k in SPLIT}, **{f"{k}_ci": change.get(f"{k}_ci") for k in SPLIT}})
    changes = [r["change"] for r in rows]
    t = t_interval(changes, alpha=1.0 - confidence)
    over = {"n_runs": len(rows), "mean_change": t["mean"], "sd_change": t["sd"], "mean_change_ci": t["ci"],
            "mean_before": sum(r["before"] for r in rows) / len(rows),
            "mean_after": sum(r["after"] for r in rows) / len(rows),
            "n_improved": sum(c > 0 for c in changes),
            "n_significant_up": sum(r["significant"] == "up" for r in rows),
            "n_significant_down": sum(r["significant"] == "down" for r in rows)}
    for k in SPLIT:  # the same interval for each part of the change, where every run has the split
        if all(r[k] is not None for r in rows):
            t = t_interval([r[k] for r in rows], alpha=1.0 - confidence)
            over.update({f"mean_{k}": t["mean"], f"mean_{k}_ci": t["ci"]})
    return {"confidence": confidence, "judges": sorted({str(r["judge"]) for r in rows}), "runs": rows,
            "over_seeds": over}


def _arrow(ci) -> str:
    """' ↑' / ' ↓' where a CI excludes 0 upward / downward."""
    return "" if not ci else " ↑" if ci[0] > 0 else " ↓" if ci[1] < 0 else ""


def render_markdown(record: dict, seed_options: Sequence[str], heading: bool = True) -> str:
    """The summary as Markdown: one row per seed, then the mean over runs (``heading``: under a title)."""
    conf = int(round(100 * record["confidence"]))
    o = record["over_seeds"]
    split = any(r.get(k) is not None for r in record["runs"] for k in SPLIT)
    L = (["# Held-out change over seeds", ""] if heading else []) + [
         f"Each run is the same config with {', '.join(f'`{x}`' for x in seed_options)} set to its seed. Judge: "
         f"{', '.join(f'`{j}`' for j in record['judges'])}. Per run: the paired-bootstrap {conf}% CI of the change "
         "(resamples instructions). Over runs: the Student-t interval of the mean change (each run one draw), "
         "which also covers the run-to-run spread.", "",
         "| seed | n | before | after | change [CI] | valid before → after |" + (" format / answers |" if split else ""),
         "|---:|---:|---:|---:|---|---|" + ("---|" if split else "")]
    for r in record["runs"]:
        lo, hi = r["change_ci"]
        mark = _arrow(r["change_ci"])
        vb, va = (("–" if v is None else f"{100 * v:.0f}%") for v in (r["valid_before"], r["valid_after"]))
        parts = " / ".join("–" if r.get(k) is None else f"{r[k]:+.3f}" + _arrow(r.get(f"{k}_ci")) for k in SPLIT)
        L.append(f"| {r['seed']} | {r['n']} | {r['before']:.3f} | {r['after']:.3f} | "
                 f"{r['change']:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark} | {vb} → {va} |" + (f" {parts} |" if split else ""))
    interval = lambda ci: f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (one run: no interval)"  # noqa: E731
    sd = "" if o["sd_change"] is None else f", sd between runs {o['sd_change']:.3f}"
    runs = f"{o['n_runs']} run{'s' if o['n_runs'] != 1 else ''}"
    L += ["", f"**Mean change over {runs}: {o['mean_change']:+.3f}{interval(o['mean_change_ci'])}**{sd}; "
              f"{o['n_improved']} of {o['n_runs']} improved, {o['n_significant_up']} significantly "
              f"(↑), {o['n_significant_down']} significantly worse (↓). Mean score {o['mean_before']:.3f} → "
              f"{o['mean_after']:.3f}."]
    if "mean_format_change" in o:
        L += ["", "Format / answers: the change from outputs whose format validity changed (invalid → valid gains the "
                  "output's whole score) and from outputs valid before and after; the two add up to the change (↑: "
                  "its paired-bootstrap CI excludes 0). "
                  f"Mean over runs: format {o['mean_format_change']:+.3f}{interval(o['mean_format_change_ci'])}, "
                  f"answers {o['mean_both_valid_change']:+.3f}{interval(o['mean_both_valid_change_ci'])}."]
    return "\n".join(L) + "\n"


PANEL_TITLES = {"change": "held-out change", "format_change": "from format (validity changed)",
                "both_valid_change": "from answers (valid before and after)"}


def forest_panels(record: dict) -> list[dict]:
    """What :func:`plot_seeds` draws: one panel for the change and one for each of its parts (format / answers)
    that every run has; each ``{"key", "title", "runs": [(seed, value, ci or None)], "mean": (value,
    ci or None)}``, the mean with its t interval over runs."""
    rows, o = record["runs"], record["over_seeds"]
    panels = [{"key": "change", "runs": [(r["seed"], r["change"], r["change_ci"]) for r in rows],
               "mean": (o["mean_change"], o["mean_change_ci"])}]
    for k in SPLIT:
        if f"mean_{k}" in o:  # summarize_seeds sets it only when every run has the part
            panels.append({"key": k, "runs": [(r["seed"], r[k], r.get(f"{k}_ci")) for r in rows],
                           "mean": (o[f"mean_{k}"], o[f"mean_{k}_ci"])})
    for p in panels:
        p["title"] = PANEL_TITLES[p["key"]]
    return panels


def plot_seeds(record: dict, path: str | os.PathLike) -> None:
    """A forest plot: each run's change with its paired-bootstrap CI and the mean over runs with its t interval;
    beside it, where the runs have the split, the same for the format and answers parts of the change."""
    from .report import pyplot, save_figure

    plt = pyplot()
    panels = forest_panels(record)
    n = len(record["runs"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 1.4 + 0.35 * (n + 1)), sharey=True,
                             squeeze=False)
    ys = list(range(n, 0, -1))

    def point(ax, x, y, ci, **kw):
        err = None if not ci else [[x - ci[0]], [ci[1] - x]]
        ax.errorbar([x], [y], xerr=err, capsize=3, **kw)

    for ax, p in zip(axes[0], panels):
        for y, (_, v, ci) in zip(ys, p["runs"]):
            point(ax, v, y, ci, fmt="o", color="C0")
        point(ax, p["mean"][0], 0, p["mean"][1], fmt="D", color="C3")
        ax.axvline(0.0, color="0.5", lw=0.8, ls="--")
        ax.set_title(p["title"], fontsize=10)
        ax.set_xlabel(f"score change ({int(round(100 * record['confidence']))}% CI)")
    axes[0][0].set_yticks(ys + [0], [f"seed {s}" for s, _, _ in panels[0]["runs"]] +
                          [f"mean of {record['over_seeds']['n_runs']}"])
    axes[0][0].set_ylim(-0.8, n + 0.8)
    save_figure(plt, fig, str(path))


def run_seeds(config, seeds: Sequence[int], path: str | os.PathLike | None = None, parallel: int = 1,
              seed_options: Sequence[str] = DEFAULT_SEED_OPTIONS, progress: bool = True,
              echo: Callable[[str], None] = print, allow_config_change: bool = False, plot: bool = True,
              sampler_factory=None, judge=None) -> dict:
    """Run (or resume) ``config`` once per seed, then write ``seeds.json``, ``seeds.md`` and (``plot``)
    ``seeds.png``; returns the record.

    ``parallel`` = 1 runs the seeds one after the other in this process (with ``sampler_factory`` / ``judge``
    passed to :func:`tpo_lite.loop.run`, which tests script); more runs them in that many child processes. A run
    that fails does not stop the others; a TpoError names the failed seeds and their logs at the end, after the
    finished runs are summarised.
    """
    from . import loop
    from .guard import prepare_run_dir

    if parallel < 1:
        raise TpoError(f"must be at least 1, got {parallel}", field="--parallel")
    if parallel > 1 and (sampler_factory is not None or judge is not None):
        raise TpoError("scripted samplers and judges run in this process only; use parallel = 1", field="--parallel")
    cfgs = seed_configs(config, list(seeds), seed_options)
    sd = SeedsDir(seeds_dir(config, path))
    sd.path.mkdir(parents=True, exist_ok=True)
    failed: dict[int, str] = {}
    summaries: dict[int, dict] = {}
    if parallel == 1:
        for s, cfg in cfgs.items():
            echo(f"== seeds {sd.path.name}: seed {s} ({', '.join(f'{o} = {s}' for o in seed_options)}) ==")
            try:
                share_seed_model_eval(sd, cfgs, allow_config_change, echo, targets=[s])
                summaries[s] = loop.run(cfg, sd.run(s).path, progress=progress, echo=echo,
                                        allow_config_change=allow_config_change, sampler_factory=sampler_factory,
                                        judge=judge)
            except Exception as e:  # the other seeds still run; the traceback goes to the seed's log
                with open(sd.log(s), "a") as f:
                    f.write(traceback.format_exc())
                failed[s] = f"seed {s}: {type(e).__name__}: {e}, see {sd.log(s)}"
                echo(f"seed {s}: failed: {type(e).__name__}: {e}")
    else:
        for s, cfg in cfgs.items():  # checks and config.toml here, so a bad config fails before any child starts
            prepare_run_dir(cfg, sd.run(s).path, allow_config_change, echo)
        share_seed_model_eval(sd, cfgs, allow_config_change, echo)  # from an earlier call's finished run, if any
        for s, rc in _run_children(list(cfgs), sd, parallel, allow_config_change, echo).items():
            summary = sd.run(s).read_summary()
            if rc == 0 and summary is not None:
                summaries[s] = summary
            else:
                failed[s] = f"seed {s}: exit {rc}, see {sd.log(s)}"
    if summaries:
        record = summarize_seeds(summaries, 1.0 - config.eval.alpha)
        record.update({"seed_options": list(seed_options), "seeds": list(cfgs), "failed": sorted(failed)})
        write_json_atomic(sd.record, record)
        table = render_markdown(record, seed_options)
        write_text_atomic(sd.table, table)
        if plot:
            plot_seeds(record, sd.plot)
        echo("")
        echo(table)
    if failed:
        raise TpoError(f"{len(failed)} of {len(cfgs)} runs failed ({'; '.join(failed.values())}); the same command "
                       "resumes them", path=str(sd.path))
    return record
