"""Host profiles: the settings ``qwenrt tune`` chose for an engine on this host, kept for every command.

One JSON file per run key (host, engine build, artifact; :mod:`qwenrt.runtimes.fingerprint`)
under ``$QWENRT_HOME/profiles``. ``chat``, ``serve`` and ``compare`` open the engine with
it unless told otherwise; a new CPU, engine build or conversion has none until tuned.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenrt.errors import WriteError
from qwenrt.paths import cache_root
from qwenrt.runtimes.fingerprint import RunKey
from qwenrt.runtimes.settings import THREADS

if TYPE_CHECKING:
    from qwenrt.runtimes.settings import Knob

# /2: tune no longer offers OpenVINO's u8 KV cache, which costs fidelity it does not measure; a
# /1 profile may hold it (README, "The KV cache's precision"), so it is not read.
PROFILE_SCHEMA = "qwenrt.profile/2"


def profiles_dir() -> Path:
    return cache_root() / "profiles"


def profile_path(key: RunKey) -> Path:
    return profiles_dir() / f"{key.engine}-{key.digest}.json"


def load_profile(key: RunKey) -> dict[str, Any] | None:
    """The saved profile for ``key``, or None (none saved, or unreadable: then the rules apply)."""
    try:
        profile = json.loads(profile_path(key).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(profile, dict) or profile.get("schema") != PROFILE_SCHEMA:
        return None
    return profile if isinstance(profile.get("settings"), dict) else None


def measured_settings(settings: Mapping[str, Any], objective: str | None, knobs: tuple[Knob, ...]) -> dict[str, Any]:
    """Of a tune's ``settings``, what it measured: the threads and each knob that ``objective``
    weighs, which is what a profile keeps. The others are qwenrt's rules of the day, and the
    rules of the day they are used decide them: a profile tuned for the short chat answer never
    pins llama.cpp's flash attention, whose cost to a longer context's decode that objective
    cannot see (BENCHMARKS.md, "Flash attention on long prompts")."""
    weighed = {knob.name for knob in knobs if knob.objectives is None or objective in knob.objectives}
    return {name: value for name, value in settings.items() if name == THREADS or name in weighed}


def save_profile(key: RunKey, settings: dict[str, Any], evidence: dict[str, Any]) -> Path:
    """Write the profile in one step: a reader never sees half of it."""
    path = profile_path(key)
    profile = {"schema": PROFILE_SCHEMA, "key": key.describe(), "settings": settings, **evidence}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".profile.", suffix=".partial")
    except OSError as exc:
        raise WriteError(f"cannot save the host profile in {path.parent} ({exc.strerror or exc}); "
                         "set QWENRT_HOME to a folder you can write") from None  # fmt: skip
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(profile, handle, indent=2)
            handle.write("\n")
        os.replace(partial, path)
    finally:
        Path(partial).unlink(missing_ok=True)
    return path
