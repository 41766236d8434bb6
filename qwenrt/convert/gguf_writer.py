"""Write a Hugging Face Qwen2 checkpoint as a GGUF file with Q8_0 (or F16) weights.

Built on the ``gguf`` package: its writer, its qwen2 tensor-name map, its Q8_0
quantiser and its special-token reader. What it does not do for a Hugging Face
folder (the token list with llama.cpp's token types, and the hyper-parameters) is
here.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from qwenrt.convert.checkpoint import Checkpoint
from qwenrt.convert.progress import progress_bar
from qwenrt.errors import SourceError

# Q8_0 packs rows in blocks of 32 values; a row of another length stays F16.
Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]


# The file types llama.cpp records for a model whose matrices are all of one type.
FILE_TYPES = {
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    gguf.GGMLQuantizationType.F16: gguf.LlamaFileType.MOSTLY_F16,
}


def write_gguf(
    checkpoint: Checkpoint, out_file: Path, matrix_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.Q8_0
) -> dict[str, int]:
    """Write ``out_file`` with every 2-D weight in ``matrix_type`` (Q8_0: qwenrt's artifact;
    F16: the float baseline of ``compare --ladder``); returns the count of tensors per type."""
    config = checkpoint.config
    n_layers = config["num_hidden_layers"]
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    _add_hyperparameters(writer, checkpoint, FILE_TYPES[matrix_type])
    _add_tokenizer(writer, checkpoint)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    tied = bool(config.get("tie_word_embeddings", False))
    types: Counter[str] = Counter()
    expected = _expected_tensor_names(n_layers, tied)
    for hf_name, tensor in progress_bar(
        _float_tensors(checkpoint), total=checkpoint.tensor_count(), desc=f"Writing {matrix_type.name}", unit="tensor"
    ):
        if tied and hf_name == "lm_head.weight":
            continue  # the same matrix as the token embedding; llama.cpp reuses it
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SourceError(f"{checkpoint.path}: tensor {hf_name!r} has no place in a qwen2 GGUF")
        data, qtype = _encode(tensor, matrix_type)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        types[qtype.name] += 1
        expected.discard(gguf_name)
    if expected:
        raise SourceError(f"{checkpoint.path}: checkpoint lacks tensors {sorted(expected)[:4]}")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return dict(types)


def _encode(tensor: np.ndarray, matrix_type: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if tensor.ndim == 2 and matrix_type == gguf.GGMLQuantizationType.Q8_0 and tensor.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if tensor.ndim == 2:
        return tensor.astype(np.float16), gguf.GGMLQuantizationType.F16
    return tensor.astype(np.float32), gguf.GGMLQuantizationType.F32


def _float_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, np.ndarray]]:
    # One tensor at a time keeps peak memory near the quantised output, not the float model.
    for name, tensor in checkpoint.tensors():
        yield name, tensor.float().numpy()


def _expected_tensor_names(n_layers: int, tied: bool) -> set[str]:
    names = {"token_embd.weight", "output_norm.weight"}
    if not tied:
        names.add("output.weight")
    per_block = [
        "attn_norm.weight", "attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias",
        "attn_v.weight", "attn_v.bias", "attn_output.weight", "ffn_norm.weight",
        "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
    ]  # fmt: skip
    names.update(f"blk.{i}.{suffix}" for i in range(n_layers) for suffix in per_block)
    return names


def _add_hyperparameters(writer: gguf.GGUFWriter, checkpoint: Checkpoint, file_type: gguf.LlamaFileType) -> None:
    config = checkpoint.config
    writer.add_name(checkpoint.display_name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    writer.add_rope_freq_base(checkpoint.rope_theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: gguf.GGUFWriter, checkpoint: Checkpoint) -> None:
    tokens, token_types = token_table(checkpoint.path, checkpoint.config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    special = gguf.SpecialVocab(checkpoint.path, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise SourceError(f"{checkpoint.path}: tokenizer.json has no BPE merges")
    if "eos" not in special.special_token_ids:
        raise SourceError(f"{checkpoint.path}: the tokenizer names no end-of-sequence token")
    special.add_to_gguf(writer, quiet=True)
    # Qwen never prepends a BOS token; say so, or llama.cpp would guess.
    writer.add_add_bos_token(False)
    if special.chat_template is None:
        raise SourceError(f"{checkpoint.path}: the tokenizer has no chat template")


def token_table(checkpoint_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, padded to the model's embedding rows.

    Special added tokens are CONTROL (never produced by tokenising plain text), other
    added tokens USER_DEFINED, and the unused rows beyond the tokenizer UNUSED.
    """
    spec = json.loads((checkpoint_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or spec.get("decoder", {}).get("type") != "ByteLevel":
        raise SourceError(f"{checkpoint_dir}: tokenizer is not a byte-level BPE, as Qwen2's is")
    by_id: dict[int, tuple[str, int]] = {idx: (text, gguf.TokenType.NORMAL) for text, idx in model["vocab"].items()}
    for added in spec.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if by_id and max(by_id) >= vocab_size:
        raise SourceError(f"{checkpoint_dir}: tokenizer ids go beyond the model's {vocab_size} embeddings")
    tokens: list[str] = []
    types: list[int] = []
    for idx in range(vocab_size):
        text, kind = by_id.get(idx, (f"[PAD{idx}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types
