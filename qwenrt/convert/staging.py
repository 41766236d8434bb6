"""Staging folders: where a conversion writes before it renames its work into place.

A staging folder sits beside its target, so the final rename stays on one file
system. A process killed outright (SIGKILL, power loss) cannot remove its own, so
each one records its owner, and the next run for the same target removes those
whose owner is gone. A folder another live conversion is writing in is left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from qwenrt.manifest import chmod_like_new

OWNER_FILE = ".qwenrt-owner.json"
# A folder with no owner record is either from before records existed or caught in the
# instant between its creation and the record's: old enough, it is from a dead run.
UNOWNED_GRACE_SECONDS = 3600


def staging_prefix(target: Path) -> str:
    return f".{target.name}.partial-"


def make_staging(target: Path) -> Path:
    """A new, owned staging folder beside ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=staging_prefix(target)))
    chmod_like_new(staging)
    (staging / OWNER_FILE).write_text(json.dumps(_owner()), encoding="utf-8")
    return staging


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the staging folders of ``target`` left by dead processes; returns them."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for folder in sorted(target.parent.glob(staging_prefix(target) + "*")):
        if folder.is_dir() and _is_stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _owner() -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def _is_stale(folder: Path) -> bool:
    import psutil

    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        host, pid, started = owner["host"], int(owner["pid"]), float(owner["started"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            return time.time() - folder.stat().st_mtime > UNOWNED_GRACE_SECONDS
        except OSError:
            return False
    if host != socket.gethostname():
        return False  # a shared file system: another machine's processes are out of sight
    try:
        # A recycled pid belongs to a process that started later than the owner did.
        return abs(psutil.Process(pid).create_time() - started) > 1.0
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False
