"""The hidden tests of lab06_llm_weights, judged outside the student's kernel.

Each test draws its inputs from a generator (the lab's ``SEED`` for the committed reference
files, a per-submission seed when grading: ``qcourse.judge``); every expected value comes from
qcore's reference implementation (``qcore.zoo.perplexity``, ``qcore.rtn``, ``qcore.gptq``,
``qcore.awq``), never from a student function.

GPTQ's rounding decisions depend on every earlier column's correction, so a float32 solution and
the float64 reference may round a few weights to the neighbouring grid point; GPTQ is judged by
what it is for (the layer-output error, no larger than the reference's by more than 2 %) and by
nine in ten weights agreeing with the reference. The Hessians are built from integer
inputs (and a power-of-two count), so they are exact on every CPU.

    python course/refgen/lab06_llm_weights.py course/reference/lab06_llm_weights
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qcourse.judge import HiddenTest, Verdict, write_hidden_references
from qcourse.refdata import generator_main, randn, to_numpy as _np
from qcore.awq import awq_scales, search_scale
from qcore.gptq import gptq_quantize_weight, output_error
from qcore.rtn import rtn_weight
from qcore.zoo.perplexity import _windows, block_mean

LAB = "lab06_llm_weights"
SEED = 20240606

# Results whose last bits may depend on the CPU (qcourse.refdata): the standard errors and means of
# float64 sums (scalar Python arithmetic after a torch sum), powers (AWQ's scales), the float32
# products behind output errors. Window spans, RTN weights, level counts, byte counts, folded
# weights (one multiplication or division each) are exact; GPTQ's float64 weights, rounded to float32,
# are exact unless a float64 difference crosses a float32 rounding boundary (declared, to be safe).
CPU_DEPENDENT = {
    "perplexity": {"mean*": 1, "se*": 4},
    "gptq": {"w_hat*": 4, "error*": 4096, "rtn_error*": 4096},
    "awq": {"s*": 16, "errors*": 4096},
    "table": {"diff*": 1, "se*": 4},
}


def _int(gen: torch.Generator, low: int, high: int) -> int:
    """An integer in [low, high) from ``gen``."""
    return int(torch.randint(low, high, (1,), generator=gen))


# ----------------------------------------------------------------------------- Exercise 1: perplexity
def perplexity_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Window specs (edge cases, invalid ones, random ones) and block sums/counts for the SE."""
    specs = [(2, 2, 1), (2, 2, 2), (5, 2, 2), (100, 100, 100), (101, 100, 100), (1000, 512, 512), (700, 64, 1),
             (1, 4, 2), (10, 4, 5), (30, 8, 9)]
    for _ in range(4):
        window = _int(gen, 2, 600)
        specs.append((_int(gen, 2, 3000), window, _int(gen, 1, window + 1)))
    out = {"n_windows": np.array(len(specs))}
    for i, spec in enumerate(specs):
        out[f"spec{i}"] = np.array(spec, dtype=np.int64)
    means = [(1, None), (2, None), (5, "ones"), (17, None), (40, None)]
    out["n_means"] = np.array(len(means))
    for i, (blocks, kind) in enumerate(means):
        counts = torch.ones(blocks, dtype=torch.int64) if kind else torch.randint(1, 600, (blocks,), generator=gen)
        sums = (randn(blocks, generator=gen).double() + 3.0) * counts.double()  # about 3 nats per token
        out[f"sums{i}"], out[f"counts{i}"] = _np(sums), _np(counts)
    return out


def perplexity_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_windows"])):
        n, window, stride = (int(v) for v in inputs[f"spec{i}"])
        if 1 <= stride <= window and window >= 2 and n >= 2:
            out[f"spans{i}"] = np.array(_windows(n, window, stride), dtype=np.int64).reshape(-1, 3)
    for i in range(int(inputs["n_means"])):
        mean, se = block_mean(torch.from_numpy(inputs[f"sums{i}"]), torch.from_numpy(inputs[f"counts{i}"]))
        out[f"mean{i}"], out[f"se{i}"] = np.array(mean), np.array(se)
    return out


