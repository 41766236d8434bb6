"""The engine interface: open a model folder, stream a chat token by token, close.

An engine module implements four small things (find its artifact, tokenize, the
bytes of a token, and a generator of token ids); everything that must mean the same
for every engine (the prompt, the context check, stop strings, UTF-8 assembly,
timing and the end-of-stream report) lives here, once.
"""

from __future__ import annotations

import codecs
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from qwenrt.errors import ModelNotFoundError, QwenrtError
from qwenrt.manifest import artifact_files, trained_context_length
from qwenrt.runtimes.chat_template import Message, render_chat
from qwenrt.runtimes.settings import Combination, Knob, ResolvedSettings, resolve
from qwenrt.runtimes.threads import ThreadPlan

if TYPE_CHECKING:
    import numpy as np

    from qwenrt.runtimes.fingerprint import RunKey
    from qwenrt.runtimes.probe import SafeFallback

DEFAULT_CONTEXT = 4096
# OpenAI's range for presence and frequency penalties; a repetition penalty above 2 only breaks text.
MAX_ADDITIVE_PENALTY = 2.0
MAX_REPETITION_PENALTY = 2.0
MAX_TOP_LOGPROBS = 20  # OpenAI's limit of alternatives a token
StopReason = Literal["eos", "length", "stop", "cancelled"]


@dataclass(frozen=True)
class EngineOptions:
    """Settings fixed when a model is opened."""

    threads: int | None = None  # None: one per physical core
    pin: bool = False
    # None: the model's trained context, at most DEFAULT_CONTEXT (the KV cache grows with it).
    context_length: int | None = None
    # Reuse the KV cache of a prompt's common prefix with the previous one (multi-turn chat).
    # Benchmarks turn it off so that every repetition pays for its whole prompt.
    prefix_cache: bool = True
    # Leave threads and every setting at the engine's own defaults: the "before" rows of
    # compare --ladder and --engine-defaults, never a configuration to ship.
    engine_defaults: bool = False
    # Values for the engine's knobs (Engine.knobs), ahead of a tuned profile and qwenrt's rules.
    settings: Mapping[str, Any] = field(default_factory=dict)
    # Use the host profile that 'qwenrt tune' saved, if any (tune itself measures without one).
    use_profile: bool = True
    # Generations a server may run at once. Engines that batch (OpenVINO's continuous
    # batching) share each forward pass among them; the others serve one at a time.
    parallel: int = 1
    # Keep the next-token logits of every position (Engine.window_logits): for evaluation,
    # at the cost of memory and time; such an engine does not generate.
    all_logits: bool = False
    # Rebuild the loaded weights in 2 MB pages (qwenrt.runtimes.huge_pages): a little faster
    # decode for seconds more at load (BENCHMARKS.md, "Huge pages").
    huge_pages: bool = False

    def __post_init__(self) -> None:
        if self.context_length is not None and self.context_length < 1:
            raise QwenrtError(f"context length must be 1 or more, not {self.context_length}")
        if self.parallel < 1:
            raise QwenrtError(f"parallel requests must be 1 or more, not {self.parallel}")


