"""Autograde wall time: one submission, and a class of N with --jobs 1 against --jobs 2.

Usage: ``python bench/bench_autograde.py [--lab LAB] [--students 20]``. Runs in a scratch copy
of the course (the real gradebook is not touched). Half the class hands in the solution, half
the untouched notebook, so both the full-marks and the all-failing paths are timed.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from qcourse.autograde import autograde
from qcourse.build import COURSE, REPO, copy_course
from qcourse.master import find_masters, load_master


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", default="lab01_precision_formats")
    parser.add_argument("--students", type=int, default=20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        subs = Path(tmp) / "subs"
        subs.mkdir()
        solution = load_master(find_masters(COURSE)[args.lab])
        for i in range(args.students):
            if i % 2:
                shutil.copy(REPO / "labs" / f"{args.lab}.ipynb", subs / f"student{i:03d}.ipynb")
            else:
                nbformat.write(solution, subs / f"student{i:03d}.ipynb")
        found = {p.stem: p for p in sorted(subs.glob("*.ipynb"))}
        rows = []
        one = dict(list(found.items())[:1])
        t = time.perf_counter()
        autograde(one, args.lab, jobs=1, course_root=copy_course(COURSE, Path(tmp) / "c0"), log=lambda *_: None)
        rows.append(("1 submission", 1, time.perf_counter() - t))
        for jobs in (1, 2):
            t = time.perf_counter()
            out = autograde(found, args.lab, jobs=jobs, course_root=copy_course(COURSE, Path(tmp) / f"c{jobs}"),
                            log=lambda *_: None)
            rows.append((f"{len(found)} submissions", jobs, time.perf_counter() - t))
            assert all(o.status == "graded" for o in out)
    print(f"| {args.lab} | jobs | wall time (s) |")
    print("| --- | ---: | ---: |")
    for name, jobs, seconds in rows:
        print(f"| {name} | {jobs} | {seconds:.1f} |")
    print(f"\nspeed-up with 2 jobs: {rows[1][2] / rows[2][2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
