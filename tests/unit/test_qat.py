"""qcore.qat against oracles: torch's fake-quantize functions (values and gradients), torch's
learnable fake quantization (LSQ), finite differences, torch.ao's moving-average observer, exact
equality of the converted model, and property bounds."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcore import qat
from qcore.clipping import MSEObserver, choose_qparams_mse
from qcore.layers import QuantLinear
from qcore.quant import MIN_SCALE, PerChannel, PerTensor, choose_qparams, fake_quantize_ste


def absmax_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The per-output-channel symmetric scale ``max|w[o]| / qmax`` ``[out, 1]``."""
    return choose_qparams(w, bits, symmetric=True, granularity=PerChannel(0)).scale


def _grads(fn, x, grad_out):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(grad_out)
    return y.detach(), x.grad


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, True), (3, False), (2, True)])
def test_ste_equals_torch_per_tensor(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    zp = 0 if symmetric else qmax // 3
    scale = 0.037
    x = torch.randn(7, 33, generator=g) * scale * qmax  # a good part beyond the grid
    go = torch.randn(7, 33, generator=g)
    y, gx = _grads(lambda t: fake_quantize_ste(t, scale, float(zp), qmin, qmax), x, go)
    y_t, gx_t = _grads(lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp, qmin, qmax), x, go)
    assert torch.allclose(y, y_t, rtol=0, atol=1e-6)
    assert torch.equal(gx, gx_t)
    assert 0 < (gx == 0).float().mean() < 0.9  # both branches of the mask are exercised


@pytest.mark.parametrize("axis", [0, 1])
def test_ste_equals_torch_per_channel(axis):
    g = torch.Generator().manual_seed(10 + axis)
    x = torch.randn(6, 9, generator=g) * 2
    n = x.shape[axis]
    scale = torch.rand(n, generator=g) * 0.1 + 0.02
    zp = torch.randint(0, 16, (n,), generator=g, dtype=torch.int32)
    shape = [1, 1]
    shape[axis] = n
    go = torch.randn(6, 9, generator=g)
    y, gx = _grads(lambda t: fake_quantize_ste(t, scale.reshape(shape), zp.float().reshape(shape), 0, 15), x, go)
    y_t, gx_t = _grads(lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp, axis, 0, 15), x, go)
    assert torch.allclose(y, y_t, rtol=0, atol=1e-6) and torch.equal(gx, gx_t)


def test_ste_error_bounds():
    """Inside the grid the error is at most half a step; the output always lies on the grid."""
    x = torch.linspace(-3, 3, 2001)
    s = 0.1
    y = fake_quantize_ste(x, s, 0.0, -15, 15)
    inside = x.abs() <= 15 * s
    assert ((y - x).abs()[inside] <= s / 2 + 1e-6).all()
    assert torch.allclose(y / s, torch.round(y / s), atol=1e-4) and y.abs().max() <= 15 * s + 1e-6


def test_lsq_equals_torch_learnable_per_channel_and_per_tensor():
    g = torch.Generator().manual_seed(3)
    for bits in (2, 3, 4, 8):
        qmax = 2 ** (bits - 1) - 1
        w = torch.randn(5, 40, generator=g)
        s = (absmax_scale(w, bits) * (0.4 + 0.5 * torch.rand(5, 1, generator=g))).requires_grad_()
        wr = w.clone().requires_grad_()
        go = torch.randn(5, 40, generator=g)
        y = qat.lsq_fake_quantize(wr, s, bits)
        y.backward(go)
        wt, st = w.clone().requires_grad_(), s.detach().flatten().clone().requires_grad_()
        yt = torch._fake_quantize_learnable_per_channel_affine(wt, st, torch.zeros(5), 0, -qmax, qmax,
                                                               1 / math.sqrt(40 * qmax))
        yt.backward(go)
        assert torch.allclose(y, yt, atol=1e-6) and torch.equal(wr.grad, wt.grad)
        assert torch.allclose(s.grad.flatten(), st.grad, rtol=1e-4, atol=1e-6)
        # per tensor
        s1 = (w.abs().max() / qmax * 0.6).clone().requires_grad_()
        wr = w.clone().requires_grad_()
        qat.lsq_fake_quantize(wr, s1, bits).backward(go)
        s1t = s1.detach().reshape(1).clone().requires_grad_()
        torch._fake_quantize_learnable_per_tensor_affine(w.clone().requires_grad_(), s1t, torch.zeros(1), -qmax, qmax,
                                                         1 / math.sqrt(200 * qmax)).backward(go)
        assert s1.grad.shape == () and torch.allclose(s1.grad.reshape(1), s1t.grad, rtol=1e-4, atol=1e-6)


