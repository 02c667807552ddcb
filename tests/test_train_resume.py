"""Non-finite settings and training, and DPO checkpoints: a training run cut off after step n and resumed gives
the adapter of an uninterrupted run, bit for bit."""
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import typing
import warnings
from pathlib import Path

import pytest
import torch

from tpo_lite import config as C
from tpo_lite.errors import TpoError
from tpo_lite.models import ModelConfig
from tpo_lite.train import TrainConfig, train_iteration

from test_train import model_cfg, synthetic_pairs  # noqa: E402  (tests/ is on sys.path under pytest)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CHECKPOINT_NAME = "dpo_checkpoint.pt"  # iter_XX/dpo_checkpoint.pt (docs/running.md)


# ------------------------------------------------------------------------------------ non-finite settings

def _float_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls)
            if hints[f.name] is float or float in typing.get_args(hints[f.name])]


def test_every_float_option_of_every_table_must_be_finite():
    """inf and nan pass range checks written as comparisons (nan < 0 is False, inf > 0 is True): every float
    option of every config table is refused non-finite, naming the option."""
    checked = 0
    for section, cls in C.SECTIONS.items():
        for name in _float_fields(cls):
            for bad in (math.inf, -math.inf, math.nan):
                with pytest.raises(TpoError) as e:
                    cls(**{name: bad})
                assert e.value.field == name, (section, name, bad, str(e.value))
                assert "finite" in e.value.message, (section, name, str(e.value))
            checked += 1
    # train: beta, label_smoothing, nll_weight, learning_rate, warmup_ratio, weight_decay, max_grad_norm;
    # model: lora_alpha, lora_dropout; sampling, judge (twice: eval_judge), pairs, eval: theirs
    assert checked >= 25, checked


@pytest.mark.parametrize("table,key,value", [
    ("train", "learning_rate", "inf"), ("train", "beta", "nan"), ("train", "max_grad_norm", "inf"),
    ("train", "weight_decay", "nan"), ("model", "lora_alpha", "nan"), ("model", "lora_alpha", "inf"),
    ("sampling", "top_p", "nan"), ("sampling", "timeout_s", "inf"), ("pairs", "max_invalid_rejected", "nan"),
    ("judge", "bt_l2", "inf"), ("eval", "tie_margin", "inf"), ("eval", "temperature", "nan"),
])
def test_non_finite_option_in_a_config_file_names_file_line_and_field(tmp_path, table, key, value):
    p = tmp_path / "c.toml"
    p.write_text(f"[loop]\nname = 'x'\n\n[{table}]\n{key} = {value}\n")
    with pytest.raises(TpoError) as e:
        C.load_config(p)
    assert (e.value.path, e.value.line, e.value.field) == (str(p), 5, f"{table}.{key}")
    assert "must be a finite number" in e.value.message


@pytest.mark.parametrize("alpha", [0.0, -16.0])
def test_lora_alpha_must_be_positive(alpha):
    with pytest.raises(TpoError, match="lora_alpha: must be > 0"):
        ModelConfig(lora_alpha=alpha)


# ------------------------------------------------------------------------------------ non-finite training

def _inject(monkeypatch, at_call, how):
    """Wrap the DPO loss op: from micro-batch ``at_call`` (1-based) on, make its loss or its gradient NaN."""
    import tpo_lite.ops as ops

    real, calls = ops.fused_dpo_loss, []

    def wrapped(hidden, *a, **k):
        calls.append(1)
        if len(calls) >= at_call and how == "grad":
            hidden.register_hook(lambda g: g * math.nan)
        out = real(hidden, *a, **k)
        if len(calls) >= at_call and how == "loss":
            out = dataclasses.replace(out, loss=out.loss * math.nan)
        return out

    monkeypatch.setattr(ops, "fused_dpo_loss", wrapped)


