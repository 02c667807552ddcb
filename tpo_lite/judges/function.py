"""Function judge: a Python reward function, called the way TRL's ``GRPOTrainer`` calls its ``reward_funcs``.

``judge.function = "my_rewards:helpful"`` (a module, imported with the current directory searched too) or
``"path/to/rewards.py:helpful"`` (a file). The function is called once per instruction with that instruction's
valid responses, all by keyword::

    helpful(prompts=[instruction] * n, completions=[response, ...], checks=[instruction_checks] * n)

``prompts`` are the user's *original* instruction (never the thought-wrapped prompt), ``completions`` the
responses only (never the thoughts), ``checks`` the instruction's verifiable checks (``None`` when it has
none): exactly what the judgement cache keys on. A function that takes ``**kwargs`` gets all three; one that
does not gets only the arguments it names (it must take ``completions``). It returns one number per
completion (a list, tuple, NumPy array or tensor); ``None`` = not scored, which makes that sample invalid
(never chosen). A wrong length, a non-number or a non-finite score stops the run naming ``judge.function``.

Scores are cached per response (:class:`~tpo_lite.judges.cache.CachedJudge`), so a function must score each
completion on its own, not relative to the others of the call. The cache identity holds the spec and a hash
of the function's source file: editing that file invalidates cached scores, but a change elsewhere (a model
the function loads) does not -- give such a judge a new ``cache_path`` or turn ``cache`` off.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
from typing import Any, Callable

from ..errors import TpoError
from .base import Capabilities, Judge, JudgeResult, fingerprint, instruction_checks, instruction_text

__all__ = ["FunctionJudge", "LearnedFunctionJudge", "parse_function_spec", "load_function"]

_FIELD = "judge.function"
# What the function is given, by keyword (TRL's names for the first two).
_ARGS = ("prompts", "completions", "checks")
_ATTR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def parse_function_spec(spec: str, field: str = _FIELD) -> tuple[str, str, bool]:
    """``(module or file, attribute path, is_file)`` of ``"module:function"`` / ``"file.py:function"``; the
    form is checked (and a file's existence), nothing is imported."""
    where, sep, attr = (spec or "").rpartition(":")
    if not sep or not where or not _ATTR_RE.fullmatch(attr):
        raise TpoError(f"expected 'module:function' or 'path/to/file.py:function', got {spec!r}", field=field)
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    if is_file:
        if not os.path.isfile(where):
            raise TpoError("reward function file not found", path=where, field=field)
    elif not _ATTR_RE.fullmatch(where):
        raise TpoError(f"{where!r} is not a module name (for a file give its path ending in .py)", field=field)
    return where, attr, is_file


def load_function(spec: str) -> Callable:
    """Import the callable ``spec`` names (see :func:`parse_function_spec`)."""
    where, attr, is_file = parse_function_spec(spec)
    if is_file:
        path = os.path.abspath(where)
        name = "tpo_lite_reward_" + hashlib.sha256(path.encode()).hexdigest()[:16]
        module = sys.modules.get(name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module  # registered first, as `import` does (dataclasses, pickling look it up)
            try:
                loader_spec.loader.exec_module(module)
            except Exception as e:
                del sys.modules[name]
                raise TpoError(f"cannot import the reward function's file: {type(e).__name__}: {e}", path=where,
                               field=_FIELD) from e
    else:
        # As `python -m` and uvicorn's "module:app" do: a module next to the config is found, also when
        # tpo-lite runs as a console script (whose sys.path[0] is its bin directory).
        if os.getcwd() not in sys.path:
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise TpoError(f"cannot import module {where!r}: {type(e).__name__}: {e}", field=_FIELD) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TpoError(f"{where!r} has no {attr!r}", field=_FIELD)
        obj = getattr(obj, part)
    if not callable(obj):
        raise TpoError(f"{spec!r} is a {type(obj).__name__}, not a function", field=_FIELD)
    return obj


def _accepted_args(fn: Callable, spec: str) -> tuple[str, ...]:
    """Which of :data:`_ARGS` ``fn`` takes (all of them with ``**kwargs``); refuses a function that cannot be
    called with them."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): give it TRL's two
        return _ARGS[:2]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return _ARGS
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "completions" not in named:
        raise TpoError(f"{spec!r} takes no 'completions' argument; a reward function is called like TRL's "
                       "reward_funcs: f(prompts, completions, **kwargs)", field=_FIELD)
    required = [p.name for p in params if p.default is p.empty and p.name not in _ARGS
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if required:
        raise TpoError(f"{spec!r} requires {', '.join(required)}, which the judge cannot give; it passes "
                       f"{', '.join(_ARGS)} (by keyword)", field=_FIELD)
    return tuple(a for a in _ARGS if a in named)


def _source_hash(fn: Callable) -> str | None:
    """SHA-256 of the file defining ``fn`` (None when there is none to read)."""
    try:
        path = inspect.getsourcefile(fn if inspect.isroutine(fn) or inspect.isclass(fn) else type(fn))
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (TypeError, OSError):
        return None


class FunctionJudge(Judge):
    """Scores responses with a reward function (see the module doc). ``spec`` names it (``judge.function``);
    ``fn`` is the callable itself."""

    capabilities = Capabilities(scores_absolute=True, compares_pairs=True, learned=False)

    def __init__(self, fn: Callable, spec: str = ""):
        if not callable(fn):
            raise TpoError(f"the reward function is a {type(fn).__name__}, not a callable", field=_FIELD)
        self.fn = fn
        self.spec = spec or f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        self.args = _accepted_args(fn, self.spec)
        self.name = f"function:{self.spec}"
        self.identity = fingerprint("function", self.spec, _source_hash(fn))

    @classmethod
    def from_spec(cls, spec: str) -> "FunctionJudge":
        """The judge of the function ``spec`` (``"module:function"`` or ``"file.py:function"``) names."""
        return cls(load_function(spec), spec)

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        """One score per response (``None`` where the response is ``None`` or the function gave ``None``)."""
        todo = [i for i, r in enumerate(responses) if r is not None]
        res = JudgeResult.unscored(responses)
        scores, details = res.scores, res.details
        if not todo:
            return res
        n = len(todo)
        given = {"prompts": [instruction_text(instruction)] * n, "completions": [responses[i] for i in todo],
                 "checks": [instruction_checks(instruction)] * n}
        out = self.fn(**{a: given[a] for a in self.args})
        if hasattr(out, "tolist"):  # a NumPy array or a tensor
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            raise TpoError(f"{self.spec!r} returned a {type(out).__name__}; a reward function returns a list with "
                           "one float per completion", field=_FIELD)
        if len(out) != n:
            raise TpoError(f"{self.spec!r} returned {len(out)} scores for {n} completions", field=_FIELD)
        for k, (i, v) in enumerate(zip(todo, out)):
            if v is None:
                details[i]["unscored"] = True
                continue
            try:
                if isinstance(v, (str, bytes)):
                    raise TypeError
                s = float(v)
            except (TypeError, ValueError):
                raise TpoError(f"{self.spec!r} returned {v!r} for completion {k}; scores are numbers (or None "
                               "for not scored)", field=_FIELD) from None
            if not math.isfinite(s):
                raise TpoError(f"{self.spec!r} returned a non-finite score ({s}) for completion {k}; return None "
                               "for a completion it cannot score", field=_FIELD)
            scores[i] = s
            details[i]["reward"] = s
        return res

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        """1.0 if ``response_a`` scores higher, 0.0 if lower, 0.5 on a tie (the function's scale is unknown, so
        only the order counts); a scored response beats an unscored one."""
        a, b = self.score(instruction, [response_a, response_b]).scores
        if a is None or b is None:
            return 0.5 if a is None and b is None else (0.0 if a is None else 1.0)
        return 0.5 if a == b else (1.0 if a > b else 0.0)


class LearnedFunctionJudge(FunctionJudge):
    """A function judge declared a learned proxy (``judge.function_learned``: the function runs a model), so
    evaluating with the judge a run optimised warns of reward hacking."""

    capabilities = Capabilities(scores_absolute=True, compares_pairs=True, learned=True)