def test_lsq_scale_gradient_matches_finite_differences():
    """With each weight's rounding residual (and clipping) held fixed, as the STE assumes, x_hat is a
    smooth function of the scale; central differences of the loss match LSQ's gradient / grad_scale."""
    g = torch.Generator().manual_seed(4)
    bits, qmax = 3, 3
    w = torch.randn(4, 24, generator=g, dtype=torch.float64)
    s0 = absmax_scale(w, bits).double() * 0.7
    go = torch.randn(4, 24, generator=g, dtype=torch.float64)
    sp = s0.clone().requires_grad_()
    qat.lsq_fake_quantize(w, sp, bits).backward(go)
    codes = torch.round(w / s0)
    residual, clipped = codes - w / s0, codes.abs() > qmax
    assert clipped.any() and (~clipped).any()

    def loss(s):
        return (go * torch.where(clipped, s * codes.clamp(-qmax, qmax), w + s * residual)).sum(1, keepdim=True)

    h = 1e-6
    fd = (loss(s0 + h) - loss(s0 - h)) / (2 * h)
    assert torch.allclose(sp.grad, fd / math.sqrt(24 * qmax), rtol=1e-6, atol=1e-9)
    # and the true forward agrees with the surrogate at s0
    assert torch.allclose(qat.lsq_fake_quantize(w, s0, bits), torch.where(clipped, s0 * codes.clamp(-3, 3), w + s0 * residual))


def test_lsq_without_grad_scale_would_be_larger():
    w = torch.randn(8, 384)
    s = absmax_scale(w, 4).requires_grad_()
    qat.lsq_fake_quantize(w, s, 4).sum().backward()
    g_scaled = s.grad.clone()
    s.grad = None
    qat.LSQFakeQuantize.apply(w, s, -7, 7, 1.0).sum().backward()
    assert torch.allclose(s.grad / math.sqrt(384 * 7), g_scaled, rtol=1e-5, atol=1e-9)


def test_mse_qparams_beat_every_coarse_candidate_and_agree_with_the_mse_observer():
    with torch.random.fork_rng():  # StudentT.sample takes no generator: seed the global one, then restore it
        torch.manual_seed(5)
        w = torch.distributions.StudentT(3.0).sample((6, 512))
    for bits in (2, 3, 4):
        s = choose_qparams_mse(w, bits).scale
        a = absmax_scale(w, bits)
        qmax = 2 ** (bits - 1) - 1
        assert s.shape == (6, 1) and (s <= a + 1e-9).all() and (s >= MIN_SCALE).all()
        err = lambda sc: ((torch.round(w / sc).clamp(-qmax, qmax) * sc - w) ** 2).sum(1)  # noqa: E731
        coarse = torch.stack([err(a * k / 100) for k in range(1, 101)])  # stage 1's candidates: the search refines them
        assert (err(s) <= coarse.min(0).values * (1 + 1e-6)).all()
        for row in range(6):  # the same search on a histogram: only the binning differs (measured < 0.8 %)
            obs = MSEObserver(bits=bits, symmetric=True)
            obs(w[row])
            assert abs(obs.qparams().scale.item() - s[row].item()) / s[row].item() < 0.01
            assert torch.equal(choose_qparams_mse(w[row], bits, PerTensor()).scale, s[row, 0])
    assert torch.equal(choose_qparams_mse(torch.zeros(2, 8), 3).scale, torch.full((2, 1), MIN_SCALE))


def test_observer_matches_torch_ao_moving_average():
    from torch.ao.quantization import MovingAverageMinMaxObserver

    g = torch.Generator().manual_seed(6)
    lin = nn.Linear(12, 5)
    ours = qat.FakeQuantLinear(lin, 4, 8, averaging_constant=0.05)
    theirs = MovingAverageMinMaxObserver(averaging_constant=0.05, dtype=torch.quint8)
    for i in range(30):
        x = torch.randn(3, 12, generator=g) * (1 + i % 4) + 0.5
        ours(x)
        theirs(x)
    assert torch.allclose(ours.input_observer.min_val, theirs.min_val) and torch.allclose(ours.input_observer.max_val, theirs.max_val)
    scale, zp = ours.act_qparams()
    their_scale, their_zp = theirs.calculate_qparams()
    assert torch.allclose(scale, their_scale.reshape(())) and int(zp) == int(their_zp)
    ours.freeze_observer()
    before = (ours.input_observer.min_val.clone(), ours.input_observer.max_val.clone(), int(ours.num_batches))
    ours(torch.randn(3, 12) * 100)
    assert torch.equal(ours.input_observer.min_val, before[0]) and torch.equal(ours.input_observer.max_val, before[1])
    assert int(ours.num_batches) == before[2]


