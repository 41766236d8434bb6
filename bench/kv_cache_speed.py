"""OpenVINO's KV-cache precision against the context's length: what qwenrt's f32 cache
(the rule of qwenrt/runtimes/ovgenai.py, chosen for fidelity) costs in speed and memory
against the plugin's u8, short prompt to 3,500 tokens. BENCHMARKS.md's "The KV cache's
precision", bench/kv_cache_speed_*.json.

Each cell is `qwenrt compare`'s (run_cell, 2 threads, the demo model, 128 new tokens,
1 warm-up and the median of 2) in a fresh process; the precisions are interleaved over
the rounds, since this host's speed drifts by more than the effect measured. A decode
step reads every earlier token's keys and values: at 3,500 tokens an f32 cache is about
100 MB a step against about 25 MB in u8, beside some 530 MB of weights.

    python bench/kv_cache_speed.py [--rounds N] [--precisions u8,f32] [--prompts 0,2048,3500] [--out FILE]

Prompts are given in tokens, 0 for the short chat prompt; the long ones are bench/run.py's
filler, kept in the qwenrt home (bench/prompt-N.txt, as bench/llama_ubatch.py keeps them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from llama_ubatch import long_prompt_file
from openvino_settings import interleaved_rounds

HERE = Path(__file__).parent
PROMPTS = "0,2048,3500"
THREADS, NEW_TOKENS, REPEAT, WARMUP = 2, 128, 2, 1


def prompt_name(tokens: int) -> str:
    return "short" if tokens == 0 else f"prompt-{tokens}"


def cell(precision: str, prompt_tokens: int) -> dict[str, Any]:
    from qwenrt.compare.measure import CellSpec, run_cell
    from qwenrt.paths import default_model_dir

    prompt = long_prompt_file(prompt_tokens).read_text() if prompt_tokens else None
    spec = CellSpec(runtime="openvino", model_dir=str(default_model_dir()), threads=THREADS,
                    scenario=prompt_name(prompt_tokens), prompt=prompt, max_tokens=NEW_TOKENS, repeat=REPEAT,
                    warmup=WARMUP, settings={"KV_CACHE_PRECISION": precision})  # fmt: skip
    result = run_cell(spec)
    assert result.settings["KV_CACHE_PRECISION"] == precision, result.settings
    return {
        "prompt_tokens": result.prompt_tokens,
        "decode_tokens_per_second": result.decode_tps.median,
        "first_token_ms": round(result.first_token_s.median * 1000, 1),
        "peak_rss_mb": result.peak_rss_bytes >> 20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default="u8,f32")
    parser.add_argument("--prompts", default=PROMPTS, help="prompt lengths in tokens, 0 for the short chat prompt")
    parser.add_argument("--out", type=Path, default=HERE / "kv_cache_speed.json")
    parser.add_argument("--one", nargs=2, metavar=("PRECISION", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(cell(args.one[0], int(args.one[1]))))
        return
    precisions, lengths = args.precisions.split(","), [int(n) for n in args.prompts.split(",")]
    for tokens in lengths:  # written here: making one in a cell would open an engine and raise its peak
        if tokens and not long_prompt_file(tokens).exists():
            from run import prompt_of

            from qwenrt.paths import default_model_dir

            long_prompt_file(tokens).write_text(prompt_of(tokens, default_model_dir()))
    commands = {(precision, prompt_name(tokens)): ([__file__, "--one", precision, str(tokens)], {})
                for tokens in lengths for precision in precisions}  # fmt: skip
    started = time.strftime("%Y-%m-%d %H:%M")
    runs = interleaved_rounds(commands, args.rounds)
    from qwenrt.compare.ceiling import memory_bandwidth
    from qwenrt.host import this_host

    host = {**this_host().describe(), "read_bandwidth_gb_s": round(memory_bandwidth(THREADS) / 1e9, 1)}
    rows = []
    for (precision, prompt), results in runs.items():
        baseline = runs[(precisions[0], prompt)]
        rows.append({
            "precision": precision,
            "prompt": prompt,
            "prompt_tokens": results[0]["prompt_tokens"],
            **{f"{key}_median": statistics.median(r[key] for r in results)
               for key in ("decode_tokens_per_second", "first_token_ms", "peak_rss_mb")},
            # Against the same round's run of the first precision: the drift between rounds cancels.
            f"decode_against_{precisions[0]}_by_round": [
                round(r["decode_tokens_per_second"] / b["decode_tokens_per_second"] - 1, 3)
                for r, b in zip(results, baseline, strict=True)],
            "runs": results,
        })  # fmt: skip
    args.out.write_text(json.dumps({"host": host, "started": started, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
