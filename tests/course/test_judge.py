"""The judge and the look at the code: inputs that enter with the cell, answers judged outside,
tampering constructs found, and honest lab code left alone."""
import nbformat
import numpy as np
import pytest

import qcore.asking
from qcourse import judge
from qcourse.build import COURSE, REPO
from qcourse.codecheck import check_cells
from qcourse.master import find_masters, load_master

JUDGED = [lab for lab in find_masters(COURSE) if judge.hidden_tests(lab, COURSE)]


def test_seeds_are_per_student_and_test_and_stable():
    s = judge.seed_for(b"secret", "lab01", "alice", "ex1")
    assert s == judge.seed_for(b"secret", "lab01", "alice", "ex1") and 0 <= s < 2**63
    others = {judge.seed_for(b"secret", "lab01", who, t) for who in ("alice", "bob") for t in ("ex1", "ex2")}
    assert len(others) == 4 and judge.seed_for(b"other", "lab01", "alice", "ex1") != s


def test_the_course_secret_is_made_once_for_its_owner_only(tmp_path):
    first = judge.course_secret(tmp_path)
    assert first == judge.course_secret(tmp_path) and len(first) == 32
    assert (tmp_path / ".qcourse" / "secret").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("lab", JUDGED)
def test_injected_inputs_are_what_the_ask_hands_out_and_differ_per_student(lab):
    """The hidden cell as the grader writes it: run, its ask sees exactly the drawn inputs."""
    source = load_master(find_masters(COURSE)[lab])
    cells = {c.metadata["nbgrader"]["grade_id"]: c for c in source.cells if c.metadata.get("nbgrader", {}).get("grade")}
    for gid, test in judge.hidden_tests(lab, COURSE).items():
        a, b = (judge.draw_inputs(test, judge.seed_for(b"k", lab, who, gid)) for who in ("alice", "bob"))
        assert sorted(a) == sorted(b)
        assert any(not np.array_equal(a[k], b[k]) for k in a), f"{gid}: every student gets the same questions"
        hidden = cells[gid].source.partition("### BEGIN HIDDEN TESTS")[2]
        injected = judge.inject(cells[gid].source, a).partition("### BEGIN HIDDEN TESTS")[2]
        assert injected.count("inputs=") == 1 and injected.replace(injected[injected.index(", inputs="):
               injected.index(")", injected.index(", inputs="))], "") == hidden
        call = injected[injected.index("inputs=") + len("inputs="):]
        text = eval(call[:call.index(")")])  # the literal the grader wrote
        got = qcore.asking.unpack(text)
        assert sorted(got) == sorted(a) and all(np.array_equal(got[k], a[k]) for k in a)


def _cell(outputs):
    return nbformat.from_dict({"cell_type": "code", "source": "", "metadata": {}, "outputs": outputs,
                               "execution_count": 1})


def _answers(arrays):
    return {"output_type": "display_data", "metadata": {},
            "data": {qcore.asking.MIME: {"lab": "l", "grade_id": "t", "answers": qcore.asking.pack(arrays)},
                     "text/plain": "answers"}}


def test_judging_a_cell():
    def judge_fn(v, inputs, expected, answers):
        v.equal("y", expected["y"], "y")
        v.equal("visible_y", expected["y"][:1], "the visible case")

    test = judge.HiddenTest("t", "f", lambda gen: {"x": np.arange(3)}, lambda i: {"y": i["x"] * 2}, judge_fn)
    inputs = {"x": np.arange(3)}
    right = {"y": np.array([0, 2, 4]), "visible_y": np.array([0])}
    assert judge.judge_cell(test, inputs, _cell([_answers(right)])).passed
    wrong = judge.judge_cell(test, inputs, _cell([_answers({"y": np.array([0, 2, 5]), "visible_y": np.array([1])})]))
    assert not wrong.passed and wrong.lied  # no error shown, yet the visible case is wrong
    error = {"output_type": "error", "ename": "Forbidden", "evalue": "", "traceback": []}
    none = judge.judge_cell(test, inputs, _cell([error]))
    assert not none.passed and "Forbidden" in none.reason and not none.lied
    forged = dict(_answers(right))
    forged["data"] = {qcore.asking.MIME: {"answers": "not base64 of an npz"}}
    assert not judge.judge_cell(test, inputs, _cell([forged])).passed


