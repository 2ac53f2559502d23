"""The hidden tests of lab02_calibration, judged outside the student's kernel.

Each test draws its inputs from a generator (the lab's ``SEED`` for the committed reference
files, a per-submission seed when grading: ``qcourse.judge``); every expected value comes from
qcore's reference implementation (``qcore.quant``, ``qcore.packing``) or from NumPy
(percentiles), never from a student function. Keys starting with ``visible_`` are the visible
checks' own cases.

    python course/refgen/lab02_calibration.py course/reference/lab02_calibration
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qcourse.judge import HiddenTest, Verdict, write_hidden_references
from qcourse.refdata import generator_main, randn
from qcore.quant import (PerChannel, PerGroup, PerTensor, QParams, choose_qparams, fake_quantize, mse,
                         qparams_from_range, qrange, quantize, dequantize, sqnr_db)
from qcore.packing import pack_int4, unpack_int4

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
def scale_zero_point_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
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
    visible = [(0.0, 1000.0, 8, False), (-20.0, 1000.0, 8, False), (-6.0, 5.0, 8, True), (2.0, 5.0, 8, False),
               (-5.0, -2.0, 8, False), (0.0, 0.0, 8, False), (-1.0, 3.0, 4, False), (0.0, 2.0, 4, False),
               (-2.0, 5.0, 4, False)]
    cols = list(zip(*visible))
    return {"xmin": xmin[keep].numpy(), "xmax": xmax[keep].numpy(), "bits": bits[keep].numpy(),
            "symmetric": symmetric[keep].numpy(),
            "visible_xmin": np.array(cols[0], np.float32), "visible_xmax": np.array(cols[1], np.float32),
            "visible_bits": np.array(cols[2], np.int64), "visible_symmetric": np.array(cols[3], bool)}


def scale_zero_point_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {"grids": np.array([qrange(b, s) for b in range(2, 17) for s in (False, True)], dtype=np.int64)}
    for prefix in ("", "visible_"):
        xmin, xmax = torch.from_numpy(inputs[prefix + "xmin"]), torch.from_numpy(inputs[prefix + "xmax"])
        bits, sym = torch.from_numpy(inputs[prefix + "bits"]), torch.from_numpy(inputs[prefix + "symmetric"])
        scale, zp = torch.empty(xmin.shape, dtype=torch.float32), torch.empty(xmin.shape, dtype=torch.int64)
        for b in sorted(set(bits.tolist())):
            for s in (False, True):
                sel = (bits == b) & (sym == s)
                if bool(sel.any()):
                    qp = qparams_from_range(xmin[sel], xmax[sel], b, s)
                    scale[sel], zp[sel] = qp.scale, qp.zero_point.to(torch.int64)
        out[prefix + "scale"], out[prefix + "zero_point"] = scale.numpy(), zp.numpy()
    return out


def scale_zero_point_judge(v: Verdict, inputs, expected, answers) -> None:
    v.equal("grids", expected["grids"], "int_grid for 2..16 bits, both grids")
    got, rows = answers.get("grids"), [(8 - 2) * 2, (8 - 2) * 2 + 1, (4 - 2) * 2 + 1]  # the visible checks' grids
    v.true("visible_grids", got is None or got.shape != expected["grids"].shape
           or np.array_equal(got[rows], expected["grids"][rows]), "the visible checks' grids (8 bits both, 4 symmetric)")
    for prefix in ("", "visible_"):
        v.close(prefix + "scale", expected[prefix + "scale"], "scales (ranges as tensors)", rtol=2e-6)
        v.equal(prefix + "zero_point", expected[prefix + "zero_point"], "zero-points (ranges as tensors)")
    every = slice(0, None, 5)  # one range at a time, as Python floats
    v.close("float_scale", expected["scale"][every], "scales (one range as Python floats)", rtol=2e-6)
    v.equal("float_zero_point", expected["zero_point"][every], "zero-points (one range as Python floats)")


# ----------------------------------------------------------------------------- quantize / dequantize
def quantize_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Cases (x, scale, zero_point, qmin, qmax) to quantize, and codes to dequantize with them.

    Per-tensor scales (0-d) and per-channel ones that broadcast ([out, 1], [1, C, 1]); data
    partly outside the grid (the clamp bites); exact ties at even and odd codes of both signs
    (power-of-two scales, so x / scale is exact); an all-zero tensor with the smallest scale.
    """
    cases = []

    def add(x, scale, zp, bits, symmetric):
        qmin, qmax = qrange(bits, symmetric)
        cases.append((x.to(torch.float32), torch.as_tensor(scale, dtype=torch.float32),
                      torch.as_tensor(zp, dtype=torch.int32), qmin, qmax, bits, symmetric))

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
    # Random shapes, bits and grids; per-tensor and per-channel; data 30 % beyond the range.
    for t in range(24):
        shape = tuple(torch.randint(1, 9, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist())
        bits, sym = (2, 4, 8)[t % 3], bool(t % 2)
        x = randn(*shape, generator=gen) * float(10.0 ** torch.randint(-3, 4, (1,), generator=gen)) + 0.3 * t
        gran = PerChannel(0) if (t // 2) % 2 and len(shape) > 1 else PerTensor()
        qp = choose_qparams(x, bits, sym, gran)
        add(x * 1.3, qp.scale, qp.zero_point, bits, sym)
    out = {"n_cases": np.array(len(cases)), "qmin": np.array([c[3] for c in cases]),
           "qmax": np.array([c[4] for c in cases]), "bits": np.array([c[5] for c in cases]),
           "symmetric": np.array([c[6] for c in cases])}
    for i, (x, scale, zp, qmin, qmax, *_) in enumerate(cases):
        out[f"x{i}"], out[f"scale{i}"], out[f"zp{i}"] = x.numpy(), scale.numpy(), zp.numpy()
        out[f"codes{i}"] = torch.randint(qmin, qmax + 1, x.shape, generator=gen).to(torch.int32).numpy()
    return out


def quantize_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's codes of each ``x`` and its dequantized values of each ``codes``."""
    out = {}
    for i in range(int(inputs["n_cases"])):
        x, scale, zp = (torch.from_numpy(inputs[f"{k}{i}"]) for k in ("x", "scale", "zp"))
        qp = QParams(scale, zp, int(inputs["bits"][i]), bool(inputs["symmetric"][i]))
        assert (qp.qmin, qp.qmax) == (int(inputs["qmin"][i]), int(inputs["qmax"][i]))
        out[f"q{i}"] = quantize(x, qp).to(torch.int64).numpy()
        out[f"xhat{i}"] = dequantize(torch.from_numpy(inputs[f"codes{i}"]), qp).numpy()
    return out


def quantize_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        q, x_hat = answers.get(f"q{i}"), answers.get(f"xhat{i}")
        v.true(f"q{i}", q is None or q.dtype.kind in "iu", f"case {i}: codes must be an integer tensor")
        v.equal(f"q{i}", expected[f"q{i}"], f"case {i}: codes")
        v.true(f"xhat{i}", x_hat is None or x_hat.dtype == np.float32, f"case {i}: dequantize must give float32")
        want = expected[f"xhat{i}"]
        v.close(f"xhat{i}", want, f"case {i}: dequantized values", rtol=1e-6,
                atol=1e-6 * float(np.abs(want).max(initial=0.0)) + 1e-30)


# ----------------------------------------------------------------------------- error metrics
def error_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Pairs (x, x_hat), of which qcore gives the MSE and the SQNR in dB (inf where x_hat == x)."""
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
    out = {"n_cases": np.array(len(pairs))}
    for i, (a, b) in enumerate(pairs):
        out[f"x{i}"], out[f"xhat{i}"] = a.numpy(), b.numpy()
    return out


def error_expected(inputs: dict) -> dict[str, np.ndarray]:
    pairs = [(torch.from_numpy(inputs[f"x{i}"]), torch.from_numpy(inputs[f"xhat{i}"])) for i in range(int(inputs["n_cases"]))]
    return {"mse": np.array([mse(a, b) for a, b in pairs]), "sqnr": np.array([sqnr_db(a, b) for a, b in pairs])}


def error_judge(v: Verdict, inputs, expected, answers) -> None:
    v.close("mse", expected["mse"], "MSE", rtol=1e-5, atol=1e-15)
    got, want = v.got("sqnr"), expected["sqnr"]
    if got is not None and got.shape == want.shape:
        inf = np.isinf(want)
        v.true("sqnr", bool(np.array_equal(np.isposinf(got), inf)), "x_hat == x must give +inf, and only then")
        v.true("sqnr", bool(np.all(np.abs(got[~inf] - want[~inf]) < 1e-4)), "SQNR in dB")
    elif got is not None:
        v.fail("sqnr", f"SQNR: shape {got.shape}")


# ----------------------------------------------------------------------------- granularity
def granularity_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Weights with rows of very different size (and a constant and an all-zero row), then random
    shapes (never square), axes and group sizes."""
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
    for t in range(20):
        out_f, gs = int(torch.randint(2, 12, (1,), generator=gen)), (4, 8, 16, 32)[t % 4]
        in_f = gs * int(torch.randint(1, 5, (1,), generator=gen))
        shape = (out_f, in_f if in_f != out_f else in_f + gs)
        if t % 5 == 4:
            shape = (3,) + shape
        w = randn(*shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 3 + 0.2 * (t % 3)
        bits, sym = (2, 4, 8)[t % 3], bool(t % 2)
        axis = (0, 1, -1, -2)[t % 4] if len(shape) == 2 else (0, 1, 2, -1)[t % 4]
        cases += [("channel", w, axis, bits, sym), ("group", w, gs, bits, sym)]
    out = {"n_cases": np.array(len(cases)), "kind": np.array([c[0] for c in cases]),
           "param": np.array([c[2] for c in cases]), "bits": np.array([c[3] for c in cases]),
           "symmetric": np.array([c[4] for c in cases])}
    for i, (_, w, *_) in enumerate(cases):
        out[f"w{i}"] = w.numpy()
    return out


def granularity_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_cases"])):
        param = int(inputs["param"][i])
        gran = PerChannel(param) if str(inputs["kind"][i]) == "channel" else PerGroup(param)
        qp = choose_qparams(torch.from_numpy(inputs[f"w{i}"]), int(inputs["bits"][i]), bool(inputs["symmetric"][i]), gran)
        out[f"scale{i}"], out[f"zp{i}"] = qp.scale.numpy(), qp.zero_point.to(torch.int64).numpy()
    return out


def granularity_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        what = f"case {i} ({inputs['kind'][i]} {int(inputs['param'][i])}, shape {inputs[f'w{i}'].shape})"
        v.close(f"scale{i}", expected[f"scale{i}"], f"{what}: scales", rtol=2e-6)
        v.equal(f"zp{i}", expected[f"zp{i}"], f"{what}: zero-points")


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


def clipping_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Calibration-like data, the percentiles to take of |x|, and (data, bits, candidates) rows
    for the MSE search."""
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # torch.distributions draw globally
    data = _clip_data(gen)
    out = {"n_data": np.array(len(data)), "percentiles": np.array([0.0, 37.5, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0])}
    mse_rows = []  # (data index, bits, num_candidates)
    for i, x in enumerate(data):
        out[f"x{i}"] = x.numpy()
        for bits, n in ((8, 100), (4, 100), (2, 50), (3, 37)):
            if i >= 7 and bits != 4:  # constant, zero, tiny: one setting is enough
                continue
            mse_rows.append((i, bits, n))
    rows = np.array(mse_rows, dtype=np.int64).reshape(-1, 3)
    out["mse_data"], out["mse_bits"], out["mse_n"] = rows[:, 0], rows[:, 1], rows[:, 2]
    return out


def clipping_expected(inputs: dict) -> dict[str, np.ndarray]:
    """Percentiles of |x| (NumPy, linear interpolation) and, for the MSE search, the MSE of every
    candidate threshold ``T_k = max|x| * k / n`` (k = 1..n) on the symmetric grid."""
    out = {}
    for i in range(int(inputs["n_data"])):
        a = np.abs(inputs[f"x{i}"].astype(np.float64)).ravel()
        out[f"pct{i}"] = np.percentile(a, inputs["percentiles"])
    for j, (i, bits, n) in enumerate(zip(*(inputs[k].tolist() for k in ("mse_data", "mse_bits", "mse_n")))):
        x = torch.from_numpy(inputs[f"x{i}"]).reshape(-1)
        amax = x.abs().max().item()
        table = []
        for k in range(1, n + 1):
            t = amax * k / n
            qp = qparams_from_range(-t, t, bits, True)
            table.append(mse(x, dequantize(quantize(x, qp), qp)))
        out[f"mse_table{j}"] = np.array(table)
    return out


def clipping_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_data"])):
        v.close(f"pct{i}", expected[f"pct{i}"], f"data {i}: percentiles of |x|", rtol=2e-6, atol=1e-12)
    got = v.got("mse")
    rows = list(zip(*(inputs[k].tolist() for k in ("mse_data", "mse_bits", "mse_n"))))
    if got is None or got.shape != (len(rows),):
        v.fail("mse", "one MSE threshold per row")
        return
    for j, (i, bits, n) in enumerate(rows):
        amax = float(np.abs(inputs[f"x{i}"]).max())
        cands = amax * np.arange(1, n + 1) / n
        k = int(np.abs(cands - got[j]).argmin())
        table = expected[f"mse_table{j}"]
        what = f"data {i}, {bits} bits, {n} candidates"
        v.true("mse", abs(cands[k] - got[j]) <= 1e-6 * amax, f"{what}: not one of the candidates max|x| * k / n")
        v.true("mse", table[k] <= table.min() * (1 + 1e-5) + 1e-30, f"{what}: not the threshold of least MSE")


# ----------------------------------------------------------------------------- packing
def pack_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Unsigned 4-bit codes of odd and even sizes and shapes (to pack), and bytes with a shape (to
    unpack)."""
    shapes = [(1,), (2,), (3,), (16,), (7, 5), (4, 6), (3, 3, 3), (2, 8, 16), (1001,)]
    for _ in range(30):
        shapes.append(tuple(torch.randint(1, 8, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()))
    out = {"n_cases": np.array(len(shapes))}
    for i, shape in enumerate(shapes):
        codes = torch.randint(0, 16, shape, generator=gen)
        if i == 2:
            codes = torch.tensor([1, 2, 15])  # 0x12, 0xF0
        out[f"codes{i}"] = codes.numpy().astype(np.uint8)
        n = int(np.prod(shape))
        out[f"bytes{i}"] = torch.randint(0, 256, ((n + 1) // 2,), generator=gen).to(torch.uint8).numpy()
        if n % 2:  # the padding nibble of an odd count is 0
            out[f"bytes{i}"][-1] &= 0xF0
        out[f"shape{i}"] = np.array(shape, dtype=np.int64)
    return out


def pack_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_cases"])):
        out[f"packed{i}"] = pack_int4(torch.from_numpy(inputs[f"codes{i}"])).numpy()
        shape = tuple(inputs[f"shape{i}"].tolist())
        out[f"unpacked{i}"] = unpack_int4(torch.from_numpy(inputs[f"bytes{i}"]), shape).to(torch.int64).numpy()
    return out


def pack_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        for dtype in ("uint8", "int64"):
            got = answers.get(f"packed{i}/{dtype}")
            v.true(f"packed{i}/{dtype}", got is None or got.dtype == np.uint8, f"case {i}: pack_4bit must return uint8")
            v.equal(f"packed{i}/{dtype}", expected[f"packed{i}"], f"case {i} ({dtype} codes): packed bytes")
        v.equal(f"unpacked{i}", expected[f"unpacked{i}"], f"case {i}: unpacked codes")


HIDDEN_TESTS = [
    HiddenTest("ex1_scale_zero_point_tests", "scale_zero_point", scale_zero_point_inputs, scale_zero_point_expected,
               scale_zero_point_judge),
    HiddenTest("ex2_quantize_tests", "quantize", quantize_inputs, quantize_expected, quantize_judge),
    HiddenTest("ex3_error_tests", "errors", error_inputs, error_expected, error_judge),
    HiddenTest("ex4_granularity_tests", "granularity", granularity_inputs, granularity_expected, granularity_judge),
    HiddenTest("ex5_clipping_tests", "clipping", clipping_inputs, clipping_expected, clipping_judge),
    HiddenTest("ex6_pack_tests", "pack", pack_inputs, pack_expected, pack_judge),
]


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir``: each test's inputs for the lab's
    seed and the expected values on them."""
    write_hidden_references(out_dir, HIDDEN_TESTS, SEED)


if __name__ == "__main__":
    generator_main(make, LAB)
