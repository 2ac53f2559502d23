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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcore import lora
from qcore.measure import describe_device, parameter_bytes, peak_memory
from qcore.nf4 import dequantize_nf4, nf4_codebook, quantize_nf4
from qcore.quant import PerGroup, choose_qparams, fake_quantize, sqnr_db
from qcore.packing import unpack_int4
from qcore.train import compute_dtype, seed_everything, train, under_grader
from qcore.zoo import HUB_CAUSAL_LM, load_causal_lm, load_sentiment_data
from qcore.zoo.prompted_sentiment import answer_loss, sentiment_accuracy, sentiment_batches, sentiment_logits

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


def accuracy(model) -> float:
    """Share of the test sentences whose larger label-word logit is the right one."""
    return sentiment_accuracy(model, tokenizer, test_split, limit=N_TEST)


zero_shot = accuracy(base_model)
print(f"zero-shot accuracy: {zero_shot:.3f}")

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
# * `A` random, as an `nn.Linear` weight: `nn.init.kaiming_uniform_(A, a=math.sqrt(5))`, uniform in
#   `±1 / sqrt(in)`;
# * `B` zero, so `B @ A = 0` at the start. If both were random the model would start from a damaged
#   copy of itself; if both were zero, neither would ever get a gradient (each one's gradient is
#   proportional to the other).
#
# `scaling = alpha / r` keeps the size of the update about the same when you change `r`, so a
# learning rate tuned at one rank works at another. Dropout, when used, applies to the adapter's
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
# add the adapter again; `unmerge()` undoes it. The grader blocks `qcore.lora`.

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
    """Train, measuring peak training memory and time per step (accuracy: `evaluate`, next)."""
    trainable = lora.count_parameters(model)[0]
    release_freed_memory()
    runs = []  # the course's loop: AdamW at a constant rate, no clipping; the loss of the label word
    peak = peak_memory(lambda: runs.append(train(model, train_batches[:steps], answer_loss, lr, decay=False,
                                                 clip=None, desc=name, autocast=autocast)), DEVICE)
    seconds = runs[0].seconds
    step_s = statistics.median(seconds[1:] or seconds)  # the first step allocates
    row = {"trainable": trainable, "weights_mb": weight_bytes(model) / 1e6, "peak_mb": peak / 1e6,
           "step_s": step_s, "steps": len(seconds), "loss": runs[0].losses, "accuracy": float("nan")}
    print(f"{name}: {row['steps']} steps, loss {row['loss'][0]:.3f} -> {statistics.mean(row['loss'][-4:]):.3f}, "
          f"{step_s:.2f} s/step")
    return row


def evaluate(name: str, model) -> None:
    results[name]["accuracy"] = accuracy(model)
    print(f"{name}: test accuracy {results[name]['accuracy']:.3f} (zero-shot {zero_shot:.3f})")


results = {"zero-shot (no training)": {"trainable": 0, "weights_mb": weight_bytes(base_model) / 1e6,
                                       "peak_mb": float("nan"), "step_s": float("nan"), "accuracy": zero_shot}}
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
#   `absmax.clamp(min=1e-38)`.
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
                 "qcore.nf4._nearest_codes", "qcore.layers.NF4Linear.from_linear")) as q:
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
# random numbers, uniform random numbers, and every linear layer of SmolLM2.

# %%
def nf4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    return dequantize_nf4(*quantize_nf4(w, 64))


def int4_roundtrip(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(-1, 64)
    return fake_quantize(flat, choose_qparams(flat, 4, True, PerGroup(64))).reshape(w.shape)


g = torch.Generator().manual_seed(0)
kinds = {"normal N(0, 1)": torch.randn(512, 512, generator=g), "uniform U(-1, 1)": torch.rand(512, 512, generator=g) * 2 - 1,
         "Student-t, 3 dof (heavy tails)": torch.distributions.StudentT(3.0).sample((512, 512))}
print(f"{'weights (blocks of 64)':34}{'NF4 dB':>8}{'int4 dB':>9}")
for name, w in kinds.items():
    print(f"{name:34}{sqnr_db(w, nf4_roundtrip(w)):8.2f}{sqnr_db(w, int4_roundtrip(w)):9.2f}")
# Every third block (every 15th under the grader): 70 of SmolLM2's 210 linear layers.
table_blocks = range(0, config.num_hidden_layers, 15 if under_grader() else 3)
real = {name: m.base.weight.detach().float().cpu() for name, m in lora_model.named_modules()
        if isinstance(m, lora.LoRALinear) and int(name.split("layers.")[1].split(".")[0]) in table_blocks}
nf4_db = {n: sqnr_db(w, nf4_roundtrip(w)) for n, w in real.items()}
int4_db = {n: sqnr_db(w, int4_roundtrip(w)) for n, w in real.items()}
for kind in TARGETS:
    names = [n for n in real if n.endswith(kind)]
    print(f"SmolLM2 {kind:26}{statistics.mean(nf4_db[n] for n in names):8.2f}"
          f"{statistics.mean(int4_db[n] for n in names):9.2f}   (mean over {len(names)} layers)")
wins = sum(nf4_db[n] > int4_db[n] for n in real)
print(f"NF4 better on {wins} of {len(real)} SmolLM2 layers (blocks {list(table_blocks)})")
del real

# %% [markdown]
# On normal weights NF4 wins by more than 1 dB at the same 4 bits: its levels sit where the values
# are. On uniform weights the evenly spaced grid wins: NF4 is designed *for bell-shaped data*, not
# in general. On heavy tails NF4 wins by more: a block's largest value sets both grids' range, and
# the uniform grid then spends most of its levels on the empty space between that outlier and the
# bulk, while NF4 keeps its levels dense near zero. SmolLM2's layers here come from a GGUF file
# that was itself quantized with 4-bit *uniform* blocks of 32 (Q4_1), so every block of 32 of these
# "FP32" weights holds at most 16 distinct, evenly spaced values: a uniform grid fits them unusually
# well, and the table above says how much of NF4's advantage survives that. On the original bf16
# weights (`USE_HUB_MODEL = True`) the layers are close to normal.
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
# qcore's `lora.QLoRALinear` is the same layer with one difference that matters in training: its
# base (`qcore.layers.NF4Linear`) dequantizes the weight in the forward *and again in the backward*, through
# a custom autograd function. A plain `F.linear(x, w_hat)` (as in your layer) makes autograd keep
# every layer's dequantized FP32 weight alive until the backward pass, which undoes the memory
# saving; recomputing it costs a little time instead. bitsandbytes does the same (`MatMul4Bit`).
#
# Now the experiment: the same training, with the frozen linear layers in NF4 (qcore), then with
# bitsandbytes' NF4 through `BitsAndBytesConfig` and `peft` (the usual QLoRA recipe, FP32 compute
# on the CPU), and a short full fine-tuning run for its memory and time per step.

# %%
qlora_model, _ = fresh_model()
lora.quantize_nf4_model(qlora_model, block_size=64, double_quant=True)  # every linear layer of the blocks
seed_everything(0)
lora.add_lora(qlora_model, TARGETS, r=RANK, alpha=ALPHA)
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

# %%
print(f"{'':36}{'trainable':>11}{'weights':>9}{'peak':>9}{'s/step':>8}{'accuracy':>10}")
print(f"{'':36}{'':>11}{'MB':>9}{'MB':>9}{'':>8}")
for name, r in results.items():
    acc = "  (short)" if math.isnan(r["accuracy"]) else f"{r['accuracy']:10.3f}"
    print(f"{name:36}{r['trainable']:11,}{r['weights_mb']:9.1f}{r['peak_mb']:9.1f}{r['step_s']:8.2f}{acc:>10}")
print(f"\n{len(train_batches)} steps of {BATCH_SIZE} sentences (full fine-tuning: {FULL_FT_STEPS or 'all'}); "
      f"accuracy on {len(test_texts)} test sentences; peak = extra memory while training "
      f"({'CUDA allocator' if DEVICE.startswith('cuda') else 'process RSS'}); {describe_device()}")
lora_acc, qlora_acc = results[f"LoRA r={RANK}"]["accuracy"], results[f"QLoRA r={RANK}, qcore NF4"]["accuracy"]
print(f"LoRA - zero-shot: {lora_acc - zero_shot:+.3f}; QLoRA (qcore) - LoRA: {qlora_acc - lora_acc:+.3f}")

# %% [markdown]
# How to read the table (the numbers are this run's; the text is about what holds across runs):
#
# * **Trainable parameters**: LoRA and QLoRA train about 1.8% of the model, the same adapters.
#   qcore's count and peft's agree.
# * **Weight memory**: NF4 shrinks the linear layers to about 4.1 bits, but the 28M-parameter
#   embedding (a fifth of this small model) stays in full precision in both qcore's and bitsandbytes'
#   QLoRA, so the whole model shrinks by about 2.7x, not 8x. In a 7B model the embedding is 2%, and
#   QLoRA's weights are close to 4 bits per parameter.
# * **Peak memory while training**: full fine-tuning adds a gradient and two Adam states for every
#   weight (Section 2: about 2.2 GB in FP32); the adapters add almost nothing, so what remains is
#   mostly activations, the same for LoRA and QLoRA. On a CPU this is measured as the growth of the
#   process's resident memory, a noisy ruler for tens of megabytes.
# * **Time per step**: QLoRA buys memory, not speed. Every step dequantizes every frozen weight
#   twice (forward and backward), work that LoRA does not do; on a shared CPU the difference can
#   hide in the noise of other processes. bitsandbytes' CPU path is not built for speed either.
# * **Accuracy**: the last lines above give the gains over the zero-shot baseline and the gap
#   between QLoRA and LoRA in this run. Differences of one or two points on 200 sentences are within
#   noise (one sentence is half a point); `FULL_RUN = True` trains and tests on all the data.
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
    merge_rows["QLoRA merged, re-quantized to NF4"] = (accuracy(qlora_requant), weight_bytes(qlora_requant))
    lora_nf4 = lora.quantize_nf4_model(merged_lora)  # the LoRA model, merged, then NF4 for deployment
    merge_rows["LoRA merged, then NF4"] = (accuracy(lora_nf4), weight_bytes(lora_nf4))
    print(f"\n{'':44}{'accuracy':>9}{'weights MB':>12}")
    for name, (acc, nbytes) in merge_rows.items():
        print(f"{name:44}{'  = above' if acc is None else f'{acc:9.3f}'}{nbytes / 1e6:12.1f}")
    print(f"(zero-shot {zero_shot:.3f}, LoRA {lora_acc:.3f})")

# %% [markdown]
# Merging is exact in floating point. Re-quantizing the merged weights moves only the codes that
# the update pushed across a decision boundary (the percentage above); the rest of the update is
# rounded away, and accuracy falls back toward where the update started. That is why QLoRA adapters
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
# and no GPU has been at hand since to measure them again: FP32 weights, gradients and Adam states
# double their 269 MB of weights and about 800 MB of gradients and Adam states.
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
# * "QLoRA makes fine-tuning efficient": in memory, yes; in time per step, no (dequantizing costs).
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
# * QLoRA = NF4 frozen base (dequantized on the fly, also in the backward) + LoRA adapters: the
#   accuracy of LoRA at a fraction of the weight memory, paid for in time per step.
# * Merging is exact in floating point; quantizing merged weights again rounds the update away in
#   part. Keep adapters separate, or merge into a 16-bit base.
