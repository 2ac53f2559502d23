"""Sub-byte packing: 2-bit and 4-bit integer codes, several to a byte, first element in the high bits.

The byte layout of bitsandbytes' 4-bit formats: ``pack_int4([a, b]) == (a << 4) | b``. Codes are
unsigned; signed codes (a symmetric grid) are offset by ``2**(bits-1)`` first, the ``-qmin`` of
the full signed grid (``[-8, 7] -> [0, 15]``), as qcore's layers do: the nibble 8 means 0.
"""
from __future__ import annotations

import torch


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-wide codes (2 or 4) into bytes, first element in the high bits.

    The tensor is flattened; a last partial byte is padded with zero codes. Signed codes
    are offset first (``q + 2**(bits-1)``). 4-bit packing matches bitsandbytes' byte layout.

    Args:
        codes: integers in ``[0, 2**bits - 1]``, any shape with ``n`` elements.

    Returns:
        uint8 tensor ``[ceil(n * bits / 8)]``.

    Example:
        >>> pack(torch.tensor([1, 2, 15]), bits=4).tolist()   # 0x12, 0xF0
        [18, 240]
    """
    if bits not in (2, 4):
        raise ValueError(f"pack supports 2 or 4 bits, got {bits}")
    per_byte = 8 // bits
    flat = codes.reshape(-1)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}] to pack into {bits} bits; "
                         "offset signed codes by 2**(bits-1) first")
    flat = flat.to(torch.uint8)
    pad = (-flat.numel()) % per_byte
    flat = torch.nn.functional.pad(flat, (0, pad)).view(-1, per_byte)  # [n_bytes, per_byte]
    packed = flat[:, 0] << (8 - bits)                                  # the first code: high bits
    for k in range(1, per_byte):
        packed |= flat[:, k] << (8 - bits * (k + 1))
    return packed


def unpack(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of ``pack``: uint8 codes of the given ``shape``.

    Example:
        >>> unpack(torch.tensor([18, 240], dtype=torch.uint8), bits=4, shape=(3,)).tolist()
        [1, 2, 15]
    """
    if bits not in (2, 4):
        raise ValueError(f"unpack supports 2 or 4 bits, got {bits}")
    per_byte = 8 // bits
    n = 1
    for d in shape:
        n *= d
    if packed.numel() != -(-n // per_byte):
        raise ValueError(f"{packed.numel()} bytes cannot hold shape {tuple(shape)} at {bits} bits")
    packed = packed.reshape(-1).to(torch.uint8)
    mask = 2**bits - 1
    parts = [(packed >> (8 - bits * (k + 1))) & mask for k in range(per_byte)]  # high bits first
    codes = torch.stack(parts, dim=1).reshape(-1)                       # [n_bytes * per_byte]
    return codes[:n].reshape(shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, the first in the high nibble (``pack(codes, 4)``).

    Example:
        >>> pack_int4(torch.tensor([[7, 8], [0, 15]])).tolist()
        [120, 15]
    """
    return pack(codes, 4)


def unpack_int4(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``pack_int4``.

    Example:
        >>> unpack_int4(torch.tensor([120, 15], dtype=torch.uint8), (2, 2)).tolist()
        [[7, 8], [0, 15]]
    """
    return unpack(packed, 4, shape)


def pack_int2(codes: torch.Tensor) -> torch.Tensor:
    """Four 2-bit codes per byte, the first in the two highest bits (``pack(codes, 2)``).

    Example:
        >>> pack_int2(torch.tensor([3, 0, 1, 2])).tolist()   # 0b11_00_01_10
        [198]
    """
    return pack(codes, 2)


def unpack_int2(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of ``pack_int2``.

    Example:
        >>> unpack_int2(torch.tensor([198], dtype=torch.uint8), (4,)).tolist()
        [3, 0, 1, 2]
    """
    return unpack(packed, 2, shape)
