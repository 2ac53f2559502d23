"""``make lab`` (``qcourse lab``): the students' JupyterLab, on the loopback interface, one per folder.

The server listens on 127.0.0.1 only and requires a token; the launcher prints the URL with the
token before JupyterLab starts, then *becomes* the server (``exec``), so the PID it prints is the
one to stop. A second launch for the same folder while one runs says where the running one is
instead of starting another on a surprising port.
"""
from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

from qcourse.build import REPO

HOST = "127.0.0.1"
DEFAULT_PORT = 8888


def running_servers(root: Path) -> list[dict]:
    """Live Jupyter servers (their runtime files) serving ``root``.

    Example:
        >>> running_servers(Path("/nonexistent/folder"))
        []
    """
    import psutil
    from jupyter_server.serverapp import list_running_servers

    root = Path(root).resolve()
    return [info for info in list_running_servers()
            if Path(info.get("root_dir", "")).resolve() == root and psutil.pid_exists(info.get("pid", -1))]


def url_of(port: int, token: str, path: str = "lab") -> str:
    """Example:
        >>> url_of(8888, "abc")
        'http://127.0.0.1:8888/lab?token=abc'
    """
    return f"http://{HOST}:{port}/{path}?token={token}"


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``127.0.0.1:port`` (and we may bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port the kernel says is free now (for tests and a busy default port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(root: Path, port: int, token: str) -> list[str]:
    """The JupyterLab command line: loopback only, this port or fail, this token, no browser."""
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.ip={HOST}", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={Path(root).resolve()}", "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers and CI run as root
        cmd.append("--ServerApp.allow_root=True")
    return cmd


def launch(root: Path = REPO / "labs", port: int | None = None, token: str | None = None) -> int:
    """Start JupyterLab for ``root`` (does not return when it starts); 1 with a message when it can't."""
    root = Path(root).resolve()
    if not root.is_dir():
        print(f"qcourse lab: no folder {root}", file=sys.stderr)
        return 1
    running = running_servers(root)
    if running:
        info = running[0]
        print(f"qcourse lab: JupyterLab is already running for {root} (pid {info['pid']}):\n"
              f"  {url_of(info['port'], info.get('token', ''))}\n"
              f"Open that URL, or stop it first with `kill {info['pid']}`.", file=sys.stderr)
        return 1
    if port is None:
        port = DEFAULT_PORT if port_is_free(DEFAULT_PORT) else free_port()
    elif not port_is_free(port):
        print(f"qcourse lab: port {port} on {HOST} is in use by another program; choose another "
              f"(make lab LAB_ARGS=--port=N) or leave --port out to get a free one", file=sys.stderr)
        return 1
    token = token or os.environ.get("QCOURSE_LAB_TOKEN") or secrets.token_hex(24)
    print(f"qcourse lab: JupyterLab for {root}, pid {os.getpid()}, listening on {HOST} only\n"
          f"  open: {url_of(port, token)}\n"
          f"  stop: Ctrl+C here, or `kill {os.getpid()}`", flush=True)
    cmd = server_command(root, port, token)
    os.execv(cmd[0], cmd)  # the server keeps this PID
