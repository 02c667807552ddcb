"""The ``[train]`` table (:class:`TrainConfig`). No torch here: the run config imports this, and the driver
process of a run (:mod:`tpo_lite.stage_process`) never imports torch; :mod:`tpo_lite.train` trains with it."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import require, require_finite, require_seed
from .ops.loss_types import LOSS_TYPES
from .options import option

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """The ``[train]`` table of a run config."""

    beta: float = option(0.1, "DPO beta: strength of the pull towards the reference (larger = stay closer).")
    loss_type: str = option("sigmoid",
        "'sigmoid' (DPO; with label_smoothing = conservative DPO), 'ipo' (IPO on length-averaged "
        "log-probs), 'hinge' (SLiC hinge), 'robust' (rDPO, unbiased under label noise with flip rate "
        "label_smoothing).", choices=LOSS_TYPES)
    label_smoothing: float = option(0.0,
        "Assumed probability that a preference label is flipped, in [0, 0.5): smooths 'sigmoid' "
        "(cDPO) and is the noise rate of 'robust'; must be 0 for 'ipo' and 'hinge'.")
    nll_weight: float = option(0.0,
        "Weight of an extra per-token NLL loss on the chosen outputs (RPO / iterative RPO); 0 = off.")
    average_log_prob: bool = option(False,
        "Use per-token averaged instead of summed sequence log-probs in the loss (always on for ipo).")
    learning_rate: float = option(5e-5, "Peak AdamW learning rate of the LoRA weights.")
    epochs: int = option(1, "Passes over this iteration's pairs.")
    batch_size: int = option(2, "Pairs per forward/backward (each pair = 2 sequences); lower it if memory runs out.")
    grad_accum: int = option(4,
        "Micro-batches accumulated per optimizer step (pairs per step = batch_size * grad_accum).")
    grad_checkpointing: bool = option(True,
        "Recompute each decoder layer in the backward instead of keeping its activations: the DPO "
        "step's peak memory falls to about the model plus one layer's activations (SmolLM2-135M, "
        "bf16, 2 pairs of <= 512 tokens per micro-batch, CPU: peak RSS 1.4-1.5 GB instead of 2.5 GB) "
        "for one extra forward per micro-batch (about 1.3x the CPU time per step there). false = keep "
        "them: faster when the memory is there (docs/training.md).")
    share_prompt: bool = option(False,
        "Run each pair as one sequence: the prompt once, then the chosen completion, then the rejected one, "
        "which attends to the prompt and itself only (a block mask; both completions start at the prompt's "
        "length). The same log-probs as two padded sequences for a third fewer tokens on the CPU default's "
        "pairs (the prompt is not run twice, half as many rows are padded): reference pass + DPO 1.15x "
        "faster there, peak RSS 0.87x. Needs 'sdpa' or 'eager' attention (docs/training.md).")
    fuse_lora: bool = option(True,
        "Run each plain LoRA linear's branch as one op (tpo_lite.ops.lora_linear: the scale folded into B, the add "
        "into the product): peft's numbers (exactly when lora_alpha / r is a power of two) for one pass over the "
        "layer's output fewer each way (reference pass + one DPO epoch 1.05x faster on SmolLM2-135M, fp32, 2 "
        "CPU threads: docs/training.md). false = peft's own forward.")
    lr_schedule: str = option("cosine",
        "Learning-rate decay after warmup: 'cosine' (to 0), 'linear' (to 0) or 'constant'.", choices=SCHEDULES)
    warmup_ratio: float = option(0.1, "Fraction of the optimizer steps with a linear warmup from 0 to learning_rate.")
    max_length: int = option(1024,
        "Longest prompt + completion in tokens; longer ones are cut (completion end first, keeping at "
        "least half of max_length for it, then the prompt's beginning).")
    seed: int = option(0,
        "Seed of the LoRA initialisation, dropout and the order of the pairs in each epoch; 0 .. 2**32 - 1.")
    weight_decay: float = option(0.0, "AdamW weight decay of the LoRA weights.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this before each step; 0 = no clipping.")
    disable_dropout: bool = option(True,
        "Set every dropout of the model to 0 while training DPO (the model's own and the LoRA "
        "dropout, also that of an adapter loaded from a previous iteration, which keeps the "
        "lora_dropout it was created with), as TRL's disable_dropout: the policy pass then computes "
        "the same function as the cached reference pass (eval mode), so the margins start at exactly "
        "0. false = keep them (the policy is then a noisy version of the reference).")
    checkpoint_every: int = option(10,
        "Write a DPO checkpoint (LoRA weights, optimizer, LR schedule, RNG states, position, metrics so "
        "far) to iter_XX/dpo_checkpoint.pt every this many optimizer steps; a killed run resumes from "
        "the last one and ends with the adapter an uninterrupted run gives. Deleted once the adapter is "
        "saved. 0 = never (a killed run restarts the iteration's DPO).")

    def __post_init__(self):
        require_finite(self)
        require_seed(self)
        require(self, [
            ("beta", self.beta > 0, "must be > 0"),
            ("loss_type", self.loss_type in LOSS_TYPES, f"must be one of {', '.join(LOSS_TYPES)}"),
            ("label_smoothing", 0 <= self.label_smoothing < 0.5, "must be in [0, 0.5)"),
            ("label_smoothing", self.label_smoothing == 0 or self.loss_type in ("sigmoid", "robust"),
             f"must be 0 for loss_type {self.loss_type!r}"),
            ("nll_weight", self.nll_weight >= 0, "must be >= 0"),
            ("learning_rate", self.learning_rate > 0, "must be > 0"),
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("grad_accum", self.grad_accum >= 1, "must be >= 1"),
            ("lr_schedule", self.lr_schedule in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
            ("max_length", self.max_length >= 8, "must be >= 8"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, "must be >= 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, "must be >= 0"),
        ])
