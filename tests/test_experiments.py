"""The experiments' commands still run (``--quick``, small data) and say sane things; the
MD5 hashing they compare against behaves as documented.

Full runs are not here (minutes each): ``docs/experiments.md`` has their numbers.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import transforms.hashing as hashing
from benchmarks.experiments import __main__ as experiments
from benchmarks.train import PEERS_PYTHON
from test_strict_json import strict_files, strict_loads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_auc_range(x) -> bool:
    return x is not None and 0.5 < x <= 1.0


def is_png(path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Data sets are made once here and shared by the experiments below."""
    return str(tmp_path_factory.mktemp("experiments"))


def run(workdir, *argv) -> dict:
    result = experiments.main([*argv, "--json", "--quick", f"--workdir={workdir}"])
    assert result["quick"] is True and result["seconds"] > 0
    written = strict_files(workdir)  # exp_NAME-quick.json, the data sets' ready.json, ...
    assert written[os.path.join(workdir, f"exp_{argv[0]}-quick.json")]["experiment"] == argv[0]
    assert result["machine"]["cpus"] >= 1
    assert is_png(result["plot"])
    return result


# --------------------------------------------------------------------------- hashing

fids_of_slots = st.lists(st.tuples(st.integers(0, 40), st.integers(0, (1 << 48) - 1)),
                         min_size=1, max_size=300).map(
    lambda pairs: np.array([(s << 48) | h for s, h in pairs], dtype=np.uint64))


@settings(max_examples=60, deadline=None)
@given(fids=fids_of_slots, buckets=st.integers(1, 50), slot=st.integers(0, 40))
def test_hash_fids_maps_only_its_slot_into_m_buckets(fids, buckets, slot):
    hashed = hashing.hash_fids(fids, {slot: buckets})
    mine = (fids >> np.uint64(48)) == slot
    assert ((hashed >> np.uint64(48)) == (fids >> np.uint64(48))).all()   # slots kept
    assert (hashed[~mine] == fids[~mine]).all()                         # others untouched
    assert (hashed[mine] & np.uint64((1 << 48) - 1) < buckets).all()
    # a function of the fid: equal fids, equal buckets, in any batch
    again = hashing.hash_fids(fids[::-1], {slot: buckets})[::-1]
    assert (again == hashed).all()


@settings(max_examples=60, deadline=None)
@given(fids=fids_of_slots, buckets=st.integers(1, 400))
def test_collision_rate_is_the_share_of_ids_sharing_a_bucket(fids, buckets):
    unique = np.unique(fids)
    bucket = hashing.md5_buckets(unique, buckets)
    sharing = sum(1 for b in bucket if (bucket == b).sum() > 1)
    assert hashing.collision_rate(fids, buckets) == pytest.approx(sharing / unique.size)


def test_md5_buckets_are_md5_of_the_fid():
    import hashlib
    fid = (7 << 48) | 123456789
    digest = hashlib.md5(fid.to_bytes(8, "little")).digest()
    assert hashing.md5_buckets([fid], 1000)[0] == int.from_bytes(digest[:8], "little") % 1000


@pytest.mark.parametrize("ids,rate", [(943, 0.0773), (1682, 0.0286), (50_000, 0.3)])
def test_buckets_for_collision_rate_inverts_the_expected_rate(ids, rate):
    m = hashing.buckets_for_collision_rate(ids, rate)
    assert hashing.expected_collision_rate(ids, m) == pytest.approx(rate, rel=0.01)
    # and the measured rate of that many MD5-hashed ids is close to it
    fids = (np.uint64(1) << np.uint64(48)) | np.arange(ids, dtype=np.uint64)
    assert abs(hashing.collision_rate(fids, m) - rate) < 4 * math.sqrt(rate / ids) + 0.01


def test_hashing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="buckets"):
        hashing.md5_buckets([1], 0)
    with pytest.raises(ValueError, match="rate"):
        hashing.buckets_for_collision_rate(10, 1.5)


