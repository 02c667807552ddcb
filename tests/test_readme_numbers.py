"""scripts/readme_numbers.py: a measured run's record renders the README tables with its numbers and origin."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_numbers.py"


def _module():
    spec = importlib.util.spec_from_file_location("readme_numbers", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary():
    it = {"iteration": 1,
          "generate": {"n_prompts": 48, "n_samples": 192, "valid_rate": 0.75, "forced_rate": 0.9,
                       "cut_off_rate": 0.2, "thought_chars_mean": 400.0, "response_chars_mean": 300.0},
          "judge": {"mean_score": 0.4}, "pairs": {"pairs_kept": 40},
          "train": {"metrics": {"initial_margin": 0.0, "loss": 0.61}}}
    env = {"tpo_lite_commit": "abc123", "cpu": {"model": "CPU X", "kernel_flags": ["avx2"]}, "threads": 2,
           "torch": "2.13.0", "dtype": "bfloat16"}
    # as loop.run writes summary.json: the held-out results without their per-instruction items
    before = {"n": 100, "mean_score": 0.2, "mean_score_ci": [0.15, 0.25], "valid_rate": 0.8, "environment": env}
    after = {"n": 100, "mean_score": 0.3, "mean_score_ci": [0.25, 0.35], "valid_rate": 0.95, "environment": env}
    return {"iterations": [it], "heldout_before": before, "heldout_after": after,
            "heldout_change": {"n": 100, "score_diff": 0.1, "score_diff_ci": [0.04, 0.16]}}


def test_record_and_render(tmp_path):
    mod = _module()
    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    rec = mod.record(tmp_path, "tpo-lite run x.toml", 1800.0, "idle")
    assert rec["commit"] == "abc123" and "items" not in rec["heldout_before"]  # the run has no eval.json
    md = mod.render(json.loads(json.dumps(rec)))
    assert "| change (paired bootstrap) | +0.100 [+0.040, +0.160] | |" in md
    assert "| seed model | 0.200 [0.150, 0.250] | 80.0% |" in md
    assert "| after 1 TPO iteration | 0.300 [0.250, 0.350] | 95.0% |" in md
    assert "| DPO initial margin | 0.0000 |" in md and "| training instructions x K | 48 x 4 |" in md
    assert "commit `abc123`" in md and "30.0 min" in md and "load: idle" in md
    assert "cut to the chosen's length" not in md  # a record from before pairs.cut_off_rejected_length
    rec["iterations"][0]["pairs"].update(rejected_truncated=7, rejected_cut_to_chosen=6)
    md = mod.render(json.loads(json.dumps(rec)))
    assert "| of which the rejected side was cut off | 7 |" in md and "| ... and cut to the chosen's length | 6 |" in md


def test_record_without_one_wall_time_says_so_and_sums_stage_times(tmp_path):
    mod = _module()
    summary = _summary()
    summary["iterations"][0]["memory"] = {"generate": {"seconds": 120.0}, "train": {"seconds": 300.0},
                                          "judge": {"seconds": 0.1}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    rec = mod.record(tmp_path, "tpo-lite run x.toml", None, "loaded", "resumed twice")
    assert rec["stage_seconds"] == {"generate": 120.0, "train": 300.0, "judge": 0.1}
    md = mod.render(json.loads(json.dumps(rec)))
    assert "wall time" not in md
    assert "command `tpo-lite run x.toml`; resumed twice." in md
    assert "Stage times in this run's records: generate 2.0 min, train 5.0 min." in md


def _run_with_items(tmp_path, before_items, after_items):
    """A run directory as loop.run leaves it: summary.json without items, each result's eval.json with them."""
    from tpo_lite.metrics import compare_heldout

    def result(items, model):
        return {"model": model, "n": len(items), "mean_score": sum(i["score"] for i in items) / len(items),
                "mean_score_ci": [0.0, 1.0], "valid_rate": sum(i["valid"] for i in items) / len(items),
                "judge": "programmatic", "items": items}

    before, after = result(before_items, "seed"), result(after_items, "iter01")
    for sub, r in (("eval_base", before), ("iter_01/heldout", after)):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "eval.json").write_text(json.dumps(r))
    summary = _summary()
    slim = lambda r: {k: v for k, v in r.items() if k != "items"}  # noqa: E731
    change = compare_heldout(before, after)
    summary.update(heldout_before=slim(before), heldout_after=slim(after),
                   heldout_change={k: v for k, v in change.items() if k in ("n", "score_diff", "score_diff_ci")})
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return summary


