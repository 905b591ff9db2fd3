"""Shared fixtures: an example log, the Flink job server jar, a standalone Flink cluster, Redis,
a Kafka broker; and the markers that let a developer run the fast tests alone (``pytest.ini``).

Flink tests never skip: without Java, the jar or the Flink distribution they fail with a
message that says what to install (``make setup`` does all of it).

Markers: a test that runs Flink is marked ``flink``, one that needs a redis-server ``redis``,
one that needs a Kafka broker ``kafka``, one that takes more than :data:`SLOW_S` seconds
``slow``; ``pytest -m "not flink and not slow"`` runs the rest. Forgetting a marker is
caught three ways:

* collection stops (:func:`pytest_collection_modifyitems`) when a test uses a fixture of
  :data:`FIXTURE_MARKERS` (itself or through another fixture) without the fixture's marker;
* a test that, unmarked, starts Flink (``dataflow.flink.job_server_jar``, the job server jar
  that every Flink run of ours asks for, or ``FlinkCluster.start``), a Kafka broker
  (``KafkaBroker.start``) or connects to Redis
  (redis-py, however it got the address: ``request.getfixturevalue``, a server of its own)
  fails, naming the marker (:func:`refuse_flink_and_redis_without_their_marker`);
* the run's summary lists every unmarked test that took more than :data:`SLOW_S` seconds.
"""
from __future__ import annotations

import pytest

from dataflow import flink, kafka

#: A fixture whose use needs the test marked so (tests/conftest.py's and test modules' own).
FIXTURE_MARKERS = {"flink_job_server_jar": "flink", "flink_cluster": "flink",
                   "redis_server": "redis", "own_redis": "redis", "kafka_broker": "kafka"}
#: Seconds a test's call may take before it belongs to the ``slow`` ones.
SLOW_S = 10.0


def _marked(item, name: str) -> bool:
    return item.get_closest_marker(name) is not None


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects anything
def pytest_collection_modifyitems(config, items):
    missing = sorted({f"{item.nodeid}: uses {fixture}, mark it @pytest.mark.{marker}"
                      for item in items
                      for fixture, marker in FIXTURE_MARKERS.items()
                      if fixture in getattr(item, "fixturenames", ())
                      and not _marked(item, marker)})
    if missing:
        raise pytest.UsageError("tests without the marker their fixtures need:\n  "
                                + "\n  ".join(missing))


@pytest.fixture(autouse=True)
def refuse_flink_and_redis_without_their_marker(request, monkeypatch):
    """Unless the test is marked ``flink`` (``redis``), starting Flink (connecting to Redis)
    raises, and the test fails at teardown even if the code under test caught that."""
    used = []

    def refuse(marker: str, what: str):
        def refused(*args, **kwargs):
            used.append(f"{what} without @pytest.mark.{marker}: mark the test (pytest.ini)")
            raise RuntimeError(used[-1])
        return refused

    if not _marked(request.node, "flink"):
        monkeypatch.setattr(flink, "job_server_jar", refuse("flink", "needs Flink (the job server jar)"))
        monkeypatch.setattr(flink.FlinkCluster, "start", refuse("flink", "starts a Flink cluster"))
    if not _marked(request.node, "kafka"):
        monkeypatch.setattr(kafka.KafkaBroker, "start", refuse("kafka", "starts a Kafka broker"))
    if not _marked(request.node, "redis"):
        import redis.connection
        monkeypatch.setattr(redis.connection.AbstractConnection, "connect",
                            refuse("redis", "connects to Redis"))
    yield
    if used:
        pytest.fail(f"{request.node.nodeid} {used[0]}", pytrace=False)


_UNMARKED_SLOW: list = []


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > SLOW_S and "slow" not in report.keywords:
        _UNMARKED_SLOW.append(f"{report.duration:.0f} s {report.nodeid}")


def pytest_terminal_summary(terminalreporter):
    if _UNMARKED_SLOW:
        terminalreporter.write_sep("=", f"over {SLOW_S:.0f} s without @pytest.mark.slow")
        for line in _UNMARKED_SLOW:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def example_log(tmp_path_factory):
    """A small, dense synthetic stream joined into an example log (hourly files, config
    ``synthetic``): ``{"dir", "files", "summary", "examples"}``."""
    import glob

    from dataflow import data, join
    from transforms.example_log import read_examples_in_order
    work = tmp_path_factory.mktemp("train-data")
    summary = data.synth(str(work / "logs"), requests=24_000, users=300, items=400, days=1.0,
                         seed=3)
    join.main([f"--features={work}/logs/feature_log/*.avro",
               f"--actions={work}/logs/action_log/*.avro", f"--out={work}/joined",
               "--config=synthetic"])
    files = sorted(glob.glob(f"{work}/joined/examples/*.avro"))
    assert len(files) >= 20, files
    return {"dir": str(work), "files": files, "summary": summary,
            "examples": sum(1 for _ in read_examples_in_order(f"{work}/joined/examples"))}


@pytest.fixture(scope="session")
def flink_job_server_jar() -> str:
    try:
        return flink.job_server_jar()
    except flink.FlinkSetupError as e:
        pytest.fail(str(e), pytrace=False)


def standalone_cluster(workdir, **kwargs):
    """A started ``FlinkCluster`` (kwargs as its own), stopped afterwards even when a test
    fails; fails the test with what to install when Flink is missing. Use with yield from."""
    try:
        cluster = flink.FlinkCluster(workdir=str(workdir), **kwargs)
        cluster.start()
    except flink.FlinkSetupError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def flink_cluster(tmp_path_factory, flink_job_server_jar):
    """A standalone cluster from .venv-flink (two slots)."""
    yield from standalone_cluster(tmp_path_factory.mktemp("flink-cluster"), task_slots=2)


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """A Kafka broker (KRaft, one node, ``dataflow.kafka.KafkaBroker``) on free ports of
    127.0.0.1, stopped at session end however the tests end. Tests share it: each uses
    topics of its own. Never skips: without Java or the jars the test fails with what to
    run (``make kafka-dist``)."""
    try:
        broker = kafka.KafkaBroker(workdir=str(tmp_path_factory.mktemp("kafka-broker")))
        broker.start()
    except kafka.KafkaSetupError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private ``redis-server`` on a free port (no persistence), stopped at session end.

    Yields its base URL ``redis://127.0.0.1:<port>``; append ``/<db>`` to pick a database.
    Never skips: without the binary the test fails with what to install.
    """
    import os
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which("redis-server") or ("/usr/bin/redis-server"
                                              if os.path.exists("/usr/bin/redis-server") else None)
    if binary is None:
        pytest.fail("redis-server is missing: apt-get install redis-server", pytrace=False)
    workdir = tmp_path_factory.mktemp("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(workdir / "redis.log", "wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no", "--databases", "16"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.fail(f"redis-server exited with {proc.returncode}; see {workdir}/redis.log",
                            pytrace=False)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer on port {port}; see {workdir}/redis.log",
                            pytrace=False)
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
