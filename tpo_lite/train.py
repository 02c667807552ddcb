"""DPO training of one TPO iteration on a (Q)LoRA adapter, from cached reference log-probs.

:func:`train_iteration` does, in order:

1. load the model with the adapter the iteration's data was sampled with (``init_adapter``; a new LoRA in
   iteration 1, whose B matrices are zero, so it equals the base);
2. compute the reference log-probs of every chosen / rejected completion ONCE with that model as loaded
   (eval mode, adapters off when there was no ``init_adapter``), with the same dtype and the same op as the
   training pass, and cache them in ``out_dir/ref_logps.pt`` keyed by ``prompt_id`` (a resumed run reuses
   them);
3. train DPO with :func:`tpo_lite.ops.fused_dpo_loss`: the model body gives final hidden states and only
   the completion positions go through the LM head (the prompt is masked; the sampled token ids are used as
   they are, EOS included when the sample ended with one -- never re-tokenised text). The mean margin of the
   first optimizer step, before any update, is the *initial margin*; it is 0 (exactly, in fp32 on the CPU)
   since policy = reference (``disable_dropout`` zeroes every dropout, so train mode computes what the
   eval-mode reference did);
4. save ``out_dir/adapter`` (peft ``save_pretrained``) and, last, ``out_dir/adapter/DONE`` holding the
   returned metrics. When that marker exists, :func:`train_iteration` returns its metrics without training.

Every ``checkpoint_every`` optimizer steps the whole training state (LoRA weights, AdamW and LR-schedule state,
RNG states, the position in the epoch, the per-step metrics so far) is written atomically to
``out_dir/dpo_checkpoint.pt``. A run killed midway resumes from it (the reference cache is reused too) and,
since each epoch's pair order is a function of ``seed``, ends with the adapter an uninterrupted run gives, bit
for bit on the same machine and thread count. A checkpoint of other settings (model, start adapter, [train]
options, pairs) is ignored with a warning. The adapter directory is written under a temporary name and renamed
into place; the checkpoint is deleted once the adapter and its DONE marker are written.

A non-finite loss or gradient norm, or LoRA weights that overflowed, stop training with a :class:`TpoError`
naming the optimizer step: nothing of the iteration is saved (no adapter, no DONE marker) and no checkpoint
holds non-finite weights.

Sequences longer than ``max_length`` are cut: the completion keeps at least ``max_length // 2`` tokens (its
end is dropped) and the prompt keeps its last tokens.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from tpo_lite.errors import TpoError
from tpo_lite.jsonl import read_json, write_atomic, write_json_atomic
from tpo_lite.rundir import IterationDir
from .train_config import SCHEDULES, TrainConfig  # noqa: F401
REF_CACHE_VERSION = 1
# |initial margin| above this (reward units, i.e. beta * log-ratio) means policy and reference disagree
# before training: a different model, adapter or precision was used for the reference.
INITIAL_MARGIN_TOLERANCE = 0.05


# ------------------------------------------------------------------------------------------------ the data

@dataclass
class _Pair:
    pid: str
    chosen: tuple[list[int], list[int]]  # (prompt ids, completion ids) after truncation
    rejected: tuple[list[int], list[int]]


def truncate(prompt: list[int], completion: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Cut ``prompt + completion`` to ``max_length`` tokens (see the module doc for the rule)."""
    if len(prompt) + len(completion) <= max_length:
        return prompt, completion
    keep_c = min(len(completion), max(max_length - len(prompt), max_length // 2))
    return prompt[len(prompt) - (max_length - keep_c):], completion[:keep_c]


def _token_list(rec: dict, key: str, i: int, source: Optional[str], vocab: int) -> list[int]:
    ids = rec.get(key)
    where = {"path": source, "field": f"pairs[{i}].{key}"}
    if not isinstance(ids, list) or not ids:
        raise TpoError(f"expected a non-empty list of token ids, got {ids!r:.40}", **where)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab:
            raise TpoError(f"token id {t!r} is not an integer in [0, {vocab}) (the model's vocabulary)", **where)
    return ids


def prepare_pairs(pairs: list[dict], max_length: int, vocab: int, source: Optional[str] = None) -> list[_Pair]:
    """Validate pair records (schema in docs/ARCHITECTURE.md) and truncate them.

    Errors name ``source`` and the field as ``pairs[i].key`` (i = 0-based index of the record in ``pairs``).
    """
    out, seen = [], set()
    for i, rec in enumerate(pairs):
        if not isinstance(rec, dict):
            raise TpoError(f"expected a JSON object, got {type(rec).__name__}", path=source, field=f"pairs[{i}]")
        pid = rec.get("prompt_id")
        if not isinstance(pid, str) or not pid:
            raise TpoError(f"missing or empty, got {pid!r}", path=source, field=f"pairs[{i}].prompt_id")
        if pid in seen:
            raise TpoError(f"duplicate pair {pid!r}", path=source, field=f"pairs[{i}].prompt_id")
        seen.add(pid)
        prompt = _token_list(rec, "prompt_token_ids", i, source, vocab)
        chosen = _token_list(rec, "chosen_token_ids", i, source, vocab)
        rejected = _token_list(rec, "rejected_token_ids", i, source, vocab)
        out.append(_Pair(pid, truncate(prompt, chosen, max_length), truncate(prompt, rejected, max_length)))
    return out


def collate(seqs: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict:
    """Right-padded batch of (prompt, completion) sequences plus the flat rows that score the completions.

    ``rows[M]`` index the flattened [S*T] hidden states at the positions that predict completion tokens
    (position p predicts token p+1, so a completion starting at P is scored from P-1), ``targets[M]`` are
    those tokens and ``segments[M]`` the sequence index of each.
    """
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, targets, segments = [], [], []
    for s, (p, c) in enumerate(seqs):
        full = p + c
        ids[s, :len(full)] = torch.tensor(full)
        mask[s, :len(full)] = 1
        start = s * width + len(p) - 1
        rows.append(torch.arange(start, start + len(c)))
        targets.append(torch.tensor(c))
        segments.append(torch.full((len(c),), s))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "rows": torch.cat(rows).to(device),
            "targets": torch.cat(targets).to(device), "segments": torch.cat(segments).to(device)}


def collate_shared(pairs: list[_Pair], pad_id: int, device) -> dict:
    """The batch :func:`collate` makes of ``[chosen..., rejected...]`` (the same ``targets`` and ``segments``),
    with one row per pair: prompt, chosen completion, rejected completion.

    The rejected completion attends to the prompt and to itself only (``attention_mask[S, T, T]``, boolean) and
    its positions continue from the prompt (``position_ids``), so every completion token gets the log-prob it
    gets in its own sequence: the prompt is run once instead of twice and half as many rows are padded. Its
    first token is scored from the prompt's last position. A pair whose two prompts differ (cut differently by
    ``max_length``) shares nothing: the rejected sequence then sits whole after the chosen one.
    """
    width = max(sum(map(len, p.chosen + p.rejected)) - _shared(p) for p in pairs)
    n = len(pairs)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    # padding keeps the causal rows: no query row is all masked (sdpa would give NaN), and no real token sees it
    mask = torch.ones((width, width), dtype=torch.bool).tril().repeat(n, 1, 1)
    rows, targets, segments = ([], []), ([], []), ([], [])
    for s, p in enumerate(pairs):
        (pc, c), (pr, r) = p.chosen, p.rejected
        shared = _shared(p)
        a, b = pc + c, (pr + r)[shared:]
        la, lb = len(a), len(b)
        ids[s, :la + lb] = torch.tensor(a + b)
        positions[s, :la] = torch.arange(la)
        positions[s, la:la + lb] = torch.arange(shared, shared + lb)
        mask[s, la:la + lb, shared:la] = False
        # token t of a sequence is scored from its position t - 1; the rejected sequence's position u sits at
        # u in the row while u < shared (the prompt) and at la + u - shared after
        u = torch.arange(len(pr) - 1, len(pr) - 1 + len(r))
        for side, (row, toks) in enumerate(((torch.arange(len(pc) - 1, la - 1), c),
                                            (torch.where(u < shared, u, la + u - shared), r))):
            rows[side].append(s * width + row)
            targets[side].append(torch.tensor(toks))
            segments[side].append(torch.full((len(toks),), side * n + s))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device),
            "rows": torch.cat(rows[0] + rows[1]).to(device), "targets": torch.cat(targets[0] + targets[1]).to(device),
            "segments": torch.cat(segments[0] + segments[1]).to(device)}


