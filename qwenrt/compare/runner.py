"""Run every cell of a comparison in its own process, and gather what they measured."""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from qwenrt import __version__
from qwenrt.child import run_child
from qwenrt.compare.ceiling import add_decode_ceilings, bandwidth_by_threads, has_ceiling
from qwenrt.compare.cells import AnyCell, Cell, FailedCell
from qwenrt.compare.measure import CellSpec, pooled
from qwenrt.host import this_host
from qwenrt.manifest import read_manifest
from qwenrt.runtimes import engine_class
from qwenrt.runtimes.fingerprint import package_version
from qwenrt.runtimes.threads import physical_cores

SCHEMA = "qwenrt.compare/1"


def run_comparison(
    specs: list[CellSpec],
    *,
    timeout_s: float = 900.0,
    progress: Callable[[str], None] = lambda _: None,
    kind: str = "comparison",
    rounds: int = 1,
) -> dict[str, Any]:
    """Measure each spec in a fresh process; Ctrl-C stops and returns the cells finished so far.

    With ``rounds`` above 1 every spec is measured that many times, each time in a fresh
    process, the specs taking turns in an order that rotates from one round to the next, and
    each spec's rounds are pooled into one cell (:func:`~qwenrt.compare.measure.pooled`): a
    machine whose speed drifts over the minutes of a comparison then slows every engine alike,
    as it would not if each engine's repetitions ran in one stretch.

    ``kind`` tells a report how to lay the cells out: side by side, or as the ladder's steps."""
    measured: list[list[AnyCell]] = [[] for _ in specs]
    interrupted = False
    # Read before the cells as well as after: a busy moment on the machine only lowers a reading.
    ceiling_threads = {spec.threads for spec in specs if has_ceiling(spec.runtime, spec.batch)}
    if ceiling_threads:
        progress("memory read bandwidth, for the decode ceiling")
    before = bandwidth_by_threads(ceiling_threads)
    turn, turns = 0, len(specs) * rounds
    for round_index in range(rounds):
        for offset in range(len(specs)):
            index = (round_index + offset) % len(specs)
            if any(isinstance(cell, FailedCell) for cell in measured[index]):
                continue  # it would fail again, or hang to the time limit again
            spec, turn = specs[index], turn + 1
            label = f"[{turn}/{turns}] " + (
                spec.label or f"{spec.runtime} × {spec.threads} thread{'s' if spec.threads > 1 else ''}"
            )
            try:
                cell = _run_in_process(spec, timeout_s, lambda text, label=label: progress(f"{label}: {text}"))
            except KeyboardInterrupt:
                interrupted = True
                break
            measured[index].append(cell)
            if isinstance(cell, FailedCell):
                turns -= rounds - 1 - round_index  # its later rounds are not run
        if interrupted:
            break
    cells = [_pool(spec_rounds) for spec_rounds in measured if spec_rounds]
    bandwidth: dict[str, float] = {}
    if cells and not interrupted:
        progress("memory read bandwidth, for the decode ceiling")
        try:
            bandwidth = add_decode_ceilings(cells, before)
        except KeyboardInterrupt:
            interrupted = True  # the cells keep their results, without ceilings
            for cell in cells:
                if isinstance(cell, Cell):
                    cell.decode_ceiling = None
    return {
        "schema": SCHEMA,
        "kind": kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qwenrt_version": __version__,
        "interrupted": interrupted,
        "environment": environment(Path(specs[0].model_dir), [spec.runtime for spec in specs]) if specs else {},
        "settings": _common_settings(specs, rounds),
        "cells": cells,
        "memory_bandwidth_bytes_per_s": bandwidth,  # by thread count
        "agreement": agreement(cells),
    }


def _common_settings(specs: list[CellSpec], rounds: int) -> dict[str, Any]:
    """What every cell was measured with (the first spec's, but its engine and threads)."""
    if not specs:
        return {}
    return {**{k: v for k, v in asdict(specs[0]).items() if k not in ("runtime", "threads")}, "rounds": rounds}


