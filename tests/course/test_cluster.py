"""``qcourse autograde --cluster``: a real Dask scheduler and two workers on 127.0.0.1 grade a
small class of the tiny fixture lab exactly as local grading does, even with a worker killed
mid-submission; an unreachable scheduler or a missing ``distributed`` is a clear error."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from qcourse import build as build_mod
from qcourse.autograde import autograde, state_dir
from qcourse.cluster_local import LocalCluster
from qcourse.master import find_masters, load_master
from qcourse.submissions import collect

distributed = pytest.importorskip("distributed")

FIXTURE = Path(__file__).parent / "fixture"
LAB = "lab00_tiny"
BIN = Path(sys.executable).parent
HOSTILE_CELL = """def square(x):
    import os, socket
    for path in ("/work", os.path.expanduser("~"), "/etc/shadow"):  # the checkout, the home, secrets
        try:
            os.listdir(path) if os.path.isdir(path) else open(path).read()
            print("saw", path)
        except OSError:
            pass
    try:
        socket.create_connection(("127.0.0.1", 8786), timeout=1)  # the scheduler's default port
    except OSError:
        pass
    return x * x
"""


@pytest.fixture(scope="module")
def course(tmp_path_factory) -> Path:
    """The tiny fixture lab, built, with its course secret made: copies of it grade alike."""
    root = tmp_path_factory.mktemp("cluster-course") / "course"
    root.mkdir()
    shutil.copy2(build_mod.COURSE / "nbgrader_config.py", root / "nbgrader_config.py")
    shutil.copytree(FIXTURE / "masters", root / "masters")
    build_mod.build([LAB], root, root / "labs", root / "solutions", run_solution=False, log=lambda *_: None)
    from qcourse.judge import course_secret

    course_secret(root)
    return root


def _copy(course: Path, dest: Path) -> Path:
    shutil.copytree(course, dest, ignore=shutil.ignore_patterns("gradebook.db", "submitted", "autograded",
                                                                "feedback", "reports", "state"))
    return dest


@pytest.fixture(scope="module")
def submissions(course, tmp_path_factory) -> Path:
    """Honest (perfect), wrong (passes the visible check only), hostile (looks around, calls out,
    pastes a graded cell twice) and corrupt."""
    subs = tmp_path_factory.mktemp("cluster-subs")
    solution = load_master(find_masters(course)[LAB])  # the master is the solution
    nbformat.write(solution, subs / "perfect.ipynb")
    wrong = nbformat.from_dict(solution)
    next(c for c in wrong.cells if c.get("id") == "ex2_cube").source = "def cube(x):\n    return x * x * abs(x)\n"
    nbformat.write(wrong, subs / "wrong.ipynb")
    hostile = nbformat.from_dict(solution)
    square = next(c for c in hostile.cells if c.get("id") == "ex1_square")
    square.source = HOSTILE_CELL
    hostile.cells.append(nbformat.from_dict(square))  # a graded cell twice: the copy goes
    nbformat.write(hostile, subs / "hostile.ipynb")
    (subs / "corrupt.ipynb").write_text('{"cells": [')
    return subs


@pytest.fixture(scope="module")
def local_grades(course, submissions, tmp_path_factory) -> dict:
    root = _copy(course, tmp_path_factory.mktemp("local") / "course")
    return _grades(autograde(collect(submissions, LAB), LAB, jobs=1, course_root=root, log=lambda *_: None))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("dask"))
    try:
        for name in ("w1", "w2"):
            cluster.add_worker(name)
        cluster.wait_for(2)
        yield cluster
    finally:
        cluster.stop()


def _grades(outcomes) -> dict:
    return {o.student: (o.status, o.score, o.exercises, o.message) for o in outcomes}


def _gradebook(course: Path) -> dict:
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}", "qcourse") as gb:
        return {s.id: gb.find_submission(LAB, s.id).score for s in gb.students}


def test_the_cluster_grades_as_local_grading_does(cluster, course, submissions, local_grades, tmp_path):
    assert local_grades["perfect"][:2] == ("graded", 5) and local_grades["wrong"][2] == {"ex1_tests": 2, "ex2_tests": 0}
    assert local_grades["hostile"][1] == 5 and "duplicate of ex1_square" in local_grades["hostile"][3]
    root = _copy(course, tmp_path / "course")
    lines = []
    outcomes = autograde(collect(submissions, LAB), LAB, course_root=root, cluster=str(cluster.scheduler_file),
                         log=lines.append)
    assert _grades(outcomes) == local_grades
    assert _gradebook(root) == {sid: g[1] for sid, g in local_grades.items()}
    from qcourse.sandbox import mode

    assert {o.sandbox for o in outcomes} == {mode()} and all(o.worker.startswith("tcp://127.0.0.1:") for o in outcomes)
    assert "Hidden tests failed" in (root / "feedback" / "wrong" / LAB / f"{LAB}.html").read_text()
    assert (root / "autograded" / "perfect" / LAB / f"{LAB}.ipynb").is_file()
    per_worker = [ln for ln in lines if ln.startswith("  worker tcp://")]
    assert sum(int(ln.split(": ")[1].split()[0]) for ln in per_worker) == len(local_grades), lines
    # a re-run grades nothing: every notebook is unchanged
    again = autograde(collect(submissions, LAB), LAB, course_root=root, cluster="tcp://127.0.0.1:1", log=print)
    assert _grades(again) == local_grades


@pytest.mark.slow  # about 30 s on one core: the killed worker's submission is graded again
def test_a_worker_killed_mid_submission_loses_nothing(cluster, course, submissions, local_grades, tmp_path):
    root = _copy(course, tmp_path / "course")
    lines, result = [], {}
    run = threading.Thread(target=lambda: result.update(outcomes=autograde(
        collect(submissions, LAB), LAB, course_root=root, cluster=str(cluster.scheduler_file), log=lines.append)))
    run.start()
    deadline = time.monotonic() + 120
    while not any(cluster.grading(w) for w in cluster.workers) and time.monotonic() < deadline and run.is_alive():
        time.sleep(0.1)
    victim = next(w for w in cluster.workers if cluster.grading(w))
    cluster.kill(victim)
    run.join(timeout=300)
    assert not run.is_alive() and "outcomes" in result, lines
    assert _grades(result["outcomes"]) == local_grades
    assert _gradebook(root) == {sid: g[1] for sid, g in local_grades.items()}
    recorded = [ln.split(":")[0].strip() for ln in lines if not ln.startswith("  worker ")]
    assert sorted(recorded) == sorted(local_grades), lines  # each submission recorded exactly once
    states = {p.stem: json.loads(p.read_text())["worker"] for p in state_dir(root, LAB).glob("*.json")}
    assert set(states) == set(local_grades)


@pytest.mark.slow  # about 30 s: half a class on one worker, then the rest locally
def test_a_scheduler_that_goes_away_ends_the_run_and_a_rerun_grades_the_rest(course, submissions, local_grades,
                                                                              tmp_path):
    from qcourse.cluster import ClusterError

    root = _copy(course, tmp_path / "course")
    cluster = LocalCluster(tmp_path / "dask")
    result = {}

    def grade():
        try:
            autograde(collect(submissions, LAB), LAB, course_root=root, cluster=str(cluster.scheduler_file),
                      log=lambda *_: None)
        except ClusterError as e:
            result["error"] = str(e)

    try:
        cluster.add_worker("w1")
        cluster.wait_for(1)
        run = threading.Thread(target=grade)
        run.start()
        deadline = time.monotonic() + 120
        while not list(state_dir(root, LAB).glob("*.json")) and time.monotonic() < deadline and run.is_alive():
            time.sleep(0.1)
        os.kill(cluster.scheduler.pid, signal.SIGKILL)  # the scheduler's machine is gone
        run.join(timeout=120)
        assert not run.is_alive()
    finally:
        cluster.stop()
    kept = {p.stem for p in state_dir(root, LAB).glob("*.json")}
    assert 1 <= len(kept) < len(local_grades), kept
    assert "went away" in result.get("error", "") and "run the same command again" in result["error"], result
    said = re.search(r"(\d+) of (\d+) submissions were graded and recorded", result["error"])
    assert said and int(said[1]) == len(kept) < int(said[2]), result
    assert set(_gradebook(root)) >= kept
    lines = []
    again = autograde(collect(submissions, LAB), LAB, jobs=1, course_root=root, log=lines.append)  # locally, the rest
    assert _grades(again) == local_grades
    graded_now = {ln.split(":")[0].strip() for ln in lines if ln.startswith("  ") and ":" in ln}
    assert not graded_now & kept, lines  # what was recorded is not graded again
    assert _gradebook(root) == {sid: g[1] for sid, g in local_grades.items()}


def test_an_unreachable_scheduler_is_a_clear_error_and_records_nothing(course, submissions, tmp_path):
    root = _copy(course, tmp_path / "course")
    res = subprocess.run([str(BIN / "qcourse"), "--course", str(root), "autograde", str(submissions), "--lab", LAB,
                          "--cluster", "tcp://127.0.0.1:1", "--cluster-timeout", "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in res.stderr, res.stderr
    assert not (root / "gradebook.db").exists() and not list(state_dir(root, LAB).glob("*.json"))


def test_without_distributed_the_cluster_option_says_what_to_install(tmp_path):
    from qcourse.cluster import ClusterError, connect

    code = ("import sys; sys.modules['distributed'] = None\n"
            "from qcourse import cluster, cli\n"  # both import without distributed
            "try:\n    cluster.connect('tcp://127.0.0.1:1')\n"
            "except cluster.ClusterError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install 'qcourse[cluster]'" in out.stdout, out.stdout + out.stderr
    (tmp_path / "not-a-scheduler.json").write_text("{}")
    with pytest.raises(ClusterError, match="not a Dask scheduler file"):
        connect(str(tmp_path / "not-a-scheduler.json"))
