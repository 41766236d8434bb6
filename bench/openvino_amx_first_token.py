"""Where OpenVINO's first token goes on a CPU with AMX, and whether the plugin's AMX INT8
kernels can shorten it (issue 16's "short-prompt first token <= 55 ms";
BENCHMARKS.md, "The Intel Xeon with AMX"; bench/openvino_amx_first_token_HH-MM.json, named
by the time the run started, since this host's speed moves from one hour to the next).

Two measurements, on the short chat prompt of `qwenrt compare` (38 tokens), 2 threads:

1. ``adapter``: qwenrt's streamed first token against GenAI's own, in pairs in one
   process on the same pipeline (GenAI driven from Python the way the engine drives it:
   a token streamer on GenAI's thread, a queue to the reader). The pair's difference is
   what the adapter costs the first token; the rest is the engine's prefill.
2. ``variants``: the IR and plugin settings under which the CPU plugin could use AMX for
   the prompt's matrix products, each in a fresh process, interleaved rounds:
   - the plugin's profile of the prompt's forward pass on the compiled IR (logits sliced
     to the last position, as GenAI does): time by node type and kernel, and whether the
     plugin's fused AMX MLP (``LLMMLP``) ran;
   - GenAI's own first token (its perf metrics, no streamer) and decode speed, through
     the paged-attention pipeline qwenrt opens and through GenAI's SDPA pipeline.

   The CPU plugin fuses a layer's MLP into one AMX INT8 kernel only for symmetric INT8
   weights, bf16 inference and per-token dynamic quantisation (openvino
   src/plugins/intel_cpu/src/transformations/cpu_opset/x64/pass/mlp_fusion.cpp and
   nodes/llm_mlp.cpp; qwenrt.runtimes.ovgenai.AMX_INT8_MLP). The symmetric IRs are
   exported into the qwenrt cache once (one with q/k/v left apart, which the plugin's own
   AMX q/k/v fusion needs).

    python bench/openvino_amx_first_token.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from openvino_settings import interleaved_rounds

from qwenrt.runtimes.ovgenai import AMX_INT8_MLP

HERE = Path(__file__).parent
THREADS, WARMUP, REPEAT, PAIRS, NEW_TOKENS = 2, 3, 9, 15, 32
QWENRT = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 128}
AMX_MLP = dict(AMX_INT8_MLP.values)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwenrt (asym IR, f32, groups of 128)": ("asym", QWENRT),
    "asym IR, bf16 (the plugin's default here)": ("asym", {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 128}),
    "sym IR, f32, groups of 128": ("sym", QWENRT),
    "sym IR, bf16, per token": ("sym", AMX_MLP),
    "sym IR, q/k/v apart, bf16, per token": ("sym-unfused", AMX_MLP),
}


def ir_folders() -> dict[str, Path]:
    from qwenrt.convert.checkpoint import Checkpoint
    from qwenrt.convert.openvino_int8 import Int8Scheme, export_openvino_int8
    from qwenrt.paths import cache_root, default_model_dir
    from qwenrt.runtimes.hf_transformers import TransformersEngine
    from qwenrt.runtimes.ovgenai import OpenVINOEngine

    model = default_model_dir()
    folders = {"asym": OpenVINOEngine.artifact_path(model)}
    work = cache_root() / "bench" / "amx-first-token"
    for name, fuse in (("sym", True), ("sym-unfused", False)):
        folder = work / name
        if not (folder / "openvino_model.xml").is_file():
            print(f"exporting the {name} IR", file=sys.stderr)
            folder.mkdir(parents=True, exist_ok=True)
            checkpoint = Checkpoint.open(TransformersEngine.artifact_path(model))
            export_openvino_int8(checkpoint, folder, Int8Scheme(symmetric=True), fuse_qkv=fuse)
        folders[name] = folder
    return folders


def prompt_ids(tokenizer: Any) -> list[int]:
    from qwenrt.compare.scenarios import scenario

    text = tokenizer.apply_chat_template(scenario("short").messages, add_generation_prompt=True)
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]]


def prompt_request(ir: Path, properties: dict[str, Any]) -> tuple[Any, Any]:
    """An infer request on the IR compiled as GenAI runs it (the logits of the last position
    only), 2 threads, and the short chat prompt's ids as a [1, n] array."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    from qwenrt.runtimes.ovgenai import _slice_to_last_position

    core = ov.Core()
    model = core.read_model(ir / "openvino_model.xml")
    _slice_to_last_position(model)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
                                                 **properties})  # fmt: skip
    return compiled.create_infer_request(), np.asarray([prompt_ids(ov_genai.Tokenizer(str(ir)))], dtype=np.int64)