def _check_shared_layout(model, items: list[_Pair]) -> None:
    """``train.share_prompt`` needs attention that takes a block mask, and rows within a sliding window."""
    from tpo_lite.models import CUSTOM_MASK_ATTENTION, unwrap

    config = unwrap(model).config
    impl = getattr(config, "_attn_implementation", None)
    if impl not in CUSTOM_MASK_ATTENTION:
        raise TpoError(f"needs 'sdpa' or 'eager' attention (a block mask); the model runs {impl!r}: set it to "
                       "false", field="train.share_prompt")
    text = getattr(config, "get_text_config", lambda: config)()
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    longest = max(sum(map(len, p.chosen + p.rejected)) - _shared(p) for p in items)
    if isinstance(window, int) and longest > window:
        raise TpoError(f"a pair's row ({longest} tokens) is longer than the model's sliding window ({window}), "
                       "which the block mask does not apply: set it to false", field="train.share_prompt")


def _shared(p: _Pair) -> int:
    """Prompt tokens the pair's two sequences share in :func:`collate_shared`: all, or none when truncation cut
    the two prompts differently."""
    return len(p.chosen[0]) if p.chosen[0] == p.rejected[0] else 0


def collate_pairs(pairs: list[_Pair], pad_id: int, device, share_prompt: bool = False) -> dict:
    """The micro-batch of ``pairs``: segments ``0..n-1`` are the chosen completions, ``n..2n-1`` the rejected ones
    (``share_prompt``: :func:`collate_shared`, else :func:`collate` of the ``2n`` sequences)."""
    if share_prompt:
        return collate_shared(pairs, pad_id, device)
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id, device)


