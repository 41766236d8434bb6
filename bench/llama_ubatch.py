"""llama.cpp's micro-batch size (n_ubatch) against prefill speed and peak memory.

llama.cpp sizes its compute buffer for the largest micro-batch: the attention scores of
n_ubatch tokens against the whole context. A smaller micro-batch needs less memory and,
if the CPU kernels are what limits prefill, costs no speed. Each cell runs in a fresh
process (peak memory is the process's own): a prompt of N tokens, then 64 greedy tokens,
best prefill of 3; rounds interleave the settings so that a busy moment hits all alike.

    python bench/llama_ubatch.py            # -> bench/llama_ubatch.json
    python bench/llama_ubatch.py --long     # -> bench/llama_ubatch_long.json
    python bench/llama_ubatch.py --long --ubatches 512,256,64 --prompts 512,2048,3500 \
        --out bench/llama_ubatch_amx.json   # the AMX host's run

``--long`` measures through qwenrt's own engine and `compare`'s cell instead of a bare
loop (qwenrt's peak is lower: it samples in its own code), at 1024, 2048 and 3500 prompt
tokens, 16 new tokens, 1 warm-up and 2 repetitions, where the attention scores of a
micro-batch against a long context make up most of llama.cpp's growth in memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qwenrt.manifest import GGUF_KEY, artifact_files
from qwenrt.paths import default_model_dir
from qwenrt.procfs import peak_rss_bytes

UBATCHES = (512, 256, 128)
PROMPTS = (128, 512, 1024)
NEW_TOKENS, THREADS, CONTEXT = 64, 2, 4096


def cell(model: Path, n_ubatch: int, prompt_tokens: int) -> dict:
    from llama_cpp import Llama

    path = artifact_files(model, GGUF_KEY)[0]
    llm = Llama(str(path), n_ctx=CONTEXT, n_batch=512, n_ubatch=n_ubatch, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)  # fmt: skip
    ids = llm.tokenize(("hello world " * 2000).encode())[:prompt_tokens]
    prefill = []
    for _ in range(3):
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        token = llm.sample(temp=0.0)
        prefill.append(prompt_tokens / (time.perf_counter() - started))
        for _ in range(NEW_TOKENS):
            llm.eval([token])
            token = llm.sample(temp=0.0)
    return {"n_ubatch": n_ubatch, "prompt_tokens": prompt_tokens, "prefill_tps": max(prefill),
            "peak_rss_bytes": peak_rss_bytes(), "artifact_bytes": path.stat().st_size}  # fmt: skip


LONG_UBATCHES = (256, 128, 64)
LONG_PROMPTS = (1024, 2048, 3500)


def long_prompt_file(prompt_tokens: int) -> Path:
    from qwenrt.paths import cache_root

    return cache_root() / "bench" / f"prompt-{prompt_tokens}.txt"


def qwenrt_cell(model: Path, n_ubatch: int, prompt_tokens: int) -> dict:
    from qwenrt.compare.measure import CellSpec, run_cell

    # Written by the parent: making it here would open an engine and raise this process's peak.
    prompt = long_prompt_file(prompt_tokens).read_text()
    cell = run_cell(CellSpec(runtime="gguf", model_dir=str(model), threads=THREADS, scenario=f"prompt-{prompt_tokens}",
                             prompt=prompt, max_tokens=16, repeat=2, warmup=1,
                             settings={"n_ubatch": n_ubatch}))  # fmt: skip
    assert cell.settings["n_ubatch"] == n_ubatch
    return {"n_ubatch": n_ubatch, "prompt_tokens": cell.prompt_tokens, "prefill_tps": cell.prefill_tps.median,
            "peak_rss_bytes": cell.peak_rss_bytes, "artifact_bytes": cell.artifact_bytes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    parser.add_argument("--long", action="store_true", help="long prompts, through qwenrt's engine")
    parser.add_argument("--ubatches", default=None, help="micro-batch sizes, e.g. 512,256,64 [default: per mode]")
    parser.add_argument("--prompts", default=None, help="prompt lengths, e.g. 512,2048,3500 [default: per mode]")
    parser.add_argument("--cell", nargs=2, type=int, metavar=("N_UBATCH", "PROMPT_TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps((qwenrt_cell if args.long else cell)(args.model, *args.cell)))
        return
    ubatches, prompts = (LONG_UBATCHES, LONG_PROMPTS) if args.long else (UBATCHES, PROMPTS)
    if args.ubatches:
        ubatches = tuple(int(size) for size in args.ubatches.split(","))
    if args.prompts:
        prompts = tuple(int(length) for length in args.prompts.split(","))
    if args.long:
        from run import prompt_of

        for prompt_tokens in prompts:
            long_prompt_file(prompt_tokens).parent.mkdir(parents=True, exist_ok=True)
            long_prompt_file(prompt_tokens).write_text(prompt_of(prompt_tokens, args.model))
    if args.long and args.out == parser.get_default("out"):
        args.out = args.out.with_name("llama_ubatch_long.json")
    runs = []
    for round_index in range(args.rounds):
        for prompt_tokens in prompts:
            for n_ubatch in ubatches:
                command = [sys.executable, __file__, "--model", str(args.model), "--cell", str(n_ubatch),
                           str(prompt_tokens), *(["--long"] if args.long else [])]  # fmt: skip
                result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
                runs.append({"round": round_index, "prompt_tokens_asked": prompt_tokens, **result})
                peak_mb = result["peak_rss_bytes"] / 1e6
                print(f"round {round_index + 1}: n_ubatch {n_ubatch:4}, {prompt_tokens:5} prompt tokens: "
                      f"{result['prefill_tps']:6.1f} tok/s, peak {peak_mb:5.0f} MB", flush=True)  # fmt: skip
    summary = [
        {"n_ubatch": n_ubatch, "prompt_tokens": prompt_tokens,
         "prefill_tps_median": statistics.median(r["prefill_tps"] for r in same),
         "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in same),
         "peak_over_artifact": max(r["peak_rss_bytes"] / r["artifact_bytes"] for r in same)}
        for prompt_tokens in prompts for n_ubatch in ubatches
        if (same := [r for r in runs if r["n_ubatch"] == n_ubatch and r["prompt_tokens_asked"] == prompt_tokens])
    ]  # fmt: skip
    args.out.write_text(json.dumps({"threads": THREADS, "context": CONTEXT, "new_tokens": NEW_TOKENS,
                                    "summary": summary, "runs": runs}, indent=1) + "\n")  # fmt: skip
    print("| prompt tokens | n_ubatch | prefill tok/s (median) | peak RSS (× artifact) |\n| --- | --- | --- | --- |")
    for row in summary:
        print(f"| {row['prompt_tokens']} | {row['n_ubatch']} | {row['prefill_tps_median']:.0f} | "
              f"{row['peak_rss_bytes_max'] / 1e6:.0f} MB ({row['peak_over_artifact']:.2f}×) |")  # fmt: skip


if __name__ == "__main__":
    main()
