"""Serving's feature log: records appended as requests are served, written as Avro files, one
per period of event time, and a watermark file saying up to when the folder is complete; or,
given a ``kafka://HOST:PORT/TOPIC`` instead of a folder, as the messages of a Kafka topic
with watermark marks (``dataflow.serving.kafka_log.KafkaAvroLog``, the same interface).

:class:`RollingAvroLog` writes them with a thread of this process (the simulator writes its
action log so, too: :func:`open_log`), :class:`ProcessAvroLog` with a child process (what the
service uses: :func:`open_feature_log`); :func:`read_watermark` reads the watermark back and
:func:`log_files` lists the files.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

from schemas import strict_json

__all__ = ["RollingAvroLog", "ProcessAvroLog", "open_log", "open_feature_log", "read_watermark",
           "log_files", "is_kafka"]

_LOG = logging.getLogger(__name__)


class RollingAvroLog:
    """Records → ``folder/part-YYYYmmdd-HHMMSS.avro``, one file per ``roll_s`` of event time.

    ``append`` buffers records of the open period; a record of a later period closes it: its
    file is written by a background thread under a temporary name and renamed (a reader of
    the folder never sees half a file; ``transforms.tail.TailAvroLogs`` can tail it).
    ``_watermark.json`` (``{"ts_ms": T}``) then says that every record before ``T`` is in a
    file. Records must come in event-time order (a late one goes into the open file, and is
    counted in ``late``).

    Args:
        folder: the log's folder (created).
        schema_name: the records' schema in ``schemas/`` (``feature_log``, ``action_log``).
        roll_s: event-time seconds per file.
        codec: the Avro files' codec.

    Raises:
        ValueError: ``roll_s`` is not > 0.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> log = RollingAvroLog(folder, "action_log", roll_s=60)
    >>> log.append([{"request_id": "r1", "ts_ms": 1704067200000, "action": "click"}],
    ...            1704067200000)
    >>> log.close()
    >>> [os.path.basename(path) for _, path in log_files(folder)], read_watermark(folder)
    (['part-20240101-000000.avro'], 1704067260000)
    """

    WATERMARK = "_watermark.json"

    def __init__(self, folder: str, schema_name: str, roll_s: float, codec: str = "deflate"):
        from schemas import load_schema
        if roll_s <= 0:
            raise ValueError(f"roll_s must be > 0, got {roll_s}")
        self.folder = folder
        self.schema = load_schema(schema_name)
        self.roll_ms = int(roll_s * 1000)
        self.codec = codec
        os.makedirs(folder, exist_ok=True)
        self._lock = threading.Lock()
        self._period = None  # start (ms) of the open period
        self._buffer: list = []
        self.records = 0
        self.files = 0
        self.late = 0
        self.errors = 0
        self._queue: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="avro-log-writer",
                                        daemon=True)
        self._writer.start()

    def append(self, records: list, ts_ms: int) -> None:
        """Appends records of event time ``ts_ms`` (all of one request).

        Args:
            records: dicts of the log's schema.
            ts_ms: their event time (ms since the epoch).
        """
        period = ts_ms - ts_ms % self.roll_ms
        with self._lock:
            if self._period is None:
                self._period = period
            elif period > self._period:
                self._roll(period)
            elif period < self._period:
                self.late += len(records)
            self._buffer.extend(records)
            self.records += len(records)

    def advance(self, ts_ms: int) -> None:
        """Tells the log that event time has reached ``ts_ms``: the open period is closed if
        it ended before it.

        Args:
            ts_ms: the event time (ms since the epoch).
        """
        period = ts_ms - ts_ms % self.roll_ms
        with self._lock:
            if self._period is None or period > self._period:
                self._roll(period)

    def _roll(self, new_period: int) -> None:
        if self._period is not None and self._buffer:
            self._queue.put(("file", self._period, self._buffer))
        self._buffer = []
        self._period = new_period
        self._queue.put(("watermark", new_period, None))

    def close(self, until_ms: Optional[int] = None) -> None:
        """Writes the open file and waits until everything is on disk.

        Args:
            until_ms: where the watermark moves to (default: the end of the open period).
        """
        with self._lock:
            end = until_ms
            if end is None:
                end = (self._period + self.roll_ms) if self._period is not None else None
            if end is not None:
                self._roll(max(end, self._period or end))
        self.flush()

    def flush(self) -> None:
        """Waits until the files of every closed period are written."""
        done = threading.Event()
        self._queue.put(("sync", 0, done))
        done.wait()

    def stats(self) -> dict:
        """Returns: ``{"records", "files", "late", "errors"}`` counted so far."""
        return {"records": self.records, "files": self.files, "late": self.late,
                "errors": self.errors}

    def stop(self) -> None:
        """:meth:`close` (the interface of :class:`ProcessAvroLog`)."""
        self.close()

    def _write_loop(self):
        import fastavro
        while True:
            kind, period, payload = self._queue.get()
            try:
                if kind == "sync":
                    payload.set()
                elif kind == "file":
                    name = time.strftime("part-%Y%m%d-%H%M%S", time.gmtime(period / 1000))
                    path = os.path.join(self.folder, f"{name}.avro")
                    tmp = os.path.join(self.folder, f".{name}.avro.tmp")
                    with open(tmp, "wb") as f:
                        fastavro.writer(f, self.schema, payload, codec=self.codec)
                    os.replace(tmp, path)
                    self.files += 1
                else:
                    tmp = os.path.join(self.folder, f".{self.WATERMARK}.tmp")
                    with open(tmp, "w", encoding="utf-8") as f:
                        strict_json.dump({"ts_ms": int(period)}, f)
                    os.replace(tmp, os.path.join(self.folder, self.WATERMARK))
            except Exception:  # noqa: BLE001 - the service goes on; the error is counted
                self.errors += 1
                _LOG.exception("feature log: writing %s of period %s failed", kind, period)


def is_kafka(target: str) -> bool:
    """Whether a log's place is a Kafka topic (``kafka://...``), not a folder."""
    return target.startswith("kafka://")


