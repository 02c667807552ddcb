"""Run-directory and config integrity: what a careless user does to a run between two starts, and configs that
cannot work. Each case asserts the exit status (or the exception), that the message names the file and the
option, and that no record was lost or trained on wrongly (issue "Nothing lost, nothing wrong in silence",
items 3, 4, 5, 7, 9)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_loop import build_tiny_model, scripted_factory, write_config, write_instructions  # noqa: E402

from tpo_lite.errors import TpoError
from tpo_lite.rundir import EvalDir, RunDir

QUIET = {"progress": False, "echo": lambda s: None}
NO_EVAL = ("loop.eval_before=false", "loop.eval_after=false")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model(root / "model")  # max_position_embeddings = 512
    train = write_instructions(root / "train.jsonl", 14, "tr")
    heldout = write_instructions(root / "heldout.jsonl", 4, "ho")
    return model_dir, train, heldout


def load(cfg_path, *overrides):
    from tpo_lite.config import load_config

    return load_config(cfg_path, list(overrides))


def cli(*args):
    from tpo_lite.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def error_line(res, *parts) -> str:
    """Exit status 2, exactly one ``error:`` line containing every one of ``parts``, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.output
    for p in parts:
        assert str(p) in lines[0], (p, lines[0])
    return lines[0]


def run_dir(tmp_path) -> Path:
    return tmp_path / "runs" / "t"


def staged(tiny, tmp_path, upto: str) -> tuple[Path, Path]:
    """A 1-iteration run config and its run directory, iteration 1's stages run up to and including ``upto``."""
    cfg_path = write_config(tmp_path, *tiny, iterations=1)
    rd = run_dir(tmp_path)
    stages(load(cfg_path, *NO_EVAL), rd, upto)
    return cfg_path, rd


def stages(cfg, rd, upto: str) -> None:
    """Run iteration 1's stages up to and including ``upto`` (scripted sampling, programmatic judge)."""
    from tpo_lite.guard import prepare_run_dir
    from tpo_lite.stages import STAGES

    prepare_run_dir(cfg, rd, echo=lambda s: None)
    for stage in STAGES.values():
        stage.run(cfg, rd, 1, **QUIET, **({"sampler_factory": scripted_factory()} if stage.name == "generate" else {}))
        if stage.name == upto:
            return


def tear_last_line(path: Path) -> str:
    """Cut the last record in half (as a disk problem or a careless edit would); returns its prompt_id."""
    lines = path.read_bytes().splitlines(keepends=True)
    pid = json.loads(lines[-1])["prompt_id"]
    path.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    return pid


# ----------------------------------------------------------------------- item 3: a result keyed by its producer

def test_heldout_after_never_belongs_to_another_adapter(tiny, tmp_path):
    """iter_02/heldout holds the score of iteration 1's adapter (as it does when iteration 2 first trained
    nothing and was redone later): the "after" score must be that of the final adapter, scored again, and the
    stale result kept aside, not deleted."""
    from tpo_lite.loop import run

    model_dir, train, heldout = tiny
    cfg = load(write_config(tmp_path, model_dir, train, heldout), "loop.eval_before=false",
               "loop.eval_every_iteration=true")
    run(cfg, sampler_factory=scripted_factory(), **QUIET)
    rd = run_dir(tmp_path)
    it1, it2 = RunDir(rd).iteration(1), RunDir(rd).iteration(2)
    shutil.rmtree(it2.heldout.path)
    shutil.copytree(it1.heldout.path, it2.heldout.path)
    logs = []
    summary = run(cfg, progress=False, echo=logs.append, sampler_factory=scripted_factory())
    final = str(it2.adapter)
    assert summary["final_adapter"] == final
    assert summary["heldout_after"]["adapter"] == final
    from tpo_lite.rundir import adapter_digest

    assert summary["heldout_after"]["producer"]["adapter_sha256"] == adapter_digest(final)
    assert it2.heldout.read_result()["adapter"] == final
    stale = [EvalDir(p) for p in it2.path.glob(f"{it2.heldout.path.name}.stale*") if EvalDir(p).result.exists()]
    assert len(stale) == 1 and stale[0].read_result()["adapter"] == str(it1.adapter)
    assert any("scored another model" in line for line in logs), logs


