"""Length control (scoring.py) and best-vs-worst pair selection (pairs.py)."""
from dataclasses import fields

import numpy as np
import pytest

from tpo_lite.errors import TpoError
from tpo_lite.pairs import PairsConfig, select_pairs, to_trl
from tpo_lite.records import Judgement, PromptSamples
from tpo_lite.scoring import adjusted_scores, auto_rho, best_and_worst, response_length, rho_grid, zscores


def _sample(i, response, valid=True):
    text = f"Here is my thought process: t{i}\nHere is my response: {response}" if valid else f"garbled {i}"
    return {"index": i, "seed": 100 + i, "text": text, "token_ids": [i, i + 1, i + 2],
            "thought": f"t{i}" if valid else None, "response": response if valid else None,
            "valid": valid, "invalid_reason": None if valid else "no response marker",
            "finish_reason": "eos", "forced": False}


def _record(pid, responses, valid=None):
    return PromptSamples.from_record(_record_dict(pid, responses, valid))


def _record_dict(pid, responses, valid=None):
    valid = valid or [True] * len(responses)
    return {"prompt_id": pid, "instruction": "Do it.", "category": "c", "checks": [],
            "prompt_text": f"<prompt {pid}>", "prompt_token_ids": [7, 8, 9],
            "samples": [_sample(i, r, v) for i, (r, v) in enumerate(zip(responses, valid))]}


def _judgement(pid, scores):
    return Judgement(pid, "test", scores, [{} for _ in scores])


def _words(n):
    return " ".join(["w"] * n)


