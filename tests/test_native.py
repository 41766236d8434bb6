"""qwenrt's patched llama-cpp-python: the patches apply to the pinned source, and the build installed is it."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import USER_CACHE

from qwenrt.native import llama_wheel

REPO = Path(__file__).resolve().parent.parent
PATCHED_FILE = "vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"


def test_the_pin_and_the_patches_name_the_same_release() -> None:
    pins = re.findall(r'"llama-cpp-python([^"]*)"', (REPO / "pyproject.toml").read_text())
    assert pins == [f"=={llama_wheel.VERSION}"]
    for patch in llama_wheel.patch_files():
        assert f"llama-cpp-python {llama_wheel.VERSION}" in patch.read_text().splitlines()[0]


def test_every_patch_says_why_and_where_upstream_is() -> None:
    assert llama_wheel.patch_files(), "no patches: drop this test and the build step together"
    for patch in llama_wheel.patch_files():
        header = patch.read_text().split("\n--- ", 1)[0]
        assert "Why:" in header and re.search(r"https://github\.com/ggml-org/llama\.cpp/pull/\d+", header), patch


def test_the_patches_apply_to_the_pinned_source(tmp_path: Path) -> None:
    # make install keeps the source distribution in the user's qwenrt home; fetch it if not.
    sdist = llama_wheel.fetch_source(USER_CACHE / "wheels" / "llama-cpp-python", [sys.executable, "-m", "pip"])
    source = llama_wheel.prepare_source(sdist, tmp_path)
    patched = (source / PATCHED_FILE).read_text()
    assert "static constexpr tile_config_t tc = ggml_amx_tile_config();" in patched
    assert "syscall(SYS_arch_prctl, 0x1023, 18);" in patched
    assert f'__version__ = "{llama_wheel.local_version()}"' in (source / "llama_cpp/__init__.py").read_text()


def test_a_patch_that_no_longer_applies_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sdist = llama_wheel.fetch_source(USER_CACHE / "wheels" / "llama-cpp-python", [sys.executable, "-m", "pip"])
    broken = tmp_path / "patches"
    broken.mkdir()
    (broken / "llama-cpp-python-broken.patch").write_text(
        f"--- a/{PATCHED_FILE}\n+++ b/{PATCHED_FILE}\n@@ -1,1 +1,1 @@\n-no such line\n+another\n"
    )
    monkeypatch.setattr(llama_wheel, "PATCHES", broken)
    with pytest.raises(llama_wheel.BuildError, match="llama-cpp-python-broken.patch does not apply"):
        llama_wheel.prepare_source(sdist, tmp_path / "work")


def test_make_install_installed_the_patched_build() -> None:
    assert metadata.version("llama-cpp-python") == llama_wheel.local_version()


def test_the_wheel_cache_is_keyed_by_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A native build uses the CPU's instruction set: a wheel built on one CPU kind is not reused on another."""
    here = llama_wheel.build_key()
    monkeypatch.setattr(llama_wheel, "cpu_identity", lambda: "model name=another CPU; flags=avx2")
    assert llama_wheel.build_key() != here
