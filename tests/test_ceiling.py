"""The weight bytes one decoded token reads (qwenrt.compare.ceiling), on real conversions
of the tiny model with a tied embedding (as Qwen2.5-0.5B-Instruct has) and an untied one
(as the demo weights have)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import openvino as ov
import pytest
from helpers import make_cell
from tiny_model import build_tiny_qwen2

from qwenrt.compare.ceiling import add_decode_ceilings, decode_bytes_per_token, memory_bandwidth
from qwenrt.manifest import GGUF_KEY, OPENVINO_KEY, artifact_files


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwenrt.convert.pipeline import convert

    checkpoint = build_tiny_qwen2(tmp_path_factory.mktemp("untied-checkpoint"), tied=False)
    return convert(str(checkpoint), tmp_path_factory.mktemp("untied-model") / "model", log=lambda line: None).out_dir


def gguf_tensor_bytes(model_dir: Path) -> dict[str, int]:
    return {t.name: int(t.n_bytes) for t in gguf.GGUFReader(artifact_files(model_dir, GGUF_KEY)[0]).tensors}


def ir_constant_bytes(model_dir: Path) -> int:
    model = ov.Core().read_model(artifact_files(model_dir, OPENVINO_KEY)[0] / "openvino_model.xml")
    return sum(op.get_byte_size() for op in model.get_ops() if op.get_type_name() == "Constant")


def embedding_elements(model_dir: Path) -> int:
    config = json.loads((artifact_files(model_dir, OPENVINO_KEY)[0] / "config.json").read_text())
    return config["vocab_size"] * config["hidden_size"]


def test_a_tied_embedding_is_read_whole_at_every_step(tiny_model: Path) -> None:
    tensors = gguf_tensor_bytes(tiny_model)
    assert "output.weight" not in tensors  # llama.cpp projects onto the vocabulary with token_embd
    read = decode_bytes_per_token(tiny_model)
    assert read["gguf"] == sum(tensors.values()) and read["openvino"] == ir_constant_bytes(tiny_model)
    assert "transformers" not in read  # counts no bytes: no ceiling


def test_an_untied_embedding_is_only_looked_up(untied_model: Path) -> None:
    tensors = gguf_tensor_bytes(untied_model)
    assert "output.weight" in tensors
    read = decode_bytes_per_token(untied_model)
    assert read["gguf"] == sum(tensors.values()) - tensors["token_embd.weight"]
    # The IR's embedding is INT8: one byte an element.
    assert read["openvino"] == ir_constant_bytes(untied_model) - embedding_elements(untied_model)


@pytest.mark.parametrize("threads", [1, 2])
def test_memory_bandwidth_is_a_plausible_reading(threads: int) -> None:
    # Any machine reads more than 100 MB/s and less than 10 TB/s; the figure itself is make bench's.
    assert 1e8 < memory_bandwidth(threads, size_mb=64, repeat=2) < 1e13


def test_a_cell_whose_artifact_cannot_be_counted_loses_only_its_ceiling(tiny_model: Path, tmp_path: Path) -> None:
    odd_ir = tmp_path / "ir"  # an IR folder without the config.json the count needs
    odd_ir.mkdir()
    cells = [make_cell(runtime="gguf", settings={"artifact": str(artifact_files(tiny_model, GGUF_KEY)[0])}),
             make_cell(runtime="openvino", settings={"artifact": str(odd_ir)})]  # fmt: skip
    bandwidth = add_decode_ceilings(cells)
    assert set(bandwidth) == {"1"}
    assert cells[0].decode_ceiling is not None
    assert cells[0].decode_ceiling.bytes_per_token == decode_bytes_per_token(tiny_model)["gguf"]
    assert cells[1].decode_ceiling is None
