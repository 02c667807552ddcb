"""The TPO iteration loop, its run directory and resume after a crash or ``kill -9``.

Run directory (``<loop.runs_root>/<loop.name>/``)::

    config.toml              resolved config (every option, with its help), rewritten atomically at each start
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
      heldout/               held-out score after this iteration (when evaluated)
      metrics.json           the iteration's stats (also printed as a table)
    summary.json             per-iteration metrics and the before/after held-out comparison

Resume: every stage first reads what is already on disk. Sampling and judging skip every ``prompt_id``
already recorded (records are keyed, written whole, fsync'ed -- see :mod:`tpo_lite.jsonl`); stages whose
``*.done.json`` exists are skipped; whole-file outputs are replaced atomically. Per-sample seeds are derived
from ``(loop.seed, iteration, prompt_id, sample index)``, so a resumed run samples exactly what the
uninterrupted run would have.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
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
from .jsonl import append_record, read_json, read_records, write_json_atomic, write_text_atomic

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


def _mark_done(d: Path, stage: str, info: dict) -> None:
    write_json_atomic(_done_path(d, stage), {"stage": stage, "finished_at": time.time(), **info})


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


def prepare_run_dir(config: RunConfig, run_dir: Path, allow_config_change: bool = False,
                    echo: Callable[[str], None] = print) -> None:
    """Create the run directory, or check that a resumed run uses the same config, and write config.toml."""
    run_dir.mkdir(parents=True, exist_ok=True)
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
    write_text_atomic(saved, to_toml(config))


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


def iteration_plan(config: RunConfig, run_dir: Path, t: int, instructions=None) -> list[dict]:
    """The instructions of iteration ``t`` (as dicts), fixed in ``iter_XX/plan.json`` on first use.

    Iteration t takes slice t of the (seed-shuffled) training set when ``fresh_instructions``; it wraps around
    when the set runs out.
    """
    d = iter_dir(run_dir, t)
    plan_path = d / "plan.json"
    if plan_path.exists():
        return read_json(plan_path)["instructions"]
    if instructions is None:
        instructions = load_train_instructions(config)
    order = list(range(len(instructions)))
    if config.loop.shuffle:
        random.Random(config.loop.seed).shuffle(order)
    n = config.loop.prompts_per_iteration
    start = (t - 1) * n if config.loop.fresh_instructions else 0
    if start + n > len(order):
        print(f"warning: iteration {t} needs instructions {start + 1}..{start + n} but the training set has "
              f"{len(order)}; wrapping around (instructions are reused)", file=sys.stderr)
    chosen = [instructions[order[(start + i) % len(order)]] for i in range(n)]
    seen, plan = set(), []
    for inst in chosen:
        if inst.id in seen:  # prompts_per_iteration larger than the set: never sample an id twice
            continue
        seen.add(inst.id)
        plan.append({"id": inst.id, "instruction": inst.instruction, "category": getattr(inst, "category", ""),
                     "checks": list(getattr(inst, "checks", None) or [])})
    d.mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path, {"iteration": t, "instructions": plan})
    return plan


def _as_instruction(rec: dict) -> dict:
    # Judges read only .instruction/.checks (tpo_lite.judges.base.instruction_text/_checks); a dict is accepted.
    return {"id": rec.get("id", rec.get("prompt_id")), "instruction": rec["instruction"],
            "category": rec.get("category") or "", "checks": list(rec.get("checks") or [])}


def adapter_for(run_dir: Path, t: int, config: RunConfig) -> str | None:
    """The adapter iteration ``t`` samples with: the adapter of t-1 (or the best one so far with keep_best)."""
    if t <= 1:
        return None
    if config.loop.keep_best:
        best, best_score = None, -math.inf
        for s in range(1, t):
            res = iter_dir(run_dir, s) / "heldout" / "eval.json"
            ad = iter_dir(run_dir, s) / "adapter"
            if res.exists() and ad.exists():
                score = read_json(res)["mean_score"]
                if score > best_score:
                    best, best_score = str(ad), score
        if best is not None:
            return best
    for s in range(t - 1, 0, -1):  # the last trained adapter (an iteration with no pairs trains nothing)
        ad = iter_dir(run_dir, s) / "adapter"
        if is_done(iter_dir(run_dir, s), "train") and ad.exists():
            return str(ad)
    return None


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


def make_heldout_judge(config: RunConfig, run_dir: Path, items):
    """The judge of the held-out score (see loop.heldout_judge)."""
    choice = config.loop.heldout_judge
    if choice == "auto":
        choice = "programmatic" if all(getattr(it, "checks", None) for it in items) else "judge"
    if choice == "judge":
        return make_run_judge(config, run_dir)
    from .judges.programmatic import ProgrammaticJudge

    # tie_weight 0: the held-out score is the plain fraction of checks passed (no near-miss credit).
    return ProgrammaticJudge(tie_weight=0.0)


# ----------------------------------------------------------------------------------------------- stages

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
    todo = [p for p in plan if p["id"] not in done]
    k = int(config.sampling.k)
    template = get_template(config.prompts)
    if todo:
        adapter = adapter_for(run_dir, t, config)
        echo(f"[iter {t}] generate: {len(todo)} of {len(plan)} instructions to sample (K={k}), "
             f"model {'+ adapter ' + adapter if adapter else '(seed, no adapter)'}")
        model, tok = _load(config, adapter, tokenizer_only=_backend(config) != "local")
        jobs, by_id = [], {}
        for p in todo:
            text = build_prompt(tok, p["instruction"], template, config.prompts.prefill_thought_header,
                                config.prompts.system_prompt)
            ids = list(tok(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise TpoError("the prompt is empty after tokenisation", field=f"instruction {p['id']}")
            by_id[p["id"]] = (p, text, ids)
            jobs.append(PromptJob(prompt_id=p["id"], prompt_text=text, prompt_token_ids=ids,
                                  seeds=[iteration_sample_seed(config, t, p["id"], i) for i in range(k)]))
        factory = sampler_factory or make_sampler
        sampler = factory(config, model, tok, template, adapter=adapter, progress=progress)
        # The sampler shows its own progress bar (per sample, with tokens/s).
        for pid, samples in sampler.sample(jobs, k):
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
        del model
    done = read_records(path, key="prompt_id")
    missing = [p["id"] for p in plan if p["id"] not in done]
    if missing:
        raise TpoError(f"the sampler returned nothing for {len(missing)} instructions (first: {missing[0]})",
                       path=str(path))
    stats = sample_stats(list(done.values()))
    _mark_done(d, "generate", stats)
    return stats


def judge_stage(config: RunConfig, run_dir: Path, t: int, progress: bool = True,
                echo: Callable[[str], None] = print, judge=None) -> dict:
    """Score the responses (never the thoughts) of every sampled instruction not yet judged."""
    d = iter_dir(run_dir, t)
    if is_done(d, "judge"):
        return read_json(_done_path(d, "judge"))
    _require(d, "generate", "judge")
    samples = read_records(d / "samples.jsonl", key="prompt_id")
    path = d / "judgements.jsonl"
    done = read_records(path, key="prompt_id")
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
    _mark_done(d, "judge", stats)
    return stats


def pairs_stage(config: RunConfig, run_dir: Path, t: int, echo: Callable[[str], None] = print) -> dict:
    """Select best-vs-worst pairs (length-controlled) and write pairs.jsonl + pairs.trl.jsonl."""
    from .pairs import select_pairs, to_trl

    d = iter_dir(run_dir, t)
    if is_done(d, "pairs"):
        return read_json(_done_path(d, "pairs"))
    _require(d, "judge", "pairs")
    samples = list(read_records(d / "samples.jsonl", key="prompt_id").values())
    judgements = list(read_records(d / "judgements.jsonl", key="prompt_id").values())
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
    _mark_done(d, "pairs", stats)
    return stats


def train_stage(config: RunConfig, run_dir: Path, t: int, progress: bool = True,
                echo: Callable[[str], None] = print) -> dict:
    """DPO on this iteration's pairs, starting from the adapter the iteration sampled with."""
    d = iter_dir(run_dir, t)
    if is_done(d, "train"):
        return read_json(_done_path(d, "train"))
    _require(d, "pairs", "train")
    pairs = read_records(d / "pairs.jsonl")
    init = adapter_for(run_dir, t, config)
    if not pairs:
        echo(f"[iter {t}] train: no pairs, nothing to train; the adapter of the previous iteration carries on")
        _mark_done(d, "train", {"skipped": "no pairs", "adapter": init})
        return read_json(_done_path(d, "train"))
    from .train import train_iteration

    echo(f"[iter {t}] train: DPO on {len(pairs)} pairs, starting from {init or 'a fresh adapter'}")
    metrics = train_iteration(config.model, config.train, pairs, str(d), init, progress)
    metrics = dict(metrics or {})
    _mark_done(d, "train", {"metrics": metrics, "adapter": str(d / "adapter")})
    return read_json(_done_path(d, "train"))


