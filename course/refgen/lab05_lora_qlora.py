"""The hidden tests of lab05_lora_qlora, judged outside the student's kernel.

Each test draws its inputs from a generator (the lab's ``SEED`` for the committed reference
files, a per-submission seed when grading: ``qcourse.judge``); every expected value comes from
qcore's reference implementation (``qcore.lora``, ``qcore.nf4``, ``qcore.quant``), never from a
student function; the parameter counts come from adapters really added to Llama models built on
the ``meta`` device (no memory, no download).

    python course/refgen/lab05_lora_qlora.py course/reference/lab05_lora_qlora
"""
from __future__ import annotations

from functools import lru_cache, partial
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
    "lora": {"y*": 64, "base_y*": 64, "grad_*": 64, "merged*": 16,  # products over up to 32 inputs + r
             "visible_y*": 64, "visible_base_y*": 64, "visible_grad_*": 64, "visible_merged*": 16},
    "qlora": {"y*": 256, "grad_*": 256, "visible_y*": 256, "visible_grad_*": 256},  # up to 256 inputs
    "double_quant": {"offset*": 1024, "visible_offset*": 1024},  # the mean of up to 1,200 absmax values
    "int4": {"sqnr*": 1024, "visible_sqnr*": 4096},  # sums over up to 4,096 weights
    "recompute": {"y*": 256, "grad_x*": 64, "visible_y*": 256, "visible_grad_x*": 64},  # up to 256 inputs, 64 outputs
}


def _int(gen: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high) from ``gen``."""
    return int(torch.randint(low, high, (1,), generator=gen))


def _choice(gen: torch.Generator, options):
    return options[_int(gen, 0, len(options))]


def _cases(inputs: dict, count: str = "n_cases", visible: str = "n_visible") -> list[tuple[str, str]]:
    """Each case's (prefix, suffix) of its keys: ``w3`` for case 3, ``visible_w0`` for the visible
    checks' first case (the ask writes the same keys)."""
    return ([("", str(i)) for i in range(int(inputs[count]))]
            + [("visible_", str(j)) for j in range(int(inputs.get(visible, 0)))])


def _key(case: tuple[str, str], name: str) -> str:
    """``_key(("visible_", "0"), "w")`` is ``visible_w0``."""
    return f"{case[0]}{name}{case[1]}"


def _case_name(case: tuple[str, str]) -> str:
    return f"the visible checks' case {case[1]}" if case[0] else f"case {case[1]}"


def _what(inputs: dict, case) -> str:
    w = inputs[_key(case, "w")]
    r, alpha = int(inputs[_key(case, "r")]), float(inputs[_key(case, "alpha")])
    return f"{_case_name(case)} (in {w.shape[1]}, out {w.shape[0]}, r {r}, alpha {alpha:g})"


def _flag(v: Verdict, key: str, want: bool, what: str) -> None:
    """A yes/no answer (a flag the ask read off the student's objects) that must be ``want``."""
    got = v.answers.get(key)
    v.true(key, got is not None and got.size == 1 and bool(got.reshape(())) == want, what)


def _grad_close(v: Verdict, key: str, want: np.ndarray, what: str) -> None:
    """Gradients: sums over the batch, so within a tolerance scaled to their largest value."""
    v.close(key, want, what, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(want).max(initial=0.0))))


def _outputs_and_gradients(v: Verdict, expected, case, what: str) -> None:
    """An adapter layer's outputs with the given A and B, and the gradients of their sum for A and B."""
    v.close(_key(case, "y"), expected[_key(case, "y")], f"{what}: outputs differ", rtol=1e-5, atol=1e-5)
    for m in ("A", "B"):
        _flag(v, _key(case, f"{m}_grad_none"), False, f"{what}: adapters get gradients")
        _grad_close(v, _key(case, f"grad_{m}"), expected[_key(case, f"grad_{m}")], f"{what}: the gradient of {m}")


