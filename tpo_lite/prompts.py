"""Thought templates: how an instruction is wrapped so the model writes thoughts before its response.

Built-in templates (the prompts of Wu et al. 2024, "Thinking LLMs", Fig. 2):

``generic``
    The thought and the response are introduced by the markers ``Here is my thought process:`` and
    ``Here is my response:`` -- the same markers IBM Granite models emit and vLLM's ``granite`` reasoning
    parser splits on, so a model trained here can be served with that parser.
``specific``
    The thoughts must contain a draft response and its evaluation; the final response follows ``<R>``.
``specific_tags``
    The same request with the markers of an earlier version of the paper: the thoughts inside
    ``<internal thought>`` ... ``</internal thought>``, the final response after ``<response>``.
``think``
    The thought inside ``<think>`` ... ``</think>``, the response after ``</think>``: the output format of
    DeepSeek-R1 and Qwen3, which vLLM's ``deepseek_r1`` / ``qwen3`` reasoning parsers split. The tags are
    matched exactly (case and spelling), as those parsers do.
``direct``
    No thoughts (the paper's baseline): the instruction is sent as is and the whole output is the response.

A user template is a TOML file; ``template = "path/to/file.toml"`` in ``[prompts]`` selects it. Keys:

.. code-block:: toml

    name = "my-template"               # optional, defaults to the file stem
    wrapper = '''Think first, then answer after "Answer:".
    Question: {instruction}'''         # required; must contain {instruction} exactly once
    thought_header = "Thoughts:"       # optional; what prefill_thought_header appends to the assistant turn
    response_marker = "Answer:"        # optional; absent = no thoughts, the whole output is the response
    marker_wins = "first"              # optional, "first" (default) or "last": which response marker counts
                                       # when the output contains it more than once

Markers given as plain text are matched the way the built-in ones are (see :mod:`tpo_lite.parsing`):
case-insensitively, with any run of whitespace between words, surrounded by optional markdown emphasis or a
heading ``#``, and ``Here is`` also matches ``Here's``. Only ``{instruction}`` is substituted in the wrapper
(other braces are left alone, so JSON examples need no escaping).
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from tpo_lite.errors import TpoError
from .options import option

GENERIC_THOUGHT_HEADER = "Here is my thought process:"
GENERIC_RESPONSE_MARKER = "Here is my response:"
SPECIFIC_RESPONSE_MARKER = "<R>"
TAGS_THOUGHT_HEADER = "<internal thought>"
TAGS_THOUGHT_CLOSE = "</internal thought>"
TAGS_RESPONSE_MARKER = "<response>"
TAGS_RESPONSE_CLOSE = "</response>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Paper, Fig. 2 (generic thought prompt); the query follows on its own line.
GENERIC_WRAPPER = (
    "Respond to the following user query in a comprehensive and detailed way. You can write down your thought "
    "process before responding. Write your thoughts after \"Here is my thought process:\" and write your "
    "response after \"Here is my response:\".\n\nUser query: {instruction}"
)
# Paper, Fig. 2 (specific thought prompt): draft + self-evaluation inside the thoughts, final answer after <R>.
SPECIFIC_WRAPPER = (
    "Respond to the following user query in a comprehensive and detailed way. But first write down your "
    "internal thoughts. This must include your draft response and its evaluation. After this, write your "
    "final response after \"<R>\".\n\nUser query: {instruction}"
)

# The specific prompt with the <internal thought> / <response> markers of an earlier version of the paper; the
# sentence naming the markers is ours (that version's exact wording is not reproduced here).
SPECIFIC_TAGS_WRAPPER = (
    "Respond to the following user query in a comprehensive and detailed way. But first write down your "
    "internal thoughts. This must include your draft response and its evaluation. Write your internal thoughts "
    "between \"<internal thought>\" and \"</internal thought>\", then write your final response after "
    "\"<response>\".\n\nUser query: {instruction}"
)

# The generic prompt asking for the <think> format; the sentence naming the tags is ours.
THINK_WRAPPER = (
    "Respond to the following user query in a comprehensive and detailed way. You can write down your thought "
    "process before responding. Write your thoughts between \"<think>\" and \"</think>\", then write your "
    "response after \"</think>\".\n\nUser query: {instruction}"
)

BUILTIN_TEMPLATES = ("generic", "specific", "specific_tags", "think", "direct")
# Names a config cannot give in chat_template_kwargs: apply_chat_template's own arguments, the template's
# conversation variable, the exported template's own names (tpo_lite.export.THOUGHT_PROMPT_VAR, _tpo).
_RESERVED_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs", "tpo_thought_prompt", "_tpo",
    # Jinja's own words: not variable names
    "true", "false", "none", "True", "False", "None", "and", "or", "not", "in", "is", "if", "else"})


@dataclass
class PromptConfig:
    """The ``[prompts]`` table of a run config."""

    template: str = option("generic",
        "Thought template: 'generic' (paper's generic prompt, Granite-compatible markers "
        "'Here is my thought process:' / 'Here is my response:'), 'specific' (thoughts "
        "with a draft and its evaluation, final response after '<R>'), 'specific_tags' "
        "(the same, thoughts inside '<internal thought>...</internal thought>', final "
        "response after '<response>'), 'think' (thoughts inside '<think>...</think>', "
        "response after '</think>': the format vLLM's deepseek_r1 / qwen3 reasoning "
        "parsers read), 'direct' (no "
        "thoughts: the instruction as is, the whole output is the response), or the path "
        "of a TOML template file (keys: wrapper with {instruction}, thought_header, "
        "response_marker, marker_wins; see docs/templates.md).")
    prefill_thought_header: bool = option(False,
        "Append the template's thought header (e.g. 'Here is my thought process:'; "
        "'<think>' and a line end for 'think') to the "
        "assistant turn of the prompt, so the model starts inside its thoughts. Helps weak "
        "seed models find the format; no effect for templates without a thought header "
        "('specific', 'direct').")
    system_prompt: str | None = option(None,
        "System message put before the user turn. Unset: none is passed, so the model's "
        "chat template applies its own default (SmolLM2's adds one).")
    chat_template_kwargs: dict = option(factory=dict, help=
        "Extra variables for the seed model's chat template, passed to its "
        "apply_chat_template wherever a prompt is built (generation, evaluation, chat) and kept "
        "as defaults in the exported chat template, e.g. {enable_thinking = false} so a Qwen3 "
        "seed does not think natively on top of the template's thoughts. Values: strings, "
        "numbers, booleans, or arrays / tables of them. Empty: none.")

    def __post_init__(self):
        check_chat_template_kwargs(self.chat_template_kwargs)
        # Fail when the config is loaded, not mid-run: a built-in name or a readable, valid template file.
        if self.template in BUILTIN:
            return
        try:
            get_template(self.template)
        except TpoError as e:
            if e.line is not None:  # an error inside the template file: keep its own file:line
                raise TpoError(f"bad template file: {e}", field="template") from None
            where = f" ({e.path})" if e.path is not None else ""
            raise TpoError(e.message + where, field="template") from None


@dataclass(frozen=True)
class Template:
    """A thought template and the rules that split its outputs (used by :func:`tpo_lite.parsing.parse_output`).

    ``wrapper`` contains ``{instruction}``; ``thought_header`` is the text that opens the thoughts (``None``
    if the template has none); ``response_marker`` the text that opens the response (``None`` = no thoughts,
    the whole output is the response); ``marker_wins`` says which response marker counts when there are
    several ("first" or "last"). ``thought_pattern`` / ``response_pattern`` are the regular expressions
    (compiled case-insensitively) that recognise the markers; by default they are derived from the marker
    texts with :func:`marker_regex`. ``thought_close`` / ``response_close`` are optional closing tags
    (``</internal thought>``, ``</R>``): the default response pattern takes a ``thought_close`` right before
    the response marker as part of the marker (so it is not in the thought), and the parser drops a
    ``response_close`` that ends the response; both are matched with :func:`tag_regex`. ``forced_text``: what
    budget forcing appends after a cut-off thought (None = ``thought_close``, then the response marker on its
    own line; read it as :attr:`forced_response_text`).
    """

    name: str
    wrapper: str
    thought_header: str | None = None
    response_marker: str | None = None
    marker_wins: str = "first"
    thought_pattern: str | None = None
    response_pattern: str | None = None
    thought_close: str | None = None
    response_close: str | None = None
    forced_text: str | None = None

    def __post_init__(self):
        if self.wrapper.count("{instruction}") != 1:
            raise TpoError("the wrapper must contain {instruction} exactly once", field="wrapper")
        if self.marker_wins not in ("first", "last"):
            raise TpoError(f"expected 'first' or 'last', got {self.marker_wins!r}", field="marker_wins")
        if self.thought_pattern is None and self.thought_header:
            object.__setattr__(self, "thought_pattern", marker_regex(self.thought_header))
        if self.response_pattern is None and self.response_marker:
            pattern = marker_regex(self.response_marker)
            if self.thought_close:
                pattern = rf"(?:{tag_regex(self.thought_close)}\s*)?" + pattern
            object.__setattr__(self, "response_pattern", pattern)

    @property
    def has_thoughts(self) -> bool:
        """True if outputs are split into thought and response (False for ``direct``)."""
        return self.response_marker is not None

    @property
    def forced_response_text(self) -> str:
        """What budget forcing appends after a cut-off thought to start the response (by default the marker on
        its own line). It ends with a line end: alone, that line end completes a marker the model wrote."""
        if self.response_marker is None:
            raise TpoError(f"template {self.name!r} has no response marker to force", field="prompts.template")
        if self.forced_text is not None:
            return self.forced_text
        close = "\n" + self.thought_close if self.thought_close else ""
        return close + "\n\n" + self.response_marker + "\n"

    @cached_property
    def thought_regex(self) -> re.Pattern | None:
        return re.compile(self.thought_pattern, re.IGNORECASE | re.MULTILINE) if self.thought_pattern else None

    @cached_property
    def response_regex(self) -> re.Pattern | None:
        return re.compile(self.response_pattern, re.IGNORECASE | re.MULTILINE) if self.response_pattern else None

    @cached_property
    def response_close_regex(self) -> re.Pattern | None:
        """Matches a ``response_close`` (and the whitespace around it) at the very end of a response."""
        if not self.response_close:
            return None
        return re.compile(rf"\s*{tag_regex(self.response_close)}\s*\Z", re.IGNORECASE)

    def wrap(self, instruction: str) -> str:
        """The user-turn text for ``instruction``."""
        return self.wrapper.replace("{instruction}", instruction)


# Markdown that models put around a marker: "**Here is my response:**", "### Here's my response", "__<R>__".
_MD_OPEN = r"(?:\#{1,6}[ \t]+)?(?:\*\*|\*|__|_)?"
_MD_CLOSE = r"(?:\*\*|\*|__|_)?"


def marker_regex(marker: str) -> str:
    """A tolerant regular expression (use with IGNORECASE | MULTILINE) for a marker text.

    Words may be separated by any whitespace; a leading "Here is" also matches "Here's" / "Here’s"; optional
    markdown emphasis or a heading ``#`` may surround it; a trailing colon may sit inside or outside the
    emphasis (``**Here is my response:**`` or ``**Here is my response**:``), and a marker that ends with a
    colon also matches without it when it stands alone at the end of its line (a markdown heading).
    """
    text = marker.strip()
    if not text:
        raise TpoError("a marker must not be empty")
    colon = text.endswith(":")
    core_text = text[:-1].rstrip() if colon else text
    words = core_text.split()
    parts = [re.escape(w) for w in words]
    core = r"\s+".join(parts)
    if len(words) >= 2 and words[0].lower() == "here" and words[1].lower() == "is":
        rest = r"\s+".join(parts[2:])
        core = r"here(?:\s+is|['’]s)" + (r"\s+" + rest if rest else "")
    if colon:
        tail = rf"(?:{_MD_CLOSE}[ \t]*:{_MD_CLOSE}|{_MD_CLOSE}[ \t]*(?=\r?\n|\Z))"
    else:
        tail = rf"{_MD_CLOSE}(?:[ \t]*:)?{_MD_CLOSE}"
    return _MD_OPEN + core + tail


def tag_regex(tag: str) -> str:
    """A regular expression for a tag text such as ``</internal thought>``: any whitespace between its words and
    optional whitespace after ``<`` and ``/`` and before ``>`` (``< /R >`` matches ``</R>``)."""
    text = tag.strip()
    if not text:
        raise TpoError("a tag must not be empty")
    out = r"\s+".join(re.escape(w) for w in text.split())
    return out.replace("<", r"<\s*").replace("/", r"/\s*").replace(">", r"\s*>")


BUILTIN = {
    "generic": Template(
        name="generic",
        wrapper=GENERIC_WRAPPER,
        thought_header=GENERIC_THOUGHT_HEADER,
        response_marker=GENERIC_RESPONSE_MARKER,
        marker_wins="first",  # as vLLM's granite parser: thought is the shortest span up to a response marker
    ),
    "specific": Template(
        name="specific",
        wrapper=SPECIFIC_WRAPPER,
        thought_header=None,
        response_marker=SPECIFIC_RESPONSE_MARKER,
        # The draft inside the thoughts may itself be introduced by "<R>"; the final response is the last one.
        marker_wins="last",
        response_close="</R>",  # some outputs close the tag: "<R> answer </R>"
    ),
    "specific_tags": Template(
        name="specific_tags",
        wrapper=SPECIFIC_TAGS_WRAPPER,
        thought_header=TAGS_THOUGHT_HEADER,
        response_marker=TAGS_RESPONSE_MARKER,
        marker_wins="last",  # as "specific": a draft in the thoughts may be introduced by the marker too
        thought_close=TAGS_THOUGHT_CLOSE,
        response_close=TAGS_RESPONSE_CLOSE,
    ),
    "think": Template(
        name="think",
        wrapper=THINK_WRAPPER,
        thought_header=THINK_OPEN + "\n",  # pre-filled, the thought starts on its own line
        response_marker=THINK_CLOSE,
        # The thought is everything up to the first </think>, as vLLM's deepseek_r1 / qwen3 parsers split
        # (str.partition); the tags are matched exactly, as there ((?-i:) undoes the templates' IGNORECASE).
        marker_wins="first",
        thought_pattern=f"(?-i:{re.escape(THINK_OPEN)})",
        response_pattern=f"(?-i:{re.escape(THINK_CLOSE)})",
        forced_text="\n" + THINK_CLOSE + "\n\n",  # <think>\n thought \n</think>\n\n response
    ),
    "direct": Template(name="direct", wrapper="{instruction}"),
}

_FILE_KEYS = {"name", "wrapper", "thought_header", "response_marker", "marker_wins"}


def _key_line(text: str, key: str) -> int | None:
    m = re.search(rf"^[ \t]*{re.escape(key)}[ \t]*=", text, re.MULTILINE)
    return text.count("\n", 0, m.start()) + 1 if m else None


def load_template_file(path: str | os.PathLike) -> Template:
    """Read a TOML template file (format in the module docstring); errors name the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TpoError(f"cannot read template file: {e.strerror or e}", path=path, field="prompts.template")
    except UnicodeDecodeError as e:
        raise TpoError(f"not UTF-8 text (byte {e.start}: {e.reason})", path=path, field="prompts.template") \
            from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None)
        if line is None:
            m = re.search(r"at line (\d+)", str(e))
            line = int(m.group(1)) if m else None
        msg = getattr(e, "msg", None) or re.sub(r"\s*\(at line.*\)$", "", str(e))
        raise TpoError(f"invalid TOML: {msg}", path=path, line=line)
    for key in data:
        if key not in _FILE_KEYS:
            raise TpoError(f"unknown key (expected one of {', '.join(sorted(_FILE_KEYS))})",
                           path=path, line=_key_line(text, key), field=key)
    if "wrapper" not in data:
        raise TpoError("missing required key 'wrapper' (the user turn, containing {instruction})", path=path,
                       field="wrapper")
    for key, value in data.items():
        if not isinstance(value, str):
            raise TpoError(f"expected a string, got {type(value).__name__}", path=path,
                           line=_key_line(text, key), field=key)
    for key in ("thought_header", "response_marker"):
        if key in data and not data[key].strip():
            raise TpoError("must not be empty (leave the key out instead)", path=path,
                           line=_key_line(text, key), field=key)
    if "thought_header" in data and "response_marker" not in data:
        raise TpoError("a thought_header needs a response_marker (else the output cannot be split)",
                       path=path, line=_key_line(text, "thought_header"), field="thought_header")
    try:
        return Template(
            name=data.get("name", path.stem),
            wrapper=data["wrapper"],
            thought_header=data.get("thought_header"),
            response_marker=data.get("response_marker"),
            marker_wins=data.get("marker_wins", "first"),
        )
    except TpoError as e:
        raise TpoError(e.message, path=path, line=_key_line(text, e.field or "wrapper"), field=e.field)


