"""Sample K thought+response outputs per instruction: a local transformers backend and an OpenAI-compatible
server backend (vLLM), with per-sample seeds and optional budget forcing.

Both samplers take :class:`PromptJob` s (the chat-templated prompt, its token ids and one seed per sample) and
yield ``(prompt_id, [Sample, ...])`` as soon as all K samples of a prompt are done, so the caller can append
one JSONL record per prompt and a crash loses at most the prompts in flight.

Seeds. Sample ``i`` of prompt ``p`` uses ``sample_seed(run_seed, p, i)`` (a hash, independent of the order
or batching of the prompts), so a resumed run draws the same samples for the prompts it still has to do.

* Local: every sample owns a CPU ``torch.Generator`` seeded with its seed; each decoding step draws one
  uniform number per sample from it and picks the token by inverse-CDF over the temperature-scaled, top-p
  truncated distribution (:func:`select_tokens`). A sample's draws therefore depend only on its own seed and
  tokens, not on its batch neighbours. The logits do depend very slightly on the batch shape (padding and
  batch size change the float reduction order), so a sample is bit-for-bit reproducible when it is generated
  in the same batch layout; with the default ``batch_size == k`` a batch always holds exactly the K samples of
  one prompt, which a resume reproduces exactly.
* Server: one request per sample with ``n=1`` and its own ``seed`` (vLLM honours per-request seeds).

Budget forcing (``thought_budget``). The thought is sampled until the model writes the template's response
marker itself (then nothing is forced), a ``thought_stop`` string, EOS, or ``thought_budget`` generated
tokens; in the last three cases the EOS (if any) is dropped and ``template.forced_response_text`` (the
response marker on its own line) is appended -- to the text *and* the token ids, so DPO trains on it -- and
the response is sampled after it. ``Sample.forced`` records it. ``max_new_tokens`` bounds the whole output
(thought + forced marker + response).

Token ids. ``Sample.token_ids`` are exactly the tokens the model conditioned on after the prompt: sampled
tokens, forced-marker tokens, and the final EOS when the output ended with one (no padding). ``Sample.text``
is their decoding without special tokens (OpenAI backend: the server's text, plus the forced marker text).

finish_reason: ``"eos"`` (the model ended the output), ``"stop"`` (a ``stop`` string was produced; it is kept
in the text), ``"length"`` (cut by ``max_new_tokens``; such outputs are invalid).
"""
from __future__ import annotations

import hashlib
import http.client
import inspect
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Iterator

from tpo_lite.errors import TpoError


