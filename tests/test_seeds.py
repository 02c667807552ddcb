"""`tpo-lite seeds`: one config run with several seeds, summarised over runs (tpo_lite.seeds, stats.t_interval)."""
import json
from pathlib import Path

import numpy as np
import pytest

from tpo_lite.errors import TpoError
from tpo_lite.stats import student_t_quantile, t_interval


def test_student_t_quantile_matches_the_tables():
    # two-sided 95% / 99% critical values of Student's t (standard tables, 9 significant digits) and the normal limit
    for p, df, ref in ((0.975, 1, 12.7062047), (0.975, 2, 4.30265273), (0.975, 5, 2.57058184),
                       (0.975, 30, 2.04227246), (0.995, 3, 5.84090931), (0.95, 10, 1.81246112)):
        assert student_t_quantile(p, df) == pytest.approx(ref, rel=1e-8)
        assert student_t_quantile(1 - p, df) == pytest.approx(-ref, rel=1e-8)
    # large df: the normal quantile plus its first correction, (z^3 + z) / (4 df)
    z = 1.959963985
    assert student_t_quantile(0.975, 1e7) == pytest.approx(z + (z ** 3 + z) / 4e7, rel=1e-9)
    assert student_t_quantile(0.5, 4) == 0.0
    with pytest.raises(ValueError):
        student_t_quantile(1.0, 3)


def test_t_interval_is_mean_plus_minus_t_sd_over_root_n():
    x = [0.167, 0.057, 0.117]
    r = t_interval(x)
    sd = float(np.std(x, ddof=1))
    half = 4.30265273 * sd / np.sqrt(3)
    assert r["n"] == 3 and r["mean"] == pytest.approx(np.mean(x)) and r["sd"] == pytest.approx(sd)
    assert r["ci"] == pytest.approx([np.mean(x) - half, np.mean(x) + half], abs=1e-9)
    one = t_interval([0.2])
    assert one["sd"] is None and one["ci"] is None and one["mean"] == 0.2
    with pytest.raises(ValueError):
        t_interval([])
    with pytest.raises(ValueError):
        t_interval([0.1, float("nan")])


def _summary(before, after, diff, ci, valid=(0.8, 1.0)):
    return {"run_dir": "x",
            "heldout_before": {"mean_score": before, "valid_rate": valid[0], "judge": "programmatic", "model": "seed"},
            "heldout_after": {"mean_score": after, "valid_rate": valid[1], "judge": "programmatic", "model": "iter03"},
            "heldout_change": {"n": 100, "score_diff": diff, "score_diff_ci": list(ci)}}


def test_summarize_seeds_over_constructed_runs():
    from tpo_lite.seeds import render_markdown, summarize_seeds

    rec = summarize_seeds({2: _summary(0.2, 0.3, 0.1, (0.02, 0.18)), 0: _summary(0.25, 0.2, -0.05, (-0.1, -0.01)),
                           1: _summary(0.2, 0.22, 0.02, (-0.05, 0.09))})
    assert [r["seed"] for r in rec["runs"]] == [0, 1, 2]
    assert [r["significant"] for r in rec["runs"]] == ["down", None, "up"]
    o = rec["over_seeds"]
    changes = [-0.05, 0.02, 0.1]
    assert o["n_runs"] == 3 and o["mean_change"] == pytest.approx(np.mean(changes))
    assert o["sd_change"] == pytest.approx(np.std(changes, ddof=1))
    half = 4.30265273 * np.std(changes, ddof=1) / np.sqrt(3)
    assert o["mean_change_ci"] == pytest.approx([np.mean(changes) - half, np.mean(changes) + half], abs=1e-9)
    assert (o["n_improved"], o["n_significant_up"], o["n_significant_down"]) == (2, 1, 1)
    assert o["mean_before"] == pytest.approx(0.65 / 3) and o["mean_after"] == pytest.approx(0.72 / 3)
    md = render_markdown(rec, ["sampling.seed", "train.seed"])
    assert "| 2 | 100 | 0.200 | 0.300 | +0.100 [+0.020, +0.180] ↑ | 80% → 100% |" in md
    assert "| 0 | 100 | 0.250 | 0.200 | -0.050 [-0.100, -0.010] ↓ |" in md
    assert f"**Mean change over 3 runs: {np.mean(changes):+.3f} [" in md and "2 of 3 improved" in md
    # a run without a score before training cannot be summarised: said with its run directory
    bad = _summary(0.2, 0.3, 0.1, (0.0, 0.2))
    bad["heldout_before"] = None
    with pytest.raises(TpoError, match="seed 5 has no held-out score"):
        summarize_seeds({5: bad})


