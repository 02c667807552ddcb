"""The judge interface: score an instruction's responses, and (pairwise-capable judges) compare two.

A judge sees only the user's *original* instruction (``Instruction.instruction``, not the thought-wrapped
prompt) and the *responses*; thoughts are never passed to a judge. A response of ``None`` is an invalid
sample (no parseable response): its score is ``None`` and it is never sent to a model or a server.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import TpoError

__all__ = ["JudgeResult", "Judge", "PairwiseJudgeProtocol", "instruction_text", "instruction_checks",
           "fingerprint", "sigmoid"]


@dataclass
class JudgeResult:
    """Scores (higher is better; ``None`` for an invalid/absent response) and one details dict per response."""

    scores: list[float | None]
    details: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not self.details:
            self.details = [{} for _ in self.scores]
        if len(self.details) != len(self.scores):
            raise ValueError(f"JudgeResult: {len(self.scores)} scores but {len(self.details)} details")


@runtime_checkable
class Judge(Protocol):
    """What the loop needs from a judge."""

    name: str

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        """One score per response (``None`` where the response is ``None``)."""
        ...


@runtime_checkable
class PairwiseJudgeProtocol(Protocol):
    """What evaluation needs from a judge that can compare two responses."""

    name: str

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        """Probability that ``response_a`` is better than ``response_b`` (0.5 = tie)."""
        ...


def instruction_text(instruction: Any) -> str:
    """The original instruction text of an ``Instruction`` (``.instruction``), a dict or a plain string."""
    if isinstance(instruction, str):
        return instruction
    if isinstance(instruction, dict):
        if not isinstance(instruction.get("instruction"), str):
            raise TpoError(f"record {instruction.get('id', instruction.get('prompt_id'))!r} has no instruction "
                           "text", field="instruction")
        return instruction["instruction"]
    return str(instruction.instruction)


def instruction_checks(instruction: Any) -> Any:
    """The instruction's verifiable checks (or ``None``); part of a cache key since they change scores."""
    if isinstance(instruction, str):
        return None
    if isinstance(instruction, dict):
        return instruction.get("checks")
    return getattr(instruction, "checks", None)


def fingerprint(*parts: Any) -> str:
    """A stable SHA-256 hex digest of JSON-serialisable parts (used for judge identities and cache keys)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def sigmoid(x: float) -> float:
    """Stable logistic function for one float."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)
