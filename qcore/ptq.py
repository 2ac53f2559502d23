"""Post-training quantization (PTQ): quantized linear layers and embeddings, model conversion and
per-layer sensitivity. Weight ``[out, in]``, input ``x [..., in]``. Calibration (forward hooks)
and SmoothQuant live in ``qcore.smoothquant``.

* ``QuantLinear`` (weight-only, W8A16 / W4A16): int8 codes per output channel, or int4 codes per
  group of ``group_size`` inputs packed two per byte; the forward dequantizes and runs a float
  matmul (equal to the fake-quantized float layer): it saves memory, not arithmetic.
* ``Int8Linear`` (W8A8): int8 weights times int8 activations summed in int32, rescaled to float;
  activation scales per token at run time (dynamic) or fixed by calibration (static).
* ``QuantEmbedding``: int8 rows, one scale per row.

Symmetric grids throughout (``zero_point = 0``, codes ``[-qmax, qmax]``, DESIGN.md).
"""
from __future__ import annotations

import copy
import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qcore.quant import MIN_SCALE, PerChannel, PerGroup, choose_qparams, pack_int4, quantize, unpack_int4
from qcore.smoothquant import smooth_linear

SCHEMES = ("fp32", "w8a16", "w4a16", "w8a8-dynamic", "w8a8-static")


def quantize_weight(weight: torch.Tensor, bits: int = 8, group_size: int | None = None):
    """Symmetric codes and scales of a weight ``[out, in]``, per output channel or per group.

    ``scale = max|w| / qmax`` over each row (``group_size=None``: scale ``[out, 1]``) or over each
    run of ``group_size`` inputs of a row (scale ``[out, in // group_size]``); codes
    ``clamp(round(w / scale), -qmax, qmax)`` as int8, ``qmax = 2**(bits-1) - 1``.

    Example:
        >>> q, s = quantize_weight(torch.tensor([[0.5, -1.0], [2.0, 0.1]]))
        >>> q.tolist(), [round(v * 127, 4) for v in s.flatten().tolist()]
        ([[64, -127], [127, 6]], [1.0, 2.0])
    """
    gran = PerChannel(axis=0) if group_size is None else PerGroup(group_size)
    qp = choose_qparams(weight, bits, symmetric=True, granularity=gran)
    return quantize(weight, qp), qp.scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``codes * scale``; ``scale [out, G]`` covers ``in // G`` consecutive inputs each.

    Example:
        >>> dequantize_weight(torch.tensor([[2, -4, 1, 1]]), torch.tensor([[0.5, 2.0]])).tolist()
        [[1.0, -2.0, 2.0, 2.0]]
    """
    out, n_in = codes.shape
    groups = scale.reshape(out, -1, 1)  # [out, G, 1] against codes viewed [out, G, in // G]
    return (codes.reshape(out, groups.shape[1], -1).to(torch.float32) * groups).reshape(out, n_in)


# Products of int8 codes summed in float32 stay exact integers while the sum has at most this
# many terms: 1040 * 127**2 = 16_774_160 < 2**24.
EXACT_FLOAT32_TERMS = 2**24 // 127**2


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` returns exact int32 sums on this CPU (probed once per process).

    oneDNN's int8 kernels for CPUs without VNNI (AVX2 only, AVX-512 before Cascade Lake) add
    pairs of u8 x s8 products in int16 with saturation (oneDNN, "Nuances of int8 computations"),
    and return sums that are off by thousands; with VNNI or AMX they are exact. The probe is the
    pattern that saturates those kernels for certain: every product ``127 * 127``.
    """
    try:
        for m, k, n in ((1, 64, 8), (33, 1100, 16)):
            a = torch.full((m, k), 127, dtype=torch.int8)
            b = torch.full((k, n), 127, dtype=torch.int8)
            b[:, 1::2] = -127
            if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
                return False
        return True
    except (RuntimeError, NotImplementedError):
        return False


