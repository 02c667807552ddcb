"""Verifiable checks on a response (IFEval-style), used by the programmatic judge.

A check is a dict ``{"type": NAME, **params}`` stored with an instruction (``checks`` in the instruction
JSONL). Each check type in :data:`CHECKS` (their meanings: docs/templates.md) is one small function
``fn(response, **params) -> (passed, partial, observed)`` (``_count_check`` makes the bounds on a count):
``passed`` is the verdict, ``partial`` in [0, 1) is a closeness score used only when the check fails (how
near the response came; the programmatic judge turns it into a small tie-breaker), and ``observed`` is what
was measured (kept in the judge details for inspection).

Counting conventions (documented once, here):

* **word**: a maximal run of non-space characters that contains a letter or digit ("don't", "3.5" and
  "e-mail" are one word each; a lone "-" is none).
* **sentence**: a span ending in ``.``, ``!`` or ``?`` (runs like ``?!`` or ``...`` count once) followed by
  whitespace or the end; a final span without end punctuation counts too. Spans without a letter or digit
  (e.g. bullet markers) do not count.
* **paragraph**: a block separated from the next by at least one blank line (markdown ``***`` / ``---``
  divider lines also separate).
* **bullet**: a line starting (after indentation) with ``-``, ``*``, ``+`` or ``•`` and a space (markdown
  unordered list item); numbered items are not bullets.
* word matching for ``include_words`` / ``exclude_words`` / ``keyword_frequency`` is case-insensitive and on
  word boundaries (``cat`` does not match ``category``); a multi-word phrase matches with any whitespace.

Params are validated when instructions are loaded (:func:`validate_check`), so an unknown type or a bad
parameter fails at load time naming the file, line and field rather than mid-run.
"""
from __future__ import annotations

import json
import math
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

from tpo_lite.errors import TpoError

_WORD = re.compile(r"\S*[^\W_]\S*")
_SENT_END = re.compile(r"[.!?]+(?=[\"'”’)\]]*(?:\s|$))")
_BULLET = re.compile(r"^[ \t]*(?:[-*+•])[ \t]+\S", re.MULTILINE)
_PARA_SPLIT = re.compile(r"\n[ \t]*(?:\n|(?:\*\*\*+|---+)[ \t]*\n)\s*")
_NUMBER = re.compile(r"(?<![\w.])[-−]?\$?\d[\d,]*(?:\.\d+)?|(?<![\w.])[-−]?\$?\.\d+")


def count_words(text: str) -> int:
    return len(_WORD.findall(text))


def count_sentences(text: str) -> int:
    n, start = 0, 0
    for m in _SENT_END.finditer(text):
        if re.search(r"[^\W_]", text[start:m.start()]):
            n += 1
        start = m.end()
    if re.search(r"[^\W_]", text[start:]):
        n += 1
    return n


def paragraphs(text: str) -> list[str]:
    return [p for p in _PARA_SPLIT.split(text.strip()) if p.strip() and not re.fullmatch(r"[\s*\-]+", p)]


def count_bullets(text: str) -> int:
    return len(_BULLET.findall(text))


def _phrase_regex(phrase: str) -> re.Pattern:
    words = [re.escape(w) for w in phrase.split()]
    return re.compile(r"(?<![^\W_])" + r"\s+".join(words) + r"(?![^\W_])", re.IGNORECASE)


def _ratio_under(observed: float, limit: float) -> float:
    """Partial credit for exceeding an upper limit: limit/observed (1 - tiny when just over)."""
    return min(limit / observed, 0.999) if observed > 0 else 0.0


def _ratio_over(observed: float, limit: float) -> float:
    """Partial credit for falling short of a lower limit: observed/limit."""
    return min(observed / limit, 0.999) if limit > 0 else 0.0


def _ratio_exact(observed: int, target: int) -> float:
    """Partial credit for missing an exact count: 1 - |diff| / max(observed, target)."""
    return max(0.0, 1.0 - abs(observed - target) / max(observed, target, 1))


