"""`tpo-lite eval`'s inputs and outputs: the ``[eval]`` table (:class:`EvalConfig`), eval sets
(:func:`load_eval_set`, any format of :mod:`tpo_lite.evalsets`, with baseline answers) and a model's outputs
(:class:`ModelOutput`).

:func:`model_outputs` is the one generation path of ``tpo-lite eval``, the loop's held-out score and the
experiment: the run's prompt template and sampling backend, the eval decoding settings (default greedy), format
errors re-sampled, thoughts stripped by the parser; an output still invalid counts as a loss. Outputs are kept
in one format, ``outputs.jsonl`` (read back by :meth:`tpo_lite.rundir.EvalDir.read_outputs`), with an
AlpacaEval-style ``model_outputs.json`` export for the official tools (:func:`write_model_outputs`). Judging
them is :mod:`tpo_lite.compare`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import TpoError, require_finite, require_seed
from .evalsets import (FORMATS, UNCATEGORISED, EvalItem, category_name, detect_format, eval_records,
                       read_alpaca_eval, read_arena_hard, read_instruction_set, read_json_or_jsonl, record_location,
                       require_str, resolve_eval_set)
from .jsonl import append_record, read_json, read_records, write_json_atomic, write_text_atomic
from .options import option

COMPARISONS = ("auto", "score", "pairwise")


@dataclass
class EvalConfig:
    """The ``[eval]`` table: what to evaluate on and how to decode and judge it."""

    eval_set: str = option("heldout",
        "Eval set: 'heldout' (the embedded held-out instructions with verifiable checks) or a "
        "path to an AlpacaEval JSON/JSONL, an Arena-Hard question JSONL or an instruction JSONL; "
        "with the optional `datasets` library (pip install 'tpo-lite[datasets]') also a .parquet/"
        ".csv/.tsv/.arrow file, a save_to_disk directory or a Hub dataset id (read from the HF "
        "cache when offline), in any of these formats.")
    eval_split: str = option("", "Split of a `datasets` source of eval_set (e.g. 'eval'); empty = its only split.")
    instruction_column: str = option("",
        "Field (column) of eval_set that holds the instruction, renamed to 'instruction' before "
        "the format is read (e.g. 'prompt'); empty = the format's own fields.")
    eval_format: str = option("auto",
        "Format of eval_set: 'auto' (guessed from the first record's keys), 'alpaca_eval', "
        "'arena_hard' or 'instructions'.", choices=FORMATS)
    baseline_outputs: str = option("",
        "Optional file of baseline answers: an AlpacaEval-style model_outputs.json/JSONL "
        "(matched by instruction text) or an Arena-Hard answer JSONL (matched by uid). Empty: "
        "use the 'output' field of an AlpacaEval eval set, if any.")
    max_instructions: int = option(0,
        "Evaluate only the first N instructions of the eval set; 0 = all (the default). Every "
        "evaluation prints how many of how many it scores.")
    max_new_tokens: int = option(0,
        "Token limit of each eval output (thought + response; with a response budget only the part "
        "up to the response marker); 0 = the [sampling] table's limit. An output cut off before "
        "EOS is invalid (re-sampled while format_retries allow, then a loss).")
    temperature: float = option(0.0,
        "Decoding temperature for eval generation; 0 = greedy (deterministic), the default.")
    top_p: float = option(1.0, "Nucleus sampling mass for eval generation (only used when temperature > 0).")
    seed: int = option(0,
        "Seed of eval generation (output i uses seed + i) and of the bootstrap resampling; "
        "0 .. 2**32 - 1.")
    batch_size: int = option(8,
        "Prompts generated together by the local sampler during eval (fixed groups in eval-set "
        "order, so a resumed eval regenerates a group in the same batch layout).")
    format_retries: int = option(2,
        "Re-sample an eval output with a format error (no response marker, empty response, or cut "
        "off by the token limit) up to this many times, as the paper does: the first valid try is "
        "kept, else the last try counts (a loss). Retry r of item i uses a seed hashed from "
        "(eval.seed, i, r) and retry_temperature / retry_top_p. 0 = off. Each output records its "
        "number of tries.")
    retry_temperature: float = option(0.8,
        "Decoding temperature of the format retries; must be > 0 (a greedy retry would repeat the "
        "failed output).")
    retry_top_p: float = option(0.95, "Nucleus sampling mass of the format retries.")
    response_budget: int = option(0,
        "Tokens the response of an eval output may use after its response marker (sets "
        "sampling.response_budget for eval generation); 0 = the [sampling] table's value. One "
        "value for TPO and direct outputs, so only the thought has a budget of its own.")
    comparison: str = option("auto",
        "How the judge compares two responses: 'score' (score difference of a reward model or "
        "the programmatic judge), 'pairwise' (a pairwise judge asked in both orders) or 'auto' "
        "(pairwise when the judge's scores are relative within a group, as the pairwise judge's "
        "Bradley-Terry scores are, else score).", choices=COMPARISONS)
    tie_margin: float = option(0.0,
        "In 'score' comparisons, a score difference with |diff| <= tie_margin is a tie (half a "
        "win). 0 = only equal scores tie (up to float rounding, 1e-6 relative); identical "
        "responses always tie.")
    n_boot: int = option(2000, "Bootstrap replicates for the confidence intervals (resampling instructions).")
    alpha: float = option(0.05, "1 - confidence level of the intervals (0.05 gives 95% CIs).")

    def __post_init__(self):
        # Field names only (no "eval." prefix): tpo_lite.config adds the table name, file and line.
        require_finite(self)
        require_seed(self)
        if self.eval_format not in FORMATS:
            raise TpoError(f"must be one of {', '.join(FORMATS)}, got {self.eval_format!r}", field="eval_format")
        if self.comparison not in COMPARISONS:
            raise TpoError(f"must be one of {', '.join(COMPARISONS)}, got {self.comparison!r}", field="comparison")
        for name, lo in (("max_instructions", 0), ("max_new_tokens", 0), ("batch_size", 1), ("n_boot", 1),
                         ("format_retries", 0), ("response_budget", 0)):
            if getattr(self, name) < lo:
                raise TpoError(f"must be >= {lo}, got {getattr(self, name)}", field=name)
        for name in ("temperature", "tie_margin"):
            if not getattr(self, name) >= 0:
                raise TpoError(f"must be >= 0, got {getattr(self, name)}", field=name)
        for name in ("top_p", "retry_top_p"):
            if not (0.0 < getattr(self, name) <= 1.0):
                raise TpoError(f"must be in (0, 1], got {getattr(self, name)}", field=name)
        if not (self.retry_temperature > 0 and math.isfinite(self.retry_temperature)):
            raise TpoError(f"must be > 0 (a greedy retry repeats the failed output), got {self.retry_temperature}",
                           field="retry_temperature")
        if not (0.0 < self.alpha < 1.0):
            raise TpoError(f"must be in (0, 1), got {self.alpha}", field="alpha")


# ----------------------------------------------------------------------------------------------------------------
# Eval sets (the readers are tpo_lite.evalsets)
# ----------------------------------------------------------------------------------------------------------------


def load_eval_set(path: str | os.PathLike, fmt: str = "auto", baseline: str | os.PathLike | None = None,
                  max_instructions: int = 0, split: str = "", instruction_column: str = "") -> list[EvalItem]:
    """Read an eval set in ``fmt`` (see :data:`FORMATS`); attach baseline answers from ``baseline`` if given.

    ``baseline`` is an Arena-Hard answer JSONL (for arena_hard sets, matched by uid) or an AlpacaEval-style
    outputs file (matched by instruction text; must cover every instruction). ``max_instructions`` > 0 keeps the
    first N items. ``split`` / ``instruction_column``: see :func:`tpo_lite.evalsets.eval_records`.
    """
    path = resolve_eval_set(os.fspath(path))
    if fmt not in FORMATS:
        raise TpoError(f"unknown eval format {fmt!r}; expected one of {', '.join(FORMATS)}", field="eval_format")
    records = eval_records(path, split, instruction_column)
    if records is not None and not records:
        raise TpoError("eval set has no instructions", path=path)
    if fmt == "auto":
        fmt = detect_format(path, records)
    if fmt == "arena_hard":
        items = read_arena_hard(path, baseline if baseline else None, records=records)
    else:
        items = (read_alpaca_eval(path, records) if fmt == "alpaca_eval"
                 else read_instruction_set(path, records))
        if baseline:
            outs = read_outputs(baseline)
            aligned = align_outputs(items, outs, what=f"baseline outputs {os.fspath(baseline)}")
            for it, out in zip(items, aligned):
                it.baseline, it.baseline_generator = out.response if out.valid else None, out.generator
    if not items:
        raise TpoError("eval set has no instructions", path=path)
    if max_instructions:
        items = items[:max_instructions]
    return items


def load_configured_eval_set(ecfg: EvalConfig, baseline: str | os.PathLike | None = None,
                             echo: Callable[[str], None] | None = None) -> list[EvalItem]:
    """The ``[eval]`` table's set: ``eval_set`` in ``eval_format`` (``eval_split`` / ``instruction_column`` for
    a ``datasets`` source), the first ``max_instructions`` of it; ``echo`` gets "evaluating N of M
    instructions of SET"."""
    items = load_eval_set(ecfg.eval_set, ecfg.eval_format, baseline=baseline, split=ecfg.eval_split,
                          instruction_column=ecfg.instruction_column)
    kept = items[:ecfg.max_instructions] if ecfg.max_instructions else items
    if echo is not None:
        cut = f" (eval.max_instructions = {ecfg.max_instructions})" if len(kept) < len(items) else ""
        echo(f"evaluating {len(kept)} of {len(items)} instructions of {ecfg.eval_set}{cut}")
    return kept


