"""One candidate configuration of ``qwenrt tune``: an engine opened once in a process of its
own, then measured on request, so that candidates can take turns (interleaved rounds)
without paying for a load at every turn.

The parent talks to it in JSON lines: the configuration on the first line of stdin, then
``"measure"`` lines; the child answers ``{"ready": ...}`` once loaded and warmed up, then
one ``{"result": ...}`` per measurement, the median of ``repeat`` generations (or
``{"error": ...}``). A native crash ends the
child; the parent sees it as a signal, and tune counts the configuration as crashing.
"""

from __future__ import annotations

import json
import queue
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwenrt.child import STDERR_TAIL_LINES, exit_reason, signal_name

WARMUP_TOKENS = 16


@dataclass(frozen=True)
class TrialSpec:
    engine: str
    model_dir: str
    config: dict[str, Any]  # knob values and "threads"; {"engine_defaults": True} for the engine as it comes
    scenario: str
    max_tokens: int
    repeat: int = 1  # generations a measurement takes the median of

    def request(self) -> dict[str, Any]:
        return {"engine": self.engine, "model_dir": self.model_dir, "config": self.config, "scenario": self.scenario,
                "max_tokens": self.max_tokens, "repeat": self.repeat}  # fmt: skip


class TrialFailed(Exception):
    def __init__(self, reason: str, signal_name: str | None = None) -> None:
        super().__init__(reason)
        self.signal = signal_name


class TrialWorker:
    """The parent's handle on one candidate's process."""

    def __init__(self, spec: TrialSpec) -> None:
        self.spec = spec
        self.settings: dict[str, Any] = {}
        self._child = subprocess.Popen(
            [sys.executable, "-m", "qwenrt.tune.trial"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
        )  # fmt: skip
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._stderr: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        self._send(spec.request())

    def _pump_stdout(self) -> None:
        assert self._child.stdout is not None
        for line in self._child.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self._child.stderr is not None
        for line in self._child.stderr:
            if line.strip():
                self._stderr.append(line.strip())

    def _send(self, message: Any) -> None:
        try:
            assert self._child.stdin is not None
            self._child.stdin.write(json.dumps(message) + "\n")
            self._child.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it has died; the next read says how

    def _read(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise TrialFailed(f"no answer within {timeout_s:g} s; stopped")
            try:
                line = self._lines.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if line is None:
                code = self._child.wait()
                raise TrialFailed(exit_reason(code, list(self._stderr)), signal_name(code))
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # an engine printed to stdout; not ours
            if isinstance(message, dict):
                if "error" in message:
                    raise TrialFailed(str(message["error"]))
                return message

    def wait_ready(self, timeout_s: float) -> None:
        self.settings = self._read(timeout_s)["ready"]

    def measure(self, timeout_s: float) -> dict[str, Any]:
        self._send("measure")
        return self._read(timeout_s)["result"]

    def close(self) -> None:
        if self._child.poll() is None:
            self._send("exit")
            try:
                self._child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._child.kill()
                self._child.wait()


MEASURED = ("first_token_s", "prefill_tps", "decode_tps", "end_to_end_s")


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main() -> None:
    from qwenrt.compare.measure import measure_repetition
    from qwenrt.compare.scenarios import scenario
    from qwenrt.errors import QwenrtError
    from qwenrt.runtimes import EngineOptions, GenerationConfig, open_engine
    from qwenrt.runtimes.probe import crash_if_asked

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    request = json.loads(sys.stdin.readline())
    config = dict(request["config"])
    engine_defaults = bool(config.pop("engine_defaults", False))
    threads = config.pop("threads", None)
    options = EngineOptions(threads=threads, settings=config, engine_defaults=engine_defaults, prefix_cache=False,
                            use_profile=False)  # fmt: skip
    try:
        # Probing would start a process of its own: this one is already the safe place to crash.
        engine = open_engine(request["engine"], Path(request["model_dir"]), options, probe=False)
    except QwenrtError as exc:
        _emit({"error": str(exc)})
        return
    with engine:
        crash_if_asked(engine)
        prompt_ids = engine.chat_prompt_ids(scenario(request["scenario"]).messages)
        engine.check_fits(len(prompt_ids), request["max_tokens"])
        for _ in engine.stream(prompt_ids, GenerationConfig(max_tokens=WARMUP_TOKENS, ignore_eos=True)):
            pass
        _emit({"ready": {"resolved": engine.resolved.describe(), "applied": engine.settings()}})
        measured = GenerationConfig(max_tokens=request["max_tokens"], ignore_eos=True)
        for line in sys.stdin:
            if json.loads(line) != "measure":
                break
            repetitions = [measure_repetition(engine, prompt_ids, None, measured)
                           for _ in range(request.get("repeat", 1))]  # fmt: skip
            _emit({"result": {**{name: _median([getattr(r, name) for r in repetitions]) for name in MEASURED},
                              "prompt_tokens": len(prompt_ids), "generations": len(repetitions)}})  # fmt: skip


if __name__ == "__main__":
    main()
