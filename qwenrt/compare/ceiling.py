"""The memory-bandwidth ceiling of decode: how many weight bytes one decoded token must
read from each artifact, and how fast this machine reads memory.

Decode is memory-bound: every step streams the weights once, so memory bandwidth ÷ these
bytes is the speed no engine can pass (the ceiling `compare` and `make bench` report
against). A step reads every weight except the token embedding, of which it looks up one
row; but when the embedding is tied (Qwen2.5-0.5B-Instruct's is), the same matrix is also
the output projection, read whole at every step, and counts.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil

from qwenrt.compare.cells import AnyCell, Cell, DecodeCeiling
from qwenrt.errors import QwenrtError
from qwenrt.runtimes import engine_class, engine_names


def decode_bytes_per_token(model_dir: Path) -> dict[str, int]:
    """Weight bytes a decode step reads, by engine, for each engine that counts them and
    has its artifact in ``model_dir`` (each engine knows its own format)."""
    counted = {}
    for name in engine_names():
        engine = engine_class(name)
        if not engine.counts_decode_bytes():
            continue
        try:
            artifact = engine.artifact_path(model_dir)
        except QwenrtError:
            continue
        if (read := engine.decode_bytes_per_token(artifact)) is not None:
            counted[name] = read
    return counted


def memory_bandwidth(threads: int, size_mb: int = 512, repeat: int = 5) -> float:
    """Read bandwidth in bytes/s: ``threads`` threads each taking the max of their share of
    an array far larger than the caches, best of ``repeat``.

    np.max streams memory at full speed (it releases the GIL, so the threads run at once);
    np.sum's pairwise summation is compute-bound and reads markedly less.
    """
    data = np.ones(size_mb * 2**20, dtype=np.int8)
    parts = np.array_split(data, threads)
    best = 0.0
    for _ in range(repeat):
        workers = [threading.Thread(target=np.max, args=(part,)) for part in parts]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, data.nbytes / (time.perf_counter() - started))
    return best


def bandwidth_by_threads(thread_counts: set[int]) -> dict[int, float]:
    """:func:`memory_bandwidth` at each thread count; 512 MB outruns any cache, and on a box
    with little memory free a quarter of what is free is used instead."""
    size_mb = max(64, min(512, psutil.virtual_memory().available // 4 // 2**20))
    return {threads: memory_bandwidth(threads, size_mb) for threads in sorted(thread_counts)}


def has_ceiling(runtime: str, batch: int) -> bool:
    """Engines that do not count the bytes a token reads (transformers) and batched cells, which
    read the weights once for several sequences, get no ceiling."""
    return engine_class(runtime).counts_decode_bytes() and batch == 1


def add_decode_ceilings(cells: list[AnyCell], earlier: dict[int, float] | None = None) -> dict[str, float]:
    """Give each measured cell that :func:`has_ceiling` its ``decode_ceiling``: the bandwidth
    at its thread count ÷ the bytes its artifact reads a token, and its decode's share of that.

    The bandwidth is read now and compared with ``earlier`` readings (before the cells):
    the higher is what the machine can give, since a busy moment only lowers a reading.
    Returns the bandwidth by thread count.
    """
    counted = [cell for cell in cells
               if isinstance(cell, Cell) and has_ceiling(cell.runtime, cell.batch) and cell.decode_tps]  # fmt: skip
    now = bandwidth_by_threads({cell.threads for cell in counted})
    bandwidth = {threads: max(value, (earlier or {}).get(threads, 0.0)) for threads, value in now.items()}
    weights: dict[tuple[str, str], int | None] = {}
    for cell in counted:
        key = (cell.runtime, cell.settings["artifact"])
        if key not in weights:
            weights[key] = _bytes_per_token(*key)
        read = weights[key]
        if read is None or cell.decode_tps is None:
            continue
        ceiling = bandwidth[cell.threads] / read
        cell.decode_ceiling = DecodeCeiling(read, bandwidth[cell.threads], ceiling, cell.decode_tps.median / ceiling)
    return {str(threads): value for threads, value in bandwidth.items()}


def _bytes_per_token(runtime: str, artifact: str) -> int | None:
    # The cell ran, so the artifact loads; an odd one (an IR folder without its config.json,
    # say) costs its cell the ceiling, not the whole comparison its results.
    try:
        return engine_class(runtime).decode_bytes_per_token(Path(artifact))
    except (OSError, ValueError, KeyError, RuntimeError, QwenrtError):
        return None
