"""Fused kernels: per-token log-probs straight from hidden states and the LM head, and the DPO loss."""
from .dpo import LOSS_TYPES, DPOOutput, dpo_loss, fused_dpo_loss
from .linear_logprobs import fused_linear_logprobs
from .reference import linear_logprobs_reference

__all__ = ["fused_linear_logprobs", "linear_logprobs_reference", "DPOOutput", "dpo_loss", "fused_dpo_loss",
           "LOSS_TYPES"]
