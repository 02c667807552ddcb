"""Plain PyTorch references for the fused ops: materialise the logits, then log_softmax and gather; the LoRA
branch in peft's order of operations.

These are the ground truth the kernels are tested against (run them in float64) and the last-resort fallback.
"""
from typing import Optional

import torch


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    """Per-token log p(target) from hidden[N,d] and weight[V,d]; ignored positions give 0."""
    logits = (hidden @ weight.t()).float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden @ weight.t()
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    mask = targets != ignore_index
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    out = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    out = torch.where(mask, out, torch.zeros_like(out))
    return out if out.dtype == torch.float64 else out.float()


def lora_linear_delta_reference(y, x, a, b, scaling: float) -> torch.Tensor:
    """peft's order of operations, for the tests: ``(y + ((x @ a.T) @ b.T) * scaling)`` in ``a``'s dtype."""
    c = a.dtype
    return (y.to(c) + ((x.to(c) @ a.t()) @ b.t()) * scaling).to(y.dtype)
