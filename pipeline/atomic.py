"""Outputs that appear whole or not at all: a killed run never leaves half a file behind."""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
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
