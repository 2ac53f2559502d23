"""Lab 1 (precision formats): the master's solution against oracles (struct, torch's casts and
finfo, qcore.formats), and the lab's spec: its exercises and the typical wrong solutions its test
cells must reject (test_lab_structure.py runs the structure tests and the mutants on it).

Across CPUs (docs/numerics-across-cpus.md): every hidden comparison of this lab is exact (bit fields,
NaN payloads, rounded BF16 bits, values built from fields) except the format limits and model bytes
(``rel_tol=1e-12``: float64 products a student may take in another order).
"""
from __future__ import annotations

import math
import struct

import torch

from harness import Exercise, Lab
from qcore.formats import FloatFormat, compose, memory_bytes


# ----------------------------------------------------------------------------- the solution against oracles
def test_split_bits_against_struct_and_compose(solved):
    split_bits = solved.ns["split_bits"]
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 2**32, (2000,), dtype=torch.int64, generator=gen)
    x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    s, e, m = split_bits(x)
    for i in range(0, 2000, 7):
        v = x[i].item()
        b = int(bits[i]) if math.isnan(v) else struct.unpack(">I", struct.pack(">f", v))[0]
        assert (s[i].item(), e[i].item(), m[i].item()) == (b >> 31, (b >> 23) & 0xFF, b & 0x7FFFFF)
    # Every FP16 and BF16 pattern: the fields rebuild the value torch decodes.
    for dtype, (E, M) in ((torch.float16, (5, 10)), (torch.bfloat16, (8, 7))):
        x = torch.arange(-(2**15), 2**15, dtype=torch.int16).view(dtype)
        s, e, m = split_bits(x)
        assert s.dtype == e.dtype == m.dtype == torch.int64
        back = compose(s, e, m, FloatFormat("f", E, M))
        nan = torch.isnan(x)
        assert torch.equal(torch.isnan(back), nan)
        assert torch.equal(back[~nan].view(torch.int32), x[~nan].float().view(torch.int32))


def test_fields_to_value_against_torch_and_struct(solved):
    fields_to_value = solved.ns["fields_to_value"]
    for dtype, (E, M), n_bits in ((torch.float16, (5, 10), 16), (torch.bfloat16, (8, 7), 16),
                                  (torch.float8_e5m2, (5, 2), 8)):
        b = torch.arange(2**n_bits, dtype=torch.int64)
        view = torch.int16 if n_bits == 16 else torch.uint8
        want = b.to(view).view(dtype).float()
        got = fields_to_value(b >> (E + M), (b >> M) & (2**E - 1), b & (2**M - 1), E, M)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # -0.0 included
    gen = torch.Generator().manual_seed(1)
    for b in torch.randint(0, 2**32, (500,), dtype=torch.int64, generator=gen).tolist():
        (want,) = struct.unpack(">f", struct.pack(">I", b))
        got = fields_to_value(torch.tensor([b >> 31]), torch.tensor([(b >> 23) & 0xFF]),
                              torch.tensor([b & 0x7FFFFF]), 8, 23).item()
        assert (math.isnan(got) and math.isnan(want)) or got == want


def test_format_limits_against_finfo(solved):
    format_limits = solved.ns["format_limits"]
    cases = [(torch.float32, 8, 23, True), (torch.float16, 5, 10, True), (torch.bfloat16, 8, 7, True),
             (torch.float8_e5m2, 5, 2, True), (torch.float8_e4m3fn, 4, 3, False)]
    for dtype, E, M, has_inf in cases:
        fi, lim = torch.finfo(dtype), format_limits(E, M, has_inf=has_inf)
        assert (lim["max"], lim["min_normal"], lim["eps"]) == (fi.max, fi.tiny, fi.eps)
        assert lim["min_subnormal"] == fi.tiny * fi.eps
    # The smallest positive value of the 8- and 16-bit dtypes, from all their patterns.
    for dtype, E, M, has_inf, view in ((torch.float16, 5, 10, True, torch.int16),
                                       (torch.bfloat16, 8, 7, True, torch.int16),
                                       (torch.float8_e4m3fn, 4, 3, False, torch.uint8)):
        n = 2 ** (8 * torch.tensor([], dtype=dtype).element_size())
        v = torch.arange(n, dtype=torch.int64).to(view).view(dtype).double()
        v = v[torch.isfinite(v)]
        assert format_limits(E, M, has_inf)["min_subnormal"] == v[v > 0].min().item()
        assert format_limits(E, M, has_inf)["max"] == v.max().item()
    assert format_limits(4, 3, has_inf=False)["max"] == 448.0


