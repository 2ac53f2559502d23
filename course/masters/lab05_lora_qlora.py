# %% [markdown]
# # Lab 5: LoRA and QLoRA on a small language model
#
# Fine-tuning changes every weight of a model; for a model of billions of weights that means
# gradients and optimizer states for billions of numbers. This lab fine-tunes a real causal language
# model cheaply, in two steps, and measures what each step saves. You will build, from tensors up:
#
# 1. a LoRA layer: a frozen linear layer plus a trainable low-rank update, and its merge;
# 2. the parameter and memory arithmetic of full fine-tuning, LoRA and QLoRA;
# 3. the 4-bit NormalFloat (NF4) codebook and block-wise NF4 quantization;
# 4. double quantization of the block scales, and the bits per weight it leaves;
# 5. a block-wise int4 quantizer, to compare NF4 with uniform 4 bits on real weights;
# 6. a QLoRA layer: adapters on a frozen NF4 base.
#
# The experiment teaches SmolLM2-135M-Instruct to label movie-review sentences as positive or
# negative through a prompt: zero-shot first, then LoRA, QLoRA with the NF4 of this course, and
# QLoRA with `bitsandbytes` + `peft` (the libraries everyone uses), next to a short full
# fine-tuning run. A table reports trainable parameters, weight memory, training memory, time per
# step and accuracy, all measured here. The last section merges the adapters into the weights and
# shows what quantizing the merged weights again costs.
#
# Each exercise is a function or class to complete between the markers, followed by a test cell.
# The test cell checks your code on small tensors; the grader runs more tests (other inputs, edge
# cases) and fails code that just calls the `qcore`, `peft` or `bitsandbytes` function it rebuilds.
# The graded checks never depend on the model or on training, only on small fixed tensors.

# %% locked="setup"
import importlib.util
if importlib.util.find_spec("qcore") is None:  # Colab or a bare kernel: install the course library
    # %pip install -q "{{QCORE_SOURCE}}"
    importlib.invalidate_caches()
from qcore.notebook import setup
DEVICE = setup()

# %%
import copy
import math
import statistics

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcore import lora
from qcore.measure import describe_device, mcnemar, paired_difference, parameter_bytes
from qcore.nf4 import dequantize_nf4, nf4_codebook, quantize_nf4
from qcore.quant import PerGroup, choose_qparams, fake_quantize, sqnr_db
from qcore.packing import unpack_int4
from qcore.train import compute_dtype, progress, seed_everything, train, under_grader
from qcore.zoo import HUB_CAUSAL_LM, load_causal_lm, load_sentiment_data
from qcore.zoo.prompted_sentiment import answer_loss, sentiment_batches, sentiment_logits

EPS = torch.finfo(torch.float32).eps

# The settings. On Colab with a GPU: USE_HUB_MODEL = True loads the original bf16 SmolLM2 from the
# hub (internet needed), and FULL_RUN = True trains on the whole training split (8057 sentences,
# one epoch) and evaluates on the whole test split (1008). Nothing else changes.
USE_HUB_MODEL = False
FULL_RUN = False

# Subsets on this CPU, smaller still under the grader (it sets NBGRADER_EXECUTION): nothing graded
# depends on them.
N_TRAIN = None if FULL_RUN else (8 if under_grader() else 320)  # training sentences (one epoch)
N_TEST = None if FULL_RUN else (8 if under_grader() else 200)   # test sentences
BATCH_SIZE = 8
FULL_FT_STEPS = None if FULL_RUN else 4  # full fine-tuning: a short run, for its time and memory
RANK, ALPHA = 8, 16                      # LoRA rank and scale alpha (scaling = alpha / r = 2)
TARGETS = lora.LLAMA_LINEARS             # adapters on all seven linear layers of every block
LR = 1e-3                                # adapters learn with a larger rate than full fine-tuning
COMPARE_LIBRARIES = not under_grader()   # bitsandbytes + peft and full fine-tuning: not under the grader

# %% [markdown]
# ## The model and the task
#
# **SmolLM2-135M-Instruct** is a 30-layer Llama (576 wide, 9 attention heads sharing 3 key-value
# heads, an MLP of width 1536) with a vocabulary of 49152 tokens. Here it comes from the course's
# offline package: a GGUF file quantized to 4 bits (Q4_1), dequantized once to FP32. So its "FP32"
# weights already carry a 4-bit rounding error (keep that in mind in Section 5). With
# `USE_HUB_MODEL = True` the same cells load the original from the hub.
#
# The task is sentiment as next-token prediction. The chat prompt asks whether a sentence from a
# movie review is positive or negative and ends with the assistant's `Sentiment:`; the model's
# next-token logits for ` positive` and ` negative` decide. Fine-tuning trains exactly that token:
# the loss is the cross-entropy of the correct label word at the prompt's last position (no loss
# on the prompt itself).

# %%
model_name = HUB_CAUSAL_LM if USE_HUB_MODEL else None


def fresh_model(dtype: torch.dtype | None = None):
    """A new copy of SmolLM2 (seconds: it is read from the local cache)."""
    return load_causal_lm(model_name, device=DEVICE, dtype=dtype)


base_model, tokenizer = fresh_model()
data = load_sentiment_data("movies")
train_split, test_split = data.train, data.test
test_texts = test_split.texts[:N_TEST]
config = base_model.config
print(describe_device())
print(f"SmolLM2: {config.num_hidden_layers} layers, width {config.hidden_size}, "
      f"{sum(p.numel() for p in base_model.parameters()) / 1e6:.1f}M parameters "
      f"({str(base_model.dtype).replace('torch.', '')}); {len(train_split.texts[:N_TRAIN])} training and "
      f"{len(test_texts)} test sentences")
print(f"{train_split.texts[0]!r} -> label {train_split.labels[0]}")


test_labels = torch.tensor(test_split.labels[:N_TEST])


def correct_on_test(model) -> torch.Tensor:
    """[test sentences]: 1.0 where the larger label-word logit is the right one. Kept per sentence,
    so that two models can be compared on the same sentences (paired), not only by their means."""
    return (sentiment_logits(model, tokenizer, test_texts).argmax(-1) == test_labels).float()


def accuracy(model) -> float:
    return correct_on_test(model).mean().item()


zero_shot_correct = correct_on_test(base_model)
zero_shot = zero_shot_correct.mean().item()
print(f"zero-shot accuracy: {zero_shot:.3f} on {len(test_texts)} sentences "
      f"(standard error {math.sqrt(zero_shot * (1 - zero_shot) / len(test_texts)):.3f})")

# %% [markdown]
# ## 1. LoRA: a low-rank update next to a frozen weight
#
# A linear layer computes `y = x @ W.T + b` with `W` of shape `[out, in]`. Full fine-tuning learns
# a change `ΔW` of the same shape: `out * in` numbers per layer. LoRA (Hu et al., 2021) keeps `W`
# frozen and learns the change as a product of two thin matrices:
#
#     y = x @ W.T + b + scaling * (x @ A.T) @ B.T        A: [r, in],  B: [out, r],  scaling = alpha / r
#
# so `ΔW = scaling * B @ A` has rank at most `r`, and the layer trains `r * (in + out)` numbers. For
# SmolLM2's `q_proj` (576 x 576) at `r = 8` that is 9216 instead of 331776 (2.8%).
#
# LoRA does not *decompose* `W` into smaller matrices (a common description): `W` stays as it is,
# full rank. Only the *update* is low-rank. The two matrices start so that the layer is exactly the
# pre-trained one:
#
# * `A` random. The LoRA paper draws it from a Gaussian; peft (and this lab) initialise it as an
#   `nn.Linear` weight, `nn.init.kaiming_uniform_(A, a=math.sqrt(5))`, uniform in `±1 / sqrt(in)`.
#   Either works: what matters is that `A` is random and `B` is zero;
# * `B` zero, so `B @ A = 0` at the start. If both were random the model would start from a damaged
#   copy of itself; if both were zero, neither would ever get a gradient (each one's gradient is
#   proportional to the other).
#
# `scaling = alpha / r` is a heuristic meant to keep the size of the update about the same when you
# change `r`, so that a learning rate tuned at one rank works at another. It does so only at small
# ranks: rsLoRA (Kalajdzic, 2023) shows that with `alpha / r` the update of a high-rank adapter
# shrinks and learns slowly, and that `alpha / sqrt(r)` keeps it stable (peft:
# `LoraConfig(use_rslora=True)`). At `r = 8` the two differ by a constant factor, which a learning
# rate absorbs. Dropout, when used, applies to the adapter's
# input only, never to the frozen path.
#
# After training, the update can be **merged**: `W' = W + scaling * B @ A` is one ordinary weight,
# so the adapted model costs no more at inference than the original. `unmerge` subtracts it again.
#
# ### Exercise 1: `LoRALinear` (3 points)
#
# Complete the class. In `__init__`: keep `base` and freeze its parameters (weight *and* bias); make
# `lora_A` (`[r, in]`, Kaiming-uniform as above) and `lora_B` (`[out, r]`, zeros) `nn.Parameter`s
# (float32, on the base weight's device); set `self.scaling` and `self.dropout` (`nn.Dropout(dropout)`);
# `self.merged = False`. `forward(x)` takes `x [..., in]`. `merge()` adds the update to
# `base.weight` in place (under `torch.no_grad()`) and sets `merged`, after which `forward` must not
# add the adapter again; calling `merge()` a second time changes nothing (the update is in the weight
# once, however often it is called); `unmerge()` undoes it, also at most once. The grader blocks
# `qcore.lora`.

