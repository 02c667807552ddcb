"""The run directory: the one module that knows its layout, its stage markers and its lock.

Run directory (``<loop.runs_root>/<loop.name>/``, records in docs/ARCHITECTURE.md)::

    config.toml  run.json  summary.json  judge_cache.sqlite  .lock (flock()ed while a process works on the run)
    eval_base/  eval_final/  eval/<label>/      EvalDirs: the seed's and the final model's held-out score, evals
    tracking/                                   loop.report_to's files (tpo_lite.tracking)
    iter_01/                                    an IterationDir:
      plan.json  samples.jsonl  judgements.jsonl  pairs.jsonl  pairs.trl.jsonl  metrics.json
      {generate,judge,pairs,train}.done.json    stage DONE markers (stats, and the files' line counts + sha256)
      adapter/ (adapter/DONE last)  ref_logps.pt  dpo_checkpoint.pt    tpo_lite.train's
      heldout/  validation/  compare/<label>/   EvalDirs

An :class:`EvalDir` holds ``outputs.jsonl`` (one :class:`tpo_lite.evaluate.ModelOutput` per line keyed by ``id``:
the one format of generated outputs, read by :meth:`EvalDir.read_outputs`), ``outputs.meta.json`` (the generation
settings a resume must match), ``producer.json`` (what a held-out result scored), ``eval.json`` / ``eval.md`` and
``model_outputs.json`` (an AlpacaEval export for the official tools, never read back). An experiment directory
(:class:`ExperimentDir`) holds the run directories ``tpo/`` and ``direct/``, ``compare/<label>/``,
``experiment.json`` and ``table1.md``. A seeds directory (:class:`SeedsDir`) holds one run directory
``seed_<S>/`` per seed, ``seed_<S>.log`` for each run started in a child process, ``seeds.json``, ``seeds.md`` and
``seeds.png``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Iterable

from .errors import TpoError
from .jsonl import read_json, read_records, write_json_atomic

_ITER = re.compile(r"^iter_(\d+)$")
# the stat a DONE marker of an older run holds for its file's record count
_LEGACY_COUNT = {"generate": "n_prompts", "judge": "n_judged", "pairs": "pairs_kept"}
# Keys the readers of a record file index ("a[].b": key b of every item of list a): a record without one is
# refused with its file and line when read (jsonl.read_records), not met later as a KeyError.
RECORD_KEYS = {
    "samples.jsonl": ("instruction", "prompt_text", "prompt_token_ids", "samples", "samples[].text",
                      "samples[].token_ids", "samples[].thought", "samples[].response", "samples[].valid"),
    "judgements.jsonl": ("scores",),
}


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scored_model(producer: dict) -> str | None:
    """What a held-out result scored: its adapter's content digest, else (a server-side adapter) its name; None =
    the seed model. The adapter's *path* does not count when the digest is known (``runs/x/iter_01/adapter`` and
    its absolute path are one model)."""
    return producer.get("adapter_sha256") or producer.get("adapter")


def adapter_digest(adapter: str | os.PathLike | None) -> str | None:
    """sha256 over a peft adapter's weights and config (``adapter_model.*``, ``adapter_config.json``): what a
    result was produced with, since the same path can hold other weights after an iteration is trained again.
    None for no adapter (the seed model) or a path that is not a directory here (a server-side adapter)."""
    if adapter is None or not Path(adapter).is_dir():
        return None
    h = hashlib.sha256()
    for p in sorted(Path(adapter).iterdir()):
        if p.is_file() and (p.name.startswith("adapter_model") or p.name == "adapter_config.json"):
            h.update(p.name.encode() + b"\0" + _sha256_file(p).encode())
    return h.hexdigest()


def _missing_note(missing: list) -> str:
    if not missing:
        return ""
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return f"; missing: {', '.join(map(str, missing[:5]))}{more}"


def _finished(root: Path, *parents: str) -> list:
    """(label, EvalDir) of each ``root/<parent>/<label>/`` holding a result, by parent then label."""
    return [(r.parent.name, EvalDir(r.parent)) for p in parents for r in sorted(root.glob(f"{p}/*/eval.json"))]


class _At:
    """A path of the layout, declared once as a class attribute of its folder (``plan = _At("plan.json")``);
    ``kind`` wraps it (:class:`EvalDir` for a result folder)."""

    def __init__(self, name: str, kind=Path):
        self.name, self.kind = name, kind

    def __get__(self, folder, owner=None):
        return self if folder is None else self.kind(folder.path / self.name)


class _Folder:
    """A folder of the layout that holds comparisons (``compare/<label>/``); ``os.fspath`` works on it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def compare(self, label: str) -> EvalDir:
        return EvalDir(self.path / "compare" / label)

    def comparisons(self) -> list[tuple[str, EvalDir]]:
        """(label, folder) of every finished ``compare/<label>/``, sorted by label."""
        return _finished(self.path, "compare")


