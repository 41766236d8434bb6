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
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qwenrt.manifest import generation_defaults
from qwenrt.runtimes.base import Engine, StreamEnd, TokenEvent
from qwenrt.runtimes.chat_template import template_knows_tools
from qwenrt.serve import protocol
from qwenrt.serve.metrics import ServerMetrics
from qwenrt.serve.protocol import RequestError
from qwenrt.serve.service import EngineService, ServerBusy

log = logging.getLogger("qwenrt.serve")


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048  # the most a request may ask for
    max_queue: int = 64  # requests waiting beyond the engine's places before 503s
    api_key: str | None = None
    # A request's headers, then its body, must each arrive within this (slow clients hold a place).
    request_timeout_s: float = 20.0
    keep_alive_s: float = 5.0  # an idle connection between requests is closed after this
    max_connections: int = 128  # open connections beyond this are refused with a 503
    # Browser origins allowed to call the API (CORS); none by default.
    cors_origins: tuple[str, ...] = ()
    # A stream that has sent nothing for this long (a long prompt's prefill, a wait in the
    # queue) gets an SSE comment, so that proxies and clients with read timeouts keep it open.
    sse_keep_alive_s: float = 15.0


@dataclass(frozen=True)
class EngineStart:
    """How the server gets its engine: opened (and warmed up) on a worker thread once the server
    answers, so that /health can say 503 "loading" meanwhile, as load balancers expect."""

    runtime: str
    model_dir: Path
    open: Callable[[], Engine]
    # What to log once the engine is ready (the line that says where the server is).
    announce: Callable[[Engine], str] = lambda engine: f"serving with {engine.name}"
    # Called with the exception when the engine cannot be opened: the server must stop.
    failed: Callable[[BaseException], None] = lambda exc: None
    # Called with the service once it answers (to stop its generations after a forced stop).
    ready: Callable[[EngineService], None] = lambda service: None


class _State:
    service: EngineService | None = None
    phase = "loading"  # then "warming up", "ok", or "failed"


