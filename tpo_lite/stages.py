"""The four stages of a TPO iteration and their registry: generate -> judge -> pairs -> train.

Each :class:`Stage` has a name, the stage it needs first (``train`` of the previous iteration for ``generate``),
its run function ``run(config, run_dir, t, progress=, echo=, **kw) -> stats`` and its DONE marker
(``IterationDir.marker(name)``). `tpo-lite run`, the per-stage commands and the metrics all go through
:data:`STAGES`.

Resume: every stage first reads what is already on disk. Sampling and judging skip every ``prompt_id`` already
recorded (records are keyed, written whole, fsync'ed -- see :mod:`tpo_lite.jsonl`); a stage whose marker exists
is only read back; whole-file outputs are replaced atomically. Per-sample seeds are derived from ``(seed,
iteration, prompt_id, sample index)`` (:func:`tpo_lite.plan.iteration_sample_seed`), so a resumed run samples
exactly what the uninterrupted run would have. A record whose ``prompt_id`` is not in the iteration's plan (or,
for judgements, not sampled) is refused, never trained on.
"""
from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from .errors import TpoError
from .jsonl import append_record, read_records, write_text_atomic
from .plan import iteration_plan, iteration_sample_seed
from .rundir import RECORD_KEYS, IterationDir, RunDir, adapter_digest, scored_model

if TYPE_CHECKING:  # the config pulls in torch; `tpo-lite generate --help` must not
    from .config import RunConfig


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, int] | None  # (stage, iteration offset) that must be done first
    run: Callable[..., dict]
    help: str
    decodes: bool = False  # samples from the policy with the run's sampling backend (stage processes tune the heap)

    def check_needs(self, run_dir, t: int) -> None:
        if self.needs is None or t + self.needs[1] < 1:
            return
        stage, dt = self.needs
        d = RunDir(run_dir).iteration(t + dt)
        if not d.is_done(stage):
            what = f"{self.name} (iteration {t})" if dt else self.name
            raise TpoError(f"stage '{stage}' has not finished in {d.path}; run it before '{what}'", path=str(d.path))


