"""The process's memory: keep freed memory for reuse, and count the bytes in use (glibc's
allocator; elsewhere the first does nothing and the second reads the resident set size).

By default glibc hands every large block (a detector's 17k x 256 token maps are 18 MB) back
to the system when it is freed, so the next one is mapped afresh and pays a page fault per
4 kB on first touch: about 7 ms per such tensor on the development machine, 15-20% of a
Sparse DETR forward pass. Serving large blocks from the heap and not trimming it removes
that cost; the process keeps its peak memory, which a training or benchmark run does anyway."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None:
            libc.mallopt, libc.mallinfo2  # noqa: B018 (glibc only; mallinfo2 from 2.33)
            libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):  # not glibc (macOS, musl) or an old one
        return None
    return libc


def allocated_bytes() -> int:
    """Bytes the allocator has handed out and not taken back (glibc), else the resident set
    size. Unlike the resident set, this falls when memory is freed but kept for reuse."""
    libc = _glibc()
    if libc is not None:
        info = libc.mallinfo2()
        return info.uordblks + info.hblkhd
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reuse_freed_memory() -> bool:
    """True when glibc accepted the settings."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    ok = mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MB from the heap
    ok &= mallopt(_M_TRIM_THRESHOLD, 4 << 30)
    ok &= mallopt(_M_TOP_PAD, 256 << 20)
    return bool(ok)
