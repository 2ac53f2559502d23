"""The hidden tests of lab01_precision_formats, judged outside the student's kernel.

Each test draws its inputs from a generator (the lab's ``SEED`` for the committed reference
files; a per-submission seed when grading, see ``qcourse.judge``), computes the expected values
with qcore's reference implementation (``qcore.formats``), never with student code, and judges
the answers the lab's ask cell sent. Inputs whose key starts with ``visible_`` are the visible
checks' own cases: a failure there while the kernel showed the checks passing is a lie.

    python course/refgen/lab01_precision_formats.py course/reference/lab01_precision_formats
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from qcourse.judge import HiddenTest, Verdict, write_hidden_references
from qcourse.refdata import generator_main, randn
from qcore.formats import BF16, FP16, FP32, FloatFormat, compose, decompose, memory_bytes, round_to_format

LAB = "lab01_precision_formats"
SEED = 20240501

# IEEE-like layouts (with infinities) for the rebuild exercise: the three of the lab, FP8 E5M2,
# and odd ones no torch dtype has, so that a hard-coded bias or width cannot pass.
REBUILD_LAYOUTS = [(8, 23), (5, 10), (8, 7), (5, 2), (2, 1), (3, 4), (4, 3), (6, 9), (7, 15), (8, 1)]


# Results whose last bits may depend on the CPU (see qcourse.refdata): none. Every value of
# this lab comes from bit operations, exact powers of two and exact arithmetic on them, so a
# regenerated file must be bit-identical on any machine.
CPU_DEPENDENT: dict[str, dict[str, int]] = {}


def _bits_to(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Unsigned bit patterns (uint16/uint32) -> the float tensor they encode."""
    width = bits.dtype.itemsize * 8
    signed = torch.from_numpy(bits.astype(np.int64))
    signed = torch.where(signed >= 2 ** (width - 1), signed - 2**width, signed)
    return signed.to(torch.int32 if width == 32 else torch.int16).view(dtype)


# ----------------------------------------------------------------------------- exercise 1
SPLIT_TAGS = {"fp32": (torch.float32, FP32), "fp16": (torch.float16, FP16), "bf16": (torch.bfloat16, BF16)}
FP32_EDGES = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000, 0x3F800000, 0xBF800000,
              0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
              0x3DCCCCCD, 0x40490FDB, 0x007FFFFF, 0x34000000]


def _float_bits(values: list[float], dtype: torch.dtype) -> np.ndarray:
    width = torch.finfo(dtype).bits
    b = torch.tensor(values, dtype=dtype).view(torch.int32 if width == 32 else torch.int16).to(torch.int64)
    return (b & (2**width - 1)).numpy().astype(np.uint32 if width == 32 else np.uint16)


def split_bits_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Every FP16 and BF16 bit pattern; random FP32 patterns plus the edges of FP32; the visible cases."""
    random_bits = torch.randint(0, 2**32, (4096,), dtype=torch.int64, generator=gen)
    return {"fp16_bits": np.arange(2**16, dtype=np.uint16), "bf16_bits": np.arange(2**16, dtype=np.uint16),
            "fp32_bits": np.concatenate([np.array(FP32_EDGES, np.uint32), random_bits.numpy().astype(np.uint32)]),
            "matrix": randn(6, 5, generator=gen).numpy(),  # asked transposed: 2-D and not contiguous
            "visible_fp16_bits": _float_bits([1.0, -2.5, 0.0, 2.0**-24, float("inf")], torch.float16),
            "visible_fp32_bits": _float_bits([-0.1], torch.float32),
            "visible_bf16_bits": _float_bits([1.0, -3.0], torch.bfloat16)}


def split_bits_expected(inputs: dict) -> dict[str, np.ndarray]:
    """``decompose``'s fields; for NaN, the stored bits themselves (payload and sign kept)."""
    out = {}
    for key in [k for k in inputs if k.endswith("_bits")]:
        tag = key[:-len("_bits")]
        dtype, fmt = SPLIT_TAGS[tag.removeprefix("visible_")]
        bits = torch.from_numpy(inputs[key].astype(np.int64))
        x = _bits_to(inputs[key], dtype)
        s, e, m = decompose(x, fmt)
        nan = torch.isnan(x)
        s = torch.where(nan, bits >> (fmt.exponent_bits + fmt.mantissa_bits), s)
        e = torch.where(nan, 2**fmt.exponent_bits - 1, e)
        m = torch.where(nan, bits & (2**fmt.mantissa_bits - 1), m)
        out.update({f"{tag}_sign": s.numpy().astype(np.uint8), f"{tag}_exponent": e.numpy().astype(np.uint8),
                    f"{tag}_mantissa": m.numpy().astype(np.uint32 if fmt.bits == 32 else np.uint16),
                    f"{tag}_is_nan": nan.numpy()})
    s, e, m = decompose(torch.from_numpy(inputs["matrix"]).t(), FP32)
    out.update({"matrix_sign": s.numpy().astype(np.uint8), "matrix_exponent": e.numpy().astype(np.uint8),
                "matrix_mantissa": m.numpy().astype(np.uint32)})
    return out


