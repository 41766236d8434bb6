"""Hand back to the kernel the resident pages of a mapped weights file that nothing reads any more.

OpenVINO's CPU plugin maps the IR's ``.bin`` and, on the first inference, copies every
weight into its own blocked layout; from then on it computes on the copies and reads the
mapping only for token-embedding rows. The pages read for the copy stay in the process's
resident set all the same, nearly the whole IR beside the copies (BENCHMARKS.md, "What the
resident memory is made of").

``madvise(MADV_PAGEOUT)`` on those pages reclaims them without losing anything: the
data stays in the file (the kernel may keep it in the page cache), and a page read again
is mapped back on access. PAGEOUT rather than DONTNEED because it never discards data,
whatever the range holds: if the engine unmapped the file and something else were mapped
at the same address between reading /proc/self/maps and the call, DONTNEED would zero that
memory, while PAGEOUT would at most swap it out. Only read-only shared mappings of the
file are advised all the same. PAGEOUT is best effort: a page faulted in a moment ago may
still wait in a CPU's LRU batch, where the kernel cannot take it yet, so a few pages (tens
of pages) can stay resident until the next release. Off Linux (no /proc/self/maps),
or before Linux 5.4 (no MADV_PAGEOUT), nothing is released and the engines run as they
would without it.

The same first inference also leaves free memory inside the C library's heap: the plugin
builds its copies on several threads, each with its own malloc arena, and what they free
there stays resident. glibc's ``malloc_trim`` hands those pages back, done beside each
release, at no cost in load time or decode speed (BENCHMARKS.md, "Giving back the load's
free heap").
llama.cpp allocates its buffers once, at load, and is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from qwenrt import procfs

MADV_PAGEOUT = 21  # <sys/mman.h>, Linux 5.4 and later
TRIM_INTERVAL_S = 0.02

_madvise: Callable[[int, int, int], int] | None = None


def libc_madvise() -> Callable[[int, int, int], int]:
    """The C library's ``madvise(address, length, advice)``, which returns 0 on success."""
    global _madvise
    if _madvise is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        _madvise = libc.madvise
    return _madvise


def trim_heap() -> bool:
    """Give the C library's free heap memory back to the kernel (glibc's ``malloc_trim(0)``).

    Returns whether it did: False where there is no glibc (musl, macOS, Windows), and
    where glibc found nothing to give back.
    """
    trim = _glibc_malloc_trim()
    return trim is not None and trim(0) == 1


@functools.cache
def _glibc_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is None:  # a C library other than glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def advise(ranges: list[tuple[int, int]], advice: int) -> int:
    """``madvise`` each address range; how many bytes of them the kernel took the advice for.

    A range it refuses (unmapped since /proc was read, or unsuited to the advice) fails
    alone and is left as it was.
    """
    if not ranges:  # nothing to ask, so no C library to load (there may be none: not Linux)
        return 0
    call = libc_madvise()
    return sum(end - start for start, end in ranges if call(start, end - start, advice) == 0)


def shared_read_only_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` read-only and shared."""
    target = os.path.realpath(path)
    return [
        (m.start, m.end) for m in procfs.mappings() if m.name == target and m.permissions[1] == "-" and not m.private
    ]


def release(path: Path) -> int:
    """Drop this process's resident pages of ``path``'s read-only shared mappings.

    Returns how many bytes of mappings were advised (0 when there are none).
    """
    return advise(shared_read_only_mappings(path), MADV_PAGEOUT)


def resident_bytes(path: Path) -> int:
    """This process's resident pages of every mapping of ``path``."""
    return procfs.resident_bytes_of(path)


@contextlib.contextmanager
def released_while_running(path: Path, interval_s: float = TRIM_INTERVAL_S) -> Iterator[None]:
    """Keep releasing ``path``'s pages, and the heap's free ones, every ``interval_s`` during
    the block, and once after it.

    For a block that reads the whole file once (OpenVINO's first inference): without it,
    every page read would stay resident until the block ends, and the peak would hold the
    file and the engine's copy of it at once.
    """
    stop = threading.Event()

    def give_back() -> None:
        release(path)
        trim_heap()

    def trim() -> None:
        while not stop.wait(interval_s):
            give_back()

    trimmer = threading.Thread(target=trim, name="qwenrt-page-trimmer", daemon=True)
    trimmer.start()
    try:
        yield
    finally:
        stop.set()
        trimmer.join()
        give_back()
