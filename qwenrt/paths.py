"""Where qwenrt keeps models and downloads, so every command finds them without flags."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "qwen2.5-0.5b-instruct"


def cache_root() -> Path:
    """``$QWENRT_HOME``, else ``$XDG_CACHE_HOME/qwenrt``, else ``~/.cache/qwenrt``."""
    if home := os.environ.get("QWENRT_HOME"):
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qwenrt"


def default_model_dir() -> Path:
    """The model folder that ``convert`` writes and ``chat``/``compare`` read by default."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def downloads_dir() -> Path:
    return cache_root() / "downloads"
