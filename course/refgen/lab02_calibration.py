"""Reference inputs and outputs for the hidden tests of lab02_calibration.

Every expected value comes from qcore's reference implementation (``qcore.quant``) or from
NumPy (percentiles), never from a student function. Fixed seeds: a rerun writes the same arrays.

    python course/refgen/lab02_calibration.py course/reference/lab02_calibration
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qcourse.refdata import generator_main, randn, write_references
from qcore.quant import (PerChannel, PerGroup, choose_qparams, fake_quantize, mse, qparams_from_range,
                         qrange, quantize, dequantize, sqnr_db)
from qcore.packing import pack_int4

LAB = "lab02_calibration"
SEED = 20240502
BITS = [2, 3, 4, 5, 8, 12, 16]


# Results whose last bits may depend on the CPU (qcourse.refdata): means over the data
# (float32 roundings ~ the number of elements averaged). Codes, scales, zero-points, percentiles
# (sorting and one interpolation) and dequantized values are exact and compared bit for bit.
CPU_DEPENDENT = {
    "clipping": {"mse_table*": 6000},  # MSE over up to 6,000 values per threshold
    "errors": {"mse": 4000, "sqnr": 4000},  # sums over up to 4,000 values
}


# ----------------------------------------------------------------------------- scale, zero-point
def scale_zero_point_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Ranges of every kind (straddling 0, all positive, all negative, constant, all-zero, narrower
    than the smallest scale, magnitudes 1e-4 .. 1e4) for every bit width, both grids.

    Asymmetric rows whose ``xmin / scale`` lies within 1e-3 of a half-integer are dropped: there a
    student computing in float64 could round the zero-point the other way, and no test should hang
    on the last bit of a division.
    """
    fixed = [(0.0, 1000.0), (-20.0, 1000.0), (-6.0, 5.0), (0.0, 0.0), (2.0, 5.0), (-5.0, -2.0),
             (3.0, 3.0), (-3.0, -3.0), (0.0, 1e-9), (-1e-9, 0.0), (-1e-9, 1e-9), (-1.0, 1.0),
             (-0.5, 7.25), (-1e4, 1.0), (1e-4, 1e4), (-7.0, 0.0), (0.0, 7.0)]
    n = 700
    kind = torch.randint(0, 5, (n,), generator=gen)
    mag = (10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 8 - 4)).float()  # float64: same on every CPU
    a, b = torch.rand(n, generator=gen) * mag, torch.rand(n, generator=gen) * mag
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    xmin = torch.where(kind == 0, -a, torch.where(kind == 1, lo, torch.where(kind == 2, -hi, a)))
    xmax = torch.where(kind == 0, b, torch.where(kind == 1, hi, torch.where(kind == 2, -lo, a)))
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    xmin = torch.where(kind == 3, xmin * sign, xmin)  # constant ranges of both signs
    xmax = torch.where(kind == 3, xmax * sign, xmax)
    xmin = torch.where(kind == 4, torch.zeros(n), xmin)  # all-zero
    xmax = torch.where(kind == 4, torch.zeros(n), xmax)
    xmin = torch.cat([torch.tensor([r[0] for r in fixed] * 2), xmin]).to(torch.float32)
    xmax = torch.cat([torch.tensor([r[1] for r in fixed] * 2), xmax]).to(torch.float32)
    m = len(xmin)
    bits = torch.tensor(BITS)[torch.randint(0, len(BITS), (m,), generator=gen)]
    bits[: 2 * len(fixed)] = 8
    bits[1 * len(fixed): 2 * len(fixed): 3] = 4
    symmetric = torch.rand(m, generator=gen) < 0.5
    symmetric[: len(fixed)] = False
    symmetric[len(fixed): 2 * len(fixed)] = True
    scale = torch.empty(m, dtype=torch.float32)
    zp = torch.empty(m, dtype=torch.int64)
    keep = torch.ones(m, dtype=torch.bool)
    for b in BITS:
        for s in (False, True):
            sel = (bits == b) & (symmetric == s)
            if not bool(sel.any()):
                continue
            qp = qparams_from_range(xmin[sel], xmax[sel], b, s)
            scale[sel], zp[sel] = qp.scale, qp.zero_point.to(torch.int64)
            if not s:
                r = (torch.clamp(xmin[sel], max=0.0) / qp.scale).double()
                keep[sel] = (r - torch.floor(r) - 0.5).abs() > 1e-3
    keep[: 2 * len(fixed)] = True
    return {"xmin": xmin[keep].numpy(), "xmax": xmax[keep].numpy(), "bits": bits[keep].numpy(),
            "symmetric": symmetric[keep].numpy(), "scale": scale[keep].numpy(), "zero_point": zp[keep].numpy()}


