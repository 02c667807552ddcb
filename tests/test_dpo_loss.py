"""DPO loss types against hand-computed closed forms, gradients against float64 autograd, fused vs unfused (the
fused loss on each `device`: the CPU and the CUDA kernels)."""
import math

import pytest
import torch

from tpo_lite.ops import DPOOutput, dpo_loss, fused_dpo_loss
from tpo_lite.ops.dpo import LOSS_TYPES


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# One pair with policy chosen/rejected -3 / -5 and reference -4 / -4: h = (−3+4) − (−5+4) = 2.
PC, PR, RC, RR = -3.0, -5.0, -4.0, -4.0
H = (PC - RC) - (PR - RR)


def _one(loss_type, beta=0.1, label_smoothing=0.0):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    return dpo_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)


def test_sigmoid_closed_form():
    out = _one("sigmoid", beta=0.1)
    assert H == 2.0
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), rel=1e-12)  # -log σ(0.2)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(0.1, rel=1e-6)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(-0.1, rel=1e-6)
    assert out.metrics["margins"].item() == pytest.approx(0.2, rel=1e-6)
    assert out.metrics["accuracy"].item() == 1.0


def test_conservative_dpo_closed_form():
    out = _one("sigmoid", beta=0.5, label_smoothing=0.2)
    expected = -0.8 * _logsig(1.0) - 0.2 * _logsig(-1.0)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)


def test_ipo_closed_form():
    out = _one("ipo", beta=0.25)
    assert out.loss.item() == pytest.approx((2.0 - 2.0) ** 2, abs=1e-12)  # 1/(2β) = 2 = h: loss 0
    out = _one("ipo", beta=0.1)
    assert out.loss.item() == pytest.approx((2.0 - 5.0) ** 2, rel=1e-12)


def test_hinge_closed_form():
    assert _one("hinge", beta=0.1).loss.item() == pytest.approx(0.8, rel=1e-12)  # relu(1 − 0.2)
    assert _one("hinge", beta=1.0).loss.item() == 0.0  # relu(1 − 2)


def test_robust_closed_form_and_unbiasedness():
    eps, beta = 0.1, 0.5
    out = _one("robust", beta=beta, label_smoothing=eps)
    expected = ((1 - eps) * -_logsig(1.0) - eps * -_logsig(-1.0)) / (1 - 2 * eps)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    # rDPO's defining property: averaged over the label noise (true order with prob 1−eps, flipped with eps),
    # the robust loss equals the clean DPO loss of the true order.
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    flipped = dpo_loss(t(PR), t(PC), t(RR), t(RC), beta=beta, loss_type="robust", label_smoothing=eps)
    clean = _one("sigmoid", beta=beta)
    assert ((1 - eps) * out.loss + eps * flipped.loss).item() == pytest.approx(clean.loss.item(), rel=1e-12)
    # no noise: robust is plain DPO
    assert _one("robust", beta=beta).loss.item() == pytest.approx(clean.loss.item(), rel=1e-12)


def test_nll_term_and_batch_metrics():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    nll = torch.rand(5, generator=g, dtype=torch.float64)
    base = dpo_loss(pc, pr, rc, rr, beta=0.3)
    out = dpo_loss(pc, pr, rc, rr, beta=0.3, nll_chosen=nll, nll_weight=0.7)
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.7 * nll.mean().item(), rel=1e-12)
    assert out.metrics["nll"].item() == pytest.approx(nll.mean().item(), rel=1e-6)
    margins = 0.3 * ((pc - rc) - (pr - rr))
    assert out.metrics["margins"].item() == pytest.approx(margins.mean().item(), rel=1e-5, abs=1e-7)
    assert out.metrics["accuracy"].item() == pytest.approx((margins > 0).double().mean().item())
    expected = -torch.nn.functional.logsigmoid(margins).mean()
    assert base.loss.item() == pytest.approx(expected.item(), rel=1e-12)