# ----------------------------------------------------------------------------------------------------------------
# Model outputs
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ModelOutput:
    """One generated (or loaded) output. ``response`` is what the judge sees; ``valid`` False = counts as a loss."""

    instruction: str
    response: str
    generator: str
    category: str = UNCATEGORISED
    id: str | None = None
    thought: str = ""
    valid: bool = True
    invalid_reason: str | None = None
    finish_reason: str | None = None
    forced: bool = False
    text: str | None = None  # the whole output (thought + markers + response), when generated here
    tries: int = 1  # 1 + the format retries it took (see EvalConfig.format_retries)


def read_outputs(path: str | os.PathLike) -> list[ModelOutput]:
    """Outputs to judge, compare with or take baseline answers from.

    A folder tpo-lite wrote outputs into (eval, held-out, comparison), its ``outputs.jsonl`` or its
    ``model_outputs.json`` export: the folder's ``outputs.jsonl`` (:meth:`tpo_lite.rundir.EvalDir.read_outputs`),
    so invalid outputs stay invalid. Any other file: AlpacaEval-style outputs (``instruction``, ``output``,
    ``generator``, ``dataset``), each counted valid.
    """
    from pathlib import Path

    from .rundir import EvalDir

    p = Path(os.fspath(path))
    folder = EvalDir(p if p.is_dir() else p.parent)
    if p.is_dir() or p in (folder.outputs, folder.alpaca_export):
        outs = folder.read_outputs()
        if outs is not None:
            return outs
        if p.is_dir():
            raise TpoError(f"no {folder.outputs.name} in this folder (not one tpo-lite wrote outputs into)",
                           path=str(p))
    path = os.fspath(path)
    outs = []
    for index, (line, rec) in enumerate(read_json_or_jsonl(path)):
        instruction = require_str(rec, "instruction", path, line, index)
        lno, prefix = record_location(line, index)
        if "output" not in rec or not isinstance(rec["output"], str):
            raise TpoError("missing or not a string", path=path, line=lno, field=prefix + "output")
        outs.append(ModelOutput(instruction=instruction, response=rec["output"],
                                generator=str(rec.get("generator", os.path.basename(os.path.dirname(path)) or "model")),
                                category=category_name(rec.get("dataset")), id=rec.get("id")))
    return outs


