"""Reward-model judge: any Hugging Face ``AutoModelForSequenceClassification`` with one output logit.

Each (instruction, response) is rendered with the *reward model's* tokenizer chat template as
``[user: instruction, assistant: response]`` (the format RMs such as Skywork-Reward or ArmoRM were trained on)
and the score is the scalar logit at the last token. Batches are left-padded with explicit position ids, so
the last position of every row is its last real token and a batched score equals the unbatched one.
Special-token strings in the instruction or the response are escaped first
(:func:`tpo_lite.special_tokens.escape_special_tokens`), so neither can forge a turn of the conversation.
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import TpoError
from ..special_tokens import escape_special_tokens
from .base import JudgeResult, fingerprint, instruction_text, sigmoid

__all__ = ["RewardModelJudge", "resolve_device_dtype"]


def resolve_device_dtype(device: str, dtype: str):
    """Map config strings to a torch device and dtype (``auto``: CUDA + bf16 when available, else CPU fp32)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise TpoError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(table)}", field="judge.dtype")
    return torch.device(device), table[dtype]


class RewardModelJudge:
    """Scores responses with a sequence-classification reward model.

    Build it from a path (``RewardModelJudge.from_pretrained(path, ...)``) or from an already loaded
    ``model`` and ``tokenizer``. ``max_length`` truncates the rendered conversation (at the end; the result
    is flagged ``truncated`` in its details).
    """

    kind = "reward_model"

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 4096, name: str | None = None,
                 identity_extra: Any = None):
        if getattr(tokenizer, "chat_template", None) in (None, ""):
            raise TpoError("the reward model's tokenizer has no chat template; a reward model must be scored "
                           "in the conversation format it was trained on", field="judge.model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        model_id = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        self.name = name or f"reward_model:{model_id}"
        self.identity = fingerprint("reward_model", self.name, self.max_length, str(next(model.parameters()).dtype),
                                    identity_extra)
        self._pad_id = tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                        max_length: int = 4096) -> "RewardModelJudge":
        """Load the RM and its tokenizer from a local directory or hub id."""
        import os

        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not path:
            raise TpoError("the reward_model judge needs a model path", field="judge.model")
        dev, dt = resolve_device_dtype(device, dtype)
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dt).to(dev)
        except (OSError, ValueError) as e:
            raise TpoError(f"cannot load a sequence-classification reward model: {e}", path=path,
                           field="judge.model") from e
        if getattr(model.config, "num_labels", 1) != 1:
            raise TpoError(f"the reward model has {model.config.num_labels} output labels; a scalar reward "
                           "model (num_labels = 1) is needed", path=path, field="judge.model")
        return cls(model, tok, batch_size=batch_size, max_length=max_length,
                   name=f"reward_model:{os.path.basename(os.path.normpath(path))}",
                   identity_extra=os.path.abspath(path) if os.path.exists(path) else path)

    def escape(self, text: str, field: str = "response") -> str:
        """``text`` as it is shown to the reward model: special-token strings escaped."""
        return escape_special_tokens(text, self.tokenizer, field=field)

    def _render(self, instruction: str, response: str) -> list[int]:
        conv = [{"role": "user", "content": self.escape(instruction, "instruction")},
                {"role": "assistant", "content": self.escape(response)}]
        text = self.tokenizer.apply_chat_template(conv, tokenize=False)
        # The template already holds any BOS/special tokens: do not add them twice.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _forward(self, batch: list[list[int]]):
        import torch

        device = next(self.model.parameters()).device
        from ..models import left_pad

        ids, mask, pos = left_pad(batch, self._pad_id)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        m = self.model
        base = getattr(m, getattr(m, "base_model_prefix", ""), None)
        head = getattr(m, "score", None)
        if base is not None and isinstance(head, torch.nn.Module):
            # Standard HF *ForSequenceClassification layout: run the backbone and read the head at the last
            # position ourselves, because HF's own pooling looks for the last non-pad token and would skip a
            # trailing EOS whenever the pad token is the EOS token.
            hidden = base(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            logits = head(hidden[:, -1, :])
        else:
            # Custom RM code: it pools by itself (left padding keeps the last token real).
            logits = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        if logits.dim() != 2 or logits.shape[-1] != 1:
            raise TpoError(f"the reward model returned logits of shape {tuple(logits.shape)}; a scalar reward "
                           "(one logit) is needed", field="judge.model")
        return logits[:, 0].float().cpu().tolist()

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        import torch

        text = instruction_text(instruction)
        scores: list[float | None] = [None] * len(responses)
        details: list[dict] = [{"invalid": True} if r is None else {} for r in responses]
        todo = [(i, self._render(text, r)) for i, r in enumerate(responses) if r is not None]
        for i, ids in todo:
            if len(ids) > self.max_length:
                details[i]["truncated"] = True
        todo = [(i, ids[: self.max_length]) for i, ids in todo]
        # Similar lengths together: less padding, fewer wasted FLOPs.
        todo.sort(key=lambda t: len(t[1]))
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                for (i, _), s in zip(chunk, self._forward([ids for _, ids in chunk])):
                    if not math.isfinite(s):
                        raise TpoError(f"the reward model returned a non-finite score ({s}) for response {i}",
                                       field="judge.model")
                    scores[i] = float(s)
                    details[i]["reward"] = float(s)
        return JudgeResult(scores, details)

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        """P(a better than b) under the Bradley-Terry reading of rewards: ``sigmoid(r_a - r_b)``."""
        ra, rb = self.score(instruction, [response_a, response_b]).scores
        return sigmoid(ra - rb)
