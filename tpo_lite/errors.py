"""The one user-facing error type.

Bad input (config, JSONL, template, model path, ...) raises :class:`TpoError` naming where the problem is, so
the CLI can print a single line like ``runs/x/config.toml:12: train.learning_rate: expected a float, got "fast"`` and exit
with status 2 instead of showing a traceback.
"""
from __future__ import annotations

import os


class TpoError(Exception):
    """An input error with its location.

    Rendered as ``path:line: field: message``; parts that are unknown are left out
    (``path: message``, ``field: message``, ...).
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 field: str | None = None):
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        self.line = line
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        parts = []
        if self.path is not None:
            parts.append(self.path if self.line is None else f"{self.path}:{self.line}")
        elif self.line is not None:
            parts.append(f"line {self.line}")
        if self.field:
            parts.append(self.field)
        parts.append(self.message)
        return ": ".join(parts)

    def __str__(self) -> str:
        return self.render()


def require_finite(cfg) -> None:
    """Raise :class:`TpoError` naming the first float option of dataclass ``cfg`` that is inf or nan.

    The config dataclasses call this first in ``__post_init__``: TOML has ``inf`` and ``nan`` literals, and
    they slip through range checks written as comparisons (``inf > 0`` holds, ``nan < 0`` does not), so a
    ``learning_rate = inf`` would train a NaN adapter instead of failing.
    """
    import dataclasses
    import math

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise TpoError(f"must be a finite number, got {v!r}", field=f.name)
