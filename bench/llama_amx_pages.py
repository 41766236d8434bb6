"""llama.cpp on an AMX host, with and without handing back the GGUF's mapped pages after the AMX
repack (``llamacpp._repacks_into_amx``): BENCHMARKS.md's "Hosts", bench/llama_amx_pages.json.

With its extra buffer types on a CPU with AMX, llama.cpp copies the Q8_0 weights into its
AMX buffer at load and computes on the copy; the mapped file's pages it read for the copy
stayed resident beside it. Each variant opens the engine in a fresh process through
qwenrt (2 threads, prefix cache off, qwenrt's settings), streams the short chat prompt
(128 new tokens, 1 warm-up, the median of 5), and reports its load time, first token,
decode, peak and current resident memory. Variants are interleaved over 5 rounds.

    python bench/llama_amx_pages.py   # -> bench/llama_amx_pages.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openvino_settings import end_medians, interleaved_rounds, short_prompt_ends

HERE = Path(__file__).parent
ROUNDS, WARMUP, REPEAT, NEW_TOKENS = 5, 1, 5, 128


def measure(release: bool) -> dict[str, Any]:
    from qwenrt import procfs
    from qwenrt.host import this_host
    from qwenrt.paths import default_model_dir
    from qwenrt.runtimes import EngineOptions, llamacpp, open_engine

    assert this_host().has("amx_int8"), "this benchmark needs a CPU with AMX"
    if not release:
        llamacpp._repacks_into_amx = lambda extra_buffer_types: False
    started = time.perf_counter()
    with open_engine("gguf", default_model_dir(), EngineOptions(threads=2, prefix_cache=False)) as engine:
        load_s = time.perf_counter() - started
        assert engine.settings()["extra_buffer_types"]
        loaded = procfs.status_bytes("VmRSS")["VmRSS"] or 0
        _, ends = short_prompt_ends(engine, NEW_TOKENS, WARMUP, REPEAT)
        after = procfs.status_bytes("RssAnon", "RssFile")
        return {
            **end_medians(ends),
            "load_s": round(load_s, 2),
            "rss_loaded_mb": loaded >> 20,
            "rss_private_after_mb": (after["RssAnon"] or 0) >> 20,
            "rss_file_backed_after_mb": (after["RssFile"] or 0) >> 20,
            "peak_mb": procfs.peak_rss_bytes() >> 20,
        }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2] == "release")))
        return
    commands = {release: ([__file__, "--one", "release" if release else "keep"], {}) for release in (False, True)}
    runs = interleaved_rounds(commands, ROUNDS)
    measured = ("load_s", "first_token_ms_median", "decode_tokens_per_second", "rss_loaded_mb",
                "rss_private_after_mb", "rss_file_backed_after_mb", "peak_mb")  # fmt: skip
    rows = [{"release_mapped_pages": release,
             **{key + "_median": statistics.median(r[key] for r in results) for key in measured}, "runs": results}
            for release, results in runs.items()]  # fmt: skip
    (HERE / "llama_amx_pages.json").write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print({k: v for k, v in row.items() if k != "runs"})


if __name__ == "__main__":
    main()