# --------------------------------------------------------------------------------------------------- scoring
def test_zscores_population_std_and_zero_spread():
    np.testing.assert_allclose(zscores([1.0, 2.0, 3.0]), [-np.sqrt(1.5), 0.0, np.sqrt(1.5)])
    np.testing.assert_array_equal(zscores([4.0, 4.0, 4.0]), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(zscores([0.1 + 0.2, 0.3, 0.3]), [0.0, 0.0, 0.0])  # rounding-level spread


def test_adjusted_scores_match_float64_formula_over_valid_only():
    scores = [0.9, None, 0.1, 0.5]
    lengths = [30, 999, 10, 20]
    rho = 0.3
    got = adjusted_scores(scores, lengths, rho)
    s = np.array([0.9, 0.1, 0.5])
    ln = np.array([30.0, 10.0, 20.0])  # the invalid sample's length does not enter the statistics
    ref = (s - s.mean()) / s.std() - rho * (ln - ln.mean()) / ln.std()
    assert got[1] is None
    np.testing.assert_allclose([got[0], got[2], got[3]], ref, rtol=0, atol=1e-12)
    assert adjusted_scores([None, None], [1, 2], 0.2) == [None, None]
    assert adjusted_scores([5.0], [3], 0.2) == [0.0]


def test_best_and_worst():
    assert best_and_worst([0.5, None, -1.0, None]) == (0, 2)  # invalid samples are skipped
    assert best_and_worst([1.0, 1.0, 0.0, 0.0]) == (0, 2)  # ties: lower index
    assert best_and_worst([None, None]) is None
    assert best_and_worst([0.0]) == (0, 0)


def test_response_length_units():
    r = "Hello  there, world!\n"
    assert response_length(r) == 3
    assert response_length(r, "chars") == len(r)

    class Tok:
        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return list(text.replace(" ", ""))

    assert response_length("ab c", "tokens", Tok()) == 3
    assert response_length(None) == 0
    with pytest.raises(ValueError, match="tokenizer"):
        response_length("x", "tokens")
    with pytest.raises(ValueError, match="unknown length unit"):
        response_length("x", "bytes")


def test_rho_grid():
    g = rho_grid(0.1)
    np.testing.assert_allclose(g, [0, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert len(rho_grid()) == 51


def _chosen_rejected_mean_lengths(groups, rho):
    c_len, r_len = [], []
    for scores, lengths in groups:
        c, r = best_and_worst(adjusted_scores(scores, lengths, rho))
        if scores[r] is not None and scores[c] != scores[r]:
            c_len.append(lengths[c])
            r_len.append(lengths[r])
    return np.mean(c_len), np.mean(r_len)


def test_auto_rho_is_the_smallest_grid_value_that_balances_lengths():
    rng = np.random.default_rng(0)
    groups = []
    for _ in range(40):
        lengths = rng.integers(5, 200, size=6).astype(float)
        # A length-loving judge: score rises with length plus noise.
        scores = list(lengths / 200 + rng.normal(0, 1.0, size=6))
        groups.append((scores, list(lengths)))
    keep = lambda s, c, r: c != r and (s[r] is None or s[c] > s[r])  # noqa: E731
    rho, ok = auto_rho(groups, keep=keep)
    assert ok and 0 < rho <= 0.5
    c, r = _chosen_rejected_mean_lengths(groups, rho)
    assert c <= r
    c0, r0 = _chosen_rejected_mean_lengths(groups, round(rho - 0.01, 10))
    assert c0 > r0  # one grid step less is not enough: rho is the smallest
    c_raw, r_raw = _chosen_rejected_mean_lengths(groups, 0.0)
    assert c_raw > r_raw  # without control the chosen are longer


def test_auto_rho_unsatisfiable_and_trivial():
    # Longer is always much better and the length spread is tiny compared to the score gap: no rho <= 0.5
    # can flip it.
    groups = [([0.0, 10.0, 0.1], [10, 11, 10.5])] * 3
    assert auto_rho(groups) == (0.5, False)
    # No group with two valid samples: nothing to balance.
    assert auto_rho([([1.0, None], [3, 0])]) == (0.0, True)


# ----------------------------------------------------------------------------------------------------- pairs
def test_select_pairs_invalid_is_rejected_and_record_schema():
    recs = [_record("p1", ["best answer here", "xx", "ok answer", "worst"], valid=[True, False, True, True])]
    juds = [_judgement("p1", [3.0, None, 2.0, 1.0])]
    # A valid-vs-valid pair exists: the rejected output is the worst valid one, whatever the share.
    (p,), stats = select_pairs(recs, juds, PairsConfig(rho=0.0, max_invalid_rejected=1.0))
    assert (p.chosen_index, p.rejected_index) == (0, 3) and p.rejected_valid is True
    assert p.rejected_invalid_reason is None and stats["rejected_invalid"] == 0
    assert p.chosen_adjusted == pytest.approx(np.sqrt(1.5))
    # Only one valid output: the parse failure is the rejected one (a share of 1 allows it).
    for s in recs[0].samples[2:]:
        s.valid, s.invalid_reason = False, "no_response_marker"
    pairs, stats = select_pairs(recs, juds, PairsConfig(rho=0.0, max_invalid_rejected=1.0))
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.chosen_index, p.rejected_index) == (0, 1)
    assert p.chosen_text == recs[0].samples[0].text  # the whole output: thought + response
    assert "thought process" in p.chosen_text and p.rejected_text == "garbled 1"
    assert p.chosen_token_ids == [0, 1, 2] and p.rejected_token_ids == [1, 2, 3]
    assert p.prompt_text == "<prompt p1>" and p.prompt_token_ids == [7, 8, 9]
    assert p.chosen_score == 3.0 and p.rejected_score is None and p.rejected_adjusted is None
    assert p.chosen_adjusted == 0.0  # z over the one valid output
    assert p.rho == 0.0 and p.rejected_valid is False
    assert p.rejected_invalid_reason == "no response marker"
    for key in ("prompt_id", "prompt_text", "prompt_token_ids", "chosen_index", "rejected_index", "chosen_text",
                "rejected_text", "chosen_token_ids", "rejected_token_ids", "chosen_score", "rejected_score",
                "chosen_adjusted", "rejected_adjusted", "rho"):
        assert key in p.to_record()
    assert stats["rejected_invalid"] == 1 == stats["rejected_parse_failure"] and stats["pairs"] == 1
    assert stats["samples"] == 4 and stats["valid_samples"] == 1 and stats["valid_rate"] == 0.25
    assert to_trl(p) == {"prompt": "<prompt p1>", "chosen": p.chosen_text, "rejected": "garbled 1"}


def test_select_pairs_drop_rules_and_counts():
    recs = [
        _record("all_invalid", ["a", "b"], valid=[False, False]),
        _record("tie", ["a", "b b", "c"]),
        _record("single", ["a"]),
        _record("small_gap", ["a", "b"]),
        _record("kept", ["a", "b"]),
        _record("one_valid_one_invalid", ["a", "b"], valid=[True, False]),
    ]
    juds = [
        _judgement("all_invalid", [None, None]),
        _judgement("tie", [0.5, 0.5, 0.5]),
        _judgement("single", [1.0]),
        _judgement("small_gap", [1.0, 1.05]),
        _judgement("kept", [1.0, 2.0]),
        _judgement("one_valid_one_invalid", [0.2, None]),
    ]
    pairs, stats = select_pairs(recs, juds, PairsConfig(rho=0.0, min_gap=0.1, max_invalid_rejected=1.0))
    assert [p.prompt_id for p in pairs] == ["kept", "one_valid_one_invalid"]
    assert (stats["dropped_all_invalid"], stats["dropped_one_valid"], stats["dropped_tie"],
            stats["dropped_low_gap"]) == (1, 1, 1, 1)
    assert stats["groups"] == 6 and stats["pairs"] == 2 and stats["rejected_invalid"] == 1
    kept = pairs[0]
    assert (kept.chosen_index, kept.rejected_index) == (1, 0)


def test_invalid_sample_with_a_score_is_still_invalid():
    recs = [_record("p", ["a", "b", "c"], valid=[True, False, True])]
    juds = [_judgement("p", [0.1, 99.0, 0.5])]  # a judge that scored the unparseable output anyway
    pairs, _ = select_pairs(recs, juds, PairsConfig(rho=0.0))
    assert (pairs[0].chosen_index, pairs[0].rejected_index) == (2, 0)


def test_length_control_prefers_short_among_equals():
    recs = [_record("p", [_words(50), _words(5), _words(10), _words(60)])]
    juds = [_judgement("p", [1.0, 1.0, 0.0, 0.0])]
    (p0,), _ = select_pairs(recs, juds, PairsConfig(rho=0.0))
    assert (p0.chosen_index, p0.rejected_index) == (0, 2)  # no control: ties by index
    (p1,), s1 = select_pairs(recs, juds, PairsConfig(rho=0.1))
    assert (p1.chosen_index, p1.rejected_index) == (1, 3)  # short good chosen, long bad rejected
    assert (p1.chosen_length, p1.rejected_length) == (5, 60)
    assert s1["chosen_length_mean"] == 5 and s1["rejected_length_mean"] == 60
    # chars unit gives the same order here; the recorded unit follows the config
    (p2,), _ = select_pairs(recs, juds, PairsConfig(rho=0.1, length_unit="chars"))
    assert p2.length_unit == "chars" and p2.chosen_length == len(_words(5))


def test_rho_auto_over_the_iteration():
    rng = np.random.default_rng(3)
    recs, juds = [], []
    for k in range(30):
        n = rng.integers(3, 80, size=4)
        scores = list(n / 120 + rng.normal(0, 0.7, size=4))
        recs.append(_record(f"p{k}", [_words(int(x)) for x in n]))
        juds.append(_judgement(f"p{k}", scores))
    pairs, stats = select_pairs(recs, juds, PairsConfig(rho="auto"))
    assert stats["rho_auto"] is True and stats["rho_auto_satisfied"] is True
    assert 0.0 < stats["rho"] <= 0.5
    assert stats["chosen_length_mean_both_valid"] <= stats["rejected_length_mean"]
    assert all(p.rho == stats["rho"] for p in pairs)
    _, s0 = select_pairs(recs, juds, PairsConfig(rho=0.0))
    assert s0["chosen_length_mean_both_valid"] > s0["rejected_length_mean"]
    # The smallest: one grid step less leaves the chosen longer.
    _, sm = select_pairs(recs, juds, PairsConfig(rho=round(stats["rho"] - 0.01, 10)))
    assert sm["chosen_length_mean_both_valid"] > sm["rejected_length_mean"]


def test_tokens_unit_needs_tokenizer():
    recs = [_record("p", ["a b", "c"])]
    juds = [_judgement("p", [1.0, 0.0])]
    with pytest.raises(TpoError, match="tokenizer"):
        select_pairs(recs, juds, PairsConfig(length_unit="tokens"))

    class Tok:
        def encode(self, text, add_special_tokens=True):
            return text.split()

    (p,), _ = select_pairs(recs, juds, PairsConfig(length_unit="tokens", rho=0.2), tokenizer=Tok())
    assert p.chosen_length == 2


@pytest.mark.parametrize("juds, match", [
    ([], "no judgement for prompt_id 'p'"),
    ([_judgement("p", [1.0])], "1 scores for 2 samples"),
    ([_judgement("p", [1.0, "high"])], r"prompt_id=p\.scores\[1\]: score 'high'"),
    ([_judgement("p", [1.0, float("nan")])], "not a finite number"),
    ([_judgement("p", [1.0, 0.0]), _judgement("p", [1.0, 0.0])], "duplicate judgement"),
    ([_judgement("p", [1.0, 0.0]), _judgement("q", [1.0])], "'q' has no sample record"),
])
def test_select_pairs_bad_input(juds, match):
    with pytest.raises(TpoError, match=match):
        select_pairs([_record("p", ["a", "b"])], juds, PairsConfig())


def test_pairs_config_validation_and_help():
    assert PairsConfig().rho == "auto"
    assert PairsConfig(rho="0.25").rho == 0.25
    for bad in ({"rho": -0.1}, {"rho": "sometimes"}, {"length_unit": "bytes"}, {"min_gap": -1.0},
                {"rho_grid_step": 0.0}, {"max_invalid_rejected": 1.5}, {"max_invalid_rejected": -0.1}):
        with pytest.raises(TpoError):
            PairsConfig(**bad)
    for f in fields(PairsConfig):
        assert f.metadata.get("help"), f.name


# ------------------------------------------------------------------------- invalid outputs as the rejected one
def _mixed_record(pid, kinds, responses=None):
    """kinds: per sample 'v' (valid), 't' (cut off by the token limit) or 'p' (parse failure: no marker)."""
    responses = responses or [f"r{i}" for i in range(len(kinds))]
    rec = _record_dict(pid, responses, valid=[k == "v" for k in kinds])
    for s, k in zip(rec["samples"], kinds):
        if k == "t":
            s.update(invalid_reason="truncated", finish_reason="length")
        elif k == "p":
            s.update(invalid_reason="no_response_marker")
    return PromptSamples.from_record(rec)


def test_truncated_output_is_never_rejected_by_default():
    recs = [_mixed_record("two_valid", "vtv"), _mixed_record("one_valid", "tv")]
    juds = [_judgement("two_valid", [1.0, None, 0.0]), _judgement("one_valid", [None, 1.0])]
    pairs, stats = select_pairs(recs, juds, PairsConfig(rho=0.0, max_invalid_rejected=1.0))
    assert [(p.prompt_id, p.chosen_index, p.rejected_index) for p in pairs] == [("two_valid", 0, 2)]
    assert pairs[0].rejected_valid is True
    assert stats["dropped_one_valid"] == 1 and stats["rejected_invalid"] == 0
    assert stats["truncated_samples"] == 2 and stats["parse_failure_samples"] == 0
    # Asked for: a cut-off output may be the rejected one too (within the share).
    pairs, stats = select_pairs(recs, juds, PairsConfig(rho=0.0, max_invalid_rejected=1.0,
                                                        truncated_as_rejected=True))
    assert [(p.prompt_id, p.rejected_index) for p in pairs] == [("two_valid", 2), ("one_valid", 0)]
    assert pairs[1].rejected_valid is False and pairs[1].rejected_invalid_reason == "truncated"
    assert stats["rejected_truncated"] == 1 and stats["rejected_parse_failure"] == 0


def test_parse_failures_as_rejected_are_capped_by_share():
    recs, juds = [], []
    for k in range(18):  # groups with a valid-vs-valid pair: their rejected output stays the worst valid one
        recs.append(_mixed_record(f"ok{k}", "vpv"))
        juds.append(_judgement(f"ok{k}", [1.0, None, 0.0]))
    # Groups with a single valid output and a parse failure: kept only with the parse failure as rejected.
    for k, (kinds, best) in enumerate([("vp", 0.2), ("pvp", 0.9), ("vpt", 0.5), ("vtp", 0.7)]):
        recs.append(_mixed_record(f"one{k}", kinds))
        juds.append(_judgement(f"one{k}", [best if c == "v" else None for c in kinds]))
    pairs, stats = select_pairs(recs, juds, PairsConfig(rho=0.0))  # default share 0.1
    assert PairsConfig().max_invalid_rejected == 0.1 and PairsConfig().truncated_as_rejected is False
    invalid = [p for p in pairs if not p.rejected_valid]
    # 18 valid pairs + n <= 0.1 * (18 + n) -> n = 2: the groups with the best chosen scores (0.9, 0.7)
    assert [(p.prompt_id, p.rejected_index) for p in invalid] == [("one1", 0), ("one3", 2)]
    assert all(p.rejected_invalid_reason == "no_response_marker" for p in invalid)
    assert all(p.rejected_index == 2 for p in pairs if p.prompt_id.startswith("ok"))
    assert stats["pairs"] == 20 and stats["rejected_parse_failure"] == 2 == stats["rejected_invalid"]
    assert stats["dropped_one_valid"] == 2 and stats["invalid_rejected_refused"] == 2
    assert stats["rejected_parse_failure"] <= 0.1 * stats["pairs"]
    # share 0: never; share 1: every group without a valid pair gets its parse failure
    _, s0 = select_pairs(recs, juds, PairsConfig(rho=0.0, max_invalid_rejected=0.0))
    assert s0["rejected_invalid"] == 0 and s0["pairs"] == 18 and s0["dropped_one_valid"] == 4
    p1, s1 = select_pairs(recs, juds, PairsConfig(rho=0.0, max_invalid_rejected=1.0))
    assert s1["rejected_parse_failure"] == 4 and s1["pairs"] == 22
    # fewest valid outputs first: a tied two-valid group is rescued only after the one-valid groups
    recs2 = recs + [_mixed_record("tie", "vvp")]
    juds2 = juds + [_judgement("tie", [0.5, 0.5, None])]
    _, s2 = select_pairs(recs2, juds2, PairsConfig(rho=0.0, max_invalid_rejected=4 / 22))
    assert s2["rejected_parse_failure"] == 4 and s2["dropped_tie"] == 1 and s2["dropped_one_valid"] == 0


class _IdsTokenizer:
    """decode = the ids joined, so a test sees exactly which tokens a text came from."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"<{i}>" for i in ids)


def test_cut_off_rejected_is_cut_to_the_chosen_length_when_asked():
    recs = [_mixed_record("cut", "vt"), _mixed_record("parse", "vp"), _mixed_record("short_cut", "vt")]
    recs[0].samples[1].token_ids = list(range(50, 58))  # cut off: 8 tokens; the chosen has 3
    recs[1].samples[1].token_ids = list(range(60, 68))  # a parse failure is never cut
    recs[2].samples[1].token_ids = [70, 71]  # shorter than the chosen: nothing to cut
    juds = [_judgement(r.prompt_id, [1.0, None]) for r in recs]
    cfg = dict(rho=0.0, max_invalid_rejected=1.0, truncated_as_rejected=True)
    whole, ws = select_pairs(recs, juds, PairsConfig(**cfg))
    assert PairsConfig().cut_off_rejected_length == "whole" and ws["rejected_cut_to_chosen"] == 0
    assert [p.rejected_token_ids for p in whole] == [list(range(50, 58)), list(range(60, 68)), [70, 71]]
    cut, cs = select_pairs(recs, juds, PairsConfig(**cfg, cut_off_rejected_length="chosen"),
                           tokenizer=_IdsTokenizer())
    assert [p.rejected_token_ids for p in cut] == [[50, 51, 52], list(range(60, 68)), [70, 71]]
    assert cut[0].rejected_text == "<50> <51> <52>" and cut[0].chosen_token_ids == [0, 1, 2]
    assert cut[1].rejected_text == recs[1].samples[1].text and cut[2].rejected_text == recs[2].samples[1].text
    assert cs["rejected_cut_to_chosen"] == 1 and cs["rejected_truncated"] == 2
    assert [(p.chosen_index, p.rejected_index, p.rejected_invalid_reason) for p in cut] == \
        [(p.chosen_index, p.rejected_index, p.rejected_invalid_reason) for p in whole]
    # Decoding the cut tokens needs the tokenizer: a clear error, not a silent whole output.
    with pytest.raises(TpoError, match="cut_off_rejected_length"):
        select_pairs(recs, juds, PairsConfig(**cfg, cut_off_rejected_length="chosen"))
    assert PairsConfig(cut_off_rejected_length="chosen").needs_tokenizer is False  # no cut-off rejected at all
    with pytest.raises(TpoError, match="'whole' or 'chosen'"):
        PairsConfig(cut_off_rejected_length="half")
