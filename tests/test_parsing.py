"""Output grammar: real-looking outputs (incl. SmolLM-style failures) for each template."""
import re

import pytest

from tpo_lite.parsing import Parsed, parse_output
from tpo_lite.prompts import BUILTIN, GENERIC_WRAPPER

G, S, D = BUILTIN["generic"], BUILTIN["specific"], BUILTIN["direct"]

# (output, thought, response) -- all valid under the generic template.
GENERIC_VALID = [
    ("Here is my thought process: The user wants a haiku.\nHere is my response: Leaves fall softly.",
     "The user wants a haiku.", "Leaves fall softly."),
    ("Here's my thought process:\n- short\n- polite\n\nHere's my response:\nDear Sam, thanks!\n",
     "- short\n- polite", "Dear Sam, thanks!"),
    ("**Here is my thought process:**\nI should list three.\n\n**Here is my response:**\n\n1. A\n2. B\n3. C",
     "I should list three.", "1. A\n2. B\n3. C"),
    ("## Here is my thought process\nPlan it.\n## Here is my response\nThe plan.", "Plan it.", "The plan."),
    ("HERE IS MY THOUGHT PROCESS: x\nHERE IS MY RESPONSE: Y", "x", "Y"),
    # Pre-filled prompt: the output starts inside the thoughts, no thought marker.
    (" I need to be brief.\n\nHere is my response: Hi there.", "I need to be brief.", "Hi there."),
    # A preamble before the thought marker is dropped from the thought (as vLLM's granite parser).
    ("Sure! Here is my thought process: think.\nHere is my response: answer", "think.", "answer"),
    # Curly apostrophe, emphasis with the colon outside.
    ("Here’s my thought process: a\n*Here’s my response*: b", "a", "b"),
    # No thought at all before the response marker: valid with an empty thought.
    ("Here is my response: Paris.", "", "Paris."),
]


@pytest.mark.parametrize("text,thought,response", GENERIC_VALID)
def test_generic_valid(text, thought, response):
    assert parse_output(text, G) == Parsed(thought, response, True, None)


def test_first_response_marker_wins_for_generic():
    text = ("Here is my thought process: plan\nHere is my response: Answer one.\n"
            "Here is my response: Answer two.")
    r = parse_output(text, G)
    assert r.thought == "plan"
    assert r.response == "Answer one.\nHere is my response: Answer two."


def test_generic_matches_granite_regex_on_well_formed_output():
    # vLLM's granite parser: (?:Here's|Here is) my thought process:(.*?)(?:Here's|Here is) my response:(.*)
    granite = re.compile(r"(?:Here's|Here is) my thought process:(.*?)(?:Here's|Here is) my response:(.*)",
                         re.DOTALL)
    for text in ["Here is my thought process: a b\nHere's my response: c\nHere is my response: d",
                 "Here's my thought process:\n\nx\n\nHere is my response:\n\ny z\n",
                 "Here is my thought process: t Here is my thought process: u Here is my response: v"]:
        thought, response = granite.findall(text)[0]
        r = parse_output(text, G)
        assert (r.thought, r.response) == (thought.strip(), response.strip())


def test_thought_marker_after_response_stays_in_response():
    r = parse_output("Here is my response: Hi.\nHere is my thought process: more", G)
    assert r.valid and r.thought == "" and r.response == "Hi.\nHere is my thought process: more"


# SmolLM2-135M-style failures.
def test_plain_answer_without_markers_is_invalid():
    r = parse_output("Sure! The capital of France is Paris.", G)
    assert r == Parsed("Sure! The capital of France is Paris.", "", False, "no_response_marker")


