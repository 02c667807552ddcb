"""``sampling.backend = "vllm"``: sampling with an offline vLLM engine (``vllm.LLM``) in this process.

vllm is an optional dependency: this module imports it only when a :class:`VLLMSampler` is built (``import
tpo_lite`` never does), and without it that build fails with one :class:`~tpo_lite.errors.TpoError` saying how to
install it.

Records. :class:`VLLMSampler` is an :class:`~tpo_lite.sampling.OpenAISampler` with another transport: the same
per-sample request logic (:meth:`~tpo_lite.sampling.OpenAISampler._requests`: thought budget, forced response
marker decided by :func:`tpo_lite.parsing.response_marker_uses`, response budget, stop strings, EOS rules) and
the same reading of a completion (:meth:`~tpo_lite.sampling.OpenAISampler._parse_choice`; vLLM's
``CompletionOutput`` has exactly the fields of a server's completion choice), so it writes the records of the
other backends: :class:`~tpo_lite.sampling.Sample` with the sampled token ids (forced marker tokens and the
final EOS included), the sample's seed, the finish reason and the forced flag. Instead of one HTTP request per
sample it sends the requests of many samples in one ``LLM.generate`` call: the first requests of
``max(1, batch_size // k)`` whole prompts, then the continuation requests of those that need one (a forced
response marker, a quoted marker that does not end the thought) in a second call, and so on. Each request
carries its own ``SamplingParams.seed`` (the sample's seed, a derived one for a continuation) and
``stop_token_ids`` = the EOS ids of the local sampler (tokenizer + generation config).

Adapters. :meth:`VLLMSampler.ensure_adapter` makes every request carry a ``LoRARequest`` whose integer id and
name come from the sha256 of the adapter's files (:func:`tpo_lite.rundir.adapter_digest`), not its path: vLLM
caches adapters by id, so an adapter retrained at the same path gets a new id and is never served stale.

GPU memory: a fresh engine per stage, shut down after it. The engine is built at the sampler's first
``sample()`` call and shut down when the last sampler using it is closed or garbage-collected (the generate
stage deletes its sampler before training; an evaluation's samplers -- greedy and format retry -- share one
engine and go with the evaluation), which ends vLLM's engine process and so frees its weights, KV cache, CUDA
graphs and CUDA context before DPO training loads its model. Chosen over sleep mode
(``LLM.sleep(level=1)`` / ``wake_up`` with ``enable_sleep_mode``) because level 1 keeps a pinned copy of the
weights in host memory during training (the run's peak RSS would hold the base model twice), vLLM issue
53888 reports level-1 wake-ups where a LoRA adapter silently stopped applying, level 2 needs a weight reload
that crashed with LoRA (vLLM issue 39934), and sleep mode exists on CUDA only. The cost is one engine start
(weight load, memory profiling, CUDA graph capture) per generate stage and per evaluation.
"""
from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

from tpo_lite.errors import TpoError
from tpo_lite.sampling import OpenAISampler, PromptJob, Sample, SamplingConfig, _check_jobs, _progress

INSTALL_HINT = ("install it with `pip install vllm` (a build for this machine's CUDA and torch), or use "
                "sampling.backend = 'local' or 'openai'")


