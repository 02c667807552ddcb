"""Each check type on passing and failing responses, near-miss credit, and the judge's score formula."""
import pytest

from tpo_lite.errors import TpoError
from tpo_lite.instructions import Instruction
from tpo_lite.judges.base import JudgeResult
from tpo_lite.judges.checks import (CHECKS, count_bullets, count_sentences, count_words, paragraphs, run_check,
                                    validate_check)
from tpo_lite.judges.programmatic import ProgrammaticJudge

# (check, passing response, failing response)
CASES = [
    ({"type": "max_words", "value": 5}, "One two three four five.", "One two three four five six."),
    ({"type": "min_words", "value": 3}, "don't stop now", "Stop now."),
    ({"type": "max_sentences", "value": 2}, "Hi there. How are you?", "A. B! C?"),
    ({"type": "min_sentences", "value": 2}, "Yes. Indeed.", "Just one sentence here"),
    ({"type": "num_sentences", "value": 3}, "One. Two! Three?", "One. Two."),
    ({"type": "num_paragraphs", "value": 2}, "First para.\n\nSecond para.", "Only one\nparagraph here."),
    ({"type": "num_bullets", "value": 3}, "Intro:\n- a\n* b\n+ c", "- a\n- b\n1. c"),
    ({"type": "include_words", "words": ["budget", "monthly plan"]}, "A monthly\nplan fits your budget.",
     "Budgets matter."),
    ({"type": "exclude_words", "words": ["very"]}, "Everything is fine, every day.", "It is VERY good."),
    ({"type": "keyword_frequency", "word": "sleep", "min_count": 2}, "Sleep well; sleep early.", "Sleep well."),
    ({"type": "lowercase"}, "all lower, even 123.", "almost all lower, except Me."),
    ({"type": "uppercase"}, "ALL CAPS 2024!", "ALL CAPS EXCEPt one"),
    ({"type": "starts_with", "word": "Dear"}, "**Dear** Sam,\nthanks.", "Hello Sam, dear friend."),
    ({"type": "ends_with", "phrase": "Hope this helps!"}, "Here you go. hope this helps!\n", "Hope this helps! Bye."),
    ({"type": "ends_with", "phrase": "Best regards"}, "See you.\nBest regards.", "Best wishes"),
    ({"type": "title"}, "<<Morning Walks>>\nWalk daily.", "<<>> Walk daily."),
    ({"type": "num_highlights", "min_count": 2}, "Be *kind* and **patient**.", "Be *kind* and patient."),
    ({"type": "num_sections", "value": 2}, "Section 1\nIntro\n## SECTION 2\nEnd", "Section 1\nAll in one."),
    ({"type": "postscript"}, "Bye.\n\nP.S. Bring snacks.", "Bye. Bring snacks."),
    ({"type": "no_commas"}, "No commas here.", "One, two."),
    ({"type": "quotation"}, "\"All quoted.\"", "\"Half quoted."),
    ({"type": "json_keys", "keys": ["label", "reason"]}, "```json\n{\"label\": \"spam\", \"reason\": \"prize\"}\n```",
     "{\"label\": \"spam\"}"),
    ({"type": "numeric_answer", "value": 1250}, "12 times 104 is about... total: $1,250.", "The answer is 1250.5"),
    ({"type": "numeric_answer", "value": -3.5}, "It falls to -3.5", "It falls to 3.5"),
]


def test_every_check_type_has_cases():
    assert {c["type"] for c, _, _ in CASES} == set(CHECKS)


