"""Try an engine's settings on an artifact in a child process before running them here.

Engines are native code compiled for the CPU they run on, and some of their kernels only
run on some CPUs: on an Intel Xeon with AMX, llama.cpp as built from source dies with
SIGILL at its first prompt (BENCHMARKS.md, "Hosts"). A signal cannot be caught, so the
first time an engine runs a given artifact with given settings on a host, qwenrt runs
it in a child first (load, a prompt of some hundred tokens, a few new tokens) and keeps
the outcome under the qwenrt home, keyed by host, engine build and artifact
(:mod:`qwenrt.runtimes.fingerprint`). Later starts read the outcome and cost nothing.

When the child dies by a signal, the engine's safe fallbacks (``Engine.safe_fallbacks``)
are tried the same way; the first that works is used, with a one-line warning naming
what was turned off and why. When none works, opening the engine is a one-line error.

``QWENRT_TEST_CRASH_PROBE`` makes probe children (and tune's candidates) kill themselves
with SIGILL once the engine has loaded, for the tests of all this: ``gguf`` crashes every
one of that engine, ``gguf:extra_buffer_types=true`` only those whose setting in effect is
that (JSON values; several ``name=value`` pairs are separated by commas).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import resource
import signal
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenrt.errors import QwenrtError
from qwenrt.paths import cache_root
from qwenrt.runtimes.fingerprint import RunKey
from qwenrt.runtimes.settings import ResolvedSettings

if TYPE_CHECKING:
    from qwenrt.runtimes.base import Engine

CRASH_SWITCH = "QWENRT_TEST_CRASH_PROBE"
PROBE_TIMEOUT_S = 600.0
PROBE_NEW_TOKENS = 4
PROBE_PROMPT_TOKENS = 160
# Long enough for llama.cpp to take its batched matrix-product kernels (AMX among them work
# on blocks of 32 prompt tokens), as a real first chat turn does.
PROBE_PROMPT = ("Check that this engine runs on this machine: read this prompt, which is long enough to take the "
                "kernels that a real chat turn takes for its prompt, then write a few words. ") * 3  # fmt: skip


class EngineCrashError(QwenrtError):
    """The engine crashes on this host with every configuration qwenrt knows to be safe."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.signal = signal_name


@dataclass(frozen=True)
class SafeFallback:
    """Settings that avoid a known crash, and, in words, what they turn off."""

    changes: dict[str, Any]
    turns_off: str  # "llama.cpp's extra buffer types (CPU-specific weight repacking, AMX among them)"
    advice: str = ""  # how to get it back


def probes_dir() -> Path:
    return cache_root() / "probes"


