"""Flink for Beam pipelines on this machine: the job server jar and a standalone cluster.

Two things come from outside Python and are set up by ``make`` (see README):

* the Beam Flink **job server jar**, shaded by ``flink/jobserver/pom.xml`` from Maven
  Central into ``.cache/flink/`` (Beam's FlinkRunner takes it with
  ``--flink_job_server_jar``; ``dataflow.options.pipeline_options`` fills that in);
* a **Flink distribution**, the ``apache-flink`` wheel installed with ``--no-deps`` into
  ``.venv-flink`` (it pins an old Beam, so it lives apart from ``.venv``). Its
  ``bin/start-cluster.sh`` starts a standalone cluster; :class:`FlinkCluster` drives it.

A job's Python runs in the submitting process with ``--environment_type=LOOPBACK``; in
processes of its own, one per SDK worker, with ``--environment_type=EXTERNAL`` and a
:class:`WorkerPool` (docs/flink.md, "Python in several processes").

Both locations can be overridden: ``BEAM_MONOLITH_FLINK_JOB_SERVER_JAR`` and ``FLINK_HOME``.

Command line::

    python -m dataflow.flink start      # standalone cluster, prints the flags a job needs
    python -m dataflow.flink start --taskmanagers 2   # + a Python worker pool (EXTERNAL)
    python -m dataflow.flink stop
    python -m dataflow.flink paths      # where the jar and the distribution are
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import argparse
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

from dataflow import cli
from schemas import strict_json

_LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Keep these three in step with flink/jobserver/pom.xml and the Makefile.
BEAM_VERSION = "2.62.0"
FLINK_VERSION = "1.19"
JOB_SERVER_JAR_NAME = f"beam-runners-flink-{FLINK_VERSION}-job-server-{BEAM_VERSION}.jar"


class FlinkSetupError(RuntimeError):
    """Something Flink needs is not installed; the message says what to run.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"FLINK_HOME": tempfile.mkdtemp()}):
    ...     flink_home()
    Traceback (most recent call last):
    ...
    dataflow.flink.FlinkSetupError: No Flink distribution (bin/start-cluster.sh) found ...
    """


def job_server_jar() -> str:
    """The Beam Flink job server jar.

    Returns:
        Its path (``BEAM_MONOLITH_FLINK_JOB_SERVER_JAR``, else the one ``make`` builds).

    Raises:
        FlinkSetupError: it, or Java, is missing; the message says how to get it.
    """
    path = os.environ.get("BEAM_MONOLITH_FLINK_JOB_SERVER_JAR") or str(
        REPO_ROOT / ".cache" / "flink" / JOB_SERVER_JAR_NAME)
    if not os.path.isfile(path):
        raise FlinkSetupError(
            f"Beam Flink job server jar not found at {path}. Run `make flink-jobserver` "
            "(needs Java 17 and Maven: apt-get install openjdk-17-jdk-headless maven) or set "
            "BEAM_MONOLITH_FLINK_JOB_SERVER_JAR.")
    _require_java()
    return path


def flink_home() -> str:
    """The Flink distribution.

    Returns:
        Its root (it has ``bin/ conf/ lib/``), from ``FLINK_HOME`` or ``.venv-flink``.

    Raises:
        FlinkSetupError: it, or Java, is missing (example: :class:`FlinkSetupError`).
    """
    home = os.environ.get("FLINK_HOME")
    if not home:
        found = sorted(glob.glob(str(REPO_ROOT / ".venv-flink" / "lib" / "python3*" /
                                     "site-packages" / "pyflink")))
        home = found[0] if found else ""
    if not home or not os.path.isfile(os.path.join(home, "bin", "start-cluster.sh")):
        raise FlinkSetupError(
            f"No Flink distribution (bin/start-cluster.sh) found (FLINK_HOME={home or 'unset'}). "
            f"Run `make flink-dist` (installs apache-flink=={FLINK_VERSION}.* with --no-deps "
            "into .venv-flink) or set FLINK_HOME.")
    _require_java()
    return home


def _require_java() -> None:
    if shutil.which("java") is None:
        raise FlinkSetupError("`java` is not on PATH: install a JDK 17 "
                              "(apt-get install openjdk-17-jre-headless).")


# Flink keeps records in network buffers for up to 100 ms before it sends them on. Training is
# a loop through the ParameterStore (the reader waits for the PS to publish a batch's
# gradients before reading on), and its elements are whole batches: sending each at once
# costs nothing and cut the reader's wait per batch from ~78 ms to ~19 ms
# (`benchmarks.train --runner FlinkRunner`, metric reader.ps_catch_up_wait_ms).
LOW_LATENCY_CONF = "execution.buffer-timeout.interval: 0 ms\n"


def low_latency_conf_dir() -> str:
    """A Flink configuration folder (``--flink_conf_dir``) with :data:`LOW_LATENCY_CONF`."""
    import hashlib
    digest = hashlib.sha256(LOW_LATENCY_CONF.encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"beam-monolith-flink-conf-{digest}"
    conf = folder / "config.yaml"
    if not conf.exists():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".config.yaml.{os.getpid()}"
        tmp.write_text(LOW_LATENCY_CONF)
        os.replace(tmp, conf)  # atomic: concurrent jobs never read half a file
    return str(folder)


def local_rest_conf_dir(port: int | None = None) -> str:
    """A ``--flink_conf_dir`` for a job on the job server's embedded MiniCluster
    (``--flink_master=[local]``), so the driver can reach the job through Flink's REST API
    (:func:`rest_address`; Flink otherwise binds a random port no one is told). Removed when
    this process exits (the job server reads it when the job is submitted).

    Args:
        port: the REST API's port (None: a free one).

    Returns:
        The folder: its ``config.yaml`` holds :data:`LOW_LATENCY_CONF` and
        ``rest.bind-port``.
    """
    import atexit
    folder = tempfile.mkdtemp(prefix="beam-monolith-flink-conf-")
    atexit.register(shutil.rmtree, folder, True)
    Path(folder, "config.yaml").write_text(
        LOW_LATENCY_CONF + f"rest.bind-port: {port or free_port()}\n")
    return folder


def rest_address(all_options: dict) -> str | None:
    """Where the REST API of a Flink job's cluster is.

    Args:
        all_options: the job's options
            (``PipelineOptions.get_all_options(retain_unknown_options=True)``).

    Returns:
        ``host:port``: the ``--flink_master`` of a remote cluster, or for the embedded
        MiniCluster (``[local]``, ``[auto]``) the ``rest.bind-port`` of its
        ``--flink_conf_dir`` (:func:`local_rest_conf_dir`); None when unknown.

    >>> rest_address({"flink_master": "http://flink:8081/"})
    'flink:8081'
    >>> rest_address({"flink_master": "[local]", "flink_conf_dir": local_rest_conf_dir(8123)})
    'localhost:8123'
    """
    master = (all_options.get("flink_master") or "[auto]").strip()
    if not master.startswith("["):
        return master.removeprefix("http://").removeprefix("https://").rstrip("/")
    conf_dir = all_options.get("flink_conf_dir")
    for name in ("config.yaml", "flink-conf.yaml"):
        path = os.path.join(conf_dir or "", name)
        if conf_dir and os.path.exists(path):
            for line in open(path, encoding="utf-8"):
                key, _, value = line.partition(":")
                if key.strip() == "rest.bind-port" and value.strip().isdigit():
                    return f"localhost:{value.strip()}"
    return None


def free_port() -> int:
    """A TCP port of localhost that is free now."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class FlinkCluster:
    """A standalone Flink cluster on localhost: one JobManager, ``taskmanagers`` TaskManager
    JVMs of ``task_slots`` slots each.

    It runs from a private copy of the distribution's ``conf/`` with free ports and its own
    log folder, so two clusters (or a leftover one) never collide. Use it as a context
    manager; ``stop()`` also kills the JVMs if the scripts leave any behind.

    Several TaskManagers of one slot each place a job deterministically: each TaskManager
    has its own SDK harness factory, so with ``--sdk_worker_parallelism=1`` (the default)
    subtask i of every stage runs in TaskManager i's one Python process (docs/flink.md,
    "Python in several processes").

    Args:
        task_slots: slots of each TaskManager.
        workdir: its configuration, logs and pid files (default: a new temporary folder).
        rest_port: the port of its REST API and web UI (default: a free one).
        extra_conf: more ``config.yaml`` settings, ``{key: value}``.
        taskmanagers: how many TaskManager JVMs (each 1200 MB when more than one, 1728 MB
            alone: the total stays sane on a shared machine).

    Raises:
        FlinkSetupError: there is no Flink distribution or no Java.

    It needs Flink (``make flink-dist``) and a minute to start, so this example is shown, not
    run (the Flink tests start one: ``tests/conftest.py``):

    >>> with FlinkCluster(task_slots=2) as cluster:          # doctest: +SKIP
    ...     run(["--runner=FlinkRunner", f"--flink_master={cluster.master}"])
    """

    def __init__(self, task_slots: int = 2, workdir: str | None = None,
                 rest_port: int | None = None, extra_conf: dict | None = None,
                 taskmanagers: int = 1):
        if taskmanagers < 1 or task_slots < 1:
            raise ValueError(f"taskmanagers ({taskmanagers}) and task_slots ({task_slots}) "
                             "must be at least 1")
        self.home = flink_home()
        self.task_slots = task_slots
        self.taskmanagers = taskmanagers
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="flink-cluster-"))
        self.rest_port = rest_port or free_port()
        self.extra_conf = dict(extra_conf or {})
        self.conf_dir = self.workdir / "conf"
        self.log_dir = self.workdir / "log"

    @property
    def master(self) -> str:
        """The value for ``--flink_master``."""
        return f"localhost:{self.rest_port}"

    @property
    def rest_url(self) -> str:
        return f"http://localhost:{self.rest_port}"

    def _write_conf(self) -> None:
        shutil.rmtree(self.conf_dir, ignore_errors=True)
        shutil.copytree(os.path.join(self.home, "conf"), self.conf_dir)
        settings = {
            "rest.port": self.rest_port,
            "rest.address": "localhost",
            "rest.bind-address": "localhost",
            "jobmanager.rpc.port": free_port(),
            "taskmanager.numberOfTaskSlots": self.task_slots,
            "taskmanager.memory.process.size": "1728m" if self.taskmanagers == 1 else "1200m",
            "jobmanager.memory.process.size": "1200m",
            "blob.server.port": free_port(),
            # one TaskManager: a fixed free port; several on one host: each picks its own
            "taskmanager.rpc.port": free_port() if self.taskmanagers == 1 else 0,
            "io.tmp.dirs": str(self.workdir / "tmp"),
            "parallelism.default": 1,
        }
        settings.update(self.extra_conf)
        # Flink 1.19 reads conf/config.yaml (standard YAML) first; flattened "a.b: v" keys are
        # accepted there too, and a later key wins over the nested default.
        with open(self.conf_dir / "config.yaml", "a", encoding="utf-8") as f:
            f.write("\n# beam-monolith test cluster\n")
            for key, value in settings.items():
                f.write(f"{key}: {json.dumps(value) if isinstance(value, str) else value}\n")
        # start-cluster.sh starts one TaskManager per line, locally for "localhost"
        (self.conf_dir / "workers").write_text("localhost\n" * self.taskmanagers)
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _env(self) -> dict:
        env = dict(os.environ)
        env.update(FLINK_HOME=self.home, FLINK_CONF_DIR=str(self.conf_dir),
                   FLINK_LOG_DIR=str(self.log_dir), FLINK_PID_DIR=str(self.workdir))
        return env

    def start(self, timeout_s: float = 120.0) -> "FlinkCluster":
        """Starts the cluster and waits until all its TaskManagers and slots are registered.

        Args:
            timeout_s: how long to wait.

        Returns:
            self.

        Raises:
            FlinkSetupError: it did not come up in time (its logs are in the message).
        """
        self._write_conf()
        _LOG.info("starting Flink cluster from %s, REST %s", self.home, self.rest_url)
        subprocess.run(["bash", os.path.join(self.home, "bin", "start-cluster.sh")],
                       env=self._env(), check=True, capture_output=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                overview = self.rest("/overview")
                if (overview.get("taskmanagers", 0) >= self.taskmanagers and
                        overview.get("slots-total", 0) >= self.taskmanagers * self.task_slots):
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        logs = self.logs_tail()
        self.stop()
        raise FlinkSetupError(f"Flink cluster did not come up on {self.rest_url} within "
                              f"{timeout_s:.0f}s. Logs:\n{logs}")

    def rest(self, path: str, method: str = "GET", body: dict | None = None) -> dict:
        """A call to the cluster's REST API.

        Args:
            path: e.g. ``/overview``.
            method: the HTTP method.
            body: a JSON body.

        Returns:
            The JSON answer.
        """
        return _rest(self.rest_url, path, method, body)

    def jobs(self) -> list[dict]:
        """[{id, status}] of every job the cluster knows."""
        return self.rest("/jobs").get("jobs", [])

    def pids(self, daemon: str = "*") -> list[int]:
        """The PIDs the scripts recorded.

        Args:
            daemon: ``taskexecutor``, ``standalonesession`` or ``*`` (all).

        Returns:
            Their PIDs.
        """
        pids = []
        for pid_file in self.workdir.glob(f"*-{daemon}.pid"):
            for line in pid_file.read_text().split():
                if line.strip().isdigit():
                    pids.append(int(line))
        return pids

    def running_job(self, timeout_s: float = 120.0) -> str:
        """The id of the job running on the cluster.

        Args:
            timeout_s: how long to wait for a job to be RUNNING.

        Returns:
            Its id.

        Raises:
            TimeoutError: none is RUNNING after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = [j["id"] for j in self.jobs() if j["status"] == "RUNNING"]
            if running:
                return running[0]
            time.sleep(0.2)
        raise TimeoutError(f"no job RUNNING on {self.rest_url} after {timeout_s:.0f}s")

    def checkpoints(self, job_id: str) -> dict:
        """A job's checkpoint counts.

        Args:
            job_id: the job.

        Returns:
            ``{"completed": n, "restored": n, "failed": n, ...}``.
        """
        return self.rest(f"/jobs/{job_id}/checkpoints").get("counts", {})

    def kill_taskmanager(self) -> int:
        """SIGKILL the newest TaskManager JVM (a crash: no clean shutdown); returns its pid."""
        pids = [p for p in self.pids("taskexecutor") if _alive(p)]
        if not pids:
            raise RuntimeError("no TaskManager process to kill")
        os.kill(pids[-1], signal.SIGKILL)
        while _alive(pids[-1]):
            time.sleep(0.05)
        return pids[-1]

    def start_taskmanager(self, timeout_s: float = 60.0) -> None:
        """Starts one more TaskManager and waits until the JobManager has it registered.

        Args:
            timeout_s: how long to wait.

        Raises:
            TimeoutError: it did not register in time.
        """
        def ids():
            return {tm["id"] for tm in self.rest("/taskmanagers").get("taskmanagers", [])}
        before = ids()  # may still list a killed one until its heartbeat times out
        subprocess.run(["bash", os.path.join(self.home, "bin", "taskmanager.sh"), "start"],
                       env=self._env(), check=True, capture_output=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ids() - before:
                return
            time.sleep(0.2)
        raise TimeoutError(f"the new TaskManager did not register within {timeout_s:.0f}s")

    def stop_with_savepoint(self, job_id: str, directory: str, drain: bool = False,
                            timeout_s: float = 120.0, manifest: dict | None = None) -> str:
        """``flink stop --savepointPath DIRECTORY JOB``: :func:`stop_with_savepoint` (the
        arguments) on this cluster."""
        return stop_with_savepoint(self.master, job_id, directory, drain, timeout_s, manifest)

    def stop(self) -> None:
        """Stops the cluster, and kills what the scripts leave behind."""
        try:
            subprocess.run(["bash", os.path.join(self.home, "bin", "stop-cluster.sh")],
                           env=self._env(), capture_output=True, timeout=60)
        except (subprocess.SubprocessError, OSError) as e:
            _LOG.warning("stop-cluster.sh failed: %s", e)
        for pid in self.pids():  # what the scripts left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def logs_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of each of the cluster's logs."""
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def __enter__(self) -> "FlinkCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class WorkerPool:
    """The Python worker pool (``python -m dataflow.worker_pool``: Beam's, with worker ids
    per TaskManager) for ``--environment_type=EXTERNAL``: every SDK worker a Flink
    TaskManager asks for is a process of its own, so a job at parallelism above 1 runs its
    Python on several cores (LOOPBACK runs all of it in the submitting process, under one
    GIL).

    The pool and its workers run this interpreter, with ``PATH`` its ``bin/`` first and
    ``PYTHONPATH`` this repository and the running ``sys.path``, so a worker imports what
    the submitting process imports (the venv's editable install may point at another
    checkout). The pool runs in a session of its own: :meth:`stop` kills the whole process
    group, the SDK workers it forked included.

    Args:
        port: its gRPC port (default: a free one).
        log_path: where its and its workers' output goes (default: a temporary file).

    >>> with WorkerPool() as pool:
    ...     flags = [f"--environment_type=EXTERNAL",
    ...              f"--environment_config={pool.environment_config}"]
    ...     pool.alive()
    True
    >>> pool.alive(), pool.processes()
    (False, [])
    """

    MODULE = "dataflow.worker_pool"  # Beam's, with per-TaskManager worker ids

    def __init__(self, port: int | None = None, log_path: str | None = None):
        self.port = port or free_port()
        self.log_path = log_path or tempfile.mkstemp(prefix="beam-worker-pool-",
                                                     suffix=".log")[1]
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def environment_config(self) -> str:
        """The value for ``--environment_config``: ``localhost:PORT``."""
        return f"localhost:{self.port}"

    def env(self) -> dict:
        """The pool's environment (see the class docstring)."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        paths = [str(REPO_ROOT), *(p for p in sys.path if p and os.path.isdir(p))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
            paths + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
        return env

    def start(self, timeout_s: float = 60.0) -> "WorkerPool":
        """Starts the pool and waits until its port accepts connections.

        Args:
            timeout_s: how long to wait.

        Returns:
            self.

        Raises:
            RuntimeError: it exited or did not listen in time (its log is in the message).
        """
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self.MODULE, f"--service_port={self.port}"],
                env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                with socket.create_connection(("localhost", self.port), timeout=0.5):
                    _LOG.debug("worker pool %d on port %d", self.pid, self.port)
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        tail = Path(self.log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the Python worker pool did not listen on port {self.port} within "
                           f"{timeout_s:.0f}s; its log {self.log_path}:\n{tail}")

    def alive(self) -> bool:
        """Whether the pool process runs."""
        return self.pid is not None and _alive(self.pid)

    def processes(self) -> list[int]:
        """The pool and the SDK workers it started (its process group), running ones only."""
        return process_group(self.pid) if self.pid else []

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the pool and every SDK worker it started: SIGTERM to its process group,
        SIGKILL to what is left after ``timeout_s``."""
        if self.pid is None:
            return
        stop_process_group(self.pid, timeout_s)
        if self._proc is not None:
            self._proc.wait()  # reap it: no zombie of ours

    def __enter__(self) -> "WorkerPool":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def process_group(pgid: int) -> list[int]:
    """The running (not zombie) processes of a process group, from ``/proc``.

    Args:
        pgid: the group's id (the pid of its leader).

    Returns:
        Their pids.

    >>> process_group(os.getpgrp()) != []
    True
    """
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp...
            pids.append(int(entry))
    return sorted(pids)


def stop_process_group(pgid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM to a process group, SIGKILL to what is left of it after ``timeout_s``.

    Args:
        pgid: the group's id.
        timeout_s: how long its processes get to exit.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + timeout_s
        while process_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not process_group(pgid):
            return


_shared_pool: WorkerPool | None = None
_shared_pool_lock = threading.Lock()


def shared_worker_pool() -> WorkerPool:
    """This process's worker pool, started on first use and stopped when it exits
    (``dataflow.options.pipeline_options`` uses it for a Flink job at parallelism above 1).

    Returns:
        The running pool.
    """
    global _shared_pool
    import atexit
    with _shared_pool_lock:
        if _shared_pool is None or not _shared_pool.alive():
            started = time.monotonic()
            _shared_pool = WorkerPool().start()
            atexit.register(_shared_pool.stop)
            _LOG.debug("worker pool started in %.1f s", time.monotonic() - started)
        return _shared_pool


SAVEPOINT_SEAL = "beam-monolith.sha256"
SAVEPOINT_MANIFEST = "beam-monolith.json"


class SavepointError(RuntimeError):
    """A savepoint that does not match the checksums taken when it was written.

    >>> savepoint = tempfile.mkdtemp()
    >>> Path(savepoint, "_metadata").write_bytes(b"state")
    5
    >>> verify_savepoint(savepoint)        # no seal: only Flink's own checks apply
    False
    >>> _ = seal_savepoint(savepoint)
    >>> verify_savepoint(savepoint)
    True
    >>> Path(savepoint, "_metadata").write_bytes(b"stale")
    5
    >>> verify_savepoint(savepoint)
    Traceback (most recent call last):
    ...
    dataflow.flink.SavepointError: savepoint ...: _metadata is damaged (checksum mismatch)
    """


def _savepoint_dir(path: str) -> Path:
    return Path(path.removeprefix("file://").removeprefix("file:"))


def _savepoint_files(root: Path) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != SAVEPOINT_SEAL)


def seal_savepoint(path: str) -> str:
    """Writes the SHA-256 of every file of a savepoint next to them (Flink checks no
    checksum: a bit flipped in ``_metadata`` or a state file may go unnoticed).

    Args:
        path: the savepoint (a folder, or its ``file://`` URL).

    Returns:
        The path of the seal written (example: :class:`SavepointError`).
    """
    import hashlib
    root = _savepoint_dir(path)
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root)}"
             for p in _savepoint_files(root)]
    (root / SAVEPOINT_SEAL).write_text("\n".join(lines) + "\n")
    return str(root / SAVEPOINT_SEAL)


