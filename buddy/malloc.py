"""glibc's allocator in a worker process: the memory of a large answer goes back to the system once it is freed.

glibc gives an allocation of 128 KiB or more a mapping of its own, unmapped when it is freed; but each time such a
block is freed it raises that threshold to the block's size (up to 32 MiB). After the first 10 MB body, every later
one comes from the heap instead: from the arena of the thread that asked (glibc makes up to 8 per core, and a
worker has 64 threads), and an arena keeps what is freed inside it for its next allocations. Twenty 10 MB bodies
left a worker 50-140 MB larger for good (`python bench/memory.py`).

So each gunicorn worker (`tune`, from the post_fork hook):
- fixes the threshold at MMAP_THRESHOLD (mallopt M_MMAP_THRESHOLD, which also stops glibc raising it): a body, a
  compressed blob, a piece of one read from Redis (buddy.store.pieces), each has a mapping of its own, returned
  to the system as soon as it is freed;
- gives back what the arenas hold free (malloc_trim) whenever, at a look every TRIM_EVERY seconds, they hold
  TRIM_FREE bytes more than at the last look that trimmed (or the emptiest since): what smaller buffers (64 KB
  chunks of a body on their way through) leave behind, spread over many arenas, each too fragmented for glibc to
  give back by itself.

`BUDDY_MALLOC=glibc` leaves glibc's defaults (the baseline bench/memory.py compares with). Not glibc (musl,
macOS): nothing is done. An embedded proxy (CachingProxy) runs in its caller's process and leaves it alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
from typing import Any

from buddy.background import IDLE, ProcessThread

log = logging.getLogger("buddy.malloc")

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024  # bytes: an allocation past this has a mapping of its own (glibc starts at 128 KiB)
TRIM_EVERY = 2.0  # seconds between looks at what the arenas hold free
TRIM_FREE = 8 * 1024 * 1024  # bytes held free, beyond what the last trim left, that are worth a trim
TRIM_THREAD = "buddy-malloc-trim"


_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


class _MallInfo(ctypes.Structure):  # glibc before 2.33: the same fields as int (read as unsigned)
    _fields_ = [(name, ctypes.c_uint) for name in _FIELDS]


def glibc() -> ctypes.CDLL | None:
    """This process's glibc, or None when it runs on another C library."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except (AttributeError, OSError, ValueError):  # no confstr (not POSIX), no such name, no library
        return None


def wanted() -> bool:
    """False when BUDDY_MALLOC=glibc asks for glibc's own behaviour."""
    return os.environ.get("BUDDY_MALLOC", "").strip().lower() != "glibc"


class Trimmer:
    """Gives back the free memory the arenas hold, a look every TRIM_EVERY seconds (see the module)."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self.libc = libc
        info = getattr(libc, "mallinfo2", None)
        self._info = info if info is not None else libc.mallinfo
        self._info.restype = _MallInfo2 if info is not None else _MallInfo
        self._info.argtypes = []
        self.libc.malloc_trim.argtypes, self.libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        self.trims = 0
        self.thread = ProcessThread(TRIM_THREAD, self._run)

    def free_bytes(self) -> int:
        """What the arenas hold free (mallinfo's fordblks): freed, kept for later allocations."""
        return int(self._info().fordblks)

    def _run(self, stopping: threading.Event) -> None:
        floor = self.free_bytes()
        while not stopping.wait(TRIM_EVERY):
            free = self.free_bytes()
            if free - floor >= TRIM_FREE:
                self.libc.malloc_trim(0)  # (ctypes lets go of the GIL: requests go on meanwhile)
                self.trims += 1
                floor = free  # its pages are given back, its chunks still count as free
            else:
                floor = min(floor, free)


_trimmer: Trimmer | None = None


def tune() -> bool:
    """In a worker process: large allocations in mappings of their own, the arenas trimmed (see the module).
    True when it is done; False for BUDDY_MALLOC=glibc, another C library, or a glibc that refused it."""
    global _trimmer
    if not wanted():
        return False
    libc = glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The trim threshold is glibc's own rule for the top of the main heap, tied to the mmap threshold (x2) only
    # while glibc moves that.
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD) != 1:
        log.info("glibc refused the allocator settings; memory of large answers may stay with the worker")
        return False
    if _trimmer is None:
        _trimmer = Trimmer(libc)
    _trimmer.thread.ensure()
    return True


class TrimWatch:
    """This process's trimmer thread as /admin/health shows it: idle where nothing trims (not a gunicorn worker,
    BUDDY_MALLOC=glibc, another C library)."""

    name = TRIM_THREAD

    def report(self) -> dict[str, Any]:
        if _trimmer is None:
            return {"name": self.name, "state": IDLE, "restarts": 0}
        return _trimmer.thread.report()
