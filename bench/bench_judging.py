"""What judging outside the kernel costs: each lab's solution graded as it is now (hidden tests
asked in the box, judged in the grader) against the same lab as of the last revision whose hidden
tests ran inside the kernel (``--in-kernel``, default cd24184: every lab's tests in the kernel).

Usage: ``python bench/bench_judging.py [--labs lab03_ptq_distilbert ...] [--repeats 2]``. Both
versions are graded side by side in one run, alternating (old, new, old, new ...), one job at a
time, each in a scratch course (the real gradebook is not touched); the old version is the
revision's master and reference files with no reference generator (so, nothing judged outside).
Each version is graded once untimed first: a class pays its imports once, not per submission.
Target: the judged version costs at most 10 % more wall time per submission (the outcome's
seconds: from the submission's copy to its feedback).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat

from qcourse.autograde import autograde
from qcourse.build import COURSE, REPO, copy_course, known_labs
from qcourse.master import load_master

TARGET = 1.10  # judged / in-kernel wall time per submission


def _git(*args: str) -> bytes:
    return subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True).stdout


def in_kernel_course(lab: str, rev: str, dest: Path) -> Path:
    """A scratch course holding ``lab`` as of ``rev``: its master and references, no generator."""
    dest.mkdir(parents=True)
    (dest / "nbgrader_config.py").write_bytes((COURSE / "nbgrader_config.py").read_bytes())
    (dest / "masters").mkdir()
    (dest / "masters" / f"{lab}.py").write_bytes(_git("show", f"{rev}:course/masters/{lab}.py"))
    refs = dest / "reference" / lab
    refs.mkdir(parents=True)
    for name in _git("ls-tree", "--name-only", f"{rev}:course/reference/{lab}").decode().split():
        (refs / name).write_bytes(_git("show", f"{rev}:course/reference/{lab}/{name}"))
    return dest


def grade_solution(course: Path, lab: str, work: Path) -> tuple[float, float, float]:
    """Seconds to grade the course's own solution of ``lab`` once (the submission's own time, as
    the report gives it: the class's one-time preparation of the assignment is not in it); its
    score and the maximum."""
    subs = work / "subs"
    subs.mkdir(parents=True)
    nbformat.write(load_master(course / "masters" / f"{lab}.py"), subs / "solution.ipynb")
    (out,) = autograde({"solution": subs / "solution.ipynb"}, lab, jobs=1, force=True, course_root=course,
                       log=lambda *_: None)  # force: the same notebook again is graded again, not looked up
    if out.status != "graded":
        raise SystemExit(f"{lab} ({course.name}): {out.status}: {out.message}")
    return out.seconds, out.score, out.max_score


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labs", nargs="*", default=known_labs())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--in-kernel", default="cd24184", help="the revision whose hidden tests ran in the kernel")
    args = parser.parse_args(argv)
    try:
        _git("cat-file", "-e", f"{args.in_kernel}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"revision {args.in_kernel} is not in this clone (a shallow one?): nothing to compare with",
              file=sys.stderr)
        return 2
    rows, met = [], True
    with tempfile.TemporaryDirectory() as tmp:
        for lab in args.labs:
            courses = {"in-kernel": in_kernel_course(lab, args.in_kernel, Path(tmp) / lab / "old"),
                       "judged": copy_course(COURSE, Path(tmp) / lab / "new")}
            times = {k: [] for k in courses}
            for kind, course in courses.items():  # once untimed: what a grader pays once per run (imports)
                grade_solution(course, lab, Path(tmp) / lab / f"{kind}-warm")
            for r in range(args.repeats):
                for kind, course in courses.items():  # alternating: drift on the machine hits both alike
                    seconds, score, max_score = grade_solution(course, lab, Path(tmp) / lab / f"{kind}{r}")
                    if score != max_score:
                        raise SystemExit(f"{lab} ({kind}): the solution scored {score} of {max_score}")
                    times[kind].append(seconds)
            old, new = statistics.median(times["in-kernel"]), statistics.median(times["judged"])
            met &= new / old <= TARGET
            rows.append((lab, old, new, new / old))
    print(f"| lab (solution, s a submission, median of {args.repeats}) | in-kernel tests ({args.in_kernel}) | judged outside | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for lab, old, new, ratio in rows:
        print(f"| {lab} | {old:.1f} | {new:.1f} | {ratio:.2f} |")
    print(f"\ntarget: judged <= {TARGET:.2f} x in-kernel: {'met' if met else 'MISSED'}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
