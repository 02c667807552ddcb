"""Fused linear log-probs: ``log p(target)`` per token from hidden states and the LM head, never forming N x V logits.

Dispatch on ``hidden.device``: CPU -> ``tpo_lite._C`` (csrc/cpu), CUDA -> ``tpo_lite._C_cuda`` (csrc/cuda), other
devices or a missing extension -> :func:`tpo_lite.ops.reference.linear_logprobs_reference` (one warning from the
loader). The math and the C++ contract are in docs/kernels.md.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _ext
from .reference import linear_logprobs_reference

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _validate(hidden, weight, targets, ignore_index, logit_scale, softcap, chunk):
    """Shape / dtype / device / range checks with a clear ValueError; returns targets as int64."""
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"fused_linear_logprobs: {name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"fused_linear_logprobs: hidden must be 2-D [N, d], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"fused_linear_logprobs: weight must be 2-D [V, d], got shape {tuple(weight.shape)}")
    if targets.dim() != 1:
        raise ValueError(f"fused_linear_logprobs: targets must be 1-D [N], got shape {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"fused_linear_logprobs: hidden is [N, d] = {tuple(hidden.shape)} but weight is [V, d] = "
            f"{tuple(weight.shape)}: the hidden size d must match"
        )
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"fused_linear_logprobs: targets has {targets.shape[0]} entries but hidden has N = {hidden.shape[0]} rows"
        )
    if weight.shape[0] == 0:
        raise ValueError("fused_linear_logprobs: weight has an empty vocabulary (V = 0)")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"fused_linear_logprobs: hidden dtype must be float64/float32/bfloat16/float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(
            f"fused_linear_logprobs: hidden is {hidden.dtype} but weight is {weight.dtype}; cast one so they match"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"fused_linear_logprobs: targets must be an integer tensor, got {targets.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"fused_linear_logprobs: hidden ({hidden.device}), weight ({weight.device}) and targets "
            f"({targets.device}) must be on the same device"
        )
    if not math.isfinite(float(logit_scale)):
        raise ValueError(f"fused_linear_logprobs: logit_scale must be finite, got {logit_scale}")
    if softcap is not None and not (float(softcap) > 0 and math.isfinite(float(softcap))):
        raise ValueError(f"fused_linear_logprobs: softcap must be None or a positive finite number, got {softcap}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 0):
        raise ValueError(f"fused_linear_logprobs: chunk must be None or an int >= 0, got {chunk!r}")
    targets = targets.long()
    V = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if targets.numel() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"fused_linear_logprobs: targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {V}) and is "
            f"not ignore_index ({ignore_index})"
        )
    return targets


class _FusedLinearLogprobs(torch.autograd.Function):
    """autograd wrapper; see :func:`fused_linear_logprobs` for the cost per mode."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, logit_scale, cap, chunk, ext):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Frozen head: fold d logp / d hidden into the forward (2 products, backward is a row scale).
        # Trainable head: forward computes only logp and lse; the backward recomputes the logits.
        fold = need_h and not need_w
        logp, lse, J = ext.linear_logprobs_forward(hidden, weight, targets, ignore_index, logit_scale, cap, chunk, fold)
        ctx.fold = fold
        ctx.args = (ignore_index, logit_scale, cap, chunk)
        ctx.ext = ext
        ctx.hidden_dtype = hidden.dtype
        if fold:
            ctx.save_for_backward(J)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.fold:
            (J,) = ctx.saved_tensors
            grad_h = (grad_logp.to(J.dtype).unsqueeze(1) * J).to(ctx.hidden_dtype)
            return grad_h, None, None, None, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        ignore_index, logit_scale, cap, chunk = ctx.args
        grad_h, grad_w = ctx.ext.linear_logprobs_backward(
            grad_logp.to(lse.dtype).contiguous(), hidden, weight, targets, lse,
            ignore_index, logit_scale, cap, chunk, need_h, need_w,
        )
        return (grad_h if need_h else None), (grad_w if need_w else None), None, None, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
    chunk: Optional[int] = None,
) -> torch.Tensor:
    """Per-token ``log softmax(z)[target]`` with ``z = logit_scale * hidden @ weight.T`` (then ``softcap * tanh(z /
    softcap)`` if ``softcap`` is set), computed over the vocabulary in chunks with an online log-sum-exp.

    Args:
        hidden: [N, d] final hidden states (float64 / float32 / bfloat16 / float16).
        weight: [V, d] LM-head weight, same dtype and device as ``hidden``.
        targets: [N] integer token ids in [0, V), or ``ignore_index``.
        ignore_index: positions with this target give 0 and zero gradient (and cost nothing: they are dropped
            before the matrix products).
        logit_scale: multiplies the logits (not a sampling temperature).
        softcap: Gemma-style tanh cap on the logits; None for no cap.
        chunk: vocabulary rows per chunk; None or 0 picks a default (N x chunk buffer of ~4 MiB).

    Returns:
        logp [N], float32 (float64 for float64 inputs). Differentiable w.r.t. ``hidden`` and ``weight``.

    Cost in N x d x V matrix products (matrix products in the input dtype, reductions in float32):
        * no gradient needed (``torch.no_grad`` or nothing requires grad): 1.
        * ``hidden`` requires grad, ``weight`` frozen (QLoRA): 2, both in the forward; the forward also returns
          d logp / d hidden (N x d) and the backward is a per-row scale of it.
        * ``weight`` requires grad: 1 in the forward + 3 in the backward (recompute logits, grad_weight,
          grad_hidden) = 4; 3 if ``hidden`` does not require grad.
    Extra memory: an N x chunk buffer plus O(N x d) (never N x V); a trainable weight also needs its V x d
    gradient. Bad input raises ValueError. Inputs that are not contiguous are copied to contiguous first.
    """
    targets = _validate(hidden, weight, targets, ignore_index, logit_scale, softcap, chunk)
    kind = {"cpu": "cpu", "cuda": "cuda"}.get(hidden.device.type)
    ext = _ext.get_extension(kind) if kind is not None else None
    if ext is None:
        return linear_logprobs_reference(hidden, weight, targets, ignore_index, logit_scale, softcap)
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    cap = float(softcap) if softcap is not None else 0.0
    args = (int(ignore_index), float(logit_scale), cap, int(chunk or 0))
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return ext.linear_logprobs_forward(hidden, weight, targets, *args, False)[0]
    return _FusedLinearLogprobs.apply(hidden, weight, targets, *args, ext)
