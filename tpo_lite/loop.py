"""The TPO iteration loop, its run directory and resume after a crash or ``kill -9``.

Run directory (``<loop.runs_root>/<loop.name>/``)::

    config.toml              resolved config (every option, with its help), written once the start's inputs are
                             checked (:func:`prepare_run_dir`), then rewritten atomically at each start
    run.json                 what the run depends on besides its config, written once: the training set's
                             content hash and its instruction ids in the order the iterations take them
    .lock                    flock()ed while a process works on the run (the kernel drops it on kill -9)
    eval_base/               held-out score of the seed model: outputs.jsonl, eval.json (+ eval.md)
    iter_01/
      plan.json              the instruction ids of this iteration (fixed when the iteration first starts)
      samples.jsonl          one record per instruction with its K samples (appended as each prompt finishes)
      generate.done.json     stage DONE marker (+ stage stats)
      judgements.jsonl       one record per instruction (response-only scores; null = invalid sample)
      judge.done.json
      pairs.jsonl            best-vs-worst pairs (our record) and pairs.trl.jsonl (TRL prompt/chosen/rejected)
      pairs.done.json
      adapter/ ...           written by tpo_lite.train (resumable on its own), train.done.json
      validation/            validation-split score after this iteration (loop.validation_instructions > 0)
      heldout/               held-out score after this iteration (when evaluated); producer.json says what
                             it scored (adapter path + weights' sha256, eval settings); a result of another
                             producer is set aside as heldout.stale/ and scored again, never reused
      metrics.json           the iteration's stats (also printed as a table)
    summary.json             per-iteration metrics and the before/after held-out comparison

Resume: every stage first reads what is already on disk. Sampling and judging skip every ``prompt_id``
already recorded (records are keyed, written whole, fsync'ed -- see :mod:`tpo_lite.jsonl`); stages whose
``*.done.json`` exists are skipped; whole-file outputs are replaced atomically. Per-sample seeds are derived
from ``(loop.seed, iteration, prompt_id, sample index)``, so a resumed run samples exactly what the
uninterrupted run would have.

Integrity: a DONE marker records the line count and sha256 of the files its stage wrote (``files``; the train
marker the adapter's sha256); a later stage reads them back only when they still match, and a record whose
``prompt_id`` is not in the iteration's plan (or, for judgements, not sampled) is refused, never trained on.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import RunConfig, load_config, to_toml
from .errors import TpoError
from .fingerprint import model_environment
from .jsonl import append_record, read_json, read_records, write_json_atomic, write_text_atomic

RUN_RECORD = "run.json"

STAGES = ("generate", "judge", "pairs", "train")
# loop options that may change between a run and its resume (they do not alter finished work)
RESUME_SAFE = {("loop", "iterations"), ("loop", "eval_before"), ("loop", "eval_after"),
               ("loop", "eval_every_iteration"), ("loop", "name"), ("loop", "runs_root")}


# ----------------------------------------------------------------------------------------------- run dir

def resolve_run_dir(config: RunConfig, run_dir: str | os.PathLike | None = None) -> Path:
    """``run_dir`` if given, else ``<loop.runs_root>/<loop.name>``."""
    if run_dir is not None:
        return Path(run_dir)
    return Path(config.loop.runs_root) / config.loop.name


def iter_dir(run_dir: Path, t: int) -> Path:
    return Path(run_dir) / f"iter_{t:02d}"


def _done_path(d: Path, stage: str) -> Path:
    return Path(d) / f"{stage}.done.json"


def is_done(d: Path, stage: str) -> bool:
    return _done_path(d, stage).exists()


def _file_record(path: Path) -> dict:
    data = Path(path).read_bytes()
    return {"records": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}


def _mark_done(d: Path, stage: str, info: dict, files: Iterable[str] = ()) -> None:
    """Write the stage's DONE marker; ``files`` (names in ``d``) get their line count and sha256 recorded, so a
    later read can tell a damaged or replaced file from the one the stage finished with."""
    rec = {"stage": stage, "finished_at": time.time(), **info}
    from .memory import StageMemory

    if StageMemory.active is not None:  # the stage's peak memory (see _measured)
        rec["memory"] = StageMemory.active.record()
    if files:
        rec["files"] = {name: _file_record(Path(d) / name) for name in files}
    write_json_atomic(_done_path(d, stage), rec)


# the stat a DONE marker of an older run holds for its file's record count
_LEGACY_COUNT = {"generate": "n_prompts", "judge": "n_judged", "pairs": "pairs_kept"}


def _missing_note(missing: list) -> str:
    if not missing:
        return ""
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"; missing: {', '.join(map(str, missing[:5]))}{more}"


def _checked_records(d: Path, stage: str, name: str, key: str | None = None, expected: Iterable | None = None):
    """The records of ``d/name``, a file stage ``stage`` finished, read back only if it is still what the
    stage's DONE marker recorded (sha256, or the record count for markers of older runs). ``expected``: the
    keys the file should hold, named in the error when some are gone."""
    path, marker_path = Path(d) / name, _done_path(d, stage)
    marker = read_json(marker_path)
    want = (marker.get("files") or {}).get(name)
    fix = (f"restore it, or delete {marker_path.name} (and the later *.done.json of {Path(d).name}) to redo that "
           "stage")
    if not path.exists():
        n = f" with {want['records']} records" if want else ""
        raise TpoError(f"missing, but {marker_path.name} says the stage finished{n}"
                       f"{_missing_note(list(expected or []))}; {fix}", path=str(path))
    data = path.read_bytes()
    recs = read_records(path, key=key)
    if want is not None:
        ok = hashlib.sha256(data).hexdigest() == want["sha256"]
        n_then = want["records"]
    else:
        n_then = marker.get(_LEGACY_COUNT.get(stage, ""))
        ok = n_then is None or n_then == len(recs)
    if not ok:
        torn = " and a torn last line" if data and not data.endswith(b"\n") else ""
        missing = [k for k in (expected or []) if k not in recs] if key is not None else []
        raise TpoError(f"does not match {marker_path.name}: {n_then} records when the stage finished, {len(recs)} "
                       f"complete now{torn}{_missing_note(missing)}; it was changed or damaged after the stage "
                       f"finished: {fix}", path=str(path))
    return recs


def _plan_ids(d: Path) -> list | None:
    plan = Path(d) / "plan.json"
    return [p["id"] for p in read_json(plan)["instructions"]] if plan.exists() else None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def adapter_digest(adapter: str | os.PathLike | None) -> str | None:
    """sha256 over a peft adapter's weights and config (``adapter_model.*``, ``adapter_config.json``): what a
    result was produced with, since the same path can hold other weights after an iteration is trained again.
    None for no adapter (the seed model) or a path that is not a directory here (a server-side adapter)."""
    if adapter is None or not Path(adapter).is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(Path(adapter).iterdir()):
        if p.is_file() and (p.name.startswith("adapter_model") or p.name == "adapter_config.json"):
            h.update(p.name.encode() + b"\0" + _sha256_file(p).encode())
    return h.hexdigest()


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Exclusive lock on a run directory, so two processes never append to the same files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TpoError("another tpo-lite process is working on this run directory", path=str(run_dir)) \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock


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


def _work_in(run_dir: Path) -> list[str]:
    """What an earlier start left in ``run_dir`` (the lock file does not count)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name != ".lock" and not p.name.startswith(".config.toml."))


