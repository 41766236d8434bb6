"""Source resolution: what ``qwenrt convert SOURCE`` makes of each kind of source.

The error cases run through the command line in test_convert.py; here the GGUF
source (transformers dequantises it) and the naming rules.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from qwenrt.convert.pipeline import convert
from qwenrt.convert.sources import HUB_ID, _slug, resolve_source, source_reference
from qwenrt.errors import SourceError
from qwenrt.manifest import GGUF_KEY, read_manifest

TEXT = "<|im_start|>user\n请写一段 Python 快速排序函数 😀🚀 ✨<|im_end|>\n<|im_start|>assistant\n"


def tiny_gguf(tiny_model: Path) -> Path:
    return tiny_model / read_manifest(tiny_model)["artifacts"][GGUF_KEY]["path"]


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    weights: dict[str, np.ndarray] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    return weights


def test_gguf_source_dequantises_to_the_same_model(tiny_model: Path, tiny_checkpoint: Path) -> None:
    from transformers import AutoTokenizer

    source = tiny_gguf(tiny_model)
    resolved = resolve_source(str(source))
    assert resolved.kind == "gguf"
    assert resolved.reference == str(source.resolve())
    assert resolved.name == tiny_checkpoint.name
    assert resolved.original_files == [source]
    described = resolved.describe()["files"]
    assert described == [
        {"name": source.name, "size": source.stat().st_size, "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    ]

    original = json.loads((tiny_checkpoint / "config.json").read_text(encoding="utf-8"))
    config = resolved.checkpoint.config
    for key in ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "eos_token_id"]:  # fmt: skip
        assert config[key] == original[key], key
    assert resolved.checkpoint.rope_theta == pytest.approx(1_000_000.0)
    assert config["rms_norm_eps"] == pytest.approx(original["rms_norm_eps"])

    before = AutoTokenizer.from_pretrained(tiny_checkpoint)
    after = AutoTokenizer.from_pretrained(resolved.checkpoint.path)
    assert after.get_vocab() == before.get_vocab()
    assert after(TEXT, add_special_tokens=False)["input_ids"] == before(TEXT, add_special_tokens=False)["input_ids"]
    assert after.eos_token == "<|im_end|>"
    assert after.chat_template == before.chat_template
    assert {i for i, t in after.added_tokens_decoder.items() if t.special} == {
        i for i, t in before.added_tokens_decoder.items() if t.special
    }

    # The float weights are the Q8_0 ones: the original within one quantisation step.
    weights, originals = load_weights(resolved.checkpoint.path), load_weights(tiny_checkpoint)
    assert set(weights) <= set(originals)
    for name, values in weights.items():
        source_values = originals[name].astype(np.float32)
        assert np.abs(values.astype(np.float32) - source_values).max() <= np.abs(source_values).max() / 127, name

    # A second resolution finds the dequantised checkpoint in the cache.
    stamp = (resolved.checkpoint.path / "model.safetensors").stat().st_mtime_ns
    again = resolve_source(str(source))
    assert again.checkpoint.path == resolved.checkpoint.path
    assert (again.checkpoint.path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not list(resolved.checkpoint.path.parent.glob(".*")), "no staging folder left in the cache"


def test_gguf_source_converts_back_to_the_same_q8_0(tiny_model: Path, tmp_path: Path) -> None:
    """Q8_0 → float → Q8_0 gives back the same blocks: each block's largest value sets the same scale."""
    source = tiny_gguf(tiny_model)
    out = tmp_path / "model"
    convert(str(source), out, (GGUF_KEY,), log=lambda line: None)
    manifest = read_manifest(out)
    assert manifest["source"]["kind"] == "gguf"
    assert manifest["source"]["files"][0]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()

    first = gguf.GGUFReader(source)
    second = gguf.GGUFReader(out / manifest["artifacts"][GGUF_KEY]["path"])
    for key in ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.eos_token_id", "tokenizer.chat_template", "qwen2.block_count",
                "qwen2.embedding_length", "qwen2.attention.head_count_kv"]:  # fmt: skip
        assert second.fields[key].contents() == first.fields[key].contents(), key
    tensors = {t.name: t for t in second.tensors}
    assert set(tensors) == {t.name for t in first.tensors}
    for tensor in first.tensors:
        twin = tensors[tensor.name]
        assert twin.tensor_type == tensor.tensor_type, tensor.name
        # Exact: the block maximum is 127 × the f16 scale, which gives the same scale back.
        assert np.array_equal(twin.data, tensor.data), tensor.name


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b-instruct"),
        ("qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct"),
        ("model-f16", "model"),
        ("My Model (copy)", "my-model-copy"),
        ("???", "model"),
    ],
)
def test_artifact_names_come_from_the_source_name(name: str, slug: str) -> None:
    assert _slug(name) == slug


@pytest.mark.parametrize(
    ("source", "is_hub_id"),
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF", True),
        ("qwen2.5", False),
        ("a/b/c", False),
        ("/abs/path", False),
    ],
)
def test_hub_id_shape(source: str, is_hub_id: bool) -> None:
    assert bool(HUB_ID.match(source)) is is_hub_id


def test_source_reference_is_an_absolute_path_for_local_sources(tiny_checkpoint: Path, monkeypatch) -> None:
    monkeypatch.chdir(tiny_checkpoint.parent)
    assert source_reference(tiny_checkpoint.name) == str(tiny_checkpoint.resolve())
    assert source_reference("demo") == "demo"
    assert source_reference("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 64)
    with pytest.raises(SourceError, match="not a .gguf file or checkpoint folder"):
        resolve_source(str(weights))
