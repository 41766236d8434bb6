"""Shared fixtures: a tiny Qwen2 checkpoint and its two converted artifacts, built once per run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tiny_qwen2  # noqa: E402

from qwenrt.paths import cache_root  # noqa: E402
from qwenrt.runtimes import converted_engine_names  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Every engine the registry knows that runs a converted artifact: an engine added to
# qwenrt/runtimes (or named in QWENRT_ENGINES) is tested like the others without a change here.
ENGINES = converted_engine_names()
QWENRT = [sys.executable, "-m", "qwenrt.cli"]


# The demo weights and their conversion persist between runs (CI included) in the
# user's cache, apart from the model folder that 'make demo' writes.
USER_CACHE = cache_root()


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test sees an empty qwenrt home, so none reads or writes the user's models."""
    home = tmp_path_factory.mktemp("qwenrt-home")
    os.environ["QWENRT_HOME"] = str(home)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return home


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qwenrt model folder (GGUF Q8_0, OpenVINO INT8, manifest) converted from the tiny checkpoint."""
    from qwenrt.convert.pipeline import convert

    out = tmp_path_factory.mktemp("tiny-model") / "model"
    convert(str(tiny_checkpoint), out, log=lambda line: None)
    return out


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo model, converted on first use and kept in the user's cache."""
    from qwenrt.convert.pipeline import convert

    previous = os.environ["QWENRT_HOME"]
    os.environ["QWENRT_HOME"] = str(USER_CACHE)
    try:
        return convert("demo", USER_CACHE / "test-models" / "demo", log=print).out_dir
    finally:
        os.environ["QWENRT_HOME"] = previous


@pytest.fixture(scope="module")
def engines(tiny_model: Path):
    """Both engines open on the tiny model, for the runtime and chat tests (each module its own).

    One thread each: the tiny model gains nothing from two, and a machine shared with
    other work slows llama.cpp's spinning thread pool down badly when a core is taken.
    No prefix cache: OpenVINO's changes greedy answers a little (see the prefix-cache
    tests), and these tests ask the same question twice and compare the answers.
    """
    from qwenrt.runtimes import EngineOptions, open_engine

    opened = {name: open_engine(name, tiny_model, EngineOptions(threads=1, prefix_cache=False)) for name in ENGINES}
    yield opened
    for engine in opened.values():
        engine.close()


@pytest.fixture(scope="module")
def logit_engines(tiny_model: Path):
    """Every engine opened for each position's logits (Engine.window_logits) on the tiny model."""
    from qwenrt.runtimes import EngineOptions, open_engine

    opened = {name: open_engine(name, tiny_model, EngineOptions(threads=1, all_logits=True)) for name in ENGINES}
    yield opened
    for engine in opened.values():
        engine.close()


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, engines: dict):
    return engines[request.param]