def _instructions_record(config: RunConfig, instructions) -> dict:
    """The training set as the run depends on it: source, content hash, and the instruction ids in the order the
    iterations take them (plus the validation split)."""
    from .instructions import embedded_path

    content = [[i.id, i.instruction, getattr(i, "category", ""), list(getattr(i, "checks", None) or [])]
               for i in instructions]
    train, val = _split_order(config, len(instructions))
    return {"source": str(config.loop.train_instructions or embedded_path("train")), "n": len(instructions),
            "sha256": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
            "train_order": [instructions[i].id for i in train], "validation": [instructions[i].id for i in val]}


def _run_record(run_dir: Path) -> dict | None:
    p = Path(run_dir) / RUN_RECORD
    return read_json(p) if p.exists() else None


def _check_training_set(config: RunConfig, run_dir: Path, instructions, allow_config_change: bool,
                        echo: Callable[[str], None]) -> None:
    now = _instructions_record(config, instructions)
    rec = _run_record(run_dir)
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
        where = f"; recorded in {Path(run_dir) / RUN_RECORD})"
        going_on = "going on with the recorded order (instructions not in it are not used)"
    else:
        # A run from before run.json: its plans must still be what the current order gives.
        bad = [t for t, d in _iter_dirs(run_dir) if (ids := _plan_ids(d)) is not None
               and ids != _plan_slice(config, now["train_order"], t)]
        if not bad:
            return
        what = "the training set or its order changed since this run started"
        where = f" (iter_{bad[0]:02d}/plan.json does not match it)"
        going_on = "finished plans are kept; later iterations follow the current order (recorded in run.json now)"
    src = now["source"]
    if not allow_config_change:
        raise TpoError(f"{what}{where}: the iterations would take other instructions, and later ones could reuse "
                       f"instructions of earlier ones; restore it, pick a new --name, or pass --allow-config-change "
                       f"({going_on})", path=src, field="loop.train_instructions")
    echo(f"warning: {src}: loop.train_instructions: {what}{where}; {going_on}")


def _iter_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for d in sorted(Path(run_dir).glob("iter_*")):
        if d.is_dir() and d.name[5:].isdigit():
            out.append((int(d.name[5:]), d))
    return out


def check_run_dir(config: RunConfig, run_dir: Path, allow_config_change: bool = False,
                  echo: Callable[[str], None] = print, instructions=None) -> list:
    """Refuse to start or resume ``run_dir`` with ``config`` where finished work would be mixed with work of
    other settings: a config that differs from the saved config.toml (except :data:`RESUME_SAFE` options), a
    run directory with work but no config.toml, a training set or instruction order that differs from the one
    recorded in run.json; plus :func:`check_run_config`. ``allow_config_change`` turns the refusals into
    warnings through ``echo``. Writes nothing (the dry run calls it too). Returns the training instructions."""
    check_run_config(config)
    run_dir = Path(run_dir)
    saved = run_dir / "config.toml"
    if saved.exists():
        old = load_config(saved)
        diff = [d for d in _config_diff(old.to_dict(), config.to_dict()) if (d[0], d[1]) not in RESUME_SAFE]
        if diff:
            lines = "; ".join(f"{s}.{k}: {a!r} -> {b!r}" for s, k, a, b in diff[:8])
            if not allow_config_change:
                raise TpoError(f"this run was started with a different config ({lines}); resume with the same "
                               "config, pick a new --name, or pass --allow-config-change", path=str(saved))
            echo(f"warning: config changed on resume ({lines}); finished stages are kept as they are")
    elif work := _work_in(run_dir):
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
                        prompts_cfg.system_prompt)
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
    from .evaluate import eval_sampling_config, load_eval_set
    from .prompts import get_template

    L = config.loop
    template = get_template(config.prompts)
    tok = models.load_tokenizer(config.model)
    if instructions is None:
        instructions = load_train_instructions(config)
    _split_order(config, len(instructions))  # too many validation instructions
    heldout = []
    if L.eval_before or L.eval_after or L.eval_every_iteration:
        heldout = load_eval_set(config.eval.eval_set, config.eval.eval_format,
                                max_instructions=config.eval.max_instructions)
    ctx, where = model_context(config)
    if ctx is None:
        return
    from .instructions import embedded_path

    ecfg = config.eval
    train_src = str(L.train_instructions or embedded_path("train"))
    train_idx, val_idx = _split_order(config, len(instructions))
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
    run_dir = Path(run_dir)
    instructions = check_run_dir(config, run_dir, allow_config_change, echo)
    check_inputs(config, instructions)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.toml", to_toml(config))
    if _run_record(run_dir) is None:  # after config.toml: a kill in between leaves a resumable run
        write_json_atomic(run_dir / RUN_RECORD, {"created_at": time.time(),
                                                 "instructions": _instructions_record(config, instructions)})


# --------------------------------------------------------------------------------------------- helpers

