"""Helpers shared by the test modules."""

from __future__ import annotations

import hashlib
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
