"""`tpo-lite bench train` on a tiny model: fresh-process runs, interleaving, medians and ratios in the JSON."""
import json
import os
import statistics
import sys

import pytest
from click.testing import CliRunner

from tpo_lite.bench.train import TrainBenchConfig, count_tokens, fit_pair, synthetic_pairs, trl_status
from tpo_lite.cli.bench_cmds import bench_command

from tiny_models import VOCAB


def test_synthetic_pairs_fit_and_token_count():
    pairs = synthetic_pairs(6, 64, VOCAB, seed=1)
    assert pairs == synthetic_pairs(6, 64, VOCAB, seed=1)  # deterministic
    for p in pairs:
        assert 8 <= len(p["prompt_token_ids"]) <= 16 and 16 <= len(p["chosen_token_ids"]) <= 48
        assert all(75 <= t < VOCAB for t in p["prompt_token_ids"] + p["chosen_token_ids"])
    long = {"prompt_id": "x", "prompt_token_ids": list(range(40)), "chosen_token_ids": list(range(100, 150)),
            "rejected_token_ids": list(range(200, 210))}
    cut = fit_pair(long, 64)
    # one prompt for both (its end), each completion cut to fit: no trainer has to cut anything
    assert cut["prompt_token_ids"] == list(range(8, 40))
    assert cut["chosen_token_ids"] == list(range(100, 132)) and cut["rejected_token_ids"] == list(range(200, 210))
    assert count_tokens([cut]) == 2 * 32 + 32 + 10


def test_bad_config():
    with pytest.raises(ValueError, match="methods must be among"):
        TrainBenchConfig(methods=("tpo-lite", "axolotl"))
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        TrainBenchConfig(repeats=0)


@pytest.mark.slow  # eight fresh processes (~75 s on the 2-core machine)
def test_cli_runs_interleaved_fresh_processes_and_writes_json(tiny_dir, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench_command, [
        "train", "--model", tiny_dir, "--dtype", "float32", "--load-in-4bit", "false", "--device", "cpu",
        "--n-pairs", "4", "--max-length", "64", "--batch-size", "2", "--repeats", "2", "--threads", "1",
        "--methods", "tpo-lite,tpo-lite-nogc,tpo-lite-nogc-shared", "--methods", "trl", "--trl-python", sys.executable,
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert set(result) == {"meta", "runs", "methods", "ratios", "complete"} and result["complete"] is True
    trl_ok = trl_status(sys.executable) is not None
    if not trl_ok:
        assert result["methods"]["trl"]["status"].startswith("n/a (trl not importable")
    ran = ["tpo-lite", "tpo-lite-nogc", "tpo-lite-nogc-shared"] + (["trl"] if trl_ok else [])
    # round 1 in order, round 2 reversed
    assert [r["method"] for r in result["runs"]] == ran + ran[::-1]
    tokens = result["meta"]["tokens_per_run"]
    assert tokens > 0 and result["meta"]["n_pairs_used"] == 4
    pids = set()
    for r in result["runs"]:
        assert "error" not in r, r
        assert r["tokens"] == tokens and r["seconds"] > 0 and r["cpu_seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(tokens / r["seconds"])
        assert r["peak_rss_mb"] > r["rss_after_imports_mb"] > 0
        assert r["steps"] == 2  # 4 pairs, 2 per step, one epoch
        pids.add(r["pid"])
    assert len(pids) == len(result["runs"]) and os.getpid() not in pids  # one fresh process per run
    assert [(r["grad_checkpointing"], r["share_prompt"]) for r in result["runs"][:3]] == [
        (True, False), (False, False), (False, True)]
    for m in ran:
        v = result["methods"][m]
        mine = [r for r in result["runs"] if r["method"] == m]
        assert v["status"] == "ok" and v["runs"] == 2
        assert v["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in mine)
        assert v["peak_rss_mb"] == statistics.median(r["peak_rss_mb"] for r in mine)
    m = result["methods"]
    assert result["ratios"]["tpo-lite/tpo-lite-nogc tokens_per_s"] == pytest.approx(
        m["tpo-lite"]["tokens_per_s"] / m["tpo-lite-nogc"]["tokens_per_s"])
    assert result["ratios"]["tpo-lite/tpo-lite-nogc peak_rss"] == pytest.approx(
        m["tpo-lite"]["peak_rss_mb"] / m["tpo-lite-nogc"]["peak_rss_mb"])
    assert result["ratios"]["tpo-lite-nogc-shared/tpo-lite-nogc tokens_per_s"] == pytest.approx(
        m["tpo-lite-nogc-shared"]["tokens_per_s"] / m["tpo-lite-nogc"]["tokens_per_s"])
    assert ("tpo-lite/trl tokens_per_s" in result["ratios"]) == trl_ok
    assert "tpo-lite" in res.output and "tokens/s" in res.output


def test_partial_results_after_every_run(tiny_dir):
    """on_run sees the result over the runs so far (what `--out` rewrites), so a benchmark cut short keeps them."""
    from tpo_lite.bench.train import TrainBenchConfig, run_train_benchmark

    cfg = TrainBenchConfig(model=tiny_dir, dtype="float32", load_in_4bit=False, device="cpu", n_pairs=2,
                           max_length=64, batch_size=2, repeats=1, threads=1, methods=("tpo-lite-nogc", "tpo-lite"))
    partials = []
    final = run_train_benchmark(cfg, on_run=partials.append)
    assert len(partials) == 2
    first = partials[0]
    assert first["complete"] is False and [r["method"] for r in first["runs"]] == ["tpo-lite-nogc"]
    assert first["methods"]["tpo-lite-nogc"]["status"] == "ok" and first["methods"]["tpo-lite"]["status"] == "not run"
    assert first["ratios"] == {}
    assert partials[1]["complete"] is True and partials[1]["runs"] == final["runs"]
    assert partials[1]["methods"] == final["methods"] and "tpo-lite/tpo-lite-nogc tokens_per_s" in final["ratios"]


def test_cli_rejects_bad_methods():
    res = CliRunner().invoke(bench_command, ["train", "--methods", "tpo-lite,unsloth"])
    assert res.exit_code == 2 and "methods must be among" in res.output


def test_pairs_from_a_run_file(tmp_path):
    from tpo_lite.bench.train import load_pairs
    from tpo_lite.errors import TpoError

    recs = synthetic_pairs(3, 64, VOCAB, seed=2)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = load_pairs(TrainBenchConfig(pairs=str(path), n_pairs=2, max_length=64), VOCAB)
    assert [p["prompt_id"] for p in got] == [recs[0]["prompt_id"], recs[1]["prompt_id"]]
    assert got[0]["chosen_token_ids"] == recs[0]["chosen_token_ids"]  # fits already: unchanged
    recs[0]["chosen_token_ids"][0] = VOCAB  # outside the model's vocabulary
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(TpoError, match=r"pairs\[0\].chosen_token_ids"):
        load_pairs(TrainBenchConfig(pairs=str(path), n_pairs=2, max_length=64), VOCAB)
