"""The whole TPO loop on a tiny random llama built here: every stage, resume, metrics, bad input.

A random model never writes the thought/response markers, so generation uses a *scripted sampler*
(deterministic per sample seed) that writes outputs in the template's format, with real token ids from the
tiny tokenizer; judging (programmatic), pairing, DPO training and the held-out eval (real LocalSampler,
greedy) run for real.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tpo_lite.errors import TpoError
from tpo_lite.rundir import RunDir

CORPUS = [
    "Here is my thought process: I should answer briefly and follow every rule.",
    "Here is my response: the answer is short and clear. hello world apples and pears.",
    "List three fruits in lowercase, answer in at most ten words.",
    "Write A Title In Capitals. Then explain, with bullets - one - two.",
]
WORDS = "apple pear plum fig kiwi lime lemon melon grape peach".split()


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer (vocab ~300, chat template) and a random 2-layer llama, saved to ``path``."""
    from tiny_models import byte_bpe_tokenizer, tiny_llama

    fast = byte_bpe_tokenizer(CORPUS, vocab_size=300)
    model = tiny_llama(len(fast), seed=seed, tokenizer=fast, max_position_embeddings=512)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_instructions(path: Path, n: int, prefix: str) -> Path:
    """Instructions with checks the scripted outputs pass to different degrees (so scores differ)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"{prefix}-{i:03d}", "instruction": f"Name some fruits ({i}), briefly.",
                                "category": ["food", "lists"][i % 2],
                                "checks": [{"type": "max_words", "value": 4 + i % 3}, {"type": "lowercase"},
                                           {"type": "include_words", "words": ["apple"]}]}) + "\n")
    return path


class ScriptedSampler:
    """Writes generic-template outputs chosen by each sample's seed; some invalid (no response marker).

    Deterministic in (prompt, seed), so a resumed run produces exactly the records an uninterrupted run does.
    ``delay`` (seconds per prompt) slows it so a test can kill the process mid-stage.
    """

    def __init__(self, tokenizer, delay: float = 0.0):
        self.tok = tokenizer
        self.delay = delay

    def _one(self, index, seed):
        from tpo_lite.sampling import Sample

        rng = random.Random(seed)
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]
        if rng.random() < 0.5:
            words[0] = "apple"
        resp = " ".join(words)
        if rng.random() < 0.3:
            resp = resp.upper()
        thought = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
        if rng.random() < 0.15:
            text = f"Here is my thought process:\n{thought}"  # never reaches the response: invalid
        else:
            text = f"Here is my thought process:\n{thought}\n\nHere is my response:\n{resp}"
        ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
        return Sample(index=index, seed=seed, text=text, token_ids=ids, finish_reason="eos", forced=False)

    def sample(self, jobs, k=None, skip=()):
        import time

        for job in jobs:
            if job.prompt_id in skip:
                continue
            if self.delay:
                time.sleep(self.delay)
            yield job.prompt_id, [self._one(i, s) for i, s in enumerate(job.seeds[:k])]


def scripted_factory(delay: float = 0.0):
    def factory(config, model, tokenizer, template, adapter=None, progress=True):
        return ScriptedSampler(tokenizer, delay)

    return factory


def write_config(tmp: Path, model_dir: Path, train: Path, heldout: Path, extra: str = "", iterations: int = 2,
                 name: str = "t") -> Path:
    text = f"""
{model_table(model_dir)}

[prompts]
template = "generic"

[sampling]
k = 4
max_new_tokens = 16
batch_size = 4
seed = 7

[judge]
kind = "programmatic"

[pairs]

[train]
{TRAIN_EXTRA}

[loop]
name = "{name}"
runs_root = "{tmp / 'runs'}"
iterations = {iterations}
stage_processes = false  # the scripted samplers are patched into this process (test_stage_process.py: the default)
prompts_per_iteration = 5
train_instructions = "{train}"

