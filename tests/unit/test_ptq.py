"""qcore.ptq and qcore.smoothquant: oracles (torch's fake-quantize functions and observers, exact
integer arithmetic, torch.ao), function preservation, and model conversion on small DistilBERTs."""
import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qcore.int8
from qcore import ptq
from qcore.measure import size_on_disk
from qcore.ptq import (SCHEMES, layer_sensitivity, linear_names, logit_damage,
                       most_sensitive, quantize_linear, quantize_model)
from qcore.int8 import (asymmetric_int8_linear, int8_linear, int8_matmul, int8_matmul_by_float32_slices,
                        quantize_per_token)
from qcore.layers import Int8Linear, QuantEmbedding, QuantLinear, quantize_weight
from qcore.quant import MIN_SCALE, PerChannel, PerGroup, choose_qparams, dequantize, fake_quantize
from qcore.smoothquant import (fold_smoothing, input_absmax, input_minmax, smooth_linear, smoothing_factors,
                               smoothquant_factors, static_input_qparams, static_input_scales)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from torch.ao.quantization import MinMaxObserver as TorchMinMaxObserver
    from torch.ao.quantization import PerChannelMinMaxObserver


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def small_distilbert(seed=0, dim=32, layers=2):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(seed)
    cfg = DistilBertConfig(vocab_size=100, max_position_embeddings=64, dim=dim, n_layers=layers, n_heads=2,
                           hidden_dim=4 * dim, num_labels=2)
    return DistilBertForSequenceClassification(cfg).eval()


# ----------------------------------------------------------------------------- weights
def test_quantize_weight_per_channel_matches_torch_observer_and_fake_quantize():
    w = torch.randn(16, 40, generator=gen()) * torch.logspace(-3, 1, 16).unsqueeze(1)
    w[3] = 0.0
    codes, qp = quantize_weight(w)
    scale = qp.scale
    obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                   quant_min=-127, quant_max=127)
    obs(w)
    t_scale, t_zp = obs.calculate_qparams()
    assert torch.allclose(scale.flatten(), t_scale, rtol=1e-6) and not t_zp.any()
    assert scale.shape == (16, 1) and codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    want = torch.fake_quantize_per_channel_affine(w, scale.flatten(), torch.zeros(16, dtype=torch.int32), 0, -127, 127)
    assert torch.equal(dequantize(codes, qp), want)
    assert scale[3].item() == MIN_SCALE and not codes[3].any()


@pytest.mark.parametrize("bits,group", [(4, 8), (4, 128), (8, 64), (3, 16), (2, 4)])
def test_quantize_weight_per_group_equals_per_channel_on_the_groups(bits, group):
    w = torch.randn(6, 256, generator=gen(bits))
    codes, qp = quantize_weight(w, bits, group)
    scale = qp.scale
    assert scale.shape == (6, 256 // group)
    qmax = 2 ** (bits - 1) - 1
    rows, rows_qp = quantize_weight(w.reshape(-1, group), bits)  # each group as its own row
    assert torch.equal(codes.reshape(-1, group), rows) and torch.equal(scale.reshape(-1, 1), rows_qp.scale)
    assert int(codes.abs().max()) == qmax
    fq = fake_quantize(w, choose_qparams(w, bits, True, PerGroup(group)))
    assert torch.equal(dequantize(codes, qp), fq)


def test_quantize_weight_ties_go_to_even():
    codes, qp = quantize_weight(torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.5]]))
    assert qp.scale.item() == 1.0 and codes.tolist() == [[127, 2, 4, -2, 0]]


