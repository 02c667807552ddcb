"""The run directory's one owner (tpo_lite.rundir) and the stage registry (tpo_lite.stages)."""
from __future__ import annotations

import pytest

from tpo_lite.errors import TpoError
from tpo_lite.jsonl import append_record
from tpo_lite.rundir import EvalDir, RunDir
from tpo_lite.stages import STAGES, first_unfinished


def test_iterations_are_parsed_once_in_numeric_order(tmp_path):
    run = RunDir(tmp_path / "r")
    for t in (2, 100, 10, 1):
        run.iteration(t).path.mkdir(parents=True)
    (run.path / "iter_xx").mkdir()
    (run.path / "iter_03").write_text("a file, not an iteration")
    assert [(it.t, it.name) for it in run.iterations()] == [(1, "iter_01"), (2, "iter_02"), (10, "iter_10"),
                                                            (100, "iter_100")]
    assert run.iteration_of(run.iteration(100).adapter) == 100
    assert run.iteration_of(None) is None and run.iteration_of(tmp_path / "elsewhere" / "adapter") is None
    assert run.heldout_dirs()[0].path == run.eval_base.path and run.heldout_dirs()[-1].path == run.eval_final.path


def test_checked_records_refuse_a_file_changed_after_its_marker(tmp_path):
    it = RunDir(tmp_path / "r").iteration(1)
    it.path.mkdir(parents=True)
    for k in range(3):
        append_record(it.judgements, {"prompt_id": f"p{k}", "scores": [1.0]})
    it.mark_done("judge", {"n_judged": 3}, files=(it.judgements,))
    assert list(it.checked_records("judge", it.judgements, "prompt_id")) == ["p0", "p1", "p2"]
    append_record(it.judgements, {"prompt_id": "p3", "scores": [0.0]})
    with pytest.raises(TpoError, match=r"does not match judge.done.json: 3 records when the stage finished, 4"):
        it.checked_records("judge", it.judgements, "prompt_id")


def test_stage_registry_order_needs_and_first_unfinished(tmp_path):
    run = RunDir(tmp_path / "r")
    assert list(STAGES) == ["generate", "judge", "pairs", "train"]
    with pytest.raises(TpoError, match="stage 'generate' has not finished"):
        STAGES["judge"].check_needs(run.path, 1)
    with pytest.raises(TpoError, match=r"stage 'train' has not finished .*before 'generate \(iteration 2\)'"):
        STAGES["generate"].check_needs(run.path, 2)
    STAGES["generate"].check_needs(run.path, 1)  # iteration 1 needs nothing
    run.iteration(1).path.mkdir(parents=True)
    run.iteration(1).mark_done("generate", {})
    assert first_unfinished("generate", run.path, 2) == 2 and first_unfinished("judge", run.path, 2) == 1


def test_lock_refuses_a_second_holder(tmp_path):
    run = RunDir(tmp_path / "r")
    with run.lock():
        with pytest.raises(TpoError, match="another tpo-lite process"):
            with RunDir(tmp_path / "r").lock():
                pass
    with run.lock():  # released on exit
        pass


def test_eval_dir_sets_a_result_aside_without_deleting_it(tmp_path):
    out = EvalDir(tmp_path / "heldout")
    out.path.mkdir()
    out.result.write_text("{}")
    assert out.set_aside().name == "heldout.stale"
    out.path.mkdir()
    assert out.set_aside().name == "heldout.stale2" and (tmp_path / "heldout.stale" / "eval.json").exists()
    assert out.read_outputs() is None and not out.has_work()
