"""Lab masters: jupytext percent-format scripts with nbgrader roles on their ``# %%`` lines.

A master is the only hand-edited form of a lab (``course/masters/labNN_name.py``). It runs as
a plain Python script (the solution), and converts to an nbgrader source notebook::

    # %% [markdown]                      a markdown cell
    # %% locked="setup"                  read-only code cell
    # %% solution="ex1_decompose"        the student's cell (### BEGIN/END SOLUTION inside)
    # %% tests="ex1_tests" points=2      graded, read-only test cell (### BEGIN/END HIDDEN TESTS)
    # %%                                 an ordinary code cell (a demo, a plot)

``%pip install -q "{{QCORE_SOURCE}}"`` in the set-up cell becomes the install of the course library
from the source the build is given (``qcourse.install_source``).
Cell ids are derived from the lab name and position (or the grade id), so a rebuild of an
unchanged master gives byte-identical notebooks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jupytext
import nbformat

from qcourse.install_source import fill_install_line

ROLES = ("solution", "tests", "locked")
QCORE_SOURCE_MARK = "{{QCORE_SOURCE}}"
_ID_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class MasterError(ValueError):
    """A master that breaks the conventions above; the message names the cell."""


@dataclass(frozen=True)
class Exercise:
    """A graded test cell: its grade id and points."""

    grade_id: str
    points: float


def nbgrader_metadata(role: str, grade_id: str, points: float | None = None) -> dict:
    """nbgrader's cell metadata (schema 3) for a role.

    Example:
        >>> nbgrader_metadata("tests", "ex1_tests", 2)["points"]
        2
    """
    meta = {"grade": role == "tests", "grade_id": grade_id, "locked": role != "solution",
            "schema_version": 3, "solution": role == "solution", "task": False}
    if role == "tests":
        meta["points"] = points
    return meta


def load_master(path: Path, qcore_source: str | None = None) -> nbformat.NotebookNode:
    """Read a master into a notebook with nbgrader metadata and deterministic cell ids; its install
    line installs ``qcore_source`` (with ``None``, it stops and says that no source was given)."""
    path = Path(path)
    lab = path.stem
    try:
        nb = jupytext.read(path, fmt="py:percent")
    except Exception as e:  # jupytext raises many types on malformed input
        raise MasterError(f"{path}: cannot be read as a jupytext percent script: {e}") from e
    for i, cell in enumerate(nb.cells):
        meta = cell.metadata
        roles = [r for r in ROLES if r in meta]
        if len(roles) > 1:
            raise MasterError(f"{path} cell {i}: more than one role {roles}")
        for key in ("lines_to_next_cell", "cell_marker"):
            meta.pop(key, None)
        cell.id = f"{lab[:40]}-{i:03d}"
        if roles:
            role = roles[0]
            grade_id = meta.pop(role)
            points = meta.pop("points", None)
            if not isinstance(grade_id, str) or not _ID_OK.match(grade_id):
                raise MasterError(f"{path} cell {i}: {role}= needs an id of letters, digits, - or _")
            if role == "tests" and not (isinstance(points, (int, float)) and points > 0):
                raise MasterError(f"{path} cell {i}: tests={grade_id!r} needs points=N (N > 0)")
            if points is not None and role != "tests":
                raise MasterError(f"{path} cell {i}: points= belongs on a tests= cell")
            meta["nbgrader"] = nbgrader_metadata(role, grade_id, points)
            cell.id = grade_id
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
            cell.source = fill_install_line(cell.source, qcore_source)
            if QCORE_SOURCE_MARK in cell.source:
                raise MasterError(f"{path} cell {i}: {QCORE_SOURCE_MARK} belongs in one line, "
                                  f'`# %pip install -q "{QCORE_SOURCE_MARK}"`')
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


def exercises(nb: nbformat.NotebookNode) -> list[Exercise]:
    """The graded test cells of a notebook, in order.

    Example:
        >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("pass")])
        >>> nb.cells[0].metadata["nbgrader"] = nbgrader_metadata("tests", "t1", 3)
        >>> exercises(nb)
        [Exercise(grade_id='t1', points=3)]
    """
    out = []
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if meta.get("grade"):
            out.append(Exercise(meta["grade_id"], meta.get("points", 0)))
    return out


def masters_dir(course_root: Path) -> Path:
    return Path(course_root) / "masters"


def find_masters(course_root: Path) -> dict[str, Path]:
    """``{lab name: master path}`` for every ``labNN_*.py`` in ``course/masters``."""
    return {p.stem: p for p in sorted(masters_dir(course_root).glob("lab[0-9][0-9]_*.py"))}
