"""Lab 6's headline numbers: RTN, GPTQ and AWQ on SmolLM2 by perplexity on held-out Austen.

Usage: ``python bench/bench_llm_weights.py [--eval-tokens N] [--calibration K]``.

qcore's implementations (``qcore.rtn``, ``qcore.gptq``, ``qcore.awq``), the lab's settings:
calibration on K sequences of 512 tokens of *Emma*, perplexity on the first N tokens of
*Persuasion* in windows of 512, symmetric grids with groups of 64, at 3 and 4 bits. Each method is
compared with RTN on the same grid *paired* (per-token NLL differences, standard error by windows;
``qcore.zoo.perplexity.paired_nll_difference``).

Targets: at 3 bits GPTQ and AWQ each beat RTN by more than two paired standard errors; GPTQ beats
AWQ at 3 bits (the same test). Recorded: every perplexity with its standard error, the 4-bit
comparisons, the seconds to quantize. Exit status 1 when a target is missed; the numbers printed
are measured in this run, nothing is stored.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

import torch
from bench_ptq import TargetTable  # this folder: the same table as `make bench`

from qcore.awq import quantize_model_awq
from qcore.gptq import quantize_model_gptq
from qcore.measure import describe_device
from qcore.notebook import quiet
from qcore.rtn import quantize_model_rtn
from qcore.train import set_threads
from qcore.zoo import load_causal_lm
from qcore.zoo.austen import load_austen
from qcore.zoo.perplexity import austen_tokens, paired_nll_difference, perplexity

GROUP = 64
WINDOW = 512


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=8192, help="tokens of Persuasion scored")
    parser.add_argument("--calibration", type=int, default=16, help="sequences of 512 tokens of Emma")
    args = parser.parse_args(argv)
    quiet()
    set_threads()
    model, tok = load_causal_lm()
    books = load_austen()  # parsed once for both slices
    eval_ids = austen_tokens(tok, ["Persuasion"], args.eval_tokens, books=books)
    calibration = austen_tokens(tok, ["Emma"], args.calibration * 512, books=books).reshape(args.calibration, 512)

    print(f"# lab 6: RTN, GPTQ, AWQ on SmolLM2, {datetime.date.today()}, torch {torch.__version__}")
    print(f"# {describe_device()}; {eval_ids.numel()} tokens of Persuasion (windows of {WINDOW}), "
          f"calibration {args.calibration} x 512 tokens of Emma; symmetric, groups of {GROUP}\n")
    table = TargetTable()
    row = table.row

    def measure(m):
        return perplexity(m, eval_ids, window=WINDOW, stride=WINDOW)

    fp32 = measure(model)
    row("FP32 (dequantized Q4_1) perplexity", f"{fp32.perplexity:.2f} (NLL {fp32.nll:.4f} ± {fp32.se:.4f})",
        "recorded", None)
    methods = {"RTN": lambda b: quantize_model_rtn(model, b, GROUP),
               "GPTQ": lambda b: quantize_model_gptq(model, calibration, b, GROUP, progress=False),
               "AWQ": lambda b: quantize_model_awq(model, calibration, b, GROUP, progress=False)}
    results = {}
    for bits in (3, 4):
        for name, quantize in methods.items():
            start = time.perf_counter()
            q = quantize(bits)
            seconds = time.perf_counter() - start
            results[name, bits] = p = measure(q)
            del q
            row(f"{name} {bits}-bit g{GROUP}: perplexity", f"{p.perplexity:.2f} (NLL {p.nll:.4f} ± {p.se:.4f})",
                "recorded", None)
            row(f"{name} {bits}-bit g{GROUP}: seconds to quantize", f"{seconds:.1f}", "recorded", None)
        for name in ("GPTQ", "AWQ"):
            d = paired_nll_difference(results[name, bits], results["RTN", bits])
            beats = d.diff < -2 * d.se
            row(f"{name} vs RTN at {bits} bits: NLL difference (paired)",
                f"{d.diff:+.4f} ± {d.se:.4f} (perplexity x{d.ratio:.3f})",
                "< -2 se" if bits == 3 else "recorded", beats if bits == 3 else None)
    d = paired_nll_difference(results["GPTQ", 3], results["AWQ", 3])
    row("GPTQ vs AWQ at 3 bits: NLL difference (paired)", f"{d.diff:+.4f} ± {d.se:.4f}", "< -2 se",
        d.diff < -2 * d.se)
    return 0 if table.all_met else 1


if __name__ == "__main__":
    sys.exit(main())
