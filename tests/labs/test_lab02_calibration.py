"""Lab 2 (calibration): the master's solution against oracles (qcore.quant, torch's observers and
quantize/fake-quantize functions, NumPy), the seeds' worked examples, and the lab's spec: its
exercises and the typical wrong solutions its test cells must reject (test_lab_structure.py runs
the structure tests and the mutants on it).

The notebook runs as under the grader (``NBGRADER_EXECUTION``: fewer calibration sentences), and the
sentiment model is loaded once for the lab (tests/labs/conftest.py).

Across CPUs (docs/numerics-across-cpus.md): codes, zero-points, grids and packed bytes are compared
exactly (the references keep inputs 1e-3 of a step away from ties and plant exact ties); scales,
dequantized values, MSE and percentiles within relative tolerances; the MSE search accepts any
candidate within 1e-5 of the least MSE.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import REFERENCE, Exercise, Kernel, Lab, cell_of, hidden_part, patched
from qcore.clipping import MSEObserver
from qcore.packing import pack_int4
from qcore.quant import PerChannel, PerGroup, choose_qparams, fake_quantize, mse, qparams_from_range, qrange, sqnr_db

LAB = "lab02_calibration"


# ----------------------------------------------------------------------------- the solution against oracles
def test_seeds_worked_examples(solved):
    ns = solved.ns
    scale, zp = ns["scale_zero_point"](0.0, 1000.0, 8, False)
    assert round(float(scale), 2) == 3.92 and int(zp) == 0
    assert ns["quantize_affine"](torch.tensor([250.0]), scale, zp, 0, 255).item() == 64
    scale, zp = ns["scale_zero_point"](-20.0, 1000.0, 8, False)
    assert float(scale) == 4.0 and int(zp) == 5
    assert ns["quantize_affine"](torch.tensor([-20.0, 0.0]), scale, zp, 0, 255).tolist() == [0, 5]
    scale, zp = ns["scale_zero_point"](-6.0, 5.0, 8, True)
    assert math.isclose(float(scale), 6 / 127, rel_tol=1e-7) and int(zp) == 0
    assert ns["quantize_affine"](torch.tensor([-6.0, 5.0, 6.0]), scale, zp, -127, 127).tolist() == [-127, 106, 127]
    # The seed's full grid: -6 -> -128 with scale 6/128, and 5 -> 107 (the seed says "about 106").
    assert ns["quantize_affine"](torch.tensor([-6.0, 5.0, 6.0]), 6 / 128, 0, -128, 127).tolist() == [-128, 107, 127]


def test_scale_zero_point_against_torch_observers_and_qcore(solved):
    szp, int_grid = solved.ns["scale_zero_point"], solved.ns["int_grid"]
    for bits in range(2, 17):
        for sym in (False, True):
            assert tuple(int_grid(bits, sym)) == qrange(bits, sym)
    gen = torch.Generator().manual_seed(0)
    for i in range(300):
        lo, hi = sorted((torch.randn(2, generator=gen) * 10.0 ** (i % 7 - 3)).tolist())
        if i % 5 == 0:
            lo, hi = abs(lo), abs(lo) + abs(hi)  # a range that does not contain 0
        bits, sym = (2, 4, 8)[i % 3], bool(i % 2)
        qmin, qmax = qrange(bits, sym)
        obs = torch.ao.quantization.MinMaxObserver(
            dtype=torch.qint8 if sym else torch.quint8,
            qscheme=torch.per_tensor_symmetric if sym else torch.per_tensor_affine, quant_min=qmin, quant_max=qmax)
        obs(torch.tensor([lo, hi]))
        t_scale, t_zp = obs.calculate_qparams()
        scale, zp = szp(lo, hi, bits, sym)
        assert math.isclose(float(scale), t_scale.item(), rel_tol=1e-6), (lo, hi, bits, sym)
        assert int(zp) == t_zp.item(), (lo, hi, bits, sym)
        qp = qparams_from_range(lo, hi, bits, sym)
        assert float(scale) == qp.scale.item() and int(zp) == qp.zero_point.item()
    # Degenerate ranges: finite positive scale, as torch's observers.
    for lo, hi in ((0.0, 0.0), (3.0, 3.0), (-2.0, -2.0)):
        for sym in (False, True):
            scale, zp = szp(lo, hi, 8, sym)
            assert math.isfinite(float(scale)) and float(scale) > 0
    xmin, xmax = torch.randn(2, 50, generator=gen).sort(dim=0).values
    scale, zp = szp(xmin, xmax, 4, False)
    qp = qparams_from_range(xmin, xmax, 4, False)
    assert scale.shape == (50,) and torch.equal(scale, qp.scale) and torch.equal(zp.long(), qp.zero_point.long())


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_quantize_against_torch(solved):
    q_aff, dq_aff = solved.ns["quantize_affine"], solved.ns["dequantize_affine"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5000, generator=gen) * 4
    x = torch.cat([x, (torch.arange(-50, 50) + 0.5) * 0.0625])  # exact ties
    for scale, zp, qmin, qmax, dtype in ((0.0625, 0, -127, 127, torch.qint8), (0.03125, 37, 0, 255, torch.quint8),
                                         (0.125, 128, 0, 255, torch.quint8), (0.5, 0, -127, 127, torch.qint8)):
        q = q_aff(x, scale, zp, qmin, qmax)
        assert q.dtype == torch.int32
        # power-of-two scales: torch's x * (1 / scale) is exact, so the codes must agree everywhere
        want = torch.quantize_per_tensor(x, scale, zp, dtype).int_repr().to(torch.int32)
        assert torch.equal(q.clamp(qmin, qmax), want.clamp(qmin, qmax))
        fq = torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax)
        assert torch.equal(dq_aff(q, scale, zp), fq)
    w = torch.randn(6, 40, generator=gen)
    qp = choose_qparams(w, 8, False, PerChannel(0))
    scales, zps = qp.scale.double().flatten(), qp.zero_point.long().flatten()
    want = torch.quantize_per_channel(w, scales, zps, 0, torch.quint8).int_repr().long()
    got = q_aff(w, qp.scale, qp.zero_point, 0, 255).long()
    assert (got != want).float().mean() < 0.01  # torch multiplies by 1 / scale: a rare tie may differ
    fq = torch.fake_quantize_per_channel_affine(w, qp.scale.flatten(), qp.zero_point.flatten(), 0, 0, 255)
    assert torch.allclose(dq_aff(got, qp.scale, qp.zero_point), fq, atol=1e-6)


def test_error_metrics_against_qcore(solved):
    q_mse, q_sqnr = solved.ns["quant_mse"], solved.ns["quant_sqnr_db"]
    gen = torch.Generator().manual_seed(2)
    for bits in (2, 4, 8):
        x = torch.randn(3000, generator=gen)
        x_hat = fake_quantize(x, choose_qparams(x, bits, True))
        assert math.isclose(q_mse(x, x_hat), mse(x, x_hat), rel_tol=1e-12)
        assert math.isclose(q_sqnr(x, x_hat), sqnr_db(x, x_hat), rel_tol=1e-12)
    assert math.isclose(q_mse(x, x_hat), torch.nn.functional.mse_loss(x.double(), x_hat.double()).item(), rel_tol=1e-12)
    assert q_sqnr(x, x) == math.inf


def test_granularity_against_torch_per_channel_observer(solved):
    per_channel, per_group = solved.ns["per_channel_qparams"], solved.ns["per_group_qparams"]
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(12, 20, generator=gen) * torch.rand(12, 1, generator=gen)
    for axis in (0, 1):
        for sym in (False, True):
            qmin, qmax = qrange(8, sym)
            obs = torch.ao.quantization.PerChannelMinMaxObserver(
                ch_axis=axis, dtype=torch.qint8 if sym else torch.quint8,
                qscheme=torch.per_channel_symmetric if sym else torch.per_channel_affine,
                quant_min=qmin, quant_max=qmax)
            obs(w)
            t_scale, t_zp = obs.calculate_qparams()
            scale, zp = per_channel(w, 8, sym, axis=axis)
            assert scale.shape == ((12, 1) if axis == 0 else (1, 20))
            assert torch.allclose(scale.flatten().double(), t_scale.double(), rtol=1e-6)
            assert torch.equal(zp.flatten().long(), t_zp.long())
    v = torch.randn(3, 5, 64, generator=gen)
    for gs in (8, 16, 64):
        for sym in (False, True):
            scale, zp = per_group(v, gs, 4, sym)
            qp = choose_qparams(v, 4, sym, PerGroup(gs))
            assert scale.shape == (3, 5, 64 // gs)
            assert torch.equal(scale, qp.scale) and torch.equal(zp.long(), qp.zero_point.long())
    for axis in (0, 1, 2, -1):
        scale, zp = per_channel(v, 4, False, axis=axis)
        qp = choose_qparams(v, 4, False, PerChannel(axis))
        assert torch.equal(scale, qp.scale) and torch.equal(zp.long(), qp.zero_point.long())


def test_clipping_against_numpy_brute_force_and_observer(solved):
    pct, mse_t = solved.ns["percentile_threshold"], solved.ns["mse_threshold"]
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(40, 77, generator=gen) ** 3
    for p in (0, 12.5, 50, 90, 99, 99.9, 99.99, 100):
        assert math.isclose(pct(x, p), float(np.percentile(np.abs(x.numpy().astype(np.float64)), p)), rel_tol=1e-12)
    for bits in (4, 8):
        t = mse_t(x, bits, 50)
        amax = x.abs().max().item()
        errs = [mse(x, fake_quantize(x, qparams_from_range(-amax * k / 50, amax * k / 50, bits, True)))
                for k in range(1, 51)]
        assert math.isclose(t, amax * (int(np.argmin(errs)) + 1) / 50, rel_tol=1e-12)
        obs = MSEObserver(bits=bits, symmetric=True)
        obs(x)
        e_obs = mse(x, fake_quantize(x, obs.qparams()))
        assert min(errs) <= 1.05 * e_obs  # a coarser search, but no worse than qcore's refined one by much


def test_pack_against_qcore(solved):
    pack, unpack = solved.ns["pack_4bit"], solved.ns["unpack_4bit"]
    assert pack(torch.tensor([1, 2, 15])).tolist() == [0x12, 0xF0]
    assert pack(torch.tensor([[7, 8], [0, 15]])).tolist() == [120, 15]  # qcore's docstring example
    gen = torch.Generator().manual_seed(5)
    for n in (1, 2, 3, 100, 1001):
        codes = torch.randint(0, 16, (n,), generator=gen)
        assert torch.equal(pack(codes), pack_int4(codes))
        assert torch.equal(unpack(pack(codes), (n,)).long(), codes)


def test_demo_numbers_tell_the_story(solved):
    """The markdown's claims about the tables hold (here with the grader's 8 sentences)."""
    g = solved.ns["granularity_table"]
    order = ["per-tensor", "per-channel", "per-group 128", "per-group 32"]
    assert [g[k]["scales"] for k in order] == [1, 1536, 4608, 18432]
    assert g["per-group 32"]["extra_bits"] == 0.5
    for bits in ("8-bit", "4-bit"):
        assert all(g[a][bits] < g[b][bits] for a, b in zip(order, order[1:]))
    assert g["per-tensor"]["4-bit outlier"] < 1.0
    assert all(abs(g[k]["4-bit outlier"] - g[k]["4-bit"]) < 0.5 for k in order[1:])
    assert g["per-tensor"]["lin2 4-bit"] < 1.0 < 10 < g["per-channel"]["lin2 4-bit"]
    c = solved.ns["calibration_table"]
    assert abs(c["MSE", 8]["SQNR"] - c["min-max", 8]["SQNR"]) < 1.0
    assert c["entropy (KL)", 8]["SQNR"] < c["min-max", 8]["SQNR"] - 5
    for name in ("MSE", "entropy (KL)"):
        assert c[name, 4]["SQNR"] > c["min-max", 4]["SQNR"] + 3.5
        assert 0.001 < c[name, 4]["clipped"] < 0.01


# ----------------------------------------------------------------------------- references
def test_references_cover_the_edge_cases():
    with np.load(REFERENCE / LAB / "scale_zero_point.npz") as r:
        xmin, xmax, bits = r["xmin"], r["xmax"], r["bits"]
        assert {2, 4, 8} <= set(bits.tolist())
        assert ((xmin == 0) & (xmax == 0)).any() and ((xmin == xmax) & (xmin != 0)).any()
        assert (xmin > 0).any() and (xmax < 0).any()  # ranges that do not contain 0
    with np.load(REFERENCE / LAB / "quantize.npz") as r:
        x = np.concatenate([r[f"x{i}"].ravel() / r[f"scale{i}"].max() for i in range(int(r["n_cases"]))])
        assert (np.abs(x - np.floor(x) - 0.5) < 1e-9).sum() > 100  # exact ties


def test_later_exercises_are_graded_on_their_own(solved, master_nb):
    """A wrong Exercise 1 does not fail Exercise 4 (whole cell), wrong Exercises 1 to 3 do not fail the
    hidden part of Exercise 5 even when it calls them, and the student's names are restored afterwards."""
    kernel = Kernel(solved.ns)
    kernel.run(patched(SZP, {"patch_scale": "scale = torch.clamp(xmax / (qmax - qmin), min=EPS)",
                             "return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1":
                             "return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1"}))
    kernel.run(SPEC.exercise("ex2_quantize").mutant("floor instead of round"))
    kernel.run(SPEC.exercise("ex3_error").mutant("RMSE instead of MSE"))
    wrong = {k: kernel.ns[k] for k in ("scale_zero_point", "int_grid", "quantize_affine", "quant_mse")}
    kernel.run(cell_of(master_nb, "ex4_granularity_tests").source)  # the whole cell: visible and hidden
    kernel.run(cell_of(master_nb, "ex5_clipping_tests").source)  # the solution's inline quantization
    kernel.run(patched(CLIP))  # an mse_threshold that calls the (wrong) earlier functions
    kernel.run(hidden_part(cell_of(master_nb, "ex5_clipping_tests").source))
    assert all(kernel.ns[k] is v for k, v in wrong.items())
    with pytest.raises(Exception):  # ...while those earlier exercises themselves fail
        kernel.run(cell_of(master_nb, "ex1_scale_zero_point_tests").source)


