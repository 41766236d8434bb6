"""The OpenVINO export's fused q/k/v projections (qwenrt.convert.fused_projections), on
real exports of the tiny model: the fused IR has one INT8 product per layer where the
export had three, and computes the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

from qwenrt.convert.checkpoint import Checkpoint
from qwenrt.convert.fused_projections import ATTENTION_PROJECTIONS, FUSED_ATTENTION, fuse_projections
from qwenrt.convert.openvino_int8 import MODEL_XML, Int8Scheme, export_openvino_int8, weight_types
from qwenrt.convert.pipeline import convert
from qwenrt.manifest import GGUF_KEY, MANIFEST_FILE, OPENVINO_DIR, OPENVINO_KEY, read_manifest

# q, k and v become one product: five weight matrices a layer instead of seven.
FUSED_MATRICES_PER_LAYER = 5
F32 = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}


@pytest.fixture(scope="module")
def layers(tiny_checkpoint: Path) -> int:
    return json.loads((tiny_checkpoint / "config.json").read_text())["num_hidden_layers"]


@pytest.fixture(scope="module")
def unfused_ir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unfused-ir")
    export = export_openvino_int8(Checkpoint.open(tiny_checkpoint), out, fuse_qkv=False)
    assert export.fused_projections == {}
    return out


def projection_names(model_xml: Path) -> list[str]:
    model = ov.Core().read_model(model_xml)
    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "MatMul"]


def logits(ir_dir: Path, steps: list[list[int]]) -> list[np.ndarray]:
    """The logits of each step fed in turn through the IR's own KV cache, at f32 precision."""
    request = ov.Core().compile_model(ir_dir / MODEL_XML, "CPU", F32).create_infer_request()
    request.reset_state()
    outputs, seen = [], 0
    for ids in steps:
        length = len(ids)
        request.infer({
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, seen + length), np.int64),
            "position_ids": np.arange(seen, seen + length, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, np.int32),
        })  # fmt: skip
        outputs.append(request.get_tensor("logits").data.copy())
        seen += length
    return outputs


def test_conversion_fuses_each_layers_q_k_v_into_one_int8_product(tiny_model: Path, layers: int) -> None:
    ir = tiny_model / OPENVINO_DIR
    names = projection_names(ir / MODEL_XML)
    assert sum(f".{FUSED_ATTENTION}/" in name for name in names) == layers
    assert not [name for name in names for part in ATTENTION_PROJECTIONS if f".{part}/" in name]
    types = weight_types(ir / MODEL_XML)
    assert set(types) == {"u8"} and sum(types.values()) == FUSED_MATRICES_PER_LAYER * layers + 1
    assert read_manifest(tiny_model)["artifacts"][OPENVINO_KEY]["fused_projections"] == {FUSED_ATTENTION: layers}


def test_the_fused_ir_computes_the_logits_of_the_unfused_one(tiny_model: Path, unfused_ir: Path) -> None:
    # A prompt, then two decode steps through the KV cache, as generation runs.
    steps = [[5, 17, 42, 99, 3, 250, 7], [61], [300]]
    fused, unfused = logits(tiny_model / OPENVINO_DIR, steps), logits(unfused_ir, steps)
    for step, (a, b) in enumerate(zip(fused, unfused, strict=True)):
        assert np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"step {step}")
    assert [a[0, -1].argmax() for a in fused] == [b[0, -1].argmax() for b in unfused]


def test_symmetric_weights_are_fused_too(tiny_checkpoint: Path, unfused_ir: Path, tmp_path: Path, layers: int) -> None:
    export = export_openvino_int8(Checkpoint.open(tiny_checkpoint), tmp_path, Int8Scheme(symmetric=True))
    assert export.fused_projections == {FUSED_ATTENTION: layers}
    assert export.weight_types == {"i8": FUSED_MATRICES_PER_LAYER * layers + 1}
    steps = [[5, 17, 42, 99], [61]]
    # Symmetric weights differ from asymmetric ones; the fused product must still run and be finite.
    assert all(np.isfinite(step).all() for step in logits(tmp_path, steps))


def test_projections_without_int8_weights_are_left_as_they_are() -> None:
    import openvino.opset13 as ops

    hidden = ops.parameter([1, 4, 8], np.float32, name="hidden")
    outputs = [
        ops.matmul(hidden, ops.constant(np.full((size, 8), 0.5, np.float32)), False, True,
                   name=f"layers.0.self_attn.{name}/MatMul")
        for name, size in zip(ATTENTION_PROJECTIONS, (8, 2, 2), strict=True)
    ]  # fmt: skip
    model = ov.Model(outputs, [hidden])
    before = sorted(op.get_friendly_name() for op in model.get_ops())
    assert fuse_projections(model) == 0
    assert sorted(op.get_friendly_name() for op in model.get_ops()) == before