[eval]
eval_set = "{heldout}"
max_instructions = 3
max_new_tokens = 8
n_boot = 200
{extra}
"""
    p = tmp / "cfg.toml"
    p.write_text(text)
    return p


def model_table(model_dir) -> str:
    """The [model] table of the tests' run configs (also test_vllm_backend's and test_think_format's): an fp32 base
    with a small LoRA on the CPU."""
    return (f'[model]\npath = "{model_dir}"\ndtype = "float32"\nload_in_4bit = false\nlora_r = 4\nlora_alpha = 8.0\n'
            'lora_dropout = 0.0\ndevice = "cpu"')


TRAIN_EXTRA = 'learning_rate = 1e-3\nbatch_size = 2\ngrad_accum = 1\nepochs = 1'  # one epoch: seconds on a CPU


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = build_tiny_model(root / "model")
    train = write_instructions(root / "train.jsonl", 14, "tr")
    heldout = write_instructions(root / "heldout.jsonl", 4, "ho")
    return model_dir, train, heldout


def _load(cfg_path, *overrides):
    from tpo_lite.config import load_config

    return load_config(cfg_path, list(overrides))


def test_full_loop_two_iterations(tiny, tmp_path):
    from tpo_lite.jsonl import read_records
    from tpo_lite.loop import run

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout))
    logs = []
    summary = run(cfg, progress=False, echo=logs.append, sampler_factory=scripted_factory())
    rd = tmp_path / "runs" / "t"
    assert RunDir(rd).config.exists() and RunDir(rd).summary.exists()
    plans = []
    for t in (1, 2):
        d = RunDir(rd).iteration(t)
        for stage in ("generate", "judge", "pairs", "train"):
            assert (d.marker(stage)).exists(), (t, stage)
        samples = read_records(d.samples, key="prompt_id")
        judg = read_records(d.judgements, key="prompt_id")
        assert len(samples) == 5 and list(samples) == list(judg)
        plans.append(set(samples))
        for pid, rec in samples.items():
            assert len(rec["samples"]) == 4 and rec["prompt_token_ids"]
            scores = judg[pid]["scores"]
            for s, sc in zip(rec["samples"], scores):
                assert (sc is None) == (not s["valid"])
                if s["valid"]:
                    assert 0.0 <= sc <= 1.0
        pairs = read_records(d.pairs)
        trl = read_records(d.pairs_trl)
        assert len(pairs) == len(trl) >= 1
        for p, q in zip(pairs, trl):
            assert p["rejected_score"] is None or p["chosen_score"] > p["rejected_score"]
            assert set(q) >= {"prompt", "chosen", "rejected"}
        assert (d.adapter).is_dir()
        m = json.loads((d.metrics).read_text())
        assert m["generate"]["n_samples"] == 20
        assert 0 < m["generate"]["valid_rate"] <= 1
        assert m["pairs"]["pairs_kept"] == len(pairs)
        dpo = m["train"]["metrics"]
        # The reference is the model that sampled (cached log-probs, same op): DPO margins start at ~0.
        assert abs(dpo["initial_margin"]) < 1e-3 and dpo["initial_loss"] == pytest.approx(0.6931, abs=1e-3)
        assert dpo["pairs"] == len(pairs) and dpo["steps"] >= 1
    assert not plans[0] & plans[1]  # fresh instructions each iteration
    # Iteration 2 sampled with iteration 1's adapter and trained on from it.
    assert summary["final_adapter"] == str(RunDir(rd).iteration(2).adapter)
    assert summary["heldout_before"]["n"] == 3 and summary["heldout_after"]["n"] == 3
    assert summary["heldout_change"]["n"] == 3
    table = "\n".join(logs)
    assert "valid-format rate" in table and "held-out" in table
    # Running again does nothing new (all DONE) and gives the same summary.
    again = run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    assert again["iterations"] == summary["iterations"]


# ------------------------------------------------------------------------------------------------ bad input

def _cli(*args):
    from click.testing import CliRunner

    from tpo_lite.cli import main

    return CliRunner().invoke(main, list(args))


def _one_error_line(res, *parts):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for p in parts:
        assert p in lines[0], lines[0]
    return lines[0]


def test_bad_config_one_clear_error(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg = write_config(tmp_path, model_dir, train, heldout)
    text = cfg.read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("k = 4", "k = \"four\""))
    line = text.splitlines().index("k = 4") + 1
    _one_error_line(_cli("run", str(bad), "--dry-run"), f"{bad}:{line}: sampling.k: expected int")
    bad.write_text(text.replace("iterations = 2", "iteratoins = 2"))
    _one_error_line(_cli("run", str(bad), "--dry-run"), "loop.iteratoins: unknown option")
    _one_error_line(_cli("run", str(tmp_path / "missing.toml")), "missing.toml: config file not found")
    _one_error_line(_cli("run", str(cfg), "--set", "sampling.temperature=hot"),
                    "--set: sampling.temperature: expected float")


def test_dry_run_prints_plan_and_loads_no_model(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg = write_config(tmp_path, model_dir, train, heldout)
    res = _cli("run", str(cfg), "--dry-run", "--name", "dry", "--set", "loop.iterations=3")
    assert res.exit_code == 0, res.output
    assert f"run directory: {tmp_path / 'runs' / 'dry'}" in res.output
    assert "iterations: 3 x 5 instructions" in res.output and "iter 3: not started" in res.output
    assert "[sampling]" in res.output and "k = 4" in res.output
    assert not (tmp_path / "runs" / "dry").exists()


def test_list_options_covers_every_table():
    res = _cli("run", "--list-options")
    assert res.exit_code == 0, res.output
    for table in ("[model]", "[prompts]", "[sampling]", "[judge]", "[pairs]", "[train]", "[loop]", "[eval]"):
        assert table in res.output
    assert "prompts_per_iteration (int, default 32)" in res.output


def test_bad_template_and_model_path(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg = write_config(tmp_path, model_dir, train, heldout, extra="")
    res = _cli("generate", str(cfg), "--set", f"prompts.template={tmp_path / 'nope.toml'}")
    _one_error_line(res, "nope.toml", "template file not found")
    res = _cli("generate", str(cfg), "--name", "m", "--set", f"model.path={tmp_path / 'no_model'}")
    _one_error_line(res, "no_model")


def test_corrupt_jsonl_names_file_and_line(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg = write_config(tmp_path, model_dir, train, heldout, iterations=1)
    from tpo_lite.config import load_config
    from tpo_lite.guard import prepare_run_dir
    from tpo_lite.stages import generate_stage

    c = load_config(cfg, ["loop.eval_before=false"])
    rd = tmp_path / "runs" / "t"
    prepare_run_dir(c, rd)
    generate_stage(c, rd, 1, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    samples = RunDir(rd).iteration(1).samples
    lines = samples.read_text().splitlines(keepends=True)
    lines[2] = lines[2][:40] + "\n"  # a damaged *complete* line is corruption, not a torn tail
    samples.write_text("".join(lines))
    RunDir(rd).iteration(1).marker("generate").unlink()
    res = _cli("generate", str(cfg), "--set", "loop.eval_before=false")
    _one_error_line(res, f"{samples}:3: not valid JSON")


def test_config_change_on_resume_is_refused(tiny, tmp_path):
    model_dir, train, heldout = tiny
    cfg = write_config(tmp_path, model_dir, train, heldout)
    from tpo_lite.config import load_config
    from tpo_lite.guard import prepare_run_dir

    rd = tmp_path / "runs" / "t"
    prepare_run_dir(load_config(cfg), rd)
    prepare_run_dir(load_config(cfg, ["loop.iterations=5"]), rd)  # more iterations: fine
    with pytest.raises(TpoError, match=r"sampling.k: 4 -> 8"):
        prepare_run_dir(load_config(cfg, ["sampling.k=8"]), rd)


def test_judge_failure_keeps_partial_work_and_resumes(tiny, tmp_path):
    """A judge that gives up (e.g. its server stays down after the retries) stops the run with the judgements
    already made kept on disk; the resumed run judges only the rest."""
    from tpo_lite.judges.base import JudgeResult
    from tpo_lite.jsonl import read_records
    from tpo_lite.loop import run

    class FlakyJudge:
        name = "flaky"

        def __init__(self, fail_after):
            self.calls, self.fail_after, self.seen = 0, fail_after, []

        def score(self, instruction, responses):
            if self.calls == self.fail_after:
                raise TpoError("judge server http://127.0.0.1:9/v1 unreachable after 3 retries", field="judge")
            self.calls += 1
            self.seen.append(instruction["id"])
            return JudgeResult([None if r is None else float(len(r)) for r in responses])

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout, iterations=1), "loop.eval_before=false",
                "loop.eval_after=false")
    j1 = FlakyJudge(fail_after=2)
    with pytest.raises(TpoError, match="unreachable"):
        run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory(), judge=j1)
    d = RunDir(tmp_path / "runs" / "t").iteration(1)
    kept = read_records(d.judgements, key="prompt_id")
    assert list(kept) == j1.seen and len(kept) == 2
    assert not (d.marker("judge")).exists()
    j2 = FlakyJudge(fail_after=-1)
    run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory(), judge=j2)
    assert not set(j2.seen) & set(j1.seen) and len(j1.seen) + len(j2.seen) == 5  # nothing judged twice
    assert len(read_records(d.judgements, key="prompt_id")) == 5


def test_heldout_of_the_same_model_is_reused(tiny, tmp_path):
    """An iteration that trained nothing evaluates the same weights as before: no second generation. (A result
    counts as the same model's only with the same producer: tests/test_run_integrity.py.)"""
    from tpo_lite.evaluate import load_eval_set
    from tpo_lite.jsonl import write_json_atomic
    from tpo_lite.heldout import heldout_producer, heldout_stage

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), f"model.path={tmp_path / 'absent_model'}")
    rd = tmp_path / "runs" / "t"
    producer = heldout_producer(cfg, None, load_eval_set(str(heldout), max_instructions=3))
    base = {"kind": "absolute", "adapter": None, "producer": producer, "mean_score": 0.25,
            "mean_score_ci": [0.0, 0.5], "n": 3, "valid_rate": 1.0, "items": []}
    write_json_atomic(RunDir(rd).eval_base.result, base)
    write_json_atomic(RunDir(rd).eval_base.producer, producer)
    # The model path does not exist: loading it would raise, so reuse must not load anything.
    got = heldout_stage(cfg, rd, RunDir(rd).iteration(1).heldout, None, "iter01", progress=False, echo=lambda s: None)
    assert got == base and json.loads(RunDir(rd).iteration(1).heldout.result.read_text()) == base
    with pytest.raises(TpoError, match="absent_model"):
        heldout_stage(cfg, rd, RunDir(rd).iteration(2).heldout, str(tmp_path / "some_adapter"), "iter02",
                      progress=False, echo=lambda s: None)


