"""DPO training benchmark (``tpo-lite bench train``): tpo-lite's DPO against TRL's ``DPOTrainer`` on the same pairs.

One *run* is what a TPO iteration's training does: load the model, compute the reference log-probs of every
pair and train one epoch of DPO on a LoRA adapter. Every run is a fresh Python subprocess, so its peak RSS
(of that process: imports, model, reference pass and training together) belongs to that method
alone and no allocator state carries over. Runs are interleaved (round i runs the methods in order, round i+1 in
reverse order), so a shared, noisy machine slows every method alike; the result holds the medians per method
and their ratios.

*The same pairs*: the token ids of ``pairs`` (a ``pairs.jsonl`` of a run) or synthetic ones, cut by
:func:`fit_pair` (tpo-lite's rule, one prompt for both completions) so that no trainer cuts anything, reach both
trainers unchanged (TRL's own tokenising of text is bypassed). *tokens/s* = prompt + completion tokens of all
chosen and rejected sequences (padding excluded) divided by the seconds of the reference pass + training (model
loading and saving excluded); *tokens/CPU-s* divides by the process CPU time of the same span instead, which
other jobs on a shared machine inflate far less. Both trainers get the same base model
(``tpo_lite.models.load_model``, same dtype and 4-bit setting), LoRA rank / alpha / dropout / targets, batch
size, accumulation, learning rate and beta (TRL puts the LoRA on through its ``peft_config``). TRL runs with
its own defaults otherwise (gradient checkpointing on, bf16 autocast when the model is bf16, dropout disabled,
the reference computed in every step with the adapter disabled); the two trainers shuffle the pairs
differently, so their padding differs a little.

Methods: ``tpo-lite`` (``tpo_lite.train.train_iteration`` with the ``[train]`` defaults), ``tpo-lite-nogc``
(the same with ``grad_checkpointing = false``), ``tpo-lite-shared`` / ``tpo-lite-nogc-shared`` (those two with
``share_prompt = true``: one row per pair, the prompt run once; tokens/s still counts the prompt twice, as the
work done for the same pairs), ``tpo-lite-nogc-peft-lora`` (``tpo-lite-nogc`` with ``fuse_lora = false``:
peft's own LoRA forward instead of :mod:`tpo_lite.ops.lora_linear`), ``tpo-lite-nogc-padmask`` (``tpo-lite-nogc`` with
the [B, T] padding mask passed to attention, which :func:`tpo_lite.models.final_hidden_states` drops for right-padded
batches), ``trl`` (needs ``trl`` importable by ``trl_python``, else it is reported as n/a).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union
from ..options import option

METHODS = ("tpo-lite", "tpo-lite-nogc", "tpo-lite-shared", "tpo-lite-nogc-shared", "tpo-lite-nogc-peft-lora",
           "tpo-lite-nogc-padmask", "trl")
# the tpo-lite ratios a/b reported besides each one over trl
_RATIOS = {("tpo-lite", "tpo-lite-nogc"), ("tpo-lite-shared", "tpo-lite"), ("tpo-lite-nogc-shared", "tpo-lite-nogc"),
           ("tpo-lite-nogc", "tpo-lite-nogc-peft-lora"), ("tpo-lite-nogc", "tpo-lite-nogc-padmask")}
_RESULT = "TPO_BENCH_RESULT "


@dataclass
class TrainBenchConfig:
    model: str = option("smollm2", "Model to train ([model] path): 'smollm2', an HF directory or a .gguf file.")
    dtype: str = option("auto", "Model dtype, as [model] dtype.")
    load_in_4bit: Union[bool, str] = option("auto",
        "NF4 base (QLoRA), as [model] load_in_4bit: true, false or auto (NF4 on CUDA only).")
    device: str = option("auto", "Torch device, as [model] device.")
    pairs: str = option("",
        "A pairs.jsonl of a run (its token ids are used); empty = synthetic pairs of random tokens: "
        "prompts of max_length/8..max_length/4 tokens, completions of max_length/4..3*max_length/4.")
    n_pairs: int = option(16, "Pairs per run (the first n of --pairs).")
    max_length: int = option(512, "Longest prompt + completion in tokens ([train]).")
    batch_size: int = option(2, "Pairs per micro-batch ([train] batch_size).")
    grad_accum: int = option(1, "Micro-batches per optimizer step ([train]).")
    lora_r: int = option(16, "LoRA rank (all-linear targets).")
    lora_alpha: float = option(32.0, "LoRA alpha.")
    learning_rate: float = option(1e-4, "Learning rate of both trainers.")
    beta: float = option(0.1, "DPO beta of both trainers.")
    methods: tuple = option(("tpo-lite", "trl"), f"Methods to run, among {', '.join(METHODS)}.")
    repeats: int = option(3, "Runs per method (interleaved rounds); medians reported.")
    threads: int = option(0,
        "torch threads in each run (0 = torch's default). On a busy shared CPU 1 is often fastest.")
    seed: int = option(0, "Seed of the synthetic pairs, the LoRA init and the order.")
    trl_python: str = option("",
        "Python interpreter that runs the TRL method (one with trl installed, e.g. a separate venv); "
        "empty = this one. tpo_lite is put on its PYTHONPATH.")
    timeout_s: float = option(3600.0, "Time limit of one run (seconds).")

    def __post_init__(self):
        self.methods = tuple(self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be among {', '.join(METHODS)}, got {', '.join(self.methods) or 'none'}")
        for name in ("n_pairs", "repeats", "batch_size", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 16:
            raise ValueError(f"max_length must be >= 16, got {self.max_length}")
        if isinstance(self.load_in_4bit, str):
            v = self.load_in_4bit.lower()
            if v not in ("true", "false", "auto"):
                raise ValueError(f"load_in_4bit must be true, false or auto, got {self.load_in_4bit!r}")
            self.load_in_4bit = {"true": True, "false": False}.get(v, "auto")


# ------------------------------------------------------------------------------------------------- pairs

def synthetic_pairs(n: int, max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` pair records of random token ids (ids from ``min(100, vocab // 4)`` up, clear of special tokens)."""
    import random

    rng = random.Random(seed)
    lo = min(100, vocab // 4)

    def ids(k):
        return [rng.randrange(lo, vocab) for _ in range(k)]

    out = []
    for i in range(n):
        p = rng.randint(max_length // 8, max_length // 4)
        c, r = (rng.randint(max_length // 4, 3 * max_length // 4) for _ in range(2))
        out.append({"prompt_id": f"bench-{i:04d}", "prompt_token_ids": ids(p), "chosen_token_ids": ids(c),
                    "rejected_token_ids": ids(r)})
    return out


def fit_pair(rec: dict, max_length: int) -> dict:
    """``rec`` cut so that prompt + chosen and prompt + rejected both fit ``max_length`` with ONE prompt (the
    shorter of tpo-lite's two cuts; completions keep their beginning), so no trainer cuts anything itself."""
    from tpo_lite.train import truncate

    prompt = rec["prompt_token_ids"]
    p1, _ = truncate(prompt, rec["chosen_token_ids"], max_length)
    p2, _ = truncate(prompt, rec["rejected_token_ids"], max_length)
    p = p1 if len(p1) <= len(p2) else p2
    room = max_length - len(p)
    return {"prompt_id": rec["prompt_id"], "prompt_token_ids": list(p),
            "chosen_token_ids": list(rec["chosen_token_ids"][:room]),
            "rejected_token_ids": list(rec["rejected_token_ids"][:room])}


def vocab_size(model_cfg) -> int:
    """The model's vocabulary size, read from its config (the model itself is not loaded)."""
    from transformers import AutoConfig

    from tpo_lite.models import float_checkpoint

    config = AutoConfig.from_pretrained(float_checkpoint(model_cfg))
    return int(getattr(config, "get_text_config", lambda: config)().vocab_size)


def load_pairs(cfg: TrainBenchConfig, vocab: int) -> list[dict]:
    """The benchmark's pairs (validated like a run's), cut by :func:`fit_pair`."""
    from tpo_lite.train import prepare_pairs

    if cfg.pairs:
        from tpo_lite.jsonl import read_records

        records = list(read_records(cfg.pairs))[:cfg.n_pairs]
        if not records:
            raise ValueError(f"{cfg.pairs}: no pairs")
    else:
        records = synthetic_pairs(cfg.n_pairs, cfg.max_length, vocab, cfg.seed)
    prepare_pairs(records, cfg.max_length, vocab, source=cfg.pairs or None)  # validation only
    return [fit_pair(r, cfg.max_length) for r in records]


def count_tokens(pairs: list[dict]) -> int:
    """Prompt + completion tokens of every chosen and rejected sequence."""
    return sum(2 * len(p["prompt_token_ids"]) + len(p["chosen_token_ids"]) + len(p["rejected_token_ids"])
               for p in pairs)


# ---------------------------------------------------------------------------------------- one run (child)

def _model_cfg(spec: dict):
    from tpo_lite.models import ModelConfig

    return ModelConfig(path=spec["model"], dtype=spec["dtype"], load_in_4bit=spec["load_in_4bit"],
                       device=spec["device"], lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"])


def _run_tpo_lite(spec: dict, pairs: list[dict], out_dir: str) -> dict:
    from tpo_lite.train import TrainConfig, train_iteration

    if spec["method"].endswith("-padmask"):
        import tpo_lite.models

        tpo_lite.models.only_right_padding = lambda mask: False  # every mask reaches the model, as before
    kw = {"grad_checkpointing": "-nogc" not in spec["method"], "share_prompt": spec["method"].endswith("-shared"),
          "fuse_lora": not spec["method"].endswith("-peft-lora")}
    tcfg = TrainConfig(epochs=1, batch_size=spec["batch_size"], grad_accum=spec["grad_accum"],
                       max_length=spec["max_length"], learning_rate=spec["learning_rate"], beta=spec["beta"],
                       seed=spec["seed"], **kw)
    m = train_iteration(_model_cfg(spec), tcfg, pairs, out_dir, None, progress=False)
    return {"seconds": m["ref_seconds"] + m["train_seconds"], "ref_seconds": m["ref_seconds"],
            "cpu_seconds": m["memory"]["reference"]["cpu_seconds"] + m["memory"]["dpo"]["cpu_seconds"],
            "train_seconds": m["train_seconds"], "steps": m["steps"], "grad_checkpointing": tcfg.grad_checkpointing,
            "share_prompt": tcfg.share_prompt, "fuse_lora": tcfg.fuse_lora,
            "padding_mask_passed": spec["method"].endswith("-padmask"),
            "initial_loss": m["initial_loss"], "final_loss": m["final_loss"], "model": m["model"],
            "phases": m["memory"]}


def _run_trl(spec: dict, pairs: list[dict], out_dir: str) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from tpo_lite.models import describe, load_model, resolve_device, resolve_dtype

    class _TokenisedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):  # the token ids are given: no tokenising
            return dataset

    mcfg = _model_cfg(spec)
    model, tok = load_model(mcfg)  # the frozen base; TRL puts the LoRA on it
    device = resolve_device(mcfg.device)
    dtype = resolve_dtype(mcfg.dtype, device)
    ds = Dataset.from_list([{"prompt_ids": p["prompt_token_ids"], "chosen_ids": p["chosen_token_ids"],
                             "rejected_ids": p["rejected_token_ids"]} for p in pairs])
    lora = LoraConfig(r=mcfg.lora_r, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout,
                      target_modules=mcfg.target_modules, bias="none", task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=spec["batch_size"],
                     gradient_accumulation_steps=spec["grad_accum"], num_train_epochs=1,
                     learning_rate=spec["learning_rate"], beta=spec["beta"], max_length=spec["max_length"],
                     bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=device.type == "cpu",
                     report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                     dataloader_pin_memory=False, seed=spec["seed"], data_seed=spec["seed"])
    trainer = _TokenisedDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                   peft_config=lora)
    t0, cpu0 = time.time(), time.process_time()
    out = trainer.train()
    seconds, cpu = time.time() - t0, time.process_time() - cpu0
    return {"seconds": seconds, "cpu_seconds": cpu, "steps": out.global_step, "final_loss": out.training_loss,
            "grad_checkpointing": bool(args.gradient_checkpointing), "bf16": bool(args.bf16),
            "trl_version": trl.__version__, "model": describe(trainer.model)}


def child_main(spec_path: str) -> None:
    """Runs in the subprocess: one method, one run -> prints ``TPO_BENCH_RESULT {json}``."""
    from tpo_lite.memory import process_peak_bytes, rss_bytes

    spec = json.loads(Path(spec_path).read_text())
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    pairs = spec["pairs"]
    res = {"method": spec["method"], "threads": torch.get_num_threads(), "pid": os.getpid()}
    rss0 = rss_bytes() or 0
    with tempfile.TemporaryDirectory(prefix="tpo-bench-train-") as out_dir:
        run = _run_trl if spec["method"] == "trl" else _run_tpo_lite
        res.update(run(spec, pairs, out_dir))
    # not ru_maxrss: tpo-lite's per-phase measurements reset the kernel's high-water mark, which it reads
    res["peak_rss_mb"] = process_peak_bytes() / 2**20
    res["rss_after_imports_mb"] = rss0 / 2**20
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        res["peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["peak_cuda_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    res["tokens"] = count_tokens(pairs)
    res["tokens_per_s"] = res["tokens"] / res["seconds"]
    res["tokens_per_cpu_s"] = res["tokens"] / res["cpu_seconds"]
    print(_RESULT + json.dumps(res), flush=True)


# ------------------------------------------------------------------------------------------------ parent

def _pythonpath() -> str:
    root = str(Path(__file__).resolve().parents[2])
    old = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + old if old else "")


def _python_for(cfg: TrainBenchConfig, method: str) -> str:
    return (cfg.trl_python or sys.executable) if method == "trl" else sys.executable


def trl_status(python: str) -> Optional[str]:
    """TRL's version as seen by ``python``, or None when it cannot import trl."""
    try:
        proc = subprocess.run([python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": _pythonpath()})
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _run_child(cfg: TrainBenchConfig, method: str, spec: dict, log: Callable[[str], None]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**spec, "method": method}, f)
        path = f.name
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "TOKENIZERS_PARALLELISM": "false"}
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    try:
        proc = subprocess.run([_python_for(cfg, method), "-m", "tpo_lite.bench.train", "--child", path],
                              capture_output=True, text=True, timeout=cfg.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timed out after {cfg.timeout_s:.0f} s"}
    finally:
        os.unlink(path)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT):
            return json.loads(line[len(_RESULT):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"method": method, "error": f"exit {proc.returncode}: " + " | ".join(tail)}


def _median(xs):
    return statistics.median(xs) if xs else None


def run_train_benchmark(cfg: TrainBenchConfig, log: Callable[[str], None] = lambda s: None,
                        on_run: Callable[[dict], None] | None = None) -> dict:
    """Interleaved fresh-process runs of ``cfg.methods``; returns ``{"meta", "runs", "methods", "ratios",
    "complete"}``.

    ``on_run`` gets that result over the runs so far after every run, so a caller can keep partial results
    when the whole benchmark is cut short (a time limit)."""
    pairs = load_pairs(cfg, vocab_size(_model_cfg(dataclasses.asdict(cfg))))
    spec = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("methods", "pairs", "trl_python")}
    spec["pairs"] = pairs
    status = {m: "ok" for m in cfg.methods}
    trl_version = None
    if "trl" in cfg.methods:
        trl_version = trl_status(_python_for(cfg, "trl"))
        if trl_version is None:
            status["trl"] = f"n/a (trl not importable by {_python_for(cfg, 'trl')})"
            log(f"trl: {status['trl']}")
    active = [m for m in cfg.methods if status[m] == "ok"]
    runs = []
    for i in range(cfg.repeats):
        for m in (active if i % 2 == 0 else active[::-1]):
            log(f"round {i + 1}/{cfg.repeats}: {m} ...")
            r = _run_child(cfg, m, spec, log)
            r["round"] = i + 1
            runs.append(r)
            if "error" in r:
                log(f"  {m}: {r['error']}")
            else:
                log(f"  {m}: {r['tokens_per_s']:.1f} tokens/s, {r['seconds']:.1f} s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB")
            if on_run is not None:
                on_run(_summarise(cfg, pairs, runs, status, trl_version))
    return _summarise(cfg, pairs, runs, status, trl_version)


def _summarise(cfg: TrainBenchConfig, pairs, runs: list[dict], status: dict, trl_version) -> dict:
    """The benchmark's result over ``runs``: medians per method and the ratios between methods."""
    methods = {}
    for m in cfg.methods:
        ok = [r for r in runs if r["method"] == m and "error" not in r]
        errors = [r["error"] for r in runs if r["method"] == m and "error" in r]
        if status[m] != "ok":
            methods[m] = {"status": status[m]}
            continue
        if not ok:
            methods[m] = {"status": ("failed: " + errors[0]) if errors else "not run"}
            continue
        methods[m] = {"status": "ok", "runs": len(ok), "errors": errors,
                      "tokens_per_s": _median([r["tokens_per_s"] for r in ok]),
                      "tokens_per_cpu_s": _median([r["tokens_per_cpu_s"] for r in ok]),
                      "seconds": _median([r["seconds"] for r in ok]),
                      "peak_rss_mb": _median([r["peak_rss_mb"] for r in ok]),
                      "tokens_per_s_all": [round(r["tokens_per_s"], 2) for r in ok],
                      "peak_rss_mb_all": [round(r["peak_rss_mb"], 1) for r in ok],
                      # the same pairs and seed: the layouts (share_prompt) and trainers should agree on these
                      "initial_loss_all": [r.get("initial_loss") for r in ok],
                      "final_loss_all": [r.get("final_loss") for r in ok]}
        if any("peak_cuda_allocated_mb" in r for r in ok):
            methods[m]["peak_cuda_allocated_mb"] = _median([r.get("peak_cuda_allocated_mb", 0) for r in ok])
            methods[m]["peak_cuda_reserved_mb"] = _median([r.get("peak_cuda_reserved_mb", 0) for r in ok])
    ratios = {}
    good = [m for m in cfg.methods if methods[m]["status"] == "ok"]
    for a in good:
        for b in good:
            if a.startswith("tpo-lite") and (b == "trl" or (a, b) in _RATIOS):
                ratios[f"{a}/{b} tokens_per_s"] = methods[a]["tokens_per_s"] / methods[b]["tokens_per_s"]
                ratios[f"{a}/{b} tokens_per_cpu_s"] = methods[a]["tokens_per_cpu_s"] / methods[b]["tokens_per_cpu_s"]
                ratios[f"{a}/{b} peak_rss"] = methods[a]["peak_rss_mb"] / methods[b]["peak_rss_mb"]
                if "peak_cuda_allocated_mb" in methods[a] and methods[b].get("peak_cuda_allocated_mb"):
                    ratios[f"{a}/{b} peak_cuda_allocated"] = (methods[a]["peak_cuda_allocated_mb"]
                                                              / methods[b]["peak_cuda_allocated_mb"])
    meta = {**{k: v for k, v in dataclasses.asdict(cfg).items()}, "methods": list(cfg.methods),
            "n_pairs_used": len(pairs), "tokens_per_run": count_tokens(pairs), "trl_version": trl_version,
            "python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "timing": "reference pass + training (one epoch), model load and save excluded; medians of "
                      "interleaved rounds, one fresh subprocess per run; tokens_per_cpu_s divides by the process "
                      "CPU time of the same span (all threads), which a busy machine inflates far less than the "
                      "wall time",
            "memory": "peak RSS of the run's subprocess (imports + model + reference + training): VmHWM / "
                      "ru_maxrss, kept across tpo_lite.memory's high-water-mark resets"}
    return {"meta": meta, "runs": list(runs), "methods": methods, "ratios": ratios,
            "complete": len(runs) == cfg.repeats * sum(status[m] == "ok" for m in cfg.methods)}


def format_table(result: dict) -> str:
    lines = [f"{'method':16} {'tokens/s':>10} {'tokens/CPU-s':>13} {'seconds':>9} {'peak RSS MB':>12}  runs"]
    for m, v in result["methods"].items():
        if v["status"] != "ok":
            lines.append(f"{m:16} {v['status']}")
            continue
        lines.append(f"{m:16} {v['tokens_per_s']:10.1f} {v['tokens_per_cpu_s']:13.1f} {v['seconds']:9.1f} "
                     f"{v['peak_rss_mb']:12.0f}  {v['runs']}"
                     + (f"  (CUDA peak {v['peak_cuda_allocated_mb']:.0f} MB)" if "peak_cuda_allocated_mb" in v
                        else ""))
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v:.3f}")
    return "\n".join(lines)



if __name__ == "__main__":  # the child: python -m tpo_lite.bench.train --child SPEC.json
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    else:
        sys.exit("usage: python -m tpo_lite.bench.train --child SPEC.json (or use `tpo-lite bench train`)")
