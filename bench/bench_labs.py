"""How long each lab's master takes, run top to bottom as the lab tests run it, against its target.

Usage: ``python bench/bench_labs.py [LAB ...]`` (``lab03`` or ``lab03_ptq_distilbert``; default:
every lab).

Each master runs cell by cell in a notebook namespace, in the lab's environment (the grader's short
experiments, models loaded once): tests/labs/harness.py, the same runs as the tests'. The targets
are each lab's ``SPEC.seconds`` (tests/labs/test_labNN_*.py), set for a shared 2-core CPU. The
tests check that the runs are quiet and correct; this script only times them.

Exit status 1 when a target is missed or a master fails. Numbers printed are measured in this run,
nothing is stored.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "labs"))
from harness import LabRun, discover_labs  # noqa: E402

from qcore.measure import describe_device  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("labs", nargs="*", help="labs to time (default: all)")
    args = parser.parse_args(argv)
    labs = [spec for spec in discover_labs()
            if not args.labs or spec.name in args.labs or spec.short in args.labs]
    if not labs:
        parser.error(f"no such lab: {' '.join(args.labs)}")
    print(f"# lab masters, {datetime.date.today()}, torch {torch.__version__}")
    print(f"# {describe_device()}\n")
    print("| lab | run | seconds | target | met |")
    print("| --- | --- | ---: | ---: | :---: |")
    all_met = True
    for spec in labs:
        run = LabRun(spec)
        how = "whole master" + (", as under the grader" if spec.grader else "")
        with run.environment():
            start = time.perf_counter()
            try:
                run.whole  # noqa: B018  (the run is the point)
                failed = None
            except Exception as e:  # a master that fails misses its target, and says why
                failed = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - start
        met = failed is None and seconds <= spec.seconds
        all_met &= met
        shown = f"{seconds:.1f}" if failed is None else f"failed after {seconds:.1f}"
        print(f"| {spec.name} | {how} | {shown} | <= {spec.seconds:g} | {'yes' if met else 'NO'} |", flush=True)
        if failed:
            print(f"\n{spec.name}: {failed}\n", file=sys.stderr)
        del run  # one lab's models at a time
    return 0 if all_met else 1


if __name__ == "__main__":
    sys.exit(main())
