"""Quantization-aware training (QAT): train with the quantization error in the forward pass.

* ``fake_quantize_ste``: quantize-dequantize ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``;
  its backward is the straight-through estimator (STE): the gradient passes unchanged where the
  clamp did not bite and is 0 where it did (as ``torch.fake_quantize_per_tensor_affine`` and
  ``torch.fake_quantize_per_channel_affine``).
* ``FakeQuantLinear``: an ``nn.Linear`` whose weight is fake-quantized per output channel
  (symmetric, ``scale [out, 1]``) and whose input is fake-quantized per tensor (asymmetric,
  unsigned codes) with a moving-average (EMA) min/max observer that can be frozen.
* LSQ (Esser et al., "Learned Step Size Quantization", https://arxiv.org/abs/1902.08153): the
  weight scale becomes a parameter with its own gradient, scaled by ``1 / sqrt(N * qmax)``
  (``N`` weights share one scale), initialised from the MSE-optimal clipping.
* ``prepare_qat`` swaps every ``nn.Linear`` for a ``FakeQuantLinear``; ``convert`` turns those
  into ``QuantizedLinear`` layers that store int8 codes and give the same outputs.

Conventions of ``qcore.quant``: round half to even, symmetric restricted weight grid
``[-(2**(b-1) - 1), 2**(b-1) - 1]``, asymmetric activation grid ``[0, 2**b - 1]`` widened to 0.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from qcore.calibrate import MSEObserver
from qcore.quant import MIN_SCALE, _FakeQuantizeSTE


def fake_quantize_ste(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale`` with an STE backward.

    ``scale`` and ``zero_point`` broadcast against ``x``: 0-d (per tensor) or ``[out, 1]`` (per
    output channel of ``[out, in]``). The gradient w.r.t. ``x`` is 1 where the code lies in
    ``[qmin, qmax]`` before clamping, else 0; scale and zero-point get none.

    Example:
        >>> x = torch.tensor([-0.8, 0.26, 2.0], requires_grad=True)
        >>> y = fake_quantize_ste(x, torch.tensor(0.5), torch.tensor(0.0), -2, 2)
        >>> y.sum().backward(); y.tolist(), x.grad.tolist()
        ([-1.0, 0.5, 1.0], [1.0, 1.0, 0.0])
    """
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.float32, device=x.device)
    return _FakeQuantizeSTE.apply(x.float(), scale, zero_point, qmin, qmax).to(x.dtype)


class LSQFakeQuantize(torch.autograd.Function):
    """Symmetric fake quantization with a learnable scale (LSQ); zero-point 0.

    Forward ``clamp(round(w / s), qmin, qmax) * s``. Backward, with ``v = w / s``,
    ``inside = qmin <= round(v) <= qmax`` (as torch's ``_fake_quantize_learnable_*``):
    ``dw = g * inside``; ``ds = grad_scale * sum(g * (round(v) - v if inside else clamp(round(v))))``
    over the weights that share the scale (``s`` broadcasts against ``w``).
    """

    @staticmethod
    def forward(ctx, w, scale, qmin, qmax, grad_scale):
        v = w / scale
        r = torch.round(v)
        ctx.save_for_backward(v, r)
        ctx.qmin, ctx.qmax, ctx.grad_scale, ctx.scale_shape = qmin, qmax, grad_scale, scale.shape
        return r.clamp(qmin, qmax) * scale

    @staticmethod
    def backward(ctx, g):
        v, r = ctx.saved_tensors
        inside = (r >= ctx.qmin) & (r <= ctx.qmax)
        ds = g * torch.where(inside, r - v, r.clamp(ctx.qmin, ctx.qmax))
        ds = ds.sum_to_size(ctx.scale_shape) * ctx.grad_scale
        return g * inside, ds, None, None, None


