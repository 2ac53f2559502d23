"""AWQ: activation-aware weight quantization, by per-input-channel scales found on calibration text.

A few input channels of a linear layer carry much larger activations than the rest; their weights
matter more, so AWQ makes them easier to quantize. Input channel ``j`` of the weight is multiplied
by ``s_j`` and the input divided by it: ``(x / s) @ Q(W * s)^T`` instead of ``x @ Q(W)^T``. A channel
with ``s_j > 1`` gets a finer grid relative to its weights (the scale of its group is mostly set
by the other channels). The scales come from the mean activation magnitude:

    s = mean|x|**alpha,  then  s / sqrt(max(s) * min(s))      (normalised as in the reference code)

with ``alpha`` from a grid ``k / n_grid``, ``k = 0..n_grid-1``, chosen to minimise the mean squared
error of the outputs of the layers that share the input. ``alpha = 0`` gives ``s = 1``: plain RTN.
The ``1 / s`` is folded into the operation before (the RMSNorm weight, or the rows of v_proj /
up_proj), the ``s`` into the weights, so the float model computes the same function; then the
weights are RTN-quantized (``qcore.rtn.rtn_weight``).

The reference measures the error on the output of the whole attention (for q/k/v) or MLP (for
gate/up) module on a sample of the tokens; here it is the output of the linear layers themselves,
on all calibration tokens, through their second moment ``H = 2 x^T x / n`` (``qcore.gptq.Hessian``):
``mean ||x D^T||^2 = tr(D H D^T) / 2`` for a weight error ``D``, so a grid point costs ``out * in**2``
flops, not ``tokens * in * out``. The clipping search of the reference (auto_clip) is not done.

Lin et al. 2023, https://arxiv.org/abs/2306.00978.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from qcore.gptq import Hessian, output_error
from qcore.rtn import block_inputs, block_linears, decoder_layers, rtn_weight, run_block

MIN_ACTIVATION = 1e-4  # floor of mean|x|**alpha, as the reference: a dead channel gets a finite scale


def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """``s = mean|x|**alpha`` (floored at 1e-4), divided by ``sqrt(max(s) * min(s))``; ``[in] -> [in]``.

    The normalisation centres the scales around 1 on a log scale (largest and smallest are
    reciprocal); ``alpha = 0`` gives exactly 1.

    Example:
        >>> awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.5).tolist()
        [0.5, 1.0, 2.0]
        >>> awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.0).tolist()
        [1.0, 1.0, 1.0]
    """
    s = act_mean.float().pow(alpha).clamp(min=MIN_ACTIVATION)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(weight: torch.Tensor, act_mean: torch.Tensor, H: torch.Tensor, bits: int = 4,
                 group_size: int | None = 128, symmetric: bool = True, n_grid: int = 20):
    """The AWQ scales ``s`` (``[in]``) of a weight ``[out, in]`` whose RTN output error is least.

    Tries ``alpha = k / n_grid`` (``k = 0..n_grid-1``): ``W_hat = rtn_weight(W * s) / s``, error
    ``output_error(W, W_hat, H)``. ``n_grid=1`` tries only ``alpha = 0`` (RTN).

    Returns:
        ``(s, alpha, errors)``: the best scales, their ``alpha`` and the error of every ``alpha``.

    Example:
        >>> _ = torch.manual_seed(0); x = torch.randn(256, 64) * torch.linspace(0.1, 10, 64)
        >>> h = Hessian(64); h.add_batch(x); W = torch.randn(8, 64)
        >>> s, alpha, errors = search_scale(W, x.abs().mean(0), h.H, bits=3, group_size=32)
        >>> alpha > 0 and min(errors) < errors[0]           # errors[0]: alpha = 0, plain RTN
        True
    """
    weight = weight.detach().float()
    errors = []
    for k in range(n_grid):
        s = awq_scales(act_mean, k / n_grid)                        # [in]
        w_hat = rtn_weight(weight * s, bits, group_size, symmetric) / s
        errors.append(output_error(weight, w_hat, H))
    alpha = min(range(n_grid), key=errors.__getitem__) / n_grid     # the first of equal errors
    return awq_scales(act_mean, alpha), alpha, errors


@torch.no_grad()
def fold_scales(previous: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide what ``previous`` outputs by ``s`` and multiply the inputs columns of ``linears`` by it.

    ``previous`` is a norm (its ``weight`` ``[in]`` and any ``bias`` are divided) or an
    ``nn.Linear`` whose output feeds ``linears`` (its rows and bias are divided). In exact
    arithmetic the block computes the same function afterwards.

    Example:
        >>> norm, lin = torch.nn.LayerNorm(3), torch.nn.Linear(3, 2); x = torch.randn(4, 3)
        >>> before = lin(norm(x)); fold_scales(norm, [lin], torch.tensor([0.5, 2.0, 4.0]))
        >>> torch.allclose(lin(norm(x)), before, atol=1e-6)
        True
    """
    s = s.to(previous.weight.dtype)
    if isinstance(previous, nn.Linear):
        previous.weight.div_(s[:, None])                            # [in_next, in_prev]: output rows
    else:
        previous.weight.div_(s)                                     # [in_next]
    if getattr(previous, "bias", None) is not None:
        previous.bias.div_(s)
    for linear in linears:
        linear.weight.mul_(s[None, :])                              # [out, in_next]: input columns


