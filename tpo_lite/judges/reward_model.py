"""Reward-model judge: any Hugging Face ``AutoModelForSequenceClassification`` with a scalar reward.

Each (instruction, response) is rendered with the *reward model's* tokenizer chat template as
``[user: instruction, assistant: response]`` (the format RMs such as Skywork-Reward or ArmoRM were trained on)
and the score is the scalar reward at the last token. Batches are left-padded with explicit position ids, so
the last position of every row is its last real token and a batched score equals the unbatched one.

A stock transformers class is run as backbone + ``score`` head (read at the last position); a model with its
own code (``trust_remote_code``, e.g. ArmoRM's ``LlamaForRewardModelWithGating``) is called whole and the
reward read from its output's ``score_field``: ``auto`` takes a ``score`` field when there is one -- ArmoRM
returns its gated preference score there, the per-objective ``rewards`` beside it (kept in the details) --
else ``logits``. A repository that ships code is refused unless ``trust_remote_code`` is set: with it off,
transformers would load a stock class without the custom head when the config names a stock model type, as
ArmoRM's (``llama``) does.
Special-token strings in the instruction or the response are escaped first
(:func:`tpo_lite.special_tokens.escape_special_tokens`), so neither can forge a turn of the conversation.
"""
from __future__ import annotations

import math
from typing import Any

from ..errors import TpoError
from ..special_tokens import escape_special_tokens
from .base import Capabilities, Judge, JudgeResult, fingerprint, instruction_text, sigmoid

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


