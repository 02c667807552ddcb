"""fused_linear_logprobs (the CPU and CUDA kernels + autograd wrapper) against the float64 PyTorch reference.

Most tests take the `device` fixture (conftest.py): they run on the CPU kernel and on the CUDA kernel (skipped
without a GPU), with the same inputs and tolerances. The half-precision accuracy contracts differ by device (the
CPU rounds bf16/fp16 logits like eager PyTorch, CUDA keeps them in fp32) and are tested per device.
"""
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


@pytest.fixture
def ext(device):
    """The compiled kernels of `device`; these tests are about them, so a missing build is a failure, not a skip
    (nor a silent fallback to the reference)."""
    mod = _ext.get_extension(device)
    assert mod is not None, f"the {device} extension failed to build (see the RuntimeWarning from tpo_lite.ops._ext)"
    return mod


@pytest.fixture
def cuda_ext():
    """The CUDA kernels, for the CUDA-only tests (marked `cuda`: skipped without a GPU)."""
    return _ext.require("cuda")


def make(N, d, V, dtype=torch.float64, ignore_frac=0.2, seed=0, wscale=None, ignore_index=-100, device="cpu"):
    """hidden [N, d], weight [V, d] (logits ~ N(0, 3^2) with the default wscale), targets [N], drawn on the CPU
    from ``seed`` in float64, rounded to ``dtype`` (so the float64 reference sees exactly the kernel's inputs)
    and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64) * (wscale or 1.0 / math.sqrt(d)) * 3
    targets = torch.randint(0, V, (N,), generator=g)
    if ignore_frac:
        targets[torch.rand(N, generator=g) < ignore_frac] = ignore_index
    return hidden.to(dtype).to(device), weight.to(dtype).to(device), targets.to(device)


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
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------------
# values and gradients in float64 (tight) and float32


@pytest.mark.parametrize(
    "N,d,V,chunk",
    [(1, 8, 37, 16), (13, 24, 100, 32), (64, 32, 1000, 128), (50, 16, 257, 0), (7, 5, 11, 1)],
)
@pytest.mark.parametrize("need_w", [False, True], ids=["frozen_head", "trainable_head"])
def test_float64_values_and_grads(ext, device, N, d, V, chunk, need_w):
    hidden, weight, targets = make(N, d, V, device=device)
    gout = torch.randn(N, dtype=torch.float64).to(device)
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


def test_weight_only_grad(ext, device):
    hidden, weight, targets = make(20, 16, 300, device=device)
    gout = torch.randn(20, dtype=torch.float64).to(device)
    _, _, gw_r = ref_grads(hidden, weight, targets, gout)
    _, gh, gw = fused_grads(hidden, weight, targets, gout, need_h=False, need_w=True, chunk=64)
    assert gh is None
    close(gw, gw_r, 1e-12)


# (N, d, V, chunk): one row, V not a multiple of the chunk, a single chunk, the default chunk (0)
F32_SHAPES = [(96, 64, 3001, 512), (1, 16, 97, 32), (37, 64, 1000, 128), (64, 128, 5003, 1024), (300, 96, 4099, 0),
              (300, 64, 5000, 0)]


@pytest.mark.parametrize("N,d,V,chunk", F32_SHAPES)
@pytest.mark.parametrize("need_w", [False, True], ids=["frozen_head", "trainable_head"])
def test_float32_against_float64(ext, device, N, d, V, chunk, need_w):
    hidden, weight, targets = make(N, d, V, dtype=torch.float32, ignore_frac=0.2 if N > 1 else 0.0, device=device)
    gout = torch.randn(N, dtype=torch.float64).to(device)
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout)
    lp, gh, gw = fused_grads(hidden, weight, targets, gout, need_w=need_w, chunk=chunk)
    assert lp.dtype == torch.float32 and lp.shape == (N,) and gh.dtype == torch.float32
    close(lp, lp_r, 2e-5, 1e-5)
    close(gh, gh_r, 2e-5, 1e-4)
    ignored = targets == -100
    assert torch.all(lp[ignored] == 0) and torch.all(gh[ignored] == 0)
    if need_w:
        assert gw.dtype == torch.float32 and gw.shape == (V, d)
        close(gw, gw_r, 2e-5, 1e-4)


def test_chunk_size_does_not_change_result(ext, device):
    hidden, weight, targets = make(33, 16, 1000, device=device)
    outs = [fused_linear_logprobs(hidden, weight, targets, chunk=c) for c in (1, 7, 64, 999, 1000, 5000, 0)]
    for o in outs[1:]:
        close(o, outs[0], 1e-12)


def test_large_d(ext, device):
    hidden, weight, targets = make(8, 4096, 300, dtype=torch.float32, device=device)
    gout = torch.randn(8, dtype=torch.float64).to(device)
    lp_r, gh_r, _ = ref_grads(hidden, weight, targets, gout, need_w=False)
    lp, gh, _ = fused_grads(hidden, weight, targets, gout, need_w=False, chunk=64)
    close(lp, lp_r, 1e-4, 1e-5)
    close(gh, gh_r, 1e-5, 1e-4)


def test_every_target_ignored(ext, device):
    hidden, weight, targets = make(6, 8, 50, device=device)
    targets[:] = -100
    ones, zeros = (torch.full((6,), v, dtype=torch.float64, device=device) for v in (1.0, 0.0))
    lp, gh, gw = fused_grads(hidden, weight, targets, ones, need_w=True)
    assert torch.equal(lp, zeros)
    assert torch.equal(gh, torch.zeros_like(hidden)) and torch.equal(gw, torch.zeros_like(weight))
    lp2, gh2, _ = fused_grads(hidden, weight, targets, ones, need_w=False)
    assert torch.equal(lp2, zeros) and torch.equal(gh2, torch.zeros_like(hidden))


@pytest.mark.parametrize("ignore_index", [-1, 7777])  # 7777: outside the vocabulary, still only "ignore"
def test_custom_ignore_index_and_int32_targets(ext, device, ignore_index):
    hidden, weight, targets = make(30, 8, 40, ignore_index=ignore_index, device=device)
    assert bool((targets == ignore_index).any())
    lp = fused_linear_logprobs(hidden, weight, targets.int(), ignore_index=ignore_index)
    close(lp, linear_logprobs_reference(hidden, weight, targets, ignore_index=ignore_index), 1e-12)
    assert torch.all(lp[targets == ignore_index] == 0)


def test_empty_batch(ext, device):
    hidden, weight, _ = make(1, 8, 20, device=device)
    h = hidden[:0].clone().requires_grad_()
    out = fused_linear_logprobs(h, weight, torch.zeros(0, dtype=torch.long, device=device))
    assert out.shape == (0,)
    out.sum().backward()
    assert h.grad.shape == (0, 8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_logits_are_finite_and_correct(ext, device, dtype):
    # logits of exactly +-1e4 (and everything in between): the online log-sum-exp must not overflow
    N, d, V = 4, 4, 64
    hidden = torch.zeros(N, d, dtype=torch.float64)
    hidden[:, 0] = 100.0
    weight = torch.zeros(V, d, dtype=torch.float64)
    weight[:, 0] = torch.linspace(-100.0, 100.0, V, dtype=torch.float64)
    weight[V // 2 :: 7, 0] = 100.0  # several maxima, some in later chunks
    weight[:, 1] = torch.randn(V, dtype=torch.float64)
    targets = torch.tensor([0, V - 1, V // 2, 5], device=device)
    hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
    gout = torch.ones(N, dtype=torch.float64, device=device)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_integer_logits_scaled_and_capped(ext, device, dtype):
    # Logits up to +-1e4: one-hot hidden rows pick weight columns with integer entries up to +-1e4.
    n, d, v = 8, 8, 300
    g = torch.Generator().manual_seed(0)
    weight = ((torch.rand(v, d, generator=g) * 2 - 1) * 1e4).round().to(dtype)
    hidden = torch.zeros(n, d, dtype=dtype)
    hidden[torch.arange(n), torch.arange(n) % d] = 1
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0] = int(weight[:, 0].float().argmax())  # the max logit: logp ~ 0
    hidden, weight, targets = hidden.to(device), weight.to(device), targets.to(device)
    gout = torch.ones(n, dtype=torch.float64, device=device)
    lp_r, gh_r, _ = ref_grads(hidden, weight, targets, gout, need_w=False)
    lp, gh, _ = fused_grads(hidden, weight, targets, gout, need_w=False, chunk=64)
    assert torch.isfinite(lp).all() and torch.isfinite(gh.float()).all()
    # Exact integer logits: what remains is fp32 rounding of lse ~ 1e4 (ulp 1e-3).
    close(lp, lp_r, 2e-3, 1e-6)
    close(gh, gh_r, 1e-2 * float(gh_r.abs().max()), 1e-2)
    # Scaled and capped on top: still finite.
    lp2 = fused_linear_logprobs(hidden, weight, targets, logit_scale=3.0, softcap=50.0)
    close(lp2, linear_logprobs_reference(hidden.double(), weight.double(), targets, logit_scale=3.0, softcap=50.0),
          1e-3, 1e-5)


@pytest.mark.parametrize("step", [0.05, 0.5, 3.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_running_max_growth(ext, device, step, dtype):
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
    targets = torch.tensor([0, 10, 40, 79, 78, 3], device=device)
    hidden, weight = hidden.to(dtype).to(device), weight.to(dtype).to(device)
    gout = torch.randn(N, dtype=torch.float64).to(device)
    lp_r, gh_r, _ = ref_grads(hidden, weight, targets, gout, need_w=False)
    lp, gh, _ = fused_grads(hidden, weight, targets, gout, need_w=False, chunk=8)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    close(lp, lp_r, tol * max(1.0, step * V / 10), 1e-6)
    close(gh, gh_r, tol * max(1.0, step * V / 10), 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_half_precision_matches_eager_accuracy(ext, dtype, softcap):
    """CPU bf16/fp16: products in the input dtype, reductions in fp32. Against the float64 reference on the same
    rounded inputs, the fused error must be small and no worse than eager PyTorch in that dtype. (CUDA keeps the
    logits in fp32: test_half_precision_vs_float64_cuda.)"""
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
def test_logit_scale_and_softcap(ext, device, logit_scale, softcap, need_w):
    hidden, weight, targets = make(17, 12, 130, wscale=0.6, device=device)
    gout = torch.randn(17, dtype=torch.float64).to(device)
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


@pytest.mark.parametrize("softcap,logit_scale", [(None, 0.5), (30.0, 1.0), (5.0, 2.0)])
@pytest.mark.parametrize("need_w", [False, True])
def test_softcap_and_logit_scale_large_logits(ext, device, softcap, logit_scale, need_w):
    hidden, weight, targets = make(45, 32, 777, seed=3, wscale=8.0 / 3 / math.sqrt(32), ignore_frac=1 / 6,
                                   device=device)  # logits ~ N(0, 8^2): a cap of 30 bites
    gout = torch.randn(45, dtype=torch.float64).to(device)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    ref = ref_grads(hidden, weight, targets, gout, need_w=need_w, **kw)
    got = fused_grads(hidden, weight, targets, gout, need_w=need_w, chunk=100, **kw)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, ref):
        if b is not None:
            close(a, b, 1e-10, 1e-10)


def test_softcap_float32(ext, device):
    hidden, weight, targets = make(40, 32, 1500, dtype=torch.float32, wscale=0.5, device=device)
    gout = torch.randn(40, dtype=torch.float64).to(device)
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout, softcap=10.0, logit_scale=0.8)
    lp, gh, gw = fused_grads(hidden, weight, targets, gout, softcap=10.0, logit_scale=0.8, chunk=200)
    close(lp, lp_r, 2e-5, 1e-5)
    close(gh, gh_r, 2e-5, 1e-4)
    close(gw, gw_r, 2e-5, 1e-4)


# (N, d, V, seed, wscale, logit_scale, softcap, chunk, atol, rtol)
GRADCHECK_CASES = [(5, 4, 13, 0, 0.5, 1.3, None, 4, 1e-8, 1e-3), (5, 4, 13, 0, 0.5, 1.3, 2.0, 4, 1e-8, 1e-3),
                   (6, 5, 23, 11, None, 1.5, 4.0, 7, 1e-7, 1e-5)]


@pytest.mark.parametrize("N,d,V,seed,wscale,logit_scale,softcap,chunk,atol,rtol", GRADCHECK_CASES)
def test_gradcheck(ext, device, N, d, V, seed, wscale, logit_scale, softcap, chunk, atol, rtol):
    hidden, weight, targets = make(N, d, V, ignore_frac=0.0, seed=seed, wscale=wscale, device=device)
    targets[2] = -100
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    f = lambda h_, w_: fused_linear_logprobs(h_, w_, targets, logit_scale=logit_scale, softcap=softcap, chunk=chunk)
    # nondet_tol on CUDA: the re-run backward may differ in the last bits if cuBLAS picks another algorithm
    kw = dict(eps=1e-6, atol=atol, rtol=rtol, nondet_tol=1e-12 if device == "cuda" else 0.0)
    assert torch.autograd.gradcheck(f, (h, w), **kw)
    # frozen head: the folded forward-gradient path
    assert torch.autograd.gradcheck(lambda h_: f(h_, weight), (h,), **kw)


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


def test_mode_selection(ext, device, monkeypatch):
    rec = _Recorder(ext)
    monkeypatch.setitem(_ext._cache, device, rec)
    hidden, weight, targets = make(10, 8, 50, device=device)
    ones = torch.ones(10, dtype=torch.float64, device=device)
    # no_grad: forward only, without the gradient accumulation
    with torch.no_grad():
        out = fused_linear_logprobs(hidden.clone().requires_grad_(), weight, targets)
    assert not out.requires_grad and rec.calls == [("forward", False)]
    close(out, linear_logprobs_reference(hidden, weight, targets), 1e-12)
    # frozen head: gradient folded into the forward, no backward kernel
    rec.calls.clear()
    fused_grads(hidden, weight, targets, ones, need_w=False)
    assert rec.calls == [("forward", True)]
    # trainable head: plain forward, recompute backward for both grads
    rec.calls.clear()
    fused_grads(hidden, weight, targets, ones, need_w=True)
    assert rec.calls == [("forward", False), ("backward", True, True)]


def test_non_contiguous_inputs(ext, device):
    hidden, weight, targets = make(12, 8, 40, device=device)
    want = linear_logprobs_reference(hidden, weight, targets)
    h_nc = hidden.t().contiguous().t()
    w_nc = torch.stack([weight, -weight], -1)[..., 0]  # row stride 2d, column stride 2
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    close(fused_linear_logprobs(h_nc, w_nc, targets), want, 1e-12)
    h_nc = hidden.repeat_interleave(2, dim=1)[:, ::2]  # the same values, column stride 2
    w_nc = weight.t().contiguous().t()  # column-major
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    close(fused_linear_logprobs(h_nc, w_nc, targets), want, 1e-12)


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
        (lambda h, w, t: (h, w, t.new_tensor([0, 1, 10, 2])), r"targets\[2\] = 10 is outside the vocabulary \[0, 10\)"),
        (lambda h, w, t: (h, w, t.new_tensor([0, -5, 1, 2])), r"targets\[1\] = -5"),
        (lambda h, w, t: (h, w[:0], t), "empty vocabulary"),
        (lambda h, w, t: (h.to("meta"), w, t), "same device"),
    ],
)
def test_bad_input_raises_value_error(device, mutate, match):
    hidden, weight, targets = make(4, 3, 10, ignore_frac=0.0, device=device)
    h, w, t = mutate(hidden, weight, targets)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(h, w, t)


@pytest.mark.parametrize("kw,match", [({"softcap": 0.0}, "softcap"), ({"softcap": -1.0}, "softcap"),
                                      ({"logit_scale": float("nan")}, "logit_scale"), ({"chunk": -2}, "chunk")])
def test_bad_options_raise_value_error(kw, match):
    hidden, weight, targets = make(4, 3, 10)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(hidden, weight, targets, **kw)


def test_kernel_checks_raise_not_crash(ext, device):
    """Called directly (bypassing the Python checks), the C++ entry points raise RuntimeError with a message (the
    checks of csrc/common.h, shared by both builds, plus each build's device checks)."""
    hidden, weight, targets = make(4, 3, 10, ignore_frac=0.0, device=device)
    fwd = ext.linear_logprobs_forward
    for need_grad in (True, False):  # the first bad position is named
        with pytest.raises(RuntimeError, match=r"targets\[1\] = 99 is outside the vocabulary \[0, 10\)"):
            fwd(hidden, weight, targets.new_tensor([0, 99, 10, 0]), -100, 1.0, 0.0, 0, need_grad)
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 10 is outside the vocabulary"):
        ext.linear_logprobs_backward(torch.ones(4, device=device), hidden, weight, targets.new_tensor([0, 1, 10, 2]),
                                     torch.ones(4, device=device), -100, 1.0, 0.0, 0, False, False)
    with pytest.raises(RuntimeError, match="share a dtype"):
        fwd(hidden, weight.float(), targets, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="the hidden sizes differ"):
        fwd(hidden, weight[:, :2].contiguous(), targets, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="int64"):
        fwd(hidden, weight, targets.int(), -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="chunk must be >= 0"):
        fwd(hidden, weight, targets, -100, 1.0, 0.0, -1, False)
    elsewhere = "meta" if device == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match="must all be CPU tensors|must be CUDA tensors"):
        fwd(hidden, weight.to(elsewhere), targets, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="grad_logp"):
        ext.linear_logprobs_backward(torch.ones(3, device=device), hidden, weight, targets,
                                     torch.ones(4, device=device), -100, 1.0, 0.0, 0, True, False)
    if device == "cpu":  # the CPU kernels refuse non-contiguous input; CUDA copies it
        with pytest.raises(RuntimeError, match="contiguous"):
            fwd(hidden[:, :2], weight[:, :2], targets, -100, 1.0, 0.0, 0, False)
    else:
        torch.cuda.synchronize()  # no asynchronous error left behind


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


