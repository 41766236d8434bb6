"""Two more ways tried to bring OpenVINO's decode closer to the memory-bandwidth ceiling:
BENCHMARKS.md's "OpenVINO decode options" table, bench/openvino_decode_options.json.

- GenAI's SDPA attention backend (a stateful model with its own KV cache) instead of the
  paged attention qwenrt opens LLMPipeline with;
- huge pages for the plugin's weight copies: glibc's ``glibc.malloc.hugetlb=1`` tunable
  asks for transparent huge pages on what malloc maps, where this kernel gives them only
  on request (``transparent_hugepage=madvise``). A decode step streams 500 MB of weights;
  with 4 KB pages that is 120,000 TLB entries a token.

Each variant runs in a fresh process through qwenrt's streaming path: the short chat
prompt of `qwenrt compare`, 2 threads, prefix cache off, 128 new tokens, 1 warm-up and
the median of 5; variants interleaved over 3 rounds, since this host's speed drifts.

    python bench/openvino_decode_options.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from openvino_settings import end_medians, engine_with, interleaved_rounds, short_prompt_ends

HERE = Path(__file__).parent
VARIANTS: dict[str, dict[str, Any]] = {
    "qwenrt's defaults (paged attention)": {"properties": {}, "env": {}},
    "ATTENTION_BACKEND=SDPA": {"properties": {"ATTENTION_BACKEND": "SDPA"}, "env": {}},
    "huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)": {
        "properties": {},
        "env": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    },
}
ROUNDS, WARMUP, REPEAT, NEW_TOKENS = 3, 1, 5, 128


def anon_huge_pages_mb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) // 1024
    return 0


def measure(properties: dict[str, Any]) -> dict[str, Any]:
    with engine_with(properties) as engine:
        _, ends = short_prompt_ends(engine, NEW_TOKENS, WARMUP, REPEAT)
        huge = anon_huge_pages_mb()
    return {**end_medians(ends), "anon_huge_pages_mb": huge}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    commands = {name: ([__file__, "--one", json.dumps(variant["properties"])], variant["env"])
                for name, variant in VARIANTS.items()}  # fmt: skip
    runs = interleaved_rounds(commands, ROUNDS)
    rows = [
        {
            "variant": name,
            **VARIANTS[name],
            "decode_tokens_per_second_median": statistics.median(r["decode_tokens_per_second"] for r in results),
            "first_token_ms_median": statistics.median(r["first_token_ms_median"] for r in results),
            "runs": results,
        }
        for name, results in runs.items()
    ]
    (HERE / "openvino_decode_options.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
