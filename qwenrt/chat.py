"""A streaming, multi-turn chat over any engine: the session and its terminal loop."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from qwenrt.errors import QwenrtError
from qwenrt.runtimes import Engine, Event, GenerationConfig, StreamEnd, TokenEvent
from qwenrt.runtimes.chat_template import Message

RESET_COMMAND = "/reset"
EXIT_COMMANDS = ("/exit", "/quit")


@dataclass
class ChatSession:
    """The conversation so far; each answer, whole or stopped, joins it."""

    engine: Engine
    config: GenerationConfig
    system: str | None = None
    messages: list[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def ask(self, text: str, cancel: threading.Event | None = None) -> Iterator[Event]:
        """Stream the answer to ``text``; the answer is remembered even if the caller stops early."""
        self.messages.append({"role": "user", "content": text})
        answer: list[str] = []
        try:
            stream = self.engine.stream_chat(self.messages, self.config, cancel)
        except BaseException:
            # A refused question (too long for the context) must not stay in the conversation,
            # or every later turn would be refused for it too.
            self.messages.pop()
            raise
        try:
            for event in stream:
                if isinstance(event, TokenEvent):
                    answer.append(event.text)
                yield event
        finally:
            stream.close()
            self.messages.append({"role": "assistant", "content": "".join(answer)})


def format_stats(end: StreamEnd) -> str:
    parts = []
    if end.first_token_latency is not None:
        parts.append(f"first token {end.first_token_latency * 1000:.0f} ms")
    if (speed := end.decode_tokens_per_second) is not None:
        parts.append(f"{speed:.1f} tok/s")
    parts.append(f"{end.prompt_tokens} prompt + {end.generated_tokens} new tokens")
    parts.append(f"ended by {end.reason}")
    return "[" + " · ".join(parts) + "]"


def print_answer(session: ChatSession, text: str, out: TextIO, stats: bool) -> StreamEnd | None:
    """Stream one answer to ``out``; Ctrl-C stops the answer, not the session."""
    end: StreamEnd | None = None
    cancel = threading.Event()
    events = session.ask(text, cancel)
    try:
        with _ctrl_c_cancels(cancel):
            for event in events:
                if isinstance(event, TokenEvent):
                    out.write(event.text)
                    out.flush()
                else:
                    end = event
    except KeyboardInterrupt:
        events.close()
    if end is None or end.reason == "cancelled":
        out.write("\n[answer stopped]")
    out.write("\n")
    if stats and end is not None:
        out.write(format_stats(end) + "\n")
    out.flush()
    return end


@contextmanager
def _ctrl_c_cancels(cancel: threading.Event) -> Iterator[None]:
    """Turn the first Ctrl-C into a cancel request that the engine honours after its current
    token, so the answer ends through the engine's own stop path (with its statistics) instead
    of an exception thrown into the middle of engine code. A second Ctrl-C, say during a long
    prompt that yields no token to stop at, interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return

    def on_sigint(signum: int, frame: object) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interactive(session: ChatSession, out: TextIO = sys.stdout, stats: bool = False,
                read: Callable[[str], str] = input) -> None:  # fmt: skip
    out.write(f"qwenrt chat on {session.engine.description}. {RESET_COMMAND} starts over, "
              f"{EXIT_COMMANDS[0]} or Ctrl-D leaves, Ctrl-C stops an answer.\n")  # fmt: skip
    out.flush()
    while True:
        try:
            line = read(">>> ")
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return
        if text == RESET_COMMAND:
            session.reset()
            out.write("[conversation reset]\n")
            continue
        try:
            print_answer(session, text, out, stats)
        except QwenrtError as exc:
            # The session survives a refused question: the user can ask a shorter one or start over.
            out.write(f"qwenrt: error: {exc} ({RESET_COMMAND} starts over)\n")
            out.flush()