@pytest.mark.parametrize("bits,group", [(8, None), (4, 128), (4, None), (8, 32)])
def test_quant_linear_equals_the_fake_quantized_layer(bits, group):
    lin = nn.Linear(256, 12)
    x = torch.randn(2, 5, 256, generator=gen())
    q = QuantLinear.from_linear(lin, bits, group)
    gran = PerChannel(0) if group is None else PerGroup(group)
    fq = fake_quantize(lin.weight, choose_qparams(lin.weight, bits, True, gran))
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, fq, lin.bias))
    assert q.qweight.numel() * q.qweight.element_size() == 256 * 12 * bits // 8  # 4 bits: packed
    if bits == 4:
        assert q.qweight.dtype == torch.uint8 and torch.equal(q.codes(), quantize_weight(lin.weight, 4, group)[0])


def test_quant_linear_state_dict_round_trip_and_no_bias():
    a, b = nn.Linear(64, 8, bias=False), nn.Linear(64, 8, bias=False)
    qa, qb = QuantLinear.from_linear(a, 4, 32), QuantLinear.from_linear(b, 4, 32)
    qb.load_state_dict(qa.state_dict())
    x = torch.randn(3, 64, generator=gen())
    assert torch.equal(qa(x), qb(x)) and qa.bias is None
    assert "bias" not in qa.state_dict()
    with pytest.raises(ValueError):
        QuantLinear.from_linear(a, bits=9)


def test_quant_embedding_equals_fake_quantized_lookup():
    emb = nn.Embedding(50, 16)
    ids = torch.randint(0, 50, (3, 7), generator=gen())
    fq = fake_quantize(emb.weight, choose_qparams(emb.weight, 8, True, PerChannel(0)))
    assert torch.equal(QuantEmbedding(emb)(ids), F.embedding(ids, fq))
    assert size_on_disk(QuantEmbedding(emb)) < size_on_disk(emb)


# ----------------------------------------------------------------------------- integer arithmetic
@pytest.mark.parametrize("m,k,n", [(1, 384, 7), (33, 1536, 64), (5, 3, 2), (17, 4096, 9)])
def test_int8_matmul_is_exact(m, k, n):
    a = torch.randint(-127, 128, (m, k), generator=gen()).to(torch.int8)
    b = torch.randint(-127, 128, (k, n), generator=gen(1)).to(torch.int8)
    a[0] = 127
    b[:, 0] = 127  # the largest possible sum, k * 16129
    got = int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long())
    assert got[0, 0].item() == k * 127 * 127


def test_float32_slices_are_exact_where_one_float32_product_rounds():
    """1041 * 127**2 = 16_790_289 is odd and above 2**24: one float32 product rounds it, the
    slices of 1040 columns do not."""
    a = torch.full((2, 1041), 127, dtype=torch.int8)
    b = torch.full((1041, 3), 127, dtype=torch.int8)
    b[0, 1] = -127
    assert (a.float() @ b.float())[0, 0].item() != 1041 * 16129  # the oracle can tell
    got = int8_matmul_by_float32_slices(a, b)
    assert got.dtype == torch.int32 and torch.equal(got.long(), a.long() @ b.long())
    a = torch.full((2, 5000), -127, dtype=torch.int8)  # 8.1e7: five slices
    b = torch.full((5000, 3), 127, dtype=torch.int8)
    b[0, 1] = 126
    got = int8_matmul_by_float32_slices(a, b)
    assert torch.equal(got.long(), a.long() @ b.long()) and got[0, 1].item() == -(4999 * 16129 + 127 * 126)


def test_int8_matmul_falls_back_when_int_mm_refuses_or_is_inexact(monkeypatch):
    def refuse(*_a):
        raise RuntimeError("shape not supported")

    a = torch.full((3, 2000), 127, dtype=torch.int8)
    monkeypatch.setattr(torch, "_int_mm", refuse)
    monkeypatch.setattr(qcore.int8, "cpu_has_int8_dot_product", lambda: True)
    assert torch.equal(int8_matmul(a, a.t()).long(), a.long() @ a.long().t())
    monkeypatch.setattr(torch, "_int_mm", lambda x, y: torch.zeros(x.shape[0], y.shape[1], dtype=torch.int32))
    monkeypatch.setattr(qcore.int8, "int_mm_is_exact", lambda: False)
    assert torch.equal(int8_matmul(a, a.t()).long(), a.long() @ a.long().t())
    with pytest.raises(TypeError):
        int8_matmul(a.int(), a.t())


