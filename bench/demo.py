"""`make demo`: the course's models, measured on this machine.

Prints one table: the sentiment classifier in fp32 and after ``torch.ao`` dynamic int8
quantization (accuracy on the movies test split, size on disk, median latency for a batch of
8 x 128 tokens), the size of a DistilBERT-base-sized model before and after the same
quantization (the seed article reports 265 MB -> 138 MB), and SmolLM2-135M-Instruct's
zero-shot sentiment accuracy on 200 test sentences. Accuracies are measured as the labs measure
them (``qcore.train.evaluate_classifier``: batches of similar length, in the one fixed order).
"""
from __future__ import annotations

import datetime
import sys

import torch

from qcore.measure import describe_device, latency, size_on_disk
from qcore.notebook import quiet
from qcore.train import evaluate_classifier, set_threads
from qcore.zoo import load_sentiment_data, load_sentiment_model


def dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.ao`` dynamic quantization of every Linear (int8 weights, per-token activations)."""
    from torch.ao.quantization import quantize_dynamic  # deprecated in favour of torchao

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def batch_8x128(tokenizer, texts):
    enc = tokenizer(texts[:8], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def main() -> int:
    quiet()
    set_threads()
    print(f"# qcourse demo, {datetime.date.today()}, torch {torch.__version__}")
    print(f"# {describe_device()}\n")
    data = load_sentiment_data("movies")
    model, tok = load_sentiment_model()
    batch = batch_8x128(tok, data.test.texts)
    rows = []
    for name, m in (("fp32", model), ("torch.ao dynamic int8", dynamic_int8(model))):
        with torch.inference_mode():
            acc = evaluate_classifier(m, tok, data.test)
            t = latency(lambda: m(**batch), warmup=2, repeats=10)
        rows.append((f"sentiment classifier (MiniLM in DistilBERT), {name}", f"{acc:.4f}",
                     f"{size_on_disk(m) / 1e6:.1f}", f"{t.median_ms:.1f}"))

    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    base = DistilBertForSequenceClassification(DistilBertConfig())  # 66M params, random weights
    rows.append(("DistilBERT-base-sized, fp32 (random weights)", "-", f"{size_on_disk(base) / 1e6:.1f}", "-"))
    rows.append(("DistilBERT-base-sized, torch.ao dynamic int8", "-",
                 f"{size_on_disk(dynamic_int8(base)) / 1e6:.1f}", "-"))

    from qcore.zoo.causal_lm import load_causal_lm
    from qcore.zoo.prompted_sentiment import sentiment_accuracy

    lm, lm_tok = load_causal_lm()
    acc = sentiment_accuracy(lm, lm_tok, data.test, limit=200)
    rows.append(("SmolLM2-135M-Instruct zero-shot (200 movie test sentences)", f"{acc:.3f}",
                 f"{size_on_disk(lm) / 1e6:.1f}", "-"))

    print("| model | accuracy | size on disk (MB) | latency 8x128 (ms, median of 10) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
