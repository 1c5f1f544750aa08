"""Outputs that appear whole or not at all: a killed run never leaves half a file behind.

The one way this project writes a file: under a temporary name beside the target, fsynced, renamed into place, the
folder fsynced. Feature stores, journal parts, checkpoints, run directories and exports all go through it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(\.[^.]*)?$")


def temporary_path(path: Path) -> Path:
    """`.NAME.tmp-PID.SUFFIX` beside path: hidden, owned by this process, and with the suffix writers look at."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def writer_pid(temporary: Path) -> int | None:
    """The pid of the process that named a temporary file; None for another kind of file."""
    match = _TEMPORARY.match(temporary.name)
    return int(match.group(1)) if match else None


def writer_alive(temporary: Path) -> bool:
    """Whether the process that is writing a temporary file is still running."""
    pid = writer_pid(temporary)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and replaces `path` in one rename."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def strict_json(data) -> str:
    """JSON that every parser reads: NaN and infinities (a diverged lr-find rate, say) become null."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(data), indent=2, default=str, allow_nan=False)


def write_json(path: Path, data) -> None:
    """Write strict JSON atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(strict_json(data) + "\n")
