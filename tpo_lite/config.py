"""Run configuration: one TOML file, one table per stage.

Each stage owns a ``@dataclass`` config in its own module (``PromptConfig`` in ``prompts``, ...; ``ModelConfig``
and ``TrainConfig`` in ``model_config`` and ``train_config``, which import no torch). :class:`RunConfig` composes
them as TOML tables ``[model] [prompts] [sampling] [judge] [pairs] [train] [loop] [eval]`` and the optional
``[eval_judge]``. Every field is an
:func:`tpo_lite.options.option` whose help text is its only documentation: ``tpo-lite run --list-options``, the resolved
``runs/NAME/config.toml`` and docs/running.md are generated from it.

Validation is strict: an unknown table or key, or a value of the wrong type, raises :class:`TpoError` naming
the file, the line of the offending key and the field (``section.key``). A stage config may validate values
further in ``__post_init__`` by raising ``ValueError``/``TypeError``/``TpoError``; the message is re-raised with
the file and line of the section. ``--set`` overrides are checked one by one for key and type only, then merged
into the file's tables, so ``__post_init__`` runs once on the merged values (options that depend on each other
can be set together); an error in a ``--set`` value names ``--set``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import TpoError, require_finite, require_seed
from .evaluate import EvalConfig
from .judges import JudgeConfig
from .model_config import ModelConfig
from .pairs import PairsConfig
from .prompts import PromptConfig
from .sampling import SamplingConfig
from .tracking import report_backends
from .train_config import TrainConfig
from .options import option


@dataclass
class LoopConfig:
    """The iteration loop and the run directory."""

    name: str = option("tpo", "Run name; the run directory is <runs_root>/<name>.")
    runs_root: str = option("runs",
        "Folder that holds run directories (relative paths are relative to the current directory).")
    iterations: int = option(1,
        "Number of TPO iterations (sample -> judge -> pairs -> DPO). Iteration t samples with the "
        "adapter of iteration t-1 and keeps training it.")
    prompts_per_iteration: int = option(32,
        "Training instructions sampled per iteration (each gets sampling.k outputs).")
    train_instructions: str = option("",
        "Training instructions: a JSONL/JSON file ({\"id\", \"instruction\", \"category\", \"checks\"}), "
        "or, with the optional `datasets` library (pip install 'tpo-lite[datasets]'), a .parquet/.csv/"
        ".tsv/.arrow file, a save_to_disk directory or a Hub dataset id (read from the HF cache when "
        "offline); empty = the embedded training set.")
    train_split: str = option("",
        "Split of a `datasets` source of train_instructions (e.g. 'train_prefs' for "
        "HuggingFaceH4/ultrafeedback_binarized); empty = its only split.")
    instruction_column: str = option("instruction",
        "Field (column) of train_instructions that holds the instruction text, e.g. 'prompt' for "
        "UltraFeedback.")
    id_column: str = option("id",
        "Field (column) of train_instructions with unique instruction ids (the key of every record of a "
        "run). A `datasets` source without it gets ids row-<index>; a JSON/JSONL file must have it.")
    category_column: str = option("category",
        "Field (column) of train_instructions with the category (optional; missing = 'uncategorised').")
    fresh_instructions: bool = option(True,
        "Use new training instructions in every iteration (as the paper does); false = the same "
        "prompts_per_iteration instructions every iteration. When the set runs out it wraps around "
        "(with a warning).")
    shuffle: bool = option(True, "Shuffle the training set (with loop.seed) before slicing it into iterations.")
    eval_before: bool = option(True,
        "Score the seed model (no adapter) on the held-out set before iteration 1 (the set, decoding, "
        "judge comparison and CIs come from the [eval] table; the judge from loop.heldout_judge).")
    eval_after: bool = option(True, "Score the final model on the held-out set after the last iteration.")
    eval_every_iteration: bool = option(False,
        "Score the held-out set after every iteration (otherwise only after the last one).")
    heldout_judge: Literal["auto", "programmatic", "judge"] = option("auto",
        "Judge of the held-out before/after score: 'programmatic' (verifiable checks; mean fraction "
        "passed, an invalid output scores 0), 'judge' (the evaluation judge: [eval_judge] if the config "
        "has that table, else [judge]), or 'auto' = programmatic when every held-out instruction has "
        "checks, else the evaluation judge.", choices=("auto", "programmatic", "judge"))
    validation_instructions: int = option(0,
        "Instructions carved out of the training set (the last N of its seed-shuffled order), never "
        "trained on: after every iteration the model is scored on them like on the held-out set "
        "(iter_XX/validation/, the 'validation score' row). keep_best selects on this score, so the "
        "reported held-out score is not the one the choice was made on. 0 = no validation split.")
    keep_best: bool = option(False,
        "Carry forward the adapter with the best validation score (needs validation_instructions > 0) "
        "instead of the last one; the final model is then that adapter, and its held-out score is "
        "reported. false = each iteration continues from the previous one (the paper).")
    seed: int = option(0,
        "Seed of the training-instruction shuffle (per-sample seeds come from sampling.seed); "
        "0 .. 2**32 - 1.")
    report_to: str | list[str] = option(factory=list, help=
        "Experiment trackers that get the run's metrics: 'tensorboard', 'trackio', 'wandb' (one name or a "
        "list; [] or 'none' = none). Each needs its package (`pip install tensorboard`, ...). Sent: every "
        "DPO step's loss, margins, accuracy, rewards, lr and grad norm (x = DPO steps counted across "
        "iterations), every number of each iteration's metrics.json (x = iteration; valid / forced / "
        "cut-off rates, thought and response lengths, pair stats, held-out score, step 0 = the seed "
        "model) and the final held-out score and change. A resume sends nothing twice; a tracker error "
        "is a warning, never a stopped run. wandb follows its own variables (WANDB_MODE=offline, "
        "WANDB_PROJECT, ...); docs/running.md.")
    tracking_dir: str = option("",
        "Folder of this run's tracking files (tensorboard/ event files, wandb files, logged.json: what "
        "was sent, so a resume sends nothing twice); empty = <run_dir>/tracking.")
    stage_processes: bool = option(True,
        "Run each stage (generate, judge, pairs, train, the held-out and validation scores, the start's "
        "checks) in a fresh process that exits when it is done, so every stage starts from a clean heap "
        "and the run's memory peak is its largest stage's plus this driver process, which loads no "
        "model. In one process each stage's peak lands on what glibc kept from the stages before (the "
        "default run's final held-out eval peaked at 1.8x its DPO stage). Each start costs a few "
        "seconds (importing torch). false = all in this process (debuggers, profilers); "
        "tpo_lite.loop.run with an injected sampler or judge always runs in-process. Never changes what "
        "a run writes.")

    def __post_init__(self):
        require_finite(self)  # no float option today; one added later is checked too
        require_seed(self)
        report_backends(self.report_to)  # an unknown tracker name fails here, with the file and line
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise TpoError(f"must be a plain folder name, got {self.name!r}", field="name")
        for f in ("instruction_column", "id_column", "category_column"):
            if not getattr(self, f).strip():
                raise TpoError("must name a field (column)", field=f)
        for f in ("iterations", "prompts_per_iteration"):
            if getattr(self, f) < 1:
                raise TpoError(f"must be >= 1, got {getattr(self, f)}", field=f)
        if self.validation_instructions < 0:
            raise TpoError(f"must be >= 0, got {self.validation_instructions}", field="validation_instructions")
        if self.keep_best and self.validation_instructions < 1:
            # Selecting on the reported held-out set would bias the reported score upwards.
            raise TpoError("needs loop.validation_instructions > 0 (the adapter is chosen on a validation split "
                           "of the training set, never on the reported held-out set)", field="keep_best")


# Tables that are None unless the config has them (absent means something else than "all defaults").
UNSET_SECTIONS: dict[str, str] = {
    "eval_judge": "Optional: a separate judge for evaluations (`tpo-lite eval`, `tpo-lite experiment`, the held-out "
                  "score with loop.heldout_judge = 'judge'), with the options of [judge]. Absent = [judge] judges "
                  "evaluations too (a learned [judge] then measures reward hacking, not quality).",
}


@dataclass(frozen=True)
class RunConfig:
    """All stage configs of one run, one field per TOML table (``cfg.model``, ``cfg.train``, ...).

    ``eval_judge`` is None when the config has no ``[eval_judge]`` table. ``source`` is the TOML file it was
    loaded from (None for defaults); ``overridden`` the ``(table, key)`` pairs that came from ``--set`` (see
    :meth:`origin`); neither takes part in equality.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    eval_judge: JudgeConfig | None = None
    source: str | None = field(default=None, compare=False)
    overridden: frozenset = field(default=frozenset(), compare=False)

    def origin(self, section: str, key: str) -> str | None:
        """Where option ``section.key`` was set: ``"--set"`` or the config file (for error messages)."""
        return "--set" if (section, key) in self.overridden else self.source

    @classmethod
    def default(cls) -> "RunConfig":
        return cls()

    def sections(self) -> dict[str, Any]:
        """``{table: stage config or None}`` in table order."""
        return {name: getattr(self, name) for name in SECTIONS}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(obj) for name, obj in self.sections().items() if obj is not None}

    def replace(self, section: str, **changes) -> "RunConfig":
        """A copy with options of table ``section`` changed (an unset optional table starts from its defaults)."""
        if section not in SECTIONS:
            raise TpoError(f"unknown table; expected one of {', '.join(SECTIONS)}", field=section)
        old = getattr(self, section)
        new = dataclasses.replace(old, **changes) if old is not None else SECTIONS[section](**changes)
        return dataclasses.replace(self, **{section: new})