def _plain_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """Written out independently of the library with elementary float64 ops."""
    h = (pc - rc) - (pr - rr)
    ls = lambda x: -torch.log1p(torch.exp(-x))  # noqa: E731  (log σ)
    if loss_type == "sigmoid":
        return (-(1 - eps) * ls(beta * h) - eps * ls(-beta * h)).mean()
    if loss_type == "robust":
        return (((1 - eps) * -ls(beta * h) - eps * -ls(-beta * h)) / (1 - 2 * eps)).mean()
    if loss_type == "ipo":
        return ((h - 1 / (2 * beta)) ** 2).mean()
    return torch.clamp(1 - beta * h, min=0).mean()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_gradients_match_plain_float64(loss_type):
    g = torch.Generator().manual_seed(1)
    vals = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(4)]
    eps = 0.15 if loss_type in ("sigmoid", "robust") else 0.0
    a = [v.clone().requires_grad_(i < 2) for i, v in enumerate(vals)]
    b = [v.clone().requires_grad_(i < 2) for i, v in enumerate(vals)]
    out = dpo_loss(*a, beta=0.4, loss_type=loss_type, label_smoothing=eps)
    ref = _plain_dpo(*b, 0.4, loss_type, eps)
    out.loss.backward()
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(a[0].grad, b[0].grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a[1].grad, b[1].grad, rtol=1e-12, atol=1e-14)


