"""The hidden tests of lab03_ptq_distilbert, judged outside the student's kernel.

Each test draws its inputs from a generator (the lab's ``SEED`` for the committed reference
files, a per-submission seed when grading: ``qcourse.judge``); every expected value comes from
qcore's reference implementation (``qcore.layers``, ``qcore.int8``, ``qcore.smoothquant``,
``qcore.ptq``), never from a student function. No model download is needed: the models here
are small and drawn from the generator too. A rerun writes the same arrays.

    python course/refgen/lab03_ptq_distilbert.py course/reference/lab03_ptq_distilbert
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from qcourse.judge import HiddenTest, Verdict, write_hidden_references
from qcourse.refdata import generator_main, init_linears_, randn, to_numpy as _np
from qcore.ptq import layer_sensitivity, most_sensitive
from qcore.int8 import asymmetric_int8_linear, int8_linear, quantize_per_token
from qcore.layers import QuantLinear, quantize_weight
from qcore.quant import PerGroup, QParams, dequantize, qparams_from_range
from qcore.smoothquant import fold_smoothing, input_absmax, smoothing_factors

LAB = "lab03_ptq_distilbert"
SEED = 20240503


# Results whose last bits may depend on the CPU (qcourse.refdata): matrix products (float32
# roundings ~ the reduction length) and what passes through GELU, LayerNorm and tanh. Codes,
# scales, inputs and the exact integer sums (acc) are compared bit for bit.
CPU_DEPENDENT = {
    "weight_only": {"y*": 512, "visible_y*": 16},  # x @ w_hat.T, up to 384 terms
    "dynamic": {"y*": 1024, "visible_y*": 32},  # int32 sums (exact) times scales, by a float kernel
    # inputs seen behind GELU/LayerNorm, the model's output; products of up to 128 terms
    "static": {"absmax.*": 64, "model_y": 64, "y*": 256, "visible_absmax.*": 16, "visible_model_y": 16,
               "visible_y*": 8},
    "smoothquant": {"s*": 8, "fold*_y*": 64, "visible_s*": 8, "visible_fold_*": 64},  # pow; LayerNorm + products
    "sensitivity": {"damage": 256, "visible_damage": 256},  # a mean over up to 128 outputs of a 3-layer model
    "asymmetric": {"y*": 8, "visible_y*": 8},  # exact int32 sums times two scales (+ bias): elementwise
}

# The visible checks' own cases (keys ``visible...``) draw what those checks draw at random from
# this generator, after every other input: the judge fails them exactly where the checks fail.
VISIBLE_SEED = 0


def _far_from_ties(w: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """Nudge weights whose ``w / scale`` lies within 1e-3 of a half-integer (a float64 student could
    round them the other way); exact, deliberate ties are planted separately."""
    out, n_in = w.shape
    r = (w.reshape(out, -1, group) / scale.reshape(out, -1, 1)).reshape(out, n_in)
    near = ((r - torch.floor(r)) - 0.5).abs() < 1e-3
    return torch.where(near, w * 0.999, w)


def _has_bias(inputs: dict, i: int) -> torch.Tensor | None:
    return torch.from_numpy(inputs[f"bias{i}"]) if bool(inputs[f"has_bias{i}"]) else None


def _t(inputs: dict, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(inputs[key]))


def _with_state(model: nn.Module, state: dict | None) -> nn.Module:
    """``model`` in eval mode, with ``state`` (arrays by parameter name) loaded when given."""
    if state is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model.eval()


def _state(inputs: dict, prefix: str) -> dict:
    """The arrays of ``inputs`` whose keys start with ``prefix``, by the rest of their key."""
    return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- exercise 1
WEIGHT_ONLY_CASES = [(16, 256, 8, 0, True), (8, 256, 4, 128, True), (6, 64, 4, 32, False), (5, 96, 3, 32, True),
                     (7, 128, 8, 64, True), (3, 40, 8, 0, False), (4, 384, 4, 128, True), (2, 8, 2, 4, True)]


def weight_only_inputs(gen: torch.Generator) -> dict:
    """Weights to quantize (an all-zero row, an outlier, exact ties; rows 1e-3 .. 1 in size), and, for
    the layer, codes and scales of their own with inputs [3, in] and biases."""
    out = {"n_cases": len(WEIGHT_ONLY_CASES)}
    for i, (n_out, n_in, bits, group, has_bias) in enumerate(WEIGHT_ONLY_CASES):
        w = randn(n_out, n_in, generator=gen) * 10.0 ** torch.randint(-3, 1, (n_out, 1), generator=gen)
        w[0] = 0.0  # an all-zero row: a finite, positive scale
        w[1, 3] = 40 * w[1].abs().max() + 1.0  # an outlier
        for _ in range(3):  # nudging can move a group's maximum: settle it
            scale = quantize_weight(w, bits, group or None)[1].scale
            w = _far_from_ties(w, scale, group or n_in)
        if n_in >= 8 and n_out >= 3 and bits >= 4:  # exact ties in float32 and float64: scale 1.0
            qmax = 2 ** (bits - 1) - 1
            w[2, :4] = torch.tensor([qmax, 2.5, -2.5, 0.5])
            w[2, 4:(group or n_in)] = w[2, 4:(group or n_in)].clamp(-1.0, 1.0)
        qmax = 2 ** (bits - 1) - 1
        n_groups = n_in // (group or n_in)
        codes = torch.randint(-qmax, qmax + 1, (n_out, n_in), generator=gen).to(torch.int8)
        scale = (torch.rand(n_out, n_groups, generator=gen) * 0.1 + 1e-3) * 10.0 ** torch.randint(
            -2, 1, (n_out, 1), generator=gen)
        out.update({f"w{i}": _np(w), f"bits{i}": bits, f"group{i}": group, f"x{i}": _np(randn(3, n_in, generator=gen)),
                    f"bias{i}": _np(randn(n_out, generator=gen)) if has_bias else np.zeros(0, np.float32),
                    f"has_bias{i}": has_bias, f"lin_codes{i}": _np(codes), f"lin_scale{i}": _np(scale)})
    out["visible_w"] = np.array([[2.5, -127.0, 0.5, 0.0], [10.0, 2.0, -4.0, 6.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    out["visible_x"] = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]], np.float32)
    out["visible_bias"] = np.array([0.5, -1.0, 2.0], np.float32)
    return out


def weight_only_expected(inputs: dict) -> dict:
    out = {}
    for i in range(int(inputs["n_cases"])):
        codes, qp = quantize_weight(_t(inputs, f"w{i}"), int(inputs[f"bits{i}"]), int(inputs[f"group{i}"]) or None)
        out[f"codes{i}"], out[f"scale{i}"] = _np(codes), _np(qp.scale)
        lin_codes, lin_scale = _t(inputs, f"lin_codes{i}"), _t(inputs, f"lin_scale{i}")
        gran = PerGroup(lin_codes.shape[1] // lin_scale.shape[1])
        w_hat = dequantize(lin_codes, QParams(lin_scale, torch.zeros(lin_scale.shape, dtype=torch.int32),
                                              int(inputs[f"bits{i}"]), True, gran))
        out[f"y{i}"] = _np(torch.nn.functional.linear(_t(inputs, f"x{i}"), w_hat, _has_bias(inputs, i)))
    x, bias = _t(inputs, "visible_x"), _t(inputs, "visible_bias")
    for name, bits, group in (("", 8, None), ("4", 4, 2)):  # the visible checks' weight, and layer
        codes, qp = quantize_weight(_t(inputs, "visible_w"), bits, group)
        out[f"visible_codes{name}"], out[f"visible_scale{name}"] = _np(codes), _np(qp.scale)
        out[f"visible_y{name}"] = _np(F.linear(x, dequantize(codes, qp), bias))
        if not name:
            out["visible_y_nobias"] = _np(F.linear(x, dequantize(codes, qp)))
            out["visible_y3d"] = _np(F.linear(torch.ones(2, 5, 4), dequantize(codes, qp), bias))
    return out


def weight_only_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        what = f"case {i} ({int(inputs[f'bits{i}'])} bits, group {int(inputs[f'group{i}']) or None})"
        codes = v.got(f"codes{i}")
        if codes is not None:
            v.true(f"codes{i}", codes.dtype == np.int8, f"{what}: codes must be int8 [out, in]")
        v.equal(f"codes{i}", expected[f"codes{i}"], f"{what}: codes")
        v.close(f"scale{i}", expected[f"scale{i}"], f"{what}: scales", rtol=2e-6)
        want = expected[f"y{i}"]
        atol = 1e-5 * (1 + float(np.abs(want).max()))
        v.close(f"y{i}", want, f"{what}: layer outputs", rtol=1e-5, atol=atol)
        v.close(f"y3d{i}", want.reshape(3, 1, -1), f"{what}: layer outputs for x [3, 1, in]", rtol=1e-5, atol=atol)
    v.equal("w_after", inputs["w0"], "quantize_weight must not change its input")
    for name in ("", "4"):
        v.equal(f"visible_codes{name}", expected[f"visible_codes{name}"], "the visible checks' weight: codes")
        v.close(f"visible_scale{name}", expected[f"visible_scale{name}"], "the visible checks' weight: scales", rtol=2e-6)
    for key in ("visible_y", "visible_y4", "visible_y_nobias", "visible_y3d"):
        v.close(key, expected[key], "the visible checks' layer", rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- exercise 2
DYNAMIC_CASES = [(5, 1024, 3, True, "extreme"), (4, 300, 4, True, "random"), (7, 64, 9, False, "random"),
                 (3, 1000, 3, True, "extreme"), (1, 17, 2, True, "random"), (6, 512, 6, True, "per-tensor")]


def dynamic_inputs(gen: torch.Generator) -> dict:
    """Tokens of very different sizes (a zero token, exact ties) to quantize per token; codes whose
    int32 sums are far beyond int8 and int16 (and below 2**24: exact in float32) for int8_linear;
    a token to quantize alone and next to one a hundred times larger."""
    tok = randn(40, 48, generator=gen) * 10.0 ** torch.randint(-4, 3, (40, 1), generator=gen)
    tok[5] = 0.0
    tok[6, :3] = torch.tensor([127.0, 2.5, -3.5])  # scale 1.0: exact ties
    tok[6, 3:] = tok[6, 3:].clamp(-1.0, 1.0)
    for _ in range(3):
        _, s = quantize_per_token(tok)
        r = tok / s
        tok = torch.where(((r - torch.floor(r)) - 0.5).abs() < 1e-3, tok * 0.999, tok)
    tok[6, :3] = torch.tensor([127.0, 2.5, -3.5])
    out = {"tok_x": _np(tok), "n_cases": len(DYNAMIC_CASES)}
    for i, (t, k, n, has_bias, kind) in enumerate(DYNAMIC_CASES):
        if kind == "extreme":  # every product is +-127**2: the sum reaches k * 16129
            signs = torch.where(torch.rand(t, 1, generator=gen) < 0.5, -1, 1).to(torch.int8)
            qx = torch.full((t, k), 127, dtype=torch.int8) * signs
            qw = torch.full((n, k), 127, dtype=torch.int8)
            qw[1::2] = -127
            qx[0, : k // 3] = 100
        else:
            qx = torch.randint(-127, 128, (t, k), generator=gen).to(torch.int8)
            qw = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
        sx = (torch.rand(t, 1, generator=gen) * 0.05 + 1e-3) if kind != "per-tensor" else torch.tensor(0.02)
        sw = torch.rand(n, 1, generator=gen) * 0.01 + 1e-4
        out.update({f"qx{i}": _np(qx), f"sx{i}": _np(sx), f"qw{i}": _np(qw), f"sw{i}": _np(sw),
                    f"bias{i}": _np(randn(n, generator=gen)) if has_bias else np.zeros(0, np.float32),
                    f"has_bias{i}": has_bias})
    out["alone"] = _np(randn(1, 16, generator=gen))
    out["visible_x"] = np.array([[127.0, -2.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 3.5]], np.float32)
    # The visible checks' layers: 1,024 products of 127 * 127; two tokens, bias; and a random one
    # with qcore's codes (theirs are the student's, checked above).
    out.update(visible_small_qx=np.array([[2, 3], [-1, 4]], np.int8), visible_small_sx=np.array([[0.1], [1.0]], np.float32),
               visible_small_qw=np.array([[1, 2], [3, -4]], np.int8), visible_small_sw=np.array([[0.5], [0.25]], np.float32),
               visible_small_bias=np.array([1.0, -1.0], np.float32))
    g = torch.Generator().manual_seed(VISIBLE_SEED)
    xr, wr, br = randn(6, 32, generator=g), randn(5, 32, generator=g), randn(5, generator=g)
    qx, sx = quantize_per_token(xr)
    qw, qp = quantize_weight(wr, 8)
    out.update(visible_random_qx=_np(qx), visible_random_sx=_np(sx), visible_random_qw=_np(qw),
               visible_random_sw=_np(qp.scale), visible_random_bias=_np(br))
    return out


def dynamic_expected(inputs: dict) -> dict:
    codes, scale = quantize_per_token(_t(inputs, "tok_x"))
    out = {"tok_codes": _np(codes), "tok_scale": _np(scale), "alone_codes": _np(quantize_per_token(_t(inputs, "alone"))[0])}
    out["visible_codes"], out["visible_scale"] = (_np(a) for a in quantize_per_token(_t(inputs, "visible_x")))
    out["visible_y_big"] = np.array([[1024 * 16129.0, -1024 * 16129.0]], np.float32)  # exact in float32 (< 2**24)
    for case in ("small", "random"):
        args = [_t(inputs, f"visible_{case}_{k}") for k in ("qx", "sx", "qw", "sw", "bias")]
        out[f"visible_y_{case}"] = _np(int8_linear(*args))
    for i in range(int(inputs["n_cases"])):
        args = [_t(inputs, f"{k}{i}") for k in ("qx", "sx", "qw", "sw")]
        out[f"y{i}"] = _np(int8_linear(*args, _has_bias(inputs, i)))
    return out


def dynamic_judge(v: Verdict, inputs, expected, answers) -> None:
    codes = v.got("tok_codes")
    if codes is not None:
        v.true("tok_codes", codes.dtype == np.int8, "per-token codes: int8 [T, in]")
    v.close("tok_scale", expected["tok_scale"], "per-token scales [T, 1]", rtol=2e-6)
    v.equal("tok_codes", expected["tok_codes"], "per-token codes")
    for i in range(int(inputs["n_cases"])):
        want = expected[f"y{i}"]
        v.close(f"y{i}", want, f"case {i}: int8_linear against the exact integer computation", rtol=1e-6,
                atol=1e-6 * float(np.abs(want).max()))
    for key in ("alone_codes", "beside_codes"):
        v.equal(key, expected["alone_codes"], "a token's codes must not depend on another token")
    v.equal("visible_codes", expected["visible_codes"], "the visible checks' tokens: codes")
    v.close("visible_scale", expected["visible_scale"], "the visible checks' tokens: scales", rtol=2e-6)
    big = v.got("visible_y_big")
    v.true("visible_y_big", big is None or big.dtype == np.float32, "the visible checks' layer: float32 outputs")
    v.equal("visible_y_big", expected["visible_y_big"], "the visible checks' 1,024 products of 127 * 127 (int32 sums)")
    for case in ("small", "random"):
        want = expected[f"visible_y_{case}"]
        v.close(f"visible_y_{case}", want, "the visible checks' layer", rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- exercise 3
def static_model(state: dict | None = None) -> nn.Sequential:
    """The calibration test model; layers "0", "2", "4" are the Linear ones."""
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    return _with_state(model, state)


STATIC_CASES = [(6, 32, 5, 0.05, True), (1, 16, 3, 0.01, True), (9, 64, 7, 0.2, False), (4, 128, 4, 0.003, True)]


def static_inputs(gen: torch.Generator) -> dict:
    """A small model and calibration batches (the maxima spread over all batches, a negative extreme
    in the second); then static W8A8 linear cases with inputs beyond the calibrated range."""
    model = init_linears_(static_model(), gen)
    with torch.no_grad():
        model[3].weight.mul_(torch.rand(5, generator=gen) + 0.5)
        model[3].bias.add_(randn(5, generator=gen))
    shapes = [(2, 4, 6), (1, 7, 6), (3, 2, 6), (2, 5, 6)]
    batches = [randn(*s, generator=gen) * (1 + 3 * torch.rand(6, generator=gen)) for s in shapes]
    batches[1][0, 2, 1] = -25.0  # a negative extreme, in the second batch
    out = {f"state.{k}": _np(v) for k, v in model.state_dict().items()}
    out.update({f"batch{i}": _np(b) for i, b in enumerate(batches)})
    out["n_batches"] = len(batches)
    out["n_cases"] = len(STATIC_CASES)
    for i, (t, k, n, sx, has_bias) in enumerate(STATIC_CASES):
        x = randn(t, k, generator=gen) * sx * 130  # about a third of the values beyond 127 * sx
        x[0, :3] = torch.tensor([127.0, 400.0, -1000.0]) * sx
        qw = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
        sw = torch.rand(n, 1, generator=gen) * 0.01 + 1e-4
        bias = randn(n, generator=gen) if has_bias else None
        r = x / sx
        x = torch.where(((r - torch.floor(r)) - 0.5).abs() < 1e-3, x * 0.999, x)
        out.update({f"x{i}": _np(x), f"sx{i}": np.float32(sx), f"qw{i}": _np(qw), f"sw{i}": _np(sw),
                    f"bias{i}": _np(bias) if has_bias else np.zeros(0, np.float32), f"has_bias{i}": has_bias})
    # the visible checks' layer: inside the calibrated range, then beyond it
    out.update(visible_x=np.array([[0.1, -0.2], [2.0, -3.0]], np.float32), visible_sx=np.float32(0.01),
               visible_qw=np.array([[1, -2], [3, 4]], np.int8), visible_sw=np.array([[0.5], [0.25]], np.float32))
    out.update(visible_x_in=np.array([[0.1, -0.2]], np.float32), visible_bias=np.array([1.0, 0.0], np.float32))
    # The visible checks' calibration: their net (the second layer drawn) and two batches of other shapes.
    net = init_linears_(visible_static_model(), torch.Generator().manual_seed(VISIBLE_SEED))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, -1, 0], [0, 0, 2], [0.5, 0.5, 0.5]]))
        net[0].bias.zero_()
    out.update({f"visible_state.{k}": _np(v) for k, v in net.state_dict().items()})
    out.update(visible_batch0=np.array([[[1.0, -2.0, 0.5], [0.0, 1.0, -3.0]]], np.float32),
               visible_batch1=np.array([[[-4.0, 0.5, 1.0]], [[3.0, 0.0, 0.0]]], np.float32))
    return out


def visible_static_model(state: dict | None = None) -> nn.Sequential:
    """The visible checks' calibration net; layers "0" and "2" are the Linear ones."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return _with_state(model, state)


