"""Training instructions and eval sets from the `datasets` library (issue 11, item 2): a saved dataset directory,
a data file, a Hub id read from the HF cache offline, column mapping, splits, and the errors."""
from __future__ import annotations

import glob
import json
import os
import shutil

import pytest

datasets = pytest.importorskip("datasets")

from tpo_lite.errors import TpoError  # noqa: E402
from tpo_lite.evaluate import EvalConfig, load_configured_eval_set, load_eval_set  # noqa: E402
from tpo_lite.instructions import load_instruction_source  # noqa: E402

ULTRA = {"prompt": ["Name three fruits.", "Say hello in French.", "Count to three."],
         "prompt_id": ["u0", "u1", "u2"], "source": ["food", None, "maths"]}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF datasets cache, offline: nothing here reaches the network."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def test_saved_dataset_with_column_mapping(tmp_path):
    datasets.Dataset.from_dict(ULTRA).save_to_disk(tmp_path / "ultra")
    items = load_instruction_source(tmp_path / "ultra", instruction_column="prompt", id_column="prompt_id",
                                    category_column="source")
    assert [(i.id, i.instruction, i.category) for i in items] == [
        ("u0", "Name three fruits.", "food"), ("u1", "Say hello in French.", "uncategorised"),
        ("u2", "Count to three.", "maths")]
    # No id column: ids from the row index.
    items = load_instruction_source(tmp_path / "ultra", instruction_column="prompt")
    assert [i.id for i in items] == ["row-00000", "row-00001", "row-00002"]


def test_missing_column_names_the_row_and_column(tmp_path):
    datasets.Dataset.from_dict(ULTRA).save_to_disk(tmp_path / "ultra")
    with pytest.raises(TpoError) as e:
        load_instruction_source(tmp_path / "ultra")  # the default column 'instruction' is not there
    assert e.value.field == "[0].instruction" and "missing" in e.value.message


def test_dataset_dict_split(tmp_path):
    datasets.DatasetDict({
        "train_prefs": datasets.Dataset.from_dict({"prompt": ["a?", "b?"]}),
        "test_prefs": datasets.Dataset.from_dict({"prompt": ["c?"]}),
    }).save_to_disk(tmp_path / "dd")
    items = load_instruction_source(tmp_path / "dd", split="test_prefs", instruction_column="prompt")
    assert [i.instruction for i in items] == ["c?"]
    with pytest.raises(TpoError) as e:
        load_instruction_source(tmp_path / "dd", instruction_column="prompt")
    assert e.value.field == "loop.train_split" and "train_prefs, test_prefs" in e.value.message
    with pytest.raises(TpoError) as e:
        load_instruction_source(tmp_path / "dd", split="validation", instruction_column="prompt")
    assert "no split 'validation'" in e.value.message


def test_parquet_file_and_jsonl_column_mapping(tmp_path):
    datasets.Dataset.from_dict(ULTRA).to_parquet(str(tmp_path / "u.parquet"))
    items = load_instruction_source(tmp_path / "u.parquet", instruction_column="prompt", id_column="prompt_id")
    assert [i.id for i in items] == ["u0", "u1", "u2"]
    # The column options apply to our JSONL too (read without `datasets`, errors with line numbers).
    p = tmp_path / "u.jsonl"
    p.write_text("".join(json.dumps({"prompt_id": f"j{i}", "prompt": t}) + "\n" for i, t in enumerate("xyz")))
    items = load_instruction_source(p, instruction_column="prompt", id_column="prompt_id")
    assert [(i.id, i.instruction) for i in items] == [("j0", "x"), ("j1", "y"), ("j2", "z")]
    p.write_text(json.dumps({"prompt_id": "j0"}) + "\n")
    with pytest.raises(TpoError) as e:
        load_instruction_source(p, instruction_column="prompt", id_column="prompt_id")
    assert (e.value.line, e.value.field) == (1, "prompt")


def _cache_hub_dataset(tmp_path, cache, repo_id: str, data: dict):
    """Put ``data`` into ``cache`` the way `datasets` caches a Hub dataset it prepared (one 'default' config):
    prepared here from a local parquet file, then moved under the Hub id's cache folder."""
    datasets.Dataset.from_dict(data).to_parquet(str(tmp_path / "src.parquet"))
    build = tmp_path / "build"
    datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "src.parquet")}, cache_dir=str(build))
    src = next(p for p in glob.glob(str(build / "parquet" / "*" / "*" / "*")) if os.path.isdir(p))
    name = repo_id.split("/")[-1]
    dst = os.path.join(cache, repo_id.replace("/", "___"), "default", *src.split(os.sep)[-2:])
    shutil.copytree(src, dst)
    for f in os.listdir(dst):
        if f.startswith("parquet-"):
            os.rename(os.path.join(dst, f), os.path.join(dst, name + f[len("parquet"):]))


