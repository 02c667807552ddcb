"""Pairwise LLM judge: "which of two responses is better?", both orders, aggregated with Bradley-Terry.

For every scheduled pair of valid responses (i, j) of one instruction the judge model sees the prompt
template filled with the *original* instruction and the two responses as A and B, in **both** orders. The
template is filled in one pass (a ``{response_b}`` inside the instruction or response A stays text) and
special-token strings in the instruction and responses are escaped (the backend's ``escape``: the judge
tokenizer's special tokens locally, common chat-format control strings for a server), so no text can forge
a turn of the judge's conversation.

* Local backend (a transformers causal LM): the preference is read from the next-token distribution after
  the judge's chat-templated prompt: ``P(A) = m_A / (m_A + m_B)`` where ``m_X`` is the probability mass of
  the single-token spellings of the letter (``"A"``, ``" A"``). ``m_A + m_B`` is kept in the details as
  ``answer_mass`` (low mass = the judge did not really answer with a letter).
* Server backend (an OpenAI-compatible ``/chat/completions`` endpoint, e.g. vLLM): greedy, ``max_tokens``
  tokens (a few; thousands for a reasoning model), the judge's ``chat_template_kwargs`` in the request, with
  ``top_logprobs`` when ``server_logprobs`` is on (then read like the local backend); otherwise, or when
  the server returns no log-probs, the first standalone ``A``/``B`` in the answer gives 1 or 0, and an
  answer with neither letter counts as a tie (0.5, flagged ``unparsed``, and ``cut_off`` when the token
  limit stopped it). The verdict is read from the *final answer* only (:func:`final_answer`): a reasoning
  model's thoughts (``reasoning_content`` / ``reasoning`` when the server splits them, else a
  ``<think>...</think>`` block) weigh both letters before deciding, so neither their text nor their
  log-probs count. Requests run ``concurrency`` at a
  time with a timeout; connection errors, timeouts, HTTP 408/429/5xx and malformed replies are retried up
  to ``max_retries`` times with exponential backoff, then a :class:`~tpo_lite.errors.TpoError` names the
  server and the last error. Finished comparisons are already in the cache, so a rerun resumes.

The two orders of a pair give ``p_ij = (P_A(i, j) + 1 - P_A(j, i)) / 2``; ``position_bias`` is the mean
``P(A) - 0.5`` over all ordered judgements of the group (0 = no preference for the first slot). The
per-sample score is the Bradley-Terry log-strength fitted on all ordered judgements
(:func:`tpo_lite.stats.bradley_terry`, ridge ``bt_l2``, centred at 0).

Schedules (``pair_schedule``): ``all`` -- every pair (K(K-1)/2 pairs, K(K-1) judge calls); ``round_robin``
-- each sample against its neighbour in a cycle (K pairs); ``random:N`` -- N distinct random pairs per
instruction, starting with a random cycle so every sample is compared once N >= K (seeded by ``seed`` and
the instruction text, so a rerun draws the same pairs).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable

from .. import http_retry
from ..errors import TpoError
from ..special_tokens import escape_control_markup, escape_special_tokens
from ..stats import bradley_terry
from .base import Capabilities, Judge, JudgeResult, fingerprint, instruction_text
from .cache import JudgementCache, cache_key

__all__ = ["DEFAULT_JUDGE_TEMPLATE", "PairwiseJudge", "PairBackend", "LocalPairBackend", "ServerPairBackend",
           "schedule_pairs", "parse_choice", "final_answer"]

DEFAULT_JUDGE_TEMPLATE = """You are comparing two AI responses to the same user instruction.
Decide which response is better: more helpful, correct and complete, and follows every constraint in the instruction. Do not prefer a response because it is longer.

[Instruction]
{instruction}

[Response A]
{response_a}

[Response B]
{response_b}