@pytest.mark.parametrize("how,quantity", [("loss", "loss"), ("grad", "gradient norm")])
def test_non_finite_loss_or_gradient_stops_training_and_saves_nothing(tiny_dir, tmp_path, monkeypatch, how,
                                                                      quantity):
    tcfg = TrainConfig(epochs=1, batch_size=2, grad_accum=1, max_length=64, checkpoint_every=0)
    _inject(monkeypatch, 3, how)  # micro-batch 3 = optimizer step 3
    out = tmp_path / "iter_02"
    with pytest.raises(TpoError) as e:
        train_iteration(model_cfg(tiny_dir), tcfg, synthetic_pairs(8), out, None, progress=False)
    msg = str(e.value)
    assert f"non-finite {quantity}" in msg and "optimizer step 3 of 4" in msg, msg
    assert e.value.path == str(out)
    assert not (out / "adapter").exists() and not (out / ".adapter.tmp").exists()


def test_non_finite_weights_after_the_last_step_are_never_saved(tiny_dir, tmp_path, monkeypatch):
    """A finite loss and gradient, but an update that overflows (an absurd learning rate): caught before the
    adapter is written."""
    class Overflowing(torch.optim.AdamW):
        def step(self, closure=None):
            r = super().step(closure)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.inf)
            return r

    monkeypatch.setattr(torch.optim, "AdamW", Overflowing)
    out = tmp_path / "it"
    with pytest.raises(TpoError, match=r"non-finite LoRA weights \(inf or nan in \S+lora_A\S+\) after "
                                       r"optimizer step 1 of 1"):
        train_iteration(model_cfg(tiny_dir), TrainConfig(epochs=1, batch_size=4, grad_accum=1, max_length=64),
                        synthetic_pairs(4), out, None, progress=False)
    assert not (out / "adapter").exists()


# ----------------------------------------------------------------------------------------- checkpoints

def _adapter(d):
    from safetensors.torch import load_file

    return load_file(str(Path(d) / "adapter" / "adapter_model.safetensors"))


def _same_adapter(a, b):
    wa, wb = _adapter(a), _adapter(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _numbers(metrics):
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "seconds" not in k
            and k != "resumed_at_step"}


class Crash(Exception):
    pass


def _crash_after_step(monkeypatch, n):
    """Raise after optimizer step ``n`` (the scheduler steps once per optimizer step)."""
    real, count = torch.optim.lr_scheduler.LambdaLR.step, []

    def step(self, *a, **k):
        real(self, *a, **k)
        if self.last_epoch > 0:  # the constructor's own step() is not an optimizer step
            count.append(1)
            if len(count) == n:
                raise Crash(f"after step {n}")

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", step)


RESUME_CFG = dict(learning_rate=5e-3, epochs=2, batch_size=2, grad_accum=2, max_length=64, beta=0.5, seed=3,
                  warmup_ratio=0.2, lr_schedule="cosine", weight_decay=0.01)


def test_checkpoint_every_is_validated():
    assert TrainConfig().checkpoint_every == 10
    with pytest.raises(TpoError, match="checkpoint_every: must be >= 0"):
        TrainConfig(checkpoint_every=-1)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    pairs = synthetic_pairs(14, seed=11)  # 4 steps per epoch (the last one 2 pairs), 8 in all
    full = tmp_path / "full"
    m_full = train_iteration(model_cfg(tiny_dir), TrainConfig(checkpoint_every=0, **RESUME_CFG), pairs, full,
                             None, progress=False)
    assert m_full["steps"] == 8 and m_full["resumed_at_step"] == 0

    cut = tmp_path / "cut"
    tcfg = TrainConfig(checkpoint_every=3, **RESUME_CFG)
    with monkeypatch.context() as mp:
        _crash_after_step(mp, 7)  # in epoch 2; checkpoints after steps 3 and 6
        with pytest.raises(Crash):
            train_iteration(model_cfg(tiny_dir), tcfg, pairs, cut, None, progress=False)
    assert not (cut / "adapter").exists()
    ck = torch.load(cut / CHECKPOINT_NAME, weights_only=True)
    assert (ck["step"], ck["epoch"], ck["batch"]) == (6, 1, 2) and len(ck["history"]) == 6
    assert [p.name for p in cut.iterdir() if "tmp" in p.name] == []

    m_cut = train_iteration(model_cfg(tiny_dir), tcfg, pairs, cut, None, progress=False)
    assert m_cut["resumed_at_step"] == 6 and m_cut["steps"] == 8
    _same_adapter(full, cut)
    assert _numbers(m_cut) == _numbers(m_full)
    assert json.loads((cut / "adapter" / "history.json").read_text()) == \
        json.loads((full / "adapter" / "history.json").read_text())
    # the adapter and its DONE marker are written: the checkpoint goes
    assert (cut / "adapter" / "DONE").is_file() and not (cut / CHECKPOINT_NAME).exists()


