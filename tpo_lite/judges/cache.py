"""Judgement cache: nothing is judged twice, across restarts.

Entries live in one SQLite file (stdlib ``sqlite3``, WAL journal, a commit per batch) keyed by a SHA-256
content hash of *(judge identity, instruction text, instruction checks, response text(s))*. The judge
identity is the judge's ``name`` plus every config field that can change a score (model, prompt template,
dtype, ...), so a changed judge never reads a stale entry. A kill -9 loses at most the batch being written
(SQLite transactions are atomic); everything committed before is reused on the next run.

* Per-response judges (reward model, programmatic) are wrapped in :class:`CachedJudge`: one entry per
  (instruction, response), so a response that reappears (e.g. a duplicate sample) is scored once.
* The pairwise judge caches each *ordered* comparison (instruction, response A, response B) itself, since
  its per-sample scores depend on the whole group (Bradley-Terry); a crash mid-group keeps finished pairs.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from typing import Any, Iterable

from ..errors import TpoError
from .base import Capabilities, Judge, JudgeResult, fingerprint, instruction_checks, instruction_text

__all__ = ["JudgementCache", "CachedJudge", "cache_key"]

_FIELD = "judge.cache_path"


def cache_key(judge_id: str, instruction: Any, *responses: str) -> str:
    """Content hash of one judgement: judge identity, instruction text + checks, and the response(s)."""
    return fingerprint(judge_id, instruction_text(instruction), instruction_checks(instruction), list(responses))


def _sqlite_error(e: sqlite3.Error, path: str, doing: str) -> TpoError:
    """A one-line error that says what to do: only a damaged file is worth deleting, never a full disk."""
    code = getattr(e, "sqlite_errorcode", None)
    name = getattr(e, "sqlite_errorname", None) or type(e).__name__
    primary = code & 0xFF if isinstance(code, int) else None
    if primary in (10, 13):  # SQLITE_IOERR, SQLITE_FULL
        hint = "is the disk full? Free space and rerun; judgements already cached are kept"
    elif primary in (3, 8, 14):  # SQLITE_PERM, SQLITE_READONLY, SQLITE_CANTOPEN
        hint = "check that the file and its directory are writable"
    elif primary in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
        hint = "another process holds the cache; wait for it or give this run its own judge.cache_path"
    elif primary in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
        hint = "the file is damaged or not a SQLite database; delete it to start afresh (it only caches judgements)"
    else:
        hint = "see the SQLite error"
    return TpoError(f"cannot {doing} the judgement cache ({e}; {name}): {hint}", path=path, field=_FIELD)


class JudgementCache:
    """A persistent ``key -> JSON value`` store in a SQLite file (thread-safe; one writer at a time)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise TpoError(f"cannot create the judgement cache's directory: {e.strerror or e}", path=parent,
                           field=_FIELD) from None
        self._lock = threading.Lock()
        self._db = None
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._check_schema()  # before anything is written: a foreign database stays untouched
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()
        except (sqlite3.Error, TpoError) as e:
            if self._db is not None:
                self._db.close()
            if isinstance(e, TpoError):
                raise
            raise _sqlite_error(e, self.path, "open") from None
        self.hits = 0
        self.misses = 0

    def _check_schema(self) -> None:
        tables = [r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        foreign = sorted(t for t in tables if t != "judgements" and not t.startswith("sqlite_"))
        if foreign:
            raise TpoError(f"not a tpo-lite judgement cache (it holds the tables {', '.join(foreign)}); give the "
                           "cache a file of its own", path=self.path, field=_FIELD)
        if "judgements" in tables:
            cols = [r[1] for r in self._db.execute("PRAGMA table_info(judgements)")]
            if cols != ["key", "value"]:
                raise TpoError(f"not a tpo-lite judgement cache (its table 'judgements' has the columns "
                               f"{', '.join(cols)}, not key, value); give the cache a file of its own",
                               path=self.path, field=_FIELD)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached values of those ``keys`` that are present (missing keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with self._lock:
            try:
                for start in range(0, len(keys), 500):  # stay below SQLite's bound-parameter limit
                    chunk = keys[start:start + 500]
                    q = "SELECT key, value FROM judgements WHERE key IN (%s)" % ",".join("?" * len(chunk))
                    for k, v in self._db.execute(q, chunk):
                        found[k] = json.loads(v)
            except sqlite3.Error as e:
                raise _sqlite_error(e, self.path, "read") from None
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return found

    def get(self, key: str) -> Any | None:
        """The cached value of ``key`` or ``None``."""
        return self.get_many([key]).get(key)

    def put_many(self, items: dict[str, Any]) -> None:
        """Store ``key -> value`` (JSON-serialisable) entries in one atomic transaction."""
        if not items:
            return
        rows = [(k, json.dumps(v, ensure_ascii=False)) for k, v in items.items()]
        with self._lock:
            try:
                with self._db:  # commits, or rolls back on error
                    self._db.executemany("INSERT OR REPLACE INTO judgements (key, value) VALUES (?, ?)", rows)
            except sqlite3.Error as e:
                raise _sqlite_error(e, self.path, "write") from None

    def put(self, key: str, value: Any) -> None:
        """Store one entry."""
        self.put_many({key: value})

    def __len__(self) -> int:
        with self._lock:
            try:
                return int(self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0])
            except sqlite3.Error as e:
                raise _sqlite_error(e, self.path, "read") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedJudge(Judge):
    """Wraps a per-response judge (each score depends only on its own instruction and response), with the inner
    judge's capabilities.

    ``identity`` is the judge's cache identity (name + score-relevant config); it defaults to the inner
    judge's ``identity`` attribute or, without one, its ``name``. Only responses missing from the cache are
    sent to the inner judge, in one call, and stored as soon as it returns.
    """

    def __init__(self, inner: Judge, cache: JudgementCache, identity: str | None = None):
        if not inner.capabilities.scores_absolute:
            # a score that depends on the other responses of the call cannot be cached per response
            raise TpoError(f"judge {inner.name} scores responses relative to each other; it cannot be cached "
                           "per response")
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.identity = identity or inner.identity or inner.name

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        return self.inner.capabilities

    def _escaped(self, text: str, field: str = "response") -> bool:
        """True if the inner judge shows ``text`` escaped (it held special-token strings). Such a text gets keys
        of its own: an entry cached for the unescaped, forgeable text is never reused."""
        return self.inner.escape(text, field) != text

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        esc = self._escaped(instruction_text(instruction), "instruction")
        keys = [None if r is None else
                cache_key(self.identity + (":escaped" if esc or self._escaped(r) else ""), instruction, r)
                for r in responses]
        found = self.cache.get_many(k for k in keys if k is not None)
        todo = [i for i, k in enumerate(keys) if k is not None and k not in found]
        # Duplicate responses within a group are judged once.
        todo_unique = list(dict.fromkeys(keys[i] for i in todo))
        if todo_unique:
            first = {k: next(i for i in todo if keys[i] == k) for k in todo_unique}
            res = self.inner.score(instruction, [responses[first[k]] for k in todo_unique])
            new = {k: {"score": s, "details": d} for k, s, d in zip(todo_unique, res.scores, res.details)}
            self.cache.put_many(new)
            found.update(new)
        res = JudgeResult.unscored(responses)
        for i, k in enumerate(keys):
            if k is not None:
                res.scores[i], res.details[i] = found[k]["score"], found[k]["details"]
        return res

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        if not self.capabilities.compares_pairs:
            return self.inner.compare(instruction, response_a, response_b)  # the inner judge's refusal
        esc = (self._escaped(instruction_text(instruction), "instruction") or self._escaped(response_a)
               or self._escaped(response_b))
        key = cache_key(self.identity + ":compare" + (":escaped" if esc else ""), instruction, response_a,
                        response_b)
        hit = self.cache.get(key)
        if hit is not None:
            return float(hit)
        p = float(self.inner.compare(instruction, response_a, response_b))
        self.cache.put(key, p)
        return p