def test_round_to_bf16_against_torch_cast(solved):
    round_to_bf16 = solved.ns["round_to_bf16"]
    gen = torch.Generator().manual_seed(2)
    random_bits = torch.randint(-(2**31), 2**31, (600_000,), dtype=torch.int64, generator=gen)
    x = torch.cat([random_bits.to(torch.int32).view(torch.float32),
                   torch.randn(400_000, generator=gen) * 10.0 ** torch.randint(-30, 30, (400_000,), generator=gen),
                   torch.tensor([0x3F808000, 0x3F818000, 0x7F7F8000, 0x7F7FFFFF, 0x7F800001, -1, 0x00008000],
                                dtype=torch.int64).to(torch.int32).view(torch.float32)])
    want, got = x.to(torch.bfloat16).float(), round_to_bf16(x)
    nan = torch.isnan(want)
    assert got.dtype == torch.float32
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))


def test_model_bytes_reproduces_the_seeds(solved):
    model_bytes, n_mistral = solved.ns["model_bytes"], solved.ns["n_params"]
    assert n_mistral == 7_248_023_552
    assert model_bytes(5e9, 16) == 10e9
    assert model_bytes(7e9, 32) == 28e9  # not 280 GB
    assert [round(model_bytes(n_mistral, b) / 1e9, 1) for b in (32, 16, 8)] == [29.0, 14.5, 7.2]
    assert 3.5e9 < model_bytes(n_mistral, 4, group_size=64) < 4.5e9
    gen = torch.Generator().manual_seed(3)
    for n in torch.randint(1, 10**11, (50,), generator=gen).tolist():
        for bits, group, sb in ((4, 64, 16), (3, 100, 32), (8, None, 16), (2.5, 7, 8)):
            assert model_bytes(n, bits, group, sb) == memory_bytes(n, bits, group, sb)


# ----------------------------------------------------------------------------- the spec
# The solution templates; each mutant is a typical wrong solution, plausible (it runs on the smoke
# input) and rejected by the exercise's test cell and by the hidden part of that cell alone.
SPLIT = """
def split_bits(x):
    E, M = LAYOUT[x.dtype]
    b = x.view(INT_VIEW[x.dtype]).to(torch.int64) & ((1 << (1 + E + M)) - 1)
    sign, exponent, mantissa = b >> (E + M), (b >> M) & ((1 << E) - 1), b & ((1 << M) - 1)
    {patch}
    return sign, exponent, mantissa
"""
REBUILD = """
def fields_to_value(sign, exponent, mantissa, exponent_bits, mantissa_bits):
    s, e, m = (torch.as_tensor(v).to(torch.int64) for v in (sign, exponent, mantissa))
    E, M = exponent_bits, mantissa_bits
    bias = 2 ** (E - 1) - 1
    {patch_bias}
    frac = m.to(torch.float64) / 2**M
    normal = (1.0 + frac) * torch.exp2((e - bias).to(torch.float64))
    subnormal = frac * 2.0 ** (1 - bias)
    {patch_values}
    magnitude = torch.where(e == 0, subnormal, normal)
    special = torch.where(m == 0, math.inf, math.nan)
    {patch_special}
    magnitude = torch.where(e == 2**E - 1, special, magnitude)
    return torch.where(s == 1, -magnitude, magnitude).to(torch.float32)
"""
LIMITS = """
def format_limits(exponent_bits, mantissa_bits, has_inf=True):
    E, M = exponent_bits, mantissa_bits
    bias = 2 ** (E - 1) - 1
    {patch_bias}
    if has_inf:
        e_max, m_max = 2**E - 2, 2**M - 1
    else:
        e_max, m_max = 2**E - 1, 2**M - 2
    {patch_range}
    out = {{"max": 2.0 ** (e_max - bias) * (1 + m_max / 2**M), "min_normal": 2.0 ** (1 - bias),
           "min_subnormal": 2.0 ** (1 - bias - M), "eps": 2.0**-M}}
    {patch_out}
    return out
"""
BF16 = """
def round_to_bf16(x):
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lsb = (b >> 16) & 1
    upper = (b + 0x7FFF + lsb) >> 16
    {patch_round}
    upper = torch.where(torch.isnan(x), (b >> 16) | 0x0040, upper)
    {patch_nan}
    out = (upper & 0xFFFF) << 16
    out = torch.where(out >= 2**31, out - 2**32, out)
    r = out.to(torch.int32).view(torch.float32)
    {patch_out}
    return r
"""
BYTES = """
def model_bytes(n_params, bits, group_size=None, scale_bits=16):
    total = n_params * bits / 8
    if group_size is not None:
        total += math.ceil(n_params / group_size) * scale_bits / 8
    {patch}
    return float(total)
"""


