"""Instruction loading (JSONL / JSON), error locations, and the embedded sets."""
import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from tpo_lite.errors import TpoError
from tpo_lite.instructions import Instruction, embedded_path, load_embedded, load_instructions
from tpo_lite.judges.checks import CHECKS
from tpo_lite.judges.programmatic import ProgrammaticJudge

GOOD = {"id": "a", "instruction": "Say hi.", "category": "writing", "checks": [{"type": "max_words", "value": 5}]}


def _jsonl(tmp_path, records, name="set.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return p


def test_load_jsonl_and_defaults(tmp_path):
    p = _jsonl(tmp_path, [GOOD, "", {"id": "b", "instruction": "Count.", "extra": 1}])
    got = load_instructions(p)
    assert got == [Instruction("a", "Say hi.", "writing", [{"type": "max_words", "value": 5}]),
                   Instruction("b", "Count.", "uncategorised", [])]
    assert got[0].to_dict() == GOOD


def test_load_json_list_and_wrapped(tmp_path):
    p = tmp_path / "set.json"
    p.write_text(json.dumps([GOOD, {"id": "b", "instruction": "x"}], indent=2))
    assert [i.id for i in load_instructions(p)] == ["a", "b"]
    p.write_text(json.dumps({"instructions": [GOOD]}))
    assert load_instructions(p)[0].id == "a"
    # No extension: sniffed.
    q = tmp_path / "noext"
    q.write_text(json.dumps(GOOD) + "\n" + json.dumps({"id": "b", "instruction": "y"}) + "\n")
    assert len(load_instructions(q)) == 2


@pytest.mark.parametrize("bad,field,msg", [
    ({"instruction": "x"}, "id", "missing required field"),
    ({"id": "z"}, "instruction", "missing required field"),
    ({"id": 3, "instruction": "x"}, "id", "non-empty string"),
    ({"id": "z", "instruction": "  "}, "instruction", "non-empty string"),
    ({"id": "z", "instruction": "x", "category": 5}, "category", "non-empty string"),
    ({"id": "z", "instruction": "x", "checks": {"type": "lowercase"}}, "checks", "list of checks"),
    ({"id": "z", "instruction": "x", "checks": [{"type": "lowercase"}, {"type": "rhyme"}]}, "checks[1].type",
     "unknown check type 'rhyme'"),
    ({"id": "z", "instruction": "x", "checks": [{"type": "max_words", "value": "ten"}]}, "checks[0].value",
     "expected int"),
    ({"id": "a", "instruction": "again"}, "id", "duplicate id 'a' (first at line 1)"),
])
def test_jsonl_errors_name_file_line_field(tmp_path, bad, field, msg):
    p = _jsonl(tmp_path, [GOOD, "", bad])
    with pytest.raises(TpoError, match=re.escape(msg)) as ei:
        load_instructions(p)
    e = ei.value
    assert (e.path, e.line, e.field) == (str(p), 3, field)
    assert str(e).startswith(f"{p}:3: {field}: ")


def test_jsonl_syntax_error_and_non_object(tmp_path):
    p = _jsonl(tmp_path, [GOOD, '{"id": "b", "instruction": "x"'])
    with pytest.raises(TpoError, match="invalid JSON") as ei:
        load_instructions(p)
    assert ei.value.line == 2
    p = _jsonl(tmp_path, [GOOD, "[1, 2]"])
    with pytest.raises(TpoError, match="expected an object") as ei:
        load_instructions(p)
    assert ei.value.line == 2


def test_json_array_error_line(tmp_path):
    p = tmp_path / "set.json"
    p.write_text('[\n  {"id": "a", "instruction": "x"},\n  {"id": "b",\n   "instruction": ""}\n]\n')
    with pytest.raises(TpoError, match="instruction") as ei:
        load_instructions(p)
    assert ei.value.line == 3  # where the bad record starts
    p.write_text('[\n  {"id": "a", "instruction": "x"},\n  {"id": "b" "instruction": "y"}\n]')
    with pytest.raises(TpoError, match="invalid JSON") as ei:
        load_instructions(p)
    assert ei.value.line == 3


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(TpoError, match="not found"):
        load_instructions(tmp_path / "nope.jsonl")
    with pytest.raises(TpoError, match="no instructions"):
        load_instructions(_jsonl(tmp_path, [""]))
    with pytest.raises(TpoError, match="unknown embedded"):
        embedded_path("test")


@pytest.fixture(scope="module")
def embedded():
    return load_embedded("train"), load_embedded("heldout")


def test_embedded_sets_sizes_and_ids(embedded):
    train, held = embedded
    assert len(train) == 300 and len(held) == 100
    ids = [i.id for i in train + held]
    assert len(set(ids)) == len(ids)
    assert all(i.id.startswith("train-") for i in train) and all(i.id.startswith("heldout-") for i in held)
    assert os.path.basename(embedded_path("heldout")) == "heldout.jsonl"


def test_embedded_no_overlap(embedded):
    train, held = embedded
    assert not {i.instruction for i in train} & {i.instruction for i in held}
    # Stronger: no held-out *task* (instruction before its constraint sentences) is a training task.
    constraint = re.compile(r" (?:Use (?:no|at|the)|Write exactly|Write your entire|Format your|Divide your|"
                            r"Include the|Do not use|Start your|End your|Give your answer a title|Highlight at|"
                            r"At the end of your answer|Wrap your|Answer only with|Show your reasoning)")

    def task(text):
        m = constraint.search(text)
        assert m, text
        return text[:m.start()]
    assert not {task(i.instruction) for i in train} & {task(i.instruction) for i in held}
    assert len({i.instruction for i in train}) == 300 and len({i.instruction for i in held}) == 100


def test_embedded_checks_known_and_varied(embedded):
    train, held = embedded
    for ins in train + held:
        assert 1 <= len(ins.checks) <= 3, ins.id
        assert all(c["type"] in CHECKS for c in ins.checks)
    used = Counter(c["type"] for i in train + held for c in i.checks)
    assert set(used) == set(CHECKS)  # every check type is exercised by the data
    cats = Counter(i.category for i in train)
    assert len(cats) >= 12 and max(cats.values()) <= 0.2 * len(train)
    assert len({i.category for i in held}) >= 12


def test_embedded_math_answers_are_correct(embedded):
    # Recompute each math answer from the numbers in the problem text (independent of the generator).
    for ins in embedded[0] + embedded[1]:
        if ins.category != "math":
            continue
        nums = [int(x) for x in re.findall(r"\d+", ins.instruction.split("Show your reasoning")[0])]
        value = next(c["value"] for c in ins.checks if c["type"] == "numeric_answer")
        t = ins.instruction
        if "gives away" in t:
            expect = nums[0] - nums[1] + nums[2]
        elif "groups of" in t:
            expect = nums[0] / nums[1]
        elif "pages are left" in t:
            expect = nums[0] - nums[1] * nums[2]
        elif "change" in t:
            expect = nums[2] - nums[0] * nums[1]
        elif "in total" in t:
            expect = nums[0] + nums[1]
        else:
            expect = nums[0] * nums[1]
        assert value == expect, ins.id


def test_embedded_scores_spread(embedded):
    # Simple canned responses must not all tie: the judge separates them on the embedded data.
    judge = ProgrammaticJudge()
    canned = ["Sure! Here is my answer.", "- point one\n- point two\n- point three",
              "sure, here it is. hope this helps!", "<<Title>>\n\nA short answer of a few words. The total is 8.",
              "Well, this is a longer answer. It has three sentences, some commas, and the word very.\n\n"
              "It also has a second paragraph that ends with a number: 42. Thank you for reading.",
              "\"FIRSTLY, A SHOUTED ANSWER WITH *ONE* HIGHLIGHT.\""]
    spread = 0
    for ins in embedded[1]:
        scores = judge.score(ins, canned).scores
        assert all(0.0 <= s <= 1.0 for s in scores)
        spread += len(set(scores)) > 1
    # Ties left are instructions whose checks no canned text can touch (a specific number, keyword or JSON).
    assert spread >= 85  # of 100 held-out instructions


def test_generator_is_deterministic_and_matches_committed(tmp_path):
    # Rebuilding the sets gives exactly the committed files.
    script = os.path.join(os.path.dirname(embedded_path("train")), "build_sets.py")
    if not os.path.isfile(script):
        pytest.skip("build_sets.py is a source-tree script (not installed with the package)")
    code = ("import importlib.util, json, sys; s = importlib.util.spec_from_file_location('b', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); print(json.dumps(m.build()))")
    out = subprocess.run([sys.executable, "-c", code, script], capture_output=True, text=True, check=True).stdout
    built = json.loads(out)
    for split in ("train", "heldout"):
        committed = [json.loads(line) for line in embedded_path(split).read_text().splitlines()]
        assert built[split] == committed, split


# The held-out set every recorded run was scored on; a change to it would silently break every comparison.
HELDOUT_SHA256 = "99341b8fdebbd58fa1d7450d7b17b94359aadb7dcaa56f45a28c248e81a7d249"


def test_heldout_set_is_frozen():
    assert hashlib.sha256(embedded_path("heldout").read_bytes()).hexdigest() == HELDOUT_SHA256


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_embedded_length_limits_ask_less_and_more_equally(embedded, split):
    # "At most" and "at least" (words or sentences) about equally often, so DPO cannot win most training
    # instructions by answering shorter (the trained models drifted to short answers when it was 79:46).
    sets = dict(zip(("train", "heldout"), embedded))
    kinds = Counter(c["type"] for ins in sets[split] for c in ins.checks)
    less, more = kinds["max_words"] + kinds["max_sentences"], kinds["min_words"] + kinds["min_sentences"]
    assert less + more >= 0.1 * len(sets[split])
    assert abs(less - more) <= 0.1 * (less + more), (less, more)
