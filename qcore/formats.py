"""Floating-point formats: their bit layout, rounding into them, and memory arithmetic.

A binary float with ``E`` exponent bits and ``M`` mantissa bits stores a sign ``s``, a
biased exponent field ``e`` and a mantissa field ``m``; with ``bias = 2**(E-1) - 1``::

    normal     (1 <= e < all-ones):  (-1)**s * 2**(e - bias) * (1 + m / 2**M)
    subnormal  (e == 0):             (-1)**s * 2**(1 - bias) * (m / 2**M)
    special    (e == all-ones):      inf if m == 0 else NaN            (IEEE-like, has_inf)

Formats without infinities (``has_inf=False``, the "fn" formats such as torch's
``float8_e4m3fn``) use the all-ones exponent for ordinary numbers too; only the all-ones
exponent with the all-ones mantissa is NaN. Out-of-range values *saturate* to ``±max`` in
such formats: that is what torch 2.13's ``.to(torch.float8_e4m3fn)`` does, even for ``±inf``
(older torch releases produced NaN instead), and :func:`round_to_format` matches it.

Everything is computed from the layout, so any format with ``E <= 8`` and ``M <= 23`` (one that
fits inside float32) works, not only the ones torch ships.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format: 1 sign bit, ``exponent_bits``, ``mantissa_bits``.

    Derived quantities (``bias = 2**(E-1) - 1``): ``bits = 1 + E + M``,
    ``min_normal = 2**(1 - bias)``, ``min_subnormal = 2**(1 - bias - M)``, ``eps = 2**-M``
    (the gap between 1 and the next value) and ``max``, the largest finite value.

    Example:
        >>> FP16.bits, FP16.bias, FP16.max, FP16.eps
        (16, 15, 65504.0, 0.0009765625)
        >>> FP8_E4M3.max, FP8_E5M2.max, FP8_E4M3.min_subnormal == 2**-9
        (448.0, 57344.0, True)
        >>> FP8_E4M3.torch_dtype
        torch.float8_e4m3fn
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    has_inf: bool = True

    def __post_init__(self) -> None:
        # The arithmetic below works on float32 bits, so the format must fit inside float32.
        if not 2 <= self.exponent_bits <= 8 or not 1 <= self.mantissa_bits <= 23:
            raise ValueError(f"need 2 <= exponent_bits <= 8 and 1 <= mantissa_bits <= 23, got "
                             f"E{self.exponent_bits}M{self.mantissa_bits}")

    @property
    def bits(self) -> int:
        """Total storage bits, ``1 + exponent_bits + mantissa_bits``."""
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        """Exponent bias, ``2**(exponent_bits - 1) - 1``."""
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def max(self) -> float:
        """Largest finite value: top exponent and mantissa not taken by inf/NaN."""
        top = 2**self.exponent_bits - 1
        if self.has_inf:  # the all-ones exponent is reserved for inf/NaN
            e, m = top - 1, 2**self.mantissa_bits - 1
        else:  # only the all-ones (exponent, mantissa) pattern is NaN
            e, m = top, 2**self.mantissa_bits - 2
        return math.ldexp(1 + m / 2**self.mantissa_bits, e - self.bias)

    @property
    def min_normal(self) -> float:
        """Smallest positive normal value, ``2**(1 - bias)`` (torch's ``finfo.tiny``)."""
        return math.ldexp(1.0, 1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive (subnormal) value, ``2**(1 - bias - mantissa_bits)``."""
        return math.ldexp(1.0, 1 - self.bias - self.mantissa_bits)

    @property
    def eps(self) -> float:
        """Machine epsilon, ``2**-mantissa_bits``: the spacing just above 1.0."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def torch_dtype(self) -> torch.dtype | None:
        """The torch dtype with this layout, or ``None`` when torch has none."""
        return _TORCH_DTYPES.get((self.exponent_bits, self.mantissa_bits, self.has_inf))


FP32 = FloatFormat("fp32", 8, 23)
FP16 = FloatFormat("fp16", 5, 10)
BF16 = FloatFormat("bf16", 8, 7)
FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, has_inf=False)
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2)

