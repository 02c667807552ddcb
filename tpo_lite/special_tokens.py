"""User text must never turn into control tokens.

A tokenizer reads the *string* ``<|im_end|>`` as its end-of-turn control token wherever it appears in the text
it encodes, so an instruction (or a response shown to a judge) containing it could close its own turn and
forge a system or assistant turn. :func:`escape_special_tokens` breaks every special-token string of the
tokenizer inside user text with an invisible U+2060 WORD JOINER (``<\u2060|im_end|>``): the text reads the same,
encodes as plain text, and text without such strings is left exactly as it was.

Why escape the text rather than tokenise the chat-template parts and the user text separately (with
``split_special_tokens=True`` for the user text)? The prompt stays one string whose encoding is its token ids:
the recorded ``prompt_text`` still encodes to the recorded ``prompt_token_ids``; ordinary prompts keep their
exact ids (encoding pieces separately changes the ids at every seam: SentencePiece adds a prefix space to each
piece, BPE cannot merge across a seam), so resumed runs and the exported chat template stay equal to what was
trained; and paths that only send text (an OpenAI-compatible server renders and encodes the text itself) are
covered by the same escape (:func:`escape_control_markup` when the server's tokenizer is unknown).
"""
from __future__ import annotations

import functools
import re

from .errors import TpoError

__all__ = ["JOINER", "escape_special_tokens", "escape_control_markup", "special_token_strings"]

JOINER = "\u2060"  # WORD JOINER: invisible, not whitespace, no line break


def special_token_strings(tokenizer) -> list[str]:
    """The texts a tokenizer reads as special tokens (longest first; single characters cannot be split)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    try:
        decoder = tokenizer.added_tokens_decoder
    except (AttributeError, NotImplementedError):
        decoder = {}
    for tok in decoder.values():
        if getattr(tok, "special", False):
            found.add(str(tok.content if hasattr(tok, "content") else tok))
    return sorted((s for s in found if len(s) >= 2), key=lambda s: (-len(s), s))


@functools.lru_cache(maxsize=64)
def _pattern(specials: tuple[str, ...]) -> re.Pattern:
    # Case-insensitive: a lower-casing tokenizer would read "<|IM_END|>" as the token too.
    return re.compile("|".join(re.escape(s) for s in specials), re.IGNORECASE)


def _reads_special(text: str, tokenizer) -> bool:
    """True if encoding ``text`` yields a special token (the ids differ from those of a plain-text encoding)."""
    try:
        plain = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # a tokenizer without split_special_tokens: the string escape has to do
        return False
    return tokenizer(text, add_special_tokens=False)["input_ids"] != plain


def escape_special_tokens(text: str, tokenizer, field: str = "instruction") -> str:
    """``text`` with every special-token string of ``tokenizer`` broken by :data:`JOINER`, so that it encodes
    as plain text. Text without special-token strings is returned unchanged.

    The result is checked by encoding it; should the tokenizer's normaliser remove the joiner, a space is
    used instead, and if that fails too a :class:`TpoError` (naming ``field``) is raised rather than feed
    the model a forged turn.
    """
    specials = special_token_strings(tokenizer)
    if not specials or not text:
        return text
    rx = _pattern(tuple(specials))
    out = rx.sub(lambda m: m.group(0)[0] + JOINER + m.group(0)[1:], text)
    if not _reads_special(out, tokenizer):
        return out
    spaced = rx.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)
    if not _reads_special(spaced, tokenizer):
        return spaced
    raise TpoError("contains text that the tokenizer reads as one of its control tokens and that cannot be "
                   "escaped; remove it", field=field)


# Control-token spellings of common chat formats, for text sent to a server whose tokenizer is unknown:
# ChatML / Llama 3 / Phi <|...|>, DeepSeek <｜...｜>, Llama 2 / Mistral <s> </s> [INST] [/INST], Gemma.
_MARKUP = re.compile(r"<\|[^\s<>|]{1,64}\|>|<｜[^<>｜]{1,64}｜>|</?s>|\[/?INST\]|<(?:start|end)_of_turn>"
                     r"|<(?:bos|eos|pad|unk)>", re.IGNORECASE)


def escape_control_markup(text: str) -> str:
    """``text`` with common chat-format control-token strings broken by :data:`JOINER` (for a remote judge)."""
    return _MARKUP.sub(lambda m: m.group(0)[0] + JOINER + m.group(0)[1:], text)
