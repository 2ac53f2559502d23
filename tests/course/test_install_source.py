"""The labs' first cell installs the course library from a real source, or stops and says why."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from qcourse import build as build_mod
from qcourse import install_source as src
from qcourse.master import load_master

HERE = Path(__file__).parent
TINY = HERE / "fixture" / "masters" / "lab00_tiny.py"


def setup_cell(nb) -> str:
    return next(c.source for c in nb.cells if c.get("id") == "setup")


def git_repo(path: Path, origin: str | None) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    if origin:
        subprocess.run(["git", "-C", str(path), "remote", "add", "origin", origin], check=True)
    return path


def test_a_source_is_written_into_the_install_line():
    cell = setup_cell(load_master(TINY, "qcourse==0.1.0"))
    assert '    %pip install -q "qcourse==0.1.0"\n' in cell
    assert "{{" not in cell


def test_without_a_source_the_cell_stops_and_says_why():
    cell = setup_cell(load_master(TINY, None))
    assert not any(line.lstrip().startswith("%pip") for line in cell.splitlines()) and "http" not in cell
    assert src.NO_SOURCE_CELL in cell


def test_the_no_source_cell_raises_its_message_where_qcore_is_missing():
    """Run as a bare interpreter would (no qcore on its path): it stops at once with the message."""
    cell = setup_cell(load_master(TINY, None))
    res = subprocess.run([sys.executable, "-I", "-S", "-c", cell], capture_output=True, text=True)
    assert res.returncode == 1
    assert "ModuleNotFoundError: qcore is not installed here" in res.stderr
    assert "install the qcourse package your course gave you" in res.stderr


def test_a_quote_in_a_source_is_refused():
    with pytest.raises(ValueError, match="without quotes"):
        load_master(TINY, 'qcourse" ; rm -rf ~ ; "')


def test_the_source_is_found_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv(src.ENV_VAR, raising=False)
    bare = git_repo(tmp_path / "bare", None)
    assert src.install_source(bare) is None
    ssh = git_repo(tmp_path / "ssh", "git@github.com:someone/qcourse.git")
    assert src.install_source(ssh) is None  # not public: no guess
    https = git_repo(tmp_path / "https", "https://github.com/someone/qcourse.git")
    assert src.install_source(https) == "qcourse @ git+https://github.com/someone/qcourse"
    (https / "pyproject.toml").write_text('[tool.qcourse]\ninstall-source = "qcourse==0.1.0"\n')
    assert src.install_source(https) == "qcourse==0.1.0"  # configured beats the remote
    monkeypatch.setenv(src.ENV_VAR, "qcourse @ https://example.org/qcourse-0.1.0-py3-none-any.whl")
    assert src.install_source(https).endswith(".whl")  # the variable beats the configuration
    assert src.install_source(https, explicit="qcourse==0.2") == "qcourse==0.2"  # the option beats all


def test_the_build_says_how_to_set_a_source(monkeypatch, capsys):
    from qcourse import cli

    monkeypatch.setattr(src, "install_source", lambda repo, explicit=None: None)
    monkeypatch.setattr(build_mod, "check", lambda labs, course, qcore_source: [])
    assert cli.main(["build", "--check", "lab01_precision_formats"]) == 0
    err = capsys.readouterr().err
    assert "no install source" in err and "[tool.qcourse]" in err and src.ENV_VAR in err


def test_committed_labs_carry_no_made_up_source():
    """Each committed lab installs from a source it was given, or stops and says why."""
    for folder in ("labs", "solutions"):
        for path in sorted((build_mod.REPO / folder).glob("lab*.ipynb")):
            cell = setup_cell(nbformat.read(path, as_version=4))
            assert "github.com/qcourse/qcourse" not in cell and "{{" not in cell, path
            assert (src.NO_SOURCE_CELL in cell) != ("%pip install -q " in cell), path


def test_the_labs_readme_gets_colab_links_for_a_github_remote():
    readme = (build_mod.REPO / "labs" / "README.md").read_text()
    linked = build_mod.labs_readme(readme, "https://github.com/someone/qcourse.git")
    rows = [ln for ln in linked.splitlines() if ln.startswith("| lab0")]
    assert len(rows) == len(build_mod.known_labs())
    for row, lab in zip(rows, build_mod.known_labs()):
        assert f"(https://colab.research.google.com/github/someone/qcourse/blob/main/labs/{lab}.ipynb)" in row
    assert build_mod.labs_readme(linked, None) == readme  # no public address: no links
    assert build_mod.labs_readme(readme, "https://gitlab.com/someone/qcourse") == readme  # Colab opens GitHub only
