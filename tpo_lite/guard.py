"""What a start or resume of a run must pass before anything is recorded: the saved config, the training set
recorded in run.json, settings that can never train, and prompts + token limits that fit the model's context.
:func:`prepare_run_dir` runs the checks, then writes config.toml (and, once, run.json)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from .config import RunConfig, load_config, to_toml
from .errors import TpoError
from .jsonl import write_json_atomic, write_text_atomic
from .plan import instructions_record, load_train_instructions, plan_slice, split_order
from .rundir import RunDir

# loop options that may change between a run and its resume (they do not alter finished work)
RESUME_SAFE = {("loop", "iterations"), ("loop", "eval_before"), ("loop", "eval_after"),
               ("loop", "eval_every_iteration"), ("loop", "name"), ("loop", "runs_root"), ("loop", "report_to"),
               ("loop", "tracking_dir"), ("loop", "stage_processes")}


def _config_diff(old: dict, new: dict) -> list[tuple[str, str, Any, Any]]:
    out = []
    for sec in sorted(set(old) | set(new)):
        a, b = old.get(sec, {}), new.get(sec, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k, "<absent>") != b.get(k, "<absent>"):
                out.append((sec, k, a.get(k, "<absent>"), b.get(k, "<absent>")))
    return out


def check_run_config(config: RunConfig) -> None:
    """Refuse settings with which a run can never train anything (before anything is sampled)."""
    S = config.sampling
    if S.k < 2:
        raise TpoError(f"{S.k} output per instruction can never make a best-vs-worst pair; use 2 or more (the "
                       "paper samples 8)", path=config.origin("sampling", "k"), field="sampling.k")
    if S.temperature == 0:
        raise TpoError("0 is greedy decoding: the K outputs of an instruction are all the same and never make a "
                       "pair; use a temperature > 0 (e.g. 0.8)", path=config.origin("sampling", "temperature"),
                       field="sampling.temperature")


def _check_training_set(config: RunConfig, run_dir: Path, instructions, allow_config_change: bool,
                        echo: Callable[[str], None]) -> None:
    run = RunDir(run_dir)
    now = instructions_record(config, instructions)
    rec = run.read_run_record()
    if rec is not None:
        then = rec["instructions"]
        same_order = (then["train_order"], then["validation"]) == (now["train_order"], now["validation"])
        if then["sha256"] == now["sha256"] and same_order:
            return
        if then["sha256"] == now["sha256"]:
            why = "loop.seed, loop.shuffle or loop.validation_instructions"
            what = f"the instruction order changed since this run started ({why}"
        else:
            count = f"{then['n']} instructions then, {now['n']} now" if then["n"] != now["n"] else "other contents"
            what = f"the training set changed since this run started ({count}"
        where = f"; recorded in {run.run_record})"
        going_on = "going on with the recorded order (instructions not in it are not used)"
    else:
        # A run from before run.json: its plans must still be what the current order gives.
        bad = [it for it in run.iterations() if (ids := it.plan_ids()) is not None
               and ids != plan_slice(config, now["train_order"], it.t)]
        if not bad:
            return
        what = "the training set or its order changed since this run started"
        where = f" ({bad[0].name}/{bad[0].plan.name} does not match it)"
        going_on = "finished plans are kept; later iterations follow the current order (recorded in run.json now)"
    src = now["source"]
    if not allow_config_change:
        raise TpoError(f"{what}{where}: the iterations would take other instructions, and later ones could reuse "
                       f"instructions of earlier ones; restore it, pick a new --name, or pass --allow-config-change "
                       f"({going_on})", path=src, field="loop.train_instructions")
    echo(f"warning: {src}: loop.train_instructions: {what}{where}; {going_on}")


def check_run_dir(config: RunConfig, run_dir: Path, allow_config_change: bool = False,
                  echo: Callable[[str], None] = print, instructions=None) -> list:
    """Refuse to start or resume ``run_dir`` with ``config`` where finished work would be mixed with work of
    other settings: a config that differs from the saved config.toml (except :data:`RESUME_SAFE` options), a
    run directory with work but no config.toml, a training set or instruction order that differs from the one
    recorded in run.json; plus :func:`check_run_config`. ``allow_config_change`` turns the refusals into
    warnings through ``echo``. Writes nothing (the dry run calls it too). Returns the training instructions."""
    check_run_config(config)
    run = RunDir(run_dir)
    saved = run.config
    if saved.exists():
        old = load_config(saved)
        diff = [d for d in _config_diff(old.to_dict(), config.to_dict()) if (d[0], d[1]) not in RESUME_SAFE]
        if diff:
            lines = "; ".join(f"{s}.{k}: {a!r} -> {b!r}" for s, k, a, b in diff[:8])
            if not allow_config_change:
                raise TpoError(f"this run was started with a different config ({lines}); resume with the same "
                               "config, pick a new --name, or pass --allow-config-change", path=str(saved))
            echo(f"warning: config changed on resume ({lines}); finished stages are kept as they are")
    elif work := run.work():
        msg = (f"missing, but the run directory holds work of an earlier start ({', '.join(work[:4])}"
               f"{', ...' if len(work) > 4 else ''}): its settings cannot be checked against this config, and records "
               "of other settings (e.g. another sampling.k) would be mixed in")
        if not allow_config_change:
            raise TpoError(f"{msg}; restore it, pick a new --name, or pass --allow-config-change", path=str(saved))
        echo(f"warning: {saved}: {msg}; going on with this config")
    if instructions is None:
        instructions = load_train_instructions(config)
    _check_training_set(config, run_dir, instructions, allow_config_change, echo)
    return instructions


def model_context(config: RunConfig, model=None) -> tuple[int | None, str]:
    """(the model's context length in positions, where it was read) from ``model.config`` or the checkpoint's
    config.json; (None, "") when it cannot be told."""
    from .models import float_checkpoint

    mcfg, where = getattr(model, "config", None), ""
    try:
        loc = float_checkpoint(config.model)
        where = str(Path(loc) / "config.json") if Path(loc).is_dir() else f"{loc} config.json"
        if mcfg is None:
            from transformers import AutoConfig

            mcfg = AutoConfig.from_pretrained(loc)
    except Exception:  # noqa: BLE001 -- no config to read: the model load reports the real problem
        if mcfg is None:
            return None, ""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(mcfg, name, None)
        if isinstance(v, int) and v > 0:
            return v, f"{name} in {where or 'the model config'}"
    return None, ""


def max_output_tokens(scfg, template, tokenizer) -> int:
    """The most tokens one output of sampling config ``scfg`` can have (``max_new_tokens``, or with a
    response_budget: the thought's limit + the response marker + the budget)."""
    if not scfg.response_budget:
        return scfg.max_new_tokens
    if not template.response_marker:
        return scfg.response_budget
    marker = len(tokenizer(template.response_marker, add_special_tokens=False)["input_ids"]) + 2  # + separators
    return scfg.max_new_tokens + marker + scfg.response_budget


def _prompt_len(tokenizer, template, prompts_cfg, instruction: str) -> int:
    from .prompts import build_prompt

    text = build_prompt(tokenizer, instruction, template, prompts_cfg.prefill_thought_header,
                        prompts_cfg.system_prompt, prompts_cfg.chat_template_kwargs)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _limit_detail(scfg) -> str:
    if not scfg.response_budget:
        return f"max_new_tokens {scfg.max_new_tokens}"
    return f"max_new_tokens {scfg.max_new_tokens} + response marker + response_budget {scfg.response_budget}"


def check_inputs(config: RunConfig, instructions=None) -> None:
    """What a start needs before anything is recorded: the template, the model's tokenizer, the held-out set,
    and that outputs fit the model's context (``max_position_embeddings``): the sampling and eval token limits,
    and every training / held-out / validation prompt with them. Refuses (never truncates) with the option,
    the file and the instruction."""
    from . import models
    from .evaluate import eval_sampling_config, load_configured_eval_set
    from .prompts import get_template

    L = config.loop
    template = get_template(config.prompts)
    tok = models.load_tokenizer(config.model)
    if instructions is None:
        instructions = load_train_instructions(config)
    split_order(config, len(instructions))  # too many validation instructions
    heldout = []
    if L.eval_before or L.eval_after or L.eval_every_iteration:
        heldout = load_configured_eval_set(config.eval)
    ctx, where = model_context(config)
    if ctx is None:
        return
    from .instructions import embedded_path

    ecfg = config.eval
    train_src = str(L.train_instructions or embedded_path("train"))
    train_idx, val_idx = split_order(config, len(instructions))
    checks = [(config.sampling, ("sampling", "max_new_tokens"), ("sampling", "response_budget"),
               [(instructions[i], train_src) for i in train_idx])]
    evaluated = [(instructions[i], train_src) for i in val_idx] + [(it, str(ecfg.eval_set)) for it in heldout]
    if evaluated:
        try:
            escfg = eval_sampling_config(config.sampling, ecfg)
        except TpoError as e:  # e.g. a thought_budget above eval.max_new_tokens: found now, not after training
            raise TpoError(f"{e.message} (the held-out / validation eval's sampling settings: [sampling] with "
                           f"[eval] decoding, eval.max_new_tokens = {ecfg.max_new_tokens})", path=config.source,
                           field=f"sampling.{e.field}" if e.field else "eval") from None
        checks.append((escfg,
                       ("eval", "max_new_tokens") if ecfg.max_new_tokens else ("sampling", "max_new_tokens"),
                       ("eval", "response_budget") if ecfg.response_budget else ("sampling", "response_budget"),
                       evaluated))
    for scfg, f_max, f_budget, items in checks:
        gen = max_output_tokens(scfg, template, tok)
        fld = f_max if scfg.max_new_tokens >= ctx or not scfg.response_budget else f_budget
        if gen >= ctx:
            raise TpoError(f"up to {gen} new tokens ({_limit_detail(scfg)}) leave no room for a prompt in the "
                           f"model's context of {ctx} positions ({where}); lower it", path=config.origin(*fld),
                           field=".".join(fld))
        for it, src in items:
            n = _prompt_len(tok, template, config.prompts, it.instruction)
            if n + gen > ctx:
                raise TpoError(f"instruction {it.id!r}: its prompt is {n} tokens, which with up to {gen} new tokens "
                               f"({'.'.join(fld)}) does not fit the model's context of {ctx} positions ({where}); "
                               "shorten or remove the instruction, or lower the limit", path=src,
                               field=".".join(fld))


def prepare_run_dir(config: RunConfig, run_dir: Path, allow_config_change: bool = False,
                    echo: Callable[[str], None] = print) -> None:
    """Check that ``config`` may start or resume ``run_dir`` (:func:`check_run_dir`) and that the run's inputs
    work (:func:`check_inputs`), then write config.toml (and, once, run.json). Nothing is written when a check
    fails, so a first start that fails leaves no config behind to refuse its corrected rerun."""
    run = RunDir(run_dir)
    instructions = check_run_dir(config, run.path, allow_config_change, echo)
    check_inputs(config, instructions)
    run.path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.config, to_toml(config))
    if run.read_run_record() is None:  # after config.toml: a kill in between leaves a resumable run
        write_json_atomic(run.run_record, {"created_at": time.time(),
                                           "instructions": instructions_record(config, instructions)})
