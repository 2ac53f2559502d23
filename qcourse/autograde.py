"""``qcourse autograde``: grade a class in parallel without one submission touching another.

nbgrader has no parallel mode and one sqlite gradebook. So each submission is graded by the
real ``nbgrader autograde`` in a private course folder of its own (config, source notebook and
a gradebook holding only the assignment): no submission sees another's files or grades, and a
crash, hang or tamper stays inside its folder. The parent process then writes every outcome
into the course gradebook, one at a time, and copies back the autograded notebook and its
feedback (hidden tests removed, see ``qcourse.feedback``).

Outcome of each student: ``graded`` (scores per exercise), ``invalid`` (not a notebook),
``timeout`` (the whole run exceeded its wall-time limit) or ``error`` (nbgrader failed).
Everything not graded scores 0 and says why in the report.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import nbformat

from qcourse import judge, sandbox
from qcourse.build import COURSE, REPO, venv_env, write_notebook
from qcourse.sandbox import Limits
from qcourse.master import exercises, find_masters, load_master

COURSE_ID = "qcourse"


@dataclass
class Outcome:
    """What grading one submission gave."""

    student: str
    status: str
    score: float = 0.0
    max_score: float = 0.0
    exercises: dict[str, float] = field(default_factory=dict)
    message: str = ""
    seconds: float = 0.0
    sha256: str = ""
    worker: str = ""    # what graded it: "local", or the Dask worker's address (qcourse.cluster)
    sandbox: str = ""   # the sandbox mode it was graded in (qcourse.sandbox.mode())


def _db_url(root: Path) -> str:
    return f"sqlite:///{root / 'gradebook.db'}"


def state_dir(course_root: Path, lab: str) -> Path:
    return course_root / ".qcourse" / "state" / lab


# nbgrader's command line, as its console script runs it, less one import: every nbgrader start
# imports jsonschema (through nbformat), which imports the optional ``rfc3987_syntax``, and that
# builds a Lark grammar for the "iri" string formats at import time: 2-4 s of CPU, more than the
# rest of nbgrader's imports, in each of the 2 runs per submission and 2 per class. Nothing in
# grading validates those formats (nbformat checks notebooks without a format checker), so the
# import is refused and jsonschema goes without the two formats. ``-P``: the working folder (a
# course folder holding student files) stays off ``sys.path``, as with the console script.
NBGRADER = [sys.executable, "-P", "-c",
            "import sys; sys.modules['rfc3987_syntax'] = None; sys.argv[0] = 'nbgrader'; "
            "from nbgrader.apps.nbgraderapp import main; sys.exit(main())"]


@lru_cache(maxsize=1)
def _empty_gradebook() -> bytes:
    """An empty gradebook of the installed nbgrader (its tables, its alembic revision), made once
    per process. nbgrader, creating a gradebook, learns its schema revision from an ``alembic
    heads`` subprocess (which imports all of nbgrader again: 5-10 s of CPU); a folder that starts
    with this file is spared that, and nbgrader fills it exactly as it would a new one."""
    from alembic.script import ScriptDirectory
    from nbgrader.api import Base
    from nbgrader.dbutil import ALEMBIC_DIR
    from sqlalchemy import create_engine, text

    with tempfile.TemporaryDirectory(prefix="qcourse-gradebook-") as tmp:
        engine = create_engine(_db_url(Path(tmp)))
        Base.metadata.create_all(bind=engine)  # what nbgrader.api.Gradebook does for a new file
        with engine.begin() as db:
            db.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            db.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"),
                       {"v": ScriptDirectory(ALEMBIC_DIR).get_current_head()})
        engine.dispose()
        return (Path(tmp) / "gradebook.db").read_bytes()


def prepare_assignment(lab: str, course_root: Path, dest: Path) -> None:
    """A course folder at ``dest`` holding only the config, the lab's source and its gradebook."""
    dest.mkdir(parents=True, exist_ok=True)
    if dest.resolve() != Path(course_root).resolve():
        shutil.copy2(course_root / "nbgrader_config.py", dest / "nbgrader_config.py")
    write_notebook(load_master(find_masters(course_root)[lab]), dest / "source" / lab / f"{lab}.ipynb")
    refs = Path(course_root) / "reference" / lab
    # a judged lab's kernel needs no reference file: its inputs come with the hidden cells
    if refs.is_dir() and dest.resolve() != Path(course_root).resolve() and not judge.hidden_tests(lab, course_root):
        shutil.copytree(refs, dest / "reference" / lab, dirs_exist_ok=True)
    if not (dest / "gradebook.db").exists():
        (dest / "gradebook.db").write_bytes(_empty_gradebook())
    res = subprocess.run([*NBGRADER, "generate_assignment", lab, "--force", "--log-level=WARN"], cwd=dest,
                         capture_output=True, text=True, env=venv_env())
    if res.returncode:
        raise RuntimeError(f"nbgrader generate_assignment {lab} failed:\n{res.stderr[-3000:]}")