def iteration_sample_seed(config: RunConfig, t: int, prompt_id: str, index: int) -> int:
    """Seed of sample ``index`` of ``prompt_id`` in iteration ``t``: :func:`tpo_lite.sampling.sample_seed` with
    run seed ``sampling.seed + t - 1`` (iteration 1 uses sampling.seed itself; later iterations draw fresh
    numbers even when they reuse an instruction). Independent of order, batching and resume."""
    from .sampling import sample_seed

    return sample_seed(config.sampling.seed + t - 1, prompt_id, index)


def _progress(iterable, total: int, desc: str, enabled: bool, unit: str = "prompt"):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)


def load_train_instructions(config: RunConfig):
    from .instructions import embedded_path, load_instructions

    path = config.loop.train_instructions or embedded_path("train")
    items = load_instructions(path)
    if not items:
        raise TpoError("no training instructions", path=str(path), field="loop.train_instructions")
    return items


def _split_order(config: RunConfig, n: int) -> tuple[list[int], list[int]]:
    """(training, validation) indices into the training set: its seed-shuffled order, the last
    ``loop.validation_instructions`` of it set aside (so the training slices do not depend on the split)."""
    order = list(range(n))
    if config.loop.shuffle:
        random.Random(config.loop.seed).shuffle(order)
    v = config.loop.validation_instructions
    if v and v >= n:
        raise TpoError(f"{v} validation instructions leave none of the {n} training instructions to train on",
                       field="loop.validation_instructions")
    return order[:n - v], order[n - v:]


def _ordered_split(config: RunConfig, run_dir: Path | None, instructions) -> tuple[list, list]:
    """(training instructions in the order the iterations take them, validation instructions): the order
    recorded in ``run_dir``'s run.json when there is one (so a changed training file cannot reshuffle a
    running run), else :func:`_split_order`."""
    rec = _run_record(run_dir) if run_dir is not None else None
    if rec is None:
        train, val = _split_order(config, len(instructions))
        return [instructions[i] for i in train], [instructions[i] for i in val]
    by_id = {i.id: i for i in instructions}
    then = rec["instructions"]
    gone = [x for x in then["train_order"] + then["validation"] if x not in by_id]
    if gone:
        raise TpoError(f"instruction {gone[0]!r} of this run's recorded order ({Path(run_dir) / RUN_RECORD}) is no "
                       f"longer in the training set ({len(gone)} gone); restore it or start a new run",
                       path=then["source"], field="loop.train_instructions")
    return [by_id[x] for x in then["train_order"]], [by_id[x] for x in then["validation"]]


def validation_split(config: RunConfig, instructions=None, run_dir: Path | None = None) -> list:
    """The validation instructions (``loop.validation_instructions`` of the training set, never in a plan; in
    the order recorded in ``run_dir``'s run.json when given)."""
    if instructions is None:
        instructions = load_train_instructions(config)
    return _ordered_split(config, run_dir, instructions)[1]


def _plan_slice(config: RunConfig, order: list, t: int) -> list:
    """The entries of ``order`` iteration ``t`` takes (slice t when ``fresh_instructions``, wrapping around when
    the set runs out; an entry is never taken twice in one iteration)."""
    n = config.loop.prompts_per_iteration
    start = (t - 1) * n if config.loop.fresh_instructions else 0
    out, seen = [], set()
    for i in range(n):
        x = order[(start + i) % len(order)]
        key = getattr(x, "id", x)
        if key not in seen:  # prompts_per_iteration larger than the set: never sample an id twice
            seen.add(key)
            out.append(x)
    return out


def iteration_plan(config: RunConfig, run_dir: Path, t: int, instructions=None) -> list[dict]:
    """The instructions of iteration ``t`` (as dicts), fixed in ``iter_XX/plan.json`` on first use.

    Iteration t takes slice t of the (seed-shuffled) training set when ``fresh_instructions``; it wraps around
    when the set runs out. The validation split (:func:`validation_split`) is never planned. The order is the
    one recorded in run.json when the run has one.
    """
    d = iter_dir(run_dir, t)
    plan_path = d / "plan.json"
    if plan_path.exists():
        return read_json(plan_path)["instructions"]
    if instructions is None:
        instructions = load_train_instructions(config)
    order = _ordered_split(config, run_dir, instructions)[0]
    n = config.loop.prompts_per_iteration
    start = (t - 1) * n if config.loop.fresh_instructions else 0
    if start + n > len(order):
        print(f"warning: iteration {t} needs instructions {start + 1}..{start + n} but the training set has "
              f"{len(order)}; wrapping around (instructions are reused)", file=sys.stderr)
    plan = [{"id": inst.id, "instruction": inst.instruction, "category": getattr(inst, "category", ""),
             "checks": list(getattr(inst, "checks", None) or [])} for inst in _plan_slice(config, order, t)]
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path, {"iteration": t, "instructions": plan})
    return plan


def _as_instruction(rec: dict) -> dict:
    # Judges read only .instruction/.checks (tpo_lite.judges.base.instruction_text/_checks); a dict is accepted.
    return {"id": rec.get("id", rec.get("prompt_id")), "instruction": rec["instruction"],
            "category": rec.get("category") or "", "checks": list(rec.get("checks") or [])}


def adapter_for(run_dir: Path, t: int, config: RunConfig) -> str | None:
    """The adapter iteration ``t`` samples with: the adapter of t-1, or with keep_best the one with the best
    validation score so far (``iter_XX/validation/eval.json``; the reported held-out set is never read)."""
    if t <= 1:
        return None
    if config.loop.keep_best:
        best, best_score = None, -math.inf
        for s in range(1, t):
            res = iter_dir(run_dir, s) / "validation" / "eval.json"
            ad = trained_adapter(run_dir, s)
            if ad is not None and res.exists():
                r = read_json(res)
                prod = r.get("producer")
                if prod is not None and (prod.get("adapter"), prod.get("adapter_sha256")) != (ad, adapter_digest(ad)):
                    raise TpoError(f"scored {prod.get('adapter') or 'the seed model'}, not iteration {s}'s adapter as "
                                   "it is now; `tpo-lite run` scores it again", path=str(res))
                if r["mean_score"] > best_score:
                    best, best_score = ad, r["mean_score"]
        if best is not None:
            return best
    for s in range(t - 1, 0, -1):  # the last trained adapter (an iteration with no pairs trains nothing)
        ad = trained_adapter(run_dir, s)
        if ad is not None:
            return ad
    return None


