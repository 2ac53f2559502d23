"""The hidden tests of lab05_lora_qlora, judged outside the student's kernel.

Each test draws its inputs from a generator (the lab's ``SEED`` for the committed reference
files, a per-submission seed when grading: ``qcourse.judge``); every expected value comes from
qcore's reference implementation (``qcore.lora``, ``qcore.nf4``, ``qcore.quant``), never from a
student function; the parameter counts come from adapters really added to Llama models built on
the ``meta`` device (no memory, no download).

    python course/refgen/lab05_lora_qlora.py course/reference/lab05_lora_qlora
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcourse.judge import HiddenTest, Verdict, write_hidden_references
from qcourse.refdata import generator_main, linspace, randn, to_numpy as _np
from qcore import lora
from qcore.nf4 import NF4State, _dequantize_absmax, _midpoints, _quantize_absmax, dequantize_nf4, nf4_codebook, \
    quantize_nf4
from qcore.quant import PerGroup, choose_qparams, fake_quantize, sqnr_db
from qcore.packing import pack_int4, unpack_int4

LAB = "lab05_lora_qlora"
SEED = 20240505
LINEARS = lora.LLAMA_LINEARS


# Results whose last bits may depend on the CPU (qcourse.refdata): layer outputs, gradients and
# merged weights (float32 roundings ~ the reduction length), the mean offset of double
# quantization, SQNR (sums). NF4 and int8 codes, absmax values, scales and dequantized values are exact.
CPU_DEPENDENT = {
    "lora": {"y*": 64, "base_y*": 64, "grad_*": 64, "merged*": 16},  # products over up to 32 inputs + r
    "qlora": {"y*": 256, "grad_*": 256},  # products over up to 256 inputs
    "double_quant": {"offset*": 1024},  # the mean of up to 1,200 absmax values
    "int4": {"sqnr*": 1024},  # sums over up to 1,024 weights
}


def _int(gen: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high) from ``gen``."""
    return int(torch.randint(low, high, (1,), generator=gen))


def _choice(gen: torch.Generator, options):
    return options[_int(gen, 0, len(options))]


def _what(inputs: dict, i: int) -> str:
    w = inputs[f"w{i}"]
    r, alpha = int(inputs[f"r{i}"]), float(inputs[f"alpha{i}"])
    return f"case {i} (in {w.shape[1]}, out {w.shape[0]}, r {r}, alpha {alpha:g})"


def _flag(v: Verdict, key: str, want: bool, what: str) -> None:
    """A yes/no answer (a flag the ask read off the student's objects) that must be ``want``."""
    got = v.answers.get(key)
    v.true(key, got is not None and got.size == 1 and bool(got.reshape(())) == want, what)


def _grad_close(v: Verdict, key: str, want: np.ndarray, what: str) -> None:
    """Gradients: sums over the batch, so within a tolerance scaled to their largest value."""
    v.close(key, want, what, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0.0))))


def _outputs_and_gradients(v: Verdict, expected, i: int, what: str) -> None:
    """An adapter layer's outputs with the given A and B, and the gradients of their sum for A and B."""
    v.close(f"y{i}", expected[f"y{i}"], f"{what}: outputs differ", rtol=1e-5, atol=1e-5)
    for m in ("A", "B"):
        _flag(v, f"{m}_grad_none{i}", False, f"{what}: adapters get gradients")
        _grad_close(v, f"grad_{m}{i}", expected[f"grad_{m}{i}"], f"{what}: the gradient of {m}")


# ----------------------------------------------------------------------------- LoRA and QLoRA layers
def _layer_inputs(gen: torch.Generator, cases) -> dict[str, np.ndarray]:
    """Base layers (weight, bias), adapters A and B to load, and 3-D inputs."""
    out = {"n_cases": np.array(len(cases))}
    for i, (n_in, n_out, r, alpha, has_bias) in enumerate(cases):
        w = randn(n_out, n_in, generator=gen) / n_in ** 0.5
        b = randn(n_out, generator=gen) if has_bias else torch.zeros(0)
        a, bb = randn(r, n_in, generator=gen), randn(n_out, r, generator=gen) * 0.1
        x = randn(2, 3, n_in, generator=gen)
        out.update({f"w{i}": _np(w), f"bias{i}": _np(b), f"has_bias{i}": np.array(bool(has_bias)),
                    f"r{i}": np.array(int(r)), f"alpha{i}": np.array(float(alpha)), f"A{i}": _np(a),
                    f"B{i}": _np(bb), f"x{i}": _np(x)})
    return out