def _scored_hidden(model, batch):
    from tpo_lite.models import final_hidden_states

    hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"], batch.get("position_ids"))
    return hidden.reshape(-1, hidden.shape[-1])[batch["rows"]]


@dataclass(frozen=True)
class LMHead:
    """The model's LM head as the fused ops take it: ``weight[V, d]`` and the logits' scale and softcap."""

    weight: torch.Tensor
    logit_scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def of(cls, model) -> "LMHead":
        from tpo_lite.models import lm_head_options, lm_head_weight

        return cls(lm_head_weight(model), **lm_head_options(model))

    def options(self) -> dict:
        """``logit_scale`` and ``softcap`` as keyword arguments of the ops."""
        return {"logit_scale": self.logit_scale, "softcap": self.softcap}


def batch_logps(model, batch: dict, num_sequences: int, head: LMHead) -> torch.Tensor:
    """Summed completion log-probs (float32) of each segment of a collated ``batch``, through the fused op."""
    from tpo_lite.ops import fused_linear_logprobs
    from tpo_lite.ops.dpo import segment_sums

    logp = fused_linear_logprobs(_scored_hidden(model, batch), head.weight, batch["targets"], **head.options())
    sums, _ = segment_sums(logp.float(), batch["segments"], num_sequences)
    return sums


def completion_logps(model, seqs, pad_id: int, head: LMHead) -> torch.Tensor:
    """Summed completion log-probs (float32) of each (prompt, completion) in ``seqs``."""
    return batch_logps(model, collate(seqs, pad_id, head.weight.device), len(seqs), head)


# ---------------------------------------------------------------------------------------- reference cache

def _ref_key(model_cfg, train_cfg: TrainConfig, init_adapter) -> dict:
    return {"version": REF_CACHE_VERSION, "model": str(model_cfg.path), "dtype": str(model_cfg.dtype),
            "load_in_4bit": str(model_cfg.load_in_4bit),
            "init_adapter": str(Path(init_adapter).resolve()) if init_adapter else None,
            "max_length": train_cfg.max_length, **({"share_prompt": True} if train_cfg.share_prompt else {}),
            "lora_forward": "fused" if train_cfg.fuse_lora else "peft"}