def static_expected(inputs: dict) -> dict:
    model = static_model(_state(inputs, "state."))
    batches = [_t(inputs, f"batch{j}") for j in range(int(inputs["n_batches"]))]
    absmax = input_absmax(model, ["0", "2", "4"], lambda m: [m(b) for b in batches])
    with torch.no_grad():
        out = {"model_y": _np(model(batches[0]))}
    out.update({f"absmax.{n}": _np(a) for n, a in absmax.items()})
    out["kw_absmax"] = _np(torch.maximum(batches[0].abs().amax((0, 1)), batches[1].abs().amax((0, 1))))
    for i in range(int(inputs["n_cases"])):
        x, sx = _t(inputs, f"x{i}"), torch.tensor(float(inputs[f"sx{i}"]))
        qx = torch.round(x / sx).clamp(-127, 127).to(torch.int8)
        out[f"y{i}"] = _np(int8_linear(qx, sx, _t(inputs, f"qw{i}"), _t(inputs, f"sw{i}"), _has_bias(inputs, i)))
    sx = torch.tensor(float(inputs["visible_sx"]))
    qx = torch.round(_t(inputs, "visible_x") / sx).clamp(-127, 127).to(torch.int8)
    out["visible_y"] = _np(int8_linear(qx, sx, _t(inputs, "visible_qw"), _t(inputs, "visible_sw")))
    qx = torch.round(_t(inputs, "visible_x_in") / sx).clamp(-127, 127).to(torch.int8)
    out["visible_y_in"] = _np(int8_linear(qx, sx, _t(inputs, "visible_qw"), _t(inputs, "visible_sw"),
                                          _t(inputs, "visible_bias")))
    net = visible_static_model(_state(inputs, "visible_state."))
    batches = [_t(inputs, "visible_batch0"), _t(inputs, "visible_batch1")]
    out.update({f"visible_absmax.{n}": _np(a)
                for n, a in input_absmax(net, ["0", "2"], lambda m: [m(b) for b in batches]).items()})
    with torch.no_grad():
        out["visible_model_y"] = _np(net(batches[0]))
    return out


