"""Sample K thought+response outputs per instruction: a local transformers backend and an OpenAI-compatible
server backend (vLLM), with per-sample seeds and optional budget forcing. The in-process vLLM backend
(:mod:`tpo_lite.vllm_backend`) sends the server backend's requests to an engine in this process.

Both samplers take :class:`PromptJob` s (the chat-templated prompt, its token ids and one seed per sample) and
yield ``(prompt_id, [Sample, ...])`` as soon as all K samples of a prompt are done (local backend: when its
batch of prompts is done), so the caller can append one JSONL record per prompt and a crash loses at most the
prompts in flight.

Seeds. Sample ``i`` of prompt ``p`` uses ``sample_seed(run_seed, p, i)`` (a hash, independent of the order
or batching of the prompts), so a resumed run draws the same samples for the prompts it still has to do.

* Local: every sample owns a CPU ``torch.Generator`` seeded with its seed; each decoding step draws one
  uniform number per sample from it and picks the token by inverse-CDF over the temperature-scaled, top-p
  truncated distribution (:func:`select_tokens`). A sample's draws therefore depend only on its own seed and
  tokens, not on its batch neighbours. The logits do depend very slightly on the batch shape (padding and
  batch size change the float reduction order), so a sample is bit-for-bit reproducible when it is generated
  in the same batch layout. The layout is a function of the job list alone (:meth:`LocalSampler.groups`:
  consecutive whole prompts), and a batch's prompts are yielded together when it ends, so a resume that
  samples the rest of the same job list from a batch boundary, or the whole list with ``skip`` = the prompts
  already recorded (exact even after a crash between two records of one batch), reproduces an uninterrupted
  run exactly.
* Server: one request per sample with ``n=1`` and its own ``seed`` (vLLM honours per-request seeds).

Budget forcing (``thought_budget``). The thought is sampled until the model writes the template's response
marker itself (then nothing is forced), a ``thought_stop`` string, EOS, or ``thought_budget`` generated
tokens; in the last three cases the EOS (if any) is dropped and ``template.forced_response_text`` (the
response marker on its own line; for ``think``, ``</think>`` on its own line and a blank line) is appended --
to the text *and* the token ids, so DPO trains on it -- and
the response is sampled after it. ``Sample.forced`` records it. "The model wrote the marker" is decided by
the parser's own rule, :func:`tpo_lite.parsing.response_marker_uses`, on the whole text so far in streaming
mode (a marker that the next characters could still undo, such as ``...Here is my response`` before ``to
you``, does not count yet), so the parser splits every finished output at the marker the sampler saw or
forced. When the thought ends with the model's own marker lacking only its line end (``...Here is my
response`` or ``"Here is my response:`` right before EOS or the budget), only the line end is forced.
``max_new_tokens`` bounds the whole output (thought + forced marker + response) -- unless
``response_budget`` is set: once the marker is in the output (written or forced), the output may then run
to (its tokens up to and including the marker) + ``response_budget`` tokens instead.

Token ids. ``Sample.token_ids`` are exactly the tokens the model conditioned on after the prompt: sampled
tokens, forced-marker tokens, and the final EOS when the output ended with one (no padding). ``Sample.text``
is their decoding without special tokens (OpenAI backend: the server's text, plus the forced marker text).

finish_reason: ``"eos"`` (the model ended the output), ``"stop"`` (a ``stop`` string was produced; it is kept
in the text), ``"length"`` (cut by ``max_new_tokens`` or ``response_budget``; such outputs are invalid).
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, fields, replace
from typing import Iterator

from tpo_lite.errors import TpoError, require, require_finite, require_seed
from tpo_lite import http_retry
from tpo_lite.parsing import response_marker_uses
from .options import option


@dataclass
class SamplingConfig:
    """The ``[sampling]`` table of a run config."""

    backend: str = option("local",
        "'local': sample with transformers in this process (batched, the K samples of a prompt share "
        "it); 'openai': POST /v1/completions to an OpenAI-compatible server such as vLLM (the "
        "scale-out path; see base_url); 'vllm': an offline vLLM engine in this process on the GPU "
        "(needs the vllm package; built for each generation stage and shut down after it, so DPO "
        "training gets the GPU; see the vllm_* options).", choices=("local", "openai", "vllm"))
    k: int = option(8, "Outputs sampled per instruction (the paper's K).")
    temperature: float = option(0.8, "Sampling temperature; 0 = greedy (argmax, seeds then do not matter).")
    top_p: float = option(0.95,
        "Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p "
        "(1.0 = the whole vocabulary).")
    max_new_tokens: int = option(512,
        "Token limit of one whole output (thought + forced marker + response, EOS included). An "
        "output cut by it has finish_reason 'length' and is invalid. With response_budget set it "
        "limits only the output up to the response marker (the thought, when thought_budget is "
        "unset).")
    thought_budget: int | None = option(None,
        "Budget forcing: unset = off. Else the thought is sampled until the model writes the "
        "response marker itself (as the parser counts it: a quoted mention does not count), a "
        "thought_stop string, EOS or this many tokens; then the template's response marker is "
        "appended (to text and token ids, recorded as forced=true) and the response is sampled. Must "
        "be below max_new_tokens; needs a template with a response marker.")
    response_budget: int | None = option(None,
        "Unset = off. Else, once the response marker is in the output (written by the model, as "
        "the parser counts it, or forced by thought_budget), the response gets up to this many more "
        "tokens (EOS included): the whole output is then limited to (its tokens up to and including "
        "the marker) + response_budget instead of max_new_tokens, so a long thought cannot eat the "
        "response's tokens. An output cut by it has finish_reason 'length' and is invalid. With or "
        "without budget forcing. A template without a response marker ('direct') has no thought: "
        "its whole output is the response, limited to response_budget tokens.")
    thought_stop: list[str] = option(factory=list, help=
        "Budget forcing only: strings that end the thought early (the response marker is then "
        "forced right after them).")
    stop: list[str] = option(factory=list, help=
        "Strings that end an output (finish_reason 'stop'; the string is kept in the text). Empty = "
        "stop at EOS only.")
    batch_size: int = option(64,
        "Local backend: samples decoded together. A batch is batch_size // k consecutive whole "
        "prompts (left padded; all their K samples), fixed by the prompt order alone, so a resume "
        "redoes a batch bit for bit; below k, one prompt's samples in chunks of batch_size. Larger "
        "batches decode faster per token on a CPU (SmolLM2-135M: 96 rows ~1.3x the tokens/s of 32) but "
        "hold more KV cache, and a crash loses the batch in flight (its prompts are yielded when it "
        "ends). vllm backend: max(1, batch_size // k) whole prompts per engine call (vLLM batches "
        "them itself; their records are written when the call ends).")
    seed: int = option(0,
        "Run seed. Sample i of prompt p uses a seed hashed from (seed, p, i), so a resumed run "
        "reproduces the samples it redoes. 0 .. 2**32 - 1.")
    base_url: str = option("http://127.0.0.1:8000/v1",
        "OpenAI backend: server URL up to and including /v1 (vLLM: `vllm serve MODEL --enable-lora`).")
    api_key_env: str = option("OPENAI_API_KEY",
        "OpenAI backend: environment variable holding the API key sent as a Bearer token (unset or "
        "empty variable = no Authorization header, as for a local vLLM).")
    served_model: str | None = option(None,
        "OpenAI backend: model name of the base model on the server; unset = the first model that "
        "GET /v1/models lists.")
    concurrency: int = option(16, "OpenAI backend: requests in flight at once (one request per sample).")
    timeout_s: float = option(600.0,
        "OpenAI backend: seconds to wait for one HTTP response before the try counts as failed.")
    max_retries: int = option(3,
        "OpenAI backend: retries after a failed try (connection error, timeout, HTTP 408/429/5xx) "
        "before giving up with an error; other HTTP errors fail at once.")
    backoff_s: float = option(2.0, "OpenAI backend: wait before retry r (r = 0, 1, ...) is backoff_s * 2**r seconds.")
    adapter_name: str = option("tpo",
        "OpenAI backend: prefix of the LoRA name under which each iteration's adapter is loaded into "
        "vLLM via /v1/load_lora_adapter (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
        "--enable-lora); hashes of the adapter's path and of its files are appended, so every "
        "adapter gets its own name and one retrained at the same path is never served stale. "
        "vllm backend: prefix of the LoRARequest name; a hash of the adapter's files is appended.")
    vllm_gpu_memory_utilization: float = option(0.85,
        "vllm backend: share of the GPU's memory the engine may take (weights, activations, KV "
        "cache), vLLM's gpu_memory_utilization. Below vLLM's 0.9 because this process's own CUDA "
        "context and allocator cache share the GPU with it.")
    vllm_max_lora_rank: int = option(16,
        "vllm backend: the largest LoRA rank the engine can serve (vLLM's max_lora_rank; one of the "
        "ranks vLLM supports: 8, 16, 32, 64, ...). Must be >= model.lora_r; a larger adapter is "
        "refused before sampling.")
    vllm_max_model_len: int | None = option(None,
        "vllm backend: context length the engine reserves KV cache for (vLLM's max_model_len); "
        "unset = the model's own. Set it to about the longest prompt + max_new_tokens when the "
        "model's context (e.g. 128k) does not fit the KV cache.")

    def __post_init__(self):
        require_finite(self)
        require_seed(self)
        at_least_1 = ("k", "max_new_tokens", "batch_size", "concurrency", "response_budget", "vllm_max_lora_rank",
                      "vllm_max_model_len")  # None = unset
        require(self, [
            *((name, getattr(self, name) is None or getattr(self, name) >= 1, "must be >= 1") for name in at_least_1),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("thought_budget", self.thought_budget is None or 1 <= self.thought_budget < self.max_new_tokens,
             f"must be >= 1 and below max_new_tokens ({self.max_new_tokens})"),
            ("stop", all(self.stop), "stop strings must not be empty"),
            ("thought_stop", all(self.thought_stop), "stop strings must not be empty"),
            ("timeout_s", self.timeout_s > 0, "must be > 0"),
            ("max_retries", self.max_retries >= 0, "must be >= 0"),
            ("backoff_s", self.backoff_s >= 0, "must be >= 0"),
            ("base_url", self.base_url.startswith(("http://", "https://")), "expected an http:// or https:// URL"),
            ("adapter_name", bool(self.adapter_name), "must not be empty"),
            ("vllm_gpu_memory_utilization", 0 < self.vllm_gpu_memory_utilization <= 1, "must be in (0, 1]"),
        ])


@dataclass
class Sample:
    """One sampled output (see the module docstring for token_ids / finish_reason / forced); once parsed
    (:meth:`parsed`) also its thought, response and validity: a sample of ``samples.jsonl``."""

    index: int
    seed: int
    text: str
    token_ids: list[int]
    finish_reason: str
    forced: bool = False
    thought: str | None = None
    response: str | None = None
    valid: bool = False
    invalid_reason: str | None = None

    def parsed(self, template) -> Sample:
        """This sample with the parser's split (:func:`tpo_lite.parsing.parse_output`)."""
        from tpo_lite.parsing import parse_output

        p = parse_output(self.text, template, self.finish_reason)
        return replace(self, token_ids=list(self.token_ids), forced=bool(self.forced), thought=p.thought,
                       response=p.response, valid=bool(p.valid), invalid_reason=p.invalid_reason)

    @classmethod
    def from_record(cls, rec: dict) -> Sample:
        d = {"seed": None, "finish_reason": None, **rec}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def to_record(self) -> dict:
        """The ``samples.jsonl`` form, in its key order."""
        return {k: getattr(self, k) for k in ("index", "seed", "text", "token_ids", "thought", "response", "valid",
                                               "invalid_reason", "finish_reason", "forced")}


