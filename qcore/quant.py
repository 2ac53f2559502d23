"""Affine (linear) quantization: quantization parameters, quantize, dequantize, fake quantize.

The whole module follows one pair of formulas (DESIGN.md)::

    q     = clamp(round(x / scale) + zero_point, qmin, qmax)     # round half to even
    x_hat = (q - zero_point) * scale

Two grids are used throughout the course:

* asymmetric (affine): unsigned codes ``[0, 2**bits - 1]``; the range is widened to
  contain 0 so that 0.0 is represented exactly (zero padding, ReLU outputs);
* symmetric: signed *restricted* codes ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` with
  ``zero_point = 0`` and ``scale = max|x| / qmax`` (the absmax convention of LLM.int8 and
  QLoRA). The full signed grid would reach -128 for int8 but +127 only, so ``-max|x|`` and
  ``+max|x|`` would not map to mirror images; the restricted grid gives that code up.

Granularity decides which elements share one (scale, zero_point): ``PerTensor()``,
``PerChannel(axis)`` or ``PerGroup(group_size)``. Packing codes into bytes is ``qcore.packing``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Smallest scale ever used: a constant or all-zero tensor still gets a finite, positive scale
# (the same floor as torch's observers, so the two agree on degenerate input).
MIN_SCALE = torch.finfo(torch.float32).eps


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid ``(qmin, qmax)`` for ``bits`` on a symmetric or asymmetric grid.

    Example:
        >>> qrange(8, symmetric=False), qrange(8, symmetric=True), qrange(4, symmetric=True)
        ((0, 255), (-127, 127), (-7, 7))
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be between 2 and 16, got {bits}")
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


# ----------------------------------------------------------------------------- granularity
@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor: ``[out, in] -> scale []`` (a 0-d tensor).

    Example:
        >>> choose_qparams(torch.randn(4, 8), granularity=PerTensor()).scale.shape
        torch.Size([])
    """

    def group(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.amin(), x.amax()

    def expand(self, p: torch.Tensor) -> torch.Tensor:
        return p


@dataclass(frozen=True)
class PerChannel:
    """One scale per slice along ``axis``: ``[out, in]`` with ``axis=0`` -> scale ``[out, 1]``.

    The scale keeps every dimension (size 1 except ``axis``) so that it broadcasts against x.

    Example:
        >>> choose_qparams(torch.randn(4, 8), granularity=PerChannel(axis=0)).scale.shape
        torch.Size([4, 1])
    """

    axis: int = 0

    def group(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axis = self.axis % x.ndim
        dims = [d for d in range(x.ndim) if d != axis]
        if not dims:  # a 1-D tensor: every element is its own channel
            return x.clone(), x.clone()
        return x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)

    def expand(self, p: torch.Tensor) -> torch.Tensor:
        return p


@dataclass(frozen=True)
class PerGroup:
    """One scale per run of ``group_size`` consecutive elements of the last dimension.

    ``[out, in] -> scale [out, in // group_size]``; ``in`` must be a multiple of
    ``group_size``.

    Example:
        >>> choose_qparams(torch.randn(4, 128), granularity=PerGroup(group_size=64)).scale.shape
        torch.Size([4, 2])
    """

    group_size: int = 64

    def group(self, x: torch.Tensor) -> torch.Tensor:
        """View ``[..., in]`` as ``[..., in // group_size, group_size]``."""
        if x.ndim == 0 or x.shape[-1] % self.group_size:
            raise ValueError(
                f"PerGroup(group_size={self.group_size}) needs a last dimension that is a "
                f"multiple of {self.group_size}; got shape {tuple(x.shape)}"
            )
        return x.unflatten(-1, (-1, self.group_size))

    def reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.group(x)
        return g.amin(dim=-1), g.amax(dim=-1)

    def expand(self, p: torch.Tensor) -> torch.Tensor:
        return p.unsqueeze(-1)  # [..., G] -> [..., G, 1] against the grouped view


Granularity = PerTensor | PerChannel | PerGroup


# ----------------------------------------------------------------------------- qparams
@dataclass(frozen=True)
class QParams:
    """Quantization parameters: ``scale`` (float32) and ``zero_point`` (int32) of equal shape.

    Their shape follows ``granularity`` (see PerTensor, PerChannel, PerGroup).

    Example:
        >>> qp = QParams(torch.tensor(0.5), torch.tensor(3, dtype=torch.int32), bits=4)
        >>> qp.qmin, qp.qmax, quantize(torch.tensor([1.0]), qp).tolist()
        (0, 15, [5])
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int = 8
    symmetric: bool = False
    granularity: Granularity = PerTensor()

    @property
    def qmin(self) -> int:
        return qrange(self.bits, self.symmetric)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits, self.symmetric)[1]


def qparams_from_range(xmin, xmax, bits: int = 8, symmetric: bool = False,
                       granularity: Granularity = PerTensor()) -> QParams:
    """Scale and zero-point that map the range ``[xmin, xmax]`` onto the integer grid.

    Asymmetric: the range is widened to contain 0, then
    ``scale = (xmax - xmin) / (qmax - qmin)`` and
    ``zero_point = clamp(qmin - round(xmin / scale), qmin, qmax)``.
    Symmetric: ``scale = max(|xmin|, |xmax|) / qmax`` and ``zero_point = 0``.
    A zero-width range gives ``scale = MIN_SCALE``, never NaN.

    Args:
        xmin, xmax: floats or tensors of one shape (one range per scale).

    Example (the seeds' worked examples, 8 bits):
        >>> qp = qparams_from_range(0.0, 1000.0, bits=8)
        >>> round(qp.scale.item(), 2), qp.zero_point.item()
        (3.92, 0)
        >>> qp = qparams_from_range(-20.0, 1000.0, bits=8)
        >>> qp.scale.item(), qp.zero_point.item()
        (4.0, 5)
    """
    qmin, qmax = qrange(bits, symmetric)
    xmin = torch.as_tensor(xmin, dtype=torch.float32)
    xmax = torch.as_tensor(xmax, dtype=torch.float32)
    if bool((xmin > xmax).any()):
        raise ValueError("xmin must not exceed xmax")
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    if symmetric:
        scale = torch.maximum(-xmin, xmax) / qmax
        scale = torch.clamp(scale, min=MIN_SCALE)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (xmax - xmin) / (qmax - qmin)
        scale = torch.clamp(scale, min=MIN_SCALE)
        zero_point = torch.clamp(qmin - torch.round(xmin / scale), qmin, qmax).to(torch.int32)
    return QParams(scale, zero_point, bits, symmetric, granularity)


def choose_qparams(x: torch.Tensor, bits: int = 8, symmetric: bool = False,
                   granularity: Granularity = PerTensor()) -> QParams:
    """Min-max quantization parameters of ``x`` at the given granularity.

    Example:
        >>> w = torch.tensor([[-1.0, 0.5], [0.2, 4.0]])
        >>> qp = choose_qparams(w, bits=8, symmetric=True, granularity=PerChannel(axis=0))
        >>> qp.scale.shape, [round(s, 5) for s in qp.scale.flatten().tolist()]
        (torch.Size([2, 1]), [0.00787, 0.0315])
    """
    xmin, xmax = granularity.reduce(x.detach().float())
    return qparams_from_range(xmin, xmax, bits, symmetric, granularity)


# ----------------------------------------------------------------------------- (de)quantize
def _code_dtype(bits: int, symmetric: bool) -> torch.dtype:
    if bits <= 8:
        return torch.int8 if symmetric else torch.uint8
    return torch.int32


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)``.

    Returns int8 (symmetric) or uint8 (asymmetric) codes for up to 8 bits, int32 above.

    Example:
        >>> qp = qparams_from_range(0.0, 1000.0, bits=8)
        >>> quantize(torch.tensor([0.0, 250.0, 1000.0, 2000.0]), qp).tolist()
        [0, 64, 255, 255]
    """
    gran = qp.granularity
    xg = gran.group(x.detach().float())
    q = torch.round(xg / gran.expand(qp.scale)) + gran.expand(qp.zero_point)
    q = torch.clamp(q, qp.qmin, qp.qmax)
    return q.reshape(x.shape).to(_code_dtype(qp.bits, qp.symmetric))


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Float32 values ``(q - zero_point) * scale``.

    Example:
        >>> qp = qparams_from_range(-20.0, 1000.0, bits=8)
        >>> dequantize(torch.tensor([0, 5, 255], dtype=torch.uint8), qp).tolist()
        [-20.0, 0.0, 1000.0]
    """
    gran = qp.granularity
    qg = gran.group(q.to(torch.float32))
    x_hat = (qg - gran.expand(qp.zero_point)) * gran.expand(qp.scale)
    return x_hat.reshape(q.shape)


class FakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize forward; straight-through backward, zeroed outside the clamp range.

    ``apply(x, scale, zero_point, qmin, qmax)`` with ``scale`` and a float ``zero_point`` that
    broadcast against ``x``; use ``fake_quantize_ste`` (tensors) or ``fake_quantize`` (QParams).
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        q = torch.round(x / scale).add_(zero_point)
        inside = (q >= qmin) & (q <= qmax)  # where the clamp did not bite
        ctx.save_for_backward(inside)
        return q.clamp_(qmin, qmax).sub_(zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside, None, None, None, None


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``dequantize(quantize(x))`` in float, differentiable with a straight-through estimator.

    The gradient with respect to ``x`` is 1 where ``round(x / scale) + zero_point`` lies in
    ``[qmin, qmax]`` and 0 where the clamp bites (as ``torch.fake_quantize_per_tensor_affine``).

    Example:
        >>> qp = qparams_from_range(-1.0, 1.0, bits=8, symmetric=True)
        >>> x = torch.tensor([0.5, 3.0], requires_grad=True)
        >>> y = fake_quantize(x, qp); y.sum().backward()
        >>> [round(v, 4) for v in y.tolist()], x.grad.tolist()
        ([0.5039, 1.0], [1.0, 0.0])
    """
    gran = qp.granularity
    xg = gran.group(x.float())
    zp = gran.expand(qp.zero_point).to(torch.float32)
    y = FakeQuantizeSTE.apply(xg, gran.expand(qp.scale), zp, qp.qmin, qp.qmax)
    return y.reshape(x.shape)


def fake_quantize_ste(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``, STE backward.

    The tensor form of ``fake_quantize``: ``scale`` and ``zero_point`` broadcast against ``x``
    (0-d per tensor, ``[out, 1]`` per output channel of ``[out, in]``); the result has ``x``'s
    dtype. The gradient w.r.t. ``x`` is 1 where the code lies in ``[qmin, qmax]`` before
    clamping, else 0; scale and zero-point get none.

    Example:
        >>> x = torch.tensor([-0.8, 0.26, 2.0], requires_grad=True)
        >>> y = fake_quantize_ste(x, torch.tensor(0.5), torch.tensor(0.0), -2, 2)
        >>> y.sum().backward(); y.tolist(), x.grad.tolist()
        ([-1.0, 0.5, 1.0], [1.0, 1.0, 0.0])
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=x.device)
    return FakeQuantizeSTE.apply(x.float(), scale, zero_point, qmin, qmax).to(x.dtype)


# ----------------------------------------------------------------------------- error
def mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error ``mean((x - x_hat)**2)``.

    Example:
        >>> mse(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]))
        0.5
    """
    return torch.mean((x.double() - x_hat.double()) ** 2).item()


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum x**2 / sum (x - x_hat)**2)`` in dB.

    Infinite when ``x_hat == x``. Each extra bit buys about 6.02 dB on a uniform signal.

    Example:
        >>> round(sqnr_db(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0])), 2)
        13.98
    """
    signal = torch.sum(x.double() ** 2)
    noise = torch.sum((x.double() - x_hat.double()) ** 2)
    if noise == 0:
        return float("inf")
    return (10 * torch.log10(signal / noise)).item()