def test_int8_matmul_keeps_off_int_mm_on_a_cpu_without_int8_units(monkeypatch):
    def slow(*_a):
        raise AssertionError("torch._int_mm called on a CPU without VNNI or AMX")

    a = torch.randint(-127, 128, (40, 1100), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    monkeypatch.setattr(torch, "_int_mm", slow)
    monkeypatch.setattr(qcore.int8, "cpu_has_int8_dot_product", lambda: False)
    monkeypatch.setattr(qcore.int8, "int_mm_is_exact", lambda: True)
    assert torch.equal(int8_matmul(a, a.t()).long(), a.long() @ a.long().t())
    monkeypatch.setattr(qcore.int8, "cpu_has_int8_dot_product", lambda: True)
    with pytest.raises(AssertionError, match="without VNNI"):
        int8_matmul(a, a.t())


def test_int8_matmul_is_exact_where_onednn_int8_is_not():
    """Under oneDNN's AVX2 kernels (a CPU without VNNI) torch._int_mm saturates: the probe sees it
    and int8_matmul stays exact."""
    import subprocess
    import sys

    code = ("import torch\nfrom qcore.int8 import int8_matmul, int_mm_is_exact\n"
            "g = torch.Generator().manual_seed(0)\n"
            "a = torch.randint(-127, 128, (33, 1536), generator=g).to(torch.int8)\n"
            "b = torch.randint(-127, 128, (1536, 64), generator=g).to(torch.int8)\n"
            "exact = a.long() @ b.long()\n"
            "print(torch.equal(torch._int_mm(a, b).long(), exact), int_mm_is_exact(),"
            " torch.equal(int8_matmul(a, b).long(), exact))\n")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    int_mm_right, probe_says, ours_right = res.stdout.split()
    assert ours_right == "True"
    assert probe_says == int_mm_right, "the probe must tell a saturating torch._int_mm from an exact one"


def test_int8_matmul_differs_from_int8_accumulation():
    a = torch.full((1, 384), 100, dtype=torch.int8)
    assert (a @ a.t()).item() != 384 * 100 * 100 == int8_matmul(a, a.t()).item()


def test_quantize_per_token_matches_choose_qparams():
    x = torch.randn(10, 24, generator=gen()) * torch.logspace(-4, 2, 10).unsqueeze(1)
    x[4] = 0.0
    q, s = quantize_per_token(x)
    qp = choose_qparams(x, 8, True, PerChannel(0))
    assert torch.equal(s, qp.scale) and torch.equal(dequantize(q, qp), fake_quantize(x, qp))


def test_int8_linear_equals_float_computation():
    x, w, b = torch.randn(9, 64, generator=gen()), torch.randn(5, 64, generator=gen(1)), torch.randn(5)
    qx, sx = quantize_per_token(x)
    qw, qp_w = quantize_weight(w)
    sw = qp_w.scale
    exact = (qx.double() @ qw.double().t()) * sx.double() * sw.double().t() + b.double()
    y = int8_linear(qx, sx, qw, sw, b)
    assert y.dtype == torch.float32 and torch.allclose(y.double(), exact, rtol=1e-6, atol=1e-6)
    fq = F.linear(qx.float() * sx, dequantize(qw, qp_w), b)
    assert torch.allclose(y, fq, rtol=1e-5, atol=1e-5)
    assert torch.allclose(int8_linear(qx, torch.tensor(0.1), qw, sw), (qx.double() @ qw.double().t() * 0.1
                                                                         * sw.double().t()).float(), rtol=1e-6)


def test_int8_linear_dynamic_module():
    lin = nn.Linear(48, 16)
    x = torch.randn(3, 7, 48, generator=gen())
    q = Int8Linear(lin)
    fq_x = fake_quantize(x.reshape(-1, 48), choose_qparams(x.reshape(-1, 48), 8, True, PerChannel(0)))
    fq_w = fake_quantize(lin.weight, choose_qparams(lin.weight, 8, True, PerChannel(0)))
    want = F.linear(fq_x, fq_w, lin.bias).reshape(3, 7, 16)
    with torch.no_grad():
        assert torch.allclose(q(x), want, rtol=1e-5, atol=1e-5)
        assert torch.allclose(q(x), lin(x), atol=0.05)


def test_int8_linear_static_saturates_like_torch_fake_quantize():
    lin = nn.Linear(32, 4)
    x = torch.randn(6, 32, generator=gen()) * 3
    scale = 0.02  # covers |x| <= 2.54: many values saturate
    q = Int8Linear(lin, input_scale=scale)
    fq_x = torch.fake_quantize_per_tensor_affine(x, scale, 0, -127, 127)
    fq_w = fake_quantize(lin.weight, choose_qparams(lin.weight, 8, True, PerChannel(0)))
    with torch.no_grad():
        assert torch.allclose(q(x), F.linear(fq_x, fq_w, lin.bias), rtol=1e-5, atol=1e-5)
    assert "static" in repr(q) and "dynamic" in repr(Int8Linear(lin))


def test_float32_slices_are_exact_for_asymmetric_codes_shifted_to_minus_128():
    """Shifted uint8 codes reach -128: the slices must hold 128 * 127 per term (1032 of them)."""
    a = torch.full((2, 5000), -128, dtype=torch.int8)
    b = torch.full((5000, 3), 127, dtype=torch.int8)
    b[0, 1] = 125
    got = int8_matmul_by_float32_slices(a, b)
    assert torch.equal(got.long(), a.long() @ b.long()) and got[0, 0].item() == -5000 * 128 * 127


@pytest.mark.parametrize("k", [7, 384, 3000])
def test_asymmetric_int8_linear_is_the_exact_zero_point_computation(k):
    qx = torch.randint(0, 256, (5, k), generator=gen()).to(torch.uint8)
    qx[0] = 255  # the extremes of the uint8 grid
    qx[1] = 0
    qw = torch.randint(-127, 128, (4, k), generator=gen(1)).to(torch.int8)
    qw[0] = 127
    sw, bias = torch.rand(4, 1, generator=gen(2)) * 1e-3, torch.randn(4, generator=gen(3))
    for zx in (0, 2, 128, 255):
        acc = (qx.long() - zx) @ qw.long().T  # the oracle: int64, zero-point subtracted first
        want = (acc.double() * 0.01 * sw.double().T + bias.double()).float()
        got = asymmetric_int8_linear(qx, torch.tensor(0.01), zx, qw, sw, bias)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item()), zx
    with pytest.raises(TypeError):
        asymmetric_int8_linear(qx.to(torch.int8), 0.01, 0, qw, sw)