Which response is better? Answer with a single letter, A or B."""

_FIELDS = ("{instruction}", "{response_a}", "{response_b}")

ResultCallback = Callable[[int, float, dict], None]


def check_template(template: str, where: str = "judge.prompt_template") -> None:
    """A judge template must contain each of ``{instruction}``, ``{response_a}``, ``{response_b}``."""
    missing = [f for f in _FIELDS if f not in template]
    if missing:
        raise TpoError(f"the judge prompt template lacks {', '.join(missing)}", field=where)


_FIELD_RE = re.compile("|".join(re.escape(f) for f in _FIELDS))


def fill_template(template: str, instruction: str, response_a: str, response_b: str) -> str:
    """The judge prompt: each placeholder of ``template`` replaced in ONE pass, so a ``{response_b}`` inside the
    instruction or response A stays text (chained replaces would put response B there); no str.format, as
    responses may contain braces."""
    values = {"{instruction}": instruction, "{response_a}": response_a, "{response_b}": response_b}
    return _FIELD_RE.sub(lambda m: values[m.group(0)], template)


_SCHEDULE = re.compile(r"all|round_robin|random:[1-9]\d*")


def check_schedule(schedule: str, field: str = "judge.pair_schedule") -> None:
    """Refuse a ``pair_schedule`` other than ``all``, ``round_robin`` or ``random:N`` (N >= 1)."""
    if not isinstance(schedule, str) or not _SCHEDULE.fullmatch(schedule):
        raise TpoError(f"unknown pair schedule {schedule!r}; use all, round_robin or random:N (N >= 1)",
                       field=field)


def schedule_pairs(n: int, schedule: str = "all", seed: int = 0, salt: str = "") -> list[tuple[int, int]]:
    """Unordered pairs ``(i, j)``, ``i < j``, of ``n`` items to compare under ``schedule`` (see module doc)."""
    check_schedule(schedule)
    if n < 2:
        return []
    all_pairs = list(itertools.combinations(range(n), 2))
    if schedule == "all":
        return all_pairs
    if schedule == "round_robin":
        return sorted({tuple(sorted((i, (i + 1) % n))) for i in range(n)})
    want = int(schedule.split(":")[1])
    if want >= len(all_pairs):
        return all_pairs
    rng = random.Random(f"{seed}:{salt}")
    order = list(range(n))
    rng.shuffle(order)
    chosen: list[tuple[int, int]] = []
    for k in range(n if n > 2 else 1):  # a random cycle first: every item gets compared
        p = tuple(sorted((order[k], order[(k + 1) % n])))
        if p not in chosen:
            chosen.append(p)
    rest = [p for p in all_pairs if p not in chosen]
    rng.shuffle(rest)
    chosen += rest
    return sorted(chosen[:want])


_CHOICE_RE = re.compile(r"(?<![A-Za-z0-9])([AB])(?![A-Za-z0-9])")


def parse_choice(text: str) -> str | None:
    """The first standalone ``A`` or ``B`` in a judge's answer (``"B"``, ``"[[A]]"``, ``"Response B."``)."""
    m = _CHOICE_RE.search(text or "")
    return m.group(1) if m else None


THINK_END = "</think>"


def final_answer(message: dict) -> tuple[str, bool]:
    """``(final answer, reasoned)`` of a chat reply ``message``: its content without the reasoning.

    A server with a reasoning parser (vLLM ``--reasoning-parser``) already moves the reasoning to
    ``reasoning_content`` (``reasoning`` in newer vLLM) and leaves the answer in ``content``; without one the
    content holds the ``<think>...</think>`` block, cut here at the first ``</think>`` as vLLM's parsers do
    (its opening tag may sit in the prompt, as Qwen3's and DeepSeek-R1's templates put it). An opened block
    that never closes is reasoning cut off before any answer: the final answer is empty."""
    content = message.get("content") or ""
    reasoned = bool(message.get("reasoning_content") or message.get("reasoning"))
    end = content.find(THINK_END)
    if end >= 0:
        return content[end + len(THINK_END):].strip(), True
    if content.lstrip().startswith("<think>"):
        return "", True
    return content, reasoned


def _answer_logprobs(tokens: list[dict], reasoned: bool) -> list[dict]:
    """The log-prob entries of the final answer: after the token that ends the reasoning. A server's
    log-probs cover every generated token, the reasoning's too; with reasoning but no ``</think>`` token to
    find (another reasoning format), none (the answer text is parsed instead)."""
    if not reasoned:
        return tokens
    for k, tok in enumerate(tokens):
        if THINK_END in (tok.get("token") or ""):
            return tokens[k + 1:]
    return []


