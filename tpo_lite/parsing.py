"""Split a sampled output into thought and response, and decide whether it is valid.

Grammar (per template; the marker regexes come from :func:`tpo_lite.prompts.marker_regex`)::

    generic   output   := [preamble] [THOUGHT_MARKER] thought RESPONSE_MARKER response
              THOUGHT_MARKER  := "Here is my thought process:"     RESPONSE_MARKER := "Here is my response:"
    specific  output   := thought "<R>" response ["</R>"]
    specific_tags output := [preamble] ["<internal thought>"] thought ["</internal thought>"] "<response>" response
                            ["</response>"]      (closing tags: the template's thought_close / response_close)
    think     output   := [preamble] ["<think>"] thought "</think>" response      (tags matched exactly)
    direct    output   := response
    file      as generic, with the file's thought_header / response_marker (no response_marker = direct)

Marker matching: case-insensitive; "Here is" or "Here's"/"Here’s"; any whitespace between words and around
the marker (stripped from thought and response); optional markdown around it (``**Here is my response:**``,
``### Here's my response``: without the colon only when the marker ends its line). ``think``'s tags are
matched exactly (no other case, spacing or markdown), as the servers' parsers match them.

A marker directly inside quotes (a quote right before *and* right after it: ``after "Here is my
response:"``) is a *mention*, not a use: weak models often echo
the instruction's wording, and the echo must not split the output. This is where we differ from vLLM's
granite parser and its deepseek_r1 / qwen3 parsers (for ``think``), which split at the echo too.

:func:`response_marker_uses` is the one rule for "is the response marker used in this text": the parser
calls it on the finished output (``final=True``), the samplers' budget forcing and response budget on the
output so far (``final=False``, see there), so whatever the sampler counted as the model's own marker is a
marker for the parser too.

Which marker wins when the response marker appears more than once: ``template.marker_wins``. ``generic``
uses the **first** (the thought is the shortest span ending at a response marker, exactly as vLLM's granite
parser's ``(.*?)Here is my response:(.*)``), so later repeats stay inside the response; ``think`` the **first**
``</think>`` too (vLLM's deepseek_r1 / qwen3 parsers ``partition`` at it); ``specific`` uses the
**last** ``<R>`` (the thoughts contain a draft that may itself be labelled ``<R>``; the final response is the
one after the last marker).

The thought marker is optional (the prompt may have been pre-filled with it); when present before the
response marker, the thought is the text after it (a preamble before it is dropped, as the granite parser
does), else the thought is everything before the response marker. A thought marker *after* the chosen
response marker is part of the response.

Invalid outputs (``valid=False``, never chosen as the best sample):

* ``"truncated"``: ``finish_reason == "length"`` (cut by the token limit before EOS), whatever the text;
* ``"no_response_marker"``: a thought template but no (unquoted) response marker;
* ``"empty_response"``: the response is empty or only whitespace/markdown after the marker (for ``direct``:
  the whole output is empty).

``thought`` and ``response`` are filled in as far as they can be even for invalid outputs (for
``no_response_marker`` the whole text is the thought and the response is empty).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from tpo_lite.prompts import Template

FINISH_REASONS = ("eos", "stop", "length")
INVALID_REASONS = ("truncated", "no_response_marker", "empty_response")

_OPEN_QUOTES = "\"'“‘«`"
_CLOSE_QUOTES = "\"'”’»`"
# What is left when a "response" is only markdown debris, e.g. "**" or "---".
_ONLY_DEBRIS = re.compile(r"^[\s*_#>`\-–—=.:]*$")


@dataclass(frozen=True)
class Parsed:
    """One parsed output: ``thought`` (empty for ``direct``), ``response``, ``valid`` and, when not valid, the
    reason (one of :data:`INVALID_REASONS`)."""

    thought: str
    response: str
    valid: bool
    invalid_reason: str | None = None


def _is_quoted(text: str, start: int, end: int) -> bool:
    """True if text[start:end] is directly wrapped in quotes (a mention of the marker, not a use)."""
    before = text[start - 1] if start > 0 else ""
    after = text[end] if end < len(text) else ""
    # Both sides: a response that merely starts with a quote ('Here is my response:"Hi"') is still a use.
    return bool(before) and before in _OPEN_QUOTES and bool(after) and after in _CLOSE_QUOTES


def _settled(regex: re.Pattern, text: str, m: re.Match) -> bool:
    """For a match that ends where ``text`` (still being generated) ends: True if no continuation can undo it."""
    if m.start() > 0 and text[m.start() - 1] in _OPEN_QUOTES:
        return False  # the next character may close the quote and make it a mention
    # A match that needs the end of the text (a colon-less marker "ending its line" at \Z) fails once
    # anything follows; NUL continues no marker pattern, so surviving it means surviving any continuation.
    return regex.match(text + "\0", m.start()) is not None


def _uses(regex: re.Pattern | None, text: str, final: bool = True) -> list[re.Match]:
    if regex is None:
        return []
    if not final:
        text = text.rstrip("\ufffd")  # a character whose bytes are not all generated yet is not written yet
    return [m for m in regex.finditer(text) if not _is_quoted(text, m.start(), m.end())
            and (final or m.end() < len(text) or _settled(regex, text, m))]


def response_marker_uses(text: str, template: Template, final: bool = True) -> list[re.Match]:
    """The uses (unquoted matches) of ``template``'s response marker in ``text``, in order; empty = not used.

    ``final=True``: ``text`` is a finished output, as :func:`parse_output` sees it. ``final=False``: ``text``
    is an output still being generated (a sampler deciding whether the model wrote the marker itself); a
    match counts only once no continuation can undo it, so every use counted while streaming is a use in
    the finished output too. Not yet counted: a match at the very end of the text that either needs the
    end of the text (``...Here is my response`` may go on ``to you``) or has a quote right before it (the
    next character may close the quote); trailing U+FFFD (a character decoded from part of its bytes) are
    ignored. A template without a response marker has no uses.
    """
    return _uses(template.response_regex, text, final)


def find_markers(text: str, template: Template) -> tuple[re.Match | None, re.Match | None]:
    """(thought-marker match or None, response-marker match or None) per the grammar above."""
    responses = response_marker_uses(text, template)
    if not responses:
        thoughts = _uses(template.thought_regex, text)
        return (thoughts[0] if thoughts else None), None
    resp = responses[0] if template.marker_wins == "first" else responses[-1]
    thoughts = [m for m in _uses(template.thought_regex, text) if m.end() <= resp.start()]
    return (thoughts[0] if thoughts else None), resp


def _clean_response(text: str, template: Template) -> str:
    text = text.strip()
    if template.response_close_regex is not None:
        # Some outputs close the tag the prompt opened: "<R> answer </R>".
        text = template.response_close_regex.sub("", text).strip()
    return "" if _ONLY_DEBRIS.match(text) else text


def parse_output(text: str, template: Template, finish_reason: str = "eos") -> Parsed:
    """Parse one sampled output (the generated text only, without the prompt) under ``template``.

    ``finish_reason`` is how generation stopped: ``"eos"`` (end-of-sequence token), ``"stop"`` (a stop string)
    or ``"length"`` (token limit; the output is then invalid).
    """
    if finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, got {finish_reason!r}")
    if text is None:
        text = ""
    cut = finish_reason == "length"
    if not template.has_thoughts:
        response = text.strip()
        if cut:
            return Parsed("", response, False, "truncated")
        return Parsed("", response, bool(response), None if response else "empty_response")
    thought_m, resp_m = find_markers(text, template)
    if resp_m is None:
        thought = text[thought_m.end():] if thought_m else text
        return Parsed(thought.strip(), "", False, "truncated" if cut else "no_response_marker")
    thought = text[thought_m.end() if thought_m else 0:resp_m.start()].strip()
    response = _clean_response(text[resp_m.end():], template)
    if cut:
        return Parsed(thought, response, False, "truncated")
    if not response:
        return Parsed(thought, "", False, "empty_response")
    return Parsed(thought, response, True, None)
