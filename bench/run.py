"""The qwenrt benchmark: `make bench`. Writes bench/results.json and bench/results.md.

On the demo model, in one run so the figures are comparable:
1. adapter overhead: qwenrt's streaming path against each engine's own fastest loop,
   same prompt ids, same token count;
2. the ceiling: memory read bandwidth, bytes each decoded token must read, and each
   engine's decode as a share of bandwidth ÷ bytes;
3. thread scaling from 1 to all cores, prefill at 128/512/1024 prompt tokens, and peak
   memory against artifact size (each cell in a fresh process, via qwenrt compare).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from qwenrt.compare.measure import CellSpec
from qwenrt.compare.report import ok_cells, to_json
from qwenrt.compare.runner import environment, run_comparison
from qwenrt.paths import default_model_dir
from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, open_engine
from qwenrt.runtimes.threads import physical_cores

HERE = Path(__file__).parent
PROMPT = "请写一段 Python 快速排序函数"
FILLER = "The warehouse on shelf {i} holds {j} boxes of parts for the northern assembly line. "


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- 1. adapter overhead ------------------------------------------------------------
def adapter_overhead(model_dir: Path, threads: int, tokens: int, repeat: int) -> dict[str, Any]:
    results = {}
    messages = [{"role": "user", "content": PROMPT}]
    config = GenerationConfig(max_tokens=tokens, ignore_eos=True)
    for name, native in (("gguf", _llama_native), ("openvino", _openvino_native)):
        log(f"adapter overhead: {name}")
        with open_engine(name, model_dir, EngineOptions(threads=threads, prefix_cache=False)) as engine:
            ids = engine.chat_prompt_ids(messages)
            for _ in range(2):  # warm-up of both paths
                _qwenrt_run(engine, ids, config)
                native(engine, ids, tokens)
            ours, theirs = [], []
            for _ in range(repeat):  # interleaved, so drift in the machine hits both alike
                ours.append(_qwenrt_run(engine, ids, config))
                theirs.append(native(engine, ids, tokens))
        q_ttft, q_tps = (statistics.median(v) for v in zip(*ours, strict=True))
        n_ttft, n_tps = (statistics.median(v) for v in zip(*theirs, strict=True))
        # Each pair ran back to back, so its ratio is the least touched by the host's drift
        # over the minutes of the run; the middle half of the pairs shows what is left of it.
        ratios = [q[1] / n[1] for q, n in zip(ours, theirs, strict=True)]
        differences = [(q[0] - n[0]) * 1000 for q, n in zip(ours, theirs, strict=True)]
        results[name] = {
            "prompt_tokens": len(ids),
            "pairs": repeat,
            "qwenrt": {"first_token_ms": q_ttft * 1000, "decode_tps": q_tps},
            "engine_loop": {"first_token_ms": n_ttft * 1000, "decode_tps": n_tps},
            "decode_ratio": statistics.median(ratios),
            "decode_ratio_middle_half": _middle_half(ratios),
            "first_token_difference_ms": statistics.median(differences),
            "first_token_difference_ms_middle_half": _middle_half(differences),
            "samples": {
                "qwenrt": [{"first_token_s": t, "decode_tps": d} for t, d in ours],
                "engine_loop": [{"first_token_s": t, "decode_tps": d} for t, d in theirs],
            },
        }
    return results


def _middle_half(values: list[float]) -> list[float]:
    """The first and third quartiles (none for a single pair)."""
    if len(values) < 2:
        return []
    quartiles = statistics.quantiles(values, n=4, method="inclusive")
    return [quartiles[0], quartiles[2]]


def _qwenrt_run(engine: Any, ids: list[int], config: GenerationConfig) -> tuple[float, float]:
    end = [event for event in engine.stream(ids, config) if isinstance(event, StreamEnd)][0]
    return end.first_token_latency, end.decode_tokens_per_second


def _llama_native(engine: Any, ids: list[int], tokens: int) -> tuple[float, float]:
    """llama-cpp-python's low-level API: eval the prompt, then sample and eval one token at a time.

    On the engine's own thread, where qwenrt's path evaluates too: llama.cpp slows down
    for good once two threads have run it (OpenMP teams; see qwenrt/runtimes/llamacpp.py).
    """

    def native() -> tuple[float, float]:
        llm = engine._llm
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        token = llm.sample(temp=0.0)
        first = time.perf_counter()
        for _ in range(tokens - 1):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        finished = time.perf_counter()
        return first - started, (tokens - 1) / (finished - first)

    return engine.on_engine_thread(native)


def _openvino_native(engine: Any, ids: list[int], tokens: int) -> tuple[float, float]:
    """GenAI's generate with no Python streamer; timing from its own perf metrics."""
    import openvino as ov
    import openvino_genai as ov_genai

    array = np.asarray([ids], dtype=np.int64)
    config = engine._generation_config(GenerationConfig(max_tokens=tokens, ignore_eos=True))
    result = engine._pipe.generate(ov_genai.TokenizedInputs(ov.Tensor(array), ov.Tensor(np.ones_like(array))), config)
    metrics = result.perf_metrics
    return metrics.get_ttft().mean / 1000, 1000 / metrics.get_tpot().mean


# --- 3. scaling, prefill, memory -------------------------------------------------------
def prompt_of(tokens: int, model_dir: Path) -> str:
    """User text whose chat prompt is close to ``tokens`` tokens."""
    with open_engine("gguf", model_dir, EngineOptions(threads=1)) as engine:
        text = ""
        i = 0
        while len(engine.chat_prompt_ids([{"role": "user", "content": text}])) < tokens:
            text += FILLER.format(i=i, j=i * 7 % 50)
            i += 1
    return text