# %% solution="ex1_lora_linear"
class LoRALinear(nn.Module):
    """base(x) + scaling * (dropout(x) @ A.T) @ B.T, with the base frozen; scaling = alpha / r."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        ### BEGIN SOLUTION
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.merged = False
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ### BEGIN SOLUTION
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        ### END SOLUTION

    def merge(self) -> None:
        ### BEGIN SOLUTION
        if not self.merged:
            with torch.no_grad():
                self.base.weight += self.scaling * (self.lora_B @ self.lora_A)
            self.merged = True
        ### END SOLUTION

    def unmerge(self) -> None:
        ### BEGIN SOLUTION
        if self.merged:
            with torch.no_grad():
                self.base.weight -= self.scaling * (self.lora_B @ self.lora_A)
            self.merged = False
        ### END SOLUTION


# %% tests="ex1_lora_linear_tests" points=3
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 1: LoRALinear"):
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = LoRALinear(base, r=2, alpha=4).eval()
    check_equal((tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)), ((2, 6), (4, 2)),
                "shapes: A [r, in], B [out, r]", hint="A maps the input down to r numbers, B maps them up to out")
    check_equal(layer.scaling, 2.0, "scaling = alpha / r = 4 / 2", hint="not r / alpha")
    check_true(bool((layer.lora_B == 0).all()), "B starts at zero, so the layer starts as the base layer")
    bound = 1 / math.sqrt(6)
    check_true(bool(layer.lora_A.abs().max() <= bound) and bool(layer.lora_A.abs().min() > 0),
               "A is Kaiming-uniform: non-zero, inside ±1/sqrt(in)",
               hint="nn.init.kaiming_uniform_(A, a=math.sqrt(5))")
    trainable = sorted(n for n, p in layer.named_parameters() if p.requires_grad)
    check_equal(trainable, ["lora_A", "lora_B"], "only the adapters are trainable",
                hint="freeze the base's weight and bias (requires_grad_(False))")
    x = torch.randn(3, 6)
    check_close(layer(x), base(x), "at the start the output is the base layer's")
    A, B = torch.linspace(-1, 1, 12).reshape(2, 6), torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.5, -1.0]])
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    want = x @ w0.T + b0 + 2.0 * (x @ A.T) @ B.T
    check_close(layer(x), want, "y = x @ W.T + b + scaling * (x @ A.T) @ B.T", rtol=1e-5, atol=1e-5,
                hint="A is [r, in]: x @ A.T is [..., r]; then @ B.T gives [..., out]")
    check_equal(tuple(layer(torch.randn(2, 5, 6)).shape), (2, 5, 4), "x [batch, tokens, in] -> [batch, tokens, out]")
    layer.merge()
    check_close(layer.base.weight, w0 + 2.0 * B @ A, "merge: W' = W + scaling * B @ A", rtol=1e-5, atol=1e-6,
                hint="B @ A is [out, in], the weight's shape")
    check_close(layer(x), want, "merged, the output is the same (the update is not added twice)", rtol=1e-5, atol=1e-5)
    layer.unmerge()
    check_close(layer.base.weight, w0, "unmerge restores W", rtol=1e-5, atol=1e-6)
    check_close(layer(x), want, "unmerged, the adapter works again", rtol=1e-5, atol=1e-5)
    dropped = LoRALinear(nn.Linear(6, 4), r=2, alpha=4, dropout=1.0).train()
    with torch.no_grad():
        dropped.lora_B.fill_(1.0)
    check_close(dropped(x), dropped.base(x), "dropout acts on the adapter's input only (p = 1: adapter off)",
                hint="y = base(x) + adapter(dropout(x)), not dropout(base(x) + ...)")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab05_lora_qlora", "ex1_lora_linear_tests", "lora",
         forbid=("qcore.lora.LoRALinear.forward", "qcore.lora.LoRALinear.merge", "qcore.lora.LoRALinear.delta_weight",
                 "qcore.lora.LoRALinear.__init__", "qcore.lora.add_lora")) as q:
    for _p, _c in ([("", str(_i)) for _i in range(int(q.inputs["n_cases"]))]
                   + [("visible_", str(_j)) for _j in range(int(q.inputs["n_visible"]))]):  # w3, visible_w0
        _w, _x = torch.from_numpy(q.inputs[f"{_p}w{_c}"]), torch.from_numpy(q.inputs[f"{_p}x{_c}"])
        _has_bias = bool(q.inputs[f"{_p}has_bias{_c}"])
        _base = nn.Linear(_w.shape[1], _w.shape[0], bias=_has_bias)
        with torch.no_grad():
            _base.weight.copy_(_w)
            if _has_bias:
                _base.bias.copy_(torch.from_numpy(q.inputs[f"{_p}bias{_c}"]))
        _layer = LoRALinear(_base, r=int(q.inputs[f"{_p}r{_c}"]), alpha=float(q.inputs[f"{_p}alpha{_c}"])).eval()
        q.answer(f"{_p}scaling{_c}", float(_layer.scaling))
        q.answer(f"{_p}fresh_y{_c}", _layer(_x))  # a new layer is its base
        q.answer(f"{_p}fresh_base_y{_c}", _base(_x))
        q.answer(f"{_p}init_A{_c}", _layer.lora_A)
        q.answer(f"{_p}init_B{_c}", _layer.lora_B)
        _trainable = [_n for _n, _t in _layer.named_parameters() if _t.requires_grad]
        q.answer(f"{_p}trainable_A{_c}", "lora_A" in _trainable)
        q.answer(f"{_p}trainable_B{_c}", "lora_B" in _trainable)
        q.answer(f"{_p}n_trainable{_c}", len(_trainable))
        q.answer(f"{_p}base_requires_grad{_c}", np.array([_t.requires_grad for _t in _base.parameters()], dtype=bool))
        with torch.no_grad():
            _layer.lora_A.copy_(torch.from_numpy(q.inputs[f"{_p}A{_c}"]))
            _layer.lora_B.copy_(torch.from_numpy(q.inputs[f"{_p}B{_c}"]))
        _y = _layer(_x)
        q.answer(f"{_p}y{_c}", _y)
        _y.sum().backward()
        q.answer(f"{_p}A_grad_none{_c}", _layer.lora_A.grad is None)
        q.answer(f"{_p}B_grad_none{_c}", _layer.lora_B.grad is None)
        if _layer.lora_A.grad is not None:
            q.answer(f"{_p}grad_A{_c}", _layer.lora_A.grad)
        if _layer.lora_B.grad is not None:
            q.answer(f"{_p}grad_B{_c}", _layer.lora_B.grad)
        q.answer(f"{_p}base_grad_none{_c}", _base.weight.grad is None)
        _layer.merge()
        q.answer(f"{_p}merged{_c}", _base.weight)
        q.answer(f"{_p}merged_y{_c}", _layer(_x))
        _layer.merge()  # a second merge changes nothing
        q.answer(f"{_p}merged_twice{_c}", _base.weight)
        _layer.unmerge()
        q.answer(f"{_p}unmerged{_c}", _base.weight)
        q.answer(f"{_p}unmerged_y{_c}", _layer(_x))
        q.answer(f"{_p}dropout_is_module{_c}", isinstance(_layer.dropout, nn.Dropout))
        _layer.train()
        _layer.dropout.p = 1.0
        q.answer(f"{_p}dropped_y{_c}", _layer(_x))  # dropout on the adapter's input only
### END HIDDEN TESTS

# %% [markdown]
# qcore's `lora.LoRALinear` is the same layer, with `peft`'s names and initialisation, so with the
# same `A` and `B` it gives `peft`'s outputs (the course's tests check that). `lora.add_lora(model,
# targets, r, alpha)` freezes a model and wraps every linear layer whose name ends in one of
# `targets`. Your layer against qcore's and peft's on one of SmolLM2's projections:

# %%
from peft import LoraConfig, get_peft_model

probe = nn.Sequential()
probe.add_module("q_proj", copy.deepcopy(base_model.model.layers[0].self_attn.q_proj).float().cpu())
x_probe = torch.randn(2, 5, probe.q_proj.in_features)
try:
    mine = LoRALinear(copy.deepcopy(probe.q_proj), r=RANK, alpha=ALPHA)
    theirs = get_peft_model(copy.deepcopy(probe), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"]))
    ours = lora.add_lora(copy.deepcopy(probe), ["q_proj"], r=RANK, alpha=ALPHA)
    peft_layer = theirs.base_model.model.q_proj
    with torch.no_grad():  # one pair of adapters for all three
        B_probe = torch.randn_like(mine.lora_B) * 0.01
        for m in (mine, ours.q_proj):
            m.lora_A.copy_(peft_layer.lora_A["default"].weight)
            m.lora_B.copy_(B_probe)
        peft_layer.lora_B["default"].weight.copy_(B_probe)
        outs = {"yours": mine(x_probe), "qcore": ours(x_probe), "peft": theirs(x_probe)}
    for name, y in outs.items():
        print(f"{name:6} max |y - peft| = {(y - outs['peft']).abs().max().item():.2e}")
    print(f"trainable parameters of this layer: {sum(p.numel() for p in mine.parameters() if p.requires_grad)} "
          f"= r * (in + out) = {RANK} * ({probe.q_proj.in_features} + {probe.q_proj.out_features})")
except NotImplementedError:
    print("(complete Exercise 1 to compare your layer with peft's)")

# %% [markdown]
# ## 2. What fine-tuning costs: parameters and memory
#
# The linear layers of one SmolLM2 block, with `d = hidden_size`, `h = num_attention_heads`,
# `kv = num_key_value_heads`, `hd = head_dim`, `I = intermediate_size` (weights `[out, in]`):
#
# | layer | `q_proj` | `k_proj`, `v_proj` | `o_proj` | `gate_proj`, `up_proj` | `down_proj` |
# | --- | --- | --- | --- | --- | --- |
# | shape | `[h*hd, d]` | `[kv*hd, d]` | `[d, h*hd]` | `[I, d]` | `[d, I]` |
#
# `k_proj` and `v_proj` are narrower because of grouped-query attention: SmolLM2's 9 query heads
# share 3 key-value heads. `head_dim` is usually `d / h` (576 / 9 = 64) but a config may set it.
#
# Training memory has four parts: the weights; one gradient per *trainable* weight (same dtype);
# the optimizer state, for Adam two numbers (the moving averages `m` and `v`) per trainable weight,
# kept in FP32 (8 bytes); and the activations saved for the backward pass (they depend on batch
# and sequence length, so they are measured, not derived, below). Frozen weights need no gradient
# and no optimizer state: that is the whole saving of LoRA. QLoRA also stores the frozen weights in
# about 4 bits instead of 16 or 32.
#
# ### Exercise 2: parameters and memory (2 points)
#
# * `lora_trainable_parameters(config, r, target_modules)`: the number of trainable parameters when
#   every layer named in `target_modules` (names from the table) of every block gets a rank-`r`
#   adapter. `config` has the attributes `hidden_size`, `intermediate_size`, `num_attention_heads`,
#   `num_key_value_heads`, `head_dim`, `num_hidden_layers` (a transformers `LlamaConfig` does).
# * `training_memory(n_frozen, n_trainable, frozen_bits, trainable_bits=32)`: a dict of bytes
#   (floats) with `"weights"` (frozen at `frozen_bits`, trainable at `trainable_bits` per
#   parameter), `"gradients"` (trainable only, at `trainable_bits`) and `"optimizer"` (Adam:
#   two FP32 numbers per trainable parameter).

# %% solution="ex2_arithmetic"
def lora_trainable_parameters(config, r: int, target_modules) -> int:
    """Trainable parameters of rank-r adapters on the named linear layers of every block."""
    ### BEGIN SOLUTION
    d, inter, hd = config.hidden_size, config.intermediate_size, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    shapes = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
              "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}
    per_block = sum(r * (n_out + n_in) for name, (n_out, n_in) in shapes.items() if name in target_modules)
    return per_block * config.num_hidden_layers
    ### END SOLUTION


def training_memory(n_frozen: int, n_trainable: int, frozen_bits: float, trainable_bits: float = 32) -> dict:
    """Bytes of weights, gradients and Adam's two FP32 states while training."""
    ### BEGIN SOLUTION
    return {"weights": n_frozen * frozen_bits / 8 + n_trainable * trainable_bits / 8,
            "gradients": n_trainable * trainable_bits / 8,
            "optimizer": 2 * 4.0 * n_trainable}
    ### END SOLUTION


# %% tests="ex2_arithmetic_tests" points=2
from types import SimpleNamespace

from qcore.checks import check_close, check_equal, exercise

with exercise("Exercise 2: parameters and memory"):
    smol = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                           head_dim=64, num_hidden_layers=30)
    check_equal(lora_trainable_parameters(smol, 8, ["q_proj"]), 30 * 8 * (576 + 576),
                "q_proj, r = 8: r * (in + out) per block, times 30 blocks")
    check_equal(lora_trainable_parameters(smol, 8, ["q_proj", "v_proj"]), 30 * 8 * (1152 + 576 + 192),
                "q_proj and v_proj: v_proj is [kv * head_dim, d] = [192, 576]",
                hint="keys and values have num_key_value_heads heads, not num_attention_heads")
    check_equal(lora_trainable_parameters(smol, 1, ["down_proj"]), 30 * (576 + 1536), "down_proj is [d, I]")
    check_equal(lora_trainable_parameters(smol, 4, []), 0, "no target, nothing to train")
    mem = training_memory(1000, 0, 32)
    check_equal(sorted(mem), ["gradients", "optimizer", "weights"], "the three keys")
    check_close(torch.tensor([mem["weights"], mem["gradients"], mem["optimizer"]]), torch.tensor([4000.0, 0, 0]),
                "all frozen in FP32: weights only", hint="frozen weights need no gradient and no Adam state")
    mem = training_memory(1000, 10, 4.127, 32)
    check_close(torch.tensor([mem["weights"], mem["gradients"], mem["optimizer"]], dtype=torch.float64),
                torch.tensor([1000 * 4.127 / 8 + 40, 40, 80], dtype=torch.float64),
                "QLoRA-like: 4.127-bit frozen weights, FP32 adapters with gradients and two Adam states")
