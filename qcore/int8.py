"""Integer matrix products: int8 codes multiplied exactly, summed in int32, on every CPU and GPU.

W8A8 layers (``qcore.layers.Int8Linear``) quantize their input per token and multiply int8 by
int8: ``y = (q_x @ q_w.T) * s_x * s_w.T + b``. The products must be exact integers whatever the
hardware does; ``int8_matmul`` makes sure of it (``torch._int_mm`` where it is exact and an int8
unit runs it, float32 slices that cannot round elsewhere).
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from qcore.quant import MIN_SCALE, PerChannel, choose_qparams, quantize


# Products of int8 codes summed in float32 stay exact integers while the sum has at most this
# many terms: an activation code down to -128 (asymmetric codes shifted by 128) times a symmetric
# weight code, 1032 * 128 * 127 = 16_775_168 < 2**24.
EXACT_FLOAT32_TERMS = 2**24 // (128 * 127)


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` returns exact int32 sums on this CPU (probed once per process).

    oneDNN's int8 kernels for CPUs without VNNI (AVX2 only, AVX-512 before Cascade Lake) add
    pairs of u8 x s8 products in int16 with saturation (oneDNN, "Nuances of int8 computations"),
    and return sums that are off by thousands; with VNNI or AMX they are exact. The probe is the
    pattern that saturates those kernels for certain: every product ``127 * 127``.
    """
    try:
        for m, k, n in ((1, 64, 8), (33, 1100, 16)):
            a = torch.full((m, k), 127, dtype=torch.int8)
            b = torch.full((k, n), 127, dtype=torch.int8)
            b[:, 1::2] = -127
            if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
                return False
        return True
    except (RuntimeError, NotImplementedError):
        return False


