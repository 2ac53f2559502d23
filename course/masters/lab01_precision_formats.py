# %% [markdown]
# # Lab 1: precision formats (FP32, FP16, BF16, FP8, INT8)
#
# A model is a few billion numbers, and each costs bits. This lab looks at what a floating-point
# format keeps and what it loses. You will:
#
# 1. split a number into its sign, exponent and mantissa bits, and rebuild it;
# 2. derive a format's range and precision from its layout;
# 3. round FP32 to BF16 by hand, bit for bit like PyTorch for every number (NaN is special, see there);
# 4. count the bytes of a model in each format;
# 5. round to any format (FP16, FP8, and ones no library ships) the way torch's casts do.
#
# Each exercise is a function to complete between the markers, followed by a test cell. The test
# cell checks your function on a few examples; the grader runs more tests (other inputs, edge
# cases) and fails any function that just calls the `qcore` or PyTorch function it rebuilds.

# %% locked="setup"
import importlib.util
if importlib.util.find_spec("qcore") is None:  # Colab or a bare kernel: install the course library
    # %pip install -q "{{QCORE_SOURCE}}"
    importlib.invalidate_caches()
from qcore.notebook import setup
DEVICE = setup()

# %%
import math
import struct

import matplotlib.pyplot as plt
import numpy as np
import torch

import qcore.formats
from qcore.formats import BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, decompose, memory_bytes

# (exponent bits E, mantissa bits M) of the three formats the exercises handle, and the signed
# integer type of the same width, used to look at the raw bits.
LAYOUT = {torch.float32: (8, 23), torch.float16: (5, 10), torch.bfloat16: (8, 7)}
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# %% [markdown]
# ## 1. Three fields
#
# A binary float has 1 sign bit `s`, `E` exponent bits `e` and `M` mantissa bits `m`, stored in
# that order from the top bit down. With the bias `2**(E-1) - 1`:
#
# | exponent field `e` | value |
# | --- | --- |
# | `1 <= e <= 2**E - 2` (normal) | `(-1)**s * 2**(e - bias) * (1 + m / 2**M)` |
# | `e == 0` (zero, subnormal) | `(-1)**s * 2**(1 - bias) * (m / 2**M)` |
# | `e == 2**E - 1` | `inf` if `m == 0`, else NaN |
#
# Normal numbers have an implicit leading 1 that is not stored. Subnormals drop it, so the values
# shrink evenly down to zero.
#
# | format | bits | E | M | bias |
# | --- | --- | --- | --- | --- |
# | FP32 | 32 | 8 | 23 | 127 |
# | FP16 | 16 | 5 | 10 | 15 |
# | BF16 | 16 | 8 | 7 | 127 |
# | FP8 E4M3 | 8 | 4 | 3 | 7 |
# | FP8 E5M2 | 8 | 5 | 2 | 15 |
#
# BF16 is the top half of FP32: the same 8 exponent bits (the same range), 16 mantissa bits fewer.
# Here is -0.1 in each format (drawn with `qcore.formats.decompose`). The stored value differs,
# because 0.1 has no finite binary expansion and each format rounds it differently.

# %%
def draw_layout(ax, value: float, fmt, row: float) -> None:
    """One row of boxes: the bits of `value` rounded to `fmt`, coloured by field."""
    s, e, m = (int(t) for t in decompose(torch.tensor([value]), fmt))
    E, M = fmt.exponent_bits, fmt.mantissa_bits
    bits = [s] + [(e >> i) & 1 for i in reversed(range(E))] + [(m >> i) & 1 for i in reversed(range(M))]
    colours = ["tab:red"] + ["tab:blue"] * E + ["tab:green"] * M
    for i, (b, c) in enumerate(zip(bits, colours)):
        ax.add_patch(plt.Rectangle((i, row), 0.95, 0.8, color=c, alpha=0.35))
        ax.text(i + 0.47, row + 0.4, str(b), ha="center", va="center", fontsize=8)
    stored = qcore.formats.round_to_format(torch.tensor([value]), fmt).item()
    ax.text(-0.5, row + 0.4, f"{fmt.name}", ha="right", va="center", fontsize=10)
    ax.text(len(bits) + 0.5, row + 0.4, f"{stored!r}", ha="left", va="center", fontsize=9)


fig, ax = plt.subplots(figsize=(12, 3.2))
for row, fmt in enumerate([FP8_E5M2, FP8_E4M3, BF16, FP16, FP32]):
    draw_layout(ax, -0.1, fmt, row)
ax.set_xlim(-4, 45)
ax.set_ylim(-0.2, 5)
ax.axis("off")
ax.set_title("-0.1 in five formats: sign (red), exponent (blue), mantissa (green), stored value")
plt.show()

# %% [markdown]
# ### Exercise 1: read the fields (2 points)
#
# `x.view(torch.int16)` reinterprets the 16 bits of a float16 tensor as integers, without changing
# them (`.to(...)` would convert the *value* instead). Complete `split_bits` for float32, float16
# and bfloat16 tensors: with `b` the bit pattern as an **unsigned** integer (`0 <= b < 2**(1+E+M)`),
#
#     sign     = b >> (E + M)
#     exponent = (b >> M) & (2**E - 1)
#     mantissa = b & (2**M - 1)
#
# The integer views are signed: a negative float gives a negative integer, and `>>` keeps its sign.
# Widen to int64 with `.to(torch.int64)` and mask with `& (2**(1+E+M) - 1)` first. Use bit
# operations only: no `decompose`, no `frexp`.

