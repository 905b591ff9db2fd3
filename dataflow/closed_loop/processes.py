"""The loop's child processes: started in their own process groups with their output in log
files, checked, and stopped again (:class:`Processes`); a private redis-server
(:func:`start_redis`); waiting for a file a child writes when it is up (:func:`wait_for_file`).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Optional

__all__ = ["Processes", "free_port", "start_redis", "wait_for_file", "REPO_ROOT"]

_LOG = logging.getLogger(__name__)

# the children run from the repository's root (python -m dataflow.X)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Processes:
    """Child processes started by the loop, each in a process group of its own, its output
    in ``log_dir/NAME.log``; ``stop_all`` ends each of them (its whole process group),
    newest first.

    Args:
        log_dir: the folder of the children's logs.

    >>> import sys, tempfile
    >>> procs = Processes(tempfile.mkdtemp())
    >>> procs.start("fails", [sys.executable, "-c", "raise SystemExit(3)"]).wait()
    3
    >>> procs.check("fails")
    Traceback (most recent call last):
    ...
    RuntimeError: fails exited with 3; see .../fails.log
    >>> _ = procs.start("sleeps", [sys.executable, "-c", "import time; time.sleep(60)"])
    >>> procs.stop_all()                   # SIGTERM to each process group, newest first
    >>> procs.children
    []
    """

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.children: list = []  # (name, Popen, log file)
        self.pids: dict = {}  # name -> pid of everything ever started

    def start(self, name: str, argv: list, env: Optional[dict] = None) -> subprocess.Popen:
        """Starts a child from the repository's root.

        Args:
            name: its name (of its log file, and for :meth:`check` and :meth:`stop`).
            argv: its command line.
            env: variables added to this process's environment.

        Returns:
            Its ``Popen``.
        """
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        self.children.append((name, proc, log))
        self.pids[name] = proc.pid
        _LOG.info("loop: started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def check(self, *names) -> None:
        """Checks that children have not failed.

        Args:
            *names: the children's names.

        Raises:
            RuntimeError: one of them exited with an error (its log is named).
        """
        for name, proc, _ in self.children:
            if name in names and proc.poll() not in (None, 0):
                raise RuntimeError(f"{name} exited with {proc.returncode}; see "
                                   f"{self.log_dir}/{name}.log")

    def stop(self, name: str, timeout_s: float = 15.0) -> None:
        """Ends a child's process group: SIGTERM, then SIGKILL.

        Args:
            name: the child.
            timeout_s: how long to wait after SIGTERM before SIGKILL.
        """
        for child_name, proc, log in list(self.children):
            if child_name != name:
                continue
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
            log.close()
            self.children.remove((child_name, proc, log))

    def stop_all(self) -> None:
        """Ends every child, newest first."""
        for name, _, _ in reversed(list(self.children)):
            self.stop(name)


def free_port() -> int:
    """Returns: a TCP port of 127.0.0.1 free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(procs: Processes, workdir: str) -> str:
    """Starts a private redis-server (no persistence) on a free port, as child ``redis``.

    Args:
        procs: the loop's children.
        workdir: redis-server's working folder.

    Returns:
        Its URL, once it answers.
    """
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        raise RuntimeError("redis-server is missing: apt-get install redis-server "
                           "(or pass --store redis://HOST:PORT/DB)")
    port = free_port()
    proc = procs.start("redis", [binary, "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", workdir, "--save", "", "--appendonly", "no"])
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer on port {port}")
        time.sleep(0.05)


def wait_for_file(path: str, procs: Processes, name: str, timeout_s: float) -> str:
    """Waits until child ``name`` has written ``path`` (e.g. serving's URL once it is up).

    Args:
        path: the file.
        procs: the loop's children.
        name: the child that writes it (an error if it exits first).
        timeout_s: how long to wait.

    Returns:
        The file's text, stripped.
    """
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        procs.check(name)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start within {timeout_s:.0f} s; see "
                               f"{procs.log_dir}/{name}.log")
        time.sleep(0.1)
    with open(path, encoding="utf-8") as f:
        return f.read().strip()