# ----------------------------------------------------------------------------- LoRA and QLoRA layers
def _layer_inputs(gen: torch.Generator, cases, prefix: str = "") -> dict[str, np.ndarray]:
    """Base layers (weight, bias), adapters A and B to load, and 3-D inputs; keys ``w0``, ... (or
    ``visible_w0``, ... with ``prefix="visible_"``)."""
    out = {"n_visible" if prefix else "n_cases": np.array(len(cases))}
    for i, (n_in, n_out, r, alpha, has_bias) in enumerate(cases):
        w = randn(n_out, n_in, generator=gen) / n_in ** 0.5
        b = randn(n_out, generator=gen) if has_bias else torch.zeros(0)
        a, bb = randn(r, n_in, generator=gen), randn(n_out, r, generator=gen) * 0.1
        x = randn(2, 3, n_in, generator=gen)
        out.update({f"{prefix}{k}{i}": v for k, v in {
            "w": _np(w), "bias": _np(b), "has_bias": np.array(bool(has_bias)), "r": np.array(int(r)),
            "alpha": np.array(float(alpha)), "A": _np(a), "B": _np(bb), "x": _np(x)}.items()})
    return out


def _visible_layer(n_in: int, n_out: int, r: int, alpha: float, A=None, B=None) -> dict[str, np.ndarray]:
    """The visible checks' layer as a case: their shapes, r, alpha and (where they fix them) A and B;
    the weights and inputs, which they draw at random, from a fixed generator of their own."""
    out = _layer_inputs(torch.Generator().manual_seed(0), [(n_in, n_out, r, alpha, True)], "visible_")
    if A is not None:
        out.update(visible_A0=np.asarray(A, np.float32), visible_B0=np.asarray(B, np.float32))
    return out


def _qcore_layer(cls, inputs: dict, case):
    """qcore's adapter layer on the case's base, with the case's A and B (the initialisation, which
    draws from the global generator, in a forked generator: it is overwritten anyway)."""
    k = partial(_key, case)
    w = torch.from_numpy(inputs[k("w")])
    has_bias = bool(inputs[k("has_bias")])
    base = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
    with torch.no_grad():
        base.weight.copy_(w)
        if has_bias:
            base.bias.copy_(torch.from_numpy(inputs[k("bias")]))
    with torch.random.fork_rng(devices=[]):
        layer = cls(base, r=int(inputs[k("r")]), alpha=float(inputs[k("alpha")]))
    with torch.no_grad():
        layer.lora_A.copy_(torch.from_numpy(inputs[k("A")]))
        layer.lora_B.copy_(torch.from_numpy(inputs[k("B")]))
    return base, layer.eval()


def lora_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Square layers with r = in = out (where a transposed adapter would still run), alpha != r,
    layers without bias; then two random ones; and the visible checks' layer (6 -> 4, r 2, alpha 4,
    their A and B)."""
    cases = [(6, 4, 2, 4, True), (8, 8, 8, 16, True), (16, 5, 4, 4, False), (12, 12, 3, 1, True),
             (4, 4, 4, 32, False), (32, 7, 1, 2, True)]
    for _ in range(2):
        cases.append((_int(gen, 2, 25), _int(gen, 2, 25), _int(gen, 1, 9), _choice(gen, (1, 2, 4, 8, 16, 32)),
                      bool(_int(gen, 0, 2))))
    visible = _visible_layer(6, 4, 2, 4, A=np.linspace(-1, 1, 12).reshape(2, 6),
                             B=[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.5, -1.0]])
    return _layer_inputs(gen, cases) | visible


def lora_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's outputs with the given A and B, the gradients of their sum, the base's outputs
    and the merged weight."""
    out = {}
    for case in _cases(inputs):
        k = partial(_key, case)
        base, layer = _qcore_layer(lora.LoRALinear, inputs, case)
        x = torch.from_numpy(inputs[k("x")])
        y = layer(x)
        y.sum().backward()
        with torch.no_grad():
            out.update({k("y"): _np(y), k("base_y"): _np(base(x)), k("merged"): _np(layer.merged_linear().weight),
                        k("grad_A"): _np(layer.lora_A.grad), k("grad_B"): _np(layer.lora_B.grad)})
    return out