# --------------------------------------------------------------------------- experiments

@pytest.mark.slow
def test_collision_command_prints_one_json_object(workdir):
    """The command line itself, as docs/experiments.md gives it (in a subprocess)."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.experiments", "collision", "--json", "--quick",
         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = strict_loads(proc.stdout)          # stdout is the JSON object and nothing else
    strict_files(workdir)                       # and what it wrote, strict JSON too
    assert result["experiment"] == "collision" and is_png(result["plot"])
    r = result["datasets"]["synthetic"]
    assert r["train_examples"] + r["test_examples"] == r["examples"] > 0
    for slot in ("user", "item"):
        info = r["slots"][slot]
        assert info["collision_rate"]["collisionless"] == 0.0
        assert 0.0 < info["collision_rate"]["hashed"] < 0.3
        assert info["buckets"]["hashed"] > info["ids"] > 0
    assert r["slots"]["gender"]["collision_rate"]["hashed"] == 0.0   # not hashed
    for variant in ("collisionless", "hashed"):
        v = r["variants"][variant]
        assert len(v["test_auc_per_epoch"]) == r["epochs"] == 2
        assert all(in_auc_range(e["mean"]) for e in v["test_auc_per_epoch"])
        assert in_auc_range(v["online_auc"]["mean"])


@pytest.mark.slow
def test_sync_quick(workdir):
    r = run(workdir, "sync")["datasets"]["synthetic"]
    assert set(r["auc"]) == {"batch", "5h", "30min"}
    assert all(in_auc_range(v["mean"]) and v["n"] == 1 for v in r["auc"].values())
    assert r["batch_examples"] > r["online_examples"] > 0
    assert set(r["online_minus_batch"]) == {"5h", "30min"}
    assert in_auc_range(r["backfill_online_auc"]["mean"])


@pytest.mark.slow
def test_filter_quick(workdir):
    r = run(workdir, "filter")["datasets"]["synthetic-churn"]
    by = {(s["threshold"], s["expiry_s"]): s for s in r["settings"]}
    assert set(by) == {(0, None), (0, 21600), (5, None), (5, 21600)}
    for s in by.values():
        assert in_auc_range(s["online_auc"]) and s["examples"] == r["examples"] > 0
        assert s["rows_over_time"] and s["peak_mb"] > 0
    plain = by[(0, None)]
    assert plain["rows_evicted"] == 0 and plain["gradients_dropped_by_filter"] == 0
    assert plain["rows_final"] == plain["rows_peak"]         # nothing leaves the table
    # the filter keeps rare ids out; expiry takes departed ids out
    assert by[(5, None)]["rows_peak"] < plain["rows_peak"]
    assert by[(5, None)]["gradients_dropped_by_filter"] > 0
    assert by[(0, 21600)]["rows_evicted"] > 0
    assert by[(0, 21600)]["rows_final"] < plain["rows_final"]


@pytest.mark.slow
def test_peers_quick(workdir):
    argv = ["peers"] + ([] if os.path.exists(PEERS_PYTHON) else ["--no_river"])
    r = run(workdir, *argv)["datasets"]["synthetic"]
    peers = r["peers"]
    assert in_auc_range(peers["ours"]["online_auc"])
    assert peers["ours"]["examples"] == peers["keras_daily"]["examples"] == r["examples"]
    assert 0.0 <= peers["keras_daily"]["online_auc"] <= 1.0
    assert peers["keras_daily"]["days"] == 7
    for name in ("river_fm", "river_lr"):
        if os.path.exists(PEERS_PYTHON):
            assert 0.0 <= peers[name]["online_auc"] <= 1.0
        else:  # run with --no_river (no .venv-peers on this machine)
            assert peers[name]["skipped"] == "--no_river"
    assert all(p["examples_per_s"] > 0 for p in peers.values() if "online_auc" in p)