def test_int8_linear_static_asymmetric_equals_torch_fake_quantize_on_the_uint8_grid():
    lin = nn.Linear(64, 6)
    x = F.gelu(torch.randn(9, 64, generator=gen()) * 3)  # one-sided: about -0.17 to 9
    minmax = input_minmax(nn.Sequential(lin), ["0"], lambda m: m(x[:6]))  # x[6:] may leave the range
    qp = static_input_qparams(minmax)["0"]
    q = Int8Linear(lin, input_scale=qp.scale, input_zero_point=qp.zero_point)
    fq_x = torch.fake_quantize_per_tensor_affine(x, qp.scale.item(), int(qp.zero_point), 0, 255)
    fq_w = fake_quantize(lin.weight, choose_qparams(lin.weight, 8, True, PerChannel(0)))
    qx = (torch.round(x / qp.scale) + qp.zero_point).clamp(0, 255).to(torch.uint8)
    exact = asymmetric_int8_linear(qx, qp.scale, qp.zero_point, q.qweight, q.scale, lin.bias)
    with torch.no_grad():
        assert torch.allclose(q(x), F.linear(fq_x, fq_w, lin.bias), rtol=1e-5, atol=1e-5)
        assert torch.allclose(q(x), exact, rtol=1e-6, atol=1e-5)  # the folded constant: float rounding only
    assert "static asymmetric" in repr(q)
    with pytest.raises(ValueError):
        Int8Linear(lin, input_zero_point=3)


def test_static_input_qparams_match_torch_minmax_observer():
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 2))
    batches = [torch.randn(3, 4, 5, generator=gen(i)) * 2 for i in range(3)]
    minmax = input_minmax(model, ["0", "2"], lambda m: [m(b) for b in batches])
    with torch.no_grad():
        seen = {"0": torch.cat([b.reshape(-1, 5) for b in batches])}
        seen["2"] = F.gelu(model[0](seen["0"]))
    for name, x in seen.items():
        lo, hi = minmax[name]
        assert torch.equal(lo, x.amin(0)) and torch.equal(hi, x.amax(0))
        oracle = TorchMinMaxObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        oracle(x)
        scale, zero_point = oracle.calculate_qparams()
        qp = static_input_qparams(minmax)[name]
        assert torch.allclose(qp.scale, scale, rtol=1e-6) and int(qp.zero_point) == int(zero_point)
    assert torch.equal(input_absmax(model, ["0"], lambda m: [m(b) for b in batches])["0"],
                       torch.maximum(-minmax["0"][0], minmax["0"][1]))


def test_smoothing_inside_int8_linear_keeps_the_float_function():
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16, generator=gen())
    x[:, 3] *= 50  # an outlier channel
    s = smoothing_factors(x.abs().amax(0), lin.weight, 0.5)
    smoothed = copy.deepcopy(lin)
    smooth_linear(smoothed, s)
    with torch.no_grad():
        assert torch.allclose(smoothed(x / s), lin(x), rtol=1e-5, atol=1e-5)
        q = quantize_linear(lin, "w8a8-dynamic", smooth=s)
        fq_in = x / s
        fq_in = fake_quantize(fq_in, choose_qparams(fq_in, 8, True, PerChannel(0)))
        fq_w = fake_quantize(smoothed.weight, choose_qparams(smoothed.weight, 8, True, PerChannel(0)))
        assert torch.allclose(q(x), F.linear(fq_in, fq_w, lin.bias), rtol=1e-5, atol=1e-4)
    assert torch.equal(lin.weight, lin.weight.detach()) and q.smooth is not None


# ----------------------------------------------------------------------------- smoothquant
def test_smoothing_factors_formula_and_clamps():
    act = torch.tensor([16.0, 1.0, 0.0, 4.0])
    w = [torch.tensor([[1.0, 4.0, 0.5, 0.0]]), torch.tensor([[2.0, -1.0, 0.0, 0.0]])]
    s = smoothing_factors(act, w, alpha=0.5)
    assert torch.allclose(s[:2], torch.tensor([16 ** 0.5 / 2 ** 0.5, 1 / 2.0]))
    assert (s > 0).all() and torch.isfinite(s).all()
    assert torch.allclose(smoothing_factors(act, w[0], alpha=1.0)[:2], act[:2])
    assert torch.allclose(smoothing_factors(act, w[0], alpha=0.0)[:2], 1 / torch.tensor([1.0, 4.0]))