def compressed_projection(hidden, name: str, rows: int, weight_type: type, seed: int):
    """A MatMul over INT8 weights in nncf's form: Convert(Multiply(Convert(w) [- Convert(zp)], scale))."""
    import openvino.opset13 as ops

    rng = np.random.default_rng(seed)
    weight = ops.convert(ops.constant(rng.integers(0, 127, (rows, 8)).astype(weight_type)), ov.Type.f16)
    if weight_type is np.uint8:
        zero_point = ops.constant(rng.integers(60, 68, (rows, 1)).astype(np.uint8))
        weight = ops.subtract(weight, ops.convert(zero_point, ov.Type.f16))
    scale = ops.constant(rng.uniform(0.01, 0.02, (rows, 1)).astype(np.float16))
    weight = ops.convert(ops.multiply(weight, scale), ov.Type.f32)
    return ops.matmul(hidden, weight, False, True, name=f"layers.0.self_attn.{name}/MatMul")


@pytest.mark.parametrize("weight_types", [(np.uint8,) * 3, (np.int8,) * 3, (np.uint8, np.int8, np.int8)])
def test_only_projections_of_one_int8_layout_are_stacked(weight_types: tuple[type, ...]) -> None:
    import openvino.opset13 as ops

    hidden = ops.parameter([1, 4, 8], np.float32, name="hidden")
    outputs = [compressed_projection(hidden, name, rows, weight_type, seed)
               for seed, (name, rows, weight_type) in enumerate(zip(ATTENTION_PROJECTIONS, (8, 2, 2), weight_types,
                                                                     strict=True))]  # fmt: skip
    model = ov.Model([ops.result(output) for output in outputs], [hidden])
    inputs = np.random.default_rng(9).standard_normal((1, 4, 8)).astype(np.float32)
    expected = ov.Core().compile_model(model.clone(), "CPU", F32)(inputs)

    mixed = len(set(weight_types)) > 1
    assert fuse_projections(model) == (0 if mixed else 1)
    matmuls = [op for op in model.get_ops() if op.get_type_name() == "MatMul"]
    assert len(matmuls) == (3 if mixed else 1)
    fused = ov.Core().compile_model(model, "CPU", F32)(inputs)
    for index in range(len(outputs)):
        np.testing.assert_allclose(fused[index], expected[index], rtol=1e-6, atol=1e-6)


def test_the_unfused_ir_is_fused_when_the_model_is_converted_again(
    tiny_model: Path, tiny_checkpoint: Path, tmp_path: Path, layers: int
) -> None:
    """A folder converted before the fusion existed gets the faster IR from a plain
    ``convert``, without ``--force``; its GGUF is kept."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    manifest = read_manifest(model)
    del manifest["artifacts"][OPENVINO_KEY]["fused_projections"]
    (model / MANIFEST_FILE).write_text(json.dumps(manifest))

    lines: list[str] = []
    result = convert(str(tiny_checkpoint), model, verify=False, log=lines.append)
    assert {artifact.key: artifact.skipped for artifact in result.artifacts} == {GGUF_KEY: True, OPENVINO_KEY: False}
    assert any(line.startswith("openvino: converting again, since it was written before") for line in lines), lines
    assert read_manifest(model)["artifacts"][OPENVINO_KEY]["fused_projections"] == {FUSED_ATTENTION: layers}


def test_another_int8_scheme_converts_the_ir_again(tiny_model: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    lines: list[str] = []
    result = convert(str(tiny_checkpoint), model, verify=False, scheme=Int8Scheme(symmetric=True), log=lines.append)
    assert {artifact.key: artifact.skipped for artifact in result.artifacts} == {GGUF_KEY: True, OPENVINO_KEY: False}
    assert "openvino: converting again, since its weights are int8 asym per-channel and int8 sym per-channel " \
           "were asked for" in lines  # fmt: skip
    record = read_manifest(model)["artifacts"][OPENVINO_KEY]
    assert record["quantization"] == "int8 sym per-channel" and record["symmetric"] is True
    assert weight_types(model / OPENVINO_DIR / MODEL_XML).keys() == {"i8"}
