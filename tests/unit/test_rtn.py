"""Round-to-nearest weight quantization (qcore.rtn) and the decoder-block plumbing of GPTQ/AWQ."""
import pytest
import torch

from qcore.layers import quantize_weight
from qcore.quant import PerChannel, PerGroup, choose_qparams, dequantize, quantize
from qcore.rtn import block_inputs, block_linears, decoder_layers, quantize_model_rtn, rtn_weight, run_block
from qcore.zoo.causal_lm import tiny_causal_lm

SETTINGS = [(3, None, True), (3, 64, True), (4, 32, False), (2, 64, False), (8, None, True)]


@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS)
def test_rtn_is_the_quant_chain(bits, group_size, symmetric):
    w = torch.randn(24, 128)
    gran = PerChannel(axis=0) if group_size is None else PerGroup(group_size)
    qp = choose_qparams(w, bits, symmetric, gran)
    assert torch.equal(rtn_weight(w, bits, group_size, symmetric), dequantize(quantize(w, qp), qp))


@pytest.mark.parametrize("bits,group_size,symmetric", SETTINGS)
def test_rtn_is_idempotent(bits, group_size, symmetric):
    # The extreme codes of every slice are used, so the second pass finds the same grid: the same
    # codes and zero-points; the scale, recomputed as (grid width) / (qmax - qmin) in float32, may
    # move by one rounding, so the values agree to that relative eps.
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(bits)) * torch.rand(24, 1) * 3
    once = rtn_weight(w, bits, group_size, symmetric)
    q1, qp1 = quantize_weight(w, bits, group_size, symmetric)
    q2, qp2 = quantize_weight(once, bits, group_size, symmetric)
    assert torch.equal(q1, q2) and torch.equal(qp1.zero_point, qp2.zero_point)
    eps = torch.finfo(torch.float32).eps
    assert torch.allclose(qp2.scale, qp1.scale, rtol=eps, atol=0)
    twice = rtn_weight(once, bits, group_size, symmetric)
    assert ((twice - once).abs() <= 2 * eps * once.abs()).all()   # scale's rounding + the product's


def test_quantize_weight_default_is_still_symmetric():
    w = torch.randn(4, 64)
    q, qp = quantize_weight(w, 4, 32)
    assert q.dtype == torch.int8 and qp.symmetric and torch.equal(qp.zero_point, torch.zeros_like(qp.zero_point))
    q, qp = quantize_weight(w, 4, 32, symmetric=False)
    assert q.dtype == torch.uint8 and not qp.symmetric


def test_quantize_model_rtn_touches_only_the_decoder_linears():
    model = tiny_causal_lm()
    before = {n: p.clone() for n, p in model.named_parameters()}
    q = quantize_model_rtn(model, bits=3, group_size=32)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())     # not in place
    linear_weights = {f"model.layers.{i}.{n}.weight" for i, b in enumerate(decoder_layers(model))
                      for n in block_linears(b)}
    assert len(linear_weights) == 14
    for name, p in q.named_parameters():
        if name in linear_weights:
            assert torch.equal(p, rtn_weight(before[name], 3, 32)), name
        else:
            assert torch.equal(p, before[name]), name        # norms, embeddings (= the tied lm_head)
    assert q.lm_head.weight is q.model.embed_tokens.weight


def test_block_inputs_and_run_block_reproduce_the_hidden_states():
    model = tiny_causal_lm()
    ids = torch.randint(0, 1000, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings, block 1, ...
    batches = block_inputs(model, ids, batch_size=2)
    assert [h.shape[0] for h, _ in batches] == [2, 2, 1]
    assert torch.equal(torch.cat([h for h, _ in batches]), hidden[0])
    batches = run_block(decoder_layers(model)[0], batches)
    assert torch.allclose(torch.cat([h for h, _ in batches]), hidden[1], atol=1e-6)
