"""qcore.quant: worked examples, oracles (torch observers and fake_quantize), properties."""
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.quant import (MIN_SCALE, PerChannel, PerGroup, PerTensor, choose_qparams, dequantize,
                         fake_quantize, mse, qparams_from_range, qrange, quantize, sqnr_db)
from qcore.packing import pack, pack_int2, pack_int4, unpack, unpack_int2, unpack_int4

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver


# ----------------------------------------------------------------------------- worked examples
def test_seed_example_0_to_1000():
    qp = qparams_from_range(0.0, 1000.0, bits=8)
    assert round(qp.scale.item(), 2) == 3.92
    assert qp.zero_point.item() == 0
    assert quantize(torch.tensor([250.0]), qp).item() == 64  # 250 / 3.92 = 63.75 -> 64


def test_seed_example_minus20_to_1000():
    qp = qparams_from_range(-20.0, 1000.0, bits=8)
    assert qp.scale.item() == 4.0
    assert qp.zero_point.item() == 5
    assert quantize(torch.tensor([-20.0, 0.0, 1000.0]), qp).tolist() == [0, 5, 255]


def test_symmetric_minus6_to_5_uses_restricted_grid():
    qp = qparams_from_range(-6.0, 5.0, bits=8, symmetric=True)
    assert qp.zero_point.item() == 0
    assert qp.scale.item() == pytest.approx(6.0 / 127)
    # -6 maps to -127 (not -128 as with the full signed grid), +6 would map to +127
    assert quantize(torch.tensor([-6.0, 5.0, 0.0]), qp).tolist() == [-127, 106, 0]


@pytest.mark.parametrize("bits,symmetric,expected", [
    (2, False, (0, 3)), (2, True, (-1, 1)), (4, False, (0, 15)), (4, True, (-7, 7)),
    (8, False, (0, 255)), (8, True, (-127, 127)), (16, True, (-32767, 32767)),
])
def test_qrange(bits, symmetric, expected):
    assert qrange(bits, symmetric) == expected


def test_qrange_rejects_silly_bits():
    with pytest.raises(ValueError):
        qrange(1, True)


def test_range_not_containing_zero_is_widened():
    qp = qparams_from_range(2.0, 10.0, bits=8)
    assert qp.zero_point.item() == 0 and qp.scale.item() == pytest.approx(10.0 / 255)
    qp = qparams_from_range(-10.0, -2.0, bits=8)
    assert qp.zero_point.item() == 255
    assert dequantize(quantize(torch.tensor([0.0]), qp), qp).item() == 0.0


def test_xmin_above_xmax_is_an_error():
    with pytest.raises(ValueError):
        qparams_from_range(1.0, -1.0)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("value", [0.0, 3.5, -2.0])
def test_constant_tensor_gives_finite_positive_scale(symmetric, value):
    x = torch.full((5, 7), value)
    for gran in (PerTensor(), PerChannel(0), PerGroup(7)):
        qp = choose_qparams(x, 8, symmetric, gran)
        assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all()
        x_hat = dequantize(quantize(x, qp), qp)
        assert torch.isfinite(x_hat).all()
        assert (x_hat - x).abs().max() <= qp.scale.max() / 2 + 1e-6


# ----------------------------------------------------------------------------- oracles: torch
def _observer_qparams(obs_cls, x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obs = obs_cls(**kw)
        obs(x)
        return obs.calculate_qparams()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0])
def test_asymmetric_matches_torch_minmax_observer(seed, shift):
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(seed)) * 2 + shift
    scale, zp = _observer_qparams(MinMaxObserver, x, dtype=torch.quint8)
    qp = choose_qparams(x, bits=8, symmetric=False)
    assert torch.equal(qp.scale.reshape(1), scale)
    assert torch.equal(qp.zero_point.reshape(1), zp.to(torch.int32))


@pytest.mark.parametrize("seed", range(5))
def test_symmetric_matches_torch_observer_on_restricted_range(seed):
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(seed)) * 0.1 + 0.05
    scale, zp = _observer_qparams(MinMaxObserver, x, dtype=torch.qint8,
                                  qscheme=torch.per_tensor_symmetric, quant_min=-127, quant_max=127)
    qp = choose_qparams(x, bits=8, symmetric=True)
    assert torch.allclose(qp.scale.reshape(1), scale, rtol=1e-6, atol=0)
    assert zp.item() == 0 == qp.zero_point.item()