_TORCH_DTYPES = {
    (8, 23, True): torch.float32,
    (5, 10, True): torch.float16,
    (8, 7, True): torch.bfloat16,
    (4, 3, False): torch.float8_e4m3fn,
    (5, 2, True): torch.float8_e5m2,
}


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """Exact ``2.0**k`` in float64 for integer ``k`` in [-1022, 1023], built from the bits.

    Built rather than computed with ``exp2`` so that no library rounding can creep in.
    """
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def round_to_format(t: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round to the nearest value of ``fmt`` (ties to even) and return it as float32.

    With ``k = max(floor(log2|x|), 1 - bias) - M`` the spacing of ``fmt`` around ``x`` is
    ``2**k`` (constant below ``min_normal``, which gives subnormals), so
    ``r = round_half_even(x / 2**k) * 2**k``. Overflow (``|r| > max``) gives ``±inf``, or
    ``±max`` for formats without inf (torch's saturating ``float8_e4m3fn`` cast); NaN passes.

    Args:
        t: any shape, any float dtype (converted to float32 first).
        fmt: the target format.

    Returns:
        float32 tensor, same shape, every element representable in ``fmt``.

    Example:
        >>> round_to_format(torch.tensor([0.1, 1000.0, 70000.0]), FP16).tolist()
        [0.0999755859375, 1000.0, inf]
        >>> round_to_format(torch.tensor([0.1, 17.0, 500.0, float("inf")]), FP8_E4M3).tolist()
        [0.1015625, 16.0, 448.0, 448.0]
    """
    x = t.to(torch.float32)
    # float64 holds every float32 exactly and scaling by powers of two is exact there, so the
    # single torch.round below is the only rounding step (no double rounding).
    xd = x.to(torch.float64)
    _, e = torch.frexp(xd)  # |x| = f * 2**e with f in [0.5, 1), so floor(log2|x|) = e - 1
    k = torch.clamp(e.to(torch.int64) - 1, min=1 - fmt.bias) - fmt.mantissa_bits
    step = _pow2(k)
    r = torch.round(xd / step) * step  # torch.round is round-half-to-even
    limit = math.inf if fmt.has_inf else fmt.max
    r = torch.where(r.abs() > fmt.max, torch.copysign(torch.full_like(r, limit), xd), r)
    return torch.where(torch.isnan(x), x, r.to(torch.float32))


def decompose(x: torch.Tensor, fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bit fields ``(sign, exponent, mantissa)`` of ``x`` after rounding it to ``fmt``.

    ``exponent`` is the biased field (0 for zeros and subnormals, all-ones for inf/NaN) and
    ``mantissa`` the raw field without the hidden bit. NaN keeps the top ``M`` payload bits
    of its float32 mantissa (the quiet bit if none survive; all ones for ``has_inf=False``).

    Args:
        x: any shape, any float dtype.
        fmt: the format whose fields are wanted.

    Returns:
        Three int64 tensors shaped like ``x``.

    Example:
        >>> s, e, m = decompose(torch.tensor([1.0, -2.5, 0.0, 2.0**-24]), FP16)
        >>> s.tolist(), e.tolist(), m.tolist()
        ([0, 1, 0, 0], [15, 16, 0, 0], [0, 256, 0, 1])
    """
    r = round_to_format(x, fmt)
    bits = r.view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # unsigned float32 bit pattern
    sign, e32, m32 = bits >> 31, (bits >> 23) & 0xFF, bits & 0x7FFFFF
    M, top = fmt.mantissa_bits, 2**fmt.exponent_bits - 1
    # Re-bias: a normal float32 value 2**(e32-127) * 1.m32 has fmt exponent field e32-127+bias.
    e_fmt = e32 - 127 + fmt.bias
    normal = (e32 != 0) & (e_fmt >= 1)
    # Otherwise r is a multiple of min_subnormal = 2**(1-bias-M): the field is r / min_subnormal,
    # i.e. the float32 significand (hidden bit restored for float32 normals) shifted right;
    # the shift is exact because r was rounded to fmt first.
    significand = torch.where(e32 == 0, m32, m32 | (1 << 23))
    e_true = torch.where(e32 == 0, torch.full_like(e32, -126), e32 - 127)
    shift = (24 - fmt.bias - M - e_true).clamp(0, 63)
    exponent = torch.where(normal, e_fmt, torch.zeros_like(e_fmt))
    mantissa = torch.where(normal, m32 >> (23 - M), significand >> shift)
    # float32 inf/NaN (round_to_format already saturated inf for formats without it).
    special = e32 == 0xFF
    if fmt.has_inf:
        payload = m32 >> (23 - M)
        nan_mantissa = torch.where(payload == 0, torch.full_like(payload, 1 << (M - 1)), payload)
    else:
        nan_mantissa = torch.full_like(m32, 2**M - 1)
    exponent = torch.where(special, torch.full_like(exponent, top), exponent)
    mantissa = torch.where(special, torch.where(m32 != 0, nan_mantissa, 0), mantissa)
    return sign, exponent, mantissa


def compose(sign: torch.Tensor, exponent: torch.Tensor, mantissa: torch.Tensor,
            fmt: FloatFormat) -> torch.Tensor:
    """The float32 value of the fields ``(sign, exponent, mantissa)`` of ``fmt``.

    Normals: ``(-1)**s * 2**(e - bias) * (1 + m / 2**M)``; subnormals (``e == 0``):
    ``(-1)**s * 2**(1 - bias) * m / 2**M``; all-ones ``e`` gives inf (``m == 0``) or NaN when
    ``fmt.has_inf``, and NaN only for the all-ones ``m`` otherwise. NaN payloads are kept
    (``m`` goes to the top of the float32 mantissa), so ``decompose(compose(...))`` is exact.

    Args:
        sign, exponent, mantissa: integer tensors (or ints) that broadcast together.
        fmt: the format the fields belong to.

    Returns:
        float32 tensor of the broadcast shape.

    Example:
        >>> s, e, m = torch.tensor([0, 1, 0]), torch.tensor([15, 16, 31]), torch.tensor([0, 256, 0])
        >>> compose(s, e, m, FP16)
        tensor([ 1.0000, -2.5000,     inf])
        >>> compose(0, 15, 6, FP8_E4M3), compose(0, 15, 7, FP8_E4M3)
        (tensor(448.), tensor(nan))
    """
    s, e, m = torch.broadcast_tensors(*(torch.as_tensor(v, dtype=torch.int64)
                                        for v in (sign, exponent, mantissa)))
    M, top = fmt.mantissa_bits, 2**fmt.exponent_bits - 1
    for field, v, hi in (("sign", s, 1), ("exponent", e, top), ("mantissa", m, 2**M - 1)):
        if v.numel() and (v.min() < 0 or v.max() > hi):
            raise ValueError(f"{field} field out of range [0, {hi}] for {fmt.name}")
    frac = m.to(torch.float64) / 2**M
    # Products of a power of two and an (M+1)-bit significand: exact in float64 and float32.
    mag = torch.where(e == 0, frac * fmt.min_normal, (1 + frac) * _pow2(e - fmt.bias))
    value = torch.where(s == 1, -mag, mag).to(torch.float32)
    if fmt.has_inf:
        is_inf, is_nan = (e == top) & (m == 0), (e == top) & (m != 0)
        value = torch.where(is_inf, torch.where(s == 1, -math.inf, math.inf), value)
    else:
        is_nan = (e == top) & (m == 2**M - 1)
    # NaN is built from bits, not arithmetic, so that its sign and payload survive.
    nan_bits = (s << 31) | (0xFF << 23) | (m << (23 - M))
    nan_bits = torch.where(nan_bits >= 2**31, nan_bits - 2**32, nan_bits)  # as signed int32
    return torch.where(is_nan, nan_bits.to(torch.int32).view(torch.float32), value)


def memory_bytes(n_params: float, bits: float, group_size: int | None = None,
                 scale_bits: int = 16) -> float:
    """Bytes to store ``n_params`` parameters at ``bits`` each, plus per-group scales.

    ``bytes = n_params * bits / 8 + ceil(n_params / group_size) * scale_bits / 8``, the second
    term only when ``group_size`` is given (one scale per group, the last one may be partial).

    Args:
        n_params: number of parameters (a float such as ``7.2e9`` is fine).
        bits: bits per parameter (32, 16, 8, 4, ... or fractional averages).
        group_size: parameters sharing one scale, or ``None`` for no scales.
        scale_bits: bits per scale (16 for an fp16 scale).

    Example:
        >>> [memory_bytes(7.2e9, b) / 1e9 for b in (32, 16, 8, 4)]
        [28.8, 14.4, 7.2, 3.6]
        >>> memory_bytes(7.2e9, 4, group_size=64) / 1e9  # + one fp16 scale per 64 weights
        3.825
        >>> memory_bytes(7e9, 32) / 1e9, memory_bytes(5e9, 16) / 1e9  # a 7B model is 28 GB, not 280
        (28.0, 10.0)
    """
    if n_params < 0 or bits <= 0:
        raise ValueError(f"need n_params >= 0 and bits > 0, got {n_params}, {bits}")
    total = n_params * bits / 8
    if group_size is not None:
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        total += math.ceil(n_params / group_size) * scale_bits / 8
    return float(total)