def get_template(cfg: PromptConfig | str) -> Template:
    """The :class:`Template` named by ``cfg.template`` (a built-in name or a TOML file path)."""
    name = cfg if isinstance(cfg, str) else cfg.template
    if name in BUILTIN:
        return BUILTIN[name]
    if not name or not (name.endswith(".toml") or os.path.sep in name or os.path.exists(name)):
        raise TpoError(f"unknown template {name!r}: expected one of {', '.join(BUILTIN_TEMPLATES)} or the path "
                       "of a .toml template file", field="prompts.template")
    if not os.path.isfile(name):
        raise TpoError("template file not found", path=name, field="prompts.template")
    return load_template_file(name)


def check_chat_template_kwargs(kwargs) -> dict:
    """``kwargs`` (``prompts.chat_template_kwargs``), checked: a table whose keys are names a chat template can
    read (not one of apply_chat_template's own arguments) and whose values are strings, numbers, booleans or
    arrays / tables of them -- what TOML gives and what the exported chat template can write as a literal."""
    if not isinstance(kwargs, dict):
        raise TpoError(f"expected a table, got {type(kwargs).__name__}", field="prompts.chat_template_kwargs")

    def check_value(v, where):
        if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
            raise TpoError("must be finite", field=where)
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                check_value(x, f"{where}[{i}]")
        elif isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise TpoError("table keys must be strings", field=where)
                check_value(x, f"{where}.{k}")
        elif not isinstance(v, (str, bool, int, float)):
            raise TpoError(f"expected a string, number, boolean, array or table, got {type(v).__name__}",
                           field=where)

    for key, value in kwargs.items():
        where = f"prompts.chat_template_kwargs.{key}"
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise TpoError("not a name a chat template can read (letters, digits, _)", field=where)
        if key in _RESERVED_KWARGS:
            raise TpoError("is set by tpo-lite itself, not a chat template variable", field=where)
        check_value(value, where)
    return kwargs


