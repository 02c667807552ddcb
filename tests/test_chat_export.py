"""Tests for `tpo-lite export` (merged weights, thought chat template, model card) and `tpo-lite chat`, with a
tiny random llama model and tokenizer built here."""
import json
import re

import pytest
import torch
from click.testing import CliRunner

from tpo_lite.cli.model_cmds import chat_command, export_command
from tpo_lite.export import thought_chat_template
from tpo_lite.parsing import parse_output
from tpo_lite.prompts import build_prompt, get_template
from tpo_lite.rundir import RunDir

CORPUS = [
    "Here is my thought process: think about the question carefully.",
    "Here is my response: the answer is short and clear.",
    "Respond to the following user query in a comprehensive and detailed way. User query: name a colour",
]
SIMPLE_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# SmolLM2-Instruct's template: a default system message when the conversation has none.
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def tiny_tokenizer(chat_template=SIMPLE_TEMPLATE):
    from tiny_models import byte_bpe_tokenizer

    return byte_bpe_tokenizer(CORPUS, chat_template)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """(base model dir, adapter dir): a tiny llama with SmolLM2's chat template and a non-zero LoRA."""
    from peft import LoraConfig, get_peft_model
    from tiny_models import tiny_llama

    root = tmp_path_factory.mktemp("tiny")
    tok = tiny_tokenizer(SMOL_TEMPLATE)
    model = tiny_llama(len(tok), tokenizer=tok, max_position_embeddings=256, initializer_range=0.2)
    base_dir, adapter_dir = root / "base", root / "adapter"
    model.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    # init_lora_weights=False: random A and B, so the merge visibly changes the function.
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def load_peft(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


# --------------------------------------------------------------------------------------- chat template

CASES = [("generic", False, None), ("generic", True, None), ("specific", False, None),
         ("generic", True, "Be brief."), ("direct", False, None)]


@pytest.mark.parametrize("base_template", [SIMPLE_TEMPLATE, SMOL_TEMPLATE])
@pytest.mark.parametrize("name,prefill,system", CASES)
def test_thought_chat_template_renders_build_prompt(base_template, name, prefill, system):
    tok = tiny_tokenizer(base_template)
    template = get_template(name)
    instruction = 'Say "hi" {twice} \\ with a {% raw %} tag\nand a newline'
    want = build_prompt(tok, instruction, template, prefill_thought_header=prefill, system_prompt=system)
    tok.chat_template = thought_chat_template(base_template, template, prefill, system)
    got = tok.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                  add_generation_prompt=True)
    assert got == want


def test_thought_chat_template_wraps_only_last_user_turn_and_can_be_switched_off():
    tok = tiny_tokenizer()
    template = get_template("generic")
    tok.chat_template = thought_chat_template(SIMPLE_TEMPLATE, template, True)
    msgs = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "answer"},
            {"role": "user", "content": "second"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nfirst<|im_end|>" in text
    assert template.wrap("second") in text
    assert text.endswith("<|im_start|>assistant\n" + template.thought_header)
    plain = tiny_tokenizer()
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, tpo_thought_prompt=False) == \
        plain.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # A system message the user gives is kept; no generation prompt -> no pre-fill.
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert not no_gen.endswith(template.thought_header)


# -------------------------------------------------------------------------------------------- export

def run_export(args):
    result = CliRunner().invoke(export_command, args)
    return result


