"""Whether priming an engine's prefix cache with the chat template's system prompt alone
lets a new conversation reuse it (BENCHMARKS.md, "The next conversation").

The chat template's system prompt is all that two conversations share (24 tokens on the
demo model). llama.cpp reuses any common prefix of the last prompt; GenAI's paged
pipeline reuses whole cached blocks, or a partly filled block whose content a finished
sequence ended on, so a new conversation after another one reuses nothing. Each case, per
engine, with the prefix cache on, 2 threads, 24 new tokens, the first token of short
questions asked as new conversations (a round's figure: the median of 30):

- ``after another conversation``: as a deployed assistant's next user;
- ``system prompt primed just before``: a one-token answer to the system prompt alone,
  then the question;
- ``system prompt primed once at load``: then the questions one after the other.

Each (engine, case) runs in a fresh process; rounds interleave them.

    python bench/prefix_priming.py [--rounds 3] [--out bench/prefix_priming_HH-MM.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openvino_settings import interleaved_rounds

HERE = Path(__file__).parent
THREADS, NEW_TOKENS, ASKS = 2, 24, 3
CASES = ("after another conversation", "system prompt primed just before", "system prompt primed once at load")
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "How many legs does a spider have?",
    "Translate 'good morning' to Spanish.", "What is 12 times 12?", "Give me a synonym for happy.",
    "Which planet is largest?", "What language is spoken in Brazil?", "Who wrote Hamlet?", "What is H2O?",
]  # fmt: skip


def measure(runtime: str, case: str) -> dict[str, Any]:
    from qwenrt.paths import default_model_dir
    from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, open_engine

    def conversation(text: str) -> list[int]:
        return engine.chat_prompt_ids([{"role": "user", "content": text}])

    def answer(ids: list[int], max_tokens: int = NEW_TOKENS) -> float:
        events = engine.stream(ids, GenerationConfig(max_tokens=max_tokens, ignore_eos=True))
        return next(e for e in list(events) if isinstance(e, StreamEnd)).first_token_latency * 1000

    with open_engine(runtime, default_model_dir(), EngineOptions(threads=THREADS, prefix_cache=True)) as engine:
        one, other = conversation("x"), conversation("y")
        system = one[: next(i for i, (a, b) in enumerate(zip(one, other, strict=False)) if a != b)]
        if case == "system prompt primed once at load":
            answer(system, 1)
        firsts = []
        for ask in range(ASKS):
            for question in QUESTIONS:
                if case == "after another conversation":
                    answer(conversation(f"Hello! {question}"))
                elif case == "system prompt primed just before":
                    answer(system, 1)
                firsts.append(answer(conversation(f"{question} ({ask})")))
    return {"system_prompt_tokens": len(system), "first_question_ms": round(firsts[0], 1),
            "first_token_ms_median": round(statistics.median(firsts[1:]), 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / f"prefix_priming_{time.strftime('%H-%M')}.json")
    parser.add_argument("--one", nargs=2, metavar=("RUNTIME", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    from qwenrt.compare.ceiling import memory_bandwidth
    from qwenrt.host import this_host

    runs = {(runtime, case): (["-u", __file__, "--one", runtime, case], {})
            for runtime in ("gguf", "openvino") for case in CASES}  # fmt: skip
    results = interleaved_rounds(runs, args.rounds)
    host = {**this_host().describe(), "read_bandwidth_gb_s": round(memory_bandwidth(THREADS) / 1e9, 1)}
    summary: dict[str, Any] = {"host": host, "threads": THREADS, "rounds": args.rounds}
    for (runtime, case), rounds in results.items():
        summary.setdefault(runtime, {})[case] = {
            "rounds": rounds,
            "first_token_ms_median_of_rounds": round(statistics.median(r["first_token_ms_median"] for r in rounds), 1),
        }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    for runtime in ("gguf", "openvino"):
        print(runtime, {case: summary[runtime][case]["first_token_ms_median_of_rounds"] for case in CASES},
              file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