def _load_ref_cache(path: Path, key: dict) -> dict:
    if not path.is_file():
        return {}
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file: recompute rather than fail
        warnings.warn(f"{path}: unreadable reference cache ({type(e).__name__}); recomputing it")
        return {}
    if not isinstance(data, dict) or data.get("key") != key:
        warnings.warn(f"{path}: reference cache was made with other settings; recomputing it")
        return {}
    return {pid: (float(c), float(r)) for pid, (c, r) in data.get("logps", {}).items()}


def _save_atomic(path: Path, obj) -> None:
    """``torch.save`` through :func:`tpo_lite.jsonl.write_atomic`: a kill leaves the old file or the new."""
    write_atomic(path, lambda f: torch.save(obj, f))


def reference_logps(model, items: list[_Pair], batch_size: int, pad_id: int, head: LMHead, base_only: bool,
                    progress: bool = True, share_prompt: bool = False) -> dict:
    """{prompt_id: (chosen, rejected)} summed log-probs of the model as loaded, in eval mode, no grad.

    ``base_only``: run with the peft adapters disabled (the first iteration's reference is the base model).
    ``share_prompt``: the batch layout of :func:`collate_pairs` (the DPO pass's, so the first step's margins are 0).
    """
    from contextlib import nullcontext

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    out = {}
    ctx = model.disable_adapter() if base_only and hasattr(model, "disable_adapter") else nullcontext()
    with torch.no_grad(), ctx:
        bar = tqdm(total=len(items), desc="reference log-probs", unit="pair", disable=not progress)
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            b = len(chunk)
            sums = batch_logps(model, collate_pairs(chunk, pad_id, head.weight.device, share_prompt), 2 * b, head)
            for j, p in enumerate(chunk):
                out[p.pid] = (float(sums[j]), float(sums[b + j]))
            bar.update(b)
        bar.close()
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------- training

def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak LR at optimizer step ``s`` (0-based): linear warmup, then the decay."""

    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        frac = (s - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * frac)) if schedule == "cosine" else max(0.0, 1 - frac)

    return f


# Float attributes that transformers attention modules read as their dropout rate (not nn.Dropout modules).
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout", "dropout")


def disable_dropout(model) -> int:
    """Set the rate of every dropout in ``model`` to 0 (``nn.Dropout`` modules -- peft's ``lora_dropout``
    included -- and the float rates attention modules keep); returns how many were non-zero."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            n += m.p > 0
            m.p = 0.0
        for name in _DROPOUT_ATTRS:
            v = getattr(m, name, None)
            if isinstance(v, float) and not isinstance(v, bool):
                n += v > 0
                setattr(m, name, 0.0)
    return int(n)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------- DPO checkpoints

CHECKPOINT_VERSION = 1


def _checkpoint_key(model_cfg, cfg: TrainConfig, init_adapter, items: list[_Pair]) -> str:
    """What a checkpoint's state depends on: the model options, the adapter training started from, every
    [train] option but checkpoint_every, and the pairs as trained (ids and token ids after truncation)."""
    import dataclasses
    import hashlib
    import json

    h = hashlib.sha256()
    for p in items:
        h.update(json.dumps([p.pid, p.chosen, p.rejected]).encode())
    model = ({k: v for k, v in dataclasses.asdict(model_cfg).items() if k != "cache_dir"}
             if dataclasses.is_dataclass(model_cfg) else {})
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "checkpoint_every"}
    return json.dumps({"ref": _ref_key(model_cfg, cfg, init_adapter), "model": model, "train": train,
                       "pairs": h.hexdigest()}, sort_keys=True, default=str)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_checkpoint(path: Path, key: str) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a foreign or damaged file: train from the start rather than fail
        warnings.warn(f"{path}: unreadable DPO checkpoint ({type(e).__name__}); training the iteration from "
                      f"its first step")
        return None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION or state.get("key") != key:
        warnings.warn(f"{path}: DPO checkpoint of other settings (model, start adapter, [train] options or "
                      f"pairs); training the iteration from its first step")
        return None
    return state


