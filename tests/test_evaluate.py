"""Tests for tpo_lite.evaluate and tpo_lite.compare: eval-set readers, alignment, comparisons, absolute eval, the real
generation path."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tpo_lite import compare as cp
from tpo_lite import evalsets as es
from tpo_lite import evaluate as ev
from tpo_lite.errors import TpoError
from tpo_lite.judges.base import Capabilities, Judge, JudgeResult

SCORER = Capabilities(scores_absolute=True, compares_pairs=False, learned=True)
COMPARER = Capabilities(scores_absolute=False, compares_pairs=True, learned=True)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def _jsonl(path, recs):
    return _write(path, "".join(json.dumps(r) + "\n" for r in recs))


# ------------------------------------------------------------------------------------------------ readers


def test_alpaca_eval_json_list_and_jsonl_agree(tmp_path):
    recs = [
        {"instruction": "Name a colour.", "output": "Blue.", "generator": "gpt4_turbo", "dataset": "helpful_base"},
        {"instruction": "Say hi.", "output": "Hi!", "generator": "gpt4_turbo", "dataset": ""},
        {"instruction": "Count to 3.", "output": "1 2 3", "generator": "gpt4_turbo"},
    ]
    a = es.read_alpaca_eval(_write(tmp_path / "a.json", json.dumps(recs)))
    b = es.read_alpaca_eval(_jsonl(tmp_path / "b.jsonl", recs))
    assert [(i.instruction, i.category, i.baseline, i.baseline_generator) for i in a] == [
        ("Name a colour.", "helpful_base", "Blue.", "gpt4_turbo"),
        ("Say hi.", "uncategorised", "Hi!", "gpt4_turbo"),  # empty dataset
        ("Count to 3.", "uncategorised", "1 2 3", "gpt4_turbo"),  # missing dataset
    ]
    assert [(i.instruction, i.category, i.baseline) for i in a] == [(i.instruction, i.category, i.baseline) for i in b]
    assert es.detect_format(tmp_path / "a.json") == "alpaca_eval"


def test_alpaca_eval_bad_records_name_file_line_field(tmp_path):
    p = _write(tmp_path / "bad.jsonl", json.dumps({"instruction": "ok"}) + "\n\n" + json.dumps({"output": "x"}) + "\n")
    with pytest.raises(TpoError) as e:
        es.read_alpaca_eval(p)
    assert str(e.value) == f"{p}:3: instruction: missing"
    p = _write(tmp_path / "bad.json", json.dumps([{"instruction": "ok"}, {"instruction": 5}]))
    with pytest.raises(TpoError, match=r"bad.json: \[1\].instruction: expected a string, got int"):
        es.read_alpaca_eval(p)
    p = _write(tmp_path / "broken.jsonl", '{"instruction": "a"}\n{"instruction": \n')
    with pytest.raises(TpoError, match=r"broken.jsonl:2: not valid JSON"):
        es.read_alpaca_eval(p)
    with pytest.raises(TpoError, match="file not found"):
        es.read_alpaca_eval(tmp_path / "nope.json")


def test_arena_hard_questions_and_answers(tmp_path):
    q = _jsonl(tmp_path / "question.jsonl", [
        {"uid": "u1", "category": "arena-hard-v0.1", "prompt": "Write a haiku."},
        {"question_id": "u2", "turns": [{"content": "Explain TCP."}]},
        {"uid": "u3", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]},
    ])
    a = _jsonl(tmp_path / "gpt-4-0314.jsonl", [
        {"uid": "u1", "model": "gpt-4-0314", "messages": [{"role": "user", "content": "Write a haiku."},
                                                           {"role": "assistant", "content": {"answer": "Leaves fall"}}]},
        {"question_id": "u2", "model_id": "gpt-4-0314", "choices": [{"index": 0, "turns": [{"content": "TCP is..."}]}]},
        {"uid": "u3", "output": "4"},
    ])
    items = es.read_arena_hard(q, a)
    assert [(i.id, i.instruction, i.category, i.baseline, i.baseline_generator) for i in items] == [
        ("u1", "Write a haiku.", "arena-hard-v0.1", "Leaves fall", "gpt-4-0314"),
        ("u2", "Explain TCP.", "uncategorised", "TCP is...", "gpt-4-0314"),
        ("u3", "2+2?", "uncategorised", "4", None),
    ]
    assert es.detect_format(q) == "arena_hard"
    assert [i.id for i in ev.load_eval_set(q, baseline=a)] == ["u1", "u2", "u3"]


def test_arena_hard_bad_input(tmp_path):
    q = _jsonl(tmp_path / "q.jsonl", [{"uid": "u1", "prompt": "x"}, {"uid": "u1", "prompt": "y"}])
    with pytest.raises(TpoError, match=r"q.jsonl:2: uid: duplicate uid 'u1'"):
        es.read_arena_hard(q)
    q = _jsonl(tmp_path / "q2.jsonl", [{"uid": "u1", "prompt": "x"}, {"uid": "u2", "title": "no prompt"}])
    with pytest.raises(TpoError, match=r"q2.jsonl:2: prompt: missing"):
        es.read_arena_hard(q)
    q = _jsonl(tmp_path / "q3.jsonl", [{"uid": "u1", "prompt": "x"}, {"uid": "u2", "prompt": "y"}])
    a = _jsonl(tmp_path / "a3.jsonl", [{"uid": "u1", "output": "z"}])
    with pytest.raises(TpoError, match=r"a3.jsonl: no baseline answer for 1 of 2 questions \(first: 'u2'\)"):
        es.read_arena_hard(q, a)
    a = _jsonl(tmp_path / "a4.jsonl", [{"uid": "u1", "messages": []}])
    with pytest.raises(TpoError, match=r"a4.jsonl:1: no answer text"):
        es.read_arena_hard_answers(a)


def test_instruction_set_reader(tmp_path):
    pytest.importorskip("tpo_lite.instructions")
    p = _jsonl(tmp_path / "ins.jsonl", [
        {"id": "h1", "instruction": "Answer in at most 5 words.", "category": "brevity",
         "checks": [{"type": "max_words", "value": 5}]},
        {"id": "h2", "instruction": "Say yes."},
    ])
    items = ev.load_eval_set(p)
    from tpo_lite.instructions import Instruction

    default_cat = Instruction.__dataclass_fields__["category"].default  # the loader of our format decides it
    assert [(i.id, i.category) for i in items] == [("h1", "brevity"), ("h2", default_cat)]
    assert items[0].checks == [{"type": "max_words", "value": 5}] and items[1].checks == []
    assert ev.load_eval_set(p, max_instructions=1)[0].id == "h1"


def test_eval_config_validation():
    with pytest.raises(TpoError, match="comparison: must be one of"):
        ev.EvalConfig(comparison="best")
    with pytest.raises(TpoError, match="alpha: must be in"):
        ev.EvalConfig(alpha=1.5)
    with pytest.raises(TpoError, match="max_new_tokens: must be >= 0"):
        ev.EvalConfig(max_new_tokens=-1)


# ------------------------------------------------------------------------------------------------ alignment


def _items(n, cats=("a", "b")):
    return [es.EvalItem(id=f"q{k}", instruction=f"instruction {k}", category=cats[k % len(cats)]) for k in range(n)]


def _outs(items, responses, gen, valid=None, thoughts=None):
    return [ev.ModelOutput(instruction=it.instruction, response=r, generator=gen, category=it.category, id=it.id,
                           valid=True if valid is None else valid[k], thought="" if thoughts is None else thoughts[k])
            for k, (it, r) in enumerate(zip(items, responses))]


def test_misaligned_outputs_are_refused():
    items = _items(4)
    outs = _outs(items, ["x"] * 4, "m")
    assert [o.id for o in ev.align_outputs(items, list(reversed(outs)))] == ["q0", "q1", "q2", "q3"]
    with pytest.raises(TpoError, match=r"1 of 4 instructions have no output \(first: 'instruction 3', id q3\)"):
        ev.align_outputs(items, outs[:3])
    stray = outs[:3] + [ev.ModelOutput(instruction="something else", response="y", generator="m")]
    with pytest.raises(TpoError, match=r"do not line up.*1 outputs match no instruction \(first: 'something else'\)"):
        ev.align_outputs(items, stray)
    with pytest.raises(TpoError, match="no output"):
        cp.compare_outputs(items, outs, outs[:2], _LengthJudge())


def test_outputs_roundtrip_in_one_format(tmp_path):
    """outputs.jsonl is the one format read back (thoughts and validity kept), whether the folder, the file or
    its AlpacaEval export model_outputs.json is named; an AlpacaEval file from elsewhere is responses only."""
    import shutil

    from tpo_lite.rundir import EvalDir

    items = _items(3)
    outs = _outs(items, ["r0", "", "r2"], "tpo-iter1", valid=[True, False, True], thoughts=["t0", "t1", "t2"])
    outs[1].invalid_reason = "no_response_marker"
    path = ev.write_model_outputs(tmp_path / "m", outs)
    alpaca = json.loads(open(path).read())
    assert alpaca[0] == {"instruction": "instruction 0", "output": "r0", "generator": "tpo-iter1", "dataset": "a"}
    for where in (tmp_path / "m", path, EvalDir(tmp_path / "m").outputs):
        back = ev.read_outputs(where)
        assert [(o.response, o.valid, o.thought, o.invalid_reason) for o in back] == [
            ("r0", True, "t0", None), ("", False, "t1", "no_response_marker"), ("r2", True, "t2", None)]
    shutil.copy(path, tmp_path / "alpaca.json")
    assert [(o.response, o.valid) for o in ev.read_outputs(tmp_path / "alpaca.json")] == [
        ("r0", True), ("", True), ("r2", True)]
    with pytest.raises(TpoError, match="no outputs.jsonl in this folder"):
        ev.read_outputs(tmp_path)


# ------------------------------------------------------------------------------------------------ comparisons


class _LengthJudge(Judge):
    """Score = number of words (a stand-in reward model with a known answer)."""

    name = "words"
    capabilities = SCORER

    def score(self, instruction, responses):
        assert not isinstance(instruction, str) and hasattr(instruction, "checks")
        return JudgeResult([None if r is None else float(len(r.split())) for r in responses])


class _BiasedPairwise(Judge):
    """p(a wins) = 0.9 if a is longer, 0.1 if shorter, else 0.5; plus `bias` for whoever is shown first."""

    name = "pairwise-fake"
    capabilities = COMPARER

    def __init__(self, bias=0.0):
        self.bias = bias
        self.calls = []

    def compare(self, instruction, a, b):
        self.calls.append((instruction.instruction, a, b))
        base = 0.9 if len(a) > len(b) else (0.1 if len(a) < len(b) else 0.5)
        return min(1.0, base + self.bias)


def test_score_comparison_counts_and_invalid_as_loss():
    items = _items(6)
    model = _outs(items, ["a b c", "a", "a b", "a b c d", "x y z", "q"], "m",
                  valid=[True, True, True, True, False, True])
    base = _outs(items, ["a b", "a b", "c d", "a", "p", "q"], "base")
    r = cp.compare_outputs(items, model, base, _LengthJudge(), ev.EvalConfig(n_boot=200))
    # outcomes: win, loss, tie, win, loss (invalid, not judged), tie
    assert [row["outcome"] for row in r["items"]] == [1.0, 0.0, 0.5, 1.0, 0.0, 0.5]
    assert (r["wins"], r["ties"], r["losses"]) == (2, 2, 2)
    assert r["win_rate"] == pytest.approx(3 / 6)
    assert r["items"][4]["judged"] is False and "model_score" not in r["items"][4]
    assert r["invalid_rate"] == pytest.approx(1 / 6)
    assert r["comparison"] == "score" and r["position_bias"] is None
    lo, hi = r["win_rate_ci"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    cats = {c["category"]: c for c in r["per_category"]}
    assert cats["a"]["n"] == 3 and cats["a"]["win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)  # q0, q2, q4
    assert cats["b"]["win_rate"] == pytest.approx((0 + 1 + 0.5) / 3)  # q1, q3, q5
    # lengths are means over valid outputs, in characters
    assert r["model_lengths"]["response_chars_mean"] == pytest.approx(np.mean([5, 1, 3, 7, 1]))
    with pytest.raises(TpoError, match="cannot compare"):
        cp.compare_outputs(items, model, base, _LengthJudge(), ev.EvalConfig(comparison="pairwise"))


def test_tie_margin():
    items = _items(2)
    r = cp.compare_outputs(items, _outs(items, ["a b c", "a"], "m"), _outs(items, ["a b", "a b c d"], "b"),
                           _LengthJudge(), ev.EvalConfig(tie_margin=1.0, n_boot=50))
    assert [row["outcome"] for row in r["items"]] == [0.5, 0.0]


def test_pairwise_both_orders_and_position_bias():
    items = _items(4)
    model = _outs(items, ["longer one", "s", "same", "longest of all"], "m")
    base = _outs(items, ["short", "longer", "sane", "x"], "b")  # item 2: equal length, different text
    judge = _BiasedPairwise(bias=0.1)
    r = cp.compare_outputs(items, model, base, judge, ev.EvalConfig(n_boot=100))
    assert r["comparison"] == "pairwise"
    assert len(judge.calls) == 8
    # the judge saw the original instruction and the two responses, in both orders
    assert judge.calls[0] == ("instruction 0", "longer one", "short")
    assert judge.calls[1] == ("instruction 0", "short", "longer one")
    # model longer: p_ab = 1.0, p_ba = 0.2 -> outcome (1.0 + 0.8)/2 = 0.9; shorter: (0.2 + 0.0)/2 = 0.1; tie: 0.5
    assert [row["outcome"] for row in r["items"]] == pytest.approx([0.9, 0.1, 0.5, 0.9])
    pb = r["position_bias"]
    # first shown preferred: per item mean(p_ab, p_ba) = 0.6 in every case -> the +0.1 bias shows up exactly
    assert pb["first_position_preferred"] == pytest.approx(0.6)
    assert pb["order_consistency"] == pytest.approx(3 / 4)  # the tie item disagrees (0.6 vs 0.6)
    assert r["win_rate"] == pytest.approx(0.6)
    # a judge that always says "tie" is unbiased and consistent
    class _Coin(_BiasedPairwise):
        def compare(self, instruction, a, b):
            return 0.5

    r = cp.compare_outputs(items, model, base, _Coin(), ev.EvalConfig(n_boot=50))
    assert r["position_bias"] == {"first_position_preferred": 0.5, "order_consistency": 1.0, "n_judged": 4}
    assert r["win_rate"] == 0.5 and r["ties"] == 4


class _LengthLovingPairwise(Judge):
    """p(a wins) = sigmoid((len(a) - len(b)) / 10): a judge that only likes length (no position bias)."""

    name = "length-lover"
    capabilities = COMPARER

    def compare(self, instruction, a, b):
        return float(1.0 / (1.0 + np.exp(-(len(a) - len(b)) / 10.0)))


def test_lc_win_rate_removes_a_pure_length_preference():
    # The judge prefers longer responses and nothing else; the model is longer on 75% of instructions, so its raw
    # win rate is well above 0.5 but at equal length it is exactly even: the length-controlled rate must be ~0.5.
    rng = np.random.default_rng(0)
    n = 120
    items = [es.EvalItem(id=f"q{k}", instruction=f"i{k}") for k in range(n)]
    d = rng.integers(1, 41, size=n) * np.where(np.arange(n) < 90, 1, -1)
    base = [ev.ModelOutput(instruction=it.instruction, response="w" * 60, generator="b") for it in items]
    model = [ev.ModelOutput(instruction=it.instruction, response="w" * (60 + int(dk)), generator="m")
             for it, dk in zip(items, d)]
    r = cp.compare_outputs(items, model, base, _LengthLovingPairwise(), ev.EvalConfig(n_boot=200))
    expected = np.mean([(p + p) / 2 for p in 1.0 / (1.0 + np.exp(-d / 10.0))])
    assert r["win_rate"] == pytest.approx(expected) and r["win_rate"] > 0.65
    assert r["lc_win_rate"] == pytest.approx(0.5, abs=0.01)
    lo, hi = r["lc_win_rate_ci"]  # the preferences lie exactly on the logistic curve: a narrow interval at 0.5
    assert 0.49 < lo <= r["lc_win_rate"] <= hi < 0.51
    assert r["position_bias"]["first_position_preferred"] == pytest.approx(0.5)


def test_absolute_eval_mean_and_invalid_zero():
    items = _items(4)
    outs = _outs(items, ["a b", "a b c d", "zzz", "a"], "m", valid=[True, True, False, True])
    r = cp.absolute_eval(items, outs, _LengthJudge(), ev.EvalConfig(n_boot=200))
    assert [row["score"] for row in r["items"]] == [2.0, 4.0, 0.0, 1.0]
    assert r["mean_score"] == pytest.approx(7 / 4)
    assert r["valid_rate"] == pytest.approx(0.75)
    lo, hi = r["mean_score_ci"]
    assert 0.0 <= lo <= 7 / 4 <= hi <= 4.0


def test_absolute_eval_check_pass_rates_by_type():
    # what moved behind a mean score: per check type, checks passed over the instructions that carry it
    short, long_ = {"type": "max_words", "value": 3}, {"type": "min_words", "value": 3}
    word = {"type": "include_words", "words": ["sun"]}
    checks = [[short, word], [long_], [short], [long_, word]]
    items = [dataclasses.replace(it, checks=c) for it, c in zip(_items(4), checks)]
    before = _outs(items, ["sun is up", "one two three four", "a b c d e", "sun sun sun"], "seed")
    after = _outs(items, ["sun", "one", "a b", "x y z"], "tpo", valid=[True, True, True, False])
    rb, ra = (cp.absolute_eval(items, o, _LengthJudge(), ev.EvalConfig(n_boot=20)) for o in (before, after))
    assert rb["per_check"] == [  # most frequent first, then by name
        {"type": "include_words", "n": 2, "passed": 2, "pass_rate": 1.0},
        {"type": "max_words", "n": 2, "passed": 1, "pass_rate": 0.5},
        {"type": "min_words", "n": 2, "passed": 2, "pass_rate": 1.0}]
    # the invalid output (q3) passes none of its checks, whatever its text
    assert {c["type"]: c["passed"] for c in ra["per_check"]} == {"include_words": 1, "max_words": 2, "min_words": 0}
    assert rb["model_lengths"]["response_words_mean"] == pytest.approx((3 + 4 + 5 + 3) / 4)
    assert ra["model_lengths"]["response_words_mean"] == pytest.approx(4 / 3)
    md = cp.render_markdown(ra)
    assert "| check | n | passed |" in md and "| min_words | 2 | 0.0% |" in md
    assert cp.check_pass_rates(_items(2), _outs(_items(2), ["a", "b"], "m")) == []  # no checks: no table

    from tpo_lite.metrics import format_before_after
    text = format_before_after(rb, ra, None)
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[-5:]}
    assert rows["max_words"] == ["2", "50%", "100%", "+50%"]
    assert rows["min_words"] == ["2", "100%", "0%", "-100%"]
    assert rows["response"][:4] == ["words", "3.8", "1.3", "-2.4"]
    # results recorded before per-check rates existed print the old table only
    old = {k: v for k, v in rb.items() if k != "per_check"}
    assert "checks passed" not in format_before_after(old, ra, None)


def test_heldout_change_splits_into_format_and_answers():
    """The paired change = the part from outputs that changed format validity + the part from outputs valid
    before and after, each per instruction of all n, each with a bootstrap CI."""
    from tpo_lite.metrics import compare_heldout, format_before_after

    # (valid, score) before -> after: became valid (+0.5), became invalid (-0.25), both valid (+0.25, -0.5),
    # invalid both times (0)
    rows = [((False, 0.0), (True, 0.5)), ((True, 0.25), (False, 0.0)), ((True, 0.25), (True, 0.5)),
            ((True, 1.0), (True, 0.5)), ((False, 0.0), (False, 0.0))]
    res = lambda k: {"items": [{"id": i, "valid": r[k][0], "score": r[k][1]} for i, r in enumerate(rows)],  # noqa: E731
                     "n": len(rows), "valid_rate": sum(r[k][0] for r in rows) / len(rows),
                     "mean_score": 0.0, "mean_score_ci": [0.0, 0.0], "judge": "programmatic"}
    d = compare_heldout(res(0), res(1), n_boot=200)
    assert d["score_diff"] == pytest.approx(0.0)
    assert d["format_change"] == pytest.approx((0.5 - 0.25) / 5)
    assert d["both_valid_change"] == pytest.approx((0.25 - 0.5) / 5)
    assert d["format_change"] + d["both_valid_change"] == pytest.approx(d["score_diff"])
    assert (d["n_became_valid"], d["n_became_invalid"], d["n_both_valid"]) == (1, 1, 2)
    for k in ("format_change", "both_valid_change"):
        lo, hi = d[f"{k}_ci"]
        assert lo <= d[k] <= hi
    text = format_before_after(res(0), res(1), d)
    assert "  format      +0.050" in text and "1 output(s) became valid, 1 invalid" in text
    assert "  answers     -0.050" in text and "over the 2 valid before and after" in text
    # results written before validity was recorded per item: the change alone, no split
    old = {k: [{"id": r["id"], "score": r["score"]} for r in v] if k == "items" else v for k, v in res(0).items()}
    d = compare_heldout(old, res(1), n_boot=200)
    assert d["score_diff"] == pytest.approx(0.0) and "format_change" not in d
    assert "became valid" not in format_before_after(old, res(1), d)


def test_write_result_json_and_markdown(tmp_path):
    items = _items(3)
    r = cp.compare_outputs(items, _outs(items, ["a b c", "a", "a b"], "tpo"), _outs(items, ["a b", "a b", "a b"], "seed"),
                           _LengthJudge(), ev.EvalConfig(n_boot=50))
    jp, mp = cp.write_result(tmp_path, r, cp.decoding_record(ev.EvalConfig()))
    back = json.loads(open(jp).read())
    assert back["win_rate"] == pytest.approx(0.5) and back["decoding"]["greedy"] is True
    md = open(mp).read()
    assert "tpo vs seed" in md and "50.0%" in md and "| a |" in md


# ------------------------------------------------------------------------------------------------ real generation


def _tiny_model_and_tokenizer(tmp_path):
    """A random 2-layer llama and a word-level tokenizer with a chat template, both built here."""
    from tokenizers import pre_tokenizers
    from tiny_models import tiny_llama, word_level_tokenizer

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "\n"]
    words += ["here", "is", "my", "thought", "process:", "response:", "the", "a", "answer", "yes", "no", "word", "A", "B"]
    words += [f"w{k}" for k in range(100)]
    hf = word_level_tokenizer(
        words, "<unk>", pre_tokenizer=pre_tokenizers.WhitespaceSplit(),
        chat_template=("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"),
        bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>")
    model = tiny_llama(len(hf), tokenizer=hf, max_position_embeddings=512).eval()
    return model, hf


def test_eval_tiny_random_model_real_path(tmp_path):
    """Generation through model_outputs (the real local sampler + parser) and the programmatic judge on a tiny
    random model."""
    pytest.importorskip("tpo_lite.models")
    judges = pytest.importorskip("tpo_lite.judges")
    from tpo_lite.config import load_config

    run_toml = _tiny_run_config(tmp_path)
    items = [es.EvalItem(id=f"h{k}", instruction=f"w{k} w{k + 1} answer yes", category=["c1", "c2"][k % 2],
                         checks=[{"type": "max_words", "value": 50}]) for k in range(4)]
    judge = judges.make_judge(judges.JudgeConfig(kind="programmatic"))
    results = {}
    for template in ("generic", "direct"):
        config = load_config(run_toml, [f"prompts.template={template}", "eval.max_new_tokens=12", "eval.batch_size=4"])
        ecfg = config.eval

        def generate(folder):
            return ev.model_outputs(config, items, tmp_path / folder / "outputs.jsonl", generator=f"tiny-{template}",
                                    progress=False, echo=lambda s: None)

        outs = generate(template)
        assert [o.id for o in outs] == [it.id for it in items]
        for o in outs:
            assert o.finish_reason in ("eos", "stop", "length") and isinstance(o.text, str)
            if o.finish_reason == "length":
                assert not o.valid  # cut off by the token limit -> invalid (a loss)
        # greedy decoding is deterministic: generated again (another folder), the same texts
        again = generate(f"{template}-again")
        assert [o.text for o in again] == [o.text for o in outs]
        path = ev.write_model_outputs(tmp_path / template, outs)
        assert len(json.loads(open(path).read())) == 4
        r = cp.absolute_eval(items, outs, judge, ecfg)
        assert r["n"] == 4 and 0.0 <= r["mean_score"] <= 1.0 and np.isfinite(r["mean_score_ci"]).all()
        assert r["valid_rate"] == pytest.approx(np.mean([o.valid for o in outs]))
        results[template] = ev.read_outputs(path)
    cmp = cp.compare_outputs(items, results["generic"], results["direct"], judge, ev.EvalConfig(n_boot=100))
    assert cmp["n"] == 4 and 0.0 <= cmp["win_rate"] <= 1.0
    assert cmp["win_rate"] == pytest.approx(np.mean([row["outcome"] for row in cmp["items"]]))
    cp.write_result(tmp_path / "cmp", cmp)
    assert json.loads((tmp_path / "cmp" / "eval.json").read_text())["n"] == 4


def test_compare_with_real_reward_model_and_pairwise_judges(tmp_path):
    """compare_outputs through the real judge classes on tiny random models: the outcomes must equal what the
    judges' own score()/compare() give for the two responses (a score difference; the mean over both orders)."""
    from tiny_models import tiny_llama

    from tpo_lite.judges.pairwise import LocalPairBackend, PairwiseJudge
    from tpo_lite.judges.reward_model import RewardModelJudge

    model, tok = _tiny_model_and_tokenizer(tmp_path)
    rm = tiny_llama(len(tok), size="micro", seed=1, head="score", num_labels=1, pad_token_id=tok.pad_token_id).eval()
    items = [es.EvalItem(id=f"q{k}", instruction=f"w{k} answer", category="c") for k in range(4)]
    mo = _outs(items, ["yes w1 w2", "no", "the answer w3", "w4 w5 w6 w7"], "m")
    bo = _outs(items, ["no w9", "yes yes", "a word", "w4 w5 w6 w7"], "b")

    rmj = RewardModelJudge(rm, tok)
    r = cp.compare_outputs(items, mo, bo, rmj, ev.EvalConfig(n_boot=50))
    assert r["comparison"] == "score"
    for it, m, b, row in list(zip(items, mo, bo, r["items"]))[:3]:
        sm, sb = rmj.score(it, [m.response, b.response]).scores
        assert row["model_score"] == pytest.approx(sm) and row["baseline_score"] == pytest.approx(sb)
        assert abs(sm - sb) > 1e-4 and row["outcome"] == (1.0 if sm > sb else 0.0)
    # identical responses tie without being judged (a batched RM forward gives them scores that differ by ~1e-8)
    assert r["items"][3]["outcome"] == 0.5 and r["items"][3]["identical"] and not r["items"][3]["judged"]

    pj = PairwiseJudge(LocalPairBackend(model, tok))
    r = cp.compare_outputs(items, mo, bo, pj, ev.EvalConfig(n_boot=50))
    assert r["comparison"] == "pairwise"
    firsts = []
    for it, m, b, row in list(zip(items, mo, bo, r["items"]))[:3]:
        p_ab, p_ba = pj.compare(it, m.response, b.response), pj.compare(it, b.response, m.response)
        assert row["outcome"] == pytest.approx((p_ab + 1 - p_ba) / 2)
        firsts.append((p_ab + p_ba) / 2)
    assert r["position_bias"]["first_position_preferred"] == pytest.approx(np.mean(firsts))
    assert r["position_bias"]["n_judged"] == 3 and r["items"][3]["outcome"] == 0.5


