"""GPTQ: weight-only quantization that feeds each column's rounding error forward to the columns not yet quantized.

For one linear layer with calibration inputs ``X`` (``[n, in]``) GPTQ looks for quantized weights
``W_hat`` with a small layer-output error ``||X W^T - X W_hat^T||^2``. That error is a quadratic form
in each row's weight error with Hessian ``H = 2 X^T X / n`` (``[in, in]``, shared by all rows). GPTQ
quantizes the columns left to right; after column ``i`` is rounded, the optimal correction of the
remaining columns (Optimal Brain Surgeon) is

    W[:, i:] -= (W[:, i] - W_hat[:, i]) / U[i, i] * U[i, i:]

where ``U`` is the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``): its row ``i`` is the inverse
Hessian of the columns ``i..in-1`` with the earlier ones eliminated, so no inverse is ever updated.
Lazy batches apply the correction inside a block of ``lazy_block_size`` columns at once, and to
the columns after the block with one matrix product when the block is done (the same numbers,
fewer memory passes). With ``group_size``, a group's scale is chosen when its first column comes up,
from the weights as corrected so far.

Frantar, Ashkboos, Hoefler, Alistarh 2022, https://arxiv.org/abs/2210.17323 (Algorithm 1).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qcore.quant import PerChannel, PerGroup, QParams, choose_qparams, dequantize, quantize
from qcore.rtn import SUBLAYER_GROUPS, block_inputs, decoder_layers, feed_until, rtn_weight, run_block


class Hessian:
    """The running mean ``H = 2 X^T X / n`` over every input row seen, ``[in, in]`` in float32.

    ``add_batch(x)`` takes ``x`` of shape ``[..., in]`` (all leading dimensions are rows, e.g.
    ``[batch, seq, in]``): ``H <- H * n / (n + m) + 2 x^T x / (n + m)`` for ``m`` new rows. The
    reference code divides by the number of sequences instead of rows; GPTQ's result does not
    depend on the scale of ``H`` (the damping is relative to it).

    Example:
        >>> h = Hessian(2); h.add_batch(torch.tensor([[1.0, 0.0]])); h.add_batch(torch.tensor([[[0.0, 3.0]]]))
        >>> h.H.tolist(), h.n
        ([[1.0, 0.0], [0.0, 9.0]], 2)
    """

    def __init__(self, in_features: int, device=None):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, self.H.shape[0]).float()        # [m, in]
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        self.H.addmm_(x.T, x, alpha=2.0 / self.n)                    # the new rows' share, 2 x^T x / n


def output_error(weight: torch.Tensor, weight_hat: torch.Tensor, H: torch.Tensor) -> float:
    """Mean over inputs of ``||x (W - W_hat)^T||^2``, from ``H = 2 x^T x / n``: ``tr(D H D^T) / 2``.

    Example:
        >>> _ = torch.manual_seed(0); x = torch.randn(50, 4); W = torch.randn(3, 4); V = torch.randn(3, 4)
        >>> h = Hessian(4); h.add_batch(x)
        >>> abs(output_error(W, V, h.H) - ((x @ (W - V).T) ** 2).sum(1).mean().item()) < 1e-4
        True
    """
    D = (weight - weight_hat).float()                               # [out, in]
    return float(((D @ H.float()) * D).sum(dtype=torch.float64)) / 2  # float32 products, float64 sum


@contextlib.contextmanager
def _one_thread():
    """Run many small tensor operations on one thread: with two, each one pays a thread
    synchronisation, which costs 10x the arithmetic on a busy 2-core machine (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class GPTQResult:
    """``weight`` (dequantized, ``[out, in]``), integer ``codes`` and the ``qparams`` they sit on."""

    weight: torch.Tensor
    codes: torch.Tensor
    qparams: QParams


@torch.no_grad()
def gptq_quantize_weight(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int | None = None,
                         symmetric: bool = True, percdamp: float = 0.01,
                         lazy_block_size: int = 128) -> GPTQResult:
    """GPTQ of one weight ``[out, in]`` given the Hessian ``H`` (``[in, in]``) of its inputs.

    Args:
        weight: ``[out, in]``; not changed.
        H: ``2 X^T X / n`` (``Hessian``); not changed. Inputs with ``H_ii = 0`` (never nonzero in
            the calibration data) are "dead": their weights are set to 0 and ``H_ii`` to 1, as in
            the reference code.
        bits, group_size, symmetric: the grid, as ``qcore.rtn.rtn_weight``; ``group_size=None``
            gives one scale per output channel, from the weights before any correction.
        percdamp: ``percdamp * mean(diag H)`` is added to the diagonal (keeps ``H`` invertible).
        lazy_block_size: columns per lazy batch (the paper's B = 128); the result does not depend
            on it beyond float rounding.

    Returns:
        ``GPTQResult``: ``weight == dequantize(codes, qparams)`` in float32; the computation runs in
        float64 when ``weight`` or ``H`` is float64, else in float32.

    Example:
        >>> X = torch.tensor([[1.0, 1.0], [1.0, 0.8]]); W = torch.tensor([[1.2, 0.5], [0.8, 1.5]])
        >>> r = gptq_quantize_weight(W, 2 * X.T @ X / 2, bits=2)       # grid {-1, 0, 1} * max|row|
        >>> r.codes.tolist(), r.weight.tolist()       # row 2: 0.8 rounds up to 1.5, so 1.5 goes to 0
        ([[1, 0], [1, 0]], [[1.2000000476837158, 0.0], [1.5, 0.0]])
        >>> from qcore.rtn import rtn_weight
        >>> [round(((X @ W.T - X @ v.T) ** 2).sum().item(), 2) for v in (r.weight, rtn_weight(W, 2))]
        [1.3, 1.39]
    """
    dtype = torch.float64 if torch.float64 in (weight.dtype, H.dtype) else torch.float32
    W = weight.detach().to(dtype).clone()                            # [out, in], corrected in place
    H = H.detach().to(dtype).clone()
    out_features, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    idx = torch.arange(columns, device=W.device)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    # Upper Cholesky factor of H^-1: H = L L^T -> H^-1 -> H^-1 = U^T U
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    per_channel = group_size is None
    gran = PerChannel(axis=0) if per_channel else PerGroup(group_size)
    if not per_channel and columns % group_size:
        raise ValueError(f"in_features={columns} is not a multiple of group_size={group_size}")
    width = columns if per_channel else group_size
    with _one_thread():
        codes, scales, zero_points = _quantize_columns(W, U, bits, width, symmetric, lazy_block_size)
    qparams = QParams(torch.cat(scales, 1), torch.cat(zero_points, 1), bits, symmetric, gran)
    return GPTQResult(dequantize(codes, qparams), codes, qparams)


def _quantize_columns(W, U, bits, width, symmetric, lazy_block_size):
    """The column loop of ``gptq_quantize_weight`` on ``W`` (``[out, in]``, corrected in place) with
    ``U`` the upper Cholesky factor of the damped ``H^-1``; a scale per ``width`` columns."""
    out_features, columns = W.shape
    codes, scales, zero_points, qp = None, [], [], None
    for b0 in range(0, columns, lazy_block_size):
        b1 = min(b0 + lazy_block_size, columns)
        W1 = W[:, b0:b1].clone()                                      # [out, B], this block's columns
        Err1 = torch.zeros_like(W1)                                   # [out, B], scaled errors
        U1 = U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % width == 0:                                      # a group starts: its scale, now
                g1 = col + width
                current = W1[:, i:min(g1, b1) - b0]                   # corrected up to this column
                if g1 > b1:                                           # the group runs past the block:
                    pending = Err1[:, :i] @ U[b0:col, b1:g1]          # the block's corrections not yet
                    current = torch.cat([current, W[:, b1:g1] - pending], 1)  # applied out there
                qp = choose_qparams(current, bits, symmetric, PerChannel(axis=0))  # scale [out, 1]
                scales.append(qp.scale)
                zero_points.append(qp.zero_point)
            w = W1[:, i:i + 1]                                        # [out, 1]
            q = quantize(w, qp)                                       # [out, 1] integer codes
            if codes is None:
                codes = torch.empty(out_features, columns, dtype=q.dtype, device=W.device)
            codes[:, col] = q[:, 0]
            err = (w - dequantize(q, qp).to(W.dtype)) / U1[i, i]      # [out, 1]
            W1[:, i:] -= err * U1[i:i + 1, i:]                        # rank-1 correction inside the block
            Err1[:, i:i + 1] = err
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]                             # the block's corrections, at once
    return codes, scales, zero_points


