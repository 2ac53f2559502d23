"""What the lab tests share: a lab's spec, its master run cell by cell in a notebook-like namespace.

A lab is tested in two places. ``test_labNN_*.py`` holds what only that lab has: its oracle tests
(the solution against torch, bitsandbytes, peft, qcore) and its ``SPEC``, a :class:`Lab` read from
``specs/<lab>.yaml``: its exercises, their solution templates and the typical wrong solutions
(mutants), as data.
``test_lab_structure.py`` runs the same structure tests on every ``SPEC`` (markers, release,
the untouched student notebook, hidden tests, mutants). Adding a lab means writing its spec and a module
``test_labNN_*.py`` that loads it; the structure suite finds it (:func:`discover_labs`). ``bench/bench_labs.py`` times
each master against ``Lab.seconds``.

Each lab's notebooks are run once per pytest session (tests/labs/conftest.py keeps one
:class:`LabRun` per lab and drops it after the lab's last test).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import io
import re
import sys
import textwrap
import types
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import pytest  # noqa: E402
import yaml  # noqa: E402
from IPython.core.inputtransformer2 import TransformerManager  # noqa: E402
from nbgrader.preprocessors import ClearHiddenTests, ClearSolutions  # noqa: E402

import qcore.asking  # noqa: E402
import qcore.zoo  # noqa: E402
from qcore.checks import reference  # noqa: E402
from qcourse.judge import hidden_tests, judge_answers  # noqa: E402
from qcourse.master import load_master  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
MASTERS = REPO / "course" / "masters"
REFERENCE = REPO / "course" / "reference"
SPECS = HERE / "specs"
HIDDEN = re.compile(r"### BEGIN HIDDEN TESTS\n(.*?)### END HIDDEN TESTS", re.S)
REGION = re.compile(r"### BEGIN SOLUTION\n(.*?)### END SOLUTION", re.S)


# ----------------------------------------------------------------------------- cells
def role(cell) -> str | None:
    meta = cell.metadata.get("nbgrader", {})
    if meta.get("solution"):
        return "solution"
    if meta.get("grade"):
        return "tests"
    if meta.get("locked"):
        return "locked"
    return None


def grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def cell_of(nb, gid: str):
    (cell,) = [c for c in nb.cells if grade_id(c) == gid]
    return cell


def hidden_part(source: str) -> str:
    """The hidden tests of a test cell, without their markers."""
    return HIDDEN.search(source).group(1)


def region_owners(source: str) -> list[str]:
    """The function (or method) each solution region of a cell lies in, in order."""
    lines = source.splitlines()
    owners = []
    for i, line in enumerate(lines):
        if line.strip() == "### BEGIN SOLUTION":
            indent = len(line) - len(line.lstrip())
            defs = [m.group(2) for m in (re.match(r"(\s*)def (\w+)", x) for x in lines[:i])
                    if m and len(m.group(1)) < indent]
            owners.append(defs[-1] if defs else "<module>")
    return owners


class Kernel:
    """A notebook namespace run as ``__main__``; stdout and stderr of its cells are collected."""

    def __init__(self, namespace: dict | None = None):
        self.module = types.ModuleType("__main__")
        if namespace:
            self.module.__dict__.update(namespace)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()

    @property
    def ns(self) -> dict:
        return self.module.__dict__

    def run(self, source: str) -> None:
        code = compile(TransformerManager().transform_cell(source), "<cell>", "exec")
        saved = sys.modules["__main__"]
        sys.modules["__main__"] = self.module
        try:
            with contextlib.redirect_stdout(self.stdout), contextlib.redirect_stderr(self.stderr):
                exec(code, self.ns)
        finally:
            sys.modules["__main__"] = saved


def run_tests(kernel: Kernel, lab: str, tests_id: str, source: str) -> list[tuple[str, str]]:
    """Run a test cell's source (or its hidden part) in ``kernel``, raising what it raises; for a
    hidden test that is judged outside the kernel (``qcourse.judge``), judge the answers its ask
    recorded, as the grader would, on the committed inputs. Returns the judge's failures."""
    kernel.run(source)
    test = hidden_tests(lab, REPO / "course").get(tests_id)
    if test is None or "with ask(" not in source:
        return []
    answers = qcore.asking.ANSWERS.get(tests_id)
    if answers is None:
        return [("", "the ask recorded no answers")]
    return judge_answers(test, reference(lab, test.file), answers)