# %% solution="ex1_split_bits"
def split_bits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sign, biased exponent and mantissa fields of a float32, float16 or bfloat16 tensor.

    Returns three int64 tensors shaped like `x`. Use LAYOUT[x.dtype] and INT_VIEW[x.dtype].
    """
    ### BEGIN SOLUTION
    E, M = LAYOUT[x.dtype]
    # The signed integer view, widened and masked: the unsigned bit pattern 0 .. 2**(1+E+M) - 1.
    b = x.view(INT_VIEW[x.dtype]).to(torch.int64) & ((1 << (1 + E + M)) - 1)
    sign = b >> (E + M)
    exponent = (b >> M) & ((1 << E) - 1)
    mantissa = b & ((1 << M) - 1)
    return sign, exponent, mantissa
    ### END SOLUTION


# %% tests="ex1_split_bits_tests" points=2
from qcore.checks import check_equal, check_true, exercise

with exercise("Exercise 1: bit fields"):
    x16 = torch.tensor([1.0, -2.5, 0.0, 2.0**-24, float("inf")], dtype=torch.float16)
    s, e, m = split_bits(x16)
    check_equal(s, torch.tensor([0, 1, 0, 0, 0]), "FP16 sign of [1, -2.5, 0, 2**-24, inf]",
                hint="the sign is the top bit. Did you mask the signed int16 view with & 0xFFFF "
                     "after .to(torch.int64)?")
    check_equal(e, torch.tensor([15, 16, 0, 0, 31]), "FP16 exponent fields",
                hint="shift right by M = 10 and keep E = 5 bits: (b >> 10) & 0b11111")
    check_equal(m, torch.tensor([0, 256, 0, 1, 0]), "FP16 mantissa fields",
                hint="keep the low M = 10 bits: b & (2**10 - 1). The implicit 1 is not stored")
    b32 = struct.unpack(">I", struct.pack(">f", -0.1))[0]  # the FP32 bits of -0.1, from Python
    got = tuple(int(t.item()) for t in split_bits(torch.tensor([-0.1])))
    check_equal(got, (b32 >> 31, (b32 >> 23) & 0xFF, b32 & 0x7FFFFF), "FP32 fields of -0.1 (from struct)",
                hint="float32 uses E = 8, M = 23 and the 32-bit view torch.int32")
    s, e, m = split_bits(torch.tensor([1.0, -3.0], dtype=torch.bfloat16))
    check_equal((s.tolist(), e.tolist(), m.tolist()), ([0, 1], [127, 128], [0, 64]),
                "BF16 fields of [1, -3]", hint="bfloat16 is E = 8, M = 7, not the FP16 layout")
    check_equal(tuple(split_bits(torch.zeros(2, 3))[0].shape), (2, 3), "shape is kept")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab01_precision_formats", "ex1_split_bits_tests", "split_bits",
         forbid=("qcore.formats.decompose", "qcore.formats.round_to_format", "torch.frexp", "math.frexp",
                 "numpy.frexp")) as q:
    for _key in [k for k in q.inputs if k.endswith("_bits")]:  # fp32, fp16, bf16 and the visible cases
        _raw = q.inputs[_key]
        _dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            _key[:-len("_bits")].removeprefix("visible_")]
        _x = torch.from_numpy(_raw.view(np.int32 if _raw.dtype == np.uint32 else np.int16)).view(_dtype)
        q.answer(_key[:-len("_bits")], split_bits(_x.clone()))
    q.answer("matrix", split_bits(torch.from_numpy(q.inputs["matrix"]).t()))  # 2-D, not contiguous
### END HIDDEN TESTS

# %% [markdown]
# ### Exercise 2: rebuild the value (2 points)
#
# Now the other way, for any layout with infinities (FP32, FP16, BF16, FP8 E5M2, and made-up
# ones). Complete `fields_to_value` with the table above:
#
#     normal    (1 <= e <= 2**E - 2):  (-1)**s * 2**(e - bias) * (1 + m / 2**M)
#     subnormal (e == 0):              (-1)**s * 2**(1 - bias) * (m / 2**M)
#     e == 2**E - 1:                   (-1)**s * inf if m == 0, else NaN
#
# with `bias = 2**(E-1) - 1`. Compute in float64 (every value here is exact there) and return
# float32. Keep the sign of zero: fields `(1, 0, 0)` are `-0.0`.

# %% solution="ex2_fields_to_value"
def fields_to_value(sign, exponent, mantissa, exponent_bits: int, mantissa_bits: int) -> torch.Tensor:
    """float32 values of the fields (integer tensors of one shape) of an E/M layout with inf."""
    ### BEGIN SOLUTION
    s, e, m = (torch.as_tensor(v).to(torch.int64) for v in (sign, exponent, mantissa))
    E, M = exponent_bits, mantissa_bits
    bias = 2 ** (E - 1) - 1
    frac = m.to(torch.float64) / 2**M
    normal = (1.0 + frac) * torch.exp2((e - bias).to(torch.float64))
    subnormal = frac * 2.0 ** (1 - bias)
    magnitude = torch.where(e == 0, subnormal, normal)
    special = torch.where(m == 0, math.inf, math.nan)  # the all-ones exponent
    magnitude = torch.where(e == 2**E - 1, special, magnitude)
    return torch.where(s == 1, -magnitude, magnitude).to(torch.float32)
    ### END SOLUTION


# %% tests="ex2_fields_to_value_tests" points=2
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 2: rebuild the value"):
    got = fields_to_value(torch.tensor([0, 1, 0, 1]), torch.tensor([15, 16, 15, 14]),
                          torch.tensor([0, 256, 512, 0]), 5, 10)
    check_close(got, torch.tensor([1.0, -2.5, 1.5, -0.5]), "FP16 normals [1, -2.5, 1.5, -0.5]",
                hint="2**(e - bias) * (1 + m / 2**M) with bias = 2**(E-1) - 1 = 15 for FP16")
    got = fields_to_value(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]), torch.tensor([1, 1023, 0]), 5, 10)
    check_close(got, torch.tensor([2.0**-24, 1023 * 2.0**-24, -0.0]), "FP16 subnormals 2**-24, 1023 * 2**-24",
                hint="e == 0: no implicit 1, and the exponent is 1 - bias (not -bias)")
    check_true(bool(torch.signbit(got[2])), "fields (1, 0, 0) give -0.0",
               hint="apply the sign to zero too: torch.where(s == 1, -magnitude, magnitude)")
    got = fields_to_value(torch.tensor([0, 1, 0]), torch.tensor([31, 31, 31]), torch.tensor([0, 0, 1]), 5, 10)
    check_equal(got[:2].tolist(), [math.inf, -math.inf], "FP16 +inf and -inf",
                hint="the all-ones exponent with m == 0 is infinity")
    check_true(bool(torch.isnan(got[2])), "FP16 NaN (all-ones exponent, m != 0)")
    b = struct.unpack(">I", struct.pack(">f", 0.1))[0]
    got = fields_to_value(torch.tensor([b >> 31]), torch.tensor([(b >> 23) & 0xFF]),
                          torch.tensor([b & 0x7FFFFF]), 8, 23)
    check_equal(got.item(), struct.unpack(">f", struct.pack(">f", 0.1))[0],
                "FP32 fields of 0.1 give 0.1 exactly")
    check_equal(got.dtype, torch.float32, "returns float32")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab01_precision_formats", "ex2_fields_to_value_tests", "fields_to_value", forbid=("qcore.formats.compose",)) as q:
    for _prefix in ("", "visible_"):
        _layout = torch.from_numpy(q.inputs[_prefix + "layout"].astype(np.int64))
        for _i, (_E, _M) in enumerate(q.inputs[_prefix + "layouts"].tolist()):
            _fields = [torch.from_numpy(q.inputs[_prefix + _k].astype(np.int64))[_layout == _i]
                       for _k in ("sign", "exponent", "mantissa")]
            q.answer(f"{_prefix}layout{_i}", fields_to_value(*_fields, _E, _M))
    for _tag, (_E, _M) in (("fp16", (5, 10)), ("bf16", (8, 7))):  # every bit pattern
        _b = torch.arange(2**16, dtype=torch.int64)
        q.answer(f"all_{_tag}", fields_to_value(_b >> (_E + _M), (_b >> _M) & (2**_E - 1), _b & (2**_M - 1), _E, _M))
### END HIDDEN TESTS

# %% [markdown]
# ## 2. Range and precision come from the layout
#
# The exponent bits set the **range**, the mantissa bits the **precision**. Between two powers of
# two a format has `2**M` evenly spaced values, so the gap between neighbours is
# `2**(floor(log2|x|) - M)`: it doubles with every binade, and the *relative* gap stays between
# `2**-(M+1)` and `2**-M`. Below the smallest normal the gap stops shrinking (subnormals).
#
# Below, every positive value of the 8- and 16-bit formats (decoded by torch from all their bit
# patterns) and a sample of FP32, with the gap to the next value.

# %%
def all_positive_values(dtype: torch.dtype, n_bits: int) -> torch.Tensor:
    """Every positive finite value of a torch dtype of 8 or 16 bits, sorted, as float64."""
    if n_bits == 8:
        pats = torch.arange(256, dtype=torch.uint8)
    else:
        pats = torch.arange(-(2**15), 2**15, dtype=torch.int16)
    v = pats.view(dtype).to(torch.float64)
    return torch.unique(v[torch.isfinite(v) & (v > 0)])


fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
x32 = torch.logspace(-44, 38, 4000, dtype=torch.float64).to(torch.float32)
x32 = x32[(x32 > 0) & torch.isfinite(x32)]
gap32 = (torch.nextafter(x32, torch.tensor(math.inf)) - x32).double()
curves = [("FP32", x32.double(), gap32)]
for name, dtype, n_bits in (("FP16", torch.float16, 16), ("BF16", torch.bfloat16, 16),
                            ("FP8 E4M3", torch.float8_e4m3fn, 8), ("FP8 E5M2", torch.float8_e5m2, 8)):
    v = all_positive_values(dtype, n_bits)
    curves.append((name, v[:-1], v[1:] - v[:-1]))
for name, v, gap in curves:
    axes[0].loglog(v, gap, ".", ms=2, label=name)
    for ax in axes[1:]:
        ax.loglog(v, gap / v, ".", ms=2)
axes[0].set(xlabel="|x|", ylabel="gap to the next value", title="Absolute spacing (80 decades)")
axes[1].set(xlabel="|x|", ylabel="gap / |x|", title="Relative spacing (flat = normal range)")
# The zoom: the range of the 8- and 16-bit formats, where the two FP8s and FP16 are more than slivers.
axes[2].set(xlim=(2.0**-26, 2.0**17), ylim=(2.0**-25, 2.0), xlabel="|x|", ylabel="gap / |x|",
            title="Zoom: 2**-26 to 2**17")
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, markerscale=6, frameon=False)
fig.tight_layout(rect=(0, 0.07, 1, 1))
plt.show()

# %% [markdown]
# The flat bands of the relative plots are the normal ranges: there each format has a constant
# relative precision of about `2**-M`. The rising left ends are the subnormals; each curve stops at
# the format's largest value. Rounding to the nearest value therefore costs at most half a gap, a
# relative error of at most `2**-(M+1)` in the normal range. Random values spread over
# `[2**-6, 2**8]` (inside every format's normal range) show it; the dashed lines mark `2**-(M+1)`.

# %%
gen = torch.Generator().manual_seed(0)
x = torch.exp2(torch.empty(100_000).uniform_(-6, 8, generator=gen))
fig, ax = plt.subplots(figsize=(10, 4))
bins = np.logspace(-10, 0, 101)
for fmt, colour in ((FP16, "tab:blue"), (BF16, "tab:orange"), (FP8_E4M3, "tab:green"), (FP8_E5M2, "tab:red")):
    rel = ((qcore.formats.round_to_format(x, fmt) - x).abs() / x).numpy()
    ax.hist(rel[rel > 0], bins=bins, histtype="step", color=colour,
            label=f"{fmt.name} (M={fmt.mantissa_bits})")
    ax.axvline(2.0 ** -(fmt.mantissa_bits + 1), color=colour, ls="--", lw=1)
ax.set_xscale("log")
ax.set(xlabel="relative rounding error |round(x) - x| / |x|", ylabel="count",
       title="Relative rounding error of 100k values in [2**-6, 2**8]")
ax.legend()
plt.show()

# %% [markdown]
# ### Exercise 3: limits from the layout (2 points)
#
# Derive a format's limits from its layout, with nothing but the table of Section 1 and one rule
# for the top exponent:
#
# * **with infinities** (`has_inf=True`, the IEEE way: FP32, FP16, BF16, FP8 E5M2), the all-ones
#   exponent holds only inf (`m == 0`) and NaN (`m != 0`);
# * **without infinities** (`has_inf=False`, FP8 E4M3 as torch's `float8_e4m3fn`), the all-ones
#   exponent holds ordinary numbers, except the one pattern with the all-ones mantissa: NaN.
#
# Complete `format_limits`: it returns a dict with the keys `"max"` (the largest finite value),
# `"min_normal"` (the smallest positive normal value), `"min_subnormal"` (the smallest positive
# value) and `"eps"` (the gap between 1 and the next value above it), as Python floats. For each,
# ask which fields `(e, m)` the pattern has, then read its value off the table. Do not use
# `torch.finfo` or `qcore.formats.FloatFormat`: they are what you check against.

# %% solution="ex3_format_limits"
def format_limits(exponent_bits: int, mantissa_bits: int, has_inf: bool = True) -> dict[str, float]:
    """max, min_normal, min_subnormal and eps of a layout with E exponent and M mantissa bits."""
    ### BEGIN SOLUTION
    E, M = exponent_bits, mantissa_bits
    bias = 2 ** (E - 1) - 1
    if has_inf:  # the all-ones exponent holds inf and NaN
        e_max, m_max = 2**E - 2, 2**M - 1
    else:  # only all-ones exponent with all-ones mantissa is NaN
        e_max, m_max = 2**E - 1, 2**M - 2
    return {"max": 2.0 ** (e_max - bias) * (1 + m_max / 2**M),
            "min_normal": 2.0 ** (1 - bias),
            "min_subnormal": 2.0 ** (1 - bias - M),
            "eps": 2.0**-M}
    ### END SOLUTION


# %% tests="ex3_format_limits_tests" points=2
from qcore.checks import check_close, check_equal, exercise

with exercise("Exercise 3: limits from the layout"):
    for name, dtype, (E, M) in (("FP32", torch.float32, (8, 23)), ("FP16", torch.float16, (5, 10)),
                                ("BF16", torch.bfloat16, (8, 7)), ("FP8 E5M2", torch.float8_e5m2, (5, 2))):
        lim = format_limits(E, M)
        fi = torch.finfo(dtype)
        check_equal(sorted(lim), ["eps", "max", "min_normal", "min_subnormal"], f"{name}: the four keys")
        check_close(lim["max"], fi.max, f"{name} max = torch.finfo max ({fi.max:g})",
                    hint="the largest finite pattern has the largest exponent field that is not inf/NaN "
                         "(2**E - 2) and the all-ones mantissa (2**M - 1)")
        check_close(lim["min_normal"], fi.tiny, f"{name} min_normal = torch.finfo tiny",
                    hint="the fields (e, m) = (1, 0): 2**(1 - bias), bias = 2**(E-1) - 1")
        check_close(lim["min_subnormal"], fi.tiny * fi.eps, f"{name} min_subnormal = tiny * eps",
                    hint="the fields (0, 1), a subnormal: 2**(1 - bias) * 1 / 2**M (the exponent is 1 - bias, not -bias)")
        check_close(lim["eps"], fi.eps, f"{name} eps = torch.finfo eps",
                    hint="1 is (e, m) = (bias, 0); its neighbour above has m = 1: 1 + 1 / 2**M")
    check_close(format_limits(4, 3, has_inf=False)["max"], 448.0, "FP8 E4M3 (no inf) max = 448",
                hint="without infinities the all-ones exponent 2**E - 1 holds numbers; only its all-ones "
                     "mantissa is NaN, so the largest number has m = 2**M - 2")
    check_close(format_limits(4, 3, has_inf=True)["max"], 240.0, "an IEEE-style E4M3 would stop at 240")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab01_precision_formats", "ex3_format_limits_tests", "format_limits",
         forbid=("qcore.formats.FloatFormat", "torch.finfo", "numpy.finfo")) as q:
    for _prefix in ("", "visible_"):
        _lims = [format_limits(int(_E), int(_M), has_inf=bool(_inf)) for _E, _M, _inf in
                 zip(*(q.inputs[_prefix + _k] for _k in ("exponent_bits", "mantissa_bits", "has_inf")))]
        for _k in ("max", "min_normal", "min_subnormal", "eps"):
            q.answer(_prefix + _k, np.array([float(_lim[_k]) for _lim in _lims]))
### END HIDDEN TESTS

# %% [markdown]
# **Why FP8 E4M3 reaches 448.** With IEEE rules the top exponent (`e = 15`) would hold only inf
# and NaN, leaving `2**(14-7) * 1.875 = 240` as the largest value. Eight bits are too few to spend
# 16 patterns (both signs) on inf and NaN, so the E4M3 used in deep learning has no infinities and
# keeps a single NaN pattern (`S.1111.111`). The top binade then holds ordinary numbers up to
# `2**(15-7) * 1.75 = 448`. What happens beyond is the cast's choice, not the format's: the OCP FP8
# specification allows saturating to ±448 or returning NaN (there is no inf to return). The pinned
# torch (2.13) saturates; older releases returned NaN from 480 up. The cell below casts 464, 480,
# 1e9 and inf and prints what your torch does. E5M2 keeps the IEEE rules: more range (57344), one mantissa bit less.

# %%
print(f"{'format':10} {'max':>12} {'min normal':>12} {'min subnormal':>14} {'eps':>10}   torch.finfo max")
for fmt in (FP32, FP16, BF16, FP8_E4M3, FP8_E5M2):
    print(f"{fmt.name:10} {fmt.max:12.5g} {fmt.min_normal:12.5g} {fmt.min_subnormal:14.5g} {fmt.eps:10.5g}"
          f"   {torch.finfo(fmt.torch_dtype).max:.5g}")
past = torch.tensor([464.0, 480.0, 1e9, math.inf])
print(f"\ntorch {torch.__version__}: {past.tolist()} cast to float8_e4m3fn -> "
      f"{past.to(torch.float8_e4m3fn).float().tolist()}")

# %% [markdown]
# ## 3. FP16 overflows, BF16 loses digits
#
# FP16 stops at 65504. Activations rarely get there, but squares and sums of them do: the
# sum of squares inside a norm, a large attention logit. BF16 has FP32's range and survives.

# %%
gen = torch.Generator().manual_seed(1)
h = torch.randn(4096, generator=gen) * 10  # one hidden vector with large activations
logits = torch.tensor([75000.0, 70000.0, 0.0])  # one large attention logit
print(f"{'':24}{'FP32':>14}{'FP16':>14}{'BF16':>14}")
rows = {
    "sum of squares": lambda t: (t * t).sum(),
    "h[0] / rms(h)": lambda t: t[0] / ((t * t).sum() / t.numel()).sqrt(),
}
for label, fn in rows.items():
    vals = [fn(h.to(dt)).item() for dt in (torch.float32, torch.float16, torch.bfloat16)]
    print(f"{label:24}" + "".join(f"{v:14.6g}" for v in vals))
vals = [logits.to(dt)[0].item() for dt in (torch.float32, torch.float16, torch.bfloat16)]
print(f"{'logit 75000':24}" + "".join(f"{v:14.6g}" for v in vals))
vals = [torch.softmax(logits.to(dt), dim=0)[0].item()
        for dt in (torch.float32, torch.float16, torch.bfloat16)]
print(f"{'softmax(logits)[0]':24}" + "".join(f"{v:14.6g}" for v in vals))

# %% [markdown]
# In FP16 the sum of squares is inf, so the normalised value collapses to 0, and the softmax of
# the logits is NaN. BF16 pays for its range with 7 mantissa bits: its gap around 1 is `2**-7`.
# In a long sum, each small term is rounded to the spacing of the running total. Adding 0.001 ten
# thousand times (the exact answer is 10):

# %%
n_terms = 10_000
fig, ax = plt.subplots(figsize=(9, 4))
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    acc, step, trace = torch.zeros((), dtype=dtype), torch.tensor(0.001, dtype=dtype), []
    for _ in range(n_terms):
        acc = acc + step
        trace.append(acc.item())
    ax.plot(trace, label=f"{str(dtype).replace('torch.', '')}: ends at {trace[-1]:.4g}")
ax.plot(np.arange(1, n_terms + 1) * 0.001, "k:", label="exact")
ax.set(xlabel="terms added", ylabel="running sum", title="Adding 0.001 ten thousand times")
ax.legend()
plt.show()

# %% [markdown]
# BF16 stalls at 0.5: from there on, the gap is `2**-8`, and 0.001 is less than half of it, so
# every addition rounds back to the same number. FP16 stalls at 4 for the same reason. Just before
# each stall the sum runs *ahead* of the exact line: between 2 and 4 FP16's gap is `2**-9 ≈ 0.00195`,
# and 0.001 is just over half of it, so every addition rounds up to a whole gap and the sum grows
# almost twice as fast as it should (BF16 does the same between 0.25 and 0.5). Rounding errors do
# not average out here: the same rounding happens at every step. This is why mixed-precision
# kernels multiply in BF16 or FP16 but *accumulate* in FP32.
#
# ### Exercise 4: round FP32 to BF16 by hand (3 points)
#
# BF16 keeps the upper 16 bits of an FP32 number. Truncating the lower 16 bits would always round
# toward zero; PyTorch rounds to nearest, ties to even. With `b` the unsigned FP32 bit pattern and
# `low = b & 0xFFFF`, the kept part `b >> 16` goes up by one when `low > 0x8000`, or when
# `low == 0x8000` and the kept part is odd (a tie goes to the even neighbour). One integer
# addition before the shift does all of it: find the number `c` (it may depend on the lowest kept
# bit, `(b >> 16) & 1`) for which `(b + c) >> 16` is the rounded result. Work it out on the cases
# `low = 0x7FFF`, `0x8000` and `0x8001`, each with an even and an odd kept part.
#
# A carry out of the mantissa is correct: it moves to the next binade, and past BF16's largest
# value it gives inf. NaN needs care: `0x7F800001` is NaN, but rounding it would give inf. For
# NaN keep `(b >> 16) | 0x0040` (a quiet NaN; sign and top payload bits kept). The result as
# float32 is `upper << 16`, written back into an int32 (`- 2**32` when it is `>= 2**31`) and viewed
# as float32. PyTorch also gives a NaN, but its bits depend on the kernel: with torch 2.13 on an
# AVX2 CPU the vectorized cast writes `0xFFFF` and the scalar one the canonical `0x7FC0`. So the
# checks ask for *a* NaN, and "bit for bit like PyTorch" holds for every number, not for NaNs.
#
# Complete `round_to_bf16` with integer operations. Do not convert anything to `torch.bfloat16`
# (your result is compared with that conversion); viewing bits with `.view` is fine.

# %% solution="ex4_round_to_bf16"
def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 tensor -> float32 tensor of the nearest BF16 values (ties to even, NaN kept)."""
    ### BEGIN SOLUTION
    b = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # unsigned FP32 bits
    lsb = (b >> 16) & 1
    upper = (b + 0x7FFF + lsb) >> 16
    upper = torch.where(torch.isnan(x), (b >> 16) | 0x0040, upper)
    out = (upper & 0xFFFF) << 16
    out = torch.where(out >= 2**31, out - 2**32, out)  # back into the int32 range
    return out.to(torch.int32).view(torch.float32)
    ### END SOLUTION


