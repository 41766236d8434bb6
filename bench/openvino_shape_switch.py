"""What a new input shape costs OpenVINO's prompt pass: the rest of issue 16's "short-prompt
first token <= 55 ms" after the matrix products (BENCHMARKS.md, "The Intel Xeon with AMX").

The CPU plugin runs the IR with dynamic shapes: when an inference's input shape differs
from the one before, every node's shapes and kernels are prepared again before it runs.
A chat always pays this at its prompt: the inference before was the last decode step
(one token), and the prompt's length is new. This measures the short chat prompt's
forward pass (38 tokens, qwenrt's settings, logits sliced to the last position as GenAI
does, 2 threads) in one process, three ways taking turns, each preceded by:

- ``same shape``: the same prompt (the shapes are already in place: the kernels alone);
- ``after a decode step``: one decode step, as in a chat;
- ``after another length``: a 20-token prompt.

Each round is a fresh process; a round's figure is the median of its turns.

    python bench/openvino_shape_switch.py [--rounds 3] [--out bench/openvino_shape_switch_HH-MM.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openvino_amx_first_token import QWENRT, THREADS, feeds, prompt_request
from openvino_settings import interleaved_rounds

HERE = Path(__file__).parent
WARMUP, TURNS = 5, 60
CASES = ("same shape", "after a decode step", "after another length")


def measure() -> dict[str, Any]:
    import numpy as np

    from qwenrt.paths import default_model_dir
    from qwenrt.runtimes.ovgenai import OpenVINOEngine

    request, ids = prompt_request(OpenVINOEngine.artifact_path(default_model_dir()), QWENRT)
    prompt, shorter = feeds(ids), feeds(ids[:, :20])
    decode_step = feeds(np.asarray([[int(ids[0, -1])]], dtype=np.int64), ids.shape[1])
    before = {
        "same shape": lambda: (request.reset_state(), request.infer(prompt)),
        "after a decode step": lambda: request.infer(decode_step),
        "after another length": lambda: (request.reset_state(), request.infer(shorter)),
    }
    walls: dict[str, list[float]] = {case: [] for case in CASES}
    for turn in range(WARMUP + TURNS):
        for case in CASES:
            before[case]()
            request.reset_state()
            start = time.perf_counter()
            request.infer(prompt)
            if turn >= WARMUP:
                walls[case].append((time.perf_counter() - start) * 1000)
    same = walls["same shape"]
    return {
        **{case: round(statistics.median(walls[case]), 1) for case in CASES},
        **{f"{case}, paired difference": round(statistics.median(b - a for a, b in zip(same, walls[case],
                                                                                     strict=True)), 1)
           for case in CASES[1:]},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / f"openvino_shape_switch_{time.strftime('%H-%M')}.json")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure()))
        return
    from qwenrt.compare.ceiling import memory_bandwidth
    from qwenrt.host import this_host

    rounds = interleaved_rounds({"prompt pass": (["-u", __file__, "--one"], {})}, args.rounds)["prompt pass"]
    host = {**this_host().describe(), "read_bandwidth_gb_s": round(memory_bandwidth(THREADS) / 1e9, 1)}
    summary = {
        "host": host, "threads": THREADS, "settings": QWENRT, "turns": TURNS, "rounds": rounds,
        "median_of_rounds": {key: round(statistics.median(r[key] for r in rounds), 1) for key in rounds[0]},
    }  # fmt: skip
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["median_of_rounds"]), file=sys.stderr)


if __name__ == "__main__":
    main()
