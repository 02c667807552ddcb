"""fused_linear_logprobs (CPU kernel + autograd wrapper) against the float64 PyTorch reference."""
import math
import warnings

import pytest
import torch

from tpo_lite.ops import _ext
from tpo_lite.ops import linear_logprobs as llp_mod
from tpo_lite.ops.linear_logprobs import fused_linear_logprobs
from tpo_lite.ops.reference import linear_logprobs_reference


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)  # the upstream gradients below come from the global generator


@pytest.fixture(scope="module")
def ext():
    """The compiled CPU kernels; these tests are about them, so a missing build is a failure, not a skip."""
    mod = _ext.get_extension("cpu")
    assert mod is not None, "the CPU extension failed to build (see the RuntimeWarning from tpo_lite.ops._ext)"
    return mod


def make(N, d, V, dtype=torch.float64, ignore_frac=0.2, seed=0, wscale=None, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64) * (wscale or 1.0 / math.sqrt(d)) * 3
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        targets[torch.rand(N, generator=g) < ignore_frac] = ignore_index
    return hidden.to(dtype), weight.to(dtype), targets


def ref_grads(hidden, weight, targets, gout, need_w=True, **kw):
    """Reference logp and grads, in float64 on float64 copies of the (possibly rounded) inputs."""
    h = hidden.detach().double().clone().requires_grad_()
    w = weight.detach().double().clone().requires_grad_(need_w)
    out = linear_logprobs_reference(h, w, targets, **kw)
    grads = torch.autograd.grad(out, (h, w) if need_w else (h,), gout.double())
    return out.detach(), grads[0], (grads[1] if need_w else None)


def fused_grads(hidden, weight, targets, gout, need_h=True, need_w=True, **kw):
    h = hidden.detach().clone().requires_grad_(need_h)
    w = weight.detach().clone().requires_grad_(need_w)
    out = fused_linear_logprobs(h, w, targets, **kw)
    out.backward(gout.to(out.dtype))
    return out.detach(), h.grad, w.grad


def close(a, b, atol, rtol=0.0):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------------
# values and gradients in float64 (tight) and float32


@pytest.mark.parametrize(
    "N,d,V,chunk",
    [(1, 8, 37, 16), (13, 24, 100, 32), (64, 32, 1000, 128), (50, 16, 257, 0), (7, 5, 11, 1)],
)
@pytest.mark.parametrize("need_w", [False, True], ids=["frozen_head", "trainable_head"])
def test_float64_values_and_grads(ext, N, d, V, chunk, need_w):
    hidden, weight, targets = make(N, d, V)
    gout = torch.randn(N, dtype=torch.float64)
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout)
    lp, gh, gw = fused_grads(hidden, weight, targets, gout, need_w=need_w, chunk=chunk)
    assert lp.dtype == torch.float64 and lp.shape == (N,)
    close(lp, lp_r, 1e-12)
    close(gh, gh_r, 1e-12)
    if need_w:
        close(gw, gw_r, 1e-12)
    else:
        assert gw is None
    ignored = targets == -100
    assert torch.all(lp[ignored] == 0) and torch.all(gh[ignored] == 0)


def test_weight_only_grad(ext):
    hidden, weight, targets = make(20, 16, 300)
    gout = torch.randn(20, dtype=torch.float64)
    _, _, gw_r = ref_grads(hidden, weight, targets, gout)
    _, gh, gw = fused_grads(hidden, weight, targets, gout, need_h=False, need_w=True, chunk=64)
    assert gh is None
    close(gw, gw_r, 1e-12)


@pytest.mark.parametrize("need_w", [False, True])
def test_float32_against_float64(ext, need_w):
    hidden, weight, targets = make(96, 64, 3001, dtype=torch.float32)
    gout = torch.randn(96, dtype=torch.float64)
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout)
    lp, gh, gw = fused_grads(hidden, weight, targets, gout, need_w=need_w, chunk=512)
    assert lp.dtype == torch.float32 and gh.dtype == torch.float32
    close(lp, lp_r, 2e-5, 1e-5)
    close(gh, gh_r, 2e-5, 1e-4)
    if need_w:
        assert gw.dtype == torch.float32
        close(gw, gw_r, 2e-5, 1e-4)