# %% tests="ex4_round_to_bf16_tests" points=3
from qcore.checks import check_equal, check_true, exercise

with exercise("Exercise 4: round to BF16 by hand"):
    x = torch.tensor([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -(1 + 3 * 2**-8),
                      0.1, 3.0e38, 3.4e38])
    got = round_to_bf16(x)
    check_equal(got.dtype, torch.float32, "returns float32 (holding BF16 values)")
    want = x.to(torch.bfloat16).float()
    check_equal(got[:2], want[:2], "1 + 2**-8 is a tie: it rounds to the even neighbour 1.0",
                hint="ties go to the even kept part: c = 0x7FFF + lsb (adding 0x8000 rounds every tie up)")
    check_equal(got[2], want[2], "1 + 3 * 2**-8 is a tie: it rounds up to the even 1 + 2**-6",
                hint="with an odd kept part the tie rounds up")
    check_equal(got[3], want[3], "just above a tie rounds up",
                hint="round to nearest: truncating (b >> 16) is not enough")
    check_equal(got[4:7], want[4:7], "negative tie, 0.1, and 3e38",
                hint="the bits of a negative float are sign + magnitude: the same rule works")
    check_equal(got[7].item(), math.inf, "3.4e38 is beyond BF16's max (3.3895e38): inf",
                hint="let the carry run into the exponent: it gives inf")
    nan = torch.tensor([0x7F800001, 0x7FC00000], dtype=torch.int32).view(torch.float32)
    check_true(bool(torch.isnan(round_to_bf16(nan)).all()), "NaN stays NaN (also 0x7F800001)",
               hint="for NaN use (b >> 16) | 0x0040: rounding the payload away would give inf")