### BEGIN HIDDEN TESTS
from types import SimpleNamespace as _Config

from qcore.asking import ask

with ask("lab05_lora_qlora", "ex2_arithmetic_tests", "arithmetic") as q:
    _keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
             "num_hidden_layers")
    for _p, _c in ([("", str(_i)) for _i in range(int(q.inputs["n_cases"]))]
                   + [("visible_", str(_j)) for _j in range(int(q.inputs["n_visible"]))]):  # w3, visible_w0
        _cfg = _Config(**dict(zip(_keys, (int(_v) for _v in q.inputs[f"{_p}config{_c}"]))))
        _targets = [_t for _t in str(q.inputs[f"{_p}targets{_c}"]).split(",") if _t]  # "": no target
        _r = int(q.inputs[f"{_p}r{_c}"])
        q.answer(f"{_p}trainable{_c}", lora_trainable_parameters(_cfg, _r, list(_targets)))
        q.answer(f"{_p}trainable_tuple{_c}", lora_trainable_parameters(_cfg, _r, tuple(_targets)))
    for _p, _c in ([("", str(_i)) for _i in range(int(q.inputs["n_memory"]))]
                   + [("visible_", str(_j)) for _j in range(int(q.inputs["n_visible_memory"]))]):
        _frozen, _trainable, _fbits, _tbits = q.inputs[f"{_p}mem_in{_c}"].tolist()
        _mem = training_memory(int(_frozen), int(_trainable), _fbits, _tbits)
        for _key in ("weights", "gradients", "optimizer"):
            q.answer(f"{_p}{_key}{_c}", float(_mem[_key]))
### END HIDDEN TESTS

# %% [markdown]
# For SmolLM2 (the numbers the table in Section 6 measures):

# %%
n_total = sum(p.numel() for p in base_model.parameters())
n_linear = sum(m.weight.numel() for n, m in base_model.named_modules()
               if isinstance(m, nn.Linear) and not n.endswith("lm_head"))
try:
    n_lora = lora_trainable_parameters(config, RANK, TARGETS)
    plans = {"full fine-tuning (FP32)": training_memory(0, n_total, 32),
             f"LoRA r={RANK} (FP32 base)": training_memory(n_total, n_lora, 32),
             f"LoRA r={RANK} (BF16 base)": training_memory(n_total, n_lora, 16),
             f"QLoRA r={RANK} (NF4 + double quant)": training_memory(n_linear, n_lora, 4.127)}
    plans[f"QLoRA r={RANK} (NF4 + double quant)"]["weights"] += 4 * (n_total - n_linear)  # embeddings, norms
    print(f"{n_total / 1e6:.1f}M parameters, {n_linear / 1e6:.1f}M in the linear layers of the blocks, "
          f"the rest mostly the 49152 x 576 embedding (tied with the output head).")
    print(f"LoRA r={RANK} on {', '.join(TARGETS)}: {n_lora:,} trainable ({n_lora / n_total:.2%})\n")
    print(f"{'derived, MB':36}{'weights':>9}{'grads':>9}{'Adam':>9}{'total':>9}")
    for name, m in plans.items():
        print(f"{name:36}{m['weights'] / 1e6:9.1f}{m['gradients'] / 1e6:9.1f}{m['optimizer'] / 1e6:9.1f}"
              f"{sum(m.values()) / 1e6:9.1f}")
except NotImplementedError:
    print("(complete Exercise 2 to see the derived memory)")

# %% [markdown]
# For a 135M model the differences are hundreds of megabytes; for a 7B model (multiply by 52) they
# decide whether fine-tuning fits on one GPU: full fine-tuning in FP32 with Adam needs about 112 GB
# before activations, QLoRA about 4 GB.
#
# ## 3. Fine-tuning with LoRA
#
# The training loop is the usual one, over the adapters only: the loss is the cross-entropy of the
# label word at the last prompt token (`answer_logits` computes the 49152-word output head only
# there, not for every prompt token). Batches hold sentences of similar length (less padding).

# %% locked="release_memory"
import ctypes
import gc
import sys


def release_freed_memory() -> None:
    """Hand freed memory back to the system, so that one run's leftovers do not hide the next
    run's growth in the process's resident memory (glibc keeps freed blocks otherwise)."""
    gc.collect()
    if DEVICE == "cpu" and sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# %%
train_batches = sentiment_batches(tokenizer, train_split.texts[:N_TRAIN], train_split.labels[:N_TRAIN], BATCH_SIZE,
                                  shuffle=True, device=DEVICE)  # the training order: similar lengths, shuffled


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers, plus bitsandbytes' block scales (kept outside both)."""
    total = parameter_bytes(model)["total"]
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            parts = [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
            total += sum(t.numel() * t.element_size() for t in parts)
    return total


def experiment(name: str, model, lr: float = LR, steps: int | None = None, autocast=None) -> dict:
    """Train, timing each step (accuracy: `evaluate`, next; memory: in fresh processes, Section 6)."""
    trainable = lora.count_parameters(model)[0]
    release_freed_memory()
    # the course's loop: AdamW at a constant rate, no clipping; the loss of the label word
    run = train(model, train_batches[:steps], answer_loss, lr, decay=False, clip=None, desc=name, autocast=autocast)
    step_s = statistics.median(run.seconds[1:] or run.seconds)  # the first step allocates
    row = {"trainable": trainable, "weights_mb": weight_bytes(model) / 1e6, "step_s": step_s,
           "steps": len(run.seconds), "loss": run.losses, "accuracy": float("nan"), "correct": None}
    print(f"{name}: {row['steps']} steps, loss {row['loss'][0]:.3f} -> {statistics.mean(row['loss'][-4:]):.3f}, "
          f"{step_s:.2f} s/step")
    return row


def evaluate(name: str, model) -> None:
    results[name]["correct"] = correct_on_test(model)
    results[name]["accuracy"] = results[name]["correct"].mean().item()
    print(f"{name}: test accuracy {results[name]['accuracy']:.3f} (zero-shot {zero_shot:.3f})")


results = {"zero-shot (no training)": {"trainable": 0, "weights_mb": weight_bytes(base_model) / 1e6,
                                       "step_s": float("nan"), "accuracy": zero_shot, "correct": zero_shot_correct}}
seed_everything(0)  # the adapters' random A: the same start in every run
lora_model = lora.add_lora(base_model, TARGETS, r=RANK, alpha=ALPHA)  # in place: base_model is now the LoRA model
results[f"LoRA r={RANK}"] = experiment(f"LoRA r={RANK}", lora_model)

# %%
evaluate(f"LoRA r={RANK}", lora_model)

# %% [markdown]
# ## 4. NF4: a 4-bit codebook for normally distributed weights
#
# Uniform 4-bit quantization spreads its 15 or 16 levels evenly between `-max` and `+max`. Trained
# weights are not spread evenly: they are roughly normal, crowded near zero, with few large values.
# NF4 (Dettmers et al., QLoRA, 2023) puts the 16 levels at **quantiles of the standard normal
# distribution**, so that each level is used about equally often, then rescales them to `[-1, 1]`:
#
#     o         = 1 - (1/32 + 1/30) / 2 = 0.9677083 (rounded to 7 digits, as bitsandbytes)
#     positive  = Phi^-1(linspace(o, 0.5, 9)[:-1])      8 values (0.5 itself would give 0)
#     negative  = -Phi^-1(linspace(o, 0.5, 8)[:-1])     7 values
#     codebook  = sort(negative + [0] + positive) / max(positive)
#
# `Phi^-1` is the inverse normal CDF, `torch.special.ndtri`. The outermost probability is `o`, not 1,
# because `Phi^-1(1)` is infinite. One side has one value more so that **0 is exactly
# representable** (padding, pruned weights). Dividing by the largest value makes the ends exactly
# `-1` and `+1`: a normalized weight `w / absmax` lies in `[-1, 1]`, so both ends get used.
#
# **Block-wise** quantization: the weight is flattened and cut into blocks of `block_size`
# (64) consecutive values; each block keeps its own `absmax = max|w|` (its symmetric scale), so an
# outlier spoils only its own block. Then for each value the nearest codebook entry is its 4-bit code:
#
#     code  = argmin_i |w / absmax - codebook[i]|        w_hat = codebook[code] * absmax
#
# ### Exercise 3: the NF4 codebook and block-wise NF4 (3 points)
#
# * `nf4_codebook_from_quantiles()`: the 16 values, float32, ascending. Compute the quantiles in
#   float64 from the float32 probabilities `torch.linspace(o, 0.5, n)` (the grader compares with
#   bitsandbytes' table within `1e-6`).
# * `nf4_quantize_blockwise(w, block_size=64)`: `codes` (uint8, `[numel]`, one code per value of
#   `w.flatten()`) and `absmax` (float32, `[numel // block_size]`). You may assume `numel` is a
#   multiple of `block_size`. An all-zero block has `absmax = 0` and codes of 0.0: divide by
#   `absmax.clamp(min=1e-38)`. (bitsandbytes and qcore multiply by the reciprocal `1 / absmax`
#   instead, which can differ in the last bit; the grader's weights keep at least `2e-5` away from
#   every decision boundary, so either way gives the same codes.)
# * `nf4_dequantize_blockwise(codes, absmax, block_size, shape)`: `w_hat` float32 of `shape`.
#
# The grader blocks `qcore.nf4` and `bitsandbytes`.

# %% solution="ex3_nf4"
NF4_OFFSET = 0.9677083


def nf4_codebook_from_quantiles() -> torch.Tensor:
    """The 16 NF4 values: normal quantiles, 0 exactly, scaled so that the ends are -1 and +1."""
    ### BEGIN SOLUTION
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()
    ### END SOLUTION


def nf4_quantize_blockwise(w: torch.Tensor, block_size: int = 64):
    """uint8 codes [numel] (nearest codebook value of w / absmax) and float32 absmax [numel // block_size]."""
    ### BEGIN SOLUTION
    blocks = w.detach().reshape(-1, block_size).float()          # [n_blocks, block_size]
    absmax = blocks.abs().amax(dim=1)                            # [n_blocks]
    normalized = blocks / absmax.clamp(min=1e-38).unsqueeze(1)   # in [-1, 1]
    codebook = nf4_codebook_from_quantiles()
    codes = (normalized.unsqueeze(-1) - codebook).abs().argmin(dim=-1)
    return codes.reshape(-1).to(torch.uint8), absmax
    ### END SOLUTION


def nf4_dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, block_size: int, shape) -> torch.Tensor:
    """w_hat = codebook[code] * absmax of its block, float32, reshaped to shape."""
    ### BEGIN SOLUTION
    values = nf4_codebook_from_quantiles()[codes.long()].reshape(-1, block_size)
    return (values * absmax.reshape(-1, 1)).reshape(shape)
    ### END SOLUTION


