"""The page cache seen from tests: how much of a file it holds, and emptying it."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_libc.mincore.restype = ctypes.c_int


def cached_pages(path: Path, offset: int, length: int) -> int:
    """How many pages of ``path`` in ``offset``..``+length`` the page cache holds: mincore on
    a mapping nobody touches, so looking brings nothing in (a read, even one refused with
    RWF_NOWAIT, starts readahead)."""
    page = mmap.PAGESIZE
    start = offset - offset % page
    span = offset + length - start
    pages = (span + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), start + span) as m:
        anchor = ctypes.c_char.from_buffer(m)
        try:
            if _libc.mincore(ctypes.addressof(anchor) + start, span, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            del anchor  # the mapping cannot close while a ctypes object exports it
    return sum(v & 1 for v in vec)


def evict(path: Path, offset: int, length: int, timeout: float = 3.0) -> None:
    """Write ``path`` back and drop its pages from the cache until none of ``offset``..
    ``+length`` is left. Pages a write just added can sit in another CPU's LRU batch where
    fadvise cannot reach them yet, hence the retries. Skips the test when the kernel keeps
    them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if cached_pages(path, offset, length) == 0:
                return
            if time.monotonic() > deadline:
                pytest.skip("the kernel kept the file's pages cached")
            time.sleep(0.01)
    finally:
        os.close(fd)


def until_refused(path: Path, offset: int, length: int, attempt: Callable[[], bool],
                  tries: int = 20) -> None:
    """Evict ``offset``..``+length`` of ``path`` and call ``attempt`` until it reports that
    the read had to wait (True). A read refused with RWF_NOWAIT still starts readahead, and a
    fast enough device can finish that before the kernel looks again, so one eviction does
    not always make a miss. Skips when none of ``tries`` does."""
    for _ in range(tries):
        evict(path, offset, length)
        if attempt():
            return
    pytest.skip("reads of evicted pages never had to wait on this device")