def test_echoed_instruction_with_quoted_markers_is_not_a_split():
    echo = ('You can write your thoughts after "Here is my thought process:" and write your response after '
            '"Here is my response:". The answer is 4.')
    r = parse_output(echo, G)
    assert not r.valid and r.invalid_reason == "no_response_marker"
    # ...but a real marker after the echo still counts.
    r = parse_output(echo + "\nHere is my response: 4", G)
    assert r.valid and r.response == "4" and r.thought.endswith("The answer is 4.")
    # Single quotes and the whole wrapper echoed back.
    r = parse_output(GENERIC_WRAPPER.replace('"', "'").format(instruction="hi"), G)
    assert r.invalid_reason == "no_response_marker"
    # A quote on one side only is not a mention: the response may itself start with a quote.
    r = parse_output('Here is my thought process: x\nHere is my response:"Hi," she said.', G)
    assert r.valid and r.response == '"Hi," she said.'
    r = parse_output('Here is my response:\n"All quoted."', G)
    assert r.valid and r.response == '"All quoted."'


def test_observed_smollm2_outputs():
    # Excerpts of real SmolLM2-135M-Instruct samples (generic template, prefilled thought header, T=0.8).
    mid_sentence = (" I started with 10 apples and gave away 11 apples. This means Tom now has 10 + 11 = 21 apples."
                    "\n\nSo, here is my response: 21.\n\nHere is the process of my thought process: I started "
                    "with 10 apples.")
    r = parse_output(mid_sentence, G)
    assert r.valid and r.response.startswith("21.\n\nHere is the process") and r.thought.endswith("apples.\n\nSo,")
    # "the response" is not the Granite marker: not split (training must not reward a non-Granite marker).
    near = ("\nIt's essential to follow a standard routine in your new job.\nHere's the response:\nWhen starting "
            "a new job, it's crucial to establish a routine.")
    assert parse_output(near, G).invalid_reason == "no_response_marker"
    quoted_start = ("I would suggest stretching before and after a workout.\n\nHere's my response:\n\n"
                    "\"Here is my response: Here's my answer: In this response, I will provide tips.\"")
    r = parse_output(quoted_start, G)
    assert r.valid and r.response.startswith("\"Here is my response: Here's my answer:")
    assert parse_output(" So, my response is:\n\nYes.", G).invalid_reason == "no_response_marker"


def test_only_thought_marker_is_invalid():
    r = parse_output("Here is my thought process: I will greet them warmly and", G)
    assert r == Parsed("I will greet them warmly and", "", False, "no_response_marker")


@pytest.mark.parametrize("text", ["Here is my thought process: x\nHere is my response:",
                                  "Here is my thought process: x\nHere is my response:   \n\n",
                                  "x\n**Here is my response:**\n**", "x Here is my response: ---"])
def test_empty_response_is_invalid(text):
    r = parse_output(text, G)
    assert (r.valid, r.invalid_reason, r.response) == (False, "empty_response", "")


def test_length_cut_is_invalid_even_with_markers():
    text = "Here is my thought process: a\nHere is my response: The three reasons are: first,"
    r = parse_output(text, G, finish_reason="length")
    assert (r.valid, r.invalid_reason) == (False, "truncated")
    assert r.response == "The three reasons are: first,"  # still split, for inspection
    assert parse_output(text, G, finish_reason="stop").valid
    assert parse_output("no markers", G, finish_reason="length").invalid_reason == "truncated"


def test_bad_finish_reason():
    with pytest.raises(ValueError, match="finish_reason"):
        parse_output("x", G, finish_reason="max_tokens")


def test_near_miss_markers_do_not_count():
    for text in ["Here is my response to your question: no", "Here is your response: no",
                 "My response: no", "Here is the response: no"]:
        assert parse_output(text, G).invalid_reason == "no_response_marker", text


# Specific template.
def test_specific_last_r_wins_and_closing_tag_is_dropped():
    text = ("Draft response: <R> Paris is the capital.\nEvaluation: too short, add a fact.\n"
            "<R> Paris is the capital of France and its largest city. </R>")
    r = parse_output(text, S)
    assert r.valid
    assert r.thought == "Draft response: <R> Paris is the capital.\nEvaluation: too short, add a fact."
    assert r.response == "Paris is the capital of France and its largest city."


