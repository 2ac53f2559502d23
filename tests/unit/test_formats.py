"""qcore.formats: oracles (struct, torch.finfo, torch casts), all bit patterns, properties."""
import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qcore.formats import (BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, FloatFormat, compose,
                           decompose, memory_bytes, round_to_format)

ALL = [FP32, FP16, BF16, FP8_E4M3, FP8_E5M2]
NARROW = [FP16, BF16, FP8_E4M3, FP8_E5M2]  # the formats torch can cast float32 into
INT_VIEW = {16: torch.int16, 8: torch.uint8}


def ids(fmt: FloatFormat) -> str:
    return fmt.name


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal float32 tensors, except that any NaN equals any NaN.

    torch does not keep NaN sign/payload consistently across casts (fp16 -> fp32 gives
    0x7fffffff), so only NaN-ness is compared; everything else, -0.0 included, bit for bit.
    """
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), f"NaN mismatch at {torch.nonzero(nan_a != nan_b)[:5]}"
    ia, ib = a[~nan_a].view(torch.int32), b[~nan_b].view(torch.int32)
    bad = torch.nonzero(ia != ib).flatten()
    assert bad.numel() == 0, (f"{bad.numel()} mismatches, e.g. x={a[~nan_a][bad[:5]].tolist()} "
                              f"vs {b[~nan_b][bad[:5]].tolist()}")


def all_patterns(fmt: FloatFormat) -> torch.Tensor:
    """Every bit pattern of a 16- or 8-bit format as int64 in [0, 2**bits)."""
    return torch.arange(2**fmt.bits, dtype=torch.int64)


def pattern_values(fmt: FloatFormat) -> torch.Tensor:
    """Every bit pattern of ``fmt`` decoded by torch, as float32 (index = pattern)."""
    p = all_patterns(fmt).to(INT_VIEW[fmt.bits])  # int64 -> int16 wraps, as wanted
    return p.view(fmt.torch_dtype).float()


def sorted_finite(fmt: FloatFormat) -> torch.Tensor:
    """All finite values of ``fmt`` in increasing order, one zero, as float64."""
    v = pattern_values(fmt).double()
    return torch.unique(v[torch.isfinite(v)])  # unique also merges -0.0 and +0.0


# ----------------------------------------------------------------------------- constants
@pytest.mark.parametrize("fmt", ALL, ids=ids)
def test_constants_match_torch_finfo(fmt):
    fi = torch.finfo(fmt.torch_dtype)
    assert fmt.bits == fi.bits
    assert fmt.max == fi.max
    assert fmt.min_normal == fi.tiny == fi.smallest_normal
    assert fmt.eps == fi.eps


@pytest.mark.parametrize("fmt", ALL, ids=ids)
def test_min_subnormal(fmt):
    d = fmt.torch_dtype
    if fmt.bits == 8:  # nextafter is not implemented for float8: pattern 0x01 is the answer
        expected = torch.tensor([1], dtype=torch.uint8).view(d).item()
    else:
        expected = torch.nextafter(torch.tensor(0.0, dtype=d), torch.tensor(1.0, dtype=d)).item()
    known = {"fp32": 2**-149, "fp16": 2**-24, "bf16": 2**-133, "fp8_e4m3": 2**-9,
             "fp8_e5m2": 2**-16}
    assert fmt.min_subnormal == expected == known[fmt.name]


def test_named_values_and_dtypes():
    assert (FP8_E4M3.max, FP8_E5M2.max, FP16.max) == (448.0, 57344.0, 65504.0)
    assert [f.bias for f in ALL] == [127, 15, 127, 7, 15]
    assert [f.torch_dtype for f in ALL] == [torch.float32, torch.float16, torch.bfloat16,
                                             torch.float8_e4m3fn, torch.float8_e5m2]
    assert FloatFormat("fp6", 3, 2).torch_dtype is None
    with pytest.raises(ValueError):
        FloatFormat("too wide", 9, 23)


# ----------------------------------------------------------------------------- decompose oracle
def test_fp32_decompose_matches_struct():
    g = torch.Generator().manual_seed(0)
    # random bit patterns cover every exponent (subnormals, inf, NaN) uniformly
    rand = torch.randint(-2**31, 2**31, (20000,), generator=g, dtype=torch.int64)
    x = rand.to(torch.int32).view(torch.float32)
    named = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.1, 1e-45, -1e-40, 1.1754944e-38,
                          3.4028235e38, -math.inf, math.inf, 65504.0, 1 / 3])
    x = torch.cat([x[~torch.isnan(x)], named])  # struct routes through a double: no sNaN there
    s, e, m = decompose(x, FP32)
    bits = torch.tensor([struct.unpack(">I", struct.pack(">f", v))[0] for v in x.tolist()])
    assert torch.equal(s, bits >> 31)
    assert torch.equal(e, (bits >> 23) & 0xFF)
    assert torch.equal(m, bits & 0x7FFFFF)
    s, e, m = decompose(torch.tensor([math.nan]), FP32)
    assert e.item() == 255 and m.item() != 0


@pytest.mark.parametrize("fmt", NARROW, ids=ids)
def test_all_bit_patterns_round_trip(fmt):
    """compose(fields of pattern) == torch's decoding; decompose(that) == fields."""
    p = all_patterns(fmt)
    M, E = fmt.mantissa_bits, fmt.exponent_bits
    s, e, m = p >> (E + M), (p >> M) & (2**E - 1), p & (2**M - 1)
    value = compose(s, e, m, fmt)
    assert_same(value, pattern_values(fmt))
    # exact round trip, NaN payloads included (compose puts them where decompose finds them)
    for got, want in zip(decompose(value, fmt), (s, e, m)):
        assert torch.equal(got, want)
    # decompose of torch's own decoding: same fields except NaN payloads, which torch changes
    nan = torch.isnan(value)
    ds, de, dm = decompose(pattern_values(fmt), fmt)
    assert torch.equal(de, e) and torch.equal(dm[~nan], m[~nan]) and torch.equal(ds[~nan], s[~nan])
    assert bool((dm[nan] != 0).all())