def _qcore_layer(cls, inputs: dict, i: int):
    """qcore's adapter layer on the case's base, with the case's A and B (the initialisation, which
    draws from the global generator, in a forked generator: it is overwritten anyway)."""
    w = torch.from_numpy(inputs[f"w{i}"])
    has_bias = bool(inputs[f"has_bias{i}"])
    base = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
    with torch.no_grad():
        base.weight.copy_(w)
        if has_bias:
            base.bias.copy_(torch.from_numpy(inputs[f"bias{i}"]))
    with torch.random.fork_rng(devices=[]):
        layer = cls(base, r=int(inputs[f"r{i}"]), alpha=float(inputs[f"alpha{i}"]))
    with torch.no_grad():
        layer.lora_A.copy_(torch.from_numpy(inputs[f"A{i}"]))
        layer.lora_B.copy_(torch.from_numpy(inputs[f"B{i}"]))
    return base, layer.eval()


def lora_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Square layers with r = in = out (where a transposed adapter would still run), alpha != r,
    layers without bias; then two random ones."""
    cases = [(6, 4, 2, 4, True), (8, 8, 8, 16, True), (16, 5, 4, 4, False), (12, 12, 3, 1, True),
             (4, 4, 4, 32, False), (32, 7, 1, 2, True)]
    for _ in range(2):
        cases.append((_int(gen, 2, 25), _int(gen, 2, 25), _int(gen, 1, 9), _choice(gen, (1, 2, 4, 8, 16, 32)),
                      bool(_int(gen, 0, 2))))
    return _layer_inputs(gen, cases)


def lora_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's outputs with the given A and B, the gradients of their sum, the base's outputs
    and the merged weight."""
    out = {}
    for i in range(int(inputs["n_cases"])):
        base, layer = _qcore_layer(lora.LoRALinear, inputs, i)
        x = torch.from_numpy(inputs[f"x{i}"])
        y = layer(x)
        y.sum().backward()
        with torch.no_grad():
            out.update({f"y{i}": _np(y), f"base_y{i}": _np(base(x)), f"merged{i}": _np(layer.merged_linear().weight),
                        f"grad_A{i}": _np(layer.lora_A.grad), f"grad_B{i}": _np(layer.lora_B.grad)})
    return out


def lora_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        what, w = _what(inputs, i), inputs[f"w{i}"]
        r, alpha, (n_out, n_in) = int(inputs[f"r{i}"]), float(inputs[f"alpha{i}"]), w.shape
        s = v.got(f"scaling{i}")
        v.true(f"scaling{i}", s is None or s.size == 1 and abs(float(s.reshape(())) - alpha / r) < 1e-12,
               f"{what}: scaling")
        fresh, fresh_base = answers.get(f"fresh_y{i}"), answers.get(f"fresh_base_y{i}")
        v.true(f"fresh_y{i}", fresh is not None and fresh_base is not None and fresh.shape == fresh_base.shape
               and np.array_equal(fresh, fresh_base), f"{what}: a new layer must equal its base")
        v.close(f"fresh_y{i}", expected[f"base_y{i}"], f"{what}: a new layer must equal its base", rtol=1e-5, atol=1e-5)
        a0, b0 = v.got(f"init_A{i}"), v.got(f"init_B{i}")
        v.true(f"init_A{i}", a0 is None or a0.shape == (r, n_in), f"{what}: A has shape [r, in]")
        v.true(f"init_B{i}", b0 is None or b0.shape == (n_out, r), f"{what}: B has shape [out, r]")
        v.true(f"init_B{i}", a0 is not None and b0 is not None and bool((b0 == 0).all()) and bool((a0 != 0).all()),
               f"{what}: initialisation")
        v.true(f"init_A{i}", a0 is None or a0.size == 0 or float(np.abs(a0).max()) <= np.float32(1 / np.sqrt(n_in)),
               f"{what}: A's bound")
        trainable = [answers.get(k) for k in (f"trainable_A{i}", f"trainable_B{i}", f"n_trainable{i}")]
        v.true(f"n_trainable{i}", all(t is not None and t.size == 1 for t in trainable)
               and bool(trainable[0]) and bool(trainable[1]) and int(trainable[2]) == 2, f"{what}: trainable")
        frozen = answers.get(f"base_requires_grad{i}")
        v.true(f"base_requires_grad{i}", frozen is not None and frozen.shape == (1 + bool(inputs[f"has_bias{i}"]),)
               and not frozen.any(), f"{what}: the base stays frozen")
        _outputs_and_gradients(v, expected, i, what)
        _flag(v, f"base_grad_none{i}", True, f"{what}: the base weight got a gradient")
        v.close(f"merged{i}", expected[f"merged{i}"], f"{what}: merged weight", rtol=1e-5, atol=1e-5)
        v.close(f"merged_y{i}", expected[f"y{i}"], f"{what}: merged outputs", rtol=1e-5, atol=1e-5)
        v.close(f"merged_twice{i}", expected[f"merged{i}"], f"{what}: merging twice", rtol=1e-5, atol=1e-5)
        v.close(f"unmerged{i}", w, f"{what}: unmerge", rtol=1e-5, atol=1e-5)
        v.close(f"unmerged_y{i}", expected[f"y{i}"], f"{what}: unmerged outputs", rtol=1e-5, atol=1e-5)
        _flag(v, f"dropout_is_module{i}", True, f"{what}: self.dropout is an nn.Dropout")
        v.close(f"dropped_y{i}", expected[f"base_y{i}"], f"{what}: dropout on the adapter's input only",
                rtol=1e-5, atol=1e-5)