def int8_matmul_by_float32_slices(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 ``a @ b`` from float32 matrix products over slices of ``K <= 1040`` columns.

    Every partial sum of a slice is an integer of size at most ``1040 * 16129 < 2**24``, which
    float32 holds exactly, so each slice is exact in any summation order, on any CPU; the slices
    are added in int32.

    Example:
        >>> a = torch.full((1, 1041), 127, dtype=torch.int8)  # 1041 * 16129 > 2**24, and odd
        >>> int8_matmul_by_float32_slices(a, a.t()).item() == 1041 * 127 * 127
        True
    """
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for k in range(0, a.shape[1], EXACT_FLOAT32_TERMS):  # [M, <=1040] @ [<=1040, N] per slice
        out += (a[:, k:k + EXACT_FLOAT32_TERMS].float() @ b[k:k + EXACT_FLOAT32_TERMS].float()).to(torch.int32)
    return out


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of int8 matrices ``[M, K] @ [K, N]``, accumulated in int32, on every CPU.

    One product reaches ``127**2 = 16129``; a sum of K of them overflows int8 and int16 at
    once, so it is kept in int32 (exact while ``K < 2**31 / 16129``, about 133 000).
    ``torch._int_mm`` (private; oneDNN on the CPU, cuBLASLt on CUDA) computes it where it is exact:
    on CUDA where it accepts the shapes (more than 16 rows, sizes multiples of 8; else the float64
    product, exact below ``2**53``), on a CPU when :func:`int_mm_is_exact` (VNNI or AMX); other
    CPUs get :func:`int8_matmul_by_float32_slices` (exact, slower).

    Example:
        >>> a = torch.full((1, 384), 127, dtype=torch.int8)
        >>> int8_matmul(a, -a.t()).item()   # 384 * 127**2: far beyond int16
        -6193536
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 inputs, got {a.dtype} and {b.dtype}")
    if a.is_cuda or int_mm_is_exact():
        try:
            return torch._int_mm(a, b)
        except (RuntimeError, NotImplementedError):
            pass
    if a.is_cuda:  # float64, not the slices: TF32, when enabled, would round a float32 product
        return (a.double() @ b.double()).to(torch.int32)
    return int8_matmul_by_float32_slices(a, b)


def quantize_per_token(x: torch.Tensor, bits: int = 8):
    """Codes and scales with one symmetric scale per token (row): ``x [T, in] -> scale [T, 1]``.

    Same numbers as ``choose_qparams(x, bits, True, PerChannel(0))`` and ``quantize``.

    Example:
        >>> q, s = quantize_per_token(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
        >>> q.tolist(), round(s[0].item() * 127, 4), s[1].item() == MIN_SCALE
        ([[127, -64], [0, 0]], 1.0, True)
    """
    qmax = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=MIN_SCALE)
    return torch.round(x / scale).clamp_(-qmax, qmax).to(torch.int8), scale


def int8_linear(qx: torch.Tensor, sx, qw: torch.Tensor, sw: torch.Tensor, bias=None) -> torch.Tensor:
    """``(qx @ qw.T)`` summed in int32, rescaled: ``* sx * sw.T + bias`` (float32 ``[T, out]``).

    Args:
        qx: int8 ``[T, in]``; sx: its scale ``[T, 1]`` (per token) or a 0-d tensor (per tensor).
        qw: int8 ``[out, in]``; sw: its scale ``[out, 1]``; bias: ``[out]`` or None.

    Example:
        >>> qx = torch.tensor([[100, -100]], dtype=torch.int8)
        >>> qw = torch.tensor([[127, 127], [127, -127]], dtype=torch.int8)
        >>> int8_linear(qx, torch.tensor([[0.5]]), qw, torch.tensor([[1.0], [0.01]]), torch.tensor([1.0, 0.0])).tolist()
        [[1.0, 127.0]]
    """
    y = int8_matmul(qx, qw.t()).to(torch.float32).mul_(sx).mul_(sw.reshape(1, -1))
    return y if bias is None else y.add_(bias)


class QuantLinear(nn.Module):
    """Weight-only quantized ``nn.Linear``: W8A16 (per channel) or W4A16 (per group, packed).

    Buffers: ``qweight`` (int8 ``[out, in]``; 4 bits: uint8 ``[out * in / 2]``, codes + 8 packed
    by ``pack_int4``), ``scale`` (float32 ``[out, 1]`` or ``[out, in // group_size]``), ``bias``.

    Example:
        >>> lin = torch.nn.Linear(256, 4); x = torch.randn(3, 256)
        >>> q = QuantLinear(lin, bits=4, group_size=128)
        >>> w_hat = dequantize_weight(*quantize_weight(lin.weight, 4, 128))
        >>> q.qweight.shape, torch.equal(q(x), F.linear(x, w_hat, lin.bias))
        (torch.Size([512]), True)
    """

    def __init__(self, linear: nn.Linear, bits: int = 8, group_size: int | None = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear supports 4 or 8 bits, got {bits}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        codes, scale = quantize_weight(linear.weight.detach(), bits, group_size)
        self.register_buffer("qweight", codes if bits == 8 else pack_int4(codes.to(torch.int16) + 8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def codes(self) -> torch.Tensor:
        """The int8 codes ``[out, in]`` (unpacked for 4 bits)."""
        shape = (self.out_features, self.in_features)
        return self.qweight if self.bits == 8 else unpack_int4(self.qweight, shape).to(torch.int8) - 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_weight(self.codes(), self.scale).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}"


class Int8Linear(nn.Module):
    """W8A8 ``nn.Linear``: int8 weights per channel, int8 activations, int32 accumulation.

    ``y = int8_linear(q_x, s_x, q_w, s_w, bias)`` with ``q_x, s_x`` per token
    (dynamic, ``input_scale=None``) or ``s_x = input_scale`` fixed (static; inputs beyond the
    calibrated range saturate at +-127). With ``smooth`` (``[in]``) the input is divided by it
    first and the weight must already carry the factor (``qcore.smoothquant.smooth_linear``).

    Example:
        >>> lin = torch.nn.Linear(8, 3); x = torch.randn(5, 8)
        >>> fq_x = dequantize_weight(*quantize_per_token(x))      # per-token fake quantization
        >>> fq_w = dequantize_weight(*quantize_weight(lin.weight))
        >>> torch.allclose(Int8Linear(lin)(x), F.linear(fq_x, fq_w, lin.bias), atol=1e-6)
        True
    """

    def __init__(self, linear: nn.Linear, input_scale: torch.Tensor | float | None = None,
                 smooth: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, scale = quantize_weight(linear.weight.detach(), 8)
        self.register_buffer("qweight", codes)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.register_buffer("input_scale", None if input_scale is None
                             else torch.as_tensor(input_scale, dtype=torch.float32).clamp(min=MIN_SCALE))
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self.smooth is not None:
            x2 = x2 / self.smooth
        if self.input_scale is None:
            qx, sx = quantize_per_token(x2)
        else:
            sx = self.input_scale
            qx = torch.round(x2 / sx).clamp_(-127, 127).to(torch.int8)
        y = int8_linear(qx, sx, self.qweight, self.weight_scale, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.input_scale is None else "static"
        return f"{self.in_features}, {self.out_features}, {mode}, smooth={self.smooth is not None}"


class QuantEmbedding(nn.Module):
    """int8 ``nn.Embedding``: one symmetric scale per row; a lookup dequantizes only its rows.

    Example:
        >>> emb = torch.nn.Embedding(10, 4); ids = torch.tensor([[1, 7]])
        >>> w_hat = dequantize_weight(*quantize_weight(emb.weight))
        >>> torch.equal(QuantEmbedding(emb)(ids), F.embedding(ids, w_hat))
        True
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        codes, scale = quantize_weight(embedding.weight.detach(), 8)
        self.register_buffer("qweight", codes)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(torch.float32) * self.scale[ids]


def quantize_linear(linear: nn.Linear, scheme: str, input_scale=None, smooth=None,
                    group_size: int = 128) -> nn.Module:
    """The quantized replacement of one ``nn.Linear`` for a scheme of ``SCHEMES``.

    Example:
        >>> quantize_linear(torch.nn.Linear(256, 2), "w4a16")
        QuantLinear(256, 2, bits=4, group_size=128)
    """
    if scheme == "fp32":
        return linear
    if scheme in ("w8a16", "w4a16"):
        return QuantLinear(linear, 8, None) if scheme == "w8a16" else QuantLinear(linear, 4, group_size)
    if scheme not in ("w8a8-dynamic", "w8a8-static"):
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if scheme == "w8a8-static" and input_scale is None:
        raise ValueError("w8a8-static needs an input_scale from calibration")
    if smooth is not None:  # column j times s_j; Int8Linear divides its input by s
        linear = copy.deepcopy(linear)
        smooth_linear(linear, smooth)
    return Int8Linear(linear, input_scale if scheme == "w8a8-static" else None, smooth)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``model``, in module order.

    Example:
        >>> linear_names(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)))
        ['0', '2']
    """
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_model(model: nn.Module, scheme: str = "w8a16", schemes: dict[str, str] | None = None,
                   input_scales: dict | None = None, smooth: dict | None = None,
                   embeddings: bool = False, group_size: int = 128) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` quantized by ``scheme``.

    ``schemes`` overrides the scheme of named layers (mixed precision); ``input_scales`` and
    ``smooth`` map layer names to static input scales and SmoothQuant factors; ``embeddings``
    also stores every ``nn.Embedding`` in int8. The original model is left untouched.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> q = quantize_model(m, "w8a8-dynamic", schemes={"1": "fp32"})
        >>> [type(layer).__name__ for layer in q]
        ['Int8Linear', 'Linear']
    """
    out = copy.deepcopy(model)
    schemes, input_scales, smooth = schemes or {}, input_scales or {}, smooth or {}
    for name in linear_names(out):
        layer = quantize_linear(out.get_submodule(name), schemes.get(name, scheme), input_scales.get(name),
                                smooth.get(name), group_size)
        out.set_submodule(name, layer)
    if embeddings:
        for name in [n for n, m in out.named_modules() if isinstance(m, nn.Embedding)]:
            out.set_submodule(name, QuantEmbedding(out.get_submodule(name)))
    return out


def layer_sensitivity(model: nn.Module, names: list[str], make_quantized: Callable[[nn.Module], nn.Module],
                      damage: Callable[[nn.Module], float]) -> dict[str, float]:
    """``{name: damage(model with only that layer quantized)}``; every layer is put back after.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)); x = torch.randn(4, 2)
        >>> ref = m(x).detach()
        >>> s = layer_sensitivity(m, ["0", "1"], lambda lin: QuantLinear(lin, 4, 2),
        ...                       lambda mod: (mod(x) - ref).abs().max().item())
        >>> sorted(s) == ["0", "1"] and min(s.values()) > 0, type(m[0]).__name__
        (True, 'Linear')
    """
    out = {}
    for name in names:
        original = model.get_submodule(name)
        model.set_submodule(name, make_quantized(original))
        try:
            out[name] = float(damage(model))
        finally:
            model.set_submodule(name, original)
    return out


def most_sensitive(sensitivity: dict[str, float], k: int) -> list[str]:
    """The ``k`` names with the largest damage, largest first (ties: the earlier name first).

    Example:
        >>> most_sensitive({"a": 0.1, "b": 0.5, "c": 0.3}, 2)
        ['b', 'c']
    """
    return sorted(sensitivity, key=lambda n: -sensitivity[n])[:k]


def logit_damage(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL divergence ``KL(softmax(reference) || softmax(logits))`` over rows, in nats.

    Example:
        >>> logit_damage(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        0.0
    """
    p_log, q_log = F.log_softmax(reference.double(), -1), F.log_softmax(logits.double(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).mean().clamp(min=0).item()