def split_bits_judge(v: Verdict, inputs, expected, answers) -> None:
    for tag in [k[:-len("_bits")] for k in inputs if k.endswith("_bits")] + ["matrix"]:
        for i, field in enumerate(("sign", "exponent", "mantissa")):
            v.equal(f"{tag}/{i}", expected[f"{tag}_{field}"], f"{tag} {field}")


# ----------------------------------------------------------------------------- exercise 2
def _layout_rows(layouts: list[tuple[int, int]], rows: list[tuple[int, int, int, int]]) -> dict[str, np.ndarray]:
    cols = list(zip(*rows))
    return {"layouts": np.array(layouts, dtype=np.int64), "layout": np.array(cols[0], np.uint8),
            "sign": np.array(cols[1], np.uint8), "exponent": np.array(cols[2], np.uint8),
            "mantissa": np.array(cols[3], np.uint32)}


def rebuild_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Fields of many layouts (edges: zeros, subnormals, normals, max, inf, NaN); the visible cases."""
    rows = {"layout": [], "sign": [], "exponent": [], "mantissa": []}
    for i, (E, M) in enumerate(REBUILD_LAYOUTS):
        fmt = FloatFormat(f"e{E}m{M}", E, M)
        top, mmax = 2**E - 1, 2**M - 1
        edge_e = [0, 0, 0, 0, 1, 1, 1, fmt.bias, fmt.bias, fmt.bias + 1, top - 1, top - 1, top, top, top]
        edge_m = [0, 1, mmax, mmax // 2 + 1, 0, 1, mmax, 0, 1, mmax // 2 + 1, 0, mmax, 0, 1, mmax]
        n = 400
        e = torch.cat([torch.tensor(edge_e * 2), torch.randint(0, top + 1, (n,), generator=gen)])
        m = torch.cat([torch.tensor(edge_m * 2), torch.randint(0, mmax + 1, (n,), generator=gen)])
        s = torch.cat([torch.zeros(len(edge_e), dtype=torch.int64), torch.ones(len(edge_e), dtype=torch.int64),
                       torch.randint(0, 2, (n,), generator=gen)])
        for key, t in (("layout", torch.full_like(s, i)), ("sign", s), ("exponent", e), ("mantissa", m)):
            rows[key].append(t)
    out = {k: torch.cat(t).numpy() for k, t in rows.items()}
    out = {"layout": out["layout"].astype(np.uint8), "sign": out["sign"].astype(np.uint8),
           "exponent": out["exponent"].astype(np.uint8), "mantissa": out["mantissa"].astype(np.uint32),
           "layouts": np.array(REBUILD_LAYOUTS, dtype=np.int64)}
    b = int(np.array(0.1, np.float32).view(np.uint32))
    visible = _layout_rows([(5, 10), (8, 23)], [
        (0, 0, 15, 0), (0, 1, 16, 256), (0, 0, 15, 512), (0, 1, 14, 0),  # FP16 normals
        (0, 0, 0, 1), (0, 0, 0, 1023), (0, 1, 0, 0),                      # FP16 subnormals, -0
        (0, 0, 31, 0), (0, 1, 31, 0), (0, 0, 31, 1),                      # FP16 inf, -inf, NaN
        (1, b >> 31, (b >> 23) & 0xFF, b & 0x7FFFFF)])                    # FP32 0.1
    out.update({f"visible_{k}": a for k, a in visible.items()})
    return out


def rebuild_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for prefix in ("", "visible_"):
        layout = torch.from_numpy(inputs[f"{prefix}layout"].astype(np.int64))
        value = torch.zeros(layout.shape, dtype=torch.float32)
        for i, (E, M) in enumerate(inputs[f"{prefix}layouts"].tolist()):
            sel = layout == i
            s, e, m = (torch.from_numpy(inputs[f"{prefix}{k}"].astype(np.int64))[sel]
                       for k in ("sign", "exponent", "mantissa"))
            value[sel] = compose(s, e, m, FloatFormat(f"e{E}m{M}", E, M))
        out[f"{prefix}value"] = value.numpy()
    return out


def rebuild_judge(v: Verdict, inputs, expected, answers) -> None:
    for prefix in ("", "visible_"):
        layout = inputs[f"{prefix}layout"]
        for i, (E, M) in enumerate(inputs[f"{prefix}layouts"].tolist()):
            want = expected[f"{prefix}value"][layout == i]
            v.equal(f"{prefix}layout{i}", want, f"E{E}M{M} values")
            got = answers.get(f"{prefix}layout{i}")
            if got is not None and got.shape == want.shape:  # the sign of zero, which == cannot see
                v.true(f"{prefix}layout{i}", bool(np.array_equal(np.signbit(got[~np.isnan(want)]),
                                                                 np.signbit(want[~np.isnan(want)]))),
                       f"E{E}M{M}: the sign of zero")
    # Every FP16 and BF16 bit pattern, decoded by torch.
    for tag, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        want = torch.arange(2**16, dtype=torch.int64).to(torch.int16).view(dtype).to(torch.float32).numpy()
        v.equal(f"all_{tag}", want, f"every {tag} bit pattern against torch")


# ----------------------------------------------------------------------------- exercise 3
def _limit_rows(rows) -> dict[str, np.ndarray]:
    cols = list(zip(*rows))
    return {"exponent_bits": np.array(cols[0], dtype=np.int64), "mantissa_bits": np.array(cols[1], dtype=np.int64),
            "has_inf": np.array(cols[2], dtype=bool)}


def limits_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Every (E, M) that fits float32, with and without inf, in an order of its own; the visible cases."""
    rows = [(E, M, has_inf) for E in range(2, 9) for M in range(1, 24) for has_inf in (True, False)]
    order = torch.randperm(len(rows), generator=gen).tolist()
    out = _limit_rows([rows[i] for i in order])
    visible = _limit_rows([(8, 23, True), (5, 10, True), (8, 7, True), (5, 2, True), (4, 3, False), (4, 3, True)])
    out.update({f"visible_{k}": a for k, a in visible.items()})
    return out