def qlora_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """QLoRA layers (block 64, double quantization): fixed shapes, then a random one."""
    cases = [(64, 4, 2, 4, True), (128, 8, 8, 16, False), (64, 64, 4, 4, True), (192, 3, 1, 2, True)]
    cases.append((64 * _int(gen, 1, 5), _int(gen, 1, 17), _int(gen, 1, 9), _choice(gen, (1, 2, 4, 8, 16, 32)),
                  bool(_int(gen, 0, 2))))
    return _layer_inputs(gen, cases)


def qlora_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's QLoRA outputs with the given A and B and the gradients of their sum; the gradient
    reaching the input is ``1 @ (w_hat + scaling * B @ A)`` on every row (NF4 with double quantization)."""
    out = {}
    for i in range(int(inputs["n_cases"])):
        _, layer = _qcore_layer(lora.QLoRALinear, inputs, i)
        xg = torch.from_numpy(inputs[f"x{i}"]).clone().requires_grad_(True)
        y = layer(xg)
        y.sum().backward()
        w = torch.from_numpy(inputs[f"w{i}"])
        w_eff = dequantize_nf4(*quantize_nf4(w, 64, double_quant=True)) + float(inputs[f"alpha{i}"]) / int(
            inputs[f"r{i}"]) * (torch.from_numpy(inputs[f"B{i}"]) @ torch.from_numpy(inputs[f"A{i}"]))
        out.update({f"y{i}": _np(y), f"grad_A{i}": _np(layer.lora_A.grad), f"grad_B{i}": _np(layer.lora_B.grad),
                    f"grad_x{i}": _np((torch.ones(w.shape[0]) @ w_eff).expand(xg.shape))})
    return out


def qlora_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        what, w = _what(inputs, i), inputs[f"w{i}"]
        r, alpha = int(inputs[f"r{i}"]), float(inputs[f"alpha{i}"])
        names = [answers.get(k) for k in (f"has_A{i}", f"has_B{i}", f"n_params{i}")]
        v.true(f"n_params{i}", all(t is not None and t.size == 1 for t in names)
               and bool(names[0]) and bool(names[1]) and int(names[2]) == 2, f"{what}: parameters")
        sizes = answers.get(f"float_sizes{i}")
        v.true(f"float_sizes{i}", sizes is not None and sizes.ndim == 1 and bool((sizes < w.size).all()),
               f"{what}: a float copy of the weight is kept")
        linears = answers.get(f"n_linear{i}")
        v.true(f"n_linear{i}", linears is not None and linears.size == 1 and int(linears) == 0,
               f"{what}: the float base is kept")
        s = v.got(f"scaling{i}")
        v.true(f"scaling{i}", s is None or s.size == 1 and abs(float(s.reshape(())) - alpha / r) < 1e-12,
               f"{what}: scaling")
        b0 = v.got(f"init_B{i}")
        v.true(f"init_B{i}", b0 is None or bool((b0 == 0).all()), f"{what}: B starts at zero")
        _outputs_and_gradients(v, expected, i, what)
        _flag(v, f"x_grad_none{i}", False, f"{what}: no gradient to the input")
        v.close(f"grad_x{i}", expected[f"grad_x{i}"], f"{what}: the gradient reaching the input", rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- parameters and memory
@lru_cache(maxsize=256)  # the fixed cases are the same for every submission a grader judges
def _llama_trainable(hidden, inter, heads, kv_heads, head_dim, layers, r, targets: tuple[str, ...]) -> int:
    # The modules themselves, not transformers' lazy top-level names: the grader judges in threads,
    # and two threads' first `from transformers import LlamaConfig` can race (an ImportError).
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, head_dim=head_dim, num_hidden_layers=layers)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
        lora.add_lora(model, targets, r=r)
    return lora.count_parameters(model)[0]


def arithmetic_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Llama configurations (GQA, head_dim != hidden / heads), target sets and ranks, fixed and
    random; (frozen, trainable, bits) cases of the training memory, fixed and random."""
    configs = [(576, 1536, 9, 3, 64, 30), (4096, 11008, 32, 32, 128, 32), (256, 688, 4, 2, 96, 3),
               (2048, 8192, 32, 4, 64, 16)]
    target_sets = [("q_proj", "v_proj"), LINEARS, ("down_proj",), ("k_proj", "o_proj", "up_proj")]
    cases = [(c, t, r) for c, t, r in zip(configs * 2, target_sets + target_sets[::-1], (1, 8, 16, 64, 4, 2, 8, 32))]
    for _ in range(4):
        kv, groups = _int(gen, 1, 5), _int(gen, 1, 5)
        heads = kv * groups  # the width a multiple of the heads (transformers asks it), head_dim free
        cfg = (heads * 16 * _int(gen, 1, 11), 8 * _int(gen, 8, 400), heads, kv, 16 * _int(gen, 1, 9), _int(gen, 1, 13))
        chosen = torch.rand(len(LINEARS), generator=gen) < 0.5
        chosen[_int(gen, 0, len(LINEARS))] = True  # at least one target
        cases.append((cfg, tuple(t for t, c in zip(LINEARS, chosen.tolist()) if c), _int(gen, 1, 65)))
    out = {"n_cases": np.array(len(cases))}
    for i, (cfg, targets, r) in enumerate(cases):
        out.update({f"config{i}": np.array(cfg), f"targets{i}": np.array(",".join(targets)), f"r{i}": np.array(r)})
    mem = [(134_515_008, 0, 32, 32), (134_515_008, 460_800, 32, 32), (106_168_320, 4_884_480, 4.127, 32),
           (7_000_000, 1_000, 16, 16), (10, 3, 4.5, 32)]
    for _ in range(4):
        mem.append((_int(gen, 0, 10**10), _int(gen, 0, 10**8), _choice(gen, (2, 3, 4, 4.127, 4.5, 8, 16, 32)),
                    _choice(gen, (16, 32))))
    out["n_memory"] = np.array(len(mem))
    for i, case in enumerate(mem):
        out[f"mem_in{i}"] = np.array(case, dtype=np.float64)
    return out