def test_policy_equals_reference_with_default_dropout(tiny, tmp_path):
    """Default [model]/[train] dropout settings: the DPO policy pass and the cached reference pass are the same
    function, so the first step's margin is exactly 0 -- also in iteration 2, whose reference is iteration 1's
    (non-zero) adapter, loaded with the lora_dropout its adapter_config.json carries."""
    from tpo_lite.loop import run

    model_dir, train, heldout = tiny
    cfg_path = write_config(tmp_path, model_dir, train, heldout)
    cfg_path.write_text(cfg_path.read_text().replace("lora_dropout = 0.0\n", ""))
    cfg = _load(cfg_path, "loop.eval_before=false", "loop.eval_after=false")
    assert cfg.model.lora_dropout > 0 and getattr(cfg.train, "disable_dropout", True)
    run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    rd = tmp_path / "runs" / "t"
    ad1 = json.loads((RunDir(rd).iteration(1).adapter / "adapter_config.json").read_text())
    assert ad1["lora_dropout"] > 0  # the saved adapter still carries dropout; training turns it off
    for t in (1, 2):
        dpo = json.loads(RunDir(rd).iteration(t).marker("train").read_text())["metrics"]
        assert dpo["initial_margin"] == 0.0, (t, dpo["initial_margin"])
        assert dpo["initial_loss"] == pytest.approx(0.6931, abs=1e-4)


