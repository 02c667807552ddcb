"""DPO losses on per-sequence log-probs, and a fused entry point from final hidden states.

Notation (per pair i): ``pi_c``, ``pi_r`` are the policy's log-probs of the chosen and rejected completion,
``ref_c``, ``ref_r`` the reference model's, and ``h = (pi_c - ref_c) - (pi_r - ref_r)`` the log-ratio margin.

Loss types (each averaged over the pairs of the batch; ``eps`` is ``label_smoothing``):

``sigmoid``  DPO (Rafailov et al. 2023): ``-(1-eps)·logσ(βh) - eps·logσ(-βh)``; ``eps > 0`` is conservative
             DPO (cDPO, labels flipped with probability ``eps``, the loss becomes a smoothed cross-entropy).
``ipo``      IPO (Azar et al. 2023): ``(h - 1/(2β))²``. IPO is defined on *length-averaged* log-probs: the
             caller of :func:`dpo_loss` passes averaged log-probs; :func:`fused_dpo_loss` averages by itself.
``hinge``    SLiC-style hinge (Zhao et al. 2023): ``relu(1 - βh)``.
``robust``   rDPO (Chowdhury et al. 2024), the unbiased estimator of the clean DPO loss when each label is
             flipped with known probability ``eps`` (= ``label_smoothing``, must be < 0.5):
             ``((1-eps)·(-logσ(βh)) - eps·(-logσ(-βh))) / (1 - 2·eps)``. With ``eps = 0`` it is ``sigmoid``.

An optional NLL term ``nll_weight · mean(nll_chosen)`` on the chosen sequences gives RPO / iterative RPO
(Pang et al. 2024): it keeps the likelihood of the chosen output from drifting down.

Metrics (detached 0-dim float32 tensors, so a training loop decides when to synchronise):
``rewards/chosen`` = mean β(pi_c - ref_c), ``rewards/rejected`` = mean β(pi_r - ref_r),
``margins`` = mean of their difference (= mean βh), ``accuracy`` = fraction of pairs with βh > 0,
``logps/chosen``, ``logps/rejected`` (mean policy log-probs as used by the loss), and ``nll`` when the NLL
term is on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .loss_types import LOSS_TYPES
_NO_IGNORE = -(2**63)  # an ignore_index no token id equals


@dataclass
class DPOOutput:
    """``loss``: scalar tensor with grad; ``metrics``: name -> detached 0-dim tensor (see module doc)."""

    loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


def _check_loss_args(loss_type: str, beta: float, label_smoothing: float, nll_weight: float) -> None:
    # The ops are a public API: checked once per call at their entry (TrainConfig checks a run's options).
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo loss_type: unknown {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"dpo beta: must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing: must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type in ("ipo", "hinge"):
        raise ValueError(f"dpo label_smoothing: only used by 'sigmoid' and 'robust', not by {loss_type!r}")
    if nll_weight < 0:
        raise ValueError(f"dpo nll_weight: must be >= 0, got {nll_weight}")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_chosen: Optional[torch.Tensor] = None,
    nll_weight: float = 0.0,
) -> DPOOutput:
    """DPO-family loss from per-sequence log-probs, each a 1-D tensor of B pairs (see the module doc).

    Log-probs are summed over the completion tokens, except for ``ipo``, where they should be length-averaged
    (that is IPO's definition; this function cannot tell which it gets). ``nll_chosen`` is the per-pair
    negative log-likelihood of the chosen completion (per token, [B] or a scalar); it is required when
    ``nll_weight > 0`` and only enters the loss then. The loss is computed in float32 (float64 stays float64).
    """
    _check_loss_args(loss_type, beta, label_smoothing, nll_weight)
    tensors = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
               "ref_chosen": ref_chosen, "ref_rejected": ref_rejected}
    shape = policy_chosen.shape
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"dpo_loss {name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape != shape:
            raise ValueError(f"dpo_loss {name}: expected shape [B] matching policy_chosen {list(shape)}, "
                             f"got {list(t.shape)}")
        if t.device != policy_chosen.device:
            raise ValueError(f"dpo_loss {name}: on {t.device}, policy_chosen on {policy_chosen.device}")
    if shape[0] == 0:
        raise ValueError("dpo_loss: empty batch (B = 0)")
    if nll_weight > 0 and nll_chosen is None:
        raise ValueError("dpo_loss nll_chosen: required when nll_weight > 0")
    return _dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing,
                     nll_chosen, nll_weight)


def _dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type, label_smoothing,
              nll_chosen, nll_weight) -> DPOOutput:
    """:func:`dpo_loss` on arguments already checked."""
    dtype = torch.float64 if policy_chosen.dtype == torch.float64 else torch.float32
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    rc, rr = ref_chosen.to(dtype).detach(), ref_rejected.to(dtype).detach()

    chosen_logratio = pc - rc
    rejected_logratio = pr - rr
    h = chosen_logratio - rejected_logratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * h)
    loss = losses.mean()

    metrics: Dict[str, torch.Tensor] = {}
    if nll_chosen is not None and nll_weight > 0:
        nll = nll_chosen.to(dtype).mean()
        loss = loss + nll_weight * nll
        metrics["nll"] = nll.detach().float()

    with torch.no_grad():
        r_c = beta * chosen_logratio
        r_r = beta * rejected_logratio
        metrics.update({
            "rewards/chosen": r_c.mean().float(),
            "rewards/rejected": r_r.mean().float(),
            "margins": (r_c - r_r).mean().float(),
            "accuracy": (r_c > r_r).float().mean(),
            "logps/chosen": pc.mean().float(),
            "logps/rejected": pr.mean().float(),
        })
    return DPOOutput(loss=loss, metrics={k: v.detach() for k, v in metrics.items()})


def segment_sums(
    token_logps: torch.Tensor, segment_ids: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of ``token_logps[M]`` by ``segment_ids[M]`` (all in [0, num_sequences)) and counts."""
    sums = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, segment_ids, token_logps)
    counts = torch.bincount(segment_ids, minlength=num_sequences)
    return sums, counts