def test_checkpoint_of_other_settings_is_not_resumed(tiny_dir, tmp_path, monkeypatch):
    pairs = synthetic_pairs(8, seed=12)
    out = tmp_path / "it"
    kw = dict(RESUME_CFG, epochs=1, grad_accum=1)  # 4 steps
    with monkeypatch.context() as mp:
        _crash_after_step(mp, 3)
        with pytest.raises(Crash):
            train_iteration(model_cfg(tiny_dir), TrainConfig(checkpoint_every=2, **kw), pairs, out, None,
                            progress=False)
    assert (out / CHECKPOINT_NAME).is_file()
    other = TrainConfig(checkpoint_every=2, **dict(kw, learning_rate=1e-3))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = train_iteration(model_cfg(tiny_dir), other, pairs, out, None, progress=False)
    assert m["resumed_at_step"] == 0
    assert any("other settings" in str(x.message) and CHECKPOINT_NAME in str(x.message) for x in w)
    fresh = tmp_path / "fresh"
    train_iteration(model_cfg(tiny_dir), other, pairs, fresh, None, progress=False)
    _same_adapter(out, fresh)

    # a checkpoint left by a kill between DONE and its removal goes on the next call, which trains nothing
    (out / CHECKPOINT_NAME).write_bytes(b"left over")
    torn = out / f".{CHECKPOINT_NAME}.k1ll3d.tmp"  # the temp file of a write a kill cut (jsonl.write_atomic)
    torn.write_bytes(b"torn")
    assert train_iteration(model_cfg(tiny_dir), other, pairs, out, None, progress=False) == m
    assert not (out / CHECKPOINT_NAME).exists() and not torn.exists()

    # an unreadable checkpoint: a warning, then the iteration from its first step
    import shutil
    shutil.rmtree(out / "adapter")
    (out / CHECKPOINT_NAME).write_bytes(b"not a torch file")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert train_iteration(model_cfg(tiny_dir), other, pairs, out, None, progress=False)["resumed_at_step"] == 0
    assert any("unreadable DPO checkpoint" in str(x.message) for x in w)
    _same_adapter(out, fresh)


DRIVER = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_train import model_cfg, synthetic_pairs
from tpo_lite.train import TrainConfig, train_iteration
real = torch.optim.lr_scheduler.LambdaLR.step
def slow(self, *a, **k):  # leave the parent time to kill between checkpoints
    real(self, *a, **k)
    time.sleep(float(sys.argv[3]))
torch.optim.lr_scheduler.LambdaLR.step = slow
train_iteration(model_cfg(sys.argv[1]), TrainConfig(checkpoint_every=2, **{cfg!r}), synthetic_pairs(14, seed=11),
                sys.argv[2], None, progress=False)
"""


@pytest.mark.slow  # three training processes (~25 s on the shared 2-core machine)
def test_kill9_mid_training_then_resume_equals_uninterrupted(tiny_dir, tmp_path):
    """A real SIGKILL of a training process after its first checkpoint; the rerun resumes from it."""
    script = DRIVER.format(tests=str(TESTS), cfg=RESUME_CFG)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run([sys.executable, "-c", script, tiny_dir, str(full), "0"], env=env, check=True, timeout=300)

    proc = subprocess.Popen([sys.executable, "-c", script, tiny_dir, str(cut), "0.5"], env=env)
    deadline = time.time() + 240
    while not (cut / CHECKPOINT_NAME).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "adapter").exists()
    step = torch.load(cut / CHECKPOINT_NAME, weights_only=True)["step"]
    assert 2 <= step < 8

    # resumed in a process like the others (same thread count: the same float reductions)
    subprocess.run([sys.executable, "-c", script, tiny_dir, str(cut), "0"], env=env, check=True, timeout=300)
    assert json.loads((cut / "adapter" / "DONE").read_text())["resumed_at_step"] == step
    _same_adapter(full, cut)
    assert not (cut / CHECKPOINT_NAME).exists()
