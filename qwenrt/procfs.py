"""What Linux says of this process and this CPU in /proc, read in one place.

Off Linux (no /proc), every reader answers as if there were nothing to read: no
mappings, no fields, an unknown CPU. Standard library only: the build of qwenrt's
native packages reads the CPU before anything else is installed.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def _lines(name: str) -> list[str]:
    try:
        return (PROC / name).read_text().splitlines()
    except OSError:
        return []


@dataclass(frozen=True)
class Mapping:
    """One line of /proc/self/maps."""

    start: int
    end: int
    permissions: str  # e.g. "r--s", "rw-p"
    name: str  # a path, a name in brackets ("[heap]"), or "" for anonymous memory

    @property
    def private(self) -> bool:
        return self.permissions[3] == "p"

    @property
    def anonymous(self) -> bool:
        """Memory of no file: unnamed, or a kernel name such as [heap]."""
        return self.name == "" or self.name.startswith("[")


def _mapping(line: str) -> Mapping:
    # fields: address range, permissions, offset, device, inode, and a path or name (or nothing)
    fields = line.split(maxsplit=5)
    start, end = (int(address, 16) for address in fields[0].split("-"))
    return Mapping(start, end, fields[1], fields[5] if len(fields) == 6 else "")


def mappings() -> list[Mapping]:
    """This process's memory mappings."""
    return [_mapping(line) for line in _lines("self/maps")]


def resident_bytes_of(path: Path) -> int:
    """This process's resident pages of every mapping of ``path`` (from /proc/self/smaps)."""
    target = os.path.realpath(path)
    total, inside = 0, False
    for line in _lines("self/smaps"):
        fields = line.split(maxsplit=5)
        if fields and not fields[0].endswith(":"):  # a mapping's header line, as in /proc/self/maps
            inside = len(fields) == 6 and fields[5] == target
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def _kilobyte_fields(name: str, wanted: tuple[str, ...]) -> dict[str, int | None]:
    """``Field:  123 kB`` lines of a /proc file, in bytes (None: not there)."""
    found: dict[str, int | None] = dict.fromkeys(wanted)
    for line in _lines(name):
        field, _, value = line.partition(":")
        if field in found and value.split():
            found[field] = int(value.split()[0]) * 1024
    return found


def status_bytes(*fields: str) -> dict[str, int | None]:
    """Memory fields of /proc/self/status (VmHWM, RssAnon, RssFile, ...), in bytes."""
    return _kilobyte_fields("self/status", fields)


def smaps_rollup_bytes(*fields: str) -> dict[str, int | None]:
    """Fields of /proc/self/smaps_rollup (AnonHugePages, ...), in bytes."""
    return _kilobyte_fields("self/smaps_rollup", fields)


def peak_rss_bytes() -> int:
    """This process's peak resident memory.

    Linux's VmHWM starts afresh at exec; getrusage's ru_maxrss does not, and reports the
    parent's peak for a process started from a larger one (a compare worker, a conversion
    started from a big test process).
    """
    peak = status_bytes("VmHWM")["VmHWM"]
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpuinfo() -> tuple[str, frozenset[str]]:
    """The CPU's model name and its feature flags ("" and none where unknown)."""
    model, flags = "", frozenset()
    for line in _lines("cpuinfo"):
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and not model:
            model = value.strip()
        elif name in ("flags", "Features") and not flags:  # x86, ARM
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags
