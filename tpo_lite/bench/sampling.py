"""Sampling benchmark: the same sampling work timed with the local sampler, its reference path and plain
``model.generate``, side by side in one process (``tpo-lite bench sampling``).

Methods (each one run samples K outputs for every prompt):

- ``sampler``: :class:`tpo_lite.sampling.LocalSampler` as the loop uses it (LoRA merged into a sampling copy,
  decoding attention with KV buffers, batches of ``batch_size`` rows = whole prompts).
- ``reference``: the same class with ``reference=True`` and ``reference_batch_size`` rows per batch: the
  sampler before those speed-ups (adapter unmerged, the model's own attention, finished rows dropped at once).
  Same seeds, same budget forcing.
- ``generate``: transformers ``model.generate`` on the model as loaded (adapter unmerged), same temperature,
  top-p, token limit, EOS ids and rows per batch (``num_return_sequences = k``), no budget forcing.

The prompts are the loop's: the first ``prompts`` instructions of ``instructions`` wrapped in the template
through the model's chat template (thought header pre-filled unless ``prefill_thought_header`` is off), and
each sample's seed is ``sample_seed(seed, prompt id, i)``.

Timing: after an untimed warm-up of each method on the first prompt, the methods run interleaved ``repeats`` times (the order rotates each round); tokens/s = generated
tokens (EOS included, padding and prompts not) / wall time, and tokens per CPU-second = the same over this
process's CPU time, which a machine shared with other jobs disturbs less. Reported: medians, and their ratios
``sampler/reference`` and ``sampler/generate``. The load average around each run is recorded. The sampler
methods must give the same samples in every repeat (``reproducible``).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, List, Optional
from ..options import option

METHODS = ("sampler", "reference", "generate")


@dataclass
class SamplingBenchConfig:
    model: str = option("smollm2",
        "Model: 'smollm2' (the embedded default), an HF model directory or a .gguf file (as [model] "
        "path).")
    adapter: Optional[str] = option(None,
        "A peft LoRA adapter directory to sample with (e.g. runs/NAME/iter_01/adapter); unset = the "
        "bare model.")
    dtype: str = option("auto", "Model dtype, as [model] dtype.")
    device: str = option("auto", "Torch device, as [model] device.")
    instructions: str = option("train",
        "Prompts: the embedded set 'train' or 'heldout', or an instruction file (JSONL/JSON).")
    prompts: int = option(24, "How many instructions (the first ones).")
    template: str = option("generic", "Thought template, as [prompts] template.")
    prefill_thought_header: bool = option(True,
        "Pre-fill the template's thought header, as [prompts] prefill_thought_header.")
    k: int = option(4, "Samples per prompt.")
    temperature: float = option(0.8, "Sampling temperature.")
    top_p: float = option(0.95, "Nucleus sampling top-p.")
    max_new_tokens: int = option(224, "Token limit of one output.")
    thought_budget: Optional[int] = option(96,
        "Budget forcing for the sampler methods (0 or unset = off); generate never forces.")
    batch_size: int = option(96,
        "Rows decoded together by 'sampler' and 'generate' (whole prompts: batch_size // k of them).")
    reference_batch_size: int = option(8, "Rows per batch of 'reference'.")
    methods: List[str] = option(factory=lambda: list(METHODS), help="Methods to time: sampler, reference, generate.")
    repeats: int = option(3, "Timed runs per method (interleaved); medians reported.")
    warmup: bool = option(True, "Run each method once on the first prompt, untimed.")
    threads: int = option(0, "torch CPU threads (0: torch's default).")
    seed: int = option(0, "Run seed of the sample seeds.")

    def __post_init__(self):
        for name in ("prompts", "k", "max_new_tokens", "batch_size", "reference_batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads: must be >= 0, got {self.threads}")
        if not self.methods:
            raise ValueError("methods: name at least one")
        for m in self.methods:
            if m not in METHODS:
                raise ValueError(f"methods: unknown method {m!r} (choose from {', '.join(METHODS)})")
        if self.thought_budget == 0:
            self.thought_budget = None
        if self.thought_budget is not None and not 1 <= self.thought_budget < self.max_new_tokens:
            raise ValueError(f"thought_budget: must be 0 (off) or in 1..max_new_tokens-1, got {self.thought_budget}")


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def build_jobs(cfg: SamplingBenchConfig, tokenizer):
    """The benchmark's PromptJobs (as the loop builds them) and the template."""
    from tpo_lite.instructions import EMBEDDED, load_embedded, load_instructions
    from tpo_lite.prompts import build_prompt, get_template
    from tpo_lite.sampling import PromptJob, sample_seed

    items = load_embedded(cfg.instructions) if cfg.instructions in EMBEDDED else load_instructions(cfg.instructions)
    items = items[:cfg.prompts]
    if len(items) < cfg.prompts:
        raise ValueError(f"instructions: {cfg.instructions} holds {len(items)} instructions, {cfg.prompts} asked for")
    template = get_template(cfg.template)
    jobs = []
    for it in items:
        text = build_prompt(tokenizer, it.instruction, template, cfg.prefill_thought_header)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        jobs.append(PromptJob(it.id, text, ids, [sample_seed(cfg.seed, it.id, i) for i in range(cfg.k)]))
    return jobs, template


def _sampling_config(cfg: SamplingBenchConfig, batch_size: int):
    from tpo_lite.sampling import SamplingConfig

    return SamplingConfig(k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                          thought_budget=cfg.thought_budget, batch_size=batch_size, seed=cfg.seed)


def make_runner(method: str, cfg: SamplingBenchConfig, model, tokenizer, template) -> Callable[[list], dict]:
    """A function that samples K outputs for each of the given jobs with ``method`` and returns
    ``{"tokens": int, "outputs": [...] | None, "finish": {reason: count}}``."""
    import torch

    if method in ("sampler", "reference"):
        from tpo_lite.sampling import LocalSampler

        ref = method == "reference"
        scfg = _sampling_config(cfg, cfg.reference_batch_size if ref else cfg.batch_size)
        sampler = LocalSampler(model, tokenizer, scfg, template if cfg.thought_budget else None, progress=False,
                               reference=ref)

        def run(jobs):
            out = dict(sampler.sample(jobs, cfg.k))
            samples = [s for j in jobs for s in out[j.prompt_id]]
            return {"tokens": sum(len(s.token_ids) for s in samples),
                    "outputs": [s.token_ids for s in samples],
                    "finish": dict(Counter(s.finish_reason for s in samples))}
        return run

    from tpo_lite.models import left_pad
    from tpo_lite.sampling import eos_token_ids

    eos = sorted(eos_token_ids(tokenizer, model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    per = max(1, cfg.batch_size // cfg.k)
    device = next(model.parameters()).device

    def run(jobs):
        torch.manual_seed(cfg.seed)
        tokens, finish = 0, Counter()
        for start in range(0, len(jobs), per):
            ids, mask, _ = left_pad([j.prompt_token_ids for j in jobs[start:start + per]], pad)
            kw = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p) if cfg.temperature > 0 \
                else dict(do_sample=False)
            with torch.inference_mode():
                seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.k,
                                      eos_token_id=eos, pad_token_id=pad, **kw)
            for row in seqs[:, ids.shape[1]:].tolist():
                ended = next((i for i, t in enumerate(row) if t in eos), None)
                tokens += len(row) if ended is None else ended + 1
                finish["eos" if ended is not None else "length"] += 1
        return {"tokens": tokens, "outputs": None, "finish": dict(finish)}
    return run


def run_sampling_benchmark(cfg: SamplingBenchConfig, log: Callable[[str], None] = print) -> dict:
    """Loads the model once, times every method ``repeats`` times interleaved; returns the result dict. With
    ``cfg.threads``: torch's thread count for the benchmark only."""
    from . import torch_threads

    with torch_threads(cfg.threads):
        return _run_sampling_benchmark(cfg, log)


def _run_sampling_benchmark(cfg: SamplingBenchConfig, log: Callable[[str], None]) -> dict:
    import torch

    from tpo_lite.models import ModelConfig, describe, load_model

    mcfg = ModelConfig(path=cfg.model, dtype=cfg.dtype, device=cfg.device)
    model, tokenizer = load_model(mcfg, adapter=cfg.adapter)
    jobs, template = build_jobs(cfg, tokenizer)
    runners, setup_s = {}, {}
    for m in cfg.methods:  # the sampler's merged copy is made here, once, as once per loop stage
        t0 = time.perf_counter()
        runners[m] = make_runner(m, cfg, model, tokenizer, template)
        setup_s[m] = time.perf_counter() - t0
        if cfg.warmup:  # one prompt, untimed: first-call costs (kernel selection, allocations) stay out
            runners[m](jobs[:1])
    runs = {m: [] for m in cfg.methods}
    first_outputs = {}
    reproducible = {}
    order = list(cfg.methods)
    for r in range(cfg.repeats):
        for m in order:
            load0 = _loadavg()
            t0, c0 = time.perf_counter(), time.process_time()
            res = runners[m](jobs)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            run = {"wall_s": wall, "cpu_s": cpu, "tokens": res["tokens"], "tokens_per_s": res["tokens"] / wall,
                   "tokens_per_cpu_s": res["tokens"] / cpu if cpu > 0 else None, "finish": res["finish"],
                   "loadavg": [load0, _loadavg()]}
            runs[m].append(run)
            if res["outputs"] is not None:
                if m in first_outputs:
                    reproducible[m] = reproducible.get(m, True) and res["outputs"] == first_outputs[m]
                else:
                    first_outputs[m] = res["outputs"]
            log(f"round {r + 1}/{cfg.repeats} {m:9s} {run['tokens_per_s']:8.1f} tok/s  {wall:7.1f} s  "
                f"{run['tokens']} tokens  load {run['loadavg'][0]}")
        order = order[1:] + order[:1]
    methods = {}
    for m, rs in runs.items():
        per_cpu = [x["tokens_per_cpu_s"] for x in rs if x["tokens_per_cpu_s"] is not None]
        methods[m] = {
            "batch_size": cfg.reference_batch_size if m == "reference" else cfg.batch_size,
            "setup_s": setup_s[m],
            "runs": rs,
            "median_tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "median_tokens_per_cpu_s": statistics.median(per_cpu) if per_cpu else None,
            "reproducible": reproducible.get(m) if m != "generate" else None,
        }
    ratios = {}
    for a, b in (("sampler", "reference"), ("sampler", "generate"), ("reference", "generate")):
        if a in methods and b in methods:
            ratios[f"{a}/{b}"] = methods[a]["median_tokens_per_s"] / methods[b]["median_tokens_per_s"]
            ca, cb = methods[a]["median_tokens_per_cpu_s"], methods[b]["median_tokens_per_cpu_s"]
            if ca and cb:
                ratios[f"cpu {a}/{b}"] = ca / cb
    import transformers

    meta = {
        "model": cfg.model, "adapter": cfg.adapter, "model_info": describe(model),
        "device": str(next(model.parameters()).device), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(), "prompts": len(jobs),
        "prompt_tokens": [len(j.prompt_token_ids) for j in jobs], "repeats": cfg.repeats,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "config": dataclasses.asdict(cfg),
    }
    return {"meta": meta, "methods": methods, "ratios": ratios}


def format_table(result: dict) -> str:
    """One line per method (median tokens/s, tokens per CPU-second, batch rows), then the ratios."""
    lines = [f"{'method':10s} {'rows':>5s} {'tok/s':>9s} {'tok/CPU-s':>10s}  runs (tok/s)"]
    for m, v in result["methods"].items():
        cpu = "-" if v["median_tokens_per_cpu_s"] is None else f"{v['median_tokens_per_cpu_s']:.1f}"
        lines.append(f"{m:10s} {v['batch_size']:5d} {v['median_tokens_per_s']:9.1f} {cpu:>10s}  "
                     + ", ".join(f"{x['tokens_per_s']:.1f}" for x in v["runs"])
                     + ("" if v["reproducible"] in (None, True) else "  NOT REPRODUCIBLE"))
    lines += [f"{k}: {v:.2f}x" for k, v in result["ratios"].items()]
    meta = result["meta"]
    lines.append(f"{meta['prompts']} prompts x k={meta['config']['k']}, {meta['config']['max_new_tokens']} new "
                 f"tokens max; {meta['device']}, {meta['threads']} threads, torch {meta['torch']}; medians of "
                 f"{meta['repeats']}")
    return "\n".join(lines)

