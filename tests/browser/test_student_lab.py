"""A student's session in a real browser: `make lab`'s server, lab 1 in JupyterLab, one exercise solved.

Chromium is Debian's (`make setup` installs it where it may); Playwright drives it through
``executable_path``, nothing is downloaded. The lab is a copy of ``labs/`` in a temporary folder, so
the committed notebook stays untouched. Screenshots of every step go to ``artifacts/browser/``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from qcourse.lab import free_port
from qcourse.master import load_master

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
LAB = "lab01_precision_formats"
SOLVED = "ex1_split_bits"  # the exercise the student solves here
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("QCOURSE_ARTIFACTS", ROOT / "artifacts")) / "browser"
CELLS = ".jp-Notebook .jp-Cell"

if CHROMIUM is None:
    pytest.skip("Chromium is not installed (make setup installs Debian's chromium where it can)",
                allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright


def solved_source(gid: str) -> str:
    """The master's solution cell for ``gid``, as a student would have written it (no markers)."""
    (cell,) = [c for c in load_master(ROOT / "course" / "masters" / f"{LAB}.py").cells
               if c.metadata.get("nbgrader", {}).get("grade_id") == gid]
    return "\n".join(ln for ln in cell.source.splitlines() if "### BEGIN SOLUTION" not in ln
                     and "### END SOLUTION" not in ln)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`qcourse lab` (what `make lab` runs) on a copy of the labs, a free loopback port and a token."""
    tmp = tmp_path_factory.mktemp("student")
    labs = tmp / "labs"
    labs.mkdir()
    shutil.copy2(ROOT / "labs" / f"{LAB}.ipynb", labs)
    port, token = free_port(), "browser-test-token"
    # This test's own JupyterLab settings: every cell in the page (windowing renders only those on
    # screen; rendering is all it changes) and no news pop-up over the notebook.
    settings = tmp / "settings"
    for name, value in {"notebook-extension/tracker": {"windowingMode": "none"},
                        "apputils-extension/notification": {"fetchNews": "false"}}.items():
        file = settings / "@jupyterlab" / f"{name}.jupyterlab-settings"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(value))
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces")}  # no layout from earlier sessions
    log = open(tmp / "server.log", "w+")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "qcourse"), "lab", "--root", str(labs),
                             "--port", str(port), "--token", token], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:  # until the server answers
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2).close()
                break
            except OSError:
                log.seek(0)
                assert proc.poll() is None and time.time() < deadline, "JupyterLab did not start:\n" + log.read()
                time.sleep(0.5)
        yield {"labs": labs, "url": f"http://127.0.0.1:{port}", "token": token, "pid": proc.pid, "log": log}
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # stop the server by its PID
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


class Student:
    """What a student does in JupyterLab, step by step, with a screenshot after each."""

    def __init__(self, page):
        self.page, self.shots = page, []
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for old in ARTIFACTS.glob("*.png"):
            old.unlink()

    def shot(self, name: str) -> None:
        path = ARTIFACTS / f"{len(self.shots) + 1:02d}-{name}.png"
        self.page.screenshot(path=str(path))
        self.shots.append(path.name)

    def cell(self, index: int):
        return self.page.locator(CELLS).nth(index)

    def menu(self, menu: str, item: str) -> None:
        """Click ``item`` of the menu bar's ``menu``, by their labels."""
        self.page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(f"^{menu}$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$")).click()

    def wait_until_idle(self, timeout_s: float = 180) -> None:
        """Until no cell is queued or running ([*]) and the kernel says idle."""
        time.sleep(1.0)
        self.page.wait_for_function(
            """() => !Array.from(document.querySelectorAll('.jp-Notebook .jp-InputPrompt'))
                        .some(e => e.textContent.includes('*'))
                  && document.body.innerText.includes('| Idle')""", timeout=timeout_s * 1e3)

    def type_into(self, index: int, text: str) -> None:
        """Replace a code cell's text as a paste would (no auto-indent, no bracket closing)."""
        self.cell(index).scroll_into_view_if_needed()
        self.cell(index).locator(".cm-content").click()
        self.page.keyboard.press("Control+A")
        self.page.keyboard.insert_text(text)
        self.page.keyboard.press("Escape")  # back to command mode

    def save(self) -> None:
        self.page.keyboard.press("Control+S")
        self.page.wait_for_function("() => !document.querySelector('.jp-mod-dirty')", timeout=30e3)


def error_cells(nb) -> list[int]:
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
            and any(o.output_type == "error" for o in c.get("outputs", []))]