### BEGIN HIDDEN TESTS
from qcore.asking import NoCastTo, ask

with ask("lab01_precision_formats", "ex4_round_to_bf16_tests", "round_to_bf16",
         forbid=("qcore.formats.round_to_format", "qcore.formats.decompose", "torch.Tensor.bfloat16")) as q, \
        NoCastTo(torch.bfloat16):
    for _prefix in ("", "visible_"):
        _x = torch.from_numpy(q.inputs[_prefix + "x_bits"].view(np.int32)).view(torch.float32)
        q.answer(_prefix + "x", round_to_bf16(_x.clone()))
    _x = torch.from_numpy(q.inputs["x_bits"][:30].view(np.int32)).view(torch.float32)
    q.answer("matrix", round_to_bf16(_x.reshape(5, 6).t()))  # 2-D, not contiguous
### END HIDDEN TESTS

# %% [markdown]
# ## 4. What a model costs
#
# INT8 stores integers and one float scale: 256 codes, evenly spaced, where floats space their
# values by powers of two. A weight tensor maps its range onto the codes with
# `scale = max|w| / 127` (this symmetric grid uses 255 of the 256 codes; lab 2 derives it and says
# why). Most weights sit near zero, so the outer codes see few of them; a single outlier stretches
# the scale and leaves only a few dozen codes for all the other weights.

