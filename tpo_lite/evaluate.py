"""`tpo-lite eval`: loading an eval set, generation of the model's outputs, comparison with a judge, report data.

The evidence TPO offers is the quality of the final *responses* (thoughts stripped) judged against a baseline,
as in the paper's AlpacaEval / Arena-Hard tables. This module:

1. reads an eval set (:func:`load_eval_set`) in any of the formats of :mod:`tpo_lite.evalsets` (AlpacaEval,
   Arena-Hard, our instruction JSONL), with baseline answers from an Arena-Hard answer file or AlpacaEval-style
   outputs when given.

2. generates the model's outputs (:func:`model_outputs`, the one generation path of ``tpo-lite eval``, the
   loop's held-out score and the experiment) through the run's own prompt template and sampling backend, with
   the eval decoding settings of :class:`EvalConfig` (default greedy: ``temperature = 0``), appending them to a
   resumable ``outputs.jsonl``, and strips the thoughts with :func:`tpo_lite.parsing.parse_output`. An output
   with a format error is re-sampled up to ``eval.format_retries`` times (seeds from :func:`try_seed`); one
   still without a parseable response is *invalid* and counts as a loss against any baseline (and as score 0
   in an absolute evaluation).

3. keeps the outputs in one format, ``outputs.jsonl`` (one :class:`ModelOutput` per line, thoughts, validity and
   retries included; read back by :meth:`tpo_lite.rundir.EvalDir.read_outputs`), and exports AlpacaEval-style
   ``model_outputs.json`` (``instruction``, ``output`` = response only, ``generator``, ``dataset``) beside it so
   the official tools can be run on it (:func:`write_model_outputs`).

4. compares with a judge (:func:`compare_outputs`; the evaluation judge is ``[eval_judge]``, else ``[judge]``,
   see :func:`make_eval_judge`); the judge sees the original instruction and the two responses only, never a
   thought:

   * ``score`` -- the two responses are scored (reward model, programmatic) and the difference gives win
     (> ``tie_margin``), tie (within it) or loss;
   * ``pairwise`` -- a judge whose ``capabilities.compares_pairs``: asked in both orders; the outcome is the
     mean of ``p(model wins)`` over the two orders, and the position bias (how often the *first* response is
     preferred; 0.5 = no bias) and the order-consistency rate are reported.

   The summary holds the win rate (ties as half), the length-controlled win rate
   (:func:`tpo_lite.stats.length_controlled_win_rate`, fitted on valid-vs-valid instructions only), 95%
   bootstrap CIs resampling instructions, a per-category table, mean response and thought lengths, the
   invalid-format rate and the format-retry counts.

5. or evaluates *absolutely* (:func:`absolute_eval`): the mean programmatic-judge score on the held-out set
   with its bootstrap CI -- what ``tpo-lite run`` prints before vs after.

Lengths are measured in **characters** of the response (or thought) text, the unit AlpacaEval uses, because the
two sides of a comparison may come from models with different tokenizers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import TpoError, require_finite, require_seed
from .evalsets import (FORMATS, UNCATEGORISED, EvalItem, category_name, detect_format, eval_records,
                       read_alpaca_eval,
                       read_arena_hard, read_instruction_set, read_json_or_jsonl, record_location, require_str,
                       resolve_eval_set)
from .jsonl import append_record, read_json, read_records, write_json_atomic, write_text_atomic
from .judges.base import Judge
from .stats import mean
from .options import option

COMPARISONS = ("auto", "score", "pairwise")

_FLOAT_TIE = 1e-6  # relative score difference below which a 'score' comparison is a tie (float rounding)



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


def _sample_group(group: Sequence[tuple[int, EvalItem]], tokenizer, prompt_cfg, template, generator: str,
                  ecfg: EvalConfig, sampler_for: Callable[[bool], Any]) -> list[ModelOutput]:
    """One output per ``(index, item)`` of ``group``: sampled, parsed, and while invalid re-sampled up to
    ``ecfg.format_retries`` times. All still-invalid items of the group are re-sampled together, so the batch
    layout depends on the group alone and a resumed eval reproduces it. ``sampler_for(retry)`` gives the
    sampler of first tries (False) or of retries (True)."""
    from .parsing import parse_output
    from .prompts import build_prompt
    from .sampling import PromptJob

    prompts = {}
    for _, it in group:
        text = build_prompt(tokenizer, it.instruction, prompt_cfg)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not ids:
            raise TpoError("the prompt is empty after tokenisation", field=f"instruction {it.id}")
        prompts[it.id] = (text, ids)
    outs: dict[str, ModelOutput] = {}
    pending = list(group)
    for attempt in range(ecfg.format_retries + 1):
        jobs = [PromptJob(prompt_id=it.id, prompt_text=prompts[it.id][0], prompt_token_ids=prompts[it.id][1],
                          seeds=[try_seed(ecfg.seed, i, attempt)]) for i, it in pending]
        got = {pid: samples[0] for pid, samples in sampler_for(attempt > 0).sample(jobs, 1)}
        for _, it in pending:
            if it.id not in got:
                raise TpoError(f"the sampler returned no output for {it.id}")
            s = got[it.id]
            parsed = parse_output(s.text, template, s.finish_reason)
            outs[it.id] = ModelOutput(instruction=it.instruction, response=parsed.response or "", generator=generator,
                                      category=it.category, id=it.id, thought=parsed.thought or "",
                                      valid=bool(parsed.valid), invalid_reason=parsed.invalid_reason,
                                      finish_reason=s.finish_reason, forced=s.forced,
                                      text=s.text, tries=attempt + 1)
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


def generate_outputs(items: Sequence[EvalItem], model, tokenizer, prompt_cfg, generator: str,
                     ecfg: EvalConfig | None = None, sampling_cfg=None, progress: bool = False,
                     sampler_factory=None) -> list[ModelOutput]:
    """Generate one output per item in memory and parse it into thought and response (no file, no resume; the
    commands use :func:`model_outputs`).

    The local sampler runs ``model`` unless ``sampler_factory`` is given (the signature of
    :func:`tpo_lite.sampling.make_sampler`; ``model`` may then be None). Decoding: ``ecfg.temperature`` (default
    0 = greedy), ``ecfg.top_p``, ``ecfg.max_new_tokens``; output ``i`` uses seed ``ecfg.seed + i``; an output
    with a format error is re-sampled (:attr:`EvalConfig.format_retries`, seeds from :func:`try_seed`). The
    prompt is built with the run's template (``prompt_cfg``) and the parser of that template decides validity.
    """
    from .prompts import get_template
    from .sampling import make_sampler

    ecfg = ecfg or EvalConfig()
    scfg = eval_sampling_config(sampling_cfg, ecfg)
    template = get_template(prompt_cfg)
    factory = sampler_factory or make_sampler
    sampler_for = _sampler_cache(lambda c: factory(c, tokenizer, template, model=model, progress=progress),
                                 scfg, ecfg)
    outs = []
    for g in _groups(len(items), ecfg.batch_size):
        outs += _sample_group([(i, items[i]) for i in g], tokenizer, prompt_cfg, template, generator, ecfg,
                              sampler_for)
    return outs


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


def _generation_settings(config, adapter: str | None, scfg, ecfg: EvalConfig) -> dict:
    from .rundir import adapter_digest

    # The adapter by content: its relative and absolute paths are one model; other weights at one path are not.
    settings = {"adapter": adapter_digest(adapter) or adapter, "model": dataclasses.asdict(config.model),
                "prompts": dataclasses.asdict(config.prompts),
                "sampling": {k: v for k, v in dataclasses.asdict(scfg).items() if k not in _OPERATIONAL},
                "format_retries": ecfg.format_retries, "retry_temperature": ecfg.retry_temperature,
                "retry_top_p": ecfg.retry_top_p}
    return json.loads(json.dumps(settings))  # the form it has when read back


def model_outputs(config, items: Sequence[EvalItem], path: str | os.PathLike, adapter: str | None = None,
                  generator: str = "model", progress: bool = True, echo: Callable[[str], None] = print,
                  desc: str = "eval", sampler_factory=None) -> list[ModelOutput]:
    """The outputs of the run's model (with ``adapter``) on ``items``: the one generation path of ``tpo-lite
    eval``, the loop's held-out score and the experiment.

    ``config`` is the run config: ``[sampling] backend`` picks the sampler (:func:`tpo_lite.sampling.make_sampler`:
    the model loaded in this process, or an OpenAI-compatible server that must serve ``adapter``), ``[prompts]``
    builds the prompts, ``[eval]`` sets decoding and format retries (:func:`generate_outputs`). Outputs are
    appended to ``path`` (``outputs.jsonl``, one record per item keyed by ``id``) as each group of
    ``eval.batch_size`` items finishes, so a killed eval resumes where it stopped; groups are fixed in eval-set
    order, and a partly written group is generated again whole (same batch layout, same outputs) and only its
    missing records appended. The generation settings are kept in ``outputs.meta.json`` beside it; a resume
    with different settings, or a record for another instruction under the same id, is refused. Nothing is
    loaded when every item already has its output. ``sampler_factory`` replaces
    :func:`tpo_lite.sampling.make_sampler` (tests). Returns the outputs aligned with ``items``, labelled
    ``generator``.
    """
    from . import sampling
    from .prompts import get_template

    ecfg = config.eval
    path = os.fspath(path)
    scfg = eval_sampling_config(config.sampling, ecfg)
    settings = _generation_settings(config, adapter, scfg, ecfg)
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

        n_todo = sum(items[i].id not in done for g in todo for i in g)
        echo(f"{desc}: generating {n_todo} of {len(items)} outputs with {generator} "
             f"({'greedy' if ecfg.temperature == 0 else 'sampled'} decoding, template {config.prompts.template}, "
             f"{backend} backend, up to {ecfg.format_retries} format retries)")
        if backend == "local":
            model, tok = models.load_model(config.model, adapter=adapter)
            # One merged copy for the greedy and the retry sampler, and the unmerged model dropped: each
            # LocalSampler would otherwise merge its own copy beside the loaded model (three sets of weights).
            model = models.sampling_copy(model)
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
            for o in _sample_group([(i, items[i]) for i in g], tok, config.prompts, template, generator, ecfg,
                                   sampler_for):
                if o.id not in done:
                    append_record(path, dataclasses.asdict(o))
                    done[o.id] = dataclasses.asdict(o)
        del model
        done = read_records(path, key="id", required=OUTPUT_RECORD_KEYS)
    return [output_from_record(done[it.id], generator) for it in items]


# ----------------------------------------------------------------------------------------------------------------
# Judging
# ----------------------------------------------------------------------------------------------------------------


def eval_judge_config(config):
    """The judge config of evaluations: the run's ``[eval_judge]`` table when it has one, else ``[judge]``."""
    return config.eval_judge if config.eval_judge is not None else config.judge


