"""OpenVINO GenAI's ``LLMPipeline`` on the INT8 IR.

GenAI's text streamer merges tokens until they make printable text, so it can
neither count nor time tokens; a token-level streamer (``StreamerBase``) gets every
token id as it is sampled. GenAI calls it on its own thread, and a queue hands the
tokens to the caller's generator.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwenrt.errors import ArtifactError
from qwenrt.manifest import OPENVINO_KEY, artifact_files
from qwenrt.runtimes.base import Engine, EngineOptions, GenerationConfig, TokenRelay
from qwenrt.runtimes.byte_vocab import token_byte_table

DYNAMIC_QUANTIZATION_GROUP_SIZE = 128
REQUIRED_FILES = {
    "openvino_model.xml": "the model graph",
    "openvino_model.bin": "the model weights",
    "openvino_tokenizer.xml": "the tokenizer IR",
    "openvino_detokenizer.xml": "the detokenizer IR",
    "tokenizer.json": "the tokenizer vocabulary",
}


class OpenVINOEngine(Engine):
    name = "openvino"
    description = "OpenVINO GenAI LLMPipeline on the INT8 IR"

    @classmethod
    def artifact_path(cls, model_dir: Path) -> Path:
        files = artifact_files(model_dir, OPENVINO_KEY)
        if not files:
            raise cls.model_not_found(model_dir, "OpenVINO model")
        folder = files[0]
        missing = [f"{name} ({what})" for name, what in REQUIRED_FILES.items() if not (folder / name).is_file()]
        if missing:
            raise ArtifactError(f"{folder}: incomplete OpenVINO model, missing {', '.join(missing)}; convert again")
        return folder

    def __init__(self, model_dir: Path, options: EngineOptions = EngineOptions()) -> None:
        super().__init__(model_dir, options)
        import openvino_genai as ov_genai

        path = self.artifact_path(self.model_dir)
        self._properties: dict[str, Any] = {} if options.engine_defaults else {
            "INFERENCE_NUM_THREADS": self.threads.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": self.threads.pin,
            # Activations quantised in groups of 128 for the INT8 matmuls: prefill +40 %,
            # decode +7 % over the plugin's default here (BENCHMARKS.md, "Tuning").
            "DYNAMIC_QUANTIZATION_GROUP_SIZE": DYNAMIC_QUANTIZATION_GROUP_SIZE,
        }  # fmt: skip
        try:
            self._pipe = ov_genai.LLMPipeline(
                str(path), "CPU", scheduler_config=self._scheduler_config(), **self._properties
            )
        except RuntimeError as exc:
            # OpenVINO's first line names its own source file; the last one says what is wrong.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            reason = lines[-1][:200] if lines else "unknown error"
            raise ArtifactError(
                f"{path}: OpenVINO could not load the model ({reason}); it may be damaged: convert it again "
                "with 'qwenrt convert SOURCE --format openvino --force'"
            ) from None
        self.path = path
        self._tokenizer = self._pipe.get_tokenizer()
        self._bytes = token_byte_table(path / "tokenizer.json")
        self._eos = frozenset(
            {self._tokenizer.get_eos_token_id()} | set(self._pipe.get_generation_config().stop_token_ids)
        )

    @property
    def chat_template(self) -> str:
        return self._tokenizer.chat_template

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def tokenize(self, text: str) -> list[int]:
        encoded = self._tokenizer.encode(text, add_special_tokens=False)
        return [int(token) for token in encoded.input_ids.data[0]]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def _generate(self, prompt_ids: list[int], config: GenerationConfig) -> Iterator[tuple[int, float]]:
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        ids = np.asarray([prompt_ids], dtype=np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        generation = self._generation_config(config)
        relay = TokenRelay()

        class TokenStreamer(ov_genai.StreamerBase):
            def write(self, token: int | list[int]) -> ov_genai.StreamingStatus:
                relay.put(token if isinstance(token, list) else [token])
                return ov_genai.StreamingStatus.CANCEL if relay.cancelled.is_set() else ov_genai.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        return relay.run(lambda: self._pipe.generate(inputs, generation, TokenStreamer()), "openvino-generate")

    def generate_batch(self, prompts: list[list[int]], config: GenerationConfig) -> tuple[float, list[list[int]]]:
        """Generate for several prompts of equal length at once (the write-up's batching).

        Returns the first-token latency, from GenAI's own metrics, and each prompt's tokens.
        """
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        ids = np.asarray(prompts, dtype=np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        result = self._pipe.generate(inputs, self._generation_config(config))
        return result.perf_metrics.get_ttft().mean / 1000, [list(map(int, tokens)) for tokens in result.tokens]

    def _scheduler_config(self) -> Any:
        """GenAI's CPU pipeline keeps the KV blocks of earlier prompts and reuses a common
        prefix; that is the multi-turn cache, and what a cold measurement must turn off."""
        import openvino_genai as ov_genai

        scheduler = ov_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = self.options.prefix_cache
        return scheduler

    def _generation_config(self, config: GenerationConfig) -> Any:
        import openvino_genai as ov_genai

        generation = self._pipe.get_generation_config()
        generation.max_new_tokens = config.max_tokens
        generation.ignore_eos = config.ignore_eos
        generation.stop_strings = set()  # stop strings are cut by qwenrt, the same way for every engine
        # A checkpoint's generation_config.json (Qwen's has repetition_penalty 1.1, top_k 20) must
        # not change what is asked: llama.cpp runs with no penalties, no top-k cut, no minimum length.
        generation.repetition_penalty = 1.0
        generation.presence_penalty = 0.0
        generation.frequency_penalty = 0.0
        generation.min_new_tokens = 0
        generation.no_repeat_ngram_size = ov_genai.GenerationConfig().no_repeat_ngram_size
        generation.top_k = config.top_k or ov_genai.GenerationConfig().top_k  # 0 is "off"
        generation.top_p = config.top_p
        generation.do_sample = config.temperature > 0
        if generation.do_sample:
            generation.temperature = config.temperature
            # Without a seed, each answer samples anew (GenAI would otherwise always use seed 0).
            generation.rng_seed = config.seed if config.seed is not None else random.randrange(2**31)
        return generation

    def settings(self) -> dict[str, Any]:
        return {
            "engine": "openvino-genai",
            "artifact": str(self.path),
            "threads": self._properties.get("INFERENCE_NUM_THREADS", "engine default"),
            **self._properties,
            "pinned_cpus": self.threads.pinned_cpus() if self.threads.pin else None,
            "prefix_cache": self.options.prefix_cache,
        }

    def close(self) -> None:
        self._pipe = None


ENGINE = OpenVINOEngine