# %% tests="ex3_nf4_tests" points=3
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 3: NF4"):
    cb = nf4_codebook_from_quantiles()
    check_equal((tuple(cb.shape), cb.dtype), ((16,), torch.float32), "16 float32 values")
    check_true(bool((cb[1:] > cb[:-1]).all()), "ascending")
    check_equal((cb[0].item(), cb[7].item(), cb[15].item()), (-1.0, 0.0, 1.0), "ends -1 and +1, zero at index 7",
                hint="divide by the largest value; 7 negative values, then 0, then 8 positive")
    check_close(cb[8:10], torch.tensor([0.0796, 0.1609]), "the first positive values", atol=1e-4, rtol=0)
    check_close(cb, nf4_codebook(), "equal to the NF4 codebook (qcore's, itself equal to bitsandbytes')",
                atol=1e-6, rtol=0)
    w = torch.cat([torch.linspace(-1, 1, 64) * 0.01, torch.linspace(-3, 3, 64), torch.zeros(64)]).reshape(3, 64)
    codes, absmax = nf4_quantize_blockwise(w, 64)
    check_equal((codes.dtype, tuple(codes.shape)), (torch.uint8, (192,)), "codes: uint8, one per value")
    check_close(absmax, torch.tensor([0.01, 3.0, 0.0]), "absmax per block of 64 (not per tensor)",
                hint="reshape to [numel // block_size, block_size] and take max|w| of each row")
    check_equal(codes[[0, 63, 64, 127]].tolist(), [0, 15, 0, 15], "each block's extremes get codes 0 and 15")
    check_true(bool((codes[128:] == 7).all()), "an all-zero block: codes of 0.0 (7), no NaN",
               hint="divide by absmax.clamp(min=1e-38)")
    check_equal(codes[[31, 32]].tolist(), [7, 7], "values next to 0 get the code of 0.0")
    w_hat = nf4_dequantize_blockwise(codes, absmax, 64, w.shape)
    check_equal(tuple(w_hat.shape), (3, 64), "w_hat has the original shape")
    want = dequantize_nf4(*quantize_nf4(w, 64))
    check_close(w_hat, want, "dequantized values equal qcore's block-wise NF4", rtol=1e-6, atol=1e-7)
    worst = (w_hat - w).abs().reshape(3, 64).amax(dim=1) / absmax.clamp(min=1e-38)
    check_true(bool((worst <= 0.16).all()), "round-trip error within half of NF4's widest gap (0.152 x absmax)")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab05_lora_qlora", "ex3_nf4_tests", "nf4",
         forbid=("qcore.nf4.nf4_codebook", "qcore.nf4.quantize_nf4", "qcore.nf4.dequantize_nf4", "qcore.nf4._codebook",
                 "qcore.nf4._nearest_codes", "qcore.layers.NF4Linear.from_linear",
                 "bitsandbytes.functional.quantize_4bit", "bitsandbytes.functional.dequantize_4bit",
                 "bitsandbytes.functional.quantize_nf4", "bitsandbytes.functional.dequantize_nf4",
                 "bitsandbytes.functional.get_4bit_type")) as q:
    q.answer("codebook", nf4_codebook_from_quantiles())
    for _p, _c in ([("", str(_i)) for _i in range(int(q.inputs["n_cases"]))]
                   + [("visible_", str(_j)) for _j in range(int(q.inputs["n_visible"]))]):  # w3, visible_w0
        _w, _bs = torch.from_numpy(q.inputs[f"{_p}w{_c}"]), int(q.inputs[f"{_p}block{_c}"])
        _codes, _absmax = nf4_quantize_blockwise(_w.clone(), _bs)
        q.answer(f"{_p}codes{_c}", torch.as_tensor(_codes).reshape(-1))
        q.answer(f"{_p}absmax{_c}", torch.as_tensor(_absmax))
        q.answer(f"{_p}w_hat{_c}", nf4_dequantize_blockwise(torch.from_numpy(q.inputs[f"{_p}dq_codes{_c}"]),
                                                            torch.from_numpy(q.inputs[f"{_p}dq_absmax{_c}"]), _bs,
                                                            _w.shape))
    _w = torch.from_numpy(q.inputs["w0"]).clone()
    nf4_quantize_blockwise(_w, int(q.inputs["block0"]))
    q.answer("w0_after", _w)  # the input is left as it was
### END HIDDEN TESTS

# %% [markdown]
# Where the 16 levels sit, and how often each is used. Left: NF4's levels (qcore's codebook) over
# the normal density they were cut from, scaled so that the outermost quantile lands on 1. Right:
# how often each code is used on normal data and on SmolLM2's weights, in blocks of 64. The
# codebook assumes that `w / absmax` is spread like a normal distribution whose quantile at
# `0.9677` sits at 1; but a block's `absmax` is the largest of 64 values, on average further out
# than that quantile (both printed below). So the normalized data are *narrower* than
# the codebook assumes: the middle codes are used more than 1/16 of the time and the outer ones
# less (two codes, the ±1 ends, are each used once per block by its largest value).

# %%
levels = nf4_codebook()
sigma = 1 / float(torch.special.ndtri(torch.tensor(NF4_OFFSET, dtype=torch.float64)))  # 1 = the outermost quantile
grid = torch.linspace(-1.2, 1.2, 400)
density = torch.exp(-0.5 * (grid / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
normal_blocks = torch.randn(4096, 64, generator=torch.Generator().manual_seed(0))
block_maxima = normal_blocks.abs().amax(1)
usage = {"normal N(0, 1)": normal_blocks,
         "SmolLM2 layer 0 up_proj": next(m for n, m in lora_model.named_modules()
                                         if n.endswith("layers.0.mlp.up_proj")).base.weight.detach().cpu()}
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 3.6))
ax1.plot(grid, density, c="gray", label=f"normal density, sd {sigma:.3f}")
ax1.vlines(levels, 0, density.max(), colors="C0", lw=1, label="NF4 levels")
ax1.set(xlabel="w / absmax", title="NF4 levels: quantiles of a normal distribution")
ax1.legend(fontsize=8)
for i, (name, w) in enumerate(usage.items()):
    codes = unpack_int4(quantize_nf4(w, 64)[0], (w.numel(),)).long()
    share = torch.bincount(codes, minlength=16).float() / codes.numel()
    ax2.bar(torch.arange(16) + 0.4 * i - 0.2, share, width=0.4, label=name)
    print(f"{name}: codes 0 and 15 used {share[[0, 15]].sum():.1%} of the time, codes 6 to 9 {share[6:10].sum():.1%} "
          f"(equal use: {2 / 16:.1%} and {4 / 16:.1%})")
ax2.axhline(1 / 16, ls="--", c="gray", label="equal use, 1/16")
ax2.set(xlabel="NF4 code", ylabel="share of the weights", title="How often each code is used (blocks of 64)")
ax2.legend(fontsize=8)
plt.show()
print(f"mean absmax of a block of 64 normal values: {block_maxima.mean():.2f} standard deviations; "
      f"the codebook's outermost quantile: {1 / sigma:.2f}")

# %% [markdown]
# ## 5. Double quantization, and NF4 against uniform int4
#
# One FP32 `absmax` per block of 64 costs `32 / 64 = 0.5` bits per weight on top of the 4. QLoRA's
# **double quantization** stores the absmax values themselves in 8 bits: subtract their mean
# (`offset`, all absmax values are positive, so centring them uses the 8 bits better), cut them into
# groups of 256, and give each group one FP32 scale on the symmetric int8 grid:
#
#     offset   = mean(absmax)
#     c        = absmax - offset                              groups of 256 (the last may be shorter)
#     scale[g] = max|c over group g| / 127   (at least EPS)
#     code     = clamp(round(c / scale[g]), -127, 127)        int8
#     absmax_hat = code * scale[g] + offset                   (clamped at 0: a scale is never negative)
#
# Per weight: 4 bits of code + 8 / 64 for the absmax code + 32 / (64 * 256) for the group scale
# = 4.127 bits (the single offset is negligible). bitsandbytes does the same with its own 8-bit
# "dynamic" float map instead of the uniform int8 grid; the cost per weight is the same.
#
# ### Exercise 4: double quantization (2 points)
#
# * `double_quantize(absmax, group_size=256)`: int8 `codes [n]`, float32 `scale [ceil(n / 256)]`,
#   and the float32 `offset` (a 0-d tensor).
# * `double_dequantize(codes, scale, offset, group_size=256)`: float32 `absmax_hat [n]`.
# * `nf4_bits_per_param(block_size=64, double_quant=True)`: bits per weight as above (4.5 at block
#   64 without double quantization).
#
# `round` is `torch.round` (half to even). The grader blocks `qcore.nf4` and `qcore.quant`.

# %% solution="ex4_double_quant"
def double_quantize(absmax: torch.Tensor, group_size: int = 256):
    """int8 codes [n], float32 scales [ceil(n / group_size)], float32 offset (mean of absmax)."""
    ### BEGIN SOLUTION
    absmax = absmax.float()
    offset = absmax.mean()
    n = absmax.numel()
    centered = F.pad(absmax - offset, (0, (-n) % group_size)).reshape(-1, group_size)  # [G, 256]
    scale = (centered.abs().amax(dim=1) / 127).clamp(min=EPS)                        # [G]
    codes = torch.round(centered / scale.unsqueeze(1)).clamp(-127, 127)
    return codes.reshape(-1)[:n].to(torch.int8), scale, offset
    ### END SOLUTION


def double_dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      group_size: int = 256) -> torch.Tensor:
    """absmax_hat [n] = code * scale of its group + offset, at least 0."""
    ### BEGIN SOLUTION
    n = codes.numel()
    padded = F.pad(codes.float(), (0, (-n) % group_size)).reshape(-1, group_size)
    return (padded * scale.reshape(-1, 1)).reshape(-1)[:n].add(offset).clamp(min=0.0)
    ### END SOLUTION


def nf4_bits_per_param(block_size: int = 64, double_quant: bool = True) -> float:
    """Bits per weight: 4 for the code plus the share of the block scales."""
    ### BEGIN SOLUTION
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * 256)
    return 4 + 32 / block_size
    ### END SOLUTION


# %% tests="ex4_double_quant_tests" points=2
from qcore.checks import check_close, check_equal, exercise