# ------------------------------------------------------------------------------------------------ CLI


def _tiny_run_config(tmp_path):
    """A saved tiny model dir + an instruction file with checks + a run config TOML pointing at both."""
    model, tok = _tiny_model_and_tokenizer(tmp_path)
    mdir = tmp_path / "tiny-model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    recs = [{"id": f"h{k}", "instruction": f"w{k} w{k + 2} answer", "category": ["lists", "writing"][k % 2],
             "checks": [{"type": "max_words", "value": 3 + k}]} for k in range(5)]
    del recs[4]["category"]  # missing category -> "uncategorised"
    ins = _jsonl(tmp_path / "heldout.jsonl", recs)
    cfg = _write(tmp_path / "run.toml", f"""
[model]
path = "{mdir}"
dtype = "float32"
load_in_4bit = false
device = "cpu"

[sampling]
max_new_tokens = 10

[loop]
name = "tiny"
runs_root = "{tmp_path / 'runs'}"

[eval]
eval_set = "{ins}"
n_boot = 100
batch_size = 5
""")
    return cfg


def test_cli_eval_seed_absolute_then_against(tmp_path):
    pytest.importorskip("tpo_lite.models")
    from click.testing import CliRunner

    from tpo_lite.cli import main

    cfg = _tiny_run_config(tmp_path)
    runner = CliRunner()
    r = runner.invoke(main, ["eval", cfg, "--iteration", "seed", "--no-progress", "--out", str(tmp_path / "abs")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "abs" / "eval.json").read_text())
    assert res["kind"] == "absolute" and res["n"] == 5 and 0 <= res["mean_score"] <= 1
    assert res["decoding"] == {"temperature": 0.0, "greedy": True, "top_p": 1.0, "max_new_tokens": 10,
                               "response_budget": None, "seed": 0, "format_retries": 2, "retry_temperature": 0.8,
                               "retry_top_p": 0.95}
    from tpo_lite.instructions import Instruction  # its loader decides the default of our own format

    default_cat = Instruction.__dataclass_fields__["category"].default
    assert {c["category"] for c in res["per_category"]} == {"lists", "writing", default_cat}
    alpaca = json.loads((tmp_path / "abs" / "model_outputs.json").read_text())
    assert [a["generator"] for a in alpaca] == ["seed"] * 5
    # the same model with the direct template, judged against the first outputs
    r = runner.invoke(main, ["eval", cfg, "-i", "seed", "--no-progress", "--set", "prompts.template=direct",
                             "--against", str(tmp_path / "abs"), "--out", str(tmp_path / "cmp")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "cmp" / "eval.json").read_text())
    assert res["kind"] == "pairwise" and res["n"] == 5 and res["wins"] + res["ties"] + res["losses"] == 5
    assert "Win rate (ties count half)" in (tmp_path / "cmp" / "eval.md").read_text()
    # outputs of a different eval set are refused with a clear message, exit status 2
    other = _jsonl(tmp_path / "other.jsonl", [{"id": "z", "instruction": "w1", "checks": [{"type": "max_words",
                                                                                          "value": 2}]}])
    r = runner.invoke(main, ["eval", cfg, "--eval-set", other, "--outputs", str(tmp_path / "abs" / "model_outputs.json"),
                             "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "do not line up with the eval set" in r.output


def _tiny_loop_config(tmp_path, loop_extra: str = "") -> str:
    """_tiny_run_config made to train: 4 training instructions with checks, one iteration of 2 prompts x K=2,
    DPO batches of 2 (``loop_extra``: more [loop] lines); returns the TOML's path."""
    train = _jsonl(tmp_path / "train.jsonl", [
        {"id": f"t{k}", "instruction": f"w{k} w{k + 3} yes", "category": "lists",
         "checks": [{"type": "max_words", "value": 4 + k % 5}]} for k in range(4)])
    text = open(_tiny_run_config(tmp_path)).read().replace(
        "[sampling]\nmax_new_tokens = 10", "[sampling]\nmax_new_tokens = 10\nk = 2\nbatch_size = 2\ntemperature = 1.0")
    text = text.replace("[loop]\n", f'[loop]\niterations = 1\nprompts_per_iteration = 2\n{loop_extra}'
                                    f'train_instructions = "{train}"\n')
    text += "\n[train]\nbatch_size = 2\ngrad_accum = 1\nmax_length = 64\n"
    return _write(tmp_path / "run.toml", text)


@pytest.mark.slow
def test_experiment_end_to_end_tiny(tmp_path):
    """The direct-response experiment through the real loop (sample, judge, pairs, DPO, held-out evals) on a tiny
    random model: both run dirs, per-iteration comparisons with the seed, TPO vs direct, Table 1 and the report."""
    pytest.importorskip("tpo_lite.train")
    from tpo_lite.config import load_config
    from tpo_lite.experiment import run_experiment
    from tpo_lite.report import make_report

    config = load_config(_tiny_loop_config(tmp_path))
    record = run_experiment(config, tmp_path / "exp", progress=False, echo=lambda s: None)
    exp = tmp_path / "exp"
    assert [r["comparison"] for r in record["table"]] == ["TPO (iter 1) vs seed", "direct (iter 1) vs seed",
                                                          "TPO vs direct"]
    for r in record["table"]:
        assert r["n"] == 5 and r["wins"] + r["ties"] + r["losses"] == 5 and 0.0 <= r["win_rate"] <= 1.0
    from tpo_lite.rundir import ExperimentDir

    tvd = ExperimentDir(exp).compare("tpo_vs_direct").read_result()
    assert tvd["model"] == "tpo-iter01" and tvd["baseline"] == "direct-iter01"
    for label, template in (("tpo", "generic"), ("direct", "direct")):
        run = ExperimentDir(exp).run(label)
        assert f'template = "{template}"' in run.config.read_text()
        res = run.iteration(1).compare("vs_seed").read_result()
        assert res["baseline"] == "seed" and res["n"] == 5
    assert ExperimentDir(exp).table.read_text().count("| TPO vs direct | 5 |") == 1
    # a second call resumes: nothing is recomputed and the record is the same
    again = run_experiment(config, tmp_path / "exp", progress=False, echo=lambda s: None)
    assert again["table"] == record["table"]
    paths = make_report([str(exp)])
    assert "tpo-iter01 vs direct-iter01" in open(paths["report.md"]).read()


# ------------------------------------------------------------------------------------------------ LC and invalid outputs


class _FixedPairwise(Judge):
    """p(model wins) fixed per instruction (both orders agree, no position bias)."""

    name = "fixed-pairwise"
    capabilities = COMPARER

    def __init__(self, p_model, model_responses):
        self.p = p_model
        self.model_responses = model_responses

    def compare(self, instruction, a, b):
        p = self.p[instruction.instruction]
        return p if a in self.model_responses else 1.0 - p


def test_lc_win_rate_does_not_blame_format_failures_on_length():
    # The issue's constructed case: 6 valid comparisons where length says nothing (win rate 0.5, LC 0.5) and two
    # invalid model outputs (empty responses), losses by rule. Fitting them too gave LC 0.474 for a raw 0.375.
    items = _items(8)
    lengths = [130, 70, 130, 70, 110, 90, 0, 0]
    model = _outs(items, [chr(ord("a") + k) * n for k, n in enumerate(lengths)], "m", valid=[True] * 6 + [False] * 2)
    base = _outs(items, ["z" * 100] * 8, "b")
    p = dict(zip([it.instruction for it in items], [1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]))
    r = cp.compare_outputs(items, model, base, _FixedPairwise(p, {o.response for o in model}), ev.EvalConfig(n_boot=200))
    assert [row["outcome"] for row in r["items"]] == [1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0]
    assert r["win_rate"] == pytest.approx(0.375)
    assert r["lc_win_rate"] == pytest.approx(0.375) and r["lc_fit_n"] == 6
    assert [row["length_fit"] for row in r["items"]] == [True] * 6 + [False] * 2
    lo, hi = r["lc_win_rate_ci"]
    assert lo <= 0.375 <= hi


# ------------------------------------------------------------------------------------------------ format retries


_VALID_TEXT = "Here is my thought process:\nthink\n\nHere is my response:\nthe answer"
_INVALID_TEXT = "Here is my thought process:\nthink but never answer"


class _ScriptedEvalSampler:
    """Invalid for the first ``fails[prompt_id]`` calls of each prompt, then valid; logs every sample drawn."""

    def __init__(self, cfg, log, fails, stop_after=None):
        self.cfg, self.log, self.fails, self.stop_after = cfg, log, fails, stop_after

    def sample(self, jobs, k=None):
        from tpo_lite.sampling import Sample

        for job in jobs:
            if self.stop_after is not None and len(self.log) >= self.stop_after:
                raise KeyboardInterrupt  # a kill mid-eval
            n = sum(1 for e in self.log if e[0] == job.prompt_id)
            self.log.append((job.prompt_id, job.seeds[0], self.cfg.temperature, self.cfg.top_p))
            text = _INVALID_TEXT if n < self.fails.get(job.prompt_id, 0) else _VALID_TEXT
            yield job.prompt_id, [Sample(index=0, seed=job.seeds[0], text=f"{text} {job.seeds[0]}", token_ids=[],
                                         finish_reason="eos")]


def _scripted_factory(log, fails, stop_after=None):
    def factory(cfg, tokenizer, template, model=None, adapter=None, progress=True):
        return _ScriptedEvalSampler(cfg, log, fails, stop_after)

    return factory


def test_format_errors_are_resampled_with_fresh_seeds(tmp_path):
    pytest.importorskip("tpo_lite.models")
    items = [es.EvalItem(id=f"q{k}", instruction=f"w{k} answer") for k in range(4)]
    fails = {"q1": 1, "q2": 5}  # q1: one format error; q2: never valid

    def generate(folder, log, *overrides):
        config = _server_config(tmp_path, "sampling.concurrency=1", *overrides)
        return ev.model_outputs(config, items, tmp_path / folder / "outputs.jsonl", generator="m", progress=False,
                                echo=lambda s: None, sampler_factory=_scripted_factory(log, fails))

    runs = {}
    for bs in (4, 1):
        log = []
        runs[bs] = (generate(f"bs{bs}", log, f"eval.batch_size={bs}", "eval.seed=3"), log)
    outs, log = runs[4]
    assert [(o.tries, o.valid) for o in outs] == [(1, True), (2, True), (3, False), (1, True)]
    assert outs[2].invalid_reason and outs[2].text.startswith(_INVALID_TEXT)  # the last try counts
    first = [e for e in log if e[2] == 0.0]
    assert [e[:2] for e in first] == [(f"q{k}", 3 + k) for k in range(4)] and all(e[3] == 1.0 for e in first)
    retries = [e for e in log if e[2] != 0.0]  # greedy first tries, retries sampled at 0.8 / 0.95
    assert [e[0] for e in retries] == ["q1", "q2", "q2"] and all(e[2:] == (0.8, 0.95) for e in retries)
    q2 = [e[1] for e in log if e[0] == "q2"]
    assert len(set(q2)) == 3  # every try of an item has its own seed
    # The seeds depend on (seed, item, try) only: the same with another batch size.
    assert sorted(runs[1][1]) == sorted(log)
    # 0 retries = off
    log0 = []
    outs0 = generate("no-retries", log0, "eval.format_retries=0", "eval.batch_size=8")
    assert [o.tries for o in outs0] == [1] * 4 and len(log0) == 4 and not outs0[1].valid
    with pytest.raises(TpoError, match="retry_temperature: must be > 0"):
        ev.EvalConfig(retry_temperature=0.0)


def test_retries_reported_in_result_and_markdown(tmp_path):
    items = _items(4)
    outs = _outs(items, ["a b", "a b c", "", "a"], "m", valid=[True, True, False, True])
    outs[1].tries, outs[2].tries = 2, 3
    r = cp.absolute_eval(items, outs, _LengthJudge(), ev.EvalConfig(n_boot=50))
    assert (r["model_lengths"]["n_retried"], r["model_lengths"]["n_invalid"]) == (2, 1)
    ev.write_model_outputs(tmp_path / "o", outs)
    assert [o.tries for o in ev.read_outputs(tmp_path / "o")] == [1, 2, 3, 1]
    jp, mp = cp.write_result(tmp_path / "o", r, cp.decoding_record(ev.EvalConfig()))
    assert "Format retries: 2 of 4 outputs had a format error and were re-sampled; 1 stayed invalid" in open(mp).read()
    assert json.loads(open(jp).read())["decoding"]["format_retries"] == 2
    cmp = cp.compare_outputs(items, outs, _outs(items, ["x"] * 4, "b"), _LengthJudge(), ev.EvalConfig(n_boot=50))
    assert "2 of 4 outputs had a format error" in cp.render_markdown(cmp)


def _server_config(tmp_path, *overrides):
    """A run config whose sampling backend is a server (groups of 2 items): only the tokenizer is loaded, the
    sampler is scripted."""
    from tpo_lite.config import load_config

    return load_config(_tiny_run_config(tmp_path), ["sampling.backend=openai", "sampling.concurrency=2",
                                                    "eval.batch_size=2", *overrides])


def test_model_outputs_resume_after_kill_is_exact(tmp_path):
    pytest.importorskip("tpo_lite.models")
    config = _server_config(tmp_path)
    items = ev.load_eval_set(config.eval.eval_set)
    fails = {"h1": 1, "h3": 5}
    full_log = []
    full = ev.model_outputs(config, items, tmp_path / "full" / "outputs.jsonl", generator="m", progress=False,
                            echo=lambda s: None, sampler_factory=_scripted_factory(full_log, fails))
    assert [o.tries for o in full] == [1, 2, 1, 3, 1]
    # Killed in the second group (items h2, h3) after h2's first try: group 1 is on disk, group 2 is not.
    log = []
    path = tmp_path / "killed" / "outputs.jsonl"
    with pytest.raises(KeyboardInterrupt):
        ev.model_outputs(config, items, path, generator="m", progress=False, echo=lambda s: None,
                         sampler_factory=_scripted_factory(log, fails, stop_after=4))
    from tpo_lite.jsonl import read_records

    assert list(read_records(path, key="id")) == ["h0", "h1"]
    log2 = []
    resumed = ev.model_outputs(config, items, path, generator="m", progress=False, echo=lambda s: None,
                               sampler_factory=_scripted_factory(log2, fails))
    assert [dataclasses.asdict(o) for o in resumed] == [dataclasses.asdict(o) for o in full]
    assert {e[0] for e in log2} == {"h2", "h3", "h4"}  # finished groups are not generated again
    # Everything on disk: nothing is loaded or sampled.
    log3 = []
    again = ev.model_outputs(config, items, path, generator="other", progress=False, echo=lambda s: None,
                             sampler_factory=_scripted_factory(log3, fails))
    assert log3 == [] and [o.generator for o in again] == ["other"] * 5
    # Outputs of other settings are never mixed in.
    with pytest.raises(TpoError, match="other settings"):
        ev.model_outputs(_server_config(tmp_path, "eval.seed=9"), items, path, progress=False, echo=lambda s: None,
                         sampler_factory=_scripted_factory([], fails))


# ------------------------------------------------------------------------------------------------ evaluation judge


def test_eval_judge_table_and_reward_hacking_warning(tmp_path, monkeypatch):
    """`tpo-lite eval` judges with [eval_judge] when the config has one; with the learned [judge] the run optimised
    it warns on stderr (one line); the programmatic judge (the task's own checks) never warns."""
    pytest.importorskip("tpo_lite.models")
    from click.testing import CliRunner

    from tpo_lite import judges
    from tpo_lite.cli import main

    used = []

    def fake_make_judge(cfg, cache_path=None, **kw):
        used.append((cfg.kind, cfg.model))
        return _LengthJudge()

    monkeypatch.setattr(judges, "make_judge", fake_make_judge)
    cfg = _tiny_run_config(tmp_path)
    base = open(cfg).read() + '\n[judge]\nkind = "reward_model"\nmodel = "/rm"\n'
    runs = {"same": base, "other": base + '\n[eval_judge]\nkind = "programmatic"\n',
            "programmatic": open(cfg).read()}
    out = str(tmp_path / "abs")
    for k, (name, text) in enumerate(runs.items()):
        _write(tmp_path / f"{name}.toml", text)
        r = CliRunner().invoke(main, ["eval", str(tmp_path / f"{name}.toml"), "-i", "seed", "--no-progress",
                                      "--absolute", "--set", "loop.heldout_judge=judge", "--out", out])
        assert r.exit_code == 0, r.output
        warnings = [ln for ln in r.stderr.splitlines() if "reward hacking" in ln]
        assert len(warnings) == (1 if name == "same" else 0), r.stderr
        if name == "same":
            assert warnings[0] == ("warning: evaluating with the reward_model judge the run optimised (/rm): this "
                                   "measures reward hacking, not quality; set [eval_judge]")
        # The outputs of the first call are reused (same generation settings): generated once only.
        assert ("generating" in r.stderr) == (k == 0)
    assert used == [("reward_model", "/rm"), ("programmatic", ""), ("programmatic", "")]


def test_cli_eval_absolute_scores_like_the_runs_held_out_score(tmp_path, monkeypatch):
    """`tpo-lite eval --absolute` on instructions that all have checks gives the held-out number of `tpo-lite run`:
    the bare fraction of checks passed, not the evaluation judge's near-miss credit (whatever [judge] is)."""
    from click.testing import CliRunner

    from tpo_lite import judges
    from tpo_lite.cli import main
    from tpo_lite.judges.programmatic import ProgrammaticJudge

    monkeypatch.setattr(judges, "make_judge", lambda cfg, cache_path=None, **kw: ProgrammaticJudge(tie_weight=0.25))
    cfg = _tiny_run_config(tmp_path)  # max_words 3..7 on h0..h4
    ins = [json.loads(line) for line in open(tmp_path / "heldout.jsonl")]
    outs = _write(tmp_path / "outs.json", json.dumps([
        {"instruction": r["instruction"], "output": " ".join(["w"] * (4 + k)), "generator": "m"}
        for k, r in enumerate(ins)]))  # 4..8 words: each one word over its limit
    r = CliRunner().invoke(main, ["eval", cfg, "--outputs", outs, "--absolute", "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert [i["score"] for i in res["items"]] == [0.0] * 5 and res["mean_score"] == 0.0
    assert res["per_check"] == [{"type": "max_words", "n": 5, "passed": 0, "pass_rate": 0.0}]
    # the evaluation judge, asked for, gives its near-miss credit
    r = CliRunner().invoke(main, ["eval", cfg, "--outputs", outs, "--absolute", "--set", "loop.heldout_judge=judge",
                                  "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b" / "eval.json").read_text())["mean_score"] > 0.1


def test_reward_hacking_warning_rules():
    from tpo_lite.config import RunConfig
    from tpo_lite.judges import JudgeConfig

    rm = JudgeConfig(kind="reward_model", model="/rm")
    pw = JudgeConfig(kind="pairwise", base_url="http://127.0.0.1:1/v1", served_model="judge")

    def cfg(judge, eval_judge=None):
        return dataclasses.replace(RunConfig.default(), judge=judge, eval_judge=eval_judge)

    assert "reward hacking" in cp.reward_hacking_warning(cfg(rm))
    assert "judge at http://127.0.0.1:1/v1" in cp.reward_hacking_warning(cfg(pw))
    assert "reward hacking" in cp.reward_hacking_warning(cfg(rm, JudgeConfig(kind="reward_model", model="/rm",
                                                                             batch_size=2)))
    assert cp.reward_hacking_warning(cfg(rm, JudgeConfig(kind="reward_model", model="/other-rm"))) is None
    assert cp.reward_hacking_warning(cfg(rm, JudgeConfig(kind="programmatic"))) is None
    assert cp.reward_hacking_warning(cfg(JudgeConfig(kind="programmatic"))) is None
    assert cp.eval_judge_config(cfg(rm)) is rm and cp.eval_judge_config(cfg(rm, pw)) is pw
    # a reward function declared learned (it runs a model) warns when it also evaluates; another function not
    fn = JudgeConfig(kind="function", function="my_rewards:rm_score", function_learned=True)
    assert "my_rewards:rm_score" in cp.reward_hacking_warning(cfg(fn))
    assert cp.reward_hacking_warning(cfg(fn, JudgeConfig(kind="function", function="my_rewards:other",
                                                         function_learned=True))) is None
    assert cp.reward_hacking_warning(cfg(JudgeConfig(kind="function", function="my_rewards:rule"))) is None


def test_eval_passes_the_response_budget_through():
    from tpo_lite.config import RunConfig
    from tpo_lite.experiment import experiment_configs
    from tpo_lite.sampling import SamplingConfig

    run = SamplingConfig(response_budget=30, thought_budget=40, max_new_tokens=64)
    assert ev.eval_sampling_config(run, ev.EvalConfig()).response_budget == 30  # 0 = the [sampling] value
    scfg = ev.eval_sampling_config(run, ev.EvalConfig(response_budget=50, max_new_tokens=100))
    assert (scfg.response_budget, scfg.thought_budget, scfg.max_new_tokens) == (50, 40, 100)
    assert ev.retry_sampling_config(scfg, ev.EvalConfig()).response_budget == 50
    assert cp.decoding_record(ev.EvalConfig(), run)["response_budget"] == 30
    # The experiment: TPO and direct outputs get the same response budget; only TPO's thought has a budget.
    cfgs = experiment_configs(RunConfig.default().replace("sampling", response_budget=30, thought_budget=40))
    tpo, direct = (ev.eval_sampling_config(cfgs[k].sampling, cfgs[k].eval) for k in ("tpo", "direct"))
    assert tpo.response_budget == direct.response_budget == 30
    assert (tpo.thought_budget, direct.thought_budget) == (40, None)
    with pytest.raises(TpoError, match="response_budget: must be >= 0"):
        ev.EvalConfig(response_budget=-1)


def test_the_experiment_example_trains_the_main_recipe():
    """examples/direct_vs_tpo.toml's TPO run is examples/smollm2_cpu.toml but for resume-safe loop options, so a
    finished main run resumes as the experiment's TPO run (the README's measured experiment did that)."""
    from pathlib import Path

    from tpo_lite.config import load_config
    from tpo_lite.experiment import experiment_configs
    from tpo_lite.guard import RESUME_SAFE, _config_diff

    examples = Path(__file__).resolve().parents[1] / "examples"
    main = load_config(examples / "smollm2_cpu.toml")
    tpo = experiment_configs(load_config(examples / "direct_vs_tpo.toml"))["tpo"]
    diff = {(sec, key) for sec, key, _, _ in _config_diff(main.to_dict(), tpo.to_dict())}
    assert diff and diff <= RESUME_SAFE