def _measured(stage: str):
    """Run a stage of iteration t under :class:`tpo_lite.memory.StageMemory`: its DONE marker records the
    stage's peak RSS (and CUDA peaks), and what it loaded is freed (gc, malloc_trim) before the next stage
    loads. A stage already done is only read back: nothing to measure."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(config, run_dir, t, *args, **kwargs):
            it = RunDir(run_dir).iteration(t)
            if it.is_done(stage):
                return it.read_marker(stage)
            STAGES[stage].check_needs(run_dir, t)
            from .memory import StageMemory

            with StageMemory():
                return fn(config, RunDir(run_dir), t, *args, **kwargs)
        return inner
    return wrap


def first_unfinished(stage: str, run_dir, iterations: int) -> int | None:
    """The first iteration (1..``iterations``) where ``stage`` has not finished; None when all have."""
    return next((t for t in range(1, iterations + 1) if not RunDir(run_dir).iteration(t).is_done(stage)), None)


# ------------------------------------------------------------------------------------------------ adapters

def adapter_for(run_dir, t: int, config: RunConfig) -> str | None:
    """The adapter iteration ``t`` samples with: the adapter of t-1, or with keep_best the one with the best
    validation score so far (``validation/eval.json``; the reported held-out set is never read)."""
    if t <= 1:
        return None
    run = RunDir(run_dir)
    if config.loop.keep_best:
        best, best_score = None, -math.inf
        for s in range(1, t):
            it = run.iteration(s)
            ad = it.trained_adapter()
            r = it.validation.read_result() if ad is not None else None
            if r is not None:
                prod = r.get("producer")
                if prod is not None:
                    # trained_adapter() checked the weights against the marker's digest: read, not hashed again
                    digest = it.read_marker("train").get("adapter_sha256") or adapter_digest(ad)
                    if scored_model(prod) != (digest or ad):
                        raise TpoError(f"scored {prod.get('adapter') or 'the seed model'}, not iteration {s}'s "
                                       "adapter as it is now; `tpo-lite run` scores it again",
                                       path=str(it.validation.result))
                if r["mean_score"] > best_score:
                    best, best_score = ad, r["mean_score"]
        if best is not None:
            return best
    for s in range(t - 1, 0, -1):  # the last trained adapter (an iteration with no pairs trains nothing)
        ad = run.iteration(s).trained_adapter()
        if ad is not None:
            return ad
    return None


def final_adapter(run_dir, config: RunConfig) -> str | None:
    """The adapter the run ends with (after ``loop.iterations``; keep_best may pick an earlier one)."""
    return adapter_for(run_dir, config.loop.iterations + 1, config)


# -------------------------------------------------------------------------------------------------- stages

def _read(path, cls) -> dict:
    """``{prompt_id: cls record}`` of a record file this stage appends to (what a killed run left)."""
    return {k: cls.from_record(r) for k, r in read_records(path, key="prompt_id",
                                                           required=RECORD_KEYS.get(path.name, ())).items()}


def _finished_samples(d: IterationDir) -> dict:
    """``{prompt_id: PromptSamples}`` of the finished generate stage, checked against its marker."""
    from .records import PromptSamples

    recs = d.checked_records("generate", d.samples, "prompt_id", d.plan_ids())
    return {k: PromptSamples.from_record(r) for k, r in recs.items()}


def _refuse_foreign(path, records: dict, allowed, source, what: str) -> None:
    """A record whose key is not in ``allowed`` came from elsewhere (another run, a hand edit): refuse it rather
    than judge or train on it."""
    allowed = set(allowed)
    foreign = [k for k in records if k not in allowed]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise TpoError(f"record {foreign[0]!r}{more} is not in {what} ({source}); a record from elsewhere is never "
                       "judged or trained on: remove it", path=str(path), field="prompt_id")


@_measured("generate")
def generate_stage(config: RunConfig, run_dir, t: int, progress: bool = True,
                   echo: Callable[[str], None] = print, sampler_factory=None) -> dict:
    """Sample K outputs for every planned instruction of iteration ``t`` not yet in samples.jsonl."""
    from . import loop, models
    from .guard import max_output_tokens, model_context
    from .memory import release
    from .metrics import sample_stats
    from .prompts import build_prompt, get_template
    from .records import PromptSamples
    from .sampling import make_job

    d = run_dir.iteration(t)
    plan = iteration_plan(config, run_dir, t)
    done = _read(d.samples, PromptSamples)
    _refuse_foreign(d.samples, done, [p["id"] for p in plan], d.plan, "this iteration's plan")
    todo = [p for p in plan if p["id"] not in done]
    k = int(config.sampling.k)
    template = get_template(config.prompts)
    if todo:
        adapter = adapter_for(run_dir, t, config)
        echo(f"[iter {t}] generate: {len(todo)} of {len(plan)} instructions to sample (K={k}), "
             f"model {'+ adapter ' + adapter if adapter else '(seed, no adapter)'}")
        if config.sampling.backend == "local":
            model, tok = models.load_model(config.model, adapter=adapter)
        else:  # the server or engine serves the adapter; only the tokenizer is needed here
            model, tok = None, models.load_tokenizer(config.model)
        ctx, where = model_context(config, model)
        gen = max_output_tokens(config.sampling, template, tok)
        # Every planned prompt, recorded ones skipped: a local sampler batches by the whole job list, so a
        # resume redoes a partly recorded batch with the layout (and so the outputs) of the uninterrupted run.
        jobs, by_id = [], {}
        for p in plan:
            text = build_prompt(tok, p["instruction"], template, config.prompts.prefill_thought_header,
                                config.prompts.system_prompt, config.prompts.chat_template_kwargs)
            # make_job's seeds are the run seed's; iteration t samples with its own (fresh when reused).
            job = replace(make_job(p["id"], text, tok, config.sampling),
                          seeds=[iteration_sample_seed(config, t, p["id"], i) for i in range(k)])
            n = len(job.prompt_token_ids)
            if ctx is not None and n + gen > ctx:  # before anything is sampled (also checked at start)
                raise TpoError(f"instruction {p['id']!r}: its prompt is {n} tokens, which with up to {gen} "
                               f"new tokens does not fit the model's context of {ctx} positions ({where})",
                               path=str(d.plan), field="sampling.max_new_tokens")
            by_id[p["id"]] = (p, job)
            jobs.append(job)
        factory = sampler_factory or loop.run_sampler
        sampler = factory(config, model, tok, template, adapter=adapter, progress=progress)
        del model  # the sampler holds what it needs (a merged sampling copy for a LoRA model)
        release()  # the freed weights' heap pages handed back before the KV cache grows
        # The sampler shows its own progress bar (per sample, with tokens/s).
        for pid, samples in sampler.sample(jobs, k, skip=set(done)):
            p, job = by_id[pid]
            rec = PromptSamples(pid, p["instruction"], p["category"], p["checks"], job.prompt_text,
                                job.prompt_token_ids, [s.parsed(template) for s in samples])
            append_record(d.samples, rec.to_record())
        del sampler
    done = _read(d.samples, PromptSamples)
    missing = [p["id"] for p in plan if p["id"] not in done]
    if missing:
        raise TpoError(f"the sampler returned nothing for {len(missing)} instructions (first: {missing[0]})",
                       path=str(d.samples))
    stats = sample_stats(list(done.values()))
    d.mark_done("generate", stats, files=(d.samples,))
    return stats


@_measured("judge")
def judge_stage(config: RunConfig, run_dir, t: int, progress: bool = True,
                echo: Callable[[str], None] = print, judge=None) -> dict:
    """Score the responses (never the thoughts) of every sampled instruction not yet judged."""
    from .metrics import score_stats
    from .records import Judgement

    d = run_dir.iteration(t)
    samples = _finished_samples(d)
    done = _read(d.judgements, Judgement)
    _refuse_foreign(d.judgements, done, samples, d.samples, "the samples")
    for pid, j in done.items():
        if len(j.scores) != len(samples[pid].samples):
            raise TpoError(f"record {pid!r} has {len(j.scores)} scores for {len(samples[pid].samples)} samples",
                           path=str(d.judgements), field="scores")
    todo = [r for pid, r in samples.items() if pid not in done]
    if todo:
        if judge is None:  # caching in the run's judge_cache.sqlite unless judge.cache_path names another file
            from .judges import make_judge

            judge = make_judge(config.judge, cache_path=run_dir.judge_cache)
        name = str(judge.name)
        echo(f"[iter {t}] judge: {len(todo)} of {len(samples)} instructions to judge with {name}")
        from tqdm.auto import tqdm

        for rec in tqdm(todo, desc=f"iter {t} judging", unit="prompt", dynamic_ncols=True, file=sys.stderr,
                        disable=not progress):
            responses = [s.response if s.valid else None for s in rec.samples]
            # Judges read .instruction / .checks of an Instruction or these keys of a dict.
            inst = {"id": rec.prompt_id, "instruction": rec.instruction, "category": rec.category or "",
                    "checks": list(rec.checks or [])}
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
            append_record(d.judgements, Judgement(rec.prompt_id, name, scores, details).to_record())
    stats = score_stats(list(_read(d.judgements, Judgement).values()))
    d.mark_done("judge", stats, files=(d.judgements,))
    return stats


@_measured("pairs")
def pairs_stage(config: RunConfig, run_dir, t: int, progress: bool = True,
                echo: Callable[[str], None] = print) -> dict:
    """Select best-vs-worst pairs (length-controlled) and write pairs.jsonl + pairs.trl.jsonl."""
    from .metrics import pair_length_stats
    from .models import load_tokenizer
    from .pairs import select_pairs, to_trl
    from .records import Judgement

    d = run_dir.iteration(t)
    by_id = _finished_samples(d)
    samples = list(by_id.values())
    judgements = [Judgement.from_record(r) for r in d.checked_records("judge", d.judgements, "prompt_id",
                                                                      list(by_id)).values()]
    tok = load_tokenizer(config.model) if config.pairs.needs_tokenizer else None
    pairs, stats = select_pairs(samples, judgements, config.pairs, tokenizer=tok, sources=(d.samples, d.judgements))
    stats = dict(stats)
    write_text_atomic(d.pairs, "".join(json.dumps(p.to_record(), ensure_ascii=False) + "\n" for p in pairs))
    write_text_atomic(d.pairs_trl, "".join(json.dumps(to_trl(p), ensure_ascii=False) + "\n" for p in pairs))
    stats.update(pair_length_stats(pairs, samples))
    stats["pairs_kept"] = len(pairs)
    echo(f"[iter {t}] pairs: kept {len(pairs)} of {len(samples)} instructions")
    d.mark_done("pairs", stats, files=(d.pairs, d.pairs_trl))
    return stats


@_measured("train")
def train_stage(config: RunConfig, run_dir, t: int, progress: bool = True,
                echo: Callable[[str], None] = print, on_step=None) -> dict:
    """DPO on this iteration's pairs, starting from the adapter the iteration sampled with; ``on_step(history)``
    after each step (:meth:`tpo_lite.tracking.RunTracking.dpo_step_logger`)."""
    d = run_dir.iteration(t)
    pairs = d.checked_records("pairs", d.pairs)
    init = adapter_for(run_dir, t, config)
    if not pairs:
        echo(f"[iter {t}] train: no pairs, nothing to train; the adapter of the previous iteration carries on")
        d.mark_done("train", {"skipped": "no pairs", "adapter": init})
        return d.read_marker("train")
    from .train import train_iteration

    echo(f"[iter {t}] train: DPO on {len(pairs)} pairs, starting from {init or 'a fresh adapter'}")
    metrics = dict(train_iteration(config.model, config.train, pairs, d, init, progress, on_step=on_step) or {})
    d.mark_done("train", {"metrics": metrics, "adapter": str(d.adapter), "adapter_sha256": adapter_digest(d.adapter)})
    return d.read_marker("train")


STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("generate", ("train", -1), generate_stage,
          "Sample sampling.k outputs per planned instruction of one iteration (samples.jsonl), with the adapter of "
          "the previous iteration.", decodes=True),
    Stage("judge", ("generate", 0), judge_stage,
          "Score the responses (never the thoughts) of one iteration's samples (judgements.jsonl)."),
    Stage("pairs", ("judge", 0), pairs_stage,
          "Select length-controlled best-vs-worst pairs of one iteration (pairs.jsonl, pairs.trl.jsonl)."),
    Stage("train", ("pairs", 0), train_stage,
          "Train the LoRA adapter with DPO on one iteration's pairs (adapter/, metrics)."),
)}
