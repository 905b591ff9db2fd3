"""Python in several processes on Flink (issue #19): the worker pool of an EXTERNAL
environment, a cluster of several TaskManagers that places subtask i in TaskManager i's one
SDK process, and the option defaults that choose LOOPBACK or EXTERNAL by parallelism."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import apache_beam as beam
import grpc
import pytest
from apache_beam.options.pipeline_options import PortableOptions
from apache_beam.portability.api import (beam_fn_api_pb2, beam_fn_api_pb2_grpc,
                                         endpoints_pb2)

from dataflow import flink
from dataflow.options import pipeline_options, python_in_several_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JAR = "--flink_job_server_jar=job-server.jar"  # not started: no Flink for the option tests


def running(pid: int) -> bool:
    """Whether a pid is a live (not zombie) process, read from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_worker_pool_stop_leaves_no_sdk_worker_behind():
    # A control endpoint that accepts and never answers: the workers the pool forks for it
    # stay up, waiting, as they would mid-job.
    with socket.socket() as silent:
        silent.bind(("localhost", 0))
        silent.listen()
        with flink.WorkerPool() as pool:
            with grpc.insecure_channel(pool.environment_config) as channel:
                stub = beam_fn_api_pb2_grpc.BeamFnExternalWorkerPoolStub(channel)
                for i in range(2):
                    answer = stub.StartWorker(beam_fn_api_pb2.StartWorkerRequest(
                        worker_id=f"w{i}", control_endpoint=endpoints_pb2.ApiServiceDescriptor(
                            url=f"localhost:{silent.getsockname()[1]}")))
                    assert answer.error == ""
            processes = pool.processes()
            assert len(processes) == 3 and pool.pid in processes, processes
            workers = [p for p in processes if p != pool.pid]
            for pid in workers:  # `python` from PATH: this interpreter's venv
                with open(f"/proc/{pid}/environ", "rb") as f:
                    path = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
                assert path[b"PATH"].split(b":")[0] == os.path.dirname(sys.executable).encode()
        assert [p for p in processes if running(p)] == [] and pool.processes() == []
        assert not pool.alive()


def test_parallelism_above_one_on_flink_runs_python_in_a_worker_pool():
    opts = pipeline_options(["--runner=FlinkRunner", "--parallelism=2", JAR])
    portable = opts.view_as(PortableOptions)
    assert portable.environment_type == "EXTERNAL"
    assert portable.environment_config == flink.shared_worker_pool().environment_config
    assert flink.shared_worker_pool().alive()
    assert portable.sdk_worker_parallelism == "2"  # embedded MiniCluster: one SDK per subtask
    assert python_in_several_processes(opts)
    # once per process: a second job gets the same pool
    again = pipeline_options(["--runner=FlinkRunner", "--parallelism=2", JAR])
    assert again.view_as(PortableOptions).environment_config == portable.environment_config
    # a cluster: each TaskManager has its own SDK process, one per TaskManager
    on_cluster = pipeline_options(["--runner=FlinkRunner", "--parallelism=2", JAR,
                                   "--flink_master=localhost:8081"]).view_as(PortableOptions)
    assert on_cluster.environment_type == "EXTERNAL" and on_cluster.sdk_worker_parallelism == 1
    # given flags win
    given = pipeline_options(["--runner=FlinkRunner", "--parallelism=2", JAR,
                              "--environment_type=LOOPBACK"])
    assert given.view_as(PortableOptions).environment_type == "LOOPBACK"
    assert not python_in_several_processes(given)


@pytest.mark.parametrize("flags", [["--parallelism=1"], []])
def test_parallelism_one_on_flink_keeps_loopback(flags):
    opts = pipeline_options(["--runner=FlinkRunner", JAR, *flags])
    assert opts.view_as(PortableOptions).environment_type == "LOOPBACK"
    assert opts.view_as(PortableOptions).environment_config is None
    assert not python_in_several_processes(opts)


