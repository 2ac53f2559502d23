"""Lab 5 (LoRA and QLoRA): the master's solution against oracles (peft, bitsandbytes, qcore.lora,
qcore.nf4, adapters really added to Llama models), and the lab's spec: its exercises and the typical
wrong solutions its test cells must reject (test_lab_structure.py runs the structure tests and the
mutants on it).

The graded cells never touch the model, so most tests run only the set-up, the imports and the
exercise cells (seconds; ``Lab.setup_cells``). The whole notebook, with SmolLM2 and training
shortened as under the grader, runs in the ``slow`` tests. The hidden tests ask inside the kernel
and are judged outside it (course/refgen/lab05_lora_qlora.py): the solution passes on the committed
inputs (test_lab_structure.py) and on other submissions' inputs (here).

Across CPUs (docs/numerics-across-cpus.md): parameter counts, NF4 codes (inputs kept 2e-5 from the
decision midpoints), absmax and double-quantization codes (kept 1e-3 of a step from ties) are exact;
the codebook (normal quantiles), dequantized values, the mean offset, layer outputs, merged weights
and SQNR within tolerances.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from harness import REFERENCE, judge_on_seed, load_spec
from qcore import lora
from qcore.layers import NF4Linear
from qcore.nf4 import _quantize_absmax, bits_per_param, dequantize_nf4, nf4_codebook, quantize_nf4
from qcore.packing import unpack_int4
from qcore.quant import PerGroup, choose_qparams, fake_quantize, sqnr_db

LAB = "lab05_lora_qlora"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; peft, bnb, bnbf: fixtures there too


# ----------------------------------------------------------------------------- the solution against oracles
def test_lora_linear_equals_peft_and_qcore(solved, peft):
    LoRALinear = solved.ns["LoRALinear"]
    torch.manual_seed(0)
    probe = nn.Sequential()
    probe.add_module("q_proj", nn.Linear(48, 20))
    mine = LoRALinear(copy.deepcopy(probe.q_proj), r=4, alpha=12)
    ours = lora.LoRALinear(copy.deepcopy(probe.q_proj), r=4, alpha=12)
    theirs = peft.get_peft_model(copy.deepcopy(probe), peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj"]))
    peft_layer = theirs.base_model.model.q_proj
    b = torch.randn(20, 4) * 0.1
    with torch.no_grad():
        for m in (mine, ours):
            m.lora_A.copy_(peft_layer.lora_A["default"].weight)
            m.lora_B.copy_(b)
        peft_layer.lora_B["default"].weight.copy_(b)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        want = theirs(x)
        assert torch.allclose(mine(x), want, rtol=1e-5, atol=1e-6) and torch.allclose(ours(x), want, atol=1e-6)
        mine.merge()
        merged = theirs.merge_and_unload()
    assert torch.allclose(mine.base.weight, merged.q_proj.weight, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ours.merged_linear().weight, merged.q_proj.weight, rtol=1e-6, atol=1e-6)
    assert sum(p.numel() for p in mine.parameters() if p.requires_grad) == 4 * (48 + 20)


def test_arithmetic_against_adapters_added_to_real_configs(solved):
    from transformers import LlamaConfig, LlamaForCausalLM

    count, memory = solved.ns["lora_trainable_parameters"], solved.ns["training_memory"]
    for hidden, inter, heads, kv, hd, layers, r, targets in (
            (576, 1536, 9, 3, 64, 30, 8, lora.LLAMA_LINEARS), (128, 320, 4, 1, 48, 2, 3, ("k_proj", "gate_proj")),
            (96, 200, 6, 6, 16, 3, 5, ("o_proj", "v_proj", "down_proj"))):
        cfg = LlamaConfig(vocab_size=16, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                          num_key_value_heads=kv, head_dim=hd, num_hidden_layers=layers)
        with torch.device("meta"):
            model = lora.add_lora(LlamaForCausalLM(cfg), targets, r=r)
        assert count(cfg, r, targets) == lora.count_parameters(model)[0]
    # The SmolLM2 numbers the notebook prints: 2.44M trainable (1.82%), full FT 2.15 GB.
    smol = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                           head_dim=64, num_hidden_layers=30)
    assert count(smol, 8, lora.LLAMA_LINEARS) == 2_442_240
    full = memory(0, 134_515_008, 32)
    assert sum(full.values()) == 16 * 134_515_008


def test_nf4_against_bitsandbytes_and_qcore(solved, bnbf):
    ns = solved.ns
    cb = ns["nf4_codebook_from_quantiles"]()
    assert torch.allclose(cb, bnbf.get_4bit_type("nf4", device="cpu"), rtol=0, atol=1e-6)
    assert torch.allclose(cb, nf4_codebook(), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    for shape, bs in (((64, 64), 64), ((32, 256), 128), ((8, 96), 32)):
        w = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[0]).unsqueeze(1)
        codes, absmax = ns["nf4_quantize_blockwise"](w, bs)
        packed, state = bnbf.quantize_4bit(w, blocksize=bs, quant_type="nf4")
        bnb_codes = unpack_int4(packed.reshape(-1), (w.numel(),))
        # Dividing by absmax instead of multiplying by its reciprocal may flip a value that lies
        # within one ulp of a decision boundary: allow a handful, and check they are such values.
        differ = (codes.long() != bnb_codes.long()).nonzero().flatten()
        assert differ.numel() <= 3
        assert torch.equal(absmax, state.absmax)
        w_hat = ns["nf4_dequantize_blockwise"](codes, absmax, bs, w.shape)
        want = bnbf.dequantize_4bit(packed, state)
        close = torch.isclose(w_hat, want, rtol=1e-6, atol=0)
        assert int((~close).sum()) == differ.numel()
        assert torch.allclose(w_hat, dequantize_nf4(*quantize_nf4(w, bs)), rtol=1e-6, atol=0) or differ.numel()


def test_double_quant_and_int4_against_qcore(solved):
    ns = solved.ns
    g = torch.Generator().manual_seed(1)
    for n in (1, 255, 256, 700):
        absmax = torch.rand(n, generator=g) * 3
        codes, scale, offset = ns["double_quantize"](absmax)
        want_c, want_s, want_o = _quantize_absmax(absmax)
        assert torch.equal(codes, want_c) and torch.allclose(scale, want_s) and torch.allclose(offset, want_o)
        _, state = quantize_nf4(torch.randn(n * 64, generator=g), 64, double_quant=True)
        rebuilt = ns["double_dequantize"](state.absmax_codes, state.absmax_scale, state.absmax_offset)
        assert torch.allclose(rebuilt, state.block_absmax(), rtol=1e-6, atol=1e-7)
    for bs in (32, 64, 128, 256, 4096):
        for dq in (True, False):
            st = quantize_nf4(torch.randn(4096), bs, dq)[1]
            assert math.isclose(ns["nf4_bits_per_param"](bs, dq), bits_per_param(st))
    for shape, bs in (((16, 128), 64), ((4, 4096), 128)):
        w = torch.randn(*shape, generator=g)
        w_hat = ns["int4_blockwise"](w, bs)
        assert torch.allclose(w_hat, fake_quantize(w, choose_qparams(w, 4, True, PerGroup(bs))), rtol=1e-6, atol=1e-7)
        assert math.isclose(ns["sqnr"](w, w_hat), sqnr_db(w, w_hat), rel_tol=1e-9)


def test_qlora_linear_against_qcore_and_bitsandbytes(solved, bnb):
    QLoRALinear = solved.ns["QLoRALinear"]
    torch.manual_seed(0)
    lin = nn.Linear(256, 16)
    mine = QLoRALinear(lin, r=4, alpha=8)
    ours = lora.QLoRALinear(lin, r=4, alpha=8)
    with torch.no_grad():
        b = torch.randn(16, 4) * 0.1
        ours.lora_A.copy_(mine.lora_A)
        for m in (mine, ours):
            m.lora_B.copy_(b)
    x = torch.randn(3, 256)
    assert torch.allclose(mine(x), ours(x), rtol=1e-5, atol=1e-6)
    # bitsandbytes' Linear4bit with double quantization: the same codes, a slightly different absmax
    q = bnb.nn.Linear4bit(256, 16, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                 compress_statistics=True)
    q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    q = q.to("cpu")
    with torch.no_grad():
        adapter = 2.0 * (x @ mine.lora_A.T) @ mine.lora_B.T
        assert torch.allclose(mine(x), q(x) + adapter, rtol=0, atol=0.02 * q(x).abs().max().item())
        assert torch.equal(unpack_int4(mine.packed, (256 * 16,)),
                           unpack_int4(q.weight.data.reshape(-1), (256 * 16,)))


def _saved_float_numels(fn) -> list[int]:
    """Sizes of the float tensors autograd saves for the backward while ``fn()`` runs."""
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t
                                                  if t.is_floating_point() else t, lambda t: t):
        fn()
    return sizes


def test_recompute_against_qcore_nf4_linear_and_plain_autograd(solved):
    """Exercise 7: outputs and input gradients equal qcore's NF4Linear (which recomputes too); plain
    autograd of the same product keeps the [out, in] weight, the solution keeps no float tensor."""
    nf4_matmul = solved.ns["nf4_matmul"]
    torch.manual_seed(0)
    lin = nn.Linear(192, 40, bias=False)
    ours = NF4Linear.from_linear(lin, 64, double_quant=True)
    packed, state = ours.packed, ours.state
    x = torch.randn(2, 5, 192)
    g = torch.randn(2, 5, 40)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = nf4_matmul(x1, packed, state), ours(x2)
    assert torch.allclose(y1, y2, rtol=1e-6, atol=1e-6)
    y1.backward(g), y2.backward(g)
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    w_hat = ours.weight_hat()
    assert 40 * 192 in _saved_float_numels(lambda: x.clone().requires_grad_() @ w_hat.T)  # autograd keeps it
    assert _saved_float_numels(lambda: nf4_matmul(x.clone().requires_grad_(), packed, state)) == []


@pytest.mark.slow
def test_whole_notebook_under_the_grader(lab):
    """Quiet, and the experiment's rows are all there (with the grader's tiny subsets); its time is
    bench/bench_labs.py's."""
    run = lab.whole
    assert run.stderr.getvalue() == ""
    out = run.stdout.getvalue()
    assert out.count("all visible checks passed") == len(SPEC.exercises)
    results = run.ns["results"]
    assert list(results) == ["zero-shot (no training)", "LoRA r=8", "zero-shot, NF4 base (no training)",
                             "QLoRA r=8, qcore NF4"]
    assert all(results[name]["correct"] is not None for name in results)  # kept per sentence, for the paired tests
    assert "memory in fresh processes: skipped under the grader" in out
    lora_row, qlora_row = results["LoRA r=8"], results["QLoRA r=8, qcore NF4"]
    assert lora_row["trainable"] == qlora_row["trainable"] == 2_442_240
    assert qlora_row["weights_mb"] < 0.45 * lora_row["weights_mb"]  # NF4 linear layers, FP32 embedding
    assert "max |y - peft| = 0.00e+00" in out or "max |y - peft| = " in out
    assert "LoRA merged into FP32" in out and "QLoRA merged into FP32" in out


