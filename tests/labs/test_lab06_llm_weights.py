"""Lab 6 (RTN, GPTQ and AWQ on SmolLM2, by perplexity): the master's solution against oracles
(qcore.zoo.perplexity, qcore.rtn, qcore.gptq in float64, qcore.awq, a model folded with the
solution's scales), and the lab's spec: its exercises and the typical wrong solutions its test
cells must reject (test_lab_structure.py runs the structure tests and the mutants on it).

The graded cells never touch the model, so most tests run only the set-up, the imports and the
exercise cells (``Lab.setup_cells``). The whole notebook, with the grader's short settings (two
quantized blocks, 1,024 evaluation tokens), runs in the ``slow`` tests.

Across CPUs (docs/numerics-across-cpus.md): window spans, level counts, RTN weights, byte counts
and folded weights are exact; GPTQ is compared by its output error and by agreement (a float32
solution may round a few weights differently from the float64 reference); means, standard errors,
AWQ's scales (powers) and errors within tolerances.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness import REFERENCE, judge_on_seed, load_spec
from qcore.awq import awq_scales, scaling_groups, search_scale
from qcore.gptq import Hessian, gptq_quantize_weight, output_error
from qcore.rtn import rtn_weight
from qcore.zoo.causal_lm import tiny_causal_lm
from qcore.zoo.perplexity import _windows, block_mean

LAB = "lab06_llm_weights"

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- the solution against oracles
def test_windows_and_se_against_qcore(solved):
    windows, mean_and_se = solved.ns["windows"], solved.ns["mean_and_se"]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        window = int(torch.randint(2, 300, (1,), generator=g))
        n, stride = int(torch.randint(2, 2000, (1,), generator=g)), int(torch.randint(1, window + 1, (1,), generator=g))
        assert windows(n, window, stride) == _windows(n, window, stride), (n, window, stride)
    for blocks in (2, 3, 10, 50):
        counts = torch.randint(1, 100, (blocks,), generator=g)
        sums = torch.rand(blocks, generator=g, dtype=torch.float64) * counts * 4
        assert np.allclose(mean_and_se(sums, counts), block_mean(sums, counts), rtol=1e-12)


def test_rtn_is_qcore_bit_for_bit(solved):
    mine = solved.ns["rtn_weight"]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 96, generator=g)
    for bits in (2, 3, 4, 8):
        for group in (None, 16, 32, 96):
            for sym in (True, False):
                assert torch.equal(mine(w, bits, group, sym), rtn_weight(w, bits, group, sym)), (bits, group, sym)


def test_levels_detect_a_q4_1_grid(solved):
    """Weights built as Q4_1 blocks (float scale and offset per 32) have at most 16 levels a block."""
    levels = solved.ns["levels_per_group"]
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (6, 128), generator=g).float()
    d, m = torch.rand(6, 4, 1, generator=g) * 0.1, torch.randn(6, 4, 1, generator=g)
    w = (codes.reshape(6, 4, 32) * d + m).reshape(6, 128)
    assert int(levels(w, 32).max()) <= 16 and int(levels(w, 64).max()) > 16
    assert torch.equal(levels(w, 32), torch.tensor([[len(b.unique()) for b in row.reshape(4, 32)] for row in w]))


def _correlated_hessian(n_in: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g)
    x[:, :3] *= 10
    return 2 * x.T @ x / 512


@pytest.mark.parametrize("bits,group", [(3, None), (3, 32), (4, 16), (2, 64)])
def test_gptq_against_the_float64_reference_and_rtn(solved, bits, group):
    gptq_weight = solved.ns["gptq_weight"]
    H = _correlated_hessian(64, bits)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(9))
    mine = gptq_weight(W, H, bits, group, block_size=16)
    ref = gptq_quantize_weight(W.double(), H.double(), bits, group, lazy_block_size=16).weight
    agree = torch.isclose(mine, ref, rtol=1e-4, atol=1e-6).float().mean().item()
    err, err_ref, err_rtn = (output_error(W, x, H) for x in (mine, ref, rtn_weight(W, bits, group)))
    assert agree > 0.95 and err <= 1.01 * err_ref and err < err_rtn


def test_awq_search_is_qcore_and_alpha_zero_is_rtn(solved):
    awq_search, mine_scales = solved.ns["awq_search"], solved.ns["awq_scales"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 10, 64)
    h = Hessian(64)
    h.add_batch(x)
    W = torch.randn(16, 64, generator=g)
    act = x.abs().mean(0)
    s, alpha, errors = awq_search(W, act, h.H, 3, 32, n_grid=10)
    s_ref, alpha_ref, errors_ref = search_scale(W, act, h.H, 3, 32, True, 10)
    assert alpha == alpha_ref and torch.allclose(s, s_ref) and np.allclose(errors, errors_ref, rtol=1e-6)
    assert errors[0] == pytest.approx(output_error(W, rtn_weight(W, 3, 32), h.H), rel=1e-6)
    assert torch.equal(mine_scales(act, 0.0), torch.ones(64))
    assert torch.allclose(mine_scales(act, 0.7), awq_scales(act, 0.7))


def test_folding_leaves_a_llama_block_unchanged(solved):
    """Every scaling group of a real (tiny) Llama (grouped-query attention, and full multi-head
    attention where v_proj -> o_proj is folded too): the logits are the same after folding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fold_scales = solved.ns["fold_scales"]
    torch.manual_seed(0)
    mha = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4)).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(4))
    for model, n_groups in ((tiny_causal_lm(), 3), (mha, 4)):
        with torch.no_grad():
            before = model(input_ids=ids).logits
            for block in model.model.layers:
                groups = scaling_groups(block)
                assert len(groups) == n_groups
                for previous, linears in groups:
                    s = torch.rand(linears[0].in_features, generator=torch.Generator().manual_seed(5)) * 3 + 0.2
                    fold_scales(previous, linears, s)
            after = model(input_ids=ids).logits
        assert torch.allclose(after, before, rtol=1e-4, atol=1e-4)