def trained_adapter(run_dir: Path, s: int) -> str | None:
    """The adapter iteration ``s`` trained, checked against its train.done.json (present, same weights); None
    when the iteration has not finished training or had no pairs to train on."""
    d = iter_dir(run_dir, s)
    if not is_done(d, "train"):
        return None
    marker = read_json(_done_path(d, "train"))
    if "skipped" in marker:
        return None
    ad = d / "adapter"
    fix = (f"restore it, or delete {d.name}/train.done.json (and everything of later iterations) to train it "
           "again")
    if not ad.is_dir():
        raise TpoError(f"missing, but {d.name}/train.done.json says iteration {s} trained it; the next iteration "
                       f"would start from another model: {fix}", path=str(ad))
    want = marker.get("adapter_sha256")
    if want is not None and adapter_digest(ad) != want:
        raise TpoError(f"its weights are not the ones {d.name}/train.done.json recorded (sha256 {want[:12]}...); it "
                       f"was changed or damaged after training: {fix}", path=str(ad))
    return str(ad)


def _refuse_foreign(path: Path, records: dict, allowed, source: Path, what: str) -> None:
    """A record whose key is not in ``allowed`` came from elsewhere (another run, a hand edit): refuse it rather
    than judge or train on it."""
    allowed = set(allowed)
    foreign = [k for k in records if k not in allowed]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise TpoError(f"record {foreign[0]!r}{more} is not in {what} ({source}); a record from elsewhere is never "
                       "judged or trained on: remove it", path=str(path), field="prompt_id")


def _require(d: Path, stage: str, for_stage: str) -> None:
    if not is_done(d, stage):
        raise TpoError(f"stage '{stage}' has not finished in {d}; run it before '{for_stage}'", path=str(d))


# ----------------------------------------------------------------------------------------------- models

def _load(config: RunConfig, adapter: str | None, tokenizer_only: bool = False):
    from . import models

    if tokenizer_only and hasattr(models, "load_tokenizer"):
        return None, models.load_tokenizer(config.model)
    return models.load_model(config.model, adapter=adapter)


def _backend(config: RunConfig) -> str:
    return str(getattr(config.sampling, "backend", "local"))


def make_sampler(config: RunConfig, model, tokenizer, template, adapter: str | None = None,
                 progress: bool = True):
    """The sampler of ``config.sampling`` (local transformers, or an OpenAI-compatible server that must serve
    ``adapter``; :func:`tpo_lite.sampling.make_sampler` refuses loudly if it cannot)."""
    from . import sampling

    return sampling.make_sampler(config.sampling, tokenizer, template, model=model,
                                 adapter=adapter if _backend(config) != "local" else None, progress=progress)


def make_run_judge(config: RunConfig, run_dir: Path):
    """The configured judge, caching judgements in ``<run_dir>/judge_cache.sqlite`` (unless judge.cache_path
    names another file or judge.cache is off)."""
    from .judges import make_judge

    return make_judge(config.judge, cache_path=Path(run_dir) / "judge_cache.sqlite")


def _heldout_judge_choice(config: RunConfig, items) -> str:
    choice = config.loop.heldout_judge
    if choice == "auto":
        choice = "programmatic" if all(getattr(it, "checks", None) for it in items) else "judge"
    return choice


def heldout_producer(config: RunConfig, adapter: str | None, items) -> dict:
    """What a held-out (or validation) result depends on: the adapter (path and :func:`adapter_digest`; None =
    the seed model) and a sha256 of the settings that shape the score (model, prompts, eval decoding and
    table, the held-out judge, the items). A result is reused only for an equal producer."""
    from . import evaluate as ev

    ecfg = config.eval
    gen = ev._generation_settings(config, None, ev.eval_sampling_config(config.sampling, ecfg), ecfg)
    gen["sampling"].pop("k", None)  # one output per item: K does not shape the eval
    choice = _heldout_judge_choice(config, items)
    settings = {"generation": gen, "eval": dataclasses.asdict(ecfg), "heldout_judge": choice,
                "judge": dataclasses.asdict(ev.eval_judge_config(config)) if choice == "judge" else None,
                "items": [[it.id, it.instruction, list(getattr(it, "checks", None) or [])] for it in items]}
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return {"adapter": adapter, "adapter_sha256": adapter_digest(adapter),
            "settings_sha256": hashlib.sha256(blob).hexdigest()}


def make_heldout_judge(config: RunConfig, run_dir: Path, items, echo: Callable[[str], None] | None = None):
    """The judge of the held-out score (see loop.heldout_judge): 'judge' is the evaluation judge
    ([eval_judge], else [judge]; a warning through ``echo`` when it is the learned judge the run optimised)."""
    if _heldout_judge_choice(config, items) == "judge":
        from .evaluate import make_eval_judge

        return make_eval_judge(config, Path(run_dir) / "judge_cache.sqlite", echo)
    from .judges.programmatic import ProgrammaticJudge

    # tie_weight 0: the held-out score is the plain fraction of checks passed (no near-miss credit).
    return ProgrammaticJudge(tie_weight=0.0)


# ----------------------------------------------------------------------------------------------- stages

def _measured(stage: str):
    """Run a stage of iteration t under :class:`tpo_lite.memory.StageMemory`: its DONE marker records the
    stage's peak RSS (and CUDA peaks), and what it loaded is freed (gc, malloc_trim) before the next stage
    loads. A stage already done is only read back: nothing to measure."""
    import functools

    def wrap(fn):
        @functools.wraps(fn)
        def inner(config, run_dir, t, *args, **kwargs):
            if is_done(iter_dir(run_dir, t), stage):
                return fn(config, run_dir, t, *args, **kwargs)
            from .memory import StageMemory

            with StageMemory():
                return fn(config, run_dir, t, *args, **kwargs)
        return inner
    return wrap