def test_train_refuses_a_memory_store_when_python_runs_in_several_processes():
    from dataflow import train
    with pytest.raises(SystemExit, match="memory://train lives in one process"):
        train.main(["online", "--input=x", "--config=synthetic", "--runner=FlinkRunner",
                    JAR, "--parallelism=2"])


def write_pid(kv, folder):
    """Leaves a file per key naming the process that handled it and its parent."""
    key, _ = kv
    open(os.path.join(folder, f"{key}-{os.getpid()}-{os.getppid()}"), "w").close()
    return key


def processes_per_key(options, folder) -> dict:
    """Runs 16 keys through a GroupByKey and ``write_pid``; returns {key: (pid, ppid)}."""
    with beam.Pipeline(options=options) as p:
        _ = (p | beam.Create([(f"k{i}", i) for i in range(16)]) | beam.GroupByKey()
             | beam.Map(write_pid, str(folder)))
    found = {key: (int(pid), int(ppid))
             for key, pid, ppid in (name.split("-") for name in os.listdir(folder))}
    assert len(found) == 16, found
    return found


@pytest.mark.flink
@pytest.mark.slow
def test_embedded_flink_at_parallelism_two_runs_python_in_the_pool(tmp_path,
                                                                   flink_job_server_jar):
    options = pipeline_options(["--runner=FlinkRunner", "--flink_master=[local]",
                                "--parallelism=2"])
    pool = flink.shared_worker_pool()
    processes = set(processes_per_key(options, tmp_path).values())
    # which subtask gets which of the 2 SDK processes is not fixed on the MiniCluster
    assert processes and {ppid for _, ppid in processes} == {pool.pid}, processes


@pytest.mark.flink
@pytest.mark.slow
def test_two_taskmanagers_run_a_stage_in_two_python_processes(tmp_path, flink_job_server_jar):
    """``python -m dataflow.flink start --taskmanagers 2``: a cluster of two TaskManagers of
    one slot and a worker pool; a job with the flags it prints runs subtask i in TaskManager
    i's one SDK process; ``stop`` leaves none of the JVMs, the pool or its workers."""
    # a pool started apart imports what its PYTHONPATH has: here write_pid's module too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    workdir = tmp_path / "cluster"
    started = subprocess.run(
        [sys.executable, "-m", "dataflow.flink", "start", "--taskmanagers=2",
         f"--workdir={workdir}", f"--rest_port={flink.free_port()}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    state = json.loads((workdir / flink.STATE_FILE).read_text()) \
        if (workdir / flink.STATE_FILE).exists() else {"pids": [], "worker_pool": None}
    try:
        assert started.returncode == 0, started.stderr
        flags = started.stdout.strip().splitlines()[-1]
        pool = state["worker_pool"]
        assert flags == " ".join(state["flags"]) == (
            f"--runner=FlinkRunner --flink_master={state['master']} --parallelism=2 "
            f"--environment_type=EXTERNAL --environment_config=localhost:{pool['port']}")
        assert len(state["pids"]) == 3 and running(pool["pid"])  # JobManager, 2 TaskManagers
        with urllib.request.urlopen(f"http://{state['master']}/overview", timeout=10) as r:
            assert json.load(r)["slots-total"] == 2
        (tmp_path / "out").mkdir()
        processes = set(processes_per_key(pipeline_options(flags.split()),
                                          tmp_path / "out").values())
        # TaskManager i's one SDK worker, forked by the pool, ran subtask i
        assert len(processes) == 2 and {ppid for _, ppid in processes} == {pool["pid"]}, \
            processes
    finally:
        stopped = subprocess.run([sys.executable, "-m", "dataflow.flink", "stop",
                                  f"--workdir={workdir}"], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=180)
    assert stopped.returncode == 0, stopped.stderr
    ours = [*state["pids"], *([state["worker_pool"]["pid"]] if state["worker_pool"] else [])]
    deadline = time.monotonic() + 30
    while any(map(running, ours)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(map(running, ours))
    assert flink.process_group(state["worker_pool"]["pid"]) == []
    assert not (workdir / flink.STATE_FILE).exists()
