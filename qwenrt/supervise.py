"""``chat`` and ``serve`` run their engine in a child process, so that a native crash still ends in a message.

The probe (:mod:`qwenrt.runtimes.probe`) keeps an engine from running settings that crash
on this host; this covers what it cannot foresee, a crash later, on some input. The
``qwenrt`` process the user started only waits: it passes on the signals meant for the
command (SIGTERM from a service manager, SIGHUP, a SIGINT sent to it alone; a Ctrl-C at
the terminal already reaches the child), and when the child dies by a crash signal it
says so in one line, names the engine, and makes the next start probe that engine's
settings on this host again. The child tells it which engine it opened through a small
note file (``QWENRT_ENGINE_NOTE``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SUPERVISED = "QWENRT_SUPERVISED"
ENGINE_NOTE = "QWENRT_ENGINE_NOTE"
SUPERVISED_COMMANDS = ("chat", "serve")
# The kernel's code for a signal it sent itself, as the terminal driver does for Ctrl-C to the
# whole foreground process group (the child has it already); kill() from a process is SI_USER.
SI_KERNEL = 0x80
PASSED_ON = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
CRASHES = {signal.SIGSEGV: "segmentation fault", signal.SIGILL: "illegal instruction", signal.SIGBUS: "bus error",
           signal.SIGFPE: "arithmetic fault", signal.SIGABRT: "aborted"}  # fmt: skip


def wants_supervision(args: list[str]) -> bool:
    """A command that runs an engine in this process, not already in a supervised child."""
    if os.environ.get(SUPERVISED) == "1" or any(arg in ("-h", "--help") for arg in args):
        return False
    command = next((arg for arg in args if not arg.startswith("-")), None)
    return command in SUPERVISED_COMMANDS


def run_supervised(args: list[str]) -> int:
    """Run ``qwenrt ARGS`` in a child; its exit status, or 1 with a message after a crash."""
    fd, note = tempfile.mkstemp(prefix="qwenrt-engine-", suffix=".json")
    os.close(fd)
    try:
        env = {**os.environ, SUPERVISED: "1", ENGINE_NOTE: note}
        child = subprocess.Popen([sys.executable, "-m", "qwenrt.cli", *args], env=env)
        watched = {*PASSED_ON, signal.SIGCHLD}
        signal.pthread_sigmask(signal.SIG_BLOCK, watched)
        try:
            while child.poll() is None:
                info = signal.sigtimedwait(watched, 0.5)
                if info is None or info.si_signo == signal.SIGCHLD:
                    continue
                if info.si_code == SI_KERNEL and info.si_signo in (signal.SIGINT, signal.SIGQUIT):
                    continue  # typed at the terminal: the child, in the same process group, has it
                child.send_signal(info.si_signo)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
        code = child.returncode
        if code >= 0:
            return code
        crash = signal.Signals(-code)
        if crash == signal.SIGKILL:
            print("qwenrt: error: killed (SIGKILL): out of memory, or by another process", file=sys.stderr)
        if crash not in CRASHES:
            return 128 - code
        print(f"qwenrt: error: {_crash_message(crash, _read_note(note))}", file=sys.stderr)
        return 1
    finally:
        Path(note).unlink(missing_ok=True)


def _read_note(path: str) -> dict[str, Any]:
    try:
        note = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return note if isinstance(note, dict) else {}


def _crash_message(crash: signal.Signals, note: dict[str, Any]) -> str:
    what = f"{crash.name}, {CRASHES[crash]}"
    if not note:
        return f"qwenrt crashed ({what}) before an engine was open; run again with --debug, and report it"
    from qwenrt.runtimes.probe import forget_outcome

    forget_outcome(Path(note["record"]), note["signature"])
    return (f"{note['description']} crashed ({what}) while running; the next start checks it on this CPU again "
            f"in a separate process; {note['advice']}")  # fmt: skip


def die_with_parent() -> None:
    """In a supervised child: end (SIGTERM) if the supervising process is killed outright, rather than run on."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def note_engine(description: str, record: Path, signature: str, advice: str) -> None:
    """In a supervised child: say which engine is open, for the message if it crashes."""
    path = os.environ.get(ENGINE_NOTE)
    if not path:
        return
    note = {"description": description, "record": str(record), "signature": signature, "advice": advice}
    with contextlib.suppress(OSError):  # the note only makes a crash's message more precise
        Path(path).write_text(json.dumps(note), encoding="utf-8")