def lsq_fake_quantize(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """LSQ fake quantization of ``w`` on the symmetric ``bits`` grid, ``grad_scale = 1 / sqrt(N * qmax)``.

    ``N = w.numel() / scale.numel()``: the number of weights that share one scale.

    Example:
        >>> w = torch.tensor([[0.4, -1.0]]); s = torch.tensor([[0.5]], requires_grad=True)
        >>> y = lsq_fake_quantize(w, s, bits=3); y.sum().backward()
        >>> y.tolist(), round(s.grad.item() * math.sqrt(2 * 3), 4)   # (1 - 0.8) + (-2 + 2)
        ([[0.5, -1.0]], 0.2)
    """
    qmax = 2 ** (bits - 1) - 1
    grad_scale = 1.0 / math.sqrt(w.numel() / scale.numel() * qmax)
    return LSQFakeQuantize.apply(w, scale, -qmax, qmax, grad_scale)


def absmax_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale ``max|w[o, :]| / qmax`` of a weight ``[out, in]``: ``[out, 1]``.

    Example:
        >>> absmax_scale(torch.tensor([[0.5, -7.0], [0.0, 0.0]]), 4).flatten().tolist()[0]
        1.0
    """
    qmax = 2 ** (bits - 1) - 1
    return (weight.detach().float().abs().amax(dim=1, keepdim=True) / qmax).clamp(min=MIN_SCALE)


def mse_scale(weight: torch.Tensor, bits: int, num_candidates: int = 100) -> torch.Tensor:
    """Per-output-channel symmetric scale ``[out, 1]`` with the least quantization MSE of each row.

    The candidates clip each row at ``r * max|w|``, ``r = k / num_candidates`` (k = 1..n), the same
    search as ``qcore.calibrate.MSEObserver(symmetric=True)`` but on the exact weights of every row
    at once (a histogram per row would be slow for thousands of rows).

    Example:
        >>> w = torch.cat([torch.linspace(-1, 1, 101), torch.tensor([8.0])]).unsqueeze(0)
        >>> s = mse_scale(w, bits=3); round(s.item() * 3, 2) < 8.0   # the outlier is clipped
        True
    """
    qmax = 2 ** (bits - 1) - 1
    w = weight.detach().float()
    top = absmax_scale(w, bits)  # [out, 1]
    best, best_err = top.clone(), torch.full_like(top, math.inf)
    ratios = torch.arange(1, num_candidates + 1, device=w.device, dtype=torch.float32) / num_candidates
    # Candidates in chunks of [k, out, in] (about 1M values each): fewer, larger operations.
    for chunk in ratios.split(max(1, 1_000_000 // max(1, w.numel()))):
        s = (chunk.view(-1, 1, 1) * top).clamp(min=MIN_SCALE)  # [k, out, 1]
        err = ((torch.round(w / s).clamp(-qmax, qmax) * s - w) ** 2).sum(dim=-1, keepdim=True)
        err_min, k = err.min(dim=0)  # [out, 1]
        better = err_min < best_err
        best = torch.where(better, s.gather(0, k.unsqueeze(0)).squeeze(0), best)
        best_err = torch.where(better, err_min, best_err)
    return best


def mse_scale_per_tensor(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One symmetric scale from ``qcore.calibrate.MSEObserver`` (its histogram search): a 0-d tensor.

    Example:
        >>> x = torch.cat([torch.linspace(-1, 1, 10001), torch.tensor([10.0])])
        >>> round(mse_scale_per_tensor(x, 4).item() * 7, 2)
        0.95
    """
    obs = MSEObserver(bits=bits, symmetric=True)
    obs(x.detach().float().cpu())
    return obs.qparams().scale.to(x.device)


class FakeQuantLinear(nn.Module):
    """``y = fq_act(x) @ fq_w(W).T + b``: the quantization error of W{b}A{b} in a float layer.

    Weight: per output channel, symmetric, scale ``max|w| / qmax`` recomputed at every call from
    the current weight (or, after ``enable_lsq()``, the learnable ``scale [out, 1]``). Input: per
    tensor, asymmetric ``[0, 2**act_bits - 1]``, range from an EMA of the batch min/max
    (``m <- m + c * (batch - m)``, the first batch initialises) while ``observer_enabled``; the bias
    is added after the product, in float. ``act_bits=None``: the input stays float.

    Example:
        >>> _ = torch.manual_seed(0); lin = nn.Linear(8, 4); fq = FakeQuantLinear(lin, 4, 8)
        >>> x = torch.randn(5, 8); y = fq(x); fq.freeze_observer()
        >>> torch.allclose(y, lin(x), atol=0.3), int(fq.num_batches)
        (True, 1)
    """

    def __init__(self, linear: nn.Linear, weight_bits: int = 8, act_bits: int | None = 8,
                 averaging_constant: float = 0.01):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared with the float layer
        self.weight_bits, self.act_bits, self.averaging_constant = weight_bits, act_bits, averaging_constant
        self.observer_enabled = True
        self.scale = None  # the LSQ parameter, after enable_lsq()
        self.register_buffer("act_min", torch.zeros((), device=linear.weight.device))
        self.register_buffer("act_max", torch.zeros((), device=linear.weight.device))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long, device=linear.weight.device))

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the EMA of the input's min and max (the first batch sets them)."""
        lo, hi = x.detach().float().aminmax()
        if self.num_batches == 0:
            self.act_min.copy_(lo), self.act_max.copy_(hi)
        else:
            c = self.averaging_constant
            self.act_min.add_(c * (lo - self.act_min)), self.act_max.add_(c * (hi - self.act_max))
        self.num_batches += 1

    def act_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of the input: 0-d float32 tensors from the observed range widened to 0."""
        if self.num_batches == 0:
            raise RuntimeError("the activation observer has seen no batch: run the model on some inputs "
                               "with observers enabled first")
        qmax = 2**self.act_bits - 1
        lo, hi = self.act_min.clamp(max=0.0), self.act_max.clamp(min=0.0)
        scale = ((hi - lo) / qmax).clamp(min=MIN_SCALE)
        return scale, (-torch.round(lo / scale)).clamp(0, qmax)

    def weight_scale(self) -> torch.Tensor:
        """Per-channel scale ``[out, 1]``: the LSQ parameter when enabled, else ``max|w| / qmax``."""
        return self.scale if self.scale is not None else absmax_scale(self.weight, self.weight_bits)

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``[out, in]`` (differentiable: STE, plus LSQ's scale gradient)."""
        qmax = 2 ** (self.weight_bits - 1) - 1
        if self.scale is not None:
            return lsq_fake_quantize(self.weight.float(), self.scale, self.weight_bits).to(self.weight.dtype)
        return fake_quantize_ste(self.weight, self.weight_scale(), 0.0, -qmax, qmax)

    def enable_lsq(self, init: str = "mse") -> nn.Parameter:
        """Make the weight scale a learnable parameter, initialised by ``mse_scale`` or ``absmax_scale``."""
        start = mse_scale(self.weight, self.weight_bits) if init == "mse" else absmax_scale(self.weight, self.weight_bits)
        self.scale = nn.Parameter(start.to(self.weight.device))
        return self.scale

    def freeze_observer(self, frozen: bool = True) -> None:
        self.observer_enabled = not frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            if self.observer_enabled:
                self.observe(x)
            scale, zero_point = self.act_qparams()
            x = fake_quantize_ste(x, scale, zero_point, 0, 2**self.act_bits - 1)
        return F.linear(x, self.fake_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}A{self.act_bits}, "
                f"lsq={self.scale is not None}, observer={'on' if self.observer_enabled else 'frozen'}")


