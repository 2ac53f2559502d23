"""The judge: hidden tests decided in the grader's process, where student code cannot reach.

A lab whose reference generator (``course/refgen/<lab>.py``) lists ``HIDDEN_TESTS`` is judged
outside the kernel. For each submission and each of those tests the judge

1. draws the test's inputs from a seed that only the grader knows (:func:`seed_for`: the course
   secret, the lab, the student and the test), so a regrade asks the same questions and a table
   of answers learned from one submission does not fit another;
2. writes them into that submission's copy of the hidden cell (:func:`inject`), so they enter
   the kernel only when the cell runs; the cell *asks* (``qcore.asking``) and puts the student's
   answers into its outputs as plain arrays;
3. reads the answers from the autograded notebook (:func:`answers_in`), computes the expected
   values with ``qcore`` here, compares (:class:`Verdict`) and sets the cell's score.

Failures on the visible checks' own cases (keys ``visible...``) while the kernel showed the cell
passing mean that the kernel lied: :func:`judge_notebook` says so.
"""
from __future__ import annotations

import hashlib
import hmac
import runpy
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from qcore.asking import MIME, pack, unpack


@dataclass(frozen=True)
class HiddenTest:
    """The judge's half of one exercise's hidden test (the ask is in the lab's test cell).

    ``inputs(gen)`` draws the arrays the ask hands the student's function; ``expected(inputs)``
    computes qcore's answers; ``judge(verdict, inputs, expected, answers)`` compares. ``file``
    names the committed reference file that holds inputs and expected values for the lab's seed.
    """

    grade_id: str
    file: str
    inputs: Callable[[torch.Generator], dict[str, np.ndarray]]
    expected: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    judge: Callable[..., None]

    def reference(self, gen: torch.Generator) -> dict[str, np.ndarray]:
        """Inputs and expected values together (what the committed reference file holds)."""
        inputs = self.inputs(gen)
        return {**inputs, **self.expected(inputs)}


@dataclass
class Verdict:
    """The failures of one hidden test; each names the answer key it is about.

    >>> v = Verdict({"y": np.array([1.0, 2.0])})
    >>> v.equal("y", np.array([1.0, 2.0]), "doubling")
    >>> v.equal("visible/z", np.array([1]), "the visible case")
    >>> v.failures
    [('visible/z', 'the visible case: no answer')]
    """

    answers: dict[str, np.ndarray]
    failures: list[tuple[str, str]] = field(default_factory=list)

    def got(self, key: str) -> np.ndarray | None:
        if key not in self.answers:
            self.failures.append((key, "no answer"))
        return self.answers.get(key)

    def fail(self, key: str, what: str) -> None:
        self.failures.append((key, what))

    def _answer(self, key: str, want: np.ndarray, what: str) -> np.ndarray | None:
        got = self.answers.get(key)
        if got is None:
            self.failures.append((key, f"{what}: no answer"))
            return None
        if got.shape != np.shape(want):
            self.failures.append((key, f"{what}: shape {got.shape}, expected {np.shape(want)}"))
            return None
        return got

    def equal(self, key: str, want, what: str) -> None:
        """Exactly equal values (integer codes, bit patterns, exact float results; NaN equals NaN)."""
        want = np.asarray(want)
        got = self._answer(key, want, what)
        if got is None:
            return
        floating = want.dtype.kind in "fc" or got.dtype.kind in "fc"
        with np.errstate(invalid="ignore"):  # widening a signalling NaN raises the invalid flag, harmlessly
            ok = np.array_equal(got.astype(np.float64) if floating else got.astype(np.int64),
                                want.astype(np.float64) if floating else want.astype(np.int64),
                                equal_nan=floating)
        if not ok:
            self.failures.append((key, f"{what}: differs from the expected values"))

    def close(self, key: str, want, what: str, rtol: float, atol: float = 0.0) -> None:
        """Values within ``atol + rtol * |want|`` (NaN where NaN is expected)."""
        want = np.asarray(want, dtype=np.float64)
        got = self._answer(key, want, what)
        if got is None:
            return
        with np.errstate(invalid="ignore"):
            close = np.allclose(got.astype(np.float64), want, rtol=rtol, atol=atol, equal_nan=True)
        if not close:
            self.failures.append((key, f"{what}: differs beyond rtol={rtol:g} atol={atol:g}"))

    def true(self, key: str, condition: bool, what: str) -> None:
        if not condition:
            self.failures.append((key, what))


