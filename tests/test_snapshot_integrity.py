"""Snapshot integrity: a truncated or bit-flipped PS snapshot is refused before the online job
starts, with an error that names the file (issue #7, part 5).

The snapshots are real: a small backfill on the DirectRunner exports them
(``dataflow.train backfill --export_dir``). Each damaged copy is then handed to
``dataflow.train online --restore``, which must raise ``SnapshotFileError`` while the pipeline
is being built, before any example is read. ``FAULTS`` counts the damaged snapshots tried;
docs/reliability.md quotes the figure the last test prints.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow import data, join, train
from ps import SnapshotError
from ps.envelope import HEAD  # the envelope's fixed head
from ps.snapshot_files import SnapshotFileError, check_restore_dir, read_snapshot

CONFIG = "synthetic"
SNAPSHOTS = ("dense-dense.snap", "sparse-0.snap", "sparse-1.snap")
FAULTS = {"truncated": 0, "bit_flipped": 0, "missing_or_foreign": 0, "refused": 0}


@pytest.fixture(scope="module")
def backfill(tmp_path_factory):
    """A backfill's snapshots and a few example files for an online run."""
    work = tmp_path_factory.mktemp("integrity")
    data.synth(str(work / "logs"), requests=3000, users=100, items=150, days=0.25, seed=3)
    join.main([f"--features={work}/logs/feature_log/*.avro",
               f"--actions={work}/logs/action_log/*.avro", f"--out={work}/joined",
               f"--config={CONFIG}"])
    files = sorted(glob.glob(f"{work}/joined/examples/*.avro"))
    backfill_dir, landing = work / "backfill", work / "landing"
    backfill_dir.mkdir()
    landing.mkdir()
    for f in files[:-2]:
        shutil.copy(f, backfill_dir)
    for f in files[-2:]:
        shutil.copy(f, landing)
    snapshots = work / "snapshots"
    train.main(["backfill", f"--input={backfill_dir}/*.avro", f"--config={CONFIG}",
                "--model=lr", f"--metrics_dir={work}/m-backfill", f"--export_dir={snapshots}",
                f"--store=memory://integrity-{work.name}"])
    assert sorted(os.listdir(snapshots)) == list(SNAPSHOTS)
    return {"work": work, "snapshots": snapshots, "landing": landing,
            "bytes": {name: (snapshots / name).read_bytes() for name in SNAPSHOTS}}


def damaged_copy(backfill, tmp_path, name, transform):
    """A copy of the snapshot directory with ``name`` replaced by ``transform(its bytes)``."""
    target = tmp_path / f"restore-{len(os.listdir(tmp_path))}"
    shutil.copytree(backfill["snapshots"], target)
    (target / name).write_bytes(transform(backfill["bytes"][name]))
    return target


def flip(data: bytes, position: int, bit: int) -> bytes:
    out = bytearray(data)
    out[position] ^= 1 << bit
    return bytes(out)


def cut_points(data: bytes) -> list[int]:
    """Truncation points in every part of the file: empty, the fixed head, the JSON header,
    the payload (the shard's base encoding, whose tables have their own checksums), the end."""
    header_len, payload_len = HEAD.unpack_from(data)[4:6]
    start = HEAD.size + header_len
    points = {0, 1, 7, 8, HEAD.size - 1, HEAD.size, HEAD.size + header_len // 2, start - 1,
              start, start + 1, start + payload_len // 3, start + payload_len // 2,
              len(data) - 8, len(data) - 1}
    return sorted(p for p in points if 0 <= p < len(data))


def refused(restore_dir, name) -> str:
    """The error ``check_restore_dir`` raises for the damaged copy (it must name the file)."""
    with pytest.raises(SnapshotFileError) as info:
        for kind in ("sparse", "dense"):
            check_restore_dir(str(restore_dir), kind)
    message = str(info.value)
    assert os.path.join(str(restore_dir), name) in message, message
    FAULTS["refused"] += 1
    return message


def test_intact_snapshots_pass_the_check(backfill):
    for kind, count in (("sparse", 2), ("dense", 1)):
        paths = check_restore_dir(str(backfill["snapshots"]), kind)
        assert len(paths) == count
        for path in paths:
            meta, payload = read_snapshot(path)
            assert meta["kind"] == kind and len(payload) > 0


@pytest.mark.parametrize("name", SNAPSHOTS)
def test_every_truncation_is_refused(backfill, tmp_path, name):
    data = backfill["bytes"][name]
    for point in cut_points(data):
        target = damaged_copy(backfill, tmp_path, name, lambda d, p=point: d[:p])
        message = refused(target, name)
        assert "truncated" in message, (point, message)
        FAULTS["truncated"] += 1
    # Padding is damage too (a partial copy over a longer file, a concatenation).
    target = damaged_copy(backfill, tmp_path, name, lambda d: d + b"\0")
    assert "padded" in refused(target, name)