@pytest.mark.parametrize("symmetric", [False, True])
def test_per_channel_matches_torch_per_channel_observer(symmetric):
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(1))
    w[3] *= 20  # one loud channel
    kw = dict(ch_axis=0)
    if symmetric:
        kw.update(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127)
    else:
        kw.update(dtype=torch.quint8, qscheme=torch.per_channel_affine)
    scale, zp = _observer_qparams(PerChannelMinMaxObserver, w, **kw)
    qp = choose_qparams(w, 8, symmetric, PerChannel(axis=0))
    assert qp.scale.shape == (16, 1)
    assert torch.allclose(qp.scale.flatten(), scale, rtol=1e-6, atol=0)
    assert torch.equal(qp.zero_point.flatten(), zp.to(torch.int32))


def _assert_equal_except_near_ties(ours, theirs, x, qp):
    """torch multiplies by 1/scale where qcore divides: they may differ by one step at a tie."""
    diff = ours != theirs
    if diff.any():
        ratio = (x / qp.granularity.expand(qp.scale) if not isinstance(qp.granularity, PerGroup)
                 else None)
        frac = (ratio - torch.floor(ratio))[diff]
        assert ((frac - 0.5).abs() < 1e-4).all(), "mismatch away from a rounding tie"
        assert diff.float().mean() < 1e-4


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_per_tensor_matches_torch_values_and_grads(symmetric, bits):
    x = (torch.randn(300, 40, generator=torch.Generator().manual_seed(bits)) * 2).requires_grad_()
    qp = choose_qparams(x[:100], bits, symmetric)  # calibrated on part: the rest overflows
    y = fake_quantize(x, qp)
    y.backward(torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape))
    x2 = x.detach().clone().requires_grad_()
    t = torch.fake_quantize_per_tensor_affine(x2, qp.scale.item(), int(qp.zero_point), qp.qmin, qp.qmax)
    t.backward(torch.arange(t.numel(), dtype=torch.float32).reshape(t.shape))
    _assert_equal_except_near_ties(y.detach(), t.detach(), x.detach(), qp)
    near = (y.detach() != t.detach())
    assert torch.equal(x.grad[~near], x2.grad[~near])
    assert (x.grad == 0).any(), "some values should fall outside the clamp range"


@pytest.mark.parametrize("symmetric", [False, True])
def test_fake_quantize_per_channel_matches_torch_values_and_grads(symmetric):
    w = (torch.randn(32, 64, generator=torch.Generator().manual_seed(7))).requires_grad_()
    qp = choose_qparams(w * 0.8, 4, symmetric, PerChannel(0))  # 0.8: clip the extremes
    y = fake_quantize(w, qp)
    y.sum().backward()
    w2 = w.detach().clone().requires_grad_()
    t = torch.fake_quantize_per_channel_affine(w2, qp.scale.flatten(), qp.zero_point.flatten(),
                                               0, qp.qmin, qp.qmax)
    t.sum().backward()
    _assert_equal_except_near_ties(y.detach(), t.detach(), w.detach(), qp)
    assert torch.equal(w.grad, w2.grad)
    assert 0 < w.grad.sum() < w.numel()


def test_fake_quantize_equals_dequantize_of_quantize():
    x = torch.randn(8, 128)
    for gran in (PerTensor(), PerChannel(0), PerChannel(1), PerGroup(32)):
        qp = choose_qparams(x, 4, True, gran)
        assert torch.equal(fake_quantize(x, qp), dequantize(quantize(x, qp), qp))


# ----------------------------------------------------------------------------- granularity
def test_granularity_scale_shapes():
    w = torch.randn(6, 128)
    assert choose_qparams(w, granularity=PerTensor()).scale.shape == ()
    assert choose_qparams(w, granularity=PerChannel(0)).scale.shape == (6, 1)
    assert choose_qparams(w, granularity=PerChannel(1)).scale.shape == (1, 128)
    assert choose_qparams(w, granularity=PerGroup(32)).scale.shape == (6, 4)


def test_per_group_equals_per_tensor_on_each_group():
    w = torch.randn(3, 64)
    qp = choose_qparams(w, 4, False, PerGroup(16))
    codes = quantize(w, qp)
    for r in range(3):
        for g in range(4):
            block = w[r, g * 16:(g + 1) * 16]
            qpb = choose_qparams(block, 4, False)
            assert torch.equal(codes[r, g * 16:(g + 1) * 16], quantize(block, qpb))


def test_per_channel_axis_is_respected():
    w = torch.ones(4, 8)
    w[:, 0] = 100.0  # column 0 is loud: per-row scales all see it, per-column only one does
    assert torch.allclose(choose_qparams(w, 8, True, PerChannel(0)).scale, torch.tensor(100 / 127))
    col = choose_qparams(w, 8, True, PerChannel(1)).scale.flatten()
    assert col[0] == pytest.approx(100 / 127) and col[1] == pytest.approx(1 / 127)


def test_per_group_needs_divisible_dimension():
    with pytest.raises(ValueError, match="multiple of 32"):
        choose_qparams(torch.randn(4, 48), granularity=PerGroup(32))


