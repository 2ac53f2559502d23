"""The ``qcourse`` command line.

Example:
    >>> main(["--version"])
    qcourse 0.1.0
    0
"""
from __future__ import annotations

import argparse
import platform
import sys

import qcore


def _env(_args) -> int:
    """Print what the course will compute on: versions, threads, accelerator, dtype."""
    import torch

    from qcore.measure import describe_device

    print(f"qcourse {qcore.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(describe_device())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qcourse", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("env", help="show the compute environment the labs will use").set_defaults(func=_env)
    args = parser.parse_args(argv)
    if args.version:
        print(f"qcourse {qcore.__version__}")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