# ----------------------------------------------------------------------------- quantize / dequantize
def quantize_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Cases (x, scale, zero_point, qmin, qmax) -> codes and dequantized values.

    Per-tensor scales (0-d) and per-channel ones that broadcast ([out, 1], [1, C, 1]); data
    partly outside the grid (the clamp bites); exact ties at even and odd codes of both signs
    (power-of-two scales, so x / scale is exact); an all-zero tensor with the smallest scale.
    """
    cases = []

    def add(x, scale, zp, bits, symmetric):
        qmin, qmax = qrange(bits, symmetric)
        scale = torch.as_tensor(scale, dtype=torch.float32)
        zp = torch.as_tensor(zp, dtype=torch.int32)
        q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
        x_hat = (q - zp) * scale
        cases.append((x.to(torch.float32), scale, zp, qmin, qmax, q.to(torch.int64), x_hat))

    x = randn(3000, generator=gen) * 3 + 1
    qp = qparams_from_range(-4.0, 6.0, 8, False)  # narrower than the data: the clamp bites
    add(x, qp.scale, qp.zero_point, 8, False)
    x = randn(20, 30, generator=gen)
    add(x, 1.7 / 7, 0, 4, True)
    x = randn(16, 40, generator=gen) * torch.rand(16, 1, generator=gen) * 4
    qp = choose_qparams(x, 2, False, PerChannel(0))
    add(x * 1.2, qp.scale, qp.zero_point, 2, False)
    ties = (torch.arange(-40, 41, dtype=torch.float32) + 0.5) / 8
    add(ties, 0.125, 0, 8, True)
    add(ties, 0.125, 3, 8, False)
    add(ties * 4, 0.5, 7, 4, False)
    x = randn(4, 5, 6, generator=gen)
    qp = choose_qparams(x, 8, False, PerChannel(1))
    add(x, qp.scale, qp.zero_point, 8, False)
    qp = qparams_from_range(0.0, 0.0, 8, False)
    add(torch.zeros(7, 3), qp.scale, qp.zero_point, 8, False)
    x = randn(500, generator=gen) * 100
    qp = qparams_from_range(-50.0, 120.0, 12, False)
    add(x, qp.scale, qp.zero_point, 12, False)
    x = randn(64, generator=gen) - 5  # all negative, asymmetric
    qp = choose_qparams(x, 3, False)
    add(x, qp.scale, qp.zero_point, 3, False)
    out = {"n_cases": np.array(len(cases)), "qmin": np.array([c[3] for c in cases]),
           "qmax": np.array([c[4] for c in cases])}
    for i, (x, scale, zp, _, _, q, x_hat) in enumerate(cases):
        out[f"x{i}"], out[f"scale{i}"], out[f"zp{i}"] = x.numpy(), scale.numpy(), zp.numpy()
        out[f"q{i}"], out[f"xhat{i}"] = q.numpy(), x_hat.numpy()
    return out


# ----------------------------------------------------------------------------- error metrics
def error_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Pairs (x, x_hat) -> MSE and SQNR in dB (inf where x_hat == x)."""
    pairs = []
    x = randn(4000, generator=gen)
    for bits in (2, 4, 8):
        pairs.append((x, fake_quantize(x, choose_qparams(x, bits, True))))
    w = randn(64, 48, generator=gen) * 0.05
    pairs.append((w, fake_quantize(w, choose_qparams(w, 4, False, PerChannel(0)))))
    pairs.append((w, w.clone()))  # no error: infinite SQNR
    pairs.append((w, torch.zeros_like(w)))  # all signal lost: 0 dB
    pairs.append((torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])))
    pairs.append((torch.tensor([2.5]), torch.tensor([2.0])))
    y = torch.rand(5, 6, 7, generator=gen) * 1000
    pairs.append((y, y + randn(5, 6, 7, generator=gen)))
    out = {"n_cases": np.array(len(pairs)),
           "mse": np.array([mse(a, b) for a, b in pairs]),
           "sqnr": np.array([sqnr_db(a, b) for a, b in pairs])}
    for i, (a, b) in enumerate(pairs):
        out[f"x{i}"], out[f"xhat{i}"] = a.numpy(), b.numpy()
    return out


