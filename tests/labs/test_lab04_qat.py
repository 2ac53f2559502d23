"""Lab 4 (quantization-aware training): the master's solution against oracles (qcore.qat, torch's
fake-quantize and learnable fake-quantize functions, torch.ao's observer), and the lab's spec: its
exercises and the typical wrong solutions its test cells must reject (test_lab_structure.py runs
the structure tests and the mutants on it).

The notebook runs as under the grader (``NBGRADER_EXECUTION``: a short experiment); the model is
loaded once for the lab (tests/labs/conftest.py).

Across CPUs (docs/numerics-across-cpus.md): STE values and masks, LSQ weight gradients, codes and
batch counts are exact (elementwise); weight scales, ranges, outputs, gradients of products and the
LSQ scale gradient (a sum) within tolerances. The converted model must equal the fake-quantized one
exactly: both run in the grading process, on the same CPU, with the same dequantized weights.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

import qcore.zoo
from harness import Kernel, REFERENCE, cell_of, load_spec, run_tests
from qcore import qat
from qcore.clipping import choose_qparams_mse
from qcore.quant import PerChannel, choose_qparams

LAB = "lab04_qat"


# ----------------------------------------------------------------------------- the solution against oracles
def test_ste_against_torch(solved):
    fake_quant = solved.ns["fake_quant"]
    g = torch.Generator().manual_seed(0)
    for bits, zp in ((8, 0), (8, 100), (4, 3), (2, 1)):
        qmax = 2**bits - 1
        x = (torch.randn(9, 31, generator=g) * qmax * 0.04).requires_grad_()
        go = torch.randn(9, 31, generator=g)
        y = fake_quant(x, 0.04, float(zp), 0, qmax)
        y.backward(go)
        xt = x.detach().clone().requires_grad_()
        torch.fake_quantize_per_tensor_affine(xt, 0.04, zp, 0, qmax).backward(go)
        assert torch.allclose(y, torch.fake_quantize_per_tensor_affine(x.detach(), 0.04, zp, 0, qmax), atol=1e-6)
        assert torch.equal(x.grad, xt.grad)
    x = torch.randn(5, 12, generator=g).requires_grad_()
    s = torch.rand(12, generator=g) * 0.3 + 0.01
    y = fake_quant(x, s.reshape(1, 12), 0.0, -7, 7)
    y.sum().backward()
    xt = x.detach().clone().requires_grad_()
    yt = torch.fake_quantize_per_channel_affine(xt, s, torch.zeros(12, dtype=torch.int32), 1, -7, 7)
    yt.sum().backward()
    assert torch.allclose(y, yt, atol=1e-6) and torch.equal(x.grad, xt.grad)


def test_fake_quant_linear_against_qcore(solved):
    FakeQuantLinear = solved.ns["FakeQuantLinear"]
    g = torch.Generator().manual_seed(1)
    for wb, ab, c in ((4, 8, 0.01), (2, 8, 0.3), (8, 4, 1.0)):
        lin = nn.Linear(24, 10)
        lin2 = copy.deepcopy(lin)
        ours, ref = FakeQuantLinear(lin, wb, ab, c), qat.FakeQuantLinear(lin2, wb, ab, c)
        for step in range(6):
            if step == 4:
                ours.observer_enabled = False
                ref.freeze_observer()
            x = torch.randn(3, 5, 24, generator=g) * (1 + step)
            y, y_ref = ours(x), ref(x)
            assert torch.allclose(y, y_ref, rtol=1e-6, atol=1e-6)
            y.pow(2).sum().backward()
            y_ref.pow(2).sum().backward()
        assert torch.allclose(ours.act_min, ref.input_observer.min_val) and torch.allclose(ours.act_max, ref.input_observer.max_val)
        assert torch.allclose(lin.weight.grad, lin2.weight.grad, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.weight_scale(), ref.weight_scale())


def test_prepare_and_convert_against_qcore(solved, monkeypatch):
    prepare_qat, convert = solved.ns["prepare_qat"], solved.ns["convert"]
    model = qcore.zoo.tiny_sentiment_model()
    ids = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(2))
    ours, ref = prepare_qat(model, 3, 8), qat.prepare_qat(model, 3, 8)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert names and all(type(ours.get_submodule(n)).__name__ == "FakeQuantLinear" for n in names)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    freeze_all = [setattr(m, "observer_enabled", False) for m in ours.modules() if hasattr(m, "observer_enabled")]
    assert freeze_all
    with torch.no_grad():
        assert torch.equal(convert(ours)(input_ids=ids).logits, ours(input_ids=ids).logits)
    qat.freeze_observers(ref)
    for layer in qat.fake_quant_layers(ref):
        layer.enable_lsq()
    monkeypatch.setitem(solved.ns, "FakeQuantLinear", qat.FakeQuantLinear)  # the solution's convert, on qcore's layers
    mine, theirs = convert(ref), qat.convert(ref)
    for n in names:
        assert torch.equal(mine.get_submodule(n).codes(), theirs.get_submodule(n).codes())
    with torch.no_grad():
        assert torch.equal(mine(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_lsq_against_qcore_and_torch(solved):
    lsq_quantize = solved.ns["lsq_quantize"]
    g = torch.Generator().manual_seed(3)
    for bits, shape in ((2, (7, 64)), (3, (5, 20)), (4, (3, 9)), (8, (4, 16))):
        w = torch.randn(*shape, generator=g)
        for s0 in (choose_qparams(w, bits, True, PerChannel(0)).scale * 0.6, choose_qparams_mse(w, bits).scale,
                   w.abs().max() / 3):
            go = torch.randn(*shape, generator=g)
            w1, s1 = w.clone().requires_grad_(), s0.clone().requires_grad_()
            w2, s2 = w.clone().requires_grad_(), s0.clone().requires_grad_()
            y1, y2 = lsq_quantize(w1, s1, bits), qat.lsq_fake_quantize(w2, s2, bits)
            y1.backward(go)
            y2.backward(go)
            assert torch.equal(y1, y2) and torch.equal(w1.grad, w2.grad)
            assert torch.allclose(s1.grad, s2.grad, rtol=1e-6, atol=1e-7)


def test_demo_numbers(solved):
    ns = solved.ns
    results = ns["results"]
    assert list(results["PTQ (max|w|)"]) == [8, 4, 3, 2]
    assert all(0.3 <= v <= 1.0 for r in results.values() for v in r.values())
    assert ns["int_accuracy"] == results["QAT + LSQ (MSE init)"][2] and ns["same"]
    assert ns["codes_used"] == [-1, 0, 1]
    trained = sorted(ns["QAT_RUNS"])
    for method in ns["METHODS"][2:]:  # the controls and the QAT runs, at every trained width
        assert sorted(results[method]) == trained
    for (a, b, bits), (diff, se, p) in ns["comparisons"].items():  # the paired statistics, recomputed
        ca, cb = ns["correct"][a, bits], ns["correct"][b, bits]
        assert abs(diff - 100 * (ca.double().mean() - cb.double().mean()).item()) < 1e-9 and se >= 0 and 0 <= p <= 1
    layers_absmax = ns["fake_quant_layers"](ns["prepared"]("QAT + LSQ (max|w| init)", 2))
    assert all(torch.allclose(layer.scale, layer.weight.abs().amax(1, keepdim=True) / 1, rtol=4 * 2**-24, atol=0)
               for layer in layers_absmax[:3])  # max|w| / qmax, qmax = 1 at 2 bits (float rounding of the search)
    assert not any(p.requires_grad for n, p in ns["qat_models"]["QAT, fixed MSE scales", 2].named_parameters()
                   if n.endswith(".scale"))


# ----------------------------------------------------------------------------- references
def test_references_cover_the_edge_cases():
    with np.load(REFERENCE / LAB / "ste.npz") as r:
        n = int(r["n_cases"])
        masks = [r[f"grad_x{i}"] == 0 for i in range(n)]
        assert all(0 < m.mean() < 0.6 for m in masks)  # both sides of the clamp in every case
        assert {int(r[f"qmin{i}"]) for i in range(n)} >= {0, -1, -7} and any(r[f"scale{i}"].ndim == 2 for i in range(n))
    with np.load(REFERENCE / LAB / "fake_linear.npz") as r:
        n = int(r["n_cases"])
        assert any(r[f"weight{i}"].shape[0] == r[f"weight{i}"].shape[1] for i in range(n))  # square: axis mistakes
        assert any(float(r[f"act_zero_point{i}_0"]) == 0 for i in range(n))  # all-positive inputs
        assert all(int(r[f"freeze_at{i}"]) < int(r[f"n_batches{i}"]) for i in range(n))
    with np.load(REFERENCE / LAB / "prepare_convert.npz") as r:
        assert np.abs(r["codes.2.0.0"]).max() == 3 and "lsq.2.0.0" in r.files
    with np.load(REFERENCE / LAB / "lsq.npz") as r:
        n = int(r["n_cases"])
        assert {int(r[f"bits{i}"]) for i in range(n)} >= {2, 3, 4, 8}
        assert all((r[f"grad_w{i}"] == 0).any() for i in range(n))  # clipped weights everywhere
        assert any(r[f"scale{i}"].ndim == 0 for i in range(n))


def test_exercise_2_is_graded_on_its_own(solved, master_nb):
    """A wrong fake_quant (Exercise 1) does not fail Exercise 2 (visible checks and judged answers),
    and the student's name is restored."""
    kernel = Kernel(solved.ns)
    kernel.run(SPEC.exercise("ex1_ste").mutant("gradient zero everywhere"))
    kernel.run("def fake_quant(x, scale, zero_point, qmin, qmax):\n    return x * 0\n")
    wrong = kernel.ns["fake_quant"]
    assert run_tests(kernel, LAB, "ex2_fake_quant_linear_tests",
                     cell_of(master_nb, "ex2_fake_quant_linear_tests").source) == []
    assert kernel.ns["fake_quant"] is wrong


def test_exercise_3_is_graded_on_its_own(solved, master_nb):
    """A wrong FakeQuantLinear (Exercise 2) does not fail Exercise 3, and the student's class is restored."""
    kernel = Kernel(solved.ns)
    kernel.run(SPEC.exercise("ex2_fake_quant_linear").mutant("observer never updated after the first batch"))
    wrong = kernel.ns["FakeQuantLinear"]
    kernel.run(cell_of(master_nb, "ex3_prepare_convert").source)  # its convert looks FakeQuantLinear up here
    assert run_tests(kernel, LAB, "ex3_prepare_convert_tests",
                     cell_of(master_nb, "ex3_prepare_convert_tests").source) == []
    assert kernel.ns["FakeQuantLinear"] is wrong


# ----------------------------------------------------------------------------- the spec
SPEC = load_spec(LAB)  # specs/lab04_qat.yaml: the exercises, their templates and mutants
