"""Put the memory a loaded engine computes from into 2 MB pages (``EngineOptions.huge_pages``).

A decode step streams about 500 MB of weights. In 4 KB pages that is 120,000 page-table
entries a token, and the hardware prefetchers stop at every 4 KB boundary. Many kernels,
this machine's included, give transparent huge pages only to memory that asks for them
(``/sys/kernel/mm/transparent_hugepage/enabled`` set to ``madvise``), and neither engine
asks: OpenVINO's CPU plugin copies the weights into blocks it allocates one tensor at a
time, and llama.cpp maps the GGUF file. (The numpy array that measures the bandwidth
ceiling does ask, so without this the engines are held to a ceiling read in huge pages.)

``madvise(MADV_COLLAPSE)`` (Linux 6.1 and later) rebuilds memory already in use as huge
pages, whatever that setting says unless it is ``never``. With the option, llama.cpp
reads the GGUF into its own memory instead of mapping it (file pages are the page
cache's to size), and once the engine has loaded and run its first inference every
private anonymous mapping of the process is collapsed.

It is opt-in: on the demo model it adds 1.3 s (OpenVINO) to 2.8 s (llama.cpp, which then
reads the whole file) to the load, for 6-7 % of decode (BENCHMARKS.md, "Huge pages"):
worth it for a server or a long session, not for a one-shot answer. Off Linux, before
Linux 6.1 or with huge pages disabled, nothing changes.
"""

from __future__ import annotations

from pathlib import Path

from qwenrt.runtimes.mapped_pages import advise

MADV_COLLAPSE = 25  # <sys/mman.h>, Linux 6.1 and later
HUGE_PAGE = 2 << 20


def private_anonymous_ranges() -> list[tuple[int, int]]:
    """The 2 MB-aligned stretches of this process's writable private anonymous mappings
    (the heap included; thread stacks, which the kernel never collapses, left out)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        # fields: address range, permissions (e.g. "rw-p"), offset, device, inode, and a
        # path, or a name in brackets ("[heap]"), or nothing for anonymous memory
        fields = line.split(maxsplit=5)
        name = fields[5] if len(fields) == 6 else ""
        if fields[1][:2] != "rw" or fields[1][3] != "p" or name == "[stack]" or not (name == "" or name[0] == "["):
            continue
        low, high = (int(address, 16) for address in fields[0].split("-"))
        start, end = -(-low // HUGE_PAGE) * HUGE_PAGE, high // HUGE_PAGE * HUGE_PAGE
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
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0
