"""The wheels of a bundle: qwenrt, its runtime dependencies and the portable llama.cpp.

pip does the resolving and the downloading (``pip install --dry-run --report`` for the
closure, ``pip download`` for the files), for the target's Python and platform, pinned to
the versions this environment runs so that what the bundle installs is what was tested
here. Two wheels are local: qwenrt's own, built from its source tree, and llama-cpp-python's
portable build (:mod:`qwenrt.native.llama_wheel`); their versions satisfy the pins
(``0.3.36+qwenrt.…`` is a ``0.3.36``).

Some distributions are declared by a dependency but never loaded by qwenrt at run time:
:data:`NOT_LOADED_AT_RUN_TIME` names each with the reason. They and what only they
pulled in are left out, and the bundle installs with ``--no-deps`` from its own list.
The bundle test checks the other direction: every wheel left in is loaded by a chat or
the server on the installed bundle.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from qwenrt.errors import QwenrtError

LLAMA_PACKAGE = "llama-cpp-python"
# Declared by a dependency, never imported by qwenrt's runtime; each with the reason.
NOT_LOADED_AT_RUN_TIME = {
    "huggingface-hub": "tokenizers declares it for Tokenizer.from_pretrained (a download); qwenrt reads "
    "tokenizer.json from the model folder",
    "requests": "gguf declares it for reading safetensors over HTTP (gguf.utility); qwenrt reads local files",
    "tqdm": "gguf declares it for progress bars while writing; at run time qwenrt only reads GGUF files",
}


class BundleError(QwenrtError):
    """A bundle cannot be made for the target asked for."""


@dataclass(frozen=True)
class Target:
    """The Python and platform the bundle installs on. ``None`` is this machine's."""

    python: str | None = None  # "3.11"
    platform: str | None = None  # a pip platform tag: "manylinux_2_28_x86_64"

    @property
    def python_version(self) -> str:
        return self.python or f"{sys.version_info.major}.{sys.version_info.minor}"

    def check(self) -> None:
        """Refuse what cannot be cross-bundled: the llama.cpp wheel is compiled here, for this
        machine's architecture and operating system."""
        if self.python is not None and not re.fullmatch(r"3\.\d{1,2}", self.python):
            raise BundleError(f"--python {self.python}: give a CPython version such as 3.11")
        if not sys.platform.startswith("linux"):
            raise BundleError("qwenrt bundle builds on Linux only (its llama.cpp wheel is compiled here)")
        machine = platform.machine()
        if self.platform is not None:
            tag = self.platform
            if not (tag.startswith(("manylinux", "linux_", "musllinux")) and tag.endswith(f"_{machine}")):
                raise BundleError(
                    f"--platform {tag}: the llama.cpp wheel is compiled on this machine, for Linux on {machine}; "
                    f"bundle for another platform on a machine of that platform"
                )
            if tag.startswith("musllinux"):
                raise BundleError(f"--platform {tag}: the llama.cpp wheel is built against glibc here, not musl")

    def pip_options(self) -> list[str]:
        if self.python is None and self.platform is None:
            return []
        version = self.python_version
        digits = version.replace(".", "")
        options = ["--python-version", version, "--implementation", "cp", "--abi", f"cp{digits}", "--abi", "abi3",
                   "--abi", "none", "--only-binary=:all:"]  # fmt: skip
        for tag in self._platform_tags():
            options += ["--platform", tag]
        return options

    def _platform_tags(self) -> list[str]:
        if self.platform is not None:
            return [self.platform]
        from packaging.tags import platform_tags  # pip's own vendored copy is not public; packaging is

        return list(platform_tags())


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    path: Path


