"""The sandbox's parts: limits from the config, the mode, the kernel spec with and without bubblewrap."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qcourse import sandbox
from qcourse.build import COURSE


@pytest.fixture
def fresh_probe():
    """``bwrap_works`` caches its probe: forget it before and after a test that changes PATH."""
    sandbox.bwrap_works.cache_clear()
    yield
    sandbox.bwrap_works.cache_clear()


def _spec(work: Path) -> dict:
    return json.loads((work / "jupyter" / "kernels" / "python3" / "kernel.json").read_text())


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


def test_mode_here_is_bubblewrap_exactly_when_it_is_installed(fresh_probe):
    """Where ``bwrap`` is on PATH it must work: installed but refused (no user namespaces) would
    grade every submission with limits only, and this test says so instead of the class report."""
    where = shutil.which("bwrap")
    assert sandbox.mode() == ("bubblewrap" if where else "limits-only"), f"{where} is installed but refused here"


@pytest.mark.parametrize("bwrap", ["missing", "refused"])
def test_mode_falls_back_to_limits_only(bwrap, tmp_path, monkeypatch, fresh_probe):
    """With bwrap hidden from PATH, or a bwrap that cannot build its namespaces, the kernel gets
    the limits alone and says so (``QCOURSE_SANDBOX``, which the class report shows)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if bwrap == "refused":
        fake = bin_dir / "bwrap"
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert sandbox.bwrap_works() is False and sandbox.mode() == "limits-only"
    sandbox.write_kernel_spec(tmp_path / "work", sandbox.Limits(), [("hide", Path("/srv"))], "qcourse-x")
    spec = _spec(tmp_path / "work")
    assert "bwrap" not in spec["argv"] and "launch" in spec["argv"]
    assert spec["env"]["QCOURSE_SANDBOX"] == "limits-only"


def test_kernel_spec_without_bubblewrap_keeps_the_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    env = sandbox.write_kernel_spec(tmp_path, sandbox.Limits(processes=64), [("hide", Path("/srv"))], "qcourse-x")
    argv = _spec(tmp_path)["argv"]
    assert "bwrap" not in argv and "launch" in argv
    assert argv[argv.index("--processes") + 1] == "64" and argv[argv.index("--") + 1] == sys.executable
    assert _spec(tmp_path)["interrupt_mode"] == "message" and env["JUPYTER_PATH"] == str(tmp_path / "jupyter")


def test_kernel_spec_with_bubblewrap_boxes_the_kernel_inside_the_limits(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: True)
    sandbox.write_kernel_spec(tmp_path, sandbox.Limits(), [("hide", Path("/srv"))], "qcourse-x")
    spec = _spec(tmp_path)
    argv = spec["argv"]
    launch_end, box = argv.index("--"), argv.index("bwrap")
    assert argv.index("launch") < launch_end < box  # the limits first, then the namespaces
    assert argv[box:argv.index("--", box)] == sandbox.bwrap_args([("hide", Path("/srv"))])
    assert argv[argv.index("--", box) + 1:][:2] == [sys.executable, "-m"]
    assert spec["env"]["QCOURSE_SANDBOX"] == "bubblewrap"


def test_bubblewrap_masks_root_only_files():
    args = sandbox.bwrap_args([])
    assert "--unshare-net" in args and "--unshare-pid" in args
    if Path("/etc/shadow").exists():
        i = args.index("/etc/shadow")
        assert args[i - 2:i] == ["--ro-bind", "/dev/null"]