def judge_on_seed(lab: "LabRun", seed: int) -> None:
    """Ask the solution each hidden test's questions on the inputs drawn for ``seed`` (as the grader
    draws one submission's) and assert the judge passes it, quietly: every seed must give valid cases."""
    from qcourse.judge import draw_inputs, inject

    for ex in lab.spec.exercises:
        test = hidden_tests(lab.spec.name, REPO / "course")[ex.tests_id]
        inputs = draw_inputs(test, seed)
        kernel = Kernel(lab.solved.ns)
        kernel.run(cell_of(lab.master_nb, ex.id).source)
        kernel.run(hidden_part(inject(cell_of(lab.master_nb, ex.tests_id).source, inputs)))
        assert judge_answers(test, inputs, qcore.asking.ANSWERS[ex.tests_id]) == [], ex.id
        assert kernel.stderr.getvalue() == ""


# ----------------------------------------------------------------------------- specs
def patched(template: str, edits: Mapping[str, str] | None = None) -> str:
    """A solution template with some edits: ``{"patch_x": code}`` fills the slot ``{patch_x}`` (the
    slots left unfilled become ``pass``); any other key is text of the filled template, replaced by
    its value (in order, and it must be there)."""
    edits = dict(edits or {})
    slots = re.findall(r"\{(patch\w*)\}", template)
    source = template.format(**{k: edits.pop(k, "pass") for k in slots})
    for old, new in edits.items():
        assert old in source, f"not in the template: {old!r}"
        source = source.replace(old, new)
    return source


@dataclasses.dataclass(frozen=True, eq=False)
class Exercise:
    """One graded exercise: its solution cell ``id`` and test cell ``id_tests``.

    ``functions``: the function or method each solution region lies in, in order (one region each;
    each becomes a ``raise NotImplementedError()`` stub). ``template``: a correct solution with
    ``{patch_*}`` slots. ``mutants``: typical wrong solutions, each plausible (it survives
    ``smoke``) and each rejected by the test cell and by its hidden part alone; a mutant is the
    template with edits (see :func:`patched`) or a whole source (a string).
    """

    id: str
    points: int
    functions: tuple[str, ...]
    template: str
    smoke: str
    mutants: Mapping[str, str | Mapping[str, str]]

    @property
    def tests_id(self) -> str:
        return f"{self.id}_tests"

    def mutant(self, name: str) -> str:
        m = self.mutants[name]
        return textwrap.dedent(m if isinstance(m, str) else patched(self.template, m))


@dataclasses.dataclass(frozen=True, eq=False)
class Lab:
    """What the structure tests need to know of a lab (``course/masters/<name>.py``)."""

    name: str
    exercises: tuple[Exercise, ...]
    seconds: float  # the whole master under the lab's environment: bench/bench_labs.py's target
    printouts: tuple[str, ...] = ()  # in the solution's stdout
    student_printouts: tuple[str, ...] = ()  # in the untouched student notebook's stdout (whole runs)
    release_forbids: tuple[str, ...] = ()  # besides markers, reference( and forbid(: not in the release
    given_lines: tuple[str, ...] = ()  # solution lines the release shows elsewhere (no other may be in it)
    given_defs: tuple[str, ...] = ()  # top-level functions of solution cells that hold no region
    grader: bool = True  # run as under nbgrader (NBGRADER_EXECUTION: the short experiments)
    cache_zoo: tuple[str, ...] = ()  # qcore.zoo loaders cached for the lab: each model loaded once
    # None: the tests run the whole notebook. Otherwise they run the graded and locked cells and
    # these code cells only (by index among the code cells); the whole notebook in the slow tests.
    setup_cells: tuple[int, ...] | None = None
    one_thread: bool = False  # the fast tests on one thread (tests/conftest.py)
    # Decimal numbers the prose states that no output of the executed solution prints, each with
    # why (a seed's or a paper's figure, theory, a version): every other one must be printed.
    unprinted_numbers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def short(self) -> str:
        return self.name.split("_")[0]

    @property
    def partial(self) -> bool:
        return self.setup_cells is not None

    def exercise(self, eid: str) -> Exercise:
        (ex,) = [e for e in self.exercises if e.id == eid]
        return ex


