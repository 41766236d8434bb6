"""Turn what the user names as a source into a checked Hugging Face Qwen2 checkpoint.

Four kinds of source: a local checkpoint folder, a hub id, a ``.gguf`` file, and
``demo``. Both converters then read the same checkpoint, so the two artifacts come
from identical weights.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qwenrt.convert.checkpoint import Checkpoint
from qwenrt.convert.demo import DEMO_NAME, fetch_demo_gguf, sha256_of
from qwenrt.convert.staging import OWNER_FILE, make_staging, remove_stale_staging
from qwenrt.errors import SourceError
from qwenrt.gguf_check import check_gguf
from qwenrt.paths import downloads_dir

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


@dataclass
class ResolvedSource:
    kind: str  # "checkpoint", "hub", "gguf" or "demo"
    reference: str
    checkpoint: Checkpoint
    name: str
    original_files: list[Path] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        files = self.original_files or self.checkpoint.weight_files
        return {
            "kind": self.kind,
            "reference": self.reference,
            "files": [
                {"name": f.name, "size": f.stat().st_size, "sha256": sha256_of(f, desc=f"Hashing {f.name}")}
                for f in files
            ],
        }


def source_reference(source: str) -> str:
    """How the manifest names a source, known before any work on it."""
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def resolve_source(source: str) -> ResolvedSource:
    """Resolve ``source``; raises :class:`SourceError` with the way out when it cannot."""
    if source == "demo":
        gguf_file = fetch_demo_gguf()
        checkpoint = dequantise_gguf(gguf_file)
        return ResolvedSource("demo", "demo", checkpoint, DEMO_NAME, [gguf_file])
    path = Path(source).expanduser()
    if path.is_dir():
        checkpoint = Checkpoint.open(path)
        return ResolvedSource("checkpoint", source_reference(source), checkpoint, _slug(path.name))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"{path}: not a .gguf file or checkpoint folder")
        checkpoint = dequantise_gguf(path)
        return ResolvedSource("gguf", source_reference(source), checkpoint, _slug(path.stem), [path])
    if HUB_ID.match(source) and not source.startswith((".", "/")):
        checkpoint = Checkpoint.open(_download_from_hub(source))
        return ResolvedSource("hub", source, checkpoint, _slug(source.split("/")[-1]))
    raise SourceError(
        f"{source}: no such file or folder; give a checkpoint folder, a .gguf file, "
        "a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or 'demo'"
    )


def _slug(name: str) -> str:
    name = re.sub(r"(?i)[-_.](q\d\w*|f16|f32|bf16|gguf)$", "", name)
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "model"


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as exc:  # hub errors come in many classes; all mean the same here
        raise SourceError(
            f"cannot download {repo_id} ({_first_sentence(str(exc)) or type(exc).__name__}); with no network, "
            "give a local checkpoint folder, a .gguf file, or 'demo'"
        ) from None


def _first_sentence(text: str, limit: int = 160) -> str:
    # Hub errors run to several lines of advice; the first sentence says what happened.
    sentence = (text.strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + " …"


def dequantised_path(gguf_sha256: str, cache: Path | None = None) -> Path:
    """Where the float checkpoint of a GGUF with this hash is cached."""
    return (cache or downloads_dir()) / "dequantised" / gguf_sha256[:16]


def dequantise_gguf(gguf_file: Path, cache: Path | None = None) -> Checkpoint:
    """A float32 checkpoint made from a Qwen2 GGUF by transformers, cached by content hash."""
    info = check_gguf(gguf_file)
    digest = sha256_of(gguf_file, desc=f"Hashing {gguf_file.name}")
    target = dequantised_path(digest, cache)
    if (target / "config.json").is_file():
        return Checkpoint.open(target)
    remove_stale_staging(target)
    staging = make_staging(target)
    try:
        _dequantise_into(gguf_file, info, staging)
        (staging / OWNER_FILE).unlink()
        try:
            os.replace(staging, target)
        except OSError:
            # Another conversion of the same file finished first; its result is as good.
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Checkpoint.open(target)


def _dequantise_into(gguf_file: Path, info: dict[str, object], out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    except Exception as exc:  # transformers' GGUF loader raises bare ValueErrors and KeyErrors
        raise SourceError(f"{gguf_file}: transformers cannot read this GGUF ({exc})") from None
    # transformers' GGUF tokenizer takes <|endoftext|> as end of sequence; the GGUF
    # itself names the chat's real one (<|im_end|> for the instruct models).
    eos_id = info["eos_token_id"]
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    if info.get("chat_template"):
        tokenizer.chat_template = info["chat_template"]
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.config._name_or_path = str(info.get("name") or gguf_file.stem)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _mark_special_tokens(out, info)


def _mark_special_tokens(out: Path, info: dict[str, object]) -> None:
    """Make every CONTROL token of the GGUF a special added token in tokenizer.json.

    transformers registers only the few tokens it knows as added tokens; the others
    (<|fim_prefix|>, <tool_call>, …) would otherwise be split into pieces of text.
    """
    spec_file = out / "tokenizer.json"
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    id_to_token = {idx: text for text, idx in spec["model"]["vocab"].items()}
    for token_id in info.get("control_tokens", ()):
        entry = added.get(token_id)
        if entry is None and token_id in id_to_token:
            entry = added[token_id] = {
                "id": token_id, "content": id_to_token[token_id], "single_word": False,
                "lstrip": False, "rstrip": False, "normalized": False,
            }  # fmt: skip
        if entry is not None:
            entry["special"] = True
    spec["added_tokens"] = [added[idx] for idx in sorted(added)]
    spec_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
