"""Build llama-cpp-python from its source with qwenrt's patches to the llama.cpp it vendors.

llama-cpp-python is on PyPI as source only, and pip builds it for the CPU it runs on
(llama.cpp's native build). Where upstream llama.cpp is broken on a CPU qwenrt's users
have, qwenrt carries a small patch to the vendored copy, as ollama does with its own:
each file in ``patches/`` says why, and which upstream change will make it unnecessary.

``python -m qwenrt.native.llama_wheel --install`` (what ``make install`` runs) downloads the
pinned source distribution, applies the patches, gives the package a local version
(``0.3.36+qwenrt.<digest of the patches>``, so that ``pip show`` and qwenrt's probe cache
tell it from a plain build), builds the wheel and installs it. Wheels are cached under
the qwenrt home, keyed by all that changes what gets built: the version, the patches,
``CMAKE_ARGS``, the Python, and the CPU (a native build uses its instruction set; a wheel
built on one CPU may die with SIGILL on another), so installing again on the same kind
of host takes seconds instead of minutes.

``--portable`` builds the wheel ``qwenrt bundle`` ships instead: llama.cpp compiled once
per x86-64 CPU generation (``GGML_CPU_ALL_VARIANTS``: from plain x86-64 up to AVX2,
AVX-512 and AMX), each variant a CPU backend that ggml loads at run time
(``GGML_BACKEND_DL``), choosing the best one the CPU it lands on supports. Its cache key
leaves the build host's CPU out: that is the point of it. The loading is done by
``qwenrt.runtimes.llamacpp`` (llama-cpp-python does not load dynamic backends itself).

Standard library only: it runs before qwenrt's dependencies are installed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
# Keep in step with pyproject.toml's pin: the patches are made against this version's source.
VERSION = "0.3.36"
PATCHES = Path(__file__).parent / "patches"
VERSION_FILE = "llama_cpp/__init__.py"
# llama.cpp's multi-variant CPU build (https://github.com/ggml-org/llama.cpp/blob/master/docs/build.md,
# "CPU Build", and ggml/src/CMakeLists.txt). The backends are MODULE libraries that ggml installs
# to CMAKE_INSTALL_BINDIR; under scikit-build-core's prefix (the wheel's root) that puts them in
# llama_cpp/lib beside libggml.so, where qwenrt asks ggml to look.
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DCMAKE_INSTALL_BINDIR=llama_cpp/lib",
)


class BuildError(Exception):
    pass


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob(f"{PACKAGE}-*.patch"))


def local_version(portable: bool = False) -> str:
    """The version the patched build carries: the upstream one plus a digest of the patches, and
    ``.portable`` for the portable build (so that the probe's cache and ``pip show`` tell them apart)."""
    digest = hashlib.sha256()
    for patch in patch_files():
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return f"{VERSION}+qwenrt.{digest.hexdigest()[:8]}" + (".portable" if portable else "")


def cpu_identity() -> str:
    """The CPU model and its feature flags: what a native build compiles for."""
    from qwenrt.procfs import cpuinfo

    model, flags = cpuinfo()
    return f"{model or platform.processor()} {platform.machine()}: {' '.join(sorted(flags))}"


def cmake_args(portable: bool) -> str:
    user = os.environ.get("CMAKE_ARGS", "")
    return " ".join([user, *PORTABLE_CMAKE_ARGS]).strip() if portable else user


def build_key(portable: bool = False) -> str:
    if portable:
        # For any CPU, and any Python 3 (the wheel is tagged py3: llama-cpp-python loads its
        # libraries through ctypes).
        parts = [local_version(True), cmake_args(True), platform.machine(), "portable"]
    else:
        # In this order since the first native build: the wheels cached by it stay found.
        parts = [local_version(), cmake_args(False), sys.implementation.cache_tag or "", platform.machine(),
                 cpu_identity()]  # fmt: skip
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    from qwenrt.paths import cache_root

    return cache_root() / "wheels" / PACKAGE


def fetch_source(cache_dir: Path, pip: list[str]) -> Path:
    """The pinned source distribution, downloaded once into the cache."""
    folder = cache_dir / "sdist"
    for found in sorted(folder.glob(f"llama_cpp_python-{VERSION}.tar.gz")):
        return found
    folder.mkdir(parents=True, exist_ok=True)
    _run(pip + ["download", "--no-deps", "--no-binary", ":all:", f"{PACKAGE}=={VERSION}", "--dest", str(folder)])
    found = sorted(folder.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not found:
        raise BuildError(f"pip downloaded no source distribution of {PACKAGE} {VERSION} into {folder}")
    return found[0]


def prepare_source(sdist: Path, work_dir: Path, portable: bool = False) -> Path:
    """Unpack ``sdist`` into ``work_dir``, apply every patch and set the local version."""
    with tarfile.open(sdist) as archive:
        # The "data" filter refuses links and paths out of work_dir (Python 3.10.12 and later).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(work_dir, **safe)
    source = work_dir / f"llama_cpp_python-{VERSION}"
    if not source.is_dir():
        raise BuildError(f"{sdist.name} does not unpack into {source.name}")
    if shutil.which("patch") is None:
        raise BuildError(
            "the 'patch' program is needed to apply qwenrt's patches; install it (Debian: apt install patch)"
        )
    for patch in patch_files():
        command = ["patch", "-p1", "--forward", "--batch", "--silent", "-d", str(source), "-i", str(patch)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"{patch.name} does not apply to {PACKAGE} {VERSION}: {result.stdout.strip()[:300]}")
    version_file = source / VERSION_FILE
    text = version_file.read_text(encoding="utf-8")
    declared = f'__version__ = "{VERSION}"'
    if declared not in text:
        raise BuildError(f"{VERSION_FILE} of {sdist.name} does not declare {declared}")
    version_file.write_text(text.replace(declared, f'__version__ = "{local_version(portable)}"'), encoding="utf-8")
    return source


def build_wheel(cache_dir: Path, pip: list[str], log=print, portable: bool = False) -> Path:
    """The patched wheel, from the cache or built now (minutes: llama.cpp compiles).

    Native (the default): for this host's CPU. ``portable``: for any x86-64 CPU (see above).
    """
    target = cache_dir / build_key(portable)
    cached = sorted(target.glob("llama_cpp_python-*.whl"))
    if cached:
        log(f"{PACKAGE} {local_version(portable)}: using the wheel built before, {cached[0]}")
        return cached[0]
    sdist = fetch_source(cache_dir, pip)
    with tempfile.TemporaryDirectory(prefix="qwenrt-llama-build-") as work:
        source = prepare_source(sdist, Path(work), portable)
        minutes = "about 25 minutes" if portable else "about 5 minutes"
        log(f"{PACKAGE} {local_version(portable)}: building from source with {len(patch_files())} qwenrt "
            f"patch(es) ({minutes} on 2 cores) …")  # fmt: skip
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1), CMAKE_ARGS=cmake_args(portable))
        _run(pip + ["wheel", "--no-deps", "--wheel-dir", str(Path(work) / "wheel"), str(source)], env=env)
        built = sorted((Path(work) / "wheel").glob("llama_cpp_python-*.whl"))
        if not built:
            raise BuildError(f"pip built no {PACKAGE} wheel")
        target.mkdir(parents=True, exist_ok=True)
        partial = target / (built[0].name + ".partial")
        shutil.copyfile(built[0], partial)
        final = target / built[0].name
        os.replace(partial, final)  # a wheel in the cache is always whole
    return final


def _run(command: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise BuildError(f"{' '.join(command[:4])} … failed with exit status {result.returncode} (see above)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwenrt.native.llama_wheel", description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="Install the wheel into this Python.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="Where wheels and the source are kept.")
    parser.add_argument("--portable", action="store_true", help="Build for any x86-64 CPU (what bundles ship).")
    args = parser.parse_args(argv)
    pip = [sys.executable, "-m", "pip"]
    try:
        wheel = build_wheel(args.cache_dir or default_cache_dir(), pip, portable=args.portable)
        if args.install:
            _run(pip + ["install", "--quiet", str(wheel)])
    except BuildError as exc:
        print(f"qwenrt: error: {exc}", file=sys.stderr)
        return 1
    print(wheel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
