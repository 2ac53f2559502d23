"""The hidden tests of lab04_qat, judged outside the student's kernel.

Each test draws its inputs from a generator (the lab's ``SEED`` for the committed reference
files, a per-submission seed when grading: ``qcourse.judge``) and computes every expected value
with qcore's reference implementation (``qcore.quant.fake_quantize_ste``, ``qcore.qat``), never
with a student function, on small tensors (no model, no training). The stateful tests (a layer's
observer over a sequence of batches, a model prepared, observed, frozen and converted) replay
the same sequence on qcore's layer. Keys starting with ``visible_`` are the visible checks' own
cases.

    python course/refgen/lab04_qat.py course/reference/lab04_qat
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcourse.judge import HiddenTest, Verdict, write_hidden_references
from qcourse.refdata import generator_main, init_linears_, randn, to_numpy as _np
from qcore.qat import FakeQuantLinear, convert, freeze_observers, lsq_fake_quantize, prepare_qat
from qcore.quant import PerChannel, choose_qparams, fake_quantize_ste

LAB = "lab04_qat"
SEED = 20240504


# Results whose last bits may depend on the CPU (qcourse.refdata): outputs and gradients of
# linear layers (float32 roundings ~ the reduction length), the LSQ scale gradient (a sum over the
# weights) and a small model's output. STE values and masks, codes, scales and ranges are exact.
CPU_DEPENDENT = {
    "fake_linear": {"y*": 32, "grad_x*": 32, "grad_w*": 32,  # products of up to 12 terms
                    "visible_y*": 32, "visible_grad_x*": 32, "visible_grad_w": 32},
    "lsq": {"grad_scale*": 64, "visible_grad_scale": 64},  # a sum over up to 32 weights per scale
    "prepare_convert": {"y": 64},  # three layers with GELU and LayerNorm, 7 wide
}


def _tags(inputs: dict) -> list[str]:
    """The cases of a test: ``0 .. n_cases - 1``, then the visible checks' case."""
    return [str(i) for i in range(int(inputs["n_cases"]))] + ["visible"]


def _k(tag: str, name: str) -> str:
    """A case's key: ``x3`` for case 3, ``visible_x`` for the visible case (the ask writes the same)."""
    return f"visible_{name}" if tag == "visible" else f"{name}{tag}"