def project_root() -> Path:
    """qwenrt's source tree, which its wheel is built from."""
    import qwenrt

    root = Path(qwenrt.__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise BundleError(
            f"qwenrt bundle needs qwenrt's source tree to build its wheel, and {root} is not one; "
            "run it from a checkout installed with 'make install'"
        )
    return root


def build_qwenrt_wheel(dest: Path) -> Path:
    before = set(dest.glob("qwenrt-*.whl"))
    _pip(["wheel", "--no-deps", "--no-build-isolation", "--quiet", "--wheel-dir", str(dest), str(project_root())],
         "building qwenrt's wheel")  # fmt: skip
    built = sorted(set(dest.glob("qwenrt-*.whl")) - before) or sorted(dest.glob("qwenrt-*.whl"))
    if not built:
        raise BundleError("pip built no qwenrt wheel")
    return built[0]


def runtime_closure(local_wheels: list[Path], target: Target, work: Path) -> list[dict[str, Any]]:
    """pip's resolution of what installing ``local_wheels`` on the target pulls in (its report's items)."""
    report = work / "resolution.json"
    constraints = work / "constraints.txt"
    constraints.write_text("".join(f"{name}=={version}\n" for name, version in _installed_versions().items()))
    _pip(["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "--constraint",
          str(constraints), *target.pip_options(), *map(str, local_wheels)],
         f"resolving the runtime dependencies for Python {target.python_version}")  # fmt: skip
    return json.loads(report.read_text())["install"]


def leave_out(
    items: list[dict[str, Any]], roots: list[str], unused: Iterable[str] = tuple(NOT_LOADED_AT_RUN_TIME)
) -> tuple[list[dict[str, Any]], list[str]]:
    """The items still needed once ``unused`` (:data:`NOT_LOADED_AT_RUN_TIME`) is left out, and the names left out.

    A distribution stays when it can be reached from ``roots`` without passing through a
    left-out one (edges: the requirements each item declares, extras aside).
    """
    by_name = {_normal(item["metadata"]["name"]): item for item in items}
    dropped = {_normal(name) for name in unused}
    reached: set[str] = set()
    pending = [_normal(root) for root in roots]
    while pending:
        name = pending.pop()
        if name in reached or name in dropped or name not in by_name:
            continue
        reached.add(name)
        for requirement in by_name[name]["metadata"].get("requires_dist", []):
            if "extra ==" in requirement.replace("extra==", "extra =="):
                continue
            pending.append(_normal(re.split(r"[\s;<>=!~\[(]", requirement, maxsplit=1)[0]))
    kept = [item for name, item in by_name.items() if name in reached]
    return kept, sorted(set(by_name) - reached)


def download(items: list[dict[str, Any]], local: dict[str, Path], target: Target, dest: Path) -> list[Wheel]:
    """Every kept item as a wheel in ``dest``: the local ones copied, the others from the index."""
    wanted = {_normal(item["metadata"]["name"]): item["metadata"]["version"] for item in items}
    remote = [f"{name}=={version}" for name, version in sorted(wanted.items()) if name not in local]
    if remote:
        options = target.pip_options() or ["--only-binary=:all:"]
        _pip(["download", "--no-deps", "--quiet", "--dest", str(dest), *options, *remote],
             f"downloading {len(remote)} wheels")  # fmt: skip
    for path in local.values():
        shutil.copyfile(path, dest / path.name)
    wheels = []
    for path in sorted(dest.glob("*.whl")):
        name, version = path.name.split("-")[:2]
        wheels.append(Wheel(_normal(name), version, path))
    missing = set(wanted) - {wheel.name for wheel in wheels}
    if missing:
        raise BundleError(f"pip left out wheels of {', '.join(sorted(missing))}")
    return wheels


def _installed_versions() -> dict[str, str]:
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and _normal(name) not in {"qwenrt", LLAMA_PACKAGE}:
            versions[_normal(name)] = dist.version
    return versions


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip(arguments: list[str], doing: str) -> None:
    with tempfile.TemporaryFile(mode="w+") as errors:
        result = subprocess.run([sys.executable, "-m", "pip", *arguments], stdout=subprocess.DEVNULL,
                                stderr=errors, text=True)  # fmt: skip
        if result.returncode != 0:
            errors.seek(0)
            lines = [line.strip() for line in errors.read().splitlines() if line.strip()]
            detail = next((line for line in lines if line.startswith("ERROR")), lines[-1] if lines else "")
            raise BundleError(f"{doing} failed: pip said: {detail[:300]}")
