"""The in-box half of a hidden test: call the student's function, send its answers out as data.

A hidden test is split in two. Inside the student's kernel it only *asks*: ``ask`` hands the
student's function the inputs the grader made for this submission and records what came back
as plain arrays (a tensor subclass that answers "equal" to everything does not survive the
crossing). The *judging* (expected values, comparisons, points) runs in the grader's own
process (``qcourse.judge``), which student code cannot reach. Nothing printed here decides a
grade.

While an ``ask`` block runs, the library functions the exercise must not call are blocked
however the student's code reaches them: a Python function's code object is swapped for one
that raises (so an alias, a default argument, a closure or a stored attribute hits it too), a
torch function is refused by a torch function mode, and every other name (C functions of
``math`` and ``numpy``) is patched where it lives and where the notebook imported it.

Example:
    >>> import torch
    >>> with ask("lab00", "ex1", inputs={"x": np.arange(3.0)}, forbid=("qcore.quant.quantize",)) as q:
    ...     q.answer("y", torch.as_tensor(q.inputs["x"]) * 2)
    >>> ANSWERS["ex1"]["y"].tolist()
    [0.0, 2.0, 4.0]
"""
from __future__ import annotations

import base64
import contextlib
import io
import sys
import types

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from qcore.checks import Forbidden, _resolve as _module_and_attr, forbid as forbid_names, reference

MIME = "application/vnd.qcourse.answers+json"  # the output that carries a cell's answers
ANSWERS: dict[str, dict[str, np.ndarray]] = {}  # the last answers of each grade id in this process
PLAIN_KINDS = "biufc"  # bool, int, unsigned, float, complex: no objects, no strings of bytes


