"""Low-rank adapters (LoRA, https://arxiv.org/abs/2106.09685) and adapters on an NF4 base
(QLoRA, https://arxiv.org/abs/2305.14314).

A frozen linear layer ``y = x @ W.T + b`` (``W [out, in]``) gets a trainable update of rank ``r``::

    y = x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T,     scaling = alpha / r
    A [r, in]  Kaiming-uniform (as nn.Linear's weight),  B [out, r]  zeros

so the layer starts exactly as the base and trains ``r * (in + out)`` numbers instead of
``in * out``. ``merge()`` folds the update into the weight, ``W' = W + scaling * B @ A``,
and the adapter costs nothing at inference. Names and initialisation are ``peft``'s
(``lora_A`` / ``lora_B``, ``kaiming_uniform_(a=sqrt(5))``), so with the same ``A`` and ``B``
the two give the same outputs.

QLoRA freezes the base in 4-bit NormalFloat (``qcore.layers.NF4Linear``: block-wise, optionally
double quantized) and trains the same adapters in full precision.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from qcore.layers import NF4Linear

__all__ = ["LoRALinear", "QLoRALinear", "add_lora", "merge_lora", "quantize_nf4_model",
           "count_parameters", "LLAMA_LINEARS"]

# The linear layers of a Llama (SmolLM2) block: attention, then the gated MLP.
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable rank-``r`` update ``scaling * B @ A``.

    Args:
        base: the layer to adapt (its parameters are frozen here).
        r: rank; ``alpha``: the update is scaled by ``alpha / r``; ``dropout``: on the adapter's
            input only (identity in eval mode).

    Example:
        >>> _ = torch.manual_seed(0); base = nn.Linear(6, 4)
        >>> lora = LoRALinear(base, r=2, alpha=4)
        >>> x = torch.randn(3, 6)
        >>> torch.equal(lora(x), base(x)), lora.scaling, [n for n, p in lora.named_parameters() if p.requires_grad]
        (True, 2.0, ['lora_A', 'lora_B'])
        >>> with torch.no_grad(): _ = lora.lora_B.normal_()
        >>> w0, y = base.weight.clone(), lora(x)
        >>> lora.merge(); torch.allclose(lora(x), y, atol=1e-6)   # one matmul, same outputs
        True
        >>> lora.unmerge(); torch.allclose(lora.base.weight, w0, atol=1e-6)
        True
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"rank r must be at least 1, got {r}")
        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        ref = base.weight if isinstance(base, nn.Linear) else base.packed
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else torch.float32
        # Adapters stay in float32 when the base is bf16/fp16 (as peft's autocast_adapter_dtype).
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=ref.device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=ref.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``, shape ``[out, in]``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = self.dropout(x.to(self.lora_A.dtype))
        return y + (F.linear(F.linear(a, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    def merge(self) -> None:
        """Fold the update into the base weight (``nn.Linear`` bases only; see ``merge_lora``)."""
        if not isinstance(self.base, nn.Linear):
            raise TypeError("merge() changes the weight in place: an NF4 base needs merge_lora(model)")
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        """Take the update out of the base weight again (exact up to float rounding)."""
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def merged_linear(self) -> nn.Linear:
        """A new frozen ``nn.Linear`` with weight ``W + scaling * B @ A`` (``W`` dequantized if NF4)."""
        base = self.base.to_linear() if isinstance(self.base, NF4Linear) else self.base
        lin = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = 0 if self.merged else self.delta_weight().to(base.weight.dtype)
            lin.weight.copy_(base.weight + delta)
            if base.bias is not None:
                lin.bias.copy_(base.bias)
        return lin.requires_grad_(False)


class QLoRALinear(LoRALinear):
    """LoRA over a frozen NF4 base: the base weight in 4 bits, the adapters trainable in fp32.

    Example:
        >>> _ = torch.manual_seed(0); base = nn.Linear(128, 16)
        >>> q = QLoRALinear(base, r=4, alpha=8)
        >>> type(q.base).__name__, [n for n, p in q.named_parameters()]
        ('NF4Linear', ['lora_A', 'lora_B'])
        >>> x = torch.randn(2, 128)
        >>> torch.allclose(q(x), F.linear(x, q.base.weight_hat(), base.bias))   # B = 0
        True
    """

    def __init__(self, base: nn.Linear | NF4Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 block_size: int = 64, double_quant: bool = True):
        if isinstance(base, nn.Linear):
            base = NF4Linear.from_linear(base, block_size, double_quant)
        super().__init__(base, r, alpha, dropout)


def _matches(name: str, targets: Iterable[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize_nf4_model(model: nn.Module, block_size: int = 64, double_quant: bool = True,
                       skip: Iterable[str] = ("lm_head",)) -> nn.Module:
    """Replace every ``nn.Linear`` (except names ending in ``skip``) by an ``NF4Linear``, in place.

    As bitsandbytes' ``load_in_4bit``: the embeddings, norms and the output head stay as they are.
    """
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]
    for name in names:
        model.set_submodule(name, NF4Linear.from_linear(model.get_submodule(name), block_size, double_quant))
    return model


def add_lora(model: nn.Module, target_modules: Iterable[str] = ("q_proj", "v_proj"), r: int = 8,
             alpha: float = 16, dropout: float = 0.0) -> nn.Module:
    """Freeze ``model`` and wrap each target layer (name or name suffix) in an adapter, in place.

    ``nn.Linear`` targets get a ``LoRALinear``; ``NF4Linear`` targets (after
    ``quantize_nf4_model``) a ``QLoRALinear``. Returns the model.

    Example:
        >>> m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> add_lora(m, ["0"], r=2) is m, type(m[0]).__name__, count_parameters(m)
        (True, 'LoRALinear', (32, 122))
    """
    model.requires_grad_(False)
    targets = tuple(target_modules)
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, NF4Linear)) and _matches(n, targets)]
    if not names:
        raise ValueError(f"no nn.Linear / NF4Linear named like {targets} in the model")
    for name in names:
        base = model.get_submodule(name)
        cls = QLoRALinear if isinstance(base, NF4Linear) else LoRALinear
        model.set_submodule(name, cls(base, r=r, alpha=alpha, dropout=dropout))
    return model


def merge_lora(model: nn.Module, requantize: bool = False, block_size: int = 64,
               double_quant: bool = True) -> nn.Module:
    """Replace every adapter layer by one plain layer with ``W + scaling * B @ A``, in place.

    An NF4 base is dequantized first, so the merged layer is an fp ``nn.Linear``; with
    ``requantize=True`` the merged weight of such a layer is quantized to NF4 again (lossy:
    the update is small next to NF4's steps, see lab 5).
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        layer = model.get_submodule(name)
        merged = layer.merged_linear()
        if requantize and isinstance(layer.base, NF4Linear):
            merged = NF4Linear.from_linear(merged, block_size, double_quant)
        model.set_submodule(name, merged)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameters; NF4 weights count as their original number of elements.

    Tied tensors count once (as ``model.parameters()`` does).

    Example:
        >>> m = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 2))
        >>> _ = quantize_nf4_model(m); count_parameters(m)
        (0, 270)
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, NF4Linear):
            total += m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel())
    return trainable, total
