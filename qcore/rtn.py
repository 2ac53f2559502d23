"""Round-to-nearest (RTN) weight-only quantization of a causal LM, and the decoder-block plumbing of GPTQ/AWQ.

RTN is the baseline of lab 6: every weight ``[out, in]`` of a decoder block goes to its nearest
point on a grid of ``bits`` with one scale per output channel (``group_size=None``) or per run of
``group_size`` inputs, and back (fake quantization: the weights stay float, on the grid)::

    W_hat = dequantize(quantize(W, choose_qparams(W)))       # qcore.layers.quantize_weight

Only the ``nn.Linear`` layers inside the decoder blocks are quantized. The token embeddings stay in
float, and so does ``lm_head``: SmolLM2 ties it to the embedding matrix (one tensor), so quantizing
it would quantize the embeddings too.

GPTQ (``qcore.gptq``) and AWQ (``qcore.awq``) work block by block on calibration text; the helpers
here give them the inputs of the first block (``block_inputs``), run a block on them (``run_block``)
and name the linear layers of a Llama block in the order they are applied (``SUBLAYER_GROUPS``).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from qcore.layers import quantize_weight
from qcore.quant import dequantize

# The linear layers of a Llama decoder block in the order they see data; layers of one group share
# their input (q/k/v read input_layernorm's output, gate/up read post_attention_layernorm's output).
SUBLAYER_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def rtn_weight(weight: torch.Tensor, bits: int = 4, group_size: int | None = None,
               symmetric: bool = True) -> torch.Tensor:
    """The RTN fake-quantized weight ``dequantize(quantize(W))`` of a weight ``[out, in]``.

    Min-max scales per output channel (``group_size=None``, scale ``[out, 1]``) or per group of
    ``group_size`` inputs (scale ``[out, in // group_size]``), on the symmetric grid
    ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` or the asymmetric ``[0, 2**bits - 1]``.

    Returns:
        ``[out, in]`` in ``weight``'s dtype; every row (group) lies on its own grid, so applying
        ``rtn_weight`` again changes nothing.

    Example:
        >>> w = torch.tensor([[0.25, -1.0, 0.125, 0.5]])
        >>> rtn_weight(w, bits=2).tolist()                  # grid {-1, 0, 1} * max|w|; 0.5 is a tie
        [[0.0, -1.0, 0.0, 0.0]]
        >>> rtn_weight(w, bits=2, group_size=2).tolist()    # one scale per pair: 1.0 and 0.5
        [[0.0, -1.0, 0.0, 0.5]]
        >>> rtn_weight(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]), bits=2, symmetric=False).tolist()
        [[-1.0, 0.0, 0.0, 2.0]]

        Ties round half to even: 0.5 / 1.0 goes to code 0 (symmetric) or 0 + zero-point 1
        (asymmetric, scale 1).
    """
    return dequantize(*quantize_weight(weight, bits, group_size, symmetric)).to(weight.dtype)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (``model.model.layers`` for Llama).

    Example:
        >>> from qcore.zoo.causal_lm import tiny_causal_lm
        >>> len(decoder_layers(tiny_causal_lm()))
        2
    """
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder blocks at .model.layers")
    return layers


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` of one decoder block, in module order (q, k, v, o, gate, up, down)."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


@torch.no_grad()
def quantize_model_rtn(model: nn.Module, bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                       inplace: bool = False) -> nn.Module:
    """The model with every ``nn.Linear`` of its decoder blocks RTN fake-quantized (``rtn_weight``).

    Embeddings and ``lm_head`` (tied to them in SmolLM2) stay in float. The original model is left
    untouched unless ``inplace``.

    Example:
        >>> from qcore.zoo.causal_lm import tiny_causal_lm
        >>> m = tiny_causal_lm(); q = quantize_model_rtn(m, bits=3, group_size=32)
        >>> w = q.model.layers[0].mlp.down_proj.weight
        >>> torch.equal(w, rtn_weight(m.model.layers[0].mlp.down_proj.weight, 3, 32))
        True
        >>> torch.equal(q.lm_head.weight, m.lm_head.weight)
        True
    """
    model = model if inplace else copy.deepcopy(model)
    for block in decoder_layers(model):
        for linear in block_linears(block).values():
            linear.weight.copy_(rtn_weight(linear.weight, bits, group_size, symmetric))
    return model


# ----------------------------------------------------------------------------- block plumbing
class StopForward(Exception):
    """Raised by a hook to end a forward pass once it has what it needs."""


def _first(out):
    """A decoder block returns a tensor (transformers 5) or a tuple whose first item it is (4.x)."""
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_inputs(model: nn.Module, calibration_ids: torch.Tensor, batch_size: int = 8) -> list:
    """What the first decoder block receives for the calibration text, one entry per batch.

    The base model runs on ``calibration_ids`` (``[n, seq]`` token ids, no padding) in batches of
    ``batch_size`` sequences and is stopped at the first block by a forward pre-hook; no block runs.

    Returns:
        A list of ``(hidden [b, seq, hidden], kwargs)``: the block's input and its keyword arguments
        (rotary ``position_embeddings``, causal mask, position ids) for ``run_block``.

    Example:
        >>> from qcore.zoo.causal_lm import tiny_causal_lm
        >>> batches = block_inputs(tiny_causal_lm(), torch.randint(0, 100, (3, 5)), batch_size=2)
        >>> [tuple(h.shape) for h, _ in batches]
        [(2, 5, 64), (1, 5, 64)]
    """
    first = decoder_layers(model)[0]
    batches = []

    def catch(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs["use_cache"] = False
        for key in ("cache", "past_key_values", "past_key_value"):
            kwargs.pop(key, None)       # no key-value cache: every batch is a fresh sequence
        batches.append((hidden.detach(), kwargs))
        raise StopForward

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for ids in calibration_ids.split(batch_size):
            try:
                getattr(model, "model", model)(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return batches


@torch.no_grad()
def run_block(block: nn.Module, batches: list) -> list:
    """``block``'s outputs on ``block_inputs``-style batches: the next block's inputs, same kwargs."""
    return [(_first(block(hidden, **kwargs)), kwargs) for hidden, kwargs in batches]


@torch.no_grad()
def feed_until(block: nn.Module, batches: list, layer: nn.Module, take) -> None:
    """Run ``block`` on each batch up to ``layer``: ``take(x)`` gets ``layer``'s input ``[b, seq, in]``.

    The pass stops there (``StopForward``), so the layers after ``layer`` cost nothing.
    """
    def hook(_module, args):
        take(args[0].detach())
        raise StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        for hidden, kwargs in batches:
            try:
                block(hidden, **kwargs)
            except StopForward:
                pass
    finally:
        handle.remove()
