"""Settings that load only together: a command line that asks for a pair the engine cannot load is
a one-line error; a profile's or a rule's value gives way to the next rule that fits."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import QWENRT

from qwenrt.errors import QwenrtError
from qwenrt.host import this_host
from qwenrt.runtimes import EngineOptions, GenerationConfig, engine_class, open_engine
from qwenrt.runtimes.settings import THREADS, Knob, Rule, fitted, resolve
from qwenrt.tune.search import Candidate, PlannedStep, choice_text


def _needs_same_arithmetic(value: Any, earlier: Mapping[str, Any]) -> str | None:
    return "wants the same arithmetic" if value == "wide" and earlier.get("arithmetic") != "wide" else None


ARITHMETIC = Knob("arithmetic", "", lambda host: ("wide", "narrow"), lambda host: "narrow",
                  rules=(Rule("wide", "rule"),))  # fmt: skip
CACHE = Knob("cache", "", lambda host: ("wide",), lambda host: "small",
             rules=(Rule("wide", "faithful"), Rule("half", "the closest that loads")),
             conflict=_needs_same_arithmetic)  # fmt: skip
KNOBS = (ARITHMETIC, CACHE)


def settle(given: dict[str, Any] | None = None, profile: dict[str, Any] | None = None) -> dict[str, tuple[Any, str]]:
    resolved = resolve(KNOBS, this_host(), threads=1, given=given or {}, profile=profile, engine_defaults=False)
    return {name: (resolved.values[name].value, resolved.values[name].origin) for name in ("arithmetic", "cache")}


def test_a_rule_or_profile_value_that_cannot_load_gives_way_to_the_next_rule() -> None:
    assert settle() == {"arithmetic": ("wide", "rule"), "cache": ("wide", "rule")}
    assert settle({"arithmetic": "narrow"})["cache"] == ("half", "rule")
    profile = {"arithmetic": "wide", "cache": "wide"}
    assert settle({"arithmetic": "narrow"}, profile)["cache"] == ("half", "rule")
    assert settle({}, profile)["cache"] == ("wide", "profile")


def test_a_command_line_pair_that_cannot_load_is_an_error() -> None:
    with pytest.raises(QwenrtError, match=r'^cache="wide" wants the same arithmetic$'):
        settle({"arithmetic": "narrow", "cache": "wide"})


def test_tune_fits_what_depends_on_the_setting_it_changes() -> None:
    host = this_host()
    assert fitted(KNOBS, host, {"arithmetic": "narrow", "cache": "wide"}) == {"arithmetic": "narrow", "cache": "half"}
    assert fitted(KNOBS, host, {"arithmetic": "wide", "cache": "wide"}) == {"arithmetic": "wide", "cache": "wide"}

    class Engine:
        knobs = KNOBS

    current = {"arithmetic": "wide", "cache": "wide"}
    step = PlannedStep("arithmetic", ({"arithmetic": "wide"}, {"arithmetic": "narrow"}))
    configs = step.configs(current, Engine, host)  # type: ignore[arg-type]
    assert configs == [current, {"arithmetic": "narrow", "cache": "half"}]
    assert choice_text("arithmetic", Candidate(configs[1]), Candidate(current)) == '"narrow" (with cache="half")'


def test_openvino_s_cache_follows_its_arithmetic(tiny_model: Path) -> None:
    """The CPU plugin loads an f32 KV cache only with f32 arithmetic: asked for bf16, qwenrt's rule
    gives the cache f16, and the engine answers."""
    from qwenrt.runtimes.ovgenai import KV_CACHE_PRECISION, PRECISION, plugin_default

    engine = engine_class("openvino")
    if "bf16" not in next(knob for knob in engine.knobs if knob.name == PRECISION).candidates(this_host()):
        pytest.skip("the CPU plugin offers no bf16 arithmetic on this CPU")
    options = EngineOptions(threads=1, settings={PRECISION: "bf16"})
    with open_engine("openvino", tiny_model, options) as opened:
        cache = opened.resolved.values[KV_CACHE_PRECISION]
        if plugin_default(KV_CACHE_PRECISION) == "u8":
            assert (cache.value, cache.origin) == ("f16", "rule")
        end = list(opened.stream_chat([{"role": "user", "content": "Hello"}], GenerationConfig(max_tokens=4)))[-1]
        assert end.generated_tokens > 0
    assert "f16" not in next(knob for knob in engine.knobs if knob.name == PRECISION).candidates(this_host())


def test_the_command_line_says_which_pair_cannot_load(tiny_model: Path) -> None:
    import subprocess

    done = subprocess.run([*QWENRT, "chat", "--runtime", "openvino", "--model", str(tiny_model), "-p", "Hi",
                           "--set", "INFERENCE_PRECISION_HINT=bf16", "--set", "KV_CACHE_PRECISION=f32"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        'qwenrt: error: KV_CACHE_PRECISION="f32" does not load with INFERENCE_PRECISION_HINT="bf16": '
        "the CPU plugin wants them the same"
    ]


def test_a_safe_fallback_takes_what_depends_on_it_along() -> None:
    """A fallback overrides the command line; a value given beside it that cannot load with the
    fallback's gives way to the next rule that fits, so the fallback itself can load."""
    host = this_host()
    given = resolve(KNOBS, host, threads=1, given={"arithmetic": "wide", "cache": "wide"}, profile=None,
                    engine_defaults=False)  # fmt: skip
    fallen_back = given.replaced({"arithmetic": "narrow"}, "rule", "wide arithmetic crashed here", KNOBS, host)
    assert fallen_back.values["arithmetic"].value == "narrow"
    cache = fallen_back.values["cache"]
    assert (cache.value, cache.origin) == ("half", "rule")
    assert cache.why == 'the closest that loads (cache="wide" wants the same arithmetic)'
    assert fallen_back.values[THREADS] == given.values[THREADS]


def test_openvino_s_fallback_from_a_bf16_pair_loads(tiny_model: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Asked for bf16 arithmetic with a bf16 cache, on a host where that crashes (the test switch),
    the probe's fallback to f32 arithmetic takes the cache to one that loads beside it, and the
    engine answers instead of failing to load."""
    from qwenrt.runtimes.ovgenai import KV_CACHE_PRECISION, PRECISION
    from qwenrt.runtimes.probe import CRASH_SWITCH

    engine = engine_class("openvino")
    if "bf16" not in next(knob for knob in engine.knobs if knob.name == PRECISION).candidates(this_host()):
        pytest.skip("the CPU plugin offers no bf16 arithmetic on this CPU")
    monkeypatch.setenv("QWENRT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(CRASH_SWITCH, f'openvino:{PRECISION}="bf16"')
    options = EngineOptions(threads=1, settings={PRECISION: "bf16", KV_CACHE_PRECISION: "bf16"})
    with pytest.warns(UserWarning, match="bf16/f16 arithmetic"), open_engine("openvino", tiny_model, options) as opened:
        assert opened.settings()[PRECISION] == "f32"
        cache = opened.resolved.values[KV_CACHE_PRECISION]
        assert cache.value != "bf16" and cache.origin in ("rule", "engine default")
        assert "wants them the same" in cache.why
        end = list(opened.stream_chat([{"role": "user", "content": "Hello"}], GenerationConfig(max_tokens=4)))[-1]
        assert end.generated_tokens > 0
