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
    python bench/llama_ubatch.py --long --ubatches 256 --prompts 512,2048 --flash-attention false,true \
        --rounds 3 --out bench/llama_flash_attention_amx_HH-MM.json   # flash attention on long prompts

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

from qwenrt.host import this_host
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


def qwenrt_cell(model: Path, n_ubatch: int, prompt_tokens: int, flash_attention: bool | None = None) -> dict:
    from qwenrt.compare.measure import CellSpec, run_cell

    # Written by the parent: making it here would open an engine and raise this process's peak.
    prompt = long_prompt_file(prompt_tokens).read_text()
    flash = {} if flash_attention is None else {"flash_attention": flash_attention}
    cell = run_cell(CellSpec(runtime="gguf", model_dir=str(model), threads=THREADS, scenario=f"prompt-{prompt_tokens}",
                             prompt=prompt, max_tokens=16, repeat=2, warmup=1,
                             settings={"n_ubatch": n_ubatch, **flash}))  # fmt: skip
    assert cell.settings["n_ubatch"] == n_ubatch
    return {"n_ubatch": n_ubatch, **flash, "prompt_tokens": cell.prompt_tokens, "prefill_tps": cell.prefill_tps.median,
            "decode_tps": cell.decode_tps.median if cell.decode_tps else None, "peak_rss_bytes": cell.peak_rss_bytes,
            "artifact_bytes": cell.artifact_bytes}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    parser.add_argument("--long", action="store_true", help="long prompts, through qwenrt's engine")
    parser.add_argument("--ubatches", default=None, help="micro-batch sizes, e.g. 512,256,64 [default: per mode]")
    parser.add_argument("--prompts", default=None, help="prompt lengths, e.g. 512,2048,3500 [default: per mode]")
    parser.add_argument(
        "--flash-attention",
        default=None,
        help="with --long: flash attention off and on, e.g. false,true [default: qwenrt's setting]",
    )
    parser.add_argument("--cell", nargs=2, type=int, metavar=("N_UBATCH", "PROMPT_TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--cell-flash", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        flash = {} if args.cell_flash is None else {"flash_attention": json.loads(args.cell_flash)}
        print(json.dumps(qwenrt_cell(args.model, *args.cell, **flash) if args.long else cell(args.model, *args.cell)))
        return
    ubatches, prompts = (LONG_UBATCHES, LONG_PROMPTS) if args.long else (UBATCHES, PROMPTS)
    if args.ubatches:
        ubatches = tuple(int(size) for size in args.ubatches.split(","))
    if args.prompts:
        prompts = tuple(int(length) for length in args.prompts.split(","))
    flashes: tuple[str | None, ...] = tuple(args.flash_attention.split(",")) if args.flash_attention else (None,)
    if args.flash_attention and not args.long:
        parser.error("--flash-attention needs --long (qwenrt's engine)")
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
            for n_ubatch, flash in ((n_ubatch, flash) for n_ubatch in ubatches for flash in flashes):
                command = [sys.executable, __file__, "--model", str(args.model), "--cell", str(n_ubatch),
                           str(prompt_tokens), *(["--long"] if args.long else []),
                           *(["--cell-flash", flash] if flash is not None else [])]  # fmt: skip
                result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
                runs.append({"round": round_index, "prompt_tokens_asked": prompt_tokens, **result})
                peak_mb = result["peak_rss_bytes"] / 1e6
                flash_text = "" if flash is None else f", flash attention {flash:5}"
                decode_text = f", decode {result['decode_tps']:4.1f} tok/s" if result.get("decode_tps") else ""
                print(f"round {round_index + 1}: n_ubatch {n_ubatch:4}{flash_text}, {prompt_tokens:5} prompt "
                      f"tokens: {result['prefill_tps']:6.1f} tok/s{decode_text}, peak {peak_mb:5.0f} MB",
                      flush=True)  # fmt: skip
    summary = []
    for prompt_tokens, n_ubatch, flash in ((p, u, f) for p in prompts for u in ubatches for f in flashes):
        same = [r for r in runs if r["n_ubatch"] == n_ubatch and r["prompt_tokens_asked"] == prompt_tokens
                and (flash is None or r.get("flash_attention") == json.loads(flash))]  # fmt: skip
        decodes = [r["decode_tps"] for r in same if r.get("decode_tps")]
        summary.append({"n_ubatch": n_ubatch, **({} if flash is None else {"flash_attention": json.loads(flash)}),
                        "prompt_tokens": prompt_tokens,
                        "prefill_tps_median": statistics.median(r["prefill_tps"] for r in same),
                        **({"decode_tps_median": statistics.median(decodes)} if decodes else {}),
                        "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in same),
                        "peak_over_artifact": max(r["peak_rss_bytes"] / r["artifact_bytes"] for r in same),
                        })  # fmt: skip
    args.out.write_text(json.dumps({"host": this_host().describe(), "threads": THREADS,
                                    "context": CONTEXT, "new_tokens": NEW_TOKENS, "summary": summary, "runs": runs},
                                   indent=1) + "\n")  # fmt: skip
    print("| prompt tokens | n_ubatch | flash attention | prefill tok/s (median) | decode tok/s "
          "| peak RSS (× artifact) |\n| --- | --- | --- | --- | --- | --- |")  # fmt: skip
    for row in summary:
        decode = f"{row['decode_tps_median']:.1f}" if "decode_tps_median" in row else ""
        print(f"| {row['prompt_tokens']} | {row['n_ubatch']} | {row.get('flash_attention', '')} | "
              f"{row['prefill_tps_median']:.0f} | {decode} | "
              f"{row['peak_rss_bytes_max'] / 1e6:.0f} MB ({row['peak_over_artifact']:.2f}×) |")  # fmt: skip


if __name__ == "__main__":
    main()