def test_summary_over_seeds_splits_the_change_into_format_and_answers():
    """Where every run's change has its split (format / answers, tpo_lite.metrics.compare_heldout), each part gets
    its mean over runs with the same t interval as the change; a run without the split shows '–' and no mean."""
    from tpo_lite.seeds import render_markdown, summarize_seeds

    parts = {0: (0.07, 0.05), 1: (0.04, 0.04), 2: (0.03, -0.03)}
    runs = {}
    for s, (fmt, ans) in parts.items():
        runs[s] = _summary(0.2, 0.2 + fmt + ans, fmt + ans, (fmt + ans - 0.08, fmt + ans + 0.08))
        runs[s]["heldout_change"].update(format_change=fmt, both_valid_change=ans)
    runs[0]["heldout_change"].update(format_change_ci=[0.02, 0.12], both_valid_change_ci=[-0.01, 0.11])
    o = summarize_seeds(runs)["over_seeds"]
    for k, i in (("format_change", 0), ("both_valid_change", 1)):
        t = t_interval([p[i] for p in parts.values()])
        assert o[f"mean_{k}"] == pytest.approx(t["mean"]) and o[f"mean_{k}_ci"] == pytest.approx(t["ci"])
    md = render_markdown(summarize_seeds(runs), ["sampling.seed"])
    assert "| valid before → after | format / answers |" in md
    assert "| 80% → 100% | +0.070 ↑ / +0.050 |" in md
    assert "| 80% → 100% | +0.030 / -0.030 |" in md  # no CI of a part given: no arrow
    t = t_interval([0.07, 0.04, 0.03])
    assert f"Mean over runs: format {t['mean']:+.3f} [{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}], answers +0.020 [" in md
    del runs[1]["heldout_change"]["format_change"], runs[1]["heldout_change"]["both_valid_change"]
    rec = summarize_seeds(runs)
    assert "mean_format_change" not in rec["over_seeds"]
    md = render_markdown(rec, ["sampling.seed"])
    assert "| 80% → 100% | – / – |" in md and "Mean over runs: format" not in md
    # no run with the split (records from before it): the table as it was
    for r in runs.values():
        r["heldout_change"] = {k: v for k, v in r["heldout_change"].items() if k in ("n", "score_diff", "score_diff_ci")}
    assert "format / answers" not in render_markdown(summarize_seeds(runs), ["sampling.seed"])


