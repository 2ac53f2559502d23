"""A Dask scheduler and single-threaded workers on this machine, as subprocesses, as an instructor
would start them (``dask scheduler``, ``dask worker --preload qcourse.cluster_worker``): what the
cluster tests and ``bench/bench_cluster.py`` grade on. Every process is stopped by its own PID.

Example:
    >>> import tempfile
    >>> cluster = LocalCluster(Path(tempfile.mkdtemp()))
    >>> cluster.add_worker("w1"); cluster.wait_for(1)
    >>> cluster.grading("w1"), cluster.scheduler_file.name
    ([], 'scheduler.json')
    >>> cluster.stop()
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


class LocalCluster:
    """A ``dask scheduler`` and ``dask worker`` processes (one thread each) on 127.0.0.1, started
    as an instructor would start them, with the course's preload; stopped by their own PIDs."""

    def __init__(self, root: Path):
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.scheduler_file, self.workers = root, root / "scheduler.json", {}
        self.scheduler = self._start(["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                      "--scheduler-file", str(self.scheduler_file)], root / "scheduler.log")

    def _start(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen([str(BIN / "dask"), *args], stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def add_worker(self, name: str) -> None:
        (self.root / name).mkdir(exist_ok=True)
        self.workers[name] = self._start(
            ["worker", "--scheduler-file", str(self.scheduler_file), "--nthreads", "1", "--no-nanny",
             "--name", name, "--local-directory", str(self.root / name), "--preload", "qcourse.cluster_worker"],
            self.root / f"{name}.log")

    def wait_for(self, n_workers: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not self.scheduler_file.is_file():
            assert time.monotonic() < deadline and self.scheduler.poll() is None, self.log("scheduler")
            time.sleep(0.2)
        import distributed

        with distributed.Client(scheduler_file=str(self.scheduler_file), timeout=30) as client:
            client.wait_for_workers(n_workers, timeout=max(1, deadline - time.monotonic()))

    def grading(self, name: str) -> list[Path]:
        """The grading folders of the submissions the worker is in the middle of."""
        return [Path(m.read_text()) for m in (self.root / name).glob("*/*/qcourse/grading/*") if m.read_text()]

    def kill(self, name: str) -> None:
        """SIGKILL the worker, as a machine that dies would, then whatever it left running."""
        left = self.grading(name)
        os.kill(self.workers[name].pid, signal.SIGKILL)
        self.workers[name].wait()
        for folder in left:
            _kill_processes_under(folder)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""

    def stop(self) -> None:
        for proc in [*self.workers.values(), self.scheduler]:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.workers.values(), self.scheduler]:
            try:
                proc.wait(timeout=3)  # nothing to save: a slow shutdown is cut short
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def _kill_processes_under(folder: Path) -> None:
    """The nbgrader runs a killed worker started live on in sessions of their own: end those whose
    working folder is inside its grading folder (all of them started by this test)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(folder):
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:
            pass
