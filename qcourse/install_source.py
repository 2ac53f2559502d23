"""Where a lab's first cell installs the course library from (Colab, or any kernel without qcore).

The build writes a pip requirement into each lab's set-up cell, found in this order: the
``--qcore-source`` option, the ``QCOURSE_QCORE_SOURCE`` variable, ``install-source`` under
``[tool.qcourse]`` in the repository's ``pyproject.toml``, and the repository's own public https
remote (``git remote get-url origin``). With none of them the cell installs nothing: it stops with
a message that says so, and the build says how to set a source. No lab ever carries a made-up URL.
"""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ENV_VAR = "QCOURSE_QCORE_SOURCE"
PACKAGE = "qcourse"
HOW_TO_SET = (f"set install-source under [tool.qcourse] in pyproject.toml, the {ENV_VAR} variable or "
              f"`qcourse build --qcore-source`, to a pip requirement such as "
              f"'{PACKAGE} @ git+https://github.com/<owner>/<repo>'")
NO_SOURCE_CELL = ("raise ModuleNotFoundError(\"qcore is not installed here, and this copy of the course does not "
                  "say where to install it from: install the qcourse package your course gave you "
                  "(%pip install <its wheel or URL>), then run this cell again\")")
# The master's install line, as jupytext reads it into a cell.
_INSTALL_LINE = re.compile(r'^(?P<indent>[ \t]*)%pip install -q "\{\{QCORE_SOURCE\}\}"[ \t]*$', re.M)
_HTTPS_REMOTE = re.compile(r"^https://(?P<host>[A-Za-z0-9.-]+)/(?P<path>[\w.-]+/[\w.-]+?)(?:\.git)?/?$")


def requirement_from_remote(url: str) -> str | None:
    """The pip requirement for a public https git remote; ``None`` for any other kind of remote.

    Example:
        >>> requirement_from_remote("https://github.com/someone/qcourse.git")
        'qcourse @ git+https://github.com/someone/qcourse'
        >>> requirement_from_remote("git@github.com:someone/qcourse.git") is None  # ssh: not public
        True
        >>> requirement_from_remote("https://user:token@github.com/someone/qcourse") is None  # credentials
        True
    """
    m = _HTTPS_REMOTE.match(url.strip())
    if not m:
        return None
    return f"{PACKAGE} @ git+https://{m['host']}/{m['path']}"


def colab_url(remote: str, lab: str, branch: str = "main") -> str | None:
    """The "Open in Colab" address of ``labs/<lab>.ipynb`` for a GitHub https remote, else ``None``.

    Example:
        >>> colab_url("https://github.com/someone/qcourse.git", "lab01_precision_formats")
        'https://colab.research.google.com/github/someone/qcourse/blob/main/labs/lab01_precision_formats.ipynb'
    """
    m = _HTTPS_REMOTE.match(remote.strip())
    if not m or m["host"] != "github.com":
        return None
    return f"https://colab.research.google.com/github/{m['path']}/blob/{branch}/labs/{lab}.ipynb"


def origin_url(repo: Path) -> str | None:
    """``git remote get-url origin`` of ``repo`` (``None`` outside git or without that remote)."""
    try:
        res = subprocess.run(["git", "-C", str(repo), "remote", "get-url", "origin"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (res.stdout.strip() or None) if res.returncode == 0 else None


def configured(repo: Path) -> str | None:
    """``install-source`` under ``[tool.qcourse]`` in ``repo/pyproject.toml``, if set."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the variable or the option still work
        return None
    path = Path(repo) / "pyproject.toml"
    if not path.is_file():
        return None
    value = tomllib.loads(path.read_text()).get("tool", {}).get("qcourse", {}).get("install-source")
    return value or None


def install_source(repo: Path, explicit: str | None = None) -> str | None:
    """The pip requirement the labs install qcore from, or ``None`` when nothing says."""
    if explicit:
        return explicit
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    return configured(repo) or requirement_from_remote(origin_url(repo) or "")


def fill_install_line(source: str, requirement: str | None) -> str:
    """A set-up cell with its install line made real: ``%pip install`` of ``requirement``, or,
    with none, a line that stops and says why.

    Example:
        >>> cell = 'if missing:\\n    %pip install -q "{{QCORE_SOURCE}}"\\n'
        >>> fill_install_line(cell, "qcourse==0.1.0")
        'if missing:\\n    %pip install -q "qcourse==0.1.0"\\n'
        >>> fill_install_line(cell, None).splitlines()[1].lstrip()[:26]
        'raise ModuleNotFoundError('
    """
    if requirement is None:
        return _INSTALL_LINE.sub(lambda m: m["indent"] + NO_SOURCE_CELL, source)
    if '"' in requirement or "\n" in requirement:
        raise ValueError(f"an install source is one pip requirement without quotes: {requirement!r}")
    return _INSTALL_LINE.sub(lambda m: f'{m["indent"]}%pip install -q "{requirement}"', source)
