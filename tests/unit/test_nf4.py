"""Tests of qcore.nf4: bitsandbytes as the oracle, plus properties of the NF4 round trip."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qcore.nf4 import (ABSMAX_BLOCK_SIZE, ZERO_CODE, bits_per_param, dequantize_nf4,
                       nf4_codebook, quantize_nf4)
from qcore.quant import PerGroup, choose_qparams, dequantize, mse, quantize
from qcore.packing import unpack_int4

CB = nf4_codebook()
MAX_HALF_GAP = ((CB[1:] - CB[:-1]) / 2).max().item()  # worst rounding error on the [-1, 1] grid


def _bnb_absmax(bnbf, state) -> torch.Tensor:
    """bitsandbytes' float32 absmax per block, undoing its double quantization if present."""
    if state.state2 is None:
        return state.absmax
    return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset


def _midpoint_block() -> torch.Tensor:
    """One 64-block hitting every codebook value and every fp32 midpoint exactly (ties)."""
    mids = (CB[:-1] + CB[1:]) / 2
    vals = torch.cat([CB, mids, -mids, torch.tensor([0.0, -0.0])])  # 16 + 15 + 15 + 2 = 48
    return torch.cat([vals, torch.linspace(-1, 1, 64 - vals.numel())])


# ----------------------------------------------------------------------------- codebook
def test_codebook_equals_bitsandbytes(bnbf):
    ref = bnbf.get_4bit_type("nf4", device="cpu")
    assert CB.dtype == torch.float32 and CB.shape == (16,)
    assert torch.allclose(CB, ref, rtol=0, atol=1e-6)
    assert torch.equal(CB, ref)  # in fact bit for bit
    _, state = bnbf.quantize_4bit(torch.randn(64), blocksize=64, quant_type="nf4")
    assert torch.equal(CB, state.code)


def test_codebook_structure():
    assert torch.all(CB[1:] > CB[:-1])
    assert (CB < 0).sum() == 7 and (CB > 0).sum() == 8 and CB[ZERO_CODE] == 0
    assert CB[0] == -1 and CB[-1] == 1


def test_codebook_against_scipy_quantiles():
    norm = pytest.importorskip("scipy.stats").norm
    o = 1 - (1 / 32 + 1 / 30) / 2
    pos = norm.ppf(np.linspace(o, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(o, 0.5, 8)[:-1])
    ref = np.sort(np.concatenate([neg, [0.0], pos])) / pos.max()
    np.testing.assert_allclose(CB.numpy(), ref, atol=1e-6)


# ----------------------------------------------------------------------------- bnb oracle
@pytest.mark.parametrize("shape, block_size, dtype", [
    ((64,), 64, torch.float32),
    ((8, 192), 64, torch.float32),
    ((128, 256), 64, torch.float32),
    ((32, 256), 128, torch.float32),
    ((100,), 64, torch.float32),      # partial last block
    ((7, 33), 64, torch.float32),     # odd numel: a padding nibble
    ((65,), 64, torch.float32),       # one element in the last block
    ((1,), 64, torch.float32),
    ((16, 96), 64, torch.bfloat16),
    ((16, 96), 64, torch.float16),
])
def test_matches_bitsandbytes(bnbf, shape, block_size, dtype):
    torch.manual_seed(sum(shape) + block_size)
    w = (torch.randn(shape) * 0.02).to(dtype)
    packed, state = quantize_nf4(w, block_size=block_size)
    ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
    assert ref_packed.shape == (packed.numel(), 1)
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert torch.equal(state.absmax, ref_state.absmax)
    w_hat = dequantize_nf4(packed, state)
    assert w_hat.shape == w.shape and w_hat.dtype == dtype
    # bnb's native CPU dequantize kernel takes blocks row by row, which disagrees with its
    # own (flat) quantizer when the last dimension is not a multiple of blocksize, e.g.
    # (16, 96); a 1-D state (same bytes, same absmax) avoids that bug.
    _, flat_state = bnbf.quantize_4bit(w.reshape(-1), blocksize=block_size, quant_type="nf4")
    ref = bnbf.dequantize_4bit(ref_packed, flat_state)
    assert torch.equal(w_hat.reshape(-1), ref.reshape(-1))


def test_ties_match_bitsandbytes(bnbf):
    """Values exactly on fp32 midpoints take the lower code, in qcore as in bitsandbytes."""
    w = torch.cat([_midpoint_block(), 3 * _midpoint_block(), -_midpoint_block()])
    packed, state = quantize_nf4(w)
    ref_packed, _ = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref_packed.reshape(-1))
    codes = unpack_int4(packed, (w.numel(),))[:64].long()
    assert torch.equal(codes[16:31], torch.arange(15))  # midpoint i -> code i (the lower one)