@dataclass
class PromptJob:
    """One instruction to sample: its id, the chat-templated prompt, its token ids, and one seed per sample."""

    prompt_id: str
    prompt_text: str
    prompt_token_ids: list[int]
    seeds: list[int]


def sample_seed(run_seed: int, prompt_id: str, index: int) -> int:
    """The seed of sample ``index`` of ``prompt_id`` (31 bits, so any server accepts it)."""
    digest = hashlib.sha256(f"{run_seed}\x1f{prompt_id}\x1f{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFFFFFF


def make_job(prompt_id: str, prompt_text: str, tokenizer, cfg: SamplingConfig) -> PromptJob:
    """A :class:`PromptJob` for a prompt built by :func:`tpo_lite.prompts.build_prompt`.

    The text is tokenised without adding special tokens (the chat template already wrote them), which gives
    the same ids as ``apply_chat_template(..., tokenize=True)``.
    """
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TpoError("the prompt is empty after tokenisation", field=f"prompt {prompt_id}")
    return PromptJob(prompt_id, prompt_text, list(ids), [sample_seed(cfg.seed, prompt_id, i) for i in range(cfg.k)])


def eos_token_ids(tokenizer, model=None, model_path=None) -> set[int]:
    """Token ids that end an output: the tokenizer's EOS plus the generation config's EOS ids (e.g. Llama-3's
    ``<|eot_id|>`` besides ``<|end_of_text|>``). The generation config is the loaded ``model``'s; without a
    model, the one saved with the model at ``model_path`` (default: where the tokenizer was loaded from,
    ``tokenizer.name_or_path``), when there is one."""
    ids = set()
    sources = [getattr(tokenizer, "eos_token_id", None)]
    if model is not None:
        gen = getattr(model, "generation_config", None)
    else:
        gen = _saved_generation_config(model_path if model_path is not None
                                       else getattr(tokenizer, "name_or_path", None))
    if gen is not None:
        sources.append(gen.eos_token_id)
    for src in sources:
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


def _saved_generation_config(path):
    """``transformers.GenerationConfig.from_pretrained(path)``, or None when there is none to read."""
    if not path or not isinstance(path, (str, os.PathLike)):
        return None
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(path)
    except Exception:  # noqa: BLE001 - no generation config (or not reachable): the tokenizer's EOS only
        return None


def _check_jobs(jobs: list[PromptJob], k: int) -> None:
    seen = set()
    for job in jobs:
        if job.prompt_id in seen:
            raise TpoError("duplicate prompt id in one sampling call", field=f"prompt {job.prompt_id}")
        seen.add(job.prompt_id)
        if len(job.seeds) < k:
            raise TpoError(f"needs {k} seeds, got {len(job.seeds)}", field=f"prompt {job.prompt_id}")
        if not job.prompt_token_ids:
            raise TpoError("empty prompt", field=f"prompt {job.prompt_id}")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc=desc, disable=not enabled, dynamic_ncols=True)


