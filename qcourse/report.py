"""The class report of an autograde run: ``grades.csv``, pass rates per exercise, a histogram."""
from __future__ import annotations

import csv
import re
from pathlib import Path

LMS_FORMATS = ("canvas", "moodle")
# Canvas names each file of "Download Submissions" <sortable name>[_LATE]_<user id>_<submission id>_<file>;
# the student id qcourse derives from it keeps the first three parts: the user id is Canvas's "ID"
_CANVAS_DOWNLOAD = re.compile(r"^[^_]+(?:_LATE)?_(\d+)_\d+(?:_|$)")


def canvas_user_id(student: str) -> str:
    """Canvas's user id in a student id made from a Canvas download name, else ``""``.

    Example:
        >>> canvas_user_id("smithjane_12345_678901"), canvas_user_id("smithjane_LATE_12345_678901_lab"), canvas_user_id("alice")
        ('12345', '12345', '')
    """
    found = _CANVAS_DOWNLOAD.match(student)
    return found.group(1) if found else ""


def write_lms_gradebook(outcomes, lms: str, out_dir: Path, assignment: str, max_score: float) -> Path:
    """``grades-<lms>.csv``: the total of each student in the layout the LMS gradebook imports.

    - ``canvas``: ``Student,ID,SIS User ID,SIS Login ID,Section,<assignment>``, then a
      ``Points Possible`` row (Canvas's own export layout; its import matches students on ID, SIS
      User ID or SIS Login ID). ID is Canvas's user id when the submission kept Canvas's download
      name, else SIS Login ID holds the student id. ``assignment`` as Canvas's export names it
      (``Lab 1 (12345)``) updates that assignment; a new name creates one.
    - ``moodle``: ``Username,<assignment>,Feedback`` (Moodle's "Import grades: CSV file": map
      *Username* to "username", the grade column to the grade item, Feedback to its feedback).

    Example:
        >>> import tempfile
        >>> from qcourse.autograde import Outcome
        >>> o = [Outcome("smithjane_12345_678901", "graded", 3, 4), Outcome("bo", "invalid", 0, 4, message="bad")]
        >>> print(write_lms_gradebook(o, "canvas", Path(tempfile.mkdtemp()), "Lab 0", 4).read_text())
        Student,ID,SIS User ID,SIS Login ID,Section,Lab 0
        Points Possible,,,,,4
        smithjane_12345_678901,12345,,,,3
        bo,,,bo,,0
        <BLANKLINE>
        >>> print(write_lms_gradebook(o, "moodle", Path(tempfile.mkdtemp()), "Lab 0", 4).read_text())
        Username,Lab 0,Feedback
        smithjane_12345_678901,3,
        bo,0,invalid: bad
        <BLANKLINE>
    """
    if lms not in LMS_FORMATS:
        raise ValueError(f"unknown gradebook format {lms!r} (known: {', '.join(LMS_FORMATS)})")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"grades-{lms}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        if lms == "canvas":
            w.writerow(["Student", "ID", "SIS User ID", "SIS Login ID", "Section", assignment])
            w.writerow(["Points Possible", "", "", "", "", f"{max_score:g}"])
            for o in outcomes:
                uid = canvas_user_id(o.student)
                w.writerow([o.student, uid, "", "" if uid else o.student, "", f"{o.score:g}"])
        else:
            w.writerow(["Username", assignment, "Feedback"])
            for o in outcomes:
                w.writerow([o.student, f"{o.score:g}", "" if o.status == "graded" else f"{o.status}: {o.message}"])
    return path


def write_report(outcomes, lab: str, out_dir: Path, max_points: dict[str, float], mode: str = "",
                 lms: tuple[str, ...] | list[str] = (), assignment: str | None = None) -> Path:
    """Write ``grades.csv``, ``scores.png`` and ``report.md`` into ``out_dir``; returns the report.
    For each LMS in ``lms`` also ``grades-<lms>.csv`` (``write_lms_gradebook``; column ``assignment``,
    default the lab).

    Example:
        >>> import tempfile
        >>> from qcourse.autograde import Outcome
        >>> o = [Outcome("ann", "graded", 3, 4, {"ex1": 1, "ex2": 2}), Outcome("bo", "invalid", 0, 4, {"ex1": 0, "ex2": 0}, "bad")]
        >>> p = write_report(o, "lab00", Path(tempfile.mkdtemp()), {"ex1": 1, "ex2": 3})
        >>> "| ex1 | 1/2 |" in p.read_text(), "| ex2 | 0/2 |" in p.read_text()
        (True, True)
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(max_points)
    with open(out_dir / "grades.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "status", "score", "max_score", *names, "seconds", "worker", "sandbox", "message"])
        for o in outcomes:
            w.writerow([o.student, o.status, f"{o.score:g}", f"{o.max_score:g}",
                        *[f"{o.exercises.get(n, 0):g}" for n in names], f"{o.seconds:.1f}", o.worker, o.sandbox,
                        o.message])
    for name in lms:
        write_lms_gradebook(outcomes, name, out_dir, assignment or lab, sum(max_points.values()))

    fig, ax = plt.subplots(figsize=(6, 3.2))
    top = max((o.max_score for o in outcomes), default=1) or 1
    ax.hist([o.score for o in outcomes], bins=min(20, max(5, int(top))), range=(0, top), color="#4c72b0")
    ax.set(xlabel="score", ylabel="students", title=f"{lab}: scores of {len(outcomes)} submissions")
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=100)
    plt.close(fig)

    lines = [f"# {lab}: class report", "", f"{len(outcomes)} submissions" + (f"; graded in {mode} mode" if mode else ""), ""]
    if outcomes:
        mean = sum(o.score for o in outcomes) / len(outcomes)
        lines += [f"mean score {mean:.2f} / {outcomes[0].max_score:g}", "",
                  "| exercise | students with full marks |", "| --- | ---: |"]
        for n in names:
            passed = sum(1 for o in outcomes if o.exercises.get(n, 0) >= max_points[n])
            lines.append(f"| {n} | {passed}/{len(outcomes)} |")
        problems = [o for o in outcomes if o.status != "graded"]
        if problems:
            lines += ["", "## Not graded", ""] + [f"- {o.student}: {o.status} - {o.message}" for o in problems]
    lines += ["", "![scores](scores.png)", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
