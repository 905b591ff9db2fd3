"""The envelope every PS blob travels in: round trips, and every damage refused with what is
wrong (truncated, padded, corrupted, another kind, an earlier format)."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps.envelope import HEAD, KINDS, MAGIC, SnapshotError, open_envelope, seal, seal_arrays


def test_arrays_round_trip():
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([], np.int64),
              "c": np.array(3.5), "d": np.arange(4, dtype=">u4")}
    envelope = open_envelope(seal_arrays("dense-params", arrays, k=[1, 2]), "dense-params")
    got = envelope.arrays()
    assert envelope.kind == "dense-params" and envelope.header["k"] == [1, 2]
    assert list(got) == ["a", "b", "c", "d"]
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k])
        assert got[k].flags.writeable and got[k].shape == arrays[k].shape
    assert got["d"].dtype == np.dtype("<u4")  # stored little-endian whatever it came as
    with pytest.raises(ValueError):
        open_envelope(b"nonsense" + bytes(30), "dense-params")


def test_payload_parts_are_concatenated_and_the_header_kept():
    data = seal("sparse-state", {"seq": 3, "tables": [["a", 2]]}, b"xy", memoryview(b"z"),
                np.arange(2, dtype=np.uint8))
    envelope = open_envelope(data, ("snapshot", "sparse-state"))
    assert envelope.kind == "sparse-state"
    assert envelope.header == {"seq": 3, "tables": [["a", 2]]}
    assert bytes(envelope.payload) == b"xyz\x00\x01"
    assert len(data) == HEAD.size + len(json.dumps(envelope.header, separators=(",", ":"))) + 5


SAMPLE = seal_arrays("table", {"keys": np.arange(5, dtype=np.uint64),
                               "rows": np.ones((5, 2), np.float32)}, count=5)


def test_every_truncation_and_padding_is_refused():
    for cut in range(len(SAMPLE)):
        with pytest.raises(SnapshotError, match="truncated"):
            open_envelope(SAMPLE[:cut], "table")
    with pytest.raises(SnapshotError, match="padded: 1 unexpected trailing bytes"):
        open_envelope(SAMPLE + b"\0", "table")


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, len(SAMPLE) - 1), bit=st.integers(0, 7))
def test_any_bit_flip_is_refused(position, bit):
    """The checksum covers the head (kind, lengths) as well as the header and the payload."""
    damaged = bytearray(SAMPLE)
    damaged[position] ^= 1 << bit
    with pytest.raises(SnapshotError):
        open_envelope(bytes(damaged), "table")


def test_a_flipped_kind_is_caught_by_the_checksum():
    damaged = bytearray(SAMPLE)
    damaged[5] = KINDS["dense-params"][0]
    with pytest.raises(SnapshotError, match="corrupted \\(checksum mismatch\\)"):
        open_envelope(bytes(damaged), "table")


def test_errors_name_the_kind_expected_and_got():
    with pytest.raises(SnapshotError, match="^f.snap is not a PS snapshot: it holds an "
                                            "embedding table snapshot$"):
        open_envelope(SAMPLE, "snapshot", source="f.snap")
    with pytest.raises(SnapshotError, match="is not a dense parameter set \\(magic b'GARBAGE!'\\)"):
        open_envelope(b"GARBAGE!" + SAMPLE[8:], "dense-params")
    future = bytearray(SAMPLE)
    future[4] = 9
    with pytest.raises(SnapshotError, match="envelope format version 9; this version of "
                                            "beam-monolith reads version 1"):
        open_envelope(bytes(future), "table")


def _resealed(header: bytes, payload: bytes, code=KINDS["table"][0]) -> bytes:
    head = HEAD.pack(MAGIC, 1, code, 0, len(header), len(payload), 0)[:HEAD.size - 4]
    crc = zlib.crc32(payload, zlib.crc32(header, zlib.crc32(head)))
    return head + struct.pack("<I", crc) + header + payload


def test_consistent_checksums_do_not_hide_a_malformed_header_or_sections():
    with pytest.raises(SnapshotError, match="header is not valid JSON"):
        open_envelope(_resealed(b"{nope", b""), "table")
    with pytest.raises(SnapshotError, match="not a JSON object"):
        open_envelope(_resealed(b"[1]", b""), "table")
    with pytest.raises(SnapshotError, match="unknown kind 200"):
        open_envelope(_resealed(b"{}", b"", code=200), "table")
    listing = json.dumps({"arrays": [["a", "<f4", [4]]]}).encode()
    with pytest.raises(SnapshotError, match="section 'a' runs past the end"):
        open_envelope(_resealed(listing, bytes(8)), "table").arrays()
    with pytest.raises(SnapshotError, match="8 bytes not described by its header"):
        open_envelope(_resealed(listing, bytes(24)), "table").arrays()
    with pytest.raises(SnapshotError, match="header is malformed"):
        open_envelope(_resealed(b'{"arrays": [["a", "nonsense", [1]]]}', bytes(4)), "table").arrays()


@pytest.mark.parametrize("magic,what", [
    (b"PSLE", "PSLE PS log entry"), (b"PSSHARD1", "PSSHARD1 PS shard state"),
    (b"PSSNAP01", "PSSNAP01 PS snapshot"), (b"PSSNAP02", "PSSNAP02 PS snapshot"),
    (b"PSARRAY1", "PSARRAY1 array set"), (b"PSEMBTBL", "PSEMBTBL embedding table snapshot")])
def test_earlier_formats_are_refused_by_name(magic, what):
    old = magic + bytes(64)  # what the earlier versions wrote started so
    with pytest.raises(SnapshotError, match=f"is a {what} of an earlier version of beam-monolith, "
                                            "which this version does not read: use it with the "
                                            "version that wrote it, or write it again"):
        open_envelope(old, "snapshot", source="x.snap")
