"""Fused kernels: per-token log-probs straight from hidden states and the LM head, and the DPO loss."""
from .reference import linear_logprobs_reference

try:
    from .linear_logprobs import fused_linear_logprobs
except ImportError:  # kernels not landed yet: the reference has the same signature
    fused_linear_logprobs = linear_logprobs_reference
from .dpo import DPOOutput, dpo_loss, fused_dpo_loss

__all__ = ["fused_linear_logprobs", "linear_logprobs_reference"]