def _existing_heldout(run_dir: Path, adapter: str | None) -> Path | None:
    """A finished held-out result of the same model (same adapter, or both none) in this run, if any."""
    run_dir = Path(run_dir)
    for p in [run_dir / "eval_base" / "eval.json", *sorted(run_dir.glob("iter_*/heldout/eval.json")),
              run_dir / "eval_final" / "eval.json"]:
        if p.exists() and read_json(p).get("adapter") == adapter:
            return p
    return None


def heldout_stage(config: RunConfig, run_dir: Path, out_dir: Path, adapter: str | None, label: str, progress: bool = True,
                  echo: Callable[[str], None] = print, judge=None) -> dict:
    """Absolute held-out score (mean judge score with bootstrap CI, valid-format rate) of the model with
    ``adapter``. Outputs are appended per batch to ``out_dir/outputs.jsonl`` so a killed eval resumes."""
    from . import evaluate as ev

    res_path = out_dir / "eval.json"
    if res_path.exists():
        return read_json(res_path)
    same = _existing_heldout(run_dir, adapter)
    if same is not None:
        # Same weights, same (locked) config: greedy outputs and scores would be identical, so reuse them.
        echo(f"held-out eval ({label}): same model as {same.parent.name}, reusing its result")
        result = read_json(same)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Copy the outputs too: each held-out folder stays self-contained for eval/experiment/report.
        src = same.parent / "outputs.jsonl"
        if src.exists():
            write_text_atomic(out_dir / "outputs.jsonl", src.read_text(encoding="utf-8"))
        write_json_atomic(res_path, result)
        return result
    ecfg = config.eval
    items = ev.load_eval_set(ecfg.eval_set, ecfg.eval_format, max_instructions=ecfg.max_instructions)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "outputs.jsonl"
    done = read_records(path, key="id")
    todo_idx = [i for i, it in enumerate(items) if it.id not in done]
    if todo_idx:
        echo(f"held-out eval ({label}): generating {len(todo_idx)} of {len(items)} outputs")
        model, tok = _load(config, adapter)
        # Greedy: batch freely. Sampled: one item per call with seed = eval.seed + its index, so a resumed
        # eval draws what an uninterrupted one would.
        step = ecfg.batch_size if ecfg.temperature == 0 else 1
        chunks = [todo_idx[i:i + step] for i in range(0, len(todo_idx), step)]
        bar = _progress(chunks, len(chunks), f"eval {label}", progress, unit="batch")
        for chunk in bar:
            sub = [items[i] for i in chunk]
            outs = ev.generate_outputs(sub, model, tok, config.prompts, generator=label,
                                       ecfg=dataclasses.replace(ecfg, seed=ecfg.seed + chunk[0]),
                                       sampling_cfg=config.sampling)
            for o in outs:
                append_record(path, dataclasses.asdict(o))
        del model
        done = read_records(path, key="id")
    outputs = [ev.ModelOutput(**done[it.id]) for it in items]
    if judge is None:
        judge = make_heldout_judge(config, run_dir, items)
    result = ev.absolute_eval(items, outputs, judge, ecfg)
    result["adapter"] = adapter
    result["decoding"] = ev.decoding_record(ecfg, config.sampling)
    write_json_atomic(res_path, result)
    return result


