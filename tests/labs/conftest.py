"""One run of each lab's notebooks per session, shared by its own module and the structure suite.

``spec`` is the lab a test is about: its module's ``SPEC``, or, in test_lab_structure.py, a
parameter. ``lab`` is that lab's :class:`harness.LabRun` with the lab's environment on for the
test; the master and the student notebook, and the master's run (``solved``), are made on first
use and kept until the lab's last test. The tests of one lab are run together (its module, then
its share of the structure suite) so that only one lab's models are held at a time.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from harness import LabRun

HERE = Path(__file__).resolve().parent
_runs: dict[str, LabRun] = {}
_last: dict[str, str] = {}  # lab name -> node id of its last test


def _lab_of(item):
    if Path(item.path).parent != HERE:
        return None
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "spec" in callspec.params:
        return callspec.params["spec"]
    return getattr(getattr(item, "module", None), "SPEC", None)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items):
    """Group the items of each lab (in lab order, each group in collection order), in the places
    the lab items already hold; remember each lab's last item."""
    mine = [(i, _lab_of(item)) for i, item in enumerate(items)]
    mine = [(i, spec) for i, spec in mine if spec is not None]
    order = sorted({spec.name for _, spec in mine})
    grouped = sorted(mine, key=lambda t: (order.index(t[1].name), t[0]))
    placed = [items[i] for i, _ in grouped]
    for (slot, _), item in zip(mine, placed):
        items[slot] = item
    _last.clear()
    for item in placed:
        _last[_lab_of(item).name] = item.nodeid


@pytest.fixture
def spec(request):
    """The lab this module tests (test_lab_structure.py parametrizes it over every lab)."""
    return request.module.SPEC


@pytest.fixture
def lab(spec, request):
    if spec.one_thread:
        request.getfixturevalue("one_thread")
    if spec.name not in _runs:
        _runs[spec.name] = LabRun(spec)
    run = _runs[spec.name]
    with run.environment():
        yield run
    if _last.get(spec.name) == request.node.nodeid:
        _runs.pop(spec.name, None)


@pytest.fixture
def master_nb(lab):
    return lab.master_nb


@pytest.fixture
def student_nb(lab):
    return lab.student_nb


@pytest.fixture
def solved(lab):
    """The master's namespace after its run (for a partial lab, after its graded and set-up cells)."""
    return lab.solved