# ----------------------------------------------------------------------------- granularity
def granularity_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Weights with rows of very different size (and a constant and an all-zero row) and their
    per-channel and per-group scales and zero-points."""
    cases = []  # (kind, w, axis_or_group, bits, symmetric)
    w = randn(48, 64, generator=gen) * torch.logspace(-3, 0, 48)[:, None]
    w[5] = 0.0
    w[9] = 0.25
    w[11, 7] = 3.0  # one outlier
    cases += [("channel", w, 0, 8, True), ("channel", w, 1, 4, False), ("channel", w, -1, 8, False),
              ("group", w, 16, 4, True), ("group", w, 8, 2, False), ("group", w, 64, 8, False)]
    v = randn(6, 10, 32, generator=gen) * torch.rand(6, 1, 1, generator=gen)
    cases += [("channel", v, 0, 4, True), ("channel", v, 1, 8, False), ("channel", v, 2, 3, False),
              ("group", v, 4, 4, False), ("group", v, 16, 8, True)]
    out = {"n_cases": np.array(len(cases)), "kind": np.array([c[0] for c in cases]),
           "param": np.array([c[2] for c in cases]), "bits": np.array([c[3] for c in cases]),
           "symmetric": np.array([c[4] for c in cases])}
    for i, (kind, w, param, bits, sym) in enumerate(cases):
        gran = PerChannel(param) if kind == "channel" else PerGroup(param)
        qp = choose_qparams(w, bits, sym, gran)
        out[f"w{i}"] = w.numpy()
        out[f"scale{i}"], out[f"zp{i}"] = qp.scale.numpy(), qp.zero_point.to(torch.int64).numpy()
    return out


# ----------------------------------------------------------------------------- clipping thresholds
def _clip_data(gen: torch.Generator) -> list[torch.Tensor]:
    """Calibration-like data: Gaussian, Laplace, Student-t, activations with a few outliers,
    uniform (where min-max is best), one-sided, constant, all-zero, a handful of values."""
    n = 6000
    normal = randn(n, generator=gen)
    f64 = torch.tensor(1.0, dtype=torch.float64)  # float64 sampling takes the same path on every CPU
    laplace = torch.distributions.Laplace(0.0 * f64, f64).sample((n,)).float()
    student = torch.distributions.StudentT(2.0 * f64).sample((n,)).float()
    acts = randn(n, generator=gen) * 0.5
    acts[torch.randint(0, n, (6,), generator=gen)] = torch.tensor([12.0, -9.0, 20.0, 15.0, -14.0, 8.0])
    uniform = torch.rand(2000, generator=gen) * 2 - 1
    positive = torch.distributions.Exponential(f64).sample((3000,)).float()
    negative = -torch.distributions.Exponential(0.5 * f64).sample((1000,)).float().reshape(40, 25)
    return [normal, laplace * 3, student.reshape(60, 100), acts, uniform, positive, negative,
            torch.full((100,), 0.7), torch.full((50,), -2.5), torch.zeros(50),
            torch.tensor([0.3, -1.2, 2.0, -0.1, 0.05, 0.9, -0.6])]


def clipping_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Percentiles of |x| (NumPy, linear interpolation) and, for the MSE search, the MSE of every
    candidate threshold ``T_k = max|x| * k / n`` (k = 1..n) on the symmetric grid."""
    torch.manual_seed(SEED)  # torch.distributions samples from the global generator
    data = _clip_data(gen)
    percentiles = np.array([0.0, 37.5, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0])
    out = {"n_data": np.array(len(data)), "percentiles": percentiles}
    mse_rows = []  # (data index, bits, num_candidates)
    for i, x in enumerate(data):
        out[f"x{i}"] = x.numpy()
        a = np.abs(x.numpy().astype(np.float64)).ravel()
        out[f"pct{i}"] = np.percentile(a, percentiles)
        for bits, n in ((8, 100), (4, 100), (2, 50), (3, 37)):
            if i >= 7 and bits != 4:  # constant, zero, tiny: one setting is enough
                continue
            mse_rows.append((i, bits, n))
    for j, (i, bits, n) in enumerate(mse_rows):
        x = data[i].reshape(-1)
        amax = x.abs().max().item()
        table = []
        for k in range(1, n + 1):
            t = amax * k / n
            qp = qparams_from_range(-t, t, bits, True)
            table.append(mse(x, dequantize(quantize(x, qp), qp)))
        out[f"mse_table{j}"] = np.array(table)
    rows = np.array(mse_rows, dtype=np.int64).reshape(-1, 3)
    out["mse_data"], out["mse_bits"], out["mse_n"] = rows[:, 0], rows[:, 1], rows[:, 2]
    return out


# ----------------------------------------------------------------------------- packing
def pack_refs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Unsigned 4-bit codes of odd and even sizes and shapes, and their packed bytes."""
    shapes = [(1,), (2,), (3,), (16,), (7, 5), (4, 6), (3, 3, 3), (2, 8, 16), (1001,)]
    out = {"n_cases": np.array(len(shapes))}
    for i, shape in enumerate(shapes):
        codes = torch.randint(0, 16, shape, generator=gen)
        if i == 2:
            codes = torch.tensor([1, 2, 15])  # 0x12, 0xF0
        out[f"codes{i}"] = codes.numpy().astype(np.uint8)
        out[f"packed{i}"] = pack_int4(codes).numpy()
    return out


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir`` (created if needed)."""
    gen = torch.Generator().manual_seed(SEED)  # one stream, drawn from in this order
    write_references(out_dir, {"scale_zero_point": scale_zero_point_refs(gen), "quantize": quantize_refs(gen),
                               "errors": error_refs(gen), "granularity": granularity_refs(gen),
                               "clipping": clipping_refs(gen), "pack": pack_refs(gen)})


if __name__ == "__main__":
    generator_main(make, LAB)
