"""OpenVINO settings tried against issue 5's first-token target (60 ms, short chat prompt,
cold cache, 2 threads): BENCHMARKS.md's "First token" table, bench/first_token.json.

Each setting is added to the properties qwenrt opens its LLMPipeline with, in a fresh
process; the short chat prompt of `qwenrt compare`, prefix cache off, 3 warm-ups, then
the median and minimum of 9 first tokens through qwenrt's own streaming path.

    python bench/first_token.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from openvino_settings import engine_with, short_prompt_ends

HERE = Path(__file__).parent
SETTINGS: list[dict[str, Any]] = [
    {},
    {"INFERENCE_PRECISION_HINT": "f32"},
    {"INFERENCE_PRECISION_HINT": "bf16"},
    {"KV_CACHE_PRECISION": "u8"},
    {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 64},
]
WARMUP, REPEAT, NEW_TOKENS = 3, 9, 32


def measure(extra: dict[str, Any]) -> dict[str, float]:
    with engine_with(extra) as engine:
        prompt_tokens, ends = short_prompt_ends(engine, NEW_TOKENS, WARMUP, REPEAT)
    firsts = [end.first_token_latency * 1000 for end in ends]
    return {
        "prompt_tokens": prompt_tokens,
        "first_token_ms_median": round(statistics.median(firsts), 1),
        "first_token_ms_min": round(min(firsts), 1),
        "decode_tokens_per_second": round(statistics.median(end.decode_tokens_per_second for end in ends), 1),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
        return
    rows = []
    for extra in SETTINGS:
        run = subprocess.run([sys.executable, __file__, "--one", json.dumps(extra)], capture_output=True, text=True)
        if run.returncode != 0:
            raise SystemExit(f"{extra}: {run.stderr.strip().splitlines()[-1]}")
        rows.append({"setting": extra, **json.loads(run.stdout.strip().splitlines()[-1])})
        print(rows[-1], file=sys.stderr)
    (HERE / "first_token.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