def verify_savepoint(path: str) -> bool:
    """Checks a savepoint against its seal (:func:`seal_savepoint`).

    Args:
        path: the savepoint (a folder, or its ``file://`` URL).

    Returns:
        True if it matches its seal; False if it has no seal (not written by
        :func:`stop_with_savepoint`): then only Flink's own checks apply.

    Raises:
        SavepointError: no such savepoint, or a file of it missing, added or damaged
            (example there).
    """
    import hashlib
    root = _savepoint_dir(path)
    seal = root / SAVEPOINT_SEAL
    if not root.is_dir():
        raise SavepointError(f"savepoint {path}: no such directory")
    if not seal.exists():
        return False
    expected = {}
    for line in seal.read_text().splitlines():
        digest, _, name = line.partition("  ")
        expected[name] = digest
    found = {str(p.relative_to(root)) for p in _savepoint_files(root)}
    for name in sorted(set(expected) | found):
        if name not in found:
            raise SavepointError(f"savepoint {path}: {name} is missing")
        if name not in expected:
            raise SavepointError(f"savepoint {path}: {name} was not part of it")
        if hashlib.sha256((root / name).read_bytes()).hexdigest() != expected[name]:
            raise SavepointError(f"savepoint {path}: {name} is damaged (checksum mismatch)")
    return True


