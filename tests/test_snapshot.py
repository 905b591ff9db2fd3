"""Snapshots: exact round trip, any capacity, and clear errors for damaged bytes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ps import FTRL, Adam, EmbeddingTable, FrequencyFilter, SlotConfig, SnapshotError
from ps.envelope import HEAD, open_envelope, seal


def trained_table(optimizer=None, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    table = EmbeddingTable(
        dim=4,
        optimizer=optimizer or Adam(lr=0.01),
        slots={1: SlotConfig(threshold=3, expiry=50), 2: SlotConfig(expiry=7)},
        default_slot=SlotConfig(threshold=0),
        filter=FrequencyFilter(memory_bytes=8192, depth=3),
        init_scale=0.05,
        seed=11,
        channels=2,
        capacity=16,
    )
    pool = np.concatenate([np.uint64(s << 48) + np.arange(n // 3, dtype=np.uint64) for s in (0, 1, 2)])
    for step in range(20):
        fids = rng.choice(pool, size=500)
        table.apply_gradients(fids, rng.standard_normal((500, 4)).astype(np.float32), now=10 * step)
        table.evict()
    return table


def entries(table):
    out = {}
    for fids, rows, last_seen in table.items():
        for f, r, t in zip(fids.tolist(), rows, last_seen.tolist()):
            out[f] = (r.tobytes(), t)
    return out


@pytest.mark.parametrize("optimizer", [None, FTRL(l1=0.01)])
@pytest.mark.parametrize("capacity", [None, 1, 100_000])
def test_round_trip_is_exact_into_any_capacity(optimizer, capacity):
    table = trained_table(optimizer)
    data = table.to_bytes()
    copy = EmbeddingTable.from_bytes(data, capacity=capacity)
    assert len(copy) == len(table) > 0
    assert entries(copy) == entries(table)  # keys, rows with optimizer slots, timestamps
    assert np.array_equal(copy.filter.counts, table.filter.counts)
    assert copy.config() == table.config()
    assert copy.stats == table.stats and copy.event_time == table.event_time
    assert copy.to_bytes() == data
    if capacity == 100_000:
        assert copy.capacity >= 100_000


def test_restored_table_behaves_like_the_original():
    rng = np.random.default_rng(1)
    a = trained_table()
    b = EmbeddingTable.from_bytes(a.to_bytes())
    fids = np.concatenate([np.uint64(1 << 48) + np.arange(2000, dtype=np.uint64)])
    grads = rng.standard_normal((fids.size, 4)).astype(np.float32)
    for t in (a, b):  # the filter, optimizer state and config carry on identically
        t.apply_gradients(fids, grads, now=1000)
        t.evict(now=1040)
    assert entries(a) == entries(b)
    np.testing.assert_array_equal(a.lookup(fids)[0], b.lookup(fids)[0])


def test_empty_table_round_trip():
    table = EmbeddingTable(dim=2)
    copy = EmbeddingTable.from_bytes(table.to_bytes())
    assert len(copy) == 0 and copy.filter is None


def test_every_truncation_is_rejected():
    data = trained_table(n=30).to_bytes()
    for cut in [*range(64), len(data) // 2, len(data) - 1]:
        with pytest.raises(SnapshotError, match="truncated"):
            EmbeddingTable.from_bytes(data[:cut])


def test_corrupted_header_and_payload_are_rejected_with_what_is_wrong():
    """One checksum covers the envelope's head, header and payload (``ps.envelope``): a
    damaged header and a damaged payload are both reported as corrupted."""
    data = bytearray(trained_table(n=30).to_bytes())
    header_len = HEAD.unpack_from(data)[4]
    in_header, in_payload = HEAD.size + header_len // 2, HEAD.size + header_len + 5
    for offset in (in_header, in_payload):
        damaged = bytearray(data)
        damaged[offset] ^= 0x10
        with pytest.raises(SnapshotError, match="embedding table snapshot is corrupted"):
            EmbeddingTable.from_bytes(bytes(damaged))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_single_damaged_byte_is_rejected(data):
    snapshot = SNAPSHOT
    offset = data.draw(st.integers(0, len(snapshot) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(snapshot)
    damaged[offset] ^= flip
    with pytest.raises(SnapshotError):
        EmbeddingTable.from_bytes(bytes(damaged))


SNAPSHOT = trained_table(n=30).to_bytes()


def test_errors_name_the_problem():
    data = SNAPSHOT
    with pytest.raises(SnapshotError, match="not an embedding table snapshot"):
        EmbeddingTable.from_bytes(b"GARBAGE!" + data[8:])
    with pytest.raises(SnapshotError, match="version 9"):
        EmbeddingTable.from_bytes(data[:4] + bytes([9]) + data[5:])
    with pytest.raises(SnapshotError, match="trailing"):
        EmbeddingTable.from_bytes(data + b"\0")
    with pytest.raises(SnapshotError, match="truncated"):
        EmbeddingTable.from_bytes(b"")
    assert issubclass(SnapshotError, ValueError)


def reseal(header, payload):
    """A well-formed snapshot (valid checksum) around a chosen header and payload."""
    return seal("table", header, payload)


def split(data):
    envelope = open_envelope(data, "table")
    return envelope.header, bytes(envelope.payload)


def test_consistent_checksums_do_not_hide_an_inconsistent_header():
    header, payload = split(SNAPSHOT)
    header["count"] += 1
    with pytest.raises(SnapshotError, match="do not match"):
        EmbeddingTable.from_bytes(reseal(header, payload))
    header, payload = split(SNAPSHOT)
    with pytest.raises(SnapshotError, match="not described"):
        EmbeddingTable.from_bytes(reseal(header, payload + b"\0" * 8))
    header, payload = split(SNAPSHOT)
    del header["arrays"]
    with pytest.raises(SnapshotError, match="malformed"):
        EmbeddingTable.from_bytes(reseal(header, payload))


def test_duplicate_keys_are_rejected():
    table = EmbeddingTable(dim=1, optimizer=FTRL())
    table.insert(np.array([1, 2], np.uint64))
    header, payload = split(table.to_bytes())
    keys = np.frombuffer(payload[:16], np.uint64).copy()
    keys[1] = keys[0]
    with pytest.raises(SnapshotError, match="duplicate"):
        EmbeddingTable.from_bytes(reseal(header, keys.tobytes() + payload[16:]))
