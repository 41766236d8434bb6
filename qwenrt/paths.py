"""Where qwenrt keeps models and downloads, so every command finds them without flags."""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_MODEL_NAME = "qwen2.5-0.5b-instruct"


# In a virtual environment that an installed bundle made, its own home (install.sh).
BUNDLE_HOME = "qwenrt-home"


def cache_root() -> Path:
    """``$QWENRT_HOME``, else the home of an installed bundle (``qwenrt-home`` in its
    virtual environment), else ``$XDG_CACHE_HOME/qwenrt``, else ``~/.cache/qwenrt``."""
    if home := os.environ.get("QWENRT_HOME"):
        return Path(home).expanduser()
    if (bundle_home := Path(sys.prefix) / BUNDLE_HOME).is_dir():
        return bundle_home
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "qwenrt"


def default_model_dir() -> Path:
    """The model folder that ``convert`` writes and ``chat``/``compare`` read by default."""
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def model_to_read() -> Path:
    """The model folder that commands read when none is given: the default one, else the only
    model in the home (an installed bundle holds one, under its own name)."""
    default = default_model_dir()
    if default.exists():
        return default
    models = [path for path in sorted(default.parent.glob("*")) if (path / "manifest.json").is_file()]
    return models[0] if len(models) == 1 else default


def downloads_dir() -> Path:
    return cache_root() / "downloads"
