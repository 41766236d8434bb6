"""Helpers shared by the test modules."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder`` with its size, mtime and hash: equal snapshots mean nothing was rewritten."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, sha256(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def staging_folders(out: Path) -> list[Path]:
    """The staging folders a conversion into ``out`` makes beside it."""
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def kernel_collapses() -> bool:
    """Whether this kernel rebuilds memory in huge pages on MADV_COLLAPSE: Linux 6.1 and
    later, with transparent huge pages not switched off."""
    if platform.system() != "Linux":
        return False
    major, minor = (int(part) for part in platform.release().split(".")[:2])
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return (major, minor) >= (6, 1) and setting.exists() and "[never]" not in setting.read_text()


def anonymous_huge_page_bytes(pid: int) -> int:
    """Process ``pid``'s anonymous memory in transparent huge pages, as the kernel counts it."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no AnonHugePages line for process {pid}")
