"""A validated Hugging Face Qwen2 checkpoint folder, read one tensor at a time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from qwenrt.errors import SourceError

SUPPORTED_MODEL_TYPES = {"qwen2"}


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any] = field(repr=False)
    weight_files: list[Path] = field(repr=False)

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """Check that ``path`` is a Qwen2 checkpoint, or raise a :class:`SourceError`."""
        path = Path(path)
        if not path.is_dir():
            raise SourceError(f"{path}: not a folder")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise SourceError(
                f"{path}: not a Hugging Face checkpoint (no config.json); "
                "give a checkpoint folder, a .gguf file, a hub id or 'demo'"
            )
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{config_file}: not valid JSON ({exc})") from None
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise SourceError(f"{path}: model type {model_type!r} is not Qwen2; qwenrt converts Qwen2 / Qwen2.5 models")
        weight_files = sorted(path.glob("*.safetensors"))
        if not weight_files:
            raise SourceError(f"{path}: no *.safetensors weights in the checkpoint")
        if not (path / "tokenizer.json").is_file():
            raise SourceError(f"{path}: no tokenizer.json in the checkpoint")
        return cls(path=path, config=config, weight_files=weight_files)

    @property
    def display_name(self) -> str:
        # transformers 5 saves the name as _model_name_or_path; older versions as _name_or_path.
        return self.config.get("_model_name_or_path") or self.config.get("_name_or_path") or self.path.name

    @property
    def rope_theta(self) -> float:
        # transformers 5 moved rope_theta into rope_parameters; read both spellings.
        params = self.config.get("rope_parameters") or {}
        return float(params.get("rope_theta", self.config.get("rope_theta", 10000.0)))

    @cached_property
    def _tensor_index(self) -> dict[str, Path]:
        from safetensors import safe_open

        index: dict[str, Path] = {}
        for file in self.weight_files:
            try:
                with safe_open(file, framework="pt") as reader:
                    index.update(dict.fromkeys(reader.keys(), file))
            except Exception as exc:  # safetensors raises its own untyped errors
                raise SourceError(f"{file}: unreadable safetensors file ({exc})") from None
        return index

    def tensor_count(self) -> int:
        return len(self._tensor_index)

    def tensors(self) -> Iterator[tuple[str, Any]]:
        """(name, torch tensor) pairs in file order, one tensor in memory at a time."""
        from safetensors import safe_open

        for file in self.weight_files:
            with safe_open(file, framework="pt") as reader:
                for name in reader.keys():  # noqa: SIM118 - a safetensors reader, not a dict
                    yield name, reader.get_tensor(name)
