"""The GPU path, checked on a machine with CUDA (not part of CI, which has no GPU).

Usage: ``python bench/gpu_check.py``. Checks that qcore's numerics run on CUDA tensors and
agree with torch and bitsandbytes there, that the device policy picks bf16/fp16, and prints
the speed ratios of ``make bench`` measured on the GPU.
"""
from __future__ import annotations

import sys

import torch

from qcore.measure import describe_device, latency
from qcore.nf4 import dequantize_nf4, quantize_nf4
from qcore.quant import PerChannel, PerGroup, choose_qparams, dequantize, fake_quantize, quantize
from qcore.train import compute_dtype, pick_device


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    failures = []

    def check(name, ok, detail=""):
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")
        if not ok:
            failures.append(name)

    print(f"torch {torch.__version__}; {describe_device()}")
    dev = pick_device()
    check("pick_device is cuda", dev == "cuda")
    check("compute dtype", compute_dtype(dev) in (torch.bfloat16, torch.float16), str(compute_dtype(dev)))

    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 4096, device="cuda", generator=g)
    qp = choose_qparams(w, 8, True, PerChannel(0))
    check("qparams stay on the GPU", qp.scale.is_cuda and qp.zero_point.is_cuda)
    ours = fake_quantize(w, qp)
    ref = torch.fake_quantize_per_channel_affine(w, qp.scale.flatten(), qp.zero_point.flatten(), 0, qp.qmin, qp.qmax)
    mismatch = (ours != ref).float().mean().item()
    check("fake_quantize per-channel equals torch on CUDA (except rare ties)", mismatch < 1e-5, f"mismatch {mismatch:.2e}")
    wg = w[:, :1024]
    qg = choose_qparams(wg, 4, True, PerGroup(128))
    err = (wg - dequantize(quantize(wg, qg), qg)).abs().max().item()
    check("per-group int4 round trip within half a step", err <= qg.scale.max().item() / 2 * (1 + 1e-5), f"{err:.4g}")

    with torch.no_grad():
        t_ours = latency(lambda: fake_quantize(w, qp), repeats=20, device="cuda")
        t_ref = latency(lambda: torch.fake_quantize_per_channel_affine(w, qp.scale.flatten(), qp.zero_point.flatten(),
                                                                       0, qp.qmin, qp.qmax), repeats=20, device="cuda")
    print(f"| fake_quantize per-channel 4096x4096 (GPU) | {t_ours.median_ms:.3f} ms | torch {t_ref.median_ms:.3f} ms "
          f"| {t_ours.median_ms / t_ref.median_ms:.2f}x |")

    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001 - report any import failure
        check("bitsandbytes imports", False, repr(e))
        return 1
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(1024, 1024, device="cuda", generator=g).to(dtype)
        packed, state = quantize_nf4(x, block_size=64)
        bp, bs = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4")
        same_bytes = torch.equal(packed.flatten().cpu(), bp.flatten().cpu())
        same_absmax = torch.equal(state.absmax.float().cpu(), bs.absmax.float().cpu())
        frac = (packed.flatten().cpu() != bp.flatten().cpu()).float().mean().item()
        check(f"NF4 bytes equal bitsandbytes CUDA ({dtype})", same_bytes and same_absmax,
              f"absmax equal {same_absmax}, byte mismatch {frac:.2e}")
        deq = dequantize_nf4(packed, state)
        bdeq = bnbf.dequantize_4bit(bp, bs)
        check(f"NF4 dequantize equals bitsandbytes CUDA ({dtype})", torch.equal(deq.cpu(), bdeq.cpu()),
              f"max diff {(deq.float() - bdeq.float()).abs().max().item():.3g}")
    x = torch.randn(256, 1024, device="cuda", generator=g)
    packed, state = quantize_nf4(x, block_size=64, double_quant=True)
    bp, bs = bnbf.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    close = (dequantize_nf4(packed, state) - bnbf.dequantize_4bit(bp, bs)).abs().max().item()
    check("NF4 double quantization close to bitsandbytes CUDA", torch.equal(packed.flatten().cpu(), bp.flatten().cpu())
          and close < 0.05, f"max diff {close:.3g}")
    t_ours = latency(lambda: dequantize_nf4(*quantize_nf4(w, block_size=64)), repeats=10, device="cuda")
    t_ref = latency(lambda: bnbf.dequantize_4bit(*bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")),
                    repeats=10, device="cuda")
    print(f"| NF4 quantize+dequantize 4096x4096 (GPU) | {t_ours.median_ms:.3f} ms | bitsandbytes {t_ref.median_ms:.3f} ms "
          f"| {t_ours.median_ms / t_ref.median_ms:.2f}x |")
    print("GPU check:", "all passed" if not failures else f"{len(failures)} failed: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