def cells(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    specs = [
        CellSpec(runtime=r, model_dir=str(model_dir), threads=t, scenario="short", max_tokens=args.tokens,
                 repeat=args.repeat, warmup=1)
        for t in range(1, physical_cores() + 1) for r in ("gguf", "openvino")
    ]  # fmt: skip
    for length in (128, 512, 1024):
        prompt = prompt_of(length, model_dir)
        specs += [
            CellSpec(runtime=r, model_dir=str(model_dir), threads=physical_cores(), scenario=f"prompt-{length}",
                     prompt=prompt, max_tokens=16, repeat=args.repeat, warmup=1)
            for r in ("gguf", "openvino")
        ]  # fmt: skip
    return run_comparison(specs, progress=lambda text: log(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of each compare cell")
    parser.add_argument("--pairs", type=int, default=11,
                        help="interleaved pairs (qwenrt, engine loop) for the adapter overhead")  # fmt: skip
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    if args.pairs < 1 or args.repeat < 1:
        parser.error("--pairs and --repeat must be 1 or more")
    threads = physical_cores()

    overhead = adapter_overhead(args.model, threads, args.tokens, args.pairs)
    comparison = cells(args.model, args)
    short = {c.runtime: c for c in ok_cells(comparison) if c.scenario == "short" and c.threads == threads}
    # compare measures the bandwidth once its cells are done and gives each cell its ceiling.
    bandwidth = comparison["memory_bandwidth_bytes_per_s"][str(threads)]
    ceiling = {
        name: {
            "bytes_per_token": cell.decode_ceiling.bytes_per_token,
            "ceiling_tps": cell.decode_ceiling.ceiling_tps,
            "decode_tps": cell.decode_tps.median,
            "share_of_ceiling": cell.decode_ceiling.share,
        }
        for name, cell in short.items()
    }
    results = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "environment": environment(args.model, ["gguf", "openvino"]),
        "threads": threads,
        "adapter_overhead": overhead,
        "memory_bandwidth_bytes_per_s": bandwidth,
        "ceiling": ceiling,
        "comparison": to_json(comparison),
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else None
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    markdown = render(results, previous)
    args.out.with_suffix(".md").write_text(markdown)
    print(markdown)


def render(results: dict[str, Any], previous: dict[str, Any] | None) -> str:
    from tabulate import tabulate

    from qwenrt.compare.report import from_json, render_markdown

    lines = [f"Run {results['created']}, `{results['command']}`, {results['threads']} threads.", "",
             "### Adapter overhead (qwenrt streaming vs the engine's own loop)", ""]  # fmt: skip
    overhead = results["adapter_overhead"]
    rows = [[name, f"{o['qwenrt']['decode_tps']:.1f}", f"{o['engine_loop']['decode_tps']:.1f}",
             f"{o['decode_ratio']:.3f}", _span(o.get("decode_ratio_middle_half"), "{:.3f}"),
             f"{o['qwenrt']['first_token_ms']:.1f}", f"{o['engine_loop']['first_token_ms']:.1f}",
             f"{o['first_token_difference_ms']:+.1f}", _span(o.get("first_token_difference_ms_middle_half"), "{:+.1f}")]
            for name, o in overhead.items()]  # fmt: skip
    lines.append(tabulate(rows, headers=["engine", "qwenrt tok/s", "engine tok/s", "ratio", "middle half",
                                         "qwenrt TTFT ms", "engine TTFT ms", "Δ ms", "middle half"],
                          tablefmt="github", disable_numparse=True))  # fmt: skip
    pairs = max((o.get("pairs", 0) for o in overhead.values()), default=0)
    if pairs:
        lines += ["", f"{pairs} interleaved pairs: ratio and Δ are medians of the pairs' own, with the first and "
                  "third quartiles as the middle half; tok/s and TTFT are each path's medians."]  # fmt: skip
    bandwidth = results["memory_bandwidth_bytes_per_s"]
    lines += ["", f"### Ceiling: memory read bandwidth {bandwidth / 1e9:.1f} GB/s", ""]
    rows = [[name, f"{c['bytes_per_token'] / 1e6:.0f}", f"{c['ceiling_tps']:.1f}", f"{c['decode_tps'] or 0:.1f}",
             f"{(c['share_of_ceiling'] or 0):.0%}"] for name, c in results["ceiling"].items()]  # fmt: skip
    lines.append(tabulate(rows, headers=["engine", "MB read per token", "ceiling tok/s", "decode tok/s",
                                         "share of ceiling"], tablefmt="github"))  # fmt: skip
    if previous:
        lines += ["", "### Since the last recorded run", ""]
        for name, now in results["ceiling"].items():
            before = previous.get("ceiling", {}).get(name, {}).get("decode_tps")
            if before and now["decode_tps"]:
                lines.append(f"- {name} decode: {before:.1f} → {now['decode_tps']:.1f} tok/s "
                             f"({now['decode_tps'] / before - 1:+.0%})")  # fmt: skip
    lines += ["", "### Cells (thread scaling, prefill by prompt length, memory)", ""]
    lines.append(render_markdown(from_json(results["comparison"])).replace("# qwenrt compare", "").strip())
    return "\n".join(lines) + "\n"


def _span(bounds: list[float] | None, form: str) -> str:
    return "–" if not bounds else f"{form.format(bounds[0])} to {form.format(bounds[1])}"


if __name__ == "__main__":
    main()
