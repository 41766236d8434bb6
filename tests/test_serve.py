"""`qwenrt serve`: the OpenAI-compatible server, run as users run it and driven by the official client.

Every server is a real `qwenrt serve` process on a tiny random-weight model, answering with
real tokens from both engines. The model's text is noise, so correctness is checked against
the engine itself: a greedy answer through the server is the answer the engine gives in
this process. The server's /health counters are the window into what it did: how many
generations ran at once, which ones were cancelled, and how many tokens were made.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import psutil
import pydantic
import pytest
from conftest import ENGINES, QWENRT
from helpers import LOGPROB_TOLERANCE, anonymous_huge_page_bytes, kernel_collapses, scored_tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_model import CHATML_TEMPLATE, TOOLS_TEMPLATE, build_tiny_qwen2

from qwenrt.runtimes import EngineOptions, GenerationConfig, StreamEnd, TokenEvent, engine_class, open_engine
from qwenrt.runtimes.chat_template import template_knows_tools
from qwenrt.runtimes.grammar import json_schema_grammar
from qwenrt.serve.protocol import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    DEFAULT_TEMPERATURE,
    HONOURED,
    JSON_OBJECT_SCHEMA,
    ChatAnswer,
    RequestError,
    SamplingDefaults,
    parse_chat_request,
    parse_completion_request,
    split_tool_calls,
)

# The model folder's name, which is the model id the server shows by default.
MODEL_ID = "tiny-serve"
# The most tokens a request may ask for: within the 4096-token window with a short prompt.
TOKEN_LIMIT = 4000
MAX_BODY = 64 * 1024
PARALLEL = 4  # OpenVINO's batch; llama.cpp takes one request at a time whatever this says
HELLO = [{"role": "user", "content": "Hello fox"}]
SENTENCE = "The quick brown fox jumps over the lazy dog. "
HEALTH_KEYS = {
    "status", "runtime", "parallel", "active", "queued", "completed", "cancelled", "failed",
    "generated_tokens", "peak_active", "peak_queued", "model",
}  # fmt: skip
TIMINGS_KEYS = {"queued_ms", "first_token_ms", "decode_tokens_per_second"}
ANNOUNCE = re.compile(r"serving (\S+) with (\S+) \((\d+) threads, (\d+) at a time\) on (http://127\.0\.0\.1:\d+)/v1")


@pytest.fixture(scope="module")
def serve_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slower tiny model with a bigger window than the session's, for answers that last seconds.

    4 layers of 512 (converted in about 6 s) decode at 550-1100 tokens/s on one thread here,
    so an answer of TOKEN_LIMIT tokens takes 5-8 s: a client that leaves after a few chunks
    stops its generation long before the end. Trained context 8192: the engines open 4096.
    """
    from qwenrt.convert.pipeline import convert

    checkpoint = build_tiny_qwen2(tmp_path_factory.mktemp("serve-checkpoint"), layers=4, hidden=512, context=8192,
                                  seed=1, chat_template=TOOLS_TEMPLATE)  # fmt: skip
    out = tmp_path_factory.mktemp("serve-model") / MODEL_ID
    convert(str(checkpoint), out, log=lambda line: None)
    return out


# --- a server in its own process --------------------------------------------------------


class Server:
    """`qwenrt serve` on a free loopback port, its output in a file for failure messages."""

    def __init__(self, runtime: str, model: Path, log: Path, *options: str) -> None:
        self.runtime = runtime
        self.model_dir = model
        self.log = log
        self.terminated = False
        # One thread: llama.cpp's spinning pool collapses when the test process takes one of the two cores.
        command = [*QWENRT, "serve", "--runtime", runtime, "--model", str(model), "--threads", "1", "--port", "0"]
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, *options], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            announce = self._wait_for_announce()
        except BaseException:
            self.kill()
            raise
        self.model_id, self.engine = announce.group(1), announce.group(2)
        self.threads, self.parallel = int(announce.group(3)), int(announce.group(4))
        self.url = announce.group(5)
        self.http = httpx.Client(base_url=self.url, timeout=10)

    def _wait_for_announce(self, timeout: float = 90) -> re.Match[str]:
        # The port is read from the log, not chosen beforehand: --port 0 cannot race with other processes.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := ANNOUNCE.search(self.output()):
                return match
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.tail()}")
            time.sleep(0.05)
        raise AssertionError(f"the server did not start within {timeout} s:\n{self.tail()}")

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 40) -> str:
        # Without the access log of the tests' own /health polls, which would fill it.
        kept = [line for line in self.output().splitlines() if '"GET /health ' not in line]
        return "\n".join(kept[-lines:])

    def client(self, api_key: str = "unused", **options: Any) -> openai.OpenAI:
        # No retries: a retried request would hide the failure under test (and count twice).
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **options)

    def health(self) -> dict[str, Any]:
        response = self.http.get("/health")
        assert response.status_code == 200, f"{response.status_code} {response.text}\n{self.tail()}"
        return response.json()

    def wait_for(self, condition: Callable[[dict[str, Any]], bool], what: str, timeout: float = 10) -> dict[str, Any]:
        """Poll /health until ``condition`` holds; fail with the last counters and the log."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if condition(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} within {timeout} s: {health}\n{self.tail()}")
            time.sleep(0.02)

    def terminate(self) -> None:
        """SIGTERM, as a service manager stops it; once only, since a second one forces the exit."""
        if not self.terminated and self.process.poll() is None:
            self.terminated = True
            self.process.send_signal(signal.SIGTERM)

    def wait_for_log(self, text: str, times: int = 1, timeout: float = 5) -> None:
        # A request's log line and its generation's end race each other: wait for the line itself.
        deadline = time.monotonic() + timeout
        while self.output().count(text) < times:
            if time.monotonic() > deadline:
                raise AssertionError(f"not {times} times {text!r} in the log within {timeout} s:\n{self.tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30) -> int:
        """Stop with SIGTERM (unless sent already) and wait; the exit status."""
        self.http.close()
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the server did not stop within {timeout} s of SIGTERM:\n{self.tail()}") from None

    def engine_process(self) -> psutil.Process:
        """The process that runs the engine: the child that qwenrt's supervising process waits for."""
        children = psutil.Process(self.process.pid).children()
        return next(child for child in children if "qwenrt.cli" in " ".join(child.cmdline()))

    def kill(self) -> None:
        if hasattr(self, "http"):
            self.http.close()
        if self.process.poll() is None:
            with contextlib.suppress(psutil.Error, StopIteration):
                self.engine_process().kill()
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def running(runtime: str, model: Path, log: Path, *options: str) -> Iterator[Server]:
    """A server that is killed on the way out whatever happened, so no test leaves one behind."""
    server = Server(runtime, model, log, *options)
    try:
        yield server
    finally:
        server.kill()


def assert_stopped_cleanly(server: Server) -> None:
    code = server.stop()
    output = server.output()
    assert code == 0, f"exit status {code}\n{server.tail()}"
    assert re.search(r" INFO stopped$", output, re.MULTILINE), server.tail()
    assert "Traceback" not in output and " ERROR " not in output, server.tail(80)


@pytest.fixture(scope="module", params=ENGINES)
def server(request: pytest.FixtureRequest, serve_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """One server per engine for the module; stopped with SIGTERM, which must end it cleanly."""
    log = tmp_path_factory.mktemp(f"serve-{request.param}") / "server.log"
    options = ["--parallel", str(PARALLEL), "--max-tokens", str(TOKEN_LIMIT), "--max-body", str(MAX_BODY)]
    with running(request.param, serve_model, log, *options) as started:
        yield started
        assert_stopped_cleanly(started)


@pytest.fixture(scope="module")
def local_engines(serve_model: Path):
    """The engines in this process: what the server's greedy answers must be.

    No prefix cache, so that every answer here starts from a cold KV cache.
    """
    opened = {name: open_engine(name, serve_model, EngineOptions(threads=1, prefix_cache=False)) for name in ENGINES}
    yield opened
    for engine in opened.values():
        engine.close()


def local_answer(engine: Any, messages: list[dict[str, str]], max_tokens: int) -> StreamEnd:
    end = list(engine.stream_chat(messages, GenerationConfig(max_tokens=max_tokens)))[-1]
    assert isinstance(end, StreamEnd)
    return end


def stream_text(chunks: list[Any]) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def chat_body(max_tokens: int, *, stream: bool = True, messages: list[dict[str, Any]] = HELLO) -> dict[str, Any]:
    """A raw request body: exactly ``max_tokens`` tokens long (ignore_eos), with usage when streaming."""
    body: dict[str, Any] = {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def sse_payloads(text: str) -> list[str]:
    """The data of each server-sent event, checking the framing on the way."""
    assert text.endswith("\n\n"), text[-200:]
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event[len("data: ") :] for event in events]


# --- answers through the openai client ----------------------------------------------------


def test_announce_models_and_health(server: Server) -> None:
    assert (server.model_id, server.engine, server.threads) == (MODEL_ID, server.runtime, 1)
    assert server.parallel == (PARALLEL if server.runtime == "openvino" else 1)
    assert [model.id for model in server.client().models.list()] == [MODEL_ID]
    health = server.health()
    assert set(health) == HEALTH_KEYS
    assert health["status"] == "ok"
    assert (health["runtime"], health["parallel"], health["model"]) == (server.runtime, server.parallel, MODEL_ID)
    counters = HEALTH_KEYS - {"status", "runtime", "model"}
    assert all(isinstance(health[key], int) and health[key] >= 0 for key in counters), health


def test_greedy_answer_streamed_or_not_is_the_engines_own(server: Server, local_engines: dict) -> None:
    engine = local_engines[server.runtime]
    expected = local_answer(engine, HELLO, 48)
    client = server.client()

    answer = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=48, temperature=0)
    choice = answer.choices[0]
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion" and answer.model == MODEL_ID
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.message.content == expected.text
    assert choice.finish_reason == {"eos": "stop", "length": "length"}[expected.reason]
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_tokens, expected.generated_tokens)
    assert usage.prompt_tokens == len(engine.chat_prompt_ids(HELLO))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert set(answer.model_extra["timings"]) == TIMINGS_KEYS  # qwenrt's field beside OpenAI's

    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID, messages=HELLO, max_tokens=48, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    role, *texts, finish, last = chunks
    assert len({chunk.id for chunk in chunks}) == 1 and chunks[0].id != answer.id
    assert all(chunk.object == "chat.completion.chunk" and chunk.model == MODEL_ID for chunk in chunks)
    assert role.choices[0].delta.role == "assistant" and not role.choices[0].delta.content
    assert texts and all(c.choices[0].delta.content and c.choices[0].finish_reason is None for c in texts)
    assert finish.choices[0].finish_reason == choice.finish_reason and not finish.choices[0].delta.content
    assert set(finish.model_extra["timings"]) == TIMINGS_KEYS
    assert last.choices == [] and last.usage == usage
    assert stream_text(chunks) == choice.message.content


