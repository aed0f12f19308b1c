"""glibc malloc settings for the orchestrator process: large buffers returned to the OS when
freed, and the worker threads sharing two malloc arenas, so that its memory does not grow
with the number of sites (``bench/RESULTS.md`` §2). Elsewhere (musl, macOS) nothing applies.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

MALLOC_MMAP_THRESHOLD = 256 << 10
MALLOC_ARENA_MAX = 2
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8


def _mallopt() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def return_large_buffers_to_os(threshold: int = MALLOC_MMAP_THRESHOLD) -> bool:
    """Serve every allocation of ``threshold`` bytes or more with its own mmap, unmapped when
    it is freed (glibc only; returns whether it applied).

    glibc starts at 128 KiB but raises the threshold to the size of each mmapped block freed
    (up to 32 MiB), so after the first round model blobs, updates and transfer buffers come
    from the heap of the malloc arena of whichever gRPC worker thread allocated them (up to 8
    arenas per core), and each arena keeps what it freed. With one worker thread per site,
    the orchestrator's RSS then grew with the number of sites (about 1 MiB per site at 200
    sites with a 1M-parameter model) even though only a few updates are alive at a time.
    A fixed threshold also turns off that adjustment. Transfer chunks (128 KiB) stay below it.
    """
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold))


def share_malloc_arenas(arena_max: int = MALLOC_ARENA_MAX) -> bool:
    """Let all threads share at most ``arena_max`` malloc arenas (glibc only; returns whether
    it applied). Call it before the worker threads start: arenas already made stay.

    glibc gives each new thread its own arena until there are 8 per core, and each arena
    keeps the high-water mark of what its threads allocated below the mmap threshold (gRPC's
    buffers, transfer chunks, protobuf messages). With a worker thread per site, that makes the
    orchestrator's RSS grow by 6–9% of the model per site; with two shared arenas it stays
    flat (``bench/RESULTS.md`` §2). Worker threads mostly wait on the network or the GIL, so
    sharing arenas costs no measurable time.
    """
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, arena_max))
