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
from .base import JudgeResult, fingerprint, instruction_checks, instruction_text

__all__ = ["JudgementCache", "CachedJudge", "cache_key"]


def cache_key(judge_id: str, instruction: Any, *responses: str) -> str:
    """Content hash of one judgement: judge identity, instruction text + checks, and the response(s)."""
    return fingerprint(judge_id, instruction_text(instruction), instruction_checks(instruction), list(responses))


class JudgementCache:
    """A persistent ``key -> JSON value`` store in a SQLite file (thread-safe; one writer at a time)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()
        except sqlite3.DatabaseError as e:
            raise TpoError(f"cannot open the judgement cache ({e}); delete the file to start afresh",
                           path=self.path) from e
        self.hits = 0
        self.misses = 0

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """The cached values of those ``keys`` that are present (missing keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, Any] = {}
        with self._lock:
            for start in range(0, len(keys), 500):  # stay below SQLite's bound-parameter limit
                chunk = keys[start:start + 500]
                q = "SELECT key, value FROM judgements WHERE key IN (%s)" % ",".join("?" * len(chunk))
                for k, v in self._db.execute(q, chunk):
                    found[k] = json.loads(v)
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
            with self._db:  # commits, or rolls back on error
                self._db.executemany("INSERT OR REPLACE INTO judgements (key, value) VALUES (?, ?)", rows)

    def put(self, key: str, value: Any) -> None:
        """Store one entry."""
        self.put_many({key: value})

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedJudge:
    """Wraps a per-response judge (each score depends only on its own instruction and response).

    ``identity`` is the judge's cache identity (name + score-relevant config); it defaults to the inner
    judge's ``identity`` attribute or, failing that, its ``name``. Only responses missing from the cache are
    sent to the inner judge, in one call, and stored as soon as it returns.
    """

    def __new__(cls, inner: Any, cache: JudgementCache, identity: str | None = None):
        # Only a judge that can compare gets a (cached) compare(): hasattr(judge, "compare") stays truthful.
        if cls is CachedJudge and callable(getattr(inner, "compare", None)):
            cls = _CachedComparingJudge
        return super().__new__(cls)

    def __init__(self, inner: Any, cache: JudgementCache, identity: str | None = None):
        self.inner = inner
        self.cache = cache
        self.name = inner.name
        self.identity = identity or getattr(inner, "identity", None) or inner.name

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        keys = [None if r is None else cache_key(self.identity, instruction, r) for r in responses]
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
        scores: list[float | None] = []
        details: list[dict] = []
        for k in keys:
            if k is None:
                scores.append(None)
                details.append({"invalid": True})
            else:
                scores.append(found[k]["score"])
                details.append(found[k]["details"])
        return JudgeResult(scores, details)

    def __getattr__(self, item):
        # Anything else (e.g. a judge's kind or config) is the inner judge's; never its compare().
        if item in ("inner", "compare"):
            raise AttributeError(item)
        return getattr(self.inner, item)


class _CachedComparingJudge(CachedJudge):
    """A :class:`CachedJudge` whose inner judge can also compare two responses."""

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        key = cache_key(self.identity + ":compare", instruction, response_a, response_b)
        hit = self.cache.get(key)
        if hit is not None:
            return float(hit)
        p = float(self.inner.compare(instruction, response_a, response_b))
        self.cache.put(key, p)
        return p