def _section_type(tp) -> type:
    return next(a for a in typing.get_args(tp) if a is not type(None)) if typing.get_args(tp) else tp


# table -> its dataclass, in table order: the fields of RunConfig.
SECTIONS: dict[str, type] = {name: _section_type(tp) for name, tp in typing.get_type_hints(RunConfig).items()
                             if name not in ("source", "overridden")}


# ---------------------------------------------------------------------------------------------- type checking

def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "table"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp):
    """Return ``value`` converted to ``tp`` or raise ValueError. TOML ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # Exact type matches first so `float | str` keeps "auto" a str and 0.1 a float.
        for a in args:
            if isinstance(a, type) and a is not type(None) and type(value) is a:
                return value
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except ValueError:
                pass
        raise ValueError
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ValueError
        args = typing.get_args(tp)
        items = [_coerce(v, args[0]) for v in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ValueError


def _find_line(text: str, section: str, key: str | None = None) -> int | None:
    """Line (1-based) of ``key`` in table ``[section]`` (or of the table header when key is None)."""
    current = None
    header_line = None
    key_re = re.compile(r'^\s*("?)' + re.escape(key) + r'\1\s*=') if key else None
    for i, line in enumerate(text.splitlines(), start=1):
        m = re.match(r"^\s*\[\s*([A-Za-z0-9_\-]+)\s*\]", line)
        if m:
            current = m.group(1)
            if current == section and header_line is None:
                header_line = i
            continue
        if key_re is not None and current == section and key_re.match(line):
            return i
        # dotted form at top level: section.key = ...
        if key and current is None and re.match(r"^\s*" + re.escape(section) + r"\s*\.\s*" + re.escape(key)
                                                + r"\s*=", line):
            return i
    return header_line


# Names of TRL's DPOConfig / transformers' TrainingArguments / peft's LoraConfig / TRL's GRPOConfig that
# tpo-lite calls differently: name -> "table.key" (an unknown option suggests it).
FOREIGN_NAMES = {
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_checkpointing": "train.grad_checkpointing",
    "lr_scheduler_type": "train.lr_schedule",
    "rpo_alpha": "train.nll_weight",
    "model_name_or_path": "model.path",
    "r": "model.lora_r",
    "bnb_4bit_use_double_quant": "model.double_quant",
    "num_generations": "sampling.k",
}


def suggest_option(section: str, key: str) -> str:
    """The option an unknown ``section.key`` probably meant, as it would be written in ``[section]``
    (``epochs``) or elsewhere (``train.epochs``); "" when nothing is close. Looks at: TRL / transformers / peft
    names (:data:`FOREIGN_NAMES`), the same key in another table, then close spellings (difflib)."""
    import difflib

    def where(target: str) -> str:
        sec, k = target.split(".", 1)
        return k if sec == section else target

    if key in FOREIGN_NAMES:
        return where(FOREIGN_NAMES[key])
    own = [f.name for f in dataclasses.fields(SECTIONS[section]) if f.init] if section in SECTIONS else []
    close = difflib.get_close_matches(key, own, n=3, cutoff=0.6)
    if close:
        return " or ".join(close)
    elsewhere = [f"{sec}.{key}" for sec, cls in SECTIONS.items() if sec != section
                 and key in {f.name for f in dataclasses.fields(cls) if f.init}]
    if elsewhere:
        return " or ".join(elsewhere)
    every = {f"{sec}.{f.name}": f.name for sec, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.init}
    close = difflib.get_close_matches(key, list(every.values()), n=1, cutoff=0.75)
    return next((where(t) for t, k in every.items() if close and k == close[0]), "")


def field_choices(f: dataclasses.Field, tp=None) -> tuple | None:
    """The allowed values of an enum-like option: its ``metadata["choices"]``, else the values of a plain
    ``Literal`` type; None for other options. Validation and ``--list-options`` both read it."""
    if f.metadata.get("choices"):
        return tuple(f.metadata["choices"])
    if tp is not None and typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    return None


def check_values(cls, values: dict, name: str, path: str | None = None, text: str = "") -> dict:
    """``values`` checked against dataclass ``cls`` one by one (known key, type, choices; no cross-field
    checks): the constructor keyword arguments."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        line = _find_line(text, name, key) if text else None
        if key not in fields:
            hint = suggest_option(name, key)
            raise TpoError(f"unknown option{f' (did you mean {hint}?)' if hint else ''}; see `tpo-lite run "
                           "--list-options`", path=path, line=line, field=f"{name}.{key}")
        tp = hints.get(key, Any)
        try:
            kwargs[key] = _coerce(value, tp)
        except ValueError:
            raise TpoError(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", path=path,
                           line=line, field=f"{name}.{key}") from None
        choices = field_choices(fields[key], tp)
        if choices and kwargs[key] not in choices:
            raise TpoError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}", path=path,
                           line=line, field=f"{name}.{key}")
    return kwargs


