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


SEED_MAX = 2**32 - 1


def require_seed(cfg, name: str = "seed") -> None:
    """Raise :class:`TpoError` unless option ``name`` of dataclass ``cfg`` is an integer in 0..:data:`SEED_MAX`.

    Outside that range torch.manual_seed overflows and numpy refuses negative seeds: deep inside a stage, as a
    traceback, after earlier stages did their work.
    """
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= SEED_MAX:
        raise TpoError(f"must be an integer between 0 and {SEED_MAX} (2**32 - 1), got {v!r}", field=name)


def require(cfg, checks) -> None:
    """Raise :class:`TpoError` ``"<message>, got <value>"`` naming the option of the first ``(option, ok,
    message)`` of ``checks`` whose ``ok`` is false: a config dataclass's range checks as one table."""
    for name, ok, message in checks:
        if not ok:
            raise TpoError(f"{message}, got {getattr(cfg, name)!r}", field=name)


# errno -> what the user can do about it; other OSErrors are bugs and keep their traceback
_DISK_FULL = ("no space left (the records finished so far are kept); free space and run the same command again "
              "to resume")
_NOT_PERMITTED = ("tpo-lite cannot write (or read) here; fix the permissions, or choose another run directory "
                  "(--run-dir, loop.runs_root)")
_USER_FIXABLE = {"ENOSPC": _DISK_FULL, "EDQUOT": _DISK_FULL, "EFBIG": _DISK_FULL,
                 "EACCES": _NOT_PERMITTED, "EPERM": _NOT_PERMITTED, "EROFS": _NOT_PERMITTED}


def os_error(e: OSError) -> TpoError | None:
    """The one-line :class:`TpoError` for an OSError the user can fix (disk full, no permission, read-only file
    system), naming the file when the error knows it; None for any other OSError."""
    import errno

    hint = _USER_FIXABLE.get(errno.errorcode.get(e.errno or 0, ""))
    if hint is None:
        return None
    return TpoError(f"{e.strerror or e}: {hint}", path=e.filename)