def _rest(master: str, path: str, method: str = "GET", body: dict | None = None) -> dict:
    """A call to the REST API of the cluster at ``master`` (host:port or a URL)."""
    base = master if master.startswith("http") else f"http://{master}"
    data = strict_json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read() or b"{}")


_ENDED = ("FINISHED", "CANCELED", "FAILED")


def jobs_named(master: str, name: str | None) -> list[str]:
    """The jobs of a name that have not ended.

    Args:
        master: the cluster's REST address (host:port or a URL).
        name: the jobs' name (None: any).

    Returns:
        Their ids.
    """
    return [j["jid"] for j in _rest(master, "/jobs/overview").get("jobs", [])
            if name in (None, j.get("name")) and j.get("state") not in _ENDED]


def cancel_jobs_named(master: str, name: str, timeout_s: float = 60.0) -> list[str]:
    """Cancels the jobs of a name and waits until they ended.

    Beam's job server, asked to cancel, stops its own invocation but leaves a job it
    submitted to a remote cluster running (and restarting once its Python workers are gone).

    Args:
        master: the cluster's REST address (host:port or a URL).
        name: the jobs' name.
        timeout_s: how long to wait for them to end.

    Returns:
        Their ids.
    """
    ids = jobs_named(master, name)
    for jid in ids:
        _rest(master, f"/jobs/{jid}?mode=cancel", "PATCH")
    deadline = time.monotonic() + timeout_s
    while ids and time.monotonic() < deadline:
        states = {j["jid"]: j["state"] for j in _rest(master, "/jobs/overview").get("jobs", [])}
        if all(states.get(jid) in _ENDED for jid in ids):
            break
        time.sleep(0.2)
    return ids


