"""The `think` output format (<think> thought </think> response), what the export says about serving each
format, and prompts.chat_template_kwargs -- with tiny random models and tokenizers built here.

The vLLM parsers are not installed here: their rule is applied as written in vLLM's source (cited at each
function), not guessed."""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from tpo_lite.errors import TpoError
from tpo_lite.parsing import _ONLY_DEBRIS, parse_output, response_marker_uses
from tpo_lite.prompts import PromptConfig, build_prompt, get_template

THINK = get_template("think")
CORPUS = [
    "<think>\nI should answer briefly and follow every rule.\n</think>\n\nthe answer is short and clear.",
    "Respond to the following user query in a comprehensive and detailed way. User query: name a colour",
    "apple pear plum fig kiwi lime lemon melon grape peach hello world",
]
# A Qwen3-like switch: the template reads enable_thinking (here it writes a system turn when it is false).
QWEN_LIKE = ("{% if enable_thinking is defined and not enable_thinking %}<|im_start|>system\nno native thinking"
             "<|im_end|>\n{% endif %}"
             "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "apple pear plum fig kiwi lime lemon melon grape peach".split()


def think_tokenizer(chat_template=QWEN_LIKE, tags_as_tokens=True, special=False):
    """A byte-level BPE tokenizer; with ``tags_as_tokens`` <think> and </think> are single added tokens (as in
    Qwen3's and DeepSeek-R1's tokenizers), normal (kept in decoded text) unless ``special``."""
    from tiny_models import byte_bpe_tokenizer
    from tokenizers import AddedToken

    tok = byte_bpe_tokenizer(CORPUS, chat_template)
    if tags_as_tokens:
        tags = [AddedToken(t, special=special, normalized=False) for t in ("<think>", "</think>")]
        if special:
            tok.add_special_tokens({"additional_special_tokens": tags})
        else:
            tok.add_tokens(tags)
    return tok


def build_tiny_model(path: Path, tok) -> Path:
    from tiny_models import tiny_llama

    path.mkdir(parents=True, exist_ok=True)
    tiny_llama(len(tok), tokenizer=tok, max_position_embeddings=512, tie_word_embeddings=False).save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------ the real parsers' rules, as written in vLLM

def vllm_think_split(model_output: str) -> tuple[str | None, str | None]:
    """vLLM's deepseek_r1 / qwen3 non-streaming split: vllm/reasoning/basic_parsers.py,
    BaseThinkingReasoningParser.extract_reasoning (DeepSeekR1ReasoningParser inherits it;
    Qwen3ReasoningParser.extract_reasoning does the same when the output has </think>)."""
    parts = model_output.partition("<think>")
    model_output = parts[2] if parts[1] else parts[0]
    if "</think>" not in model_output:
        return model_output, None
    reasoning, _, content = model_output.partition("</think>")
    return reasoning, content or None


def vllm_think_parser_accepts(tokenizer) -> bool:
    """BaseThinkingReasoningParser.__init__ (same file): start/end token ids from tokenizer.get_vocab()
    (abs_reasoning_parsers.py ReasoningParser.vocab); a RuntimeError when either is missing."""
    vocab = tokenizer.get_vocab()
    return vocab.get("<think>") is not None and vocab.get("</think>") is not None


GRANITE = re.compile(r"(?:Here's|Here is) my thought process:(.*?)(?:Here's|Here is) my response:(.*)", re.DOTALL)


def vllm_granite_split(model_output: str) -> tuple[str | None, str | None]:
    """vllm/reasoning/granite_reasoning_parser.py, GraniteReasoningParser.extract_reasoning_content."""
    m = GRANITE.findall(model_output)
    if not m:
        return None, model_output
    reasoning, response = m[0]
    return reasoning, response or None


def assert_same_split(text: str, finish_reason: str = "eos", parsed=None):
    """Our parse of ``text`` equals vLLM's split, up to the whitespace both ends of each part (which we strip)
    and a response of only markdown debris (which we empty)."""
    parsed = parsed or parse_output(text, THINK, finish_reason)
    reasoning, content = vllm_think_split(text)
    assert parsed.thought == (reasoning or "").strip(), text
    content = (content or "").strip()
    assert parsed.response == ("" if _ONLY_DEBRIS.match(content) else content), text


# --------------------------------------------------------------------------------------------- parsing

@pytest.mark.parametrize("text,thought,response,valid", [
    ("<think>\nhmm\n</think>\n\nBlue.", "hmm", "Blue.", True),
    ("hmm\n</think>\n\nBlue.", "hmm", "Blue.", True),                   # <think> pre-filled in the prompt
    ("Sure. <think>hmm</think>Blue", "hmm", "Blue", True),              # a preamble is dropped
    ("a</think>b</think>c", "a", "b</think>c", True),                   # the first </think> wins
    ("hmm </THINK> Blue", "hmm </THINK> Blue", "", False),               # exact tags only
    ("hmm < /think> Blue", "hmm < /think> Blue", "", False),
    ("hmm\n</think>\n\n", "hmm", "", False),
])
def test_think_parse_matches_vllm_split(text, thought, response, valid):
    p = parse_output(text, THINK)
    assert (p.thought, p.response, p.valid) == (thought, response, valid)
    assert_same_split(text)


def test_quoted_think_tag_is_a_mention_as_for_every_marker():
    # The one marker rule (parsing.response_marker_uses): a tag in quotes on both sides is not a use. vLLM
    # splits at it anyway -- the documented difference, shown here.
    text = 'The prompt says to end with "</think>" first.\n</think>\n\nBlue.'
    p = parse_output(text, THINK)
    assert (p.thought, p.response) == ('The prompt says to end with "</think>" first.', "Blue.")
    assert vllm_think_split(text)[0] == 'The prompt says to end with "'
    # Streaming: a tag right after an open quote is undecided until the next character.
    assert response_marker_uses('say "</think>', THINK, final=False) == []
    assert len(response_marker_uses('say "</think> now', THINK, final=False)) == 1
    assert len(response_marker_uses("done</think>", THINK, final=False)) == 1  # no line end needed


def test_forced_text_and_prefill():
    assert THINK.forced_response_text == "\n</think>\n\n"
    assert parse_output("I think" + THINK.forced_response_text + "Blue.", THINK) == \
        parse_output("I think\n</think>\n\nBlue.", THINK)
    tok = think_tokenizer()
    prompt = build_prompt(tok, "Name a colour.", THINK, prefill_thought_header=True)
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert '"<think>" and "</think>"' in prompt


def test_forcing_completes_a_quoted_tag_with_a_line_end_only():
    from tpo_lite.sampling import SamplingConfig, _Forcing

    f = _Forcing(THINK, think_tokenizer(), SamplingConfig(thought_budget=4, max_new_tokens=16))
    assert f.completion("hmm")[0] == "\n</think>\n\n"
    # '"</think>' at the end: the line end makes it a use (quote on one side only), no second tag is forced.
    text, _ = f.completion('hmm "</think>')
    assert text == "\n" and parse_output('hmm "</think>' + text + "Blue", THINK).response == "Blue"


def test_a_special_tag_token_is_refused():
    # Outputs are decoded without special tokens: a special </think> would vanish from every output.
    tok = think_tokenizer(special=True)
    with pytest.raises(TpoError, match="special token"):
        build_prompt(tok, "Name a colour.", THINK)


# ------------------------------------------------------------------------------------- chat_template_kwargs

def test_chat_template_kwargs_reach_the_seed_template():
    tok = think_tokenizer()
    plain = build_prompt(tok, "Hi.", PromptConfig(template="think"))
    off = build_prompt(tok, "Hi.", PromptConfig(template="think", chat_template_kwargs={"enable_thinking": False}))
    assert "no native thinking" not in plain
    assert off.startswith("<|im_start|>system\nno native thinking<|im_end|>\n") and off.endswith(plain)
    assert build_prompt(tok, "Hi.", THINK, chat_template_kwargs={"enable_thinking": False}) == off


@pytest.mark.parametrize("kwargs,match", [
    ({"messages": []}, "set by tpo-lite"), ({"tpo_thought_prompt": True}, "set by tpo-lite"),
    ({"add_generation_prompt": False}, "set by tpo-lite"), ({"bad-name": 1}, "not a name"),
    ({"x": float("nan")}, "finite"), ({"x": [1, float("inf")]}, "finite"),
])
def test_bad_chat_template_kwargs(kwargs, match):
    with pytest.raises(TpoError, match=match):
        PromptConfig(chat_template_kwargs=kwargs)


def test_chat_template_kwargs_from_toml_and_set(tmp_path):
    from tpo_lite.config import load_config, to_toml

    p = tmp_path / "c.toml"
    p.write_text('[prompts]\ntemplate = "think"\nchat_template_kwargs = {enable_thinking = false}\n')
    cfg = load_config(p)
    assert cfg.prompts.chat_template_kwargs == {"enable_thinking": False}
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert load_config(again).prompts.chat_template_kwargs == {"enable_thinking": False}
    cfg = load_config(None, ["prompts.chat_template_kwargs={enable_thinking=true, budget=3}"])
    assert cfg.prompts.chat_template_kwargs == {"enable_thinking": True, "budget": 3}
    with pytest.raises(TpoError, match="chat_template_kwargs.messages"):
        load_config(None, ["prompts.chat_template_kwargs={messages=1}"])


def test_exported_template_keeps_the_seed_enable_thinking_and_the_run_kwargs():
    from tpo_lite.export import thought_chat_template

    seed = think_tokenizer()
    cfg = PromptConfig(template="think", prefill_thought_header=True, chat_template_kwargs={"enable_thinking": False})
    want = build_prompt(seed, "Hi.", cfg)
    tok = think_tokenizer()
    tok.chat_template = thought_chat_template(QWEN_LIKE, THINK, True, None, cfg.chat_template_kwargs)
    msgs = [{"role": "user", "content": "Hi."}]
    render = lambda **kw: tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)  # noqa: E731
    assert render() == want  # the run's enable_thinking=false is the default
    # enable_thinking is the seed's variable: passing it changes the seed's part only, never the thought prompt.
    assert render(enable_thinking=True) == build_prompt(seed, "Hi.", THINK, True, chat_template_kwargs={})
    assert THINK.wrap("Hi.") in render(enable_thinking=False)
    # tpo_thought_prompt=False: the seed's own prompt, as its template renders it without the run's kwargs.
    assert render(tpo_thought_prompt=False) == seed.apply_chat_template(msgs, tokenize=False,
                                                                        add_generation_prompt=True)


