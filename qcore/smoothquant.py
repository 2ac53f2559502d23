"""Activation statistics by calibration, and SmoothQuant: move activation outliers into the weights.

``input_minmax`` runs calibration inputs through a model and records, with forward pre-hooks, the
range of every input channel of the chosen layers, ``input_absmax`` the largest ``|x|``. Static
W8A8 takes one scale per layer from them (``static_input_scales``, symmetric; or
``static_input_qparams``, asymmetric); SmoothQuant takes the per-channel values.

A few input channels of a transformer's linear layers carry values far larger than the rest,
so one int8 scale per token or per tensor wastes most codes on them. SmoothQuant divides input
channel ``j`` by ``s_j`` and multiplies column ``j`` of the weight by ``s_j``; the product is
unchanged, ``(x / s) @ (W * s).T = x @ W.T``, and with

    s_j = max|x_j|**alpha / max|W[:, j]|**(1 - alpha)

both sides end up with the same per-channel maximum ``(max|x_j| * max|W[:, j]|)**0.5`` at
``alpha = 0.5``: the activations get easier to quantize, the weights a little harder.
Xiao et al. 2022, https://arxiv.org/abs/2211.10438.

Where the division goes:

* pre-LN blocks (OPT, LLaMA: ``y = Linear(LN(x))``, residual outside the branch): into the
  LayerNorm's weight and bias (``fold_smoothing``), so it costs nothing at run time;
* post-LN blocks (BERT, DistilBERT: ``h = LN(x + f(x))`` feeds the next layer *and* the residual):
  scaling the LayerNorm would scale the residual too, so the quantized layer divides its own
  input (``Int8Linear(smooth=s)``, one multiply per value, fusable into the quantize step).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from qcore.calibrate import MinMaxObserver
from qcore.quant import MIN_SCALE, PerChannel, QParams, qparams_from_range, qrange


def input_minmax(model: nn.Module, names: list[str], run: Callable[[nn.Module], object]) -> dict:
    """``{name: (min, max)}`` per input channel (each ``[in]``) of each named layer's input while ``run(model)``.

    Forward pre-hooks feed each input, seen as ``[tokens, in]``, to a per-channel
    ``MinMaxObserver``; the hooks are removed afterwards, even when ``run`` fails.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> lo, hi = input_minmax(m, ["0"], lambda mod: mod(torch.tensor([[1.0, -3.0], [2.0, 0.0]])))["0"]
        >>> lo.tolist(), hi.tolist(), len(m[0]._forward_pre_hooks)
        ([1.0, -3.0], [2.0, 0.0], 0)
    """
    observers = {n: MinMaxObserver(8, symmetric=False, granularity=PerChannel(axis=1)) for n in names}

    def hook_for(obs):
        def hook(_module, args):  # returns None: the input goes on unchanged
            obs.observe(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(observers[n])) for n in names]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for h in handles:
            h.remove()
    return {n: (o.min_val.flatten(), o.max_val.flatten()) for n, o in observers.items()}


def input_absmax(model: nn.Module, names: list[str], run: Callable[[nn.Module], object]) -> dict:
    """``{name: max|x| per input channel [in]}`` of each named layer's input while ``run(model)``.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> input_absmax(m, ["0"], lambda mod: mod(torch.tensor([[1.0, -3.0], [2.0, 0.0]])))["0"].tolist()
        [2.0, 3.0]
    """
    return {n: torch.maximum(-lo, hi) for n, (lo, hi) in input_minmax(model, names, run).items()}


def unpadded_runner(tokenizer, texts: list[str], device: str = "cpu",
                    max_length: int = 128) -> Callable[[nn.Module], None]:
    """``run(model)`` for ``input_absmax``: the texts grouped by token count, so no batch holds padding.

    Padding is masked out of attention, but its activations still pass through every linear layer
    and would widen the observed ranges; equal-length groups avoid it without any masking.

    Example:
        >>> class Tok:  # one token per word, like a whitespace tokenizer
        ...     def __call__(self, text, truncation=True, max_length=128):
        ...         return {"input_ids": list(range(len(text.split())))[:max_length]}
        >>> seen = []
        >>> unpadded_runner(Tok(), ["a b", "c d", "e"])(lambda input_ids, attention_mask: seen.append(
        ...     tuple(input_ids.shape)))
        >>> seen
        [(2, 2), (1, 1)]
    """
    by_length: dict[int, list[list[int]]] = {}
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        by_length.setdefault(len(ids), []).append(ids)

    def run(model) -> None:
        for group in by_length.values():
            ids = torch.tensor(group, device=device)  # [texts of this length, length]
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return run


def static_input_scales(absmax: dict[str, torch.Tensor], bits: int = 8) -> dict[str, torch.Tensor]:
    """One symmetric per-tensor scale per layer: ``max over channels of absmax / qmax``.

    Example:
        >>> round(static_input_scales({"fc": torch.tensor([1.0, 12.7])})["fc"].item(), 6)
        0.1
    """
    qmax = qrange(bits, symmetric=True)[1]
    return {n: (a.max() / qmax).clamp(min=MIN_SCALE) for n, a in absmax.items()}


def static_input_qparams(minmax: dict[str, tuple[torch.Tensor, torch.Tensor]], bits: int = 8) -> dict[str, QParams]:
    """One asymmetric per-tensor grid per layer, ``[0, 2**bits - 1]`` over the calibrated ``[min, max]``.

    Example (a post-GELU input: almost all of the range is positive):
        >>> qp = static_input_qparams({"fc": (torch.tensor([-0.17, 0.0]), torch.tensor([3.0, 20.3]))})["fc"]
        >>> round(qp.scale.item(), 5), qp.zero_point.item()
        (0.08027, 2)
    """
    return {n: qparams_from_range(lo.min(), hi.max(), bits, symmetric=False) for n, (lo, hi) in minmax.items()}


def smoothing_factors(act_absmax: torch.Tensor, weights, alpha: float = 0.5) -> torch.Tensor:
    """Per-input-channel factors ``s = max|x|**alpha / max|W|**(1 - alpha)``, shape ``[in]``.

    Args:
        act_absmax: ``[in]`` calibrated ``max|x_j|`` of the input channels.
        weights: one weight ``[out, in]`` or a list of them (the linears fed by the same input);
            ``max|W[:, j]|`` is taken over all their rows.
        alpha: migration strength, 0 (weights untouched) to 1 (activations flattened).

    Both maxima and ``s`` are clamped to at least ``1e-5``, as in the paper's code.

    Example:
        >>> s = smoothing_factors(torch.tensor([16.0, 1.0]), torch.tensor([[1.0, 4.0], [-0.25, 1.0]]))
        >>> s.tolist()
        [4.0, 0.5]
    """
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    w_absmax = torch.cat([w.detach().abs() for w in weights]).amax(dim=0).float().clamp(min=1e-5)
    a = act_absmax.detach().float().clamp(min=1e-5)
    return (a.pow(alpha) / w_absmax.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_linear(linear: nn.Linear, s: torch.Tensor) -> None:
    """Multiply column ``j`` of ``linear.weight`` by ``s_j`` in place (the input must be divided by s).

    Example:
        >>> lin = torch.nn.Linear(2, 1, bias=False); _ = lin.weight.data.copy_(torch.tensor([[1.0, 2.0]]))
        >>> smooth_linear(lin, torch.tensor([4.0, 0.5])); lin.weight.tolist()
        [[4.0, 1.0]]
    """
    linear.weight.mul_(s.to(linear.weight.dtype))  # [out, in] * [in]: broadcast over rows


@torch.no_grad()
def fold_smoothing(layer_norm: nn.LayerNorm, linears, s: torch.Tensor) -> None:
    """Fold ``s`` into a pre-LN branch: LayerNorm weight and bias ``/ s``, each linear's columns ``* s``.

    Exact (up to rounding) when the LayerNorm's output feeds only these linears.

    Example:
        >>> _ = torch.manual_seed(0); ln, lin = torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
        >>> x = torch.randn(2, 4); before = lin(ln(x))
        >>> fold_smoothing(ln, [lin], torch.tensor([2.0, 0.5, 1.0, 4.0]))
        >>> torch.allclose(lin(ln(x)), before, atol=1e-6)
        True
    """
    layer_norm.weight.div_(s)
    layer_norm.bias.div_(s)
    for linear in linears:
        smooth_linear(linear, s)


def smoothquant_factors(model: nn.Module, absmax: dict[str, torch.Tensor], groups: list[list[str]],
                        alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """``{name: s}``: one ``s`` per group of layers that read the same input (e.g. q, k, v).

    ``max|W[:, j]|`` is taken over all weights of a group, so the whole group shares one
    smoothed input, as when ``s`` is folded into the LayerNorm in front of them. Pass the
    result as ``qcore.ptq.quantize_model(..., smooth=...)``.

    Example:
        >>> m = torch.nn.ModuleDict({"q": torch.nn.Linear(2, 3), "k": torch.nn.Linear(2, 3)})
        >>> s = smoothquant_factors(m, {"q": torch.ones(2), "k": torch.ones(2)}, [["q", "k"]])
        >>> s["q"] is s["k"], s["q"].shape
        (True, torch.Size([2]))
    """
    out = {}
    for names in groups:
        s = smoothing_factors(absmax[names[0]], [model.get_submodule(n).weight for n in names], alpha)
        out.update({n: s for n in names})
    return out
