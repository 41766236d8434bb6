"""How many weight bytes one decoded token must read from each artifact.

Decode is memory-bound: every step streams the weights once, so memory bandwidth ÷ these
bytes is the speed no engine can pass (the ceiling `make bench` reports against). A step
reads every weight except the token embedding, of which it looks up one row; but when
the embedding is tied (Qwen2.5-0.5B-Instruct's is), the same matrix is also the output
projection, read whole at every step, and counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
