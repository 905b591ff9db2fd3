"""``ReadExampleBatches``: event-time order, batches within a period, a period read only once
all its shards are there, and periods that land after a later one skipped and counted."""
from __future__ import annotations

import os
import threading
import time

import apache_beam as beam
import numpy as np
import pytest

from dataflow.job import metrics_dict
from dataflow.options import pipeline_options
from schemas import write_avro
from transforms.example_reader import ReadExampleBatches
from transforms.example_log import example_periods

HOUR = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z


def examples(hour: int, n: int, shard: int = 0, shards: int = 1):
    return [{"request_id": f"h{hour}-{i:04d}", "ts_ms": T0 + hour * HOUR + 1000 * i,
             "user_id": "u", "item_id": "i", "fids": [hour, i], "dense": [float(i)],
             "label": i % 2} for i in range(n) if i % shards == shard]


def land(folder, hour: int, n: int, shards: int = 1, only=None):
    for shard in range(shards):
        if only is not None and shard not in only:
            continue
        name = f"2024010{1}T{hour:02d}0000Z-{shard:05d}-of-{shards:05d}-0000000{shard}.avro"
        tmp = os.path.join(folder, "." + name + ".tmp")
        write_avro(tmp, "example", examples(hour, n, shard, shards))
        os.rename(tmp, os.path.join(folder, name))


class Collect(beam.DoFn):
    """Batches as (hour of each example, ts) lists, into a module-level sink (DirectRunner:
    one process)."""
    sink: list = []

    def process(self, batch):
        Collect.sink.append(((batch.ts_ms - T0) // HOUR, batch.ts_ms.copy()))


def read(folder, follow, batch_size=4, seconds=0.0, marker=None, num_workers=1):
    Collect.sink = []
    p = beam.Pipeline(options=pipeline_options([]))
    (p | ReadExampleBatches(str(folder) if follow else f"{folder}/*.avro", batch_size, 1,
                            follow=follow, poll_interval_s=0.2,
                            stop_timestamp=time.time() + seconds if follow else None,
                            stop_when_exists=marker, num_workers=num_workers)
       | beam.ParDo(Collect()))
    result = p.run()
    result.wait_until_finish()
    # (metrics_dict: Beam 2.62's metric query recurses once per bundle of a long poll)
    return list(Collect.sink), metrics_dict(result)["counters"].get("reader.late_files", 0)


def test_bounded_read_keeps_event_time_order_and_periods_apart(tmp_path):
    land(tmp_path, 0, 10, shards=2)
    land(tmp_path, 1, 7)
    batches, _ = read(tmp_path, follow=False)
    hours = [h for h, _ in batches]
    assert all(len(set(h)) == 1 for h in hours)  # no batch spans two periods
    assert [len(h) for h in hours] == [4, 4, 2, 4, 3]  # a period's last batch may be short
    ts = np.concatenate([t for _, t in batches])
    assert ts.tolist() == sorted(ts.tolist()) and len(ts) == 17  # shards merged in order


@pytest.mark.parametrize("follow", [False, True])
def test_data_parallel_readers_split_every_period_by_shard_and_keep_its_order(tmp_path, follow):
    land(tmp_path, 0, 13, shards=2)
    land(tmp_path, 1, 9, shards=4)
    land(tmp_path, 2, 6, shards=2, only=[1])  # incomplete: a followed folder waits for it
    marker = tmp_path / "done"
    marker.touch()
    batches, _ = read(tmp_path, follow=follow, marker=str(marker) if follow else None,
                      num_workers=2)
    index = [((t - T0 - h * HOUR) // 1000, h) for h, t in batches]
    # reader k reads the shards s with s % 2 == k: here, the examples i with i % 2 == k
    readers = [int(i[0] % 2) for i, _ in index]
    assert all(len(set((i % 2).tolist())) == 1 for i, _ in index)
    for k in (0, 1):  # each reader: event-time order, its batches within one period
        mine = [t for (h, t), r in zip(batches, readers) if r == k]
        assert all(len(set(((t - T0) // HOUR).tolist())) == 1 for t in mine)
        ts = np.concatenate(mine).tolist()
        assert ts == sorted(ts)
    got = sorted(np.concatenate([t for _, t in batches]).tolist())
    want = [e["ts_ms"] for h, n in ((0, 13), (1, 9)) for e in examples(h, n)]
    if not follow:
        want += [e["ts_ms"] for e in examples(2, 6, 1, 2)]
    assert got == sorted(want)  # every example once: none lost, none read twice


def test_example_periods_stop_at_the_first_incomplete_period(tmp_path):
    land(tmp_path, 0, 6)
    land(tmp_path, 1, 6, shards=2, only=[0])
    land(tmp_path, 2, 6)
    names = [[os.path.basename(p)[:16] for p in period]
             for period in example_periods(f"{tmp_path}/*.avro", complete_only=True)]
    assert names == [["20240101T000000Z"]]
    assert len(example_periods(f"{tmp_path}/*.avro")) == 3


@pytest.mark.slow
def test_following_reads_periods_as_they_complete_and_counts_late_ones(tmp_path):
    land(tmp_path, 2, 6)
    land(tmp_path, 3, 6, shards=2, only=[0])  # incomplete: waits for its other shard

    def later():
        deadline = time.monotonic() + 8
        while not Collect.sink and time.monotonic() < deadline:  # hour 2 read first
            time.sleep(0.05)
        land(tmp_path, 0, 6)  # sorts before hour 2, read already: late, skipped, counted
        land(tmp_path, 1, 6, shards=2, only=[0])  # late and incomplete: must not block
        land(tmp_path, 3, 6, shards=2, only=[1])
    Collect.sink = []
    lander = threading.Thread(target=later)
    lander.start()
    batches, late = read(tmp_path, follow=True, seconds=10.0)
    lander.join()
    hours = [int(h[0]) for h, _ in batches]
    assert sorted(set(hours)) == [2, 3], hours
    assert sum(len(h) for h, _ in batches) == 12  # each period once
    assert late == 1


def test_following_stops_once_the_marker_exists_after_reading_what_landed(tmp_path):
    """``stop_when_exists``: the reader reads on until the writer's marker appears, reads
    what landed before it, then ends (long before its stop_timestamp)."""
    logs, marker = tmp_path / "logs", tmp_path / "done"
    logs.mkdir()
    land(logs, 0, 6)

    def later():
        deadline = time.monotonic() + 8
        while not Collect.sink and time.monotonic() < deadline:  # hour 0 read first
            time.sleep(0.05)
        time.sleep(0.5)  # a few polls with nothing new
        land(logs, 1, 6)
        land(logs, 2, 5)
        marker.write_text("")  # the last file landed before the marker
    Collect.sink = []
    lander = threading.Thread(target=later)
    lander.start()
    started = time.monotonic()
    batches, _ = read(logs, follow=True, seconds=60.0, marker=str(marker))
    lander.join()
    assert time.monotonic() - started < 30  # ended by the marker, not the 60 s
    hours = [int(h[0]) for h, _ in batches]
    assert sorted(set(hours)) == [0, 1, 2] and sum(len(h) for h, _ in batches) == 17