def limits_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for prefix in ("", "visible_"):
        formats = [FloatFormat("f", int(E), int(M), bool(i)) for E, M, i in
                   zip(inputs[f"{prefix}exponent_bits"], inputs[f"{prefix}mantissa_bits"], inputs[f"{prefix}has_inf"])]
        for key in ("max", "min_normal", "min_subnormal", "eps"):
            out[f"{prefix}{key}"] = np.array([getattr(f, key) for f in formats], dtype=np.float64)
    return out


def limits_judge(v: Verdict, inputs, expected, answers) -> None:
    for prefix in ("", "visible_"):
        for key in ("max", "min_normal", "min_subnormal", "eps"):
            v.close(f"{prefix}{key}", expected[f"{prefix}{key}"], key, rtol=1e-12)


# ----------------------------------------------------------------------------- exercise 4
BF16_EDGES = [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F808001, 0x3F807FFF, 0x3F7FFFFF,
              0x3FFF8000, 0x3FFFFFFF, 0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,
              0x7F7E8000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001,
              0x7F808000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FBFFFFF, 0x00000000, 0x80000000, 0x00000001,
              0x00008000, 0x00018000, 0x007FFFFF, 0x807F8000, 0x00FF8000, 0x40490FDB, 0x3DCCCCCD]


