"""SmolLM2's load times and zero-shot speed on this machine (labs 5-6 load it several times).

Usage: ``python bench/bench_causal_lm.py [--test N] [--fresh]``.

* ``prepare_causal_lm`` when the cache is complete (what every ``make setup`` after the first
  does): target < 5 s;
* a second load of the cached fp32 model (a lab's ``fresh_model()``): target < 10 s;
* loading the GGUF directly, for comparison (recorded); with ``--fresh``, a whole prepare into an
  empty temporary cache (recorded);
* zero-shot sentiment on the first N movie test sentences: accuracy and seconds (recorded).

Exit status 1 when a target is missed. Numbers printed are measured in this run, nothing is stored.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_ptq import TargetTable  # this folder: the same table as `make bench`

from qcore import assets
from qcore.measure import describe_device
from qcore.notebook import quiet
from qcore.train import set_threads
from qcore.zoo import causal_lm as C
from qcore.zoo.prompted_sentiment import sentiment_accuracy
from qcore.zoo.sentiment import load_sentiment_data


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def load_gguf():
    from transformers import AutoModelForCausalLM

    gguf = C.gguf_path()
    with C._quiet_loading():
        return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)


def fresh_prepare() -> float:
    """Seconds of a whole prepare into an empty cache that shares the fetched GGUF."""
    old = os.environ.get("QCOURSE_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "smollm2").symlink_to(assets.cache_dir() / "smollm2")
        os.environ["QCOURSE_CACHE"] = tmp
        try:
            return seconds(lambda: C.prepare_causal_lm(verbose=False))[0]
        finally:
            if old is None:
                os.environ.pop("QCOURSE_CACHE")
            else:
                os.environ["QCOURSE_CACHE"] = old


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, default=200, help="movie test sentences for zero-shot")
    parser.add_argument("--fresh", action="store_true", help="also time a whole prepare (about 20 s)")
    args = parser.parse_args(argv)
    quiet()
    set_threads()
    C.prepare_causal_lm(verbose=False)  # the first one may build the cache: not what is measured

    print(f"# SmolLM2 load and zero-shot times, {datetime.date.today()}, torch {torch.__version__}")
    print(f"# {describe_device()}\n")
    table = TargetTable()
    row = table.row

    t, _ = seconds(lambda: C.prepare_causal_lm(verbose=False))
    row("prepare_causal_lm, cache complete", f"{t:.2f} s", "< 5 s", t < 5)
    t_first, _ = seconds(C.load_causal_lm)
    t_second, (model, tok) = seconds(C.load_causal_lm)
    row("first load of the cached fp32 model", f"{t_first:.2f} s", "recorded", None)
    row("second load of the cached fp32 model", f"{t_second:.2f} s", "< 10 s", t_second < 10)
    t_gguf, _ = seconds(load_gguf)
    row("loading the Q4_1 GGUF directly (dequantized on load)", f"{t_gguf:.2f} s", "recorded", None)
    if args.fresh:
        row("prepare_causal_lm into an empty cache", f"{fresh_prepare():.1f} s", "recorded", None)

    test = load_sentiment_data("movies").test
    t, acc = seconds(lambda: sentiment_accuracy(model, tok, test, limit=args.test))
    n = len(test.texts[:args.test])
    row(f"zero-shot sentiment, {n} movie test sentences: accuracy", f"{acc:.3f}", "> 0.5", acc > 0.5)
    row(f"zero-shot sentiment, {n} movie test sentences: time", f"{t:.1f} s ({1e3 * t / n:.0f} ms each)",
        "recorded", None)
    return 0 if table.all_met else 1


if __name__ == "__main__":
    sys.exit(main())