@functools.cache
def cpu_has_int8_dot_product() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX), read from /proc/cpuinfo.

    Without them ``torch._int_mm`` on the CPU is no int8 unit at all: on the project's AVX2 EPYC
    it took 2.3 s for ``[2560, 384] @ [384, 1536]``, where the float32 slices took 0.10 s. Where
    the flags cannot be read (not Linux), False: the slices are exact everywhere.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def int8_matmul_by_float32_slices(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int8 ``a @ b`` from float32 matrix products over slices of ``K <= 1032`` columns.

    ``a`` holds any int8 codes, ``b`` symmetric ones (``|b| <= 127``): every partial sum of a
    slice is an integer of size at most ``1032 * 128 * 127 < 2**24``, which
    float32 holds exactly, so each slice is exact in any summation order, on any CPU; the slices
    are added in int32.

    Example:
        >>> a = torch.full((1, 1041), 127, dtype=torch.int8)  # 1041 * 16129 > 2**24, and odd
        >>> int8_matmul_by_float32_slices(a, a.t()).item() == 1041 * 127 * 127
        True
    """
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device)
    for k in range(0, a.shape[1], EXACT_FLOAT32_TERMS):  # [M, <=1032] @ [<=1032, N] per slice
        out += (a[:, k:k + EXACT_FLOAT32_TERMS].float() @ b[k:k + EXACT_FLOAT32_TERMS].float()).to(torch.int32)
    return out


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` of int8 matrices ``[M, K] @ [K, N]``, accumulated in int32, on every CPU.

    One product reaches ``127**2 = 16129``; a sum of K of them overflows int8 and int16 at
    once, so it is kept in int32 (exact while ``K < 2**31 / 16129``, about 133 000).
    ``torch._int_mm`` (private; oneDNN on the CPU, cuBLASLt on CUDA) computes it where it is exact:
    on CUDA where it accepts the shapes (more than 16 rows, sizes multiples of 8; else the float64
    product, exact below ``2**53``), on a CPU with VNNI or AMX (:func:`cpu_has_int8_dot_product`)
    when :func:`int_mm_is_exact`; other CPUs get :func:`int8_matmul_by_float32_slices` (exact, and
    there faster than ``torch._int_mm``).

    Example:
        >>> a = torch.full((1, 384), 127, dtype=torch.int8)
        >>> int8_matmul(a, -a.t()).item()   # 384 * 127**2: far beyond int16
        -6193536
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul needs int8 inputs, got {a.dtype} and {b.dtype}")
    if a.is_cuda or (cpu_has_int8_dot_product() and int_mm_is_exact()):
        try:
            return torch._int_mm(a, b)
        except (RuntimeError, NotImplementedError):
            pass
    if a.is_cuda:  # float64, not the slices: TF32, when enabled, would round a float32 product
        return (a.double() @ b.double()).to(torch.int32)
    return int8_matmul_by_float32_slices(a, b)


def quantize_per_token(x: torch.Tensor, bits: int = 8):
    """Codes and scales with one symmetric scale per token (row): ``x [T, in] -> scale [T, 1]``.

    Same numbers as ``choose_qparams(x, bits, True, PerChannel(0))`` and ``quantize``.

    Example:
        >>> q, s = quantize_per_token(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
        >>> q.tolist(), round(s[0].item() * 127, 4), s[1].item() == MIN_SCALE
        ([[127, -64], [0, 0]], 1.0, True)
    """
    qp = choose_qparams(x, bits, symmetric=True, granularity=PerChannel(axis=0))
    return quantize(x, qp), qp.scale


def int8_linear(qx: torch.Tensor, sx, qw: torch.Tensor, sw: torch.Tensor, bias=None) -> torch.Tensor:
    """``(qx @ qw.T)`` summed in int32, rescaled: ``* sx * sw.T + bias`` (float32 ``[T, out]``).

    Args:
        qx: int8 ``[T, in]``; sx: its scale ``[T, 1]`` (per token) or a 0-d tensor (per tensor).
        qw: int8 ``[out, in]``; sw: its scale ``[out, 1]``; bias: ``[out]`` or None.

    Example:
        >>> qx = torch.tensor([[100, -100]], dtype=torch.int8)
        >>> qw = torch.tensor([[127, 127], [127, -127]], dtype=torch.int8)
        >>> int8_linear(qx, torch.tensor([[0.5]]), qw, torch.tensor([[1.0], [0.01]]), torch.tensor([1.0, 0.0])).tolist()
        [[1.0, 127.0]]
    """
    y = int8_matmul(qx, qw.t()).to(torch.float32).mul_(sx).mul_(sw.reshape(1, -1))
    return y if bias is None else y.add_(bias)


def asymmetric_int8_linear(qx: torch.Tensor, sx, zx, qw: torch.Tensor, sw: torch.Tensor, bias=None) -> torch.Tensor:
    """W8A8 with asymmetric activation codes: ``((qx - zx) @ qw.T) * sx * sw.T + bias``, exactly.

    ``qx`` are uint8 codes on ``[0, 255]`` with zero-point ``zx``; the weights stay symmetric,
    so the zero-point leaves one term per output channel, a constant of the weights:

        sum_i (qx[t, i] - zx) * qw[o, i] = sum_i qx[t, i] * qw[o, i] - zx * sum_i qw[o, i]

    An int8 unit takes ``qx - 128`` (int8); the shift returns as ``128 * sum_i qw[o, i]``.

    Example:
        >>> qx = torch.tensor([[255, 0]], dtype=torch.uint8)        # x = (q - 10) * 0.5
        >>> qw = torch.tensor([[127, 127], [127, -127]], dtype=torch.int8)
        >>> asymmetric_int8_linear(qx, 0.5, 10, qw, torch.tensor([[1.0], [0.01]])).tolist()
        [[14922.5, 161.9250030517578]]
    """
    if qx.dtype != torch.uint8:
        raise TypeError(f"asymmetric activation codes are uint8, got {qx.dtype}")
    shifted = (qx.to(torch.int16) - 128).to(torch.int8)  # [T, in] on [-128, 127]
    row_sums = qw.to(torch.int32).sum(dim=1)  # [out]: sum_i qw[o, i]
    acc = int8_matmul(shifted, qw.t()) + (128 - torch.as_tensor(zx, dtype=torch.int32)) * row_sums
    y = acc.to(torch.float32).mul_(sx).mul_(sw.reshape(1, -1))
    return y if bias is None else y.add_(bias)
