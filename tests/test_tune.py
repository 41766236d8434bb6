"""qwenrt tune, end to end on the tiny model: candidates in their own processes, a profile every command uses."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import QWENRT

from qwenrt.host import this_host
from qwenrt.runtimes import EngineOptions, engine_class, open_engine
from qwenrt.runtimes.probe import CRASH_SWITCH, ProbeRecord
from qwenrt.runtimes.profiles import load_profile, save_profile
from qwenrt.tune.search import MIN_GAIN, OBJECTIVES, Candidate, _choose, can_still_win, thread_candidates


def run(*args: str, home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*QWENRT, *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "QWENRT_HOME": str(home), **env})  # fmt: skip


def test_dry_run_lists_every_setting_and_measures_nothing(tiny_model: Path, tmp_path: Path) -> None:
    result = run("tune", "--model", str(tiny_model), "--dry-run", home=tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("threads", "extra_buffer_types", "INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION",
                 "DYNAMIC_QUANTIZATION_GROUP_SIZE"):  # fmt: skip
        assert name in result.stdout
    assert this_host().cpu in result.stdout
    # A short prompt fits in one micro-batch, and hides what flash attention costs a longer context's decode.
    assert "n_ubatch" not in result.stdout and "flash_attention" not in result.stdout
    prefill = run("tune", "--model", str(tiny_model), "--dry-run", "--objective", "prefill", home=tmp_path).stdout
    assert "n_ubatch" in prefill and "flash_attention" in prefill
    assert not (tmp_path / "profiles").exists()


@pytest.fixture(scope="module")
def tuned(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """Both engines tuned on the tiny model, with llama.cpp crashing on purpose without its extra buffer types."""
    home = tmp_path_factory.mktemp("tuned-home")
    out = home / "tune.json"
    result = run("tune", "--model", str(tiny_model), "--rounds", "1", "--json", str(out), home=home,
                 **{CRASH_SWITCH: "gguf:extra_buffer_types=false"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return home, json.loads(out.read_text()), result.stdout


def test_tune_measures_each_candidate_and_saves_the_winners(tuned: tuple[Path, dict, str], tiny_model: Path) -> None:
    home, document, stdout = tuned
    assert document["schema"] == "qwenrt.tune/1" and document["host"]["key"] == this_host().key
    engines = {entry["engine"]: entry for entry in document["engines"]}
    assert set(engines) == {"gguf", "openvino"}
    for name, entry in engines.items():
        tried = {step["knob"] for step in entry["steps"]}
        assert "threads" in tried
        for step in entry["steps"]:
            assert step["why"]
            for candidate in step["candidates"]:
                assert candidate["failed"] or len(candidate["values"]) == 1
        versus = entry["versus_engine_defaults"]
        assert [c["config"].get("engine_defaults", False) for c in versus["candidates"]] == [False, True]
        # The profile keeps what the objective measured; llama.cpp's flash attention and micro-batch
        # stay with the rules.
        saved = json.loads(next((home / "profiles").glob(f"{name}-*.json")).read_text())
        unweighed = {knob.name for knob in engine_class(name).knobs if knob.objectives is not None}
        assert saved["settings"] == {s: v for s, v in entry["winner"].items() if s not in unweighed}
        assert saved["key"]["cpu"] == this_host().cpu
    assert "profile:" in stdout and "saved to" in stdout
    assert "flash_attention, n_ubatch: qwenrt's rules (not weighed by end-to-end)" in stdout


def test_every_openvino_candidate_loads(tuned: tuple[Path, dict, str]) -> None:
    """A step that changes a setting another one depends on carries that one along: bf16
    arithmetic is tried with the f16 KV cache it loads with, not qwenrt's f32."""
    _, document, _ = tuned
    openvino = next(entry for entry in document["engines"] if entry["engine"] == "openvino")
    for step in openvino["steps"]:
        for candidate in step["candidates"]:
            assert not candidate["failed"], (step["knob"], candidate["config"], candidate["failed"])
    precision = next(step for step in openvino["steps"] if step["knob"] == "INFERENCE_PRECISION_HINT")
    for candidate in precision["candidates"]:
        if candidate["config"]["INFERENCE_PRECISION_HINT"] == "bf16":
            assert candidate["config"]["KV_CACHE_PRECISION"] in ("f16", None)


