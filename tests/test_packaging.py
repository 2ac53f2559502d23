"""The student library stands alone: `qcore` never loads the instructor's Jupyter/nbgrader stack."""
import subprocess
import sys

INSTRUCTOR_ONLY = ("nbgrader", "jupyterlab", "jupytext", "nbclient", "nbformat", "jupyter_server")

IMPORT_ALL_OF_QCORE = f"""
import importlib, pkgutil, sys
import qcore
names = [m.name for m in pkgutil.walk_packages(qcore.__path__, "qcore.") if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({INSTRUCTOR_ONLY!r}))
print(len(names), ",".join(loaded))
"""


def test_importing_every_qcore_module_loads_no_instructor_tool():
    out = subprocess.run([sys.executable, "-c", IMPORT_ALL_OF_QCORE], capture_output=True, text=True,
                         check=True).stdout.split()
    n_modules, loaded = int(out[0]), out[1:]
    assert n_modules >= 15, "the walk found too few modules to mean anything"
    assert loaded == [], f"qcore pulled in the instructor's tools: {loaded}"


def test_the_probe_sees_an_instructor_import():
    """The check above can fail: importing qcourse's build (nbgrader, jupytext) is seen."""
    probe = IMPORT_ALL_OF_QCORE.replace("import qcore\n", "import qcore, qcourse.build\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "jupytext" in out or "nbgrader" in out
