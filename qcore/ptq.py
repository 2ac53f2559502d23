"""Post-training quantization (PTQ): a model converted layer by layer, and per-layer sensitivity.

A scheme names what each ``nn.Linear`` becomes (``qcore.layers``): ``w8a16``/``w4a16`` a
weight-only ``QuantLinear`` (int8 per output channel; int4 per group of ``group_size`` inputs,
packed two per byte), which saves memory, not arithmetic; ``w8a8-dynamic``/``w8a8-static`` an
``Int8Linear`` (int8 x int8 summed in int32; input scales per token at run time, or fixed by
calibration). Calibration (forward hooks) and SmoothQuant live in ``qcore.smoothquant``.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qcore.layers import Int8Linear, QuantEmbedding, QuantLinear
from qcore.smoothquant import smooth_linear

SCHEMES = ("fp32", "w8a16", "w4a16", "w8a8-dynamic", "w8a8-static")


def quantize_linear(linear: nn.Linear, scheme: str, input_scale=None, smooth=None,
                    group_size: int = 128, input_zero_point=None) -> nn.Module:
    """The quantized replacement of one ``nn.Linear`` for a scheme of ``SCHEMES``.

    Example:
        >>> quantize_linear(torch.nn.Linear(256, 2), "w4a16")
        QuantLinear(256, 2, bits=4, group_size=128)
    """
    if scheme == "fp32":
        return linear
    if scheme in ("w8a16", "w4a16"):
        return QuantLinear.from_linear(linear, 8) if scheme == "w8a16" else QuantLinear.from_linear(linear, 4, group_size)
    if scheme not in ("w8a8-dynamic", "w8a8-static"):
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {SCHEMES}")
    if scheme == "w8a8-static" and input_scale is None:
        raise ValueError("w8a8-static needs an input_scale from calibration")
    if smooth is not None:  # column j times s_j; Int8Linear divides its input by s
        linear = copy.deepcopy(linear)
        smooth_linear(linear, smooth)
    if scheme == "w8a8-static":
        return Int8Linear(linear, input_scale, smooth, input_zero_point)
    return Int8Linear(linear, None, smooth)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``model``, in module order.

    Example:
        >>> linear_names(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)))
        ['0', '2']
    """
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def quantize_model(model: nn.Module, scheme: str = "w8a16", schemes: dict[str, str] | None = None,
                   input_scales: dict | None = None, smooth: dict | None = None,
                   embeddings: bool = False, group_size: int = 128,
                   input_zero_points: dict | None = None) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` quantized by ``scheme``.

    ``schemes`` overrides the scheme of named layers (mixed precision); ``input_scales``,
    ``input_zero_points`` (asymmetric static inputs, ``qcore.smoothquant.static_input_qparams``)
    and ``smooth`` map layer names to static input scales, zero-points and SmoothQuant factors; ``embeddings``
    also stores every ``nn.Embedding`` in int8. The original model is left untouched.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> q = quantize_model(m, "w8a8-dynamic", schemes={"1": "fp32"})
        >>> [type(layer).__name__ for layer in q]
        ['Int8Linear', 'Linear']
    """
    out = copy.deepcopy(model)
    schemes, input_scales, smooth = schemes or {}, input_scales or {}, smooth or {}
    input_zero_points = input_zero_points or {}
    for name in linear_names(out):
        layer = quantize_linear(out.get_submodule(name), schemes.get(name, scheme), input_scales.get(name),
                                smooth.get(name), group_size, input_zero_points.get(name))
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
        >>> s = layer_sensitivity(m, ["0", "1"], lambda lin: QuantLinear.from_linear(lin, 4, 2),
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


def kl_per_row(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) || softmax(logits))`` of each row (sentence), float64 ``[rows]``, in nats.

    Example:
        >>> kl_per_row(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]])).tolist()
        [0.0, 0.0]
    """
    p_log, q_log = F.log_softmax(reference.double(), -1), F.log_softmax(logits.double(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def logit_damage(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL divergence ``KL(softmax(reference) || softmax(logits))`` over rows, in nats.

    Example:
        >>> logit_damage(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]))
        0.0
    """
    return kl_per_row(reference, logits).mean().clamp(min=0).item()