@pytest.mark.parametrize("text,response", [("thoughts\n**<R>**\nFinal.", "Final."), ("t <r>: ok", "ok"),
                                           ("t\n<R>\n\nA\n\nB", "A\n\nB")])
def test_specific_marker_forms(text, response):
    r = parse_output(text, S)
    assert r.valid and r.response == response


def test_specific_failures():
    assert parse_output("I will write my answer after \"<R>\".", S).invalid_reason == "no_response_marker"
    assert parse_output("Draft: hi. Evaluation: fine. <R>", S).invalid_reason == "empty_response"
    assert parse_output("thought <R> </R>", S).invalid_reason == "empty_response"
    # Generic markers mean nothing to the specific template.
    assert parse_output("Here is my response: x", S).invalid_reason == "no_response_marker"


# Direct template.
def test_direct():
    assert parse_output("  Paris.\n", D) == Parsed("", "Paris.", True, None)
    # Markers are not interpreted: the whole output is the response.
    assert parse_output("Here is my response: x", D).response == "Here is my response: x"
    assert parse_output(" \n ", D) == Parsed("", "", False, "empty_response")
    assert parse_output("Paris", D, finish_reason="length") == Parsed("", "Paris", False, "truncated")
    assert parse_output(None, D).invalid_reason == "empty_response"


# One rule for "is the response marker used": the parser (final text) and the samplers (text still growing).
# (finished text, used in it, counted while streaming when the text ends there)
TRICKY = [
    ("Okay. Here is my response to the question: 4.", False, False),  # a partial marker grows into a near miss
    ("ok\nHere is my response", True, False),  # ends its line only because the text ends
    ("ok\nHere is my response\n", True, True),  # marker then newline
    ("ok\n## Here is my response\nYes.", True, True),
    ("ok\nHere is my response\r\nYes", True, True),
    ("ok\nHere is my responses are", False, False),
    ('Write it after "Here is my response:" as told.', False, False),  # quoted on both sides: a mention
    ("He said 'here is my response' twice.", False, False),
    ("“Here is my response:” is what I write.", False, False),  # curly quotes (several bytes each)
    ('He wrote "Here is my response: yes', True, True),  # a quote on one side only: a use
    ('ok "Here is my response:', True, False),  # quote before and the text ends: not decided yet
    ("ok\n**Here is my response:**\nYes.", True, True),  # markdown-wrapped
    ("ok\n**Here is my response**:\nYes.", True, True),
    ("ok\n**Here is my response**", True, False),
    ("Fine. Here's my response: yes", True, True),
    ("fine, here is my response: yes", True, True),
    ("Here’s my response:\nyes", True, True),
    ("ok Here is my response:", True, True),  # colon marker at the very end, no quote before: decided
    ("ok Here is my" + " \n" * 30 + "response: yes", True, True),  # any whitespace between the words
]


def _prefixes(text):
    """Every prefix as a streaming decoder sees it: per byte, a split UTF-8 character decoded as U+FFFD."""
    raw = text.encode()
    return [raw[:n].decode("utf-8", errors="replace") for n in range(1, len(raw) + 1)]


@pytest.mark.parametrize("text,used,streamed", TRICKY)
def test_streaming_marker_rule_agrees_with_the_parser(text, used, streamed):
    from tpo_lite.parsing import response_marker_uses

    final = response_marker_uses(text, G)
    assert bool(final) == used
    r = parse_output(text, G)
    assert (r.invalid_reason != "no_response_marker") == used
    if used:
        assert r.thought == text[:final[0].start()].strip()
    assert bool(response_marker_uses(text, G, final=False)) == streamed
    starts = {m.start() for m in final}
    seen = False
    for prefix in _prefixes(text):
        counted = response_marker_uses(prefix, G, final=False)
        # Counted while streaming => used in the finished text (same place); once counted, always counted.
        assert {m.start() for m in counted} <= starts, prefix
        assert bool(counted) or not seen, prefix
        seen = bool(counted)