def test_gradcheck_sigmoid_with_nll():
    g = torch.Generator().manual_seed(2)
    pc, pr = (torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    rc, rr = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
    nll = torch.rand(4, generator=g, dtype=torch.float64, requires_grad=True)

    def f(pc, pr, nll):
        return dpo_loss(pc, pr, rc, rr, beta=0.2, label_smoothing=0.1, nll_chosen=nll, nll_weight=0.5).loss

    assert torch.autograd.gradcheck(f, (pc, pr, nll))


def test_reference_gets_no_gradient():
    pc = torch.zeros(2, requires_grad=True)
    rc = torch.zeros(2, requires_grad=True)
    dpo_loss(pc, torch.zeros(2), rc, torch.zeros(2)).loss.backward()
    assert rc.grad is None and pc.grad is not None


def test_zero_margin_loss_is_log2():
    z = torch.full((3,), -7.0)
    out = dpo_loss(z, z, z, z, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert out.metrics["margins"].item() == 0.0 and out.metrics["accuracy"].item() == 0.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loss_type": "kto"}, "unknown 'kto'"),
        ({"beta": 0.0}, "beta"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "only used by"),
        ({"nll_weight": 1.0}, "nll_chosen: required"),
        ({"nll_weight": -1.0}, "nll_weight"),
    ],
)
def test_bad_arguments(kwargs, match):
    z = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(z, z, z, z, **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="ref_rejected: expected shape"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------- fused
def _fused_case(seed=0, b=3, d=16, v=53, dtype=torch.float64, device="cpu"):
    """A packed batch: 2B sequences of random lengths, interleaved with ignored (-1) positions, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (2 * b,), generator=g)
    segs = []
    for s, n in enumerate(lengths.tolist()):
        segs += [-1] * int(torch.randint(0, 3, (1,), generator=g)) + [s] * n
    segs += [-1, -1]
    seg = torch.tensor(segs)
    n = seg.numel()
    hidden = torch.randn(n, d, generator=g, dtype=dtype)
    weight = torch.randn(v, d, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[seg < 0] = -100  # ignored positions may carry anything, even out-of-range ids
    ref = torch.randn(2 * b, generator=g, dtype=torch.float64) * 5 - 20
    return tuple(x.to(device) for x in (hidden, weight, targets, seg, ref))


def _unfused(hidden, weight, targets, seg, ref, average=False):
    """Plain float64: full logits, log_softmax, gather, per-sequence python sums."""
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), dim=-1)
    nseq = ref.numel()
    sums = []
    counts = []
    for s in range(nseq):
        idx = (seg == s).nonzero().flatten()
        sums.append(logp[idx, targets[idx]].sum())
        counts.append(len(idx))
    sums = torch.stack(sums)
    counts = torch.tensor(counts, dtype=torch.float64, device=sums.device)
    return (sums / counts, ref / counts, counts) if average else (sums, ref, counts)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_matches_unfused_float64(device, loss_type):
    hidden, weight, targets, seg, ref = _fused_case(seed=3, device=device)
    b = ref.numel() // 2
    eps = 0.1 if loss_type in ("sigmoid", "robust") else 0.0
    h1 = hidden.clone().requires_grad_(True)
    w1 = weight.clone().requires_grad_(True)
    out = fused_dpo_loss(h1, w1, targets, seg, ref, beta=0.3, loss_type=loss_type, label_smoothing=eps,
                         nll_weight=0.25)
    assert isinstance(out, DPOOutput)
    out.loss.backward()

    h2 = hidden.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    pol, rf, counts = _unfused(h2, w2, targets, seg, ref, average=(loss_type == "ipo"))
    sums_c = _unfused(h2, w2, targets, seg, ref)[0][:b]
    nll = (-sums_c / counts[:b]).mean()
    expected = _plain_dpo(pol[:b], pol[b:], rf[:b], rf[b:], 0.3, loss_type, eps) + 0.25 * nll
    expected.backward()

    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-9, atol=1e-12)
    assert not h1.grad[seg < 0].any(), "ignored positions must get no gradient"
    assert out.metrics["tokens"].item() == (seg >= 0).sum().item()


def test_fused_average_log_prob_and_metrics(device):
    hidden, weight, targets, seg, ref = _fused_case(seed=4, b=2, device=device)
    out = fused_dpo_loss(hidden, weight, targets, seg, ref, beta=0.2, average_log_prob=True)
    pol, rf, _ = _unfused(hidden, weight, targets, seg, ref, average=True)
    plain = dpo_loss(pol[:2], pol[2:], rf[:2], rf[2:], beta=0.2)
    assert out.loss.item() == pytest.approx(plain.loss.item(), rel=1e-10)
    for k in ("rewards/chosen", "rewards/rejected", "margins", "accuracy"):
        assert out.metrics[k].item() == pytest.approx(plain.metrics[k].item(), rel=1e-6, abs=1e-7)


def test_fused_float32_and_bfloat16_close_to_float64(device):
    hidden, weight, targets, seg, ref = _fused_case(seed=5, b=4, d=64, v=300, device=device)
    exact = fused_dpo_loss(hidden, weight, targets, seg, ref, beta=0.1).loss.item()
    f32 = fused_dpo_loss(hidden.float(), weight.float(), targets, seg, ref.float(), beta=0.1)
    assert f32.loss.dtype == torch.float32
    assert f32.loss.item() == pytest.approx(exact, rel=1e-5)
    bf = fused_dpo_loss(hidden.bfloat16(), weight.bfloat16(), targets, seg, ref.float(), beta=0.1)
    assert bf.loss.item() == pytest.approx(exact, rel=0.05)


def test_fused_initial_margin_is_zero_when_reference_is_the_policy(device):
    hidden, weight, targets, seg, _ = _fused_case(seed=6, device=device)
    pol, _, _ = _unfused(hidden, weight, targets, seg, torch.zeros(6, dtype=torch.float64, device=device))
    out = fused_dpo_loss(hidden, weight, targets, seg, pol.detach(), beta=0.1)
    assert abs(out.metrics["margins"].item()) < 1e-10
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-10)


def test_fused_bad_inputs():
    hidden, weight, targets, seg, ref = _fused_case(seed=7, b=2)
    with pytest.raises(ValueError, match=r"ref_logps: expected shape \[2B\]"):
        fused_dpo_loss(hidden, weight, targets, seg, ref[:3])
    with pytest.raises(ValueError, match="segment_ids: values must be -1 or in"):
        fused_dpo_loss(hidden, weight, targets, torch.where(seg == 3, 9, seg), ref)
    with pytest.raises(ValueError, match=r"sequences \[3\] have no scored token"):
        fused_dpo_loss(hidden, weight, targets, torch.where(seg == 3, -1, seg), ref)
    bad = targets.clone()
    bad[(seg >= 0).nonzero()[0]] = weight.shape[0]
    with pytest.raises(ValueError, match=r"targets\[\d+\] = \d+ is outside the vocabulary"):
        fused_dpo_loss(hidden, weight, bad, seg, ref)
    bad[(seg >= 0).nonzero()[0]] = -100  # the default ignore_index of fused_linear_logprobs: still refused
    with pytest.raises(ValueError, match=r"targets\[\d+\] = -100 is outside the vocabulary"):
        fused_dpo_loss(hidden, weight, bad, seg, ref)
    with pytest.raises(ValueError, match="targets: expected shape"):
        fused_dpo_loss(hidden, weight, targets[:-1], seg, ref)
    with pytest.raises(ValueError, match=r"expected hidden \[N, d\]"):
        fused_dpo_loss(hidden, weight[:, :-1], targets, seg, ref)