def feeds(tokens: Any, start: int = 0) -> dict[str, Any]:
    """The stateful IR's inputs for ``tokens`` (a [1, n] array) at positions from ``start``."""
    import numpy as np

    end = start + tokens.shape[1]
    return {"input_ids": tokens, "attention_mask": np.ones((1, end), dtype=np.int64),
            "position_ids": np.arange(start, end, dtype=np.int64)[None, :],
            "beam_idx": np.zeros(1, dtype=np.int32)}  # fmt: skip


def profile_prompt(ir: Path, properties: dict[str, Any]) -> dict[str, Any]:
    """The plugin's per-node profile of the prompt's forward pass (median wall of REPEAT)."""
    request, ids = prompt_request(ir, {**properties, "PERF_COUNT": True})
    prompt = feeds(ids)
    walls, kernels = [], collections.Counter()
    for index in range(WARMUP + REPEAT):
        request.reset_state()
        start = time.perf_counter()
        request.infer(prompt)
        if index >= WARMUP:
            walls.append((time.perf_counter() - start) * 1000)
            for node in request.profiling_info:
                kernels[f"{node.node_type} {node.exec_type}"] += node.real_time.total_seconds() * 1000 / REPEAT
    return {
        "prompt_ms_median": round(statistics.median(walls), 1),
        "ms_by_kernel": {name: round(ms, 2) for name, ms in kernels.most_common(6)},
        "fused_amx_mlp": any(name.startswith("LLMMLP") for name in kernels),
    }


