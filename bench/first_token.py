"""OpenVINO settings tried against issue 5's first-token target (60 ms, short chat prompt,
cold cache, 2 threads): BENCHMARKS.md's "First token" table, bench/first_token.json.

Each setting is added to the properties qwenrt opens its LLMPipeline with, in a fresh
process; the short chat prompt of `qwenrt compare`, prefix cache off, 3 warm-ups, then
the median and minimum of 9 first tokens through qwenrt's own streaming path.

    python bench/first_token.py
    python bench/first_token.py --rounds 2 --repeat 12 --out bench/first_token_amx_HH-MM.json \
        --settings '[{}, {"ENABLE_CPU_PINNING": true}, {"KV_CACHE_PRECISION": "u8"}]'
    perf record -g -o /tmp/first_token.perf python bench/first_token.py --one '{}' --repeat 300 --new-tokens 1
    perf report -i /tmp/first_token.perf --time 40%-100% --sort dso   # the answers, without the load

``--rounds`` runs every setting once per round, each in a fresh process, since the host's
speed drifts; a row's figures are then the medians of the rounds'.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from openvino_settings import engine_with, interleaved_rounds, short_prompt_ends

HERE = Path(__file__).parent
SETTINGS: list[dict[str, Any]] = [
    {},
    {"INFERENCE_PRECISION_HINT": "f32"},
    {"INFERENCE_PRECISION_HINT": "bf16"},
    {"KV_CACHE_PRECISION": "u8"},
    {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 64},
]
WARMUP, REPEAT, NEW_TOKENS = 3, 9, 32


def measure(extra: dict[str, Any], repeat: int = REPEAT, new_tokens: int = NEW_TOKENS) -> dict[str, float | None]:
    with engine_with(extra) as engine:
        prompt_tokens, ends = short_prompt_ends(engine, new_tokens, WARMUP, repeat)
    firsts = [end.first_token_latency * 1000 for end in ends]
    decodes = [end.decode_tokens_per_second for end in ends if end.decode_tokens_per_second]
    return {
        "prompt_tokens": prompt_tokens,
        "first_token_ms_median": round(statistics.median(firsts), 1),
        "first_token_ms_min": round(min(firsts), 1),
        "decode_tokens_per_second": round(statistics.median(decodes), 1) if decodes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", type=json.loads, default=SETTINGS, help="a JSON list of property sets")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=REPEAT, help="measured answers per process")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="per answer (1: the first token alone)")
    parser.add_argument("--out", type=Path, default=HERE / "first_token.json")
    parser.add_argument("--one", type=json.loads, help="measure one property set here (a JSON object)")
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.repeat, args.new_tokens)))
        return
    runs = {json.dumps(extra): ([__file__, "--one", json.dumps(extra), "--repeat", str(args.repeat)], {})
            for extra in args.settings}  # fmt: skip
    results = interleaved_rounds(runs, args.rounds)
    rows = []
    for key, rounds in results.items():
        row: dict[str, Any] = {"setting": json.loads(key), "prompt_tokens": rounds[0]["prompt_tokens"]}
        for figure in ("first_token_ms_median", "first_token_ms_min", "decode_tokens_per_second"):
            values = [r[figure] for r in rounds if r[figure] is not None]
            row[figure] = round(statistics.median(values), 1) if values else None
        rows.append({**row, "rounds": rounds} if args.rounds > 1 else row)
    if args.rounds == 1 and args.out == parser.get_default("out"):
        args.out.write_text(json.dumps(rows, indent=2) + "\n")  # the layout of the committed first_token.json
        return
    from qwenrt.host import this_host

    document = {"host": this_host().describe(), "rounds": args.rounds, "repeat": args.repeat, "rows": rows}
    args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
