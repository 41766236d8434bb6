"""A native engine crash never reaches the user: the probe, its fallback, its record.

The crashes here are real signals: ``QWENRT_TEST_CRASH_PROBE`` makes the probe's child
process kill itself with SIGILL once the engine has loaded with matching settings, as
llama.cpp's AMX kernels did on an Intel Xeon before qwenrt's patch (BENCHMARKS.md,
"Hosts"). Where the CPU really has AMX, the patched kernels are run for real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QWENRT
from helpers import snapshot, staging_folders

from qwenrt.errors import QwenrtError
from qwenrt.host import this_host
from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, engine_class, open_engine
from qwenrt.runtimes.probe import CRASH_SWITCH, EngineCrashError, probes_dir, run_probe

GGUF_AMX_OFF = "gguf:extra_buffer_types=true"


@pytest.fixture
def fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A qwenrt home with no probe outcomes yet: the next open probes again."""
    home = tmp_path / "home"
    monkeypatch.setenv("QWENRT_HOME", str(home))
    return home


def records(home: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((home / "probes").glob("*.json"))]


def answer(engine) -> StreamEnd:
    events = list(engine.stream_chat([{"role": "user", "content": "Hello"}], GenerationConfig(max_tokens=4)))
    assert isinstance(events[-1], StreamEnd)
    return events[-1]


def test_a_crashing_setting_falls_back_with_a_warning_and_is_remembered(
    tiny_model: Path, fresh_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRASH_SWITCH, GGUF_AMX_OFF)
    with pytest.warns(UserWarning, match=r"running without llama\.cpp's extra buffer types.*SIGILL"):
        engine = open_engine("gguf", tiny_model, EngineOptions(threads=1))
    with engine:
        assert engine.resolved["extra_buffer_types"] is False
        assert engine.resolved.values["extra_buffer_types"].origin == "rule"
        assert engine.settings()["extra_buffer_types"] is False
        assert answer(engine).generated_tokens >= 1
    [record] = records(fresh_home)
    outcomes = list(record["outcomes"].values())
    assert [o["ok"] for o in outcomes] == [False, True]
    assert outcomes[0]["signal"] == "SIGILL"
    assert record["key"]["cpu"] == this_host().cpu
    assert record["key"]["engine_build"].startswith("llama-cpp-python ")

    # Known now: the next start neither probes (the record is not rewritten) nor runs the
    # crashing setting, even once the switch is gone.
    written = (probes_dir() / next(p.name for p in probes_dir().glob("*.json"))).stat().st_mtime_ns
    monkeypatch.delenv(CRASH_SWITCH)
    with pytest.warns(UserWarning, match="extra buffer types"):
        engine = open_engine("gguf", tiny_model, EngineOptions(threads=1))
    with engine:
        assert engine.settings()["extra_buffer_types"] is False
    assert next(probes_dir().glob("*.json")).stat().st_mtime_ns == written


def test_an_openvino_crash_falls_back_to_plain_f32(
    tiny_model: Path, fresh_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRASH_SWITCH, "openvino:DYNAMIC_QUANTIZATION_GROUP_SIZE=128")
    with pytest.warns(UserWarning, match="dynamic quantisation"):
        engine = open_engine("openvino", tiny_model, EngineOptions(threads=1, settings={
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 128}))  # fmt: skip
    with engine:
        assert engine.settings()["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0
        assert engine.settings()["INFERENCE_PRECISION_HINT"] == "f32"
        assert answer(engine).generated_tokens >= 1


def test_when_nothing_is_safe_opening_is_a_one_line_error(
    tiny_model: Path, fresh_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CRASH_SWITCH, "gguf")
    with pytest.raises(EngineCrashError, match="crashes on this CPU .* SIGILL .* use another --runtime"):
        open_engine("gguf", tiny_model, EngineOptions(threads=1))
    result = subprocess.run([*QWENRT, "chat", "--runtime", "gguf", "--model", str(tiny_model), "-p", "Hi"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwenrt: error: llama.cpp"), result.stderr
    assert "Traceback" not in result.stderr


def test_an_engine_error_is_not_taken_for_a_crash(tiny_model: Path, fresh_home: Path) -> None:
    """A child that fails with an error of its own leaves no record: the open says what is wrong."""
    engine = engine_class("gguf")
    settings, _ = engine.resolve_settings(tiny_model, EngineOptions(threads=1, settings={"n_ubatch": "lots"}))
    outcome = run_probe(engine, engine.artifact_path(tiny_model), settings, 512)
    assert outcome["ok"] is None and outcome["error"]
    assert not (fresh_home / "probes").exists() or not list((fresh_home / "probes").glob("*.json"))


def test_a_crash_while_converting_leaves_the_model_folder_as_it_was(
    tiny_checkpoint: Path, tmp_path: Path, fresh_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenrt.convert.pipeline import convert

    out = tmp_path / "model"
    convert(str(tiny_checkpoint), out, formats=("openvino",), log=lambda line: None)
    before = snapshot(out)
    monkeypatch.setenv(CRASH_SWITCH, "gguf")
    with pytest.raises(QwenrtError, match="crashes on this CPU"):
        convert(str(tiny_checkpoint), out, formats=("gguf", "openvino"), log=lambda line: None)
    assert snapshot(out) == before
    assert staging_folders(out) == []


def test_a_conversion_that_needs_the_fallback_succeeds_and_says_so(
    tiny_checkpoint: Path, tmp_path: Path, fresh_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenrt.convert.pipeline import convert

    monkeypatch.setenv(CRASH_SWITCH, GGUF_AMX_OFF)
    lines: list[str] = []
    result = convert(str(tiny_checkpoint), tmp_path / "model", formats=("gguf",), log=lines.append)
    assert any("running without llama.cpp's extra buffer types" in line for line in lines), lines
    assert any(line.startswith("gguf: verified in its engine") for line in lines), lines
    # The verification is the probe: opening the new model needs no second one.
    monkeypatch.delenv(CRASH_SWITCH)
    with pytest.warns(UserWarning, match="extra buffer types"):
        open_engine("gguf", result.out_dir, EngineOptions(threads=1)).close()
    assert len(records(fresh_home)) == 1


@pytest.mark.parametrize("runtime", ["gguf", "openvino"])
def test_every_setting_tried_runs_for_real(tiny_model: Path, fresh_home: Path, runtime: str) -> None:
    """No switch: each engine's settings as resolved here run in the child (on an AMX host,
    llama.cpp's patched AMX kernels among them)."""
    engine = engine_class(runtime)
    settings, _ = engine.resolve_settings(tiny_model, EngineOptions(threads=1))
    outcome = run_probe(engine, engine.artifact_path(tiny_model), settings, 512)
    assert outcome["ok"] is True, outcome


@pytest.mark.real_weights
def test_llama_cpp_runs_its_amx_kernels_on_the_demo_model(demo_model: Path, fresh_home: Path) -> None:
    """The crash qwenrt's patch fixes came on the demo model's first prompt, on AMX hosts; its
    weights are large enough for llama.cpp to repack them. Elsewhere the same setting runs the
    CPU's other kernels, and must work as well."""
    engine = engine_class("gguf")
    settings, _ = engine.resolve_settings(demo_model, EngineOptions(settings={"extra_buffer_types": True}))
    outcome = run_probe(engine, engine.artifact_path(demo_model), settings, 512)
    assert outcome["ok"] is True, outcome
    if this_host().has("amx_int8"):
        log = subprocess.run(
            [sys.executable, "-c", "import sys, llama_cpp; llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=True)",
             str(engine.artifact_path(demo_model))], capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert "AMX" in log.stderr, log.stderr[-2000:]
