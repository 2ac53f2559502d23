"""What fine-tuning SmolLM2 costs in memory, each configuration measured in a fresh process.

Memory read inside a notebook's kernel mixes runs: an earlier cell's model, tensors the allocator
keeps for reuse, libraries loaded on the way. So each configuration runs in a Python process of its
own: load the model, build the configuration (LoRA, QLoRA with qcore's NF4, QLoRA with bitsandbytes
+ peft, or full fine-tuning), train a few steps, and report

* ``weights_mb``: the model's parameters and buffers (bitsandbytes' block scales included);
* ``rss_before_mb``: the process's resident memory (RSS) when the model is built, before training:
  the weights (copied out of the file mapping, so that all of them count) plus the interpreter,
  torch and the libraries, and what the allocator kept of building the model;
* ``peak_mb``: the highest RSS while training (Linux ``VmHWM``, reset before the first step);
* ``training_extra_mb``: ``peak_mb - rss_before_mb``: gradients, optimizer states and activations.

On CUDA the same fields come from the allocator (``torch.cuda.max_memory_allocated``), which counts
tensors only. ``measure_in_fresh_process(config)`` starts the process and returns its report.

Example:
    >>> sorted(CONFIGS)
    ['full', 'lora', 'qlora', 'qlora-bnb']
"""
from __future__ import annotations

import ctypes
import gc
import json
import re
import subprocess
import sys
import time

CONFIGS = {"lora": "LoRA (FP32 base)", "qlora": "QLoRA, qcore NF4", "qlora-bnb": "QLoRA, bitsandbytes + peft",
           "full": "full fine-tuning (FP32)"}


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: now, VmHWM: the peak since the last reset)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _in_own_memory(model) -> None:
    """Copy every float parameter and buffer into memory of the process's own.

    ``from_pretrained`` maps the safetensors file into memory: its pages count in the RSS only once
    touched, and stay counted while any tensor (the embedding) still uses the mapping, even after
    the linear layers were replaced by NF4 codes. Copies make the RSS mean what it says.
    """
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for t in store.values():
                if t is not None and t.is_floating_point():
                    t.data = t.data.clone()


def _build(config: str, r: int, alpha: int, device: str):
    """The model of one configuration, its trainable parameters set; returns (model, tokenizer, lr)."""
    import torch

    from qcore import lora
    from qcore.train import compute_dtype, seed_everything
    from qcore.zoo.causal_lm import causal_lm_dir, load_causal_lm, load_causal_lm_tokenizer

    if config == "qlora-bnb":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        tokenizer = load_causal_lm_tokenizer()
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=compute_dtype(device))
        model = AutoModelForCausalLM.from_pretrained(str(causal_lm_dir()), quantization_config=bnb,
                                                     device_map={"": device}, dtype=compute_dtype(device))
        _in_own_memory(model)  # the embedding and norms; the 4-bit codes are bitsandbytes' own already
        seed_everything(0)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(lora.LLAMA_LINEARS),
                                                lora_dropout=0.0)), tokenizer, 1e-3
    model, tokenizer = load_causal_lm(device=device, dtype=torch.float32)
    _in_own_memory(model)
    if config == "full":
        return model.requires_grad_(True), tokenizer, 2e-5
    if config == "qlora":
        lora.quantize_nf4_model(model, block_size=64, double_quant=True)
    seed_everything(0)
    return lora.add_lora(model, lora.LLAMA_LINEARS, r=r, alpha=alpha), tokenizer, 1e-3


def measure(config: str, steps: int = 4, batch_size: int = 8, r: int = 8, alpha: int = 16,
            device: str = "cpu", threads: int | None = None) -> dict:
    """Build ``config`` in *this* process and train ``steps`` batches; the report described above.
    (Call it in a fresh process: ``measure_in_fresh_process``.)"""
    import torch

    from qcore import lora
    from qcore.measure import parameter_bytes
    from qcore.train import compute_dtype, train
    from qcore.zoo import load_sentiment_data
    from qcore.zoo.prompted_sentiment import answer_loss, sentiment_batches

    if threads:
        torch.set_num_threads(threads)
    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r}: one of {', '.join(CONFIGS)}")
    cuda = device.startswith("cuda")
    model, tokenizer, lr = _build(config, r, alpha, device)
    data = load_sentiment_data("movies").train
    batches = sentiment_batches(tokenizer, data.texts[:steps * batch_size], data.labels[:steps * batch_size],
                                batch_size, shuffle=True, device=device)
    weights = parameter_bytes(model)["total"]
    for m in model.modules():  # bitsandbytes keeps its block scales outside parameters and buffers
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
            weights += sum(t.numel() * t.element_size() for t in parts)
    gc.collect()  # what building freed (the FP32 weights that NF4 replaced) goes back to the system first
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _status_kb("VmRSS") * 1024
        _reset_peak()
    start = time.perf_counter()
    run = train(model, batches, answer_loss, lr, decay=False, clip=None, desc="",
                autocast=compute_dtype(device) if cuda and config == "full" else None)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kb("VmHWM") * 1024
    return {"config": config, "trainable": lora.count_parameters(model)[0], "weights_mb": weights / 1e6,
            "rss_before_mb": before / 1e6, "peak_mb": peak / 1e6, "training_extra_mb": (peak - before) / 1e6,
            "steps": len(run.losses), "seconds": seconds, "device": device,
            "what": "CUDA allocator" if cuda else "process RSS"}


def measure_in_fresh_process(config: str, steps: int = 4, batch_size: int = 8, r: int = 8, alpha: int = 16,
                             device: str = "cpu", timeout: float = 1800) -> dict:
    """``measure`` run in a new Python process (nothing of this one's memory counts), with this
    process's number of torch threads; its report."""
    import torch

    args = json.dumps({"config": config, "steps": steps, "batch_size": batch_size, "r": r, "alpha": alpha,
                       "device": device, "threads": torch.get_num_threads()})
    done = subprocess.run([sys.executable, "-m", "qcore.zoo.training_memory", args], capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {config!r} in a fresh process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import os
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore")
    print(json.dumps(measure(**json.loads(sys.argv[1]))))
