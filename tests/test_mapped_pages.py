"""Handing a mapped weights file's pages back to the kernel (qwenrt.runtimes.mapped_pages).

The helpers run on files this test maps itself with Python's mmap, so that the kernel's
own accounting (/proc/self/smaps) says what is resident, and on heap memory it allocates
and frees itself through the C library; then on the OpenVINO engine, which must hold
none of its IR file once it is open, and still answer the same.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

import psutil
import pytest

from qwenrt.runtimes import EngineOptions, GenerationConfig, TokenEvent, mapped_pages, open_engine

SIZE = 8 * 1024 * 1024
# What a release may leave: pages faulted in a moment before it (often by another thread, on
# another CPU) still wait in that CPU's LRU batch, where MADV_PAGEOUT cannot take them yet
# (20-80 KB seen on the demo model).
PAGES_IN_FLIGHT = 1024 * 1024
CHUNK, HEAP_HOLE = 64 * 1024, 64 * 1024 * 1024


@pytest.fixture
def weights_file(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"
    with path.open("wb") as file:
        file.write(bytes(range(256)) * (SIZE // 256))
        os.fsync(file.fileno())  # clean pages: the kernel reclaims dirty ones only after writing them back
    return path


def touch_every_page(view: mmap.mmap) -> int:
    return sum(view[offset] for offset in range(0, len(view), mmap.PAGESIZE))


def test_release_drops_a_read_only_mapping_and_the_data_reads_back_the_same(weights_file: Path) -> None:
    with weights_file.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        checksum = touch_every_page(view)
        assert mapped_pages.resident_bytes(weights_file) == SIZE

        assert mapped_pages.release(weights_file) == SIZE
        assert mapped_pages.resident_bytes(weights_file) < PAGES_IN_FLIGHT

        assert touch_every_page(view) == checksum
        assert view[:SIZE] == weights_file.read_bytes()
        assert mapped_pages.resident_bytes(weights_file) == SIZE


@pytest.mark.parametrize("access", [mmap.ACCESS_WRITE, mmap.ACCESS_COPY], ids=["writable-shared", "private-copy"])
def test_release_leaves_writable_and_private_mappings_alone(weights_file: Path, access: int) -> None:
    """On a private mapping, dropping a written page would lose the write for good."""
    with weights_file.open("r+b") as file, mmap.mmap(file.fileno(), 0, access=access) as view:
        view[0:4] = b"kept"
        touch_every_page(view)
        assert mapped_pages.release(weights_file) == 0
        assert mapped_pages.resident_bytes(weights_file) == SIZE
        assert view[0:4] == b"kept"


def test_release_without_a_mapping_does_nothing(weights_file: Path, tmp_path: Path) -> None:
    assert mapped_pages.release(weights_file) == 0
    assert mapped_pages.release(tmp_path / "missing.bin") == 0
    assert mapped_pages.resident_bytes(weights_file) == 0


def test_pages_read_during_the_block_are_given_back_while_it_runs(weights_file: Path) -> None:
    with weights_file.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        with mapped_pages.released_while_running(weights_file, interval_s=0.005):
            touch_every_page(view)
            threading.Event().wait(0.1)  # the block still runs, reading nothing
            assert mapped_pages.resident_bytes(weights_file) < PAGES_IN_FLIGHT
            touch_every_page(view)
        assert mapped_pages.resident_bytes(weights_file) < PAGES_IN_FLIGHT


def test_trim_heap_gives_back_free_memory_inside_the_heap() -> None:
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 MB in blocks below malloc's mmap threshold, so they come from the heap, written so
    # they are resident. The last one, the highest, stays: freeing the others leaves a hole
    # inside the heap, which free() never gives back by itself.
    *freed, last = [libc.malloc(CHUNK) for _ in range(HEAP_HOLE // CHUNK)]
    assert all(freed) and last
    for block in (*freed, last):
        ctypes.memset(block, 1, CHUNK)
    try:
        for block in freed:
            libc.free(block)
        before = psutil.Process().memory_info().rss
        assert mapped_pages.trim_heap()
        given_back = before - psutil.Process().memory_info().rss
    finally:
        libc.free(last)
    assert given_back > HEAP_HOLE // 2, given_back


@pytest.mark.parametrize("parallel", [1, 2], ids=["LLMPipeline", "ContinuousBatchingPipeline"])
def test_openvino_answers_as_genai_does_after_giving_back_its_weights_pages(tiny_model: Path, parallel: int) -> None:
    """The engine warms up while it opens (the plugin copies the weights at its first
    inference) and gives the IR's pages back, and its answer is still GenAI's own on a
    pipeline that kept them. (The tiny IR is 26 pages, as few as may be in flight, so
    what stays resident is measured on the demo model.)"""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    options = EngineOptions(threads=1, prefix_cache=False, parallel=parallel)
    with open_engine("openvino", tiny_model, options) as engine:
        weights = engine.path / "openvino_model.bin"
        assert mapped_pages.shared_read_only_mappings(weights), "the plugin no longer maps the IR"
        prompt_ids = engine.chat_prompt_ids([{"role": "user", "content": "hi"}])
        events = engine.stream(prompt_ids, GenerationConfig(max_tokens=12, ignore_eos=True))
        answer = [event.token_id for event in events if isinstance(event, TokenEvent) and event.token_id >= 0]
        properties = engine._properties

    pipe = ov_genai.LLMPipeline(str(weights.parent), "CPU", **properties)
    config = pipe.get_generation_config()
    config.max_new_tokens, config.ignore_eos, config.do_sample = 12, True, False
    config.repetition_penalty = 1.0
    ids = np.asarray([prompt_ids], dtype=np.int64)
    expected = pipe.generate(ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config).tokens[0]
    assert answer == list(map(int, expected))


@pytest.mark.real_weights
def test_openvino_reads_back_only_embedding_rows_of_the_demo_weights(demo_model: Path) -> None:
    """The engine opens holding next to nothing of its 654 MB IR; after that, the plugin
    computes on its own copies of the weights, and of the mapped IR a generation reads
    only the token-embedding rows of the tokens it sees."""
    with open_engine("openvino", demo_model, EngineOptions(threads=2, prefix_cache=False)) as engine:
        weights = engine.path / "openvino_model.bin"
        assert mapped_pages.resident_bytes(weights) < PAGES_IN_FLIGHT
        config = GenerationConfig(max_tokens=64, ignore_eos=True)
        for _ in engine.stream_chat([{"role": "user", "content": "Write a Python quicksort function"}], config):
            pass
        assert 0 < mapped_pages.resident_bytes(weights) < weights.stat().st_size // 20