with exercise("Exercise 4: double quantization"):
    absmax = torch.tensor([1.0, 2.0, 3.0, 6.0])
    codes, scale, offset = double_quantize(absmax)
    check_close(offset, torch.tensor(3.0), "offset = mean of the absmax values")
    check_close(scale, torch.tensor([3.0 / 127]), "one scale for a group of up to 256: max|absmax - offset| / 127")
    check_equal(codes.dtype, torch.int8, "codes are int8")
    check_equal(codes.tolist(), [-85, -42, 0, 127], "codes: round((absmax - offset) / scale), half to even")
    check_close(double_dequantize(codes, scale, offset), absmax, "rebuilt within half a step", atol=0.02, rtol=0)
    long = torch.cat([torch.full((256,), 0.5), torch.tensor([0.5, 4.5])])
    codes, scale, offset = double_quantize(long)
    check_equal((tuple(codes.shape), tuple(scale.shape)), ((258,), (2,)), "258 values: 2 groups, 2 scales",
                hint="pad the last group (zeros do not change its max), or handle it on its own")
    check_close(double_dequantize(codes, scale, offset), long, "two groups rebuilt", atol=0.02, rtol=0)
    check_close(torch.tensor(nf4_bits_per_param(64, True)), torch.tensor(4.127), "4.127 bits at block 64",
                atol=5e-4, rtol=0)
    check_close(torch.tensor(nf4_bits_per_param(64, False)), torch.tensor(4.5), "4.5 bits without double quantization")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab05_lora_qlora", "ex4_double_quant_tests", "double_quant",
         forbid=("qcore.nf4._quantize_absmax", "qcore.nf4._dequantize_absmax", "qcore.nf4.quantize_nf4",
                 "qcore.nf4.bits_per_param", "qcore.quant.choose_qparams", "qcore.quant.quantize",
                 "qcore.quant.dequantize", "qcore.quant.qparams_from_range")) as q:
    for _p, _c in ([("", str(_i)) for _i in range(int(q.inputs["n_cases"]))]
                   + [("visible_", str(_j)) for _j in range(int(q.inputs["n_visible"]))]):  # w3, visible_w0
        _codes, _scale, _offset = double_quantize(torch.from_numpy(q.inputs[f"{_p}absmax{_c}"]).clone())
        q.answer(f"{_p}codes{_c}", torch.as_tensor(_codes))
        q.answer(f"{_p}scale{_c}", torch.as_tensor(_scale))
        q.answer(f"{_p}offset{_c}", torch.as_tensor(_offset).float().reshape(()))
        _rebuilt = double_dequantize(*(torch.from_numpy(q.inputs[f"{_p}rb_{_k}{_c}"])
                                       for _k in ("codes", "scale", "offset")))
        q.answer(f"{_p}rebuilt{_c}", torch.as_tensor(_rebuilt))
    for _p in ("", "visible_"):
        q.answer(f"{_p}bits", np.array([float(nf4_bits_per_param(int(_bs), bool(_dq)))
                                        for _bs, _dq in q.inputs[f"{_p}bits_in"].tolist()]))
### END HIDDEN TESTS

# %% [markdown]
# Is NF4 better than uniform 4 bits at the same cost? The uniform competitor is block-wise
# **symmetric int4**: per block `scale = absmax / 7`, codes `clamp(round(w / scale), -7, 7)`, 15 levels
# (lab 2's grid), so the two differ only in where the 16 levels sit. The error is measured as
# signal-to-quantization-noise ratio, `SQNR = 10 log10(sum w**2 / sum (w - w_hat)**2)` in dB
# (higher is better; one bit more is worth about 6 dB).
#
# ### Exercise 5: block-wise int4 and the error (2 points)
#
# * `int4_blockwise(w, block_size=64)`: the fake-quantized `w_hat` (float32, shape of `w`), each block
#   of `block_size` consecutive values of `w.flatten()` on its own symmetric int4 grid (scale at least
#   `EPS`).
# * `sqnr(w, w_hat)`: the SQNR in dB as a Python float (`inf` when `w_hat == w`).
#
# The grader blocks `qcore.quant`.