def test_export_merges_and_writes_thought_chat_template(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir, adapter_dir = tiny_dirs
    out = tmp_path / "exported"
    r = run_export([str(out), "--model", str(base_dir), "--adapter", str(adapter_dir), "--dtype", "float32",
                    "--load-in-4bit", "false", "--prefill-thought-header", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert getattr(merged.config, "quantization_config", None) is None
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ref = load_peft(base_dir, adapter_dir)
    plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    x = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, base = ref(input_ids=x).logits, merged(input_ids=x).logits, plain(input_ids=x).logits
    assert (want - base).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # ... and the merge reproduces it
    tok = AutoTokenizer.from_pretrained(out)
    template = get_template("generic")
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                   add_generation_prompt=True) == \
        build_prompt(base_tok, "Name a colour.", template, prefill_thought_header=True)
    info = json.loads((out / "tpo_lite_export.json").read_text())
    assert info["template"] == "generic" and info["prefill_thought_header"] is True
    assert info["dequantized_from_4bit"] is False and info["dtype"] == "float32"
    card = (out / "README.md").read_text()
    assert "Here is my response:" in card and "tpo_thought_prompt=False" in card
    # The stripping recipe in the card works on a real output.
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    ns = {}
    exec(code, ns)
    assert ns["split_thought"]("I think.\n**Here's my response:** Blue.") == ("I think.", "Blue.")
    assert ns["split_thought"]("no marker") == ("no marker", None)
    assert not (tmp_path / "exported.tmp-export").exists()


def test_export_refuses_nonempty_dir_and_bad_adapter(tiny_dirs, tmp_path):
    base_dir, adapter_dir = tiny_dirs
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    r = run_export([str(out), "--model", str(base_dir), "--adapter", str(adapter_dir), "--load-in-4bit", "false"])
    assert r.exit_code == 2 and "the output directory exists and is not empty" in r.output
    assert (out / "keep.txt").exists()
    r = run_export([str(tmp_path / "o"), "--model", str(base_dir), "--adapter", str(base_dir),
                    "--load-in-4bit", "false"])
    assert r.exit_code == 2 and "no adapter_config.json" in r.output
    r = run_export([str(tmp_path / "o"), "--model", str(base_dir), "--adapter", str(adapter_dir),
                    "--template", "nonsense"])
    assert r.exit_code == 2 and "unknown template" in r.output


def _bnb_4bit_works():
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _bnb_4bit_works(), reason="bitsandbytes not usable")
def test_export_from_4bit_dequantises_before_merging(tiny_dirs, tmp_path):
    from tpo_lite.models import ModelConfig, load_model
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir = tiny_dirs
    out = tmp_path / "from4bit"
    r = run_export([str(out), "--model", str(base_dir), "--adapter", str(adapter_dir), "--dtype", "float32",
                    "--load-in-4bit", "true", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "tpo_lite_export.json").read_text())["dequantized_from_4bit"] is True
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    qlora, _ = load_model(ModelConfig(path=str(base_dir), load_in_4bit=True, dtype="float32", device="cpu"),
                          adapter=str(adapter_dir))
    full = load_peft(base_dir, adapter_dir)
    x = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got, unq = qlora(input_ids=x).logits, merged(input_ids=x).logits, full(input_ids=x).logits
    err_q = (got - want).abs().max().item()
    err_full = (got - unq).abs().max().item()
    # The merged model is the QLoRA model (NF4 weights + LoRA), not the LoRA on the unquantised weights.
    assert err_q < 1e-3, err_q
    assert err_full > 10 * err_q, (err_full, err_q)


# ---------------------------------------------------------------------------------------------- chat

def run_chat(args, stdin=""):
    return CliRunner().invoke(chat_command, args, input=stdin)


def test_chat_reads_stdin_lines_and_is_reproducible(tiny_dirs):
    base_dir, adapter_dir = tiny_dirs
    args = ["--model", str(base_dir), "--adapter", str(adapter_dir), "--dtype", "float32", "--max-new-tokens", "40",
            "--thought-budget", "4", "--jsonl", "--seed", "3"]
    r = run_chat(args, "Name a colour.\n\nName a fruit.\n")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert [x["prompt"] for x in lines] == ["Name a colour.", "Name a fruit."]
    template = get_template("generic")
    for x in lines:
        assert x["forced"] is True and "Here is my response:" in x["text"]
        p = parse_output(x["text"], template, finish_reason=x["finish_reason"])
        assert (p.thought, p.response, p.valid) == (x["thought"], x["response"], x["valid"])
    again = run_chat(args, "Name a colour.\n\nName a fruit.\n")
    assert again.stdout == r.stdout


def test_chat_plain_output_and_thoughts(tiny_dirs):
    base_dir, adapter_dir = tiny_dirs
    args = ["--model", str(base_dir), "--adapter", str(adapter_dir), "--dtype", "float32", "--max-new-tokens", "40",
            "--thought-budget", "3", "--show-thoughts", "Name a colour."]
    r = run_chat(args)
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Thought:\n") and "\n\nResponse:\n" in r.stdout


def test_exported_model_chats_like_base_plus_adapter(tiny_dirs, tmp_path):
    base_dir, adapter_dir = tiny_dirs
    out = tmp_path / "exp"
    assert run_export([str(out), "--model", str(base_dir), "--adapter", str(adapter_dir), "--dtype", "float32",
                       "--load-in-4bit", "false"]).exit_code == 0
    common = ["--dtype", "float32", "--max-new-tokens", "12", "--temperature", "0", "--jsonl"]
    a = run_chat(["--model", str(base_dir), "--adapter", str(adapter_dir)] + common, "Name a colour.\n")
    b = run_chat(["--model", str(out)] + common, "Name a colour.\n")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert json.loads(a.stdout)["text"] == json.loads(b.stdout)["text"]
    r = run_chat(["--model", str(out), "--template", "specific"] + common, "x\n")
    assert r.exit_code == 2 and "exported with the 'generic' template" in r.output


def test_chat_bad_input(tiny_dirs):
    base_dir, _ = tiny_dirs
    r = run_chat(["--model", str(base_dir), "--template", "nope", "x"])
    assert r.exit_code == 2 and "unknown template" in r.output
    r = run_chat(["--model", str(base_dir), "--thought-budget", "20", "--max-new-tokens", "10", "x"])
    assert r.exit_code == 2 and "--thought-budget" in r.output


def fake_run(tmp_path, base_dir, adapter_dir):
    """A run directory with a config and one finished iteration whose adapter is the tiny LoRA."""
    import shutil

    run = RunDir(tmp_path / "runs" / "tiny")
    it = run.iteration(1)
    shutil.copytree(adapter_dir, it.adapter)
    it.mark_done("train", {"adapter": str(it.adapter)})
    rd = run.path
    run.config.write_text(
        f'[model]\npath = "{base_dir}"\ndtype = "float32"\nload_in_4bit = false\ndevice = "cpu"\n'
        '[prompts]\ntemplate = "generic"\nprefill_thought_header = true\n'
        '[sampling]\nmax_new_tokens = 30\nthought_budget = 5\n'
        f'[loop]\niterations = 1\nname = "tiny"\nruns_root = "{tmp_path / "runs"}"\n')
    return rd


def test_run_option_takes_model_template_and_final_adapter(tiny_dirs, tmp_path):
    base_dir, adapter_dir = tiny_dirs
    rd = fake_run(tmp_path, base_dir, adapter_dir)
    out = tmp_path / "from_run"
    r = run_export([str(out), "--run", str(rd)])
    assert r.exit_code == 0, r.output
    info = json.loads((out / "tpo_lite_export.json").read_text())
    assert info["adapter"] == str(RunDir(rd).iteration(1).adapter.resolve())
    assert info["prefill_thought_header"] is True and info["dtype"] == "float32"
    # chat --run: the run's prompt (pre-filled), adapter, max_new_tokens and thought budget.
    common = ["--temperature", "0", "--jsonl"]
    a = run_chat(["--run", str(rd)] + common, "Name a colour.\n")
    b = run_chat(["--model", str(base_dir), "--adapter", str(RunDir(rd).iteration(1).adapter), "--dtype", "float32",
                  "--prefill-thought-header", "--max-new-tokens", "30", "--thought-budget", "5"] + common,
                 "Name a colour.\n")
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    assert json.loads(a.stdout) == json.loads(b.stdout)
    assert json.loads(a.stdout)["forced"] is True
    # Typed options override the run.
    c = run_chat(["--run", str(rd), "--max-new-tokens", "7", "--thought-budget", "3"] + common, "Name a colour.\n")
    assert c.exit_code == 0, c.output
    assert json.loads(c.stdout)["finish_reason"] == "length"


def test_run_without_trained_adapter_is_an_error(tiny_dirs, tmp_path):
    base_dir, adapter_dir = tiny_dirs
    rd = fake_run(tmp_path, base_dir, adapter_dir)
    RunDir(rd).iteration(1).marker("train").unlink()
    r = run_export([str(tmp_path / "o"), "--run", str(rd)])
    assert r.exit_code == 2 and "no trained adapter" in r.output
    r = run_export([str(tmp_path / "o"), "--model", str(base_dir)])
    assert r.exit_code == 2 and "--adapter" in r.output
