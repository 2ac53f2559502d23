"""Feedback that never shows hidden tests: neither their source nor their tracebacks.

nbgrader's feedback is the autograded notebook as HTML, hidden tests restored. This
preprocessor (registered in ``course/nbgrader_config.py``) cuts every ``### BEGIN HIDDEN
TESTS`` region out of the graded cells, and replaces a failure's traceback with one line:
the friendly message of a visible check, or a sentence saying that hidden tests failed.
"""
from __future__ import annotations

import re

from nbconvert.preprocessors import Preprocessor
from traitlets import Bool

HIDDEN_REGION = re.compile(r"[ \t]*### BEGIN HIDDEN TESTS.*?### END HIDDEN TESTS[ \t]*\n?", re.S)
VISIBLE_PASSED = "all visible checks passed"
HIDDEN_FAILED = ("Hidden tests failed: your code passed the visible checks but not the hidden ones "
                 "(other inputs, edge cases, or a call to a function this exercise asks you to write "
                 "yourself).")


def strip_hidden(source: str) -> str:
    """Remove every hidden-test region from a cell's source.

    Example:
        >>> strip_hidden("check(1)\\n### BEGIN HIDDEN TESTS\\nsecret()\\n### END HIDDEN TESTS\\n")
        'check(1)\\n'
    """
    return HIDDEN_REGION.sub("", source)


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def scrub_cell(cell) -> None:
    """Strip hidden tests from a graded cell and reduce its outputs to what is safe to show.

    Kept: what the visible checks printed (up to their "all visible checks passed" line),
    displays, and one line per error. Dropped: tracebacks, anything printed by hidden tests.
    """
    meta = cell.metadata.get("nbgrader", {})
    if cell.cell_type != "code" or not meta.get("grade"):
        return
    import nbformat

    cell.source = strip_hidden(cell.source)
    stdout = _stdout(cell)
    visible_passed = VISIBLE_PASSED in stdout
    if visible_passed:  # the rest was printed by hidden tests
        stdout = stdout[: stdout.index(VISIBLE_PASSED) + len(VISIBLE_PASSED)] + "\n"
    outputs = [nbformat.v4.new_output("stream", name="stdout", text=stdout)] if stdout else []
    for out in cell.outputs:
        if out.output_type == "error":
            text = HIDDEN_FAILED if visible_passed else f"{out.ename}: {out.evalue}"
            outputs.append(nbformat.v4.new_output("stream", name="stdout", text=text + "\n"))
        elif out.output_type == "stream" and out.name == "stderr":
            outputs.append(nbformat.v4.new_output(
                "stream", name="stdout", text="(this cell wrote to stderr, which scores 0)\n"))
        elif out.output_type in ("display_data", "execute_result") and not visible_passed:
            outputs.append(out)
    cell.outputs = outputs


class HideHiddenTests(Preprocessor):
    """nbconvert preprocessor applying ``scrub_cell`` to every cell (always enabled)."""

    enabled = Bool(True).tag(config=True)

    def preprocess_cell(self, cell, resources, index):
        scrub_cell(cell)
        return cell, resources