# ----------------------------------------------------------------------------- the spec
# The solution templates; each mutant is a typical wrong solution, plausible (it runs on the smoke
# input) and rejected by the exercise's test cell and by the hidden part of that cell alone.
SZP = """
def int_grid(bits, symmetric):
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = int_grid(bits, symmetric)
    xmin = torch.clamp(torch.as_tensor(xmin, dtype=torch.float32), max=0.0)
    xmax = torch.clamp(torch.as_tensor(xmax, dtype=torch.float32), min=0.0)
    {patch_range}
    if symmetric:
        scale = torch.clamp(torch.maximum(-xmin, xmax) / qmax, min=EPS)
        {patch_sym}
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=EPS)
    {patch_scale}
    zero_point = torch.clamp(qmin - torch.round(xmin / scale), qmin, qmax).to(torch.int32)
    {patch_zp}
    return scale, zero_point
"""
QD = """
def quantize_affine(x, scale, zero_point, qmin, qmax):
    q = torch.round(x / scale) + zero_point
    {patch_q}
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize_affine(q, scale, zero_point):
    x_hat = (q.to(torch.float32) - zero_point) * scale
    {patch_dq}
    return x_hat.to(torch.float32)
"""
ERR = """
def quant_mse(x, x_hat):
    m = torch.mean((x.double() - x_hat.double()) ** 2).item()
    {patch_mse}
    return m


def quant_sqnr_db(x, x_hat):
    signal = torch.sum(x.double() ** 2).item()
    noise = torch.sum((x.double() - x_hat.double()) ** 2).item()
    if noise == 0:
        return math.inf
    s = 10 * math.log10(signal / noise)
    {patch_sqnr}
    return s
"""
GRAN = """
def per_channel_qparams(w, bits, symmetric, axis=0):
    axis = axis % w.ndim
    dims = [d for d in range(w.ndim) if d != axis]
    {patch_dims}
    xmin, xmax = w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)
    {patch_channel}
    return scale_zero_point(xmin, xmax, bits, symmetric)


def per_group_qparams(w, group_size, bits, symmetric):
    groups = w.reshape(*w.shape[:-1], -1, group_size)
    {patch_groups}
    xmin, xmax = groups.amin(dim=-1), groups.amax(dim=-1)
    {patch_group}
    return scale_zero_point(xmin, xmax, bits, symmetric)
"""
CLIP = """
def percentile_threshold(x, percentile):
    a = torch.sort(x.detach().abs().flatten().double()).values
    pos = (a.numel() - 1) * percentile / 100
    {patch_pos}
    lo = math.floor(pos)
    hi = min(lo + 1, a.numel() - 1)
    t = float(a[lo] + (pos - lo) * (a[hi] - a[lo]))
    {patch_t}
    return t


def mse_threshold(x, bits, num_candidates=100):
    x = x.detach().flatten().float()
    amax = x.abs().max().item()
    if amax == 0.0:
        return 0.0
    qmin, qmax = int_grid(bits, True)
    ks = range(1, num_candidates + 1)
    {patch_ks}
    best_t, best_mse = amax, math.inf
    for k in ks:
        t = amax * k / num_candidates
        {patch_cand}
        scale, zp = scale_zero_point(-t, t, bits, True)
        x_hat = dequantize_affine(quantize_affine(x, scale, zp, qmin, qmax), scale, zp)
        {patch_xhat}
        err = quant_mse(x, x_hat)
        {patch_err}
        if err < best_mse:
            best_t, best_mse = t, err
    return best_t
"""
PACK = """
def pack_4bit(codes):
    flat = codes.flatten().to(torch.int64)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    {patch_pack}
    return packed.to(torch.uint8)


def unpack_4bit(packed, shape):
    b = packed.to(torch.int64)
    codes = torch.stack([b >> 4, b & 0x0F], dim=1).flatten()
    {patch_unpack}
    return codes[: math.prod(shape)].reshape(shape).to(torch.uint8)
"""


