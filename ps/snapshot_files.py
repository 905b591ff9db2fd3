"""PS snapshot files: a PS key's whole state in a file, written at the end of a backfill and
read by the online job it starts (DESIGN §4, path b).

A file ``<kind>-<key>.snap`` is a ``ps.envelope`` of kind ``"snapshot"``: its JSON header is the
file's metadata (``kind``: ``"sparse"`` or ``"dense"``, ``key``, ``seq``, ``ts_ms``,
``num_shards``, ``totals``) and its payload the key's state as the shard keeps it in Beam state
(an envelope of kind ``"sparse-state"`` or ``"dense-state"``). The envelope's checksum covers the
header too, so a damaged shard count or event time is refused like a damaged weight.
Files are written atomically (a temporary file, fsync, rename).

>>> import os, tempfile
>>> folder = tempfile.mkdtemp()
>>> path = os.path.join(folder, "dense-dense.snap")
>>> write_snapshot(path, b"state", {"kind": "dense", "key": "dense"})
>>> read_snapshot(path)
({'key': 'dense', 'kind': 'dense'}, b'state')
>>> check_restore_dir(folder, "dense") == [path]
True
>>> with open(path, "r+b") as f:
...     _ = f.seek(-1, 2); _ = f.write(b"!")
>>> try:
...     check_restore_dir(folder, "dense")
... except SnapshotFileError as e:
...     print(str(e).replace(folder, "DIR"))
PS snapshot DIR/dense-dense.snap is corrupted (checksum mismatch)
"""
from __future__ import annotations

import glob
import os
import secrets

from ps.envelope import SnapshotError, open_envelope, seal

__all__ = ["write_snapshot", "read_snapshot", "check_restore_dir", "SnapshotFileError"]


class SnapshotFileError(SnapshotError):
    """A PS snapshot file is missing, truncated, corrupted or of another kind (a
    ``ps.SnapshotError``, like a damaged table snapshot inside it)."""


def write_snapshot(path: str, payload: bytes, meta: dict) -> None:
    """Write a snapshot file atomically.

    Args:
        path: the file to write (replaced whole, never seen half-written).
        payload: the key's state (a shard's base encoding).
        meta: the file's JSON-able metadata (``kind``, ``key``, ...).
    """
    data = seal("snapshot", dict(sorted(meta.items())), payload)
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_snapshot(path: str) -> tuple:
    """Read and check a snapshot file.

    Args:
        path: the file.

    Returns:
        ``(meta, payload)``: the metadata dict and the state's bytes.

    Raises:
        SnapshotFileError: the file cannot be read, or is damaged or not a PS snapshot; the
            message names the file and what is wrong.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SnapshotFileError(f"cannot read PS snapshot {path}: {e}") from e
    try:
        envelope = open_envelope(data, "snapshot", source=path)
    except SnapshotError as e:
        raise SnapshotFileError(str(e)) from None
    return envelope.header, bytes(envelope.payload)


def check_restore_dir(restore_dir: str, kind: str) -> list:
    """The ``kind-*.snap`` files of ``restore_dir``, each read whole and checked.

    Args:
        restore_dir: the ``--export_dir`` of a finished backfill.
        kind: ``"sparse"`` or ``"dense"``.

    Returns:
        The files' paths, sorted.

    Raises:
        SnapshotFileError: naming the file if one is damaged or of another kind, and if there
            is none (a mistyped ``--restore`` must not start a job cold).
    """
    paths = sorted(glob.glob(os.path.join(glob.escape(restore_dir), f"{kind}-*.snap")))
    if not paths:
        raise SnapshotFileError(f"restore directory {restore_dir} holds no {kind}-*.snap PS "
                                f"snapshot (it must be the --export_dir of a finished backfill)")
    for path in paths:
        meta, _ = read_snapshot(path)
        if meta.get("kind") != kind:
            raise SnapshotFileError(f"{path} holds a {meta.get('kind')!r} snapshot, not {kind!r}")
    return paths
