"""Preference pairs: per instruction, the best vs the worst *whole output* (thought + response).

For each instruction (one ``samples.jsonl`` record and its ``judgements.jsonl`` record, matched by
``prompt_id``):

1. A sample is *valid* when the parser found a response (``Sample.valid``) **and** the judge gave it a
   score (not null). Invalid samples are never chosen. An invalid sample is *cut off* when the token limit
   stopped it (``invalid_reason == "truncated"``) and a *parse failure* otherwise (no response marker, empty
   response).
2. Scores of the valid samples are length-controlled (:mod:`tpo_lite.scoring`):
   ``z(score) - rho * z(response length)``; ``rho`` fixed or ``auto`` (fitted once over the iteration, over
   the valid-vs-valid pairs).
3. chosen = highest adjusted valid sample; rejected = lowest adjusted valid sample. When that valid pair is
   not kept (one valid sample only, a raw-score tie, a gap not above ``min_gap``), a parse failure of the
   group may be the rejected one instead (the paper adds parse failures as rejected), but in at most a share
   ``max_invalid_rejected`` of the iteration's pairs: candidate groups are taken in a fixed order (fewest
   valid samples, then highest chosen raw score, then input order) while ``invalid pairs <= share * pairs``
   holds. A cut-off output is such a candidate only with ``truncated_as_rejected`` (an output cut by the
   token limit says nothing about its quality); the rejected one is the group's first parse failure, else its
   first cut-off output. With ``cut_off_rejected_length = "chosen"`` a cut-off rejected output keeps only as many
   of its tokens as the chosen output has: it was cut off *because* it is long, so whole it would also teach
   "shorter is better" (measured: such pairs carried the drift to short answers); cut to the chosen's length
   the pair contrasts an output that has finished with one that has not, at equal length.
4. A group that gets no pair is dropped, counted by reason: no valid sample (``dropped_all_invalid``), one
   valid sample (``dropped_one_valid``), chosen and worst valid tying on the raw score (``dropped_tie``), or a
   raw-score gap ``chosen - rejected`` not above ``min_gap`` (``dropped_low_gap``; this includes the rare
   pairs where length control would pick a chosen with a *lower* raw score, counted in ``inverted``).
   ``invalid_rejected_refused`` counts the dropped groups that had a candidate but found the share used up.

A pair record keeps the whole outputs and their sampled token ids (training uses those, never re-tokenised
text); :func:`to_trl` gives the TRL preference format ``{"prompt", "chosen", "rejected"}``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from .errors import TpoError, require, require_finite
from .records import Judgement, Pair, PromptSamples
from .sampling import Sample
from .scoring import LENGTH_UNITS, adjusted_scores, auto_rho, best_and_worst, response_length, rho_grid
from .stats import mean
from .options import option

__all__ = ["PairsConfig", "select_pairs", "to_trl"]


@dataclass
class PairsConfig:
    """The ``[pairs]`` table."""

    rho: float | str = option("auto",
        "Length-control strength: per instruction score' = z(score) - rho * z(response length) over its "
        "valid outputs. A number >= 0 (0 = no length control), or 'auto' = the smallest rho on a grid "
        "over [0, 0.5] that makes the chosen responses on average no longer than the rejected ones over "
        "the whole iteration (0.5 is used, and reported, if none does).")
    rho_grid_step: float = option(0.01, "Step of the rho = 'auto' search grid over [0, 0.5].")
    length_unit: Literal["words", "chars", "tokens"] = option("words",
        "Unit of the response length used by length control: 'words' (whitespace-separated, the "
        "default), 'chars', or 'tokens' (the policy tokenizer, without special tokens). The thought "
        "is never counted: only the response is judged.")
    min_gap: float = option(0.0,
        "Keep an instruction's pair only when the chosen raw score exceeds the rejected raw score by "
        "more than this (raw judge units; a rejected sample that is invalid always qualifies). 0 drops "
        "exact ties and pairs inverted by length control.")
    max_invalid_rejected: float = option(0.1,
        "Largest share of an iteration's pairs whose rejected output is invalid, in [0, 1]. An invalid "
        "output is the rejected one only in an instruction that has no kept valid-vs-valid pair (e.g. a "
        "single valid output), taking those with the fewest valid outputs, then the best chosen score, "
        "first; the others are dropped. 0 = rejected outputs are always valid (the paper keeps parse "
        "failures at <= 10% of the pairs).")
    truncated_as_rejected: bool = option(False,
        "Let an output cut off by the token limit (invalid_reason 'truncated') be the rejected one, "
        "within max_invalid_rejected. false = only parse failures (no response marker, empty "
        "response) may be rejected: a cut-off output is invalid for its length, not its content.")
    cut_off_rejected_length: Literal["whole", "chosen"] = option("whole",
        "How much of a cut-off rejected output (truncated_as_rejected) DPO sees: 'whole' = all its tokens; "
        "'chosen' = its first as many tokens as the chosen output has (text decoded from those), so the pair "
        "contrasts finishing with not finishing at equal length instead of also teaching 'shorter is "
        "better' (a cut-off output is always among the longest).")

    def __post_init__(self):
        require_finite(self)
        if isinstance(self.rho, str):
            if self.rho != "auto":
                try:
                    self.rho = float(self.rho)
                except ValueError:
                    raise TpoError(f"must be a number >= 0 or 'auto', got {self.rho!r}", field="rho") from None
        if not isinstance(self.rho, str) and (not math.isfinite(self.rho) or self.rho < 0):
            raise TpoError(f"must be a number >= 0 or 'auto', got {self.rho!r}", field="rho")
        require(self, [
            ("rho_grid_step", 0.0 < self.rho_grid_step <= 0.5, "must be in (0, 0.5]"),
            ("length_unit", self.length_unit in LENGTH_UNITS, f"must be one of {', '.join(LENGTH_UNITS)}"),
            ("min_gap", self.min_gap >= 0, "must be >= 0"),
            ("max_invalid_rejected", 0.0 <= self.max_invalid_rejected <= 1.0, "must be in [0, 1]"),
            ("cut_off_rejected_length", self.cut_off_rejected_length in ("whole", "chosen"),
             "must be 'whole' or 'chosen'"),
        ])

    @property
    def needs_tokenizer(self) -> bool:
        """Whether :func:`select_pairs` needs the policy tokenizer (token lengths, or decoding a cut rejected)."""
        cuts_rejected = self.truncated_as_rejected and self.cut_off_rejected_length == "chosen"
        return self.length_unit == "tokens" or cuts_rejected


def _keep(min_gap: float):
    def keep(scores: Sequence[float | None], c: int, r: int) -> bool:
        if c == r:
            return False
        if scores[r] is None:
            return True
        return scores[c] - scores[r] > min_gap
    return keep


def _is_cut_off(sample: Sample) -> bool:
    """Invalid because the token limit stopped it (the parser's ``invalid_reason == "truncated"``)."""
    return not sample.valid and sample.invalid_reason == "truncated"


def _is_parse_failure(sample: Sample) -> bool:
    """Invalid for its content (no response marker, empty response), not for being cut off."""
    return not sample.valid and sample.invalid_reason != "truncated"


def _group(rec: PromptSamples, jud: Judgement, where: str, judgements_path) -> list[float | None]:
    samples, scores = rec.samples, jud.scores
    if not isinstance(scores, list) or len(scores) != len(samples):
        n = len(scores) if isinstance(scores, list) else "no"
        raise TpoError(f"{n} scores for {len(samples)} samples", path=judgements_path, field=f"{where}.scores")
    out: list[float | None] = []
    for k, (s, sc) in enumerate(zip(samples, scores)):
        if sc is not None and (isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc)):
            raise TpoError(f"score {sc!r} is not a finite number or null", path=judgements_path,
                           field=f"{where}.scores[{k}]")
        # The judge's verdict on an unparseable output does not count: invalid is never chosen.
        out.append(float(sc) if (sc is not None and s.valid and s.response is not None) else None)
    return out