# ---------------------------------------------------------------------------------------- model card

def test_card_says_only_what_is_true_about_granite():
    from tpo_lite.export import model_card

    generic = get_template("generic")
    prefilled = model_card(generic, "m", "a", True, None)
    assert "--reasoning-parser granite" not in prefilled and "Do not use vLLM's `granite`" in prefilled
    # Why: with the header in the prompt, granite's rule finds no thought header and returns it all as content.
    out = "I should be brief.\n\nHere is my response: Blue."
    assert vllm_granite_split(out) == (None, out)
    assert parse_output(out, generic).response == "Blue."
    written = model_card(generic, "m", "a", False, None)
    assert "--reasoning-parser granite" in written and "only when the model itself wrote" in written
    assert vllm_granite_split("Here is my thought process: hm Here is my response: Blue.") == (" hm ", " Blue.")
    for name in ("specific", "specific_tags", "direct"):
        assert "reasoning-parser" not in model_card(get_template(name), "m", "a", True, None)


def test_card_for_think_depends_on_the_tokenizer():
    from tpo_lite.export import model_card, think_tags_are_tokens

    with_tags, without = think_tokenizer(), think_tokenizer(tags_as_tokens=False)
    assert think_tags_are_tokens(with_tags) and vllm_think_parser_accepts(with_tags)
    assert not think_tags_are_tokens(without) and not vllm_think_parser_accepts(without)
    assert not think_tags_are_tokens(think_tokenizer(special=True))  # accepted by vLLM, but dropped from the text
    yes = model_card(THINK, "m", "a", True, None, think_tokens=True)
    assert "`vllm serve THIS_DIR --reasoning-parser deepseek_r1` (or `qwen3`)" in yes
    no = model_card(THINK, "m", "a", True, None, think_tokens=False)
    assert "--reasoning-parser deepseek_r1" not in no and "does not have them" in no
    code = re.search(r"```python\n(.*?)```", yes, re.S).group(1)
    ns = {}
    exec(code, ns)
    assert ns["split_thought"]("hm\n</think>\n\nBlue.") == ("hm", "Blue.")
    assert ns["split_thought"]("hm </THINK> Blue") == ("hm </THINK> Blue", None)


