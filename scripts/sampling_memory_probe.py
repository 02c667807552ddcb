#!/usr/bin/env python3
"""Peak RSS of loading the embedded model, then of one LocalSampler call (the generate stage's shape), measured
separately with tpo_lite.memory.StageMemory, and the largest size the decoding KV buffers reached (with the RSS
and the number of rows at that step); prints one JSON line. The numbers of docs/training.md, "Memory of a
whole run", come from it:

    python scripts/sampling_memory_probe.py --rows 96 --prompts 48              # two batches of 96 rows
    python scripts/sampling_memory_probe.py --rows 96 --prompts 48 --mode trim-batches
    python scripts/sampling_memory_probe.py --rows 96 --prompts 48 --mode mmap4  # glibc mmap threshold 4 MiB
    python scripts/sampling_memory_probe.py --rows 96 --prompts 24 --repeat 3    # three calls in one process
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import time


def _heap() -> dict:
    """glibc's main heap (mallinfo2, glibc >= 2.33): its size and how much of it is free; {} elsewhere."""
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    fn.restype = Info
    info = fn()
    return {"heap_mb": round(info.arena / 2**20), "heap_free_mb": round(info.fordblks / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=96, help="sampling.batch_size (rows decoded together)")
    ap.add_argument("--prompts", type=int, default=24, help="embedded training instructions (K=4 each)")
    ap.add_argument("--mode", default="as-is", choices=("as-is", "trim-batches", "mmap4"))
    ap.add_argument("--adapter", default=None, help="a LoRA adapter directory to sample with")
    ap.add_argument("--config", default="examples/smollm2_cpu.toml")
    ap.add_argument("--repeat", type=int, default=1,
                    help="sampling calls in this one process (later calls run on the heap the earlier ones left)")
    args = ap.parse_args()
    if args.mode == "mmap4":  # before anything large is allocated; M_MMAP_THRESHOLD = -3
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)

    from tpo_lite import memory, models, sampling
    from tpo_lite.config import load_config
    from tpo_lite.instructions import load_embedded
    from tpo_lite.prompts import build_prompt, get_template

    if args.mode == "trim-batches":  # hand freed heap pages back after every batch
        generate = sampling.LocalSampler._generate

        def trimmed(self, rows):
            try:
                return generate(self, rows)
            finally:
                memory.release()

        sampling.LocalSampler._generate = trimmed
    cfg = load_config(args.config)
    scfg = dataclasses.replace(cfg.sampling, batch_size=args.rows)
    with memory.StageMemory(release_after=False) as load:
        model, tok = models.load_model(cfg.model, adapter=args.adapter)
        template = get_template(cfg.prompts)
        sampler = sampling.make_sampler(scfg, tok, template, model=model, progress=False)
        del model
        memory.release()
    # The KV buffers' size at every decoding step, beside the RSS then: what of the peak is KV cache.
    steps = []

    def kv_at_step(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        kv = sum(t.nbytes for layer in getattr(cache, "layers", None) or []
                 for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if hasattr(t, "nbytes"))
        steps.append((kv, memory.rss_bytes() or 0, int(kwargs["input_ids"].shape[0])))

    sampler.model.register_forward_pre_hook(kv_at_step, with_kwargs=True)
    jobs = [sampling.make_job(it.id, build_prompt(tok, it.instruction, cfg.prompts), tok, scfg)
            for it in load_embedded("train")[:args.prompts]]
    repeats = []
    for _ in range(args.repeat - 1):
        with memory.StageMemory() as earlier:
            list(sampler.sample(jobs, 4))
        repeats.append({**earlier.record(), **_heap()})
    with memory.StageMemory(release_after=False) as sample:
        t0 = time.time()
        out = list(sampler.sample(jobs, 4))
        seconds = time.time() - t0
    kv, rss, rows = max(steps)
    print(json.dumps({"rows": args.rows, "prompts": args.prompts, "mode": args.mode, "adapter": args.adapter,
                      "load": load.record(), "sample": sample.record(), "seconds": round(seconds, 1),
                      "kv_cache_max_mb": round(kv / 2**20, 1), "rss_mb_then": round(rss / 2**20, 1),
                      "rows_then": rows, "earlier_calls": repeats, "heap_after": _heap(),
                      "tokens": sum(len(s.token_ids) for _, ss in out for s in ss)}))


if __name__ == "__main__":
    main()