def _remove_checkpoints(d: IterationDir) -> None:
    for p in [d.dpo_checkpoint, *d.path.glob(f".{d.dpo_checkpoint.name}.*.tmp")]:
        p.unlink(missing_ok=True)


def _non_finite(what: str, value, step: int, total: int, epoch: int, epochs: int, out_dir: Path,
                when: str = "at") -> TpoError:
    return TpoError(f"non-finite {what} ({value}) {when} optimizer step {step} of {total} (epoch {epoch + 1} of "
                    f"{epochs}): training stopped, nothing of this iteration was saved and the adapter it "
                    f"started from stays; lower train.learning_rate or check the pairs", path=str(out_dir))


def _check_weights(named_params, step: int, total: int, epoch: int, epochs: int, out_dir: Path) -> None:
    """Refuse to save or checkpoint LoRA weights holding inf / nan (an update that overflowed)."""
    bad = [n for n, p in named_params if not bool(torch.isfinite(p.detach()).all())]
    if bad:
        where = bad[0] + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
        raise _non_finite("LoRA weights", f"inf or nan in {where}", step, total, epoch, epochs, out_dir, "after")


def train_iteration(model_cfg, train_cfg: TrainConfig, pairs: list[dict], out_dir, init_adapter=None,
                    progress: bool = True, on_step=None) -> dict:
    """Train one DPO iteration on ``pairs`` (pairs.jsonl records) and save ``out_dir/adapter``; ``out_dir`` is the
    iteration's folder (a :class:`tpo_lite.rundir.IterationDir`, which names every file written here, or its path).

    ``init_adapter``: the adapter that sampled these pairs (None in iteration 1: a new LoRA). Returns the
    metrics (also stored in ``out_dir/adapter/DONE``): ``loss``, ``margins``, ``accuracy``,
    ``rewards_chosen``, ``rewards_rejected`` (means over the last epoch), ``final_*`` (the last step),
    ``initial_margin`` / ``initial_loss`` (first step, before any update), ``steps``, ``seconds``,
    ``seconds_per_step``, ``pairs``, ``tokens``, ``ref_seconds``, ``ref_cached``, ``resumed_at_step`` (the
    checkpoint's step this call resumed from, 0 = none; ``train_seconds`` counts the earlier runs' DPO time
    too, ``seconds`` only this call's), ``dropout_disabled`` and
    ``dropouts_zeroed`` (how many non-zero dropout rates were set to 0), ``grad_checkpointing``,
    ``lora_layers_fused`` (:func:`tpo_lite.models.fuse_lora_layers`), ``lora_layers_compacted`` (the other LoRA
    layers, :func:`tpo_lite.models.compact_lora_activations`) and ``memory``: the peak
    RSS (and CUDA peaks) of the model load, the reference pass and the DPO epochs
    (:class:`tpo_lite.memory.StageMemory` records).

    ``on_step(history)``: called after each optimizer step with the per-step records so far (those of
    ``adapter/history.json``; after a resume they start with the checkpoint's), e.g. experiment tracking.
    """
    from tqdm.auto import tqdm

    from tpo_lite.memory import StageMemory, trim_during_passes
    from tpo_lite.models import (
        compact_lora_activations, decoder_layers, describe, enable_gradient_checkpointing, fuse_lora_layers,
        load_model)
    from tpo_lite.ops import fused_dpo_loss

    d = out_dir if isinstance(out_dir, IterationDir) else IterationDir(out_dir)
    out_dir, adapter_dir, done = d.path, d.adapter, d.adapter_done
    if done.is_file():
        _remove_checkpoints(d)  # a kill between DONE and the removal below left it
        return read_json(done)
    if not pairs:
        raise TpoError("no pairs to train on", path=str(d.pairs))
    if init_adapter is not None and not Path(init_adapter, "adapter_config.json").is_file():
        raise TpoError("not a peft adapter directory (no adapter_config.json)", path=str(init_adapter),
                       field="init_adapter")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = train_cfg
    t_start = time.time()
    _seed_all(cfg.seed)

    mem_load = StageMemory(release_after=False).start()
    model, tokenizer = load_model(model_cfg, adapter=init_adapter, trainable=True)
    mem_load.stop()
    # Dropout is active only in train mode: left on, the policy pass would differ from the reference pass.
    dropouts_disabled = disable_dropout(model) if cfg.disable_dropout else 0
    # after disable_dropout: only LoRA layers whose dropout is off are changed
    lora_fused = fuse_lora_layers(model) if cfg.fuse_lora else 0
    lora_compacted = compact_lora_activations(model)
    head = LMHead.of(model)
    weight = head.weight
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    items = prepare_pairs(pairs, cfg.max_length, weight.shape[0], source=str(d.pairs))
    if cfg.share_prompt:
        _check_shared_layout(model, items)

    # 1. reference log-probs, once, cached
    t_ref = time.time()
    cache_path = d.ref_logps
    key = _ref_key(model_cfg, cfg, init_adapter)
    ref = _load_ref_cache(cache_path, key)
    # in the order and batches of epoch 0, so the first step's policy pass sees the very same batch shapes
    first_order = torch.randperm(len(items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    missing = [items[i] for i in first_order if items[i].pid not in ref]
    # CPU: glibc would keep the pages of freed activations (GPU memory is torch's own business); installed before
    # the no-grad reference pass too (SmolLM2, 12 pairs: it ended ~120 MB lower with them), removed after DPO
    trim_hooks = trim_during_passes(decoder_layers(model)) if weight.device.type == "cpu" else []
    with StageMemory(release_after=False) as mem_ref:
        if missing:
            ref.update(reference_logps(model, missing, cfg.batch_size, pad_id, head,
                                       base_only=init_adapter is None, progress=progress,
                                       share_prompt=cfg.share_prompt))
            _save_atomic(cache_path, {"key": key, "logps": {pid: [c, r] for pid, (c, r) in ref.items()}})
    ref_seconds = time.time() - t_ref

    # 2. DPO
    model.train()
    if cfg.grad_checkpointing:
        enable_gradient_checkpointing(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise TpoError("the model has no trainable parameters (is the adapter frozen?)", field="model")
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(len(items) / per_step)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_schedule, warmup, total))
    loss_kw = dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                   nll_weight=cfg.nll_weight, average_log_prob=cfg.average_log_prob, **head.options())

    history, tokens, step, start_epoch, start_batch, seconds_before = [], 0, 0, 0, 0, 0.0
    ckpt_path = d.dpo_checkpoint
    ckpt_key = _checkpoint_key(model_cfg, cfg, init_adapter, items)
    ckpt = _load_checkpoint(ckpt_path, ckpt_key)
    if ckpt is not None:
        # the state after optimizer step ckpt["step"]: with the same pairs order (a function of the seed),
        # the remaining steps are those of an uninterrupted run
        with torch.no_grad():
            for n, p in named:
                p.copy_(ckpt["weights"][n])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        history, tokens, step = ckpt["history"], ckpt["tokens"], ckpt["step"]
        start_epoch, start_batch, seconds_before = ckpt["epoch"], ckpt["batch"], ckpt["train_seconds"]
    resumed_at = step
    t_train = time.time()
    mem_dpo = StageMemory(release_after=False).start()
    bar = tqdm(total=total, initial=step, desc="DPO", unit="step", disable=not progress)
    for epoch in range(start_epoch, cfg.epochs):
        order = first_order if epoch == 0 else torch.randperm(
            len(items), generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
        for s in range(start_batch if epoch == start_epoch else 0, steps_per_epoch):
            group = [items[i] for i in order[s * per_step:(s + 1) * per_step]]
            sums: dict[str, float] = {}
            for m in range(0, len(group), cfg.batch_size):
                chunk = group[m:m + cfg.batch_size]
                b = len(chunk)
                batch = collate_pairs(chunk, pad_id, weight.device, cfg.share_prompt)
                ref_t = torch.tensor([ref[p.pid][0] for p in chunk] + [ref[p.pid][1] for p in chunk],
                                     dtype=torch.float32, device=weight.device)
                out = fused_dpo_loss(_scored_hidden(model, batch), weight, batch["targets"], batch["segments"],
                                     ref_t, **loss_kw)
                # weight each micro-batch by its share of the step's pairs: the step's gradient is the mean
                # over its pairs whatever the split
                (out.loss * (b / len(group))).backward()
                sums["loss"] = sums.get("loss", 0.0) + float(out.loss.detach()) * b
                for k, v in out.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * (b if k != "tokens" else 1)
            if not math.isfinite(sums["loss"]):
                raise _non_finite("loss", sums["loss"] / len(group), step + 1, total, epoch, cfg.epochs, out_dir)
            # max_norm inf = measure without clipping (the factor is clamped to exactly 1)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
            if not math.isfinite(grad_norm):
                raise _non_finite("gradient norm", grad_norm, step + 1, total, epoch, cfg.epochs, out_dir)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tokens += int(sums.pop("tokens", 0))
            rec = {k: v / len(group) for k, v in sums.items()}
            rec.update(step=step, epoch=epoch, lr=sched.get_last_lr()[0], grad_norm=grad_norm)
            history.append(rec)
            if on_step is not None:
                on_step(history)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", margin=f"{rec['margins']:.3f}",
                            acc=f"{rec['accuracy']:.2f}")
            bar.update(1)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                _check_weights(named, step, total, epoch, cfg.epochs, out_dir)
                _save_atomic(ckpt_path, {
                    "version": CHECKPOINT_VERSION, "key": ckpt_key, "step": step,
                    "epoch": step // steps_per_epoch, "batch": step % steps_per_epoch,  # of the next step
                    "weights": {n: p.detach().cpu() for n, p in named}, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "rng": _rng_state(), "history": history,
                    "tokens": tokens, "train_seconds": seconds_before + time.time() - t_train})
    bar.close()
    _check_weights(named, step, total, cfg.epochs - 1, cfg.epochs, out_dir)
    mem_dpo.stop()
    for h in trim_hooks:
        h.remove()
    train_seconds = seconds_before + time.time() - t_train

    first, last = history[0], history[-1]
    if abs(first["margins"]) > INITIAL_MARGIN_TOLERANCE:
        warnings.warn(f"initial DPO margin {first['margins']:.4f} is not ~0: the reference log-probs do not "
                      f"match the policy before training (cache {cache_path} from another model?)")
    last_epoch = [h for h in history if h["epoch"] == cfg.epochs - 1]

    def mean(k):
        return sum(h[k] for h in last_epoch) / len(last_epoch)

    metrics = {
        "loss": mean("loss"), "margins": mean("margins"), "accuracy": mean("accuracy"),
        "rewards_chosen": mean("rewards/chosen"), "rewards_rejected": mean("rewards/rejected"),
        "final_loss": last["loss"], "final_margins": last["margins"], "final_accuracy": last["accuracy"],
        "initial_margin": first["margins"], "initial_loss": first["loss"],
        "steps": step, "epochs": cfg.epochs, "pairs": len(items), "tokens": tokens,
        "seconds": time.time() - t_start, "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / max(1, step), "ref_seconds": ref_seconds,
        "ref_cached": not missing, "resumed_at_step": resumed_at, "model": describe(model),
        "dropout_disabled": cfg.disable_dropout, "dropouts_zeroed": dropouts_disabled,
        "grad_checkpointing": cfg.grad_checkpointing, "lora_layers_fused": lora_fused,
        "lora_layers_compacted": lora_compacted,
        "memory": {"load": mem_load.record(), "reference": mem_ref.record(), "dpo": mem_dpo.record()},
    }

    # 3. save: adapter under a temporary name, renamed into place, then the DONE marker
    tmp = d.adapter_tmp
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    write_json_atomic(tmp / "history.json", history)
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(tmp, adapter_dir)
    write_json_atomic(done, metrics)
    _remove_checkpoints(d)
    return metrics
