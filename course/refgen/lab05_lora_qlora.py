"""Reference inputs and outputs for the hidden tests of lab05_lora_qlora.

Every expected value comes from qcore's reference implementation (``qcore.lora``, ``qcore.nf4``,
``qcore.quant``), never from a student function; the parameter counts come from adapters really
added to Llama models built on the ``meta`` device (no memory, no download). A rerun writes the
same arrays.

    python course/refgen/lab05_lora_qlora.py course/reference/lab05_lora_qlora
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcourse.refdata import generator_main, linspace, randn, to_numpy as _np, write_references
from qcore import lora
from qcore.nf4 import _dequantize_absmax, _midpoints, _quantize_absmax, dequantize_nf4, nf4_codebook, quantize_nf4
from qcore.quant import PerGroup, choose_qparams, fake_quantize, sqnr_db
from qcore.packing import unpack_int4

LAB = "lab05_lora_qlora"
SEED = 20240505
LINEARS = lora.LLAMA_LINEARS


# Results whose last bits may depend on the CPU (qcourse.refdata): layer outputs and merged
# weights (float32 roundings ~ the reduction length), the mean offset of double quantization,
# SQNR (sums). NF4 and int8 codes, absmax values, scales and dequantized values are exact.
CPU_DEPENDENT = {
    "lora": {"y*": 64, "merged*": 16},  # products over up to 32 inputs + r; B @ A over r <= 8
    "qlora": {"y*": 256},  # products over up to 192 inputs
    "double_quant": {"offset*": 1024, "rebuilt*": 1024},  # the mean of up to 1,000 absmax values
    "int4": {"sqnr*": 1024},  # sums over up to 1,024 weights
}


def _lora_layer(cls, w, b, a, bb, r, alpha):
    base = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        base.weight.copy_(w)
        if b is not None:
            base.bias.copy_(b)
    layer = cls(base, r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_A.copy_(a)
        layer.lora_B.copy_(bb)
    return layer.eval()


def lora_refs(gen: torch.Generator, cls=lora.LoRALinear, cases=None) -> dict:
    """Layers with given A and B (square ones with r = in = out, where a transposed adapter
    would still run), their outputs on 3-D inputs, and the merged weights."""
    cases = cases or [(6, 4, 2, 4, True), (8, 8, 8, 16, True), (16, 5, 4, 4, False), (12, 12, 3, 1, True),
                      (4, 4, 4, 32, False), (32, 7, 1, 2, True)]
    out = {"n_cases": len(cases)}
    for i, (n_in, n_out, r, alpha, has_bias) in enumerate(cases):
        w = randn(n_out, n_in, generator=gen) / n_in ** 0.5
        b = randn(n_out, generator=gen) if has_bias else None
        a, bb = randn(r, n_in, generator=gen), randn(n_out, r, generator=gen) * 0.1
        x = randn(2, 3, n_in, generator=gen)
        layer = _lora_layer(cls, w, b, a, bb, r, alpha)
        with torch.no_grad():
            y = layer(x)
        out.update({f"w{i}": _np(w), f"bias{i}": _np(b) if has_bias else np.zeros(0, np.float32),
                    f"has_bias{i}": has_bias, f"r{i}": r, f"alpha{i}": float(alpha), f"A{i}": _np(a),
                    f"B{i}": _np(bb), f"x{i}": _np(x), f"y{i}": _np(y)})
        if cls is lora.LoRALinear:
            out[f"merged{i}"] = _np(layer.merged_linear().weight)
    return out


def _llama_trainable(hidden, inter, heads, kv_heads, head_dim, layers, r, targets) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
        lora.add_lora(model, targets, r=r)
    return lora.count_parameters(model)[0]


def arithmetic_refs(gen: torch.Generator) -> dict:
    """Trainable LoRA parameters for Llama configurations (GQA, head_dim != hidden / heads) and the
    training-memory terms for a few (frozen, trainable, bits) cases."""
    configs = [(576, 1536, 9, 3, 64, 30), (4096, 11008, 32, 32, 128, 32), (256, 688, 4, 2, 96, 3),
               (2048, 8192, 32, 4, 64, 16)]
    target_sets = [("q_proj", "v_proj"), LINEARS, ("down_proj",), ("k_proj", "o_proj", "up_proj")]
    cases = [(c, t, r) for c, t, r in zip(configs * 2, target_sets + target_sets[::-1], (1, 8, 16, 64, 4, 2, 8, 32))]
    out = {"n_cases": len(cases)}
    for i, (cfg, targets, r) in enumerate(cases):
        out.update({f"config{i}": np.array(cfg), f"targets{i}": np.array(",".join(targets)), f"r{i}": r,
                    f"trainable{i}": _llama_trainable(*cfg, r, targets)})
    mem = [(134_515_008, 0, 32, 32), (134_515_008, 460_800, 32, 32), (106_168_320, 4_884_480, 4.127, 32),
           (7_000_000, 1_000, 16, 16), (10, 3, 4.5, 32)]
    out["n_memory"] = len(mem)
    for i, (frozen, trainable, fbits, tbits) in enumerate(mem):
        out.update({f"mem_in{i}": np.array([frozen, trainable, fbits, tbits], dtype=np.float64),
                    f"weights{i}": frozen * fbits / 8 + trainable * tbits / 8,
                    f"gradients{i}": trainable * tbits / 8, f"optimizer{i}": 8.0 * trainable})
    return out


def _far_from_midpoints(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Nudge elements whose normalized value lies within 2e-5 of a decision boundary (dividing
    instead of multiplying by the reciprocal could flip them)."""
    mids = _midpoints()
    for _ in range(3):
        blocks = w.reshape(-1, block_size)
        absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
        dist = ((blocks / absmax).unsqueeze(-1) - mids).abs().amin(-1)
        blocks = torch.where(dist < 2e-5, blocks * (1 - 1e-4), blocks)
        w = blocks.reshape(w.shape)
    return w


