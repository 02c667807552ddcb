"""The DPO-family losses :func:`tpo_lite.ops.dpo.dpo_loss` implements (no torch: the ``[train]`` config reads it)."""

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