def lora_judge(v: Verdict, inputs, expected, answers) -> None:
    for case in _cases(inputs):
        k = partial(_key, case)
        what, w = _what(inputs, case), inputs[k("w")]
        r, alpha, (n_out, n_in) = int(inputs[k("r")]), float(inputs[k("alpha")]), w.shape
        s = v.got(k("scaling"))
        v.true(k("scaling"), s is None or s.size == 1 and abs(float(s.reshape(())) - alpha / r) < 1e-12,
               f"{what}: scaling")
        fresh, fresh_base = answers.get(k("fresh_y")), answers.get(k("fresh_base_y"))
        v.true(k("fresh_y"), fresh is not None and fresh_base is not None and fresh.shape == fresh_base.shape
               and np.array_equal(fresh, fresh_base), f"{what}: a new layer must equal its base")
        v.close(k("fresh_y"), expected[k("base_y")], f"{what}: a new layer must equal its base", rtol=1e-5, atol=1e-5)
        a0, b0 = v.got(k("init_A")), v.got(k("init_B"))
        v.true(k("init_A"), a0 is None or a0.shape == (r, n_in), f"{what}: A has shape [r, in]")
        v.true(k("init_B"), b0 is None or b0.shape == (n_out, r), f"{what}: B has shape [out, r]")
        v.true(k("init_B"), a0 is not None and b0 is not None and bool((b0 == 0).all()) and bool((a0 != 0).all()),
               f"{what}: initialisation")
        v.true(k("init_A"), a0 is None or a0.size == 0 or float(np.abs(a0).max()) <= np.float32(1 / np.sqrt(n_in)),
               f"{what}: A's bound")
        trainable = [answers.get(k(name)) for name in ("trainable_A", "trainable_B", "n_trainable")]
        v.true(k("n_trainable"), all(t is not None and t.size == 1 for t in trainable)
               and bool(trainable[0]) and bool(trainable[1]) and int(trainable[2]) == 2, f"{what}: trainable")
        frozen = answers.get(k("base_requires_grad"))
        v.true(k("base_requires_grad"), frozen is not None and frozen.shape == (1 + bool(inputs[k("has_bias")]),)
               and not frozen.any(), f"{what}: the base stays frozen")
        _outputs_and_gradients(v, expected, case, what)
        _flag(v, k("base_grad_none"), True, f"{what}: the base weight got a gradient")
        v.close(k("merged"), expected[k("merged")], f"{what}: merged weight", rtol=1e-5, atol=1e-5)
        v.close(k("merged_y"), expected[k("y")], f"{what}: merged outputs", rtol=1e-5, atol=1e-5)
        v.close(k("merged_twice"), expected[k("merged")], f"{what}: merging twice", rtol=1e-5, atol=1e-5)
        v.close(k("unmerged"), w, f"{what}: unmerge", rtol=1e-5, atol=1e-5)
        v.close(k("unmerged_y"), expected[k("y")], f"{what}: unmerged outputs", rtol=1e-5, atol=1e-5)
        _flag(v, k("dropout_is_module"), True, f"{what}: self.dropout is an nn.Dropout")
        v.close(k("dropped_y"), expected[k("base_y")], f"{what}: dropout on the adapter's input only",
                rtol=1e-5, atol=1e-5)


def qlora_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """QLoRA layers (block 64, double quantization): fixed shapes, then a random one; and the
    visible checks' layer (128 -> 8, r 4, alpha 8)."""
    cases = [(64, 4, 2, 4, True), (128, 8, 8, 16, False), (64, 64, 4, 4, True), (192, 3, 1, 2, True)]
    cases.append((64 * _int(gen, 1, 5), _int(gen, 1, 17), _int(gen, 1, 9), _choice(gen, (1, 2, 4, 8, 16, 32)),
                  bool(_int(gen, 0, 2))))
    return _layer_inputs(gen, cases) | _visible_layer(128, 8, 4, 8)


