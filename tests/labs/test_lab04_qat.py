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
from harness import REFERENCE, Exercise, Kernel, Lab, cell_of
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
    """A wrong fake_quant (Exercise 1) does not fail Exercise 2, and the student's name is restored."""
    kernel = Kernel(solved.ns)
    kernel.run(SPEC.exercise("ex1_ste").mutant("gradient zero everywhere"))
    kernel.run("def fake_quant(x, scale, zero_point, qmin, qmax):\n    return x * 0\n")
    wrong = kernel.ns["fake_quant"]
    kernel.run(cell_of(master_nb, "ex2_fake_quant_linear_tests").source)
    assert kernel.ns["fake_quant"] is wrong


# ----------------------------------------------------------------------------- the spec
# The solution templates; each mutant is a typical wrong solution, plausible (it runs on the smoke
# input) and rejected by the exercise's test cell and by the hidden part of that cell alone.
STE = """
class FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x / scale) + zero_point
        {patch_q}
        inside = (q >= qmin) & (q <= qmax)
        {patch_mask}
        ctx.save_for_backward(inside)
        y = (q.clamp(qmin, qmax) - zero_point) * scale
        {patch_y}
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (inside,) = ctx.saved_tensors
        g = grad_output * inside
        {patch_g}
        return g, None, None, None, None
"""
FQL = """
class FakeQuantLinear(nn.Module):
    def __init__(self, linear, weight_bits=8, act_bits=8, averaging_constant=0.01):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.weight_bits, self.act_bits, self.averaging_constant = weight_bits, act_bits, averaging_constant
        self.observer_enabled = True
        self.scale = None
        self.register_buffer("act_min", torch.zeros(()))
        self.register_buffer("act_max", torch.zeros(()))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def observe(self, x):
        lo, hi = x.detach().float().min(), x.detach().float().max()
        if self.num_batches == 0:
            self.act_min.copy_(lo)
            self.act_max.copy_(hi)
        else:
            c = self.averaging_constant
            self.act_min.add_(c * (lo - self.act_min))
            self.act_max.add_(c * (hi - self.act_max))
            {patch_ema}
        self.num_batches += 1

    def act_qparams(self):
        qmax = 2**self.act_bits - 1
        lo, hi = self.act_min.clamp(max=0.0), self.act_max.clamp(min=0.0)
        {patch_range}
        scale = ((hi - lo) / qmax).clamp(min=EPS)
        zp = (-torch.round(lo / scale)).clamp(0, qmax)
        {patch_zp}
        return scale, zp

    def weight_scale(self):
        qmax = 2 ** (self.weight_bits - 1) - 1
        s = (self.weight.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=EPS)
        {patch_ws}
        return s

    def forward(self, x):
        if self.observer_enabled:
            self.observe(x)
        scale, zero_point = self.act_qparams()
        x_hat = fake_quant(x, scale, zero_point, 0, 2**self.act_bits - 1)
        qmax = 2 ** (self.weight_bits - 1) - 1
        w_hat = fake_quant(self.weight, self.weight_scale(), 0.0, -qmax, qmax)
        y = F.linear(x_hat, w_hat, self.bias)
        {patch_y}
        return y
"""
PREP = """
def prepare_qat(model, weight_bits=8, act_bits=8):
    model = copy.deepcopy(model)  # prepare
    names = [name for name, m in model.named_modules() if type(m) is nn.Linear]
    {patch_names}
    for name in names:
        model.set_submodule(name, FakeQuantLinear(model.get_submodule(name), weight_bits, act_bits))
    return model


def convert(model):
    model = copy.deepcopy(model)  # convert
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
        qmax = 2 ** (layer.weight_bits - 1) - 1
        scale = layer.weight_scale().detach()
        {patch_scale}
        codes = torch.round(layer.weight.detach() / scale).clamp(-qmax, qmax).to(torch.int8)
        {patch_codes}
        input_scale, input_zero_point = layer.act_qparams()
        bias = layer.bias
        {patch_bias}
        model.set_submodule(name, QuantLinear(codes, scale, bias, bits=layer.weight_bits, input_scale=input_scale,
                                              input_zero_point=input_zero_point, input_bits=layer.act_bits))
    return model
"""
LSQ = """
class LSQQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, scale, qmin, qmax, grad_scale):
        v = w / scale
        r = torch.round(v)
        ctx.save_for_backward(v, r)
        ctx.qmin, ctx.qmax, ctx.grad_scale, ctx.scale_shape = qmin, qmax, grad_scale, scale.shape
        return r.clamp(qmin, qmax) * scale

    @staticmethod
    def backward(ctx, grad_output):
        v, r = ctx.saved_tensors
        inside = (r >= ctx.qmin) & (r <= ctx.qmax)
        d_scale = grad_output * torch.where(inside, r - v, r.clamp(ctx.qmin, ctx.qmax))
        {patch_ds}
        d_scale = d_scale.sum_to_size(ctx.scale_shape) * ctx.grad_scale
        {patch_gs}
        d_w = grad_output * inside
        {patch_dw}
        return d_w, d_scale, None, None, None


def lsq_quantize(w, scale, bits):
    qmax = 2 ** (bits - 1) - 1
    n = w.numel() // scale.numel()
    g = 1.0 / math.sqrt(n * qmax)
    {patch_g}
    return LSQQuantize.apply(w, scale, -qmax, qmax, g)
"""