def test_fake_quant_linear_forward_and_gradients():
    g = torch.Generator().manual_seed(7)
    lin = nn.Linear(10, 6)
    fq = qat.FakeQuantLinear(lin, 3, 8)
    x = torch.randn(2, 4, 10, generator=g).requires_grad_()
    y = fq(x)
    s = absmax_scale(lin.weight, 3)
    w_hat = torch.fake_quantize_per_channel_affine(lin.weight.detach(), s.flatten(), torch.zeros(6, dtype=torch.int32),
                                                   0, -3, 3)
    a_s, a_z = fq.act_qparams()
    x_hat = torch.fake_quantize_per_tensor_affine(x.detach(), a_s.item(), int(a_z), 0, 255)
    assert torch.allclose(y, F.linear(x_hat, w_hat, lin.bias), atol=1e-6)
    y.sum().backward()
    # STE: the weight gradient is that of the float layer evaluated at x_hat (absmax scales never clip)
    assert torch.allclose(lin.weight.grad, x_hat.reshape(-1, 10).sum(0).expand(6, 10), atol=1e-5)
    assert torch.allclose(x.grad, w_hat.sum(0).expand(2, 4, 10), atol=1e-6)
    with pytest.raises(RuntimeError, match="no batch"):
        qat.FakeQuantLinear(nn.Linear(3, 2)).act_qparams()
    wo = qat.FakeQuantLinear(lin, 4, None)  # weight-only
    xx = torch.randn(3, 10)
    assert torch.allclose(wo(xx), F.linear(xx, wo.fake_weight(), lin.bias)) and int(wo.num_batches) == 0


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 3))


@pytest.mark.parametrize("lsq", [False, True])
def test_prepare_and_convert_give_identical_predictions(lsq):
    model = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q = qat.prepare_qat(model, 2, 8, lsq=lsq)
    assert all(type(m) is nn.Linear for m in (model[0], model[2][0], model[3]))
    assert len(qat.fake_quant_layers(q)) == 3
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # a little training, so that weights and (with LSQ) scales move
        x = torch.randn(32, 8, generator=g)
        F.cross_entropy(q(x), (x[:, 0] > 0).long()).backward()
        opt.step()
        opt.zero_grad()
    qat.freeze_observers(q)
    c = qat.convert(q)
    x = torch.randn(64, 8, generator=g)
    with torch.no_grad():
        assert torch.equal(c(x), q(x))
    layers = [m for m in c.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 3 and all(m.codes().dtype == torch.int8 and m.codes().abs().max() <= 1 for m in layers)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if lsq:
        assert any(p is m.scale for m in qat.fake_quant_layers(q) for p in q.parameters())


def test_prepare_skips_and_weight_only():
    model = _mlp()
    q = qat.prepare_qat(model, 4, None, skip=("3",))
    assert type(q[3]) is nn.Linear and isinstance(q[0], qat.FakeQuantLinear) and q[0].act_bits is None
    c = qat.convert(q)
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert torch.equal(c(x), q(x)) and c[0].input_scale is None


def test_qat_recovers_what_ptq_loses_on_a_toy_problem():
    """A 2-bit MLP: fine-tuning with fake quantization beats quantizing the float model."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 8, generator=g)
    y = ((x[:, :3] * torch.tensor([1.0, -2.0, 0.5])).sum(1) > 0).long()
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    def acc(m):
        with torch.no_grad():
            return (m(x).argmax(1) == y).float().mean().item()

    ptq = qat.prepare_qat(model, 2, 8)
    ptq(x)
    qat.freeze_observers(ptq)
    trained = qat.prepare_qat(model, 2, 8, lsq=True)
    opt = torch.optim.Adam(trained.parameters(), lr=3e-3)
    for _ in range(150):
        F.cross_entropy(trained(x), y).backward()
        opt.step()
        opt.zero_grad()
    qat.freeze_observers(trained)
    assert acc(trained) > acc(ptq) + 0.05 and acc(trained) > 0.9


def test_lsq_step_stays_positive_when_training_pushes_it_below_zero():
    w = torch.tensor([[0.3, -0.6, 0.9]])
    s = torch.tensor([[-0.5]], requires_grad=True)  # a step an optimiser drove past 0
    y = qat.lsq_fake_quantize(w, s, bits=4)
    # Used as MIN_SCALE (torch's learnable fake-quant clamps to eps): every weight lands on +-7 steps.
    assert torch.equal(y, torch.tensor([[7.0, -7.0, 7.0]]) * MIN_SCALE)
    ((y - w) ** 2).sum().backward()
    # The gradient is the one at MIN_SCALE, so a descent step makes the step larger again:
    # ds = grad_scale * sum(2 (y - w) * clamp(round(w / s))) ~ -14 * sum|w| * grad_scale < 0.
    grad_scale = 1 / math.sqrt(3 * 7)
    assert s.grad.item() == pytest.approx(-14 * 1.8 * grad_scale, rel=1e-5)
