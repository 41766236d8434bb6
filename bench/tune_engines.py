"""Engine settings tried for BENCHMARKS.md's "Tuning" tables: prefill and decode per setting.

Each setting runs in its own process (a setting such as an OpenMP variable must be in
place before the engine loads): a 512-token prompt, then 64 greedy tokens, best of 3.

    python bench/tune_engines.py            # every setting of both tables
    python bench/tune_engines.py --one openvino "{'DYNAMIC_QUANTIZATION_GROUP_SIZE': 128}"
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

from qwenrt.manifest import GGUF_KEY, OPENVINO_KEY, artifact_files
from qwenrt.paths import default_model_dir

PROMPT_TOKENS, NEW_TOKENS, THREADS = 512, 64, 2
LLAMA = [({}, {}), ({"flash_attn": True}, {}), ({"use_mmap": False}, {}), ({"n_ubatch": 128}, {}),
         ({"flash_attn": True, "n_batch": 1024, "n_ubatch": 512}, {}),
         ({}, {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores"}), ({}, {"OMP_WAIT_POLICY": "passive"})]  # fmt: skip
OPENVINO = [{}, {"KV_CACHE_PRECISION": "f16"}, {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0},
            {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 128}, {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 256},
            {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 896}, {"ENABLE_CPU_PINNING": True}]  # fmt: skip


def llama(model: Path, settings: dict) -> tuple[float, float]:
    from llama_cpp import Llama

    path = artifact_files(model, GGUF_KEY)[0]
    llm = Llama(str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=2048, verbose=False, **settings)
    return llama_prefill_decode(llm, PROMPT_TOKENS, NEW_TOKENS)


def llama_prefill_decode(llm, prompt_tokens: int, new_tokens: int, tries: int = 3) -> tuple[float, float]:
    """Best prefill and decode tokens/s of ``tries``, as llama-bench's pp/tg: a prompt of
    ``prompt_tokens`` into an empty cache, then ``new_tokens`` greedy tokens."""
    ids = llm.tokenize(("hello world " * 2000).encode())[:prompt_tokens]
    best = (0.0, 0.0)
    for _ in range(tries):
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        token = llm.sample(temp=0.0)
        first = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        best = max(best, (prompt_tokens / (first - started), new_tokens / (time.perf_counter() - first)))
    return best


def openvino(model: Path, settings: dict) -> tuple[float, float]:
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    scheduler = ov_genai.SchedulerConfig()
    scheduler.enable_prefix_caching = False
    path = artifact_files(model, OPENVINO_KEY)[0]
    pipe = ov_genai.LLMPipeline(str(path), "CPU", scheduler_config=scheduler, INFERENCE_NUM_THREADS=THREADS,
                                PERFORMANCE_HINT="LATENCY", **settings)  # fmt: skip
    ids = pipe.get_tokenizer().encode("hello world " * 300, add_special_tokens=False).input_ids.data[:, :PROMPT_TOKENS]
    config = pipe.get_generation_config()
    config.max_new_tokens, config.ignore_eos, config.do_sample = NEW_TOKENS, True, False
    best = (0.0, 0.0)
    for _ in range(3):
        metrics = pipe.generate(ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
        metrics = metrics.perf_metrics
        best = max(best, (PROMPT_TOKENS / (metrics.get_ttft().mean / 1000), 1000 / metrics.get_tpot().mean))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "SETTINGS"), help="measure one setting, in this process")
    args = parser.parse_args()
    if args.one:
        engine, settings = args.one[0], ast.literal_eval(args.one[1])
        prefill, decode = (llama if engine == "llama" else openvino)(args.model, settings)
        print(f"| {engine} | `{settings}` | {prefill:.0f} | {decode:.1f} |", flush=True)
        return
    print("| engine | setting | prefill tok/s | decode tok/s |\n| --- | --- | --- | --- |")
    runs = [("llama", settings, env) for settings, env in LLAMA] + [("openvino", s, {}) for s in OPENVINO]
    for engine, settings, env in runs:
        command = [sys.executable, __file__, "--model", str(args.model), "--one", engine, repr(settings)]
        line = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True).stdout.strip()
        print(line.replace("` |", f"{' ' + str(env) if env else ''}` |"), flush=True)


if __name__ == "__main__":
    main()
