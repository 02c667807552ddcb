"""Experiment tracking (loop.report_to): a real TensorBoard run read back from its event files, resume without
duplicate or missing steps, missing packages, wandb / trackio calls (fake modules), errors that only warn."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from tpo_lite.errors import TpoError
from tpo_lite.rundir import RunDir
from tpo_lite.tracking import numbers

from test_loop import build_tiny_model, scripted_factory, write_config, write_instructions  # noqa: E402

DPO_TAGS = ("loss", "margins", "accuracy", "rewards/chosen", "rewards/rejected", "lr", "grad_norm")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return (build_tiny_model(root / "model"), write_instructions(root / "train.jsonl", 14, "tr"),
            write_instructions(root / "heldout.jsonl", 4, "ho"))


def _config(tiny, tmp_path, *overrides, iterations=2):
    from tpo_lite.config import load_config

    return load_config(write_config(tmp_path, *tiny, iterations=iterations), list(overrides))


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file under ``folder``, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0 = keep every value
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_dpo_steps(rd: Path, tags: dict, iterations: int) -> int:
    """Every DPO step of every iteration's history.json is at its global step, once; returns the step count."""
    offset = 0
    for t in range(1, iterations + 1):
        history = json.loads((RunDir(rd).iteration(t).adapter / "history.json").read_text())
        for rec in history:
            for key in DPO_TAGS:
                assert (offset + rec["step"], pytest.approx(rec[key], rel=1e-5, abs=1e-7)) in \
                    [(s, v) for s, v in tags[f"dpo/{key}"] if s == offset + rec["step"]], (t, rec["step"], key)
        offset += len(history)
    for key in DPO_TAGS:
        assert [s for s, _ in tags[f"dpo/{key}"]] == list(range(1, offset + 1)), key  # no gap, no duplicate
    return offset


def test_tensorboard_run_logs_what_metrics_json_and_history_hold(tiny, tmp_path):
    from tpo_lite.loop import run

    cfg = _config(tiny, tmp_path, 'loop.report_to="tensorboard"')
    summary = run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    rd = tmp_path / "runs" / "t"
    tb = RunDir(rd).tracking / "tensorboard"
    assert list(tb.glob("events.out.tfevents.*"))
    tags = _scalars(tb)

    # per DPO step: a global step running on across the iterations, values of history.json
    steps = _check_dpo_steps(rd, tags, 2)
    assert steps == sum(m["train"]["metrics"]["steps"] for m in summary["iterations"]) >= 2

    # per iteration, at step t: every number of metrics.json under its JSON path (`must`: the paths, spelled out)
    for t in (1, 2):
        m = json.loads(RunDir(rd).iteration(t).metrics.read_text())
        flat = numbers({k: v for k, v in m.items() if k != "iteration"})
        for must in ("generate/valid_rate", "generate/forced_rate", "generate/cut_off_rate",
                     "generate/thought_chars_mean", "generate/response_chars_mean", "pairs/pairs_kept",
                     "pairs/chosen_score_mean", "pairs/rejected_score_mean", "pairs/chosen_response_chars",
                     "pairs/chosen_tokens", "train/metrics/loss", "judge/mean_score"):
            assert must in flat, must
        for tag, value in flat.items():
            assert (t, pytest.approx(value, rel=1e-6, abs=1e-9)) in tags[tag], (t, tag)
    assert tags["generate/valid_rate"] == [(1, pytest.approx(summary["iterations"][0]["generate"]["valid_rate"])),
                                           (2, pytest.approx(summary["iterations"][1]["generate"]["valid_rate"]))]
    # held-out: the seed at step 0, the model after the last iteration at step 2, and the run's end
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert tags["heldout/mean_score"] == [(0, pytest.approx(before["mean_score"])),
                                          (2, pytest.approx(after["mean_score"]))]
    assert tags["heldout_after/mean_score"] == [(2, pytest.approx(after["mean_score"]))]
    assert tags["heldout_change/score_diff"] == [(2, pytest.approx(summary["heldout_change"]["score_diff"]))]
    assert not [t for t in tags if "memory" in t or t.startswith("iteration")]

    # running again (everything done) sends nothing twice
    run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    assert _scalars(tb) == tags