class _Forcing:
    """Budget-forcing rules shared by both backends. Whether the model wrote the response marker itself is
    decided by :func:`tpo_lite.parsing.response_marker_uses` (streaming mode), the parser's own rule."""

    def __init__(self, template, tokenizer, cfg: SamplingConfig):
        if template is None or template.response_marker is None:
            name = template.name if template is not None else None
            raise TpoError(f"budget forcing needs a template with a response marker (template {name!r} has "
                           "none)", field="sampling.thought_budget")
        self.template = template
        self.budget = cfg.thought_budget
        self.thought_stop = list(cfg.thought_stop)
        self.text = template.forced_response_text
        self.token_ids = list(tokenizer(self.text, add_special_tokens=False)["input_ids"])
        # forced_response_text ends with the marker's line end: alone, it completes a marker the model wrote.
        self.eol_text = "\n"
        self.eol_ids = list(tokenizer(self.eol_text, add_special_tokens=False)["input_ids"])

    def stop_in(self, text: str) -> bool:
        return any(s in text for s in self.thought_stop)

    def completion(self, text: str) -> tuple[str, list[int]]:
        """(text, token ids) to append to a thought that ended (budget, thought_stop or EOS, the EOS dropped)
        without a marker counted while streaming: the forced response text -- or only its line end when
        ``text`` ends with the model's own marker that just lacks it to count (``...Here is my response`` or
        ``"Here is my response:`` at the very end), so that the output does not get a second marker."""
        if self.text.endswith(self.eol_text) and response_marker_uses(text + self.eol_text, self.template):
            return self.eol_text, self.eol_ids
        return self.text, self.token_ids


def _budget_rules(cfg: SamplingConfig, template, tokenizer) -> tuple[_Forcing | None, object]:
    """The budget-forcing rules (None without ``thought_budget``) and ``template``, checked to be there when
    ``response_budget`` needs it (to find the response marker)."""
    forcing = _Forcing(template, tokenizer, cfg) if cfg.thought_budget is not None else None
    if cfg.response_budget is not None and template is None:
        raise TpoError("response_budget needs the thought template (to find the response marker)",
                       field="sampling.response_budget")
    return forcing, template


def _output_limit(cfg: SamplingConfig, marker_end: int | None) -> int:
    """Token limit of a whole output: max_new_tokens, or the tokens up to the response marker +
    response_budget once the marker is in the output."""
    if cfg.response_budget is None or marker_end is None:
        return cfg.max_new_tokens
    return marker_end + cfg.response_budget


def _token_end(decode, ids: list[int], char_end: int) -> int:
    """Fewest leading tokens of ``ids`` whose decoding covers its first ``char_end`` characters."""
    n = len(ids)
    while n > 1 and len(decode(ids[:n - 1]).rstrip("\ufffd")) >= char_end:
        n -= 1
    return n


# ----------------------------------------------------------------------------------------- local sampling

def select_tokens(logits, temperature: float, top_p: float, uniforms, candidates: int = 256):
    """Pick one token per row of ``logits`` [B, V] by inverse CDF with the given uniforms [B] in [0, 1).

    Temperature 0 is greedy. Otherwise the distribution is softmax(logits / T) truncated to the smallest
    set of most probable tokens whose mass reaches ``top_p`` (ties broken by token id), renormalised; the
    token is the first whose cumulative mass (in that order) exceeds ``u`` times the kept mass.

    Sorting the whole vocabulary every step is slow on a CPU (~50k entries per row), so the ``candidates``
    most probable tokens are tried first; a row for which they cannot prove that they contain its whole
    top-p set (mass not reached, or a probability tie at the candidates' edge) tries 16x as many, and falls
    back to the full sort only when those cannot prove it either. Every path selects the same token.
    """
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    # One new float32 tensor divided in place: the same values as logits.float() / temperature, one pass less.
    probs = torch.softmax(logits.to(torch.float32, copy=True).div_(temperature), dim=-1)
    u = uniforms.to(probs.device, probs.dtype)
    vocab = probs.shape[-1]
    if top_p >= 1.0 or vocab <= candidates:
        return _inverse_cdf(*_sorted_desc(probs), top_p, u)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    rows = None  # rows still to decide (None = all)
    while candidates < vocab:
        part = probs if rows is None else probs[rows]
        vals, idx = part.topk(candidates, dim=-1)
        # Canonical order (probability descending, token id ascending among ties), as the full stable sort.
        idx, perm = idx.sort(dim=-1)
        vals = vals.gather(-1, perm)
        vals, perm = vals.sort(dim=-1, descending=True, stable=True)
        idx = idx.gather(-1, perm)
        n_keep = ((vals.cumsum(dim=-1) - vals) < top_p).sum(dim=-1)
        last_kept = vals.gather(-1, (n_keep - 1).unsqueeze(-1)).squeeze(-1)
        ok = (n_keep < candidates) & (last_kept > vals[:, -1])
        here = torch.arange(probs.shape[0], device=probs.device) if rows is None else rows
        if ok.any():
            out[here[ok]] = _inverse_cdf(vals[ok], idx[ok], top_p, u[here[ok]])
        if ok.all():
            return out
        rows = here[~ok]
        # A flat distribution (top-p set beyond the candidates): 16x more before sorting everything.
        candidates *= 16
    out[rows] = _inverse_cdf(*_sorted_desc(probs[rows]), top_p, u[rows])
    return out


def _sorted_desc(probs):
    return probs.sort(dim=-1, descending=True, stable=True)