def open_log(target: str, schema_name: str, roll_s: float):
    """A log written by this process: a :class:`RollingAvroLog` of a folder, or a
    ``KafkaAvroLog`` of a topic.

    Args:
        target: a folder, or ``kafka://HOST:PORT[,...]/TOPIC``.
        schema_name: the records' schema in ``schemas/``.
        roll_s: event-time seconds per file (a topic: of the period ``close()`` marks).

    Returns:
        The writer (``append``, ``advance``, ``close``, ``flush``, ``stats``, ``stop``).
    """
    if is_kafka(target):
        from dataflow.serving.kafka_log import KafkaAvroLog
        return KafkaAvroLog(target, schema_name, roll_s)
    return RollingAvroLog(target, schema_name, roll_s)


class ProcessAvroLog:
    """A :class:`RollingAvroLog` (or, for a ``kafka://`` topic, a ``KafkaAvroLog``) run by a
    child process (same files or messages, same interface).

    Encoding a feature log record with fastavro takes 30-40 us of C code that holds the GIL
    (its map of union-typed values); a file of a few thousand records, encoded by a thread of
    the service, stalled every request for tens to hundreds of milliseconds. Here the
    service only pickles each request's records into a pipe; the child (niced, so that a
    request wins a shared core) encodes and writes them. ``records`` is counted here;
    ``files``, ``late`` and ``errors`` are asked of the child.

    Args:
        folder: the log's folder (created).
        schema_name: the records' schema in ``schemas/``.
        roll_s: event-time seconds per file.
        codec: the Avro files' codec.
        nice: the child's niceness above this process's.

    Raises:
        ValueError: ``roll_s`` is not > 0.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> log = ProcessAvroLog(folder, "action_log", roll_s=60)
    >>> log.append([{"request_id": "r1", "ts_ms": 1704067200000, "action": "click"}],
    ...            1704067200000)      # pickled into the pipe; the child writes the files
    >>> log.stop()                     # writes the open file, ends the child
    >>> log.stats()["files"], read_watermark(folder)
    (1, 1704067260000)
    """

    def __init__(self, folder: str, schema_name: str, roll_s: float, codec: str = "deflate",
                 nice: int = 5):
        if roll_s <= 0:
            raise ValueError(f"roll_s must be > 0, got {roll_s}")
        from multiprocessing.connection import Connection
        self.folder = folder
        if is_kafka(folder):  # a missing topic fails here, with what to run
            from dataflow.serving.kafka_log import topic_partitions
            topic_partitions(folder)
        # A new interpreter, not a fork of one running TensorFlow's threads, nor
        # multiprocessing's spawn (it would import the caller's __main__ again).
        mine, theirs = socket.socketpair()
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from dataflow.serving.feature_log import _log_main; _log_main()",
             str(theirs.fileno()), folder, schema_name, repr(float(roll_s)), codec, str(nice)],
            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(mine.detach())
        self._lock = threading.Lock()
        self.records = 0
        self.lost = 0
        self._final: Optional[dict] = None
        self._ask("stats")  # the child is up and its folder exists

    def append(self, records: list, ts_ms: int) -> None:
        """As :meth:`RollingAvroLog.append` (records lost if the child is gone are counted
        in ``lost``)."""
        self._send(("append", records, ts_ms), len(records))

    def advance(self, ts_ms: int) -> None:
        """As :meth:`RollingAvroLog.advance`."""
        self._send(("advance", ts_ms), 0)

    def _send(self, message, records: int) -> None:
        with self._lock:
            try:
                self._conn.send(message)
            except OSError as e:  # the child is gone: serving goes on, the loss is counted
                if not self.lost:
                    _LOG.error("feature log: its process is gone (%s); records are lost", e)
                self.lost += records
            else:
                self.records += records

    def close(self, until_ms: Optional[int] = None) -> None:
        """As :meth:`RollingAvroLog.close`."""
        self._ask("close", until_ms)

    def flush(self) -> None:
        """As :meth:`RollingAvroLog.flush`."""
        self._ask("flush")

    def stats(self) -> dict:
        """As :meth:`RollingAvroLog.stats` (after :meth:`stop`: the last ones)."""
        if self._final is not None:  # stopped
            return self._final
        return self._ask("stats")

    files = property(lambda self: self.stats()["files"])
    late = property(lambda self: self.stats()["late"])
    errors = property(lambda self: self.stats()["errors"])

    def _ask(self, what: str, arg=None) -> dict:
        with self._lock:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the feature log process ended ({self._proc.returncode})")
            try:
                self._conn.send((what, arg))
                return self._conn.recv()
            except (OSError, EOFError) as e:
                raise RuntimeError(f"the feature log process is gone: {e}") from None

    def stop(self) -> None:
        """Writes the open file and ends the child."""
        if self._final is not None:
            return
        self._final = {"records": self.records, "files": None, "late": None, "errors": None}
        try:
            self._final = self._ask("stop")
        except RuntimeError:
            pass
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._conn.close()