def test_conversation_with_developer_role_and_text_parts(server: Server, local_engines: dict) -> None:
    # A conversation no other test sends: OpenVINO's prefix cache, on in this server, changes greedy
    # answers a little when it reuses an earlier request's KV blocks (see the test after this one).
    sent = [
        {"role": "developer", "content": "Be brief, dog."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "dog"}]},
        {"role": "assistant", "content": "Woof."},
        {"role": "user", "content": "More, quick"},
    ]
    meant = [
        {"role": "system", "content": "Be brief, dog."},
        {"role": "user", "content": "Hello dog"},
        {"role": "assistant", "content": "Woof."},
        {"role": "user", "content": "More, quick"},
    ]
    expected = local_answer(local_engines[server.runtime], meant, 32)
    answer = server.client().chat.completions.create(model=MODEL_ID, messages=sent, max_tokens=32, temperature=0)
    assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert answer.choices[0].message.content == expected.text


@pytest.mark.parametrize("runtime", ENGINES)
def test_conversation_asked_twice_without_prefix_cache(
    runtime: str, serve_model: Path, local_engines: dict, tmp_path: Path
) -> None:
    """Each turn of a conversation, asked twice, is the cold greedy answer with --no-prefix-cache.

    With the prefix cache on, OpenVINO's answer to a prompt that extends an earlier one drifts
    from the cold answer after some tokens (its cached KV blocks are kept in lower precision:
    see test_runtimes): this test then fails on OpenVINO at the second turn asked again.
    llama.cpp's cache is exact. Off, every request starts cold.
    """
    engine = local_engines[runtime]
    with running(runtime, serve_model, tmp_path / "server.log", "--parallel", "2", "--no-prefix-cache") as srv:
        client = srv.client()
        messages = list(HELLO)
        for turn in range(3):
            expected = local_answer(engine, messages, 100).text
            for asked in range(2):
                answer = client.chat.completions.create(
                    model=MODEL_ID, messages=messages, max_tokens=100, temperature=0
                )
                assert answer.choices[0].message.content == expected, f"turn {turn}, asked {asked + 1} times"
            messages += [{"role": "assistant", "content": expected}, {"role": "user", "content": "More"}]
        assert_stopped_cleanly(srv)


def test_seed_makes_sampling_repeatable(server: Server) -> None:
    client = server.client()

    def sample(seed: int | None) -> str:
        answer = client.chat.completions.create(
            model=MODEL_ID, messages=HELLO, max_tokens=24, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return answer.choices[0].message.content

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    # Without a seed two answers differ: an earlier request's seed must not stick to the engine.
    assert sample(None) != sample(None)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_cuts_the_answer(server: Server, stream: bool) -> None:
    client = server.client()
    full = client.chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=48, temperature=0)
    text = full.choices[0].message.content
    # A stop string from the middle of the greedy answer, at its first occurrence.
    at, stop = next(
        (i, text[i : i + 3])
        for i in range(8, len(text) - 3)
        if text[i : i + 3].isprintable() and "\ufffd" not in text[i : i + 3] and text.find(text[i : i + 3]) == i
    )
    kwargs: dict[str, Any] = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 48, "temperature": 0, "stop": [stop]}
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        content, finish = stream_text(chunks), chunks[-1].choices[0].finish_reason
    else:
        answer = client.chat.completions.create(**kwargs)
        content, finish = answer.choices[0].message.content, answer.choices[0].finish_reason
    assert (content, finish) == (text[:at], "stop"), f"stop {stop!r} in {text!r}"


def test_ignore_eos_gives_exactly_max_tokens(server: Server) -> None:
    answer = server.client().chat.completions.create(
        model=MODEL_ID, messages=HELLO, max_tokens=37, extra_body={"ignore_eos": True}
    )
    assert answer.usage.completion_tokens == 37
    assert answer.choices[0].finish_reason == "length"


def test_raw_answers(server: Server) -> None:
    """The bytes on the wire, as clients other than openai's read them."""
    response = server.http.post("/v1/chat/completions", json=chat_body(12, stream=False))
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    answer = response.json()
    assert response.headers["x-request-id"] == answer["id"]
    assert answer["usage"]["completion_tokens"] == 12 and answer["choices"][0]["finish_reason"] == "length"

    with server.http.stream("POST", "/v1/chat/completions", json=chat_body(20) | {"stream_options": None}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    *chunks, done = sse_payloads(text)
    assert done == "[DONE]"
    chunks = [json.loads(chunk) for chunk in chunks]
    assert response.headers["x-request-id"] == chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # Without include_usage there is no usage chunk: the finish chunk is the last one.
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in chunk for chunk in chunks)


# --- refused requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_fields, param, code",
    [
        ({"max_tokens": TOKEN_LIMIT + 1}, "max_tokens", "max_tokens_exceeded"),
        ({"max_completion_tokens": TOKEN_LIMIT + 1}, "max_completion_tokens", "max_tokens_exceeded"),
        # About 220 prompt tokens: with the most a request may ask for, over the 4096-token window.
        ({"max_tokens": TOKEN_LIMIT, "messages": [{"role": "user", "content": SENTENCE * 20}]}, "max_tokens",
         "context_length_exceeded"),
        # Thousands of prompt tokens: no room for any answer.
        ({"messages": [{"role": "user", "content": SENTENCE * 600}]}, "messages", "context_length_exceeded"),
        ({"n": 2}, "n", None),
        ({"temperature": 2.5}, "temperature", None),
        ({"top_p": 0}, "top_p", None),
        ({"messages": []}, "messages", None),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", None),
        ({"max_tokens": 0}, "max_tokens", None),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", None),
        ({"frequency_penalty": 2.5}, "frequency_penalty", None),
        ({"top_logprobs": 3}, "top_logprobs", None),  # only with logprobs true
        ({"extra_body": {"max_token": 5}}, "max_token", "unknown_field"),  # a misspelt field is named, not ignored
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
         "response_format.json_schema.schema", None),
    ],
)  # fmt: skip
def test_bad_request_through_the_client(server: Server, request_fields: dict[str, Any], param: str,
                                        code: str | None) -> None:  # fmt: skip
    before = server.health()
    kwargs = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 8} | request_fields
    with pytest.raises(openai.BadRequestError) as refused:
        server.client().chat.completions.create(**kwargs)
    error = refused.value
    assert error.status_code == 400
    assert (error.param, error.code, error.type) == (param, code, "invalid_request_error"), error.body
    assert error.body["message"]
    # A refused request never reaches the engine, and the server goes on serving.
    after = server.health()
    assert after == before, (before, after)


@pytest.mark.parametrize("case", ["declared too large", "streamed too large", "not json", "not utf-8", "array",
                                  "unknown route", "wrong method"])  # fmt: skip