class RewardModelJudge(Judge):
    """Scores responses with a sequence-classification reward model.

    Build it from a path (``RewardModelJudge.from_pretrained(path, ...)``) or from an already loaded
    ``model`` and ``tokenizer``. ``max_length`` truncates the rendered conversation (at the end; the result
    is flagged ``truncated`` in its details).
    """

    capabilities = Capabilities(scores_absolute=True, compares_pairs=True, learned=True)

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 4096, name: str | None = None,
                 identity_extra: Any = None, score_field: str = "auto"):
        if getattr(tokenizer, "chat_template", None) in (None, ""):
            raise TpoError("the reward model's tokenizer has no chat template; a reward model must be scored "
                           "in the conversation format it was trained on", field="judge.model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.score_field = score_field
        model_id = getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
        self.name = name or f"reward_model:{model_id}"
        # score_field only when set: caches of judges that predate it stay valid
        self.identity = fingerprint("reward_model", self.name, self.max_length, str(next(model.parameters()).dtype),
                                    identity_extra, *([score_field] if score_field != "auto" else []))
        self._pad_id = tokenizer.pad_token_id
        if self._pad_id is None:
            self._pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    @classmethod
    def from_pretrained(cls, path: str, batch_size: int = 8, device: str = "auto", dtype: str = "auto",
                        max_length: int = 4096, trust_remote_code: bool = False,
                        score_field: str = "auto") -> "RewardModelJudge":
        """Load the RM and its tokenizer from a local directory or hub id (running the repository's own code
        only with ``trust_remote_code``)."""
        import os

        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        if not path:
            raise TpoError("the reward_model judge needs a model path", field="judge.model")
        dev, dt = resolve_device_dtype(device, dtype)
        refuse = ("the reward model ships its own code ({}); set judge.trust_remote_code = true to run it (only for "
                  "a repository whose code you trust)")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            if isinstance(e, ValueError) and not trust_remote_code and "trust_remote_code" in str(e):
                # a model type only its own code defines
                raise TpoError(refuse.format("its config class"), path=path, field="judge.trust_remote_code") from e
            raise TpoError(f"cannot load a sequence-classification reward model: {e}", path=path,
                           field="judge.model") from e
        auto_map = getattr(config, "auto_map", None)
        custom = auto_map.get("AutoModelForSequenceClassification") if isinstance(auto_map, dict) else None
        if custom and not trust_remote_code:
            # transformers would quietly load the stock class of config.model_type (ArmoRM: llama) without the
            # custom head, and score with a random one
            raise TpoError(refuse.format(f"auto_map: {custom}"), path=path, field="judge.trust_remote_code")
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=dt, trust_remote_code=trust_remote_code).to(dev)
        except (OSError, ValueError) as e:
            raise TpoError(f"cannot load a sequence-classification reward model: {e}", path=path,
                           field="judge.model") from e
        if not custom and score_field in ("auto", "logits") and getattr(model.config, "num_labels", 1) != 1:
            raise TpoError(f"the reward model has {model.config.num_labels} output labels; a scalar reward "
                           "model (num_labels = 1) is needed", path=path, field="judge.model")
        return cls(model, tok, batch_size=batch_size, max_length=max_length,
                   name=f"reward_model:{os.path.basename(os.path.normpath(path))}",
                   identity_extra=os.path.abspath(path) if os.path.exists(path) else path, score_field=score_field)

    def escape(self, text: str, field: str = "response") -> str:
        """``text`` as it is shown to the reward model: special-token strings escaped."""
        return escape_special_tokens(text, self.tokenizer, field=field)

    def _render(self, instruction: str, response: str) -> list[int]:
        conv = [{"role": "user", "content": self.escape(instruction, "instruction")},
                {"role": "assistant", "content": self.escape(response)}]
        text = self.tokenizer.apply_chat_template(conv, tokenize=False)
        # The template already holds any BOS/special tokens: do not add them twice.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _forward(self, batch: list[list[int]]) -> tuple[list[float], list[list[float]] | None]:
        """The reward of each sequence, and the per-objective rewards of a multi-objective RM (else None)."""
        import torch

        device = next(self.model.parameters()).device
        from ..models import left_pad

        ids, mask, pos = left_pad(batch, self._pad_id)
        ids, mask, pos = ids.to(device), mask.to(device), pos.to(device)
        m = self.model
        base = getattr(m, getattr(m, "base_model_prefix", ""), None)
        head = getattr(m, "score", None)
        stock = type(m).__module__.startswith("transformers.")  # remote code lives in transformers_modules.*
        objectives = None
        if stock and self.score_field in ("auto", "logits") and base is not None and isinstance(head, torch.nn.Module):
            # Standard HF *ForSequenceClassification layout: run the backbone and read the head at the last
            # position ourselves, because HF's own pooling looks for the last non-pad token and would skip a
            # trailing EOS whenever the pad token is the EOS token.
            hidden = base(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
            name, value = "logits", head(hidden[:, -1, :])
        else:
            # Custom RM code: it pools by itself (left padding keeps the last token real).
            out = m(input_ids=ids, attention_mask=mask, position_ids=pos)
            name = self.score_field
            if name == "auto":
                name = "score" if _output_field(out, "score") is not None else "logits"
            value = _output_field(out, name)
            if value is None:
                have = ", ".join(k for k in _output_fields(out)) or "none"
                raise TpoError(f"the reward model's output has no field {name!r} (it has: {have}); set "
                               "judge.score_field to the one holding the reward", field="judge.score_field")
            rewards = _output_field(out, "rewards") if name == "score" else None
            if isinstance(rewards, torch.Tensor) and rewards.dim() == 2 and rewards.shape[0] == len(batch):
                objectives = rewards.float().cpu().tolist()
        if not isinstance(value, torch.Tensor) or not (
                value.dim() == 1 or (value.dim() == 2 and value.shape[-1] == 1)) or value.shape[0] != len(batch):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TpoError(f"the reward model returned {name} of shape {shape}; a scalar reward (one value per "
                           "sequence) is needed", field="judge.model")
        return value.reshape(-1).float().cpu().tolist(), objectives

    def score(self, instruction: Any, responses: list[str | None]) -> JudgeResult:
        import torch

        text = instruction_text(instruction)
        res = JudgeResult.unscored(responses)
        scores, details = res.scores, res.details
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
                values, objectives = self._forward([ids for _, ids in chunk])
                for k, ((i, _), s) in enumerate(zip(chunk, values)):
                    if not math.isfinite(s):
                        raise TpoError(f"the reward model returned a non-finite score ({s}) for response {i}",
                                       field="judge.model")
                    scores[i] = float(s)
                    details[i]["reward"] = float(s)
                    if objectives is not None:
                        details[i]["rewards"] = objectives[k]
        return res

    def compare(self, instruction: Any, response_a: str, response_b: str) -> float:
        """P(a better than b) under the Bradley-Terry reading of rewards: ``sigmoid(r_a - r_b)``."""
        ra, rb = self.score(instruction, [response_a, response_b]).scores
        return sigmoid(ra - rb)


def _output_fields(out) -> list[str]:
    """The field names of a model output (a ModelOutput / dict, or an object with attributes)."""
    return list(out.keys()) if hasattr(out, "keys") else [k for k in vars(out) if not k.startswith("_")]


def _output_field(out, name: str):
    """Field ``name`` of a model output, or None."""
    if hasattr(out, "keys"):
        return out.get(name) if name in out.keys() else None
    return getattr(out, name, None)