def test_chunk_size_does_not_change_result(ext):
    hidden, weight, targets = make(33, 16, 1000)
    outs = [fused_linear_logprobs(hidden, weight, targets, chunk=c) for c in (1, 7, 64, 999, 1000, 5000, 0)]
    for o in outs[1:]:
        close(o, outs[0], 1e-12)


def test_large_d(ext):
    hidden, weight, targets = make(8, 4096, 300, dtype=torch.float32)
    gout = torch.randn(8, dtype=torch.float64)
    lp_r, gh_r, _ = ref_grads(hidden, weight, targets, gout, need_w=False)
    lp, gh, _ = fused_grads(hidden, weight, targets, gout, need_w=False, chunk=64)
    close(lp, lp_r, 1e-4, 1e-5)
    close(gh, gh_r, 1e-5, 1e-4)


def test_every_target_ignored(ext):
    hidden, weight, targets = make(6, 8, 50)
    targets[:] = -100
    lp, gh, gw = fused_grads(hidden, weight, targets, torch.ones(6, dtype=torch.float64), need_w=True)
    assert torch.equal(lp, torch.zeros(6, dtype=torch.float64))
    assert torch.equal(gh, torch.zeros_like(hidden)) and torch.equal(gw, torch.zeros_like(weight))
    lp2, gh2, _ = fused_grads(hidden, weight, targets, torch.ones(6, dtype=torch.float64), need_w=False)
    assert torch.equal(lp2, torch.zeros(6, dtype=torch.float64)) and torch.equal(gh2, torch.zeros_like(hidden))


def test_custom_ignore_index_and_int32_targets(ext):
    hidden, weight, targets = make(30, 8, 40, ignore_index=-1)
    lp = fused_linear_logprobs(hidden, weight, targets.int(), ignore_index=-1)
    close(lp, linear_logprobs_reference(hidden, weight, targets, ignore_index=-1), 1e-12)
    assert torch.all(lp[targets == -1] == 0)


