"""Engines behind one interface, found by name.

Every module in this package that defines ``ENGINE`` (an :class:`Engine` subclass) is
an engine: adding one means adding one module. The engine class is the one place that
says what is true of it (its names, artifact, packages, knobs, ceiling, batching);
the command line, compare, tune, convert's verification and the tests all ask the
registry. Modules named in ``QWENRT_ENGINES`` (comma-separated, importable) are
registered too: an engine kept outside qwenrt, or the tests' throw-away one. Modules
import their engine's library only when a model is opened, so listing engines is cheap.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from functools import cache
from pathlib import Path

from qwenrt.errors import QwenrtError
from qwenrt.runtimes.base import (
    Engine,
    EngineOptions,
    Event,
    GenerationConfig,
    StreamEnd,
    TokenEvent,
)

__all__ = [
    "Engine",
    "EngineOptions",
    "Event",
    "GenerationConfig",
    "StreamEnd",
    "TokenEvent",
    "batching_engine_names",
    "converted_engine_names",
    "engine_class",
    "engine_for_artifact",
    "engine_names",
    "open_engine",
]

_NOT_ENGINES = {"base", "byte_vocab", "chat_template", "fingerprint", "huge_pages", "mapped_pages", "probe", "profiles",
                "settings", "threads"}  # fmt: skip


EXTRA_ENGINES = "QWENRT_ENGINES"


@cache
def _registry() -> dict[str, type[Engine]]:
    modules = [f"{__name__}.{info.name}" for info in pkgutil.iter_modules(__path__) if info.name not in _NOT_ENGINES]
    modules += [name.strip() for name in os.environ.get(EXTRA_ENGINES, "").split(",") if name.strip()]
    engines: dict[str, type[Engine]] = {}
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise QwenrtError(f"{EXTRA_ENGINES} names {module_name!r}, which cannot be imported ({exc})") from None
        engine = getattr(module, "ENGINE", None)
        if engine is not None:
            for name in (engine.name, *engine.aliases):
                if name in engines and engines[name] is not engine:
                    raise QwenrtError(f"two engines are called {name!r}: {engines[name].__module__} and {module_name}")
                engines[name] = engine
    return engines


def engine_names() -> list[str]:
    """Every engine's name (not its aliases), sorted."""
    return sorted({engine.name for engine in _registry().values()})


def converted_engine_names() -> list[str]:
    """The engines that run an artifact 'qwenrt convert' writes: those compared by default."""
    return [name for name in engine_names() if _registry()[name].artifact_key is not None]


def batching_engine_names() -> list[str]:
    return [name for name in converted_engine_names() if _registry()[name].batches]


def engine_for_artifact(key: str) -> type[Engine]:
    """The engine that runs the artifact a manifest lists under ``key`` (the one named so, if several read it)."""
    readers = [_registry()[name] for name in engine_names() if _registry()[name].artifact_key == key]
    if not readers:
        raise QwenrtError(f"no engine reads the {key!r} artifact")
    return next((engine for engine in readers if engine.name == key), readers[0])


def engine_class(name: str) -> type[Engine]:
    """The engine called ``name`` (or one of its aliases)."""
    try:
        return _registry()[name]
    except KeyError:
        raise QwenrtError(f"unknown runtime {name!r}; choose one of {', '.join(engine_names())}") from None


def open_engine(name: str, model_dir: Path, options: EngineOptions | None = None, *, probe: bool = True) -> Engine:
    """Open ``model_dir`` (a qwenrt model folder, or the artifact itself) in engine ``name``.

    Its settings come from the command line, the host profile or qwenrt's rules
    (:mod:`qwenrt.runtimes.settings`). Unless ``probe`` is off, settings never run on this
    host with this engine build and artifact are first tried in a child process, so that a
    native crash becomes a safe fallback or a one-line error (:mod:`qwenrt.runtimes.probe`).
    """
    from qwenrt.runtimes.probe import ProbeRecord, guard
    from qwenrt.supervise import note_engine

    options = options or EngineOptions()
    model_dir = Path(model_dir)
    engine_type = engine_class(name)
    settings, key = engine_type.resolve_settings(model_dir, options)
    if probe:
        context = min(512, options.context_length or engine_type.default_context_length(model_dir))
        settings = guard(engine_type, engine_type.artifact_path(model_dir), settings, key, context)
    engine = engine_type(model_dir, options, settings)
    others = [other for other in converted_engine_names() if other != engine_type.name]
    note_engine(engine_type.description, ProbeRecord(key).path, settings.signature(engine_type.knobs),
                f"--runtime {' or '.join(others)} opens another engine" if others else "")  # fmt: skip
    if options.huge_pages:
        from qwenrt.runtimes.huge_pages import collapse

        collapse()
    return engine