def _letter_ids(tokenizer, letter: str) -> list[int]:
    ids = set()
    for spelling in (letter, " " + letter):
        enc = tokenizer.encode(spelling, add_special_tokens=False)
        if len(enc) == 1:
            ids.add(enc[0])
    return sorted(ids)


class PairBackend:
    """Where the pairwise judge's prompts go: ``judge(prompts, on_result)`` calls ``on_result(k, P(A), details)``
    once per prompt. ``kind`` and ``model_id`` name it; ``use_logprobs`` (None = no such choice) is part of
    the judge's identity."""

    kind: str
    model_id: str
    use_logprobs: bool | None = None
    # Further settings that can change a verdict (chat_template_kwargs, a server's max_tokens), part of the
    # judge's identity when not empty.
    options: dict = {}

    def escape(self, text: str, field: str = "response") -> str:
        """User text as the judge model is shown it; unchanged here."""
        return text

    def judge(self, prompts: list[str], on_result: ResultCallback) -> None:
        raise NotImplementedError


class LocalPairBackend(PairBackend):
    """Reads P(A) from a local causal LM's next-token probabilities (batched, left-padded)."""

    kind = "local"

    def __init__(self, model, tokenizer, batch_size: int = 8, chat_template_kwargs: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.options = {"chat_template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else {}
        self.a_ids = _letter_ids(tokenizer, "A")
        self.b_ids = _letter_ids(tokenizer, "B")
        if not self.a_ids or not self.b_ids:
            raise TpoError("the judge tokenizer has no single-token spelling of 'A' or 'B'; the local "
                           "pairwise judge reads the answer from those tokens", field="judge.model")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)
        self.model_id = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 8, device: str = "auto",
                        dtype: str = "auto", chat_template_kwargs: dict | None = None) -> "LocalPairBackend":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .reward_model import resolve_device_dtype

        if not path:
            raise TpoError("the local pairwise judge needs a model path (or set base_url for a server)",
                           field="judge.model")
        dev, dt = resolve_device_dtype(device, dtype)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(dev)
        except (OSError, ValueError) as e:
            raise TpoError(f"cannot load the judge model: {e}", path=path, field="judge.model") from e
        return cls(model, tok, batch_size=batch_size, chat_template_kwargs=chat_template_kwargs)

    def escape(self, text: str, field: str = "response") -> str:
        """User text as the judge model sees it: its special-token strings escaped (no forged turns)."""
        return escape_special_tokens(text, self.tokenizer, field=field)

    def render(self, prompt: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True, **self.chat_template_kwargs)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt + "\nAnswer:")["input_ids"]

    def judge(self, prompts: list[str], on_result: ResultCallback) -> None:
        import torch

        device = next(self.model.parameters()).device
        encoded = [self.render(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda k: len(encoded[k]))
        a_ids = torch.tensor(self.a_ids)
        b_ids = torch.tensor(self.b_ids)
        from ..models import left_pad

        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                ids, mask, pos = left_pad([encoded[k] for k in idx], self.pad_id)
                out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 position_ids=pos.to(device), logits_to_keep=1)
                logp = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1).cpu()
                la = torch.logsumexp(logp[:, a_ids], dim=-1)
                lb = torch.logsumexp(logp[:, b_ids], dim=-1)
                p_a = torch.sigmoid(la - lb)  # = m_A / (m_A + m_B)
                mass = la.exp() + lb.exp()
                for r, k in enumerate(idx):
                    on_result(k, float(p_a[r]), {"answer_mass": float(mass[r])})


def _choices(raw: bytes) -> dict:
    """A chat completion's JSON; one without choices is a ValueError (a failed try)."""
    data = json.loads(raw.decode("utf-8"))
    if not isinstance(data, dict) or not data.get("choices"):
        raise ValueError(f"reply without choices: {str(data)[:200]}")
    return data


