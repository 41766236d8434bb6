"""Where an OpenVINO decode step spends its time: the CPU plugin's own per-node profile,
for BENCHMARKS.md's account of the distance to the bandwidth ceiling
(bench/openvino_profile.json).

The demo model's IR is compiled with qwenrt's properties and ``PERF_COUNT``, and driven
one token at a time through its stateful KV cache (plain OpenVINO, not GenAI's paged
attention, which does not hand out the profile): the short chat prompt, then 64 greedy
tokens, the first 4 left out, 3 repetitions. Each matrix product's time is set against
the INT8 bytes of its weights, and the whole against the memory read bandwidth measured
by `make bench`'s own method on the same run.

    python bench/openvino_profile.py
"""

from __future__ import annotations

import collections
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from qwenrt.compare.ceiling import memory_bandwidth
from qwenrt.compare.scenarios import scenario
from qwenrt.paths import default_model_dir
from qwenrt.runtimes.ovgenai import DYNAMIC_QUANTIZATION_GROUP_SIZE

HERE = Path(__file__).parent
THREADS, NEW_TOKENS, SKIPPED, REPEAT = 2, 64, 4, 3


def weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(output, input) features of each matrix product, by its name in the IR; per layer
    for the projections."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * hidden // config["num_attention_heads"]
    return {
        "q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
        "qkv_proj": (hidden + 2 * kv, hidden),  # q, k and v as qwenrt's conversion fuses them
        "gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner),
        "lm_head": (config["vocab_size"], hidden),
    }  # fmt: skip


def matrix_name(node_name: str) -> str:
    match = re.search(r"(lm_head|[a-z]+_proj)", node_name)
    return match.group(1) if match else node_name


def profile(ir_dir: Path) -> dict[str, Any]:
    import openvino as ov
    import openvino_genai as ov_genai

    properties = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
                  "DYNAMIC_QUANTIZATION_GROUP_SIZE": DYNAMIC_QUANTIZATION_GROUP_SIZE, "PERF_COUNT": True}  # fmt: skip
    request = ov.Core().compile_model(ir_dir / "openvino_model.xml", "CPU", properties).create_infer_request()
    tokenizer = ov_genai.Tokenizer(str(ir_dir))
    prompt = tokenizer.apply_chat_template(list(scenario("short").messages), add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).input_ids.data.astype(np.int64)

    def step(ids: np.ndarray, past: int) -> int:
        count = ids.shape[1]
        request.infer({
            "input_ids": ids,
            "attention_mask": np.ones((1, past + count), np.int64),
            "position_ids": np.arange(past, past + count, dtype=np.int64)[None],
            "beam_idx": np.zeros(1, np.int32),
        })  # fmt: skip
        return int(request.get_tensor("logits").data[0, -1].argmax())

    by_type: collections.Counter[str] = collections.Counter()
    by_matrix: collections.Counter[str] = collections.Counter()
    walls, steps = [], 0
    for _ in range(REPEAT):
        request.reset_state()
        token, past = step(prompt_ids, 0), prompt_ids.shape[1]
        for index in range(NEW_TOKENS):
            started = time.perf_counter()
            token = step(np.array([[token]], np.int64), past)
            elapsed = time.perf_counter() - started
            past += 1
            if index < SKIPPED:
                continue
            walls.append(elapsed)
            steps += 1
            for node in request.profiling_info:
                milliseconds = node.real_time.total_seconds() * 1000
                by_type[node.node_type] += milliseconds
                if node.node_type.startswith("FullyConnected"):
                    by_matrix[matrix_name(node.node_name)] += milliseconds
    return {
        "prompt_tokens": int(prompt_ids.shape[1]),
        "wall_ms_per_token": 1000 * float(np.median(walls)),
        "profiled_ms_per_token": sum(by_type.values()) / steps,
        "ms_per_token_by_node_type": {name: total / steps for name, total in by_type.most_common()},
        "ms_per_token_by_matrix": {name: total / steps for name, total in by_matrix.most_common()},
    }


def main() -> None:
    ir_dir = default_model_dir() / "openvino-int8"
    config = json.loads((ir_dir / "config.json").read_text())
    result = profile(ir_dir)
    bandwidth = memory_bandwidth(THREADS)
    layers = config["num_hidden_layers"]
    matrices = []
    for name, milliseconds in result["ms_per_token_by_matrix"].items():
        rows, columns = weight_shapes(config)[name]
        weight_bytes = rows * columns * (1 if name == "lm_head" else layers)
        matrices.append({"matrix": name, "ms_per_token": milliseconds, "int8_weight_mb": weight_bytes / 1e6,
                         "gb_per_s": weight_bytes / milliseconds / 1e6})  # fmt: skip
    result |= {"memory_bandwidth_gb_per_s": bandwidth / 1e9, "matrices": matrices, "threads": THREADS}
    (HERE / "openvino_profile.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"wall {result['wall_ms_per_token']:.2f} ms/token, profiled {result['profiled_ms_per_token']:.2f}, "
          f"bandwidth {bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    print("| matrix | ms per token | INT8 weights MB | GB/s |\n| --- | --- | --- | --- |")
    for row in matrices:
        print(f"| {row['matrix']} | {row['ms_per_token']:.2f} | {row['int8_weight_mb']:.1f} | {row['gb_per_s']:.1f} |")
    for name, milliseconds in list(result["ms_per_token_by_node_type"].items())[:6]:
        print(f"{name}: {milliseconds:.2f} ms")


if __name__ == "__main__":
    main()
