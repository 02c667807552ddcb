"""The LoRA branch added onto its base layer's output in one autograd node: ``y + s * (x A^T) B^T``.

peft computes ``result + lora_B(lora_A(x)) * scaling`` as four ops (two products, a scale and an add), each
writing a tensor of the layer's full output size in the LoRA weights' dtype (fp32), and on a bf16/fp16 base it
casts the input to fp32 and keeps that copy for the backward. :func:`lora_linear_delta` computes the same
numbers with the scale folded into the ``B`` product's small [d_out, r] weight and the add into the product
(``addmm``): per adapted layer and micro-batch, one full-size pass fewer forward and backward. Only the input
``x`` in its own dtype (shared by q/k/v and by gate/up) and ``u = x A^T`` ([N, r]) are kept.

Numerics, against peft with fp32 LoRA weights (the compute dtype ``c`` is the LoRA weights' dtype):
``out = c->dtype(y)(c(y) + (c(x) A^T) (s B)^T)``, gradients ``g`` of ``y`` as given, ``c(g) (s B) A`` of ``x``,
``(c(g) (s B))^T c(x)`` of ``A`` and ``s (c(g)^T u)`` of ``B``. With ``s`` a power of two (``lora_alpha / r``
= 2 as in the shipped recipes) every product is peft's exactly; otherwise they differ by one rounding of ``s``.
Whether ``addmm`` rounds its sum like ``mm`` then ``add`` is up to the BLAS; the tests compare with peft's
layer and with a float64 reference.

Cost per gradient mode: forward, two GEMMs (``N x d_in x r`` and ``N x r x d_out``), plus one cast of ``x`` and
of ``y`` each way when the base is not in ``c``; backward, four GEMMs of the same sizes and the cast of ``g``.
"""
from __future__ import annotations

import torch


class LoraLinearDelta(torch.autograd.Function):
    """``y + scaling * (x @ a.T) @ b.T`` in ``a``'s dtype, returned in ``y``'s dtype; see the module docstring."""

    @staticmethod
    def forward(ctx, y, x, a, b, scaling: float):
        c = a.dtype
        x2 = x.reshape(-1, x.shape[-1])
        sb = b * scaling
        u = x2.to(c) @ a.t()
        out = torch.addmm(y.reshape(-1, y.shape[-1]).to(c), u, sb.t()).to(y.dtype)
        ctx.save_for_backward(x, u, a, b)  # b, not sb: the parameter is alive anyway
        ctx.scaling = scaling
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, grad):
        x, u, a, b = ctx.saved_tensors
        c = a.dtype
        g = grad.reshape(-1, grad.shape[-1]).to(c)
        gu = g @ (b * ctx.scaling)
        gx = ga = gb = None
        if ctx.needs_input_grad[1]:
            gx = (gu @ a).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[2]:
            ga = gu.t() @ x.reshape(-1, x.shape[-1]).to(c)
        if ctx.needs_input_grad[3]:
            gb = (g.t() @ u).mul_(ctx.scaling)
        return grad, gx, ga, gb, None


def lora_linear_delta(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                      scaling: float) -> torch.Tensor:
    """``y + scaling * (x @ a.T) @ b.T`` (LoRA ``a`` [r, d_in], ``b`` [d_out, r]) computed in ``a``'s dtype and
    returned in ``y``'s; ``y`` [..., d_out] is the base layer's output for ``x`` [..., d_in]."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"lora_linear_delta: a must be [r, d_in] and b [d_out, r], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if x.shape[-1] != a.shape[1] or y.shape[-1] != b.shape[0] or x.shape[:-1] != y.shape[:-1]:
        raise ValueError(f"lora_linear_delta: x {tuple(x.shape)} and y {tuple(y.shape)} do not fit a "
                         f"{tuple(a.shape)} and b {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"lora_linear_delta: a and b must share a dtype, got {a.dtype} and {b.dtype}")
    return LoraLinearDelta.apply(y, x, a, b, float(scaling))