def arithmetic_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_cases"])):
        cfg = [int(c) for c in inputs[f"config{i}"]]
        targets = tuple(str(inputs[f"targets{i}"]).split(","))
        out[f"trainable{i}"] = np.array(_llama_trainable(*cfg, int(inputs[f"r{i}"]), targets))
    for i in range(int(inputs["n_memory"])):
        frozen, trainable, fbits, tbits = inputs[f"mem_in{i}"].tolist()
        out.update({f"weights{i}": np.array(frozen * fbits / 8 + trainable * tbits / 8),
                    f"gradients{i}": np.array(trainable * tbits / 8), f"optimizer{i}": np.array(8.0 * trainable)})
    return out


def arithmetic_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        what = f"config {i}, targets {str(inputs[f'targets{i}']).split(',')}"
        v.equal(f"trainable{i}", expected[f"trainable{i}"], f"{what}: trainable parameters")
        v.equal(f"trainable_tuple{i}", expected[f"trainable{i}"], f"{what}: targets as a tuple")
    for i in range(int(inputs["n_memory"])):
        for key in ("weights", "gradients", "optimizer"):
            v.close(f"{key}{i}", expected[f"{key}{i}"], f"memory case {i}: {key}", rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- NF4
def _far_from_midpoints(w: torch.Tensor, block_size: int) -> torch.Tensor:
    """Nudge elements whose normalized value lies within 2e-5 of a decision boundary (dividing
    instead of multiplying by the reciprocal could flip them)."""
    mids = _midpoints()
    for _ in range(8):
        blocks = w.reshape(-1, block_size)
        absmax = blocks.abs().amax(dim=1, keepdim=True).clamp(min=1e-38)
        near = ((blocks / absmax).unsqueeze(-1) - mids).abs().amin(-1) < 2e-5
        if not bool(near.any()):
            break
        w = torch.where(near, blocks * (1 - 1e-4), blocks).reshape(w.shape)
    return w


def nf4_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Blocks of very different sizes (per-tensor absmax would crush the small ones), an all-zero
    block, blocks of 32 to 256, two random shapes; codes and absmax values to dequantize."""
    cases = [((4, 64), 64), ((8, 128), 64), ((2, 256), 128), ((512,), 32), ((3, 7, 64), 64), ((16, 64), 256)]
    for _ in range(2):
        bs = _choice(gen, (32, 64, 128, 256))
        cases.append(((_int(gen, 1, 9), bs * _int(gen, 1, 4)), bs))
    out = {"n_cases": np.array(len(cases))}
    for i, (shape, bs) in enumerate(cases):
        n = int(np.prod(shape))
        w = randn(n, generator=gen)
        w = (w.reshape(-1, bs) * 10.0 ** torch.randint(-3, 2, (n // bs, 1), generator=gen)).reshape(shape)
        if n // bs > 2:
            w.reshape(-1, bs)[1] = 0.0  # an all-zero block
        out.update({f"w{i}": _np(_far_from_midpoints(w, bs)), f"block{i}": np.array(bs)})
        absmax = torch.rand(n // bs, generator=gen) * 10.0 ** torch.randint(-3, 2, (n // bs,), generator=gen)
        if n // bs > 1:
            absmax[0] = 0.0
        out.update({f"dq_codes{i}": _np(torch.randint(0, 16, (n,), generator=gen).to(torch.uint8)),
                    f"dq_absmax{i}": _np(absmax.float())})
    return out


def nf4_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {"codebook": _np(nf4_codebook())}
    for i in range(int(inputs["n_cases"])):
        w, bs = torch.from_numpy(inputs[f"w{i}"]), int(inputs[f"block{i}"])
        packed, state = quantize_nf4(w, bs)
        out[f"codes{i}"] = _np(unpack_int4(packed, (w.numel(),)).to(torch.uint8))
        out[f"absmax{i}"] = _np(state.absmax)
        given = NF4State(w.shape, torch.float32, bs, absmax=torch.from_numpy(inputs[f"dq_absmax{i}"]))
        out[f"w_hat{i}"] = _np(dequantize_nf4(pack_int4(torch.from_numpy(inputs[f"dq_codes{i}"])), given))
    return out


def nf4_judge(v: Verdict, inputs, expected, answers) -> None:
    cb = answers.get("codebook")
    v.true("codebook", cb is None or cb.dtype == np.float32 and cb.shape == (16,), "codebook: 16 float32 values")
    v.close("codebook", expected["codebook"], "codebook differs", rtol=0, atol=1e-6)
    v.true("codebook", cb is None or cb.shape != (16,) or (cb[0], cb[7], cb[15]) == (-1.0, 0.0, 1.0),
           "codebook normalised to [-1, 1]")
    for i in range(int(inputs["n_cases"])):
        w, bs = inputs[f"w{i}"], int(inputs[f"block{i}"])
        what = f"case {i} (shape {tuple(w.shape)}, block {bs})"
        v.equal(f"absmax{i}", expected[f"absmax{i}"], f"{what}: absmax")
        codes = answers.get(f"codes{i}")
        v.true(f"codes{i}", codes is None or codes.dtype == np.uint8 and codes.size == w.size,
               f"{what}: codes uint8 [numel]")
        v.equal(f"codes{i}", expected[f"codes{i}"], f"{what}: codes differ")
        v.close(f"w_hat{i}", expected[f"w_hat{i}"], f"{what}: w_hat", rtol=1e-6, atol=0)
    v.equal("w0_after", inputs["w0"], "nf4_quantize_blockwise changed its input")


# ----------------------------------------------------------------------------- double quantization
def double_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """First-level absmax values (partial last group, one constant group, a wide spread, a random
    count), kept away from rounding ties; int8 codes, scales and offsets to rebuild; (block size,
    double quantization) pairs for the bits per parameter."""
    sizes = [256, 300, 1000, 5, 513, _int(gen, 1, 1200)]
    out = {"n_cases": np.array(len(sizes))}
    for i, n in enumerate(sizes):
        absmax = torch.rand(n, generator=gen) * 10.0 ** torch.randint(-2, 1, (1,), generator=gen)
        if n == 513:
            absmax[256:512] = absmax[256:512].mean()  # a group that is (almost) constant
        if n == 1000:
            absmax[17] = 40 * absmax.max()  # one block with an outlier
        for _ in range(8):  # keep (absmax - offset) / scale away from .5 ties
            codes, scale, offset = _quantize_absmax(absmax)
            r = torch.nn.functional.pad(absmax - offset, (0, (-n) % 256)).reshape(-1, 256) / scale.reshape(-1, 1)
            near = ((r.reshape(-1)[:n] - torch.floor(r.reshape(-1)[:n])) - 0.5).abs() < 1e-3
            if not bool(near.any()):
                break
            absmax = torch.where(near, absmax * (1 + 3e-3), absmax)
        groups = -(-n // 256)
        scale = torch.rand(groups, generator=gen) * 10.0 ** torch.randint(-4, -1, (groups,), generator=gen)
        codes = torch.randint(-127, 128, (n,), generator=gen).to(torch.int8)
        out.update({f"absmax{i}": _np(absmax), f"rb_codes{i}": _np(codes), f"rb_scale{i}": _np(scale),
                    f"rb_offset{i}": _np(torch.rand((), generator=gen) * 100 * scale.max())})
    bits = [(64, True), (64, False), (128, True), (32, False), (256, True), (4096, True)]
    bits += [(_int(gen, 8, 8193), bool(_int(gen, 0, 2))) for _ in range(3)]
    out["bits_in"] = np.array([[bs, dq] for bs, dq in bits], dtype=np.int64)
    return out


def double_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_cases"])):
        codes, scale, offset = _quantize_absmax(torch.from_numpy(inputs[f"absmax{i}"]))
        rebuilt = _dequantize_absmax(*(torch.from_numpy(inputs[f"rb_{k}{i}"]) for k in ("codes", "scale", "offset")))
        out.update({f"codes{i}": _np(codes), f"scale{i}": _np(scale), f"offset{i}": _np(offset),
                    f"rebuilt{i}": _np(rebuilt)})
    out["bits"] = np.array([4 + 8 / bs + 32 / (bs * 256) if dq else 4 + 32 / bs
                            for bs, dq in inputs["bits_in"].tolist()])
    return out


def double_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        what = f"case {i} ({inputs[f'absmax{i}'].size} absmax values)"
        v.close(f"offset{i}", expected[f"offset{i}"], f"{what}: offset", rtol=1e-6, atol=0)
        v.close(f"scale{i}", expected[f"scale{i}"], f"{what}: scales (one per group of 256)", rtol=1e-5, atol=0)
        codes = answers.get(f"codes{i}")
        v.true(f"codes{i}", codes is None or codes.dtype == np.int8, f"{what}: codes are int8")
        v.equal(f"codes{i}", expected[f"codes{i}"], f"{what}: codes")
        v.close(f"rebuilt{i}", expected[f"rebuilt{i}"], f"{what}: rebuilt absmax", rtol=1e-5, atol=1e-7)
    got = v.got("bits")
    if got is not None and got.shape == expected["bits"].shape:
        for j, ((bs, dq), want) in enumerate(zip(inputs["bits_in"].tolist(), expected["bits"].tolist())):
            v.true("bits", bool(np.isclose(got[j], want, rtol=1e-9, atol=0)),
                   f"bits per parameter, block {bs}, double {bool(dq)}")
    elif got is not None:
        v.fail("bits", "one number of bits per (block size, double quantization) pair")


# ----------------------------------------------------------------------------- int4
def int4_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Block-wise symmetric int4 (absmax / 7) on normal, heavy-tailed and uniform weights (and a
    random shape); weights to measure the SQNR of against their int4 roundtrip."""
    cases = [((8, 64), 64, "normal"), ((4, 256), 64, "student-t"), ((2, 128), 32, "uniform"),
             ((1024,), 128, "normal"), ((3, 2, 64), 64, "normal")]
    bs = _choice(gen, (32, 64, 128))
    cases.append(((_int(gen, 3, 9), bs * _int(gen, 1, 3)), bs, _choice(gen, ("normal", "student-t", "uniform"))))
    out = {"n_cases": np.array(len(cases))}
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
        for _ in range(8):  # no half ties
            scale = (w.abs().amax(1, keepdim=True) / 7).clamp(min=torch.finfo(torch.float32).eps)
            near = (((w / scale) - torch.floor(w / scale)) - 0.5).abs() < 1e-3
            if not bool(near.any()):
                break
            w = torch.where(near, w * 0.999, w)
        if n // bs > 2:  # exact ties at scale 1.0: round half to even (2.5 -> 2, -3.5 -> -4, 0.5 -> 0)
            w[2] = torch.cat([torch.tensor([7.0, 2.5, -3.5, 0.5]), linspace(-0.4, 0.4, bs - 4)])
        w = w.reshape(shape)
        noisy = w + randn(*shape, generator=gen) * 0.1 * w.abs().max()
        out.update({f"w{i}": _np(w), f"block{i}": np.array(bs), f"sq_x{i}": _np(noisy),
                    f"sq_xhat{i}": _np(_int4(noisy, bs))})
    return out


def _int4(w: torch.Tensor, bs: int) -> torch.Tensor:
    flat = w.reshape(-1, bs)
    return fake_quantize(flat, choose_qparams(flat, 4, True, PerGroup(bs))).reshape(w.shape)


def int4_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_cases"])):
        out[f"w_hat{i}"] = _np(_int4(torch.from_numpy(inputs[f"w{i}"]), int(inputs[f"block{i}"])))
        x, x_hat = torch.from_numpy(inputs[f"sq_x{i}"]), torch.from_numpy(inputs[f"sq_xhat{i}"])
        out[f"sqnr{i}"] = np.array(sqnr_db(x, x_hat))
    out["sqnr_same"] = np.array(sqnr_db(torch.from_numpy(inputs["w0"]), torch.from_numpy(inputs["w0"])))
    return out


def int4_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        w, bs = inputs[f"w{i}"], int(inputs[f"block{i}"])
        what = f"case {i} (shape {tuple(w.shape)}, block {bs})"
        v.close(f"w_hat{i}", expected[f"w_hat{i}"], f"{what}: w_hat", rtol=1e-6, atol=1e-9)
        v.close(f"sqnr{i}", expected[f"sqnr{i}"], f"{what}: SQNR", rtol=1e-6)
    v.close("sqnr_same", expected["sqnr_same"], "no error: infinite SQNR", rtol=1e-6)


HIDDEN_TESTS = [
    HiddenTest("ex1_lora_linear_tests", "lora", lora_inputs, lora_expected, lora_judge),
    HiddenTest("ex2_arithmetic_tests", "arithmetic", arithmetic_inputs, arithmetic_expected, arithmetic_judge),
    HiddenTest("ex3_nf4_tests", "nf4", nf4_inputs, nf4_expected, nf4_judge),
    HiddenTest("ex4_double_quant_tests", "double_quant", double_inputs, double_expected, double_judge),
    HiddenTest("ex5_nf4_vs_int4_tests", "int4", int4_inputs, int4_expected, int4_judge),
    HiddenTest("ex6_qlora_linear_tests", "qlora", qlora_inputs, qlora_expected, qlora_judge),
]


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir``: each test's inputs for the lab's
    seed and the expected values on them."""
    write_hidden_references(out_dir, HIDDEN_TESTS, SEED)


if __name__ == "__main__":
    generator_main(make, LAB)
