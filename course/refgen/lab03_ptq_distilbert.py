"""Reference inputs and outputs for the hidden tests of lab03_ptq_distilbert.

Every expected value comes from qcore's reference implementation (``qcore.ptq``,
``qcore.smoothquant``), never from a student function; no model download is needed (the
models here are small and built from fixed seeds). A rerun writes the same arrays.

    python course/refgen/lab03_ptq_distilbert.py course/reference/lab03_ptq_distilbert
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcourse.refdata import generator_main, init_linears_, randn, to_numpy as _np, write_references
from qcore.ptq import layer_sensitivity, most_sensitive
from qcore.int8 import int8_linear, quantize_per_token
from qcore.layers import QuantLinear, quantize_weight
from qcore.quant import dequantize
from qcore.smoothquant import fold_smoothing, input_absmax, smoothing_factors

LAB = "lab03_ptq_distilbert"
SEED = 20240503


# Results whose last bits may depend on the CPU (qcourse.refdata): matrix products (float32
# roundings ~ the reduction length) and what passes through GELU, LayerNorm and tanh. Codes,
# scales, inputs and the exact integer sums (acc) are compared bit for bit.
CPU_DEPENDENT = {
    "weight_only": {"y*": 512},  # x @ w_hat.T, up to 384 terms
    "dynamic": {"y*": 1024},  # int32 sums (exact) times scales, computed by a float kernel, up to 1,024 terms
    "static": {"absmax.*": 64, "y*": 256},  # inputs seen behind GELU/LayerNorm; products of up to 128 terms
    "smoothquant": {"s*": 8, "fold*_y*": 64},  # pow for the factors; LayerNorm + product of 8 terms
    "sensitivity": {"damage": 256},  # a mean over 128 outputs of a 3-layer model
}


def _far_from_ties(w: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """Nudge weights whose ``w / scale`` lies within 1e-3 of a half-integer (a float64 student could
    round them the other way); exact, deliberate ties are planted separately."""
    out, n_in = w.shape
    r = (w.reshape(out, -1, group) / scale.reshape(out, -1, 1)).reshape(out, n_in)
    near = ((r - torch.floor(r)) - 0.5).abs() < 1e-3
    return torch.where(near, w * 0.999, w)


# ----------------------------------------------------------------------------- exercise 1
def weight_only_refs(gen: torch.Generator) -> dict:
    """Weights (an all-zero row, an outlier, exact ties), codes, scales and layer outputs."""
    cases = [(16, 256, 8, 0, True), (8, 256, 4, 128, True), (6, 64, 4, 32, False), (5, 96, 3, 32, True),
             (7, 128, 8, 64, True), (3, 40, 8, 0, False), (4, 384, 4, 128, True), (2, 8, 2, 4, True)]
    out = {"n_cases": len(cases)}
    for i, (n_out, n_in, bits, group, has_bias) in enumerate(cases):
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
        codes, qp = quantize_weight(w, bits, group or None)
        scale = qp.scale
        x = randn(3, n_in, generator=gen)
        bias = randn(n_out, generator=gen) if has_bias else None
        y = torch.nn.functional.linear(x, dequantize(codes, qp), bias)
        out.update({f"w{i}": _np(w), f"bits{i}": bits, f"group{i}": group, f"x{i}": _np(x),
                    f"bias{i}": _np(bias) if has_bias else np.zeros(0, np.float32), f"has_bias{i}": has_bias,
                    f"codes{i}": _np(codes), f"scale{i}": _np(scale), f"y{i}": _np(y)})
    return out


# ----------------------------------------------------------------------------- exercise 2
def dynamic_refs(gen: torch.Generator) -> dict:
    """Per-token quantization (tokens of very different sizes, a zero token, ties) and int8_linear
    on codes whose int32 sums are far beyond int8 and int16 (and below 2**24: exact in float32)."""
    out = {}
    tok = randn(40, 48, generator=gen) * 10.0 ** torch.randint(-4, 3, (40, 1), generator=gen)
    tok[5] = 0.0
    tok[6, :3] = torch.tensor([127.0, 2.5, -3.5])  # scale 1.0: exact ties
    tok[6, 3:] = tok[6, 3:].clamp(-1.0, 1.0)
    for _ in range(3):
        _, s = quantize_per_token(tok)
        r = tok / s
        tok = torch.where(((r - torch.floor(r)) - 0.5).abs() < 1e-3, tok * 0.999, tok)
    tok[6, :3] = torch.tensor([127.0, 2.5, -3.5])
    codes, scale = quantize_per_token(tok)
    out.update(tok_x=_np(tok), tok_codes=_np(codes), tok_scale=_np(scale))
    cases = [(5, 1024, 3, True, "extreme"), (4, 300, 4, True, "random"), (7, 64, 9, False, "random"),
             (3, 1000, 3, True, "extreme"), (1, 17, 2, True, "random"), (6, 512, 6, True, "per-tensor")]
    out["n_cases"] = len(cases)
    for i, (t, k, n, has_bias, kind) in enumerate(cases):
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
        bias = randn(n, generator=gen) if has_bias else None
        y = int8_linear(qx, sx, qw, sw, bias)
        out.update({f"qx{i}": _np(qx), f"sx{i}": _np(sx), f"qw{i}": _np(qw), f"sw{i}": _np(sw),
                    f"bias{i}": _np(bias) if has_bias else np.zeros(0, np.float32), f"has_bias{i}": has_bias,
                    f"y{i}": _np(y), f"acc{i}": _np(qx.long() @ qw.long().t())})
    return out


# ----------------------------------------------------------------------------- exercise 3
def static_model(state: dict | None = None) -> nn.Sequential:
    """The calibration test model; layers "0", "2", "4" are the Linear ones."""
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    if state is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model.eval()


def static_refs(gen: torch.Generator) -> dict:
    """A small model, calibration batches (the maxima spread over all batches), their per-channel
    input maxima; then static W8A8 linear cases with inputs beyond the calibrated range."""
    model = init_linears_(static_model(), torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        model[3].weight.mul_(torch.rand(5, generator=gen) + 0.5)
        model[3].bias.add_(randn(5, generator=gen))
    shapes = [(2, 4, 6), (1, 7, 6), (3, 2, 6), (2, 5, 6)]
    batches = [randn(*s, generator=gen) * (1 + 3 * torch.rand(6, generator=gen)) for s in shapes]
    batches[1][0, 2, 1] = -25.0  # a negative extreme, in the second batch
    absmax = input_absmax(model, ["0", "2", "4"], lambda m: [m(b) for b in batches])
    out = {f"state.{k}": _np(v) for k, v in model.state_dict().items()}
    out.update({f"batch{i}": _np(b) for i, b in enumerate(batches)})
    out["n_batches"] = len(batches)
    out.update({f"absmax.{n}": _np(a) for n, a in absmax.items()})
    cases = [(6, 32, 5, 0.05, True), (1, 16, 3, 0.01, True), (9, 64, 7, 0.2, False), (4, 128, 4, 0.003, True)]
    out["n_cases"] = len(cases)
    for i, (t, k, n, sx, has_bias) in enumerate(cases):
        x = randn(t, k, generator=gen) * sx * 130  # about a third of the values beyond 127 * sx
        x[0, :3] = torch.tensor([127.0, 400.0, -1000.0]) * sx
        qw = torch.randint(-127, 128, (n, k), generator=gen).to(torch.int8)
        sw = torch.rand(n, 1, generator=gen) * 0.01 + 1e-4
        bias = randn(n, generator=gen) if has_bias else None
        r = x / sx
        x = torch.where(((r - torch.floor(r)) - 0.5).abs() < 1e-3, x * 0.999, x)
        qx = torch.round(x / torch.tensor(sx)).clamp(-127, 127).to(torch.int8)
        y = int8_linear(qx, torch.tensor(sx), qw, sw, bias)
        out.update({f"x{i}": _np(x), f"sx{i}": np.float32(sx), f"qw{i}": _np(qw), f"sw{i}": _np(sw),
                    f"bias{i}": _np(bias) if has_bias else np.zeros(0, np.float32), f"has_bias{i}": has_bias,
                    f"y{i}": _np(y)})
    return out


# ----------------------------------------------------------------------------- exercise 4
def smoothquant_refs(gen: torch.Generator) -> dict:
    """Smoothing factors (one or several weights, zero channels, three alphas) and folds into a
    pre-LN branch (LayerNorm weight and bias, linears with biases, non-square and square)."""
    out = {}
    cases = [(8, [5], 0.5), (6, [6, 6, 6], 0.5), (10, [3, 7], 0.75), (4, [4], 0.25), (12, [12, 12, 12], 0.85)]
    out["n_factor_cases"] = len(cases)
    for i, (n_in, outs, alpha) in enumerate(cases):
        act = torch.rand(n_in, generator=gen) * 10.0 ** torch.randint(-1, 2, (n_in,), generator=gen)
        act[0] = 30.0
        act[-1] = 0.0  # a channel never seen non-zero
        weights = [randn(o, n_in, generator=gen) * 0.1 for o in outs]
        weights[0][:, 1] = 0.0  # a dead input column
        if len(weights) > 1:
            weights[-1][0, 2] = 5.0  # this column's maximum sits in another weight than the first
        s = smoothing_factors(act, weights, alpha)
        out.update({f"act{i}": _np(act), f"alpha{i}": alpha, f"n_weights{i}": len(weights), f"s{i}": _np(s)})
        out.update({f"w{i}_{j}": _np(w) for j, w in enumerate(weights)})
    folds = [(6, [6, 6, 6]), (5, [3]), (8, [8, 4])]
    out["n_fold_cases"] = len(folds)
    for i, (d, outs) in enumerate(folds):
        ln = nn.LayerNorm(d)
        linears = [nn.Linear(d, o) for o in outs]
        with torch.no_grad():
            ln.weight.copy_(torch.rand(d, generator=gen) + 0.5)
            ln.bias.copy_(randn(d, generator=gen))
            for lin in linears:
                lin.weight.copy_(randn(o := lin.out_features, d, generator=gen) * 0.2)
                lin.bias.copy_(randn(o, generator=gen))
        x = randn(4, d, generator=gen) * 3
        s = torch.rand(d, generator=gen) * 4 + 0.1
        before = {f"fold{i}_ln_weight": _np(ln.weight), f"fold{i}_ln_bias": _np(ln.bias)}
        for j, lin in enumerate(linears):
            before[f"fold{i}_w{j}"], before[f"fold{i}_b{j}"] = _np(lin.weight.clone()), _np(lin.bias.clone())
        with torch.no_grad():
            y = [lin(ln(x)) for lin in linears]
            fold_smoothing(ln, linears, s)
        out.update(before)
        out.update({f"fold{i}_x": _np(x), f"fold{i}_s": _np(s), f"fold{i}_n": len(linears),
                    f"fold{i}_ln_weight_after": _np(ln.weight), f"fold{i}_ln_bias_after": _np(ln.bias)})
        for j, lin in enumerate(linears):
            out[f"fold{i}_w{j}_after"], out[f"fold{i}_y{j}"] = _np(lin.weight), _np(y[j])
    return out


# ----------------------------------------------------------------------------- exercise 5
def sensitivity_model(state: dict | None = None) -> nn.Sequential:
    """Layers "0.0", "1" and "3" are Linear; "0.0" sits one level down (a nested name)."""
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    if state is not None:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    return model.eval()


def sensitivity_refs(gen: torch.Generator) -> dict:
    """Per-layer damage of 4-bit per-group quantization on a small model, and rankings."""
    model = init_linears_(sensitivity_model(), torch.Generator().manual_seed(SEED + 5))
    with torch.no_grad():  # outliers: one weight in every group of 4 is 8 times too large
        model[1].weight[:, ::4].mul_(8.0)
        model[3].weight[:, 1::8].mul_(4.0)
    x = randn(32, 8, generator=gen)
    with torch.no_grad():
        ref = model(x)
    names = ["0.0", "1", "3"]
    damage = layer_sensitivity(model, names, lambda lin: QuantLinear.from_linear(lin, 4, 4),
                               lambda m: ((m(x) - ref) ** 2).mean().item())
    out = {f"state.{k}": _np(v) for k, v in model.state_dict().items()}
    out.update(x=_np(x), names=np.array(names), damage=np.array([damage[n] for n in names]))
    rank_in = torch.rand(12, generator=gen).double()
    out.update(rank_values=_np(rank_in), rank_k=np.array([0, 1, 5, 12, 20]))
    ranked = {f"n{i:02d}": v for i, v in enumerate(rank_in.tolist())}
    for k in (0, 1, 5, 12, 20):
        out[f"rank_top{k}"] = np.array(most_sensitive(ranked, k) or [""])
    return out


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir`` (created if needed)."""
    gen = torch.Generator().manual_seed(SEED)  # one stream, drawn from in this order
    write_references(out_dir, {"weight_only": weight_only_refs(gen), "dynamic": dynamic_refs(gen),
                               "static": static_refs(gen), "smoothquant": smoothquant_refs(gen),
                               "sensitivity": sensitivity_refs(gen)})


if __name__ == "__main__":
    generator_main(make, LAB)
