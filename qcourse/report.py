"""The class report of an autograde run: ``grades.csv``, pass rates per exercise, a histogram."""
from __future__ import annotations

import csv
from pathlib import Path


def write_report(outcomes, lab: str, out_dir: Path, max_points: dict[str, float], mode: str = "") -> Path:
    """Write ``grades.csv``, ``scores.png`` and ``report.md`` into ``out_dir``; returns the report.

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
        w.writerow(["student", "status", "score", "max_score", *names, "seconds", "message"])
        for o in outcomes:
            w.writerow([o.student, o.status, f"{o.score:g}", f"{o.max_score:g}",
                        *[f"{o.exercises.get(n, 0):g}" for n in names], f"{o.seconds:.1f}", o.message])

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