def _same_judge(a, b) -> bool:
    # The same learned proxy: same kind and the same weights (local model, or the same served model).
    key = lambda c: (c.kind, c.model, c.base_url, c.served_model, c.function)  # noqa: E731
    return key(a) == key(b)


def reward_hacking_warning(config) -> str | None:
    """One warning line when evaluations would be judged by the learned judge (reward model or pairwise LLM)
    the run optimised, else None. The programmatic judge checks the instruction's own verifiable constraints --
    the task's ground truth, not a learned proxy (``capabilities.learned`` is False) -- and never warns."""
    from .judges import judge_class

    cfg = eval_judge_config(config)
    if not judge_class(cfg).capabilities.learned or not _same_judge(cfg, config.judge):
        return None
    what = cfg.model or cfg.function or f"{cfg.served_model} at {cfg.base_url}"
    return (f"warning: evaluating with the {cfg.kind} judge the run optimised ({what}): this measures reward "
            "hacking, not quality; set [eval_judge]")


def warn(echo: Callable[..., Any], line: str) -> None:
    """Write one warning line through ``echo`` on stderr (``print`` and ``click.echo`` are sent there; any other
    callable, e.g. a test's list.append, just receives the line)."""
    import sys

    if echo is print:
        print(line, file=sys.stderr)
    elif (getattr(echo, "__module__", None) or "").startswith("click"):
        echo(line, err=True)
    else:
        echo(line)


