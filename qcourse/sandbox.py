"""Sandboxed kernels: student code runs with no network, no view of the course, and hard limits.

nbgrader itself runs outside (trusted); only the kernel that executes a submission is boxed.
The kernel spec written into each submission's private folder starts::

    python -m qcourse.sandbox launch <limits> -- bwrap <mounts> -- python -m ipykernel_launcher -f ...

``launch`` puts itself in a cgroup of its own (process count and memory, where cgroups are
writable), sets resource limits (CPU seconds, address space, file size), then becomes
bubblewrap, which gives the kernel: a read-only system and virtual environment, a private
``/tmp``, no network (its own empty network namespace), its own process namespace (nothing
survives the kernel), and no view of the course folder (references, masters, sources,
gradebook, other submissions) or of the home folder except the model cache. The one writable
place is the submission's own execution folder.

Where bubblewrap is missing or refused, the limits alone apply and ``mode()`` says
``"limits-only"``: the class report names the mode that graded.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SECRET_FILES = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/sudoers")


@dataclass(frozen=True)
class Limits:
    """What one submission's kernel may use; set in nbgrader_config.py as ``c.QCourseSandbox.<name>``."""

    memory_mb: int = 6144       # resident memory (cgroup) and, with slack, address space
    cpu_seconds: int = 900      # CPU time of the kernel process
    processes: int = 256        # processes and threads in the kernel's cgroup (fork bombs)
    file_mb: int = 512          # largest file the kernel may write
    wall_seconds: int = 900     # the whole submission, nbgrader included (enforced by the grader)


def load_limits(course_root: Path) -> Limits:
    """The limits configured in ``course_root/nbgrader_config.py`` (defaults for the rest).

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp())
        >>> _ = (d / "nbgrader_config.py").write_text("c = get_config()\\nc.QCourseSandbox.processes = 64\\n")
        >>> load_limits(d).processes, load_limits(d).memory_mb
        (64, 6144)
    """
    from traitlets.config.loader import PyFileConfigLoader

    cfg = PyFileConfigLoader("nbgrader_config.py", path=str(course_root)).load_config()
    section = cfg.get("QCourseSandbox", {})
    known = {f.name for f in fields(Limits)}
    return Limits(**{k: int(v) for k, v in section.items() if k in known})