def perplexity_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_windows"])):
        spec = tuple(int(x) for x in inputs[f"spec{i}"])
        if f"spans{i}" in expected:
            v.equal(f"spans{i}", expected[f"spans{i}"], f"windows{spec}")
        else:
            v.true(f"raised{i}", f"raised{i}" in answers, f"windows{spec} must raise ValueError")
    for i in range(int(inputs["n_means"])):
        what = f"mean_and_se on {inputs[f'sums{i}'].size} blocks"
        v.close(f"mean{i}", expected[f"mean{i}"], f"{what}: the mean", rtol=1e-10)
        v.close(f"se{i}", expected[f"se{i}"], f"{what}: the standard error", rtol=1e-8)


# ----------------------------------------------------------------------------- Exercise 2: RTN
def rtn_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Weights with per-row or grouped grids, 2-8 bits, both grid kinds; and weights on few levels."""
    cases = [(8, 64, 16, 4, True), (5, 48, 0, 3, True), (6, 96, 32, 4, False), (3, 40, 8, 2, True),
             (4, 64, 64, 8, False), (7, 30, 0, 5, False)]
    for _ in range(2):
        group = 8 * _int(gen, 1, 5)
        cases.append((_int(gen, 1, 9), group * _int(gen, 1, 5), group, _int(gen, 2, 9), bool(_int(gen, 0, 2))))
    out = {"n_cases": np.array(len(cases))}
    for i, (rows, cols, group, bits, sym) in enumerate(cases):
        w = randn(rows, cols, generator=gen) * 0.05
        w[0, _int(gen, 0, cols)] *= 8                                   # an outlier weight
        levels = torch.randint(0, _int(gen, 1, 20), (rows, cols), generator=gen).float() * 0.125 - 1.0
        out.update({f"w{i}": _np(w), f"group{i}": np.array(group), f"bits{i}": np.array(bits),
                    f"symmetric{i}": np.array(sym), f"grid{i}": _np(levels), f"lgroup{i}": np.array(group or cols)})
    return out


def rtn_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_cases"])):
        g = int(inputs[f"group{i}"])
        w = torch.from_numpy(inputs[f"w{i}"])
        out[f"w_hat{i}"] = _np(rtn_weight(w, int(inputs[f"bits{i}"]), None if g == 0 else g,
                                          bool(inputs[f"symmetric{i}"])))
        grid, lg = inputs[f"grid{i}"], int(inputs[f"lgroup{i}"])
        groups = grid.reshape(grid.shape[0], -1, lg)
        out[f"levels{i}"] = np.array([[len(np.unique(x)) for x in row] for row in groups], dtype=np.int64)
    return out


def rtn_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        g, w = int(inputs[f"group{i}"]), inputs[f"w{i}"]
        what = (f"case {i} ({w.shape[0]}x{w.shape[1]}, {int(inputs[f'bits{i}'])} bits, "
                f"{'per row' if g == 0 else f'groups of {g}'}, "
                f"{'symmetric' if bool(inputs[f'symmetric{i}']) else 'asymmetric'})")
        v.close(f"w_hat{i}", expected[f"w_hat{i}"], f"{what}: rtn_weight", rtol=1e-6, atol=1e-9)
        v.equal(f"levels{i}", expected[f"levels{i}"], f"case {i}: levels_per_group (group {int(inputs[f'lgroup{i}'])})")
    v.true("raised", "raised" in answers, "rtn_weight must raise ValueError when in is not a multiple of group_size")


# ----------------------------------------------------------------------------- Exercise 3: GPTQ
def _inputs(gen: torch.Generator, n_in: int, dead: int | None, large: int = 4) -> torch.Tensor:
    """Calibration inputs ``[64, n_in]``: small integers, correlated channels, two ``large`` times
    larger ones (and a dead one), so that ``H`` and ``mean|x|`` are exact on every CPU."""
    z = torch.randint(-3, 4, (64, n_in), generator=gen).float()
    mix = torch.eye(n_in) + (torch.randint(0, n_in, (n_in, n_in), generator=gen) < 3).float()  # each mixes ~3
    x = z @ mix                                                          # small integers: exact
    x[:, torch.randint(0, n_in, (2,), generator=gen)] *= large
    if dead is not None:
        x[:, dead] = 0
    return x


def _hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 x^T x / n``: integers divided by a power of two, exact in float32."""
    return 2 * x.T @ x / x.shape[0]


