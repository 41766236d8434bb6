"""A throw-away engine for the registry's test: llama.cpp again, under another name.

Registered only where QWENRT_ENGINES names this module (tests/test_registry.py); it
changes nothing else, and must appear everywhere an engine does.
"""

from __future__ import annotations

from qwenrt.runtimes.llamacpp import LlamaCppEngine


class ThrowawayEngine(LlamaCppEngine):
    name = "gguf-copy"
    description = "llama.cpp again under another name (qwenrt's registry test)"
    aliases = ("copy",)


ENGINE = ThrowawayEngine
