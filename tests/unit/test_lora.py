"""Tests of qcore.lora: peft and bitsandbytes as oracles, plus the properties the labs rely on.

With the same A and B, qcore's adapters and peft's give the same outputs, the same merged weights
and the same parameter counts; NF4Linear gives bitsandbytes' Linear4bit outputs (exactly with plain
absmax, within the double-quantization difference otherwise); gradients reach only the adapters;
the NF4 weight is not kept alive for the backward pass.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcore import lora
from qcore.nf4 import dequantize_nf4, quantize_nf4
from qcore.zoo.causal_lm import tiny_causal_lm

TARGETS = ["q_proj", "v_proj", "down_proj"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; peft, bnb: fixtures there too


def _peft_layers(model) -> dict:
    return {n.replace("base_model.model.", ""): m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}


def _copy_adapters(ours: nn.Module, theirs: dict, gen: torch.Generator) -> None:
    """Give both models the same A (peft's) and the same random, non-zero B."""
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, lora.LoRALinear):
                peft_layer = theirs[name]
                b = torch.randn(layer.lora_B.shape, generator=gen) * 0.05
                layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
                layer.lora_B.copy_(b)
                peft_layer.lora_B["default"].weight.copy_(b)


# ----------------------------------------------------------------------------- LoRA vs peft
def test_lora_model_equals_peft(peft):
    base = tiny_causal_lm(seed=1)
    ours = lora.add_lora(copy.deepcopy(base), TARGETS, r=4, alpha=8)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    _copy_adapters(ours, _peft_layers(theirs), torch.Generator().manual_seed(0))
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
    assert lora.count_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())
    # Merged weights: merge_lora against peft's merge_and_unload.
    merged_ours = lora.merge_lora(ours)
    merged_theirs = theirs.merge_and_unload()
    want = dict(merged_theirs.named_parameters())
    for name, p in merged_ours.named_parameters():
        assert torch.allclose(p, want[name], rtol=1e-6, atol=1e-7), name
    assert not any(isinstance(m, lora.LoRALinear) for m in merged_ours.modules())


def test_lora_with_dropout_and_rank_one_equals_peft(peft):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("q_proj", nn.Linear(12, 12))
    ours = lora.add_lora(copy.deepcopy(base), ["q_proj"], r=1, alpha=3, dropout=0.3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=1, lora_alpha=3, lora_dropout=0.3,
                                                                      target_modules=["q_proj"]))
    _copy_adapters(ours, _peft_layers(theirs), torch.Generator().manual_seed(2))
    x = torch.randn(5, 12)
    ours.eval(), theirs.eval()
    assert torch.allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    ours.train(), theirs.train()
    torch.manual_seed(7)
    y_ours = ours(x)
    torch.manual_seed(7)
    y_theirs = theirs(x)
    assert torch.allclose(y_ours, y_theirs, rtol=1e-6, atol=1e-6)  # the same dropout mask, same place


def test_initialisation_is_peft_s():
    torch.manual_seed(0)
    layer = lora.LoRALinear(nn.Linear(400, 300), r=64, alpha=16)
    bound = 1 / 400 ** 0.5
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / 3 ** 0.5) < 0.02 * bound  # uniform(-b, b)
    assert torch.equal(layer.lora_B, torch.zeros(300, 64)) and layer.scaling == 0.25


def test_gradients_reach_only_the_adapters():
    model = lora.add_lora(tiny_causal_lm(), TARGETS, r=2)
    ids = torch.randint(0, 49152, (2, 6), generator=torch.Generator().manual_seed(0))
    model(ids).logits.square().mean().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    trainable, total = lora.count_parameters(model)
    n_layers, d, kv = 2, 64, 2 * 16
    assert trainable == n_layers * 2 * ((d + d) + (d + kv) + (128 + d))