def _strip_wrappers(text: str) -> str:
    """The text without surrounding whitespace, markdown emphasis/heading marks or quotes (for start/end)."""
    return text.strip().strip("*_#`\"'“”‘’ \t\n")


# ---- check functions: fn(response, **params) -> (passed, partial, observed) ----

def _count_check(count: Callable[[str], int], bound: str) -> Callable:
    """The check "``count(response)`` is at most (``bound`` "max") / at least ("min") / exactly ("num")
    ``value``", with that bound's partial credit."""
    passes, partial = {"max": (operator.le, _ratio_under), "min": (operator.ge, _ratio_over),
                       "num": (operator.eq, _ratio_exact)}[bound]

    def check(response: str, value: int):
        n = count(response)
        return passes(n, value), partial(n, value), n
    return check


def include_words(response: str, words: list[str]):
    """Every word/phrase in ``words`` appears (case-insensitive, whole words)."""
    found = [w for w in words if _phrase_regex(w).search(response)]
    return len(found) == len(words), len(found) / len(words), found


def exclude_words(response: str, words: list[str]):
    """None of ``words`` appears (case-insensitive, whole words)."""
    found = [w for w in words if _phrase_regex(w).search(response)]
    return not found, 1.0 - len(found) / len(words), found


def keyword_frequency(response: str, word: str, min_count: int):
    """``word`` appears at least ``min_count`` times (case-insensitive, whole words)."""
    n = len(_phrase_regex(word).findall(response))
    return n >= min_count, _ratio_over(n, min_count), n


def _letters(response: str) -> list[str]:
    return [c for c in response if c.isalpha() and (c.isupper() or c.islower())]


def lowercase(response: str):
    """No uppercase letters at all."""
    letters = _letters(response)
    lower = sum(c.islower() for c in letters)
    return bool(letters) and lower == len(letters), lower / len(letters) if letters else 0.0, lower


def uppercase(response: str):
    """No lowercase letters at all."""
    letters = _letters(response)
    upper = sum(c.isupper() for c in letters)
    return bool(letters) and upper == len(letters), upper / len(letters) if letters else 0.0, upper


def starts_with(response: str, word: str):
    """The response starts with ``word`` (case-insensitive; leading markdown/quotes ignored)."""
    text = _strip_wrappers(response)
    ok = re.match(r"\s*".join(re.escape(w) for w in word.split()) + r"(?![^\W_])", text, re.IGNORECASE)
    near = bool(_phrase_regex(word).search(text[:200]))
    return bool(ok), 0.5 if near else 0.0, text[:40]


def ends_with(response: str, phrase: str):
    """The response ends with ``phrase`` (case-insensitive; trailing whitespace/markdown/quotes ignored,
    and a final period after the phrase is tolerated unless the phrase has its own end punctuation)."""
    text = _strip_wrappers(response)
    target = phrase.strip().lower()
    low = text.lower()
    ok = low.endswith(target) or (target[-1:].isalnum() and low.rstrip(".!").endswith(target))
    near = target in low
    return ok, 0.5 if near else 0.0, text[-40:]


def title(response: str):
    """Contains a title wrapped in double angular brackets, like ``<<Morning Walks>>``."""
    m = re.search(r"<<([^<>\n]*[^\W_][^<>\n]*)>>", response)
    near = "<<" in response or ">>" in response
    return bool(m), 0.5 if near else 0.0, m.group(1) if m else None


def num_highlights(response: str, min_count: int):
    """At least ``min_count`` markdown-highlighted spans ``*like this*`` or ``**like this**``."""
    spans = re.findall(r"(?<!\*)\*{1,2}(?!\s)[^*\n]+?(?<!\s)\*{1,2}(?!\*)", response)
    n = len(spans)
    return n >= min_count, _ratio_over(n, min_count), n


