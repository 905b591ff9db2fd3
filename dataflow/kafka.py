"""Apache Kafka on this machine: a broker in KRaft mode (broker and controller in one JVM, no
ZooKeeper, no Docker), for the tests and for local runs.

The broker's jars come from Maven Central: ``make kafka-dist`` (part of ``make setup`` and
``make test``) copies ``org.apache.kafka:kafka_2.13`` and its runtime dependencies
(``kafka/pom.xml``) into ``.cache/kafka/<KAFKA_VERSION>/libs/``; ``BEAM_MONOLITH_KAFKA_LIBS``
overrides that folder. :class:`KafkaBroker` formats a storage folder and runs
``java -cp 'libs/*' kafka.Kafka server.properties`` on free ports of 127.0.0.1, tuned for
tests (one replica, small heap, no rebalance delay). docs/kafka.md has the details.

Command line::

    python -m dataflow.kafka start                  # prints the bootstrap address
    python -m dataflow.kafka topics create feature_log --partitions 4
    python -m dataflow.kafka topics list
    python -m dataflow.kafka stop
"""
from __future__ import annotations

if __name__ == "__main__":  # before Beam and TensorFlow load: they log as they are imported
    from dataflow.cli import setup
    setup()

import base64
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from dataflow import cli
from dataflow.closed_loop.processes import free_port
from dataflow.flink import process_cmdline, process_group, stop_process_group
from schemas import strict_json

__all__ = ["KafkaBroker", "KafkaSetupError", "kafka_libs", "KAFKA_VERSION", "start_broker",
           "stop_broker", "broker_state"]

_LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Keep in step with kafka/pom.xml and the Makefile (tests/test_kafka.py checks the Makefile).
KAFKA_VERSION = "4.1.1"
STATE_FILE = "beam-monolith-kafka.json"
DEFAULT_WORKDIR = str(REPO_ROOT / ".cache" / "kafka-broker")
# Kafka's class that runs a broker, and (when its argument is our server.properties) ours.
_MAIN_CLASS = "kafka.Kafka"


class KafkaSetupError(RuntimeError):
    """Something the broker needs is not installed, or it did not start; the message says
    what to run or shows its log.

    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"BEAM_MONOLITH_KAFKA_LIBS": tempfile.mkdtemp()}):
    ...     kafka_libs()
    Traceback (most recent call last):
    ...
    dataflow.kafka.KafkaSetupError: No Kafka broker jars (kafka_2.13-*.jar) in ...
    """


def kafka_libs() -> str:
    """The folder of the broker's jars.

    Returns:
        ``BEAM_MONOLITH_KAFKA_LIBS``, else ``.cache/kafka/<KAFKA_VERSION>/libs`` (``make``).

    Raises:
        KafkaSetupError: the jars, or Java, are missing; the message says how to get them.
    """
    libs = os.environ.get("BEAM_MONOLITH_KAFKA_LIBS") or str(
        REPO_ROOT / ".cache" / "kafka" / KAFKA_VERSION / "libs")
    if not glob.glob(os.path.join(libs, "kafka_2.13-*.jar")):
        raise KafkaSetupError(
            f"No Kafka broker jars (kafka_2.13-*.jar) in {libs}. Run `make kafka-dist` (needs "
            "Java 17 and Maven: apt-get install openjdk-17-jdk-headless maven) or set "
            "BEAM_MONOLITH_KAFKA_LIBS.")
    if shutil.which("java") is None:
        raise KafkaSetupError("`java` is not on PATH: install a JDK 17 "
                              "(apt-get install openjdk-17-jre-headless).")
    return libs


def cluster_id() -> str:
    """A new KRaft cluster id: 16 random bytes in URL-safe base64 without padding, as
    ``kafka-storage random-uuid`` prints them (without starting a JVM for it).

    >>> len(cluster_id()), cluster_id() != cluster_id()
    (22, True)
    """
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka's Uuid.randomUuid() rejects these too
            return text


