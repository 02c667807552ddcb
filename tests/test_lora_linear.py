"""The fused LoRA branch (tpo_lite.ops.lora_linear) against a float64 reference and against peft's own layer."""
import pytest
import torch

from tpo_lite.ops.lora_linear import lora_linear_delta
from tpo_lite.ops.reference import lora_linear_delta_reference
from test_train import _cfg_dropout, _saved_bytes, synthetic_pairs
from tpo_lite.train import collate


def _inputs(base_dtype, n=(3, 7), d_in=24, d_out=40, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*n, d_in, generator=g).to(base_dtype).requires_grad_()
    w = torch.randn(d_out, d_in, generator=g).to(base_dtype) / d_in ** 0.5
    a = (torch.randn(r, d_in, generator=g) / d_in ** 0.5).requires_grad_()
    b = (torch.randn(d_out, r, generator=g) * 0.1).requires_grad_()
    return x, w, a, b


def _run(fn, x, w, a, b, scaling, grad_out):
    xs, as_, bs = (t.detach().clone().requires_grad_() for t in (x, a, b))
    out = fn(xs @ w.t(), xs, as_, bs, scaling)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), xs.grad, as_.grad, bs.grad


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [2.0, 0.75])
def test_matches_float64_reference(base_dtype, scaling):
    x, w, a, b = _inputs(base_dtype)
    # the incoming gradient in the base dtype, as autograd hands it over
    grad_out = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(9)).to(base_dtype).float()
    got = _run(lora_linear_delta, x, w, a, b, scaling, grad_out)
    ref = _run(lora_linear_delta_reference, x.double(), w.double(), a.double(), b.double(), scaling,
               grad_out.double())
    # output and x's gradient are in the base dtype; A's and B's in fp32 from base-dtype inputs
    tol = dict(rtol=1e-5, atol=1e-5) if base_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, g_, r_ in zip(("out", "x", "a", "b"), got, ref):
        assert g_.dtype == (base_dtype if name in ("out", "x") else torch.float32), name
        torch.testing.assert_close(g_.double(), r_, **tol, msg=name)


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_matches_peft_order_of_operations(base_dtype):
    """With s a power of two, folding s into B is exact: the same numbers as peft's four ops, up to how the BLAS
    rounds addmm's sum (one base-dtype ulp at most)."""
    x, w, a, b = _inputs(base_dtype, seed=3)
    grad_out = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(4))
    got = _run(lora_linear_delta, x, w, a, b, 2.0, grad_out)
    ref = _run(lora_linear_delta_reference, x, w, a, b, 2.0, grad_out)
    ulp = torch.finfo(base_dtype).eps
    for name, g_, r_ in zip(("out", "x", "a", "b"), got, ref):
        assert g_.dtype == r_.dtype, name
        torch.testing.assert_close(g_, r_, rtol=ulp, atol=1e-6, msg=name)


def test_extreme_values_stay_finite():
    x, w, a, b = _inputs(torch.bfloat16)
    with torch.no_grad():
        x.mul_(1e3)
    out, gx, ga, gb = _run(lora_linear_delta, x, w, a, b, 2.0, torch.full((3, 7, 40), 1e3))
    assert all(torch.isfinite(t).all() for t in (out, gx, ga, gb))


def test_bad_shapes_are_clear():
    x, w, a, b = _inputs(torch.float32)
    y = x @ w.t()
    with pytest.raises(ValueError, match="a must be \\[r, d_in\\]"):
        lora_linear_delta(y, x, a, b.t(), 2.0)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear_delta(y[..., :5], x, a, b, 2.0)
    with pytest.raises(ValueError, match="share a dtype"):
        lora_linear_delta(y, x, a, b.double(), 2.0)


# ------------------------------------------------------------------------------------------- on a peft model

def _model(tiny_dir, dtype, lora_dropout=0.0):
    from tpo_lite.models import load_model
    from tpo_lite.train import disable_dropout

    torch.manual_seed(0)
    model, _ = load_model(_cfg_dropout(tiny_dir, dtype, lora_dropout), trainable=True)
    disable_dropout(model)
    for name, p in model.named_parameters():  # a non-zero adapter, so every LoRA path carries gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def _dpo_grads(model, batch):
    from tpo_lite.models import lm_head_weight

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept, out = _saved_bytes(model, batch, lm_head_weight(model), skip=params)
    out.loss.backward()
    return kept, out.loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_layers_give_peft_loss_and_gradients(tiny_dir, dtype):
    """A DPO micro-batch through the fused layers: peft's loss and LoRA gradients, no more kept for the backward
    than with compact_lora_activations (the path training took before), parameters aside."""
    from tpo_lite.models import compact_lora_activations, fuse_lora_layers

    pairs = synthetic_pairs(2, seed=4, prompt_len=(20, 30), comp_len=(30, 60))
    batch = collate([(p["prompt_token_ids"], p["chosen_token_ids"]) for p in pairs]
                    + [(p["prompt_token_ids"], p["rejected_token_ids"]) for p in pairs], 0, "cpu")
    peft_model = _model(tiny_dir, dtype)
    assert compact_lora_activations(peft_model) == 14
    kept_peft, loss_peft, g_peft = _dpo_grads(peft_model, batch)
    fused_model = _model(tiny_dir, dtype)
    assert fuse_lora_layers(fused_model) == 14 and compact_lora_activations(fused_model) == 0
    kept_fused, loss_fused, g_fused = _dpo_grads(fused_model, batch)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == "float32" else dict(rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(loss_fused, loss_peft, **tol)
    assert g_fused.keys() == g_peft.keys() and len(g_fused) == 28
    for k in g_peft:
        torch.testing.assert_close(g_fused[k], g_peft[k], **tol, msg=k)
    assert kept_fused <= kept_peft, (kept_fused, kept_peft)


def test_fused_layers_defer_to_peft_when_adapters_are_off_or_dropout_is_on(tiny_dir):
    from tpo_lite.models import fuse_lora_layers

    model = _model(tiny_dir, "float32")
    ids = torch.tensor([[5, 9, 17, 33, 4]])
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        adapted_peft = model(input_ids=ids).logits
        assert fuse_lora_layers(model) == 14
        with model.disable_adapter():  # the base model, as the first iteration's reference pass runs it
            torch.testing.assert_close(model(input_ids=ids).logits, base, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted_peft, rtol=1e-5, atol=1e-6)
    # a LoRA dropout switched on after the patch goes back to peft's forward, which applies it
    layer = next(m for m in model.modules() if getattr(m, "_tpo_fused", False))
    layer.lora_dropout["default"] = torch.nn.Dropout(0.5)
    layer.train()
    x = torch.ones(64, layer.base_layer.in_features)
    outs = {tuple(layer(x)[:, 0].tolist()) for _ in range(3)}
    assert len(outs) > 1  # dropout draws differ call to call
    # a model whose LoRA dropout is on is not patched at all
    assert fuse_lora_layers(_model(tiny_dir, "float32", lora_dropout=0.1).train()) == 14  # zeroed by disable_dropout
    from tpo_lite.models import load_model
    dropping, _ = load_model(_cfg_dropout(tiny_dir, "float32", 0.1), trainable=True)
    assert fuse_lora_layers(dropping) == 0
