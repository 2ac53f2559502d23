"""Quantization-aware training (QAT): train with the quantization error in the forward pass.

* ``FakeQuantLinear``: an ``nn.Linear`` whose weight is fake-quantized per output channel
  (symmetric, ``scale [out, 1]``, ``qcore.quant.choose_qparams``) and whose input is
  fake-quantized per tensor (asymmetric, unsigned codes) with the range of a
  ``qcore.calibrate.MovingAverageMinMaxObserver`` that can be frozen. Both go through
  ``qcore.quant.fake_quantize_ste``: the straight-through estimator (STE) passes the gradient
  where the clamp did not bite and zeroes it where it did.
* LSQ (Esser et al., "Learned Step Size Quantization", https://arxiv.org/abs/1902.08153): the
  weight scale becomes a parameter with its own gradient, scaled by ``1 / sqrt(N * qmax)``
  (``N`` weights share one scale), initialised from the MSE-optimal clipping
  (``qcore.clipping.choose_qparams_mse``) and kept positive.
* ``prepare_qat`` swaps every ``nn.Linear`` for a ``FakeQuantLinear``; ``convert`` turns those
  into ``qcore.layers.QuantLinear`` layers that store the integer codes and give the same outputs.

Conventions of ``qcore.quant``: round half to even, symmetric restricted weight grid
``[-(2**(b-1) - 1), 2**(b-1) - 1]``, asymmetric activation grid ``[0, 2**b - 1]`` widened to 0.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from qcore.calibrate import MovingAverageMinMaxObserver
from qcore.clipping import choose_qparams_mse
from qcore.layers import QuantLinear
from qcore.quant import MIN_SCALE, PerChannel, choose_qparams, fake_quantize_ste, qrange


class LSQFakeQuantize(torch.autograd.Function):
    """Symmetric fake quantization with a learnable scale (LSQ); zero-point 0.

    Forward ``clamp(round(w / s), qmin, qmax) * s``. Backward, with ``v = w / s``,
    ``inside = qmin <= round(v) <= qmax`` (as torch's ``_fake_quantize_learnable_*``):
    ``dw = g * inside``; ``ds = grad_scale * sum(g * (round(v) - v if inside else clamp(round(v))))``
    over the weights that share the scale (``s`` broadcasts against ``w``).
    """

    @staticmethod
    def forward(ctx, w, scale, qmin, qmax, grad_scale):
        scale = scale.clamp(min=MIN_SCALE)  # a step that training pushed to 0 or below stays a step
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
    qmin, qmax = qrange(bits, symmetric=True)
    grad_scale = 1.0 / math.sqrt(w.numel() / scale.numel() * qmax)
    return LSQFakeQuantize.apply(w, scale, qmin, qmax, grad_scale)


class FakeQuantLinear(nn.Module):
    """``y = fq_act(x) @ fq_w(W).T + b``: the quantization error of W{b}A{b} in a float layer.

    Weight: per output channel, symmetric, scale ``max|w| / qmax`` recomputed at every call from
    the current weight (or, after ``enable_lsq()``, the learnable ``scale [out, 1]``). Input: per
    tensor, asymmetric ``[0, 2**act_bits - 1]``, range from ``input_observer``, an EMA of the batch
    min/max (``m <- m + c * (batch - m)``, the first batch initialises), while ``observer_enabled``;
    the bias is added after the product, in float. ``act_bits=None``: the input stays float.

    Example:
        >>> _ = torch.manual_seed(0); lin = nn.Linear(8, 4); fq = FakeQuantLinear(lin, 4, 8)
        >>> x = torch.randn(5, 8); y = fq(x); fq.freeze_observer()
        >>> torch.allclose(y, lin(x), atol=0.3), fq.num_batches, fq.act_qparams()[1].dtype
        (True, 1, torch.int32)
    """

    def __init__(self, linear: nn.Linear, weight_bits: int = 8, act_bits: int | None = 8,
                 averaging_constant: float = 0.01):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared with the float layer
        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.observer_enabled = True
        self.num_batches = 0
        self.scale = None  # the LSQ parameter, after enable_lsq()
        self.input_observer = None if act_bits is None else \
            MovingAverageMinMaxObserver(averaging_constant, bits=act_bits, symmetric=False)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """Update the EMA of the input's min and max (the first batch sets them)."""
        self.input_observer.observe(x)
        self.num_batches += 1

    def act_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) of the input: 0-d float32 and int32, the observed range widened to 0."""
        if self.num_batches == 0:
            raise RuntimeError("the activation observer has seen no batch: run the model on some inputs "
                               "with observers enabled first")
        qp = self.input_observer.qparams()
        return qp.scale, qp.zero_point

    def weight_scale(self) -> torch.Tensor:
        """Per-channel scale ``[out, 1]``: the LSQ parameter when enabled, else ``max|w| / qmax``."""
        if self.scale is not None:
            return self.scale
        return choose_qparams(self.weight, self.weight_bits, symmetric=True, granularity=PerChannel(0)).scale

    def fake_weight(self) -> torch.Tensor:
        """The fake-quantized weight ``[out, in]`` (differentiable: STE, plus LSQ's scale gradient)."""
        if self.scale is not None:
            return lsq_fake_quantize(self.weight.float(), self.scale, self.weight_bits).to(self.weight.dtype)
        return fake_quantize_ste(self.weight, self.weight_scale(), 0, *qrange(self.weight_bits, symmetric=True))

    def enable_lsq(self, init: str = "mse") -> nn.Parameter:
        """Make the weight scale a learnable parameter, initialised by the MSE search or ``max|w| / qmax``."""
        if init == "mse":
            start = choose_qparams_mse(self.weight, self.weight_bits, PerChannel(0)).scale
        else:
            start = self.weight_scale()
        self.scale = nn.Parameter(start.detach().clone().to(self.weight.device))
        return self.scale

    def freeze_observer(self, frozen: bool = True) -> None:
        self.observer_enabled = not frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:
            if self.observer_enabled:
                self.observe(x)
            scale, zero_point = self.act_qparams()
            x = fake_quantize_ste(x, scale, zero_point, *qrange(self.act_bits, symmetric=False))
        return F.linear(x, self.fake_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, W{self.weight_bits}A{self.act_bits}, "
                f"lsq={self.scale is not None}, observer={'on' if self.observer_enabled else 'frozen'}")


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
    """A copy of a prepared model with each ``FakeQuantLinear`` replaced by a ``qcore.layers.QuantLinear``.

    Codes ``clamp(round(w / s), -qmax, qmax)`` with the layer's current weight scale and its
    frozen input qparams: the converted model computes exactly what the fake-quantized one computes.

    Example:
        >>> _ = torch.manual_seed(0); m = prepare_qat(nn.Sequential(nn.Linear(6, 3)), 3, 8)
        >>> x = torch.randn(4, 6); y = m(x); freeze_observers(m); q = convert(m)
        >>> torch.equal(q(x), m(x)), q[0].codes().dtype, int(q[0].codes().abs().max())
        (True, torch.int8, 3)
    """
    model = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]:
        scale = layer.weight_scale().detach().float().clamp(min=MIN_SCALE)
        qmin, qmax = qrange(layer.weight_bits, symmetric=True)
        codes = torch.round(layer.weight.detach().float() / scale).clamp(qmin, qmax)
        input_scale, input_zero_point = layer.act_qparams() if layer.act_bits is not None else (None, None)
        model.set_submodule(name, QuantLinear(codes, scale, layer.bias, bits=layer.weight_bits,
                                              input_scale=input_scale, input_zero_point=input_zero_point,
                                              input_bits=layer.act_bits or 8))
    return model