def check_tokenizer_keeps_markers(tokenizer, template: Template) -> None:
    """Refuse a template whose marker is a special token of ``tokenizer``: outputs are decoded without special
    tokens, so the marker would vanish from every output text and no output could be split."""
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for marker in (template.thought_header, template.response_marker):
        if marker and marker.strip() in special:
            raise TpoError(f"the tokenizer marks {marker.strip()!r} as a special token, which decoded outputs "
                           "drop, so no output could be split; use another template or a tokenizer where it is "
                           "a normal (added) token", field="prompts.template")


def build_prompt(tokenizer, instruction: str, template: Template | PromptConfig | str,
                 prefill_thought_header: bool = False, system_prompt: str | None = None,
                 chat_template_kwargs: dict | None = None) -> str:
    """The full prompt text for one instruction: the wrapped instruction through the model's chat template.

    ``template`` may be a :class:`Template`, a template name / file path, or a :class:`PromptConfig` (whose
    ``prefill_thought_header``, ``system_prompt`` and ``chat_template_kwargs`` are then used unless given
    here). The chat template is applied with ``add_generation_prompt=True`` and ``chat_template_kwargs`` as
    extra template variables; with ``prefill_thought_header`` the template's thought header
    is appended right after it (nothing more: ``think``'s header is ``<think>`` with its line end; the others
    end without whitespace, so the model picks its own next token). The result is
    meant to be tokenised with ``add_special_tokens=False`` since the chat template already added them.
    Special-token strings inside ``instruction`` (``<|im_end|>`` ...) are escaped
    (:func:`tpo_lite.special_tokens.escape_special_tokens`): the instruction cannot forge a chat turn, and the
    text still encodes to exactly the prompt's token ids.
    """
    if isinstance(template, PromptConfig):
        prefill_thought_header = prefill_thought_header or template.prefill_thought_header
        system_prompt = system_prompt if system_prompt is not None else template.system_prompt
        if chat_template_kwargs is None:
            chat_template_kwargs = template.chat_template_kwargs
        template = get_template(template)
    elif isinstance(template, str):
        template = get_template(template)
    if not isinstance(instruction, str) or not instruction.strip():
        raise TpoError("the instruction is empty", field="instruction")
    if not getattr(tokenizer, "chat_template", None):
        raise TpoError("the tokenizer has no chat template; use an instruct model or set one on the tokenizer",
                       field="model")
    check_tokenizer_keeps_markers(tokenizer, template)
    kwargs = check_chat_template_kwargs(dict(chat_template_kwargs or {}))
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    from .special_tokens import escape_special_tokens

    messages.append({"role": "user", "content": template.wrap(escape_special_tokens(instruction, tokenizer))})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    if prefill_thought_header and template.thought_header:
        prompt += template.thought_header
    return prompt