def test_double_quant_matches_bitsandbytes(bnbf):
    torch.manual_seed(0)
    # 4096 blocks = 16 absmax blocks; scaled rows give absmax values of varied size
    w = torch.randn(256, 1024) * torch.linspace(0.01, 0.05, 256).unsqueeze(1)
    packed, state = quantize_nf4(w, double_quant=True)
    ref_packed, ref_state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                               compress_statistics=True)
    assert torch.equal(packed, ref_packed.reshape(-1))  # codes use the fp32 absmax in both
    assert torch.equal(state.absmax_offset, ref_state.offset)

    true = quantize_nf4(w)[1].absmax
    ours, theirs = state.block_absmax(), _bnb_absmax(bnbf, ref_state)
    spread = (true - true.mean()).abs().max()
    # ours: half an int8 step at most; bnb's dynamic map: half of its largest step (0.0141)
    assert (ours - true).abs().max() <= spread / 254 * 1.001
    assert (theirs - true).abs().max() <= spread * 0.0071
    assert (ours - theirs).abs().max() <= spread * 0.011

    w_hat, w_ref = dequantize_nf4(packed, state), bnbf.dequantize_4bit(ref_packed, ref_state)
    # same codes, so the weights differ by |code value| * |absmax difference| at most
    assert (w_hat - w_ref).abs().max() <= (ours - theirs).abs().max() * 1.0001
    plain = mse(w, dequantize_nf4(*quantize_nf4(w)))
    assert mse(w, w_hat) <= 1.01 * plain and mse(w, w_ref) <= 1.01 * plain


# ----------------------------------------------------------------------------- state, bits
def test_state_fields():
    w = torch.randn(3, 100, dtype=torch.float16)
    packed, st = quantize_nf4(w, block_size=64)
    assert packed.dtype == torch.uint8 and packed.shape == (150,)
    assert st.shape == w.shape and st.dtype == torch.float16 and st.block_size == 64
    assert st.absmax.dtype == torch.float32 and st.absmax.shape == (5,)
    assert not st.double_quant and st.absmax_codes is None

    w = torch.randn(300 * 64)
    _, st = quantize_nf4(w, double_quant=True)
    assert st.double_quant and st.absmax is None
    assert st.absmax_codes.dtype == torch.int8 and st.absmax_codes.shape == (300,)
    assert st.absmax_scale.dtype == torch.float32 and st.absmax_scale.shape == (2,)
    assert st.absmax_offset.dtype == torch.float32 and st.absmax_offset.shape == ()
    with pytest.raises(AttributeError):  # frozen
        st.block_size = 32


def test_bits_per_param():
    w = torch.randn(128, 128)
    assert bits_per_param(quantize_nf4(w)[1]) == 4.5
    assert bits_per_param(quantize_nf4(w, block_size=128)[1]) == 4.25
    dq = bits_per_param(quantize_nf4(w, double_quant=True)[1])
    assert dq == 4 + 8 / 64 + 32 / (64 * ABSMAX_BLOCK_SIZE) and round(dq, 3) == 4.127


def test_bad_input():
    with pytest.raises(ValueError):
        quantize_nf4(torch.randn(8), block_size=0)
    with pytest.raises(ValueError):
        quantize_nf4(torch.empty(0))


# ----------------------------------------------------------------------------- properties
weights = arrays(np.float32, st.integers(1, 300),
                 elements=st.floats(-1e3, 1e3, width=32, allow_subnormal=False))
block_sizes = st.sampled_from([1, 2, 7, 16, 64])


def _block_absmax_per_element(w: torch.Tensor, absmax: torch.Tensor, bs: int) -> torch.Tensor:
    return absmax.repeat_interleave(bs)[: w.numel()]


@settings(max_examples=80, deadline=None)
@given(weights, block_sizes)
def test_error_bound(w, bs):
    w = torch.from_numpy(w)
    packed, state = quantize_nf4(w, block_size=bs)
    err = (w - dequantize_nf4(packed, state)).abs()
    a = _block_absmax_per_element(w, state.absmax, bs)
    assert torch.all(err <= a * (MAX_HALF_GAP + 1e-6))


