"""Reference inputs and outputs for the hidden tests of lab04_qat.

Every expected value comes from qcore's reference implementation (``qcore.qat``), never from a
student function, on small tensors built from fixed seeds (no model, no training). A rerun writes
the same arrays.

    python course/refgen/lab04_qat.py course/reference/lab04_qat
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcourse.refdata import generator_main, init_linears_, randn, to_numpy as _np, write_references
from qcore.qat import FakeQuantLinear, convert, freeze_observers, lsq_fake_quantize, prepare_qat
from qcore.quant import fake_quantize_ste

LAB = "lab04_qat"
SEED = 20240504


# Results whose last bits may depend on the CPU (qcourse.refdata): outputs and gradients of
# linear layers (float32 roundings ~ the reduction length), the LSQ scale gradient (a sum over the
# weights) and a small model's output. STE values and masks, codes and scales are exact.
CPU_DEPENDENT = {
    "fake_linear": {"y*": 32, "grad_x*": 32, "grad_w*": 32},  # products of up to 12 terms
    "lsq": {"grad_scale*": 64},  # a sum over up to 32 weights per scale
    "prepare_convert": {"y": 64},  # three layers with GELU and LayerNorm, 7 wide
}


def _far_from_ties(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Nudge values whose x / scale lies within 1e-3 of a half-integer (x * (1 / scale), as torch
    computes it, could round the other way); exact ties are planted on purpose elsewhere."""
    r = x / scale
    return torch.where(((r - torch.floor(r)) - 0.5).abs() < 1e-3, x * 0.999, x)


# ----------------------------------------------------------------------------- exercise 1
def ste_refs(gen: torch.Generator) -> dict:
    """Per-tensor and per-row grids (symmetric and asymmetric, 2 to 8 bits), values beyond the grid
    on both sides, codes just inside and just outside the clamp, exact ties (power-of-two scales)."""
    cases = [((40,), "tensor", 8, False), ((5, 30), "tensor", 4, True), ((6, 20), "row", 3, True),
             ((4, 25), "row", 8, False), ((3, 4, 10), "tensor", 2, True), ((8, 16), "row", 4, False)]
    out = {"n_cases": len(cases)}
    for i, (shape, kind, bits, symmetric) in enumerate(cases):
        qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        if kind == "tensor":
            scale = torch.tensor(2.0 ** -int(torch.randint(2, 6, (), generator=gen)))
            zero_point = torch.tensor(0.0 if symmetric else float(torch.randint(1, qmax, (), generator=gen)))
        else:
            scale = (torch.rand(shape[0], 1, generator=gen) * 0.2 + 0.01)
            zero_point = torch.zeros(shape[0], 1) if symmetric else \
                torch.randint(0, qmax + 1, (shape[0], 1), generator=gen).float()
        # about a quarter of the values beyond the grid
        span = (qmax - qmin) * scale
        x = (torch.rand(*shape, generator=gen) * 1.5 - 0.25) * span + (qmin - zero_point) * scale
        x = _far_from_ties(x, scale)
        flat = x.reshape(-1)
        if kind == "tensor":  # exact ties, and codes just inside / just outside the clamp
            s, z = scale.item(), zero_point.item()
            flat[:6] = torch.tensor([0.5 * s, 2.5 * s, -1.5 * s, (qmax - z + 0.4) * s, (qmax - z + 0.6) * s,
                                     (qmin - z - 0.4) * s])
        grad_out = randn(*shape, generator=gen)
        xr = x.clone().requires_grad_()
        y = fake_quantize_ste(xr, scale, zero_point, qmin, qmax)
        y.backward(grad_out)
        out.update({f"x{i}": _np(x), f"scale{i}": _np(scale), f"zero_point{i}": _np(zero_point), f"qmin{i}": qmin,
                    f"qmax{i}": qmax, f"grad_out{i}": _np(grad_out), f"y{i}": _np(y), f"grad_x{i}": _np(xr.grad)})
    return out