def static_judge(v: Verdict, inputs, expected, answers) -> None:
    for n in ("0", "2", "4"):
        v.close(f"absmax.{n}", expected[f"absmax.{n}"], f"layer {n}: per-channel input maxima", rtol=1e-6, atol=1e-7)
        hooks = v.got(f"hooks_left.{n}")
        v.true(f"hooks_left.{n}", hooks is not None and not hooks.any(), f"layer {n}: a hook was left behind")
    v.close("seen_by_4", expected["model_y"], "the hooks must not change what flows through the model", rtol=0.0,
            atol=1e-6)
    v.close("model_y_after", expected["model_y"], "the model changed", rtol=0.0, atol=1e-6)
    v.close("kw_absmax", expected["kw_absmax"], "dict batches: model(**batch)", rtol=1e-6, atol=1e-7)
    left = v.got("hooks_left_after_raise")
    v.true("hooks_left_after_raise", left is not None and not left.any(),
           "hooks must be removed even when the model raises (try/finally)")
    for i in range(int(inputs["n_cases"])):
        want = expected[f"y{i}"]
        v.close(f"y{i}", want, f"static case {i}: outputs (fixed scale, saturation, bias?)", rtol=1e-6,
                atol=1e-6 * float(np.abs(want).max()))
    v.close("visible_y", expected["visible_y"], "the visible checks' layer", rtol=1e-6, atol=1e-7)
    v.close("visible_y_in", expected["visible_y_in"], "the visible checks' layer, with bias", rtol=1e-6, atol=1e-7)
    for n in ("0", "2"):
        v.close(f"visible_absmax.{n}", expected[f"visible_absmax.{n}"], f"the visible checks' layer {n}: input maxima",
                rtol=1e-6, atol=1e-7)
        hooks = v.got(f"visible_hooks_left.{n}")
        v.true(f"visible_hooks_left.{n}", hooks is not None and not hooks.any(), "the visible checks: a hook left behind")
    v.close("visible_model_y_after", expected["visible_model_y"], "the visible checks' net changed", rtol=0.0, atol=1e-6)