class KafkaBroker:
    """One Kafka broker that is its own KRaft controller, on 127.0.0.1.

    Its ``server.properties``, data (``data/``) and log (``broker.log``) are in ``workdir``;
    the storage is formatted on the first start and kept, so a broker started again on the
    same folder has the topics and records it had. Use it as a context manager (it is
    stopped however the block ends) or call :meth:`start` and :meth:`stop`.

    Args:
        workdir: its folder (default: a new temporary one).
        port: the client listener's port (default: a free one).
        controller_port: the KRaft controller's port (default: a free one).
        partitions: partitions of a topic created without a count (``num.partitions``).
        heap_mb: the JVM's maximum heap.
        auto_create_topics: let producing to an unknown topic create it (off: a misspelt
            topic fails instead of appearing).
        extra_conf: more ``server.properties`` settings, ``{key: value}``.

    Raises:
        KafkaSetupError: the jars or Java are missing.

    It needs the broker's jars (``make kafka-dist``) and a few seconds to start, so this
    example is shown, not run (``tests/conftest.py``'s ``kafka_broker`` starts one):

    >>> with KafkaBroker() as broker:                      # doctest: +SKIP
    ...     broker.create_topic("examples", partitions=4)
    ...     producer = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap})
    """

    def __init__(self, workdir: str | None = None, port: int | None = None,
                 controller_port: int | None = None, partitions: int = 1, heap_mb: int = 512,
                 auto_create_topics: bool = False, extra_conf: dict | None = None):
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {partitions}")
        self.libs = kafka_libs()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kafka-broker-"))
        self.port = port or free_port()
        self.controller_port = controller_port or free_port()
        self.partitions = partitions
        self.heap_mb = heap_mb
        self.auto_create_topics = auto_create_topics
        self.extra_conf = dict(extra_conf or {})
        self.pid: int | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        """The value for ``bootstrap.servers``: ``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"

    @property
    def properties_path(self) -> Path:
        return self.workdir / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.workdir / "broker.log"

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    def settings(self) -> dict:
        """The broker's ``server.properties``, ``{key: value}``."""
        settings = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},"
                         f"CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": self.partitions,
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            # one broker: every internal topic has one replica
            "offsets.topic.replication.factor": 1,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            # a consumer group's first member starts at once (default: 3 s of waiting)
            "group.initial.rebalance.delay.ms": 0,
            # the internal topics' 50 partitions each cost start-up time of the first
            # consumer group or transaction, and are of no use on one test broker
            "offsets.topic.num.partitions": 4,
            "transaction.state.log.num.partitions": 4,
            "log.segment.bytes": 16 * 1024 * 1024,
            # Our messages are stamped with their records' event times, which are in the
            # past for replayed or simulated logs (2024): time-based retention (7 days by
            # default, checked every 5 minutes) deleted a running join's input under it.
            "log.retention.ms": -1,
        }
        settings.update(self.extra_conf)
        return settings

    def _write_properties(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = ["# beam-monolith test broker (dataflow/kafka.py)"]
        lines += [f"{key}={value}" for key, value in self.settings().items()]
        self.properties_path.write_text("\n".join(lines) + "\n")

    def _java(self, main_class: str, *args: str) -> list[str]:
        return ["java", f"-Xmx{self.heap_mb}m", "-Xms64m", "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
                "-Dorg.slf4j.simpleLogger.showDateTime=true",
                "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS",
                "-cp", os.path.join(self.libs, "*"), main_class, *args]

    def _format_storage(self) -> None:
        """``kafka-storage format``, once: a formatted folder has ``meta.properties``."""
        if (self.data_dir / "meta.properties").exists():
            return
        done = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "--cluster-id", cluster_id(),
                       "--config", str(self.properties_path)),
            capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise KafkaSetupError(f"formatting the broker's storage {self.data_dir} failed "
                                  f"({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")

    def start(self, timeout_s: float = 60.0) -> "KafkaBroker":
        """Formats the storage if new, starts the broker and waits until it answers.

        Args:
            timeout_s: how long to wait.

        Returns:
            self.

        Raises:
            KafkaSetupError: it exited or did not answer in time (its log is in the message).
        """
        self._write_properties()
        self._format_storage()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self._java(_MAIN_CLASS, str(self.properties_path)), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self._proc.pid
        _LOG.info("Kafka broker %s (pid %d) starting in %s", self.bootstrap, self.pid,
                  self.workdir)
        try:
            wait_until_answers(self.bootstrap, timeout_s, alive=lambda: self._proc.poll() is None)
        except (TimeoutError, RuntimeError) as e:
            self.stop()
            raise KafkaSetupError(f"{e}; its log {self.log_path}:\n{self.log_tail()}") from None
        return self

    def admin(self):
        """A ``confluent_kafka.admin.AdminClient`` of this broker."""
        return admin_client(self.bootstrap)

    def create_topic(self, name: str, partitions: int | None = None,
                     config: dict | None = None, exist_ok: bool = False) -> None:
        """Creates a topic and waits until every partition has its leader.

        Args:
            name: the topic.
            partitions: how many (default: the broker's ``partitions``).
            config: topic settings (``{"retention.ms": "-1"}``, ...).
            exist_ok: a topic of that name already there is no error.

        Raises:
            confluent_kafka.KafkaException: it could not be created (it exists, ...).
        """
        create_topic(self.bootstrap, name, partitions or self.partitions, config, exist_ok)

    def topics(self) -> dict:
        """``{topic: partitions}`` of the topics on the broker (internal ones left out)."""
        return list_topics(self.bootstrap)

    def alive(self) -> bool:
        """Whether the broker's JVM runs."""
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stops the broker: SIGTERM (a clean shutdown) to its process group, SIGKILL to what
        is left after ``timeout_s``. Stopping a stopped broker does nothing."""
        if self.pid is None:
            return
        stop_process_group(self.pid, timeout_s)
        if self._proc is not None:
            self._proc.wait()  # reap it: no zombie of ours
        self.pid = None

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the broker's log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> "KafkaBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def admin_client(bootstrap: str):
    """A ``confluent_kafka.admin.AdminClient`` for ``bootstrap`` (``HOST:PORT[,...]``)."""
    from confluent_kafka.admin import AdminClient
    return AdminClient({"bootstrap.servers": bootstrap})


def wait_until_answers(bootstrap: str, timeout_s: float = 60.0, alive=lambda: True) -> None:
    """Waits until a broker accepts connections and its metadata lists a broker.

    Args:
        bootstrap: ``HOST:PORT`` of the broker.
        timeout_s: how long to wait.
        alive: says whether the broker's process still runs (waiting stops if not).

    Raises:
        RuntimeError: the process ended first.
        TimeoutError: it did not answer in time.
    """
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    deadline = time.monotonic() + timeout_s
    # the port first: librdkafka logs every refused connection to stderr
    while True:
        if not alive():
            raise RuntimeError(f"the Kafka broker {bootstrap} exited while starting")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Kafka broker {bootstrap} did not listen within "
                                   f"{timeout_s:.0f}s") from None
            time.sleep(0.05)
    admin = admin_client(bootstrap)
    while True:
        if not alive():
            raise RuntimeError(f"the Kafka broker {bootstrap} exited while starting")
        try:
            if admin.list_topics(timeout=1.0).brokers:
                return
        except Exception:  # KafkaException while it starts: ask again
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Kafka broker {bootstrap} did not answer within "
                               f"{timeout_s:.0f}s")
        time.sleep(0.05)


def create_topic(bootstrap: str, name: str, partitions: int, config: dict | None = None,
                 exist_ok: bool = False, timeout_s: float = 30.0) -> None:
    """Creates a topic of one replica and waits until every partition has its leader (a
    producer right after it finds them all).

    Args:
        bootstrap: the broker.
        name: the topic.
        partitions: how many.
        config: topic settings.
        exist_ok: a topic of that name already there is no error.
        timeout_s: how long to wait.

    Raises:
        confluent_kafka.KafkaException: it could not be created.
        TimeoutError: its partitions did not get leaders in time.
    """
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import NewTopic
    admin = admin_client(bootstrap)
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions,
                                            replication_factor=1, config=config or {})],
                                  operation_timeout=timeout_s)
    try:
        futures[name].result(timeout=timeout_s)
    except KafkaException as e:
        if not (exist_ok and e.args[0].code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise
    deadline = time.monotonic() + timeout_s
    while True:
        topic = admin.list_topics(name, timeout=timeout_s).topics.get(name)
        if topic is not None and topic.error is None and topic.partitions and all(
                p.leader >= 0 for p in topic.partitions.values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name}'s partitions have no leader after "
                               f"{timeout_s:.0f}s")
        time.sleep(0.05)


def list_topics(bootstrap: str, timeout_s: float = 10.0) -> dict:
    """``{topic: partitions}`` of a broker's topics, internal ones (``__...``) left out."""
    metadata = admin_client(bootstrap).list_topics(timeout=timeout_s)
    return {name: len(t.partitions) for name, t in sorted(metadata.topics.items())
            if not name.startswith("__")}


