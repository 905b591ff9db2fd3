"""Savepoint seals: Flink checks no checksum, so a savepoint taken by ``FlinkCluster`` carries
the SHA-256 of its files and ``dataflow.train`` refuses one that does not match."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflow import train
from dataflow.flink import SavepointError, seal_savepoint, verify_savepoint


def make_savepoint(root):
    os.makedirs(root / "op", exist_ok=True)
    (root / "_metadata").write_bytes(bytes(range(256)) * 4)
    (root / "op" / "state-1").write_bytes(b"rocksdb state" * 100)
    seal_savepoint(f"file:{root}")
    return root


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(["_metadata", "op/state-1"]), position=st.floats(0, 1),
       bit=st.integers(0, 7), data=st.data())
def test_any_bit_flip_or_cut_is_refused_naming_the_file(tmp_path_factory, which, position, bit,
                                                       data):
    root = make_savepoint(tmp_path_factory.mktemp("sp"))
    assert verify_savepoint(str(root)) is True
    path = root / which
    raw = bytearray(path.read_bytes())
    i = min(int(position * len(raw)), len(raw) - 1)
    if data.draw(st.booleans(), label="cut"):
        raw = raw[:i]
    else:
        raw[i] ^= 1 << bit
    path.write_bytes(bytes(raw))
    with pytest.raises(SavepointError, match=which):
        verify_savepoint(f"file://{root}")


def test_missing_and_foreign_files_are_refused(tmp_path):
    root = make_savepoint(tmp_path / "a")
    (root / "op" / "state-1").unlink()
    with pytest.raises(SavepointError, match="missing"):
        verify_savepoint(str(root))
    root = make_savepoint(tmp_path / "b")
    (root / "op" / "extra").write_bytes(b"x")
    with pytest.raises(SavepointError, match="not part of it"):
        verify_savepoint(str(root))
    with pytest.raises(SavepointError, match="no such directory"):
        verify_savepoint(str(tmp_path / "nowhere"))


def test_unsealed_savepoint_is_left_to_flink(tmp_path):
    (tmp_path / "_metadata").write_bytes(b"x")
    assert verify_savepoint(str(tmp_path)) is False


@pytest.mark.flink  # the runner's options ask for the job server jar
def test_train_refuses_a_damaged_savepoint_before_submitting(tmp_path):
    root = make_savepoint(tmp_path / "sp")
    (root / "_metadata").write_bytes(b"garbage")
    with pytest.raises(SavepointError, match="_metadata is damaged"):
        train.main(["online", f"--input={tmp_path}", "--config=synthetic",
                    "--runner=FlinkRunner", "--flink_master=localhost:1",
                    f"--savepoint_path=file://{root}", f"--metrics_dir={tmp_path}/m"])


def test_train_refuses_to_resume_a_savepoint_of_another_job(tmp_path):
    """The manifest a backfill writes into its savepoint: resuming with another folder,
    model, shard count or batch size is refused before anything is submitted, naming the
    flag; the same job's flags pass the check (and go on to the runner)."""
    import json

    from dataflow.flink import SAVEPOINT_MANIFEST
    folder = tmp_path / "examples"
    root = tmp_path / "sp"
    os.makedirs(root)
    (root / "_metadata").write_bytes(b"flink")
    from ps.shard_state import STATE_FORMAT
    from transforms.example_reader import FOLLOW_POSITIONS
    from transforms.train import PS_KEYS
    manifest = {"input": f"{folder}/*.avro", "config": "synthetic", "model": "fm",
                "num_shards": 2, "batch_size": 256, "reader_positions": FOLLOW_POSITIONS,
                "ps_keys": PS_KEYS, "ps_state": STATE_FORMAT}
    (root / SAVEPOINT_MANIFEST).write_text(json.dumps(manifest))
    seal_savepoint(str(root))
    same = [f"--input={folder}", "--config=synthetic", "--model=fm", "--num_shards=2",
            "--batch_size=256"]

    def resume(*changed):
        flags = {a.split("=")[0]: a for a in same}
        flags.update({a.split("=")[0]: a for a in changed})
        train.main(["online", *flags.values(), f"--savepoint_path=file://{root}",
                    "--runner=FlinkRunner", "--flink_master=localhost:1",
                    f"--metrics_dir={tmp_path}/m", "--flink_job_server_jar=/nonexistent.jar"])

    for changed, named in [(f"--input={tmp_path}/other", "--input="),
                           ("--model=deepfm", "--model=deepfm"),
                           ("--num_shards=4", "--num_shards=4"),
                           ("--batch_size=512", "--batch_size=512")]:
        with pytest.raises(SystemExit, match=f"cannot be resumed with {named}"):
            resume(changed)
    with pytest.raises(SystemExit, match="not both"):
        resume(f"--restore={tmp_path}/snapshots")
    with pytest.raises(ValueError, match="nonexistent.jar"):  # past the check: the runner
        resume(f"--input={folder}/")                          # fails on the jar
    (root / SAVEPOINT_MANIFEST).write_text(json.dumps({**manifest, "reader_positions": None}))
    seal_savepoint(str(root))  # a savepoint of the version that counted periods by index
    with pytest.raises(SystemExit, match="reader positions of another version"):
        resume()
    (root / SAVEPOINT_MANIFEST).write_text(json.dumps({**manifest, "ps_keys": None}))
    seal_savepoint(str(root))  # PS state keyed by FastPrimitivesCoder-encoded shards
    with pytest.raises(SystemExit, match="PS state keys of another version"):
        resume()
    (root / SAVEPOINT_MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items()
                                                      if k != "ps_state"}))
    seal_savepoint(str(root))  # PS state of the version before ps.envelope (PSLE, PSSHARD1)
    with pytest.raises(SystemExit, match="PS state format of another version \\(None; this one "
                                         "has base\\+log\\+version, ps.envelope v1\\): resume it "
                                         "with the version that wrote it"):
        resume()