def _inverse_cdf(sorted_p, order, top_p: float, u):
    """Token per row from probabilities sorted descending (``order`` = their token ids), see select_tokens."""
    import torch

    cum = sorted_p.cumsum(dim=-1)
    if top_p >= 1.0:  # everything (float round-off in the cumsum must not drop the tail)
        keep = torch.ones_like(sorted_p, dtype=torch.bool)
    else:
        keep = (cum - sorted_p) < top_p  # mass before this token is still short of top_p; keeps the first
    kept = sorted_p * keep
    cum = kept.cumsum(dim=-1)
    threshold = u.unsqueeze(-1) * cum[:, -1:]
    pos = (cum <= threshold).sum(dim=-1)
    pos = torch.minimum(pos, keep.sum(dim=-1) - 1)  # guard against round-off past the kept set
    return order.gather(1, pos.unsqueeze(-1)).squeeze(-1)


def _out_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


DECODE_ATTENTION = "tpo_lite_decode"


def _decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention for one new token per row (the decoding steps); anything else goes to transformers' SDPA.

    PyTorch's CPU SDPA kernel is built for long queries: for a single query token per row it was the slowest
    part of a bf16 decoding step (SmolLM2-135M, 2-core CPU). Here the query heads that share a KV head
    (grouped-query attention) are one small matrix product against that head's cache, without repeating the
    cache per query head; softmax in (at least) float32 as in SDPA. Mask: boolean, True = attend (the
    sampler's own 4D mask over the KV buffers, else transformers' SDPA mask; None = attend to everything).
    """
    import torch

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    plain = all(kwargs.get(name) is None for name in ("softcap", "s_aux", "sinks", "position_bias"))
    if q_len != 1 or not plain or heads % kv_heads or (attention_mask is not None
                                                       and attention_mask.dtype != torch.bool):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    q = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(q, key.transpose(2, 3))  # [batch, kv_heads, group, kv_len]
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    return torch.matmul(probs, value).reshape(batch, 1, heads, dim), None


def _register_decode_attention() -> bool:
    """Make ``DECODE_ATTENTION`` a transformers attention implementation (with SDPA's mask); False if this
    transformers has no attention registry."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)
    return True


def _set_attention(model, name: str | None) -> str | None:
    """Switch the attention implementation of ``model`` (under any peft wrapper) to ``name``; returns the one
    it had, or None when it cannot be switched (then nothing changed)."""
    from tpo_lite.models import unwrap

    base = unwrap(model)
    config = getattr(base, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if name is None or old is None or old == name or not callable(getattr(base, "set_attn_implementation", None)):
        return None
    try:
        base.set_attn_implementation(name)
    except Exception:  # noqa: BLE001 - a model that cannot switch keeps its own attention
        return None
    return old if config._attn_implementation == name else None


KV_CHUNK = 64  # decoding KV buffers grow by this many positions at a time


@functools.lru_cache(maxsize=None)
def _buffered_layer_class():
    """transformers' ``DynamicLayer`` with its KV in a buffer with spare room (a class built on first use, so
    importing this module does not import transformers); None when this transformers has no cache layers."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return None

    class BufferedLayer(DynamicLayer):
        """Decoding writes each new position into the buffer in place instead of concatenating the whole
        cache into a new tensor every step (SmolLM2-135M on the CPU, 32-96 rows at 300 positions: decoding
        steps ~1.2x faster). ``update`` returns the whole buffer, contiguous: a bf16 matrix product on a
        sliced, strided view of it was ~10x slower than on a contiguous tensor. The positions past
        ``length`` are zeros that the sampler's 4D attention mask hides (see ``_buffer_cache``)."""

        def __init__(self, keys, values, capacity: int):
            super().__init__()
            self.length = keys.shape[-2]
            self.keys = keys.new_zeros(*keys.shape[:-2], capacity, keys.shape[-1])
            self.values = values.new_zeros(*values.shape[:-2], capacity, values.shape[-1])
            self.keys[..., :self.length, :] = keys
            self.values[..., :self.length, :] = values
            self.device, self.is_initialized = keys.device, True

        def reserve(self, length: int) -> int:
            capacity = self.keys.shape[-2]
            if length > capacity:
                capacity = -(-length // KV_CHUNK) * KV_CHUNK
                for name in ("keys", "values"):
                    old = getattr(self, name)
                    new = old.new_zeros(*old.shape[:-2], capacity, old.shape[-1])
                    new[..., :old.shape[-2], :] = old
                    setattr(self, name, new)
            return capacity

        def update(self, key_states, value_states, *args, **kwargs):
            end = self.length + key_states.shape[-2]
            self.reserve(end)
            self.keys[..., self.length:end, :] = key_states
            self.values[..., self.length:end, :] = value_states
            self.length = end
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.keys.shape[-2], 0

        def batch_select_indices(self, indices) -> None:
            self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]

    return BufferedLayer


def _buffer_cache(cache) -> bool:
    """Move the KV of a prefilled ``DynamicCache`` into buffered layers (in place); False (cache untouched)
    when its layers are not all plain ``DynamicLayer`` s of one length (sliding windows, other cache kinds)."""
    cls = _buffered_layer_class()
    layers = getattr(cache, "layers", None)
    if cls is None or not layers or any(type(layer) is not cls.__bases__[0] for layer in layers):
        return False
    if any(not layer.is_initialized or layer.keys.dim() != 4 for layer in layers):
        return False
    length = layers[0].keys.shape[-2]
    if any(layer.keys.shape[-2] != length for layer in layers):
        return False
    capacity = -(-(length + 1) // KV_CHUNK) * KV_CHUNK
    cache.layers = [cls(layer.keys, layer.values, capacity) for layer in layers]
    return True


def _dead_rows_limit(rows: int) -> int:
    """Finished rows a decoding batch of ``rows`` carries before it drops them from the KV cache.

    Dropping rows copies the whole cache (about a third of a decoding step at 96 rows on the CPU), so a batch
    keeps finished rows (fed a pad token, their logits ignored) until an eighth of its rows are finished."""
    return max(1, rows // 8)


class _Row:
    """Decoding state of one sample."""

    __slots__ = ("index", "seed", "gen", "ids", "pending", "thinking", "forced", "finish", "marker_end")

    def __init__(self, index, seed, thinking):
        import torch

        self.index = index
        self.seed = seed
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.ids: list[int] = []
        self.pending: list[int] = []  # forced tokens still to feed, in order
        self.thinking = thinking
        self.forced = False
        self.finish: str | None = None
        self.marker_end: int | None = None  # tokens up to and including the response marker, once known


class LocalSampler:
    """Batched sampling with a transformers causal LM, using a KV-cached decoding loop of our own.

    ``model`` may be a peft model (the current adapter active): the sampler then decodes with a copy that has
    the LoRA adapter merged into its weights (:func:`tpo_lite.models.sampling_copy`; ``model`` is left as it
    is). ``template`` is needed for budget forcing only.

    Batch layout (see :meth:`sample`): groups of whole prompts, all their samples decoded together. The K
    samples of a prompt share its prefill: each distinct prompt of a group is run once (left padded) and its
    KV cache is repeated for its samples. Finished samples are dropped from the batch (and the cache) once an
    eighth of the batch has finished, so a long straggler does not pay for the others. On the CPU the
    decoding steps use a grouped-query attention for single tokens instead of SDPA (``_decode_attention``),
    reading KV buffers that grow 64 positions at a time instead of a cache concatenated every step.

    ``reference=True`` turns these speed-ups off (adapter not merged, the model's own attention and cache,
    finished rows dropped at once, the prefill's ``logits_to_keep=1``), i.e. the sampler as it was before them;
    ``tpo-lite bench sampling`` compares both.
    """

    def __init__(self, model, tokenizer, cfg: SamplingConfig, template=None, progress: bool = True,
                 reference: bool = False):
        from tpo_lite.models import sampling_copy, unwrap

        self.reference = reference
        self.model = model if reference else sampling_copy(model)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.progress = progress
        self.eos_ids = eos_token_ids(tokenizer, model)
        if not self.eos_ids:
            raise TpoError("neither the tokenizer nor the model's generation_config defines an EOS token",
                           field="model")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.forcing, self.template = _budget_rules(cfg, template, tokenizer)
        self.stop_chars = max([len(s) for s in cfg.stop], default=0)
        self.tokens_per_s = 0.0  # of the last sample() call: generated tokens / wall time
        # transformers 5.x renamed the forward argument past_key_values -> cache (old name deprecated).
        params = inspect.signature(unwrap(model).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last prompt position's logits are needed; older models lack the argument.
        self._prefill_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        device = next(self.model.parameters()).device
        # Measured on the CPU only; on CUDA SDPA has proper decoding kernels.
        self._attention = (DECODE_ATTENTION if not reference and device.type == "cpu"
                           and _register_decode_attention() else None)

    def groups(self, n_jobs: int, k: int) -> list[list[tuple[int, int]]]:
        """The batch layout of ``n_jobs`` jobs: lists of (job index, sample index) decoded together.

        ``max(1, batch_size // k)`` consecutive whole prompts per group (the last one may be smaller); with
        ``batch_size < k`` each prompt alone, its samples in chunks of ``batch_size``. A function of the job
        list alone: a sample's logits depend (by float rounding) on its batch neighbours and padding, so the
        same group decodes to the same outputs in any run.
        """
        bs = self.cfg.batch_size
        if bs < k:
            return [[(j, i) for i in range(start, min(start + bs, k))]
                    for j in range(n_jobs) for start in range(0, k, bs)]
        per = bs // k
        return [[(j, i) for j in range(start, min(start + per, n_jobs)) for i in range(k)]
                for start in range(0, n_jobs, per)]

    def sample(self, jobs: list[PromptJob], k: int | None = None,
               skip=()) -> Iterator[tuple[str, list[Sample]]]:
        """Yield ``(prompt_id, samples)`` for each job, in job order, once its group (:meth:`groups`) is done.

        A group's prompts are yielded together after the whole group has decoded, so a caller that records
        them and, after a crash, samples the unrecorded rest of the same job list (a suffix starting at a group
        boundary) reproduces the outputs of an uninterrupted run exactly. ``skip``: prompt ids already
        recorded; they are not yielded, and a group made only of them is not decoded. A group holding some of
        them is decoded whole, with the same layout as in the uninterrupted run, so its other prompts still
        get exactly those outputs: a resumed caller may pass the whole job list with ``skip`` = what it has.
        """
        k = k or self.cfg.k
        _check_jobs(jobs, k)
        skip = set(skip)
        groups = [g for g in self.groups(len(jobs), k) if any(jobs[j].prompt_id not in skip for j, _ in g)]
        done: dict[int, list] = {}
        n_tokens, t0 = 0, time.perf_counter()
        with _progress(sum(len(g) for g in groups), self.progress, "sampling") as bar:
            for group in groups:
                samples = self._generate([(jobs[j], i) for j, i in group])
                for (j, i), s in zip(group, samples):
                    done.setdefault(j, [None] * k)[i] = s
                    n_tokens += len(s.token_ids)
                self.tokens_per_s = n_tokens / max(time.perf_counter() - t0, 1e-9)
                bar.update(len(group))
                bar.set_postfix(tok_s=f"{self.tokens_per_s:.0f}")
                for j in sorted({j for j, _ in group}):
                    if j in done and all(s is not None for s in done[j]):
                        samples = done.pop(j)
                        if jobs[j].prompt_id not in skip:
                            yield jobs[j].prompt_id, samples

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _tail(self, ids: list[int], chars: int) -> str:
        # Enough tokens to hold `chars` characters (a token decodes to >= 1 char except split UTF-8 bytes).
        return self._decode(ids[-(chars + 4):])

    def _generate(self, rows: list[tuple[PromptJob, int]]) -> list[Sample]:
        import torch

        model, cfg = self.model, self.cfg
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        attention = _set_attention(model, self._attention)
        try:
            with torch.inference_mode():
                return self._generate_inner(rows, model, cfg, device)
        finally:
            if attention is not None:  # the caller's model keeps its own attention outside sampling
                _set_attention(model, attention)
            if was_training:
                model.train()

    def _generate_inner(self, rows, model, cfg, device):
        import torch

        # Prefill each distinct prompt once.
        prompts, row_prompt = [], []
        index_of = {}
        for job, _ in rows:
            if job.prompt_id not in index_of:
                index_of[job.prompt_id] = len(prompts)
                prompts.append(job.prompt_token_ids)
            row_prompt.append(index_of[job.prompt_id])
        from tpo_lite.models import left_pad

        input_ids, mask, positions = left_pad(prompts, self.pad_id)
        prefill_kw = self._prefill_kw
        if prefill_kw and not self.reference:
            # The last position as an index tensor, not logits_to_keep=1: that slice is a strided 3D view, for
            # which torch's matmul expanded the LM head weight to one copy per prompt (1.4 GB for 24 prompts).
            prefill_kw = {"logits_to_keep": torch.tensor([input_ids.shape[1] - 1], device=device)}
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), use_cache=True, **prefill_kw)
        cache = _out_cache(out)
        select = torch.tensor(row_prompt, dtype=torch.long, device=device)
        cache.batch_select_indices(select)
        logits = out.logits[:, -1, :][select]
        mask = mask.to(device)[select]
        next_pos = mask.sum(-1)  # position of the next token per row
        # With our decoding attention the KV goes into buffers, which it reads through a 4D mask of ours.
        from tpo_lite.models import unwrap

        buffered = (getattr(unwrap(model).config, "_attn_implementation", None) == DECODE_ATTENTION
                    and _buffer_cache(cache))

        states = [_Row(i, job.seeds[i], self.forcing is not None) for job, i in rows]
        batch = list(range(len(states)))  # the state of each cache row, in cache-row order
        live = batch  # cache rows (slots) whose sample is still decoding
        while True:
            if len(live) < len(batch):  # finished rows still in the batch: their logits are ignored
                logits = logits[torch.tensor(live, dtype=torch.long, device=device)]
            if cfg.temperature > 0:
                u = torch.stack([torch.rand((), generator=states[batch[s]].gen) for s in live])
            else:
                u = torch.zeros(len(live))
            picked = select_tokens(logits, cfg.temperature, cfg.top_p, u).tolist()
            feed = [self.pad_id] * len(batch)
            for slot, tok in zip(live, picked):
                feed[slot] = self._step(states[batch[slot]], tok)
            live = [slot for slot in live if states[batch[slot]].finish is None]
            if not live:
                break
            if len(batch) - len(live) >= (1 if self.reference else _dead_rows_limit(len(batch))):
                sel = torch.tensor(live, dtype=torch.long, device=device)
                cache.batch_select_indices(sel)
                mask, next_pos = mask[sel], next_pos[sel]
                batch, feed = [batch[s] for s in live], [feed[s] for s in live]
                live = list(range(len(batch)))
            mask = torch.cat([mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=device)], dim=1)
            attend = mask
            if buffered:  # True = attend; the buffers' spare positions stay hidden
                width = max(layer.reserve(mask.shape[1]) for layer in cache.layers)
                attend = torch.zeros((len(batch), 1, 1, width), dtype=torch.bool, device=device)
                attend[:, 0, 0, :mask.shape[1]] = mask.bool()
            out = model(input_ids=torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(-1),
                        attention_mask=attend, position_ids=next_pos.unsqueeze(-1), use_cache=True,
                        **{self._cache_arg: cache})
            cache = _out_cache(out)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        return [Sample(index=s.index, seed=s.seed, text=self._decode(s.ids), token_ids=s.ids,
                       finish_reason=s.finish, forced=s.forced) for s in states]

    def _step(self, row: _Row, sampled: int) -> int:
        """Advance one sample by one token (a forced one if pending, else ``sampled``); return that token."""
        cfg, forcing = self.cfg, self.forcing
        if row.pending:
            tok = row.pending.pop(0)
        else:
            tok = sampled
            if tok in self.eos_ids:
                if row.thinking:  # EOS inside the thought: drop it and force the response marker
                    self._end_thought(row)
                    tok = row.pending.pop(0)
                else:
                    row.ids.append(tok)
                    row.finish = "eos"
                    return tok
        row.ids.append(tok)
        if not row.pending:
            if row.thinking:
                text = self._decode(row.ids)  # the whole thought: a marker may span any whitespace
                if self._find_marker(row, text):
                    row.thinking = False  # the model wrote the marker itself: nothing to force
                elif forcing.stop_in(text) or len(row.ids) >= forcing.budget:
                    self._end_thought(row, text)
            elif row.marker_end is None and cfg.response_budget is not None:
                self._find_marker(row, self._decode(row.ids))
            if self.stop_chars and any(s in self._tail(row.ids, self.stop_chars) for s in cfg.stop):
                row.finish = "stop"
                return tok
        if len(row.ids) >= _output_limit(cfg, row.marker_end):
            row.finish = "length"
        return tok

    def _end_thought(self, row: _Row, text: str | None = None) -> None:
        """Budget forcing: queue the forced response text after the thought ``row.ids`` (EOS not included)."""
        text = self._decode(row.ids) if text is None else text
        _, ids = self.forcing.completion(text)
        row.thinking, row.forced = False, True
        row.pending = list(ids)
        row.marker_end = len(row.ids) + len(ids)

    def _find_marker(self, row: _Row, text: str) -> bool:
        """If ``text`` (the decoded ``row.ids``) uses the response marker (the parser's rule, streaming mode),
        record in ``row.marker_end`` how many tokens it takes to cover the first use; True if it does."""
        if self.template.response_marker is None:  # no marker (direct): the whole output is the response
            row.marker_end = 0
            return True
        uses = response_marker_uses(text, self.template, final=False)
        if not uses:
            return False
        row.marker_end = _token_end(self._decode, row.ids, uses[0].end())
        return True


# ---------------------------------------------------------------------------------------- server sampling

class ServerError(TpoError):
    """The sampling server failed (after retries where they apply)."""


class OpenAISampler:
    """Sampling through an OpenAI-compatible ``/v1/completions`` endpoint (vLLM), stdlib HTTP only.

    One request per sample (``n=1`` with the sample's seed), ``concurrency`` requests in flight, each with a
    timeout and bounded retries with exponential backoff; when a request still fails the error is raised
    (prompts already yielded are the caller's to keep). Prompts are sent as token ids, so the server sees
    exactly the recorded prompt.

    Token ids of the outputs are taken from the response, in this order of preference: ``choices[].token_ids``
    (recent vLLM, asked with ``return_token_ids``), ``logprobs.tokens`` entries ``"token_id:N"`` (vLLM's
    ``return_tokens_as_token_ids``), else the text is re-tokenised with ``tokenizer`` (a fallback that may not
    match the sampled tokenisation; counted in ``self.retokenised``). An EOS that the server leaves out is
    appended when the output ended at EOS -- never after an output that already ends with one of the EOS ids
    (``eos_ids``: the tokenizer's EOS plus the model's generation config EOS ids, read from where the tokenizer
    was loaded from, see :func:`eos_token_ids`; Llama-3 ends a turn with ``<|eot_id|>``, which must not be
    followed by ``<|end_of_text|>``), nor after a stop string.

    From iteration 2 on call :meth:`ensure_adapter` first: it loads the adapter into the server and samples
    from it, or raises -- never silently samples the base model.
    """

    def __init__(self, cfg: SamplingConfig, tokenizer, template=None, progress: bool = True,
                 eos_ids=None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.progress = progress
        self.base_url = cfg.base_url.rstrip("/")
        self.eos_ids = set(eos_ids) if eos_ids is not None else eos_token_ids(tokenizer)
        self.forcing, self.template = _budget_rules(cfg, template, tokenizer)
        self.model_name: str | None = cfg.served_model
        self.adapter: str | None = None  # path of the adapter being served, once ensure_adapter succeeded
        self.retokenised = 0
        self._server_returns_ids = False
        self._lock = threading.Lock()

    # -- HTTP -------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
        url, cfg = self.base_url + path, self.cfg
        try:
            return http_retry.request(url, body, method=method, api_key=os.environ.get(cfg.api_key_env or ""),
                                      timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, backoff_s=cfg.backoff_s)
        except http_retry.HTTPFailure as e:
            what = "answered" if e.refused else (f"failed {cfg.max_retries + 1} time(s) (max_retries="
                                                 f"{cfg.max_retries}); last error:")
            raise ServerError(f"{method} {url} {what} {e.last}", field="sampling.base_url") from None

    def _json(self, method: str, path: str, body: dict | None = None) -> dict:
        raw = self._request(method, path, body)
        try:
            return json.loads(raw)
        except ValueError:
            raise ServerError(f"{method} {self.base_url + path} did not answer JSON: {raw[:200]!r}",
                              field="sampling.base_url") from None

    def list_models(self) -> list[dict]:
        """The ``data`` list of GET /v1/models."""
        data = self._json("GET", "/models").get("data")
        if not isinstance(data, list):
            raise ServerError(f"GET {self.base_url}/models: no 'data' list in the answer",
                              field="sampling.base_url")
        return data

    def _served_model_name(self) -> str:
        with self._lock:
            if self.model_name is None:
                models = self.list_models()
                base = [m for m in models if not m.get("parent")] or models
                if not base:
                    raise ServerError(f"{self.base_url}/models lists no model", field="sampling.served_model")
                self.model_name = base[0]["id"]
            return self.model_name

    # -- adapters ---------------------------------------------------------------------------------------
    def adapter_lora_name(self, path: str | os.PathLike) -> str:
        """The LoRA name used for the adapter at ``path``: ``adapter_name`` + a hash of the absolute path + a
        hash of the adapter's files (:func:`tpo_lite.rundir.adapter_digest`; none for a path that is not a
        directory here, a server-side adapter). vLLM keeps serving what it loaded under a name, so an adapter
        retrained at the same path must get a new name."""
        from .rundir import adapter_digest

        path = os.path.abspath(os.fspath(path))
        name = f"{self.cfg.adapter_name}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"
        content = adapter_digest(path)
        return f"{name}-{content[:12]}" if content else name

    def ensure_adapter(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Make the server serve the LoRA adapter at ``path`` (loading it via /v1/load_lora_adapter when it is
        not listed yet) and sample from it from now on. Returns the LoRA name. Raises :class:`ServerError`
        when the server cannot serve it (rather than sampling the base model). ``path`` must be readable by
        the server (same filesystem)."""
        path = os.path.abspath(os.fspath(path))
        name = name or self.adapter_lora_name(path)
        listed = {m.get("id"): m for m in self.list_models()}
        if name in listed:
            root = listed[name].get("root")
            if root and os.path.normpath(root) != os.path.normpath(path):
                raise ServerError(f"the server already serves a LoRA named {name!r} from {root}, not {path}",
                                  field="sampling.adapter_name")
        else:
            try:
                self._request("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path})
            except ServerError as e:
                raise ServerError(
                    f"the server at {self.base_url} could not load the LoRA adapter {path} as {name!r} "
                    f"({e.message}). Start vLLM with --enable-lora (and --max-lora-rank >= the adapter's rank) "
                    "and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; refusing to sample the base model instead",
                    field="sampling.adapter_name") from None
            if name not in {m.get("id") for m in self.list_models()}:
                raise ServerError(f"the server accepted the LoRA adapter {path} but does not list {name!r} "
                                  "in /v1/models; refusing to sample the base model instead",
                                  field="sampling.adapter_name")
        with self._lock:
            self.model_name = name  # requests name the LoRA from now on
            self.adapter = path
        return name

    # -- sampling ---------------------------------------------------------------------------------------
    def _complete(self, prompt_ids: list[int], max_tokens: int, seed: int, stop: list[str]) -> dict:
        body = {
            "model": self._served_model_name(),
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": self.cfg.temperature,
            "top_p": self.cfg.top_p,
            "seed": seed,
            "n": 1,
            "stop": stop or None,
            "include_stop_str_in_output": True,
            "skip_special_tokens": True,
            "return_token_ids": True,
        }
        if not self._server_returns_ids:  # older vLLM: token ids only through the logprobs tokens
            body.update(return_tokens_as_token_ids=True, logprobs=0)
        answer = self._json("POST", "/completions", body)
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ServerError(f"POST {self.base_url}/completions: no choices in the answer: {str(answer)[:200]}",
                              field="sampling.base_url")
        return choices[0]

    def _parse_choice(self, choice: dict, stop: list[str]) -> tuple[str, list[int], str, str | int | None]:
        """(text, token_ids, finish_reason, what stopped it: the stop string, the stop token id (vLLM's
        stop_reason when a stop token such as a generation-config EOS ended it) or None) of one choice."""
        text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        stop_reason = choice.get("stop_reason")
        if reason == "length":
            finish, hit = "length", None
        elif isinstance(stop_reason, str):
            finish, hit = "stop", stop_reason
        elif "stop_reason" not in choice and any(text.endswith(s) for s in stop):
            finish, hit = "stop", next(s for s in stop if text.endswith(s))  # server without stop_reason
        else:
            stop_tok = stop_reason if isinstance(stop_reason, int) and not isinstance(stop_reason, bool) else None
            finish, hit = "eos", stop_tok
        ids = choice.get("token_ids")
        if isinstance(ids, list):
            self._server_returns_ids = True  # no need to ask for logprobs any more
        else:
            tokens = (choice.get("logprobs") or {}).get("tokens")
            if isinstance(tokens, list) and tokens and all(isinstance(t, str) and t.startswith("token_id:")
                                                             for t in tokens):
                ids = [int(t.split(":", 1)[1]) for t in tokens]
            else:
                with self._lock:  # a fast tokenizer must not be used from several threads at once
                    ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
                    self.retokenised += 1
        ids = [int(t) for t in ids]
        if finish == "eos" and not (ids and self._is_end(ids[-1], hit)):  # the server left the EOS out
            if hit is not None:
                ids.append(hit)
            elif self.eos_ids:
                eos = getattr(self.tokenizer, "eos_token_id", None)
                ids.append(eos if eos in self.eos_ids else min(self.eos_ids))
        return text, ids, finish, hit

    def _is_end(self, tok: int, hit) -> bool:
        return tok in self.eos_ids or (hit is not None and tok == hit)

    def _decode_ids(self, ids: list[int], text: str) -> str:
        """The text of ``ids`` (a cut output), or ``text`` when the tokenizer cannot decode."""
        if getattr(self.tokenizer, "decode", None) is None:
            return text
        with self._lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _marker_token_end(self, ids: list[int], text: str, char_end: int) -> int:
        """Tokens up to and including a response marker ending at ``char_end`` of ``text`` (the decoding of
        ``ids``): all of them when it ends the text (a stop string), else counted with the tokenizer."""
        if char_end >= len(text.rstrip("\ufffd")) or getattr(self.tokenizer, "decode", None) is None:
            return len(ids)
        with self._lock:
            return _token_end(lambda x: self.tokenizer.decode(x, skip_special_tokens=True), ids, char_end)

    def _one(self, job: PromptJob, index: int) -> Sample:
        """One sample: each request of :meth:`_requests` is one POST /completions."""
        steps = self._requests(job, index)
        try:
            request = next(steps)
            while True:
                request = steps.send(self._complete(*request))
        except StopIteration as done:
            return done.value

    def _requests(self, job: PromptJob, index: int):
        """One sample in as many completion requests as it takes, as a generator that does no I/O: it yields
        ``(prompt_ids, max_tokens, seed, stops)``, is sent back the completion's choice (``text``,
        ``token_ids``, ``finish_reason``, ``stop_reason`` as in vLLM's answer) and returns the
        :class:`Sample`; the transport is the caller's (HTTP here, batched engine calls in
        :class:`tpo_lite.vllm_backend.VLLMSampler`). The thought (budget forcing: up to thought_budget
        tokens, stopping at the response marker's literal forms and thought_stop), then the response (up to
        max_new_tokens in all, or response_budget tokens after the marker). A marker stop that the parser's
        rule does not count as a use yet (a quoted mention, or a quote before it with the next character
        unknown) continues the thought from there."""
        cfg, forcing, template, seed = self.cfg, self.forcing, self.template, job.seeds[index]
        budget = cfg.response_budget
        thinking = forcing is not None
        # Response budget without forcing: find the marker (as the parser does) to know where the response starts.
        seeking = budget is not None and not thinking and template.response_marker is not None
        markers = _marker_stops(template) if thinking or seeking else []
        marker_end = 0 if budget is not None and template.response_marker is None else None
        text, ids, forced, req_seed = "", [], False, seed
        while True:
            limit = _output_limit(cfg, marker_end)
            if thinking:
                room, stops = forcing.budget - len(ids), markers + forcing.thought_stop + list(cfg.stop)
            else:
                room = limit - len(ids)
                stops = (markers if marker_end is None else []) + list(cfg.stop)
                if room <= 0:
                    return Sample(index, seed, self._decode_ids(ids[:limit], text) if len(ids) > limit else text,
                                  ids[:limit], "length", forced)
            finish, hit = "length", None  # a thought with no budget left ends as if cut by it
            if room > 0:
                t, new, finish, hit = self._parse_choice(
                    (yield job.prompt_token_ids + ids, room, req_seed, stops), stops)
                # A different but derived seed per request: a continuation must not replay the random stream.
                req_seed = (req_seed * 31 + 7) & 0x7FFFFFFF
                if not new:  # would loop for ever
                    raise ServerError(f"POST {self.base_url}/completions returned no tokens (finish_reason "
                                      f"{finish!r}) where more were asked for", field="sampling.base_url")
                text, ids = text + t, ids + new
            marker_stop = finish == "stop" and hit in markers
            if finish == "stop" and not marker_stop and hit in cfg.stop:
                return Sample(index, seed, text, ids, "stop", forced)
            if thinking or (seeking and marker_end is None):
                uses = response_marker_uses(text, template, final=False)
                if uses:
                    marker_end = self._marker_token_end(ids, text, uses[0].end())
                    thinking = False  # the model wrote the marker itself: nothing to force
                elif thinking and not marker_stop:  # thought ended by budget, thought_stop or EOS
                    if finish == "eos" and ids and self._is_end(ids[-1], hit):
                        ids = ids[:-1]
                    add_text, add_ids = forcing.completion(text)
                    text, ids, forced, thinking = text + add_text, ids + add_ids, True, False
                    marker_end = len(ids)
                    continue
            if thinking or marker_stop:
                continue  # a mention of the marker (or one not decided yet) does not end the thought
            limit = _output_limit(cfg, marker_end)
            if len(ids) > limit:  # the marker was found inside the last request's text: cut at the budget
                return Sample(index, seed, self._decode_ids(ids[:limit], text), ids[:limit], "length", forced)
            if finish == "eos" or len(ids) >= limit:
                return Sample(index, seed, text, ids, finish, forced)
            # Cut by this request's max_tokens below the limit (the thought part ended): go on.

    def sample(self, jobs: list[PromptJob], k: int | None = None,
               skip=()) -> Iterator[tuple[str, list[Sample]]]:
        """Yield ``(prompt_id, samples)`` per job as soon as its ``k`` samples are done (completion order).
        ``skip``: prompt ids already recorded, not sampled (per-request seeds make the rest independent of it)."""
        k = k or self.cfg.k
        _check_jobs(jobs, k)
        jobs = [job for job in jobs if job.prompt_id not in skip]
        self._served_model_name()
        done: dict[int, list] = {}
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency, thread_name_prefix="tpo-sample")
        try:
            with _progress(len(jobs) * k, self.progress, "sampling") as bar:
                pending = {pool.submit(self._one, job, i): (j, i) for j, job in enumerate(jobs) for i in range(k)}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        j, i = pending.pop(fut)
                        done.setdefault(j, [None] * k)[i] = fut.result()  # raises the request's error
                        bar.update(1)
                        if all(s is not None for s in done[j]):
                            yield jobs[j].prompt_id, done.pop(j)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _marker_stops(template) -> list[str]:
    """Literal stop strings for the common forms of the response marker (servers match stop strings exactly;
    a form not listed is still found in the returned text, by the parser's rule, after the request)."""
    marker = template.response_marker
    if marker.lower().startswith("here is "):
        rest = marker[len("here is "):]
        heads = ("Here is ", "Here's ", "Here’s ")
        out = [h + rest for h in heads] + [h.lower() + rest for h in heads]
    else:
        out = [marker]
    return list(dict.fromkeys(out))


def make_sampler(cfg: SamplingConfig, tokenizer, template=None, model=None, adapter=None, progress=True):
    """The sampler ``cfg.backend`` names. Local: ``model`` is required (load it with the adapter already
    applied). OpenAI: when ``adapter`` (a saved peft adapter directory) is given it is loaded into the server
    first and refused loudly if the server cannot serve it. vLLM (:class:`tpo_lite.vllm_backend.VLLMSampler`):
    the engine loads the model from where ``tokenizer`` was loaded, ``adapter`` is served as a LoRA request."""
    if cfg.backend == "local":
        if model is None:
            raise TpoError("the local backend needs a loaded model", field="sampling.backend")
        return LocalSampler(model, tokenizer, cfg, template, progress=progress)
    if cfg.backend == "vllm":
        from tpo_lite.vllm_backend import VLLMSampler  # imports vllm only now: an optional dependency

        sampler = VLLMSampler(cfg, tokenizer, template, progress=progress)
    else:
        sampler = OpenAISampler(cfg, tokenizer, template, progress=progress)
    if adapter is not None:
        sampler.ensure_adapter(adapter)
    return sampler
