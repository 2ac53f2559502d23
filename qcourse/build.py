"""``qcourse build``: masters -> nbgrader source -> student labs, and executed solutions.

For each lab: ``course/masters/<lab>.py`` -> ``course/source/<lab>/<lab>.ipynb`` (with solutions
and hidden tests) -> nbgrader ``generate_assignment`` -> ``labs/<lab>.ipynb`` (what students
open); the source executed top to bottom -> ``solutions/<lab>.ipynb`` (with its plots and
tables). ``--check`` builds into a scratch folder and fails when ``labs/`` or the code of
``solutions/`` differs from what is committed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from qcourse.install_source import colab_url, origin_url
from qcourse.master import find_masters, load_master

REPO = Path(__file__).resolve().parents[1]
COURSE = REPO / "course"


class BuildError(RuntimeError):
    """A build step failed; the message says which lab and why."""


def known_labs(course_root: Path = COURSE) -> list[str]:
    return list(find_masters(course_root))


def resolve_labs(names: list[str] | None, course_root: Path = COURSE) -> list[str]:
    """The labs to work on: all when ``names`` is empty; an unknown name lists the known ones."""
    labs = known_labs(course_root)
    if not names:
        return labs
    unknown = [n for n in names if n not in labs]
    if unknown:
        raise BuildError(f"unknown lab {', '.join(unknown)}; known labs: {', '.join(labs) or '(none)'}")
    return names


def write_notebook(nb, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.validate(nb)
    path.write_text(nbformat.writes(nb) + "\n", encoding="utf-8")


def nbgrader(args: list[str], course_root: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the nbgrader command line in ``course_root`` (which holds nbgrader_config.py)."""
    return subprocess.run(["nbgrader", *args], cwd=course_root, capture_output=True, text=True,
                          env=venv_env(env))


def venv_env(extra: dict | None = None) -> dict:
    """This process's environment with its Python's bin folder first on PATH (nbgrader runs
    ``alembic`` and ``jupyter`` from PATH) plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def generate_student_version(lab: str, course_root: Path) -> nbformat.NotebookNode:
    """nbgrader ``generate_assignment`` on ``source/<lab>``; returns the released notebook."""
    res = nbgrader(["generate_assignment", lab, "--force", "--log-level=WARN"], course_root)
    released = course_root / "release" / lab / f"{lab}.ipynb"
    if res.returncode or not released.is_file():
        raise BuildError(f"nbgrader generate_assignment {lab} failed:\n{res.stdout}\n{res.stderr}")
    return nbformat.read(released, as_version=4)


def execute(nb, cwd: Path, timeout: int = 1800, env: dict | None = None) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel (errors raise ``BuildError``)."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.from_dict(nb)
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    except CellExecutionError as e:
        raise BuildError(f"a cell failed while executing the solution:\n{str(e)[-3000:]}") from None
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


def drop_progress_bars(nb) -> nbformat.NotebookNode:
    """The notebook without its progress-bar widgets: tqdm's bars (``qcore.train.progress``) are
    closed when their loop ends, but a saved notebook keeps each as a widget view whose text form
    is the bar's first frame ("0%| | 0/16"), a stub in every reader without the live kernel.

    Example:
        >>> cell = nbformat.v4.new_code_cell("", outputs=[
        ...     nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {},
        ...                                                  "text/plain": "FP32:   0%|   | 0/16"}),
        ...     nbformat.v4.new_output("stream", text="FP32 test accuracy: 0.8482")])
        >>> [o.output_type for o in drop_progress_bars(nbformat.v4.new_notebook(cells=[cell])).cells[0].outputs]
        ['stream']
    """
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs
                            if "application/vnd.jupyter.widget-view+json" not in o.get("data", {})]
    nb.metadata.pop("widgets", None)  # their saved state, if any
    return nb


def build_lab(lab: str, course_root: Path, labs_dir: Path, solutions_dir: Path,
              qcore_source: str | None = None, run_solution: bool = True) -> None:
    """Build one lab into ``labs_dir`` and ``solutions_dir``."""
    source_nb = load_master(find_masters(course_root)[lab], qcore_source)
    write_notebook(source_nb, course_root / "source" / lab / f"{lab}.ipynb")
    student = generate_student_version(lab, course_root)
    write_notebook(student, labs_dir / f"{lab}.ipynb")
    if run_solution:
        env = {"QCOURSE_REFERENCE_DIR": str(course_root / "reference"), "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
        solved = execute(source_nb, cwd=labs_dir, env=env)
        write_notebook(drop_progress_bars(solved), solutions_dir / f"{lab}.ipynb")


def labs_readme(text: str, remote: str | None) -> str:
    """``labs/README.md`` with an "Open in Colab" link on each lab's row when ``remote`` is a public
    GitHub address (otherwise without that column): the table's rows are ``| lab | topic |``.

    Example:
        >>> table = "| lab | topic |\\n| --- | --- |\\n| lab01_x | formats |\\n"
        >>> print(labs_readme(table, "https://github.com/someone/qcourse"), end="")
        | lab | topic | Colab |
        | --- | --- | --- |
        | lab01_x | formats | [Open in Colab](https://colab.research.google.com/github/someone/qcourse/blob/main/labs/lab01_x.ipynb) |
        >>> labs_readme(labs_readme(table, "https://github.com/someone/qcourse"), None) == table
        True
    """
    linked = remote is not None and colab_url(remote, "any") is not None
    out = []
    for line in text.splitlines(keepends=True):
        cells = [c.strip() for c in line.strip().strip("|").split("|")][:2] if line.startswith("|") else []
        if len(cells) == 2:
            first = cells[0]
            if linked:
                separator = set(first) <= set("-: ")
                cells.append("Colab" if first == "lab" else "---" if separator else
                             f"[Open in Colab]({colab_url(remote, first)})")
            line = "| " + " | ".join(cells) + " |\n"
        out.append(line)
    return "".join(out)


def _code_of(path: Path) -> list[tuple[str, str, str]]:
    nb = nbformat.read(path, as_version=4)
    return [(c.get("id", ""), c.cell_type, c.source) for c in nb.cells]


def copy_course(course_root: Path, dest: Path) -> Path:
    """A copy of the course's hand-written parts (config, masters, references, reference
    generators with their judges) to build or grade in without touching the real one."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(course_root / "nbgrader_config.py", dest / "nbgrader_config.py")
    for part in ("masters", "reference", "refgen"):
        if (course_root / part).is_dir():
            shutil.copytree(course_root / part, dest / part)
    return dest