# ----------------------------------------------------------------------------------------------------------------
# CUDA only: the fp32-logit accuracy contract, CUDA against the CPU kernels, memory


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("need_w", [False, True], ids=["frozen_head", "trainable_head"])
def test_half_precision_vs_float64_cuda(cuda_ext, dtype, need_w):
    n, d, v = 96, 128, 3001
    hidden, weight, targets = make(n, d, v, dtype=dtype, seed=5, ignore_frac=1 / 7, device="cuda")
    gout = torch.randn(n, dtype=torch.float64).to("cuda")
    lp_r, gh_r, gw_r = ref_grads(hidden, weight, targets, gout, need_w=need_w)
    lp, gh, gw = fused_grads(hidden, weight, targets, gout, need_w=need_w, chunk=512)
    assert lp.dtype == torch.float32 and gh.dtype == dtype
    # The products accumulate in fp32 and the logits stay fp32, so logp is close to float64 on the same
    # (rounded) inputs; gradients carry the input dtype's rounding (8 / 11 mantissa bits).
    close(lp, lp_r, 1e-3, 1e-4)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    close(gh, gh_r, tol * float(gh_r.abs().max()), tol)
    if need_w:
        assert gw.dtype == dtype
        close(gw, gw_r, tol * float(gw_r.abs().max()), tol)


