"""Process-wide settings that decide CPU throughput, made once and visibly: configure_process() at the entry point;
library calls take their thread count as a parameter and hand the process back as they found it."""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
_tuned = False


def configure_process(forward: bool = True) -> None:
    """The settings this project measured best on the CPU, for the whole process: call it first thing (the CLI does,
    for each command).

    - OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning, so DALI's decode threads get the
      cores (featurize 10 % faster on 2 cores). Read by torch when it is first imported: set it before.
    - forward: the process runs a backbone's forward pass (featurize, predict, fine-tune): glibc keeps freed memory
      in its heap (tune_allocator). A process that only works on cached features passes False: its large blocks go
      back to the kernel when freed, so that what it holds is what it uses (train-head stays within --max-memory).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    tune_allocator(keep_freed=forward)


@contextmanager
def torch_threads(count: int | None) -> Iterator[int]:
    """Run a block with torch's intra-op pool at `count` threads (None: every core this process may use), then put
    the caller's setting back."""
    import torch

    before = torch.get_num_threads()
    count = max(1, count or cpu_count())
    torch.set_num_threads(count)
    try:
        yield count
    finally:
        torch.set_num_threads(before)


def tune_allocator(keep_freed: bool = True) -> bool:
    """Set how glibc's allocator treats large blocks, for the whole process. Returns False where the C library is
    not glibc.

    keep_freed: freed memory stays in the heap instead of going back to the kernel after every batch. Without it the
    forward pass's large activation buffers are mmapped and unmapped each batch, and about half of the CPU time
    goes to page faults. Otherwise blocks of 64 MB and more are mapped on their own and returned when freed, and
    the heap is trimmed beyond 64 MB free: train-head held 0.2-0.4 GB less at 1e5-1e6 streamed rows than with the
    heap kept, for 0-20 % more time (measured; 4 MB blocks held 0.2 GB less again and took 1.5-2x as long).
    A forward pass keeps its blocks only in the main heap: a thread's own arena is at most 64 MB, so larger blocks
    are mapped and unmapped every batch whatever the thresholds. Such processes use one arena for every thread (a
    Ray actor runs its batches on a pool thread: Lite0's forward took 0.25 s a batch there against 0.17 s on the
    main thread, and the same with one arena).
    """
    global _tuned
    if _tuned:
        return True
    try:
        # The symbols already linked into this process: ctypes.util.find_library would run ldconfig in a child.
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mmap, trim = ((1 << 30), (1 << 31) - 1) if keep_freed else (64 << 20, 64 << 20)
    ok = mallopt(M_MMAP_THRESHOLD, mmap) == 1 and mallopt(M_TRIM_THRESHOLD, trim) == 1
    if keep_freed:  # one heap for every thread: see the docstring
        ok = ok and mallopt(M_ARENA_MAX, 1) == 1
    _tuned = ok
    return ok


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks and container limits where visible)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def available_memory() -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), else physical memory."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# nvImageCodec, DALI's image decoder, prints every file it cannot decode on the process's stderr from C++, coloured:
#   "\x1b[0;31m[ERROR] \x1b[0m[libjpeg_turbo_decoder] Could not decode jpeg code stream - Premature end of ..."
# DALI_NVIMGCODEC_LOG_LEVEL cannot silence it (it is clamped to 1..5, and 1 still prints errors). The commands that
# decode report each such file once, with its reason: these raw lines are dropped.
DECODER_LINE = re.compile(rb"^(\x1b\[[0-9;]*m)*\[(ERROR|WARNING)\] *(\x1b\[[0-9;]*m)*\[[A-Za-z0-9_]*decoder\]")
_filtering = False


def drop_decoder_lines() -> None:
    """Route file descriptor 2, where native libraries write, through a thread that drops DECODER_LINE lines and
    passes every other byte on; Python's own sys.stderr writes to the original stream directly (rich still sees
    the terminal). Undone at exit, after the last native line is passed on. For commands that start no child
    process (a child would inherit the pipe)."""
    global _filtering
    if _filtering:
        return
    _filtering = True
    sys.stderr.flush()
    original = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    encoding, errors = sys.stderr.encoding, sys.stderr.errors
    sys.stderr = open(original, "w", encoding=encoding, errors=errors, buffering=1, closefd=False)  # noqa: SIM115
    thread = threading.Thread(target=_pass_on, args=(read, original), name="native-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last writer closes: the thread reads to its end
        thread.join(timeout=2)

    atexit.register(restore)


def _pass_on(read: int, original: int) -> None:
    pending = b""
    while chunk := os.read(read, 65536):
        *lines, pending = (pending + chunk).split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not DECODER_LINE.match(line))
        if kept:
            os.write(original, kept)
    if pending and not DECODER_LINE.match(pending):
        os.write(original, pending)
    os.close(read)
