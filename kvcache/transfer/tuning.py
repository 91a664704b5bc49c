"""Process-wide settings that make bulk KV transfers cheaper; the worker opts in at start-up.

:func:`tune_malloc` keeps glibc's allocator from handing multi-megabyte buffers back to the
kernel after every use. gRPC (and Python's ``bytes``) allocate and free a buffer per chunk;
with glibc's defaults a free of a large buffer unmaps or trims it, and the next allocation
faults every page back in, zeroed by the kernel: measured here, a quarter of a gRPC puller's
CPU time went to those page faults. With allocations up to ``mmap_threshold`` served from the
heap and up to ``trim_threshold`` of free heap kept, the buffers are reused.

The cost is memory the process keeps after a burst (at most ``trim_threshold`` per malloc
arena beyond what it uses). It changes the whole process, so nothing in ``kvcache.transfer``
calls it on import: a worker serving or pulling KV over gRPC calls it once at start-up
(``orchestrator/worker_actor.py`` does, before building the engine; the benchmark does in
both of its processes). On a platform without glibc it does nothing.

Safe for the engine too: tensors larger than ``mmap_threshold`` (the KV cache, weights) are
still mapped on their own; smaller ones (activations) now come from the heap and their pages
are reused instead of being faulted in again each step. What it costs is only the retained
free heap above.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_CLASSIC_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX of 64-bit glibc


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Apply the allocator settings above; True when glibc accepted them."""
    if not 0 < mmap_threshold <= 1 << 30 or not 0 < trim_threshold <= 1 << 31:
        raise ValueError("mmap_threshold and trim_threshold must be positive byte counts "
                         "(at most 1 GiB and 2 GiB)")
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    trimmed = bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    # glibc refuses an mmap threshold above half its largest heap (32 MiB on 64-bit builds
    # before 2.35): settle for that rather than for nothing
    mapped = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) or (
        mmap_threshold > _CLASSIC_MAX and bool(mallopt(_M_MMAP_THRESHOLD, _CLASSIC_MAX)))
    return trimmed and mapped