def start_broker(workdir: str, port: int | None = None, partitions: int = 1,
                 heap_mb: int = 512, auto_create_topics: bool = False) -> dict:
    """``python -m dataflow.kafka start``: a :class:`KafkaBroker` left running; what was
    started is written to ``WORKDIR/beam-monolith-kafka.json`` for :func:`stop_broker`.

    Args:
        workdir: the broker's folder (its data is kept there across starts).
        port: the client port (None: a free one).
        partitions: partitions of a topic created without a count.
        heap_mb: the JVM's maximum heap.
        auto_create_topics: as :class:`KafkaBroker`'s.

    Returns:
        The state: ``bootstrap``, ``pid``, ``workdir``, ``log``, ``kafka_version``.

    Raises:
        KafkaSetupError: a broker started there still runs, or it did not start.
    """
    running = broker_state(workdir)
    if running is not None:
        raise KafkaSetupError(f"a Kafka broker started in {workdir} still runs "
                              f"({running['bootstrap']}, pid {running['pid']}): "
                              "`python -m dataflow.kafka stop` first")
    broker = KafkaBroker(workdir, port, partitions=partitions, heap_mb=heap_mb,
                         auto_create_topics=auto_create_topics).start()
    state = {"bootstrap": broker.bootstrap, "pid": broker.pid, "workdir": str(broker.workdir),
             "log": str(broker.log_path), "kafka_version": KAFKA_VERSION}
    Path(workdir, STATE_FILE).write_text(strict_json.dumps(state, indent=2) + "\n")
    return state