SPEC = Lab(
    name=LAB,
    cache_zoo=("load_sentiment_model",),
    seconds=60,
    printouts=("their mean |error|: 0.90581906",),  # the tutorial's
    release_forbids=("_ref_",),
    exercises=(
        Exercise("ex1_scale_zero_point", points=2, functions=("int_grid", "scale_zero_point"), template=SZP,
                 smoke="scale_zero_point(-1.0, 2.0, 8, False); int_grid(8, True)", mutants={
            "full signed grid down to -128": {
                "return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1": "return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1"},
            "scale from max instead of max - min": {
                "patch_scale": "scale = torch.clamp(xmax / (qmax - qmin), min=EPS)"},
            "zero-point sign flipped": {
                "patch_zp": "zero_point = torch.clamp(qmin + torch.round(xmin / scale), qmin, qmax).to(torch.int32)"},
            "zero-point with floor": {
                "patch_zp": "zero_point = torch.clamp(qmin - torch.floor(xmin / scale), qmin, qmax).to(torch.int32)"},
            "range not widened to contain 0": {
                "patch_range": "xmin, xmax = (torch.as_tensor(v, dtype=torch.float32) for v in (xmin_in, xmax_in))",
                "def scale_zero_point(xmin, xmax, bits, symmetric):":
                "def scale_zero_point(xmin, xmax, bits, symmetric):\n    xmin_in, xmax_in = xmin, xmax"},
            "no EPS floor (NaN on an all-zero range)": {
                "patch_sym": "scale = torch.maximum(-xmin, xmax) / qmax",
                "patch_scale": "scale = (xmax - xmin) / (qmax - qmin)"},
            "EPS added instead of a floor": {
                "patch_sym": "scale = torch.maximum(-xmin, xmax) / qmax + EPS",
                "patch_scale": "scale = (xmax - xmin) / (qmax - qmin) + EPS"},
            "symmetric scale over 2**(bits-1)": {
                "patch_sym": "scale = torch.clamp(torch.maximum(-xmin, xmax) / (qmax + 1), min=EPS)"},
            "symmetric scale from the asymmetric formula": {
                "patch_sym": "scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=EPS)"},
            "Python floats only (no tensors)": """
def int_grid(bits, symmetric):
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def scale_zero_point(xmin, xmax, bits, symmetric):
    qmin, qmax = int_grid(bits, symmetric)
    xmin, xmax = min(float(xmin), 0.0), max(float(xmax), 0.0)
    if symmetric:
        return torch.tensor(max(max(-xmin, xmax) / qmax, EPS)), torch.tensor(0)
    scale = max((xmax - xmin) / (qmax - qmin), EPS)
    return torch.tensor(scale), torch.tensor(min(max(qmin - round(xmin / scale), qmin), qmax))
""",
            "delegates to qparams_from_range": """
from qcore.quant import qparams_from_range, qrange
def int_grid(bits, symmetric):
    return qrange(bits, symmetric)


def scale_zero_point(xmin, xmax, bits, symmetric):
    qp = qparams_from_range(xmin, xmax, bits, symmetric)
    return qp.scale, qp.zero_point
""",
        }),
        Exercise("ex2_quantize", points=2, functions=("quantize_affine", "dequantize_affine"), template=QD,
                 smoke="dequantize_affine(quantize_affine(torch.tensor([0.3, 2.0]), 0.5, 3, 0, 255), 0.5, 3)",
                 mutants={
            "floor instead of round": {"patch_q": "q = torch.floor(x / scale) + zero_point"},
            "truncation with .to(int)": {"patch_q": "q = (x / scale).to(torch.int32) + zero_point"},
            "round half up": {"patch_q": "q = torch.floor(x / scale + 0.5) + zero_point"},
            "round half away from zero": {
                "patch_q": "q = torch.sign(x / scale) * torch.floor(torch.abs(x / scale) + 0.5) + zero_point"},
            "missing clamp": {"return torch.clamp(q, qmin, qmax).to(torch.int32)": "return q.to(torch.int32)"},
            "zero-point sign flipped": {"patch_q": "q = torch.round(x / scale) - zero_point"},
            "zero-point added after the clamp": {
                "return torch.clamp(q, qmin, qmax).to(torch.int32)":
                "return (torch.clamp(torch.round(x / scale), qmin, qmax) + zero_point).to(torch.int32)"},
            "multiplies by the scale": {"patch_q": "q = torch.round(x * scale) + zero_point"},
            "codes left as floats": {
                "return torch.clamp(q, qmin, qmax).to(torch.int32)": "return torch.clamp(q, qmin, qmax)"},
            "dequantize ignores the zero-point": {"patch_dq": "x_hat = q.to(torch.float32) * scale"},
            "dequantize adds the zero-point": {"patch_dq": "x_hat = (q.to(torch.float32) + zero_point) * scale"},
            "dequantize subtracts the zero-point after scaling": {
                "patch_dq": "x_hat = q.to(torch.float32) * scale - zero_point"},
            "delegates to torch.fake_quantize_per_tensor_affine": """
def quantize_affine(x, scale, zero_point, qmin, qmax):
    y = torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), qmin, qmax)
    return (torch.round(y / float(scale)) + int(zero_point)).to(torch.int32)


def dequantize_affine(q, scale, zero_point):
    return (q.to(torch.float32) - zero_point) * scale
""",
        }),
        Exercise("ex3_error", points=1, functions=("quant_mse", "quant_sqnr_db"), template=ERR,
                 smoke="quant_mse(torch.ones(3), torch.zeros(3)); quant_sqnr_db(torch.ones(3), torch.zeros(3))",
                 mutants={
            "RMSE instead of MSE": {"patch_mse": "m = math.sqrt(m)"},
            "sum instead of mean": {"patch_mse": "m = torch.sum((x.double() - x_hat.double()) ** 2).item()"},
            "mean absolute error": {"patch_mse": "m = torch.mean((x.double() - x_hat.double()).abs()).item()"},
            "20 log10 of a power ratio": {"patch_sqnr": "s = 20 * math.log10(signal / noise)"},
            "natural log": {"patch_sqnr": "s = 10 * math.log(signal / noise)"},
            "noise over signal": {"patch_sqnr": "s = 10 * math.log10(noise / signal)"},
            "peak SNR (max**2 / MSE)": {
                "patch_sqnr": "s = 10 * math.log10(x.double().abs().max().item() ** 2 / (noise / x.numel()))"},
            "no infinity for a perfect copy": {"    if noise == 0:\n        return math.inf\n": ""},
            "delegates to qcore": """
from qcore.quant import mse, sqnr_db
def quant_mse(x, x_hat):
    return mse(x, x_hat)


def quant_sqnr_db(x, x_hat):
    return sqnr_db(x, x_hat)
""",
            "delegates to F.mse_loss": {
                "patch_mse": "m = torch.nn.functional.mse_loss(x.double(), x_hat.double()).item()"},
        }),
        Exercise("ex4_granularity", points=3, functions=("per_channel_qparams", "per_group_qparams"),
                 template=GRAN, smoke="per_channel_qparams(torch.randn(4, 8), 8, True, 0); "
                                      "per_group_qparams(torch.randn(4, 8), 4, 8, True)", mutants={
            "wrong channel axis (reduces along axis)": {"patch_dims": "dims = [axis]"},
            "keepdim forgotten ([out] not [out, 1])": {
                "patch_channel": "xmin, xmax = w.amin(dim=dims), w.amax(dim=dims)"},
            "negative axis not normalised": {"    axis = axis % w.ndim\n": ""},
            "one range for the whole tensor": {
                "patch_channel": "xmin, xmax = w.amin().expand_as(xmin), w.amax().expand_as(xmax)"},
            "abs-max range for the asymmetric grid": {
                "patch_channel": "xmax = w.abs().amax(dim=dims, keepdim=True); xmin = -xmax"},
            "interleaved groups (every n-th value)": {
                "patch_groups": "groups = w.reshape(*w.shape[:-1], group_size, -1).transpose(-1, -2)"},
            "group_size taken as the number of groups": {
                "patch_groups": "groups = w.reshape(*w.shape[:-1], group_size, -1)"},
            "group scales flattened": {"patch_group": "xmin, xmax = xmin.flatten(), xmax.flatten()"},
            "symmetric ignored": {"bits, symmetric)\n": "bits, False)\n"},
            "delegates to choose_qparams": """
from qcore.quant import PerChannel, PerGroup, choose_qparams
def per_channel_qparams(w, bits, symmetric, axis=0):
    qp = choose_qparams(w, bits, symmetric, PerChannel(axis))
    return qp.scale, qp.zero_point


def per_group_qparams(w, group_size, bits, symmetric):
    qp = choose_qparams(w, bits, symmetric, PerGroup(group_size))
    return qp.scale, qp.zero_point
""",
        }),
        Exercise("ex5_clipping", points=3, functions=("percentile_threshold", "mse_threshold"), template=CLIP,
                 smoke="percentile_threshold(torch.randn(100), 99); mse_threshold(torch.randn(100), 4, 10)",
                 mutants={
            "percentile of x, not |x|": {
                "a = torch.sort(x.detach().abs().flatten().double()).values":
                "a = torch.sort(x.detach().flatten().double()).values"},
            "not sorted": {
                "a = torch.sort(x.detach().abs().flatten().double()).values":
                "a = x.detach().abs().flatten().double()"},
            "position n * p instead of (n - 1) * p": {
                "patch_pos": "pos = min(a.numel() * percentile / 100, a.numel() - 1)"},
            "nearest rank, no interpolation": {"patch_t": "t = float(a[round(pos)])"},
            "lower neighbour only": {"patch_t": "t = float(a[lo])"},
            "ceil rank (kthvalue)": {
                "patch_t": "t = float(a[max(math.ceil(percentile / 100 * a.numel()) - 1, 0)])"},
            "candidates k = 0 .. n-1": {"patch_ks": "ks = range(0, num_candidates)"},
            "candidates from linspace(0, max)": {"patch_cand": "t = amax * (k - 1) / (num_candidates - 1)"},
            "largest MSE (argmax)": {"patch_err": "err = -err"},
            "no clamp in the search": {"patch_xhat": "x_hat = torch.round(x / scale) * scale"},
            "asymmetric grid in the search": {"bits, True)": "bits, False)"},
            "inline grid with qmax = 2**bits - 1": {
                "patch_xhat": "x_hat = torch.clamp(torch.round(x / (t / (2**bits - 1))), -(2**bits - 1), "
                              "2**bits - 1) * (t / (2**bits - 1))"},
            "mean absolute error as the criterion": {"patch_err": "err = (x - x_hat).abs().mean().item()"},
            "returns k, not T": {"best_t, best_mse = t, err": "best_t, best_mse = k, err"},
            "delegates to torch.quantile and MSEObserver": """
from qcore.clipping import MSEObserver
def percentile_threshold(x, percentile):
    return torch.quantile(x.detach().abs().flatten().double(), percentile / 100).item()


def mse_threshold(x, bits, num_candidates=100):
    obs = MSEObserver(num_candidates, bits=bits, symmetric=True)
    obs(x)
    return obs.clip_range()[1].item()
""",
            "delegates to numpy.percentile": {
                "patch_t": "t = float(np.percentile(x.detach().abs().double().numpy(), percentile))"},
        }),
        Exercise("ex6_pack", points=2, functions=("pack_4bit", "unpack_4bit"), template=PACK,
                 smoke="unpack_4bit(pack_4bit(torch.tensor([1, 2, 3, 4])), (4,))", mutants={
            "low nibble first (pack and unpack)": {
                "patch_pack": "packed = pairs[:, 0] | (pairs[:, 1] << 4)",
                "patch_unpack": "codes = torch.stack([b & 0x0F, b >> 4], dim=1).flatten()"},
            "unpack low nibble first": {"patch_unpack": "codes = torch.stack([b & 0x0F, b >> 4], dim=1).flatten()"},
            "odd count not padded": {"if flat.numel() % 2:": "if False:"},
            "padding in front": {"torch.cat([flat, flat.new_zeros(1)])": "torch.cat([flat.new_zeros(1), flat])"},
            "signed int8 bytes": {"return packed.to(torch.uint8)": "return packed.to(torch.int8)"},
            "shift by 8": {"patch_pack": "packed = (pairs[:, 0] << 8) | pairs[:, 1]"},
            "unpack keeps the padding": {"codes[: math.prod(shape)].reshape(shape)": "codes"},
            "unpack ignores the shape": {"codes[: math.prod(shape)].reshape(shape)": "codes[: math.prod(shape)]"},
            "delegates to qcore": """
from qcore.packing import pack_int4, unpack_int4
def pack_4bit(codes):
    return pack_int4(codes)


def unpack_4bit(packed, shape):
    return unpack_int4(packed, shape)
""",
        }),
    ),
)
