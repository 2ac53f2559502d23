"""The sandbox's parts: limits from the config, the mode, the kernel spec with and without bubblewrap."""
import json
import os
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


@pytest.mark.skipif(os.geteuid() != 0 or not sandbox.bwrap_works(), reason="needs root and a working bubblewrap")
def test_boxed_kernel_runs_as_its_own_user_and_reports_its_caps(tmp_path):
    """The kernel command of a real spec, with a probe in place of ipykernel: inside the box it is
    the submission's own unprivileged user, may write only where it was given, and the launcher
    writes which caps hold (the class report names the missing ones)."""
    work, own = tmp_path / "work", tmp_path / "work" / "exec"
    own.mkdir(parents=True)
    uid = sandbox.kernel_uid("qcourse-test-user")
    os.chown(own, uid, uid)
    mounts = [("hide", tmp_path), ("hide", Path.home()), ("ro", Path(sys.base_prefix).resolve()),
              ("ro", Path(sys.prefix).resolve()), ("rw", own)]  # as autograde's: the interpreter back on top
    sandbox.write_kernel_spec(work, sandbox.Limits(), mounts, "qcourse-test-user", uid)
    argv = _spec(work)["argv"]
    kernel = argv.index("ipykernel_launcher") - 2  # the kernel's interpreter, after the switch of user
    probe = ("import os\nprint(os.getuid(), os.getgid(), os.getgroups())\n"
             f"open({str(own / 'ok')!r}, 'w').write('x')\n"
             "for p in ('/etc/passwd.qcourse', '/root/.qcourse-probe'):\n"
             "    try:\n        open(p, 'w').write('x'); print('BREACH', p)\n    except OSError:\n        pass\n")
    out = subprocess.run(argv[:kernel] + [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    sandbox.kill_cgroup("qcourse-test-user")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[0] == f"{uid} {uid} []" and "BREACH" not in out.stdout
    assert (own / "ok").stat().st_uid == uid
    report = json.loads((work / "sandbox.json").read_text())
    assert report["uid"] == uid and report["cgroup"] == sandbox.cgroup_version()
    if sandbox.cgroup_version() == "v1":  # this machine's hierarchy takes both caps
        assert report["processes"] and report["memory"] and sandbox.held_caps(work) == []


def test_cgroup_v2_caps_and_what_the_report_says_when_one_is_refused(tmp_path, monkeypatch):
    """cgroup v2 (one hierarchy; the controllers delegated by the parent's subtree_control): the
    launcher's cgroup gets pids.max and memory.max. A refused write is reported, not ignored."""
    root = tmp_path / "cgroup"
    (root / "grader").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    monkeypatch.setattr(sandbox, "CGROUP_ROOT", root)
    monkeypatch.setattr(sandbox, "_v2_parent", lambda: root / "grader")
    assert sandbox.cgroup_version() == "v2"
    held = sandbox.enter_cgroup("qcourse-x", sandbox.Limits(processes=64, memory_mb=1024))
    box = root / "grader" / "qcourse-x"
    assert held == {"processes": True, "memory": True}
    assert (box / "pids.max").read_text() == "64" and (box / "memory.max").read_text() == str(2**30)
    assert (box / "cgroup.procs").read_text() == str(os.getpid())
    assert "+pids" in (root / "grader" / "cgroup.subtree_control").read_text()
    write = sandbox._write
    monkeypatch.setattr(sandbox, "_write", lambda path, value: path.name != "memory.max" and write(path, value))
    held = sandbox.enter_cgroup("qcourse-y", sandbox.Limits())
    assert held == {"processes": True, "memory": False}
    (tmp_path / "sandbox.json").write_text(json.dumps({**held, "cgroup": "v2", "uid": 200001}))
    assert sandbox.held_caps(tmp_path) == ["sandbox: no memory cap (cgroup v2)"]


def test_model_cache_is_shared_with_the_kernels_users(tmp_path):
    """A model written for its owner only (as older versions did) becomes readable for the box."""
    from qcourse.autograde import share_model_cache

    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"x")
    (model / "model.safetensors").chmod(0o600)
    model.chmod(0o700)
    share_model_cache(tmp_path)
    assert (model / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert model.stat().st_mode & 0o777 == 0o755