def make_eval_judge(config, cache_path: str | os.PathLike | None = None, echo: Callable[..., Any] | None = None):
    """The evaluation judge (:func:`eval_judge_config`), cached in ``cache_path`` unless its config names
    another cache; warns through ``echo`` when it is the learned judge the run optimised."""
    from .judges import make_judge

    line = reward_hacking_warning(config)
    if line and echo is not None:
        warn(echo, line)
    return make_judge(eval_judge_config(config), cache_path=cache_path)


def _score(judge, item: EvalItem, responses: list[str]) -> list[float | None]:
    # An EvalItem carries .instruction and .checks like tpo_lite.instructions.Instruction, which is all a judge
    # reads (tpo_lite.judges.base.instruction_text / instruction_checks): the original instruction, never a prompt.
    res = judge.score(item, responses)
    scores = list(res.scores)
    if len(scores) != len(responses):
        raise TpoError(f"judge {judge.name} returned {len(scores)} scores for {len(responses)} responses")
    for s in scores:
        if s is not None and not math.isfinite(float(s)):
            raise TpoError(f"judge {judge.name} returned a non-finite score ({s}) for {item.id}")
    return [None if s is None else float(s) for s in scores]


def _comparison_mode(judge: Judge, requested: str) -> str:
    caps = judge.capabilities
    if requested == "pairwise" and not caps.compares_pairs:
        raise TpoError(f"judge {judge.name} cannot compare two responses; use comparison = 'score'",
                       field="comparison")
    if requested != "auto":
        return requested
    # A reward model can also compare (sigmoid of the score difference), but its native output is a score; a
    # judge whose scores are relative within one call (Bradley-Terry) is asked to compare.
    return "score" if caps.scores_absolute else "pairwise"


