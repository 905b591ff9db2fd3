"""The HTTP service around a :class:`dataflow.serving.scorer.Scorer` (JSON over HTTP/1.1,
keep-alive; the API is in ``dataflow.serve``): :class:`Server`.
"""
from __future__ import annotations

import gc
import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dataflow.serving.request import BadRequest
from dataflow.serving.scorer import Scorer
from schemas import strict_json

try:  # Beam depends on orjson: 3-5x faster than json on a request of 100 candidates
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

__all__ = ["Server", "MAX_BODY"]

_LOG = logging.getLogger(__name__)

MAX_BODY = 16 << 20


def _loads(body: bytes):
    return _orjson.loads(body) if _orjson is not None else json.loads(body)


def _dumps(body) -> bytes:
    if _orjson is not None:
        try:
            return _orjson.dumps(body)  # (NaN and infinity as null, as strict_json does)
        except TypeError:  # e.g. a non-str key in the store's sync records
            pass
    return strict_json.dumps(body, separators=(",", ":"), default=str).encode("utf-8")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: no TCP handshake per request
    server_version = "beam-monolith-serve/1"

    def setup(self):
        super().setup()
        # Small answers on a keep-alive connection: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every answer.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt, *args):  # one line per request would be the bottleneck
        pass

    def _send(self, status: int, body: dict) -> None:
        data = _dumps(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        # headers and body in one write (one TCP segment for a small answer)
        self._headers_buffer.append(b"\r\n" + data)
        self.flush_headers()

    def _error(self, status: int, reason: str, detail: str) -> None:
        self.server.scorer.count(f"http_{status}")
        self._send(status, {"error": reason, "detail": detail})

    def do_GET(self):
        scorer = self.server.scorer
        if self.path == "/healthz":
            self._send(200, scorer.health())
        elif self.path == "/stats":
            self._send(200, scorer.stats())
        else:
            self._error(404, "not_found", f"no such path {self.path!r}: POST /score, "
                                          f"GET /healthz, GET /stats, POST /flush")

    def do_POST(self):
        scorer = self.server.scorer
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._error(411, "length_required", "send a Content-Length")
        length = int(length)
        if length > MAX_BODY:
            self.close_connection = True
            return self._error(413, "too_large", f"body of {length} bytes > {MAX_BODY}")
        body = self.rfile.read(length)
        if self.path == "/flush":
            if scorer.feature_log is not None:
                scorer.feature_log.close()
            return self._send(200, {"flushed": scorer.feature_log is not None})
        if self.path != "/score":
            return self._error(404, "not_found", f"no such path {self.path!r}")
        try:
            request = _loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return self._error(400, "bad_json", str(e)[:300])
        try:
            answer = scorer.score(request)
        except BadRequest as e:
            return self._error(400, e.reason, e.detail)
        except Exception as e:  # noqa: BLE001 - a bug must not kill the service
            _LOG.exception("serve: scoring failed")
            return self._error(500, "internal_error", f"{type(e).__name__}: {e}"[:300])
        self._send(200, answer)


class Server:
    """The HTTP service around a :class:`Scorer`; ``start()`` serves in background threads
    and reloads the model and the store's sync records every ``poll_s``.

    Args:
        scorer: what scores the requests.
        host: the address to listen on.
        port: the port (0: any free port).
        poll_s: seconds between :meth:`Scorer.refresh` calls.

    >>> import urllib.request
    >>> from schemas.feature_config import FeatureConfig
    >>> from transforms.model import ModelSpec
    >>> config = FeatureConfig.from_dict({"slots": [
    ...     {"name": "user", "slot": 1, "source": "user_id"}]})
    >>> scorer = Scorer(config, ModelSpec("lr", slots=[(1, 4)]), "memory://server-doc", 1)
    >>> server = Server(scorer, port=0).start()   # port 0: any free port
    >>> body = json.dumps({"user_id": "u1", "candidates": [{"item_id": "i7"}]}).encode()
    >>> with urllib.request.urlopen(f"{server.url}/score", data=body) as answer:
    ...     json.load(answer)["items"][0]["item_id"]
    'i7'
    >>> server.stop()                             # also writes the feature log's open file
    """

    def __init__(self, scorer: Scorer, host: str = "127.0.0.1", port: int = 0,
                 poll_s: float = 1.0):
        self.scorer = scorer
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.scorer = scorer
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._threads: list = []

    @property
    def url(self) -> str:
        """``http://HOST:PORT``."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def _refresh_loop(self):
        while not self._stop.is_set():
            try:
                self.scorer.refresh()
            except Exception:  # noqa: BLE001
                _LOG.exception("serve: refresh failed")
            self._stop.wait(self.poll_s)

    def start(self, freeze_heap: bool = False) -> "Server":
        """Loads the newest model, then serves in background threads.

        Args:
            freeze_heap: the serving command line's choice: take every object alive now out of
                the garbage collector's generations (:func:`_freeze_heap`; a process-wide
                change, so off for a server in someone else's process).

        Returns:
            This server.
        """
        self.scorer.refresh()
        if freeze_heap:
            _freeze_heap()
        for target, name in ((self.httpd.serve_forever, "http"),
                             (self._refresh_loop, "refresh")):
            t = threading.Thread(target=target, name=f"serve-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        """Stops serving and writes the feature log's open file."""
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.scorer.feature_log is not None:
            self.scorer.feature_log.stop()  # writes the open file


def _freeze_heap() -> None:
    """Move every object alive at the start (TensorFlow's and the first model's: ~400k) out
    of the garbage collector's generations: a full collection over them took 0.1-0.4 s, a
    request's worst latency. Models loaded later are not frozen (a replaced one must be
    freed): ~1,800 objects each, a full collection then takes a few ms."""
    gc.collect()
    gc.freeze()