def test_bad_http_request(server: Server, case: str) -> None:
    url = "/v1/chat/completions"
    big = json.dumps(chat_body(8, messages=[{"role": "user", "content": "fox " * (MAX_BODY // 4)}])).encode()
    method, path, content, status = {
        "declared too large": ("POST", url, big, 413),
        # Chunked, without a length to refuse it by: the server counts as it reads.
        "streamed too large": ("POST", url, iter([big[i : i + 8192] for i in range(0, len(big), 8192)]), 413),
        "not json": ("POST", url, b'{"messages": [', 400),
        "not utf-8": ("POST", url, b'{"messages": "\xff\xfe"}', 400),
        "array": ("POST", url, b"[]", 400),
        "unknown route": ("GET", "/v1/nothing", None, 404),
        "wrong method": ("GET", url, None, 405),
    }[case]
    before = server.health()
    response = server.http.request(method, path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == {404: "not_found_error"}.get(status, "invalid_request_error")
    assert server.health() == before


# --- under load --------------------------------------------------------------------------


@dataclass
class Streamed:
    """One streamed answer as a client saw it."""

    chunks: list[Any] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when each chunk arrived

    def span(self) -> tuple[float, float]:
        """From the first text chunk to the finish chunk."""
        return self.times[1], self.times[-2]


async def _stream_many(url: str, requests: int, clients: int, max_tokens: int) -> list[Streamed]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        places = asyncio.Semaphore(clients)

        async def one(index: int) -> Streamed:
            async with places:
                streamed = Streamed()
                stream = await client.chat.completions.create(
                    model=MODEL_ID, messages=[{"role": "user", "content": f"Question {index}: hello fox"}],
                    max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                async for chunk in stream:
                    streamed.chunks.append(chunk)
                    streamed.times.append(time.perf_counter())
                return streamed

        return await asyncio.gather(*(one(index) for index in range(requests)))


@pytest.mark.parametrize("runtime", ENGINES)
def test_load_32_streams_from_8_clients(runtime: str, serve_model: Path, tmp_path: Path) -> None:
    # A server of its own: the peak counters hold since its start, and must show this load alone.
    with running(runtime, serve_model, tmp_path / "server.log", "--parallel", str(PARALLEL), "--no-access-log") as srv:
        results = asyncio.run(_stream_many(srv.url, requests=32, clients=8, max_tokens=32))
        assert len(results) == 32
        for streamed in results:
            chunks = streamed.chunks
            assert chunks[0].choices[0].delta.role == "assistant", srv.tail()
            assert chunks[-2].choices[0].finish_reason == "length", srv.tail()
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32, srv.tail()
        assert len({streamed.chunks[0].id for streamed in results}) == 32
        health = srv.wait_for(lambda h: h["active"] == 0 and h["queued"] == 0, "idle")
        counters = {key: health[key] for key in ("completed", "failed", "cancelled", "generated_tokens")}
        assert counters == {"completed": 32, "failed": 0, "cancelled": 0, "generated_tokens": 32 * 32}, health
        if runtime == "openvino":
            # Continuous batching: several generations ran at once, and their tokens came interleaved.
            assert 1 < health["peak_active"] <= PARALLEL, health
            spans = sorted(streamed.span() for streamed in results)
            assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans
        else:
            # llama.cpp: one at a time, the others waiting their turn (more than one at once: a lone
            # request passes through the queue on its way in as well).
            assert health["peak_active"] == 1, health
            assert health["peak_queued"] > 1, health
        assert_stopped_cleanly(srv)


# --- clients that leave ------------------------------------------------------------------


def test_streaming_client_that_leaves_stops_its_generation(server: Server) -> None:
    before = server.wait_for(lambda h: h["active"] == 0, "idle")
    with server.http.stream("POST", "/v1/chat/completions", json=chat_body(TOKEN_LIMIT)) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        texts = 0
        while texts < 5:
            texts += '"delta":{"content":"' in next(lines)  # a text chunk, not the role chunk
        assert server.health()["active"] == 1
    # Closing the response before its end closes the connection.
    after = server.wait_for(lambda h: h["active"] == 0, "stopped", timeout=5)
    assert after["cancelled"] == before["cancelled"] + 1, after
    assert after["completed"] == before["completed"], after
    made = after["generated_tokens"] - before["generated_tokens"]
    # The whole answer takes seconds; the generation stops within a token or so of the client leaving.
    assert 5 <= made < TOKEN_LIMIT // 4, after
    server.wait_for_log(f"{request_id}: client left")


def test_non_streaming_client_that_times_out_stops_its_generation(server: Server) -> None:
    before = server.wait_for(lambda h: h["active"] == 0, "idle")
    left_before = server.output().count("client left")
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/chat/completions", json=chat_body(TOKEN_LIMIT, stream=False), timeout=0.5)
    after = server.wait_for(lambda h: h["active"] == 0, "stopped", timeout=5)
    elapsed = time.monotonic() - started
    assert after["cancelled"] == before["cancelled"] + 1, after
    assert after["completed"] == before["completed"], after
    made = after["generated_tokens"] - before["generated_tokens"]
    assert 0 < made < TOKEN_LIMIT // 2, (after, elapsed)
    server.wait_for_log("client left", times=left_before + 1)


def test_client_that_leaves_the_queue_never_starts(server: Server) -> None:
    before = server.wait_for(lambda h: h["active"] == 0, "idle")
    places = before["parallel"]
    # Enough work to keep every place busy for 2-4 s, alone on llama.cpp or at 500-1000 tokens/s
    # each in OpenVINO's batch of 4 (whose fillers start up to a few hundred ms apart; with 1000
    # tokens, a filler once ended before the test had left the queue).
    fill_tokens = 1600 if places == 1 else 2000
    usages: list[dict[str, int]] = []

    def fill() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            response = http.post("/v1/chat/completions", json=chat_body(fill_tokens))
            usages.append(json.loads(sse_payloads(response.text)[-2])["usage"])

    fillers = [threading.Thread(target=fill) for _ in range(places)]
    for filler in fillers:
        filler.start()
    try:
        server.wait_for(lambda h: h["active"] == places, "every place busy")
        with server.http.stream("POST", "/v1/chat/completions", json=chat_body(500)) as response:
            # The role chunk comes at once, before the request waits for a place. (The line iterator is
            # kept: dropping a half-read httpx iterator closes the connection, as a client that leaves.)
            lines = response.iter_lines()
            assert '"role":"assistant"' in next(lines)
            server.wait_for(lambda h: h["queued"] == 1, "queued")
            request_id = response.headers["x-request-id"]
        left = server.wait_for(lambda h: h["queued"] == 0, "out of the queue", timeout=5)
        assert left["active"] == places, f"a filler ended before the test could leave the queue: {left}"
    finally:
        for filler in fillers:
            filler.join(timeout=60)
    after = server.wait_for(lambda h: h["active"] == 0, "idle")
    assert [usage["completion_tokens"] for usage in usages] == [fill_tokens] * places, server.tail()
    # The fillers' tokens and nothing more: the request that left never reached the engine.
    assert after["generated_tokens"] - before["generated_tokens"] == fill_tokens * places, after
    assert after["completed"] - before["completed"] == places, after
    assert after["cancelled"] - before["cancelled"] == 1, after  # it left the queue: counted as cancelled
    server.wait_for_log(f"{request_id}: client left")


# --- API key, full queue and stopping --------------------------------------------------


class StreamReader(threading.Thread):
    """A raw streaming request read to its end on a thread of its own."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.headers = url, body, headers
        self.streaming = threading.Event()  # set once some text has come
        self.text = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.url, timeout=60) as http,
                http.stream("POST", "/v1/chat/completions", json=self.body, headers=self.headers) as response,
            ):
                for part in response.iter_text():
                    self.text += part
                    if self.text.count('"delta":{"content":"') >= 5:
                        self.streaming.set()
        except BaseException as exc:  # re-raised by the test on its own thread
            self.error = exc
        finally:
            self.streaming.set()


class Call(threading.Thread):
    """A blocking call on a thread of its own, its result or exception kept for the test."""

    def __init__(self, call: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.call()
        except BaseException as exc:
            self.error = exc


def refuses_connections(url: str) -> bool:
    """No answer at all: refused, or reset (a connection the kernel queued just before the listener closed)."""
    try:
        httpx.get(f"{url}/health", timeout=2)
    except httpx.TransportError:
        return True
    return False


def check_api_key(server: Server, key: str, model_id: str) -> None:
    """Every route but /health needs the key."""
    with pytest.raises(openai.AuthenticationError) as refused:
        server.client(api_key="wrong").models.list()
    assert refused.value.status_code == 401 and refused.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").chat.completions.create(model=model_id, messages=HELLO, max_tokens=4)
    bare = server.http.post("/v1/chat/completions", json=chat_body(4, stream=False))
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"
    assert server.http.get("/v1/nothing").status_code == 401  # without the key, not even which routes exist
    assert server.health()["model"] == model_id
    client = server.client(api_key=key)
    assert [model.id for model in client.models.list()] == [model_id]
    answer = client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=4)
    assert answer.model == model_id and answer.usage.completion_tokens >= 1


@pytest.mark.parametrize("runtime", ENGINES)
def test_api_key_full_queue_and_graceful_stop(runtime: str, serve_model: Path, tmp_path: Path) -> None:
    key, model_id = "s3cret-key", "edge-qwen"
    options = ["--parallel", "2", "--max-queue", "1", "--api-key", key, "--model-name", model_id]
    with running(runtime, serve_model, tmp_path / "server.log", *options) as server:
        check_api_key(server, key, model_id)
        client = server.client(api_key=key)

        def ask(max_tokens: int) -> Call:
            call = Call(lambda: client.chat.completions.create(
                model=model_id, messages=HELLO, max_tokens=max_tokens, extra_body={"ignore_eos": True}))  # fmt: skip
            call.start()
            return call

        # In flight when SIGTERM comes: a stream of 2-3 s, and a whole answer of about 1 s (llama.cpp:
        # waiting behind the stream; OpenVINO: beside it, with a third one in its queue). All done
        # well within the 10 s that the server gives them.
        stream = StreamReader(server.url, chat_body(1500), {"authorization": f"Bearer {key}"})
        stream.start()
        assert stream.streaming.wait(30) and stream.error is None, (stream.error, server.tail())
        calls = [(ask(600), 600)]
        server.wait_for(lambda h: h["active"] + h["queued"] == 2, "both in flight")
        if server.parallel > 1:
            calls.append((ask(100), 100))
        server.wait_for(lambda h: h["queued"] == 1, "the queue full")
        # The queue is full: one more is refused at once, to retry later.
        with pytest.raises(openai.InternalServerError) as busy:
            client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=4)
        assert busy.value.status_code == 503 and "retry" in busy.value.body["message"], busy.value.body

        server.terminate()
        deadline = time.monotonic() + 5
        while not refuses_connections(server.url) and time.monotonic() < deadline:
            time.sleep(0.02)
        refused_while_answering = stream.is_alive()
        assert refuses_connections(server.url), server.tail()
        for thread in (stream, *(call for call, _ in calls)):
            thread.join(timeout=30)
        assert server.process.wait(timeout=30) == 0, server.tail()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)

    # Every answer in flight was finished in full.
    assert stream.error is None, (stream.error, server.tail())
    *_, usage_chunk, done = sse_payloads(stream.text)
    assert done == "[DONE]" and json.loads(usage_chunk)["usage"]["completion_tokens"] == 1500, server.tail()
    for call, max_tokens in calls:
        assert call.error is None, (call.error, server.tail())
        assert call.result.usage.completion_tokens == max_tokens
    assert refused_while_answering, "new connections were refused only after the answers were done"
    assert_stopped_cleanly(server)


@pytest.mark.parametrize("runtime", ENGINES)
def test_huge_pages_server_answers_as_the_engine(runtime: str, serve_model: Path, local_engines: dict,
                                                 tmp_path: Path) -> None:  # fmt: skip
    expected = local_answer(local_engines[runtime], HELLO, 24)
    with running(runtime, serve_model, tmp_path / "server.log", "--huge-pages", "--parallel", str(PARALLEL)) as server:
        answer = server.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=24, temperature=0)
        assert answer.choices[0].message.content == expected.text
        in_huge_pages = anonymous_huge_page_bytes(server.engine_process().pid)
        assert_stopped_cleanly(server)
    # Where the kernel can collapse, the loaded server's memory sits in 2 MB pages (which
    # this machine, transparent huge pages on request only, gives a plain server none of).
    # Elsewhere the option changes nothing, and the answer above is the whole check.
    if kernel_collapses():
        assert in_huge_pages > 0


# --- command-line errors -----------------------------------------------------------------


def run_serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*QWENRT, "serve", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qwenrt: error: "), done.stderr
    return lines[0]


@pytest.mark.parametrize("runtime", ENGINES)
def test_port_in_use_is_a_one_line_error(runtime: str, serve_model: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(run_serve("--runtime", runtime, "--model", str(serve_model), "--port", str(port)))
    assert f"127.0.0.1:{port}" in line and "in use" in line


@pytest.mark.parametrize("runtime", ENGINES)
def test_missing_model_is_a_one_line_error(runtime: str, tmp_path: Path) -> None:
    line = one_line_error(run_serve("--runtime", runtime, "--model", str(tmp_path / "nothing"), "--port", "0"))
    assert str(tmp_path / "nothing") in line and "qwenrt convert demo" in line
    # A folder without this engine's model.
    assert "qwenrt convert demo" in one_line_error(run_serve("--runtime", runtime, "--model", str(tmp_path)))


@pytest.mark.parametrize("option", [["--parallel", "0"], ["--port", "70000"], ["--max-body", "10"]])
def test_bad_option_is_a_one_line_error(option: list[str], serve_model: Path) -> None:
    assert option[0] in one_line_error(run_serve("--model", str(serve_model), *option))


# --- the request parser, on plain dicts -----------------------------------------------


def body(**fields: Any) -> dict[str, Any]:
    return {"messages": HELLO, **fields}


@pytest.mark.parametrize(
    "request_body, param",
    [
        ([], None),
        ("hello", None),
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "Hello fox"}, "messages"),
        ({"messages": ["Hello fox"]}, "messages[0]"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content"),
        ({"messages": [*HELLO, {"role": "assistant", "content": "Hi"}]}, "messages"),
        (body(max_tokens=0), "max_tokens"),
        (body(max_tokens="10"), "max_tokens"),
        (body(max_tokens=10.0), "max_tokens"),
        (body(max_tokens=True), "max_tokens"),
        (body(max_tokens=101), "max_tokens"),
        (body(max_completion_tokens=0), "max_completion_tokens"),
        (body(max_tokens=5, max_completion_tokens=101), "max_completion_tokens"),
        (body(temperature=-0.1), "temperature"),
        (body(temperature=2.01), "temperature"),
        (body(temperature="0"), "temperature"),
        (body(temperature=float("nan")), "temperature"),  # json.loads reads NaN
        (body(top_p=0), "top_p"),
        (body(top_p=1.5), "top_p"),
        (body(seed=-1), "seed"),
        (body(seed=2**32), "seed"),
        (body(seed="1"), "seed"),
        (body(n=2), "n"),
        (body(n=0), "n"),
        (body(frequency_penalty=2.5), "frequency_penalty"),
        (body(presence_penalty=-2.01), "presence_penalty"),
        (body(presence_penalty="1"), "presence_penalty"),
        (body(repetition_penalty=0), "repetition_penalty"),
        (body(repetition_penalty=2.5), "repetition_penalty"),
        (body(top_k=-1), "top_k"),
        (body(top_k=2.5), "top_k"),
        (body(max_token=5), "max_token"),  # misspelt: named, never ignored
        (body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function",
                                                                                   "function": {"name": "g"}}),
         "tool_choice"),
        (body(tools=[{"type": "function"}]), "tools[0]"),
        (body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={"type": "function",
                                                                                   "function": "f"}), "tool_choice"),
        (body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice=["f"]), "tool_choice"),
        (body(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name"),
        (body(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "thing"}}}]),
         "tools[0].function.parameters"),
        (body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required",
              response_format={"type": "json_object"}), "tool_choice"),
        ({"messages": [*HELLO, {"role": "tool", "content": "21 C"}]}, "messages[1].tool_call_id"),
        ({"messages": [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}, *HELLO]},
         "messages[1].tool_calls[0].function.arguments"),
        (body(logprobs=1), "logprobs"),
        (body(top_logprobs=3), "top_logprobs"),
        (body(logprobs=True, top_logprobs=-1), "top_logprobs"),
        (body(logit_bias={"5": 10}), "logit_bias"),
        (body(store=True), "store"),
        (body(metadata={"a": "b"}), "metadata"),
        (body(modalities=["text", "audio"]), "modalities"),
        (body(service_tier="flex"), "service_tier"),
        (body(tool_choice="required"), "tool_choice"),
        (body(parallel_tool_calls="yes"), "parallel_tool_calls"),
        (body(user=5), "user"),
        (body(response_format="json"), "response_format"),
        (body(response_format={"type": "yaml"}), "response_format"),
        (body(response_format={"type": "json_schema"}), "response_format.json_schema"),
        (body(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
         "response_format.json_schema.name"),
        (body(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
         "response_format.json_schema.name"),
        (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": []}}),
         "response_format.json_schema.schema"),
        (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "thing"}}}),
         "response_format.json_schema.schema"),
        (body(response_format={"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}),
         "response_format.json_schema.strict"),
        (body(stream="yes"), "stream"),
        (body(stream=1), "stream"),
        (body(stream_options="yes"), "stream_options"),
        (body(stream_options=[]), "stream_options"),
        (body(stream_options={"include_usage": True}), "stream_options"),  # only with stream true, as OpenAI
        (body(stop=5), "stop"),
        (body(stop=["a", 5]), "stop"),
        (body(stop=["a", "b", "c", "d", "e"]), "stop"),
        (body(ignore_eos="true"), "ignore_eos"),
    ],
)  # fmt: skip
def test_parser_refuses(request_body: Any, param: str | None) -> None:
    with pytest.raises(RequestError) as refused:
        parse_chat_request(request_body, max_tokens_limit=100)
    error = refused.value
    assert error.param == param and error.status == 400
    shown = error.body()["error"]
    assert (shown["message"], shown["type"], shown["param"]) == (str(error), "invalid_request_error", param)


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
def test_parser_limit_has_its_own_code(name: str) -> None:
    assert parse_chat_request(body(**{name: 100}), max_tokens_limit=100).max_tokens == 100
    with pytest.raises(RequestError) as refused:
        parse_chat_request(body(**{name: 101}), max_tokens_limit=100)
    assert (refused.value.param, refused.value.code) == (name, "max_tokens_exceeded")
    assert "100" in str(refused.value)  # the limit, for the client to ask again within it


def test_parser_defaults() -> None:
    chat = parse_chat_request(body(), max_tokens_limit=100)
    assert chat.messages == HELLO
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.seed, chat.stop) == (None, DEFAULT_TEMPERATURE, 1.0,
                                                                                      None, ())  # fmt: skip
    # OpenAI's default temperature: a client that leaves it out samples, as it would there.
    assert DEFAULT_TEMPERATURE == 1.0
    assert (chat.stream, chat.include_usage, chat.ignore_eos) == (False, False, False)
    assert (chat.top_k, chat.repetition_penalty, chat.presence_penalty, chat.frequency_penalty) == (0, 1.0, 0.0, 0.0)
    assert chat.grammar is None


def test_parser_takes_the_model_s_sampling_defaults_where_a_request_says_nothing() -> None:
    # Qwen2.5-Instruct's generation_config.json, as its checkpoints ship it
    qwen = SamplingDefaults.of_model({"do_sample": True, "repetition_penalty": 1.05, "temperature": 0.7,
                                      "top_p": 0.8, "top_k": 20, "bos_token_id": 151643})  # fmt: skip
    assert qwen == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    chat = parse_chat_request(body(), max_tokens_limit=100, defaults=qwen)
    assert (chat.temperature, chat.top_p, chat.top_k, chat.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    asked = parse_chat_request(body(temperature=0, top_k=0, repetition_penalty=1), max_tokens_limit=100, defaults=qwen)
    assert (asked.temperature, asked.top_p, asked.top_k, asked.repetition_penalty) == (0.0, 0.8, 0, 1.0)
    assert SamplingDefaults.of_model({}) == SamplingDefaults()


def test_parser_reads_json_null_as_not_given() -> None:
    nulls = dict.fromkeys(CHAT_FIELDS.keys() - {"messages"})
    assert parse_chat_request(body(**nulls), max_tokens_limit=100) == parse_chat_request(body(), max_tokens_limit=100)


def test_parser_null_max_completion_tokens_leaves_max_tokens() -> None:
    # Clients that send every field write null for the ones not set.
    assert parse_chat_request(body(max_completion_tokens=None, max_tokens=5), max_tokens_limit=100).max_tokens == 5


def test_parser_reads_every_field() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},  # OpenAI's newer name for the system role
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "fox"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": []},
    ]
    chat = parse_chat_request(
        {"messages": messages, "max_tokens": 50, "max_completion_tokens": 60, "temperature": 0, "top_p": 0.5,
         "seed": 2**32 - 1, "n": 1, "stop": ["", "END"], "stream": True, "stream_options": {"include_usage": True},
         "frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.2, "top_k": 20,
         "ignore_eos": True, "user": "someone", "model": "any", "response_format": {"type": "json_object"},
         "store": False, "metadata": {}, "service_tier": "auto", "modalities": ["text"], "tool_choice": "none",
         "logprobs": False, "top_logprobs": 0, "logit_bias": {}, "tools": [], "prompt_cache_key": "k",
         "prompt_cache_retention": "in_memory", "safety_identifier": "x"},
        max_tokens_limit=100,
    )  # fmt: skip
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello fox"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": ""},
    ]
    assert chat.max_tokens == 60  # the newer name wins
    assert (chat.stream, chat.include_usage) == (True, True)
    assert chat.generation(60) == GenerationConfig(
        max_tokens=60,
        temperature=0.0,
        top_p=0.5,
        top_k=20,
        seed=2**32 - 1,
        stop=("END",),
        ignore_eos=True,
        repetition_penalty=1.2,
        presence_penalty=-0.5,
        frequency_penalty=0.5,
        grammar=json_schema_grammar(JSON_OBJECT_SCHEMA),
    )
    assert chat.user == "someone"
    assert parse_chat_request(body(stop="END"), max_tokens_limit=100).stop == ("END",)


# --- every field of OpenAI's request: honoured or refused by name --------------------------

# For each field of the official client's chat-completion request: a value this server takes
# (None: none but the field's "off" value) and one it refuses by name (None: it takes every
# value of the right shape). A field the openai package gains fails here until it is decided.
FIELD_EXAMPLES: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {
    "audio": (None, {"audio": {"voice": "alloy", "format": "wav"}}),
    "frequency_penalty": ({"frequency_penalty": 0.5}, {"frequency_penalty": 3}),
    "function_call": (None, {"function_call": "auto"}),
    "functions": (None, {"functions": [{"name": "f", "parameters": {}}]}),
    "logit_bias": (None, {"logit_bias": {"42": 5}}),
    "logprobs": ({"logprobs": True}, {"logprobs": "yes"}),
    "max_completion_tokens": ({"max_completion_tokens": 5}, {"max_completion_tokens": 0}),
    "max_tokens": ({"max_tokens": 5}, {"max_tokens": 0}),
    "messages": ({"messages": HELLO}, {"messages": []}),
    "metadata": ({"metadata": {}}, {"metadata": {"a": "b"}}),
    "modalities": ({"modalities": ["text"]}, {"modalities": ["audio"]}),
    "model": ({"model": "anything"}, {"model": 5}),
    "moderation": (None, {"moderation": True}),
    "n": ({"n": 1}, {"n": 2}),
    "parallel_tool_calls": ({"parallel_tool_calls": False}, {"parallel_tool_calls": "no"}),
    "prediction": (None, {"prediction": {"type": "content", "content": "x"}}),
    "presence_penalty": ({"presence_penalty": -0.5}, {"presence_penalty": 2.5}),
    "prompt_cache_key": ({"prompt_cache_key": "k"}, {"prompt_cache_key": 5}),
    "prompt_cache_options": (None, {"prompt_cache_options": {}}),
    "prompt_cache_retention": ({"prompt_cache_retention": "in_memory"}, {"prompt_cache_retention": "24h"}),
    "reasoning_effort": (None, {"reasoning_effort": "low"}),
    "response_format": ({"response_format": {"type": "json_object"}}, {"response_format": {"type": "yaml"}}),
    "safety_identifier": ({"safety_identifier": "x"}, {"safety_identifier": 5}),
    "seed": ({"seed": 1}, {"seed": -1}),
    "service_tier": ({"service_tier": "auto"}, {"service_tier": "flex"}),
    "stop": ({"stop": "x"}, {"stop": 5}),
    "store": ({"store": False}, {"store": True}),
    "stream": ({"stream": True}, {"stream": "yes"}),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, {"stream_options": "x"}),
    "temperature": ({"temperature": 0.5}, {"temperature": 3}),
    "tool_choice": ({"tool_choice": "none"}, {"tool_choice": "required"}),  # required: needs tools
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tools": "f"}),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 20}, {"logprobs": True, "top_logprobs": 21}),
    "top_p": ({"top_p": 0.5}, {"top_p": 0}),
    "user": ({"user": "u"}, {"user": 5}),
    "verbosity": (None, {"verbosity": "low"}),
    "web_search_options": (None, {"web_search_options": {}}),
}  # fmt: skip


def openai_request_fields() -> set[str]:
    from openai.types.chat import completion_create_params as params

    return {key for kind in (params.CompletionCreateParamsStreaming, params.CompletionCreateParamsNonStreaming)
            for key in kind.__required_keys__ | kind.__optional_keys__}  # fmt: skip


def test_every_field_of_the_openai_request_is_honoured_or_refused_by_name() -> None:
    fields = openai_request_fields()
    assert fields <= CHAT_FIELDS.keys(), f"fields the server has not decided on: {sorted(fields - CHAT_FIELDS.keys())}"
    assert fields == FIELD_EXAMPLES.keys(), sorted(fields ^ FIELD_EXAMPLES.keys())
    for name in sorted(fields):
        accepted, refused = FIELD_EXAMPLES[name]
        assert (CHAT_FIELDS[name] == HONOURED) == (accepted is not None), name
        if accepted is not None:
            parse_chat_request({"messages": HELLO, **accepted}, max_tokens_limit=100)
        if refused is not None:
            with pytest.raises(RequestError) as refusal:
                parse_chat_request({"messages": HELLO, **refused}, max_tokens_limit=100)
            assert refusal.value.param == name and refusal.value.status == 400, (name, refusal.value)
            assert name in str(refusal.value)


COMPLETION_FIELD_EXAMPLES: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {
    "best_of": ({"best_of": 1}, {"best_of": 2}),
    "echo": ({"echo": True}, {"echo": "yes"}),
    "frequency_penalty": ({"frequency_penalty": 0.5}, {"frequency_penalty": 3}),
    "logit_bias": (None, {"logit_bias": {"42": 5}}),
    "logprobs": (None, {"logprobs": 2}),
    "max_tokens": ({"max_tokens": 5}, {"max_tokens": 0}),
    "model": ({"model": "anything"}, {"model": 5}),
    "n": ({"n": 1}, {"n": 2}),
    "presence_penalty": ({"presence_penalty": -0.5}, {"presence_penalty": 2.5}),
    "prompt": ({"prompt": [1, 2, 3]}, {"prompt": ["one", "two"]}),
    "seed": ({"seed": 1}, {"seed": -1}),
    "stop": ({"stop": ["x"]}, {"stop": 5}),
    "stream": ({"stream": True}, {"stream": "yes"}),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, {"stream_options": "x"}),
    "suffix": (None, {"suffix": "return x"}),
    "temperature": ({"temperature": 0.5}, {"temperature": 3}),
    "top_p": ({"top_p": 0.5}, {"top_p": 0}),
    "user": ({"user": "u"}, {"user": 5}),
}  # fmt: skip


def test_every_field_of_the_openai_completion_request_is_honoured_or_refused_by_name() -> None:
    from openai.types import completion_create_params as params

    fields = {key for kind in (params.CompletionCreateParamsStreaming, params.CompletionCreateParamsNonStreaming)
              for key in kind.__required_keys__ | kind.__optional_keys__}  # fmt: skip
    assert fields <= COMPLETION_FIELDS.keys(), sorted(fields - COMPLETION_FIELDS.keys())
    assert fields == COMPLETION_FIELD_EXAMPLES.keys(), sorted(fields ^ COMPLETION_FIELD_EXAMPLES.keys())
    for name in sorted(fields):
        accepted, refused = COMPLETION_FIELD_EXAMPLES[name]
        assert (COMPLETION_FIELDS[name] == HONOURED) == (accepted is not None), name
        if accepted is not None:
            parse_completion_request({"prompt": "Hello", **accepted}, max_tokens_limit=100)
        if refused is not None:
            with pytest.raises(RequestError) as refusal:
                parse_completion_request({"prompt": "Hello", **refused}, max_tokens_limit=100)
            assert refusal.value.param == name and refusal.value.status == 400, (name, refusal.value)


@pytest.mark.parametrize(
    ("request_body", "param"),
    [({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": [1, "a"]}, "prompt"),
     ({"prompt": [[1, 2], [3]]}, "prompt"), ({"prompt": "x", "messages": HELLO}, "messages")],
)  # fmt: skip
def test_completion_parser_refuses(request_body: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as refusal:
        parse_completion_request(request_body, max_tokens_limit=100)
    assert refusal.value.param == param


def test_completion_parser_reads_one_prompt_of_text_or_ids() -> None:
    assert parse_completion_request({"prompt": ["Hi"]}, max_tokens_limit=100).prompt == "Hi"
    assert parse_completion_request({"prompt": [[5, 6]]}, max_tokens_limit=100).prompt == [5, 6]
    raw = parse_completion_request({"prompt": "Hi", "echo": True, "max_tokens": 3, "temperature": 0,
                                    "presence_penalty": 0.5}, max_tokens_limit=100)  # fmt: skip
    assert (raw.echo, raw.max_tokens, raw.temperature, raw.presence_penalty) == (True, 3, 0.0, 0.5)


def test_raw_completions_are_the_engine_s_own_answer(server: Server, local_engines: dict) -> None:
    engine = local_engines[server.runtime]
    raw_prompt = engine.render_chat(HELLO)  # the chat template's markup, written out
    ids = engine.tokenize(raw_prompt)
    assert ids == engine.chat_prompt_ids(HELLO)  # the markup's spellings are read as control tokens
    local = list(engine.stream(ids, GenerationConfig(max_tokens=10, ignore_eos=True)))[-1]
    client = server.client()
    kwargs = {"model": MODEL_ID, "max_tokens": 10, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(prompt=raw_prompt, **kwargs)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == local.text and whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(ids), 10)
    chunks = list(client.completions.create(prompt=raw_prompt, stream=True, stream_options={"include_usage": True},
                                            **kwargs))  # fmt: skip
    assert "".join(chunk.choices[0].text for chunk in chunks if chunk.choices) == local.text
    assert chunks[-1].usage.completion_tokens == 10
    assert client.completions.create(prompt=ids, **kwargs).choices[0].text == local.text  # token ids as they are
    echoed = client.completions.create(prompt=ids, echo=True, **kwargs).choices[0].text
    assert echoed == raw_prompt + local.text
    streamed_echo = list(client.completions.create(prompt=raw_prompt, echo=True, stream=True, **kwargs))
    assert "".join(chunk.choices[0].text for chunk in streamed_echo) == raw_prompt + local.text


def test_tokenize_and_detokenize(server: Server, local_engines: dict) -> None:
    engine = local_engines[server.runtime]
    raw_prompt = engine.render_chat(HELLO)
    tokenized = server.http.post("/tokenize", json={"prompt": raw_prompt}).json()
    assert tokenized == {"tokens": engine.tokenize(raw_prompt), "count": len(engine.tokenize(raw_prompt)),
                         "max_model_len": engine.context_length}  # fmt: skip
    assert server.http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": raw_prompt}
    chat = server.http.post("/tokenize", json={"messages": HELLO, "model": MODEL_ID}).json()
    assert chat["tokens"] == engine.chat_prompt_ids(HELLO)
    for path, body, param in [("/detokenize", {"tokens": [engine.vocabulary_size]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens"), ("/detokenize", {"tokens": "1"}, "tokens"),
                              ("/tokenize", {}, "prompt"), ("/tokenize", {"prompt": "x", "add": 1}, "add"),
                              ("/v1/completions", {"prompt": [engine.vocabulary_size]}, "prompt")]:  # fmt: skip
        refused = server.http.post(path, json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, (path, refused.text)


class Verdict(pydantic.BaseModel):
    answer: Literal["yes", "no", "maybe"]
    sure: bool
    colour: Literal["red", "green", "blue"]


def test_structured_output_through_the_official_client_s_parse(server: Server) -> None:
    client = server.client()
    for temperature in (0.0, 1.0):
        completion = client.chat.completions.parse(model=MODEL_ID, messages=HELLO, response_format=Verdict,
                                                   max_tokens=64, temperature=temperature, seed=3)  # fmt: skip
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Verdict), choice.message.content


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_json_schema_and_json_object_answers_streamed_or_not(server: Server, stream: bool) -> None:
    schema = Verdict.model_json_schema()
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema, "strict": True}}
    kwargs = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 64, "temperature": 0}
    client = server.client()
    if stream:
        text = stream_text(list(client.chat.completions.create(**kwargs, response_format=response_format,
                                                               stream=True)))  # fmt: skip
    else:
        text = client.chat.completions.create(**kwargs, response_format=response_format).choices[0].message.content
    Verdict.model_validate_json(text)
    answer = client.chat.completions.create(**kwargs | {"max_tokens": 200}, response_format={"type": "json_object"})
    content = answer.choices[0].message.content
    assert content.lstrip().startswith("{"), content
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)


def test_penalties_through_the_server_are_the_engine_s_own(server: Server, local_engines: dict) -> None:
    # Penalties move a greedy answer only from the first token that would repeat one before it; the
    # random model's answer repeats one within 8 to 26 tokens, as the engine's arithmetic goes (its
    # KV cache's precision moves it), so the answer is long enough to hold several.
    messages, tokens = [{"role": "user", "content": "fox fox fox fox fox fox"}], 64
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 0.3}
    extra = {"repetition_penalty": 1.3, "ignore_eos": True}
    answer = server.client().chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=tokens,
                                                     temperature=0, extra_body=extra, **penalties)  # fmt: skip
    config = GenerationConfig(max_tokens=tokens, repetition_penalty=1.3, ignore_eos=True, **penalties)
    engine = local_engines[server.runtime]
    local = list(engine.stream_chat(messages, config))[-1]
    plain_events = list(engine.stream_chat(messages, GenerationConfig(max_tokens=tokens, ignore_eos=True)))
    plain_ids = [event.token_id for event in plain_events if isinstance(event, TokenEvent)]
    assert len(set(plain_ids)) < len(plain_ids), "the plain answer repeats a token, for the penalties to act on"
    assert answer.choices[0].message.content == local.text != plain_events[-1].text


def test_models_show_the_sampling_defaults(server: Server) -> None:
    model = server.http.get("/v1/models").json()["data"][0]
    assert model["sampling_defaults"] == SamplingDefaults().describe()  # the tiny checkpoint's config says none


def test_the_model_s_generation_config_is_the_default_of_a_request(serve_model: Path, local_engines: dict,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    model = tmp_path / "with-defaults"
    shutil.copytree(serve_model, model)
    # As Qwen2.5-Instruct's checkpoints ship it, with greedy decoding so that the answer can be compared.
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.0, "top_p": 0.8,
                                                              "top_k": 20, "repetition_penalty": 1.4}))  # fmt: skip
    messages = [{"role": "user", "content": "fox fox fox fox fox fox"}]
    runtime = ENGINES[0]
    with running(runtime, model, tmp_path / "server.log") as server:
        shown = server.http.get("/v1/models").json()["data"][0]["sampling_defaults"]
        assert shown == {"temperature": 0.0, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.4,
                         "presence_penalty": 0.0, "frequency_penalty": 0.0}  # fmt: skip
        client = server.client()
        answer = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16,
                                                extra_body={"ignore_eos": True})  # fmt: skip
        asked = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16,
                                               extra_body={"ignore_eos": True, "repetition_penalty": 1.0})  # fmt: skip
        assert_stopped_cleanly(server)
    engine = local_engines[runtime]
    defaults = GenerationConfig(max_tokens=16, top_p=0.8, top_k=20, repetition_penalty=1.4, ignore_eos=True)
    defaulted = list(engine.stream_chat(messages, defaults))[-1]
    plain = list(engine.stream_chat(messages, GenerationConfig(max_tokens=16, ignore_eos=True)))[-1]
    assert answer.choices[0].message.content == defaulted.text
    assert asked.choices[0].message.content == plain.text != defaulted.text


# --- log-probabilities ----------------------------------------------------------------------


def test_logprobs_streamed_and_whole_are_the_engine_s_own(server: Server, local_engines: dict) -> None:
    """The same figures streamed, whole, and from the engine in this process: on OpenVINO the server
    answers on its continuous-batching pipeline (--parallel 4), this process on LLMPipeline, and
    both are scored alike. An engine that gives none refuses with a 400 naming logprobs."""
    kwargs = {"model": MODEL_ID, "messages": HELLO, "max_tokens": 8, "temperature": 0, "logprobs": True,
              "top_logprobs": 3, "extra_body": {"ignore_eos": True}}  # fmt: skip
    client = server.client()
    if engine_class(server.runtime).top_logprobs is None:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**kwargs)
        assert (refused.value.param, refused.value.code) == ("logprobs", "unsupported_by_engine")
        return
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [entry.model_dump() for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]  # fmt: skip
    whole = [entry.model_dump() for entry in client.chat.completions.create(**kwargs).choices[0].logprobs.content]
    assert streamed == whole
    assert 0 < len(whole) <= 8
    for entry in whole:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        values = [alternative["logprob"] for alternative in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert entry["top_logprobs"][0]["token"] == entry["token"] and values[0] == entry["logprob"]  # greedy
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
    engine = local_engines[server.runtime]
    config = GenerationConfig(max_tokens=8, ignore_eos=True, logprobs=3)
    # Tokens without text (the end of the answer) get no entry, as in the server's answer.
    tokens = [t for t in scored_tokens(engine.stream_chat(HELLO, config)) if engine.token_bytes(t.token_id)]
    spelled = [[list(engine.token_bytes(token_id)) for token_id in (t.token_id, *(i for i, _ in t.logprobs.top))]
               for t in tokens]  # fmt: skip
    assert [[entry["bytes"], *(top["bytes"] for top in entry["top_logprobs"])] for entry in whole] == spelled
    here = [logprob for t in tokens for logprob in (t.logprobs.logprob, *(lp for _, lp in t.logprobs.top))]
    there = [lp for entry in whole for lp in (entry["logprob"], *(top["logprob"] for top in entry["top_logprobs"]))]
    assert there == pytest.approx(here, abs=LOGPROB_TOLERANCE)


# --- tools --------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    # A bounded city: the tiny model's random text would fill any budget inside a free string.
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}  # fmt: skip
CLOCK = {"type": "function", "function": {"name": "time_now", "parameters": {"type": "object", "properties": {}}}}


def test_calls_are_found_in_the_text_as_qwen_writes_them() -> None:
    text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Busan", "unit": "c"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "time_now", "arguments": {}}\n</tool_call>')  # fmt: skip
    content, calls = split_tool_calls(text)
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Busan", "unit": "c"}),
        ("time_now", {}),
    ]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert split_tool_calls("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    # A stream holds back what may open a call, then sends the calls whole before the finish chunk.
    answer = ChatAnswer("m", tools_offered=True)
    pieces = [chunk for piece in ("Let me", " look.\n<tool", text[len("Let me look.\n<tool"):])
              for chunk in answer.feed(TokenEvent(-1, piece, 0.0))]  # fmt: skip
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in pieces) == "Let me look.\n"
    last = answer.finish("stop", {})
    assert [c["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] for c in last[:-1]] == ["get_weather",
                                                                                               "time_now"]  # fmt: skip
    assert last[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_prompt_with_tools_is_the_one_transformers_renders(serve_model: Path, local_engines: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(next(serve_model.parent.parent.glob("serve-checkpoint*")))
    conversation = [
        {"role": "user", "content": "Weather in Busan?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Busan", "unit": "c"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21 C & sunny <b>"},
    ]  # fmt: skip
    expected = tokenizer.apply_chat_template(conversation, tools=[WEATHER, CLOCK], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
    for engine in local_engines.values():
        assert engine.render_chat(conversation, [WEATHER, CLOCK]) == expected


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_required_call_follows_the_function_s_parameters(server: Server, stream: bool) -> None:
    client = server.client()
    kwargs = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Weather in Busan?"}], "max_tokens": 160,
              "tools": [WEATHER, CLOCK], "tool_choice": "required", "parallel_tool_calls": False}  # fmt: skip
    if stream:
        calls: dict[int, dict[str, str]] = {}
        finish = None
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for delta in chunk.choices[0].delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        found = list(calls.values())
    else:
        choice = client.chat.completions.create(**kwargs).choices[0]
        finish = choice.finish_reason
        found = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
    assert finish == "tool_calls" and len(found) == 1, found
    arguments = json.loads(found[0]["arguments"])
    parameters = {"get_weather": WEATHER, "time_now": CLOCK}[found[0]["name"]]["function"]["parameters"]
    jsonschema.validate(arguments, parameters)


def test_a_named_function_is_the_one_called_and_the_round_trip_ends_in_an_answer(server: Server) -> None:
    client = server.client()
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Busan?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=160, tools=[WEATHER, CLOCK],
                                           tool_choice=named)  # fmt: skip
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.content is None
    (call,) = message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    messages += [message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "21 C"}]
    final = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, tools=[WEATHER, CLOCK],
                                           tool_choice="none", temperature=0)  # fmt: skip
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.tool_calls is None
    assert isinstance(final.choices[0].message.content, str)


def test_tools_need_a_template_that_shows_them() -> None:
    """Plain ChatML (the session's tiny model) shows no tools: the server refuses them with a 400
    (param tools, code unsupported_by_model) rather than answer as if they had not been sent."""
    assert template_knows_tools(TOOLS_TEMPLATE) and not template_knows_tools(CHATML_TEMPLATE)


# --- operations: metrics, CORS, keep-alive, loading ---------------------------------------


def scrape(server: Server, **headers: str) -> dict[str, float]:
    """GET /metrics, parsed by prometheus_client's own parser: each sample by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    response = server.http.get("/metrics", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text
    return {sample.name + json.dumps(sample.labels, sort_keys=True): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}  # fmt: skip


def test_metrics_count_what_the_server_did(server: Server) -> None:
    before = scrape(server)
    health = server.health()
    info = next(value for key, value in before.items() if key.startswith("qwenrt_server_info"))
    assert info == 1.0
    info_labels = next(key for key in before if key.startswith("qwenrt_server_info"))
    for label in (f'"engine": "{server.runtime}"', f'"model": "{MODEL_ID}"', '"threads": "1"',
                  f'"parallel": "{server.parallel}"'):  # fmt: skip
        assert label in info_labels, info_labels
    assert before['qwenrt_requests_total{"outcome": "completed"}'] == health["completed"]
    assert before["qwenrt_generation_tokens_total{}"] == health["generated_tokens"]
    server.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=12,
                                            extra_body={"ignore_eos": True})  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL_ID, messages=HELLO, max_tokens=0)
    after = scrape(server)
    grew = {key: after[key] - before.get(key, 0.0) for key in after}
    assert grew['qwenrt_requests_total{"outcome": "completed"}'] == 1
    assert grew['qwenrt_requests_total{"outcome": "refused"}'] == 1
    assert grew["qwenrt_generation_tokens_total{}"] == 12
    assert grew["qwenrt_prompt_tokens_total{}"] == len(local_prompt_ids(server))
    assert grew["qwenrt_time_to_first_token_seconds_count{}"] == 1
    assert grew["qwenrt_inter_token_latency_seconds_count{}"] == 11
    assert 0 < grew["qwenrt_time_to_first_token_seconds_sum{}"] < 10
    assert after["qwenrt_requests_waiting{}"] == 0 and after["qwenrt_requests_running{}"] == 0


def local_prompt_ids(server: Server) -> list[int]:
    with open_engine(server.runtime, Path(server.model_dir), EngineOptions(threads=1)) as engine:
        return engine.chat_prompt_ids(HELLO)


def test_streams_say_not_to_buffer_and_keep_alive_while_waiting(serve_model: Path, tmp_path: Path) -> None:
    """A stream queued behind a long answer gets SSE comments until its first token; clients skip them."""
    with running(ENGINES[0], serve_model, tmp_path / "server.log", "--parallel", "1", "--sse-keep-alive", "0.2",
                 "--max-tokens", str(TOKEN_LIMIT)) as server:  # fmt: skip
        assert server.parallel == 1
        long = Call(lambda: server.client().chat.completions.create(
            model=MODEL_ID, messages=HELLO, max_tokens=TOKEN_LIMIT, extra_body={"ignore_eos": True}))  # fmt: skip
        long.start()
        server.wait_for(lambda health: health["active"] == 1, "the long answer running")
        with server.http.stream("POST", "/v1/chat/completions", json=chat_body(4), timeout=60) as response:
            assert response.headers["x-accel-buffering"] == "no"
            text = "".join(response.iter_text())
        long.join()
        assert long.error is None, long.error
        assert_stopped_cleanly(server)
    events = text.split("\n\n")
    comments = [index for index, event in enumerate(events) if event == ": keep-alive"]
    first_token = next(index for index, event in enumerate(events) if '"content":"' in event and '"role"' not in event)
    assert comments and comments[0] < first_token, text[:600]  # kept alive while it waited in the queue
    payloads = [event for event in events if event and not event.startswith(":")]
    assert payloads[-1] == "data: [DONE]"
    usage = [json.loads(event[len("data: ") :]) for event in payloads[:-1] if '"usage":{' in event]
    assert usage[-1]["usage"]["completion_tokens"] == 4


def test_cors_origins_and_the_key(serve_model: Path, tmp_path: Path) -> None:
    origin, key = "http://dashboard.local", "k3y"
    with running(ENGINES[0], serve_model, tmp_path / "server.log", "--cors-origin", origin, "--api-key", key) as server:
        preflight = server.http.options("/v1/chat/completions", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "authorization, content-type"})  # fmt: skip
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = server.http.get("/v1/models", headers={"origin": origin})  # no key: 401, readable by the page
        assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin
        allowed = server.http.get("/v1/models", headers={"origin": origin, "authorization": f"Bearer {key}"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == origin
        other = server.http.options("/v1/chat/completions", headers={
            "origin": "http://elsewhere.local", "access-control-request-method": "POST"})  # fmt: skip
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        assert "access-control-allow-origin" not in server.http.get("/health", headers={"origin": "http://x"}).headers
        assert_stopped_cleanly(server)


@pytest.mark.parametrize("runtime", ENGINES)
def test_an_engine_that_cannot_open_stops_the_server_with_one_error_line(runtime: str, serve_model: Path,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    model = tmp_path / "broken"
    shutil.copytree(serve_model, model)
    artifact = engine_class(runtime).artifact_path(model)
    damaged = artifact if artifact.is_file() else artifact / "openvino_model.bin"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 3])
    done = run_serve("--runtime", runtime, "--model", str(model), "--port", "0")
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("qwenrt: error: "), done.stderr[-3000:]


# --- the demo model -----------------------------------------------------------------------


@pytest.mark.real_weights
@pytest.mark.parametrize("runtime", ENGINES)
def test_demo_model_answers_two_clients_at_once(runtime: str, demo_model: Path, tmp_path: Path) -> None:
    """Real weights behind the server: two clients at once each get a real, whole answer."""
    with running(runtime, demo_model, tmp_path / "server.log", "--parallel", "2") as server:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)

        async def ask(question: str) -> tuple[str, Any]:
            chunks = [chunk async for chunk in await client.chat.completions.create(
                model=server.model_id, messages=[{"role": "user", "content": question}], max_tokens=160,
                temperature=0, stream=True, stream_options={"include_usage": True})]  # fmt: skip
            return stream_text(chunks), chunks[-1].usage

        async def both() -> list[tuple[str, Any]]:
            try:
                return await asyncio.gather(ask("Write a Python quicksort function."),
                                            ask("Write a Python function that reverses a string."))  # fmt: skip
            finally:
                await client.close()

        for text, usage in asyncio.run(both()):
            assert "def " in text, text
            assert "\ufffd" not in text
            assert usage.completion_tokens > 10
        health = server.health()
        assert (health["completed"], health["failed"]) == (2, 0), health
        assert health["peak_active"] == (2 if runtime == "openvino" else 1), health
        assert_stopped_cleanly(server)


@pytest.mark.real_weights
@pytest.mark.parametrize("runtime", ENGINES)
def test_demo_model_calls_a_tool_and_answers_with_its_result(runtime: str, demo_model: Path, tmp_path: Path) -> None:
    """The agent round trip on real weights, tool_choice auto: the model decides to call, the
    call comes back as tool_calls, and the tool's answer makes the final answer."""
    with running(runtime, demo_model, tmp_path / "server.log") as server:
        client = server.client()
        # A deployed assistant's system message: without one the 0.5B model may echo the tool's
        # response in its tags or call again, which of the two depending on the arithmetic
        # (the engine, its threads, its KV cache's precision).
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": "You are a helpful assistant. Answer the user in plain words."},
            {"role": "user", "content": "What is the weather in Busan right now?"},
        ]
        kwargs = {"model": server.model_id, "tools": [WEATHER], "temperature": 0, "max_tokens": 120}
        first = client.chat.completions.create(messages=messages, **kwargs).choices[0]
        print(f"\n--- {runtime}: {first.message}")
        assert first.finish_reason == "tool_calls", first.message.content
        (call,) = first.message.tool_calls
        assert call.function.name == "get_weather" and "Busan" in json.loads(call.function.arguments)["city"]
        result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}
        messages += [first.message.model_dump(exclude_none=True), result]
        # The 0.5B model calls again when the tools stay on offer; "none" takes them off the prompt.
        final = client.chat.completions.create(messages=messages, tool_choice="none", **kwargs).choices[0]
        print(f"--- {runtime}: {final.message.content}")
        assert final.finish_reason == "stop" and final.message.tool_calls is None
        assert "21" in final.message.content and "<tool" not in final.message.content
        assert_stopped_cleanly(server)


@pytest.mark.real_weights
@pytest.mark.parametrize("runtime", ENGINES)
def test_demo_model_s_own_call_follows_the_parameters_under_auto(runtime: str, demo_model: Path,
                                                                  tmp_path: Path) -> None:  # fmt: skip
    """tool_choice auto holds a call the model decides on to the function's parameters: here an
    airport code of three capitals, where the model left alone writes the city's name."""
    airport = {"type": "function", "function": {
        "name": "flight_status", "description": "The status of the next flight to an airport",
        "parameters": {"type": "object", "properties": {"airport": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                       "required": ["airport"], "additionalProperties": False}}}  # fmt: skip
    messages = [{"role": "user", "content": "Is the next flight to Busan on time?"}]
    with running(runtime, demo_model, tmp_path / "server.log") as server:
        client = server.client()
        choice = client.chat.completions.create(model=server.model_id, messages=messages, tools=[airport],
                                                temperature=0, max_tokens=80).choices[0]  # fmt: skip
        print(f"\n--- {runtime}: {choice.message}")
        assert choice.finish_reason == "tool_calls", choice.message.content
        (call,) = choice.message.tool_calls
        assert re.fullmatch(r"[A-Z]{3}", json.loads(call.function.arguments)["airport"])
        assert_stopped_cleanly(server)


@pytest.mark.real_weights
@pytest.mark.parametrize("runtime", ENGINES)
def test_health_says_503_until_the_model_is_warm(runtime: str, demo_model: Path, tmp_path: Path) -> None:
    """The server answers as soon as it listens: /health and the API say 503 while the real model
    loads (seconds), as load balancers and orchestrators expect, then 200."""
    log = tmp_path / "server.log"
    command = [*QWENRT, "serve", "--runtime", runtime, "--model", str(demo_model), "--threads", "1", "--port", "0",
               "--parallel", "1"]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (listening := re.search(r"listening on (http://\S+); loading the model", log.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        with httpx.Client(base_url=listening.group(1), timeout=30) as http:
            early = http.get("/health")
            refused = http.post("/v1/chat/completions", json={"messages": HELLO})
            while (ready := http.get("/health")).status_code == 503:
                assert time.monotonic() < deadline + 120, ready.text
                time.sleep(0.05)
        assert early.status_code == 503 and early.json()["status"] in ("loading", "warming up"), early.text
        assert early.headers["retry-after"] == "1"
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_not_ready", refused.text
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
        assert ANNOUNCE.search(log.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-2000:]


def test_an_engine_crash_ends_the_server_with_one_line(serve_model: Path, tmp_path: Path) -> None:
    """A native crash while serving (here a real SIGSEGV in the engine's process) ends in a message
    from qwenrt's supervising process, and the next start probes the engine's settings again."""
    from qwenrt.runtimes import engine_class
    from qwenrt.runtimes.probe import ProbeRecord

    engine = engine_class("gguf")
    settings, key = engine.resolve_settings(serve_model, EngineOptions(threads=1))
    signature = settings.signature(engine.knobs)
    server = Server("gguf", serve_model, tmp_path / "server.log")
    try:
        started = ProbeRecord(key).outcome(signature)
        assert started is not None and started["ok"] is True, "the server opened settings never probed"
        server.engine_process().send_signal(signal.SIGSEGV)
        assert server.process.wait(timeout=60) == 1
    finally:
        server.kill()
    lines = [line for line in server.output().splitlines() if line.strip()]
    assert lines[-1].startswith("qwenrt: error: llama.cpp"), server.tail()
    assert "crashed (SIGSEGV, segmentation fault) while running" in lines[-1]
    assert "Traceback" not in server.output()
    assert ProbeRecord(key).outcome(signature) is None


# --- any body at all -----------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_FIELD_VALUES = st.dictionaries(st.sampled_from(sorted(CHAT_FIELDS)), _JSON, max_size=6)
_TOOL = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "g"])}, optional={"parameters": _JSON, "description": _JSON})})  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(fields=_FIELD_VALUES, tools=st.lists(_TOOL, max_size=2), choice=_JSON | st.sampled_from(["auto", "required"]),
       messages=st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool"]) | _JSON},
                                               optional={"content": st.text(max_size=8) | _JSON,
                                                         "tool_calls": st.lists(st.fixed_dictionaries(
                                                             {"function": st.fixed_dictionaries(
                                                                 {"name": st.text(max_size=4) | _JSON},
                                                                 optional={"arguments": st.text(max_size=8) | _JSON})
                                                              | _JSON}), max_size=2) | _JSON,
                                                         "tool_call_id": _JSON}),
                         min_size=1, max_size=3))  # fmt: skip
def test_the_parsers_answer_any_json_with_a_request_or_a_named_refusal(fields: dict, tools: list, choice: Any,
                                                                       messages: list) -> None:  # fmt: skip
    """Whatever a client sends in whichever field, the parsers give a request or a RequestError;
    never another exception (which would be a 500)."""
    for body in ({**fields, "messages": messages}, {"messages": HELLO, "tools": tools, "tool_choice": choice},
                 {**fields, "messages": HELLO}, {**fields, "prompt": "x"}):  # fmt: skip
        for parse in (parse_chat_request, parse_completion_request):
            try:
                parse(body, max_tokens_limit=100)
            except RequestError as refusal:
                assert refusal.status == 400
