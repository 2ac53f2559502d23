"""Lab 5 (LoRA and QLoRA): the master's solution against oracles (peft, bitsandbytes, qcore.lora,
qcore.nf4, adapters really added to Llama models), and the lab's spec: its exercises and the typical
wrong solutions its test cells must reject (test_lab_structure.py runs the structure tests and the
mutants on it).

The graded cells never touch the model, so most tests run only the set-up, the imports and the
exercise cells (seconds; ``Lab.setup_cells``). The whole notebook, with SmolLM2 and training
shortened as under the grader, runs in the ``slow`` tests.

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

from harness import REFERENCE, Exercise, Lab, patched
from qcore import lora
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


@pytest.mark.slow
def test_whole_notebook_under_the_grader(lab):
    """Quiet, and the experiment's rows are all there (with the grader's tiny subsets); its time is
    bench/bench_labs.py's."""
    run = lab.whole
    assert run.stderr.getvalue() == ""
    out = run.stdout.getvalue()
    assert out.count("all visible checks passed") == len(SPEC.exercises)
    results = run.ns["results"]
    assert list(results) == ["zero-shot (no training)", "LoRA r=8", "QLoRA r=8, qcore NF4"]
    lora_row, qlora_row = results["LoRA r=8"], results["QLoRA r=8, qcore NF4"]
    assert lora_row["trainable"] == qlora_row["trainable"] == 2_442_240
    assert qlora_row["weights_mb"] < 0.45 * lora_row["weights_mb"]  # NF4 linear layers, FP32 embedding
    assert "max |y - peft| = 0.00e+00" in out or "max |y - peft| = " in out
    assert "LoRA merged into FP32" in out and "QLoRA merged into FP32" in out


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
# The solution templates; each mutant is a typical wrong solution, plausible (it runs on the smoke
# input) and rejected by the exercise's test cell and by the hidden part of that cell alone.
LORA = """
class LoRALinear(nn.Module):
    def __init__(self, base, r=8, alpha=16, dropout=0.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        {patch_freeze}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        {patch_a}
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        {patch_b}
        self.scaling = alpha / r
        {patch_scaling}
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def delta(self):
        d = self.scaling * (self.lora_B @ self.lora_A)
        {patch_delta}
        return d

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        out = y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        {patch_forward}
        return out

    def merge(self):
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.delta()
            self.merged = True
        {patch_merge}

    def unmerge(self):
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.delta()
            self.merged = False
"""
ARITH = """
def lora_trainable_parameters(config, r, target_modules):
    d, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    {patch_kv}
    shapes = {{"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
              "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}}
    per = lambda o, i: r * (o + i)
    {patch_per}
    n = sum(per(o, i) for name, (o, i) in shapes.items() if name in target_modules)
    {patch_layers}
    return n * config.num_hidden_layers


def training_memory(n_frozen, n_trainable, frozen_bits, trainable_bits=32):
    out = {{"weights": n_frozen * frozen_bits / 8 + n_trainable * trainable_bits / 8,
           "gradients": n_trainable * trainable_bits / 8, "optimizer": 8.0 * n_trainable}}
    {patch_mem}
    return out
"""
NF4 = """
def nf4_codebook_from_quantiles():
    pos = torch.special.ndtri(torch.linspace(0.9677083, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(0.9677083, 0.5, 8)[:-1].double())
    v = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    out = (v / v.max()).float()
    {patch_cb}
    return out


def nf4_quantize_blockwise(w, block_size=64):
    blocks = w.detach().reshape(-1, block_size).float()
    absmax = blocks.abs().amax(dim=1)
    {patch_absmax}
    normalized = blocks / absmax.clamp(min=1e-38).unsqueeze(1)
    {patch_norm}
    cb = nf4_codebook_from_quantiles()
    codes = (normalized.unsqueeze(-1) - cb).abs().argmin(dim=-1)
    {patch_codes}
    return codes.reshape(-1).to(torch.uint8), absmax


def nf4_dequantize_blockwise(codes, absmax, block_size, shape):
    values = nf4_codebook_from_quantiles()[codes.long()].reshape(-1, block_size)
    out = values * absmax.reshape(-1, 1)
    {patch_deq}
    return out.reshape(shape)
"""
DQ = """
def double_quantize(absmax, group_size=256):
    absmax = absmax.float()
    offset = absmax.mean()
    {patch_offset}
    n = absmax.numel()
    c = F.pad(absmax - offset, (0, (-n) % group_size)).reshape(-1, group_size)
    {patch_group}
    scale = (c.abs().amax(dim=1) / 127).clamp(min=EPS)
    {patch_scale}
    codes = torch.round(c / scale.unsqueeze(1)).clamp(-127, 127)
    {patch_codes}
    return codes.reshape(-1)[:n].to(torch.int8), scale, offset


def double_dequantize(codes, scale, offset, group_size=256):
    n = codes.numel()
    p = F.pad(codes.float(), (0, (-n) % group_size)).reshape(-1, group_size)
    out = (p * scale.reshape(-1, 1)).reshape(-1)[:n] + offset
    {patch_deq}
    return out.clamp(min=0.0)


def nf4_bits_per_param(block_size=64, double_quant=True):
    bits = 4 + 8 / block_size + 32 / (block_size * 256) if double_quant else 4 + 32 / block_size
    {patch_bits}
    return bits
"""
INT4 = """
def int4_blockwise(w, block_size=64):
    blocks = w.detach().reshape(-1, block_size).float()
    scale = (blocks.abs().amax(dim=1, keepdim=True) / 7).clamp(min=EPS)
    {patch_scale}
    q = torch.round(blocks / scale).clamp(-7, 7)
    {patch_q}
    return (q * scale).reshape(w.shape)


def sqnr(w, w_hat):
    noise = ((w.double() - w_hat.double()) ** 2).sum().item()
    signal = (w.double() ** 2).sum().item()
    out = math.inf if noise == 0 else 10 * math.log10(signal / noise)
    {patch_sqnr}
    return out
"""
QLORA = """
class QLoRALinear(nn.Module):
    def __init__(self, base, r=8, alpha=16, block_size=64):
        super().__init__()
        packed, self.state = quantize_nf4(base.weight.detach(), block_size, double_quant=True)
        {patch_quant}
        self.register_buffer("packed", packed)
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        {patch_keep}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        {patch_b}
        self.scaling = alpha / r
        {patch_scaling}

    def weight(self):
        w = dequantize_nf4(self.packed, self.state)
        {patch_weight}
        return w

    def forward(self, x):
        y = F.linear(x, self.weight(), self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling
        {patch_forward}
        return y
"""