def qlora_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's QLoRA outputs with the given A and B and the gradients of their sum; the gradient
    reaching the input is ``1 @ (w_hat + scaling * B @ A)`` on every row (NF4 with double quantization)."""
    out = {}
    for case in _cases(inputs):
        k = partial(_key, case)
        _, layer = _qcore_layer(lora.QLoRALinear, inputs, case)
        xg = torch.from_numpy(inputs[k("x")]).clone().requires_grad_(True)
        y = layer(xg)
        y.sum().backward()
        w = torch.from_numpy(inputs[k("w")])
        w_eff = dequantize_nf4(*quantize_nf4(w, 64, double_quant=True)) + float(inputs[k("alpha")]) / int(
            inputs[k("r")]) * (torch.from_numpy(inputs[k("B")]) @ torch.from_numpy(inputs[k("A")]))
        out.update({k("y"): _np(y), k("grad_A"): _np(layer.lora_A.grad), k("grad_B"): _np(layer.lora_B.grad),
                    k("grad_x"): _np((torch.ones(w.shape[0]) @ w_eff).expand(xg.shape))})
    return out


def qlora_judge(v: Verdict, inputs, expected, answers) -> None:
    for case in _cases(inputs):
        k = partial(_key, case)
        what, w = _what(inputs, case), inputs[k("w")]
        r, alpha = int(inputs[k("r")]), float(inputs[k("alpha")])
        names = [answers.get(k(name)) for name in ("has_A", "has_B", "n_params")]
        v.true(k("n_params"), all(t is not None and t.size == 1 for t in names)
               and bool(names[0]) and bool(names[1]) and int(names[2]) == 2, f"{what}: parameters")
        sizes = answers.get(k("float_sizes"))
        v.true(k("float_sizes"), sizes is not None and sizes.ndim == 1 and bool((sizes < w.size).all()),
               f"{what}: a float copy of the weight is kept")
        linears = answers.get(k("n_linear"))
        v.true(k("n_linear"), linears is not None and linears.size == 1 and int(linears) == 0,
               f"{what}: the float base is kept")
        s = v.got(k("scaling"))
        v.true(k("scaling"), s is None or s.size == 1 and abs(float(s.reshape(())) - alpha / r) < 1e-12,
               f"{what}: scaling")
        b0 = v.got(k("init_B"))
        v.true(k("init_B"), b0 is None or bool((b0 == 0).all()), f"{what}: B starts at zero")
        _outputs_and_gradients(v, expected, case, what)
        _flag(v, k("x_grad_none"), False, f"{what}: no gradient to the input")
        v.close(k("grad_x"), expected[k("grad_x")], f"{what}: the gradient reaching the input", rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- parameters and memory
@lru_cache(maxsize=256)  # the fixed cases are the same for every submission a grader judges
def _llama_trainable(hidden, inter, heads, kv_heads, head_dim, layers, r, targets: tuple[str, ...]) -> int:
    # The modules themselves, not transformers' lazy top-level names: the grader judges in threads,
    # and two threads' first `from transformers import LlamaConfig` can race (an ImportError).
    if not targets:  # nothing to adapt (qcore's add_lora refuses a model it would leave unchanged)
        return 0
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
    mem = [(134_515_008, 0, 32, 32), (134_515_008, 460_800, 32, 32), (106_168_320, 4_884_480, 4.127, 32),
           (7_000_000, 1_000, 16, 16), (10, 3, 4.5, 32)]
    for _ in range(4):
        mem.append((_int(gen, 0, 10**10), _int(gen, 0, 10**8), _choice(gen, (2, 3, 4, 4.127, 4.5, 8, 16, 32)),
                    _choice(gen, (16, 32))))
    # The visible checks' cases: SmolLM2's shape, no target among them; their two memory plans.
    smol = (576, 1536, 9, 3, 64, 30)
    visible = [(smol, ("q_proj",), 8), (smol, ("q_proj", "v_proj"), 8), (smol, ("down_proj",), 1), (smol, (), 4)]
    visible_mem = [(1000, 0, 32, 32), (1000, 10, 4.127, 32)]
    out = {"n_cases": np.array(len(cases)), "n_visible": np.array(len(visible)), "n_memory": np.array(len(mem)),
           "n_visible_memory": np.array(len(visible_mem))}
    for prefix, configs, plans in (("", cases, mem), ("visible_", visible, visible_mem)):
        for i, (cfg, targets, r) in enumerate(configs):
            out.update({f"{prefix}config{i}": np.array(cfg), f"{prefix}targets{i}": np.array(",".join(targets)),
                        f"{prefix}r{i}": np.array(r)})
        for i, plan in enumerate(plans):
            out[f"{prefix}mem_in{i}"] = np.array(plan, dtype=np.float64)
    return out


def _memory_cases(inputs: dict) -> list[tuple[str, str]]:
    return _cases(inputs, "n_memory", "n_visible_memory")


def _targets(inputs: dict, case) -> tuple[str, ...]:
    """The case's target names ("" is no target)."""
    return tuple(t for t in str(inputs[_key(case, "targets")]).split(",") if t)


