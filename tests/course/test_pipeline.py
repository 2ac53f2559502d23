"""The course pipeline end to end: build, check, validate, autograde, feedback, gradebook."""
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nbformat
import pytest

from qcourse import build as build_mod
from qcourse.autograde import autograde
from qcourse.lint import check_course, check_master
from qcourse.master import find_masters
from qcourse.submissions import collect

FIXTURE = Path(__file__).parent / "fixture"
LAB = "lab00_tiny"


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A scratch course: the real nbgrader config with the tiny fixture master, built."""
    root = tmp_path_factory.mktemp("course")
    shutil.copy2(build_mod.COURSE / "nbgrader_config.py", root / "nbgrader_config.py")
    shutil.copytree(FIXTURE / "masters", root / "masters")
    build_mod.build([LAB], root, root / "labs", root / "solutions", log=lambda *_: None)
    return root


def _with_cell(nb_path: Path, grade_id: str, source: str, out: Path) -> Path:
    nb = nbformat.read(nb_path, as_version=4)
    for cell in nb.cells:
        if cell.get("id") == grade_id:
            cell.source = source
    nbformat.write(nb, out)
    return out


@pytest.fixture(scope="module")
def graded(course, tmp_path_factory):
    subs = tmp_path_factory.mktemp("subs")
    shutil.copy(course / "solutions" / f"{LAB}.ipynb", subs / "perfect.ipynb")
    shutil.copy(course / "labs" / f"{LAB}.ipynb", subs / "untouched.ipynb")
    # passes the visible check cube(2) == 8 but not the hidden cube(-3) == -27
    _with_cell(course / "solutions" / f"{LAB}.ipynb", "ex2_cube", "def cube(x):\n    return x * x * abs(x)\n",
               subs / "mistake.ipynb")
    (subs / "corrupt.ipynb").write_text('{"cells": [')
    outcomes = autograde(collect(subs, LAB), LAB, jobs=2, course_root=course, log=lambda *_: None)
    return {o.student: o for o in outcomes}


def test_build_is_deterministic_and_check_passes(course):
    first = (course / "labs" / f"{LAB}.ipynb").read_bytes()
    assert build_mod.check([LAB], course, course / "labs", course / "solutions") == []
    build_mod.build([LAB], course, course / "labs", course / "solutions", run_solution=False, log=lambda *_: None)
    assert (course / "labs" / f"{LAB}.ipynb").read_bytes() == first


def test_check_notices_a_stale_lab(course, tmp_path):
    labs = tmp_path / "labs"
    shutil.copytree(course / "labs", labs)
    nb = json.loads((labs / f"{LAB}.ipynb").read_text())
    nb["cells"][0]["source"] = "edited by hand"
    (labs / f"{LAB}.ipynb").write_text(json.dumps(nb))
    problems = build_mod.check([LAB], course, labs, course / "solutions")
    assert any("differs" in p for p in problems)


def test_student_version_has_no_solutions_or_hidden_tests(course):
    text = (course / "labs" / f"{LAB}.ipynb").read_text()
    assert "BEGIN SOLUTION" not in text and "HIDDEN" not in text and "cube(-3)" not in text
    assert "raise NotImplementedError()" in text
    assert check_course(course, course / "labs") == []


def test_solution_executed_with_outputs(course):
    nb = nbformat.read(course / "solutions" / f"{LAB}.ipynb", as_version=4)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "all visible checks passed" in outputs


def test_scores(graded):
    assert (graded["perfect"].status, graded["perfect"].score, graded["perfect"].max_score) == ("graded", 5, 5)
    assert graded["untouched"].score == 0 and graded["untouched"].status == "graded"
    assert graded["mistake"].exercises == {"ex1_tests": 2, "ex2_tests": 0}
    assert graded["corrupt"].status == "invalid" and graded["corrupt"].score == 0


def test_gradebook_holds_one_consistent_row_per_student(graded, course):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "qcourse") as gb:
        scores = {s.id: gb.find_submission(LAB, s.id).score for s in gb.students}
    assert scores == {sid: o.score for sid, o in graded.items()}


def test_feedback_never_shows_hidden_tests(graded, course):
    for sid in ("perfect", "untouched", "mistake"):
        html = (course / "feedback" / sid / LAB / f"{LAB}.html").read_text()
        assert "HIDDEN" not in html and "cube(-3)" not in html and "most recent call last" not in html
    assert "Hidden tests failed" in (course / "feedback" / "mistake" / LAB / f"{LAB}.html").read_text()


def test_regrading_is_idempotent_and_force_regrades(graded, course):
    subs = {o: course / "submitted" / o / LAB / f"{LAB}.ipynb" for o in ("perfect",)}
    again = autograde(subs, LAB, course_root=course, log=lambda *_: None)
    assert again[0].score == graded["perfect"].score and again[0].seconds == graded["perfect"].seconds
    forced = autograde(subs, LAB, course_root=course, force=True, log=lambda *_: None)
    assert forced[0].score == graded["perfect"].score


def test_a_new_gradebook_is_the_one_nbgrader_makes(tmp_path, monkeypatch):
    """The grader starts each new folder's gradebook from a file it makes itself (nbgrader would
    ask an ``alembic`` subprocess for the schema revision): the same tables, the same revision."""
    import contextlib
    import os
    import sqlite3

    from nbgrader.api import Gradebook

    from qcourse.autograde import _empty_gradebook

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    with Gradebook(f"sqlite:///{tmp_path / 'by-nbgrader.db'}", "qcourse"):
        pass
    (tmp_path / "by-qcourse.db").write_bytes(_empty_gradebook())

    def schema(path):
        with contextlib.closing(sqlite3.connect(path)) as db:
            return (sorted(db.execute("SELECT type, name, sql FROM sqlite_master").fetchall()),
                    db.execute("SELECT version_num FROM alembic_version").fetchall())

    assert schema(tmp_path / "by-qcourse.db") == schema(tmp_path / "by-nbgrader.db")


def test_master_conventions_are_enforced(tmp_path):
    bad = tmp_path / "lab99_bad.py"
    bad.write_text('# %% solution="a"\nx = 1\n\n# %% tests="a" points=1\n### BEGIN HIDDEN TESTS\nassert x\n')
    problems = check_master(bad)
    assert any("used twice" in p for p in problems)
    assert any("without ### BEGIN/END SOLUTION" in p for p in problems)
    assert any("unpaired" in p for p in problems)


def _qcourse(*args, cwd=None):
    return subprocess.run([str(Path(sys.executable).parent / "qcourse"), *args], capture_output=True,
                          text=True, cwd=cwd)


def test_unknown_lab_lists_the_known_ones(course):
    res = _qcourse("--course", str(course), "autograde", ".", "--lab", "lab42_nothing")
    assert res.returncode == 2 and "known labs: lab00_tiny" in res.stderr


def test_zip_slip_refused_by_the_command(course, tmp_path):
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("alice.ipynb", "{}")
        zf.writestr("../../evil.ipynb", "{}")
    res = _qcourse("--course", str(course), "autograde", str(z), "--lab", LAB)
    assert res.returncode == 2 and "unsafe entry" in res.stderr
    assert not (course / "submitted" / "alice").exists()


def test_validate_command(course):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:  # two independent commands, one per core
        ok, bad = pool.map(lambda nb: _qcourse("--course", str(course), "validate", str(nb)),
                           [course / "solutions" / f"{LAB}.ipynb", course / "labs" / f"{LAB}.ipynb"])
    assert ok.returncode == 0 and "total 5/5" in ok.stdout
    assert "hidden tests run inside the student's kernel" in ok.stdout  # the fixture lab is not judged
    assert bad.returncode == 1 and "✗ ex1_tests: 0/2" in bad.stdout


# ----------------------------------------------------------------------------- the real labs
REAL_LABS = list(find_masters(build_mod.COURSE))


@pytest.mark.slow
def test_committed_labs_match_a_fresh_build():
    assert build_mod.check(REAL_LABS) == []


@pytest.mark.slow
@pytest.mark.parametrize("lab", REAL_LABS)
def test_real_lab_grades(lab, real_lab_classes):
    """Solution: full marks; untouched: 0 without crashing; one exercise left undone: partial.
    (The class, graded once per session, is in conftest.py; test_hostile.py reads lab 1's too.)"""
    out = real_lab_classes(lab).outcomes
    assert out["solution"].score == out["solution"].max_score > 0, out["solution"]
    assert out["untouched"].status == "graded" and out["untouched"].score == 0
    assert 0 < out["partial"].score < out["partial"].max_score


def test_real_masters_keep_the_conventions():
    assert check_course(build_mod.COURSE, build_mod.REPO / "labs") == []
    for lab in REAL_LABS:
        assert (build_mod.REPO / "labs" / f"{lab}.ipynb").is_file(), f"run qcourse build {lab}"
