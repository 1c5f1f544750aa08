"""Process-wide settings that decide CPU throughput: the allocator, and how cores are shared."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_tuned = False


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the kernel after every batch.

    Without this the forward pass's large activation buffers are mmapped and unmapped each batch, and about half
    of the CPU time goes to page faults. Returns False where the C library is not glibc.
    """
    global _tuned
    if _tuned:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
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
