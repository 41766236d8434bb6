"""The HTTP side of ``qwenrt serve``: OpenAI's chat-completions routes on Starlette."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwenrt.runtimes.base import Engine, StreamEnd, TokenEvent
from qwenrt.serve import protocol
from qwenrt.serve.protocol import RequestError
from qwenrt.serve.service import EngineService, ServerBusy

log = logging.getLogger("qwenrt.serve")


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048  # the most a request may ask for
    max_queue: int = 64  # requests waiting beyond the engine's places before 503s
    api_key: str | None = None


def create_app(
    service: EngineService, model_id: str, limits: ServerLimits = ServerLimits(), announce: str = ""
) -> Starlette | Callable[..., Awaitable[None]]:
    """The ASGI app in front of ``service``; its engine is closed when the app shuts down."""
    created = int(time.time())
    engine = service.engine

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if announce:
            log.info("%s", announce)
        yield
        log.info("stopping: %d generations running, %d waiting", service.counters.active, service.counters.queued)
        await service.close()
        log.info("stopped")

    async def health(request: Request) -> Response:
        return JSONResponse({**service.health(), "model": model_id})

    async def models(request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "qwenrt"}]}
        )

    async def chat_completions(request: Request) -> Response:
        body = await _read_json(request, limits.max_body_bytes)
        chat = protocol.parse_chat_request(body, limits.max_tokens)
        prompt_ids = await service.prompt_ids(chat.messages)
        max_tokens = _fit(engine, len(prompt_ids), chat.max_tokens, limits.max_tokens)
        try:
            service.admit()
        except ServerBusy as exc:
            raise RequestError(str(exc), status=503) from None
        completion_id = protocol.new_completion_id()
        arrived = time.perf_counter()
        events = service.generate(prompt_ids, chat.generation(max_tokens))
        if chat.stream:
            return StreamingResponse(
                _sse(completion_id, model_id, chat, events, arrived),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", "x-request-id": completion_id},
            )
        return await _complete(request, completion_id, model_id, events, arrived)

    async def on_request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return JSONResponse(RequestError(str(exc.detail), status=exc.status_code).body(), status_code=exc.status_code)

    async def on_server_error(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return JSONResponse(protocol.error_body(f"internal error: {exc}", "server_error"), status_code=500)

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        ],
        exception_handlers={RequestError: on_request_error, HTTPException: on_http_error, Exception: on_server_error},
        lifespan=lifespan,
    )
    return _require_key(app, limits.api_key) if limits.api_key else app


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is over this server's limit of {limit} bytes", status=413)
    body = bytearray()
    try:
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise RequestError(f"the request body is over this server's limit of {limit} bytes", status=413)
    except ClientDisconnect:
        raise RequestError("the client went away while sending the request") from None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None


def _fit(engine: Engine, prompt_tokens: int, asked: int | None, limit: int) -> int:
    """The tokens to generate: as asked, or as many as the window leaves room for. A prompt
    that leaves no room is refused the way OpenAI refuses it."""
    window = engine.context_length
    room = window - prompt_tokens
    if room < 1:
        raise RequestError(
            f"the conversation is {prompt_tokens} tokens, which fills the context window of {window}; shorten it",
            param="messages",
            code="context_length_exceeded",
        )
    if asked is None:
        return min(limit, room)
    if asked > room:
        raise RequestError(
            f"the conversation is {prompt_tokens} tokens and max_tokens {asked}: together over the context "
            f"window of {window}; shorten the conversation or ask for at most {room} tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return asked


async def _complete(
    request: Request, completion_id: str, model_id: str, events: AsyncGenerator[Any, None], arrived: float
) -> Response:
    """A whole answer in one JSON body; the generation stops if the client leaves before it."""

    async def collect() -> StreamEnd:
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, StreamEnd):
                    return event
        raise RuntimeError("the engine ended without a StreamEnd")

    answer = asyncio.ensure_future(collect())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():
            # The client left (or the server is stopping): stop generating for nobody.
            answer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answer
    if answer.cancelled():
        _log_request(completion_id, None, "client left or server stopping")
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    end = answer.result()
    queued = end.started - arrived
    _log_request(completion_id, end, queued=queued)
    return JSONResponse(protocol.completion(completion_id, model_id, end.text, end, queued),
                        headers={"x-request-id": completion_id})  # fmt: skip


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message from the client is its disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(
    completion_id: str,
    model_id: str,
    chat: protocol.ChatRequest,
    events: AsyncGenerator[Any, None],
    arrived: float,
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a role chunk, text chunks, a finish chunk,
    usage if asked, then [DONE]. Starlette cancels this when the client disconnects,
    which cancels the generation."""
    created = int(time.time())
    yield _event(protocol.chunk(completion_id, model_id, created, {"role": "assistant", "content": ""}))
    end: StreamEnd | None = None
    try:
        # Closed on the way out whatever happens, so that the generation stops with the stream.
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, TokenEvent):
                    if event.text:
                        yield _event(protocol.chunk(completion_id, model_id, created, {"content": event.text}))
                elif isinstance(event, StreamEnd):
                    end = event
    except Exception as exc:  # the engine failed mid-answer: tell this client, keep serving the others
        log.exception("%s: generation failed", completion_id)
        yield _event(protocol.error_body(f"generation failed: {exc}", "server_error"))
        return
    except BaseException:
        _log_request(completion_id, None, "client left or server stopping")
        raise
    assert end is not None
    queued = end.started - arrived
    finish = protocol.FINISH_REASONS[end.reason]
    extra = {"timings": protocol.timings(end, queued)}
    yield _event(protocol.chunk(completion_id, model_id, created, {}, finish, extra))
    if chat.include_usage:
        yield _event(protocol.usage_chunk(completion_id, model_id, created, end))
    yield "data: [DONE]\n\n"
    _log_request(completion_id, end, queued=queued)


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _log_request(completion_id: str, end: StreamEnd | None, outcome: str = "", queued: float = 0.0) -> None:
    if end is None:
        log.info("%s: %s, generation stopped", completion_id, outcome)
        return
    latency = end.first_token_latency
    speed = end.decode_tokens_per_second
    log.info(
        "%s: %d prompt + %d generated tokens, queued %.0f ms, first token %s, %s, finish %s",
        completion_id,
        end.prompt_tokens,
        end.generated_tokens,
        queued * 1000,
        "-" if latency is None else f"{latency * 1000:.0f} ms",
        "-" if speed is None else f"{speed:.1f} tok/s",
        protocol.FINISH_REASONS[end.reason],
    )


def _require_key(app: Starlette, api_key: str) -> Callable[..., Awaitable[None]]:
    """Bearer-token check in front of every route but /health (for probes)."""
    expected = f"Bearer {api_key}".encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                body = json.dumps(RequestError("invalid or missing API key", status=401).body()).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded
