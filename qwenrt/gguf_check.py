"""Check a GGUF file before anything loads it.

llama.cpp aborts the whole process on some malformed files (a failed ``GGML_ASSERT``
cannot be caught), and transformers fails deep inside its loader; checking the
header, the metadata and the tensor table first turns those into one clear error.

The check parses the file itself rather than with ``gguf.GGUFReader``: the reader
builds a numpy view for every item of every array, which took 8 s on the demo
model's 151,936-token vocabulary and merges, too slow to run before every load.
This parser walks the same layout with ``struct``, steps over array items without
materialising them, and checks every length and count against the bytes left
before it reads, so a damaged file ends in :class:`ArtifactError`, never in an
exception from deep inside a reader, a huge allocation or a long loop.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenrt.errors import ArtifactError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # llama.cpp reads these; v1 (32-bit counts) is long gone
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64, with the terminating zero

# GGUF value types (gguf.GGUFValueType), with the struct format of the scalar ones.
STRING, ARRAY = 8, 9
SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
INTEGER_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
INT32, FLOAT32, UINT32 = 5, 6, 4
# The least bytes one entry can take, so that a count can be checked before any loop runs.
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, dimension count, type, offset

# What llama.cpp requires of a qwen2 GGUF (a missing one fails its load, late and vaguely).
REQUIRED_KEYS = [
    "qwen2.context_length",
    "qwen2.block_count",
    "qwen2.embedding_length",
    "qwen2.feed_forward_length",
    "qwen2.attention.head_count",
    "qwen2.attention.layer_norm_rms_epsilon",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.eos_token_id",
]
BLOCK_TENSORS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
CONTROL_TOKEN_TYPE = 3
DAMAGED_HINT = "the file is damaged or incomplete: copy it again, or convert its source again"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Field:
    """One metadata value: a scalar, a string (raw bytes), or an array located in the file."""

    type: int
    value: Any = None  # the scalar's value, or a string's bytes
    item_type: int | None = None  # arrays: the items' type
    count: int = 0  # arrays: how many items
    offset: int = 0  # arrays: where the items start


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: the first dimension is the row length
    type: int
    n_bytes: int
    offset: int  # absolute, in the file


@dataclass(frozen=True)
class GGUFLayout:
    """The parsed, bounds-checked structure of a GGUF file (its tensor data is not read)."""

    path: Path
    version: int
    size: int
    fields: dict[str, Field]
    tensors: dict[str, TensorInfo]
    data_offset: int
    _buffer: Any  # the mapped file, for the arrays read on demand

    def numeric_array(self, key: str, item_type: int) -> Any:
        """The items of a numeric array field as a numpy array (a copy: the file may be closed)."""
        import numpy as np

        item = self.fields[key]
        dtype = np.dtype(SCALAR_FORMATS[item_type])
        return np.frombuffer(self._buffer, dtype=dtype, count=item.count, offset=item.offset).copy()

    def strings(self, key: str) -> list[bytes]:
        """The items of a string array field, as raw bytes (the parse already bounds-checked them)."""
        item = self.fields[key]
        buffer, pos, unpack, items = self._buffer, item.offset, _U64.unpack_from, []
        for _ in range(item.count):
            (length,) = unpack(buffer, pos)
            items.append(buffer[pos + 8 : pos + 8 + length])
            pos += 8 + length
        return items

    def close(self) -> None:
        self._buffer.close()


class _Cursor:
    """Reads little-endian values from the mapped file; every read is checked against its end."""

    def __init__(self, path: Path, buffer: Any, size: int) -> None:
        self.path, self.buffer, self.size, self.pos = path, buffer, size, 0

    def fail(self, problem: str) -> ArtifactError:
        return ArtifactError(f"{self.path}: damaged or truncated GGUF ({problem}); {DAMAGED_HINT}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = _U32.unpack_from(self.buffer, self.pos)
        self.pos += 4
        return value

    def u64(self, what: str) -> int:
        self.need(8, what)
        (value,) = _U64.unpack_from(self.buffer, self.pos)
        self.pos += 8
        return value

    def raw_string(self, what: str) -> bytes:
        length = self.u64(f"length of {what}")
        self.need(length, what)
        data = self.buffer[self.pos : self.pos + length]
        self.pos += length
        return data

    def text(self, what: str) -> str:
        data = self.raw_string(what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None

    def scalar(self, value_type: int, what: str) -> Any:
        fmt = SCALAR_FORMATS[value_type]
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += size
        return bool(value) if value_type == 7 else value

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` strings; a vocabulary has 150,000 of them, so this loop is kept lean."""
        buffer, pos, size, unpack = self.buffer, self.pos, self.size, _U64.unpack_from
        for index in range(count):
            if pos + 8 > size:
                self.pos = pos
                raise self.fail(f"item {index} of {what} runs past the end of the file")
            (length,) = unpack(buffer, pos)
            pos += 8 + length
            if pos > size:
                self.pos = pos - length - 8
                raise self.fail(f"item {index} of {what} runs past the end of the file")
        self.pos = pos


