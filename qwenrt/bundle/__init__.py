"""``qwenrt bundle``: one folder (or tar) that installs and serves on a box with no network and no compiler.

Inside:

- ``wheels/``: qwenrt, every runtime dependency for the target's Python and platform
  (no torch, no transformers: running a converted model needs neither), and
  llama-cpp-python built portable (:mod:`qwenrt.native.llama_wheel`), with qwenrt's patches;
- ``model/``: the converted model folder, its manifest and the files it lists;
- ``install.sh`` and ``verify.py``: the installer (:file:`install.sh` says what it does);
- ``bundle.json``: what is inside, with every wheel's size and sha256;
- ``README.md``: what is inside, the commands, the CPU requirements, the sizes.

The bundle is written to a staging folder beside its destination and renamed into place,
so an interrupted bundle never looks like a whole one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qwenrt import __version__
from qwenrt.bundle import verify
from qwenrt.bundle.wheelhouse import NOT_LOADED_AT_RUN_TIME, BundleError, Target, Wheel
from qwenrt.manifest import MANIFEST_FILE, read_manifest

HERE = Path(__file__).parent
MB = 1e6


@dataclass(frozen=True)
class BundleReport:
    path: Path
    wheels: list[Wheel]
    left_out: list[str]
    model_bytes: int
    wheel_bytes: int
    llama_variant_note: str

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.wheel_bytes


def build_bundle(
    model_dir: Path,
    out: Path,
    target: Target | None = None,
    log: Callable[[str], None] = print,
    wheel_cache: Path | None = None,
    force: bool = False,
) -> BundleReport:
    """Write the bundle of ``model_dir`` to ``out`` (a folder, or a ``.tar`` file); ``target``: this machine's."""
    from qwenrt.convert.staging import OWNER_FILE, make_staging

    target = target or Target()
    target.check()
    model_dir = Path(model_dir)
    artifacts, engines = _bundled_artifacts(model_dir)
    out = Path(out).absolute()
    if out.exists() and not force:
        raise BundleError(f"{out} exists; remove it, choose another --out, or pass --force")
    as_tar = out.suffix == ".tar"
    try:
        staging = make_staging(out.parent / (out.stem if as_tar else out.name))
    except OSError as exc:
        raise BundleError(f"cannot write the bundle in {out.parent}: {exc.strerror or exc}") from None
    try:
        log(f"checking {model_dir.name}'s files against its manifest …")
        model_bytes = _copy_model(model_dir, artifacts, staging / verify.MODEL_DIR)
        wheels, left_out = _wheelhouse(staging / "wheels", target, log, wheel_cache)
        for name in ("install.sh", "verify.py"):
            shutil.copyfile(HERE / name, staging / name)
        (staging / "install.sh").chmod(0o755)
        info = _bundle_info(model_dir, artifacts, engines, wheels, left_out, target)
        (staging / verify.BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        wheel_bytes = sum(wheel.path.stat().st_size for wheel in wheels)
        (staging / "README.md").write_text(_readme(info, model_bytes, wheel_bytes), encoding="utf-8")
        (staging / OWNER_FILE).unlink()  # the staging folder's, not the bundle's
        _move_into_place(staging, out, as_tar, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    placed = [Wheel(wheel.name, wheel.version, out / "wheels" / wheel.path.name) for wheel in wheels]
    return BundleReport(out, placed, left_out, model_bytes, wheel_bytes, info["llama_cpp"]["kernels"])


def _bundled_artifacts(model_dir: Path) -> tuple[list[str], list[str]]:
    """The artifact keys to bundle (those whose manifest records list their files with sha256),
    and the engines that run them."""
    from qwenrt.runtimes import converted_engine_names, engine_class

    if not model_dir.is_dir():
        raise BundleError(f"no model folder at {model_dir}; make one with 'qwenrt convert'")
    records = read_manifest(model_dir).get("artifacts", {})
    artifacts = [key for key, record in records.items()
                 if isinstance(record, dict) and record.get("files")
                 and all("sha256" in entry for entry in record["files"])]  # fmt: skip
    if not artifacts:
        raise BundleError(f"{model_dir} has no manifest listing its files' sha256; convert it with 'qwenrt convert'")
    engines = [name for name in converted_engine_names() if engine_class(name).artifact_key in artifacts]
    return artifacts, engines


def _copy_model(model_dir: Path, artifacts: list[str], dest: Path) -> int:
    """The manifest and the files it lists (nothing else: no eval cache), each checked as copied."""
    manifest = read_manifest(model_dir)
    dest.mkdir()
    shutil.copyfile(model_dir / MANIFEST_FILE, dest / MANIFEST_FILE)
    total = 0
    for key in artifacts:
        for entry in manifest["artifacts"][key]["files"]:
            source, copy = model_dir / entry["path"], dest / entry["path"]
            if not source.is_file():
                raise BundleError(f"{source} is in the manifest but not in the model folder; convert again")
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, copy)
            if copy.stat().st_size != entry["size"] or verify.sha256_of(copy) != entry["sha256"]:
                raise BundleError(f"{source} does not match its manifest entry; convert again with --force")
            total += entry["size"]
    return total


def _wheelhouse(dest: Path, target: Target, log: Callable[[str], None], wheel_cache: Path | None
                ) -> tuple[list[Wheel], list[str]]:  # fmt: skip
    from qwenrt.bundle import wheelhouse
    from qwenrt.native import llama_wheel

    dest.mkdir()
    with tempfile.TemporaryDirectory(prefix="qwenrt-bundle-") as work:
        llama = llama_wheel.build_wheel(wheel_cache or llama_wheel.default_cache_dir(),
                                        [sys.executable, "-m", "pip"], log=log, portable=True)  # fmt: skip
        log("building qwenrt's wheel …")
        own = wheelhouse.build_qwenrt_wheel(Path(work))
        log(f"resolving the runtime dependencies for Python {target.python_version} …")
        items = wheelhouse.runtime_closure([own, llama], target, Path(work))
        kept, left_out = wheelhouse.leave_out(items, ["qwenrt"])
        log(f"downloading {len(kept) - 2} wheels (pip's cache first) …")
        wheels = wheelhouse.download(kept, {"qwenrt": own, wheelhouse.LLAMA_PACKAGE: llama}, target, dest)
    return wheels, left_out


def _bundle_info(model_dir: Path, artifacts: list[str], engines: list[str], wheels: list[Wheel],
                 left_out: list[str], target: Target) -> dict[str, Any]:  # fmt: skip
    from qwenrt.native import llama_wheel

    return {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "qwenrt": __version__,
        "python": target.python_version,
        "platform": target.platform or "this machine's",
        "model": {"name": model_dir.name, "artifacts": artifacts, "engines": engines},
        "llama_cpp": {
            "version": llama_wheel.local_version(portable=True),
            "needs": _native_needs(next(w.path for w in wheels if w.name == "llama-cpp-python")),
            "kernels": "portable: one CPU backend per x86-64 level (x64, SSE4.2, AVX, AVX2, AVX-512, AVX-VNNI, "
            "AMX); the best one the CPU runs is loaded at start",
        },
        "left_out": {
            name: NOT_LOADED_AT_RUN_TIME.get(name, "only needed by a left-out distribution") for name in left_out
        },
        "wheels": [
            {
                "file": wheel.path.name,
                "name": wheel.name,
                "version": wheel.version,
                "size": wheel.path.stat().st_size,
                "sha256": verify.sha256_of(wheel.path),
            }
            for wheel in wheels
        ],
    }


def _readme(info: dict[str, Any], model_bytes: int, wheel_bytes: int) -> str:
    model = info["model"]
    rows = "\n".join(f"| {wheel['name']} | {wheel['version']} | {wheel['size'] / MB:.1f} MB |"
                     for wheel in sorted(info["wheels"], key=lambda wheel: -wheel["size"]))  # fmt: skip
    left = "\n".join(f"- `{name}`: {why}" for name, why in info["left_out"].items()) or "- nothing"
    return f"""# qwenrt bundle: {model["name"]}

Made {info["created"]} by qwenrt {info["qwenrt"]}. Everything needed to run `{model["name"]}` with
qwenrt on a Linux x86-64 box with no network and no compiler: {(model_bytes + wheel_bytes) / MB:.0f} MB
(model {model_bytes / MB:.0f} MB, wheels {wheel_bytes / MB:.0f} MB).

## Install

    ./install.sh [DIR]             # DIR defaults to /opt/qwenrt
    ./install.sh DIR --service     # as root: also a systemd unit for 'qwenrt serve'

`install.sh` checks every wheel and model file against its recorded sha256 (a changed or
missing file stops it), makes a virtual environment in DIR, installs the wheels from this
folder only (`pip --no-index`), copies the model to `DIR/qwenrt-home/models/{model["name"]}`
and runs each engine ({", ".join(model["engines"])}) once on it, so that an engine that cannot run on
this CPU is found now. With `--service` it adds a system user `qwenrt`, an API key in
`/etc/qwenrt/api-key` readable by that user only, and `qwenrt.service` (restart on failure,
a memory limit; `--port`, `--host`, `--runtime`, `--memory-max` change it), started where
systemd runs. Then:

    DIR/bin/qwenrt chat -p "Hello"
    DIR/bin/qwenrt serve                      # http://127.0.0.1:8000/v1
    DIR/bin/qwenrt compare                    # which engine to use on this box
    curl -H "Authorization: Bearer $(cat /etc/qwenrt/api-key)" http://HOST:8000/v1/models   # the service

## Requirements

- Linux on x86-64 with {info["llama_cpp"]["needs"]} or later (what the llama.cpp wheel, built here,
  links against; the other wheels need glibc 2.28), OpenMP's runtime `libgomp.so.1`
  (Debian/Ubuntu: `libgomp1`), and Python {info["python"]} with its `venv` module (Debian/Ubuntu:
  `python3-venv`).
- Any x86-64 CPU. llama.cpp is {info["llama_cpp"]["kernels"]}
  (`{info["llama_cpp"]["version"]}`, with qwenrt's patches). OpenVINO needs SSE4.2 at least.
- Memory: about 1.5 times the model's larger artifact per engine in use.

## Inside

- `model/`: the converted model, {model_bytes / MB:.0f} MB ({", ".join(model["artifacts"])}), and its `manifest.json`.
- `wheels/`: {len(info["wheels"])} wheels for Python {info["python"]}, {wheel_bytes / MB:.0f} MB:

| package | version | size |
| --- | --- | --- |
{rows}

Left out although a dependency declares them (qwenrt never loads them at run time):
{left}
"""


def _native_needs(wheel: Path) -> str:
    """The newest glibc and libstdc++ symbol versions the wheel's libraries ask for: what a
    target's C libraries must provide (the build host's, for a wheel compiled here)."""
    newest: dict[str, tuple[int, ...]] = {}
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if ".so" not in name:
                continue
            for library, version in re.findall(rb"(GLIBC|GLIBCXX)_(\d+(?:\.\d+)+)", archive.read(name)):
                numbers = tuple(int(part) for part in version.split(b"."))
                newest[library.decode()] = max(newest.get(library.decode(), numbers), numbers)
    names = {"GLIBC": "glibc", "GLIBCXX": "libstdc++ (GLIBCXX)"}
    return " and ".join(f"{names[key]} {'.'.join(map(str, value))}" for key, value in sorted(newest.items()))


def _move_into_place(staging: Path, out: Path, as_tar: bool, force: bool) -> None:
    if as_tar:
        partial = out.with_name(out.name + ".partial")
        try:
            with tarfile.open(partial, "w") as archive:
                archive.add(staging, arcname=out.stem)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        return
    if force and out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(staging, out)
