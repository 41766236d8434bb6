"""Run every cell of a comparison in its own process, and gather what they measured."""

from __future__ import annotations

import json
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from qwenrt import __version__
from qwenrt.compare.ceiling import add_decode_ceilings, bandwidth_by_threads, has_ceiling
from qwenrt.compare.measure import CellSpec
from qwenrt.manifest import read_manifest
from qwenrt.runtimes.threads import physical_cores

SCHEMA = "qwenrt.compare/1"
ENGINE_PACKAGES = ["llama-cpp-python", "openvino", "openvino-genai", "openvino-tokenizers"]
STDERR_TAIL_LINES = 20
EXIT_GRACE_S = 30.0
CRASH_SIGNALS = {"SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE"}


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
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", "qwenrt.compare.worker"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
    )  # fmt: skip
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    # Both pipes are drained as the worker writes: an engine that logs a lot to stderr would
    # otherwise fill the pipe and stall, and the cell would time out for no fault of its own.
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def pump_stdout() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    def pump_stderr() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            if line.strip():
                stderr_tail.append(line.strip())

    readers = [threading.Thread(target=pump, daemon=True) for pump in (pump_stdout, pump_stderr)]
    for reader in readers:
        reader.start()
    outcome: dict[str, Any] = {}
    try:
        try:
            assert child.stdin is not None
            child.stdin.write(json.dumps(asdict(spec)))
            child.stdin.close()
        except BrokenPipeError:
            pass  # the worker died at once; its exit status says why
        while True:
            remaining = timeout_s - (time.monotonic() - started)
            if remaining <= 0:
                _stop(child)
                return _failed(spec, f"timed out after {timeout_s:g} s (the limit per cell, --timeout); stopped")
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # an engine printed to stdout; not ours
            if not isinstance(message, dict):
                continue
            if "progress" in message:
                progress(str(message["progress"]))
            else:
                outcome = message
        try:
            child.wait(timeout=max(1.0, min(EXIT_GRACE_S, timeout_s - (time.monotonic() - started))))
        except subprocess.TimeoutExpired:
            _stop(child)  # it said all it had to say, then hung on its way out
    except KeyboardInterrupt:
        _stop(child)
        raise
    for reader in readers:
        reader.join(timeout=5)
    if "result" in outcome:
        return outcome["result"]
    if "error" in outcome:
        return _failed(spec, str(outcome["error"]))
    return _failed(spec, _exit_reason(child.returncode, list(stderr_tail)))


def _stop(child: subprocess.Popen[str]) -> None:
    child.kill()
    child.wait()


def _exit_reason(returncode: int, stderr_tail: list[str]) -> str:
    """Why a worker ended without a result, in words: a signal is a crash (or a kill), not a code."""
    last = f"; its last words: {stderr_tail[-1][:300]}" if stderr_tail else ""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if name == "SIGKILL":
            cause = "was killed (out of memory, or by another process)"
        elif name in CRASH_SIGNALS:
            cause = "crashed inside the engine"
        else:
            cause = "was stopped"
        return f"worker {cause}: {name}{last}"
    return f"worker exited with code {returncode} and no result{last}"


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
