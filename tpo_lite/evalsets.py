"""Eval sets: the three formats ``tpo-lite eval`` reads, and which one a file is.

* **AlpacaEval** -- a JSON list or JSONL of ``{"instruction", "output", "generator", "dataset"}``;
  ``dataset`` is used as the category, ``output`` (when present) as the baseline answer
  (:func:`read_alpaca_eval`);
* **Arena-Hard** -- question JSONL with ``uid`` (or ``question_id``) and ``prompt`` or ``turns`` /
  ``messages`` (the first user turn is the instruction), ``category`` optional; baseline answers in a
  separate JSONL keyed by ``uid`` with the text in ``output``, ``answer``, ``messages[-1].content`` or
  ``choices[0].turns[0].content`` (the usual places) (:func:`read_arena_hard`, :func:`read_arena_hard_answers`);
* **our instruction JSONL** -- ``{"id", "instruction", "category", "checks"}`` (see
  :mod:`tpo_lite.instructions`); ``checks`` feed the programmatic judge (:func:`read_instruction_set`).

Any of them can also come from a ``datasets`` source (a .parquet/.csv/.tsv/.arrow file, a ``save_to_disk``
directory or a Hub id, :func:`eval_records`; ``eval.eval_split``, and ``eval.instruction_column`` to rename the
instruction field). :func:`detect_format` guesses the format from the first record. A missing or empty category becomes
``"uncategorised"``. A bad record raises :class:`TpoError` naming the file, the line (1-based; for a JSON list,
the list index is given instead) and the field. :func:`tpo_lite.evaluate.load_eval_set` reads a set in any
format and attaches baseline answers.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import TpoError
from .jsonl import read_text_utf8

UNCATEGORISED = "uncategorised"
FORMATS = ("auto", "alpaca_eval", "arena_hard", "instructions")


@dataclass
class EvalItem:
    """One eval instruction. ``baseline`` is the baseline's answer text when the eval set carries one."""

    id: str
    instruction: str
    category: str = UNCATEGORISED
    checks: list = field(default_factory=list)
    baseline: str | None = None
    baseline_generator: str | None = None


def category_name(value: Any) -> str:
    """The category of a record's value: ``"uncategorised"`` when missing or empty."""
    if value is None:
        return UNCATEGORISED
    value = str(value).strip()
    return value or UNCATEGORISED


def read_json_or_jsonl(path: str) -> list[tuple[int | None, Any]]:
    """Records of a JSON list or a JSONL file as ``(line, record)``; line is None for a JSON list."""
    if not os.path.exists(path):
        raise TpoError("file not found", path=path)
    text = read_text_utf8(path)
    stripped = text.lstrip()
    if not stripped:
        raise TpoError("file is empty", path=path)
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TpoError(f"not valid JSON: {e.msg}", path=path, line=e.lineno) from None
        return [(None, rec) for rec in data]
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise TpoError(f"not valid JSON ({e.msg})", path=path, line=lineno) from None
    return out


def record_location(line: int | None, index: int) -> tuple[int | None, str]:
    """``(line, field prefix)`` of record ``index`` for an error: a JSON list has no cheap line number, so the
    list index goes into the field (``[3].``) instead."""
    return (line, "") if line is not None else (None, f"[{index}].")


def require_str(rec: Any, key: str, path: str, line: int | None, index: int, allow_empty: bool = False) -> str:
    """``rec[key]``, a (non-empty unless ``allow_empty``) string, or a :class:`TpoError` naming where."""
    lno, prefix = record_location(line, index)
    if not isinstance(rec, dict):
        raise TpoError(f"expected a JSON object, got {type(rec).__name__}", path=path, line=lno,
                       field=prefix.rstrip(".") or None)
    if key not in rec:
        raise TpoError("missing", path=path, line=lno, field=prefix + key)
    value = rec[key]
    if not isinstance(value, str):
        raise TpoError(f"expected a string, got {type(value).__name__}", path=path, line=lno, field=prefix + key)
    if not allow_empty and not value.strip():
        raise TpoError("empty", path=path, line=lno, field=prefix + key)
    return value


def read_alpaca_eval(path: str | os.PathLike, records: list | None = None) -> list[EvalItem]:
    """Read an AlpacaEval eval set / outputs file (JSON list or JSONL; or its ``records``, see
    :func:`eval_records`).

    Each record needs ``instruction``; ``output`` (optional) becomes the baseline answer, ``generator`` its
    name and ``dataset`` the category. Ids are ``alpaca-<index>`` in file order.
    """
    path = os.fspath(path)
    items = []
    for index, (line, rec) in enumerate(read_json_or_jsonl(path) if records is None else records):
        instruction = require_str(rec, "instruction", path, line, index)
        output = None
        if "output" in rec and rec["output"] is not None:
            output = require_str(rec, "output", path, line, index, allow_empty=True)
        gen = rec.get("generator")
        items.append(EvalItem(id=f"alpaca-{index:04d}", instruction=instruction,
                              category=category_name(rec.get("dataset")), baseline=output, baseline_generator=None if gen is None else str(gen)))
    return items


def _first_user_turn(rec: dict, path: str, line: int | None, index: int) -> str:
    lno, prefix = record_location(line, index)
    if isinstance(rec.get("prompt"), str):
        return require_str(rec, "prompt", path, line, index)
    for key in ("turns", "messages"):
        turns = rec.get(key)
        if turns is None:
            continue
        if not isinstance(turns, list) or not turns:
            raise TpoError("expected a non-empty list", path=path, line=lno, field=prefix + key)
        for t, turn in enumerate(turns):
            if isinstance(turn, str):
                text = turn
            elif isinstance(turn, dict) and turn.get("role", "user") == "user":
                text = turn.get("content")
            else:
                continue
            if not isinstance(text, str) or not text.strip():
                raise TpoError("expected non-empty text", path=path, line=lno, field=f"{prefix}{key}[{t}].content")
            return text
        raise TpoError("has no user turn", path=path, line=lno, field=prefix + key)
    raise TpoError("missing: needs 'prompt', 'turns' or 'messages'", path=path, line=lno, field=prefix + "prompt")


def read_arena_hard(questions_path: str | os.PathLike,
                    answers_path: str | os.PathLike | None = None, records: list | None = None) -> list[EvalItem]:
    """Read Arena-Hard questions (JSONL, ``uid``/``question_id`` + ``prompt`` or ``turns``/``messages``).

    Only the first user turn is used (single-turn evaluation). ``answers_path``, if given, is an answer JSONL
    keyed by the same uid (see :func:`read_arena_hard_answers`) and provides the baseline answers; every
    question must have one. ``records``: the questions already read (:func:`eval_records`).
    """
    questions_path = os.fspath(questions_path)
    items, seen = [], {}
    for index, (line, rec) in enumerate(read_json_or_jsonl(questions_path) if records is None else records):
        lno, prefix = record_location(line, index)
        if not isinstance(rec, dict):
            raise TpoError(f"expected a JSON object, got {type(rec).__name__}", path=questions_path, line=lno)
        uid = rec.get("uid", rec.get("question_id"))
        if uid is None or (isinstance(uid, str) and not uid.strip()):
            raise TpoError("missing (or 'question_id')", path=questions_path, line=lno, field=prefix + "uid")
        uid = str(uid)
        if uid in seen:
            raise TpoError(f"duplicate uid {uid!r} (first at line {seen[uid]})", path=questions_path, line=lno,
                           field=prefix + "uid")
        seen[uid] = line if line is not None else index
        items.append(EvalItem(id=uid, instruction=_first_user_turn(rec, questions_path, line, index),
                              category=category_name(rec.get("category", rec.get("cluster")))))
    if answers_path is not None:
        answers = read_arena_hard_answers(answers_path)
        missing = [it.id for it in items if it.id not in answers]
        if missing:
            raise TpoError(f"no baseline answer for {len(missing)} of {len(items)} questions (first: "
                           f"{', '.join(map(repr, missing[:3]))}) from {questions_path}", path=os.fspath(answers_path))
        for it in items:
            it.baseline, it.baseline_generator = answers[it.id]
    return items


def _answer_text(rec: dict) -> str | None:
    # The usual places an Arena-Hard / FastChat answer file keeps the text.
    if isinstance(rec.get("output"), str):
        return rec["output"]
    if isinstance(rec.get("answer"), str):
        return rec["answer"]
    msgs = rec.get("messages")
    if isinstance(msgs, list) and msgs:
        last = msgs[-1]
        content = last.get("content") if isinstance(last, dict) else None
        if isinstance(content, dict):  # arena-hard-auto v2: {"answer": ...}
            content = content.get("answer")
        if isinstance(content, str):
            return content
    choices = rec.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        turns = choices[0].get("turns")
        if isinstance(turns, list) and turns:
            t = turns[0]
            content = t.get("content") if isinstance(t, dict) else t
            if isinstance(content, str):
                return content
    return None


