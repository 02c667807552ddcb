"""``option()``: one field of a config table, with the help text that is its only documentation."""

from __future__ import annotations

from dataclasses import MISSING, field
from typing import Any, Callable


def option(default: Any = MISSING, help: str = "", *, choices: tuple | None = None,
           factory: Callable[[], Any] | Any = MISSING):
    """A dataclass field of a config table. ``help`` is what ``tpo-lite run --list-options``, the resolved config
    and the CLI show; ``choices`` are the allowed values of an enum-like option (else a ``Literal`` type or none);
    ``factory`` makes a mutable default (``list``, ``dict``)."""
    metadata = {"help": help} if choices is None else {"choices": choices, "help": help}
    return field(default=default, default_factory=factory, metadata=metadata)
