"""Engines behind one interface, found by name.

Every module in this package that defines ``ENGINE`` (an :class:`Engine` subclass) is
an engine: adding one means adding one module. Modules import their engine's library
only when a model is opened, so listing engines is cheap.
"""

from __future__ import annotations

import importlib
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
    "engine_class",
    "engine_names",
    "open_engine",
]

_NOT_ENGINES = {"base", "byte_vocab", "chat_template", "fingerprint", "huge_pages", "mapped_pages", "probe", "profiles",
                "settings", "threads"}  # fmt: skip


@cache
def _registry() -> dict[str, type[Engine]]:
    engines: dict[str, type[Engine]] = {}
    for module_info in pkgutil.iter_modules(__path__):
        if module_info.name in _NOT_ENGINES:
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        engine = getattr(module, "ENGINE", None)
        if engine is not None:
            engines[engine.name] = engine
    return engines


def engine_names() -> list[str]:
    return sorted(_registry())


def engine_class(name: str) -> type[Engine]:
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
    others = [other for other in engine_names() if other != name]
    note_engine(engine_type.description, ProbeRecord(key).path, settings.signature(engine_type.knobs),
                f"--runtime {' or '.join(others)} opens another engine" if others else "")  # fmt: skip
    if options.huge_pages:
        from qwenrt.runtimes.huge_pages import collapse

        collapse()
    return engine
