"""How much one memory-bandwidth reading moves on this host, against OpenVINO's decode:
bench/ceiling_readings.json, for BENCHMARKS.md's note on the ceiling share.

One OpenVINO engine (qwenrt's settings, 2 threads) stays open; 5 rounds each take a
bandwidth reading, decode the short chat prompt (128 tokens, 1 warm-up, median of 3) and
take another reading, so that each share is set against readings seconds apart.

    python bench/ceiling_readings.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from openvino_settings import engine_with, short_prompt_ends

from qwenrt.compare.ceiling import decode_bytes_per_token, memory_bandwidth
from qwenrt.paths import default_model_dir

ROUNDS, THREADS = 5, 2


def main() -> None:
    read = decode_bytes_per_token(default_model_dir())["openvino"]
    rounds = []
    with engine_with({}) as engine:
        for _ in range(ROUNDS):
            before = memory_bandwidth(THREADS)
            _, ends = short_prompt_ends(engine, 128, 1, 3)
            after = memory_bandwidth(THREADS)
            decode = statistics.median(end.decode_tokens_per_second for end in ends)
            rounds.append({"bandwidth_before_gb_s": before / 1e9, "bandwidth_after_gb_s": after / 1e9,
                           "decode_tokens_per_second": decode,
                           "share_of_higher_reading": decode / (max(before, after) / read),
                           "share_of_lower_reading": decode / (min(before, after) / read)})  # fmt: skip
            print(json.dumps(rounds[-1]), flush=True)
    results = {"bytes_per_token": read, "rounds": rounds}
    Path(__file__).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