# ------------------------------------------------------------------------ the loop and export, end to end

class ThinkScriptedSampler:
    """Think-format outputs chosen by each sample's seed (a random model never writes the tags): pre-filled
    (no <think>) or written out, some with a quoted "</think>" mention in the thought, some never closing the
    thought (invalid). Real token ids from the tiny tokenizer."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def _one(self, index, seed):
        from tpo_lite.sampling import Sample

        rng = random.Random(seed)
        resp = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.5:
            resp = "apple " + resp
        thought = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        if rng.random() < 0.2:
            thought += ' then "</think>" as asked'
        head = "<think>\n" if rng.random() < 0.3 else ""
        r = rng.random()
        text = f"{head}{thought}" if r < 0.15 else f"{head}{thought}\n</think>\n\n{resp}"
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return Sample(index=index, seed=seed, text=text, token_ids=ids, finish_reason="eos", forced=False)

    def sample(self, jobs, k=None, skip=()):
        for job in jobs:
            if job.prompt_id not in skip:
                yield job.prompt_id, [self._one(i, s) for i, s in enumerate(job.seeds[:k])]


def _instructions(path: Path, n: int, prefix: str) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{prefix}-{i:03d}", "instruction": f"Name some fruits ({i}), briefly.",
                                "checks": [{"type": "max_words", "value": 3 + i % 3}, {"type": "lowercase"},
                                           {"type": "include_words", "words": ["apple"]}]}) + "\n")
    return path


def test_think_run_through_the_loop_and_export_split_like_vllm(tmp_path):
    from test_loop import model_table
    from tpo_lite.cli.model_cmds import export_command
    from tpo_lite.config import load_config
    from tpo_lite.jsonl import read_records
    from tpo_lite.loop import run
    from tpo_lite.sampling import LocalSampler, SamplingConfig, make_job
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = build_tiny_model(tmp_path / "model", think_tokenizer())
    train = _instructions(tmp_path / "train.jsonl", 8, "tr")
    heldout = _instructions(tmp_path / "heldout.jsonl", 2, "ho")
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(f"""
{model_table(model_dir)}