def test_seeds_plot_has_a_panel_per_part_of_the_change(tmp_path):
    """seeds.png: the change per run and its mean over runs, and a panel each for the format and answers parts with
    their own intervals, where every run has that part; without the split, the change alone."""
    from tpo_lite.seeds import forest_panels, plot_seeds, render_markdown, summarize_seeds

    runs = {}
    for s, (fmt, ans) in {0: (0.07, 0.05), 1: (0.04, 0.04), 2: (0.03, -0.03)}.items():
        runs[s] = _summary(0.2, 0.2 + fmt + ans, fmt + ans, (fmt + ans - 0.08, fmt + ans + 0.08))
        runs[s]["heldout_change"].update(format_change=fmt, both_valid_change=ans,
                                         format_change_ci=[fmt - 0.04, fmt + 0.04])
    rec = summarize_seeds(runs)
    panels = forest_panels(rec)
    assert [p["key"] for p in panels] == ["change", "format_change", "both_valid_change"]
    change, fmt, ans = panels
    assert change["runs"][0] == (0, pytest.approx(0.12), pytest.approx([0.04, 0.2]))
    assert fmt["runs"][2] == (2, 0.03, pytest.approx([-0.01, 0.07]))
    assert ans["runs"][1] == (1, 0.04, None)  # a part without its CI: a point without a bar
    t = t_interval([0.05, 0.04, -0.03])
    assert ans["mean"][0] == pytest.approx(t["mean"]) and ans["mean"][1] == pytest.approx(t["ci"])
    plot_seeds(rec, tmp_path / "split.png")
    assert (tmp_path / "split.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    del runs[1]["heldout_change"]["format_change"]  # a part that one run lacks: no panel for it
    assert [p["key"] for p in forest_panels(summarize_seeds(runs))] == ["change", "both_valid_change"]
    del runs[1]["heldout_change"]["both_valid_change"]
    assert [p["key"] for p in forest_panels(summarize_seeds(runs))] == ["change"]
    single = summarize_seeds({0: runs[0]})  # one run: no interval over runs, the mean still drawn
    assert forest_panels(single)[0]["mean"] == (pytest.approx(0.12), None)
    assert "**Mean change over 1 run: +0.120 (one run: no interval)**" in render_markdown(single, ["train.seed"])
    plot_seeds(single, tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 0


def test_seed_configs_set_the_options_and_refuse_bad_input():
    from tpo_lite.config import RunConfig
    from tpo_lite.seeds import seed_configs

    base = RunConfig.default().replace("loop", eval_before=False)
    cfgs = seed_configs(base, [3, 7], ["sampling.seed", "train.seed", "loop.seed"])
    assert list(cfgs) == [3, 7]
    for s, c in cfgs.items():
        assert (c.sampling.seed, c.train.seed, c.loop.seed) == (s, s, s)
        assert c.loop.eval_before and c.loop.eval_after  # the change needs both scores
        assert c.sampling.k == base.sampling.k and c.train.learning_rate == base.train.learning_rate
    assert seed_configs(base, [4])[4].loop.seed == base.loop.seed  # only the named options change
    with pytest.raises(TpoError, match="no such config option 'sampling.sed'"):
        seed_configs(base, [1], ["sampling.sed"])
    with pytest.raises(TpoError, match="listed twice"):
        seed_configs(base, [1, 1])
    with pytest.raises(TpoError):
        seed_configs(base, [2 ** 40])  # out of the seed option's range: its own check


def test_seeds_cli_parses_lists_and_ranges(tmp_path):
    from click.testing import CliRunner

    from tpo_lite.cli import main

    r = CliRunner().invoke(main, ["seeds", str(tmp_path / "missing.toml"), "--seeds", "0-2,x"])
    assert r.exit_code == 2 and "'x' is not a seed or a range" in r.output
    r = CliRunner().invoke(main, ["seeds", str(tmp_path / "missing.toml"), "--seeds", " , "])
    assert r.exit_code == 2 and "give at least one seed" in r.output
    r = CliRunner().invoke(main, ["seeds", str(tmp_path / "missing.toml"), "--seeds", "0-1", "--seed-options",
                                  "train.nope"])
    assert r.exit_code == 2 and "error:" in r.output  # the missing config file, one line, no traceback
    assert "Traceback" not in r.output


def test_seed_model_eval_is_copied_to_the_other_seeds_only_when_its_producer_matches(tmp_path):
    from test_evaluate import _tiny_loop_config

    from tpo_lite.config import load_config
    from tpo_lite.evaluate import load_configured_eval_set
    from tpo_lite.heldout import heldout_producer
    from tpo_lite.rundir import SeedsDir
    from tpo_lite.seeds import seed_configs, share_seed_model_eval

    config = load_config(_tiny_loop_config(tmp_path))
    sd = SeedsDir(tmp_path / "seeds")
    cfgs = seed_configs(config, [0, 1, 2])
    assert share_seed_model_eval(sd, cfgs) == []  # nothing finished yet: nothing to share
    src = sd.run(0).eval_base
    src.path.mkdir(parents=True)
    items = load_configured_eval_set(cfgs[0].eval)
    src.producer.write_text(json.dumps(heldout_producer(cfgs[0], None, items)))
    src.result.write_text(json.dumps({"kind": "absolute", "mean_score": 0.25}))
    sd.run(2).eval_base.path.mkdir(parents=True)  # seed 2 has started its own eval: left alone
    (sd.run(2).eval_base.path / "outputs.jsonl").write_text("")
    lines = []
    assert share_seed_model_eval(sd, cfgs, echo=lines.append) == [1]
    assert sd.run(1).eval_base.result.read_text() == src.result.read_text()
    assert sd.run(1).config.exists()  # the copy lands in a run with its config saved, as any run's work
    assert not sd.run(2).eval_base.result.exists() and "copied from" in lines[-1]
    # a seed option that reaches the eval (eval.seed seeds the format retries): every seed scores its own
    other = seed_configs(config, [0, 3], seed_options=("sampling.seed", "eval.seed"))
    sd3 = SeedsDir(tmp_path / "seeds3")
    sd3.run(0).eval_base.path.mkdir(parents=True)
    sd3.run(0).eval_base.producer.write_text(json.dumps(heldout_producer(other[0], None, items)))
    sd3.run(0).eval_base.result.write_text("{}")
    assert share_seed_model_eval(sd3, other) == [] and not sd3.run(3).path.exists()


@pytest.mark.slow
def test_seeds_end_to_end_tiny_in_children_then_resumed(tmp_path):
    """Two seeds of the real loop on a tiny model in child processes (`python -m tpo_lite run seed_<S>/`), one of
    them blocked by a lock (it fails, the other is summarised, the error names it); the same call resumes and
    finishes it; in this process, a locked seed fails without stopping the other, and nothing is recomputed."""
    pytest.importorskip("tpo_lite.train")
    from test_evaluate import _tiny_loop_config

    from tpo_lite.config import load_config
    from tpo_lite.rundir import SeedsDir
    from tpo_lite.seeds import run_seeds

    config = load_config(_tiny_loop_config(tmp_path, "stage_processes = false\n"))
    sd = SeedsDir(tmp_path / "runs" / "tiny_seeds")
    lines = []
    with sd.run(1).lock():  # seed 1's child finds its run locked and fails
        with pytest.raises(TpoError, match=r"1 of 2 runs failed \(seed 1: exit 2"):
            run_seeds(config, [0, 1], parallel=2, echo=lines.append, plot=False)
    assert "another tpo-lite process" in sd.log(1).read_text()
    rec = json.loads(sd.record.read_text())
    assert [r["seed"] for r in rec["runs"]] == [0] and rec["failed"] == [1]
    assert 'seed = 0' in sd.run(0).config.read_text()
    rec = run_seeds(config, [0, 1], parallel=2, echo=lines.append)
    assert [r["seed"] for r in rec["runs"]] == [0, 1] and rec["failed"] == []
    # seed 0's finished eval of the seed model was copied into seed 1's run before its child started
    assert any(line.startswith("seed model's held-out eval: copied from") for line in lines)
    assert sd.run(1).eval_base.result.read_text() == sd.run(0).eval_base.result.read_text()
    assert sd.plot.exists() and "Mean change over 2 runs" in sd.table.read_text()
    from tpo_lite.report import make_report

    report = json.loads(Path(make_report([sd.path])["report.md"]).with_name("report.json").read_text())
    assert report["runs"] == [str(sd.run(0).path), str(sd.run(1).path)]  # a seeds dir expands to its runs
    for s in (0, 1):
        saved = load_config(sd.run(s).config)
        assert (saved.sampling.seed, saved.train.seed, saved.loop.seed) == (s, s, 0)
        summary = sd.run(s).read_summary()
        row = rec["runs"][s]
        assert row["change"] == summary["heldout_change"]["score_diff"] and row["n"] == 5
        assert row["before"] == summary["heldout_before"]["mean_score"]
    # the two runs sampled differently (their seeds differ), from the same seed model
    samples = [sd.run(s).iteration(1).samples.read_text() for s in (0, 1)]
    assert samples[0] != samples[1]
    assert rec["runs"][0]["before"] == rec["runs"][1]["before"]
    done = [sd.run(s).iteration(1).samples for s in (0, 1)] + [sd.run(s).eval_base.result for s in (0, 1)]
    mtimes = [p.stat().st_mtime_ns for p in done]
    with sd.run(1).lock():  # in this process too, a failed seed does not stop the others
        with pytest.raises(TpoError, match=r"1 of 2 runs failed \(seed 1: TpoError"):
            run_seeds(config, [1, 0], parallel=1, progress=False, echo=lines.append, plot=False)
    assert "another tpo-lite process" in sd.log(1).read_text().splitlines()[-1]
    assert [r["seed"] for r in json.loads(sd.record.read_text())["runs"]] == [0]
    again = run_seeds(config, [0, 1], parallel=1, progress=False, echo=lines.append, plot=False)
    assert again["runs"] == rec["runs"]
    assert [p.stat().st_mtime_ns for p in done] == mtimes