SPEC = Lab(
    name=LAB,
    cache_zoo=("load_sentiment_model",),
    seconds=150,  # under the grader, on a shared 2-core CPU (about 20 s when it is quiet)
    printouts=("logits of the first batch identical: True", "torchao prepare: 38 FakeQuantizedLinear layers"),
    student_printouts=("complete Exercise 1 to see",),
    release_forbids=("sum_to_size(ctx.scale_shape) * ctx.grad_scale", "self.act_min.add_(c *",
                     "set_submodule(name, Fake"),
    given_lines=("model = copy.deepcopy(model)",),
    given_defs=("fake_quant",),
    exercises=(
        Exercise("ex1_ste", points=3, functions=("forward", "backward"), template=STE,
                 smoke="fake_quant(torch.randn(3, 4), 0.1, 0.0, -7, 7)", mutants={
            "gradient zero everywhere": {"patch_g": "g = torch.zeros_like(grad_output)"},
            "gradient one everywhere (no mask)": {"patch_g": "g = grad_output"},
            "mask from x / scale before rounding": {
                "patch_mask": "inside = (x / scale + zero_point >= qmin) & (x / scale + zero_point <= qmax)"},
            "strict inequalities in the mask": {"patch_mask": "inside = (q > qmin) & (q < qmax)"},
            "no clamp in the forward": {"patch_y": "y = (q - zero_point) * scale"},
            "zero-point ignored": {"patch_q": "q = torch.round(x / scale)"},
            "truncation instead of rounding": {"patch_q": "q = torch.trunc(x / scale) + zero_point"},
            "round half away from zero": {
                "patch_q": "q = torch.sign(x / scale) * torch.floor((x / scale).abs() + 0.5) + zero_point"},
            "delegates to torch": """
class FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        if scale.ndim == 0:
            return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), qmin, qmax)
        return torch.fake_quantize_per_channel_affine(x, scale.flatten(), zero_point.flatten().int(), 0, qmin, qmax)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None, None, None, None
""",
        }),
        Exercise("ex2_fake_quant_linear", points=3, functions=("observe", "act_qparams", "weight_scale", "forward"),
                 template=FQL, smoke="FakeQuantLinear(nn.Linear(3, 3), 4, 8)(torch.randn(2, 3))", mutants={
            "observer never updated": {"            self.observe(x)\n": "            pass\n"},
            "observer never updated after the first batch": {
                "self.act_min.add_(c * (lo - self.act_min))": "pass",
                "self.act_max.add_(c * (hi - self.act_max))": "pass"},
            "EMA weights swapped": {
                "c * (lo - self.act_min)": "(1 - c) * (lo - self.act_min)",
                "c * (hi - self.act_max)": "(1 - c) * (hi - self.act_max)"},
            "running min / max instead of an EMA": {
                "self.act_min.add_(c * (lo - self.act_min))": "self.act_min.copy_(torch.minimum(self.act_min, lo))",
                "self.act_max.add_(c * (hi - self.act_max))": "self.act_max.copy_(torch.maximum(self.act_max, hi))"},
            "observes while frozen": {
                "        if self.observer_enabled:\n            self.observe(x)\n": "        self.observe(x)\n"},
            "fake-quant applied after the bias (quantizes the output)": {
                "        x_hat = fake_quant(x, scale, zero_point, 0, 2**self.act_bits - 1)\n": "",
                "        y = F.linear(x_hat, w_hat, self.bias)\n":
                "        y = fake_quant(F.linear(x, w_hat, self.bias), scale, zero_point, 0, 2**self.act_bits - 1)\n"},
            "bias folded into the quantized input path": {
                "patch_y": "y = fake_quant(y, scale, zero_point, 0, 2**self.act_bits - 1)"},
            "weight scale over the wrong axis (per input column)": {
                "patch_ws": "s = (self.weight.detach().abs().amax(dim=0, keepdim=True).T / qmax).clamp(min=EPS)"},
            "one weight scale per tensor": {
                "patch_ws": "s = (self.weight.detach().abs().max() / qmax).clamp(min=EPS)"
                            ".expand(self.weight.shape[0], 1)"},
            "range not widened to 0": {"patch_range": "lo, hi = self.act_min, self.act_max"},
            "zero-point not rounded": {"patch_zp": "zp = (-lo / scale).clamp(0, qmax)"},
            "no gradient to the weight (detached)": {"fake_quant(self.weight,": "fake_quant(self.weight.detach(),"},
            "delegates to qcore": """
class FakeQuantLinear(qcore.qat.FakeQuantLinear):
    pass
""",
        }),
        Exercise("ex3_prepare_convert", points=2, functions=("prepare_qat", "convert"), template=PREP,
                 smoke="_m = prepare_qat(nn.Sequential(nn.Linear(3, 2)), 4, 8); _m(torch.randn(2, 3)); convert(_m)",
                 mutants={
            "prepares in place": {"model = copy.deepcopy(model)  # prepare": "pass"},
            "converts in place": {"model = copy.deepcopy(model)  # convert": "pass"},
            "top-level layers only": {
                "patch_names": "names = [name for name, m in model.named_children() if type(m) is nn.Linear]"},
            "convert ignores a learned scale (max|w| again)": {
                "patch_scale": "scale = (layer.weight.detach().abs().amax(1, keepdim=True) / qmax).clamp(min=EPS)"},
            "codes not clamped": {"patch_codes": "codes = torch.round(layer.weight.detach() / scale).to(torch.int8)"},
            "codes truncated": {"patch_codes": "codes = (layer.weight.detach() / scale).to(torch.int8)"},
            "bias dropped": {"patch_bias": "bias = None"},
            "delegates to qcore": """
from qcore.qat import prepare_qat, convert
""",
        }),
        Exercise("ex4_lsq", points=3, functions=("forward", "backward", "lsq_quantize"), template=LSQ,
                 smoke="_w = torch.randn(2, 4, requires_grad=True); _s = torch.full((2, 1), 0.5, requires_grad=True); "
                       "lsq_quantize(_w, _s, 3).sum().backward()", mutants={
            "LSQ scale without gradient scaling": {"patch_g": "g = 1.0"},
            "gradient scale from all weights, not per scale": {"patch_g": "g = 1.0 / math.sqrt(w.numel() * qmax)"},
            "gradient scale inverted": {"patch_g": "g = math.sqrt(n * qmax)"},
            "residual with the wrong sign": {
                "patch_ds": "d_scale = grad_output * torch.where(inside, v - r, r.clamp(ctx.qmin, ctx.qmax))"},
            "clipped weights give the scale no gradient": {
                "patch_ds": "d_scale = grad_output * torch.where(inside, r - v, torch.zeros_like(v))"},
            "round(v) alone (no -v term)": {"patch_ds": "d_scale = grad_output * r.clamp(ctx.qmin, ctx.qmax)"},
            "scale gradient averaged, not summed": {"patch_gs": "d_scale = d_scale * d_scale.numel() / v.numel()"},
            "weight gradient one everywhere": {"patch_dw": "d_w = grad_output"},
            "delegates to qcore": """
def lsq_quantize(w, scale, bits):
    return qcore.qat.lsq_fake_quantize(w, scale, bits)
""",
        }),
    ),
)
