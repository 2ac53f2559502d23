"""Cluster grading: a class of N graded locally with 1 job against a Dask cluster of 2 single-threaded workers.

Usage: ``python bench/bench_cluster.py [--lab LAB] [--students 16]``. Starts ``dask scheduler`` and two
``dask worker --nthreads 1`` on 127.0.0.1 (``qcourse.cluster_local``), grades in scratch copies of
the course (the real gradebook is not touched). Half the class hands in the solution, half the
untouched notebook. The cluster's time counts everything an instructor waits for: connecting,
checking the workers, shipping the course, each worker preparing the assignment once, and
sending the files back. Targets (2 cores): the cluster at least 1.8x faster than one local job,
and at most 1 s of cluster overhead a submission. The overhead is measured against local grading
with 2 jobs, the same parallelism on the same cores: ``2 x (cluster wall - local 2-job wall) / N``,
the seconds each submission costs a worker beyond what it costs a local job. So what the two cores
cannot give (two gradings at once share memory bandwidth and the interpreter's start-up bursts)
shows as the local 2-job speed-up, and only what Dask adds as overhead. Exit status 1 when a target
is missed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat

from qcourse.autograde import autograde
from qcourse.build import COURSE, REPO, copy_course
from qcourse.cluster_local import LocalCluster
from qcourse.master import find_masters, load_master

TARGET_SPEEDUP, TARGET_OVERHEAD_S = 1.8, 1.0


def _class(lab: str, students: int, folder: Path) -> dict[str, Path]:
    folder.mkdir()
    solution = load_master(find_masters(COURSE)[lab])
    for i in range(students):
        if i % 2:
            shutil.copy(REPO / "labs" / f"{lab}.ipynb", folder / f"student{i:03d}.ipynb")
        else:
            nbformat.write(solution, folder / f"student{i:03d}.ipynb")
    return {p.stem: p for p in sorted(folder.glob("*.ipynb"))}


def _course(tmp: Path, name: str, secret: bytes) -> Path:
    course = copy_course(COURSE, tmp / name)
    (course / ".qcourse").mkdir()
    (course / ".qcourse" / "secret").write_bytes(secret)  # one secret: both runs ask the same questions
    return course


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lab", default="lab01_precision_formats")
    parser.add_argument("--students", type=int, default=16)  # at 8, the fixed costs weigh too much
    args = parser.parse_args(argv)
    quiet = lambda *_: None  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        found = _class(args.lab, args.students, tmp / "subs")
        secret = os.urandom(32)
        t = time.perf_counter()
        local = autograde(found, args.lab, jobs=1, course_root=_course(tmp, "local", secret), log=quiet)
        local_s = time.perf_counter() - t
        t = time.perf_counter()
        autograde(found, args.lab, jobs=2, course_root=_course(tmp, "local2", secret), log=quiet)
        local2_s = time.perf_counter() - t
        cluster = LocalCluster(tmp / "dask")
        try:
            for name in ("w1", "w2"):
                cluster.add_worker(name)
            cluster.wait_for(2)
            t = time.perf_counter()
            remote = autograde(found, args.lab, course_root=_course(tmp, "cluster", secret),
                               cluster=str(cluster.scheduler_file), log=quiet)
            cluster_s = time.perf_counter() - t
        finally:
            cluster.stop()
    same = {o.student: (o.status, o.score) for o in local} == {o.student: (o.status, o.score) for o in remote}
    speedup, overhead = local_s / cluster_s, 2 * (cluster_s - local2_s) / len(found)
    print(f"| {args.lab}, {len(found)} submissions | wall time (s) | s a submission |")
    print("| --- | ---: | ---: |")
    print(f"| local, 1 job | {local_s:.1f} | {local_s / len(found):.1f} |")
    print(f"| local, 2 jobs | {local2_s:.1f} | {local2_s / len(found):.1f} |")
    print(f"| Dask cluster, 2 workers x 1 thread (127.0.0.1) | {cluster_s:.1f} | {cluster_s / len(found):.1f} |")
    print(f"\nspeed-up: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x; local 2 jobs: {local_s / local2_s:.2f}x); "
          f"cluster overhead over local 2 jobs: {overhead:.2f} s a submission "
          f"(target <= {TARGET_OVERHEAD_S} s); grades equal to local: {'yes' if same else 'NO'}")
    if not same:
        print("grades differ between local and cluster grading", file=sys.stderr)
        return 2
    return 0 if speedup >= TARGET_SPEEDUP and overhead <= TARGET_OVERHEAD_S else 1


if __name__ == "__main__":
    sys.exit(main())