def test_storage_of_smollm2(solved):
    storage_bytes = solved.ns["storage_bytes"]
    block = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    n = 30 * sum(o * i for o, i in block)
    assert n == 106_168_320
    # 4 bits + a 16-bit scale per 64 weights = 4.25 bits per weight
    assert storage_bytes(block * 30, 4, 64, True, 0) == n * 4.25 / 8
    assert storage_bytes(block * 30, 4, 32, False, 0) == n * (4 + 20 / 32) / 8   # Q4_1-like: 4.625 bits


def test_paired_difference_against_qcore(solved):
    from qcore.zoo.perplexity import Perplexity, paired_nll_difference

    paired = solved.ns["paired_difference"]
    g = torch.Generator().manual_seed(6)
    a = torch.rand(100, generator=g, dtype=torch.float64) * 5
    b = a + torch.randn(100, generator=g, dtype=torch.float64) * 0.1
    sizes = (10, 30, 20, 25, 15)
    pa, pb = (Perplexity(0.0, float(t.mean()), 0.0, 100, t, sizes, "x") for t in (a, b))
    ref = paired_nll_difference(pa, pb)
    assert np.allclose(paired(a, b, sizes), (ref.diff, ref.se), rtol=1e-12)


@pytest.mark.slow
def test_whole_notebook_under_the_grader(lab):
    """Quiet, and the table has its rows (the grader's short run: two blocks, RTN/GPTQ/AWQ at 3 bits)."""
    run = lab.whole
    assert run.stderr.getvalue() == ""
    out = run.stdout.getvalue()
    assert out.count("all visible checks passed") == len(SPEC.exercises)
    results = run.ns["results"]
    assert list(results) == [("FP32", 32, None), ("RTN", 3, 64), ("RTN", 4, 64), ("RTN", 4, None),
                             ("GPTQ", 3, 64), ("AWQ", 3, 64)]
    assert "100.0% of groups on an evenly spaced grid" in out           # the Q4_1 forensics
    fp32 = results[("FP32", 32, None)]
    assert fp32["token_nll"].numel() == 1023 and np.isfinite(fp32["se"])


# ----------------------------------------------------------------------------- other students' inputs
@pytest.mark.parametrize("seed", [1, 2**40 + 7, 2**62 + 11])
def test_solution_passes_on_other_submissions_inputs(lab, seed):
    """The grader asks each submission its own inputs (``qcourse.judge``): every seed must give
    valid cases that the solution passes."""
    judge_on_seed(lab, seed)


# ----------------------------------------------------------------------------- references
def test_references_cover_the_edge_cases():
    with np.load(REFERENCE / LAB / "perplexity.npz") as r:
        specs = [tuple(r[f"spec{i}"]) for i in range(int(r["n_windows"]))]
        assert (2, 2, 1) in specs and any(s[2] > s[1] for s in specs) and any(s[0] < 2 for s in specs)
        assert any(s[1] == s[2] for s in specs) and np.isnan(r["se0"])      # stride = window; one block
    with np.load(REFERENCE / LAB / "gptq.npz") as r:
        n = int(r["n_cases"])
        assert any((np.diag(r[f"H{i}"]) == 0).any() for i in range(n))      # a dead input
        groups, blocks = ([int(r[f"{k}{i}"]) for i in range(n)] for k in ("group", "block"))
        assert any(g and b % g for g, b in zip(groups, blocks))             # a group runs across lazy blocks
        assert all(float(r[f"error{i}"]) < float(r[f"rtn_error{i}"]) for i in range(n))
    with np.load(REFERENCE / LAB / "awq.npz") as r:
        n = int(r["n_cases"])
        assert all(0 < float(r[f"alpha{i}"]) for i in range(n))            # the search matters
        assert any((r[f"act{i}"] == 0).any() for i in range(n))             # a dead channel


SPEC = load_spec(LAB)  # specs/lab06_llm_weights.yaml: the exercises, their templates and mutants
