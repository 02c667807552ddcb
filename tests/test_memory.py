"""Per-stage peak memory of a run, and one model resident at a time (a stage frees what it loaded)."""
from __future__ import annotations

import gc
import json
import mmap

import pytest

from tpo_lite import memory
from tpo_lite.memory import StageMemory

from test_loop import ScriptedSampler, _load, build_tiny_model, scripted_factory, write_config, write_instructions


def _resident_for_a_moment(mib: int = 96) -> None:
    """``mib`` MiB resident, then handed back to the OS: an anonymous mapping of our own, every page touched, then
    unmapped (a bytearray goes through malloc, which may serve it from a heap it keeps after a long test session)."""
    block = mmap.mmap(-1, mib * 2**20)
    for i in range(0, len(block), mmap.PAGESIZE):
        block[i] = 1
    block.close()


def test_stage_memory_sees_a_short_peak_and_gives_it_back():
    with StageMemory() as m:
        _resident_for_a_moment()
        inside = m.record()
    rec = m.record()
    assert rec["method"]
    assert rec["peak_rss_mb"] >= rec["rss_start_mb"] + 90, rec
    assert inside["peak_rss_mb"] == pytest.approx(rec["peak_rss_mb"], abs=1)
    assert rec["rss_end_mb"] < rec["peak_rss_mb"] - 80, rec


def test_nested_blocks_keep_the_outer_peaks():
    with StageMemory(release_after=False) as outer:
        with StageMemory(release_after=False) as middle:
            _resident_for_a_moment()
            with StageMemory() as inner:  # resets the counter again, two levels down
                pass
    assert inner.record()["peak_rss_mb"] < middle.record()["peak_rss_mb"] - 80
    for m in (outer, middle):
        assert m.record()["peak_rss_mb"] >= m.record()["rss_start_mb"] + 90


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_mem")
    return (build_tiny_model(root / "model"), write_instructions(root / "train.jsonl", 14, "tr"),
            write_instructions(root / "heldout.jsonl", 4, "ho"))


def _live_models() -> set[int]:
    from transformers import PreTrainedModel

    return {id(o) for o in gc.get_objects() if isinstance(o, PreTrainedModel)}


class CyclicSampler(ScriptedSampler):
    """A sampler in a reference cycle that holds the stage's model: ``del model`` alone does not free it (a
    model held by cycles -- exception frames of lazy imports, modules pointing at their parents -- is common)."""

    def __init__(self, tokenizer, model):
        super().__init__(tokenizer)
        self.model = model
        self.me = self


def cyclic_factory(config, model, tokenizer, template, adapter=None, progress=True):
    return CyclicSampler(tokenizer, model)


def test_run_frees_each_model_and_records_stage_peaks(tiny, tmp_path, monkeypatch):
    """Every model load finds no model of an earlier stage alive -- with the automatic garbage collector off,
    so a model kept only by a reference cycle would still be there -- and metrics.json / summary.json hold
    each stage's peak RSS."""
    from tpo_lite import models
    from tpo_lite.loop import run

    model_dir, train, heldout = tiny
    cfg = _load(write_config(tmp_path, model_dir, train, heldout))
    try:
        # bitsandbytes logs an exception caught at its import with the exception as the log record's argument;
        # pytest keeps the records of a test, so the frames above that import (a stage's, with its model) would
        # stay alive until the test ends. Imported here, above no stage.
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    gc.collect()
    before = _live_models()
    real_load = models.load_model
    loads = []

    def checked_load(*args, **kwargs):
        alive = _live_models() - before
        loads.append(len(alive))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(models, "load_model", checked_load)
    gc.disable()
    try:
        summary = run(cfg, progress=False, echo=lambda s: None, sampler_factory=cyclic_factory)
    finally:
        gc.enable()
    # eval_base, per iteration: generate, train, held-out (the last one) -> at least 6 loads
    assert len(loads) >= 6 and loads == [0] * len(loads), loads

    from tpo_lite.rundir import RunDir

    rd = RunDir(tmp_path / "runs" / "t")
    for t in (1, 2):
        m = json.loads(rd.iteration(t).metrics.read_text())
        mem = m["memory"]
        expected = {"generate", "judge", "pairs", "train"} | ({"heldout"} if t == 2 else set())
        assert set(mem) == expected, mem
        for stage, rec in mem.items():
            assert 0 < rec["rss_start_mb"] <= rec["peak_rss_mb"], (t, stage, rec)
            assert rec["method"] and rec["seconds"] >= 0
        assert "memory" not in m["train"]  # moved to m["memory"], not kept twice
        marker = rd.iteration(t).read_marker("train")
        assert marker["memory"]["peak_rss_mb"] == mem["train"]["peak_rss_mb"]
        dpo = marker["metrics"]["memory"]
        assert set(dpo) == {"load", "reference", "dpo"}
        assert dpo["dpo"]["peak_rss_mb"] <= mem["train"]["peak_rss_mb"] + 1
    sm = summary["memory"]
    peaks = sm["stage_peak_rss_mb"]
    assert {"generate", "judge", "pairs", "train", "heldout", "eval_base"} <= set(peaks)
    # the run's peak is a stage's peak: nothing between stages piles up on top of them
    # (+1: the kernel's RSS counters lag by a few pages)
    assert max(peaks.values()) <= sm["run_peak_rss_mb"] + 1 <= 1.1 * max(peaks.values()) + 1, sm
    assert rd.read_summary()["memory"] == sm

    # a resume with every stage done keeps each stage's record
    again = run(cfg, progress=False, echo=lambda s: None, sampler_factory=scripted_factory())
    assert again["iterations"] == summary["iterations"]
    assert again["memory"]["stage_peak_rss_mb"] == peaks


def test_release_runs_without_glibc_or_cuda(monkeypatch):
    monkeypatch.setattr(memory, "_TRIM", [None])
    assert memory.malloc_trim() is False
    assert memory.trim_during_passes([object()]) == []
    memory.release()  # still collects garbage, no error


def test_bf16_load_of_a_gguf_cache_reads_a_bf16_copy(tmp_path, monkeypatch):
    """A GGUF float cache is float32; bf16 loads read a bf16 copy built once beside it (the float32 read
    peaked 875 MB above the start on SmolLM2 vs 140 MB), with the very weights the cast at load gave."""
    import torch
    from transformers import AutoModelForCausalLM

    from tpo_lite import models
    from tpo_lite.models import ModelConfig, dtype_checkpoint, load_model

    from tiny_models import make_tiny_model

    cache = make_tiny_model(tmp_path / "gguf" / "tiny-0123")
    (cache / models._CACHE_MARKER).write_text("{}")  # as gguf_float_checkpoint leaves it
    monkeypatch.setattr(models, "float_checkpoint", lambda cfg: str(cache))
    cfg = ModelConfig(path="ignored.gguf", dtype="bfloat16", load_in_4bit=False, device="cpu")
    model, _ = load_model(cfg)
    copy = tmp_path / "gguf" / "tiny-0123-bfloat16"
    assert (copy / models._CACHE_MARKER).is_file()
    want = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch.bfloat16).state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]), k
    assert dtype_checkpoint(str(cache), torch.bfloat16) == str(copy)  # built once, then reused
    assert dtype_checkpoint(str(cache), torch.float32) == str(cache)
    plain = make_tiny_model(tmp_path / "hf_dir")  # not a cache: loaded as it is
    assert dtype_checkpoint(str(plain), torch.bfloat16) == str(plain)