class QuantizedLinear(nn.Module):
    """The converted layer: int8 weight codes ``[out, in]``, scale ``[out, 1]``, frozen input qparams.

    The forward quantizes the input with the frozen scale and zero-point, and multiplies by
    ``codes * scale``: the same numbers as the ``FakeQuantLinear`` it came from.
    """

    def __init__(self, codes, scale, bias, act_scale, act_zero_point, weight_bits: int, act_bits: int | None):
        super().__init__()
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.register_buffer("codes", codes.to(torch.int8))
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("act_scale", None if act_scale is None else act_scale.detach().clone())
        self.register_buffer("act_zero_point", None if act_zero_point is None else act_zero_point.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            x = fake_quantize_ste(x, self.act_scale, self.act_zero_point, 0, 2**self.act_bits - 1)
        w = (self.codes.float() * self.scale).to(x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"codes={tuple(self.codes.shape)}, W{self.weight_bits}A{self.act_bits}"


def prepare_qat(model: nn.Module, weight_bits: int = 8, act_bits: int | None = 8, skip=(),
                lsq: bool = False) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` (except the names in ``skip``) a ``FakeQuantLinear``.

    ``lsq=True`` also makes each weight scale learnable (MSE-initialised). The original model is untouched.

    Example:
        >>> m = prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), 4, 8)
        >>> [type(layer).__name__ for layer in m]
        ['FakeQuantLinear', 'ReLU', 'FakeQuantLinear']
    """
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n not in skip]
    for name in names:
        layer = FakeQuantLinear(model.get_submodule(name), weight_bits, act_bits)
        if lsq:
            layer.enable_lsq()
        model.set_submodule(name, layer)
    return model


def fake_quant_layers(model: nn.Module) -> list[FakeQuantLinear]:
    return [m for m in model.modules() if isinstance(m, FakeQuantLinear)]


def freeze_observers(model: nn.Module, frozen: bool = True) -> None:
    """Stop (or restart) every activation observer of a prepared model."""
    for layer in fake_quant_layers(model):
        layer.freeze_observer(frozen)


@torch.no_grad()
def convert(model: nn.Module) -> nn.Module:
    """A copy of a prepared model with each ``FakeQuantLinear`` replaced by a ``QuantizedLinear``.

    Codes ``clamp(round(w / s), -qmax, qmax)`` (int8) with the layer's current weight scale and its
    frozen input range: the converted model computes exactly what the fake-quantized one computes.

    Example:
        >>> _ = torch.manual_seed(0); m = prepare_qat(nn.Sequential(nn.Linear(6, 3)), 3, 8)
        >>> x = torch.randn(4, 6); y = m(x); freeze_observers(m); q = convert(m)
        >>> torch.equal(q(x), m(x)), q[0].codes.dtype, int(q[0].codes.abs().max())
        (True, torch.int8, 3)
    """
    model = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
        qmax = 2 ** (layer.weight_bits - 1) - 1
        scale = layer.weight_scale().detach().float()
        codes = torch.round(layer.weight.detach().float() / scale).clamp(-qmax, qmax)
        act = layer.act_qparams() if layer.act_bits is not None else (None, None)
        model.set_submodule(name, QuantizedLinear(codes, scale, layer.bias, *act, layer.weight_bits, layer.act_bits))
    return model