def _pool(spec_rounds: list[AnyCell]) -> AnyCell:
    """A spec's rounds as one cell; the first failure if any round failed."""
    failed = next((cell for cell in spec_rounds if isinstance(cell, FailedCell)), None)
    if failed is not None:
        return failed
    return pooled([cell for cell in spec_rounds if isinstance(cell, Cell)])


def _run_in_process(spec: CellSpec, timeout_s: float, progress: Callable[[str], None]) -> AnyCell:
    """One cell in a fresh worker; whatever happens to the worker (an error, a native crash,
    a hang past ``timeout_s``) comes back as the cell's failure with its reason."""
    outcome = run_child("qwenrt.compare.worker", asdict(spec), timeout_s=timeout_s, progress=progress)
    if outcome.ok:
        return Cell.from_json(outcome.result)
    if outcome.crash and outcome.crash.startswith("timed out"):
        return _failed(spec, f"timed out after {timeout_s:g} s (the limit per cell, --timeout); stopped")
    return _failed(spec, outcome.reason())


def _packages(runtimes: list[str]) -> list[str]:
    """The packages of the engines compared, each once, in the order the engines came."""
    return list(dict.fromkeys(package for name in runtimes for package in engine_class(name).packages))


def _failed(spec: CellSpec, reason: str) -> FailedCell:
    return FailedCell(spec.runtime, spec.threads, spec.conversation().name, spec.label, reason, spec.engine_defaults)


def agreement(cells: list[AnyCell]) -> list[dict[str, Any]]:
    """How far the engines' greedy outputs agree (with qwenrt's settings), per scenario and thread count."""
    rows = []
    ok = [c for c in cells if isinstance(c, Cell) and not c.engine_defaults]
    for i, a in enumerate(ok):
        for b in ok[i + 1 :]:
            if a.runtime == b.runtime or (a.scenario, a.threads) != (b.scenario, b.threads):
                continue
            ids_a, ids_b = a.token_ids, b.token_ids
            length = min(len(ids_a), len(ids_b))
            same = sum(x == y for x, y in zip(ids_a, ids_b, strict=False))
            first_difference = next((k for k in range(length) if ids_a[k] != ids_b[k]), None)
            rows.append({
                "runtimes": [a.runtime, b.runtime],
                "scenario": a.scenario,
                "threads": a.threads,
                "same_prompt_ids": a.prompt_ids_sha256 == b.prompt_ids_sha256,
                "identical_token_share": same / length if length else None,
                "first_difference": first_difference,
                "compared_tokens": length,
            })  # fmt: skip
    return rows


def environment(model_dir: Path, runtimes: list[str]) -> dict[str, Any]:
    manifest = read_manifest(model_dir)
    memory = psutil.virtual_memory().total
    return {
        "cpu": this_host().cpu,
        "physical_cores": physical_cores(),
        "logical_cpus": psutil.cpu_count(logical=True),
        "memory_bytes": memory,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in _packages(runtimes)},
        "model_dir": str(model_dir),
        "artifacts": {
            key: [{"path": f["path"], "sha256": f["sha256"]} for f in record.get("files", []) if f["size"] > 1 << 20]
            for key, record in manifest.get("artifacts", {}).items()
        },
    }


# compare --quality reads this much of the English corpus: enough to tell the engines apart
# beyond noise on the demo model (BENCHMARKS.md, "Quality"), in seconds once the reference is cached.
QUALITY_TOKENS = 1024


def add_quality(report: dict[str, Any], model_dir: Path, progress: Callable[[str], None]) -> None:
    """Give each measured cell its artifact's figures against the float model (qwenrt eval)."""
    from qwenrt.eval.run import EvalSpec, evaluate

    measured = [cell for cell in report["cells"] if isinstance(cell, Cell) and not cell.engine_defaults]
    if not measured:
        return
    runtimes = list(dict.fromkeys(cell.runtime for cell in measured))
    spec = EvalSpec(str(model_dir), "english", 512, QUALITY_TOKENS, measured[0].threads)
    result = evaluate(spec, runtimes, progress)
    figures = {entry["engine"]: entry["quality"] for entry in result["engines"] if entry["status"] == "ok"}
    for cell in measured:
        cell.quality = figures.get(cell.runtime)
    report["quality"] = {"corpus": result["corpus"], "reference": result["reference"], "spec": result["spec"]}