# ----------------------------------------------------------------------------- exercise 4
FACTOR_CASES = [(8, [5], 0.5), (6, [6, 6, 6], 0.5), (10, [3, 7], 0.75), (4, [4], 0.25), (12, [12, 12, 12], 0.85)]
FOLD_CASES = [(6, [6, 6, 6]), (5, [3]), (8, [8, 4])]


def smoothquant_inputs(gen: torch.Generator) -> dict:
    """Smoothing factors (one or several weights, a zero channel, a dead input column, three alphas)
    and folds into a pre-LN branch (LayerNorm weight and bias, linears with biases)."""
    out = {"n_factor_cases": len(FACTOR_CASES)}
    for i, (n_in, outs, alpha) in enumerate(FACTOR_CASES):
        act = torch.rand(n_in, generator=gen) * 10.0 ** torch.randint(-1, 2, (n_in,), generator=gen)
        act[0] = 30.0
        act[-1] = 0.0  # a channel never seen non-zero
        weights = [randn(o, n_in, generator=gen) * 0.1 for o in outs]
        weights[0][:, 1] = 0.0  # a dead input column
        if len(weights) > 1:
            weights[-1][0, 2] = 5.0  # this column's maximum sits in another weight than the first
        out.update({f"act{i}": _np(act), f"alpha{i}": alpha, f"n_weights{i}": len(weights)})
        out.update({f"w{i}_{j}": _np(w) for j, w in enumerate(weights)})
    out.update(visible_act=np.array([16.0, 1.0, 0.0], np.float32), visible_w=np.array([[1.0, 4.0, 0.5]], np.float32),
               visible_w2=np.array([[-0.25, 1.0, 2.0], [0.5, -9.0, 0.0]], np.float32))
    out["n_fold_cases"] = len(FOLD_CASES)
    for i, (d, outs) in enumerate(FOLD_CASES):
        out[f"fold{i}_ln_weight"] = _np(torch.rand(d, generator=gen) + 0.5)
        out[f"fold{i}_ln_bias"] = _np(randn(d, generator=gen))
        for j, o in enumerate(outs):
            out[f"fold{i}_w{j}"], out[f"fold{i}_b{j}"] = _np(randn(o, d, generator=gen) * 0.2), _np(randn(o, generator=gen))
        out.update({f"fold{i}_x": _np(randn(4, d, generator=gen) * 3), f"fold{i}_s": _np(torch.rand(d, generator=gen) * 4 + 0.1),
                    f"fold{i}_n": len(outs)})
    # The visible checks' fold: LayerNorm(4) with an outlier channel into linears 4 -> 4 and 4 -> 6.
    g = torch.Generator().manual_seed(VISIBLE_SEED)
    ln_weight = randn(4, generator=g)
    ln_weight[2] = 12.0
    out.update(visible_fold_ln_weight=_np(ln_weight), visible_fold_ln_bias=_np(randn(4, generator=g)))
    for name, n_out in (("q", 4), ("k", 6)):
        out[f"visible_fold_{name}_weight"] = _np(randn(n_out, 4, generator=g))
        out[f"visible_fold_{name}_bias"] = _np(randn(n_out, generator=g))
    out["visible_fold_x"] = _np(randn(8, 4, generator=g))
    return out