def select_pairs(sample_records: Sequence[PromptSamples], judgement_records: Sequence[Judgement],
                 cfg: PairsConfig | None = None, tokenizer: Any = None,
                 sources: tuple[str | os.PathLike, str | os.PathLike] | None = None) -> tuple[list[Pair], dict]:
    """Best-vs-worst pairs of one iteration (see the module docstring) and their statistics.

    ``sample_records`` are the ``samples.jsonl`` records, ``judgement_records`` the ``judgements.jsonl`` records
    (matched by ``prompt_id``; every sample record needs one); ``sources``: the paths of those two files, named
    in errors. ``tokenizer`` is needed only when ``cfg.needs_tokenizer``. Returns ``(pairs, stats)``: the
    pairs in input order, and a JSON-ready stats dict (counts of kept/dropped groups, invalid rejected outputs
    by kind, rho, mean lengths/scores).
    """
    cfg = cfg or PairsConfig()
    if cfg.needs_tokenizer and tokenizer is None:
        field = "length_unit" if cfg.length_unit == "tokens" else "cut_off_rejected_length"
        raise TpoError(f"pairs.{field} = {getattr(cfg, field)!r} needs the policy tokenizer; pass tokenizer=",
                       field=f"pairs.{field}")
    jpath = sources[1] if sources else None
    by_id: dict[str, Judgement] = {}
    for j in judgement_records:
        if j.prompt_id in by_id:
            raise TpoError(f"duplicate judgement for prompt_id {j.prompt_id!r}", path=jpath, field="prompt_id")
        by_id[j.prompt_id] = j
    groups = []
    seen = set()
    for rec in sample_records:
        pid = rec.prompt_id
        if pid not in by_id:
            raise TpoError(f"no judgement for prompt_id {pid!r}; judge every sampled instruction first",
                           path=jpath, field="prompt_id")
        seen.add(pid)
        scores = _group(rec, by_id[pid], f"prompt_id={pid}", jpath)
        lengths = [response_length(s.response, cfg.length_unit, tokenizer) if sc is not None else 0
                   for s, sc in zip(rec.samples, scores)]
        groups.append((rec, scores, lengths))
    extra = sorted(set(by_id) - seen, key=str)
    if extra:
        raise TpoError(f"judgement for prompt_id {extra[0]!r} has no sample record ({len(extra)} such)",
                       path=jpath, field="prompt_id")

    keep = _keep(cfg.min_gap)
    rho_auto = cfg.rho == "auto"
    satisfied = None
    if rho_auto:
        rho, satisfied = auto_rho([(s, l) for _, s, l in groups], keep=keep, grid=rho_grid(cfg.rho_grid_step))
    else:
        rho = float(cfg.rho)

    stats: dict[str, Any] = {"groups": len(groups), "pairs": 0, "dropped_all_invalid": 0, "dropped_one_valid": 0,
                             "dropped_tie": 0, "dropped_low_gap": 0, "inverted": 0, "rejected_invalid": 0,
                             "rejected_parse_failure": 0, "rejected_truncated": 0, "invalid_rejected_refused": 0,
                             "max_invalid_rejected": cfg.max_invalid_rejected,
                             "truncated_as_rejected": cfg.truncated_as_rejected,
                             "cut_off_rejected_length": cfg.cut_off_rejected_length, "rejected_cut_to_chosen": 0,
                             "samples": sum(len(s) for _, s, _ in groups),
                             "valid_samples": sum(x is not None for _, s, _ in groups for x in s),
                             "truncated_samples": sum(_is_cut_off(x) for r, _, _ in groups for x in r.samples),
                             "parse_failure_samples": sum(_is_parse_failure(x) for r, _, _ in groups
                                                          for x in r.samples),
                             "rho": rho, "rho_auto": rho_auto, "rho_auto_satisfied": satisfied,
                             "length_unit": cfg.length_unit}
    chosen_pairs: dict[int, tuple[int, int, list[float | None]]] = {}  # group -> (chosen, rejected, adjusted)
    candidates = []  # groups without a kept valid pair that have an invalid output allowed as rejected
    for g, (rec, scores, lengths) in enumerate(groups):
        adj = adjusted_scores(scores, lengths, rho)
        bw = best_and_worst(adj)
        if bw is None:
            stats["dropped_all_invalid"] += 1
            continue
        c, r = bw
        n_valid = sum(x is not None for x in scores)
        if n_valid == 1:
            reason = "dropped_one_valid"
        elif c == r or scores[c] == scores[r]:
            reason = "dropped_tie"
        elif not keep(scores, c, r):
            reason = "dropped_low_gap"
        else:
            chosen_pairs[g] = (c, r, adj)
            continue
        ss = rec.samples
        allowed = [i for i, x in enumerate(ss) if _is_parse_failure(x)]
        if cfg.truncated_as_rejected:
            allowed += [i for i, x in enumerate(ss) if _is_cut_off(x)]
        if allowed:
            candidates.append((n_valid, -scores[c], g, c, allowed[0], adj, reason, scores[c] < scores[r]))
            continue
        stats[reason] += 1
        stats["inverted"] += int(reason == "dropped_low_gap" and scores[c] < scores[r])
    # Invalid rejected outputs, at most a share of all pairs: the groups with the fewest valid outputs (which
    # have the least else to learn from), then the best chosen score, first.
    n_invalid = 0
    for _, _, g, c, r, adj, reason, inverted in sorted(candidates, key=lambda x: x[:3]):
        if n_invalid + 1 <= cfg.max_invalid_rejected * (len(chosen_pairs) + 1) + 1e-9:
            chosen_pairs[g] = (c, r, adj)
            n_invalid += 1
        else:
            stats[reason] += 1
            stats["invalid_rejected_refused"] += 1
            stats["inverted"] += int(reason == "dropped_low_gap" and inverted)
    pairs: list[Pair] = []
    for g in sorted(chosen_pairs):
        rec, scores, lengths = groups[g]
        c, r, adj = chosen_pairs[g]
        sc, sr = rec.samples[c], rec.samples[r]
        rejected_valid = scores[r] is not None
        rejected_text, rejected_ids = sr.text, sr.token_ids
        if (_is_cut_off(sr) and cfg.cut_off_rejected_length == "chosen"
                and len(rejected_ids) > len(sc.token_ids) > 0):
            rejected_ids = list(rejected_ids[:len(sc.token_ids)])
            rejected_text = tokenizer.decode(rejected_ids, skip_special_tokens=True)
            stats["rejected_cut_to_chosen"] += 1
        pairs.append(Pair(
            prompt_id=rec.prompt_id, prompt_text=rec.prompt_text, prompt_token_ids=rec.prompt_token_ids,
            chosen_index=c, rejected_index=r, chosen_text=sc.text, rejected_text=rejected_text,
            chosen_token_ids=sc.token_ids, rejected_token_ids=rejected_ids,
            chosen_score=scores[c], rejected_score=scores[r], chosen_adjusted=adj[c], rejected_adjusted=adj[r],
            rho=rho, rejected_valid=rejected_valid,
            rejected_invalid_reason=None if rejected_valid else (sr.invalid_reason or "invalid"),
            chosen_length=lengths[c], rejected_length=lengths[r] if rejected_valid else None,
            length_unit=cfg.length_unit))
        if not rejected_valid:
            stats["rejected_invalid"] += 1
            stats["rejected_truncated" if _is_cut_off(sr) else "rejected_parse_failure"] += 1
    stats["pairs"] = len(pairs)
    stats["valid_rate"] = stats["valid_samples"] / stats["samples"] if stats["samples"] else None

    both_valid = [p for p in pairs if p.rejected_valid]
    stats["chosen_length_mean"] = mean(p.chosen_length for p in pairs)
    # Length means over pairs with two valid responses, the set rho = auto balances.
    stats["chosen_length_mean_both_valid"] = mean(p.chosen_length for p in both_valid)
    stats["rejected_length_mean"] = mean(p.rejected_length for p in both_valid)
    stats["chosen_score_mean"] = mean(p.chosen_score for p in pairs)
    stats["rejected_score_mean"] = mean(p.rejected_score for p in pairs)
    return pairs, stats


def to_trl(pair: Pair) -> dict:
    """The TRL preference record of a pair: ``{"prompt", "chosen", "rejected"}`` (prompt = the chat-templated
    prompt text; chosen/rejected = the whole outputs, thought + response)."""
    return {"prompt": pair.prompt_text, "chosen": pair.chosen_text, "rejected": pair.rejected_text}
