"""qwenrt's OpenVINO engine with properties added to its own, for the bench scripts that
try OpenVINO settings one fresh process at a time (first_token.py,
openvino_decode_options.py, openvino_fused_projections.py), and the interleaved rounds
of fresh processes they run."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def engine_with(properties: dict[str, Any], model_dir: Path | None = None) -> Iterator[Any]:
    """The OpenVINO engine of ``model_dir``, else of the demo model (2 threads, prefix
    cache off), opened with ``properties`` added to qwenrt's."""
    import openvino_genai as ov_genai

    from qwenrt.paths import default_model_dir
    from qwenrt.runtimes import EngineOptions, open_engine

    pipeline = ov_genai.LLMPipeline

    def with_properties(*args: Any, **given: Any) -> Any:
        if properties.get("ATTENTION_BACKEND") == "SDPA":
            given.pop("scheduler_config", None)  # a scheduler configuration selects paged attention
        return pipeline(*args, **{**given, **properties})

    ov_genai.LLMPipeline = with_properties  # the engine looks the class up when it opens
    try:
        options = EngineOptions(threads=2, prefix_cache=False)
        with open_engine("openvino", model_dir or default_model_dir(), options) as engine:
            yield engine
    finally:
        ov_genai.LLMPipeline = pipeline


def short_prompt_ends(engine: Any, new_tokens: int, warmup: int, repeat: int) -> tuple[int, list[Any]]:
    """Prompt length and the ``StreamEnd`` of each measured generation of the short chat prompt."""
    from qwenrt.compare.scenarios import scenario
    from qwenrt.runtimes import GenerationConfig, StreamEnd

    ids = engine.chat_prompt_ids(scenario("short").messages)
    config = GenerationConfig(max_tokens=new_tokens, ignore_eos=True)
    ends = []
    for index in range(warmup + repeat):
        end = [event for event in engine.stream(ids, config) if isinstance(event, StreamEnd)][0]
        if index >= warmup:
            ends.append(end)
    return len(ids), ends


def end_medians(ends: Sequence[Any]) -> dict[str, float]:
    """Median first token (ms) and decode speed of ``StreamEnd``s."""
    return {
        "first_token_ms_median": round(statistics.median(end.first_token_latency * 1000 for end in ends), 1),
        "decode_tokens_per_second": round(statistics.median(end.decode_tokens_per_second for end in ends), 1),
    }


def interleaved_rounds(
    runs: dict[Hashable, tuple[list[str], dict[str, str]]], rounds: int
) -> dict[Hashable, list[dict[str, Any]]]:
    """Each variant's command (this Python, given arguments, added environment) in a fresh
    process, all variants once per round, since this host's speed drifts; the JSON each
    run prints last."""
    results: dict[Hashable, list[dict[str, Any]]] = {key: [] for key in runs}
    for round_index in range(rounds):
        for key, (arguments, env) in runs.items():
            run = subprocess.run(
                [sys.executable, *arguments], capture_output=True, text=True, env={**os.environ, **env}
            )
            if run.returncode != 0:
                raise SystemExit(f"{key}: {run.stderr.strip().splitlines()[-1]}")
            results[key].append(json.loads(run.stdout.strip().splitlines()[-1]))
            shown = {name: value for name, value in results[key][-1].items() if name != "tokens"}
            print(f"round {round_index + 1}, {key}: {shown}", file=sys.stderr)
    return results