def visible_fold(inputs: dict) -> tuple[nn.LayerNorm, list[nn.Linear]]:
    """The visible checks' LayerNorm and its two linears, before folding."""
    ln = nn.LayerNorm(4)
    ln.load_state_dict({"weight": _t(inputs, "visible_fold_ln_weight"), "bias": _t(inputs, "visible_fold_ln_bias")})
    linears = []
    for name in ("q", "k"):
        w = _t(inputs, f"visible_fold_{name}_weight")
        linears.append(nn.Linear(w.shape[1], w.shape[0]))
        linears[-1].load_state_dict({"weight": w, "bias": _t(inputs, f"visible_fold_{name}_bias")})
    return ln, linears


def fold_case(inputs: dict, i: int) -> tuple[nn.LayerNorm, list[nn.Linear]]:
    """Fold case ``i``'s LayerNorm and linears, as the inputs hold them (before folding)."""
    ln = nn.LayerNorm(int(inputs[f"fold{i}_x"].shape[1]))
    ln.load_state_dict({"weight": _t(inputs, f"fold{i}_ln_weight"), "bias": _t(inputs, f"fold{i}_ln_bias")})
    linears = []
    for j in range(int(inputs[f"fold{i}_n"])):
        w = _t(inputs, f"fold{i}_w{j}")
        lin = nn.Linear(w.shape[1], w.shape[0])
        lin.load_state_dict({"weight": w, "bias": _t(inputs, f"fold{i}_b{j}")})
        linears.append(lin)
    return ln, linears