def gptq_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Layers at 2-4 bits, per row and grouped, with lazy blocks that split groups, a dead input."""
    cases = [(8, 32, 0, 3, 128, None), (6, 48, 8, 3, 5, None), (5, 64, 16, 4, 128, 7), (4, 24, 0, 2, 7, None),
             (12, 64, 32, 3, 16, None)]
    n_in = 16 * _int(gen, 1, 5)
    cases.append((_int(gen, 2, 10), n_in, 16, _int(gen, 2, 5), _int(gen, 3, 40), None))
    out = {"n_cases": np.array(len(cases))}
    for i, (rows, n_in, group, bits, block, dead) in enumerate(cases):
        H = _hessian(_inputs(gen, n_in, dead))
        out.update({f"w{i}": _np(randn(rows, n_in, generator=gen)), f"H{i}": _np(H), f"group{i}": np.array(group),
                    f"bits{i}": np.array(bits), f"block{i}": np.array(block), f"percdamp{i}": np.array(0.01)})
    return out


def gptq_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_cases"])):
        g, bits = int(inputs[f"group{i}"]), int(inputs[f"bits{i}"])
        w, H = torch.from_numpy(inputs[f"w{i}"]), torch.from_numpy(inputs[f"H{i}"])
        ref = gptq_quantize_weight(w.double(), H.double(), bits, None if g == 0 else g,
                                   percdamp=float(inputs[f"percdamp{i}"])).weight
        out[f"w_hat{i}"] = _np(ref)
        out[f"error{i}"] = np.array(output_error(w, ref, H))
        out[f"rtn_error{i}"] = np.array(output_error(w, rtn_weight(w, bits, None if g == 0 else g), H))
    return out


def gptq_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        g, bits, w, H = int(inputs[f"group{i}"]), int(inputs[f"bits{i}"]), inputs[f"w{i}"], inputs[f"H{i}"]
        what = (f"case {i} ({w.shape[0]}x{w.shape[1]}, {bits} bits, {'per row' if g == 0 else f'groups of {g}'}, "
                f"lazy blocks of {int(inputs[f'block{i}'])})")
        got = v._answer(f"w_hat{i}", expected[f"w_hat{i}"], f"{what}: gptq_weight")
        if got is None:
            continue
        if not np.all(np.isfinite(got)):
            v.fail(f"w_hat{i}", f"{what}: not finite")
            continue
        want = expected[f"w_hat{i}"]
        agree = float(np.mean(np.isclose(got, want, rtol=1e-4, atol=1e-6)))
        v.true(f"w_hat{i}", agree >= 0.9, f"{what}: only {agree:.0%} of the weights agree with the reference")
        err = output_error(torch.from_numpy(w), torch.from_numpy(got.astype(np.float32)), torch.from_numpy(H))
        ref, rtn = float(expected[f"error{i}"]), float(expected[f"rtn_error{i}"])
        v.true(f"w_hat{i}", err <= 1.02 * ref + 1e-9 * rtn,
               f"{what}: output error {err:.4g}, the reference's {ref:.4g} (RTN's {rtn:.4g})")
        dead = np.diag(H) == 0
        if dead.any():
            v.true(f"w_hat{i}", bool(np.all(got[:, dead] == 0)), f"{what}: a dead input's weights must be 0")


# ----------------------------------------------------------------------------- Exercise 4: AWQ
def awq_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Layers with outlier input channels (and a dead one) for the search; norms and linears to fold into."""
    cases = [(8, 64, 32, 3, 10, None), (6, 32, 0, 4, 8, 5), (10, 48, 16, 3, 5, None)]
    n_in = 16 * _int(gen, 2, 5)
    cases.append((_int(gen, 4, 12), n_in, 16, _int(gen, 3, 5), _int(gen, 4, 12), None))
    out = {"n_cases": np.array(len(cases))}
    for i, (rows, n_in, group, bits, n_grid, dead) in enumerate(cases):
        x = _inputs(gen, n_in, dead, large=16)                          # two outlier channels
        H, act = _hessian(x), x.abs().sum(0) / x.shape[0]               # exact: sums of integers / 64
        out.update({f"w{i}": _np(randn(rows, n_in, generator=gen)), f"H{i}": _np(H), f"act{i}": _np(act),
                    f"group{i}": np.array(group), f"bits{i}": np.array(bits), f"grid{i}": np.array(n_grid)})
    folds = [("norm", 6, [4, 3]), ("linear", 5, [3]), ("linear", 8, [2, 5])]
    out["n_folds"] = np.array(len(folds))
    for i, (kind, width, outs) in enumerate(folds):
        prev_w = randn(width, generator=gen) if kind == "norm" else randn(width, _int(gen, 2, 7), generator=gen)
        out.update({f"in_prev_w{i}": _np(prev_w), f"in_prev_b{i}": _np(randn(width, generator=gen)),
                    f"fold_s{i}": _np(randn(width, generator=gen).abs() + 0.25), f"n_next{i}": np.array(len(outs))})
        for j, o in enumerate(outs):
            out[f"in_next_w{i}_{j}"] = _np(randn(o, width, generator=gen))
    return out