SPEC = Lab(
    name=LAB,
    setup_cells=(1,),  # the imports; the set-up cell is locked
    one_thread=True,
    seconds=420,  # the whole notebook under the grader, on a shared 2-core CPU (about a minute when quiet)
    student_printouts=("complete Exercise 1 to compare", "complete Exercise 2 to see"),
    release_forbids=("_ref[",),
    given_lines=("with torch.no_grad():",),
    exercises=(
        Exercise("ex1_lora_linear", points=3, functions=("__init__", "forward", "merge", "unmerge"), template=LORA,
                 smoke="LoRALinear(nn.Linear(4, 4), r=2)(torch.randn(2, 4))", mutants={
            "B initialised non-zero": {"patch_b": "nn.init.normal_(self.lora_B, std=0.02)"},
            "A and B both zero": {"patch_a": "nn.init.zeros_(self.lora_A)"},
            "A standard normal (not Kaiming-uniform)": {"patch_a": "nn.init.normal_(self.lora_A)"},
            "scaling r / alpha": {"patch_scaling": "self.scaling = r / alpha"},
            "scaling forgotten": {"patch_scaling": "self.scaling = 1.0"},
            "base left trainable": {"patch_freeze": "base.requires_grad_(True)"},
            "bias left trainable": {
                "patch_freeze": "base.bias.requires_grad_(True) if base.bias is not None else None"},
            "adapter on the wrong side of the transpose (forward)": {
                "patch_forward": "out = y + (self.dropout(x) @ (self.lora_B @ self.lora_A)) * self.scaling"},
            "adapter on the wrong side of the transpose (merge)": {"patch_delta": "d = d.T"},
            "dropout on the whole output": {
                "patch_forward": "out = self.dropout(y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling)"},
            "adapter added again after merging": {"        if self.merged:\n            return y\n": ""},
            "merging twice adds the update twice": {"patch_merge": "self.merged = False"},
            "merge forgets the scaling": {
                "patch_delta": "d = self.lora_B @ self.lora_A if not hasattr(self, '_x') else d"},
            "delegates to qcore.lora": "from qcore.lora import LoRALinear\n",
        }),
        Exercise("ex2_arithmetic", points=2, functions=("lora_trainable_parameters", "training_memory"),
                 template=ARITH,
                 smoke="from types import SimpleNamespace; "
                       "lora_trainable_parameters(SimpleNamespace(hidden_size=8, intermediate_size=16, "
                       "num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_hidden_layers=2), 2, "
                       "['q_proj']); training_memory(10, 2, 16)", mutants={
            "k and v with all attention heads (no GQA)": {"patch_kv": "kv = q"},
            "full matrices r * in * out": {"patch_per": "per = lambda o, i: r * o * i"},
            "one block only": {"patch_layers": "return n"},
            "head_dim ignored (d / heads)": {
                "patch_kv": "q, kv = d, config.num_key_value_heads * (d // config.num_attention_heads)"},
            "gradients for the frozen weights too": {
                "patch_mem": "out['gradients'] = (n_frozen + n_trainable) * trainable_bits / 8"},
            "Adam with one state": {"patch_mem": "out['optimizer'] = 4.0 * n_trainable"},
            "Adam states in the trainable dtype": {
                "patch_mem": "out['optimizer'] = 2 * n_trainable * trainable_bits / 8"},
            "bits taken for bytes": {
                "patch_mem": "out['weights'] = n_frozen * frozen_bits + n_trainable * trainable_bits"},
            "trainable weights not counted": {"patch_mem": "out['weights'] = n_frozen * frozen_bits / 8"},
        }),
        Exercise("ex3_nf4", points=3,
                 functions=("nf4_codebook_from_quantiles", "nf4_quantize_blockwise", "nf4_dequantize_blockwise"),
                 template=NF4, smoke="nf4_dequantize_blockwise(*nf4_quantize_blockwise(torch.randn(128)), 64, (128,))",
                 mutants={
            "codebook not normalised to [-1, 1]": {"patch_cb": "out = v.float()"},
            "16 symmetric quantiles, no exact zero": {
                "patch_cb": "q = torch.special.ndtri(torch.linspace(1 - 0.9677083, 0.9677083, 16).double()); "
                            "out = (q / q.max()).float()"},
            "absmax per tensor instead of per block": {
                "patch_absmax": "absmax = blocks.abs().amax().expand(blocks.shape[0]).clone()"},
            "no guard for an all-zero block (NaN)": {"patch_norm": "normalized = blocks / absmax.unsqueeze(1)"},
            "upper neighbour instead of nearest": {
                "patch_codes": "codes = torch.searchsorted(cb, normalized.contiguous()).clamp(max=15)"},
            "blocks along the columns": {
                "patch_absmax": "blocks = w.detach().reshape(block_size, -1).T.float(); "
                                "absmax = blocks.abs().amax(dim=1)"},
            "dequantize with the first block's absmax": {"patch_deq": "out = values * absmax[0]"},
            "delegates to qcore.nf4": """
from qcore.nf4 import nf4_codebook as nf4_codebook_from_quantiles
def nf4_quantize_blockwise(w, block_size=64):
    from qcore.packing import unpack_int4
    packed, st = quantize_nf4(w, block_size)
    return unpack_int4(packed, (w.numel(),)).to(torch.uint8), st.absmax
""",
        }),
        Exercise("ex4_double_quant", points=2, functions=("double_quantize", "double_dequantize", "nf4_bits_per_param"),
                 template=DQ, smoke="double_dequantize(*double_quantize(torch.rand(300))); nf4_bits_per_param()",
                 mutants={
            "no offset (mean not subtracted)": {"patch_offset": "offset = torch.zeros(())"},
            "one scale for all groups": {
                "patch_group": "c = (absmax - offset).reshape(1, -1); n = c.numel(); group_size = n"},
            "scale = max / 128": {"patch_scale": "scale = (c.abs().amax(dim=1) / 128).clamp(min=EPS)"},
            "truncation instead of rounding": {"patch_codes": "codes = (c / scale.unsqueeze(1)).trunc()"},
            "dequantize forgets the offset": {"patch_deq": "out = out - offset"},
            "bits: second-level scale forgotten": {"patch_bits": "bits = 4 + 8 / block_size if double_quant else bits"},
            "bits: 4.5 always": {"patch_bits": "bits = 4 + 32 / block_size"},
            "delegates to qcore.nf4": """
from qcore.nf4 import _quantize_absmax, _dequantize_absmax, bits_per_param
def double_quantize(absmax, group_size=256):
    return _quantize_absmax(absmax)
def double_dequantize(codes, scale, offset, group_size=256):
    return _dequantize_absmax(codes, scale, offset)
def nf4_bits_per_param(block_size=64, double_quant=True):
    return bits_per_param(quantize_nf4(torch.zeros(block_size), block_size, double_quant)[1])
""",
        }),
        Exercise("ex5_nf4_vs_int4", points=2, functions=("int4_blockwise", "sqnr"), template=INT4,
                 smoke="sqnr(torch.randn(64), int4_blockwise(torch.randn(64)))", mutants={
            "absmax per tensor": {"patch_scale": "scale = (blocks.abs().amax() / 7).clamp(min=EPS)"},
            "qmax = 8": {"patch_scale": "scale = (blocks.abs().amax(dim=1, keepdim=True) / 8).clamp(min=EPS)"},
            "round half up": {"patch_q": "q = torch.floor(blocks / scale + 0.5).clamp(-7, 7)"},
            "no EPS (NaN on zero blocks)": {"patch_scale": "scale = blocks.abs().amax(dim=1, keepdim=True) / 7"},
            "SQNR with 20 log10": {"patch_sqnr": "out = out * 2"},
            "SQNR inverted": {"patch_sqnr": "out = -out"},
            "delegates to qcore.quant": patched(INT4).split("\n\n\n")[1] + """
from qcore.quant import fake_quantize, choose_qparams, PerGroup
def int4_blockwise(w, block_size=64):
    b = w.reshape(-1, block_size)
    return fake_quantize(b, choose_qparams(b, 4, True, PerGroup(block_size))).reshape(w.shape)
""",
        }),
        Exercise("ex6_qlora_linear", points=3, functions=("__init__", "forward"), template=QLORA,
                 smoke="QLoRALinear(nn.Linear(64, 4), r=2)(torch.randn(2, 64))", mutants={
            "keeps and uses the float base (no quantization)": {
                "patch_keep": "self.base = base", "patch_weight": "w = self.base.weight"},
            "dequantized weight kept as a trainable parameter": {
                "patch_keep": "self.w = nn.Parameter(dequantize_nf4(packed, self.state))",
                "patch_weight": "w = self.w"},
            "B initialised non-zero": {"patch_b": "nn.init.normal_(self.lora_B, std=0.02)"},
            "scaling r / alpha": {"patch_scaling": "self.scaling = r / alpha"},
            "no double quantization": {
                "patch_quant": "packed, self.state = quantize_nf4(base.weight.detach(), block_size)"},
            "input detached (no gradient to earlier layers)": {
                "patch_forward": "y = F.linear(x.detach(), self.weight(), self.bias) + "
                                 "(x @ self.lora_A.T @ self.lora_B.T) * self.scaling"},
            "bias forgotten": {
                "patch_forward": "y = F.linear(x, self.weight()) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling"},
            "delegates to qcore.lora": """
from qcore import lora as _lora
class QLoRALinear(_lora.QLoRALinear):
    def __init__(self, base, r=8, alpha=16, block_size=64):
        super().__init__(base, r, alpha, block_size=block_size)
        self.packed, self.state = self.base.packed, self.base.state
""",
        }),
    ),
)