def check(labs: list[str], course_root: Path = COURSE, labs_dir: Path = REPO / "labs",
          solutions_dir: Path = REPO / "solutions", qcore_source: str | None = None) -> list[str]:
    """Problems found when comparing committed notebooks with a fresh build (empty: all good).

    Student labs must be byte-identical; solutions must have the same cells and code (their
    outputs hold timings and plots, which differ from run to run).
    """
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = copy_course(course_root, Path(tmp) / "course")
        for lab in labs:
            build_lab(lab, scratch, Path(tmp) / "labs", Path(tmp) / "solutions", qcore_source, run_solution=False)
            fresh = Path(tmp) / "labs" / f"{lab}.ipynb"
            committed = labs_dir / f"{lab}.ipynb"
            if not committed.is_file():
                problems.append(f"labs/{lab}.ipynb is missing: run `qcourse build {lab}`")
            elif committed.read_bytes() != fresh.read_bytes():
                problems.append(f"labs/{lab}.ipynb differs from a fresh build of its master: run `qcourse build {lab}`")
            solution = solutions_dir / f"{lab}.ipynb"
            source = scratch / "source" / lab / f"{lab}.ipynb"
            if not solution.is_file():
                problems.append(f"solutions/{lab}.ipynb is missing: run `qcourse build {lab}`")
            elif _code_of(solution) != _code_of(source):
                problems.append(f"solutions/{lab}.ipynb holds other code than its master: run `qcourse build {lab}`")
    readme = labs_dir / "README.md"
    if readme.is_file() and readme.read_text() != labs_readme(readme.read_text(), origin_url(REPO)):
        problems.append("labs/README.md lacks this repository's Colab links: run `qcourse build`")
    return problems


def build(labs: list[str], course_root: Path = COURSE, labs_dir: Path = REPO / "labs",
          solutions_dir: Path = REPO / "solutions", qcore_source: str | None = None,
          run_solution: bool = True, log=print) -> None:
    for lab in labs:
        log(f"building {lab} ...")
        build_lab(lab, course_root, labs_dir, solutions_dir, qcore_source, run_solution)
        log(f"  labs/{lab}.ipynb" + (f", solutions/{lab}.ipynb" if run_solution else ""))
    readme = labs_dir / "README.md"
    if readme.is_file():  # Colab links for the repository's public address, when it has one
        readme.write_text(labs_readme(readme.read_text(), origin_url(REPO)))
