"""Experiment tracking: a run's metrics sent to TensorBoard, Trackio or Weights & Biases (``loop.report_to``).

What is logged, and on which step axis:

* every DPO optimizer step, at the *global DPO step*: ``dpo/<key>`` for each number of the step's record in
  ``iter_XX/adapter/history.json`` (loss, margins, accuracy, rewards/chosen, rewards/rejected, logps/chosen,
  logps/rejected, lr, grad_norm, epoch, nll with RPO). Step s of iteration t is at global step s + the steps of
  iterations 1 .. t-1 (read from their train markers), so the axis runs on across iterations and a resumed run
  continues it where the uninterrupted run would have;
* every iteration t, at step t: each number of ``iter_XX/metrics.json`` under its JSON path (``generate/valid_rate``,
  ``generate/forced_rate``, ``generate/cut_off_rate``, ``generate/thought_chars_mean``, ``pairs/pairs_kept``,
  ``pairs/chosen_score_mean``, ``pairs/chosen_response_chars``, ``train/metrics/loss``, ``heldout/mean_score``,
  ``validation/mean_score``, ...; the ``memory`` records are left out);
* the seed model's held-out score at step 0 (``heldout/mean_score``, ``heldout/valid_rate``, ``heldout/n``), so the
  held-out curve starts at the model before training; at the end, at step ``loop.iterations``, the numbers of
  summary.json's ``heldout_after`` and ``heldout_change`` (``heldout_after/mean_score``,
  ``heldout_change/score_diff``, ...).

Resume: ``<tracking_dir>/logged.json`` keeps, per backend, the last step sent of each tag; a value at a step not
above it is never sent again (a resumed DPO recomputes the steps after its checkpoint exactly, so they were
sent already), and at the end of each iteration every step of its history.json not sent yet is (a backend added
on resume gets the earlier iterations then). Nothing in memory counts steps.

Tracking never stops a run: a missing package is a :class:`TpoError` before the run starts (naming
``loop.report_to`` and the pip command); any later error of a backend is one warning, and that backend is left
out for the rest of the call.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import uuid
from pathlib import Path
from typing import Callable, Iterable

from .errors import TpoError
from .jsonl import read_json, write_json_atomic
from .rundir import RunDir

BACKENDS = ("tensorboard", "trackio", "wandb")
# the module a backend imports -> the pip package that provides it
_PACKAGE = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def report_backends(report_to) -> tuple[str, ...]:
    """``loop.report_to`` (a name or a list of names; ``"none"`` or empty = none) as backend names, in order."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    out: list[str] = []
    for n in names:
        if n in ("", "none"):
            continue
        if n not in BACKENDS:
            raise TpoError(f"unknown tracker {n!r}; expected {', '.join(map(repr, BACKENDS))} (one name or a list; "
                           "'none' or [] = none)", field="report_to")
        if n not in out:
            out.append(n)
    return tuple(out)


def tracking_dir(config, run_dir) -> Path:
    """``loop.tracking_dir``, or ``<run_dir>/tracking`` when it is empty."""
    return Path(config.loop.tracking_dir) if config.loop.tracking_dir else RunDir(run_dir).tracking


def _missing(name: str, config) -> TpoError:
    return TpoError(f"{name!r} needs the {_PACKAGE[name]} package, which is not installed: "
                    f"`pip install {_PACKAGE[name]}` (or take {name!r} out of loop.report_to)",
                    path=config.origin("loop", "report_to"), field="loop.report_to")


def check_backends(config) -> tuple[str, ...]:
    """The backends of ``config.loop.report_to``; a :class:`TpoError` for one whose package is not installed
    (found without importing it, so the dry run stays fast)."""
    names = report_backends(config.loop.report_to)
    for name in names:
        try:
            found = importlib.util.find_spec(_PACKAGE[name]) is not None
        except ValueError:  # imported already, without a spec
            found = True
        except ImportError:
            found = False
        if not found:
            raise _missing(name, config)
    return names


def describe(config, run_dir) -> str:
    """One line for ``--dry-run``: which trackers get the metrics, and where their files go."""
    names = check_backends(config)
    if not names:
        return "tracking: none (loop.report_to)"
    return f"tracking: {', '.join(names)} (files in {tracking_dir(config, run_dir)})"


def _import(name: str, config):
    try:
        if name == "tensorboard":
            importlib.import_module("tensorboard")
            return importlib.import_module("torch.utils.tensorboard")
        return importlib.import_module(name)
    except ImportError:
        raise _missing(name, config) from None


# ------------------------------------------------------------------------------------------------ backends