@dataclass
class SamplingConfig:
    """The ``[sampling]`` table of a run config."""

    backend: str = field(default="local", metadata={
        "choices": ("local", "openai"),
        "help": "'local': sample with transformers in this process (batched, the K samples of a prompt share "
                "it); 'openai': POST /v1/completions to an OpenAI-compatible server such as vLLM (the "
                "scale-out path; see base_url)."})
    k: int = field(default=8, metadata={"help": "Outputs sampled per instruction (the paper's K)."})
    temperature: float = field(default=0.8, metadata={
        "help": "Sampling temperature; 0 = greedy (argmax, seeds then do not matter)."})
    top_p: float = field(default=0.95, metadata={
        "help": "Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p "
                "(1.0 = the whole vocabulary)."})
    max_new_tokens: int = field(default=512, metadata={
        "help": "Token limit of one whole output (thought + forced marker + response, EOS included). An "
                "output cut by it has finish_reason 'length' and is invalid."})
    thought_budget: int | None = field(default=None, metadata={
        "help": "Budget forcing: unset = off. Else the thought is sampled until the model writes the "
                "response marker itself, a thought_stop string, EOS or this many tokens; then the template's "
                "response marker is appended (to text and token ids, recorded as forced=true) and the "
                "response is sampled. Must be below max_new_tokens; needs a template with a response marker."})
    thought_stop: list[str] = field(default_factory=list, metadata={
        "help": "Budget forcing only: strings that end the thought early (the response marker is then "
                "forced right after them)."})
    stop: list[str] = field(default_factory=list, metadata={
        "help": "Strings that end an output (finish_reason 'stop'; the string is kept in the text). Empty = "
                "stop at EOS only."})
    batch_size: int = field(default=8, metadata={
        "help": "Local backend: samples decoded together. Samples are batched in prompt order, so with "
                "batch_size == k each batch is exactly one prompt's K samples (no padding, bit-reproducible "
                "on resume); larger values pack several prompts with left padding."})
    seed: int = field(default=0, metadata={
        "help": "Run seed. Sample i of prompt p uses a seed hashed from (seed, p, i), so a resumed run "
                "reproduces the samples it redoes."})
    base_url: str = field(default="http://127.0.0.1:8000/v1", metadata={
        "help": "OpenAI backend: server URL up to and including /v1 (vLLM: `vllm serve MODEL --enable-lora`)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "OpenAI backend: environment variable holding the API key sent as a Bearer token (unset or "
                "empty variable = no Authorization header, as for a local vLLM)."})
    served_model: str | None = field(default=None, metadata={
        "help": "OpenAI backend: model name of the base model on the server; unset = the first model that "
                "GET /v1/models lists."})
    concurrency: int = field(default=16, metadata={
        "help": "OpenAI backend: requests in flight at once (one request per sample)."})
    timeout_s: float = field(default=600.0, metadata={
        "help": "OpenAI backend: seconds to wait for one HTTP response before the try counts as failed."})
    max_retries: int = field(default=3, metadata={
        "help": "OpenAI backend: retries after a failed try (connection error, timeout, HTTP 408/429/5xx) "
                "before giving up with an error; other HTTP errors fail at once."})
    backoff_s: float = field(default=2.0, metadata={
        "help": "OpenAI backend: wait before retry r (r = 0, 1, ...) is backoff_s * 2**r seconds."})
    adapter_name: str = field(default="tpo", metadata={
        "help": "OpenAI backend: prefix of the LoRA name under which each iteration's adapter is loaded into "
                "vLLM via /v1/load_lora_adapter (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and "
                "--enable-lora); a hash of the adapter path is appended so every adapter gets its own name."})

    def __post_init__(self):
        positive = ("k", "max_new_tokens", "batch_size", "concurrency")
        for name in positive:
            if getattr(self, name) < 1:
                raise TpoError(f"must be >= 1, got {getattr(self, name)}", field=name)
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise TpoError(f"must be >= 0, got {self.temperature}", field="temperature")
        if not 0 < self.top_p <= 1:
            raise TpoError(f"must be in (0, 1], got {self.top_p}", field="top_p")
        if self.thought_budget is not None and not 1 <= self.thought_budget < self.max_new_tokens:
            raise TpoError(f"must be >= 1 and below max_new_tokens ({self.max_new_tokens}), got "
                           f"{self.thought_budget}", field="thought_budget")
        for name in ("stop", "thought_stop"):
            if any(not s for s in getattr(self, name)):
                raise TpoError("stop strings must not be empty", field=name)
        if self.timeout_s <= 0:
            raise TpoError(f"must be > 0, got {self.timeout_s}", field="timeout_s")
        if self.max_retries < 0 or self.backoff_s < 0:
            name = "max_retries" if self.max_retries < 0 else "backoff_s"
            raise TpoError(f"must be >= 0, got {getattr(self, name)}", field=name)
        if not self.base_url.startswith(("http://", "https://")):
            raise TpoError(f"expected an http:// or https:// URL, got {self.base_url!r}", field="base_url")
        if not self.adapter_name:
            raise TpoError("must not be empty", field="adapter_name")


@dataclass
class Sample:
    """One sampled output (see the module docstring for token_ids / finish_reason / forced)."""

    index: int
    seed: int
    text: str
    token_ids: list[int]
    finish_reason: str
    forced: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


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


def eos_token_ids(tokenizer, model=None) -> set[int]:
    """Token ids that end an output: the tokenizer's EOS plus the model's generation_config EOS ids."""
    ids = set()
    sources = [getattr(tokenizer, "eos_token_id", None)]
    gen = getattr(model, "generation_config", None) if model is not None else None
    if gen is not None:
        sources.append(gen.eos_token_id)
    for src in sources:
        if src is None:
            continue
        ids.update([src] if isinstance(src, int) else list(src))
    return ids


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
    """Budget-forcing rules shared by both backends."""

    def __init__(self, template, tokenizer, cfg: SamplingConfig):
        if template is None or template.response_marker is None:
            name = getattr(template, "name", None)
            raise TpoError(f"budget forcing needs a template with a response marker (template {name!r} has "
                           "none)", field="sampling.thought_budget")
        self.template = template
        self.budget = cfg.thought_budget
        self.thought_stop = list(cfg.thought_stop)
        self.text = template.forced_response_text
        self.token_ids = list(tokenizer(self.text, add_special_tokens=False)["input_ids"])
        # Longest text the tail check must see: markers are matched by the template's tolerant regex, so
        # allow for markdown around them.
        self.window_chars = max([len(template.response_marker) + 16] + [len(s) for s in self.thought_stop])

    def marker_in(self, text: str) -> bool:
        """True if the model wrote the response marker itself (an unquoted use, as the parser sees it)."""
        regex = self.template.response_regex
        return any(not _quoted(text, m.start(), m.end()) for m in regex.finditer(text))

    def stop_in(self, text: str) -> bool:
        return any(s in text for s in self.thought_stop)


def _quoted(text: str, start: int, end: int) -> bool:
    # Same rule as tpo_lite.parsing: a marker directly wrapped in quotes is a mention, not a use.
    before = text[start - 1] if start > 0 else ""
    after = text[end] if end < len(text) else ""
    return (before != "" and before in "\"'“‘«`") or (after != "" and after in "\"'”’»`")


# ----------------------------------------------------------------------------------------- local sampling

def select_tokens(logits, temperature: float, top_p: float, uniforms, candidates: int = 256):
    """Pick one token per row of ``logits`` [B, V] by inverse CDF with the given uniforms [B] in [0, 1).

    Temperature 0 is greedy. Otherwise the distribution is softmax(logits / T) truncated to the smallest
    set of most probable tokens whose mass reaches ``top_p`` (ties broken by token id), renormalised; the
    token is the first whose cumulative mass (in that order) exceeds ``u`` times the kept mass.

    Sorting the whole vocabulary every step is slow on a CPU (~50k entries per row), so the ``candidates``
    most probable tokens are tried first; a row falls back to the full sort only when they cannot prove
    that they contain its whole top-p set (mass not reached, or a probability tie at the candidates' edge).
    Both paths select the same token.
    """
    import torch

    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    u = uniforms.to(probs.device, probs.dtype)
    if top_p >= 1.0 or probs.shape[-1] <= candidates:
        return _inverse_cdf(*_sorted_desc(probs), top_p, u)
    vals, idx = probs.topk(candidates, dim=-1)
    # Canonical order (probability descending, token id ascending among ties), as the full stable sort.
    idx, perm = idx.sort(dim=-1)
    vals = vals.gather(-1, perm)
    vals, perm = vals.sort(dim=-1, descending=True, stable=True)
    idx = idx.gather(-1, perm)
    n_keep = ((vals.cumsum(dim=-1) - vals) < top_p).sum(dim=-1)
    last_kept = vals.gather(-1, (n_keep - 1).unsqueeze(-1)).squeeze(-1)
    ok = (n_keep < candidates) & (last_kept > vals[:, -1])
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    if ok.any():
        out[ok] = _inverse_cdf(vals[ok], idx[ok], top_p, u[ok])
    if not ok.all():
        bad = ~ok
        out[bad] = _inverse_cdf(*_sorted_desc(probs[bad]), top_p, u[bad])
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


class _Row:
    """Decoding state of one sample."""

    __slots__ = ("index", "seed", "gen", "ids", "pending", "thinking", "forced", "finish")

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


class LocalSampler:
    """Batched sampling with a transformers causal LM, using a KV-cached decoding loop of our own.

    ``model`` may be a peft model (the current adapter active). ``template`` is needed for budget forcing
    only. The K samples of a prompt share its prefill: each distinct prompt of a batch is run once (left
    padded when a batch holds several) and its KV cache is repeated for its samples. Finished samples are
    dropped from the batch (and the cache) at once, so a long straggler does not pay for the others.
    """

    def __init__(self, model, tokenizer, cfg: SamplingConfig, template=None, progress: bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.progress = progress
        self.eos_ids = eos_token_ids(tokenizer, model)
        if not self.eos_ids:
            raise TpoError("neither the tokenizer nor the model's generation_config defines an EOS token",
                           field="model")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self.forcing = _Forcing(template, tokenizer, cfg) if cfg.thought_budget is not None else None
        self.stop_chars = max([len(s) for s in cfg.stop], default=0)
        self.tokens_per_s = 0.0  # of the last sample() call: generated tokens / wall time
        # transformers 5.x renamed the forward argument past_key_values -> cache (old name deprecated).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Only the last prompt position's logits are needed; older models lack the argument.
        self._prefill_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def sample(self, jobs: list[PromptJob], k: int | None = None) -> Iterator[tuple[str, list[Sample]]]:
        """Yield ``(prompt_id, samples)`` for each job (in job order) once its ``k`` samples are done."""
        k = k or self.cfg.k
        _check_jobs(jobs, k)
        rows = [(j, i) for j, job in enumerate(jobs) for i in range(k)]
        done: dict[int, list] = {}
        bs = self.cfg.batch_size
        n_tokens, t0 = 0, time.perf_counter()
        with _progress(len(rows), self.progress, "sampling") as bar:
            for start in range(0, len(rows), bs):
                batch = rows[start:start + bs]
                samples = self._generate([(jobs[j], i) for j, i in batch])
                for (j, i), s in zip(batch, samples):
                    done.setdefault(j, [None] * k)[i] = s
                    n_tokens += len(s.token_ids)
                self.tokens_per_s = n_tokens / max(time.perf_counter() - t0, 1e-9)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{self.tokens_per_s:.0f}")
                for j in sorted({j for j, _ in batch}):
                    if j in done and all(s is not None for s in done[j]):
                        yield jobs[j].prompt_id, done.pop(j)

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
        try:
            with torch.inference_mode():
                return self._generate_inner(rows, model, cfg, device)
        finally:
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
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), use_cache=True, **self._prefill_kw)
        cache = _out_cache(out)
        select = torch.tensor(row_prompt, dtype=torch.long, device=device)
        cache.batch_select_indices(select)
        logits = out.logits[:, -1, :][select]
        mask = mask.to(device)[select]
        next_pos = mask.sum(-1)  # position of the next token per row

        states = [_Row(i, job.seeds[i], self.forcing is not None) for job, i in rows]
        active = list(range(len(states)))  # states still decoding, in cache-row order
        while active:
            if cfg.temperature > 0:
                u = torch.stack([torch.rand((), generator=states[r].gen) for r in active])
            else:
                u = torch.zeros(len(active))
            picked = select_tokens(logits, cfg.temperature, cfg.top_p, u).tolist()
            feed, keep = [], []
            for slot, r in enumerate(active):
                tok = self._step(states[r], picked[slot])
                if states[r].finish is None:
                    feed.append(tok)
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(active):
                sel = torch.tensor(keep, dtype=torch.long, device=device)
                cache.batch_select_indices(sel)
                mask, next_pos = mask[sel], next_pos[sel]
                active = [active[s] for s in keep]
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
            out = model(input_ids=torch.tensor(feed, dtype=torch.long, device=device).unsqueeze(-1),
                        attention_mask=mask, position_ids=next_pos.unsqueeze(-1), use_cache=True,
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
                    row.thinking, row.forced = False, True
                    row.pending = list(forcing.token_ids)
                    tok = row.pending.pop(0)
                else:
                    row.ids.append(tok)
                    row.finish = "eos"
                    return tok
        row.ids.append(tok)
        if not row.pending:
            if row.thinking:
                tail = self._tail(row.ids, forcing.window_chars)
                if forcing.marker_in(tail):
                    row.thinking = False  # the model wrote the marker itself: nothing to force
                elif forcing.stop_in(tail) or len(row.ids) >= forcing.budget:
                    row.thinking, row.forced = False, True
                    row.pending = list(forcing.token_ids)
            if self.stop_chars and any(s in self._tail(row.ids, self.stop_chars) for s in cfg.stop):
                row.finish = "stop"
                return tok
        if len(row.ids) >= cfg.max_new_tokens:
            row.finish = "length"
        return tok


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
    appended when the output ended at EOS.

    From iteration 2 on call :meth:`ensure_adapter` first: it loads the adapter into the server and samples
    from it, or raises -- never silently samples the base model.
    """

    def __init__(self, cfg: SamplingConfig, tokenizer, template=None, progress: bool = True):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.progress = progress
        self.base_url = cfg.base_url.rstrip("/")
        self.eos_ids = eos_token_ids(tokenizer)
        self.forcing = _Forcing(template, tokenizer, cfg) if cfg.thought_budget is not None else None
        self.model_name: str | None = cfg.served_model
        self.adapter: str | None = None  # path of the adapter being served, once ensure_adapter succeeded
        self.retokenised = 0
        self._server_returns_ids = False
        self._lock = threading.Lock()

    # -- HTTP -------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
        url = self.base_url + path
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env or "", "")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode() if body is not None else None
        tries = self.cfg.max_retries + 1
        last = ""
        for attempt in range(tries):
            try:
                req = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(req, timeout=self.cfg.timeout_s) as resp:
                    return resp.read()
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code not in (408, 429) and e.code < 500:
                    raise ServerError(f"{method} {url} answered HTTP {e.code}: {detail}",
                                      field="sampling.base_url") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                    http.client.HTTPException) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (TimeoutError, socket.timeout)) or isinstance(e, (TimeoutError,
                                                                                         socket.timeout)):
                    last = f"no answer within timeout_s={self.cfg.timeout_s:g}s"
                else:
                    last = f"{type(reason).__name__}: {reason}"
            if attempt + 1 < tries:
                time.sleep(self.cfg.backoff_s * 2 ** attempt)
        raise ServerError(f"{method} {url} failed {tries} time(s) (max_retries={self.cfg.max_retries}); "
                          f"last error: {last}", field="sampling.base_url")

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

    def _resolve_model(self) -> str:
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
        """The LoRA name used for the adapter at ``path``: ``adapter_name`` + a hash of the absolute path."""
        digest = hashlib.sha1(os.path.abspath(os.fspath(path)).encode()).hexdigest()[:10]
        return f"{self.cfg.adapter_name}-{digest}"

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
            "model": self._resolve_model(),
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

    def _parse_choice(self, choice: dict, stop: list[str]) -> tuple[str, list[int], str, str | None]:
        """(text, token_ids, finish_reason, stop string or None) of one completion choice."""
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
            finish, hit = "eos", None
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
        if finish == "eos" and self.eos_ids and (not ids or ids[-1] not in self.eos_ids):
            eos = getattr(self.tokenizer, "eos_token_id", None)
            ids.append(eos if eos is not None else min(self.eos_ids))
        return text, ids, finish, hit

    def _one(self, job: PromptJob, index: int) -> Sample:
        cfg, forcing, seed = self.cfg, self.forcing, job.seeds[index]
        if forcing is None:
            text, ids, finish, _ = self._parse_choice(
                self._complete(job.prompt_token_ids, cfg.max_new_tokens, seed, cfg.stop), cfg.stop)
            return Sample(index, seed, text, ids, finish, False)
        markers = _marker_stops(forcing.template)
        stops1 = markers + forcing.thought_stop + list(cfg.stop)
        text, ids, finish, hit = self._parse_choice(
            self._complete(job.prompt_token_ids, forcing.budget, seed, stops1), stops1)
        forced = False
        if finish == "stop" and hit in cfg.stop and hit not in markers:
            return Sample(index, seed, text, ids, "stop", False)
        if not (finish == "stop" and hit in markers):  # thought ended by budget, thought_stop or EOS
            if finish == "eos" and ids and ids[-1] in self.eos_ids:
                ids = ids[:-1]
            text, ids, forced = text + forcing.text, ids + forcing.token_ids, True
        room = cfg.max_new_tokens - len(ids)
        if room <= 0:
            return Sample(index, seed, text, ids[:cfg.max_new_tokens], "length", forced)
        # A different but derived seed: the continuation must not replay the thought's random stream.
        text2, ids2, finish, _ = self._parse_choice(
            self._complete(job.prompt_token_ids + ids, room, (seed * 31 + 7) & 0x7FFFFFFF, cfg.stop), cfg.stop)
        return Sample(index, seed, text + text2, ids + ids2, finish, forced)

    def sample(self, jobs: list[PromptJob], k: int | None = None) -> Iterator[tuple[str, list[Sample]]]:
        """Yield ``(prompt_id, samples)`` per job as soon as its ``k`` samples are done (completion order)."""
        k = k or self.cfg.k
        _check_jobs(jobs, k)
        self._resolve_model()
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
    """Literal stop strings for the response marker (servers match stop strings exactly)."""
    marker = template.response_marker
    out = [marker]
    if marker.lower().startswith("here is "):
        out.append("Here's " + marker[len("here is "):])
    return out


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
    except Exception:  # noqa: BLE001 - the body is only for the message
        raw = b""
    try:
        data = json.loads(raw)
        msg = data.get("message") or (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        if msg:
            return str(msg)[:300]
    except (ValueError, AttributeError):
        pass
    return raw.decode("utf-8", "replace").strip()[:300] or (e.reason or "")


def make_sampler(cfg: SamplingConfig, tokenizer, template=None, model=None, adapter=None, progress=True):
    """The sampler ``cfg.backend`` names. Local: ``model`` is required (load it with the adapter already
    applied). OpenAI: when ``adapter`` (a saved peft adapter directory) is given it is loaded into the server
    first and refused loudly if the server cannot serve it."""
    if cfg.backend == "local":
        if model is None:
            raise TpoError("the local backend needs a loaded model", field="sampling.backend")
        return LocalSampler(model, tokenizer, cfg, template, progress=progress)
    sampler = OpenAISampler(cfg, tokenizer, template, progress=progress)
    if adapter is not None:
        sampler.ensure_adapter(adapter)
    return sampler