# ----------------------------------------------------------------------------- other students' inputs
@pytest.mark.parametrize("seed", [1, 2**40 + 7, 2**62 + 11])
def test_solution_passes_on_other_submissions_inputs(lab, seed):
    """The grader asks each submission its own inputs (``qcourse.judge``): every seed must give
    valid cases (away from rounding ties and NF4's decision boundaries) that the solution passes."""
    judge_on_seed(lab, seed)


# ----------------------------------------------------------------------------- references
def test_references_cover_the_edge_cases():
    with np.load(REFERENCE / LAB / "lora.npz") as r:
        n = int(r["n_cases"])
        assert any(r[f"w{i}"].shape[0] == r[f"w{i}"].shape[1] == int(r[f"r{i}"]) for i in range(n))  # square, r = in
        assert any(float(r[f"alpha{i}"]) != int(r[f"r{i}"]) for i in range(n)) and any(not r[f"has_bias{i}"]
                                                                                      for i in range(n))
    with np.load(REFERENCE / LAB / "nf4.npz") as r:
        n = int(r["n_cases"])
        assert any((r[f"absmax{i}"] == 0).any() for i in range(n))  # an all-zero block
        spread = [r[f"absmax{i}"][r[f"absmax{i}"] > 0] for i in range(n)]
        assert any(s.max() / s.min() > 1000 for s in spread)  # per-tensor absmax would crush blocks
        assert {int(r[f"block{i}"]) for i in range(n)} >= {32, 64, 128, 256}
    with np.load(REFERENCE / LAB / "double_quant.npz") as r:
        sizes = [r[f"absmax{i}"].size for i in range(int(r["n_cases"]))]
        assert any(s % 256 for s in sizes) and any(s > 512 for s in sizes)
    with np.load(REFERENCE / LAB / "arithmetic.npz") as r:
        cfgs = [r[f"config{i}"] for i in range(int(r["n_cases"]))]
        assert any(c[2] != c[3] for c in cfgs) and any(c[4] * c[2] != c[0] for c in cfgs)  # GQA, head_dim set


# ----------------------------------------------------------------------------- the spec
SPEC = load_spec(LAB)  # specs/lab05_lora_qlora.yaml: the exercises, their templates and mutants
