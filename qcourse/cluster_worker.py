"""The worker's half of ``qcourse autograde --cluster``: can this machine grade, and grade one submission.

A Dask worker grades with the same ``grade_one`` as local grading (the real ``nbgrader autograde``,
the kernel boxed by ``qcourse.sandbox``), in a scratch folder under the worker's local directory,
and returns the outcome and the files it produced as data: it never writes into the instructor's
course. What it grades with arrives from the instructor as a *course bundle* (``course_bundle``):
the config, the lab's master, its reference generator and references, and the course secret that
seeds the judged tests' inputs. So a worker needs no checkout of the course, only the course's
environment (the same ``qcourse`` code and nbgrader), the prepared model cache and bubblewrap.

``can_grade(expected)`` says what a worker lacks for that. It runs when a worker joins
(``GraderCheck``, registered by the instructor's process: only a worker that passes it gets the
resource that grading tasks ask for, so a worker that cannot grade is never handed a submission)
and, as a preload, when a worker starts (``dask worker ADDRESS --preload qcourse.cluster_worker``
logs the check before any instructor connects).
"""
from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import logging
import sys
import tarfile
import tempfile
import threading
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

try:  # distributed is the optional ``cluster`` extra: without it this module still imports
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover - exercised by the packaging tests' plain install
    WorkerPlugin = object

import qcore