class Crash(Exception):
    pass


def test_resume_after_a_crash_in_dpo_sends_no_step_twice_and_misses_none(tiny, tmp_path, monkeypatch):
    """Killed in iteration 2's DPO during its step 4 (step 3 sent, the checkpoint after step 2): the resumed run
    recomputes step 3 (already sent) and goes on; every global step is in the event files exactly once, with
    its value."""
    import tpo_lite.train as train_mod
    from tpo_lite.loop import run

    cfg = _config(tiny, tmp_path, 'loop.report_to="tensorboard"', "loop.eval_before=false", "loop.eval_after=false",
                  "train.epochs=2", "train.checkpoint_every=2")
    rd = tmp_path / "runs" / "t"
    real_train, real_step = train_mod.train_iteration, torch.optim.lr_scheduler.LambdaLR.step
    where = {}

    def train_iteration(*a, **k):
        where["iter"] = (a[3] if len(a) > 3 else k["out_dir"]).name  # an IterationDir or a Path
        return real_train(*a, **k)

    def step(self, *a, **k):
        real_step(self, *a, **k)
        if where.get("iter") == "iter_02" and self.last_epoch == 4:
            raise Crash("killed in step 4")

    with monkeypatch.context() as mp:
        mp.setattr(train_mod, "train_iteration", train_iteration)
        mp.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)
        with pytest.raises(Crash):
            run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    d2 = RunDir(rd).iteration(2)
    assert d2.dpo_checkpoint.exists() and not d2.adapter.exists()
    sent = _scalars(RunDir(rd).tracking / "tensorboard")
    steps1 = json.loads(RunDir(rd).iteration(1).marker("train").read_text())["metrics"]["steps"]
    assert [s for s, _ in sent["dpo/loss"]] == list(range(1, steps1 + 4))  # iteration 2's steps 1-3 were sent

    summary = run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    assert summary["iterations"][1]["train"]["metrics"]["resumed_at_step"] == 2
    tags = _scalars(RunDir(rd).tracking / "tensorboard")
    assert _check_dpo_steps(rd, tags, 2) == steps1 + summary["iterations"][1]["train"]["metrics"]["steps"]
    assert [s for s, _ in tags["generate/valid_rate"]] == [1, 2]


# ------------------------------------------------------------------------------------------ missing packages

@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_missing_package_is_one_clear_error_before_any_work(tiny, tmp_path, monkeypatch, name):
    from tpo_lite.loop import describe_plan, run

    monkeypatch.setitem(sys.modules, name, None)  # import fails as if it were not installed
    cfg = _config(tiny, tmp_path, f'loop.report_to=["tensorboard", "{name}"]')
    for call in (lambda: describe_plan(cfg), lambda: run(cfg, progress=False, echo=lambda s: None,
                                                           sampler_factory=scripted_factory())):
        with pytest.raises(TpoError) as e:
            call()
        assert e.value.field == "loop.report_to" and e.value.path == "--set"
        assert f"pip install {name}" in e.value.message
    assert not (tmp_path / "runs" / "t").exists()  # refused before the run directory was touched


def test_unknown_tracker_names_file_line_and_option(tmp_path):
    from tpo_lite.config import load_config

    p = tmp_path / "c.toml"
    p.write_text('[loop]\nname = "x"\nreport_to = ["tensorboard", "mlflow"]\n')
    with pytest.raises(TpoError) as e:
        load_config(p)
    assert (e.value.path, e.value.line, e.value.field) == (str(p), 3, "loop.report_to")
    assert "'mlflow'" in e.value.message and "'wandb'" in e.value.message


def test_dry_run_names_the_trackers(tiny, tmp_path):
    from tpo_lite.loop import describe_plan

    plan = describe_plan(_config(tiny, tmp_path, 'loop.report_to="tensorboard"'))
    assert f"tracking: tensorboard (files in {tmp_path / 'runs' / 't' / 'tracking'})" in plan
    assert "tracking: none" in describe_plan(_config(tiny, tmp_path))


# ------------------------------------------------------------------------------- wandb / trackio (fake modules)