def test_a_student_solves_one_exercise_in_the_browser(server):
    start = time.perf_counter()
    path = server["labs"] / f"{LAB}.ipynb"
    nb0 = nbformat.read(path, as_version=4)
    gid_at = {c.metadata.get("nbgrader", {}).get("grade_id"): i for i, c in enumerate(nb0.cells)}
    tests_at = {gid[:-len("_tests")]: i for gid, i in gid_at.items() if gid and gid.endswith("_tests")}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        student = Student(page)
        console_errors = []
        page.on("pageerror", lambda e: console_errors.append(str(e)))

        page.goto(f"{server['url']}/lab/tree/{LAB}.ipynb?token={server['token']}")
        page.wait_for_selector(CELLS, timeout=90e3)
        student.wait_until_idle()
        assert page.locator(CELLS).count() == len(nb0.cells)
        student.shot("lab-opened")

        student.type_into(gid_at[SOLVED], solved_source(SOLVED))
        student.shot("exercise-1-solved")

        # Run All stops at the first failing cell, as for a student; they then run on from the next cell.
        student.menu("Run", "Run All Cells")
        student.wait_until_idle()
        student.shot("run-all")
        done = set()
        while True:
            student.save()
            nb = nbformat.read(path, as_version=4)
            pending = [i for i in error_cells(nb) if i not in done and i + 1 < len(nb.cells)]
            if not pending:
                break
            done.add(pending[0])
            student.cell(pending[0] + 1).locator(".jp-InputPrompt").click()
            student.menu("Run", "Run Selected Cell and All Below")
            student.wait_until_idle()
        student.cell(tests_at["ex2_fields_to_value"]).scroll_into_view_if_needed()
        student.shot("checks-after-running-everything")

        nb = nbformat.read(path, as_version=4)
        setup_cell = nb.cells[gid_at["setup"]]
        assert setup_cell.execution_count is not None
        assert [o.output_type for o in setup_cell.outputs] == ["stream"], setup_cell.outputs
        assert setup_cell.outputs[0].text.startswith("qcore ready: torch 2.13.0")
        stderr = [(i, o.text) for i, c in enumerate(nb.cells) if c.cell_type == "code"
                  for o in c.get("outputs", []) if o.output_type == "stream" and o.name == "stderr"]
        assert stderr == [], stderr  # no warnings anywhere
        assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), "a cell never ran"

        solved_tests = nb.cells[tests_at[SOLVED]]
        assert not any(o.output_type == "error" for o in solved_tests.outputs)
        assert "all visible checks passed" in "".join(o.get("text", "") for o in solved_tests.outputs)
        shown = student.cell(tests_at[SOLVED]).locator(".jp-OutputArea").inner_text()
        assert "Exercise 1: bit fields: all visible checks passed" in shown
        for ex, i in tests_at.items():
            if ex == SOLVED:
                continue
            (err,) = [o for o in nb.cells[i].outputs if o.output_type == "error"]
            assert err.ename == "CheckFailed" and "not done yet" in err.evalue, (ex, err.evalue)
            shown = student.cell(i).locator(".jp-OutputArea").inner_text()
            assert "not done yet - replace `raise NotImplementedError()` with your code." in shown, shown
            assert "Traceback" not in shown and "qcore/checks.py" not in shown  # the message, not a traceback

        # nbgrader's Validate button (its JupyterLab extension) on the saved notebook
        page.locator(".jp-NotebookPanel-toolbar .jp-Toolbar-item", has_text="Validate").click()
        dialog = page.locator(".jp-Dialog-content")
        dialog.wait_for(timeout=180e3)
        page.wait_for_function("() => !document.querySelector('.jp-Dialog-content').innerText.includes('Validating')",
                               timeout=180e3)
        student.shot("validate")
        verdict = dialog.inner_text()
        # nbgrader stops at the first failing graded cell and shows it with its error
        assert "The following cell failed" in verdict, verdict
        assert "Exercise 2: rebuild the value: not done yet" in verdict, verdict
        assert "Exercise 1" not in verdict, verdict
        page.keyboard.press("Escape")
        browser.close()

    seconds = time.perf_counter() - start
    (ARTIFACTS / "run.txt").write_text("\n".join(student.shots) + f"\n{seconds:.1f} s\n")
    print(f"browser test: {seconds:.1f} s; screenshots in {ARTIFACTS}: {', '.join(student.shots)}")
    assert console_errors == [], console_errors