def fused_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    ref_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    average_log_prob: bool = False,
    logit_scale: float = 1.0,
    softcap: Optional[float] = None,
) -> DPOOutput:
    """DPO loss straight from final hidden states, never materialising the logits of the whole batch.

    ``hidden[N, d]`` are the hidden states of the positions that *predict* ``targets[N]`` (already shifted by
    the caller); ``weight[V, d]`` is the LM head; ``segment_ids[N]`` says which sequence each position belongs
    to: 0..B-1 are the chosen completions of pairs 0..B-1, B..2B-1 the rejected ones in the same order, -1 an
    ignored position (prompt, padding). Only positions with ``segment_ids >= 0`` go through the LM head
    (``tpo_lite.ops.fused_linear_logprobs``, which refuses a kept target outside ``[0, V)``). ``ref_logps[2B]`` are the reference model's *summed* log-probs of
    the same 2B sequences, in the same order (the cached form, whatever the loss type).

    Sequence log-probs are the sums of the token log-probs; with ``average_log_prob`` (and always for
    ``ipo``, which is defined on averages) both policy and reference sums are divided by the sequence's token
    count. With ``nll_weight > 0`` the NLL term is the per-token NLL of each chosen sequence. Gradients flow to
    ``hidden`` (and to ``weight`` if it requires grad). Other arguments: see :func:`dpo_loss`.
    """
    from . import fused_linear_logprobs  # late: the kernels may be swapped in after this module loads

    _check_loss_args(loss_type, beta, label_smoothing, nll_weight)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_dpo_loss: expected hidden [N, d] and weight [V, d], got {list(hidden.shape)} "
                         f"and {list(weight.shape)}")
    n = hidden.shape[0]
    for name, t in (("targets", targets), ("segment_ids", segment_ids)):
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"fused_dpo_loss {name}: expected shape [{n}] (one per hidden row), got {list(t.shape)}")
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"fused_dpo_loss {name}: expected an integer tensor, got {t.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"fused_dpo_loss {name}: on {t.device}, hidden on {hidden.device}")
    if ref_logps.dim() != 1 or ref_logps.shape[0] == 0 or ref_logps.shape[0] % 2:
        raise ValueError(f"fused_dpo_loss ref_logps: expected shape [2B] (chosen then rejected), "
                         f"got {list(ref_logps.shape)}")
    num_seq = ref_logps.shape[0]
    b = num_seq // 2
    seg = segment_ids.long()
    if n and (int(seg.min()) < -1 or int(seg.max()) >= num_seq):
        raise ValueError(f"fused_dpo_loss segment_ids: values must be -1 or in [0, {num_seq}), got range "
                         f"[{int(seg.min())}, {int(seg.max())}]")

    keep = seg >= 0
    seg_kept = seg[keep]
    h_kept = hidden[keep]
    t_kept = targets.long()[keep]
    counts = torch.bincount(seg_kept, minlength=num_seq)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"fused_dpo_loss segment_ids: sequences {empty} have no scored token (every "
                         f"sequence 0..{num_seq - 1} needs at least one position)")
    # segment_ids alone say which positions count: no kept target may pass as ignored (-100 included)
    token_logps = fused_linear_logprobs(h_kept, weight, t_kept, ignore_index=_NO_IGNORE, logit_scale=logit_scale,
                                        softcap=softcap)
    out_dtype = torch.float64 if token_logps.dtype == torch.float64 else torch.float32
    sums, _ = segment_sums(token_logps.to(out_dtype), seg_kept, num_seq)
    ref = ref_logps.to(device=sums.device, dtype=out_dtype).detach()
    if average_log_prob or loss_type == "ipo":
        policy = sums / counts.to(out_dtype)
        ref = ref / counts.to(out_dtype)
    else:
        policy = sums
    nll_chosen = None
    if nll_weight > 0:
        nll_chosen = -sums[:b] / counts[:b].to(out_dtype)
    out = _dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta, loss_type, label_smoothing, nll_chosen,
                    nll_weight)
    out.metrics["tokens"] = counts.sum().to(torch.float32)
    return out
