"""CUDA fused linear log-probs (tpo_lite._C_cuda): values and gradients against the float64 reference and the
CPU kernel. Skipped without a GPU; on a GPU the extension must load (pip build or JIT), not fall back."""
import pytest
import torch

from tpo_lite.ops import _ext, fused_linear_logprobs, linear_logprobs_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


@pytest.fixture(scope="module")
def cuda_ext():
    return _ext.require("cuda")  # a missing / failing build is a failure here, not a silent fallback


def _inputs(n, d, v, dtype, seed=0, logit_std=3.0, ignore_every=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * (logit_std / d**0.5)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = -100
    # Round to the test dtype first so the float64 reference sees exactly the kernel's inputs.
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    return hidden.to(DEV), weight.to(DEV), targets.to(DEV)


def _reference(hidden, weight, targets, grad_out, *, ignore_index=-100, logit_scale=1.0, softcap=None,
               need_weight_grad=False):
    """float64 log-probs and gradients of sum(grad_out * logp)."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(need_weight_grad)
    logp = linear_logprobs_reference(h, w, targets, ignore_index, logit_scale, softcap)
    (logp * grad_out.double()).sum().backward()
    return logp.detach(), h.grad, (w.grad if need_weight_grad else None)


def _fused(hidden, weight, targets, grad_out, *, need_weight_grad=False, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(need_weight_grad)
    logp = fused_linear_logprobs(h, w, targets, **kw)
    (logp * grad_out.to(logp.dtype)).sum().backward()
    return logp.detach(), h.grad, (w.grad if need_weight_grad else None)


def _close(actual, expected, rtol, atol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    worst = int((err - bound).argmax())
    assert bool((err <= bound).all()), (
        f"{what}: max error {float(err.max()):.3g} (at flat index {worst}: got {float(actual.flatten()[worst]):.6g}, "
        f"want {float(expected.flatten()[worst]):.6g})")


# (n, d, V, chunk): V not a multiple of the chunk, N = 1, a single chunk, the default chunk.
SHAPES = [(1, 16, 97, 32), (37, 64, 1000, 128), (64, 128, 5003, 1024), (300, 96, 4099, 0)]


@pytest.mark.parametrize("n,d,v,chunk", SHAPES)
def test_fp32_values_and_grads_vs_float64(cuda_ext, n, d, v, chunk):
    hidden, weight, targets = _inputs(n, d, v, torch.float32, seed=n, ignore_every=5 if n > 1 else 0)
    grad_out = torch.randn(n, device=DEV, dtype=torch.float32)
    ref_lp, ref_gh, _ = _reference(hidden, weight, targets, grad_out)
    lp, gh, _ = _fused(hidden, weight, targets, grad_out, chunk=chunk)
    assert lp.dtype == torch.float32 and lp.shape == (n,)
    _close(lp, ref_lp, 1e-5, 2e-5, "logp")
    _close(gh, ref_gh, 1e-4, 2e-5, "grad_hidden")
    assert bool((lp[targets == -100] == 0).all()) and bool((gh[targets == -100] == 0).all())


@pytest.mark.parametrize("n,d,v,chunk", SHAPES[1:3])
def test_trainable_head_grads_vs_float64(cuda_ext, n, d, v, chunk):
    hidden, weight, targets = _inputs(n, d, v, torch.float32, seed=7, ignore_every=4)
    grad_out = torch.randn(n, device=DEV, dtype=torch.float32)
    ref_lp, ref_gh, ref_gw = _reference(hidden, weight, targets, grad_out, need_weight_grad=True)
    lp, gh, gw = _fused(hidden, weight, targets, grad_out, need_weight_grad=True, chunk=chunk)
    _close(lp, ref_lp, 1e-5, 2e-5, "logp")
    _close(gh, ref_gh, 1e-4, 2e-5, "grad_hidden")
    _close(gw, ref_gw, 1e-4, 2e-5, "grad_weight")
    assert gw.dtype == torch.float32 and gw.shape == (v, d)


@pytest.mark.parametrize("softcap,logit_scale", [(None, 0.5), (30.0, 1.0), (5.0, 2.0)])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_softcap_and_logit_scale_fp64(cuda_ext, softcap, logit_scale, trainable_head):
    hidden, weight, targets = _inputs(45, 32, 777, torch.float64, seed=3, logit_std=8.0, ignore_every=6)
    grad_out = torch.randn(45, device=DEV, dtype=torch.float64)
    kw = dict(logit_scale=logit_scale, softcap=softcap)
    ref = _reference(hidden, weight, targets, grad_out, need_weight_grad=trainable_head, **kw)
    got = _fused(hidden, weight, targets, grad_out, need_weight_grad=trainable_head, chunk=100, **kw)
    assert got[0].dtype == torch.float64
    for a, b, what in zip(got, ref, ("logp", "grad_hidden", "grad_weight")):
        if b is not None:
            _close(a, b, 1e-10, 1e-10, what)


def test_gradcheck_fp64(cuda_ext):
    hidden, weight, targets = _inputs(6, 5, 23, torch.float64, seed=11)
    targets[2] = -100
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)

    def fn(h, w):
        return fused_linear_logprobs(h, w, targets, softcap=4.0, logit_scale=1.5, chunk=7)

    # nondet_tol: the re-run backward may differ in the last bits if cuBLAS picks another algorithm.
    assert torch.autograd.gradcheck(fn, (h, w), eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12)
    h2 = hidden.clone().requires_grad_(True)  # frozen head: the folded-gradient path
    assert torch.autograd.gradcheck(lambda h: fn(h, weight), (h2,), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    nondet_tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("trainable_head", [False, True])
def test_half_precision_vs_float64(cuda_ext, dtype, trainable_head):
    n, d, v = 96, 128, 3001
    hidden, weight, targets = _inputs(n, d, v, dtype, seed=5, ignore_every=7)
    grad_out = torch.randn(n, device=DEV, dtype=torch.float32)
    ref_lp, ref_gh, ref_gw = _reference(hidden, weight, targets, grad_out, need_weight_grad=trainable_head)
    lp, gh, gw = _fused(hidden, weight, targets, grad_out, need_weight_grad=trainable_head, chunk=512)
    assert lp.dtype == torch.float32 and gh.dtype == dtype
    # The products accumulate in fp32 and the logits stay fp32, so logp is close to float64 on the same
    # (rounded) inputs; gradients carry the input dtype's rounding (8 / 11 mantissa bits).
    _close(lp, ref_lp, 1e-4, 1e-3, "logp")
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    scale_h = float(ref_gh.abs().max())
    _close(gh, ref_gh, tol, tol * scale_h, "grad_hidden")
    if trainable_head:
        assert gw.dtype == dtype
        _close(gw, ref_gw, tol, tol * float(ref_gw.abs().max()), "grad_weight")


def test_half_precision_is_not_worse_than_eager(cuda_ext):
    # bf16 eager (logits rounded to bf16 by the product) is the baseline users compare against.
    hidden, weight, targets = _inputs(128, 256, 8192, torch.bfloat16, seed=9, logit_std=6.0)
    ref = linear_logprobs_reference(hidden.double(), weight.double(), targets)
    fused_err = (fused_linear_logprobs(hidden, weight, targets).double() - ref).abs().max()
    eager_err = (torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None])[:, 0].double()
                 - ref).abs().max()
    assert float(fused_err) <= float(eager_err) + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_are_finite_and_right(cuda_ext, dtype):
    # Logits up to +-1e4: one-hot hidden rows pick weight columns with entries of +-1e4.
    n, d, v = 8, 8, 300
    g = torch.Generator().manual_seed(0)
    weight = ((torch.rand(v, d, generator=g) * 2 - 1) * 1e4).round().to(dtype)
    hidden = torch.zeros(n, d, dtype=dtype)
    hidden[torch.arange(n), torch.arange(n) % d] = 1
    targets = torch.randint(0, v, (n,), generator=g)
    targets[0] = int(weight[:, 0].float().argmax())  # the max logit: logp ~ 0
    hidden, weight, targets = hidden.to(DEV), weight.to(DEV), targets.to(DEV)
    grad_out = torch.ones(n, device=DEV)
    ref_lp, ref_gh, _ = _reference(hidden, weight, targets, grad_out)
    lp, gh, _ = _fused(hidden, weight, targets, grad_out, chunk=64)
    assert torch.isfinite(lp).all() and torch.isfinite(gh.float()).all()
    # Exact integer logits: what remains is fp32 rounding of lse ~ 1e4 (ulp 1e-3).
    _close(lp, ref_lp, 1e-6, 2e-3, "logp")
    _close(gh, ref_gh, 1e-2, 1e-2 * float(ref_gh.abs().max()), "grad_hidden")
    # Scaled and capped on top: still finite.
    lp2 = fused_linear_logprobs(hidden, weight, targets, logit_scale=3.0, softcap=50.0)
    _close(lp2, linear_logprobs_reference(hidden.double(), weight.double(), targets, logit_scale=3.0, softcap=50.0),
           1e-5, 1e-3, "logp (scaled, capped)")


def test_matches_cpu_kernel_entry_points(cuda_ext):
    cpu_ext = _ext.get_extension("cpu")
    if cpu_ext is None:
        pytest.skip("CPU kernel extension unavailable")
    hidden, weight, targets = _inputs(50, 64, 2050, torch.float32, seed=2, ignore_every=3)
    args = (-100, 1.3, 20.0, 300)
    got = cuda_ext.linear_logprobs_forward(hidden, weight, targets, *args, True)
    want = cpu_ext.linear_logprobs_forward(hidden.cpu(), weight.cpu(), targets.cpu(), *args, True)
    valid = (targets != -100).cpu()
    for a, b, what in zip(got, want, ("logp", "lse", "J")):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        # lse of an ignored row is unspecified (the row is dropped before the products)
        _close(a.cpu()[valid], b[valid], 1e-5, 2e-5, what)
    assert bool((got[0].cpu()[~valid] == 0).all()) and bool((got[2].cpu()[~valid] == 0).all())
    grad = torch.randn(50)
    lse = want[1]
    gh, gw = cuda_ext.linear_logprobs_backward(grad.to(DEV), hidden, weight, targets, lse.to(DEV), *args, True, True)
    ch, cw = cpu_ext.linear_logprobs_backward(grad, hidden.cpu(), weight.cpu(), targets.cpu(), lse, *args, True, True)
    _close(gh, ch, 1e-4, 2e-5, "grad_hidden")
    _close(gw, cw, 1e-4, 2e-5, "grad_weight")
    # no-grad forward: J is an empty tensor, logp identical to the grad-mode forward
    lp, _, J = cuda_ext.linear_logprobs_forward(hidden, weight, targets, *args, False)
    assert J.numel() == 0
    _close(lp, got[0], 0, 1e-6, "logp (no grad)")


def test_ignore_index_all_and_custom(cuda_ext):
    hidden, weight, targets = _inputs(10, 16, 50, torch.float32, seed=4)
    h = hidden.clone().requires_grad_(True)
    lp = fused_linear_logprobs(h, weight, torch.full_like(targets, -100))
    lp.sum().backward()
    assert bool((lp == 0).all()) and bool((h.grad == 0).all())
    # a custom ignore_index
    t = targets.clone()
    t[3] = 7777
    lp = fused_linear_logprobs(hidden, weight, t, ignore_index=7777)
    ref = linear_logprobs_reference(hidden.double(), weight.double(), t, ignore_index=7777)
    _close(lp, ref, 1e-5, 2e-5, "logp")
    assert float(lp[3]) == 0.0


def test_non_contiguous_inputs(cuda_ext):
    hidden, weight, targets = _inputs(20, 32, 300, torch.float32, seed=8)
    h_nc = torch.cat([hidden, hidden], 1)[:, ::2]  # strided view with the same values
    w_nc = weight.t().contiguous().t()
    assert not h_nc.is_contiguous() and not w_nc.is_contiguous()
    _close(fused_linear_logprobs(h_nc, w_nc, targets), linear_logprobs_reference(hidden.double(), weight.double(),
                                                                                   targets), 1e-5, 2e-5, "logp")


def test_bad_input_raises(cuda_ext):
    hidden, weight, targets = _inputs(4, 8, 20, torch.float32)
    bad = targets.clone()
    bad[2] = 20
    with pytest.raises(ValueError, match=r"targets\[2\] = 20"):
        fused_linear_logprobs(hidden, weight, bad)
    with pytest.raises(RuntimeError, match=r"targets\[2\] = 20 is outside \[0, 20\)"):
        cuda_ext.linear_logprobs_forward(hidden, weight, bad, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="same device|CUDA tensors"):
        cuda_ext.linear_logprobs_forward(hidden, weight.cpu(), targets, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cuda_ext.linear_logprobs_forward(hidden, weight.double(), targets, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="hidden sizes differ"):
        cuda_ext.linear_logprobs_forward(hidden, weight[:, :4].contiguous(), targets, -100, 1.0, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="int64"):
        cuda_ext.linear_logprobs_forward(hidden, weight, targets.int(), -100, 1.0, 0.0, 0, False)
    with pytest.raises(ValueError):
        fused_linear_logprobs(hidden, weight.cpu(), targets)
    torch.cuda.synchronize()  # no asynchronous error left behind


def test_peak_memory_stays_below_the_logits(cuda_ext):
    n, d, v = 256, 128, 262144
    hidden, weight, targets = _inputs(n, d, v, torch.float32, seed=1)
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
    assert extra < logits_bytes / 4, f"peak extra {extra / 2**20:.1f} MiB vs N x V logits {logits_bytes / 2**20:.0f} MiB"