def _run(cmd: list[str], cwd: Path, timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run a command in its own process group; kill the whole group on timeout."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=venv_env(env), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def _read_scores(work: Path, lab: str, student: str) -> dict[str, float]:
    from nbgrader.api import Gradebook

    with Gradebook(_db_url(work), COURSE_ID) as gb:
        sub = gb.find_submission(lab, student)
        return {g.name: float(g.score) for nb in sub.notebooks for g in nb.grades}


@lru_cache(maxsize=None)
def share_model_cache(cache: Path) -> None:
    """Make the model cache readable by the kernels' users (the box mounts it read-only; models
    prepared by older versions were written for their owner only)."""
    for path in [cache, *cache.rglob("*")]:
        st = path.lstat()
        if path.is_symlink() or st.st_uid != os.getuid():
            continue
        wanted = st.st_mode | (0o555 if path.is_dir() else 0o444)
        if st.st_mode != wanted:
            path.chmod(wanted)


def _sandbox_env(work: Path, lab: str, student: str, course_root: Path, limits: Limits, cgroup: str) -> dict:
    """Kernel spec and environment so that nbgrader starts this submission's kernel boxed.

    The kernel sees: the system read-only; not /tmp (other submissions' folders), not the home
    folder, not the checkout (solutions, tests, reference generators) nor the course (references,
    masters, sources, gradebook, submissions); back on top, read-only, the interpreter, the
    installed ``qcore``, the model cache, its connection file and, for a lab not judged outside
    the kernel, this lab's reference files; writable, only its own execution folder.
    """
    from qcore.assets import cache_dir

    exec_dir = work / "autograded" / student / lab
    for d in (work / "runtime", work / "reference", exec_dir):
        d.mkdir(parents=True, exist_ok=True)
    import qcore

    existing = lambda paths: [p for p in dict.fromkeys(Path(p).resolve() for p in paths) if p.exists()]
    # the checkout (solutions, tests, masters, reference generators) and the course are hidden;
    # back on top come the interpreter, the installed library and the model cache
    mounts = [("hide", p) for p in existing([tempfile.gettempdir(), "/tmp", Path.home(), REPO, course_root])]
    mounts += [("ro", p) for p in existing([sys.prefix, sys.base_prefix, Path(qcore.__file__).parent, cache_dir()])]
    # the runtime folder holds the kernel's connection file and its IPC sockets (the kernel has
    # no network, not even the grader's loopback, so the two talk over unix sockets)
    mounts += [("rw", work / "runtime"), ("ro", work / "reference"), ("rw", exec_dir)]
    uid = sandbox.kernel_uid(cgroup)  # the kernel's own unprivileged user, where the grader is root
    if uid is not None:
        if cache_dir().is_dir():
            share_model_cache(cache_dir().resolve())
        for d in (work / "runtime", exec_dir):  # the only places it may write
            os.chown(d, uid, uid)
    env = sandbox.write_kernel_spec(work, limits, mounts, cgroup, uid)
    # unix sockets at an absolute path both sides see (a relative one would resolve against two
    # different working folders); the connection file goes there too, via TMPDIR
    with open(work / "nbgrader_config.py", "a") as cfg:
        cfg.write(f"\nc.KernelManager.ip = {str(work / 'runtime' / 'k')!r}\n")
    env.update({"TMPDIR": str(work / "runtime"), "QCOURSE_REFERENCE_DIR": str(work / "reference"),
                "QCOURSE_PROGRESS_FILE": str(work / "progress")})
    return env


def sanitize(nb, source) -> list[str]:
    """Undo what would confuse nbgrader rather than earn points: a graded or locked cell pasted
    twice (the copy goes), nbgrader metadata on cells the lab does not have (dropped), and the
    kernel (always the lab's). nbgrader then restores every locked cell from the source."""
    known = {c.metadata["nbgrader"]["grade_id"] for c in source.cells if "nbgrader" in c.metadata}
    seen, kept, notes = set(), [], []
    for cell in nb.cells:
        meta = cell.get("metadata", {}).get("nbgrader")
        gid = meta.get("grade_id") if isinstance(meta, dict) else None
        if meta is not None and gid not in known:
            cell.metadata.pop("nbgrader")
            notes.append("grading metadata on an unknown cell was removed")
        elif gid is not None and gid in seen:
            notes.append(f"a duplicate of {gid} was removed")
            continue
        if gid is not None:
            seen.add(gid)
        kept.append(cell)
    nb.cells = kept
    nb.metadata["kernelspec"] = source.metadata.get("kernelspec", {})
    return list(dict.fromkeys(notes))


CRASHED_CELL = ('raise RuntimeError("qcourse: this cell stopped the kernel (a crash, an exit or running '
                'out of memory) and was skipped so the rest could be graded")\n')


def _neutralize(notebook: Path, index: int) -> str:
    """Replace the cell that killed the kernel (or, for a test cell, the solution it tests)."""
    nb = nbformat.read(notebook, as_version=4)
    if not 0 <= index < len(nb.cells):
        return ""
    target = index
    if nb.cells[index].metadata.get("nbgrader", {}).get("locked"):
        earlier = [i for i in range(index) if nb.cells[i].metadata.get("nbgrader", {}).get("solution")]
        if not earlier:
            return ""
        target = earlier[-1]
    nb.cells[target].source = CRASHED_CELL
    nbformat.write(nb, notebook)
    return f"cell {target + 1} stopped the kernel and was skipped"


def grade_one(lab: str, student: str, notebook: Path, template: Path, work: Path,
              timeout: float | None = None, course_root: Path = COURSE, attempts: int = 3) -> Outcome:
    """Autograde one submission inside ``work`` (a private copy of ``template``), kernel boxed.

    A kernel that dies (``os._exit``, a segfault, the memory cap) is pinned on the cell that was
    running; that cell is skipped and the notebook graded again, so the rest still earns points.
    """
    start = time.time()
    limits = sandbox.load_limits(template)
    timeout = timeout or limits.wall_seconds
    max_points = {e.grade_id: float(e.points) for e in exercises(
        nbformat.read(template / "source" / lab / f"{lab}.ipynb", as_version=4))}
    outcome = Outcome(student, "graded", max_score=sum(max_points.values()),
                      exercises={k: 0.0 for k in max_points})
    try:
        data = notebook.read_bytes()
        outcome.sha256 = hashlib.sha256(data).hexdigest()
        nb = nbformat.reads(data.decode("utf-8"), as_version=4)
    except Exception as e:  # not UTF-8, not JSON, not a notebook
        outcome.status, outcome.message = "invalid", f"not a readable notebook: {type(e).__name__}: {str(e)[:200]}"
        return outcome
    shutil.copytree(template, work, dirs_exist_ok=True)
    target = work / "submitted" / student / lab / f"{lab}.ipynb"
    target.parent.mkdir(parents=True, exist_ok=True)
    source = nbformat.read(template / "source" / lab / f"{lab}.ipynb", as_version=4)
    notes_in = sanitize(nb, source)
    tests = judge.hidden_tests(lab, course_root)
    if tests:  # judged outside the kernel: cells that reach past their own objects are not run
        notes_in += judge.skip_tampering(nb, source)
    target.write_text(nbformat.writes(nb), encoding="utf-8")
    drawn = _ask_questions(work, lab, student, source, tests, course_root) if tests else {}
    # one name per grading folder: two runs in one process (threads) may grade the same student id
    cgroup = f"qcourse-{os.getpid()}-{hashlib.sha256(str(work).encode()).hexdigest()[:8]}-{student}"[:60]
    env = _sandbox_env(work, lab, student, course_root, limits, cgroup)
    notes = list(notes_in)
    try:
        for _ in range(attempts):
            left = timeout - (time.time() - start)
            (work / "progress").unlink(missing_ok=True)
            code, log = _run([*NBGRADER, "autograde", lab, "--student", student, "--create", "--force"],
                             work, max(1.0, left), env=env) if left > 0 else (None, "")
            sandbox.kill_cgroup(cgroup)
            died = code not in (0, None) and "DeadKernel" in log + _nbgrader_log(work)
            if not died or not (work / "progress").is_file():
                break
            note = _neutralize(target, int((work / "progress").read_text() or -1))
            if not note:
                break
            notes.append(note)
    finally:
        sandbox.kill_cgroup(cgroup)
    notes += sandbox.held_caps(work)
    if code is None:
        outcome.status, outcome.message = "timeout", f"stopped after {timeout:.0f} s (wall-time limit)"
    elif code != 0 or not (work / "autograded" / student / lab).is_dir():
        outcome.status, outcome.message = "error", "nbgrader could not grade it: " + _last_error(log)
    else:
        if tests:
            notes += _judge_answers(work, lab, student, tests, drawn, max_points)
        scores = _read_scores(work, lab, student)
        outcome.exercises = {k: scores.get(k, 0.0) for k in max_points}
        outcome.score = sum(outcome.exercises.values())
        outcome.message = "; ".join(notes + _flags(work / "autograded" / student / lab / f"{lab}.ipynb"))
        _run([*NBGRADER, "generate_feedback", lab, "--student", student, "--force"], work, 300)
    outcome.seconds = round(time.time() - start, 2)
    return outcome


def _ask_questions(work: Path, lab: str, student: str, source, tests: dict, course_root: Path) -> dict:
    """Draw this submission's inputs for every judged hidden test (from the course secret) and write
    them into that test cell's source in the private gradebook, from which nbgrader restores the
    locked cells before running: they enter the kernel only when the cell runs."""
    from nbgrader.api import Gradebook
    from nbgrader.utils import compute_checksum

    secret = judge.course_secret(course_root)
    cells = {c.metadata["nbgrader"]["grade_id"]: c for c in source.cells if "nbgrader" in c.metadata}
    drawn = {}
    with Gradebook(_db_url(work), COURSE_ID) as gb:
        for gid, test in tests.items():
            drawn[gid] = judge.draw_inputs(test, judge.seed_for(secret, lab, student, gid))
            cell = copy.deepcopy(cells[gid])
            cell.source = judge.inject(cell.source, drawn[gid])
            stored = gb.find_source_cell(gid, lab, lab)
            stored.source, stored.checksum = cell.source, compute_checksum(cell)
        gb.db.commit()
    return drawn


def _judge_answers(work: Path, lab: str, student: str, tests: dict, drawn: dict, max_points: dict) -> list[str]:
    """Judge the answers in the autograded notebook and set those cells' scores in the private
    gradebook (feedback and the course gradebook read them there). A failing cell gets an error
    output saying so (the feedback shows it as "hidden tests failed")."""
    from nbgrader.api import Gradebook

    path = work / "autograded" / student / lab / f"{lab}.ipynb"
    nb = nbformat.read(path, as_version=4)
    scores, notes = {gid: 0.0 for gid in tests}, []
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid not in tests:
            continue
        verdict = judge.judge_cell(tests[gid], drawn[gid], cell)
        stderr = any(o.get("output_type") == "stream" and o.get("name") == "stderr" for o in cell.outputs)
        scores[gid] = max_points[gid] if verdict.passed and not stderr else 0.0  # nbgrader's stderr rule kept
        if not verdict.passed and not any(o.get("output_type") == "error" for o in cell.outputs):
            cell.outputs.append(nbformat.v4.new_output("error", ename="HiddenTestsFailed", evalue=verdict.reason,
                                                       traceback=[f"HiddenTestsFailed: {verdict.reason}"]))
        if verdict.lied:
            notes.append(f"possible tampering: the visible checks of {gid} passed in the kernel, "
                         "the judge failed the same answers")
    nbformat.write(nb, path)
    with Gradebook(_db_url(work), COURSE_ID) as gb:
        for gid, score in scores.items():
            gb.find_grade(gid, lab, lab, student).auto_score = score
        gb.db.commit()
    return notes


FLAGGED_ERRORS = {"TamperingDetected": "tampering with the checks", "Forbidden": "called a forbidden library function",
                  "CellTimeoutError": "a cell ran past the time limit"}


def _flags(autograded: Path) -> list[str]:
    """What the report should say about a graded notebook: tampering, forbidden calls, timeouts."""
    if not autograded.is_file():
        return []
    found = []
    for cell in nbformat.read(autograded, as_version=4).cells:
        for out in cell.get("outputs", []):
            reason = FLAGGED_ERRORS.get(out.get("ename", ""))
            if out.get("output_type") == "error" and reason:
                grade_id = cell.metadata.get("nbgrader", {}).get("grade_id", "a free cell")
                found.append(f"{reason} ({grade_id})")
    return list(dict.fromkeys(found))


def _nbgrader_log(work: Path) -> str:
    log = work / ".nbgrader.log"
    return log.read_text(errors="replace")[-20000:] if log.is_file() else ""


def _last_error(log: str) -> str:
    lines = [ln for ln in log.splitlines() if "ERROR" in ln or "Error" in ln]
    return (lines[-1] if lines else log.strip().splitlines()[-1] if log.strip() else "no output")[:300]


def record(outcome: Outcome, lab: str, course_root: Path) -> None:
    """Write one outcome into the course gradebook (replacing an earlier one of that student)."""
    import warnings

    from nbgrader.api import Gradebook, MissingEntry

    with warnings.catch_warnings(), Gradebook(_db_url(course_root), COURSE_ID) as gb:
        warnings.simplefilter("ignore")  # SQLAlchemy's autoflush notes inside nbgrader
        gb.update_or_create_student(outcome.student)
        try:
            gb.remove_submission(lab, outcome.student)
        except MissingEntry:
            pass
        sub = gb.add_submission(lab, outcome.student)
        for snb in sub.notebooks:
            for grade in snb.grades:
                grade.auto_score = outcome.exercises.get(grade.name, 0.0)
        gb.db.commit()


GRADED_FILES = ("autograded", "feedback")


def graded_files(work: Path, lab: str, student: str) -> dict[str, bytes]:
    """What grading one submission in ``work`` produced for the course folder, as data:
    ``{"autograded/<student>/<lab>/<file>": bytes, "feedback/...": bytes}`` (a cluster worker
    returns this; only the instructor's process writes it, with ``write_graded_files``)."""
    files = {}
    for kind in GRADED_FILES:
        folder = work / kind / student / lab
        for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
            if path.is_file() and not path.is_symlink():
                files[path.relative_to(work).as_posix()] = path.read_bytes()
    return files


def write_graded_files(course_root: Path, lab: str, student: str, files: dict[str, bytes]) -> None:
    """Replace the student's autograded notebook and feedback in the course with ``files``.

    Only paths under ``autograded/<student>/<lab>/`` and ``feedback/<student>/<lab>/`` are written:
    the files come from a worker, and nothing it returns may land elsewhere in the course.

    Example:
        >>> import tempfile; root = Path(tempfile.mkdtemp())
        >>> write_graded_files(root, "lab00", "ann", {"feedback/ann/lab00/lab00.html": b"<p>"})
        >>> (root / "feedback/ann/lab00/lab00.html").read_bytes()
        b'<p>'
        >>> write_graded_files(root, "lab00", "ann", {"feedback/bo/lab00/x.html": b""})
        Traceback (most recent call last):
        ...
        ValueError: refusing to write feedback/bo/lab00/x.html for ann's lab00
    """
    allowed = {kind: Path(kind, student, lab) for kind in GRADED_FILES}
    for name in files:
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not any(p in rel.parents for p in allowed.values()):
            raise ValueError(f"refusing to write {name} for {student}'s {lab}")
    for folder in allowed.values():
        if (course_root / folder).exists():
            shutil.rmtree(course_root / folder)
    for name, data in files.items():
        (course_root / name).parent.mkdir(parents=True, exist_ok=True)
        (course_root / name).write_bytes(data)


def to_grade(submissions: dict[str, Path], lab: str, course_root: Path, force: bool) -> tuple[dict, dict]:
    """``(todo, done)``: each submission copied into ``course/submitted/<student>/<lab>/``; ``todo``
    maps the students to grade to that copy, ``done`` holds the outcomes kept from an earlier run
    of the same notebook (same sha256; none when ``force``)."""
    states = state_dir(course_root, lab)
    states.mkdir(parents=True, exist_ok=True)
    todo, done = {}, {}
    for sid, src in submissions.items():
        nb = course_root / "submitted" / sid / lab / f"{lab}.ipynb"  # the import: a copy kept
        if Path(src).resolve() != nb.resolve():
            nb.parent.mkdir(parents=True, exist_ok=True)
            nb.write_bytes(Path(src).read_bytes())
        state = states / f"{sid}.json"
        digest = hashlib.sha256(nb.read_bytes()).hexdigest()
        if not force and state.is_file():
            previous = Outcome(**json.loads(state.read_text()))
            if previous.sha256 == digest:
                done[sid] = previous
                continue
        todo[sid] = nb
    return todo, done


def keep(outcome: Outcome, files: dict[str, bytes], lab: str, course_root: Path, log=print) -> None:
    """Record one outcome: the course gradebook, the student's files, the state that spares an
    unchanged notebook a regrade, a log line. Only the instructor's process calls this, one at a time."""
    record(outcome, lab, course_root)
    write_graded_files(course_root, lab, outcome.student, files)
    (state_dir(course_root, lab) / f"{outcome.student}.json").write_text(json.dumps(asdict(outcome), indent=1))
    log(f"  {outcome.student}: {outcome.status}, {outcome.score:g}/{outcome.max_score:g}"
        f" ({outcome.seconds:.1f} s){' - ' + outcome.message if outcome.message else ''}")


def autograde(submissions: dict[str, Path], lab: str, jobs: int = 1, force: bool = False,
              course_root: Path = COURSE, timeout: float | None = None, log=print,
              cluster: str | None = None, cluster_timeout: float = 20.0) -> list[Outcome]:
    """Grade every submission (in parallel with ``jobs`` workers); returns outcomes by student.

    Each submission is first copied into ``course/submitted/<student>/<lab>/``. Unchanged
    submissions already graded are not graded again unless ``force``. With ``cluster`` (a Dask
    scheduler's address or scheduler file) the workers of that scheduler grade instead
    (``qcourse.cluster``); this process still records every outcome.
    """
    course_root = Path(course_root)
    todo, outcomes = to_grade(submissions, lab, course_root, force)
    if todo and cluster:
        from qcourse.cluster import grade_on_cluster

        outcomes.update(grade_on_cluster(cluster, todo, lab, course_root, timeout, log=log,
                                         connect_timeout=cluster_timeout))
    elif todo:
        with tempfile.TemporaryDirectory(prefix="qcourse-grade-") as tmp:
            template = Path(tmp) / "template"
            # the course gradebook must know the lab before outcomes are recorded in it; the template
            # is its own folder: the two nbgrader runs are independent, one on each core
            _empty_gradebook()  # made once, before the two threads want it
            with ThreadPoolExecutor(max_workers=2) as pool:
                for done in [pool.submit(prepare_assignment, lab, course_root, dest) for dest in (course_root, template)]:
                    done.result()

            def work(item):
                sid, nb = item
                outcome = grade_one(lab, sid, nb, template, Path(tmp) / "work" / sid, timeout, course_root)
                outcome.worker, outcome.sandbox = "local", sandbox.mode()
                return outcome

            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                for outcome in pool.map(work, sorted(todo.items())):
                    files = graded_files(Path(tmp) / "work" / outcome.student, lab, outcome.student)
                    keep(outcome, files, lab, course_root, log)  # one writer: the parent, one at a time
                    outcomes[outcome.student] = outcome
    return [outcomes[s] for s in sorted(outcomes)]