class ProbeRecord:
    """The outcomes kept for one run key: per settings signature, whether the engine ran."""

    def __init__(self, key: RunKey) -> None:
        self.key = key
        self.path = probes_dir() / f"{key.engine}-{key.digest}.json"

    def outcomes(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            outcomes = data["outcomes"]
            return outcomes if isinstance(outcomes, dict) else {}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def outcome(self, signature: str) -> dict[str, Any] | None:
        return self.outcomes().get(signature)

    def record(self, signature: str, outcome: dict[str, Any]) -> None:
        """Add one outcome; concurrent writers (two commands started together) take turns. Where
        the qwenrt home cannot be written, nothing is kept and the next start probes again."""
        with contextlib.suppress(OSError):
            self._record(signature, outcome)

    def _record(self, signature: str, outcome: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_suffix(".lock")):
            outcomes = self.outcomes()
            outcomes[signature] = {**outcome, "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            _write_json(self.path, {"key": self.key.describe(), "outcomes": outcomes})


def forget_outcome(path: Path, signature: str) -> None:
    """Drop one outcome from a record (after that configuration crashed in use): the next start probes it again."""
    if not path.is_file():
        return
    with contextlib.suppress(OSError), _locked(path.with_suffix(".lock")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["outcomes"].pop(signature, None)
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        _write_json(path, data)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` in one step: a reader never sees half of it."""
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".probe.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2)
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def guard(
    engine: type[Engine],
    artifact: Path,
    settings: ResolvedSettings,
    key: RunKey,
    context_length: int,
) -> ResolvedSettings:
    """The settings to open the engine with: ``settings`` if they run here, else the first
    safe fallback that does (with a warning), else an :class:`EngineCrashError`."""
    return safe_settings(engine, artifact, settings, key, context_length)[0]


def safe_settings(
    engine: type[Engine],
    artifact: Path,
    settings: ResolvedSettings,
    key: RunKey,
    context_length: int,
    *,
    fresh: bool = False,
) -> tuple[ResolvedSettings, dict[str, Any] | None]:
    """:func:`guard`, also returning the probe's outcome (None when it was known before; ``ok``
    None when the child failed without crashing, with its ``error``).

    ``fresh`` runs the probe of ``settings`` even if its outcome is known: conversion checks
    every new artifact in its engine."""
    record = ProbeRecord(key)
    first_crash: dict[str, Any] | None = None
    for fallback in (None, *engine.safe_fallbacks):
        candidate = settings
        if fallback is not None:
            if all(settings.get(name) == value for name, value in fallback.changes.items()):
                continue  # already so: nothing to fall back to
            assert first_crash is not None
            candidate = settings.replaced(
                fallback.changes, "rule", f"{fallback.turns_off} crashed {engine.name} here", engine.knobs, key.host
            )
        signature = candidate.signature(engine.knobs)
        outcome = None if fresh else record.outcome(signature)
        ran = outcome is None
        if outcome is None:
            outcome = run_probe(engine, artifact, candidate, context_length)
            if outcome["ok"] is None:  # not a crash: the engine's own error comes from opening it here
                return candidate, outcome
            record.record(signature, outcome)
            outcome = record.outcome(signature) or outcome
        if outcome["ok"]:
            if fallback is not None:
                assert first_crash is not None
                warnings.warn(_fallback_warning(engine, fallback, first_crash), stacklevel=3)
            return candidate, outcome if ran else None
        first_crash = first_crash or outcome
    assert first_crash is not None
    raise EngineCrashError(
        f"{engine.description} crashes on this CPU ({key.host.cpu}) with {first_crash['signal']} "
        f"when it runs {artifact.name}, also with every safe fallback qwenrt knows; use another --runtime",
        first_crash["signal"],
    )


def _fallback_warning(engine: type[Engine], fallback: SafeFallback, crash: dict[str, Any]) -> str:
    advice = f"; {fallback.advice}" if fallback.advice else ""
    return (f"{engine.name}: running without {fallback.turns_off}, which crashed the engine on this CPU "
            f"({crash['signal']}, found {crash.get('when', 'now')[:10]}){advice}")  # fmt: skip


def run_probe(engine: type[Engine], artifact: Path, settings: ResolvedSettings, context_length: int) -> dict[str, Any]:
    """Run the engine in a child: ``{"ok": True, "text": ...}``, ``{"ok": False, "signal": ...}``
    after a crash, or ``{"ok": None, "error": ...}`` when it failed otherwise (an error it
    reported, a timeout)."""
    from qwenrt.child import run_child

    request = {"engine": engine.name, "artifact": str(artifact), "settings": settings.plain(),
               "context_length": context_length}  # fmt: skip
    outcome = run_child("qwenrt.runtimes.probe", request, timeout_s=PROBE_TIMEOUT_S)
    if outcome.ok:
        return {"ok": True, **outcome.result}
    if outcome.crashed:
        return {"ok": False, "signal": outcome.signal, "reason": outcome.reason()}
    return {"ok": None, "error": outcome.reason()}


def crash_if_asked(engine: Engine) -> None:
    """The test switch: die here, as a crashing kernel would, if the engine's settings in
    effect match the switch (``QWENRT_TEST_CRASH_PROBE``)."""
    switch = os.environ.get(CRASH_SWITCH, "")
    name, _, conditions = switch.partition(":")
    if not switch or name != engine.name:
        return
    for condition in filter(None, conditions.split(",")):
        setting, _, wanted = condition.partition("=")
        if setting not in engine.resolved.values or json.dumps(engine.resolved.effective(setting)) != wanted:
            return
    os.kill(os.getpid(), signal.SIGILL)


def _probe(request: dict[str, Any], progress: Callable[[str], None]) -> dict[str, Any]:
    from qwenrt.runtimes import engine_class
    from qwenrt.runtimes.base import EngineOptions, GenerationConfig, StreamEnd

    # A crashing engine leaves no core file behind in the user's folder.
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    cls = engine_class(request["engine"])
    settings = request["settings"]
    threads = settings.pop("threads", None)
    options = EngineOptions(threads=threads, context_length=request["context_length"], prefix_cache=False,
                            settings=settings, use_profile=False)  # fmt: skip
    with cls(Path(request["artifact"]), options) as engine:
        crash_if_asked(engine)
        prompt = engine.chat_prompt_ids([{"role": "user", "content": PROBE_PROMPT}])
        prompt = prompt[-min(PROBE_PROMPT_TOKENS, engine.context_length - PROBE_NEW_TOKENS) :]
        end = list(engine.stream(prompt, GenerationConfig(max_tokens=PROBE_NEW_TOKENS, ignore_eos=True)))[-1]
    assert isinstance(end, StreamEnd)
    return {"generated_tokens": end.generated_tokens, "text": end.text}


if __name__ == "__main__":
    from qwenrt.child import child_main

    child_main(_probe)