def test_heldout_of_other_weights_at_the_same_path_is_not_reused(tiny, tmp_path):
    """A held-out result is reused only for the same adapter *content* and the same eval settings."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tpo_lite.heldout import heldout_stage

    model_dir, train, heldout = tiny
    cfg = load(write_config(tmp_path, model_dir, train, heldout))
    rd = run_dir(tmp_path)
    adapter = tmp_path / "adapter"

    def save_adapter(seed):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
                       ).save_pretrained(adapter)

    save_adapter(0)
    first = heldout_stage(cfg, rd, RunDir(rd).iteration(1).heldout, str(adapter), "iter01", **QUIET)
    save_adapter(1)  # other weights, same path (an iteration trained again)
    logs = []
    second = heldout_stage(cfg, rd, RunDir(rd).iteration(2).heldout, str(adapter), "iter02", progress=False,
                           echo=logs.append)
    assert not any("reusing" in line for line in logs), logs
    from tpo_lite.rundir import adapter_digest

    assert second["producer"]["adapter_sha256"] == adapter_digest(adapter) != first["producer"]["adapter_sha256"]
    # other eval settings, same weights: not reused either
    logs.clear()
    other = cfg.replace("eval", max_new_tokens=6)
    heldout_stage(other, rd, RunDir(rd).iteration(3).heldout, str(adapter), "iter03", progress=False, echo=logs.append)
    assert not any("reusing" in line for line in logs), logs
    # same weights, same settings: reused without generating
    logs.clear()
    again = heldout_stage(cfg, rd, RunDir(rd).iteration(4).heldout, str(adapter), "iter04", progress=False,
                          echo=logs.append)
    assert any("reusing" in line for line in logs) and again["items"] == second["items"]


# ------------------------------------------------------------------ item 4: records checked against DONE markers

@pytest.mark.parametrize("damage", ["torn", "deleted"])
def test_damaged_samples_after_generate_done_are_refused(tiny, tmp_path, scripted, damage):
    cfg_path, rd = staged(tiny, tmp_path, "generate")
    samples = RunDir(rd).iteration(1).samples
    if damage == "torn":
        lost = tear_last_line(samples)
    else:
        lost = json.loads(samples.read_text().splitlines()[0])["prompt_id"]
        samples.unlink()
    res = cli("run", cfg_path, "--no-progress", *[f"--set={o}" for o in NO_EVAL])
    error_line(res, samples, "generate.done.json", lost)
    assert not (RunDir(rd).iteration(1).judgements).exists() and not (RunDir(rd).iteration(1).adapter).exists()


@pytest.mark.parametrize("damage", ["torn", "deleted"])
def test_damaged_pairs_after_pairs_done_are_refused(tiny, tmp_path, damage):
    cfg_path, rd = staged(tiny, tmp_path, "pairs")
    pairs = RunDir(rd).iteration(1).pairs
    assert pairs.read_text().count("\n") >= 1
    if damage == "torn":
        tear_last_line(pairs)
    else:
        pairs.unlink()
    res = cli("train", cfg_path, "--no-progress", *[f"--set={o}" for o in NO_EVAL])
    error_line(res, pairs, "pairs.done.json")
    assert not (RunDir(rd).iteration(1).adapter).exists() and not (RunDir(rd).iteration(1).marker("train")).exists()


def test_bad_score_in_judgements_names_the_run_file(tiny, tmp_path):
    # A hand edit after the judge stage (a marker of an older run: counts only, no sha256 to catch it): the pairs
    # stage refuses the score naming this run's judgements.jsonl, not a bare file name.
    from tpo_lite.stages import STAGES

    cfg_path, rd = staged(tiny, tmp_path, "judge")
    d = RunDir(rd).iteration(1)
    lines = d.judgements.read_text().splitlines(keepends=True)
    rec = json.loads(lines[0])
    rec["scores"][0] = "high"
    d.judgements.write_text(json.dumps(rec) + "\n" + "".join(lines[1:]))
    marker = d.read_marker("judge")
    del marker["files"]
    d.marker("judge").write_text(json.dumps(marker))
    with pytest.raises(TpoError) as e:
        STAGES["pairs"].run(load(cfg_path, *NO_EVAL), rd, 1, **QUIET)
    assert e.value.path == str(d.judgements) and e.value.field == f"prompt_id={rec['prompt_id']}.scores[0]"
    assert not d.pairs.exists()


@pytest.mark.parametrize("damage", ["deleted", "changed"])
def test_damaged_adapter_is_refused_never_replaced_by_the_seed(tiny, tmp_path, scripted, damage):
    cfg_path, rd = staged(tiny, tmp_path, "train")
    adapter = RunDir(rd).iteration(1).adapter
    if damage == "deleted":
        shutil.rmtree(adapter)
    else:
        weights = adapter / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    res = cli("run", cfg_path, "--no-progress", "--set", "loop.iterations=2", *[f"--set={o}" for o in NO_EVAL])
    error_line(res, adapter, "train.done.json")
    assert not (RunDir(rd).iteration(2).samples).exists()


def test_sample_record_not_in_the_plan_is_refused(tiny, tmp_path, scripted):
    from tpo_lite.guard import prepare_run_dir
    from tpo_lite.jsonl import append_record
    from tpo_lite.plan import iteration_plan

    model_dir, train, heldout = tiny
    cfg_path = write_config(tmp_path, model_dir, train, heldout, iterations=1)
    cfg = load(cfg_path, *NO_EVAL)
    rd = run_dir(tmp_path)
    prepare_run_dir(cfg, rd, echo=lambda s: None)
    iteration_plan(cfg, rd, 1)
    samples = RunDir(rd).iteration(1).samples
    append_record(samples, {"prompt_id": "intruder", "instruction": "x", "category": "", "checks": [],
                            "prompt_text": "x", "prompt_token_ids": [1],
                            "samples": [{"index": 0, "seed": 0, "text": "x", "token_ids": [1], "thought": "t",
                                         "response": "apple", "valid": True, "invalid_reason": None,
                                         "finish_reason": "eos", "forced": False}] * 4})
    res = cli("run", cfg_path, "--no-progress", *[f"--set={o}" for o in NO_EVAL])
    error_line(res, samples, "intruder", "plan.json")
    assert not (RunDir(rd).iteration(1).marker("generate")).exists()
    assert not (RunDir(rd).iteration(1).judgements).exists()


def test_judgement_record_not_sampled_is_refused(tiny, tmp_path):
    from tpo_lite.jsonl import append_record

    cfg_path, rd = staged(tiny, tmp_path, "generate")
    judgements = RunDir(rd).iteration(1).judgements
    append_record(judgements, {"prompt_id": "intruder", "judge": "programmatic", "scores": [1.0, 0.0, 0.5, 0.2],
                               "details": [{}] * 4})
    res = cli("judge", cfg_path, "--no-progress", *[f"--set={o}" for o in NO_EVAL])
    error_line(res, judgements, "intruder", "samples.jsonl")
    assert not (RunDir(rd).iteration(1).marker("judge")).exists()


# --------------------------------------------------------------------- item 5: --set validated with the file

def test_set_overrides_are_validated_together_with_the_file(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    cfg_path.write_text(cfg_path.read_text().replace("max_new_tokens = 16\n", "max_new_tokens = 2048\n", 1))
    judge = ["judge.kind=pairwise", "judge.base_url=http://127.0.0.1:9/v1", "judge.served_model=m"]
    cfg = load(cfg_path, *judge)
    assert (cfg.judge.kind, cfg.judge.base_url, cfg.judge.served_model) == ("pairwise", "http://127.0.0.1:9/v1", "m")
    assert load(cfg_path, "sampling.thought_budget=1000").sampling.thought_budget == 1000  # below the file's 2048
    with pytest.raises(TpoError) as e:
        load(cfg_path, "sampling.thought_budget=3000")
    assert str(e.value).startswith("--set: sampling.thought_budget: ") and "(2048)" in str(e.value)
    # an option the file lacks, needed because of a --set one: the message says which --set caused it
    with pytest.raises(TpoError) as e:
        load(cfg_path, "judge.kind=pairwise")
    assert e.value.field == "judge.model" and "--set judge.kind" in str(e.value)
    res = cli("run", write_config(tmp_path, model_dir, train, heldout), "--dry-run", *[f"--set={o}" for o in judge])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------ item 7: the config guard's holes

def test_grown_training_file_is_refused_and_the_recorded_order_kept(tiny, tmp_path):
    from tpo_lite import guard, plan

    model_dir, _, heldout = tiny
    train = write_instructions(tmp_path / "train.jsonl", 14, "tr")
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    cfg = load(cfg_path)
    rd = run_dir(tmp_path)
    guard.prepare_run_dir(cfg, rd, echo=lambda s: None)
    plan1 = [p["id"] for p in plan.iteration_plan(cfg, rd, 1)]
    assert json.loads(RunDir(rd).run_record.read_text())["instructions"]["n"] == 14
    with open(train, "a") as f:  # the same path, more instructions
        for i in range(6):
            f.write(json.dumps({"id": f"new-{i}", "instruction": f"Name a fruit ({i})."}) + "\n")
    res = cli("run", cfg_path)
    error_line(res, train, "loop.train_instructions", "changed since this run started")
    res_dry = cli("run", cfg_path, "--dry-run")
    assert error_line(res_dry) == error_line(res)  # the dry run says what the real run does
    assert not RunDir(rd).iteration(2).path.exists()
    logs = []
    guard.prepare_run_dir(cfg, rd, allow_config_change=True, echo=logs.append)
    assert any("recorded order" in line for line in logs), logs
    plan2 = [p["id"] for p in plan.iteration_plan(cfg, rd, 2)]
    assert len(plan2) == 5 and not set(plan1) & set(plan2)  # iteration 2's instructions are fresh ones
    assert not [i for i in plan2 if i.startswith("new-")]


def test_run_from_before_run_json_checks_its_plans_against_the_training_set(tiny, tmp_path):
    from tpo_lite import guard, plan

    model_dir, _, heldout = tiny
    train = write_instructions(tmp_path / "train.jsonl", 14, "tr")
    cfg = load(write_config(tmp_path, model_dir, train, heldout))
    rd = run_dir(tmp_path)
    guard.prepare_run_dir(cfg, rd, echo=lambda s: None)
    plan.iteration_plan(cfg, rd, 1)
    RunDir(rd).run_record.unlink()  # as a run started before run.json existed
    guard.prepare_run_dir(cfg, rd, echo=lambda s: None)  # unchanged set: fine, and recorded now
    assert RunDir(rd).run_record.exists()
    RunDir(rd).run_record.unlink()
    write_instructions(train, 20, "tr")  # grown: the shuffle gives iteration 1 other instructions
    with pytest.raises(TpoError) as e:
        guard.prepare_run_dir(cfg, rd, echo=lambda s: None)
    assert e.value.path == str(train) and e.value.field == "loop.train_instructions"
    assert "iter_01/plan.json does not match" in e.value.message and not RunDir(rd).run_record.exists()


def test_deleted_config_toml_is_refused(tiny, tmp_path, scripted):
    cfg_path, rd = staged(tiny, tmp_path, "generate")  # K = 4
    RunDir(rd).config.unlink()
    res = cli("run", cfg_path, "--no-progress", "--set", "sampling.k=8", "--set", "loop.iterations=2",
              *[f"--set={o}" for o in NO_EVAL])
    error_line(res, rd / "config.toml", "missing")
    assert not RunDir(rd).config.exists() and not (RunDir(rd).iteration(1).judgements).exists()
    assert not RunDir(rd).iteration(2).path.exists()


def test_dry_run_refuses_where_the_real_run_refuses(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    rd = run_dir(tmp_path)
    from tpo_lite import guard, plan

    guard.prepare_run_dir(load(cfg_path), rd, echo=lambda s: None)
    real = cli("run", cfg_path, "--set", "sampling.k=8")
    dry = cli("run", cfg_path, "--dry-run", "--set", "sampling.k=8")
    assert error_line(dry, "sampling.k: 4 -> 8") == error_line(real)
    ok = cli("run", cfg_path, "--dry-run", "--set", "sampling.k=8", "--allow-config-change")
    assert ok.exit_code == 0 and "will resume" in ok.output, ok.output
    assert "sampling.k: 4 -> 8" in ok.output


def test_failed_first_start_saves_no_config(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    rd = run_dir(tmp_path)
    res = cli("run", cfg_path, "--set", f"model.path={tmp_path / 'modle_typo'}")
    error_line(res, "modle_typo", "model.path")
    assert not RunDir(rd).config.exists() and not RunDir(rd).run_record.exists()
    from tpo_lite import guard, plan

    guard.prepare_run_dir(load(cfg_path), rd, echo=lambda s: None)  # the corrected start is not refused
    assert f'path = "{model_dir}"' in RunDir(rd).config.read_text()


# ------------------------------------------------------------------------ item 9: configs that cannot work

@pytest.mark.parametrize("setting,field", [("sampling.k=1", "sampling.k"),
                                           ("sampling.temperature=0", "sampling.temperature")])
def test_config_that_can_never_make_a_pair_is_refused_before_sampling(tiny, tmp_path, scripted, setting, field):
    model_dir, train, heldout = tiny
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    res = cli("run", cfg_path, "--set", setting, "--no-progress")
    error_line(res, "--set", field, "pair")
    assert not list(run_dir(tmp_path).rglob("*.jsonl")) and not (run_dir(tmp_path) / "config.toml").exists()
    assert cli("run", cfg_path, "--dry-run", "--set", setting).exit_code == 2


@pytest.mark.parametrize("settings,field", [
    (["sampling.max_new_tokens=600"], "sampling.max_new_tokens"),
    (["sampling.max_new_tokens=300", "sampling.response_budget=300"], "sampling.response_budget"),
    (["eval.max_new_tokens=512"], "eval.max_new_tokens"),
])
def test_token_limit_beyond_the_model_context_is_refused(tiny, tmp_path, scripted, settings, field):
    model_dir, train, heldout = tiny
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    res = cli("run", cfg_path, "--no-progress", *[f"--set={s}" for s in settings])
    error_line(res, field, "512", "max_position_embeddings", model_dir / "config.json")
    assert not list(run_dir(tmp_path).rglob("*.jsonl")) and not (run_dir(tmp_path) / "config.toml").exists()


def test_prompt_longer_than_the_model_context_is_refused_before_sampling(tiny, tmp_path, scripted):
    model_dir, _, heldout = tiny
    train = write_instructions(tmp_path / "train.jsonl", 6, "tr")
    lines = train.read_text().splitlines()
    rec = json.loads(lines[3])
    rec["instruction"] = "Name every fruit: " + " ".join(["apple pear plum"] * 200)
    lines[3] = json.dumps(rec)
    train.write_text("\n".join(lines) + "\n")
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    res = cli("run", cfg_path, "--no-progress", "--set", "loop.prompts_per_iteration=6",
              *[f"--set={o}" for o in NO_EVAL])
    error_line(res, train, rec["id"], "sampling.max_new_tokens", "512")
    assert not (RunDir(run_dir(tmp_path)).iteration(1).samples).exists()


def test_non_utf8_template_file_names_the_file(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    bad = tmp_path / "tmpl.toml"
    bad.write_bytes(b'wrapper = "Caf\xe9 {instruction}"\n')
    res = cli("generate", cfg_path, "--set", f"prompts.template={bad}")
    error_line(res, bad, "prompts.template", "UTF-8")
    assert not (run_dir(tmp_path) / "config.toml").exists()


def test_heldout_of_the_same_adapter_by_another_path_is_reused(tiny, tmp_path, monkeypatch):
    """One adapter named by a relative and by an absolute path is one model: its held-out result (and partial
    outputs) are reused, not set aside and generated again (an experiment resumed with another run-dir spelling
    re-scored every iteration)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tpo_lite.heldout import heldout_stage

    model_dir, train, heldout = tiny
    cfg = load(write_config(tmp_path, model_dir, train, heldout))
    rd = run_dir(tmp_path)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    monkeypatch.chdir(tmp_path)
    out = RunDir(rd).iteration(1).heldout
    first = heldout_stage(cfg, rd, out, "adapter", "iter01", **QUIET)
    logs = []
    again = heldout_stage(cfg, rd, out, str(tmp_path / "adapter"), "iter01", progress=False, echo=logs.append)
    assert not any("scoring" in line for line in logs), logs  # not set aside as another model's
    assert again["items"] == first["items"]
    # partial outputs of the relative spelling resume under the absolute one
    out.result.unlink()
    lines = out.outputs.read_text(encoding="utf-8").splitlines(keepends=True)
    out.outputs.write_text("".join(lines[:1]), encoding="utf-8")
    logs.clear()
    resumed = heldout_stage(cfg, rd, out, str(tmp_path / "adapter"), "iter01", progress=False, echo=logs.append)
    assert not any("scoring" in line for line in logs), logs
    assert resumed["items"] == first["items"]


def test_heldout_eval_merges_the_adapter_once(tiny, tmp_path, monkeypatch):
    """The greedy and the retry sampler share one merged copy of the adapter; the unmerged model is not kept
    beside it (it was: the loaded model plus one merged copy per sampler, three sets of weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import tpo_lite.models as models
    from tpo_lite.heldout import heldout_stage

    model_dir, train, heldout = tiny
    cfg = load(write_config(tmp_path, model_dir, train, heldout), "eval.format_retries=2")
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                   LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    merged, real = [], models.sampling_copy

    def counting(model):
        out = real(model)
        if out is not model:
            merged.append(out)
        return out

    monkeypatch.setattr(models, "sampling_copy", counting)
    res = heldout_stage(cfg, run_dir(tmp_path), RunDir(run_dir(tmp_path)).iteration(1).heldout,
                        str(tmp_path / "adapter"), "iter01", **QUIET)
    assert res["model_lengths"]["n_retried"] > 0  # the retry sampler was used too
    assert len(merged) == 1