HOSTILE_SNIPPETS = {
    "computed getattr": "import qcore.formats as f\ng = getattr(f, 'decom' + 'pose')",
    "__import__": "m = __import__('qcore.formats')",
    "importlib": "import importlib\nm = importlib.import_module('qcore')",
    "exec": "exec('x = 1')",
    "sys.modules": "import sys\nsys.modules['qcore.asking'] = None",
    "settrace": "import sys\nsys.settrace(lambda *a: None)",
    "frames": "import sys\nf = sys._getframe(0)",
    "module attribute set": "import torch\ntorch.equal = lambda *a: True",
    "aliased module attribute": "import qcore.asking as qa\nqa.blocked = None",
    "code object": "def f(): pass\nf.__code__ = (lambda: 1).__code__",
    "globals": "globals()['x'] = 1",
    "IPython hook": "get_ipython().events.register('pre_run_cell', print)",
    "magic": "%run other.py",
    "shell": "!python -c 'import qcore'",
    "timed tampering": "%%time\nimport sys\nsys.modules.clear()",
    "kernel internals": "from ipykernel import kernelbase",
    "torch function off": "import torch\nwith torch._C.DisableTorchFunction():\n    pass",
    "thread": "import threading\nthreading.Thread(target=print).start()",
    "subprocess": "import subprocess\nsubprocess.run(['python', '-c', '1'])",
    "os.system": "import os\nos.system('true')",
    "string dunder": "x = getattr(int, '__subclasses__')",
    "C function held early": "import numpy as np\ndef f(x, _g=np.frexp):\n    return _g(x)",
    "C function fetched by name": "import numpy as np\nf = getattr(np, 'frexp')",
    "C function imported, then held": "from numpy import frexp as fx\nkeep = [fx]",
    "C function through another module": "import numpy.core.umath as um\ny = um.frexp(1.0)",
    "C function imported in a function": "def f(x):\n    from numpy.core.umath import frexp\n    return frexp(x)",
    "attrgetter": "from operator import attrgetter\nf = attrgetter('fre' + 'xp')",
}


@pytest.mark.parametrize("what", list(HOSTILE_SNIPPETS))
def test_tampering_constructs_are_found(what):
    assert check_cells([(0, HOSTILE_SNIPPETS[what])], {"numpy.frexp"}), what


def test_honest_names_are_not_taken_for_forbidden_functions():
    """A parameter that shares a forbidden function's name, and direct calls, are fine."""
    honest = "import numpy as np\ndef t(x, percentile):\n    return np.percentile(x, percentile) + x.quantile(0.5)\nprint('percentile')"
    assert check_cells([(0, honest)], {"numpy.percentile", "numpy.quantile"}) == []
    # another library's function of the same name, imported by name: not the forbidden one
    assert check_cells([(0, "from torch.ao.quantization import convert")], {"qcore.qat.convert"}) == []
    assert check_cells([(0, "from numpy.core.umath import frexp")], {"numpy.frexp"})  # the same object
    magics = ["%matplotlib inline", "%timeit t(x, 50)", "%%time\ny = t(x, 50)\n", "z = %time t(x, 1)"]
    assert check_cells(list(enumerate(magics)), {"numpy.percentile"}) == []


@pytest.mark.parametrize("lab", JUDGED)
def test_honest_lab_code_is_left_alone(lab):
    """Every cell a student writes or is given in the release, and the solutions: no finding (the
    instructor's locked cells are not checked: nbgrader restores them, so a given cell that needs
    such a construct is locked: lab 5's, which frees memory with ctypes and gc)."""
    from qcourse.judge import early_bound_names

    source = load_master(find_masters(COURSE)[lab])
    release = nbformat.read(REPO / "labs" / f"{lab}.ipynb", as_version=4)
    cells = [c for nb in (source, release) for c in nb.cells if c.cell_type == "code"
             and not c.metadata.get("nbgrader", {}).get("locked")]
    given = [c.source for c in source.cells if c.cell_type == "code"]
    assert check_cells([(i, c.source) for i, c in enumerate(cells)], early_bound_names(source), given) == []


def test_the_labs_own_imports_count():
    """``np`` comes from the lab's set-up cell, not the student's: a default argument still holds numpy.percentile."""
    cell = "def t(x, p, _f=np.percentile):\n    return _f(x, p)"
    assert check_cells([(0, cell)], {"numpy.percentile"}, ["import numpy as np"])
    assert not check_cells([(0, cell)], {"numpy.percentile"})  # without the context, np is unknown


def test_skip_tampering_replaces_only_the_cells_that_tamper():
    lab = "lab01_precision_formats"
    source = load_master(find_masters(COURSE)[lab])
    nb = nbformat.from_dict(source)
    nb.cells.insert(2, nbformat.v4.new_code_cell("import sys\nsys.modules.pop('qcore.asking')"))
    before = [c.source for c in nb.cells]
    notes = judge.skip_tampering(nb, source)
    assert len(notes) == 1 and "cell 3 not run (sys.modules (line 2))" in notes[0]
    assert nb.cells[2].source.startswith("raise RuntimeError(") and "sys.modules" in nb.cells[2].source
    assert [c.source for i, c in enumerate(nb.cells) if i != 2] == [s for i, s in enumerate(before) if i != 2]


@pytest.mark.parametrize("lab", JUDGED)
def test_every_forbidden_name_resolves(lab):
    """A misspelt name would block nothing; one of a library that is not installed is left out
    (it cannot be called either)."""
    from qcore.asking import _installed, _resolve

    source = load_master(find_masters(COURSE)[lab])
    for cell in source.cells:
        if "with ask(" in cell.source:
            for dotted in judge.forbidden_in(cell.source.partition("### BEGIN HIDDEN TESTS")[2].partition(
                    "### END HIDDEN TESTS")[0]):
                if _installed(dotted):
                    assert _resolve(dotted) is not None, dotted