def test_a_crashing_candidate_is_out_and_remembered(tuned: tuple[Path, dict, str], tiny_model: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    home, document, _ = tuned
    gguf = next(entry for entry in document["engines"] if entry["engine"] == "gguf")
    step = next(step for step in gguf["steps"] if step["knob"] == "extra_buffer_types")
    crashed = next(c for c in step["candidates"] if c["config"]["extra_buffer_types"] is False)
    assert crashed["signal"] == "SIGILL"
    assert step["chosen"]["extra_buffer_types"] is True
    monkeypatch.setenv("QWENRT_HOME", str(home))
    _, key = engine_class("gguf").resolve_settings(tiny_model, EngineOptions())
    outcomes = ProbeRecord(key).outcomes().values()
    assert any(o["ok"] is False and o["signal"] == "SIGILL" for o in outcomes)


def test_commands_use_the_profile_and_say_so(tuned: tuple[Path, dict, str], tiny_model: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    home, document, _ = tuned
    monkeypatch.setenv("QWENRT_HOME", str(home))
    for name in ("gguf", "openvino"):
        winner = next(entry for entry in document["engines"] if entry["engine"] == name)["winner"]
        # What the end-to-end objective does not weigh (llama.cpp's flash attention and micro-batch)
        # stays with qwenrt's rules.
        unweighed = {knob.name for knob in engine_class(name).knobs if knob.objectives is not None}
        pinned = {setting: value for setting, value in winner.items() if setting not in unweighed}
        engine = open_engine(name, tiny_model)
        with engine:
            origins = {setting: value.origin for setting, value in engine.resolved.values.items()}
            assert {setting: origins[setting] for setting in pinned} == dict.fromkeys(pinned, "profile"), origins
            assert all(origins[setting] in ("rule", "engine default") for setting in unweighed), origins
            assert {setting: engine.resolved.plain()[setting] for setting in pinned} == pinned
        # The command line still wins over the profile.
        with open_engine(name, tiny_model, EngineOptions(threads=1)) as engine:
            assert engine.resolved.values["threads"].origin == "command line"
    result = run("compare", "--model", str(tiny_model), "--max-tokens", "8", "--repeat", "1", "--warmup", "0",
                 home=home)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "[profile]" in result.stdout and "measured on this host by 'qwenrt tune'" in result.stdout


def test_a_profile_belongs_to_its_host_engine_build_and_artifact(tuned: tuple[Path, dict, str], tiny_model: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    home, _, _ = tuned
    monkeypatch.setenv("QWENRT_HOME", str(home))
    _, key = engine_class("gguf").resolve_settings(tiny_model, EngineOptions())
    assert load_profile(key) is not None
    from dataclasses import replace

    assert load_profile(replace(key, engine_build="llama-cpp-python 9.9.9")) is None
    assert load_profile(replace(key, artifact="sha256:another")) is None
    assert load_profile(replace(key, host=replace(key.host, flags=key.host.flags | {"amx_fp16"}))) is None


def test_a_profile_pins_only_what_its_objective_measured(tiny_model: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A profile tuned for the short chat answer does not pin llama.cpp's flash attention, which
    that objective cannot weigh (it slows a longer context's decode); one tuned for prefill does."""
    monkeypatch.setenv("QWENRT_HOME", str(tmp_path))
    gguf = engine_class("gguf")
    _, key = gguf.resolve_settings(tiny_model, EngineOptions())
    chosen = {"threads": 1, "extra_buffer_types": True, "flash_attention": True, "n_ubatch": 512}
    for objective, pinned in (("end-to-end", False), ("prefill", True)):
        save_profile(key, chosen, {"objective": objective})  # as a profile saved before tune left them out
        settings, _ = gguf.resolve_settings(tiny_model, EngineOptions())
        assert (settings["threads"], settings.values["threads"].origin) == (1, "profile")
        flash = settings.values["flash_attention"]
        assert (flash.value, flash.origin) == ((True, "profile") if pinned else (None, "engine default"))
        assert (settings.values["n_ubatch"].origin == "profile") is pinned


def test_noise_never_moves_a_setting() -> None:
    goal = OBJECTIVES["end-to-end"]
    current = Candidate({"threads": 2}, values=[3.00, 3.00, 3.00])
    barely = Candidate({"threads": 1}, values=[2.99, 2.98, 2.99])  # better by less than MIN_GAIN
    assert _choose("threads", [current, barely], goal).chosen is current
    lucky = Candidate({"threads": 1}, values=[2.0, 3.1, 3.2])  # one lucky round of three
    assert _choose("threads", [current, lucky], goal).chosen is current
    better = Candidate({"threads": 1}, values=[2.5, 2.6, 3.1])
    step = _choose("threads", [current, better], goal)
    assert step.chosen is better and f"more than {MIN_GAIN:.0%} in 2 of 3 rounds" in step.why
    crashed = Candidate({"threads": 2}, failed="worker crashed inside the engine: SIGILL", signal="SIGILL")
    assert _choose("threads", [crashed, better], goal).chosen is better


def test_a_candidate_that_can_no_longer_win_is_out_of_the_running() -> None:
    goal = OBJECTIVES["end-to-end"]  # seconds: lower is better
    assert not can_still_win([3.5], [3.0], rounds=2, objective=goal)  # it would need both rounds
    assert not can_still_win([2.99], [3.0], rounds=2, objective=goal)  # better, but by less than MIN_GAIN
    assert can_still_win([2.5], [3.0], rounds=2, objective=goal)
    assert can_still_win([3.5], [3.0], rounds=3, objective=goal)  # two rounds left, two of three to win
    assert not can_still_win([3.5, 3.4], [3.0, 3.0], rounds=3, objective=goal)
    assert can_still_win([3.5, 2.5], [3.0, 3.0], rounds=3, objective=goal)
    speed = OBJECTIVES["decode"]  # tokens a second: higher is better
    assert can_still_win([40.0], [30.0], rounds=2, objective=speed)
    assert not can_still_win([20.0], [30.0], rounds=2, objective=speed)

    # Out of the running, a candidate is never chosen, whatever its median, and is named only if
    # every other one is out too.
    current = Candidate({"threads": 2}, values=[3.0, 4.0])
    out = Candidate({"threads": 1}, values=[3.2], out_after=1)  # a median below the current's 3.5
    step = _choose("threads", [current, out], goal)
    assert step.chosen is current and "then out of the running" in step.why
    steady = Candidate({"threads": 3}, values=[3.3, 3.6])
    step = _choose("threads", [current, out, steady], goal)
    assert step.chosen is current and "3 3.45 s" in step.why and "out of the running" not in step.why


def test_tune_stops_measuring_a_candidate_once_it_cannot_win(tiny_model: Path) -> None:
    """Real trials on the tiny model: whichever candidates lose, each one is either measured in every
    round or out after the round that made a majority out of its reach, its process closed."""
    from qwenrt.runtimes.probe import ProbeRecord
    from qwenrt.tune.search import _WorkerPool, starting_config

    engine, goal, rounds = engine_class("openvino"), OBJECTIVES["end-to-end"], 3
    start, key = starting_config(engine, tiny_model)
    configs = [start, {**start, "threads": 1}, {**start, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0},
               {**start, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 64}]  # fmt: skip
    pool = _WorkerPool(engine, tiny_model, replace(goal, max_tokens=8), key, ProbeRecord(key), lambda _: None)
    try:
        candidates = pool.run(configs, rounds, "test")
        open_configs = set(pool.workers)
    finally:
        pool.close()
    current, others = candidates[0], candidates[1:]
    assert len(current.values) == rounds and current.out_after is None
    for candidate in others:
        assert candidate.paired == current.values[: len(candidate.values)]
        if candidate.out_after is None:
            assert len(candidate.values) == rounds
            assert json.dumps(candidate.config, sort_keys=True) in open_configs
        else:
            assert len(candidate.values) == candidate.out_after < rounds
            assert not can_still_win(candidate.values, candidate.paired, rounds, goal)
            assert can_still_win(candidate.values[:-1], candidate.paired[:-1], rounds, goal)
            assert json.dumps(candidate.config, sort_keys=True) not in open_configs


def test_a_first_token_measurement_is_the_median_of_several_answers(tiny_model: Path) -> None:
    from qwenrt.tune.trial import TrialSpec, TrialWorker

    goal = OBJECTIVES["first-token"]
    assert goal.repeat > 1
    worker = TrialWorker(TrialSpec("openvino", str(tiny_model), {"threads": 1}, goal.scenario, goal.max_tokens,
                                   goal.repeat))  # fmt: skip
    try:
        worker.wait_ready(300)
        measured = worker.measure(300)
    finally:
        worker.close()
    assert measured["generations"] == goal.repeat and measured["first_token_s"] > 0


def test_thread_candidates_cover_small_boxes_fully_and_big_ones_sparsely() -> None:
    from dataclasses import replace

    host = this_host()
    assert thread_candidates(replace(host, physical_cores=2)) == (1, 2)
    assert thread_candidates(replace(host, physical_cores=12)) == (1, 2, 4, 8, 12)
