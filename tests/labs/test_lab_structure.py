"""Every lab's master as a course notebook: markers, points, release, the untouched student
notebook, hidden tests, and the typical wrong solutions of each exercise (each must be rejected
by the whole test cell and by its hidden part alone). The labs are the ``SPEC`` of each
``test_labNN_*.py`` (tests/labs/harness.py); their oracle tests stay there.

The master is read with ``load_master`` and run cell by cell in a namespace that plays
``__main__`` (as a kernel's does, so that ``qcore.checks.forbid`` patches the notebook's names).
How long each master takes is measured by bench/bench_labs.py, not here.
"""
from __future__ import annotations

import re

import pytest

from harness import (REGION, REPO, Kernel, cell_of, discover_labs, grade_id, hidden_part, patched, printed_numbers,
                     prose_numbers, reference, region_owners, role, run_tests)
from qcourse.codecheck import check_cells
from qcourse.judge import early_bound_names, hidden_tests
from qcore.checks import CheckFailed

LABS = discover_labs()
EXERCISES = [(spec, ex) for spec in LABS for ex in spec.exercises]
CASES = [(spec, ex, name) for spec, ex in EXERCISES for name in ex.mutants]

each_lab = pytest.mark.parametrize("spec", LABS, ids=[spec.short for spec in LABS])
each_exercise = pytest.mark.parametrize("spec,ex", EXERCISES, ids=[f"{s.short}-{e.id}" for s, e in EXERCISES])


# ----------------------------------------------------------------------------- the solution
@each_lab
def test_solution_runs_quietly(lab):
    out = lab.solved.stdout.getvalue()
    assert lab.solved.stderr.getvalue() == ""
    assert out.count("all visible checks passed") == len(lab.spec.exercises)
    for text in lab.spec.printouts:  # the seeds' and the tutorial's printouts, reproduced
        assert text in out


@each_lab
def test_prose_quotes_the_numbers_the_run_printed(spec):
    """Each decimal number of the committed solution's prose is one its outputs print (the run
    that `qcourse build` recorded), or one the spec lists with the reason it is not printed."""
    import nbformat

    nb = nbformat.read(REPO / "solutions" / f"{spec.name}.ipynb", as_version=4)
    printed = {n.lstrip("-") for n in printed_numbers(nb)}
    stale = [f"cell {i}: {n} in '...{context}...'" for i, n, context in prose_numbers(nb)
             if n.lstrip("-") not in printed and n not in spec.unprinted_numbers]
    assert not stale, "prose states numbers no output prints (rebuild, fix the prose, or list them " \
                      "with their reason under unprinted_numbers in the spec):\n" + "\n".join(stale)
    unused = set(spec.unprinted_numbers) - {n for _, n, _ in prose_numbers(nb)}
    assert not unused, f"unprinted_numbers the prose no longer states: {sorted(unused)}"


# ----------------------------------------------------------------------------- structure, release
@each_lab
def test_markers_are_paired_and_in_their_cells(lab):
    spec, nb = lab.spec, lab.master_nb
    assert [grade_id(c) for c in nb.cells if role(c) == "solution"] == [e.id for e in spec.exercises]
    tests = [(grade_id(c), c.metadata["nbgrader"]["points"]) for c in nb.cells if role(c) == "tests"]
    assert tests == [(e.tests_id, e.points) for e in spec.exercises]
    for cell in nb.cells:
        src, r = cell.source, role(cell)
        sol = re.findall(r"### (BEGIN|END) SOLUTION", src)
        hid = re.findall(r"### (BEGIN|END) HIDDEN TESTS", src)
        if r == "solution":
            assert sol and sol == ["BEGIN", "END"] * (len(sol) // 2) and not hid, grade_id(cell)
            owners = region_owners(src)
            assert owners == list(spec.exercise(grade_id(cell)).functions), grade_id(cell)  # one region a function
            given = set(re.findall(r"^def (\w+)", src, re.M)) - set(owners)
            assert given <= set(spec.given_defs), f"{grade_id(cell)}: functions without a region {given}"
        elif r == "tests":
            assert hid == ["BEGIN", "END"] and not sol, grade_id(cell)
            visible, hidden = src.split("### BEGIN HIDDEN TESTS")
            assert "with exercise(" in visible and "with exercise(" not in hidden
            assert hidden.rstrip().endswith("### END HIDDEN TESTS")  # nothing after the hidden part
            assert not re.search(r"reference\(|forbid\(|ask\(", visible)
            judged = hidden_tests(spec.name, REPO / "course")
            if grade_id(cell) in judged:  # asks inside the kernel, judged by the grader
                assert hidden.count("with ask(") == 1 and f'"{grade_id(cell)}"' in hidden, grade_id(cell)
                assert "assert" not in hidden and "reference(" not in hidden, grade_id(cell)
            else:
                assert "reference(" in hidden, grade_id(cell)
            assert "print(" not in hidden
        else:
            assert "### BEGIN" not in src and "### END" not in src, f"marker outside a graded cell: {src[:60]!r}"


@each_lab
def test_release_leaks_nothing(lab):
    code = "\n".join(c.source for c in lab.student_nb.cells if c.cell_type == "code")
    for needle in ("### BEGIN", "### END", "reference(", "forbid(", *lab.spec.release_forbids):
        assert needle not in code, needle
    lines = {line.strip() for cell in lab.master_nb.cells if role(cell) == "solution"
             for body in REGION.findall(cell.source) for line in body.splitlines()
             if len(line.strip()) > 15 and not line.strip().startswith("#")}
    for line in sorted(lines - set(lab.spec.given_lines)):
        assert line not in code, f"solution line leaks: {line}"
    given = "\n".join(c.source for c in lab.student_nb.cells if c.cell_type == "code" and role(c) != "solution")
    for line in lab.spec.given_lines:  # shown outside the exercises anyway (a generic line, not a hint)
        assert line in lines and line in given, line
    functions = [f for ex in lab.spec.exercises for f in ex.functions]
    assert code.count("raise NotImplementedError()") == len(functions)
    for name in functions:
        assert f"def {name}(" in code


def run_student_notebook(lab, whole: bool) -> Kernel:
    """The released notebook, untouched: every test cell says 'not done yet', nothing else fails."""
    kernel = Kernel()
    for cell in lab.code_cells(lab.student_nb, whole):
        if role(cell) == "tests":
            with pytest.raises(CheckFailed, match="not done yet"):
                kernel.run(cell.source)
        else:
            kernel.run(cell.source)
    assert kernel.stderr.getvalue() == ""
    return kernel


@each_lab
def test_untouched_student_notebook_fails_only_on_the_stubs(lab):
    """A partial lab: its graded and set-up cells only (the whole notebook is the slow test below)."""
    kernel = run_student_notebook(lab, whole=not lab.spec.partial)
    if not lab.spec.partial:  # the demo cells survive unfinished exercises
        for text in lab.spec.student_printouts:
            assert text in kernel.stdout.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in LABS if s.partial], ids=[s.short for s in LABS if s.partial])
