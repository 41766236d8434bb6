"""OpenVINO's AMX INT8 MLP combination (qwenrt.runtimes.ovgenai.AMX_INT8_MLP): settings that
pay only together, which ``qwenrt tune`` tries as one step where the host and the IR allow.

What every host checks: when the step is planned, how tune chooses and reports it, and that
the engine answers with it. What only a CPU with AMX can show, the CPU plugin's fused
kernel itself on the symmetric IR and never on the asymmetric one, runs there."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import openvino as ov
import pytest

from qwenrt.convert.checkpoint import Checkpoint
from qwenrt.convert.openvino_int8 import MODEL_XML, Int8Scheme, export_openvino_int8
from qwenrt.host import this_host
from qwenrt.manifest import MANIFEST_FILE, OPENVINO_DIR, OPENVINO_KEY
from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, engine_class, open_engine
from qwenrt.runtimes.ovgenai import AMX_INT8_MLP, OpenVINOEngine, _capabilities
from qwenrt.tune import report
from qwenrt.tune.search import OBJECTIVES, Candidate, _choose, plan

AMX = {"amx_int8", "amx_bf16"}
HAS_AMX = this_host().flags >= AMX and "BF16" in _capabilities()


def with_scheme(tiny_model: Path, folder: Path, symmetric: bool) -> Path:
    """A model folder whose manifest says the OpenVINO weights are (or are not) symmetric."""
    folder.mkdir()
    manifest = json.loads((tiny_model / MANIFEST_FILE).read_text())
    manifest["artifacts"][OPENVINO_KEY]["symmetric"] = symmetric
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def step_names(model_dir: Path, flags: frozenset[str]) -> list[str]:
    host = replace(this_host(), flags=flags)
    return [step.name for step in plan(OpenVINOEngine, OBJECTIVES["first-token"], model_dir, host)]


def test_tune_plans_the_combination_only_for_symmetric_weights_on_amx(tiny_model: Path, tmp_path: Path) -> None:
    symmetric = with_scheme(tiny_model, tmp_path / "sym", True)
    asymmetric = with_scheme(tiny_model, tmp_path / "asym", False)
    with_amx, without_amx = this_host().flags | AMX, this_host().flags - AMX
    # bf16 arithmetic is the plugin's to offer: where it does not, the kernel cannot run either.
    assert (AMX_INT8_MLP.name in step_names(symmetric, with_amx)) == ("BF16" in _capabilities())
    assert AMX_INT8_MLP.name not in step_names(asymmetric, with_amx)
    assert AMX_INT8_MLP.name not in step_names(symmetric, without_amx)
    assert engine_class("gguf").combinations == ()
    # The step comes after every knob's: it starts from the best each of them found.
    names = step_names(symmetric, with_amx)
    assert names[: len(OpenVINOEngine.knobs) + 1] == ["threads", *(knob.name for knob in OpenVINOEngine.knobs)]


def test_tune_takes_the_combination_only_when_it_wins_and_says_what_it_changed() -> None:
    goal = OBJECTIVES["first-token"]
    found = {"threads": 2, "INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32",
             "DYNAMIC_QUANTIZATION_GROUP_SIZE": 128}  # fmt: skip
    combined = {**found, **AMX_INT8_MLP.values}
    current = Candidate(found, values=[60.0, 61.0])  # the objective, in ms
    faster = Candidate(combined, values=[52.0, 53.0])
    step = _choose(AMX_INT8_MLP.name, [current, faster], goal)
    assert step.chosen is faster
    assert step.why.startswith('changed to AMX INT8 MLP (INFERENCE_PRECISION_HINT="bf16", KV_CACHE_PRECISION="f16", '
                               "DYNAMIC_QUANTIZATION_GROUP_SIZE=4294967295) 52.5 ms against 60.5 ms")  # fmt: skip
    slower = Candidate(combined, values=[70.0, 71.0])
    kept = _choose(AMX_INT8_MLP.name, [current, slower], goal)
    assert kept.chosen is current and kept.why.startswith("kept without AMX INT8 MLP: the best other, AMX INT8 MLP (")
    rows = report.step_rows(step, goal)
    assert [row[1] for row in rows] == ["without AMX INT8 MLP",
                                        "AMX INT8 MLP (INFERENCE_PRECISION_HINT=\"bf16\", KV_CACHE_PRECISION=\"f16\", "
                                        "DYNAMIC_QUANTIZATION_GROUP_SIZE=4294967295) ◀"]  # fmt: skip


def test_the_dry_run_lists_the_combination_with_its_values(tiny_model: Path, tmp_path: Path) -> None:
    step = plan(OpenVINOEngine, OBJECTIVES["first-token"], with_scheme(tiny_model, tmp_path / "sym", True),
                replace(this_host(), flags=this_host().flags | AMX))[-1]  # fmt: skip
    if not step.combination:
        pytest.skip("the CPU plugin offers no bf16 arithmetic on this CPU: the combination never applies")
    start = {"threads": 2, "INFERENCE_PRECISION_HINT": "f32"}
    text = report.render_plan("openvino", "build", [step], start, OBJECTIVES["first-token"], 2)
    assert "AMX INT8 MLP" in text and "the settings found so far" in text
    assert 'INFERENCE_PRECISION_HINT="bf16"' in text and "DYNAMIC_QUANTIZATION_GROUP_SIZE=4294967295" in text
    assert "about 3 candidate processes" in text
    assert f"AMX INT8 MLP: {AMX_INT8_MLP.why}" in text
    assert step.configs({**start, **AMX_INT8_MLP.values}) == [{**start, **AMX_INT8_MLP.values}]  # nothing to try


@pytest.fixture(scope="module")
def symmetric_model(tiny_model: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qwenrt.convert.pipeline import convert

    model = tmp_path_factory.mktemp("symmetric") / "model"
    shutil.copytree(tiny_model, model)
    convert(str(tiny_checkpoint), model, verify=False, scheme=Int8Scheme(symmetric=True), log=lambda _: None)
    return model


@pytest.mark.skipif("BF16" not in _capabilities(), reason="the CPU plugin offers no bf16 arithmetic on this CPU")
def test_the_engine_answers_with_the_combination(symmetric_model: Path) -> None:
    options = EngineOptions(threads=2, settings=dict(AMX_INT8_MLP.values))
    with open_engine("openvino", symmetric_model, options) as engine:
        assert {name: engine.resolved.values[name].origin for name in AMX_INT8_MLP.values} == dict.fromkeys(
            AMX_INT8_MLP.values, "command line"
        )
        events = list(engine.stream(engine.tokenize("hello world"), GenerationConfig(max_tokens=6, ignore_eos=True)))
    assert isinstance(events[-1], StreamEnd) and events[-1].generated_tokens == 6


def fused_layer_types(model_xml: Path) -> set[str]:
    properties = {**AMX_INT8_MLP.values, "INFERENCE_NUM_THREADS": 2}
    compiled = ov.Core().compile_model(model_xml, "CPU", properties)
    return {op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()}


@pytest.mark.skipif(not HAS_AMX, reason="the fused AMX kernel exists only on a CPU with AMX INT8 and BF16")
def test_on_amx_the_plugin_fuses_the_mlp_of_symmetric_weights_only(
    symmetric_model: Path, tiny_model: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    assert "LLMMLP" in fused_layer_types(symmetric_model / OPENVINO_DIR / MODEL_XML)
    assert "LLMMLP" not in fused_layer_types(tiny_model / OPENVINO_DIR / MODEL_XML)
    # q/k/v left apart as optimum-intel writes them: the plugin still fuses the MLP.
    apart = tmp_path / "apart"
    export_openvino_int8(Checkpoint.open(tiny_checkpoint), apart, Int8Scheme(symmetric=True), fuse_qkv=False)
    assert "LLMMLP" in fused_layer_types(apart / MODEL_XML)