# %%
from qcore.quant import choose_qparams, dequantize, quantize

gen = torch.Generator().manual_seed(2)
w = torch.randn(200_000, generator=gen) * 0.02  # a layer's weights at initialisation scale
w_outlier = w.clone()
w_outlier[0] = 0.5  # one large weight, 25 standard deviations out
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for ax, weights, title in ((axes[0], w, "weights ~ N(0, 0.02)"),
                           (axes[1], w_outlier, "the same plus one outlier 0.5")):
    qp = choose_qparams(weights, bits=8, symmetric=True)
    codes = quantize(weights, qp).to(torch.int64)
    err = (dequantize(codes, qp) - weights).abs().mean().item()
    counts = torch.bincount(codes + 127, minlength=255)
    ax.bar(np.arange(-127, 128), counts.numpy(), width=1.0)
    ax.set_yscale("log")
    ax.set(xlabel="int8 code", ylabel="weights per code",
           title=f"{title}\nscale {qp.scale.item():.2e}, {int((counts > 0).sum())} of 255 codes used, "
                 f"mean |error| {err:.1e}")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### Exercise 5: memory arithmetic (1 point)
#
# Parameters at `bits` each take `n_params * bits / 8` bytes. Quantized weights also store one
# scale (`scale_bits` wide) per group of `group_size` weights; the last group may be partial:
#
#     bytes = n_params * bits / 8 + ceil(n_params / group_size) * scale_bits / 8
#
# (the second term only when `group_size` is not `None`). Complete `model_bytes`; return a float.

