"""Check a GGUF file before anything loads it.

llama.cpp aborts the whole process on some malformed files, and transformers fails
deep inside its loader; reading the header, metadata and tensor table with the
``gguf`` reader first turns those into one clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qwenrt.errors import ArtifactError

REQUIRED_KEYS = [
    "qwen2.block_count",
    "qwen2.embedding_length",
    "qwen2.feed_forward_length",
    "qwen2.attention.head_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.eos_token_id",
]
BLOCK_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
CONTROL_TOKEN_TYPE = 3


def check_gguf(path: Path) -> dict[str, Any]:
    """Return the facts qwenrt needs from a Qwen2 GGUF, or raise :class:`ArtifactError`."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:4] != b"GGUF":
        raise ArtifactError(f"{path}: not a GGUF file (bad magic)")
    version = int.from_bytes(head[4:8], "little") if len(head) == 8 else -1
    if version not in (2, 3):
        raise ArtifactError(f"{path}: unsupported GGUF version {version}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails with whatever numpy raises on bad bytes
        raise ArtifactError(f"{path}: damaged or truncated GGUF ({type(exc).__name__}: {exc})") from None

    def field(key: str) -> Any:
        item = reader.fields.get(key)
        try:
            return None if item is None else item.contents()
        except Exception as exc:
            raise ArtifactError(f"{path}: unreadable metadata {key} ({exc})") from None

    arch = field("general.architecture")
    if arch != "qwen2":
        raise ArtifactError(f"{path}: architecture {arch!r} is not qwen2; qwenrt runs Qwen2 / Qwen2.5 models")
    missing = [key for key in REQUIRED_KEYS if key not in reader.fields]
    if missing:
        raise ArtifactError(f"{path}: metadata lacks {', '.join(missing)}")

    file_size = path.stat().st_size
    tensors = {}
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > file_size:
            raise ArtifactError(f"{path}: truncated GGUF (tensor {tensor.name} runs past the end of the file)")
        tensors[tensor.name] = tensor

    n_blocks = int(field("qwen2.block_count"))
    hidden = int(field("qwen2.embedding_length"))
    ffn = int(field("qwen2.feed_forward_length"))
    tokens = field("tokenizer.ggml.tokens")
    expected = ["token_embd.weight", "output_norm.weight"]
    expected += [f"blk.{i}.{name}.weight" for i in range(n_blocks) for name in BLOCK_TENSORS]
    absent = [name for name in expected if name not in tensors]
    if absent:
        raise ArtifactError(f"{path}: missing tensors {', '.join(absent[:3])}{' …' if len(absent) > 3 else ''}")
    _check_shape(path, tensors["token_embd.weight"], [hidden, len(tokens)])
    _check_shape(path, tensors["blk.0.ffn_up.weight"], [hidden, ffn])
    _check_shape(path, tensors["blk.0.attn_q.weight"], [hidden, hidden])

    token_types = field("tokenizer.ggml.token_type") or []
    type_counts: dict[str, int] = {}
    for tensor in tensors.values():
        type_counts[tensor.tensor_type.name] = type_counts.get(tensor.tensor_type.name, 0) + 1
    return {
        "name": field("general.name"),
        "architecture": arch,
        "block_count": n_blocks,
        "context_length": int(field("qwen2.context_length") or 0),
        "vocab_size": len(tokens),
        "eos_token_id": int(field("tokenizer.ggml.eos_token_id")),
        "chat_template": field("tokenizer.chat_template"),
        "control_tokens": [i for i, kind in enumerate(token_types) if kind == CONTROL_TOKEN_TYPE],
        "tensor_types": type_counts,
    }


def _check_shape(path: Path, tensor: Any, expected: list[int]) -> None:
    shape = [int(dim) for dim in tensor.shape]
    if shape != expected:
        raise ArtifactError(f"{path}: tensor {tensor.name} has shape {shape}, metadata says {expected}")


def check_gguf_header(path: Path) -> None:
    """The check to run before every load: cheap when the file is the one the manifest
    recorded (same size, right magic), the full :func:`check_gguf` otherwise."""
    from qwenrt.manifest import GGUF_KEY, artifact_record

    path = Path(path)
    record = artifact_record(path.parent, GGUF_KEY)
    recorded = {entry["path"]: entry["size"] for entry in (record or {}).get("files", [])}
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        size = path.stat().st_size
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror})") from None
    if magic == b"GGUF" and recorded.get(path.name) == size:
        return
    check_gguf(path)
