"""Which instructions each iteration takes, the validation split, and the per-sample seeds.

Iteration t takes slice t of the (seed-shuffled) training set when ``loop.fresh_instructions``, wrapping around
when the set runs out; the last ``loop.validation_instructions`` of the shuffled order are set aside and never
planned. The order is recorded in run.json at the first start (:func:`instructions_record`) and followed from then
on, so a changed training file cannot reshuffle a running run; each iteration's plan is fixed in its plan.json.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from typing import TYPE_CHECKING

from .errors import TpoError
from .jsonl import write_json_atomic
from .rundir import RunDir

if TYPE_CHECKING:  # the config pulls in torch; `tpo-lite generate --help` must not
    from .config import RunConfig


def iteration_sample_seed(config: RunConfig, t: int, prompt_id: str, index: int) -> int:
    """Seed of sample ``index`` of ``prompt_id`` in iteration ``t``: :func:`tpo_lite.sampling.sample_seed` with
    run seed ``sampling.seed + t - 1`` (iteration 1 uses sampling.seed itself; later iterations draw fresh
    numbers even when they reuse an instruction). Independent of order, batching and resume."""
    from .sampling import sample_seed

    return sample_seed(config.sampling.seed + t - 1, prompt_id, index)


def load_train_instructions(config: RunConfig):
    from .instructions import embedded_path, load_instruction_source

    L = config.loop
    path = L.train_instructions or embedded_path("train")
    items = load_instruction_source(path, L.train_split, L.instruction_column, L.id_column, L.category_column)
    if not items:
        raise TpoError("no training instructions", path=str(path), field="loop.train_instructions")
    return items


def split_order(config: RunConfig, n: int) -> tuple[list[int], list[int]]:
    """(training, validation) indices into the training set: its seed-shuffled order, the last
    ``loop.validation_instructions`` of it set aside (so the training slices do not depend on the split)."""
    order = list(range(n))
    if config.loop.shuffle:
        random.Random(config.loop.seed).shuffle(order)
    v = config.loop.validation_instructions
    if v and v >= n:
        raise TpoError(f"{v} validation instructions leave none of the {n} training instructions to train on",
                       field="loop.validation_instructions")
    return order[:n - v], order[n - v:]


def instructions_record(config: RunConfig, instructions) -> dict:
    """The training set as the run depends on it (run.json): source, content hash, and the instruction ids in
    the order the iterations take them (plus the validation split)."""
    from .instructions import embedded_path

    content = [[i.id, i.instruction, i.category, list(i.checks or [])] for i in instructions]
    train, val = split_order(config, len(instructions))
    return {"source": str(config.loop.train_instructions or embedded_path("train")), "n": len(instructions),
            "sha256": hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest(),
            "train_order": [instructions[i].id for i in train], "validation": [instructions[i].id for i in val]}


def _ordered_split(config: RunConfig, run: RunDir | None, instructions) -> tuple[list, list]:
    """(training instructions in the order the iterations take them, validation instructions): the order
    recorded in the run's run.json when there is one, else :func:`split_order`."""
    rec = run.read_run_record() if run is not None else None
    if rec is None:
        train, val = split_order(config, len(instructions))
        return [instructions[i] for i in train], [instructions[i] for i in val]
    by_id = {i.id: i for i in instructions}
    then = rec["instructions"]
    gone = [x for x in then["train_order"] + then["validation"] if x not in by_id]
    if gone:
        raise TpoError(f"instruction {gone[0]!r} of this run's recorded order ({run.run_record}) is no "
                       f"longer in the training set ({len(gone)} gone); restore it or start a new run",
                       path=then["source"], field="loop.train_instructions")
    return [by_id[x] for x in then["train_order"]], [by_id[x] for x in then["validation"]]


def validation_split(config: RunConfig, instructions=None, run_dir=None) -> list:
    """The validation instructions (``loop.validation_instructions`` of the training set, never in a plan; in
    the order recorded in ``run_dir``'s run.json when given)."""
    if instructions is None:
        instructions = load_train_instructions(config)
    return _ordered_split(config, RunDir(run_dir) if run_dir is not None else None, instructions)[1]


def plan_slice(config: RunConfig, order: list[str], t: int) -> list[str]:
    """The instruction ids of ``order`` iteration ``t`` takes (slice t when ``fresh_instructions``, wrapping
    around when the set runs out; an id is never taken twice in one iteration)."""
    n = config.loop.prompts_per_iteration
    start = (t - 1) * n if config.loop.fresh_instructions else 0
    # prompts_per_iteration larger than the set: never sample an id twice
    return list(dict.fromkeys(order[(start + i) % len(order)] for i in range(n)))


def iteration_plan(config: RunConfig, run_dir, t: int, instructions=None) -> list[dict]:
    """The instructions of iteration ``t`` (as dicts), fixed in its plan.json on first use (see the module
    docstring)."""
    run = RunDir(run_dir)
    it = run.iteration(t)
    planned = it.read_plan()
    if planned is not None:
        return planned
    if instructions is None:
        instructions = load_train_instructions(config)
    order = _ordered_split(config, run, instructions)[0]
    n = config.loop.prompts_per_iteration
    start = (t - 1) * n if config.loop.fresh_instructions else 0
    if start + n > len(order):
        print(f"warning: iteration {t} needs instructions {start + 1}..{start + n} but the training set has "
              f"{len(order)}; wrapping around (instructions are reused)", file=sys.stderr)
    by_id = {inst.id: inst for inst in order}
    plan = [{"id": x, "instruction": by_id[x].instruction, "category": by_id[x].category,
             "checks": list(by_id[x].checks or [])} for x in plan_slice(config, list(by_id), t)]
    it.path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(it.plan, {"iteration": t, "instructions": plan})
    return plan