logger = logging.getLogger("qcourse.cluster")
PACKAGES = (Path(qcore.__file__).parent, Path(__file__).parent)  # qcore/ and qcourse/


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 (16 hex digits) of every ``.py`` file of ``qcore`` and ``qcourse``: two machines grade
    alike only when they run the same code, whatever the version number says.

    Example:
        >>> len(code_fingerprint()), code_fingerprint() == code_fingerprint()
        (16, True)
    """
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package.parent).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def prepared_models() -> dict[str, str]:
    """``{model: sha256 of its qcourse.json}`` for every model prepared in the model cache."""
    from qcore.assets import cache_dir

    metas = sorted((cache_dir() / "models").glob("*/qcourse.json"))
    return {m.parent.name: hashlib.sha256(m.read_bytes()).hexdigest()[:16] for m in metas}


def facts() -> dict:
    """What this machine grades with: the code, nbgrader, the prepared models, the sandbox mode."""
    from importlib.metadata import PackageNotFoundError, version

    from qcourse import sandbox

    try:
        nbgrader = version("nbgrader")
    except PackageNotFoundError:
        nbgrader = ""
    return {"qcourse": qcore.__version__, "code": code_fingerprint(), "nbgrader": nbgrader,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}", "models": prepared_models(),
            "sandbox": sandbox.mode()}


def can_grade(expected: dict) -> list[str]:
    """What this machine lacks to grade as ``expected`` (the instructor's ``facts()``); empty: it can.

    A worker may box kernels better than the instructor's machine (bubblewrap where the instructor has
    only limits), never worse; it must run the same code and nbgrader and hold the same prepared models.

    Example:
        >>> can_grade(facts())
        []
        >>> print(*can_grade({**facts(), "code": "0" * 16}))  # doctest: +ELLIPSIS
        other qcourse/qcore code (0.1.0, code ...; the instructor runs 0.1.0, code 0000000000000000): install ...
    """
    have, problems = facts(), []
    if (have["qcourse"], have["code"]) != (expected["qcourse"], expected["code"]):
        problems.append(f"other qcourse/qcore code ({have['qcourse']}, code {have['code']}; the instructor runs "
                        f"{expected['qcourse']}, code {expected['code']}): install the course's environment "
                        "from the same checkout (make setup, or pip install -r requirements.lock and -e .)")
    if not have["nbgrader"]:
        problems.append("nbgrader is not installed: pip install 'qcourse[instructor,cluster]'")
    elif have["nbgrader"] != expected["nbgrader"]:
        problems.append(f"nbgrader {have['nbgrader']}, the instructor runs {expected['nbgrader']}")
    missing = sorted(m for m, h in expected["models"].items() if have["models"].get(m) != h)
    if missing:
        from qcore.assets import cache_dir

        problems.append(f"model cache {cache_dir()} lacks {', '.join(missing)} as the instructor prepared "
                        "them: run make setup (python -m qcore.zoo prepare) or copy the instructor's cache")
    if expected["sandbox"] == "bubblewrap" and have["sandbox"] != "bubblewrap":
        problems.append("bubblewrap is missing or refused (the instructor's machine boxes kernels with it): "
                        "apt-get install bubblewrap, and allow unprivileged user namespaces")
    return problems


# ----------------------------------------------------------------------------- joining the cluster
_CHECKS: dict[tuple[str, str], list[str]] = {}  # (worker address, resource) -> what it lacks


class GraderCheck(WorkerPlugin):
    """Registered by the instructor's process (``Client.register_plugin``): every worker, present or
    joining later, checks that it can grade; one that can gets ``resource`` (one unit per thread),
    one that cannot logs what it lacks and never receives a grading task."""

    def __init__(self, expected: dict, resource: str):
        self.expected, self.resource, self.name = expected, resource, f"qcourse-check-{resource}"

    async def setup(self, worker):
        problems = await asyncio.get_running_loop().run_in_executor(None, can_grade, self.expected)
        _CHECKS[(worker.address, self.resource)] = problems
        if problems:
            logger.warning("qcourse: this worker cannot grade: %s", "; ".join(problems))
        else:
            await worker.set_resources(**{self.resource: worker.state.nthreads})


def check_report(resource: str, dask_worker=None) -> list[str] | None:
    """What the worker this runs on lacks (``Client.run``); ``None``: not checked yet."""
    return _CHECKS.get((dask_worker.address, resource))


def dask_setup(worker) -> None:
    """``dask worker ... --preload qcourse.cluster_worker``: say at start what this worker grades with
    and what it lacks against its own environment (the instructor's check follows when it connects)."""
    import qcourse.autograde  # noqa: F401  what every grading task imports (torch, the judge): paid at start, not by the first submission

    have = facts()
    problems = can_grade({**have, "sandbox": "bubblewrap"})
    if not have["models"]:
        problems.append("the model cache holds no prepared model (labs 3-5 need them): run make setup")
    logger.warning("qcourse worker %s: qcourse %s (code %s), nbgrader %s, sandbox %s, models: %s%s", worker.address,
                   have["qcourse"], have["code"], have["nbgrader"] or "missing", have["sandbox"],
                   ", ".join(have["models"]) or "none", "; lacks: " + "; ".join(problems) if problems else "")


# ----------------------------------------------------------------------------- grading
def course_bundle(course_root: Path, lab: str) -> bytes:
    """What a worker needs of the course to grade ``lab``, as a reproducible ``.tar.gz``: the config,
    the lab's master, its reference generator and references, the course secret.

    Example:
        >>> import tempfile
        >>> from qcourse.build import COURSE, copy_course
        >>> course = copy_course(COURSE, Path(tempfile.mkdtemp()) / "course")
        >>> b = course_bundle(course, "lab01_precision_formats")
        >>> b == course_bundle(course, "lab01_precision_formats"), len(b) < 2**20
        (True, True)
        >>> names = tarfile.open(fileobj=io.BytesIO(b)).getnames()
        >>> sorted(n for n in names if not n.startswith("reference/"))
        ['.qcourse/secret', 'masters/lab01_precision_formats.py', 'nbgrader_config.py', 'refgen/lab01_precision_formats.py']
    """
    from qcourse import judge
    from qcourse.master import find_masters

    root = Path(course_root)
    judge.course_secret(root)  # made on first use, before it is read for the bundle
    paths = [root / "nbgrader_config.py", find_masters(root)[lab], root / "refgen" / f"{lab}.py",
             root / ".qcourse" / "secret"]
    refs = root / "reference" / lab
    paths += sorted(p for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    buffer = io.BytesIO()
    # gzip's header time fixed: the same course gives the same bytes
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for path in paths:
            if path.is_file():
                info = tarfile.TarInfo(path.relative_to(root).as_posix())
                info.size, info.mode = path.stat().st_size, 0o600
                tar.addfile(info, io.BytesIO(path.read_bytes()))
    return buffer.getvalue()


def pass_bundle(bundle: bytes) -> bytes:
    """The bundle as a task of its own: the scheduler keeps it and recomputes it when the worker
    holding it dies, and each worker fetches it once, not once per submission."""
    return bundle


_PREPARING = threading.Lock()


def _unpack(lab: str, bundle: bytes, local_directory: str) -> tuple[Path, Path]:
    """The unpacked course and its prepared assignment for one bundle, made once per worker."""
    from qcourse.autograde import prepare_assignment

    scratch = Path(local_directory, "qcourse", f"{lab}-{hashlib.sha256(bundle).hexdigest()[:16]}")
    # the assignment inside the course: the box hides the course (grade_one's course_root), so the
    # kernel sees neither wherever the worker's local directory is (not only under /tmp or home)
    course = scratch / "course"
    template = course / ".assignment"
    with _PREPARING:  # a worker with several threads prepares the assignment once
        if not (template / ".ready").is_file():
            with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
                tar.extractall(course, filter="data")  # the instructor's own files; "data" refuses escapes
            prepare_assignment(lab, course, template)
            (template / ".ready").touch()
    return course, template


def grade_submission(lab: str, student: str, notebook: bytes, bundle: bytes, timeout: float | None) -> dict:
    """The grading task: ``grade_one`` on this worker; returns ``{"outcome": ..., "files": ...}``
    (the outcome as a dict, naming this worker and its sandbox mode; the files as in
    ``autograde.graded_files``). Nothing is written outside the worker's local directory and one
    temporary grading folder (named in ``<local directory>/qcourse/grading/<student>`` meanwhile)."""
    from distributed import get_worker

    from qcourse import sandbox
    from qcourse.autograde import grade_one, graded_files

    worker = get_worker()
    course, template = _unpack(lab, bundle, worker.local_directory)
    # graded in the system's temporary folder, not under the worker's local directory: the kernel's
    # unix sockets live in the grading folder, and a socket path may hold 107 bytes at most
    with tempfile.TemporaryDirectory(prefix="qcourse-") as tmp:
        marker = Path(worker.local_directory, "qcourse", "grading", student)  # what this worker is on, and where
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(tmp)
        try:
            submitted = Path(tmp, "submitted.ipynb")
            submitted.write_bytes(notebook)
            outcome = grade_one(lab, student, submitted, template, Path(tmp, "work"), timeout, course)
            files = graded_files(Path(tmp, "work"), lab, student)
        finally:
            marker.unlink(missing_ok=True)
    outcome.worker, outcome.sandbox = str(worker.address), sandbox.mode()
    return {"outcome": asdict(outcome), "files": files}
