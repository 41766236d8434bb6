"""The bytes each token id stands for, from a byte-level BPE vocabulary (tokenizer.json).

Engines whose own detokenizer returns text (OpenVINO GenAI, transformers) give no text
for a token that ends inside a UTF-8 character; with the bytes, qwenrt's shared
assembler emits whole characters for every engine alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from qwenrt.errors import ArtifactError


@dataclass(frozen=True)
class Vocabulary:
    """What qwenrt reads from tokenizer.json itself, in one pass over the file."""

    token_bytes: list[bytes]  # the bytes each id stands for in generated text (empty for control tokens)
    control_spellings: dict[int, bytes]  # how each control token is written in a prompt ("<|im_end|>")
    added_spellings: frozenset[str]  # every added token's spelling, control or not


def read_vocabulary(tokenizer_json: Path) -> Vocabulary:
    """The byte-level BPE vocabulary's bytes by id, and its added tokens' spellings.

    GenAI's detokenizer returns text, and a token that ends inside a UTF-8 character has
    no text of its own: the bytes let qwenrt assemble whole characters itself. The control
    tokens' spellings give text that gives the token back when tokenised (POST /detokenize),
    where an answer's text leaves it out. Read once: parsing Qwen's 11 MB file takes a
    fifth of a second and some 90 MB of heap for a moment.
    """
    unicode_to_byte = _unicode_to_byte()
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        table: dict[int, bytes] = {
            idx: bytes(unicode_to_byte[ch] for ch in text if ch in unicode_to_byte)
            for text, idx in spec["model"]["vocab"].items()
        }
        added = spec.get("added_tokens", [])
        for token in added:
            table[token["id"]] = b"" if token.get("special") else token["content"].encode("utf-8")
        control = {token["id"]: token["content"].encode("utf-8") for token in added if token.get("special")}
        spellings = frozenset(token["content"] for token in added)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(
            f"{tokenizer_json}: damaged tokenizer vocabulary ({type(exc).__name__}); convert the model again"
        ) from None
    size = max(table) + 1 if table else 0
    return Vocabulary([table.get(idx, b"") for idx in range(size)], control, spellings)


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
