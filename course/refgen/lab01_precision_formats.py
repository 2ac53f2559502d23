"""Reference inputs and outputs for the hidden tests of lab01_precision_formats.

Every expected value comes from qcore's reference implementation (``qcore.formats``), never
from a student function. Fixed seeds: a rerun writes the same arrays.

    python course/refgen/lab01_precision_formats.py course/reference/lab01_precision_formats
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qcourse.refdata import generator_main, randn, write_references
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


def _fields(bits: torch.Tensor, dtype: torch.dtype, fmt: FloatFormat) -> dict[str, np.ndarray]:
    """Unsigned bit patterns -> the fields ``decompose`` gives for the values they encode."""
    int_view = torch.int32 if fmt.bits == 32 else torch.int16
    signed = torch.where(bits >= 2 ** (fmt.bits - 1), bits - 2**fmt.bits, bits)  # two's complement
    x = signed.to(int_view).view(dtype)
    s, e, m = decompose(x, fmt)
    return {"bits": bits.numpy().astype(np.uint32 if fmt.bits == 32 else np.uint16),
            "sign": s.numpy().astype(np.uint8), "exponent": e.numpy().astype(np.uint8),
            "mantissa": m.numpy().astype(np.uint32 if fmt.bits == 32 else np.uint16),
            "is_nan": torch.isnan(x).numpy()}


def split_bits_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Every FP16 and BF16 bit pattern; random FP32 patterns plus the edges of FP32."""
    out = {}
    for tag, dtype, fmt in (("fp16", torch.float16, FP16), ("bf16", torch.bfloat16, BF16)):
        for k, v in _fields(torch.arange(2**16, dtype=torch.int64), dtype, fmt).items():
            out[f"{tag}_{k}"] = v
    edges = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000, 0x3F800000, 0xBF800000,
             0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001,
             0x3DCCCCCD, 0x40490FDB, 0x007FFFFF, 0x34000000]
    random_bits = torch.randint(0, 2**32, (4096,), dtype=torch.int64, generator=gen)
    bits = torch.cat([torch.tensor(edges, dtype=torch.int64), random_bits])
    for k, v in _fields(bits, torch.float32, FP32).items():
        out[f"fp32_{k}"] = v
    return out


def rebuild_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Fields of many layouts (edges: zeros, subnormals, normals, max, inf, NaN) and their values."""
    rows = {"layout": [], "sign": [], "exponent": [], "mantissa": [], "value": []}
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
        value = compose(s, e, m, fmt)
        for key, v in (("layout", torch.full_like(s, i)), ("sign", s), ("exponent", e),
                       ("mantissa", m), ("value", value)):
            rows[key].append(v)
    out = {k: torch.cat(v).numpy() for k, v in rows.items()}
    out["layout"] = out["layout"].astype(np.uint8)
    out["sign"] = out["sign"].astype(np.uint8)
    out["exponent"] = out["exponent"].astype(np.uint8)
    out["mantissa"] = out["mantissa"].astype(np.uint32)
    out["layouts"] = np.array(REBUILD_LAYOUTS, dtype=np.int64)
    return out


def limits_refs() -> dict[str, np.ndarray]:
    """max, min_normal, min_subnormal, eps for every (E, M) that fits float32, with and without inf."""
    rows = []
    for E in range(2, 9):
        for M in (1, 2, 3, 4, 5, 7, 10, 16, 23):
            for has_inf in (True, False):
                f = FloatFormat("f", E, M, has_inf)
                rows.append((E, M, has_inf, f.max, f.min_normal, f.min_subnormal, f.eps))
    cols = list(zip(*rows))
    return {"exponent_bits": np.array(cols[0], dtype=np.int64), "mantissa_bits": np.array(cols[1], dtype=np.int64),
            "has_inf": np.array(cols[2], dtype=bool), "max": np.array(cols[3], dtype=np.float64),
            "min_normal": np.array(cols[4], dtype=np.float64),
            "min_subnormal": np.array(cols[5], dtype=np.float64), "eps": np.array(cols[6], dtype=np.float64)}


def bf16_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """float32 inputs (bit patterns) and their round-to-nearest-even BF16 values (as float32 bits).

    Edges: exact ties with an even and an odd kept part (both signs), one above and below a tie,
    values that carry into the next binade, the largest BF16 and what overflows past it, FP32's
    max, infinities, quiet and signalling NaNs whose payload sits only in the low 16 bits,
    subnormals and signed zeros.
    """
    edges = [0x3F808000, 0x3F818000, 0xBF808000, 0xBF818000, 0x3F808001, 0x3F807FFF, 0x3F7FFFFF,
             0x3FFF8000, 0x3FFFFFFF, 0x7F7F0000, 0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7F8000,
             0x7F7E8000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001,
             0x7F808000, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FBFFFFF, 0x00000000, 0x80000000, 0x00000001,
             0x00008000, 0x00018000, 0x007FFFFF, 0x807F8000, 0x00FF8000, 0x40490FDB, 0x3DCCCCCD]
    random_bits = torch.randint(0, 2**32, (8192,), dtype=torch.int64, generator=gen)
    # Ordinary magnitudes too, with a tie planted in a quarter of them.
    normal = (randn(8192, generator=gen) * 10.0 ** torch.randint(-6, 7, (8192,), generator=gen)).to(torch.float32)
    nbits = normal.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nbits[::4] = (nbits[::4] & ~0xFFFF) | 0x8000
    bits = torch.cat([torch.tensor(edges, dtype=torch.int64), random_bits, nbits])
    x = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32).view(torch.float32)
    r = round_to_format(x, BF16)
    return {"x_bits": bits.numpy().astype(np.uint32),
            "expected_bits": (r.view(torch.int32).to(torch.int64) & 0xFFFFFFFF).numpy().astype(np.uint32),
            "is_nan": torch.isnan(r).numpy()}


def memory_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """(n_params, bits, group_size, scale_bits) rows and bytes; group_size 0 means None."""
    rows = [(5e9, 16, 0, 16), (7.24e9, 32, 0, 16), (7.24e9, 4, 64, 16), (7, 4, 3, 32), (1, 8, 64, 16),
            (0, 8, 64, 16), (1000, 4, 128, 16), (1001, 3, 7, 8), (12345, 2.5, 256, 32)]
    n = torch.randint(1, 10**10, (40,), generator=gen).tolist()
    bits = [32, 16, 8, 6, 4, 3, 2, 1]
    groups = [0, 1, 7, 32, 64, 100, 128, 1000]
    scale_bits = [8, 16, 32]
    for i, p in enumerate(n):
        rows.append((p, bits[i % len(bits)], groups[(i * 3) % len(groups)], scale_bits[i % 3]))
    cols = list(zip(*rows))
    expected = [memory_bytes(p, b, g or None, sb) for p, b, g, sb in rows]
    return {"n_params": np.array(cols[0], dtype=np.float64), "bits": np.array(cols[1], dtype=np.float64),
            "group_size": np.array(cols[2], dtype=np.int64), "scale_bits": np.array(cols[3], dtype=np.int64),
            "expected": np.array(expected, dtype=np.float64)}


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir`` (created if needed)."""
    gen = torch.Generator().manual_seed(SEED)  # one stream, drawn from in this order
    write_references(out_dir, {"split_bits": split_bits_refs(gen), "fields_to_value": rebuild_refs(gen),
                               "format_limits": limits_refs(), "round_to_bf16": bf16_refs(gen),
                               "model_bytes": memory_refs(gen)})


if __name__ == "__main__":
    generator_main(make, LAB)