@pytest.mark.parametrize("name", SNAPSHOTS)
def test_bit_flips_in_every_header_byte_are_refused(backfill, tmp_path, name):
    """Every bit of the fixed head, and a bit of every byte of the JSON header (kind, key,
    shard count, event time): the checksum covers the header too, so no flip is read as a
    valid snapshot."""
    data = backfill["bytes"][name]
    header_len = HEAD.unpack_from(data)[4]
    target = tmp_path / "restore"
    shutil.copytree(backfill["snapshots"], target)
    for position in range(HEAD.size + header_len):
        for bit in range(8) if position < HEAD.size else (position % 8,):
            (target / name).write_bytes(flip(data, position, bit))
            refused(target, name)
            FAULTS["bit_flipped"] += 1


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(SNAPSHOTS), where=st.floats(0.0, 1.0, exclude_max=True),
       bit=st.integers(0, 7))
def test_any_bit_flip_in_the_payload_is_refused(backfill, tmp_path_factory, name, where, bit):
    data = backfill["bytes"][name]
    header_len = HEAD.unpack_from(data)[4]
    start = HEAD.size + header_len
    position = start + int(where * (len(data) - start))
    target = damaged_copy(backfill, tmp_path_factory.mktemp("flip"), name,
                          lambda d: flip(d, position, bit))
    assert "corrupted" in refused(target, name)
    FAULTS["bit_flipped"] += 1


def test_missing_empty_and_foreign_snapshots_are_refused(backfill, tmp_path):
    # A mistyped --restore, or an export that never finished: no snapshot at all.
    for restore in (tmp_path / "does-not-exist", tmp_path / "empty"):
        if restore.name == "empty":
            restore.mkdir()
        with pytest.raises(SnapshotFileError, match=f"{restore} holds no sparse-"):
            check_restore_dir(str(restore), "sparse")
        FAULTS["missing_or_foreign"] += 1
    # A dense snapshot under a sparse name: intact bytes, wrong kind.
    foreign = tmp_path / "foreign"
    shutil.copytree(backfill["snapshots"], foreign)
    shutil.copy(foreign / "dense-dense.snap", foreign / "sparse-1.snap")
    with pytest.raises(SnapshotFileError, match="holds a 'dense' snapshot, not 'sparse'"):
        check_restore_dir(str(foreign), "sparse")
    # Not a snapshot at all.
    (foreign / "sparse-1.snap").write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(SnapshotFileError, match="is not a PS snapshot"):
        check_restore_dir(str(foreign), "sparse")
    FAULTS["missing_or_foreign"] += 2
    assert issubclass(SnapshotFileError, SnapshotError)


def online_flags(backfill, tmp_path, restore):
    return ["online", f"--input={backfill['landing']}", f"--config={CONFIG}", "--model=lr",
            f"--restore={restore}", f"--metrics_dir={tmp_path}/metrics",
            f"--metrics_out={tmp_path}/metrics.json", "--streaming", "--poll_interval_s=0.5",
            "--run_for_s=2", f"--store=memory://online-{tmp_path.name}"]


@pytest.mark.parametrize("name,damage", [
    ("sparse-1.snap", lambda d: d[:len(d) // 2]),
    ("sparse-0.snap", lambda d: flip(d, len(d) - 100, 3)),
    ("dense-dense.snap", lambda d: flip(d, HEAD.size + 2, 0)),  # inside the JSON header
])
def test_online_job_refuses_to_start(backfill, tmp_path, name, damage):
    """``train.main online --restore`` raises while it builds the pipeline: no example is
    read, no metric written, nothing published."""
    restore = damaged_copy(backfill, tmp_path, name, damage)
    started = time.monotonic()
    with pytest.raises(SnapshotFileError) as info:
        train.main(online_flags(backfill, tmp_path, restore))
    assert str(restore / name) in str(info.value)
    assert time.monotonic() - started < 10  # refused up front, not after --run_for_s
    assert not (tmp_path / "metrics.json").exists()
    assert not glob.glob(f"{tmp_path}/metrics/*")
    FAULTS["refused"] += 1


def test_online_command_line_refuses_to_start(backfill, tmp_path):
    """The same through ``python -m dataflow.train``: non-zero exit, the file and the damage
    named on stderr."""
    restore = damaged_copy(backfill, tmp_path, "sparse-0.snap",
                           lambda d: flip(d, len(d) // 2, 5))
    proc = subprocess.run([sys.executable, "-m", "dataflow.train",
                           *online_flags(backfill, tmp_path, restore)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"PS snapshot {restore}/sparse-0.snap is corrupted (checksum mismatch)" in proc.stderr
    assert not (tmp_path / "metrics.json").exists()
    FAULTS["refused"] += 1


def test_online_job_starts_from_the_intact_snapshots(backfill, tmp_path):
    """The control: the same command on the undamaged directory restores all three."""
    train.main(online_flags(backfill, tmp_path, backfill["snapshots"]))
    counters = json.loads((tmp_path / "metrics.json").read_text())["counters"]
    assert counters["ps.snapshots_restored"] == 3
    assert counters["ps.gradient_rows_applied"] == counters["worker.gradient_rows_emitted"] > 0
    print("\nsnapshot integrity:", json.dumps(FAULTS, sort_keys=True))