def test_fold_smoothing_is_exact_and_balances_a_pre_ln_branch():
    torch.manual_seed(0)
    ln, lins = nn.LayerNorm(12), [nn.Linear(12, 12), nn.Linear(12, 5)]
    with torch.no_grad():
        ln.weight.copy_(torch.rand(12) + 0.5)
        ln.weight[4] = 20.0
        ln.bias.copy_(torch.randn(12))
    x = torch.randn(30, 12)
    with torch.no_grad():
        before = [lin(ln(x)) for lin in lins]
        a = ln(x).abs().amax(0)
    s = smoothing_factors(a, [lin.weight for lin in lins])
    fold_smoothing(ln, lins, s)
    with torch.no_grad():
        for lin, y in zip(lins, before):
            assert torch.allclose(lin(ln(x)), y, rtol=1e-5, atol=1e-5)
        assert torch.allclose(ln(x).abs().amax(0), torch.cat([lin.weight for lin in lins]).abs().amax(0), rtol=1e-5)


def test_smoothquant_factors_share_one_s_per_group():
    model = small_distilbert()
    absmax = {n: torch.rand(model.get_submodule(n).in_features) + 0.1 for n in linear_names(model)}
    p = "distilbert.transformer.layer.0.attention."
    groups = [[p + "q_lin", p + "k_lin", p + "v_lin"], [p + "out_lin"]]
    s = smoothquant_factors(model, absmax, groups, 0.5)
    assert s[p + "q_lin"] is s[p + "v_lin"] and sorted(s) == sorted(groups[0] + groups[1])
    w = torch.cat([model.get_submodule(p + k).weight for k in ("q_lin", "k_lin", "v_lin")])
    assert torch.allclose(s[p + "q_lin"], smoothing_factors(absmax[p + "q_lin"], w))


def test_calibrate_records_input_maxima_and_removes_its_hooks():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    batches = [torch.randn(2, 5, 3, generator=gen(i)) for i in range(3)]
    absmax = input_absmax(model, ["0", "2"], lambda m: [m(b) for b in batches])
    allx = torch.cat([b.reshape(-1, 3) for b in batches])
    assert torch.equal(absmax["0"], allx.abs().amax(0))
    with torch.no_grad():
        assert torch.allclose(absmax["2"], torch.relu(model[0](allx)).amax(0))
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks

    def broken(m):
        m(batches[0])
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        input_absmax(model, ["0"], broken)
    assert not model[0]._forward_pre_hooks
    assert torch.allclose(static_input_scales(absmax)["0"], absmax["0"].max() / 127)


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_model_on_a_small_distilbert(scheme):
    model = small_distilbert()
    ids = torch.randint(0, 100, (3, 9), generator=gen())
    mask = torch.ones_like(ids)
    names = linear_names(model)
    absmax = input_absmax(model, names, lambda m: m(input_ids=ids, attention_mask=mask))
    q = quantize_model(model, scheme, input_scales=static_input_scales(absmax), embeddings=scheme != "fp32",
                       group_size=16)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)  # the original is untouched
    with torch.no_grad():
        ref, got = model(input_ids=ids, attention_mask=mask).logits, q(input_ids=ids, attention_mask=mask).logits
    assert logit_damage(ref, got) < (1e-2 if scheme == "w4a16" else 1e-3)
    expected = {"fp32": nn.Linear, "w8a16": QuantLinear, "w4a16": QuantLinear, "w8a8-dynamic": Int8Linear,
                "w8a8-static": Int8Linear}[scheme]
    assert all(type(q.get_submodule(n)) is expected for n in names)
    if scheme != "fp32":
        assert size_on_disk(q) < 0.5 * size_on_disk(model)  # small: pickling overhead is a large share


