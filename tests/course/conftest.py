"""What the course tests share: each real lab graded once, as a class with nothing hostile in it.

``test_pipeline.py`` checks the grades of that class (solution, untouched, one exercise undone);
``test_hostile.py`` compares its honest students with the same notebooks graded there (alone).
"""
from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

from qcourse import autograde as autograde_mod
from qcourse import build as build_mod
from qcourse.autograde import Outcome, autograde
from qcourse.master import find_masters, load_master
from qcourse.submissions import collect

# The fixture masters are lab scripts with notebook magics, and the hostile corpus is a builder
# loaded by its test: neither is a test module.
collect_ignore_glob = ["fixture/*", "hostile/*"]

REAL_LABS = list(find_masters(build_mod.COURSE))
ONE_WRONG_LAB = "lab01_precision_formats"  # where the class also holds carol (one wrong answer)


def one_wrong_answer(solution) -> nbformat.NotebookNode:
    """Lab 1's solution with Exercise 5 answered wrong (the group scales forgotten): 9 of 10."""
    carol = nbformat.from_dict(solution)
    next(c for c in carol.cells if c.get("id") == "ex5_model_bytes").source = (
        "def model_bytes(n_params, bits, group_size=None, scale_bits=16):\n    return n_params * bits / 8\n")
    return carol


@dataclass
class GradedClass:
    course: Path
    subs: Path
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    error: BaseException | None = None


def _grade_class(lab: str, root: Path) -> GradedClass:
    """solution (the master), untouched (the released lab), partial (the first exercise left as
    released), and for lab 1 carol, graded together in a scratch course."""
    graded = GradedClass(build_mod.copy_course(build_mod.COURSE, root / "course"), root / "subs")
    try:
        graded.subs.mkdir()
        source = load_master(find_masters(graded.course)[lab])
        nbformat.write(source, graded.subs / "solution.ipynb")
        shutil.copy(build_mod.REPO / "labs" / f"{lab}.ipynb", graded.subs / "untouched.ipynb")
        student = nbformat.read(build_mod.REPO / "labs" / f"{lab}.ipynb", as_version=4)
        first = next(c for c in source.cells if c.metadata.get("nbgrader", {}).get("solution"))
        stub = next(c for c in student.cells if c.get("id") == first.id)
        partial = nbformat.from_dict(source)
        for c in partial.cells:
            if c.get("id") == first.id:
                c.source = stub.source
        nbformat.write(partial, graded.subs / "partial.ipynb")
        if lab == ONE_WRONG_LAB:
            nbformat.write(one_wrong_answer(source), graded.subs / "carol.ipynb")
        outcomes = autograde(collect(graded.subs, lab), lab, jobs=2, course_root=graded.course, log=print)
        graded.outcomes = {o.student: o for o in outcomes}
    except Exception as e:  # kept for that lab's tests; the other labs still report their own
        graded.error = e
    return graded


def _labs_wanted(session) -> list[str]:
    """The labs the selected tests ask for: a test's ``lab`` parameter, else its module's ``LAB``."""
    wanted = set()
    for item in session.items:
        if "real_lab_classes" in getattr(item, "fixturenames", ()):
            callspec = getattr(item, "callspec", None)
            wanted.add(callspec.params["lab"] if callspec and "lab" in callspec.params else item.module.LAB)
    return sorted(wanted)


@pytest.fixture(scope="session")
def real_lab_classes(request, tmp_path_factory):
    """``get(lab)``: that lab's class, graded once per session. Every lab a selected test asks for
    is graded on the first call, all labs at once and each with two jobs, their submissions
    sharing two kernel slots (one per core): no core waits for the last submission of one lab
    while another lab has some left (the later labs, which run longer, are handed in first)."""
    wanted = _labs_wanted(request.session)
    root = tmp_path_factory.mktemp("real-labs")
    slots = threading.BoundedSemaphore(2)
    grade_one = autograde_mod.grade_one

    def in_a_slot(*args, **kwargs):
        with slots:
            return grade_one(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(max_workers=max(1, len(wanted))) as pool:
        mp.setattr(autograde_mod, "grade_one", in_a_slot)
        todo = {lab: pool.submit(_grade_class, lab, root / lab) for lab in sorted(wanted, reverse=True)}
        classes = {lab: done.result() for lab, done in todo.items()}

    def get(lab: str) -> GradedClass:
        graded = classes[lab]
        if graded.error is not None:
            raise graded.error
        return graded

    return get