# %% solution="ex5_nf4_vs_int4"
def int4_blockwise(w: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Symmetric int4 per block of block_size values: scale = absmax / 7, 15 levels, dequantized."""
    ### BEGIN SOLUTION
    blocks = w.detach().reshape(-1, block_size).float()
    scale = (blocks.abs().amax(dim=1, keepdim=True) / 7).clamp(min=EPS)
    return (torch.round(blocks / scale).clamp(-7, 7) * scale).reshape(w.shape)
    ### END SOLUTION


def sqnr(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """10 log10(sum w**2 / sum (w - w_hat)**2) in dB."""
    ### BEGIN SOLUTION
    noise = ((w.double() - w_hat.double()) ** 2).sum().item()
    signal = (w.double() ** 2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(signal / noise)
    ### END SOLUTION


# %% tests="ex5_nf4_vs_int4_tests" points=2
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 5: block-wise int4 and SQNR"):
    w = torch.cat([torch.tensor([7.0, -3.5, 0.5, 1.6]), torch.tensor([0.14, 0.05, -0.03, 0.0])])
    w_hat = int4_blockwise(w, 4)
    check_equal(tuple(w_hat.shape), (8,), "w_hat has the shape of w")
    check_close(w_hat[:4], torch.tensor([7.0, -4.0, 0.0, 2.0]), "block 1: scale 1, half to even (-3.5 -> -4, 0.5 -> 0)")
    check_close(w_hat[4:], torch.tensor([0.14, 0.04, -0.04, 0.0]), "block 2 has its own scale (0.02)",
                rtol=1e-5, atol=1e-7, hint="one absmax per block, not per tensor")
    check_true(bool(torch.isfinite(int4_blockwise(torch.zeros(8), 4)).all()), "all-zero blocks: no NaN",
               hint="clamp the scale at EPS")
    check_close(torch.tensor(sqnr(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 3.0]))), torch.tensor(13.9794),
                "SQNR of [3, 4] vs [3, 3]: 10 log10(25 / 1)", atol=1e-3, rtol=0)
    check_true(sqnr(torch.ones(3), torch.ones(3)) == math.inf, "no error: infinite SQNR")
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 64, generator=g)
    want = fake_quantize(normal, choose_qparams(normal, 4, True, PerGroup(64)))
    check_close(int4_blockwise(normal), want, "rows of 64 equal qcore's per-group int4", rtol=1e-6, atol=1e-6)
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab05_lora_qlora", "ex5_nf4_vs_int4_tests", "int4",
         forbid=("qcore.quant.choose_qparams", "qcore.quant.quantize", "qcore.quant.dequantize",
                 "qcore.quant.fake_quantize", "qcore.quant.sqnr_db", "qcore.quant.mse",
                 "qcore.quant.qparams_from_range", "torch.fake_quantize_per_channel_affine",
                 "torch.fake_quantize_per_tensor_affine")) as q:
    for _p, _c in ([("", str(_i)) for _i in range(int(q.inputs["n_cases"]))]
                   + [("visible_", str(_j)) for _j in range(int(q.inputs["n_visible"]))]):  # w3, visible_w0
        _w = torch.from_numpy(q.inputs[f"{_p}w{_c}"])
        q.answer(f"{_p}w_hat{_c}", torch.as_tensor(int4_blockwise(_w.clone(), int(q.inputs[f"{_p}block{_c}"]))))
        _x, _x_hat = torch.from_numpy(q.inputs[f"{_p}sq_x{_c}"]), torch.from_numpy(q.inputs[f"{_p}sq_xhat{_c}"])
        q.answer(f"{_p}sqnr{_c}", float(sqnr(_x, _x_hat)))
    q.answer("sqnr_same", float(sqnr(torch.from_numpy(q.inputs["w0"]), torch.from_numpy(q.inputs["w0"]))))
### END HIDDEN TESTS

# %% [markdown]
# The comparison, with qcore's NF4 and int4 (the same as yours), on three kinds of weights: normal
# random numbers, uniform random numbers, and every linear layer of SmolLM2. Note the levels: NF4
# has 16, this int4 (the symmetric restricted grid, `-7 .. 7`) 15, a handicap of about
# `20 log10(16 / 15) = 0.56` dB on data that fill the range evenly.

# %%
def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    return dequantize_nf4(*quantize_nf4(w, 64))


def int4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(-1, 64)
    return fake_quantize(flat, choose_qparams(flat, 4, True, PerGroup(64))).reshape(w.shape)


g = torch.Generator().manual_seed(0)
kinds = {"normal N(0, 1)": torch.randn(512, 512, generator=g), "uniform U(-1, 1)": torch.rand(512, 512, generator=g) * 2 - 1,
         "Student-t, 3 dof (heavy tails)": torch.distributions.StudentT(3.0).sample((512, 512))}


def tail_ratio(w: torch.Tensor) -> float:
    """Mean over blocks of 64 of max|w| / RMS(w): how far a block's largest value, which sets both
    grids' range, lies beyond the bulk (about 2.4 for normal data, 1.7 for uniform)."""
    blocks = w.reshape(-1, 64)
    return (blocks.abs().amax(1) / blocks.square().mean(1).sqrt().clamp(min=1e-30)).mean().item()


print(f"{'weights (blocks of 64)':34}{'NF4 dB':>8}{'int4 dB':>9}{'max/RMS':>9}")
for name, w in kinds.items():
    print(f"{name:34}{sqnr_db(w, nf4_roundtrip(w)):8.2f}{sqnr_db(w, int4_roundtrip(w)):9.2f}{tail_ratio(w):9.2f}")
# Every third block (every 15th under the grader): 70 of SmolLM2's 210 linear layers.
table_blocks = range(0, config.num_hidden_layers, 15 if under_grader() else 3)
real = {name: m.base.weight.detach().float().cpu() for name, m in lora_model.named_modules()
        if isinstance(m, lora.LoRALinear) and int(name.split("layers.")[1].split(".")[0]) in table_blocks}
nf4_db = {n: sqnr_db(w, nf4_roundtrip(w)) for n, w in real.items()}
int4_db = {n: sqnr_db(w, int4_roundtrip(w)) for n, w in real.items()}
for kind in TARGETS:
    names = [n for n in real if n.endswith(kind)]
    print(f"SmolLM2 {kind:26}{statistics.mean(nf4_db[n] for n in names):8.2f}"
          f"{statistics.mean(int4_db[n] for n in names):9.2f}{statistics.mean(tail_ratio(real[n]) for n in names):9.2f}"
          f"   (mean over {len(names)} layers)")
wins = sum(nf4_db[n] > int4_db[n] for n in real)
print(f"NF4 better on {wins} of {len(real)} SmolLM2 layers (blocks {list(table_blocks)})")
del real

# %% [markdown]
# On normal weights NF4 wins (20.71 against 19.35 dB) at the same 4 bits: its levels sit
# where the values are (and it has one level more). On uniform weights the evenly spaced grid wins:
# NF4 is designed *for bell-shaped data*, not in general. On heavy tails NF4 wins by more: a block's
# largest value sets both grids' range (the max/RMS column), and the uniform grid then spends most of
# its levels on the empty space between that outlier and the bulk, while NF4 keeps its levels dense
# near zero.
#
# SmolLM2's layers come from a GGUF file quantized with 4-bit *uniform* blocks of 32 (Q4_1), so one
# might expect a uniform grid to fit them unusually well and NF4's lead to shrink. The run says the
# opposite: NF4 leads by more on every kind of SmolLM2 layer than on normal data (for `q_proj`,
# 20.48 against 18.72). Two reasons, both visible above: Q4_1's grid is asymmetric, per block of 32,
# between each block's own minimum and maximum, so it does not line up with this int4's symmetric grid
# over blocks of 64 and gives it nothing to snap to; and the weights' blocks have slightly heavier
# tails than normal data (max/RMS between 2.67 and 2.82 against 2.61), where NF4 gains. The QLoRA
# paper, for its part, compared NF4 with FP4 and int4 on models trained in 16 bits; on the original
# bf16 weights (`USE_HUB_MODEL = True`) this comparison is the paper's.
#
# ## 6. QLoRA: adapters on a frozen NF4 base
#
# QLoRA stores the frozen weights in NF4 with double quantization and trains LoRA adapters in 16
# or 32 bits. In the forward pass each frozen weight is dequantized just in time:
#
#     y = x @ dequantize(W_nf4).T + b + scaling * (x @ A.T) @ B.T
#
# The gradient flows *through* the frozen layer to the adapters of earlier layers (`dL/dx` needs
# `W`), but no gradient is computed *for* `W`. Only `A` and `B` are parameters.
#
# ### Exercise 6: `QLoRALinear` (3 points)
#
# Complete the class. In `__init__`, quantize `base.weight` with qcore's
# `quantize_nf4(weight, block_size, double_quant=True)` and keep the packed codes as a buffer
# (`self.register_buffer("packed", packed)`) and the returned `NF4State` as `self.state`; keep the
# bias (a buffer, or `None`); do **not** keep `base` or its float weight (that would defeat the
# purpose). Then the adapters, exactly as in Exercise 1 (`lora_A`, `lora_B`, `scaling`). `forward`
# dequantizes with `dequantize_nf4(self.packed, self.state)` and adds the adapter. You may use
# `qcore.nf4`; the grader blocks `qcore.lora`.

# %% solution="ex6_qlora_linear"
class QLoRALinear(nn.Module):
    """A frozen NF4 weight (dequantized in the forward) plus trainable FP32 adapters."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, block_size: int = 64):
        super().__init__()
        ### BEGIN SOLUTION
        packed, self.state = quantize_nf4(base.weight.detach(), block_size, double_quant=True)
        self.register_buffer("packed", packed)
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        self.scaling = alpha / r
        ### END SOLUTION

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ### BEGIN SOLUTION
        w_hat = dequantize_nf4(self.packed, self.state).to(x.dtype)
        return F.linear(x, w_hat, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling
        ### END SOLUTION


# %% tests="ex6_qlora_linear_tests" points=3
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 6: QLoRALinear"):
    torch.manual_seed(1)
    base = nn.Linear(128, 8)
    layer = QLoRALinear(base, r=4, alpha=8)
    packed, state = quantize_nf4(base.weight, 64, double_quant=True)
    check_equal(sorted(n for n, _ in layer.named_parameters()), ["lora_A", "lora_B"],
                "the only parameters are the adapters", hint="keep the bias as a buffer; do not keep base")
    check_true(not any(t.is_floating_point() and tuple(t.shape) == (8, 128)
                       for t in list(layer.parameters()) + list(layer.buffers())),
               "no float copy of the [out, in] weight is kept", hint="only the packed uint8 codes and the state")
    check_equal(layer.packed.dtype, torch.uint8, "packed NF4 codes (uint8, two per byte)")
    check_true(layer.state.double_quant, "double quantization on")
    x = torch.randn(3, 128)
    w_hat = dequantize_nf4(packed, state)
    check_close(layer(x), F.linear(x, w_hat, base.bias), "B = 0: the output is the NF4 layer's", rtol=1e-5, atol=1e-5)
    A, B = torch.randn(4, 128) * 0.1, torch.randn(8, 4) * 0.1
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    want = F.linear(x, w_hat, base.bias) + 2.0 * (x @ A.T) @ B.T
    check_close(layer(x), want, "y = x @ w_hat.T + b + scaling * (x @ A.T) @ B.T", rtol=1e-5, atol=1e-5)
    xg = torch.randn(2, 5, 128, requires_grad=True)
    layer(xg).square().sum().backward()
    check_true(layer.lora_A.grad is not None and layer.lora_B.grad is not None, "the adapters get gradients")
    check_true(xg.grad is not None and bool(xg.grad.abs().sum() > 0),
               "the gradient flows through the frozen layer to its input")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab05_lora_qlora", "ex6_qlora_linear_tests", "qlora",
         forbid=("qcore.lora.QLoRALinear.__init__", "qcore.lora.LoRALinear.forward", "qcore.lora.LoRALinear.__init__",
                 "qcore.layers.NF4Linear.forward", "qcore.layers.NF4Linear.from_linear", "qcore.lora.add_lora")) as q:
    for _p, _c in ([("", str(_i)) for _i in range(int(q.inputs["n_cases"]))]
                   + [("visible_", str(_j)) for _j in range(int(q.inputs["n_visible"]))]):  # w3, visible_w0
        _w, _x = torch.from_numpy(q.inputs[f"{_p}w{_c}"]), torch.from_numpy(q.inputs[f"{_p}x{_c}"])
        _has_bias = bool(q.inputs[f"{_p}has_bias{_c}"])
        _base = nn.Linear(_w.shape[1], _w.shape[0], bias=_has_bias)
        with torch.no_grad():
            _base.weight.copy_(_w)
            if _has_bias:
                _base.bias.copy_(torch.from_numpy(q.inputs[f"{_p}bias{_c}"]))
        _layer = QLoRALinear(_base, r=int(q.inputs[f"{_p}r{_c}"]), alpha=float(q.inputs[f"{_p}alpha{_c}"]))
        _params = [_n for _n, _ in _layer.named_parameters()]
        q.answer(f"{_p}has_A{_c}", "lora_A" in _params)
        q.answer(f"{_p}has_B{_c}", "lora_B" in _params)
        q.answer(f"{_p}n_params{_c}", len(_params))
        _tensors = list(_layer.parameters()) + list(_layer.buffers())
        q.answer(f"{_p}float_sizes{_c}", np.array([_t.numel() for _t in _tensors
                                                   if _t.is_floating_point() and _t is not _layer.lora_A], dtype=np.int64))
        q.answer(f"{_p}n_linear{_c}", sum(isinstance(_m, nn.Linear) for _m in _layer.modules()))
        q.answer(f"{_p}scaling{_c}", float(_layer.scaling))
        q.answer(f"{_p}init_B{_c}", _layer.lora_B)
        with torch.no_grad():
            _layer.lora_A.copy_(torch.from_numpy(q.inputs[f"{_p}A{_c}"]))
            _layer.lora_B.copy_(torch.from_numpy(q.inputs[f"{_p}B{_c}"]))
        _xg = _x.clone().requires_grad_(True)
        _y = _layer(_xg)
        q.answer(f"{_p}y{_c}", _y)
        _y.sum().backward()
        q.answer(f"{_p}A_grad_none{_c}", _layer.lora_A.grad is None)
        q.answer(f"{_p}B_grad_none{_c}", _layer.lora_B.grad is None)
        q.answer(f"{_p}x_grad_none{_c}", _xg.grad is None)
        if _layer.lora_A.grad is not None:
            q.answer(f"{_p}grad_A{_c}", _layer.lora_A.grad)
        if _layer.lora_B.grad is not None:
            q.answer(f"{_p}grad_B{_c}", _layer.lora_B.grad)
        if _xg.grad is not None:
            q.answer(f"{_p}grad_x{_c}", _xg.grad)
### END HIDDEN TESTS

# %% [markdown]
# ### Recompute, do not keep: QLoRA's engineering trick
#
# Your layer computes `F.linear(x, w_hat)` with `w_hat = dequantize_nf4(...)`, an ordinary autograd
# operation. For the backward pass, `dL/dx = dL/dy @ w_hat`, so autograd **keeps `w_hat`**, a full
# FP32 `[out, in]` copy of the weight, alive from the forward until the backward: in a model, every
# layer's dequantized weight at once, 8 times the NF4 codes it came from. Training memory would be
# back near an FP32 base. QLoRA (and bitsandbytes' `MatMul4Bit`) keep only the 4-bit codes and
# **dequantize again in the backward**: a little more compute, no FP32 weight held between the passes.
#
# A custom `torch.autograd.Function` decides what is kept: `forward(ctx, ...)` runs without
# recording a graph and stores on `ctx` what `backward` will need; `backward(ctx, grad_out)` returns
# one gradient per input of `forward` (`None` for inputs that need none).
#
# ### Exercise 7: dequantize again in the backward (2 points)
#
# Complete `NF4MatmulRecompute`: `forward(ctx, x, packed, state)` returns `x @ w_hat.T` (`x [..., in]`,
# `w_hat = dequantize_nf4(packed, state)`, in `x`'s dtype) and keeps **only** the packed codes and the
# state (`ctx.save_for_backward(packed)`, `ctx.state = state`); `backward` dequantizes again and
# returns `grad_out @ w_hat` for `x` and `None` for `packed` and `state` (the frozen weight gets no
# gradient). `nf4_matmul(x, packed, state)` applies it. The check counts what autograd keeps with
# `torch.autograd.graph.saved_tensors_hooks`, the hook PyTorch calls for every tensor saved for the
# backward. The grader blocks qcore's and bitsandbytes' 4-bit matmuls.

# %% solution="ex7_recompute"
class NF4MatmulRecompute(torch.autograd.Function):
    """y = x @ dequantize_nf4(packed, state).T, the weight dequantized again in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
        ### BEGIN SOLUTION
        ctx.save_for_backward(packed)  # uint8 codes, half a byte per weight
        ctx.state = state
        return x @ dequantize_nf4(packed, state).to(x.dtype).T
        ### END SOLUTION

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        ### BEGIN SOLUTION
        (packed,) = ctx.saved_tensors
        w_hat = dequantize_nf4(packed, ctx.state).to(grad_out.dtype)  # [out, in], alive only in here
        return grad_out @ w_hat, None, None
        ### END SOLUTION


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, state) -> torch.Tensor:
    return NF4MatmulRecompute.apply(x, packed, state)

# %% tests="ex7_recompute_tests" points=2
from qcore.checks import check_close, check_equal, check_true, exercise


def saved_for_backward(fn) -> tuple[list[torch.Tensor], object]:
    """The tensors autograd keeps for the backward pass while ``fn()`` runs (and fn's result)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return saved, result


with exercise("Exercise 7: recompute in the backward"):
    torch.manual_seed(2)
    w = torch.randn(128, 64) / 8  # [out, in]: not square, so a missing transpose cannot run
    packed, state = quantize_nf4(w, 64, double_quant=True)
    w_hat = dequantize_nf4(packed, state)
    x = torch.randn(4, 64, requires_grad=True)
    saved, y = saved_for_backward(lambda: nf4_matmul(x, packed, state))
    check_equal(tuple(y.shape), (4, 128), "y has shape [..., out]")
    check_close(y, x.detach() @ w_hat.T, "y = x @ w_hat.T", rtol=1e-5, atol=1e-5)
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= w.numel()]
    check_true(not big, f"no float tensor as large as the weight is kept for the backward (kept: {big})",
               hint="save the packed codes (ctx.save_for_backward(packed)) and dequantize again in backward")
    g = torch.randn(4, 128)
    y.backward(g)
    check_true(x.grad is not None, "a gradient reaches x")
    check_close(x.grad, g @ w_hat, "dL/dx = grad_out @ w_hat", rtol=1e-5, atol=1e-5,
                hint="y = x @ w_hat.T, so dy/dx multiplies by w_hat, not w_hat.T")
    x3 = torch.randn(2, 3, 64)
    check_close(nf4_matmul(x3, packed, state), x3 @ w_hat.T, "3-D inputs [batch, tokens, in]", rtol=1e-5, atol=1e-5)
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab05_lora_qlora", "ex7_recompute_tests", "recompute",
         forbid=("qcore.layers._NF4Matmul.forward", "qcore.layers._NF4Matmul.backward", "qcore.layers.NF4Linear.forward",
                 "bitsandbytes.matmul_4bit", "bitsandbytes.autograd._functions.matmul_4bit",
                 "bitsandbytes.autograd._functions.MatMul4Bit.forward")) as q:
    for _p, _c in ([("", str(_i)) for _i in range(int(q.inputs["n_cases"]))]
                   + [("visible_", str(_j)) for _j in range(int(q.inputs["n_visible"]))]):  # w3, visible_w0
        _w = torch.from_numpy(q.inputs[f"{_p}w{_c}"])
        _packed, _state = quantize_nf4(_w, 64, double_quant=bool(q.inputs[f"{_p}double_quant{_c}"]))
        _xg = torch.from_numpy(q.inputs[f"{_p}x{_c}"]).clone().requires_grad_(True)
        _saved, _y = saved_for_backward(lambda: nf4_matmul(_xg, _packed, _state))
        q.answer(f"{_p}saved_float_sizes{_c}", np.array([_t.numel() for _t in _saved if _t.is_floating_point()],
                                                        dtype=np.int64))
        q.answer(f"{_p}y{_c}", _y)
        _y.backward(torch.from_numpy(q.inputs[f"{_p}g{_c}"]))
        q.answer(f"{_p}x_grad_none{_c}", _xg.grad is None)
        if _xg.grad is not None:
            q.answer(f"{_p}grad_x{_c}", _xg.grad)
### END HIDDEN TESTS

# %% [markdown]
# What each layer keeps for the backward pass, for one of SmolLM2's MLP layers (`up_proj`,
# 576 -> 1536) and a batch of 8 prompts of 80 tokens: your `QLoRALinear` from Exercise 6 (plain
# autograd), the same with the frozen product through `nf4_matmul`, and qcore's `QLoRALinear`.
# The input requires a gradient, as it does in training (the adapters of earlier layers need it);
# float tensors only (the packed codes are the layer's own buffer anyway).

# %%
class QLoRALinearRecompute(QLoRALinear):
    """Exercise 6's layer with the frozen product through Exercise 7's function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nf4_matmul(x, self.packed, self.state)
        y = y if self.bias is None else y + self.bias
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def kept_mb(layer: nn.Module, x: torch.Tensor) -> float:
    """MB of float tensors autograd keeps for the backward pass of one forward call (each counted once)."""
    saved, _ = saved_for_backward(lambda: layer(x))
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved if t.is_floating_point()}
    return sum(unique.values()) / 1e6