def align_outputs(items: Sequence[EvalItem], outputs: Sequence[ModelOutput], what: str = "outputs") -> list[ModelOutput]:
    """Return ``outputs`` reordered to match ``items`` one to one, or refuse.

    Matching is by instruction text (AlpacaEval's key); repeated instructions match in order of appearance.
    Missing or extra outputs raise :class:`TpoError` with counts and the first offenders, because a comparison on
    a partial overlap would silently report a different eval.
    """
    pool: dict[str, deque] = defaultdict(deque)
    for o in outputs:
        pool[o.instruction].append(o)
    aligned, missing = [], []
    for it in items:
        if pool.get(it.instruction):
            aligned.append(pool[it.instruction].popleft())
        else:
            missing.append(it)
    extra = [o for q in pool.values() for o in q]
    if missing or extra:
        def short(s):
            s = " ".join(s.split())
            return repr(s[:60] + ("..." if len(s) > 60 else ""))

        parts = []
        if missing:
            parts.append(f"{len(missing)} of {len(items)} instructions have no output (first: "
                         f"{short(missing[0].instruction)}, id {missing[0].id})")
        if extra:
            parts.append(f"{len(extra)} outputs match no instruction (first: {short(extra[0].instruction)})")
        raise TpoError(f"{what} do not line up with the eval set: " + "; ".join(parts)
                       + ". Generate them on the same eval set (and the same max_instructions).")
    return aligned