@settings(max_examples=60, deadline=None)
@given(weights, block_sizes)
def test_codes_are_nearest_and_round_trip(w, bs):
    w = torch.from_numpy(w)
    packed, state = quantize_nf4(w, block_size=bs)
    codes = unpack_int4(packed, (w.numel() + w.numel() % 2,))[: w.numel()].long()
    # nearest codebook value, checked by brute force in float64 (ties within rounding allowed)
    a = _block_absmax_per_element(w, state.absmax, bs).double()
    x = torch.where(a > 0, w.double() / a, torch.zeros_like(a))
    dist = (x.unsqueeze(1) - CB.double()).abs()                       # [n, 16]
    assert torch.all(dist.gather(1, codes.unsqueeze(1)).squeeze(1) <= dist.min(1).values + 1e-6)
    # quantizing the reconstruction gives the same bytes and absmax back
    packed2, state2 = quantize_nf4(dequantize_nf4(packed, state), block_size=bs)
    assert torch.equal(packed2, packed) and torch.equal(state2.absmax, state.absmax)


@settings(max_examples=40, deadline=None)
@given(weights, st.integers(0, 4), block_sizes)
def test_zeros_stay_exact(w, n_zero_blocks, bs):
    w = torch.cat([torch.zeros(n_zero_blocks * bs), torch.from_numpy(w)])
    for dq in (False, True):
        w_hat = dequantize_nf4(*quantize_nf4(w, block_size=bs, double_quant=dq))
        assert not torch.isnan(w_hat).any()
        assert torch.all(w_hat[w == 0] == 0)  # includes the leading all-zero blocks


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(1, 2000), elements=st.floats(0, 10, width=32)))
def test_double_quant_error_bound(w):
    w = torch.from_numpy(w) * torch.tensor([1.0, -1.0]).repeat(w.size)[: w.size]
    packed, state = quantize_nf4(w, block_size=16, double_quant=True)
    true = quantize_nf4(w, block_size=16)[1].absmax
    rebuilt = state.block_absmax()
    step = state.absmax_scale.repeat_interleave(ABSMAX_BLOCK_SIZE)[: true.numel()]
    assert torch.all((rebuilt - true).abs() <= step / 2 + 1e-5 * true.max())
    err = (w - dequantize_nf4(packed, state)).abs()
    a = _block_absmax_per_element(w, true, 16)
    da = _block_absmax_per_element(w, (rebuilt - true).abs(), 16)
    assert torch.all(err <= a * (MAX_HALF_GAP + 1e-6) + da + 1e-6)


def test_zero_block_and_signed_zero():
    w = torch.tensor([0.0, -0.0, 0.0, 0.0, 2.0, 0.0, -0.0, -2.0])
    packed, state = quantize_nf4(w, block_size=4)
    assert state.absmax.tolist() == [0.0, 2.0]
    codes = unpack_int4(packed, (8,)).tolist()
    assert codes[:4] == [ZERO_CODE] * 4 and codes[5:7] == [ZERO_CODE] * 2
    assert dequantize_nf4(packed, state).tolist() == [0, 0, 0, 0, 2.0, 0, 0, -2.0]


# ----------------------------------------------------------------------------- NF4 vs int4
def test_nf4_beats_uniform_int4_on_normal_weights():
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    nf4_mse = mse(w, dequantize_nf4(*quantize_nf4(w, block_size=64)))
    qp = choose_qparams(w, bits=4, symmetric=True, granularity=PerGroup(64))  # absmax / 7
    int4_mse = mse(w, dequantize(quantize(w, qp), qp))
    assert nf4_mse < 0.8 * int4_mse


def test_table_lookup_equals_exact_search_at_every_boundary():
    """The fast nearest-code table agrees with bucketize on boundaries, their neighbours, and noise."""
    from qcore.nf4 import _midpoints, _nearest_codes

    mids = _midpoints()
    up, down = torch.nextafter(mids, torch.ones_like(mids)), torch.nextafter(mids, -torch.ones_like(mids))
    x = torch.cat([mids, up, down, torch.rand(200_000) * 2 - 1, torch.tensor([-1.0, 0.0, 1.0])])
    assert torch.equal(_nearest_codes(x).long(), torch.bucketize(x, mids))
