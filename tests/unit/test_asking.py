"""qcore.asking: answers cross as plain numbers, and forbidden functions are blocked however bound."""
import math

import numpy as np
import pytest
import torch

import qcore.formats as qf
from qcore.asking import ANSWERS, NoCastTo, ask, blocked, blocked_by_object, pack, plain, unpack
from qcore.checks import Forbidden


class _EqualsEverything(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.equal, torch.allclose):
            return True
        return super().__torch_function__(func, types, args, kwargs or {})

    def numpy(self):  # a lie told by a method, not through __torch_function__
        return np.zeros(1)


def test_a_lying_tensor_arrives_as_the_numbers_it_holds():
    t = torch.tensor([1.0, 2.5]).as_subclass(_EqualsEverything)
    assert torch.equal(t, torch.zeros(2))  # the lie, inside the process
    a = plain(t)
    assert type(a) is np.ndarray and a.tolist() == [1.0, 2.5]
    assert plain(torch.tensor([1.5], dtype=torch.bfloat16)).dtype == np.float32


def test_numbers_arrive_through_their_base_types():
    class Yes(float):
        def __eq__(self, other):
            return True

        def __float__(self):
            return 99.0

    assert plain(Yes(2.0)).tolist() == 2.0 and plain(np.float32(1.5)).dtype == np.float32
    with pytest.raises(TypeError):
        plain("3.0")
    with pytest.raises(TypeError):
        plain(np.array([object()], dtype=object))


def test_pack_refuses_pickles():
    import base64
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        unpack(base64.b64encode(buf.getvalue()).decode())
    assert unpack(pack({"x": np.arange(3, dtype=np.uint8)}))["x"].dtype == np.uint8


def test_blocked_reaches_every_binding_and_restores_it():
    alias = qf.decompose

    def default(x, f=qf.decompose):
        return f(x, qf.FP16)

    def closure():
        f = qf.decompose
        return lambda x: f(x, qf.FP16)

    class Holder:
        f = staticmethod(qf.decompose)

    x = torch.ones(2, dtype=torch.float16)
    calls = [lambda: alias(x, qf.FP16), lambda: default(x), lambda: closure()(x), lambda: Holder.f(x, qf.FP16),
             lambda: getattr(qf, "decom" + "pose")(x, qf.FP16), lambda: qf.FP16.max,
             lambda: torch.frexp(torch.ones(2)), lambda: torch.ones(2).bfloat16(), lambda: math.frexp(1.0)]
    with blocked(("qcore.formats.decompose", "qcore.formats.FloatFormat", "torch.frexp",
                  "torch.Tensor.bfloat16", "math.frexp")):
        for call in calls:
            with pytest.raises(Forbidden):
                call()
    for call in calls:  # all back, also after an error inside the block
        call()
    with pytest.raises(ZeroDivisionError), blocked(("qcore.formats.decompose",)):
        1 / 0
    assert alias(x, qf.FP16)[1].tolist() == [15, 15]


def test_what_only_names_block_is_known():
    assert blocked_by_object("qcore.formats.round_to_format") and blocked_by_object("torch.Tensor.to")
    assert not blocked_by_object("numpy.frexp") and not blocked_by_object("torch.finfo")


def test_no_cast_to_catches_every_spelling_but_a_bit_view():
    x = torch.tensor([1.0, 2.0])
    with NoCastTo(torch.bfloat16):
        for cast in (lambda: x.to(torch.bfloat16), lambda: x.bfloat16(), lambda: x.type(torch.bfloat16),
                     lambda: torch.tensor(x.tolist(), dtype=torch.bfloat16)):
            with pytest.raises(Forbidden):
                cast()
        assert x.view(torch.int32).view(torch.bfloat16).dtype == torch.bfloat16


def test_ask_records_answers_and_only_a_finished_block_counts():
    with ask("lab", "t1", inputs=pack({"x": np.arange(4.0)})) as q:
        q.answer("y", torch.from_numpy(q.inputs["x"]) + 1)
        q.answer("pair", (torch.tensor([1]), 2.0))
    assert ANSWERS["t1"]["y"].tolist() == [1.0, 2.0, 3.0, 4.0] and set(ANSWERS["t1"]) == {"y", "pair/0", "pair/1"}
    with pytest.raises(RuntimeError), ask("lab", "t1", inputs={"x": np.zeros(1)}) as q:
        q.answer("y", torch.zeros(1))
        raise RuntimeError("the student's function failed")
    assert "t1" not in ANSWERS  # no half answers from an earlier or a failed run
    with pytest.raises(ValueError, match="no inputs"), ask("lab", "t2"):
        pass


def test_names_of_libraries_that_are_not_installed_are_left_out():
    with blocked(("no_such_library_here.quantile", "qcore.formats.decompose")):
        with pytest.raises(Forbidden):
            qf.decompose(torch.ones(1), qf.FP32)