def write_model_outputs(out_dir, outputs: Sequence[ModelOutput]) -> str:
    """Keep ``outputs`` in ``out_dir`` (an :class:`~tpo_lite.rundir.EvalDir` or its path): ``outputs.jsonl`` (the
    one format; rewritten only when it holds other records) and the AlpacaEval export ``model_outputs.json``
    (response only). Returns the export's path. An invalid output is exported with its (possibly empty) parsed
    response so the official tools see what the user would have seen.
    """
    from .rundir import EvalDir

    out = out_dir if isinstance(out_dir, EvalDir) else EvalDir(out_dir)
    out.path.mkdir(parents=True, exist_ok=True)
    recs = [dataclasses.asdict(o) for o in outputs]
    if not out.outputs.exists() or read_records(out.outputs) != recs:
        write_text_atomic(out.outputs, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    alpaca = [{"instruction": o.instruction, "output": o.response, "generator": o.generator, "dataset": o.category}
              for o in outputs]
    write_json_atomic(out.alpaca_export, alpaca)
    return str(out.alpaca_export)


def baseline_outputs(items: Sequence[EvalItem], generator: str | None = None) -> list[ModelOutput]:
    """The eval set's own baseline answers as outputs; refuses if any item lacks one."""
    missing = [it for it in items if it.baseline is None]
    if missing:
        raise TpoError(f"{len(missing)} of {len(items)} eval instructions have no baseline answer (first id "
                       f"{missing[0].id}); give baseline outputs or compare against another run's outputs")
    return [ModelOutput(instruction=it.instruction, response=it.baseline, id=it.id, category=it.category,
                        generator=generator or it.baseline_generator or "baseline") for it in items]


def eval_sampling_config(base, ecfg: EvalConfig):
    """The run's SamplingConfig with the eval decoding settings put in (fields the sampler does not have are
    skipped, so prompt-side options such as thought prefill / budget forcing / the response budget carry over
    from the run; ``ecfg.response_budget`` > 0 replaces the run's response budget)."""
    from .sampling import SamplingConfig

    base = base if base is not None else SamplingConfig()
    names = {f.name for f in dataclasses.fields(base)}
    wanted = {"temperature": ecfg.temperature, "top_p": ecfg.top_p if ecfg.temperature > 0 else 1.0,
              "seed": ecfg.seed, "batch_size": ecfg.batch_size}
    if ecfg.max_new_tokens:
        wanted["max_new_tokens"] = ecfg.max_new_tokens
    if ecfg.response_budget:
        wanted["response_budget"] = ecfg.response_budget
    return dataclasses.replace(base, **{k: v for k, v in wanted.items() if k in names})


def retry_sampling_config(scfg, ecfg: EvalConfig):
    """The sampling config of the format retries: ``scfg`` (from :func:`eval_sampling_config`) at
    ``ecfg.retry_temperature`` / ``ecfg.retry_top_p``."""
    return dataclasses.replace(scfg, temperature=ecfg.retry_temperature, top_p=ecfg.retry_top_p)


def try_seed(seed: int, index: int, attempt: int) -> int:
    """Seed of try ``attempt`` of the eval item at position ``index`` of the eval set: ``seed + index`` for the
    first try (0), a hash of ``(seed, index, attempt)`` for format retry ``attempt`` >= 1. Independent of
    batching and resume."""
    if attempt == 0:
        return seed + index
    from .sampling import sample_seed

    return sample_seed(seed, f"eval-retry:{index}", attempt)


def _groups(n: int, size: int) -> list[list[int]]:
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def _sample_group(group: Sequence[tuple[int, EvalItem]], jobs: dict, template, generator: str,
                  ecfg: EvalConfig, sampler_for: Callable[[bool], Any]) -> list[ModelOutput]:
    """One output per ``(index, item)`` of ``group`` (its prompt: ``jobs[item.id]``, a
    :func:`tpo_lite.sampling.make_job` whose seeds are replaced per try): sampled, parsed, and while invalid
    re-sampled up to ``ecfg.format_retries`` times. All still-invalid items of the group are re-sampled together,
    so the batch layout depends on the group alone and a resumed eval reproduces it. ``sampler_for(retry)`` gives
    the sampler of first tries (False) or of retries (True)."""
    outs: dict[str, ModelOutput] = {}
    pending = list(group)
    for attempt in range(ecfg.format_retries + 1):
        tries = [dataclasses.replace(jobs[it.id], seeds=[try_seed(ecfg.seed, i, attempt)]) for i, it in pending]
        got = {pid: samples[0] for pid, samples in sampler_for(attempt > 0).sample(tries, 1)}
        for _, it in pending:
            if it.id not in got:
                raise TpoError(f"the sampler returned no output for {it.id}")
            s = got[it.id].parsed(template)
            outs[it.id] = ModelOutput(instruction=it.instruction, response=s.response or "", generator=generator,
                                      category=it.category, id=it.id, thought=s.thought or "", valid=s.valid,
                                      invalid_reason=s.invalid_reason, finish_reason=s.finish_reason,
                                      forced=s.forced, text=s.text, tries=attempt + 1)
        pending = [(i, it) for i, it in pending if not outs[it.id].valid]
        if not pending:
            break
    return [outs[it.id] for _, it in group]


def _sampler_cache(make: Callable[[Any], Any], scfg, ecfg: EvalConfig) -> Callable[[bool], Any]:
    samplers: dict[bool, Any] = {}

    def sampler_for(retry: bool):
        if retry not in samplers:  # the retry sampler is built only when an output needs one
            samplers[retry] = make(retry_sampling_config(scfg, ecfg) if retry else scfg)
        return samplers[retry]

    return sampler_for


_OUTPUT_FIELDS = {f.name for f in dataclasses.fields(ModelOutput)}
# What an outputs.jsonl record must hold (jsonl.read_records(required=)): the ModelOutput fields without a default.
OUTPUT_RECORD_KEYS = tuple(f.name for f in dataclasses.fields(ModelOutput)
                           if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
# Sampler options that do not change what is generated (a resumed eval may change them).
_OPERATIONAL = {"timeout_s", "max_retries", "backoff_s", "concurrency", "api_key_env", "vllm_gpu_memory_utilization",
                "vllm_max_lora_rank", "vllm_max_model_len"}


def output_from_record(rec: dict, generator: str | None = None) -> ModelOutput:
    """A :class:`ModelOutput` from an ``outputs.jsonl`` record (unknown keys ignored, ``generator`` replaced)."""
    o = ModelOutput(**{k: v for k, v in rec.items() if k in _OUTPUT_FIELDS})
    if generator is not None:
        o.generator = generator
    return o


def _generation_settings(config, adapter_key: str | None, scfg, ecfg: EvalConfig) -> dict:
    # adapter_key: the adapter by content (rundir.adapter_digest), else its path (server-side) or None (seed).
    settings = {"adapter": adapter_key, "model": dataclasses.asdict(config.model),
                "prompts": dataclasses.asdict(config.prompts),
                "sampling": {k: v for k, v in dataclasses.asdict(scfg).items() if k not in _OPERATIONAL},
                "format_retries": ecfg.format_retries, "retry_temperature": ecfg.retry_temperature,
                "retry_top_p": ecfg.retry_top_p}
    return json.loads(json.dumps(settings))  # the form it has when read back


def model_outputs(config, items: Sequence[EvalItem], path: str | os.PathLike, adapter: str | None = None,
                  generator: str = "model", progress: bool = True, echo: Callable[[str], None] = print,
                  desc: str = "eval", sampler_factory=None, adapter_sha256: str | None = None) -> list[ModelOutput]:
    """The outputs of the run's model (with ``adapter``) on ``items``: the one generation path of ``tpo-lite
    eval``, the loop's held-out score and the experiment.

    ``config`` is the run config: ``[sampling] backend`` picks the sampler (:func:`tpo_lite.sampling.make_sampler`:
    the model loaded in this process, or an OpenAI-compatible server that must serve ``adapter``), ``[prompts]``
    builds the prompts, ``[eval]`` sets decoding and format retries (see :class:`EvalConfig`). Outputs are
    appended to ``path`` (``outputs.jsonl``, one record per item keyed by ``id``) as each group of
    ``eval.batch_size`` items finishes, so a killed eval resumes where it stopped; groups are fixed in eval-set
    order, and a partly written group is generated again whole (same batch layout, same outputs) and only its
    missing records appended. The generation settings are kept in ``outputs.meta.json`` beside it; a resume
    with different settings, or a record for another instruction under the same id, is refused. Nothing is
    loaded when every item already has its output. ``sampler_factory`` replaces
    :func:`tpo_lite.sampling.make_sampler` (tests). ``adapter_sha256``: the adapter's
    :func:`tpo_lite.rundir.adapter_digest` when the caller has it (the held-out producer), so one eval hashes
    the adapter's weights once. Returns the outputs aligned with ``items``, labelled ``generator``.
    """
    from . import sampling
    from .prompts import build_prompt, get_template
    from .rundir import adapter_digest
    from .sampling import make_job

    ecfg = config.eval
    path = os.fspath(path)
    scfg = eval_sampling_config(config.sampling, ecfg)
    # By content: an adapter's relative and absolute paths are one model; other weights at one path are not.
    digest = adapter_sha256 or adapter_digest(adapter)
    settings = _generation_settings(config, digest or adapter, scfg, ecfg)
    meta = os.path.splitext(path)[0] + ".meta.json"
    done = read_records(path, key="id", required=OUTPUT_RECORD_KEYS) if os.path.exists(path) else {}
    if done and os.path.exists(meta):
        old = read_json(meta).get("settings")
        if old != settings:
            diff = sorted(k for k in set(old or {}) | set(settings) if (old or {}).get(k) != settings.get(k))
            raise TpoError(f"these outputs were generated with other settings ({', '.join(diff)} differ); delete "
                           "the folder or write to another one", path=path)
    for it in items:
        rec = done.get(it.id)
        if rec is not None and rec.get("instruction") != it.instruction:
            raise TpoError(f"the output recorded for id {it.id!r} answers another instruction (another eval set?); "
                           "delete the folder or write to another one", path=path)
    backend = config.sampling.backend
    size = ecfg.batch_size if backend == "local" else max(ecfg.batch_size, scfg.concurrency)
    todo = [g for g in _groups(len(items), size) if any(items[i].id not in done for i in g)]
    if todo:
        from . import models
        from .memory import release

        n_todo = sum(items[i].id not in done for g in todo for i in g)
        echo(f"{desc}: generating {n_todo} of {len(items)} outputs with {generator} "
             f"({'greedy' if ecfg.temperature == 0 else 'sampled'} decoding, template {config.prompts.template}, "
             f"{backend} backend, up to {ecfg.format_retries} format retries)")
        if backend == "local":
            model, tok = models.load_model(config.model, adapter=adapter)
            # One merged copy for the greedy and the retry sampler, and the unmerged model dropped: each
            # LocalSampler would otherwise merge its own copy beside the loaded model (three sets of weights).
            model = models.sampling_copy(model)
            release()  # the unmerged model's heap pages handed back before the KV cache grows
        else:  # the server serves the adapter; only the tokenizer is needed here
            model, tok = None, models.load_tokenizer(config.model)
        template = get_template(config.prompts)
        factory = sampler_factory or sampling.make_sampler
        sampler_for = _sampler_cache(
            lambda c: factory(c, tok, template, model=model, adapter=None if backend == "local" else adapter,
                              progress=False), scfg, ecfg)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if not done or not os.path.exists(meta):
            write_json_atomic(meta, {"settings": settings})
        groups = todo
        if progress:
            from tqdm.auto import tqdm

            groups = tqdm(todo, desc=desc, unit="batch", dynamic_ncols=True)
        for g in groups:
            # The prompt -> job -> sample -> parse blocks of `tpo-lite chat` too.
            jobs = {items[i].id: make_job(items[i].id, build_prompt(tok, items[i].instruction, config.prompts), tok,
                                          scfg) for i in g}
            for o in _sample_group([(i, items[i]) for i in g], jobs, template, generator, ecfg, sampler_for):
                if o.id not in done:
                    append_record(path, dataclasses.asdict(o))
                    done[o.id] = dataclasses.asdict(o)
        del model
        done = read_records(path, key="id", required=OUTPUT_RECORD_KEYS)
    return [output_from_record(done[it.id], generator) for it in items]
