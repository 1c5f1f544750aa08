"""One partition file: how it is opened (a regular file, never followed or waited on), what identifies it, how a
damaged one is set aside and a dropped one deleted.

A partition is immutable once renamed into place, and says who it is: a random `uid` written with it, which the
root records for every partition it maps. A partition of another store put in its place (even one of the same
feature set, named alike) carries another uid, so the root and its partitions agree or the store is damaged.
"""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from pathlib import Path

import h5py

UID = "uid"  # the partition's attribute


def new_uid() -> str:
    return uuid.uuid4().hex


def partition_id(f: h5py.File) -> str:
    """What identifies a partition: its uid, or for one written before uids (and a version-1 file taken over) a
    digest of what tells its rows apart cheaply: each string column's digest (its paths, in order) and each split's
    row count and first and last content hashes (the same files featurized into another store would be the same
    rows; other files differ there). Reads a few values, never a column of numbers."""
    if UID in f.attrs:
        value = f.attrs[UID]
        return value.decode() if isinstance(value, bytes) else str(value)
    parts: list[str] = []

    def visit(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        if "sha256" in obj.attrs:
            parts.append(f"{name}={obj.attrs['sha256']}")
        elif name.rsplit("/", 1)[-1] == "sha256" and len(obj):
            parts.append(f"{name}={len(obj)}:{bytes(obj[0]).hex()}:{bytes(obj[-1]).hex()}")

    f.visititems(visit)
    return "digest:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def open_partition_file(path: Path) -> h5py.File:
    """A partition opened read-only, after checking that the path is a regular file (a FIFO would block the open
    for good, a folder or link is no partition): OSError otherwise, as for a file HDF5 cannot open."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path.name} is not a regular file")
    return h5py.File(path, "r", locking=False)


def set_aside(path: Path) -> str:
    """Rename a damaged partition to NAME.damaged (kept for a person to look at, never read again); its new name.
    Another shard of the same run may have done it first."""
    aside = path.with_name(path.name + ".damaged")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        pass
    return aside.name


def delete(path: Path) -> None:
    """A partition no root maps, nor will: gone (a reader still holding it keeps its open file)."""
    path.unlink(missing_ok=True)