def import_vllm() -> SimpleNamespace:
    """The parts of vllm this backend uses, or a :class:`TpoError` saying how to install it."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise TpoError(f"sampling.backend = 'vllm' needs the vllm package, which cannot be imported here "
                       f"({e}); {INSTALL_HINT}", field="sampling.backend") from None
    return SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams, TokensPrompt=TokensPrompt,
                           LoRARequest=LoRARequest)


# ------------------------------------------------------------------------------------------- the engine

# settings -> [LLM, number of samplers using it]; one engine at a time (it takes the GPU).
_ENGINES: dict[tuple, list] = {}


def live_engines() -> int:
    """vLLM engines alive in this process (0 between stages)."""
    return len(_ENGINES)


def _acquire(vllm, settings: tuple):
    if settings in _ENGINES:
        _ENGINES[settings][1] += 1
        return _ENGINES[settings][0]
    if _ENGINES:
        other = next(iter(_ENGINES))
        raise TpoError(f"a vLLM engine for {other[0]} with other settings is still in use in this process; one "
                       "engine at a time (it takes the GPU): close the other sampler first",
                       field="sampling.backend")
    model, memory, lora_rank, max_len = settings
    kwargs = {"enable_lora": True, "max_lora_rank": lora_rank, "max_loras": 1} if lora_rank else {}
    if max_len is not None:
        kwargs["max_model_len"] = max_len
    # seed=0: every request carries its own seed, the engine's never decides a sample.
    llm = vllm.LLM(model=model, tokenizer=model, seed=0, gpu_memory_utilization=memory, **kwargs)
    _ENGINES[settings] = [llm, 1]
    return llm


def _release(settings: tuple) -> None:
    """One sampler fewer on the engine of ``settings``; the last one shuts it down."""
    entry = _ENGINES.get(settings)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _ENGINES[settings]
    llm = entry.pop(0)
    # LLM.shutdown where this vLLM has it, else its engine client's: ends the engine process (V1 default).
    stop = getattr(llm, "shutdown", None)
    if not callable(stop):
        stop = getattr(getattr(getattr(llm, "llm_engine", None), "engine_core", None), "shutdown", None)
    try:
        if callable(stop):
            stop()
    finally:
        del llm, stop
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- the sampler

def _adapter_rank(adapter: Path) -> int:
    cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    ranks = [cfg.get("r") or 0, *(cfg.get("rank_pattern") or {}).values()]
    return max(int(r) for r in ranks)


class VLLMSampler(OpenAISampler):
    """Sampling with an in-process ``vllm.LLM`` (see the module docstring): ``.sample(jobs, k, skip)`` yields
    ``(prompt_id, [Sample] * k)`` as each prompt's samples are done, with the records of the other backends.

    The engine loads the model from where ``tokenizer`` was loaded (``tokenizer.name_or_path``:
    :func:`tpo_lite.models.load_tokenizer` gives the ``[model]`` directory, or a GGUF's float checkpoint), in
    its checkpoint's dtype (vLLM's ``dtype="auto"``). Call :meth:`close` (or drop the sampler) to shut the engine
    down; a closed sampler builds a new one if it samples again.
    """

    def __init__(self, cfg: SamplingConfig, tokenizer, template=None, progress: bool = True, eos_ids=None):
        super().__init__(cfg, tokenizer, template, progress=progress, eos_ids=eos_ids)
        self.vllm = import_vllm()
        self.model_path = getattr(tokenizer, "name_or_path", None)
        if not self.model_path:
            raise TpoError("the vllm backend loads the model from where the tokenizer was loaded, and this "
                           "tokenizer does not say (no name_or_path)", field="sampling.backend")
        self.lora = None  # the LoRARequest every request carries, once ensure_adapter succeeded
        self.engine = None
        self._lease = None
        self._server_returns_ids = True

    # -- engine ------------------------------------------------------------------------------------------
    def _settings(self) -> tuple:
        cfg = self.cfg
        return (str(self.model_path), float(cfg.vllm_gpu_memory_utilization),
                int(cfg.vllm_max_lora_rank) if self.lora is not None else None, cfg.vllm_max_model_len)

    def _ensure_engine(self):
        if self.engine is None:
            settings = self._settings()
            self.engine = _acquire(self.vllm, settings)
            self._lease = weakref.finalize(self, _release, settings)  # also when the sampler is collected
        return self.engine

    def close(self) -> None:
        """Stop using the engine; the last sampler to do so shuts it down (its GPU memory is then free)."""
        self.engine = None
        if self._lease is not None:
            self._lease()
            self._lease = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
        raise TpoError("the vllm backend samples in this process; it has no server to send "
                       f"{method} {path} to", field="sampling.backend")

    # -- adapters ---------------------------------------------------------------------------------------
    def ensure_adapter(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Sample from the peft LoRA adapter at ``path`` from now on: every request carries a ``LoRARequest``
        whose id and name come from a hash of the adapter's files. Returns the name. Refuses an adapter whose
        rank exceeds ``sampling.vllm_max_lora_rank`` (vLLM could not serve it)."""
        from tpo_lite.models import check_adapter_dir
        from tpo_lite.rundir import adapter_digest

        ad = check_adapter_dir(path).resolve()
        rank = _adapter_rank(ad)
        if rank > self.cfg.vllm_max_lora_rank:
            raise TpoError(f"the adapter has LoRA rank {rank}, above sampling.vllm_max_lora_rank = "
                           f"{self.cfg.vllm_max_lora_rank}; raise it to at least {rank}", path=str(ad),
                           field="sampling.vllm_max_lora_rank")
        digest = adapter_digest(ad)
        name = name or f"{self.cfg.adapter_name}-{digest[:12]}"
        had_lora = self.lora is not None
        self.lora = self.vllm.LoRARequest(lora_name=name, lora_int_id=int(digest[:8], 16) % 0x7FFFFFFF + 1,
                                          lora_path=str(ad))
        self.adapter = str(ad)
        if self.engine is not None and not had_lora:  # built without LoRA: the next sample() rebuilds it
            self.close()
        return name

    # -- sampling ---------------------------------------------------------------------------------------
    def _generate(self, requests: list[tuple]) -> list[dict]:
        """One ``LLM.generate`` call for ``requests`` (each ``(prompt_ids, max_tokens, seed, stops)``); their
        completions as server-style choices, in order."""
        vllm, cfg = self.vllm, self.cfg
        stop_ids = sorted(self.eos_ids)
        prompts = [vllm.TokensPrompt(prompt_token_ids=list(ids)) for ids, _, _, _ in requests]
        params = [vllm.SamplingParams(n=1, temperature=cfg.temperature, top_p=cfg.top_p, seed=seed,
                                      max_tokens=max_tokens, stop=list(stops) or None, stop_token_ids=stop_ids,
                                      include_stop_str_in_output=True, skip_special_tokens=True)
                  for _, max_tokens, seed, stops in requests]
        outputs = self._ensure_engine().generate(prompts, params, use_tqdm=False, lora_request=self.lora)
        if len(outputs) != len(requests):
            raise TpoError(f"the vLLM engine answered {len(outputs)} of {len(requests)} requests",
                           field="sampling.backend")
        choices = []
        for out in outputs:
            c = out.outputs[0]
            if c.finish_reason not in ("stop", "length") or not c.token_ids:
                # "abort", or no token where at least one was asked for: never record a broken sample
                raise TpoError(f"the vLLM engine ended a request with finish_reason {c.finish_reason!r} after "
                               f"{len(c.token_ids)} tokens", field="sampling.backend")
            choices.append({"text": c.text, "token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason})
        return choices

    def sample(self, jobs: list[PromptJob], k: int | None = None,
               skip=()) -> Iterator[tuple[str, list[Sample]]]:
        """Yield ``(prompt_id, samples)`` per job once its ``k`` samples are done; ``skip``: prompt ids already
        recorded, not sampled (per-request seeds make the others independent of them)."""
        k = k or self.cfg.k
        _check_jobs(jobs, k)
        jobs = [job for job in jobs if job.prompt_id not in skip]
        per_call = max(1, self.cfg.batch_size // k)
        with _progress(len(jobs) * k, self.progress, "sampling") as bar:
            for start in range(0, len(jobs), per_call):
                chunk = jobs[start:start + per_call]
                steps, pending, done = {}, {}, {}
                for j, job in enumerate(chunk):
                    for i in range(k):
                        steps[j, i] = self._requests(job, i)
                        pending[j, i] = None  # first step: nothing to send yet
                while pending:
                    requests = {}
                    for key, answer in pending.items():
                        try:
                            requests[key] = next(steps[key]) if answer is None else steps[key].send(answer)
                        except StopIteration as finished:
                            j, i = key
                            done.setdefault(j, [None] * k)[i] = finished.value
                            bar.update(1)
                            if all(s is not None for s in done[j]):
                                yield chunk[j].prompt_id, done.pop(j)
                    pending = dict(zip(requests, self._generate(list(requests.values())))) if requests else {}
