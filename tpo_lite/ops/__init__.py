"""Fused kernels: per-token log-probs straight from hidden states and the LM head, and the DPO loss."""
from .linear_logprobs import fused_linear_logprobs
from .reference import linear_logprobs_reference

__all__ = ["fused_linear_logprobs", "linear_logprobs_reference"]

try:  # ops/dpo.py is owned separately; keep the package importable while it changes
    from .dpo import DPOOutput, dpo_loss, fused_dpo_loss
except ImportError:  # pragma: no cover
    pass
else:
    __all__ += ["DPOOutput", "dpo_loss", "fused_dpo_loss"]