def broker_state(workdir: str) -> dict | None:
    """What :func:`start_broker` started in ``workdir``, if it still runs.

    Args:
        workdir: the broker's folder.

    Returns:
        Its state (:func:`start_broker`), or None if none was started there or its process
        is gone (a pid reused by another process does not count).
    """
    state_file = Path(workdir, STATE_FILE)
    if not state_file.exists():
        return None
    state = json.loads(state_file.read_text())
    command = process_cmdline(state["pid"])
    ours = _MAIN_CLASS in command.split() and str(Path(workdir, "server.properties")) in command
    return state if ours and process_group(state["pid"]) else None


def stop_broker(workdir: str) -> bool:
    """``python -m dataflow.kafka stop``: stops what :func:`start_broker` started there.

    Args:
        workdir: the ``workdir`` it was started with.

    Returns:
        Whether a running broker was stopped.
    """
    state = broker_state(workdir)
    if state is not None:
        stop_process_group(state["pid"], timeout_s=20.0)
    Path(workdir, STATE_FILE).unlink(missing_ok=True)
    return state is not None


def _bootstrap_of(args) -> str:
    if getattr(args, "bootstrap", None):
        return args.bootstrap
    state = broker_state(args.workdir)
    if state is None:
        raise KafkaSetupError(f"no running broker started in {args.workdir}: "
                              "`python -m dataflow.kafka start` or give --bootstrap")
    return state["bootstrap"]