def _far_from_ties(x: torch.Tensor, *scales, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Nudge values whose ``x / scale`` (for any of ``scales``) lies within 1e-3 of a half-integer
    (``x * (1 / scale)`` could round the other way) until none is left, for any seed; shrinking
    ``|x|`` by 0.1 % never makes a new extreme. ``keep``: values left alone (a batch's min and max,
    which set its range). Exact ties are planted on purpose elsewhere.

    >>> x = _far_from_ties(torch.tensor([0.2501, 0.7, 1.2499]), torch.tensor(0.5))
    >>> [round(v, 5) for v in x.tolist()]  # 0.2501 / 0.5 = 0.5002 is nudged three times
    [0.24935, 0.7, 1.24865]
    """
    for _ in range(100):
        near = torch.zeros(x.shape, dtype=torch.bool)
        for scale in scales:
            r = x / scale
            near |= ((r - torch.floor(r)) - 0.5).abs() < 1e-3
        if keep is not None:
            near &= ~keep
        if not bool(near.any()):
            break
        x = torch.where(near, x * 0.999, x)
    return x


def _linear(weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    """An ``nn.Linear`` holding these parameters (built on the meta device: no random draws here)."""
    w = torch.from_numpy(np.array(weight))
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(w.clone())
    if bias is not None:
        lin.bias = nn.Parameter(torch.from_numpy(np.array(bias)).clone())
    return lin


# ----------------------------------------------------------------------------- exercise 1
def ste_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Per-tensor and per-row grids (symmetric and asymmetric, 2 to 8 bits), values beyond the grid
    on both sides, codes just inside and just outside the clamp, exact ties (power-of-two scales);
    the visible checks' first case."""
    cases = [((40,), "tensor", 8, False), ((5, 30), "tensor", 4, True), ((6, 20), "row", 3, True),
             ((4, 25), "row", 8, False), ((3, 4, 10), "tensor", 2, True), ((8, 16), "row", 4, False)]
    out = {"n_cases": np.array(len(cases))}
    for i, (shape, kind, bits, symmetric) in enumerate(cases):
        qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        if kind == "tensor":
            scale = torch.tensor(2.0 ** -int(torch.randint(2, 6, (), generator=gen)))
            zero_point = torch.tensor(0.0 if symmetric else float(torch.randint(1, qmax, (), generator=gen)))
        else:
            scale = (torch.rand(shape[0], 1, generator=gen) * 0.2 + 0.01)
            zero_point = torch.zeros(shape[0], 1) if symmetric else \
                torch.randint(0, qmax + 1, (shape[0], 1), generator=gen).float()
        # about a quarter of the values beyond the grid
        span = (qmax - qmin) * scale
        x = (torch.rand(*shape, generator=gen) * 1.5 - 0.25) * span + (qmin - zero_point) * scale
        x = _far_from_ties(x, scale)
        flat = x.reshape(-1)
        if kind == "tensor":  # exact ties, and codes just inside / just outside the clamp
            s, z = scale.item(), zero_point.item()
            flat[:6] = torch.tensor([0.5 * s, 2.5 * s, -1.5 * s, (qmax - z + 0.4) * s, (qmax - z + 0.6) * s,
                                     (qmin - z - 0.4) * s])
        out.update({f"x{i}": _np(x), f"scale{i}": _np(scale), f"zero_point{i}": _np(zero_point),
                    f"qmin{i}": np.array(qmin), f"qmax{i}": np.array(qmax),
                    f"grad_out{i}": _np(randn(*shape, generator=gen))})
    out.update(visible_x=np.array([-3.0, -0.26, 0.0, 0.3, 0.75, 1.1, 2.0], np.float32),
               visible_scale=np.array(0.5, np.float32), visible_zero_point=np.array(0.0, np.float32),
               visible_qmin=np.array(-2), visible_qmax=np.array(2),
               visible_grad_out=np.arange(1.0, 8.0, dtype=np.float32))
    return out


def ste_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for t in _tags(inputs):
        x = torch.from_numpy(inputs[_k(t, "x")]).clone().requires_grad_()
        y = fake_quantize_ste(x, torch.from_numpy(inputs[_k(t, "scale")]), torch.from_numpy(inputs[_k(t, "zero_point")]),
                              int(inputs[_k(t, "qmin")]), int(inputs[_k(t, "qmax")]))
        y.backward(torch.from_numpy(inputs[_k(t, "grad_out")]))
        out[_k(t, "y")], out[_k(t, "grad_x")] = _np(y), _np(x.grad)
    return out


def ste_judge(v: Verdict, inputs, expected, answers) -> None:
    for t in _tags(inputs):
        what = (f"{'the visible case' if t == 'visible' else f'case {t}'} (grid [{int(inputs[_k(t, 'qmin')])}, "
                f"{int(inputs[_k(t, 'qmax')])}], scale shape {inputs[_k(t, 'scale')].shape})")
        want = expected[_k(t, "y")]
        v.close(_k(t, "y"), want, f"{what}: output values", rtol=0, atol=1e-6 * (1 + float(np.abs(want).max())))
        if not v.answers.get(_k(t, "has_grad"), np.array(False)).item():
            v.fail(_k(t, "has_grad"), f"{what}: no gradient reached x")
            continue
        v.equal(_k(t, "grad_x"), expected[_k(t, "grad_x")], f"{what}: gradients")


# ----------------------------------------------------------------------------- exercise 2
def fake_linear_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Layers fed a sequence of batches (EMA updates, then frozen), with the gradients to push back.
    One square weight (a per-column scale would have the right shape), one layer whose inputs are
    all positive (zero-point 0), one with an all-zero row; values near a rounding tie nudged away
    (the activation grid of each batch replayed on qcore's layer). The visible checks' case:
    two observed batches, one frozen, one pushed back."""
    cases = [(6, 6, 4, 8, 0.1, 4, 3), (5, 12, 3, 8, 0.25, 5, 3), (8, 4, 2, 8, 0.01, 3, 2), (3, 7, 8, 4, 0.5, 4, 2)]
    out = {"n_cases": np.array(len(cases))}
    for i, (n_out, n_in, wb, ab, c, n_batches, freeze_at) in enumerate(cases):
        w = randn(n_out, n_in, generator=gen) * torch.rand(n_out, 1, generator=gen) * 2
        w[0, 1] = 5.0  # an outlier in row 0 (and in column 1)
        if i == 1:
            w[2] = 0.0
        qmax_w = 2 ** (wb - 1) - 1
        w = _far_from_ties(w, (w.abs().amax(dim=1, keepdim=True) / qmax_w).clamp(min=torch.finfo(torch.float32).eps))
        b = randn(n_out, generator=gen)
        out.update({f"weight{i}": _np(w), f"bias{i}": _np(b), f"weight_bits{i}": np.array(wb),
                    f"act_bits{i}": np.array(ab), f"c{i}": np.array(c), f"n_batches{i}": np.array(n_batches),
                    f"freeze_at{i}": np.array(freeze_at)})
        fq = FakeQuantLinear(_linear(_np(w), _np(b)), wb, ab, c)  # replays the ranges, to nudge ties away
        for j in range(n_batches):
            if j == freeze_at:
                fq.freeze_observer()
            shape = (3, n_in) if j % 2 == 0 else (2, 2, n_in)
            x = randn(*shape, generator=gen) * (1 + 2 * j)
            if i == 2:
                x = x.abs() + 0.5  # all positive: the range widens to 0
            if fq.observer_enabled:
                fq.observe(x)
            scale, _ = fq.act_qparams()
            x = _far_from_ties(x, scale, keep=(x == x.min()) | (x == x.max()))
            out.update({f"x{i}_{j}": _np(x), f"grad_out{i}_{j}": _np(randn(*shape[:-1], n_out, generator=gen))})
    # The visible checks: two observed batches (c = 0.5), one while frozen, one pushed back.
    out.update(visible_weight=np.array([[0.5, -7.0, 1.1], [2.0, 0.3, -0.6]], np.float32),
               visible_bias=np.array([10.0, -10.0], np.float32), visible_weight_bits=np.array(4),
               visible_act_bits=np.array(8), visible_c=np.array(0.5), visible_n_batches=np.array(4),
               visible_freeze_at=np.array(2))
    batches = [[[0.0, 2.0, -1.0], [4.0, 1.0, 0.5]], [[-3.0, 0.0, 8.0]], [[100.0, -100.0, 0.0]], [[0.2, -0.3, 0.5]]]
    for j, x in enumerate(batches):
        out[f"visible_x_{j}"] = np.array(x, np.float32)
        out[f"visible_grad_out_{j}"] = np.full((len(x), 2), 1.0 if j == 3 else 0.0, np.float32)
    return out


def fake_linear_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's FakeQuantLinear on the same sequence: weight scale, then after each batch the range,
    the input qparams, the output and the input gradient; at the end the count and the weight gradient."""
    out = {}
    for t in _tags(inputs):
        lin = _linear(inputs[_k(t, "weight")], inputs[_k(t, "bias")])
        fq = FakeQuantLinear(lin, int(inputs[_k(t, "weight_bits")]), int(inputs[_k(t, "act_bits")]),
                             float(inputs[_k(t, "c")]))
        out[_k(t, "weight_scale")] = _np(fq.weight_scale())
        for j in range(int(inputs[_k(t, "n_batches")])):
            if j == int(inputs[_k(t, "freeze_at")]):
                fq.freeze_observer()
            x = torch.from_numpy(inputs[_k(t, "x") + f"_{j}"]).clone().requires_grad_()
            y = fq(x)
            y.backward(torch.from_numpy(inputs[_k(t, "grad_out") + f"_{j}"]))
            scale, zp = fq.act_qparams()
            out.update({_k(t, "y") + f"_{j}": _np(y), _k(t, "grad_x") + f"_{j}": _np(x.grad),
                        _k(t, "range") + f"_{j}": _np(torch.stack(list(fq.input_observer.clip_range()))),
                        _k(t, "act_scale") + f"_{j}": np.float32(scale.item()),
                        _k(t, "act_zero_point") + f"_{j}": np.float32(zp.item())})
        out[_k(t, "num_batches")] = np.array(fq.num_batches)
        out[_k(t, "grad_w")] = _np(lin.weight.grad)
    return out


def fake_linear_judge(v: Verdict, inputs, expected, answers) -> None:
    for t in _tags(inputs):
        w = inputs[_k(t, "weight")]
        what = (f"{'the visible case' if t == 'visible' else f'case {t}'} (W{int(inputs[_k(t, 'weight_bits')])}"
                f"A{int(inputs[_k(t, 'act_bits')])}, weight {w.shape})")
        v.close(_k(t, "weight_scale"), expected[_k(t, "weight_scale")], f"{what}: weight scales [out, 1]", rtol=1e-6)
        for j in range(int(inputs[_k(t, "n_batches")])):
            at = f"{what}, batch {j}"
            key = lambda name: _k(t, name) + f"_{j}"  # noqa: E731
            v.close(key("range"), expected[key("range")], f"{at}: observed range [act_min, act_max]",
                    rtol=1e-6, atol=1e-7)
            v.close(key("act_scale"), expected[key("act_scale")], f"{at}: input scale", rtol=1e-6)
            v.equal(key("act_zero_point"), expected[key("act_zero_point")], f"{at}: zero-point")
            want = expected[key("y")]
            v.close(key("y"), want, f"{at}: outputs", rtol=1e-5, atol=1e-5 * (1 + float(np.abs(want).max())))
            v.close(key("grad_x"), expected[key("grad_x")], f"{at}: input gradient", rtol=1e-5, atol=1e-5)
        v.equal(_k(t, "num_batches"), expected[_k(t, "num_batches")],
                f"{what}: batches observed (none may be counted while frozen)")
        if not v.answers.get(_k(t, "has_grad_w"), np.array(False)).item():
            v.fail(_k(t, "has_grad_w"), f"{what}: no gradient reached the shared float weight (STE)")
        else:
            v.close(_k(t, "grad_w"), expected[_k(t, "grad_w")], f"{what}: weight gradient", rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- exercise 3
NAMES = ("0", "2.0.0", "4")  # the linear layers of convert_model, two of them nested
LEARNED = "2.0.0"  # the layer given a learned (smaller) scale


def convert_model(device: str | None = None) -> nn.Sequential:
    """Linear layers at "0", "2.0.0" (two levels down) and "4" (the ask builds the same)."""
    return nn.Sequential(nn.Linear(5, 7, device=device), nn.GELU(),
                         nn.Sequential(nn.Sequential(nn.Linear(7, 7, device=device)), nn.ReLU()),
                         nn.LayerNorm(7, device=device), nn.Linear(7, 3, device=device))


def _state(inputs: dict) -> dict[str, torch.Tensor]:
    return {k.removeprefix("state."): torch.from_numpy(np.array(a)) for k, a in inputs.items() if k.startswith("state.")}


def prepare_convert_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """A nested model's parameters (W3A8), batches to observe, a learned scale for one layer (0.6
    of max|w| / qmax: some codes clamp) and an input; weights near a rounding tie nudged away."""
    model = init_linears_(convert_model(), gen)
    bits = 3
    with torch.no_grad():
        for n in NAMES:
            w = model.get_submodule(n).weight
            scale = choose_qparams(w, bits, symmetric=True, granularity=PerChannel(0)).scale  # FakeQuantLinear's
            w.copy_(_far_from_ties(w, scale, scale * 0.6) if n == LEARNED else _far_from_ties(w, scale))
            if n == LEARNED:  # the row maxima stay: the scale is the same after the nudge
                lsq = choose_qparams(w, bits, symmetric=True, granularity=PerChannel(0)).scale * 0.6
    out = {f"state.{k}": _np(v) for k, v in model.state_dict().items()}
    out.update(weight_bits=np.array(bits), act_bits=np.array(8), n_batches=np.array(3))
    out.update({f"batch{j}": _np(randn(4, 5, generator=gen) * 2) for j in range(3)})
    out[f"lsq.{LEARNED}"] = _np(lsq)
    out["x"] = _np(randn(6, 5, generator=gen))
    return out


def prepare_convert_expected(inputs: dict) -> dict[str, np.ndarray]:
    """qcore's prepare_qat, observation, freezing, learned scale and convert on the same model:
    the fake-quantized output, each converted layer's codes and scale."""
    model = convert_model("meta")
    model.load_state_dict(_state(inputs), assign=True)
    q = prepare_qat(model.eval(), int(inputs["weight_bits"]), int(inputs["act_bits"]))
    with torch.no_grad():
        for j in range(int(inputs["n_batches"])):
            q(torch.from_numpy(inputs[f"batch{j}"]))
    freeze_observers(q)
    q.get_submodule(LEARNED).scale = nn.Parameter(torch.from_numpy(inputs[f"lsq.{LEARNED}"]).clone())
    with torch.no_grad():
        out = {"y": _np(q(torch.from_numpy(inputs["x"])))}
    c = convert(q)
    for n in NAMES:
        out[f"codes.{n}"] = c.get_submodule(n).codes().to(torch.int8).numpy()
        out[f"scale.{n}"] = _np(c.get_submodule(n).scale.reshape(-1, 1))
    return out


def prepare_convert_judge(v: Verdict, inputs, expected, answers) -> None:
    wb, ab = int(inputs["weight_bits"]), int(inputs["act_bits"])
    v.equal("original_is_linear", np.ones(len(NAMES), bool), "the original model must not change (prepare on a copy)")
    v.equal("prepared_is_fake_quant", np.ones(len(NAMES), bool),
            "every nn.Linear, at any depth, becomes a FakeQuantLinear")
    v.equal("prepared_bits", np.array([[wb, ab]] * len(NAMES)), "bits passed on (weight_bits, act_bits)")
    v.close("y_fake", expected["y"], "the prepared model's output differs", rtol=1e-5, atol=1e-6)
    v.equal("converted_is_quant_linear", np.ones(len(NAMES), bool), "every FakeQuantLinear becomes a QuantLinear")
    v.equal("prepared_kept", np.ones(len(NAMES), bool), "convert must work on a copy")
    for n in NAMES:
        codes = answers.get(f"codes.{n}")
        v.true(f"codes.{n}", codes is None or codes.dtype == np.int8, f"{n}: codes must be int8")
        v.equal(f"codes.{n}", expected[f"codes.{n}"], f"{n}: codes")
        v.close(f"scale.{n}", expected[f"scale.{n}"], f"{n}: scales", rtol=1e-6)
    fake = answers.get("y_fake")
    if fake is not None:
        v.equal("y_converted", fake, "the converted model must give exactly the fake-quantized outputs")
    v.close("y_converted", expected["y"], "the converted model's output differs", rtol=1e-5, atol=1e-6)
    for k, a in inputs.items():
        if k.startswith("state."):
            v.equal(f"after.{k}", a, "the float model changed")


# ----------------------------------------------------------------------------- exercise 4
def lsq_inputs(gen: torch.Generator) -> dict[str, np.ndarray]:
    """Per-row and per-tensor scales, 2 to 8 bits, scales small enough that part of each row is
    clipped; weights near a rounding tie nudged away. The visible checks' first case."""
    cases = [((6, 16), "row", 4), ((4, 9), "row", 2), ((5, 32), "tensor", 3), ((3, 8), "row", 8), ((24,), "tensor", 4)]
    out = {"n_cases": np.array(len(cases))}
    for i, (shape, kind, bits) in enumerate(cases):
        qmax = 2 ** (bits - 1) - 1
        w = randn(*shape, generator=gen)
        if kind == "row":
            shrink = (0.5 + 0.4 * torch.rand(shape[0], 1, generator=gen)) * qmax / (qmax + 0.5)  # each row's max clips
            scale = w.abs().amax(dim=1, keepdim=True) / qmax * shrink
        else:
            scale = w.abs().max() / qmax * torch.tensor(0.7)
        w = _far_from_ties(w, scale)
        out.update({f"w{i}": _np(w), f"scale{i}": _np(scale), f"bits{i}": np.array(bits),
                    f"grad_out{i}": _np(randn(*shape, generator=gen))})
    out.update(visible_w=np.array([[0.4, -1.0, 0.1, 3.0], [0.26, -0.5, 0.7, 0.0]], np.float32),
               visible_scale=np.array([[0.5], [0.25]], np.float32), visible_bits=np.array(3),
               visible_grad_out=np.ones((2, 4), np.float32))
    return out


def lsq_expected(inputs: dict) -> dict[str, np.ndarray]:
    out = {}
    for t in _tags(inputs):
        w = torch.from_numpy(inputs[_k(t, "w")]).clone().requires_grad_()
        s = torch.from_numpy(inputs[_k(t, "scale")]).clone().requires_grad_()
        y = lsq_fake_quantize(w, s, int(inputs[_k(t, "bits")]))
        y.backward(torch.from_numpy(inputs[_k(t, "grad_out")]))
        out.update({_k(t, "y"): _np(y), _k(t, "grad_w"): _np(w.grad), _k(t, "grad_scale"): _np(s.grad)})
    return out


def lsq_judge(v: Verdict, inputs, expected, answers) -> None:
    for t in _tags(inputs):
        what = (f"{'the visible case' if t == 'visible' else f'case {t}'} ({int(inputs[_k(t, 'bits')])} bits, "
                f"weight {inputs[_k(t, 'w')].shape}, scale {inputs[_k(t, 'scale')].shape})")
        v.close(_k(t, "y"), expected[_k(t, "y")], f"{what}: values", rtol=1e-6, atol=1e-7)
        if not v.answers.get(_k(t, "has_grad_w"), np.array(False)).item():
            v.fail(_k(t, "has_grad_w"), f"{what}: no gradient reached the weight")
        else:
            v.equal(_k(t, "grad_w"), expected[_k(t, "grad_w")], f"{what}: weight gradient")
        if not v.answers.get(_k(t, "has_grad_scale"), np.array(False)).item():
            v.fail(_k(t, "has_grad_scale"), f"{what}: no gradient reached the scale")
            continue
        want = expected[_k(t, "grad_scale")]
        v.close(_k(t, "grad_scale"), want, f"{what}: scale gradient (one per scale)", rtol=1e-4,
                atol=1e-6 * (1 + float(np.abs(want).max())))


HIDDEN_TESTS = [
    HiddenTest("ex1_ste_tests", "ste", ste_inputs, ste_expected, ste_judge),
    HiddenTest("ex2_fake_quant_linear_tests", "fake_linear", fake_linear_inputs, fake_linear_expected,
               fake_linear_judge),
    HiddenTest("ex3_prepare_convert_tests", "prepare_convert", prepare_convert_inputs, prepare_convert_expected,
               prepare_convert_judge),
    HiddenTest("ex4_lsq_tests", "lsq", lsq_inputs, lsq_expected, lsq_judge),
]


def make(out_dir: Path) -> None:
    """Write every reference file of the lab into ``out_dir``: each test's inputs for the lab's
    seed and the expected values on them."""
    write_hidden_references(out_dir, HIDDEN_TESTS, SEED)


if __name__ == "__main__":
    generator_main(make, LAB)
