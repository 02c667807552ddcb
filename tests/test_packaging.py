"""What ships with the package (issue 11, item 5), fast parts: where the kernel sources and the examples are found
(installed package first, then the checkout), `tpo-lite examples`, and the one clear warning on a CUDA machine
without nvcc. The real wheel build and install is tests/test_wheel.py."""
from __future__ import annotations

import importlib
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from tpo_lite import packaged
from tpo_lite.cli import main
from tpo_lite.ops import _ext

REPO = Path(__file__).resolve().parent.parent


def _layout(root: Path, files) -> None:
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")


def test_packaged_dir_installed_first_then_checkout(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    _layout(site, ["tpo_lite/__init__.py", "tpo_lite/csrc/cpu/a.cpp", "csrc/cpu/foreign.cpp", "examples/x.toml"])
    monkeypatch.setattr(packaged, "PACKAGE_DIR", site / "tpo_lite")
    assert packaged.packaged_dir("csrc") == site / "tpo_lite" / "csrc"
    # an installed package never reads a same-named folder of site-packages (no setup.py there)
    assert packaged.packaged_dir("examples") is None

    checkout = tmp_path / "checkout"
    _layout(checkout, ["setup.py", "tpo_lite/__init__.py", "csrc/cpu/a.cpp", "examples/x.toml"])
    monkeypatch.setattr(packaged, "PACKAGE_DIR", checkout / "tpo_lite")
    assert packaged.packaged_dir("csrc") == checkout / "csrc"
    assert packaged.packaged_dir("examples") == checkout / "examples"
    assert packaged.packaged_dir("nothing") is None


def _without_compiled(monkeypatch, *names):
    real = importlib.import_module

    def import_module(name, package=None):
        if name in names:
            raise ImportError(f"No module named {name!r} (blocked by test)")
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", import_module)
    monkeypatch.setattr(_ext, "_cache", {})
    monkeypatch.setattr(_ext, "_warned", {})
    monkeypatch.delenv("TPO_LITE_NO_JIT", raising=False)


def test_jit_compiles_the_installed_package_sources(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    _layout(site, ["tpo_lite/__init__.py", "tpo_lite/csrc/common.h", "tpo_lite/csrc/cpu/bindings.cpp",
                   "tpo_lite/csrc/cpu/linear_logprobs.cpp"])
    monkeypatch.setattr(packaged, "PACKAGE_DIR", site / "tpo_lite")
    _without_compiled(monkeypatch, "tpo_lite._C")
    built = []
    sentinel = object()

    def jit(name, sources, cuda):
        built.append((name, sources, cuda))
        return sentinel

    monkeypatch.setattr(_ext, "_jit", jit)
    assert _ext.get_extension("cpu") is sentinel
    assert built == [("tpo_lite_C", [str(site / "tpo_lite/csrc/cpu/bindings.cpp"),
                                     str(site / "tpo_lite/csrc/cpu/linear_logprobs.cpp")], False)]
    assert _ext.source_dir() == str(site / "tpo_lite" / "csrc")


def test_missing_sources_warning_says_reinstall(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    _layout(site, ["tpo_lite/__init__.py"])
    monkeypatch.setattr(packaged, "PACKAGE_DIR", site / "tpo_lite")
    _without_compiled(monkeypatch, "tpo_lite._C")
    monkeypatch.setattr(_ext, "_jit", lambda *a, **k: pytest.fail("nothing to compile"))
    with pytest.warns(RuntimeWarning, match="no sources to JIT-compile.*Reinstall tpo-lite from its sdist or wheel"):
        assert _ext.get_extension("cpu") is None


def test_cuda_without_nvcc_says_once_that_the_op_is_the_slow_reference(monkeypatch):
    from torch.utils import cpp_extension

    _without_compiled(monkeypatch, "tpo_lite._C_cuda")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)  # what torch finds without CUDA_HOME / nvcc
    monkeypatch.setattr(_ext, "_jit", lambda *a, **k: pytest.fail("no JIT attempt without nvcc"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # every call after the first uses the cached answer
            assert _ext.get_extension("cuda") is None
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    msg = msgs[0]
    for part in ("tpo_lite._C_cuda is not built", "nvcc was not found",
                 "Falling back to the pure-PyTorch reference for the CUDA fused ops", "slow",
                 "install the CUDA toolkit", "set CUDA_HOME", "pip install --no-build-isolation .",
                 "wheel built with CUDA"):
        assert part in msg, (part, msg)


def test_examples_command_copies_refuses_and_overwrites(tmp_path):
    shipped = sorted(p.name for p in (REPO / "examples").glob("*.toml"))
    assert "smollm2_cpu.toml" in shipped
    runner = CliRunner()
    dest = tmp_path / "ex"
    res = runner.invoke(main, ["examples", str(dest)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in dest.iterdir()) == shipped
    for name in shipped:
        assert (dest / name).read_bytes() == (REPO / "examples" / name).read_bytes()
        assert f"{dest / name}" in res.output

    (dest / "smollm2_cpu.toml").write_text("# mine\n")
    (dest / "vllm_server.toml").unlink()
    res = runner.invoke(main, ["examples", str(dest)])
    assert res.exit_code == 2
    assert "smollm2_cpu.toml" in res.output and "--overwrite" in res.output and "nothing copied" in res.output
    assert (dest / "smollm2_cpu.toml").read_text() == "# mine\n"  # untouched
    assert not (dest / "vllm_server.toml").exists()  # all or nothing

    res = runner.invoke(main, ["examples", str(dest), "--overwrite"])
    assert res.exit_code == 0, res.output
    assert (dest / "smollm2_cpu.toml").read_bytes() == (REPO / "examples" / "smollm2_cpu.toml").read_bytes()
    assert (dest / "vllm_server.toml").is_file()


def test_examples_command_default_dest_and_help(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["examples"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "examples" / "smollm2_cpu.toml").is_file()
    res = CliRunner().invoke(main, ["examples", "--help"])
    assert res.exit_code == 0
    assert "--overwrite" in res.output and "tpo-lite run DEST/NAME.toml" in res.output
    assert "smollm2_cpu.toml: The TPO recipe on the embedded default model" in res.output