def test_empty_batch(ext):
    hidden, weight, _ = make(1, 8, 20)
    h = hidden[:0].clone().requires_grad_()
    out = fused_linear_logprobs(h, weight, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()
    assert h.grad.shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_are_finite_and_correct(ext, dtype):
    # logits of exactly +-1e4 (and everything in between): the online log-sum-exp must not overflow
    N, d, V = 4, 4, 64
    hidden = torch.zeros(N, d, dtype=torch.float64)
    hidden[:, 0] = 100.0
    weight = torch.zeros(V, d, dtype=torch.float64)
    weight[:, 0] = torch.linspace(-100.0, 100.0, V, dtype=torch.float64)
    weight[V // 2 :: 7, 0] = 100.0  # several maxima, some in later chunks
    weight[:, 1] = torch.randn(V, dtype=torch.float64)
    targets = torch.tensor([0, V - 1, V // 2, 5])
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    gout = torch.ones(N, dtype=torch.float64)
    for need_w in (False, True):
        lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout)
        lp, gh, gw = fused_grads(hidden, weight, targets, gout, need_w=need_w, chunk=8)
        assert torch.isfinite(lp).all() and torch.isfinite(gh).all()
        assert lp[0].item() < -1e4  # target at logit -1e4 against a max of +1e4
        close(lp, lp_r, 1e-9 if dtype == torch.float64 else 2e-2, 1e-6)
        # float32 logits near 1e4 carry ~1e-3 rounding each, so p (and the grads, |w| = 100) are good to ~1e-4
        close(gh, gh_r, 1e-9 if dtype == torch.float64 else 0.05, 1e-6)
        if need_w:
            assert torch.isfinite(gw).all()
            close(gw, gw_r, 1e-9 if dtype == torch.float64 else 0.05, 1e-6)


@pytest.mark.parametrize("step", [0.05, 0.5, 3.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_running_max_growth(ext, step, dtype):
    """Logits rising along the vocabulary by `step` per row: the running max moves by 8*step per chunk of 8,
    below and above the lazy-rescale threshold (8) and past exp underflow (> 87) - the folded gradient must
    stay exact in every regime."""
    N, d, V = 6, 3, 80
    hidden = torch.zeros(N, d, dtype=torch.float64)
    hidden[:, 0] = 1.0
    hidden[:, 1] = torch.linspace(-1, 1, N, dtype=torch.float64)
    weight = torch.zeros(V, d, dtype=torch.float64)
    weight[:, 0] = step * torch.arange(V, dtype=torch.float64)
    weight[:, 1] = torch.randn(V, dtype=torch.float64)
    weight[:, 2] = torch.randn(V, dtype=torch.float64)
    targets = torch.tensor([0, 10, 40, 79, 78, 3])
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    gout = torch.randn(N, dtype=torch.float64)
    lp_r, gh_r, _ = ref_grads(hidden, weight, targets, gout, need_w=False)
    lp, gh, _ = fused_grads(hidden, weight, targets, gout, need_w=False, chunk=8)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    close(lp, lp_r, tol * max(1.0, step * V / 10), 1e-6)
    close(gh, gh_r, tol * max(1.0, step * V / 10), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_half_precision_matches_eager_accuracy(ext, dtype, softcap):
    """bf16/fp16: products in the input dtype, reductions in fp32. Against the float64 reference on the same
    rounded inputs, the fused error must be small and no worse than eager PyTorch in that dtype."""
    N, d, V = 64, 96, 2000
    hidden, weight, targets = make(N, d, V, dtype=dtype)
    gout = torch.randn(N, dtype=torch.float64)
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout, softcap=softcap, logit_scale=1.5)
    lp, gh, gw = fused_grads(hidden, weight, targets, gout, need_w=True, softcap=softcap, logit_scale=1.5, chunk=256)
    _, gh_f, _ = fused_grads(hidden, weight, targets, gout, need_w=False, softcap=softcap, logit_scale=1.5, chunk=256)
    assert lp.dtype == torch.float32 and gh.dtype == dtype and gw.dtype == dtype and gh_f.dtype == dtype
    # eager in the same dtype: logits in `dtype`, log_softmax in fp32 (how the reference treats half inputs)
    h_e = hidden.clone().requires_grad_()
    w_e = weight.clone().requires_grad_()
    lp_e = linear_logprobs_reference(h_e, w_e, targets, softcap=softcap, logit_scale=1.5)
    lp_e.backward(gout.float())
    # relative to the largest magnitude: bf16 keeps 8 significant bits (2^-9 = 0.2% rounding), fp16 11
    rel = {torch.bfloat16: 0.02, torch.float16: 0.003}[dtype]
    for name, got, want, eager in (("logp", lp, lp_r, lp_e.detach()), ("grad_hidden", gh, gh_r, h_e.grad),
                                   ("grad_hidden (frozen head)", gh_f, gh_r, h_e.grad),
                                   ("grad_weight", gw, gw_r, w_e.grad)):
        tol = rel * want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        err_eager = (eager.double() - want).abs().max().item()
        assert err < tol, (name, err, err_eager, tol)
        assert err <= 2.0 * err_eager + tol / 10, (name, err, err_eager, tol)


@pytest.mark.parametrize("logit_scale", [0.37, 1.0, 2.5])
@pytest.mark.parametrize("softcap", [None, 0.7, 5.0])
@pytest.mark.parametrize("need_w", [False, True])
def test_logit_scale_and_softcap(ext, logit_scale, softcap, need_w):
    hidden, weight, targets = make(17, 12, 130, wscale=0.6)
    gout = torch.randn(17, dtype=torch.float64)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout, **kw)
    lp, gh, gw = fused_grads(hidden, weight, targets, gout, need_w=need_w, chunk=32, **kw)
    close(lp, lp_r, 1e-11)
    close(gh, gh_r, 1e-11)
    if need_w:
        close(gw, gw_r, 1e-11)
    if softcap is not None:  # the cap really bites: capped logits differ from uncapped ones
        uncapped = linear_logprobs_reference(hidden, weight, targets, logit_scale=logit_scale)
        assert (uncapped - lp_r).abs().max() > 1e-3


def test_softcap_float32(ext):
    hidden, weight, targets = make(40, 32, 1500, dtype=torch.float32, wscale=0.5)
    gout = torch.randn(40, dtype=torch.float64)
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout, softcap=10.0, logit_scale=0.8)
    lp, gh, gw = fused_grads(hidden, weight, targets, gout, softcap=10.0, logit_scale=0.8, chunk=200)
    close(lp, lp_r, 2e-5, 1e-5)
    close(gh, gh_r, 2e-5, 1e-4)
    close(gw, gw_r, 2e-5, 1e-4)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_gradcheck(ext, softcap):
    hidden, weight, targets = make(5, 4, 13, ignore_frac=0.0, wscale=0.5)
    targets[2] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    f = lambda h_, w_: fused_linear_logprobs(h_, w_, targets, logit_scale=1.3, softcap=softcap, chunk=4)
    assert torch.autograd.gradcheck(f, (h, w), eps=1e-6, atol=1e-8)
    # frozen head: the folded forward-gradient path
    assert torch.autograd.gradcheck(lambda h_: f(h_, weight), (h,), eps=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# mode selection: the number of passes over the vocabulary per mode


class _Recorder:
    def __init__(self, mod):
        self.mod, self.calls = mod, []

    def linear_logprobs_forward(self, *a):
        self.calls.append(("forward", a[-1]))
        return self.mod.linear_logprobs_forward(*a)

    def linear_logprobs_backward(self, *a):
        self.calls.append(("backward", a[-2], a[-1]))
        return self.mod.linear_logprobs_backward(*a)


def test_mode_selection(ext, monkeypatch):
    rec = _Recorder(ext)
    monkeypatch.setitem(_ext._cache, "cpu", rec)
    hidden, weight, targets = make(10, 8, 50)
    # no_grad: forward only, without the gradient accumulation
    with torch.no_grad():
        out = fused_linear_logprobs(hidden.clone().requires_grad_(), weight, targets)
    assert not out.requires_grad and rec.calls == [("forward", False)]
    close(out, linear_logprobs_reference(hidden, weight, targets), 1e-12)
    # frozen head: gradient folded into the forward, no backward kernel
    rec.calls.clear()
    fused_grads(hidden, weight, targets, torch.ones(10, dtype=torch.float64), need_w=False)
    assert rec.calls == [("forward", True)]
    # trainable head: plain forward, recompute backward for both grads
    rec.calls.clear()
    fused_grads(hidden, weight, targets, torch.ones(10, dtype=torch.float64), need_w=True)
    assert rec.calls == [("forward", False), ("backward", True, True)]


def test_non_contiguous_inputs(ext):
    hidden, weight, targets = make(12, 8, 40)
    h_nc = hidden.t().contiguous().t()
    w_nc = torch.stack([weight, -weight], -1)[..., 0]  # row stride 2d, column stride 2
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    close(fused_linear_logprobs(h_nc, w_nc, targets), linear_logprobs_reference(hidden, weight, targets), 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda h, w, t: (h[0], w, t), "hidden must be 2-D"),
        (lambda h, w, t: (h, w[:, :-1], t), "hidden size d must match"),
        (lambda h, w, t: (h, w, t[:-1]), "targets has 3 entries but hidden has N = 4"),
        (lambda h, w, t: (h, w, t.view(2, 2)), "targets must be 1-D"),
        (lambda h, w, t: (h, w.float(), t), "hidden is torch.float64 but weight is torch.float32"),
        (lambda h, w, t: (h.int(), w.int(), t), "dtype must be"),
        (lambda h, w, t: (h, w, t.double()), "targets must be an integer tensor"),
        (lambda h, w, t: (h, w, torch.tensor([0, 1, 10, 2])), r"targets\[2\] = 10 is outside the vocabulary \[0, 10\)"),
        (lambda h, w, t: (h, w, torch.tensor([0, -5, 1, 2])), r"targets\[1\] = -5"),
        (lambda h, w, t: (h, w[:0], t), "empty vocabulary"),
        (lambda h, w, t: (h.to("meta"), w, t), "same device"),
    ],
)
def test_bad_input_raises_value_error(mutate, match):
    hidden, weight, targets = make(4, 3, 10, ignore_frac=0.0)
    h, w, t = mutate(hidden, weight, targets)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(h, w, t)


@pytest.mark.parametrize("kw,match", [({"softcap": 0.0}, "softcap"), ({"softcap": -1.0}, "softcap"),
                                      ({"logit_scale": float("nan")}, "logit_scale"), ({"chunk": -2}, "chunk")])
def test_bad_options_raise_value_error(kw, match):
    hidden, weight, targets = make(4, 3, 10)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(hidden, weight, targets, **kw)


def test_kernel_checks_raise_not_crash(ext):
    """Called directly (bypassing the Python checks), the C++ entry points raise RuntimeError with a message."""
    hidden, weight, targets = make(4, 3, 10, ignore_frac=0.0)
    with pytest.raises(RuntimeError, match=r"targets\[0\] = 99 is outside the vocabulary"):
        ext.linear_logprobs_forward(hidden, weight, torch.tensor([99, 0, 0, 0]), -100, 1.0, 0.0, 0, True)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ext.linear_logprobs_forward(hidden, weight.float(), targets, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.linear_logprobs_forward(hidden[:, :2], weight[:, :2], targets, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="int64"):
        ext.linear_logprobs_forward(hidden, weight, targets.int(), -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="grad_logp"):
        ext.linear_logprobs_backward(torch.ones(3), hidden, weight, targets, torch.ones(4), -100, 1.0, 0.0, 0, True, False)


# ----------------------------------------------------------------------------------------------------------------
# fallback to the reference when no extension can be loaded


def test_fallback_to_reference_with_one_warning(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ext(name, globals=None, locals=None, fromlist=(), level=0):
        if name in ("tpo_lite._C", "tpo_lite._C_cuda"):
            raise ImportError(f"No module named {name!r} (blocked by test)")
        return real_import(name, globals, locals, fromlist, level)

    import importlib

    real_import_module = importlib.import_module

    def no_ext_module(name, package=None):
        if name in ("tpo_lite._C", "tpo_lite._C_cuda"):
            raise ImportError(f"No module named {name!r} (blocked by test)")
        return real_import_module(name, package)

    monkeypatch.setattr(builtins, "__import__", no_ext)
    monkeypatch.setattr(importlib, "import_module", no_ext_module)
    monkeypatch.setenv("TPO_LITE_NO_JIT", "1")
    monkeypatch.setattr(_ext, "_cache", {})
    monkeypatch.setattr(_ext, "_warned", {})

    hidden, weight, targets = make(9, 6, 30)
    with pytest.warns(RuntimeWarning, match="Falling back to the pure-PyTorch reference"):
        out = fused_linear_logprobs(hidden, weight, targets)
    assert _ext._cache == {"cpu": None}
    close(out, linear_logprobs_reference(hidden, weight, targets), 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is emitted once per process, not per call
        h = hidden.clone().requires_grad_()
        fused_linear_logprobs(h, weight, targets).sum().backward()
    _, gh_r, _ = ref_grads(hidden, weight, targets, torch.ones(9, dtype=torch.float64))
    close(h.grad, gh_r, 1e-12)
    with pytest.raises(_ext.ExtensionUnavailable):
        _ext.require("cpu")


def test_unknown_device_kind_rejected():
    with pytest.raises(ValueError, match="kind"):
        _ext.get_extension("tpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(ext):
    hidden, weight, targets = make(300, 64, 5000, dtype=torch.float32)
    gout = torch.randn(300, dtype=torch.float64)
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout)
    for need_w in (False, True):
        lp, gh, gw = fused_grads(hidden.cuda(), weight.cuda(), targets.cuda(), gout.cuda(), need_w=need_w)
        close(lp.cpu(), lp_r, 2e-5, 1e-5)
        close(gh.cpu(), gh_r, 2e-5, 1e-4)
        if need_w:
            close(gw.cpu(), gw_r, 2e-5, 1e-4)