def awq_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_cases"])):
        g, act = int(inputs[f"group{i}"]), torch.from_numpy(inputs[f"act{i}"])
        out[f"s_half{i}"] = _np(awq_scales(act, 0.5))
        s, alpha, errors = search_scale(torch.from_numpy(inputs[f"w{i}"]), act, torch.from_numpy(inputs[f"H{i}"]),
                                        int(inputs[f"bits{i}"]), None if g == 0 else g, True, int(inputs[f"grid{i}"]))
        out[f"s{i}"], out[f"alpha{i}"], out[f"errors{i}"] = _np(s), np.array(alpha), np.array(errors)
    for i in range(int(inputs["n_folds"])):
        s = torch.from_numpy(inputs[f"fold_s{i}"])
        prev_w = torch.from_numpy(inputs[f"in_prev_w{i}"])
        out[f"prev_w{i}"] = _np(prev_w / (s[:, None] if prev_w.ndim == 2 else s))
        out[f"prev_b{i}"] = _np(torch.from_numpy(inputs[f"in_prev_b{i}"]) / s)
        for j in range(int(inputs[f"n_next{i}"])):
            out[f"next_w{i}_{j}"] = _np(torch.from_numpy(inputs[f"in_next_w{i}_{j}"]) * s[None, :])
    return out


def awq_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_cases"])):
        w, n_grid = inputs[f"w{i}"], int(inputs[f"grid{i}"])
        what = f"case {i} ({w.shape[0]}x{w.shape[1]}, {int(inputs[f'bits{i}'])} bits, {n_grid} alphas)"
        v.close(f"s_half{i}", expected[f"s_half{i}"], f"{what}: awq_scales(act_mean, 0.5)", rtol=1e-5)
        v.close(f"errors{i}", expected[f"errors{i}"], f"{what}: the error of each alpha", rtol=5e-3)
        alpha, errors = answers.get(f"alpha{i}"), answers.get(f"errors{i}")
        if alpha is None or alpha.size != 1 or errors is None or errors.shape != (n_grid,):
            v.fail(f"alpha{i}", f"{what}: no alpha, or not one error per alpha")
            continue
        alpha = float(alpha.reshape(()))
        k = round(alpha * n_grid)
        best = float(np.min(expected[f"errors{i}"]))
        v.true(f"alpha{i}", abs(alpha - k / n_grid) < 1e-9 and 0 <= k < n_grid
               and float(expected[f"errors{i}"][k]) <= best * (1 + 1e-3),
               f"{what}: alpha {alpha:g} is not the best of k / {n_grid} (expected {float(expected[f'alpha{i}']):g})")
        want_s = awq_scales(torch.from_numpy(inputs[f"act{i}"]), alpha)
        v.close(f"s{i}", _np(want_s), f"{what}: the scales of the chosen alpha", rtol=1e-5)
    for i in range(int(inputs["n_folds"])):
        kind = "a norm" if inputs[f"in_prev_w{i}"].ndim == 1 else "a linear layer"
        v.close(f"prev_w{i}", expected[f"prev_w{i}"], f"fold {i} into {kind}: its weight", rtol=1e-6)
        v.close(f"prev_b{i}", expected[f"prev_b{i}"], f"fold {i} into {kind}: its bias", rtol=1e-6)
        for j in range(int(inputs[f"n_next{i}"])):
            v.close(f"next_w{i}_{j}", expected[f"next_w{i}_{j}"], f"fold {i}: the next layer {j}'s weight", rtol=1e-6)


# ----------------------------------------------------------------------------- Exercise 5: the table
def _storage(shapes, bits: int, group: int, symmetric: bool, float_params: int) -> float:
    """Bytes, in integers of bits: codes + a 16-bit scale (and a bits-wide zero point) per group + 16-bit floats."""
    total = 16 * float_params
    for out_f, in_f in shapes:
        groups = 1 if group == 0 else in_f // group
        total += out_f * in_f * bits + out_f * groups * (16 + (0 if symmetric else bits))
    return total / 8


