"""Lab 3's targets, measured on this machine: post-training quantization of the sentiment classifier.

Usage: ``python bench/bench_ptq.py [--test N] [--repeats N]`` (``make bench``).

* int8 accuracy drop against FP32 on the movies test split, for every int8 scheme (target <= 0.5
  points);
* size on disk of qcore's own int8 weight-only model with int8 embeddings (target <= 0.30 x FP32);
* ``torch.ao`` dynamic int8 latency at batch 8 x 128 against FP32, timed in turns (target >= 1.3x);
* calibration shift: static W8A8 calibrated on movie sentences vs on tweets, evaluated on movies
  (recorded, no target: the lab discusses it).

Accuracies are measured as the labs measure them (``qcore.train.evaluate_classifier``: batches of
64 sentences of similar length, in the one fixed order). Exit status 1 when a target is missed.
Numbers printed are measured in this run, nothing is stored.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
import warnings

import torch
from torch import nn

from qcore.measure import describe_device, interleaved_latency, size_on_disk
from qcore.notebook import quiet
from qcore.ptq import linear_names, quantize_model
from qcore.smoothquant import input_absmax, static_input_scales, unpadded_runner
from qcore.train import evaluate_classifier, set_threads
from qcore.zoo import load_sentiment_data, load_sentiment_model

N_CALIBRATION = 128  # calibration sentences, from the training split (as in the lab)


def torch_ao_dynamic_int8(model: nn.Module) -> nn.Module:
    """``torch.ao`` dynamic int8 of every Linear (deprecated in favour of torchao; still the baseline)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


class TargetTable:
    """A markdown table of targets, printed row by row (``met``: True, False, or None for "recorded")."""

    def __init__(self):
        self.all_met = True
        print("| target | measured | goal | met |")
        print("| --- | ---: | ---: | :---: |")

    def row(self, name: str, value: str, goal: str, met: bool | None) -> None:
        self.all_met &= met is not False
        print(f"| {name} | {value} | {goal} | {'-' if met is None else 'yes' if met else 'NO'} |", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, default=None, help="first N test sentences (default: all)")
    parser.add_argument("--repeats", type=int, default=20, help="latency rounds")
    args = parser.parse_args(argv)
    quiet()
    set_threads()

    movies = load_sentiment_data("movies")
    test = movies.test if args.test is None else type(movies.test)(movies.test.texts[:args.test],
                                                                   movies.test.labels[:args.test])
    model, tok = load_sentiment_model()
    names = linear_names(model)
    absmax = input_absmax(model, names, unpadded_runner(tok, movies.train.texts[:N_CALIBRATION]))
    tweets = load_sentiment_data("tweets").train.texts[:N_CALIBRATION]
    absmax_tweets = input_absmax(model, names, unpadded_runner(tok, tweets))

    int8 = {
        "torch.ao dynamic int8 (Linear)": torch_ao_dynamic_int8(model),
        "W8A16 per channel (Linear + embeddings)": quantize_model(model, "w8a16", embeddings=True),
        "W8A8 dynamic (Linear + embeddings)": quantize_model(model, "w8a8-dynamic", embeddings=True),
        "W8A8 static, movies calibration": quantize_model(model, "w8a8-static", embeddings=True,
                                                          input_scales=static_input_scales(absmax)),
    }
    shifted = quantize_model(model, "w8a8-static", embeddings=True, input_scales=static_input_scales(absmax_tweets))

    print(f"# lab 3 targets, {datetime.date.today()}, torch {torch.__version__}")
    print(f"# {describe_device()}; movies test split: {len(test.texts)} sentences\n")
    table = TargetTable()
    row = table.row

    fp32_acc = evaluate_classifier(model, tok, test)
    row("FP32 accuracy", f"{fp32_acc:.4f}", "-", None)
    for name, m in int8.items():
        drop = 100 * (fp32_acc - evaluate_classifier(m, tok, test))
        row(f"accuracy drop, {name}", f"{drop:+.2f} points", "<= 0.5 points", drop <= 0.5)

    fp32_mb, w8_mb = size_on_disk(model) / 1e6, size_on_disk(int8["W8A16 per channel (Linear + embeddings)"]) / 1e6
    row(f"size, own W8A16 + int8 embeddings ({w8_mb:.1f} MB vs FP32 {fp32_mb:.1f} MB)",
        f"{w8_mb / fp32_mb:.3f}x", "<= 0.30x", w8_mb / fp32_mb <= 0.30)

    enc = tok(test.texts[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    batch = {k: enc[k] for k in ("input_ids", "attention_mask")}
    ao = int8["torch.ao dynamic int8 (Linear)"]
    with torch.inference_mode():
        t = interleaved_latency({"fp32": lambda: model(**batch), "ao": lambda: ao(**batch)},
                                warmup=3, repeats=args.repeats)
    speed = t["fp32"].median_ms / t["ao"].median_ms
    row(f"torch.ao dynamic int8 speed-up, batch 8x128 ({t['fp32'].median_ms:.1f} -> {t['ao'].median_ms:.1f} ms)",
        f"{speed:.2f}x", ">= 1.3x", speed >= 1.3)

    movie_acc = evaluate_classifier(int8["W8A8 static, movies calibration"], tok, test)
    tweet_acc = evaluate_classifier(shifted, tok, test)
    ratio = torch.stack([absmax_tweets[n].max() / absmax[n].max() for n in names])
    row("calibration shift: static W8A8 accuracy, calibrated on movies / on tweets",
        f"{movie_acc:.4f} / {tweet_acc:.4f}", "recorded", None)
    row("calibration shift: per-layer largest input, tweets / movies (min-max over layers)",
        f"{ratio.min():.2f}-{ratio.max():.2f}", "recorded", None)
    print(f"\nlatency: medians of {args.repeats} interleaved rounds after 3 warm-up rounds; "
          f"calibration: {N_CALIBRATION} training sentences of each domain")
    return 0 if table.all_met else 1


if __name__ == "__main__":
    sys.exit(main())