def create_app(
    start: EngineStart,
    model_id: str,
    limits: ServerLimits = ServerLimits(),
    defaults: protocol.SamplingDefaults | None = None,
) -> Starlette | Callable[..., Awaitable[None]]:
    """The ASGI app; its engine opens when the app starts and closes when it shuts down.
    ``defaults``: what a request that leaves a sampling setting out gets (None: the model's
    generation_config.json where it says, OpenAI's defaults otherwise)."""
    created = int(time.time())
    if defaults is None:
        defaults = protocol.SamplingDefaults.of_model(generation_defaults(start.model_dir))
    state = _State()
    metrics = ServerMetrics(start.runtime, model_id,
                            queued=lambda: state.service.counters.queued if state.service else 0,
                            running=lambda: state.service.counters.active if state.service else 0)  # fmt: skip

    def open_and_warm_up() -> EngineService:
        engine = start.open()
        try:
            service = EngineService(engine, limits.max_queue)
            state.phase = "warming up"
            log.info("warm-up done in %.0f ms", service.warm_up() * 1000)
        except BaseException:
            engine.close()
            raise
        service.metrics = metrics
        metrics.engine_ready(engine.threads.threads, engine.concurrency)
        return service

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def begin() -> None:
            try:
                service = await asyncio.get_running_loop().run_in_executor(None, open_and_warm_up)
            except BaseException as exc:  # the server stops; serve() reports why
                state.phase = "failed"
                start.failed(exc)
                return
            state.service, state.phase = service, "ok"
            start.ready(service)
            log.info("%s", start.announce(service.engine))

        starting = asyncio.ensure_future(begin())
        yield
        if not starting.done():
            log.info("stopping: waiting for the model to finish loading")
            await asyncio.shield(starting)  # a load in a native call cannot be interrupted
        if state.service is not None:
            counters = state.service.counters
            log.info("stopping: %d generations running, %d waiting", counters.active, counters.queued)
            await state.service.close()
        log.info("stopped")

    def ready() -> EngineService:
        if state.service is None:
            raise RequestError(f"the model is {state.phase}; retry in a moment", status=503, code="model_not_ready",
                               headers={"retry-after": "1"})  # fmt: skip
        return state.service

    async def health(request: Request) -> Response:
        if state.service is None:
            return JSONResponse({"status": state.phase, "runtime": start.runtime, "model": model_id}, status_code=503,
                                headers={"retry-after": "1"})  # fmt: skip
        return JSONResponse({**state.service.health(), "model": model_id})

    async def models(request: Request) -> Response:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": model_id,
                        "object": "model",
                        "created": created,
                        "owned_by": "qwenrt",
                        # qwenrt's own: what a request that leaves a setting out gets
                        "sampling_defaults": defaults.describe(),
                    }
                ],
            }  # fmt: skip
        )

    async def chat_completions(request: Request) -> Response:
        service = ready()
        body = await _read_json(request, limits.max_body_bytes, limits.request_timeout_s)
        chat = protocol.parse_chat_request(body, limits.max_tokens, defaults)
        if chat.tools and not template_knows_tools(service.engine.chat_template):
            raise RequestError("this model's chat template does not show tools to the model", param="tools",
                               code="unsupported_by_model")  # fmt: skip
        prompt_ids = await service.prompt_ids(chat.messages, chat.tools)
        spell = service.engine.token_bytes if chat.logprobs is not None else None
        shape = protocol.ChatAnswer(model_id, tools_offered=bool(chat.tools), token_bytes=spell)
        return await answer(request, service, prompt_ids, chat, shape)

    async def completions(request: Request) -> Response:
        """A raw prompt, as the model reads it: its control tokens' spellings are control tokens
        (a prompt may carry its own chat markup), or token ids as they are."""
        service = ready()
        body = await _read_json(request, limits.max_body_bytes, limits.request_timeout_s)
        raw = protocol.parse_completion_request(body, limits.max_tokens, defaults)
        if isinstance(raw.prompt, str):
            prompt_ids = await service.tokenize(raw.prompt)
            shown = raw.prompt
        else:
            prompt_ids = _known_ids(service.engine, raw.prompt, "prompt")
            shown = _detokenize(service.engine, prompt_ids)
        return await answer(request, service, prompt_ids, raw, protocol.TextAnswer(model_id, shown if raw.echo else ""))

    async def answer(request: Request, service: EngineService, prompt_ids: list[int], sampling: protocol.Sampling,
                     shape: protocol.ChatAnswer) -> Response:  # fmt: skip
        """One generation for chat or a raw completion: checked, admitted, then streamed or whole."""
        engine = service.engine
        max_tokens = _fit(engine, len(prompt_ids), sampling.max_tokens, limits.max_tokens)
        generation = sampling.generation(max_tokens)
        if (refusal := engine.cannot_do(generation)) is not None:
            setting, reason = refusal
            raise RequestError(reason, param=_REQUEST_FIELD.get(setting, setting), code="unsupported_by_engine")
        try:
            service.admit()
        except ServerBusy as exc:
            raise RequestError(str(exc), status=503) from None
        arrived = time.perf_counter()
        if sampling.user is not None:
            log.info("%s: for user %s", shape.id, json.dumps(sampling.user[:100], ensure_ascii=False))
        events = service.generate(prompt_ids, generation)
        if sampling.stream:
            return StreamingResponse(
                _sse(shape, sampling.include_usage, events, arrived, limits.sse_keep_alive_s),
                media_type="text/event-stream",
                # nginx buffers proxied answers unless told not to: a stream would arrive in lumps.
                headers={"cache-control": "no-cache", "x-request-id": shape.id, "x-accel-buffering": "no"},
            )
        return await _complete(request, shape, events, arrived)

    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: a prompt (read as /v1/completions reads it) or messages (as chat reads them)."""
        service = ready()
        body = await _read_json(request, limits.max_body_bytes, limits.request_timeout_s)
        parsed = protocol.parse_tokenize_request(body)
        if isinstance(parsed, str):
            ids = await service.tokenize(parsed)
        else:
            ids = await service.prompt_ids(parsed)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": service.engine.context_length})

    async def detokenize(request: Request) -> Response:
        service = ready()
        body = await _read_json(request, limits.max_body_bytes, limits.request_timeout_s)
        ids = _known_ids(service.engine, protocol.parse_detokenize_request(body), "tokens")
        return JSONResponse({"prompt": _detokenize(service.engine, ids)})

    async def prometheus(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error = RequestError(str(exc.detail), status=exc.status_code)
        _log_rejected(request, error)
        metrics.requests.labels("refused").inc()
        # Starlette's own refusals carry headers HTTP requires (Allow, on a 405).
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    app = Starlette(
        routes=[
            Route("/health", _answering(health), methods=["GET"]),
            Route("/v1/models", _answering(models), methods=["GET"]),
            Route("/v1/chat/completions", _answering(chat_completions, metrics), methods=["POST"]),
            Route("/v1/completions", _answering(completions, metrics), methods=["POST"]),
            Route("/tokenize", _answering(tokenize), methods=["POST"]),
            Route("/detokenize", _answering(detokenize), methods=["POST"]),
            Route("/metrics", _answering(prometheus), methods=["GET"]),
        ],
        exception_handlers={HTTPException: on_http_error},
        lifespan=lifespan,
    )
    guarded = _require_key(app, limits.api_key, metrics) if limits.api_key else app
    if not limits.cors_origins:
        return guarded
    # Outside the key check: a browser's preflight carries no key, and a refusal must carry
    # the CORS headers for the page to read it.
    return CORSMiddleware(guarded, allow_origins=list(limits.cors_origins), allow_methods=["GET", "POST"],
                          allow_headers=["authorization", "content-type"], expose_headers=["x-request-id"],
                          max_age=600)  # fmt: skip


# GenerationConfig's settings by the request field that sets them.
_REQUEST_FIELD = {"grammar": "response_format", "penalties": "repetition_penalty"}


def _answering(
    endpoint: Callable[[Request], Awaitable[Response]], metrics: ServerMetrics | None = None
) -> Callable[[Request], Awaitable[Response]]:
    """Every failure of a route as an answer in OpenAI's error shape and one log line: a refused
    request (RequestError) as itself, anything else as a 500 that names no internals (no engine
    message, address or prompt: those stay in the server's log line)."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RequestError as exc:
            _log_rejected(request, exc)
            if metrics is not None:
                metrics.requests.labels("refused").inc()
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        except Exception as exc:
            if metrics is not None:
                metrics.requests.labels("failed").inc()
            reference = protocol.error_reference()
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            log.error("%s %s failed (%s): %s: %s", request.method, request.url.path, reference,
                      type(exc).__name__, first_line)  # fmt: skip
            message = f"internal error ({reference}); the server's log says more"
            return JSONResponse(protocol.error_body(message, "server_error"), status_code=500)

    return answer


def _log_rejected(request: Request, error: RequestError) -> None:
    log.info("refused %s %s: %d %s", request.method, request.url.path, error.status, str(error)[:200])


async def _read_json(request: Request, limit: int, timeout_s: float) -> Any:
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RequestError(f"Content-Encoding {encoding} is not supported: send the body uncompressed", status=415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is over this server's limit of {limit} bytes", status=413)

    async def read() -> bytearray:
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise RequestError(f"the request body is over this server's limit of {limit} bytes", status=413)
        return body

    try:
        body = await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect:
        raise RequestError("the client went away while sending the request") from None
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive within {timeout_s:g} s", status=408) from None
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None
    except RecursionError:
        raise RequestError("the request body nests arrays or objects too deeply") from None


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
    request: Request, shape: protocol.ChatAnswer, events: AsyncGenerator[Any, None], arrived: float
) -> Response:
    """A whole answer in one JSON body; the generation stops if the client leaves before it."""

    async def collect() -> StreamEnd:
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, StreamEnd):
                    return event
                shape.note(event)
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
        _log_request(shape.id, None, "client left or server stopping")
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    end = answer.result()
    queued = end.started - arrived
    _log_request(shape.id, end, queued=queued)
    return JSONResponse(shape.whole(end.text, end, queued), headers={"x-request-id": shape.id})