def scaling_groups(block: nn.Module) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """``(previous op, linears sharing its output)`` of a Llama block that AWQ scales, as the reference.

    input_layernorm -> q/k/v; v_proj -> o_proj only when their shapes match (no grouped-query
    attention: with fewer key-value heads one v row feeds several o columns); post_attention_layernorm
    -> gate/up; up_proj -> down_proj (``down(act(gate(x)) * up(x))`` is linear in up's rows).

    Example:
        >>> from qcore.zoo.causal_lm import tiny_causal_lm          # 4 heads, 2 key-value heads
        >>> [len(lins) for _, lins in scaling_groups(tiny_causal_lm().model.layers[0])]
        [3, 2, 1]
    """
    attn, mlp = block.self_attn, block.mlp
    groups = [(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append((attn.v_proj, [attn.o_proj]))
    groups += [(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]), (mlp.up_proj, [mlp.down_proj])]
    return groups


@torch.no_grad()
def quantize_model_awq(model: nn.Module, calibration_ids: torch.Tensor, bits: int = 4,
                       group_size: int | None = 128, symmetric: bool = True, n_grid: int = 20,
                       batch_size: int = 8, sequential: bool = True, progress: bool = True,
                       inplace: bool = False, stats: list | None = None) -> nn.Module:
    """The model with AWQ scales folded in and every ``nn.Linear`` of its decoder blocks RTN-quantized.

    Block by block: one forward pass records, for each scaled group's input, ``mean|x|`` per
    channel and ``H = 2 x^T x / n`` over all calibration tokens; the scales of every group are
    searched on those float inputs, then folded, then the block is RTN-quantized. With
    ``sequential`` the next block sees the quantized block's outputs (as GPTQ); without, the float
    block's (as the reference code, which quantizes after all scales are found).
    Embeddings and the tied ``lm_head`` stay in float.

    Args:
        calibration_ids: ``[n, seq]`` token ids (no padding).
        n_grid: number of ``alpha`` values tried; 1 gives RTN exactly.
        stats: if a list, one dict per scaled group is appended (block, layers, alpha, and the
            output error of AWQ and of RTN relative to the output's energy).

    Example:
        >>> from qcore.zoo.causal_lm import tiny_causal_lm
        >>> from qcore.rtn import quantize_model_rtn
        >>> m = tiny_causal_lm(); ids = torch.randint(0, 1000, (4, 16))
        >>> a = quantize_model_awq(m, ids, bits=3, group_size=32, n_grid=1, progress=False)
        >>> r = quantize_model_rtn(m, bits=3, group_size=32)
        >>> all(torch.equal(p, q) for p, q in zip(a.parameters(), r.parameters()))   # alpha = 0 only
        True
    """
    model = model if inplace else copy.deepcopy(model)
    batches = block_inputs(model, calibration_ids, batch_size)
    for index, block in enumerate(tqdm(decoder_layers(model), desc="AWQ", disable=not progress)):
        groups = scaling_groups(block)
        act_sum = [torch.zeros(lins[0].in_features, dtype=torch.float64) for _, lins in groups]
        hessians = [Hessian(lins[0].in_features, device=lins[0].weight.device) for _, lins in groups]

        def recorder(g):
            def hook(_module, args):                                # args[0]: [b, seq, in]
                x = args[0].detach()
                act_sum[g].add_(x.abs().reshape(-1, x.shape[-1]).sum(0).double().cpu())
                hessians[g].add_batch(x)
            return hook

        handles = [lins[0].register_forward_pre_hook(recorder(g)) for g, (_, lins) in enumerate(groups)]
        try:
            outputs = run_block(block, batches)                     # the float block's outputs
        finally:
            for h in handles:
                h.remove()
        found = []
        for g, (previous, linears) in enumerate(groups):            # search all on the float inputs,
            W = torch.cat([lin.weight for lin in linears])          # [sum of out, in]
            act_mean = (act_sum[g] / hessians[g].n).to(W.device)
            s, alpha, errors = search_scale(W, act_mean, hessians[g].H, bits, group_size, symmetric, n_grid)
            found.append((previous, linears, s))
            if stats is not None:
                energy = output_error(W, torch.zeros_like(W), hessians[g].H)
                names = [n for n, m in block.named_modules() if any(m is lin for lin in linears)]
                stats.append({"block": index, "layers": tuple(names), "alpha": alpha,
                              "awq": min(errors) / energy, "rtn": errors[0] / energy})
        for previous, linears, s in found:                          # then fold all
            fold_scales(previous, linears, s)
        for linear in block_linears(block).values():
            linear.weight.copy_(rtn_weight(linear.weight, bits, group_size, symmetric))
        batches = run_block(block, batches) if sequential else outputs
    return model
