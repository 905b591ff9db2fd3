"""The Python worker pool for ``--environment_type=EXTERNAL``:
``python -m dataflow.worker_pool --service_port=PORT`` (:class:`dataflow.flink.WorkerPool`
starts it).

Beam's own pool (``apache_beam.runners.worker.worker_pool_main``) keeps its SDK worker
processes by worker id, and stops the one a ``StopWorker`` names. Each Flink TaskManager
numbers its workers from ``1-1`` on, so with two TaskManagers on one pool the ids collide:
the first TaskManager to finish its part of a job stopped the *other* one's worker
(measured: "SDK Harness connection lost" at the end of every two-TaskManager job). This pool
stops a worker only when its id is not shared; a shared one ends by itself, as every SDK
worker does once its TaskManager closes the control channel. It also leaves the workers'
standard output to the pool's log instead of a pipe nobody reads (a full pipe blocks the
worker).
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
import time

_LOG = logging.getLogger(__name__)


def servicer_class():
    """The pool's gRPC servicer class (Beam's worker pool module is imported here, not when
    this module is: it adds a warnings filter on import)."""
    from apache_beam.portability.api import beam_fn_api_pb2
    from apache_beam.runners.worker import worker_pool_main

    class WorkerPoolServicer(worker_pool_main.BeamFnExternalWorkerPoolServicer):
        """Beam's worker pool servicer with per-TaskManager worker ids (module docstring).

        >>> from apache_beam.portability.api import beam_fn_api_pb2
        >>> pool = servicer_class()(use_process=True)
        >>> request = beam_fn_api_pb2.StopWorkerRequest(worker_id="1-1")  # none by that id
        >>> pool.StopWorker(request, None) == beam_fn_api_pb2.StopWorkerResponse()
        True
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._lock = threading.Lock()
            self._by_id: dict = {}  # worker id -> [Popen, ...] (one per TaskManager)

        def StartWorker(self, request, context):
            command = [sys.executable, "-c",
                       "from apache_beam.runners.worker.sdk_worker import SdkHarness; "
                       f"SdkHarness({request.control_endpoint.url!r}, "
                       f"worker_id={request.worker_id!r}, "
                       f"state_cache_size={int(self._state_cache_size)}, "
                       f"data_buffer_time_limit_ms={int(self._data_buffer_time_limit_ms)}).run()"]
            try:
                process = subprocess.Popen(command, close_fds=True)
            except OSError as e:
                return beam_fn_api_pb2.StartWorkerResponse(error=f"{type(e).__name__}: {e}")
            with self._lock:
                alive = [p for p in self._by_id.get(request.worker_id, []) if p.poll() is None]
                self._by_id[request.worker_id] = alive + [process]
                self._worker_processes[f"{request.worker_id}/{process.pid}"] = process
            _LOG.info("started SDK worker %s (pid %d) for %s", request.worker_id, process.pid,
                      request.control_endpoint.url)
            return beam_fn_api_pb2.StartWorkerResponse()

        def StopWorker(self, request, context):
            with self._lock:
                alive = [p for p in self._by_id.get(request.worker_id, []) if p.poll() is None]
                self._by_id[request.worker_id] = alive
            if len(alive) == 1:
                with self._lock:
                    self._by_id.pop(request.worker_id, None)
                    self._worker_processes.pop(f"{request.worker_id}/{alive[0].pid}", None)
                worker_pool_main.kill_process_gracefully(alive[0])
            elif alive:
                _LOG.info("worker id %s is shared by %d workers (one per TaskManager): each ends "
                          "when its TaskManager closes its control channel", request.worker_id,
                          len(alive))
            return beam_fn_api_pb2.StopWorkerResponse()

    return WorkerPoolServicer


def main(argv=None) -> None:
    """``python -m dataflow.worker_pool --service_port=PORT``: serves until killed."""
    parser = argparse.ArgumentParser(prog="python -m dataflow.worker_pool",
                                     description=__doc__)
    parser.add_argument("--service_port", type=int, required=True,
                        help="the gRPC port (--environment_config=localhost:PORT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    address, server = servicer_class().start(use_process=True, port=args.service_port)
    _LOG.info("Python worker pool on %s", address)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop(0)


if __name__ == "__main__":
    main()