# ----------------------------------------------------------------------------- plain data
def pack(arrays: dict[str, np.ndarray]) -> str:
    """Arrays as text: a compressed ``.npz``, base64 (no pickle either way).

    >>> unpack(pack({"a": np.arange(3)}))["a"].tolist()
    [0, 1, 2]
    """
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def unpack(text: str) -> dict[str, np.ndarray]:
    """The arrays of :func:`pack`'s text; refuses object arrays (``allow_pickle=False``)."""
    with np.load(io.BytesIO(base64.b64decode(text.encode("ascii"), validate=True)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def plain(value) -> np.ndarray:
    """A base ``numpy.ndarray`` copy of an answer, whatever subclass or wrapper it came in.

    Tensors are read through torch's own methods with every ``__torch_function__`` override off;
    bfloat16 and float8 become float32 (exactly). Python numbers go through their base type.

    >>> class Liar(torch.Tensor):
    ...     def __eq__(self, other): return True
    >>> a = plain(torch.tensor([1.5, 2.0]).as_subclass(Liar))
    >>> type(a).__name__, a.tolist()
    ('ndarray', [1.5, 2.0])
    >>> plain(True).dtype, plain(3).tolist()
    (dtype('bool'), 3)
    """
    if isinstance(value, torch.Tensor):
        with torch._C.DisableTorchFunction():
            t = torch.Tensor.detach(value)
            t = torch.Tensor.cpu(t)
            if t.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2) or t.dtype.itemsize == 1 \
                    and t.is_floating_point():
                t = torch.Tensor.float(t)
            out = torch.Tensor.numpy(torch.Tensor.contiguous(torch.Tensor.clone(t)))
        out = np.array(out, copy=True, subok=False)
    elif isinstance(value, np.ndarray) or isinstance(value, np.generic):
        out = np.array(value, copy=True, subok=False)
    elif isinstance(value, bool):
        out = np.array(bool.__bool__(value))
    elif isinstance(value, int):
        out = np.array(int.__int__(value))
    elif isinstance(value, float):
        out = np.array(float.__float__(value))
    else:
        raise TypeError(f"an answer must be a tensor, an array or a number, not {type(value).__name__}")
    if out.dtype.kind not in PLAIN_KINDS:
        raise TypeError(f"an answer must hold numbers, not {out.dtype}")
    return out


# ----------------------------------------------------------------------------- blocking
def _raiser_code(dotted: str) -> types.CodeType:
    """A code object that takes any arguments and raises ``Forbidden``; it looks nothing up in
    the globals of the function it is put on, only ``__import__`` in the builtins."""
    source = (f"def blocked(*args, **kwargs):\n"
              f"    raise __import__('qcore.checks', fromlist=['Forbidden']).Forbidden(\n"
              f"        {f'this exercise must not call {dotted}'!r})\n")
    module = compile(source, "<qcore.asking>", "exec")
    return next(c for c in module.co_consts if isinstance(c, types.CodeType))


def _python_functions(obj) -> list[types.FunctionType]:
    """The Python function objects behind a dotted name: the function, or a class's methods and
    properties (so that its instances are blocked too). Functions with free variables cannot take
    another code object and are left to the name patch."""
    if isinstance(obj, types.FunctionType):
        found = [obj]
    elif isinstance(obj, type):
        found = []
        for attr in vars(obj).values():
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if isinstance(attr, property):
                found += [f for f in (attr.fget, attr.fset) if isinstance(f, types.FunctionType)]
            elif isinstance(attr, types.FunctionType):
                found.append(attr)
    else:
        found = []
    return [f for f in found if not f.__code__.co_freevars]


def _resolve(dotted: str):
    """The object a dotted name stands for (``torch.Tensor.bfloat16``)."""
    owner, attr = _module_and_attr(dotted)
    for part in attr.split("."):
        owner = getattr(owner, part)
    return owner


class _RefuseTorch(TorchFunctionMode):
    """Refuses the torch functions of an exercise's list, however the student's code got hold of them."""

    def __init__(self, refused: dict[object, str]):
        super().__init__()
        self.refused = refused

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        name = self.refused.get(func)
        if name is not None:
            raise Forbidden(f"this exercise must not call {name}")
        return func(*args, **(kwargs or {}))


class NoCastTo(TorchFunctionMode):
    """Refuses any torch call that makes ``dtype`` out of other float data (viewing bits is fine):
    the cast an exercise asks the student to write by hand.

    >>> with NoCastTo(torch.bfloat16):
    ...     torch.tensor([1.0]).to(torch.bfloat16)
    Traceback (most recent call last):
    ...
    qcore.checks.Forbidden: this exercise must round by hand, not cast to torch.bfloat16
    """

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def _has_floats(self, v) -> bool:
        if isinstance(v, torch.Tensor):
            return v.is_floating_point() and v.dtype != self.dtype
        if isinstance(v, np.ndarray):
            return v.dtype.kind == "f"
        if isinstance(v, (list, tuple)):
            return any(isinstance(a, float) or self._has_floats(a) for a in v)
        return False

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (func is not torch.Tensor.view and isinstance(out, torch.Tensor) and out.dtype == self.dtype
                and any(self._has_floats(a) for a in (*args, *kwargs.values()))):
            raise Forbidden(f"this exercise must round by hand, not cast to {self.dtype}")
        return out


def _torch_refusable(obj) -> bool:
    """A torch function or method: its calls pass through torch function modes (a class does not)."""
    if isinstance(obj, type):
        return False
    return getattr(obj, "__module__", None) in ("torch", "torch.functional") or isinstance(
        obj, (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType)) \
        and "torch" in repr(obj)


def blocked_by_object(dotted: str) -> bool:
    """True when :func:`blocked` stops ``dotted`` however the student's code holds it; False for C
    functions and classes outside torch, which only their names block (``qcourse.codecheck``
    looks for them held early).

    >>> blocked_by_object("qcore.formats.decompose"), blocked_by_object("torch.frexp"), blocked_by_object("math.frexp")
    (True, True, False)
    """
    obj = _resolve(dotted)
    return bool(_python_functions(obj)) or _torch_refusable(obj)


def _installed(dotted: str) -> bool:
    """Whether the top-level package of ``dotted`` can be imported here (what is not installed
    cannot be called either: a list may name optional libraries such as scipy or pandas)."""
    import importlib.util

    return importlib.util.find_spec(dotted.split(".")[0]) is not None


class _RefuseImport:
    """A ``sys.meta_path`` finder that refuses to import the packages it holds (package: a
    forbidden function in it). Blocking a function of a package nothing has imported yet would
    mean importing it first (scipy: half a second of every kernel's time); refusing its import
    while the test asks stops the student's code reaching it just as well."""

    def __init__(self, packages: dict[str, str]):
        self.packages = packages

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in self.packages:
            raise Forbidden(f"this exercise must not call {self.packages[top]} (nor import {top})")
        return None


@contextlib.contextmanager
def blocked(names: tuple[str, ...]):
    """Inside the block, every function in ``names`` raises ``Forbidden`` however it is reached
    (names of libraries that are not installed are left out; a package not imported yet cannot
    be imported inside the block).

    >>> import sys; _ = sys.modules.pop("colorsys", None)
    >>> with blocked(("colorsys.rgb_to_hsv",)):
    ...     import colorsys
    Traceback (most recent call last):
    ...
    qcore.checks.Forbidden: this exercise must not call colorsys.rgb_to_hsv (nor import colorsys)
    """
    names = tuple(d for d in names if _installed(d))
    unloaded = {d.partition(".")[0]: d for d in names if d.partition(".")[0] not in sys.modules}
    names = tuple(d for d in names if d.partition(".")[0] not in unloaded)
    swapped, refused = [], {}
    for dotted in names:
        obj = _resolve(dotted)
        for fn in _python_functions(obj):
            swapped.append((fn, fn.__code__))
        if _torch_refusable(obj):
            refused[obj] = dotted
    with contextlib.ExitStack() as stack:
        stack.enter_context(forbid_names(*names))  # the names, as before: C functions of math, numpy
        if unloaded:
            finder = _RefuseImport(unloaded)
            sys.meta_path.insert(0, finder)
            stack.callback(sys.meta_path.remove, finder)
        try:
            for fn, _ in swapped:
                fn.__code__ = _raiser_code(f"{fn.__module__}.{fn.__qualname__}")
            if refused:
                stack.enter_context(_RefuseTorch(refused))
            yield
        finally:
            for fn, code in swapped:
                fn.__code__ = code


# ----------------------------------------------------------------------------- asking
class Ask:
    """One hidden test's questions: ``inputs`` (the grader's arrays) and the answers recorded."""

    def __init__(self, lab: str, grade_id: str, inputs: dict[str, np.ndarray]):
        self.lab, self.grade_id, self.inputs = lab, grade_id, inputs
        self.answers: dict[str, np.ndarray] = {}

    def answer(self, key: str, value) -> None:
        """Record an answer: a tensor, array or number, or a tuple/list of them (``key/0``, ``key/1``...)."""
        if isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                self.answer(f"{key}/{i}", v)
            return
        self.answers[key] = plain(value)


def _send(lab: str, grade_id: str, answers: dict[str, np.ndarray]) -> None:
    """Put the answers in the cell's outputs, where the grader reads them (in a kernel only)."""
    shell = sys.modules.get("IPython")
    shell = shell.get_ipython() if shell is not None else None
    if shell is None or not hasattr(shell, "display_pub"):
        return
    from IPython.display import publish_display_data

    publish_display_data({MIME: {"lab": lab, "grade_id": grade_id, "answers": pack(answers)},
                          "text/plain": f"(answers of {grade_id} for the grader)"})


@contextlib.contextmanager
def ask(lab: str, grade_id: str, file: str | None = None, inputs: dict | str | None = None,
        forbid: tuple[str, ...] = ()):
    """Ask the student's functions a hidden test's questions, with ``forbid``'s functions blocked.

    ``inputs``: the grader's arrays for this submission (as :func:`pack` text, which the grader
    writes into the hidden cell); without them, the lab's committed reference file ``file``
    (solutions, lab tests). The answers go to ``ANSWERS[grade_id]`` and, in a kernel given the
    grader's inputs, into the cell's outputs.
    """
    if isinstance(inputs, str):
        inputs = unpack(inputs)
        send = True
    else:
        send = False
        if inputs is None:
            if file is None:
                raise ValueError(f"{grade_id}: no inputs from the grader and no reference file named")
            inputs = reference(lab, file)
    q = Ask(lab, grade_id, dict(inputs))
    ANSWERS.pop(grade_id, None)
    with blocked(tuple(forbid)):
        yield q
    ANSWERS[grade_id] = dict(q.answers)
    if send:
        _send(lab, grade_id, q.answers)
