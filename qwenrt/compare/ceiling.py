"""The memory-bandwidth ceiling of decode: how many weight bytes one decoded token must
read from each artifact, and how fast this machine reads memory.

Decode is memory-bound: every step streams the weights once, so memory bandwidth ÷ these
bytes is the speed no engine can pass (the ceiling `compare` and `make bench` report
against). A step reads every weight except the token embedding, of which it looks up one
row; but when the embedding is tied (Qwen2.5-0.5B-Instruct's is), the same matrix is also
the output projection, read whole at every step, and counts.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from qwenrt.manifest import GGUF_KEY, OPENVINO_KEY, artifact_files

GGUF_EMBEDDING, GGUF_OUTPUT = "token_embd.weight", "output.weight"
# How far a weight constant may sit from its consumer: through Convert, Subtract,
# Multiply and Convert in an INT8 IR's decompression chain.
DECOMPRESSION_DEPTH = 6


def decode_bytes_per_token(model_dir: Path) -> dict[str, int]:
    """Weight bytes a decode step reads, by artifact: ``{"gguf": ..., "openvino": ...}``."""
    return {"gguf": gguf_bytes_per_token(artifact_files(model_dir, GGUF_KEY)[0]),
            "openvino": ir_bytes_per_token(artifact_files(model_dir, OPENVINO_KEY)[0])}  # fmt: skip


def gguf_bytes_per_token(path: Path) -> int:
    import gguf

    tensors = {tensor.name: int(tensor.n_bytes) for tensor in gguf.GGUFReader(path).tensors}
    total = sum(tensors.values())
    # Without an output matrix of its own, llama.cpp projects onto the vocabulary with the embedding.
    return total if GGUF_OUTPUT not in tensors else total - tensors.get(GGUF_EMBEDDING, 0)


def ir_bytes_per_token(ir_dir: Path) -> int:
    import openvino as ov

    config = json.loads((ir_dir / "config.json").read_text())
    embedding_shape = [config["vocab_size"], config["hidden_size"]]
    model = ov.Core().read_model(ir_dir / "openvino_model.xml")
    constants = [op for op in model.get_ops() if op.get_type_name() == "Constant"]
    total = sum(op.get_byte_size() for op in constants)
    # The embedding's weights: the constant of its shape that a Gather looks rows up in
    # (a position table may reach a Gather too). Untied, nothing else reads it.
    embedding = next((op for op in constants
                      if list(op.get_output_shape(0)) == embedding_shape and _reaches(op, "Gather")), None)  # fmt: skip
    if embedding is None or _reaches(embedding, "MatMul"):
        return total
    return total - embedding.get_byte_size()


def _reaches(op: Any, type_name: str, depth: int = DECOMPRESSION_DEPTH) -> bool:
    if depth == 0:
        return False
    for target in op.output(0).get_target_inputs():
        node = target.get_node()
        if node.get_type_name() == type_name or _reaches(node, type_name, depth - 1):
            return True
    return False


# The engines whose artifacts the ceiling can be counted for, by runtime name.
BYTES_PER_TOKEN: dict[str, Callable[[Path], int]] = {"gguf": gguf_bytes_per_token, "openvino": ir_bytes_per_token}


def memory_bandwidth(threads: int, size_mb: int = 512, repeat: int = 5) -> float:
    """Read bandwidth in bytes/s: ``threads`` threads each taking the max of their share of
    an array far larger than the caches, best of ``repeat``.

    np.max streams memory at full speed (it releases the GIL, so the threads run at once);
    np.sum's pairwise summation is compute-bound and read 30 % less here.
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
    """Engines without a byte count (transformers) and batched cells, which read the weights
    once for several sequences, get no ceiling."""
    return runtime in BYTES_PER_TOKEN and batch == 1


def add_decode_ceilings(cells: list[dict[str, Any]], earlier: dict[int, float] | None = None) -> dict[str, float]:
    """Give each measured cell that :func:`has_ceiling` its ``decode_ceiling``: the bandwidth
    at its thread count ÷ the bytes its artifact reads a token, and its decode's share of that.

    The bandwidth is read now and compared with ``earlier`` readings (before the cells):
    the higher is what the machine can give, since a busy moment only lowers a reading.
    Returns the bandwidth by thread count.
    """
    counted = [cell for cell in cells if cell["status"] == "ok" and has_ceiling(cell["runtime"], cell.get("batch", 1))
               and cell.get("decode_tps")]  # fmt: skip
    now = bandwidth_by_threads({cell["threads"] for cell in counted})
    bandwidth = {threads: max(value, (earlier or {}).get(threads, 0.0)) for threads, value in now.items()}
    weights: dict[tuple[str, str], int | None] = {}
    for cell in counted:
        key = (cell["runtime"], cell["settings"]["artifact"])
        if key not in weights:
            weights[key] = _bytes_per_token(*key)
        if weights[key] is None:
            continue
        ceiling = bandwidth[cell["threads"]] / weights[key]
        cell["decode_ceiling"] = {
            "bytes_per_token": weights[key],
            "memory_bandwidth_bytes_per_s": bandwidth[cell["threads"]],
            "ceiling_tps": ceiling,
            "share": cell["decode_tps"]["median"] / ceiling,
        }
    return {str(threads): value for threads, value in bandwidth.items()}


def _bytes_per_token(runtime: str, artifact: str) -> int | None:
    # The cell ran, so the artifact loads; an odd one (an IR folder without its config.json,
    # say) costs its cell the ceiling, not the whole comparison its results.
    try:
        return BYTES_PER_TOKEN[runtime](Path(artifact))
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