def test_quantize_model_overrides_and_errors():
    model = small_distilbert()
    names = linear_names(model)
    q = quantize_model(model, "w4a16", schemes={names[0]: "w8a16", names[1]: "fp32"}, group_size=16)
    assert q.get_submodule(names[0]).bits == 8 and type(q.get_submodule(names[1])) is nn.Linear
    assert q.get_submodule(names[2]).bits == 4
    with pytest.raises(ValueError, match="unknown scheme"):
        quantize_model(model, "w3a3")
    with pytest.raises(ValueError, match="input_scale"):
        quantize_model(model, "w8a8-static")
    ids = torch.randint(0, 100, (3, 12), generator=gen())
    qps = static_input_qparams(input_minmax(model, names, lambda m: m(input_ids=ids)))
    q = quantize_model(model, "w8a8-static", input_scales={n: qp.scale for n, qp in qps.items()},
                       input_zero_points={n: qp.zero_point for n, qp in qps.items()})
    assert all(int(q.get_submodule(n).input_zero_point) == int(qps[n].zero_point) for n in names)
    with torch.no_grad():  # close to the float model: every input inside its calibrated range
        assert torch.allclose(q(input_ids=ids).logits, model(input_ids=ids).logits, atol=0.05)


def test_torch_ao_dynamic_int8_agrees_with_own_dynamic_int8():
    """Same idea, coarser granularity: torch.ao uses one weight scale per matrix."""
    from torch.ao.quantization import quantize_dynamic

    model = small_distilbert(dim=64)
    ids = torch.randint(0, 100, (4, 12), generator=gen())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    own = quantize_model(model, "w8a8-dynamic")
    with torch.no_grad():
        ref, a, b = (m(input_ids=ids).logits for m in (model, ao, own))
    assert logit_damage(ref, b) < 1e-3 and logit_damage(ref, a) < 1e-2
    assert (a - ref).abs().max() < 0.1 and (b - ref).abs().max() < 0.1


# ----------------------------------------------------------------------------- sensitivity
def test_layer_sensitivity_one_layer_at_a_time_and_restores():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight[:, ::4] *= 10  # outliers: the worst layer at 4 bits
    x = torch.randn(64, 8, generator=gen())
    ref = model(x).detach()
    counts = []

    def damage(m):
        counts.append(sum(isinstance(layer, QuantLinear) for layer in m))
        return logit_damage(ref, m(x).detach())

    originals = list(model)
    s = layer_sensitivity(model, ["0", "2", "4"], lambda lin: QuantLinear.from_linear(lin, 4, 4), damage)
    assert counts == [1, 1, 1] and all(a is b for a, b in zip(model, originals))
    assert most_sensitive(s, 1) == ["2"] and most_sensitive(s, 5) == sorted(s, key=s.get, reverse=True)

    def broken(m):
        raise ValueError

    with pytest.raises(ValueError):
        layer_sensitivity(model, ["2"], lambda lin: QuantLinear.from_linear(lin, 4, 4), broken)
    assert model[2] is originals[2]


def test_logit_damage_is_the_kl_divergence():
    p, q = torch.randn(20, 3, generator=gen()), torch.randn(20, 3, generator=gen(1))
    want = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="batchmean")
    assert abs(logit_damage(p, q) - want.item()) < 1e-6 and logit_damage(p, p) == 0.0


@pytest.mark.slow
def test_the_tutorials_distilbert_265_to_138_mb():
    from torch.ao.quantization import quantize_dynamic
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    base = DistilBertModel(DistilBertConfig()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = quantize_dynamic(base, {nn.Linear}, dtype=torch.qint8)
    assert round(size_on_disk(base) / 1e6) == 265 and round(size_on_disk(ao) / 1e6) == 138
    assert size_on_disk(quantize_model(base, "w8a16", embeddings=True)) < 0.26 * size_on_disk(base)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_quant_linear_keeps_every_code_at_any_width(bits):
    lin = nn.Linear(64, 6)
    codes, qp = quantize_weight(lin.weight, bits, 16)
    q = QuantLinear(codes, qp.scale, lin.bias, bits=bits, group_size=16)
    packed_width = 2 if bits <= 2 else 4 if bits <= 4 else 8
    assert q.qweight.numel() * q.qweight.element_size() == 64 * 6 * packed_width // 8
    assert torch.equal(q.codes(), codes)
    x = torch.randn(3, 64, generator=gen())
    with torch.no_grad():
        assert torch.equal(q(x), F.linear(x, dequantize(codes, qp), lin.bias))
