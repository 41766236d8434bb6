"""llama.cpp, through llama-cpp-python, on the GGUF Q8_0 artifact.

Generation runs on llama-cpp-python's token-level loop (``Llama.generate``), not its
chat-completion layer, which decodes the whole answer again at every token and holds
text back on its own terms. ``generate`` also reuses the KV cache of the longest
common prefix with the previous prompt, which is what a second chat turn needs.

Every evaluation runs on one thread that the engine owns, whichever thread asks. The
package's llama.cpp is built with OpenMP, and libgomp keeps a thread team per calling
thread: once two threads have run llama.cpp, the two teams outnumber the cores, libgomp
stops spinning between steps, and decode drops by about a third for good (BENCHMARKS.md,
"Serving"). The server's worker threads, a chat's
interruptible reader or a library user's own threads all pay that unless the work is
handed to a single thread; the hand-over costs well under 0.1 ms a token.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qwenrt.errors import ArtifactError
from qwenrt.host import this_host
from qwenrt.manifest import GGUF_KEY, trained_context_length
from qwenrt.runtimes import mapped_pages
from qwenrt.runtimes.base import (
    DEFAULT_CONTEXT,
    MAX_TOP_LOGPROBS,
    Engine,
    EngineOptions,
    GenerationConfig,
    TokenLogprobs,
    step_logprobs,
)
from qwenrt.runtimes.probe import SafeFallback
from qwenrt.runtimes.settings import Knob, ResolvedSettings, Rule

if TYPE_CHECKING:
    import numpy as np

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp's "draw a seed at random" (llama_cpp.LLAMA_DEFAULT_SEED)
T = TypeVar("T")
EXTRA_BUFFER_TYPES = "extra_buffer_types"
FLASH_ATTENTION = "flash_attention"
N_UBATCH = "n_ubatch"


class LlamaCppEngine(Engine):
    name = "gguf"
    description = "llama.cpp (llama-cpp-python) on GGUF Q8_0"
    aliases = ("llama.cpp", "llamacpp")
    artifact_key = GGUF_KEY
    artifact_format = "GGUF Q8_0"
    packages = ("llama-cpp-python",)
    applies_penalties = True  # qwenrt's own (qwenrt.runtimes.penalties), on each step's logits
    follows_grammar = True  # checked last, as llama.cpp's own sampler does (_grammar_last_llama)
    top_logprobs = MAX_TOP_LOGPROBS  # from each step's logits, before the other samplers
    knobs = (
        # Weight repacking for the CPU's own kernels; on x86 the one that takes Q8_0 is AMX.
        Knob(EXTRA_BUFFER_TYPES, "repack weights for this CPU's special kernels (AMX on Intel Xeon)",
             lambda host: (True, False), lambda host: True),
        # On CPUs its fused kernel prefills long prompts faster but decodes slower, the more so the
        # longer the context; a short chat turn sees neither, so tune could keep it on noise alone
        # (BENCHMARKS.md, "Flash attention on long prompts"). Only the prefill objective weighs it.
        Knob(FLASH_ATTENTION, "llama.cpp's fused attention kernel (faster long prompts, slower decode on CPUs)",
             lambda host: (False, True), lambda host: False, objectives=frozenset({"prefill"})),
        Knob(N_UBATCH, "prompt tokens computed at a time", lambda host: (64, 256, 512), lambda host: 512, rules=(
            # llama.cpp's AMX kernels gain from micro-batches of more than 64 tokens, and with the
            # weights repacked into their own buffer (the GGUF's pages handed back) a 256-token
            # micro-batch keeps a 3,500-token prompt's peak within 1.3x the GGUF too (BENCHMARKS.md,
            # "llama.cpp micro-batch size", the AMX host).
            Rule(256, "prefills faster with llama.cpp's AMX kernels, peak memory still within 1.3x the GGUF "
                 "(measured)", lambda host: host.has("amx_int8")),
            # Its compute buffer holds a micro-batch's attention scores against the context: with 64,
            # a long prompt's peak stays within 1.3x the GGUF for no measurable prefill (BENCHMARKS.md,
            # "llama.cpp micro-batch size").
            Rule(64, "keeps a long prompt's peak memory within 1.3x the GGUF (measured)"),),
             # Only prompts longer than a micro-batch see it: not the short chat turn.
             objectives=frozenset({"prefill"})),
    )  # fmt: skip
    safe_fallbacks = (
        SafeFallback({EXTRA_BUFFER_TYPES: False}, "llama.cpp's extra buffer types (its AMX kernels here)",
                     "qwenrt's patched llama-cpp-python runs them: reinstall it with 'make install'"),
    )  # fmt: skip

    @classmethod
    def artifact_path(cls, model_dir: Path) -> Path:
        return cls.manifest_artifact(model_dir, GGUF_KEY, "GGUF model")

    @classmethod
    def decode_bytes_per_token(cls, artifact: Path) -> int:
        """Every tensor once, but the token embedding, of which a step looks up one row; without an
        output matrix of its own, llama.cpp projects onto the vocabulary with the embedding."""
        from qwenrt.gguf_check import read_layout

        layout = read_layout(artifact)
        try:
            tensors = {name: tensor.n_bytes for name, tensor in layout.tensors.items()}
        finally:
            layout.close()
        total = sum(tensors.values())
        return total if "output.weight" not in tensors else total - tensors.get("token_embd.weight", 0)

    def __init__(
        self, model_dir: Path, options: EngineOptions = EngineOptions(), settings: ResolvedSettings | None = None
    ) -> None:
        super().__init__(model_dir, options, settings)

        from qwenrt.gguf_check import check_gguf

        load_cpu_backend()

        path = self.artifact_path(self.model_dir)
        # llama.cpp aborts the whole process on some malformed files: check before it reads one.
        facts = check_gguf(path)
        if options.context_length is None and trained_context_length(path) is None:
            self.context_length = min(DEFAULT_CONTEXT, facts["context_length"] or DEFAULT_CONTEXT)
        # llama-cpp-python's own defaults (the ladder's "before") are half the logical CPUs for
        # decode and all of them for prompts.
        threads = self.threads.threads
        chosen: dict[str, Any] = {} if options.engine_defaults else {"n_threads": threads, "n_threads_batch": threads}
        if self.resolved.get(N_UBATCH) is not None:
            chosen["n_ubatch"] = self.resolved.get(N_UBATCH)
        if self.resolved.get(FLASH_ATTENTION) is not None:
            chosen["flash_attn"] = self.resolved.get(FLASH_ATTENTION)
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama.cpp")
        # Where llama.cpp copies the weights into its AMX buffer at load, it never reads the mapped
        # GGUF's pages again but for a few embedding rows, and they would stay resident beside the
        # copy: hand them back as the copy goes, as for OpenVINO (BENCHMARKS.md, "Hosts").
        self.repacks_into_amx = repacks = _repacks_into_amx(self.resolved.effective(EXTRA_BUFFER_TYPES))
        # Huge pages need the weights a step reads in the engine's own memory. The AMX copy is (every
        # Q8_0 matrix; the embedding, read a row a token, stays in the file); otherwise llama.cpp
        # reads the file instead of mapping it (the page cache's pages, which are not collapsed).
        mapped = repacks or not options.huge_pages

        def load() -> Any:
            with _extra_buffer_types(self.resolved.get(EXTRA_BUFFER_TYPES)):
                return _grammar_last_llama()(model_path=str(path), n_ctx=self.context_length, n_batch=512,
                             use_mmap=mapped, logits_all=options.all_logits, verbose=False,
                             **chosen)  # fmt: skip

        released = mapped_pages.released_while_running(path) if repacks else nullcontext()
        try:
            # On the engine's thread too: repacking weights for the CPU's kernels (AMX) at load runs
            # OpenMP work, and a team left on the loading thread would be a second one.
            with released:
                self._llm = self.on_engine_thread(load)
        except (ValueError, RuntimeError) as exc:
            self.close()
            raise ArtifactError(f"{path}: llama.cpp could not load the model ({exc})") from None
        self.path = path
        metadata = self._llm.metadata
        self._chat_template = metadata.get("tokenizer.chat_template", "")
        self._eos = frozenset({self._llm.token_eos()})
        self._piece_cache: dict[int, bytes] = {}

    @property
    def chat_template(self) -> str:
        return self._chat_template

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eos

    def tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def tokenize_text(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) if text else []

    def token_bytes(self, token_id: int) -> bytes:
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece_cache[token_id] = self._piece(token_id, special=False)
        return piece

    def token_spelling(self, token_id: int) -> bytes:
        return self._piece(token_id, special=True)

    def _piece(self, token_id: int, special: bool) -> bytes:
        """A token's bytes, however long. llama-cpp-python's ``detokenize`` gives llama.cpp a
        32-byte buffer and reads its "too small" answer (the size needed, negated) as empty, so
        Qwen's longer tokens (runs of 33 spaces and more, as in indented code) vanished from
        answers (https://github.com/abetlen/llama-cpp-python/issues/2362, fix proposed in #2363)."""
        import llama_cpp

        vocab, token = self._llm._model.vocab, llama_cpp.llama_token(token_id)
        buffer = ctypes.create_string_buffer(64)
        written = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, special)
        if written < 0:  # the size it needs
            buffer = ctypes.create_string_buffer(-written)
            written = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, special)
        return buffer.raw[: max(written, 0)]

    @property
    def vocabulary_size(self) -> int:
        return self._llm.n_vocab()

    def window_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        import numpy as np

        self._check_window(token_ids)

        def evaluate() -> np.ndarray:
            llm = self._llm
            llm.reset()
            llm.eval(list(token_ids))
            return np.array(llm.scores[: len(token_ids)], dtype=np.float32)

        return self.on_engine_thread(evaluate)

    def on_engine_thread(self, work: Callable[[], T]) -> T:
        """Run ``work`` (anything that evaluates with this engine's ``Llama``) on the engine's thread."""
        return self._compute.submit(work).result()

    def _generate(self, prompt_ids: list[int], config: GenerationConfig) -> Iterator[tuple[int, float]]:
        llm = self._llm
        if not self.options.prefix_cache:
            llm.reset()
        # The seed sticks to the Llama object: without one, go back to llama.cpp's "random"
        # seed, or an earlier request's seed would make every later answer repeat.
        llm.set_seed(config.seed if config.seed is not None else LLAMA_DEFAULT_SEED)
        failures: list[BaseException] = []
        recorded: list[tuple[int, np.ndarray, tuple[tuple[int, float], ...]]] = []  # the last step's (_recorder)
        # Read when generate() makes its sampler, at the first token (see _grammar_last_llama).
        llm.grammar_last = (config.grammar, config.grammar_trigger) if config.grammar is not None else None
        tokens = llm.generate(
            prompt_ids,
            temp=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            min_p=0.0,
            repeat_penalty=1.0,  # llama.cpp's own penalties mean something else: see _penalties
            reset=True,
            logits_processor=self._logits_processors(config, prompt_ids, failures, recorded),
        )

        def step() -> tuple[Any, ...] | None:
            token = next(tokens, None)
            if failures:  # a processor failed inside llama.cpp's sampler, which cannot pass it on
                raise failures[0]
            if token is None:
                return None
            if config.logprobs is None:
                return token, time.perf_counter()
            _, logprobs, top = recorded[-1]  # the step that chose this token
            return token, time.perf_counter(), TokenLogprobs(float(logprobs[token]), top)

        # One token per hand-over, each asked for by the reader: nothing is evaluated ahead
        # of what the reader takes, so stopping costs no extra token.
        try:
            while (produced := self.on_engine_thread(step)) is not None:
                yield produced
        finally:
            self.on_engine_thread(tokens.close)

    def _logits_processors(
        self,
        config: GenerationConfig,
        prompt_ids: list[int],
        failures: list[BaseException],
        recorded: list[tuple[int, np.ndarray, tuple[tuple[int, float], ...]]],
    ) -> Any:
        """What qwenrt reads from and changes in each step's logits before llama.cpp's samplers
        (None: nothing). They run inside a ctypes callback, where an exception would be printed
        and forgotten: each one's failure goes into ``failures`` instead, for the generation to
        raise. With log-probabilities asked for, the model's own distribution is recorded first."""
        from llama_cpp import LogitsProcessorList

        processors = []
        if config.logprobs is not None:
            processors.append(_recorder(config.logprobs, recorded))
        if config.penalised:
            processors.append(_penalties(config, prompt_ids))
        if config.grammar is not None:
            # A finished grammar lets llama.cpp end on any token it counts as an end of generation
            # (<|endoftext|> too), which this engine does not stop at: the answer would run on with
            # empty tokens to the budget. Only the engine's own end tokens stay open, as in GenAI.
            others = self._other_end_tokens

            def end_as_this_engine_does(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
                logits[others] = float("-inf")
                return logits

            processors.append(end_as_this_engine_does)
        if not processors:
            return None

        def guarded(processor: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
            def run(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
                try:
                    return processor(input_ids, logits)
                except BaseException as exc:
                    failures.append(exc)
                    return logits

            return run

        return LogitsProcessorList([guarded(processor) for processor in processors])

    @functools.cached_property
    def _other_end_tokens(self) -> np.ndarray:
        """Tokens llama.cpp counts as ends of generation besides this engine's EOS (read once)."""
        import llama_cpp
        import numpy as np

        vocab = self._llm._model.vocab
        ends = [t for t in range(self._llm.n_vocab()) if t not in self._eos and llama_cpp.llama_vocab_is_eog(vocab, t)]
        return np.array(ends, dtype=np.int64)

    def settings(self) -> dict[str, Any]:
        from llama_cpp import llama_load_mode_name

        return {
            "engine": "llama.cpp",
            "artifact": str(self.path),
            "threads": self._llm.context_params.n_threads,
            "n_threads": self._llm.context_params.n_threads,
            "n_threads_batch": self._llm.context_params.n_threads_batch,
            "n_ctx": self._llm.n_ctx(),
            "n_batch": self._llm.n_batch,
            "n_ubatch": self._llm.context_params.n_ubatch,
            "pinned_cpus": self.threads.pinned_cpus() if self.threads.pin else None,
            "prefix_cache": self.options.prefix_cache,
            "load_mode": llama_load_mode_name(self._llm.model_params.load_mode).decode(),  # "mmap" or "none"
            "extra_buffer_types": bool(self._llm.model_params.use_extra_bufts),
            "amx_repack": self.repacks_into_amx,  # the weights a step reads are llama.cpp's AMX copy
            "flash_attention": self._llm.context_params.flash_attn_type == 1,  # LLAMA_FLASH_ATTN_TYPE_ENABLED
            "huge_pages": self.options.huge_pages,
        }

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            self._compute.submit(llm.close).result()  # on the thread that loaded it, like all its work
            self._llm = None
        if (compute := getattr(self, "_compute", None)) is not None:
            compute.shutdown(wait=True)
        super().close()


_MODEL_PARAMS_LOCK = threading.Lock()


def _penalties(config: GenerationConfig, prompt_ids: list[int]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The penalties as qwenrt means them, applied to each step's logits before llama.cpp's
    samplers. Its own penalty sampler sees only the answer's last 64 tokens and not the
    prompt, so a repetition penalty would mean less there than on OpenVINO."""
    from qwenrt.runtimes.penalties import apply_penalties

    prompt_length = len(prompt_ids)

    def penalise(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        # input_ids: the sequence so far, this prompt then the answer's tokens
        return apply_penalties(logits, input_ids[:prompt_length], input_ids[prompt_length:], config.repetition_penalty,
                               config.presence_penalty, config.frequency_penalty)  # fmt: skip

    return penalise


def _recorder(alternatives: int, recorded: list[Any]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A processor that keeps the step's log-probabilities and its ``alternatives`` most likely tokens,
    after the length of the sequence they continue."""

    def record(input_ids: np.ndarray, logits: np.ndarray) -> np.ndarray:
        # Where a grammar refuses the chain's choice, the step runs the chain again on logits the
        # grammar has masked (_GrammarLastSampler): only a step's first call sees the model's own.
        if not recorded or recorded[0][0] != len(input_ids):
            recorded[:] = [(len(input_ids), *step_logprobs(logits, alternatives))]
        return logits

    return record


@functools.cache
def _grammar_last_llama() -> type:
    """llama-cpp-python's Llama, whose sampler checks a grammar last, as llama.cpp's own common
    sampler does (common/sampling.cpp): the token the other samplers choose is checked against
    the grammar alone, and only if the grammar refuses it is the grammar applied to the whole
    vocabulary and the token chosen again. llama-cpp-python puts the grammar in the chain,
    where it reads every one of the 151,936 tokens at every step: constrained decoding then
    ran at under half the speed (BENCHMARKS.md, "Constrained decoding")."""
    from llama_cpp import Llama

    class GrammarLastLlama(Llama):
        grammar_last: tuple[str, str | None] | None = None  # the next generation's grammar and trigger (None: free)

        def _init_sampler(self, *args: Any, **kwargs: Any) -> Any:
            chain = super()._init_sampler(*args, **kwargs)
            return chain if self.grammar_last is None else _GrammarLastSampler(self, chain, *self.grammar_last)

    return GrammarLastLlama


class _GrammarLastSampler:
    """A sampler chain and a grammar, the grammar consulted last; what Llama.sample() needs of a sampler."""

    def __init__(self, llm: Any, chain: Any, grammar: str, trigger: str | None = None) -> None:
        import llama_cpp
        import numpy as np

        self._api = llama_cpp
        self._chain = chain
        if trigger is None:
            self._grammar = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, grammar.encode("utf-8"), b"root")
        else:
            # Lazy: llama.cpp matches the pattern against the answer so far, and feeds the grammar
            # from its group on; until then the grammar lets every token through.
            pattern = f"[\\s\\S]*?({re.escape(trigger)}[\\s\\S]*)".encode()
            self._grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                llm._model.vocab, grammar.encode("utf-8"), b"root", (ctypes.c_char_p * 1)(pattern), 1,
                (llama_cpp.llama_token * 0)(), 0,
            )  # fmt: skip
        if not self._grammar:
            raise ArtifactError("llama.cpp could not read the answer's grammar")
        self._vocabulary = llm.n_vocab()
        self._ids = np.arange(self._vocabulary, dtype=np.int32)
        self._all = (llama_cpp.llama_token_data * self._vocabulary)()
        self._all_view = np.ctypeslib.as_array(self._all)
        self._one = (llama_cpp.llama_token_data * 1)()

    def sample(self, ctx: Any, idx: int = -1) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self._api.llama_get_logits_ith(ctx.ctx, idx), shape=(self._vocabulary,))
        token = self._choose(logits, grammar_first=False)
        if not self._grammar_allows(token):
            token = self._choose(logits, grammar_first=True)
        self._api.llama_sampler_accept(self._grammar, token)
        self._chain.accept(token)
        return token

    def _choose(self, logits: np.ndarray, grammar_first: bool) -> int:
        # Samplers sort the array in place: every choice starts from the vocabulary in id order.
        self._all_view["id"] = self._ids
        self._all_view["logit"] = logits
        self._all_view["p"] = 0.0
        candidates = self._candidates(self._all, self._vocabulary)
        if grammar_first:
            self._api.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        self._api.llama_sampler_apply(self._chain.sampler, ctypes.byref(candidates))
        return int(self._all[candidates.selected].id)

    def _grammar_allows(self, token: int) -> bool:
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        self._api.llama_sampler_apply(self._grammar, ctypes.byref(self._candidates(self._one, 1)))
        return self._one[0].logit != float("-inf")

    def _candidates(self, data: Any, size: int) -> Any:
        return self._api.llama_token_data_array(
            data=ctypes.cast(data, ctypes.POINTER(self._api.llama_token_data)), size=size, selected=-1, sorted=False
        )

    def reset(self) -> None:
        self._api.llama_sampler_reset(self._grammar)
        self._chain.reset()

    def close(self) -> None:
        if self._grammar:
            self._api.llama_sampler_free(self._grammar)
            self._grammar = None
        self._chain.close()

    def __del__(self) -> None:
        self.close()


def load_cpu_backend() -> str | None:
    """Have ggml load its CPU backend when the installed llama.cpp keeps it in a library of its own.

    The portable wheel that ``qwenrt bundle`` ships (``qwenrt.native.llama_wheel --portable``)
    is llama.cpp built with ``GGML_BACKEND_DL`` and ``GGML_CPU_ALL_VARIANTS``: one
    ``libggml-cpu-<variant>.so`` per x86-64 generation, of which ggml loads the best one the
    CPU runs. ggml only looks for them when asked, and llama-cpp-python does not ask, so llama.cpp
    would refuse every model ("no backends are loaded"). Asked once per process; a native build
    (its CPU backend linked in) needs nothing. Returns the variant loaded, else None.
    """
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    if not any(lib_dir.glob("libggml-cpu-*.so")):
        return None
    with _BACKEND_LOCK:
        # The very file libllama loaded: a wheel holds each symbolic link as a copy of its own,
        # and a backend registered in another copy of libggml is one llama.cpp never sees.
        ggml = ctypes.CDLL(_loaded_library("libggml.so") or str(lib_dir / "libggml.so.0"))
        if ggml.ggml_backend_reg_count() == 0:
            # llama-cpp-python prints llama.cpp's log until a model is opened with verbose=False;
            # ggml's line per backend loaded would otherwise start every chat.
            log = logging.getLogger("llama-cpp-python")
            if log.level == logging.NOTSET:
                log.setLevel(logging.ERROR)
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(str(lib_dir).encode())
        if ggml.ggml_backend_reg_count() == 0:
            raise ArtifactError(f"llama.cpp found no CPU backend this CPU can run in {lib_dir}")
    return cpu_backend_variant()


def cpu_backend_variant() -> str | None:
    """The CPU variant (``haswell``, ``sapphirerapids`` …) of a portable llama.cpp this process loaded."""
    loaded = _loaded_library("libggml-cpu-")
    return Path(loaded).name.removeprefix("libggml-cpu-").split(".so")[0] if loaded else None


def _loaded_library(name: str) -> str | None:
    """The path of the first library mapped into this process whose file name starts with ``name``."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if path.startswith("/") and Path(path).name.startswith(name):
            return path
    return None


_BACKEND_LOCK = threading.Lock()


def _repacks_into_amx(extra_buffer_types: bool | None) -> bool:
    """llama.cpp copies Q8_0 weights into its AMX buffer at load: extra buffer types on, a build with
    AMX kernels, a CPU with AMX."""
    if not extra_buffer_types or not this_host().has("amx_int8"):
        return False
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()  # the CPU backend is loaded by then


@contextmanager
def _extra_buffer_types(enabled: bool | None) -> Iterator[None]:
    """Load with llama.cpp's extra buffer types on or off (None: as llama.cpp defaults, on).

    llama-cpp-python takes no argument for ``llama_model_params.use_extra_bufts``; it builds
    the parameters with ``llama_model_default_params()``, so the switch wraps that function
    while one model loads.
    """
    if enabled is None:
        yield
        return
    import llama_cpp.llama as llama_module

    with _MODEL_PARAMS_LOCK:
        defaults = llama_module.llama_cpp.llama_model_default_params

        def with_choice() -> Any:
            params = defaults()
            params.use_extra_bufts = enabled
            return params

        llama_module.llama_cpp.llama_model_default_params = with_choice
        try:
            yield
        finally:
            llama_module.llama_cpp.llama_model_default_params = defaults


ENGINE = LlamaCppEngine
