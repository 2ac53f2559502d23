"""Lab 5's training costs on a GPU: full fine-tuning, LoRA and QLoRA (qcore NF4) of SmolLM2-135M.

Usage: ``python bench/gpu_lab05.py [out.json]`` on a machine with CUDA (not part of CI).

The model has SmolLM2-135M-Instruct's exact architecture (30 Llama blocks, 576 wide, 9 query and
3 key-value heads, vocabulary 49152, tied embedding) with random weights: time per step and memory
do not depend on the values, and the lab's real weights (a 94 MB GGUF) cannot travel to the GPU
machine the course was checked on. Accuracy needs the real model and data: run the lab with
``FULL_RUN = True`` for it. The batches have the lab's shape (8 prompts of 80 tokens) and go through
the lab's loop and loss: ``qcore.train.train`` with ``answer_loss`` (the label word at the last
token), AdamW at a constant rate, no clipping. Compute in bf16 (the lab's GPU policy); adapters in FP32;
full fine-tuning keeps FP32 master weights and computes under autocast, as the lab does.
"""
from __future__ import annotations

import json
import statistics
import sys

import torch

from qcore import lora
from qcore.measure import describe_device, parameter_bytes
from qcore.train import compute_dtype, train
from qcore.zoo.prompted_sentiment import answer_loss

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
               tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)


def build(mode: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to("cuda", dtype)
    if mode == "qlora":
        lora.quantize_nf4_model(model, 64, double_quant=True)
    if mode in ("lora", "qlora"):
        lora.add_lora(model, lora.LLAMA_LINEARS, r=8, alpha=16)
    return model


def measure(mode: str, batch: int = 8, tokens: int = 80, warmup: int = 3, steps: int = 12) -> dict:
    dtype = compute_dtype("cuda")
    full = mode == "full"  # FP32 master weights, products in `dtype` under autocast
    model = build(mode, torch.float32 if full else dtype)
    trainable, total = lora.count_parameters(model)
    weights = parameter_bytes(model)["total"]
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, 49152, (batch, tokens), device="cuda", generator=g)
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "targets": torch.randint(0, 49152, (batch,), device="cuda", generator=g)}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run = train(model, [one] * (warmup + steps), answer_loss, lr=1e-4, decay=False, clip=None, desc=mode,
                autocast=dtype if full else None)
    peak = torch.cuda.max_memory_allocated() - before
    del model
    torch.cuda.empty_cache()
    return {"mode": mode, "dtype": str(dtype), "trainable": trainable, "total": total, "weights_mb": weights / 1e6,
            "peak_extra_mb": peak / 1e6, "step_ms": 1e3 * statistics.median(run.seconds[warmup:]),
            "batch": batch, "tokens": tokens}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    print(f"torch {torch.__version__}; {describe_device()}")
    rows = []
    for batch in (8, 32):
        for mode in ("full", "lora", "qlora"):
            row = measure(mode, batch=batch)
            rows.append(row)
            print(f"{mode:6} batch {batch:3} x {row['tokens']} tokens: trainable {row['trainable']:>11,}  "
                  f"weights {row['weights_mb']:7.1f} MB  peak extra {row['peak_extra_mb']:7.1f} MB  "
                  f"{row['step_ms']:7.1f} ms/step", flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump({"device": describe_device(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
