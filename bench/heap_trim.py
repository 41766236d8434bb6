"""OpenVINO's memory with and without giving back the free heap its load leaves
(``mapped_pages.trim_heap``): BENCHMARKS.md's "Giving back the load's free heap",
bench/heap_trim.json.

Each variant opens the OpenVINO engine in a fresh process through qwenrt (2 threads,
prefix cache off), once as `qwenrt chat` does (one request at a time, LLMPipeline) and
once as `qwenrt serve` does (4 at a time, ContinuousBatchingPipeline); "without" turns
the trim off in that process. It streams the short chat prompt of `qwenrt compare`: 128
new tokens, 1 warm-up and the median of 5; then reports the process's peak and current
resident memory. Variants are interleaved over 5 rounds, since this host drifts.
With --load, only the load of the first, over 12 rounds: load times here spread by more
than a second between runs, so the load needs more rounds than the memory.

    python bench/heap_trim.py          # -> bench/heap_trim.json
    python bench/heap_trim.py --load   # -> bench/heap_trim_load.json
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openvino_settings import end_medians, interleaved_rounds, short_prompt_ends

HERE = Path(__file__).parent
VARIANTS = [(parallel, trim) for parallel in (1, 4) for trim in (False, True)]
ROUNDS, LOAD_ROUNDS, WARMUP, REPEAT, NEW_TOKENS = 5, 12, 1, 5, 128


def measure(parallel: int, trim: bool, generate: bool = True) -> dict[str, Any]:
    import psutil

    from qwenrt.paths import default_model_dir
    from qwenrt.runtimes import EngineOptions, mapped_pages, open_engine

    if not trim:
        mapped_pages.trim_heap = lambda: False
    started = time.perf_counter()
    options = EngineOptions(threads=2, prefix_cache=False, parallel=parallel)
    with open_engine("openvino", default_model_dir(), options) as engine:
        load_s = time.perf_counter() - started
        rss_loaded = psutil.Process().memory_info().rss
        _, ends = short_prompt_ends(engine, NEW_TOKENS, WARMUP, REPEAT) if generate else (0, [])
        return {
            **(end_medians(ends) if ends else {}),
            "load_s": round(load_s, 2),
            "rss_loaded_mb": rss_loaded >> 20,
            "rss_after_mb": psutil.Process().memory_info().rss >> 20,
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10,  # Linux counts KB
        }


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":
        print(json.dumps(measure(int(sys.argv[2]), sys.argv[3] == "trim", sys.argv[4] == "generate")))
        return
    load_only = sys.argv[1:] == ["--load"]
    variants = [(1, trim) for trim in (False, True)] if load_only else VARIANTS
    commands = {(parallel, trim): ([__file__, "--one", str(parallel), "trim" if trim else "without",
                                    "load" if load_only else "generate"], {})
                for parallel, trim in variants}  # fmt: skip
    runs = interleaved_rounds(commands, LOAD_ROUNDS if load_only else ROUNDS)
    measured = ("load_s", "rss_loaded_mb", "peak_mb")
    if not load_only:
        measured += ("decode_tokens_per_second", "rss_after_mb")
    rows = []
    for (parallel, trim), results in runs.items():
        rows.append({
            "parallel": parallel,
            "trim_heap": trim,
            **{key + "_median": statistics.median(r[key] for r in results) for key in measured},
            "runs": results,
        })  # fmt: skip
    (HERE / ("heap_trim_load.json" if load_only else "heap_trim.json")).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
