"""Run every cell of a comparison in its own process, and gather what they measured."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from qwenrt import __version__
from qwenrt.child import run_child
from qwenrt.compare.ceiling import add_decode_ceilings, bandwidth_by_threads, has_ceiling
from qwenrt.compare.measure import CellSpec
from qwenrt.manifest import read_manifest
from qwenrt.runtimes.threads import physical_cores

SCHEMA = "qwenrt.compare/1"
ENGINE_PACKAGES = ["llama-cpp-python", "openvino", "openvino-genai", "openvino-tokenizers"]


def run_comparison(
    specs: list[CellSpec],
    *,
    timeout_s: float = 900.0,
    progress: Callable[[str], None] = lambda _: None,
    kind: str = "comparison",
) -> dict[str, Any]:
    """Measure each spec in a fresh process; Ctrl-C stops and returns the cells finished so far.

    ``kind`` tells a report how to lay the cells out: side by side, or as the ladder's steps."""
    cells: list[dict[str, Any]] = []
    interrupted = False
    # Read before the cells as well as after: a busy moment on the machine only lowers a reading.
    ceiling_threads = {spec.threads for spec in specs if has_ceiling(spec.runtime, spec.batch)}
    if ceiling_threads:
        progress("memory read bandwidth, for the decode ceiling")
    before = bandwidth_by_threads(ceiling_threads)
    for index, spec in enumerate(specs, start=1):
        label = f"[{index}/{len(specs)}] " + (
            spec.label or f"{spec.runtime} × {spec.threads} thread{'s' if spec.threads > 1 else ''}"
        )
        try:
            cells.append(_run_in_process(spec, timeout_s, lambda text, label=label: progress(f"{label}: {text}")))
        except KeyboardInterrupt:
            interrupted = True
            break
    bandwidth: dict[str, float] = {}
    if cells and not interrupted:
        progress("memory read bandwidth, for the decode ceiling")
        try:
            bandwidth = add_decode_ceilings(cells, before)
        except KeyboardInterrupt:
            interrupted = True  # the cells keep their results, without ceilings
            for cell in cells:
                cell.pop("decode_ceiling", None)
    return {
        "schema": SCHEMA,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qwenrt_version": __version__,
        "interrupted": interrupted,
        "environment": environment(Path(specs[0].model_dir)) if specs else {},
        "settings": {k: v for k, v in asdict(specs[0]).items() if k not in ("runtime", "threads")} if specs else {},
        "cells": cells,
        "memory_bandwidth_bytes_per_s": bandwidth,  # by thread count
        "agreement": agreement(cells),
    }


def _run_in_process(spec: CellSpec, timeout_s: float, progress: Callable[[str], None]) -> dict[str, Any]:
    """One cell in a fresh worker; whatever happens to the worker (an error, a native crash,
    a hang past ``timeout_s``) comes back as the cell's failure with its reason."""
    outcome = run_child("qwenrt.compare.worker", asdict(spec), timeout_s=timeout_s, progress=progress)
    if outcome.ok:
        return outcome.result
    if outcome.crash and outcome.crash.startswith("timed out"):
        return _failed(spec, f"timed out after {timeout_s:g} s (the limit per cell, --timeout); stopped")
    return _failed(spec, outcome.reason())


def _failed(spec: CellSpec, reason: str) -> dict[str, Any]:
    return {"runtime": spec.runtime, "threads": spec.threads, "scenario": spec.conversation().name,
            "label": spec.label, "status": "failed", "error": reason}  # fmt: skip


def agreement(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How far the engines' greedy outputs agree, per scenario and thread count."""
    rows = []
    ok = [c for c in cells if c["status"] == "ok"]
    for i, a in enumerate(ok):
        for b in ok[i + 1 :]:
            if a["runtime"] == b["runtime"] or (a["scenario"], a["threads"]) != (b["scenario"], b["threads"]):
                continue
            ids_a, ids_b = a["token_ids"], b["token_ids"]
            length = min(len(ids_a), len(ids_b))
            same = sum(x == y for x, y in zip(ids_a, ids_b, strict=False))
            first_difference = next((k for k in range(length) if ids_a[k] != ids_b[k]), None)
            rows.append({
                "runtimes": [a["runtime"], b["runtime"]],
                "scenario": a["scenario"],
                "threads": a["threads"],
                "same_prompt_ids": a["prompt_ids_sha256"] == b["prompt_ids_sha256"],
                "identical_token_share": same / length if length else None,
                "first_difference": first_difference,
                "compared_tokens": length,
            })  # fmt: skip
    return rows


def environment(model_dir: Path) -> dict[str, Any]:
    manifest = read_manifest(model_dir)
    memory = psutil.virtual_memory().total
    return {
        "cpu": _cpu_model(),
        "physical_cores": physical_cores(),
        "logical_cpus": psutil.cpu_count(logical=True),
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in ENGINE_PACKAGES},
        "model_dir": str(model_dir),
        "artifacts": {
            key: [{"path": f["path"], "sha256": f["sha256"]} for f in record.get("files", []) if f["size"] > 1 << 20]
            for key, record in manifest.get("artifacts", {}).items()
        },
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