class EvalDir:
    """A folder of generated outputs and their score (held-out, validation, `tpo-lite eval`, comparisons)."""

    outputs = _At("outputs.jsonl")
    outputs_meta = _At("outputs.meta.json")
    producer = _At("producer.json")
    result = _At("eval.json")
    markdown = _At("eval.md")
    alpaca_export = _At("model_outputs.json")
    judge_cache = _At("judge_cache.sqlite")

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read_outputs(self, generator: str | None = None):
        """The outputs of ``outputs.jsonl`` as :class:`~tpo_lite.evaluate.ModelOutput`, in file order (labelled
        ``generator`` when given); None when there is none. The one reader of generated outputs."""
        from .evaluate import OUTPUT_RECORD_KEYS, output_from_record

        if not self.outputs.exists():
            return None
        return [output_from_record(r, generator) for r in read_records(self.outputs, required=OUTPUT_RECORD_KEYS)]

    def read_result(self) -> dict | None:
        return read_json(self.result) if self.result.exists() else None

    def read_producer(self) -> dict | None:
        return read_json(self.producer) if self.producer.exists() else None

    def has_work(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def set_aside(self) -> Path:
        """Rename this folder out of the way (``<name>.stale``, ``.stale2`` ...; kept, never deleted)."""
        n, stale = 1, self.path.with_name(self.path.name + ".stale")
        while stale.exists():
            n += 1
            stale = self.path.with_name(f"{self.path.name}.stale{n}")
        os.replace(self.path, stale)
        return stale


class IterationDir(_Folder):
    """``iter_XX/`` of a run (``t`` = XX); also the output folder of :func:`tpo_lite.train.train_iteration`."""

    plan = _At("plan.json")
    samples = _At("samples.jsonl")
    judgements = _At("judgements.jsonl")
    pairs = _At("pairs.jsonl")
    pairs_trl = _At("pairs.trl.jsonl")
    adapter = _At("adapter")
    adapter_done = _At("adapter/DONE")
    adapter_tmp = _At(".adapter.tmp")  # renamed into place once whole
    ref_logps = _At("ref_logps.pt")
    dpo_checkpoint = _At("dpo_checkpoint.pt")
    metrics = _At("metrics.json")
    heldout = _At("heldout", EvalDir)
    validation = _At("validation", EvalDir)

    def __init__(self, path: str | os.PathLike, t: int | None = None):
        super().__init__(path)
        self.t = t
        self.name = self.path.name

    def read_plan(self) -> list[dict] | None:
        """The instructions of plan.json, None before the iteration is planned. A plan.json that is not
        ``{"instructions": [{"id", "instruction", "category", "checks"}, ...]}`` is refused naming the field."""
        if not self.plan.exists():
            return None
        plan = read_json(self.plan)
        fix = "restore it, or delete it to plan the iteration again (from the order in run.json)"
        if not isinstance(plan, dict):
            raise TpoError(f"expected a JSON object, got {type(plan).__name__}; {fix}", path=str(self.plan))
        items = plan.get("instructions")
        if not isinstance(items, list):
            raise TpoError(f"{'missing' if items is None else 'expected a list'}; {fix}", path=str(self.plan),
                           field="instructions")
        for i, p in enumerate(items):
            for k in ("id", "instruction", "category", "checks"):
                if not isinstance(p, dict) or k not in p:
                    raise TpoError(f"missing; {fix}", path=str(self.plan), field=f"instructions[{i}].{k}")
        return items

    def plan_ids(self) -> list | None:
        plan = self.read_plan()
        return None if plan is None else [p["id"] for p in plan]

    # ---- stage DONE markers
    def marker(self, stage: str) -> Path:
        return self.path / f"{stage}.done.json"

    def is_done(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def read_marker(self, stage: str) -> dict:
        return read_json(self.marker(stage))

    def mark_done(self, stage: str, info: dict, files: Iterable[Path] = ()) -> dict:
        """Write the stage's DONE marker and return it; ``files`` (in this folder) get their line count and
        sha256 recorded, so a later read can tell a damaged or replaced file from the one the stage finished
        with."""
        from .memory import StageMemory

        rec = {"stage": stage, "finished_at": time.time(), **info}
        if StageMemory.active is not None:  # the stage's peak memory (see stages._measured)
            rec["memory"] = StageMemory.active.record()
        if files:
            rec["files"] = {}
            for p in files:
                data = Path(p).read_bytes()
                rec["files"][Path(p).name] = {"records": data.count(b"\n"),
                                              "sha256": hashlib.sha256(data).hexdigest()}
        write_json_atomic(self.marker(stage), rec)
        return rec

    def checked_records(self, stage: str, path: Path, key: str | None = None, expected: Iterable | None = None):
        """The records of ``path``, a file stage ``stage`` finished, read back only if it is still what the
        stage's DONE marker recorded (sha256, or the record count for markers of older runs). ``expected``: the
        keys the file should hold, named in the error when some are gone."""
        path, marker_path = Path(path), self.marker(stage)
        marker = read_json(marker_path)
        want = (marker.get("files") or {}).get(path.name)
        fix = (f"restore it, or delete {marker_path.name} (and the later *.done.json of {self.name}) to redo "
               "that stage")
        if not path.exists():
            n = f" with {want['records']} records" if want else ""
            raise TpoError(f"missing, but {marker_path.name} says the stage finished{n}"
                           f"{_missing_note(list(expected or []))}; {fix}", path=str(path))
        data = path.read_bytes()
        recs = read_records(path, key=key, required=RECORD_KEYS.get(path.name, ()))
        if want is not None:
            ok = hashlib.sha256(data).hexdigest() == want["sha256"]
            n_then = want["records"]
        else:
            n_then = marker.get(_LEGACY_COUNT.get(stage, ""))
            ok = n_then is None or n_then == len(recs)
        if not ok:
            torn = " and a torn last line" if data and not data.endswith(b"\n") else ""
            missing = [k for k in (expected or []) if k not in recs] if key is not None else []
            raise TpoError(f"does not match {marker_path.name}: {n_then} records when the stage finished, "
                           f"{len(recs)} complete now{torn}{_missing_note(missing)}; it was changed or damaged "
                           f"after the stage finished: {fix}", path=str(path))
        return recs

    def trained_adapter(self) -> str | None:
        """The adapter this iteration trained, checked against its train.done.json (present, same weights); None
        when the iteration has not finished training or had no pairs to train on."""
        if not self.is_done("train"):
            return None
        marker = self.read_marker("train")
        if "skipped" in marker:
            return None
        fix = (f"restore it, or delete {self.name}/{self.marker('train').name} (and everything of later "
               "iterations) to train it again")
        if not self.adapter.is_dir():
            raise TpoError(f"missing, but {self.name}/{self.marker('train').name} says iteration {self.t} trained "
                           f"it; the next iteration would start from another model: {fix}", path=str(self.adapter))
        want = marker.get("adapter_sha256")
        if want is not None and adapter_digest(self.adapter) != want:
            raise TpoError(f"its weights are not the ones {self.name}/{self.marker('train').name} recorded (sha256 "
                           f"{want[:12]}...); it was changed or damaged after training: {fix}",
                           path=str(self.adapter))
        return str(self.adapter)


class RunDir(_Folder):
    """A run directory (see the module docstring)."""

    config = _At("config.toml")
    run_record = _At("run.json")
    summary = _At("summary.json")
    lock_file = _At(".lock")
    judge_cache = _At("judge_cache.sqlite")
    tracking = _At("tracking")  # the default loop.tracking_dir
    eval_base = _At("eval_base", EvalDir)
    eval_final = _At("eval_final", EvalDir)

    def iteration(self, t: int) -> IterationDir:
        return IterationDir(self.path / f"iter_{t:02d}", t)

    def iterations(self) -> list[IterationDir]:
        """The iteration folders that exist, in order."""
        if not self.path.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.path.iterdir() if (m := _ITER.match(p.name)) and p.is_dir()]
        return [IterationDir(p, t) for t, p in sorted(found)]

    def iteration_of(self, adapter: str | os.PathLike | None) -> int | None:
        """The iteration whose ``adapter/`` ``adapter`` is (None for the seed model or an adapter from
        elsewhere): e.g. which iteration the final adapter (keep_best may pick an earlier one) came from."""
        if not adapter:
            return None
        m = _ITER.match(Path(adapter).parent.name)
        return int(m.group(1)) if m and Path(adapter).name == "adapter" else None

    def eval(self, label: str) -> EvalDir:
        return EvalDir(self.path / "eval" / label)

    def final_comparisons(self) -> list[tuple[str, EvalDir]]:
        """(label, folder) of the finished evaluations outside an iteration: ``compare/*`` then ``eval/*``."""
        return _finished(self.path, "compare", "eval")

    def heldout_dirs(self) -> list[EvalDir]:
        """Every held-out result folder of the run, seed first."""
        return [self.eval_base, *(it.heldout for it in self.iterations()), self.eval_final]

    def read_run_record(self) -> dict | None:
        return read_json(self.run_record) if self.run_record.exists() else None

    def read_summary(self) -> dict | None:
        return read_json(self.summary) if self.summary.exists() else None

    def work(self) -> list[str]:
        """What an earlier start left here (the lock file and config temp files do not count)."""
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir()
                      if p.name != self.lock_file.name and not p.name.startswith(f".{self.config.name}."))

    @contextlib.contextmanager
    def lock(self):
        """Exclusive lock on the run directory, so two processes never append to the same files."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise TpoError("another tpo-lite process is working on this run directory", path=str(self.path)) \
                    from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
        finally:
            os.close(fd)  # closing releases the flock


class ExperimentDir(_Folder):
    """An experiment directory: two run directories and their comparisons (see :mod:`tpo_lite.experiment`)."""

    record = _At("experiment.json")
    table = _At("table1.md")
    judge_cache = _At("judge_cache.sqlite")

    def run(self, label: str) -> RunDir:
        return RunDir(self.path / label)


class SeedsDir(_Folder):
    """Runs of one config that differ only in their seeds (see :mod:`tpo_lite.seeds`): ``seed_<S>/`` run
    directories, the launcher's log of each run started in a child process, and the summary over seeds."""

    record = _At("seeds.json")
    table = _At("seeds.md")
    plot = _At("seeds.png")

    def run(self, seed: int) -> RunDir:
        return RunDir(self.path / f"seed_{seed}")

    def log(self, seed: int) -> Path:
        return self.path / f"seed_{seed}.log"


def resolve_run_dir(config, run_dir: str | os.PathLike | None = None) -> Path:
    """``run_dir`` if given, else ``<loop.runs_root>/<loop.name>``."""
    if run_dir is not None:
        return Path(run_dir)
    return Path(config.loop.runs_root) / config.loop.name