def stop_with_savepoint(master: str, job_id: str, directory: str, drain: bool = False,
                        timeout_s: float = 120.0, manifest: dict | None = None) -> str:
    """``flink stop --savepointPath DIRECTORY JOB`` through a cluster's REST API (the job
    then ends). The savepoint is sealed with the checksums of its files
    (:func:`seal_savepoint`), which ``dataflow.train`` verifies before it resumes from it.

    Args:
        master: the cluster's REST address (host:port or a URL).
        job_id: the job.
        directory: where the savepoint goes.
        drain: let the job's event time advance to the end first (Flink's ``--drain``).
        timeout_s: how long to wait for the savepoint.
        manifest: what the job was (its input, model, shards...), written into the
            savepoint as ``beam-monolith.json`` (:func:`savepoint_manifest`).

    Returns:
        The savepoint's path, once it completed.

    Raises:
        RuntimeError: the savepoint failed.
        TimeoutError: it was not done in time.
    """
    trigger = _rest(master, f"/jobs/{job_id}/stop", "POST",
                    {"targetDirectory": directory, "drain": drain})["request-id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _rest(master, f"/jobs/{job_id}/savepoints/{trigger}")
        if status.get("status", {}).get("id") == "COMPLETED":
            operation = status.get("operation", {})
            if "location" not in operation:
                raise RuntimeError(f"savepoint of job {job_id} failed: "
                                   f"{operation.get('failure-cause', operation)}")
            location = operation["location"]
            if manifest is not None:
                (_savepoint_dir(location) / SAVEPOINT_MANIFEST).write_text(
                    strict_json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            seal_savepoint(location)
            return location
        time.sleep(0.2)
    raise TimeoutError(f"savepoint of job {job_id} not done within {timeout_s:.0f}s")


def stop_job(master: str, job_id: str, ended: Callable[[], bool],
             timeout_s: float = 120.0) -> bool:
    """Ends a running job as FINISHED: Flink's stop with a savepoint (``flink stop``) into a
    temporary folder, removed afterwards.

    A checkpointed Beam job keeps its sources up, so it never ends by itself; cancelled,
    it loses its metrics (Beam's job server reads them from the ``JobExecutionResult`` of a
    job that finished). Stopped, it finishes, and its result keeps them.

    Args:
        master: the cluster's REST address (host:port or a URL).
        job_id: the job.
        ended: says whether the job ended (e.g. Beam's result is in a terminal state).
        timeout_s: how long to wait.

    Returns:
        True once ``ended()``; False if the savepoint failed or the job did not end in
        ``timeout_s`` (it may still run: cancel it then).
    """
    with tempfile.TemporaryDirectory(prefix="beam-monolith-stop-",
                                     ignore_cleanup_errors=True) as folder:
        trigger = _rest(master, f"/jobs/{job_id}/stop", "POST",
                        {"targetDirectory": f"file://{folder}", "drain": False})["request-id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ended():
                return True
            try:  # on the MiniCluster the REST API goes away with the finished job
                status = _rest(master, f"/jobs/{job_id}/savepoints/{trigger}")
            except OSError:
                status = {}
            operation = status.get("operation", {})
            if status.get("status", {}).get("id") == "COMPLETED" and "location" not in operation:
                _LOG.warning("stopping job %s with a savepoint failed: %s", job_id,
                             str(operation.get("failure-cause", operation))[:500])
                return False
            time.sleep(0.2)
    return False


def savepoint_manifest(path: str) -> dict | None:
    """What the job that wrote a savepoint was.

    Args:
        path: the savepoint (a folder, or its ``file://`` URL).

    Returns:
        :func:`stop_with_savepoint`'s ``manifest``, or None if it has none.
    """
    manifest = _savepoint_dir(path) / SAVEPOINT_MANIFEST
    return json.loads(manifest.read_text()) if manifest.exists() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a killed child of ours stays a zombie until reaped: not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


STATE_FILE = "beam-monolith-cluster.json"


def start_cluster(workdir: str, rest_port: int | None = None, taskmanagers: int = 1,
                  task_slots: int | None = None, worker_pool: bool | None = None) -> dict:
    """``python -m dataflow.flink start``: a :class:`FlinkCluster` and, for a job whose
    Python runs in several processes, a :class:`WorkerPool`, both left running; what was
    started is written to ``WORKDIR/beam-monolith-cluster.json`` for :func:`stop_cluster`.

    Args:
        workdir: the cluster's configuration, logs, pid files and that state file.
        rest_port: its REST port (None: a free one).
        taskmanagers: TaskManager JVMs.
        task_slots: slots of each (None: 2 with one TaskManager, 1 with several).
        worker_pool: start a pool (None: when ``taskmanagers`` > 1).

    Returns:
        The state: ``master``, ``taskmanagers``, ``task_slots``, ``pids`` (the JVMs),
        ``worker_pool`` (``{pid, port, log}`` or None) and ``flags``, the flags a job needs.
    """
    if task_slots is None:
        task_slots = 2 if taskmanagers == 1 else 1
    if worker_pool is None:
        worker_pool = taskmanagers > 1
    cluster = FlinkCluster(task_slots, workdir, rest_port, taskmanagers=taskmanagers).start()
    flags = ["--runner=FlinkRunner", f"--flink_master={cluster.master}"]
    pool_state = None
    if worker_pool:
        try:
            pool = WorkerPool(log_path=str(cluster.log_dir / "worker-pool.log")).start()
        except BaseException:
            cluster.stop()
            raise
        pool_state = {"pid": pool.pid, "port": pool.port, "log": pool.log_path}
        flags += [f"--parallelism={taskmanagers * task_slots}", "--environment_type=EXTERNAL",
                  f"--environment_config={pool.environment_config}"]
    state = {"master": cluster.master, "taskmanagers": taskmanagers, "task_slots": task_slots,
             "pids": cluster.pids(), "worker_pool": pool_state, "flags": flags}
    Path(workdir, STATE_FILE).write_text(strict_json.dumps(state, indent=2) + "\n")
    return state


def stop_cluster(workdir: str) -> None:
    """``python -m dataflow.flink stop``: stops what :func:`start_cluster` started there
    (the cluster by its pid files, the worker pool by its recorded pid, if it still is one).

    Args:
        workdir: the ``workdir`` it was started with.
    """
    FlinkCluster(workdir=workdir, rest_port=0).stop()
    state_file = Path(workdir, STATE_FILE)
    if state_file.exists():
        pool = json.loads(state_file.read_text()).get("worker_pool")
        if pool and WorkerPool.MODULE in process_cmdline(pool["pid"]):  # not a reused pid
            stop_process_group(pool["pid"])
        state_file.unlink()


def process_cmdline(pid: int) -> str:
    """A process's command line, its arguments joined by spaces ("" if it is gone): to tell
    a recorded pid from a reused one before signalling it.

    >>> "python" in process_cmdline(os.getpid())
    True
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    """``python -m dataflow.flink``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = cli.argument_parser(prog="python -m dataflow.flink", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="start a standalone cluster in the background",
                           formatter_class=cli.HelpFormatter)
    start.add_argument("--workdir", default=str(REPO_ROOT / ".cache" / "flink-cluster"),
                       help="the cluster's configuration, logs and pid files")
    start.add_argument("--rest_port", type=int, default=8081,
                       help="port of the REST API and web UI (the job master: HOST:PORT)")
    start.add_argument("--taskmanagers", type=int, default=1,
                       help="TaskManager JVMs (several: one Python process each, see "
                            "docs/flink.md)")
    start.add_argument("--task_slots", "--slots", type=int, default=None,
                       help="slots of each TaskManager (default: 2 with one TaskManager, "
                            "1 with several)")
    start.add_argument("--worker_pool", action=argparse.BooleanOptionalAction, default=None,
                       help="also start a Python worker pool for --environment_type=EXTERNAL "
                            "(default: with more than one TaskManager)")
    stop = sub.add_parser("stop", help="stop the cluster (and worker pool) started by `start`",
                          formatter_class=cli.HelpFormatter)
    stop.add_argument("--workdir", default=str(REPO_ROOT / ".cache" / "flink-cluster"),
                      help="the --workdir it was started with")
    paths = sub.add_parser("paths", help="print where the job server jar and Flink are",
                           formatter_class=cli.HelpFormatter)
    for p in (start, stop, paths):
        cli.add_verbose(p, subcommand=True)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "paths":
            print(strict_json.dumps({"job_server_jar": job_server_jar(),
                                     "flink_home": flink_home()}))
        elif args.cmd == "start":
            state = start_cluster(args.workdir, args.rest_port, args.taskmanagers,
                                  args.task_slots, args.worker_pool)
            pool = state["worker_pool"]
            print(f"Flink {FLINK_VERSION} cluster up: {state['taskmanagers']} TaskManager(s) x "
                  f"{state['task_slots']} slot(s), web UI http://{state['master']}"
                  + (f", Python worker pool on localhost:{pool['port']} (log {pool['log']})"
                     if pool else "") + ". A job's flags:")
            print(" ".join(state["flags"]))
        elif args.cmd == "stop":
            stop_cluster(args.workdir)
            print("Flink cluster stopped")
    except FlinkSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
