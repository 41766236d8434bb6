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

_NOT_ENGINES = {"base", "byte_vocab", "chat_template", "huge_pages", "mapped_pages", "threads"}


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


def open_engine(name: str, model_dir: Path, options: EngineOptions | None = None) -> Engine:
    """Open ``model_dir`` (a qwenrt model folder, or the artifact itself) in engine ``name``."""
    options = options or EngineOptions()
    engine = engine_class(name)(Path(model_dir), options)
    if options.huge_pages:
        from qwenrt.runtimes.huge_pages import collapse

        collapse()
    return engine
