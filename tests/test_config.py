"""Config loading/validation. Uses stand-in stage dataclasses so it only tests config.py itself; the real
stage configs are covered by test_loop.py's runs."""
import dataclasses
import sys
import tomllib
import types
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from tpo_lite import config as C
from tpo_lite.errors import TpoError


@dataclass
class FakeTrain:
    lr: float = field(default=1e-5, metadata={"help": "Learning rate."})
    epochs: int = field(default=1, metadata={"help": "Epochs."})
    rho: float | str = field(default="auto", metadata={"help": "Length penalty or auto."})
    mode: Literal["nf4", "bf16"] = field(default="nf4", metadata={"help": "Base precision."})
    targets: list[str] = field(default_factory=lambda: ["q_proj"], metadata={"help": "LoRA targets."})
    path: Optional[str] = field(default=None, metadata={"help": "Optional path."})
    gc: bool = field(default=False, metadata={"help": "Gradient checkpointing."})

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@pytest.fixture(autouse=True)
def fake_sections(monkeypatch):
    mod = types.ModuleType("fake_stage")
    mod.FakeTrain = FakeTrain
    monkeypatch.setitem(sys.modules, "fake_stage", mod)
    monkeypatch.setitem(C.SECTIONS, "train", FakeTrain)


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_values(tmp_path):
    p = write(tmp_path, '[train]\nlr = 1\nrho = 0.2\nmode = "bf16"\ntargets = ["a", "b"]\n[loop]\niterations = 3\n')
    cfg = C.load_config(p)
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.rho == 0.2 and cfg.train.mode == "bf16" and cfg.train.targets == ["a", "b"]
    assert cfg.loop.iterations == 3 and cfg.loop.prompts_per_iteration == 32
    assert C.load_config(write(tmp_path, '[train]\nrho = "auto"\n')).train.rho == "auto"


@pytest.mark.parametrize("text,line,fld,msg", [
    ('[train]\nlr = 1e-4\nlrr = 2\n', 3, "train.lrr", "unknown option"),
    ('[train]\n\n  epochs = "two"\n', 3, "train.epochs", "expected int, got str 'two'"),
    ('[train]\nepochs = 1.5\n', 2, "train.epochs", "expected int"),
    ('[loop]\neval_before = 1\n', 2, "loop.eval_before", "expected bool"),
    ('[train]\nmode = "fp8"\n', 2, "train.mode", "expected 'nf4' | 'bf16'"),
    ('[train]\ntargets = ["a", 3]\n', 2, "train.targets", "expected list of str"),
    ('[loop]\nname = "x"\n[trian]\nlr = 1\n', 3, "trian", "unknown table"),
    ('[loop]\n\niterations = 0\n', 3, "loop.iterations", "must be >= 1"),
    ('[train]\nlr = -1.0\n', 1, "train", "lr must be > 0"),
])
def test_errors_name_file_line_field(tmp_path, text, line, fld, msg):
    p = write(tmp_path, text)
    with pytest.raises(TpoError) as e:
        C.load_config(p)
    err = e.value
    assert (err.path, err.line, err.field) == (str(p), line, fld)
    assert msg in err.message
    assert str(err).startswith(f"{p}:{line}: {fld}: ")


def test_toml_syntax_error_and_missing_file(tmp_path):
    p = write(tmp_path, '[loop]\niterations = 2\nname = "unterminated\n')
    with pytest.raises(TpoError) as e:
        C.load_config(p)
    assert e.value.line == 3 and "invalid TOML" in e.value.message
    with pytest.raises(TpoError, match="config file not found"):
        C.load_config(tmp_path / "nope.toml")


def test_set_overrides_and_name(tmp_path):
    p = write(tmp_path, '[loop]\niterations = 2\n')
    cfg = C.load_config(p, ["loop.iterations=5", "train.mode=bf16", "train.targets=['x']", "train.path=/a/b"],
                        name="exp1")
    assert cfg.loop.iterations == 5 and cfg.train.mode == "bf16" and cfg.train.targets == ["x"]
    assert cfg.train.path == "/a/b" and cfg.loop.name == "exp1"
    with pytest.raises(TpoError) as e:
        C.load_config(p, ["loop.iterations=many"])
    assert str(e.value) == "--set: loop.iterations: expected int, got str 'many'"
    with pytest.raises(TpoError, match=r"^--set: loop.iterations: must be >= 1"):
        C.load_config(p, ["loop.iterations=0"])
    with pytest.raises(TpoError, match="expected section.key=value"):
        C.load_config(p, ["iterations=3"])


def test_resolved_toml_roundtrip(tmp_path):
    cfg = C.load_config(write(tmp_path, '[train]\nlr = 0.5\nrho = 0.25\ntargets = ["q\\"x"]\n'
                                        '[loop]\nname = "r"\n'))
    text = C.to_toml(cfg)
    assert "# Learning rate." in text and "# path = (unset)" in text
    tomllib.loads(text)
    again = C.load_config(write(tmp_path, text))
    assert again == cfg


def test_options_reference_lists_every_field():
    ref = C.options_reference()
    for f in dataclasses.fields(C.LoopConfig):
        assert f"  {f.name} (" in ref
    assert "lr (float, default 1e-05)" in ref and "Learning rate." in ref
    md = C.options_reference(markdown=True)
    assert "| `iterations` | int | `1` |" in md


def test_every_loop_field_documented():
    for f in dataclasses.fields(C.LoopConfig):
        assert f.metadata.get("help"), f.name


def test_replace_sets_an_unset_optional_table_and_names_an_unknown_one():
    """replace() on [eval_judge], absent from the config (None), starts from its defaults instead of failing
    inside dataclasses.replace; an unknown table is a TpoError naming it, not a KeyError."""
    from tpo_lite.judges import JudgeConfig

    cfg = C.load_config(None)
    assert cfg.eval_judge is None
    ej = cfg.replace("eval_judge", kind="reward_model", model="/rm")
    assert ej.eval_judge == JudgeConfig(kind="reward_model", model="/rm") and cfg.eval_judge is None
    assert ej.replace("eval_judge", batch_size=2).eval_judge.model == "/rm"
    with pytest.raises(TpoError) as e:
        cfg.replace("evaljudge", kind="programmatic")
    assert e.value.field == "evaljudge" and "unknown table" in e.value.message
