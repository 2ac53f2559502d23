"""Quantized modules with one buffer vocabulary: what a quantized model is made of.

Every layer stores integer codes and the numbers that turn them back into values, under the names
of ``qcore.quant``: ``qweight`` (codes, packed below 8 bits), ``scale`` (per output channel
``[out, 1]`` or per group ``[out, in // group_size]``; symmetric, so no weight zero-point) and,
where the input is quantized with frozen parameters, ``input_scale`` and ``input_zero_point``.
NF4 keeps its own names (``packed``, ``absmax``: the per-block symmetric scale).

* ``QuantLinear``: weight-only (W8A16, W4A16, any 2-8 bits); the forward dequantizes and runs a
  float matmul. With frozen input qparams it also fake-quantizes its input: what QAT converts to.
* ``Int8Linear``: W8A8 in integer arithmetic (``qcore.int8``), input scales per token at run time
  (dynamic) or fixed by calibration (static, symmetric or with a zero-point), optionally
  SmoothQuant-scaled.
* ``QuantEmbedding``: int8 rows, one scale per row.
* ``NF4Linear``: the frozen 4-bit NormalFloat base of QLoRA (``qcore.nf4``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcore.int8 import int8_linear, quantize_per_token
from qcore.nf4 import NF4State, dequantize_nf4, quantize_nf4
from qcore.packing import pack, unpack
from qcore.quant import (MIN_SCALE, PerChannel, PerGroup, QParams, choose_qparams, dequantize, fake_quantize_ste,
                         qrange, quantize)


def quantize_weight(weight: torch.Tensor, bits: int = 8, group_size: int | None = None, symmetric: bool = True):
    """Codes and qparams of a weight ``[out, in]``, per output channel or per group (round-to-nearest).

    ``scale = max|w| / qmax`` over each row (scale ``[out, 1]``) or each run of ``group_size``
    inputs (scale ``[out, in // group_size]``); codes ``clamp(round(w / scale), -qmax, qmax)``.
    With ``symmetric=False`` the same slices get the min-max affine grid of ``qcore.quant``
    (uint8 codes and a zero-point; ``QuantLinear`` stores the symmetric grid only).

    Example:
        >>> q, qp = quantize_weight(torch.tensor([[0.5, -1.0], [2.0, 0.1]]))
        >>> q.tolist(), [round(v * 127, 4) for v in qp.scale.flatten().tolist()]
        ([[64, -127], [127, 6]], [1.0, 2.0])
    """
    gran = PerChannel(axis=0) if group_size is None else PerGroup(group_size)
    qp = choose_qparams(weight, bits, symmetric=symmetric, granularity=gran)
    return quantize(weight, qp), qp


def _packed_bits(bits: int) -> int | None:
    """Sub-byte codes are packed 2 or 4 bits wide (3 bits go into 4); 5-8 bits stay int8."""
    return 2 if bits <= 2 else 4 if bits <= 4 else None


class QuantLinear(nn.Module):
    """Weight-only quantized ``nn.Linear``; optionally with a frozen, fake-quantized input.

    Buffers: ``qweight`` (int8 ``[out, in]``; at 2-4 bits the codes shifted by ``2**(bits-1)``
    and packed, uint8), ``scale`` (``[out, 1]`` or ``[out, in // group_size]``), ``bias``, and
    ``input_scale``/``input_zero_point`` (0-d; asymmetric ``input_bits`` grid) or None.

    Example:
        >>> lin = torch.nn.Linear(256, 4); x = torch.randn(3, 256)
        >>> q = QuantLinear.from_linear(lin, bits=4, group_size=128)
        >>> codes, qp = quantize_weight(lin.weight, 4, 128)
        >>> q.qweight.shape, torch.equal(q(x), F.linear(x, dequantize(codes, qp), lin.bias))
        (torch.Size([512]), True)
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                 bits: int = 8, group_size: int | None = None, input_scale=None, input_zero_point=None,
                 input_bits: int = 8):
        super().__init__()
        if not 2 <= bits <= 8:
            raise ValueError(f"QuantLinear stores 2 to 8 bits, got {bits}")
        self.out_features, self.in_features = codes.shape
        self.bits, self.group_size, self.input_bits = bits, group_size, input_bits
        width = _packed_bits(bits)
        codes = codes.to(torch.int8)
        self.register_buffer("qweight", codes if width is None else pack(codes.to(torch.int16) + 2 ** (bits - 1), width))
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("input_scale", None if input_scale is None
                             else torch.as_tensor(input_scale, dtype=torch.float32).detach().clone())
        self.register_buffer("input_zero_point", None if input_zero_point is None
                             else torch.as_tensor(input_zero_point).to(torch.int32).detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int | None = None) -> "QuantLinear":
        codes, qp = quantize_weight(linear.weight, bits, group_size)
        return cls(codes, qp.scale, linear.bias, bits=bits, group_size=group_size)

    def qparams(self) -> QParams:
        gran = PerChannel(axis=0) if self.group_size is None else PerGroup(self.group_size)
        return QParams(self.scale, torch.zeros_like(self.scale, dtype=torch.int32), self.bits, True, gran)

    def codes(self) -> torch.Tensor:
        """The int8 codes ``[out, in]`` (unpacked below 8 bits)."""
        width = _packed_bits(self.bits)
        if width is None:
            return self.qweight
        shape = (self.out_features, self.in_features)
        return (unpack(self.qweight, width, shape).to(torch.int16) - 2 ** (self.bits - 1)).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = fake_quantize_ste(x, self.input_scale, self.input_zero_point, *qrange(self.input_bits, False))
        w = dequantize(self.codes(), self.qparams()).to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        act = "" if self.input_scale is None else f", input_bits={self.input_bits}"
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}{act}"


class Int8Linear(nn.Module):
    """W8A8 ``nn.Linear``: int8 weights per channel, int8 activations, int32 accumulation.

    ``y = int8_linear(q_x, s_x, qweight, scale, bias)`` with ``q_x, s_x`` per token (dynamic,
    ``input_scale=None``) or ``s_x = input_scale`` fixed (static; inputs beyond the calibrated
    range saturate at +-127). With ``input_zero_point`` too, the static input is asymmetric: uint8
    codes ``clamp(round(x / s_x) + z_x, 0, 255)``, the computation of
    ``qcore.int8.asymmetric_int8_linear``, run as a fast kernel would: the codes go to the int8
    product shifted by 128, and the constant ``(128 - z_x) * sum_i q_w[o, i] * s_x * s_w[o]`` is
    folded into the bias once (buffer ``zero_point_bias``). With
    ``smooth`` (``[in]``) the input is divided by it first and the weight must already carry the
    factor (``qcore.smoothquant.smooth_linear``).

    Example:
        >>> lin = torch.nn.Linear(8, 3); x = torch.randn(5, 8)
        >>> fq_x = dequantize(*quantize_weight(x))      # per-token (per-row) fake quantization
        >>> fq_w = dequantize(*quantize_weight(lin.weight))
        >>> torch.allclose(Int8Linear(lin)(x), F.linear(fq_x, fq_w, lin.bias), atol=1e-6)
        True
    """

    def __init__(self, linear: nn.Linear, input_scale: torch.Tensor | float | None = None,
                 smooth: torch.Tensor | None = None, input_zero_point: torch.Tensor | int | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        codes, qp = quantize_weight(linear.weight.detach(), 8)
        self.register_buffer("qweight", codes)
        self.register_buffer("scale", qp.scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.register_buffer("input_scale", None if input_scale is None
                             else torch.as_tensor(input_scale, dtype=torch.float32).clamp(min=MIN_SCALE))
        if input_zero_point is not None and input_scale is None:
            raise ValueError("an input_zero_point needs a static input_scale")
        self.register_buffer("input_zero_point", None if input_zero_point is None
                             else torch.as_tensor(input_zero_point).to(torch.int32).clone())
        self.register_buffer("zero_point_bias", None)
        if input_zero_point is not None:  # [out]: the bias plus the zero-point's constant, float64 then float32
            row_sums = self.qweight.to(torch.float64).sum(dim=1)
            const = (128 - self.input_zero_point.double()) * row_sums * self.input_scale.double() * self.scale.double().flatten()
            self.zero_point_bias = (const + (0.0 if self.bias is None else self.bias.double())).float()
        self.register_buffer("smooth", None if smooth is None else smooth.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self.smooth is not None:
            x2 = x2 / self.smooth
        if self.input_zero_point is not None:  # uint8 codes q, as q - 128 on [-128, 127]
            qx = (torch.round(x2 / self.input_scale) + (self.input_zero_point - 128)).clamp_(-128, 127).to(torch.int8)
            y = int8_linear(qx, self.input_scale, self.qweight, self.scale, self.zero_point_bias)
            return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        if self.input_scale is None:
            qx, sx = quantize_per_token(x2)
        else:
            sx = self.input_scale
            qmin, qmax = qrange(8, symmetric=True)
            qx = torch.round(x2 / sx).clamp_(qmin, qmax).to(torch.int8)
        y = int8_linear(qx, sx, self.qweight, self.scale, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        mode = ("dynamic" if self.input_scale is None else "static" if self.input_zero_point is None
                else "static asymmetric")
        return f"{self.in_features}, {self.out_features}, {mode}, smooth={self.smooth is not None}"


class QuantEmbedding(nn.Module):
    """int8 ``nn.Embedding``: one symmetric scale per row; a lookup dequantizes only its rows.

    Example:
        >>> emb = torch.nn.Embedding(10, 4); ids = torch.tensor([[1, 7]])
        >>> torch.equal(QuantEmbedding(emb)(ids), F.embedding(ids, dequantize(*quantize_weight(emb.weight))))
        True
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        codes, qp = quantize_weight(embedding.weight.detach(), 8)
        self.register_buffer("qweight", codes)
        self.register_buffer("scale", qp.scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(torch.float32) * self.scale[ids]


class _NF4Matmul(torch.autograd.Function):
    """``x @ dequantize(W).T``, with ``W`` dequantized again in the backward instead of saved."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.weight_hat(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        # d(x @ W.T)/dx = grad_out @ W; the frozen W gets no gradient.
        return grad_out @ ctx.layer.weight_hat(grad_out.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as block-wise NF4 codes (``qcore.nf4``).

    Buffers: ``packed`` uint8 ``[ceil(out * in / 2)]``, the per-block absmax (float32, or 8-bit
    codes with their scales and offset when ``double_quant``) and the bias (if any). Nothing is
    trainable. The weight is dequantized in the forward *and again in the backward*, so no
    dequantized weight stays alive between the two: QLoRA's memory saving in training.

    Example:
        >>> lin = nn.Linear(64, 8)
        >>> q = NF4Linear.from_linear(lin, block_size=64, double_quant=True)
        >>> q.packed.dtype, q.packed.numel(), sum(p.numel() for p in q.parameters())
        (torch.uint8, 256, 0)
        >>> (q(torch.randn(2, 64)) - lin(torch.randn(2, 64))).shape
        torch.Size([2, 8])
    """

    def __init__(self, packed: torch.Tensor, state: NF4State, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = state.shape
        self.block_size, self.dtype = state.block_size, state.dtype
        self.register_buffer("packed", packed)
        for name in ("absmax", "absmax_codes", "absmax_scale", "absmax_offset"):
            self.register_buffer(name, getattr(state, name))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        packed, state = quantize_nf4(linear.weight.detach(), block_size, double_quant)
        return cls(packed, state, linear.bias)

    @property
    def state(self) -> NF4State:
        return NF4State(torch.Size((self.out_features, self.in_features)), self.dtype, self.block_size,
                        self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)

    def weight_hat(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight ``[out, in]`` (in ``dtype``, default the original one)."""
        return dequantize_nf4(self.packed, self.state, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain frozen ``nn.Linear`` with the dequantized weight."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.packed.device, dtype=self.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight_hat())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin.requires_grad_(False)

    def extra_repr(self) -> str:
        dq = self.absmax is None
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"block_size={self.block_size}, double_quant={dq}"
