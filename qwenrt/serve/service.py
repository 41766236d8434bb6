"""One engine shared by many requests: admission, queueing, and the bridge from the
engine's threads to the server's event loop.

An engine streams on a thread of its own (its native calls block); each token crosses
to the event loop through a queue. ``engine.concurrency`` generations run at once:
OpenVINO's continuous batching steps them together, llama.cpp takes them one after
the other in arrival order. A request that leaves (its client went away, the server
is stopping) cancels its generation, or its place in the queue, at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from qwenrt.runtimes.base import Engine, Event, GenerationConfig, StreamEnd
from qwenrt.runtimes.chat_template import Message

if TYPE_CHECKING:
    from qwenrt.serve.metrics import ServerMetrics


class ServerBusy(Exception):
    """The queue is full: the client should retry later."""


@dataclass
class ServiceCounters:
    active: int = 0  # generations running in the engine
    queued: int = 0  # requests waiting for a place
    completed: int = 0
    cancelled: int = 0  # left before the end, or while queued: client gone, or server stopping
    failed: int = 0
    generated_tokens: int = 0  # by every generation, finished or stopped
    peak_active: int = 0  # the most generations that ran at once: above 1 only when the engine batches
    peak_queued: int = 0


class EngineService:
    def __init__(self, engine: Engine, max_queue: int) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.counters = ServiceCounters()
        self.metrics: ServerMetrics | None = None  # set by the app that serves /metrics
        self._places = asyncio.Semaphore(engine.concurrency)
        # One thread per place, plus one for tokenizing while every place is busy.
        self._threads = ThreadPoolExecutor(max_workers=engine.concurrency + 1, thread_name_prefix="qwenrt-engine")
        self._tokenizer_lock = threading.Lock()
        self._running: set[asyncio.Future[None]] = set()
        self._cancels: set[threading.Event] = set()

    async def prompt_ids(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """A conversation's prompt, as chat reads it (message text as text), with its tools."""
        return await self._tokenizing(lambda: self.engine.chat_prompt_ids(messages, tools))

    async def tokenize(self, prompt: str) -> list[int]:
        """A raw prompt, as the model reads it: control tokens' spellings are control tokens."""
        return await self._tokenizing(lambda: self.engine.tokenize(prompt))

    async def _tokenizing(self, work: Callable[[], list[int]]) -> list[int]:
        def locked() -> list[int]:
            with self._tokenizer_lock:
                return work()

        return await asyncio.get_running_loop().run_in_executor(self._threads, locked)

    def warm_up(self) -> float:
        """Run one short generation so that the first client does not pay for the engine's
        first-inference setup (hundreds of ms for OpenVINO); returns the seconds it took."""
        started = time.perf_counter()
        prompt = self.engine.chat_prompt_ids([{"role": "user", "content": "Hello"}])
        for _ in self.engine.stream(prompt, GenerationConfig(max_tokens=2)):
            pass
        return time.perf_counter() - started

    def admit(self) -> None:
        """Refuse a request that would wait behind a full queue (ask before ``generate``).

        The check comes before the response starts, so that the client gets a 503 and not a
        broken stream; requests admitted at the same instant may overfill the queue by a few.
        """
        if self._places.locked() and self.counters.queued >= self.max_queue:
            raise ServerBusy(f"the server is busy: {self.counters.queued} requests are already waiting; retry later")

    async def generate(self, prompt_ids: list[int], config: GenerationConfig) -> AsyncGenerator[Event, None]:
        """Wait for a place, then stream the generation's events; closing the iterator
        (or cancelling the task reading it) stops the generation."""
        arrived = time.perf_counter()
        if self._places.locked():  # every place is taken: wait in line
            self.counters.queued += 1
            self.counters.peak_queued = max(self.counters.peak_queued, self.counters.queued)
            try:
                await self._places.acquire()
            except asyncio.CancelledError:  # the client left while waiting
                self._count_outcome("cancelled")
                raise
            finally:
                self.counters.queued -= 1
        else:
            await self._places.acquire()  # free: returns at once
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        cancel = threading.Event()
        self._cancels.add(cancel)

        def hand_over(item: Event | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop has closed: nobody is reading any more
                cancel.set()

        def run() -> None:
            try:
                for event in self.engine.stream(prompt_ids, config, cancel):
                    if isinstance(event, StreamEnd):
                        # Counted here, not by the reader, so that a generation whose reader
                        # left still shows how far it went.
                        loop.call_soon_threadsafe(self._count_tokens, event)
                    hand_over(event)
            except BaseException as exc:  # re-raised on the event loop, in the request
                hand_over(exc)

        self.counters.active += 1
        self.counters.peak_active = max(self.counters.peak_active, self.counters.active)
        worker = loop.run_in_executor(self._threads, run)
        self._running.add(worker)
        # The place frees when the engine has really stopped, not when the reader leaves.
        worker.add_done_callback(self._release)
        finished = False
        last_token: float | None = None
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    self._count_outcome("failed")
                    finished = True
                    raise item
                if isinstance(item, StreamEnd):
                    self._count_outcome("completed")
                    finished = True
                elif self.metrics is not None and item.token_id >= 0:
                    since = arrived if last_token is None else last_token
                    (self.metrics.first_token if last_token is None else self.metrics.inter_token).observe(
                        item.time - since
                    )
                    last_token = item.time
                yield item
                if finished:
                    return
        finally:
            self._cancels.discard(cancel)
            if not finished:
                cancel.set()
                self._count_outcome("cancelled")

    def _count_outcome(self, outcome: str) -> None:
        setattr(self.counters, outcome, getattr(self.counters, outcome) + 1)
        if self.metrics is not None:
            self.metrics.requests.labels(outcome).inc()

    def _count_tokens(self, end: StreamEnd) -> None:
        self.counters.generated_tokens += end.generated_tokens
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(end.prompt_tokens)
            self.metrics.generated_tokens.inc(end.generated_tokens)

    def _release(self, worker: asyncio.Future[None]) -> None:
        self._running.discard(worker)
        self.counters.active -= 1
        self._places.release()

    def health(self) -> dict[str, object]:
        return {"status": "ok", "runtime": self.engine.name, "parallel": self.engine.concurrency,
                **asdict(self.counters)}  # fmt: skip

    def cancel_all(self) -> None:
        """Stop every generation now (the server is going away without waiting for them)."""
        for cancel in list(self._cancels):
            cancel.set()

    async def close(self, timeout: float = 30.0) -> None:
        """Wait for the generations still running (their readers have cancelled them), then free the engine."""
        deadline = time.monotonic() + timeout
        while self._running and time.monotonic() < deadline:
            await asyncio.wait(set(self._running), timeout=max(0.0, deadline - time.monotonic()))
        self._threads.shutdown(wait=not self._running, cancel_futures=True)
        if not self._running:
            self.engine.close()
