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

from harness import load_spec
from qcore.formats import FloatFormat, compose, memory_bytes
from qcore.formats import round_to_format as qcore_round


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


def test_round_to_format_against_torch_casts_and_qcore(solved):
    """FP16, BF16 and both FP8s bit for bit like torch's casts (random patterns: every magnitude,
    NaN, inf; values inside the formats' ranges); layouts torch lacks like qcore's rounding."""
    round_to_format = solved.ns["round_to_format"]
    gen = torch.Generator().manual_seed(4)
    inner = ((torch.randint(0, 2, (300_000,), generator=gen) << 31) | (torch.randint(90, 150, (300_000,), generator=gen) << 23)
             | torch.randint(0, 2**23, (300_000,), generator=gen))
    x = torch.cat([torch.randint(-(2**31), 2**31, (300_000,), generator=gen).to(torch.int32).view(torch.float32),
                   inner.to(torch.int32).view(torch.float32)])
    for dtype, layout in ((torch.float16, (5, 10, True)), (torch.bfloat16, (8, 7, True)),
                          (torch.float8_e4m3fn, (4, 3, False)), (torch.float8_e5m2, (5, 2, True))):
        want, got = x.to(dtype).float(), round_to_format(x, *layout)
        number = ~torch.isnan(want)
        assert got.dtype == torch.float32 and torch.equal(torch.isnan(got), ~number)
        assert torch.equal(got[number].view(torch.int32), want[number].view(torch.int32)), dtype
    for E, M, has_inf in ((3, 2, True), (2, 1, True), (3, 4, False), (6, 9, True), (8, 23, True)):
        want = qcore_round(x, FloatFormat("f", E, M, has_inf))
        got = round_to_format(x, E, M, has_inf)
        number = ~torch.isnan(want)
        assert torch.equal(got[number].view(torch.int32), want[number].view(torch.int32)), (E, M, has_inf)
    assert torch.equal(round_to_format(x, 8, 23, True)[~torch.isnan(x)].view(torch.int32),
                       x[~torch.isnan(x)].view(torch.int32))  # FP32 into FP32: the identity


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
SPEC = load_spec("lab01_precision_formats")  # specs/lab01_precision_formats.yaml: the exercises, their templates and mutants