class ServerPairBackend(PairBackend):
    """Asks an OpenAI-compatible chat endpoint (:mod:`tpo_lite.http_retry`: bounded retries with backoff, then a
    clear error)."""

    kind = "server"

    def __init__(self, base_url: str, served_model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 3, retry_backoff_s: float = 1.0,
                 concurrency: int = 4, use_logprobs: bool = True, max_tokens: int = 8,
                 chat_template_kwargs: dict | None = None):
        if not base_url:
            raise TpoError("the server judge needs base_url", field="judge.base_url")
        if not served_model:
            raise TpoError("the server judge needs served_model (the model name the server serves)",
                           field="judge.served_model")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.served_model = served_model
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.concurrency = max(1, int(concurrency))
        self.use_logprobs = bool(use_logprobs)
        self.max_tokens = int(max_tokens)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        # Only what differs from the defaults: caches of judges that predate these settings stay valid.
        self.options = {}
        if self.max_tokens != 8:
            self.options["max_tokens"] = self.max_tokens
        if self.chat_template_kwargs:
            self.options["chat_template_kwargs"] = self.chat_template_kwargs
        self.model_id = served_model

    def escape(self, text: str, field: str = "response") -> str:
        """User text as the server sees it: common control-token strings escaped (its tokenizer is unknown)."""
        return escape_control_markup(text)

    def _post(self, payload: dict) -> dict:
        try:
            return http_retry.request(self.url, payload, api_key=self.api_key, timeout_s=self.timeout_s,
                                      max_retries=self.max_retries, backoff_s=self.retry_backoff_s, parse=_choices)
        except http_retry.HTTPFailure as e:
            if e.refused:  # a bad model name or request will not heal by retrying
                raise TpoError(f"judge server {self.url} refused the request: {e.last}",
                               field="judge.base_url") from None
            raise TpoError(f"judge server {self.url} failed after {self.max_retries + 1} attempts "
                           f"(last error: {e.last}); finished judgements are cached, rerun to resume",
                           field="judge.base_url") from None

    def ask(self, prompt: str) -> tuple[float, dict]:
        payload: dict[str, Any] = {"model": self.served_model, "temperature": 0.0, "max_tokens": self.max_tokens,
                                   "messages": [{"role": "user", "content": prompt}]}
        if self.chat_template_kwargs:
            payload["chat_template_kwargs"] = self.chat_template_kwargs  # what vLLM reads (extra_body)
        if self.use_logprobs:
            payload["logprobs"] = True
            payload["top_logprobs"] = 5
        data = self._post(payload)
        choice = data["choices"][0]
        text, reasoned = final_answer(choice.get("message") or {})
        detail: dict[str, Any] = {"answer": text[:50]}
        if reasoned:
            detail["reasoned"] = True
        content = _answer_logprobs(((choice.get("logprobs") or {}).get("content")) or [], reasoned)
        if self.use_logprobs and content:
            # The first generated token of the answer that is a letter choice carries the preference.
            for tok in content:
                tops = tok.get("top_logprobs") or []
                ma = sum(math.exp(t["logprob"]) for t in tops if t.get("token", "").strip() == "A")
                mb = sum(math.exp(t["logprob"]) for t in tops if t.get("token", "").strip() == "B")
                if ma + mb > 0:
                    detail["answer_mass"] = ma + mb
                    return ma / (ma + mb), detail
        c = parse_choice(text)
        if c is None:
            detail["unparsed"] = True
            if choice.get("finish_reason") == "length":
                detail["cut_off"] = True  # out of max_tokens before a verdict (a reasoning model needs more)
            return 0.5, detail
        return (1.0 if c == "A" else 0.0), detail

    def judge(self, prompts: list[str], on_result: ResultCallback) -> None:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self.ask, p): k for k, p in enumerate(prompts)}
            try:
                for fut in as_completed(futures):  # store each as it lands: a later failure keeps it
                    p, detail = fut.result()
                    on_result(futures[fut], p, detail)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


