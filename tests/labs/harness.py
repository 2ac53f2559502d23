"""What the lab tests share: run a master's cells in a notebook-like namespace, by role."""
import contextlib
import io
import re
import sys
import types

from IPython.core.inputtransformer2 import TransformerManager

HIDDEN = re.compile(r"### BEGIN HIDDEN TESTS\n(.*?)### END HIDDEN TESTS", re.S)


def role(cell) -> str | None:
    meta = cell.metadata.get("nbgrader", {})
    if meta.get("solution"):
        return "solution"
    if meta.get("grade"):
        return "tests"
    if meta.get("locked"):
        return "locked"
    return None


def grade_id(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


class Kernel:
    """A notebook namespace run as ``__main__``; stdout and stderr of its cells are collected."""

    def __init__(self, namespace: dict | None = None):
        self.module = types.ModuleType("__main__")
        if namespace:
            self.module.__dict__.update(namespace)
        self.stdout, self.stderr = io.StringIO(), io.StringIO()

    @property
    def ns(self) -> dict:
        return self.module.__dict__

    def run(self, source: str) -> None:
        code = compile(TransformerManager().transform_cell(source), "<cell>", "exec")
        saved = sys.modules["__main__"]
        sys.modules["__main__"] = self.module
        try:
            with contextlib.redirect_stdout(self.stdout), contextlib.redirect_stderr(self.stderr):
                exec(code, self.ns)
        finally:
            sys.modules["__main__"] = saved