def test_untouched_student_notebook_runs_to_the_end(lab):
    """The whole released notebook (with the model): the demo cells survive unfinished exercises."""
    kernel = run_student_notebook(lab, whole=True)
    for text in lab.spec.student_printouts:
        assert text in kernel.stdout.getvalue()


# ----------------------------------------------------------------------------- hidden tests, mutants
@each_exercise
def test_hidden_part_passes_with_the_solution(spec, ex, lab):
    kernel = Kernel(lab.solved.ns)
    kernel.run(cell_of(lab.master_nb, ex.id).source)  # defined here, so that the cell's swaps reach its globals
    assert run_tests(kernel, spec.name, ex.tests_id, hidden_part(cell_of(lab.master_nb, ex.tests_id).source)) == []
    assert kernel.stderr.getvalue() == "" and kernel.stdout.getvalue() == ""


@each_exercise
def test_unpatched_templates_pass(spec, ex, lab):
    """The template the mutants patch is a correct solution: a mutant fails for its own mistake."""
    kernel = Kernel(lab.solved.ns)
    kernel.run(patched(ex.template))
    assert run_tests(kernel, spec.name, ex.tests_id, cell_of(lab.master_nb, ex.tests_id).source) == []
    assert kernel.stderr.getvalue() == ""


@pytest.mark.parametrize("spec,ex,name", CASES, ids=[f"{s.short}-{e.id}-{n}" for s, e, n in CASES])
def test_mutant_is_rejected(spec, ex, name, lab):
    """Rejected: the grader does not run it (``qcourse.codecheck``, judged labs), the cell raises (a
    visible check, a forbidden call), or the judge fails its answers."""
    source = cell_of(lab.master_nb, ex.tests_id).source
    given = [c.source for c in lab.master_nb.cells if c.cell_type == "code"]
    if ex.tests_id in hidden_tests(spec.name, REPO / "course") and check_cells(
            [(0, ex.mutant(name))], early_bound_names(lab.master_nb), given):
        return
    for part in (source, hidden_part(source)):  # the whole cell, then its hidden tests alone
        # One namespace per run, as in a kernel: the mutant's globals are the ones forbid() patches.
        kernel = Kernel(lab.solved.ns)
        kernel.run(ex.mutant(name))
        kernel.run(ex.smoke)  # a plausible submission: it runs
        try:
            failures = run_tests(kernel, spec.name, ex.tests_id, part)
        except Exception:
            continue
        assert failures, f"{name}: passed the {'cell' if part is source else 'hidden part'}"


def _judged_with_visible_case(spec, ex) -> bool:
    test = hidden_tests(spec.name, REPO / "course").get(ex.tests_id)
    return test is not None and any(k.startswith("visible") for k in reference(spec.name, test.file))


VISIBLE_CASES = [(spec, ex, name) for spec, ex, name in CASES if _judged_with_visible_case(spec, ex)]


@pytest.mark.parametrize("spec,ex,name", VISIBLE_CASES, ids=[f"{s.short}-{e.id}-{n}" for s, e, n in VISIBLE_CASES])
def test_visible_case_fails_where_the_visible_checks_do(spec, ex, name, lab):
    """A mistake the visible checks catch fails the judge on their own case too (the ``visible...``
    answers): so a kernel that shows those checks passing while its answers fail them is reported as
    lying (``qcourse.judge.Judgement.lied``), whatever it printed."""
    source = cell_of(lab.master_nb, ex.tests_id).source
    kernel = Kernel(lab.solved.ns)
    kernel.run(ex.mutant(name))
    try:
        kernel.run(source.partition("### BEGIN HIDDEN TESTS")[0])
    except Exception:  # a failed check, or an error on the way
        pass
    else:
        pytest.skip("the visible checks pass this mistake (the hidden cases catch it)")
    kernel = Kernel(lab.solved.ns)
    kernel.run(ex.mutant(name))
    try:
        failures = run_tests(kernel, spec.name, ex.tests_id, hidden_part(source))
    except Exception as e:  # a forbidden call: the ask gives no answers, which fails the cell anyway
        pytest.skip(f"the hidden part raises ({type(e).__name__})")
    assert any(key.startswith("visible") for key, _ in failures), failures[:3]