def _known_ids(engine: Engine, ids: list[int], param: str) -> list[int]:
    """Token ids the model knows, or a 400 naming the first that it does not."""
    size = engine.vocabulary_size
    for index, token in enumerate(ids):
        if not 0 <= token < size:
            raise RequestError(f"{param}[{index}] is {token}: the model's token ids run from 0 to {size - 1}",
                               param=param)  # fmt: skip
    return ids


def _detokenize(engine: Engine, ids: list[int]) -> str:
    """The text of ``ids`` as a prompt writes it (control tokens spelled out), so that tokenising
    it gives the ids back; bytes that are not whole UTF-8 characters become U+FFFD."""
    return b"".join(engine.token_spelling(token) for token in ids).decode("utf-8", errors="replace")


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message from the client is its disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _sse(
    shape: protocol.ChatAnswer,
    include_usage: bool,
    events: AsyncGenerator[Any, None],
    arrived: float,
    keep_alive_s: float,
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: an opening chunk (chat's role), text chunks, a
    finish chunk, usage if asked, then [DONE]; a comment line when nothing else has gone out
    for ``keep_alive_s``. Starlette cancels this when the client disconnects, which cancels
    the generation."""
    if (opening := shape.opening()) is not None:
        yield _event(opening)
    end: StreamEnd | None = None
    try:
        # Closed on the way out whatever happens, so that the generation stops with the stream.
        async with contextlib.aclosing(events):
            async for event in _with_keep_alive(events, keep_alive_s):
                if event is None:
                    yield SSE_KEEP_ALIVE
                    continue
                if isinstance(event, TokenEvent):
                    for piece in shape.feed(event):
                        yield _event(piece)
                elif isinstance(event, StreamEnd):
                    end = event
    except Exception as exc:  # the engine failed mid-answer: tell this client, keep serving the others
        log.exception("%s: generation failed", shape.id)
        yield _event(protocol.error_body(f"generation failed: {exc}", "server_error"))
        return
    except BaseException:
        _log_request(shape.id, None, "client left or server stopping")
        raise
    assert end is not None
    queued = end.started - arrived
    for last in shape.finish(protocol.FINISH_REASONS[end.reason], {"timings": protocol.timings(end, queued)}):
        yield _event(last)
    if include_usage:
        yield _event(shape.usage_chunk(end))
    yield "data: [DONE]\n\n"
    _log_request(shape.id, end, queued=queued)


# An SSE comment: clients skip it, and it shows the connection is alive.
SSE_KEEP_ALIVE = ": keep-alive\n\n"


async def _with_keep_alive(events: AsyncGenerator[Any, None], every_s: float) -> AsyncIterator[Any]:
    """``events``, with None after each ``every_s`` that passes without one. The pending read is
    never cancelled by the wait (cancelling it would end the generator, and the generation)."""
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=every_s)
            if not done:
                yield None
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending


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


def _require_key(app: Starlette, api_key: str, metrics: ServerMetrics) -> Callable[..., Awaitable[None]]:
    """Bearer-token check in front of every route but /health (for probes). The scheme's name is
    case-insensitive (RFC 9110, 11.1); a refusal says which scheme to use (WWW-Authenticate)."""
    expected = api_key.encode()

    async def guarded(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").strip().partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), expected):
                log.info("refused %s %s: 401 invalid or missing API key", scope.get("method", ""), scope["path"])
                metrics.requests.labels("refused").inc()
                body = json.dumps(RequestError("invalid or missing API key", status=401).body()).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"www-authenticate", b'Bearer realm="qwenrt"')]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return guarded