SPEC = Lab(
    name="lab01_precision_formats",
    grader=False,
    seconds=60,
    printouts=("7168.51 MiB", "3840.51 MiB"),  # the seed's
    release_forbids=("_NoCastToBF16",),
    exercises=(
        Exercise("ex1_split_bits", points=2, functions=("split_bits",), template=SPLIT,
                 smoke="split_bits(torch.tensor([1.0, -2.0]))", mutants={
            "signed view, no mask (sign -1)": {" & ((1 << (1 + E + M)) - 1)": ""},
            "mantissa mask one bit short": {"patch": "mantissa = b & ((1 << (M - 1)) - 1)"},
            "exponent shifted one too far": {"patch": "exponent = (b >> (M + 1)) & ((1 << E) - 1)"},
            "value converted, not viewed": {"x.view(INT_VIEW[x.dtype])": "x"},
            "FP16 layout for every 16-bit type": {
                "E, M = LAYOUT[x.dtype]": "E, M = (5, 10) if x.element_size() == 2 else (8, 23)"},
            "NaN payload dropped": {"patch": "mantissa = torch.where(exponent == 2**E - 1, 0, mantissa)"},
            "delegates to decompose": """
from qcore.formats import decompose, FP32, FP16, BF16
def split_bits(x):
    return decompose(x, {torch.float32: FP32, torch.float16: FP16, torch.bfloat16: BF16}[x.dtype])
""",
            "frexp instead of bits": """
def split_bits(x):
    E, M = LAYOUT[x.dtype]
    bias = 2 ** (E - 1) - 1
    xd = x.double()
    f, ex = torch.frexp(xd.abs())
    sign = torch.signbit(xd).to(torch.int64)
    exponent = torch.where(xd == 0, 0, ex.to(torch.int64) - 1 + bias)
    mantissa = torch.where(xd == 0, 0, ((2 * f - 1) * 2**M).round().to(torch.int64))
    return sign, exponent, mantissa
""",
        }),
        Exercise("ex2_fields_to_value", points=2, functions=("fields_to_value",), template=REBUILD,
                 smoke="fields_to_value(torch.tensor([0]), torch.tensor([15]), torch.tensor([0]), 5, 10)", mutants={
            "wrong bias 2**(E-1)": {"patch_bias": "bias = 2 ** (E - 1)"},
            "FP16 bias hard-coded": {"patch_bias": "bias = 15"},
            "implicit leading 1 forgotten": {
                "patch_values": "normal = frac * torch.exp2((e - bias).to(torch.float64))"},
            "subnormal exponent -bias (off by one)": {"patch_values": "subnormal = frac * 2.0 ** (-bias)"},
            "subnormals given the implicit 1": {"patch_values": "subnormal = (1 + frac) * 2.0 ** (1 - bias)"},
            "all-ones exponent read as a number": {"patch_special": "special = normal"},
            "NaN read as inf": {"patch_special": "special = torch.full_like(frac, math.inf)"},
            "sign ignored": {"torch.where(s == 1, -magnitude, magnitude)": "magnitude"},
            "delegates to compose": """
from qcore.formats import compose, FloatFormat
def fields_to_value(sign, exponent, mantissa, exponent_bits, mantissa_bits):
    return compose(sign, exponent, mantissa, FloatFormat("x", exponent_bits, mantissa_bits))
""",
        }),
        Exercise("ex3_format_limits", points=2, functions=("format_limits",), template=LIMITS,
                 smoke="format_limits(5, 10)", mutants={
            "wrong bias 2**(E-1)": {"patch_bias": "bias = 2 ** (E - 1)"},
            "max uses the all-ones exponent (off by one)": {"patch_range": "e_max = 2**E - 1"},
            "max without the mantissa": {"patch_out": 'out["max"] = 2.0 ** (e_max - bias)'},
            "max without the implicit 1": {"patch_out": 'out["max"] = 2.0 ** (e_max - bias) * m_max / 2**M'},
            "min_subnormal 2**(-bias-M) (off by one)": {"patch_out": 'out["min_subnormal"] = 2.0 ** (-bias - M)'},
            "eps is half the gap": {"patch_out": 'out["eps"] = 2.0 ** -(M + 1)'},
            "has_inf ignored (E4M3 = 240)": {"patch_range": "e_max, m_max = 2**E - 2, 2**M - 1"},
            "no-inf max with all-ones mantissa (480)": {"patch_range": "m_max = 2**M - 1 if has_inf else m_max + 1"},
            "delegates to FloatFormat": """
from qcore.formats import FloatFormat
def format_limits(exponent_bits, mantissa_bits, has_inf=True):
    f = FloatFormat("x", exponent_bits, mantissa_bits, has_inf)
    return {"max": f.max, "min_normal": f.min_normal, "min_subnormal": f.min_subnormal, "eps": f.eps}
""",
        }),
        Exercise("ex4_round_to_bf16", points=3, functions=("round_to_bf16",), template=BF16,
                 smoke="round_to_bf16(torch.tensor([1.0, 0.1]))", mutants={
            "truncates": {"patch_round": "upper = b >> 16"},
            "ties round up (adds 0x8000)": {"patch_round": "upper = (b + 0x8000) >> 16"},
            "ties to odd": {"patch_round": "upper = (b + 0x7FFF + (1 - lsb)) >> 16"},
            "NaN not handled (low-payload NaN becomes inf)": {"patch_nan": "upper = (b + 0x7FFF + lsb) >> 16"},
            "overflow saturates to the max": {
                "patch_out": "r = torch.where(torch.isinf(r) & torch.isfinite(x), "
                             "torch.copysign(torch.tensor(3.3895313892515355e38), x), r)"},
            "casts with .to(torch.bfloat16)": "def round_to_bf16(x):\n"
                                              "    return x.to(torch.bfloat16).to(torch.float32)\n",
            "casts with .bfloat16()": "def round_to_bf16(x):\n    return x.bfloat16().float()\n",
            "casts via Python floats": "def round_to_bf16(x):\n"
                                       "    return torch.tensor(x.tolist(), dtype=torch.bfloat16).float()\n",
            "delegates to round_to_format": "def round_to_bf16(x):\n    return round_to_format(x, BF16)\n",
        }),
        Exercise("ex5_model_bytes", points=1, functions=("model_bytes",), template=BYTES,
                 smoke="model_bytes(1e9, 4, 64)", mutants={
            "no ceil on the groups": {"math.ceil(n_params / group_size)": "(n_params / group_size)"},
            "floor on the groups": {"math.ceil(n_params / group_size)": "(n_params // group_size)"},
            "bits taken as bytes": {"n_params * bits / 8": "n_params * bits"},
            "a scale per parameter": {"math.ceil(n_params / group_size)": "n_params"},
            "scale_bits ignored (always 2 bytes)": {"* scale_bits / 8": "* 2"},
            "group_size ignored": {"patch": "total = n_params * bits / 8"},
            "delegates to memory_bytes": """
from qcore.formats import memory_bytes
def model_bytes(n_params, bits, group_size=None, scale_bits=16):
    return memory_bytes(n_params, bits, group_size, scale_bits)
""",
        }),
    ),
)