@torch.no_grad()
def quantize_model_gptq(model: nn.Module, calibration_ids: torch.Tensor, bits: int = 4,
                        group_size: int | None = 128, symmetric: bool = True, percdamp: float = 0.01,
                        lazy_block_size: int = 128, batch_size: int = 8, progress: bool = True,
                        inplace: bool = False, stats: list | None = None) -> nn.Module:
    """The model with every ``nn.Linear`` of its decoder blocks quantized by GPTQ (fake-quantized).

    Sequential, as the reference: the calibration text runs up to the first block; each block is
    quantized on the inputs that the already-quantized blocks before it produce, and within a block
    q/k/v (one Hessian: they share their input), then o_proj, gate/up, down_proj, each on inputs
    computed with the layers before it already quantized. Layers sharing an input are quantized as
    one stacked weight (GPTQ treats the rows independently, so this changes nothing but the speed).
    Embeddings and the tied ``lm_head`` stay in float.

    Args:
        calibration_ids: ``[n, seq]`` token ids (no padding).
        batch_size: calibration sequences per forward pass.
        stats: if a list, one dict per quantized group is appended (block, layers, layer-output
            error of GPTQ and of RTN on the same grid, relative to the output's energy).

    Example:
        >>> from qcore.zoo.causal_lm import tiny_causal_lm
        >>> m = tiny_causal_lm(); ids = torch.randint(0, 1000, (4, 16))
        >>> q = quantize_model_gptq(m, ids, bits=3, group_size=32, progress=False)
        >>> w, r = q.model.layers[1].self_attn.o_proj.weight, m.model.layers[1].self_attn.o_proj.weight
        >>> w.shape == r.shape and not torch.equal(w, r) and torch.equal(q.lm_head.weight, m.lm_head.weight)
        True
    """
    model = model if inplace else copy.deepcopy(model)
    batches = block_inputs(model, calibration_ids, batch_size)
    for index, block in enumerate(tqdm(decoder_layers(model), desc="GPTQ", disable=not progress)):
        for names in SUBLAYER_GROUPS:
            linears = [block.get_submodule(n) for n in names]
            hessian = Hessian(linears[0].in_features, device=linears[0].weight.device)
            feed_until(block, batches, linears[0], hessian.add_batch)
            W = torch.cat([lin.weight for lin in linears])           # [sum of out, in]
            result = gptq_quantize_weight(W, hessian.H, bits, group_size, symmetric, percdamp, lazy_block_size)
            if stats is not None:                                     # errors relative to the output's energy
                base = output_error(W, torch.zeros_like(W), hessian.H)
                stats.append({"block": index, "layers": names,
                              "gptq": output_error(W, result.weight, hessian.H) / base,
                              "rtn": output_error(W, rtn_weight(W, bits, group_size, symmetric), hessian.H) / base})
            for lin, part in zip(linears, result.weight.split([lin.out_features for lin in linears])):
                lin.weight.copy_(part.to(lin.weight.dtype))
        batches = run_block(block, batches)
    return model