def test_record_keeps_the_items_and_re_derives_the_change_with_its_split(tmp_path):
    mod = _module()
    items = lambda vs: [{"id": f"q{i}", "valid": v, "score": x} for i, (v, x) in enumerate(vs)]  # noqa: E731
    before = items([(False, 0.0), (True, 0.5), (True, 0.5), (True, 1.0)])
    after = items([(True, 1.0), (True, 1.0), (False, 0.0), (True, 1.0)])
    _run_with_items(tmp_path, before, after)
    rec = mod.record(tmp_path, "c", 60.0, "idle")
    assert rec["heldout_before"]["items"] == before and rec["heldout_after"]["items"] == after
    d = rec["heldout_change"]
    # q0 invalid -> valid (+1), q2 valid -> invalid (-0.5); q1 (+0.5) and q3 (0) valid both times
    assert d["score_diff"] == 0.25 and d["format_change"] == 0.125 and d["both_valid_change"] == 0.125
    md = mod.render(json.loads(json.dumps(rec)))
    assert "| ... from outputs that became valid (1) or invalid (1) | +0.125 [" in md
    assert "| ... from outputs valid before and after (2) | +0.125 [" in md
    # items that do not give the summary's change are not this run's: refused, not recorded
    summary = json.loads((tmp_path / "summary.json").read_text())
    summary["heldout_change"]["score_diff"] = 0.2
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(SystemExit, match="do not reproduce the recorded change"):
        mod.record(tmp_path, "c", 60.0, "idle")


def test_refresh_adds_what_the_script_keeps_now_and_refuses_another_run(tmp_path):
    mod = _module()
    items = lambda vs: [{"id": f"q{i}", "valid": True, "score": x} for i, x in enumerate(vs)]  # noqa: E731
    run = tmp_path / "run"
    _run_with_items(run, items([0.0, 0.5]), items([0.5, 0.5]))
    old = mod.record(run, "tpo-lite run x.toml", None, "loaded", "resumed once")
    for k in ("heldout_before", "heldout_after"):  # a record from before the items were kept
        old[k] = {kk: v for kk, v in old[k].items() if kk != "items"}
    old["heldout_change"] = {k: old["heldout_change"][k] for k in ("n", "score_diff", "score_diff_ci")}
    new = mod.refresh(old, run)
    assert (new["command"], new["timing_note"], new["load"]) == ("tpo-lite run x.toml", "resumed once", "loaded")
    assert len(new["heldout_after"]["items"]) == 2 and new["heldout_change"]["both_valid_change"] == 0.25
    other = tmp_path / "other"
    _run_with_items(other, items([0.0, 0.5]), items([1.0, 0.5]))
    with pytest.raises(SystemExit, match="is not the run of this record"):
        mod.refresh(old, other)


def test_records_with_items_re_derive_their_change():
    """Each record in docs/measured that keeps its held-out items gives its recorded change again, split and all."""
    from tpo_lite.metrics import compare_heldout

    checked = 0
    for f in sorted((SCRIPT.parents[1] / "docs" / "measured").glob("*.json")):
        rec = json.loads(f.read_text(encoding="utf-8"))
        b, a = rec.get("heldout_before") if isinstance(rec, dict) else None, rec.get("heldout_after") if isinstance(rec, dict) else None
        if b and a and "items" in b and "items" in a:
            assert compare_heldout(b, a) == rec["heldout_change"], f.name
            checked += 1
    assert checked >= 3  # the main command's run and the recipe's seeds


def test_readme_holds_the_rendered_record():
    """The README's measured block is exactly what `render` makes of docs/measured/main_command.json."""
    root = SCRIPT.parents[1]
    rec_path = root / "docs" / "measured" / "main_command.json"
    readme = (root / "README.md").read_text(encoding="utf-8")
    if not rec_path.exists():
        assert "<!-- measured:main_command -->" in readme
        return
    md = _module().render(json.loads(rec_path.read_text(encoding="utf-8")))
    block = readme.split("<!-- measured:main_command -->")[1].split("<!-- /measured -->")[0]
    assert md in block