def nf4_refs(gen: torch.Generator) -> dict:
    """The codebook; blocks of very different sizes (per-tensor absmax would crush the small ones),
    an all-zero block, blocks of 32 to 256; codes, absmax and dequantized values."""
    cases = [((4, 64), 64), ((8, 128), 64), ((2, 256), 128), ((512,), 32), ((3, 7, 64), 64), ((16, 64), 256)]
    out = {"codebook": _np(nf4_codebook()), "n_cases": len(cases)}
    for i, (shape, bs) in enumerate(cases):
        n = int(np.prod(shape))
        w = randn(n, generator=gen)
        w = (w.reshape(-1, bs) * 10.0 ** torch.randint(-3, 2, (n // bs, 1), generator=gen)).reshape(shape)
        if n // bs > 2:
            w.reshape(-1, bs)[1] = 0.0  # an all-zero block
        w = _far_from_midpoints(w, bs)
        packed, state = quantize_nf4(w, bs)
        codes = unpack_int4(packed, (n,))
        out.update({f"w{i}": _np(w), f"block{i}": bs, f"codes{i}": _np(codes.to(torch.uint8)),
                    f"absmax{i}": _np(state.absmax), f"w_hat{i}": _np(dequantize_nf4(packed, state))})
    return out


def double_refs(gen: torch.Generator) -> dict:
    """First-level absmax values (partial last group, one constant group, a wide spread), their 8-bit
    codes, per-group scales and mean offset, the rebuilt values; bits per parameter."""
    sizes = [256, 300, 1000, 5, 513]
    out = {"n_cases": len(sizes)}
    for i, n in enumerate(sizes):
        absmax = torch.rand(n, generator=gen) * 10.0 ** torch.randint(-2, 1, (1,), generator=gen)
        if n == 513:
            absmax[256:512] = absmax[256:512].mean()  # a group that is (almost) constant
        if n == 1000:
            absmax[17] = 40 * absmax.max()  # one block with an outlier
        for _ in range(3):  # keep (absmax - offset) / scale away from .5 ties
            codes, scale, offset = _quantize_absmax(absmax)
            pad = (-n) % 256
            r = (torch.nn.functional.pad(absmax - offset, (0, pad)).reshape(-1, 256) / scale.reshape(-1, 1))
            r = r.reshape(-1)[:n]
            near = ((r - torch.floor(r)) - 0.5).abs() < 1e-3
            absmax = torch.where(near, absmax * (1 + 3e-3), absmax)
        codes, scale, offset = _quantize_absmax(absmax)
        out.update({f"absmax{i}": _np(absmax), f"codes{i}": _np(codes), f"scale{i}": _np(scale),
                    f"offset{i}": _np(offset), f"rebuilt{i}": _np(_dequantize_absmax(codes, scale, offset))})
    bits = [(64, True), (64, False), (128, True), (32, False), (256, True), (4096, True)]
    out["bits_in"] = np.array([[bs, dq] for bs, dq in bits], dtype=np.int64)
    out["bits"] = np.array([4 + 8 / bs + 32 / (bs * 256) if dq else 4 + 32 / bs for bs, dq in bits])
    return out


def int4_refs(gen: torch.Generator) -> dict:
    """Block-wise symmetric int4 (absmax / 7) on normal, heavy-tailed and uniform weights, and SQNR."""
    cases = [((8, 64), 64, "normal"), ((4, 256), 64, "student-t"), ((2, 128), 32, "uniform"),
             ((1024,), 128, "normal"), ((3, 2, 64), 64, "normal")]
    out = {"n_cases": len(cases)}
    for i, (shape, bs, kind) in enumerate(cases):
        n = int(np.prod(shape))
        if kind == "uniform":
            w = torch.rand(n, generator=gen) * 2 - 1
        elif kind == "student-t":
            w = randn(n, generator=gen) / (torch.rand(n, generator=gen) + 0.05)
        else:
            w = randn(n, generator=gen) * 0.02
        w = w.reshape(-1, bs)
        w[0] = 0.0 if n // bs > 1 else w[0]  # an all-zero block (when there are several)
        scale = (w.abs().amax(1, keepdim=True) / 7).clamp(min=torch.finfo(torch.float32).eps)
        r = w / scale
        w = torch.where(((r - torch.floor(r)) - 0.5).abs() < 1e-3, w * 0.999, w)  # no half ties
        if n // bs > 2:  # exact ties at scale 1.0: round half to even (2.5 -> 2, -3.5 -> -4, 0.5 -> 0)
            w[2] = torch.cat([torch.tensor([7.0, 2.5, -3.5, 0.5]), linspace(-0.4, 0.4, bs - 4)])
        w = w.reshape(shape)
        w_hat = fake_quantize(w.reshape(-1, bs), choose_qparams(w.reshape(-1, bs), 4, True, PerGroup(bs)))
        out.update({f"w{i}": _np(w), f"block{i}": bs, f"w_hat{i}": _np(w_hat.reshape(shape)),
                    f"sqnr{i}": sqnr_db(w, w_hat.reshape(shape)) if w.abs().sum() > 0 else np.inf})
    return out


def qlora_refs(gen: torch.Generator) -> dict:
    """QLoRA layers (block 64, double quantization) with given A and B, and their outputs."""
    return lora_refs(gen, lora.QLoRALinear, [(64, 4, 2, 4, True), (128, 8, 8, 16, False), (64, 64, 4, 4, True),
                                             (192, 3, 1, 2, True)])


def _seeded(name: str, refs) -> dict:
    """One file's arrays, from a generator of its own (seeded by the file's name)."""
    torch.manual_seed(SEED)  # the adapters' own initialisation draws from the global generator
    return refs(torch.Generator().manual_seed(SEED + len(name)))


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir`` (created if needed)."""
    write_references(out_dir, {name: _seeded(name, refs) for name, refs in (
        ("lora", lora_refs), ("arithmetic", arithmetic_refs), ("nf4", nf4_refs),
        ("double_quant", double_refs), ("int4", int4_refs), ("qlora", qlora_refs))})


if __name__ == "__main__":
    generator_main(make, LAB)