def arithmetic_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for case in _cases(inputs):
        cfg = [int(c) for c in inputs[_key(case, "config")]]
        out[_key(case, "trainable")] = np.array(_llama_trainable(*cfg, int(inputs[_key(case, "r")]),
                                                                 _targets(inputs, case)))
    for case in _memory_cases(inputs):
        frozen, trainable, fbits, tbits = inputs[_key(case, "mem_in")].tolist()
        k = partial(_key, case)
        out.update({k("weights"): np.array(frozen * fbits / 8 + trainable * tbits / 8),
                    k("gradients"): np.array(trainable * tbits / 8), k("optimizer"): np.array(8.0 * trainable)})
    return out


def arithmetic_judge(v: Verdict, inputs, expected, answers) -> None:
    for case in _cases(inputs):
        what = f"{_case_name(case).replace('case', 'config')}, targets {list(_targets(inputs, case))}"
        v.equal(_key(case, "trainable"), expected[_key(case, "trainable")], f"{what}: trainable parameters")
        v.equal(_key(case, "trainable_tuple"), expected[_key(case, "trainable")], f"{what}: targets as a tuple")
    for case in _memory_cases(inputs):
        for name in ("weights", "gradients", "optimizer"):
            v.close(_key(case, name), expected[_key(case, name)], f"memory {_case_name(case)}: {name}",
                    rtol=1e-9, atol=1e-9)


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
    # The visible checks' case: three blocks of 64 (small, large, all zero), dequantized from their codes.
    w = _far_from_midpoints(torch.cat([linspace(-1, 1, 64) * 0.01, linspace(-3, 3, 64), torch.zeros(64)]), 64)
    packed, state = quantize_nf4(w.reshape(3, 64), 64)
    out.update(n_visible=np.array(1), visible_w0=_np(w.reshape(3, 64)), visible_block0=np.array(64),
               visible_dq_codes0=_np(unpack_int4(packed, (w.numel(),)).to(torch.uint8)),
               visible_dq_absmax0=_np(state.absmax))
    return out


def nf4_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {"codebook": _np(nf4_codebook())}
    for case in _cases(inputs):
        k = partial(_key, case)
        w, bs = torch.from_numpy(inputs[k("w")]), int(inputs[k("block")])
        packed, state = quantize_nf4(w, bs)
        out[k("codes")] = _np(unpack_int4(packed, (w.numel(),)).to(torch.uint8))
        out[k("absmax")] = _np(state.absmax)
        given = NF4State(w.shape, torch.float32, bs, absmax=torch.from_numpy(inputs[k("dq_absmax")]))
        out[k("w_hat")] = _np(dequantize_nf4(pack_int4(torch.from_numpy(inputs[k("dq_codes")])), given))
    return out


def nf4_judge(v: Verdict, inputs, expected, answers) -> None:
    cb = answers.get("codebook")
    v.true("codebook", cb is None or cb.dtype == np.float32 and cb.shape == (16,), "codebook: 16 float32 values")
    v.close("codebook", expected["codebook"], "codebook differs", rtol=0, atol=1e-6)
    v.true("codebook", cb is None or cb.shape != (16,) or (cb[0], cb[7], cb[15]) == (-1.0, 0.0, 1.0),
           "codebook normalised to [-1, 1]")
    for case in _cases(inputs):
        k = partial(_key, case)
        w, bs = inputs[k("w")], int(inputs[k("block")])
        what = f"{_case_name(case)} (shape {tuple(w.shape)}, block {bs})"
        v.equal(k("absmax"), expected[k("absmax")], f"{what}: absmax")
        codes = answers.get(k("codes"))
        v.true(k("codes"), codes is None or codes.dtype == np.uint8 and codes.size == w.size,
               f"{what}: codes uint8 [numel]")
        v.equal(k("codes"), expected[k("codes")], f"{what}: codes differ")
        v.close(k("w_hat"), expected[k("w_hat")], f"{what}: w_hat", rtol=1e-6, atol=0)
    v.equal("w0_after", inputs["w0"], "nf4_quantize_blockwise changed its input")


