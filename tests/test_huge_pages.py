"""Rebuilding loaded memory in huge pages (qwenrt.runtimes.huge_pages, ``--huge-pages``).

The helpers run on anonymous memory this test maps itself, read back through the kernel's
own accounting (/proc/self/smaps); then on both engines, which must answer the same with
the option as without it, and through `qwenrt compare`, whose cells must apply it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import QWENRT
from helpers import kernel_collapses

from qwenrt.host import this_host
from qwenrt.runtimes import EngineOptions, GenerationConfig, TokenEvent, huge_pages, open_engine

SIZE = 8 * 1024 * 1024


def private_anonymous(size: int) -> mmap.mmap:
    """Memory as malloc maps it (Python's own anonymous mmap is shared)."""
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)


def address_of(view: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def smaps_field(address: int, field: str) -> int:
    """``field`` (in bytes) of the mapping that holds ``address``, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":"):
            low, high = (int(part, 16) for part in fields[0].split("-"))
            inside = low <= address < high
        elif inside and fields[0] == field + ":":
            return int(fields[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


def covers(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(low <= start and end <= high for low, high in ranges)


def test_ranges_are_the_aligned_stretches_of_private_anonymous_memory(tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(SIZE))
    with private_anonymous(SIZE) as anonymous, weights.open("r+b") as file, \
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as file_backed:  # fmt: skip
        ranges = huge_pages.private_anonymous_ranges()
        assert all(start % huge_pages.HUGE_PAGE == 0 and end % huge_pages.HUGE_PAGE == 0 for start, end in ranges)
        low = address_of(anonymous)
        aligned = -(-low // huge_pages.HUGE_PAGE) * huge_pages.HUGE_PAGE
        assert covers(ranges, aligned, aligned + 3 * huge_pages.HUGE_PAGE)  # 8 MB hold at least three
        # A private copy of a file is writable and private too, but its pages are the file's.
        file_start = address_of(file_backed)
        assert not any(start < file_start + SIZE and file_start < end for start, end in ranges)


def test_collapse_rebuilds_anonymous_memory_in_huge_pages_and_keeps_its_data() -> None:
    with private_anonymous(SIZE) as view:
        data = os.urandom(SIZE)
        view[:] = data
        address = address_of(view)

        collapsed = huge_pages.collapse()

        if kernel_collapses():
            assert collapsed >= 3 * huge_pages.HUGE_PAGE
            assert smaps_field(address, "AnonHugePages") >= 3 * huge_pages.HUGE_PAGE
            assert huge_pages.huge_page_bytes() >= 3 * huge_pages.HUGE_PAGE
        else:  # nothing to do, and nothing breaks
            assert collapsed == 0
        assert view[:] == data


def test_llama_cpp_reads_the_file_for_huge_pages_only_where_it_computes_from_it(tiny_model: Path) -> None:
    """Without its AMX copy, llama.cpp computes from the weights where they were loaded: huge pages
    need them read into its own memory. Where it repacks them into its AMX buffer (a CPU with AMX),
    the copy is what steps read, and the file stays mapped, its pages handed back."""
    options = EngineOptions(threads=1, prefix_cache=False, huge_pages=True, settings={"extra_buffer_types": False})
    with open_engine("gguf", tiny_model, options) as engine:
        settings = engine.settings()
        assert (settings["amx_repack"], settings["load_mode"]) == (False, "none")
    with open_engine("gguf", tiny_model, replace(options, settings={"extra_buffer_types": True})) as engine:
        import llama_cpp

        # A CPU with AMX and a build with its kernels (qwenrt's, patched; a portable one may lack them).
        repacks = this_host().has("amx_int8") and b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()
        settings = engine.settings()
        assert (settings["amx_repack"], settings["load_mode"]) == (repacks, "mmap" if repacks else "none")


@pytest.mark.parametrize("runtime", ["gguf", "openvino"])
def test_engines_answer_the_same_in_huge_pages(tiny_model: Path, runtime: str) -> None:
    answers, settings = {}, {}
    for huge in (False, True):
        options = EngineOptions(threads=1, prefix_cache=False, huge_pages=huge)
        with open_engine(runtime, tiny_model, options) as engine:
            prompt_ids = engine.chat_prompt_ids([{"role": "user", "content": "hi"}])
            events = engine.stream(prompt_ids, GenerationConfig(max_tokens=16, ignore_eos=True))
            answers[huge] = [event.token_id for event in events if isinstance(event, TokenEvent)]
            settings[huge] = engine.settings()
    assert answers[True] == answers[False]
    assert len(answers[True]) == 16
    assert (settings[False]["huge_pages"], settings[True]["huge_pages"]) == (False, True)
    if runtime == "gguf":  # the weights a step reads must be llama.cpp's own memory, not the file's pages
        # With its AMX kernels they are its copy, and the file stays mapped (its pages handed back).
        in_huge_pages = "mmap" if settings[True]["amx_repack"] else "none"
        assert (settings[False]["load_mode"], settings[True]["load_mode"]) == ("mmap", in_huge_pages)


def test_compare_opens_each_cell_in_huge_pages(tiny_model: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [*QWENRT, "compare", "--model", str(tiny_model), "--huge-pages", "--max-tokens", "4", "--repeat", "1",
         "--warmup", "0", "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    cells = json.loads((tmp_path / "r.json").read_text())["cells"]
    assert {cell["runtime"]: cell["settings"]["huge_pages"] for cell in cells} == {"gguf": True, "openvino": True}


def test_chat_answers_the_same_in_huge_pages(tiny_model: Path) -> None:
    chat = [*QWENRT, "chat", "--runtime", "gguf", "--model", str(tiny_model), "--max-tokens", "8", "-p", "Hello fox"]
    plain = subprocess.run(chat, capture_output=True, text=True, timeout=300)
    huge = subprocess.run([*chat, "--huge-pages"], capture_output=True, text=True, timeout=300)
    assert huge.returncode == 0, huge.stderr
    assert huge.stdout == plain.stdout
    assert plain.stdout.strip()