def num_sections(response: str, value: int, splitter: str = "Section"):
    """Exactly ``value`` sections, each starting on a line with ``splitter`` and a number (``Section 1``)."""
    n = len(re.findall(rf"^[ \t#*]*{re.escape(splitter)}[ \t]+\d+", response, re.IGNORECASE | re.MULTILINE))
    return n == value, _ratio_exact(n, value), n


def postscript(response: str, marker: str = "P.S."):
    """Contains a postscript: a line starting with ``marker`` (e.g. ``P.S.``)."""
    ok = re.search(rf"^[ \t*_]*{re.escape(marker)}", response, re.IGNORECASE | re.MULTILINE)
    near = marker.lower() in response.lower()
    return bool(ok), 0.5 if near else 0.0, bool(ok)


def no_commas(response: str):
    """No commas at all."""
    n = response.count(",")
    return n == 0, 1.0 / (1.0 + n), n


def quotation(response: str):
    """The whole response is wrapped in double quotes."""
    text = response.strip()
    ok = len(text) >= 2 and text[0] in "\"“" and text[-1] in "\"”"
    near = bool(text) and (text[0] in "\"“" or text[-1] in "\"”")
    return ok, 0.5 if near else 0.0, text[:1] + "..." + text[-1:] if text else ""


def _json_candidate(response: str) -> str:
    text = response.strip()
    fence = re.fullmatch(r"```[a-zA-Z]*\s*\n(.*?)\n?```", text, re.DOTALL)
    return fence.group(1).strip() if fence else text


def json_keys(response: str, keys: list[str]):
    """The response (optionally in one ```json fence) is a JSON object that has all ``keys``."""
    text = _json_candidate(response)
    obj, whole = None, False
    try:
        obj, whole = json.loads(text), True
    except ValueError:
        m = re.search(r"\{.*\}", text, re.DOTALL)  # JSON buried in prose: partial credit only
        if m:
            try:
                obj = json.loads(m.group(0))
            except ValueError:
                obj = None
    if not isinstance(obj, dict):
        return False, 0.0, None
    present = [k for k in keys if k in obj]
    ok = whole and len(present) == len(keys)
    return ok, (0.5 if whole else 0.25) + 0.4 * len(present) / len(keys), sorted(obj)[:20]


def _parse_number(token: str) -> float | None:
    t = token.replace("−", "-").replace("$", "").replace(",", "")
    try:
        return float(t)
    except ValueError:
        return None


def numeric_answer(response: str, value: float, tolerance: float = 1e-6):
    """The last number in the response equals ``value`` (within ``tolerance``, absolute); commas, ``$`` and a
    sign are understood. Partial credit: 0.5 if the value appears earlier but is not the last number, else
    up to 0.4 for a last number near the value (0.4 * (1 - |last - value| / max(|value|, 1)), floored at 0)."""
    numbers = [x for x in (_parse_number(t) for t in _NUMBER.findall(response)) if x is not None]
    if not numbers:
        return False, 0.0, None
    hit = [abs(x - value) <= tolerance for x in numbers]
    if hit[-1]:
        return True, 1.0, numbers[-1]
    near = 0.4 * max(0.0, 1.0 - abs(numbers[-1] - value) / max(abs(value), 1.0))
    return False, 0.5 if any(hit) else near, numbers[-1]


@dataclass(frozen=True)
class CheckType:
    """A check function and its parameters: name -> (accepted types, required)."""

    fn: Callable
    params: dict


_INT = (int,)
_NUM = (int, float)
_STR = (str,)
_LIST = (list,)
_VALUE = {"value": (_INT, True)}