@pytest.mark.cuda
def test_half_precision_is_not_worse_than_eager_cuda(cuda_ext):
    # bf16 eager (logits rounded to bf16 by the product) is the baseline users compare against.
    hidden, weight, targets = make(128, 256, 8192, dtype=torch.bfloat16, seed=9, ignore_frac=0.0, wscale=2.0 / 16,
                                   device="cuda")  # logits ~ N(0, 6^2)
    ref = linear_logprobs_reference(hidden.double(), weight.double(), targets)
    fused_err = (fused_linear_logprobs(hidden, weight, targets).double() - ref).abs().max()
    eager_err = (torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None])[:, 0].double()
                 - ref).abs().max()
    assert float(fused_err) <= float(eager_err) + 1e-6


@pytest.mark.cuda
def test_cuda_matches_cpu_kernel_entry_points(cuda_ext):
    cpu_ext = _ext.get_extension("cpu")
    if cpu_ext is None:
        pytest.skip("CPU kernel extension unavailable")
    hidden, weight, targets = make(50, 64, 2050, dtype=torch.float32, seed=2, ignore_frac=1 / 3, device="cuda")
    args = (-100, 1.3, 20.0, 300)
    got = cuda_ext.linear_logprobs_forward(hidden, weight, targets, *args, True)
    want = cpu_ext.linear_logprobs_forward(hidden.cpu(), weight.cpu(), targets.cpu(), *args, True)
    valid = (targets != -100).cpu()
    for a, b, what in zip(got, want, ("logp", "lse", "J")):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        # lse of an ignored row is unspecified (the row is dropped before the products)
        close(a.cpu()[valid], b[valid], 2e-5, 1e-5)
    assert bool((got[0].cpu()[~valid] == 0).all()) and bool((got[2].cpu()[~valid] == 0).all())
    grad = torch.randn(50)
    lse = want[1]
    gh, gw = cuda_ext.linear_logprobs_backward(grad.cuda(), hidden, weight, targets, lse.cuda(), *args, True, True)
    ch, cw = cpu_ext.linear_logprobs_backward(grad, hidden.cpu(), weight.cpu(), targets.cpu(), lse, *args, True, True)
    close(gh, ch, 2e-5, 1e-4)
    close(gw, cw, 2e-5, 1e-4)
    # no-grad forward: J is an empty tensor, logp identical to the grad-mode forward
    lp, _, J = cuda_ext.linear_logprobs_forward(hidden, weight, targets, *args, False)
    assert J.numel() == 0
    close(lp, got[0], 1e-6)


@pytest.mark.cuda
def test_peak_memory_stays_below_the_logits_cuda(cuda_ext):
    n, d, v = 256, 128, 262144
    hidden, weight, targets = make(n, d, v, dtype=torch.float32, seed=1, ignore_frac=0.0, device="cuda")
    h = hidden.clone().requires_grad_(True)
    fused_linear_logprobs(h, weight, targets).sum().backward()  # warm-up: cuBLAS workspace, allocator pools
    h.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_logprobs(h, weight, targets).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    logits_bytes = n * v * 4
    assert extra < logits_bytes / 4, f"peak extra {extra / 2**20:.1f} MiB vs N x V logits {logits_bytes / 2**20:.0f}"