up_base = next(m for n, m in lora_model.named_modules() if n.endswith("layers.0.mlp.up_proj")).base
x_up = torch.randn(8, 80, config.hidden_size, device=DEVICE, requires_grad=True)  # as in training: earlier adapters
try:
    torch.manual_seed(0)
    layers_kept = {"Exercise 6, plain autograd": QLoRALinear(up_base), "Exercise 6 + nf4_matmul": QLoRALinearRecompute(up_base),
                   "qcore lora.QLoRALinear": lora.QLoRALinear(up_base)}
    print(f"input x: {x_up.numel() * 4 / 1e6:.2f} MB; FP32 weight: {up_base.weight.numel() * 4 / 1e6:.2f} MB")
    for name, layer in layers_kept.items():
        print(f"{name:30} keeps {kept_mb(layer, x_up):6.2f} MB for the backward pass")
except NotImplementedError:
    print("(complete Exercises 6 and 7 to compare)")
del x_up

# %% [markdown]
# With plain autograd the layer keeps the dequantized weight (3.54 MB here) on top of what the
# adapter needs (its input `x` and the rank-8 intermediate); with the recomputing function only the
# adapter's tensors remain. Over the 210 layers of SmolLM2 that is the whole FP32 copy of the linear
# weights, which QLoRA set out not to hold. The price is one more dequantization per layer and step.
#
# Now the experiment: the same training, with the frozen linear layers in NF4 (qcore), then with
# bitsandbytes' NF4 through `BitsAndBytesConfig` and `peft` (the usual QLoRA recipe, FP32 compute
# on the CPU), and a short full fine-tuning run for its memory and time per step.

# %%
qlora_model, _ = fresh_model()
lora.quantize_nf4_model(qlora_model, block_size=64, double_quant=True)  # every linear layer of the blocks
seed_everything(0)
lora.add_lora(qlora_model, TARGETS, r=RANK, alpha=ALPHA)
# Before training (B = 0) this is the NF4 base alone: QLoRA starts from here, not from the FP32 model.
nf4_name = "zero-shot, NF4 base (no training)"
results[nf4_name] = {"trainable": 0, "weights_mb": float("nan"), "step_s": float("nan"), "accuracy": float("nan")}
evaluate(nf4_name, qlora_model)
results[f"QLoRA r={RANK}, qcore NF4"] = experiment(f"QLoRA r={RANK}, qcore NF4", qlora_model)

# %%
evaluate(f"QLoRA r={RANK}, qcore NF4", qlora_model)

# %%
if COMPARE_LIBRARIES:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qcore.zoo.causal_lm import causal_lm_dir

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=compute_dtype(DEVICE))
    bnb_model = AutoModelForCausalLM.from_pretrained(model_name or str(causal_lm_dir()), quantization_config=bnb_config,
                                                     device_map={"": DEVICE}, dtype=compute_dtype(DEVICE))
    seed_everything(0)
    bnb_model = get_peft_model(bnb_model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                     lora_dropout=0.0))
    results[f"QLoRA r={RANK}, bitsandbytes + peft"] = experiment(f"QLoRA r={RANK}, bitsandbytes + peft", bnb_model)
else:
    print("bitsandbytes + peft: skipped under the grader")

# %%
if COMPARE_LIBRARIES:
    evaluate(f"QLoRA r={RANK}, bitsandbytes + peft", bnb_model)
    del bnb_model
    # FP32 master weights: at lr 2e-5 most of Adam's steps are below half a BF16 step of a weight and
    # would be lost in BF16 weights. On a GPU the products still run in BF16/FP16 (autocast).
    full_model, _ = fresh_model(dtype=torch.float32)
    full_model.requires_grad_(True)
    # A short run: enough for time per step and peak memory. Full fine-tuning wants a smaller rate.
    results["full fine-tuning"] = experiment("full fine-tuning", full_model, lr=2e-5, steps=FULL_FT_STEPS,
                                             autocast=None if DEVICE == "cpu" else compute_dtype(DEVICE))
    if FULL_RUN:
        evaluate("full fine-tuning", full_model)
    del full_model
    release_freed_memory()
else:
    print("full fine-tuning: skipped under the grader")

# %% [markdown]
# **Memory, measured fairly.** Memory read inside this kernel mixes the runs: the models of earlier
# cells, blocks the allocator keeps for reuse. So each configuration is measured again in a fresh
# Python process of its own (`qcore.zoo.training_memory`): load, build, train 3 steps of the same
# batch size, and read the process's resident memory (RSS) before training and its peak during
# training. A minute or so each on this CPU; skipped under the grader.

# %%
from qcore.zoo.training_memory import CONFIGS, measure_in_fresh_process

memory = {}
if COMPARE_LIBRARIES:
    for config in progress(CONFIGS, desc="fresh processes"):
        memory[config] = measure_in_fresh_process(config, steps=3, batch_size=BATCH_SIZE, r=RANK, alpha=ALPHA,
                                                  device=DEVICE)
    print(f"{'each in a fresh process, MB':34}{'weights':>9}{'before':>9}{'peak':>9}{'training':>10}")
    for config, m in memory.items():
        print(f"{CONFIGS[config]:34}{m['weights_mb']:9.1f}{m['rss_before_mb']:9.1f}{m['peak_mb']:9.1f}"
              f"{m['training_extra_mb']:10.1f}")
    m = next(iter(memory.values()))
    print(f"before = {m['what']} with the model built (weights + Python, torch, libraries); peak = the highest "
          f"while training {m['steps']} steps of {BATCH_SIZE}; training = peak - before")
else:
    print("memory in fresh processes: skipped under the grader")

# %%
print(f"{'':36}{'trainable':>11}{'weights':>9}{'s/step':>8}{'accuracy':>10}")
print(f"{'':36}{'':>11}{'MB':>9}{'':>8}")
for name, r in results.items():
    acc = "  (short)" if math.isnan(r["accuracy"]) else f"{r['accuracy']:10.3f}"
    weights = "    (same)" if math.isnan(r["weights_mb"]) else f"{r['weights_mb']:9.1f}"
    print(f"{name:36}{r['trainable']:11,}{weights:>9}{r['step_s']:8.2f}{acc:>10}")
print(f"\n{len(train_batches)} steps of {BATCH_SIZE} sentences (full fine-tuning: {FULL_FT_STEPS or 'all'}); "
      f"accuracy on {len(test_texts)} test sentences (one sentence is {100 / len(test_texts):.1f} points); "
      f"{describe_device()}")
if memory:
    lora_mb, qlora_mb = (memory[c]["weights_mb"] + memory[c]["training_extra_mb"] for c in ("lora", "qlora"))
    print(f"weights + training extra: LoRA {lora_mb:.0f} MB, QLoRA (qcore) {qlora_mb:.0f} MB; weights alone "
          f"{memory['lora']['weights_mb'] / memory['qlora']['weights_mb']:.1f}x smaller in QLoRA")

# %% [markdown]
# Which differences are real? Every model answered the same test sentences, so compare them
# **paired**: what counts is the sentences on which two models disagree. Below: the difference in
# points with its paired standard error, the sentences only one of the two gets right, and
# McNemar's exact test (`qcore.measure.mcnemar`: the chance of a split at least that uneven if the
# two were equally good).

# %%
PAIRS = [(f"LoRA r={RANK}", "zero-shot (no training)"), (nf4_name, "zero-shot (no training)"),
         (f"QLoRA r={RANK}, qcore NF4", nf4_name), (f"QLoRA r={RANK}, qcore NF4", f"LoRA r={RANK}"),
         (f"QLoRA r={RANK}, bitsandbytes + peft", f"QLoRA r={RANK}, qcore NF4")]
print(f"{'A':34}{'B':28}{'A - B (points)':>18}{'only A':>8}{'only B':>8}{'McNemar p':>11}")
for a, b in PAIRS:
    if results.get(a, {}).get("correct") is None or results.get(b, {}).get("correct") is None:
        continue
    ca, cb = results[a]["correct"], results[b]["correct"]
    diff, se = paired_difference(100 * ca, 100 * cb)
    a_only, b_only, p = mcnemar(ca, cb)
    print(f"{a:34}{b:28}{diff:+9.1f} +- {se:<5.1f}{a_only:8d}{b_only:8d}{p:11.3g}")

