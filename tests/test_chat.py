"""The chat: a session that remembers, and `qwenrt chat` in a real terminal, one-shot and on errors.

The tiny model's answers are noise, so "the second turn refers to the first" is
checked by what the model is given: the second prompt holds the first turn, and
after /reset the first question gets the first prompt again.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pexpect
import pytest
from conftest import ENGINES

from qwenrt.chat import ChatSession, format_stats, interactive, print_answer
from qwenrt.errors import QwenrtError
from qwenrt.runtimes import GenerationConfig, StreamEnd, TokenEvent

QWENRT = [sys.executable, "-m", "qwenrt.cli"]
STATS = re.compile(r"\[first token [^\]]*?(\d+) prompt \+ (\d+) new tokens · ended by (\w+)\]")
TOO_LONG = "The quick brown fox jumps over the lazy dog. " * 80


def answer(session: ChatSession, text: str, cancel: threading.Event | None = None) -> StreamEnd:
    return list(session.ask(text, cancel))[-1]


# --- the session -------------------------------------------------------------------


def test_session_remembers_the_conversation(engine) -> None:
    session = ChatSession(engine, GenerationConfig(max_tokens=12, ignore_eos=True), system="Be brief.")
    first = answer(session, "Hello fox")
    second = answer(session, "More")
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert session.messages[2]["content"] == first.text
    assert session.messages[4]["content"] == second.text
    # The second prompt is the first turn plus the new question.
    assert second.prompt_tokens > first.prompt_tokens + 4
    first_prompt = engine.chat_prompt_ids(session.messages[:2])
    assert engine.chat_prompt_ids(session.messages[:4])[: len(first_prompt)] == first_prompt
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    again = answer(session, "Hello fox")
    assert (again.prompt_tokens, again.text) == (first.prompt_tokens, first.text)


def test_refused_question_leaves_no_trace(engine) -> None:
    session = ChatSession(engine, GenerationConfig(max_tokens=8, ignore_eos=True))
    answer(session, "Hello fox")
    before = list(session.messages)
    with pytest.raises(QwenrtError, match="exceeds the context window"):
        answer(session, TOO_LONG)
    assert session.messages == before
    end = answer(session, "More")
    assert end.generated_tokens == 8
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


def test_stopped_answer_joins_the_conversation(engine) -> None:
    session = ChatSession(engine, GenerationConfig(max_tokens=200, ignore_eos=True))
    cancel = threading.Event()
    events = []
    for event in session.ask("The quick brown fox", cancel):
        events.append(event)
        if isinstance(event, TokenEvent) and sum(isinstance(e, TokenEvent) for e in events) == 5:
            cancel.set()
    assert events[-1].reason == "cancelled"
    assert session.messages[-1] == {"role": "assistant", "content": events[-1].text}
    # A caller that simply stops reading leaves its part of the answer too.
    stream = session.ask("More")
    first_event = next(stream)
    stream.close()
    assert session.messages[-1] == {"role": "assistant", "content": first_event.text}


def test_print_answer_streams_and_shows_stats(engine) -> None:
    session = ChatSession(engine, GenerationConfig(max_tokens=10, ignore_eos=True))
    out = io.StringIO()
    end = print_answer(session, "Hello fox", out, stats=True)
    assert out.getvalue() == f"{end.text}\n{format_stats(end)}\n"
    match = STATS.search(format_stats(end))
    assert match and match.groups() == (str(end.prompt_tokens), "10", "length")


class _InterruptingOutput(io.StringIO):
    """A terminal whose user presses Ctrl-C (``presses`` times) once some answer has been written."""

    def __init__(self, after_writes: int, presses: int) -> None:
        super().__init__()
        self.after_writes, self.presses, self.writes = after_writes, presses, 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.writes == self.after_writes:
            for _ in range(self.presses):
                os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_stops_the_answer_and_keeps_the_session(engine, presses: int) -> None:
    session = ChatSession(engine, GenerationConfig(max_tokens=400, ignore_eos=True))
    out = _InterruptingOutput(after_writes=3, presses=presses)
    end = print_answer(session, "The quick brown fox", out, stats=True)
    if presses == 1:
        # One Ctrl-C: the engine stops after its current token, and the statistics say so.
        assert end is not None and end.reason == "cancelled"
        assert end.generated_tokens < 400
        assert out.getvalue().endswith(f"\n[answer stopped]\n{format_stats(end)}\n")
    else:
        # A second one interrupts at once.
        assert end is None
        assert out.getvalue().endswith("\n[answer stopped]\n")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert session.messages[-1]["role"] == "assistant"
    assert print_answer(session, "More", io.StringIO(), stats=False).reason == "length"


def test_interactive_loop_commands(engine) -> None:
    session = ChatSession(engine, GenerationConfig(max_tokens=6, ignore_eos=True))
    lines = iter(["Hello fox", "", "   ", TOO_LONG, "More", "/reset", "Hello fox", "/exit", "never read"])
    out = io.StringIO()
    interactive(session, out, stats=True, read=lambda prompt: next(lines))
    text = out.getvalue()
    stats = [m.groups() for m in STATS.finditer(text)]
    assert len(stats) == 3
    assert int(stats[1][0]) > int(stats[0][0]) + 4  # the second turn carries the first
    assert stats[2] == stats[0]  # after /reset, the first question is asked afresh
    assert "qwenrt: error: prompt of" in text and "/reset starts over" in text
    assert "[conversation reset]" in text
    assert next(lines) == "never read"


def test_interactive_loop_leaves_on_end_of_input(engine) -> None:
    session = ChatSession(engine, GenerationConfig(max_tokens=4))

    def read(prompt: str) -> str:
        raise EOFError

    interactive(session, io.StringIO(), read=read)
    assert session.messages == []


# --- qwenrt chat in a pseudo-terminal ----------------------------------------------


def spawn_chat(runtime: str, model: Path, *options: str) -> pexpect.spawn:
    # One thread: a greedy answer is then the same in every process, and llama.cpp's spinning
    # pool of two slows down badly when other work on this shared machine takes a core.
    args = ["-m", "qwenrt.cli", "chat", "--runtime", runtime, "--model", str(model), "--threads", "1", "--stats"]
    args += options
    return pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120, env={**os.environ, "TERM": "dumb"})


def expect_stats(child: pexpect.spawn) -> tuple[int, int, str]:
    child.expect(STATS)
    prompt, new, reason = child.match.groups()
    return int(prompt), int(new), reason


def finish(child: pexpect.spawn) -> None:
    child.expect(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


@pytest.mark.parametrize("runtime", ENGINES)
def test_terminal_chat_two_turns_reset_and_exit(runtime: str, tiny_model: Path) -> None:
    child = spawn_chat(runtime, tiny_model, "--max-tokens", "16")
    child.expect(r"qwenrt chat on .*>>> ")
    child.sendline("Hello fox")
    first = expect_stats(child)
    child.expect(">>> ")
    child.sendline("More")
    second = expect_stats(child)
    assert second[0] >= first[0] + first[1] // 4 + 4, "the second prompt carries the first turn"
    child.expect(">>> ")
    child.sendline("/reset")
    child.expect(r"\[conversation reset\]")
    child.expect(">>> ")
    child.sendline("Hello fox")
    again = expect_stats(child)
    assert again[0] == first[0], "after /reset the first question is asked afresh"
    if runtime == "gguf":
        # llama.cpp's reuse of the cached prompt is exact; OpenVINO's drifts a little (see test_runtimes).
        assert again == first
    child.expect(">>> ")
    child.sendeof()  # Ctrl-D leaves as /exit does
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


@pytest.mark.parametrize("runtime", ENGINES)
def test_terminal_chat_ctrl_c_stops_the_answer_not_the_session(runtime: str, tiny_model: Path) -> None:
    # An answer that ignores its EOS, and a context far beyond the tiny model's (random weights do
    # not care), keep streaming for seconds, so Ctrl-C surely lands in the middle of it.
    child = spawn_chat(runtime, tiny_model, "--max-tokens", "8000", "--ignore-eos", "--context-length", "32768")
    child.expect(">>> ")
    child.sendline("The quick brown fox")
    child.expect(re.escape("The quick brown fox") + "\r\n")
    child.expect(r"[\s\S]{300}")  # the answer is streaming
    child.sendintr()
    child.expect(r"\[answer stopped\]")
    stopped = expect_stats(child)
    assert stopped[2] == "cancelled"
    assert 0 < stopped[1] < 8000
    # The session goes on: a further turn runs to its end (8000 tokens in a few seconds), with the
    # stopped answer in its prompt.
    child.expect(">>> ")
    child.sendline("More")
    more = expect_stats(child)
    assert more[1:] == (8000, "length")
    assert more[0] > stopped[0] + stopped[1] // 4, "the second prompt carries the stopped answer"
    finish(child)


# --- one-shot use and errors --------------------------------------------------------


def run_chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*QWENRT, "chat", *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("runtime", ENGINES)
def test_one_shot_prompt_option(runtime: str, tiny_model: Path, engines: dict) -> None:
    args = ["--runtime", runtime, "--model", str(tiny_model), "--threads", "1", "--max-tokens", "20"]
    done = run_chat(*args, "-p", "Hello fox")
    assert done.returncode == 0, done.stderr
    session = ChatSession(engines[runtime], GenerationConfig(max_tokens=20))
    expected = answer(session, "Hello fox")
    assert done.stdout == expected.text + "\n"
    assert ">>>" not in done.stdout


@pytest.mark.parametrize("runtime", ENGINES)
def test_one_shot_piped_prompt(runtime: str, tiny_model: Path, engines: dict) -> None:
    args = ["--runtime", runtime, "--model", str(tiny_model), "--threads", "1", "--max-tokens", "20", "--stats"]
    done = run_chat(*args, stdin="Hello fox\n")
    assert done.returncode == 0, done.stderr
    session = ChatSession(engines[runtime], GenerationConfig(max_tokens=20))
    expected = answer(session, "Hello fox")
    assert done.stdout.startswith(expected.text + "\n")
    stats_line = done.stdout[len(expected.text) + 1 :]
    assert STATS.fullmatch(stats_line.rstrip("\n")), stats_line
    assert STATS.search(stats_line).groups() == (
        str(expected.prompt_tokens),
        str(expected.generated_tokens),
        expected.reason,
    )


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("qwenrt: error: ")
    return lines[0]


def test_missing_model_says_how_to_make_one() -> None:
    line = one_line_error(run_chat("--model", "/nonexistent"))
    assert "/nonexistent" in line and "qwenrt convert demo" in line
    # A piped prompt does not hide the missing model behind another error.
    line = one_line_error(run_chat("--model", "/nonexistent", stdin=""))
    assert "qwenrt convert demo" in line


@pytest.mark.parametrize("runtime", ENGINES)
def test_folder_without_the_engines_model(runtime: str, tmp_path: Path) -> None:
    line = one_line_error(run_chat("--runtime", runtime, "--model", str(tmp_path), "-p", "Hello"))
    assert "qwenrt convert demo" in line


def test_default_model_missing_says_how_to_make_one() -> None:
    # The tests' qwenrt home is empty, so there is no default model.
    line = one_line_error(run_chat("-p", "Hello"))
    assert "qwenrt convert demo" in line


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "   "], "the prompt is empty"),
        (["--max-tokens", "0", "-p", "Hello"], "max tokens"),
        (["--threads", "0", "-p", "Hello"], "threads"),
        (["--context-length", "0", "-p", "Hello"], "context length"),
        (["--max-tokens", "8", "-p", TOO_LONG], "exceeds the context window of 512"),
    ],
)
def test_bad_requests_are_one_line_errors(tiny_model: Path, args: list[str], message: str) -> None:
    line = one_line_error(run_chat("--model", str(tiny_model), *args))
    assert message in line


def test_empty_piped_prompt_is_an_error(tiny_model: Path) -> None:
    assert "the prompt is empty" in one_line_error(run_chat("--model", str(tiny_model), stdin="\n"))


# --- real weights ------------------------------------------------------------------


@pytest.mark.real_weights
@pytest.mark.parametrize("runtime", ENGINES)
def test_demo_model_one_shot(runtime: str, demo_model: Path) -> None:
    # One thread: two share this machine's two cores with other work, and llama.cpp's spinning
    # pool slows down many times over when it does not get both.
    done = run_chat(
        "--runtime", runtime, "--model", str(demo_model), "--threads", "1", "--max-tokens", "160",
        "-p", "请写一段 Python 快速排序函数",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "def " in done.stdout
    assert "\ufffd" not in done.stdout
    assert re.search(r"[\u4e00-\u9fff]", done.stdout), "a Chinese question gets a Chinese answer"