@dataclass(frozen=True)
class GenerationConfig:
    max_tokens: int = 512
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Penalties, with one meaning on every engine (qwenrt.runtimes.penalties): repetition over
    # the prompt's and the answer's tokens, presence and frequency over the answer's.
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A GBNF grammar the answer must follow, enforced while decoding (qwenrt.runtimes.grammar
    # makes them from JSON schemas and tools).
    grammar: str | None = None
    # A lazy grammar: the answer is free until it writes this text, and follows ``grammar`` from
    # there (whose root must be this text and one rule, as tool_call_grammar writes them).
    grammar_trigger: str | None = None
    # Each token's log-probability, and this many of the most likely tokens' (None: none).
    logprobs: int | None = None

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise QwenrtError(f"max tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0:
            raise QwenrtError(f"temperature must be 0 or more, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise QwenrtError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise QwenrtError(f"top-k must be 0 (off) or more, not {self.top_k}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise QwenrtError(
                f"repetition penalty must be above 0 and at most {MAX_REPETITION_PENALTY:g}, "
                f"not {self.repetition_penalty}"
            )
        if self.grammar_trigger is not None and self.grammar is None:
            raise QwenrtError("a grammar trigger needs a grammar")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise QwenrtError(f"log-probability alternatives must be 0 to {MAX_TOP_LOGPROBS}, not {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_ADDITIVE_PENALTY <= getattr(self, name) <= MAX_ADDITIVE_PENALTY:
                raise QwenrtError(
                    f"{name.replace('_', ' ')} must be between {-MAX_ADDITIVE_PENALTY:g} and {MAX_ADDITIVE_PENALTY:g}, "
                    f"not {getattr(self, name)}"
                )


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability under the model, and the most likely tokens' at that
    step (most likely first): the model's own distribution, before penalties, temperature or a
    grammar."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def step_logprobs(logits: np.ndarray, alternatives: int) -> tuple[np.ndarray, tuple[tuple[int, float], ...]]:
    """One step's raw logits as log-probabilities, and its ``alternatives`` most likely tokens
    with theirs (most likely first): the one definition every engine's TokenLogprobs follow.

    The normaliser is summed in float64, so that it is exact to the logits' own float32 precision
    however large the vocabulary; the log-probabilities are kept in float32, like the logits."""
    import numpy as np

    highest = float(logits.max())
    logprobs = logits - np.float32(highest + np.log(np.exp(logits - highest, dtype=np.float64).sum()))
    top: tuple[tuple[int, float], ...] = ()
    if alternatives:
        best = np.argpartition(-logprobs, alternatives)[:alternatives]
        best = best[np.argsort(-logprobs[best], kind="stable")]
        top = tuple((int(i), float(logprobs[i])) for i in best)
    return logprobs, top


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: its id, the text it completes (maybe empty) and when it came."""

    token_id: int
    text: str
    time: float  # time.perf_counter() when the engine produced it
    logprobs: TokenLogprobs | None = None  # when GenerationConfig.logprobs asked for them


@dataclass(frozen=True)
class StreamEnd:
    reason: StopReason
    prompt_tokens: int
    generated_tokens: int
    started: float  # time.perf_counter() when the request was handed to the engine
    finished: float
    first_token: float | None = None
    text: str = field(default="", repr=False)  # the whole answer, as streamed

    @property
    def first_token_latency(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens after the first over the time after the first: the engine's decode speed."""
        if self.first_token is None or self.generated_tokens < 2 or self.finished <= self.first_token:
            return None
        return (self.generated_tokens - 1) / (self.finished - self.first_token)


Event = TokenEvent | StreamEnd


class Engine(ABC):
    """One inference engine behind qwenrt's interface; use as a context manager.

    ``stream`` may be called from several threads at once up to ``concurrency``
    streams; an engine that cannot batch keeps ``concurrency`` at 1 and its caller
    (the server) queues the rest.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    # Other names the command line accepts for it.
    aliases: ClassVar[tuple[str, ...]] = ()
    # The model folder's artifact it reads: its manifest key (None: not one that convert
    # writes) and its format, as a report names it.
    artifact_key: ClassVar[str | None] = None
    artifact_format: ClassVar[str] = ""
    # It shares forward passes among concurrent requests (serve --parallel); the others
    # answer one at a time.
    batches: ClassVar[bool] = False
    # The packages whose versions make up this engine's build (probe cache, profiles, reports).
    packages: ClassVar[tuple[str, ...]] = ()
    # The settings qwenrt may choose per host, with their candidates and rules.
    knobs: ClassVar[tuple[Knob, ...]] = ()
    # Values of several knobs that are faster only together, which tune tries as a whole.
    combinations: ClassVar[tuple[Combination, ...]] = ()
    # Settings that avoid crashes seen on some CPUs, tried in order when the probe crashes.
    safe_fallbacks: ClassVar[tuple[SafeFallback, ...]] = ()
    # What a generation may ask beyond temperature, top-p, top-k, a seed and stop strings:
    # penalties (GenerationConfig.penalised), an answer held to a grammar while decoding, and
    # log-probabilities with up to this many alternatives a token (None: none at all).
    applies_penalties: ClassVar[bool] = False
    follows_grammar: ClassVar[bool] = False
    top_logprobs: ClassVar[int | None] = None
    concurrency: int = 1

    def __init__(
        self, model_dir: Path, options: EngineOptions = EngineOptions(), settings: ResolvedSettings | None = None
    ) -> None:
        self.model_dir = Path(model_dir)
        self.options = options
        self.resolved = settings if settings is not None else self.resolve_settings(self.model_dir, options)[0]
        self.threads = ThreadPlan.resolve(self.resolved.get("threads"), pin=options.pin)
        self._process_change = None if options.engine_defaults else self.threads.apply_to_process()
        self.context_length = options.context_length or self.default_context_length(self.model_dir)

    @staticmethod
    def default_context_length(model_dir: Path) -> int:
        trained = trained_context_length(model_dir)
        return min(DEFAULT_CONTEXT, trained or DEFAULT_CONTEXT)

    @classmethod
    def resolve_settings(
        cls, model_dir: Path, options: EngineOptions, digest: str | None = None
    ) -> tuple[ResolvedSettings, RunKey]:
        """Each setting's value and origin for this artifact on this host (see qwenrt.runtimes.settings).

        ``digest`` names the artifact where its manifest is not beside it yet (conversion's staging)."""
        from qwenrt.host import this_host
        from qwenrt.runtimes.fingerprint import run_key
        from qwenrt.runtimes.profiles import load_profile, measured_settings

        key = run_key(cls.name, cls.packages, cls.artifact_path(model_dir), digest)
        profile = load_profile(key) if options.use_profile and not options.engine_defaults else None
        # A profile saved before tune left out what its objective does not weigh may still hold it.
        pinned = measured_settings(profile["settings"], profile.get("objective"), cls.knobs) if profile else None
        settings = resolve(cls.knobs, this_host(), threads=options.threads, given=options.settings, profile=pinned,
                           engine_defaults=options.engine_defaults)  # fmt: skip
        return settings, key

    @staticmethod
    def model_not_found(model_dir: Path, artifact: str) -> ModelNotFoundError:
        """The error for a model folder without this engine's artifact, with the way out."""
        return ModelNotFoundError(
            f"{model_dir}: no {artifact}; make one with 'qwenrt convert demo' or 'qwenrt convert CHECKPOINT'"
        )

    @classmethod
    def manifest_artifact(cls, model_dir: Path, key: str, what: str) -> Path:
        """The first file the model folder's manifest lists under ``key``, or the way to make one."""
        files = artifact_files(model_dir, key)
        if not files:
            raise cls.model_not_found(model_dir, what)
        return files[0]

    # --- what each engine provides -------------------------------------------------
    @classmethod
    @abstractmethod
    def artifact_path(cls, model_dir: Path) -> Path:
        """The engine's artifact inside a qwenrt model folder (raise ModelNotFoundError if absent)."""

    @property
    @abstractmethod
    def chat_template(self) -> str: ...

    @property
    @abstractmethod
    def eos_token_ids(self) -> frozenset[int]: ...

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens such as <|im_start|> recognised, no BOS added."""

    @abstractmethod
    def tokenize_text(self, text: str) -> list[int]:
        """Token ids of ``text`` read as plain text: the spelling of a control token
        ("<|im_end|>") stays characters, as in the text the model was trained on."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for in generated text (empty for control tokens)."""

    def token_spelling(self, token_id: int) -> bytes:
        """A token as a prompt writes it: a control token's spelling ("<|im_end|>"), any other
        token's bytes. Tokenising the spellings of ids gives the ids back."""
        return self.token_bytes(token_id)

    @property
    @abstractmethod
    def vocabulary_size(self) -> int:
        """How many token ids the model has: ids run from 0 to this less one."""

    @abstractmethod
    def _generate(self, prompt_ids: list[int], config: GenerationConfig) -> Iterator[tuple[Any, ...]]:
        """Yield (token id, perf_counter time) for each generated token until the engine stops
        (and its TokenLogprobs third, where the config asks for them).

        The engine stops by itself at max tokens and (unless ``ignore_eos``) after an EOS
        token; closing the generator must cancel the generation.
        """

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The settings the engine runs with, as applied (for reports)."""

    def window_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """The next-token logits at every position of ``token_ids``, read as a sequence of its own
        (nothing cached before it): float32, shape (len(token_ids), vocabulary). The engine's own
        arithmetic on its own artifact, for evaluation; open the engine with
        ``EngineOptions(all_logits=True)``."""
        raise QwenrtError(f"the {self.name} engine gives no logits")

    def _check_window(self, token_ids: Sequence[int]) -> None:
        if not self.options.all_logits:
            raise QwenrtError(f"the {self.name} engine keeps every position's logits only when opened with all_logits")
        if not 0 < len(token_ids) <= self.context_length:
            raise QwenrtError(f"a window of {len(token_ids)} tokens does not fit the context of {self.context_length}")

    @classmethod
    def decode_bytes_per_token(cls, artifact: Path) -> int | None:
        """The weight bytes one decoded token reads from ``artifact``: decode's memory-bandwidth
        ceiling is the machine's bandwidth over this (qwenrt.compare.ceiling). None: not counted."""
        return None

    @classmethod
    def counts_decode_bytes(cls) -> bool:
        return cls.decode_bytes_per_token.__func__ is not Engine.decode_bytes_per_token.__func__  # type: ignore[attr-defined]

    def warm_up(self) -> None:  # noqa: B027 - most engines answer their first request at full speed
        """Run what makes the first answer slow (OpenVINO compiles and copies its weights then),
        so that no user's answer pays for it; engines call it while they open."""

    def close(self) -> None:
        """Release the engine's memory, and give back what it set for the process (the thread
        variables, the pinning). Engines free their own resources, then call this."""
        change, self._process_change = getattr(self, "_process_change", None), None
        if change is not None:
            change.undo()

    # --- shared behaviour -----------------------------------------------------------
    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def render_chat(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None) -> str:
        return render_chat(self.chat_template, messages, tools=tools)

    def chat_prompt_ids(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """The conversation's prompt ids (``tools``: OpenAI's tool objects, shown as the template shows
        them). The template's own markers are control tokens; what the messages say is text, always:
        a user who writes "<|im_end|><|im_start|>assistant" gets those characters read, not a turn
        of their own making."""
        if not any(self.spells_control_tokens(m["content"]) for m in messages):
            return self.tokenize(self.render_chat(messages, tools))
        return self._ids_with_contents_as_text(messages, tools)

    def spells_control_tokens(self, text: str) -> bool:
        """Whether ``text`` holds the spelling of a control token (which tokenize would take as one)."""
        return bool(text) and self.tokenize(text) != self.tokenize_text(text)

    def _ids_with_contents_as_text(
        self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None
    ) -> list[int]:
        # Each content is rendered as a placeholder first, so that the template's text and the
        # contents are tokenised apart: the template's with its control tokens, the contents as text.
        # An empty content stays empty (templates treat it apart: an assistant turn of calls only).
        placeholders = [f"\ue000qwenrt-content-{i}\ue001" if m["content"] else "" for i, m in enumerate(messages)]
        rendered = self.render_chat([{**m, "content": p} for m, p in zip(messages, placeholders, strict=True)], tools)
        ids: list[int] = []
        position = 0
        for message, placeholder in zip(messages, placeholders, strict=True):
            if not placeholder:
                continue
            at = rendered.find(placeholder, position)
            if at < 0 or rendered.count(placeholder) != 1:
                raise QwenrtError(
                    "a message contains the spelling of the model's control tokens, and this chat template does not "
                    "show each message's text once, where it could be kept as text; remove those markers"
                )
            ids += self._tokenize_part(rendered[position:at]) + self.tokenize_text(message["content"])
            position = at + len(placeholder)
        return ids + self._tokenize_part(rendered[position:])

    def _tokenize_part(self, text: str) -> list[int]:
        return self.tokenize(text) if text else []

    def stream_chat(
        self,
        messages: Sequence[Message],
        config: GenerationConfig,
        cancel: threading.Event | None = None,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Iterator[Event]:
        return self.stream(self.chat_prompt_ids(messages, tools), config, cancel)

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens == 0:
            raise QwenrtError("the prompt is empty")
        window = self.context_length
        if prompt_tokens + max_tokens > window:
            raise QwenrtError(
                f"prompt of {prompt_tokens} tokens plus {max_tokens} new tokens exceeds the context window "
                f"of {window}; shorten the prompt, lower --max-tokens or raise the context length"
            )

    @classmethod
    def cannot_do(cls, config: GenerationConfig) -> tuple[str, str] | None:
        """The setting of ``config`` this engine cannot run as asked, and why (None: it can run it
        all). Checked before any work, so that a request is refused rather than answered without
        what it asked for."""
        if config.penalised and not cls.applies_penalties:
            return "penalties", f"the {cls.name} engine applies no repetition, presence or frequency penalties"
        if config.grammar is not None and not cls.follows_grammar:
            return "grammar", f"the {cls.name} engine cannot hold an answer to a grammar"
        if config.logprobs is not None and (cls.top_logprobs is None or config.logprobs > cls.top_logprobs):
            if cls.top_logprobs is None:
                return "logprobs", f"the {cls.name} engine gives no log-probabilities"
            return "top_logprobs", f"the {cls.name} engine gives at most {cls.top_logprobs} alternatives a token"
        return None

    def stream(
        self, prompt_ids: list[int], config: GenerationConfig, cancel: threading.Event | None = None
    ) -> Iterator[Event]:
        """Stream one generation as TokenEvents, then one StreamEnd."""
        if (refusal := self.cannot_do(config)) is not None:
            raise QwenrtError(refusal[1])
        self.check_fits(len(prompt_ids), config.max_tokens)
        return self._stream(prompt_ids, config, cancel)

    def _stream(
        self, prompt_ids: list[int], config: GenerationConfig, cancel: threading.Event | None
    ) -> Iterator[Event]:
        text = _TextAssembler(config.stop)
        eos = self.eos_token_ids
        reason: StopReason = "length"
        count = 0
        first: float | None = None
        started = time.perf_counter()
        tokens = self._generate(prompt_ids, config)
        try:
            # An engine yields (id, time), or (id, time, TokenLogprobs) when they were asked for.
            for token_id, produced, *logprobs in tokens:
                count += 1
                first = first if first is not None else produced
                is_eos = token_id in eos
                piece = "" if is_eos else text.feed(self.token_bytes(token_id))
                yield TokenEvent(token_id, piece, produced, logprobs[0] if logprobs else None)
                if text.stopped:
                    reason = "stop"
                    break
                if is_eos and not config.ignore_eos:
                    reason = "eos"
                    break
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                if count >= config.max_tokens:
                    break
        finally:
            tokens.close()
        tail = text.finish()
        if tail:
            yield _tail_event(tail)
        yield StreamEnd(reason, len(prompt_ids), count, started, time.perf_counter(), first, text.emitted)


def _tail_event(tail: str) -> TokenEvent:
    # Text held back for a possible stop string, released when the stream ends: it
    # belongs to no new token, so it carries the id -1.
    return TokenEvent(-1, tail, time.perf_counter())


class TokenRelay:
    """Tokens made on an engine's own thread, consumed as a generator on the caller's.

    Engines whose generate call blocks and calls back once per token (OpenVINO GenAI,
    transformers) run it on a worker thread: the relay carries (token id, time) pairs
    across, re-raises the worker's exception in the caller, and raises ``cancelled``
    once the caller stops reading, for the engine's callback to end the generation.
    """

    _DONE = object()

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cancelled = threading.Event()

    def put(self, token_ids: Iterable[int]) -> None:
        now = time.perf_counter()
        for token_id in token_ids:
            self._items.put((int(token_id), now))

    def run(self, generate: Callable[[], object], name: str) -> Iterator[tuple[int, float]]:
        def work() -> None:
            try:
                generate()
            except BaseException as exc:  # handed to the caller's thread
                self._items.put(exc)
            self._items.put(self._DONE)

        worker = threading.Thread(target=work, name=name, daemon=True)
        worker.start()
        try:
            while (item := self._items.get()) is not self._DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancelled.set()
            worker.join()


class _TextAssembler:
    """Bytes in, valid text out: whole UTF-8 characters only, stop strings cut off."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.emitted = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(data))

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(b"", final=True), final=True)

    def _release(self, pending: str, final: bool = False) -> str:
        self._held = ""
        if self._stop:
            cut = min((i for i in (pending.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                pending = pending[:cut]
            elif not final:
                keep = _longest_stop_prefix_suffix(pending, self._stop)
                if keep:
                    pending, self._held = pending[:-keep], pending[-keep:]
        self.emitted += pending
        return pending


def _longest_stop_prefix_suffix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-length:]):
                best = length
                break
    return best