def main(argv: list[str] | None = None) -> int:
    """``python -m dataflow.kafka``.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The exit status.
    """
    parser = cli.argument_parser(prog="python -m dataflow.kafka", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def command(name: str, help: str):
        p = sub.add_parser(name, help=help, formatter_class=cli.HelpFormatter)
        p.add_argument("--workdir", default=DEFAULT_WORKDIR,
                       help="the broker's folder: configuration, data, log and state file")
        cli.add_verbose(p, subcommand=True)
        return p

    start = command("start", "start a broker in the background; prints its bootstrap address")
    start.add_argument("--port", type=int, default=None,
                       help="the client port on 127.0.0.1 (default: a free one)")
    start.add_argument("--partitions", type=int, default=1,
                       help="partitions of a topic created without a count")
    start.add_argument("--heap_mb", type=int, default=512, help="the JVM's maximum heap")
    start.add_argument("--auto_create_topics", action="store_true",
                       help="producing to an unknown topic creates it")
    command("stop", "stop the broker started by `start`")
    command("address", "print the bootstrap address of the broker started by `start`")
    topics = command("topics", "create or list topics")
    topics.add_argument("action", choices=["create", "list"])
    topics.add_argument("name", nargs="?", help="the topic (create)")
    topics.add_argument("--partitions", type=int, default=None,
                        help="its partitions (default: the broker's --partitions)")
    topics.add_argument("--bootstrap", default=None,
                        help="the broker's HOST:PORT (default: the one started in --workdir)")
    topics.add_argument("--exist_ok", action="store_true",
                        help="a topic of that name already there is no error")
    args = parser.parse_args(argv)
    from confluent_kafka import KafkaException
    try:
        if args.cmd == "start":
            t0 = time.monotonic()
            state = start_broker(args.workdir, args.port, args.partitions, args.heap_mb,
                                 args.auto_create_topics)
            _LOG.info("Kafka %s broker up in %.1f s (pid %d, log %s)", KAFKA_VERSION,
                      time.monotonic() - t0, state["pid"], state["log"])
            print(state["bootstrap"])
        elif args.cmd == "stop":
            print("Kafka broker stopped" if stop_broker(args.workdir)
                  else f"no Kafka broker was running in {args.workdir}")
        elif args.cmd == "address":
            print(_bootstrap_of(args))
        elif args.cmd == "topics":
            bootstrap = _bootstrap_of(args)
            if args.action == "create":
                if not args.name:
                    parser.error("topics create needs a NAME")
                create_topic(bootstrap, args.name, args.partitions or _default_partitions(
                    args.workdir), exist_ok=args.exist_ok)
                print(f"topic {args.name} created on {bootstrap}")
            else:
                for name, partitions in list_topics(bootstrap).items():
                    print(f"{name}\t{partitions}")
    except KafkaSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KafkaException as e:  # the broker's answer (a topic that exists, ...)
        print(f"error: {e.args[0].str() if e.args else e}", file=sys.stderr)
        return 1
    return 0


def _default_partitions(workdir: str) -> int:
    """``num.partitions`` of the broker's ``server.properties`` in ``workdir`` (else 1)."""
    path = Path(workdir, "server.properties")
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "num.partitions" and value.strip().isdigit():
                return int(value)
    return 1


if __name__ == "__main__":
    sys.exit(main())