def test_format_failure_rates_and_invalid_rejected_are_reported():
    from tpo_lite.metrics import format_table, sample_stats
    from tpo_lite.records import PromptSamples

    def s(valid, reason, finish="eos"):
        return {"text": "", "valid": valid, "invalid_reason": reason, "finish_reason": finish, "thought": "t",
                "response": "r" if valid else "", "token_ids": [1, 2], "forced": False}

    recs = [{"samples": [s(True, None), s(False, "truncated", "length"), s(False, "no_response_marker"),
                         s(False, "truncated", "length")]},
            {"samples": [s(True, None), s(False, "empty_response"), s(True, None), s(True, None)]}]
    st = sample_stats([PromptSamples.from_record({"prompt_id": str(i), "instruction": "", "prompt_text": "",
                                                  "prompt_token_ids": [], **r}) for i, r in enumerate(recs)])
    assert st["cut_off_rate"] == 2 / 8 and st["no_response_marker_rate"] == 1 / 8
    assert st["empty_response_rate"] == 1 / 8
    table = format_table([{"iteration": 1, "generate": st,
                           "pairs": {"pairs_kept": 10, "rejected_parse_failure": 1, "rejected_truncated": 3,
                                     "rejected_cut_to_chosen": 2}}])
    rows = {ln.split("  ")[0].strip(): ln.split()[-1] for ln in table.splitlines()}
    assert rows["cut-off rate"] == "25.0%" and rows["no-marker rate"] == "12.5%"
    assert rows["rejected parse failure"] == "1" and rows["rejected cut off"] == "3"
    assert rows["rejected cut to chosen"] == "2"