# %% solution="ex5_model_bytes"
def model_bytes(n_params: float, bits: float, group_size: int | None = None, scale_bits: int = 16) -> float:
    """Bytes for n_params parameters of `bits` bits, plus one scale per group when group_size is given."""
    ### BEGIN SOLUTION
    total = n_params * bits / 8
    if group_size is not None:
        total += math.ceil(n_params / group_size) * scale_bits / 8
    return float(total)
    ### END SOLUTION


# %% tests="ex5_model_bytes_tests" points=1
from qcore.checks import check_close, exercise

with exercise("Exercise 5: memory arithmetic"):
    check_close(model_bytes(5e9, 16), 10e9, "5B parameters at 16 bits = 10 GB",
                hint="bits / 8 bytes per parameter")
    check_close(model_bytes(7e9, 32), 28e9, "7B parameters in FP32 = 28 GB (not 280)")
    check_close(model_bytes(7.2e9, 4, group_size=64), 3.825e9, "7.2B at 4 bits + an FP16 scale per 64",
                hint="one scale of scale_bits / 8 bytes for each group of group_size weights")
    check_close(model_bytes(100, 4, group_size=64, scale_bits=32), 58.0,
                "100 weights in groups of 64: 2 scales",
                hint="a partial last group still needs its scale: math.ceil(n_params / group_size)")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab01_precision_formats", "ex5_model_bytes_tests", "model_bytes", forbid=("qcore.formats.memory_bytes",)) as q:
    for _prefix in ("", "visible_"):
        _rows = zip(*(q.inputs[_prefix + _k].tolist() for _k in ("n_params", "bits", "group_size", "scale_bits")))
        q.answer(_prefix + "bytes", np.array([float(model_bytes(_n, _b, group_size=int(_g) or None,
                                                               scale_bits=int(_s))) for _n, _b, _g, _s in _rows]))
### END HIDDEN TESTS

