"""OpenVINO GenAI's ``LLMPipeline`` on the INT8 IR.

GenAI's text streamer merges tokens until they make printable text, so it can
neither count nor time tokens; a token-level streamer (``StreamerBase``) gets every
token id as it is sampled. GenAI calls it on its own thread, and a queue hands the
tokens to the caller's generator.

With ``parallel`` above 1 (the server), the engine runs GenAI's
``ContinuousBatchingPipeline`` instead: every request in flight joins the same
forward pass at its next step, the write-up's batching without waiting for a batch
to fill. One thread steps the pipeline and hands each request its tokens. A single
stream stays on ``LLMPipeline``: its C++ loop decoded as fast or faster than stepping
from Python (BENCHMARKS.md, "Serving"), and chat and compare are measured on it.

Neither pipeline tells a streaming caller the log-probabilities of the tokens it did not
choose, so a request that asks for them is also read by a scorer (``_Scorer``): the IR
compiled a second time, fed the prompt and then each token GenAI chose, whose raw logits
give the log-probabilities as llama.cpp's engine gives them. It costs a second copy of the
weights (the CPU plugin copies them into its own layout for each compiled model) from the
first such request on, and a second forward pass for each token of such a request.
"""

from __future__ import annotations

import itertools
import json
import queue
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwenrt.errors import ArtifactError, QwenrtError
from qwenrt.host import Host
from qwenrt.manifest import OPENVINO_KEY, read_manifest
from qwenrt.runtimes import mapped_pages
from qwenrt.runtimes.base import (
    MAX_TOP_LOGPROBS,
    Engine,
    EngineOptions,
    GenerationConfig,
    TokenLogprobs,
    TokenRelay,
    step_logprobs,
)
from qwenrt.runtimes.byte_vocab import read_vocabulary
from qwenrt.runtimes.grammar import after_literal
from qwenrt.runtimes.probe import SafeFallback
from qwenrt.runtimes.settings import Combination, Knob, ResolvedSettings, Rule

if TYPE_CHECKING:
    import numpy as np

PRECISION = "INFERENCE_PRECISION_HINT"
KV_CACHE_PRECISION = "KV_CACHE_PRECISION"
DYNAMIC_QUANTIZATION = "DYNAMIC_QUANTIZATION_GROUP_SIZE"
DYNAMIC_QUANTIZATION_GROUP_SIZE = 128
# A group longer than any row of the model: one scale per token, which the plugin's fused AMX
# kernels require (AMX_INT8_MLP below).
PER_TOKEN = 2**32 - 1


@cache
def plugin_default(name: str) -> str:
    """What the CPU plugin uses for a property when not told, on this CPU ("bf16", "u8", "32")."""
    import openvino as ov

    value = ov.Core().get_property("CPU", name)
    return value.to_string() if hasattr(value, "to_string") else str(value)