def _log_main() -> None:
    """The child of :class:`ProcessAvroLog` (argv: socket fd, folder, schema, roll_s, codec,
    nice): runs a RollingAvroLog until told to stop or until its parent is gone (end of the
    socket: the open period is not written, as when a service with an in-process log
    dies)."""
    from multiprocessing.connection import Connection
    fd, folder, schema_name, roll_s, codec, nice = sys.argv[1:7]
    # Ctrl-C and a SIGTERM to the service's process group reach this process too: the
    # service, stopping on them, still has the open period to write through it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.nice(int(nice))
    except OSError:
        pass
    conn = Connection(int(fd))
    log = (open_log(folder, schema_name, float(roll_s)) if is_kafka(folder)
           else RollingAvroLog(folder, schema_name, float(roll_s), codec))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        kind = message[0]
        if kind == "append":
            log.append(message[1], message[2])
        elif kind == "advance":
            log.advance(message[1])
        elif kind == "close":
            log.close(message[1])
            conn.send(log.stats())
        elif kind == "flush":
            log.flush()
            conn.send(log.stats())
        elif kind == "stats":
            conn.send(log.stats())
        elif kind == "stop":
            log.close()
            conn.send(log.stats())
            return


def open_feature_log(folder: str, roll_s: float, in_process: bool = False):
    """Serving's feature log (``schemas/feature_log.avsc``).

    Args:
        folder: its folder, or ``kafka://HOST:PORT[,...]/TOPIC``.
        roll_s: event-time seconds per file.
        in_process: written by this process (its Avro encoding then holds the GIL against
            requests), not by a child process.

    Returns:
        A :class:`ProcessAvroLog`, or if ``in_process`` a :class:`RollingAvroLog` (a
        ``KafkaAvroLog`` for a topic).
    """
    if in_process:
        return open_log(folder, "feature_log", roll_s)
    return ProcessAvroLog(folder, "feature_log", roll_s)


def read_watermark(folder: str) -> Optional[int]:
    """The watermark of a folder a :class:`RollingAvroLog` writes.

    Args:
        folder: the log's folder.

    Returns:
        Its ``_watermark.json``'s ``ts_ms`` (every record before it is in a file), or None
        if there is none yet.
    """
    try:
        with open(os.path.join(folder, RollingAvroLog.WATERMARK), encoding="utf-8") as f:
            return int(json.load(f)["ts_ms"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def log_files(folder: str) -> list:
    """The complete files of a folder a :class:`RollingAvroLog` writes.

    Args:
        folder: the log's folder.

    Returns:
        ``[(period start ms, path)]`` in time order (files being written are not listed).
    """
    from transforms.tail import log_file_start_ms
    starts = ((log_file_start_ms(p), p) for p in glob.glob(os.path.join(folder, "part-*.avro")))
    return sorted((start, p) for start, p in starts if start is not None)
