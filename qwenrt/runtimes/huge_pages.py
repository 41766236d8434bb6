"""Put the memory a loaded engine computes from into 2 MB pages (``EngineOptions.huge_pages``).

A decode step streams every weight. In 4 KB pages that is a page-table entry for each
4 KB of them at every token, and the hardware prefetchers stop at every 4 KB boundary. Many kernels,
this machine's included, give transparent huge pages only to memory that asks for them
(``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``madvise``), and neither engine
asks: OpenVINO's CPU plugin copies the weights into blocks it allocates one tensor at a
time, and llama.cpp maps the GGUF file. (The numpy array that measures the bandwidth
ceiling does ask, so without this the engines are held to a ceiling read in huge pages.)

``madvise(MADV_COLLAPSE)`` (Linux 6.1 and later) rebuilds memory already in use as huge
pages, whatever that setting says unless it is ``never``. With the option, llama.cpp
reads the GGUF into its own memory instead of mapping it (file pages are the page
cache's to size) unless it computes from its own AMX copy of them, and once the engine
has loaded every private anonymous mapping of the process is collapsed.

It is opt-in: it adds seconds to the load (llama.cpp then reads the whole file) for a few
per cent of decode (BENCHMARKS.md, "Huge pages"): worth it for a server or a long session,
not for a one-shot answer. Off Linux, before
Linux 6.1 or with huge pages disabled, nothing changes.
"""

from __future__ import annotations

from qwenrt import procfs
from qwenrt.runtimes.mapped_pages import advise

MADV_COLLAPSE = 25  # <sys/mman.h>, Linux 6.1 and later
HUGE_PAGE = 2 << 20


def private_anonymous_ranges() -> list[tuple[int, int]]:
    """The 2 MB-aligned stretches of this process's writable private anonymous mappings
    (the heap included; thread stacks, which the kernel never collapses, left out)."""
    ranges = []
    for mapping in procfs.mappings():
        if mapping.permissions[:2] != "rw" or not mapping.private or not mapping.anonymous or mapping.name == "[stack]":
            continue
        start, end = -(-mapping.start // HUGE_PAGE) * HUGE_PAGE, mapping.end // HUGE_PAGE * HUGE_PAGE
        if end > start:
            ranges.append((start, end))
    return ranges


def collapse() -> int:
    """Rebuild this process's private anonymous memory in huge pages, where the kernel can.

    Returns how many bytes of mappings the kernel collapsed (0 where it collapses none).
    """
    # A mapping marked no-huge-page, or one unmapped since /proc was read, stays as it was.
    return advise(private_anonymous_ranges(), MADV_COLLAPSE)


def huge_page_bytes() -> int:
    """This process's anonymous memory in transparent huge pages (from /proc/self/smaps_rollup)."""
    return procfs.smaps_rollup_bytes("AnonHugePages")["AnonHugePages"] or 0
