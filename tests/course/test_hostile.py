"""A class with hostile submissions: everyone's grade stays honest, nothing leaks or changes."""
import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from qcourse import build as build_mod
from qcourse.autograde import autograde
from qcourse.master import find_masters, load_master
from qcourse.submissions import collect

LAB = "lab01_precision_formats"
HERE = Path(__file__).parent
spec = importlib.util.spec_from_file_location("hostile_cases", HERE / "hostile" / "cases.py")
cases = importlib.util.module_from_spec(spec)
sys.modules["hostile_cases"] = cases  # dataclasses look their module up there
spec.loader.exec_module(cases)

pytestmark = pytest.mark.slow
TEST_LIMITS = """
# tighter limits for the hostile corpus (tests/course/test_hostile.py)
c.Execute.timeout = 20
c.QCourseSandbox.memory_mb = 3072
c.QCourseSandbox.processes = 64
c.QCourseSandbox.wall_seconds = 400
"""


def scratch_course(root: Path) -> Path:
    build_mod.copy_course(build_mod.COURSE, root)
    with open(root / "nbgrader_config.py", "a") as f:
        f.write(TEST_LIMITS)
    return root


# The honest students are the notebooks of lab 1's class in conftest.py, copied byte for byte:
# there they are graded with no hostile case in the class (alone), here among the hostile cases.
HONEST = {"alice": "solution", "bob": "untouched", "carol": "carol"}  # name here: name there


def honest(dest: Path, benign_subs: Path) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    for name, there in HONEST.items():
        shutil.copy(benign_subs / f"{there}.ipynb", dest / f"{name}.ipynb")
    return {name: dest / f"{name}.ipynb" for name in HONEST}


def digest(paths) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


@pytest.fixture(scope="module")
def graded(tmp_path_factory, real_lab_classes):
    tmp = tmp_path_factory.mktemp("hostile")
    course = scratch_course(tmp / "course")
    solution = load_master(find_masters(course)[LAB])
    subs = tmp / "subs"
    honest(subs, real_lab_classes(LAB).subs)
    expected = cases.build(subs, course, solution, build_mod.REPO)
    watched = [build_mod.REPO / "README.md", build_mod.REPO / "qcore" / "checks.py",
               *sorted((course / "masters").glob("*")), *sorted((course / "reference").rglob("*.npz"))]
    before = digest(watched)
    found = collect(subs, LAB)
    outcomes = {o.student: o for o in autograde(found, LAB, jobs=2, course_root=course, log=print)}
    after = digest(watched)
    # every imported submission is still byte for byte what its student handed in
    for sid, src in found.items():
        kept = course / "submitted" / sid / LAB / f"{LAB}.ipynb"
        assert kept.read_bytes() == src.read_bytes(), sid
    return course, expected, outcomes, before, after, solution, tmp


def test_every_hostile_case_earns_what_its_honest_parts_earn(graded):
    _, expected, outcomes, *_ = graded
    problems = []
    for name, want in expected.items():
        got = outcomes[name]
        if got.status != want.status:
            problems.append(f"{name}: status {got.status} ({got.message})")
        if want.score is not None and got.score != want.score:
            problems.append(f"{name}: score {got.score} != {want.score} ({got.message}) {got.exercises}")
        if want.report and want.report not in got.message:
            problems.append(f"{name}: report lacks {want.report!r}: {got.message!r}")
        for ex in want.zero:
            if got.exercises.get(ex):
                problems.append(f"{name}: {ex} should score 0, got {got.exercises[ex]}")
    assert not problems, "\n".join(problems)


def test_nothing_leaks_out_of_the_sandbox(graded):
    course, expected, *_ = graded
    for name in expected:
        notebook = course / "autograded" / name / LAB / f"{LAB}.ipynb"
        if notebook.is_file():
            nb = nbformat.read(notebook, as_version=4)
            printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
            assert "BREACH" not in printed, (name, printed[:500])


def test_nothing_outside_the_work_folders_changed(graded):
    _, _, _, before, after, *_ = graded
    assert before == after


def test_gradebook_is_consistent(graded):
    from nbgrader.api import Gradebook

    course, _, outcomes, *_ = graded
    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "qcourse") as gb:
        rows = {s.id: gb.find_submission(LAB, s.id).score for s in gb.students}
        assert len(gb.assignment_submissions(LAB)) == len(outcomes)
    assert rows == {sid: o.score for sid, o in outcomes.items()}


def test_honest_students_get_the_grade_they_get_alone(graded, real_lab_classes):
    _, _, outcomes, *_ = graded
    benign = real_lab_classes(LAB)  # the same notebooks, graded in a class with no hostile case
    alone = {name: benign.outcomes[there].score for name, there in HONEST.items()}
    assert alone == {"alice": cases.FULL, "bob": 0.0, "carol": cases.FULL - 1}
    assert {s: outcomes[s].score for s in alone} == alone
    again = autograde({"carol": benign.subs / "carol.ipynb"}, LAB, course_root=benign.course, force=True, log=print)
    assert again[0].score == alone["carol"]


def test_docs_table_lists_every_case():
    text = (build_mod.REPO / "docs" / "hostile-submissions.md").read_text()
    solution = load_master(find_masters(build_mod.COURSE)[LAB])
    import tempfile

    model_solution = load_master(find_masters(build_mod.COURSE)[cases.MODEL_LAB])
    with tempfile.TemporaryDirectory() as tmp:
        names = cases.build(Path(tmp), Path(tmp), solution, build_mod.REPO)
        names.update(cases.build_model_lab(Path(tmp) / "model", Path(tmp), model_solution, build_mod.REPO))
    for name in names:
        assert f"`{name}`" in text, name


@pytest.fixture(scope="module")
def graded_model_lab(tmp_path_factory):
    """Lab 2's cases (it calibrates on a model's activations) in one class with two honest students."""
    tmp = tmp_path_factory.mktemp("hostile-model-lab")
    course = scratch_course(tmp / "course")
    lab = cases.MODEL_LAB
    solution = load_master(find_masters(course)[lab])
    subs = tmp / "subs"
    expected = cases.build_model_lab(subs, course, solution, build_mod.REPO)
    nbformat.write(solution, subs / "dora.ipynb")
    shutil.copy(build_mod.REPO / "labs" / f"{lab}.ipynb", subs / "ed.ipynb")
    outcomes = {o.student: o for o in autograde(collect(subs, lab), lab, jobs=2, course_root=course, log=print)}
    return course, expected, outcomes


def test_model_lab_hostile_cases_earn_what_their_honest_parts_earn(graded_model_lab):
    course, expected, outcomes = graded_model_lab
    assert (outcomes["dora"].score, outcomes["ed"].score) == (cases.MODEL_FULL, 0.0)
    problems = []
    for name, want in expected.items():
        got = outcomes[name]
        if got.status != want.status or got.score != want.score:
            problems.append(f"{name}: {got.status} {got.score} != {want.score} ({got.message}) {got.exercises}")
        if want.report not in got.message:
            problems.append(f"{name}: report lacks {want.report!r}: {got.message!r}")
        problems += [f"{name}: {ex} should score 0" for ex in want.zero if got.exercises.get(ex)]
        printed = "".join(o.get("text", "") for c in nbformat.read(
            course / "autograded" / name / cases.MODEL_LAB / f"{cases.MODEL_LAB}.ipynb", as_version=4).cells
            for o in c.get("outputs", []))
        if "BREACH" in printed:
            problems.append(f"{name}: read what the box hides")
    assert not problems, "\n".join(problems)
