"""The judge interface: score an instruction's responses, and (judges that declare it) compare two.

A judge sees only the user's *original* instruction (``Instruction.instruction``, not the thought-wrapped
prompt) and the *responses*; thoughts are never passed to a judge. A response of ``None`` is an invalid
sample (no parseable response): its score is ``None`` and it is never sent to a model or a server.

What a judge can do is declared by its class (:class:`Capabilities`), never guessed from its attributes.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import TpoError

__all__ = ["JudgeResult", "Judge", "Capabilities", "instruction_text", "instruction_checks", "fingerprint",
           "sigmoid"]


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

    @classmethod
    def unscored(cls, responses: list[str | None]) -> "JudgeResult":
        """The result a judge fills in: every score ``None``, details ``{"invalid": True}`` for a ``None``
        (invalid) response, else ``{}``."""
        return cls([None] * len(responses), [{"invalid": True} if r is None else {} for r in responses])


@dataclass(frozen=True)
class Capabilities:
    """What a judge can do; each judge class declares its own."""

    # score() of a response does not depend on the other responses of the call (a reward, the checks passed);
    # False: scores are relative within one call (Bradley-Terry), so compare responses, not scores.
    scores_absolute: bool
    # compare(instruction, a, b) gives P(a better than b).
    compares_pairs: bool
    # A learned proxy (a model) rather than the instruction's own verifiable checks: optimising it and then
    # evaluating with it measures reward hacking.
    learned: bool


class Judge:
    """Base of every judge: ``name``, the class's :attr:`capabilities`, :meth:`score` and, when
    ``capabilities.compares_pairs``, :meth:`compare`."""

    name: str
    capabilities: ClassVar[Capabilities]
    identity: str = ""  # cache identity: name + every setting that can change a score ("" = just the name)

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        """One score per response (``None`` where the response is ``None``)."""
        raise NotImplementedError

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        """Probability that ``response_a`` (shown first) is better than ``response_b`` (0.5 = tie)."""
        raise TpoError(f"judge {self.name} cannot compare two responses; use comparison = 'score'",
                       field="comparison")

    def escape(self, text: str, field: str = "response") -> str:
        """``text`` as the judge is shown it (a model judge escapes special-token strings); unchanged here."""
        return text


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
    return instruction.checks


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
