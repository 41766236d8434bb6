"""Run a piece of engine work in a child process, so that nothing it does can take this one down.

Engines are native code: a bad kernel on one CPU (an illegal instruction), a malformed
input or a bug ends the process by a signal, which Python cannot catch. qwenrt runs
whatever may meet such a crash for the first time (the probe of a new artifact on a new
host, conversion's check of new artifacts, every compare cell and tune trial) in a child
started with :func:`run_child`. The child is a module with a ``main`` that reads a JSON
request on stdin and answers with JSON lines on stdout: ``{"progress": "..."}`` while it
works, then ``{"result": ...}`` or ``{"error": "..."}`` (see :func:`child_main`).
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qwenrt.errors import QwenrtError

STDERR_TAIL_LINES = 20
EXIT_GRACE_S = 30.0
CRASH_SIGNALS = {"SIGSEGV", "SIGABRT", "SIGBUS", "SIGILL", "SIGFPE"}


@dataclass(frozen=True)
class ChildOutcome:
    """How a child ended: a result, an error it reported, or a death (signal, exit, timeout)."""

    result: Any = None
    error: str | None = None  # the child's own report of a failure (an exception it caught)
    crash: str | None = None  # why the child died without reporting, in words
    signal: str | None = None  # the signal that ended it, if one did ("SIGILL")

    @property
    def ok(self) -> bool:
        return self.error is None and self.crash is None

    @property
    def crashed(self) -> bool:
        """It died by a crash signal (not a kill, a timeout or an exit of its own)."""
        return self.signal in CRASH_SIGNALS

    def reason(self) -> str:
        return self.error or self.crash or ""


def run_child(
    module: str,
    request: dict[str, Any],
    *,
    timeout_s: float,
    progress: Callable[[str], None] = lambda _: None,
    env: dict[str, str] | None = None,
) -> ChildOutcome:
    """Run ``python -m module`` with ``request``; whatever happens to it comes back as an outcome.

    Ctrl-C stops the child and is raised again here.
    """
    started = time.monotonic()
    child = subprocess.Popen(
        [sys.executable, "-m", module],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", env=env,
    )  # fmt: skip
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    # Both pipes are drained as the child writes: an engine that logs a lot to stderr would
    # otherwise fill the pipe and stall, and the child would time out for no fault of its own.
    stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)

    def pump_stdout() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line)
        lines.put(None)

    def pump_stderr() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            if line.strip():
                stderr_tail.append(line.strip())

    readers = [threading.Thread(target=pump, daemon=True) for pump in (pump_stdout, pump_stderr)]
    for reader in readers:
        reader.start()
    outcome: dict[str, Any] = {}
    try:
        try:
            assert child.stdin is not None
            child.stdin.write(json.dumps(request))
            child.stdin.close()
        except BrokenPipeError:
            pass  # the child died at once; its exit status says why
        while True:
            remaining = timeout_s - (time.monotonic() - started)
            if remaining <= 0:
                _stop(child)
                return ChildOutcome(crash=f"timed out after {timeout_s:g} s; stopped")
            try:
                line = lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                break
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # an engine printed to stdout; not ours
            if not isinstance(message, dict):
                continue
            if "progress" in message:
                progress(str(message["progress"]))
            else:
                outcome = message
        try:
            child.wait(timeout=max(1.0, min(EXIT_GRACE_S, timeout_s - (time.monotonic() - started))))
        except subprocess.TimeoutExpired:
            _stop(child)  # it said all it had to say, then hung on its way out
    except KeyboardInterrupt:
        _stop(child)
        raise
    for reader in readers:
        reader.join(timeout=5)
    if "result" in outcome:
        return ChildOutcome(result=outcome["result"])
    if "error" in outcome:
        return ChildOutcome(error=str(outcome["error"]))
    name = signal_name(child.returncode)
    return ChildOutcome(crash=exit_reason(child.returncode, list(stderr_tail)), signal=name)


def _stop(child: subprocess.Popen[str]) -> None:
    child.kill()
    child.wait()


def signal_name(returncode: int) -> str | None:
    """The name of the signal that ended a child ("SIGILL"), or None when it exited."""
    if returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def exit_reason(returncode: int, stderr_tail: list[str]) -> str:
    """Why a child ended without a result, in words: a signal is a crash (or a kill), not a code."""
    last = f"; its last words: {stderr_tail[-1][:300]}" if stderr_tail else ""
    name = signal_name(returncode)
    if name is None:
        return f"worker exited with code {returncode} and no result{last}"
    if name == "SIGKILL":
        cause = "was killed (out of memory, or by another process)"
    elif name in CRASH_SIGNALS:
        cause = "crashed inside the engine"
    else:
        cause = "was stopped"
    return f"worker {cause}: {name}{last}"


def child_main(work: Callable[[dict[str, Any], Callable[[str], None]], Any]) -> None:
    """The child's side: read the request, run ``work(request, progress)``, answer in JSON lines."""
    # Ctrl-C at the terminal reaches the whole process group; the parent decides what it
    # means (it stops this child and reports what was finished).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    request = json.loads(sys.stdin.read())
    try:
        result = work(request, lambda text: _emit({"progress": text}))
    except QwenrtError as exc:
        _emit({"error": str(exc)})
        sys.exit(2)
    except Exception as exc:  # reported as the work's failure; the parent goes on
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    _emit({"result": result})


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()