def smoothquant_expected(inputs: dict) -> dict:
    out = {}
    for i in range(int(inputs["n_factor_cases"])):
        weights = [_t(inputs, f"w{i}_{j}") for j in range(int(inputs[f"n_weights{i}"]))]
        out[f"s{i}"] = _np(smoothing_factors(_t(inputs, f"act{i}"), weights, float(inputs[f"alpha{i}"])))
    act, w, w2 = _t(inputs, "visible_act"), _t(inputs, "visible_w"), _t(inputs, "visible_w2")
    out.update(visible_s=_np(smoothing_factors(act, [w])), visible_s2=_np(smoothing_factors(act, [w, w2])),
               visible_s75=_np(smoothing_factors(act, [w], alpha=0.75)))
    ln, (q_lin, k_lin) = visible_fold(inputs)
    x = _t(inputs, "visible_fold_x")
    with torch.no_grad():
        out["visible_fold_yq"], out["visible_fold_yk"] = _np(q_lin(ln(x))), _np(k_lin(ln(x)))
        fold_smoothing(ln, [q_lin, k_lin], smoothing_factors(ln(x).abs().amax(0), [q_lin.weight, k_lin.weight]))
        out["visible_fold_act_max"] = _np(ln(x).abs().amax(0))
    for i in range(int(inputs["n_fold_cases"])):
        ln, linears = fold_case(inputs, i)
        x = _t(inputs, f"fold{i}_x")
        with torch.no_grad():
            y = [lin(ln(x)) for lin in linears]
            fold_smoothing(ln, linears, _t(inputs, f"fold{i}_s"))
        out[f"fold{i}_ln_weight_after"], out[f"fold{i}_ln_bias_after"] = _np(ln.weight), _np(ln.bias)
        for j, lin in enumerate(linears):
            out[f"fold{i}_w{j}_after"], out[f"fold{i}_y{j}"] = _np(lin.weight), _np(y[j])
    return out