def _fake_wandb(calls: list, fail_log: bool = False):
    class Run:
        def define_metric(self, name, step_metric=None):
            calls.append(("define_metric", name, step_metric))

        def log(self, data):
            if fail_log:
                raise RuntimeError("network down")
            calls.append(("log", dict(data)))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw))
        return Run()

    return types.SimpleNamespace(init=init)


def _tracking(tiny, tmp_path, report_to, echo=None):
    from tpo_lite.tracking import RunTracking

    cfg = _config(tiny, tmp_path, f'loop.report_to="{report_to}"')
    return RunTracking(cfg, tmp_path / "runs" / "t", echo or (lambda s: None))


HISTORY = [{"step": 1, "epoch": 0, "loss": 0.69, "margins": 0.0, "accuracy": 0.0, "rewards/chosen": 0.0,
            "rewards/rejected": 0.0, "lr": 1e-3, "grad_norm": 0.5},
           {"step": 2, "epoch": 0, "loss": 0.6, "margins": 0.1, "accuracy": 1.0, "rewards/chosen": 0.05,
            "rewards/rejected": -0.05, "lr": 5e-4, "grad_norm": 0.4}]


def test_wandb_run_resumes_its_id_plots_each_axis_and_sends_nothing_twice(tiny, tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.setenv("WANDB_MODE", "offline")
    with _tracking(tiny, tmp_path, "wandb") as tr:
        tr.log_heldout_before({"mean_score": 0.25, "valid_rate": 1.0, "n": 3, "items": []})
        tr.dpo_step_logger(1)(HISTORY[:1])
        tr.dpo_step_logger(1)(HISTORY)
    init = calls[0][1]
    # wandb reads WANDB_MODE itself: a mode passed here would override the user's offline mode
    assert "mode" not in init and init["project"] == "my-project" and init["name"] == "t"
    assert init["resume"] == "allow" and init["dir"] == str(tmp_path / "runs" / "t" / "tracking")
    assert ("define_metric", "dpo/*", "dpo/step") in calls and ("define_metric", "heldout/*", "iteration") in calls
    logs = [c[1] for c in calls if c[0] == "log"]
    assert logs[0] == {"heldout/mean_score": 0.25, "heldout/valid_rate": 1.0, "heldout/n": 3.0, "iteration": 0}
    assert [(x["dpo/step"], x["dpo/loss"]) for x in logs[1:]] == [(1, 0.69), (2, 0.6)]
    assert calls[-1] == ("finish",)

    calls.clear()
    with _tracking(tiny, tmp_path, "wandb") as tr:  # a resume: same wandb run, nothing sent twice
        tr.log_heldout_before({"mean_score": 0.25, "valid_rate": 1.0, "n": 3})
        tr.dpo_step_logger(1)(HISTORY)
    assert calls[0][1]["id"] == init["id"] and not [c for c in calls if c[0] == "log"]


def test_trackio_logs_with_steps(tiny, tmp_path, monkeypatch):
    calls: list = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda metrics, step=None: calls.append(("log", dict(metrics), step)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    with _tracking(tiny, tmp_path, "trackio") as tr:
        tr.dpo_step_logger(1)(HISTORY)
    assert calls[0][1]["name"] == "t" and calls[0][1]["resume"] == "allow"
    assert [(c[2], c[1]["dpo/loss"]) for c in calls if c[0] == "log"] == [(1, 0.69), (2, 0.6)]
    assert calls[-1] == ("finish",)


def test_a_tracker_error_is_one_warning_and_the_run_goes_on(tiny, tmp_path, monkeypatch):
    from tpo_lite.loop import run

    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls, fail_log=True))
    cfg = _config(tiny, tmp_path, 'loop.report_to="wandb"', "loop.eval_before=false", "loop.eval_after=false",
                  iterations=1)
    logs: list[str] = []
    summary = run(cfg, progress=False, echo=logs.append, sampler_factory=scripted_factory())
    assert summary["iterations"][0]["train"]["metrics"]["steps"] >= 1  # trained to the end
    warned = [ln for ln in logs if ln.startswith("warning:") and "wandb" in ln]
    assert len(warned) == 1 and "network down" in warned[0], logs