def build_section(cls, values: dict, name: str, path: str | None = None, text: str = "",
                  set_keys: frozenset = frozenset()):
    """Build dataclass ``cls`` from ``values`` with strict key and type checks, then its own cross-field checks.

    ``set_keys`` holds the ``(section, key)`` pairs that came from ``--set``; an error in one of them names
    ``--set``, an error elsewhere in a table that has ``--set`` keys names them too.
    """
    kwargs = check_values(cls, values, name, path, text)
    from_set = sorted(f"{name}.{k}" for s, k in set_keys if s == name)
    note = f" (with --set {', '.join(from_set)})" if from_set else ""
    try:
        return cls(**kwargs)
    except TpoError as e:
        fld = f"{name}.{e.field}" if e.field else name
        if (name, e.field) in set_keys:
            raise TpoError(e.message, path="--set", field=fld) from None
        line = _find_line(text, name, e.field) if text else None
        raise TpoError(e.message + note, path=path, line=line, field=fld) from None
    except (ValueError, TypeError) as e:
        line = _find_line(text, name) if text else None
        raise TpoError(str(e) + note, path=path, line=line, field=name) from None


def parse_set(assignment: str) -> tuple[str, str, Any]:
    """Parse ``section.key=value`` (value in TOML syntax; a bare word is taken as a string)."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise TpoError(f"expected section.key=value, got {assignment!r}", path="--set")
    lhs, raw = assignment.split("=", 1)
    section, key = (s.strip() for s in lhs.split(".", 1))
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                name: str | None = None) -> RunConfig:
    """Load, validate and resolve a run config.

    ``path`` is a TOML file (None = all defaults). ``overrides`` are ``section.key=value`` strings applied on
    top (``--set``); ``name`` overrides ``loop.name``. Raises :class:`TpoError` on any bad input.
    """
    text, data, src = "", {}, None
    if path is not None:
        src = os.fspath(path)
        try:
            with open(src, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise TpoError("config file not found", path=src) from None
        except IsADirectoryError:
            raise TpoError("is a directory, expected a TOML file", path=src) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TpoError(f"not UTF-8 text ({e})", path=src) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
            msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(e))
            if m:
                msg += f" (column {m.group(2)})"
            raise TpoError(f"invalid TOML: {msg}", path=src, line=int(m.group(1)) if m else None) from None
    classes = SECTIONS
    for sec, val in data.items():
        if sec not in classes:
            raise TpoError(f"unknown table; expected one of {', '.join('[' + s + ']' for s in classes)}",
                           path=src, line=_find_line(text, sec), field=sec)
        if not isinstance(val, dict):
            raise TpoError("expected a table", path=src, line=_find_line(text, sec, None), field=sec)
    # Overrides: keys/types checked one by one with "--set" as the location; the checks between options run
    # once on the merged tables (a --set value is checked against the file's other values, not the defaults).
    merged = {sec: dict(v) for sec, v in data.items()}
    set_keys: set[tuple[str, str]] = set()
    for a in overrides:
        sec, key, value = parse_set(a)
        if sec not in classes:
            raise TpoError(f"unknown table {sec!r}", path="--set", field=f"{sec}.{key}")
        check_values(classes[sec], {key: value}, sec, path="--set")
        merged.setdefault(sec, {})[key] = value
        set_keys.add((sec, key))
    if name is not None:
        merged.setdefault("loop", {})["name"] = name
        set_keys.add(("loop", "name"))
    sections = {}
    for sec, cls in classes.items():
        if sec in UNSET_SECTIONS and sec not in merged:
            sections[sec] = None
            continue
        vals = merged.get(sec, {})
        # Errors in values that came from --set are reported against --set, the rest against the file.
        sections[sec] = build_section(cls, vals, sec, path=src, text=text, set_keys=frozenset(set_keys))
    return RunConfig(**sections, source=src, overridden=frozenset(set_keys))


# ------------------------------------------------------------------------------------------------- writing

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _wrap(text: str, width: int = 110, prefix: str = "# ") -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=prefix, subsequent_indent=prefix) or [prefix.rstrip()]


def to_toml(cfg: RunConfig, with_help: bool = True) -> str:
    """The resolved config as TOML (every option, with its help text as a comment). None values, which TOML
    cannot hold, are written commented out and read back as the field default (None)."""
    out = ["# Resolved tpo-lite run config (every option; help text from the code)."]
    for sec, obj in cfg.sections().items():
        out.append("")
        if obj is None:  # an unset optional table: say it exists, write nothing TOML would read back
            out.extend(_wrap(f"[{sec}] (not set) {UNSET_SECTIONS.get(sec, '')}".rstrip()))
            continue
        out.append(f"[{sec}]")
        for f in dataclasses.fields(obj):
            if not f.init:
                continue
            v = getattr(obj, f.name)
            if with_help and f.metadata.get("help"):
                out.extend(_wrap(f.metadata["help"]))
            if v is None:
                out.append(f"# {f.name} = (unset)")
            else:
                out.append(f"{f.name} = {_toml_value(v)}")
    return "\n".join(out) + "\n"


def options_reference(markdown: bool = False) -> str:
    """Every option of every table with its type, default and help (generated from the dataclasses)."""
    lines = []
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        note = UNSET_SECTIONS.get(sec)
        if markdown:
            lines += ["", f"### [{sec}]", ""] + ([note, ""] if note else []) + [
                "| option | type | default | meaning |", "|---|---|---|---|"]
        else:
            lines += ["", f"[{sec}]"] + (_wrap(note, width=100, prefix="  ") if note else [])
        doc = (cls.__doc__ or "").strip().splitlines()
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                d = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                d = f.default_factory()  # type: ignore[misc]
            else:
                d = "(required)"
            dv = "(unset)" if d is None else (_toml_value(d) if not isinstance(d, str) or d else '""')
            help_ = f.metadata.get("help", "(undocumented)")
            tn = _type_name(hints.get(f.name, Any))
            choices = field_choices(f, hints.get(f.name))
            if choices:
                help_ += f" Choices: {', '.join(map(str, choices))}."
            if markdown:
                lines.append(f"| `{f.name}` | {tn} | `{dv}` | {help_.replace('|', '/')} |")
            else:
                lines.append(f"  {f.name} ({tn}, default {dv})")
                lines.extend(_wrap(help_, width=100, prefix="      "))
        if doc and not markdown:
            pass
    return "\n".join(lines).lstrip("\n") + "\n"