class Tracker:
    """One tracking backend: ``log`` scalars at a step, ``flush``, ``close``.

    ``axis`` is ``"dpo"`` (the global DPO step) or ``"iteration"`` (the iteration; 0 = the seed model): backends
    with one step per row (wandb) plot each against its own step metric."""

    name = ""

    def log(self, scalars: dict[str, float], step: int, axis: str) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was logged durable (before logged.json says it was sent)."""

    def close(self) -> None:
        self.flush()


class TensorBoardTracker(Tracker):
    """Event files in ``<tracking_dir>/tensorboard`` (``tensorboard --logdir`` that folder or a parent)."""

    name = "tensorboard"

    def __init__(self, module, log_dir: Path):
        self.writer = module.SummaryWriter(log_dir=str(log_dir))

    def log(self, scalars, step, axis):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    """A wandb run named ``loop.name`` (project ``$WANDB_PROJECT``, else ``tpo-lite``), resumed under the id kept
    in logged.json. wandb reads its own variables (WANDB_MODE=offline or disabled, WANDB_DIR, WANDB_ENTITY, ...);
    its files go to ``<tracking_dir>`` unless WANDB_DIR is set."""

    name = "wandb"
    STEP = {"dpo": "dpo/step", "iteration": "iteration"}

    def __init__(self, module, name: str, run_id: str, folder: Path, config: dict):
        kw = {} if os.environ.get("WANDB_DIR") else {"dir": str(folder)}
        self.run = module.init(project=os.environ.get("WANDB_PROJECT") or "tpo-lite", name=name, id=run_id,
                               resume="allow", config=config, **kw)
        self.run.define_metric("dpo/step")
        self.run.define_metric("dpo/*", step_metric="dpo/step")
        self.run.define_metric("iteration")
        self.defined = {"dpo"}

    def log(self, scalars, step, axis):
        for prefix in {tag.split("/")[0] for tag in scalars} - self.defined:
            self.run.define_metric(f"{prefix}/*", step_metric=self.STEP[axis])
            self.defined.add(prefix)
        self.run.log({**scalars, self.STEP[axis]: step})

    def close(self):
        self.run.finish()


class TrackioTracker(Tracker):
    """A trackio run named ``loop.name`` in project ``$TRACKIO_PROJECT`` (else ``tpo-lite``), resumed by name;
    trackio keeps its own storage (``trackio show``)."""

    name = "trackio"

    def __init__(self, module, name: str, config: dict):
        self.module = module
        self.run = module.init(project=os.environ.get("TRACKIO_PROJECT") or "tpo-lite", name=name, config=config,
                               resume="allow")

    def log(self, scalars, step, axis):
        self.module.log(dict(scalars), step=step)

    def close(self):
        self.module.finish()


# ------------------------------------------------------------------------------------------- what is logged

def numbers(obj: dict, prefix: str = "") -> dict[str, float]:
    """Every number of ``obj`` (nested dicts flattened, keys joined with ``/``), without bools, lists and the
    ``memory`` records."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        if k == "memory":
            continue
        if isinstance(v, dict):
            out.update(numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def dpo_scalars(rec: dict) -> dict[str, float]:
    """A history.json record as ``dpo/<key>`` scalars (its ``step`` is the axis)."""
    return {f"dpo/{k}": v for k, v in numbers(rec).items() if k != "step"}


def dpo_step_offset(run_dir, t: int) -> int:
    """The global DPO step before iteration ``t``'s first step: the optimizer steps of iterations 1 .. t-1, as
    their train markers record them (an iteration with no pairs trained 0). Iteration t starts only after
    t-1's train stage is done, so the markers are there."""
    run, total = RunDir(run_dir), 0
    for s in range(1, t):
        d = run.iteration(s)
        if d.is_done("train"):
            total += int((d.read_marker("train").get("metrics") or {}).get("steps") or 0)
    return total


# ----------------------------------------------------------------------------------------------- the run

class RunTracking:
    """The backends of ``loop.report_to`` for one call of :func:`tpo_lite.loop.run` (a context manager).

    Creating it only checks that the packages are installed; the backends open on the first value logged. With
    no backend every method does nothing and nothing is written."""

    def __init__(self, config, run_dir, echo: Callable[[str], None] = print):
        self.names = check_backends(config)
        self.config, self.run_dir, self.echo = config, Path(run_dir), echo
        self.folder = tracking_dir(config, run_dir)
        self.state_path = self.folder / "logged.json"
        self.backends: list[Tracker] | None = None  # None = not opened yet
        self.state: dict = {}
        self.state_warned = False
        self._offsets: dict[int, int] = {}

    def __enter__(self) -> "RunTracking":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the hooks of the loop

    def log_heldout_before(self, result: dict | None) -> None:
        """The seed model's held-out score, at iteration step 0 (``heldout/*``, as in metrics.json)."""
        if result is not None:
            from .metrics import heldout_stats

            self._log([(numbers({"heldout": heldout_stats(result)}), 0)], "iteration")

    def dpo_step_logger(self, t: int) -> Callable[[list[dict]], None] | None:
        """The ``on_step`` hook of iteration ``t``'s DPO (:func:`tpo_lite.train.train_iteration`): sends the
        steps of the history so far not sent yet. None when nothing is tracked."""
        if not self.names:
            return None
        return lambda history: self._guard(lambda: self._log_dpo(t, history))

    def log_iteration(self, t: int, metrics: dict) -> None:
        """After iteration ``t``: its DPO steps not sent yet (history.json), then metrics.json at step t."""
        if not self.names:
            return
        history = RunDir(self.run_dir).iteration(t).adapter / "history.json"
        if history.is_file():
            self._guard(lambda: self._log_dpo(t, read_json(history)))
        self._log([(numbers({k: v for k, v in metrics.items() if k != "iteration"}), t)], "iteration")

    def log_summary(self, summary: dict, iterations: int) -> None:
        """The run's end, at step ``iterations``: ``heldout_after/*`` (as metrics.json keeps a held-out result)
        and ``heldout_change/*`` (summary.json)."""
        from .metrics import heldout_stats

        ends = {}
        if summary.get("heldout_after"):
            ends["heldout_after"] = heldout_stats(summary["heldout_after"])
        if summary.get("heldout_change"):
            ends["heldout_change"] = summary["heldout_change"]
        if ends:
            self._log([(numbers(ends), iterations)], "iteration")

    def close(self) -> None:
        for b in list(self.backends or []):
            self._call(b, b.close)
        self.backends = []

    # -- internals

    def _log_dpo(self, t: int, history: Iterable[dict]) -> None:
        if t not in self._offsets:
            self._offsets[t] = dpo_step_offset(self.run_dir, t)
        self._log([(dpo_scalars(rec), self._offsets[t] + int(rec["step"])) for rec in history], "dpo")

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- tracking never stops a run
            self._warn("tracking", e)
            self.names = ()  # nothing more is sent
            self.close()

    def _warn(self, what: str, e: Exception, then: str = "the run goes on without it") -> None:
        self.echo(f"warning: {what} failed ({type(e).__name__}: {e}); {then}")

    def _call(self, backend: Tracker, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 -- a backend's error is one warning, then it is left out
            self._warn(f"tracking with {backend.name} (loop.report_to)", e)
            if self.backends and backend in self.backends:
                self.backends.remove(backend)
            return False

    def _open(self) -> list[Tracker]:
        if self.backends is not None:
            return self.backends
        self.backends = []
        try:
            self.state = read_json(self.state_path) if self.state_path.is_file() else {}
        except Exception as e:  # noqa: BLE001 -- a torn state file: send again rather than stop
            self._warn(f"reading {self.state_path}", e, "every value is sent again")
            self.state = {}
        self.state.setdefault("last_step", {})
        if "wandb" in self.names and not self.state.get("wandb_id"):
            self.state["wandb_id"] = uuid.uuid4().hex[:12]
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            try:
                self.backends.append(self._start(name, _import(name, self.config)))
            except Exception as e:  # noqa: BLE001 -- e.g. wandb not logged in: the run goes on
                self._warn(f"starting {name} (loop.report_to)", e)
        return self.backends

    def _start(self, name: str, module) -> Tracker:
        if name == "tensorboard":
            return TensorBoardTracker(module, self.folder / "tensorboard")
        if name == "wandb":
            return WandbTracker(module, self.config.loop.name, self.state["wandb_id"], self.folder,
                                self.config.to_dict())
        return TrackioTracker(module, self.config.loop.name, self.config.to_dict())

    def _log(self, rows: list[tuple[dict[str, float], int]], axis: str) -> None:
        """Send ``rows`` of (scalars, step) to every backend, each value only if its step is above the last one
        sent of its tag; then flush and record the new last steps in logged.json."""
        if not self.names:
            return
        self._guard(lambda: self._send(rows, axis))

    def _send(self, rows, axis: str) -> None:
        backends = self._open()
        changed = False
        for b in list(backends):
            last = self.state["last_step"].setdefault(b.name, {})
            sent: dict[str, int] = {}
            ok = True
            for scalars, step in rows:
                todo = {k: v for k, v in scalars.items() if step > max(last.get(k, -1), sent.get(k, -1))}
                if todo and not (ok := self._call(b, b.log, todo, step, axis)):
                    break
                sent.update(dict.fromkeys(todo, step))
            if ok and sent and self._call(b, b.flush):
                last.update(sent)
                changed = True
        if changed:
            try:
                write_json_atomic(self.state_path, self.state)
            except Exception as e:  # noqa: BLE001 -- without the record a resume may send some steps twice
                if not self.state_warned:
                    self._warn(f"writing {self.state_path}", e, "a resume may send some values twice")
                self.state_warned = True