def bf16_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """float32 inputs as bit patterns. Edges: exact ties with an even and an odd kept part (both
    signs), one above and below a tie, values that carry into the next binade, the largest BF16 and
    what overflows past it, FP32's max, infinities, quiet and signalling NaNs whose payload sits only
    in the low 16 bits, subnormals and signed zeros; then random patterns and ordinary magnitudes
    with a tie planted in a quarter of them; the visible cases."""
    random_bits = torch.randint(0, 2**32, (8192,), dtype=torch.int64, generator=gen)
    normal = (randn(8192, generator=gen) * 10.0 ** torch.randint(-6, 7, (8192,), generator=gen)).to(torch.float32)
    nbits = normal.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nbits[::4] = (nbits[::4] & ~0xFFFF) | 0x8000
    bits = torch.cat([torch.tensor(BF16_EDGES, dtype=torch.int64), random_bits, nbits])
    visible = [1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 3 * 2**-8), 0.1, 3.0e38, 3.4e38]
    return {"x_bits": bits.numpy().astype(np.uint32),
            "visible_x_bits": np.concatenate([_float_bits(visible, torch.float32),
                                              np.array([0x7F800001, 0x7FC00000], np.uint32)])}


def bf16_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's round-to-nearest-even BF16 values (as float32 bits) and torch's own cast's."""
    out = {}
    for prefix in ("", "visible_"):
        x = _bits_to(inputs[f"{prefix}x_bits"], torch.float32)
        for key, r in (("expected_bits", round_to_format(x, BF16)), ("torch_bits", x.to(torch.bfloat16).float())):
            # torch's NaN bits depend on its kernel (0xFFFF vectorized, 0x7FC0 scalar): one NaN kept
            r = torch.where(torch.isnan(r), torch.tensor(float("nan")), r)
            out[f"{prefix}{key}"] = (r.view(torch.int32).to(torch.int64) & 0xFFFFFFFF).numpy().astype(np.uint32)
        out[f"{prefix}is_nan"] = torch.isnan(x).numpy()
    return out


def _same_floats(v: Verdict, key: str, want_bits: np.ndarray, nan: np.ndarray, what: str,
                 torch_bits: np.ndarray | None = None) -> None:
    """float32 answers with the expected bits (the sign of zero included) where the value is a
    number, NaN where it is not (NaN bits are the kernel's choice)."""
    got = v.got(key)
    if got is None:
        return
    if got.shape != nan.shape or got.dtype != np.float32:
        v.fail(key, f"{what}: float32 of shape {nan.shape} expected, got {got.dtype} {got.shape}")
        return
    v.true(key, bool(np.array_equal(np.isnan(got), nan)), f"{what}: NaN in, NaN out (and only there)")
    bits = got.view(np.uint32)[~nan]
    v.true(key, bool(np.array_equal(bits, want_bits[~nan])), f"{what}: values differ from round to nearest even")
    if torch_bits is not None:
        v.true(key, bool(np.array_equal(bits, torch_bits[~nan])), f"{what}: values differ from torch's cast")


def bf16_judge(v: Verdict, inputs, expected, answers) -> None:
    for prefix in ("", "visible_"):
        want, torch_bits, nan = (expected[f"{prefix}{k}"] for k in ("expected_bits", "torch_bits", "is_nan"))
        _same_floats(v, f"{prefix}x", want, nan, "BF16", torch_bits)
    want, torch_bits, nan = (expected[k][:30].reshape(5, 6).T for k in ("expected_bits", "torch_bits", "is_nan"))
    _same_floats(v, "matrix", want, nan, "BF16 of a 2-D input", torch_bits)


# ----------------------------------------------------------------------------- exercise 5
def _memory_rows(rows) -> dict[str, np.ndarray]:
    cols = list(zip(*rows))
    return {"n_params": np.array(cols[0], dtype=np.float64), "bits": np.array(cols[1], dtype=np.float64),
            "group_size": np.array(cols[2], dtype=np.int64), "scale_bits": np.array(cols[3], dtype=np.int64)}


