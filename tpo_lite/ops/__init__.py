"""Fused kernels: per-token log-probs straight from hidden states and the LM head, and the DPO loss.

The ops import torch; they are loaded on first use, so that importing ``tpo_lite.ops.loss_types`` (the
``[train]`` config does) does not pull torch into a run's driver process.
"""
import importlib

_WHERE = {"fused_linear_logprobs": "linear_logprobs", "linear_logprobs_reference": "reference",
          "DPOOutput": "dpo", "dpo_loss": "dpo", "fused_dpo_loss": "dpo", "LOSS_TYPES": "loss_types"}
__all__ = list(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