def test_compose_rejects_out_of_range_fields():
    with pytest.raises(ValueError):
        compose(0, 32, 0, FP16)
    with pytest.raises(ValueError):
        compose(2, 1, 0, FP16)


# ----------------------------------------------------------------------------- round_to_format
def random_values(n: int, seed: int) -> torch.Tensor:
    """float32 values sign * 2**uniform(-30, 20) * uniform: many magnitudes, never a tie."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return sign * torch.exp2(torch.empty(n).uniform_(-30, 20, generator=g)) \
        * torch.rand(n, generator=g)


def ties_and_edges(fmt: FloatFormat) -> torch.Tensor:
    """Midpoints of neighbours (and their float32 neighbours), overflow, subnormals, specials."""
    v = sorted_finite(fmt)
    v = v[v >= 0]
    ulp_max = fmt.max - v[-2].item()
    beyond = fmt.max + ulp_max if fmt.has_inf else 2 * fmt.max  # the next value if exponent grew
    v = torch.cat([v, torch.tensor([beyond], dtype=torch.float64)])
    mid = ((v[:-1] + v[1:]) / 2).float()  # exact in float32: one more bit than fmt
    up = torch.nextafter(mid, torch.tensor(math.inf))
    down = torch.nextafter(mid, torch.tensor(0.0))
    big = torch.tensor([fmt.max, fmt.max * (1 + fmt.eps / 4), beyond, 2 * beyond, 1e30,
                        3.4028235e38, math.inf])
    special = torch.tensor([0.0, math.nan, fmt.min_subnormal / 2, fmt.min_subnormal / 4])
    x = torch.cat([v.float(), mid, up, down, big, special])
    return torch.cat([x, -x])


@pytest.mark.parametrize("fmt", NARROW, ids=ids)
def test_round_matches_torch_cast(fmt):
    x = torch.cat([random_values(1_000_000, seed=fmt.bits), ties_and_edges(fmt)])
    assert_same(round_to_format(x, fmt), x.to(fmt.torch_dtype).float())


def test_e4m3_saturates_like_torch():
    """torch 2.13 saturates float8_e4m3fn casts, even inf; NaN stays NaN."""
    x = torch.tensor([464.0, 480.0, 1e6, math.inf, -math.inf, math.nan])
    r = round_to_format(x, FP8_E4M3)
    assert r[:5].tolist() == [448.0, 448.0, 448.0, 448.0, -448.0] and math.isnan(r[5])
    assert round_to_format(torch.tensor([61439.0, 61440.0]), FP8_E5M2).tolist() == [57344, math.inf]


def test_fp32_is_identity():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-2**31, 2**31, (100000,), generator=g).to(torch.int32).view(torch.float32)
    assert_same(round_to_format(x, FP32), x)


@pytest.mark.parametrize("fmt", [FloatFormat("e3m2", 3, 2), FloatFormat("e2m3fn", 2, 3, False)],
                         ids=ids)
def test_custom_format_matches_brute_force(fmt):
    """A format torch lacks: nearest value of the composed table, ties to even mantissa."""
    p = all_patterns(fmt)
    M, E = fmt.mantissa_bits, fmt.exponent_bits
    table = compose(p >> (E + M), (p >> M) & (2**E - 1), p & (2**M - 1), fmt).double()
    keep = torch.isfinite(table) & (p >> (E + M) == 0)  # sign 0: ascending with the pattern
    vals, mants = table[keep], (p & (2**M - 1))[keep]
    x = torch.linspace(0, fmt.max * 1.2, 5001).double()  # float32 values, as round_to_format sees
    x = torch.cat([x, (vals[:-1] + vals[1:]) / 2])  # plus every tie
    dist = (x[:, None] - vals[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    cand = dist == best
    # among the (at most two) nearest values, prefer the even mantissa field
    pick = torch.where(cand & (mants[None, :] % 2 == 0), 2, cand.to(torch.int64)).argmax(dim=1)
    want = vals[pick]
    if fmt.has_inf:  # IEEE overflow: from max + half a spacing on (a tie, max is odd) it is inf
        ulp = (vals[-1] - vals[-2]).item()
        want = torch.where(x >= fmt.max + ulp / 2, math.inf, want)
    # without inf the nearest table value above max is max itself: saturation, as torch does
    assert torch.equal(round_to_format(x.float(), fmt).double(), want)


# ----------------------------------------------------------------------------- properties
TABLES = {f.name: sorted_finite(f) for f in NARROW}


@pytest.mark.parametrize("fmt", NARROW, ids=ids)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_round_is_a_nearest_neighbour(fmt, data):
    x = data.draw(st.floats(-fmt.max, fmt.max, width=32, allow_nan=False))
    table = TABLES[fmt.name]
    i = torch.searchsorted(table, torch.tensor([x], dtype=torch.float64), right=True).item()
    lo, hi = table[max(i - 1, 0)].item(), table[min(i, len(table) - 1)].item()
    assert lo <= x <= hi
    r = round_to_format(torch.tensor([x]), fmt).item()
    assert r in (lo, hi)
    assert abs(x - r) <= (hi - lo) / 2
    if lo < x < hi and x - lo == hi - x:  # a tie goes to the even mantissa field
        assert decompose(torch.tensor([r]), fmt)[2].item() % 2 == 0


# ----------------------------------------------------------------------------- memory
def test_memory_bytes_course_numbers():
    gb = lambda *a, **k: memory_bytes(*a, **k) / 1e9  # noqa: E731
    assert gb(7.2e9, 32) == pytest.approx(28.8)
    assert gb(7.2e9, 16) == pytest.approx(14.4)
    assert gb(7.2e9, 8) == pytest.approx(7.2)
    assert gb(7.2e9, 4) == pytest.approx(3.6)
    assert gb(7.2e9, 4, group_size=64) == pytest.approx(3.825)
    assert gb(5e9, 16) == pytest.approx(10.0)
    assert gb(7e9, 32) == pytest.approx(28.0)  # not 280
    assert memory_bytes(65, 4, group_size=64, scale_bits=32) == 65 * 0.5 + 2 * 4  # partial group
    with pytest.raises(ValueError):
        memory_bytes(10, 4, group_size=0)