# ----------------------------------------------------------------------------- exercise 2
def fake_linear_refs(gen: torch.Generator) -> dict:
    """FakeQuantLinear over a sequence of batches (EMA updates, then frozen): ranges, qparams, outputs
    and gradients. One square weight (a per-column scale would have the right shape), one layer whose
    inputs are all positive (zero-point 0), one with an all-zero row."""
    cases = [(6, 6, 4, 8, 0.1, 4, 3), (5, 12, 3, 8, 0.25, 5, 3), (8, 4, 2, 8, 0.01, 3, 2), (3, 7, 8, 4, 0.5, 4, 2)]
    out = {"n_cases": len(cases)}
    for i, (n_out, n_in, wb, ab, c, n_batches, freeze_at) in enumerate(cases):
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(randn(n_out, n_in, generator=gen) * torch.rand(n_out, 1, generator=gen) * 2)
            lin.weight[0, 1] = 5.0  # an outlier in row 0 (and in column 1)
            if i == 1:
                lin.weight[2] = 0.0
            lin.bias.copy_(randn(n_out, generator=gen))
        out.update({f"weight{i}": _np(lin.weight), f"bias{i}": _np(lin.bias), f"weight_bits{i}": wb,
                    f"act_bits{i}": ab, f"c{i}": c, f"n_batches{i}": n_batches, f"freeze_at{i}": freeze_at})
        fq = FakeQuantLinear(lin, wb, ab, c)
        out[f"weight_scale{i}"] = _np(fq.weight_scale())
        for j in range(n_batches):
            if j == freeze_at:
                fq.freeze_observer()
            shape = (3, n_in) if j % 2 == 0 else (2, 2, n_in)
            x = randn(*shape, generator=gen) * (1 + 2 * j)
            if i == 2:
                x = x.abs() + 0.5  # all positive: the range widens to 0
            xr = x.clone().requires_grad_()
            y = fq(xr)
            grad_out = randn(*y.shape, generator=gen)
            y.backward(grad_out)
            scale, zp = fq.act_qparams()
            out.update({f"x{i}_{j}": _np(x), f"grad_out{i}_{j}": _np(grad_out), f"y{i}_{j}": _np(y),
                        f"grad_x{i}_{j}": _np(xr.grad), f"range{i}_{j}": _np(torch.stack(list(fq.input_observer.clip_range()))),
                        f"act_scale{i}_{j}": np.float32(scale.item()), f"act_zero_point{i}_{j}": np.float32(zp.item())})
        out[f"grad_w{i}"] = _np(lin.weight.grad)
    return out


# ----------------------------------------------------------------------------- exercise 3
def convert_model() -> nn.Sequential:
    """Linear layers at "0", "2.0.0" (two levels down) and "4"."""
    return nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Sequential(nn.Sequential(nn.Linear(7, 7)), nn.ReLU()),
                         nn.LayerNorm(7), nn.Linear(7, 3))


def prepare_convert_refs(gen: torch.Generator) -> dict:
    """A nested model, prepared (W3A8), observed on batches, one layer with a learned (smaller) scale
    so that some codes clamp; the expected codes, scales and outputs."""
    model = init_linears_(convert_model(), torch.Generator().manual_seed(SEED + 3)).eval()
    names = ["0", "2.0.0", "4"]
    batches = [randn(4, 5, generator=gen) * 2 for _ in range(3)]
    q = prepare_qat(model, 3, 8)
    with torch.no_grad():
        for b in batches:
            q(b)
    freeze_observers(q)
    lsq = q.get_submodule("2.0.0").weight_scale().detach() * 0.6  # a learned scale: some codes clamp
    q.get_submodule("2.0.0").scale = nn.Parameter(lsq.clone())
    x = randn(6, 5, generator=gen)
    with torch.no_grad():
        y = q(x)
    c = convert(q)
    out = {f"state.{k}": _np(v) for k, v in model.state_dict().items()}
    out.update(names=np.array(names), weight_bits=3, act_bits=8, n_batches=len(batches), x=_np(x), y=_np(y))
    out.update({f"batch{j}": _np(b) for j, b in enumerate(batches)})
    out["lsq.2.0.0"] = _np(lsq)
    for n in names:
        out[f"codes.{n}"] = _np(c.get_submodule(n).codes())
        out[f"scale.{n}"] = _np(c.get_submodule(n).scale)
    return out


# ----------------------------------------------------------------------------- exercise 4
def lsq_refs(gen: torch.Generator) -> dict:
    """LSQ values and gradients: per-row and per-tensor scales, 2 to 8 bits, scales small enough that
    part of each row is clipped."""
    cases = [((6, 16), "row", 4), ((4, 9), "row", 2), ((5, 32), "tensor", 3), ((3, 8), "row", 8), ((24,), "tensor", 4)]
    out = {"n_cases": len(cases)}
    for i, (shape, kind, bits) in enumerate(cases):
        qmax = 2 ** (bits - 1) - 1
        w = randn(*shape, generator=gen)
        if kind == "row":
            scale = w.abs().amax(dim=1, keepdim=True) / qmax * (0.5 + 0.4 * torch.rand(shape[0], 1, generator=gen))
        else:
            scale = w.abs().max() / qmax * torch.tensor(0.7)
        w = _far_from_ties(w, scale)
        grad_out = randn(*shape, generator=gen)
        wr, sr = w.clone().requires_grad_(), scale.clone().requires_grad_()
        y = lsq_fake_quantize(wr, sr, bits)
        y.backward(grad_out)
        out.update({f"w{i}": _np(w), f"scale{i}": _np(scale), f"bits{i}": bits, f"grad_out{i}": _np(grad_out),
                    f"y{i}": _np(y), f"grad_w{i}": _np(wr.grad), f"grad_scale{i}": _np(sr.grad)})
    return out


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir`` (created if needed)."""
    gen = torch.Generator().manual_seed(SEED)  # one stream, drawn from in this order
    write_references(out_dir, {"ste": ste_refs(gen), "fake_linear": fake_linear_refs(gen),
                               "prepare_convert": prepare_convert_refs(gen), "lsq": lsq_refs(gen)})


if __name__ == "__main__":
    generator_main(make, LAB)
