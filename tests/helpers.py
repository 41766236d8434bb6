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


def make_cell(**fields: object):
    """A compare cell with plausible figures, for tests of what reads cells; ``fields`` override them."""
    from qwenrt.compare.cells import Cell, CpuUse, Summary

    def summary(median: float) -> Summary:
        return Summary(median=median, p90=median, min=median, max=median, mean=median, stdev=0.0, n=1)

    values: dict = {
        "runtime": "gguf", "threads": 1, "scenario": "short", "label": None, "batch": 1,
        "settings": {"artifact": "model.gguf"}, "resolved": {}, "engine_defaults": False, "prompt_tokens": 10,
        "prompt_ids_sha256": "a", "generated_tokens": 4, "load_s": 0.5, "first_token_s": summary(0.05),
        "first_token_cached_s": None, "prefill_tps": summary(200.0), "decode_tps": summary(10.0),
        "inter_token_ms": summary(100.0), "end_to_end_s": summary(0.4),
        "cpu": CpuUse(summary(1.0), 100.0, 50.0, [100.0, 0.0]), "rss_after_load_bytes": 1, "peak_rss_bytes": 2,
        "rss_private_bytes": 1, "rss_file_backed_bytes": 1, "artifact_bytes": 1, "token_ids": [1, 2, 3, 4],
        "repeat": 1, "pid": 1,
    }  # fmt: skip
    values.update(fields)
    return Cell(**values)