SMOLLM2_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def table_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Storage of SmolLM2's linears and of small layer lists; paired NLL differences on blocks."""
    sizes = [(SMOLLM2_BLOCK * 30, 4, 64, True, 28_346_688), (SMOLLM2_BLOCK * 30, 3, 0, True, 28_346_688),
             ([(4, 8)], 2, 4, False, 0), ([(3, 6), (5, 12)], 5, 3, False, 17)]
    out = {"n_sizes": np.array(len(sizes))}
    for i, (shapes, bits, group, sym, fp) in enumerate(sizes):
        out.update({f"shapes{i}": np.array(shapes, dtype=np.int64), f"bits{i}": np.array(bits),
                    f"group{i}": np.array(group), f"symmetric{i}": np.array(sym), f"float_params{i}": np.array(fp)})
    pairs = [[3, 3, 3], [511] * 16, [1] * 9]
    pairs.append(torch.randint(1, 50, (_int(gen, 2, 12),), generator=gen).tolist())
    out["n_pairs"] = np.array(len(pairs))
    for i, blocks in enumerate(pairs):
        n = sum(blocks)
        a = randn(n, generator=gen).double().abs() * 2 + 1
        b = a + randn(n, generator=gen).double() * 0.1 + 0.05
        out.update({f"a{i}": _np(a), f"b{i}": _np(b), f"sizes{i}": np.array(blocks, dtype=np.int64)})
    return out


def table_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for i in range(int(inputs["n_sizes"])):
        shapes = [tuple(int(x) for x in row) for row in inputs[f"shapes{i}"]]
        out[f"bytes{i}"] = np.array(_storage(shapes, int(inputs[f"bits{i}"]), int(inputs[f"group{i}"]),
                                             bool(inputs[f"symmetric{i}"]), int(inputs[f"float_params{i}"])))
    for i in range(int(inputs["n_pairs"])):
        sizes = [int(x) for x in inputs[f"sizes{i}"]]
        d = (torch.from_numpy(inputs[f"a{i}"]) - torch.from_numpy(inputs[f"b{i}"])).split(sizes)
        diff, se = block_mean(torch.stack([x.sum() for x in d]), torch.tensor(sizes))
        out[f"diff{i}"], out[f"se{i}"] = np.array(diff), np.array(se)
    return out


def table_judge(v: Verdict, inputs, expected, answers) -> None:
    for i in range(int(inputs["n_sizes"])):
        g = int(inputs[f"group{i}"])
        what = (f"storage_bytes of {len(inputs[f'shapes{i}'])} layers, {int(inputs[f'bits{i}'])} bits, "
                f"{'per row' if g == 0 else f'groups of {g}'}, "
                f"{'symmetric' if bool(inputs[f'symmetric{i}']) else 'asymmetric'}, "
                f"{int(inputs[f'float_params{i}'])} float parameters")
        v.close(f"bytes{i}", expected[f"bytes{i}"], what, rtol=1e-12)
    for i in range(int(inputs["n_pairs"])):
        what = f"paired_difference on {len(inputs[f'sizes{i}'])} blocks"
        v.close(f"diff{i}", expected[f"diff{i}"], f"{what}: the difference", rtol=1e-9, atol=1e-12)
        v.close(f"se{i}", expected[f"se{i}"], f"{what}: its standard error", rtol=1e-8)


HIDDEN_TESTS = [
    HiddenTest("ex1_perplexity_tests", "perplexity", perplexity_inputs, perplexity_expected, perplexity_judge),
    HiddenTest("ex2_rtn_tests", "rtn", rtn_inputs, rtn_expected, rtn_judge),
    HiddenTest("ex3_gptq_tests", "gptq", gptq_inputs, gptq_expected, gptq_judge),
    HiddenTest("ex4_awq_tests", "awq", awq_inputs, awq_expected, awq_judge),
    HiddenTest("ex5_table_tests", "table", table_inputs, table_expected, table_judge),
]


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir``: each test's inputs for the lab's
    seed and the expected values on them."""
    write_hidden_references(out_dir, HIDDEN_TESTS, SEED)


if __name__ == "__main__":
    generator_main(make, LAB)
