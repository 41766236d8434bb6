"""The model folder's manifest: what was converted from what, by which tools, with hashes.

A qwenrt model folder holds ``manifest.json`` and one entry per artifact under
``artifacts``. Engines find their artifact through it, and fall back to the file
layout when a folder was made by hand.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
GGUF_KEY = "gguf"
OPENVINO_KEY = "openvino"
OPENVINO_DIR = "openvino-int8"
# The artifacts 'qwenrt convert' writes, in order; each is run by the engine that declares its key.
ARTIFACT_KEYS = (GGUF_KEY, OPENVINO_KEY)


def read_manifest(model_dir: Path) -> dict[str, Any]:
    """The manifest, or an empty one when the folder has none or it is unreadable."""
    path = Path(model_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def write_manifest(model_dir: Path, manifest: dict[str, Any]) -> None:
    """Replace the manifest in one step, so a reader never sees half of it."""
    model_dir = Path(model_dir)
    fd, partial = tempfile.mkstemp(dir=model_dir, prefix=".manifest.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, ensure_ascii=False)
            handle.write("\n")
        chmod_like_new(Path(partial))
        os.replace(partial, model_dir / MANIFEST_FILE)
    finally:
        Path(partial).unlink(missing_ok=True)


def chmod_like_new(path: Path) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (private: 0600/0700) the usual permissions.

    What is renamed into place from a temporary name should be as readable as
    anything else the user writes.
    """
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def artifact_record(model_dir: Path, key: str) -> dict[str, Any] | None:
    record = read_manifest(model_dir).get("artifacts", {}).get(key)
    return record if isinstance(record, dict) else None


def artifact_files(model_dir: Path, key: str) -> list[Path]:
    """Where the artifact for ``key`` is: by the manifest, else by the usual layout.

    ``model_dir`` may also be the artifact itself: a ``.gguf`` file, or an OpenVINO folder.
    """
    model_dir = Path(model_dir)
    if key == GGUF_KEY and model_dir.is_file() and model_dir.suffix == ".gguf":
        return [model_dir]
    if key == OPENVINO_KEY and (model_dir / "openvino_model.xml").is_file():
        return [model_dir]
    if not model_dir.is_dir():
        return []
    record = artifact_record(model_dir, key)
    if record and (model_dir / record["path"]).exists():
        return [model_dir / record["path"]]
    if key == GGUF_KEY:
        return sorted(model_dir.glob("*.gguf"))
    if key == OPENVINO_KEY and (model_dir / OPENVINO_DIR).is_dir():
        return [model_dir / OPENVINO_DIR]
    return []


def trained_context_length(model_path: Path) -> int | None:
    """The context the model was trained for, from the manifest of its folder."""
    model_path = Path(model_path)
    for folder in (model_path, model_path.parent, model_path.parent.parent):
        if (value := read_manifest(folder).get("context_length")) is not None:
            return int(value)
    return None


def generation_defaults(model_dir: Path) -> dict[str, Any]:
    """The checkpoint's generation_config.json (its sampling defaults), if the model folder has one."""
    for path in (Path(model_dir) / "generation_config.json", Path(model_dir) / OPENVINO_DIR / "generation_config.json"):
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(value, dict):
            return value
    return {}