# %%
fig, ax = plt.subplots(figsize=(8, 3.6))
for name, r in results.items():
    if r.get("loss") and len(r["loss"]) > 4:
        window = max(1, len(r["loss"]) // 8)
        ax.plot(np.convolve(r["loss"], np.ones(window) / window, mode="valid"), label=name)
ax.set(xlabel="step", ylabel="loss of the label word (moving average)", title="Training loss")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# How to read these tables (the numbers are this run's; the text says what they support):
#
# * **Trainable parameters**: LoRA and QLoRA train the same adapters, 1.82% of the model; qcore's
#   count and peft's agree.
# * **Weight memory**: NF4 shrinks the linear layers to about 4.1 bits, but the 28M-parameter
#   embedding (a fifth of this small model) stays in full precision in both qcore's and bitsandbytes'
#   QLoRA, so the weights shrink 3.1x, not 8x. In a 7B model the embedding is 2%, and QLoRA's
#   weights are close to 4 bits per parameter.
# * **Training memory** (the fresh processes): "before" is the process with its model built, the
#   weights plus Python, torch and the libraries; "training" is what the highest point while
#   training adds to it: gradients, optimizer states and, above all here, activations. Full
#   fine-tuning's extra includes a gradient and two Adam states for every weight (Section 2 derived
#   2.2 GB of weights, gradients and Adam states together, weights included). For LoRA and QLoRA the
#   adapters' share is tens of MB, so their training extra is almost all activations of a batch of
#   8 prompts through 30 layers, and on this CPU those outweigh what NF4 saves on the weights: read
#   weights plus training extra, and the peak, side by side. QLoRA's saving is on the weights (547.8
#   against 177.9 MB), real but small next to the activations at this size; it decides whether a
#   *large* model fits.
#   The two other tools QLoRA's paper uses against the rest are **gradient checkpointing**
#   (keep only each block's input and recompute the block in the backward: one tensor per block
#   instead of dozens, for one more forward pass per step; transformers:
#   `model.gradient_checkpointing_enable()`)
#   and **paged optimizers** (Adam's states in memory that can spill to the CPU when a GPU runs
#   short; bitsandbytes: `PagedAdamW`). Neither is used in this lab.
# * **Time per step**: measured in this kernel while it shares the CPU with whatever else runs; the
#   rows are not comparable within a factor of two. QLoRA dequantizes every frozen weight twice per
#   step (forward and backward), work that LoRA does not do.
# * **Accuracy**, read from the paired comparisons, not from the table: LoRA beats zero-shot by far
#   more than the noise (38 sentences against 4). The NF4 base alone, before any training, is
#   *worse* than the FP32 model (0.590 against 0.725): rounding every weight to 4 bits costs this
#   small model 13.5 points on the task. QLoRA's story is therefore 0.590 -> 0.905, and its
#   adapters learn to undo the rounding as well as the task. QLoRA against LoRA (+1.0 +- 2.4
#   points, 12 sentences against 10) and bitsandbytes against qcore (3 against 3) are
#   indistinguishable at 200 test sentences: "QLoRA matches LoRA" is what this run can say, not
#   which is better. `FULL_RUN = True` tests on all 1008 sentences.
#
# ## 7. Merging the adapters, and quantizing again
#
# For deployment, the update can be folded into the weights, `W' = W + scaling * B @ A`: one plain
# linear layer per weight, no adapter code, no extra latency. With an FP32 base this is exact (up to
# rounding). With an NF4 base there are two choices: merge into a dequantized FP32 (or BF16) model,
# exact but 4 to 8 times larger, or quantize the merged weights to NF4 again. The second one rounds
# the update: `scaling * B @ A` is small next to NF4's steps, so most weights land on the code they
# had before, and the adapter partly disappears.

# %%
check_texts = test_texts[:32]
before = sentiment_logits(lora_model, tokenizer, check_texts)
merged_lora = lora.merge_lora(lora_model)  # in place: plain nn.Linear layers with W + scaling * B @ A
after = sentiment_logits(merged_lora, tokenizer, check_texts)
print(f"LoRA merged into FP32: {lora.count_parameters(merged_lora)[1]:,} parameters, no adapters left; "
      f"max |logit change| {(after - before).abs().max().item():.2e} on {len(check_texts)} sentences")

# The QLoRA model: how large is the update next to the weights, and how many NF4 codes does it move?
update, weight, changed, total = 0.0, 0.0, 0, 0
for name, m in qlora_model.named_modules():
    if isinstance(m, lora.QLoRALinear) and int(name.split("layers.")[1].split(".")[0]) in table_blocks:
        w_hat, delta = m.base.weight_hat(torch.float32), m.delta_weight().detach().float()
        update, weight = update + delta.square().sum().item(), weight + w_hat.square().sum().item()
        codes_before = unpack_int4(quantize_nf4(w_hat, 64)[0], (w_hat.numel(),))
        codes_after = unpack_int4(quantize_nf4(w_hat + delta, 64)[0], (w_hat.numel(),))
        changed += (codes_before != codes_after).sum().item()
        total += w_hat.numel()
print(f"QLoRA update: RMS {math.sqrt(update / weight):.2%} of the weights' RMS; re-quantizing the merged "
      f"weights moves {changed / total:.2%} of the NF4 codes (blocks {list(table_blocks)})")

qlora_fp = lora.merge_lora(copy.deepcopy(qlora_model))  # dequantized base + update, FP32
merge_rows = {f"QLoRA r={RANK}, NF4 base + adapters (trained)": (results[f"QLoRA r={RANK}, qcore NF4"]["accuracy"],
                                                                   weight_bytes(qlora_model)),
              "QLoRA merged into FP32": (None, weight_bytes(qlora_fp))}
gap = (sentiment_logits(qlora_fp, tokenizer, check_texts) - sentiment_logits(qlora_model, tokenizer, check_texts))
print(f"QLoRA merged into FP32: max |logit change| {gap.abs().max().item():.2e} (exact, as for LoRA)")
del qlora_fp
if under_grader():
    print("re-quantizing the merged models: skipped under the grader (it quantizes 420 layers)")
else:
    qlora_requant = lora.merge_lora(qlora_model, requantize=True)  # merged, then NF4 again
    requant_correct = correct_on_test(qlora_requant)
    merge_rows["QLoRA merged, re-quantized to NF4"] = (requant_correct.mean().item(), weight_bytes(qlora_requant))
    lora_nf4 = lora.quantize_nf4_model(merged_lora)  # the LoRA model, merged, then NF4 for deployment
    merge_rows["LoRA merged, then NF4"] = (accuracy(lora_nf4), weight_bytes(lora_nf4))
    print(f"\n{'':44}{'accuracy':>9}{'weights MB':>12}")
    for name, (acc, nbytes) in merge_rows.items():
        print(f"{name:44}{'  = above' if acc is None else f'{acc:9.3f}'}{nbytes / 1e6:12.1f}")
    print(f"(zero-shot {zero_shot:.3f}, NF4 base before training {results[nf4_name]['accuracy']:.3f}, "
          f"LoRA {results[f'LoRA r={RANK}']['accuracy']:.3f})")
    a_only, b_only, p = mcnemar(requant_correct, results[nf4_name]["correct"])
    print(f"re-quantized QLoRA against the NF4 base before training: {a_only} sentences right only for the first, "
          f"{b_only} only for the second (McNemar p = {p:.3g})")

# %% [markdown]
# Merging is exact in floating point. Re-quantizing the merged weights moves only the codes that
# the update pushed across a decision boundary (the percentage above: practically none); the rest of
# the update is rounded away, and accuracy falls back to that of the NF4 base before training (the
# paired test above: the re-quantized model differs from it on a handful of sentences, where the
# re-quantized block scales moved). That is why QLoRA adapters
# are usually kept *separate* at inference (base in NF4, adapters in 16 bits, a few MB), or merged
# into a 16-bit copy of the base. Quantizing a merged LoRA model to NF4 is the same operation from a
# different starting point: its adapter was trained on the full-precision base and never saw NF4's
# rounding, while QLoRA's adapter was trained *with* the NF4 base and loses its fit once re-quantizing
# moves that base. Which one keeps more of the fine-tuning is an empirical question: compare the two
# rows above (under the grader this part is skipped).
#
# ### On a GPU
#
# With `FULL_RUN = True` (and `USE_HUB_MODEL = True` on Colab) the same cells train on the whole
# training split (about 1000 steps) and evaluate on the whole test split, in BF16 compute: the
# frozen base in BF16 (LoRA) or NF4 (QLoRA), the adapters in FP32, and for full fine-tuning FP32
# master weights under autocast (a BF16 weight would drop most of Adam's steps at lr 2e-5: half a
# BF16 step is 2**-9 of the weight). On a GPU, peak memory is read from the CUDA allocator, which
# makes the memory column exact.
#
# `bench/gpu_lab05.py` measured the training costs on an NVIDIA H200 (torch 2.11, BF16) with
# SmolLM2-135M's exact architecture and random weights (time and memory do not depend on the
# values; accuracy does, and needs the run above), batches of 80-token prompts. Its full
# fine-tuning rows were measured with pure-BF16 weights, before the lab kept FP32 master weights,
# and no GPU has been at hand since to measure them again (none was lent for this revision either):
# FP32 weights, gradients and Adam states double their 269 MB of weights and about 800 MB of
# gradients and Adam states. So read the table as an older measurement, not as this run's.
#
# | batch | | trainable | weights | peak extra while training | time per step |
# | --- | --- | --- | --- | --- | --- |
# | 8 | full fine-tuning | 134,515,008 | 269 MB | 1161 MB | 129 ms |
# | 8 | LoRA r=8 | 2,442,240 | 279 MB | 777 MB | 233 ms |
# | 8 | QLoRA r=8 (qcore NF4) | 2,442,240 | 121 MB | 785 MB | 379 ms |
# | 32 | full fine-tuning | 134,515,008 | 269 MB | 2549 MB | 137 ms |
# | 32 | LoRA r=8 | 2,442,240 | 279 MB | 2972 MB | 224 ms |
# | 32 | QLoRA r=8 (qcore NF4) | 2,442,240 | 121 MB | 2970 MB | 371 ms |
#
# Two lessons a model this small teaches on a GPU. Time: a step of a 135M model is far too small to
# keep an H200 busy, so it is paid in kernel launches, and every adapter and every dequantization
# adds launches: LoRA and QLoRA are *slower* than full fine-tuning here (on a 7B model the matrix
# products dominate and the order reverses). Memory: at batch 32 the activations outweigh what LoRA
# saves on gradients and Adam states (0.8 GB in BF16 for this model), and the FP32 adapters even
# keep FP32 copies of their inputs for the backward pass. The savings of LoRA and QLoRA grow with the
# model: they are proportional to the number of frozen weights, the activations to width and batch.
#
# ## What the tutorials say, checked
#
# * "A large weight matrix is decomposed into two smaller matrices; multiplying them approximates the
#   original": LoRA does not approximate `W`. `W` stays, full rank and frozen; the two small matrices
#   make the *update* `ΔW = scaling * B @ A`, which starts at zero (`B = 0`).
# * "For domain-specific tasks, rank between 1 to 8 often suffices": here rank 8 on all linear
#   layers lifts sentiment accuracy well above zero-shot with a few hundred sentences; rank is
#   cheap (parameters grow linearly in `r`), the data and the learning rate matter more.
# * "Each parameter only takes a half byte" in 4-bit: the codes do; the block scales add 0.5 bits
#   (0.127 with double quantization), and the embeddings and norms are not quantized at all (about
#   a fifth of SmolLM2).
# * "Ensure proper quantization calibration for QLoRA": NF4 needs no calibration data. Each block's
#   scale is the `max|w|` of its own 64 weights, known from the weights alone; calibration is for
#   activations (lab 3).
# * "QLoRA makes fine-tuning efficient": in weight memory, yes; in time per step, no (dequantizing
#   costs), and on a small model the activations outweigh what the 4-bit weights save.
#
# ## Summary
#
# * LoRA trains `r * (in + out)` numbers per layer next to a frozen weight: `B` starts at zero so the
#   model starts unchanged; `alpha / r` scales the update; merging makes it free at inference.
# * Training memory is weights + gradients + optimizer states + activations; freezing the base
#   removes the gradients and Adam states of all but the adapters.
# * NF4 places 16 levels at normal quantiles, scaled to `[-1, 1]` with 0 exact; block-wise absmax
#   (64 values) isolates outliers; double quantization stores the scales in 8 bits: 4.127 bits per
#   weight.
# * QLoRA = NF4 frozen base (dequantized on the fly, and again in the backward instead of kept) +
#   LoRA adapters. Here it matched LoRA within the noise, starting from an NF4 base far below the
#   FP32 model, with a third of the weight memory; at this model size the activations, not the
#   weights, dominate training memory.
# * Compare models on the same test sentences (paired differences, McNemar): at 200 sentences a
#   difference of a point or two is a handful of sentences either way.
# * Merging is exact in floating point; quantizing merged weights again rounds the update away in
#   part. Keep adapters separate, or merge into a 16-bit base.