def _length_stats(outputs: Sequence[ModelOutput]) -> dict:
    valid = [o for o in outputs if o.valid]
    return {
        "response_chars_mean": mean(len(o.response) for o in valid),
        "thought_chars_mean": mean(len(o.thought) for o in valid),
        "n_valid": len(valid),
        "invalid_rate": 1.0 - len(valid) / len(outputs) if outputs else None,
        "forced_rate": mean(float(o.forced) for o in outputs),
        "n_retried": sum(1 for o in outputs if o.tries > 1),  # had a format error and were re-sampled
        "n_invalid": len(outputs) - len(valid),  # still invalid after every try
    }


def compare_outputs(items: Sequence[EvalItem], model: Sequence[ModelOutput], baseline: Sequence[ModelOutput], judge,
                    ecfg: EvalConfig | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Judge ``model`` against ``baseline`` on ``items`` (all three aligned by :func:`align_outputs`).

    Per instruction the outcome is 1 (model wins), 0.5 (tie) or 0 (loss), or for a pairwise judge the mean of
    ``p(model wins)`` over both presentation orders. An invalid model output loses without being judged; an
    invalid baseline output loses likewise; both invalid is a tie. Only valid-vs-valid instructions (items'
    ``length_fit``) inform the length-controlled win rate; the others keep their fixed outcome
    (:func:`tpo_lite.stats.length_controlled_win_rate`). Returns the JSON-ready summary (see module docstring)
    with a per-item list under ``"items"``.
    """
    from .stats import summarize_outcomes

    ecfg = ecfg or EvalConfig()
    model = align_outputs(items, model, what=f"outputs of {model[0].generator if model else 'the model'}")
    baseline = align_outputs(items, baseline, what=f"outputs of {baseline[0].generator if baseline else 'the baseline'}")
    mode = _comparison_mode(judge, ecfg.comparison)
    rows, first_pos, consistent = [], [], []
    for k, (it, m, b) in enumerate(zip(items, model, baseline)):
        row = {"id": it.id, "category": it.category, "model_valid": m.valid, "baseline_valid": b.valid,
               "model_chars": len(m.response), "baseline_chars": len(b.response),
               "model_thought_chars": len(m.thought)}
        row["length_fit"] = m.valid and b.valid
        if not m.valid or not b.valid:
            outcome = 0.5 if (not m.valid and not b.valid) else (0.0 if not m.valid else 1.0)
            row["judged"] = False
        elif m.response == b.response:  # the same answer is a tie by definition; no judge noise can break it
            outcome = 0.5
            row.update(judged=False, identical=True)
        elif mode == "score":
            sm, sb = _score(judge, it, [m.response, b.response])
            row.update(model_score=sm, baseline_score=sb, judged=True)
            if sm is None or sb is None:  # the judge itself rejected a response: treat like an invalid output
                outcome = 0.5 if sm is None and sb is None else (0.0 if sm is None else 1.0)
                row["length_fit"] = False
            else:
                # Float noise (batched reward-model forwards differ in the last bits) must not decide a winner:
                # differences within 1e-6 relative to the scores count as equal.
                d = sm - sb
                margin = ecfg.tie_margin + _FLOAT_TIE * max(1.0, abs(sm), abs(sb))
                outcome = 1.0 if d > margin else (0.0 if d < -margin else 0.5)
        else:
            p_ab = float(judge.compare(it, m.response, b.response))
            p_ba = float(judge.compare(it, b.response, m.response))
            for p in (p_ab, p_ba):
                if not (0.0 <= p <= 1.0):
                    raise TpoError(f"judge {judge.name} returned p={p} outside [0, 1] for {it.id}")
            outcome = (p_ab + (1.0 - p_ba)) / 2.0
            first_pos.append((p_ab + p_ba) / 2.0)
            # Same winner from the model's side in both orders (a tie in both counts as consistent).
            consistent.append(float(np.sign(p_ab - 0.5) == np.sign(0.5 - p_ba)))
            row.update(p_model_first=p_ab, p_baseline_first=p_ba, judged=True)
        row["outcome"] = outcome
        rows.append(row)
        if progress:
            progress(k + 1, len(items))
    outcomes = [r["outcome"] for r in rows]
    summary = summarize_outcomes(outcomes, [r["model_chars"] for r in rows], [r["baseline_chars"] for r in rows],
                                 n_boot=ecfg.n_boot, alpha=ecfg.alpha, seed=ecfg.seed,
                                 valid=[r["length_fit"] for r in rows])
    per_cat = []
    by_cat: dict[str, list[int]] = defaultdict(list)
    for k, r in enumerate(rows):
        by_cat[r["category"]].append(k)
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        s = summarize_outcomes([outcomes[k] for k in idx], n_boot=ecfg.n_boot, alpha=ecfg.alpha, seed=ecfg.seed)
        per_cat.append({"category": cat, "n": s["n"], "win_rate": s["win_rate"], "win_rate_ci": s["win_rate_ci"],
                        "wins": s["wins"], "ties": s["ties"], "losses": s["losses"]})
    result = {
        "kind": "pairwise",
        "model": model[0].generator,
        "baseline": baseline[0].generator,
        "judge": judge.name,
        "comparison": mode,
        "confidence": 1.0 - ecfg.alpha,
        **summary,
        "per_category": per_cat,
        "model_lengths": _length_stats(model),
        "baseline_lengths": _length_stats(baseline),
        "invalid_rate": _length_stats(model)["invalid_rate"],
        "position_bias": None,
        "items": rows,
    }
    if mode == "pairwise":
        result["position_bias"] = {
            "first_position_preferred": mean(first_pos),  # 0.5 = no bias
            "order_consistency": mean(consistent),
            "n_judged": len(first_pos),
        }
    return result


def absolute_eval(items: Sequence[EvalItem], outputs: Sequence[ModelOutput], judge,
                  ecfg: EvalConfig | None = None, invalid_score: float = 0.0) -> dict:
    """Mean judge score of ``outputs`` on ``items`` with a bootstrap CI (resampling instructions).

    Meant for the programmatic judge, whose score is the fraction of an instruction's checks passed (0..1): an
    invalid output scores ``invalid_score`` (0 = the worst possible), so a model cannot gain by failing the
    format. Returns ``{"kind": "absolute", "mean_score", "mean_score_ci", "valid_rate", "per_category", ...}``.
    """
    from .stats import bootstrap_ci

    ecfg = ecfg or EvalConfig()
    outputs = align_outputs(items, outputs, what=f"outputs of {outputs[0].generator if outputs else 'the model'}")
    rows = []
    for it, o in zip(items, outputs):
        s = _score(judge, it, [o.response])[0] if o.valid else None
        rows.append({"id": it.id, "category": it.category, "valid": o.valid,
                     "score": invalid_score if s is None else s, "judge_score": s,
                     "response_chars": len(o.response), "thought_chars": len(o.thought)})
    scores = np.array([r["score"] for r in rows], dtype=np.float64)
    per_cat = []
    by_cat: dict[str, list[int]] = defaultdict(list)
    for k, r in enumerate(rows):
        by_cat[r["category"]].append(k)
    for cat in sorted(by_cat):
        v = scores[by_cat[cat]]
        per_cat.append({"category": cat, "n": int(v.size), "mean_score": float(v.mean()),
                        "mean_score_ci": list(bootstrap_ci(v, n_boot=ecfg.n_boot, alpha=ecfg.alpha, seed=ecfg.seed))})
    lengths = _length_stats(outputs)
    return {
        "kind": "absolute",
        "model": outputs[0].generator,
        "judge": judge.name,
        "confidence": 1.0 - ecfg.alpha,
        "n": len(rows),
        "mean_score": float(scores.mean()),
        "mean_score_ci": list(bootstrap_ci(scores, n_boot=ecfg.n_boot, alpha=ecfg.alpha, seed=ecfg.seed)),
        "valid_rate": 1.0 - lengths["invalid_rate"],
        "invalid_rate": lengths["invalid_rate"],
        "model_lengths": lengths,
        "per_category": per_cat,
        "items": rows,
    }


# ----------------------------------------------------------------------------------------------------------------
# Writing results
# ----------------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "n/a" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _retry_line(lengths: dict, n: int) -> str:
    return (f"- Format retries: {lengths.get('n_retried', 0)} of {n} outputs had a format error and were re-sampled; "
            f"{lengths.get('n_invalid', 0)} stayed invalid")


def render_markdown(result: dict, decoding: dict | None = None) -> str:
    """A human-readable Markdown version of a :func:`compare_outputs` / :func:`absolute_eval` result."""
    conf = int(round(100 * result.get("confidence", 0.95)))
    lines = []
    if result["kind"] == "absolute":
        lines += [f"# Absolute evaluation: {result['model']}", "",
                  f"Judge: `{result['judge']}`, {result['n']} instructions.", "",
                  f"- Mean score: **{result['mean_score']:.3f}** ({conf}% CI [{result['mean_score_ci'][0]:.3f}, "
                  f"{result['mean_score_ci'][1]:.3f}]); invalid outputs score 0",
                  f"- Valid-format rate: {_pct(result['valid_rate'])}"]
        ml = result["model_lengths"]
        lines.append(_retry_line(ml, result["n"]))
        lines += [f"- Mean response length: {_num(ml['response_chars_mean'])} chars; mean thought length: "
                  f"{_num(ml['thought_chars_mean'])} chars (valid outputs)", "",
                  "| category | n | mean score | CI |", "|---|---:|---:|---|"]
        for c in result["per_category"]:
            lines.append(f"| {c['category']} | {c['n']} | {c['mean_score']:.3f} | "
                         f"[{c['mean_score_ci'][0]:.3f}, {c['mean_score_ci'][1]:.3f}] |")
    else:
        lines += [f"# {result['model']} vs {result['baseline']}", "",
                  f"Judge: `{result['judge']}` ({result['comparison']} comparison), {result['n']} instructions.", "",
                  f"- Win rate (ties count half): **{_pct(result['win_rate'])}** ({conf}% CI "
                  f"{_ci(result['win_rate_ci'])}); {result['wins']} wins, {result['ties']} ties, "
                  f"{result['losses']} losses",
                  f"- Length-controlled win rate: {_pct(result.get('lc_win_rate'))} ({conf}% CI "
                  f"{_ci(result.get('lc_win_rate_ci'))})",
                  f"- Invalid-format rate of {result['model']}: {_pct(result['invalid_rate'])} (each counts as a loss)",
                  _retry_line(result["model_lengths"], result["n"])]
        pb = result.get("position_bias")
        if pb:
            lines.append(f"- Position bias: the first-shown response is preferred "
                         f"{_pct(pb['first_position_preferred'])} of the time (50% = unbiased); the two orders agree "
                         f"on {_pct(pb['order_consistency'])} of instructions")
        lines += ["", "| | mean response chars | mean thought chars | invalid rate |", "|---|---:|---:|---:|"]
        for who, key in ((result["model"], "model_lengths"), (result["baseline"], "baseline_lengths")):
            ml = result[key]
            lines.append(f"| {who} | {_num(ml['response_chars_mean'])} | {_num(ml['thought_chars_mean'])} | "
                         f"{_pct(ml['invalid_rate'])} |")
        lines += ["", "| category | n | win rate | CI | W / T / L |", "|---|---:|---:|---|---|"]
        for c in result["per_category"]:
            lines.append(f"| {c['category']} | {c['n']} | {_pct(c['win_rate'])} | {_ci(c['win_rate_ci'])} | "
                         f"{c['wins']} / {c['ties']} / {c['losses']} |")
    if decoding:
        lines += ["", "Decoding: " + ", ".join(f"{k}={v}" for k, v in decoding.items())]
    return "\n".join(lines) + "\n"


def write_result(out_dir, result: dict, decoding: dict | None = None) -> tuple[str, str]:
    """Write ``eval.json`` and ``eval.md`` into ``out_dir`` (an :class:`~tpo_lite.rundir.EvalDir` or its path);
    returns both paths."""
    from .rundir import EvalDir

    out = out_dir if isinstance(out_dir, EvalDir) else EvalDir(out_dir)
    out.path.mkdir(parents=True, exist_ok=True)
    if decoding:
        result = {**result, "decoding": decoding}
    write_json_atomic(out.result, result)
    write_text_atomic(out.markdown, render_markdown(result, decoding))
    return str(out.result), str(out.markdown)


def decoding_record(ecfg: EvalConfig, sampling_cfg=None) -> dict:
    """The decoding settings as written into eval.json, so a result says how its outputs were produced.

    ``sampling_cfg`` (the run's SamplingConfig) supplies the token limit when ``ecfg.max_new_tokens`` is 0.
    """
    limit = ecfg.max_new_tokens or (sampling_cfg.max_new_tokens if sampling_cfg is not None else None)
    budget = ecfg.response_budget or (sampling_cfg.response_budget if sampling_cfg is not None else None)
    return {"temperature": ecfg.temperature, "greedy": ecfg.temperature == 0,
            "top_p": ecfg.top_p if ecfg.temperature > 0 else 1.0, "max_new_tokens": limit,
            "response_budget": budget, "seed": ecfg.seed, "format_retries": ecfg.format_retries,
            "retry_temperature": ecfg.retry_temperature, "retry_top_p": ecfg.retry_top_p}
