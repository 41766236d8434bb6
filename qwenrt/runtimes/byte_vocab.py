"""The bytes each token id stands for, from a byte-level BPE vocabulary (tokenizer.json).

Engines whose own detokenizer returns text (OpenVINO GenAI, transformers) give no text
for a token that ends inside a UTF-8 character; with the bytes, qwenrt's shared
assembler emits whole characters for every engine alike.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from qwenrt.errors import ArtifactError


def token_byte_table(tokenizer_json: Path) -> list[bytes]:
    """The bytes of every token id, from the byte-level BPE vocabulary.

    GenAI's detokenizer returns text, and a token that ends inside a UTF-8 character
    has no text of its own; the bytes let qwenrt assemble whole characters itself.
    """
    unicode_to_byte = _unicode_to_byte()
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        table: dict[int, bytes] = {
            idx: bytes(unicode_to_byte[ch] for ch in text if ch in unicode_to_byte)
            for text, idx in spec["model"]["vocab"].items()
        }
        for added in spec.get("added_tokens", []):
            table[added["id"]] = b"" if added.get("special") else added["content"].encode("utf-8")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(
            f"{tokenizer_json}: damaged tokenizer vocabulary ({type(exc).__name__}); convert the model again"
        ) from None
    size = max(table) + 1 if table else 0
    return [table.get(idx, b"") for idx in range(size)]


def control_token_spellings(tokenizer_json: Path) -> dict[int, bytes]:
    """How each control token is written in a prompt ("<|im_end|>"), by id: for text that gives
    the token back when tokenised (POST /detokenize), where an answer's text leaves it out."""
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        return {added["id"]: added["content"].encode("utf-8") for added in spec.get("added_tokens", [])
                if added.get("special")}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(
            f"{tokenizer_json}: damaged tokenizer vocabulary ({type(exc).__name__}); convert the model again"
        ) from None


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-printable-character map that byte-level BPE vocabularies use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + shift)] = b
            shift += 1
    return mapping