def write_hidden_references(out_dir: Path, tests: list[HiddenTest], seed: int) -> None:
    """A judged lab's committed reference files, into ``out_dir`` (created if needed): each test's
    inputs drawn for ``seed`` (one generator stream, in the tests' order) and its expected values."""
    from qcourse.refdata import write_references

    gen = torch.Generator().manual_seed(seed)
    write_references(out_dir, {t.file: t.reference(gen) for t in tests})


# ----------------------------------------------------------------------------- the lab's tests
@lru_cache(maxsize=None)
def _generator_module(path: str) -> dict:
    return runpy.run_path(path)


def hidden_tests(lab: str, course_root: Path) -> dict[str, HiddenTest]:
    """The judged hidden tests of ``lab`` by test cell grade id (empty: the lab is not judged)."""
    path = Path(course_root) / "refgen" / f"{lab}.py"
    if not path.is_file():
        return {}
    return {t.grade_id: t for t in _generator_module(str(path.resolve())).get("HIDDEN_TESTS", ())}


def course_secret(course_root: Path) -> bytes:
    """The course's secret (``course/.qcourse/secret``, made on first use, readable by its owner only)."""
    path = Path(course_root) / ".qcourse" / "secret"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_bytes(secrets.token_bytes(32))
    return path.read_bytes()