@pytest.mark.parametrize("check,good,bad", CASES, ids=[f"{c['type']}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_check_pass_and_fail(check, good, bad):
    validate_check(check)
    ok = run_check(check, good)
    assert ok["passed"] and ok["partial"] == 1.0, ok
    ko = run_check(check, bad)
    assert not ko["passed"] and 0.0 <= ko["partial"] < 1.0, ko


def test_counting_conventions():
    # Don't | stop | it's | 3.5 | km, | e-mail | me!  (the lone "-" is not a word)
    assert count_words("Don't stop - it's 3.5 km, e-mail me!") == 7
    assert count_words("") == 0
    assert count_sentences("Dr. Who?! Yes... no. Fine") == 5  # naive split on end punctuation
    assert count_sentences("- a\n- b") == 1  # no end punctuation: one span, however many lines
    assert count_sentences("") == 0
    assert paragraphs("a\n\n\n  b\n***\nc") == ["a", "b", "c"]
    assert count_bullets("- a\n  - nested\n-no space\n* b\n**bold**") == 3


def test_near_miss_values():
    assert run_check({"type": "max_words", "value": 80}, "w " * 100)["partial"] == pytest.approx(0.8)
    assert run_check({"type": "min_words", "value": 80}, "w " * 60)["partial"] == pytest.approx(0.75)
    assert run_check({"type": "num_bullets", "value": 4}, "- a\n- b\n- c")["partial"] == pytest.approx(0.75)
    assert run_check({"type": "num_bullets", "value": 4}, "no bullets")["partial"] == 0.0
    assert run_check({"type": "include_words", "words": ["a", "b", "c", "d"]}, "a b")["partial"] == 0.5
    assert run_check({"type": "lowercase"}, "abC")["partial"] == pytest.approx(2 / 3)
    assert run_check({"type": "no_commas"}, "a, b, c")["partial"] == pytest.approx(1 / 3)
    assert run_check({"type": "numeric_answer", "value": 8}, "8 groups? no, 9")["partial"] == 0.5
    assert run_check({"type": "numeric_answer", "value": 200}, "about 150")["partial"] == pytest.approx(0.3)
    assert run_check({"type": "numeric_answer", "value": 200}, "it is 900")["partial"] == 0.0
    assert run_check({"type": "numeric_answer", "value": 200}, "no number")["partial"] == 0.0
    # JSON buried in prose gets less credit than a bare object with a missing key.
    bare = run_check({"type": "json_keys", "keys": ["a", "b"]}, '{"a": 1}')["partial"]
    buried = run_check({"type": "json_keys", "keys": ["a", "b"]}, 'Sure! {"a": 1, "b": 2}')["partial"]
    assert bare == pytest.approx(0.7) and buried == pytest.approx(0.65)
    assert run_check({"type": "json_keys", "keys": ["a"]}, "not json")["partial"] == 0.0


def test_word_boundaries():
    assert not run_check({"type": "include_words", "words": ["cat"]}, "A category.")["passed"]
    assert run_check({"type": "exclude_words", "words": ["just"]}, "Justice and adjust.")["passed"]
    assert run_check({"type": "keyword_frequency", "word": "tip", "min_count": 2}, "Tips, tip, TIP!")["observed"] == 2


@pytest.mark.parametrize("check,msg", [
    ({"type": "max_word", "value": 3}, "unknown check type 'max_word'"),
    ({"value": 3}, "unknown check type None"),
    ({"type": "max_words"}, "missing parameter"),
    ({"type": "max_words", "value": "80"}, "expected int"),
    ({"type": "max_words", "value": True}, "expected int"),
    ({"type": "max_words", "value": 0}, "positive integer"),
    ({"type": "max_words", "value": 5, "unit": "chars"}, "unknown parameter"),
    ({"type": "include_words", "words": []}, "non-empty list"),
    ({"type": "include_words", "words": "budget"}, "expected list"),
    ({"type": "numeric_answer", "value": float("nan")}, "finite"),
    ({"type": "numeric_answer", "value": 2, "tolerance": -1}, ">= 0"),
    ({"type": "starts_with", "word": " "}, "must not be empty"),
    ("max_words", "must be an object"),
])
def test_validate_check_errors(check, msg):
    with pytest.raises(TpoError, match=msg):
        validate_check(check, where="checks[0]")


def _ins(*checks):
    return Instruction("t-1", "Do it.", "test", list(checks))


def test_score_formula_exact_values():
    judge = ProgrammaticJudge(tie_weight=0.25)
    ins = _ins({"type": "max_words", "value": 4}, {"type": "include_words", "words": ["sun"]},
               {"type": "lowercase"})
    res = judge.score(ins, ["the sun is up", "The sun is up", "The sun rises over the hills", "Moon.", None])
    assert isinstance(res, JudgeResult)
    s = res.scores
    assert s[0] == 1.0
    # 2 of 3 passed; the failed lowercase check has closeness 9/10 letters lowercase.
    assert s[1] == pytest.approx((2 + 0.25 * 0.9) / 3)
    # max_words fails (6 words: closeness 4/6), lowercase fails (22 of 23 letters lowercase); include passes.
    assert s[2] == pytest.approx((1 + 0.25 * (4 / 6 + 22 / 23) / 2) / 3)
    # Only max_words passes; include closeness 0, lowercase closeness 3/4.
    assert s[3] == pytest.approx((1 + 0.25 * (0 + 0.75) / 2) / 3)
    assert s[4] is None and res.details[4] == {"invalid": True}
    assert res.details[1]["passed"] == 2 and res.details[1]["total"] == 3
    assert [c["passed"] for c in res.details[1]["checks"]] == [True, True, False]


def test_tie_breaker_never_beats_an_extra_pass():
    judge = ProgrammaticJudge(tie_weight=0.999)
    ins = _ins({"type": "max_words", "value": 2}, {"type": "min_words", "value": 1},
               {"type": "no_commas"})
    # a: fails max_words by a hair (3 words) and no_commas slightly; b: passes two checks.
    a, b = judge.score(ins, ["one, two three", "one two"]).scores
    assert a < 2 / 3 <= b
    assert 0.0 <= a <= 1.0 and b == 1.0


def test_tie_weight_zero_is_pass_fraction():
    ins = _ins({"type": "max_words", "value": 2}, {"type": "lowercase"})
    assert ProgrammaticJudge(tie_weight=0.0).score(ins, ["Three words here"]).scores == [0.0]
    assert ProgrammaticJudge(tie_weight=0.0).score(ins, ["two words"]).scores == [1.0]


def test_judge_accepts_dict_instructions_and_compares():
    judge = ProgrammaticJudge()
    ins = {"id": "x", "instruction": "Say hi.", "checks": [{"type": "uppercase"}]}
    assert judge.score(ins, ["HI"]).scores == [1.0]
    assert judge.compare(ins, "HI", "hi") == 1.0
    assert judge.compare(ins, "hi", "HI") == 0.0
    assert judge.compare(ins, "HI", "HEY") == 0.5


def test_judge_errors():
    with pytest.raises(TpoError, match="needs verifiable checks"):
        ProgrammaticJudge().score(Instruction("a", "Say hi."), ["hi"])
    with pytest.raises(TpoError, match="tie_weight"):
        ProgrammaticJudge(tie_weight=1.0)
    with pytest.raises(TpoError, match="unknown check type"):
        ProgrammaticJudge().score({"instruction": "x", "checks": [{"type": "rhymes"}]}, ["x"])


def test_identity_depends_on_tie_weight():
    assert ProgrammaticJudge(0.1).identity != ProgrammaticJudge(0.2).identity
    assert ProgrammaticJudge(0.1).identity == ProgrammaticJudge(0.1).identity