# ------------------------------------------------------------------------------- keep_best on a validation split

def test_keep_best_needs_a_validation_split(tiny, tmp_path):
    from tpo_lite.loop import run

    model_dir, train, heldout = tiny
    cfg = write_config(tmp_path, model_dir, train, heldout)
    with pytest.raises(TpoError, match="loop.keep_best: needs loop.validation_instructions"):
        run(_load(cfg, "loop.keep_best=true"), progress=False, echo=lambda s: None)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(TpoError, match="loop.validation_instructions"):
        _load(cfg, "loop.validation_instructions=-1")


def test_validation_instructions_never_appear_in_a_plan(tiny, tmp_path):
    from tpo_lite.plan import iteration_plan, load_train_instructions, validation_split

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "loop.validation_instructions=4",
                "loop.iterations=4")
    val = validation_split(cfg)
    assert len(val) == 4 and len({v.id for v in val}) == 4
    all_ids = {i.id for i in load_train_instructions(cfg)}
    assert {v.id for v in val} <= all_ids
    rd = tmp_path / "runs" / "t"
    planned = set()
    for t in range(1, 5):  # 4 x 5 > the 10 training instructions left: the plans wrap around
        planned |= {p["id"] for p in iteration_plan(cfg, rd, t)}
    assert planned == all_ids - {v.id for v in val}
    # The split does not depend on the number of iterations, and the first plans match a run without it.
    assert [v.id for v in validation_split(cfg.replace("loop", iterations=1))] == [v.id for v in val]
    plain = _load(write_config(tmp_path, model_dir, train, heldout))
    assert iteration_plan(plain, tmp_path / "other", 1) == iteration_plan(cfg, rd, 1)
    with pytest.raises(TpoError, match="validation_instructions"):
        validation_split(cfg.replace("loop", validation_instructions=14))