class PairwiseJudge(Judge):
    """Compares responses two at a time with ``backend`` and turns the comparisons into per-sample scores
    (Bradley-Terry log-strengths, relative within one call)."""

    capabilities = Capabilities(scores_absolute=False, compares_pairs=True, learned=True)

    def __init__(self, backend: PairBackend, template: str = DEFAULT_JUDGE_TEMPLATE, pair_schedule: str = "all",
                 seed: int = 0, bt_l2: float = 0.1, cache: JudgementCache | None = None):
        check_template(template)
        check_schedule(pair_schedule)  # now, not mid-run
        self.backend = backend
        self.template = template
        self.pair_schedule = pair_schedule
        self.seed = seed
        self.bt_l2 = float(bt_l2)
        self.cache = cache
        self.name = f"pairwise:{backend.model_id}"
        self.identity = fingerprint("pairwise", backend.kind, backend.model_id, template, backend.use_logprobs,
                                    *([backend.options] if backend.options else []))

    def _prob_a(self, instruction: Any, ordered: list[tuple[str, str]]) -> tuple[list[float], list[dict]]:
        """P(A wins) for each ordered (response_a, response_b), through the cache."""
        text = instruction_text(instruction)
        shown: dict[str, str] = {}  # text -> as shown to the judge (special-token strings escaped)
        for t, field in [(text, "instruction")] + [(r, "response") for pair in ordered for r in pair]:
            if t not in shown:
                shown[t] = self.backend.escape(t, field)
        # A prompt whose text had to be escaped is another prompt than before: never reuse an entry cached for
        # the unescaped (forgeable) version.
        keys = [cache_key(self.identity + (":escaped" if any(shown[t] != t for t in (text, a, b)) else ""),
                          instruction, a, b) for a, b in ordered]
        found = self.cache.get_many(keys) if self.cache is not None else {}
        todo = [k for k in dict.fromkeys(keys) if k not in found]
        if todo:
            first = {k: keys.index(k) for k in todo}
            prompts = [fill_template(self.template, shown[text], *(shown[r] for r in ordered[first[k]]))
                       for k in todo]

            def store(idx: int, p: float, detail: dict) -> None:
                found[todo[idx]] = {"p": p, "details": detail}
                if self.cache is not None:
                    self.cache.put(todo[idx], found[todo[idx]])

            self.backend.judge(prompts, store)
        return [found[k]["p"] for k in keys], [found[k]["details"] for k in keys]

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        """P(``response_a`` better) with ``response_a`` shown *first* (as A): one presentation order.

        Callers that want the order-debiased preference ask both orders and average
        (``(compare(a, b) + 1 - compare(b, a)) / 2``, see :meth:`compare_both`); ``score`` always does.
        """
        (p_ab,), _ = self._prob_a(instruction, [(response_a, response_b)])
        return p_ab

    def compare_both(self, instruction: Any, response_a: str, response_b: str) -> dict:
        """Both orders: ``p`` (averaged P(a better)), ``p_a_first`` = P(A) with a shown first,
        ``p_b_first`` = P(A) with b shown first, and ``position_bias`` = mean P(A) - 0.5."""
        (p_ab, p_ba), _ = self._prob_a(instruction, [(response_a, response_b), (response_b, response_a)])
        return {"p": 0.5 * (p_ab + 1.0 - p_ba), "p_a_first": p_ab, "p_b_first": p_ba,
                "position_bias": 0.5 * (p_ab + p_ba) - 0.5}

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        valid = [i for i, r in enumerate(responses) if r is not None]
        res = JudgeResult.unscored(responses)
        if not valid:
            return res
        pairs = schedule_pairs(len(valid), self.pair_schedule, self.seed, salt=instruction_text(instruction))
        ordered = []
        for i, j in pairs:
            ordered.append((i, j))
            ordered.append((j, i))
        probs, judged = self._prob_a(instruction, [(responses[valid[a]], responses[valid[b]]) for a, b in ordered])
        # Ordered judgements without a verdict (ties by default); shown so a too small max_tokens is seen.
        unparsed = sum(bool(d.get("unparsed")) for d in judged)
        cut_off = sum(bool(d.get("cut_off")) for d in judged)
        comps = [(a, b, p) for (a, b), p in zip(ordered, probs)]
        theta = bradley_terry(len(valid), comps, l2=self.bt_l2)
        bias = (sum(probs) / len(probs) - 0.5) if probs else 0.0
        n_comp = [0] * len(valid)
        pref = [0.0] * len(valid)
        for a, b, p in comps:
            n_comp[a] += 1
            n_comp[b] += 1
            pref[a] += p
            pref[b] += 1.0 - p
        for k, i in enumerate(valid):
            res.scores[i] = float(theta[k])
            res.details[i] = {"bt": float(theta[k]), "comparisons": n_comp[k],
                              "mean_pref": pref[k] / n_comp[k] if n_comp[k] else None, "position_bias": bias}
            if unparsed:
                res.details[i].update(unparsed=unparsed, cut_off=cut_off)
        return res
