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

from harness import Kernel, REFERENCE, cell_of, hidden_part, load_spec, patched
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
    kernel.run(patched(SPEC.exercise("ex1_scale_zero_point").template, {
        "patch_scale": "scale = torch.clamp(xmax / (qmax - qmin), min=EPS)",
        "return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1": "return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1"}))
    kernel.run(SPEC.exercise("ex2_quantize").mutant("floor instead of round"))
    kernel.run(SPEC.exercise("ex3_error").mutant("RMSE instead of MSE"))
    wrong = {k: kernel.ns[k] for k in ("scale_zero_point", "int_grid", "quantize_affine", "quant_mse")}
    kernel.run(cell_of(master_nb, "ex4_granularity_tests").source)  # the whole cell: visible and hidden
    kernel.run(cell_of(master_nb, "ex5_clipping_tests").source)  # the solution's inline quantization
    kernel.run(patched(SPEC.exercise("ex5_clipping").template))  # an mse_threshold that calls the (wrong) earlier functions
    kernel.run(hidden_part(cell_of(master_nb, "ex5_clipping_tests").source))
    assert all(kernel.ns[k] is v for k, v in wrong.items())
    with pytest.raises(Exception):  # ...while those earlier exercises themselves fail
        kernel.run(cell_of(master_nb, "ex1_scale_zero_point_tests").source)


# ----------------------------------------------------------------------------- the spec
SPEC = load_spec(LAB)  # specs/lab02_calibration.yaml: the exercises, their templates and mutants