# ----------------------------------------------------------------------------- properties
granularities = st.sampled_from([PerTensor(), PerChannel(0), PerChannel(1), PerGroup(8)])


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 3, 4, 8]),
       symmetric=st.booleans(), gran=granularities,
       rows=st.integers(1, 6), groups=st.integers(1, 4), loc=st.floats(-5, 5),
       spread=st.floats(1e-3, 1e3))
def test_round_trip_error_is_at_most_half_a_step(seed, bits, symmetric, gran, rows, groups, loc, spread):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8 * groups, generator=g) * spread + loc
    qp = choose_qparams(x, bits, symmetric, gran)
    q = quantize(x, qp)
    assert qp.qmin <= int(q.min()) and int(q.max()) <= qp.qmax
    err = (x - dequantize(q, qp)).abs()
    # every element lies in its own range here, so the error bound holds everywhere
    step = gran.group(torch.ones_like(x)) * gran.expand(qp.scale)
    bound = step.reshape(x.shape) / 2
    assert (err <= bound * (1 + 1e-5) + 1e-6 * x.abs()).all()


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 4, 8]), symmetric=st.booleans())
def test_out_of_range_values_clamp_to_the_ends(seed, bits, symmetric):
    x = torch.randn(200, generator=torch.Generator().manual_seed(seed))
    qp = choose_qparams(x, bits, symmetric)
    big = torch.tensor([1e6, -1e6])
    assert quantize(big, qp).tolist() == [qp.qmax, qp.qmin if symmetric else qp.qmin]


def test_rounding_is_round_half_to_even_not_floor():
    qp = qparams_from_range(0.0, 255.0, bits=8)  # scale 1, zero_point 0
    x = torch.tensor([0.6, 1.5, 2.5, 3.49, 254.7])
    assert quantize(x, qp).tolist() == [1, 2, 2, 3, 255]


def test_sqnr_gains_about_6db_per_bit_on_uniform_data():
    # Uniform x on [-1, 1], symmetric grid: step = 2 / (2**b - 2), noise = step**2 / 12,
    # so one more bit buys 20 log10((2**(b+1) - 2) / (2**b - 2)) dB, which tends to 6.02.
    x = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    bits = range(4, 11)
    sqnr = [sqnr_db(x, fake_quantize(x, choose_qparams(x, b, True))) for b in bits]
    for b, lo, hi in zip(bits, sqnr, sqnr[1:]):
        theory = 20 * math.log10((2 ** (b + 1) - 2) / (2**b - 2))
        assert hi - lo == pytest.approx(theory, abs=0.1)
    assert sqnr[-1] - sqnr[-2] == pytest.approx(6.02, abs=0.1)


def test_error_metrics():
    x = torch.tensor([1.0, -1.0, 2.0])
    assert mse(x, x) == 0.0 and sqnr_db(x, x) == float("inf")
    assert mse(x, torch.zeros(3)) == pytest.approx(2.0)
    assert sqnr_db(x, 1.1 * x) == pytest.approx(20.0)


# ----------------------------------------------------------------------------- packing
@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(0, 67), bits=st.sampled_from([2, 4]))
def test_pack_unpack_round_trip(seed, n, bits):
    codes = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    assert torch.equal(unpack(packed, bits, (n,)), codes.to(torch.uint8))


def test_pack_int4_layout_high_nibble_first():
    codes = torch.randint(0, 16, (10, 6))
    flat = codes.flatten()
    expected = (flat[0::2] << 4) | flat[1::2]
    assert torch.equal(pack_int4(codes), expected.to(torch.uint8))
    assert torch.equal(unpack_int4(pack_int4(codes), (10, 6)), codes.to(torch.uint8))


def test_pack_int2_layout_and_size():
    codes = torch.tensor([[0, 1, 2, 3], [3, 3, 3, 3]])
    assert pack_int2(codes).tolist() == [0b00011011, 0b11111111]
    assert torch.equal(unpack_int2(pack_int2(codes), (2, 4)), codes.to(torch.uint8))


def test_pack_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError, match="offset signed codes"):
        pack_int4(torch.tensor([-1, 3]))
    with pytest.raises(ValueError):
        pack(torch.tensor([16]), 4)
    with pytest.raises(ValueError):
        unpack_int4(torch.zeros(3, dtype=torch.uint8), (10,))


def test_symmetric_int4_codes_pack_after_shift():
    w = torch.randn(4, 32)
    qp = choose_qparams(w, 4, True, PerGroup(32))
    q = quantize(w, qp)
    packed = pack_int4(q.to(torch.int16) - qp.qmin)
    restored = unpack_int4(packed, q.shape).to(torch.int16) + qp.qmin
    assert torch.equal(restored, q.to(torch.int16))
    assert packed.numel() == w.numel() // 2