def load_spec(name: str) -> Lab:
    """The :class:`Lab` that ``specs/<name>.yaml`` describes (its keys are the fields of
    :class:`Lab` and, under ``exercises``, of :class:`Exercise`)."""
    path = SPECS / f"{name}.yaml"
    data = yaml.safe_load(path.read_text())
    assert data.pop("name") == name, f"{path}: its name is not {name}"
    exercises = tuple(
        Exercise(**{k: tuple(v) if k == "functions" else v for k, v in ex.items()}) for ex in data.pop("exercises"))
    return Lab(name=name, exercises=exercises, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def discover_labs() -> list[Lab]:
    """The ``SPEC`` of every ``test_labNN_*.py`` module next to this file, in lab order."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return [importlib.import_module(p.stem).SPEC for p in sorted(HERE.glob("test_lab[0-9][0-9]_*.py"))]


# ----------------------------------------------------------------------------- runs
class LabRun:
    """One lab's notebooks and runs, each made once, on first use (call it inside ``environment``)."""

    def __init__(self, spec: Lab):
        self.spec = spec
        self._cached = {name: functools.lru_cache(getattr(qcore.zoo, name)) for name in spec.cache_zoo}

    @contextlib.contextmanager
    def environment(self):
        """No windows, the committed references, the grader's shorter run, cached models."""
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(plt, "show", lambda *a, **k: plt.close("all"))
            mp.setenv("QCOURSE_REFERENCE_DIR", str(REFERENCE))
            if self.spec.grader:
                mp.setenv("NBGRADER_EXECUTION", "autograde")
            for name, loader in self._cached.items():
                mp.setattr(qcore.zoo, name, loader)
            yield

    @functools.cached_property
    def master_nb(self):
        return load_master(MASTERS / f"{self.spec.name}.py")

    @functools.cached_property
    def student_nb(self):
        """The release: solutions and hidden tests cleared, as nbgrader does."""
        nb = copy.deepcopy(self.master_nb)
        nb, _ = ClearSolutions().preprocess(nb, {})
        nb, _ = ClearHiddenTests().preprocess(nb, {})
        return nb

    def code_cells(self, nb, whole: bool) -> list:
        code = [c for c in nb.cells if c.cell_type == "code"]
        if whole or not self.spec.partial:
            return code
        return [c for i, c in enumerate(code) if role(c) is not None or i in self.spec.setup_cells]

    def run_master(self, whole: bool) -> Kernel:
        kernel = Kernel()
        for cell in self.code_cells(self.master_nb, whole):
            kernel.run(cell.source)
        return kernel

    @functools.cached_property
    def solved(self) -> Kernel:
        """The master run top to bottom (the solution); for a partial lab, its graded and set-up cells."""
        return self.run_master(whole=False)

    @functools.cached_property
    def whole(self) -> Kernel:
        """The whole master run top to bottom."""
        return self.solved if not self.spec.partial else self.run_master(whole=True)


# ----------------------------------------------------------------------------- prose against outputs
# A decimal number: "13.78", "-0.17", "1.78x" (the "x" is not part of it), "3.4e38"; not a version
# inside a longer dotted run ("1.2.3") nor part of a word or a code span.
_DECIMAL = re.compile(r"(?<![\w.])[-−]?\d+\.\d+(?:e[-+]?\d+)?(?![\w.]*\.\d)")


def prose_numbers(nb) -> list[tuple[int, str, str]]:
    """(cell index, number, context) of each decimal number the markdown states, code spans, links
    and formulas left out (they are code or addresses, not measurements).

    Example:
        >>> import nbformat
        >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(
        ...     "FP32 takes 1.78x the time of `x = 0.5`; see [it](https://x.org/2211.10438), -0.17 to 20.3.")])
        >>> [n for _, n, _ in prose_numbers(nb)]
        ['1.78', '-0.17', '20.3']
    """
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        text = re.sub(r"`[^`]*`|\]\([^)]*\)|https?://\S+|\$[^$]*\$", " ", cell.source)
        for m in _DECIMAL.finditer(text):
            found.append((i, m.group().replace("−", "-"), " ".join(text[max(0, m.start() - 50):m.end() + 20].split())))
    return found


def printed_numbers(nb) -> set[str]:
    """Every decimal number the code cells' text outputs show (streams and text/plain results).

    Example:
        >>> import nbformat
        >>> cell = nbformat.v4.new_code_cell("", outputs=[nbformat.v4.new_output("stream", text="SQNR 21.66 dB, -0.17\\n")])
        >>> sorted(printed_numbers(nbformat.v4.new_notebook(cells=[cell])))
        ['-0.17', '21.66']
    """
    out = set()
    for cell in nb.cells:
        for o in cell.get("outputs", []) if cell.cell_type == "code" else []:
            texts = [o.get("text", "")] + [v for k, v in o.get("data", {}).items() if k == "text/plain"]
            for text in texts:
                out.update(m.group().replace("−", "-") for m in _DECIMAL.finditer("".join(text)))
    return out