def memory_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """(n_params, bits, group_size, scale_bits) rows; group_size 0 means None; the visible cases."""
    rows = [(5e9, 16, 0, 16), (7.24e9, 32, 0, 16), (7.24e9, 4, 64, 16), (7, 4, 3, 32), (1, 8, 64, 16),
            (0, 8, 64, 16), (1000, 4, 128, 16), (1001, 3, 7, 8), (12345, 2.5, 256, 32), (7, 4, 0, 16)]
    n = torch.randint(1, 10**10, (40,), generator=gen).tolist()
    bits = [32, 16, 8, 6, 4, 3, 2, 1]
    groups = [0, 1, 7, 32, 64, 100, 128, 1000]
    scale_bits = [8, 16, 32]
    for i, p in enumerate(n):
        rows.append((p, bits[i % len(bits)], groups[(i * 3) % len(groups)], scale_bits[i % 3]))
    out = _memory_rows(rows)
    visible = _memory_rows([(5e9, 16, 0, 16), (7e9, 32, 0, 16), (7.2e9, 4, 64, 16), (100, 4, 64, 32)])
    out.update({f"visible_{k}": a for k, a in visible.items()})
    return out


def memory_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for prefix in ("", "visible_"):
        rows = zip(*(inputs[f"{prefix}{k}"].tolist() for k in ("n_params", "bits", "group_size", "scale_bits")))
        out[f"{prefix}expected"] = np.array([memory_bytes(p, b, int(g) or None, int(sb)) for p, b, g, sb in rows],
                                            dtype=np.float64)
    return out


def memory_judge(v: Verdict, inputs, expected, answers) -> None:
    for prefix in ("", "visible_"):
        v.close(f"{prefix}bytes", expected[f"{prefix}expected"], "bytes", rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------- exercise 6
# (E, M, has_inf): torch's four 8- and 16-bit layouts first, then layouts no torch dtype has, with
# and without infinities, down to 2 exponent bits and up to FP32 itself (rounding is the identity).
ROUND_LAYOUTS = [(5, 10, True), (8, 7, True), (4, 3, False), (5, 2, True), (3, 2, True), (2, 1, True),
                 (6, 9, True), (4, 3, True), (5, 2, False), (3, 4, False), (2, 3, False), (8, 1, True),
                 (7, 15, False), (8, 23, True)]
ROUND_PER_LAYOUT = 3000
SPECIALS = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x00000001,
            0x80000001, 0x007FFFFF, 0x7F7FFFFF, 0xFF7FFFFF]


def _gap(v: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """float64 spacing of ``fmt`` around each value of ``fmt`` in ``v`` (the binade's, fixed below min_normal)."""
    _, e = torch.frexp(v)
    return torch.pow(2.0, (torch.clamp(e.to(torch.int64) - 1, min=1 - fmt.bias) - fmt.mantissa_bits).double())


def _f32_bits(x: torch.Tensor) -> np.ndarray:
    return (x.to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF).numpy().astype(np.uint32)


def _round_cases(fmt: FloatFormat, gen: torch.Generator, n: int) -> np.ndarray:
    """``n`` float32 bit patterns around ``fmt``: values of the layout, exact ties between neighbours
    and one float32 step either side of them, the largest value and what overflows it, the
    subnormal ties, float32's specials, then random patterns (every magnitude)."""
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    k = 500
    s, e, m = (torch.randint(0, hi, (k,), generator=gen) for hi in (2, 2**E, 2**M))
    v = compose(s, e, m, fmt).double()
    v = v[torch.isfinite(v)]
    tie = v + torch.copysign(_gap(v, fmt) / 2, v)
    tie32 = tie.to(torch.float32)
    top_gap = _gap(torch.tensor([fmt.max], dtype=torch.float64), fmt)
    near = torch.tensor([fmt.max, fmt.min_normal, fmt.min_subnormal, fmt.min_subnormal / 2,
                         3 * fmt.min_subnormal / 2, fmt.min_subnormal / 4, 2 * fmt.max], dtype=torch.float64)
    near = torch.cat([near, fmt.max + top_gap / 2, fmt.max + top_gap / 4, fmt.max + 3 * top_gap / 4])
    near32 = torch.cat([near, -near]).to(torch.float32)
    up, down = torch.tensor(math.inf), torch.tensor(-math.inf)
    parts = [torch.from_numpy(np.array(SPECIALS, np.uint32).astype(np.int64)), torch.from_numpy(_f32_bits(near32).astype(np.int64)),
             *(torch.from_numpy(_f32_bits(t).astype(np.int64)) for t in
               (torch.nextafter(near32, up), torch.nextafter(near32, down), v, tie32, torch.nextafter(tie32, up),
                torch.nextafter(tie32, down)))]
    bits = torch.cat(parts)[:n]
    rest = torch.randint(0, 2**32, (n - len(bits),), dtype=torch.int64, generator=gen)
    return torch.cat([bits, rest]).numpy().astype(np.uint32)


def visible_round_x() -> torch.Tensor:
    """The 6022 values of the lab's visible check against torch's casts (the same code as there)."""
    gen = torch.Generator().manual_seed(6)
    random_bits = torch.randint(-(2**31), 2**31, (3000,), generator=gen)
    inner = (torch.randint(0, 2, (3000,), generator=gen) << 31) | (torch.randint(98, 146, (3000,), generator=gen) << 23) \
        | torch.randint(0, 2**23, (3000,), generator=gen)
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.0, 65520.0, 448.0, 464.0,
                          465.0, 480.0, 57344.0, 61440.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11,
                          1 + 3 * 2.0**-11, 1 + 2.0**-8, 3.4e38, 1e-45])
    return torch.cat([random_bits.to(torch.int32).view(torch.float32), inner.to(torch.int32).view(torch.float32), edges])


