"""The programmatic judge: scores a response by the instruction's verifiable checks (no model needed).

Score of a response to an instruction with ``n`` checks, ``k`` of them passed::

    score = (k + tie_weight * t) / n          t = mean near-miss closeness of the failed checks (0 if none)

Each failed check contributes its closeness in [0, 1) (e.g. 85 words against a limit of 80 gives 80/85;
see :mod:`tpo_lite.judges.checks`), so with ``tie_weight`` < 1 the tie-breaker can never lift a response
above one that passes more checks: ``score`` lies in ``[k/n, (k+1)/n)``, ordering responses first by the
number of checks passed and then by how near they came on the rest. All checks passed gives exactly 1.0.
Only the response is judged (the thought is never seen); a ``None`` response (invalid sample) gets ``None``.
"""
from __future__ import annotations

from typing import Any

from tpo_lite.errors import TpoError
from tpo_lite.judges.base import Capabilities, Judge, JudgeResult, fingerprint, instruction_checks, instruction_text
from tpo_lite.judges.checks import run_check, validate_check

# Bump when a check's semantics change, so cached judgements made with the old rules are not reused.
CHECKS_VERSION = 1


class ProgrammaticJudge(Judge):
    """Scores responses by the fraction of the instruction's checks they pass, plus a near-miss tie-breaker.

    ``tie_weight`` (in [0, 1)) scales the near-miss credit of failed checks; 0 gives the bare pass fraction.
    """

    name = "programmatic"
    capabilities = Capabilities(scores_absolute=True, compares_pairs=True, learned=False)

    def __init__(self, tie_weight: float = 0.25):
        if not 0.0 <= tie_weight < 1.0:
            raise TpoError(f"tie_weight must be in [0, 1), got {tie_weight}", field="judge.tie_weight")
        self.tie_weight = float(tie_weight)
        self.identity = fingerprint("programmatic", CHECKS_VERSION, self.tie_weight)

    def _checks(self, instruction: Any) -> list[dict]:
        checks = instruction_checks(instruction)
        if not checks:
            iid = (None if isinstance(instruction, str) else
                   instruction.get("id") if isinstance(instruction, dict) else instruction.id)
            raise TpoError("the programmatic judge needs verifiable checks, but this instruction has none "
                           f"(instruction {iid or instruction_text(instruction)[:60]!r}); use an instruction set "
                           "with 'checks' or another judge", field="checks")
        for i, c in enumerate(checks):
            validate_check(c, where=f"checks[{i}]")
        return list(checks)

    def score_one(self, checks: list[dict], response: str) -> tuple[float, dict]:
        """(score, details) of one response under already validated ``checks``."""
        results = [run_check(c, response) for c in checks]
        n = len(results)
        passed = sum(r["passed"] for r in results)
        failed = [r["partial"] for r in results if not r["passed"]]
        near = sum(failed) / len(failed) if failed else 0.0
        score = (passed + self.tie_weight * near) / n
        return score, {"passed": passed, "total": n, "near_miss": near, "checks": results}

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        """One score per response (``None`` for a ``None`` response); details list each check's verdict."""
        checks = self._checks(instruction)
        res = JudgeResult.unscored(responses)
        for i, r in enumerate(responses):
            if r is not None:
                res.scores[i], res.details[i] = self.score_one(checks, r)
        return res

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        """1.0 if ``response_a`` scores higher, 0.0 if lower, 0.5 on a tie."""
        a, b = self.score(instruction, [response_a, response_b]).scores
        return 0.5 if a == b else (1.0 if a > b else 0.0)