def read_layout(path: Path) -> GGUFLayout:
    """Parse and bounds-check the header, metadata and tensor table; raise :class:`ArtifactError` if malformed."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle:
            size = path.stat().st_size
            head = handle.read(8)
            if head[:4] != MAGIC:
                raise ArtifactError(f"{path}: not a GGUF file (bad magic {head[:4]!r}); give a .gguf model file")
            if len(head) < 8:
                raise ArtifactError(f"{path}: truncated GGUF (the file ends inside its header); {DAMAGED_HINT}")
            version = int.from_bytes(head[4:8], "little")
            if version not in SUPPORTED_VERSIONS:
                raise ArtifactError(
                    f"{path}: unsupported GGUF version {version} (llama.cpp reads versions 2 and 3); "
                    "convert the model again with a current gguf writer"
                )
            buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return _parse(path, buffer, size, version)
    except BaseException:
        buffer.close()
        raise


def _parse(path: Path, buffer: Any, size: int, version: int) -> GGUFLayout:
    cursor = _Cursor(path, buffer, size)
    cursor.pos = 8
    tensor_count = cursor.u64("tensor count")
    kv_count = cursor.u64("metadata count")
    if kv_count * MIN_KV_BYTES > size - cursor.pos:
        raise cursor.fail(f"{kv_count} metadata entries cannot fit in the file")

    fields: dict[str, Field] = {}
    for index in range(kv_count):
        key = cursor.text(f"metadata key {index}")
        if key in fields:
            raise cursor.fail(f"metadata key {key!r} appears twice")
        fields[key] = _read_value(cursor, key)

    if tensor_count * MIN_TENSOR_INFO_BYTES > size - cursor.pos:
        raise cursor.fail(f"{tensor_count} tensors cannot fit in the file")
    alignment = DEFAULT_ALIGNMENT
    if (align := fields.get("general.alignment")) is not None:
        if align.type != UINT32 or align.value == 0 or align.value & (align.value - 1):
            raise cursor.fail("general.alignment is not a power of two stored as uint32")
        alignment = align.value

    infos = [_read_tensor_info(cursor, index) for index in range(tensor_count)]
    data_offset = -(-cursor.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    expected_relative = 0
    for name, shape, ggml_type, relative in infos:
        if name in tensors:
            raise cursor.fail(f"tensor {name} appears twice")
        n_bytes = _tensor_bytes(cursor, name, shape, ggml_type)
        # ggml requires the tensors' data in table order, each padded to the alignment, no gaps.
        if relative != expected_relative:
            raise cursor.fail(f"tensor {name} starts at data offset {relative}, expected {expected_relative}")
        expected_relative += -(-n_bytes // alignment) * alignment
        start = data_offset + relative
        if start + n_bytes > size:
            raise ArtifactError(
                f"{path}: truncated GGUF (tensor {name} runs past the end of the file at byte {start + n_bytes}, "
                f"the file has {size}); {DAMAGED_HINT}"
            )
        tensors[name] = TensorInfo(name, shape, ggml_type, n_bytes, start)
    return GGUFLayout(path, version, size, fields, tensors, data_offset, buffer)


def _read_value(cursor: _Cursor, key: str) -> Field:
    value_type = cursor.u32(f"type of {key}")
    if value_type in SCALAR_FORMATS:
        return Field(value_type, cursor.scalar(value_type, key))
    if value_type == STRING:
        value = cursor.raw_string(key)
        try:
            value.decode("utf-8")  # GGUF strings are UTF-8; llama-cpp-python decodes every one
        except UnicodeDecodeError:
            raise cursor.fail(f"metadata {key} is not UTF-8 text") from None
        return Field(value_type, value)
    if value_type != ARRAY:
        raise cursor.fail(f"{key} has unknown value type {value_type}")
    item_type = cursor.u32(f"item type of {key}")
    count = cursor.u64(f"item count of {key}")
    start = cursor.pos
    if item_type in SCALAR_FORMATS:
        size = count * struct.calcsize(SCALAR_FORMATS[item_type])
        cursor.need(size, f"the {count} items of {key}")
        cursor.pos += size
    elif item_type == STRING:
        cursor.need(count * 8, f"the {count} strings of {key}")
        cursor.skip_strings(count, key)
    else:
        # ggml refuses arrays of arrays, and qwenrt never writes them.
        raise cursor.fail(f"{key} is an array of unsupported type {item_type}")
    return Field(ARRAY, None, item_type, count, start)


def _read_tensor_info(cursor: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.text(f"name of tensor {index}")
    if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise cursor.fail(f"tensor {index} has a name of {len(name.encode('utf-8'))} bytes")
    n_dims = cursor.u32(f"dimension count of {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cursor.fail(f"tensor {name} has {n_dims} dimensions")
    shape = tuple(cursor.u64(f"shape of {name}") for _ in range(n_dims))
    ggml_type = cursor.u32(f"type of {name}")
    relative = cursor.u64(f"data offset of {name}")
    return name, shape, ggml_type, relative


def _tensor_bytes(cursor: _Cursor, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise cursor.fail(f"tensor {name} has unknown type {ggml_type}") from None
    if any(dim < 1 for dim in shape):
        raise cursor.fail(f"tensor {name} has an empty dimension in shape {list(shape)}")
    if shape[0] % block:
        raise cursor.fail(f"tensor {name} has rows of {shape[0]}, not a multiple of its block of {block}")
    elements = 1
    for dim in shape:
        elements *= dim
    return elements // block * type_size


def check_gguf(path: Path) -> dict[str, Any]:
    """Return the facts qwenrt needs from a Qwen2 GGUF, or raise :class:`ArtifactError`."""
    layout = read_layout(path)
    try:
        return _check_qwen2(layout)
    finally:
        layout.close()


def _check_qwen2(layout: GGUFLayout) -> dict[str, Any]:
    path, fields = layout.path, layout.fields

    arch = _string(layout, "general.architecture") if "general.architecture" in fields else None
    if arch != "qwen2":
        raise ArtifactError(f"{path}: architecture {arch!r} is not qwen2; qwenrt runs Qwen2 / Qwen2.5 models")
    missing = [key for key in REQUIRED_KEYS if key not in fields]
    if missing:
        raise ArtifactError(f"{path}: metadata lacks {', '.join(missing)}; {DAMAGED_HINT}")

    n_blocks = _integer(layout, "qwen2.block_count", minimum=1)
    hidden = _integer(layout, "qwen2.embedding_length", minimum=1)
    ffn = _integer(layout, "qwen2.feed_forward_length", minimum=1)
    heads = _integer(layout, "qwen2.attention.head_count", minimum=1)
    kv_heads = _integer(layout, "qwen2.attention.head_count_kv", minimum=1, default=heads)
    context = _integer(layout, "qwen2.context_length", minimum=1)
    if hidden % heads or heads % kv_heads:
        raise ArtifactError(
            f"{path}: metadata does not add up: {hidden} hidden over {heads} heads and {kv_heads} key/value heads"
        )
    kv_dim = hidden // heads * kv_heads

    tokenizer = _string(layout, "tokenizer.ggml.model")
    if tokenizer != "gpt2":
        raise ArtifactError(f"{path}: tokenizer {tokenizer!r} is not the byte-level BPE (gpt2) of Qwen2")
    vocab = _array(layout, "tokenizer.ggml.tokens", STRING).count
    if vocab < 1:
        raise ArtifactError(f"{path}: the tokenizer has no tokens; {DAMAGED_HINT}")
    _check_unique_tokens(layout)
    # llama.cpp reads these arrays as raw int32 / float32 of the vocabulary's length: any
    # other type or length makes it read past them or abort.
    control_tokens: list[int] = []
    if "tokenizer.ggml.token_type" in fields:
        _array(layout, "tokenizer.ggml.token_type", INT32, count=vocab)
        types = layout.numeric_array("tokenizer.ggml.token_type", INT32)
        control_tokens = [int(i) for i in (types == CONTROL_TOKEN_TYPE).nonzero()[0]]
    if "tokenizer.ggml.scores" in fields:
        _array(layout, "tokenizer.ggml.scores", FLOAT32, count=vocab)
    if "tokenizer.ggml.merges" in fields:
        _array(layout, "tokenizer.ggml.merges", STRING)
    eos = _integer(layout, "tokenizer.ggml.eos_token_id", minimum=0)
    if eos >= vocab:
        raise ArtifactError(f"{path}: end-of-sequence token {eos} is outside the vocabulary of {vocab}")
    chat_template = _string(layout, "tokenizer.chat_template") if "tokenizer.chat_template" in fields else None
    if chat_template is not None:
        _check_template(path, chat_template)
    name = _string(layout, "general.name") if "general.name" in fields else None

    tensors = layout.tensors
    # Checked before the list of expected names is built, so a damaged count cannot make it huge.
    if n_blocks * len(BLOCK_TENSORS) > len(tensors):
        raise ArtifactError(
            f"{path}: missing tensors: the metadata says {n_blocks} blocks, the file holds {len(tensors)} tensors; "
            f"{DAMAGED_HINT}"
        )
    expected = {"token_embd.weight": (hidden, vocab), "output_norm.weight": (hidden,)}
    for i in range(n_blocks):
        expected.update({
            f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
            f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_q.bias": (hidden,),
            f"blk.{i}.attn_k.weight": (hidden, kv_dim), f"blk.{i}.attn_k.bias": (kv_dim,),
            f"blk.{i}.attn_v.weight": (hidden, kv_dim), f"blk.{i}.attn_v.bias": (kv_dim,),
            f"blk.{i}.attn_output.weight": (hidden, hidden),
            f"blk.{i}.ffn_gate.weight": (hidden, ffn), f"blk.{i}.ffn_up.weight": (hidden, ffn),
            f"blk.{i}.ffn_down.weight": (ffn, hidden),
        })  # fmt: skip
    absent = [name for name in expected if name not in tensors]
    if absent:
        more = f" and {len(absent) - 3} more" if len(absent) > 3 else ""
        raise ArtifactError(f"{path}: missing tensors {', '.join(absent[:3])}{more}; {DAMAGED_HINT}")
    if "output.weight" in tensors:  # untied models only; tied ones reuse the embedding
        expected["output.weight"] = (hidden, vocab)
    for tensor_name, shape in expected.items():
        actual = tensors[tensor_name].shape
        if actual != shape:
            raise ArtifactError(
                f"{path}: tensor {tensor_name} has shape {list(actual)}, the metadata says {list(shape)}; "
                f"{DAMAGED_HINT}"
            )

    from gguf import GGMLQuantizationType

    type_counts: dict[str, int] = {}
    for tensor in tensors.values():
        type_name = GGMLQuantizationType(tensor.type).name
        type_counts[type_name] = type_counts.get(type_name, 0) + 1
    return {
        "name": name,
        "architecture": arch,
        "block_count": n_blocks,
        "context_length": context,
        "vocab_size": vocab,
        "eos_token_id": eos,
        "chat_template": chat_template,
        "control_tokens": control_tokens,
        "tensor_types": type_counts,
    }


def _check_unique_tokens(layout: GGUFLayout) -> None:
    """llama.cpp maps token text to id and asserts that no text repeats (a failed assert
    aborts the process); it names empty tokens "[EMPTY_<id>]" before it counts."""
    tokens = layout.strings("tokenizer.ggml.tokens")
    try:
        # One decode for the whole vocabulary: the zero bytes between tokens end any
        # character cut short, so a token that is not UTF-8 makes the whole decode fail.
        b"\0".join(tokens).decode("utf-8")
    except UnicodeDecodeError:
        index = next(i for i, text in enumerate(tokens) if not _is_utf8(text))
        raise ArtifactError(
            f"{layout.path}: token {index} ({tokens[index][:40]!r}) is not UTF-8 text; {DAMAGED_HINT}"
        ) from None
    distinct = set(tokens)
    if len(distinct) == len(tokens) and b"" not in distinct:
        return
    seen: dict[bytes, int] = {}
    for index, text in enumerate(tokens):
        text = text or f"[EMPTY_{index}]".encode()
        first = seen.setdefault(text, index)
        if first != index:
            raise ArtifactError(
                f"{layout.path}: tokens {first} and {index} are the same text {text[:40]!r}; "
                f"llama.cpp would abort on this vocabulary; {DAMAGED_HINT}"
            )


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _check_template(path: Path, template: str) -> None:
    # llama-cpp-python compiles the template when it loads the model and qwenrt renders
    # with it: a template that does not parse fails there with a jinja2 error of its own.
    from jinja2 import Environment, TemplateSyntaxError

    try:
        Environment(trim_blocks=True, lstrip_blocks=True).parse(template)
    except TemplateSyntaxError as exc:
        raise ArtifactError(
            f"{path}: the chat template is not valid Jinja (line {exc.lineno}: {exc.message}); {DAMAGED_HINT}"
        ) from None


def _string(layout: GGUFLayout, key: str) -> str:
    item = layout.fields[key]
    if item.type != STRING:
        raise ArtifactError(f"{layout.path}: metadata {key} is not a string; {DAMAGED_HINT}")
    try:
        return item.value.decode("utf-8")
    except UnicodeDecodeError:
        raise ArtifactError(f"{layout.path}: metadata {key} is not UTF-8 text; {DAMAGED_HINT}") from None


def _integer(layout: GGUFLayout, key: str, *, minimum: int, default: int | None = None) -> int:
    item = layout.fields.get(key)
    if item is None and default is not None:
        return default
    if item is None or item.type not in INTEGER_TYPES:
        raise ArtifactError(f"{layout.path}: metadata {key} is not a whole number; {DAMAGED_HINT}")
    if item.value < minimum:
        raise ArtifactError(f"{layout.path}: metadata {key} is {item.value}, less than {minimum}; {DAMAGED_HINT}")
    return int(item.value)


def _array(layout: GGUFLayout, key: str, item_type: int, count: int | None = None) -> Field:
    item = layout.fields[key]
    if item.type != ARRAY or item.item_type != item_type:
        raise ArtifactError(f"{layout.path}: metadata {key} is not an array of the right type; {DAMAGED_HINT}")
    if count is not None and item.count != count:
        raise ArtifactError(f"{layout.path}: metadata {key} has {item.count} items for {count} tokens; {DAMAGED_HINT}")
    return item
