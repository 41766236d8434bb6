"""What qwenrt learns by running an engine holds for one host, one engine build, one artifact.

The probe's outcomes and ``qwenrt tune``'s profiles are both kept under a key made of
the three: the host's key (:mod:`qwenrt.host`), the versions of the engine's packages
(a patched llama-cpp-python carries its own, ``0.3.36+qwenrt.…``) and a digest of the
artifact. A new CPU, an upgraded engine or a new conversion each start afresh.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from qwenrt.host import Host, this_host
from qwenrt.manifest import read_manifest


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class RunKey:
    host: Host
    engine: str
    engine_build: str  # "llama-cpp-python 0.3.36+qwenrt.1a2b3c4d"
    artifact: str  # digest of the artifact

    @property
    def digest(self) -> str:
        text = "\n".join([self.host.key, self.engine, self.engine_build, self.artifact])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> dict[str, str]:
        return {"host": self.host.key, "cpu": self.host.cpu, "engine": self.engine, "engine_build": self.engine_build,
                "artifact": self.artifact}  # fmt: skip


def engine_build(packages: tuple[str, ...]) -> str:
    return ", ".join(f"{package} {package_version(package) or 'not installed'}" for package in packages)


def artifact_digest(artifact: Path) -> str:
    """The sha256 digests its model folder's manifest records for the artifact's files, taken
    together; for an artifact outside a manifest, a digest of its files' names, sizes and
    modification times (hashing half a gigabyte at every start would cost seconds)."""
    artifact = Path(artifact).resolve()
    record = _manifest_record(artifact)
    if record is not None:
        return record_digest(record)
    digest = hashlib.sha256()
    files = [artifact] if artifact.is_file() else sorted(p for p in artifact.rglob("*") if p.is_file())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(artifact.parent)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "stat:" + digest.hexdigest()[:32]


def record_digest(record: dict) -> str:
    """The digest of an artifact from its manifest record (the sha256 of each of its files)."""
    digest = hashlib.sha256()
    for entry in sorted(record["files"], key=lambda entry: entry["path"]):
        digest.update(f"{entry['path']}\0{entry['sha256']}\n".encode())
    return "sha256:" + digest.hexdigest()[:32]


def _manifest_record(artifact: Path) -> dict | None:
    for record in read_manifest(artifact.parent).get("artifacts", {}).values():
        if (
            isinstance(record, dict)
            and record.get("path") == artifact.name
            and record.get("files")
            and all("sha256" in entry and "path" in entry for entry in record["files"])
        ):
            return record
    return None


def run_key(engine: str, packages: tuple[str, ...], artifact: Path, digest: str | None = None) -> RunKey:
    return RunKey(this_host(), engine, engine_build(packages), digest or artifact_digest(artifact))