# %% [markdown]
# ### Numbers quoted in tutorials, checked
#
# * "5 billion parameters need about 10 GB at 16 bits": 5e9 × 2 bytes = 10 GB. Correct.
# * "A 7B model would need approximately 280 GB": **wrong, by a factor of ten**. 7e9 × 4 bytes =
#   28 GB in FP32, 14 GB in FP16. Even full fine-tuning with Adam in FP32 (weights, gradients and
#   two moment estimates, 16 bytes per parameter) needs 112 GB before activations, not 280.
# * Mistral 7B v0.3: 29 GB in FP32, 14.5 GB in FP16 (the three shards downloaded), 7.2 GB in INT8,
#   close to 4 GB in 4 bits. The count below gives 7.25 GB with every weight in int8, and 7.52 GB
#   as bitsandbytes stores it (embeddings, head and norms in 16 bits); in 4 bits, 3.85 GB with an
#   FP16 scale per 64 weights, and 4.03 GB as bitsandbytes stores it (scales not counted).
#
# The count of Mistral 7B's parameters follows from its configuration (32 layers, width 4096,
# MLP width 14336, 8 key/value heads of 128, a vocabulary of 32768):

# %%
layers, d, d_ff, d_kv, vocab = 32, 4096, 14336, 8 * 128, 32768
per_layer_linear = d * d + 2 * d * d_kv + d * d + 3 * d * d_ff  # q, k, v, o; gate, up, down
linear = layers * per_layer_linear  # what int8/4-bit quantization replaces
embeddings = 2 * vocab * d  # input embedding and output head, kept in 16 bits by bitsandbytes
norms = (2 * layers + 1) * d  # two RMSNorm weight vectors per layer and a final one
n_params = linear + embeddings + norms
print(f"Mistral 7B: {n_params:,} parameters ({n_params / 1e9:.2f}e9)\n")

GB = 1e9
print(f"{'everything in':38}{'GB':>8}")
for label, bits, group in (("FP32", 32, None), ("FP16 / BF16", 16, None), ("INT8", 8, None),
                           ("4-bit, no scales", 4, None), ("4-bit + FP16 scale per 64 weights", 4, 64)):
    print(f"{label:38}{memory_bytes(n_params, bits, group) / GB:8.2f}")

# %% [markdown]
# One tutorial prints "7168.51 MB" for the INT8 model and "3840.51 MB" for the 4-bit one. Those are
# MiB (2**20 bytes), and they count what bitsandbytes stores as parameters: the linear layers in 8
# or 4 bits, the embeddings, the output head and the norms in 16 bits. The 4-bit scales live
# outside the parameters and are not counted. The same arithmetic gives both numbers:

# %%
MiB = 2**20
rest_16bit = memory_bytes(embeddings + norms, 16)
for label, bits in (("INT8", 8), ("4-bit", 4)):
    total = memory_bytes(linear, bits) + rest_16bit
    print(f"{label:6} linear layers + 16-bit rest: {total / MiB:8.2f} MiB = {total / GB:.2f} GB")

fig, ax = plt.subplots(figsize=(8, 3.5))
labels = ["FP32", "FP16", "INT8", "4-bit+scales"]
sizes = [memory_bytes(n_params, 32), memory_bytes(n_params, 16), memory_bytes(n_params, 8),
         memory_bytes(n_params, 4, group_size=64)]
ax.bar(labels, [s / GB for s in sizes], color=["tab:gray", "tab:blue", "tab:orange", "tab:green"])
for limit, name in ((16, "T4 (16 GB)"), (24, "24 GB consumer GPU")):
    ax.axhline(limit, ls="--", color="k", lw=1)
    ax.text(3.45, limit + 0.5, name, ha="right")
ax.set(ylabel="GB", title="Mistral 7B weights in each format")
plt.show()

# %% [markdown]
# ## 5. Rounding into any format
#
# Exercise 4's trick works because BF16 is FP32 cut in half: same exponent, fewer mantissa bits.
# FP16 and the FP8s have fewer exponent bits too, so a value can fall into their subnormals or
# beyond their largest value, and cutting bits no longer rounds. A rule that works for every
# layout comes from Section 2 instead: around `x` the format's values are evenly spaced, so
# rounding to the format is rounding `x / gap` to an integer.
#
# ### Exercise 6: round to any layout (3 points)
#
# Complete `round_to_format(x, exponent_bits, mantissa_bits, has_inf)`: a float32 tensor in, the
# nearest value of the layout for each element out (as float32), the way torch's casts round:
#
# * to the nearest value; a tie goes to the neighbour whose mantissa field is even;
# * below the smallest normal value onto the subnormal grid, whose gap stops shrinking;
# * a value that rounds past the largest finite value becomes `±inf` when the layout has
#   infinities; without them it saturates to `±max`, as torch 2.13's `float8_e4m3fn` cast does
#   (also for `±inf`);
# * NaN stays NaN, and the sign survives rounding to zero (`-1e-30` gives `-0.0`).
#
# Derive the gap around each `x` from its exponent (Section 2) and clamp it where the subnormals
# begin. Useful tools: `torch.frexp` gives the exponent exactly (`torch.log2` is rounded, and a hair
# below a power of two it can land on the power), `torch.round` rounds ties to even, and float64
# holds every float32 exactly, so scaling by a power of two stays exact there. Your results are
# compared with torch's casts: do not cast to `float16`, `bfloat16` or an FP8 dtype, and do not call
# `qcore.formats.round_to_format`. Reusing your `format_limits` is fine.

