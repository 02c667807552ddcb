"""tpo-lite: Thought Preference Optimization on one GPU.

Modules (one concept each): ``prompts`` (thought templates), ``parsing`` (thought/response grammar),
``sampling`` (local and OpenAI-compatible samplers), ``judges`` (reward model, pairwise LLM, programmatic),
``scoring`` (length control), ``pairs`` (chosen/rejected selection), ``train`` (DPO on QLoRA), ``loop``
(iterations, resume), ``evaluate``/``compare``/``stats``/``report`` (outputs, win rates and plots), ``ops``
(fused kernels).
"""

__version__ = "0.1.0"
