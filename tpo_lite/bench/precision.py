"""DPO step time per base precision (``python -m tpo_lite.bench.precision --variants bf16,nf4,fp32``): how
the CPU default of ``ModelConfig.load_in_4bit`` was chosen (docs/training.md, "CPU: bf16 base vs NF4 base")."""
from __future__ import annotations

import time

import torch

from tpo_lite.models import ModelConfig, describe, enable_gradient_checkpointing, load_model
from tpo_lite.ops import fused_dpo_loss
from tpo_lite.train import LMHead, _scored_hidden, _seed_all, collate


def time_training_steps(model_cfgs: dict, tokens_per_sequence: int = 256, pairs: int = 1, repeats: int = 5,
                        grad_checkpointing: bool = False, seed: int = 0, log=None) -> dict:
    """Seconds per DPO step (forward + backward + AdamW) for each named ``ModelConfig`` in ``model_cfgs``.

    A step is ``pairs`` pairs of random-token sequences of ``tokens_per_sequence`` tokens (a quarter of them
    prompt). All models are loaded first and their steps interleaved (one warm-up step each, then
    ``repeats`` rounds in alternating order), so a shared, noisy CPU slows every variant alike; returns the
    median per variant of the wall time and of the process CPU time (all threads). ``log``: optional callable
    that gets one line per step.
    """
    runners = {}
    for name, mcfg in model_cfgs.items():
        _seed_all(seed)
        t0 = time.time()
        model, _ = load_model(mcfg, trainable=True)
        load_s = time.time() - t0
        if grad_checkpointing:
            enable_gradient_checkpointing(model)
        head = LMHead.of(model)
        weight = head.weight
        params = [p for p in model.parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(seed)
        n_prompt = tokens_per_sequence // 4
        seqs = [(torch.randint(0, weight.shape[0], (n_prompt,), generator=g).tolist(),
                 torch.randint(0, weight.shape[0], (tokens_per_sequence - n_prompt,), generator=g).tolist())
                for _ in range(2 * pairs)]
        runners[name] = {"model": model, "head": head,
                         "opt": torch.optim.AdamW(params, lr=1e-5), "batch": collate(seqs, 0, weight.device),
                         "ref": torch.full((2 * pairs,), -1000.0, device=weight.device), "times": [], "cpu": [],
                         "load_seconds": load_s}

    def step(r):
        c = time.process_time()
        t = time.perf_counter()
        b = r["batch"]
        head = r["head"]
        out = fused_dpo_loss(_scored_hidden(r["model"], b), head.weight, b["targets"], b["segments"], r["ref"],
                             **head.options())
        out.loss.backward()
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=True)
        if head.weight.device.type == "cuda":
            torch.cuda.synchronize()
        r["cpu"].append(time.process_time() - c)
        return time.perf_counter() - t

    for name, r in runners.items():
        if log:
            log(f"{name}: warm-up step {step(r):.2f} s")
        else:
            step(r)
    for i in range(repeats):
        # ABBA order: whichever runs second in a round measured faster on the shared CPU, so alternate
        for name, r in (list(runners.items()) if i % 2 == 0 else list(runners.items())[::-1]):
            r["times"].append(step(r))
            if log:
                log(f"{name}: step {i + 1}/{repeats} {r['times'][-1]:.2f} s wall, {r['cpu'][-1]:.2f} s CPU")
    result = {}
    for name, r in runners.items():
        times = sorted(r["times"])
        cpu = sorted(r["cpu"][1:])  # without the warm-up
        result[name] = {"seconds_per_step": times[len(times) // 2], "min": times[0], "max": times[-1],
                        "cpu_seconds_per_step": cpu[len(cpu) // 2],
                        "load_seconds": r["load_seconds"], "model": describe(r["model"])}
    result["_setup"] = {"tokens_per_step": 2 * pairs * tokens_per_sequence, "repeats": repeats,
                        "threads": torch.get_num_threads(), "grad_checkpointing": grad_checkpointing}
    return result


if __name__ == "__main__":
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(description="Time DPO training steps per base precision (bf16 vs NF4 ...).")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokens", type=int, default=256, help="tokens per sequence (a pair is 2 sequences)")
    ap.add_argument("--pairs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--variants", default="bf16,nf4", help="comma list of bf16, fp32, nf4 (bf16 compute)")
    args = ap.parse_args()
    variants = {"bf16": dict(dtype="bfloat16", load_in_4bit=False),
                "fp32": dict(dtype="float32", load_in_4bit=False),
                "nf4": dict(dtype="bfloat16", load_in_4bit=True)}
    cfgs = {v: ModelConfig(path=args.model, device=args.device, **variants[v]) for v in args.variants.split(",")}
    res = time_training_steps(cfgs, args.tokens, args.pairs, args.repeats,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(res, indent=1), flush=True)
