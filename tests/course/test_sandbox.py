"""The sandbox's parts: limits from the config, the kernel spec with and without bubblewrap."""
import json
import subprocess
import sys
from pathlib import Path

from qcourse import sandbox
from qcourse.build import COURSE


def test_limits_come_from_the_course_config():
    limits = sandbox.load_limits(COURSE)
    assert limits.processes == 256 and limits.memory_mb == 6144 and limits.wall_seconds == 900


def test_launcher_applies_the_limits(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "qcourse.sandbox", "launch", "--cgroup", "qcourse-test-launch",
         "--memory-mb", "2048", "--cpu-seconds", "77", "--processes", "32", "--file-mb", "5", "--",
         sys.executable, "-c", "import resource as r; print(r.getrlimit(r.RLIMIT_CPU)[0], r.getrlimit(r.RLIMIT_FSIZE)[0])"],
        capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["77", str(5 * 2**20)]
    sandbox.kill_cgroup("qcourse-test-launch")


def test_kernel_spec_without_bubblewrap_keeps_the_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    env = sandbox.write_kernel_spec(tmp_path, sandbox.Limits(), [("hide", Path("/srv"))], "qcourse-x")
    spec = json.loads((tmp_path / "jupyter" / "kernels" / "python3" / "kernel.json").read_text())
    assert "bwrap" not in spec["argv"] and "launch" in spec["argv"]
    assert spec["interrupt_mode"] == "message" and env["JUPYTER_PATH"] == str(tmp_path / "jupyter")
    assert sandbox.mode() in ("bubblewrap", "limits-only")


def test_bubblewrap_masks_root_only_files():
    args = sandbox.bwrap_args([])
    assert "--unshare-net" in args and "--unshare-pid" in args
    if Path("/etc/shadow").exists():
        i = args.index("/etc/shadow")
        assert args[i - 2:i] == ["--ro-bind", "/dev/null"]