# ----------------------------------------------------------------------------- double quantization
def _far_from_ties(absmax: torch.Tensor) -> torch.Tensor:
    """Nudge absmax values whose (absmax - offset) / scale lies within 1e-3 of a .5 tie."""
    n = absmax.numel()
    for _ in range(8):
        codes, scale, offset = _quantize_absmax(absmax)
        r = torch.nn.functional.pad(absmax - offset, (0, (-n) % 256)).reshape(-1, 256) / scale.reshape(-1, 1)
        near = ((r.reshape(-1)[:n] - torch.floor(r.reshape(-1)[:n])) - 0.5).abs() < 1e-3
        if not bool(near.any()):
            break
        absmax = torch.where(near, absmax * (1 + 3e-3), absmax)
    return absmax


def _rebuild_inputs(prefix: str, i: int, codes, scale, offset) -> dict[str, np.ndarray]:
    return {f"{prefix}rb_codes{i}": _np(codes), f"{prefix}rb_scale{i}": _np(scale),
            f"{prefix}rb_offset{i}": _np(torch.as_tensor(offset, dtype=torch.float32))}


def double_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """First-level absmax values (partial last group, one constant group, a wide spread, a random
    count), kept away from rounding ties; int8 codes, scales and offsets to rebuild; (block size,
    double quantization) pairs for the bits per parameter. The visible checks' two cases, rebuilt
    from their own codes."""
    sizes = [256, 300, 1000, 5, 513, _int(gen, 1, 1200)]
    out = {"n_cases": np.array(len(sizes))}
    for i, n in enumerate(sizes):
        absmax = torch.rand(n, generator=gen) * 10.0 ** torch.randint(-2, 1, (1,), generator=gen)
        if n == 513:
            absmax[256:512] = absmax[256:512].mean()  # a group that is (almost) constant
        if n == 1000:
            absmax[17] = 40 * absmax.max()  # one block with an outlier
        absmax = _far_from_ties(absmax)
        groups = -(-n // 256)
        scale = torch.rand(groups, generator=gen) * 10.0 ** torch.randint(-4, -1, (groups,), generator=gen)
        codes = torch.randint(-127, 128, (n,), generator=gen).to(torch.int8)
        out[f"absmax{i}"] = _np(absmax)
        out |= _rebuild_inputs("", i, codes, scale, torch.rand((), generator=gen) * 100 * scale.max())
    bits = [(64, True), (64, False), (128, True), (32, False), (256, True), (4096, True)]
    bits += [(_int(gen, 8, 8193), bool(_int(gen, 0, 2))) for _ in range(3)]
    out["bits_in"] = np.array([[bs, dq] for bs, dq in bits], dtype=np.int64)
    visible = [torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.cat([torch.full((256,), 0.5), torch.tensor([0.5, 4.5])])]
    out["n_visible"] = np.array(len(visible))
    for j, absmax in enumerate(visible):
        absmax = _far_from_ties(absmax)
        out[f"visible_absmax{j}"] = _np(absmax)
        out |= _rebuild_inputs("visible_", j, *_quantize_absmax(absmax))
    out["visible_bits_in"] = np.array([[64, True], [64, False]], dtype=np.int64)
    return out


def _bits(pairs) -> np.ndarray:
    return np.array([4 + 8 / bs + 32 / (bs * 256) if dq else 4 + 32 / bs for bs, dq in pairs.tolist()])


def double_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for case in _cases(inputs):
        k = partial(_key, case)
        codes, scale, offset = _quantize_absmax(torch.from_numpy(inputs[k("absmax")]))
        rebuilt = _dequantize_absmax(*(torch.from_numpy(inputs[k(f"rb_{name}")]) for name in ("codes", "scale", "offset")))
        out.update({k("codes"): _np(codes), k("scale"): _np(scale), k("offset"): _np(offset), k("rebuilt"): _np(rebuilt)})
    out["bits"], out["visible_bits"] = _bits(inputs["bits_in"]), _bits(inputs["visible_bits_in"])
    return out


def double_judge(v: Verdict, inputs, expected, answers) -> None:
    for case in _cases(inputs):
        k = partial(_key, case)
        what = f"{_case_name(case)} ({inputs[k('absmax')].size} absmax values)"
        v.close(k("offset"), expected[k("offset")], f"{what}: offset", rtol=1e-6, atol=0)
        v.close(k("scale"), expected[k("scale")], f"{what}: scales (one per group of 256)", rtol=1e-5, atol=0)
        codes = answers.get(k("codes"))
        v.true(k("codes"), codes is None or codes.dtype == np.int8, f"{what}: codes are int8")
        v.equal(k("codes"), expected[k("codes")], f"{what}: codes")
        v.close(k("rebuilt"), expected[k("rebuilt")], f"{what}: rebuilt absmax", rtol=1e-5, atol=1e-7)
    for prefix in ("", "visible_"):
        key, pairs, want = f"{prefix}bits", inputs[f"{prefix}bits_in"], expected[f"{prefix}bits"]
        got = v.got(key)
        if got is not None and got.shape == want.shape:
            for j, ((bs, dq), w) in enumerate(zip(pairs.tolist(), want.tolist())):
                v.true(key, bool(np.isclose(got[j], w, rtol=1e-9, atol=0)),
                       f"bits per parameter, block {bs}, double {bool(dq)}")
        elif got is not None:
            v.fail(key, "one number of bits per (block size, double quantization) pair")


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
    # The visible checks' cases: two blocks of 4 (exact ties), zeros, 64 x 64 normal numbers; the SQNR
    # of [3, 4] against [3, 3], of no error, of the normal numbers against their int4 roundtrip.
    normal = randn(64, 64, generator=torch.Generator().manual_seed(0))
    visible = [(torch.tensor([7.0, -3.5, 0.5, 1.6, 0.14, 0.05, -0.03, 0.0]), 4, torch.tensor([3.0, 4.0]),
                torch.tensor([3.0, 3.0])),
               (torch.zeros(8), 4, torch.ones(3), torch.ones(3)),
               (normal, 64, normal, _int4(normal, 64))]
    out["n_visible"] = np.array(len(visible))
    for j, (w, bs, x, x_hat) in enumerate(visible):
        out.update({f"visible_w{j}": _np(w), f"visible_block{j}": np.array(bs), f"visible_sq_x{j}": _np(x),
                    f"visible_sq_xhat{j}": _np(x_hat)})
    return out


def _int4(w: torch.Tensor, bs: int) -> torch.Tensor:
    flat = w.reshape(-1, bs)
    return fake_quantize(flat, choose_qparams(flat, 4, True, PerGroup(bs))).reshape(w.shape)


def int4_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for case in _cases(inputs):
        k = partial(_key, case)
        out[k("w_hat")] = _np(_int4(torch.from_numpy(inputs[k("w")]), int(inputs[k("block")])))
        x, x_hat = torch.from_numpy(inputs[k("sq_x")]), torch.from_numpy(inputs[k("sq_xhat")])
        out[k("sqnr")] = np.array(sqnr_db(x, x_hat))
    out["sqnr_same"] = np.array(sqnr_db(torch.from_numpy(inputs["w0"]), torch.from_numpy(inputs["w0"])))
    return out


def int4_judge(v: Verdict, inputs, expected, answers) -> None:
    for case in _cases(inputs):
        k = partial(_key, case)
        w, bs = inputs[k("w")], int(inputs[k("block")])
        what = f"{_case_name(case)} (shape {tuple(w.shape)}, block {bs})"
        v.close(k("w_hat"), expected[k("w_hat")], f"{what}: w_hat", rtol=1e-6, atol=1e-9)
        v.close(k("sqnr"), expected[k("sqnr")], f"{what}: SQNR", rtol=1e-6)
    v.close("sqnr_same", expected["sqnr_same"], "no error: infinite SQNR", rtol=1e-6)


# ----------------------------------------------------------------------------- recompute in backward
def _recompute_case(gen: torch.Generator, n_in: int, n_out: int, x_shape, double_quant: bool, prefix: str, i: int):
    """A frozen NF4 weight [out, in], an input x [..., in] with fewer elements than the weight (so
    that a saved tensor as large as the weight can only be the weight), and the gradient of y."""
    assert int(np.prod(x_shape)) < n_out * n_in and x_shape[-1] == n_in
    w = randn(n_out, n_in, generator=gen) / n_in ** 0.5
    return {f"{prefix}w{i}": _np(w), f"{prefix}x{i}": _np(randn(*x_shape, generator=gen)),
            f"{prefix}g{i}": _np(randn(*x_shape[:-1], n_out, generator=gen)),
            f"{prefix}double_quant{i}": np.array(bool(double_quant))}


def recompute_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Non-square layers (a missing transpose cannot run), 3-D inputs, with and without double
    quantization, one random shape; and the visible checks' layer (64 -> 128, x [4, 64])."""
    cases = [(64, 64, (4, 64), True), (128, 32, (2, 3, 128), False), (192, 16, (5, 192), True)]
    n_in = 64 * _int(gen, 1, 4)
    cases.append((n_in, _int(gen, 16, 33), (_int(gen, 1, 4), n_in), bool(_int(gen, 0, 2))))
    out = {"n_cases": np.array(len(cases)), "n_visible": np.array(1)}
    for i, (n_in, n_out, x_shape, dq) in enumerate(cases):
        out.update(_recompute_case(gen, n_in, n_out, x_shape, dq, "", i))
    out.update(_recompute_case(torch.Generator().manual_seed(0), 64, 128, (4, 64), True, "visible_", 0))
    return out


def recompute_expected(inputs: dict) -> dict[str, np.ndarray]:
    """y = x @ w_hat.T and the gradient reaching x, g @ w_hat (w_hat: qcore's NF4 round trip)."""
    out = {}
    for case in _cases(inputs):
        k = partial(_key, case)
        w = torch.from_numpy(inputs[k("w")])
        w_hat = dequantize_nf4(*quantize_nf4(w, 64, double_quant=bool(inputs[k("double_quant")])))
        out[k("y")] = _np(torch.from_numpy(inputs[k("x")]) @ w_hat.T)
        out[k("grad_x")] = _np(torch.from_numpy(inputs[k("g")]) @ w_hat)
    return out


def recompute_judge(v: Verdict, inputs, expected, answers) -> None:
    for case in _cases(inputs):
        k = partial(_key, case)
        w, x = inputs[k("w")], inputs[k("x")]
        what = f"{_case_name(case)} (in {w.shape[1]}, out {w.shape[0]}, x {tuple(x.shape)})"
        v.close(k("y"), expected[k("y")], f"{what}: outputs differ", rtol=1e-5, atol=1e-5)
        _flag(v, k("x_grad_none"), False, f"{what}: no gradient reaches the input")
        _grad_close(v, k("grad_x"), expected[k("grad_x")], f"{what}: the gradient reaching the input")
        saved = answers.get(k("saved_float_sizes"))
        v.true(k("saved_float_sizes"), saved is not None and saved.ndim == 1 and bool((saved < w.size).all()),
               f"{what}: a float tensor as large as the weight is kept for the backward pass")


HIDDEN_TESTS = [
    HiddenTest("ex1_lora_linear_tests", "lora", lora_inputs, lora_expected, lora_judge),
    HiddenTest("ex2_arithmetic_tests", "arithmetic", arithmetic_inputs, arithmetic_expected, arithmetic_judge),
    HiddenTest("ex3_nf4_tests", "nf4", nf4_inputs, nf4_expected, nf4_judge),
    HiddenTest("ex4_double_quant_tests", "double_quant", double_inputs, double_expected, double_judge),
    HiddenTest("ex5_nf4_vs_int4_tests", "int4", int4_inputs, int4_expected, int4_judge),
    HiddenTest("ex6_qlora_linear_tests", "qlora", qlora_inputs, qlora_expected, qlora_judge),
    HiddenTest("ex7_recompute_tests", "recompute", recompute_inputs, recompute_expected, recompute_judge),
]


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir``: each test's inputs for the lab's
    seed and the expected values on them."""
    write_hidden_references(out_dir, HIDDEN_TESTS, SEED)


if __name__ == "__main__":
    generator_main(make, LAB)