def _fake_iteration(rd: Path, t: int, heldout: float, validation: float) -> None:
    from tpo_lite.jsonl import write_json_atomic

    d = RunDir(rd).iteration(t)
    d.adapter.mkdir(parents=True)
    d.mark_done("train", {"adapter": str(d.adapter)})
    write_json_atomic(d.heldout.result, {"mean_score": heldout})
    write_json_atomic(d.validation.result, {"mean_score": validation})


def test_keep_best_selects_on_validation_never_on_heldout(tiny, tmp_path, monkeypatch):
    import tpo_lite.rundir as rundir
    from tpo_lite.stages import adapter_for

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "loop.keep_best=true",
                "loop.validation_instructions=3")
    rd = tmp_path / "runs" / "t"
    _fake_iteration(rd, 1, heldout=0.9, validation=0.6)  # best on validation
    _fake_iteration(rd, 2, heldout=1.0, validation=0.2)  # best on the reported held-out set
    _fake_iteration(rd, 3, heldout=0.1, validation=0.4)
    read = []
    real = rundir.read_json
    monkeypatch.setattr(rundir, "read_json", lambda p: read.append(Path(p)) or real(p))
    assert adapter_for(rd, 4, cfg) == str(RunDir(rd).iteration(1).adapter)
    assert read and not [p for p in read if "heldout" in p.parts]
    # without keep_best: the previous iteration's adapter (the paper)
    assert adapter_for(rd, 4, cfg.replace("loop", keep_best=False)) == str(RunDir(rd).iteration(3).adapter)


def test_keep_best_run_scores_the_validation_split(tiny, tmp_path):
    from tpo_lite.jsonl import read_records
    from tpo_lite.loop import run
    from tpo_lite.plan import validation_split

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "loop.keep_best=true",
                "loop.validation_instructions=2", "loop.eval_before=false", "loop.eval_after=false")
    logs = []
    summary = run(cfg, progress=False, echo=logs.append, sampler_factory=scripted_factory())
    rd = tmp_path / "runs" / "t"
    val_ids = [v.id for v in validation_split(cfg)]
    scores = []
    for t in (1, 2):
        d = RunDir(rd).iteration(t)
        assert not (d.heldout.path).exists()  # keep_best no longer forces the reported set every iteration
        assert list(read_records(d.validation.outputs, key="id")) == val_ids
        res = json.loads((d.validation.result).read_text())
        assert res["n"] == 2 and res["adapter"] == str(d.adapter)
        assert not set(val_ids) & set(read_records(d.samples, key="prompt_id"))
        scores.append(res["mean_score"])
        assert json.loads((d.metrics).read_text())["validation"]["mean_score"] == res["mean_score"]
    best = 1 if scores[0] >= scores[1] else 2
    assert summary["final_adapter"] == str(RunDir(rd).iteration(best).adapter)
    assert "validation score" in "\n".join(logs)


def test_heldout_generates_through_the_sampling_backend(tiny, tmp_path, monkeypatch):
    """The held-out eval takes the run's sampling backend like `tpo-lite eval` (here a server, scripted): the
    model is never loaded in-process, the server is asked for the adapter, outputs record their tries."""
    from tpo_lite import models, sampling
    from tpo_lite.jsonl import read_records
    from tpo_lite.heldout import heldout_stage

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "sampling.backend=openai")

    def no_load(*args, **kwargs):
        raise AssertionError("the held-out eval loaded the model in-process")

    asked = []

    def server_factory(scfg, tokenizer, template, model=None, adapter=None, progress=True):
        asked.append((scfg.temperature, adapter, model))
        return ScriptedSampler(tokenizer)

    monkeypatch.setattr(models, "load_model", no_load)
    monkeypatch.setattr(sampling, "make_sampler", server_factory)
    rd = tmp_path / "runs" / "t"
    res = heldout_stage(cfg, rd, RunDir(rd).iteration(1).heldout, "/runs/t/iter_01/adapter", "iter01", progress=False,
                        echo=lambda s: None)
    assert res["n"] == 3 and asked[0] == (0.0, "/runs/t/iter_01/adapter", None)
    recs = read_records(RunDir(rd).iteration(1).heldout.outputs)
    assert len(recs) == 3 and all(r["tries"] >= 1 and r["generator"] == "iter01" for r in recs)


