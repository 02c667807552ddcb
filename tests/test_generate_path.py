"""The generate stage, the eval's generation and `tpo-lite chat` share the prompt -> job -> sample blocks, and each
frees the model it loaded (with its LoRA adapter) before sampling starts: the sampler keeps only its merged copy.

A tiny random llama with a saved non-zero LoRA adapter; sampling is test_loop's scripted sampler (a random model
never writes the markers). Automatic gc is off while a stage runs, so the loaded model is gone at sampling time only
if nothing refers to it any more and any cycle it sits in was collected by the code: not by a lucky collection.
"""
from __future__ import annotations

import gc
import shutil
import weakref

import pytest
from click.testing import CliRunner

from test_loop import ScriptedSampler, _load, build_tiny_model, scripted_factory, write_config, write_instructions
from tpo_lite.errors import TpoError
from tpo_lite.rundir import RunDir, adapter_digest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model dir, adapter dir, train instructions, held-out instructions)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model(root / "model")
    adapter_dir = root / "adapter"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(adapter_dir)
    return (model_dir, adapter_dir, write_instructions(root / "train.jsonl", 8, "tr"),
            write_instructions(root / "heldout.jsonl", 3, "ho"))


@pytest.fixture
def no_auto_gc():
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def loaded(monkeypatch):
    """Weak references to every model ``models.load_model`` returns."""
    from tpo_lite import models

    refs, real = [], models.load_model

    def load_model(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(models, "load_model", load_model)
    return refs


class ProbeSampler(ScriptedSampler):
    """Records, when sampling starts, whether any model ``load_model`` returned is still alive."""

    def __init__(self, tokenizer, loaded, alive, model):
        super().__init__(tokenizer)
        self.loaded, self.alive, self.model = loaded, alive, model

    def sample(self, jobs, k=None, skip=()):
        self.alive.append(any(r() is not None for r in self.loaded))
        yield from super().sample(jobs, k, skip)


def _trained_iteration_1(cfg, rd, adapter_dir):
    """A run whose iteration 1 trained ``adapter_dir`` (so iteration 2 samples with it)."""
    from tpo_lite.guard import prepare_run_dir

    prepare_run_dir(cfg, rd, echo=lambda s: None)
    d = RunDir(rd).iteration(1)
    shutil.copytree(adapter_dir, d.adapter)
    d.mark_done("train", {"adapter": str(d.adapter), "adapter_sha256": adapter_digest(d.adapter)})
    return d


def test_generate_frees_the_loaded_model_before_sampling(tiny, tmp_path, loaded, no_auto_gc):
    from tpo_lite import models
    from tpo_lite.jsonl import read_records
    from tpo_lite.stages import generate_stage

    model_dir, adapter_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "loop.eval_before=false")
    rd = tmp_path / "runs" / "t"
    _trained_iteration_1(cfg, rd, adapter_dir)
    alive, given = [], []

    def factory(config, model, tokenizer, template, adapter=None, progress=True):
        merged = models.sampling_copy(model)  # what LocalSampler keeps
        given.append(merged is not model)
        return ProbeSampler(tokenizer, loaded, alive, merged)

    generate_stage(cfg, rd, 2, progress=False, echo=lambda s: None, sampler_factory=factory)
    assert given == [True] and len(loaded) == 1  # the LoRA model was loaded and merged into a copy
    assert alive == [False], "the unmerged model was still resident when sampling started"
    assert len(read_records(RunDir(rd).iteration(2).samples, key="prompt_id")) == 5


def test_eval_outputs_free_the_loaded_model_before_sampling(tiny, tmp_path, loaded, no_auto_gc):
    from tpo_lite.evalsets import EvalItem
    from tpo_lite.evaluate import model_outputs

    model_dir, adapter_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout))
    alive = []

    def factory(scfg, tokenizer, template, model=None, adapter=None, progress=True):
        return ProbeSampler(tokenizer, loaded, alive, model)

    items = [EvalItem(id=f"q{i}", instruction=f"Name a fruit ({i}).") for i in range(3)]
    outs = model_outputs(cfg, items, tmp_path / "eval" / "outputs.jsonl", adapter=str(adapter_dir), progress=False,
                         echo=lambda s: None, sampler_factory=factory)
    assert len(outs) == 3 and len(loaded) == 1
    assert alive and not any(alive), "the unmerged model was still resident when sampling started"


def test_chat_samples_through_make_sampler_with_the_loaded_model_freed(tiny, monkeypatch, loaded, no_auto_gc):
    from tpo_lite import sampling
    from tpo_lite.cli.model_cmds import chat_command

    model_dir, adapter_dir, _, _ = tiny
    alive, made, real = [], [], sampling.make_sampler

    def make_sampler(cfg, tokenizer, template=None, model=None, adapter=None, progress=True):
        made.append(cfg.backend)
        return ProbeSampler(tokenizer, loaded, alive, real(cfg, tokenizer, template, model=model, adapter=adapter,
                                                           progress=progress))

    monkeypatch.setattr(sampling, "make_sampler", make_sampler)
    r = CliRunner().invoke(chat_command, ["--model", str(model_dir), "--adapter", str(adapter_dir), "--dtype",
                                          "float32", "--jsonl", "--max-new-tokens", "8", "Name a fruit."])
    assert r.exit_code == 0, r.output
    assert made == ["local"] and len(loaded) == 1
    assert alive == [False], "the unmerged model was still resident beside the sampler's merged copy"


def test_keep_best_hashes_each_adapter_once(tiny, tmp_path, monkeypatch):
    """adapter_for with keep_best checks a validation result's producer against the adapter: the digest that
    trained_adapter() verified is reused, the weights are not read a second time."""
    from tpo_lite import rundir
    from tpo_lite.jsonl import write_json_atomic
    from tpo_lite.stages import adapter_for

    model_dir, adapter_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "loop.keep_best=true",
                "loop.validation_instructions=2", "loop.eval_before=false")
    rd = tmp_path / "runs" / "t"
    d = _trained_iteration_1(cfg, rd, adapter_dir)
    digest = adapter_digest(d.adapter)
    write_json_atomic(d.validation.result, {"mean_score": 0.5, "producer": {"adapter": str(d.adapter),
                                                                           "adapter_sha256": digest}})
    hashed, real = [], rundir._sha256_file
    monkeypatch.setattr(rundir, "_sha256_file", lambda path: hashed.append(path.name) or real(path))
    assert adapter_for(rd, 2, cfg) == str(d.adapter)
    files = sorted(p.name for p in d.adapter.iterdir() if p.name.startswith("adapter_"))
    assert sorted(hashed) == files
    # a result that scored other weights is still refused
    write_json_atomic(d.validation.result, {"mean_score": 0.5, "producer": {"adapter": str(d.adapter),
                                                                           "adapter_sha256": "0" * 64}})
    with pytest.raises(TpoError, match="not iteration 1's adapter as it is now"):
        adapter_for(rd, 2, cfg)


def test_generate_refuses_an_empty_prompt_naming_the_instruction(tiny, tmp_path, monkeypatch):
    from tpo_lite import prompts
    from tpo_lite.guard import prepare_run_dir
    from tpo_lite.stages import generate_stage

    model_dir, _, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "loop.eval_before=false")
    rd = tmp_path / "runs" / "t"
    prepare_run_dir(cfg, rd, echo=lambda s: None)
    monkeypatch.setattr(prompts, "build_prompt", lambda *a, **kw: "")
    with pytest.raises(TpoError, match="empty after tokenisation") as e:
        generate_stage(cfg, rd, 1, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    assert "tr-" in str(e.value)
    assert not RunDir(rd).iteration(1).samples.exists()