def round_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Per layout (a row of ``layouts``: E, M, has_inf), a row of ``x_bits``; the visible cases: the
    four torch layouts on the visible check's values, and its E3M2 values (repeated to the row's length)."""
    rows = [_round_cases(FloatFormat(f"e{E}m{M}", E, M, inf), gen, ROUND_PER_LAYOUT) for E, M, inf in ROUND_LAYOUTS]
    shown = _f32_bits(visible_round_x())
    e3m2 = _f32_bits(torch.tensor([14.0, 14.9, 15.0, 0.3, 3 / 64, 1 / 32, -1e-3]))
    return {"layouts": np.array(ROUND_LAYOUTS, dtype=np.int64), "x_bits": np.stack(rows),
            "visible_layouts": np.array(ROUND_LAYOUTS[:4] + [(3, 2, True)], dtype=np.int64),
            "visible_x_bits": np.stack([shown] * 4 + [np.resize(e3m2, shown.shape)])}


def round_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's rounding of each row (float32 bits) and where the input is NaN."""
    out = {}
    for prefix in ("", "visible_"):
        want, nan = [], []
        for (E, M, inf), row in zip(inputs[f"{prefix}layouts"].tolist(), inputs[f"{prefix}x_bits"]):
            x = _bits_to(row, torch.float32)
            want.append(_f32_bits(round_to_format(x, FloatFormat(f"e{E}m{M}", E, M, bool(inf)))))
            nan.append(torch.isnan(x).numpy())
        out[f"{prefix}expected_bits"], out[f"{prefix}is_nan"] = np.stack(want), np.stack(nan)
    return out


def round_judge(v: Verdict, inputs, expected, answers) -> None:
    for prefix in ("", "visible_"):
        for i, (E, M, inf) in enumerate(inputs[f"{prefix}layouts"].tolist()):
            want, nan = expected[f"{prefix}expected_bits"][i], expected[f"{prefix}is_nan"][i]
            _same_floats(v, f"{prefix}layout{i}", want, nan, f"E{E}M{M}{'' if inf else ' (no inf)'}")
    _same_floats(v, "matrix", expected["expected_bits"][0, :30].reshape(5, 6).T,
                 expected["is_nan"][0, :30].reshape(5, 6).T, "a 2-D, non-contiguous input (E5M10)")


HIDDEN_TESTS = [
    HiddenTest("ex1_split_bits_tests", "split_bits", split_bits_inputs, split_bits_expected, split_bits_judge),
    HiddenTest("ex2_fields_to_value_tests", "fields_to_value", rebuild_inputs, rebuild_expected, rebuild_judge),
    HiddenTest("ex3_format_limits_tests", "format_limits", limits_inputs, limits_expected, limits_judge),
    HiddenTest("ex4_round_to_bf16_tests", "round_to_bf16", bf16_inputs, bf16_expected, bf16_judge),
    HiddenTest("ex5_model_bytes_tests", "model_bytes", memory_inputs, memory_expected, memory_judge),
    HiddenTest("ex6_round_to_format_tests", "round_to_format", round_inputs, round_expected, round_judge),
]


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir``: each test's inputs for the lab's
    seed and the expected values on them."""
    write_hidden_references(out_dir, HIDDEN_TESTS, SEED)


if __name__ == "__main__":
    generator_main(make, LAB)