def test_hub_id_read_from_the_hf_cache_offline(tmp_path, offline_cache):
    _cache_hub_dataset(tmp_path, offline_cache, "tpo-test/ultra-tiny", ULTRA)
    items = load_instruction_source("tpo-test/ultra-tiny", instruction_column="prompt", id_column="prompt_id")
    assert [i.id for i in items] == ["u0", "u1", "u2"]


def test_hub_id_not_cached_offline_is_one_clear_error(offline_cache):
    with pytest.raises(TpoError) as e:
        load_instruction_source("tpo-test/not-cached")
    msg = str(e.value)
    assert msg.startswith("tpo-test/not-cached: loop.train_instructions: ")
    assert "HF cache" in msg and "offline" in msg and str(offline_cache) in msg
    with pytest.raises(TpoError) as e:
        load_instruction_source("missing/dir/data.parquet")
    assert "not found" in e.value.message and e.value.field == "loop.train_instructions"


def test_eval_set_from_a_dataset(tmp_path):
    datasets.Dataset.from_dict({"instruction": ["What is 2+2?", "Name a colour."], "output": ["4", "red"],
                                "generator": ["gpt", "gpt"], "dataset": ["maths", "misc"]}).save_to_disk(
        tmp_path / "ae")
    items = load_eval_set(tmp_path / "ae")  # AlpacaEval format, detected from the columns
    assert [(i.id, i.category, i.baseline) for i in items] == [("alpaca-0000", "maths", "4"),
                                                                ("alpaca-0001", "misc", "red")]
    datasets.DatasetDict({"eval": datasets.Dataset.from_dict(ULTRA)}).save_to_disk(tmp_path / "ud")
    said = []
    items = load_configured_eval_set(EvalConfig(eval_set=str(tmp_path / "ud"), eval_split="eval",
                                                instruction_column="prompt", max_instructions=2), echo=said.append)
    assert [i.instruction for i in items] == ULTRA["prompt"][:2]
    assert said == [f"evaluating 2 of 3 instructions of {tmp_path / 'ud'} (eval.max_instructions = 2)"]
    with pytest.raises(TpoError) as e:
        load_eval_set(tmp_path / "ud", split="nope")
    assert e.value.field == "eval.eval_split"


def test_dry_run_catches_a_dataset_it_cannot_resolve(tmp_path, offline_cache):
    from test_loop import _cli, _one_error_line, build_tiny_model, write_config, write_instructions

    model_dir = build_tiny_model(tmp_path / "model")
    heldout = write_instructions(tmp_path / "heldout.jsonl", 4, "ho")
    cfg = write_config(tmp_path, model_dir, tmp_path / "unused.jsonl", heldout)
    _one_error_line(_cli("run", str(cfg), "--dry-run", "--set", 'loop.train_instructions="tpo-test/nowhere"'),
                    "tpo-test/nowhere: loop.train_instructions: ", "HF cache")
    _one_error_line(_cli("run", str(cfg), "--dry-run", "--set", 'eval.eval_set="tpo-test/nowhere-eval"',
                         "--set", f'loop.train_instructions="{heldout}"'),
                    "tpo-test/nowhere-eval: eval.eval_set: ", "HF cache")
    # A dataset that resolves: the dry run goes through.
    datasets.Dataset.from_dict({"prompt": [f"Name fruit number {i}." for i in range(12)]}).save_to_disk(
        tmp_path / "train_ds")
    res = _cli("run", str(cfg), "--dry-run", "--set", f'loop.train_instructions="{tmp_path / "train_ds"}"',
               "--set", 'loop.instruction_column="prompt"')
    assert res.exit_code == 0, res.output
    assert f"training set: {tmp_path / 'train_ds'}" in res.output


def test_without_datasets_installed_the_error_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets" or name.startswith("datasets."):
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(TpoError) as e:
        load_instruction_source(tmp_path / "some_saved_dir")
    assert "pip install 'tpo-lite[datasets]'" in e.value.message