def test_merge_unmerge_round_trip_and_errors():
    torch.manual_seed(0)
    base = nn.Linear(9, 5)
    w0 = base.weight.detach().clone()
    layer = lora.LoRALinear(base, r=3, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 9)
    y = layer(x)
    layer.merge()
    layer.merge()  # twice: no double update
    assert torch.allclose(base.weight, w0 + 2 * layer.lora_B @ layer.lora_A, atol=1e-6)
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(base.weight, w0, atol=1e-6) and torch.allclose(layer(x), y, atol=1e-5)
    with pytest.raises(ValueError):
        lora.LoRALinear(nn.Linear(3, 3), r=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        lora.add_lora(nn.Sequential(nn.Linear(2, 2)), ["q_proj"])
    with pytest.raises(TypeError):
        lora.QLoRALinear(nn.Linear(64, 2), r=2).merge()


# ----------------------------------------------------------------------------- NF4 / QLoRA vs bitsandbytes
def _bnb_linear(bnb, lin: nn.Linear, double_quant: bool, block_size: int = 64):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=torch.float32,
                          quant_type="nf4", compress_statistics=double_quant)
    q.weight = bnb.nn.Params4bit(lin.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                 blocksize=block_size, compress_statistics=double_quant)
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
    return q.to("cpu")  # Params4bit quantizes when moved to a device


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_equals_bitsandbytes(bnb, double_quant):
    torch.manual_seed(0)
    lin = nn.Linear(256, 24)
    theirs = _bnb_linear(bnb, lin, double_quant)
    ours = lora.NF4Linear.from_linear(lin, 64, double_quant)
    w_theirs = bnb.functional.dequantize_4bit(theirs.weight.data, theirs.weight.quant_state)
    x = torch.randn(5, 256)
    with torch.no_grad():
        if not double_quant:  # the same codes and absmax: the same weight, bit for bit
            assert torch.equal(ours.weight_hat(), w_theirs)
            assert torch.allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
        else:  # 8-bit absmax on two different grids: a fraction of a percent apart
            rel = (ours.weight_hat() - w_theirs).norm() / w_theirs.norm()
            assert rel < 3e-3
            assert torch.allclose(ours(x), theirs(x), rtol=0, atol=2e-2 * theirs(x).abs().max().item())


def test_qlora_equals_peft_over_bitsandbytes(bnb, peft):
    torch.manual_seed(1)
    lin = nn.Linear(128, 32)
    wrapper = nn.Sequential()
    wrapper.add_module("q_proj", _bnb_linear(bnb, lin, double_quant=False))
    theirs = peft.get_peft_model(wrapper, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    ours = nn.Sequential()
    ours.add_module("q_proj", lora.QLoRALinear(lin, r=4, alpha=16, double_quant=False))
    _copy_adapters(ours, _peft_layers(theirs), torch.Generator().manual_seed(3))
    x = torch.randn(2, 3, 128)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    trainable = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert lora.count_parameters(ours) == (trainable, trainable + 128 * 32 + 32)


def test_nf4_backward_recomputes_the_weight_instead_of_saving_it():
    torch.manual_seed(0)
    lin = nn.Linear(192, 64)
    layer = lora.QLoRALinear(lin, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    saved = []
    x = torch.randn(3, 192, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert (64, 192) not in saved and (192, 64) not in saved
    y.square().sum().backward()
    w_eff = layer.base.weight_hat() + layer.delta_weight().detach()
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w_eff, lin.bias).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
    assert [n for n, p in layer.named_parameters()] == ["lora_A", "lora_B"]
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_quantize_model_merge_and_requantize():
    model = tiny_causal_lm(seed=2)
    n_before = sum(p.numel() for p in model.parameters())
    lora.quantize_nf4_model(model)
    assert type(model.lm_head) is nn.Linear  # skipped, as bitsandbytes does
    assert sum(isinstance(m, lora.NF4Linear) for m in model.modules()) == 2 * 7
    assert lora.count_parameters(model)[1] == n_before  # NF4 weights count as their elements
    lora.add_lora(model, lora.LLAMA_LINEARS, r=2)
    assert sum(isinstance(m, lora.QLoRALinear) for m in model.modules()) == 14
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.QLoRALinear):
                m.lora_B.normal_(std=0.01)
    ids = torch.randint(0, 49152, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(ids).logits
        layer = model.model.layers[0].self_attn.q_proj
        want = layer.base.weight_hat() + layer.delta_weight()
        fp = lora.merge_lora(copy.deepcopy(model))
        assert torch.allclose(fp.model.layers[0].self_attn.q_proj.weight, want, atol=1e-6)
        assert torch.allclose(fp(ids).logits, y, rtol=1e-4, atol=1e-4)
        requant = lora.merge_lora(model, requantize=True)
        q = requant.model.layers[0].self_attn.q_proj
        assert isinstance(q, lora.NF4Linear)
        assert torch.equal(q.weight_hat(), dequantize_nf4(*quantize_nf4(want, 64, double_quant=True)))


@pytest.mark.parametrize("shape, block_size, double_quant", [((24, 256), 64, True), ((8, 128), 128, False),
                                                            ((3, 33), 64, True), ((5, 96), 64, False)])
def test_fast_dequantization_is_nf4_s_bit_for_bit(shape, block_size, double_quant):
    lin = nn.Linear(shape[1], shape[0])
    layer = lora.NF4Linear.from_linear(lin, block_size, double_quant)
    want = dequantize_nf4(*quantize_nf4(lin.weight, block_size, double_quant))
    assert torch.equal(layer.weight_hat(), want)
    assert layer.weight_hat(torch.bfloat16).dtype == torch.bfloat16
