"""Judges score *responses only* (never thoughts) against the user's original instruction.

``JudgeConfig`` is the ``[judge]`` table; :func:`make_judge` builds the configured judge, wrapped in the
persistent judgement cache (:mod:`tpo_lite.judges.cache`) when ``cache`` is on and a cache path is known.
Kinds: ``programmatic`` (verifiable checks, :mod:`.programmatic`), ``reward_model`` (any HF
sequence-classification RM, :mod:`.reward_model`), ``pairwise`` (an LLM asked "A or B?" in both orders,
local or OpenAI-compatible server, Bradley-Terry scores, :mod:`.pairwise`), ``function`` (a Python reward
function called like TRL's ``reward_funcs``, :mod:`.function`). See docs/judging.md.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from ..errors import TpoError, require, require_finite
from .base import Capabilities, Judge, JudgeResult, instruction_text  # noqa: F401  (re-exported)
from ..options import option

__all__ = ["JudgeConfig", "KINDS", "make_judge", "judge_class", "Judge", "Capabilities", "JudgeResult",
           "instruction_text"]

KINDS = ("programmatic", "reward_model", "pairwise", "function")


def _check_template_kwargs(kwargs) -> None:
    """``chat_template_kwargs``: a table of names to values a chat template (and a JSON request) can hold."""
    import json

    if not isinstance(kwargs, dict):
        raise TpoError(f"expected a table, got {type(kwargs).__name__}", field="chat_template_kwargs")
    for key, value in kwargs.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise TpoError(f"{key!r} is not a name a chat template can read (letters, digits, _)",
                           field="chat_template_kwargs")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TpoError(f"not a JSON value ({e})", field=f"chat_template_kwargs.{key}") from None


@dataclass
class JudgeConfig:
    """The ``[judge]`` table."""

    kind: Literal["programmatic", "reward_model", "pairwise", "function"] = option("programmatic",
        "Which judge scores the responses: 'programmatic' (the instruction's verifiable checks; needs "
        "instructions with checks, no model), 'reward_model' (an HF sequence-classification reward model, "
        "score = its scalar output, see score_field), 'pairwise' (an LLM judge asked which of two "
        "responses is better, both orders, per-sample scores from a Bradley-Terry fit) or 'function' (your "
        "Python reward function, see function).")
    function: str = option("",
        "Function judge: the reward function as 'module:function' (imported; the current directory is "
        "searched too) or 'path/to/file.py:function', called like TRL's reward_funcs once per "
        "instruction: f(prompts=[instruction] * n, completions=[response, ...], checks=[checks] * n) "
        "(only the arguments it names unless it takes **kwargs), returning one float per completion "
        "(None = not scored: that sample counts as invalid). Scores are cached per response.")
    function_learned: bool = option(False,
        "Function judge: declare the function a learned proxy (it runs a model) rather than a "
        "verifiable check, so evaluating with the judge the run optimised warns of reward hacking. Off by "
        "default: a reward function is usually a rule.")
    tie_weight: float = option(0.25,
        "Programmatic judge: weight in [0, 1) of the near-miss credit of failed checks (score = (passed + "
        "tie_weight * mean closeness of the failed) / n_checks); 0 = the bare fraction of checks passed.")
    model: str = option("",
        "Judge model: a local directory or hub id of the reward model (kind = 'reward_model') or of the "
        "causal LM judge (kind = 'pairwise' without base_url). Unused by the programmatic judge.")
    batch_size: int = option(8, "Sequences per forward pass of a local reward model or local pairwise judge.")
    device: str = option("auto",
        "Torch device of a local judge model: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda', "
        "'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto",
        "Weights dtype of a local judge model; 'auto' = bfloat16 on CUDA, float32 on CPU.")
    trust_remote_code: bool = option(False,
        "Reward model: run the Python code the model repository ships (config.json auto_map, e.g. "
        "ArmoRM's modeling_custom.py) when loading it. Only for code you trust. Off: such a model is "
        "refused, naming this option (transformers would otherwise load a stock class without the "
        "custom head, or fail).")
    score_field: str = option("auto",
        "Reward model: the field of the model's output holding the reward, one value per sequence: "
        "'auto' (a 'score' field when the output has one -- multi-objective reward models such as ArmoRM "
        "put their gated preference score there, next to the per-objective 'rewards', which are kept in "
        "the judgement details -- else 'logits'), 'score', 'logits' or another output field name.")
    max_length: int = option(4096,
        "Reward model: longest (instruction + response) conversation in tokens; longer ones are cut at "
        "the end and flagged 'truncated' in the judgement details.")
    base_url: str = option("",
        "Pairwise judge on an OpenAI-compatible server (e.g. vLLM): the API root such as "
        "'http://127.0.0.1:8000/v1' ('/chat/completions' is appended). Empty = use the local model.")
    api_key_env: str = option("OPENAI_API_KEY",
        "Name of the environment variable holding the server's API key (sent as a Bearer token when "
        "set; the key itself never goes into a config file).")
    served_model: str = option("", "Model name the judge server serves (the 'model' field of each request).")
    timeout_s: float = option(60.0, "Seconds to wait for one judge-server reply before the attempt counts as failed.")
    max_retries: int = option(3,
        "Retries per judge-server request after a connection error, timeout, HTTP 408/429/5xx or "
        "malformed reply, before the run stops with an error (finished judgements stay cached).")
    retry_backoff_s: float = option(1.0, "First retry waits this many seconds, each further retry twice as long.")
    concurrency: int = option(4, "Judge-server requests in flight at once.")
    max_tokens: int = option(8,
        "Pairwise judge on a server: most tokens the judge may generate per comparison. A reasoning "
        "model thinks before its verdict: give it thousands (e.g. 4096). The verdict is read from the "
        "final answer only (reasoning_content, or the <think>...</think> block, is skipped); an answer cut "
        "off before a verdict counts as a tie, flagged 'cut_off'.")
    chat_template_kwargs: dict = option(factory=dict, help=
        "Pairwise judge: variables for the judge model's chat template (a local model's "
        "apply_chat_template; a server gets them as the request's chat_template_kwargs, as vLLM "
        "accepts), e.g. {enable_thinking = false} to turn a Qwen3 judge's thinking off. Empty: none.")
    server_logprobs: bool = option(True,
        "Ask the judge server for top log-probs of the answer token and read P(A) from them (after "
        "the reasoning of a reasoning model); off (or when the server returns none) the final answer's "
        "text is parsed: A -> 1, B -> 0, neither -> 0.5.")
    pair_schedule: str = option("all",
        "Which pairs of an instruction's valid responses the pairwise judge compares (each in both "
        "orders): 'all' (K(K-1)/2 pairs), 'round_robin' (each with its neighbour in a cycle, K pairs) or "
        "'random:N' (N random pairs per instruction, a random cycle first so every response is compared).")
    bt_l2: float = option(0.1,
        "Ridge on the Bradley-Terry log-strengths of the pairwise judge (a Gaussian prior of variance "
        "1/bt_l2): keeps scores finite when one response wins every comparison.")
    prompt_template: str = option("",
        "Pairwise judge prompt with the placeholders {instruction}, {response_a} and {response_b}; a "
        "path to a text file holding it is also accepted. Empty = the built-in template "
        "(tpo_lite.judges.pairwise.DEFAULT_JUDGE_TEMPLATE).")
    seed: int = option(0,
        "Seed of the 'random:N' pair schedule (combined with the instruction text, so reruns draw the "
        "same pairs).")
    cache: bool = option(True,
        "Keep every judgement in a SQLite file keyed by a content hash of judge + config, instruction "
        "and response(s), so nothing is judged twice, also across restarts.")
    cache_path: str = option("",
        "Judgement cache file; empty = the run directory's judge_cache.sqlite (shared by iterations).")

    def __post_init__(self):
        require_finite(self)
        if self.kind not in KINDS:
            raise TpoError(f"unknown judge kind {self.kind!r}; use {', '.join(KINDS)}", field="kind")
        require(self, [
            *((name, getattr(self, name) >= 1, "must be >= 1")
              for name in ("batch_size", "max_length", "concurrency", "max_tokens")),
            ("tie_weight", 0.0 <= self.tie_weight < 1.0, "must be in [0, 1)"),
            ("max_retries", self.max_retries >= 0, "must be >= 0"),
            ("timeout_s", self.timeout_s > 0, "must be > 0"),
            ("retry_backoff_s", self.retry_backoff_s >= 0, "must be >= 0"),
            ("bt_l2", self.bt_l2 > 0, "must be > 0 (a ridge keeps Bradley-Terry scores finite)"),
        ])
        from .pairwise import check_schedule

        check_schedule(self.pair_schedule, field="pair_schedule")
        if self.kind == "reward_model" and not self.model:
            raise TpoError("the reward_model judge needs a model path", field="model")
        if self.kind == "function":
            from .function import parse_function_spec

            if not self.function:
                raise TpoError("the function judge needs function = 'module:function' or 'file.py:function'",
                               field="function")
            parse_function_spec(self.function, field="function")  # the form (and a file) now; imported when built
        if self.score_field != "auto" and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.score_field):
            raise TpoError(f"expected 'auto' or an output field name, got {self.score_field!r}", field="score_field")
        _check_template_kwargs(self.chat_template_kwargs)
        if self.kind == "pairwise":
            if not self.base_url and not self.model:
                raise TpoError("the pairwise judge needs a local model or a server base_url", field="model")
            if self.base_url and not self.served_model:
                raise TpoError("a judge server needs served_model (the model name it serves)",
                               field="served_model")
            self.resolved_template()  # a bad template fails at config time, not mid-run

    def resolved_template(self) -> str:
        """The pairwise prompt template text (from the field, a file it names, or the built-in one)."""
        from .pairwise import DEFAULT_JUDGE_TEMPLATE, check_template

        t = self.prompt_template
        if not t:
            return DEFAULT_JUDGE_TEMPLATE
        if "{" not in t and os.path.isfile(t):
            try:
                with open(t, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise TpoError(f"cannot read the judge template: {e}", path=t, field="prompt_template") from e
            try:
                check_template(text, where="prompt_template")
            except TpoError as e:
                raise TpoError(e.message, path=t, field="prompt_template") from None
            return text
        check_template(t, where="prompt_template")
        return t


def judge_class(kind: str | JudgeConfig) -> type[Judge]:
    """The judge class of a ``JudgeConfig`` (or of a bare ``kind``); its ``capabilities`` say what such a judge
    can do. A function judge's class depends on ``function_learned``; a bare ``"function"`` gives the default
    (not learned) one."""
    cfg = kind if isinstance(kind, JudgeConfig) else None
    kind = cfg.kind if cfg is not None else kind
    if kind == "programmatic":
        from .programmatic import ProgrammaticJudge

        return ProgrammaticJudge
    if kind == "reward_model":
        from .reward_model import RewardModelJudge

        return RewardModelJudge
    if kind == "pairwise":
        from .pairwise import PairwiseJudge

        return PairwiseJudge
    if kind == "function":
        from .function import FunctionJudge, LearnedFunctionJudge

        return LearnedFunctionJudge if cfg is not None and cfg.function_learned else FunctionJudge
    raise TpoError(f"unknown judge kind {kind!r}; use {', '.join(KINDS)}", field="kind")


def make_judge(cfg: JudgeConfig, cache_path: str | os.PathLike | None = None, *, model=None, tokenizer=None) -> Judge:
    """Build the judge ``cfg`` describes.

    ``cache_path`` (or ``cfg.cache_path``) is where the judgement cache lives; with ``cfg.cache`` off or no
    path the judge is uncached. ``model``/``tokenizer`` pass an already loaded judge model (tests, or sharing
    weights) instead of loading ``cfg.model``.
    """
    from .cache import CachedJudge, JudgementCache

    path = cfg.cache_path or (os.fspath(cache_path) if cache_path is not None else "")
    cache = JudgementCache(path) if (cfg.cache and path) else None
    cls = judge_class(cfg)
    if cfg.kind != "pairwise":
        if cfg.kind == "programmatic":
            judge = cls(tie_weight=cfg.tie_weight)
        elif cfg.kind == "function":
            judge = cls.from_spec(cfg.function)
        elif model is not None:
            judge = cls(model, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                        score_field=cfg.score_field)
        else:
            judge = cls.from_pretrained(cfg.model, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype,
                                        max_length=cfg.max_length, trust_remote_code=cfg.trust_remote_code,
                                        score_field=cfg.score_field)
        return CachedJudge(judge, cache) if cache is not None else judge
    from .pairwise import LocalPairBackend, ServerPairBackend

    if cfg.base_url:
        backend = ServerPairBackend(cfg.base_url, cfg.served_model, api_key_env=cfg.api_key_env,
                                    timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                                    retry_backoff_s=cfg.retry_backoff_s, concurrency=cfg.concurrency,
                                    use_logprobs=cfg.server_logprobs, max_tokens=cfg.max_tokens,
                                    chat_template_kwargs=cfg.chat_template_kwargs)
    elif model is not None:
        backend = LocalPairBackend(model, tokenizer, batch_size=cfg.batch_size,
                                   chat_template_kwargs=cfg.chat_template_kwargs)
    else:
        backend = LocalPairBackend.from_pretrained(cfg.model, batch_size=cfg.batch_size, device=cfg.device,
                                                   dtype=cfg.dtype, chat_template_kwargs=cfg.chat_template_kwargs)
    # The pairwise judge caches each ordered comparison itself (its scores depend on the whole group).
    return cls(backend, template=cfg.resolved_template(), pair_schedule=cfg.pair_schedule, seed=cfg.seed,
               bt_l2=cfg.bt_l2, cache=cache)