def read_arena_hard_answers(path: str | os.PathLike) -> dict[str, tuple[str, str | None]]:
    """Arena-Hard answer JSONL -> ``{uid: (answer text, model name)}``."""
    path = os.fspath(path)
    out: dict[str, tuple[str, str | None]] = {}
    for index, (line, rec) in enumerate(read_json_or_jsonl(path)):
        lno, prefix = record_location(line, index)
        if not isinstance(rec, dict):
            raise TpoError(f"expected a JSON object, got {type(rec).__name__}", path=path, line=lno)
        uid = rec.get("uid", rec.get("question_id"))
        if uid is None:
            raise TpoError("missing (or 'question_id')", path=path, line=lno, field=prefix + "uid")
        text = _answer_text(rec)
        if text is None:
            raise TpoError("no answer text (looked in output, answer, messages[-1].content, "
                           "choices[0].turns[0].content)", path=path, line=lno)
        if str(uid) in out:
            raise TpoError(f"duplicate uid {uid!r}", path=path, line=lno, field=prefix + "uid")
        model = rec.get("model", rec.get("model_id", rec.get("generator")))
        out[str(uid)] = (text, None if model is None else str(model))
    return out


def read_instruction_set(path: str | os.PathLike, records: list | None = None) -> list[EvalItem]:
    """Our instruction JSONL (``id``, ``instruction``, ``category``, ``checks``) via
    :func:`tpo_lite.instructions.load_instructions` (or its ``records``, the rows of a dataset)."""
    from pathlib import Path

    from .instructions import _instructions, load_instructions

    columns = {"id": "id", "instruction": "instruction", "category": "category"}
    loaded = (load_instructions(os.fspath(path)) if records is None
              else _instructions(records, Path(path), columns, rows=True))
    return [EvalItem(id=str(ins.id), instruction=ins.instruction, category=category_name(ins.category),
                     checks=list(ins.checks or [])) for ins in loaded]


def eval_records(source: str, split: str = "", instruction_column: str = "") -> list | None:
    """The records of a ``datasets`` source (a data file, a save_to_disk directory, a Hub id;
    :func:`tpo_lite.datasets_source.load_rows`) as ``(None, row)``, with field ``instruction_column`` (if set)
    renamed to ``instruction``; None for a JSON / JSONL file, which the readers read themselves. A renamed
    field is renamed in a JSON / JSONL file too (then its records are returned)."""
    from .datasets_source import is_native, load_rows

    if is_native(source):
        if not instruction_column or instruction_column == "instruction":
            return None
        records = read_json_or_jsonl(source)
    else:
        records = [(None, row) for row in load_rows(source, split, "eval.eval_set", "eval.eval_split")]
    if instruction_column and instruction_column != "instruction":
        records = [(line, _renamed(rec, instruction_column)) for line, rec in records]
    return records


def _renamed(rec: Any, column: str) -> Any:
    if not isinstance(rec, dict) or column not in rec:
        return rec
    rec = {k: v for k, v in rec.items() if k != "instruction"}
    rec["instruction"] = rec.pop(column)
    return rec


def detect_format(path: str | os.PathLike, records: list | None = None) -> str:
    """Guess the format from the first record's keys: ``uid``/``question_id``/``turns`` -> arena_hard, ``checks``
    or ``id`` -> instructions, else alpaca_eval."""
    recs = read_json_or_jsonl(os.fspath(path)) if records is None else records
    first = recs[0][1] if recs else {}
    if not isinstance(first, dict):
        raise TpoError(f"expected JSON objects, got {type(first).__name__}", path=os.fspath(path), line=recs[0][0])
    keys = set(first)
    if keys & {"uid", "question_id", "turns", "messages"} or ("prompt" in keys and "instruction" not in keys):
        return "arena_hard"
    if "checks" in keys or "id" in keys:
        return "instructions"
    return "alpaca_eval"


def resolve_eval_set(eval_set: str) -> str:
    """``'heldout'`` / ``'train'`` -> the embedded set's path; anything else is a path."""
    if eval_set in ("heldout", "train"):
        from .instructions import embedded_path

        return os.fspath(embedded_path(eval_set))
    return eval_set
