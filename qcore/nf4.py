"""NF4 (4-bit NormalFloat) block-wise quantization, as in QLoRA (https://arxiv.org/abs/2305.14314).

NF4 is a 16-entry *codebook*, not a float format: a 4-bit code is an index into
``nf4_codebook()``, whose values are quantiles of the standard normal distribution scaled
to ``[-1, 1]``. Pre-trained weights are roughly normal, so each code is used about equally
often. A weight tensor is flattened and cut into blocks of ``block_size`` consecutive
elements; each block keeps one float32 ``absmax`` (the symmetric scale of the block,
``max |w|`` over the block)::

    normalized = w / absmax                           # in [-1, 1]
    code       = argmin_i |normalized - codebook[i]|  # nearest codebook entry, 4 bits
    w_hat      = codebook[code] * absmax

Codes are packed two per byte with ``qcore.packing.pack_int4`` (first element in the high
nibble), which is bitsandbytes' layout: for float32/16 input ``quantize_nf4`` gives the same
bytes and the same absmax as ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``.
Two details make that exact rather than approximate:

* the block is multiplied by the float32 reciprocal ``1 / absmax`` instead of divided by
  ``absmax`` (the two can differ in the last bit), as bitsandbytes does for whole blocks; its
  CPU fallback divides in a trailing partial block, so there a value within one ulp of a
  decision boundary could, in principle, get the neighbouring code;
* "nearest" is decided against the float32 midpoints between neighbouring codebook values,
  and a value exactly on a midpoint takes the *lower* code (``torch.bucketize``,
  ``right=False``), the rule of bitsandbytes' CPU kernel.

Double quantization (QLoRA section 3) stores the absmax values themselves in 8 bits,
see ``quantize_nf4``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from qcore.quant import PerGroup, QParams, choose_qparams, dequantize, quantize
from qcore.packing import pack_int4

__all__ = ["NF4_OFFSET", "ABSMAX_BLOCK_SIZE", "ZERO_CODE", "NF4State", "nf4_codebook",
           "quantize_nf4", "dequantize_nf4", "bits_per_param"]

# Outermost quantile probability of the codebook: 1 - delta with the paper's
# delta = (1/32 + 1/30) / 2, i.e. 0.96770833..., so that the extreme quantile is finite
# (Phi^-1(1) = inf); delta averages half a bin of mass on a 16- and on a 15-quantile grid. bitsandbytes' create_normal_map
# uses this rounded to 7 digits; we use the same literal to reproduce its codebook bit for bit.
NF4_OFFSET = 0.9677083

# Double quantization: the first-level absmax values are quantized in blocks of this many.
ABSMAX_BLOCK_SIZE = 256

# Floor on absmax before taking its reciprocal (bitsandbytes' value): an all-zero block gets
# 0 * 1e38 = 0 instead of 0 * inf = NaN, while a genuinely tiny absmax is still honoured.
_TINY = 1e-38

ZERO_CODE = 7  # nf4_codebook()[7] == 0.0 exactly


@lru_cache(maxsize=1)
def _codebook() -> torch.Tensor:
    # Probabilities in float32 (torch.linspace's default, as bitsandbytes), the inverse normal
    # CDF in float64, then float32 again before normalizing: this order reproduces the
    # bitsandbytes table exactly; the float32 rounding of the probabilities shows at 1e-7.
    p_pos = torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double()  # 8 probabilities, 0.5 dropped
    p_neg = torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double()  # 7 probabilities
    pos = torch.special.ndtri(p_pos)
    neg = -torch.special.ndtri(p_neg)
    values = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).float()
    values = values.sort().values
    return values / values.max()  # max == ndtri(offset): the ends become exactly -1 and +1


@lru_cache(maxsize=1)
def _midpoints() -> torch.Tensor:
    cb = _codebook()
    return (cb[:-1] + cb[1:]) / 2  # [15] decision boundaries, float32


# Nearest-code lookup: [-1, 1] cut into _LUT_BINS equal bins; a bin that holds a decision
# boundary, or touches one that does, is marked _UNSURE and its values take the exact search.
_LUT_BINS = 1 << 14
_UNSURE = 255


@lru_cache(maxsize=1)
def _code_table() -> torch.Tensor:
    edges = torch.linspace(-1.0, 1.0, _LUT_BINS + 1, dtype=torch.float64)
    mids = _midpoints().double()
    table = torch.bucketize(edges[:-1], mids).to(torch.uint8)            # code at each bin start
    holds = torch.bucketize(edges[:-1], mids) != torch.bucketize(edges[1:], mids, right=True)
    unsure = holds.clone()
    unsure[1:] |= holds[:-1]   # the float rounding of a bin index is off by at most one bin,
    unsure[:-1] |= holds[1:]   # so neighbours of a boundary's bin are unsure too
    table[unsure] = _UNSURE
    return table


def _nearest_codes(normalized: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook value for values in [-1, 1], exactly as ``bucketize``.

    ``torch.bucketize`` (a binary search per element) runs on one CPU thread; a table of
    ``_LUT_BINS`` bins answers all but the values near a decision boundary (about 0.3% of
    them), which still take the exact search. Ties go to the lower code either way.

    Example:
        >>> x = torch.linspace(-1, 1, 10001)
        >>> torch.equal(_nearest_codes(x).long(), torch.bucketize(x, _midpoints()))
        True
    """
    table = _code_table().to(normalized.device)
    index = ((normalized + 1.0) * (_LUT_BINS / 2)).to(torch.int32).clamp_(0, _LUT_BINS - 1)
    codes = table[index]
    unsure = codes == _UNSURE
    if unsure.any():
        exact = torch.bucketize(normalized[unsure], _midpoints().to(normalized.device))
        codes[unsure] = exact.to(torch.uint8)
    return codes


