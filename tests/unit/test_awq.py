"""AWQ (qcore.awq): alpha = 0 is RTN, folding the scales keeps the float model's function, the search.

Folding is exact in real arithmetic; in float32 it changes a few roundings. The per-layer tests bound
the difference from the exact (float64) unfolded output with the classical error bound of a dot
product, ``|fl(sum a_i b_i) - sum a_i b_i| <= gamma_k * sum |a_i b_i|`` with ``gamma_k = k u / (1 - k u)``
and ``u = 2**-24`` (float32's unit roundoff), ``k`` counting the roundings along the way.
"""
import copy

import pytest
import torch

from qcore.awq import awq_scales, fold_scales, quantize_model_awq, scaling_groups, search_scale
from qcore.gptq import Hessian, output_error
from qcore.rtn import block_linears, decoder_layers, quantize_model_rtn, rtn_weight
from qcore.zoo.causal_lm import tiny_causal_lm

U = torch.finfo(torch.float32).eps / 2


def gamma(k):
    return k * U / (1 - k * U)


def tiny_llama_without_gqa(seed=0):
    """As ``tiny_causal_lm`` but with as many key-value heads as heads, so v_proj -> o_proj is scaled too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def random_scales(n, seed):
    return torch.exp(torch.randn(n, generator=torch.Generator().manual_seed(seed)))   # e^-3 .. e^3


def test_awq_scales_are_normalised():
    act = torch.rand(96, generator=torch.Generator().manual_seed(0)) * 10 + 0.01
    for alpha in (0.0, 0.3, 0.95):
        s = awq_scales(act, alpha)
        assert abs((s.max() * s.min()).item() - 1) < 4 * U      # largest and smallest reciprocal
        assert torch.equal(torch.argsort(s), torch.argsort(act)) or alpha == 0
    assert torch.equal(awq_scales(act, 0.0), torch.ones(96))


@pytest.mark.parametrize("bits,group_size,symmetric", [(3, 32, True), (4, None, False)])
def test_alpha_zero_is_rtn_exactly(bits, group_size, symmetric):
    model = tiny_llama_without_gqa()
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(1))
    awq = quantize_model_awq(model, ids, bits, group_size, symmetric, n_grid=1, progress=False)
    rtn = quantize_model_rtn(model, bits, group_size, symmetric)
    for (name, p), q in zip(awq.named_parameters(), rtn.parameters()):
        assert torch.equal(p, q), name


def test_search_scale_errors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.05, 20, 64)   # a few loud channels
    W = torch.randn(16, 64, generator=g)
    h = Hessian(64)
    h.add_batch(x)
    s, alpha, errors = search_scale(W, x.abs().mean(0), h.H, bits=3, group_size=32, n_grid=20)
    assert len(errors) == 20 and 0 < alpha < 1
    assert errors[0] == output_error(W, rtn_weight(W, 3, 32), h.H)           # alpha = 0: RTN
    assert min(errors) == errors[round(alpha * 20)] < errors[0]
    direct = ((x.double() @ (W - rtn_weight(W * s, 3, 32) / s).double().T) ** 2).sum(1).mean().item()
    assert abs(min(errors) - direct) <= 1e-4 * direct                         # = the output MSE, summed over out


def test_fold_norm_into_linears_keeps_outputs_within_rounding():
    block = tiny_causal_lm().model.layers[0]
    exact = copy.deepcopy(block).double()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    for (norm, linears), (norm64, linears64) in zip(
            [(block.input_layernorm, [block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj]),
             (block.post_attention_layernorm, [block.mlp.gate_proj, block.mlp.up_proj])],
            [(exact.input_layernorm, [exact.self_attn.q_proj, exact.self_attn.k_proj, exact.self_attn.v_proj]),
             (exact.post_attention_layernorm, [exact.mlp.gate_proj, exact.mlp.up_proj])]):
        fold_scales(norm, linears, random_scales(64, 1))
        a64 = norm64(x.double())
        n = 64
        # mean of n squares and its rsqrt (<= n + 2), x * r, w / s, w' * a, W * s (4), the dot product (n)
        k = 2 * n + 8
        with torch.no_grad():
            for lin, lin64 in zip(linears, linears64):
                y = lin(norm(x)).double()
                bound = gamma(k) * (a64.abs() @ lin64.weight.abs().T)
                assert ((y - lin64(a64)).abs() <= bound).all()


def test_fold_up_into_down_keeps_outputs_within_rounding():
    mlp = tiny_causal_lm().model.layers[1].mlp
    exact = copy.deepcopy(mlp).double()
    a = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)) * 2
    with torch.no_grad():
        act_gate = mlp.act_fn(mlp.gate_proj(a))                       # the same float32 bits before and after
        fold_scales(mlp.up_proj, [mlp.down_proj], random_scales(128, 3))
        y = mlp(a).double()
        h64 = act_gate.double() * exact.up_proj(a.double())
        n, m = 64, 128
        # up: U / s (1) and its dot product (n); h = act * u (1); down: D * s (1) and its dot product (m)
        bound = gamma(n + m + 4) * ((act_gate.double().abs() * (a.double().abs() @ exact.up_proj.weight.abs().T))
                                    @ exact.down_proj.weight.abs().T)
        assert ((y - exact.down_proj(h64)).abs() <= bound).all()


@pytest.mark.parametrize("make", [tiny_causal_lm, tiny_llama_without_gqa])
def test_folding_every_group_leaves_the_float_model_unchanged(make):
    model = make()
    folded = copy.deepcopy(model)
    for i, block in enumerate(decoder_layers(folded)):
        for j, (previous, linears) in enumerate(scaling_groups(block)):
            fold_scales(previous, linears, random_scales(linears[0].in_features, 10 * i + j))
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = model(ids).logits, folded(ids).logits
    cfg = model.config
    # first order: each block's folded layers add at most (2 hidden + intermediate + 8) roundings,
    # relative to the size of the logits
    tol = cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.intermediate_size + 8) * U * before.abs().max()
    assert (after - before).abs().max() <= tol
    assert len(scaling_groups(decoder_layers(folded)[0])) == (3 if make is tiny_causal_lm else 4)


def test_quantize_model_awq_ends_on_the_rtn_grid():
    model = tiny_llama_without_gqa()
    ids = torch.randint(0, 1000, (6, 64), generator=torch.Generator().manual_seed(3))
    stats = []
    q = quantize_model_awq(model, ids, bits=3, group_size=32, n_grid=10, progress=False, stats=stats)
    eps = torch.finfo(torch.float32).eps
    for block in decoder_layers(q):
        for lin in block_linears(block).values():       # on a 3-bit grid: RTN again moves nothing
            assert ((rtn_weight(lin.weight, 3, 32) - lin.weight).abs() <= 2 * eps * lin.weight.abs()).all()
    assert len(stats) == 8
    assert all(0 <= s["alpha"] < 1 and s["awq"] <= s["rtn"] for s in stats)
    assert torch.equal(q.lm_head.weight, model.lm_head.weight)
    assert any(s["alpha"] > 0 for s in stats)
