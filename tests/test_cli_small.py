"""Small things users hit (issue 11, item 6): fast --help, eval.max_instructions, the vLLM LoRA name, chat
--adapter's base model, suggestions for unknown options, choices in --list-options."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tpo_lite.errors import TpoError

# ------------------------------------------------------------------------------------------------- --help

HELP_SCRIPT = r"""
import sys
import click
from click.testing import CliRunner
from tpo_lite.cli import main

def paths(group, prefix):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield prefix + [name]
        if isinstance(cmd, click.Group):
            yield from paths(cmd, prefix + [name])

heavy = ("torch", "transformers", "datasets", "peft")
out = {}
for args in [[]] + list(paths(main, [])):
    res = CliRunner().invoke(main, args + ["--help"])
    out[" ".join(args) or "tpo-lite"] = [res.exit_code, [m for m in heavy if m in sys.modules]]
print(__import__("json").dumps(out))
"""


def test_every_help_imports_no_torch():
    # The cause of a slow --help (torch alone takes ~1.5 s to import), tested instead of a flaky timing.
    res = subprocess.run([sys.executable, "-c", HELP_SCRIPT], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    assert {"tpo-lite", "run", "generate", "eval", "chat", "bench", "bench kernels", "bench train"} <= set(out)
    assert {k: v for k, v in out.items() if v != [0, []]} == {}


# ------------------------------------------------------------------------------------------ eval.max_instructions

def test_eval_max_instructions_defaults_to_all_and_says_how_many():
    from tpo_lite.evaluate import EvalConfig, load_configured_eval_set, load_eval_set

    n = len(load_eval_set("heldout"))
    assert EvalConfig().max_instructions == 0
    said = []
    assert len(load_configured_eval_set(EvalConfig(), echo=said.append)) == n
    assert said == [f"evaluating {n} of {n} instructions of heldout"]
    said.clear()
    assert len(load_configured_eval_set(EvalConfig(max_instructions=3), echo=said.append)) == 3
    assert said == [f"evaluating 3 of {n} instructions of heldout (eval.max_instructions = 3)"]


# ------------------------------------------------------------------------------------------ vLLM LoRA name

def test_lora_name_changes_when_the_adapter_is_retrained_at_the_same_path(tmp_path):
    from test_sampling import EosTok, FakeVLLM

    from tpo_lite.sampling import OpenAISampler, SamplingConfig

    ad = tmp_path / "iter_01" / "adapter"
    ad.mkdir(parents=True)
    (ad / "adapter_config.json").write_text('{"r": 4}')
    (ad / "adapter_model.safetensors").write_bytes(b"weights of the first training")
    server = FakeVLLM()
    try:
        sampler = OpenAISampler(SamplingConfig(backend="openai", base_url=server.url), EosTok(), progress=False)
        first = sampler.ensure_adapter(ad)
        assert sampler.ensure_adapter(ad) == first  # unchanged: served as it is
        (ad / "adapter_model.safetensors").write_bytes(b"weights of a second training")
        second = sampler.ensure_adapter(ad)
        loads = [b["lora_name"] for p, b, _ in server.requests if p == "/v1/load_lora_adapter"]
    finally:
        server.close()
    assert second != first and second.startswith("tpo-")
    assert loads == [first, second]  # the retrained weights were loaded, not the old name reused
    assert sampler.model_name == second


# ------------------------------------------------------------------------------------------ chat --adapter

def test_chat_adapter_reads_its_base_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    from test_loop import _cli, build_tiny_model
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "model")
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)
    res = _cli("chat", "--adapter", str(adapter), "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu",
               "--dtype", "float32", "--jsonl", "Name a fruit")
    assert res.exit_code == 0, res.output
    line = res.output[res.output.index('{"prompt"'):].splitlines()[0]  # stderr's progress bar shares the line
    assert json.loads(line)["prompt"] == "Name a fruit"

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    res = _cli("chat", "--adapter", str(adapter), "hi")
    assert res.exit_code == 2
    assert "adapter_config.json: --adapter: names the base model" in res.output and "--model" in res.output


# ------------------------------------------------------------------------------------------ unknown options

@pytest.mark.parametrize("section,key,hint", [
    ("train", "num_train_epochs", "(did you mean epochs?)"),
    ("train", "per_device_train_batch_size", "(did you mean batch_size?)"),
    ("train", "gradient_accumulation_steps", "(did you mean grad_accum?)"),
    ("train", "lr_scheduler_type", "(did you mean lr_schedule?)"),
    ("model", "r", "(did you mean lora_r?)"),
    ("train", "learnig_rate", "(did you mean learning_rate?)"),
    ("loop", "learning_rate", "(did you mean train.learning_rate?)"),
    ("loop", "num_train_epochs", "(did you mean train.epochs?)"),
    ("sampling", "num_generations", "(did you mean k?)"),
])
def test_unknown_option_suggests_the_closest_name(tmp_path, section, key, hint):
    from tpo_lite.config import load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[{section}]\n{key} = 1\n")
    with pytest.raises(TpoError) as e:
        load_config(cfg)
    assert f"{section}.{key}: unknown option {hint}" in str(e.value)
    assert e.value.line == 2
    with pytest.raises(TpoError) as e:
        load_config(None, [f"{section}.{key}=1"])
    assert hint in str(e.value)


def test_unknown_option_without_a_close_name_suggests_nothing(tmp_path):
    from tpo_lite.config import load_config

    with pytest.raises(TpoError) as e:
        load_config(None, ["train.zzzqqq=1"])
    assert "did you mean" not in str(e.value) and "unknown option" in str(e.value)


# ------------------------------------------------------------------------------------------ --list-options

def test_list_options_shows_the_choices_of_every_enum_like_option():
    import dataclasses
    import typing

    from tpo_lite.config import SECTIONS, field_choices, options_reference

    ref = " ".join(options_reference().split())  # the text form wraps lines
    assert "Choices: auto, alpaca_eval, arena_hard, instructions." in ref  # eval.eval_format
    assert "Choices: auto, score, pairwise." in ref  # eval.comparison
    assert "Choices: sigmoid, ipo, hinge, robust." in ref  # train.loss_type
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            choices = field_choices(f, hints.get(f.name))
            if choices:
                assert f"Choices: {', '.join(map(str, choices))}." in ref, (sec, f.name)
    md = options_reference(markdown=True)
    assert "Choices: auto, score, pairwise." in md


def test_choices_are_what_validation_accepts():
    from tpo_lite.config import load_config

    with pytest.raises(TpoError) as e:
        load_config(None, ["eval.comparison=scores"])
    assert "eval.comparison: must be one of 'auto', 'score', 'pairwise'" in str(e.value)