[prompts]
template = "think"
prefill_thought_header = true
chat_template_kwargs = {{enable_thinking = false}}

[sampling]
k = 4
max_new_tokens = 16
batch_size = 4
seed = 3

[judge]
kind = "programmatic"

[train]
learning_rate = 1e-3
batch_size = 2
epochs = 1

[loop]
name = "think"
runs_root = "{tmp_path / 'runs'}"
iterations = 1
prompts_per_iteration = 5
train_instructions = "{train}"
eval_before = false

[eval]
eval_set = "{heldout}"
max_instructions = 2
max_new_tokens = 8
n_boot = 50
""")
    cfg = load_config(cfg_path)
    factory = lambda config, model, tokenizer, template, adapter=None, progress=True: \
        ThinkScriptedSampler(tokenizer)  # noqa: E731
    summary = run(cfg, progress=False, echo=lambda s: None, sampler_factory=factory)
    rd = tmp_path / "runs" / "think"
    seed_tok = AutoTokenizer.from_pretrained(model_dir)
    samples = read_records(rd / "iter_01" / "samples.jsonl", key="prompt_id")
    assert len(samples) == 5
    mentions = 0
    for rec in samples.values():
        # The prompt went through the seed template with the run's chat_template_kwargs, pre-filled.
        assert rec["prompt_text"] == build_prompt(seed_tok, rec["instruction"], cfg.prompts)
        assert rec["prompt_text"].startswith("<|im_start|>system\nno native thinking")
        assert rec["prompt_text"].endswith("<|im_start|>assistant\n<think>\n")
        for s in rec["samples"]:
            p = parse_output(s["text"], THINK, s["finish_reason"])
            assert (p.thought, p.response, p.valid) == (s["thought"], s["response"], s["valid"])
            if '"</think>"' in s["text"]:
                mentions += 1  # the documented difference (quoted mention), checked above
                continue
            assert_same_split(s["text"], s["finish_reason"], p)
    assert mentions >= 1
    pairs = read_records(rd / "iter_01" / "pairs.jsonl")
    assert pairs and all("</think>" in p["chosen_text"] for p in pairs)
    assert (rd / "iter_01" / "adapter").is_dir() and summary["final_adapter"]
    # A resume reads the resolved config.toml (with the kwargs table) back and has nothing left to do.
    assert run(cfg, progress=False, echo=lambda s: None, sampler_factory=factory)["iterations"] == \
        summary["iterations"]

    out = tmp_path / "exported"
    r = CliRunner().invoke(export_command, [str(out), "--run", str(rd)])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "tpo_lite_export.json").read_text())
    assert info["template"] == "think" and info["chat_template_kwargs"] == {"enable_thinking": False}
    card = (out / "README.md").read_text()
    assert "--reasoning-parser deepseek_r1" in card and "granite" not in card
    tok = AutoTokenizer.from_pretrained(out)
    assert vllm_think_parser_accepts(tok)
    msgs = [{"role": "user", "content": "Name a fruit."}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == build_prompt(seed_tok, "Name a fruit.", cfg.prompts)

    # Outputs of the exported model (budget forcing closes the thought with </think>), split both ways.
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    scfg = SamplingConfig(k=4, batch_size=4, max_new_tokens=24, thought_budget=6, temperature=1.0, top_p=1.0,
                          seed=5)
    sampler = LocalSampler(model, tok, scfg, THINK, progress=False)
    end_id = tok.convert_tokens_to_ids("</think>")
    (_, outs), = sampler.sample([make_job("p", prompt, tok, scfg)], 4)
    assert all(s.forced and THINK.forced_response_text in s.text for s in outs)
    for s in outs:
        # vLLM's streaming path finds the end of the thought by this token id (basic_parsers.py
        # extract_reasoning_streaming): the forced tag is that single token.
        assert end_id in s.token_ids
        assert_same_split(s.text, s.finish_reason)
