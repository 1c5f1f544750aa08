"""Work that makes millions of small objects at once (a scan of a data folder, a rerun's plan)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run a block with Python's cyclic garbage collector paused (as it was found after). For blocks that make only
    acyclic objects (tuples, strings, dicts of them): reference counting frees those, and each full collection the
    block would otherwise trigger walks every object of the process. Measured on an up-to-date rerun over 1e6
    files: 11.4 s with the collector, 7.8 s paused; 0.4 s less again with the block's objects moved to the oldest
    generation at the end, where the young collections that follow do not walk them (a full one still can)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if not gc.get_freeze_count():  # (objects someone else froze stay frozen)
            gc.freeze()  # freeze, then unfreeze: every tracked object into the oldest generation, none traversed
            gc.unfreeze()
        if enabled:
            gc.enable()
