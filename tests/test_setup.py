"""The two commands of the README: the environment `make` builds and the server `make lab` starts."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_qcourse_console_script():
    out = subprocess.run([str(BIN / "qcourse"), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("qcourse ")
    env = subprocess.run([str(BIN / "qcourse"), "env"], capture_output=True, text=True, check=True)
    assert "torch 2.13.0" in env.stdout and "threads" in env.stdout


def test_qcore_is_installed_editable_from_this_tree():
    import qcore
    assert Path(qcore.__file__).resolve().parent == ROOT / "qcore"


def test_nbgrader_extensions_are_enabled():
    server = subprocess.run([str(BIN / "jupyter"), "server", "extension", "list"],
                            capture_output=True, text=True)
    assert "nbgrader" in server.stdout + server.stderr
    lab = subprocess.run([str(BIN / "jupyter"), "labextension", "list"], capture_output=True, text=True)
    assert "nbgrader" in lab.stdout + lab.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_make_lab_serves_labs_on_loopback_with_nbgrader():
    port, token = _free_port(), "qcourse-test-token"
    proc = subprocess.Popen(
        ["make", "-s", "lab", f"LAB_ARGS=--port={port} --IdentityProvider.token={token}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("JupyterLab did not come up:\n" + (proc.stdout.read() if proc.poll() is not None else ""))
                time.sleep(0.5)
        with urllib.request.urlopen(f"{base}/api/contents?token={token}", timeout=5) as r:
            names = {item["name"] for item in json.load(r)["content"]}
        assert "README.md" in names  # the server's root is labs/
        with urllib.request.urlopen(f"{base}/lab/api/extensions?token={token}", timeout=5) as r:
            assert "nbgrader" in r.read().decode()
        # loopback only: the port is not bound on other addresses
        with socket.socket() as s:
            s.settimeout(1)
            other = socket.gethostbyname(socket.gethostname())
            if not other.startswith("127."):
                assert s.connect_ex((other, port)) != 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
