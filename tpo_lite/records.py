"""The typed records of an iteration's files: :class:`PromptSamples` (a ``samples.jsonl`` line, its samples are
:class:`tpo_lite.sampling.Sample`), :class:`Judgement` (``judgements.jsonl``) and :class:`Pair` (``pairs.jsonl``);
the schemas are in docs/ARCHITECTURE.md. ``to_record()`` gives the JSON object in the key order the files have
always had, so a resumed run writes the same bytes; ``from_record`` reads one back (keys the readers need are
checked by :func:`tpo_lite.jsonl.read_records`, ``rundir.RECORD_KEYS``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .sampling import Sample


class _Record:
    """A record dataclass whose fields are its file's keys, in order."""

    @classmethod
    def from_record(cls, rec: dict):
        """From the keys of ``rec`` that are fields (others ignored, absent ones take their default)."""
        return cls(**{f.name: rec[f.name] for f in dataclasses.fields(cls) if f.name in rec})

    def to_record(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PromptSamples(_Record):
    """One instruction's K sampled outputs (a ``samples.jsonl`` line)."""

    prompt_id: str
    instruction: str
    category: str
    checks: list
    prompt_text: str
    prompt_token_ids: list[int]
    samples: list[Sample]

    @classmethod
    def from_record(cls, rec: dict) -> PromptSamples:
        samples = [Sample.from_record({"index": i, **s}) for i, s in enumerate(rec["samples"])]
        return super().from_record({"category": "", "checks": [], **rec, "samples": samples})

    def to_record(self) -> dict:
        return {**dataclasses.asdict(self), "samples": [s.to_record() for s in self.samples]}


@dataclass
class Judgement(_Record):
    """The judge's scores of one instruction's samples (a ``judgements.jsonl`` line); a null score = an invalid
    sample, never chosen."""

    prompt_id: str
    judge: str
    scores: list[float | None]
    details: list

    @classmethod
    def from_record(cls, rec: dict) -> Judgement:
        return super().from_record({"judge": "", "details": [], **rec})


@dataclass
class Pair(_Record):
    """A best-vs-worst pair of whole outputs (a ``pairs.jsonl`` line, made by :func:`tpo_lite.pairs.select_pairs`)."""

    prompt_id: str
    prompt_text: str
    prompt_token_ids: list[int]
    chosen_index: int
    rejected_index: int
    chosen_text: str
    rejected_text: str
    chosen_token_ids: list[int]
    rejected_token_ids: list[int]
    chosen_score: float
    rejected_score: float | None
    chosen_adjusted: float
    rejected_adjusted: float | None
    rho: float
    rejected_valid: bool
    rejected_invalid_reason: str | None
    chosen_length: int
    rejected_length: int | None
    length_unit: str