def test_heldout_eval_hashes_the_adapter_once(tiny, tmp_path, monkeypatch):
    """One held-out eval reads the adapter's weights for its digest once (its producer's), not again for the
    generation settings of its outputs."""
    from tpo_lite import rundir, sampling
    from tpo_lite.heldout import heldout_stage

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "sampling.backend=openai")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    hashed, real = [], rundir._sha256_file
    monkeypatch.setattr(rundir, "_sha256_file", lambda path: hashed.append(path.name) or real(path))
    monkeypatch.setattr(sampling, "make_sampler", lambda scfg, tokenizer, *a, **kw: ScriptedSampler(tokenizer))
    rd = tmp_path / "runs" / "t"
    res = heldout_stage(cfg, rd, RunDir(rd).iteration(1).heldout, str(adapter), "iter01", progress=False,
                        echo=lambda s: None)
    assert res["n"] == 3 and res["producer"]["adapter_sha256"]
    assert sorted(hashed) == ["adapter_config.json", "adapter_model.safetensors"]


def test_heldout_judge_is_the_eval_judge_and_warns_on_the_optimised_one(tiny, tmp_path, monkeypatch):
    from tpo_lite import judges
    from tpo_lite.heldout import make_heldout_judge

    monkeypatch.setattr(judges, "make_judge", lambda cfg, cache_path=None, **kw: ("judge", cfg.kind, cfg.model))
    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout), "loop.heldout_judge=judge")
    cfg = cfg.replace("judge", kind="reward_model", model="/rm")
    rd = tmp_path / "runs" / "t"
    logs = []
    assert make_heldout_judge(cfg, rd, [], logs.append) == ("judge", "reward_model", "/rm")
    assert len(logs) == 1 and "this measures reward hacking, not quality; set [eval_judge]" in logs[0]
    other = cfg.replace("eval_judge", kind="reward_model", model="/other-rm")
    logs.clear()
    assert make_heldout_judge(other, rd, [], logs.append) == ("judge", "reward_model", "/other-rm") and logs == []
    # programmatic held-out score (the instructions' own checks): no learned judge, no warning
    logs.clear()
    prog = make_heldout_judge(cfg.replace("loop", heldout_judge="programmatic"), rd, [], logs.append)
    assert type(prog).__name__ == "ProgrammaticJudge" and logs == []


def test_more_iterations_later_is_the_longer_run(tiny, tmp_path):
    """A run extended with --set loop.iterations=N+1 (as the README's measured run was, for its third iteration)
    plans, pairs and trains exactly what a run started with N+1 iterations does: the plan of iteration t, the
    sample seeds and the adapter it starts from do not depend on how many iterations were asked for (scripted
    samples: the tiny random model's own outputs never parse, so it would train nothing)."""
    from tpo_lite.loop import run

    model_dir, train, heldout = tiny
    cfg = write_config(tmp_path, model_dir, train, heldout, iterations=2, extra="")
    for name, iterations in (("whole", 2), ("extended", 1), ("extended", 2)):
        run(_load(cfg, f"loop.name={name}", f"loop.iterations={iterations}"), progress=False,
            echo=lambda *_: None, sampler_factory=scripted_factory())
    whole, extended = RunDir(tmp_path / "runs" / "whole"), RunDir(tmp_path / "runs" / "extended")
    for t in (1, 2):
        a, b = whole.iteration(t), extended.iteration(t)
        for f in ("samples", "judgements", "pairs"):
            assert getattr(a, f).read_bytes() == getattr(b, f).read_bytes(), (t, f)
        weights = "adapter_model.safetensors"
        assert (a.adapter / weights).read_bytes() == (b.adapter / weights).read_bytes(), t
    assert (json.loads(whole.summary.read_text())["heldout_after"]["mean_score"]
            == json.loads(extended.summary.read_text())["heldout_after"]["mean_score"])