def nf4_codebook() -> torch.Tensor:
    """The 16 NF4 values: normal quantiles normalized to ``[-1, 1]``, sorted ascending.

    With ``o = NF4_OFFSET`` and ``Phi^-1`` the inverse standard normal CDF
    (``torch.special.ndtri``)::

        positive  = Phi^-1(linspace(o, 1/2, 9)[:-1])      # 8 values
        negative  = -Phi^-1(linspace(o, 1/2, 8)[:-1])     # 7 values
        codebook  = sort(negative + [0] + positive) / Phi^-1(o)

    The type is asymmetric (8 positive, 7 negative values) so that 0 is represented
    exactly, which matters for zero padding and pruned weights. ``codebook[7] == 0``.

    Returns:
        float32 tensor ``[16]``, equal to bitsandbytes' ``get_4bit_type("nf4")``.

    Example:
        >>> cb = nf4_codebook()
        >>> cb.shape, cb[0].item(), cb[7].item(), cb[15].item()
        (torch.Size([16]), -1.0, 0.0, 1.0)
        >>> [round(v, 4) for v in cb[6:10].tolist()]
        [-0.0911, 0.0, 0.0796, 0.1609]
    """
    return _codebook().clone()


@dataclass(frozen=True, eq=False)
class NF4State:
    """Everything but the packed codes that ``dequantize_nf4`` needs.

    Exactly one of two forms holds the per-block scales (``n_blocks = ceil(numel / block_size)``):

    * plain: ``absmax`` float32 ``[n_blocks]``, the other three fields ``None``;
    * double-quantized: ``absmax`` is ``None`` and
      ``absmax ~= absmax_codes * absmax_scale[block // 256] + absmax_offset``, with
      ``absmax_codes`` int8 ``[n_blocks]``, ``absmax_scale`` float32
      ``[ceil(n_blocks / 256)]`` and ``absmax_offset`` a float32 0-d tensor (their mean).

    Attributes:
        shape, dtype: of the original tensor, restored by ``dequantize_nf4``.
        block_size: elements per block sharing one absmax.

    Example:
        >>> _, st = quantize_nf4(torch.ones(2, 100), block_size=64)
        >>> st.shape, st.n_blocks, st.double_quant, st.block_absmax().tolist()
        (torch.Size([2, 100]), 4, False, [1.0, 1.0, 1.0, 1.0])
    """

    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    absmax: torch.Tensor | None = None
    absmax_codes: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def numel(self) -> int:
        """Number of elements of the original tensor."""
        return torch.Size(self.shape).numel()

    @property
    def n_blocks(self) -> int:
        """Number of blocks, ``ceil(numel / block_size)``."""
        return -(-self.numel // self.block_size)

    @property
    def double_quant(self) -> bool:
        """Whether the absmax values are stored double-quantized (8-bit codes)."""
        return self.absmax is None

    def block_absmax(self) -> torch.Tensor:
        """Float32 absmax per block ``[n_blocks]``: stored, or rebuilt from its 8-bit codes."""
        if not self.double_quant:
            return self.absmax
        return _dequantize_absmax(self.absmax_codes, self.absmax_scale, self.absmax_offset)


# ----------------------------------------------------------------------------- double quant
def _absmax_qparams(scale: torch.Tensor) -> QParams:
    zero_point = torch.zeros_like(scale, dtype=torch.int32)
    return QParams(scale, zero_point, bits=8, symmetric=True,
                   granularity=PerGroup(ABSMAX_BLOCK_SIZE))


def _quantize_absmax(absmax: torch.Tensor):
    """``absmax [n_blocks]`` -> (int8 codes ``[n_blocks]``, scales ``[G]``, offset ``[]``)."""
    offset = absmax.mean()
    n = absmax.numel()
    # Pad with zeros to whole groups of 256: a 0 never raises a group's max |x|.
    centered = F.pad(absmax - offset, (0, (-n) % ABSMAX_BLOCK_SIZE))  # [G * 256]
    qp = choose_qparams(centered, bits=8, symmetric=True,
                        granularity=PerGroup(ABSMAX_BLOCK_SIZE))
    return quantize(centered, qp)[:n], qp.scale, offset


def _dequantize_absmax(codes, scale, offset) -> torch.Tensor:
    n = codes.numel()
    padded = F.pad(codes, (0, (-n) % ABSMAX_BLOCK_SIZE))
    absmax = dequantize(padded, _absmax_qparams(scale))[:n] + offset
    # The 8-bit reconstruction may undershoot a (near-)zero absmax by half a step; a negative
    # scale would flip the block's signs, so clamp (bitsandbytes does not).
    return absmax.clamp(min=0.0)


# ----------------------------------------------------------------------------- NF4
def quantize_nf4(w: torch.Tensor, block_size: int = 64,
                 double_quant: bool = False) -> tuple[torch.Tensor, NF4State]:
    """Block-wise NF4 codes of ``w``, packed two per byte, and their ``NF4State``.

    Per block ``b`` of ``block_size`` consecutive elements of ``w.flatten()``::

        absmax[b] = max |w_b|
        code      = nearest(w_b * (1 / absmax[b]), nf4_codebook())

    The last block is padded with zeros when ``numel`` is not a multiple of ``block_size``;
    padding does not change that block's absmax and is not stored. When ``numel`` is odd the
    last byte's low nibble holds ``ZERO_CODE`` (the code of a 0.0 pad, as bitsandbytes).

    ``double_quant=True`` (QLoRA's double quantization) stores the absmax values in 8 bits:
    their mean (``absmax_offset``) is subtracted, then each run of ``ABSMAX_BLOCK_SIZE`` = 256
    values gets one float32 scale on qcore's *symmetric int8* grid (``scale = max|x| / 127``,
    codes in [-127, 127], ``qcore.quant.quantize``). bitsandbytes instead rounds to the
    nearest entry of its 8-bit *dynamic* map (sign, a dynamic exponent and a linear
    fraction): finer than ours near 0, coarser near the ends (steps up to 0.014 of the
    block max versus our uniform 1/127 = 0.008). Both cost 8 bits per absmax plus one float32
    per 256 absmax, so the two reconstructions differ only by fractions of a percent.

    Args:
        w: any shape, ``numel >= 1``; float16/bfloat16 are computed in float32.
        block_size: elements per absmax (bitsandbytes allows powers of two 32 .. 4096).
        double_quant: also quantize the absmax values to 8 bits.

    Returns:
        ``(packed, state)``: uint8 ``packed [ceil(numel / 2)]`` and an ``NF4State``.

    Example:
        >>> packed, st = quantize_nf4(torch.tensor([0.0, -1.0, 0.5, 2.0]), block_size=2)
        >>> st.absmax.tolist(), [hex(b) for b in packed.tolist()]   # codes 7, 0 | 10, 15
        ([1.0, 2.0], ['0x70', '0xaf'])
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    blocks = F.pad(flat, (0, n_blocks * block_size - n)).view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)                                  # [n_blocks]
    inv = (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1)                 # [n_blocks, 1]
    normalized = (blocks * inv).clamp(-1.0, 1.0)                       # [n_blocks, block_size]
    # Index of the first midpoint >= x, i.e. the nearest value; exact ties go to the lower code.
    codes = _nearest_codes(normalized.reshape(-1))[:n]                 # [n] uint8 in [0, 15]
    if n % 2:  # a byte holds two codes: complete the last one with the code of 0.0
        codes = torch.cat([codes, codes.new_tensor([ZERO_CODE])])
    packed = pack_int4(codes)
    if double_quant:
        q, scale, offset = _quantize_absmax(absmax)
        state = NF4State(w.shape, w.dtype, block_size, absmax_codes=q, absmax_scale=scale,
                         absmax_offset=offset)
    else:
        state = NF4State(w.shape, w.dtype, block_size, absmax=absmax)
    return packed, state


@lru_cache(maxsize=None)
def _byte_table(device: str) -> torch.Tensor:
    """``[256, 2]``: the codebook values of a packed byte's high and low nibble."""
    cb = _codebook()
    return torch.stack([cb.repeat_interleave(16), cb.repeat(16)], dim=1).to(device)


def dequantize_nf4(packed: torch.Tensor, state: NF4State, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild ``w_hat = nf4_codebook()[code] * absmax[block]`` with the original shape.

    The product is taken in float32 and then cast to ``dtype`` (default ``state.dtype``). Each
    packed byte is looked up as its pair of codebook values in one gather (``F.embedding`` on a
    256 x 2 table), about 7x faster on a CPU than unpacking the codes first; that matters because
    QLoRA training dequantizes every weight twice a step.

    Args:
        packed: uint8 ``[ceil(numel / 2)]`` from ``quantize_nf4`` (any shape with that many
            bytes, e.g. bitsandbytes' ``[ceil(numel / 2), 1]``).
        state: the matching ``NF4State``.

    Example:
        >>> w = torch.tensor([[0.0, -1.0], [0.5, 2.0]], dtype=torch.float16)
        >>> w_hat = dequantize_nf4(*quantize_nf4(w, block_size=2))
        >>> w_hat.dtype, w_hat.tolist()
        (torch.float16, [[0.0, -1.0], [0.4921875, 2.0]])
    """
    n, bs = state.numel, state.block_size
    pairs = F.embedding(packed.reshape(-1).long(), _byte_table(str(packed.device)))  # [bytes, 2]
    values = pairs.reshape(-1)[:n]                                                     # [n] in [-1, 1]
    blocks = F.pad(values, (0, state.n_blocks * bs - n)).view(state.n_blocks, bs)
    w_hat = (blocks * state.block_absmax().unsqueeze(1)).reshape(-1)[:n]
    return w_hat.reshape(state.shape).to(dtype or state.dtype)


def bits_per_param(state: NF4State) -> float:
    """Storage cost per weight in bits, ignoring padding and the single float32 offset.

    Plain: ``4 + 32 / block_size``. Double-quantized:
    ``4 + 8 / block_size + 32 / (block_size * 256)``.

    Example:
        >>> w = torch.randn(64, 64)
        >>> bits_per_param(quantize_nf4(w)[1])
        4.5
        >>> round(bits_per_param(quantize_nf4(w, double_quant=True)[1]), 3)
        4.127
    """
    bs = state.block_size
    if state.double_quant:
        return 4 + 8 / bs + 32 / (bs * ABSMAX_BLOCK_SIZE)
    return 4 + 32 / bs