@cache
def _capabilities() -> frozenset[str]:
    import openvino as ov

    return frozenset(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def _precisions(host: Host) -> tuple[str, ...]:
    # Not f16, though the plugin offers it where the CPU has FP16: Qwen2.5's activations overflow
    # it, and the demo model answered "!!!!!!!!" (token 0, from NaN logits) with any KV cache on
    # the AMX host, a failure that tune, measuring speed, would not see. --set still gives it.
    return ("f32", *(["bf16"] if "BF16" in _capabilities() else []))


def _cache_precisions(host: Host) -> tuple[str, ...]:
    # A u8 or f16 cache moves GenAI's answers away from the float model's (more than the INT8
    # weights do, for u8), a cost that tune, measuring speed, cannot see: only the rules' choice is
    # offered (f32, or f16 beside bf16 arithmetic), the others stay one --set away (README, "The KV
    # cache's precision").
    return ("f32",)


def _cache_conflict(value: Any, earlier: Mapping[str, Any]) -> str | None:
    """The plugin loads an f32 cache only with f32 arithmetic, and a bf16 cache only with bf16
    ("expect kvcache type ..."); f16 and u8 load with any (measured on the AMX host)."""
    arithmetic = earlier.get(PRECISION)
    if value in ("f32", "bf16") and arithmetic is not None and arithmetic != value:
        return f"does not load with {PRECISION}={json.dumps(arithmetic)}: the CPU plugin wants them the same"
    return None


def _amx_mlp_applies(host: Host, model_dir: Path) -> bool:
    symmetric = read_manifest(model_dir).get("artifacts", {}).get(OPENVINO_KEY, {}).get("symmetric") is True
    return symmetric and host.has("amx_int8") and host.has("amx_bf16") and "BF16" in _capabilities()


# The CPU plugin runs a layer's whole MLP (gate, up, SiLU, down) as one AMX INT8 kernel only
# for symmetric INT8 weights, bf16 arithmetic and per-token activation scales (openvino
# src/plugins/intel_cpu/src/transformations/cpu_opset/x64/pass/mlp_fusion.cpp, nodes/llm_mlp.cpp).
# Alone, bf16 is slower than f32 and per-token scales no faster than groups of 128; together
# they shorten a short prompt's first token, at a cost in decode (BENCHMARKS.md, "Hosts").
# An f32 cache refuses bf16 arithmetic, so the combination takes f16: with it the answers stay
# three times closer to the float model's than with the plugin's u8, which also measured slower.
AMX_INT8_MLP = Combination(
    "AMX INT8 MLP", {PRECISION: "bf16", KV_CACHE_PRECISION: "f16", DYNAMIC_QUANTIZATION: PER_TOKEN},
    "the CPU plugin's fused AMX INT8 MLP kernel runs only with bf16 arithmetic and per-token scales, on "
    "symmetric INT8 weights", _amx_mlp_applies,
)  # fmt: skip

REQUIRED_FILES = {
    "openvino_model.xml": "the model graph",
    "openvino_model.bin": "the model weights",
    "openvino_tokenizer.xml": "the tokenizer IR",
    "openvino_detokenizer.xml": "the detokenizer IR",
    "tokenizer.json": "the tokenizer vocabulary",
}


# Tokens of an evaluation window read at a time (window_logits). Read whole, every position would
# see the keys and values of those before it as computed, never as the KV cache stores them; in
# pieces, it reads the earlier pieces' back from the cache, at its precision, as every generated
# token does. A u8 cache (the plugin's default on x86) costs the answers more than the INT8
# weights do, and a single pass hid it from 'qwenrt eval' (BENCHMARKS.md, "Quality").
WINDOW_PIECE = 64


class OpenVINOEngine(Engine):
    name = "openvino"
    description = "OpenVINO GenAI LLMPipeline on the INT8 IR"
    aliases = ("ov",)
    artifact_key = OPENVINO_KEY
    artifact_format = "OpenVINO IR, INT8 weights"
    batches = True
    packages = ("openvino", "openvino-genai", "openvino-tokenizers")
    applies_penalties = True  # GenAI's sampler; its meaning is the one qwenrt gives every engine
    follows_grammar = True  # GenAI's StructuredOutputConfig (XGrammar) reads GBNF as its EBNF
    top_logprobs = MAX_TOP_LOGPROBS  # from the scorer's logits (_Scorer), beside GenAI's sampler
    knobs = (
        Knob(PRECISION, "the arithmetic of the non-INT8 parts (f32, or bf16/f16 where the CPU has them)",
             _precisions, lambda host: plugin_default(PRECISION), rules=(
                 # The plugin picks bf16 on CPUs with AMX; there f32 decodes faster with INT8 weights and
                 # answers a short prompt sooner (BENCHMARKS.md, "Hosts").
                 Rule("f32", "the plugin's own default here is lower precision; with INT8 weights f32 decodes "
                      "faster (measured on an Intel Xeon with AMX)", lambda host: plugin_default(PRECISION) != "f32"),
             )),
        Knob(KV_CACHE_PRECISION, "the KV cache's element type", _cache_precisions,
             lambda host: plugin_default(KV_CACHE_PRECISION), rules=(
                 # The plugin's u8 cache moves each next-token distribution several times further
                 # from the float model's than the INT8 weights alone, and GenAI's greedy answers
                 # part from llama.cpp's within a few tokens with a u8 or an f16 cache, never with
                 # f32, which decodes a chat answer as fast (BENCHMARKS.md, "Quality").
                 Rule("f32", "the plugin's u8 cache costs the answers more fidelity than the INT8 weights; "
                      "f32 costs none, at the same speed (measured on an Intel Xeon with AMX)",
                      lambda host: plugin_default(KV_CACHE_PRECISION) == "u8"),
                 # Beside bf16 arithmetic, which refuses an f32 cache: f16 keeps a distribution
                 # three times closer to the float model's than u8 (BENCHMARKS.md, "Quality").
                 Rule("f16", "bf16 arithmetic refuses an f32 cache, and the plugin's u8 costs the answers more "
                      "fidelity than f16", lambda host: plugin_default(KV_CACHE_PRECISION) == "u8"),
             ), conflict=_cache_conflict),
        Knob(DYNAMIC_QUANTIZATION, "activations quantised in groups of this size for the INT8 products (0: off)",
             lambda host: (0, 32, 64, 128, 256), lambda host: int(plugin_default(DYNAMIC_QUANTIZATION)), rules=(
                 # Faster prefill and decode than the plugin's default group on both Intel Xeons
                 # measured (BENCHMARKS.md, "Tuning" and "Hosts").
                 Rule(DYNAMIC_QUANTIZATION_GROUP_SIZE, "faster prefill and decode than the plugin's 32 (measured on "
                      "Intel Xeon)", lambda host: host.machine in ("x86_64", "AMD64")),
             )),
    )  # fmt: skip
    combinations = (AMX_INT8_MLP,)
    safe_fallbacks = (
        SafeFallback({PRECISION: "f32", DYNAMIC_QUANTIZATION: 0}, "bf16/f16 arithmetic and dynamic quantisation"),
    )

    @classmethod
    def artifact_path(cls, model_dir: Path) -> Path:
        folder = cls.manifest_artifact(model_dir, OPENVINO_KEY, "OpenVINO model")
        missing = [f"{name} ({what})" for name, what in REQUIRED_FILES.items() if not (folder / name).is_file()]
        if missing:
            raise ArtifactError(f"{folder}: incomplete OpenVINO model, missing {', '.join(missing)}; convert again")
        return folder

    @classmethod
    def decode_bytes_per_token(cls, artifact: Path) -> int:
        """Every weight constant once, but the token embedding's, of which a step looks up one
        row; unless it is tied, when the output projection reads it whole too."""
        import json

        import openvino as ov

        config = json.loads((artifact / "config.json").read_text())
        embedding_shape = [config["vocab_size"], config["hidden_size"]]
        model = ov.Core().read_model(artifact / "openvino_model.xml")
        constants = [op for op in model.get_ops() if op.get_type_name() == "Constant"]
        total = sum(op.get_byte_size() for op in constants)
        # The embedding's weights: the constant of its shape that a Gather looks rows up in
        # (a position table may reach a Gather too). Untied, nothing else reads it.
        shaped = [op for op in constants if list(op.get_output_shape(0)) == embedding_shape]
        embedding = next((op for op in shaped if _reaches(op, "Gather")), None)
        if embedding is None or _reaches(embedding, "MatMul"):
            return total
        return total - embedding.get_byte_size()

    def __init__(
        self, model_dir: Path, options: EngineOptions = EngineOptions(), settings: ResolvedSettings | None = None
    ) -> None:
        super().__init__(model_dir, options, settings)
        import openvino_genai as ov_genai

        path = self.artifact_path(self.model_dir)
        self._properties: dict[str, Any] = {} if options.engine_defaults else {
            "INFERENCE_NUM_THREADS": self.threads.threads,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": self.threads.pin,
        }  # fmt: skip
        self._properties.update({knob.name: self.resolved.get(knob.name) for knob in self.knobs
                                 if self.resolved.get(knob.name) is not None})  # fmt: skip
        self._pipe: Any = None
        self._model: Any = None  # the compiled IR, when opened for logits
        self._batcher: _ContinuousBatcher | None = None
        self._scorer: _Scorer | None = None  # compiled at the first request for log-probabilities
        self._scorer_lock = threading.Lock()
        self._text_tokenizer: Any = None  # Hugging Face's, loaded for the first text that spells a control token
        self.path = path
        # Read before the weights load, so that the parse's passing heap is not added to their peak.
        self._vocabulary = read_vocabulary(path / "tokenizer.json")
        try:
            # The plugin copies every weight into its own layout at LLMPipeline's first inference:
            # done here, not in the user's first answer, and the IR's pages read for the copy are
            # handed back as it goes (BENCHMARKS.md, "What the resident memory is made of").
            # ContinuousBatchingPipeline copies while it compiles, holding the GIL, so the
            # trimming thread cannot run: there the pages go back only once it returns.
            with mapped_pages.released_while_running(path / "openvino_model.bin"):
                if options.all_logits:
                    self._open_model(ov_genai)
                else:
                    self._open_pipeline(ov_genai)
                    self.warm_up()
        except RuntimeError as exc:
            self.close()
            chosen = {k.name: self._properties[k.name] for k in self.knobs if self.resolved.values[k.name].origin
                      in ("command line", "profile") and k.name in self._properties}  # fmt: skip
            raise _load_error(path, exc, chosen) from None

    def _open_pipeline(self, ov_genai: Any) -> None:
        if self.options.parallel > 1:
            self._batcher = _ContinuousBatcher(
                ov_genai.ContinuousBatchingPipeline(str(self.path), self._scheduler_config(), "CPU", self._properties)
            )
            self.concurrency = self.options.parallel
        else:
            self._pipe = ov_genai.LLMPipeline(
                str(self.path), "CPU", scheduler_config=self._scheduler_config(), **self._properties
            )
        native = self._batcher.pipe if self._batcher is not None else self._pipe
        self._tokenizer = native.get_tokenizer()
        self._vocabulary_size = _vocabulary_size(self.path, len(self._vocabulary.token_bytes))
        stop_ids = self._native_generation_config().stop_token_ids
        self._eos = frozenset({self._tokenizer.get_eos_token_id()} | set(stop_ids))

    def _open_model(self, ov_genai: Any) -> None:
        """The IR's stateful model itself, compiled with the engine's settings: every position's
        logits, which GenAI's pipelines do not give (they keep the last position's)."""
        import openvino as ov

        self._model = ov.Core().compile_model(self.path / "openvino_model.xml", "CPU", self._properties)
        self._request = self._model.create_infer_request()
        self._tokenizer = ov_genai.Tokenizer(str(self.path))
        self._vocabulary_size = _vocabulary_size(self.path, len(self._vocabulary.token_bytes))
        self._eos = frozenset({self._tokenizer.get_eos_token_id()})
        # A first inference copies the weights into the plugin's layout, inside the page release.
        self.window_logits(self.tokenize("Warm up the kernels."))

    def window_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        self._check_window(token_ids)
        names = {name for port in self._model.inputs for name in port.get_names()}
        self._request.reset_state()  # nothing cached before the window
        rows = []
        for start in range(0, len(token_ids), WINDOW_PIECE):
            piece = np.asarray([list(token_ids[start : start + WINDOW_PIECE])], dtype=np.int64)
            end = start + piece.shape[1]
            feeds = {"input_ids": piece, "attention_mask": np.ones((1, end), dtype=np.int64),
                     "position_ids": np.arange(start, end, dtype=np.int64)[None, :],
                     "beam_idx": np.zeros(1, dtype=np.int32)}  # fmt: skip
            self._request.infer({name: value for name, value in feeds.items() if name in names})
            rows.append(np.array(self._request.get_tensor("logits").data[0], dtype=np.float32))
        return np.concatenate(rows)

    @property
    def chat_template(self) -> str:
        return self._tokenizer.chat_template

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def tokenize(self, text: str) -> list[int]:
        encoded = self._tokenizer.encode(text, add_special_tokens=False)
        return [int(token) for token in encoded.input_ids.data[0]]

    def tokenize_text(self, text: str) -> list[int]:
        # GenAI's tokenizer always reads control tokens' spellings as control tokens; the Hugging
        # Face tokenizer of the same tokenizer.json can read them as text (encode_special_tokens).
        return self._hf_tokenizer().encode(text, add_special_tokens=False).ids if text else []

    def spells_control_tokens(self, text: str) -> bool:
        # Every message of every request asks this, and a GenAI tokenizer call costs a model
        # inference: only a text that holds an added token's spelling is tokenised both ways.
        added = self._vocabulary.added_spellings
        return any(spelling in text for spelling in added) and super().spells_control_tokens(text)

    def _hf_tokenizer(self) -> Any:
        """tokenizer.json's tokenizer, reading control tokens' spellings as text. Loaded only for a
        text that spells one: Qwen's holds some 90 MB, which a plain conversation never needs
        (BENCHMARKS.md, "What the resident memory is made of")."""
        if self._text_tokenizer is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
            tokenizer.encode_special_tokens = True
            self._text_tokenizer = tokenizer
        return self._text_tokenizer

    def token_bytes(self, token_id: int) -> bytes:
        table = self._vocabulary.token_bytes
        return table[token_id] if 0 <= token_id < len(table) else b""

    def token_spelling(self, token_id: int) -> bytes:
        return self._vocabulary.control_spellings.get(token_id) or self.token_bytes(token_id)

    @property
    def vocabulary_size(self) -> int:
        return self._vocabulary_size

    def _generate(self, prompt_ids: list[int], config: GenerationConfig) -> Iterator[tuple[Any, ...]]:
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        if self.options.all_logits:
            raise QwenrtError("an OpenVINO engine opened for logits (all_logits) does not generate")
        generation = self._generation_config(config)
        # Before GenAI starts: the two prompts are not computed at once, on the same cores.
        scoring = None if config.logprobs is None else self._open_scorer().start(prompt_ids, config.logprobs)
        if self._batcher is not None:
            return _scored(self._batcher.submit(prompt_ids, generation), scoring)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        relay = TokenRelay()

        class TokenStreamer(ov_genai.StreamerBase):
            def write(self, token: int | list[int]) -> ov_genai.StreamingStatus:
                relay.put(token if isinstance(token, list) else [token])
                return ov_genai.StreamingStatus.CANCEL if relay.cancelled.is_set() else ov_genai.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        tokens = relay.run(lambda: self._pipe.generate(inputs, generation, TokenStreamer()), "openvino-generate")
        return _scored(tokens, scoring)

    def _open_scorer(self) -> _Scorer:
        with self._scorer_lock:
            if self._scorer is None:
                if self._pipe is None and self._batcher is None:
                    raise QwenrtError("the OpenVINO engine is closed")
                # The plugin's copy of the weights reads the whole IR: its pages go back as it goes.
                with mapped_pages.released_while_running(self.path / "openvino_model.bin"):
                    self._scorer = _Scorer(self.path / "openvino_model.xml", self._properties)
            return self._scorer

    def generate_batch(self, prompts: list[list[int]], config: GenerationConfig) -> tuple[float, list[list[int]]]:
        """Generate for several prompts of equal length at once (the write-up's batching).

        Returns the first-token latency, from GenAI's own metrics, and each prompt's tokens.
        """
        if self._pipe is None:
            raise QwenrtError("generate_batch needs the engine opened with parallel=1")
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        ids = np.asarray(prompts, dtype=np.int64)
        inputs = ov_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
        result = self._pipe.generate(inputs, self._generation_config(config))
        return result.perf_metrics.get_ttft().mean / 1000, [list(map(int, tokens)) for tokens in result.tokens]

    def warm_up(self) -> None:
        # A prompt of several tokens and two new ones: the kernels of prefill and of decode both run.
        prompt_ids = self.tokenize("Warm up the kernels that read a prompt and write an answer.")
        for _ in self._generate(prompt_ids, GenerationConfig(max_tokens=2, ignore_eos=True)):
            pass

    def _scheduler_config(self) -> Any:
        """GenAI's CPU pipeline keeps the KV blocks of earlier prompts and reuses a common
        prefix; that is the multi-turn cache, and what a cold measurement must turn off."""
        import openvino_genai as ov_genai

        scheduler = ov_genai.SchedulerConfig()
        scheduler.enable_prefix_caching = self.options.prefix_cache
        if self.options.parallel > 1:
            scheduler.max_num_seqs = self.options.parallel
        return scheduler

    def _generation_config(self, config: GenerationConfig) -> Any:
        import openvino_genai as ov_genai

        generation = self._native_generation_config()
        generation.max_new_tokens = config.max_tokens
        generation.ignore_eos = config.ignore_eos
        generation.stop_strings = set()  # stop strings are cut by qwenrt, the same way for every engine
        # A checkpoint's generation_config.json (Qwen's has repetition_penalty 1.1, top_k 20) must
        # not change what is asked: every setting comes from the request (the server applies the
        # model's defaults where a request says nothing, the same way for every engine).
        # The penalties' meaning is GenAI's own (qwenrt.runtimes.penalties follows it for the others).
        generation.repetition_penalty = config.repetition_penalty
        generation.presence_penalty = config.presence_penalty
        generation.frequency_penalty = config.frequency_penalty
        if config.grammar is not None:
            # The grammar llama.cpp gets too, not GenAI's own JSON-schema mode (see qwenrt.runtimes.grammar).
            generation.structured_output_config = _structured_output(ov_genai, config)
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

    def _native_generation_config(self) -> Any:
        """A fresh copy of the model's generation_config.json, for one request to edit.

        Looked up at each call: a reference kept to the pipeline would keep its compiled
        model alive after ``close`` (measured: a second engine then doubled peak memory).
        """
        if self._batcher is not None:
            return self._batcher.pipe.get_config()
        return self._pipe.get_generation_config()

    def requests_in_flight(self) -> int:
        """Generations the continuous-batching pipeline is running (always 0 on LLMPipeline)."""
        return self._batcher.in_flight() if self._batcher is not None else 0

    def settings(self) -> dict[str, Any]:
        return {
            "engine": "openvino-genai",
            "artifact": str(self.path),
            "threads": self._properties.get("INFERENCE_NUM_THREADS", "engine default"),
            **self._properties,
            "pinned_cpus": self.threads.pinned_cpus() if self.threads.pin else None,
            "prefix_cache": self.options.prefix_cache,
            "pipeline": "ContinuousBatchingPipeline"
            if self._batcher is not None
            else "compiled model (all logits)"
            if self._model is not None
            else "LLMPipeline",
            "parallel": self.concurrency,
            "huge_pages": self.options.huge_pages,
        }

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        self._pipe = self._model = self._request = None
        # A generation still being scored keeps its own reference until it ends.
        self._scorer = None
        super().close()


class _ContinuousBatcher:
    """Steps one ContinuousBatchingPipeline on its own thread for every request in flight.

    Requests join at the next step and leave when they finish or their reader stops
    (the handle is cancelled, which frees its KV blocks). GenAI's ``step`` holds the
    GIL, so the loop does as little Python as it can between steps.
    """

    _DONE = object()

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._wake = threading.Condition()
        self._arrivals: list[tuple[int, list[int], Any, queue.SimpleQueue[Any], threading.Event]] = []
        self._in_flight: dict[int, tuple[Any, queue.SimpleQueue[Any], threading.Event]] = {}
        self._ids = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="openvino-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], generation: Any) -> Iterator[tuple[int, float]]:
        tokens: queue.SimpleQueue[Any] = queue.SimpleQueue()
        left = threading.Event()
        with self._wake:
            if self._closed:
                raise QwenrtError("the OpenVINO engine is closed")
            self._arrivals.append((next(self._ids), prompt_ids, generation, tokens, left))
            self._wake.notify()
        return self._read(tokens, left)

    def _read(self, tokens: queue.SimpleQueue[Any], left: threading.Event) -> Iterator[tuple[int, float]]:
        try:
            while (item := tokens.get()) is not self._DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            left.set()
            with self._wake:
                self._wake.notify()

    def _run(self) -> None:
        import numpy as np
        import openvino as ov
        import openvino_genai as ov_genai

        running = ov_genai.GenerationStatus.RUNNING
        while True:
            with self._wake:
                while not self._closed and not self._arrivals and not self._in_flight:
                    self._wake.wait()
                if self._closed:
                    break
                arrivals, self._arrivals = self._arrivals, []
            for request_id, prompt_ids, generation, tokens, left in arrivals:
                try:
                    ids = ov.Tensor(np.asarray([prompt_ids], dtype=np.int64))
                    self._in_flight[request_id] = (self.pipe.add_request(request_id, ids, generation), tokens, left)
                except Exception as exc:
                    tokens.put(exc)
            for request_id, (handle, tokens, left) in list(self._in_flight.items()):
                if left.is_set():
                    handle.cancel()
                    del self._in_flight[request_id]
                    tokens.put(self._DONE)
            try:
                if self.pipe.has_non_finished_requests():
                    self.pipe.step()
            except Exception as exc:
                for _, tokens, _ in self._in_flight.values():
                    tokens.put(exc)
                self._in_flight.clear()
                continue
            now = time.perf_counter()
            idle = not self.pipe.has_non_finished_requests()
            for request_id, (handle, tokens, _) in list(self._in_flight.items()):
                if handle.can_read():
                    for output in handle.read().values():
                        for token_id in output.generated_ids:
                            tokens.put((int(token_id), now))
                # A request the pipeline no longer runs (finished, or refused as IGNORED) ends here.
                if idle or handle.get_status() != running:
                    del self._in_flight[request_id]
                    tokens.put(self._DONE)
        for _, tokens, _ in self._in_flight.values():
            tokens.put(self._DONE)
        for _, _, _, tokens, _ in self._arrivals:
            tokens.put(self._DONE)

    def in_flight(self) -> int:
        with self._wake:
            return len(self._arrivals) + len(self._in_flight)

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self.pipe = None


class _Scorer:
    """The IR compiled a second time, beside GenAI's pipeline, for the log-probabilities GenAI
    does not give: each step's raw logits (before penalties, temperature or a grammar), with the
    engine's own settings (precision, threads, dynamic quantisation) but its KV cache's
    (SCORER_SETTINGS).

    Its memory: the CPU plugin copies the weights into its own layout for each compiled model,
    so from the first request that asks for log-probabilities until the engine closes the
    scorer holds a second copy of them (BENCHMARKS.md, "Log-probabilities on OpenVINO"); and
    each scored generation a KV cache of its own (float32, 4 times a u8 cache). The logits are sliced
    to the last position before the output projection, as GenAI does, so that a long prompt
    makes one row of logits, not one per token (600 kB each with Qwen's vocabulary).
    """

    def __init__(self, ir: Path, properties: dict[str, Any]) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(ir)
        # Where the output projection is not found, the prompt goes in pieces, the last row of each kept.
        self._piece = None if _slice_to_last_position(model) else UNSLICED_PIECE
        self._model = core.compile_model(model, "CPU", {**properties, **SCORER_SETTINGS})
        self._inputs = {name for port in self._model.inputs for name in port.get_names()}
        self.start([0], 0)  # the plugin copies the weights at the first inference, while the caller releases pages

    def start(self, prompt_ids: list[int], alternatives: int) -> _Scoring:
        """A generation's scoring: its own infer request, so its own KV cache, fed ``prompt_ids``."""
        return _Scoring(self, prompt_ids, alternatives)

    def feed(self, request: Any, token_ids: list[int], position: int) -> np.ndarray:
        """Feed ``token_ids`` at ``position`` on (after ``position`` tokens in ``request``'s cache);
        the next-token logits of the last one, float32."""
        import numpy as np

        step = self._piece or len(token_ids)
        for start in range(0, len(token_ids), step):
            piece = np.asarray([token_ids[start : start + step]], dtype=np.int64)
            end = position + start + piece.shape[1]
            feeds = {"input_ids": piece, "attention_mask": np.ones((1, end), dtype=np.int64),
                     "position_ids": np.arange(position + start, end, dtype=np.int64)[None, :],
                     "beam_idx": np.zeros(1, dtype=np.int32)}  # fmt: skip
            request.infer({name: value for name, value in feeds.items() if name in self._inputs})
        return np.array(request.get_tensor("logits").data[0, -1], dtype=np.float32)

    def new_request(self) -> Any:
        return self._model.create_infer_request()


class _Scoring:
    """One generation's log-probabilities, token by token: the logits that predict the next token
    are kept, and a token is fed only when the one after it is scored (never after the last)."""

    def __init__(self, scorer: _Scorer, prompt_ids: list[int], alternatives: int) -> None:
        self._scorer = scorer
        self._request = scorer.new_request()
        self._request.reset_state()
        self._alternatives = alternatives
        self._logits = scorer.feed(self._request, prompt_ids, 0)
        self._fed = len(prompt_ids)
        self._unfed: int | None = None

    def score(self, token_id: int) -> TokenLogprobs:
        if self._unfed is not None:
            self._logits = self._scorer.feed(self._request, [self._unfed], self._fed)
            self._fed += 1
        logprobs, top = step_logprobs(self._logits, self._alternatives)
        self._unfed = token_id
        return TokenLogprobs(float(logprobs[token_id]), top)


def _scored(tokens: Iterator[tuple[int, float]], scoring: _Scoring | None) -> Iterator[tuple[Any, ...]]:
    """GenAI's tokens, each with its log-probabilities when a scoring is given.

    Scored on the thread that reads the tokens, in turn (GenAI may hand over several at once).
    GenAI does not wait for this: its loop queues tokens for its streamer and decodes on, so
    while a token is scored the next one is being decoded on the same cores."""
    if scoring is None:
        return tokens
    return _score_each(tokens, scoring)


def _score_each(tokens: Iterator[tuple[int, float]], scoring: _Scoring) -> Iterator[tuple[int, float, TokenLogprobs]]:
    try:
        for token_id, _ in tokens:
            logprobs = scoring.score(token_id)
            # The token reaches the reader now, with its log-probabilities: timings count the scoring.
            yield token_id, time.perf_counter(), logprobs
    finally:
        tokens.close()  # cancels GenAI's generation, when the reader stops early


# The scorer's settings over the engine's. A quantised KV cache (u8 is the plugin's default on
# x86) makes a step's logits depend on how the tokens before it were stored, far from the whole
# sequence read at once (window_logits); float32 keeps them within float rounding. Dynamic
# quantisation stays, for speed, at a price in agreement: its kernels for one row and for many
# round apart, so that with real weights a step's log-probabilities differ from window_logits' by
# tenths, as llama.cpp's do from its own (BENCHMARKS.md, "Log-probabilities on OpenVINO").
SCORER_SETTINGS: dict[str, Any] = {KV_CACHE_PRECISION: "f32"}


# Prompt tokens fed at a time where the logits cannot be sliced to the last position: 150 MB of
# logits with Qwen's vocabulary.
UNSLICED_PIECE = 256


def _slice_to_last_position(model: Any) -> bool:
    """Compute the logits of the last position only, as GenAI's pipelines do with the same IR:
    a Slice of the hidden states before the output projection. Returns False where the IR's
    logits do not come from a MatMul (through Converts), and leaves the model as it was."""
    import numpy as np
    import openvino as ov

    logits = next((port for port in model.outputs if "logits" in port.get_names()), None)
    node = logits.get_node().input_value(0).get_node() if logits is not None else None
    while node is not None and node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node is None or node.get_type_name() != "MatMul" or node.get_input_partial_shape(0).rank != 3:
        return False
    hidden = node.input_value(0)
    last = ov.opset8.slice(hidden, *(np.array([value], dtype=np.int64) for value in (-1, np.iinfo(np.int64).max, 1, 1)))
    node.input(0).replace_source_output(last.output(0))
    model.validate_nodes_and_infer_types()
    return True


# How far a weight constant may sit from its consumer: through Convert, Subtract, Multiply
# and Convert in an INT8 IR's decompression chain.
DECOMPRESSION_DEPTH = 6


def _structured_output(ov_genai: Any, config: GenerationConfig) -> Any:
    """The grammar as GenAI's StructuredOutputConfig: whole, or, with a trigger, as a tag that
    opens at the trigger and follows the grammar from there (GenAI's triggered tags)."""
    structured = ov_genai.StructuredOutputConfig
    if config.grammar_trigger is None:
        return structured(grammar=config.grammar)
    after = after_literal(config.grammar, config.grammar_trigger)
    tag = structured.Tag(begin=config.grammar_trigger, content=structured.EBNF(after), end="")
    # stop_after_first: once the grammar is done the answer ends, as a lazy grammar does in llama.cpp.
    triggered = structured.TriggeredTags(triggers=[config.grammar_trigger], tags=[tag], stop_after_first=True)
    return structured(structural_tags_config=triggered)


def _vocabulary_size(ir_dir: Path, tokens_with_text: int) -> int:
    """The model's token ids (its logits' width, config.json's vocab_size): Qwen's embedding has
    room beyond the tokenizer's last id."""
    try:
        return max(int(json.loads((ir_dir / "config.json").read_text(encoding="utf-8"))["vocab_size"]),
                   tokens_with_text)  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return tokens_with_text


def _reaches(op: Any, type_name: str, depth: int = DECOMPRESSION_DEPTH) -> bool:
    if depth == 0:
        return False
    for target in op.output(0).get_target_inputs():
        node = target.get_node()
        if node.get_type_name() == type_name or _reaches(node, type_name, depth - 1):
            return True
    return False


def _load_error(path: Path, exc: RuntimeError, chosen: dict[str, Any]) -> ArtifactError:
    # OpenVINO's first line names its own source file; the last one says what is wrong.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[-1][:200] if lines else "unknown error"
    settings = ", ".join(f"{name}={value}" for name, value in chosen.items())
    blame = f"with {settings}: another value (--set) may load it; else it" if settings else "it"
    return ArtifactError(
        f"{path}: OpenVINO could not load the model ({reason}); {blame} may be damaged: convert it again "
        "with 'qwenrt convert SOURCE --format openvino --force'"
    )


ENGINE = OpenVINOEngine