# ---------------------------------------------------------------------------------------------- metrics

def _mean(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def sample_stats(records: list[dict]) -> dict:
    """Format stats of the sampled outputs: valid / forced / cut-off rates, thought and response lengths."""
    ss = [s for r in records for s in r["samples"]]
    valid = [s for s in ss if s["valid"]]
    return {
        "n_prompts": len(records),
        "n_samples": len(ss),
        "valid_rate": len(valid) / len(ss) if ss else None,
        "forced_rate": _mean(float(s.get("forced", False)) for s in ss),
        "cut_off_rate": _mean(float(s.get("finish_reason") == "length") for s in ss),
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
            info.pop("stage", None), info.pop("finished_at", None)
            if stage == "train":
                m["train"] = info
            else:
                m[stage] = info
    ho = d / "heldout" / "eval.json"
    if ho.exists():
        r = read_json(ho)
        m["heldout"] = {k: r.get(k) for k in ("mean_score", "mean_score_ci", "valid_rate", "n")}
    return m


_TABLE_ROWS = [
    ("prompts", ("generate", "n_prompts"), "{:.0f}"),
    ("samples", ("generate", "n_samples"), "{:.0f}"),
    ("valid-format rate", ("generate", "valid_rate"), "{:.1%}"),
    ("forced rate", ("generate", "forced_rate"), "{:.1%}"),
    ("cut-off rate", ("generate", "cut_off_rate"), "{:.1%}"),
    ("thought chars", ("generate", "thought_chars_mean"), "{:.0f}"),
    ("response chars", ("generate", "response_chars_mean"), "{:.0f}"),
    ("mean score", ("judge", "mean_score"), "{:.3f}"),
    ("pairs kept", ("pairs", "pairs_kept"), "{:.0f}"),
    ("rejected invalid", ("pairs", "rejected_invalid"), "{:.0f}"),
    ("length rho", ("pairs", "rho"), "{:.2f}"),
    ("chosen resp chars*", ("pairs", "chosen_response_chars"), "{:.0f}"),
    ("rejected resp chars*", ("pairs", "rejected_response_chars"), "{:.0f}"),
    ("chosen tokens", ("pairs", "chosen_tokens"), "{:.0f}"),
    ("rejected tokens", ("pairs", "rejected_tokens"), "{:.0f}"),
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

def describe_plan(config: RunConfig, run_dir: Path | None = None) -> str:
    """The resolved plan (for ``--dry-run``): what will run and what is already done."""
    run_dir = resolve_run_dir(config, run_dir)
    L = config.loop
    lines = [f"run directory: {run_dir}{' (exists: will resume)' if (run_dir / 'config.toml').exists() else ''}",
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


def run(config: RunConfig, run_dir: str | os.PathLike | None = None, progress: bool = True,
        echo: Callable[[str], None] = print, allow_config_change: bool = False, sampler_factory=None,
        judge=None) -> dict:
    """Run (or resume) all iterations; returns the summary also written to ``summary.json``.

    ``sampler_factory(config, model, tokenizer, template, adapter=, adapter_name=)`` and ``judge`` replace the
    configured sampler / judge (tests use scripted ones).
    """
    rd = resolve_run_dir(config, run_dir)
    L = config.loop
    with run_lock(rd):
        prepare_run_dir(config, rd, allow_config_change, echo)
        echo(f"run directory: {rd}")
        before = None
        if L.eval_before:
            before = heldout_stage(config, rd, rd / "eval_base", None, "seed", progress, echo, judge)
        all_metrics = []
        for t in range(1, L.iterations + 1):
            d = iter_dir(rd, t)
            generate_stage(config, rd, t, progress, echo, sampler_factory)
            judge_stage(config, rd, t, progress, echo, judge)
            pairs_stage(config, rd, t, echo)
            train_stage(config, rd, t, progress, echo)
            last = t == L.iterations
            if L.eval_every_iteration or L.keep_best or (last and L.eval_after):
                trained = adapter_for(rd, t + 1, config.replace("loop", keep_best=False))
                heldout_stage(config, rd, d / "heldout", trained, f"iter{t:02d}", progress, echo, judge)
            m = iteration_metrics(rd, t)
            write_json_atomic(d / "metrics.json", m)
            all_metrics.append(m)
            echo("")
            echo(format_table(all_metrics))
        final_adapter = adapter_for(rd, L.iterations + 1, config)
        after = None
        if L.eval_after:
            last_eval = iter_dir(rd, L.iterations) / "heldout" / "eval.json"
            if final_adapter == str(iter_dir(rd, L.iterations) / "adapter") and last_eval.exists():
                after = read_json(last_eval)
            elif final_adapter and (Path(final_adapter).parent / "heldout" / "eval.json").exists():
                after = read_json(Path(final_adapter).parent / "heldout" / "eval.json")
            else:
                after = heldout_stage(config, rd, rd / "eval_final", final_adapter, "final", progress, echo, judge)
        diff = None
        if before and after:
            diff = compare_heldout(before, after, config.eval.n_boot, config.eval.alpha, config.eval.seed)
        slim = lambda r: None if r is None else {k: v for k, v in r.items() if k != "items"}  # noqa: E731
        summary = {"run_dir": str(rd), "iterations": all_metrics, "final_adapter": final_adapter,
                   "heldout_before": slim(before), "heldout_after": slim(after), "heldout_change": diff}
        write_json_atomic(rd / "summary.json", summary)
        if before or after:
            echo("")
            echo(format_before_after(before, after, diff))
        echo(f"\nfinal adapter: {final_adapter}")
        return summary