@lru_cache(maxsize=1)
def bwrap_works() -> bool:
    """True when bubblewrap is installed and can build a namespace here."""
    exe = shutil.which("bwrap")
    if not exe:
        return False
    probe = subprocess.run([exe, "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "true"],
                           capture_output=True)
    return probe.returncode == 0


def mode() -> str:
    """``"bubblewrap"`` or ``"limits-only"`` (resource limits without namespaces)."""
    return "bubblewrap" if bwrap_works() else "limits-only"


def bwrap_args(mounts: list[tuple[str, Path]]) -> list[str]:
    """bubblewrap's command line: read-only system, private /tmp, no network, then ``mounts``
    in order, each ``("hide", path)`` (an empty tmpfs on top), ``("ro", path)`` or ``("rw", path)``
    (the real folder, read-only or writable); later mounts lie on top of earlier ones. The folders
    on the way to a mount are made world-readable (bubblewrap would make them 0700 inside a hidden
    one, closed to the kernel's unprivileged user), and ``/tmp`` is world-writable.

    Example:
        >>> args = bwrap_args([("hide", Path("/srv/course")), ("rw", Path("/tmp/w"))])
        >>> args[:3], "--unshare-net" in args
        (['bwrap', '--ro-bind', '/'], True)
        >>> args[-5:]
        ['--tmpfs', '/srv/course', '--bind', '/tmp/w', '/tmp/w']
    """
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp",
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--hostname", "sandbox"]
    for secret in SECRET_FILES:  # in case the kernel runs as root: mask what root could read
        if Path(secret).exists():
            args += ["--ro-bind", "/dev/null", secret]
    flags = {"hide": ["--tmpfs"], "ro": ["--ro-bind"], "rw": ["--bind"]}
    for kind, path in mounts:
        if kind != "hide":  # the folders bubblewrap makes on the way into a hidden one: open to the kernel's user
            for parent in reversed(Path(path).parents[:-1]):
                if parent != Path("/tmp"):  # /tmp stays world-writable (1777)
                    args += ["--perms", "0755", "--dir", str(parent)]
        if kind == "hide":  # an empty folder; /tmp stays writable for everyone, as a system's is
            args += ["--perms", "1777" if Path(path) == Path("/tmp") else "0755"]
        args += flags[kind] + [str(path)] * (1 if kind == "hide" else 2)
    return args


# Run inside the box by bubblewrap (as root there) to become the kernel's own user, then the kernel.
BECOME_USER = ("import os, sys; uid = int(sys.argv[1]); os.setgroups([]); os.setgid(uid); os.setuid(uid); "
               "os.execv(sys.argv[2], sys.argv[2:])")


def kernel_uid(name: str) -> int | None:
    """The unprivileged user a submission's kernel runs as (one per submission, so that their
    process counts are their own), or None when the grader is not root and cannot switch users.

    >>> uid = kernel_uid("qcourse-1-alice")
    >>> uid is None or 200_000 <= uid < 260_000
    True
    """
    if os.geteuid() != 0:
        return None
    import hashlib

    return 200_000 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 60_000


def write_kernel_spec(work: Path, limits: Limits, mounts: list[tuple[str, Path]], cgroup: str,
                      uid: int | None = None) -> dict:
    """Write a ``python3`` kernel spec under ``work/jupyter`` that starts the boxed kernel, as
    user ``uid`` when given; the launcher writes what it could set up into ``work/sandbox.json``.

    Returns the environment variables that make jupyter (and so nbgrader) use it.
    """
    launcher = [sys.executable, "-m", "qcourse.sandbox", "launch", "--cgroup", cgroup,
                "--memory-mb", str(limits.memory_mb), "--cpu-seconds", str(limits.cpu_seconds),
                "--processes", str(limits.processes), "--file-mb", str(limits.file_mb),
                "--report", str(work / "sandbox.json")]
    boxed = bwrap_works()
    if uid is not None:
        launcher += ["--uid", str(uid)] + (["--uid-in-box"] if boxed else [])
    launcher.append("--")
    box = bwrap_args(mounts) + ["--"] if boxed else []
    if boxed and uid is not None:
        box += [sys.executable, "-c", BECOME_USER, str(uid)]
    # parent_handle=0: in its own PID namespace the kernel's parent is PID 1, which ipykernel
    # would take for "my parent died" and exit
    kernel = [sys.executable, "-m", "ipykernel_launcher", "--IPKernelApp.parent_handle=0", "-f", "{connection_file}"]
    spec_dir = work / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True, exist_ok=True)
    # interrupts as messages: a signal to the launcher would not cross into the namespace
    spec = {"argv": launcher + box + kernel, "display_name": "Python 3 (sandboxed)", "language": "python",
            "interrupt_mode": "message",
            "env": {"HOME": "/tmp", "MPLCONFIGDIR": "/tmp", "IPYTHONDIR": "/tmp/.ipython",
                    "PYTHONDONTWRITEBYTECODE": "1", "QCOURSE_SANDBOX": mode()}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    return {"JUPYTER_PATH": str(work / "jupyter"), "JUPYTER_RUNTIME_DIR": str(work / "runtime")}


# ----------------------------------------------------------------------------- cgroups
def cgroup_version() -> str:
    """``"v2"`` (one unified hierarchy), ``"v1"`` (a hierarchy per controller) or ``"none"``."""
    if (CGROUP_ROOT / "cgroup.controllers").is_file():
        return "v2"
    if (CGROUP_ROOT / "pids").is_dir() or (CGROUP_ROOT / "memory").is_dir():
        return "v1"
    return "none"


def _v2_parent() -> Path:
    """This process's own cgroup in the unified hierarchy (``0::/path`` in /proc/self/cgroup)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].strip().lstrip("/")
    return CGROUP_ROOT


def _cgroup_dirs(name: str) -> list[Path]:
    if cgroup_version() == "v2":
        return [_v2_parent() / name]
    return [CGROUP_ROOT / ctl / name for ctl in ("pids", "memory")]


def _write(path: Path, value) -> bool:
    try:
        path.write_text(str(value))
        return True
    except OSError:
        return False


def enter_cgroup(name: str, limits: Limits) -> dict[str, bool]:
    """Move this process into a fresh cgroup with the process and memory caps (cgroup v1 or v2);
    returns which caps hold (``{"processes": ..., "memory": ...}``)."""
    held = {"processes": False, "memory": False}
    version = cgroup_version()
    if version == "v1":
        for cap, ctl, key, value in (("processes", "pids", "pids.max", limits.processes),
                                     ("memory", "memory", "memory.limit_in_bytes", limits.memory_mb * 2**20)):
            d = CGROUP_ROOT / ctl / name
            try:
                d.mkdir(exist_ok=True)
            except OSError:
                continue
            held[cap] = _write(d / key, value) and _write(d / "cgroup.procs", os.getpid())
    elif version == "v2":
        parent = _v2_parent()
        _write(parent / "cgroup.subtree_control", "+pids +memory")  # refused where not delegated: then no caps
        d = parent / name
        try:
            d.mkdir(exist_ok=True)
        except OSError:
            return held
        caps = {"processes": _write(d / "pids.max", limits.processes),
                "memory": _write(d / "memory.max", limits.memory_mb * 2**20)}
        if _write(d / "cgroup.procs", os.getpid()):
            held = caps
    return held


def kill_cgroup(name: str) -> None:
    """Kill whatever is left in the cgroup and remove it (after the submission is graded)."""
    import signal
    import time

    for d in _cgroup_dirs(name):
        if not d.is_dir():
            continue
        _write(d / "cgroup.kill", 1) if (d / "cgroup.kill").exists() else None  # v2: all at once
        for _ in range(50):
            try:
                pids = [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except OSError:
                break
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        try:
            d.rmdir()
        except OSError:
            pass


def held_caps(work: Path) -> list[str]:
    """What the class report should say about the box of the submission graded in ``work``: the
    caps the launcher could not set, and a kernel left running as root.

    >>> import tempfile; w = Path(tempfile.mkdtemp())
    >>> _ = (w / "sandbox.json").write_text('{"processes": true, "memory": false, "cgroup": "v2", "uid": 200001}')
    >>> held_caps(w)
    ['sandbox: no memory cap (cgroup v2)']
    """
    try:
        report = json.loads((work / "sandbox.json").read_text())
    except (OSError, ValueError):
        return []
    notes = [f"sandbox: no {cap} cap (cgroup {report.get('cgroup')})" for cap in ("processes", "memory")
             if not report.get(cap)]
    if report.get("uid") == 0:
        notes.append("sandbox: the kernel ran as root")
    return notes


def launch(argv: list[str]) -> None:
    """``launch --cgroup N --memory-mb M --cpu-seconds C --processes P --file-mb F -- CMD...``."""
    import argparse

    sep = argv.index("--")
    p = argparse.ArgumentParser(prog="qcourse.sandbox launch")
    p.add_argument("--cgroup", required=True)
    for name in ("--memory-mb", "--cpu-seconds", "--processes", "--file-mb"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--report", type=Path, help="where to write which caps hold and the kernel's user")
    p.add_argument("--uid", type=int, help="the unprivileged user the kernel runs as")
    p.add_argument("--uid-in-box", action="store_true", help="the box switches to --uid (bubblewrap), not this launcher")
    a = p.parse_args(argv[:sep])
    limits = Limits(a.memory_mb, a.cpu_seconds, a.processes, a.file_mb)
    held = enter_cgroup(a.cgroup, limits)
    mb = 2**20
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
    # address space: the memory cap plus room for the libraries' reserved-but-unused mappings
    space = (limits.memory_mb + 8192) * mb
    resource.setrlimit(resource.RLIMIT_AS, (space, space))
    # processes of the kernel's user: the backstop where the cgroup's cap did not hold. Where it
    # did, the cap is the cgroup's; a per-user count as tight would also refuse the kernel's own
    # threads while a fork bomb's processes wait to be reaped (the kernel then dies, measured)
    nproc = limits.processes * (4 if held["processes"] else 1)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    cmd = argv[sep + 1:]
    uid = os.getuid()
    if a.uid is not None and os.geteuid() == 0:
        if "-f" in cmd:  # the kernel's connection file, written by the grader for its own user only
            os.chown(cmd[cmd.index("-f") + 1], a.uid, a.uid)
        if not a.uid_in_box:
            os.setgroups([])
            os.setgid(a.uid)
            os.setuid(a.uid)
        uid = a.uid
    if a.report:
        a.report.write_text(json.dumps({**held, "cgroup": cgroup_version(), "uid": uid}))
    os.execvp(cmd[0], cmd)


def record_cell_start(cell=None, cell_index=None, **_):
    """nbclient hook (set in nbgrader_config.py): note which cell is running, so that a kernel
    death can be pinned on the cell that caused it."""
    progress = os.environ.get("QCOURSE_PROGRESS_FILE")
    if progress and cell_index is not None:
        Path(progress).write_text(str(cell_index))


if __name__ == "__main__":
    if sys.argv[1:2] == ["launch"]:
        launch(sys.argv[2:])
    else:
        print(f"sandbox mode here: {mode()}")