CHECKS: dict[str, CheckType] = {
    "max_words": CheckType(_count_check(count_words, "max"), _VALUE),
    "min_words": CheckType(_count_check(count_words, "min"), _VALUE),
    "max_sentences": CheckType(_count_check(count_sentences, "max"), _VALUE),
    "min_sentences": CheckType(_count_check(count_sentences, "min"), _VALUE),
    "num_sentences": CheckType(_count_check(count_sentences, "num"), _VALUE),
    "num_paragraphs": CheckType(_count_check(lambda r: len(paragraphs(r)), "num"), _VALUE),
    "num_bullets": CheckType(_count_check(count_bullets, "num"), _VALUE),
    "include_words": CheckType(include_words, {"words": (_LIST, True)}),
    "exclude_words": CheckType(exclude_words, {"words": (_LIST, True)}),
    "keyword_frequency": CheckType(keyword_frequency, {"word": (_STR, True), "min_count": (_INT, True)}),
    "lowercase": CheckType(lowercase, {}),
    "uppercase": CheckType(uppercase, {}),
    "starts_with": CheckType(starts_with, {"word": (_STR, True)}),
    "ends_with": CheckType(ends_with, {"phrase": (_STR, True)}),
    "title": CheckType(title, {}),
    "num_highlights": CheckType(num_highlights, {"min_count": (_INT, True)}),
    "num_sections": CheckType(num_sections, {"value": (_INT, True), "splitter": (_STR, False)}),
    "postscript": CheckType(postscript, {"marker": (_STR, False)}),
    "no_commas": CheckType(no_commas, {}),
    "quotation": CheckType(quotation, {}),
    "json_keys": CheckType(json_keys, {"keys": (_LIST, True)}),
    "numeric_answer": CheckType(numeric_answer, {"value": (_NUM, True), "tolerance": (_NUM, False)}),
}


def validate_check(check: Any, where: str = "checks") -> None:
    """Raise ``TpoError(field=where...)`` if ``check`` is not a well-formed check of a known type."""
    if not isinstance(check, dict):
        raise TpoError(f"a check must be an object like {{\"type\": \"max_words\", \"value\": 80}}, "
                       f"got {type(check).__name__}", field=where)
    ctype = check.get("type")
    if ctype not in CHECKS:
        raise TpoError(f"unknown check type {ctype!r} (known: {', '.join(sorted(CHECKS))})", field=f"{where}.type")
    spec = CHECKS[ctype].params
    for key in check:
        if key != "type" and key not in spec:
            raise TpoError(f"unknown parameter for {ctype} (expected: {', '.join(spec) or 'none'})",
                           field=f"{where}.{key}")
    for key, (types, required) in spec.items():
        if key not in check:
            if required:
                raise TpoError(f"missing parameter for {ctype}", field=f"{where}.{key}")
            continue
        v = check[key]
        if isinstance(v, bool) or not isinstance(v, types):
            raise TpoError(f"expected {'/'.join(t.__name__ for t in types)}, got {v!r}", field=f"{where}.{key}")
        if types is _INT and v < 1:
            raise TpoError(f"must be a positive integer, got {v}", field=f"{where}.{key}")
        if types is _NUM and not math.isfinite(v):
            raise TpoError(f"must be finite, got {v}", field=f"{where}.{key}")
        if key == "tolerance" and v < 0:
            raise TpoError(f"must be >= 0, got {v}", field=f"{where}.{key}")
        if types is _LIST and (not v or not all(isinstance(w, str) and w.strip() for w in v)):
            raise TpoError("expected a non-empty list of non-empty strings", field=f"{where}.{key}")
        if types is _STR and not v.strip():
            raise TpoError("must not be empty", field=f"{where}.{key}")


def run_check(check: dict, response: str) -> dict:
    """Apply one (validated) check: ``{"type", "passed", "partial", "observed"}``; ``partial`` is 1.0 when
    passed, else the near-miss closeness in [0, 1)."""
    params = {k: v for k, v in check.items() if k != "type"}
    passed, partial, observed = CHECKS[check["type"]].fn(response, **params)
    passed = bool(passed)
    partial = 1.0 if passed else float(min(max(partial, 0.0), 0.999))
    return {"type": check["type"], "passed": passed, "partial": partial, "observed": observed}