def smoothquant_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_factor_cases"])):
        v.close(f"s{i}", expected[f"s{i}"], f"factors case {i} (alpha {float(inputs[f'alpha{i}'])})", rtol=1e-5)
    for key in ("visible_s", "visible_s2", "visible_s75"):
        v.close(key, expected[key], "the visible checks' factors", rtol=1e-5)
    for key in ("visible_fold_yq", "visible_fold_yk", "visible_fold_act_max"):
        v.close(key, expected[key], "the visible checks' fold", rtol=1e-5, atol=1e-5)
    for i in range(int(inputs["n_fold_cases"])):
        v.close(f"fold{i}_ln_weight_after", expected[f"fold{i}_ln_weight_after"],
                f"fold case {i}: the LayerNorm weight is divided by s", rtol=1e-6, atol=1e-8)
        v.close(f"fold{i}_ln_bias_after", expected[f"fold{i}_ln_bias_after"],
                f"fold case {i}: the LayerNorm bias must be divided too", rtol=1e-6, atol=1e-8)
        for j in range(int(inputs[f"fold{i}_n"])):
            v.close(f"fold{i}_w{j}_after", expected[f"fold{i}_w{j}_after"],
                    f"fold case {i}: linear {j}'s weight columns are multiplied by s", rtol=1e-6, atol=1e-8)
            v.equal(f"fold{i}_b{j}_after", inputs[f"fold{i}_b{j}"], f"fold case {i}: linear biases stay")
            v.close(f"fold{i}_y{j}", expected[f"fold{i}_y{j}"], f"fold case {i}: the function changed",
                    rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- exercise 5
SENSITIVITY_NAMES = ["0.0", "1", "3"]
RANK_K = [0, 1, 5, 12, 20]


def sensitivity_model(state: dict | None = None) -> nn.Sequential:
    """Layers "0.0", "1" and "3" are Linear; "0.0" sits one level down (a nested name)."""
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    return _with_state(model, state)


def sensitivity_inputs(gen: torch.Generator) -> dict:
    """A small model with outliers (one weight in every group of 4 is 8 times too large), its
    inputs, the layers to measure, and damages to rank (12 values, several k)."""
    model = init_linears_(sensitivity_model(), gen)
    with torch.no_grad():
        model[1].weight[:, ::4].mul_(8.0)
        model[3].weight[:, 1::8].mul_(4.0)
    out = {f"state.{k}": _np(v) for k, v in model.state_dict().items()}
    out.update(x=_np(randn(32, 8, generator=gen)), names=np.array(SENSITIVITY_NAMES),
               rank_values=_np(torch.rand(12, generator=gen).double()), rank_k=np.array(RANK_K),
               visible_values=np.array([0.1, 0.5, 0.3]))  # the visible check's {"a": 0.1, "b": 0.5, "c": 0.3}, k = 2
    g = torch.Generator().manual_seed(VISIBLE_SEED)  # the visible checks' net, every parameter N(0, 1)
    net = visible_sensitivity_model()
    out.update({f"visible_state.{k}": _np(randn(*v.shape, generator=g)) for k, v in net.state_dict().items()})
    out["visible_x"] = _np(randn(16, 4, generator=g))
    return out


VISIBLE_SENSITIVITY_NAMES = ["0", "2", "4"]


def visible_sensitivity_model(state: dict | None = None) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return _with_state(model, state)


def quantized_4bit(lin: nn.Linear) -> QuantLinear:
    """The quantized stand-in of one layer while its damage is measured: 4 bits, groups of 4."""
    return QuantLinear.from_linear(lin, 4, 4)


def top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """qcore's ``most_sensitive`` of ``{"n00": values[0], "n01": ...}``, as the indices of the names."""
    ranked = most_sensitive({f"n{i:02d}": v for i, v in enumerate(values.tolist())}, k)
    return np.array([int(n[1:]) for n in ranked], dtype=np.int64)


def sensitivity_expected(inputs: dict) -> dict:
    model = sensitivity_model(_state(inputs, "state."))
    x = _t(inputs, "x")
    with torch.no_grad():
        ref = model(x)
    names = [str(n) for n in inputs["names"]]
    damage = layer_sensitivity(model, names, quantized_4bit, lambda m: ((m(x) - ref) ** 2).mean().item())
    out = {"damage": np.array([damage[n] for n in names])}
    for k in inputs["rank_k"].tolist():
        out[f"rank_top{k}"] = top_indices(inputs["rank_values"], k)
    out["visible_top2"] = top_indices(inputs["visible_values"], 2)
    model = visible_sensitivity_model(_state(inputs, "visible_state."))
    x = _t(inputs, "visible_x")
    with torch.no_grad():
        ref = model(x)
    damage = layer_sensitivity(model, VISIBLE_SENSITIVITY_NAMES, lambda lin: QuantLinear.from_linear(lin, bits=4),
                               lambda m: ((m(x) - ref) ** 2).mean().item())
    out["visible_damage"] = np.array([damage[n] for n in VISIBLE_SENSITIVITY_NAMES])
    out["visible_top3"] = top_indices(out["visible_damage"], 3)
    return out


def sensitivity_judge(v: Verdict, inputs, expected, answers) -> None:
    n = len(inputs["names"])
    v.equal("has_name", np.ones(n, bool), "one entry per layer name")
    v.equal("quantized_counts", np.ones(n, np.int64), "exactly one layer quantized while it is measured")
    v.close("damage", expected["damage"], "per-layer damage", rtol=1e-5)
    v.equal("originals_back", np.ones(n, bool), "the original layers are back afterwards")
    for key in (k for k in inputs if k.startswith("state.")):
        v.equal(f"after.{key}", inputs[key], "the model changed")
    v.equal("originals_back_after_raise", np.ones(n, bool),
            "put the layer back even when damage() raises (try/finally)")
    for k in inputs["rank_k"].tolist():
        v.equal(f"rank_top{k}", expected[f"rank_top{k}"], f"most_sensitive(k={k}): the k largest, largest first")
    v.equal("visible_top2", expected["visible_top2"], "the visible check's ranking")
    n = len(VISIBLE_SENSITIVITY_NAMES)
    v.equal("visible_has_name", np.ones(n, bool), "the visible checks: one entry per layer")
    v.equal("visible_quantized_counts", np.ones(n, np.int64), "the visible checks: one layer quantized at a time")
    v.equal("visible_is_float", np.ones(n, bool), "the visible checks: damages are Python floats")
    v.close("visible_damage", expected["visible_damage"], "the visible checks' damages", rtol=1e-5)
    v.equal("visible_same_layers", np.ones(n, bool), "the visible checks: the model is left as it was")
    v.equal("visible_top3", expected["visible_top3"], "the visible checks' ranking of the damages")


# ----------------------------------------------------------------------------- exercise 3b
# (lo, hi) ranges: the seeds' [-20, 1000] and [0, 1000], a post-GELU input, ranges that do not
# contain 0 (widened), an empty one; random ones are drawn after these.
FIXED_RANGES = [(-20.0, 1000.0), (0.0, 1000.0), (-0.6, 1.0), (-0.17, 20.3), (2.0, 5.0), (-3.0, -1.0), (0.0, 0.0),
                (-1e-3, 7.5)]
VISIBLE_RANGES = [(-20.0, 1000.0), (0.0, 1000.0), (-0.6, 1.0), (2.0, 5.0), (-3.0, -1.0), (0.0, 0.0)]  # the checks'
ASYMMETRIC_CASES = [(6, 32, 5, True), (1, 16, 3, True), (9, 300, 7, False), (4, 1100, 4, True)]


def _off_ties(values: torch.Tensor) -> torch.Tensor:
    """Whether each value lies at least 1e-3 from a half-integer (float32 and float64 round it alike)."""
    return ((values - torch.floor(values)) - 0.5).abs() >= 1e-3


def asymmetric_inputs(gen: torch.Generator) -> dict:
    """Ranges for asymmetric_input_qparams (their -lo / scale away from ties); layers whose inputs
    are mostly one-sided (GELU of a Gaussian), with values beyond the grid at both ends."""
    ranges = list(FIXED_RANGES)
    while len(ranges) < len(FIXED_RANGES) + 12:
        lo = -float(torch.rand((), generator=gen)) * 10.0 ** float(torch.randint(-3, 3, (), generator=gen))
        hi = float(torch.rand((), generator=gen)) * 10.0 ** float(torch.randint(-2, 4, (), generator=gen))
        qp = qparams_from_range(lo, hi, 8, symmetric=False)
        if bool(_off_ties(torch.tensor(-lo) / qp.scale)):
            ranges.append((lo, hi))
    out = {"ranges": np.array(ranges, np.float32), "n_cases": len(ASYMMETRIC_CASES),
           "visible_ranges": np.array(VISIBLE_RANGES, np.float32)}
    for i, (t, k, n, has_bias) in enumerate(ASYMMETRIC_CASES):
        # GELU's shape (about -0.17 to 10) from exact operations only: F.gelu's vectorized erf gives
        # other last bits on other CPUs, and these are inputs, which must be identical everywhere
        z = randn(t, k, generator=gen) * 3
        x = torch.where(z > 0, z, (0.05 * z).clamp(min=-0.17))
        qp = qparams_from_range(float(x.min()) * 0.8, float(x.max()) * 0.6, 8, symmetric=False)  # some saturate
        sx, zx = float(qp.scale), int(qp.zero_point)
        x[0, :2] = torch.tensor([-5.0, 50.0])  # far beyond both ends of the grid
        x = torch.where(_off_ties(x / sx), x, x * 0.999)
        qw = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
        sw = torch.rand(n, 1, generator=gen) * 0.01 + 1e-4
        out.update({f"x{i}": _np(x), f"sx{i}": np.float32(sx), f"zx{i}": np.int64(zx), f"qw{i}": _np(qw),
                    f"sw{i}": _np(sw), f"has_bias{i}": has_bias,
                    f"bias{i}": _np(randn(n, generator=gen)) if has_bias else np.zeros(0, np.float32)})
    out.update(visible_qw=np.array([[1, 2], [3, -4]], np.int8), visible_sw=np.array([[0.5], [0.25]], np.float32),
               visible_x_in=np.array([[1.0, -5.0]], np.float32), visible_bias=np.array([1.0, 0.0], np.float32),
               visible_x_out=np.array([[200.0, -6.0]], np.float32))
    return out


def _asymmetric_layer(x: torch.Tensor, sx, zx: int, qw, sw, bias=None) -> torch.Tensor:
    """qcore's asymmetric static W8A8 layer on ``x [T, in]`` (as ``Int8Linear(input_zero_point=...)``)."""
    sx = torch.tensor(float(sx))
    qx = (torch.round(x / sx) + zx).clamp(0, 255).to(torch.uint8)
    return asymmetric_int8_linear(qx, sx, zx, qw, sw, bias)


def asymmetric_expected(inputs: dict) -> dict:
    out = {}
    for prefix in ("", "visible_"):
        qps = [qparams_from_range(float(lo), float(hi), 8, symmetric=False) for lo, hi in inputs[f"{prefix}ranges"]]
        out[f"{prefix}scales"] = np.array([float(qp.scale) for qp in qps], np.float64)
        out[f"{prefix}zero_points"] = np.array([int(qp.zero_point) for qp in qps], np.int64)
    for i in range(int(inputs["n_cases"])):
        out[f"y{i}"] = _np(_asymmetric_layer(_t(inputs, f"x{i}"), inputs[f"sx{i}"], int(inputs[f"zx{i}"]),
                                             _t(inputs, f"qw{i}"), _t(inputs, f"sw{i}"), _has_bias(inputs, i)))
    qw, sw = _t(inputs, "visible_qw"), _t(inputs, "visible_sw")
    out["visible_y_in"] = _np(_asymmetric_layer(_t(inputs, "visible_x_in"), 0.5, 10, qw, sw, _t(inputs, "visible_bias")))
    out["visible_y_out"] = _np(_asymmetric_layer(_t(inputs, "visible_x_out"), 0.5, 10, qw, sw))
    return out


def asymmetric_judge(v: Verdict, inputs, expected, answers) -> None:
    n = len(inputs["ranges"])
    v.close("scales", expected["scales"], "scales of the uint8 grid over [min(lo, 0), max(hi, 0)]", rtol=1e-6)
    v.equal("zero_points", expected["zero_points"], "zero-points: round(-lo / scale), clamped to [0, 255]")
    v.equal("zero_point_is_int", np.ones(n, bool), "the zero-point is a Python int")
    for i in range(int(inputs["n_cases"])):
        want = expected[f"y{i}"]
        v.close(f"y{i}", want, f"case {i}: uint8 codes (saturating at 0 and 255), the zero-point's correction, "
                "rescaled (bias?)", rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))
    v.close("visible_scales", expected["visible_scales"], "the visible checks' ranges: scales", rtol=1e-6)
    v.equal("visible_zero_points", expected["visible_zero_points"], "the visible checks' ranges: zero-points")
    v.equal("visible_zero_point_is_int", np.ones(len(inputs["visible_ranges"]), bool),
            "the visible checks: the zero-point is a Python int")
    v.close("visible_y_in", expected["visible_y_in"], "the visible checks' layer, with bias", rtol=1e-6, atol=1e-7)
    v.close("visible_y_out", expected["visible_y_out"], "the visible checks' layer, saturating", rtol=1e-6, atol=1e-7)


HIDDEN_TESTS = [
    HiddenTest("ex1_weight_only_tests", "weight_only", weight_only_inputs, weight_only_expected, weight_only_judge),
    HiddenTest("ex2_dynamic_w8a8_tests", "dynamic", dynamic_inputs, dynamic_expected, dynamic_judge),
    HiddenTest("ex3_static_w8a8_tests", "static", static_inputs, static_expected, static_judge),
    HiddenTest("ex4_smoothquant_tests", "smoothquant", smoothquant_inputs, smoothquant_expected, smoothquant_judge),
    HiddenTest("ex5_sensitivity_tests", "sensitivity", sensitivity_inputs, sensitivity_expected, sensitivity_judge),
    # drawn last, so that adding it left the other tests' committed inputs as they were
    HiddenTest("ex3b_asymmetric_static_tests", "asymmetric", asymmetric_inputs, asymmetric_expected, asymmetric_judge),
]


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir``: each test's inputs for the lab's
    seed and the expected values on them."""
    write_hidden_references(out_dir, HIDDEN_TESTS, SEED)


if __name__ == "__main__":
    generator_main(make, LAB)