def genai_first_token(ir: Path, properties: dict[str, Any], paged: bool) -> dict[str, Any]:
    """GenAI's own first token (no streamer) and decode speed, medians of REPEAT."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    if paged:
        scheduler = ov_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = False
        backend: dict[str, Any] = {"scheduler_config": scheduler}
    else:
        backend = {"ATTENTION_BACKEND": "SDPA"}
    pipe = ov_genai.LLMPipeline(str(ir), "CPU", **backend, INFERENCE_NUM_THREADS=THREADS,
                                PERFORMANCE_HINT="LATENCY", **properties)  # fmt: skip
    ids = np.asarray([prompt_ids(pipe.get_tokenizer())], dtype=np.int64)
    inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
    config = pipe.get_generation_config()
    config.max_new_tokens, config.ignore_eos, config.do_sample = NEW_TOKENS, True, False
    firsts, decodes = [], []
    for index in range(WARMUP + REPEAT):
        metrics = pipe.generate(inputs, config).perf_metrics
        if index >= WARMUP:
            firsts.append(metrics.get_ttft().mean)
            decodes.append(metrics.get_throughput().mean)
    return {"first_token_ms_median": round(statistics.median(firsts), 1),
            "decode_tps_median": round(statistics.median(decodes), 1)}  # fmt: skip


def adapter_pairs() -> dict[str, Any]:
    """qwenrt's streamed first token and GenAI's, alternately on one pipeline."""
    import queue
    import threading

    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    from qwenrt.compare.scenarios import scenario
    from qwenrt.paths import default_model_dir
    from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, open_engine

    with open_engine("openvino", default_model_dir(), EngineOptions(threads=THREADS, prefix_cache=False)) as engine:
        ids = engine.chat_prompt_ids(scenario("short").messages)
        config = GenerationConfig(max_tokens=NEW_TOKENS, ignore_eos=True)
        native = np.asarray([ids], dtype=np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(native), ov.Tensor(np.ones_like(native)))
        generation = engine._generation_config(config)

        def genai() -> float:
            tokens: queue.SimpleQueue[Any] = queue.SimpleQueue()

            class Streamer(ov_genai.StreamerBase):
                def write(self, token: Any) -> Any:
                    tokens.put(token)
                    return ov_genai.StreamingStatus.RUNNING

                def end(self) -> None:
                    pass

            start = time.perf_counter()
            worker = threading.Thread(target=lambda: (engine._pipe.generate(inputs, generation, Streamer()),
                                                      tokens.put(None)))  # fmt: skip
            worker.start()
            tokens.get()
            first = time.perf_counter() - start
            while tokens.get() is not None:
                pass
            worker.join()
            return first * 1000

        def qwenrt() -> float:
            ends = [event for event in engine.stream(ids, config) if isinstance(event, StreamEnd)]
            return ends[0].first_token_latency * 1000

        for _ in range(WARMUP):
            genai(), qwenrt()
        pairs = [(genai(), qwenrt()) for _ in range(PAIRS)]
    differences = sorted(ours - theirs for theirs, ours in pairs)
    return {
        "pairs": PAIRS,
        "genai_ms_median": round(statistics.median(theirs for theirs, _ in pairs), 1),
        "qwenrt_ms_median": round(statistics.median(ours for _, ours in pairs), 1),
        "difference_ms_median": round(statistics.median(differences), 1),
        "difference_ms_quartiles": [round(q, 1) for q in statistics.quantiles(differences, n=4)[::2]],
    }


def medians(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Each figure's median over the rounds (a round's figure is itself a median of REPEAT)."""
    return {key: round(statistics.median(r[key] for r in rounds), 1) for key in rounds[0]
            if isinstance(rounds[0][key], float)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--adapter", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", nargs=3, metavar=("KIND", "IR", "PROPERTIES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, ir, properties = args.one[0], Path(args.one[1]), json.loads(args.one[2])
        measure = {"profile": lambda: profile_prompt(ir, properties),
                   "paged": lambda: genai_first_token(ir, properties, paged=True),
                   "sdpa": lambda: genai_first_token(ir, properties, paged=False)}[kind]  # fmt: skip
        print(json.dumps(measure()))
        return
    if args.adapter:
        print(json.dumps(adapter_pairs()))
        return
    from qwenrt.compare.ceiling import memory_bandwidth
    from qwenrt.host import this_host

    folders = ir_folders()
    runs = {
        (name, kind): (["-u", __file__, "--one", kind, str(folders[ir]), json.dumps(properties)], {})
        for name, (ir, properties) in VARIANTS.items()
        for kind in ("profile", "paged", "sdpa")
    }
    runs[("adapter", "pairs")] = (["-u", __file__, "--adapter"], {})
    started = time.localtime()
    results = interleaved_rounds(runs, args.rounds)
    host = {**this_host().describe(), "read_bandwidth_gb_s": round(memory_bandwidth(THREADS) / 1e9, 1)}
    summary: dict[str, Any] = {"host": host, "threads": THREADS, "rounds": args.rounds}
    for (name, kind), rounds in results.items():
        entry = summary.setdefault(name, {})
        entry[kind] = {"rounds": rounds, "median_of_rounds": medians(rounds)}
    out = HERE / f"openvino_amx_first_token_{time.strftime('%H-%M', started)}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for name, entry in summary.items():
        if name != "host" and isinstance(entry, dict):
            print(name, {kind: measured["median_of_rounds"] for kind, measured in entry.items()})


if __name__ == "__main__":
    main()
