"""The two commands of the README: the environment `make` builds and the server `make lab` starts."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
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
def test_make_lab_serves_labs_on_loopback_with_nbgrader(tmp_path):
    """`make lab`: prints its URL with the token, listens on 127.0.0.1 only, serves labs/ with
    nbgrader's extensions, refuses a second server for the same folder, and stops by its PID."""
    port, token = _free_port(), "qcourse-test-token"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}  # only this test's servers
    proc = subprocess.Popen(["make", "-s", "lab", f"LAB_ARGS=--port={port} --token={token}"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in iter(proc.stdout.readline, ""):  # set-up's lines first, then the launcher's banner
            lines.append(line)
            if line.startswith("  stop:"):
                break
        text = "".join(lines)
        assert f"open: http://127.0.0.1:{port}/lab?token={token}" in text, text
        server_pid = int(text.split("qcourse lab: ")[1].split(", pid ")[1].split(",")[0])
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
        with pytest.raises(urllib.error.HTTPError):  # no token, no entry
            urllib.request.urlopen(f"{base}/api/contents", timeout=5)
        import psutil
        listening = {c.laddr.ip for c in psutil.Process(server_pid).net_connections() if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}, listening

        second = subprocess.run(["make", "-s", "lab"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode != 0
        assert f"already running for {ROOT / 'labs'} (pid {server_pid})" in second.stderr, second.stderr
        assert f"http://127.0.0.1:{port}/lab?token={token}" in second.stderr

        os.kill(server_pid, signal.SIGTERM)  # stop it by the PID it printed
        proc.wait(timeout=30)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_lab_refuses_a_port_taken_by_another_program(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([str(BIN / "qcourse"), "lab", "--root", str(tmp_path), "--port", str(port)],
                             capture_output=True, text=True, timeout=60,
                             env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")})
    assert out.returncode == 1 and f"port {port} on 127.0.0.1 is in use" in out.stderr


def test_lab_refuses_a_missing_folder(tmp_path):
    out = subprocess.run([str(BIN / "qcourse"), "lab", "--root", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no folder" in out.stderr