def seed_for(secret: bytes, lab: str, student: str, grade_id: str) -> int:
    """The seed of one student's inputs for one test: the same on every regrade, unguessable without the secret.

    >>> seed_for(b"k", "lab01", "alice", "ex1") == seed_for(b"k", "lab01", "alice", "ex1")
    True
    >>> seed_for(b"k", "lab01", "alice", "ex1") != seed_for(b"k", "lab01", "bob", "ex1")
    True
    """
    digest = hmac.new(secret, f"{lab}\0{student}\0{grade_id}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # torch seeds are below 2**63


def draw_inputs(test: HiddenTest, seed: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in test.inputs(torch.Generator().manual_seed(seed)).items()}


def inject(source: str, inputs: dict[str, np.ndarray]) -> str:
    """The hidden cell's source with this submission's inputs written into its ``ask(...)`` call.

    >>> src = 'x = 1\\n### BEGIN HIDDEN TESTS\\nwith ask("lab", "t", "f", forbid=("a.b",)) as q:\\n    pass\\n'
    >>> out = inject(src, {"x": np.arange(2)})
    >>> line = out.splitlines()[2]
    >>> line.startswith('with ask("lab", "t", "f", forbid=("a.b",), inputs=') and line.endswith(") as q:")
    True
    """
    head, marker, hidden = source.partition("### BEGIN HIDDEN TESTS")
    if hidden.count("with ask(") != 1:
        raise ValueError("a judged hidden test holds exactly one `with ask(...) as q:` block")
    start = hidden.index("with ask(") + len("with ask(")
    depth, end = 1, start
    while depth:  # the closing parenthesis of the call (the arguments hold tuples)
        depth += {"(": 1, ")": -1}.get(hidden[end], 0)
        end += 1
    call_end = end - 1
    return head + marker + hidden[:call_end] + f", inputs={pack(inputs)!r}" + hidden[call_end:]


def answers_in(cell) -> dict[str, np.ndarray] | None:
    """The answers a graded cell's ask put into its outputs (None when it sent none)."""
    found = None
    for out in cell.get("outputs", []):
        data = out.get("data", {}) if out.get("output_type") == "display_data" else {}
        payload = data.get(MIME)
        if isinstance(payload, dict) and isinstance(payload.get("answers"), str):
            try:
                found = unpack(payload["answers"])
            except Exception:  # not our format: no answers
                return None
    return found


@dataclass
class Judgement:
    """What the judge decided for one test cell."""

    passed: bool
    reason: str = ""     # the first failure, for the instructor's report
    lied: bool = False   # the kernel showed the visible checks passing; the judge failed the same answers


def judge_answers(test: HiddenTest, inputs: dict[str, np.ndarray], answers: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """The failures of ``answers`` to ``test`` on ``inputs`` (expected values computed here, with qcore)."""
    verdict = Verdict(answers)
    expected = {k: np.asarray(v) for k, v in test.expected(dict(inputs)).items()}
    test.judge(verdict, inputs, expected, answers)
    return verdict.failures


def judge_cell(test: HiddenTest, inputs: dict[str, np.ndarray], cell) -> Judgement:
    """Judge one autograded test cell on the inputs it was given."""
    answers = answers_in(cell)
    errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    if answers is None:
        why = f"{errors[0].get('ename', 'an error')} before the answers" if errors else "no answers"
        return Judgement(False, f"the hidden test got {why}")
    failures = judge_answers(test, inputs, answers)
    if not failures:
        return Judgement(True)
    key, what = failures[0]
    lied = not errors and any(k.startswith("visible") for k, _ in failures)
    return Judgement(False, f"{what} ({key})", lied)



# ----------------------------------------------------------------------------- a notebook
def forbidden_in(hidden_source: str) -> tuple[str, ...]:
    """The dotted names in the ``forbid=`` of a hidden part's ``ask(...)`` call.

    >>> forbidden_in('with ask("l", "t", "f", forbid=("math.frexp", "torch.finfo")) as q:\\n    pass\\n')
    ('math.frexp', 'torch.finfo')
    """
    import ast
    import textwrap

    from qcourse.codecheck import _PARSING

    with _PARSING:  # the parser is not safe in threads (CPython 3.11)
        tree = ast.parse(textwrap.dedent(hidden_source))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ask":
            for kw in node.keywords:
                if kw.arg == "forbid":
                    return tuple(ast.literal_eval(kw.value))
    return ()


def early_bound_names(source_nb) -> set[str]:
    """The lab's forbidden functions that only their names block (C functions outside torch), as
    dotted names: ``qcourse.codecheck`` looks for them reached by another path or held early."""
    from qcore.asking import _installed, blocked_by_object

    names = set()
    for cell in source_nb.cells:
        if cell.cell_type == "code" and "with ask(" in cell.source:
            hidden = cell.source.partition("### BEGIN HIDDEN TESTS")[2].partition("### END HIDDEN TESTS")[0]
            names |= {d for d in forbidden_in(hidden) if _installed(d) and not blocked_by_object(d)}
    return names


def student_cells(nb, source_nb) -> list[tuple[int, str]]:
    """The code cells the student wrote: every code cell but the lab's locked ones (which nbgrader
    restores from the source before running)."""
    locked = {c.metadata["nbgrader"]["grade_id"] for c in source_nb.cells
              if c.metadata.get("nbgrader", {}).get("locked")}
    return [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "code"
            and c.get("metadata", {}).get("nbgrader", {}).get("grade_id") not in locked]


def skip_tampering(nb, source_nb) -> list[str]:
    """Replace every student cell in which ``qcourse.codecheck`` finds tampering (or a forbidden C
    function held early) by an error naming what was found; returns one note per cell."""
    from qcourse.codecheck import check_cells

    notes = []
    by_cell: dict[int, list[str]] = {}
    given = [c.source for c in source_nb.cells if c.cell_type == "code"]
    for finding in check_cells(student_cells(nb, source_nb), early_bound_names(source_nb), given):
        by_cell.setdefault(finding.cell, []).append(finding.what)
    for index, whats in by_cell.items():
        nb.cells[index].source = (f"raise RuntimeError({'qcourse: this cell was not run: it reaches past its own objects (' + '; '.join(whats) + ')'!r})\n")
        notes.append(f"possible tampering: cell {index + 1} not run ({'; '.join(whats)})")
    return notes
