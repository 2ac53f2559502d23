"""The ``qcourse`` command line: start the labs; build, check, validate and autograde them.

Example:
    >>> main(["--version"])
    qcourse 0.1.0
    0
"""
from __future__ import annotations

import argparse
import os
import platform
import runpy
import sys
import tempfile
from pathlib import Path

import qcore
from qcourse.build import COURSE, REPO, BuildError, resolve_labs


def _env(_args) -> int:
    """Print what the course will compute on: versions, threads, accelerator, dtype."""
    import torch

    from qcore.measure import describe_device

    print(f"qcourse {qcore.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(describe_device())
    return 0


def _build(args) -> int:
    from qcourse import build

    labs = resolve_labs(args.labs, args.course)
    from qcourse.install_source import HOW_TO_SET, install_source

    source = install_source(build.REPO, args.qcore_source)
    if source is None:
        print(f"note: no install source for the labs' first cell; on a kernel without qcore it stops and "
              f"says so. To set one, {HOW_TO_SET}.", file=sys.stderr)
    if args.check:
        problems = build.check(labs, args.course, qcore_source=source)
        for p in problems:
            print(f"✗ {p}")
        print("build check: " + ("differences found" if problems else f"{len(labs)} labs up to date"))
        return 1 if problems else 0
    build.build(labs, args.course, qcore_source=source, run_solution=not args.no_solutions)
    return 0


def _check_masters(args) -> int:
    from qcourse.lint import check_course

    problems = check_course(args.course, REPO / "labs")
    for p in problems:
        print(f"✗ {p}")
    print("masters: " + ("problems found" if problems else "all conventions kept"))
    return 1 if problems else 0


def _references(args) -> int:
    for lab in resolve_labs(args.labs, args.course):
        script = args.course / "refgen" / f"{lab}.py"
        if not script.is_file():
            print(f"{lab}: no reference generator ({script})")
            continue
        out = args.course / "reference" / lab
        out.mkdir(parents=True, exist_ok=True)
        runpy.run_path(str(script))["make"](out)
        print(f"{lab}: references written to {out}")
    return 0


def _lab_of(notebook: Path, lab: str | None, course: Path) -> str:
    if lab:
        return resolve_labs([lab], course)[0]
    for known in resolve_labs(None, course):
        if known in notebook.name:
            return known
    raise BuildError(f"cannot tell which lab {notebook.name} is; pass --lab "
                     f"(known: {', '.join(resolve_labs(None, course))})")


def _warn_if_not_judged(lab: str, course_root: Path) -> None:
    from qcourse.judge import hidden_tests

    if not hidden_tests(lab, course_root):
        print(f"WARNING: {lab}'s hidden tests run inside the student's kernel (course/refgen/{lab}.py lists no "
              "HIDDEN_TESTS): code in a submission can change what they report. See docs/hostile-submissions.md.")


def _validate(args) -> int:
    from qcourse.autograde import grade_one, prepare_assignment

    notebook = Path(args.notebook)
    if not notebook.is_file():
        print(f"error: {notebook} does not exist")
        return 2
    lab = _lab_of(notebook, args.lab, args.course)
    _warn_if_not_judged(lab, args.course)
    with tempfile.TemporaryDirectory(prefix="qcourse-validate-") as tmp:
        template = Path(tmp) / "template"
        prepare_assignment(lab, args.course, template)
        outcome = grade_one(lab, "student", notebook, template, Path(tmp) / "work", course_root=args.course)
    print(f"{notebook.name} ({lab}): {outcome.status}" + (f" - {outcome.message}" if outcome.message else ""))
    from qcourse.master import exercises, find_masters, load_master

    for ex in exercises(load_master(find_masters(args.course)[lab])):
        got = outcome.exercises.get(ex.grade_id, 0.0)
        mark = "✓" if got >= ex.points else "✗"
        print(f"  {mark} {ex.grade_id}: {got:g}/{ex.points:g}")
    print(f"total {outcome.score:g}/{outcome.max_score:g}")
    return 0 if outcome.status == "graded" and outcome.score >= outcome.max_score else 1


def _autograde(args) -> int:
    from qcourse import submissions
    from qcourse.autograde import autograde
    from qcourse.master import exercises, find_masters, load_master
    from qcourse.report import write_report

    lab = resolve_labs([args.lab], args.course)[0]
    src = Path(args.submissions)
    if not src.exists():
        print(f"error: {src} does not exist")
        return 2
    with tempfile.TemporaryDirectory(prefix="qcourse-import-") as tmp:
        folder = submissions.extract_zip(src, Path(tmp)) if src.is_file() else src
        found = submissions.collect(folder, lab)
        where = f"on the Dask cluster at {args.cluster}" if args.cluster else f"with {args.jobs} jobs"
        print(f"autograding {len(found)} submissions of {lab} {where}")
        _warn_if_not_judged(lab, args.course)
        if args.cluster:
            from qcourse.cluster import ClusterError as cluster_error
        else:  # qcourse.cluster (and dask) load only for a cluster run; an empty tuple catches nothing
            cluster_error = ()
        try:
            outcomes = autograde(found, lab, jobs=args.jobs, force=args.force, course_root=args.course,
                                 timeout=args.timeout, cluster=args.cluster, cluster_timeout=args.cluster_timeout)
        except cluster_error as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    max_points = {e.grade_id: float(e.points) for e in exercises(load_master(find_masters(args.course)[lab]))}
    from qcourse.sandbox import mode

    if mode() != "bubblewrap":
        print("WARNING: bubblewrap is missing or refused here: submissions were graded with resource "
              "limits only (no filesystem or network isolation). Install it: apt-get install bubblewrap")
    modes = sorted({o.sandbox for o in outcomes if o.sandbox}) or [mode()]
    report = write_report(outcomes, lab, args.course / "reports" / lab, max_points, mode=", ".join(modes),
                          lms=args.gradebook_format, assignment=args.assignment_name or lab)
    print(f"grades: {report.parent / 'grades.csv'}"
          + "".join(f", {report.parent / f'grades-{lms}.csv'}" for lms in args.gradebook_format)
          + f"\nreport: {report}")
    return 0


def _lab(args) -> int:
    from qcourse.lab import launch

    return launch(args.root, args.port, args.token)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qcourse", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--course", type=Path, default=COURSE, help="the nbgrader course root (default: %(default)s)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("env", help="show the compute environment the labs will use").set_defaults(func=_env)
    p = sub.add_parser("lab", help="start JupyterLab on the labs (127.0.0.1 only, with a token)")
    p.add_argument("--root", type=Path, default=REPO / "labs", help="folder to serve (default: %(default)s)")
    p.add_argument("--port", type=int, help="port (default: 8888, or a free one when that is taken)")
    p.add_argument("--token", help="access token (default: $QCOURSE_LAB_TOKEN, else a random one)")
    p.set_defaults(func=_lab)
    p = sub.add_parser("build", help="masters -> labs/ and solutions/")
    p.add_argument("labs", nargs="*", help="labs to build (default: all)")
    p.add_argument("--check", action="store_true", help="fail when labs/ or solutions/ differ from a fresh build")
    p.add_argument("--no-solutions", action="store_true", help="skip executing the solutions")
    p.add_argument("--qcore-source", help="pip requirement the labs install qcore from on Colab (default: "
                   "QCOURSE_QCORE_SOURCE, [tool.qcourse] install-source, the public https git remote)")
    p.set_defaults(func=_build)
    sub.add_parser("check-masters", help="check the masters and released labs").set_defaults(func=_check_masters)
    p = sub.add_parser("references", help="write course/reference/<lab>/*.npz")
    p.add_argument("labs", nargs="*")
    p.set_defaults(func=_references)
    p = sub.add_parser("validate", help="run a notebook as the autograder will; non-zero exit on failure")
    p.add_argument("notebook")
    p.add_argument("--lab")
    p.set_defaults(func=_validate)
    p = sub.add_parser("autograde", help="grade a folder or zip of submissions")
    p.add_argument("submissions")
    p.add_argument("--lab", required=True)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--force", action="store_true", help="grade again even unchanged submissions")
    p.add_argument("--timeout", type=float, help="wall-time limit per submission in s (default: "
                   "QCourseSandbox.wall_seconds in nbgrader_config.py)")
    p.add_argument("--cluster", metavar="ADDRESS", help="grade on the workers of this Dask scheduler "
                   "(tcp://host:port or a scheduler file; needs the cluster extra; see docs/cluster-grading.md)")
    p.add_argument("--cluster-timeout", type=float, default=20.0, metavar="S",
                   help="seconds to reach the scheduler before giving up (default: %(default)s)")
    p.add_argument("--gradebook-format", action="append", default=[], choices=("canvas", "moodle"),
                   help="also write grades-<format>.csv in the column layout that LMS imports (repeatable)")
    p.add_argument("--assignment-name", help="the assignment's column in those files (default: the lab; for "
                   "Canvas, the assignment as its gradebook export names it, e.g. 'Lab 1 (12345)')")
    p.set_defaults(func=_autograde)
    args = parser.parse_args(argv)
    if args.version:
        print(f"qcourse {qcore.__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (BuildError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