def _measured_call(store: dict, key: str, done: Path, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` under StageMemory (freeing what it loaded afterwards); its record goes to
    ``store[key]`` unless ``done`` existed before (then the result was only read back)."""
    from .memory import StageMemory

    fresh = not Path(done).exists()
    with StageMemory() as mem:
        out = fn(*args, **kwargs)
    if fresh:
        store[key] = mem.record()
    return out


def _iteration_memory(d: Path, m: dict, measured: dict) -> dict:
    """Memory records of iteration ``d`` by stage: the four stages' from their DONE markers (moved out of
    ``m``), validation / held-out from ``measured`` or, when they were reused, from the previous metrics.json."""
    old = {}
    if (d / "metrics.json").exists():
        old = read_json(d / "metrics.json").get("memory") or {}
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


@_measured("generate")
def generate_stage(config: RunConfig, run_dir: Path, t: int, progress: bool = True,
                   echo: Callable[[str], None] = print, sampler_factory=None) -> dict:
    """Sample K outputs for every planned instruction of iteration ``t`` not yet in samples.jsonl."""
    from .parsing import parse_output
    from .prompts import build_prompt, get_template
    from .sampling import PromptJob

    d = iter_dir(run_dir, t)
    if is_done(d, "generate"):
        return read_json(_done_path(d, "generate"))
    if t > 1:
        _require(iter_dir(run_dir, t - 1), "train", f"generate (iteration {t})")
    plan = iteration_plan(config, run_dir, t)
    path = d / "samples.jsonl"
    done = read_records(path, key="prompt_id")
    _refuse_foreign(path, done, [p["id"] for p in plan], d / "plan.json", "this iteration's plan")
    todo = [p for p in plan if p["id"] not in done]
    k = int(config.sampling.k)
    template = get_template(config.prompts)
    if todo:
        adapter = adapter_for(run_dir, t, config)
        echo(f"[iter {t}] generate: {len(todo)} of {len(plan)} instructions to sample (K={k}), "
             f"model {'+ adapter ' + adapter if adapter else '(seed, no adapter)'}")
        model, tok = _load(config, adapter, tokenizer_only=_backend(config) != "local")
        ctx, where = model_context(config, model)
        gen = max_output_tokens(config.sampling, template, tok)
        # Every planned prompt, recorded ones skipped: a local sampler batches by the whole job list, so a
        # resume redoes a partly recorded batch with the layout (and so the outputs) of the uninterrupted run.
        jobs, by_id = [], {}
        for p in plan:
            text = build_prompt(tok, p["instruction"], template, config.prompts.prefill_thought_header,
                                config.prompts.system_prompt)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise TpoError("the prompt is empty after tokenisation", field=f"instruction {p['id']}")
            if ctx is not None and len(ids) + gen > ctx:  # before anything is sampled (also checked at start)
                raise TpoError(f"instruction {p['id']!r}: its prompt is {len(ids)} tokens, which with up to {gen} "
                               f"new tokens does not fit the model's context of {ctx} positions ({where})",
                               path=str(d / "plan.json"), field="sampling.max_new_tokens")
            by_id[p["id"]] = (p, text, ids)
            jobs.append(PromptJob(prompt_id=p["id"], prompt_text=text, prompt_token_ids=ids,
                                  seeds=[iteration_sample_seed(config, t, p["id"], i) for i in range(k)]))
        factory = sampler_factory or make_sampler
        sampler = factory(config, model, tok, template, adapter=adapter, progress=progress)
        del model  # the sampler holds what it needs (a merged sampling copy for a LoRA model)
        # The sampler shows its own progress bar (per sample, with tokens/s).
        for pid, samples in sampler.sample(jobs, k, skip=set(done)):
            p, text, ids = by_id[pid]
            out = []
            for s in samples:
                parsed = parse_output(s.text, template, s.finish_reason)
                out.append({"index": s.index, "seed": s.seed, "text": s.text, "token_ids": list(s.token_ids),
                            "thought": parsed.thought, "response": parsed.response, "valid": bool(parsed.valid),
                            "invalid_reason": parsed.invalid_reason, "finish_reason": s.finish_reason,
                            "forced": bool(getattr(s, "forced", False))})
            append_record(path, {"prompt_id": pid, "instruction": p["instruction"], "category": p["category"],
                                 "checks": p["checks"], "prompt_text": text, "prompt_token_ids": list(ids),
                                 "samples": out})
        del sampler
    done = read_records(path, key="prompt_id")
    missing = [p["id"] for p in plan if p["id"] not in done]
    if missing:
        raise TpoError(f"the sampler returned nothing for {len(missing)} instructions (first: {missing[0]})",
                       path=str(path))
    stats = sample_stats(list(done.values()))
    _mark_done(d, "generate", stats, files=("samples.jsonl",))
    return stats


@_measured("judge")
def judge_stage(config: RunConfig, run_dir: Path, t: int, progress: bool = True,
                echo: Callable[[str], None] = print, judge=None) -> dict:
    """Score the responses (never the thoughts) of every sampled instruction not yet judged."""
    d = iter_dir(run_dir, t)
    if is_done(d, "judge"):
        return read_json(_done_path(d, "judge"))
    _require(d, "generate", "judge")
    samples = _checked_records(d, "generate", "samples.jsonl", "prompt_id", _plan_ids(d))
    path = d / "judgements.jsonl"
    done = read_records(path, key="prompt_id")
    _refuse_foreign(path, done, samples, d / "samples.jsonl", "the samples")
    for pid, j in done.items():
        if len(j["scores"]) != len(samples[pid]["samples"]):
            raise TpoError(f"record {pid!r} has {len(j['scores'])} scores for {len(samples[pid]['samples'])} "
                           "samples", path=str(path), field="scores")
    todo = [r for pid, r in samples.items() if pid not in done]
    if todo:
        if judge is None:
            judge = make_run_judge(config, run_dir)
        name = str(getattr(judge, "name", type(judge).__name__))
        echo(f"[iter {t}] judge: {len(todo)} of {len(samples)} instructions to judge with {name}")
        for rec in _progress(todo, len(todo), f"iter {t} judging", progress):
            responses = [s["response"] if s["valid"] else None for s in rec["samples"]]
            inst = _as_instruction({**rec, "id": rec["prompt_id"]})
            if any(r is not None for r in responses):
                res = judge.score(inst, responses)
                scores, details = list(res.scores), list(res.details)
            else:
                scores, details = [None] * len(responses), [{} for _ in responses]
            if len(scores) != len(responses):
                raise TpoError(f"judge {name} returned {len(scores)} scores for {len(responses)} responses",
                               field="judge")
            # An invalid sample is never chosen: its score is null whatever the judge said.
            scores = [None if (r is None or s is None) else float(s) for r, s in zip(responses, scores)]
            append_record(path, {"prompt_id": rec["prompt_id"], "judge": name, "scores": scores,
                                 "details": details})
    done = read_records(path, key="prompt_id")
    stats = score_stats(list(done.values()))
    _mark_done(d, "judge", stats, files=("judgements.jsonl",))
    return stats


@_measured("pairs")
def pairs_stage(config: RunConfig, run_dir: Path, t: int, echo: Callable[[str], None] = print) -> dict:
    """Select best-vs-worst pairs (length-controlled) and write pairs.jsonl + pairs.trl.jsonl."""
    from .pairs import select_pairs, to_trl

    d = iter_dir(run_dir, t)
    if is_done(d, "pairs"):
        return read_json(_done_path(d, "pairs"))
    _require(d, "judge", "pairs")
    by_id = _checked_records(d, "generate", "samples.jsonl", "prompt_id", _plan_ids(d))
    samples = list(by_id.values())
    judgements = list(_checked_records(d, "judge", "judgements.jsonl", "prompt_id", list(by_id)).values())
    tok = None
    if getattr(config.pairs, "length_unit", None) == "tokens":
        tok = _load(config, None, tokenizer_only=True)[1]
    pairs, stats = select_pairs(samples, judgements, config.pairs, tokenizer=tok)
    stats = dict(stats)
    write_text_atomic(d / "pairs.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    write_text_atomic(d / "pairs.trl.jsonl",
                      "".join(json.dumps(to_trl(p), ensure_ascii=False) + "\n" for p in pairs))
    stats.update(pair_length_stats(pairs, samples))
    stats["pairs_kept"] = len(pairs)
    echo(f"[iter {t}] pairs: kept {len(pairs)} of {len(samples)} instructions")
    _mark_done(d, "pairs", stats, files=("pairs.jsonl", "pairs.trl.jsonl"))
    return stats


@_measured("train")
def train_stage(config: RunConfig, run_dir: Path, t: int, progress: bool = True,
                echo: Callable[[str], None] = print) -> dict:
    """DPO on this iteration's pairs, starting from the adapter the iteration sampled with."""
    d = iter_dir(run_dir, t)
    if is_done(d, "train"):
        return read_json(_done_path(d, "train"))
    _require(d, "pairs", "train")
    pairs = _checked_records(d, "pairs", "pairs.jsonl")
    init = adapter_for(run_dir, t, config)
    if not pairs:
        echo(f"[iter {t}] train: no pairs, nothing to train; the adapter of the previous iteration carries on")
        _mark_done(d, "train", {"skipped": "no pairs", "adapter": init})
        return read_json(_done_path(d, "train"))
    from .train import train_iteration

    echo(f"[iter {t}] train: DPO on {len(pairs)} pairs, starting from {init or 'a fresh adapter'}")
    metrics = train_iteration(config.model, config.train, pairs, str(d), init, progress)
    metrics = dict(metrics or {})
    _mark_done(d, "train", {"metrics": metrics, "adapter": str(d / "adapter"),
                            "adapter_sha256": adapter_digest(d / "adapter")})
    return read_json(_done_path(d, "train"))


def _producer_of(out_dir: Path) -> dict | None:
    p = Path(out_dir) / "producer.json"
    return read_json(p) if p.exists() else None


def _existing_heldout(run_dir: Path, producer: dict, dirs: Iterable[Path] | None = None) -> Path | None:
    """A finished held-out result of ``producer`` (same adapter weights, same eval settings) in this run (or in
    ``dirs``), if any."""
    run_dir = Path(run_dir)
    if dirs is None:
        dirs = [run_dir / "eval_base", *sorted(run_dir.glob("iter_*/heldout")), run_dir / "eval_final"]
    for dd in dirs:
        if (dd / "eval.json").exists() and _producer_of(dd) == producer:
            return dd / "eval.json"
    return None


def _set_aside(out_dir: Path) -> Path:
    """Rename a result folder of another producer out of the way (kept, never deleted)."""
    n, stale = 1, out_dir.with_name(out_dir.name + ".stale")
    while stale.exists():
        n += 1
        stale = out_dir.with_name(f"{out_dir.name}.stale{n}")
    os.replace(out_dir, stale)
    return stale


def _eval_items(config: RunConfig):
    from .evaluate import load_eval_set

    e = config.eval
    return load_eval_set(e.eval_set, e.eval_format, max_instructions=e.max_instructions)


def heldout_stage(config: RunConfig, run_dir: Path, out_dir: Path, adapter: str | None, label: str, progress: bool = True,
                  echo: Callable[[str], None] = print, judge=None, items=None) -> dict:
    """Absolute held-out score (mean judge score with bootstrap CI, valid-format rate) of the model with
    ``adapter``, generated by :func:`tpo_lite.evaluate.model_outputs` (the run's sampling backend, format retries)
    and appended per batch to ``out_dir/outputs.jsonl`` so a killed eval resumes. ``items``: score these
    (``EvalItem``s, e.g. the validation split) instead of the [eval] set; no other held-out result is reused.

    The result is keyed by :func:`heldout_producer` (``out_dir/producer.json``, also in eval.json): an existing
    result or partial outputs of another producer are set aside (``<out_dir>.stale``) and scored again."""
    from . import evaluate as ev

    ecfg = config.eval
    reuse = items is None
    if items is None:
        items = _eval_items(config)
    out_dir = Path(out_dir)
    res_path = out_dir / "eval.json"
    producer = heldout_producer(config, adapter, items)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = _producer_of(out_dir)
        if old == producer:
            if res_path.exists():
                return read_json(res_path)
        else:
            stale = _set_aside(out_dir)
            was = (old or {}).get("adapter", read_json(res_path).get("adapter") if res_path.exists() else None)
            echo(f"held-out eval ({label}): {out_dir} scored another model or used other eval settings (adapter "
                 f"{was or 'none'}); kept as {stale.name}, scoring {adapter or 'the seed model'} again")
    same = _existing_heldout(run_dir, producer) if reuse else None
    if same is not None:
        # Same weights, same settings: greedy outputs and scores would be identical, so reuse them.
        echo(f"held-out eval ({label}): same model as {same.parent.name}, reusing its result")
        result = read_json(same)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Copy the outputs too: each held-out folder stays self-contained for eval/experiment/report.
        for name in ("outputs.jsonl", "outputs.meta.json"):
            src = same.parent / name
            if src.exists():
                write_text_atomic(out_dir / name, src.read_text(encoding="utf-8"))
        write_json_atomic(out_dir / "producer.json", producer)
        write_json_atomic(res_path, result)
        return result
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "producer.json", producer)  # before any output: partial outputs are keyed too
    # The same generation path as `tpo-lite eval` (sampling backend, format retries, resumable outputs.jsonl).
    outputs = ev.model_outputs(config, items, out_dir / "outputs.jsonl", adapter=adapter, generator=label,
                               progress=progress, echo=echo, desc=f"held-out eval ({label})")
    if judge is None:
        judge = make_heldout_judge(config, run_dir, items, echo)
    result = ev.absolute_eval(items, outputs, judge, ecfg)
    result["adapter"] = adapter
    result["producer"] = producer
    result["decoding"] = ev.decoding_record(ecfg, config.sampling)
    result["environment"] = model_environment(config.model)  # greedy tokens depend on it (tpo_lite.fingerprint)
    write_json_atomic(res_path, result)
    return result


def validation_stage(config: RunConfig, run_dir: Path, t: int, progress: bool = True,
                     echo: Callable[[str], None] = print, judge=None) -> dict:
    """Score the model after iteration ``t`` on the validation split (``iter_XX/validation/``), with the
    held-out machinery (decoding from [eval], the held-out judge); ``keep_best`` selects on this score."""
    from .evaluate import EvalItem

    items = [EvalItem(id=str(i.id), instruction=i.instruction, category=getattr(i, "category", None) or "",
                      checks=list(getattr(i, "checks", None) or []))
             for i in validation_split(config, run_dir=run_dir)]
    trained = adapter_for(run_dir, t + 1, config.replace("loop", keep_best=False))
    return heldout_stage(config, run_dir, iter_dir(run_dir, t) / "validation", trained, f"val{t:02d}", progress,
                         echo, judge, items=items)


# ---------------------------------------------------------------------------------------------- metrics

def _mean(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def sample_stats(records: list[dict]) -> dict:
    """Format stats of the sampled outputs: valid / forced rates, the invalid ones by reason (cut off by the
    token limit, no response marker, empty response), thought and response lengths."""
    ss = [s for r in records for s in r["samples"]]
    valid = [s for s in ss if s["valid"]]
    return {
        "n_prompts": len(records),
        "n_samples": len(ss),
        "valid_rate": len(valid) / len(ss) if ss else None,
        "forced_rate": _mean(float(s.get("forced", False)) for s in ss),
        "cut_off_rate": _mean(float(s.get("finish_reason") == "length") for s in ss),
        "no_response_marker_rate": _mean(float(s.get("invalid_reason") == "no_response_marker") for s in ss),
        "empty_response_rate": _mean(float(s.get("invalid_reason") == "empty_response") for s in ss),
        "thought_chars_mean": _mean(len(s["thought"] or "") for s in valid),
        "response_chars_mean": _mean(len(s["response"] or "") for s in valid),
        "output_tokens_mean": _mean(len(s["token_ids"]) for s in ss),
    }


def score_stats(judgements: list[dict]) -> dict:
    scores = [x for j in judgements for x in j["scores"] if x is not None]
    return {"n_judged": len(judgements), "n_scored": len(scores), "mean_score": _mean(scores),
            "best_score_mean": _mean(max((x for x in j["scores"] if x is not None), default=None)
                                     for j in judgements)}


def pair_length_stats(pairs: list[dict], samples: list[dict]) -> dict:
    """Response lengths (characters) of chosen and rejected -- over pairs whose rejected output is valid, the
    ones length control balances --, output lengths (tokens) of both, and the chosen thought length."""
    by_id = {r["prompt_id"]: r for r in samples}
    ch, rj, ct, rt, th = [], [], [], [], []
    for p in pairs:
        ss = by_id[p["prompt_id"]]["samples"]
        c, r = ss[p["chosen_index"]], ss[p["rejected_index"]]
        if r["valid"]:
            ch.append(len(c["response"] or "")), rj.append(len(r["response"] or ""))
        ct.append(len(p.get("chosen_token_ids") or c["token_ids"]))
        rt.append(len(p.get("rejected_token_ids") or r["token_ids"]))
        th.append(len(c["thought"] or ""))
    return {"chosen_response_chars": _mean(ch), "rejected_response_chars": _mean(rj),
            "chosen_tokens": _mean(ct), "rejected_tokens": _mean(rt), "chosen_thought_chars": _mean(th)}


def iteration_metrics(run_dir: Path, t: int) -> dict:
    d = iter_dir(run_dir, t)
    m: dict[str, Any] = {"iteration": t}
    for stage in STAGES:
        if is_done(d, stage):
            info = read_json(_done_path(d, stage))
            info.pop("stage", None), info.pop("finished_at", None), info.pop("files", None)
            if stage == "train":
                m["train"] = info
            else:
                m[stage] = info
    for part in ("heldout", "validation"):
        res = d / part / "eval.json"
        if res.exists():
            r = read_json(res)
            m[part] = {k: r.get(k) for k in ("mean_score", "mean_score_ci", "valid_rate", "n")}
    return m


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


def compare_heldout(before: dict, after: dict, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Paired before/after difference of the per-instruction held-out scores, with a bootstrap CI."""
    from .stats import bootstrap_ci

    a = {r["id"]: r["score"] for r in before["items"]}
    b = {r["id"]: r["score"] for r in after["items"]}
    ids = [i for i in a if i in b]
    diffs = [b[i] - a[i] for i in ids]
    out = {"n": len(ids), "score_diff": _mean(diffs), "score_diff_ci": None,
           "valid_rate_before": before.get("valid_rate"), "valid_rate_after": after.get("valid_rate")}
    if diffs:
        out["score_diff_ci"] = list(bootstrap_ci(diffs, n_boot=n_boot, alpha=alpha, seed=seed))
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
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- run

def describe_plan(config: RunConfig, run_dir: Path | None = None, allow_config_change: bool = False) -> str:
    """The resolved plan (for ``--dry-run``): what will run and what is already done. Runs the checks of a real
    start (:func:`check_run_dir`, :func:`check_inputs`; tokenizer and model config only, no weights), so it
    refuses where the run would, with the same error."""
    run_dir = resolve_run_dir(config, run_dir)
    L = config.loop
    warnings: list[str] = []
    instructions = check_run_dir(config, run_dir, allow_config_change, warnings.append)
    check_inputs(config, instructions)
    lines = [f"run directory: {run_dir}{' (exists: will resume)' if (run_dir / 'config.toml').exists() else ''}",
             *warnings,
             f"model: {getattr(config.model, 'path', None) or config.model}",
             f"template: {config.prompts.template} (prefill_thought_header={config.prompts.prefill_thought_header})",
             f"sampling: backend={_backend(config)} K={config.sampling.k}",
             f"judge: {getattr(config.judge, 'kind', config.judge)}",
             f"iterations: {L.iterations} x {L.prompts_per_iteration} instructions "
             f"({'fresh each iteration' if L.fresh_instructions else 'the same each iteration'}), "
             f"training set: {L.train_instructions or 'embedded'}",
             f"held-out eval: before={L.eval_before} after={L.eval_after} every={L.eval_every_iteration} "
             f"on {config.eval.eval_set} (max {config.eval.max_instructions or 'all'} instructions), "
             f"keep_best={L.keep_best}"]
    for t in range(1, L.iterations + 1):
        d = iter_dir(run_dir, t)
        state = [s for s in STAGES if is_done(d, s)]
        n = len(read_records(d / "samples.jsonl", key="prompt_id")) if (d / "samples.jsonl").exists() else 0
        lines.append(f"  iter {t}: " + (f"done: {', '.join(state)}" if state else "not started")
                     + (f"; {n} instructions sampled" if n and "generate" not in state else ""))
    lines += ["", "resolved config:", to_toml(config)]
    return "\n".join(lines)


def _run_memory(rd: Path, all_metrics: list[dict], measured: dict, tracker) -> dict:
    """summary.json's memory: ``run_peak_rss_mb``, the peak RSS of this call of :func:`run` (a resume measures
    only what it ran), ``stage_peak_rss_mb``, the largest peak of each stage over the iterations, and the
    records of the run-level evaluations (``eval_base``, ``eval_final``)."""
    old = {}
    if (rd / "summary.json").exists():
        old = read_json(rd / "summary.json").get("memory") or {}
    rec = tracker.record()
    out: dict[str, Any] = {"run_peak_rss_mb": rec["peak_rss_mb"], "method": rec["method"]}
    if "peak_cuda_allocated_mb" in rec:
        out["run_peak_cuda_allocated_mb"] = rec["peak_cuda_allocated_mb"]
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
    return out


def run(config: RunConfig, run_dir: str | os.PathLike | None = None, progress: bool = True,
        echo: Callable[[str], None] = print, allow_config_change: bool = False, sampler_factory=None,
        judge=None) -> dict:
    """Run (or resume) all iterations; returns the summary also written to ``summary.json``.

    ``sampler_factory(config, model, tokenizer, template, adapter=, adapter_name=)`` and ``judge`` replace the
    configured sampler / judge (tests use scripted ones).
    """
    rd = resolve_run_dir(config, run_dir)
    L = config.loop
    from .memory import StageMemory

    with run_lock(rd), StageMemory(release_after=False) as run_tracker:
        prepare_run_dir(config, rd, allow_config_change, echo)
        echo(f"run directory: {rd}")
        before = None
        run_mem: dict = {}  # peak memory of the run-level evaluations measured by this process
        if L.eval_before:
            before = _measured_call(run_mem, "eval_base", rd / "eval_base" / "eval.json", heldout_stage, config, rd,
                                    rd / "eval_base", None, "seed", progress, echo, judge)
        all_metrics = []
        for t in range(1, L.iterations + 1):
            d = iter_dir(rd, t)
            it_mem: dict = {}
            generate_stage(config, rd, t, progress, echo, sampler_factory)
            judge_stage(config, rd, t, progress, echo, judge)
            pairs_stage(config, rd, t, echo)
            train_stage(config, rd, t, progress, echo)
            last = t == L.iterations
            if L.validation_instructions:
                _measured_call(it_mem, "validation", d / "validation" / "eval.json", validation_stage, config, rd, t,
                               progress, echo, judge)
            if L.eval_every_iteration or (last and L.eval_after):
                trained = adapter_for(rd, t + 1, config.replace("loop", keep_best=False))
                _measured_call(it_mem, "heldout", d / "heldout" / "eval.json", heldout_stage, config, rd,
                               d / "heldout", trained, f"iter{t:02d}", progress, echo, judge)
            m = iteration_metrics(rd, t)
            m["memory"] = _iteration_memory(d, m, it_mem)
            write_json_atomic(d / "metrics.json", m)
            all_metrics.append(m)
            echo("")
            echo(format_table(all_metrics))
        final_adapter = adapter_for(rd, L.iterations + 1, config)
        after = None
        if L.eval_after:
            # An iteration's held-out result counts only if it scored exactly this model with these settings.
            producer = heldout_producer(config, final_adapter, _eval_items(config))
            found = _existing_heldout(rd, producer, [iter_dir(rd, L.iterations) / "heldout"]
                                      + ([Path(final_adapter).parent / "heldout"] if final_adapter else []))
            if found is not None:
                after = read_json(found)
            else:
                after = _measured_call(run_mem, "eval_final", rd / "eval_final" / "eval.json", heldout_stage, config,
                                       rd, rd / "eval_final", final_adapter, "final", progress, echo, judge)
        diff = None
        if before and after:
            diff = compare_heldout(before, after, config.eval.n_boot, config.eval.alpha, config.eval.seed)
        slim = lambda r: None if r is None else {k: v for k, v in r.items() if k != "items"}  # noqa: E731
        summary = {"run_dir": str(rd), "iterations": all_metrics, "final_adapter": final_adapter,
                   "heldout_before": slim(before), "heldout_after": slim(after), "heldout_change": diff,
                   "memory": _run_memory(rd, all_metrics, run_mem, run_tracker)}
        write_json_atomic(rd / "summary.json", summary)
        if before or after:
            echo("")
            echo(format_before_after(before, after, diff))
        echo(f"\nfinal adapter: {final_adapter}")
        return summary