def test_memory_line_of_a_run_in_stage_processes_and_of_one_process(tmp_path):
    mod = _module()
    summary = _summary()
    summary["memory"] = {"stage_processes": True, "stage_peak_rss_mb": {"generate": 1500.0, "train": 2000.0},
                         "driver_private_mb": 160.0, "run_peak_total_mb": 2160.0, "run_peak_rss_mb": 2000.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    tree = {"interval_ms": 20.0, "summed": "RSS", "peak_tree_mb": 2100.0}
    md = mod.render(json.loads(json.dumps(mod.record(tmp_path, "c", 60.0, "idle", tree_memory=tree))))
    assert ("the largest, train, peaked at 2000 MB RSS (train, i.e. DPO: 2000 MB); with the driver's 160 MB of its "
            "own the run held at most 2160 MB = 1.08 x the DPO stage; the process tree, sampled every 20 ms (sum of "
            "RSS), peaked at 2100 MB = 1.05 x.") in md
    summary["memory"] = {"stage_processes": False, "stage_peak_rss_mb": {"train": 2000.0}, "run_peak_rss_mb": 3000.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    md = mod.render(json.loads(json.dumps(mod.record(tmp_path, "c", 60.0, "idle"))))
    assert "Memory: one process; it peaked at 3000 MB RSS = 1.50 x its largest train (DPO) stage (2000 MB)." in md


def test_seeds_summary_of_records(tmp_path, capsys):
    """`readme_numbers.py seeds` summarises recorded runs with tpo_lite.seeds' own code, commits, CPUs and dtypes
    named."""
    mod = _module()
    recs = {}
    for seed, (diff, ci) in {0: (0.1, [0.04, 0.16]), 1: (0.02, [-0.03, 0.07])}.items():
        summary = _summary()
        summary["heldout_change"] = {"n": 100, "score_diff": diff, "score_diff_ci": ci}
        summary["heldout_after"]["mean_score"] = 0.2 + diff
        (tmp_path / "summary.json").write_text(json.dumps(summary))
        path = tmp_path / f"rec{seed}.json"
        path.write_text(json.dumps(mod.record(tmp_path, "c", 60.0, "idle")))
        recs[seed] = path
    md = mod.render_seeds({s: json.loads(p.read_text()) for s, p in recs.items()})
    assert not md.startswith("#")
    assert "| 0 | 100 | 0.200 | 0.300 | +0.100 [+0.040, +0.160] ↑ | 80% → 95% |" in md
    assert "| 1 | 100 | 0.200 | 0.220 | +0.020 [-0.030, +0.070] | 80% → 95% |" in md
    assert "**Mean change over 2 runs: +0.060 [-0.448, +0.568]**, sd between runs 0.057" in md
    assert md.endswith("Measured at: seed 0: `abc123` on CPU X (bfloat16), seed 1: `abc123` on CPU X (bfloat16).\n")
    # the command line prints the same and, with --plot, draws the records' forest plot
    mod.main(["seeds", f"0={recs[0]}", f"1={recs[1]}", "--plot", str(tmp_path / "seeds.png")])
    assert capsys.readouterr().out == md
    assert (tmp_path / "seeds.png").read_bytes()[:4] == b"\x89PNG"


def test_docs_hold_the_rendered_seeds_summaries(monkeypatch):
    """Every summary over seeds (the current recipe's in the README, the earlier ones in docs/measured/HISTORY.md)
    is what `readme_numbers.py seeds` makes of the records its marker names."""
    root = SCRIPT.parents[1]
    monkeypatch.chdir(root)  # the markers name records relative to the repository root, as the script is run
    mod = _module()
    assert "docs/measured/HISTORY.md" in (root / "README.md").read_text(encoding="utf-8")
    marker = "<!-- measured:seeds "
    for doc in ("README.md", "docs/measured/HISTORY.md"):
        text = (root / doc).read_text(encoding="utf-8")
        assert marker in text, doc
        for block in text.split(marker)[1:]:
            args, rest = block.split(" -->", 1)
            records = dict(mod._seed_record(arg) for arg in args.split())
            assert len(records) >= 2, doc
            assert mod.render_seeds(records) in rest.split("<!-- /measured -->")[0], doc


def _experiment_dir(tmp_path):
    row = {"n": 100, "win_rate": 0.54, "win_rate_ci": [0.455, 0.625], "lc_win_rate": 0.5633,
           "lc_win_rate_ci": [0.469, 0.6536], "wins": 45, "ties": 18, "losses": 37, "invalid_rate": 0.01}
    exp = {"runs": {"tpo": "tpo", "direct": "direct"}, "judge": "programmatic",
           "table": [{"comparison": "TPO (iter 1) vs seed", **row},
                     {"comparison": "TPO vs direct", **row, "win_rate": 0.415, "invalid_rate": 0.0}]}
    (tmp_path / "experiment.json").write_text(json.dumps(exp))
    for label, after in (("tpo", 0.3), ("direct", 0.25)):
        summary = _summary()
        summary["iterations"][0]["heldout"] = {"mean_score": after, "valid_rate": 0.95, "n": 100}
        summary["iterations"][0]["memory"] = {"train": {"seconds": 600.0}}
        summary["heldout_change"].update(valid_rate_before=0.8, valid_rate_after=0.95)
        (tmp_path / label).mkdir()
        (tmp_path / label / "summary.json").write_text(json.dumps(summary))
    # the TPO run's held-out outputs per instruction: the change after each iteration is paired like the final one
    for sub, scores in (("eval_base", [0.0, 0.5]), ("iter_01/heldout", [1.0, 0.5])):
        (tmp_path / "tpo" / sub).mkdir(parents=True)
        items = [{"id": i, "score": x} for i, x in enumerate(scores)]
        (tmp_path / "tpo" / sub / "eval.json").write_text(json.dumps({"items": items}))
    return tmp_path


def test_experiment_record_and_render(tmp_path):
    """`readme_numbers.py experiment` keeps Table 1 and each run's held-out scores; `render-experiment` prints
    them with the commit, machine and command."""
    mod = _module()
    rec = mod.experiment_record(_experiment_dir(tmp_path), "tpo-lite experiment x.toml", 3000.0, "idle",
                                note="the TPO run resumed from the main run")
    assert set(rec["arms"]) == {"tpo", "direct"} and "items" not in rec["arms"]["tpo"]["heldout_before"]
    change = rec["arms"]["tpo"]["per_iteration"][0]["change"]
    assert change["n"] == 2 and change["score_diff"] == 0.5
    assert rec["arms"]["direct"]["per_iteration"][0]["change"] is None  # no per-instruction outputs there
    md = mod.render_experiment(json.loads(json.dumps(rec)))
    assert "| TPO (iter 1) vs seed | 54.0% [45.5, 62.5] | 56.3% [46.9, 65.4] | 45 / 18 / 37 | 1.0% |" in md
    assert "| TPO vs direct | 41.5% [45.5, 62.5] | 56.3% [46.9, 65.4] | 45 / 18 / 37 | 0.0% |" in md
    assert "| held-out score (100 instructions, greedy) | seed | iter 1 | change [95% CI] | valid format |" in md
    assert "| TPO (thoughts) | 0.200 | 0.300 | +0.100 [+0.040, +0.160] | 80.0% → 95.0% |" in md
    assert "| direct (no thoughts) | 0.200 | 0.250 | +0.100 [+0.040, +0.160] | 80.0% → 95.0% |" in md
    assert "tpo `abc123`, direct `abc123`" in md and "50.0 min for `tpo-lite experiment x.toml`" in md
    assert "; the TPO run resumed from the main run." in md
    assert "Stage times in the direct run's records: train 10.0 min." in md


def test_readme_holds_the_rendered_experiment():
    """The README's direct-vs-TPO tables are what `render-experiment` makes of docs/measured/direct_vs_tpo.json."""
    root = SCRIPT.parents[1]
    rec = json.loads((root / "docs" / "measured" / "direct_vs_tpo.json").read_text(encoding="utf-8"))
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- measured:direct_vs_tpo -->")[1].split("<!-- /measured -->")[0]
    assert _module().render_experiment(rec) in block