# %% solution="ex6_round_to_format"
def round_to_format(x: torch.Tensor, exponent_bits: int, mantissa_bits: int, has_inf: bool = True) -> torch.Tensor:
    """float32 tensor -> float32 tensor of the nearest values of the E/M layout (ties to even)."""
    ### BEGIN SOLUTION
    E, M = exponent_bits, mantissa_bits
    bias = 2 ** (E - 1) - 1
    e_max, m_max = (2**E - 2, 2**M - 1) if has_inf else (2**E - 1, 2**M - 2)
    largest = 2.0 ** (e_max - bias) * (1 + m_max / 2**M)
    xd = x.to(torch.float64)  # exact; x / gap and round(...) * gap below are exact too
    _, e = torch.frexp(xd)  # |x| = f * 2**e with f in [0.5, 1): floor(log2|x|) = e - 1
    gap = torch.pow(2.0, (torch.clamp(e.to(torch.int64) - 1, min=1 - bias) - M).to(torch.float64))
    r = torch.round(xd / gap) * gap  # round half to even
    beyond = math.inf if has_inf else largest
    r = torch.where(r.abs() > largest, torch.copysign(torch.full_like(r, beyond), xd), r)
    return torch.where(torch.isnan(x), x, r.to(torch.float32))
    ### END SOLUTION


# %% tests="ex6_round_to_format_tests" points=3
from qcore.checks import check_equal, check_true, exercise

with exercise("Exercise 6: round to any layout"):
    got = round_to_format(torch.tensor([14.0, 14.9, 15.0, 0.3, 3 / 64, 1 / 32, -1e-3]), 3, 2)
    check_equal(got.dtype, torch.float32, "returns float32")
    check_equal(got[:2].tolist(), [14.0, 14.0], "E3M2 (max 14): 14 and 14.9 round to 14",
                hint="the gap in the top binade [8, 16) is 2**(3 - 2) = 2")
    check_equal(got[2].item(), math.inf, "E3M2: 15 is a tie between 14 (odd mantissa) and 16: 16 is past max, so inf",
                hint="round first (ties to even gives 16), then turn whatever lies past max into inf")
    check_equal(got[3].item(), 0.3125, "E3M2: 0.3 -> 0.3125 (gap 2**-4 in [0.25, 0.5))",
                hint="the gap around x is 2**(floor(log2|x|) - M); torch.frexp gives floor(log2|x|) + 1")
    check_equal(got[4:6].tolist(), [0.0625, 0.0], "E3M2 subnormals: 3/64 -> 1/16 and the tie 1/32 -> 0",
                hint="below min_normal = 2**(1 - bias) the gap stays 2**(1 - bias - M) = 1/16")
    check_true(bool(torch.signbit(got[6])), "-0.001 rounds to -0.0 (the sign is kept)",
               hint="torch.round(-0.016) is -0.0; keep it (torch.where on a sign test can lose it)")
    # Against torch's casts: random float32 bit patterns (every magnitude), values inside the 8- and
    # 16-bit ranges, and the edges (ties, the largest values and what overflows them, subnormals).
    gen = torch.Generator().manual_seed(6)
    random_bits = torch.randint(-(2**31), 2**31, (3000,), generator=gen)
    inner = (torch.randint(0, 2, (3000,), generator=gen) << 31) | (torch.randint(98, 146, (3000,), generator=gen) << 23) \
        | torch.randint(0, 2**23, (3000,), generator=gen)
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.0, 65520.0, 448.0, 464.0,
                          465.0, 480.0, 57344.0, 61440.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11,
                          1 + 3 * 2.0**-11, 1 + 2.0**-8, 3.4e38, 1e-45])
    x = torch.cat([random_bits.to(torch.int32).view(torch.float32), inner.to(torch.int32).view(torch.float32), edges])
    for name, dtype, layout in (("FP16", torch.float16, (5, 10, True)), ("BF16", torch.bfloat16, (8, 7, True)),
                                ("FP8 E4M3", torch.float8_e4m3fn, (4, 3, False)),
                                ("FP8 E5M2", torch.float8_e5m2, (5, 2, True))):
        want, got = x.to(dtype).float(), round_to_format(x, *layout)
        number = ~torch.isnan(want)
        check_equal(torch.isnan(got), ~number, f"{name}: NaN exactly where .to({dtype}) gives NaN")
        check_equal(got[number].view(torch.int32), want[number].view(torch.int32),
                    f"{name}: bit for bit like .to({dtype}) on 6022 values",
                    hint="the first difference says which value: is it a tie, a subnormal, or past max?")
### BEGIN HIDDEN TESTS
from qcore.asking import NoCastTo, ask

with ask("lab01_precision_formats", "ex6_round_to_format_tests", "round_to_format",
         forbid=("qcore.formats.round_to_format", "qcore.formats.decompose", "torch.Tensor.half",
                 "torch.Tensor.bfloat16")) as q, NoCastTo(torch.float16), NoCastTo(torch.bfloat16), \
        NoCastTo(torch.float8_e4m3fn), NoCastTo(torch.float8_e5m2):
    for _prefix in ("", "visible_"):
        for _i, (_E, _M, _inf) in enumerate(q.inputs[_prefix + "layouts"].tolist()):
            _x = torch.from_numpy(q.inputs[_prefix + "x_bits"][_i].view(np.int32)).view(torch.float32)
            q.answer(f"{_prefix}layout{_i}", round_to_format(_x.clone(), int(_E), int(_M), bool(_inf)))
    _x = torch.from_numpy(q.inputs["x_bits"][0, :30].view(np.int32)).view(torch.float32)
    q.answer("matrix", round_to_format(_x.reshape(5, 6).t(), 5, 10, True))  # 2-D, not contiguous
### END HIDDEN TESTS

# %% [markdown]
# ## Summary
#
# * A float is `(-1)**s * 2**(e - bias) * (1.m)`; the exponent bits buy range, the mantissa bits
#   buy precision (relative error at most `2**-(M+1)` in the normal range).
# * FP16 has precision (M = 10) but overflows at 65504. BF16 has FP32's range but only M = 7,
#   so long sums must be accumulated in FP32.
# * FP8 E4M3 gives up infinities to reach 448; E5M2 keeps them and reaches 57344.
# * Rounding to any format is rounding `x / gap` to an integer, with the gap of `x`'s binade (fixed
#   below the smallest normal); what lies past the largest value is the format's (or the cast's) choice.
# * Memory is `n_params * bits / 8`, plus the scales of quantized formats: a 7B model is 28 GB in
#   FP32, 14 GB in 16 bits, 7 GB in INT8 and about 4 GB in 4 bits.
