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
    (the real folder, read-only or writable); later mounts lie on top of earlier ones.

    Example:
        >>> args = bwrap_args([("hide", Path("/srv/course")), ("rw", Path("/tmp/w"))])
        >>> args[:3], "--unshare-net" in args, args[-5:]
        (['bwrap', '--ro-bind', '/'], True, ['--tmpfs', '/srv/course', '--bind', '/tmp/w', '/tmp/w'])
    """
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
            "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--hostname", "sandbox"]
    for secret in SECRET_FILES:  # the kernel is root inside its box: mask what root could read
        if Path(secret).exists():
            args += ["--ro-bind", "/dev/null", secret]
    flags = {"hide": ["--tmpfs"], "ro": ["--ro-bind"], "rw": ["--bind"]}
    for kind, path in mounts:
        args += flags[kind] + [str(path)] * (1 if kind == "hide" else 2)
    return args


def write_kernel_spec(work: Path, limits: Limits, mounts: list[tuple[str, Path]], cgroup: str) -> dict:
    """Write a ``python3`` kernel spec under ``work/jupyter`` that starts the boxed kernel.

    Returns the environment variables that make jupyter (and so nbgrader) use it.
    """
    launcher = [sys.executable, "-m", "qcourse.sandbox", "launch", "--cgroup", cgroup,
                "--memory-mb", str(limits.memory_mb), "--cpu-seconds", str(limits.cpu_seconds),
                "--processes", str(limits.processes), "--file-mb", str(limits.file_mb), "--"]
    box = bwrap_args(mounts) + ["--"] if bwrap_works() else []
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
def _cgroup_dirs(name: str) -> list[Path]:
    return [CGROUP_ROOT / ctl / name for ctl in ("pids", "memory")]


def enter_cgroup(name: str, limits: Limits) -> bool:
    """Move this process into a fresh cgroup with the process and memory caps (cgroup v1)."""
    settings = {"pids": {"pids.max": limits.processes},
                "memory": {"memory.limit_in_bytes": limits.memory_mb * 2**20}}
    joined = False
    for ctl, values in settings.items():
        d = CGROUP_ROOT / ctl / name
        try:
            d.mkdir(exist_ok=True)
            for key, value in values.items():
                (d / key).write_text(str(value))
            (d / "cgroup.procs").write_text(str(os.getpid()))
            joined = True
        except OSError:
            continue
    return joined


def kill_cgroup(name: str) -> None:
    """Kill whatever is left in the cgroup and remove it (after the submission is graded)."""
    import signal
    import time

    for d in _cgroup_dirs(name):
        if not d.is_dir():
            continue
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


def launch(argv: list[str]) -> None:
    """``launch --cgroup N --memory-mb M --cpu-seconds C --processes P --file-mb F -- CMD...``."""
    import argparse

    sep = argv.index("--")
    p = argparse.ArgumentParser(prog="qcourse.sandbox launch")
    for name in ("--cgroup",):
        p.add_argument(name, required=True)
    for name in ("--memory-mb", "--cpu-seconds", "--processes", "--file-mb"):
        p.add_argument(name, type=int, required=True)
    a = p.parse_args(argv[:sep])
    limits = Limits(a.memory_mb, a.cpu_seconds, a.processes, a.file_mb)
    enter_cgroup(a.cgroup, limits)
    mb = 2**20
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
    # address space: the memory cap plus room for the libraries' reserved-but-unused mappings
    space = (limits.memory_mb + 8192) * mb
    resource.setrlimit(resource.RLIMIT_AS, (space, space))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))  # non-root users
    cmd = argv[sep + 1:]
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
