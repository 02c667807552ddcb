"""Tests for tpo_lite.report on constructed run directories (metrics, pairs, judgements and eval JSON written here)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tpo_lite import report
from tpo_lite.errors import TpoError
from tpo_lite.records import Judgement, Pair
from tpo_lite.rundir import ExperimentDir, RunDir

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _dump(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _jsonl(path, recs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def _pairwise(model, wr, ci, cats):
    return {"kind": "pairwise", "model": model, "baseline": "seed", "judge": "programmatic", "comparison": "score",
            "n": 40, "wins": 20, "ties": 4, "losses": 16, "win_rate": wr, "win_rate_ci": ci,
            "lc_win_rate": wr - 0.02, "lc_win_rate_ci": [ci[0] - 0.02, ci[1] - 0.02], "invalid_rate": 0.1,
            "per_category": [{"category": c, "n": 20, "win_rate": v, "win_rate_ci": [v - 0.1, v + 0.1], "wins": 10,
                              "ties": 0, "losses": 10} for c, v in cats.items()]}


def _absolute(score, ci, valid):
    return {"kind": "absolute", "model": "m", "judge": "programmatic", "n": 40, "mean_score": score,
            "mean_score_ci": ci, "valid_rate": valid, "invalid_rate": 1 - valid,
            "model_lengths": {"response_chars_mean": 210.0, "thought_chars_mean": 95.0},
            "per_category": [{"category": "writing", "n": 20, "mean_score": score, "mean_score_ci": ci},
                             {"category": "lists", "n": 20, "mean_score": score - 0.1, "mean_score_ci": ci}]}


def _pair(prompt_id, chosen, rejected):
    return Pair(prompt_id, "q", [1], 0, 1, "a", "b c", [2], [3, 4], chosen, rejected, chosen, rejected, 0.0, True, None,
                1, 2, "words")


def _make_run(root, name, direct: bool):
    rd = RunDir(os.path.join(root, name))
    _dump(rd.eval_base.result, _absolute(0.41, [0.35, 0.47], 0.9))
    for t in (1, 2):
        d = rd.iteration(t)
        _dump(d.metrics, {
            "iteration": t,
            "generate": {"valid_rate": 0.95 if direct else 0.30 + 0.25 * t, "forced_rate": 0.0 if direct else 0.2,
                         "thought_chars_mean": None if direct else 300.0 - 40 * t,
                         "response_chars_mean": 250.0 + 10 * t},
            "judge": {"mean_score": 0.5 + 0.05 * t},
            "pairs": {"pairs_kept": 30 + t, "chosen_response_chars": 240.0, "rejected_response_chars": 280.0 + t},
        })
        _jsonl(d.pairs, [_pair(f"p{k}", 0.8 + 0.01 * k, 0.3 + 0.02 * k).to_record() for k in range(8)])
        _jsonl(d.judgements, [Judgement(f"p{k}", "programmatic", [0.3, None, 0.8], [{}, {}, {}]).to_record()
                              for k in range(8)])
        _dump(d.heldout.result, _absolute(0.45 + 0.03 * t, [0.4, 0.55 + 0.03 * t], 0.8))
        wr = (0.52 if direct else 0.575) + 0.01 * t
        _dump(d.compare("vs_seed").result,
              _pairwise(name, wr, [wr - 0.12, wr + 0.11], {"writing": wr + 0.05, "lists": wr - 0.05}))
    return str(rd.path)


def test_report_on_constructed_experiment(tmp_path):
    exp = str(tmp_path / "exp")
    _make_run(exp, "tpo", direct=False)
    _make_run(exp, "direct", direct=True)
    _dump(ExperimentDir(exp).record, {"runs": {"tpo": "tpo", "direct": "direct"}})
    _dump(ExperimentDir(exp).compare("tpo_vs_direct").result,
          {**_pairwise("tpo", 0.6, [0.5, 0.72], {"writing": 0.7, "lists": 0.55}), "baseline": "direct"})
    out = tmp_path / "rep"
    paths = report.make_report([exp], out)
    for name in ("winrate.png", "lengths.png", "valid_rate.png", "scores.png", "categories.png"):
        data = open(paths[name], "rb").read()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
    md = open(paths["report.md"]).read()
    # the numbers behind the plots are in the Markdown
    assert "tpo vs direct" in md and "60.0% [50.0, 72.0]" in md  # experiment comparison
    assert "59.5% [47.5, 70.5]" in md  # tpo iteration 2 vs seed
    assert "0.410 [0.350, 0.470]" in md  # seed held-out score
    assert "| 2 | 80.0% | 20.0% | 220 | 270 | 0.600 | 32 | 240 / 282 |" in md  # tpo iteration 2 metrics row
    assert "![Per category](categories.png)" in md
    # the score plot's data: the pairs' chosen / rejected scores, the judgements' valid scores
    tpo = report.load_run(os.path.join(exp, "tpo"))
    assert tpo.pair_scores[2] == (pytest.approx([0.8 + 0.01 * k for k in range(8)]),
                                  pytest.approx([0.3 + 0.02 * k for k in range(8)]))
    assert tpo.sample_scores[1] == [0.3, 0.8] * 8
    # categories: the latest pairwise eval of each run + the experiment comparison
    metric, series = report.category_series(*report.expand_dirs([exp]))
    assert metric == "win_rate" and [s[0] for s in series] == ["tpo vs seed (iter 2)", "direct vs seed (iter 2)",
                                                                "tpo vs direct"]


def test_report_tables_held_out_checks_per_type(tmp_path):
    rd = RunDir(tmp_path / "r")
    checks = lambda a, b: [{"type": "max_words", "n": 15, "passed": a, "pass_rate": a / 15},  # noqa: E731
                           {"type": "min_words", "n": 10, "passed": b, "pass_rate": b / 10}]
    seed = {**_absolute(0.27, [0.1, 0.5], 0.8), "per_check": checks(6, 4)}
    seed["model_lengths"]["response_words_mean"] = 58.3
    _dump(rd.eval_base.result, seed)
    it1 = {**_absolute(0.31, [0.1, 0.5], 0.9), "per_check": checks(14, 1)}
    it1["model_lengths"]["response_words_mean"] = 25.0
    _dump(rd.iteration(1).heldout.result, it1)
    _dump(rd.iteration(2).heldout.result, _absolute(0.3, [0.1, 0.5], 0.9))  # recorded before per-check rates
    md = open(report.make_report([str(rd.path)], tmp_path / "rep")["report.md"]).read()
    assert "| checks passed | n | seed model | iteration 1 |" in md  # no column for the eval without the rates
    assert "| max_words | 15 | 40% | 93% |" in md and "| min_words | 10 | 40% | 10% |" in md
    assert "| *response words (valid outputs)* | | 58.3 | 25.0 |" in md
    assert report._check_table({1: _absolute(0.3, [0.1, 0.5], 0.9)}) == []


def test_report_tables_the_change_per_iteration_with_its_split(tmp_path):
    """With per-instruction results, each iteration's paired change over the seed model and its two parts."""
    rd = RunDir(tmp_path / "r")
    items = lambda vs: [{"id": f"q{i}", "valid": v, "score": x} for i, (v, x) in enumerate(vs)]  # noqa: E731
    _dump(rd.eval_base.result, {**_absolute(0.5, [0.1, 0.9], 0.75),
                                "items": items([(False, 0.0), (True, 1.0), (True, 0.5), (True, 0.5)])})
    # q0 became valid (+1), q1 became invalid (-1), q2 +0.5 and q3 0 in the same format
    _dump(rd.iteration(1).heldout.result, {**_absolute(0.625, [0.1, 0.9], 0.75),
                                           "items": items([(True, 1.0), (False, 0.0), (True, 1.0), (True, 0.5)])})
    _dump(rd.iteration(2).heldout.result, _absolute(0.6, [0.1, 0.9], 0.9))  # without items: no row
    md = open(report.make_report([str(rd.path)], tmp_path / "rep")["report.md"]).read()
    rows = [line for line in md.splitlines() if line.startswith("| iteration ") and "became" not in line]
    row = next(line for line in rows if "+0.125 [" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "iteration 1" and cells[1] == "4" and cells[2].startswith("+0.125 [")
    assert cells[3].startswith("+0.000 [") and cells[4].startswith("+0.125 [") and cells[5] == "1 / 1"
    assert not any(line.startswith("| iteration 2 | 4 |") for line in md.splitlines())
    assert report._change_table({1: _absolute(0.3, [0.1, 0.5], 0.9)}, {}) == []


def test_report_recomputes_the_change_with_the_runs_bootstrap_settings(tmp_path):
    """The change table uses the run's own [eval] n_boot / alpha / seed (its config.toml), so the last row is the
    change the run printed, not one with the library's defaults."""
    from tpo_lite.config import load_config, to_toml
    from tpo_lite.metrics import compare_heldout

    rd = RunDir(tmp_path / "r")
    rd.path.mkdir(parents=True)
    rd.config.write_text(to_toml(load_config(None).replace("eval", n_boot=300, alpha=0.2, seed=7)))
    rng = np.random.default_rng(3)
    items = lambda xs: [{"id": f"q{i}", "valid": True, "score": float(x)} for i, x in enumerate(xs)]  # noqa: E731
    base = {**_absolute(0.5, [0.1, 0.9], 1.0), "items": items(rng.random(40))}
    after = {**_absolute(0.6, [0.1, 0.9], 1.0), "items": items(rng.random(40))}
    _dump(rd.eval_base.result, base)
    _dump(rd.iteration(1).heldout.result, after)
    assert report.load_run(rd.path).bootstrap == {"n_boot": 300, "alpha": 0.2, "seed": 7}
    ours, default = compare_heldout(base, after, n_boot=300, alpha=0.2, seed=7), compare_heldout(base, after)
    lo, hi = ours["score_diff_ci"]
    assert [round(x, 3) for x in (lo, hi)] != [round(x, 3) for x in default["score_diff_ci"]]
    md = open(report.make_report([str(rd.path)], tmp_path / "rep")["report.md"]).read()
    assert f"| iteration 1 | 40 | {ours['score_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in md


def test_report_on_a_plain_run_dir_without_evals(tmp_path):
    rd = str(tmp_path / "runs" / "solo")
    _dump(RunDir(rd).iteration(1).metrics, {"iteration": 1, "generate": {"valid_rate": 0.25}})
    paths = report.make_report([rd])
    assert os.path.dirname(paths["report.md"]) == os.path.join(rd, "report")
    md = open(paths["report.md"]).read()
    assert "| 1 | 25.0% |" in md
    for name in ("winrate.png", "scores.png", "categories.png"):  # missing data -> a labelled empty plot
        assert open(paths[name], "rb").read()[:8] == PNG_MAGIC


def test_report_bad_input(tmp_path):
    with pytest.raises(TpoError, match="not a directory"):
        report.make_report([tmp_path / "missing"])
    d = RunDir(tmp_path / "r").iteration(1)
    d.path.mkdir(parents=True)
    d.metrics.write_text("{ not json")
    with pytest.raises(TpoError, match=r"metrics.json:1: not valid JSON"):
        report.make_report([tmp_path / "r"])
    d.metrics.unlink()
    rec = _pair("p0", 0.8, 0.3).to_record()
    del rec["rho"]
    _jsonl(d.pairs, [_pair("p1", 0.8, 0.3).to_record(), rec])
    with pytest.raises(TpoError, match=r"pairs.jsonl:2: rho: missing"):
        report.make_report([tmp_path / "r"])


def test_report_reads_final_comparisons_of_tpo_lite_eval(tmp_path):
    rd = str(tmp_path / "run")
    _dump(RunDir(rd).iteration(1).metrics, {"iteration": 1, "generate": {"valid_rate": 0.5}})
    _dump(RunDir(rd).eval("run-iter01_vs_gpt4").result,
          {**_pairwise("run-iter01", 0.25, [0.1, 0.4], {"writing": 0.25}), "baseline": "gpt4"})
    _dump(RunDir(rd).eval("seed_heldout_absolute").result, _absolute(0.3, [0.2, 0.4], 0.5))
    run = report.load_run(rd)
    assert list(run.finals) == ["run-iter01_vs_gpt4"]  # absolute results are not comparisons
    md = open(report.make_report([rd])["report.md"]).read()
    assert "| run-iter01 vs gpt4 | final | 40 | 25.0% [10.0, 40.0] |" in md
