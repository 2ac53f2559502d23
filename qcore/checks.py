"""Student self-checks: what the labs' test cells call. Plain Python, no nbgrader needed.

A check passes quietly with one line ("✓ ..."), or fails with an ``AssertionError`` whose
message says what was expected, what came, and a hint. Inside ``exercise(...)`` an unfinished
function (``NotImplementedError``) is reported kindly instead of as a traceback.

The hidden tests' in-kernel half (``qcore.asking.ask``) builds on ``reference`` (a lab's committed
inputs, read outside grading) and ``forbid`` (the student's function must not delegate to the
library it reimplements); a lab written with plain in-kernel hidden tests may call them directly.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import torch

# Default tolerances per dtype: a few units in the last place of that dtype.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-3, 1e-5), torch.bfloat16: (1e-2, 1e-5),
}


class CheckFailed(AssertionError):
    """A self-check failed; the message is meant for the student."""


class TamperingDetected(RuntimeError):
    """The checking machinery was replaced or patched: this exercise scores 0."""


_CHECK_NAMES = ("check_equal", "check_close", "check_true", "exercise", "reference", "forbid", "guard")


def guard() -> None:
    """Fail when the functions the checks rely on were redefined or monkeypatched.

    Looks at: this module's functions (against a fresh compile of its own source), the copies
    the notebook imported, ``torch.equal/allclose/isclose`` (must still be torch's built-ins) and
    ``numpy.testing``'s assertions. Called by ``exercise`` and ``reference``, so every graded
    cell runs it. It catches the usual ways to fake a pass; code in the same process can always
    go further, which is why hidden tests also compare on inputs made at grading time.

    Example:
        >>> guard()   # nothing patched: silent
    """
    import inspect
    import types

    import numpy.testing
    from numpy.testing._private import utils as np_utils

    bad = []
    for name in ("equal", "allclose", "isclose"):
        if not isinstance(getattr(torch, name), types.BuiltinFunctionType):
            bad.append(f"torch.{name}")
    for name in ("assert_array_equal", "assert_allclose", "assert_equal", "assert_array_almost_equal"):
        fn = getattr(numpy.testing, name)
        if fn is not getattr(np_utils, name) or getattr(fn, "__code__", None) is None \
                or fn.__code__.co_filename != np_utils.__file__:
            bad.append(f"numpy.testing.{name}")
    fresh: dict = {"__name__": "qcore._checks_pristine"}
    exec(compile(Path(__file__).read_text(), __file__, "exec"), fresh)  # noqa: S102 - our own source
    this = sys.modules[__name__]
    for name, obj in fresh.items():
        if inspect.isfunction(obj) and obj.__module__ == "qcore._checks_pristine":
            current = getattr(this, name, None)
            if getattr(current, "__code__", None) != obj.__code__:
                bad.append(f"qcore.checks.{name}")
    notebook = vars(sys.modules["__main__"])
    for name in _CHECK_NAMES:
        if name in notebook and notebook[name] is not getattr(this, name) and callable(notebook[name]) \
                and getattr(notebook[name], "__module__", "") in (__name__, "__main__"):
            bad.append(f"{name} (notebook)")
    if bad:
        raise TamperingDetected("the checking functions were replaced or patched: " + ", ".join(sorted(set(bad))))


def _fail(name: str, expected, got, hint: str) -> None:
    msg = f"✗ {name}\n  expected: {expected}\n  got:      {got}"
    if hint:
        msg += f"\n  hint: {hint}"
    raise CheckFailed(msg)


def _show(x, limit: int = 6) -> str:
    if isinstance(x, torch.Tensor):
        flat = x.detach().flatten().tolist()
        body = ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in flat[:limit])
        more = ", ..." if len(flat) > limit else ""
        return f"tensor([{body}{more}], shape={tuple(x.shape)}, dtype={x.dtype})"
    return repr(x)


def _ok(name: str) -> None:
    print(f"✓ {name}")


def check_equal(got, expected, name: str, hint: str = "") -> None:
    """Exact equality (integer codes, bit fields, tuples, shapes).

    Example:
        >>> check_equal((0, 127, 0), (0, 127, 0), "fields of 1.0")
        ✓ fields of 1.0
        >>> check_equal(3, 4, "answer", hint="count again")
        Traceback (most recent call last):
        ...
        qcore.checks.CheckFailed: ✗ answer
          expected: 4
          got:      3
          hint: count again
    """
    if isinstance(expected, torch.Tensor) or isinstance(got, torch.Tensor):
        got_t, exp_t = torch.as_tensor(got), torch.as_tensor(expected)
        if got_t.shape != exp_t.shape:
            _fail(f"{name} (shape)", tuple(exp_t.shape), tuple(got_t.shape), hint)
        if not torch.equal(got_t.to(exp_t.dtype), exp_t):
            bad = (got_t.to(exp_t.dtype) != exp_t).nonzero()[0].tolist()
            _fail(f"{name} (first difference at index {bad})", _show(exp_t), _show(got_t), hint)
    elif got != expected:
        _fail(name, _show(expected), _show(got), hint)
    _ok(name)


def check_close(got, expected, name: str, hint: str = "", atol: float | None = None,
                rtol: float | None = None) -> None:
    """Closeness within a tolerance chosen from the expected dtype (or given), NaN equal NaN.

    Example:
        >>> check_close(torch.tensor([0.1 + 1e-9]), torch.tensor([0.1]), "scale")
        ✓ scale
    """
    exp_t = torch.as_tensor(expected)
    got_t = torch.as_tensor(got)
    if got_t.shape != exp_t.shape:
        _fail(f"{name} (shape)", tuple(exp_t.shape), tuple(got_t.shape), hint)
    dtype = exp_t.dtype if exp_t.is_floating_point() else torch.float64
    default_rtol, default_atol = TOLERANCES.get(dtype, (1e-6, 1e-6))
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    g, e = got_t.double(), exp_t.double()
    close = torch.isclose(g, e, rtol=rtol, atol=atol, equal_nan=True)
    if not bool(close.all()):
        idx = (~close).nonzero()[0].tolist()
        _fail(f"{name} (first difference at index {idx}, rtol={rtol:g}, atol={atol:g})",
              _show(exp_t), _show(got_t), hint)
    _ok(name)


def check_true(condition: bool, name: str, hint: str = "") -> None:
    """A condition that must hold (a bound, a property).

    Example:
        >>> check_true(0.01 <= 0.5 * 0.04, "error within half a step")
        ✓ error within half a step
    """
    if not condition:
        _fail(name, True, False, hint)
    _ok(name)


@contextlib.contextmanager
def exercise(title: str):
    """Run an exercise's checks; an unfinished function gives a kind message, not a traceback.

    Example:
        >>> with exercise("Exercise 0"):
        ...     raise NotImplementedError
        Traceback (most recent call last):
        ...
        qcore.checks.CheckFailed: Exercise 0: not done yet - replace `raise NotImplementedError()` with your code.
    """
    guard()
    try:
        yield
    except NotImplementedError:
        raise CheckFailed(f"{title}: not done yet - replace `raise NotImplementedError()` "
                          "with your code.") from None
    print(f"{title}: all visible checks passed")


# ----------------------------------------------------------------------------- hidden tests
def reference_dir() -> Path:
    """Where reference outputs live: ``$QCOURSE_REFERENCE_DIR``, else ``course/reference``."""
    env = os.environ.get("QCOURSE_REFERENCE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "course" / "reference"


def reference(lab: str, name: str) -> dict[str, np.ndarray]:
    """The arrays of ``<reference_dir>/<lab>/<name>.npz`` (inputs and expected outputs)."""
    guard()
    file = reference_dir() / lab / f"{name}.npz"
    if not file.is_file():
        raise FileNotFoundError(f"reference output {file} is missing (set QCOURSE_REFERENCE_DIR "
                                "or run `qcourse references`)")
    with np.load(file, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


class Forbidden(RuntimeError):
    """Raised by a function that a submission must not call for this exercise."""


def _resolve(dotted: str):
    module_name, _, attr = dotted.rpartition(".")
    while True:
        try:
            return importlib.import_module(module_name), attr
        except ModuleNotFoundError:
            module_name, _, outer = module_name.rpartition(".")
            if not module_name:
                raise
            attr = f"{outer}.{attr}"


@contextlib.contextmanager
def forbid(*names: str):
    """Patch each dotted name (``"qcore.formats.decompose"``, ``"torch.Tensor.bfloat16"``) to raise.

    Inside the block, a student function that merely calls the library it should reimplement
    fails with ``Forbidden``; names the notebook imported directly (``from qcore.formats
    import decompose``) are patched too. Everything is restored on exit.

    Example:
        >>> import math
        >>> with forbid("math.sqrt"):
        ...     math.sqrt(4.0)
        Traceback (most recent call last):
        ...
        qcore.checks.Forbidden: this exercise must not call math.sqrt
        >>> math.sqrt(4.0)
        2.0
    """
    saved = []
    try:
        for dotted in names:
            owner, attr = _resolve(dotted)
            *path, last = attr.split(".")
            for part in path:
                owner = getattr(owner, part)

            def blocked(*_a, _n=dotted, **_k):
                raise Forbidden(f"this exercise must not call {_n}")

            original = getattr(owner, last)
            saved.append((owner, last, owner.__dict__.get(last, original)))
            setattr(owner, last, blocked)
            notebook = vars(sys.modules["__main__"])
            for key, value in list(notebook.items()):
                if value is original:
                    saved.append((notebook, key, value))
                    notebook[key] = blocked
        yield
    finally:
        for owner, last, original in reversed(saved):
            if isinstance(owner, dict):
                owner[last] = original
            else:
                setattr(owner, last, original)
