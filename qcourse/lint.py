"""``qcourse check-masters``: the conventions a lab must keep before it reaches students."""
from __future__ import annotations

from pathlib import Path

import nbformat

from qcourse.master import MasterError, find_masters, load_master

SOLUTION_MARKS = ("### BEGIN SOLUTION", "### END SOLUTION")
HIDDEN_MARKS = ("### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")
DATA_SUFFIXES = (".npz", ".npy", ".pt", ".pth", ".safetensors", ".pkl", ".json", ".csv")


def _paired(source: str, begin: str, end: str) -> bool:
    """Markers come in order, never nested: BEGIN, END, BEGIN, END, ..."""
    depth = 0
    for line in source.splitlines():
        if begin in line:
            depth += 1
        elif end in line:
            depth -= 1
        if depth not in (0, 1):
            return False
    return depth == 0


def check_master(path: Path) -> list[str]:
    """Problems with one master (empty when it keeps every convention)."""
    try:
        nb = load_master(path)
    except MasterError as e:
        return [str(e)]
    problems, seen = [], set()
    for i, cell in enumerate(nb.cells):
        meta = cell.metadata.get("nbgrader", {})
        where = f"{path.name} cell {i}"
        gid = meta.get("grade_id")
        if gid:
            if gid in seen:
                problems.append(f"{where}: grade id {gid!r} is used twice")
            seen.add(gid)
        has_solution = any(m in cell.source for m in SOLUTION_MARKS)
        has_hidden = any(m in cell.source for m in HIDDEN_MARKS)
        if has_solution and not meta.get("solution"):
            problems.append(f"{where}: solution markers outside a solution= cell")
        if has_solution and not _paired(cell.source, *SOLUTION_MARKS):
            problems.append(f"{where}: unpaired or nested solution markers")
        if has_hidden and not meta.get("grade"):
            problems.append(f"{where}: hidden-test markers outside a tests= cell")
        if has_hidden and not _paired(cell.source, *HIDDEN_MARKS):
            problems.append(f"{where}: unpaired or nested hidden-test markers")
        if meta.get("solution") and cell.cell_type == "code" and not has_solution:
            problems.append(f"{where}: a solution= cell without ### BEGIN/END SOLUTION")
        if meta.get("grade") and (not meta.get("locked") or not meta.get("points")):
            problems.append(f"{where}: a graded cell must be locked and carry points")
    if not any(c.metadata.get("nbgrader", {}).get("grade") for c in nb.cells):
        problems.append(f"{path.name}: no graded cell")
    return problems


def check_release(lab_notebook: Path) -> list[str]:
    """A student notebook must hold no solution and no hidden-test text."""
    try:
        nb = nbformat.read(lab_notebook, as_version=4)
    except Exception as e:
        return [f"{lab_notebook}: unreadable ({e})"]
    bad = [m for c in nb.cells for m in SOLUTION_MARKS + HIDDEN_MARKS if m in c.source]
    return [f"{lab_notebook.name}: contains {m!r}" for m in sorted(set(bad))]


def check_course(course_root: Path, labs_dir: Path) -> list[str]:
    """Every master, every released lab, and no data file inside ``course/source/<lab>/``."""
    problems = []
    for lab, path in find_masters(course_root).items():
        problems += check_master(path)
        released = labs_dir / f"{lab}.ipynb"
        if released.is_file():
            problems += check_release(released)
        source = course_root / "source" / lab
        if source.is_dir():
            problems += [f"{p}: data file inside course/source/{lab}/ would be copied to students"
                         for p in source.rglob("*") if p.suffix in DATA_SUFFIXES]
    return problems
