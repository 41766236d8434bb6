"""Both engines with and without ``--huge-pages`` (qwenrt/runtimes/huge_pages.py):
BENCHMARKS.md's "Huge pages" table, bench/huge_pages.json.

Each variant opens its engine in a fresh process through qwenrt (2 threads, prefix cache
off), times the load (the collapse included), then streams the short chat prompt of
`qwenrt compare`: 128 new tokens, 1 warm-up and the median of 5. Variants are interleaved
over 8 rounds, since this host's speed drifts by more than the effect measured.

    python bench/huge_pages.py [--rounds N] [--out FILE]

With ``--out`` the file also records the host (CPU, flags, read bandwidth) and when the
run started: the AMX host's runs are kept side by side (bench/huge_pages_amx_HH-MM.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from openvino_settings import end_medians, interleaved_rounds, short_prompt_ends

HERE = Path(__file__).parent
VARIANTS = [(runtime, huge) for runtime in ("gguf", "openvino") for huge in (False, True)]
ROUNDS, WARMUP, REPEAT, NEW_TOKENS = 8, 1, 5, 128


def measure(runtime: str, huge_pages: bool) -> dict[str, Any]:
    import psutil

    from qwenrt.paths import default_model_dir
    from qwenrt.runtimes import EngineOptions, open_engine
    from qwenrt.runtimes.huge_pages import huge_page_bytes

    started = time.perf_counter()
    options = EngineOptions(threads=2, prefix_cache=False, huge_pages=huge_pages)
    with open_engine(runtime, default_model_dir(), options) as engine:
        load_s = time.perf_counter() - started
        _, ends = short_prompt_ends(engine, NEW_TOKENS, WARMUP, REPEAT)
        return {
            **end_medians(ends),
            "load_s": round(load_s, 2),
            "huge_pages_mb": huge_page_bytes() >> 20,
            "rss_mb": psutil.Process().memory_info().rss >> 20,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, help="write here, with the host and the start time")
    parser.add_argument("--one", nargs=2, metavar=("RUNTIME", "PAGES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], args.one[1] == "huge")))
        return
    commands = {(runtime, huge): ([__file__, "--one", runtime, "huge" if huge else "plain"], {})
                for runtime, huge in VARIANTS}  # fmt: skip
    started = time.strftime("%Y-%m-%d %H:%M")
    rows = summary(interleaved_rounds(commands, args.rounds))
    if args.out is None:
        (HERE / "huge_pages.json").write_text(json.dumps(rows, indent=2) + "\n")
        return
    from qwenrt.compare.ceiling import memory_bandwidth
    from qwenrt.host import this_host

    host = {**this_host().describe(), "read_bandwidth_gb_s": round(memory_bandwidth(2) / 1e9, 1)}
    args.out.write_text(json.dumps({"host": host, "started": started, "rows": rows}, indent=2) + "\n")


def summary(runs: dict[tuple[str, bool], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for (runtime, huge), results in runs.items():
        plain = runs[(runtime, False)]
        rows.append({
            "runtime": runtime,
            "huge_pages": huge,
            **{key.removesuffix("_median") + "_median": statistics.median(r[key] for r in results)
               for key in ("decode_tokens_per_second", "first_token_ms_median", "load_s", "huge_pages_mb", "rss_mb")},
            # Against the same round's run without huge pages: the drift between rounds cancels.
            "decode_gain_by_round": [round(r["decode_tokens_per_second"] / p["decode_tokens_per_second"] - 1, 3)
                                     for r, p in zip(results, plain, strict=True)],
            "runs": results,
        })  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
