"""`tpo-lite run` and the stages on their own: `generate`, `judge`, `pairs`, `train`.

Bad input raises :class:`tpo_lite.errors.TpoError`; these commands print it as one line
(``error: path:line: field: message``) without a traceback and exit with status 2.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from ..errors import TpoError, os_error

_SET_HELP = ("Override one config option, e.g. --set sampling.k=4 --set train.learning_rate=1e-5 (repeatable). VALUE is "
             "TOML (numbers, true/false, [lists], \"strings\"); a bare word is taken as a string.")


class NulSafePath(click.Path):
    """click.Path that lets a value with a NUL through unchecked (os.stat would raise ValueError, a traceback),
    so the command refuses it with its one-line error (:func:`refuse_nul`)."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and "\0" in value:
            return value
        return super().convert(value, param, ctx)


def refuse_nul(**named) -> None:
    """TpoError for the first of ``option=value`` whose value holds a NUL (no file name can)."""
    for where, value in named.items():
        if value is not None and "\0" in str(value):
            raise TpoError("contains a NUL character, which no file name can hold", field=where)


def _fail_cleanly(fn):
    """Turn TpoError (and a disk-full / permission OSError, :func:`tpo_lite.errors.os_error`) into one line on
    stderr + exit 2; Ctrl-C into a resume hint + exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TpoError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except OSError as e:
            err = os_error(e)
            if err is None:
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted; finished records are on disk, run the same command again to resume",
                       err=True)
            sys.exit(130)

    return wrapper


def _list_options(ctx, param, value):
    if not value or ctx.resilient_parsing:
        return
    from ..config import options_reference

    click.echo("Config options (TOML tables; every one can also be given as --set TABLE.KEY=VALUE):\n")
    click.echo(options_reference())
    ctx.exit(0)


def _common(fn):
    """Options shared by every command that opens a run."""
    fn = click.option("--no-progress", is_flag=True, help="Hide the progress bars (log lines are still printed).")(fn)
    fn = click.option("--allow-config-change", is_flag=True,
                      help="Resume a run directory even though its saved config.toml differs from this one in "
                           "options other than loop.iterations / loop.eval_*; finished stages are kept as they "
                           "are.")(fn)
    fn = click.option("--run-dir", type=NulSafePath(file_okay=False), default=None,
                      help="Run directory to use instead of <loop.runs_root>/<loop.name>.")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=_SET_HELP)(fn)
    fn = click.option("--name", default=None,
                      help="Run name (overrides loop.name); the run directory is <loop.runs_root>/<name>.")(fn)
    return fn


def _open(target: str, overrides, name, run_dir):
    """TARGET is a config TOML or a run directory (then its saved config.toml is used)."""
    from ..config import load_config
    from ..rundir import resolve_run_dir

    # Here, with the option's name, not as a ValueError from the first file operation.
    refuse_nul(**{"TARGET": target, "--run-dir": run_dir, "loop.name": name})
    p = Path(target)
    if p.is_dir():
        cfg_path = p / "config.toml"
        if not cfg_path.exists():
            raise TpoError("not a run directory (no config.toml in it)", path=str(p))
        config = load_config(cfg_path, overrides, name=name)
        cfg_file, rd = cfg_path, Path(run_dir) if run_dir else p
    else:
        config = load_config(p, overrides, name=name)
        cfg_file, rd = p, None
    for value, where in ((config.loop.name, "loop.name"), (config.loop.runs_root, "loop.runs_root")):
        if "\0" in str(value):
            raise TpoError("contains a NUL character, which no file name can hold", path=str(cfg_file),
                           field=where)
    return config, rd if rd is not None else resolve_run_dir(config, run_dir)


@click.command("run", context_settings={"max_content_width": 100})
@click.argument("config", metavar="CONFIG.toml")
@click.option("--dry-run", is_flag=True,
              help="Run the checks of a real start (refusing where it would refuse) and print the resolved plan "
                   "(run directory, what is already done, every resolved option); reads the tokenizer and model "
                   "config, never the weights.")
@_common
@click.option("--list-options", is_flag=True, is_eager=True, expose_value=False, callback=_list_options,
              help="List every config option (table, type, default, meaning) and exit.")
@_fail_cleanly
def run_command(config, dry_run, name, overrides, run_dir, allow_config_change, no_progress):
    """Run (or resume) TPO iterations: generate -> judge -> pairs -> train, repeated loop.iterations times.

    Each iteration samples sampling.k thought+response outputs for loop.prompts_per_iteration fresh training
    instructions with the model of the previous iteration, judges the responses only, keeps length-controlled
    best-vs-worst pairs and trains the LoRA adapter with DPO. Per-iteration stats are printed as a table; the
    held-out score before and after (with bootstrap CIs) is printed at the end.

    Everything lands in runs/NAME/ (see docs/running.md). Started again after a crash, Ctrl-C or kill -9, the
    same command resumes where it stopped without re-sampling or re-judging finished prompts.
    """
    from ..loop import describe_plan, run

    cfg, rd = _open(config, overrides, name, run_dir)
    if dry_run:
        click.echo(describe_plan(cfg, rd, allow_config_change))
        return
    run(cfg, rd, progress=not no_progress, echo=click.echo, allow_config_change=allow_config_change)


def _stage_command(stage: str):
    from ..stages import STAGES

    @click.command(stage, context_settings={"max_content_width": 100})
    @click.argument("target", metavar="CONFIG.toml|RUN_DIR")
    @click.option("--iteration", "-i", type=click.IntRange(min=1), default=None,
                  help=f"Iteration to run '{stage}' for; default: the first iteration where it has not "
                       "finished yet.")
    @_common
    @_fail_cleanly
    def command(target, iteration, name, overrides, run_dir, allow_config_change, no_progress):
        from ..guard import prepare_run_dir
        from ..jsonl import write_json_atomic
        from ..metrics import format_table, iteration_metrics
        from ..rundir import RunDir
        from ..stages import first_unfinished

        cfg, rd = _open(target, overrides, name, run_dir)
        t = iteration or first_unfinished(stage, rd, cfg.loop.iterations)
        if t is None:
            click.echo(f"'{stage}' has finished for all {cfg.loop.iterations} iterations of {rd}")
            return
        run = RunDir(rd)
        with run.lock():
            prepare_run_dir(cfg, rd, allow_config_change, click.echo)
            info = STAGES[stage].run(cfg, rd, t, progress=not no_progress, echo=click.echo)
            m = iteration_metrics(rd, t)
            write_json_atomic(run.iteration(t).metrics, m)
        click.echo(format_table([m]))
        return info

    command.help = (f"{STAGES[stage].help}\n\nTARGET is a run config (the run directory is then "
                    "<loop.runs_root>/<loop.name>) or an existing run directory (its config.toml is used). "
                    "Finished work is kept: the stage resumes where it stopped and does nothing if its DONE marker "
                    "exists.")
    return command


generate_command = _stage_command("generate")
judge_command = _stage_command("judge")
pairs_command = _stage_command("pairs")
train_command = _stage_command("train")
