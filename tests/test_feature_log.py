"""Serving's feature log (``dataflow.serving.feature_log``): Avro files rolled per period of
event time with a watermark, written by a thread or by a child process."""
from __future__ import annotations

import os
import signal
import time

import pytest

from dataflow.serving.feature_log import ProcessAvroLog, RollingAvroLog, read_watermark
from schemas import read_avro

T0 = 1_704_067_200_000


@pytest.mark.parametrize("log_class", [RollingAvroLog, ProcessAvroLog])
def test_rolling_log_files_follow_event_time(tmp_path, log_class):
    log = log_class(str(tmp_path), "action_log", roll_s=60)
    ts = [T0 + 1_000, T0 + 59_999, T0 + 60_000, T0 + 200_000, T0 + 200_001]
    for i, t in enumerate(ts):
        log.append([{"request_id": f"r{i}", "ts_ms": t, "action": "click"}], t)
    log.flush()
    files = sorted(p.name for p in tmp_path.glob("part-*.avro"))
    assert files == ["part-20240101-000000.avro", "part-20240101-000100.avro"]
    assert read_watermark(str(tmp_path)) == T0 + 180_000
    log.advance(T0 + 240_000)  # event time moves on: the open period closes
    log.flush()
    assert read_watermark(str(tmp_path)) == T0 + 240_000
    log.close(until_ms=T0 + 999_000)
    assert read_watermark(str(tmp_path)) == T0 + 999_000
    got = [r["request_id"] for p in sorted(tmp_path.glob("part-*.avro"))
           for r in read_avro(str(p))]
    assert got == [f"r{i}" for i in range(5)]
    assert not list(tmp_path.glob(".*tmp")) and log.late == 0 and log.errors == 0
    assert log.records == 5 and log.files == 3
    log.stop()


def test_process_log_stop_writes_the_open_file_and_ends_the_child(tmp_path):
    log = ProcessAvroLog(str(tmp_path), "action_log", roll_s=60)
    child = log._proc
    log.append([{"request_id": "r0", "ts_ms": T0, "action": "click"}], T0)
    log.append([{"request_id": "r1", "ts_ms": T0 - 1, "action": "click"}], T0 - 1)  # late
    assert log.late == 1 and not list(tmp_path.glob("part-*.avro"))
    # a signal to the service's process group (Ctrl-C, the loop's SIGTERM) reaches the child
    # too: it waits for the service to tell it to write the open period
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(child.pid, sig)
    time.sleep(0.5)
    assert child.poll() is None
    log.stop()
    assert child.poll() == 0  # ended by itself
    assert [r["request_id"] for p in tmp_path.glob("part-*.avro") for r in read_avro(str(p))] \
        == ["r0", "r1"]
    assert log.stats() == {"records": 2, "files": 1, "late": 1, "errors": 0}
    log.append([{"request_id": "r2", "ts_ms": T0, "action": "click"}], T0)  # no child: lost
    assert log.lost == 1 and log.records == 2
