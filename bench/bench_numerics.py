"""qcore's numerics against the libraries they imitate, measured side by side in one run.

Usage: ``python bench/bench_numerics.py [--repeats N] [--size N]`` (``make bench``).
Each row times qcore and the reference on the same input, on the same machine, one after
the other, and prints the ratio (qcore / reference) next to its target.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import logging
import platform
import sys
import warnings

import torch

from qcore.measure import describe_device, latency
from qcore.nf4 import dequantize_nf4, quantize_nf4
from qcore.quant import PerChannel, choose_qparams, fake_quantize


def _quiet_bitsandbytes():
    """Import bitsandbytes without its optional-kernel chatter on CPU."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as bnbf
    return bnbf


def rows(size: int, repeats: int):
    """Yield (name, qcore Latency, reference Latency, target ratio)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(size, size, generator=g)

    qp = choose_qparams(w, bits=8, symmetric=True, granularity=PerChannel(axis=0))
    scale, zp = qp.scale.flatten(), qp.zero_point.flatten()
    with torch.no_grad():
        ours = latency(lambda: fake_quantize(w, qp), repeats=repeats)
        ref = latency(lambda: torch.fake_quantize_per_channel_affine(w, scale, zp, 0, qp.qmin, qp.qmax),
                      repeats=repeats)
    yield f"fake_quantize per-channel int8 {size}x{size} (forward)", ours, ref, 2.0

    wg = w.clone().requires_grad_()
    ours = latency(lambda: fake_quantize(wg, qp).sum().backward(), repeats=repeats)
    ref = latency(lambda: torch.fake_quantize_per_channel_affine(wg, scale, zp, 0, qp.qmin, qp.qmax)
                  .sum().backward(), repeats=repeats)
    yield f"fake_quantize per-channel int8 {size}x{size} (forward+backward)", ours, ref, 2.0

    bnbf = _quiet_bitsandbytes()

    def qcore_nf4():
        packed, state = quantize_nf4(w, block_size=64)
        return dequantize_nf4(packed, state)

    def bnb_nf4():
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        return bnbf.dequantize_4bit(packed, state)

    ours = latency(qcore_nf4, repeats=repeats)
    ref = latency(bnb_nf4, repeats=repeats)
    yield f"NF4 quantize+dequantize {size}x{size}, block 64 (vs bitsandbytes CPU)", ours, ref, 3.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    print(f"# qcore benchmarks, {datetime.date.today()}, torch {torch.__version__}, "
          f"python {platform.python_version()}")
    print(f"# {describe_device()}")
    print()
    print("| benchmark | qcore (ms) | reference (ms) | ratio | target | met |")
    print("| --- | ---: | ---: | ---: | ---: | :---: |")
    all_met = True
    for name, ours, ref, target in rows(args.size, args.repeats):
        ratio = ours.median_ms / ref.median_ms
        met = ratio <= target
        all_met &= met
        print(f"| {name} | {ours.median_ms:.1f} | {ref.median_ms:.1f} | {ratio:.2f}x | "
              f"<= {target:.0f}x | {'yes' if met else 'NO'} |", flush=True)
    print()
    print(f"medians of {args.repeats} runs after 3 warm-up runs")
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
